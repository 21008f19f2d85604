//! Settings every run of a session shares.

use std::path::PathBuf;
use std::time::Duration;

/// Shared by all runs of one `bench compare` session.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// The guest image both engines boot.
    pub kernel: PathBuf,
    /// Whether `kernel` was given by the user (ferry then gets `--kernel`).
    pub custom_kernel: bool,
    /// Host TSC kHz, for the guest's pacing.
    pub tsc_khz: u32,
    /// ferry's downtime limit, ms (QEMU's are the session's
    /// `qemu_downtime_limits_ms`, by default the same).
    pub max_downtime_ms: u64,
    /// Per-row deadline override (default: [`crate::bench::matrix::Workload::default_deadline_secs`]).
    pub deadline: Option<Duration>,
    /// The `ferry` binary.
    pub ferry_bin: PathBuf,
    /// The QEMU binary.
    pub qemu_bin: PathBuf,
    /// Where sockets go (a temporary directory).
    pub workdir: PathBuf,
    /// Print progress to stderr.
    pub verbose: bool,
    /// A run counts as busy when other work used more CPUs than this
    /// before or during it ([`crate::bench::machine`]).
    pub busy_cpus: f64,
    /// How long to wait before each run for the machine to be quiet.
    pub quiet_wait: Duration,
}

impl RunSettings {
    /// Default [`RunSettings::busy_cpus`]: a quarter of a CPU.
    pub const BUSY_CPUS: f64 = 0.25;
}

impl RunSettings {
    /// The migration deadline for a workload.
    pub fn deadline_for(&self, w: &crate::bench::matrix::Workload) -> Duration {
        self.deadline
            .unwrap_or_else(|| Duration::from_secs(w.default_deadline_secs()))
    }

    /// How long booting and filling may take: 60 s + 60 s per GiB (the
    /// fill runs natively, but the machine is shared).
    pub fn boot_timeout(mem_bytes: u64) -> Duration {
        Duration::from_secs(60 + 60 * mem_bytes.div_ceil(1 << 30))
    }
}
