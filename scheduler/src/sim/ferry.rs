//! The simulator's driver of ferry's policy ([`crate::plan::ferry`]): the
//! data centre seen through [`ClusterView`], one call of
//! [`crate::plan::ferry::plan`] per scheduling step, the same function and
//! defaults the daemon's planner runs.
//!
//! What the policy sees of a simulated VM is what a monitor would have
//! recorded: its trace samples up to the current step (no interpolation
//! toward the next sample). Hosts and VMs are named `h{i}` and `v{i}`
//! (rules name them so).

use super::baseline::initial_allocated;
use super::datacenter::Datacenter;
use super::MemoryModel;
use crate::model::{HostId, VmId};
use crate::plan::ferry::{self, ClusterView, FerryParams, FerryPlan, FerryState};
use crate::plan::rules::{Rule, RuleIndex, RuleSubject};

/// The data centre at step `k`, as the policy sees it.
#[derive(Debug)]
pub struct SimView<'d, 'a> {
    dc: &'d Datacenter<'a>,
    k: usize,
    names: &'d Names,
}

/// Names for rules and notes (VMs' only when there are rules).
#[derive(Debug, Default)]
pub struct Names {
    vms: Vec<String>,
    hosts: Vec<String>,
}

impl RuleSubject for SimView<'_, '_> {
    fn vm_name(&self, v: VmId) -> &str {
        &self.names.vms[v]
    }
    fn host_name(&self, h: HostId) -> &str {
        &self.names.hosts[h]
    }
    fn host_usable(&self, _h: HostId) -> bool {
        true
    }
}

impl ClusterView for SimView<'_, '_> {
    fn host_count(&self) -> usize {
        self.dc.hosts.len()
    }
    fn vm_count(&self) -> usize {
        self.dc.vms.len()
    }
    fn host_cpu(&self, h: HostId) -> f64 {
        self.dc.hosts[h].total_mips
    }
    fn host_mem(&self, h: HostId) -> f64 {
        self.dc.hosts[h].ram_mb
    }
    fn host_managed(&self, _h: HostId) -> bool {
        true
    }
    fn host_eligible(&self, _h: HostId) -> bool {
        true
    }
    fn vms_on(&self, h: HostId) -> &[VmId] {
        &self.dc.hosts[h].vms
    }
    fn vm_cpu(&self, v: VmId) -> f64 {
        self.dc.vms[v].mips
    }
    fn vm_mem(&self, v: VmId) -> f64 {
        self.dc.vms[v].ram_mb
    }
    fn vm_peak(&self, v: VmId, seconds: f64) -> f64 {
        let n = FerryParams::samples(seconds, super::STEP_SECONDS);
        self.dc.recent_peak(v, self.k, n)
    }
    fn vm_now(&self, v: VmId) -> f64 {
        self.dc.recent_peak(v, self.k, 1)
    }
    fn vm_fits_cores(&self, _v: VmId, h: HostId, mips: f64) -> bool {
        // Single-core VMs.
        mips <= self.dc.hosts[h].pe_mips
    }
    fn vm_busy(&self, v: VmId) -> bool {
        self.dc.vms[v].in_migration
    }
    fn vm_last_moved(&self, v: VmId) -> Option<f64> {
        Some(self.dc.vms[v].last_moved).filter(|t| t.is_finite())
    }
    fn now(&self) -> f64 {
        self.dc.now
    }
    fn strict_memory(&self) -> bool {
        self.dc.memory == MemoryModel::Strict
    }
    fn host_watts(&self, h: HostId, utilization: f64) -> Option<f64> {
        Some(self.dc.power(h, utilization))
    }
}

/// ferry's policy over a simulated day: its state between steps and the
/// rules.
#[derive(Debug)]
pub struct FerryDriver {
    params: FerryParams,
    state: FerryState,
    rules: RuleIndex,
    names: Names,
}

impl FerryDriver {
    /// The driver for `dc` under `rules` (VMs `v{i}`, hosts `h{i}`).
    pub fn new(dc: &Datacenter<'_>, params: FerryParams, rules: &[Rule]) -> Self {
        let (rules, names) = resolve(rules, dc.vms.len(), dc.hosts.len());
        Self {
            params,
            state: FerryState::default(),
            rules,
            names,
        }
    }

    /// The policy's plan at step `k` (the data centre processed at `k`).
    pub fn plan(&mut self, dc: &Datacenter<'_>, k: usize) -> FerryPlan {
        let view = SimView {
            dc,
            k,
            names: &self.names,
        };
        ferry::plan(&view, &self.params, &mut self.state, &self.rules, true)
    }
}

fn resolve(rules: &[Rule], vms: usize, hosts: usize) -> (RuleIndex, Names) {
    if rules.is_empty() {
        // Host names only: the plan's notes name the hosts that stay on.
        let names = Names {
            vms: Vec::new(),
            hosts: (0..hosts).map(|i| format!("h{i}")).collect(),
        };
        return (RuleIndex::default(), names);
    }
    let names = Names {
        vms: (0..vms).map(|i| format!("v{i}")).collect(),
        hosts: (0..hosts).map(|i| format!("h{i}")).collect(),
    };
    let host_names: Vec<&str> = names.hosts.iter().map(String::as_str).collect();
    let index = RuleIndex::resolve(
        rules,
        vms,
        |n| {
            n.strip_prefix('v')
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|&i| i < vms)
        },
        &host_names,
    );
    (index, names)
}

