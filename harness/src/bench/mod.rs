//! The migration benchmark harness behind `ferry bench compare` (and `cargo bench -p
//! ferry-benches --bench migration`): the same workload guest (GUEST.md)
//! migrated by stock QEMU and by ferry on this machine, in one session,
//! measured the same way for both from outside the engines:
//!
//! - total time on the harness's own clock, the same two points for both
//!   engines (migrate command issued, guest seen running on the
//!   destination), beside each engine's own total, downtime and rounds;
//! - the downtime the guest saw: the gap in its heartbeat, read from both
//!   processes' memory through `/proc/PID/mem` ([`watch`]);
//! - CPU seconds of source and destination processes (`/proc/PID/stat`,
//!   with and without the guest's vCPU thread) and the bytes the
//!   destination read (`/proc/PID/io`);
//! - whether the guest lives on at the destination ([`alive`]);
//! - bytes left to send over time, for the plot ([`plot`]);
//! - a plain TCP stream on the same loopback as the ceiling ([`ceiling`]);
//! - the machine's state with every run, and whether other work was busy
//!   while it ran ([`machine`]).
//!
//! Both destinations are prepared alike (memory populated before the
//! migration, or neither; [`matrix::DstMemory`]); rows can run over a
//! shaped link with the destinations in a network namespace of their own
//! ([`shaped_link`]) and with guest memory like a real guest's
//! ([`matrix::Fill::Mix`]). Failed runs are reported as failures
//! ([`report`]).
//!
//! ```no_run
//! use ferry_harness::bench::compare::{self, CompareConfig};
//! use ferry_harness::bench::settings::RunSettings;
//! let settings = RunSettings {
//!     kernel: ferry_vm::guest_elf_path().to_path_buf(),
//!     custom_kernel: false,
//!     tsc_khz: ferry_vm::host_tsc_khz()?,
//!     max_downtime_ms: 20,
//!     deadline: None,
//!     ferry_bin: ferry_harness::bench::locate_ferry().unwrap(),
//!     qemu_bin: "qemu-system-x86_64".into(),
//!     workdir: std::env::temp_dir(),
//!     verbose: true,
//!     busy_cpus: RunSettings::BUSY_CPUS,
//!     quiet_wait: std::time::Duration::from_secs(60),
//! };
//! let report = compare::run(&CompareConfig::quick(settings), |r| eprintln!("{}", compare::run_line(r)))?;
//! print!("{}", report.text());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod alive;
pub mod ceiling;
pub mod compare;
pub mod error;
pub mod ferry;
pub mod guest_probe;
pub mod machine;
pub mod matrix;
pub mod outcome;
pub mod plot;
pub mod procfs;
pub mod qemu;
pub mod report;
pub mod run_common;
pub mod settings;
pub mod shaped_link;
pub mod stats;
pub mod watch;

pub use error::BenchError;

/// The `ferry` binary to benchmark: `$FERRY_BIN`, else `ferry` next to
/// (or one directory above) the running executable (`target/<profile>/`
/// holds both `ferry` and `deps/` where bench and test binaries live).
pub fn locate_ferry() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_BIN") {
        return Some(p.into());
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("ferry"), dir.parent()?.join("ferry")]
        .into_iter()
        .find(|p| p.is_file())
}
