//! The daemon's own logic over loopback HTTP, with protocol-level agents
//! that keep VMs in memory: what is tested here needs no agent behaviour,
//! only agents that answer their status (configuration problems served,
//! the policy's GET/PUT, power save's hook on empty hosts, and the rules'
//! checks: contradictions, unknown hosts, unknown names).
//!
//! Everything that asks agents to act (evacuations and returns, failed
//! migrations, rules honoured by maintenance, a VM running twice, an
//! agent with another name, health-driven evacuation) runs against real
//! `ferry agent` processes with real guests in `tools/tests/sched_api.rs`;
//! the process power driver with real agents is `tools/tests/sched_e2e.rs`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_scheduler::daemon::api::{HostView, PolicyView, ProblemsView, RoundView};
use ferry_scheduler::daemon::client::{JsonClient, Method};
use ferry_scheduler::daemon::config::Config;
use ferry_scheduler::daemon::protocol::{
    AgentStatus, AgentVm, Done, MigrateReply, MigrateRequest, Refusal, VmRequest,
};
use ferry_scheduler::daemon::{serve, Daemon};
use ferry_scheduler::plan::planner::PolicyMode;

type World = Arc<Mutex<HashMap<String, Vec<AgentVm>>>>;

#[derive(Clone)]
struct Agent {
    host: String,
    world: World,
}

async fn status(State(a): State<Agent>) -> Json<AgentStatus> {
    let w = a.world.lock().unwrap();
    Json(AgentStatus {
        host: a.host.clone(),
        vms: w.get(&a.host).cloned().unwrap_or_default(),
    })
}

async fn migrate(
    State(a): State<Agent>,
    Json(r): Json<MigrateRequest>,
) -> Result<Json<MigrateReply>, Refusal> {
    let mut w = a.world.lock().unwrap();
    let src = w.get_mut(&a.host).unwrap();
    let Some(i) = src.iter().position(|v| v.name == r.vm) else {
        return Err(Refusal::not_found(format!("no VM {}", r.vm)));
    };
    let vm = src.remove(i);
    w.entry(r.target_host).or_default().push(vm);
    Ok(Json(MigrateReply {
        seconds: 0.5,
        downtime_ms: 20.0,
        bytes: 512 << 20,
        ownership: None,
    }))
}

async fn shutdown(State(a): State<Agent>, Json(r): Json<VmRequest>) -> Json<Done> {
    let mut w = a.world.lock().unwrap();
    for v in w.get_mut(&a.host).unwrap().iter_mut() {
        if v.name == r.vm {
            v.running = false;
        }
    }
    Json(Done {})
}

async fn spawn_agent(host: &str, world: World) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/migrate", post(migrate))
        .route("/v1/vms/shutdown", post(shutdown))
        .with_state(Agent {
            host: host.into(),
            world,
        });
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr
}

struct Setup {
    api: SocketAddr,
    flag: tempfile::TempDir,
}

async fn setup(policy: &str) -> Setup {
    let world: World = Arc::new(Mutex::new(HashMap::new()));
    let vm = |n: &str| AgentVm {
        name: n.into(),
        mem_mb: 512,
        cpu_mips: 100.0,
        running: true,
    };
    world
        .lock()
        .unwrap()
        .insert("h1".into(), vec![vm("a"), vm("b")]);
    let mut agents = Vec::new();
    for h in ["h1", "h2", "h3"] {
        agents.push(spawn_agent(h, world.clone()).await);
    }
    let flag = tempfile::tempdir().unwrap();
    let off = flag.path().join("h3-off");
    let text = format!(
        r#"[daemon]
listen = "127.0.0.1:0"
policy = "{policy}"

[[host]]
name = "h1"
cores = 2
core_mips = 2000
mem_mb = 4096
agent = "{}"

[[host]]
name = "h2"
cores = 2
core_mips = 2000
mem_mb = 4096
agent = "{}"

[[host]]
name = "h3"
cores = 2
core_mips = 2000
mem_mb = 4096
agent = "{}"
power = {{ driver = "command", on = ["true"], off = ["touch", "{}"] }}

[[vm]]
name = "a"
host = "h1"
cpu_mips = 1000
mem_mb = 512

[[vm]]
name = "b"
host = "h1"
cpu_mips = 1000
mem_mb = 512

[[vm]]
name = "ghost"
host = "h9"
cpu_mips = 1000
mem_mb = 512
"#,
        agents[0],
        agents[1],
        agents[2],
        off.display()
    );
    let cfg = Config::parse(Path::new("cluster.toml"), &text).unwrap();
    let daemon = Daemon::from_config(&cfg);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = l.local_addr().unwrap();
    tokio::spawn(serve(daemon, l, std::time::Duration::from_secs(3600)));
    Setup { api, flag }
}

