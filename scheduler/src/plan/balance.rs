//! Even distribution: a host whose CPU demand stayed above a threshold for
//! a configured duration sheds the fewest, cheapest VMs (by memory, hence
//! migration time) that bring it back under, without pushing any other
//! host over the threshold.

use serde::{Deserialize, Serialize};

use super::{find_target, Action, Ledger, Limits, Plan};
use crate::model::{Cluster, HostId, VmId};

/// Parameters of even distribution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Balance {
    /// CPU share above which a host is overloaded.
    pub threshold: f64,
    /// Seconds it must stay above before anything moves.
    pub duration_s: f64,
    /// Samples of history used for a VM's demand estimate (its peak).
    pub window: usize,
}

impl Default for Balance {
    fn default() -> Self {
        Self {
            threshold: 0.8,
            duration_s: 600.0,
            window: 3,
        }
    }
}

/// Hosts over the threshold right now.
pub fn overloaded_now(c: &Cluster, p: &Balance, ledger: &Ledger) -> Vec<HostId> {
    (0..c.hosts.len())
        .filter(|&h| {
            c.hosts[h].usable() && ledger.before.demand[h] > p.threshold * c.hosts[h].cpu_mips
        })
        .collect()
}

/// The plan for hosts listed in `due` (over the threshold long enough).
pub fn plan(
    c: &Cluster,
    p: &Balance,
    limits: &Limits,
    ledger: &mut Ledger,
    due: &[HostId],
) -> Plan {
    let mut out = Plan::default();
    let est = |v: VmId| c.vms[v].peak(p.window);
    let mut failed: Vec<(f64, u64)> = Vec::new();
    for &h in due {
        let cap = p.threshold * c.hosts[h].cpu_mips;
        let before = ledger.before.clone();
        let mut cands: Vec<VmId> = before.on[h]
            .iter()
            .copied()
            .filter(|&v| ledger.may_move(c, limits, v, false))
            .collect();
        while ledger.cpu[h] > cap && !cands.is_empty() {
            if ledger.migrations[h] >= limits.max_migrations_per_host {
                break;
            }
            let excess = ledger.cpu[h] - cap;
            // One VM that is enough, the cheapest to move; else the biggest.
            let pick = cands
                .iter()
                .copied()
                .filter(|&v| est(v) >= excess)
                .min_by_key(|&v| c.vms[v].mem_mb)
                .or_else(|| {
                    cands
                        .iter()
                        .copied()
                        .max_by(|&a, &b| est(a).total_cmp(&est(b)))
                });
            let Some(v) = pick else { break };
            cands.retain(|&x| x != v);
            // A VM at least as big as one that fitted nowhere fits nowhere
            // either (the plan only fills hosts): skip the scan. Not for
            // VMs with rules: a rule, not room, may have stopped the other.
            let ruled = ledger.rules.mentions(v);
            if !ruled
                && failed
                    .iter()
                    .any(|&(m, r): &(f64, u64)| est(v) >= m && c.vms[v].mem_mb >= r)
            {
                continue;
            }
            let fit = find_target(c, ledger, limits, v, est(v), p.threshold, &|x| x == h);
            let why = || {
                format!(
                    "even distribution: {} at {:.0}% CPU > {:.0}% for {:.0} s",
                    c.hosts[h].name,
                    100.0 * before.demand[h] / c.hosts[h].cpu_mips,
                    100.0 * p.threshold,
                    p.duration_s,
                )
            };
            let Some(to) = fit.host else {
                if fit.notes.is_empty() {
                    failed.push((est(v), c.vms[v].mem_mb));
                } else {
                    out.notes.push(format!(
                        "{}; {} does not move: {}",
                        why(),
                        c.vms[v].name,
                        fit.notes.join("; ")
                    ));
                }
                continue;
            };
            let followers = ledger.commit(c, limits, v, est(v), to);
            out.actions.push(Action::Migrate {
                vm: v,
                from: h,
                to,
                reason: fit.reason(format!(
                    "{}; {} ({:.0} MIPS, {} MB) is the cheapest move that helps",
                    why(),
                    c.vms[v].name,
                    est(v),
                    c.vms[v].mem_mb
                )),
            });
            out.followers_moved(c, v, h, to, &followers, &why());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testkit::{add_vm, cluster};

    fn run(c: &Cluster, limits: &Limits) -> Plan {
        let p = Balance::default();
        let mut ledger = Ledger::new(c, |v| c.vms[v].peak(p.window));
        let due = overloaded_now(c, &p, &ledger);
        plan(c, &p, limits, &mut ledger, &due)
    }

    #[test]
    fn moves_one_cheap_vm_that_is_enough() {
        let mut c = cluster(2);
        add_vm(&mut c, 0, 900.0, 2048);
        add_vm(&mut c, 0, 500.0, 512); // enough (excess 300) and cheapest
        add_vm(&mut c, 0, 400.0, 1024); // enough too, but costs more
        let plan = run(&c, &Limits::default());
        assert_eq!(plan.migrations(), 1);
        assert!(matches!(
            plan.actions[0],
            Action::Migrate {
                vm: 1,
                from: 0,
                to: 1,
                ..
            }
        ));
        assert!(plan.actions[0].reason().contains("even distribution"));
    }

    #[test]
    fn never_pushes_another_host_over() {
        let mut c = cluster(2);
        add_vm(&mut c, 0, 1000.0, 512);
        add_vm(&mut c, 0, 800.0, 512);
        add_vm(&mut c, 1, 1300.0, 512); // h1 has 300 MIPS below 80 %
        let plan = run(&c, &Limits::default());
        assert_eq!(plan.migrations(), 0, "{plan:?}");
    }

    #[test]
    fn respects_min_interval_and_concurrency() {
        let mut c = cluster(3);
        for _ in 0..4 {
            add_vm(&mut c, 0, 500.0, 256);
        }
        c.vms[0].last_moved = Some(c.now - 10.0); // moved 10 s ago
        let limits = Limits {
            max_migrations_per_host: 1,
            min_move_interval_s: 600.0,
        };
        let plan = run(&c, &limits);
        assert_eq!(plan.migrations(), 1);
        assert!(!matches!(plan.actions[0], Action::Migrate { vm: 0, .. }));
    }
}
