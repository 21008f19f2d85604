//! Starting stock QEMU with the workload guest, for tests and benchmarks.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{ProcessError, ProcessGuard};
use crate::qmp::{guest_status, Qmp, QmpError};

/// What went wrong starting QEMU or waiting for its guest.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The process did not start.
    #[error("starting QEMU")]
    Start(#[source] ProcessError),
    /// Its QMP socket could not be reached or answered wrongly.
    #[error("QEMU's QMP (log {log})")]
    Qmp {
        /// QEMU's log file.
        log: PathBuf,
        /// Why.
        #[source]
        source: QmpError,
    },
    /// The guest did not reach its dirty loop in time.
    #[error("guest not running after {timeout:?}: {status}; log {log}")]
    NotRunning {
        /// How long it waited.
        timeout: Duration,
        /// The guest's last status block.
        status: String,
        /// QEMU's log file.
        log: PathBuf,
    },
}

/// Why QEMU tests cannot run here, if they cannot (for a loud SKIP line).
pub fn qemu_unavailable() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm is missing".into());
    }
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()))
        .unwrap_or(false);
    if !found {
        return Some(
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)".into(),
        );
    }
    None
}

/// A QEMU process running (or waiting for) the workload guest, with QMP.
#[derive(Debug)]
pub struct QemuGuest {
    /// The process (killed on drop).
    pub process: ProcessGuard,
    /// Its QMP connection.
    pub qmp: Qmp,
    /// Its log file.
    pub log: PathBuf,
}

/// How to start one QEMU.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The workload guest ELF.
    pub kernel: PathBuf,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// Guest command line.
    pub append: String,
    /// `Some(uri)`: start with `-incoming URI` (e.g. `defer`).
    pub incoming: Option<String>,
    /// vCPUs (`-smp`).
    pub cpus: u32,
}

impl QemuGuest {
    /// Starts QEMU named `name` with files (QMP socket, log) in `dir`.
    pub fn start(name: &str, cfg: &QemuConfig, dir: &Path) -> Result<QemuGuest, QemuError> {
        let qmp_path = dir.join(format!("{name}-qmp.sock"));
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "kvm", "-smp"])
            .arg(cfg.cpus.max(1).to_string())
            .arg("-m")
            .arg(cfg.mem_mib.to_string())
            .arg("-kernel")
            .arg(&cfg.kernel)
            .arg("-append")
            .arg(&cfg.append)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(["-display", "none", "-nodefaults", "-serial", "none"]);
        if let Some(uri) = &cfg.incoming {
            cmd.arg("-incoming").arg(uri);
        }
        let process = ProcessGuard::spawn(name, &mut cmd, &log).map_err(QemuError::Start)?;
        let qmp =
            Qmp::connect(&qmp_path, Duration::from_secs(20)).map_err(|source| QemuError::Qmp {
                log: log.clone(),
                source,
            })?;
        Ok(QemuGuest { process, qmp, log })
    }

    /// Waits until the guest runs its dirty loop (phase 2) with a heartbeat
    /// of at least `min_heartbeat`; returns that heartbeat.
    pub fn wait_running(
        &mut self,
        min_heartbeat: u64,
        timeout: Duration,
    ) -> Result<u64, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = guest_status(&mut self.qmp).map_err(|source| QemuError::Qmp {
                log: self.log.clone(),
                source,
            })?;
            if s.phase == 2 && s.heartbeat >= min_heartbeat {
                return Ok(s.heartbeat);
            }
            if Instant::now() > deadline {
                return Err(QemuError::NotRunning {
                    timeout,
                    status: format!("{s:?}"),
                    log: self.log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
