//! Simulator output: a terminal table, CSV, JSON and an SVG plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::{DayResult, MemoryModel};
use crate::reference::{self, ReferenceRow};

/// Why the report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Writing a file failed.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// JSON encoding failed.
    #[error("cannot encode JSON")]
    Json(#[from] serde_json::Error),
    /// Drawing the plot failed.
    #[error("cannot draw {path}: {what}")]
    Plot {
        /// The file.
        path: String,
        /// The drawing error.
        what: String,
    },
}

/// Medians over days for one (policy, memory model).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// Policy.
    pub policy: String,
    /// Memory model.
    pub memory: MemoryModel,
    /// Days.
    pub days: usize,
    /// Median energy (kWh).
    pub energy_kwh: f64,
    /// Median migrations.
    pub migrations: f64,
    /// Median SLATAH.
    pub slatah: f64,
    /// Median PDM.
    pub pdm: f64,
    /// Median SLAV.
    pub slav: f64,
    /// Median ESV.
    pub esv: f64,
    /// Median of mean active hosts.
    pub mean_active_hosts: f64,
    /// Median RAM bound energy (kWh) of the days.
    pub bound_kwh: f64,
    /// Median RAM bound hosts of the days.
    pub bound_hosts: f64,
    /// Median over days of energy / RAM bound energy - 1.
    pub over_bound: f64,
    /// The worst day's energy / RAM bound energy - 1.
    pub max_over_bound: f64,
    /// Reference medians over the same days (sorted-file CloudSim runs), if any.
    pub reference: Option<RefSummary>,
}

/// Reference medians.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RefSummary {
    /// Days with a reference row.
    pub days: usize,
    /// Median energy.
    pub energy_kwh: f64,
    /// Median migrations.
    pub migrations: f64,
    /// Median SLATAH.
    pub slatah: f64,
    /// Median PDM.
    pub pdm: f64,
    /// Median SLAV.
    pub slav: f64,
    /// Median ESV.
    pub esv: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians per (memory, policy) in run order, with reference medians over
/// the days that have a reference row.
pub fn summarize(results: &[DayResult], refs: &[ReferenceRow]) -> Vec<Summary> {
    let mut order = Vec::new();
    let mut groups: BTreeMap<(String, String), Vec<&DayResult>> = BTreeMap::new();
    for r in results {
        let key = (r.memory.name().to_string(), r.policy.clone());
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push(r);
    }
    order
        .into_iter()
        .map(|key| {
            let g = &groups[&key];
            let m = |f: fn(&DayResult) -> f64| median(g.iter().map(|r| f(r)).collect());
            let matched: Vec<&ReferenceRow> = g
                .iter()
                .filter_map(|r| reference::lookup(refs, &r.day, &r.policy))
                .collect();
            let reference =
                (!matched.is_empty() && g[0].memory == MemoryModel::CloudSim).then(|| {
                    let rm = |f: fn(&ReferenceRow) -> f64| {
                        median(matched.iter().map(|r| f(r)).collect())
                    };
                    RefSummary {
                        days: matched.len(),
                        energy_kwh: rm(|r| r.energy_kwh),
                        migrations: rm(|r| r.migrations as f64),
                        slatah: rm(|r| r.slatah),
                        pdm: rm(|r| r.pdm),
                        slav: rm(|r| r.slav),
                        esv: rm(|r| r.esv),
                    }
                });
            Summary {
                policy: key.1.clone(),
                memory: g[0].memory,
                days: g.len(),
                energy_kwh: m(|r| r.energy_kwh),
                migrations: m(|r| r.migrations as f64),
                slatah: m(|r| r.slatah),
                pdm: m(|r| r.pdm),
                slav: m(|r| r.slav),
                esv: m(|r| r.esv),
                mean_active_hosts: m(|r| r.mean_active_hosts),
                bound_kwh: m(|r| r.bound.energy_kwh),
                bound_hosts: m(|r| r.bound.hosts as f64),
                over_bound: m(over_bound),
                max_over_bound: g.iter().map(|r| over_bound(r)).fold(f64::NAN, f64::max),
                reference,
            }
        })
        .collect()
}

