//! `ferry agent`: one per host. Runs VMs (the workload guest, through the
//! `vm` crate) and performs live migrations with the engine when the
//! scheduler daemon asks. Speaks the agent protocol of
//! `ferry_scheduler::daemon::protocol` (HTTP/JSON under `/v1`; every failure
//! is a non-2xx answer with the reason).
//!
//! Migrations between agents go over `--lanes` lanes (default: one per
//! core), with mutual TLS (`--tls-cert/--tls-key/--tls-ca`, the same CA on
//! every host: `ferry tls gen-certs DIR --nodes h1 h2 ...`) or, asked for by
//! name, `--insecure` plaintext; every agent of a cluster makes the same
//! choice. (The HTTP control protocol itself is plaintext: keep it on a
//! management network.)
//!
//! A migration completes (the VM runs on the target, gone from here) or
//! fails and the VM keeps running here: never nowhere, never twice.
//!
//! With `--etcd ENDPOINTS` (a build with the `etcd` feature) the agent
//! joins the cluster store with a host lease of `--lease-ttl` and keeps
//! it alive; when it cannot renew it in time it fences itself (`--fence
//! pause|kill` its VMs) before the lease can expire, so that the VMs the
//! cluster restarts elsewhere no longer run here.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use ferry_engine::{DestinationMigration, DestinationOptions, MigrationOptions, SourceMigration};
use ferry_scheduler::daemon::client::JsonClient;
use ferry_scheduler::daemon::metrics::{self, MigrationMeasure, MigrationMetrics};
use ferry_scheduler::daemon::protocol::{
    AgentStatus, AgentVm, Done, IncomingReply, IncomingRequest, LoadRequest, MigrateReply,
    MigrateRequest, Refusal, VmRequest, INCOMING_TIMEOUT,
};
use ferry_transport::lanes::MAX_LANES;
use ferry_transport::{default_lane_count, LaneListener, LaneOptions};
use ferry_vm::{host_tsc_khz, DirtyBackend, GuestParams, Vm, VmConfig};

