//! The control protocol: JSON lines over a UNIX socket.
//!
//! ## A connection
//!
//! 1. The server writes a [`Greeting`] line: `{"ferry_control":2,"role":"source","pid":..}`.
//!    A client that reads anything else is not talking to ferry; a client
//!    that reads another version refuses to go on ([`PROTOCOL_VERSION`]).
//! 2. The client writes one [`Request`] line (at most
//!    [`MAX_REQUEST_BYTES`]), tagged by `"op"`.
//! 3. The server writes [`Reply`] lines, tagged by `"reply"`, and closes:
//!
//! | request | replies |
//! |---|---|
//! | `status` | `status` |
//! | `migrate` | `event`s (`connected`, then the engine's progress), then `done` or `error` |
//! | `migration` | `migration` (the one running, or the last one, until the next starts) |
//! | `cancel` | `ok` (the guest resumes on the source), or `error` (`too_late` after GO) |
//! | `set` | `ok` with the limits now in force, or `error` |
//! | `resolve` | `ok`, or `error` (`unsupported` until the handover can be resolved) |
//! | `quit` | `ok`, then the process ends |
//!
//! Every failure is one [`ControlError`]: a machine-readable
//! [`ErrorKind`], a one-line message and where the guest is.
//!
//! ## Version rule
//!
//! [`PROTOCOL_VERSION`] changes when a request, reply or event changes
//! meaning or loses a field; new optional fields and new event kinds do
//! not change it (clients ignore what they do not know).
//!
//! ## Numbers
//!
//! On the socket, counts of bytes and pages are JSON numbers: both ends
//! are typed Rust and read them exactly, and they stay far below 2^53.
//! Values that use all 64 bits (the memory digest, nanosecond timestamps)
//! are strings, so JSON tools that read numbers as doubles do not round
//! them; a number is accepted there too. What the command line prints with
//! `--json` is these same types written through [`crate::json`], which makes
//! every 64-bit integer a string (`"wire_bytes":"123456"`), so a script in
//! a language with 53-bit numbers can trust every figure it reads.

use std::time::Duration;

use ferry_engine::convergence::Decision;
use ferry_engine::encode::{EncodingCounts, EncodingDecision};
use ferry_vm::{GuestStatus, RunState};
use serde::{Deserialize, Serialize};

use crate::security::{SecurityMode, SecuritySpec};

/// The protocol's version (see the module docs for when it changes).
pub const PROTOCOL_VERSION: u32 = 2;

/// Longest request line accepted: a migrate request with TLS paths fits
/// many times over; more is not a request.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// The first line the server writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    /// [`PROTOCOL_VERSION`] of the server.
    pub ferry_control: u32,
    /// What the process is.
    pub role: Role,
    /// Its process id.
    pub pid: u32,
}

/// What a ferry VM process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `ferry vm run`: booted its guest.
    Source,
    /// `ferry vm receive`: waits for a guest, then runs it.
    Destination,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Source => "source",
            Role::Destination => "destination",
        })
    }
}

/// Where the guest of a process is, as far as that process knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestHome {
    /// Runs here.
    Here,
    /// A destination still waiting for its guest.
    Awaiting,
    /// A migration is in progress (the guest still runs here until GO).
    Migrating,
    /// Runs at the destination; this copy is paused for good.
    MigratedAway,
    /// GO was sent but RUNNING never came: paused here, the destination decides.
    InDoubt,
}

impl GuestHome {
    /// In words, as the source sees it (what `ferry migrate` reports).
    pub fn describe_at_source(self) -> &'static str {
        match self {
            GuestHome::Here => "still running on the source",
            GuestHome::Migrating => "migrating (still running on the source until GO)",
            GuestHome::MigratedAway => "running on the destination",
            GuestHome::InDoubt => "IN DOUBT: paused on the source after GO; check the destination",
            GuestHome::Awaiting => "not on this side",
        }
    }

    /// In words, as the process that answers sees it.
    pub fn describe(self) -> &'static str {
        match self {
            GuestHome::Here => "running here",
            GuestHome::Awaiting => "not here yet (this destination waits for one)",
            GuestHome::Migrating => "migrating (still running here until GO)",
            GuestHome::MigratedAway => "running on the destination (this copy is discarded)",
            GuestHome::InDoubt => "IN DOUBT: paused here after GO; the destination's state decides",
        }
    }
}

