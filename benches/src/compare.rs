//! One `bench compare` session: the TCP ceiling, then every workload with
//! QEMU and ferry profiles alternating, then the report files.

use std::io::Write;
use std::path::PathBuf;

use serde_json::json;

use crate::ceiling::{self, Ceiling};
use crate::error::BenchError;
use crate::matrix::{interleave, DirtyLevel, FerryProfile, Profile, QemuProfile, Workload};
use crate::outcome::{RunOutcome, RunStatus};
use crate::report::{self, Aggregate, FloorCheck};
use crate::settings::RunSettings;
use crate::{ferry, qemu};

/// What to run.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// Guest memory sizes, bytes.
    pub mems: Vec<u64>,
    /// Dirty levels.
    pub levels: Vec<DirtyLevel>,
    /// QEMU profiles.
    pub qemu_profiles: Vec<QemuProfile>,
    /// ferry profiles.
    pub ferry_profiles: Vec<FerryProfile>,
    /// Repetitions of each (workload, profile).
    pub repeat: u32,
    /// Bytes the TCP ceiling moves per connection count.
    pub ceiling_bytes: u64,
    /// JSON lines output.
    pub json_out: Option<PathBuf>,
    /// SVG plot output.
    pub plot_out: Option<PathBuf>,
    /// Shared run settings.
    pub settings: RunSettings,
    /// Run only this workload (instead of `mems` x `levels`).
    pub custom: Option<Workload>,
}

impl CompareConfig {
    /// The CI mode: the smallest row (a 256 MiB guest dirtying 64 MiB at
    /// 1,000 pages/s, so even debug builds converge), QEMU's and ferry's
    /// default profiles once each, a 90 s deadline unless one was given.
    pub fn quick(mut settings: RunSettings) -> Self {
        settings.deadline = settings
            .deadline
            .or(Some(std::time::Duration::from_secs(90)));
        Self {
            mems: vec![256 << 20],
            levels: vec![DirtyLevel::Moderate],
            custom: Some(Workload {
                mem_bytes: 256 << 20,
                level: DirtyLevel::Moderate,
                wss_bytes: Some(64 << 20),
                rate: 1_000,
                cap_bytes_per_sec: None,
            }),
            qemu_profiles: vec![QemuProfile::Default],
            ferry_profiles: vec![FerryProfile::Default],
            repeat: 1,
            ceiling_bytes: 256 << 20,
            json_out: None,
            plot_out: None,
            settings,
        }
    }

    /// The workloads, smallest first.
    pub fn workloads(&self) -> Vec<Workload> {
        if let Some(w) = self.custom {
            return vec![w];
        }
        let mut v = Vec::new();
        for &m in &self.mems {
            for &l in &self.levels {
                v.push(Workload::new(m, l));
            }
        }
        v
    }
}

/// Everything a session produced.
#[derive(Debug, Clone)]
pub struct CompareReport {
    /// TCP ceilings measured (1 and 4 connections).
    pub ceilings: Vec<Ceiling>,
    /// Every run.
    pub runs: Vec<RunOutcome>,
    /// Per (workload, profile).
    pub aggregates: Vec<Aggregate>,
    /// The floors.
    pub floors: Vec<FloorCheck>,
    /// Things the user should know (skips).
    pub notes: Vec<String>,
}

impl CompareReport {
    /// The highest ceiling, bytes/s.
    pub fn ceiling_bps(&self) -> Option<f64> {
        self.ceilings
            .iter()
            .map(|c| c.bytes_per_sec)
            .max_by(f64::total_cmp)
    }

    /// Table, floors and notes for the terminal.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for n in &self.notes {
            s += &format!("note: {n}\n");
        }
        s += &report::table(&self.aggregates, &self.ceilings);
        s += &report::floors_text(&self.floors);
        s
    }
}

