//! Trace-driven simulator: replays PlanetLab days on the CCPE 2012 setup and
//! reports energy, SLATAH, PDM, SLAV, ESV, migrations and active hosts over
//! time for each policy, under both memory models.

pub mod baseline;
pub mod bound;
pub mod datacenter;
pub mod ferry;
pub mod report;
pub mod run;
pub mod setup;
pub mod stats;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use crate::plan::ferry::FerryParams;
use crate::plan::rules::Rule;
use crate::power::{PowerModelError, PowerModels};
use crate::trace::{self, Trace, TraceError};
use baseline::Detector;
use bound::RamBound;
use datacenter::Datacenter;
use setup::{shuffled_order, vm_type_index, HostType, VM_TYPES};

/// Seconds per simulated day.
pub const DAY_SECONDS: f64 = 86_400.0;
/// Scheduling interval in seconds.
pub const STEP_SECONDS: f64 = 300.0;
/// CloudSim's first scheduling event is at 0.1 s, then every 300 s.
const FIRST_EVENT: f64 = 0.1;

/// How VM memory constrains placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryModel {
    /// CloudSim 3.0.3: RAM is checked only when a VM is created; running
    /// VMs request 0 MB ("null" utilisation model), so migrations never
    /// check memory (their duration still uses the full RAM). Also
    /// reproduces CloudSim's removal of "completed" VMs: a VM that requests
    /// exactly 0 MIPS at an update (two consecutive zero samples) leaves
    /// the simulation (`HostDynamicWorkload.getCompletedVms`).
    CloudSim,
    /// Never overcommit memory: every placement checks the full RAM, and
    /// idle VMs stay (what a real scheduler must obey).
    Strict,
}

impl MemoryModel {
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            MemoryModel::CloudSim => "cloudsim",
            MemoryModel::Strict => "strict",
        }
    }
}

/// A policy the simulator can run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Policy {
    /// No power management: every host at full power all day.
    Npa,
    /// Power follows utilisation, idle hosts off, no migrations.
    Dvfs,
    /// A CloudSim migration policy with MMT selection.
    Mmt(Detector),
    /// ferry's policy.
    Ferry(FerryParams),
}

impl Policy {
    /// The name used in the reference CSV (`thr_mmt_0.8`, ...).
    pub fn name(&self) -> String {
        match self {
            Policy::Npa => "npa".into(),
            Policy::Dvfs => "dvfs".into(),
            Policy::Mmt(d) => match d {
                Detector::Thr(p) => format!("thr_mmt_{p:.1}"),
                Detector::Iqr(p) => format!("iqr_mmt_{p:.1}"),
                Detector::Mad(p) => format!("mad_mmt_{p:.1}"),
                Detector::Lr(p) => format!("lr_mmt_{p:.1}"),
                Detector::Lrr(p) => format!("lrr_mmt_{p:.1}"),
            },
            Policy::Ferry(_) => "ferry".into(),
        }
    }

