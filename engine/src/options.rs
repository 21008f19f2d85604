//! Knobs of a migration.

use std::time::Duration;

use ferry_transport::lanes::PreparedBuffers;

use crate::convergence::ConvergencePolicy;
use crate::error::MigrationError;
use crate::handover::HandoverRecord;

/// The default XOR-delta cache is guest memory divided by this: large
/// enough to hold the working set of a guest that rewrites a quarter of its
/// memory (QEMU's xbzrle gets the same share in `ferry bench`; its own
/// default of 64 MiB caught about 1 % of the re-sent pages of a 256 MiB
/// working set).
pub const XOR_CACHE_GUEST_SHARE: u64 = 4;

/// The default [`MigrationOptions::pause_margin`]: long enough for a
/// loaded host to finish a stop-and-copy that fit the budget, short enough
/// that a stalled link never holds a paused guest for long.
pub const DEFAULT_PAUSE_MARGIN: Duration = Duration::from_secs(1);

/// Source-side options.
#[derive(Debug, Clone)]
pub struct MigrationOptions {
    /// Downtime limit, deadline, auto-converge.
    pub convergence: ConvergencePolicy,
    /// Cap on wire bytes per second (`None`: as fast as the link goes).
    pub max_bandwidth: Option<u64>,
    /// Encoder threads (at least 1).
    pub workers: usize,
    /// Size of the XOR-delta cache of earlier page copies: `Some(0)`
    /// disables XOR deltas; `None` (the default) sizes it to
    /// [`XOR_CACHE_GUEST_SHARE`] of guest memory. The cache only fills with
    /// pages sent again after round 0, so an idle guest costs nothing.
    pub xor_cache_bytes: Option<usize>,
    /// Offer LZ4 compression of pages (false: pages that are not zero,
    /// unchanged or a delta go raw).
    pub compress: bool,
    /// Target size of one page batch frame (default 1 MiB: with raw pages
    /// sent from guest memory a batch is one `sendmsg` of 256 page iovecs
    /// and one decoder job; 256 KiB batches cost the lane writers more
    /// system calls and hand-offs, 64 KiB ones more still).
    pub batch_bytes: usize,
    /// How long to wait for the HelloAck, and for a lane to take a control
    /// frame before the guest is paused. (From the pause on, waits are
    /// bounded by the downtime budget plus [`Self::pause_margin`].)
    pub handover_timeout: Duration,
    /// From the pause on, every wait (the last pages, the state, READY,
    /// RUNNING) ends by the downtime budget plus this margin: a
    /// stop-and-copy that cannot finish by then is aborted before GO and the
    /// guest resumes here. After GO without an answer, the destination is
    /// asked again over a fresh connection for at most this long too.
    pub pause_margin: Duration,
    /// Called after READY, right before GO, with the guest paused: GO is
    /// sent only when it agrees (e.g. the VM's ownership record moved to
    /// the destination). Its time is part of the pause
    /// ([`DowntimeBreakdown::pre_go`](crate::DowntimeBreakdown::pre_go)).
    pub pre_go: Option<PreGoHook>,
    /// Called once the last live round decided on the pause, right before
    /// it, with the guest still running: the pause (and so GO) follows
    /// only when it agrees, e.g. the VM's ownership record moved to the
    /// destination, at no cost to the pause: what the guest dirtied while
    /// it ran goes out in one more live round after it, so the pause
    /// sends only what the guest dirties during that round. A refusal
    /// abandons the migration ([`crate::MigrationError::PrePauseRefused`])
    /// with the guest running here, or paused when it says `keep_paused`.
    pub pre_pause: Option<PreGoHook>,
}

/// Why a [`PreGoHook`] refused GO.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct PreGoRefusal {
    /// Why.
    pub reason: String,
    /// The source may not resume its guest either (it no longer owns it,
    /// or cannot tell): it stays paused, as after a GO in doubt.
    pub keep_paused: bool,
}

/// Where a [`PreGoHook`] runs: names the error its refusal ends the
/// migration with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HookPoint {
    /// [`MigrationOptions::pre_pause`]: before the pause, the guest running.
    PrePause,
    /// [`MigrationOptions::pre_go`]: after READY, right before GO, the
    /// guest paused.
    PreGo,
}

impl PreGoRefusal {
    /// The error that ends migration `migration_id` when the hook at
    /// `point` refused.
    pub(crate) fn into_error(self, point: HookPoint, migration_id: u64) -> MigrationError {
        let Self {
            reason,
            keep_paused,
        } = self;
        match point {
            HookPoint::PrePause => MigrationError::PrePauseRefused {
                reason,
                keep_paused,
                migration_id,
            },
            HookPoint::PreGo => MigrationError::PreGoRefused {
                reason,
                keep_paused,
                migration_id,
            },
        }
    }
}

