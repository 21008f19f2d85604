//! Restart after host failure and admission control, as pure functions of
//! the [`Cluster`] model.
//!
//! [`plan_restarts`] places the VMs of failed hosts on the surviving ones
//! with the placement policy's best fit ([`crate::plan::best_fit`]):
//! highest [`RestartPriority`] first, larger VMs first within a priority
//! (they are the hardest to fit); `disabled` VMs and those that fit
//! nowhere are refused with the reason.
//!
//! [`check_reserve`] is admission control: it holds capacity back so that
//! the VMs of **any** `failures` failed hosts can be restarted. It runs
//! [`plan_restarts`] for every set of `failures` usable hosts, so what it
//! admits is exactly what the restart planner will then manage to place
//! (the greedy packing may refuse a state a cleverer packing would accept:
//! it errs on the side of holding capacity back). [`admit_start`] places a
//! new VM only where the reserve still holds afterwards, and
//! [`admit_start_on`] admits a start a policy chose (the daemon checks
//! every start it carries out with it).

use std::cmp::Reverse;

use serde::Serialize;

use crate::model::{Cluster, HostId, RestartPriority, VmId};
use crate::plan::{best_fit, find_target, Ledger, Limits};

/// Failure sets [`check_reserve`] examines at most (the number of ways to
/// choose `failures` of the usable hosts); beyond it the check refuses to
/// guess and says so.
pub const MAX_FAILURE_SETS: u64 = 50_000;

/// Admission control's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HaPolicy {
    /// Host failures whose VMs must always fit on the rest (N).
    pub failures: usize,
    /// Share of a host's CPU restarted VMs may fill (1.0: all of it;
    /// memory is never overcommitted).
    pub cpu_cap: f64,
}

impl Default for HaPolicy {
    fn default() -> Self {
        Self {
            failures: 1,
            cpu_cap: 1.0,
        }
    }
}

/// Why a VM is not restarted.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum RestartRefusal {
    /// Its restart priority is `disabled`.
    #[error("VM {vm}: restart priority is disabled")]
    Disabled {
        /// VM name.
        vm: String,
    },
    /// Surviving hosts have room, but the rules forbid each of them.
    #[error("VM {vm}: no surviving host may take it: {rules}")]
    Rules {
        /// VM name.
        vm: String,
        /// The rules that ruled each host out.
        rules: String,
    },
    /// No surviving host has room.
    #[error("VM {vm}: no surviving host has room ({mips:.0} MIPS, {mem_mb} MB)")]
    NoRoom {
        /// VM name.
        vm: String,
        /// CPU demand used.
        mips: f64,
        /// Memory.
        mem_mb: u64,
    },
}

/// Where the VMs of failed hosts restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RestartPlan {
    /// (VM, new host) in restart order.
    pub restarts: Vec<(VmId, HostId)>,
    /// VMs not restarted, with why.
    pub refused: Vec<(VmId, RestartRefusal)>,
}

/// The CPU estimate restarts and reserves use (as placement does).
fn mips(c: &Cluster, v: VmId) -> f64 {
    c.vms[v].peak(12)
}

