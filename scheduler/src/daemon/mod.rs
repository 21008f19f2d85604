//! `ferry sched daemon`: keeps the cluster model current from the agents,
//! plans with the active policy every interval, carries the plan out
//! through an [`agent::Executor`] and the hosts' power drivers, and serves
//! an HTTP API and Prometheus metrics. Every decision is logged with its
//! reason.

pub mod agent;
pub mod api;
pub mod client;
pub mod config;
pub mod https;
#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod metrics;
pub mod power;
pub mod protocol;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tracing::{info, warn};

use crate::model::{Cluster, Host, PowerState, Vm};
use crate::plan::planner::{Planner, PolicyMode};
use crate::plan::{apply, Action, Plan};
use agent::{ClusterExecutor, Executor, HttpAgents};
use config::{Config, ConfigError, ConfigProblem};
use power::PowerDriver;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration could not be read.
    #[error("bad configuration")]
    Config(#[from] ConfigError),
    /// The API address could not be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// Address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The async runtime could not start.
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    /// Serving HTTP failed.
    #[error("HTTP server failed")]
    Serve(#[source] std::io::Error),
    /// The election could not start.
    #[error("cannot join the leader election")]
    Election(#[source] crate::ha::election::ElectionError),
}

/// Shared daemon state.
#[derive(Debug)]
pub struct State {
    /// The model.
    pub cluster: Cluster,
    /// The planner (policy, timers).
    pub planner: Planner,
    /// Configuration problems (entries left out).
    pub problems: Vec<ConfigProblem>,
    /// Each host's health (by index), as the last inventory found it.
    pub health: Vec<HostHealth>,
    /// What the last inventory found wrong with the cluster as a whole
    /// (a VM running on two hosts, ...); recomputed every round.
    pub alerts: Vec<String>,
    /// What the last round did.
    pub last_round: RoundReport,
    /// Each host's hardware health (by index), from its health providers.
    pub hardware: Vec<crate::ha::health::HardwareHealth>,
}

/// Whether a host's agent (or libvirt connection) answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct HostHealth {
    /// `None` until asked (or when the host has no agent or is off).
    pub reachable: Option<bool>,
    /// Since when (seconds since the Unix epoch) `reachable` has had its value.
    pub since_unix_s: Option<u64>,
    /// Why it is not reachable (or not trusted), if so.
    pub error: Option<String>,
}

impl HostHealth {
    fn set(&mut self, reachable: Option<bool>, error: Option<String>) {
        if self.reachable != reachable {
            self.since_unix_s = reachable.map(|_| unix_now());
            if reachable.is_some() {
                info!(
                    reachable,
                    error = error.as_deref().unwrap_or(""),
                    "host health changed"
                );
            }
        }
        self.reachable = reachable;
        self.error = error;
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What happened to one planned action.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Carried out.
    Done,
    /// Tried and failed; nothing changed (a VM stays on its source).
    Failed {
        /// Why, with the executor's own words.
        error: String,
    },
    /// Not tried.
    Skipped {
        /// Why.
        why: String,
    },
}

/// One round: what was planned, what became of each action.
#[derive(Debug, Clone, Default)]
pub struct RoundReport {
    /// The plan.
    pub plan: Plan,
    /// One outcome per action of `plan`.
    pub outcomes: Vec<Outcome>,
    /// Why planning failed, if it did (then the plan is empty).
    pub plan_error: Option<String>,
}

impl RoundReport {
    /// The failed actions, described with names, with their errors.
    pub fn failures(&self, c: &Cluster) -> Vec<String> {
        self.plan
            .actions
            .iter()
            .zip(&self.outcomes)
            .filter_map(|(a, o)| match o {
                Outcome::Failed { error } => Some(format!("{}: {error}", describe(c, a))),
                _ => None,
            })
            .collect()
    }
}

/// A running daemon's handles.
#[derive(Clone)]
pub struct Daemon {
    /// Shared state.
    pub state: Arc<Mutex<State>>,
    /// Executes actions.
    pub executor: Arc<dyn Executor>,
    /// Power driver per host (by index).
    pub drivers: Arc<Vec<Option<Box<dyn PowerDriver>>>>,
    /// Fence driver per host (by index): how a dead host is powered off
    /// from outside before its VMs restart ([`crate::ha::fence`]).
    pub fences: Arc<Vec<Option<crate::ha::fence::Fence>>>,
    /// Prometheus metrics.
    pub metrics: Arc<metrics::DaemonMetrics>,
    /// Serialises planning rounds.
    round_lock: Arc<tokio::sync::Mutex<()>>,
    /// The cluster store, the election and the failover loop (`--etcd`);
    /// `None`: one daemon, nothing shared.
    pub ha: Option<Arc<crate::ha::failover::ClusterHa>>,
    /// Health providers per host (by index), and what a warning does.
    health: Arc<HealthChecks>,
}

/// The right to run planning rounds, held by one caller at a time
/// ([`Daemon::take_turn`]).
#[derive(Debug)]
pub struct RoundTurn {
    _held: tokio::sync::OwnedMutexGuard<()>,
}

/// Each host's health providers (by index) and what a warning does.
struct HealthChecks {
    providers: Vec<Vec<Box<dyn crate::ha::health::HealthProvider>>>,
    config: config::HealthSection,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").finish_non_exhaustive()
    }
}

pub(crate) fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    /// Build the model, agents and drivers from a validated config.
    pub fn from_config(cfg: &Config) -> Self {
        let mut problems = cfg.problems.clone();
        let mut cluster = Cluster::default();
        let mut agents = HttpAgents {
            timeout: Some(Duration::from_secs(600)),
            ..HttpAgents::default()
        };
        #[cfg(feature = "libvirt")]
        let mut libvirt_hosts = std::collections::HashMap::new();
        let mut drivers: Vec<Option<Box<dyn PowerDriver>>> = Vec::new();
        let mut fences = Vec::new();
        let mut providers = Vec::new();
        for h in &cfg.hosts {
            let name = h.name.get_ref().clone();
            let mut host = Host::new(&name, h.cores, h.core_mips, h.mem_mb);
            if let Some(a) = &h.agent {
                if let Ok(addr) = a.get_ref().parse::<SocketAddr>() {
                    agents.agents.insert(name.clone(), addr);
                }
            }
            #[cfg(feature = "libvirt")]
            if let Some(uri) = &h.libvirt {
                libvirt_hosts.insert(
                    name.clone(),
                    libvirt::LibvirtHost {
                        uri: uri.get_ref().clone(),
                        core_mips: h.core_mips,
                        tunnel_dir: h.tunnel_dir.clone(),
                    },
                );
            }
            let driver = h.power.as_ref().and_then(|p| match power::from_config(p) {
                Ok(d) => Some(d),
                Err(e) => {
                    problems.push(ConfigProblem {
                        path: cfg.path.display().to_string(),
                        line: 0,
                        message: format!("host {name}: {e}"),
                    });
                    None
                }
            });
            if matches!(h.power, Some(config::PowerConfig::Process { .. })) {
                // The process driver's host is off until powered on.
                host.power = PowerState::Off;
            }
            cluster.hosts.push(host);
            drivers.push(driver);
            // Validated by Config::parse: a fence that cannot work left its
            // host out already.
            fences.push(
                h.fence
                    .as_ref()
                    .and_then(|f| crate::ha::fence::Fence::from_config(f, h.power.as_ref()).ok()),
            );
            // Validated by Config::parse: a provider that fails to build
            // left its host out already.
            providers.push(h.health.iter().filter_map(|p| p.build().ok()).collect());
        }
        match cfg.daemon.tls.as_ref().map(config::AgentTlsEntry::load) {
            None if !agents.agents.is_empty() => warn!(
                "the agent API is plain HTTP: anyone who reaches an agent can drive it; give [daemon] tls (and the agents --tls-cert/--tls-key/--tls-ca) for mutual TLS"
            ),
            None => {}
            Some(Ok(tls)) => agents.tls = Some(tls),
            Some(Err(e)) => {
                // Reported by Config::parse; never fall back to plaintext.
                warn!(error = %agent::error_chain(&e), "[daemon] tls unusable: agent hosts left out");
                agents.agents.clear();
            }
        }
        let mut executor = ClusterExecutor::default();
        let agent_names: Vec<String> = agents.agents.keys().cloned().collect();
        let agents: Arc<dyn Executor> = Arc::new(agents);
        for n in agent_names {
            executor.insert(&n, agents.clone());
        }
        #[cfg(feature = "libvirt")]
        if !libvirt_hosts.is_empty() {
            let names: Vec<String> = libvirt_hosts.keys().cloned().collect();
            match libvirt::LibvirtHosts::new(libvirt_hosts, cfg.libvirt.clone()) {
                Ok(l) => {
                    let l: Arc<dyn Executor> = Arc::new(l);
                    for n in names {
                        executor.insert(&n, l.clone());
                    }
                }
                Err(e) => problems.push(ConfigProblem {
                    path: cfg.path.display().to_string(),
                    line: 0,
                    message: format!("libvirt hosts left out: {}", agent::error_chain(&e)),
                }),
            }
        }
        for v in &cfg.vms {
            let mut vm = Vm::new(v.name.get_ref(), v.cpu_mips, *v.mem_mb.get_ref());
            vm.host = cluster.host_by_name(v.host.get_ref());
            vm.on_evacuate = v.on_evacuate;
            vm.restart = v.restart;
            cluster.vms.push(vm);
        }
        cluster.rules = cfg.rules.clone();
        let mode = cfg.daemon.policy.parse().unwrap_or_else(|e: String| {
            problems.push(ConfigProblem {
                path: cfg.path.display().to_string(),
                line: 0,
                message: e,
            });
            PolicyMode::Manual
        });
        for p in &problems {
            warn!(problem = %p, "configuration entry left out");
        }
        let mut planner = Planner::new(mode);
        let d = &cfg.daemon;
        if d.interval_s > 0.0 {
            // One demand sample a round: the policy's windows are in seconds.
            planner.power_save.sample_s = d.interval_s;
        }
        if let Some(s) = d.power_save_duration_s {
            planner.ferry.low_for_s = s;
        }
        if let Some(s) = d.balance_duration_s {
            planner.balance.duration_s = s;
        }
        if let Some(s) = d.min_move_interval_s {
            planner.ferry.limits.min_move_interval_s = s;
        }
        if let Some(t) = d.balance_threshold.filter(|t| *t > 0.0 && *t <= 1.0) {
            planner.balance.threshold = t;
        }
        Self {
            state: Arc::new(Mutex::new(State {
                cluster,
                planner,
                problems,
                health: vec![HostHealth::default(); cfg.hosts.len()],
                alerts: Vec::new(),
                last_round: RoundReport::default(),
                hardware: vec![Default::default(); cfg.hosts.len()],
            })),
            executor: Arc::new(executor),
            drivers: Arc::new(drivers),
            fences: Arc::new(fences),
            metrics: Arc::new(metrics::DaemonMetrics::default()),
            round_lock: Arc::new(tokio::sync::Mutex::new(())),
            ha: None,
            health: Arc::new(HealthChecks {
                providers,
                config: cfg.health.clone(),
            }),
        }
    }

    /// Keep the cluster records in `ha`'s store and act only while leading.
    pub fn with_ha(mut self, ha: Arc<crate::ha::failover::ClusterHa>) -> Self {
        self.ha = Some(ha);
        self
    }

    /// Whether this daemon acts: it leads, or it is the only one.
    pub fn leads(&self) -> bool {
        self.ha.as_ref().is_none_or(|ha| ha.claim().is_some())
    }

    /// Replace the executor (e.g. libvirt, or tests).
    pub fn with_executor(mut self, e: Arc<dyn Executor>) -> Self {
        self.executor = e;
        self
    }

    /// One round: inventory, plan, execute. Returns what it did.
    pub async fn round(&self, now: f64) -> RoundReport {
        let turn = self.take_turn().await;
        self.round_in_turn(&turn, now).await
    }

    /// Wait until no round runs, and keep the others out while the
    /// returned turn lives: a change and the rounds that act on it (a
    /// maintenance request) then see no timer round in between.
    pub async fn take_turn(&self) -> RoundTurn {
        RoundTurn {
            _held: self.round_lock.clone().lock_owned().await,
        }
    }

    /// One round, run inside a turn already taken.
    pub async fn round_in_turn(&self, _turn: &RoundTurn, now: f64) -> RoundReport {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.round_blocking(now))
            .await
            .unwrap_or_default()
    }

    fn round_blocking(&self, now: f64) -> RoundReport {
        let running_on = self.refresh_inventory();
        if let Some(ha) = &self.ha {
            let Some(me) = ha.claim() else {
                // A follower keeps its model current, and plans nothing.
                let leader = ha.election.leader().ok().flatten();
                return RoundReport {
                    plan_error: Some(format!(
                        "following: {} leads",
                        leader.map_or("nobody".to_string(), |l| l.candidate)
                    )),
                    ..RoundReport::default()
                };
            };
            self.adopt(ha, &me, &running_on);
        }
        self.check_health(now);
        let (snapshot, plan, plan_error) = {
            let mut st = lock(&self.state);
            st.cluster.now = now;
            self.metrics.rounds.inc();
            let snapshot = st.cluster.clone();
            let (plan, plan_error) = match st.planner.plan(&snapshot) {
                Ok(p) => (p, None),
                Err(e) => {
                    warn!(error = %e, "planning failed; nothing moves this round");
                    (Plan::default(), Some(e.to_string()))
                }
            };
            (snapshot, plan, plan_error)
        };
        let mut outcomes = Vec::with_capacity(plan.actions.len());
        // Hosts that must stay on this round: a move or shutdown off them
        // failed, so a VM may still run there.
        let mut keep_on = std::collections::BTreeSet::new();
        for a in &plan.actions {
            info!(action = %describe(&snapshot, a), reason = a.reason(), "decision");
            if let Action::PowerOff { host, .. } = *a {
                if let Some(why) = self.unsafe_to_power_off(&snapshot, host, &keep_on) {
                    self.metrics.power_failed.inc();
                    warn!(host = %snapshot.hosts[host].name, %why, "not powering off: it may still run a VM");
                    outcomes.push(Outcome::Skipped {
                        why: format!("not powering off: {why}"),
                    });
                    continue;
                }
            }
            let outcome = self.execute(&snapshot, a);
            let done = outcome == Outcome::Done;
            outcomes.push(outcome);
            if done {
                apply(&mut lock(&self.state).cluster, a);
            } else {
                match *a {
                    Action::Migrate { from, .. } => {
                        keep_on.insert(from);
                    }
                    Action::ShutdownVm { vm, .. } => {
                        keep_on.extend(snapshot.vms[vm].host);
                    }
                    _ => {}
                }
            }
        }
        let report = RoundReport {
            plan,
            outcomes,
            plan_error,
        };
        lock(&self.state).last_round = report.clone();
        report
    }

    /// Run every host's health providers and act on what [`step`] decides:
    /// quarantine or evacuate a degraded host, release one healthy long
    /// enough. Every decision is logged with the providers' evidence.
    ///
    /// [`step`]: crate::ha::health::step
    fn check_health(&self, now: f64) {
        use crate::ha::health::{check_all, step, worst, HealthAction, Transition};
        let (providers, cfg) = (&self.health.providers, &self.health.config);
        for (h, ps) in providers.iter().enumerate() {
            if ps.is_empty() {
                continue;
            }
            let readings = check_all(ps);
            let mut st = lock(&self.state);
            let name = st.cluster.hosts[h].name.clone();
            let evidence = readings
                .iter()
                .map(|r| format!("{}: {} [{}]", r.provider, r.verdict, r.evidence))
                .collect::<Vec<_>>()
                .join("; ");
            let (next, t) = step(
                &st.hardware[h].state,
                worst(&readings),
                now,
                cfg.release_after_s,
            );
            if next != st.hardware[h].state && t.is_none() {
                info!(host = %name, state = ?next, %evidence, "host health: still held");
            }
            let mut event = None;
            match t {
                Some(Transition::Degrade(r)) => {
                    let host = &mut st.cluster.hosts[h];
                    let what = match cfg.action {
                        HealthAction::Quarantine => {
                            host.quarantined = true;
                            "quarantined: no new VMs"
                        }
                        HealthAction::Evacuate if host.maintenance => {
                            // An operator's maintenance already empties it.
                            host.quarantined = true;
                            "already in maintenance; quarantined too"
                        }
                        HealthAction::Evacuate => {
                            host.maintenance = true;
                            st.hardware[h].evacuated = true;
                            "evacuating: its VMs leave live"
                        }
                    };
                    warn!(host = %name, provider = %r.provider, verdict = %r.verdict, %evidence, "host degraded; {what}");
                    event = Some((
                        crate::ha::failover::HaEventKind::HostDegraded,
                        format!(
                            "{name} {what}: {} says {} [{}]",
                            r.provider, r.verdict, r.evidence
                        ),
                    ));
                }
                Some(Transition::Release { healthy_for }) => {
                    let evacuated = std::mem::take(&mut st.hardware[h].evacuated);
                    let host = &mut st.cluster.hosts[h];
                    host.quarantined = false;
                    if evacuated {
                        host.maintenance = false;
                    }
                    let what = if evacuated {
                        "released: its VMs may come back"
                    } else {
                        "released: VMs may be placed on it"
                    };
                    info!(host = %name, healthy_for_s = healthy_for, %evidence, "host healthy; {what}");
                    event = Some((
                        crate::ha::failover::HaEventKind::HostReleased,
                        format!("{name} {what} (healthy for {healthy_for:.0} s) [{evidence}]"),
                    ));
                }
                None => {}
            }
            st.hardware[h].state = next;
            st.hardware[h].readings = readings;
            drop(st);
            if let (Some(ha), Some((kind, message))) = (&self.ha, event) {
                ha.event(kind, None, Some(&name), message);
            }
        }
    }

    /// Why `host` must not be powered off now, if it must not: a VM failed
    /// to leave it this round, or its agent still reports a running VM (or
    /// cannot be asked). Powering it off would lose a guest.
    fn unsafe_to_power_off(
        &self,
        c: &Cluster,
        host: usize,
        keep_on: &std::collections::BTreeSet<usize>,
    ) -> Option<String> {
        if keep_on.contains(&host) {
            return Some("a VM failed to leave it this round".into());
        }
        match self.executor.status(&c.hosts[host].name) {
            Ok(s) => s
                .vms
                .iter()
                .find(|v| v.running)
                .map(|v| format!("its agent still runs {}", v.name)),
            Err(agent::ExecError::NoAgent(_)) => None,
            Err(e) => Some(format!("its agent cannot be asked: {}", e.chain())),
        }
    }

    /// VMs running on live hosts with no ownership record are recorded
    /// where they run.
    fn adopt(
        &self,
        ha: &crate::ha::failover::ClusterHa,
        me: &crate::store::LeaderClaim,
        running_on: &std::collections::BTreeMap<String, Vec<String>>,
    ) {
        let records = match ha.store.records() {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %agent::error_chain(&e), "cannot read the ownership records");
                return;
            }
        };
        for (vm, hosts) in running_on {
            if hosts.len() != 1 || records.iter().any(|r| &r.vm == vm) {
                continue;
            }
            match ha.store.start(me, vm, &hosts[0]) {
                Ok(r) => ha.event(
                    crate::ha::failover::HaEventKind::Adopted,
                    Some(vm),
                    Some(&hosts[0]),
                    format!(
                        "{vm} runs on {} with no record: recorded there (epoch {})",
                        hosts[0], r.epoch
                    ),
                ),
                Err(e) => {
                    warn!(vm, host = %hosts[0], error = %agent::error_chain(&e), "cannot record a running VM")
                }
            }
        }
    }

    fn refresh_inventory(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let hosts: Vec<(usize, String, PowerState)> = {
            let st = lock(&self.state);
            st.cluster
                .hosts
                .iter()
                .enumerate()
                .map(|(i, h)| (i, h.name.clone(), h.power))
                .collect()
        };
        // Which hosts report each VM running this round.
        let mut running_on: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (h, name, power) in hosts {
            if power != PowerState::On {
                lock(&self.state).health[h].set(None, None);
                continue;
            }
            match self.executor.status(&name) {
                Ok(s) => {
                    let mut st = lock(&self.state);
                    st.health[h].set(Some(true), None);
                    for av in s.vms {
                        if av.running {
                            running_on
                                .entry(av.name.clone())
                                .or_default()
                                .push(name.clone());
                        }
                        match st.cluster.vm_by_name(&av.name) {
                            Some(v) => {
                                let vm = &mut st.cluster.vms[v];
                                vm.record(av.cpu_mips);
                                if av.running {
                                    vm.host = Some(h);
                                }
                            }
                            None if av.running => {
                                info!(vm = %av.name, host = %name, "new VM found in inventory");
                                let mut vm = Vm::new(&av.name, av.cpu_mips.max(1.0), av.mem_mb);
                                vm.host = Some(h);
                                vm.record(av.cpu_mips);
                                st.cluster.vms.push(vm);
                            }
                            None => {}
                        }
                    }
                }
                Err(agent::ExecError::NoAgent(_)) => lock(&self.state).health[h].set(None, None),
                Err(e) => {
                    let mut st = lock(&self.state);
                    self.metrics.inventory_failed.inc();
                    st.health[h].set(Some(false), Some(e.chain()));
                    warn!(host = %name, error = %e.chain(), "inventory failed; keeping the last known state");
                }
            }
        }
        let alerts: Vec<String> = running_on
            .iter()
            .filter(|(_, hosts)| hosts.len() > 1)
            .map(|(vm, hosts)| {
                format!(
                    "VM {vm:?} is reported running on {} hosts: {}",
                    hosts.len(),
                    hosts.join(", ")
                )
            })
            .collect();
        for a in &alerts {
            warn!(alert = %a, "cluster inconsistent");
        }
        lock(&self.state).alerts = alerts;
        running_on
    }

    fn execute(&self, c: &Cluster, a: &Action) -> Outcome {
        let failed = |error: String| Outcome::Failed { error };
        match *a {
            Action::Migrate { vm, from, to, .. } => {
                let (name, from, to) = (&c.vms[vm].name, &c.hosts[from].name, &c.hosts[to].name);
                let result = match &self.ha {
                    Some(ha) => self.migrate_owned(ha, name, from, to),
                    None => self.executor.migrate(name, from, to),
                };
                match result {
                    Ok(m) => {
                        self.metrics.migrations.done(&m);
                        Outcome::Done
                    }
                    Err(e) => {
                        self.metrics.migrations.failed();
                        warn!(vm = %name, error = %e.chain(), "migration failed; the VM stays on its source, the next round retries");
                        failed(e.chain())
                    }
                }
            }
            Action::PowerOn { host, .. } | Action::PowerOff { host, .. } => {
                let on = matches!(a, Action::PowerOn { .. });
                let Some(Some(d)) = self.drivers.get(host) else {
                    warn!(host = %c.hosts[host].name, "no power driver; not switched");
                    return Outcome::Skipped {
                        why: format!("host {} has no power driver", c.hosts[host].name),
                    };
                };
                let r = if on { d.power_on() } else { d.power_off() };
                match r {
                    Ok(()) => {
                        if on {
                            self.metrics.power_on.inc();
                        } else {
                            self.metrics.power_off.inc();
                        }
                        Outcome::Done
                    }
                    Err(e) => {
                        self.metrics.power_failed.inc();
                        let e = agent::error_chain(&e);
                        warn!(host = %c.hosts[host].name, driver = d.name(), error = %e, "power operation failed");
                        failed(e)
                    }
                }
            }
            Action::ShutdownVm { vm, .. } => {
                let host = c.vms[vm]
                    .host
                    .map(|h| c.hosts[h].name.clone())
                    .unwrap_or_default();
                match self.executor.shutdown_vm(&c.vms[vm].name, &host) {
                    Ok(()) => Outcome::Done,
                    Err(e) => {
                        warn!(vm = %c.vms[vm].name, error = %e.chain(), "shutdown failed");
                        failed(e.chain())
                    }
                }
            }
            Action::StartVm { vm, host, .. } => {
                if let Some(refusal) = self.refuse_start(c, vm, host) {
                    return failed(refusal);
                }
                match self
                    .executor
                    .start_vm(&c.vms[vm].name, c.vms[vm].mem_mb, &c.hosts[host].name)
                {
                    Ok(()) => Outcome::Done,
                    Err(e) => {
                        warn!(vm = %c.vms[vm].name, error = %e.chain(), "start failed");
                        failed(e.chain())
                    }
                }
            }
        }
    }
}

