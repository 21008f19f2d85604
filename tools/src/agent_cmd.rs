//! `ferry agent`: one per host. Runs VMs (the workload guest, through the
//! `vm` crate) and performs live migrations with the engine when the
//! scheduler daemon asks. Speaks the agent protocol of
//! `ferry_scheduler::daemon::protocol` (HTTP/JSON under `/v1`; every failure
//! is a non-2xx answer with the reason).
//!
//! Migrations between agents go over `--lanes` lanes (default: one per
//! core, 4 to 8), with mutual TLS (`--tls-cert/--tls-key/--tls-ca`, the same CA on
//! every host: `ferry tls gen-certs DIR --nodes h1 h2 ...`) or, asked for by
//! name, `--insecure` plaintext; every agent of a cluster makes the same
//! choice. (The HTTP control protocol itself is plaintext: keep it on a
//! management network.)
//!
//! Incoming migrations are accepted on `--migration-listen` (default: the
//! `--listen` IP and a free port per migration); a fixed port there suits a
//! firewall rule or a relay, and `--migration-advertise` names the address
//! sources must connect to when it is not the listener's own (a NAT, a port
//! forward, a relay in front of the listener).
//!
//! A migration completes (the VM runs on the target, gone from here) or
//! fails and the VM keeps running here: never nowhere, never twice.
//!
//! With `--etcd ENDPOINTS` (a build with the `etcd` feature) the agent
//! joins the cluster store with a host lease of `--lease-ttl` and keeps
//! it alive; when it cannot renew it in time it fences itself (`--fence
//! pause|kill` its VMs) before the lease can expire, so that the VMs the
//! cluster restarts elsewhere no longer run here.
//!
//! On the store an agent runs only what the VMs' ownership records let it:
//! at start it does not boot a `--vm` whose record names another host, and
//! when it joins again after fencing it stops every VM whose record moved
//! elsewhere meanwhile (and resumes the ones still its own); it says so on
//! stderr and in its log. A migration the daemon asks for with an
//! ownership claim moves the VM's record to the destination once its live
//! rounds are done, right before the pause (a compare-and-swap under the
//! leader's token, the guest still running: nothing of it in the pause);
//! GO follows only that swap. If the swap fails the migration is
//! abandoned, and the VM keeps running here only if this host still owns
//! it. If the migration fails after the swap but before GO, the source
//! gives the record back to itself ([`ClusterStore::hand_back`]: no GO
//! went out, so the destination never runs the VM). A destination that
//! fenced itself refuses every GO until it joins again
//! ([`HandoverRecord::hold`]), so a record moved to a host whose lease
//! then lapses never has the VM resumed there. A source left with a paused copy (the swap's
//! outcome unknown, or GO sent and unanswered) follows the record: while
//! it names the destination, the source asks the destination's agent
//! (`POST /v1/handback`), which either runs the VM (the copy is dropped)
//! or refuses that migration's handover for good and gives the record
//! back (the copy resumes here, memory intact); while the destination
//! cannot be asked, the copy waits, and resumes when the leader's restart
//! brings the record back here once the destination's lease died.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use ferry_engine::{
    DestinationMigration, DestinationOptions, HandoverOutcome, HandoverRecord, MigrationOptions,
    PreGoHook, PreGoRefusal, SourceMigration,
};
use ferry_scheduler::daemon::client::JsonClient;
use ferry_scheduler::daemon::https::{ClientTls, TlsListener};
use ferry_scheduler::daemon::metrics::{self, MigrationMeasure, MigrationMetrics};
use ferry_scheduler::daemon::protocol::{
    AgentStatus, AgentVm, Done, HandbackReply, HandbackRequest, IncomingReply, IncomingRequest,
    LoadRequest, MigrateReply, MigrateRequest, Refusal, SwapReport, VmRequest, INCOMING_TIMEOUT,
};
use ferry_transport::lanes::MAX_LANES;
use ferry_transport::{default_lane_count, LaneListener, LaneOptions};
use ferry_vm::{host_tsc_khz, DirtyBackend, GuestParams, Vm, VmConfig};

use ferry_control::units::{parse_duration, BareUnit};
use ferry_scheduler::ha::lease_keeper::FenceMode;
use ferry_scheduler::store::{ClusterStore, GiveBack, LeaderClaim, OwnerRecord, StoreError};

use crate::security_args::{SecurityArgs, SecuritySpec};

/// `ferry agent`
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// This host's name (as in the daemon's cluster.toml).
    #[arg(long)]
    pub host: String,
    /// HTTP address to serve the agent protocol on.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
    /// VMs to start at once: NAME:MEM_MB[:CPU_MIPS] (repeatable).
    #[arg(long = "vm")]
    pub vms: Vec<String>,
    /// Pages/s each workload guest dirties.
    #[arg(long, default_value_t = 1000)]
    pub guest_rate: u64,
    /// Lanes (TCP connections) per outgoing migration (default: one per
    /// core, 4 to 8).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_LANES)))]
    pub lanes: Option<u16>,
    /// How migration streams between agents are secured.
    #[command(flatten)]
    pub security: SecurityArgs,
    /// etcd endpoints (comma-separated): keep this host's lease there and
    /// fence this host when it cannot (needs the `etcd` feature).
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// The host lease's TTL (`5`, `5s`, `2500ms`).
    #[arg(long, default_value = "5", value_parser = parse_lease_ttl)]
    pub lease_ttl: Duration,
    /// What fencing does to this host's VMs: `pause` or `kill`.
    #[arg(long, default_value = "pause")]
    pub fence: FenceMode,
    /// Where incoming migration streams are accepted: `IP:PORT`. A fixed
    /// port (for a firewall rule or a relay) takes one incoming migration
    /// at a time; port 0 picks a free one per migration. Default: the
    /// `--listen` IP, port 0.
    #[arg(long, value_name = "ADDR")]
    pub migration_listen: Option<SocketAddr>,
    /// The address sources are told to connect to for an incoming
    /// migration, when it is not the listener's own: a NAT or port
    /// forward, or a relay in front of `--migration-listen`.
    #[arg(long, value_name = "ADDR", requires = "migration_listen")]
    pub migration_advertise: Option<SocketAddr>,
}