/// Places the VMs of `failed` hosts on the other usable hosts.
pub fn plan_restarts(c: &Cluster, failed: &[HostId], policy: &HaPolicy) -> RestartPlan {
    let mut victims: Vec<VmId> = (0..c.vms.len())
        .filter(|&v| c.vms[v].host.is_some_and(|h| failed.contains(&h)))
        .collect();
    victims.sort_by_key(|&v| (c.vms[v].restart, Reverse(c.vms[v].mem_mb), v));
    let mut ledger = Ledger::new(c, |v| mips(c, v));
    // Affinity partners on failed hosts do not hold a group there: the
    // first restarted leads, the others follow it.
    for &h in failed {
        if let Some(l) = ledger.leaving.get_mut(h) {
            *l = true;
        }
    }
    // A restart is not a migration: no per-host limit, no interval.
    let limits = Limits {
        max_migrations_per_host: usize::MAX,
        min_move_interval_s: 0.0,
    };
    // Disabled VMs stay down: decided, they follow no partner.
    for &v in &victims {
        if c.vms[v].restart == RestartPriority::Disabled {
            ledger.moved[v] = true;
        }
    }
    let mut plan = RestartPlan::default();
    for v in victims {
        let vm = &c.vms[v];
        if vm.restart == RestartPriority::Disabled {
            plan.refused.push((
                v,
                RestartRefusal::Disabled {
                    vm: vm.name.clone(),
                },
            ));
            continue;
        }
        if ledger.moved[v] {
            continue; // restarted with the partner it follows
        }
        let m = mips(c, v);
        let fit = find_target(c, &ledger, &limits, v, m, policy.cpu_cap, &|h| {
            failed.contains(&h)
        });
        match fit.host {
            Some(to) => {
                // Its affinity partners restart with it, on its host.
                let followers = ledger.commit(c, &limits, v, m, to);
                plan.restarts.push((v, to));
                plan.restarts.extend(followers.into_iter().map(|u| (u, to)));
            }
            None if !fit.notes.is_empty() => plan.refused.push((
                v,
                RestartRefusal::Rules {
                    vm: vm.name.clone(),
                    rules: fit.notes.join("; "),
                },
            )),
            None => plan.refused.push((
                v,
                RestartRefusal::NoRoom {
                    vm: vm.name.clone(),
                    mips: m,
                    mem_mb: vm.mem_mb,
                },
            )),
        }
    }
    plan
}

/// Why the reserve does not hold (or cannot be checked).
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum ReserveError {
    /// Some failure set leaves VMs that cannot restart.
    #[error("if {} failed, {} could not restart ({} failed host(s) tolerated)", failed.join(", "), unplaced.join(", "), tolerated)]
    Shortfall {
        /// The failed hosts (names).
        failed: Vec<String>,
        /// The VMs that would find no room (names).
        unplaced: Vec<String>,
        /// N.
        tolerated: usize,
    },
    /// Too many failure sets to examine.
    #[error(
        "{sets} ways to choose {failures} failed hosts of {hosts}: more than the {max} examined"
    )]
    TooManyFailureSets {
        /// Combinations.
        sets: u64,
        /// N.
        failures: usize,
        /// Usable hosts.
        hosts: usize,
        /// [`MAX_FAILURE_SETS`].
        max: u64,
    },
}

fn choose(n: u64, k: u64) -> u64 {
    (0..k).fold(1u64, |acc, i| acc.saturating_mul(n - i) / (i + 1))
}

/// Whether the VMs of any `policy.failures` usable hosts (all of them when
/// fewer are usable) can restart on the others.
pub fn check_reserve(c: &Cluster, policy: &HaPolicy) -> Result<(), ReserveError> {
    let usable: Vec<HostId> = (0..c.hosts.len())
        .filter(|&h| c.hosts[h].usable())
        .collect();
    let k = policy.failures.min(usable.len());
    let sets = choose(usable.len() as u64, k as u64);
    if sets > MAX_FAILURE_SETS {
        return Err(ReserveError::TooManyFailureSets {
            sets,
            failures: policy.failures,
            hosts: usable.len(),
            max: MAX_FAILURE_SETS,
        });
    }
    // Indices into `usable` of the current failure set, in lexicographic
    // order.
    let mut idx: Vec<usize> = (0..k).collect();
    loop {
        let failed: Vec<HostId> = idx.iter().map(|&i| usable[i]).collect();
        let plan = plan_restarts(c, &failed, policy);
        let unplaced: Vec<String> = plan
            .refused
            .iter()
            .filter(|(_, r)| {
                matches!(
                    r,
                    RestartRefusal::NoRoom { .. } | RestartRefusal::Rules { .. }
                )
            })
            .map(|&(v, _)| c.vms[v].name.clone())
            .collect();
        if !unplaced.is_empty() {
            return Err(ReserveError::Shortfall {
                failed: failed.iter().map(|&h| c.hosts[h].name.clone()).collect(),
                unplaced,
                tolerated: policy.failures,
            });
        }
        // Next combination.
        let Some(i) = (0..k).rev().find(|&i| idx[i] < usable.len() - k + i) else {
            return Ok(());
        };
        idx[i] += 1;
        for j in i + 1..k {
            idx[j] = idx[j - 1] + 1;
        }
    }
}

