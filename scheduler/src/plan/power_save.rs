//! Power save: when hosts stay lightly loaded (below a threshold for a
//! duration, optionally only inside a daily window), move their VMs onto
//! fewer hosts and power the emptied ones down; power hosts up again before
//! load makes them needed.

use serde::{Deserialize, Serialize};

use super::{find_target, Action, Ledger, Limits, Plan};
use crate::model::{Cluster, HostId, PowerState, VmId};

/// Parameters of power save.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PowerSave {
    /// CPU share under which a host counts as lightly loaded.
    pub low: f64,
    /// Seconds it must stay under before it is emptied.
    pub duration_s: f64,
    /// Receivers are filled up to this CPU share (estimate).
    pub target: f64,
    /// Keep this share of usable capacity free: power a host up when
    /// estimated demand exceeds `1 - spare` of what is on.
    pub spare: f64,
    /// Only consolidate between these hours of the day (UTC, [start, end)).
    pub window_hours: Option<(u8, u8)>,
    /// Samples of history in a VM's demand estimate (its peak).
    pub window: usize,
    /// Hosts emptied per round at most (consolidation is rate-limited).
    pub max_hosts_per_round: usize,
    /// Light hosts tried per round at most (bounds planning time on big
    /// clusters; the rest are tried in later rounds).
    pub max_tries_per_round: usize,
}

