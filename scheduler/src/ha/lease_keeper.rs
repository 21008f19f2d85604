//! Keeps a host's lease alive and fences the host when it cannot.
//!
//! The lease cannot expire, as etcd sees it, before `ttl` after the last
//! renewal that etcd accepted was *sent* (etcd restarts the TTL when it
//! receives the renewal, which is after we sent it). So the keeper knows a
//! deadline no later than the real expiry: the send time of its last
//! accepted renewal plus the TTL granted. If it has not renewed by
//! `deadline - margin`, it stops trying and calls the fence action (pause
//! or kill the host's VMs) while the lease is still alive: by the time any
//! other host may see the lease expire and restart those VMs, this host no
//! longer runs them. Proxmox's watchdog self-fencing, without the reboot.
//!
//! `margin` must cover the fence action itself (pausing or killing the
//! VMs) plus clock rate drift between the host and etcd over one TTL.
//! Each renewal is given only the time left before the fence point, so a
//! hung etcd connection cannot delay the fence.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use crate::daemon::agent::error_chain;
use crate::store::{ClusterStore, HostLease, StoreError};

/// What fencing does to the host's VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FenceMode {
    /// Pause them: memory kept, resumable if the host still owns them
    /// when it is back.
    #[default]
    Pause,
    /// Kill them.
    Kill,
}

impl std::str::FromStr for FenceMode {
    type Err = KeeperError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pause" => Ok(Self::Pause),
            "kill" => Ok(Self::Kill),
            _ => Err(KeeperError::BadFenceMode(s.to_owned())),
        }
    }
}

/// How the keeper renews and when it fences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeeperConfig {
    /// The lease TTL asked for (etcd may grant more).
    pub ttl: Duration,
    /// Fence this long before the earliest possible expiry.
    pub margin: Duration,
    /// Renew this often while renewals succeed.
    pub renew_every: Duration,
    /// Wait between failed renewals.
    pub retry_every: Duration,
    /// What fencing does.
    pub mode: FenceMode,
}

impl KeeperConfig {
    /// Timings scaled to `ttl`: fence 2/5 of it before expiry, renew every
    /// fifth of it (so two renewals may fail before fencing), retry every
    /// 1/25 of it.
    pub fn for_ttl(ttl: Duration, mode: FenceMode) -> Self {
        Self {
            ttl,
            margin: ttl * 2 / 5,
            renew_every: ttl / 5,
            retry_every: (ttl / 25).max(Duration::from_millis(20)),
            mode,
        }
    }
}

impl Default for KeeperConfig {
    /// TTL 5 s, fence 2 s before expiry, renew every second, pause.
    fn default() -> Self {
        Self::for_ttl(Duration::from_secs(5), FenceMode::Pause)
    }
}

/// Why the keeper fenced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceReason {
    /// No renewal succeeded before the fence point; the last error.
    RenewalsFailed {
        /// The last renewal's error.
        last_error: String,
    },
    /// etcd answered that the lease had already expired.
    LeaseExpired,
}

/// What the fence action is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceEvent {
    /// The host.
    pub host: String,
    /// Pause or kill.
    pub mode: FenceMode,
    /// Why.
    pub reason: FenceReason,
    /// Time left before the earliest possible expiry when fencing began
    /// (zero for [`FenceReason::LeaseExpired`]).
    pub left: Duration,
}

/// The keeper's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeeperState {
    /// Renewing.
    Alive,
    /// Fenced; the keeper stopped. The host must stop or re-own its VMs
    /// and join again.
    Fenced(FenceEvent),
    /// Stopped by its owner.
    Stopped,
}

