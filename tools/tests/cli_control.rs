//! Watching, cancelling and retuning a migration from other shells
//! (`ferry migrate status|cancel|set`), and inputs that must each be a
//! clear error naming the flag: real processes, a real KVM guest.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::fault_proxy::{Action, Direction, Fault, FaultProxy, Place};
use common::{
    assert_runs_on_destination, assert_runs_on_source, ferry, outcome, status, summary, Pair, FERRY,
};
use ferry_control::json::MigrateOutcome;
use ferry_control::{Greeting, GuestHome, MigrationReport, Phase, Reply, Role};
use ferry_e2e::process::ProcessGuard;
use ferry_transport::FrameKind;
use ferry_vm::testing::kvm_or_skip;

/// Two guests per test on a small machine: one test at a time.
static KVM: Mutex<()> = Mutex::new(());

fn kvm(test: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    kvm_or_skip(test).then(|| KVM.lock().unwrap_or_else(|p| p.into_inner()))
}

/// `ferry migrate --json` started in the background (killed if the test
/// fails before it ends).
struct Background(Option<Child>);

impl Background {
    fn migrate(p: &Pair, extra: &[&str]) -> Background {
        Background::migrate_to(p, &p.addr, extra)
    }

    /// To `to` (a proxy in front of the pair's destination).
    fn migrate_to(p: &Pair, to: &str, extra: &[&str]) -> Background {
        let api = p.api("src");
        let child = Command::new(FERRY)
            .args(["migrate", "--json", "--insecure", "--api"])
            .arg(&api)
            .args(["--to", to])
            .args(extra)
            .args(common::pause_limit_flags(extra))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ferry migrate");
        Background(Some(child))
    }

