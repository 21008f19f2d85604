//! Policies as plans: each policy reads the [`Cluster`] and returns a
//! [`Plan`] of actions, each with the reason it was taken. A [`Ledger`]
//! tracks what the plan has already committed (CPU, memory, migrations per
//! host) so that no plan overcommits memory, pushes a host over its
//! threshold, moves a VM again too soon, or exceeds the per-host limit of
//! concurrent migrations.

// Per-host arrays (ledger, flags) are indexed in parallel by host id.
#![allow(clippy::needless_range_loop)]

pub mod balance;
pub mod ferry;
pub mod maintenance;
pub mod placement;
pub mod planner;
pub mod power_save;
pub mod rules;

use serde::{Deserialize, Serialize};

use crate::model::{Cluster, HostId, VmId};

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Live-migrate `vm` from `from` to `to`.
    Migrate {
        /// VM.
        vm: VmId,
        /// Source host.
        from: HostId,
        /// Target host.
        to: HostId,
        /// Why.
        reason: String,
    },
    /// Power a host up.
    PowerOn {
        /// Host.
        host: HostId,
        /// Why.
        reason: String,
    },
    /// Power a (now empty) host down.
    PowerOff {
        /// Host.
        host: HostId,
        /// Why.
        reason: String,
    },
    /// Shut a VM down (maintenance, `on_evacuate = shutdown`).
    ShutdownVm {
        /// VM.
        vm: VmId,
        /// Why.
        reason: String,
    },
    /// Start a stopped VM on a host.
    StartVm {
        /// VM.
        vm: VmId,
        /// Host.
        host: HostId,
        /// Why.
        reason: String,
    },
}

impl Action {
    /// The reason recorded with the action.
    pub fn reason(&self) -> &str {
        match self {
            Action::Migrate { reason, .. }
            | Action::PowerOn { reason, .. }
            | Action::PowerOff { reason, .. }
            | Action::ShutdownVm { reason, .. }
            | Action::StartVm { reason, .. } => reason,
        }
    }
}

/// An ordered list of actions, and why some wanted moves were not made.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Actions in execution order.
    pub actions: Vec<Action>,
    /// Why something a policy wanted did not happen (a rule forbade every
    /// target, ...), one line each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Plan {
    /// Number of migrations in the plan.
    pub fn migrations(&self) -> usize {
        self.actions
            .iter()
            .filter(|a| matches!(a, Action::Migrate { .. }))
            .count()
    }

    /// Append another plan.
    pub fn extend(&mut self, other: Plan) {
        self.actions.extend(other.actions);
        self.notes.extend(other.notes);
    }

    /// The migrations of the affinity partners [`Ledger::commit`] moved
    /// with `leader` from `from` to `to`; `why` begins each reason.
    pub fn followers_moved(
        &mut self,
        c: &Cluster,
        leader: VmId,
        from: HostId,
        to: HostId,
        followers: &[VmId],
        why: &str,
    ) {
        for &u in followers {
            self.actions.push(Action::Migrate {
                vm: u,
                from,
                to,
                reason: format!(
                    "{why} ({} -> {}, with {}: affinity)",
                    c.vms[u].name, c.hosts[to].name, c.vms[leader].name
                ),
            });
        }
    }
}

/// Limits every plan obeys.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Concurrent migrations (in + out) per host.
    pub max_migrations_per_host: usize,
    /// Minimum seconds between two moves of the same VM.
    pub min_move_interval_s: f64,
}

/// The defaults every plan uses, daemon and simulator alike (the figures
/// in BENCHMARKS.md are measured with them): 4 concurrent migrations per
/// host, 20 minutes between two moves of a VM.
impl Default for Limits {
    fn default() -> Self {
        Self {
            max_migrations_per_host: 4,
            min_move_interval_s: 1200.0,
        }
    }
}

/// Why a policy could not plan.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// No usable host has room for the VM.
    #[error("no host has room for VM {vm} ({mips:.0} MIPS, {mem_mb} MB)")]
    NoHost {
        /// VM name.
        vm: String,
        /// CPU demand used.
        mips: f64,
        /// Memory.
        mem_mb: u64,
    },
    /// The host is unknown.
    #[error("no host with index {0}")]
    UnknownHost(HostId),
    /// Hosts have room, but the rules forbid each of them.
    #[error("no host may take VM {vm}: {rules}")]
    Rules {
        /// VM name.
        vm: String,
        /// The rules that ruled each host out.
        rules: String,
    },
}

