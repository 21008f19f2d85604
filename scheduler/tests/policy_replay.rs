//! One policy, two drivers: a recorded PlanetLab day replayed through the
//! daemon's planning path (`Planner::plan`, what the daemon runs each
//! round, fed a `Cluster` built from the trace: one demand sample per VM
//! per round, the plan's actions applied as an executor would) makes the
//! same moves as the simulator, step by step. Strict memory (VMs stay, as
//! in a real cluster). Traces: `$FERRY_TRACES`, else `../shared/traces`
//! beside the repository.

mod common;

use ferry_scheduler::model::{Cluster, Host, Vm};
use ferry_scheduler::plan::planner::{Planner, PolicyMode};
use ferry_scheduler::plan::{apply, Action};
use ferry_scheduler::power::PowerModels;
use ferry_scheduler::sim::setup::{vm_type_index, VM_TYPES};
use ferry_scheduler::sim::{
    ccpe2012_host_types, simulate_day_with, FerryParams, MemoryModel, Policy,
};
use ferry_scheduler::trace::load_day;

/// What the simulator did at one step.
struct SimStep {
    k: usize,
    now: f64,
    moves: Vec<(usize, usize, usize)>,
}

fn replay(day: &str, hosts: usize) {
    let Some(root) = common::traces() else { return };
    let vms = load_day(&root.join("planetlab").join(day)).unwrap();
    let models = PowerModels::load(&root.join("power_models.csv")).unwrap();
    let types = ccpe2012_host_types(&models).unwrap();
    let policy = Policy::Ferry(FerryParams::default());

    // The simulator: its moves at every step, and where it created the VMs.
    let mut steps: Vec<SimStep> = Vec::new();
    let mut initial: Vec<Option<usize>> = Vec::new();
    let r = simulate_day_with(
        day,
        &vms,
        &types,
        hosts,
        &policy,
        MemoryModel::Strict,
        &[],
        &mut |s| {
            if initial.is_empty() {
                // Sources stay the VMs' hosts until the moves complete.
                initial = s.dc.vms.iter().map(|v| v.host).collect();
            }
            steps.push(SimStep {
                k: s.k,
                now: s.dc.now,
                moves: s.moves.to_vec(),
            });
        },
    )
    .unwrap();
    let total: usize = steps.iter().map(|s| s.moves.len()).sum();
    assert_eq!(total as u64, r.migrations);
    assert!(
        total > 100,
        "a day that hardly moves proves little: {total}"
    );

    // The daemon's planner on a Cluster built from the same trace.
    let n = vms.len();
    let mut c = Cluster {
        hosts: (0..hosts)
            .map(|i| {
                let t = &types[i % types.len()];
                let mut h = Host::new(&format!("h{i}"), t.pes, t.pe_mips, t.ram_mb as u64);
                // The power curve: consolidation pays back by it.
                h.power_model = Some(t.power.clone());
                h
            })
            .collect(),
        vms: (0..n)
            .map(|i| {
                let t = VM_TYPES[vm_type_index(i, n)];
                let mut vm = Vm::new(&format!("v{i}"), t.mips, t.ram_mb as u64);
                vm.vcpus = 1;
                vm.host = initial[i];
                vm
            })
            .collect(),
        now: 0.0,
        rules: Vec::new(),
    };
    let mut planner = Planner::new(PolicyMode::PowerSave);
    let sample = |v: usize, k: usize| {
        let s = &vms[v].samples;
        f64::from(s[k.min(s.len() - 1)]) / 100.0 * c_mips(v, n)
    };
    let mut recorded = 0;
    for step in &steps {
        // The agents' reports since the last round: one sample a step.
        while recorded <= step.k {
            for (v, vm) in c.vms.iter_mut().enumerate() {
                vm.record(sample(v, recorded));
            }
            recorded += 1;
        }
        c.now = step.now;
        let plan = planner.plan(&c).unwrap();
        let moves: Vec<(usize, usize, usize)> = plan
            .actions
            .iter()
            .filter_map(|a| match *a {
                Action::Migrate { vm, from, to, .. } => Some((vm, from, to)),
                _ => None,
            })
            .collect();
        assert_eq!(
            moves, step.moves,
            "{day}: the daemon and the simulator part at step {} (t = {} s)",
            step.k, step.now
        );
        for a in &plan.actions {
            apply(&mut c, a);
        }
    }
    eprintln!(
        "{day}: {} steps, {total} moves, the same in both drivers",
        steps.len()
    );
}

fn c_mips(v: usize, n: usize) -> f64 {
    VM_TYPES[vm_type_index(v, n)].mips
}

#[test]
fn the_daemon_planner_moves_what_the_simulator_moves_on_a_planetlab_day() {
    replay("20110303", 800);
}
