//! [`KvBackend`] on etcd (v3 API, through `etcd-client`). The client runs
//! on a runtime of its own, so the store is called from any thread, async
//! or not; every call is bounded by the operation timeout (or the caller's
//! `within`) and fails with [`KvError::Timeout`] rather than hang when
//! etcd is unreachable. Requests require an etcd leader, so a member cut
//! off from its quorum answers with an error, never with stale data.
//!
//! Like etcd's own Go client, it sticks to one member and moves to the
//! next when a request certainly never reached the current one (the
//! connection was refused, or the member has no leader and refused it).
//! A request that may have been applied is never repeated: a repeated
//! compare-and-swap would report a conflict for a swap that happened.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, GetOptions, KeyValue, PutOptions,
    Txn, TxnOp, WatchOptions,
};

use super::kv::{
    ttl_seconds, Compare, KvBackend, KvEntry, KvError, KvOp, LeaseId, Revision, TxnOutcome,
};

/// How the client talks to etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Longest wait for one operation.
    pub op_timeout: Duration,
    /// Longest wait for a TCP connection to a member.
    pub connect_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            op_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
        }
    }
}

/// An etcd cluster as the store's backend.
pub struct EtcdKv {
    /// One client per member, in the order given.
    clients: Arc<Vec<Client>>,
    /// The member in use.
    current: Arc<AtomicUsize>,
    rt: Option<tokio::runtime::Runtime>,
    opts: EtcdOptions,
}

fn etcd(op: &'static str) -> impl FnOnce(etcd_client::Error) -> KvError {
    move |source| KvError::Etcd { op, source }
}

fn entry(kv: &KeyValue) -> Result<KvEntry, KvError> {
    Ok(KvEntry {
        key: kv
            .key_str()
            .map_err(|_| KvError::BadKey(kv.key().to_vec()))?
            .to_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    })
}

/// Whether etcd said the lease does not exist (expired or revoked).
fn lease_gone(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    }
}

/// gRPC's status code UNAVAILABLE.
const GRPC_UNAVAILABLE: i32 = 14;

/// Whether the request certainly did not reach (or was refused by) the
/// member, so another member may be asked.
fn never_sent(e: &KvError) -> bool {
    let KvError::Etcd { source, .. } = e else {
        return false;
    };
    match source {
        etcd_client::Error::GRpcStatus(s) => {
            i32::from(s.code()) == GRPC_UNAVAILABLE
                && (s.message().contains("connect error") || s.message().contains("no leader"))
        }
        _ => false,
    }
}

/// Runs `f` on `rt` and waits for it from any thread (also from inside
/// another runtime, where `block_on` would panic), at most `within`.
fn run_on<T, F>(
    rt: &tokio::runtime::Runtime,
    op: &'static str,
    within: Duration,
    f: F,
) -> Result<T, KvError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, KvError>> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let r = tokio::time::timeout(within, f).await;
        let _ = tx.send(r);
    });
    match rx.recv() {
        Ok(Ok(r)) => r,
        Ok(Err(_)) | Err(_) => Err(KvError::Timeout { op, after: within }),
    }
}

