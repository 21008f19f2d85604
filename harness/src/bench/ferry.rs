//! ferry's side: three CLI processes, so each side's CPU time is measured
//! per process like QEMU's: `ferry vm run --api` (source, runs the guest
//! with the same command line QEMU's gets), `ferry vm receive`
//! (destination; `--mem` when the row prepares destinations; behind the
//! shaped link on such rows) and `ferry migrate --json` (the client that
//! starts the migration and streams its events; its CPU is counted with
//! the source's).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::process::ProcessGuard;
use serde::Deserialize;
use serde_json::Value;

use crate::bench::error::BenchError;
use crate::bench::guest_probe::StaticDigest;
use crate::bench::matrix::{DstMemory, FerryProfile, Profile, Workload};
use crate::bench::outcome::{BytesLeft, RunOutcome, RunStatus};
use crate::bench::procfs;
use crate::bench::qemu::error_chain;
use crate::bench::run_common::{self, Baseline, EngineProcess, RunContext};
use crate::bench::settings::RunSettings;
use crate::bench::watch::Watch;

/// The `ferry migrate` flag a profile needs (`None` for the defaults: the
/// default lane count, `ferry_transport::default_lane_count()`).
pub fn profile_flag(p: FerryProfile) -> Option<&'static [&'static str]> {
    match p {
        FerryProfile::Default => None,
        FerryProfile::OneLane => Some(&["--lanes", "1"]),
        FerryProfile::NoCompress => Some(&["--no-compress"]),
        FerryProfile::NoDelta => Some(&["--no-delta"]),
        FerryProfile::AutoConverge => Some(&["--converge", "auto-converge"]),
        FerryProfile::DirtyLimit => Some(&["--converge", "dirty-limit"]),
    }
}

