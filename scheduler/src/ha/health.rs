//! Proactive evacuation on hardware warnings: per host, health providers
//! say `ok`, `degraded` or `failed` with their evidence; a degraded host is
//! quarantined (no new VMs) or evacuated (its VMs leave live, through the
//! maintenance evacuation), and released only once healthy for a
//! configured time (hysteresis), as VMware Proactive HA does.
//!
//! Providers:
//! - [`CommandProvider`]: runs a configured command (argv, no shell) that
//!   prints `ok`, `degraded REASON` or `failed REASON` on its first line.
//!   IPMI sensors go through it, e.g. a script around `ipmitool sdr`:
//!
//!   ```sh
//!   #!/bin/sh
//!   # Degraded when any sensor ipmitool does not call "ok" (fans, temps, PSUs).
//!   bad=$(ipmitool -H 10.0.9.1 -U admin -E sdr | awk -F'|' '$3 !~ /ok|ns/ {print $1 $2 $3}')
//!   if [ -n "$bad" ]; then echo "degraded $(echo $bad)"; else echo ok; fi
//!   ```
//! - [`HwmonProvider`]: reads `temp*_input` (millidegrees C) and
//!   `fan*_input` (RPM) under a sysfs hwmon root (default
//!   `/sys/class/hwmon`) against configured limits.
//!
//! [`step`] is the state machine, a pure function of the previous state,
//! one reading and the time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What a provider found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", content = "reason", rename_all = "snake_case")]
pub enum Verdict {
    /// Healthy.
    Ok,
    /// Still working, but warning (a hot CPU, a slow fan): move VMs off.
    Degraded(String),
    /// Failing (or the provider itself could not tell): move VMs off.
    Failed(String),
}

impl Verdict {
    /// Not [`Verdict::Ok`].
    pub fn is_unhealthy(&self) -> bool {
        !matches!(self, Verdict::Ok)
    }

    /// Parse a command's first output line: `ok`, `degraded REASON`,
    /// `failed REASON`.
    pub fn parse(line: &str) -> Result<Verdict, HealthError> {
        let line = line.trim();
        let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let reason = rest.trim().to_owned();
        match word {
            "ok" => Ok(Verdict::Ok),
            "degraded" => Ok(Verdict::Degraded(reason)),
            "failed" => Ok(Verdict::Failed(reason)),
            _ => Err(HealthError::BadOutput(line.to_owned())),
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Ok => write!(f, "ok"),
            Verdict::Degraded(r) => write!(f, "degraded: {r}"),
            Verdict::Failed(r) => write!(f, "failed: {r}"),
        }
    }
}

/// Why a provider could not tell.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The command could not be started.
    #[error("cannot run {command}")]
    Spawn {
        /// argv\[0\].
        command: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The command did not finish in time (it was killed).
    #[error("{command} did not answer within {timeout:?}")]
    Timeout {
        /// argv\[0\].
        command: String,
        /// The limit.
        timeout: Duration,
    },
    /// The command printed something else than `ok`, `degraded ...`, `failed ...`.
    #[error("health command printed {0:?}, not `ok`, `degraded REASON` or `failed REASON`")]
    BadOutput(String),
    /// The command's argv is empty.
    #[error("health command is empty")]
    EmptyCommand,
    /// The hwmon root could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// One provider's reading: its verdict and the evidence behind it (the
/// command's output, the sensor values), logged with every decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reading {
    /// The provider (`command /path/x`, `hwmon /sys/class/hwmon`).
    pub provider: String,
    /// What it found.
    pub verdict: Verdict,
    /// What it saw.
    pub evidence: String,
}

/// Something that can tell whether a host is healthy.
pub trait HealthProvider: Send + Sync {
    /// Names it in logs and readings.
    fn name(&self) -> String;
    /// Check now. A provider that cannot tell returns an error; the caller
    /// counts it as [`Verdict::Failed`] with the error as evidence.
    fn check(&self) -> Result<Reading, HealthError>;
}

/// Runs a command; its first stdout line is the verdict.
#[derive(Debug, Clone)]
pub struct CommandProvider {
    /// argv (no shell).
    pub argv: Vec<String>,
    /// Longest the command may run; then it is killed and the check failed.
    pub timeout: Duration,
}

