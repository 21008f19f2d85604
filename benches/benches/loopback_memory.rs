//! What moving guest memory over this loopback costs before any engine
//! runs: models of a migration's data path, each one connection, 256 KiB
//! writes, from a cold source region the size of a guest into a cold
//! destination region, with a thread spinning in the guest vCPU's place.
//!
//! The paths are `ferry_benches::data_path::DataPath`: `tcp` (hot
//! buffers, the baseline), `copy` (ferry's), `direct`, `direct-srchash`,
//! `direct-nohash`.
//!
//! ```text
//! cargo bench -p ferry-benches --bench loopback_memory            # 2 GiB, 2 runs
//! FERRY_BENCH_MEM_MIB=1024 FERRY_BENCH_RUNS=3 cargo bench -p ferry-benches --bench loopback_memory
//! ```

use std::sync::atomic::{AtomicBool, Ordering};

use ferry_benches::cold_region::ColdRegion;
use ferry_benches::data_path::{stream, DataPath};

fn main() {
    if !ferry_benches::started_by_cargo_bench("loopback_memory") {
        return;
    }
    let env = ferry_benches::env_usize;
    let mib = env("FERRY_BENCH_MEM_MIB", 2048);
    let runs = env("FERRY_BENCH_RUNS", 2);
    let src = ColdRegion::new(mib << 20, true);
    let mut dst = ColdRegion::new(mib << 20, false);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        // The guest's vCPU: a thread that never sleeps.
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        println!("{mib} MiB per run, a spinning thread in the vCPU's place; GB/s, and vs `tcp` of the same round");
        let names: Vec<&str> = DataPath::ALL.iter().map(|p| p.name()).collect();
        println!("| round | {} |", names.join(" | "));
        println!("|---|{}", "---|".repeat(DataPath::ALL.len()));
        for round in 0..runs {
            let rates: Vec<f64> = DataPath::ALL
                .iter()
                .map(|&p| stream(p, &src, &mut dst))
                .collect();
            let cells: Vec<String> = rates
                .iter()
                .map(|r| format!("{:.2} ({:.0}%)", r / 1e9, 100.0 * r / rates[0]))
                .collect();
            println!("| {round} | {} |", cells.join(" | "));
        }
        stop.store(true, Ordering::Relaxed);
    });
}
