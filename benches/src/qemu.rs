//! QEMU's side: two `qemu-system-x86_64 -accel kvm` processes (source
//! running the workload guest, destination `-incoming defer`) driven over
//! QMP, migration over `tcp:127.0.0.1:PORT`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_e2e::qmp::Qmp;
use serde_json::{json, Value};

use crate::error::BenchError;
use crate::guest_probe::StaticDigest;
use crate::matrix::{Profile, QemuProfile, Workload};
use crate::outcome::{BytesLeft, RunOutcome, RunStatus};
use crate::run_common::{self, Baseline, EngineProcess};
use crate::settings::RunSettings;
use crate::watch::Watch;

/// `max-bandwidth` for uncapped rows: far above loopback, so QEMU's default
/// 128 MiB/s cap does not decide the result.
pub const UNCAPPED_BANDWIDTH: u64 = 100_000_000_000;

/// Whether QEMU can be run: `Err` says why not and how to install it.
pub fn available(qemu: &Path) -> Result<(), String> {
    match Command::new(qemu).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => {
            return Err(format!(
                "{} not found or not runnable: QEMU rows skipped (install it: apt-get install qemu-system-x86)",
                qemu.display()
            ))
        }
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Err("/dev/kvm not usable: QEMU rows skipped".into());
    }
    Ok(())
}

fn qemu_cmd(s: &RunSettings, w: &Workload, name: &str, qmp: &Path, incoming: bool) -> Command {
    let mut c = Command::new(&s.qemu_bin);
    c.arg("-name")
        .arg(format!("{name},debug-threads=on"))
        .args(["-accel", "kvm", "-smp", "1"])
        .arg("-m")
        .arg(format!("{}M", w.mem_bytes >> 20))
        .arg("-kernel")
        .arg(&s.kernel)
        .arg("-append")
        .arg(format!("{} tsc_khz={}", w.guest_args(), s.tsc_khz))
        .args(["-display", "none", "-nodefaults", "-serial", "none"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if incoming {
        c.args(["-incoming", "defer"]);
    }
    c.stdin(std::process::Stdio::null());
    c
}

fn qmp_err(what: &str) -> impl Fn(anyhow::Error) -> BenchError + '_ {
    move |e| BenchError::Qmp(what.into(), format!("{e:#}"))
}

fn capabilities(p: QemuProfile) -> Vec<&'static str> {
    match p {
        QemuProfile::Default => vec![],
        QemuProfile::Multifd | QemuProfile::MultifdZstd => vec!["multifd"],
        QemuProfile::Xbzrle => vec!["xbzrle"],
        QemuProfile::AutoConverge => vec!["auto-converge"],
    }
}

fn parameters(p: QemuProfile, w: &Workload, s: &RunSettings, source: bool) -> Value {
    let mut v = json!({});
    if source {
        v["downtime-limit"] = json!(s.max_downtime_ms);
        v["max-bandwidth"] = json!(w.cap_bytes_per_sec.unwrap_or(UNCAPPED_BANDWIDTH));
    }
    match p {
        QemuProfile::Multifd => v["multifd-channels"] = json!(4),
        QemuProfile::MultifdZstd => {
            v["multifd-channels"] = json!(4);
            v["multifd-compression"] = json!("zstd");
        }
        QemuProfile::Xbzrle if source => v["xbzrle-cache-size"] = json!(w.mem_bytes / 4),
        _ => {}
    }
    v
}

fn configure(
    q: &mut Qmp,
    p: QemuProfile,
    w: &Workload,
    s: &RunSettings,
    source: bool,
) -> Result<(), BenchError> {
    let caps: Vec<Value> = capabilities(p)
        .into_iter()
        .map(|c| json!({"capability": c, "state": true}))
        .collect();
    if !caps.is_empty() {
        q.execute("migrate-set-capabilities", json!({ "capabilities": caps }))
            .map_err(qmp_err("migrate-set-capabilities"))?;
    }
    let params = parameters(p, w, s, source);
    if params.as_object().is_some_and(|o| !o.is_empty()) {
        q.execute("migrate-set-parameters", params)
            .map_err(qmp_err("migrate-set-parameters"))?;
    }
    Ok(())
}

fn start(
    s: &RunSettings,
    w: &Workload,
    name: &str,
    incoming: bool,
) -> Result<(EngineProcess, Qmp), BenchError> {
    let sock = s.workdir.join(format!("{name}.qmp"));
    let _ = std::fs::remove_file(&sock);
    let what = format!("QEMU ({name})");
    let guard = EngineProcess::spawn(
        &what,
        name,
        &mut qemu_cmd(s, w, name, &sock, incoming),
        &s.workdir,
    )?;
    let qmp = Qmp::connect(&sock, Duration::from_secs(20)).map_err(|e| {
        BenchError::Qmp(
            format!("connect ({})", run_common::log_tail(&guard.log)),
            format!("{e:#}"),
        )
    })?;
    Ok((guard, qmp))
}