impl HealthProvider for CommandProvider {
    fn name(&self) -> String {
        format!("command {}", self.argv.join(" "))
    }

    fn check(&self) -> Result<Reading, HealthError> {
        let (prog, args) = self.argv.split_first().ok_or(HealthError::EmptyCommand)?;
        let spawn = |source| HealthError::Spawn {
            command: prog.clone(),
            source,
        };
        let out = run_bounded(Command::new(prog).args(args), self.timeout)
            .map_err(spawn)?
            .ok_or_else(|| HealthError::Timeout {
                command: prog.clone(),
                timeout: self.timeout,
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let first = stdout.lines().next().unwrap_or("");
        let mut evidence = stdout.trim().to_owned();
        if !out.status.success() {
            evidence = format!("{evidence} (exit {})", out.status);
        }
        if !stderr.is_empty() {
            evidence = format!("{evidence} (stderr: {stderr})");
        }
        let verdict =
            Verdict::parse(first).map_err(|_| HealthError::BadOutput(evidence.clone()))?;
        Ok(Reading {
            provider: self.name(),
            verdict,
            evidence,
        })
    }
}

/// Runs `cmd` (stdin closed, stdout and stderr captured) for at most
/// `timeout`: its output, or `None` when it ran longer (it is then killed
/// and reaped).
pub(crate) fn run_bounded(
    cmd: &mut Command,
    timeout: Duration,
) -> std::io::Result<Option<std::process::Output>> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().map(Some)
}

/// Limits for [`HwmonProvider`].
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct HwmonLimits {
    /// Degraded at or above this temperature (°C) on any `temp*_input`.
    pub max_temp_c: Option<f64>,
    /// Degraded below this speed (RPM) on any `fan*_input`.
    pub min_fan_rpm: Option<f64>,
}

/// Reads sysfs hwmon sensors (`ROOT/hwmonN/temp*_input`,
/// `ROOT/hwmonN/fan*_input`) against limits.
#[derive(Debug, Clone)]
pub struct HwmonProvider {
    /// Default `/sys/class/hwmon`; a test points it at a tree of its own.
    pub root: PathBuf,
    /// The limits.
    pub limits: HwmonLimits,
}

impl HwmonProvider {
    /// Every sensor: its label, whether it is a fan, its value (°C or RPM).
    fn sensors(&self) -> Result<Vec<(String, bool, f64)>, HealthError> {
        let read_dir = |p: &Path| {
            std::fs::read_dir(p).map_err(|source| HealthError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let mut out = Vec::new();
        let mut chips: Vec<PathBuf> = read_dir(&self.root)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        chips.sort();
        for chip in chips {
            let Ok(files) = read_dir(&chip) else { continue };
            let chip_name = std::fs::read_to_string(chip.join("name"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| {
                    chip.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                });
            let mut names: Vec<String> = files
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    (n.starts_with("temp") || n.starts_with("fan")) && n.ends_with("_input")
                })
                .collect();
            names.sort();
            for n in names {
                let Ok(text) = std::fs::read_to_string(chip.join(&n)) else {
                    continue;
                };
                let Ok(raw) = text.trim().parse::<f64>() else {
                    continue;
                };
                let label = std::fs::read_to_string(chip.join(n.replace("_input", "_label")))
                    .map(|s| format!("{chip_name}/{}", s.trim()))
                    .unwrap_or_else(|_| format!("{chip_name}/{n}"));
                let fan = n.starts_with("fan");
                out.push((label, fan, if fan { raw } else { raw / 1000.0 }));
            }
        }
        Ok(out)
    }
}

impl HealthProvider for HwmonProvider {
    fn name(&self) -> String {
        format!("hwmon {}", self.root.display())
    }