/// The source's last word before GO: `Ok` sends GO; a refusal abandons
/// the migration ([`crate::MigrationError::PreGoRefused`], or
/// [`crate::MigrationError::PrePauseRefused`] as the pre-pause hook) and
/// resumes the guest here unless the refusal says to keep it paused. Called once, on
/// the migration's thread; as [`MigrationOptions::pre_go`] keep it short:
/// the guest is paused (as [`MigrationOptions::pre_pause`] it is not).
#[derive(Clone)]
pub struct PreGoHook(pub std::sync::Arc<dyn Fn() -> Result<(), PreGoRefusal> + Send + Sync>);

impl PreGoHook {
    /// A hook running `f`.
    pub fn new(f: impl Fn() -> Result<(), PreGoRefusal> + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(f))
    }
}

impl std::fmt::Debug for PreGoHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreGoHook")
    }
}

impl MigrationOptions {
    /// The XOR-delta cache size for a guest of `guest_bytes`.
    pub fn xor_cache_bytes_for(&self, guest_bytes: u64) -> usize {
        self.xor_cache_bytes.unwrap_or_else(|| {
            usize::try_from(guest_bytes / XOR_CACHE_GUEST_SHARE).unwrap_or(usize::MAX)
        })
    }
}

impl Default for MigrationOptions {
    fn default() -> Self {
        Self {
            convergence: ConvergencePolicy::default(),
            max_bandwidth: None,
            workers: 2,
            xor_cache_bytes: None,
            compress: true,
            batch_bytes: DEFAULT_BATCH_BYTES,
            handover_timeout: Duration::from_secs(30),
            pause_margin: DEFAULT_PAUSE_MARGIN,
            pre_go: None,
            pre_pause: None,
        }
    }
}

/// Destination-side options.
#[derive(Debug, Clone)]
pub struct DestinationOptions {
    /// Give up when the source sends nothing for this long.
    pub idle_timeout: Duration,
    /// After READY, give up (for good: the handover is refused) when no GO
    /// came in this long. The source's own wait is shorter (its downtime
    /// budget plus margin); it then asks what happened.
    pub go_timeout: Duration,
    /// What this destination did with each migration's GO, to answer a
    /// source that asks afterwards (`Resolve`). Share one record between
    /// every session a destination process accepts.
    pub record: HandoverRecord,
    /// The lanes' read buffers, made ready while the destination waits
    /// ([`DestinationOptions::prepare_lane_buffers`]); the next incoming
    /// session takes them (one per lane, as far as they go). Empty: each
    /// lane grows its own as its first frame comes.
    pub lane_buffers: PreparedBuffers,
}

impl DestinationOptions {
    /// Makes ready, now, one read buffer per lane that a source on this
    /// host would open by default (a source elsewhere may open more or
    /// fewer; lanes beyond them grow their own), each sized for a default
    /// page batch: as a waiting destination prepares guest memory, so that
    /// the first batches do not fault their buffers in 4 KiB at a time
    /// while the migration's threads compete for the cores (see
    /// BENCHMARKS.md, session 19).
    pub fn prepare_lane_buffers(&self) {
        self.lane_buffers.prepare(
            usize::from(ferry_transport::default_lane_count()),
            DEFAULT_BATCH_BYTES + LANE_BUFFER_SLACK,
        );
    }
}

/// [`MigrationOptions::batch_bytes`] by default.
const DEFAULT_BATCH_BYTES: usize = 1 << 20;

/// Room in a prepared lane buffer beyond a default batch's pages: the
/// batch's entry table and headers.
const LANE_BUFFER_SLACK: usize = 64 << 10;

impl Default for DestinationOptions {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            go_timeout: Duration::from_secs(10),
            record: HandoverRecord::default(),
            lane_buffers: PreparedBuffers::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_xor_cache_is_a_quarter_of_guest_memory() {
        let opts = MigrationOptions::default();
        assert_eq!(opts.xor_cache_bytes_for(2 << 30), 512 << 20);
        assert_eq!(opts.xor_cache_bytes_for(0), 0);
    }

    #[test]
    fn a_set_xor_cache_size_wins_whatever_the_guest() {
        let opts = MigrationOptions {
            xor_cache_bytes: Some(64 << 20),
            ..MigrationOptions::default()
        };
        assert_eq!(opts.xor_cache_bytes_for(2 << 30), 64 << 20);
        let off = MigrationOptions {
            xor_cache_bytes: Some(0),
            ..MigrationOptions::default()
        };
        assert_eq!(off.xor_cache_bytes_for(2 << 30), 0);
    }
}
