//! The scheduler daemon with real pieces: three `ferry agent` processes on
//! loopback, each started and stopped by the daemon's `process` power
//! driver, running small real KVM workload guests. Putting a host into
//! maintenance evacuates its guest live (heartbeats keep rising, no verify
//! errors) and leaving brings it back; a load drop makes power save empty a
//! host and power it down (its agent process is gone), a load rise powers
//! it up again (a new agent process answers). The agents migrate to each
//! other over 2 lanes with mutual TLS (certificates from
//! `ferry tls gen-certs --nodes h1 h2 h3`).
//!
//! Planning rounds are triggered through `POST /v1/round` (the timer is set
//! to a day), so every step is explicit.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::sched::{wait_for, SchedDaemon};
use common::{free_port, FERRY};
use ferry_e2e::process::ProcessGuard;
use ferry_scheduler::daemon::client::{JsonClient, Method};
use ferry_scheduler::daemon::https::ClientTls;
use ferry_scheduler::daemon::protocol::INCOMING_TIMEOUT;
use ferry_transport::tls::TlsFiles;
use ferry_transport::{LaneOptions, Lanes, Security};
use ferry_vm::testing::kvm_or_skip;
use serde_json::{json, Value};

const HOSTS: [&str; 3] = ["h1", "h2", "h3"];
/// Each host's guest, by index (v1 on h1, ...).
const VMS: [&str; 3] = ["v1", "v2", "v3"];
const VM_MEM_MB: u64 = 64;

fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    call(
        JsonClient::new(&addr.to_string(), Some(Duration::from_secs(300))),
        method,
        path,
        body,
    )
}

fn call(client: JsonClient, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let method = match method {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        other => bail!("no method {other}"),
    };
    Ok(client.call::<Value, Value>(method, path, body)?)
}

/// The daemon (its process driver runs the agents) and how to reach the
/// agents.
struct DaemonGuard {
    daemon: SchedDaemon,
    agents: Vec<SocketAddr>,
    /// The daemon's certificate: the test asks agents with it too.
    tls: ClientTls,
}

impl DaemonGuard {
    fn get(&self, path: &str) -> Result<Value> {
        http(self.daemon.api, "GET", path, None)
    }

    fn round(&self) -> Result<Value> {
        http(self.daemon.api, "POST", "/v1/round", Some(&json!({})))
    }

    fn agent(&self, host: &str) -> SocketAddr {
        self.agents[HOSTS.iter().position(|h| *h == host).expect("known host")]
    }

    /// A call to `host`'s agent, over its mutual TLS.
    fn agent_call(
        &self,
        host: &str,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        let client = JsonClient::for_agent(
            host,
            self.agent(host),
            Some(&self.tls),
            Some(Duration::from_secs(300)),
        );
        call(client, method, path, body)
    }

    /// Names of the VMs `host`'s agent runs.
    fn agent_vms(&self, host: &str) -> Result<Vec<String>> {
        let s = self.agent_call(host, "GET", "/v1/status", None)?;
        Ok(s["vms"]
            .as_array()
            .context("status without vms")?
            .iter()
            .filter_map(|v| v["name"].as_str().map(str::to_owned))
            .collect())
    }

    /// Which agent runs `vm` (asking every host that answers).
    fn where_is(&self, vm: &str) -> Vec<String> {
        HOSTS
            .iter()
            .filter(|h| {
                self.agent_vms(h)
                    .is_ok_and(|vms| vms.iter().any(|v| v == vm))
            })
            .map(|h| h.to_string())
            .collect()
    }

    /// The guest's status block from the agent running it.
    fn guest(&self, host: &str, vm: &str) -> Result<Value> {
        self.agent_call(host, "GET", &format!("/v1/vms/{vm}"), None)
            .with_context(|| format!("agent {host} about {vm}"))
    }

    fn set_load(&self, host: &str, vm: &str, mips: f64) -> Result<()> {
        self.agent_call(
            host,
            "POST",
            "/v1/vms/load",
            Some(&json!({"vm": vm, "cpu_mips": mips})),
        )
        .with_context(|| format!("setting the load of {vm} on {host}"))?;
        Ok(())
    }

    fn hosts(&self) -> Result<Vec<Value>> {
        Ok(self
            .get("/v1/hosts")?
            .as_array()
            .context("hosts is not a list")?
            .clone())
    }