/// What a plan has committed so far, per host.
#[derive(Debug, Clone)]
pub struct Ledger {
    /// CPU demand (MIPS) after the planned moves.
    pub cpu: Vec<f64>,
    /// Memory (MB) after the planned moves, counting both ends of a move
    /// (the target reserves it before the source frees it).
    pub mem: Vec<u64>,
    /// Migrations touching each host.
    pub migrations: Vec<usize>,
    /// VMs already moved by this plan.
    pub moved: Vec<bool>,
    /// Placement before the plan (shared, cheap to clone).
    pub before: std::sync::Arc<Placement>,
    /// Where each VM is once the planned moves are done.
    pub at: Vec<Option<HostId>>,
    /// Hosts being emptied by this plan (a power-save donor, a failed
    /// host): affinity partners on them do not hold a group there.
    pub leaving: Vec<bool>,
    /// The cluster's rules, resolved.
    pub rules: std::sync::Arc<rules::RuleIndex>,
}

/// Where VMs are and what they demand now, per host (an index built once
/// per plan so that policies never scan all VMs per host).
#[derive(Debug, Clone)]
pub struct Placement {
    /// VMs on each host.
    pub on: Vec<Vec<VmId>>,
    /// Current demand (MIPS) per host.
    pub demand: Vec<f64>,
}

impl Placement {
    /// Index the cluster.
    pub fn new(c: &Cluster) -> Self {
        let mut on = vec![Vec::new(); c.hosts.len()];
        let mut demand = vec![0.0; c.hosts.len()];
        for (v, vm) in c.vms.iter().enumerate() {
            if let Some(h) = vm.host {
                on[h].push(v);
                demand[h] += vm.current();
            }
        }
        Self { on, demand }
    }
}

impl Ledger {
    /// The cluster as it is, with `demand` giving each VM's CPU estimate.
    pub fn new(c: &Cluster, demand: impl Fn(VmId) -> f64) -> Self {
        let mut cpu = vec![0.0; c.hosts.len()];
        let mut mem = vec![0; c.hosts.len()];
        for (v, vm) in c.vms.iter().enumerate() {
            if let Some(h) = vm.host {
                cpu[h] += demand(v);
                mem[h] += vm.mem_mb;
            }
        }
        Self {
            cpu,
            mem,
            migrations: vec![0; c.hosts.len()],
            moved: vec![false; c.vms.len()],
            before: std::sync::Arc::new(Placement::new(c)),
            at: c.vms.iter().map(|v| v.host).collect(),
            leaving: vec![false; c.hosts.len()],
            rules: std::sync::Arc::new(rules::RuleIndex::new(c)),
        }
    }

    /// Whether `vm` may move now under `limits` (`urgent` ignores the
    /// minimum interval, e.g. for maintenance).
    pub fn may_move(&self, c: &Cluster, limits: &Limits, vm: VmId, urgent: bool) -> bool {
        if self.moved[vm] {
            return false;
        }
        let Some(h) = c.vms[vm].host else {
            return false;
        };
        if self.migrations[h] >= limits.max_migrations_per_host {
            return false;
        }
        urgent
            || c.vms[vm]
                .last_moved
                .is_none_or(|t| c.now - t >= limits.min_move_interval_s)
    }

    /// Whether `to` can take `vm` (demand `mips`) staying at or under
    /// `cpu_cap` share, memory never overcommitted, migration limit kept,
    /// and no hard rule broken ([`Ledger::blocker`]). A VM leading its
    /// affinity group needs room for the followers too.
    pub fn fits(
        &self,
        c: &Cluster,
        limits: &Limits,
        vm: VmId,
        mips: f64,
        to: HostId,
        cpu_cap: f64,
    ) -> bool {
        self.room(c, limits, vm, mips, to, cpu_cap) && self.blocker(c, vm, to).is_none()
    }

    /// [`Ledger::fits`] without the rules: capacity and limits only.
    pub fn room(
        &self,
        c: &Cluster,
        limits: &Limits,
        vm: VmId,
        mips: f64,
        to: HostId,
        cpu_cap: f64,
    ) -> bool {
        let host = &c.hosts[to];
        let (mut cpu, mut mem) = (mips, c.vms[vm].mem_mb);
        for u in self.followers(c, vm) {
            cpu += follower_mips(c, u);
            mem += c.vms[u].mem_mb;
        }
        host.usable()
            && !host.quarantined
            && self.at[vm] != Some(to)
            && mips <= host.core_mips * c.vms[vm].cores_on(host.core_mips)
            && self.cpu[to] + cpu <= cpu_cap * host.cpu_mips
            && self.mem[to] + mem <= host.mem_mb
            && self.migrations[to] < limits.max_migrations_per_host
    }