/// Why the keeper could not start.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// The timings cannot work.
    #[error("bad lease keeper timing: {0}")]
    BadConfig(&'static str),
    /// Not `pause` or `kill`.
    #[error("fence mode {0:?} is neither \"pause\" nor \"kill\"")]
    BadFenceMode(String),
    /// Joining the cluster (granting the lease) failed.
    #[error("cannot join the cluster")]
    Join(#[source] StoreError),
    /// The keeper thread could not start.
    #[error("cannot start the lease keeper thread")]
    Thread(#[source] std::io::Error),
}

/// The fence action: pauses or kills the host's VMs as the event says.
pub type FenceAction = Box<dyn FnMut(&FenceEvent) + Send>;

#[derive(Debug)]
struct Shared {
    state: Mutex<(KeeperState, bool)>, // (state, stop requested)
    cond: Condvar,
}

/// A running keeper (a thread). Dropping it stops renewing without
/// revoking the lease; [`LeaseKeeper::leave`] revokes it.
#[derive(Debug)]
pub struct LeaseKeeper {
    lease: HostLease,
    store: ClusterStore,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl LeaseKeeper {
    /// Joins `host` to the cluster with a new lease and keeps it alive,
    /// calling `fence` (once) if it cannot.
    pub fn start(
        store: ClusterStore,
        host: &str,
        cfg: KeeperConfig,
        fence: FenceAction,
    ) -> Result<Self, KeeperError> {
        if cfg.margin >= cfg.ttl {
            return Err(KeeperError::BadConfig(
                "margin must be shorter than the TTL",
            ));
        }
        if cfg.renew_every + cfg.margin >= cfg.ttl {
            return Err(KeeperError::BadConfig(
                "renew_every + margin must be shorter than the TTL",
            ));
        }
        if cfg.retry_every.is_zero() || cfg.renew_every.is_zero() {
            return Err(KeeperError::BadConfig(
                "renew and retry intervals must be > 0",
            ));
        }
        let asked = Instant::now();
        let lease = store.join(host, cfg.ttl).map_err(KeeperError::Join)?;
        let shared = Arc::new(Shared {
            state: Mutex::new((KeeperState::Alive, false)),
            cond: Condvar::new(),
        });
        let run = Renewal {
            store: store.clone(),
            lease: lease.clone(),
            cfg,
            deadline: asked + lease.ttl,
            fence,
            shared: shared.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("lease-{host}"))
            .spawn(move || run.run())
            .map_err(KeeperError::Thread)?;
        info!(host, lease = lease.lease, ttl = ?lease.ttl, margin = ?cfg.margin, "host lease granted");
        Ok(Self {
            lease,
            store,
            shared,
            thread: Some(thread),
        })
    }

    /// The lease kept.
    pub fn lease(&self) -> &HostLease {
        &self.lease
    }

    /// The state now.
    pub fn state(&self) -> KeeperState {
        lock(&self.shared).0.clone()
    }

    /// Waits up to `timeout` for the keeper to fence; the event if it did.
    pub fn wait_fenced(&self, timeout: Duration) -> Option<FenceEvent> {
        let g = lock(&self.shared);
        let (g, _) = self
            .shared
            .cond
            .wait_timeout_while(g, timeout, |s| s.0 == KeeperState::Alive)
            .unwrap_or_else(|e| e.into_inner());
        match &g.0 {
            KeeperState::Fenced(e) => Some(e.clone()),
            _ => None,
        }
    }

    /// Stops renewing and revokes the lease (an orderly leave: the host is
    /// dead to the cluster at once).
    pub fn leave(mut self) -> Result<(), StoreError> {
        self.stop();
        self.store.leave(&self.lease)
    }

    fn stop(&mut self) {
        {
            let mut g = lock(&self.shared);
            g.1 = true;
            if g.0 == KeeperState::Alive {
                g.0 = KeeperState::Stopped;
            }
        }
        self.shared.cond.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, (KeeperState, bool)> {
    s.state.lock().unwrap_or_else(|e| e.into_inner())
}

struct Renewal {
    store: ClusterStore,
    lease: HostLease,
    cfg: KeeperConfig,
    /// The earliest instant etcd may expire the lease.
    deadline: Instant,
    fence: FenceAction,
    shared: Arc<Shared>,
}

impl Renewal {
    fn run(mut self) {
        let host = self.lease.host.clone();
        let mut next = Instant::now() + self.cfg.renew_every;
        let mut last_error = String::from("no renewal attempted");
        loop {
            let fence_at = self
                .deadline
                .checked_sub(self.cfg.margin)
                .unwrap_or(self.deadline);
            let now = Instant::now();
            if now >= fence_at {
                let left = self.deadline.saturating_duration_since(now);
                self.fence(FenceReason::RenewalsFailed { last_error }, left);
                return;
            }
            if now >= next {
                let sent = Instant::now();
                match self.store.keep_alive(&self.lease, fence_at - sent) {
                    Ok(ttl) => {
                        self.deadline = sent + ttl;
                        next = sent + self.cfg.renew_every;
                        debug!(host, ?ttl, "host lease renewed");
                    }
                    Err(StoreError::LeaseExpired { .. }) => {
                        self.fence(FenceReason::LeaseExpired, Duration::ZERO);
                        return;
                    }
                    Err(e) => {
                        last_error = error_chain(&e);
                        warn!(host, error = %last_error, left = ?self.deadline.saturating_duration_since(Instant::now()), "host lease renewal failed");
                        next = Instant::now() + self.cfg.retry_every;
                    }
                }
                continue;
            }
            let g = lock(&self.shared);
            if g.1 {
                return;
            }
            let wait = next.min(fence_at).saturating_duration_since(now);
            let g = self
                .shared
                .cond
                .wait_timeout(g, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if g.1 {
                return;
            }
        }
    }

    fn fence(&mut self, reason: FenceReason, left: Duration) {
        let event = FenceEvent {
            host: self.lease.host.clone(),
            mode: self.cfg.mode,
            reason,
            left,
        };
        error!(host = %event.host, mode = ?event.mode, reason = ?event.reason, left = ?left, "fencing this host: its lease could not be renewed");
        (self.fence)(&event);
        lock(&self.shared).0 = KeeperState::Fenced(event);
        self.shared.cond.notify_all();
    }
}