/// Longest host lease TTL accepted.
const MAX_LEASE_TTL: Duration = Duration::from_secs(300);

fn parse_lease_ttl(s: &str) -> Result<Duration, String> {
    parse_duration(s, BareUnit::Secs, MAX_LEASE_TTL).map_err(|e| e.to_string())
}

struct HostedVm {
    vm: Arc<Vm>,
    mem_mb: u64,
    cpu_mips: f64,
}

struct Agent {
    /// Outgoing migrations, for `GET /metrics`.
    metrics: MigrationMetrics,
    /// Times this host fenced itself (`ferry_agent_fences`).
    fences: prometheus_client::metrics::counter::Counter,
    host: String,
    ip: IpAddr,
    guest_rate: u64,
    tsc_khz: u32,
    lanes: u16,
    security: SecuritySpec,
    /// The agent API's mutual TLS (from the same files as the lanes'),
    /// when this agent serves HTTPS; it also asks other agents with it.
    api_tls: Option<ClientTls>,
    /// Where incoming migration listeners bind.
    migration_listen: SocketAddr,
    /// What sources are told to connect to, when not the listener's own
    /// address.
    migration_advertise: Option<SocketAddr>,
    vms: Mutex<BTreeMap<String, HostedVm>>,
    /// Names with a migration out, a start or a hand-back in progress.
    busy: Mutex<std::collections::BTreeSet<String>>,
    /// What this host, as a destination, did with each incoming
    /// migration's GO (shared by every incoming migration), to answer a
    /// source that asks for a hand-back.
    handovers: HandoverRecord,
    /// The cluster store (`--etcd`): ownership records.
    store: Option<ClusterStore>,
}

type Answer<T> = Result<Json<T>, Refusal>;

fn done() -> Answer<Done> {
    Ok(Json(Done {}))
}

impl Agent {
    fn boot(&self, name: &str, mem_mb: u64, cpu_mips: f64) -> anyhow::Result<()> {
        if self.vms.lock().expect("vms lock").contains_key(name) {
            anyhow::bail!("VM {name} already runs on {}", self.host);
        }
        let params = GuestParams {
            rate: Some(self.guest_rate),
            tsc_khz: Some(u64::from(self.tsc_khz)),
            wss_bytes: Some((mem_mb << 20) / 4),
            verify: 32,
            ..GuestParams::default()
        };
        let vm = Vm::boot(&VmConfig {
            mem_bytes: mem_mb << 20,
            kernel: None,
            cmdline: params.to_cmdline(),
            dirty: DirtyBackend::Bitmap,
            cpus: 1,
        })
        .with_context(|| format!("starting VM {name}"))?;
        vm.wait_running(Duration::from_secs(120))
            .with_context(|| format!("VM {name} did not start"))?;
        tracing::info!(vm = name, mem_mb, "VM started");
        self.vms.lock().expect("vms lock").insert(
            name.to_owned(),
            HostedVm {
                vm: Arc::new(vm),
                mem_mb,
                cpu_mips,
            },
        );
        Ok(())
    }

