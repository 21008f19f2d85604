//! Helpers shared by the CLI migration tests: a source (`ferry vm run
//! --api`) and a destination (`ferry vm receive`) as real processes, killed
//! by PID when the test ends, and the control-socket status of each.

#![allow(dead_code)] // each test file uses its own subset

pub mod fault_proxy;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ferry_e2e::process::ProcessGuard;
use serde_json::Value;

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

pub fn status(api: &Path) -> Option<Value> {
    let out = ferry(&["vm", "status", "--json", "--api", api.to_str().unwrap()]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

pub fn wait_guest_running(api: &Path, p: &mut ProcessGuard) -> Value {
    let start = Instant::now();
    loop {
        if let Some(s) = status(api) {
            if s["status"]["phase"] == "Running" {
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

pub fn heartbeat(v: &Value) -> u64 {
    figure(&v["status"]["heartbeat"])
}

/// A 64-bit count or byte figure of ferry's `--json` output, which is
/// always a decimal string (so scripts with 53-bit numbers can trust it):
/// anything else fails the test.
pub fn figure(v: &Value) -> u64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a 64-bit figure must be a decimal string, got {v}"))
}

/// The last non-empty stdout line of `ferry migrate --json`, parsed.
pub fn last_json_line(out: &Output) -> Value {
    serde_json::from_slice(
        out.stdout
            .split(|&b| b == b'\n')
            .rfind(|l| !l.is_empty())
            .expect("ferry migrate printed nothing"),
    )
    .unwrap()
}

/// `ferry migrate --json` lines with this `event`.
pub fn events<'a>(out: &'a Output, event: &'a str) -> impl Iterator<Item = Value> + 'a {
    out.stdout
        .split(|&b| b == b'\n')
        .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
        .filter(move |v| v["event"] == event)
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
    assert_eq!(a["state"], "here", "{a}");
    std::thread::sleep(Duration::from_millis(300));
    let b = status(&p.api("src")).unwrap();
    assert!(
        heartbeat(&b) > heartbeat(&a),
        "source heartbeat stuck: {a} -> {b}"
    );
    assert_eq!(b["status"]["verify_errors"], "0");
}

/// The guest arrived at the destination and runs there: heartbeat and dirty
/// count keep rising, no self-check error, and the source process let go.
pub fn assert_runs_on_destination(p: &mut Pair) {
    let a = status(&p.api("dst")).expect("destination answers");
    assert_eq!(a["state"], "here", "{a}");
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
    assert!(heartbeat(&b) > heartbeat(&a), "{a} -> {b}");
    assert!(
        figure(&b["status"]["pages_dirtied"]) > figure(&a["status"]["pages_dirtied"]),
        "{a} -> {b}"
    );
    assert_eq!(b["status"]["verify_errors"], "0", "{b}");
    assert_eq!(b["status"]["phase"], "Running", "{b}");
}
