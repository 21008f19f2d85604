//! Power save, the daemon's driver of ferry's policy ([`super::ferry`],
//! the function the simulator measures): the cluster as the policy's view,
//! its moves as migrations with their reasons, and the power states the
//! simulator does not need (there an empty host draws nothing and wakes at
//! once): power hosts up ahead of need, power emptied and unneeded hosts
//! down, keeping `spare` of the running capacity free; consolidate only
//! inside the configured hours.

use serde::{Deserialize, Serialize};

use super::ferry::{self, ClusterView, FerryParams, FerryState, MoveKind};
use super::rules::RuleSubject;
use super::{Action, Fit, Ledger, Plan};
use crate::model::{Cluster, HostId, PowerState, VmId};

/// Power management around ferry's policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PowerSave {
    /// Seconds between two demand samples of a VM (the daemon's round
    /// interval; the simulator's traces: 300).
    pub sample_s: f64,
    /// Keep this share of usable capacity free: power a host up when
    /// estimated demand exceeds `1 - spare` of what is on.
    pub spare: f64,
    /// Only consolidate between these hours of the day (UTC, [start, end)).
    pub window_hours: Option<(u8, u8)>,
}

impl Default for PowerSave {
    fn default() -> Self {
        Self {
            sample_s: 300.0,
            spare: 0.2,
            window_hours: None,
        }
    }
}

impl PowerSave {
    /// Whether `now` (seconds) is inside the consolidation window.
    pub fn in_window(&self, now: f64) -> bool {
        let Some((a, b)) = self.window_hours else {
            return true;
        };
        let hour = ((now / 3600.0).floor() as i64).rem_euclid(24) as u8;
        if a <= b {
            (a..b).contains(&hour)
        } else {
            hour >= a || hour < b
        }
    }
}

/// The daemon's cluster as ferry's policy sees it: VMs where the plan so
/// far puts them (`ledger.at`), those the plan already moves are not the
/// policy's to move, and the plan's migrations count against the limit.
#[derive(Debug)]
pub struct ClusterAdapter<'c> {
    c: &'c Cluster,
    ledger: &'c Ledger,
    on: Vec<Vec<VmId>>,
    sample_s: f64,
}

impl<'c> ClusterAdapter<'c> {
    /// The view of `c` after the moves `ledger` holds; demand samples are
    /// `sample_s` apart (the daemon records one a round).
    pub fn new(c: &'c Cluster, ledger: &'c Ledger, sample_s: f64) -> Self {
        let mut on = vec![Vec::new(); c.hosts.len()];
        for (v, at) in ledger.at.iter().enumerate() {
            if let Some(h) = *at {
                on[h].push(v);
            }
        }
        Self {
            c,
            ledger,
            on,
            sample_s,
        }
    }
}

impl RuleSubject for ClusterAdapter<'_> {
    fn vm_name(&self, v: VmId) -> &str {
        self.c.vm_name(v)
    }
    fn host_name(&self, h: HostId) -> &str {
        self.c.host_name(h)
    }
    fn host_usable(&self, h: HostId) -> bool {
        self.c.host_usable(h)
    }
}

impl ClusterView for ClusterAdapter<'_> {
    fn host_count(&self) -> usize {
        self.c.hosts.len()
    }
    fn vm_count(&self) -> usize {
        self.c.vms.len()
    }
    fn host_cpu(&self, h: HostId) -> f64 {
        self.c.hosts[h].cpu_mips
    }
    fn host_mem(&self, h: HostId) -> f64 {
        self.c.hosts[h].mem_mb as f64
    }
    fn host_managed(&self, h: HostId) -> bool {
        self.c.hosts[h].usable()
    }
    fn host_eligible(&self, h: HostId) -> bool {
        let host = &self.c.hosts[h];
        !host.maintenance && !host.quarantined
    }
    fn vms_on(&self, h: HostId) -> &[VmId] {
        &self.on[h]
    }
    fn vm_cpu(&self, v: VmId) -> f64 {
        self.c.vms[v].cpu_mips
    }
    fn vm_mem(&self, v: VmId) -> f64 {
        self.c.vms[v].mem_mb as f64
    }
    fn vm_peak(&self, v: VmId, seconds: f64) -> f64 {
        self.c.vms[v].peak(FerryParams::samples(seconds, self.sample_s))
    }
    fn vm_now(&self, v: VmId) -> f64 {
        self.c.vms[v].current()
    }
    fn vm_fits_cores(&self, v: VmId, h: HostId, mips: f64) -> bool {
        let core = self.c.hosts[h].core_mips;
        mips <= core * self.c.vms[v].cores_on(core)
    }
    fn vm_busy(&self, v: VmId) -> bool {
        self.ledger.moved[v] || self.c.vms[v].host.is_none()
    }
    fn vm_last_moved(&self, v: VmId) -> Option<f64> {
        self.c.vms[v].last_moved
    }
    fn host_migrations(&self, h: HostId) -> usize {
        self.ledger.migrations[h]
    }
    fn now(&self) -> f64 {
        self.c.now
    }
    fn strict_memory(&self) -> bool {
        true
    }
    fn host_watts(&self, h: HostId, utilization: f64) -> Option<f64> {
        self.c.hosts[h]
            .power_model
            .as_ref()
            .map(|m| m.power(utilization))
    }
}

