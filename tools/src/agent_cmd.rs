//! `ferry agent`: one per host. Runs VMs (the workload guest, through the
//! `vm` crate) and performs live migrations with the engine when the
//! scheduler daemon asks. Speaks the agent protocol of
//! `ferry_scheduler::daemon::agent` (HTTP/JSON under `/v1`), plus:
//!
//! | request | body | answer |
//! |---|---|---|
//! | `POST /v1/incoming` | `{vm, mem_mb, cpu_mips}` | `{ok, port}`: a listener for one engine stream |
//! | `POST /v1/vms/load` | `{vm, cpu_mips}` | `{ok}`: set a VM's (simulated) CPU demand |
//! | `GET /v1/vms/{name}` | - | the guest's status block |
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
use ferry_scheduler::daemon::agent::{
    request, AgentStatus, AgentVm, MigrateRequest, OpResult, VmRequest,
};
use ferry_transport::lanes::MAX_LANES;
use ferry_transport::{default_lane_count, LaneListener, LaneOptions};
use ferry_vm::{host_tsc_khz, DirtyBackend, GuestParams, Vm, VmConfig};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

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
}

struct HostedVm {
    vm: Arc<Vm>,
    mem_mb: u64,
    cpu_mips: f64,
}

struct Agent {
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

#[derive(Debug, Deserialize, Serialize)]
struct IncomingRequest {
    vm: String,
    mem_mb: u64,
    #[serde(default)]
    cpu_mips: f64,
}

#[derive(Debug, Deserialize)]
struct LoadRequest {
    vm: String,
    cpu_mips: f64,
}

fn fail(e: impl std::fmt::Display) -> Json<OpResult> {
    Json(OpResult {
        ok: false,
        error: Some(e.to_string()),
    })
}

fn ok() -> Json<OpResult> {
    Json(OpResult {
        ok: true,
        error: None,
    })
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
    fn migrate(&self, req: &MigrateRequest) -> anyhow::Result<()> {
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
        let reply: Value = request(
            target,
            "POST",
            "/v1/incoming",
            Some(&IncomingRequest {
                vm: req.vm.clone(),
                mem_mb,
                cpu_mips,
            }),
            Some(Duration::from_secs(30)),
        )
        .with_context(|| format!("asking {} to receive {}", req.target_host, req.vm))?;
        let port = reply["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .with_context(|| format!("target answered {reply}"))?;
        let to = SocketAddr::new(target.ip(), port).to_string();
        let lanes = ferry_control::connect_lanes(&to, self.lanes, &self.security)
            .with_context(|| format!("opening the migration stream to {}", req.target_host))?;
        let summary = SourceMigration::new(vm, MigrationOptions::default())
            .run_lanes(lanes, |_| {})
            .with_context(|| format!("migrating {} to {}", req.vm, req.target_host))?;
        tracing::info!(vm = %req.vm, to = %req.target_host, downtime_ms = summary.downtime.as_secs_f64() * 1e3, "migrated");
        self.vms.lock().expect("vms lock").remove(&req.vm);
        Ok(())
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
        std::thread::spawn(move || {
            let result = crate::vm_cmd::accept_source(&mut listener).and_then(|lanes| {
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

/// Runs the agent until killed.
pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    // Bad security flags or unreadable TLS files fail here, not at the
    // first migration.
    let security = args.security.spec()?;
    security.load()?;
    let agent = Arc::new(Agent {
        host: args.host.clone(),
        ip: args.listen.ip(),
        guest_rate: args.guest_rate,
        tsc_khz: host_tsc_khz().context("asking KVM for the TSC frequency")?,
        lanes: args.lanes.unwrap_or_else(default_lane_count),
        security,
        vms: Mutex::new(BTreeMap::new()),
        busy: Mutex::new(Default::default()),
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
    let app = Router::new()
        .route(
            "/v1/status",
            get(|State(a): State<Arc<Agent>>| async move { Json(a.status()) }),
        )
        .route(
            "/v1/vms/start",
            post(
                |State(a): State<Arc<Agent>>, Json(r): Json<VmRequest>| async move {
                    blocking(move || {
                        a.boot(&r.vm, r.mem_mb, 0.0)
                            .map_or_else(|e| fail(format!("{e:#}")), |()| ok())
                    })
                    .await
                },
            ),
        )
        .route(
            "/v1/vms/shutdown",
            post(
                |State(a): State<Arc<Agent>>, Json(r): Json<VmRequest>| async move {
                    let gone = a.vms.lock().expect("vms lock").remove(&r.vm);
                    match gone {
                        Some(h) => {
                            blocking(move || drop(h)).await;
                            ok()
                        }
                        None => fail(format!("no VM {} here", r.vm)),
                    }
                },
            ),
        )
        .route(
            "/v1/migrate",
            post(
                |State(a): State<Arc<Agent>>, Json(r): Json<MigrateRequest>| async move {
                    blocking(move || {
                        a.migrate(&r)
                            .map_or_else(|e| fail(format!("{e:#}")), |()| ok())
                    })
                    .await
                },
            ),
        )
        .route(
            "/v1/incoming",
            post(
                |State(a): State<Arc<Agent>>, Json(r): Json<IncomingRequest>| async move {
                    match blocking(move || a.incoming(r)).await {
                        Ok(port) => Json(json!({"ok": true, "port": port})),
                        Err(e) => Json(json!({"ok": false, "error": format!("{e:#}")})),
                    }
                },
            ),
        )
        .route(
            "/v1/vms/load",
            post(
                |State(a): State<Arc<Agent>>, Json(r): Json<LoadRequest>| async move {
                    match a.vms.lock().expect("vms lock").get_mut(&r.vm) {
                        Some(h) => {
                            h.cpu_mips = r.cpu_mips;
                            ok()
                        }
                        None => fail(format!("no VM {} here", r.vm)),
                    }
                },
            ),
        )
        .route(
            "/v1/vms/{name}",
            get(
                |State(a): State<Arc<Agent>>, Path(name): Path<String>| async move {
                    let vms = a.vms.lock().expect("vms lock");
                    match vms.get(&name) {
                        Some(h) => Json(json!({"ok": true, "status": h.vm.status()})),
                        None => Json(json!({"ok": false, "error": format!("no VM {name} here")})),
                    }
                },
            ),
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
