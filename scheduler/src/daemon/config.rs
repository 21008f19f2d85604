//! `cluster.toml`: the daemon's hosts, VMs, agents and power drivers.
//! Validation reports every problem with the file and line it comes from;
//! the daemon keeps what is valid and serves it.
//!
//! ```toml
//! [daemon]
//! listen = "127.0.0.1:7070"
//! policy = "both"          # balance | power_save | both | manual
//! interval_s = 30
//! # optional planner timers (seconds; defaults 300, 600, 1200, the
//! # defaults of ferry's policy, `plan::ferry::FerryParams`):
//! # power_save_duration_s = 300
//! # balance_duration_s = 600
//! # min_move_interval_s = 1200
//! # balance_threshold = 0.8
//! # mutual TLS to the agents (`ferry tls gen-certs DIR --nodes h1 ... sched`);
//! # each agent's certificate must carry its host's name:
//! # tls = { cert = "/etc/ferry/sched.pem", key = "/etc/ferry/sched.key", ca = "/etc/ferry/ca.pem" }
//!
//! [[host]]
//! name = "h1"
//! cores = 2
//! core_mips = 2000
//! mem_mb = 4096
//! agent = "127.0.0.1:7101"
//! power = { driver = "wol", mac = "52:54:00:12:34:56", broadcast = "192.168.1.255:9" }
//! # fenced from outside once its lease expired (crate::ha::fence): a
//! # command run with the host's name, exit 0 confirming the power-off,
//! # or { driver = "power" } (the power driver's off); restarts wait for it
//! # fence = { driver = "command", command = ["/usr/local/bin/fence-bmc"] }
//!
//! # hardware warnings (optional): what a degraded host gets, and how long
//! # it must stay healthy before it is released
//! [health]
//! action = "quarantine"    # or "evacuate" (its VMs leave live, come back on release)
//! release_after_s = 300
//! # and per host, e.g. in [[host]] h1:
//! # health = [ { provider = "command", command = ["/usr/local/bin/ipmi-health"] },
//! #            { provider = "hwmon", max_temp_c = 85, min_fan_rpm = 600 } ]
//!
//! [[vm]]
//! name = "web"
//! host = "h1"
//! cpu_mips = 1000
//! mem_mb = 512
//! on_evacuate = "migrate"  # or "shutdown"
//! restart = "high"         # after a host failure: high | medium | low | disabled
//!
//! # Rules (crate::plan::rules): affinity, anti_affinity (VMs), must_run_on,
//! # must_not_run_on, should_run_on, should_not_run_on (VMs and hosts).
//! [[rule]]
//! name = "web-apart"
//! kind = "anti_affinity"
//! vms = ["web", "web2"]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::model::{OnEvacuate, RestartPriority};

/// Why the configuration could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}:{line}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What the parser said.
        message: String,
    },
}

/// A problem with one entry; the entry is left out, the rest is served.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct ConfigProblem {
    /// The file.
    pub path: String,
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.path, self.line, self.message)
    }
}

/// `[daemon]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSection {
    /// HTTP API address.
    pub listen: Spanned<String>,
    /// Initial policy.
    #[serde(default = "default_policy")]
    pub policy: String,
    /// Seconds between planning rounds.
    #[serde(default = "default_interval")]
    pub interval_s: f64,
    /// Seconds a host must stay lightly loaded before power save empties
    /// it (default: ferry's policy's `low_for_s`, 300).
    #[serde(default)]
    pub power_save_duration_s: Option<f64>,
    /// Seconds a host must stay overloaded before even distribution acts
    /// (default: the planner's, 600).
    #[serde(default)]
    pub balance_duration_s: Option<f64>,
    /// Minimum seconds between two non-urgent moves of the same VM
    /// (default: the planner's, 1200).
    #[serde(default)]
    pub min_move_interval_s: Option<f64>,
    /// CPU share above which even distribution finds a host overloaded
    /// (default: the planner's, 0.8).
    #[serde(default)]
    pub balance_threshold: Option<f64>,
    /// Mutual TLS to the agents: the daemon's certificate (`ferry tls
    /// gen-certs`), and the CA every agent's certificate must chain to;
    /// each agent's certificate must also carry its host's name. Unset:
    /// plain HTTP (the daemon warns).
    #[serde(default)]
    pub tls: Option<AgentTlsEntry>,
}

