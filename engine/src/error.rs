//! What can go wrong in a migration.

use std::time::Duration;

use ferry_dirtylog::DirtyLogError;
use ferry_transport::{FrameError, FrameKind, TransportError};

use crate::encode::DecodeError;
use crate::layout::LayoutError;
use crate::protocol::MessageError;
use crate::vm::VmOpError;

/// Why a migration failed. Unless the variant says otherwise, on the source
/// the guest is running again (resumed if it had been paused, throttle
/// removed) when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Cancelled through [`MigrationSteering`](crate::MigrationSteering)
    /// before GO.
    #[error("cancelled by the operator")]
    Cancelled,
    /// A frame could not be sent: the peer is gone or the link broke.
    #[error("could not send to the peer")]
    Send(#[source] TransportError),
    /// A frame could not be received: the peer is gone or the link broke.
    #[error("could not receive from the peer")]
    Receive(#[source] TransportError),
    /// The peer closed the connection in the middle of the migration.
    #[error("the peer closed the connection during {during}")]
    PeerClosed {
        /// What was going on.
        during: &'static str,
    },
    /// One lane of a multi-lane session failed (the others were fine so far).
    #[error("lane {lane} failed")]
    LaneFailed {
        /// The lane's index.
        lane: usize,
        /// What happened on it.
        #[source]
        cause: Box<MigrationError>,
    },
    /// A frame with flags its kind does not use (the frame checksum's
    /// coverage depends on them).
    #[error("received a {kind} frame with unexpected flags {flags:#x}")]
    UnexpectedFlags {
        /// The frame's kind.
        kind: FrameKind,
        /// The flags found.
        flags: u32,
    },
    /// A frame failed validation (checksum, magic, length, kind).
    #[error("received a corrupt frame")]
    CorruptFrame(#[source] FrameError),
    /// The peer speaks another version of the frame format or stream.
    #[error("the peer speaks protocol version {theirs}, this side speaks {ours}")]
    VersionMismatch {
        /// Our version.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// A message payload did not parse.
    #[error("received a malformed message")]
    Message(#[source] MessageError),
    /// A page batch did not decode.
    #[error("received a page batch that does not decode")]
    Decode(#[source] DecodeError),
    /// A frame that does not belong at this point of the protocol.
    #[error("expected {expected}, received a {got} frame")]
    UnexpectedFrame {
        /// What the protocol wanted.
        expected: &'static str,
        /// What came.
        got: FrameKind,
    },
    /// The peer gave up and said why.
    #[error("the peer aborted the migration: {0}")]
    PeerAborted(String),
    /// The memory layout offered is unusable.
    #[error("unusable memory layout")]
    Layout(#[source] LayoutError),
    /// The destination's caller could not create the VM.
    #[error("could not create the destination VM")]
    MakeVm(#[source] VmOpError),
    /// The destination VM could not create the vCPUs the source's Hello
    /// announced (before any page moved: the guest stays on the source).
    #[error("could not create the {count} vCPU(s) the source announced")]
    PrepareVcpus {
        /// The vCPU count in the Hello.
        count: u32,
        /// Why.
        #[source]
        source: VmOpError,
    },
    /// The dirty log could not be created.
    #[error("could not create the dirty log")]
    CreateDirtyLog(#[source] VmOpError),
    /// The dirty log failed.
    #[error("dirty log failed")]
    DirtyLog(#[source] DirtyLogError),
    /// Pausing the guest failed.
    #[error("could not pause the guest")]
    Pause(#[source] VmOpError),
    /// Dirty-limit could not throttle a vCPU.
    #[error("could not throttle vCPU {vcpu}")]
    ThrottleVcpu {
        /// The vCPU.
        vcpu: usize,
        /// Why.
        #[source]
        source: VmOpError,
    },
    /// Dirty-limit was asked for, but the dirty log does not count pages
    /// per vCPU.
    #[error("dirty-limit needs a dirty log that counts pages per vCPU (the KVM dirty ring); the {dirty_log} log does not: use auto-converge or the dirty ring")]
    DirtyLimitUnsupported {
        /// The dirty log backend in use.
        dirty_log: &'static str,
    },
    /// Resuming the guest failed.
    #[error("could not resume the guest")]
    Resume(#[source] VmOpError),
    /// Saving the vCPU/device state failed.
    #[error("could not save the guest state")]
    SaveState(#[source] VmOpError),
    /// Restoring the vCPU/device state failed.
    #[error("could not restore the guest state")]
    RestoreState(#[source] VmOpError),
    /// The device state sections are refused (unknown, newer, too large,
    /// corrupt): before Ready, so the guest stays on the source.
    #[error("refused the guest's device state")]
    Sections(#[source] crate::sections::SectionError),
    /// Guest memory could not be read or written at a page.
    #[error("guest memory access failed at page {page}")]
    GuestMemory {
        /// The page index.
        page: u64,
    },
    /// Source: a raw page arrived torn (its bytes did not match its hash)
    /// but the guest did not write it after it was read: no tearing write
    /// explains it, so its bytes were corrupted on the way or in memory.
    #[error("page {page} arrived torn in round {round} but the guest did not write it again: corrupted on the way (not a torn send)")]
    TornPageNotRewritten {
        /// The page index.
        page: u64,
        /// The round whose copy arrived torn.
        round: u32,
    },
    /// Destination: when the Digest arrived, pages were still torn (their
    /// last copy did not match its hash and no later copy came). In the
    /// final round the guest is paused, so that is corruption.
    #[error("{count} page(s) still torn at the handover (page {page}, torn in round {round}, first): their last copy did not match its hash and was not sent again")]
    TornAtHandover {
        /// How many pages.
        count: usize,
        /// The lowest such page.
        page: u64,
        /// The round whose copy of `page` arrived torn.
        round: u32,
    },
    /// The destination's memory digest differs from the source's.
    #[error("memory digest mismatch: source {source_digest:#018x}, destination {destination_digest:#018x}{}", differing_text(differing_regions))]
    DigestMismatch {
        /// The source's digest.
        source_digest: u64,
        /// The destination's digest.
        destination_digest: u64,
        /// Guest-physical starts of the memory regions whose digests differ
        /// (empty when not known, e.g. on the source).
        differing_regions: Vec<u64>,
    },
    /// The deadline passed while a round was still being sent: the link
    /// (or the destination) moved too little, whatever the guest dirtied.
    #[error("the {deadline:?} deadline passed during round {round} with {pages_done} of {pages_total} pages sent (no page went out for the last {stalled_for:?}): the link or the destination is too slow or stalled")]
    DeadlineDuringRound {
        /// The deadline.
        deadline: Duration,
        /// The round being sent.
        round: u32,
        /// Pages of the round handled.
        pages_done: u64,
        /// Pages the round had to handle.
        pages_total: u64,
        /// Time since the last chunk of pages went out.
        stalled_for: Duration,
    },
    /// The migration did not converge before the deadline.
    #[error("did not converge within the {deadline:?} deadline ({rounds} rounds, {dirty_pages} pages still dirty)")]
    DeadlineExceeded {
        /// The deadline.
        deadline: Duration,
        /// Rounds run.
        rounds: u32,
        /// Dirty pages left.
        dirty_pages: u64,
    },
    /// The peer did not answer in time.
    #[error("no {waiting_for} from the peer within {timeout:?}")]
    Timeout {
        /// What was awaited.
        waiting_for: &'static str,
        /// How long we waited.
        timeout: Duration,
    },
    /// With the guest paused, the stop-and-copy did not reach GO within
    /// the downtime budget plus the pause margin (see
    /// `MigrationOptions::pause_margin`).
    #[error("the stop-and-copy did not finish within the {budget:?} downtime budget plus the {margin:?} margin (waiting for {waiting_for}); the guest runs here again")]
    PauseBudgetExceeded {
        /// The downtime budget.
        budget: Duration,
        /// The margin on top.
        margin: Duration,
        /// What was still awaited.
        waiting_for: &'static str,
    },
    /// After GO the destination answered that it did not resume the guest
    /// (it refused GO, failed to resume, or had given up): it never will,
    /// and the guest runs here again.
    #[error(
        "the destination did not resume the guest after GO: {reason}; the guest runs here again"
    )]
    HandoverRefused {
        /// The destination's reason.
        reason: String,
    },
    /// GO came after this destination had given up on the migration (a
    /// question about the outcome, or its own failure, came first).
    #[error("GO arrived after this destination had refused the handover: {0}")]
    GoAfterRefusal(String),
    /// GO was sent, no answer came, and the destination could not be asked
    /// again over a fresh connection: the guest may be running there. The
    /// source guest stays **paused** until someone resolves it
    /// (`handover::resolve_in_doubt`).
    #[error("handover in doubt after GO: {reason}; the source guest stays paused until resolved (migration {migration_id:#x})")]
    InDoubt {
        /// What happened after GO.
        reason: String,
        /// The migration, as the destination knows it.
        migration_id: u64,
    },
    /// The pre-pause hook ([`crate::MigrationOptions::pre_pause`])
    /// refused: the migration is abandoned before the pause (so before
    /// GO); the guest runs on here unless `keep_paused`.
    #[error("migration stopped before the pause: {reason}{}", if *keep_paused { "; the source guest is paused and stays so" } else { "" })]
    PrePauseRefused {
        /// Why.
        reason: String,
        /// The guest is paused here and stays so.
        keep_paused: bool,
        /// The migration, as the destination knows it.
        migration_id: u64,
    },
    /// The pre-GO hook ([`crate::MigrationOptions::pre_go`]) refused GO:
    /// the migration is abandoned before GO; the guest is resumed here
    /// unless `keep_paused`.
    #[error("GO withheld: {reason}{}", if *keep_paused { "; the source guest stays paused" } else { "" })]
    PreGoRefused {
        /// Why.
        reason: String,
        /// The guest stays paused here.
        keep_paused: bool,
        /// The migration, as the destination knows it.
        migration_id: u64,
    },
    /// An engine thread panicked.
    #[error("an engine worker thread panicked")]
    WorkerPanicked,
}

impl MigrationError {
    /// Classify a receive error: corruption, version and clean close get
    /// their own variants.
    pub(crate) fn from_receive(err: TransportError, during: &'static str) -> Self {
        match err {
            TransportError::PeerClosed => Self::PeerClosed { during },
            // A peer that died (a killed process) resets the connection:
            // the same story for the user as a clean close.
            TransportError::Read(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                Self::PeerClosed { during }
            }
            TransportError::Corrupt(FrameError::UnsupportedVersion { found }) => {
                Self::VersionMismatch {
                    ours: u32::from(ferry_transport::PROTOCOL_VERSION),
                    theirs: u32::from(found),
                }
            }
            TransportError::Corrupt(frame) => Self::CorruptFrame(frame),
            other => Self::Receive(other),
        }
    }

    /// True when the source guest was left paused (handover in doubt).
    pub fn source_left_paused(&self) -> bool {
        self.paused_migration().is_some()
    }

    /// The migration's id (as the destination knows it) when the source
    /// guest was left paused: what to ask the destination about, e.g.
    /// through [`crate::HandoverRecord::answer`] on its side.
    pub fn paused_migration(&self) -> Option<u64> {
        match self {
            Self::InDoubt { migration_id, .. }
            | Self::PrePauseRefused {
                keep_paused: true,
                migration_id,
                ..
            }
            | Self::PreGoRefused {
                keep_paused: true,
                migration_id,
                ..
            } => Some(*migration_id),
            _ => None,
        }
    }
}

fn differing_text(regions: &[u64]) -> String {
    if regions.is_empty() {
        return String::new();
    }
    let list: Vec<String> = regions.iter().map(|a| format!("{a:#x}")).collect();
    format!(" (in the region(s) at {})", list.join(", "))
}