/// Energy over the RAM bound's energy, minus 1 (NaN without a bound).
fn over_bound(r: &DayResult) -> f64 {
    if r.bound.energy_kwh > 0.0 {
        r.energy_kwh / r.bound.energy_kwh - 1.0
    } else {
        f64::NAN
    }
}

fn pct(ours: f64, theirs: f64) -> String {
    if theirs == 0.0 {
        return "-".into();
    }
    format!("{:+.1}%", (ours / theirs - 1.0) * 100.0)
}

/// The terminal table (medians over days; the RAM bound, its hosts and how
/// far above it the median and the worst day are; reference and deviation
/// where known).
pub fn table(summaries: &[Summary]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<8} {:<12} {:>4} {:>9} {:>8} {:>7} {:>7} {:>9} {:>9} {:>7} {:>9} {:>6} {:>7} {:>7} | {:>9} {:>8} {:>9} {:>7} {:>7} {:>7}",
        "memory", "policy", "days", "kWh", "migr", "SLATAH", "PDM", "SLAV", "ESV", "hosts",
        "bound kWh", "bnd h", "d bnd", "max bnd",
        "ref kWh", "ref migr", "ref SLAV", "d kWh", "d migr", "d SLAV"
    );
    for r in summaries {
        let _ = write!(
            s,
            "{:<8} {:<12} {:>4} {:>9.2} {:>8.0} {:>6.2}% {:>6.3}% {:>9.3e} {:>9.3e} {:>7.1} {:>9.2} {:>6.0} {:>6.1}% {:>6.1}%",
            r.memory.name(),
            r.policy,
            r.days,
            r.energy_kwh,
            r.migrations,
            r.slatah * 100.0,
            r.pdm * 100.0,
            r.slav,
            r.esv,
            r.mean_active_hosts,
            r.bound_kwh,
            r.bound_hosts,
            r.over_bound * 100.0,
            r.max_over_bound * 100.0
        );
        if let Some(x) = &r.reference {
            let _ = write!(
                s,
                " | {:>9.2} {:>8.0} {:>9.3e} {:>7} {:>7} {:>7}",
                x.energy_kwh,
                x.migrations,
                x.slav,
                pct(r.energy_kwh, x.energy_kwh),
                pct(r.migrations, x.migrations),
                pct(r.slav, x.slav)
            );
        }
        s.push('\n');
    }
    s
}

/// Per-run CSV (one row per day x policy x memory model).
pub fn csv(results: &[DayResult], refs: &[ReferenceRow]) -> String {
    let mut s = String::from(
        "day,policy,memory,vms,hosts,energy_kwh,migrations,slatah,pdm,slav,esv,host_shutdowns,mean_active_hosts,wall_seconds,ref_energy_kwh,ref_migrations,ref_slav,bound_hosts,bound_kwh,over_bound,shuffle_seed\n",
    );
    for r in results {
        let rf = (r.memory == MemoryModel::CloudSim)
            .then(|| reference::lookup(refs, &r.day, &r.policy))
            .flatten();
        let _ = writeln!(
            s,
            "{},{},{},{},{},{:.2},{},{:.4},{:.5},{:.3e},{:.3e},{},{:.1},{:.2},{},{},{},{},{:.2},{:.4},{}",
            r.day,
            r.policy,
            r.memory.name(),
            r.vms,
            r.hosts,
            r.energy_kwh,
            r.migrations,
            r.slatah,
            r.pdm,
            r.slav,
            r.esv,
            r.host_shutdowns,
            r.mean_active_hosts,
            r.wall_seconds,
            rf.map(|x| format!("{:.2}", x.energy_kwh))
                .unwrap_or_default(),
            rf.map(|x| x.migrations.to_string()).unwrap_or_default(),
            rf.map(|x| format!("{:.3e}", x.slav)).unwrap_or_default(),
            r.bound.hosts,
            r.bound.energy_kwh,
            over_bound(r),
            r.shuffle_seed.map(|x| x.to_string()).unwrap_or_default(),
        );
    }
    s
}