    fn power(&self, host: &str) -> Result<String> {
        Ok(self
            .hosts()?
            .iter()
            .find(|h| h["name"] == host)
            .with_context(|| format!("no host {host} in /v1/hosts"))?["power"]
            .as_str()
            .unwrap_or("?")
            .to_owned())
    }

    /// What to print when something is wrong: the daemon's view and log.
    fn diag(&self) -> String {
        let show = |p: &str| {
            self.get(p)
                .map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
                .unwrap_or_else(|e| format!("{e:#}"))
        };
        let log = self.daemon.log_text();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(80)..].join("\n");
        format!(
            "\n--- /v1/plan\n{}\n--- /v1/hosts\n{}\n--- /v1/vms\n{}\n--- daemon log (last 80 lines of {})\n{tail}\n",
            show("/v1/plan"),
            show("/v1/hosts"),
            show("/v1/vms"),
            self.daemon.log.display()
        )
    }

    /// `vm` runs on `host`, its heartbeat is at least `from` and then
    /// rises, and it has no verify errors. Returns the last heartbeat.
    fn check_alive(&self, host: &str, vm: &str, from: u64) -> Result<u64> {
        let first = self.guest(host, vm)?;
        let hb0 = first["heartbeat"].as_u64().context("no heartbeat")?;
        if hb0 < from {
            bail!("{vm} on {host}: heartbeat {hb0} went back below {from}: {first}");
        }
        let last = wait_for(
            &format!("{vm}'s heartbeat to rise past {hb0} on {host}"),
            Duration::from_secs(30),
            || {
                let s = self.guest(host, vm).ok()?;
                let hb = s["heartbeat"].as_u64()?;
                (hb > hb0).then_some(s)
            },
        )?;
        if last["verify_errors"] != 0 || last["magic_ok"] != true {
            bail!("{vm} on {host} is not healthy: {last}");
        }
        Ok(last["heartbeat"].as_u64().unwrap_or(hb0))
    }
}