/// Why a new VM was not admitted.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum AdmissionRefusal {
    /// No usable host has room for it at all.
    #[error("VM {vm}: no host has room ({mips:.0} MIPS, {mem_mb} MB)")]
    NoRoom {
        /// VM name.
        vm: String,
        /// CPU demand used.
        mips: f64,
        /// Memory.
        mem_mb: u64,
    },
    /// The host it was to start on has no room for it (or the rules
    /// forbid it there).
    #[error("VM {vm}: host {host} has no room for it ({mips:.0} MIPS, {mem_mb} MB) or the rules forbid it there")]
    NoRoomOn {
        /// VM name.
        vm: String,
        /// The host.
        host: String,
        /// CPU demand used.
        mips: f64,
        /// Memory.
        mem_mb: u64,
    },
    /// Every host with room would break the failover reserve.
    #[error("VM {vm}: starting it would break the failover reserve: {reserve}")]
    Reserve {
        /// VM name.
        vm: String,
        /// The reserve's shortfall on the best-fitting host.
        reserve: ReserveError,
    },
}

/// Where the unplaced VM `vm` may start: the best-fitting host (placement
/// policy, up to `cpu_cap`) on which the failover reserve still holds.
pub fn admit_start(
    c: &Cluster,
    vm: VmId,
    cpu_cap: f64,
    policy: &HaPolicy,
) -> Result<HostId, AdmissionRefusal> {
    let limits = Limits {
        max_migrations_per_host: usize::MAX,
        min_move_interval_s: 0.0,
    };
    let m = mips(c, vm);
    let ledger = Ledger::new(c, |v| mips(c, v));
    let mut tried: Vec<HostId> = Vec::new();
    let mut first_shortfall = None;
    while let Some(h) = best_fit(c, &ledger, &limits, vm, m, cpu_cap, &|h| tried.contains(&h)) {
        match reserve_with(c, vm, h, policy) {
            Ok(()) => return Ok(h),
            Err(e) => {
                first_shortfall.get_or_insert(e);
            }
        }
        tried.push(h);
    }
    let name = c.vms[vm].name.clone();
    Err(match first_shortfall {
        Some(reserve) => AdmissionRefusal::Reserve { vm: name, reserve },
        None => AdmissionRefusal::NoRoom {
            vm: name,
            mips: m,
            mem_mb: c.vms[vm].mem_mb,
        },
    })
}

/// Whether the unplaced VM `vm` may start on `host` (a start a policy
/// chose, e.g. a VM returning home after maintenance): it fits there (up
/// to `cpu_cap`, memory never overcommitted, the rules allowing it) and
/// the failover reserve still holds afterwards.
pub fn admit_start_on(
    c: &Cluster,
    vm: VmId,
    host: HostId,
    cpu_cap: f64,
    policy: &HaPolicy,
) -> Result<(), AdmissionRefusal> {
    let limits = Limits {
        max_migrations_per_host: usize::MAX,
        min_move_interval_s: 0.0,
    };
    let mut c = c.clone();
    c.vms[vm].host = None;
    let m = mips(&c, vm);
    let ledger = Ledger::new(&c, |v| mips(&c, v));
    if best_fit(&c, &ledger, &limits, vm, m, cpu_cap, &|h| h != host).is_none() {
        return Err(AdmissionRefusal::NoRoomOn {
            vm: c.vms[vm].name.clone(),
            host: c.hosts[host].name.clone(),
            mips: m,
            mem_mb: c.vms[vm].mem_mb,
        });
    }
    reserve_with(&c, vm, host, policy).map_err(|reserve| AdmissionRefusal::Reserve {
        vm: c.vms[vm].name.clone(),
        reserve,
    })
}

