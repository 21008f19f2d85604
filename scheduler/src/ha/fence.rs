//! Fencing a dead host from outside: where a host has a fence driver, the
//! leader powers it off once its lease expired, and restarts its VMs only
//! after the power-off is confirmed (besides the lease expiry and the
//! hosts' self-fence margin). A fence that fails is logged and retried on
//! every pass, the host's restarts held meanwhile.
//!
//! Drivers (`[[host]] fence = ...` in cluster.toml):
//! - `{ driver = "command", command = ["fence_ipmilan", "-a", "10.0.0.9", ...] }`:
//!   the command (no shell) run with the host's name as its last argument;
//!   exit status 0 confirms the power-off, anything else (or running past
//!   `timeout_s`, default 60) is a failed fence.
//! - `{ driver = "power" }`: the host's power driver powers it off (a
//!   command's `off`, Wake-on-LAN's `off`; the process driver kills and
//!   reaps the host's process, e.g. its agent in tests).
//!
//! Wake-on-LAN alone cannot fence: a host with no fence driver is restarted
//! on its lease expiry and the self-fence margin only.

use std::process::Command;
use std::time::Duration;

use crate::daemon::config::FenceConfig;
use crate::daemon::power::{PowerDriver, PowerError};

/// How one host is fenced.
#[derive(Debug, Clone, PartialEq)]
pub enum Fence {
    /// Run `argv` with the host's name appended; exit 0 confirms.
    Command {
        /// The command (no shell).
        argv: Vec<String>,
        /// Longest it may run; then it is killed and the fence failed.
        timeout: Duration,
    },
    /// The host's power driver's power-off.
    Power,
}

