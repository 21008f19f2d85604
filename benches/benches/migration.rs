//! `cargo bench -p ferry-benches --bench migration`: the same session as
//! `ferry bench compare`, with settings from the environment:
//! `FERRY_BENCH_QUICK=1` for the CI row, `FERRY_BENCH_REPEAT=N`,
//! `FERRY_BENCH_MEM=1G,2G`, `FERRY_BIN` for the ferry binary (default: the
//! one built next to this bench), `FERRY_BENCH_OUT=DIR` for the JSON lines
//! and the plot (default `target/bench-compare`).

use ferry_harness::bench::compare::{self, CompareConfig};
use ferry_harness::bench::matrix::{DirtyLevel, DstMemory, Fill, Link, Profile, QemuProfile};
use ferry_harness::bench::settings::RunSettings;

fn parse_mem(s: &str) -> Option<u64> {
    ferry_vm::parse_size(s.trim(), 1 << 20)
}

fn main() {
    // cargo passes `--bench`; criterion-style filters are ignored.
    let Some(ferry_bin) = ferry_harness::bench::locate_ferry() else {
        eprintln!("SKIP migration bench: no ferry binary (build it: cargo build -p ferry, or set FERRY_BIN)");
        return;
    };
    let tsc_khz = match ferry_vm::host_tsc_khz() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("SKIP migration bench: KVM unusable here: {e}");
            return;
        }
    };
    let workdir = tempfile_dir();
    let out = std::env::var("FERRY_BENCH_OUT").unwrap_or_else(|_| "target/bench-compare".into());
    let settings = RunSettings {
        kernel: ferry_vm::guest_elf_path().to_path_buf(),
        custom_kernel: false,
        tsc_khz,
        max_downtime_ms: 20,
        deadline: None,
        ferry_bin,
        qemu_bin: "qemu-system-x86_64".into(),
        workdir: workdir.clone(),
        verbose: true,
        busy_cpus: RunSettings::BUSY_CPUS,
        quiet_wait: std::time::Duration::from_secs(60),
    };
    let mut cfg = if std::env::var_os("FERRY_BENCH_QUICK").is_some() {
        CompareConfig::quick(settings)
    } else {
        CompareConfig {
            mems: vec![1 << 30, 2 << 30],
            levels: DirtyLevel::ALL.to_vec(),
            fills: vec![Fill::Random, Fill::MIX],
            links: vec![Link::Loopback],
            dst_memories: vec![DstMemory::Prepared, DstMemory::OnDemand],
            // The convergence-mode profiles are a row of their own (2
            // vCPUs, one dirtying: `ferry bench compare --dirty-cpus 1`).
            qemu_profiles: Profile::QEMU
                .into_iter()
                .filter(|&q| q != QemuProfile::DirtyLimit)
                .collect(),
            qemu_downtime_limits_ms: vec![20],
            ferry_profiles: Profile::FERRY
                .into_iter()
                .filter(|f| !f.dirty_ring())
                .collect(),
            cpus: 1,
            dirty_cpus: 0,
            hz: 0,
            repeat: 3,
            ceiling_bytes: 2 << 30,
            json_out: None,
            plot_out: None,
            settings,
            custom: None,
        }
    };
    if let Ok(r) = std::env::var("FERRY_BENCH_REPEAT") {
        cfg.repeat = r.parse().unwrap_or(cfg.repeat);
    }
    if let Ok(m) = std::env::var("FERRY_BENCH_MEM") {
        cfg.mems = m.split(',').filter_map(parse_mem).collect();
    }
    cfg.json_out = Some(format!("{out}/runs.jsonl").into());
    cfg.plot_out = Some(format!("{out}/bytes-left.svg").into());
    match compare::run(&cfg, |r| eprintln!("{}", compare::run_line(r))) {
        Ok(report) => print!("{}", report.text()),
        Err(e) => eprintln!("migration bench failed: {e}"),
    }
    let _ = std::fs::remove_dir_all(&workdir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}