/// The failover reserve with `vm` started on `host`.
fn reserve_with(
    c: &Cluster,
    vm: VmId,
    host: HostId,
    policy: &HaPolicy,
) -> Result<(), ReserveError> {
    let mut trial = c.clone();
    trial.vms[vm].host = Some(host);
    check_reserve(&trial, policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Host, Vm};

    /// `n` hosts of 2 x 1000 MIPS, 4096 MB.
    fn cluster(n: usize) -> Cluster {
        Cluster {
            hosts: (0..n)
                .map(|i| Host::new(&format!("h{i}"), 2, 1000.0, 4096))
                .collect(),
            vms: Vec::new(),
            now: 0.0,
            rules: Vec::new(),
        }
    }

    fn add(c: &mut Cluster, host: Option<HostId>, mem_mb: u64, p: RestartPriority) -> VmId {
        let mut vm = Vm::new(&format!("v{}", c.vms.len()), 100.0, mem_mb);
        vm.host = host;
        vm.restart = p;
        c.vms.push(vm);
        c.vms.len() - 1
    }

    #[test]
    fn a_start_on_a_chosen_host_is_admitted_only_while_the_reserve_holds() {
        // Two hosts of 4096 MB: v0 (2048) on h1; v1 (2048) to start.
        let mut c = cluster(2);
        add(&mut c, Some(1), 2048, RestartPriority::Medium);
        let new = add(&mut c, None, 2048, RestartPriority::Medium);
        let p = HaPolicy::default();
        // Either host failing leaves 2048 MB on the other: both fit.
        assert_eq!(admit_start_on(&c, new, 0, 1.0, &p), Ok(()));
        assert_eq!(admit_start_on(&c, new, 1, 1.0, &p), Ok(()));
        // 3072 MB: on h0, h1's failure leaves 1024 MB there for v0's 2048.
        c.vms[new].mem_mb = 3072;
        let refused = admit_start_on(&c, new, 0, 1.0, &p).unwrap_err();
        assert!(
            matches!(&refused, AdmissionRefusal::Reserve { .. }),
            "{refused:?}"
        );
        assert!(
            refused.to_string().contains("failover reserve"),
            "{refused}"
        );
        // On h1 it does not fit at all (2048 MB free).
        assert!(matches!(
            admit_start_on(&c, new, 1, 1.0, &p),
            Err(AdmissionRefusal::NoRoomOn { .. })
        ));
        // Tolerating no failure, h0 takes it.
        let none = HaPolicy {
            failures: 0,
            ..HaPolicy::default()
        };
        assert_eq!(admit_start_on(&c, new, 0, 1.0, &none), Ok(()));
    }

    #[test]
    fn restarts_by_priority_and_refuses_what_does_not_fit() {
        let mut c = cluster(2);
        // h1 has 4096 - 2048 = 2048 MB free.
        add(&mut c, Some(1), 2048, RestartPriority::Medium);
        let low = add(&mut c, Some(0), 1536, RestartPriority::Low);
        let high = add(&mut c, Some(0), 1024, RestartPriority::High);
        let medium = add(&mut c, Some(0), 1024, RestartPriority::Medium);
        let off = add(&mut c, Some(0), 256, RestartPriority::Disabled);

        let plan = plan_restarts(&c, &[0], &HaPolicy::default());

        assert_eq!(plan.restarts, vec![(high, 1), (medium, 1)]);
        assert_eq!(plan.refused.len(), 2);
        assert_eq!(plan.refused[0].0, low);
        assert!(matches!(
            plan.refused[0].1,
            RestartRefusal::NoRoom { mem_mb: 1536, .. }
        ));
        assert_eq!(
            plan.refused[1],
            (off, RestartRefusal::Disabled { vm: "v4".into() })
        );
    }

    #[test]
    fn restarts_never_land_on_another_failed_host() {
        let mut c = cluster(3);
        let a = add(&mut c, Some(0), 1024, RestartPriority::High);
        let b = add(&mut c, Some(1), 1024, RestartPriority::High);
        let plan = plan_restarts(&c, &[0, 1], &HaPolicy::default());
        assert_eq!(plan.restarts, vec![(a, 2), (b, 2)]);
        assert!(plan.refused.is_empty());
    }

    #[test]
    fn reserve_holds_when_any_one_host_can_fail() {
        let mut c = cluster(3);
        for h in 0..3 {
            add(&mut c, Some(h), 2048, RestartPriority::Medium);
        }
        // Any host's 2048 MB fits in another's 2048 MB free.
        assert_eq!(check_reserve(&c, &HaPolicy::default()), Ok(()));
        // Two failures: 4096 MB to place in the one survivor's 2048 MB.
        let two = HaPolicy {
            failures: 2,
            ..HaPolicy::default()
        };
        let err = check_reserve(&c, &two).unwrap_err();
        assert_eq!(
            err,
            ReserveError::Shortfall {
                failed: vec!["h0".into(), "h1".into()],
                unplaced: vec!["v1".into()],
                tolerated: 2,
            }
        );
        assert_eq!(
            err.to_string(),
            "if h0, h1 failed, v1 could not restart (2 failed host(s) tolerated)"
        );
    }

    #[test]
    fn disabled_vms_hold_no_capacity_back() {
        let mut c = cluster(2);
        c.hosts[1].mem_mb = 2048;
        // h0 keeps 1024 MB free for h1's VM; nothing holds room for h0's.
        add(&mut c, Some(0), 3072, RestartPriority::Disabled);
        add(&mut c, Some(1), 1024, RestartPriority::Medium);
        assert_eq!(check_reserve(&c, &HaPolicy::default()), Ok(()));
        c.vms[0].restart = RestartPriority::Low;
        assert!(check_reserve(&c, &HaPolicy::default()).is_err());
    }

    #[test]
    fn admission_skips_hosts_that_would_break_the_reserve() {
        let mut c = cluster(3);
        add(&mut c, Some(0), 3072, RestartPriority::Medium);
        add(&mut c, Some(1), 1024, RestartPriority::Medium);
        let new = add(&mut c, None, 1024, RestartPriority::Medium);
        // Best fit by headroom would pick h0 (fullest); then h0 failing
        // leaves 4096 MB to place across h1 (3072 free) and h2 (4096
        // free): fits. The reserve holds on h0.
        assert_eq!(admit_start(&c, new, 1.0, &HaPolicy::default()), Ok(0));
        // With h2 gone from the picture (maintenance), h0 failing would
        // need h1 to take 3072 + 1024: only possible if the new VM is not
        // on h1 and h0's load fits h1 - it does not.
        c.hosts[2].maintenance = true;
        let refused = admit_start(&c, new, 1.0, &HaPolicy::default()).unwrap_err();
        assert!(
            matches!(refused, AdmissionRefusal::Reserve { ref vm, .. } if vm == "v2"),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("failover reserve"),
            "{refused}"
        );
    }

    #[test]
    fn admission_says_when_there_is_no_room_at_all() {
        let mut c = cluster(1);
        let big = add(&mut c, None, 8192, RestartPriority::Medium);
        assert!(matches!(
            admit_start(&c, big, 1.0, &HaPolicy::default()),
            Err(AdmissionRefusal::NoRoom { mem_mb: 8192, .. })
        ));
    }

    #[test]
    fn an_admitted_state_restarts_every_protected_vm_after_any_failure() {
        let mut c = cluster(4);
        let sizes = [512, 1024, 768, 256, 1536, 512, 1024, 2048, 384, 640];
        for (i, &mem) in sizes.iter().enumerate() {
            let v = add(&mut c, None, mem, RestartPriority::Medium);
            if let Ok(h) = admit_start(&c, v, 1.0, &HaPolicy::default()) {
                c.vms[v].host = Some(h);
            } else {
                assert!(i > 0, "the first VM always fits");
            }
        }
        assert!(c.vms.iter().filter(|v| v.host.is_some()).count() >= 5);
        for failed in 0..4 {
            let plan = plan_restarts(&c, &[failed], &HaPolicy::default());
            assert!(plan.refused.is_empty(), "h{failed}: {:?}", plan.refused);
        }
    }

    #[test]
    fn too_many_failure_sets_are_refused_not_guessed() {
        let c = cluster(100);
        let p = HaPolicy {
            failures: 4,
            ..HaPolicy::default()
        };
        assert!(matches!(
            check_reserve(&c, &p),
            Err(ReserveError::TooManyFailureSets { hosts: 100, .. })
        ));
    }
}