impl EtcdKv {
    /// A client for the etcd cluster at `endpoints` (`host:port` or
    /// `http://host:port`). Connections are made lazily: this fails only
    /// on malformed endpoints; an unreachable cluster shows on first use.
    pub fn connect(endpoints: &[String], opts: EtcdOptions) -> Result<Self, KvError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ferry-etcd")
            .enable_all()
            .build()
            .map_err(KvError::Runtime)?;
        let options = ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            .with_timeout(opts.op_timeout)
            .with_require_leader(true);
        let mut clients = Vec::new();
        for ep in endpoints {
            let (ep, options) = (ep.clone(), options.clone());
            clients.push(run_on(&rt, "connect", opts.op_timeout, async move {
                Client::connect([ep], Some(options))
                    .await
                    .map_err(etcd("connect"))
            })?);
        }
        if clients.is_empty() {
            return Err(KvError::NoEndpoints);
        }
        Ok(Self {
            clients: Arc::new(clients),
            current: Arc::new(AtomicUsize::new(0)),
            rt: Some(rt),
            opts,
        })
    }

    /// Runs `f(client, data)` against the current member, moving on to
    /// the next ones while the request certainly was not sent, all within
    /// `within`.
    fn run<D, T, F, Fut>(
        &self,
        op: &'static str,
        within: Duration,
        data: D,
        f: F,
    ) -> Result<T, KvError>
    where
        D: Clone + Send + 'static,
        T: Send + 'static,
        F: Fn(Client, D) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, KvError>> + Send + 'static,
    {
        let rt = self.rt.as_ref().expect("runtime lives until drop");
        let (clients, current) = (self.clients.clone(), self.current.clone());
        run_on(rt, op, within, async move {
            let first = current.load(Ordering::Relaxed);
            let mut result = Err(KvError::NoEndpoints);
            for i in 0..clients.len() {
                let k = (first + i) % clients.len();
                result = f(clients[k].clone(), data.clone()).await;
                match &result {
                    Err(e) if never_sent(e) => continue,
                    _ => {
                        current.store(k, Ordering::Relaxed);
                        break;
                    }
                }
            }
            result
        })
    }
}

