//! The daemon end to end over loopback HTTP: its API, planning rounds, and
//! agents speaking the agent protocol (protocol-level agents that keep VMs
//! in memory; the real `ferry agent` runs guests through the engine).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_scheduler::daemon::api::{HostView, PolicyView, ProblemsView, RoundView, VmView};
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
    refuse: Option<String>,
    /// The name it gives in its status (a misconfigured agent).
    claims: Option<String>,
}

async fn status(State(a): State<Agent>) -> Json<AgentStatus> {
    let w = a.world.lock().unwrap();
    Json(AgentStatus {
        host: a.claims.clone().unwrap_or_else(|| a.host.clone()),
        vms: w.get(&a.host).cloned().unwrap_or_default(),
    })
}

async fn migrate(
    State(a): State<Agent>,
    Json(r): Json<MigrateRequest>,
) -> Result<Json<MigrateReply>, Refusal> {
    if a.refuse.as_deref() == Some(r.vm.as_str()) {
        return Err(Refusal::failed(format!(
            "{} did not converge; rolled back",
            r.vm
        )));
    }
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

async fn spawn_agent(host: &str, world: World, refuse: Option<&str>) -> SocketAddr {
    spawn_agent_claiming(host, None, world, refuse).await
}

async fn spawn_agent_claiming(
    host: &str,
    claims: Option<&str>,
    world: World,
    refuse: Option<&str>,
) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/migrate", post(migrate))
        .route("/v1/vms/shutdown", post(shutdown))
        .with_state(Agent {
            host: host.into(),
            world,
            refuse: refuse.map(String::from),
            claims: claims.map(String::from),
        });
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr
}

struct Setup {
    api: SocketAddr,
    world: World,
    flag: tempfile::TempDir,
}

