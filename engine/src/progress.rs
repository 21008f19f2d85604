//! Progress events: what the source reports while it migrates.

use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::convergence::{Assessment, Decision};
use crate::encode::{EncodingCounts, EncodingDecision};
use crate::summary::MigrationSummary;

/// Serialize a duration as fractional milliseconds (JSON-friendly).
pub(crate) fn as_ms<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// One step of a migration, in order. Serialized with an `"event"` tag so
/// `--json` output is one self-describing object per line.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProgressEvent {
    /// Handshake done, tracking started.
    Started {
        /// Pages of guest memory.
        pages: u64,
        /// Bytes of guest memory.
        guest_bytes: u64,
        /// The dirty log backend.
        dirty_log: &'static str,
        /// Encoder threads.
        workers: usize,
    },
    /// Part of a round went out (about every 100 ms, for progress bars).
    RoundProgress {
        /// Round number.
        round: u32,
        /// Pages of the round handled so far.
        pages_done: u64,
        /// Pages the round has to handle.
        pages_total: u64,
        /// Wire bytes of the whole migration so far.
        wire_bytes: u64,
    },
    /// A round finished; what it measured and what was decided.
    RoundFinished {
        /// Round number.
        round: u32,
        /// Pages the round handled (sent or found unchanged).
        pages: u64,
        /// Pages per way they were sent.
        encodings: EncodingCounts,
        /// Wire bytes of the round.
        wire_bytes: u64,
        /// Round duration.
        #[serde(serialize_with = "as_ms", rename = "duration_ms")]
        duration: Duration,
        /// Pages dirty now: the next round's work.
        dirty_pages: u64,
        /// Throttle in force during the round, percent (dirty-limit: the
        /// highest vCPU's).
        throttle_percent: u8,
        /// Dirty-limit: each vCPU's throttle in force during the round,
        /// percent (empty with auto-converge).
        vcpu_throttles: Vec<u8>,
        /// Pages each vCPU dirtied during the round, when the dirty log
        /// counts them (the KVM dirty ring), else empty.
        vcpu_dirty_pages: Vec<u64>,
        /// The convergence figures and decision.
        assessment: AssessmentEvent,
        /// The encoding choice in force at the end of the round and the
        /// figures it was made from (`crate::encode::choice`).
        encoding: Box<EncodingDecision>,
    },
    /// The guest was paused for the final round.
    StopAndCopy {
        /// Pages to send with the guest paused.
        dirty_pages: u64,
    },
    /// A handover step.
    Handover {
        /// The step.
        step: HandoverStep,
    },
    /// The migration gave up; the guest keeps running on the source.
    Abandoned {
        /// Why.
        reason: String,
    },
    /// Done: the guest runs on the destination.
    Completed {
        /// The summary.
        summary: Box<MigrationSummary>,
    },
}

/// [`Assessment`] in serializable units.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AssessmentEvent {
    /// Pages dirtied per second during the round.
    pub dirty_rate_pages_per_sec: f64,
    /// Bandwidth estimate, bytes/s.
    pub bandwidth_bytes_per_sec: f64,
    /// Wire bytes the dirty pages are expected to take.
    pub bytes_left: u64,
    /// Expected downtime if stopped now.
    #[serde(serialize_with = "as_ms", rename = "expected_downtime_ms")]
    pub expected_downtime: Duration,
    /// Whether the dirty set shrank.
    pub shrinking: bool,
    /// The decision.
    pub decision: Decision,
}

impl From<Assessment> for AssessmentEvent {
    fn from(a: Assessment) -> Self {
        Self {
            dirty_rate_pages_per_sec: a.dirty_rate_pages_per_sec,
            bandwidth_bytes_per_sec: a.bandwidth_bytes_per_sec,
            bytes_left: a.bytes_left,
            expected_downtime: a.expected_downtime,
            shrinking: a.shrinking,
            decision: a.decision,
        }
    }
}

/// Steps of the handover commit protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HandoverStep {
    /// State blob and memory digest sent.
    StateSent,
    /// The destination verified memory and restored state.
    Ready,
    /// GO sent: from here the source never resumes on its own.
    Go,
    /// The destination reports the guest running.
    Running,
}