    /// Parse a name as printed by [`Policy::name`] (`ferry` takes defaults).
    pub fn parse(s: &str) -> Option<Policy> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "npa" => return Some(Policy::Npa),
            "dvfs" => return Some(Policy::Dvfs),
            "ferry" => return Some(Policy::Ferry(FerryParams::default())),
            _ => {}
        }
        if let Some(rest) = s.strip_prefix("ferry:") {
            let mut p = FerryParams::default();
            for kv in rest.split(':') {
                let (k, v) = kv.split_once('=')?;
                let x: f64 = v.parse().ok()?;
                match k {
                    "target" => p.target = x,
                    "upper" => p.upper = x,
                    "low" => p.low = x,
                    "low_steps" => p.low_for_s = x * STEP_SECONDS,
                    "low_for" => p.low_for_s = x,
                    "window" => p.window_s = x * STEP_SECONDS,
                    "cwindow" => p.consolidation_window_s = x * STEP_SECONDS,
                    "interval" => p.limits.min_move_interval_s = x,
                    "limit" => p.limits.max_migrations_per_host = x as usize,
                    "mfit" => p.memory_fit = x,
                    "dmem" => p.donors_by_memory = x != 0.0,
                    "swap" => p.swap = x != 0.0,
                    "core" => p.core_safe = x != 0.0,
                    "reuse" => p.reuse_receivers = x != 0.0,
                    "payback" if x == 0.0 => p.payback = None,
                    "horizon" => p.payback.get_or_insert_with(Default::default).horizon_s = x,
                    "sla_j" => p.payback.get_or_insert_with(Default::default).sla_joules = x,
                    _ => return None,
                }
            }
            return Some(Policy::Ferry(p));
        }
        let (kind, param) = s.split_once("_mmt_")?;
        let p: f64 = param.parse().ok()?;
        let d = match kind {
            "thr" => Detector::Thr(p),
            "iqr" => Detector::Iqr(p),
            "mad" => Detector::Mad(p),
            "lr" => Detector::Lr(p),
            "lrr" => Detector::Lrr(p),
            _ => return None,
        };
        Some(Policy::Mmt(d))
    }

    /// NPA, DVFS, the five MMT baselines of the paper, and ferry.
    pub fn all() -> Vec<Policy> {
        vec![
            Policy::Npa,
            Policy::Dvfs,
            Policy::Mmt(Detector::Thr(0.8)),
            Policy::Mmt(Detector::Iqr(1.5)),
            Policy::Mmt(Detector::Mad(2.5)),
            Policy::Mmt(Detector::Lr(1.2)),
            Policy::Mmt(Detector::Lrr(1.2)),
            Policy::Ferry(FerryParams::default()),
        ]
    }
}

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Traces could not be loaded.
    #[error("cannot load traces")]
    Trace(#[from] TraceError),
    /// Power models could not be loaded.
    #[error("cannot load power models")]
    Power(#[from] PowerModelError),
    /// The initial placement found no host for a VM.
    #[error("day {day}, {policy}: no host for VM {vm} at creation")]
    Placement {
        /// Day.
        day: String,
        /// Policy name.
        policy: String,
        /// VM index.
        vm: usize,
    },
    /// A day asked for does not exist.
    #[error("no trace day {day} under {root}")]
    NoSuchDay {
        /// Day.
        day: String,
        /// The PlanetLab root.
        root: PathBuf,
    },
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Directory with `planetlab/` and `power_models.csv`.
    pub traces: PathBuf,
    /// Days (`YYYYMMDD`); empty = all.
    pub days: Vec<String>,
    /// Policies to run.
    pub policies: Vec<Policy>,
    /// Memory models to run each policy under.
    pub memory: Vec<MemoryModel>,
    /// Hosts (800 in the published setup).
    pub hosts: usize,
    /// Assign VM types in a shuffled file order ([`shuffled_order`] with
    /// this seed) instead of the sorted one; `None` = the published order.
    pub shuffle_seed: Option<u64>,
    /// VMs per day (scale runs): VM `i` replays trace `i mod n` of the
    /// day's `n`, types assigned by index over all of them as usual;
    /// `None`: one VM per trace (the published setup). Scale hosts with
    /// VMs: each VM reserves its full MIPS at creation and only G5 cores
    /// hold types 0 and 1, so 100k VMs cannot even start on 10k hosts.
    pub vms: Option<usize>,
}

impl SimConfig {
    /// The published setup on all days, every policy, both memory models.
    pub fn published(traces: &Path) -> Self {
        Self {
            traces: traces.to_path_buf(),
            days: Vec::new(),
            policies: Policy::all(),
            memory: vec![MemoryModel::CloudSim, MemoryModel::Strict],
            hosts: 800,
            shuffle_seed: None,
            vms: None,
        }
    }
}

/// One (day, policy, memory model) run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DayResult {
    /// Day.
    pub day: String,
    /// Policy name.
    pub policy: String,
    /// Memory model.
    pub memory: MemoryModel,
    /// VMs (trace files).
    pub vms: usize,
    /// Hosts.
    pub hosts: usize,
    /// Energy in kWh.
    pub energy_kwh: f64,
    /// Migrations started.
    pub migrations: u64,
    /// SLA violation time per active host.
    pub slatah: f64,
    /// Performance degradation due to migrations.
    pub pdm: f64,
    /// SLATAH x PDM.
    pub slav: f64,
    /// Energy x SLAV.
    pub esv: f64,
    /// Active-to-idle host transitions (never-used hosts once).
    pub host_shutdowns: u64,
    /// Mean active hosts over the day.
    pub mean_active_hosts: f64,
    /// Active hosts after each scheduling step.
    pub active_hosts: Vec<u32>,
    /// Cumulative energy (kWh) after each scheduling step.
    pub energy_series_kwh: Vec<f64>,
    /// Wall-clock seconds the run took.
    pub wall_seconds: f64,
    /// The day's RAM bound (hosts the VMs' memory alone needs, and their
    /// energy at the day's mean load): the yardstick under `strict`.
    pub bound: RamBound,
    /// The seed of the shuffled file order, if the run used one.
    pub shuffle_seed: Option<u64>,
}

