//! Run the simulator from the scheduler crate alone:
//! `cargo run --release -p ferry-scheduler --example simulate -- [TRACES] [DAY...]`
//! (policies from `FERRY_POLICIES`, comma-separated; memory from `FERRY_MEMORY`).
use ferry_scheduler::sim::run::{run_simulate, SimulateOptions};
use ferry_scheduler::sim::{MemoryModel, Policy, SimConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let traces = args.next().unwrap_or_else(|| "../shared/traces".into());
    let mut cfg = SimConfig::published(std::path::Path::new(&traces));
    cfg.days = args.collect();
    if let Ok(p) = std::env::var("FERRY_POLICIES") {
        cfg.policies = p.split(',').filter_map(Policy::parse).collect();
    }
    if let Ok(m) = std::env::var("FERRY_MEMORY") {
        cfg.memory = match m.as_str() {
            "strict" => vec![MemoryModel::Strict],
            "cloudsim" => vec![MemoryModel::CloudSim],
            _ => cfg.memory,
        };
    }
    let opts = SimulateOptions {
        config: cfg,
        out_dir: "target/sched-sim".into(),
        plot_day: None,
    };
    match run_simulate(&opts, |r| {
        eprintln!(
            "{} {:<12} {:<8} {:8.2} kWh {:6} migr SLATAH {:.4} PDM {:.5} hosts {:.1} ({:.1}s)",
            r.day,
            r.policy,
            r.memory.name(),
            r.energy_kwh,
            r.migrations,
            r.slatah,
            r.pdm,
            r.mean_active_hosts,
            r.wall_seconds
        )
    }) {
        Ok(out) => print!("{}", out.table),
        Err(e) => {
            let mut s = format!("error: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(x) = src {
                s.push_str(&format!(": {x}"));
                src = x.source();
            }
            eprintln!("{s}");
            std::process::exit(1);
        }
    }
}
