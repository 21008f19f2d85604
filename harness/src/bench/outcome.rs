//! What one migration run measured, the same fields for both engines.

use serde::{Deserialize, Serialize};

use crate::bench::machine::MachineState;
use crate::bench::matrix::{Profile, Workload};

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// The comparison of guest memory the workload never writes after its fill
/// (hashed on the source before and on the destination after). Only
/// `Matched` and `NoStaticRange` count as a success: a digest that could
/// not be taken is not a match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", content = "detail", rename_all = "snake_case")]
pub enum StaticCheck {
    /// Not compared yet (the run ended before the comparison).
    Pending,
    /// This many bytes are identical on both sides.
    Matched(u64),
    /// This many bytes were compared and differ.
    Differs(u64),
    /// The workload writes all of its memory, so there is nothing static
    /// to compare (the guest's own self-check still runs).
    NoStaticRange,
    /// A digest could not be taken (why).
    NotCompared(String),
}

impl StaticCheck {
    /// Whether this lets the run count as a success.
    pub fn ok(&self) -> bool {
        matches!(self, Self::Matched(_) | Self::NoStaticRange)
    }
}

/// One sample of the bytes still to send, for the plot.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
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
    pub engine: crate::bench::matrix::Engine,
    /// The workload.
    pub workload: Workload,
    /// Its label.
    pub row: String,
    /// Repetition index.
    pub repeat: u32,
    /// The downtime limit this engine was given, ms.
    pub downtime_limit_ms: u64,
    /// How it ended.
    #[serde(flatten)]
    pub status: RunStatus,
    /// Total time on the harness's clock, the same two points for both
    /// engines: from the migrate command being issued (QEMU's `migrate`
    /// QMP command; spawning `ferry migrate`) to the guest seen running on
    /// the destination (its heartbeat past the value it had when the
    /// source stopped), ms.
    pub total_ms: Option<f64>,
    /// Total time as the engine reports it (QEMU's `total-time` ends when
    /// the source has sent everything; ferry's starts once its lanes are
    /// connected), ms.
    pub engine_total_ms: Option<f64>,
    /// When the engine said it was done (QEMU: `completed` seen on the
    /// source; ferry: its summary line), on the harness's clock, ms.
    pub engine_done_ms: Option<f64>,
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
    /// Bytes the link carried during the migration (loopback: `lo`'s
    /// `tx_bytes`, machine-wide, so other loopback traffic adds to it; a
    /// shaped link: the host end's `tx_bytes`, the sources' side): the same
    /// measure for both engines, TCP/IP headers included.
    pub link_bytes: Option<u64>,
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
    /// Guest memory the guest filled and never writes again, hashed on
    /// the source before and on the destination after.
    pub static_memory: StaticCheck,
    /// Pages/s the guest really dirtied on the source during the migration.
    pub guest_dirty_rate: Option<f64>,
    /// Detail of the liveness check.
    pub alive_detail: String,
    /// The machine when the run started.
    pub machine: MachineState,
    /// CPUs other work used during the second before the run started.
    pub others_cpus_before: Option<f64>,
    /// CPUs other work used while the migration ran (all busy CPU time
    /// minus the harness's and the engine processes').
    pub others_cpus: Option<f64>,
    /// Measured while the machine was busy: other work used more than the
    /// session's threshold before or during the migration.
    pub busy: bool,
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
    pub fn new(
        profile: Profile,
        workload: Workload,
        repeat: u32,
        downtime_limit_ms: u64,
        status: RunStatus,
    ) -> Self {
        Self {
            profile,
            engine: profile.engine(),
            workload,
            row: workload.label(),
            repeat,
            downtime_limit_ms,
            status,
            total_ms: None,
            engine_total_ms: None,
            engine_done_ms: None,
            downtime_ms: None,
            heartbeat_gap_ms: None,
            gap_parts_ms: None,
            rounds: None,
            wire_bytes: None,
            link_bytes: None,
            src_cpu_s: None,
            src_engine_cpu_s: None,
            dst_cpu_s: None,
            dst_engine_cpu_s: None,
            switch_heartbeat: None,
            guest_alive: None,
            verify_errors: None,
            static_memory: StaticCheck::Pending,
            guest_dirty_rate: None,
            alive_detail: String::new(),
            machine: MachineState::now(),
            others_cpus_before: None,
            others_cpus: None,
            busy: false,
            heartbeat_trace: Vec::new(),
            engine_report: serde_json::Value::Null,
            bytes_left: Vec::new(),
        }
    }

    /// Completed, the guest alive at the destination, its static memory
    /// identical there, and the total time measured.
    pub fn succeeded(&self) -> bool {
        self.failure().is_none()
    }

    /// Why the run does not count as a success, `None` when it does.
    pub fn failure(&self) -> Option<String> {
        match &self.status {
            RunStatus::Completed => {}
            RunStatus::NotConverged(why) => return Some(format!("not converged: {why}")),
            RunStatus::Failed(why) => return Some(format!("failed: {why}")),
            RunStatus::Skipped(why) => return Some(format!("skipped: {why}")),
        }
        if self.guest_alive != Some(true) {
            return Some(format!(
                "guest not healthy at the destination: {}",
                self.alive_detail
            ));
        }
        match &self.static_memory {
            StaticCheck::Differs(b) => {
                return Some(format!(
                    "static memory ({} MiB) differs from the source's",
                    b >> 20
                ))
            }
            StaticCheck::NotCompared(why) => {
                return Some(format!("static memory not compared: {why}"))
            }
            StaticCheck::Pending => return Some("static memory not compared".into()),
            StaticCheck::Matched(_) | StaticCheck::NoStaticRange => {}
        }
        if self.total_ms.is_none() {
            return Some(
                "the guest was not seen running on the destination (no total time)".into(),
            );
        }
        None
    }

    /// Whether the run was skipped (nothing measured, nothing failed).
    pub fn skipped(&self) -> bool {
        matches!(self.status, RunStatus::Skipped(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_status_and_check_read_back_from_its_json_line() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Line {
            #[serde(flatten)]
            status: RunStatus,
            static_memory: StaticCheck,
        }
        for line in [
            Line {
                status: RunStatus::Completed,
                static_memory: StaticCheck::Matched(1 << 30),
            },
            Line {
                status: RunStatus::Failed("the guest stopped".into()),
                static_memory: StaticCheck::NotCompared("no digest".into()),
            },
            Line {
                status: RunStatus::Skipped("no QEMU".into()),
                static_memory: StaticCheck::Pending,
            },
        ] {
            let text = serde_json::to_string(&line).unwrap();
            assert_eq!(serde_json::from_str::<Line>(&text).unwrap(), line, "{text}");
        }
        let text = serde_json::to_string(&Line {
            status: RunStatus::NotConverged("deadline".into()),
            static_memory: StaticCheck::NoStaticRange,
        })
        .unwrap();
        assert_eq!(
            text,
            r#"{"status":"not_converged","reason":"deadline","static_memory":{"result":"no_static_range"}}"#
        );
    }
}
