//! The cluster store: who owns each VM, which hosts are alive, who leads
//! the schedulers, and which decisions are in flight, kept where every
//! daemon and agent agrees on it.
//!
//! - **Ownership records.** One per VM: the host that may run it and an
//!   epoch that grows with every transition. Starting, migrating and
//!   restarting are compare-and-swap transitions on the record's revision,
//!   so of two concurrent transitions of one VM exactly one wins; a
//!   migration also needs its destination alive, a restart needs the old
//!   owner's lease gone (so a VM is never restarted while its host may
//!   still run it).
//! - **Host leases.** An agent [`ClusterStore::join`]s with a lease it keeps
//!   alive ([`crate::ha::lease_keeper`] does that and fences the host when
//!   it cannot); when the lease expires the host is reported dead.
//! - **Leader election with a fencing token.** [`ClusterStore::campaign`]
//!   creates the leader key under the candidate's lease; its create
//!   revision is the token. Every write a leader makes compares the leader
//!   key's create revision with its token, so once a leader's lease
//!   expired (and another may lead) its writes fail with
//!   [`StoreError::NotLeader`].
//! - **Decisions in flight**, recorded by the leader before it acts and
//!   removed when done, so that a new leader neither repeats nor forgets
//!   them.
//! - **The placement rules** as last set through the API (fenced like
//!   every leader write), so that a new leader places by them too.
//!
//! The logic is written once over the [`kv::KvBackend`] seam (etcd's v3
//! data model); [`memory::MemoryKv`] is the embedded default, `EtcdKv`
//! (cargo feature `etcd`) runs it on etcd. The conformance suite in
//! `scheduler/tests/cluster_store.rs` runs against both.
//!
//! ```
//! use std::time::Duration;
//! use ferry_scheduler::store::ClusterStore;
//! let store = ClusterStore::in_memory();
//! let me = store.campaign("sched-a", Duration::from_secs(5))?.expect("nobody else leads").claim;
//! let _a = store.join("host-a", Duration::from_secs(5))?;
//! let _b = store.join("host-b", Duration::from_secs(5))?;
//! let rec = store.start(&me, "web", "host-a")?;
//! let moved = store.migrate(&me, &rec, "host-b")?;
//! assert_eq!((moved.host.as_str(), moved.epoch), ("host-b", rec.epoch + 1));
//! assert!(store.migrate(&me, &rec, "host-b").is_err(), "a stale record never swaps");
//! # Ok::<(), ferry_scheduler::store::StoreError>(())
//! ```

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod kv;
pub mod memory;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::plan::rules::Rule;

use kv::{Compare, KvBackend, KvEntry, KvError, KvOp, LeaseId, Revision};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/ferry/";

/// How a VM came to its current owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    /// First started.
    Start,
    /// Live-migrated from another host.
    Migrate,
    /// Restarted after its previous host died.
    Restart,
    /// Given back to a migration's source by the destination, which
    /// refused that migration's handover for good
    /// ([`ClusterStore::hand_back`]).
    HandedBack,
}

/// Who owns a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// VM name.
    pub vm: String,
    /// The only host that may run it.
    pub host: String,
    /// Grows by one with every transition (1 after start).
    pub epoch: u64,
    /// The transition that made `host` the owner.
    pub last: Transition,
    /// The host it came from (migrate, restart).
    pub previous: Option<String>,
    /// The record's revision in the store (what a swap compares).
    #[serde(skip)]
    pub revision: Revision,
}

/// What a migration's destination decided on a hand-back
/// ([`ClusterStore::give_back`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GiveBack {
    /// The destination holds the VM (that migration resumed it there).
    Runs,
    /// The destination never resumed that migration and never will: the
    /// record names the source again.
    HandedBack {
        /// The record now.
        record: OwnerRecord,
        /// Why the destination did not resume it.
        reason: String,
    },
}

/// A host's lease, held by the host's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLease {
    /// Host name.
    pub host: String,
    /// The lease.
    pub lease: LeaseId,
    /// Its TTL as granted (may exceed what was asked).
    pub ttl: Duration,
}

/// A host as the store sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostStatus {
    /// Host name.
    pub host: String,
    /// Its lease is alive.
    pub alive: bool,
}

