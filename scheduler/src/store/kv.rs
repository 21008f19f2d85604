//! The backend seam under [`super::ClusterStore`]: etcd's v3 data model cut
//! down to what the store uses. Keys with a create and a mod revision from
//! one store-wide counter, leases with a TTL that delete their keys when
//! they expire, and transactions that apply their operations only when
//! every comparison holds. [`super::memory::MemoryKv`] implements it in
//! memory (one daemon, `ferry demo`), `EtcdKv` (feature `etcd`) on an etcd
//! cluster; the ownership logic above it is written once.

use std::fmt::Debug;
use std::time::Duration;

/// A store revision: the store-wide counter etcd bumps on every change.
pub type Revision = i64;
/// A lease id (never 0: 0 means "no lease" as in etcd).
pub type LeaseId = i64;

/// One key as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Revision of the write that created the key.
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// The lease the key is attached to, 0 when none.
    pub lease: LeaseId,
}

/// A condition a transaction checks before it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's mod revision is exactly this (0: the key is absent).
    ModRevision(String, Revision),
    /// The key's create revision is exactly this (0: the key is absent).
    CreateRevision(String, Revision),
    /// The key exists.
    Exists(String),
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    /// Set `key` to `value`, attached to `lease` (0: none).
    Put {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
        /// Lease, 0 for none.
        lease: LeaseId,
    },
    /// Remove `key` (no error when absent).
    Delete {
        /// Key.
        key: String,
    },
}

/// What a transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Every comparison held and the operations were applied.
    pub succeeded: bool,
    /// The store revision after the transaction (the revision of its
    /// writes when it succeeded and wrote).
    pub revision: Revision,
}

/// Why a backend operation failed (the store is unreachable or answered
/// with an error; a comparison that does not hold is not an error).
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The operation did not finish in time.
    #[error("etcd {op} did not answer within {after:?}")]
    Timeout {
        /// Operation.
        op: &'static str,
        /// The time limit.
        after: Duration,
    },
    /// The etcd client reported an error.
    #[cfg(feature = "etcd")]
    #[error("etcd {op} failed")]
    Etcd {
        /// Operation.
        op: &'static str,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// The server closed a stream before it answered.
    #[error("etcd closed the {op} stream before answering")]
    Closed {
        /// Operation.
        op: &'static str,
    },
    /// No endpoint was given.
    #[error("no etcd endpoints given")]
    NoEndpoints,
    /// The client could not start its runtime.
    #[error("cannot start the etcd client's runtime")]
    Runtime(#[source] std::io::Error),
    /// A put named a lease that does not exist (expired or revoked).
    #[error("lease {0:x} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// A key or value read back is not valid UTF-8 where a key must be.
    #[error("key {0:?} is not UTF-8")]
    BadKey(Vec<u8>),
}

/// etcd's v3 data model as the store uses it. Every call returns when the
/// backend answered or failed; none blocks longer than the backend's
/// operation timeout (or `within` where a call takes one).
pub trait KvBackend: Send + Sync + Debug {
    /// The key, if present.
    fn get(&self, key: &str) -> Result<Option<KvEntry>, KvError>;
    /// Every key starting with `prefix`, in key order.
    fn range(&self, prefix: &str) -> Result<Vec<KvEntry>, KvError>;
    /// Applies `ops` atomically if every comparison in `when` holds.
    fn txn(&self, when: &[Compare], ops: &[KvOp]) -> Result<TxnOutcome, KvError>;
    /// A new lease of at least `ttl` (whole seconds, rounded up; the
    /// backend may raise it to its minimum). Returns the id and the TTL
    /// granted.
    fn grant(&self, ttl: Duration) -> Result<(LeaseId, Duration), KvError>;
    /// Renews the lease to its full TTL, answering within `within`.
    /// `None` when the lease has expired (or never existed).
    fn keep_alive(&self, lease: LeaseId, within: Duration) -> Result<Option<Duration>, KvError>;
    /// Time left on the lease; `None` when expired.
    fn time_to_live(&self, lease: LeaseId) -> Result<Option<Duration>, KvError>;
    /// Ends the lease now, deleting its keys (no error when already gone).
    fn revoke(&self, lease: LeaseId) -> Result<(), KvError>;
    /// The store's current revision.
    fn revision(&self) -> Result<Revision, KvError>;
    /// Waits until a key under `prefix` changes after revision `after`
    /// (lease expiries included) or `timeout` passes; returns the store
    /// revision then.
    fn wait_change(
        &self,
        prefix: &str,
        after: Revision,
        timeout: Duration,
    ) -> Result<Revision, KvError>;
}

/// Whole seconds, at least 1, rounding up (etcd's TTLs are seconds).
pub fn ttl_seconds(ttl: Duration) -> i64 {
    let s = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(s.max(1)).unwrap_or(i64::MAX)
}