/// A request: one per connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The guest's status block and where it is.
    Status,
    /// Migrate the guest to a destination.
    Migrate(Box<MigrateRequest>),
    /// The running or last migration.
    Migration,
    /// Stop the running migration, the guest running here.
    Cancel,
    /// Change the running migration's limits.
    Set(Limits),
    /// Finish a handover left in doubt.
    Resolve {
        /// What to do with the paused copy.
        action: ResolveAction,
    },
    /// End the process (a source whose guest is here stops it).
    Quit,
}

/// What `resolve` does with a guest left in doubt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResolveAction {
    /// Resume the paused copy here (the destination does not run it).
    Resume,
    /// Throw the paused copy away (the destination runs it).
    Discard,
}

/// A migration request: where to, how, and its limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// Destination address (host:port).
    pub to: String,
    /// TCP lanes to open (default: `ferry_transport::default_lane_count()`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lanes: Option<u16>,
    /// Plaintext or mutual TLS: required, there is no default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<SecuritySpec>,
    /// Downtime limit, deadline, bandwidth, auto-converge.
    #[serde(flatten)]
    pub limits: Limits,
    /// Encoder threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// XOR-delta cache bytes (0 disables deltas; absent: a quarter of
    /// guest memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xor_cache_bytes: Option<u64>,
    /// LZ4-compress pages (default on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<bool>,
    /// When the downtime limit cannot be met by the deadline: `abort`
    /// (default: the guest stays on the source) or `force` (complete
    /// anyway; the summary says by how much the limit was exceeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_deadline: Option<ferry_engine::OnDeadline>,
    /// How to slow down a guest whose rounds stop shrinking:
    /// `auto-converge` (every vCPU alike), `dirty-limit` (only the vCPUs
    /// dirtying fastest; needs the KVM dirty ring) or `auto` (default: the
    /// engine picks dirty-limit when it can and the guest has several
    /// vCPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converge: Option<ferry_engine::ConvergeMode>,
}

/// The limits of a migration: set when it starts, changed by `set` while
/// it runs. Absent fields keep their value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Downtime limit in milliseconds (1 to 60 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u64>,
    /// Give up after this many seconds from the start (finite, more than
    /// 0, at most a week).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_s: Option<f64>,
    /// Wire bytes per second cap (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Throttle the guest when rounds stop shrinking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_converge: Option<bool>,
    /// Dirty-limit: the dirty rate each vCPU is slowed down towards, MB/s
    /// (MiB/s, like QEMU's `vcpu-dirty-limit`; 1 to 1 000 000). Absent at
    /// the start: half the link's bandwidth estimate shared among the
    /// vCPUs. A `set` takes effect from the next round whenever dirty-limit
    /// is in force (from the start or after a `--converge auto` switch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_dirty_limit_mbps: Option<u64>,
}

/// A line the server writes after the greeting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to `status`.
    Status(Box<StatusReply>),
    /// A step of the migration this connection asked for.
    Event(Box<Event>),
    /// The migration this connection asked for ended.
    Done(Box<MigrationReport>),
    /// Answer to `migration`.
    Migration(Box<MigrationReport>),
    /// Done as asked; for `set`, the limits now in force.
    Ok {
        /// What was done, in words.
        message: String,
    },
    /// The request failed.
    Error(ControlError),
}

/// Answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    /// What the process is.
    pub role: Role,
    /// Where the guest is.
    pub state: GuestHome,
    /// The vCPU's state, when there is a guest (since version 2 typed:
    /// `"running"`, `"paused"`, `"stopped"`, `{"failed": "why"}`).
    pub run_state: Option<RunState>,
    /// The guest's status block, when there is a guest.
    pub status: Option<GuestStatus>,
}

/// The one shape of every failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// What kind of failure, for programs.
    pub kind: ErrorKind,
    /// One line, for people.
    pub message: String,
    /// Where the guest is now.
    pub guest: Option<GuestHome>,
}

/// Kinds of [`ControlError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request did not parse or a field is out of range.
    BadRequest,
    /// The guest is not in a state that allows this.
    WrongState,
    /// No migration is running (cancel, set).
    NoMigration,
    /// GO was sent: the source no longer owns the outcome.
    TooLate,
    /// The migration failed.
    Failed,
    /// The migration was cancelled.
    Cancelled,
    /// This process cannot do that (yet).
    Unsupported,
}

