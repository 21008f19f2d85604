//! The seeded fault campaign: real `ferry vm run` / `ferry vm receive` /
//! `ferry migrate` processes, real KVM guests, and the project's own fault
//! proxy between source and destination (2 lanes). Each trial draws one
//! fault (a cut, flipped bit, truncation or stall, in either direction, at
//! a random byte offset or at a chosen frame: Hello, state, digest, GO,
//! HelloAck, Ready, Running), or a `kill -9` of the source, the
//! destination or the client while the proxy holds the handover open.
//!
//! Every trial must end with the guest running on exactly one side (its
//! self-check clean), or in doubt only when the destination died, and
//! then `ferry vm resolve resume` runs it on the source. A destination
//! that did not get the guest must be back to waiting and end on `quit`,
//! its port free. The outcome table is printed.
//!
//! `FERRY_FAULT_TRIALS` (default 4) trials from `FERRY_FAULT_SEED`
//! (default 12): a few minutes at most by default, more on demand.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fault_proxy::{pick, Action, Direction, Fault, FaultProxy, Place, Rng};
use common::{ferry, guest, heartbeat, status, Pair, FERRY};
use ferry_control::json::{MigrateLine, MigrateOutcome};
use ferry_control::{GuestHome, StatusReply};
use ferry_e2e::process::ProcessGuard;
use ferry_transport::FrameKind;
use ferry_vm::testing::kvm_or_skip;

/// What a trial does.
#[derive(Debug, Clone, Copy)]
enum Trial {
    /// A link fault.
    Link(Fault),
    /// Hold the handover at `kind` (stalled toward `direction`) and kill
    /// `who` meanwhile.
    Kill {
        direction: Direction,
        kind: FrameKind,
        who: Who,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Source,
    Destination,
    Client,
}

/// Where the guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Home {
    Source,
    Destination,
    /// In doubt, then resolved (resumed on the source).
    ResolvedOnSource,
}