/// What [`json`] writes: every run, then the summaries.
#[derive(Debug, serde::Serialize)]
struct JsonReport<'a> {
    runs: &'a [DayResult],
    summary: &'a [Summary],
}

/// JSON with runs and summaries.
pub fn json(results: &[DayResult], summaries: &[Summary]) -> Result<String, ReportError> {
    Ok(serde_json::to_string_pretty(&JsonReport {
        runs: results,
        summary: summaries,
    })?)
}

/// SVG: cumulative energy (top) and active hosts (bottom) over time for each
/// policy of `day` (CloudSim memory model and strict, one line each).
pub fn plot_svg(path: &Path, results: &[DayResult], day: &str) -> Result<(), ReportError> {
    let pname = path.display().to_string();
    let perr = |e: String| ReportError::Plot {
        path: pname.clone(),
        what: e,
    };
    let runs: Vec<&DayResult> = results
        .iter()
        .filter(|r| r.day == day && r.policy != "npa")
        .collect();
    let root = SVGBackend::new(path, (1100, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(e.to_string()))?;
    let (top, bottom) = root.split_vertically(450);
    let hours = 24.0f64;
    let max_e = runs
        .iter()
        .filter_map(|r| r.energy_series_kwh.last().copied())
        .fold(1.0, f64::max);
    let max_h = runs
        .iter()
        .flat_map(|r| r.active_hosts.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1);
    let color = |i: usize| Palette99::pick(i).to_rgba();
    let label = |r: &DayResult| format!("{} ({})", r.policy, r.memory.name());
    let x_of = |k: usize| (k as f64 + 1.0) * 300.0 / 3600.0;
    {
        let mut c = ChartBuilder::on(&top)
            .caption(format!("Energy, day {day}"), ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..hours, 0.0..max_e * 1.05)
            .map_err(|e| perr(e.to_string()))?;
        c.configure_mesh()
            .x_desc("hour")
            .y_desc("kWh (cumulative)")
            .draw()
            .map_err(|e| perr(e.to_string()))?;
        for (i, r) in runs.iter().enumerate() {
            let col = color(i);
            c.draw_series(LineSeries::new(
                r.energy_series_kwh
                    .iter()
                    .enumerate()
                    .map(|(k, e)| (x_of(k), *e)),
                col,
            ))
            .map_err(|e| perr(e.to_string()))?
            .label(label(r))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], col));
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| perr(e.to_string()))?;
    }
    {
        let mut c = ChartBuilder::on(&bottom)
            .caption(format!("Active hosts, day {day}"), ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..hours, 0u32..(max_h + max_h / 20 + 1))
            .map_err(|e| perr(e.to_string()))?;
        c.configure_mesh()
            .x_desc("hour")
            .y_desc("hosts on")
            .draw()
            .map_err(|e| perr(e.to_string()))?;
        for (i, r) in runs.iter().enumerate() {
            c.draw_series(LineSeries::new(
                r.active_hosts
                    .iter()
                    .enumerate()
                    .map(|(k, a)| (x_of(k), *a)),
                color(i),
            ))
            .map_err(|e| perr(e.to_string()))?;
        }
    }
    root.present().map_err(|e| perr(e.to_string()))?;
    Ok(())
}

/// Write `text` to `path`.
pub fn write(path: &Path, text: &str) -> Result<(), ReportError> {
    std::fs::write(path, text).map_err(|source| ReportError::Write {
        path: path.display().to_string(),
        source,
    })
}
