//! The daemon's HTTP API (axum) and its Prometheus metrics. Every request
//! that changes something answers 2xx only when it was done; otherwise a
//! non-2xx status with an [`ErrorReply`] saying why (404 unknown name, 400
//! bad request, 409 nothing can be done now, 502 an action failed on a
//! host). Everything that can be set can be read back.
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/hosts` | [`HostView`]s: power, maintenance, health, CPU and memory use |
//! | `GET /v1/hosts/{name}` | one [`HostView`] |
//! | `GET /v1/vms` | [`VmView`]s: placement and demand |
//! | `GET /v1/plan` | [`RoundView`]: the last round, each action with its reason and outcome |
//! | `GET /v1/problems` | [`ProblemsView`]: configuration entries left out, cluster inconsistencies |
//! | `POST /v1/hosts/{name}/maintenance` | enter maintenance: evacuates; [`RoundView`] once empty |
//! | `DELETE /v1/hosts/{name}/maintenance` | leave maintenance: its VMs return; [`RoundView`] |
//! | `GET /v1/policy` | [`PolicyView`] |
//! | `PUT /v1/policy` [`PolicyRequest`] | switch policy; [`PolicyView`] |
//! | `POST /v1/round` | plan and execute now; [`RoundView`] |
//! | `GET /metrics` | Prometheus text format |
//!
//! [`ErrorReply`]: super::protocol::ErrorReply

use std::time::Instant;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tracing::info;

use super::config::ConfigProblem;
use super::metrics::HostLabel;
use super::protocol::Refusal;
use super::{describe, lock, Daemon, HostHealth, Outcome, RoundReport};
use crate::model::Cluster;
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
        .route("/v1/hosts/{name}", get(host))
        .route("/v1/vms", get(vms))
        .route("/v1/plan", get(plan))
        .route("/v1/problems", get(problems))
        .route(
            "/v1/hosts/{name}/maintenance",
            axum::routing::post(enter_maintenance).delete(leave_maintenance),
        )
        .route("/v1/policy", get(get_policy).put(set_policy))
        .route("/v1/round", axum::routing::post(round))
        .route("/metrics", get(metrics))
        .with_state(AppState { daemon, started })
}

/// A host in `GET /v1/hosts`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostView {
    /// Name.
    pub name: String,
    /// `on`, `off`, `booting`.
    pub power: crate::model::PowerState,
    /// In maintenance.
    pub maintenance: bool,
    /// Whether its agent answers, since when, and why not.
    pub health: HostHealth,
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// An action of a round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActionView {
    /// What.
    pub action: String,
    /// Why.
    pub reason: String,
    /// What became of it.
    pub outcome: Outcome,
}

/// A round: its actions, and why planning failed if it did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoundView {
    /// The actions, in order.
    pub actions: Vec<ActionView>,
    /// Why nothing could be planned, if so.
    pub plan_error: Option<String>,
}

/// `GET /v1/problems`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProblemsView {
    /// Configuration entries left out, with file and line.
    pub config: Vec<ConfigProblem>,
    /// What the last inventory found inconsistent (a VM running twice, ...).
    pub cluster: Vec<String>,
    /// Hosts whose agent does not answer or is not who the config says,
    /// one line each.
    pub hosts: Vec<String>,
}

/// `PUT /v1/policy`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyRequest {
    /// `balance`, `power_save`, `both`, `manual`.
    pub mode: String,
}

/// `GET /v1/policy`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyView {
    /// The active policy.
    pub mode: PolicyMode,
}

fn host_view(c: &Cluster, health: &[HostHealth], h: usize) -> HostView {
    HostView {
        name: c.hosts[h].name.clone(),
        power: c.hosts[h].power,
        maintenance: c.hosts[h].maintenance,
        health: health.get(h).cloned().unwrap_or_default(),
        cpu_mips: c.hosts[h].cpu_mips,
        cpu_demand: c.demand(h),
        mem_mb: c.hosts[h].mem_mb,
        mem_used_mb: c.mem_used(h),
        vms: c.vms_on(h).map(|v| c.vms[v].name.clone()).collect(),
    }
}

fn round_view(c: &Cluster, r: &RoundReport) -> RoundView {
    RoundView {
        actions: r
            .plan
            .actions
            .iter()
            .enumerate()
            .map(|(i, a)| ActionView {
                action: describe(c, a),
                reason: a.reason().to_string(),
                outcome: r.outcomes.get(i).cloned().unwrap_or(Outcome::Skipped {
                    why: "not reached".into(),
                }),
            })
            .collect(),
        plan_error: r.plan_error.clone(),
    }
}

async fn hosts(State(s): State<AppState>) -> Json<Vec<HostView>> {
    let st = lock(&s.daemon.state);
    Json(
        (0..st.cluster.hosts.len())
            .map(|h| host_view(&st.cluster, &st.health, h))
            .collect(),
    )
}

async fn host(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<HostView>, Refusal> {
    let st = lock(&s.daemon.state);
    let h = st
        .cluster
        .host_by_name(&name)
        .ok_or_else(|| Refusal::not_found(format!("no host named {name:?}")))?;
    Ok(Json(host_view(&st.cluster, &st.health, h)))
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

async fn plan(State(s): State<AppState>) -> Json<RoundView> {
    let st = lock(&s.daemon.state);
    Json(round_view(&st.cluster, &st.last_round))
}

async fn problems(State(s): State<AppState>) -> Json<ProblemsView> {
    let st = lock(&s.daemon.state);
    Json(ProblemsView {
        config: st.problems.clone(),
        cluster: st.alerts.clone(),
        hosts: st
            .health
            .iter()
            .zip(&st.cluster.hosts)
            .filter_map(|(h, host)| h.error.as_ref().map(|e| format!("host {}: {e}", host.name)))
            .collect(),
    })
}

/// Most rounds one maintenance request runs (each moves up to the per-host
/// limit of VMs) before it answers.
const MAX_MAINTENANCE_ROUNDS: usize = 32;

/// Enter (`on`) or leave maintenance, then run rounds until the host is
/// empty (entering) or its VMs are back (leaving). Answers 502 when an
/// action failed, 409 when rounds stop making progress.
async fn set_maintenance(s: AppState, name: String, on: bool) -> Result<Json<RoundView>, Refusal> {
    let h = {
        let mut st = lock(&s.daemon.state);
        let h = st
            .cluster
            .host_by_name(&name)
            .ok_or_else(|| Refusal::not_found(format!("no host named {name:?}")))?;
        st.cluster.hosts[h].maintenance = on;
        info!(host = %name, maintenance = on, "maintenance {}", if on { "entered" } else { "left" });
        h
    };
    let mut all = RoundView::default();
    for _ in 0..MAX_MAINTENANCE_ROUNDS {
        let report = s.daemon.round(s.started.elapsed().as_secs_f64()).await;
        let st = lock(&s.daemon.state);
        let c = &st.cluster;
        let view = round_view(c, &report);
        let progressed = view.actions.iter().any(|a| a.outcome == Outcome::Done);
        all.actions.extend(view.actions);
        all.plan_error = view.plan_error;
        let failures = report.failures(c);
        let what = if on { "evacuating" } else { "returning VMs to" };
        if !failures.is_empty() {
            return Err(Refusal {
                status: axum::http::StatusCode::BAD_GATEWAY,
                error: format!("{what} {name}: {}", failures.join("; ")),
            });
        }
        let left: Vec<&str> = if on {
            c.vms_on(h).map(|v| c.vms[v].name.as_str()).collect()
        } else {
            c.vms
                .iter()
                .filter(|v| v.home == Some(h))
                .map(|v| v.name.as_str())
                .collect()
        };
        if left.is_empty() {
            return Ok(Json(all));
        }
        if !progressed {
            let why = all
                .plan_error
                .clone()
                .unwrap_or_else(|| "the planner finds no move for them now".into());
            return Err(Refusal::conflict(format!(
                "{what} {name}: {} {} still {}: {why}",
                left.join(", "),
                if left.len() == 1 { "is" } else { "are" },
                if on { "on it" } else { "away" }
            )));
        }
    }
    Err(Refusal::conflict(format!(
        "maintenance of {name}: not done after {MAX_MAINTENANCE_ROUNDS} rounds"
    )))
}

async fn enter_maintenance(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<RoundView>, Refusal> {
    set_maintenance(s, name, true).await
}

async fn leave_maintenance(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<RoundView>, Refusal> {
    set_maintenance(s, name, false).await
}

async fn get_policy(State(s): State<AppState>) -> Json<PolicyView> {
    Json(PolicyView {
        mode: lock(&s.daemon.state).planner.mode,
    })
}

async fn set_policy(
    State(s): State<AppState>,
    Json(req): Json<PolicyRequest>,
) -> Result<Json<PolicyView>, Refusal> {
    let mode = req
        .mode
        .parse::<PolicyMode>()
        .map_err(Refusal::bad_request)?;
    lock(&s.daemon.state).planner.mode = mode;
    info!(?mode, "policy switched");
    Ok(Json(PolicyView { mode }))
}

async fn round(State(s): State<AppState>) -> Result<Json<RoundView>, Refusal> {
    let report = s.daemon.round(s.started.elapsed().as_secs_f64()).await;
    let st = lock(&s.daemon.state);
    let failures = report.failures(&st.cluster);
    if !failures.is_empty() {
        return Err(Refusal {
            status: axum::http::StatusCode::BAD_GATEWAY,
            error: format!("round: {}", failures.join("; ")),
        });
    }
    Ok(Json(round_view(&st.cluster, &report)))
}

async fn metrics(State(s): State<AppState>) -> Response {
    let m = &s.daemon.metrics;
    {
        let st = lock(&s.daemon.state);
        let c = &st.cluster;
        let on = c
            .hosts
            .iter()
            .filter(|h| h.power == crate::model::PowerState::On)
            .count();
        m.hosts_on.set(i64::try_from(on).unwrap_or(i64::MAX));
        m.config_problems
            .set(i64::try_from(st.problems.len()).unwrap_or(i64::MAX));
        for (h, host) in c.hosts.iter().enumerate() {
            let label = HostLabel {
                host: host.name.clone(),
            };
            m.cpu_demand_ratio
                .get_or_create(&label)
                .set(c.demand(h) / host.cpu_mips);
            m.maintenance
                .get_or_create(&label)
                .set(i64::from(host.maintenance));
            if let Some(r) = st.health.get(h).and_then(|x| x.reachable) {
                m.reachable.get_or_create(&label).set(i64::from(r));
            }
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            super::metrics::CONTENT_TYPE,
        )],
        m.encode(),
    )
        .into_response()
}