impl Daemon {
    /// Admission control on a start (with the cluster store, whose
    /// failover reserve it keeps): why `vm` must not start on `host`, if
    /// it must not. Refusals are logged and kept as HA events.
    fn refuse_start(&self, c: &Cluster, vm: usize, host: usize) -> Option<String> {
        let ha = self.ha.as_ref()?;
        let policy = &ha.config.policy;
        let refusal = crate::ha::restart::admit_start_on(c, vm, host, policy.cpu_cap, policy)
            .err()?
            .to_string();
        let (name, host) = (&c.vms[vm].name, &c.hosts[host].name);
        warn!(vm = %name, host = %host, %refusal, "start refused by admission control");
        ha.event(
            crate::ha::failover::HaEventKind::StartRefused,
            Some(name),
            Some(host),
            refusal.clone(),
        );
        Some(refusal)
    }

    /// A migration under the cluster store: recorded as a decision in
    /// flight; the source agent moves the VM's record to `to` before GO
    /// (a compare-and-swap fenced by this leader's token), or, for an
    /// agent without the store, this daemon moves it once the migration
    /// completed.
    fn migrate_owned(
        &self,
        ha: &crate::ha::failover::ClusterHa,
        vm: &str,
        from: &str,
        to: &str,
    ) -> Result<metrics::MigrationMeasure, agent::ExecError> {
        use crate::store::{Decision, DecisionKind};
        let refused = |why: String| agent::ExecError::Ownership {
            vm: vm.to_owned(),
            why,
        };
        let me = ha
            .claim()
            .ok_or_else(|| refused("this daemon no longer leads".into()))?;
        let record = match ha.store.record(vm) {
            Ok(Some(r)) => r,
            Ok(None) => return Err(refused("it has no ownership record yet".into())),
            Err(e) => return Err(refused(agent::error_chain(&e))),
        };
        if record.host != from {
            return Err(refused(format!(
                "its record names {} (epoch {}), not {from}",
                record.host, record.epoch
            )));
        }
        let decision = Decision {
            id: format!("migrate-{vm}-{}", record.epoch),
            vm: vm.to_owned(),
            kind: DecisionKind::Migrate {
                from: from.to_owned(),
                to: to.to_owned(),
            },
            token: me.token,
            reason: "planned".into(),
        };
        ha.store
            .record_decision(&me, &decision)
            .map_err(|e| refused(agent::error_chain(&e)))?;
        let claim = protocol::OwnershipClaim {
            candidate: me.candidate.clone(),
            token: me.token,
            epoch: record.epoch,
        };
        let result = self.executor.migrate_owned(vm, from, to, Some(&claim));
        let outcome = match result {
            Ok((m, Some(swap))) => {
                self.metrics.ha.ownership_swap_ms.observe(swap.swap_ms);
                ha.event(
                    crate::ha::failover::HaEventKind::OwnershipMoved,
                    Some(vm),
                    Some(to),
                    format!(
                        "{vm}: {from} -> {to}, epoch {} (swapped in {:.2} ms before the {:.1} ms pause and GO)",
                        swap.epoch, swap.swap_ms, m.downtime_ms.unwrap_or(0.0)
                    ),
                );
                Ok(m)
            }
            Ok((m, None)) => match ha.store.migrate(&me, &record, to) {
                Ok(r) => {
                    ha.event(
                        crate::ha::failover::HaEventKind::OwnershipMoved,
                        Some(vm),
                        Some(to),
                        format!("{vm}: {from} -> {to}, epoch {} (moved after the migration: the source agent has no store)", r.epoch),
                    );
                    Ok(m)
                }
                Err(e) => Err(refused(format!(
                    "migrated, but its record could not follow: {}",
                    agent::error_chain(&e)
                ))),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = ha.store.finish_decision(&me, &decision.id) {
            warn!(vm, error = %agent::error_chain(&e), "cannot finish the migration decision");
        }
        outcome
    }
}

/// One line for an action, with names.
pub fn describe(c: &Cluster, a: &Action) -> String {
    let h = |i: usize| c.hosts.get(i).map(|h| h.name.as_str()).unwrap_or("?");
    let v = |i: usize| c.vms.get(i).map(|v| v.name.as_str()).unwrap_or("?");
    match *a {
        Action::Migrate { vm, from, to, .. } => {
            format!("migrate {} {} -> {}", v(vm), h(from), h(to))
        }
        Action::PowerOn { host, .. } => format!("power on {}", h(host)),
        Action::PowerOff { host, .. } => format!("power off {}", h(host)),
        Action::ShutdownVm { vm, .. } => format!("shut down {}", v(vm)),
        Action::StartVm { vm, host, .. } => format!("start {} on {}", v(vm), h(host)),
    }
}

/// Serve the API on `listener` and plan every `interval`; runs until the
/// future is dropped.
pub async fn serve(
    daemon: Daemon,
    listener: tokio::net::TcpListener,
    interval: Duration,
) -> Result<(), DaemonError> {
    let ticker = daemon.clone();
    let started = std::time::Instant::now();
    if let Some(ha) = daemon.ha.clone() {
        // The failover loop: often, so a host's death is acted on within
        // a fraction of its lease TTL.
        let d = daemon.clone();
        let every = ha.config.every;
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                t.tick().await;
                let (d, ha) = (d.clone(), ha.clone());
                let _ = tokio::task::spawn_blocking(move || ha.tick(&d)).await;
            }
        });
    }
    tokio::spawn(async move {
        let mut t = tokio::time::interval(interval);
        loop {
            t.tick().await;
            ticker.round(started.elapsed().as_secs_f64()).await;
        }
    });
    axum::serve(listener, api::router(daemon, started))
        .await
        .map_err(DaemonError::Serve)
}

