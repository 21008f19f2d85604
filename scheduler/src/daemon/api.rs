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
//! | `GET /v1/rules` | the [`Rule`]s (kept in the cluster store, when there is one) |
//! | `PUT /v1/rules` `[Rule]` | replace them all (400 naming the rules that contradict); the [`Rule`]s |
//! | `POST /v1/rules` [`Rule`] | add one (400 if it contradicts the others); the [`Rule`]s |
//! | `DELETE /v1/rules/{name}` | remove one; the [`Rule`]s |
//! | `POST /v1/round` | plan and execute now; [`RoundView`] |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /v1/ha/leader` | [`LeaderView`]: who leads the daemons on the cluster store |
//! | `GET /v1/ha/hosts` | [`HaHostView`]s: each host's lease (alive or not) and maintenance |
//! | `GET /v1/ha/vms` | [`OwnerRecord`]s: each VM's owner and epoch |
//! | `GET /v1/ha/decisions` | [`Decision`]s in flight |
//! | `GET /v1/ha/events` | [`HaEvent`]s of this daemon: leadership, host deaths, restarts |
//!
//! **Several daemons on one cluster store** (`--etcd`): one leads and acts;
//! the others **forward** every `/v1/...` request except `/v1/ha/...` to
//! the leader's API address (recorded with its leadership) and answer with
//! the leader's answer (header `x-ferry-leader` names it), so a client may
//! talk to any daemon. 503 when no leader is elected yet. `/v1/ha/...`
//! and `/metrics` are answered by the daemon asked, from the store.
//!
//! [`OwnerRecord`]: crate::store::OwnerRecord
//! [`Decision`]: crate::store::Decision
//! [`HaEvent`]: crate::ha::failover::HaEvent
//!
//! [`ErrorReply`]: super::protocol::ErrorReply

use std::time::Instant;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tracing::info;

use super::agent::error_chain;
use super::client::{CallError, JsonClient, Method};
use super::config::ConfigProblem;
use super::metrics::HostLabel;
use super::protocol::Refusal;
use super::{describe, lock, Daemon, HostHealth, Outcome, RoundReport};
use crate::ha::failover::{ClusterHa, HaEvent};
use crate::model::Cluster;
use crate::plan::planner::PolicyMode;
use crate::plan::rules::{self, Rule};
use crate::store::{ClusterStore, Decision, LeaderClaim, LeaderInfo, OwnerRecord, StoreError};

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
        .route("/v1/rules", get(get_rules).put(set_rules).post(add_rule))
        .route("/v1/rules/{name}", axum::routing::delete(remove_rule))
        .route("/v1/round", axum::routing::post(round))
        .route("/metrics", get(metrics))
        .route("/v1/ha/leader", get(ha_leader))
        .route("/v1/ha/hosts", get(ha_hosts))
        .route("/v1/ha/vms", get(ha_vms))
        .route("/v1/ha/decisions", get(ha_decisions))
        .route("/v1/ha/events", get(ha_events))
        .layer(axum::middleware::from_fn_with_state(
            AppState {
                daemon: daemon.clone(),
                started,
            },
            forward_to_leader,
        ))
        .with_state(AppState { daemon, started })
}

/// Header naming the leader that answered a forwarded request.
pub const LEADER_HEADER: &str = "x-ferry-leader";

/// Followers hand `/v1/...` (but `/v1/ha/...`) to the leader.
async fn forward_to_leader(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(ha) = s.daemon.ha.clone() else {
        return next.run(req).await;
    };
    let path = req.uri().path().to_owned();
    if !path.starts_with("/v1/") || path.starts_with("/v1/ha/") || ha.claim().is_some() {
        return next.run(req).await;
    }
    let method = match *req.method() {
        axum::http::Method::GET => Method::Get,
        axum::http::Method::POST => Method::Post,
        axum::http::Method::PUT => Method::Put,
        axum::http::Method::DELETE => Method::Delete,
        _ => return Refusal::bad_request("unsupported method").into_response(),
    };
    let path_q = req
        .uri()
        .path_and_query()
        .map_or(path.clone(), |p| p.as_str().to_owned());
    let body = match axum::body::to_bytes(req.into_body(), MAX_FORWARDED_BODY).await {
        Ok(b) => b,
        Err(e) => return Refusal::bad_request(format!("reading the request: {e}")).into_response(),
    };
    let body: Option<serde_json::Value> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => Some(v),
            Err(e) => {
                return Refusal::bad_request(format!("the body is not JSON: {e}")).into_response()
            }
        }
    };
    let answer = tokio::task::spawn_blocking(move || {
        let leader = ha
            .election
            .leader()
            .map_err(|e| {
                Refusal::unavailable(format!(
                    "cannot ask the cluster store who leads: {}",
                    error_chain(&e)
                ))
            })?
            .ok_or_else(|| Refusal::unavailable("no daemon leads yet; retry shortly"))?;
        let api = leader.api.clone().ok_or_else(|| {
            Refusal::unavailable(format!(
                "the leader {} gave no API address",
                leader.candidate
            ))
        })?;
        let r = JsonClient::new(&api, None).call::<serde_json::Value, serde_json::Value>(
            method,
            &path_q,
            body.as_ref(),
        );
        match r {
            Ok(v) => Ok((leader.candidate, v)),
            Err(CallError::Status { status, error, .. }) => Err(Refusal {
                status: axum::http::StatusCode::from_u16(status)
                    .unwrap_or(axum::http::StatusCode::BAD_GATEWAY),
                error,
            }),
            Err(e) => Err(Refusal {
                status: axum::http::StatusCode::BAD_GATEWAY,
                error: format!(
                    "forwarding to the leader {}: {}",
                    leader.candidate,
                    error_chain(&e)
                ),
            }),
        }
    })
    .await;
    match answer {
        Ok(Ok((leader, v))) => ([(LEADER_HEADER, leader)], Json(v)).into_response(),
        Ok(Err(r)) => r.into_response(),
        Err(e) => Refusal::failed(format!("forwarding failed: {e}")).into_response(),
    }
}

