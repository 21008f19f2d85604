//! Plan computation time of the scheduler (even distribution + power save
//! + limits) for 800 hosts / 1,500 VMs and 10,000 hosts / 100,000 VMs.
//!
//! `cargo bench -p ferry-benches --bench scheduler_plan`
//!
//! The cluster: hosts of 2 x 2660 MIPS and 16 GB; VMs of 500-2500 MIPS and
//! 613-1740 MB with 12 demand samples from a fixed LCG (bursty, mean ~20 %),
//! placed round-robin so that some hosts are over 80 % and many under 30 %.
//! Thresholds' durations are zero, so every over/under host is due now.
//! Baseline (same run): `*_index_only`, building the plan's ledger alone.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ferry_scheduler::model::{Cluster, Host, Vm};
use ferry_scheduler::plan::planner::{Planner, PolicyMode};
use ferry_scheduler::plan::Ledger;

fn cluster(hosts: usize, vms: usize) -> Cluster {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (x >> 33) as f64 / f64::from(1u32 << 31)
    };
    let sizes = [(2500.0, 870), (2000.0, 1740), (1000.0, 1740), (500.0, 613)];
    let mut c = Cluster {
        hosts: (0..hosts)
            .map(|i| Host::new(&format!("h{i}"), 2, 2660.0, 16_384))
            .collect(),
        vms: Vec::with_capacity(vms),
        now: 1e6,
        rules: Vec::new(),
    };
    for i in 0..vms {
        let (mips, mem) = sizes[i % 4];
        let mut vm = Vm::new(&format!("v{i}"), mips, mem);
        // Skewed placement: a third of the hosts get twice the VMs.
        let h = if next() < 0.5 {
            i % (hosts / 3).max(1)
        } else {
            i % hosts
        };
        vm.host = Some(h);
        for _ in 0..12 {
            let r = next();
            let u = if r < 0.1 { 0.8 } else { r * 0.3 };
            vm.record(u * mips);
        }
        c.vms.push(vm);
    }
    c
}

fn planner() -> Planner {
    let mut p = Planner::new(PolicyMode::Both);
    p.balance.duration_s = 0.0;
    p.ferry.low_for_s = 0.0;
    p
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler_plan");
    g.sample_size(10);
    for (hosts, vms) in [(800usize, 1500usize), (10_000, 100_000)] {
        let cl = cluster(hosts, vms);
        let moves = planner().plan(&cl).expect("plan").migrations();
        eprintln!("{hosts} hosts / {vms} VMs: a plan has {moves} migrations");
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{hosts}h_{vms}vm")),
            &cl,
            |b, cl| b.iter(|| planner().plan(cl).expect("plan")),
        );
        // Baseline in the same run: only indexing the cluster (one pass
        // over the VMs), the floor any plan pays.
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{hosts}h_{vms}vm_index_only")),
            &cl,
            |b, cl| b.iter(|| Ledger::new(cl, |v| cl.vms[v].peak(12))),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
