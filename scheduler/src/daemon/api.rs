//! The daemon's HTTP API (axum) and its Prometheus metrics.
//!
//! | request | does |
//! |---|---|
//! | `GET /v1/hosts` | hosts with power, maintenance, CPU and memory use |
//! | `GET /v1/vms` | VMs with placement and demand |
//! | `GET /v1/plan` | the last plan, each action with its reason |
//! | `GET /v1/problems` | configuration entries left out, with file:line |
//! | `POST /v1/hosts/{name}/maintenance` | enter maintenance (evacuates) |
//! | `DELETE /v1/hosts/{name}/maintenance` | leave maintenance (VMs return) |
//! | `PUT /v1/policy` `{"mode": "balance"}` | switch policy |
//! | `POST /v1/round` | plan and execute now |
//! | `GET /metrics` | Prometheus text format |

use std::fmt::Write as _;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tracing::info;

use super::{describe, lock, Daemon};
use crate::plan::planner::PolicyMode;

#[derive(Clone)]
struct AppState {
    daemon: Daemon,
    started: Instant,
}

/// The API router.
pub fn router(daemon: Daemon, started: Instant) -> Router {
    Router::new()
        .route("/v1/hosts", get(hosts))
        .route("/v1/vms", get(vms))
        .route("/v1/plan", get(plan))
        .route("/v1/problems", get(problems))
        .route(
            "/v1/hosts/{name}/maintenance",
            post(enter_maintenance).delete(leave_maintenance),
        )
        .route("/v1/policy", put(set_policy))
        .route("/v1/round", post(round))
        .route("/metrics", get(metrics))
        .with_state(AppState { daemon, started })
}

/// A host in `GET /v1/hosts`.
#[derive(Debug, Serialize, Deserialize)]
pub struct HostView {
    /// Name.
    pub name: String,
    /// `on`, `off`, `booting`.
    pub power: crate::model::PowerState,
    /// In maintenance.
    pub maintenance: bool,
    /// Capacity (MIPS).
    pub cpu_mips: f64,
    /// Demand now (MIPS).
    pub cpu_demand: f64,
    /// Memory (MB).
    pub mem_mb: u64,
    /// Memory used (MB).
    pub mem_used_mb: u64,
    /// VM names.
    pub vms: Vec<String>,
}

/// A VM in `GET /v1/vms`.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmView {
    /// Name.
    pub name: String,
    /// Host name, if running.
    pub host: Option<String>,
    /// Home host while evacuated.
    pub home: Option<String>,
    /// Memory (MB).
    pub mem_mb: u64,
    /// Demand now (MIPS).
    pub cpu_demand: f64,
}

/// An action in `GET /v1/plan`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ActionView {
    /// What.
    pub action: String,
    /// Why.
    pub reason: String,
}

/// `PUT /v1/policy`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PolicyRequest {
    /// `balance`, `power_save`, `both`, `manual`.
    pub mode: String,
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(serde_json::json!({ "error": msg }))).into_response()
}

async fn hosts(State(s): State<AppState>) -> Json<Vec<HostView>> {
    let st = lock(&s.daemon.state);
    let c = &st.cluster;
    Json(
        (0..c.hosts.len())
            .map(|h| HostView {
                name: c.hosts[h].name.clone(),
                power: c.hosts[h].power,
                maintenance: c.hosts[h].maintenance,
                cpu_mips: c.hosts[h].cpu_mips,
                cpu_demand: c.demand(h),
                mem_mb: c.hosts[h].mem_mb,
                mem_used_mb: c.mem_used(h),
                vms: c.vms_on(h).map(|v| c.vms[v].name.clone()).collect(),
            })
            .collect(),
    )
}

async fn vms(State(s): State<AppState>) -> Json<Vec<VmView>> {
    let st = lock(&s.daemon.state);
    let c = &st.cluster;
    let name = |h: Option<usize>| h.map(|h| c.hosts[h].name.clone());
    Json(
        c.vms
            .iter()
            .map(|v| VmView {
                name: v.name.clone(),
                host: name(v.host),
                home: name(v.home),
                mem_mb: v.mem_mb,
                cpu_demand: v.current(),
            })
            .collect(),
    )
}