/// Why ferry's side cannot run a profile (its binary or a flag missing),
/// checked once per session from `--help`.
pub fn unsupported(s: &RunSettings, p: FerryProfile) -> Option<String> {
    let help = |args: &[&str]| -> Option<String> {
        let o = Command::new(&s.ferry_bin)
            .args(args)
            .arg("--help")
            .output()
            .ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let Some(migrate) = help(&["migrate"]) else {
        return Some(format!(
            "{} has no `migrate` command (not built yet?)",
            s.ferry_bin.display()
        ));
    };
    for sub in [["vm", "run"], ["vm", "receive"]] {
        if help(&sub).is_none() {
            return Some(format!(
                "{} has no `{}` command",
                s.ferry_bin.display(),
                sub.join(" ")
            ));
        }
    }
    if let Some(flag) = profile_flag(p) {
        if !migrate.contains(flag[0]) {
            return Some(format!("`ferry migrate` has no {} option yet", flag[0]));
        }
    }
    None
}

/// Whether `ferry vm receive` takes `--mem` (prepare memory before the
/// source connects).
fn receive_prepares_memory(s: &RunSettings) -> bool {
    Command::new(&s.ferry_bin)
        .args(["vm", "receive", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--mem"))
}

/// Runs one ferry migration of `w` with profile `p`.
pub fn run(ctx: &RunContext<'_>, w: &Workload, p: FerryProfile, repeat: u32) -> RunOutcome {
    let mut out = RunOutcome::new(
        Profile::Ferry(p),
        *w,
        repeat,
        ctx.settings.max_downtime_ms,
        RunStatus::Completed,
    );
    if let Err(e) = run_inner(ctx, w, p, &mut out) {
        out.status = match e {
            BenchError::Deadline(..) => RunStatus::NotConverged(e.to_string()),
            e => RunStatus::Failed(error_chain(&e)),
        };
    }
    out
}

/// One stdout line of `ferry migrate`, with when it arrived.
struct Line {
    t_ms: f64,
    json: Option<MigrateLine>,
    text: String,
}

fn run_inner(
    ctx: &RunContext<'_>,
    w: &Workload,
    p: FerryProfile,
    out: &mut RunOutcome,
) -> Result<(), BenchError> {
    let s = ctx.settings;
    let src_sock = s.workdir.join("ferry-src.sock");
    let dst_sock = s.workdir.join("ferry-dst.sock");
    let _ = std::fs::remove_file(&src_sock);
    let _ = std::fs::remove_file(&dst_sock);
    let mut cmd = Command::new(&s.ferry_bin);
    // The very command line QEMU's guest gets.
    cmd.args(["vm", "run", "--quiet", "--mem"])
        .arg(format!("{}M", w.mem_bytes >> 20))
        .arg("--cpus")
        .arg(w.cpus.max(1).to_string())
        .arg("--append")
        .arg(format!("{} tsc_khz={}", w.guest_args(), s.tsc_khz))
        .arg("--api")
        .arg(&src_sock);
    if s.custom_kernel {
        cmd.arg("--kernel").arg(&s.kernel);
    }
    if p.dirty_ring() {
        cmd.args(["--dirty-log", "ring"]);
    }
    let mut src = EngineProcess::spawn("ferry vm run (source)", "ferry-src", &mut cmd, &s.workdir)?;
    let src_pid = src.pid();
    run_common::wait_guest_running(
        src_pid,
        w.mem_bytes,
        RunSettings::boot_timeout(w.mem_bytes),
        Duration::from_secs(1),
        || src.check_running(),
    )?;
    wait_socket(&src_sock, &mut src, Duration::from_secs(30))?;
    let before = StaticDigest::of_source(src_pid, w.mem_bytes, w.rate.dirties());
    let port = run_common::free_port()?;
    let to = format!("{}:{port}", ctx.dst_host());
    let mut cmd = Command::new(&s.ferry_bin);
    // Loopback benchmark: plaintext, asked for by name (TLS is measured by
    // the transport benchmarks).
    cmd.args([
        "vm",
        "receive",
        "--quiet",
        "--insecure",
        "--listen",
        &to,
        "--api",
    ])
    .arg(&dst_sock);
    if w.dst_memory == DstMemory::Prepared {
        // Allocate and populate the destination's memory up front, as
        // QEMU's destination gets `-mem-prealloc`.
        if !receive_prepares_memory(s) {
            return Err(BenchError::Engine(
                "`ferry vm receive` has no --mem: its destination cannot be prepared like QEMU's"
                    .into(),
            ));
        }
        cmd.arg("--mem").arg(format!("{}M", w.mem_bytes >> 20));
    }
    ctx.enter_dst(&mut cmd);
    let mut dst = EngineProcess::spawn(
        "ferry vm receive (destination)",
        "ferry-dst",
        &mut cmd,
        &s.workdir,
    )?;
    let dst_pid = dst.pid();
    wait_socket(&dst_sock, &mut dst, RunSettings::boot_timeout(w.mem_bytes))?;

    let deadline = s.deadline_for(w);
    let mut cmd = Command::new(&s.ferry_bin);
    cmd.args(["migrate", "--json", "--api"])
        .arg(&src_sock)
        .args(["--to", &to, "--insecure", "--max-downtime-ms"])
        .arg(s.max_downtime_ms.to_string())
        .arg("--deadline-s")
        .arg(deadline.as_secs().to_string());
    if let Some(cap) = w.cap_bytes_per_sec {
        cmd.arg("--max-bandwidth").arg(cap.to_string());
    }
    if let Some(flag) = profile_flag(p) {
        cmd.args(flag);
    }
    let migrate_log = s.workdir.join("ferry-migrate.log");
    let errfile = std::fs::File::create(&migrate_log)
        .map_err(|e| BenchError::Spawn("ferry migrate".into(), e))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(errfile);
    run_common::die_with_parent(&mut cmd);

    let base = Baseline::take(ctx, src_pid, dst_pid);
    let t0 = Instant::now();
    let watch = Watch::start(t0, src_pid, dst_pid, w.mem_bytes);
    let mut child = cmd
        .spawn()
        .map_err(|e| BenchError::Spawn("ferry migrate".into(), e))?;
    let stdout = child.stdout.take();
    let client = ProcessGuard::adopt("ferry-migrate", child);
    let client_pid = client.pid();
    let (tx, rx) = mpsc::channel::<Line>();
    if let Some(stdout) = stdout {
        std::thread::spawn(move || {
            for text in BufReader::new(stdout).lines().map_while(Result::ok) {
                let line = Line {
                    t_ms: t0.elapsed().as_secs_f64() * 1e3,
                    json: serde_json::from_str(&text).ok(),
                    text,
                };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    // ferry gives up by itself at the deadline; the harness allows 15 s
    // more before it calls the client hung.
    let hard_deadline = deadline + Duration::from_secs(15);
    let mut summary: Option<Value> = None;
    let mut failure: Option<BenchError> = None;
    let mut link_end = None;
    let mut last_text = String::new();
    loop {
        let left = hard_deadline.saturating_sub(t0.elapsed());
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => {
                let Some(parsed) = line.json else {
                    last_text = line.text;
                    continue;
                };
                record_event(&mut out.bytes_left, &parsed, line.t_ms, w.mem_bytes);
                match parsed {
                    MigrateLine::Summary { summary: sum } if summary.is_none() => {
                        out.engine_done_ms = Some(line.t_ms);
                        link_end = ctx.link_tx_bytes();
                        summary = Some(sum);
                    }
                    MigrateLine::Abandoned { reason } => {
                        failure = Some(BenchError::Deadline(
                            deadline.as_secs(),
                            format!("ferry abandoned: {reason}"),
                        ));
                    }
                    _ => {}
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break, // client exited
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if t0.elapsed() >= hard_deadline {
                    failure = Some(BenchError::Deadline(
                        deadline.as_secs(),
                        "ferry migrate did not finish".into(),
                    ));
                    break;
                }
            }
        }
    }
    // The client has exited but is not reaped yet: its CPU time is still
    // in /proc.
    let client_cpu = procfs::process_cpu_secs(client_pid).unwrap_or(0.0);
    drop(client);
    if summary.is_some() {
        // The total time ends when the watch sees the guest run on the
        // destination.
        watch.wait_dst_running(Duration::from_secs(10));
    }
    let log = watch.finish();
    run_common::fill_from_watch(out, &log, &base, link_end, client_cpu);
    let Some(sum) = summary else {
        if let Some(f) = failure {
            return Err(f);
        }
        let err = run_common::log_tail(&migrate_log);
        return Err(BenchError::Engine(format!(
            "ferry migrate ended without a summary: {err} {last_text}"
        )));
    };
    let figures = SummaryFigures::deserialize(&sum)
        .map_err(|e| BenchError::Engine(format!("ferry migrate's summary: {e}")))?;
    out.engine_report = sum;
    out.engine_total_ms = Some(figures.total_ms);
    out.downtime_ms = Some(figures.downtime_ms);
    out.rounds = Some(figures.rounds);
    out.wire_bytes = Some(figures.wire_bytes);
    dst.check_running()?;
    run_common::check_alive(out, dst_pid, &before);
    // The source exits 0 once its guest migrated away.
    let end = Instant::now() + Duration::from_secs(5);
    while src.guard.is_running() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// What the bench reads from a line of `ferry migrate --json` (the
/// control protocol's events and the closing summary line). 64-bit
/// figures arrive as decimal strings (`ferry_control::json`).
#[derive(Debug, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum MigrateLine {
    Started {
        #[serde(deserialize_with = "figure")]
        guest_bytes: u64,
    },
    RoundProgress {
        round: u64,
        #[serde(deserialize_with = "figure")]
        pages_done: u64,
        #[serde(deserialize_with = "figure")]
        pages_total: u64,
    },
    RoundFinished {
        round: u64,
        #[serde(deserialize_with = "figure")]
        dirty_pages: u64,
    },
    StopAndCopy {
        #[serde(deserialize_with = "figure")]
        dirty_pages: u64,
    },
    /// The last line of a completed migration (kept whole as the run's
    /// engine report).
    Summary {
        summary: Value,
    },
    Abandoned {
        reason: String,
    },
    /// Events the bench does not read.
    #[serde(other)]
    Other,
}

/// The summary figures the bench reports beside the whole summary.
#[derive(Debug, Deserialize)]
struct SummaryFigures {
    total_ms: f64,
    downtime_ms: f64,
    rounds: u64,
    #[serde(deserialize_with = "figure")]
    wire_bytes: u64,
}

/// A 64-bit count or byte figure of `ferry migrate --json`: a decimal
/// string (ferry writes every 64-bit integer as one).
fn figure<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let text = String::deserialize(d)?;
    text.parse()
        .map_err(|e| serde::de::Error::custom(format!("figure {text:?}: {e}")))
}

/// Adds a bytes-left sample from a progress event.
fn record_event(left: &mut Vec<BytesLeft>, line: &MigrateLine, t_ms: f64, mem_bytes: u64) {
    let sample = match *line {
        MigrateLine::Started { guest_bytes } => Some((
            0,
            if guest_bytes == 0 {
                mem_bytes
            } else {
                guest_bytes
            },
        )),
        MigrateLine::RoundProgress {
            round,
            pages_done,
            pages_total,
        } => Some((round, pages_total.saturating_sub(pages_done) * 4096)),
        MigrateLine::RoundFinished { round, dirty_pages } => Some((round, dirty_pages * 4096)),
        MigrateLine::StopAndCopy { dirty_pages } => {
            left.last().map(|b| (b.round + 1, dirty_pages * 4096))
        }
        _ => None,
    };
    if let Some((round, bytes)) = sample {
        left.push(BytesLeft { t_ms, round, bytes });
    }
}

fn wait_socket(
    path: &std::path::Path,
    p: &mut EngineProcess,
    timeout: Duration,
) -> Result<(), BenchError> {
    let end = Instant::now() + timeout;
    while !path.exists() {
        p.check_running()?;
        if Instant::now() > end {
            return Err(BenchError::Engine(format!(
                "no control socket at {} after {} s",
                path.display(),
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> MigrateLine {
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn migrate_lines_give_the_figures_the_bench_reads() {
        let mut left = Vec::new();
        for line in [
            r#"{"event":"connected","to":"127.0.0.1:1","lanes":4,"security":"plaintext"}"#,
            r#"{"event":"started","pages":"262144","guest_bytes":"1073741824","dirty_log":"kvm","workers":"2"}"#,
            r#"{"event":"round_progress","round":0,"pages_done":"262000","pages_total":"262144","wire_bytes":"9"}"#,
            r#"{"event":"round_finished","round":0,"dirty_pages":"3","pages":"1"}"#,
            r#"{"event":"stop_and_copy","dirty_pages":"2"}"#,
        ] {
            record_event(&mut left, &parse(line), 1.0, 0);
        }
        let left: Vec<(u64, u64)> = left
            .iter()
            .map(|b: &BytesLeft| (b.round, b.bytes))
            .collect();
        assert_eq!(
            left,
            [(0, 1 << 30), (0, 144 * 4096), (0, 3 * 4096), (1, 2 * 4096)]
        );
        let MigrateLine::Summary { summary } = parse(
            r#"{"event":"summary","summary":{"rounds":3,"total_ms":700.5,"downtime_ms":1.5,"wire_bytes":"1075000000","downtime_parts":{}}}"#,
        ) else {
            panic!("the summary line is a summary");
        };
        let f = SummaryFigures::deserialize(&summary).unwrap();
        assert_eq!((f.rounds, f.wire_bytes), (3, 1_075_000_000));
        assert_eq!((f.total_ms, f.downtime_ms), (700.5, 1.5));
        assert!(matches!(
            parse(r#"{"event":"abandoned","reason":"deadline"}"#),
            MigrateLine::Abandoned { reason } if reason == "deadline"
        ));
        // A 64-bit figure written as a number is not what ferry prints.
        assert!(serde_json::from_str::<MigrateLine>(
            r#"{"event":"stop_and_copy","dirty_pages":2}"#
        )
        .is_err());
    }
}