/// One CA and a certificate per node (`ferry tls gen-certs`), in `dir`:
/// the agents serve their API and migrate over mutual TLS, the daemon
/// (node `sched`) asks them with its own certificate.
fn gen_certs(dir: &Path, nodes: &[&str]) -> Result<()> {
    let out = Command::new(FERRY)
        .args(["tls", "gen-certs"])
        .arg(dir)
        .arg("--nodes")
        .args(nodes)
        .output()?;
    if !out.status.success() {
        bail!(
            "ferry tls gen-certs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn start_daemon(dir: &Path) -> Result<DaemonGuard> {
    let certs = dir.join("certs");
    gen_certs(&certs, &[HOSTS[0], HOSTS[1], HOSTS[2], "sched"])?;
    let cert_path = |name: String| certs.join(name).to_string_lossy().into_owned();
    let tls = ClientTls::load(&TlsFiles {
        cert: certs.join("sched.pem"),
        key: certs.join("sched.key"),
        ca: certs.join("ca.pem"),
    })?;
    let agents: Vec<SocketAddr> = HOSTS
        .iter()
        .map(|_| format!("127.0.0.1:{}", free_port()).parse())
        .collect::<Result<_, _>>()?;
    // Power save empties a light host at once (no waiting time) and the
    // timer never fires on its own; rounds come from POST /v1/round.
    let daemon = format!(
        "policy = \"power_save\"\npower_save_duration_s = 0\nmin_move_interval_s = 0\n\
         tls = {{ cert = {:?}, key = {:?}, ca = {:?} }}\n",
        cert_path("sched.pem".into()),
        cert_path("sched.key".into()),
        cert_path("ca.pem".into()),
    );
    let mut toml = String::new();
    for (i, host) in HOSTS.iter().enumerate() {
        let listen = agents[i].to_string();
        let (cert, key, ca) = (
            cert_path(format!("{host}.pem")),
            cert_path(format!("{host}.key")),
            cert_path("ca.pem".to_owned()),
        );
        let argv = [
            FERRY,
            "agent",
            "--host",
            host,
            "--listen",
            &listen,
            "--guest-rate",
            "1000",
            "--lanes",
            "2",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &ca,
        ];
        toml += &format!(
            "\n[[host]]\nname = \"{host}\"\ncores = 2\ncore_mips = 1000\nmem_mb = 1024\n\
             agent = \"{listen}\"\npower = {{ driver = \"process\", command = {} }}\n",
            serde_json::to_string(&argv)?
        );
    }
    // Sized so that the first round powers up all three hosts (3 x 1200
    // MIPS is over 80 % of two hosts).
    for (vm, host) in VMS.iter().zip(HOSTS) {
        toml += &format!(
            "\n[[vm]]\nname = \"{vm}\"\nhost = \"{host}\"\ncpu_mips = 1200\nmem_mb = {VM_MEM_MB}\n"
        );
    }
    Ok(DaemonGuard {
        daemon: SchedDaemon::start(dir, "daemon", &daemon, &toml)?,
        agents,
        tls,
    })
}

#[test]
fn maintenance_evacuates_live_and_power_save_cycles_an_agent() {
    if !kvm_or_skip("maintenance_evacuates_live_and_power_save_cycles_an_agent") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = start_daemon(dir.path()).expect("daemon starts");
    let diag = |d: &DaemonGuard| d.diag();

    // Power-up: process-driven hosts start off; the configured demand makes
    // power save switch all three on (the timer's first round, or ours).
    d.round().expect("round");
    for host in HOSTS {
        assert_eq!(
            d.power(host).unwrap(),
            "on",
            "{host} not powered on{}",
            diag(&d)
        );
        wait_for(
            &format!("agent {host} to answer"),
            Duration::from_secs(60),
            || d.agent_vms(host).ok(),
        )
        .unwrap_or_else(|e| panic!("{e:#}{}", diag(&d)));
        assert!(
            d.daemon.agent_pid(host).is_some(),
            "no agent process for {host}"
        );
    }
    assert!(d.daemon.proc.is_running(), "daemon exited{}", diag(&d));
    // Maintenance first, with no policy of its own running: ferry's policy
    // would consolidate three 40 % hosts at once (light is < 80 %).
    http(
        d.daemon.api,
        "PUT",
        "/v1/policy",
        Some(&json!({"mode": "manual"})),
    )
    .unwrap_or_else(|e| panic!("{e:#}{}", diag(&d)));

    // One real guest per host; demand 800 MIPS each.
    for (vm, host) in VMS.iter().zip(HOSTS) {
        d.agent_call(
            host,
            "POST",
            "/v1/vms/start",
            Some(&json!({"vm": vm, "mem_mb": VM_MEM_MB})),
        )
        .unwrap_or_else(|e| panic!("starting {vm} on {host}: {e:#}"));

        d.set_load(host, vm, 800.0).expect("set load");
    }
    d.round().expect("round");
    let mut hb = [0u64; 3];
    for (i, (vm, host)) in VMS.iter().zip(HOSTS).enumerate() {
        hb[i] = d
            .check_alive(host, vm, 0)
            .unwrap_or_else(|e| panic!("{e:#}{}", diag(&d)));
    }

    // 1. Maintenance on h1: v1 leaves live, h1 runs nothing.
    let plan = http(
        d.daemon.api,
        "POST",
        "/v1/hosts/h1/maintenance",
        Some(&json!({})),
    )
    .unwrap_or_else(|e| panic!("{e:#}{}", diag(&d)));
    let at = d.where_is("v1");
    assert_eq!(
        at.len(),
        1,
        "v1 runs on {at:?} after evacuation (plan {plan}){}",
        diag(&d)
    );
    assert_ne!(
        at[0],
        "h1",
        "v1 was not evacuated (plan {plan}){}",
        diag(&d)
    );
    let evac = at[0].clone();
    eprintln!("maintenance h1: v1 evacuated live to {evac} (plan {plan})");
    hb[0] = d
        .check_alive(&evac, "v1", hb[0])
        .unwrap_or_else(|e| panic!("after evacuation: {e:#}{}", diag(&d)));
    d.round().expect("round");
    assert_eq!(
        d.agent_vms("h1").unwrap(),
        Vec::<String>::new(),
        "h1 runs VMs while in maintenance{}",
        diag(&d)
    );
    let vms = d.get("/v1/vms").unwrap();
    let v1 = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "v1")
        .unwrap();
    assert_eq!(v1["host"], evac.as_str(), "daemon's view of v1{}", diag(&d));
    assert_eq!(v1["home"], "h1", "v1's home is remembered{}", diag(&d));
    for (i, (vm, host)) in VMS.iter().zip(HOSTS).enumerate().skip(1) {
        hb[i] = d
            .check_alive(host, vm, hb[i])
            .unwrap_or_else(|e| panic!("{e:#}{}", diag(&d)));
    }

    // Leaving maintenance brings v1 home, still the same running guest.
    let plan = http(d.daemon.api, "DELETE", "/v1/hosts/h1/maintenance", None)
        .unwrap_or_else(|e| panic!("{e:#}{}", diag(&d)));
    assert_eq!(
        d.where_is("v1"),
        vec!["h1".to_string()],
        "v1 did not return home (plan {plan}){}",
        diag(&d)
    );
    hb[0] = d
        .check_alive("h1", "v1", hb[0])
        .unwrap_or_else(|e| panic!("after return: {e:#}{}", diag(&d)));
    eprintln!(
        "left maintenance: v1 back on h1, heartbeat {} (plan {plan})",
        hb[0]
    );

    // 2. Power save again. Load drop: 560 MIPS each, 1680 in all, needs two
    // hosts' spare capacity, so exactly one host powers down.
    http(
        d.daemon.api,
        "PUT",
        "/v1/policy",
        Some(&json!({"mode": "power_save"})),
    )
    .unwrap_or_else(|e| panic!("{e:#}{}", diag(&d)));
    for (vm, host) in VMS.iter().zip(HOSTS) {
        d.set_load(host, vm, 560.0).expect("set load");
    }
    // The demand estimate is a VM's peak over ferry's windows, one sample
    // per round (the interval here is a day), so the drop shows at once.
    let pids_before: Vec<Option<u32>> = HOSTS.iter().map(|h| d.daemon.agent_pid(h)).collect();
    let mut off = None;
    let mut rounds = 0;
    for _ in 0..30 {
        rounds += 1;
        d.round().unwrap_or_else(|e| panic!("{e:#}{}", diag(&d)));
        let hosts = d.hosts().unwrap();
        let down: Vec<String> = hosts
            .iter()
            .filter(|h| h["power"] == "off")
            .filter_map(|h| h["name"].as_str().map(str::to_owned))
            .collect();
        if !down.is_empty() {
            assert_eq!(down.len(), 1, "more than one host powered down{}", diag(&d));
            off = Some(down[0].clone());
            break;
        }
    }
    let off = off.unwrap_or_else(|| panic!("power save never powered a host down{}", diag(&d)));
    let off_plan = d.get("/v1/plan").unwrap();
    eprintln!("load drop: power save powered {off} down after {rounds} rounds (plan {off_plan})");
    assert!(
        d.daemon.agent_pid(&off).is_none(),
        "the agent process of {off} still runs after power-off{}",
        diag(&d)
    );
    assert!(
        d.agent_vms(&off).is_err(),
        "{off}'s agent still answers after power-off{}",
        diag(&d)
    );
    let mut placed = Vec::new();
    for (i, vm) in VMS.iter().enumerate() {
        let at = d.where_is(vm);
        assert_eq!(at.len(), 1, "{vm} runs on {at:?}{}", diag(&d));
        assert_ne!(at[0], off, "{vm} is on the powered-down host{}", diag(&d));
        hb[i] = d
            .check_alive(&at[0], vm, hb[i])
            .unwrap_or_else(|e| panic!("after consolidation: {e:#}{}", diag(&d)));
        placed.push(at[0].clone());
    }

    // Load rise: 3 x 1200 MIPS is over 80 % of the two running hosts, so
    // power save switches the third on again: a new agent process answers.
    for (vm, host) in VMS.iter().zip(&placed) {
        d.set_load(host, vm, 1200.0).expect("set load");
    }
    d.round().unwrap_or_else(|e| panic!("{e:#}{}", diag(&d)));
    assert_eq!(
        d.power(&off).unwrap(),
        "on",
        "{off} was not powered up on the load rise{}",
        diag(&d)
    );
    wait_for(
        &format!("{off}'s agent to answer again"),
        Duration::from_secs(60),
        || d.agent_vms(&off).ok(),
    )
    .unwrap_or_else(|e| panic!("{e:#}{}", diag(&d)));
    assert!(
        d.daemon.agent_pid(&off).is_some(),
        "no agent process for {off} after power-on{}",
        diag(&d)
    );
    let old_pid = pids_before[HOSTS.iter().position(|h| *h == off).expect("known host")];
    assert_ne!(
        d.daemon.agent_pid(&off),
        old_pid,
        "{off}'s agent process is not a new one{}",
        diag(&d)
    );
    // The same round relieves the host that now runs over capacity, so
    // guests may have moved again: each still runs once, still alive.
    for (i, vm) in VMS.iter().enumerate() {
        let at = d.where_is(vm);
        assert_eq!(at.len(), 1, "{vm} runs on {at:?}{}", diag(&d));
        placed[i] = at[0].clone();
        hb[i] = d
            .check_alive(&placed[i], vm, hb[i])
            .unwrap_or_else(|e| panic!("after power-up: {e:#}{}", diag(&d)));
    }
    eprintln!(
        "load rise: {off} powered up again (new agent pid {:?}); guests on {placed:?}, heartbeats {hb:?}",
        d.daemon.agent_pid(&off)
    );
    let metrics = d.daemon.metrics();
    assert!(
        metrics.contains("ferry_sched_power_off_total 1\n")
            && metrics.contains("ferry_sched_migrations_failed_total 0\n"),
        "metrics: {metrics}{}",
        diag(&d)
    );
    assert!(d.daemon.proc.is_running(), "daemon exited{}", diag(&d));

    // The daemon dies hard (no destructors): the agents it powered die
    // with it, guests and ports included.
    let agents: Vec<u32> = HOSTS.iter().filter_map(|h| d.daemon.agent_pid(h)).collect();
    assert_eq!(agents.len(), 3, "{agents:?}{}", diag(&d));
    d.daemon.proc.kill();
    for pid in agents {
        wait_for(
            &format!("agent {pid} to die with the daemon"),
            Duration::from_secs(30),
            || {
                // Gone, or a zombie waiting for whoever adopted it.
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let state = stat.rfind(')').and_then(|i| stat.get(i + 2..i + 3));
                matches!(state, None | Some("Z")).then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    }
}

#[test]
fn an_agent_without_a_security_choice_refuses_to_start() {
    let out = Command::new(FERRY)
        .args(["agent", "--host", "h1", "--listen", "127.0.0.1:0"])
        .output()
        .expect("run ferry agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent started: {err}");
    assert!(
        err.contains("--insecure") && err.contains("--tls-cert"),
        "unclear error: {err}"
    );
}

/// Under systemd (`Type=notify`) the daemon says READY=1 once its API
/// listens and STOPPING=1 when it is terminated; in between, the `ferry
/// sched` client prints its answers and exits 1 with its refusals.
#[test]
fn the_daemon_notifies_systemd_ready_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&sock).expect("bind the notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let config = dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        format!("[daemon]\nlisten = \"{api}\"\npolicy = \"manual\"\n"),
    )
    .expect("config");
    let mut proc = ProcessGuard::spawn(
        "ferry sched daemon",
        Command::new(FERRY)
            .args(["sched", "daemon", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &sock),
        &dir.path().join("daemon.log"),
    )
    .expect("daemon starts");
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("a notification");
    assert_eq!(&buf[..n], b"READY=1\n");
    assert!(
        JsonClient::new(&api.to_string(), Some(Duration::from_secs(10)))
            .get::<Value>("/v1/hosts")
            .is_ok(),
        "READY before the API answers"
    );

    // The `ferry sched` client against it: answers, and refusals with the
    // daemon's reason and exit code 1.
    let sched = |args: &[&str]| {
        let out = Command::new(FERRY)
            .arg("sched")
            .args(args)
            .args(["--api", &api.to_string()])
            .output()
            .expect("ferry sched runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        )
    };
    assert_eq!(sched(&["policy", "get"]).1, "manual");
    assert_eq!(sched(&["policy", "set", "balance"]).1, "balance");
    assert_eq!(
        sched(&["policy", "get", "--json"])
            .1
            .replace([' ', '\n'], ""),
        r#"{"mode":"balance"}"#
    );
    let (code, _, err) = sched(&["policy", "set", "chaos"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("HTTP 400: unknown policy \"chaos\""), "{err}");
    let (code, _, err) = sched(&["maintenance", "enter", "nope"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("HTTP 404: no host named \"nope\""), "{err}");
    assert_eq!(sched(&["hosts", "--json"]).1, "[]");
    assert_eq!(sched(&["problems"]).1, "no problems");
    let pid = libc::pid_t::try_from(proc.pid()).expect("a pid");
    // SAFETY: kill(2) with the PID of the daemon this test started.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let n = notify.recv(&mut buf).expect("a notification");
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    proc.kill();
}

/// `--migration-listen IP:PORT` fixes the port incoming migrations are
/// accepted on, `--migration-advertise` is the address sources are told;
/// a second incoming migration while the port is taken is refused (409)
/// with the reason, not bound elsewhere; an incoming migration that fails
/// (its source connects, then goes away) frees the port at once, not only
/// after the agent's wait for a source ([`INCOMING_TIMEOUT`]).
#[test]
fn a_fixed_migration_port_takes_one_incoming_migration_at_a_time_and_a_failed_one_frees_it() {
    let test =
        "a_fixed_migration_port_takes_one_incoming_migration_at_a_time_and_a_failed_one_frees_it";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let api = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (port, relay) = (free_port(), free_port());
    let mut agent = ProcessGuard::spawn(
        "agent",
        Command::new(FERRY).args([
            "agent",
            "--host",
            "h1",
            "--listen",
            &api.to_string(),
            "--insecure",
            "--migration-listen",
            &format!("127.0.0.1:{port}"),
            "--migration-advertise",
            &format!("127.0.0.1:{relay}"),
        ]),
        &dir.path().join("agent.log"),
    )
    .expect("start the agent");
    wait_for("the agent to answer", Duration::from_secs(60), || {
        assert!(agent.is_running(), "the agent exited: see {:?}", dir.path());
        http(api, "GET", "/v1/status", None).ok()
    })
    .expect("agent");
    let first = http(
        api,
        "POST",
        "/v1/incoming",
        Some(&json!({"vm": "x", "mem_mb": 64})),
    )
    .expect("the first incoming migration");
    assert_eq!(first["port"], json!(port), "{first}");
    assert_eq!(
        first["addr"],
        json!(format!("127.0.0.1:{relay}")),
        "{first}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "nothing listens on the fixed port"
    );
    let second = http(
        api,
        "POST",
        "/v1/incoming",
        Some(&json!({"vm": "y", "mem_mb": 64})),
    )
    .expect_err("a second incoming migration on the taken port");
    let msg = second.to_string();
    assert!(
        msg.contains("409") && msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("taken"),
        "{msg}"
    );

    // x's source arrives (a lane session, as a migrating agent opens it)
    // and dies before its first frame: the migration fails and its
    // listener goes, so y's incoming migration gets the port well before
    // the agent would have given up waiting for x's source.
    let source = Lanes::connect(
        ("127.0.0.1", port),
        &LaneOptions::new(1, Security::Insecure),
    )
    .expect("x's source opens its lane");
    drop(source);
    let third = wait_for(
        "the failed incoming migration to free its port",
        INCOMING_TIMEOUT / 2,
        || {
            http(
                api,
                "POST",
                "/v1/incoming",
                Some(&json!({"vm": "y", "mem_mb": 64})),
            )
            .ok()
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}: {}",
            std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
        )
    });
    assert_eq!(third["port"], json!(port), "{third}");
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("incoming migration failed") && l.contains("vm=x")),
        "{log}"
    );
}