impl ControlError {
    /// A failure of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>, guest: Option<GuestHome>) -> Self {
        Self {
            kind,
            message: message.into(),
            guest,
        }
    }

    /// A request that does not parse or is out of range.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message, None)
    }
}

/// A step of a migration, as clients see it. Tagged by `"event"`; the
/// fields carry the engine's names and units (`_ms` are milliseconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The lanes are open.
    Connected {
        /// The destination.
        to: String,
        /// Lanes opened.
        lanes: u16,
        /// How they are secured.
        security: SecurityMode,
    },
    /// Handshake done, dirty tracking started.
    Started {
        /// Pages of guest memory.
        pages: u64,
        /// Bytes of guest memory.
        guest_bytes: u64,
        /// The dirty log backend.
        dirty_log: String,
        /// Encoder threads.
        workers: usize,
    },
    /// Part of a round went out.
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
        /// Pages handled.
        pages: u64,
        /// Pages per way they were sent.
        encodings: EncodingCounts,
        /// Wire bytes of the round.
        wire_bytes: u64,
        /// Round duration.
        duration_ms: f64,
        /// Pages dirty now: the next round's work.
        dirty_pages: u64,
        /// Throttle in force during the round, percent (dirty-limit: the
        /// highest vCPU's).
        throttle_percent: u8,
        /// Dirty-limit: each vCPU's throttle during the round, percent.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        vcpu_throttles: Vec<u8>,
        /// Pages each vCPU dirtied during the round (dirty ring only).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        vcpu_dirty_pages: Vec<u64>,
        /// The convergence figures and decision.
        assessment: Assessment,
        /// The encoding choice in force at the end of the round and the
        /// figures it was made from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        encoding: Option<Box<EncodingDecision>>,
    },
    /// The guest was paused for the final round.
    StopAndCopy {
        /// Pages to send with the guest paused.
        dirty_pages: u64,
    },
    /// A handover step.
    Handover {
        /// The step: `state_sent`, `ready`, `go`, `running`.
        step: String,
    },
    /// The migration gave up; the guest keeps running on the source.
    Abandoned {
        /// Why.
        reason: String,
    },
}

/// A round's convergence figures and decision.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Assessment {
    /// Pages dirtied per second during the round.
    pub dirty_rate_pages_per_sec: f64,
    /// Bandwidth estimate, bytes/s.
    pub bandwidth_bytes_per_sec: f64,
    /// Wire bytes the dirty pages are expected to take.
    pub bytes_left: u64,
    /// Expected downtime if stopped now, ms.
    pub expected_downtime_ms: f64,
    /// Whether the dirty set shrank.
    pub shrinking: bool,
    /// The decision.
    pub decision: Decision,
}

/// A decision in words ("stop and copy", "throttle the guest to 40 %").
pub fn decision_words(d: &Decision) -> String {
    match d {
        Decision::StopAndCopy => "stop and copy".into(),
        Decision::Continue => "another round".into(),
        Decision::Throttle { percent } => format!("another round, guest throttled {percent} %"),
        Decision::LimitVcpus { vcpus, max_percent } => format!(
            "another round, dirty-limit retuned {vcpus} vCPU{} (up to {max_percent} %)",
            if *vcpus == 1 { "" } else { "s" }
        ),
        Decision::GiveUp => "give up (deadline)".into(),
    }
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Opening the lanes.
    Connecting,
    /// Copying memory while the guest runs.
    Copying,
    /// The guest is paused, the last pages go out.
    StopAndCopy,
    /// State sent; READY, GO, RUNNING.
    Handover,
    /// Receiving (a destination).
    Receiving,
    /// The guest runs on the destination.
    Completed,
    /// Failed; the guest runs on the source (or is in doubt, see `guest`).
    Failed,
    /// Cancelled before GO; the guest runs on the source.
    Cancelled,
}

impl Phase {
    /// Whether the migration has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Cancelled)
    }
}