fn draw(rng: &mut Rng) -> Trial {
    if rng.u8(..3) == 0 {
        let (direction, kind) = *pick(
            rng,
            &[
                (Direction::ToDestination, FrameKind::Go),
                (Direction::ToSource, FrameKind::Running),
                (Direction::ToSource, FrameKind::Ready),
            ],
        );
        Trial::Kill {
            direction,
            kind,
            who: *pick(rng, &[Who::Source, Who::Destination, Who::Client]),
        }
    } else {
        Trial::Link(Fault::draw(rng, 2, 64 << 20))
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn is_running_here(s: &StatusReply) -> bool {
    s.state == GuestHome::Here && s.run_state == Some(ferry_vm::RunState::Running)
}

#[test]
fn seeded_faults_always_leave_the_guest_running_on_exactly_one_side() {
    if !kvm_or_skip("seeded_faults_always_leave_the_guest_running_on_exactly_one_side") {
        return;
    }
    let trials = env_u64("FERRY_FAULT_TRIALS", 4);
    let seed = env_u64("FERRY_FAULT_SEED", 12);
    let mut rng = Rng::with_seed(seed);
    let mut table = Vec::new();
    for i in 0..trials {
        let trial = draw(&mut rng);
        let (home, settle) = run_trial(&trial);
        table.push(format!(
            "| {i:>3} | {:<90} | {:<18} | {:>8.0} |",
            format!("{trial:?}"),
            format!("{home:?}"),
            settle.as_secs_f64() * 1e3
        ));
    }
    eprintln!("fault campaign, seed {seed}, {trials} trials");
    eprintln!(
        "| {:>3} | {:<90} | {:<18} | {:>8} |",
        "#", "fault", "guest ended on", "settle ms"
    );
    for row in &table {
        eprintln!("{row}");
    }
}

/// One trial; returns where the guest ended and how long after the fault
/// (or the kill) every process had settled.
fn run_trial(trial: &Trial) -> (Home, Duration) {
    let mut p = Pair::start("64M", "2000");
    let target = p.addr.parse().expect("loopback address");
    let fault = match *trial {
        Trial::Link(f) => f,
        Trial::Kill {
            direction, kind, ..
        } => Fault {
            connection: 0,
            direction,
            place: Place::Frame(kind),
            action: Action::Stall(Duration::from_secs(3)),
        },
    };
    let proxy = FaultProxy::spawn(target, fault).expect("start the fault proxy");
    let src_api = p.api("src");
    let dst_api = p.api("dst");
    let to = proxy.addr.to_string();
    let mut client = ProcessGuard::spawn(
        "ferry migrate",
        Command::new(FERRY)
            .args(["migrate", "--json", "--insecure", "--lanes", "2", "--api"])
            .arg(&src_api)
            .args(["--to", &to, "--deadline-s", "60"]),
        &p.dir.path().join("migrate.log"),
    )
    .expect("start ferry migrate");
    let start = Instant::now();
    let mut killed = None;
    // The client ends, or the trial's kill happens while the proxy holds
    // the handover.
    while client.is_running() && start.elapsed() < Duration::from_secs(90) {
        if let (Trial::Kill { who, .. }, None, Some(_)) = (trial, killed, proxy.struck_at()) {
            std::thread::sleep(Duration::from_millis(300));
            match who {
                Who::Source => p.src.kill(),
                Who::Destination => p.dst.kill(),
                Who::Client => client.kill(),
            }
            killed = Some(*who);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !client.is_running(),
        "{trial:?}: ferry migrate still runs after 90 s:\n{}",
        std::fs::read_to_string(p.dir.path().join("migrate.log")).unwrap_or_default()
    );
    let after = proxy.struck_at().unwrap_or(start);
    // Settle: the guest runs on exactly one side, or the source is in doubt.
    let settle_until = Instant::now() + Duration::from_secs(20);
    let (home, settled) = loop {
        let src = p.src.is_running().then(|| status(&src_api)).flatten();
        let dst = p.dst.is_running().then(|| status(&dst_api)).flatten();
        let on_src = src.as_ref().is_some_and(is_running_here);
        let on_dst = dst.as_ref().is_some_and(is_running_here);
        assert!(
            !(on_src && on_dst),
            "{trial:?}: the guest runs on both sides:\n{src:?}\n{dst:?}"
        );
        let in_doubt = src.as_ref().is_some_and(|s| s.state == GuestHome::InDoubt);
        let migrating = src
            .as_ref()
            .is_some_and(|s| s.state == GuestHome::Migrating);
        if on_src && !migrating {
            break (Home::Source, src.expect("source status"));
        }
        if on_dst {
            break (Home::Destination, dst.expect("destination status"));
        }
        if in_doubt {
            assert_eq!(
                killed,
                Some(Who::Destination),
                "{trial:?}: in doubt although the destination lives:\n{}",
                p.log("src")
            );
            let out = ferry(&[
                "vm",
                "resolve",
                "--api",
                src_api.to_str().expect("utf-8 path"),
                "resume",
            ]);
            assert!(
                out.status.success(),
                "{trial:?}: resolve resume failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let s = status(&src_api).expect("the source answers");
            assert!(is_running_here(&s), "{trial:?}: resolved but {s:?}");
            break (Home::ResolvedOnSource, s);
        }
        assert!(
            Instant::now() < settle_until,
            "{trial:?}: the guest runs nowhere 20 s after the migration ended:\nsource {src:?}\ndestination {dst:?}\n{}\n{}",
            p.log("src"),
            p.log("dst")
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let settle = after.elapsed();
    assert_eq!(
        guest(&settled).verify_errors,
        0,
        "{trial:?}: the guest's self-check failed on {home:?}: {settled:?}"
    );
    // The guest keeps running where it ended.
    let api = if home == Home::Destination {
        &dst_api
    } else {
        &src_api
    };
    std::thread::sleep(Duration::from_millis(300));
    let later = status(api).expect("the guest's side answers");
    assert!(
        heartbeat(&later) > heartbeat(&settled),
        "{trial:?}: heartbeat stuck on {home:?}"
    );
    // A destination without the guest waits again, and ends on quit with
    // its port free.
    if home != Home::Destination && p.dst.is_running() {
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            let s = status(&dst_api);
            if s.as_ref().is_some_and(|s| s.state == GuestHome::Awaiting) {
                break;
            }
            assert!(
                Instant::now() < until,
                "{trial:?}: the destination did not go back to waiting: {s:?}\n{}",
                p.log("dst")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let quit = ferry_control::client::quit(&dst_api);
        let quit_until = Instant::now() + Duration::from_secs(10);
        while p.dst.is_running() && Instant::now() < quit_until {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            !p.dst.is_running(),
            "{trial:?}: the waiting destination did not end on quit ({quit:?}):\n{}",
            p.log("dst")
        );
        assert!(
            TcpListener::bind(&p.addr).is_ok(),
            "{trial:?}: the destination's port {} is still held",
            p.addr
        );
    }
    drop(proxy);
    (home, settle)
}

/// `--max-downtime-ms 1` on a dirtying guest: the command succeeds only
/// with the pause within the limit; otherwise it fails (the deadline gave
/// up with the guest on the source, or the pause went over and it says by
/// how much), and with `--on-deadline force` it completes and reports the
/// excess.
#[test]
fn a_one_ms_limit_is_met_or_the_migration_ends_as_on_deadline_says() {
    if !kvm_or_skip("a_one_ms_limit_is_met_or_the_migration_ends_as_on_deadline_says") {
        return;
    }
    let p = Pair::start("64M", "20000");
    let out = p.migrate(&["--max-downtime-ms", "1", "--deadline-s", "4"]);
    let last = common::migrate_lines(&out)
        .pop()
        .expect("ferry migrate printed nothing");
    if out.status.success() {
        let s = common::summary(&out);
        assert!(
            s.downtime_ms <= 1.0 && s.over_limit_ms == 0.0,
            "exit 0 with a pause over the limit: {s:?}"
        );
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("deadline") || stderr.contains("over the"),
            "the failure names the limit or the deadline: {stderr}"
        );
        if matches!(last, MigrateLine::Outcome(MigrateOutcome::Failed { .. })) {
            common::assert_runs_on_source(&p);
        }
    }
    // Forced: it completes, and an excess is reported, not hidden.
    let p = Pair::start("64M", "20000");
    let out = p.migrate(&[
        "--max-downtime-ms",
        "1",
        "--deadline-s",
        "2",
        "--on-deadline",
        "force",
    ]);
    assert!(
        out.status.success(),
        "forced: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = common::summary(&out);
    assert!(
        (s.over_limit_ms - (s.downtime_ms - 1.0).max(0.0)).abs() < 1e-6,
        "the excess is the downtime past the limit: {s:?}"
    );
}
