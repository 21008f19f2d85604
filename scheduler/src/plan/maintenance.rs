//! Maintenance: evacuate a host (live-migrate its VMs, or shut down those
//! marked so), keep it out of every decision while in maintenance, and move
//! its VMs back when it leaves.

use super::{find_target, Action, Ledger, Limits, Plan, PlanError};
use crate::model::{Cluster, HostId, OnEvacuate, VmId};

/// Evacuation of host `h` (in maintenance): as many moves as the per-host
/// limit allows now; the planner calls again until the host is empty.
/// VMs that fit nowhere are reported, never dropped.
pub fn evacuate(
    c: &Cluster,
    h: HostId,
    cpu_cap: f64,
    limits: &Limits,
    ledger: &mut Ledger,
) -> Result<Plan, PlanError> {
    if h >= c.hosts.len() {
        return Err(PlanError::UnknownHost(h));
    }
    let mut out = Plan::default();
    let mut vms: Vec<VmId> = ledger.before.on[h]
        .iter()
        .copied()
        .filter(|&v| !ledger.moved[v])
        .collect();
    // VMs shut down first (they follow no partner: `Ledger::commit` moves
    // only the undecided ones), then a VM whose affinity partners already
    // left (the limit held it back last round: its group must not stay
    // split), then the biggest memory first: the hardest to place while
    // room remains.
    vms.sort_by_key(|&v| {
        (
            c.vms[v].on_evacuate != OnEvacuate::Shutdown,
            ledger.rules.broken_now(c, v, &ledger.at).is_none(),
            std::cmp::Reverse(c.vms[v].mem_mb),
        )
    });
    for v in vms {
        if ledger.moved[v] {
            continue; // went along with the partner it follows
        }
        match c.vms[v].on_evacuate {
            OnEvacuate::Shutdown => {
                ledger.moved[v] = true;
                out.actions.push(Action::ShutdownVm {
                    vm: v,
                    reason: format!(
                        "maintenance: {} is evacuated; {} is marked shutdown-on-evacuate",
                        c.hosts[h].name, c.vms[v].name
                    ),
                });
            }
            OnEvacuate::Migrate => {
                if !ledger.may_move(c, limits, v, true) {
                    continue; // the per-host limit: next round
                }
                let mips = c.vms[v].peak(3);
                let exclude = |x: HostId| x == h;
                let fit = find_target(c, ledger, limits, v, mips, cpu_cap, &exclude);
                let fit = if fit.host.is_some() {
                    fit
                } else {
                    find_target(c, ledger, limits, v, mips, 1.0, &exclude)
                };
                let Some(to) = fit.host else {
                    if ledger.migrations.iter().all(|&m| m == 0) {
                        if !fit.notes.is_empty() {
                            return Err(PlanError::Rules {
                                vm: c.vms[v].name.clone(),
                                rules: fit.notes.join("; "),
                            });
                        }
                        return Err(PlanError::NoHost {
                            vm: c.vms[v].name.clone(),
                            mips,
                            mem_mb: c.vms[v].mem_mb,
                        });
                    }
                    continue;
                };
                // Its affinity partners go with it (what the limits hold
                // back keeps its room and goes first in the next round).
                let followers = ledger.commit(c, limits, v, mips, to);
                out.actions.push(Action::Migrate {
                    vm: v,
                    from: h,
                    to,
                    reason: fit.reason(format!(
                        "maintenance: evacuating {} ({} -> {})",
                        c.hosts[h].name, c.vms[v].name, c.hosts[to].name
                    )),
                });
                let why = format!("maintenance: evacuating {}", c.hosts[h].name);
                out.followers_moved(c, v, h, to, &followers, &why);
            }
        }
    }
    Ok(out)
}

