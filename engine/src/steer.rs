//! Steering a running migration from another thread: cancel it, or change
//! its limits while it runs (`migrate_cancel` and `migrate-set-parameters`
//! in QEMU's terms).
//!
//! A [`MigrationSteering`] is a cloneable handle. Give one clone to
//! [`SourceMigration::steered_by`](crate::SourceMigration::steered_by) and
//! keep the other; the source reads it between chunks of a round and
//! before each round:
//!
//! - [`cancel`](MigrationSteering::cancel) ends the migration with
//!   [`MigrationError::Cancelled`] and the guest running on the source, as
//!   any failure before GO. Once GO is on its way the source no longer owns
//!   the outcome, so a cancel then is refused ([`SteerError::TooLate`]); the
//!   check and GO are one atomic step, so a cancel is either honoured or
//!   refused, never lost.
//! - [`retune`](MigrationSteering::retune) changes the downtime limit, the
//!   bandwidth cap, the deadline or auto-converge. A bandwidth change takes
//!   effect on the next write; the others at the next round's decision.
//!   Once the guest is paused for the final copy there is nothing left to
//!   tune and a retune is refused.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_transport::lanes::TokenBucket;

use crate::convergence::ConvergencePolicy;
use crate::error::MigrationError;

/// Where the steered migration is, as far as steering goes.
const LIVE: u8 = 0;
/// A cancel was asked for and not yet acted on.
const CANCEL_ASKED: u8 = 1;
/// The guest is paused for the final copy (cancel still possible).
const PAUSED: u8 = 2;
/// GO is sent or about to be: the outcome is the destination's.
const COMMITTED: u8 = 3;
/// A cancel asked while paused (the guest resumes here).
const PAUSED_CANCEL_ASKED: u8 = 4;

/// New limits for a running migration; `None` keeps the current value.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Retune {
    /// Stop-and-copy once the expected downtime is at most this.
    pub max_downtime: Option<Duration>,
    /// Cap on wire bytes per second (at least 1).
    pub max_bandwidth: Option<u64>,
    /// Give up once the migration has run this long (from its start).
    pub deadline: Option<Duration>,
    /// Throttle the guest when rounds stop shrinking.
    pub auto_converge: Option<bool>,
    /// Dirty-limit: the rate each vCPU is slowed down towards, pages/s
    /// ([`ConvergencePolicy::vcpu_dirty_limit`]); in force from the next
    /// round, whenever dirty-limit is.
    pub vcpu_dirty_limit: Option<u64>,
}

impl Retune {
    /// Whether this changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Retune::default()
    }

    /// `policy` with this retune applied.
    pub fn apply(&self, policy: &ConvergencePolicy) -> ConvergencePolicy {
        let mut p = *policy;
        if let Some(d) = self.max_downtime {
            p.max_downtime = d;
        }
        if let Some(d) = self.deadline {
            p.deadline = Some(d);
        }
        if let Some(a) = self.auto_converge {
            p.auto_converge = a;
        }
        if let Some(l) = self.vcpu_dirty_limit {
            p.vcpu_dirty_limit = Some(l);
        }
        p
    }

    /// `self` with the fields `later` sets overridden by it.
    fn merge(self, later: Retune) -> Retune {
        Retune {
            max_downtime: later.max_downtime.or(self.max_downtime),
            max_bandwidth: later.max_bandwidth.or(self.max_bandwidth),
            deadline: later.deadline.or(self.deadline),
            auto_converge: later.auto_converge.or(self.auto_converge),
            vcpu_dirty_limit: later.vcpu_dirty_limit.or(self.vcpu_dirty_limit),
        }
    }
}

/// Why a steering request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SteerError {
    /// GO was sent: the guest is the destination's now (or in doubt).
    #[error("too late: GO was sent, the guest belongs to the destination now")]
    TooLate,
    /// The guest is paused for the final copy; limits no longer matter.
    #[error("too late to retune: the guest is paused for the final copy")]
    Paused,
    /// A bandwidth cap of zero would move nothing.
    #[error("a bandwidth cap of 0 bytes/s would never finish")]
    ZeroBandwidth,
}

#[derive(Debug, Default)]
struct Shared {
    state: AtomicU8,
    /// Limits asked for and not yet read by the round loop.
    pending: Mutex<Option<Retune>>,
    /// The session's token bucket, once the migration runs.
    bucket: Mutex<Option<Arc<TokenBucket>>>,
}

/// A handle to cancel or retune one migration; clones share it.
#[derive(Debug, Clone, Default)]
pub struct MigrationSteering {
    shared: Arc<Shared>,
}