/// What `migration` answers: the running migration, or the last one until
/// the next starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// The side that answers.
    pub role: Role,
    /// Where it is.
    pub phase: Phase,
    /// Where the guest is.
    pub guest: GuestHome,
    /// The destination (source side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The current round.
    pub round: u32,
    /// Guest bytes left in the current round (falls while it runs), or
    /// dirty after the last round.
    pub bytes_left: u64,
    /// Wire bytes so far.
    pub wire_bytes: u64,
    /// Pages dirtied per second in the last round.
    pub dirty_rate_pages_per_sec: f64,
    /// Bandwidth estimate, bytes/s.
    pub bandwidth_bytes_per_sec: f64,
    /// Expected downtime if stopped now, ms.
    pub expected_downtime_ms: f64,
    /// Auto-converge throttle in force, percent.
    pub throttle_percent: u8,
    /// The last decision, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// The limits in force.
    pub limits: Limits,
    /// Since the request, ms.
    pub elapsed_ms: f64,
    /// The source's summary once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
    /// The destination's summary once the guest arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<ReceivedSummary>,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The source's account of a completed migration (the engine's
/// `MigrationSummary` on the wire).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Rounds, the final stopped round included.
    pub rounds: u32,
    /// From the start to RUNNING, ms.
    pub total_ms: f64,
    /// Source pause to destination resume, ms.
    pub downtime_ms: f64,
    /// Its parts, ms, in order.
    pub downtime_parts: DowntimeParts,
    /// Guest bytes handled over all rounds.
    pub guest_bytes: u64,
    /// Bytes put on the wire.
    pub wire_bytes: u64,
    /// Size of guest memory.
    pub memory_bytes: u64,
    /// Pages by how they were sent.
    pub pages: EncodingCounts,
    /// Guest memory / total time, bytes/s.
    pub throughput_bytes_per_sec: f64,
    /// Wire bytes / total time, bytes/s.
    pub wire_bytes_per_sec: f64,
    /// Highest throttle (auto-converge, or dirty-limit's highest vCPU),
    /// percent.
    pub max_throttle_percent: u8,
    /// How the guest was slowed down: `auto-converge` or `dirty-limit`, the
    /// mode it started in.
    #[serde(default)]
    pub converge: String,
    /// The switches `--converge auto` made from that mode, in order.
    #[serde(default)]
    pub converge_switches: Vec<ferry_engine::ConvergeSwitch>,
    /// Highest throttle each vCPU had, percent (index = vCPU).
    #[serde(default)]
    pub vcpu_max_throttle_percent: Vec<u8>,
    /// Pages each vCPU dirtied over the live rounds (dirty ring only).
    #[serde(default)]
    pub vcpu_dirty_pages: Vec<u64>,
    /// The memory digest both sides agreed on (a string: 64 bits).
    #[serde(with = "u64_string")]
    pub memory_digest: u64,
    /// The digest of each memory region (they add up to `memory_digest`).
    #[serde(default)]
    pub region_digests: Vec<RegionDigest>,
    /// The dirty log backend used.
    pub dirty_log: String,
    /// The downtime limit in force, ms.
    #[serde(default)]
    pub downtime_limit_ms: f64,
    /// How far the downtime went past the limit, ms (0: met).
    #[serde(default)]
    pub over_limit_ms: f64,
    /// Raw pages that arrived torn (written by the guest while they were
    /// sent from its memory) and were sent again.
    #[serde(default)]
    pub torn_pages_resent: u64,
    /// The stopped round, expected and sent.
    #[serde(default)]
    pub final_round: FinalRound,
}

/// The stopped round as the decision to pause expected it and as it went
/// (the engine's `FinalRound`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct FinalRound {
    /// Dirty pages the decision counted on.
    pub expected_pages: u64,
    /// Wire bytes it expected them to take.
    pub expected_bytes: u64,
    /// The link's bandwidth it assumed, bytes/s.
    pub expected_bandwidth_bytes_per_sec: f64,
    /// How long it expected them to take (the link's time and the
    /// encoders'), ms.
    pub expected_ms: f64,
    /// Dirty pages the stopped round found (the final collect included).
    pub pages: u64,
    /// Wire bytes it sent.
    pub wire_bytes: u64,
    /// The encoder threads' time on it over their number, ms.
    pub encode_ms: f64,
}

impl From<&ferry_engine::FinalRound> for FinalRound {
    fn from(f: &ferry_engine::FinalRound) -> Self {
        Self {
            expected_pages: f.expected_pages,
            expected_bytes: f.expected_bytes,
            expected_bandwidth_bytes_per_sec: f.expected_bandwidth_bytes_per_sec,
            expected_ms: ms(f.expected),
            pages: f.pages,
            wire_bytes: f.wire_bytes,
            encode_ms: ms(f.encode),
        }
    }
}

