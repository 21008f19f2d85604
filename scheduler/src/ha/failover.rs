//! The daemon's side of high availability on the cluster store: which
//! daemon leads ([`super::election`]), and what the leader does about it.
//!
//! - **Takeover.** A daemon that becomes leader loads the maintenance
//!   flags from the store (an evacuation a dead leader started goes on)
//!   and the placement rules last set through the API (when any were),
//!   and resolves the decisions a former leader left in flight: a restart
//!   whose record already moved is made sure to run on its new host, one
//!   whose record did not move is planned again; a migration left in
//!   flight is dropped (its ownership swap before the pause, fenced by
//!   the dead leader's token, can no longer succeed, so the migration
//!   either moved the record before or is abandoned with the VM on its
//!   source; one that fails after its swap, before GO, gives the record
//!   back to its source; the planner moves it again if it still should).
//! - **Adoption.** A VM an agent runs that has no record is recorded as
//!   started there.
//! - **Fencing.** A host whose lease expired and that has a fence driver
//!   ([`super::fence`]) is powered off from outside, from the first pass
//!   that sees it dead; a fence that fails is an event and a log line, and
//!   is tried again on every pass, the host's restarts held meanwhile.
//! - **Failover.** A host whose lease expired, once the hosts' self-fence
//!   margin has also passed (the agent fenced itself before its lease
//!   could expire; the margin covers clock rate drift) and, where it has
//!   a fence driver, its power-off is confirmed, has its VMs
//!   restarted elsewhere: highest priority first, placed with admission
//!   control's restart planner ([`super::restart::plan_restarts`]), each
//!   restart recorded as a decision, then a compare-and-swap of the VM's
//!   record (fenced by the leader's token; refused while the old owner's
//!   lease lives), then the start on the new host. A VM whose record last
//!   moved by a migration to the dead host goes back to the migration's
//!   source, which kept a paused, intact copy: it resumes from there with
//!   its memory, not from boot.
//!
//! Every step is an [`HaEvent`] (`GET /v1/ha/events`) and a log line.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::election::Election;
use super::restart::{plan_restarts, HaPolicy};
use crate::daemon::agent::error_chain;
use crate::daemon::Daemon;
use crate::model::PowerState;
use crate::store::{
    kv::Revision, ClusterStore, Decision, DecisionKind, LeaderClaim, OwnerRecord, StoreError,
    Transition,
};

/// Events kept for `GET /v1/ha/events` (the oldest are dropped first).
pub const EVENTS_KEPT: usize = 1000;

/// The leader's HA settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailoverConfig {
    /// Wait this long after a host's lease expired before restarting its
    /// VMs: the hosts' self-fence margin (an agent with `--lease-ttl T`
    /// fences 2/5 T before its lease can expire) plus clock drift.
    pub fence_margin: Duration,
    /// Admission control and CPU cap of restarts.
    pub policy: HaPolicy,
    /// How often the leader looks for dead hosts.
    pub every: Duration,
}

/// What happened, for operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HaEventKind {
    /// This daemon became the leader.
    Leading,
    /// A host's lease expired.
    HostDead,
    /// A dead host's lease is back.
    HostBack,
    /// A VM with no record was recorded where it runs.
    Adopted,
    /// A VM was restarted on another host after its host died.
    Restarted,
    /// A VM was not restarted (disabled, no room, the swap was refused).
    RestartRefused,
    /// A restart's start failed; retried.
    RestartFailed,
    /// A dead host was fenced from outside (power-off confirmed).
    HostFenced,
    /// Fencing a dead host failed; retried, its restarts held.
    FenceFailed,
    /// A VM start (not a restart) was refused by admission control: no
    /// room, or it would break the failover reserve.
    StartRefused,
    /// A decision left in flight by a former leader was resolved.
    DecisionResolved,
    /// A migration moved the VM's ownership.
    OwnershipMoved,
    /// A host's health provider warned: quarantined or evacuated.
    HostDegraded,
    /// A degraded host stayed healthy long enough: released.
    HostReleased,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaEvent {
    /// When (ms since the Unix epoch).
    pub unix_ms: u64,
    /// What.
    pub kind: HaEventKind,
    /// The VM, if one.
    pub vm: Option<String>,
    /// The host concerned (the dead one, or where the VM went).
    pub host: Option<String>,
    /// One line with the evidence.
    pub message: String,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Debug, Default)]