async fn call<T: serde::de::DeserializeOwned + Send + 'static>(
    api: SocketAddr,
    method: Method,
    path: &'static str,
    body: Option<serde_json::Value>,
) -> Result<T, String> {
    tokio::task::spawn_blocking(move || {
        JsonClient::new(&api.to_string(), None)
            .call::<serde_json::Value, T>(method, path, body.as_ref())
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_problems_are_served_and_policy_switches() {
    let s = setup("manual").await;
    let p: ProblemsView = call(s.api, Method::Get, "/v1/problems", None)
        .await
        .unwrap();
    assert_eq!(p.config.len(), 1);
    assert_eq!(p.config[0].line, 41);
    assert!(p.config[0].message.contains("unknown host \"h9\""));
    let r: PolicyView = call(
        s.api,
        Method::Put,
        "/v1/policy",
        Some(serde_json::json!({"mode": "power_save"})),
    )
    .await
    .unwrap();
    assert_eq!(r.mode, PolicyMode::PowerSave);
    let r: PolicyView = call(s.api, Method::Get, "/v1/policy", None).await.unwrap();
    assert_eq!(r.mode, PolicyMode::PowerSave, "GET reads back what PUT set");
    let e = call::<serde_json::Value>(
        s.api,
        Method::Put,
        "/v1/policy",
        Some(serde_json::json!({"mode": "chaos"})),
    )
    .await
    .unwrap_err();
    assert!(
        e.contains("HTTP 400") && e.contains("unknown policy \"chaos\""),
        "{e}"
    );
    // Power save: h2 and h3 are empty and not needed: the command hook runs.
    let _: RoundView = call(s.api, Method::Post, "/v1/round", None).await.unwrap();
    assert!(s.flag.path().join("h3-off").exists(), "power-off hook ran");
    let hosts: Vec<HostView> = call(s.api, Method::Get, "/v1/hosts", None).await.unwrap();
    assert_eq!(hosts[2].power, ferry_scheduler::model::PowerState::Off);
    assert_eq!(
        hosts[1].power,
        ferry_scheduler::model::PowerState::On,
        "h2 has no driver"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_set_read_and_checked() {
    use ferry_scheduler::plan::rules::Rule;
    let s = setup("manual").await;
    let rules: Vec<Rule> = call(s.api, Method::Get, "/v1/rules", None).await.unwrap();
    assert!(rules.is_empty());
    let apart = serde_json::json!({"name": "apart", "kind": "anti_affinity", "vms": ["a", "b"]});
    let rules: Vec<Rule> = call(s.api, Method::Post, "/v1/rules", Some(apart))
        .await
        .unwrap();
    assert_eq!(rules.len(), 1);
    // A contradicting rule is refused, naming both; nothing changes.
    let together = serde_json::json!({"name": "together", "kind": "affinity", "vms": ["b", "a"]});
    let e = call::<Vec<Rule>>(s.api, Method::Post, "/v1/rules", Some(together))
        .await
        .unwrap_err();
    assert!(
        e.contains("HTTP 400")
            && e.contains("rules affinity \"together\" and anti_affinity \"apart\" contradict: a and b must run both together and apart"),
        "{e}"
    );
    let bad_host =
        serde_json::json!([{"name": "pin", "kind": "must_run_on", "vms": ["a"], "hosts": ["h9"]}]);
    let e = call::<Vec<Rule>>(s.api, Method::Put, "/v1/rules", Some(bad_host))
        .await
        .unwrap_err();
    assert!(
        e.contains("HTTP 400") && e.contains("rule must_run_on \"pin\": names unknown host \"h9\""),
        "{e}"
    );
    let e = call::<Vec<Rule>>(s.api, Method::Delete, "/v1/rules/nope", None)
        .await
        .unwrap_err();
    assert!(
        e.contains("HTTP 404") && e.contains("no rule named \"nope\""),
        "{e}"
    );
    let rules: Vec<Rule> = call(s.api, Method::Get, "/v1/rules", None).await.unwrap();
    assert_eq!(rules.len(), 1, "refused changes changed nothing");

    let rules: Vec<Rule> = call(s.api, Method::Delete, "/v1/rules/apart", None)
        .await
        .unwrap();
    assert!(rules.is_empty());
}
