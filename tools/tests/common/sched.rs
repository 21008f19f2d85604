//! The scheduler daemon as a real process, for the daemon tests against
//! real agents (`sched_api.rs`, `sched_e2e.rs`): `ferry sched daemon` on
//! loopback, started on a configuration `ferry sched daemon --check`
//! accepts, asked over its HTTP API, and killed by PID on drop together
//! with every agent its `process` power driver started (a daemon killed
//! with SIGKILL cannot stop them itself).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_e2e::process::ProcessGuard;
use ferry_scheduler::daemon::api::{HostView, RoundView};
use ferry_scheduler::daemon::client::{JsonClient, Method};
use ferry_scheduler::daemon::protocol::Done;

use super::FERRY;

/// Each call's bound: an evacuation round moves real guests.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// A loopback address with a free port.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], super::free_port()))
}

/// Polls `f` every 100 ms until it gives a value, at most `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Live PIDs whose parent is `parent`, with their command lines.
pub fn children(parent: u32) -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "pid (comm) S ppid ...": comm may hold spaces, so split after ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let mut f = rest.split(' ');
        let state = f.next()?;
        let ppid: u32 = f.next()?.parse().ok()?;
        if ppid != parent || state == "Z" {
            return None;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        Some((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")))
    })
    .collect()
}

fn kill(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a PID we found as a child of our own daemon and
    // a constant signal; no memory is shared.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// A `ferry sched daemon` process whose timer is set to a day: rounds run
/// when a test asks (`POST /v1/round`), so every step is explicit.
pub struct SchedDaemon {
    pub api: SocketAddr,
    pub proc: ProcessGuard,
    pub log: PathBuf,
}

impl Drop for SchedDaemon {
    fn drop(&mut self) {
        for (child, _) in children(self.proc.pid()) {
            kill(child);
        }
        self.proc.kill();
    }
}

impl SchedDaemon {
    /// Writes `dir/NAME.toml` (`[daemon]` listening on a free port with
    /// the timer at a day, then the `daemon` lines, then `rest`: hosts, VMs,
    /// other sections), checks it with `--check`, starts the daemon
    /// (logging to `dir/NAME.log`) and waits for its API.
    pub fn start(dir: &Path, name: &str, daemon: &str, rest: &str) -> Result<SchedDaemon> {
        let api = free_addr();
        let toml = format!("[daemon]\nlisten = \"{api}\"\ninterval_s = 86400\n{daemon}\n{rest}");
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, &toml).context("write the configuration")?;
        let check = Command::new(FERRY)
            .args(["sched", "daemon", "--check", "--config"])
            .arg(&config)
            .output()
            .context("ferry sched daemon --check")?;
        if !check.status.success() {
            bail!(
                "--check refused\n{toml}\n{}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let log = dir.join(format!("{name}.log"));
        let proc = ProcessGuard::spawn(
            name,
            Command::new(FERRY)
                .args(["sched", "daemon", "--config"])
                .arg(&config)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1"),
            &log,
        )?;
        let mut d = SchedDaemon { api, proc, log };
        wait_for("the daemon's API", Duration::from_secs(30), || {
            if !d.proc.is_running() {
                return Some(Err(anyhow::anyhow!("the daemon exited: {}", d.log_text())));
            }
            d.call::<Vec<HostView>>(Method::Get, "/v1/hosts")
                .ok()
                .map(|_| Ok(()))
        })??;
        Ok(d)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<T, String> {
        self.call_with::<Done, T>(method, path, None)
    }

    pub fn call_with<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, String> {
        JsonClient::new(&self.api.to_string(), Some(CALL_TIMEOUT))
            .call::<B, T>(method, path, body)
            .map_err(|e| e.to_string())
    }

    pub fn round(&self) -> Result<RoundView, String> {
        self.call(Method::Post, "/v1/round")
    }

    pub fn hosts(&self) -> Vec<HostView> {
        self.call(Method::Get, "/v1/hosts").expect("GET /v1/hosts")
    }

    /// `GET /metrics` (plain text), or why it could not be read.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut s = match std::net::TcpStream::connect(self.api) {
            Ok(s) => s,
            Err(e) => return format!("cannot connect: {e}"),
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let _ = write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.api
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// One counter of `GET /metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let text = self.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    /// The agent process the daemon's power driver runs for `host`.
    pub fn agent_pid(&self, host: &str) -> Option<u32> {
        let needle = format!(" agent --host {host} ");
        children(self.proc.pid())
            .into_iter()
            .find(|(_, cmd)| cmd.contains(&needle))
            .map(|(pid, _)| pid)
    }
}
