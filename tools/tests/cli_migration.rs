//! `ferry vm run`, `ferry vm receive` and `ferry migrate` as real processes
//! on loopback, with a real KVM guest: the guest moves, or stays running on
//! the source with a clear error.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    assert_runs_on_destination, assert_runs_on_source, events, ferry, guest, status, summary, Pair,
    FERRY,
};
use ferry_control::{Event, GuestHome, SecurityMode};
use ferry_engine::convergence::Decision;
use ferry_vm::testing::kvm_or_skip;

#[test]
fn a_dirtying_guest_moves_between_processes() {
    if !kvm_or_skip("a_dirtying_guest_moves_between_processes") {
        return;
    }
    let mut p = Pair::start("128M", "5000");
    let out = p.migrate(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = summary(&out);
    assert!(summary.rounds >= 1, "{summary:?}");
    assert!(summary.downtime_ms > 0.0, "{summary:?}");

    let connected: Vec<_> = events(&out)
        .filter_map(|e| match e {
            Event::Connected { security, .. } => Some(security),
            _ => None,
        })
        .collect();
    assert_eq!(connected, [SecurityMode::Insecure]);
    assert_runs_on_destination(&mut p);
}

#[test]
fn killing_the_destination_leaves_the_guest_on_the_source() {
    if !kvm_or_skip("killing_the_destination_leaves_the_guest_on_the_source") {
        return;
    }
    let mut p = Pair::start("256M", "2000");
    // A slow link keeps the migration in round 0 long enough to kill the peer.
    let api = p.api("src");
    let (addr, api_s) = (p.addr.clone(), api.to_str().unwrap().to_owned());
    let migrating = std::thread::spawn(move || {
        Command::new(FERRY)
            .args([
                "migrate",
                "--api",
                &api_s,
                "--to",
                &addr,
                "--insecure",
                "--max-bandwidth",
                "20M",
            ])
            .output()
            .unwrap()
    });
    let start = Instant::now();
    while status(&api)
        .map(|s| s.state != GuestHome::Migrating)
        .unwrap_or(true)
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "migration never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    p.dst.kill();
    let out = migrating.join().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("migration failed") && err.contains("still running on the source"),
        "{err}"
    );
    assert_runs_on_source(&p);
}