    fn check(&self) -> Result<Reading, HealthError> {
        let sensors = self.sensors()?;
        let mut bad = Vec::new();
        let mut seen = Vec::new();
        for (label, fan, v) in &sensors {
            if *fan {
                seen.push(format!("{label}={v:.0}rpm"));
                if let Some(min) = self.limits.min_fan_rpm {
                    if *v < min {
                        bad.push(format!("{label} {v:.0} RPM < {min:.0}"));
                    }
                }
            } else {
                seen.push(format!("{label}={v:.1}C"));
                if let Some(max) = self.limits.max_temp_c {
                    if *v >= max {
                        bad.push(format!("{label} {v:.1} C >= {max:.1}"));
                    }
                }
            }
        }
        let verdict = if bad.is_empty() {
            Verdict::Ok
        } else {
            Verdict::Degraded(bad.join(", "))
        };
        Ok(Reading {
            provider: self.name(),
            verdict,
            evidence: if seen.is_empty() {
                "no sensors".into()
            } else {
                seen.join(" ")
            },
        })
    }
}

/// Check every provider; an error counts as [`Verdict::Failed`]. The
/// worst verdict wins (failed over degraded over ok).
pub fn check_all(providers: &[Box<dyn HealthProvider>]) -> Vec<Reading> {
    providers
        .iter()
        .map(|p| {
            p.check().unwrap_or_else(|e| Reading {
                provider: p.name(),
                verdict: Verdict::Failed(crate::daemon::agent::error_chain(&e)),
                evidence: crate::daemon::agent::error_chain(&e),
            })
        })
        .collect()
}

/// The worst of `readings` (none: ok).
pub fn worst(readings: &[Reading]) -> Option<&Reading> {
    let rank = |v: &Verdict| match v {
        Verdict::Ok => 0,
        Verdict::Degraded(_) => 1,
        Verdict::Failed(_) => 2,
    };
    readings.iter().max_by_key(|r| rank(&r.verdict))
}

/// What a degraded host gets (per cluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthAction {
    /// No new VMs placed on it; its VMs stay.
    #[default]
    Quarantine,
    /// Its VMs leave live (the maintenance evacuation), and come back on release.
    Evacuate,
}

/// A host's health state.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum HealthState {
    /// Healthy (or never checked).
    #[default]
    Healthy,
    /// Unhealthy: quarantined or evacuated.
    Degraded {
        /// Since when (the daemon's clock, seconds).
        since: f64,
        /// The reading that degraded it (or the last unhealthy one).
        reading: Reading,
    },
    /// Healthy again since `since`, still held until the release time passed.
    Recovering {
        /// Healthy since (seconds).
        since: f64,
        /// The reading that had degraded it.
        last_bad: Reading,
    },
}

impl HealthState {
    /// Quarantined or evacuated now.
    pub fn held(&self) -> bool {
        !matches!(self, HealthState::Healthy)
    }
}

/// A host's hardware health as the daemon tracks it (and the API shows it).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HardwareHealth {
    /// The state.
    pub state: HealthState,
    /// The last check's readings, one per provider (none: no providers).
    pub readings: Vec<Reading>,
    /// The health check put the host into maintenance (evacuate), so its
    /// release takes it out again; an operator's maintenance is left alone.
    pub evacuated: bool,
}

/// A change [`step`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Healthy -> degraded: quarantine or evacuate, with this evidence.
    Degrade(Reading),
    /// Held long enough healthy: release.
    Release {
        /// Seconds it had been healthy.
        healthy_for: f64,
    },
}

