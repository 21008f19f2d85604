//! The cluster model the policies plan on: hosts (CPU capacity, memory,
//! power state, maintenance flag, power model) and VMs (CPU demand over
//! time, memory, placement).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::power::PowerModel;

/// Index of a host in [`Cluster::hosts`].
pub type HostId = usize;
/// Index of a VM in [`Cluster::vms`].
pub type VmId = usize;

/// Demand samples kept per VM.
pub const DEMAND_HISTORY: usize = 64;

/// Whether a host is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    /// Running, can host VMs.
    On,
    /// Powered down.
    Off,
    /// Asked to power up, not ready yet.
    Booting,
}

/// What to do with a VM when its host is evacuated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnEvacuate {
    /// Live-migrate it.
    #[default]
    Migrate,
    /// Shut it down (and start it again when the host comes back).
    Shutdown,
}

/// Which VMs are restarted first after their host failed (vSphere HA's
/// and oVirt's restart priorities); `disabled` VMs are not restarted and
/// hold no capacity back.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum RestartPriority {
    /// Restarted first.
    High,
    /// The default.
    #[default]
    Medium,
    /// Restarted last.
    Low,
    /// Never restarted by HA.
    Disabled,
}

/// A physical host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    /// Name (unique).
    pub name: String,
    /// CPU capacity in MIPS (all cores).
    pub cpu_mips: f64,
    /// MIPS of one core: a VM wanting more cannot run here at full speed.
    pub core_mips: f64,
    /// Memory in MB.
    pub mem_mb: u64,
    /// Power state.
    pub power: PowerState,
    /// In maintenance: excluded from every decision.
    pub maintenance: bool,
    /// Quarantined on a hardware warning ([`crate::ha::health`]): no VM is
    /// placed on it; its VMs stay.
    #[serde(default)]
    pub quarantined: bool,
    /// Power curve, if known.
    pub power_model: Option<PowerModel>,
}

impl Host {
    /// A running host with `cores` x `core_mips` and `mem_mb`.
    pub fn new(name: &str, cores: u32, core_mips: f64, mem_mb: u64) -> Self {
        Self {
            name: name.to_string(),
            cpu_mips: core_mips * f64::from(cores),
            core_mips,
            mem_mb,
            power: PowerState::On,
            maintenance: false,
            quarantined: false,
            power_model: None,
        }
    }

    /// Can take VMs now.
    pub fn usable(&self) -> bool {
        self.power == PowerState::On && !self.maintenance
    }
}

/// A virtual machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vm {
    /// Name (unique).
    pub name: String,
    /// CPU size in MIPS (its vCPUs at 100 %).
    pub cpu_mips: f64,
    /// Memory in MB (never overcommitted).
    pub mem_mb: u64,
    /// Current host; `None` when not running.
    pub host: Option<HostId>,
    /// Where it ran before a maintenance evacuation.
    pub home: Option<HostId>,
    /// Demand samples in MIPS, oldest first.
    pub demand: VecDeque<f64>,
    /// Time (s) of its last move.
    pub last_moved: Option<f64>,
    /// Evacuation behaviour.
    pub on_evacuate: OnEvacuate,
    /// Restart priority after its host fails.
    #[serde(default)]
    pub restart: RestartPriority,
    /// vCPUs, when known (0: as many as its size needs on the host's
    /// cores). A VM's demand on a host is at most this many cores.
    #[serde(default)]
    pub vcpus: u32,
}

impl Vm {
    /// A VM of `cpu_mips` and `mem_mb`, not placed.
    pub fn new(name: &str, cpu_mips: f64, mem_mb: u64) -> Self {
        Self {
            name: name.to_string(),
            cpu_mips,
            mem_mb,
            host: None,
            home: None,
            demand: VecDeque::new(),
            last_moved: None,
            on_evacuate: OnEvacuate::Migrate,
            restart: RestartPriority::Medium,
            vcpus: 0,
        }
    }

    /// Cores it can use on a host with `core_mips` per core: its vCPUs,
    /// else as many as its size needs (at least one).
    pub fn cores_on(&self, core_mips: f64) -> f64 {
        if self.vcpus > 0 {
            f64::from(self.vcpus)
        } else {
            (self.cpu_mips / core_mips).ceil().max(1.0)
        }
    }

    /// Record a demand sample (MIPS).
    pub fn record(&mut self, mips: f64) {
        if self.demand.len() == DEMAND_HISTORY {
            self.demand.pop_front();
        }
        self.demand.push_back(mips.max(0.0));
    }

    /// Latest demand; the full size when nothing was observed yet.
    pub fn current(&self) -> f64 {
        self.demand.back().copied().unwrap_or(self.cpu_mips)
    }

    /// Peak of the last `window` samples; the full size when none.
    pub fn peak(&self, window: usize) -> f64 {
        if self.demand.is_empty() {
            return self.cpu_mips;
        }
        self.demand
            .iter()
            .rev()
            .take(window.max(1))
            .copied()
            .fold(0.0, f64::max)
    }
}

/// Hosts, VMs and the clock.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Cluster {
    /// Hosts.
    pub hosts: Vec<Host>,
    /// VMs.
    pub vms: Vec<Vm>,
    /// Seconds since an arbitrary origin.
    pub now: f64,
    /// Rules users set ([`crate::plan::rules`]), checked when set.
    #[serde(default)]
    pub rules: Vec<crate::plan::rules::Rule>,
}

impl Cluster {
    /// VMs placed on `h`.
    pub fn vms_on(&self, h: HostId) -> impl Iterator<Item = VmId> + '_ {
        self.vms
            .iter()
            .enumerate()
            .filter(move |(_, v)| v.host == Some(h))
            .map(|(i, _)| i)
    }

    /// Memory in use on `h`.
    pub fn mem_used(&self, h: HostId) -> u64 {
        self.vms_on(h).map(|v| self.vms[v].mem_mb).sum()
    }

    /// Current CPU demand on `h` (MIPS).
    pub fn demand(&self, h: HostId) -> f64 {
        self.vms_on(h).map(|v| self.vms[v].current()).sum()
    }

    /// Host index by name.
    pub fn host_by_name(&self, name: &str) -> Option<HostId> {
        self.hosts.iter().position(|h| h.name == name)
    }

    /// VM index by name.
    pub fn vm_by_name(&self, name: &str) -> Option<VmId> {
        self.vms.iter().position(|v| v.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_history_is_bounded_and_peaks_are_recent() {
        let mut vm = Vm::new("a", 1000.0, 512);
        assert_eq!(vm.current(), 1000.0, "unknown demand counts as full size");
        for i in 0..100 {
            vm.record(f64::from(i));
        }
        assert_eq!(vm.demand.len(), DEMAND_HISTORY);
        assert_eq!(vm.current(), 99.0);
        assert_eq!(vm.peak(3), 99.0);
        vm.record(5.0);
        assert_eq!(vm.peak(1), 5.0);
        assert_eq!(vm.peak(2), 99.0);
    }
}