/// Largest request body a follower forwards.
const MAX_FORWARDED_BODY: usize = 1 << 20;

/// `GET /v1/ha/leader`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaderView {
    /// Who leads, if anyone.
    pub leader: Option<LeaderInfo>,
    /// This daemon's name in the election.
    pub this: String,
    /// Whether this daemon leads.
    pub leading: bool,
}

/// A host in `GET /v1/ha/hosts`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HaHostView {
    /// Name.
    pub host: String,
    /// Its lease is alive.
    pub alive: bool,
    /// In maintenance (as the store records it).
    pub maintenance: bool,
}

fn ha_of(s: &AppState) -> Result<std::sync::Arc<ClusterHa>, Refusal> {
    s.daemon.ha.clone().ok_or_else(|| {
        Refusal::not_found("this daemon runs without a cluster store (start it with --etcd)")
    })
}

async fn from_store<T: Send + 'static>(
    s: &AppState,
    f: impl FnOnce(&ClusterHa) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Refusal> {
    let ha = ha_of(s)?;
    tokio::task::spawn_blocking(move || f(&ha))
        .await
        .map_err(|e| Refusal::failed(e.to_string()))?
        .map_err(|e| Refusal::unavailable(error_chain(&e)))
}

async fn ha_leader(State(s): State<AppState>) -> Result<Json<LeaderView>, Refusal> {
    from_store(&s, |ha| {
        Ok(LeaderView {
            leader: ha.election.leader()?,
            this: ha.election.candidate().to_owned(),
            leading: ha.claim().is_some(),
        })
    })
    .await
    .map(Json)
}

async fn ha_hosts(State(s): State<AppState>) -> Result<Json<Vec<HaHostView>>, Refusal> {
    from_store(&s, |ha| {
        let maintenance = ha.store.maintenance()?;
        Ok(ha
            .store
            .hosts()?
            .into_iter()
            .map(|h| HaHostView {
                maintenance: maintenance.contains(&h.host),
                host: h.host,
                alive: h.alive,
            })
            .collect())
    })
    .await
    .map(Json)
}

async fn ha_vms(State(s): State<AppState>) -> Result<Json<Vec<OwnerRecord>>, Refusal> {
    from_store(&s, |ha| ha.store.records()).await.map(Json)
}

async fn ha_decisions(State(s): State<AppState>) -> Result<Json<Vec<Decision>>, Refusal> {
    from_store(&s, |ha| ha.store.decisions()).await.map(Json)
}