/// One check: the next state, and the change to act on, if any. An
/// unhealthy reading degrades (or keeps degraded, restarting the release
/// clock); a healthy one starts the release clock, and releases once it
/// ran `release_after_s`.
pub fn step(
    state: &HealthState,
    worst: Option<&Reading>,
    now: f64,
    release_after_s: f64,
) -> (HealthState, Option<Transition>) {
    let bad = worst.filter(|r| r.verdict.is_unhealthy());
    match (state, bad) {
        (HealthState::Healthy, None) => (HealthState::Healthy, None),
        (HealthState::Healthy, Some(r)) => (
            HealthState::Degraded {
                since: now,
                reading: r.clone(),
            },
            Some(Transition::Degrade(r.clone())),
        ),
        (HealthState::Degraded { since, .. }, Some(r)) => (
            HealthState::Degraded {
                since: *since,
                reading: r.clone(),
            },
            None,
        ),
        (HealthState::Recovering { .. }, Some(r)) => (
            HealthState::Degraded {
                since: now,
                reading: r.clone(),
            },
            None,
        ),
        (HealthState::Degraded { reading, .. }, None) => {
            if release_after_s <= 0.0 {
                (
                    HealthState::Healthy,
                    Some(Transition::Release { healthy_for: 0.0 }),
                )
            } else {
                (
                    HealthState::Recovering {
                        since: now,
                        last_bad: reading.clone(),
                    },
                    None,
                )
            }
        }
        (HealthState::Recovering { since, last_bad }, None) => {
            let healthy_for = now - since;
            if healthy_for >= release_after_s {
                (
                    HealthState::Healthy,
                    Some(Transition::Release { healthy_for }),
                )
            } else {
                (
                    HealthState::Recovering {
                        since: *since,
                        last_bad: last_bad.clone(),
                    },
                    None,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(v: Verdict) -> Reading {
        Reading {
            provider: "test".into(),
            verdict: v,
            evidence: "seen".into(),
        }
    }

    #[test]
    fn parses_verdicts() {
        assert_eq!(Verdict::parse("ok\n").unwrap(), Verdict::Ok);
        assert_eq!(
            Verdict::parse("degraded fan 2 slow").unwrap(),
            Verdict::Degraded("fan 2 slow".into())
        );
        assert_eq!(
            Verdict::parse("failed PSU1").unwrap(),
            Verdict::Failed("PSU1".into())
        );
        assert!(Verdict::parse("fine").is_err());
        assert!(Verdict::parse("").is_err());
    }

    #[test]
    fn degrades_at_once_and_releases_only_after_holding_healthy() {
        let ok = reading(Verdict::Ok);
        let bad = reading(Verdict::Degraded("hot".into()));
        let (s, t) = step(&HealthState::Healthy, Some(&ok), 0.0, 60.0);
        assert_eq!((s.clone(), t), (HealthState::Healthy, None));
        let (s, t) = step(&s, Some(&bad), 10.0, 60.0);
        assert_eq!(t, Some(Transition::Degrade(bad.clone())));
        assert!(s.held());
        // Healthy again: held, the clock starts.
        let (s, t) = step(&s, Some(&ok), 20.0, 60.0);
        assert_eq!(t, None);
        assert!(matches!(s, HealthState::Recovering { since, .. } if since == 20.0));
        // A relapse before the time is up restarts it, no new transition.
        let (s, t) = step(&s, Some(&bad), 50.0, 60.0);
        assert_eq!(t, None);
        assert!(matches!(s, HealthState::Degraded { since, .. } if since == 50.0));
        let (s, _) = step(&s, Some(&ok), 60.0, 60.0);
        let (s, t) = step(&s, Some(&ok), 119.0, 60.0);
        assert_eq!(t, None);
        assert!(s.held());
        let (s, t) = step(&s, Some(&ok), 120.0, 60.0);
        assert_eq!(t, Some(Transition::Release { healthy_for: 60.0 }));
        assert_eq!(s, HealthState::Healthy);
        // No readings (no providers) counts as healthy.
        assert_eq!(step(&s, None, 130.0, 60.0).1, None);
    }

    #[test]
    fn zero_hold_releases_on_the_first_healthy_reading() {
        let bad = reading(Verdict::Failed("psu".into()));
        let (s, _) = step(&HealthState::Healthy, Some(&bad), 0.0, 0.0);
        let (s, t) = step(&s, Some(&reading(Verdict::Ok)), 1.0, 0.0);
        assert_eq!(t, Some(Transition::Release { healthy_for: 0.0 }));
        assert_eq!(s, HealthState::Healthy);
    }

    #[test]
    fn worst_reading_wins() {
        let r = [
            reading(Verdict::Ok),
            reading(Verdict::Failed("x".into())),
            reading(Verdict::Degraded("y".into())),
        ];
        assert_eq!(worst(&r).unwrap().verdict, Verdict::Failed("x".into()));
        assert!(worst(&[]).is_none());
    }

    fn script(dir: &Path, name: &str, body: &str) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        vec![p.display().to_string()]
    }

    fn command(argv: Vec<String>) -> CommandProvider {
        CommandProvider {
            argv,
            timeout: Duration::from_secs(20),
        }
    }

    #[test]
    fn command_provider_reads_real_scripts() {
        let dir = tempfile::tempdir().unwrap();
        let ok = command(script(dir.path(), "ok", "echo ok"))
            .check()
            .unwrap();
        assert_eq!(ok.verdict, Verdict::Ok);
        let r = command(script(
            dir.path(),
            "ipmi",
            "echo 'degraded FAN2 | 1200 RPM | cr'\necho 'FAN2 | 1200 RPM | cr'",
        ))
        .check()
        .unwrap();
        assert_eq!(r.verdict, Verdict::Degraded("FAN2 | 1200 RPM | cr".into()));
        assert!(r.evidence.contains("FAN2 | 1200 RPM | cr\nFAN2"), "{r:?}");
        let r = command(script(
            dir.path(),
            "failed",
            "echo failed PSU1 lost; exit 3",
        ))
        .check()
        .unwrap();
        assert_eq!(r.verdict, Verdict::Failed("PSU1 lost".into()));
        assert!(r.evidence.contains("exit"), "{r:?}");
        let e = command(script(dir.path(), "junk", "echo all good"))
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("all good"), "{e}");
        let e = command(vec![dir.path().join("absent").display().to_string()])
            .check()
            .unwrap_err();
        assert!(matches!(e, HealthError::Spawn { .. }), "{e}");
        let slow = CommandProvider {
            argv: script(dir.path(), "slow", "sleep 30; echo ok"),
            timeout: Duration::from_millis(300),
        };
        assert!(matches!(
            slow.check().unwrap_err(),
            HealthError::Timeout { .. }
        ));
        // check_all turns errors into failed verdicts with the error as evidence.
        let all = check_all(&[Box::new(command(script(dir.path(), "bad", "echo meh")))]);
        assert!(matches!(&all[0].verdict, Verdict::Failed(e) if e.contains("meh")));
    }

    fn sysfs(root: &Path, chip: &str, name: &str, files: &[(&str, &str)]) {
        let d = root.join(chip);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
        for (f, v) in files {
            std::fs::write(d.join(f), format!("{v}\n")).unwrap();
        }
    }

    #[test]
    fn hwmon_provider_reads_a_sysfs_tree_against_limits() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        sysfs(
            root,
            "hwmon0",
            "coretemp",
            &[
                ("temp1_input", "45000"),
                ("temp1_label", "Package id 0"),
                ("temp2_input", "52000"),
                ("temp2_crit", "100000"),
            ],
        );
        sysfs(root, "hwmon1", "nct6775", &[("fan1_input", "1800")]);
        let p = |max_temp_c, min_fan_rpm| HwmonProvider {
            root: root.to_path_buf(),
            limits: HwmonLimits {
                max_temp_c,
                min_fan_rpm,
            },
        };
        let r = p(Some(80.0), Some(500.0)).check().unwrap();
        assert_eq!(r.verdict, Verdict::Ok, "{r:?}");
        assert!(r.evidence.contains("coretemp/Package id 0=45.0C"), "{r:?}");
        assert!(r.evidence.contains("nct6775/fan1_input=1800rpm"), "{r:?}");
        let r = p(Some(50.0), None).check().unwrap();
        assert_eq!(
            r.verdict,
            Verdict::Degraded("coretemp/temp2_input 52.0 C >= 50.0".into())
        );
        let r = p(None, Some(2000.0)).check().unwrap();
        assert!(
            matches!(&r.verdict, Verdict::Degraded(w) if w.contains("fan1_input 1800 RPM < 2000"))
        );
        // The sensor cools: healthy again.
        std::fs::write(root.join("hwmon0/temp2_input"), "40000\n").unwrap();
        assert_eq!(p(Some(50.0), None).check().unwrap().verdict, Verdict::Ok);
        let gone = HwmonProvider {
            root: root.join("absent"),
            limits: HwmonLimits {
                max_temp_c: Some(1.0),
                min_fan_rpm: None,
            },
        };
        assert!(matches!(gone.check(), Err(HealthError::Read { .. })));
    }
}
