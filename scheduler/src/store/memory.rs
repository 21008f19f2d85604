//! [`KvBackend`] in memory: etcd's semantics (one revision counter, create
//! and mod revisions, leases that delete their keys when they expire,
//! all-or-nothing transactions) inside one process. The embedded default
//! for a single daemon and `ferry demo`; lease expiry is observed on the
//! next call after the deadline, as a reader of etcd would observe it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::kv::{
    ttl_seconds, Compare, KvBackend, KvEntry, KvError, KvOp, LeaseId, Revision, TxnOutcome,
};

/// Changed keys remembered for [`KvBackend::wait_change`]; a waiter older
/// than this log is told "changed" (it re-reads, as after an etcd
/// compaction).
const CHANGE_LOG: usize = 4096;

#[derive(Debug)]
struct Entry {
    value: Vec<u8>,
    create_revision: Revision,
    mod_revision: Revision,
    lease: LeaseId,
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    keys: BTreeMap<String, Entry>,
    revision: Revision,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    /// (revision, key) of recent changes, oldest first.
    log: VecDeque<(Revision, String)>,
}

impl Inner {
    /// Expires the leases whose deadline passed, deleting their keys.
    fn reap(&mut self, now: Instant) {
        let expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            self.drop_lease(id);
        }
    }

    fn drop_lease(&mut self, id: LeaseId) {
        if self.leases.remove(&id).is_none() {
            return;
        }
        let keys: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, e)| e.lease == id)
            .map(|(k, _)| k.clone())
            .collect();
        if keys.is_empty() {
            return;
        }
        self.revision += 1;
        for k in keys {
            self.keys.remove(&k);
            self.logged(k);
        }
    }

    fn logged(&mut self, key: String) {
        if self.log.len() == CHANGE_LOG {
            self.log.pop_front();
        }
        self.log.push_back((self.revision, key));
    }

    fn holds(&self, c: &Compare) -> bool {
        match c {
            Compare::ModRevision(k, r) => self.keys.get(k).map_or(0, |e| e.mod_revision) == *r,
            Compare::CreateRevision(k, r) => {
                self.keys.get(k).map_or(0, |e| e.create_revision) == *r
            }
            Compare::Exists(k) => self.keys.contains_key(k),
        }
    }

    fn entry(key: &str, e: &Entry) -> KvEntry {
        KvEntry {
            key: key.to_owned(),
            value: e.value.clone(),
            create_revision: e.create_revision,
            mod_revision: e.mod_revision,
            lease: e.lease,
        }
    }

    /// Earliest lease deadline, for waiters.
    fn next_deadline(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.deadline).min()
    }
}

/// The in-memory backend.
#[derive(Debug, Default)]
pub struct MemoryKv {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl MemoryKv {
    /// An empty store at revision 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The state with expired leases reaped.
    fn now(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every
        // mutation completes before it can panic), so poisoning is ignored.
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let before = g.revision;
        g.reap(Instant::now());
        if g.revision != before {
            self.changed.notify_all();
        }
        g
    }
}

impl KvBackend for MemoryKv {
    fn get(&self, key: &str) -> Result<Option<KvEntry>, KvError> {
        Ok(self.now().keys.get(key).map(|e| Inner::entry(key, e)))
    }

    fn range(&self, prefix: &str) -> Result<Vec<KvEntry>, KvError> {
        let g = self.now();
        Ok(g.keys
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| Inner::entry(k, e))
            .collect())
    }

    fn txn(&self, when: &[Compare], ops: &[KvOp]) -> Result<TxnOutcome, KvError> {
        let mut g = self.now();
        if !when.iter().all(|c| g.holds(c)) {
            return Ok(TxnOutcome {
                succeeded: false,
                revision: g.revision,
            });
        }
        for op in ops {
            if let KvOp::Put { lease, .. } = op {
                if *lease != 0 && !g.leases.contains_key(lease) {
                    return Err(KvError::LeaseNotFound(*lease));
                }
            }
        }
        if !ops.is_empty() {
            g.revision += 1;
            let rev = g.revision;
            for op in ops {
                match op {
                    KvOp::Put { key, value, lease } => {
                        let create_revision = g.keys.get(key).map_or(rev, |e| e.create_revision);
                        g.keys.insert(
                            key.clone(),
                            Entry {
                                value: value.clone(),
                                create_revision,
                                mod_revision: rev,
                                lease: *lease,
                            },
                        );
                        g.logged(key.clone());
                    }
                    KvOp::Delete { key } => {
                        if g.keys.remove(key).is_some() {
                            g.logged(key.clone());
                        }
                    }
                }
            }
            self.changed.notify_all();
        }
        Ok(TxnOutcome {
            succeeded: true,
            revision: g.revision,
        })
    }

    fn grant(&self, ttl: Duration) -> Result<(LeaseId, Duration), KvError> {
        let ttl = Duration::from_secs(ttl_seconds(ttl).unsigned_abs());
        let mut g = self.now();
        g.next_lease += 1;
        let id = g.next_lease;
        g.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
            },
        );
        Ok((id, ttl))
    }

    fn keep_alive(&self, lease: LeaseId, _within: Duration) -> Result<Option<Duration>, KvError> {
        let mut g = self.now();
        Ok(g.leases.get_mut(&lease).map(|l| {
            l.deadline = Instant::now() + l.ttl;
            l.ttl
        }))
    }

    fn time_to_live(&self, lease: LeaseId) -> Result<Option<Duration>, KvError> {
        let g = self.now();
        Ok(g.leases
            .get(&lease)
            .map(|l| l.deadline.saturating_duration_since(Instant::now())))
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), KvError> {
        let mut g = self.now();
        g.drop_lease(lease);
        self.changed.notify_all();
        Ok(())
    }

    fn revision(&self) -> Result<Revision, KvError> {
        Ok(self.now().revision)
    }

    fn wait_change(
        &self,
        prefix: &str,
        after: Revision,
        timeout: Duration,
    ) -> Result<Revision, KvError> {
        let end = Instant::now() + timeout;
        let mut g = self.now();
        loop {
            let oldest = g.log.front().map_or(Revision::MAX, |(r, _)| *r);
            let seen = oldest > after + 1 && g.revision > after;
            if seen
                || g.log
                    .iter()
                    .any(|(r, k)| *r > after && k.starts_with(prefix))
            {
                return Ok(g.revision);
            }
            let now = Instant::now();
            if now >= end {
                return Ok(g.revision);
            }
            // Wake at the deadline, or when a lease may expire (expiry is
            // a change too).
            let wake = g.next_deadline().map_or(end, |d| d.min(end));
            let wait = wake.saturating_duration_since(now) + Duration::from_millis(1);
            g = self
                .changed
                .wait_timeout(g, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            g.reap(Instant::now());
        }
    }
}