/// Why a fence failed (the host's restarts are held; it is retried).
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The command could not be started.
    #[error("cannot run {command:?}")]
    Spawn {
        /// The argv.
        command: Vec<String>,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The command did not confirm the power-off.
    #[error("{command:?} exited with {status}{}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    NotConfirmed {
        /// The argv.
        command: Vec<String>,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// The command ran too long (killed).
    #[error("{command:?} did not finish within {timeout:?}")]
    Timeout {
        /// The argv.
        command: Vec<String>,
        /// The bound.
        timeout: Duration,
    },
    /// `driver = "power"` on a host without a power driver.
    #[error("the host has no power driver to fence it with")]
    NoPowerDriver,
    /// The power driver's power-off failed.
    #[error("power-off failed")]
    Power(#[from] PowerError),
}

impl Fence {
    /// The driver `cfg` describes; why not when it cannot work (`power`:
    /// the host's power driver config, which `driver = "power"` needs
    /// with a way to power off).
    pub fn from_config(
        cfg: &FenceConfig,
        power: Option<&crate::daemon::config::PowerConfig>,
    ) -> Result<Self, String> {
        use crate::daemon::config::PowerConfig;
        match cfg {
            FenceConfig::Command { command, timeout_s } => {
                if command.is_empty() {
                    return Err("fence command is empty".into());
                }
                if !(timeout_s.is_finite() && *timeout_s > 0.0) {
                    return Err(format!("fence timeout_s {timeout_s} is not positive"));
                }
                Ok(Self::Command {
                    argv: command.clone(),
                    timeout: Duration::from_secs_f64(*timeout_s),
                })
            }
            FenceConfig::Power => match power {
                None => Err("fence driver \"power\" needs the host's power driver".into()),
                Some(PowerConfig::Command { off, .. } | PowerConfig::Wol { off, .. })
                    if off.is_empty() =>
                {
                    Err("fence driver \"power\": the host's power driver has no off command".into())
                }
                Some(_) => Ok(Self::Power),
            },
        }
    }

    /// Fences `host` now; `Ok` once its power-off is confirmed, with what
    /// confirmed it. `power` is the host's power driver.
    pub fn fence(&self, host: &str, power: Option<&dyn PowerDriver>) -> Result<String, FenceError> {
        match self {
            Self::Command { argv, timeout } => {
                let mut command = argv.clone();
                command.push(host.to_owned());
                let (prog, args) = command.split_first().expect("checked non-empty");
                let out = crate::ha::health::run_bounded(Command::new(prog).args(args), *timeout)
                    .map_err(|source| FenceError::Spawn {
                        command: command.clone(),
                        source,
                    })?
                    .ok_or_else(|| FenceError::Timeout {
                        command: command.clone(),
                        timeout: *timeout,
                    })?;
                if !out.status.success() {
                    return Err(FenceError::NotConfirmed {
                        command,
                        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                        status: out.status,
                    });
                }
                Ok(format!("{command:?} exited 0"))
            }
            Self::Power => {
                let driver = power.ok_or(FenceError::NoPowerDriver)?;
                driver.power_off()?;
                Ok(format!("the {} power driver powered it off", driver.name()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::config::PowerConfig;
    use crate::daemon::power::ProcessDriver;

    fn command(script: &str) -> Fence {
        Fence::Command {
            argv: vec!["sh".into(), "-c".into(), script.into(), "fence".into()],
            timeout: Duration::from_secs(20),
        }
    }

    #[test]
    fn a_command_fence_gets_the_host_name_and_its_exit_status_confirms() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("called");
        let ok = command(&format!("echo \"$1\" > {}", log.display()));
        let evidence = ok.fence("h7", None).unwrap();
        assert!(evidence.contains("exited 0"), "{evidence}");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "h7\n");

        let refused = command("echo BMC unreachable >&2; exit 3")
            .fence("h7", None)
            .unwrap_err();
        let text = refused.to_string();
        assert!(
            matches!(refused, FenceError::NotConfirmed { .. }),
            "{refused:?}"
        );
        assert!(
            text.contains("BMC unreachable") && text.contains("h7"),
            "{text}"
        );

        let hung = Fence::Command {
            argv: vec!["sh".into(), "-c".into(), "sleep 30".into()],
            timeout: Duration::from_millis(200),
        };
        assert!(matches!(
            hung.fence("h7", None),
            Err(FenceError::Timeout { .. })
        ));
        let missing = Fence::Command {
            argv: vec!["/nonexistent/fence-agent".into()],
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            missing.fence("h7", None),
            Err(FenceError::Spawn { .. })
        ));
    }

    #[test]
    fn a_power_fence_kills_the_process_drivers_process() {
        let driver = ProcessDriver::new(vec!["sleep".into(), "600".into()]);
        driver.power_on().unwrap();
        let pid = driver.pid().expect("started");
        let evidence = Fence::Power.fence("h1", Some(&driver)).unwrap();
        assert!(evidence.contains("process"), "{evidence}");
        assert_eq!(driver.pid(), None);
        // Killed and reaped: no such process any more.
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still exists"
        );
        assert!(matches!(
            Fence::Power.fence("h1", None),
            Err(FenceError::NoPowerDriver)
        ));
    }

    #[test]
    fn fence_configs_are_checked() {
        let cmd = FenceConfig::Command {
            command: vec![],
            timeout_s: 60.0,
        };
        assert!(Fence::from_config(&cmd, None)
            .unwrap_err()
            .contains("empty"));
        let wol = PowerConfig::Wol {
            mac: "52:54:00:12:34:56".into(),
            broadcast: "127.0.0.1:9".into(),
            off: vec![],
        };
        assert!(Fence::from_config(&FenceConfig::Power, Some(&wol))
            .unwrap_err()
            .contains("no off command"));
        assert!(Fence::from_config(&FenceConfig::Power, None).is_err());
        let process = PowerConfig::Process {
            command: vec!["ferry".into()],
        };
        assert_eq!(
            Fence::from_config(&FenceConfig::Power, Some(&process)),
            Ok(Fence::Power)
        );
    }
}
