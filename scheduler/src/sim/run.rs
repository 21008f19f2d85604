//! What `ferry sched simulate` does: run, print the table, write CSV, JSON
//! and the SVG plot.

use std::path::PathBuf;

use super::report::{self, ReportError, Summary};
use super::{simulate, DayResult, SimConfig, SimError};
use crate::reference::{self, ReferenceError};

/// Options of `ferry sched simulate`.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    /// The simulation.
    pub config: SimConfig,
    /// Directory for `sched_results.csv`, `.json`, `.svg` (created).
    pub out_dir: PathBuf,
    /// Day to plot (default: the first simulated).
    pub plot_day: Option<String>,
}

/// Why `ferry sched simulate` failed.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    /// The simulation failed.
    #[error("simulation failed")]
    Sim(#[from] SimError),
    /// The reference results could not be read.
    #[error("cannot read reference results")]
    Reference(#[from] ReferenceError),
    /// Output could not be written.
    #[error("cannot write results")]
    Report(#[from] ReportError),
    /// The output directory could not be created.
    #[error("cannot create {path}")]
    OutDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// What was produced.
#[derive(Debug)]
pub struct SimulateOutput {
    /// Every run.
    pub runs: Vec<DayResult>,
    /// Medians per policy and memory model.
    pub summary: Vec<Summary>,
    /// The terminal table.
    pub table: String,
    /// Files written.
    pub files: Vec<PathBuf>,
}

/// Run the simulation and write the outputs; `progress` sees each run.
pub fn run_simulate(
    opts: &SimulateOptions,
    progress: impl FnMut(&DayResult),
) -> Result<SimulateOutput, SimulateError> {
    let ref_path = opts.config.traces.join("planetlab_cloudsim303_results.csv");
    // The reference ran the sorted order: a shuffled run has nothing to
    // compare with there.
    let refs = if ref_path.exists() && opts.config.shuffle_seed.is_none() {
        reference::load(&ref_path)?
    } else {
        Vec::new()
    };
    let runs = simulate(&opts.config, progress)?;
    let summary = report::summarize(&runs, &refs);
    let table = report::table(&summary);
    std::fs::create_dir_all(&opts.out_dir).map_err(|source| SimulateError::OutDir {
        path: opts.out_dir.clone(),
        source,
    })?;
    let csv_path = opts.out_dir.join("sched_results.csv");
    let json_path = opts.out_dir.join("sched_results.json");
    let svg_path = opts.out_dir.join("sched_results.svg");
    report::write(&csv_path, &report::csv(&runs, &refs))?;
    report::write(&json_path, &report::json(&runs, &summary)?)?;
    let mut files = vec![csv_path, json_path];
    let day = opts
        .plot_day
        .clone()
        .or_else(|| runs.first().map(|r| r.day.clone()));
    if let Some(day) = day {
        report::plot_svg(&svg_path, &runs, &day)?;
        files.push(svg_path);
    }
    Ok(SimulateOutput {
        runs,
        summary,
        table,
        files,
    })
}