#[test]
fn nothing_listening_is_a_clear_error_and_the_guest_stays() {
    if !kvm_or_skip("nothing_listening_is_a_clear_error_and_the_guest_stays") {
        return;
    }
    let mut p = Pair::start("64M", "1000");
    p.dst.kill();
    let out = p.migrate(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to the destination"), "{err}");
    assert_runs_on_source(&p);
}

#[test]
fn bad_command_lines_are_one_line_errors() {
    let out = ferry(&["vm", "run", "--mem", "64M", "--append", "rate=1 colour=red"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown guest parameter `colour`"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let out = ferry(&["vm", "run", "--mem", "lots"]);
    assert_eq!(out.status.code(), Some(2));

    let out = ferry(&[
        "vm",
        "run",
        "--mem",
        "64M",
        "--cpus",
        "2",
        "--dirty-cpus",
        "3",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dirty-cpus 3 is more than"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let out = ferry(&[
        "migrate",
        "--api",
        "/x",
        "--to",
        "h:1",
        "--converge",
        "fast",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("want `auto-converge`, `dirty-limit`"), "{err}");

    for (limit, why) in [
        ("0", "less than the 1 MB/s a vCPU needed"),
        ("99999999", "more than the 1000000 MB/s a vCPU allowed"),
        ("fast", "is not a rate"),
    ] {
        let out = ferry(&[
            "migrate",
            "--api",
            "/x",
            "--to",
            "h:1",
            "--vcpu-dirty-limit",
            limit,
        ]);
        assert_eq!(out.status.code(), Some(2), "{limit}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{limit}: {err}");
    }

    let out = ferry(&[
        "migrate",
        "--api",
        "/nonexistent/ferry.sock",
        "--to",
        "127.0.0.1:1",
        "--insecure",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("no control socket at /nonexistent/ferry.sock"));
}

/// `--converge dirty-limit` end to end: a 2-vCPU guest of which only vCPU
/// 0 dirties (`--dirty-cpus 1`), faster than a capped link; the summary
/// says dirty-limit throttled vCPU 0 and left vCPU 1 alone, and the guest
/// runs on at the destination.
#[test]
fn dirty_limit_throttles_the_dirtying_vcpu_only() {
    if !kvm_or_skip("dirty_limit_throttles_the_dirtying_vcpu_only") {
        return;
    }
    let mut p = Pair::start_with(
        "64M",
        "10000",
        &[
            "--cpus",
            "2",
            "--dirty-cpus",
            "1",
            "--dirty-log",
            "ring",
            "--wss",
            "16M",
        ],
    );
    let out = p.migrate(&[
        "--converge",
        "dirty-limit",
        "--max-bandwidth",
        "15M",
        "--no-delta",
        "--deadline-s",
        "120",
    ]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.log("src")
    );
    let limited = events(&out).any(|e| {
        matches!(
            e,
            Event::RoundFinished { assessment, .. }
                if matches!(assessment.decision, Decision::LimitVcpus { .. })
        )
    });
    assert!(limited, "dirty-limit never stepped in");
    let s = summary(&out);
    assert_eq!(s.converge, "dirty-limit", "{s:?}");
    let t = &s.vcpu_max_throttle_percent;
    assert!(t[0] > 0, "vCPU 0 not throttled: {s:?}");
    assert_eq!(t[1], 0, "quiet vCPU 1 throttled: {s:?}");
    let d = &s.vcpu_dirty_pages;
    assert!(d[0] > d[1], "{s:?}");
    assert_runs_on_destination(&mut p);
}

#[test]
fn a_guest_too_big_for_the_host_is_refused() {
    if !kvm_or_skip("a_guest_too_big_for_the_host_is_refused") {
        return;
    }
    let out = ferry(&["vm", "run", "--mem", "60G", "--duration", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reserve") && err.contains("try a smaller --mem"),
        "{err}"
    );
}

#[test]
fn demo_runs_and_its_checks_pass() {
    if !kvm_or_skip("demo_runs_and_its_checks_pass") {
        return;
    }
    let out = ferry(&["demo", "--mem", "256M", "--watch-s", "1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("migration summary"));
    assert_eq!(stdout.matches("[ ok ]").count(), 5, "{stdout}");
    assert!(!stdout.contains("FAIL"));

    // The commands it prints can be pasted as they are: every flag and
    // value parses (clap checks them before it acts on `--help`).
    let printed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("   ferry "))
        .chain(
            stdout
                .split('`')
                .skip(1)
                .step_by(2)
                .filter_map(|c| c.strip_prefix("ferry ")),
        )
        .collect();
    assert_eq!(
        printed.len(),
        5,
        "the demo's commands: {printed:?}\n{stdout}"
    );
    for line in printed {
        let mut args = shell_words(line);
        args.push("--help".into());
        let out = Command::new(FERRY).args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "`ferry {line}` does not parse: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Splits a line as a POSIX shell would for words made of plain characters
/// and single-quoted parts (what the demo prints).
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted, mut in_word) = (Vec::new(), String::new(), false, false);
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(!quoted, "unbalanced quote in {line:?}");
    if in_word {
        words.push(word);
    }
    words
}

#[test]
fn compression_and_deltas_can_be_switched_off() {
    if !kvm_or_skip("compression_and_deltas_can_be_switched_off") {
        return;
    }
    let p = Pair::start("64M", "2000");
    let out = p.migrate(&["--no-compress", "--no-delta"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = summary(&out);
    let pages = s.pages;
    assert_eq!(pages.lz4, 0, "{pages:?}");
    assert_eq!(pages.xor_delta, 0, "{pages:?}");
    assert!(pages.raw > 10_000, "{pages:?}");
    // 64-bit counts are strings, so scripts with 53-bit numbers can
    // trust them; floats stay numbers.
    #[derive(serde::Deserialize)]
    struct Written {
        summary: WrittenSummary,
    }
    #[derive(serde::Deserialize)]
    struct WrittenSummary {
        pages: std::collections::BTreeMap<String, String>,
        wire_bytes: String,
        memory_digest: String,
        downtime_ms: f64,
    }
    let last = out.stdout.trim_ascii_end().rsplit(|&b| b == b'\n').next();
    let written: Written = serde_json::from_slice(last.unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let w = written.summary;
    assert!(!w.pages.is_empty(), "{:?}", w.pages);
    assert_eq!(w.wire_bytes, s.wire_bytes.to_string());
    assert_eq!(w.memory_digest, s.memory_digest.to_string());
    assert_eq!(w.downtime_ms, s.downtime_ms);
    let dst = status(&p.api("dst")).expect("destination answers");
    assert_eq!(guest(&dst).verify_errors, 0, "{dst:?}");
}

/// `ferry migrate` on a terminal (a pseudo-terminal from util-linux's
/// `script`): the bar of the last round ends at 100 % and stays, decisions
/// read as words, and no raw JSON reaches the screen.
#[test]
fn the_terminal_shows_words_and_a_bar_that_ends_at_100_percent() {
    if !kvm_or_skip("the_terminal_shows_words_and_a_bar_that_ends_at_100_percent") {
        return;
    }
    if Command::new("script").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("FERRY_NO_SKIP").is_none(),
            "FERRY_NO_SKIP is set, so this test may not skip"
        );
        eprintln!("SKIPPED: the_terminal_shows_words_and_a_bar_that_ends_at_100_percent: no `script` (util-linux) to give ferry a terminal");
        return;
    }
    let mut p = Pair::start("64M", "2000");
    let api = p.api("src");
    let mut words = vec![
        FERRY.to_owned(),
        "migrate".into(),
        "--api".into(),
        api.to_str().unwrap().into(),
        "--to".into(),
        p.addr.clone(),
        "--insecure".into(),
    ];
    words.extend(common::pause_limit_flags(&[]).iter().map(|s| s.to_string()));
    // The words are paths and flags without quotes or spaces.
    let out = Command::new("script")
        .args(["-qec", &words.join(" "), "/dev/null"])
        .output()
        .expect("run script");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(
        screen.contains("100%  done: the guest runs at the destination"),
        "the bar must end at 100 %: {screen}"
    );
    assert!(screen.contains("-> stop and copy"), "{screen}");
    assert!(screen.contains("migration summary"), "{screen}");
    assert!(
        !screen.contains("{\""),
        "raw JSON on the terminal: {screen}"
    );
    assert_runs_on_destination(&mut p);
}