    /// Affinity partners that go where `vm` goes: on its host, not yet
    /// decided by this plan (moved, shut down), when that host is being
    /// emptied (else they hold `vm` there).
    fn followers(&self, c: &Cluster, vm: VmId) -> Vec<VmId> {
        match self.at[vm] {
            Some(from)
                if !self.rules.is_empty() && (self.leaving[from] || !c.hosts[from].usable()) =>
            {
                let mut out = self.rules.followers(vm, from, &self.at);
                out.retain(|&u| !self.moved[u]);
                out
            }
            _ => Vec::new(),
        }
    }

    /// The hard rule that keeps `vm` (or an affinity partner following
    /// it) off `to`, described; `None` when the rules allow the move.
    pub fn blocker(&self, c: &Cluster, vm: VmId, to: HostId) -> Option<String> {
        if self.rules.is_empty() {
            return None;
        }
        std::iter::once(vm)
            .chain(self.followers(c, vm))
            .find_map(|v| self.rules.blocker(c, v, to, &self.at, &self.leaving))
    }

    /// Commit a move in the ledger: `vm` to `to` (demand `mips`) and, when
    /// it leads its affinity group off a host being emptied, its followers
    /// too, so that the room [`Ledger::room`] counted for the group is the
    /// room reserved: no later move of the plan takes it. A follower moves
    /// now while both hosts have a migration slot under `limits` (a group
    /// leaving a host being emptied does not wait for the minimum
    /// interval); one the limit holds back keeps its room on `to` and
    /// follows in a later round. Returns the followers that move now, in
    /// order: the caller records their moves.
    pub fn commit(
        &mut self,
        c: &Cluster,
        limits: &Limits,
        vm: VmId,
        mips: f64,
        to: HostId,
    ) -> Vec<VmId> {
        let followers = self.followers(c, vm);
        self.shift(c, vm, mips, to);
        let mut moved = Vec::with_capacity(followers.len());
        for u in followers {
            let m = follower_mips(c, u);
            let from = self.at[u].expect("a follower is placed");
            if self.migrations[from] < limits.max_migrations_per_host
                && self.migrations[to] < limits.max_migrations_per_host
            {
                self.shift(c, u, m, to);
                moved.push(u);
            } else {
                // Held back: its room on `to` stays taken.
                self.cpu[to] += m;
                self.mem[to] += c.vms[u].mem_mb;
            }
        }
        moved
    }

    /// One VM's move in the ledger.
    fn shift(&mut self, c: &Cluster, vm: VmId, mips: f64, to: HostId) {
        let from = c.vms[vm].host.expect("moving VM is placed");
        self.cpu[from] -= mips;
        self.cpu[to] += mips;
        // Memory stays reserved on the source until the move completes.
        self.mem[to] += c.vms[vm].mem_mb;
        self.migrations[from] += 1;
        self.migrations[to] += 1;
        self.moved[vm] = true;
        self.at[vm] = Some(to);
    }
}

/// The CPU demand the ledger counts for a VM that follows its affinity
/// group's leader ([`Ledger::room`], [`Ledger::commit`]).
fn follower_mips(c: &Cluster, u: VmId) -> f64 {
    c.vms[u].peak(3)
}

/// A target chosen by [`find_target`], with what the rules did to the choice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fit {
    /// The host, if any fits.
    pub host: Option<HostId>,
    /// How rules shaped the choice: hosts with room that a hard rule ruled
    /// out, soft rules met or missed by the choice. Empty when no rule
    /// mentions the VM.
    pub notes: Vec<String>,
}

impl Fit {
    /// `reason`, followed by the rules' part in it, if any.
    pub fn reason(&self, reason: String) -> String {
        if self.notes.is_empty() {
            reason
        } else {
            format!("{reason}; rules: {}", self.notes.join("; "))
        }
    }
}