/// `[daemon] tls`: the daemon's side of the agent API's mutual TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTlsEntry {
    /// The daemon's PEM certificate (a client certificate of the CA).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The CA.
    pub ca: PathBuf,
}

impl AgentTlsEntry {
    /// The files loaded (the transport's loader: they exist, parse, and
    /// the key matches the certificate).
    pub fn load(&self) -> Result<super::https::ClientTls, super::https::AgentTlsError> {
        super::https::ClientTls::load(&ferry_transport::tls::TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
        })
    }
}

fn default_policy() -> String {
    "both".into()
}
fn default_interval() -> f64 {
    30.0
}

/// How a host is powered on and off.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "driver", rename_all = "snake_case", deny_unknown_fields)]
pub enum PowerConfig {
    /// Run a command (argv, no shell) for on and off, e.g. `ipmitool`.
    Command {
        /// Argv to power on.
        on: Vec<String>,
        /// Argv to power off.
        off: Vec<String>,
    },
    /// Wake-on-LAN to power on; an optional command to power off.
    Wol {
        /// The host's MAC address.
        mac: String,
        /// Where the magic packet goes (`broadcast:port`).
        broadcast: String,
        /// Argv to power off (e.g. ssh host poweroff).
        #[serde(default)]
        off: Vec<String>,
    },
    /// Start/stop a local process (an agent) as the host's "power".
    Process {
        /// Argv of the process.
        command: Vec<String>,
    },
}

/// `[[host]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    /// Unique name.
    pub name: Spanned<String>,
    /// Cores.
    pub cores: u32,
    /// MIPS per core.
    pub core_mips: f64,
    /// Memory in MB.
    pub mem_mb: u64,
    /// The host agent's HTTP address (a ferry agent host).
    pub agent: Option<Spanned<String>>,
    /// Or: the host's libvirt connection URI (a libvirt host, feature
    /// `libvirt`), e.g. `qemu+ssh://root@h1/system`, or
    /// `qemu+unix:///system?socket=/srv/h1/libvirt-sock`.
    pub libvirt: Option<Spanned<String>>,
    /// A libvirt host: where the daemon reaches this host's
    /// `[libvirt] socket_dir` (its own view of the folder QEMU's migration
    /// sockets are in). Default: `socket_dir` itself.
    pub tunnel_dir: Option<PathBuf>,
    /// Power driver.
    pub power: Option<PowerConfig>,
    /// Health providers ([`crate::ha::health`]): hardware warnings.
    #[serde(default)]
    pub health: Vec<HealthProviderConfig>,
    /// How the host is fenced from outside once its lease expired
    /// ([`crate::ha::fence`]); its VMs restart only after it confirmed.
    pub fence: Option<FenceConfig>,
}

/// `[[host]] fence = ...`: how a dead host is powered off from outside.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "driver", rename_all = "snake_case", deny_unknown_fields)]
pub enum FenceConfig {
    /// A command (argv, no shell) run with the host's name appended; exit
    /// status 0 confirms the power-off.
    Command {
        /// The argv.
        command: Vec<String>,
        /// Longest it may run (seconds, default 60).
        #[serde(default = "default_fence_timeout")]
        timeout_s: f64,
    },
    /// The host's power driver powers it off.
    Power,
}

fn default_fence_timeout() -> f64 {
    60.0
}

/// One health provider of a host.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "provider", rename_all = "snake_case", deny_unknown_fields)]
pub enum HealthProviderConfig {
    /// A command (argv, no shell) printing `ok`, `degraded REASON` or
    /// `failed REASON` (IPMI: a script around `ipmitool sdr`).
    Command {
        /// Argv.
        command: Vec<String>,
        /// Seconds it may run (default 10).
        #[serde(default = "default_health_timeout")]
        timeout_s: f64,
    },
    /// sysfs hwmon sensors against limits.
    Hwmon {
        /// The hwmon root (default `/sys/class/hwmon`).
        #[serde(default = "default_hwmon_root")]
        root: PathBuf,
        /// Degraded at or above this temperature (°C).
        max_temp_c: Option<f64>,
        /// Degraded below this fan speed (RPM).
        min_fan_rpm: Option<f64>,
    },
}

