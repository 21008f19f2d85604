//! `cluster.toml`: the daemon's hosts, VMs, agents and power drivers.
//! Validation reports every problem with the file and line it comes from;
//! the daemon keeps what is valid and serves it.
//!
//! ```toml
//! [daemon]
//! listen = "127.0.0.1:7070"
//! policy = "both"          # balance | power_save | both | manual
//! interval_s = 30
//! # optional planner timers (seconds; defaults 900, 600, 1800):
//! # power_save_duration_s = 900
//! # balance_duration_s = 600
//! # min_move_interval_s = 1800
//!
//! [[host]]
//! name = "h1"
//! cores = 2
//! core_mips = 2000
//! mem_mb = 4096
//! agent = "127.0.0.1:7101"
//! power = { driver = "wol", mac = "52:54:00:12:34:56", broadcast = "192.168.1.255:9" }
//!
//! [[vm]]
//! name = "web"
//! host = "h1"
//! cpu_mips = 1000
//! mem_mb = 512
//! on_evacuate = "migrate"  # or "shutdown"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::model::OnEvacuate;

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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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
    /// Libvirt URI for inventory (feature `libvirt`), e.g. `test:///default`.
    #[serde(default)]
    pub libvirt: Option<String>,
    /// Seconds a host must stay lightly loaded before power save empties
    /// it (default: the planner's, 900).
    #[serde(default)]
    pub power_save_duration_s: Option<f64>,
    /// Seconds a host must stay overloaded before even distribution acts
    /// (default: the planner's, 600).
    #[serde(default)]
    pub balance_duration_s: Option<f64>,
    /// Minimum seconds between two non-urgent moves of the same VM
    /// (default: the planner's, 1800).
    #[serde(default)]
    pub min_move_interval_s: Option<f64>,
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
    /// The host agent's HTTP address.
    pub agent: Option<Spanned<String>>,
    /// Power driver.
    pub power: Option<PowerConfig>,
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    daemon: DaemonSection,
    #[serde(default)]
    host: Vec<HostEntry>,
    #[serde(default)]
    vm: Vec<VmEntry>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Source file.
    pub path: PathBuf,
    /// `[daemon]`.
    pub daemon: DaemonSection,
    /// Valid hosts.
    pub hosts: Vec<HostEntry>,
    /// Valid VMs.
    pub vms: Vec<VmEntry>,
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
            if let Some(agent) = &h.agent {
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
        Ok(Config {
            path: path.to_path_buf(),
            daemon: raw.daemon,
            hosts,
            vms,
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
    fn syntax_errors_name_the_line() {
        let text = GOOD.replace(
            "cores = 2\ncore_mips = 2000\nmem_mb = 4096\nagent = \"127.0.0.1:7102\"",
            "cores = \"two\"",
        );
        let e = Config::parse(Path::new("c.toml"), &text).unwrap_err();
        assert!(e.to_string().starts_with("c.toml:13:"), "{e}");
    }
}