/// The hard rules at creation: the initial placement puts no VM where a
/// rule forbids it.
#[derive(Debug)]
pub struct InitialRules {
    rules: RuleIndex,
    names: Names,
}

impl InitialRules {
    /// `rules` over `vms` VMs and `hosts` hosts.
    pub fn new(rules: &[Rule], vms: usize, hosts: usize) -> Self {
        let (rules, names) = resolve(rules, vms, hosts);
        Self { rules, names }
    }

    /// Whether a rule mentions VM `v` (else every host is allowed).
    pub fn constrains(&self, v: VmId) -> bool {
        !self.rules.is_empty() && self.rules.mentions(v)
    }

    /// Whether VM `v` may be created on `h` given the VMs placed so far.
    pub fn allows(&self, dc: &Datacenter<'_>, v: VmId, h: HostId) -> bool {
        if self.rules.is_empty() || !self.rules.mentions(v) {
            return true;
        }
        let at: Vec<Option<HostId>> = dc.vms.iter().map(|x| x.host).collect();
        let leaving = vec![false; dc.hosts.len()];
        let view = SimView {
            dc,
            k: 0,
            names: &self.names,
        };
        self.rules.blocker(&view, v, h, &at, &leaving).is_none()
    }
}

/// ferry's initial placement at t = 0 (without rules) (every VM reserves its full MIPS and RAM):
/// VMs by decreasing RAM, then MIPS, each on the used host it leaves with
/// the least RAM (then MIPS) free, else on the first empty host that holds
/// it. Hosts are indexed by type and free RAM, then free MIPS (no scan per
/// VM). `Err(vm)` if a VM fits nowhere.
pub fn place_all_packed(dc: &mut Datacenter<'_>) -> Result<(), usize> {
    use std::collections::{BTreeMap, BTreeSet};
    /// CloudSim's creation limit: 10 VMs of 100 Mbit/s on a 1 Gbit/s host.
    const MAX_VMS: usize = 10;
    // Non-negative floats order like their bits.
    let key = |x: f64| x.max(0.0).to_bits();
    let kinds = dc.host_types.len();
    let mut used: Vec<BTreeMap<u64, BTreeSet<(u64, usize)>>> = vec![BTreeMap::new(); kinds];
    let mut empty: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); kinds];
    let mut free_ram: Vec<f64> = Vec::with_capacity(dc.hosts.len());
    let mut free_mips: Vec<f64> = Vec::with_capacity(dc.hosts.len());
    for (h, host) in dc.hosts.iter().enumerate() {
        free_ram.push(host.ram_mb - dc.ram_used(h));
        free_mips.push(host.total_mips - initial_allocated(dc, h));
        if host.vms.is_empty() {
            empty[host.kind].insert(h);
        } else if host.vms.len() < MAX_VMS {
            used[host.kind]
                .entry(key(free_ram[h]))
                .or_default()
                .insert((key(free_mips[h]), h));
        }
    }
    let mut order: Vec<usize> = (0..dc.vms.len()).collect();
    order.sort_by(|&a, &b| {
        dc.vms[b]
            .ram_mb
            .total_cmp(&dc.vms[a].ram_mb)
            .then(dc.vms[b].mips.total_cmp(&dc.vms[a].mips))
    });
    for v in order {
        let (need_ram, need_mips) = (dc.vms[v].ram_mb, dc.vms[v].mips);
        // Best used host of each type, then the best of those.
        let mut best: Option<(f64, f64, usize)> = None;
        let mut first_empty: Option<usize> = None;
        for kind in 0..kinds {
            let ht = &dc.host_types[kind];
            if ht.pe_mips < need_mips {
                continue;
            }
            let (ram, total) = (ht.ram_mb, ht.pe_mips * f64::from(ht.pes));
            let found = used[kind]
                .range(key(need_ram)..)
                .find_map(|(_, set)| set.range((key(need_mips), 0)..).next().map(|&(_, h)| h));
            if let Some(h) = found {
                let r = (free_ram[h] - need_ram) / ram;
                let m = (free_mips[h] - need_mips) / total;
                if best.is_none_or(|(br, bm, bh)| (r, m, h) < (br, bm, bh)) {
                    best = Some((r, m, h));
                }
            }
            if ram >= need_ram && total >= need_mips {
                if let Some(&h) = empty[kind].first() {
                    first_empty = Some(first_empty.map_or(h, |e: usize| e.min(h)));
                }
            }
        }
        let h = best.map(|b| b.2).or(first_empty).ok_or(v)?;
        let kind = dc.hosts[h].kind;
        if !empty[kind].remove(&h) {
            let k = key(free_ram[h]);
            let set = used[kind].get_mut(&k).expect("indexed");
            set.remove(&(key(free_mips[h]), h));
            if set.is_empty() {
                used[kind].remove(&k);
            }
        }
        dc.place_initial(v, h);
        free_ram[h] -= need_ram;
        free_mips[h] -= need_mips;
        if dc.hosts[h].vms.len() < MAX_VMS {
            used[kind]
                .entry(key(free_ram[h]))
                .or_default()
                .insert((key(free_mips[h]), h));
        }
    }
    Ok(())
}