/// What every leader write carries: the leader's name and its fencing
/// token. A write under a claim fails once another leader was elected (a
/// deposed leader's writes fail). The leader holds it in its
/// [`Leadership`]; an agent making a write the leader asked for (the
/// ownership swap of a migration the leader ordered) holds the claim
/// alone, without the leader's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderClaim {
    /// The candidate's name.
    pub candidate: String,
    /// The fencing token (the leader key's create revision; grows with
    /// every new leader).
    pub token: Revision,
}

/// A leadership this process holds: its claim and the lease that keeps
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// What the leader's writes carry.
    pub claim: LeaderClaim,
    /// The lease the leader key is attached to.
    pub lease: LeaseId,
    /// Its TTL as granted.
    pub ttl: Duration,
}

/// Who leads now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// The candidate's name.
    pub candidate: String,
    /// Its fencing token.
    pub token: Revision,
    /// Where it serves its API (`ip:port`), when it said.
    #[serde(default)]
    pub api: Option<String>,
}

/// A decision the leader is carrying out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DecisionKind {
    /// Start a VM.
    Start {
        /// Target host.
        host: String,
    },
    /// Live-migrate a VM.
    Migrate {
        /// Source.
        from: String,
        /// Destination.
        to: String,
    },
    /// Restart a VM whose host died.
    Restart {
        /// The dead host.
        from: String,
        /// Where it restarts.
        to: String,
    },
}

