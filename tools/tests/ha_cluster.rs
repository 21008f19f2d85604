//! The cluster on etcd with real pieces: a real etcd member, `ferry agent
//! --etcd` processes running small real KVM guests, `ferry sched daemon
//! --etcd` processes electing a leader.
//!
//! - kill -9 an agent: its VMs run again on the other hosts, each on
//!   exactly one (every guest asked of every agent), by priority (the
//!   high and medium ones get the room there is, the low one is refused
//!   with the reason), each record moved by one restart; the agent started
//!   again with its old VM list boots only what it still owns.
//! - kill -9 the leading daemon during a maintenance evacuation: the
//!   follower leads and the evacuation completes exactly once (the VM on
//!   one host, its record moved once); a rule set through the API before
//!   holds on the new leader.
//!
//! - kill -9 the destination agent of a scheduler-driven migration right
//!   after GO (a fault proxy in front of its fixed migration port holds
//!   GO): the VM resumes from the source's paused copy (its heartbeat goes
//!   on from where it was), never on two hosts, its record back on the
//!   source by one restart.
//! - a destination that never answers GO (the proxy holds it; the
//!   destination lives, no daemon runs any more): the source asks it, it
//!   refuses that handover for good and gives the record back, and the VM
//!   resumes from the source's paused copy, never on two hosts.
//! - a GO that reaches a destination after it fenced itself (cut off from
//!   etcd, its lease not yet expired; the proxy holds GO until then and
//!   keeps the source from asking about it): refused for good, the VM
//!   never runs there; it resumes from the source's paused copy once the
//!   leader's restart brings the record back, never on two hosts.
//!
//! - cut an agent off from etcd (a TCP proxy the test closes) but not from
//!   its VM or the daemon: it pauses its VM, which then runs again on the
//!   other host, never on two; when the link comes back the agent stops
//!   its fenced copy (the record names the other host) and resumes
//!   nothing.
//!
//! - the ownership swap, made once a migration's live rounds are done and
//!   before its pause: refused (a claim of a leader that no longer leads),
//!   the migration is abandoned with no GO and the VM runs on at its
//!   source, its record unchanged; under the leader's claim the record
//!   moves and the VM follows live.
//!
//! - a health provider (the command hook) saying `degraded`: the host's VM
//!   leaves live (heartbeat going on, never on two hosts, its record moved
//!   by one migration) and comes back live once the hook says `ok`.
//!
//! - a three-member etcd with the member first in everyone's endpoints
//!   killed: no agent fences itself, the daemon keeps leading, and a
//!   killed agent's VM still restarts on the other host, once.
//!
//! - a dead host with a fence command (cut off from etcd, its agent
//!   alive): the fence is retried while it fails and the VM waits; once
//!   it works (it kills the host's agent: the power-off) the VM restarts
//!   elsewhere, after the fence.
//!
//! - admission control on a start: a VM shut down by an evacuation does not
//!   start again on its host when that would break the failover reserve;
//!   the API says why.
//!
//! Short leases (2 s) and 64 MB guests keep each test within seconds.

#![cfg(feature = "etcd")]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::fault_proxy::{Action, Direction, Fault, FaultProxy, Place};
use common::sched::wait_for;
use ferry_e2e::etcd::{etcd_or_skip, free_port, EtcdCluster};
use ferry_e2e::process::ProcessGuard;
use ferry_e2e::tcp_proxy::TcpProxy;
use ferry_scheduler::daemon::api::LeaderView;
use ferry_scheduler::daemon::client::{JsonClient, Method};
use ferry_scheduler::daemon::protocol::{
    AgentStatus, MigrateReply, MigrateRequest, OwnershipClaim,
};
use ferry_scheduler::ha::failover::{HaEvent, HaEventKind};
use ferry_scheduler::plan::rules::{Rule, RuleKind};
use ferry_scheduler::store::etcd::EtcdOptions;
use ferry_scheduler::store::{
    ClusterStore, Decision, DecisionKind, OwnerRecord, Transition, DEFAULT_PREFIX,
};
use ferry_transport::FrameKind;
use ferry_vm::testing::kvm_or_skip;
use ferry_vm::GuestStatus;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
/// Host lease TTL of every agent (and the daemons' view of it).
const LEASE_TTL: &str = "2s";

/// The lease TTL of this run: 2 s, or `FERRY_HA_BENCH_TTL` for the
/// benchmark.
fn lease_ttl() -> String {
    std::env::var("FERRY_HA_BENCH_TTL").unwrap_or_else(|_| LEASE_TTL.to_owned())
}

fn client(addr: SocketAddr) -> JsonClient {
    JsonClient::new(&addr.to_string(), Some(Duration::from_secs(5)))
}

struct Agent {
    host: String,
    /// Where it listens (the test asks it here).
    addr: SocketAddr,
    /// Where the daemons and the other agents reach it: `addr`, or a proxy
    /// in front ([`Rig::route_api`]).
    api: SocketAddr,
    proc: ProcessGuard,
}

struct Daemon {
    name: String,
    proc: ProcessGuard,
    log: PathBuf,
}