    fn wait(mut self) -> Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `ferry migrate status --json`, typed; `None` while the process does not
/// answer.
fn migration_status(api: &Path) -> Option<MigrationReport> {
    let out = ferry(&[
        "migrate",
        "status",
        "--json",
        "--api",
        api.to_str().unwrap(),
    ]);
    out.status.success().then(|| {
        ferry_control::json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ferry migrate status --json: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    })
}

/// Waits until the source's migration is copying round 0 with bytes left.
fn wait_copying(api: &Path) -> MigrationReport {
    let start = Instant::now();
    loop {
        if let Some(r) = migration_status(api) {
            if r.phase == Phase::Copying && r.bytes_left > 0 {
                return r;
            }
            assert!(
                !r.phase.is_final(),
                "the migration ended before it could be watched: {r:?}"
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the migration never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn status_from_a_second_client_shows_falling_bytes_left_and_set_retunes() {
    let Some(_kvm) = kvm("status_from_a_second_client_shows_falling_bytes_left") else {
        return;
    };
    let mut p = Pair::start("256M", "1000");
    let api = p.api("src");
    // 16 MiB/s: round 0 of 256 MiB takes many seconds.
    let client = Background::migrate(&p, &["--max-bandwidth", "16M"]);
    let first = wait_copying(&api);
    assert_eq!(first.limits.max_bandwidth, Some(16 << 20), "{first:?}");
    let mut falling = None;
    let start = Instant::now();
    while falling.is_none() {
        std::thread::sleep(Duration::from_millis(300));
        let now = migration_status(&api).expect("the source answers");
        if now.round == first.round && now.bytes_left < first.bytes_left {
            falling = Some(now);
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "bytes left never fell: {first:?}"
        );
    }

    // A lower cap, then a higher one to finish: each shows in the report.
    let out = ferry(&[
        "migrate",
        "set",
        "--api",
        api.to_str().unwrap(),
        "--max-bandwidth",
        "8M",
        "--vcpu-dirty-limit",
        "4",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("bandwidth cap 8.0 MiB/s"), "{said}");
    assert!(said.contains("vCPU dirty limit 4 MB/s"), "{said}");
    let now = migration_status(&api).unwrap();
    assert_eq!(now.limits.max_bandwidth, Some(8 << 20), "{now:?}");
    assert_eq!(now.limits.vcpu_dirty_limit_mbps, Some(4), "{now:?}");
    let out = ferry(&[
        "migrate",
        "set",
        "--api",
        api.to_str().unwrap(),
        "--max-bandwidth",
        "4G",
        "--max-downtime-ms",
        "500ms",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = client.wait();
    assert!(out.status.success(), "{}", stderr(&out));
    // One summary, and no progress line printed twice in a row.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.iter().filter(|l| l.contains("\"summary\"")).count(),
        1,
        "{stdout}"
    );
    assert!(lines.windows(2).all(|w| w[0] != w[1]), "{stdout}");
    // The digest uses all 64 bits: a string, so scripts can trust it.
    #[derive(serde::Deserialize)]
    struct Written {
        summary: WrittenDigest,
    }
    #[derive(serde::Deserialize)]
    struct WrittenDigest {
        memory_digest: String,
    }
    let written: Written = serde_json::from_str(lines.last().unwrap()).unwrap();
    let summary = summary(&out);
    assert_eq!(
        written.summary.memory_digest,
        summary.memory_digest.to_string()
    );
    assert_runs_on_destination(&mut p);

    // The result stays readable at the destination (the source has exited).
    let dst = migration_status(&p.api("dst")).expect("the destination answers");
    assert_eq!(dst.phase, Phase::Completed, "{dst:?}");
    assert_eq!(dst.role, Role::Destination, "{dst:?}");
    assert_eq!(
        dst.received.as_ref().map(|r| r.memory_digest),
        Some(summary.memory_digest),
        "{dst:?}"
    );
}

#[test]
fn a_cancel_before_go_keeps_the_guest_at_the_source_and_a_retry_succeeds() {
    let Some(_kvm) = kvm("a_cancel_before_go_keeps_the_guest_at_the_source") else {
        return;
    };
    let mut p = Pair::start("256M", "1000");
    let api = p.api("src");
    let client = Background::migrate(&p, &["--max-bandwidth", "16M"]);
    wait_copying(&api);
    let out = ferry(&["migrate", "cancel", "--api", api.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled"));

    let out = client.wait();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("migration cancelled") && err.contains("still running on the source"),
        "{err}"
    );
    assert_runs_on_source(&p);
    let report = migration_status(&api).unwrap();
    assert_eq!(report.phase, Phase::Cancelled, "{report:?}");

    // Nothing left to cancel now; the answer says what happened last.
    let out = ferry(&["migrate", "cancel", "--api", api.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no migration is running"),
        "{}",
        stderr(&out)
    );

    // The destination let go of the half-received guest and waits again.
    let start = Instant::now();
    loop {
        let r = migration_status(&p.api("dst"));
        if r.as_ref().is_some_and(|r| r.phase == Phase::Failed) {
            break;
        }
        assert!(p.dst.is_running(), "{}", p.log("dst"));
        assert!(start.elapsed() < Duration::from_secs(30), "{r:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status(&p.api("dst")).unwrap().state, GuestHome::Awaiting);
    let out = p.migrate(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_runs_on_destination(&mut p);
}

#[test]
fn a_killed_client_neither_ends_nor_orphans_the_migration() {
    let Some(_kvm) = kvm("a_killed_client_neither_ends_nor_orphans_the_migration") else {
        return;
    };
    let mut p = Pair::start("256M", "1000");
    let api = p.api("src");
    let client = Background::migrate(&p, &["--max-bandwidth", "16M"]);
    wait_copying(&api);
    drop(client); // kill -9 of `ferry migrate`
                  // The migration goes on in the source; another shell finishes it
                  // faster and sees the end.
    let out = ferry(&[
        "migrate",
        "set",
        "--api",
        api.to_str().unwrap(),
        "--max-bandwidth",
        "4G",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let start = Instant::now();
    let mut last = None;
    while p.src.is_running() {
        last = migration_status(&api).or(last);
        assert!(start.elapsed() < Duration::from_secs(60), "{last:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let dst = migration_status(&p.api("dst")).expect("the destination answers");
    assert_eq!(dst.phase, Phase::Completed, "{dst:?}");
    assert_runs_on_destination(&mut p);
}

#[test]
fn a_cancel_at_the_destination_after_the_handover_finds_nothing_to_cancel() {
    let Some(_kvm) = kvm("a_cancel_at_the_destination_after_the_handover_finds_nothing_to_cancel")
    else {
        return;
    };
    let p = Pair::start("64M", "1000");
    let api = p.api("dst");
    let out = p.migrate(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The destination owns the guest now: nothing there to cancel, and
    // the answer says so.
    let out = ferry(&["migrate", "cancel", "--api", api.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("nothing to cancel") && err.contains("completed"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn a_cancel_after_go_is_refused_and_the_migration_completes() {
    let Some(_kvm) = kvm("a_cancel_after_go_is_refused_and_the_migration_completes") else {
        return;
    };
    let mut p = Pair::start("64M", "1000");
    // The proxy holds the destination's Running on the way back: GO went
    // out and the destination resumed, the source waits for the answer.
    let proxy = FaultProxy::spawn(
        p.addr.parse().expect("loopback address"),
        Fault {
            connection: 0,
            direction: Direction::ToSource,
            place: Place::Frame(FrameKind::Running),
            action: Action::Stall(Duration::from_secs(4)),
        },
    )
    .expect("start the fault proxy");
    let api = p.api("src");
    // A downtime budget longer than the stall: the source waits for
    // Running (budget plus margin) through all of it, so the cancel below
    // lands after GO however loaded the machine is.
    let client =
        Background::migrate_to(&p, &proxy.addr.to_string(), &["--max-downtime-ms", "8000"]);
    let start = Instant::now();
    while proxy.struck_at().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the handover never reached Running:\n{}",
            p.log("src")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = ferry(&["migrate", "cancel", "--api", api.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "a cancel after GO was honoured");
    let err = stderr(&out);
    assert!(
        err.contains("too late") && err.contains("GO was sent"),
        "the refusal must say why: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // The handover resolves anyway (the source asks the destination again
    // when Running does not come): the guest runs on the destination only.
    let out = client.wait();
    assert!(out.status.success(), "{}\n{}", stderr(&out), p.log("src"));
    assert!(
        matches!(outcome(&out), MigrateOutcome::Summary { .. }),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_runs_on_destination(&mut p);
    let report = migration_status(&p.api("dst")).expect("the destination answers");
    assert_eq!(report.phase, Phase::Completed, "{report:?}");
}

#[test]
fn migrating_from_a_destination_without_a_guest_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("dst.sock");
    let addr = format!("127.0.0.1:{}", common::free_port());
    let mut dst = ProcessGuard::spawn(
        "destination",
        Command::new(FERRY)
            .args([
                "vm",
                "receive",
                "--quiet",
                "--insecure",
                "--listen",
                &addr,
                "--api",
            ])
            .arg(&api),
        &dir.path().join("dst.log"),
    )
    .unwrap();
    common::wait_api(&api, &mut dst);
    let out = ferry(&[
        "migrate",
        "--api",
        api.to_str().unwrap(),
        "--to",
        "127.0.0.1:1",
        "--insecure",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("destination still waiting for its guest") && err.contains("source"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let st = status(&api).unwrap();
    assert_eq!(st.state, GuestHome::Awaiting, "{st:?}");
}

/// The first stderr line of a refused command line, which must name `flag`.
fn refused(args: &[&str], flag: &str) {
    let out = ferry(args);
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "{args:?} was accepted"
    );
    let err = stderr(&out);
    let first = err.lines().next().unwrap_or_default();
    assert!(first.contains(flag), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

#[test]
fn bad_inputs_are_refused_naming_the_flag() {
    // `--flag=value`, so that `-1` is a value and not a flag.
    let mig = |flag: &str, v: &str| {
        let arg = format!("{flag}={v}");
        let args = [
            "migrate",
            "--api",
            "/nonexistent.sock",
            "--to",
            "127.0.0.1:1",
            "--insecure",
            &arg,
        ];
        refused(&args, flag);
    };
    for v in ["1e30", "nan", "inf", "-1", "0", "soon"] {
        mig("--deadline-s", v);
    }
    for v in ["0", "0M", "fast"] {
        mig("--max-bandwidth", v);
    }
    mig("--max-downtime-ms", "nan");
    mig("--max-downtime-ms", "2h");
    mig("--xor-cache", "lots");
    refused(&["vm", "run", "--mem", "256"], "--mem");
    refused(&["demo", "--mem", "256"], "--mem");
    refused(&["vm", "run", "--mem", "64M", "--wss", "999G"], "--wss");
    refused(&["vm", "run", "--mem", "64M", "--wss", "32"], "--wss");
    refused(
        &["vm", "run", "--mem", "64M", "--duration", "inf"],
        "--duration",
    );
    refused(
        &["migrate", "set", "--api", "/x.sock", "--max-bandwidth", "0"],
        "--max-bandwidth",
    );
    for v in ["0", "1000001", "fast"] {
        refused(
            &[
                "migrate",
                "set",
                "--api",
                "/x.sock",
                "--vcpu-dirty-limit",
                v,
            ],
            "--vcpu-dirty-limit",
        );
    }
}

#[test]
fn a_socket_that_is_not_ferrys_is_named_as_such() {
    let out = ferry(&["vm", "status", "--api", "/etc/passwd"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("/etc/passwd is not a socket"), "{err}");
    assert!(!err.contains("Connection refused"), "{err}");

    // A UNIX socket of some other program.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let _ = c.write_all(b"220 smtp.example ESMTP\r\n");
        std::thread::sleep(Duration::from_millis(500));
    });
    let out = ferry(&["migrate", "status", "--api", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("is not a ferry control socket"), "{err}");
    server.join().unwrap();

    // A stale socket file with no process behind it.
    let out = ferry(&["vm", "status", "--api", path.to_str().unwrap()]);
    assert!(stderr(&out).contains("stale socket"), "{}", stderr(&out));
}

#[test]
fn garbage_on_the_control_socket_is_an_error_reply_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("dst.sock");
    let addr = format!("127.0.0.1:{}", common::free_port());
    let mut dst = ProcessGuard::spawn(
        "destination",
        Command::new(FERRY)
            .args([
                "vm",
                "receive",
                "--quiet",
                "--insecure",
                "--listen",
                &addr,
                "--api",
            ])
            .arg(&api),
        &dir.path().join("dst.log"),
    )
    .unwrap();
    common::wait_api(&api, &mut dst);
    let long = vec![b'x'; 100_000];
    let inputs: [&[u8]; 7] = [
        b"garbage\n",
        b"{\"op\":\"explode\"}\n",
        b"{\"op\":\"set\",\"max_bandwidth\":-1}\n",
        b"{\"op\":\"migrate\",\"to\":\"x\",\"deadline_s\":1e300,\"security\":{\"mode\":\"insecure\"}}\n",
        b"\xff\xfe\n",
        b"\n",
        &long,
    ];
    for input in inputs {
        let mut c = UnixStream::connect(&api).unwrap();
        let _ = c.write_all(input);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let lines: Vec<String> = BufReader::new(c).lines().map_while(Result::ok).collect();
        assert_eq!(
            lines.len(),
            2,
            "{:?}: {lines:?}",
            String::from_utf8_lossy(input)
        );
        let greeting: Greeting = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(greeting.role, Role::Destination, "{lines:?}");
        let reply: Reply = serde_json::from_str(&lines[1]).unwrap();
        assert!(matches!(reply, Reply::Error(_)), "{lines:?}");
        assert!(dst.is_running(), "{}", String::from_utf8_lossy(input));
    }
    assert!(status(&api).is_some());
}