async fn plan(State(s): State<AppState>) -> Json<Vec<ActionView>> {
    let st = lock(&s.daemon.state);
    Json(
        st.last_plan
            .actions
            .iter()
            .map(|a| ActionView {
                action: describe(&st.cluster, a),
                reason: a.reason().to_string(),
            })
            .collect(),
    )
}

async fn problems(State(s): State<AppState>) -> Json<Vec<super::config::ConfigProblem>> {
    Json(lock(&s.daemon.state).problems.clone())
}

async fn set_maintenance(s: AppState, name: String, on: bool) -> Response {
    {
        let mut st = lock(&s.daemon.state);
        let Some(h) = st.cluster.host_by_name(&name) else {
            return error(StatusCode::NOT_FOUND, format!("no host named {name:?}"));
        };
        st.cluster.hosts[h].maintenance = on;
        info!(host = %name, maintenance = on, "maintenance {}", if on { "entered" } else { "left" });
    }
    let now = s.started.elapsed().as_secs_f64();
    let plan = s.daemon.round(now).await;
    let st = lock(&s.daemon.state);
    Json(
        plan.actions
            .iter()
            .map(|a| ActionView {
                action: describe(&st.cluster, a),
                reason: a.reason().to_string(),
            })
            .collect::<Vec<_>>(),
    )
    .into_response()
}

async fn enter_maintenance(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    set_maintenance(s, name, true).await
}

async fn leave_maintenance(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    set_maintenance(s, name, false).await
}

async fn set_policy(State(s): State<AppState>, Json(req): Json<PolicyRequest>) -> Response {
    match req.mode.parse::<PolicyMode>() {
        Ok(mode) => {
            lock(&s.daemon.state).planner.mode = mode;
            info!(?mode, "policy switched");
            Json(serde_json::json!({ "mode": mode })).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn round(State(s): State<AppState>) -> Response {
    let now = s.started.elapsed().as_secs_f64();
    let plan = s.daemon.round(now).await;
    Json(serde_json::json!({ "actions": plan.actions.len() })).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    let st = lock(&s.daemon.state);
    let c = &st.cluster;
    let k = &st.counters;
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    };
    counter("ferry_sched_rounds_total", "Planning rounds.", k.rounds);
    counter(
        "ferry_sched_migrations_total",
        "Migrations completed.",
        k.migrations_ok,
    );
    counter(
        "ferry_sched_migrations_failed_total",
        "Migrations failed (VM kept on source).",
        k.migrations_failed,
    );
    counter(
        "ferry_sched_power_on_total",
        "Hosts powered on.",
        k.power_on,
    );
    counter(
        "ferry_sched_power_off_total",
        "Hosts powered off.",
        k.power_off,
    );
    counter(
        "ferry_sched_power_failed_total",
        "Power operations failed.",
        k.power_failed,
    );
    counter(
        "ferry_sched_inventory_failed_total",
        "Agent status requests failed.",
        k.inventory_failed,
    );
    let _ = writeln!(
        out,
        "# HELP ferry_sched_hosts_on Hosts powered on.\n# TYPE ferry_sched_hosts_on gauge"
    );
    let _ = writeln!(
        out,
        "ferry_sched_hosts_on {}",
        c.hosts
            .iter()
            .filter(|h| h.power == crate::model::PowerState::On)
            .count()
    );
    let _ = writeln!(out, "# HELP ferry_sched_host_cpu_demand_ratio CPU demand over capacity.\n# TYPE ferry_sched_host_cpu_demand_ratio gauge");
    for h in 0..c.hosts.len() {
        let _ = writeln!(
            out,
            "ferry_sched_host_cpu_demand_ratio{{host=\"{}\"}} {}",
            c.hosts[h].name,
            c.demand(h) / c.hosts[h].cpu_mips
        );
    }
    let _ = writeln!(out, "# HELP ferry_sched_host_maintenance Host in maintenance.\n# TYPE ferry_sched_host_maintenance gauge");
    for h in &c.hosts {
        let _ = writeln!(
            out,
            "ferry_sched_host_maintenance{{host=\"{}\"}} {}",
            h.name,
            u8::from(h.maintenance)
        );
    }
    let _ = writeln!(out, "# HELP ferry_sched_config_problems Configuration entries left out.\n# TYPE ferry_sched_config_problems gauge\nferry_sched_config_problems {}", st.problems.len());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}