fn u64_at(v: &Value, path: &[&str]) -> Option<u64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_u64()
}

/// Runs one QEMU migration of `w` with profile `p`. Failures are in the
/// returned outcome's status; nothing is left running.
pub fn run(s: &RunSettings, w: &Workload, p: QemuProfile, repeat: u32) -> RunOutcome {
    let mut out = RunOutcome::new(Profile::Qemu(p), *w, repeat, RunStatus::Completed);
    if let Err(e) = run_inner(s, w, p, &mut out) {
        out.status = match e {
            BenchError::Deadline(..) => RunStatus::NotConverged(e.to_string()),
            e => RunStatus::Failed(error_chain(&e)),
        };
    }
    out
}

/// `e` and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s += &format!(": {x}");
        src = x.source();
    }
    s
}

fn run_inner(
    s: &RunSettings,
    w: &Workload,
    p: QemuProfile,
    out: &mut RunOutcome,
) -> Result<(), BenchError> {
    let (mut src, mut src_qmp) = start(s, w, "bench-src", false)?;
    let src_pid = src.pid();
    run_common::wait_guest_running(
        src_pid,
        w.mem_bytes,
        RunSettings::boot_timeout(w.mem_bytes),
        Duration::from_secs(1),
        || src.check_running(),
    )?;
    let before = StaticDigest::of_source(src_pid, w.mem_bytes, w.rate);
    let (mut dst, mut dst_qmp) = start(s, w, "bench-dst", true)?;
    let dst_pid = dst.pid();
    configure(&mut src_qmp, p, w, s, true)?;
    configure(&mut dst_qmp, p, w, s, false)?;
    let port = run_common::free_port()?;
    let uri = format!("tcp:127.0.0.1:{port}");
    dst_qmp
        .execute("migrate-incoming", json!({ "uri": uri }))
        .map_err(qmp_err("migrate-incoming"))?;

    let base = Baseline::take(src_pid, dst_pid);
    let t0 = Instant::now();
    let watch = Watch::start(t0, src_pid, dst_pid, w.mem_bytes);
    src_qmp
        .execute("migrate", json!({ "uri": uri }))
        .map_err(qmp_err("migrate"))?;
    let deadline = s.deadline_for(w);
    let mut last = Value::Null;
    let mut lo_end = None;
    let result = loop {
        let info = src_qmp
            .execute("query-migrate", json!({}))
            .map_err(qmp_err("query-migrate"))?;
        let status = info
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if let (Some(rem), Some(round)) = (
            u64_at(&info, &["ram", "remaining"]),
            u64_at(&info, &["ram", "dirty-sync-count"]),
        ) {
            out.bytes_left.push(BytesLeft {
                t_ms: t0.elapsed().as_secs_f64() * 1e3,
                round,
                bytes: rem,
            });
        }
        match status.as_str() {
            "completed" => {
                out.wall_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
                lo_end = crate::procfs::loopback_bytes().ok();
                last = info;
                break Ok(());
            }
            "failed" | "cancelled" => {
                let why = info
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no error-desc")
                    .to_string();
                break Err(BenchError::Engine(format!(
                    "QEMU migration {status}: {why}"
                )));
            }
            _ => {}
        }
        src.check_running()?;
        dst.check_running()?;
        if t0.elapsed() > deadline {
            let _ = src_qmp.execute("migrate_cancel", json!({}));
            break Err(BenchError::Deadline(
                deadline.as_secs(),
                format!(
                    "status {status}, {} MiB left in round {}",
                    u64_at(&info, &["ram", "remaining"]).unwrap_or(0) >> 20,
                    u64_at(&info, &["ram", "dirty-sync-count"]).unwrap_or(0)
                ),
            ));
        }
        last = info;
        std::thread::sleep(Duration::from_millis(50));
    };
    if result.is_ok() {
        // Let the destination run long enough for the watch to see the
        // heartbeat move.
        wait_dst_running(&mut dst_qmp);
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = watch.finish();
    run_common::fill_from_watch(out, &log, &base, lo_end, 0.0);
    out.rounds = u64_at(&last, &["ram", "dirty-sync-count"]);
    out.wire_bytes = u64_at(&last, &["ram", "transferred"]);
    out.engine_report = last.clone();
    result?;
    out.total_ms = u64_at(&last, &["total-time"]).map(|v| v as f64);
    out.downtime_ms = u64_at(&last, &["downtime"]).map(|v| v as f64);
    run_common::check_alive(out, dst_pid, before.as_ref());
    Ok(())
}

fn wait_dst_running(q: &mut Qmp) {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if let Ok(v) = q.execute("query-status", json!({})) {
            if v.get("status").and_then(Value::as_str) == Some("running") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