struct Progress {
    /// The token this daemon last took over with.
    acted_token: Option<Revision>,
    /// Hosts seen dead, since when (this daemon's clock).
    dead_since: HashMap<String, Instant>,
    /// Dead hosts whose fence driver confirmed the power-off.
    fenced: BTreeSet<String>,
    /// Refusals already reported (vm, epoch).
    refused: BTreeSet<(String, u64)>,
    events: VecDeque<HaEvent>,
}

/// The daemon's HA state: the store, the election, the failover loop.
#[derive(Debug)]
pub struct ClusterHa {
    /// The cluster store.
    pub store: ClusterStore,
    /// This daemon's candidacy.
    pub election: Election,
    /// Settings.
    pub config: FailoverConfig,
    progress: Mutex<Progress>,
}

/// A restart to carry out.
struct RestartJob {
    record: OwnerRecord,
    to: String,
    mem_mb: u64,
    /// Resume the paused copy the migration's source kept.
    from_source_copy: bool,
}

impl ClusterHa {
    /// HA over `store`, leading through `election`.
    pub fn new(store: ClusterStore, election: Election, config: FailoverConfig) -> Self {
        Self {
            store,
            election,
            config,
            progress: Mutex::new(Progress::default()),
        }
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an event and logs it.
    pub fn event(&self, kind: HaEventKind, vm: Option<&str>, host: Option<&str>, message: String) {
        info!(kind = ?kind, vm = vm.unwrap_or(""), host = host.unwrap_or(""), %message, "HA");
        let mut p = self.progress();
        if p.events.len() >= EVENTS_KEPT {
            p.events.pop_front();
        }
        p.events.push_back(HaEvent {
            unix_ms: unix_ms(),
            kind,
            vm: vm.map(str::to_owned),
            host: host.map(str::to_owned),
            message,
        });
    }

    /// The events kept, oldest first.
    pub fn events(&self) -> Vec<HaEvent> {
        self.progress().events.iter().cloned().collect()
    }

    /// The claim its writes carry while this daemon leads.
    pub fn claim(&self) -> Option<LeaderClaim> {
        self.election.leadership().map(|l| l.claim)
    }

    /// One pass of the leader's loop (a follower does nothing): take over
    /// if newly leading, resolve decisions left in flight, restart the VMs
    /// of dead hosts. Blocking.
    pub fn tick(&self, d: &Daemon) {
        let Some(me) = self.claim() else {
            d.metrics.ha.leading.set(0);
            return;
        };
        d.metrics.ha.leading.set(1);
        if let Err(e) = self.tick_leading(d, &me) {
            warn!(error = %error_chain(&e), "HA pass failed; retried next pass");
        }
    }

    fn tick_leading(&self, d: &Daemon, me: &LeaderClaim) -> Result<(), StoreError> {
        let new_token = self.progress().acted_token != Some(me.token);
        if new_token {
            self.take_over(d, me)?;
        }
        let hosts = self.store.hosts()?;
        let alive: BTreeSet<String> = hosts
            .iter()
            .filter(|h| h.alive)
            .map(|h| h.host.clone())
            .collect();
        let now = Instant::now();
        let mut ready_dead = BTreeSet::new();
        for h in &hosts {
            let mut p = self.progress();
            if h.alive {
                p.fenced.remove(&h.host);
                if p.dead_since.remove(&h.host).is_some() {
                    drop(p);
                    self.event(
                        HaEventKind::HostBack,
                        None,
                        Some(&h.host),
                        format!("host {}'s lease is back", h.host),
                    );
                }
                continue;
            }
            let since = match p.dead_since.get(&h.host) {
                Some(&t) => t,
                None => {
                    p.dead_since.insert(h.host.clone(), now);
                    drop(p);
                    d.metrics.ha.hosts_dead.inc();
                    self.event(
                        HaEventKind::HostDead,
                        None,
                        Some(&h.host),
                        format!(
                            "host {}'s lease expired; its VMs restart elsewhere after the fence margin ({:?})",
                            h.host, self.config.fence_margin
                        ),
                    );
                    now
                }
            };
            if now.duration_since(since) >= self.config.fence_margin {
                ready_dead.insert(h.host.clone());
            }
        }
        // Dead hosts with a fence driver are powered off first; their VMs
        // wait for the confirmation.
        let unfenced = self.fence_dead_hosts(d, &hosts);
        ready_dead.retain(|h| !unfenced.contains(h));
        let records = self.store.records()?;
        self.resolve_decisions(d, me, &records)?;
        let victims: Vec<&OwnerRecord> = records
            .iter()
            .filter(|r| ready_dead.contains(&r.host))
            .collect();
        if victims.is_empty() {
            return Ok(());
        }
        let jobs = self.plan(d, &records, &victims, &alive);
        let dead_since = self.progress().dead_since.clone();
        std::thread::scope(|s| {
            for job in jobs {
                let since = dead_since.get(&job.record.host).copied().unwrap_or(now);
                s.spawn(move || self.restart(d, me, job, since));
            }
        });
        Ok(())
    }

    /// A new leader: maintenance flags from the store, an event.
    fn take_over(&self, d: &Daemon, me: &LeaderClaim) -> Result<(), StoreError> {
        let maintenance: BTreeSet<String> = self.store.maintenance()?.into_iter().collect();
        let stored_rules = self.store.rules()?;
        let rules = {
            let mut st = crate::daemon::lock(&d.state);
            for h in &mut st.cluster.hosts {
                h.maintenance = maintenance.contains(&h.name);
            }
            let hosts: Vec<String> = st.cluster.hosts.iter().map(|h| h.name.clone()).collect();
            match stored_rules.map(|r| crate::plan::rules::check(&r, &hosts).map(|()| r)) {
                None => format!("{} as configured", st.cluster.rules.len()),
                Some(Ok(r)) => {
                    st.cluster.rules = r;
                    format!("{} as stored", st.cluster.rules.len())
                }
                Some(Err(e)) => {
                    warn!(error = %e, "the stored rules do not fit this daemon's hosts; placing by the configured ones");
                    format!(
                        "{} as configured (the stored ones: {e})",
                        st.cluster.rules.len()
                    )
                }
            }
        };
        d.metrics.ha.leaderships.inc();
        let mut p = self.progress();
        p.acted_token = Some(me.token);
        // Hosts seen dead before count from now: this leader's clock; and
        // they are fenced again (a power-off twice does no harm).
        p.dead_since.clear();
        p.fenced.clear();
        drop(p);
        self.event(
            HaEventKind::Leading,
            None,
            None,
            format!(
                "{} leads (token {}); rules: {rules}; hosts in maintenance: {}",
                me.candidate,
                me.token,
                if maintenance.is_empty() {
                    "none".to_string()
                } else {
                    maintenance.into_iter().collect::<Vec<_>>().join(", ")
                }
            ),
        );
        Ok(())
    }

    /// Fences every dead host that has a fence driver and is not fenced
    /// yet, in parallel; returns those whose power-off is not confirmed
    /// (their restarts wait).
    fn fence_dead_hosts(&self, d: &Daemon, hosts: &[crate::store::HostStatus]) -> BTreeSet<String> {
        let due: Vec<(usize, &str)> = {
            let p = self.progress();
            let st = crate::daemon::lock(&d.state);
            hosts
                .iter()
                .filter(|h| !h.alive && !p.fenced.contains(&h.host))
                .filter_map(|h| {
                    let i = st.cluster.host_by_name(&h.host)?;
                    d.fences.get(i)?.as_ref().map(|_| (i, h.host.as_str()))
                })
                .collect()
        };
        let results: Vec<(&str, Result<String, super::fence::FenceError>)> =
            std::thread::scope(|s| {
                let running: Vec<_> = due
                    .iter()
                    .map(|&(i, host)| {
                        s.spawn(move || {
                            let fence = d.fences[i].as_ref().expect("filtered above");
                            let power = d.drivers.get(i).and_then(|p| p.as_deref());
                            (host, fence.fence(host, power))
                        })
                    })
                    .collect();
                running
                    .into_iter()
                    .map(|t| t.join().expect("fence thread panicked"))
                    .collect()
            });
        let mut unfenced = BTreeSet::new();
        for (host, result) in results {
            match result {
                Ok(evidence) => {
                    self.progress().fenced.insert(host.to_owned());
                    d.metrics.ha.fences.inc();
                    self.event(
                        HaEventKind::HostFenced,
                        None,
                        Some(host),
                        format!("host {host} fenced: {evidence}"),
                    );
                }
                Err(e) => {
                    d.metrics.ha.fences_failed.inc();
                    let why = error_chain(&e);
                    warn!(host, error = %why, "fencing a dead host failed; retried next pass, its VMs are not restarted meanwhile");
                    self.event(
                        HaEventKind::FenceFailed,
                        None,
                        Some(host),
                        format!("fencing host {host} failed (retried; its VMs are not restarted until it is fenced): {why}"),
                    );
                    unfenced.insert(host.to_owned());
                }
            }
        }
        unfenced
    }

    /// Decisions no restart of this pass is carrying out: left by a former
    /// leader, or by a restart of this one whose start failed.
    fn resolve_decisions(
        &self,
        d: &Daemon,
        me: &LeaderClaim,
        records: &[OwnerRecord],
    ) -> Result<(), StoreError> {
        for dec in self.store.decisions()? {
            let rec = records.iter().find(|r| r.vm == dec.vm);
            let done = match &dec.kind {
                DecisionKind::Restart { to, .. } if rec.is_some_and(|r| &r.host == to) => {
                    // The record moved: make sure the VM runs there.
                    let mem = vm_mem(d, &dec.vm);
                    match ensure_running(d, &dec.vm, mem, to) {
                        Ok(()) => true,
                        Err(e) => {
                            self.event(
                                HaEventKind::RestartFailed,
                                Some(&dec.vm),
                                Some(to),
                                format!("restart of {} on {to} (decision {}): {e}", dec.vm, dec.id),
                            );
                            false
                        }
                    }
                }
                // A migration of this leader still running: not ours to
                // resolve.
                DecisionKind::Migrate { .. } if dec.token == me.token => false,
                _ => true,
            };
            if done {
                self.store.finish_decision(me, &dec.id)?;
                if dec.token != me.token {
                    self.event(
                        HaEventKind::DecisionResolved,
                        Some(&dec.vm),
                        None,
                        format!(
                            "decision {} of leader token {} ({:?}) resolved; record: {}",
                            dec.id,
                            dec.token,
                            dec.kind,
                            rec.map_or("none".to_string(), |r| format!(
                                "{} epoch {}",
                                r.host, r.epoch
                            ))
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// Where each victim restarts: back to a migration's source that keeps
    /// a paused copy, else by priority with the restart planner.
    fn plan(
        &self,
        d: &Daemon,
        records: &[OwnerRecord],
        victims: &[&OwnerRecord],
        alive: &BTreeSet<String>,
    ) -> Vec<RestartJob> {
        let mut c = crate::daemon::lock(&d.state).cluster.clone();
        let by_vm: BTreeMap<&str, &OwnerRecord> =
            records.iter().map(|r| (r.vm.as_str(), r)).collect();
        // The records are the truth about placement.
        for v in &mut c.vms {
            v.host = by_vm
                .get(v.name.as_str())
                .and_then(|r| c.hosts.iter().position(|h| h.name == r.host))
                .or(v.host);
        }
        let failed: Vec<usize> = (0..c.hosts.len())
            .filter(|&h| !alive.contains(&c.hosts[h].name) || c.hosts[h].power != PowerState::On)
            .collect();
        let victim_names: BTreeSet<&str> = victims.iter().map(|r| r.vm.as_str()).collect();
        let mut jobs = Vec::new();
        // Migrations whose destination died: back to the source's copy.
        for r in victims {
            if r.last != Transition::Migrate {
                continue;
            }
            let Some(src) = r.previous.as_deref().filter(|s| alive.contains(*s)) else {
                continue;
            };
            jobs.push(RestartJob {
                record: (*r).clone(),
                to: src.to_owned(),
                mem_mb: vm_mem(d, &r.vm),
                from_source_copy: true,
            });
        }
        // VMs on hosts dead but not past the margin, and those handled
        // above, take no part.
        for v in &mut c.vms {
            let on_failed = v.host.is_some_and(|h| failed.contains(&h));
            if on_failed
                && (!victim_names.contains(v.name.as_str())
                    || jobs.iter().any(|j| j.record.vm == v.name))
            {
                v.host = None;
            }
        }
        let plan = plan_restarts(&c, &failed, &self.config.policy);
        for (v, reason) in &plan.refused {
            let vm = &c.vms[*v].name;
            let epoch = by_vm.get(vm.as_str()).map_or(0, |r| r.epoch);
            if self.progress().refused.insert((vm.clone(), epoch)) {
                d.metrics.ha.restarts_refused.inc();
                self.event(
                    HaEventKind::RestartRefused,
                    Some(vm),
                    None,
                    reason.to_string(),
                );
            }
        }
        for (v, to) in plan.restarts {
            let vm = &c.vms[v];
            if let Some(r) = by_vm.get(vm.name.as_str()) {
                jobs.push(RestartJob {
                    record: (*r).clone(),
                    to: c.hosts[to].name.clone(),
                    mem_mb: vm.mem_mb,
                    from_source_copy: false,
                });
            }
        }
        // Records of VMs this daemon knows nothing about cannot be sized.
        for r in victims {
            if c.vm_by_name(&r.vm).is_none()
                && self.progress().refused.insert((r.vm.clone(), r.epoch))
            {
                self.event(
                    HaEventKind::RestartRefused,
                    Some(&r.vm),
                    Some(&r.host),
                    format!(
                        "VM {}: not in this daemon's model (no size known); not restarted",
                        r.vm
                    ),
                );
            }
        }
        jobs
    }

    fn restart(&self, d: &Daemon, me: &LeaderClaim, job: RestartJob, dead_since: Instant) {
        let RestartJob {
            record,
            to,
            mem_mb,
            from_source_copy,
        } = job;
        let vm = record.vm.as_str();
        let from = record.host.as_str();
        let decision = Decision {
            id: format!("restart-{vm}-{}", record.epoch),
            vm: vm.to_owned(),
            kind: DecisionKind::Restart {
                from: from.to_owned(),
                to: to.clone(),
            },
            token: me.token,
            reason: format!("host {from}'s lease expired"),
        };
        match self.store.record_decision(me, &decision) {
            Ok(()) => {}
            // Being carried out (or left to resolve): not twice.
            Err(StoreError::DuplicateDecision { .. }) => return,
            Err(e) => {
                warn!(vm, error = %error_chain(&e), "cannot record the restart decision");
                return;
            }
        }
        let t = Instant::now();
        let moved = match self.store.restart(me, &record, &to) {
            Ok(m) => m,
            Err(e) => {
                d.metrics.ha.restarts_refused.inc();
                self.event(
                    HaEventKind::RestartRefused,
                    Some(vm),
                    Some(&to),
                    format!(
                        "restart of {vm} on {to} refused by the store: {}",
                        error_chain(&e)
                    ),
                );
                let _ = self.store.finish_decision(me, &decision.id);
                return;
            }
        };
        let swap = t.elapsed();
        match ensure_running(d, vm, mem_mb, &to) {
            Ok(()) => {
                d.metrics.ha.restarts.inc();
                d.metrics
                    .ha
                    .restart_seconds
                    .observe(dead_since.elapsed().as_secs_f64());
                {
                    let mut st = crate::daemon::lock(&d.state);
                    let h = st.cluster.host_by_name(&to);
                    if let Some(v) = st.cluster.vm_by_name(vm) {
                        st.cluster.vms[v].host = h;
                    }
                }
                self.event(
                    HaEventKind::Restarted,
                    Some(vm),
                    Some(&to),
                    format!(
                        "{vm} {} on {to} (epoch {}; its host {from} died; record swap {:.1} ms, start {:.0} ms)",
                        if from_source_copy { "resumed from the migration source's paused copy" } else { "restarted" },
                        moved.epoch,
                        swap.as_secs_f64() * 1e3,
                        t.elapsed().saturating_sub(swap).as_secs_f64() * 1e3
                    ),
                );
                if let Err(e) = self.store.finish_decision(me, &decision.id) {
                    warn!(vm, error = %error_chain(&e), "cannot finish the restart decision");
                }
            }
            Err(e) => {
                d.metrics.ha.restarts_failed.inc();
                self.event(
                    HaEventKind::RestartFailed,
                    Some(vm),
                    Some(&to),
                    format!("{vm} owned by {to} now, but its start failed (retried): {e}"),
                )
            }
        }
    }
}

/// A VM's memory as the daemon's model has it (0: unknown, the agent's
/// default).
fn vm_mem(d: &Daemon, vm: &str) -> u64 {
    let st = crate::daemon::lock(&d.state);
    st.cluster
        .vm_by_name(vm)
        .map_or(0, |v| st.cluster.vms[v].mem_mb)
}

/// Starts `vm` on `host` unless it runs there already (a paused copy there
/// is resumed by the agent's start).
fn ensure_running(d: &Daemon, vm: &str, mem_mb: u64, host: &str) -> Result<(), String> {
    if let Ok(s) = d.executor.status(host) {
        if s.vms.iter().any(|v| v.name == vm && v.running) {
            return Ok(());
        }
    }
    d.executor.start_vm(vm, mem_mb, host).map_err(|e| e.chain())
}