/// The usable host that breaks the fewest soft rules and, among those, has
/// the least headroom left after taking `vm` (best fit by CPU and memory),
/// among those [`Ledger::fits`] accepts and `exclude` does not reject.
pub fn find_target(
    c: &Cluster,
    ledger: &Ledger,
    limits: &Limits,
    vm: VmId,
    mips: f64,
    cpu_cap: f64,
    exclude: &dyn Fn(HostId) -> bool,
) -> Fit {
    let ruled = !ledger.rules.is_empty() && ledger.rules.mentions(vm);
    let mut notes = Vec::new();
    let host = (0..c.hosts.len())
        .filter(|&h| !exclude(h))
        .filter(|&h| ledger.room(c, limits, vm, mips, h, cpu_cap))
        .filter(|&h| match ledger.blocker(c, vm, h) {
            None => true,
            Some(why) => {
                notes.push(why);
                false
            }
        })
        .map(|h| {
            let host = &c.hosts[h];
            let cpu_left = (cpu_cap * host.cpu_mips - ledger.cpu[h] - mips) / host.cpu_mips;
            let mem_left =
                (host.mem_mb - ledger.mem[h] - c.vms[vm].mem_mb) as f64 / host.mem_mb as f64;
            let soft = if ruled {
                ledger.rules.soft_misses(vm, h).len()
            } else {
                0
            };
            (h, soft, cpu_left + mem_left)
        })
        .min_by(|a, b| a.1.cmp(&b.1).then(a.2.total_cmp(&b.2)))
        .map(|(h, _, _)| h);
    if let (Some(h), true) = (host, ruled) {
        for (label, met) in ledger.rules.soft(vm, h) {
            notes.push(if met {
                format!("{label} met")
            } else {
                format!("{label} not met: no preferred host has room")
            });
        }
    }
    Fit { host, notes }
}

/// [`find_target`]'s host.
pub fn best_fit(
    c: &Cluster,
    ledger: &Ledger,
    limits: &Limits,
    vm: VmId,
    mips: f64,
    cpu_cap: f64,
    exclude: &dyn Fn(HostId) -> bool,
) -> Option<HostId> {
    find_target(c, ledger, limits, vm, mips, cpu_cap, exclude).host
}

/// Apply an action to the model (what an executor does once the action
/// succeeded): placement, home for maintenance returns, power state.
pub fn apply(c: &mut Cluster, a: &Action) {
    match *a {
        Action::Migrate { vm, from, to, .. } => {
            let vmr = &mut c.vms[vm];
            if c.hosts[from].maintenance && vmr.home.is_none() {
                vmr.home = Some(from);
            } else if vmr.home == Some(to) {
                vmr.home = None;
            }
            vmr.host = Some(to);
            vmr.last_moved = Some(c.now);
        }
        Action::ShutdownVm { vm, .. } => {
            let vmr = &mut c.vms[vm];
            vmr.home = vmr.host;
            vmr.host = None;
        }
        Action::StartVm { vm, host, .. } => {
            c.vms[vm].host = Some(host);
            c.vms[vm].home = None;
        }
        Action::PowerOn { host, .. } => c.hosts[host].power = crate::model::PowerState::On,
        Action::PowerOff { host, .. } => c.hosts[host].power = crate::model::PowerState::Off,
    }
}

#[cfg(test)]
pub(crate) mod testkit {
    use crate::model::{Cluster, Host, Vm};

    /// `n` hosts of 2 x 1000 MIPS, 4096 MB.
    pub fn cluster(n: usize) -> Cluster {
        Cluster {
            hosts: (0..n)
                .map(|i| Host::new(&format!("h{i}"), 2, 1000.0, 4096))
                .collect(),
            vms: Vec::new(),
            now: 100_000.0,
            rules: Vec::new(),
        }
    }

    /// One round of power save (ferry's policy) with light hosts due at
    /// once and a fresh state.
    pub fn power_save_plan(c: &Cluster) -> super::Plan {
        power_save_plan_with(
            c,
            &super::ferry::FerryParams {
                low_for_s: 0.0,
                ..Default::default()
            },
        )
    }

    /// [`power_save_plan`] with `params`.
    pub fn power_save_plan_with(c: &Cluster, params: &super::ferry::FerryParams) -> super::Plan {
        let w = 3;
        let mut ledger = super::Ledger::new(c, |v| c.vms[v].peak(w));
        super::power_save::plan(
            c,
            params,
            &super::power_save::PowerSave::default(),
            &mut super::ferry::FerryState::default(),
            &mut ledger,
        )
    }

    /// Add a placed VM with a steady `demand`.
    pub fn add_vm(c: &mut Cluster, host: usize, demand: f64, mem_mb: u64) -> usize {
        let mut vm = Vm::new(&format!("v{}", c.vms.len()), 1000.0, mem_mb);
        vm.host = Some(host);
        for _ in 0..12 {
            vm.record(demand);
        }
        c.vms.push(vm);
        c.vms.len() - 1
    }
}