/// VMs whose home is `h` (usable again) go back: migrated ones move, shut
/// down ones start.
pub fn return_home(c: &Cluster, h: HostId, limits: &Limits, ledger: &mut Ledger) -> Plan {
    let mut out = Plan::default();
    if !c.hosts.get(h).is_some_and(|x| x.usable()) {
        return out;
    }
    for v in 0..c.vms.len() {
        if c.vms[v].home != Some(h) {
            continue;
        }
        let mips = c.vms[v].peak(3);
        if let Some(why) = ledger.blocker(c, v, h) {
            out.notes.push(format!(
                "maintenance over: {} stays away from {}: {why}",
                c.vms[v].name, c.hosts[h].name
            ));
            continue;
        }
        match c.vms[v].host {
            None if ledger.mem[h] + c.vms[v].mem_mb <= c.hosts[h].mem_mb => {
                ledger.mem[h] += c.vms[v].mem_mb;
                ledger.cpu[h] += mips;
                ledger.at[v] = Some(h);
                out.actions.push(Action::StartVm {
                    vm: v,
                    host: h,
                    reason: format!(
                        "maintenance over: {} starts again on {}",
                        c.vms[v].name, c.hosts[h].name
                    ),
                });
            }
            Some(cur)
                if cur != h
                    && ledger.may_move(c, limits, v, true)
                    && ledger.fits(c, limits, v, mips, h, 1.0) =>
            {
                let followers = ledger.commit(c, limits, v, mips, h);
                out.actions.push(Action::Migrate {
                    vm: v,
                    from: cur,
                    to: h,
                    reason: format!(
                        "maintenance over: {} returns to {}",
                        c.vms[v].name, c.hosts[h].name
                    ),
                });
                let why = format!("maintenance over: {} returns", c.vms[v].name);
                out.followers_moved(c, v, cur, h, &followers, &why);
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::apply;
    use crate::plan::testkit::{add_vm, cluster};

    #[test]
    fn evacuates_in_waves_then_returns_home() {
        let mut c = cluster(3);
        for _ in 0..3 {
            add_vm(&mut c, 0, 200.0, 512);
        }
        let stay = add_vm(&mut c, 1, 200.0, 512);
        c.vms[2].on_evacuate = OnEvacuate::Shutdown;
        c.hosts[0].maintenance = true;
        let limits = Limits {
            max_migrations_per_host: 1,
            min_move_interval_s: 3600.0,
        };
        let mut rounds = 0;
        while c.vms_on(0).next().is_some() {
            rounds += 1;
            assert!(rounds < 10, "evacuation does not finish");
            let mut ledger = Ledger::new(&c, |v| c.vms[v].peak(3));
            let plan = evacuate(&c, 0, 0.8, &limits, &mut ledger).unwrap();
            assert!(plan.migrations() <= 1, "limit per host");
            for a in &plan.actions {
                apply(&mut c, a);
            }
            c.now += 10.0;
        }
        assert!(rounds >= 2);
        assert_eq!(c.vms[2].host, None, "shut down, not lost");
        assert_eq!(c.vms[stay].host, Some(1));
        // Leave maintenance: everyone comes back (minimum interval waived).
        c.hosts[0].maintenance = false;
        for _ in 0..4 {
            let mut ledger = Ledger::new(&c, |v| c.vms[v].peak(3));
            let plan = return_home(&c, 0, &limits, &mut ledger);
            for a in &plan.actions {
                apply(&mut c, a);
            }
        }
        assert_eq!(c.vms_on(0).count(), 3);
        assert_eq!(c.vms[stay].host, Some(1));
    }

    #[test]
    fn reports_a_vm_that_fits_nowhere() {
        let mut c = cluster(2);
        add_vm(&mut c, 0, 100.0, 3000);
        add_vm(&mut c, 1, 100.0, 3000);
        c.hosts[0].maintenance = true;
        let mut ledger = Ledger::new(&c, |v| c.vms[v].peak(3));
        let e = evacuate(&c, 0, 0.8, &Limits::default(), &mut ledger).unwrap_err();
        assert!(e.to_string().contains("v0"), "{e}");
    }
}
