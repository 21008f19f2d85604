//! `--log-format` (issue 15, metrics and logs): `json` writes one JSON
//! object per log line, for log collectors; `text` (the default) writes no
//! ANSI colour codes when standard error is not a terminal. The logs come
//! from a real `ferry sched daemon` whose one agent does not answer: it
//! warns on every inventory round.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::sched::{free_addr, wait_for};
use common::FERRY;
use ferry_e2e::process::ProcessGuard;
use serde::Deserialize;

/// One line of `--log-format json` (tracing-subscriber's JSON layout).
#[derive(Debug, Deserialize)]
struct JsonLine {
    level: String,
    target: String,
    fields: JsonFields,
}

#[derive(Debug, Deserialize)]
struct JsonFields {
    message: String,
}

/// Runs the daemon with `flags` (stderr to a file: not a terminal) until
/// its log holds a warning about the unreachable agent, and returns the
/// log.
fn daemon_log(dir: &std::path::Path, name: &str, flags: &[&str]) -> Result<String> {
    let config = dir.join(format!("{name}.toml"));
    // The agent's address: a port nothing listens on.
    std::fs::write(
        &config,
        format!(
            "[daemon]\nlisten = \"{}\"\npolicy = \"manual\"\ninterval_s = 1\n\n\
             [[host]]\nname = \"h1\"\ncores = 2\ncore_mips = 2000\nmem_mb = 4096\nagent = \"{}\"\n",
            free_addr(),
            free_addr()
        ),
    )?;
    let log = dir.join(format!("{name}.log"));
    let mut cmd = Command::new(FERRY);
    cmd.args(["sched", "daemon", "--config"])
        .arg(&config)
        .args(["--log", "warn"])
        .args(flags)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
    let mut proc = ProcessGuard::spawn(name, &mut cmd, &log)?;
    let text = wait_for("a warning in the log", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.contains("inventory failed") || !proc.is_running()).then_some(text)
    })?;
    proc.kill();
    if !text.contains("inventory failed") {
        bail!("the daemon exited without the warning:\n{text}");
    }
    Ok(text)
}

#[test]
fn json_logs_are_one_object_per_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let text = daemon_log(dir.path(), "json", &["--log-format", "json"])?;
    let lines: Vec<JsonLine> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON log line: {l}")))
        .collect::<Result<_>>()?;
    let warning = lines
        .iter()
        .find(|l| l.fields.message.contains("inventory failed"))
        .context("no inventory warning")?;
    if warning.level != "WARN" || !warning.target.starts_with("ferry_scheduler") {
        bail!("unexpected warning line: {warning:?}");
    }
    Ok(())
}

#[test]
fn text_logs_have_no_colour_codes_off_a_terminal() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let text = daemon_log(dir.path(), "text", &[])?;
    if text.contains('\u{1b}') {
        bail!("ANSI escape codes in a log written to a file:\n{text:?}");
    }
    if !text
        .lines()
        .any(|l| l.contains("WARN") && l.contains("inventory failed"))
    {
        bail!("no plain WARN line:\n{text}");
    }
    Ok(())
}
