//! The scheduler daemon's HTTP API against real agents: `ferry sched
//! daemon` and `ferry agent` processes on loopback, each agent running real
//! KVM workload guests (64 MiB, 1000 pages/s), all killed by PID when the
//! test ends, whatever way it ends. What a test asks of the agents happens
//! to real guests: an evacuation is a live migration (the guest's
//! heartbeat keeps rising on the other host), a failed one leaves the guest
//! running where it was.
//!
//! A migration fails here for a real reason: the destination agents take
//! incoming migrations on a fixed `--migration-listen` port that this test
//! holds, so every destination refuses ("the migration port ... is taken")
//! and the source keeps its guest.
//!
//! What stays with the protocol-level agents in
//! `scheduler/tests/daemon_api.rs` is daemon-side logic that needs no agent
//! behaviour: configuration problems, the policy's GET/PUT, the power
//! driver's hook on empty hosts, and the rules' validation. The process
//! power driver with real agents is `sched_e2e.rs`.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::sched::{free_addr, wait_for, SchedDaemon, CALL_TIMEOUT};
use common::FERRY;

use ferry_e2e::process::ProcessGuard;
use ferry_scheduler::daemon::api::{ProblemsView, RoundView, VmView};
use ferry_scheduler::daemon::client::{JsonClient, Method};
use ferry_scheduler::daemon::protocol::{AgentStatus, Done};
use ferry_scheduler::plan::rules::{Rule, RuleKind};
use ferry_vm::testing::kvm_or_skip;
use ferry_vm::GuestStatus;

const VM_MEM_MB: u64 = 64;

/// A `ferry agent` process (killed on drop).
struct Agent {
    /// The name it is configured as in cluster.toml.
    host: String,
    addr: SocketAddr,
    proc: ProcessGuard,
}

/// How to start one agent.
struct AgentSpec<'a> {
    /// Its host name in cluster.toml.
    host: &'a str,
    /// The name it gives itself (`--host`), when not `host`.
    claims: Option<&'a str>,
    /// Guests it starts at once.
    vms: &'a [&'a str],
    /// Where it takes incoming migrations (`--migration-listen`).
    migration_listen: Option<SocketAddr>,
}

