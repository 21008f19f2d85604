//! One `bench compare` session: the TCP ceiling, then every workload with
//! QEMU and ferry profiles alternating, then the report files. Before each
//! run the session waits (a while) for the machine to be quiet, and it
//! records the machine's state and other work's CPU with every run; the
//! shaped link of a workload is set up before its runs and removed after.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::bench::ceiling::{self, Ceiling};
use crate::bench::error::BenchError;
use crate::bench::machine::{self, MachineState};
use crate::bench::matrix::{
    interleave, DirtyLevel, DstMemory, FerryProfile, Fill, Link, Profile, QemuProfile, Rate,
    Workload,
};
use crate::bench::outcome::{RunOutcome, RunStatus};
use crate::bench::report::{self, Aggregate, FloorCheck};
use crate::bench::run_common::RunContext;
use crate::bench::settings::RunSettings;
use crate::bench::shaped_link::{LinkInfo, ShapedLink};
use crate::bench::{ferry, qemu};

/// A line of `--json-out` (JSON lines): `{"kind": "session", ...}` first,
/// then ceilings, shaped links, runs as they finish, aggregates and floors.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JsonLine<'a> {
    /// What ran where, once at the start.
    Session(Session<'a>),
    /// A plain TCP stream's rate on the same loopback.
    Ceiling {
        /// Its figures.
        ceiling: &'a Ceiling,
    },
    /// A shaped link set up for the rows after it.
    Link {
        /// How it is shaped.
        link: &'a LinkInfo,
    },
    /// One run of one engine profile on one workload.
    Run {
        /// Its outcome.
        run: &'a RunOutcome,
    },
    /// A row's runs of one profile, summarised.
    Aggregate {
        /// The summary.
        aggregate: &'a Aggregate,
    },
    /// A promise checked against the aggregates.
    Floor {
        /// The check.
        floor: &'a FloorCheck,
    },
}

