//! Initial placement: where a new VM goes. Best fit by CPU and memory
//! headroom; memory is never overcommitted.

use super::{find_target, Ledger, Limits, PlanError};
use crate::model::{Cluster, HostId, VmId};

/// The host for the unplaced VM `vm`, packing by its full CPU size (no
/// history yet) up to `cpu_cap` of each host.
pub fn place(c: &Cluster, vm: VmId, cpu_cap: f64) -> Result<HostId, PlanError> {
    let ledger = Ledger::new(c, |v| c.vms[v].peak(12));
    // Placement is not a migration: the per-host limit does not apply.
    let limits = Limits {
        max_migrations_per_host: usize::MAX,
        min_move_interval_s: 0.0,
    };
    let mips = c.vms[vm].peak(12);
    let fit = find_target(c, &ledger, &limits, vm, mips, cpu_cap, &|_| false);
    match fit.host {
        Some(h) => Ok(h),
        None if !fit.notes.is_empty() => Err(PlanError::Rules {
            vm: c.vms[vm].name.clone(),
            rules: fit.notes.join("; "),
        }),
        None => Err(PlanError::NoHost {
            vm: c.vms[vm].name.clone(),
            mips,
            mem_mb: c.vms[vm].mem_mb,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Vm;
    use crate::plan::testkit::{add_vm, cluster};

    #[test]
    fn picks_the_fullest_host_that_still_fits() {
        let mut c = cluster(3);
        add_vm(&mut c, 0, 1500.0, 1024);
        add_vm(&mut c, 1, 500.0, 1024);
        c.vms.push(Vm::new("new", 400.0, 1024));
        let v = c.vms.len() - 1;
        // h0 would be at 1900/2000 > 0.9 cap; h1 is fuller than the empty h2.
        assert_eq!(place(&c, v, 0.9).unwrap(), 1);
    }

    #[test]
    fn never_overcommits_memory() {
        let mut c = cluster(2);
        add_vm(&mut c, 0, 10.0, 3500);
        add_vm(&mut c, 1, 10.0, 3100);
        c.vms.push(Vm::new("big", 100.0, 1024));
        let v = c.vms.len() - 1;
        assert!(matches!(place(&c, v, 0.9), Err(PlanError::NoHost { .. })));
        c.vms[1].host = None; // h1 frees up
        assert_eq!(place(&c, v, 0.9).unwrap(), 1);
    }

    #[test]
    fn skips_hosts_in_maintenance_or_off() {
        let mut c = cluster(3);
        c.hosts[0].maintenance = true;
        c.hosts[1].power = crate::model::PowerState::Off;
        c.vms.push(Vm::new("new", 100.0, 100));
        assert_eq!(place(&c, 0, 0.9).unwrap(), 2);
    }

    #[test]
    fn skips_quarantined_hosts() {
        let mut c = cluster(2);
        c.vms.push(Vm::new("new", 100.0, 100));
        c.hosts[0].quarantined = true;
        assert_eq!(place(&c, 0, 0.9).unwrap(), 1);
        c.hosts[1].quarantined = true;
        assert!(matches!(place(&c, 0, 0.9), Err(PlanError::NoHost { .. })));
    }
}