/// One memory region's digest (the engine's `RegionDigest`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionDigest {
    /// The region's guest-physical start.
    pub guest_phys_addr: u64,
    /// Its length in bytes.
    pub bytes: u64,
    /// The digest of its pages (a string: 64 bits).
    #[serde(with = "u64_string")]
    pub digest: u64,
}

impl From<&ferry_engine::RegionDigest> for RegionDigest {
    fn from(r: &ferry_engine::RegionDigest) -> Self {
        Self {
            guest_phys_addr: r.guest_phys_addr,
            bytes: r.bytes,
            digest: r.digest,
        }
    }
}

/// Where the downtime went, ms (see the engine's `DowntimeBreakdown`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct DowntimeParts {
    pub pause_ms: f64,
    #[serde(default)]
    pub vcpu_stop_spread_ms: f64,
    pub final_collect_ms: f64,
    pub final_pages_ms: f64,
    pub state_ms: f64,
    pub ready_wait_ms: f64,
    #[serde(default)]
    pub dest_pages_ms: f64,
    #[serde(default)]
    pub ready_return_ms: f64,
    pub dest_verify_ms: f64,
    pub dest_restore_ms: f64,
    pub go_to_resume_ms: f64,
    pub dest_resume_ms: f64,
    #[serde(default)]
    pub pre_go_ms: f64,
}

/// The destination's account of a guest that arrived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceivedSummary {
    /// Rounds received.
    pub rounds: u32,
    /// Page entries received.
    pub pages: EncodingCounts,
    /// Bytes received.
    pub wire_bytes: u64,
    /// Bytes received per lane (lane 0 first).
    #[serde(default)]
    pub wire_bytes_per_lane: Vec<u64>,
    /// The memory digest verified (a string: 64 bits).
    #[serde(with = "u64_string")]
    pub memory_digest: u64,
    /// The digest of each memory region, each checked against the source's.
    #[serde(default)]
    pub region_digests: Vec<RegionDigest>,
    /// When the guest resumed, ns since the Unix epoch (a string: 64 bits).
    #[serde(with = "u64_string")]
    pub resumed_at_unix_ns: u64,
    /// Checking the digest, ms.
    pub verify_ms: f64,
    /// Restoring state, ms.
    pub restore_ms: f64,
    /// From the Hello to RUNNING, ms.
    pub total_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl From<&ferry_engine::MigrationSummary> for Summary {
    fn from(s: &ferry_engine::MigrationSummary) -> Self {
        let p = &s.downtime_parts;
        Self {
            rounds: s.rounds,
            total_ms: ms(s.total),
            downtime_ms: ms(s.downtime),
            downtime_parts: DowntimeParts {
                pause_ms: ms(p.pause),
                vcpu_stop_spread_ms: ms(p.vcpu_stop_spread),
                final_collect_ms: ms(p.final_collect),
                final_pages_ms: ms(p.final_pages),
                state_ms: ms(p.state),
                ready_wait_ms: ms(p.ready_wait),
                dest_pages_ms: ms(p.dest_pages),
                ready_return_ms: ms(p.ready_return),
                dest_verify_ms: ms(p.dest_verify),
                dest_restore_ms: ms(p.dest_restore),
                go_to_resume_ms: ms(p.go_to_resume),
                dest_resume_ms: ms(p.dest_resume),
                pre_go_ms: ms(p.pre_go),
            },
            guest_bytes: s.guest_bytes,
            wire_bytes: s.wire_bytes,
            memory_bytes: s.memory_bytes,
            pages: s.pages,
            throughput_bytes_per_sec: s.throughput_bytes_per_sec,
            wire_bytes_per_sec: s.wire_bytes_per_sec,
            max_throttle_percent: s.max_throttle_percent,
            converge: s.converge.as_str().to_owned(),
            converge_switches: s.converge_switches.clone(),
            vcpu_max_throttle_percent: s.vcpu_max_throttle_percent.clone(),
            vcpu_dirty_pages: s.vcpu_dirty_pages.clone(),
            memory_digest: s.memory_digest,
            region_digests: s.region_digests.iter().map(Into::into).collect(),
            dirty_log: s.dirty_log.to_owned(),
            downtime_limit_ms: ms(s.downtime_limit),
            over_limit_ms: ms(s.over_limit),
            torn_pages_resent: s.torn_pages_resent,
            final_round: (&s.final_round).into(),
        }
    }
}

