//! Leader election among `ferry sched daemon` processes on one cluster
//! store: a thread campaigns until it leads, then keeps the leader lease
//! alive. It gives leadership up locally (stops acting) once a renewal has
//! not succeeded by `margin` before the lease's earliest possible expiry,
//! so a partitioned leader stops before another can be elected; its writes
//! are fenced by its token anyway ([`crate::store`]), so a leader that
//! acts a little late fails with [`StoreError::NotLeader`] and changes
//! nothing.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::daemon::agent::error_chain;
use crate::store::{ClusterStore, LeaderInfo, Leadership, StoreError};

/// Timings of the election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElectionConfig {
    /// Leader lease TTL: how long a dead leader blocks the next one.
    pub ttl: Duration,
    /// Stop acting this long before the lease's earliest expiry.
    pub margin: Duration,
    /// Renew (leading) or campaign (following) this often.
    pub every: Duration,
}

impl ElectionConfig {
    /// Timings scaled to `ttl`: renew or campaign every tenth of it, give
    /// up leading 2/5 of it before expiry.
    pub fn for_ttl(ttl: Duration) -> Self {
        Self {
            ttl,
            margin: ttl * 2 / 5,
            every: (ttl / 10).max(Duration::from_millis(50)),
        }
    }
}

#[derive(Debug, Default)]
struct Seat {
    leading: Option<Leadership>,
    /// When this candidate last became leader.
    since: Option<Instant>,
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    seat: Mutex<Seat>,
    cond: Condvar,
}

/// A candidate in the election (a thread). Dropping it stops campaigning
/// and resigns if it leads.
#[derive(Debug)]
pub struct Election {
    store: ClusterStore,
    candidate: String,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Why the election could not start.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// The thread could not start.
    #[error("cannot start the election thread")]
    Thread(#[source] std::io::Error),
    /// The candidate name cannot be a key.
    #[error("bad candidate name")]
    BadName(#[source] StoreError),
}

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Seat> {
    s.seat.lock().unwrap_or_else(|e| e.into_inner())
}

impl Election {
    /// Campaigns as `candidate` (serving its API at `api`) until stopped.
    pub fn start(
        store: ClusterStore,
        candidate: &str,
        api: Option<String>,
        cfg: ElectionConfig,
    ) -> Result<Self, ElectionError> {
        if candidate.is_empty() || candidate.contains('/') {
            return Err(ElectionError::BadName(StoreError::BadName {
                name: candidate.to_owned(),
            }));
        }
        let shared = Arc::new(Shared {
            seat: Mutex::new(Seat::default()),
            cond: Condvar::new(),
        });
        let run = Campaign {
            store: store.clone(),
            candidate: candidate.to_owned(),
            api,
            cfg,
            shared: shared.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("elect-{candidate}"))
            .spawn(move || run.run())
            .map_err(ElectionError::Thread)?;
        Ok(Self {
            store,
            candidate: candidate.to_owned(),
            shared,
            thread: Some(thread),
        })
    }

    /// This candidate's name.
    pub fn candidate(&self) -> &str {
        &self.candidate
    }

    /// The leadership this candidate holds now, if it leads.
    pub fn leadership(&self) -> Option<Leadership> {
        lock(&self.shared).leading.clone()
    }

    /// When this candidate became leader, if it leads.
    pub fn leading_since(&self) -> Option<Instant> {
        let s = lock(&self.shared);
        s.leading.as_ref().and(s.since)
    }

    /// Who leads, as the store says.
    pub fn leader(&self) -> Result<Option<LeaderInfo>, StoreError> {
        self.store.leader()
    }

    /// Waits up to `timeout` until this candidate leads.
    pub fn wait_leading(&self, timeout: Duration) -> Option<Leadership> {
        let g = lock(&self.shared);
        let (g, _) = self
            .shared
            .cond
            .wait_timeout_while(g, timeout, |s| s.leading.is_none() && !s.stop)
            .unwrap_or_else(|e| e.into_inner());
        g.leading.clone()
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        lock(&self.shared).stop = true;
        self.shared.cond.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(l) = lock(&self.shared).leading.take() {
            if let Err(e) = self.store.resign(&l) {
                warn!(error = %error_chain(&e), "could not resign leadership");
            }
        }
    }
}

struct Campaign {
    store: ClusterStore,
    candidate: String,
    api: Option<String>,
    cfg: ElectionConfig,
    shared: Arc<Shared>,
}

impl Campaign {
    fn run(self) {
        // The earliest instant the leader lease may expire, while leading.
        let mut deadline = Instant::now();
        loop {
            let leading = lock(&self.shared).leading.clone();
            match leading {
                None => {
                    let asked = Instant::now();
                    match self
                        .store
                        .campaign_at(&self.candidate, self.api.as_deref(), self.cfg.ttl)
                    {
                        Ok(Some(l)) => {
                            deadline = asked + l.ttl;
                            info!(candidate = %self.candidate, token = l.claim.token, "leading the cluster");
                            let mut s = lock(&self.shared);
                            s.leading = Some(l);
                            s.since = Some(Instant::now());
                            self.shared.cond.notify_all();
                        }
                        Ok(None) => {}
                        Err(e) => {
                            warn!(candidate = %self.candidate, error = %error_chain(&e), "campaign failed")
                        }
                    }
                }
                Some(l) => {
                    let sent = Instant::now();
                    let give_up_at = deadline.checked_sub(self.cfg.margin).unwrap_or(deadline);
                    let within = give_up_at.saturating_duration_since(sent);
                    let result = if within.is_zero() {
                        Err(StoreError::NotLeader {
                            candidate: l.claim.candidate.clone(),
                            token: l.claim.token,
                        })
                    } else {
                        self.store.keep_leading(&l, within)
                    };
                    match result {
                        Ok(()) => deadline = sent + l.ttl,
                        Err(e) => {
                            let lost = matches!(e, StoreError::NotLeader { .. })
                                || Instant::now() >= give_up_at;
                            if lost {
                                warn!(candidate = %self.candidate, token = l.claim.token, error = %error_chain(&e), "no longer leading");
                                lock(&self.shared).leading = None;
                                self.shared.cond.notify_all();
                            } else {
                                warn!(candidate = %self.candidate, error = %error_chain(&e), "leader lease renewal failed; retrying");
                            }
                        }
                    }
                }
            }
            let g = lock(&self.shared);
            if g.stop {
                return;
            }
            let g = self
                .shared
                .cond
                .wait_timeout(g, self.cfg.every)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if g.stop {
                return;
            }
        }
    }
}