/// Runs the session. `progress` is told about every run as it ends.
pub fn run(
    cfg: &CompareConfig,
    mut progress: impl FnMut(&RunOutcome),
) -> Result<CompareReport, BenchError> {
    let s = &cfg.settings;
    let mut notes = Vec::new();
    let mut json_file = match &cfg.json_out {
        Some(p) => {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| BenchError::Output(dir.display().to_string(), e))?;
            }
            Some(
                std::fs::File::create(p)
                    .map_err(|e| BenchError::Output(p.display().to_string(), e))?,
            )
        }
        None => None,
    };
    let mut emit = |v: serde_json::Value| -> Result<(), BenchError> {
        if let (Some(f), Some(p)) = (json_file.as_mut(), cfg.json_out.as_ref()) {
            writeln!(f, "{v}").map_err(|e| BenchError::Output(p.display().to_string(), e))?;
        }
        Ok(())
    };
    let qemu_version = std::process::Command::new(&s.qemu_bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| v.lines().next().map(str::to_string));
    let session = json!({
        "kind": "session",
        "machine": crate::procfs::machine(),
        "load_1m_start": crate::procfs::load_1m(),
        "qemu": qemu_version,
        "ferry_bin": s.ferry_bin,
        "kernel_image": s.kernel,
        "max_downtime_ms": s.max_downtime_ms,
        "repeat": cfg.repeat,
    });
    notes.push(format!(
        "machine: {}; load average at start {:.2}",
        crate::procfs::machine(),
        crate::procfs::load_1m().unwrap_or(f64::NAN)
    ));
    emit(session)?;
    let mut ceilings = Vec::new();
    for conns in [1, 4] {
        let c = ceiling::measure(conns, cfg.ceiling_bytes)?;
        emit(json!({"kind": "ceiling", "ceiling": c}))?;
        ceilings.push(c);
    }
    let qemu_skip = qemu::available(&s.qemu_bin).err();
    if let Some(why) = &qemu_skip {
        notes.push(why.clone());
    }
    let ferry_skip: Vec<(FerryProfile, String)> = cfg
        .ferry_profiles
        .iter()
        .filter_map(|&p| ferry::unsupported(s, p).map(|why| (p, why)))
        .collect();
    for (p, why) in &ferry_skip {
        notes.push(format!(
            "ferry:{} skipped: {why}",
            Profile::Ferry(*p).name()
        ));
    }
    if s.ferry_bin.components().any(|c| c.as_os_str() == "debug") {
        notes.push(format!(
            "{} is a debug build: ferry's figures are not representative (cargo build --release -p ferry)",
            s.ferry_bin.display()
        ));
    }
    let mut runs = Vec::new();
    for w in cfg.workloads() {
        for (rep, profile) in interleave(&cfg.qemu_profiles, &cfg.ferry_profiles, cfg.repeat) {
            let outcome = match profile {
                Profile::Qemu(p) => match &qemu_skip {
                    Some(why) => RunOutcome::new(profile, w, rep, RunStatus::Skipped(why.clone())),
                    None => qemu::run(s, &w, p, rep),
                },
                Profile::Ferry(p) => match ferry_skip.iter().find(|(q, _)| *q == p) {
                    Some((_, why)) => {
                        RunOutcome::new(profile, w, rep, RunStatus::Skipped(why.clone()))
                    }
                    None => ferry::run(s, &w, p, rep),
                },
            };
            emit(json!({"kind": "run", "run": outcome}))?;
            progress(&outcome);
            runs.push(outcome);
        }
    }
    notes.push(format!(
        "load average at the end {:.2} (other work on the machine slows both engines)",
        crate::procfs::load_1m().unwrap_or(f64::NAN)
    ));
    let ceiling_bps = ceilings
        .iter()
        .map(|c| c.bytes_per_sec)
        .max_by(f64::total_cmp);
    let aggregates = report::aggregate(&runs, ceiling_bps);
    for a in &aggregates {
        emit(json!({"kind": "aggregate", "aggregate": a}))?;
    }
    let floors = report::floors(&aggregates);
    for f in &floors {
        emit(json!({"kind": "floor", "floor": f}))?;
    }
    if let Some(p) = &cfg.plot_out {
        crate::plot::bytes_left_svg(&runs, p)?;
    }
    Ok(CompareReport {
        ceilings,
        runs,
        aggregates,
        floors,
        notes,
    })
}

/// One line about a finished run, for progress output.
pub fn run_line(r: &RunOutcome) -> String {
    let f = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.1}"));
    let status = match &r.status {
        RunStatus::Completed if r.succeeded() => "ok".to_string(),
        RunStatus::Completed if r.static_memory_match == Some(false) => {
            format!("MEMORY DIFFERS ({})", r.alive_detail)
        }
        RunStatus::Completed => format!("guest NOT alive ({})", r.alive_detail),
        RunStatus::NotConverged(w) => format!("not converged: {w}"),
        RunStatus::Failed(w) => format!("FAILED: {w}"),
        RunStatus::Skipped(w) => format!("skipped: {w}"),
    };
    format!(
        "[{}] {} #{}: total {} ms, downtime {} ms, hb gap {} ms{}, rounds {}: {status}",
        r.row,
        r.profile,
        r.repeat,
        f(r.total_ms),
        f(r.downtime_ms),
        f(r.heartbeat_gap_ms),
        r.gap_parts_ms
            .map_or(String::new(), |(a, b)| format!(" ({a:.1} + {b:.1})")),
        r.rounds.map_or("-".into(), |x| x.to_string()),
    )
}