impl From<&ferry_engine::DestinationSummary> for ReceivedSummary {
    fn from(s: &ferry_engine::DestinationSummary) -> Self {
        Self {
            rounds: s.rounds,
            pages: s.pages,
            wire_bytes: s.wire_bytes,
            wire_bytes_per_lane: s.wire_bytes_per_lane.clone(),
            memory_digest: s.memory_digest,
            region_digests: s.region_digests.iter().map(Into::into).collect(),
            resumed_at_unix_ns: s.resumed_at_unix_ns,
            verify_ms: ms(s.verify),
            restore_ms: ms(s.restore),
            total_ms: ms(s.total),
        }
    }
}

impl Event {
    /// The client-facing form of an engine event; `None` for `Completed`
    /// (its summary arrives in the `done` reply).
    pub fn from_engine(e: &ferry_engine::ProgressEvent) -> Option<Self> {
        use ferry_engine::ProgressEvent as P;
        Some(match e {
            P::Started {
                pages,
                guest_bytes,
                dirty_log,
                workers,
            } => Event::Started {
                pages: *pages,
                guest_bytes: *guest_bytes,
                dirty_log: (*dirty_log).to_owned(),
                workers: *workers,
            },
            P::RoundProgress {
                round,
                pages_done,
                pages_total,
                wire_bytes,
            } => Event::RoundProgress {
                round: *round,
                pages_done: *pages_done,
                pages_total: *pages_total,
                wire_bytes: *wire_bytes,
            },
            P::RoundFinished {
                round,
                pages,
                encodings,
                wire_bytes,
                duration,
                dirty_pages,
                throttle_percent,
                vcpu_throttles,
                vcpu_dirty_pages,
                assessment,
                encoding,
            } => Event::RoundFinished {
                round: *round,
                pages: *pages,
                encodings: *encodings,
                wire_bytes: *wire_bytes,
                duration_ms: ms(*duration),
                dirty_pages: *dirty_pages,
                throttle_percent: *throttle_percent,
                vcpu_throttles: vcpu_throttles.clone(),
                vcpu_dirty_pages: vcpu_dirty_pages.clone(),
                assessment: Assessment {
                    dirty_rate_pages_per_sec: assessment.dirty_rate_pages_per_sec,
                    bandwidth_bytes_per_sec: assessment.bandwidth_bytes_per_sec,
                    bytes_left: assessment.bytes_left,
                    expected_downtime_ms: ms(assessment.expected_downtime),
                    shrinking: assessment.shrinking,
                    decision: assessment.decision,
                },
                encoding: Some(encoding.clone()),
            },
            P::StopAndCopy { dirty_pages } => Event::StopAndCopy {
                dirty_pages: *dirty_pages,
            },
            P::Handover { step } => Event::Handover {
                step: serde_json::to_value(step)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| format!("{step:?}")),
            },
            P::Abandoned { reason } => Event::Abandoned {
                reason: reason.clone(),
            },
            _ => return None,
        })
    }
}

/// Parses one request line (bounded, never panics: fuzzed).
pub fn parse_request(line: &[u8]) -> Result<Request, ControlError> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(ControlError::bad_request(format!(
            "request of {} bytes, more than the {MAX_REQUEST_BYTES} allowed",
            line.len()
        )));
    }
    serde_json::from_slice(line).map_err(|e| ControlError::bad_request(format!("bad request: {e}")))
}

