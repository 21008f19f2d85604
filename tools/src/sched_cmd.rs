//! `ferry sched ...`: the scheduler's simulator (and, later, its daemon).

use std::path::PathBuf;

use anyhow::{bail, Context};
use ferry_scheduler::sim::run::{run_simulate, SimulateOptions};
use ferry_scheduler::sim::{MemoryModel, Policy, SimConfig};

/// `ferry sched` arguments.
#[derive(Debug, clap::Args)]
pub struct SchedArgs {
    #[command(subcommand)]
    command: SchedCommand,
}

#[derive(Debug, clap::Subcommand)]
enum SchedCommand {
    /// Replay the PlanetLab traces (CCPE 2012 setup) for each policy and
    /// report energy, SLATAH, PDM, SLAV, ESV, migrations, active hosts.
    Simulate(SimulateArgs),
    /// Run the scheduler daemon: HTTP API, metrics, planning rounds that
    /// drive the host agents and power drivers.
    Daemon(DaemonArgs),
}

#[derive(Debug, clap::Args)]
struct DaemonArgs {
    /// The cluster description (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Only validate the config: print every problem (file:line) and exit
    /// 1 if there is any.
    #[arg(long)]
    check: bool,
}

#[derive(Debug, clap::Args)]
struct SimulateArgs {
    /// Directory holding planetlab/, power_models.csv and the reference CSV.
    #[arg(long, default_value = "../shared/traces")]
    traces: PathBuf,
    /// Days to replay (YYYYMMDD, repeatable); default: all ten.
    #[arg(long = "day")]
    days: Vec<String>,
    /// Policies (comma-separated): npa, dvfs, thr_mmt_0.8, iqr_mmt_1.5,
    /// mad_mmt_2.5, lr_mmt_1.2, lrr_mmt_1.2, ferry[:key=value:...]; default: all.
    #[arg(long, value_delimiter = ',')]
    policies: Vec<String>,
    /// Memory model: cloudsim, strict or both.
    #[arg(long, default_value = "both")]
    memory: String,
    /// Hosts in the data centre.
    #[arg(long, default_value_t = 800)]
    hosts: usize,
    /// Where to write sched_results.{csv,json,svg}.
    #[arg(long, default_value = "sched-results")]
    out: PathBuf,
    /// Day to plot (default: the first replayed).
    #[arg(long)]
    plot_day: Option<String>,
    /// Print the JSON summary instead of the table.
    #[arg(long)]
    json: bool,
}

/// Run `ferry sched ...`.
pub fn run(args: SchedArgs) -> anyhow::Result<()> {
    match args.command {
        SchedCommand::Simulate(a) => simulate(a),
        SchedCommand::Daemon(a) => daemon(a),
    }
}

fn daemon(a: DaemonArgs) -> anyhow::Result<()> {
    use ferry_scheduler::daemon;
    if a.check {
        let cfg = daemon::config::Config::load(&a.config)?;
        for p in &cfg.problems {
            eprintln!("{p}");
        }
        if !cfg.problems.is_empty() {
            bail!(
                "{} problem(s) in {}",
                cfg.problems.len(),
                a.config.display()
            );
        }
        println!(
            "{}: {} hosts, {} VMs, no problems",
            a.config.display(),
            cfg.hosts.len(),
            cfg.vms.len()
        );
        return Ok(());
    }
    daemon::run(&a.config)
        .with_context(|| format!("ferry sched daemon --config {}", a.config.display()))
}

fn simulate(a: SimulateArgs) -> anyhow::Result<()> {
    let mut cfg = SimConfig::published(&a.traces);
    cfg.days = a.days;
    cfg.hosts = a.hosts;
    if !a.policies.is_empty() {
        cfg.policies = a
            .policies
            .iter()
            .map(|p| Policy::parse(p).with_context(|| format!("unknown policy {p:?}")))
            .collect::<anyhow::Result<_>>()?;
    }
    cfg.memory = match a.memory.as_str() {
        "both" => vec![MemoryModel::CloudSim, MemoryModel::Strict],
        "cloudsim" => vec![MemoryModel::CloudSim],
        "strict" => vec![MemoryModel::Strict],
        other => bail!("--memory must be cloudsim, strict or both, not {other:?}"),
    };
    if !a.traces.join("planetlab").is_dir() {
        bail!(
            "no PlanetLab traces under {} (pass --traces DIR)",
            a.traces.display()
        );
    }
    let opts = SimulateOptions {
        config: cfg,
        out_dir: a.out,
        plot_day: a.plot_day,
    };
    let out = run_simulate(&opts, |r| {
        eprintln!(
            "{} {:<12} {:<8} {:8.2} kWh {:6} migrations ({:.1} s)",
            r.day,
            r.policy,
            r.memory.name(),
            r.energy_kwh,
            r.migrations,
            r.wall_seconds
        )
    })
    .context("ferry sched simulate")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out.summary)?);
    } else {
        print!("{}", out.table);
    }
    for f in &out.files {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}