use ferry_control::units::{parse_duration, BareUnit};
use ferry_scheduler::ha::lease_keeper::FenceMode;

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
    /// core).
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
    host: String,
    ip: IpAddr,
    guest_rate: u64,
    tsc_khz: u32,
    lanes: u16,
    security: SecuritySpec,
    vms: Mutex<BTreeMap<String, HostedVm>>,
    /// Names with a migration in or out in progress.
    busy: Mutex<std::collections::BTreeSet<String>>,
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

    /// Source side: ask the target for a listener, then run the engine.
    fn migrate(&self, req: &MigrateRequest) -> anyhow::Result<MigrateReply> {
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
        let reply: IncomingReply = JsonClient::new(&req.target, Some(Duration::from_secs(30)))
            .post(
                "/v1/incoming",
                &IncomingRequest {
                    vm: req.vm.clone(),
                    mem_mb,
                    cpu_mips,
                },
            )
            .with_context(|| format!("asking {} to receive {}", req.target_host, req.vm))?;
        let to = SocketAddr::new(target.ip(), reply.port).to_string();
        let lanes = ferry_control::connect_lanes(&to, self.lanes, &self.security)
            .with_context(|| format!("opening the migration stream to {}", req.target_host))?;
        let summary = SourceMigration::new(vm, MigrationOptions::default())
            .run_lanes(lanes, |_| {})
            .with_context(|| format!("migrating {} to {}", req.vm, req.target_host))?;
        tracing::info!(vm = %req.vm, to = %req.target_host, downtime_ms = summary.downtime.as_secs_f64() * 1e3, "migrated");
        self.vms.lock().expect("vms lock").remove(&req.vm);
        Ok(MigrateReply {
            seconds: summary.total.as_secs_f64(),
            downtime_ms: summary.downtime.as_secs_f64() * 1e3,
            bytes: summary.wire_bytes,
        })
    }

    /// Destination side: a listener for one migration of `req.vm`.
    fn incoming(self: &Arc<Self>, req: IncomingRequest) -> anyhow::Result<u16> {
        if self.vms.lock().expect("vms lock").contains_key(&req.vm) {
            anyhow::bail!("VM {} already runs on {}", req.vm, self.host);
        }
        let security = self.security.load()?;
        let mut listener = LaneListener::bind((self.ip, 0), LaneOptions::new(1, security))
            .context("binding a migration listener")?;
        let port = listener.local_addr()?.port();
        let agent = self.clone();
        // If no source comes (it failed before connecting), wake the accept
        // with a connection of our own once INCOMING_TIMEOUT has passed,
        // so the listener is dropped and its port freed.
        let (arrived, arrived_rx) = std::sync::mpsc::channel::<()>();
        let wake = SocketAddr::new(self.ip, port);
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
                    &DestinationOptions::default(),
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
        Ok(port)
    }
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
    if a.vms.lock().expect("vms lock").contains_key(&r.vm) {
        return Err(Refusal::conflict(format!(
            "VM {} already runs on {}",
            r.vm, a.host
        )));
    }
    blocking(move || a.boot(&r.vm, r.mem_mb, 0.0))
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
    let port = blocking(move || a.incoming(r))
        .await
        .map_err(|e| Refusal::failed(format!("{e:#}")))?;
    Ok(Json(IncomingReply { port }))
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
    security.load()?;
    let mut registry = prometheus_client::registry::Registry::default();
    let agent = Arc::new(Agent {
        host: args.host.clone(),
        ip: args.listen.ip(),
        guest_rate: args.guest_rate,
        tsc_khz: host_tsc_khz().context("asking KVM for the TSC frequency")?,
        lanes: args.lanes.unwrap_or_else(default_lane_count),
        security,
        vms: Mutex::new(BTreeMap::new()),
        busy: Mutex::new(Default::default()),
        metrics: MigrationMetrics::register(&mut registry, "ferry_agent"),
    });
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
        agent.boot(name, mem, cpu)?;
    }
    let registry = Arc::new(registry);
    let _keeper = keep_lease(&agent, &args)?;
    let app = Router::new()
        .route(
            "/v1/status",
            get(|State(a): State<Arc<Agent>>| async move { Json(a.status()) }),
        )
        .route("/v1/vms/start", post(start_vm))
        .route("/v1/vms/shutdown", post(shutdown_vm))
        .route("/v1/migrate", post(migrate))
        .route("/v1/incoming", post(incoming))
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
        ferry_scheduler::daemon::notify_systemd(ferry_scheduler::daemon::SystemdState::Ready);
        eprintln!(
            "ferry agent {}: serving on {} (migrations: {} lanes, {})",
            args.host,
            listener.local_addr()?,
            agent_lanes,
            agent_security
        );
        axum::serve(listener, app)
            .await
            .context("agent HTTP server")
    })
}

/// With `--etcd`: joins the cluster store and keeps this host's lease,
/// fencing the agent's VMs when it cannot.
#[cfg(feature = "etcd")]
fn keep_lease(
    agent: &Arc<Agent>,
    args: &AgentArgs,
) -> anyhow::Result<Option<ferry_scheduler::ha::lease_keeper::LeaseKeeper>> {
    use ferry_scheduler::ha::lease_keeper::{FenceEvent, KeeperConfig, LeaseKeeper};
    use ferry_scheduler::store::{etcd::EtcdOptions, ClusterStore, DEFAULT_PREFIX};

    if args.etcd.is_empty() {
        return Ok(None);
    }
    let store = ClusterStore::on_etcd(&args.etcd, EtcdOptions::default(), DEFAULT_PREFIX)
        .context("connecting to etcd")?;
    let fenced = agent.clone();
    let keeper = LeaseKeeper::start(
        store,
        &args.host,
        KeeperConfig::for_ttl(args.lease_ttl, args.fence),
        Box::new(move |e: &FenceEvent| fenced.fence(e.mode)),
    )
    .context("keeping this host's lease")?;
    eprintln!(
        "ferry agent {}: host lease {:x} on etcd (TTL {:?}, fence: {:?})",
        args.host,
        keeper.lease().lease,
        keeper.lease().ttl,
        args.fence
    );
    Ok(Some(keeper))
}

#[cfg(not(feature = "etcd"))]
fn keep_lease(_agent: &Arc<Agent>, args: &AgentArgs) -> anyhow::Result<Option<()>> {
    if args.etcd.is_empty() {
        return Ok(None);
    }
    anyhow::bail!("--etcd needs ferry built with the etcd feature (cargo build --features etcd)")
}