/// The agent API under mutual TLS (`--tls-*`, the lanes' files): the
/// daemon with the cluster CA's certificate drives the agent (it answers,
/// reachable); a daemon whose certificate another CA signed, a client
/// with no certificate and a plain-HTTP client are refused at the
/// handshake (the agent logs why); a client expecting another host's
/// name refuses the agent. Each refusal is one line naming what failed.
#[test]
fn the_agent_api_takes_only_clients_of_its_ca() {
    let test = "the_agent_api_takes_only_clients_of_its_ca";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
    gen_certs(&ours, &["h1", "sched"]).expect("our CA");
    gen_certs(&theirs, &["h1", "sched"]).expect("another CA");
    let files = |d: &Path, node: &str| TlsFiles {
        cert: d.join(format!("{node}.pem")),
        key: d.join(format!("{node}.key")),
        ca: ours.join("ca.pem"),
    };
    let agent_files = files(&ours, "h1");
    let api = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agent_log = dir.path().join("agent.log");
    let mut agent = ProcessGuard::spawn(
        "agent",
        Command::new(FERRY)
            .args(["agent", "--host", "h1", "--listen", &api.to_string()])
            .arg("--tls-cert")
            .arg(&agent_files.cert)
            .arg("--tls-key")
            .arg(&agent_files.key)
            .arg("--tls-ca")
            .arg(&agent_files.ca)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1"),
        &agent_log,
    )
    .expect("start the agent");
    let ours_tls = ClientTls::load(&files(&ours, "sched")).expect("our client");
    let status = |name: &str, tls: Option<&ClientTls>| {
        JsonClient::for_agent(name, api, tls, Some(Duration::from_secs(10)))
            .get::<Value>("/v1/status")
            .map_err(|e| ferry_scheduler::daemon::agent::error_chain(&e))
    };
    let s = wait_for("the agent to answer", Duration::from_secs(60), || {
        assert!(agent.is_running(), "the agent exited: see {agent_log:?}");
        status("h1", Some(&ours_tls)).ok()
    })
    .expect("the agent answers our CA's client");
    assert_eq!(s["host"], "h1", "{s}");

    // Plain HTTP to the HTTPS API.
    let e = status("h1", None).expect_err("plain HTTP answered");
    eprintln!("plain HTTP: {e}");
    assert!(e.contains("unreachable") && !e.contains('\n'), "{e}");
    // The agent is not the host the client expects: refused by name.
    let e = status("h2", Some(&ours_tls)).expect_err("h1's agent taken for h2");
    eprintln!("expecting h2: {e}");
    assert!(
        e.contains("not valid for name \"h2\"") && !e.contains('\n'),
        "{e}"
    );
    // A client certificate from another CA (the client trusts ours).
    let foreign = ClientTls::load(&files(&theirs, "sched")).expect("their client");
    let e = status("h1", Some(&foreign)).expect_err("another CA's client answered");
    eprintln!("another CA's client certificate: {e}");
    assert!(e.contains("unreachable") && !e.contains('\n'), "{e}");
    // No client certificate at all (curl, trusting the agent).
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&agent_files.ca)
        .args([
            "--resolve",
            &format!("h1:{}:127.0.0.1", api.port()),
            &format!("https://h1:{}/v1/status", api.port()),
        ])
        .output()
        .expect("run curl");
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "a client without a certificate was answered: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!(
        "curl without a certificate: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    // The agent says why, one line per refusal, and serves on.
    let log = wait_for(
        "the agent to log the refusals",
        Duration::from_secs(10),
        || {
            let log = std::fs::read_to_string(&agent_log).ok()?;
            // Another CA's certificate: both CAs are named "ferry CA",
            // so its signature is what fails.
            (log.contains("invalid peer certificate") && log.contains("peer sent no certificates"))
                .then_some(log)
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}: {}",
            std::fs::read_to_string(&agent_log).unwrap_or_default()
        )
    });
    assert!(log.contains("InvalidContentType"), "plain HTTP: {log}");
    assert!(
        status("h1", Some(&ours_tls)).is_ok(),
        "the agent stopped serving"
    );

    // Daemons: ours reaches the agent, one with another CA's certificate
    // is refused and says so in the host's health.
    let daemon = |name: &str, certs: &Path| {
        let f = files(certs, "sched");
        SchedDaemon::start(
            dir.path(),
            name,
            &format!(
                "policy = \"manual\"\ntls = {{ cert = {:?}, key = {:?}, ca = {:?} }}\n",
                f.cert, f.key, f.ca
            ),
            &format!(
                "[[host]]\nname = \"h1\"\ncores = 2\ncore_mips = 1000\nmem_mb = 1024\nagent = \"{api}\"\n"
            ),
        )
        .expect("daemon starts")
    };
    let health = |listen: SocketAddr| {
        wait_for("the daemon to ask h1", Duration::from_secs(30), || {
            let _ = http(listen, "POST", "/v1/round", Some(&json!({})));
            let hosts = http(listen, "GET", "/v1/hosts", None).ok()?;
            let h = hosts.as_array()?.first()?["health"].clone();
            (!h["reachable"].is_null()).then_some(h)
        })
        .expect("a health reading")
    };
    let (ours_daemon, their_daemon) = (daemon("ours", &ours), daemon("theirs", &theirs));
    let h = health(ours_daemon.api);
    assert_eq!(h["reachable"], true, "{h}");
    let h = health(their_daemon.api);
    assert_eq!(h["reachable"], false, "{h}");
    let e = h["error"].as_str().unwrap_or_default();
    assert!(e.contains("agent of host h1") && !e.contains('\n'), "{h}");
    eprintln!("daemon with another CA's certificate: {e}");
}