    /// Fences this host: pauses or kills every VM it runs (the lease
    /// keeper could not renew the host's lease).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    fn fence(&self, mode: FenceMode) {
        self.fences.inc();
        // Before anything else: no incoming guest resumes here from now on.
        self.handovers
            .hold("the destination fenced itself: its host lease could not be renewed");
        let mut vms = self.vms.lock().expect("vms lock");
        match mode {
            FenceMode::Pause => {
                for (name, h) in vms.iter() {
                    match h.vm.pause() {
                        Ok(()) => tracing::warn!(vm = %name, "fenced: VM paused"),
                        Err(e) => {
                            tracing::error!(vm = %name, error = %e, "fencing: cannot pause VM")
                        }
                    }
                }
            }
            FenceMode::Kill => {
                for (name, h) in std::mem::take(&mut *vms) {
                    drop(h);
                    tracing::warn!(vm = %name, "fenced: VM killed");
                }
            }
        }
    }

    /// The VM's record when it names another host (the store's error
    /// when it cannot be read).
    fn owned_elsewhere(&self, vm: &str) -> Result<Option<OwnerRecord>, StoreError> {
        let Some(store) = &self.store else {
            return Ok(None);
        };
        Ok(store.record(vm)?.filter(|r| r.host != self.host))
    }

    /// After joining again: stop what this host no longer owns, resume
    /// what it still does. Returns whether every VM could be decided.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    fn reconcile(&self) -> bool {
        let names: Vec<String> = self.vms.lock().expect("vms lock").keys().cloned().collect();
        let mut decided = true;
        for name in names {
            decided &= self.follow_record(&name) != Follow::Undecided;
        }
        decided
    }

    /// Makes `vm` (held here) follow its record: resumed when this host
    /// owns it (or nobody does), stopped when a live host does; left
    /// paused while the owner is dead (the leader restarts it here or
    /// elsewhere) or the store cannot be read.
    fn follow_record(&self, vm: &str) -> Follow {
        let Some(store) = &self.store else {
            return Follow::Undecided;
        };
        let rec = match store.record(vm) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(vm, error = %ferry_scheduler::daemon::agent::error_chain(&e), "cannot read the VM's record; it stays as it is");
                return Follow::Undecided;
            }
        };
        match rec {
            Some(r) if r.host != self.host => {
                if !store.host_alive(&r.host).unwrap_or(false) {
                    return Follow::Undecided;
                }
                let gone = self.vms.lock().expect("vms lock").remove(vm);
                if gone.is_some() {
                    let msg = format!(
                        "ferry agent {}: stopping VM {vm}: it is not ours (its record names host {}, epoch {})",
                        self.host, r.host, r.epoch
                    );
                    tracing::warn!(vm, owner = %r.host, epoch = r.epoch, "stopping a VM this host does not own");
                    eprintln!("{msg}");
                }
                drop(gone);
                Follow::Stopped
            }
            _ => {
                let vms = self.vms.lock().expect("vms lock");
                if let Some(h) = vms.get(vm) {
                    if !matches!(h.vm.run_state(), ferry_vm::RunState::Running) {
                        match h.vm.resume() {
                            Ok(()) => {
                                tracing::info!(vm, "resumed: this host owns it");
                                eprintln!(
                                    "ferry agent {}: resumed VM {vm}: this host owns it",
                                    self.host
                                );
                            }
                            Err(e) => {
                                tracing::error!(vm, error = %e, "cannot resume a VM this host owns");
                                return Follow::Undecided;
                            }
                        }
                    }
                }
                Follow::Runs
            }
        }
    }

    /// A paused copy left by migration `migration_id` to `dest` (its agent
    /// at `dest_addr`): follows its record until it runs here or is
    /// dropped. While the record names the destination, the source asks
    /// the destination for a hand-back ([`Agent::hand_back`] there): it
    /// runs the VM (the copy goes) or gives the record back (the copy
    /// resumes here). While it cannot be asked (killed, cut off), the copy
    /// waits: the destination's lease is alive until it expires, and then
    /// the leader brings the record back here, to this copy.
    fn follow_paused_copy(
        self: &Arc<Self>,
        vm: String,
        migration_id: u64,
        dest: String,
        dest_addr: String,
    ) {
        let agent = self.clone();
        std::thread::spawn(move || {
            let mut last_error = String::new();
            loop {
                if !agent.vms.lock().expect("vms lock").contains_key(&vm) {
                    return;
                }
                let follow = match agent.store.as_ref().map(|s| s.record(&vm)) {
                    Some(Ok(Some(r))) if r.host == dest => {
                        match agent.ask_hand_back(&dest, &dest_addr, &vm, migration_id) {
                            Ok(HandbackReply::Runs) => agent.follow_record(&vm),
                            Ok(HandbackReply::HandedBack { epoch, reason }) => {
                                tracing::warn!(vm = %vm, to = %dest, epoch, %reason, "the destination did not resume the VM and gave its record back");
                                agent.follow_record(&vm)
                            }
                            Err(e) => {
                                if e != last_error {
                                    tracing::warn!(vm = %vm, to = %dest, error = %e, "cannot ask the destination for a hand-back yet; the paused copy waits");
                                    last_error = e;
                                }
                                Follow::Undecided
                            }
                        }
                    }
                    _ => agent.follow_record(&vm),
                };
                match follow {
                    Follow::Undecided => std::thread::sleep(Duration::from_millis(200)),
                    Follow::Runs | Follow::Stopped => return,
                }
            }
        });
    }

    /// Destination side of `POST /v1/handback`: a migration's source keeps
    /// the guest's paused copy while the record names this host; the
    /// decision is [`ClusterStore::give_back`]'s, with the VM's name held
    /// in `busy` (which a start also takes) meanwhile.
    fn hand_back(&self, req: &HandbackRequest) -> Result<HandbackReply, Refusal> {
        let Some(store) = &self.store else {
            return Err(Refusal::bad_request(format!(
                "{} keeps no ownership records (no --etcd): nothing to give back",
                self.host
            )));
        };
        if !self.busy.lock().expect("busy lock").insert(req.vm.clone()) {
            return Err(Refusal::conflict(format!(
                "VM {} is migrating or starting on {}; ask again",
                req.vm, self.host
            )));
        }
        let _unbusy = Unbusy(self, req.vm.clone());
        let holds_copy = self.vms.lock().expect("vms lock").contains_key(&req.vm);
        let decided = store.give_back(&self.host, &req.vm, holds_copy, || {
            match self.handovers.answer(req.migration_id) {
                HandoverOutcome::Resumed(_) => Ok(()),
                HandoverOutcome::NotResumed(why) => Err(why),
            }
        });
        let (back, reason) = match decided {
            Ok(GiveBack::Runs) => return Ok(HandbackReply::Runs),
            Ok(GiveBack::HandedBack { record, reason }) => (record, reason),
            Err(e) => {
                let why = format!(
                    "giving {}'s record back: {}",
                    req.vm,
                    ferry_scheduler::daemon::agent::error_chain(&e)
                );
                return Err(match e {
                    StoreError::Unavailable(_) => Refusal::unavailable(why),
                    _ => Refusal::conflict(why),
                });
            }
        };
        tracing::warn!(vm = %req.vm, to = ?back.previous, epoch = back.epoch, %reason, "gave a VM's record back to its migration's source: the handover was refused here");
        eprintln!(
            "ferry agent {}: gave VM {}'s record back to {} (epoch {}): migration {:#x} was not resumed here ({reason})",
            self.host, req.vm, back.host, back.epoch, req.migration_id
        );
        Ok(HandbackReply::HandedBack {
            epoch: back.epoch,
            reason,
        })
    }

    fn status(&self) -> AgentStatus {
        let vms = self.vms.lock().expect("vms lock");
        AgentStatus {
            host: self.host.clone(),
            vms: vms
                .iter()
                .map(|(name, h)| AgentVm {
                    name: name.clone(),
                    mem_mb: h.mem_mb,
                    cpu_mips: h.cpu_mips,
                    running: matches!(h.vm.run_state(), ferry_vm::RunState::Running),
                })
                .collect(),
        }
    }

    /// The pre-pause hook moving `rec` to `to` under the leader's token
    /// (the guest still running; GO follows it); the swap's report lands
    /// in `report`.
    fn ownership_swap(
        &self,
        req: &MigrateRequest,
        report: Arc<Mutex<Option<SwapReport>>>,
    ) -> Result<Option<PreGoHook>, Refusal> {
        let (Some(store), Some(claim)) = (&self.store, &req.ownership) else {
            return Ok(None);
        };
        let rec = store
            .record(&req.vm)
            .map_err(|e| {
                Refusal::unavailable(format!(
                    "reading {}'s record: {}",
                    req.vm,
                    ferry_scheduler::daemon::agent::error_chain(&e)
                ))
            })?
            .ok_or_else(|| Refusal::conflict(format!("VM {} has no ownership record", req.vm)))?;
        if rec.host != self.host || rec.epoch != claim.epoch {
            return Err(Refusal::conflict(format!(
                "VM {}'s record names {} at epoch {}, not {} at epoch {}",
                req.vm, rec.host, rec.epoch, self.host, claim.epoch
            )));
        }
        let leader = LeaderClaim {
            candidate: claim.candidate.clone(),
            token: claim.token,
        };
        let (store, to, me) = (store.clone(), req.target_host.clone(), self.host.clone());
        Ok(Some(PreGoHook::new(move || {
            let t = std::time::Instant::now();
            let swapped = store.migrate(&leader, &rec, &to);
            let swap_ms = t.elapsed().as_secs_f64() * 1e3;
            match swapped {
                Ok(new) => {
                    *report.lock().expect("swap report lock") = Some(SwapReport {
                        epoch: new.epoch,
                        swap_ms,
                    });
                    Ok(())
                }
                Err(e) => {
                    // Unchanged record (deposed leader, dead destination):
                    // still ours, it runs on. Moved elsewhere: not ours.
                    // Unknown (the store did not answer): the guest is
                    // paused and kept so.
                    let keep_paused = match &e {
                        StoreError::NotLeader { .. } | StoreError::HostDead { .. } => false,
                        StoreError::Conflict { current, .. } => {
                            current.as_ref().is_none_or(|c| c.host != me)
                        }
                        _ => true,
                    };
                    Err(PreGoRefusal {
                        reason: format!(
                            "the ownership swap to {to} failed: {}",
                            ferry_scheduler::daemon::agent::error_chain(&e)
                        ),
                        keep_paused,
                    })
                }
            }
        })))
    }

    /// The record moved to the destination before the pause, but the
    /// migration failed before GO (or the destination refused it) and the
    /// guest runs here again: the record comes back by a hand-back to this
    /// source. No leader token: no GO went out (or it was refused), so the
    /// destination never runs the VM, and the compare on the record's
    /// revision loses to any transition made since.
    fn swap_back(&self, req: &MigrateRequest, epoch: u64) {
        let Some(store) = &self.store else {
            return;
        };
        let back = store.record(&req.vm).and_then(|r| match r {
            Some(r) if r.host == req.target_host && r.epoch == epoch => {
                store.hand_back(&r).map(Some)
            }
            _ => Ok(None),
        });
        match back {
            Ok(Some(r)) => {
                tracing::warn!(vm = %req.vm, epoch = r.epoch, "the migration failed before GO took: the record is back here")
            }
            Ok(None) => {
                // The record moved on since the swap (a restart elsewhere
                // while the destination's lease lapsed): the guest that
                // resumed here is not ours any more, and the record says
                // what becomes of it (stopped when another live host owns
                // it), so it never runs on two hosts.
                tracing::error!(vm = %req.vm, "the migration failed before GO and the record moved on since: following the record");
                self.follow_record(&req.vm);
            }
            Err(e) => {
                tracing::error!(vm = %req.vm, error = %ferry_scheduler::daemon::agent::error_chain(&e), "the destination refused GO and the record could not come back: the leader must reconcile")
            }
        }
    }

    /// Source side: ask the target for a listener, then run the engine.
    fn migrate(self: &Arc<Self>, req: &MigrateRequest) -> anyhow::Result<MigrateReply> {
        let (vm, mem_mb, cpu_mips) = {
            let vms = self.vms.lock().expect("vms lock");
            let h = vms
                .get(&req.vm)
                .with_context(|| format!("no VM {} on {}", req.vm, self.host))?;
            (h.vm.clone(), h.mem_mb, h.cpu_mips)
        };
        if !self.busy.lock().expect("busy lock").insert(req.vm.clone()) {
            anyhow::bail!("VM {} is already migrating", req.vm);
        }
        let _unbusy = Unbusy(self, req.vm.clone());
        let target: SocketAddr = req
            .target
            .parse()
            .with_context(|| format!("bad target address {}", req.target))?;
        let reply: IncomingReply = self
            .agent_client(&req.target_host, target, Duration::from_secs(30))
            .post(
                "/v1/incoming",
                &IncomingRequest {
                    vm: req.vm.clone(),
                    mem_mb,
                    cpu_mips,
                },
            )
            .with_context(|| format!("asking {} to receive {}", req.target_host, req.vm))?;
        let to = reply
            .addr
            .unwrap_or_else(|| SocketAddr::new(target.ip(), reply.port).to_string());
        let lanes = ferry_control::connect_lanes(&to, self.lanes, &self.security)
            .with_context(|| format!("opening the migration stream to {}", req.target_host))?;
        let swap = Arc::new(Mutex::new(None));
        let opts = MigrationOptions {
            pre_pause: self
                .ownership_swap(req, swap.clone())
                .map_err(|r| anyhow::anyhow!(r.error))?,
            ..MigrationOptions::default()
        };
        let summary = match SourceMigration::new(vm, opts).run_lanes(lanes, |_| {}) {
            Ok(s) => s,
            Err(e) => {
                if let (Some(id), Some(_)) = (e.paused_migration(), &self.store) {
                    // The record decides what becomes of the paused copy.
                    self.follow_paused_copy(
                        req.vm.clone(),
                        id,
                        req.target_host.clone(),
                        req.target.clone(),
                    );
                } else if let Some(moved) = swap.lock().expect("swap report lock").take() {
                    // The migration failed after the record moved, before
                    // GO took: the guest runs here again, so must its
                    // record.
                    self.swap_back(req, moved.epoch);
                }
                return Err(anyhow::Error::new(e)
                    .context(format!("migrating {} to {}", req.vm, req.target_host)));
            }
        };
        tracing::info!(vm = %req.vm, to = %req.target_host, downtime_ms = summary.downtime.as_secs_f64() * 1e3, "migrated");
        self.vms.lock().expect("vms lock").remove(&req.vm);
        let ownership = swap.lock().expect("swap report lock").take();
        Ok(MigrateReply {
            seconds: summary.total.as_secs_f64(),
            downtime_ms: summary.downtime.as_secs_f64() * 1e3,
            bytes: summary.wire_bytes,
            ownership,
        })
    }

    /// Destination side: a listener for one migration of `req.vm`.
    fn incoming(self: &Arc<Self>, req: IncomingRequest) -> Result<IncomingReply, Refusal> {
        if self.vms.lock().expect("vms lock").contains_key(&req.vm) {
            return Err(Refusal::conflict(format!(
                "VM {} already runs on {}",
                req.vm, self.host
            )));
        }
        let security = self
            .security
            .load()
            .map_err(|e| Refusal::failed(format!("{:#}", anyhow::Error::new(e))))?;
        let mut listener = match LaneListener::bind(
            self.migration_listen,
            LaneOptions::new(1, security),
        ) {
            Ok(l) => l,
            Err(ferry_transport::TransportError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse
                    && self.migration_listen.port() != 0 =>
            {
                return Err(Refusal::conflict(format!(
                        "the migration port {} is taken (another incoming migration?): a fixed --migration-listen port takes one at a time",
                        self.migration_listen
                    )));
            }
            Err(e) => {
                return Err(Refusal::failed(format!(
                    "{:#}",
                    anyhow::Error::new(e).context("binding a migration listener")
                )))
            }
        };
        let bound = listener
            .local_addr()
            .map_err(|e| Refusal::failed(e.to_string()))?;
        let reply = IncomingReply {
            port: bound.port(),
            addr: incoming_addr(bound, self.migration_advertise),
        };
        let agent = self.clone();
        // If no source comes (it failed before connecting), wake the accept
        // with a connection of our own once INCOMING_TIMEOUT has passed,
        // so the listener is dropped and its port freed.
        let (arrived, arrived_rx) = std::sync::mpsc::channel::<()>();
        let wake = if bound.ip().is_unspecified() {
            SocketAddr::new(self.ip, bound.port())
        } else {
            bound
        };
        let vm_name = req.vm.clone();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                arrived_rx.recv_timeout(INCOMING_TIMEOUT)
            {
                tracing::warn!(vm = %vm_name, "no migration arrived in {INCOMING_TIMEOUT:?}; closing its listener");
                let _ = std::net::TcpStream::connect_timeout(&wake, Duration::from_secs(5));
            }
        });
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let accepted = loop {
                match listener.accept_session() {
                    Ok(lanes) => break Ok(lanes),
                    Err(e) if started.elapsed() >= INCOMING_TIMEOUT => {
                        break Err(anyhow::Error::new(e)
                            .context(format!("no source in {INCOMING_TIMEOUT:?}")))
                    }
                    Err(e) => {
                        tracing::warn!(vm = %req.vm, error = %e, "refused a connection; still waiting for the source")
                    }
                }
            };
            let _ = arrived.send(());
            let result = accepted.and_then(|lanes| {
                let (vm, _) = DestinationMigration::accept_lanes(
                    lanes,
                    &DestinationOptions {
                        record: agent.handovers.clone(),
                        ..DestinationOptions::default()
                    },
                    |layout| Ok(Vm::incoming(layout.bytes(), DirtyBackend::Bitmap)?),
                )?;
                Ok(vm)
            });
            match result {
                Ok(vm) => {
                    tracing::info!(vm = %req.vm, "VM arrived");
                    agent.vms.lock().expect("vms lock").insert(
                        req.vm.clone(),
                        HostedVm {
                            vm: Arc::new(vm),
                            mem_mb: req.mem_mb,
                            cpu_mips: req.cpu_mips,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(vm = %req.vm, error = %format!("{e:#}"), "incoming migration failed")
                }
            }
            // The listener (and its port) is dropped here, on every path.
            drop(listener);
        });
        Ok(reply)
    }
}

