//! Helpers shared by the CLI migration tests: a source (`ferry vm run
//! --api`) and a destination (`ferry vm receive`) as real processes, killed
//! by PID when the test ends, and the control-socket status of each.

#![allow(dead_code)] // each test file uses its own subset

pub mod fault_proxy;
pub mod sched;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ferry_control::json::{self, MigrateLine, MigrateOutcome};
use ferry_control::{Event, GuestHome, StatusReply, Summary};
use ferry_e2e::process::ProcessGuard;
use ferry_vm::{GuestPhase, GuestStatus};

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn ferry(args: &[&str]) -> Output {
    Command::new(FERRY).args(args).output().expect("run ferry")
}

/// `ferry vm status --json`, typed; `None` while the process does not
/// answer.
pub fn status(api: &Path) -> Option<StatusReply> {
    let out = ferry(&["vm", "status", "--json", "--api", api.to_str().unwrap()]);
    out.status.success().then(|| {
        json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ferry vm status --json: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    })
}

pub fn wait_guest_running(api: &Path, p: &mut ProcessGuard) -> StatusReply {
    let start = Instant::now();
    loop {
        if let Some(s) = status(api) {
            if s.status.is_some_and(|g| g.phase == GuestPhase::Running) {
                return s;
            }
        }
        assert!(p.is_running(), "{} exited", p.name());
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "guest never reached phase 2"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the destination's control socket answers (it opens right
/// after the migration listener, so the destination is then ready).
pub fn wait_api(api: &Path, p: &mut ProcessGuard) {
    let start = Instant::now();
    while status(api).is_none() {
        assert!(p.is_running(), "{} exited", p.name());
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} never opened {}",
            p.name(),
            api.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest's status block of a status reply (there must be a guest).
pub fn guest(s: &StatusReply) -> GuestStatus {
    s.status
        .unwrap_or_else(|| panic!("no guest status in {s:?}"))
}

pub fn heartbeat(s: &StatusReply) -> u64 {
    guest(s).heartbeat
}

/// Every stdout line of `ferry migrate --json`, typed (each must be one).
pub fn migrate_lines(out: &Output) -> Vec<MigrateLine> {
    out.stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            json::from_slice(l).unwrap_or_else(|e| {
                panic!(
                    "not a line of ferry migrate --json: {e}: {}",
                    String::from_utf8_lossy(l)
                )
            })
        })
        .collect()
}

/// The last line of `ferry migrate --json`: its outcome.
pub fn outcome(out: &Output) -> MigrateOutcome {
    match migrate_lines(out).pop() {
        Some(MigrateLine::Outcome(o)) => o,
        last => panic!("ferry migrate --json did not end with its outcome: {last:?}"),
    }
}

/// The summary `ferry migrate --json` ended with (it must have completed).
pub fn summary(out: &Output) -> Summary {
    match outcome(out) {
        MigrateOutcome::Summary { summary } => *summary,
        failed => panic!("the migration did not complete: {failed:?}"),
    }
}

/// The events `ferry migrate --json` printed, in order.
pub fn events(out: &Output) -> impl Iterator<Item = Event> {
    migrate_lines(out).into_iter().filter_map(|l| match l {
        MigrateLine::Event(e) => Some(*e),
        MigrateLine::Outcome(_) => None,
    })
}

pub struct Pair {
    pub dir: tempfile::TempDir,
    pub src: ProcessGuard,
    pub dst: ProcessGuard,
    pub addr: String,
}

impl Pair {
    pub fn api(&self, who: &str) -> PathBuf {
        self.dir.path().join(format!("{who}.sock"))
    }

    /// A plaintext (`--insecure`) destination and a running source guest.
    pub fn start(mem: &str, rate: &str) -> Pair {
        Pair::start_secured(mem, rate, tempfile::tempdir().unwrap(), |_| {
            vec!["--insecure".into()]
        })
    }

    /// A destination with the security flags `dst_security(dir)` returns
    /// (`dir` is the pair's temporary folder), and a running source guest.
    pub fn start_secured(
        mem: &str,
        rate: &str,
        dir: tempfile::TempDir,
        dst_security: impl FnOnce(&Path) -> Vec<String>,
    ) -> Pair {
        Pair::start_full(mem, rate, &[], dir, dst_security)
    }

    /// A plaintext destination and a running source guest whose `ferry vm
    /// run` gets `src_extra` too (e.g. `--cpus 2 --dirty-log ring`).
    pub fn start_with(mem: &str, rate: &str, src_extra: &[&str]) -> Pair {
        Pair::start_full(mem, rate, src_extra, tempfile::tempdir().unwrap(), |_| {
            vec!["--insecure".into()]
        })
    }

    fn start_full(
        mem: &str,
        rate: &str,
        src_extra: &[&str],
        dir: tempfile::TempDir,
        dst_security: impl FnOnce(&Path) -> Vec<String>,
    ) -> Pair {
        let addr = format!("127.0.0.1:{}", free_port());
        let dst_api = dir.path().join("dst.sock");
        let src_api = dir.path().join("src.sock");
        let mut dst = ProcessGuard::spawn(
            "destination",
            Command::new(FERRY)
                .args(["vm", "receive", "--quiet", "--listen", &addr])
                .args(dst_security(dir.path()))
                .arg("--api")
                .arg(&dst_api),
            &dir.path().join("dst.log"),
        )
        .unwrap();
        let mut src = ProcessGuard::spawn(
            "source",
            Command::new(FERRY)
                .args([
                    "vm", "run", "--quiet", "--mem", mem, "--rate", rate, "--verify", "64",
                ])
                .args(src_extra)
                .arg("--api")
                .arg(&src_api),
            &dir.path().join("src.log"),
        )
        .unwrap();
        wait_api(&dst_api, &mut dst);
        wait_guest_running(&src_api, &mut src);
        Pair {
            dir,
            src,
            dst,
            addr,
        }
    }

    /// `ferry migrate --json` to the destination with `extra` flags and no
    /// security flag of its own (see [`pause_limit_flags`]).
    pub fn migrate_with(&self, extra: &[&str]) -> Output {
        let api = self.api("src");
        let mut args = vec![
            "migrate",
            "--json",
            "--api",
            api.to_str().unwrap(),
            "--to",
            &self.addr,
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(pause_limit_flags(extra));
        ferry(&args)
    }

    /// `ferry migrate --json --insecure` with `extra` flags.
    pub fn migrate(&self, extra: &[&str]) -> Output {
        let mut args = vec!["--insecure"];
        args.extend_from_slice(extra);
        self.migrate_with(&args)
    }

    /// The log of `who` (`src` or `dst`), for failure messages.
    pub fn log(&self, who: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{who}.log"))).unwrap_or_default()
    }
}

/// The flags a test's migration adds for the pause limit: none when the
/// test sets `--max-downtime-ms` or `--on-deadline` itself (it is testing
/// the limit), else `--on-deadline force`. A test of behaviour must not fail
/// because a loaded machine (CI runs suites side by side on 2 cores) made
/// one pause a few ms longer than the default 20 ms limit: the migration
/// still completes and its summary reports the overshoot.
pub fn pause_limit_flags(extra: &[&str]) -> &'static [&'static str] {
    let sets_its_own = extra.iter().any(|a| {
        ["--max-downtime-ms", "--on-deadline"]
            .iter()
            .any(|f| a == f || a.starts_with(&format!("{f}=")))
    });
    if sets_its_own {
        &[]
    } else {
        &["--on-deadline", "force"]
    }
}

/// The source is still the guest's home, and the guest keeps running there.
pub fn assert_runs_on_source(p: &Pair) {
    let a = status(&p.api("src")).expect("source still answers");
    assert_eq!(a.state, GuestHome::Here, "{a:?}");
    std::thread::sleep(Duration::from_millis(300));
    let b = status(&p.api("src")).unwrap();
    assert!(
        heartbeat(&b) > heartbeat(&a),
        "source heartbeat stuck: {a:?} -> {b:?}"
    );
    assert_eq!(guest(&b).verify_errors, 0, "{b:?}");
}

/// The guest arrived at the destination and runs there: heartbeat and dirty
/// count keep rising, no self-check error, and the source process let go.
pub fn assert_runs_on_destination(p: &mut Pair) {
    let a = status(&p.api("dst")).expect("destination answers");
    assert_eq!(a.state, GuestHome::Here, "{a:?}");
    let start = Instant::now();
    while p.src.is_running() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the source kept running after handing over"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let b = status(&p.api("dst")).unwrap();
    assert!(heartbeat(&b) > heartbeat(&a), "{a:?} -> {b:?}");
    assert!(
        guest(&b).pages_dirtied > guest(&a).pages_dirtied,
        "{a:?} -> {b:?}"
    );
    assert_eq!(guest(&b).verify_errors, 0, "{b:?}");
    assert_eq!(guest(&b).phase, GuestPhase::Running, "{b:?}");
}