fn default_health_timeout() -> f64 {
    10.0
}
fn default_hwmon_root() -> PathBuf {
    PathBuf::from("/sys/class/hwmon")
}

impl HealthProviderConfig {
    /// The provider, or why it cannot be built.
    pub fn build(&self) -> Result<Box<dyn crate::ha::health::HealthProvider>, String> {
        use crate::ha::health::{CommandProvider, HwmonLimits, HwmonProvider};
        match self {
            Self::Command { command, timeout_s } => {
                if command.is_empty() {
                    return Err("health command is empty".into());
                }
                if !(timeout_s.is_finite() && *timeout_s > 0.0) {
                    return Err(format!("health timeout_s {timeout_s} is not positive"));
                }
                Ok(Box::new(CommandProvider {
                    argv: command.clone(),
                    timeout: std::time::Duration::from_secs_f64(*timeout_s),
                }))
            }
            Self::Hwmon {
                root,
                max_temp_c,
                min_fan_rpm,
            } => {
                if max_temp_c.is_none() && min_fan_rpm.is_none() {
                    return Err("hwmon health needs max_temp_c or min_fan_rpm".into());
                }
                Ok(Box::new(HwmonProvider {
                    root: root.clone(),
                    limits: HwmonLimits {
                        max_temp_c: *max_temp_c,
                        min_fan_rpm: *min_fan_rpm,
                    },
                }))
            }
        }
    }
}

/// `[health]`: what hardware warnings do, for the whole cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    /// `quarantine` (no new VMs; default) or `evacuate` (VMs leave live).
    #[serde(default)]
    pub action: crate::ha::health::HealthAction,
    /// Seconds a host must stay healthy before it is released (default 300).
    #[serde(default = "default_release_after")]
    pub release_after_s: f64,
}

impl Default for HealthSection {
    fn default() -> Self {
        Self {
            action: Default::default(),
            release_after_s: default_release_after(),
        }
    }
}

fn default_release_after() -> f64 {
    300.0
}

/// `[[vm]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmEntry {
    /// Unique name.
    pub name: Spanned<String>,
    /// Host it runs on.
    pub host: Spanned<String>,
    /// CPU size (MIPS).
    pub cpu_mips: f64,
    /// Memory (MB).
    pub mem_mb: Spanned<u64>,
    /// Evacuation behaviour.
    #[serde(default)]
    pub on_evacuate: OnEvacuate,
    /// Restart priority after its host died: `high`, `medium` (default),
    /// `low`, `disabled`.
    #[serde(default)]
    pub restart: RestartPriority,
}

/// `[libvirt]`: how migrations between libvirt hosts are carried. Both
/// ends of ferry's tunnel run in the daemon: the source end listens on the
/// source host's view of `socket_dir` (its `tunnel_dir`), the destination
/// end connects to the destination's; libvirt is told `--migrateuri
/// unix://SOCKET_DIR/NAME.sock` (and `disks_uri` for VMs with local disks),
/// the same path on both hosts, each seeing its own folder there.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtSection {
    /// The folder QEMU's migration sockets are created in, as QEMU sees it
    /// on every libvirt host. Unset: libvirt migrates over its own
    /// connection (no tunnel).
    pub socket_dir: Option<PathBuf>,
    /// Address the tunnel's destination end listens on (port chosen per
    /// migration).
    #[serde(default = "default_tunnel_ip")]
    pub tunnel_ip: String,
    /// Tunnel lanes (TCP connections).
    #[serde(default = "default_lanes")]
    pub lanes: u16,
    /// LZ4 on the tunnel (chunks that do not shrink go raw).
    #[serde(default = "default_true")]
    pub lz4: bool,
    /// Tunnel bandwidth cap in bytes/s.
    pub max_bandwidth: Option<u64>,
    /// libvirt's own bandwidth limit for a migration, MiB/s.
    pub bandwidth_mib_s: Option<u64>,
    /// Largest pause libvirt may take to switch over, ms.
    pub max_downtime_ms: Option<u64>,
    /// QEMU multifd connections (`--parallel --parallel-connections N`).
    pub parallel_connections: Option<u32>,
    /// Disks are on storage every host sees: never copy them. Default
    /// false: a VM with a file or block disk migrates with
    /// `VIR_MIGRATE_NON_SHARED_DISK`.
    #[serde(default)]
    pub shared_storage: bool,
    /// Mutual TLS on the tunnel's lanes (the daemon runs both ends).
    pub tls: Option<TlsEntry>,
    /// Plaintext lanes: must be asked for by name when `tls` is not given.
    #[serde(default)]
    pub insecure: bool,
}