impl Agent {
    /// A client for the agent of `host` at `addr`, secured as this agent's
    /// own API is.
    fn agent_client(&self, host: &str, addr: SocketAddr, timeout: Duration) -> JsonClient {
        JsonClient::for_agent(host, addr, self.api_tls.as_ref(), Some(timeout))
    }

    /// Asks the agent of `host` at `addr` (a migration's destination) for
    /// a hand-back of `vm` after migration `migration_id`; why it could
    /// not answer.
    fn ask_hand_back(
        &self,
        host: &str,
        addr: &str,
        vm: &str,
        migration_id: u64,
    ) -> Result<HandbackReply, String> {
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| format!("bad agent address {addr:?}"))?;
        self.agent_client(host, addr, Duration::from_secs(5))
            .post(
                "/v1/handback",
                &HandbackRequest {
                    vm: vm.to_owned(),
                    migration_id,
                },
            )
            .map_err(|e| ferry_scheduler::daemon::agent::error_chain(&e))
    }
}

/// Where a source connects for an incoming migration, when the agent must
/// say: the advertised address, or a listener bound to an IP of its own
/// (`None`: the port on the agent's HTTP address, as sources assume).
fn incoming_addr(bound: SocketAddr, advertise: Option<SocketAddr>) -> Option<String> {
    advertise
        .or((!bound.ip().is_unspecified()).then_some(bound))
        .map(|a| a.to_string())
}

