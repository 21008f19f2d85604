//! What one migration run measured, the same fields for both engines.

use serde::Serialize;

use crate::matrix::{Profile, Workload};

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "reason", rename_all = "snake_case")]
pub enum RunStatus {
    /// The guest runs on the destination.
    Completed,
    /// The row's deadline passed before the engine converged (or the engine
    /// gave up); the guest stayed on the source.
    NotConverged(String),
    /// Something broke (the reason says what).
    Failed(String),
    /// Not run (e.g. QEMU not installed).
    Skipped(String),
}

/// One sample of the bytes still to send, for the plot.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BytesLeft {
    /// ms since the migration started.
    pub t_ms: f64,
    /// Round (QEMU: `dirty-sync-count`; ferry: round number).
    pub round: u64,
    /// Bytes left to send.
    pub bytes: u64,
}

/// One migration of one workload by one engine profile.
#[derive(Debug, Clone, Serialize)]
pub struct RunOutcome {
    /// Engine and profile.
    pub profile: Profile,
    /// Engine (`qemu` / `ferry`).
    pub engine: crate::matrix::Engine,
    /// The workload.
    pub workload: Workload,
    /// Its label.
    pub row: String,
    /// Repetition index.
    pub repeat: u32,
    /// How it ended.
    #[serde(flatten)]
    pub status: RunStatus,
    /// Total migration time, engine's own figure, ms.
    pub total_ms: Option<f64>,
    /// Total time as the harness saw it: migrate command to completion, ms.
    pub wall_ms: Option<f64>,
    /// Downtime, engine's own figure, ms.
    pub downtime_ms: Option<f64>,
    /// Downtime seen from guest memory (heartbeat gap), ms.
    pub heartbeat_gap_ms: Option<f64>,
    /// The heartbeat gap split: source stop until the final state shows
    /// on the destination, then until the guest runs there.
    pub gap_parts_ms: Option<(f64, f64)>,
    /// Rounds (QEMU: dirty-sync-count).
    pub rounds: Option<u64>,
    /// Bytes on the wire, engine's own figure.
    pub wire_bytes: Option<u64>,
    /// Bytes the loopback interface carried during the migration
    /// (`/sys/class/net/lo/statistics/tx_bytes`): the same measure for both
    /// engines, TCP/IP headers included, machine-wide (other loopback
    /// traffic on the machine adds to it).
    pub lo_bytes: Option<u64>,
    /// CPU seconds of the source side (all its processes) during the
    /// migration.
    pub src_cpu_s: Option<f64>,
    /// The same without the guest's own vCPU thread.
    pub src_engine_cpu_s: Option<f64>,
    /// CPU seconds of the destination process.
    pub dst_cpu_s: Option<f64>,
    /// The same without the vCPU thread.
    pub dst_engine_cpu_s: Option<f64>,
    /// Heartbeat at the switch; the destination must continue from it.
    pub switch_heartbeat: Option<u64>,
    /// The guest runs on at the destination: phase 2, heartbeat rising from
    /// the switch value, pages dirtied rising (when dirtying), no
    /// self-check errors.
    pub guest_alive: Option<bool>,
    /// Self-check errors the destination guest counted.
    pub verify_errors: Option<u64>,
    /// Bytes of guest memory the guest filled and never writes again,
    /// hashed on the source before and on the destination after.
    pub static_bytes: Option<u64>,
    /// Whether those bytes are identical on the destination.
    pub static_memory_match: Option<bool>,
    /// Pages/s the guest really dirtied on the source during the migration.
    pub guest_dirty_rate: Option<f64>,
    /// Detail of the liveness check.
    pub alive_detail: String,
    /// 1-minute load average when the run started (the machine is shared).
    pub load_1m: Option<f64>,
    /// When the source's heartbeat last changed (ms since migrate, value),
    /// then the destination's first values from the switch value on: how
    /// the heartbeat gap was read.
    pub heartbeat_trace: Vec<(f64, u64)>,
    /// The engine's own final report, verbatim (QEMU: the last
    /// `query-migrate`; ferry: the migration summary).
    pub engine_report: serde_json::Value,
    /// Bytes left over time.
    pub bytes_left: Vec<BytesLeft>,
}

impl RunOutcome {
    /// An outcome with only the identity and status filled in.
    pub fn new(profile: Profile, workload: Workload, repeat: u32, status: RunStatus) -> Self {
        Self {
            profile,
            engine: profile.engine(),
            workload,
            row: workload.label(),
            repeat,
            status,
            total_ms: None,
            wall_ms: None,
            downtime_ms: None,
            heartbeat_gap_ms: None,
            gap_parts_ms: None,
            rounds: None,
            wire_bytes: None,
            lo_bytes: None,
            src_cpu_s: None,
            src_engine_cpu_s: None,
            dst_cpu_s: None,
            dst_engine_cpu_s: None,
            switch_heartbeat: None,
            guest_alive: None,
            verify_errors: None,
            static_bytes: None,
            static_memory_match: None,
            guest_dirty_rate: None,
            alive_detail: String::new(),
            load_1m: crate::procfs::load_1m(),
            heartbeat_trace: Vec::new(),
            engine_report: serde_json::Value::Null,
            bytes_left: Vec::new(),
        }
    }

    /// Completed with the guest alive at the destination.
    pub fn succeeded(&self) -> bool {
        self.status == RunStatus::Completed
            && self.guest_alive == Some(true)
            && self.static_memory_match != Some(false)
    }
}