impl MigrationSteering {
    /// A handle for a migration that has not started yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the migration to stop, the guest running on the source. Fails
    /// once GO is sent.
    pub fn cancel(&self) -> Result<(), SteerError> {
        let s = &self.shared.state;
        let mut cur = s.load(Ordering::Acquire);
        loop {
            let next = match cur {
                LIVE | CANCEL_ASKED => CANCEL_ASKED,
                PAUSED | PAUSED_CANCEL_ASKED => PAUSED_CANCEL_ASKED,
                _ => return Err(SteerError::TooLate),
            };
            match s.compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    /// Changes limits of the running migration (see the module docs).
    pub fn retune(&self, r: Retune) -> Result<(), SteerError> {
        if r.max_bandwidth == Some(0) {
            return Err(SteerError::ZeroBandwidth);
        }
        match self.shared.state.load(Ordering::Acquire) {
            LIVE | CANCEL_ASKED => {}
            PAUSED | PAUSED_CANCEL_ASKED => return Err(SteerError::Paused),
            _ => return Err(SteerError::TooLate),
        }
        if let Some(rate) = r.max_bandwidth {
            if let Some(b) = &*self.shared.bucket.lock().unwrap_or_else(|p| p.into_inner()) {
                b.set_rate(rate);
            }
        }
        let mut pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *pending = Some(pending.take().unwrap_or_default().merge(r));
        Ok(())
    }

    /// Whether a cancel was asked for.
    pub fn cancel_asked(&self) -> bool {
        matches!(
            self.shared.state.load(Ordering::Acquire),
            CANCEL_ASKED | PAUSED_CANCEL_ASKED
        )
    }

    /// The source's check between chunks: `Err(Cancelled)` once asked.
    pub(crate) fn check(&self) -> Result<(), MigrationError> {
        if self.cancel_asked() {
            Err(MigrationError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Limits asked for since the last call.
    pub(crate) fn take_retune(&self) -> Option<Retune> {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The session's bucket, so that bandwidth changes reach the lanes.
    pub(crate) fn attach_bucket(&self, bucket: Arc<TokenBucket>) {
        *self.shared.bucket.lock().unwrap_or_else(|p| p.into_inner()) = Some(bucket);
    }

    /// The guest is about to pause: retunes are refused from here on.
    pub(crate) fn pausing(&self) -> Result<(), MigrationError> {
        self.advance(PAUSED)
    }

    /// GO is about to be sent: cancels are refused from here on. Fails
    /// with `Cancelled` when a cancel came first.
    pub(crate) fn commit(&self) -> Result<(), MigrationError> {
        self.advance(COMMITTED)
    }

    fn advance(&self, to: u8) -> Result<(), MigrationError> {
        let s = &self.shared.state;
        let mut cur = s.load(Ordering::Acquire);
        loop {
            if matches!(cur, CANCEL_ASKED | PAUSED_CANCEL_ASKED) {
                return Err(MigrationError::Cancelled);
            }
            match s.compare_exchange(cur, to, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_before_go_wins_over_the_commit() {
        let s = MigrationSteering::new();
        s.cancel().unwrap();
        assert!(matches!(s.commit(), Err(MigrationError::Cancelled)));
    }

    #[test]
    fn a_cancel_after_go_is_refused() {
        let s = MigrationSteering::new();
        s.pausing().unwrap();
        s.commit().unwrap();
        assert_eq!(s.cancel(), Err(SteerError::TooLate));
        assert!(s.check().is_ok());
    }

    #[test]
    fn a_cancel_while_paused_is_honoured() {
        let s = MigrationSteering::new();
        s.pausing().unwrap();
        s.clone().cancel().unwrap();
        assert!(matches!(s.check(), Err(MigrationError::Cancelled)));
        assert!(matches!(s.commit(), Err(MigrationError::Cancelled)));
    }

    #[test]
    fn retunes_merge_until_read_and_reach_the_bucket_at_once() {
        let s = MigrationSteering::new();
        let bucket = Arc::new(TokenBucket::with_rate(1 << 30));
        s.attach_bucket(bucket.clone());
        s.retune(Retune {
            max_downtime: Some(Duration::from_millis(5)),
            ..Retune::default()
        })
        .unwrap();
        s.retune(Retune {
            max_bandwidth: Some(10 << 20),
            ..Retune::default()
        })
        .unwrap();
        assert_eq!(bucket.rate(), f64::from(10u32 << 20));
        let got = s.take_retune().unwrap();
        assert_eq!(got.max_downtime, Some(Duration::from_millis(5)));
        assert_eq!(got.max_bandwidth, Some(10 << 20));
        assert!(s.take_retune().is_none());
        let p = got.apply(&ConvergencePolicy::default());
        assert_eq!(p.max_downtime, Duration::from_millis(5));
    }

    #[test]
    fn retunes_are_refused_once_paused_and_zero_bandwidth_always() {
        let s = MigrationSteering::new();
        assert_eq!(
            s.retune(Retune {
                max_bandwidth: Some(0),
                ..Retune::default()
            }),
            Err(SteerError::ZeroBandwidth)
        );
        s.pausing().unwrap();
        assert_eq!(s.retune(Retune::default()), Err(SteerError::Paused));
    }
}