async fn setup(refuse: Option<&str>, policy: &str) -> Setup {
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
        agents.push(spawn_agent(h, world.clone(), refuse).await);
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
    Setup { api, world, flag }
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

fn where_is(world: &World, vm: &str) -> Option<String> {
    let w = world.lock().unwrap();
    w.iter()
        .find(|(_, vms)| vms.iter().any(|v| v.name == vm))
        .map(|(h, _)| h.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_evacuates_and_returns_through_the_api() {
    let s = setup(None, "manual").await;
    let hosts: Vec<HostView> = call(s.api, Method::Get, "/v1/hosts", None).await.unwrap();
    assert_eq!(hosts.len(), 3);
    assert_eq!(hosts[0].vms, vec!["a", "b"]);

    let _: RoundView = call(s.api, Method::Post, "/v1/hosts/h1/maintenance", None)
        .await
        .unwrap();
    assert_ne!(where_is(&s.world, "a").as_deref(), Some("h1"));
    assert_ne!(where_is(&s.world, "b").as_deref(), Some("h1"));
    let vms: Vec<VmView> = call(s.api, Method::Get, "/v1/vms", None).await.unwrap();
    assert!(vms
        .iter()
        .filter(|v| v.name != "ghost")
        .all(|v| v.home.as_deref() == Some("h1")));

    let _: RoundView = call(s.api, Method::Delete, "/v1/hosts/h1/maintenance", None)
        .await
        .unwrap();
    assert_eq!(where_is(&s.world, "a").as_deref(), Some("h1"));
    assert_eq!(where_is(&s.world, "b").as_deref(), Some("h1"));

    let plan: RoundView = call(s.api, Method::Get, "/v1/plan", None).await.unwrap();
    assert!(plan
        .actions
        .iter()
        .all(|a| a.reason.contains("maintenance")));
    let hosts: Vec<HostView> = call(s.api, Method::Get, "/v1/hosts", None).await.unwrap();
    assert!(
        hosts.iter().all(|h| h.health.reachable == Some(true)),
        "{hosts:?}"
    );
    let e = call::<serde_json::Value>(s.api, Method::Post, "/v1/hosts/nope/maintenance", None)
        .await
        .unwrap_err();
    assert!(e.contains("404") && e.contains("no host named"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_migration_leaves_the_vm_on_its_source() {
    let s = setup(Some("a"), "manual").await;
    let e = call::<RoundView>(s.api, Method::Post, "/v1/hosts/h1/maintenance", None)
        .await
        .unwrap_err();
    assert!(
        e.contains("HTTP 502") && e.contains("a did not converge; rolled back"),
        "the failed evacuation answers an error with the agent's reason: {e}"
    );
    assert_eq!(
        where_is(&s.world, "a").as_deref(),
        Some("h1"),
        "rolled back"
    );
    assert_ne!(where_is(&s.world, "b").as_deref(), Some("h1"));
    let vms: Vec<VmView> = call(s.api, Method::Get, "/v1/vms", None).await.unwrap();
    let a = vms.iter().find(|v| v.name == "a").unwrap();
    assert_eq!(
        a.host.as_deref(),
        Some("h1"),
        "model agrees with the agents"
    );
    let m = tokio::task::spawn_blocking(move || raw_get(s.api, "/metrics"))
        .await
        .unwrap();
    let failed: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("ferry_sched_migrations_failed_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(failed >= 1, "{m}"); // each round retries it
    assert!(m.contains("ferry_sched_migrations_total 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_problems_are_served_and_policy_switches() {
    let s = setup(None, "manual").await;
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
async fn rules_are_set_read_checked_and_honoured_by_maintenance() {
    use ferry_scheduler::plan::rules::Rule;
    let s = setup(None, "manual").await;
    // The timer's first round is over once ours is (rounds take turns):
    // the evacuation below is then done, and reported, by our request.
    let _: RoundView = call(s.api, Method::Post, "/v1/round", None).await.unwrap();
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

    // Evacuating h1: a and b may not share the target.
    let r: RoundView = call(s.api, Method::Post, "/v1/hosts/h1/maintenance", None)
        .await
        .unwrap();
    let (a, b) = (where_is(&s.world, "a"), where_is(&s.world, "b"));
    assert!(
        a.is_some() && b.is_some() && a != b,
        "a on {a:?}, b on {b:?}"
    );
    assert_ne!(a.as_deref(), Some("h1"));
    assert!(
        r.actions
            .iter()
            .any(|x| x.reason.contains("rules: anti_affinity \"apart\" keeps")),
        "{r:?}"
    );
    let rules: Vec<Rule> = call(s.api, Method::Delete, "/v1/rules/apart", None)
        .await
        .unwrap();
    assert!(rules.is_empty());
}

fn raw_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_rise_powers_a_host_up_through_the_process_driver_and_a_drop_powers_it_down() {
    let world: World = Arc::new(Mutex::new(HashMap::new()));
    let vm = |n: &str| AgentVm {
        name: n.into(),
        mem_mb: 256,
        cpu_mips: 1700.0,
        running: true,
    };
    world
        .lock()
        .unwrap()
        .insert("h1".into(), vec![vm("a"), vm("b")]);
    world
        .lock()
        .unwrap()
        .insert("h2".into(), vec![vm("c"), vm("d")]);
    let a1 = spawn_agent("h1", world.clone(), None).await;
    let a2 = spawn_agent("h2", world.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("h3.pid");
    let text = format!(
        r#"[daemon]
listen = "127.0.0.1:0"
policy = "power_save"

[[host]]
name = "h1"
cores = 2
core_mips = 2000
mem_mb = 4096
agent = "{a1}"

[[host]]
name = "h2"
cores = 2
core_mips = 2000
mem_mb = 4096
agent = "{a2}"

[[host]]
name = "h3"
cores = 2
core_mips = 2000
mem_mb = 4096
power = {{ driver = "process", command = ["sh", "-c", "echo $$ > '{}'; exec sleep 300"] }}
"#,
        pidfile.display()
    );
    let cfg = Config::parse(Path::new("cluster.toml"), &text).unwrap();
    assert!(cfg.problems.is_empty(), "{:?}", cfg.problems);
    let daemon = Daemon::from_config(&cfg);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = l.local_addr().unwrap();
    tokio::spawn(serve(daemon, l, std::time::Duration::from_secs(3600)));

    // Load: 4 x 1700 MIPS on 8000 MIPS running: over 80 %, h3 powers up.
    let _: RoundView = call(api, Method::Post, "/v1/round", None).await.unwrap();
    let hosts: Vec<HostView> = call(api, Method::Get, "/v1/hosts", None).await.unwrap();
    assert_eq!(hosts[2].power, ferry_scheduler::model::PowerState::On);
    let mut pid = None;
    for _ in 0..500 {
        pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if pid.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let pid = pid.expect("the process driver started the host's process");
    assert!(alive(pid));

    // Load drops; once the demand peaks have aged out, h3 is not needed.
    // The estimate is a VM's peak over ferry's long window (900 s), one
    // sample per round at the default 30 s interval: 30 rounds.
    for vms in world.lock().unwrap().values_mut() {
        for v in vms.iter_mut() {
            v.cpu_mips = 100.0;
        }
    }
    let mut off = false;
    for _ in 0..60 {
        let _: RoundView = call(api, Method::Post, "/v1/round", None).await.unwrap();
        let hosts: Vec<HostView> = call(api, Method::Get, "/v1/hosts", None).await.unwrap();
        if hosts[2].power == ferry_scheduler::model::PowerState::Off {
            off = true;
            break;
        }
    }
    assert!(off, "h3 powered down after the load drop");
    assert!(!alive(pid), "the host's process was stopped and reaped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_vm_failed_to_leave_is_not_powered_off() {
    // Two lightly loaded hosts: power save wants to empty one of them, but
    // each agent refuses to move its VM away. Powering the host off anyway
    // would lose the VM.
    let world: World = Arc::new(Mutex::new(HashMap::new()));
    let vm = |n: &str| AgentVm {
        name: n.into(),
        mem_mb: 256,
        cpu_mips: 100.0,
        running: true,
    };
    world.lock().unwrap().insert("h1".into(), vec![vm("a")]);
    world.lock().unwrap().insert("h2".into(), vec![vm("b")]);
    let a1 = spawn_agent("h1", world.clone(), Some("a")).await;
    let a2 = spawn_agent("h2", world.clone(), Some("b")).await;
    let dir = tempfile::tempdir().unwrap();
    let (off1, off2) = (dir.path().join("h1-off"), dir.path().join("h2-off"));
    let text = format!(
        r#"[daemon]
listen = "127.0.0.1:0"
policy = "power_save"
power_save_duration_s = 0
min_move_interval_s = 0

[[host]]
name = "h1"
cores = 2
core_mips = 2000
mem_mb = 4096
agent = "{a1}"
power = {{ driver = "command", on = ["true"], off = ["touch", "{}"] }}

[[host]]
name = "h2"
cores = 2
core_mips = 2000
mem_mb = 4096
agent = "{a2}"
power = {{ driver = "command", on = ["true"], off = ["touch", "{}"] }}
"#,
        off1.display(),
        off2.display()
    );
    let cfg = Config::parse(Path::new("cluster.toml"), &text).unwrap();
    assert!(cfg.problems.is_empty(), "{:?}", cfg.problems);
    let daemon = Daemon::from_config(&cfg);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = l.local_addr().unwrap();
    tokio::spawn(serve(daemon, l, std::time::Duration::from_secs(3600)));
    let mut refused = 0;
    for _ in 0..15 {
        if let Err(e) = call::<RoundView>(api, Method::Post, "/v1/round", None).await {
            assert!(e.contains("HTTP 502") && e.contains("rolled back"), "{e}");
            refused += 1;
        }
    }
    assert!(refused >= 1, "a round whose migration failed answered 2xx");
    let m = tokio::task::spawn_blocking(move || raw_get(api, "/metrics"))
        .await
        .unwrap();
    let failed: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("ferry_sched_migrations_failed_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(failed >= 1, "power save never tried to empty a host: {m}");
    assert!(
        !off1.exists() && !off2.exists(),
        "a host with a VM on it was powered off"
    );
    assert_eq!(where_is(&world, "a").as_deref(), Some("h1"));
    assert_eq!(where_is(&world, "b").as_deref(), Some("h2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_running_twice_and_an_agent_with_another_name_are_reported() {
    let world: World = Arc::new(Mutex::new(HashMap::new()));
    let vm = |n: &str| AgentVm {
        name: n.into(),
        mem_mb: 256,
        cpu_mips: 100.0,
        running: true,
    };
    world.lock().unwrap().insert("h1".into(), vec![vm("a")]);
    world.lock().unwrap().insert("h2".into(), vec![vm("a")]);
    let a1 = spawn_agent("h1", world.clone(), None).await;
    let a2 = spawn_agent("h2", world.clone(), None).await;
    let a3 = spawn_agent_claiming("h3", Some("h1"), world.clone(), None).await;
    let text = format!(
        r#"[daemon]
listen = "127.0.0.1:0"
policy = "manual"
{}"#,
        [("h1", a1), ("h2", a2), ("h3", a3)]
            .iter()
            .map(|(h, a)| format!(
                "\n[[host]]\nname = \"{h}\"\ncores = 2\ncore_mips = 2000\nmem_mb = 4096\nagent = \"{a}\"\n"
            ))
            .collect::<String>()
    );
    let cfg = Config::parse(Path::new("cluster.toml"), &text).unwrap();
    assert!(cfg.problems.is_empty(), "{:?}", cfg.problems);
    let daemon = Daemon::from_config(&cfg);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = l.local_addr().unwrap();
    tokio::spawn(serve(daemon, l, std::time::Duration::from_secs(3600)));
    let _: RoundView = call(api, Method::Post, "/v1/round", None).await.unwrap();

    let p: ProblemsView = call(api, Method::Get, "/v1/problems", None).await.unwrap();
    assert_eq!(
        p.cluster,
        vec!["VM \"a\" is reported running on 2 hosts: h1, h2".to_string()]
    );
    assert_eq!(p.hosts.len(), 1, "{:?}", p.hosts);
    assert!(
        p.hosts[0].starts_with(&format!(
            "host h3: the agent at {a3} says it is host \"h1\", but the configuration has it as host \"h3\""
        )),
        "{:?}",
        p.hosts
    );
    let hosts: Vec<HostView> = call(api, Method::Get, "/v1/hosts", None).await.unwrap();
    assert_eq!(hosts[2].health.reachable, Some(false));
    assert!(hosts[2].health.since_unix_s.is_some());
    assert_eq!(hosts[0].health.reachable, Some(true));
}

/// A host whose health command says `degraded` is evacuated on the
/// daemon's rounds (the maintenance evacuation), shown degraded with the
/// command's output as evidence, and released, its VMs back, once the
/// command says `ok` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_health_command_evacuates_the_host_and_recovery_brings_its_vms_back() {
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
    let a1 = spawn_agent("h1", world.clone(), None).await;
    let a2 = spawn_agent("h2", world.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let sensor = dir.path().join("h1-health");
    std::fs::write(&sensor, "ok\n").unwrap();
    let host = |name: &str, agent: SocketAddr, health: &str| {
        format!(
            "[[host]]\nname = \"{name}\"\ncores = 2\ncore_mips = 2000\nmem_mb = 4096\nagent = \"{agent}\"\n{health}\n"
        )
    };
    let text = format!(
        "[daemon]\nlisten = \"127.0.0.1:0\"\npolicy = \"manual\"\n\n[health]\naction = \"evacuate\"\nrelease_after_s = 0\n\n{}\n{}\n[[vm]]\nname = \"a\"\nhost = \"h1\"\ncpu_mips = 1000\nmem_mb = 512\n\n[[vm]]\nname = \"b\"\nhost = \"h1\"\ncpu_mips = 1000\nmem_mb = 512\n",
        host(
            "h1",
            a1,
            &format!(
                "health = [ {{ provider = \"command\", command = [\"cat\", \"{}\"] }} ]",
                sensor.display()
            )
        ),
        host("h2", a2, ""),
    );
    let cfg = Config::parse(Path::new("cluster.toml"), &text).unwrap();
    assert!(cfg.problems.is_empty(), "{:?}", cfg.problems);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = l.local_addr().unwrap();
    tokio::spawn(serve(
        Daemon::from_config(&cfg),
        l,
        std::time::Duration::from_secs(3600),
    ));
    // Healthy: nothing moves.
    let _: RoundView = call(api, Method::Post, "/v1/round", None).await.unwrap();
    assert_eq!(where_is(&world, "a").as_deref(), Some("h1"));
    let hosts: Vec<HostView> = call(api, Method::Get, "/v1/hosts", None).await.unwrap();
    assert!(!hosts[0].hardware.state.held(), "{:?}", hosts[0]);
    assert_eq!(hosts[0].hardware.readings.len(), 1);

    std::fs::write(&sensor, "degraded FAN2 1200 RPM below 1500\n").unwrap();
    for _ in 0..8 {
        let _: RoundView = call(api, Method::Post, "/v1/round", None).await.unwrap();
        if where_is(&world, "a").as_deref() == Some("h2")
            && where_is(&world, "b").as_deref() == Some("h2")
        {
            break;
        }
    }
    assert_eq!(where_is(&world, "a").as_deref(), Some("h2"));
    assert_eq!(where_is(&world, "b").as_deref(), Some("h2"));
    let hosts: Vec<HostView> = call(api, Method::Get, "/v1/hosts", None).await.unwrap();
    let h1 = &hosts[0];
    assert!(h1.maintenance && h1.hardware.evacuated, "{h1:?}");
    assert!(h1.hardware.state.held(), "{h1:?}");
    assert!(
        h1.hardware.readings[0].evidence.contains("FAN2 1200 RPM"),
        "{h1:?}"
    );

    std::fs::write(&sensor, "ok\n").unwrap();
    for _ in 0..8 {
        let _: RoundView = call(api, Method::Post, "/v1/round", None).await.unwrap();
        if where_is(&world, "a").as_deref() == Some("h1")
            && where_is(&world, "b").as_deref() == Some("h1")
        {
            break;
        }
    }
    assert_eq!(where_is(&world, "a").as_deref(), Some("h1"));
    assert_eq!(where_is(&world, "b").as_deref(), Some("h1"));
    let hosts: Vec<HostView> = call(api, Method::Get, "/v1/hosts", None).await.unwrap();
    assert!(
        !hosts[0].maintenance && !hosts[0].hardware.state.held() && !hosts[0].quarantined,
        "{:?}",
        hosts[0]
    );
}