/// What [`Agent::follow_record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Follow {
    /// It runs here (this host owns it).
    Runs,
    /// Stopped: another live host owns it.
    Stopped,
    /// Left as it was (owner dead, store unreadable).
    Undecided,
}

struct Unbusy<'a>(&'a Agent, String);

impl Drop for Unbusy<'_> {
    fn drop(&mut self) {
        self.0.busy.lock().expect("busy lock").remove(&self.1);
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("agent task panicked")
}

async fn start_vm(State(a): State<Arc<Agent>>, Json(r): Json<VmRequest>) -> Answer<Done> {
    // Held for the whole start: a migration out or a hand-back of the
    // VM excludes it (a hand-back decides the record meanwhile).
    if !a.busy.lock().expect("busy lock").insert(r.vm.clone()) {
        return Err(Refusal::conflict(format!(
            "VM {} is migrating or being decided on {}",
            r.vm, a.host
        )));
    }
    let _unbusy = Unbusy(&a, r.vm.clone());
    let held = a
        .vms
        .lock()
        .expect("vms lock")
        .get(&r.vm)
        .map(|h| h.vm.clone());
    if let Some(vm) = &held {
        if matches!(vm.run_state(), ferry_vm::RunState::Running) {
            return Err(Refusal::conflict(format!(
                "VM {} already runs on {}",
                r.vm, a.host
            )));
        }
    }
    // Whether booted or, for a paused copy (fenced, or a migration's
    // source), resumed with its memory intact: only when this host owns it.
    let a2 = a.clone();
    let name = r.vm.clone();
    let owner = blocking(move || a2.owned_elsewhere(&name))
        .await
        .map_err(|e| Refusal::unavailable(ferry_scheduler::daemon::agent::error_chain(&e)))?;
    if let Some(rec) = owner {
        return Err(Refusal::conflict(format!(
            "VM {} belongs to host {} (epoch {})",
            r.vm, rec.host, rec.epoch
        )));
    }
    if let Some(vm) = held {
        vm.resume()
            .map_err(|e| Refusal::failed(format!("resuming {}: {e}", r.vm)))?;
        tracing::info!(vm = %r.vm, "paused copy resumed");
        eprintln!(
            "ferry agent {}: resumed the paused copy of {}",
            a.host, r.vm
        );
        return done();
    }
    let a2 = a.clone();
    blocking(move || a2.boot(&r.vm, r.mem_mb, 0.0))
        .await
        .map_err(|e| Refusal::failed(format!("{e:#}")))?;
    done()
}