/// Host types of the published setup from the power model file.
pub fn ccpe2012_host_types(models: &PowerModels) -> Result<Vec<HostType>, PowerModelError> {
    ["G4", "G5"]
        .iter()
        .map(|n| {
            let row = models.find(&format!("ML110 {n}"))?;
            Ok(HostType {
                pe_mips: f64::from(row.mhz),
                pes: row.cores,
                ram_mb: 4096.0,
                bw_mbit: 1000.0,
                power: row.model.clone(),
            })
        })
        .collect()
}

/// Simulate one day of traces (sorted file order) under one policy.
pub fn simulate_day(
    day: &str,
    traces: &[Trace],
    host_types: &[HostType],
    hosts: usize,
    policy: &Policy,
    memory: MemoryModel,
) -> Result<DayResult, SimError> {
    simulate_day_with(
        day,
        traces,
        host_types,
        hosts,
        policy,
        memory,
        &[],
        &mut |_| {},
    )
}

/// One scheduling step of a simulated day, as [`simulate_day_with`]'s
/// observer sees it (after the step's moves started).
#[derive(Debug)]
pub struct Step<'s, 'a> {
    /// Step index (trace sample) `k`.
    pub k: usize,
    /// The data centre.
    pub dc: &'s Datacenter<'a>,
    /// The moves started at this step: (VM, source, target).
    pub moves: &'s [(usize, usize, usize)],
}