/// A recorded decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Unique id (the caller's; a second record under one id fails).
    pub id: String,
    /// The VM.
    pub vm: String,
    /// What to do.
    pub kind: DecisionKind,
    /// Token of the leader that decided.
    pub token: Revision,
    /// Why.
    pub reason: String,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend is unreachable or failed.
    #[error("cluster store unavailable")]
    Unavailable(#[from] KvError),
    /// The caller no longer leads (its lease expired or another leads).
    #[error("{candidate} no longer leads (token {token})")]
    NotLeader {
        /// The deposed candidate.
        candidate: String,
        /// Its stale token.
        token: Revision,
    },
    /// The record changed since it was read (or exists / is gone).
    #[error("VM {vm}'s ownership record changed (now {current:?})")]
    Conflict {
        /// VM.
        vm: String,
        /// The record as it is now.
        current: Option<Box<OwnerRecord>>,
    },
    /// A transition needs a host alive that is not.
    #[error("host {host} is not alive")]
    HostDead {
        /// Host.
        host: String,
    },
    /// A restart while the owner's lease is still alive.
    #[error("VM {vm}'s owner {host} is still alive: restarting it elsewhere could run it twice")]
    OwnerAlive {
        /// VM.
        vm: String,
        /// Its owner.
        host: String,
    },
    /// A host lease expired before it was renewed.
    #[error("host {host}'s lease expired")]
    LeaseExpired {
        /// Host.
        host: String,
    },
    /// A decision with this id is already recorded.
    #[error("decision {id} is already recorded")]
    DuplicateDecision {
        /// Decision id.
        id: String,
    },
    /// A hand-back of a record whose last transition was not a migration.
    #[error("VM {vm}'s record did not come by a migration (last: {last:?}): nothing to give back")]
    NotMigrated {
        /// VM.
        vm: String,
        /// Its last transition.
        last: Transition,
    },
    /// A name that cannot be a key.
    #[error("bad name {name:?}: must be non-empty, without '/' or control characters")]
    BadName {
        /// The name.
        name: String,
    },
    /// A value in the store does not parse.
    #[error("corrupt value at {key}")]
    Corrupt {
        /// Key.
        key: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// The store: ownership records, host leases, leader election, decisions.
#[derive(Debug, Clone)]
pub struct ClusterStore {
    kv: Arc<dyn KvBackend>,
    prefix: String,
}

fn check_name(name: &str) -> Result<(), StoreError> {
    if name.is_empty() || name.len() > 253 || name.chars().any(|c| c == '/' || c.is_control()) {
        return Err(StoreError::BadName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Our own plain structs: serialising cannot fail.
    serde_json::to_vec(v).expect("store values serialise")
}

fn parse<T: for<'de> Deserialize<'de>>(e: &KvEntry) -> Result<T, StoreError> {
    serde_json::from_slice(&e.value).map_err(|source| StoreError::Corrupt {
        key: e.key.clone(),
        source,
    })
}

#[derive(Serialize, Deserialize)]
struct LeaderValue {
    candidate: String,
    #[serde(default)]
    api: Option<String>,
}

impl ClusterStore {
    /// The store over `kv`, its keys under `prefix` (e.g. `/ferry/`).
    pub fn new(kv: Arc<dyn KvBackend>, prefix: &str) -> Self {
        Self {
            kv,
            prefix: prefix.to_owned(),
        }
    }

    /// A fresh in-memory store (one daemon, `ferry demo`, tests).
    pub fn in_memory() -> Self {
        Self::new(Arc::new(memory::MemoryKv::new()), DEFAULT_PREFIX)
    }

    /// The store on the etcd cluster at `endpoints`, keys under `prefix`.
    #[cfg(feature = "etcd")]
    pub fn on_etcd(
        endpoints: &[String],
        opts: etcd::EtcdOptions,
        prefix: &str,
    ) -> Result<Self, StoreError> {
        Ok(Self::new(
            Arc::new(etcd::EtcdKv::connect(endpoints, opts)?),
            prefix,
        ))
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn KvBackend> {
        &self.kv
    }

    fn vm_key(&self, vm: &str) -> String {
        format!("{}vms/{vm}", self.prefix)
    }
    fn alive_key(&self, host: &str) -> String {
        format!("{}alive/{host}", self.prefix)
    }
    fn known_key(&self, host: &str) -> String {
        format!("{}hosts/{host}", self.prefix)
    }
    fn leader_key(&self) -> String {
        format!("{}leader", self.prefix)
    }
    fn maintenance_key(&self, host: &str) -> String {
        format!("{}maintenance/{host}", self.prefix)
    }
    fn decision_key(&self, id: &str) -> String {
        format!("{}decisions/{id}", self.prefix)
    }
    fn rules_key(&self) -> String {
        format!("{}rules", self.prefix)
    }
    fn fence(&self, l: &LeaderClaim) -> Compare {
        Compare::CreateRevision(self.leader_key(), l.token)
    }

    // ---- ownership records ----

    /// The VM's record, if it has one.
    pub fn record(&self, vm: &str) -> Result<Option<OwnerRecord>, StoreError> {
        check_name(vm)?;
        self.kv
            .get(&self.vm_key(vm))?
            .map(|e| self.owner(&e))
            .transpose()
    }

    /// Every record, by VM name.
    pub fn records(&self) -> Result<Vec<OwnerRecord>, StoreError> {
        self.kv
            .range(&self.vm_key(""))?
            .iter()
            .map(|e| self.owner(e))
            .collect()
    }

    fn owner(&self, e: &KvEntry) -> Result<OwnerRecord, StoreError> {
        let mut r: OwnerRecord = parse(e)?;
        r.revision = e.mod_revision;
        Ok(r)
    }

    /// Records that `vm` starts on `host` (epoch 1). Fails with
    /// [`StoreError::Conflict`] if the VM already has a record and
    /// [`StoreError::HostDead`] if `host` is not alive.
    pub fn start(
        &self,
        leader: &LeaderClaim,
        vm: &str,
        host: &str,
    ) -> Result<OwnerRecord, StoreError> {
        check_name(vm)?;
        check_name(host)?;
        let rec = OwnerRecord {
            vm: vm.to_owned(),
            host: host.to_owned(),
            epoch: 1,
            last: Transition::Start,
            previous: None,
            revision: 0,
        };
        let when = [
            self.fence(leader),
            Compare::ModRevision(self.vm_key(vm), 0),
            Compare::Exists(self.alive_key(host)),
        ];
        self.swap(Some(leader), &when, rec, None)
    }

    /// Moves `current` to `to` (a live migration: call before GO; the
    /// agent does it right before the pause). Fails
    /// with [`StoreError::Conflict`] when the record changed since
    /// `current` was read, [`StoreError::HostDead`] when `to` is not alive.
    pub fn migrate(
        &self,
        leader: &LeaderClaim,
        current: &OwnerRecord,
        to: &str,
    ) -> Result<OwnerRecord, StoreError> {
        self.transfer(leader, current, to, Transition::Migrate)
    }

    /// Restarts `current` on `to` after its owner died. Fails like
    /// [`ClusterStore::migrate`], and with [`StoreError::OwnerAlive`] while
    /// the owner's lease is alive.
    pub fn restart(
        &self,
        leader: &LeaderClaim,
        current: &OwnerRecord,
        to: &str,
    ) -> Result<OwnerRecord, StoreError> {
        self.transfer(leader, current, to, Transition::Restart)
    }

    /// Gives `current`, a record a migration moved to its destination,
    /// back to the migration's source (`current.previous`): the
    /// destination calls it once it has refused that migration's handover
    /// for good (it never resumed the guest and never will) while the
    /// source keeps the guest's paused copy, and the source calls it when
    /// the migration failed after the record moved but before GO went out
    /// (the swap is made before the pause). Fails with
    /// [`StoreError::Conflict`] when the record changed since `current`,
    /// [`StoreError::NotMigrated`] when it did not come by a migration,
    /// [`StoreError::HostDead`] when the source is not alive.
    ///
    /// Not fenced by a leader's token: it is no scheduling decision but
    /// the undoing of a swap whose GO did not take, by the one host that
    /// knows it did not; the compare on the record's revision makes it
    /// lose to any transition made since (a leader's restart included).
    pub fn hand_back(&self, current: &OwnerRecord) -> Result<OwnerRecord, StoreError> {
        check_name(&current.vm)?;
        let (Transition::Migrate, Some(to)) = (current.last, current.previous.as_deref()) else {
            return Err(StoreError::NotMigrated {
                vm: current.vm.clone(),
                last: current.last,
            });
        };
        let next = OwnerRecord {
            vm: current.vm.clone(),
            host: to.to_owned(),
            epoch: current.epoch + 1,
            last: Transition::HandedBack,
            previous: Some(current.host.clone()),
            revision: 0,
        };
        let when = [
            Compare::ModRevision(self.vm_key(&current.vm), current.revision),
            Compare::Exists(self.alive_key(to)),
        ];
        self.swap(None, &when, next, Some(current))
    }

    /// A migration's destination `host` decides on its source's request
    /// for a hand-back of `vm` (the source keeps the guest's paused copy
    /// while the record names `host`): [`GiveBack::Runs`] when `host`
    /// holds a copy (`holds_copy`) or resumed that migration, else it
    /// refuses that migration's handover for good (`refuse_handover`, which
    /// answers `Ok(())` when it resumed the guest after all, or
    /// `Err(why)` once refused) and gives the record back with
    /// [`ClusterStore::hand_back`]. The caller holds the VM's name so that
    /// no start of it begins on `host` meanwhile.
    ///
    /// Why the VM never runs on two hosts: the source resumes its copy only
    /// once the record names it again, and this gives the record back only
    /// when (1) `host` holds no copy of the VM, (2) the migration's
    /// handover is refused there for good (a GO arriving later is answered
    /// with Abort and the incoming guest is dropped, never resumed), and
    /// (3) no start of the VM can begin on `host` meanwhile (the caller's
    /// hold; once the record names the source, a start on `host` is refused
    /// as not its own). No other copy exists: the source's is the only one
    /// the migration left. The swap itself compares the record's revision,
    /// so any transition since (a leader's restart after `host`'s lease
    /// lapsed) wins over it, and the source then follows that record
    /// instead. Fails with [`StoreError::Conflict`] when the record does not
    /// name `host`, and as [`ClusterStore::hand_back`] does.
    pub fn give_back(
        &self,
        host: &str,
        vm: &str,
        holds_copy: bool,
        refuse_handover: impl FnOnce() -> Result<(), String>,
    ) -> Result<GiveBack, StoreError> {
        if holds_copy {
            return Ok(GiveBack::Runs);
        }
        let reason = match refuse_handover() {
            Ok(()) => return Ok(GiveBack::Runs),
            Err(why) => why,
        };
        let rec = match self.record(vm)? {
            Some(r) if r.host == host => r,
            other => {
                return Err(StoreError::Conflict {
                    vm: vm.to_owned(),
                    current: other.map(Box::new),
                })
            }
        };
        Ok(GiveBack::HandedBack {
            record: self.hand_back(&rec)?,
            reason,
        })
    }

    fn transfer(
        &self,
        leader: &LeaderClaim,
        current: &OwnerRecord,
        to: &str,
        how: Transition,
    ) -> Result<OwnerRecord, StoreError> {
        check_name(&current.vm)?;
        check_name(to)?;
        let next = OwnerRecord {
            vm: current.vm.clone(),
            host: to.to_owned(),
            epoch: current.epoch + 1,
            last: how,
            previous: Some(current.host.clone()),
            revision: 0,
        };
        let mut when = vec![
            self.fence(leader),
            Compare::ModRevision(self.vm_key(&current.vm), current.revision),
            Compare::Exists(self.alive_key(to)),
        ];
        if how == Transition::Restart {
            // The owner's lease must be gone: its alive key absent.
            when.push(Compare::CreateRevision(self.alive_key(&current.host), 0));
        }
        self.swap(Some(leader), &when, next, Some(current))
    }

    /// Removes the VM's record (it was deleted), if unchanged.
    pub fn remove(&self, leader: &LeaderClaim, current: &OwnerRecord) -> Result<(), StoreError> {
        check_name(&current.vm)?;
        let when = [
            self.fence(leader),
            Compare::ModRevision(self.vm_key(&current.vm), current.revision),
        ];
        let ops = [KvOp::Delete {
            key: self.vm_key(&current.vm),
        }];
        if self.kv.txn(&when, &ops)?.succeeded {
            return Ok(());
        }
        Err(self.why_failed(Some(leader), &current.vm, None, None)?)
    }

    fn swap(
        &self,
        leader: Option<&LeaderClaim>,
        when: &[Compare],
        mut next: OwnerRecord,
        current: Option<&OwnerRecord>,
    ) -> Result<OwnerRecord, StoreError> {
        let ops = [KvOp::Put {
            key: self.vm_key(&next.vm),
            value: json(&next),
            lease: 0,
        }];
        let out = self.kv.txn(when, &ops)?;
        if out.succeeded {
            next.revision = out.revision;
            return Ok(next);
        }
        let restart_from = current
            .filter(|_| next.last == Transition::Restart)
            .map(|c| c.host.as_str());
        Err(self.why_failed(leader, &next.vm, Some(&next.host), restart_from)?)
    }

    /// Names the comparison that failed (read after the fact: a race may
    /// name a later cause, never a wrong kind of failure).
    fn why_failed(
        &self,
        leader: Option<&LeaderClaim>,
        vm: &str,
        to: Option<&str>,
        restart_from: Option<&str>,
    ) -> Result<StoreError, StoreError> {
        if let Some(leader) = leader {
            if self.leader()?.is_none_or(|l| l.token != leader.token) {
                return Ok(StoreError::NotLeader {
                    candidate: leader.candidate.clone(),
                    token: leader.token,
                });
            }
        }
        if let Some(host) = restart_from {
            if self.kv.get(&self.alive_key(host))?.is_some() {
                return Ok(StoreError::OwnerAlive {
                    vm: vm.to_owned(),
                    host: host.to_owned(),
                });
            }
        }
        if let Some(to) = to {
            if self.kv.get(&self.alive_key(to))?.is_none() {
                return Ok(StoreError::HostDead {
                    host: to.to_owned(),
                });
            }
        }
        Ok(StoreError::Conflict {
            vm: vm.to_owned(),
            current: self.record(vm)?.map(Box::new),
        })
    }

    // ---- host leases ----

    /// Registers `host` and makes it alive under a new lease of `ttl` that
    /// the caller keeps alive with [`ClusterStore::keep_alive`].
    pub fn join(&self, host: &str, ttl: Duration) -> Result<HostLease, StoreError> {
        check_name(host)?;
        let (lease, ttl) = self.kv.grant(ttl)?;
        let ops = [
            KvOp::Put {
                key: self.known_key(host),
                value: Vec::new(),
                lease: 0,
            },
            KvOp::Put {
                key: self.alive_key(host),
                value: lease.to_string().into_bytes(),
                lease,
            },
        ];
        self.kv.txn(&[], &ops)?;
        Ok(HostLease {
            host: host.to_owned(),
            lease,
            ttl,
        })
    }

    /// Renews the host's lease to its full TTL, answering within `within`.
    /// [`StoreError::LeaseExpired`] when it already expired (the host is
    /// dead to everyone else: it must stop its VMs and join again).
    pub fn keep_alive(&self, l: &HostLease, within: Duration) -> Result<Duration, StoreError> {
        self.kv
            .keep_alive(l.lease, within)?
            .ok_or_else(|| StoreError::LeaseExpired {
                host: l.host.clone(),
            })
    }

    /// Ends the host's lease now (an orderly leave: reported dead at once).
    pub fn leave(&self, l: &HostLease) -> Result<(), StoreError> {
        Ok(self.kv.revoke(l.lease)?)
    }

    /// Every host that ever joined, alive or not, by name.
    pub fn hosts(&self) -> Result<Vec<HostStatus>, StoreError> {
        let known = self.kv.range(&self.known_key(""))?;
        let alive = self.kv.range(&self.alive_key(""))?;
        let alive: std::collections::HashSet<&str> = alive
            .iter()
            .filter_map(|e| e.key.strip_prefix(&self.alive_key("")))
            .collect();
        Ok(known
            .iter()
            .filter_map(|e| e.key.strip_prefix(&self.known_key("")))
            .map(|h| HostStatus {
                host: h.to_owned(),
                alive: alive.contains(h),
            })
            .collect())
    }

    /// Whether `host`'s lease is alive now.
    pub fn host_alive(&self, host: &str) -> Result<bool, StoreError> {
        check_name(host)?;
        Ok(self.kv.get(&self.alive_key(host))?.is_some())
    }

    // ---- leader election ----

    /// Tries once to become the leader under a lease of `ttl`; `None` when
    /// another candidate leads.
    pub fn campaign(
        &self,
        candidate: &str,
        ttl: Duration,
    ) -> Result<Option<Leadership>, StoreError> {
        self.campaign_at(candidate, None, ttl)
    }

    /// [`ClusterStore::campaign`], saying where the candidate serves its
    /// API (followers forward requests there; see [`LeaderInfo::api`]).
    pub fn campaign_at(
        &self,
        candidate: &str,
        api: Option<&str>,
        ttl: Duration,
    ) -> Result<Option<Leadership>, StoreError> {
        check_name(candidate)?;
        let (lease, ttl) = self.kv.grant(ttl)?;
        let when = [Compare::CreateRevision(self.leader_key(), 0)];
        let ops = [KvOp::Put {
            key: self.leader_key(),
            value: json(&LeaderValue {
                candidate: candidate.to_owned(),
                api: api.map(str::to_owned),
            }),
            lease,
        }];
        let out = self.kv.txn(&when, &ops)?;
        if !out.succeeded {
            self.kv.revoke(lease)?;
            return Ok(None);
        }
        Ok(Some(Leadership {
            claim: LeaderClaim {
                candidate: candidate.to_owned(),
                token: out.revision,
            },
            lease,
            ttl,
        }))
    }

    /// Renews the leader's lease; [`StoreError::NotLeader`] when it expired
    /// or another leads.
    pub fn keep_leading(&self, l: &Leadership, within: Duration) -> Result<(), StoreError> {
        let alive = self.kv.keep_alive(l.lease, within)?.is_some();
        if alive && self.leader()?.is_some_and(|now| now.token == l.claim.token) {
            return Ok(());
        }
        Err(StoreError::NotLeader {
            candidate: l.claim.candidate.clone(),
            token: l.claim.token,
        })
    }

    /// Steps down now (the next campaign can win at once).
    pub fn resign(&self, l: &Leadership) -> Result<(), StoreError> {
        Ok(self.kv.revoke(l.lease)?)
    }

    /// The current leader, if any.
    pub fn leader(&self) -> Result<Option<LeaderInfo>, StoreError> {
        let Some(e) = self.kv.get(&self.leader_key())? else {
            return Ok(None);
        };
        let v: LeaderValue = parse(&e)?;
        Ok(Some(LeaderInfo {
            candidate: v.candidate,
            token: e.create_revision,
            api: v.api,
        }))
    }

    // ---- maintenance ----

    /// Puts `host` into maintenance (`on`) or takes it out, fenced: the
    /// flag outlives the leader that set it, so a new leader carries an
    /// evacuation on.
    pub fn set_maintenance(
        &self,
        leader: &LeaderClaim,
        host: &str,
        on: bool,
    ) -> Result<(), StoreError> {
        check_name(host)?;
        let key = self.maintenance_key(host);
        let op = if on {
            KvOp::Put {
                key,
                value: Vec::new(),
                lease: 0,
            }
        } else {
            KvOp::Delete { key }
        };
        if self.kv.txn(&[self.fence(leader)], &[op])?.succeeded {
            return Ok(());
        }
        Err(StoreError::NotLeader {
            candidate: leader.candidate.clone(),
            token: leader.token,
        })
    }

    /// The hosts in maintenance, by name.
    pub fn maintenance(&self) -> Result<Vec<String>, StoreError> {
        let prefix = self.maintenance_key("");
        Ok(self
            .kv
            .range(&prefix)?
            .iter()
            .filter_map(|e| e.key.strip_prefix(&prefix).map(str::to_owned))
            .collect())
    }

    // ---- placement rules ----

    /// Replaces the placement rules every leader places by (fenced: a
    /// deposed leader's rules do not land).
    pub fn set_rules(&self, leader: &LeaderClaim, rules: &[Rule]) -> Result<(), StoreError> {
        let ops = [KvOp::Put {
            key: self.rules_key(),
            value: json(&rules),
            lease: 0,
        }];
        if self.kv.txn(&[self.fence(leader)], &ops)?.succeeded {
            return Ok(());
        }
        Err(StoreError::NotLeader {
            candidate: leader.candidate.clone(),
            token: leader.token,
        })
    }

    /// The placement rules last set, `None` when none were ever set (the
    /// daemons' configured rules stand).
    pub fn rules(&self) -> Result<Option<Vec<Rule>>, StoreError> {
        self.kv
            .get(&self.rules_key())?
            .map(|e| parse(&e))
            .transpose()
    }

    // ---- decisions in flight ----

    /// Records a decision before acting on it (fenced; a second record
    /// under the same id fails with [`StoreError::DuplicateDecision`]).
    pub fn record_decision(&self, leader: &LeaderClaim, d: &Decision) -> Result<(), StoreError> {
        check_name(&d.id)?;
        let key = self.decision_key(&d.id);
        let when = [self.fence(leader), Compare::CreateRevision(key.clone(), 0)];
        let ops = [KvOp::Put {
            key,
            value: json(d),
            lease: 0,
        }];
        if self.kv.txn(&when, &ops)?.succeeded {
            return Ok(());
        }
        if self.leader()?.is_none_or(|l| l.token != leader.token) {
            return Err(StoreError::NotLeader {
                candidate: leader.candidate.clone(),
                token: leader.token,
            });
        }
        Err(StoreError::DuplicateDecision { id: d.id.clone() })
    }

    /// Removes a decision once carried out (or abandoned), fenced.
    pub fn finish_decision(&self, leader: &LeaderClaim, id: &str) -> Result<(), StoreError> {
        check_name(id)?;
        let ops = [KvOp::Delete {
            key: self.decision_key(id),
        }];
        if self.kv.txn(&[self.fence(leader)], &ops)?.succeeded {
            return Ok(());
        }
        Err(StoreError::NotLeader {
            candidate: leader.candidate.clone(),
            token: leader.token,
        })
    }

    /// The decisions in flight, by id.
    pub fn decisions(&self) -> Result<Vec<Decision>, StoreError> {
        self.kv
            .range(&self.decision_key(""))?
            .iter()
            .map(parse)
            .collect()
    }

    // ---- changes ----

    /// The store's revision now (pass it to [`ClusterStore::wait_change`]).
    pub fn revision(&self) -> Result<Revision, StoreError> {
        Ok(self.kv.revision()?)
    }

    /// Waits until anything under the store's prefix changes after
    /// `after` (records, hosts dying, leadership, decisions) or `timeout`
    /// passes; returns the revision then.
    pub fn wait_change(&self, after: Revision, timeout: Duration) -> Result<Revision, StoreError> {
        Ok(self.kv.wait_change(&self.prefix, after, timeout)?)
    }
}