fn default_tunnel_ip() -> String {
    "127.0.0.1".into()
}
fn default_lanes() -> u16 {
    2
}
fn default_true() -> bool {
    true
}

/// Certificate files (`ferry tls gen-certs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsEntry {
    /// PEM certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The CA.
    pub ca: PathBuf,
    /// The name `cert` is valid for.
    pub server_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    daemon: DaemonSection,
    libvirt: Option<Spanned<LibvirtSection>>,
    health: Option<Spanned<HealthSection>>,
    #[serde(default)]
    host: Vec<HostEntry>,
    #[serde(default)]
    vm: Vec<VmEntry>,
    #[serde(default)]
    rule: Vec<Spanned<crate::plan::rules::Rule>>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Source file.
    pub path: PathBuf,
    /// `[daemon]`.
    pub daemon: DaemonSection,
    /// `[libvirt]`, if given.
    pub libvirt: Option<LibvirtSection>,
    /// `[health]` (defaults when not given).
    pub health: HealthSection,
    /// Valid hosts.
    pub hosts: Vec<HostEntry>,
    /// Valid VMs.
    pub vms: Vec<VmEntry>,
    /// Rules, each consistent with those before it.
    pub rules: Vec<crate::plan::rules::Rule>,
    /// What was left out, and why.
    pub problems: Vec<ConfigProblem>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Config {
    /// Read and validate a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parse and validate text (`path` names it in messages).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
            message: e.message().to_string(),
        })?;
        let mut problems = Vec::new();
        let problem = |problems: &mut Vec<ConfigProblem>, offset: usize, message: String| {
            problems.push(ConfigProblem {
                path: path.display().to_string(),
                line: line_of(text, offset),
                message,
            })
        };
        // Ports: the API and every agent need distinct addresses.
        let mut used: Vec<(SocketAddr, String)> = Vec::new();
        match raw.daemon.listen.get_ref().parse::<SocketAddr>() {
            Ok(a) => used.push((a, "the daemon's listen address".into())),
            Err(_) => problem(
                &mut problems,
                raw.daemon.listen.span().start,
                format!(
                    "listen {:?} is not an address:port",
                    raw.daemon.listen.get_ref()
                ),
            ),
        }
        if let Err(e) = raw
            .daemon
            .policy
            .parse::<crate::plan::planner::PolicyMode>()
        {
            // The span of `policy` is not kept; the [daemon] table's line is.
            problem(&mut problems, raw.daemon.listen.span().start, e);
        }
        if let Some(t) = raw.daemon.balance_threshold {
            if !(t > 0.0 && t <= 1.0) {
                problem(
                    &mut problems,
                    raw.daemon.listen.span().start,
                    format!("balance_threshold {t} is not a CPU share in (0, 1]"),
                );
            }
        }
        if let Some(t) = &raw.daemon.tls {
            if let Err(e) = t.load() {
                problem(
                    &mut problems,
                    raw.daemon.listen.span().start,
                    format!(
                        "[daemon] tls: {}; no agent is reached without it",
                        super::agent::error_chain(&e)
                    ),
                );
            }
        }
        let mut hosts: Vec<HostEntry> = Vec::new();
        let all_names: Vec<String> = raw.host.iter().map(|h| h.name.get_ref().clone()).collect();
        for h in raw.host {
            let at = h.name.span().start;
            if hosts.iter().any(|x| x.name.get_ref() == h.name.get_ref()) {
                problem(
                    &mut problems,
                    at,
                    format!("host {:?} defined twice", h.name.get_ref()),
                );
                continue;
            }
            if h.cores == 0 || h.core_mips <= 0.0 || h.mem_mb == 0 {
                problem(
                    &mut problems,
                    at,
                    format!("host {:?} has no CPU or memory", h.name.get_ref()),
                );
                continue;
            }
            if let Some(p) = &h.power {
                if let Err(e) = super::power::from_config(p) {
                    problem(
                        &mut problems,
                        at,
                        format!("host {:?}: power driver: {e}", h.name.get_ref()),
                    );
                    continue;
                }
            }
            if let Some(Err(e)) = h
                .fence
                .as_ref()
                .map(|f| crate::ha::fence::Fence::from_config(f, h.power.as_ref()))
            {
                problem(
                    &mut problems,
                    at,
                    format!("host {:?}: {e}", h.name.get_ref()),
                );
                continue;
            }
            if let Some(e) = h.health.iter().find_map(|p| p.build().err()) {
                problem(
                    &mut problems,
                    at,
                    format!("host {:?}: {e}", h.name.get_ref()),
                );
                continue;
            }
            if let (Some(_), Some(l)) = (&h.agent, &h.libvirt) {
                problem(
                    &mut problems,
                    l.span().start,
                    format!(
                        "host {:?} has both an agent and a libvirt URI: choose one",
                        h.name.get_ref()
                    ),
                );
                continue;
            }
            if let Some(l) = &h.libvirt {
                if !cfg!(feature = "libvirt") {
                    problem(
                        &mut problems,
                        l.span().start,
                        format!(
                            "host {:?} is a libvirt host, but this ferry was built without libvirt support (feature `libvirt`)",
                            h.name.get_ref()
                        ),
                    );
                    continue;
                }
                if let Some(other) = hosts
                    .iter()
                    .find(|x| x.libvirt.as_ref().map(Spanned::get_ref) == Some(l.get_ref()))
                {
                    problem(
                        &mut problems,
                        l.span().start,
                        format!(
                            "host {:?} claims libvirt URI {:?}, which host {:?} already has",
                            h.name.get_ref(),
                            l.get_ref(),
                            other.name.get_ref()
                        ),
                    );
                    continue;
                }
            }
            if let Some(agent) = &h.agent {
                if raw.daemon.tls.is_some() && !super::https::valid_tls_name(h.name.get_ref()) {
                    problem(
                        &mut problems,
                        at,
                        format!(
                            "host {:?} is not a name a TLS certificate can carry (with [daemon] tls, each agent's certificate must carry its host's name)",
                            h.name.get_ref()
                        ),
                    );
                    continue;
                }
                let Ok(addr) = agent.get_ref().parse::<SocketAddr>() else {
                    problem(
                        &mut problems,
                        agent.span().start,
                        format!("agent {:?} is not an address:port", agent.get_ref()),
                    );
                    continue;
                };
                if let Some((_, who)) = used.iter().find(|(a, _)| {
                    a.port() == addr.port()
                        && (a.ip() == addr.ip()
                            || a.ip().is_unspecified()
                            || addr.ip().is_unspecified())
                }) {
                    problem(
                        &mut problems,
                        agent.span().start,
                        format!(
                            "agent address {addr} of host {:?} overlaps {who}",
                            h.name.get_ref()
                        ),
                    );
                    continue;
                }
                used.push((addr, format!("the agent of host {:?}", h.name.get_ref())));
            }
            hosts.push(h);
        }
        let max_mem = hosts.iter().map(|h| h.mem_mb).max().unwrap_or(0);
        let max_cpu = hosts
            .iter()
            .map(|h| h.core_mips * f64::from(h.cores))
            .fold(0.0, f64::max);
        let mut vms: Vec<VmEntry> = Vec::new();
        for v in raw.vm {
            if vms.iter().any(|x| x.name.get_ref() == v.name.get_ref()) {
                problem(
                    &mut problems,
                    v.name.span().start,
                    format!("VM {:?} defined twice", v.name.get_ref()),
                );
                continue;
            }
            if !hosts.iter().any(|h| h.name.get_ref() == v.host.get_ref()) {
                problem(
                    &mut problems,
                    v.host.span().start,
                    if all_names.contains(v.host.get_ref()) {
                        format!(
                            "VM {:?} names host {:?}, which was left out (see its problem)",
                            v.name.get_ref(),
                            v.host.get_ref()
                        )
                    } else {
                        format!(
                            "VM {:?} names unknown host {:?}",
                            v.name.get_ref(),
                            v.host.get_ref()
                        )
                    },
                );
                continue;
            }
            if *v.mem_mb.get_ref() > max_mem || v.cpu_mips > max_cpu {
                problem(
                    &mut problems,
                    v.mem_mb.span().start,
                    format!(
                        "VM {:?} ({} MB, {:.0} MIPS) is bigger than any host (max {} MB, {:.0} MIPS)",
                        v.name.get_ref(),
                        v.mem_mb.get_ref(),
                        v.cpu_mips,
                        max_mem,
                        max_cpu
                    ),
                );
                continue;
            }
            vms.push(v);
        }
        // Rules in file order: one that is malformed or contradicts those
        // before it is left out, naming the rules.
        let host_names: Vec<String> = hosts.iter().map(|h| h.name.get_ref().clone()).collect();
        let mut rules: Vec<crate::plan::rules::Rule> = Vec::new();
        for r in raw.rule {
            let at = r.span().start;
            let r = r.into_inner();
            rules.push(r);
            if let Err(e) = crate::plan::rules::check(&rules, &host_names) {
                rules.pop();
                problem(&mut problems, at, format!("{e}; the rule is left out"));
            }
        }
        let libvirt = raw.libvirt.map(|l| {
            let at = l.span().start;
            let l = l.into_inner();
            if l.socket_dir.is_some() && l.tls.is_none() && !l.insecure {
                problem(
                    &mut problems,
                    at,
                    "[libvirt]: the tunnel needs `tls = { cert, key, ca, server_name }` or, asked for by name, `insecure = true`".into(),
                );
            }
            if l.lanes == 0 {
                problem(&mut problems, at, "[libvirt]: lanes must be at least 1".into());
            }
            l
        });
        let health = raw.health.map_or_else(HealthSection::default, |h| {
            let at = h.span().start;
            let mut h = h.into_inner();
            if !(h.release_after_s.is_finite() && h.release_after_s >= 0.0) {
                problem(
                    &mut problems,
                    at,
                    format!(
                        "[health]: release_after_s {} is not a number of seconds; using {}",
                        h.release_after_s,
                        default_release_after()
                    ),
                );
                h.release_after_s = default_release_after();
            }
            h
        });
        Ok(Config {
            path: path.to_path_buf(),
            daemon: raw.daemon,
            libvirt,
            health,
            hosts,
            vms,
            rules,
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"[daemon]
listen = "127.0.0.1:7070"

[[host]]
name = "h1"
cores = 2
core_mips = 2000
mem_mb = 4096
agent = "127.0.0.1:7101"

[[host]]
name = "h2"
cores = 2
core_mips = 2000
mem_mb = 4096
agent = "127.0.0.1:7102"
power = { driver = "wol", mac = "52:54:00:12:34:56", broadcast = "127.0.0.1:9" }

[[vm]]
name = "a"
host = "h1"
cpu_mips = 1000
mem_mb = 512
"#;

    #[test]
    fn a_good_file_has_no_problems() {
        let c = Config::parse(Path::new("c.toml"), GOOD).unwrap();
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!(c.hosts.len(), 2);
        assert_eq!(c.vms.len(), 1);
        assert!(matches!(c.hosts[1].power, Some(PowerConfig::Wol { .. })));
    }

    #[test]
    fn unknown_host_names_file_and_line_and_keeps_the_rest() {
        let text =
            format!("{GOOD}\n[[vm]]\nname = \"b\"\nhost = \"nope\"\ncpu_mips = 10\nmem_mb = 10\n");
        let c = Config::parse(Path::new("c.toml"), &text).unwrap();
        assert_eq!(c.vms.len(), 1, "the valid VM is kept");
        let p = &c.problems[0];
        assert_eq!(p.line, 27, "{p}");
        assert!(
            p.to_string()
                .starts_with("c.toml:27: VM \"b\" names unknown host \"nope\""),
            "{p}"
        );
    }

    #[test]
    fn fence_drivers_are_read_and_checked() {
        let text = format!(
            r#"{GOOD}
[[host]]
name = "h3"
cores = 1
core_mips = 1
mem_mb = 1
fence = {{ driver = "command", command = ["/usr/local/bin/fence-bmc", "-v"] }}

[[host]]
name = "h4"
cores = 1
core_mips = 1
mem_mb = 1
fence = {{ driver = "power" }}
"#
        );
        let c = Config::parse(Path::new("c.toml"), &text).unwrap();
        assert_eq!(c.hosts.len(), 3, "h4 is left out: {:?}", c.problems);
        assert_eq!(
            c.hosts[2].fence,
            Some(FenceConfig::Command {
                command: vec!["/usr/local/bin/fence-bmc".into(), "-v".into()],
                timeout_s: 60.0
            })
        );
        assert_eq!(c.problems.len(), 1);
        assert!(
            c.problems[0].message.contains("h4")
                && c.problems[0]
                    .message
                    .contains("needs the host's power driver"),
            "{}",
            c.problems[0]
        );
        let bad = format!(
            "{GOOD}\n[[host]]\nname = \"h3\"\ncores = 1\ncore_mips = 1\nmem_mb = 1\nfence = {{ driver = \"ipmi\" }}\n"
        );
        assert!(Config::parse(Path::new("c.toml"), &bad).is_err());
    }

    #[test]
    fn health_providers_and_section_are_read_and_checked() {
        let text = format!(
            "{GOOD}\n[health]\naction = \"evacuate\"\nrelease_after_s = 60\n\n[[host]]\nname = \"h3\"\ncores = 1\ncore_mips = 1\nmem_mb = 1\nhealth = [ {{ provider = \"command\", command = [\"/bin/true\"] }}, {{ provider = \"hwmon\", root = \"/tmp/x\", max_temp_c = 80 }} ]\n\n[[host]]\nname = \"h4\"\ncores = 1\ncore_mips = 1\nmem_mb = 1\nhealth = [ {{ provider = \"hwmon\" }} ]\n"
        );
        let c = Config::parse(Path::new("c.toml"), &text).unwrap();
        assert_eq!(c.health.action, crate::ha::health::HealthAction::Evacuate);
        assert_eq!(c.health.release_after_s, 60.0);
        assert_eq!(c.hosts.len(), 3, "h4 is left out: {:?}", c.problems);
        assert_eq!(c.hosts[2].health.len(), 2);
        assert_eq!(c.problems.len(), 1);
        assert!(
            c.problems[0].message.contains("h4")
                && c.problems[0].message.contains("max_temp_c or min_fan_rpm"),
            "{}",
            c.problems[0]
        );
        let d = Config::parse(Path::new("c.toml"), GOOD).unwrap();
        assert_eq!(d.health.action, crate::ha::health::HealthAction::Quarantine);
        let bad = format!("{GOOD}\n[health]\naction = \"reboot\"\n");
        assert!(Config::parse(Path::new("c.toml"), &bad).is_err());
        let neg = format!("{GOOD}\n[health]\nrelease_after_s = -1\n");
        let c = Config::parse(Path::new("c.toml"), &neg).unwrap();
        assert!(
            c.problems[0].message.contains("release_after_s"),
            "{:?}",
            c.problems
        );
    }

    #[test]
    fn agent_tls_files_are_loaded_and_names_checked() {
        let dir = tempfile::tempdir().unwrap();
        ferry_transport::tls::generate_certs(dir.path(), &["h1", "sched"]).unwrap();
        let p = |f: &str| dir.path().join(f).display().to_string();
        let with_tls = |cert: &str| {
            GOOD.replace(
                "listen = \"127.0.0.1:7070\"\n",
                &format!(
                    "listen = \"127.0.0.1:7070\"\ntls = {{ cert = {cert:?}, key = {:?}, ca = {:?} }}\n",
                    p("sched.key"),
                    p("ca.pem")
                ),
            )
        };
        let c = Config::parse(Path::new("c.toml"), &with_tls(&p("sched.pem"))).unwrap();
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert!(c.daemon.tls.is_some());

        // A missing file, and a certificate its key does not match.
        let c = Config::parse(Path::new("c.toml"), &with_tls(&p("nope.pem"))).unwrap();
        assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
        let m = &c.problems[0].message;
        assert!(
            m.starts_with("[daemon] tls: loading the TLS files: could not read")
                && m.contains("nope.pem"),
            "{m}"
        );
        let c = Config::parse(Path::new("c.toml"), &with_tls(&p("h1.pem"))).unwrap();
        assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
        assert!(
            c.problems[0].message.contains("invalid TLS configuration"),
            "{:?}",
            c.problems
        );

        // With TLS, an agent host's name must be one a certificate carries.
        let text = with_tls(&p("sched.pem")).replace("name = \"h2\"", "name = \"h 2\"");
        let c = Config::parse(Path::new("c.toml"), &text).unwrap();
        assert_eq!(c.hosts.len(), 1, "{:?}", c.problems);
        assert!(
            c.problems[0]
                .message
                .contains("host \"h 2\" is not a name a TLS certificate can carry"),
            "{:?}",
            c.problems
        );
    }

    #[test]
    fn overlapping_ports_are_reported() {
        let text = GOOD.replace("127.0.0.1:7102", "127.0.0.1:7070");
        let c = Config::parse(Path::new("c.toml"), &text).unwrap();
        assert_eq!(c.problems.len(), 1);
        assert_eq!(c.problems[0].line, 16);
        assert!(c.problems[0]
            .message
            .contains("overlaps the daemon's listen address"));
    }

    #[test]
    fn vm_bigger_than_any_host_is_reported() {
        let text = GOOD.replace("mem_mb = 512", "mem_mb = 9000");
        let c = Config::parse(Path::new("c.toml"), &text).unwrap();
        assert!(c.vms.is_empty());
        assert_eq!(c.problems[0].line, 23);
        assert!(c.problems[0].message.contains("bigger than any host"));
    }

    #[test]
    fn a_bad_policy_and_a_bad_power_driver_are_reported() {
        let text = GOOD
            .replace(
                "listen = \"127.0.0.1:7070\"",
                "listen = \"127.0.0.1:7070\"\npolicy = \"chaos\"",
            )
            .replace("52:54:00:12:34:56", "52:54:00:12:34");
        let c = Config::parse(Path::new("c.toml"), &text).unwrap();
        assert_eq!(c.problems.len(), 2, "{:?}", c.problems);
        assert!(c.problems[0].message.contains("unknown policy \"chaos\""));
        assert!(c.problems[1]
            .message
            .contains("host \"h2\": power driver: bad MAC address"));
        assert_eq!(c.hosts.len(), 1, "the host with a bad driver is left out");
    }

    #[test]
    fn the_packaged_example_is_valid() {
        let text = include_str!("../../../packaging/cluster.toml");
        let c = Config::parse(Path::new("packaging/cluster.toml"), text).unwrap();
        if cfg!(feature = "libvirt") {
            assert!(c.problems.is_empty(), "{:?}", c.problems);
            assert_eq!(c.hosts.len(), 3);
        } else {
            // Without the feature the libvirt hosts are refused, by name.
            assert_eq!(c.problems.len(), 2, "{:?}", c.problems);
            assert!(c.problems[0]
                .message
                .contains("built without libvirt support"));
        }
        assert_eq!(c.vms.len(), 1);
    }

    #[test]
    fn a_contradicting_rule_is_left_out_with_its_line_and_the_rules_named() {
        let text = format!(
            "{GOOD}
[[rule]]
name = \"pin\"
kind = \"must_run_on\"
vms = [\"a\"]
hosts = [\"h1\"]

[[rule]]
name = \"never\"
kind = \"must_not_run_on\"
vms = [\"a\"]
hosts = [\"h1\"]

[[rule]]
name = \"where\"
kind = \"must_run_on\"
vms = [\"a\"]
hosts = [\"h9\"]
"
        );
        let c = Config::parse(Path::new("c.toml"), &text).unwrap();
        assert_eq!(c.rules.len(), 1, "the first rule is kept");
        let p: Vec<String> = c.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            p,
            vec![
                "c.toml:31: rules must_run_on \"pin\" and must_not_run_on \"never\" contradict: no host may run a; the rule is left out",
                "c.toml:37: rule must_run_on \"where\": names unknown host \"h9\"; the rule is left out",
            ]
        );
        let bad =
            format!("{GOOD}\n[[rule]]\nname = \"x\"\nkind = \"together\"\nvms = [\"a\", \"b\"]\n");
        let e = Config::parse(Path::new("c.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("c.toml:27: unknown variant `together`"),
            "{e}"
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let text = GOOD.replace(
            "cores = 2\ncore_mips = 2000\nmem_mb = 4096\nagent = \"127.0.0.1:7102\"",
            "cores = \"two\"",
        );
        let e = Config::parse(Path::new("c.toml"), &text).unwrap_err();
        assert!(e.to_string().starts_with("c.toml:13:"), "{e}");
    }
}