impl Default for PowerSave {
    fn default() -> Self {
        Self {
            low: 0.3,
            duration_s: 900.0,
            target: 0.75,
            spare: 0.2,
            window_hours: None,
            window: 12,
            max_hosts_per_round: 32,
            max_tries_per_round: 128,
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

/// Hosts under the low threshold right now (with VMs on them).
pub fn light_now(c: &Cluster, p: &PowerSave, ledger: &Ledger) -> Vec<HostId> {
    let b = &ledger.before;
    (0..c.hosts.len())
        .filter(|&h| {
            c.hosts[h].usable() && !b.on[h].is_empty() && b.demand[h] < p.low * c.hosts[h].cpu_mips
        })
        .collect()
}

/// The plan: power up ahead of need, empty the `due` light hosts (all VMs
/// or none), power down empty hosts not needed for the spare capacity.
pub fn plan(
    c: &Cluster,
    p: &PowerSave,
    limits: &Limits,
    ledger: &mut Ledger,
    due: &[HostId],
) -> Plan {
    let mut out = Plan::default();
    let est = |v: VmId| c.vms[v].peak(p.window);
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
    for h in off {
        if demand <= (1.0 - p.spare) * cap {
            break;
        }
        cap += c.hosts[h].cpu_mips;
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
    if !out.actions.is_empty() || !p.in_window(c.now) {
        return out;
    }
    // 2. Empty light hosts, lightest first, all VMs or none.
    let mut due: Vec<HostId> = due.to_vec();
    due.sort_by(|&a, &b| ledger.cpu[a].total_cmp(&ledger.cpu[b]));
    let n = c.hosts.len();
    let mut donor = vec![false; n];
    let mut receiver = vec![false; n];
    // Capacity left running if the donors so far power down.
    let mut kept = on_capacity;
    let (mut emptied, mut tries) = (0, 0);
    for h in due {
        if receiver[h] {
            continue;
        }
        if emptied >= p.max_hosts_per_round || tries >= p.max_tries_per_round {
            break;
        }
        tries += 1;
        let vms: Vec<VmId> = ledger.before.on[h].clone();
        if vms.is_empty() || !vms.iter().all(|&v| ledger.may_move(c, limits, v, false)) {
            continue;
        }
        if vms.len()
            > limits
                .max_migrations_per_host
                .saturating_sub(ledger.migrations[h])
        {
            continue;
        }
        // Would the remaining hosts still keep the spare capacity?
        if demand > (1.0 - p.spare) * (kept - c.hosts[h].cpu_mips) {
            continue;
        }
        let mut moves: Vec<(VmId, HostId, Vec<String>)> = Vec::new();
        let mut sorted = vms.clone();
        sorted.sort_by(|&a, &b| est(b).total_cmp(&est(a)));
        let mut ok = true;
        // Affinity partners on a donor follow each other off it.
        ledger.leaving[h] = true;
        for v in sorted {
            let exclude = |x: HostId| x == h || donor[x];
            let fit = find_target(c, ledger, limits, v, est(v), p.target, &exclude);
            match fit.host {
                Some(to) if !ledger.before.on[to].is_empty() || ledger.cpu[to] > 0.0 => {
                    ledger.commit(c, v, est(v), to);
                    moves.push((v, to, fit.notes));
                }
                _ => {
                    if !fit.notes.is_empty() {
                        out.notes.push(format!(
                            "power save: {} stays on: {} cannot leave it: {}",
                            c.hosts[h].name,
                            c.vms[v].name,
                            fit.notes.join("; ")
                        ));
                    }
                    ok = false;
                    break;
                }
            }
        }
        if !ok {
            for &(v, to, _) in moves.iter().rev() {
                ledger.uncommit(c, v, est(v), to);
            }
            ledger.leaving[h] = false;
            continue;
        }
        donor[h] = true;
        emptied += 1;
        kept -= c.hosts[h].cpu_mips;
        for (v, to, notes) in moves {
            receiver[to] = true;
            let fit = super::Fit {
                host: Some(to),
                notes,
            };
            out.actions.push(Action::Migrate {
                vm: v,
                from: h,
                to,
                reason: fit.reason(format!(
                    "power save: {} under {:.0}% CPU for {:.0} s; emptying it onto {}",
                    c.hosts[h].name,
                    100.0 * p.low,
                    p.duration_s,
                    c.hosts[to].name
                )),
            });
        }
        out.actions.push(Action::PowerOff {
            host: h,
            reason: format!("power save: {} emptied", c.hosts[h].name),
        });
    }
    // 3. Hosts already empty and not needed.
    for h in 0..n {
        if !c.hosts[h].usable() || donor[h] || ledger.mem[h] > 0 {
            continue;
        }
        if !ledger.before.on[h].is_empty() {
            continue;
        }
        let left = kept - c.hosts[h].cpu_mips;
        if left > 0.0 && demand <= (1.0 - p.spare) * left {
            kept = left;
            out.actions.push(Action::PowerOff {
                host: h,
                reason: format!("power save: {} is empty and not needed", c.hosts[h].name),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testkit::{add_vm, cluster};

    fn run(c: &Cluster, p: &PowerSave) -> Plan {
        let mut ledger = Ledger::new(c, |v| c.vms[v].peak(p.window));
        let due = light_now(c, p, &ledger);
        plan(c, p, &Limits::default(), &mut ledger, &due)
    }

    #[test]
    fn empties_the_lightest_host_and_powers_it_down() {
        let mut c = cluster(3);
        add_vm(&mut c, 0, 900.0, 1024);
        add_vm(&mut c, 1, 200.0, 1024);
        add_vm(&mut c, 2, 600.0, 1024);
        let plan = run(&c, &PowerSave::default());
        // Lightest first: h1 (200) empties onto the fuller h0; h2 (600 =
        // 30 %) is not light.
        assert!(plan.actions.contains(&Action::Migrate {
            vm: 1,
            from: 1,
            to: 0,
            reason: plan.actions[0].reason().to_string()
        }));
        assert!(plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::PowerOff { host: 1, .. })));
        assert_eq!(plan.migrations(), 1);
    }

    #[test]
    fn powers_up_before_load_needs_it() {
        let mut c = cluster(3);
        c.hosts[2].power = PowerState::Off;
        add_vm(&mut c, 0, 1700.0, 1024);
        add_vm(&mut c, 1, 1700.0, 1024);
        let plan = run(&c, &PowerSave::default());
        assert_eq!(plan.migrations(), 0);
        assert!(matches!(plan.actions[0], Action::PowerOn { host: 2, .. }));
    }

    #[test]
    fn outside_the_window_nothing_consolidates() {
        let mut c = cluster(2);
        add_vm(&mut c, 0, 100.0, 512);
        add_vm(&mut c, 1, 100.0, 512);
        c.now = 12.0 * 3600.0; // noon
        let p = PowerSave {
            window_hours: Some((22, 6)),
            ..PowerSave::default()
        };
        assert_eq!(run(&c, &p).migrations(), 0);
        c.now = 23.0 * 3600.0;
        assert_eq!(run(&c, &p).migrations(), 1);
    }
}