async fn ha_events(State(s): State<AppState>) -> Result<Json<Vec<HaEvent>>, Refusal> {
    Ok(Json(ha_of(&s)?.events()))
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
    /// Quarantined on a hardware warning (no new VMs).
    #[serde(default)]
    pub quarantined: bool,
    /// Its health providers' state and last readings.
    #[serde(default)]
    pub hardware: crate::ha::health::HardwareHealth,
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
    /// What the policies wanted but did not do, and why (rules, room).
    #[serde(default)]
    pub notes: Vec<String>,
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

fn host_view(st: &super::State, h: usize) -> HostView {
    let c = &st.cluster;
    HostView {
        name: c.hosts[h].name.clone(),
        power: c.hosts[h].power,
        maintenance: c.hosts[h].maintenance,
        health: st.health.get(h).cloned().unwrap_or_default(),
        quarantined: c.hosts[h].quarantined,
        hardware: st.hardware.get(h).cloned().unwrap_or_default(),
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
        notes: r.plan.notes.clone(),
    }
}

async fn hosts(State(s): State<AppState>) -> Json<Vec<HostView>> {
    let st = lock(&s.daemon.state);
    Json(
        (0..st.cluster.hosts.len())
            .map(|h| host_view(&st, h))
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
    Ok(Json(host_view(&st, h)))
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

/// With the cluster store, makes `write` there under this daemon's leader
/// claim, on a blocking thread (503 when it no longer leads or the store
/// refuses); without one, nothing.
async fn write_as_leader(
    s: &AppState,
    write: impl FnOnce(&ClusterStore, &LeaderClaim) -> Result<(), StoreError> + Send + 'static,
) -> Result<(), Refusal> {
    let Some(ha) = s.daemon.ha.clone() else {
        return Ok(());
    };
    tokio::task::spawn_blocking(move || {
        let me = ha
            .claim()
            .ok_or_else(|| Refusal::unavailable("this daemon no longer leads; retry"))?;
        write(&ha.store, &me).map_err(|e| Refusal::unavailable(error_chain(&e)))
    })
    .await
    .map_err(|e| Refusal::failed(e.to_string()))?
}

/// Most rounds one maintenance request runs (each moves up to the per-host
/// limit of VMs) before it answers.
const MAX_MAINTENANCE_ROUNDS: usize = 32;

/// Enter (`on`) or leave maintenance, then run rounds until the host is
/// empty (entering) or its VMs are back (leaving). Answers 502 when an
/// action failed, 409 when rounds stop making progress.
async fn set_maintenance(s: AppState, name: String, on: bool) -> Result<Json<RoundView>, Refusal> {
    if lock(&s.daemon.state).cluster.host_by_name(&name).is_none() {
        return Err(Refusal::not_found(format!("no host named {name:?}")));
    }
    // No timer round may act on the flag between setting it and our
    // rounds: their actions are what this request reports.
    let turn = s.daemon.take_turn().await;
    // Recorded first: a leader that dies mid-evacuation leaves it to the
    // next one.
    let host = name.clone();
    write_as_leader(&s, move |store, me| store.set_maintenance(me, &host, on)).await?;
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
        let report = s
            .daemon
            .round_in_turn(&turn, s.started.elapsed().as_secs_f64())
            .await;
        let st = lock(&s.daemon.state);
        let c = &st.cluster;
        let view = round_view(c, &report);
        let progressed = view.actions.iter().any(|a| a.outcome == Outcome::Done);
        all.actions.extend(view.actions);
        all.plan_error = view.plan_error;
        all.notes = view.notes;
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
            let why = all.plan_error.clone().unwrap_or_else(|| {
                if all.notes.is_empty() {
                    "the planner finds no move for them now".into()
                } else {
                    all.notes.join("; ")
                }
            });
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

async fn get_rules(State(s): State<AppState>) -> Json<Vec<Rule>> {
    Json(lock(&s.daemon.state).cluster.rules.clone())
}

/// Edits the rules with `edit`, one edit at a time (a round's turn held);
/// keeps the result only if the rules are consistent with each other and
/// the cluster's hosts. With the cluster store they are stored first
/// (fenced by this leader's claim), so that a new leader places by them.
async fn edit_rules(
    s: &AppState,
    edit: impl FnOnce(&mut Vec<Rule>) -> Result<(), Refusal>,
) -> Result<Json<Vec<Rule>>, Refusal> {
    let _turn = s.daemon.take_turn().await;
    let new = {
        let st = lock(&s.daemon.state);
        let mut new = st.cluster.rules.clone();
        edit(&mut new)?;
        let hosts: Vec<String> = st.cluster.hosts.iter().map(|h| h.name.clone()).collect();
        rules::check(&new, &hosts).map_err(|e| Refusal::bad_request(e.to_string()))?;
        new
    };
    let stored = new.clone();
    write_as_leader(s, move |store, me| store.set_rules(me, &stored)).await?;
    info!(rules = new.len(), "rules set");
    lock(&s.daemon.state).cluster.rules = new.clone();
    Ok(Json(new))
}

async fn set_rules(
    State(s): State<AppState>,
    Json(new): Json<Vec<Rule>>,
) -> Result<Json<Vec<Rule>>, Refusal> {
    edit_rules(&s, |r| {
        *r = new;
        Ok(())
    })
    .await
}

async fn add_rule(
    State(s): State<AppState>,
    Json(rule): Json<Rule>,
) -> Result<Json<Vec<Rule>>, Refusal> {
    edit_rules(&s, |r| {
        r.push(rule);
        Ok(())
    })
    .await
}

async fn remove_rule(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Rule>>, Refusal> {
    edit_rules(&s, |r| {
        let before = r.len();
        r.retain(|x| x.name != name);
        if r.len() == before {
            return Err(Refusal::not_found(format!("no rule named {name:?}")));
        }
        Ok(())
    })
    .await
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