/// [`simulate_day`] with placement rules (ferry's policy takes them; VMs
/// are named `v{i}`, hosts `h{i}`; the initial placement keeps the hard
/// ones) and an observer called at every step.
#[allow(clippy::too_many_arguments)]
pub fn simulate_day_with(
    day: &str,
    traces: &[Trace],
    host_types: &[HostType],
    hosts: usize,
    policy: &Policy,
    memory: MemoryModel,
    rules: &[Rule],
    observe: &mut dyn FnMut(&Step<'_, '_>),
) -> Result<DayResult, SimError> {
    let started = Instant::now();
    let n = traces.len();
    let vm_types: Vec<_> = (0..n).map(|i| VM_TYPES[vm_type_index(i, n)]).collect();
    let bound = bound::ram_bound(
        traces,
        &vm_types,
        host_types,
        FIRST_EVENT,
        STEP_SECONDS,
        DAY_SECONDS,
    );
    let mut dc = Datacenter::new(
        traces,
        host_types.to_vec(),
        hosts,
        &vm_types,
        memory,
        STEP_SECONDS,
    );
    let placement_err = |vm| SimError::Placement {
        day: day.to_string(),
        policy: policy.name(),
        vm,
    };
    if let Policy::Npa = policy {
        let watts: f64 = (0..hosts).map(|h| dc.power(h, 1.0)).sum();
        let steps = (DAY_SECONDS / STEP_SECONDS) as usize;
        return Ok(DayResult {
            day: day.to_string(),
            policy: policy.name(),
            memory,
            vms: n,
            hosts,
            energy_kwh: watts * DAY_SECONDS / 3.6e6,
            migrations: 0,
            slatah: 0.0,
            pdm: 0.0,
            slav: 0.0,
            esv: 0.0,
            host_shutdowns: 0,
            mean_active_hosts: hosts as f64,
            active_hosts: vec![hosts as u32; steps],
            energy_series_kwh: (1..=steps)
                .map(|k| watts * k as f64 * STEP_SECONDS / 3.6e6)
                .collect(),
            wall_seconds: started.elapsed().as_secs_f64(),
            bound,
            shuffle_seed: None,
        });
    }
    match policy {
        Policy::Dvfs => baseline::place_all_first_fit(&mut dc).map_err(placement_err)?,
        Policy::Mmt(d) => baseline::place_all_power_aware(&mut dc, d).map_err(placement_err)?,
        Policy::Ferry(_) if rules.is_empty() => {
            ferry::place_all_packed(&mut dc).map_err(placement_err)?
        }
        Policy::Ferry(_) => baseline::place_all_power_aware_with(
            &mut dc,
            &Detector::Thr(0.8),
            &ferry::InitialRules::new(rules, traces.len(), hosts),
        )
        .map_err(placement_err)?,
        Policy::Npa => unreachable!("handled above"),
    }
    let mut driver = match policy {
        Policy::Ferry(p) => Some(ferry::FerryDriver::new(&dc, *p, rules)),
        _ => None,
    };
    let mut active = Vec::new();
    let mut energy = Vec::new();
    let mut t = FIRST_EVENT;
    loop {
        t += STEP_SECONDS;
        if t > DAY_SECONDS {
            break;
        }
        // CloudSim advances VM histories only when this holds exactly.
        let tick = (t - FIRST_EVENT) % STEP_SECONDS == 0.0;
        let k = ((t - FIRST_EVENT) / STEP_SECONDS).round() as usize;
        dc.process(t, tick);
        let moves: Vec<(usize, usize, usize)> = match (policy, driver.as_mut()) {
            (Policy::Mmt(d), _) => baseline::optimize(&mut dc, d)
                .into_iter()
                .map(|(v, to)| (v, dc.vms[v].host.expect("placed"), to))
                .collect(),
            (Policy::Ferry(_), Some(f)) => f
                .plan(&dc, k)
                .moves
                .iter()
                .map(|m| (m.vm, m.from, m.to))
                .collect(),
            _ => Vec::new(),
        };
        for &(v, _, h) in &moves {
            dc.start_migration(v, h);
        }
        observe(&Step {
            k,
            dc: &dc,
            moves: &moves,
        });
        active.push(dc.active_hosts() as u32);
        energy.push(dc.energy_ws / 3.6e6);
        dc.complete_migrations_before(t + STEP_SECONDS);
    }
    let energy_kwh = dc.energy_ws / 3.6e6;
    let slatah = dc.slatah();
    let pdm = dc.pdm();
    let mean_active = active.iter().map(|&a| f64::from(a)).sum::<f64>() / active.len() as f64;
    Ok(DayResult {
        day: day.to_string(),
        policy: policy.name(),
        memory,
        vms: n,
        hosts,
        energy_kwh,
        migrations: dc.migrations,
        slatah,
        pdm,
        slav: slatah * pdm,
        esv: energy_kwh * slatah * pdm,
        host_shutdowns: dc.host_shutdowns(),
        mean_active_hosts: mean_active,
        active_hosts: active,
        energy_series_kwh: energy,
        wall_seconds: started.elapsed().as_secs_f64(),
        bound,
        shuffle_seed: None,
    })
}

/// Run every configured (day, policy, memory model); `progress` is told
/// about each finished run.
pub fn simulate(
    cfg: &SimConfig,
    mut progress: impl FnMut(&DayResult),
) -> Result<Vec<DayResult>, SimError> {
    let models = PowerModels::load(&cfg.traces.join("power_models.csv"))?;
    let host_types = ccpe2012_host_types(&models)?;
    let root = cfg.traces.join("planetlab");
    let all_days = trace::list_days(&root)?;
    let days = if cfg.days.is_empty() {
        all_days
    } else {
        for d in &cfg.days {
            if !all_days.contains(d) {
                return Err(SimError::NoSuchDay {
                    day: d.clone(),
                    root,
                });
            }
        }
        cfg.days.clone()
    };
    let mut out = Vec::new();
    for day in &days {
        let mut traces = trace::load_day(&root.join(day))?;
        if let Some(seed) = cfg.shuffle_seed {
            let order = shuffled_order(traces.len(), seed);
            traces = order.into_iter().map(|i| traces[i].clone()).collect();
        }
        if let Some(n) = cfg.vms.filter(|_| !traces.is_empty()) {
            traces = (0..n).map(|i| traces[i % traces.len()].clone()).collect();
        }
        for memory in &cfg.memory {
            for policy in &cfg.policies {
                let mut r = simulate_day(day, &traces, &host_types, cfg.hosts, policy, *memory)?;
                r.shuffle_seed = cfg.shuffle_seed;
                progress(&r);
                out.push(r);
            }
        }
    }
    Ok(out)
}
