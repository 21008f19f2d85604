//! `ferry bench compare --quick` runs the smallest row with both engines and
//! produces the table, the JSON lines and the plot. It reports speeds; this
//! test checks only that both engines' rows were measured and that each
//! migrated guest lives on at its destination.

use std::path::Path;
use std::process::Command;

use ferry_harness::bench::machine::MachineState;
use ferry_harness::bench::matrix::Engine;
use ferry_harness::bench::outcome::{BytesLeft, RunStatus, StaticCheck};
use serde::Deserialize;

fn skip_reason() -> Option<String> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Some("/dev/kvm is missing or not usable".into());
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        return Some(
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)".into(),
        );
    }
    None
}

/// Runs `ferry ARGS`, returning its output and PID.
fn run_ferry(args: &[&std::ffi::OsStr]) -> (std::process::Output, u32) {
    let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    (child.wait_with_output().unwrap(), pid)
}

/// No process still has the session's work directory (QMP sockets, control
/// sockets) on its command line.
fn assert_nothing_left(pid: u32) {
    let marker = format!("ferry-bench-{pid}/");
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(!cmdline.contains(&marker), "left running: {cmdline}");
    }
}

/// A line of `--json-out`: a run (the bench's `RunOutcome`, the fields
/// this test reads), or another kind.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Line {
    Run {
        run: Box<Run>,
    },
    #[serde(other)]
    Other,
}

/// The fields of a `RunOutcome` this test checks, with its own types.
#[derive(Debug, Deserialize)]
struct Run {
    engine: Engine,
    #[serde(flatten)]
    status: RunStatus,
    guest_alive: Option<bool>,
    alive_detail: String,
    verify_errors: Option<u64>,
    total_ms: Option<f64>,
    engine_total_ms: Option<f64>,
    static_memory: StaticCheck,
    machine: MachineState,
    rounds: Option<u64>,
    heartbeat_gap_ms: Option<f64>,
    src_cpu_s: Option<f64>,
    dst_cpu_s: Option<f64>,
    bytes_left: Vec<BytesLeft>,
}

fn runs_of(jsonl: &Path) -> Vec<Run> {
    std::fs::read_to_string(jsonl)
        .expect("the JSON lines file exists")
        .lines()
        .map(|l| serde_json::from_str::<Line>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter_map(|l| match l {
            Line::Run { run } => Some(*run),
            Line::Other => None,
        })
        .collect()
}

#[test]
fn quick_compare_measures_both_engines() {
    if let Some(why) = skip_reason() {
        assert!(
            std::env::var_os("FERRY_NO_SKIP").is_none(),
            "FERRY_NO_SKIP is set, so this test may not skip"
        );
        eprintln!("SKIP quick_compare_measures_both_engines: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("runs.jsonl");
    let svg = dir.path().join("plot.svg");
    let (out, pid) = run_ferry(&[
        "bench".as_ref(),
        "compare".as_ref(),
        "--quick".as_ref(),
        "--json-out".as_ref(),
        jsonl.as_os_str(),
        "--plot".as_ref(),
        svg.as_os_str(),
    ]);
    assert_nothing_left(pid);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench compare failed:\n{stdout}\n{stderr}"
    );

    // The table has a line per engine with the ratio columns.
    assert!(stdout.contains("total/Qbest"), "no table header:\n{stdout}");
    assert!(stdout.contains("qemu:default"), "no QEMU row:\n{stdout}");
    assert!(stdout.contains("ferry:default"), "no ferry row:\n{stdout}");
    assert!(stdout.contains("TCP ceiling"), "no TCP ceiling:\n{stdout}");
    assert!(
        stdout.contains("at start: THP "),
        "no machine state:\n{stdout}"
    );
    assert!(
        stderr.contains("others' CPUs"),
        "no machine state per run:\n{stderr}"
    );

    // One JSON run per engine, each migrated with the guest alive after.
    let runs = runs_of(&jsonl);
    for engine in [Engine::Qemu, Engine::Ferry] {
        let r = runs
            .iter()
            .find(|r| r.engine == engine)
            .unwrap_or_else(|| panic!("no {engine} run in {runs:?}"));
        assert_eq!(r.status, RunStatus::Completed, "{engine}: {r:?}\n{stderr}");
        assert_eq!(r.guest_alive, Some(true), "{engine}: {}", r.alive_detail);
        assert_eq!(r.verify_errors, Some(0), "{engine}: {r:?}");
        assert!(r.total_ms.unwrap() > 0.0, "{engine}: {r:?}");
        // The harness's clock runs from the migrate command to the guest
        // running on the destination; the engine's own figure is kept beside.
        assert!(r.engine_total_ms.unwrap() > 0.0, "{engine}: {r:?}");
        assert!(
            matches!(r.static_memory, StaticCheck::Matched(_)),
            "{engine}: {r:?}"
        );
        assert!(!r.machine.thp_enabled.is_empty(), "{engine}: {r:?}");
        assert!(r.rounds.unwrap() >= 1, "{engine}: {r:?}");
        assert!(
            r.heartbeat_gap_ms.is_some(),
            "{engine}: no heartbeat gap: {r:?}"
        );
        assert!(
            r.src_cpu_s.is_some() && r.dst_cpu_s.is_some(),
            "{engine}: {r:?}"
        );
        assert!(!r.bytes_left.is_empty(), "{engine}: no bytes-left samples");
    }
    let plot = std::fs::read_to_string(&svg).expect("the plot was written");
    assert!(plot.contains("qemu:default") && plot.contains("ferry:default"));
}

#[test]
fn missing_qemu_and_a_bad_image_are_reported_per_row() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        assert!(
            std::env::var_os("FERRY_NO_SKIP").is_none(),
            "FERRY_NO_SKIP is set, so this test may not skip"
        );
        eprintln!("SKIP missing_qemu_and_a_bad_image_are_reported_per_row: /dev/kvm is missing or not usable");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("runs.jsonl");
    let svg = dir.path().join("plot.svg");
    let bad_image = dir.path().join("not-a-guest.elf");
    std::fs::write(&bad_image, b"this is not a multiboot image").unwrap();
    let (out, pid) = run_ferry(&[
        "bench".as_ref(),
        "compare".as_ref(),
        "--quick".as_ref(),
        "--qemu".as_ref(),
        "/nonexistent/qemu-system-x86_64".as_ref(),
        "--kernel".as_ref(),
        bad_image.as_os_str(),
        "--json-out".as_ref(),
        jsonl.as_os_str(),
        "--plot".as_ref(),
        svg.as_os_str(),
    ]);
    assert_nothing_left(pid);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("apt-get install qemu-system-x86"),
        "no install hint:\n{stdout}"
    );
    let runs = runs_of(&jsonl);
    let qemu = runs
        .iter()
        .find(|r| r.engine == Engine::Qemu)
        .expect("a QEMU row");
    assert!(
        matches!(&qemu.status, RunStatus::Skipped(why) if why.contains("apt-get install qemu-system-x86")),
        "{qemu:?}"
    );
    // ferry's row still ran, and says why it failed.
    let ferry = runs
        .iter()
        .find(|r| r.engine == Engine::Ferry)
        .expect("a ferry row");
    assert!(
        matches!(&ferry.status, RunStatus::Failed(why) if !why.is_empty()),
        "{ferry:?}"
    );
    assert!(
        stdout.contains("ferry:default (limit 20 ms): failed:"),
        "{stdout}"
    );
}
