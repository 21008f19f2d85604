//! A small blocking QMP client (QEMU Machine Protocol, JSON over a UNIX socket).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// A QMP connection in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `path` (retrying until `timeout` while QEMU creates it),
    /// reads the greeting and enters command mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("connecting to QMP at {}", path.display()))
                }
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            bail!("no QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .context("reading from QMP")?;
        if n == 0 {
            bail!("QMP connection closed");
        }
        serde_json::from_str(&line).with_context(|| format!("parsing QMP message {line:?}"))
    }

    /// Runs a command; returns its `return` value, or its error as an error.
    /// Events arriving meanwhile are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let msg = if arguments.as_object().is_some_and(|o| o.is_empty()) {
            json!({ "execute": command })
        } else {
            json!({ "execute": command, "arguments": arguments })
        };
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .context("writing to QMP")?;
        loop {
            let m = self.read_message()?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(anyhow!("QMP {command} failed: {e}"));
            }
        }
    }

    /// Runs a human monitor (HMP) command and returns its text.
    pub fn hmp(&mut self, command_line: &str) -> Result<String> {
        let r = self.execute(
            "human-monitor-command",
            json!({ "command-line": command_line }),
        )?;
        Ok(r.as_str().unwrap_or_default().to_owned())
    }

    /// Reads `count` guest-physical u64 words at `addr` (via HMP `xp`).
    pub fn read_phys_u64(&mut self, addr: u64, count: usize) -> Result<Vec<u64>> {
        let text = self.hmp(&format!("xp /{count}gx {addr:#x}"))?;
        parse_xp(&text, count)
    }

    /// `query-status`'s `status` (`running`, `paused`, `postmigrate`, `inmigrate`, ...).
    pub fn run_state(&mut self) -> Result<String> {
        let r = self.execute("query-status", json!({}))?;
        Ok(r["status"].as_str().unwrap_or_default().to_owned())
    }

    /// `query-migrate`'s full answer.
    pub fn query_migrate(&mut self) -> Result<Value> {
        self.execute("query-migrate", json!({}))
    }

    /// Polls `query-migrate` until its status is final (`completed`,
    /// `failed`, `cancelled`) or `timeout` passes; returns the last answer.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.query_migrate()?;
            let status = r["status"].as_str().unwrap_or_default();
            if matches!(status, "completed" | "failed" | "cancelled") {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!("migration not finished after {timeout:?}: {r}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Parses the output of HMP `xp /Ngx ADDR` into its `count` words.
pub fn parse_xp(text: &str, count: usize) -> Result<Vec<u64>> {
    let words: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split_once(':').map(|(_, rest)| rest))
        .flat_map(str::split_whitespace)
        .map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing xp output {text:?}"))?;
    if words.len() != count {
        bail!(
            "xp returned {} words, expected {count}: {text:?}",
            words.len()
        );
    }
    Ok(words)
}

/// The workload guest's status block (GUEST.md), read through QMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestStatusWords {
    /// `FERRYGST` when the guest set the block up.
    pub magic: u64,
    /// 0 boot, 1 filling, 2 running.
    pub phase: u64,
    /// Main-loop passes that saw at least 1 ms go by.
    pub heartbeat: u64,
    /// Page writes so far.
    pub pages_dirtied: u64,
    /// The guest's own self-check failures.
    pub verify_errors: u64,
}

/// Reads the guest status block at `0x1000`.
pub fn guest_status(qmp: &mut Qmp) -> Result<GuestStatusWords> {
    let w = qmp.read_phys_u64(0x1000, 4)?;
    let v = qmp.read_phys_u64(0x1070, 1)?;
    Ok(GuestStatusWords {
        magic: w[0],
        phase: w[1],
        heartbeat: w[2],
        pages_dirtied: w[3],
        verify_errors: v[0],
    })
}