async fn shutdown_vm(State(a): State<Arc<Agent>>, Json(r): Json<VmRequest>) -> Answer<Done> {
    if a.busy.lock().expect("busy lock").contains(&r.vm) {
        return Err(Refusal::conflict(format!("VM {} is migrating", r.vm)));
    }
    let gone = a.vms.lock().expect("vms lock").remove(&r.vm);
    let h = gone.ok_or_else(|| Refusal::not_found(format!("no VM {} on {}", r.vm, a.host)))?;
    blocking(move || drop(h)).await;
    done()
}

async fn migrate(
    State(a): State<Arc<Agent>>,
    Json(r): Json<MigrateRequest>,
) -> Answer<MigrateReply> {
    if !a.vms.lock().expect("vms lock").contains_key(&r.vm) {
        return Err(Refusal::not_found(format!("no VM {} on {}", r.vm, a.host)));
    }
    if a.busy.lock().expect("busy lock").contains(&r.vm) {
        return Err(Refusal::conflict(format!(
            "VM {} is already migrating",
            r.vm
        )));
    }
    let started = std::time::Instant::now();
    let metrics = a.metrics.clone();
    match blocking(move || a.migrate(&r)).await {
        Ok(reply) => {
            metrics.done(&MigrationMeasure {
                seconds: started.elapsed().as_secs_f64(),
                downtime_ms: Some(reply.downtime_ms),
                bytes: Some(reply.bytes),
            });
            Ok(Json(reply))
        }
        Err(e) => {
            metrics.failed();
            Err(Refusal::failed(format!("{e:#}")))
        }
    }
}