/// The session line of `--json-out`.
#[derive(Debug, Serialize)]
pub struct Session<'a> {
    /// CPU model and count, kernel.
    pub machine: String,
    /// The machine's state at the start.
    pub machine_state_start: &'a MachineState,
    /// `qemu-system-x86_64 --version`'s first line, if it ran.
    pub qemu: Option<String>,
    /// The ferry binary measured.
    pub ferry_bin: &'a Path,
    /// The guest image both engines boot.
    pub kernel_image: &'a Path,
    /// ferry's downtime limit, ms.
    pub max_downtime_ms: u64,
    /// QEMU's downtime limits, ms.
    pub qemu_downtime_limits_ms: &'a [u64],
    /// Other work above this many CPUs marks a run busy.
    pub busy_cpus: f64,
    /// Runs per profile and row.
    pub repeat: u32,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// Guest memory sizes, bytes.
    pub mems: Vec<u64>,
    /// Dirty levels.
    pub levels: Vec<DirtyLevel>,
    /// Guest memory contents.
    pub fills: Vec<Fill>,
    /// Links.
    pub links: Vec<Link>,
    /// How destinations are prepared (the same for both engines).
    pub dst_memories: Vec<DstMemory>,
    /// QEMU profiles.
    pub qemu_profiles: Vec<QemuProfile>,
    /// Downtime limits QEMU's profiles run with, ms (ferry's is
    /// `settings.max_downtime_ms`; ratios and floors use QEMU's runs at
    /// that one).
    pub qemu_downtime_limits_ms: Vec<u64>,
    /// ferry profiles.
    pub ferry_profiles: Vec<FerryProfile>,
    /// vCPUs of every workload's guest (ferry `--cpus`, QEMU `-smp`).
    pub cpus: u32,
    /// vCPUs running a dirty loop in every workload (0: all of `cpus`).
    pub dirty_cpus: u32,
    /// The guest's timer mode in every workload (`hz=`; 0 off).
    pub hz: u64,
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
        let limit = settings.max_downtime_ms;
        Self {
            mems: vec![256 << 20],
            levels: vec![DirtyLevel::Moderate],
            fills: vec![Fill::Random],
            links: vec![Link::Loopback],
            dst_memories: vec![DstMemory::Prepared],
            custom: Some(Workload {
                mem_bytes: 256 << 20,
                level: DirtyLevel::Moderate,
                wss_bytes: Some(64 << 20),
                rate: Rate::Paced(1_000),
                cap_bytes_per_sec: None,
                fill: Fill::Random,
                link: Link::Loopback,
                dst_memory: DstMemory::Prepared,
                cpus: 1,
                dirty_cpus: 0,
                hz: 0,
            }),
            qemu_profiles: vec![QemuProfile::Default],
            qemu_downtime_limits_ms: vec![limit],
            ferry_profiles: vec![FerryProfile::Default],
            cpus: 1,
            dirty_cpus: 0,
            hz: 0,
            repeat: 1,
            ceiling_bytes: 256 << 20,
            json_out: None,
            plot_out: None,
            settings,
        }
    }

    /// The workloads: per link (so each shaped link is set up once),
    /// smallest memory first.
    pub fn workloads(&self) -> Vec<Workload> {
        if let Some(w) = self.custom {
            return vec![w
                .with_vcpus(self.cpus, self.hz)
                .with_dirty_cpus(self.dirty_cpus)];
        }
        let mut v = Vec::new();
        for &link in &self.links {
            for &m in &self.mems {
                for &l in &self.levels {
                    for &fill in &self.fills {
                        for &d in &self.dst_memories {
                            v.push(
                                Workload::new(m, l)
                                    .with_fill(fill)
                                    .with_link(link)
                                    .with_dst_memory(d)
                                    .with_vcpus(self.cpus, self.hz)
                                    .with_dirty_cpus(self.dirty_cpus),
                            );
                        }
                    }
                }
            }
        }
        v
    }

    /// Runs per workload.
    pub fn runs_per_workload(&self) -> usize {
        (self.qemu_profiles.len() * self.qemu_downtime_limits_ms.len() + self.ferry_profiles.len())
            * self.repeat as usize
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
    /// The issue's floors.
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
    let mut emit = |line: JsonLine<'_>| -> Result<(), BenchError> {
        if let (Some(f), Some(p)) = (json_file.as_mut(), cfg.json_out.as_ref()) {
            let out_err = |e| BenchError::Output(p.display().to_string(), e);
            serde_json::to_writer(&mut *f, &line).map_err(|e| out_err(e.into()))?;
            writeln!(f).map_err(out_err)?;
        }
        Ok(())
    };
    let qemu_version = std::process::Command::new(&s.qemu_bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| v.lines().next().map(str::to_string));
    let state = MachineState::now();
    let session = Session {
        machine: crate::bench::procfs::machine(),
        machine_state_start: &state,
        qemu: qemu_version,
        ferry_bin: &s.ferry_bin,
        kernel_image: &s.kernel,
        max_downtime_ms: s.max_downtime_ms,
        qemu_downtime_limits_ms: &cfg.qemu_downtime_limits_ms,
        busy_cpus: s.busy_cpus,
        repeat: cfg.repeat,
    };
    notes.push(format!(
        "machine: {}; at start: {}",
        crate::bench::procfs::machine(),
        state.summary()
    ));
    emit(JsonLine::Session(session))?;
    let mut ceilings = Vec::new();
    for conns in [1, 4] {
        let c = ceiling::measure(conns, cfg.ceiling_bytes)?;
        emit(JsonLine::Ceiling { ceiling: &c })?;
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
    // The shaped link of the workloads being run: (which, the link or why not).
    let mut link: Option<(Link, Result<ShapedLink, String>)> = None;
    for w in cfg.workloads() {
        if let Link::Shaped { bits_per_sec } = w.link {
            if link.as_ref().map(|(l, _)| *l) != Some(w.link) {
                drop(link.take()); // the previous one goes first (same names)
                let made = ShapedLink::create(bits_per_sec).map_err(|e| e.to_string());
                match &made {
                    Ok(l) => {
                        notes.push(l.describe());
                        emit(JsonLine::Link { link: l.info() })?;
                    }
                    Err(e) => notes.push(format!("{} rows skipped: {e}", w.link)),
                }
                link = Some((w.link, made));
            }
        } else {
            link = None;
        }
        let shaped = match &link {
            Some((_, Ok(l))) => Ok(Some(l)),
            Some((_, Err(e))) => Err(e.clone()),
            None => Ok(None),
        };
        for (rep, profile) in interleave(&cfg.qemu_profiles, &cfg.ferry_profiles, cfg.repeat) {
            let limits = match profile {
                Profile::Qemu(_) => cfg.qemu_downtime_limits_ms.clone(),
                Profile::Ferry(_) => vec![s.max_downtime_ms],
            };
            for limit in limits {
                let skip = match (&shaped, profile) {
                    (Err(e), _) => Some(e.clone()),
                    (_, Profile::Qemu(_)) => qemu_skip.clone(),
                    (_, Profile::Ferry(p)) => ferry_skip
                        .iter()
                        .find(|(q, _)| *q == p)
                        .map(|(_, why)| why.clone()),
                };
                let outcome = match (skip, &shaped) {
                    (Some(why), _) => {
                        RunOutcome::new(profile, w, rep, limit, RunStatus::Skipped(why))
                    }
                    (None, Ok(l)) => {
                        let ctx = RunContext {
                            settings: s,
                            link: *l,
                        };
                        measured_run(&ctx, &w, profile, limit, rep)
                    }
                    (None, Err(_)) => unreachable!("a failed link is a skip"),
                };
                emit(JsonLine::Run { run: &outcome })?;
                progress(&outcome);
                runs.push(outcome);
            }
        }
    }
    drop(link);
    notes.push(format!(
        "at the end: {} (other work on the machine slows both engines)",
        MachineState::now().summary()
    ));
    let busy = runs.iter().filter(|r| r.busy).count();
    if busy > 0 {
        notes.push(format!(
            "{busy} of {} runs were measured while other work used more than {:.2} CPUs: their rows' floors get no verdict; measure on a quiet machine",
            runs.len(),
            s.busy_cpus
        ));
    }
    let ceiling_bps = ceilings
        .iter()
        .map(|c| c.bytes_per_sec)
        .max_by(f64::total_cmp);
    let aggregates = report::aggregate(&runs, ceiling_bps, s.max_downtime_ms);
    for a in &aggregates {
        emit(JsonLine::Aggregate { aggregate: a })?;
    }
    let floors = report::floors(&aggregates, &ceilings);
    for f in &floors {
        emit(JsonLine::Floor { floor: f })?;
    }
    if let Some(p) = &cfg.plot_out {
        crate::bench::plot::bytes_left_svg(&runs, p)?;
    }
    Ok(CompareReport {
        ceilings,
        runs,
        aggregates,
        floors,
        notes,
    })
}