/// The plan: power up ahead of need, ferry's moves (relieve hot hosts;
/// consolidate light ones inside the hours), a host powered up before a VM
/// moves onto it, and hosts emptied or already empty powered down when the
/// rest keeps the spare capacity. Power states never change ferry's moves
/// (it sees a host that is off as an empty host), so the daemon moves
/// what the simulator moves.
pub fn plan(
    c: &Cluster,
    params: &FerryParams,
    p: &PowerSave,
    state: &mut FerryState,
    ledger: &mut Ledger,
) -> Plan {
    let mut out = Plan::default();
    let long = FerryParams::samples(params.long_window_s(), p.sample_s);
    let short = FerryParams::samples(params.window_s, p.sample_s);
    let est = |v: VmId| c.vms[v].peak(long);
    let demand: f64 = (0..c.vms.len())
        .filter(|&v| c.vms[v].host.is_some())
        .map(est)
        .sum();
    let running = |h: HostId| c.hosts[h].usable() || c.hosts[h].power == PowerState::Booting;
    let on_capacity: f64 = (0..c.hosts.len())
        .filter(|&h| running(h))
        .map(|h| c.hosts[h].cpu_mips)
        .sum();
    // 1. Ahead of need: keep `spare` of the running capacity free.
    let mut cap = on_capacity;
    let mut off: Vec<HostId> = (0..c.hosts.len())
        .filter(|&h| c.hosts[h].power == PowerState::Off && !c.hosts[h].maintenance)
        .collect();
    off.sort_by(|&a, &b| c.hosts[b].cpu_mips.total_cmp(&c.hosts[a].cpu_mips));
    let mut powered = vec![false; c.hosts.len()];
    for h in off {
        if demand <= (1.0 - p.spare) * cap {
            break;
        }
        cap += c.hosts[h].cpu_mips;
        powered[h] = true;
        out.actions.push(Action::PowerOn {
            host: h,
            reason: format!(
                "power save: estimated demand {:.0} MIPS exceeds {:.0}% of running capacity; {} powers up ahead of need",
                demand,
                100.0 * (1.0 - p.spare),
                c.hosts[h].name
            ),
        });
    }
    // 2. ferry's policy.
    let consolidate = p.in_window(c.now);
    let fp = {
        let view = ClusterAdapter::new(c, ledger, p.sample_s);
        let rules = ledger.rules.clone();
        ferry::plan(&view, params, state, &rules, consolidate)
    };
    for m in &fp.moves {
        if c.hosts[m.to].power == PowerState::Off && !powered[m.to] {
            powered[m.to] = true;
            cap += c.hosts[m.to].cpu_mips;
            out.actions.push(Action::PowerOn {
                host: m.to,
                reason: format!(
                    "ferry: {} powers up to take {}",
                    c.hosts[m.to].name, c.vms[m.vm].name
                ),
            });
        }
        let mips = c.vms[m.vm].peak(short).max(c.vms[m.vm].current());
        // ferry's policy moves only VMs of usable hosts, each member of an
        // affinity group by its own move: no followers come along here.
        ledger.commit(c, &params.limits, m.vm, mips, m.to);
        let (from, to) = (&c.hosts[m.from].name, &c.hosts[m.to].name);
        let why = match m.kind {
            MoveKind::Relieve { load, urgent } => format!(
                "ferry: {from} estimated at {:.0}% CPU > {:.0}%{}; {} moves to {to}, the fullest host it fits under {:.0}%",
                100.0 * load,
                100.0 * params.upper,
                if urgent { " and over capacity now" } else { "" },
                c.vms[m.vm].name,
                100.0 * params.target,
            ),
            MoveKind::Consolidate { load, payback } => format!(
                "ferry: {from} under {:.0}% CPU ({:.0}%) for {:.0} s; emptying it onto {to}{}",
                100.0 * params.low,
                100.0 * load,
                params.low_for_s,
                match payback {
                    Some(v) => format!(" (pays back: {v})"),
                    None => String::new(),
                },
            ),
            MoveKind::MakeRoom { for_vm, donor } => format!(
                "ferry: makes room on {from} for {} (emptying {}, no host has room for it as it is); {} moves to {to}",
                c.vms[for_vm].name,
                c.hosts[donor].name,
                c.vms[m.vm].name,
            ),
        };
        let fit = Fit {
            host: Some(m.to),
            notes: m.rules.clone(),
        };
        out.actions.push(Action::Migrate {
            vm: m.vm,
            from: m.from,
            to: m.to,
            reason: fit.reason(why),
        });
    }
    out.notes
        .extend(fp.notes.iter().map(|n| format!("ferry: {n}")));
    // 3. Power down emptied hosts and empty ones not needed.
    let mut kept = cap;
    let mut emptied = vec![false; c.hosts.len()];
    for &h in &fp.emptied {
        emptied[h] = true;
    }
    let n = c.hosts.len();
    let mut planned = vec![0usize; n];
    for h in ledger.at.iter().flatten() {
        planned[*h] += 1;
    }
    for h in 0..n {
        if !c.hosts[h].usable() || powered[h] {
            continue;
        }
        let empty_now = ledger.before.on[h].is_empty() && ledger.mem[h] == 0;
        let empties = emptied[h] && planned[h] == 0;
        if !empty_now && !empties {
            continue;
        }
        let left = kept - c.hosts[h].cpu_mips;
        if left > 0.0 && demand <= (1.0 - p.spare) * left {
            kept = left;
            out.actions.push(Action::PowerOff {
                host: h,
                reason: if empties {
                    format!("power save: {} emptied", c.hosts[h].name)
                } else {
                    format!("power save: {} is empty and not needed", c.hosts[h].name)
                },
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::ferry::Payback;
    use crate::plan::testkit::{add_vm, cluster, power_save_plan, power_save_plan_with};
    use crate::power::PowerModel;

    /// HP ProLiant ML110 G4's curve (the simulator's first host type).
    fn g4() -> PowerModel {
        PowerModel {
            name: "G4".into(),
            watts: [
                86.0, 89.4, 92.6, 96.0, 99.5, 102.0, 106.0, 108.0, 112.0, 114.0, 117.0,
            ],
        }
    }

    /// Two G4-powered hosts: h0 runs 900 MIPS, h1 one VM of 200 MIPS and
    /// 1 GiB; `horizon_s` of payback at 10 J per MIPS·s lost.
    fn light_pair(horizon_s: f64) -> (Cluster, FerryParams) {
        let mut c = cluster(2);
        for h in &mut c.hosts {
            h.power_model = Some(g4());
        }
        add_vm(&mut c, 0, 900.0, 1024);
        add_vm(&mut c, 1, 200.0, 1024);
        let params = FerryParams {
            low_for_s: 0.0,
            payback: Some(Payback {
                horizon_s,
                sla_joules: 10.0,
                ..Payback::default()
            }),
            ..Default::default()
        };
        (c, params)
    }

    #[test]
    fn empties_the_lightest_host_and_powers_it_down() {
        let mut c = cluster(3);
        add_vm(&mut c, 0, 900.0, 1024);
        add_vm(&mut c, 1, 200.0, 1024);
        add_vm(&mut c, 2, 600.0, 1024);
        let plan = power_save_plan(&c);
        // Lightest first: h1 (200) empties onto the fullest host it fits,
        // h0, which still takes h2 (600) from the next donor.
        assert_eq!(plan.migrations(), 2, "{plan:?}");
        assert!(matches!(
            plan.actions[0],
            Action::Migrate {
                vm: 1,
                from: 1,
                to: 0,
                ..
            }
        ));
        assert!(matches!(
            plan.actions[1],
            Action::Migrate {
                vm: 2,
                from: 2,
                to: 0,
                ..
            }
        ));
        assert!(plan.actions[0].reason().contains("emptying it onto h0"));
        assert!(plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::PowerOff { host: 1, .. })));
    }

    #[test]
    fn powers_up_before_load_needs_it() {
        let mut c = cluster(3);
        c.hosts[2].power = PowerState::Off;
        add_vm(&mut c, 0, 1700.0, 1024);
        add_vm(&mut c, 1, 1700.0, 1024);
        let plan = power_save_plan(&c);
        assert_eq!(plan.migrations(), 0);
        assert!(matches!(plan.actions[0], Action::PowerOn { host: 2, .. }));
    }

    #[test]
    fn a_hot_host_sheds_onto_a_host_powered_up_for_it() {
        let mut c = cluster(2);
        c.hosts[1].power = PowerState::Off;
        add_vm(&mut c, 0, 1000.0, 1024);
        add_vm(&mut c, 0, 900.0, 1024);
        add_vm(&mut c, 0, 800.0, 512);
        let plan = power_save_plan(&c);
        // 2700 of 2000 MIPS (over `upper`, 120 %): the cheapest VM that
        // alone brings it under `target` (800, 512 MB) moves to h1, which
        // powers up first.
        assert_eq!(plan.migrations(), 1, "{plan:?}");
        assert!(matches!(plan.actions[0], Action::PowerOn { host: 1, .. }));
        assert!(matches!(
            plan.actions[1],
            Action::Migrate {
                vm: 2,
                from: 0,
                to: 1,
                ..
            }
        ));
    }

    #[test]
    fn outside_the_window_nothing_consolidates() {
        let mut c = cluster(2);
        add_vm(&mut c, 0, 100.0, 512);
        add_vm(&mut c, 1, 100.0, 512);
        c.now = 12.0 * 3600.0; // noon
        let params = FerryParams {
            low_for_s: 0.0,
            ..Default::default()
        };
        let p = PowerSave {
            window_hours: Some((22, 6)),
            ..PowerSave::default()
        };
        let run = |c: &Cluster| {
            let mut ledger = Ledger::new(c, |v| c.vms[v].peak(3));
            plan(c, &params, &p, &mut FerryState::default(), &mut ledger)
        };
        assert_eq!(run(&c).migrations(), 0);
        c.now = 23.0 * 3600.0;
        assert_eq!(run(&c).migrations(), 1);
    }

    #[test]
    fn a_migration_lasts_what_the_simulator_charges() {
        // 1,740 MB (VM type 0) over half of 1 Gbit/s: CloudSim's 27.84 s.
        let pb = Payback::default();
        let sim = crate::sim::setup::migration_seconds(1740.0, 1000.0);
        assert!((pb.migration_s(1740.0) - sim).abs() < 1e-9, "{sim}");
        // 10 % of 500 MIPS for 27.84 s.
        assert!((pb.lost_mips_s(1740.0, 500.0) - 1392.0).abs() < 1e-9);
    }

    #[test]
    fn a_consolidation_is_made_only_if_it_pays_back_within_the_horizon() {
        // Moving v1 (1 GiB: 16.4 s; 10 % of 200 MIPS lost meanwhile, 328
        // MIPS·s at 10 J = 3.3 kJ, plus h0's extra load, 53 J) powers h1
        // down: 86 W saved (89.4 W of h1 at 10 %, h0 3.25 W more at 55 %
        // than at 45 %). It pays back after 38.7 s.
        let (c, params) = light_pair(30.0);
        let plan = power_save_plan_with(&c, &params);
        assert_eq!(plan.migrations(), 0, "{plan:?}");
        assert!(
            plan.notes
                .iter()
                .any(|n| n.contains("h1 stays on: emptying it does not pay back")
                    && n.contains("1 move(s)")
                    && n.contains("over 30 s")),
            "{:?}",
            plan.notes
        );
        assert!(!plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::PowerOff { host: 1, .. })));

        let (c, params) = light_pair(60.0);
        let plan = power_save_plan_with(&c, &params);
        assert_eq!(plan.migrations(), 1, "{plan:?}");
        assert!(matches!(
            plan.actions[0],
            Action::Migrate {
                vm: 1,
                from: 1,
                to: 0,
                ..
            }
        ));
        let why = plan.actions[0].reason();
        assert!(
            why.contains("pays back: 1 move(s), 16 s of migration, 328 MIPS·s lost"),
            "{why}"
        );
        assert!(why.contains("saves 5.2 kJ over 60 s"), "{why}");
    }

    #[test]
    fn payback_never_holds_back_overload_relief() {
        // A horizon no move could pay back within: h0 at 135 % still sheds.
        let (mut c, params) = light_pair(0.0);
        add_vm(&mut c, 0, 900.0, 1024);
        add_vm(&mut c, 0, 900.0, 1024);
        let plan = power_save_plan_with(&c, &params);
        assert!(plan.migrations() >= 1, "{plan:?}");
        assert!(plan
            .actions
            .iter()
            .all(|a| !matches!(a, Action::Migrate { .. }) || a.reason().contains("> 120%")));
    }

    #[test]
    fn hosts_without_a_power_curve_are_emptied_unjudged() {
        let (mut c, params) = light_pair(0.0);
        for h in &mut c.hosts {
            h.power_model = None;
        }
        let plan = power_save_plan_with(&c, &params);
        assert_eq!(plan.migrations(), 1, "{plan:?}");
        assert!(!plan.actions[0].reason().contains("pays back"));
    }
}