async fn incoming(
    State(a): State<Arc<Agent>>,
    Json(r): Json<IncomingRequest>,
) -> Answer<IncomingReply> {
    if a.vms.lock().expect("vms lock").contains_key(&r.vm) {
        return Err(Refusal::conflict(format!(
            "VM {} already runs on {}",
            r.vm, a.host
        )));
    }
    Ok(Json(blocking(move || a.incoming(r)).await?))
}

async fn handback(
    State(a): State<Arc<Agent>>,
    Json(r): Json<HandbackRequest>,
) -> Answer<HandbackReply> {
    Ok(Json(blocking(move || a.hand_back(&r)).await?))
}

async fn set_load(State(a): State<Arc<Agent>>, Json(r): Json<LoadRequest>) -> Answer<Done> {
    let mut vms = a.vms.lock().expect("vms lock");
    let h = vms
        .get_mut(&r.vm)
        .ok_or_else(|| Refusal::not_found(format!("no VM {} on {}", r.vm, a.host)))?;
    h.cpu_mips = r.cpu_mips;
    done()
}

async fn guest_status(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Answer<ferry_vm::GuestStatus> {
    let vms = a.vms.lock().expect("vms lock");
    let h = vms
        .get(&name)
        .ok_or_else(|| Refusal::not_found(format!("no VM {name} on {}", a.host)))?;
    Ok(Json(h.vm.status()))
}

/// Runs the agent until killed.
pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    // Bad security flags or unreadable TLS files fail here, not at the
    // first migration.
    let security = args.security.spec()?;
    let tls = match security.load()? {
        ferry_transport::Security::Tls(settings) => Some(settings),
        ferry_transport::Security::Insecure => None,
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let agent = Arc::new(Agent {
        host: args.host.clone(),
        ip: args.listen.ip(),
        guest_rate: args.guest_rate,
        tsc_khz: host_tsc_khz().context("asking KVM for the TSC frequency")?,
        lanes: args.lanes.unwrap_or_else(default_lane_count),
        security,
        api_tls: tls
            .as_deref()
            .map(ClientTls::from_settings)
            .transpose()
            .context("the agent API's TLS")?,
        migration_listen: args
            .migration_listen
            .unwrap_or(SocketAddr::new(args.listen.ip(), 0)),
        migration_advertise: args.migration_advertise,
        vms: Mutex::new(BTreeMap::new()),
        busy: Mutex::new(Default::default()),
        handovers: HandoverRecord::default(),
        metrics: MigrationMetrics::register(&mut registry, "ferry_agent"),
        fences: {
            let c = prometheus_client::metrics::counter::Counter::default();
            registry.register(
                "ferry_agent_fences",
                "Times this host fenced itself (its lease could not be renewed)",
                c.clone(),
            );
            c
        },
        store: store_of(&args)?,
    });
    // Joined before booting: a VM owned elsewhere is not booted here.
    keep_lease(&agent, &args)?;
    for spec in &args.vms {
        let mut it = spec.split(':');
        let (Some(name), Some(mem)) = (it.next(), it.next()) else {
            anyhow::bail!("--vm {spec}: want NAME:MEM_MB[:CPU_MIPS]");
        };
        let mem: u64 = mem
            .parse()
            .with_context(|| format!("--vm {spec}: MEM_MB"))?;
        let cpu: f64 = it
            .next()
            .map(str::parse)
            .transpose()
            .with_context(|| format!("--vm {spec}: CPU_MIPS"))?
            .unwrap_or(0.0);
        if let Some(rec) = agent
            .owned_elsewhere(name)
            .context("reading the VM's record")?
        {
            eprintln!(
                "ferry agent {}: not starting VM {name}: it is not ours (its record names host {}, epoch {})",
                args.host, rec.host, rec.epoch
            );
            continue;
        }
        agent.boot(name, mem, cpu)?;
    }
    let registry = Arc::new(registry);
    let app = Router::new()
        .route(
            "/v1/status",
            get(|State(a): State<Arc<Agent>>| async move { Json(a.status()) }),
        )
        .route("/v1/vms/start", post(start_vm))
        .route("/v1/vms/shutdown", post(shutdown_vm))
        .route("/v1/migrate", post(migrate))
        .route("/v1/incoming", post(incoming))
        .route("/v1/handback", post(handback))
        .route("/v1/vms/load", post(set_load))
        .route("/v1/vms/{name}", get(guest_status))
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
                        metrics::encode(&registry),
                    )
                }
            }),
        )
        .with_state(agent.clone());
    let (agent_lanes, agent_security) = (agent.lanes, agent.security.describe());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let local = listener.local_addr()?;
        let api = if tls.is_some() {
            "HTTPS, mutual TLS"
        } else {
            "plain HTTP"
        };
        ferry_scheduler::daemon::notify_systemd(ferry_scheduler::daemon::SystemdState::Ready);
        eprintln!(
            "ferry agent {}: serving on {local} ({api}; migrations: {agent_lanes} lanes, {agent_security})",
            args.host,
        );
        match tls {
            Some(settings) => axum::serve(TlsListener::new(listener, &settings)?, app)
                .await
                .context("agent HTTPS server"),
            None => axum::serve(listener, app)
                .await
                .context("agent HTTP server"),
        }
    })
}