/// What a `Type=notify` service tells systemd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemdState {
    /// Started: serving.
    Ready,
    /// Shutting down.
    Stopping,
}

/// Tells systemd the service's state when it started us with
/// `Type=notify` (`NOTIFY_SOCKET` set); does nothing otherwise. A failure
/// is logged, never fatal.
pub fn notify_systemd(state: SystemdState) {
    let s = match state {
        SystemdState::Ready => sd_notify::NotifyState::Ready,
        SystemdState::Stopping => sd_notify::NotifyState::Stopping,
    };
    if let Err(e) = sd_notify::notify(&[s]) {
        warn!(error = %e, ?state, "cannot notify systemd");
    }
}

/// How a daemon joins the others on a cluster store (`--etcd`).
#[derive(Debug, Clone)]
pub struct HaOptions {
    /// The store.
    pub store: crate::store::ClusterStore,
    /// This daemon's name in the election (default: its API address).
    pub name: Option<String>,
    /// The leader lease's TTL: how long a dead leader holds the next back.
    pub leader_ttl: Duration,
    /// The hosts' lease TTL (their agents' `--lease-ttl`): restarts wait
    /// its self-fence margin (2/5 of it) after a lease expired.
    pub host_lease_ttl: Duration,
    /// Host failures whose VMs must always fit (admission control's N).
    pub failures: usize,
}