/// Serde for a `u64` as a decimal string (JSON numbers are doubles to many
/// tools); a number is accepted too.
pub mod u64_string {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `v` as a string.
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// Reads a string (or a number) as a `u64`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            S(String),
            N(u64),
        }
        match Either::deserialize(d)? {
            Either::S(s) => s.parse().map_err(serde::de::Error::custom),
            Either::N(n) => Ok(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_ops_are_refused() {
        let req = Request::Set(Limits {
            max_bandwidth: Some(10 << 20),
            ..Limits::default()
        });
        let line = serde_json::to_vec(&req).unwrap();
        assert_eq!(parse_request(&line).unwrap(), req);
        assert_eq!(
            parse_request(br#"{"op":"resolve","action":"resume"}"#).unwrap(),
            Request::Resolve {
                action: ResolveAction::Resume
            }
        );
        for bad in [
            &b"{\"op\":\"explode\"}"[..],
            b"",
            b"null",
            b"\xff\xfe",
            b"{\"op\":\"migrate\"}",
        ] {
            let e = parse_request(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest, "{bad:?}");
        }
    }

    #[test]
    fn a_migrate_request_reads_its_limits_flat() {
        let r = parse_request(
            br#"{"op":"migrate","to":"h:1","security":{"mode":"insecure"},"max_downtime_ms":5,"deadline_s":2.5}"#,
        )
        .unwrap();
        let Request::Migrate(m) = r else {
            panic!("{r:?}")
        };
        assert_eq!(m.limits.max_downtime_ms, Some(5));
        assert_eq!(m.limits.deadline_s, Some(2.5));
        assert_eq!(m.security, Some(SecuritySpec::Insecure));
    }

    #[test]
    fn a_status_reply_carries_the_vcpu_state_typed() {
        let reply = StatusReply {
            role: Role::Source,
            state: GuestHome::Here,
            run_state: Some(RunState::Failed("triple fault".into())),
            status: None,
        };
        let text = serde_json::to_string(&reply).unwrap();
        assert!(
            text.contains(r#""run_state":{"failed":"triple fault"}"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<StatusReply>(&text).unwrap(), reply);
        let running: Option<RunState> = serde_json::from_str(r#""running""#).unwrap();
        assert_eq!(running, Some(RunState::Running));
    }

    #[test]
    fn an_oversized_request_is_refused_unread() {
        let big = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert!(parse_request(&big).is_err());
    }

    #[test]
    fn the_digest_travels_as_a_string_and_survives() {
        let s = ReceivedSummary {
            rounds: 1,
            pages: EncodingCounts::default(),
            wire_bytes: 1,
            wire_bytes_per_lane: vec![1],
            memory_digest: u64::MAX - 1,
            region_digests: vec![RegionDigest {
                guest_phys_addr: 4 << 30,
                bytes: 1 << 30,
                digest: u64::MAX - 2,
            }],
            resumed_at_unix_ns: 1,
            verify_ms: 0.0,
            restore_ms: 0.0,
            total_ms: 0.0,
        };
        let line = serde_json::to_string(&s).unwrap();
        assert!(
            line.contains(r#""memory_digest":"18446744073709551614""#),
            "{line}"
        );
        assert!(
            line.contains(r#""region_digests":[{"guest_phys_addr":4294967296,"bytes":1073741824,"digest":"18446744073709551613"}]"#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<ReceivedSummary>(&line).unwrap(), s);
    }

    #[test]
    fn an_event_from_a_newer_server_is_not_a_reply_this_client_reads() {
        // The client skips these (client::Replies); they must not parse as
        // something else.
        let line = r#"{"reply":"event","event":"teleported","to":"mars"}"#;
        assert!(serde_json::from_str::<Reply>(line).is_err());
    }

    /// The control types mirror the engine's (they read back, with
    /// milliseconds and owned strings): what `ferry_control::json` writes
    /// from each must be the same JSON, so a field the engine gains is
    /// not lost on the socket.
    #[test]
    fn the_mirrors_of_the_engine_types_carry_every_field() {
        use ferry_engine::encode::{choose_encoding, EncodingChoice, EncodingInputs};
        use ferry_engine::{DowntimeBreakdown, HandoverStep, ProgressEvent};
        let same = |engine: String, control: String| {
            let engine: serde_json::Value = serde_json::from_str(&engine).unwrap();
            let control: serde_json::Value = serde_json::from_str(&control).unwrap();
            assert_eq!(engine, control);
        };
        let d = |n: u64| Duration::from_micros(n * 1_001);
        let summary = ferry_engine::MigrationSummary {
            rounds: 3,
            total: d(900),
            downtime: d(2),
            downtime_parts: DowntimeBreakdown {
                pause: d(1),
                vcpu_stop_spread: d(2),
                final_collect: d(3),
                final_pages: d(4),
                state: d(5),
                ready_wait: d(6),
                dest_pages: d(7),
                ready_return: d(8),
                dest_verify: d(9),
                dest_restore: d(10),
                go_to_resume: d(11),
                dest_resume: d(12),
                pre_go: d(13),
            },
            guest_bytes: 1 << 40,
            wire_bytes: 1 << 39,
            memory_bytes: 1 << 30,
            pages: EncodingCounts {
                zero: 1,
                unchanged: 2,
                xor_delta: 3,
                lz4: 4,
                raw: 5,
                zstd: 6,
            },
            throughput_bytes_per_sec: 1.5e9,
            wire_bytes_per_sec: 0.5e9,
            max_throttle_percent: 60,
            converge: ferry_engine::ConvergeMode::DirtyLimit,
            converge_switches: vec![ferry_engine::ConvergeSwitch {
                after_round: 2,
                to: ferry_engine::ConvergeMode::AutoConverge,
            }],
            vcpu_max_throttle_percent: vec![60, 0],
            vcpu_dirty_pages: vec![9, 1],
            memory_digest: u64::MAX - 5,
            region_digests: vec![ferry_engine::RegionDigest {
                guest_phys_addr: 0,
                bytes: 1 << 30,
                digest: u64::MAX - 6,
            }],
            dirty_log: "kvm-ring",
            downtime_limit: d(20),
            over_limit: d(0),
            torn_pages_resent: 17,
            final_round: ferry_engine::FinalRound {
                expected_pages: 120,
                expected_bytes: 500_000,
                expected_bandwidth_bytes_per_sec: 5e7,
                expected: d(10),
                pages: 130,
                wire_bytes: 540_000,
                encode: d(3),
            },
        };
        same(
            crate::json::to_string(&summary).unwrap(),
            crate::json::to_string(&Summary::from(&summary)).unwrap(),
        );
        let received = ferry_engine::DestinationSummary {
            rounds: 3,
            pages: summary.pages,
            wire_bytes: 1 << 39,
            wire_bytes_per_lane: vec![1 << 38, 1 << 38],
            memory_digest: u64::MAX - 5,
            region_digests: summary.region_digests.clone(),
            resumed_at_unix_ns: u64::MAX - 7,
            verify: d(3),
            restore: d(4),
            total: d(800),
        };
        same(
            crate::json::to_string(&received).unwrap(),
            crate::json::to_string(&ReceivedSummary::from(&received)).unwrap(),
        );
        let inputs = EncodingInputs::prior(Some(1e8), 2);
        let events = [
            ProgressEvent::Started {
                pages: 262_144,
                guest_bytes: 1 << 30,
                dirty_log: "kvm-bitmap",
                workers: 2,
            },
            ProgressEvent::RoundProgress {
                round: 1,
                pages_done: 7,
                pages_total: 9,
                wire_bytes: 11,
            },
            ProgressEvent::RoundFinished {
                round: 2,
                pages: 9,
                encodings: summary.pages,
                wire_bytes: 1 << 33,
                duration: d(40),
                dirty_pages: 5,
                throttle_percent: 30,
                vcpu_throttles: vec![30, 0],
                vcpu_dirty_pages: vec![5, 0],
                assessment: ferry_engine::progress::AssessmentEvent {
                    dirty_rate_pages_per_sec: 100.0,
                    bandwidth_bytes_per_sec: 1e9,
                    bytes_left: 20_480,
                    expected_downtime: d(3),
                    shrinking: true,
                    decision: Decision::LimitVcpus {
                        vcpus: 1,
                        max_percent: 30,
                    },
                },
                encoding: Box::new(choose_encoding(&inputs, EncodingChoice::Raw)),
            },
            ProgressEvent::StopAndCopy { dirty_pages: 3 },
            ProgressEvent::Handover {
                step: HandoverStep::StateSent,
            },
            ProgressEvent::Abandoned {
                reason: "deadline".into(),
            },
        ];
        for e in &events {
            let mirrored = Event::from_engine(e).expect("a client event");
            same(
                crate::json::to_string(e).unwrap(),
                crate::json::to_string(&mirrored).unwrap(),
            );
        }
        let done = ProgressEvent::Completed {
            summary: Box::new(summary),
        };
        assert!(
            Event::from_engine(&done).is_none(),
            "its summary comes in `done`"
        );
    }

    #[test]
    fn decisions_read_as_words() {
        assert_eq!(decision_words(&Decision::StopAndCopy), "stop and copy");
        assert!(decision_words(&Decision::Throttle { percent: 40 }).contains("40 %"));
    }
}
