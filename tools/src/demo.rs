//! `ferry demo`: the main job. Starts a guest (`ferry vm run`) and a
//! destination (`ferry vm receive`) as two real processes, migrates the
//! guest live over loopback with a progress bar, prints the summary, and
//! shows that the guest lives on at the destination.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use ferry_control::{client, Limits, MigrateRequest, SecuritySpec};
use ferry_harness::process::ProcessGuard;
use ferry_vm::{GuestPhase, GuestStatus};

use crate::migrate_cmd;

/// `ferry demo`
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Guest RAM (binary units: 256M, 1G), as `ferry vm run --mem` takes it.
    #[arg(long, default_value = "1G", value_parser = crate::vm_cmd::check_mem)]
    pub mem: String,
    /// Pages per second the guest dirties while it moves.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
    /// Downtime limit (ms).
    #[arg(long, default_value_t = 20)]
    pub max_downtime_ms: u64,
    /// Seconds to watch the guest at the destination afterwards.
    #[arg(long, default_value_t = 3.0)]
    pub watch_s: f64,
    /// TCP lanes for the migration (default: one per core, 4 to 8).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=i64::from(ferry_transport::lanes::MAX_LANES)))]
    pub lanes: Option<u16>,
    /// Loopback port for the migration (0: pick a free one).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_for_socket(p: &Path, who: &mut ProcessGuard, log: &Path) -> anyhow::Result<()> {
    let start = Instant::now();
    while !p.exists() || client::status(p).is_err() {
        if !who.is_running() {
            bail!(
                "{} exited early; its log {}:\n{}",
                who.name(),
                log.display(),
                tail(log)
            );
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("{} did not open {} within 60 s", who.name(), p.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn status_of(p: &Path) -> anyhow::Result<GuestStatus> {
    client::status(p)?
        .status
        .with_context(|| format!("{} has no guest", p.display()))
}

/// A command line as a shell reads it: words with shell characters quoted.
fn shell_line(words: &[&str]) -> String {
    let quote = |w: &str| {
        if !w.is_empty()
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+".contains(c))
        {
            w.to_owned()
        } else {
            format!("'{}'", w.replace('\'', r"'\''"))
        }
    };
    words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the ferry binary")?;
    let dir = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveDir(dir.clone());
    let (src_api, dst_api) = (dir.join("source.sock"), dir.join("destination.sock"));
    let (src_log, dst_log) = (dir.join("source.log"), dir.join("destination.log"));
    let port = if args.port == 0 {
        free_port()?
    } else {
        args.port
    };
    let addr = format!("127.0.0.1:{port}");

    let (src_api_s, dst_api_s) = (src_api.to_string_lossy(), dst_api.to_string_lossy());
    println!("ferry demo: live migration of a running KVM guest over loopback");
    println!("(each step prints the command it runs; paste them into shells to do it by hand)\n");
    println!("1. the destination prepares its memory and waits (plaintext is fine on loopback; across hosts use --tls-cert/--tls-key/--tls-ca):");
    println!(
        "   {}",
        shell_line(&[
            "ferry",
            "vm",
            "receive",
            "--mem",
            &args.mem,
            "--listen",
            &addr,
            "--insecure",
            "--api",
            &dst_api_s
        ])
    );
    let mut dst = ProcessGuard::spawn(
        "destination",
        Command::new(&exe)
            .args([
                "vm",
                "receive",
                "--quiet",
                "--mem",
                &args.mem,
                "--listen",
                &addr,
                "--insecure",
                "--api",
            ])
            .arg(&dst_api),
        &dst_log,
    )?;
    wait_for_socket(&dst_api, &mut dst, &dst_log)?;

    let rate = args.rate.to_string();
    println!(
        "2. the source boots the guest, which fills its memory, then dirties {} pages/s:",
        args.rate
    );
    println!(
        "   {}",
        shell_line(&[
            "ferry", "vm", "run", "--mem", &args.mem, "--rate", &rate, "--api", &src_api_s
        ])
    );
    let mut src = ProcessGuard::spawn(
        "source",
        Command::new(&exe)
            .args([
                "vm", "run", "--quiet", "--mem", &args.mem, "--rate", &rate, "--api",
            ])
            .arg(&src_api),
        &src_log,
    )?;
    wait_for_socket(&src_api, &mut src, &src_log)?;
    let t0 = Instant::now();
    loop {
        let st = status_of(&src_api)?;
        if st.phase == GuestPhase::Running {
            break;
        }
        if !src.is_running() {
            bail!("the source exited; its log:\n{}", tail(&src_log));
        }
        if st.phase == GuestPhase::Fatal || t0.elapsed() > Duration::from_secs(300) {
            bail!("the guest did not start: {st:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let before = status_of(&src_api)?;
    println!(
        "   guest running at the source: heartbeat {}, {} pages dirtied, verify_errors {}\n",
        before.heartbeat, before.pages_dirtied, before.verify_errors
    );

    // Watch the source's heartbeat while it moves: the last value seen there
    // is where the destination must continue from.
    let last_src_hb = Arc::new(AtomicU64::new(before.heartbeat));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (hb, done, p) = (last_src_hb.clone(), done.clone(), src_api.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Acquire) {
                if let Ok(st) = status_of(&p) {
                    hb.fetch_max(st.heartbeat, Ordering::AcqRel);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let lanes = args
        .lanes
        .unwrap_or_else(ferry_transport::default_lane_count);
    let (lanes_s, downtime_s) = (lanes.to_string(), args.max_downtime_ms.to_string());
    println!("3. migrate it live (from another shell, `ferry migrate status --api {src_api_s}` follows it, `ferry migrate cancel --api {src_api_s}` stops it):");
    println!(
        "   {}",
        shell_line(&[
            "ferry",
            "migrate",
            "--api",
            &src_api_s,
            "--to",
            &addr,
            "--lanes",
            &lanes_s,
            "--insecure",
            "--max-downtime-ms",
            &downtime_s
        ])
    );
    let req = MigrateRequest {
        to: addr.clone(),
        lanes: Some(lanes),
        security: Some(SecuritySpec::Insecure),
        limits: Limits {
            max_downtime_ms: Some(args.max_downtime_ms),
            ..Limits::default()
        },
        workers: None,
        xor_cache_bytes: None,
        compress: None,
        on_deadline: None,
        converge: None,
    };
    let result = migrate_cmd::migrate(&src_api, req, false);
    done.store(true, Ordering::Release);
    let _ = watcher.join();
    let report = result?;
    migrate_cmd::print_summary(migrate_cmd::completed(&report)?);

    println!("\n4. the guest at the destination:");
    let last_hb = last_src_hb.load(Ordering::Acquire);
    let first = status_of(&dst_api)?;
    let start = Instant::now();
    let mut last = first;
    while start.elapsed().as_secs_f64() < args.watch_s {
        std::thread::sleep(Duration::from_millis(500));
        last = status_of(&dst_api)?;
        println!(
            "   heartbeat {:>8}  pages dirtied {:>10}  verify_errors {}",
            last.heartbeat, last.pages_dirtied, last.verify_errors
        );
    }
    let src_exited = wait_exit(&mut src, Duration::from_secs(5));
    let mut ok = true;
    let mut check = |good: bool, what: String| {
        println!("   [{}] {what}", if good { " ok " } else { "FAIL" });
        ok &= good;
    };
    check(
        first.heartbeat >= last_hb,
        format!(
            "heartbeat continued from the source's last value ({last_hb} -> {})",
            first.heartbeat
        ),
    );
    check(
        last.heartbeat > first.heartbeat,
        "heartbeat keeps rising at the destination".into(),
    );
    check(
        last.pages_dirtied > before.pages_dirtied,
        "the guest keeps dirtying pages".into(),
    );
    check(
        last.verify_errors == 0,
        "the guest's own self-check found no bad page".into(),
    );
    check(
        src_exited,
        "the source process let go of its copy and exited".into(),
    );
    drop(dst);
    if !ok {
        bail!("the demo's checks failed; logs in {}", dir.display());
    }
    println!("\nthe guest moved live and keeps running at the destination.");
    Ok(())
}

fn wait_exit(p: &mut ProcessGuard, timeout: Duration) -> bool {
    let start = Instant::now();
    while p.is_running() {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