/// One run, after waiting for a quiet machine, with the machine's state
/// and other work's CPU recorded and the busy flag set.
fn measured_run(
    ctx: &RunContext<'_>,
    w: &Workload,
    profile: Profile,
    limit: u64,
    rep: u32,
) -> RunOutcome {
    let s = ctx.settings;
    let (before, _) = machine::wait_quiet(s.busy_cpus, s.quiet_wait);
    let state = MachineState::now();
    let mut out = match profile {
        Profile::Qemu(p) => qemu::run(ctx, w, p, limit, rep),
        Profile::Ferry(p) => ferry::run(ctx, w, p, rep),
    };
    out.machine = state;
    out.others_cpus_before = before;
    out.busy = [before, out.others_cpus]
        .iter()
        .any(|o| o.is_some_and(|o| o > s.busy_cpus));
    out
}

/// One line about a finished run, for progress output: the figures, how it
/// ended, and the machine it ran on.
pub fn run_line(r: &RunOutcome) -> String {
    let f = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.1}"));
    let status = if r.succeeded() {
        "ok".to_string()
    } else {
        match &r.status {
            RunStatus::Skipped(w) => format!("skipped: {w}"),
            _ => shout_head(&r.failure().unwrap_or_default()),
        }
    };
    let others = |o: Option<f64>| o.map_or("?".into(), |o| format!("{o:.2}"));
    format!(
        "[{}] {} limit {} ms #{}: total {} ms (engine {} ms), downtime {} ms, hb gap {} ms{}, rounds {}: {status} | {}, others' CPUs {} before / {} during{}",
        r.row,
        r.profile,
        r.downtime_limit_ms,
        r.repeat,
        f(r.total_ms),
        f(r.engine_total_ms),
        f(r.downtime_ms),
        f(r.heartbeat_gap_ms),
        r.gap_parts_ms
            .map_or(String::new(), |(a, b)| format!(" ({a:.1} + {b:.1})")),
        r.rounds.map_or("-".into(), |x| x.to_string()),
        r.machine.summary(),
        others(r.others_cpus_before),
        others(r.others_cpus),
        if r.busy { " BUSY" } else { "" },
    )
}

/// `failed: x` -> `FAILED: x` (the words before the first colon), so
/// failures stand out in the progress lines.
fn shout_head(s: &str) -> String {
    match s.split_once(':') {
        Some((head, tail)) => format!("{}:{tail}", head.to_uppercase()),
        None => s.to_uppercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_say_their_kind_first() {
        let c = Ceiling {
            connections: 4,
            bytes: 1 << 30,
            secs: 0.5,
            bytes_per_sec: 2.0 * f64::from(1u32 << 30),
            cpu_secs: 0.25,
        };
        assert_eq!(
            serde_json::to_string(&JsonLine::Ceiling { ceiling: &c }).unwrap(),
            r#"{"kind":"ceiling","ceiling":{"connections":4,"bytes":1073741824,"secs":0.5,"bytes_per_sec":2147483648.0,"cpu_secs":0.25}}"#
        );
        let state = MachineState::now();
        let session = Session {
            machine: "test".into(),
            machine_state_start: &state,
            qemu: None,
            ferry_bin: Path::new("/bin/ferry"),
            kernel_image: Path::new("/guest.elf"),
            max_downtime_ms: 20,
            qemu_downtime_limits_ms: &[20, 300],
            busy_cpus: 0.5,
            repeat: 1,
        };
        let line = serde_json::to_string(&JsonLine::Session(session)).unwrap();
        assert!(
            line.starts_with(r#"{"kind":"session","machine":"test","#),
            "{line}"
        );
        assert!(
            line.contains(r#""qemu_downtime_limits_ms":[20,300]"#),
            "{line}"
        );
    }
}