/// The cluster store, with `--etcd`.
#[cfg(feature = "etcd")]
fn store_of(args: &AgentArgs) -> anyhow::Result<Option<ClusterStore>> {
    use ferry_scheduler::store::{etcd::EtcdOptions, DEFAULT_PREFIX};
    if args.etcd.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        ClusterStore::on_etcd(&args.etcd, EtcdOptions::default(), DEFAULT_PREFIX)
            .context("connecting to etcd")?,
    ))
}

#[cfg(not(feature = "etcd"))]
fn store_of(args: &AgentArgs) -> anyhow::Result<Option<ClusterStore>> {
    if args.etcd.is_empty() {
        return Ok(None);
    }
    anyhow::bail!("--etcd needs ferry built with the etcd feature (cargo build --features etcd)")
}

/// With `--etcd`: joins the cluster store and keeps this host's lease,
/// fencing the agent's VMs when it cannot; after fencing, joins again as
/// soon as it can and makes its VMs follow their records.
fn keep_lease(agent: &Arc<Agent>, args: &AgentArgs) -> anyhow::Result<()> {
    use ferry_scheduler::ha::lease_keeper::{FenceEvent, KeeperConfig, LeaseKeeper};

    let Some(store) = agent.store.clone() else {
        return Ok(());
    };
    let cfg = KeeperConfig::for_ttl(args.lease_ttl, args.fence);
    let start = {
        let (agent, store, host) = (agent.clone(), store.clone(), args.host.clone());
        move || {
            let fenced = agent.clone();
            LeaseKeeper::start(
                store.clone(),
                &host,
                cfg,
                Box::new(move |e: &FenceEvent| fenced.fence(e.mode)),
            )
        }
    };
    let mut keeper = start().context("keeping this host's lease")?;
    eprintln!(
        "ferry agent {}: host lease {:x} on etcd (TTL {:?}, fence: {:?})",
        args.host,
        keeper.lease().lease,
        keeper.lease().ttl,
        args.fence
    );
    let (agent, host) = (agent.clone(), args.host.clone());
    std::thread::Builder::new()
        .name("lease-rejoin".into())
        .spawn(move || loop {
            let Some(ev) = keeper.wait_fenced(Duration::from_secs(3600)) else {
                continue;
            };
            eprintln!("ferry agent {host}: fenced ({:?}: {:?}); joining again", ev.mode, ev.reason);
            keeper = loop {
                match start() {
                    Ok(k) => break k,
                    Err(e) => {
                        tracing::warn!(error = %format!("{:#}", anyhow::Error::new(e)), "cannot join the cluster again yet");
                        std::thread::sleep(cfg.renew_every);
                    }
                }
            };
            agent.handovers.release();
            eprintln!(
                "ferry agent {host}: joined again (lease {:x}); VMs follow their records",
                keeper.lease().lease
            );
            while !agent.reconcile() {
                std::thread::sleep(cfg.renew_every);
            }
        })
        .context("starting the lease thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_told_the_advertised_or_own_listener_address_only_when_needed() {
        let any: SocketAddr = "0.0.0.0:7410".parse().unwrap();
        let own: SocketAddr = "10.0.2.1:7410".parse().unwrap();
        let relay: SocketAddr = "10.0.3.9:9000".parse().unwrap();
        assert_eq!(
            incoming_addr(any, None),
            None,
            "the port on the agent's address"
        );
        assert_eq!(incoming_addr(own, None).as_deref(), Some("10.0.2.1:7410"));
        assert_eq!(
            incoming_addr(own, Some(relay)).as_deref(),
            Some("10.0.3.9:9000")
        );
        assert_eq!(
            incoming_addr(any, Some(relay)).as_deref(),
            Some("10.0.3.9:9000")
        );
    }
}