/// `ferry sched daemon --config FILE [--etcd ...]`: blocks until killed.
pub fn run(config: &Path, ha: Option<HaOptions>) -> Result<(), DaemonError> {
    let cfg = Config::load(config)?;
    let rt = tokio::runtime::Runtime::new().map_err(DaemonError::Runtime)?;
    rt.block_on(async {
        let addr = cfg.daemon.listen.get_ref().clone();
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| DaemonError::Listen {
                addr: addr.clone(),
                source,
            })?;
        info!(%addr, "ferry sched daemon listening");
        let mut daemon = Daemon::from_config(&cfg);
        if let Some(o) = ha {
            let name = o.name.unwrap_or_else(|| addr.clone());
            let election = crate::ha::election::Election::start(
                o.store.clone(),
                &name,
                Some(addr.clone()),
                crate::ha::election::ElectionConfig::for_ttl(o.leader_ttl),
            )
            .map_err(DaemonError::Election)?;
            info!(candidate = %name, leader_ttl = ?o.leader_ttl, "campaigning for the cluster's leadership");
            let failover = crate::ha::failover::FailoverConfig {
                fence_margin: o.host_lease_ttl * 2 / 5,
                policy: crate::ha::restart::HaPolicy {
                    failures: o.failures,
                    ..Default::default()
                },
                every: (o.leader_ttl / 10).max(Duration::from_millis(100)),
            };
            daemon = daemon.with_ha(Arc::new(crate::ha::failover::ClusterHa::new(
                o.store, election, failover,
            )));
        }
        notify_systemd(SystemdState::Ready);
        let interval = Duration::from_secs_f64(cfg.daemon.interval_s.max(1.0));
        // On SIGTERM or Ctrl-C, stop serving; dropping the runtime then drops
        // the power drivers, which stop the processes they started.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(DaemonError::Runtime)?;
        let r = tokio::select! {
            r = serve(daemon, listener, interval) => r,
            _ = tokio::signal::ctrl_c() => { info!("interrupted; shutting down"); Ok(()) }
            _ = term.recv() => { info!("terminated; shutting down"); Ok(()) }
        };
        notify_systemd(SystemdState::Stopping);
        r
    })
}
