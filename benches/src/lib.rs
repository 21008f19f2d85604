//! # ferry-benches: criterion micro-benchmarks
//!
//! The benches in `benches/` measure one piece each (dirty-log collection,
//! the transport's lanes and tunnel, the engine over loopback, the
//! scheduler's planner), plus `migration`, which runs the
//! [`ferry_harness::bench`] session that `ferry bench compare` runs.
//! This library holds what only these benches share: memory laid out like
//! a guest's ([`cold_region`]) and models of a migration's data path over
//! loopback ([`data_path`]), the ceilings the engine is compared with.
//!
//! ```no_run
//! use ferry_benches::cold_region::ColdRegion;
//! use ferry_benches::data_path::{stream, DataPath};
//! let src = ColdRegion::new(64 << 20, true);
//! let mut dst = ColdRegion::new(64 << 20, false);
//! let secs = stream(DataPath::Copy, &src, &mut dst);
//! println!("64 MiB in {secs:.3} s");
//! ```
#![deny(missing_docs)]

pub mod cold_region;
pub mod data_path;

/// The number in environment variable `key`, or `default` when it is unset
/// or not a number (the benches' `FERRY_BENCH_*` knobs).
pub fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether this bench binary was started by `cargo bench` (which passes
/// `--bench`); otherwise (`cargo test` builds and runs every bench target)
/// says that `name` skips, and the bench returns.
pub fn started_by_cargo_bench(name: &str) -> bool {
    let bench = std::env::args().any(|a| a == "--bench");
    if !bench {
        eprintln!("{name}: run with `cargo bench` (skipping)");
    }
    bench
}

/// The median of `v` (the upper one of an even count; NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