/// etcd, agents and daemons of one test; everything is killed on drop.
struct Rig {
    etcd: EtcdCluster,
    dir: tempfile::TempDir,
    agents: Vec<Agent>,
    daemons: Vec<Daemon>,
    /// VMs configured to shut down (not migrate) when their host is
    /// evacuated.
    shutdown_on_evacuate: Vec<&'static str>,
    /// A host whose health is a command hook printing this file (and the
    /// file); the daemons evacuate it while it says `degraded`.
    health: Option<(&'static str, PathBuf)>,
    /// Memory of every configured VM (MB; 64 unless the bench says).
    vm_mem_mb: u64,
    /// Cores of every configured host (1000 MIPS each; every VM wants
    /// 100): 2 unless the bench needs room for more VMs.
    host_cores: u32,
    /// A host fenced from outside by this shell script (run with the
    /// host's name; exit 0 confirms the power-off).
    fence: Option<(&'static str, PathBuf)>,
}

impl Rig {
    /// A rig on an etcd cluster of `members` members.
    fn new(test: &str, tag: &str, members: usize) -> Result<Option<Self>> {
        if !kvm_or_skip(test) {
            return Ok(None);
        }
        let Some(bin) = etcd_or_skip(test) else {
            return Ok(None);
        };
        // Its ports are picked free then bound by etcd: another process may
        // take one in between; try again with new ones.
        let mut tries = 0;
        let etcd = loop {
            match EtcdCluster::start(&bin, tag, members) {
                Ok(e) => break e,
                Err(e) if tries < 2 => {
                    eprintln!("etcd did not start ({e:#}); again on other ports");
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        };
        Ok(Some(Self {
            etcd,
            dir: tempfile::Builder::new().prefix("ferry-ha-").tempdir()?,
            agents: Vec::new(),
            daemons: Vec::new(),
            shutdown_on_evacuate: Vec::new(),
            health: None,
            fence: None,
            vm_mem_mb: 64,
            host_cores: 2,
        }))
    }

    fn endpoints(&self) -> String {
        self.etcd.endpoints().join(",")
    }

    /// Starts `host`'s agent running `vms` (`NAME:MEM_MB`).
    fn agent(&mut self, host: &str, vms: &[&str]) -> Result<()> {
        self.agent_with(host, vms, &self.endpoints(), &[])
    }

    /// [`Rig::agent`] reaching etcd at `etcd`, with `extra` flags.
    fn agent_with(&mut self, host: &str, vms: &[&str], etcd: &str, extra: &[&str]) -> Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut cmd = Command::new(FERRY);
        cmd.args(["agent", "--host", host, "--listen", &addr.to_string()])
            .args(["--insecure", "--guest-rate", "500", "--lanes", "1"])
            .args(["--etcd", etcd, "--lease-ttl", &lease_ttl()])
            .args(if extra.contains(&"--fence") {
                &[][..]
            } else {
                &["--fence", "kill"][..]
            })
            .args(extra)
            .env("RUST_LOG", "info");
        for v in vms {
            cmd.args(["--vm", v]);
        }
        let log = self.dir.path().join(format!("agent-{host}.log"));
        let proc = ProcessGuard::spawn(&format!("agent-{host}"), &mut cmd, &log)?;
        self.agents.push(Agent {
            host: host.to_owned(),
            addr,
            api: addr,
            proc,
        });
        let names: Vec<&str> = vms
            .iter()
            .map(|v| v.split(':').next().unwrap_or(v))
            .collect();
        // The agent boots its VMs one after the other, each slower as more
        // guests share the cores: the wait grows with their number.
        wait_for(
            &format!("agent {host} to run {names:?}"),
            per_vm_wait(120, 10, names.len()),
            || {
                let s = client(addr).get::<AgentStatus>("/v1/status").ok()?;
                names
                    .iter()
                    .all(|n| s.vms.iter().any(|v| &v.name == n && v.running))
                    .then_some(())
            },
        )
    }

    /// Writes a cluster.toml for a daemon listening on `api`.
    fn config(
        &self,
        api: SocketAddr,
        hosts: &[(&str, u64)],
        vms: &[(&str, &str, &str)],
    ) -> Result<PathBuf> {
        let mut t =
            format!("[daemon]\nlisten = \"{api}\"\npolicy = \"manual\"\ninterval_s = 1\n\n");
        if self.health.is_some() {
            t.push_str("[health]\naction = \"evacuate\"\nrelease_after_s = 0\n\n");
        }
        for (h, mem) in hosts {
            let a = self
                .agents
                .iter()
                .find(|a| a.host == *h)
                .context("agent started before the config")?;
            t.push_str(&format!(
                "[[host]]\nname = \"{h}\"\ncores = {}\ncore_mips = 1000\nmem_mb = {mem}\nagent = \"{}\"\n",
                self.host_cores, a.api
            ));
            if let Some((_, file)) = self.health.as_ref().filter(|(host, _)| host == h) {
                t.push_str(&format!(
                    "health = [ {{ provider = \"command\", command = [\"cat\", {:?}] }} ]\n",
                    file.display().to_string()
                ));
            }
            if let Some((_, script)) = self.fence.as_ref().filter(|(host, _)| host == h) {
                t.push_str(&format!(
                    "fence = {{ driver = \"command\", command = [\"sh\", {:?}], timeout_s = 30 }}\n",
                    script.display().to_string()
                ));
            }
            t.push('\n');
        }
        for (vm, host, restart) in vms {
            t.push_str(&format!(
                "[[vm]]\nname = \"{vm}\"\nhost = \"{host}\"\ncpu_mips = 100\nmem_mb = {}\nrestart = \"{restart}\"\n\n",
                self.vm_mem_mb
            ));
            if self.shutdown_on_evacuate.contains(vm) {
                t.push_str("on_evacuate = \"shutdown\"\n\n");
            }
        }
        let path = self.dir.path().join(format!("cluster-{}.toml", api.port()));
        std::fs::write(&path, t)?;
        Ok(path)
    }

    fn daemon(
        &mut self,
        name: &str,
        hosts: &[(&str, u64)],
        vms: &[(&str, &str, &str)],
    ) -> Result<SocketAddr> {
        let api = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let config = self.config(api, hosts, vms)?;
        let log = self.dir.path().join(format!("daemon-{name}.log"));
        let proc = ProcessGuard::spawn(
            &format!("daemon-{name}"),
            Command::new(FERRY)
                .args(["sched", "daemon", "--config"])
                .arg(&config)
                .args(["--etcd", &self.endpoints(), "--name", name])
                .args([
                    "--leader-ttl",
                    &lease_ttl(),
                    "--host-lease-ttl",
                    &lease_ttl(),
                ])
                .env("RUST_LOG", "info"),
            &log,
        )?;
        self.daemons.push(Daemon {
            name: name.to_owned(),
            proc,
            log,
        });
        wait_for(
            &format!("daemon {name} to answer"),
            Duration::from_secs(30),
            || client(api).get::<LeaderView>("/v1/ha/leader").ok(),
        )?;
        Ok(api)
    }

    /// The daemons (configured after this) and the other agents reach
    /// `host`'s agent at `via` (a proxy in front of it).
    fn route_api(&mut self, host: &str, via: SocketAddr) {
        if let Some(a) = self.agents.iter_mut().find(|a| a.host == host) {
            a.api = via;
        }
    }

    fn agent_addr(&self, host: &str) -> SocketAddr {
        self.agents
            .iter()
            .find(|a| a.host == host)
            .map(|a| a.addr)
            .expect("known host")
    }

    /// Every host whose agent reports `vm` running, asking every agent.
    fn running_on(&self, vm: &str) -> Vec<String> {
        self.agents
            .iter()
            .filter(|a| {
                client(a.addr)
                    .get::<AgentStatus>("/v1/status")
                    .is_ok_and(|s| s.vms.iter().any(|v| v.name == vm && v.running))
            })
            .map(|a| a.host.clone())
            .collect()
    }

    fn guest(&self, host: &str, vm: &str) -> Result<GuestStatus> {
        Ok(client(self.agent_addr(host)).get(&format!("/v1/vms/{vm}"))?)
    }

    /// `vm` on `host` runs: its heartbeat rises past `from`, no verify
    /// errors. Returns the last heartbeat.
    fn check_alive(&self, host: &str, vm: &str, from: u64) -> Result<u64> {
        let s = wait_for(
            &format!("{vm}'s heartbeat to rise past {from} on {host}"),
            Duration::from_secs(30),
            || self.guest(host, vm).ok().filter(|s| s.heartbeat > from),
        )?;
        if s.verify_errors != 0 || !s.magic_ok {
            bail!("{vm} on {host} is not healthy: {s:?}");
        }
        Ok(s.heartbeat)
    }

    fn records(&self, api: SocketAddr) -> Result<Vec<OwnerRecord>> {
        Ok(client(api).get("/v1/ha/vms")?)
    }

    fn record(&self, api: SocketAddr, vm: &str) -> Option<OwnerRecord> {
        self.records(api).ok()?.into_iter().find(|r| r.vm == vm)
    }

    fn diag(&self) -> String {
        let mut out = String::new();
        for d in &self.daemons {
            let log = std::fs::read_to_string(&d.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            out.push_str(&format!(
                "\n--- daemon {} (last 60 lines)\n{}\n",
                d.name,
                lines[lines.len().saturating_sub(60)..].join("\n")
            ));
        }
        for a in &self.agents {
            let log =
                std::fs::read_to_string(self.dir.path().join(format!("agent-{}.log", a.host)))
                    .unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            out.push_str(&format!(
                "\n--- agent {} (last 20 lines)\n{}\n",
                a.host,
                lines[lines.len().saturating_sub(20)..].join("\n")
            ));
        }
        out
    }
}

/// The two-host set-up most tests start from: h1's agent running `mover`
/// (64 MB), h2's agent (unless the test started its own), daemon d1
/// leading over both (512 MB each, mover's restart priority medium),
/// mover's record there and its guest running.
struct Mover {
    /// d1's API.
    api: SocketAddr,
    /// mover's record epoch.
    epoch: u64,
    /// mover's heartbeat on h1.
    heartbeat: u64,
}

impl Rig {
    fn mover_on_h1(&mut self) -> Result<Mover> {
        self.agent("h1", &["mover:64"])?;
        if !self.agents.iter().any(|a| a.host == "h2") {
            self.agent("h2", &[])?;
        }
        let api = self.daemon(
            "d1",
            &[("h1", 512), ("h2", 512)],
            &[("mover", "h1", "medium")],
        )?;
        wait_for("d1 to lead", Duration::from_secs(20), || {
            (leader_of(api).as_deref() == Some("d1")).then_some(())
        })?;
        let rec = wait_for("mover's record", Duration::from_secs(30), || {
            self.record(api, "mover")
        })?;
        Ok(Mover {
            api,
            epoch: rec.epoch,
            heartbeat: self.check_alive("h1", "mover", 0)?,
        })
    }

    /// mover runs again on its migration source h1 alone, resumed from the
    /// paused copy with its memory: its heartbeat goes on from `before`
    /// (a boot would start it again from 0), the self-check clean.
    fn resumed_on_h1(&self, before: u64) -> Result<()> {
        let on = wait_for("mover to run again", Duration::from_secs(60), || {
            let on = self.running_on("mover");
            (!on.is_empty()).then_some(on)
        })?;
        if on != ["h1"] {
            bail!("mover runs on {on:?}, not on its migration source h1 alone");
        }
        let first = self.guest("h1", "mover")?.heartbeat;
        if first < before {
            bail!("mover's heartbeat {first} is below {before} from before the migration: booted again, not resumed");
        }
        self.check_alive("h1", "mover", first)?;
        Ok(())
    }
}

/// Runs `body` on a fresh rig on a one-member etcd (skipping loudly
/// without KVM or etcd); a failure panics with the daemons' and agents'
/// logs.
fn run(test: &str, tag: &str, body: fn(&mut Rig) -> Result<()>) {
    run_on_etcd_of(1, test, tag, body);
}

/// [`run`] on an etcd cluster of `members` members.
fn run_on_etcd_of(members: usize, test: &str, tag: &str, body: fn(&mut Rig) -> Result<()>) {
    let Some(mut rig) = Rig::new(test, tag, members).unwrap() else {
        return;
    };
    if let Err(e) = body(&mut rig) {
        panic!("{e:#}{}", rig.diag());
    }
}

/// `base` seconds plus `each` per VM, for waits on `n` VMs.
fn per_vm_wait(base: u64, each: u64, n: usize) -> Duration {
    Duration::from_secs(base + each * n as u64)
}

fn kill_agent(rig: &mut Rig, host: &str) {
    let a = rig
        .agents
        .iter_mut()
        .find(|a| a.host == host)
        .expect("known host");
    a.proc.kill();
}

#[test]
fn a_killed_agents_vms_run_again_elsewhere_once_by_priority() {
    run(
        "a_killed_agents_vms_run_again_elsewhere",
        "ha-agent",
        killed_agent,
    );
}

fn killed_agent(rig: &mut Rig) -> Result<()> {
    rig.agent("h1", &["web:64", "db:64", "batch:64"])?;
    rig.agent("h2", &["other:64"])?;
    rig.agent("h3", &[])?;
    // Room left for two 64 MB guests: one on h2 (160 - 64), one on h3.
    let hosts = [("h1", 512), ("h2", 160), ("h3", 96)];
    let vms = [
        ("web", "h1", "high"),
        ("db", "h1", "medium"),
        ("batch", "h1", "low"),
        ("other", "h2", "medium"),
    ];
    let api = rig.daemon("d1", &hosts, &vms)?;
    wait_for(
        "the records of every running VM",
        Duration::from_secs(30),
        || {
            let r = rig.records(api).ok()?;
            (r.len() == 4).then_some(())
        },
    )?;
    let before: Vec<u64> = ["web", "db"]
        .iter()
        .map(|vm| rig.check_alive("h1", vm, 0))
        .collect::<Result<_>>()?;
    let epochs: Vec<u64> = ["web", "db", "batch"]
        .iter()
        .map(|vm| rig.record(api, vm).map_or(0, |r| r.epoch))
        .collect();

    kill_agent(rig, "h1");

    for vm in ["web", "db"] {
        let host = wait_for(
            &format!("{vm} to run again"),
            Duration::from_secs(60),
            || {
                let on = rig.running_on(vm);
                (!on.is_empty()).then_some(on)
            },
        )?;
        let rec = rig.record(api, vm).context("a record")?;
        if host.len() != 1 || host[0] == "h1" || rec.host != host[0] {
            bail!("{vm} runs on {host:?}, its record names {}", rec.host);
        }
        let hb = rig.check_alive(&host[0], vm, 0)?;
        // Restarted from boot (its host died with its memory).
        let _ = (hb, &before);
    }
    // Each on exactly one host, every agent asked again, after a while.
    std::thread::sleep(Duration::from_secs(1));
    for (i, vm) in ["web", "db"].iter().enumerate() {
        let on = rig.running_on(vm);
        let rec = rig.record(api, vm).context("a record")?;
        if on.len() != 1 || on[0] != rec.host {
            bail!("{vm} runs on {on:?}, its record names {}", rec.host);
        }
        if rec.epoch != epochs[i] + 1
            || rec.last != Transition::Restart
            || rec.previous.as_deref() != Some("h1")
        {
            bail!("{vm}'s record moved other than by one restart from h1: {rec:?}");
        }
    }
    // The low-priority VM found no room: refused, with the reason.
    if !rig.running_on("batch").is_empty() {
        bail!("batch (low) runs although the high and medium VMs took the room");
    }
    let events: Vec<HaEvent> = client(api).get("/v1/ha/events")?;
    let refused = events
        .iter()
        .find(|e| e.kind == HaEventKind::RestartRefused && e.vm.as_deref() == Some("batch"))
        .with_context(|| format!("no refusal for batch in {events:?}"))?;
    if !refused.message.contains("no surviving host has room") {
        bail!("refusal without the reason: {refused:?}");
    }
    let batch = rig.record(api, "batch").context("batch's record")?;
    if batch.host != "h1" {
        bail!("batch's record moved without a restart: {batch:?}");
    }
    // The untouched VM stayed where it was.
    if rig.running_on("other") != ["h2"] {
        bail!("other moved: {:?}", rig.running_on("other"));
    }
    // The operator's view: the CLI and the metrics say the same.
    let owners = sched_cli(&["owners", "--api", &api.to_string()])?;
    let web = owners
        .lines()
        .find(|l| l.starts_with("web "))
        .with_context(|| format!("no web in:\n{owners}"))?;
    if !web.contains("restart") || !web.contains(" h1") {
        bail!("ferry sched owners shows web as {web:?}");
    }
    let leases = sched_cli(&["leases", "--api", &api.to_string()])?;
    if !leases
        .lines()
        .any(|l| l.starts_with("h1 ") && l.contains("expired"))
    {
        bail!("ferry sched leases does not show h1 expired:\n{leases}");
    }
    let events = sched_cli(&["events", "--api", &api.to_string()])?;
    if !events.contains("Restarted") || !events.contains("HostDead") {
        bail!("ferry sched events:\n{events}");
    }
    let leader = sched_cli(&["leader", "--api", &api.to_string()])?;
    if !leader.starts_with("d1 leads") {
        bail!("ferry sched leader: {leader}");
    }
    let metrics = ureq_text(api, "/metrics")?;
    for line in [
        "ferry_sched_ha_restarts_total 2",
        "ferry_sched_ha_hosts_dead_total 1",
    ] {
        if !metrics.lines().any(|l| l == line) {
            bail!("no {line:?} in the metrics:\n{metrics}");
        }
    }

    // h1 comes back with its old `--vm` list: it boots batch (still its
    // own) and not web (its record names h2), and says why.
    rig.agents.retain(|a| a.host != "h1");
    let endpoints = rig.endpoints();
    rig.agent_with(
        "h1",
        &["batch:64"],
        &endpoints,
        &["--vm", "web:64", "--vm", "db:64"],
    )?;
    let log = std::fs::read_to_string(rig.dir.path().join("agent-h1.log"))?;
    for vm in ["web", "db"] {
        if held(rig, "h1", vm)?.is_some() || rig.running_on(vm).len() != 1 {
            bail!("h1 back booted {vm}: it runs on {:?}", rig.running_on(vm));
        }
        if !log.contains(&format!("not starting VM {vm}: it is not ours")) {
            bail!("h1 back did not say why it does not start {vm}");
        }
    }
    Ok(())
}

/// `ferry sched ARGS...`'s standard output (it must succeed).
fn sched_cli(args: &[&str]) -> Result<String> {
    let out = Command::new(FERRY).arg("sched").args(args).output()?;
    if !out.status.success() {
        bail!(
            "ferry sched {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A plain-text GET (the metrics).
fn ureq_text(addr: SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

#[test]
fn a_killed_leader_is_followed_and_its_evacuation_completes_once() {
    run("a_killed_leader_is_followed", "ha-leader", killed_leader);
}

fn leader_of(api: SocketAddr) -> Option<String> {
    client(api)
        .get::<LeaderView>("/v1/ha/leader")
        .ok()?
        .leader
        .map(|l| l.candidate)
}

fn killed_leader(rig: &mut Rig) -> Result<()> {
    rig.agent("h1", &["mover:64"])?;
    rig.agent("h2", &[])?;
    let hosts = [("h1", 512), ("h2", 512)];
    let vms = [("mover", "h1", "medium")];
    let a = rig.daemon("d1", &hosts, &vms)?;
    wait_for("d1 to lead", Duration::from_secs(20), || {
        (leader_of(a).as_deref() == Some("d1")).then_some(())
    })?;
    let b = rig.daemon("d2", &hosts, &vms)?;
    wait_for("mover's record", Duration::from_secs(30), || {
        rig.record(a, "mover")
    })?;
    // A follower forwards: the same answer asked of either daemon.
    let via_b: Vec<serde_json::Value> = client(b).get("/v1/hosts")?;
    if via_b.len() != 2 {
        bail!("d2 (follower) forwarded a wrong answer: {via_b:?}");
    }
    let hb = rig.check_alive("h1", "mover", 0)?;
    let epoch = rig.record(a, "mover").context("record")?.epoch;
    // A rule set through the API (through the follower, which forwards
    // it): kept in the store, so the next leader places by it too.
    let rule = Rule {
        name: "mover-off-h1".into(),
        kind: RuleKind::ShouldNotRunOn,
        vms: vec!["mover".into()],
        hosts: vec!["h1".into()],
    };
    client(b).post::<_, Vec<Rule>>("/v1/rules", &rule)?;

    // The evacuation, asked of the leader, from another thread.
    let evacuate = std::thread::spawn(move || {
        JsonClient::new(&a.to_string(), Some(Duration::from_secs(60)))
            .call::<(), serde_json::Value>(Method::Post, "/v1/hosts/h1/maintenance", None)
    });
    // Kill the leader once the migration is a decision in flight (or,
    // if it was quicker than the poll, done).
    wait_for("the migration decision", Duration::from_secs(30), || {
        let d: Vec<Decision> = client(b).get("/v1/ha/decisions").ok()?;
        let moved = rig.record(b, "mover").is_some_and(|r| r.epoch > epoch);
        (moved
            || d.iter()
                .any(|d| matches!(d.kind, DecisionKind::Migrate { .. })))
        .then_some(())
    })?;
    rig.daemons[0].proc.kill();
    let _ = evacuate.join();

    wait_for("d2 to lead", Duration::from_secs(20), || {
        (leader_of(b).as_deref() == Some("d2")).then_some(())
    })?;
    let on = wait_for("mover to run on h2 only", Duration::from_secs(60), || {
        let on = rig.running_on("mover");
        (on == ["h2"]).then_some(on)
    })?;
    let rec = rig.record(b, "mover").context("record")?;
    if rec.host != on[0] || rec.epoch != epoch + 1 || rec.last != Transition::Migrate {
        bail!("the evacuation did not move the record exactly once: {rec:?} (was epoch {epoch})");
    }
    // Moved live: the heartbeat went on from where it was.
    rig.check_alive("h2", "mover", hb)?;
    let hosts: Vec<serde_json::Value> = client(b).get("/v1/ha/hosts")?;
    if !hosts
        .iter()
        .any(|h| h["host"] == "h1" && h["maintenance"] == true)
    {
        bail!("h1 not in maintenance after the takeover: {hosts:?}");
    }
    // Nothing left in flight, and it stays done.
    std::thread::sleep(Duration::from_secs(2));
    let left: Vec<Decision> = client(b).get("/v1/ha/decisions")?;
    if !left.is_empty() || rig.running_on("mover") != ["h2"] {
        bail!(
            "after the takeover: decisions {left:?}, mover on {:?}",
            rig.running_on("mover")
        );
    }
    let rec2 = rig.record(b, "mover").context("record")?;
    if rec2.epoch != rec.epoch {
        bail!("mover moved again: {rec2:?}");
    }
    let rules: Vec<Rule> = client(b).get("/v1/rules")?;
    if rules != [rule] {
        bail!("the new leader lost the rule set through the API: {rules:?}");
    }
    Ok(())
}

#[test]
fn a_destination_killed_after_go_leaves_the_vm_on_its_source_copy_once() {
    run(
        "a_destination_killed_after_go",
        "ha-dest",
        destination_killed_after_go,
    );
}

/// A migration of `mover` from h1 to h2 (h2 taking it on a fixed port,
/// advertised through a fault proxy that does `at_go` to the first GO
/// toward it), driven by a maintenance of h1 on daemon d1, held at GO: the
/// record already moved to h2 (checked), h1 keeps a paused copy.
struct HeldAtGo {
    /// d1's API.
    api: SocketAddr,
    proxy: FaultProxy,
    /// mover's record epoch before the migration.
    epoch: u64,
    /// mover's heartbeat on h1 before the migration.
    before: u64,
    /// h2's links, when asked for.
    links: Option<H2Links>,
}

/// Links of h2 (a migration's destination) that a test cuts: to etcd, and
/// the one the daemon and h1 reach h2's agent API through, cut by the
/// proxy itself the moment GO reaches it (from then on only the test, at
/// the agent's own address, asks h2 anything).
struct H2Links {
    etcd: TcpProxy,
}

fn migration_held_at_go(rig: &mut Rig, at_go: Action, linked: bool) -> Result<HeldAtGo> {
    let port = free_port()?;
    let proxy = FaultProxy::spawn(
        SocketAddr::from(([127, 0, 0, 1], port)),
        Fault {
            connection: 0,
            direction: Direction::ToDestination,
            place: Place::Frame(FrameKind::Go),
            action: at_go,
        },
    )?;
    let (listen, advertise) = (format!("127.0.0.1:{port}"), proxy.addr.to_string());
    let h2_flags = [
        "--migration-listen",
        &listen,
        "--migration-advertise",
        &advertise,
    ];
    let links = if linked {
        let etcd = TcpProxy::start(rig.etcd.members[0].client)?;
        rig.agent_with("h2", &[], &etcd.url(), &h2_flags)?;
        let api_link = TcpProxy::start(rig.agent_addr("h2"))?;
        rig.route_api("h2", api_link.addr());
        proxy.on_strike(move || api_link.cut());
        Some(H2Links { etcd })
    } else {
        let endpoints = rig.endpoints();
        rig.agent_with("h2", &[], &endpoints, &h2_flags)?;
        None
    };
    let Mover {
        api,
        epoch,
        heartbeat: before,
    } = rig.mover_on_h1()?;

    // Maintenance on h1 moves mover to h2, the only other host.
    std::thread::spawn(move || {
        JsonClient::new(&api.to_string(), Some(Duration::from_secs(60)))
            .call::<(), serde_json::Value>(Method::Post, "/v1/hosts/h1/maintenance", None)
    });
    wait_for("GO to reach the proxy", Duration::from_secs(60), || {
        proxy.struck_at()
    })?;
    // The record moved before GO: h2 owns mover, h1 keeps a paused copy.
    let moved = rig.record(api, "mover").context("record")?;
    if moved.host != "h2" || moved.epoch != epoch + 1 || moved.last != Transition::Migrate {
        bail!("the record did not move to h2 before GO: {moved:?} (was epoch {epoch})");
    }
    Ok(HeldAtGo {
        api,
        proxy,
        epoch,
        before,
        links,
    })
}

fn destination_killed_after_go(rig: &mut Rig) -> Result<()> {
    let HeldAtGo {
        api,
        proxy: _proxy,
        epoch,
        before,
        ..
    } = migration_held_at_go(rig, Action::Stall(Duration::from_secs(120)), false)?;
    kill_agent(rig, "h2");

    // From the kill on: never on two hosts; back on h1 after the failover.
    restarted_from_paused_copy(rig, api, epoch, before)
}

/// mover, whose record moved to h2 before a GO that never took there,
/// runs again on h1 alone, resumed from its paused copy (memory intact:
/// the heartbeat goes on from `before`) by the leader `api`'s restart once
/// h2's lease died (`epoch` the record's before the migration), and stays
/// so.
fn restarted_from_paused_copy(rig: &Rig, api: SocketAddr, epoch: u64, before: u64) -> Result<()> {
    rig.resumed_on_h1(before)?;
    let rec = rig.record(api, "mover").context("record")?;
    if rec.host != "h1"
        || rec.epoch != epoch + 2
        || rec.last != Transition::Restart
        || rec.previous.as_deref() != Some("h2")
    {
        bail!("mover's record did not come back to h1 by one restart: {rec:?}");
    }
    let events: Vec<HaEvent> = client(api).get("/v1/ha/events")?;
    if !events.iter().any(|e| {
        e.kind == HaEventKind::Restarted
            && e.vm.as_deref() == Some("mover")
            && e.message.contains("paused copy")
    }) {
        bail!("no restart from the paused copy in {events:?}");
    }
    // It stays so.
    std::thread::sleep(Duration::from_secs(2));
    if rig.running_on("mover") != ["h1"] {
        bail!("mover afterwards on {:?}", rig.running_on("mover"));
    }
    Ok(())
}

#[test]
fn a_destination_that_never_answers_go_gives_the_vm_back_to_its_source_copy() {
    run(
        "a_destination_that_never_answers_go",
        "ha-silent",
        destination_silent_after_go,
    );
}

fn destination_silent_after_go(rig: &mut Rig) -> Result<()> {
    let HeldAtGo {
        proxy,
        epoch,
        before,
        ..
    } = migration_held_at_go(rig, Action::Stall(Duration::from_secs(120)), false)?;
    // No scheduler from here on (none retries the evacuation or restarts
    // anything): the two agents settle it between them from the record.
    rig.daemons[0].proc.kill();
    let store = ClusterStore::on_etcd(
        &rig.etcd.endpoints(),
        EtcdOptions::default(),
        DEFAULT_PREFIX,
    )?;

    // h2 is alive and still waits for the GO the proxy holds; h1 asks it,
    // it refuses that handover for good and gives the record back.
    rig.resumed_on_h1(before)?;
    let rec = store.record("mover")?.context("mover has no record")?;
    if rec.host != "h1"
        || rec.epoch != epoch + 2
        || rec.last != Transition::HandedBack
        || rec.previous.as_deref() != Some("h2")
    {
        bail!("mover's record was not handed back to h1 by h2: {rec:?} (was epoch {epoch})");
    }
    if !store.host_alive("h2")? {
        bail!("h2's lease lapsed: the hand-back was to come from a live destination");
    }
    // The held GO never resumes mover at h2, not when its connection ends
    // either.
    drop(proxy);
    std::thread::sleep(Duration::from_secs(2));
    if let Some(running) = held(rig, "h2", "mover")? {
        bail!("h2 holds mover (running: {running}) after giving it back");
    }
    if rig.running_on("mover") != ["h1"] {
        bail!("mover afterwards on {:?}", rig.running_on("mover"));
    }
    Ok(())
}

#[test]
fn a_late_go_to_a_destination_that_fenced_itself_is_refused() {
    run(
        "a_late_go_to_a_destination_that_fenced_itself",
        "ha-late-go",
        late_go_after_fence,
    );
}

/// The migration's record moved to h2 and GO is held on its way there
/// (the proxy also closes the links through which h1 could ask h2 what
/// became of it: nothing decides the handover before GO comes). h2 loses
/// etcd and fences itself while its lease still names it alive, and h1
/// has given up waiting (the handover in doubt, its copy paused); then GO
/// arrives, late: h2 refuses it for good because it fenced itself, and
/// never runs mover. mover runs on h1 alone, from its paused copy, once
/// the leader brought the record back there after h2's lease died.
fn late_go_after_fence(rig: &mut Rig) -> Result<()> {
    let HeldAtGo {
        api,
        proxy,
        epoch,
        before,
        links,
    } = migration_held_at_go(rig, Action::Hold, true)?;
    let links = links.context("h2's links")?;
    links.etcd.cut();
    wait_for("h2 to fence itself", Duration::from_secs(60), || {
        let m = ureq_text(rig.agent_addr("h2"), "/metrics").ok()?;
        m.lines()
            .any(|l| l == "ferry_agent_fences_total 1")
            .then_some(())
    })?;
    if held(rig, "h2", "mover")?.is_some() {
        bail!("h2 holds mover before GO came");
    }
    let logged = |host: &str, what: &[&str]| {
        let log = std::fs::read_to_string(rig.dir.path().join(format!("agent-{host}.log")));
        log.is_ok_and(|log| log.lines().any(|l| what.iter().all(|w| l.contains(w))))
            .then_some(())
    };
    wait_for(
        "h1 to give up waiting for GO's answer",
        Duration::from_secs(60),
        || logged("h1", &["handover in doubt after GO"]),
    )?;

    proxy.release();
    wait_for("h2 to refuse the late GO", Duration::from_secs(60), || {
        logged(
            "h2",
            &[
                "GO arrived after this destination had refused the handover",
                "the destination fenced itself",
            ],
        )
    })?;
    if let Some(running) = held(rig, "h2", "mover")? {
        bail!("h2 holds mover (running: {running}) after refusing its GO");
    }
    restarted_from_paused_copy(rig, api, epoch, before)?;
    if held(rig, "h2", "mover")?.is_some() {
        bail!("h2 holds mover after the restart on h1");
    }
    Ok(())
}

#[test]
fn the_ownership_swap_is_made_before_the_pause_and_gos_only_after_it() {
    run(
        "the_ownership_swap_is_made_before_the_pause",
        "ha-swap",
        swap_before_the_pause,
    );
}

/// `vm`'s migration from `from` to `to` by `from`'s agent, with `claim`.
fn migrate_by_agent(
    rig: &Rig,
    vm: &str,
    from: &str,
    to: &str,
    claim: Option<OwnershipClaim>,
) -> Result<MigrateReply> {
    JsonClient::new(
        &rig.agent_addr(from).to_string(),
        Some(Duration::from_secs(120)),
    )
    .post::<_, MigrateReply>(
        "/v1/migrate",
        &MigrateRequest {
            vm: vm.to_owned(),
            target_host: to.to_owned(),
            target: rig.agent_addr(to).to_string(),
            ownership: claim,
        },
    )
    .with_context(|| format!("migrating {vm} {from} -> {to}"))
}

/// A migration whose ownership swap (made once the live rounds are done,
/// before the pause) is refused, here under a claim of a leader that no
/// longer leads: abandoned with no GO, the guest running on at the source
/// (never paused for good, never on two hosts), the record unchanged.
/// Under the leader's claim the record moves and the guest follows, live.
/// The engine's own tests pin that the hook runs with the guest running.
fn swap_before_the_pause(rig: &mut Rig) -> Result<()> {
    let Mover {
        api,
        epoch,
        heartbeat,
    } = rig.mover_on_h1()?;
    let leader = client(api)
        .get::<LeaderView>("/v1/ha/leader")?
        .leader
        .context("nobody leads")?;
    let claim = |token| OwnershipClaim {
        candidate: leader.candidate.clone(),
        token,
        epoch,
    };
    let err = match migrate_by_agent(rig, "mover", "h1", "h2", Some(claim(leader.token + 1))) {
        Ok(r) => bail!("a migration under a deposed leader's claim completed: {r:?}"),
        Err(e) => format!("{e:#}"),
    };
    if !err.contains("ownership swap to h2 failed") || !err.contains("no longer leads") {
        bail!("the refusal does not say the swap failed for want of leadership: {err}");
    }
    if rig.running_on("mover") != ["h1"] || held(rig, "h2", "mover")?.is_some() {
        bail!(
            "after the refused swap mover is on {:?}",
            rig.running_on("mover")
        );
    }
    let hb = rig.check_alive("h1", "mover", heartbeat)?;
    let rec = rig.record(api, "mover").context("record")?;
    if rec.host != "h1" || rec.epoch != epoch {
        bail!("a refused swap changed the record: {rec:?} (was h1 epoch {epoch})");
    }

    let moved = migrate_by_agent(rig, "mover", "h1", "h2", Some(claim(leader.token)))?;
    let swap = moved.ownership.context("no ownership swap reported")?;
    moved_live(rig, "mover", "h2", hb)?;
    let rec = rig.record(api, "mover").context("record")?;
    if rec.host != "h2"
        || rec.epoch != epoch + 1
        || swap.epoch != rec.epoch
        || rec.last != Transition::Migrate
    {
        bail!("mover's record did not follow it to h2 by one swap: {rec:?}, swap {swap:?}");
    }
    Ok(())
}

#[test]
fn a_degraded_host_is_evacuated_live_and_its_vm_comes_back_when_it_recovers() {
    run(
        "a_degraded_host_is_evacuated_live",
        "ha-health",
        degraded_host,
    );
}

/// Waits until `vm` runs on `host` alone, failing the moment it runs on
/// two hosts; `watch` is called on every poll.
fn runs_alone_on(rig: &Rig, vm: &str, host: &str, mut watch: impl FnMut()) -> Result<()> {
    let on = wait_for(
        &format!("{vm} to run on {host}"),
        Duration::from_secs(60),
        || {
            watch();
            let on = rig.running_on(vm);
            (on.len() > 1 || on == [host]).then_some(on)
        },
    )?;
    if on != [host] {
        bail!("{vm} runs on {on:?} at once");
    }
    Ok(())
}

/// Waits until `vm` runs on `host` alone, failing the moment it runs on two
/// hosts; then checks it was carried over live: its heartbeat at least
/// `from` (a boot starts again from 0) and rising. Returns the heartbeat.
fn moved_live(rig: &Rig, vm: &str, host: &str, from: u64) -> Result<u64> {
    runs_alone_on(rig, vm, host, || {})?;
    let hb = rig.guest(host, vm)?.heartbeat;
    if hb < from {
        bail!("{vm}'s heartbeat {hb} on {host} is below {from} from before: booted again, not migrated");
    }
    rig.check_alive(host, vm, hb)
}

fn degraded_host(rig: &mut Rig) -> Result<()> {
    let sensor = rig.dir.path().join("h1-health");
    std::fs::write(&sensor, "ok\n")?;
    rig.health = Some(("h1", sensor.clone()));
    let Mover {
        api,
        epoch,
        heartbeat: before,
    } = rig.mover_on_h1()?;

    // The hook says degraded: h1 is evacuated, mover leaves live.
    std::fs::write(&sensor, "degraded FAN2 1200 RPM below 1500\n")?;
    let away = moved_live(rig, "mover", "h2", before)?;
    let rec = rig.record(api, "mover").context("record")?;
    if rec.host != "h2" || rec.epoch != epoch + 1 || rec.last != Transition::Migrate {
        bail!(
            "mover's record did not follow it to h2 by one migration: {rec:?} (was epoch {epoch})"
        );
    }
    let events: Vec<HaEvent> = client(api).get("/v1/ha/events")?;
    if !events.iter().any(|e| {
        e.kind == HaEventKind::HostDegraded
            && e.host.as_deref() == Some("h1")
            && e.message.contains("FAN2 1200 RPM")
    }) {
        bail!("no HostDegraded event for h1 with the hook's evidence in {events:?}");
    }
    // It stays away while h1 is degraded (rounds every second).
    std::thread::sleep(Duration::from_secs(3));
    if rig.running_on("mover") != ["h2"] {
        bail!(
            "mover on {:?} while h1 is degraded",
            rig.running_on("mover")
        );
    }

    // The hook says ok: h1 is released and mover comes back, live.
    std::fs::write(&sensor, "ok\n")?;
    moved_live(rig, "mover", "h1", away)?;
    let rec = rig.record(api, "mover").context("record")?;
    if rec.host != "h1" || rec.epoch != epoch + 2 || rec.last != Transition::Migrate {
        bail!(
            "mover's record did not come back to h1 by one migration: {rec:?} (was epoch {epoch})"
        );
    }
    let events: Vec<HaEvent> = client(api).get("/v1/ha/events")?;
    if !events
        .iter()
        .any(|e| e.kind == HaEventKind::HostReleased && e.host.as_deref() == Some("h1"))
    {
        bail!("no HostReleased event for h1 in {events:?}");
    }
    Ok(())
}

#[test]
fn a_cut_off_agent_fences_itself_and_runs_nothing_it_lost_when_back() {
    run("a_cut_off_agent_fences_itself", "ha-cut", cut_off_agent);
}

/// `vm` as `host`'s agent lists it: `Some(running)`, `None` when not held.
fn held(rig: &Rig, host: &str, vm: &str) -> Result<Option<bool>> {
    let s: AgentStatus = client(rig.agent_addr(host)).get("/v1/status")?;
    Ok(s.vms.iter().find(|v| v.name == vm).map(|v| v.running))
}

/// The set-up of the tests that cut h1 off from etcd: h1's agent (fencing
/// by pause) running `web` (64 MB) and reaching etcd through `link`, h2's
/// agent, daemon d1 over both (512 MB each; `before_daemon` runs before it
/// starts), web's record there and its guest running.
struct WebBehindLink {
    link: TcpProxy,
    /// d1's API.
    api: SocketAddr,
    /// web's record.
    rec: OwnerRecord,
}

impl Rig {
    fn web_behind_link(
        &mut self,
        before_daemon: impl FnOnce(&mut Rig) -> Result<()>,
    ) -> Result<WebBehindLink> {
        let link = TcpProxy::start(self.etcd.members[0].client)?;
        self.agent_with("h1", &["web:64"], &link.url(), &["--fence", "pause"])?;
        self.agent("h2", &[])?;
        before_daemon(self)?;
        let hosts = [("h1", 512), ("h2", 512)];
        let api = self.daemon("d1", &hosts, &[("web", "h1", "medium")])?;
        let rec = wait_for("web's record", Duration::from_secs(30), || {
            self.record(api, "web")
        })?;
        self.check_alive("h1", "web", 0)?;
        Ok(WebBehindLink { link, api, rec })
    }
}

fn cut_off_agent(rig: &mut Rig) -> Result<()> {
    let WebBehindLink { link, api, rec } = rig.web_behind_link(|_| Ok(()))?;
    let epoch = rec.epoch;

    link.cut();
    // h1 still answers (only its etcd link is down): web is paused there
    // (fenced) and then runs on h2, never on both.
    let mut fenced_seen = false;
    runs_alone_on(rig, "web", "h2", || {
        fenced_seen |= held(rig, "h1", "web").ok() == Some(Some(false));
    })?;
    if !fenced_seen || held(rig, "h1", "web")? != Some(false) {
        bail!("h1 did not keep web paused (fenced) while cut off");
    }
    let rec = rig.record(api, "web").context("record")?;
    if rec.host != "h2" || rec.epoch != epoch + 1 || rec.last != Transition::Restart {
        bail!("web's record did not move to h2 by one restart: {rec:?}");
    }
    let fences = ureq_text(rig.agent_addr("h1"), "/metrics")?;
    if !fences.lines().any(|l| l == "ferry_agent_fences_total 1") {
        bail!("h1's metrics do not count one fence:\n{fences}");
    }

    link.restore();
    // Back on etcd, h1 drops the copy it no longer owns, resuming nothing.
    wait_for(
        "h1 to drop its fenced copy",
        Duration::from_secs(60),
        || {
            let on = rig.running_on("web");
            if on != ["h2"] {
                return Some(Err(on));
            }
            held(rig, "h1", "web").ok()?.is_none().then_some(Ok(()))
        },
    )?
    .map_err(|on| anyhow::anyhow!("with h1 back, web runs on {on:?}"))?;
    let log = std::fs::read_to_string(rig.dir.path().join("agent-h1.log"))?;
    if !log.contains("stopping VM web: it is not ours") {
        bail!("h1 did not say why it stopped web");
    }
    rig.check_alive("h2", "web", 0)?;
    let rec2 = rig.record(api, "web").context("record")?;
    if rec2 != rec || rig.running_on("web") != ["h2"] {
        bail!(
            "after h1 came back: {rec2:?}, web on {:?}",
            rig.running_on("web")
        );
    }
    Ok(())
}

#[test]
fn a_three_member_etcd_with_a_member_stopped_keeps_the_cluster_working() {
    run_on_etcd_of(
        3,
        "a_three_member_etcd_with_a_member_stopped",
        "ha-three",
        member_stopped,
    );
}

/// Agents and the daemon on a three-member etcd (every endpoint given);
/// a member that does not lead is killed: the agents keep their leases
/// (none fences itself), the daemon keeps leading, and the death of a host
/// is still handled (its VM restarts on the other, once).
///
/// Not the leading member: its death starts an election (500 ms here and
/// longer on loaded cores, plus the clients' switch to another endpoint),
/// and an agent whose 2 s lease cannot be renewed within its safety margin
/// meanwhile fences itself, as it must (CI saw it once). Production lease
/// TTLs should exceed etcd's election time by a wide margin.
fn member_stopped(rig: &mut Rig) -> Result<()> {
    let Mover { api, epoch, .. } = rig.mover_on_h1()?;
    let leader = wait_for("an etcd leader", Duration::from_secs(10), || {
        rig.etcd.leader()
    })?;
    let follower = (leader + 1) % rig.etcd.members.len();
    rig.etcd.members[follower].kill();
    rig.etcd.wait_healthy(Duration::from_secs(30))?;

    kill_agent(rig, "h1");
    runs_alone_on(rig, "mover", "h2", || {})?;
    rig.check_alive("h2", "mover", 0)?;
    let rec = rig.record(api, "mover").context("record")?;
    if rec.host != "h2" || rec.epoch != epoch + 1 || rec.last != Transition::Restart {
        bail!("mover's record did not move to h2 by one restart: {rec:?} (was epoch {epoch})");
    }
    let fences = ureq_text(rig.agent_addr("h2"), "/metrics")?;
    if !fences.lines().any(|l| l == "ferry_agent_fences_total 0") {
        bail!("h2 fenced itself with two etcd members of three up:\n{fences}");
    }
    if leader_of(api).as_deref() != Some("d1") {
        bail!("d1 no longer leads: {:?}", leader_of(api));
    }
    Ok(())
}

#[test]
fn a_dead_host_is_fenced_from_outside_before_its_vm_restarts() {
    run(
        "a_dead_host_is_fenced_from_outside",
        "ha-fence",
        fenced_from_outside,
    );
}

/// h1 cut off from etcd (its agent alive, its lease lapsing) has a fence
/// command: while the command fails (its BMC "unreachable") the fence is
/// retried and web is not restarted; once it works it kills h1's agent
/// process (the power-off) and exits 0, and only then web restarts on h2.
fn fenced_from_outside(rig: &mut Rig) -> Result<()> {
    let (calls, works) = (
        rig.dir.path().join("fence-calls"),
        rig.dir.path().join("fence-works"),
    );
    let h1_pid = std::cell::Cell::new(0);
    let WebBehindLink { link, api, rec } = rig.web_behind_link(|rig| {
        h1_pid.set(rig.agents[0].proc.pid());
        let script = rig.dir.path().join("fence.sh");
        std::fs::write(
            &script,
            format!(
                "echo \"$1\" >> {calls:?}\n[ -e {works:?} ] || {{ echo 'BMC 10.0.0.9 unreachable' >&2; exit 1; }}\nkill -9 {}\n",
                h1_pid.get()
            ),
        )?;
        rig.fence = Some(("h1", script));
        Ok(())
    })?;
    let h1_pid = h1_pid.get();
    let fence_calls = || {
        std::fs::read_to_string(&calls)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };

    link.cut();
    // The lease lapses; the fence fails and is retried; web stays put.
    wait_for("h1's fence to fail twice", Duration::from_secs(60), || {
        (fence_calls().len() >= 2).then_some(())
    })?;
    if rig.record(api, "web").as_ref() != Some(&rec) || held(rig, "h2", "web")?.is_some() {
        bail!(
            "web restarted before h1's power-off was confirmed: {:?}, on {:?}",
            rig.record(api, "web"),
            rig.running_on("web")
        );
    }
    let events: Vec<HaEvent> = client(api).get("/v1/ha/events")?;
    if !events.iter().any(|e| {
        e.kind == HaEventKind::FenceFailed
            && e.host.as_deref() == Some("h1")
            && e.message.contains("BMC 10.0.0.9 unreachable")
    }) {
        bail!("no FenceFailed event for h1 with the command's reason in {events:?}");
    }

    // The BMC answers: h1 is powered off (its agent killed), web restarts.
    std::fs::write(&works, "")?;
    runs_alone_on(rig, "web", "h2", || {})?;
    if rig.agents[0].proc.is_running() {
        bail!("h1's agent (pid {h1_pid}) still runs after its fence confirmed");
    }
    let rec2 = rig.record(api, "web").context("record")?;
    if rec2.host != "h2" || rec2.epoch != rec.epoch + 1 || rec2.last != Transition::Restart {
        bail!("web's record did not move to h2 by one restart: {rec2:?}");
    }
    let events: Vec<HaEvent> = client(api).get("/v1/ha/events")?;
    let fenced = events
        .iter()
        .position(|e| e.kind == HaEventKind::HostFenced && e.host.as_deref() == Some("h1"));
    let restarted = events
        .iter()
        .position(|e| e.kind == HaEventKind::Restarted && e.vm.as_deref() == Some("web"));
    match (fenced, restarted) {
        (Some(f), Some(r)) if f < r => {}
        _ => bail!("h1 was not fenced before web restarted: {events:?}"),
    }
    if let Some(other) = fence_calls().iter().find(|h| *h != "h1") {
        bail!("the fence command was run for {other}, not h1");
    }
    let metrics = ureq_text(api, "/metrics")?;
    if !metrics
        .lines()
        .any(|l| l == "ferry_sched_ha_fences_total 1")
    {
        bail!("the daemon's metrics do not count one fence");
    }
    Ok(())
}

#[test]
fn a_start_that_would_break_the_failover_reserve_is_refused() {
    run(
        "a_start_that_would_break_the_reserve",
        "ha-admit",
        start_refused,
    );
}

fn start_refused(rig: &mut Rig) -> Result<()> {
    rig.agent("h1", &["b:64"])?;
    rig.agent("h2", &["a:64"])?;
    // Room for one 64 MB guest per host: with both running, neither host's
    // guest could restart on the other (the reserve for one failure).
    rig.shutdown_on_evacuate.push("b");
    let hosts = [("h1", 100), ("h2", 100)];
    let api = rig.daemon(
        "d1",
        &hosts,
        &[("a", "h2", "medium"), ("b", "h1", "medium")],
    )?;
    wait_for(
        "d1 to lead with both records",
        Duration::from_secs(30),
        || {
            (leader_of(api).as_deref() == Some("d1") && rig.records(api).ok()?.len() == 2)
                .then_some(())
        },
    )?;
    let maintenance = |method| {
        JsonClient::new(&api.to_string(), Some(Duration::from_secs(60)))
            .call::<(), serde_json::Value>(method, "/v1/hosts/h1/maintenance", None)
    };
    maintenance(Method::Post).context("entering maintenance (b shuts down)")?;
    if !rig.running_on("b").is_empty() {
        bail!("b still runs on {:?}", rig.running_on("b"));
    }
    // Leaving it would start b on h1 again: refused, with the reason.
    let refused = match maintenance(Method::Delete) {
        Ok(v) => bail!("leaving maintenance started b against the reserve: {v}"),
        Err(e) => e.to_string(),
    };
    if !refused.contains("start b on h1") || !refused.contains("failover reserve") {
        bail!("the refusal does not say why: {refused}");
    }
    if !rig.running_on("b").is_empty() {
        bail!("b runs on {:?} although refused", rig.running_on("b"));
    }
    let events: Vec<HaEvent> = client(api).get("/v1/ha/events")?;
    if !events
        .iter()
        .any(|e| e.kind == HaEventKind::StartRefused && e.vm.as_deref() == Some("b"))
    {
        bail!("no StartRefused event for b in {events:?}");
    }
    Ok(())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The benchmark (not a test: run it by name with `--ignored`): kill -9 a
/// host running `FERRY_HA_BENCH_VMS` guests (default 1) of
/// `FERRY_HA_BENCH_MEM_MB` (default 64) with leases of
/// `FERRY_HA_BENCH_TTL` (default 2s), and print the time from the kill to
/// the lease seen expired (detection), to the end of the fence margin
/// (fencing) and to the last VM running elsewhere (restart); then kill -9
/// the leading daemon and print the time until the follower leads; then
/// bring the host back and print the ownership swap's cost to the pause
/// of migrations of up to 10 of the VMs (there and back with the swap,
/// made before the pause, then there and back without one).
#[test]
#[ignore = "benchmark: prints timings"]
fn ha_bench() {
    run("ha_bench", "ha-bench", bench);
}

fn bench(rig: &mut Rig) -> Result<()> {
    let n: usize = std::env::var("FERRY_HA_BENCH_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let names: Vec<String> = (0..n).map(|i| format!("v{i}")).collect();
    let vm_mb: u64 = std::env::var("FERRY_HA_BENCH_MEM_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    rig.vm_mem_mb = vm_mb;
    // Either host takes every VM (100 MIPS each) after the other failed.
    rig.host_cores = 2.max(n as u32 / 10 + 1);
    let specs: Vec<String> = names.iter().map(|v| format!("{v}:{vm_mb}")).collect();
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    rig.agent("h1", &specs)?;
    rig.agent("h2", &[])?;
    let mem = vm_mb * n as u64 + 512;
    let hosts = [("h1", mem), ("h2", mem)];
    let vms: Vec<(&str, &str, &str)> = names.iter().map(|v| (v.as_str(), "h1", "medium")).collect();
    let a = rig.daemon("d1", &hosts, &vms)?;
    wait_for("d1 to lead", Duration::from_secs(30), || {
        (leader_of(a).as_deref() == Some("d1")).then_some(())
    })?;
    let b = rig.daemon("d2", &hosts, &vms)?;
    wait_for("every record", per_vm_wait(60, 2, n), || {
        (rig.records(a).ok()?.len() == n).then_some(())
    })?;
    let killed = unix_ms();
    kill_agent(rig, "h1");
    wait_for("every VM on h2", per_vm_wait(300, 10, n), || {
        let s = client(rig.agent_addr("h2"))
            .get::<AgentStatus>("/v1/status")
            .ok()?;
        (s.vms.iter().filter(|v| v.running).count() == n).then_some(())
    })?;
    let running = unix_ms();
    let events: Vec<HaEvent> = client(a).get("/v1/ha/events")?;
    let dead = events
        .iter()
        .find(|e| e.kind == HaEventKind::HostDead)
        .context("no HostDead event")?
        .unix_ms;
    let margin_ms = humantime_ms(&lease_ttl()) * 2 / 5;
    println!(
        "HA bench: TTL {} VMs {n}: detection {} ms, fencing {} ms, restart {} ms, total {} ms",
        lease_ttl(),
        dead.saturating_sub(killed),
        margin_ms,
        running.saturating_sub(dead + margin_ms),
        running.saturating_sub(killed)
    );
    let killed = unix_ms();
    rig.daemons[0].proc.kill();
    wait_for("d2 to lead", Duration::from_secs(120), || {
        (leader_of(b).as_deref() == Some("d2")).then_some(())
    })?;
    println!(
        "HA bench: leader TTL {}: leader failover {} ms",
        lease_ttl(),
        unix_ms().saturating_sub(killed)
    );
    swap_cost(rig, b, &names[..n.min(10)], vm_mb)
}

/// The ownership swap's cost in a migration's pause: h1 back (a fresh
/// agent), each of `vms` migrated h2 -> h1 -> h2 with the swap before the
/// pause (the leader `api`'s claim, as its migrations carry; the record
/// follows the VM there and back), then h2 -> h1 -> h2 without one (the
/// record stays naming h2, where the VM ends): both ways alike, so the
/// direction (h2 runs the other guests) weighs on both sides. Prints the
/// median swap and the median pauses, overall and per direction.
fn swap_cost(rig: &mut Rig, api: SocketAddr, vms: &[String], vm_mb: u64) -> Result<()> {
    rig.agents.retain(|a| a.host != "h1");
    rig.agent("h1", &[])?;
    let leader = client(api)
        .get::<LeaderView>("/v1/ha/leader")?
        .leader
        .context("nobody leads")?;
    let migrate =
        |vm: &str, from: &str, to: &str, claim| migrate_by_agent(rig, vm, from, to, claim);
    // Pauses by [with the swap, without][to h1, to h2].
    let mut pauses: [[Vec<f64>; 2]; 2] = Default::default();
    let mut swap = Vec::new();
    for vm in vms {
        for (way, (from, to)) in [("h2", "h1"), ("h1", "h2")].into_iter().enumerate() {
            let rec = rig.record(api, vm).context("no record")?;
            let claim = OwnershipClaim {
                candidate: leader.candidate.clone(),
                token: leader.token,
                epoch: rec.epoch,
            };
            let moved = migrate(vm, from, to, Some(claim))?;
            swap.push(
                moved
                    .ownership
                    .context("no ownership swap reported")?
                    .swap_ms,
            );
            pauses[0][way].push(moved.downtime_ms);
        }
        for (way, (from, to)) in [("h2", "h1"), ("h1", "h2")].into_iter().enumerate() {
            pauses[1][way].push(migrate(vm, from, to, None)?.downtime_ms);
        }
    }
    let [with, without] = pauses.map(|mut ways| {
        let mut both: Vec<f64> = ways.iter().flatten().copied().collect();
        (
            median(&mut both),
            median(&mut ways[0]),
            median(&mut ways[1]),
        )
    });
    println!(
        "HA bench: ownership swap ({} migrations each way of {vm_mb} MB guests): swap median {:.2} ms (max {:.2}), pause with the swap median {:.2} ms (to h1 {:.2}, to h2 {:.2}), without {:.2} ms (to h1 {:.2}, to h2 {:.2})",
        vms.len(),
        median(&mut swap),
        swap.iter().copied().fold(0.0, f64::max),
        with.0,
        with.1,
        with.2,
        without.0,
        without.1,
        without.2
    );
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `2s`, `2500ms`, `5` (seconds) in ms.
fn humantime_ms(s: &str) -> u64 {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().unwrap_or(0);
    }
    let secs: f64 = s.trim_end_matches('s').parse().unwrap_or(0.0);
    (secs * 1000.0) as u64
}