impl std::fmt::Debug for EtcdKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdKv")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdKv {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl KvBackend for EtcdKv {
    fn get(&self, key: &str) -> Result<Option<KvEntry>, KvError> {
        let t = self.opts.op_timeout;
        self.run("get", t, key.to_owned(), |mut c, key| async move {
            let r = c.get(key, None).await.map_err(etcd("get"))?;
            r.kvs().first().map(entry).transpose()
        })
    }

    fn range(&self, prefix: &str) -> Result<Vec<KvEntry>, KvError> {
        let t = self.opts.op_timeout;
        self.run("range", t, prefix.to_owned(), |mut c, prefix| async move {
            let r = c
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(etcd("range"))?;
            r.kvs().iter().map(entry).collect()
        })
    }

    fn txn(&self, when: &[Compare], ops: &[KvOp]) -> Result<TxnOutcome, KvError> {
        let when: Vec<EtcdCompare> = when
            .iter()
            .map(|c| match c {
                Compare::ModRevision(k, r) => {
                    EtcdCompare::mod_revision(k.as_str(), CompareOp::Equal, *r)
                }
                Compare::CreateRevision(k, r) => {
                    EtcdCompare::create_revision(k.as_str(), CompareOp::Equal, *r)
                }
                Compare::Exists(k) => {
                    EtcdCompare::create_revision(k.as_str(), CompareOp::Greater, 0)
                }
            })
            .collect();
        let ops: Vec<TxnOp> = ops
            .iter()
            .map(|o| match o {
                KvOp::Put { key, value, lease } => TxnOp::put(
                    key.as_str(),
                    value.clone(),
                    (*lease != 0).then(|| PutOptions::new().with_lease(*lease)),
                ),
                KvOp::Delete { key } => TxnOp::delete(key.as_str(), None),
            })
            .collect();
        let t = self.opts.op_timeout;
        self.run("txn", t, (when, ops), |mut c, (when, ops)| async move {
            let r = c
                .txn(Txn::new().when(when).and_then(ops))
                .await
                .map_err(|e| match e {
                    ref e if lease_gone(e) => KvError::LeaseNotFound(0),
                    e => KvError::Etcd {
                        op: "txn",
                        source: e,
                    },
                })?;
            Ok(TxnOutcome {
                succeeded: r.succeeded(),
                revision: r.header().map_or(0, |h| h.revision()),
            })
        })
    }

    fn grant(&self, ttl: Duration) -> Result<(LeaseId, Duration), KvError> {
        let t = self.opts.op_timeout;
        self.run(
            "lease grant",
            t,
            ttl_seconds(ttl),
            |mut c, secs| async move {
                let r = c
                    .lease_grant(secs, None)
                    .await
                    .map_err(etcd("lease grant"))?;
                Ok((r.id(), Duration::from_secs(r.ttl().unsigned_abs())))
            },
        )
    }

    fn keep_alive(&self, lease: LeaseId, within: Duration) -> Result<Option<Duration>, KvError> {
        self.run(
            "lease keep-alive",
            within,
            lease,
            |mut c, lease| async move {
                // etcd answers a renewal of an expired lease with "not found".
                let gone_or = |e: etcd_client::Error| {
                    if lease_gone(&e) {
                        Ok(None)
                    } else {
                        Err(KvError::Etcd {
                            op: "lease keep-alive",
                            source: e,
                        })
                    }
                };
                let (mut keeper, mut stream) = match c.lease_keep_alive(lease).await {
                    Ok(s) => s,
                    Err(e) => return gone_or(e),
                };
                if let Err(e) = keeper.keep_alive().await {
                    return gone_or(e);
                }
                match stream.message().await {
                    Ok(Some(r)) if r.ttl() > 0 => {
                        Ok(Some(Duration::from_secs(r.ttl().unsigned_abs())))
                    }
                    Ok(Some(_)) => Ok(None),
                    Ok(None) => Err(KvError::Closed {
                        op: "lease keep-alive",
                    }),
                    Err(e) => gone_or(e),
                }
            },
        )
    }

    fn time_to_live(&self, lease: LeaseId) -> Result<Option<Duration>, KvError> {
        let t = self.opts.op_timeout;
        self.run("lease time-to-live", t, lease, |mut c, lease| async move {
            let r = c
                .lease_time_to_live(lease, None)
                .await
                .map_err(etcd("lease time-to-live"))?;
            Ok((r.ttl() >= 0).then(|| Duration::from_secs(r.ttl().unsigned_abs())))
        })
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), KvError> {
        let t = self.opts.op_timeout;
        self.run("lease revoke", t, lease, |mut c, lease| async move {
            match c.lease_revoke(lease).await {
                Ok(_) => Ok(()),
                Err(e) if lease_gone(&e) => Ok(()),
                Err(e) => Err(KvError::Etcd {
                    op: "lease revoke",
                    source: e,
                }),
            }
        })
    }

    fn revision(&self) -> Result<Revision, KvError> {
        let t = self.opts.op_timeout;
        self.run("revision", t, (), |mut c, ()| async move {
            let r = c
                .get("\0", Some(GetOptions::new().with_count_only()))
                .await
                .map_err(etcd("revision"))?;
            Ok(r.header().map_or(0, |h| h.revision()))
        })
    }

    fn wait_change(
        &self,
        prefix: &str,
        after: Revision,
        timeout: Duration,
    ) -> Result<Revision, KvError> {
        let within = timeout + self.opts.op_timeout;
        let data = (prefix.to_owned(), after, timeout);
        let watched = self.run(
            "watch",
            within,
            data,
            |mut c, (prefix, after, timeout)| async move {
                let opts = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(after + 1);
                // Dropping the stream ends the watch.
                let mut stream = c.watch(prefix, Some(opts)).await.map_err(etcd("watch"))?;
                let seen = tokio::time::timeout(timeout, async {
                    while let Some(r) = stream.message().await.map_err(etcd("watch"))? {
                        let rev = r.header().map_or(0, |h| h.revision());
                        if r.compact_revision() > 0 || !r.events().is_empty() || r.canceled() {
                            return Ok(Some(rev));
                        }
                    }
                    Ok::<_, KvError>(None)
                })
                .await;
                seen.unwrap_or(Ok(None))
            },
        )?;
        match watched {
            Some(rev) => Ok(rev),
            None => self.revision(),
        }
    }
}