impl<'a> AgentSpec<'a> {
    fn new(host: &'a str, vms: &'a [&'a str]) -> Self {
        Self {
            host,
            claims: None,
            vms,
            migration_listen: None,
        }
    }
}

impl Agent {
    fn start(dir: &Path, spec: &AgentSpec<'_>) -> Agent {
        let addr = free_addr();
        let mut cmd = Command::new(FERRY);
        cmd.args([
            "agent",
            "--insecure",
            "--lanes",
            "1",
            "--guest-rate",
            "1000",
        ])
        .args(["--host", spec.claims.unwrap_or(spec.host)])
        .arg("--listen")
        .arg(addr.to_string());
        for vm in spec.vms {
            cmd.arg("--vm").arg(format!("{vm}:{VM_MEM_MB}:1000"));
        }
        if let Some(m) = spec.migration_listen {
            cmd.arg("--migration-listen").arg(m.to_string());
        }
        let log = dir.join(format!("agent-{}.log", spec.host));
        let proc = ProcessGuard::spawn(&format!("agent {}", spec.host), &mut cmd, &log)
            .expect("start ferry agent");
        let mut agent = Agent {
            host: spec.host.to_owned(),
            addr,
            proc,
        };
        wait_for(
            &format!("agent {} to run {:?}", spec.host, spec.vms),
            Duration::from_secs(60),
            || {
                assert!(
                    agent.proc.is_running(),
                    "agent {} exited: see {}",
                    spec.host,
                    log.display()
                );
                let s = agent.status().ok()?;
                spec.vms
                    .iter()
                    .all(|vm| s.vms.iter().any(|v| v.name == *vm && v.running))
                    .then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        agent
    }

    fn client(&self) -> JsonClient {
        JsonClient::new(&self.addr.to_string(), Some(CALL_TIMEOUT))
    }

    fn status(&self) -> Result<AgentStatus, String> {
        self.client().get("/v1/status").map_err(|e| e.to_string())
    }

    fn runs(&self, vm: &str) -> bool {
        self.status()
            .is_ok_and(|s| s.vms.iter().any(|v| v.name == vm && v.running))
    }

    fn guest(&self, vm: &str) -> GuestStatus {
        self.client()
            .get(&format!("/v1/vms/{vm}"))
            .unwrap_or_else(|e| panic!("{vm} on {}: {e}", self.host))
    }

    /// `vm` runs here, healthy, its heartbeat at least `from` and rising.
    /// Returns the last heartbeat.
    fn check_alive(&self, vm: &str, from: u64) -> u64 {
        let first = self.guest(vm);
        assert!(
            first.heartbeat >= from,
            "{vm} on {}: heartbeat {} went back below {from}",
            self.host,
            first.heartbeat
        );
        let last = wait_for(
            &format!("{vm}'s heartbeat to rise on {}", self.host),
            Duration::from_secs(30),
            || {
                let s = self.guest(vm);
                (s.heartbeat > first.heartbeat).then_some(s)
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(
            last.magic_ok && last.verify_errors == 0,
            "{vm} on {} is not healthy: {last:?}",
            self.host
        );
        last.heartbeat
    }
}

/// Which of `agents` run `vm`.
fn where_is(agents: &[Agent], vm: &str) -> Vec<String> {
    agents
        .iter()
        .filter(|a| a.runs(vm))
        .map(|a| a.host.clone())
        .collect()
}

/// `[[host]]` of cluster.toml for `agent`, with `extra` lines.
fn host_toml(agent: &Agent, extra: &str) -> String {
    format!(
        "\n[[host]]\nname = \"{}\"\ncores = 2\ncore_mips = 2000\nmem_mb = 4096\nagent = \"{}\"\n{extra}\n",
        agent.host, agent.addr
    )
}

fn vm_toml(vm: &str, host: &str) -> String {
    format!("\n[[vm]]\nname = \"{vm}\"\nhost = \"{host}\"\ncpu_mips = 1000\nmem_mb = {VM_MEM_MB}\n")
}

/// The daemon on a config of `daemon` lines (under `[daemon]`) and then
/// `rest` (hosts, VMs, other sections).
fn daemon(dir: &Path, daemon: &str, rest: &str) -> SchedDaemon {
    SchedDaemon::start(dir, "daemon", daemon, rest).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Three agents, `h1` running guests `a` and `b`, `h2` and `h3` as
/// `spec` makes them, and a manual-policy daemon over the three.
fn a_and_b_on_h1<'a>(
    dir: &Path,
    spec: impl Fn(&'a str) -> AgentSpec<'a>,
) -> ([Agent; 3], SchedDaemon) {
    let agents = [
        Agent::start(dir, &AgentSpec::new("h1", &["a", "b"])),
        Agent::start(dir, &spec("h2")),
        Agent::start(dir, &spec("h3")),
    ];
    let rest: String = agents.iter().map(|a| host_toml(a, "")).collect::<String>()
        + &vm_toml("a", "h1")
        + &vm_toml("b", "h1");
    let d = daemon(dir, "policy = \"manual\"", &rest);
    (agents, d)
}

/// Skips loudly without KVM; the temporary directory of the test.
fn setup(test: &str) -> Option<tempfile::TempDir> {
    kvm_or_skip(test).then(|| tempfile::tempdir().expect("tempdir"))
}

#[test]
fn maintenance_evacuates_live_and_returns_through_the_api() {
    let Some(dir) = setup("maintenance_evacuates_live_and_returns_through_the_api") else {
        return;
    };
    let (agents, d) = a_and_b_on_h1(dir.path(), |h| AgentSpec::new(h, &[]));
    let hosts = d.hosts();
    assert_eq!(hosts.len(), 3);
    assert_eq!(hosts[0].vms, vec!["a", "b"]);
    let mut hb = [agents[0].check_alive("a", 0), agents[0].check_alive("b", 0)];

    let _: RoundView = d
        .call(Method::Post, "/v1/hosts/h1/maintenance")
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    for (i, vm) in ["a", "b"].into_iter().enumerate() {
        let at = where_is(&agents, vm);
        assert!(at.len() == 1 && at[0] != "h1", "{vm} runs on {at:?}");
        let agent = agents.iter().find(|a| a.host == at[0]).unwrap();
        hb[i] = agent.check_alive(vm, hb[i]);
    }
    let vms: Vec<VmView> = d.call(Method::Get, "/v1/vms").unwrap();
    assert!(
        vms.iter().all(|v| v.home.as_deref() == Some("h1")),
        "the daemon remembers where they came from: {vms:?}"
    );

    let _: RoundView = d
        .call(Method::Delete, "/v1/hosts/h1/maintenance")
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    for (i, vm) in ["a", "b"].into_iter().enumerate() {
        assert_eq!(where_is(&agents, vm), vec!["h1"], "{vm} is back home");
        hb[i] = agents[0].check_alive(vm, hb[i]);
    }
    let plan: RoundView = d.call(Method::Get, "/v1/plan").unwrap();
    assert!(
        plan.actions
            .iter()
            .all(|a| a.reason.contains("maintenance")),
        "{plan:?}"
    );
    assert!(
        d.hosts().iter().all(|h| h.health.reachable == Some(true)),
        "{:?}",
        d.hosts()
    );
    let e = d
        .call::<RoundView>(Method::Post, "/v1/hosts/nope/maintenance")
        .unwrap_err();
    assert!(e.contains("404") && e.contains("no host named"), "{e}");
}

/// The destinations' migration port, held by the test: each incoming
/// migration is refused, each evacuation fails.
fn taken_port() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("hold a port")
}

#[test]
fn a_failed_migration_leaves_the_guest_running_on_its_source() {
    let Some(dir) = setup("a_failed_migration_leaves_the_guest_running_on_its_source") else {
        return;
    };
    let taken = taken_port();
    let port = taken.local_addr().unwrap();
    let (agents, d) = a_and_b_on_h1(dir.path(), |host| AgentSpec {
        migration_listen: Some(port),
        ..AgentSpec::new(host, &[])
    });
    let hb = [agents[0].check_alive("a", 0), agents[0].check_alive("b", 0)];

    let e = d
        .call::<RoundView>(Method::Post, "/v1/hosts/h1/maintenance")
        .unwrap_err();
    assert!(
        e.contains("HTTP 502") && e.contains(&format!("the migration port {port} is taken")),
        "the failed evacuation answers an error with the agent's reason: {e}"
    );
    for (i, vm) in ["a", "b"].into_iter().enumerate() {
        assert_eq!(where_is(&agents, vm), vec!["h1"], "{vm} stayed");
        agents[0].check_alive(vm, hb[i]);
    }
    let vms: Vec<VmView> = d.call(Method::Get, "/v1/vms").unwrap();
    assert!(
        vms.iter().all(|v| v.host.as_deref() == Some("h1")),
        "the model agrees with the agents: {vms:?}"
    );
    assert!(d.metric("ferry_sched_migrations_failed_total") >= 1);
    drop(taken);
}

#[test]
fn a_host_whose_guest_failed_to_leave_is_not_powered_off() {
    let Some(dir) = setup("a_host_whose_guest_failed_to_leave_is_not_powered_off") else {
        return;
    };
    // Two lightly loaded hosts: power save wants to empty one of them, but
    // neither takes the other's guest. Powering a host off anyway would
    // lose its guest.
    let taken = taken_port();
    let port = taken.local_addr().unwrap();
    let spec = |host, vms| AgentSpec {
        migration_listen: Some(port),
        ..AgentSpec::new(host, vms)
    };
    let agents = [
        Agent::start(dir.path(), &spec("h1", &["a"])),
        Agent::start(dir.path(), &spec("h2", &["b"])),
    ];
    for (a, vm) in agents.iter().zip(["a", "b"]) {
        a.client()
            .post::<_, Done>(
                "/v1/vms/load",
                &ferry_scheduler::daemon::protocol::LoadRequest {
                    vm: vm.into(),
                    cpu_mips: 100.0,
                },
            )
            .expect("set the load");
    }
    let off = |h: &str| dir.path().join(format!("{h}-off"));
    let power = |h: &str| {
        format!(
            "power = {{ driver = \"command\", on = [\"true\"], off = [\"touch\", \"{}\"] }}",
            off(h).display()
        )
    };
    let rest = host_toml(&agents[0], &power("h1")) + &host_toml(&agents[1], &power("h2"));
    let d = daemon(
        dir.path(),
        "policy = \"power_save\"\npower_save_duration_s = 0\nmin_move_interval_s = 0",
        &rest,
    );
    let mut refused = 0;
    for _ in 0..5 {
        if let Err(e) = d.round() {
            assert!(e.contains("HTTP 502") && e.contains("is taken"), "{e}");
            refused += 1;
        }
    }
    assert!(refused >= 1, "a round whose migration failed answered 2xx");
    assert!(
        d.metric("ferry_sched_migrations_failed_total") >= 1,
        "power save never tried to empty a host"
    );
    assert!(
        !off("h1").exists() && !off("h2").exists(),
        "a host with a guest on it was powered off"
    );
    assert_eq!(where_is(&agents, "a"), vec!["h1"]);
    assert_eq!(where_is(&agents, "b"), vec!["h2"]);
    agents[0].check_alive("a", 0);
    agents[1].check_alive("b", 0);
    drop(taken);
}

#[test]
fn maintenance_honours_an_anti_affinity_rule() {
    let Some(dir) = setup("maintenance_honours_an_anti_affinity_rule") else {
        return;
    };
    let (agents, d) = a_and_b_on_h1(dir.path(), |h| AgentSpec::new(h, &[]));
    let apart = Rule {
        name: "apart".into(),
        kind: RuleKind::AntiAffinity,
        vms: vec!["a".into(), "b".into()],
        hosts: Vec::new(),
    };
    let rules: Vec<Rule> = d
        .call_with(Method::Post, "/v1/rules", Some(&apart))
        .unwrap();
    assert_eq!(rules.len(), 1);

    // Evacuating h1: a and b may not share the target.
    let r: RoundView = d
        .call(Method::Post, "/v1/hosts/h1/maintenance")
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    let (a, b) = (where_is(&agents, "a"), where_is(&agents, "b"));
    assert!(
        a.len() == 1 && b.len() == 1 && a != b && a[0] != "h1" && b[0] != "h1",
        "a on {a:?}, b on {b:?}"
    );
    assert!(
        r.actions
            .iter()
            .any(|x| x.reason.contains("rules: anti_affinity \"apart\" keeps")),
        "{r:?}"
    );
    for (vm, at) in [("a", &a[0]), ("b", &b[0])] {
        agents
            .iter()
            .find(|x| x.host == *at)
            .unwrap()
            .check_alive(vm, 0);
    }
}

#[test]
fn a_guest_running_twice_and_an_agent_with_another_name_are_reported() {
    let Some(dir) = setup("a_guest_running_twice_and_an_agent_with_another_name_are_reported")
    else {
        return;
    };
    let agents = [
        Agent::start(dir.path(), &AgentSpec::new("h1", &["a"])),
        Agent::start(dir.path(), &AgentSpec::new("h2", &["a"])),
        Agent::start(
            dir.path(),
            &AgentSpec {
                claims: Some("h1"),
                ..AgentSpec::new("h3", &[])
            },
        ),
    ];
    let rest: String = agents.iter().map(|a| host_toml(a, "")).collect();
    let d = daemon(dir.path(), "policy = \"manual\"", &rest);
    let _: RoundView = d.round().unwrap();

    let p: ProblemsView = d.call(Method::Get, "/v1/problems").unwrap();
    assert_eq!(
        p.cluster,
        vec!["VM \"a\" is reported running on 2 hosts: h1, h2".to_string()]
    );
    assert_eq!(p.hosts.len(), 1, "{:?}", p.hosts);
    assert!(
        p.hosts[0].starts_with(&format!(
            "host h3: the agent at {} says it is host \"h1\", but the configuration has it as host \"h3\"",
            agents[2].addr
        )),
        "{:?}",
        p.hosts
    );
    let hosts = d.hosts();
    assert_eq!(hosts[2].health.reachable, Some(false));
    assert!(hosts[2].health.since_unix_s.is_some());
    assert_eq!(hosts[0].health.reachable, Some(true));
}

/// A host whose health command says `degraded` is evacuated on the
/// daemon's rounds (the maintenance evacuation), shown degraded with the
/// command's output as evidence, and released, its guests back, once the
/// command says `ok` again.
#[test]
fn a_degraded_health_command_evacuates_the_host_and_recovery_brings_its_guests_back() {
    let Some(dir) =
        setup("a_degraded_health_command_evacuates_the_host_and_recovery_brings_its_guests_back")
    else {
        return;
    };
    let agents = [
        Agent::start(dir.path(), &AgentSpec::new("h1", &["a", "b"])),
        Agent::start(dir.path(), &AgentSpec::new("h2", &[])),
    ];
    let sensor = dir.path().join("h1-health");
    std::fs::write(&sensor, "ok\n").unwrap();
    let health = format!(
        "health = [ {{ provider = \"command\", command = [\"cat\", \"{}\"] }} ]",
        sensor.display()
    );
    let rest = format!(
        "\n[health]\naction = \"evacuate\"\nrelease_after_s = 0\n{}{}{}{}",
        host_toml(&agents[0], &health),
        host_toml(&agents[1], ""),
        vm_toml("a", "h1"),
        vm_toml("b", "h1")
    );
    let d = daemon(dir.path(), "policy = \"manual\"", &rest);
    // Healthy: nothing moves.
    let _: RoundView = d.round().unwrap();
    assert_eq!(where_is(&agents, "a"), vec!["h1"]);
    let hosts = d.hosts();
    assert!(!hosts[0].hardware.state.held(), "{:?}", hosts[0]);
    assert_eq!(hosts[0].hardware.readings.len(), 1);
    let mut hb = [agents[0].check_alive("a", 0), agents[0].check_alive("b", 0)];

    let both_on = |h: &str| where_is(&agents, "a") == [h] && where_is(&agents, "b") == [h];
    std::fs::write(&sensor, "degraded FAN2 1200 RPM below 1500\n").unwrap();
    for _ in 0..8 {
        d.round()
            .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
        if both_on("h2") {
            break;
        }
    }
    assert!(both_on("h2"), "h1 was not evacuated\n{}", d.log_text());
    for (i, vm) in ["a", "b"].into_iter().enumerate() {
        hb[i] = agents[1].check_alive(vm, hb[i]);
    }
    let hosts = d.hosts();
    let h1 = &hosts[0];
    assert!(h1.maintenance && h1.hardware.evacuated, "{h1:?}");
    assert!(h1.hardware.state.held(), "{h1:?}");
    assert!(
        h1.hardware.readings[0].evidence.contains("FAN2 1200 RPM"),
        "{h1:?}"
    );

    std::fs::write(&sensor, "ok\n").unwrap();
    for _ in 0..8 {
        d.round()
            .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
        if both_on("h1") {
            break;
        }
    }
    assert!(
        both_on("h1"),
        "the guests did not come back\n{}",
        d.log_text()
    );
    for (i, vm) in ["a", "b"].into_iter().enumerate() {
        agents[0].check_alive(vm, hb[i]);
    }
    let hosts = d.hosts();
    assert!(
        !hosts[0].maintenance && !hosts[0].hardware.state.held() && !hosts[0].quarantined,
        "{:?}",
        hosts[0]
    );
}
