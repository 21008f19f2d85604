//! `ferry sched ...`: the scheduler's simulator, its daemon, and a client
//! for the daemon's API (`hosts`, `vms`, `plan`, `problems`, `maintenance`,
//! `policy`, `rules`, `round`; `--json` for the raw answer).

use std::path::PathBuf;

use anyhow::{bail, Context};
use ferry_scheduler::daemon::api::{
    HaHostView, HostView, LeaderView, PolicyRequest, PolicyView, ProblemsView, RoundView, VmView,
};
use ferry_scheduler::daemon::client::{JsonClient, Method};
use ferry_scheduler::daemon::Outcome;
use ferry_scheduler::ha::failover::HaEvent;
use ferry_scheduler::plan::rules::{Rule, RuleKind};
use ferry_scheduler::sim::run::{run_simulate, SimulateOptions};
use ferry_scheduler::sim::{MemoryModel, Policy, SimConfig};
use ferry_scheduler::store::OwnerRecord;

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
    /// Hosts: power, maintenance, health, load.
    Hosts(ClientArgs),
    /// VMs: where they run, their home while evacuated, their demand.
    Vms(ClientArgs),
    /// The last round: each action, its reason and its outcome.
    Plan(ClientArgs),
    /// Configuration entries left out, cluster inconsistencies, unreachable hosts.
    Problems(ClientArgs),
    /// Plan and execute a round now.
    Round(ClientArgs),
    /// Put a host into maintenance (evacuate it) or take it out.
    Maintenance {
        #[command(subcommand)]
        op: MaintenanceOp,
    },
    /// Show or switch the policy.
    Policy {
        #[command(subcommand)]
        op: PolicyOp,
    },
    /// Show or change the rules (affinity, anti-affinity, VM-host).
    Rules {
        #[command(subcommand)]
        op: RulesOp,
    },
    /// Which daemon leads (on the cluster store, `--etcd`).
    Leader(ClientArgs),
    /// Hosts with their lease (alive or expired) and maintenance flag, as
    /// the cluster store has them.
    Leases(ClientArgs),
    /// Each VM's ownership record: owner, epoch, how it got there.
    Owners(ClientArgs),
    /// What the daemon asked has done for high availability: leadership, host
    /// deaths, restarts, refusals, ownership moves.
    Events(ClientArgs),
}

#[derive(Debug, clap::Subcommand)]
enum RulesOp {
    /// The rules.
    List(ClientArgs),
    /// Add a rule; refused (with the rules named) if it contradicts others.
    Add {
        /// Its name.
        name: String,
        /// affinity, anti_affinity, must_run_on, must_not_run_on,
        /// should_run_on, should_not_run_on.
        kind: String,
        /// The VMs (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        vms: Vec<String>,
        /// The hosts (comma-separated), for VM-host rules.
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a rule by name.
    Remove {
        /// Its name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Replace every rule with those in a JSON file (as `list --json` prints).
    Set {
        /// The JSON file.
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Where the daemon is, and how to print its answers.
#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// The daemon's API address (its `listen`).
    #[arg(long, default_value = "127.0.0.1:7070")]
    api: String,
    /// Print the daemon's JSON answer instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum MaintenanceOp {
    /// Enter maintenance: returns once every VM has left the host.
    Enter {
        /// The host.
        host: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Leave maintenance: returns once its VMs are back.
    Leave {
        /// The host.
        host: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, clap::Subcommand)]
enum PolicyOp {
    /// The active policy.
    Get(ClientArgs),
    /// Switch to balance, power_save, both or manual.
    Set {
        /// The policy.
        mode: String,
        #[command(flatten)]
        client: ClientArgs,
    },
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
    /// etcd endpoints (comma-separated): keep the cluster records (hosts'
    /// leases, VM ownership, decisions in flight) there and run with the
    /// other daemons on it: one leads, the others forward to it and take
    /// over when it dies (needs the `etcd` feature). Without it, one daemon
    /// alone.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// This daemon's name in the leader election (default: its listen
    /// address).
    #[arg(long)]
    name: Option<String>,
    /// The leader lease's TTL (`5`, `5s`, `2500ms`): how long a dead
    /// leader holds the next one back.
    #[arg(long, default_value = "5", value_parser = parse_ttl)]
    leader_ttl: std::time::Duration,
    /// The hosts' lease TTL (their agents' `--lease-ttl`): restarts wait
    /// its self-fence margin (2/5 of it) after a host's lease expired.
    #[arg(long, default_value = "5", value_parser = parse_ttl)]
    host_lease_ttl: std::time::Duration,
    /// Admission control: host failures whose VMs must always fit.
    #[arg(long, default_value_t = 1)]
    ha_failures: usize,
}

fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    ferry_control::units::parse_duration(
        s,
        ferry_control::units::BareUnit::Secs,
        std::time::Duration::from_secs(300),
    )
    .map_err(|e| e.to_string())
}

#[cfg(feature = "etcd")]
fn ha_options(a: &DaemonArgs) -> anyhow::Result<Option<ferry_scheduler::daemon::HaOptions>> {
    use ferry_scheduler::store::{etcd::EtcdOptions, ClusterStore, DEFAULT_PREFIX};
    if a.etcd.is_empty() {
        return Ok(None);
    }
    let store = ClusterStore::on_etcd(&a.etcd, EtcdOptions::default(), DEFAULT_PREFIX)
        .context("connecting to etcd")?;
    Ok(Some(ferry_scheduler::daemon::HaOptions {
        store,
        name: a.name.clone(),
        leader_ttl: a.leader_ttl,
        host_lease_ttl: a.host_lease_ttl,
        failures: a.ha_failures,
    }))
}

#[cfg(not(feature = "etcd"))]
fn ha_options(a: &DaemonArgs) -> anyhow::Result<Option<ferry_scheduler::daemon::HaOptions>> {
    if a.etcd.is_empty() {
        return Ok(None);
    }
    bail!("--etcd needs ferry built with the etcd feature (cargo build --features etcd)")
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
    /// Assign the VM types in a shuffled file order (a permutation fixed
    /// by this seed) instead of the published sorted one, as if the trace
    /// files were renamed; no reference columns then (the reference ran
    /// the sorted order).
    #[arg(long)]
    shuffle_seed: Option<u64>,
    /// VMs per day, for scale runs: the day's traces repeated (VM i replays
    /// trace i mod n); default: one VM per trace. Scale --hosts with it:
    /// every VM reserves its full MIPS at creation, so e.g. 100k VMs need
    /// about 50k hosts to start.
    #[arg(long)]
    vms: Option<usize>,
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
        SchedCommand::Hosts(c) => show(&c, "/v1/hosts", print_hosts),
        SchedCommand::Vms(c) => show(&c, "/v1/vms", print_vms),
        SchedCommand::Plan(c) => show(&c, "/v1/plan", print_round),
        SchedCommand::Problems(c) => show(&c, "/v1/problems", print_problems),
        SchedCommand::Round(c) => act(&c, Method::Post, "/v1/round", None::<&()>, print_round),
        SchedCommand::Maintenance { op } => match op {
            MaintenanceOp::Enter { host, client } => act(
                &client,
                Method::Post,
                &format!("/v1/hosts/{host}/maintenance"),
                None::<&()>,
                print_round,
            ),
            MaintenanceOp::Leave { host, client } => act(
                &client,
                Method::Delete,
                &format!("/v1/hosts/{host}/maintenance"),
                None::<&()>,
                print_round,
            ),
        },
        SchedCommand::Leader(c) => show(&c, "/v1/ha/leader", print_leader),
        SchedCommand::Leases(c) => show(&c, "/v1/ha/hosts", print_leases),
        SchedCommand::Owners(c) => show(&c, "/v1/ha/vms", print_owners),
        SchedCommand::Events(c) => show(&c, "/v1/ha/events", print_events),
        SchedCommand::Policy { op } => match op {
            PolicyOp::Get(c) => show(&c, "/v1/policy", print_policy),
            PolicyOp::Set { mode, client } => act(
                &client,
                Method::Put,
                "/v1/policy",
                Some(&PolicyRequest { mode }),
                print_policy,
            ),
        },
        SchedCommand::Rules { op } => rules(op),
    }
}

fn rules(op: RulesOp) -> anyhow::Result<()> {
    match op {
        RulesOp::List(c) => show(&c, "/v1/rules", print_rules),
        RulesOp::Add {
            name,
            kind,
            vms,
            hosts,
            client,
        } => {
            let rule = Rule {
                name,
                kind: kind.parse::<RuleKind>()?,
                vms,
                hosts,
            };
            act(&client, Method::Post, "/v1/rules", Some(&rule), print_rules)
        }
        RulesOp::Remove { name, client } => act(
            &client,
            Method::Delete,
            &format!("/v1/rules/{name}"),
            None::<&()>,
            print_rules,
        ),
        RulesOp::Set { file, client } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let rules: Vec<Rule> = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a JSON list of rules", file.display()))?;
            act(&client, Method::Put, "/v1/rules", Some(&rules), print_rules)
        }
    }
}

fn print_rules(rules: &Vec<Rule>) {
    if rules.is_empty() {
        println!("no rules");
    }
    for r in rules {
        let hosts = if r.hosts.is_empty() {
            String::new()
        } else {
            format!(" hosts {}", r.hosts.join(","))
        };
        println!(
            "{:<16} {:<18} vms {}{hosts}",
            r.name,
            r.kind,
            r.vms.join(",")
        );
    }
}

fn client(c: &ClientArgs) -> JsonClient {
    // Maintenance waits for live migrations: no overall bound.
    JsonClient::new(&c.api, None)
}

/// GET `path`, print it as JSON or with `table`.
fn show<T: serde::de::DeserializeOwned + serde::Serialize>(
    c: &ClientArgs,
    path: &str,
    table: fn(&T),
) -> anyhow::Result<()> {
    let v: T = client(c).get(path)?;
    output(c, &v, table)
}

/// A call that changes something; a refusal is an error with the daemon's reason.
fn act<B: serde::Serialize, T: serde::de::DeserializeOwned + serde::Serialize>(
    c: &ClientArgs,
    method: Method,
    path: &str,
    body: Option<&B>,
    table: fn(&T),
) -> anyhow::Result<()> {
    let v: T = client(c).call(method, path, body)?;
    output(c, &v, table)
}

fn output<T: serde::Serialize>(c: &ClientArgs, v: &T, table: fn(&T)) -> anyhow::Result<()> {
    if c.json {
        println!("{}", ferry_control::json::to_string_pretty(v)?);
    } else {
        table(v);
    }
    Ok(())
}

fn print_hosts(hosts: &Vec<HostView>) {
    println!("HOST         POWER   MAINT HEALTH       HARDWARE       CPU%        MEM MB VMS");
    for h in hosts {
        let health = match h.health.reachable {
            Some(true) => "ok".to_string(),
            Some(false) => "unreachable".to_string(),
            None => "-".to_string(),
        };
        use ferry_scheduler::ha::health::HealthState;
        let hardware = match (&h.hardware.state, h.hardware.readings.is_empty()) {
            (HealthState::Healthy, true) => "-",
            (HealthState::Healthy, false) => "ok",
            (HealthState::Degraded { .. }, _) if h.quarantined => "quarantined",
            (HealthState::Degraded { .. }, _) => "evacuated",
            (HealthState::Recovering { .. }, _) => "recovering",
        };
        println!(
            "{:<12} {:<7} {:<5} {:<12} {:<12} {:>6.0}% {:>6}/{:<6} {}",
            h.name,
            format!("{:?}", h.power).to_lowercase(),
            if h.maintenance { "yes" } else { "no" },
            health,
            hardware,
            100.0 * h.cpu_demand / h.cpu_mips.max(1.0),
            h.mem_used_mb,
            h.mem_mb,
            h.vms.join(",")
        );
        if let Some(e) = &h.health.error {
            println!("  {}: {e}", h.name);
        }
        for r in h
            .hardware
            .readings
            .iter()
            .filter(|r| r.verdict.is_unhealthy())
        {
            println!(
                "  {}: {}: {} [{}]",
                h.name, r.provider, r.verdict, r.evidence
            );
        }
    }
}

fn print_vms(vms: &Vec<VmView>) {
    println!(
        "{:<16} {:<12} {:<12} {:>8} {:>10}",
        "VM", "HOST", "HOME", "MEM MB", "CPU MIPS"
    );
    for v in vms {
        println!(
            "{:<16} {:<12} {:<12} {:>8} {:>10.0}",
            v.name,
            v.host.as_deref().unwrap_or("-"),
            v.home.as_deref().unwrap_or("-"),
            v.mem_mb,
            v.cpu_demand
        );
    }
}

fn print_round(r: &RoundView) {
    if r.actions.is_empty() {
        println!("no actions");
    }
    for a in &r.actions {
        let outcome = match &a.outcome {
            Outcome::Done => "done".to_string(),
            Outcome::Failed { error } => format!("FAILED: {error}"),
            Outcome::Skipped { why } => format!("skipped: {why}"),
        };
        println!("{}  [{outcome}]\n  because {}", a.action, a.reason);
    }
    for n in &r.notes {
        println!("not done: {n}");
    }
    if let Some(e) = &r.plan_error {
        println!("planning failed: {e}");
    }
}

fn print_problems(p: &ProblemsView) {
    let all: Vec<String> = p
        .config
        .iter()
        .map(ToString::to_string)
        .chain(p.cluster.iter().cloned())
        .chain(p.hosts.iter().cloned())
        .collect();
    if all.is_empty() {
        println!("no problems");
    }
    for l in all {
        println!("{l}");
    }
}

fn print_leader(l: &LeaderView) {
    match &l.leader {
        Some(info) => println!(
            "{} leads (token {}, API {}); this daemon: {}{}",
            info.candidate,
            info.token,
            info.api.as_deref().unwrap_or("-"),
            l.this,
            if l.leading {
                " (leading)"
            } else {
                " (following)"
            }
        ),
        None => println!("nobody leads; this daemon: {}", l.this),
    }
}

fn print_leases(hosts: &Vec<HaHostView>) {
    println!("{:<16} {:<8} MAINT", "HOST", "LEASE");
    for h in hosts {
        println!(
            "{:<16} {:<8} {}",
            h.host,
            if h.alive { "alive" } else { "expired" },
            if h.maintenance { "yes" } else { "no" }
        );
    }
}

fn print_owners(records: &Vec<OwnerRecord>) {
    println!(
        "{:<16} {:<16} {:>6} {:<8} FROM",
        "VM", "OWNER", "EPOCH", "BY"
    );
    for r in records {
        println!(
            "{:<16} {:<16} {:>6} {:<8} {}",
            r.vm,
            r.host,
            r.epoch,
            format!("{:?}", r.last).to_lowercase(),
            r.previous.as_deref().unwrap_or("-")
        );
    }
}

fn print_events(events: &Vec<HaEvent>) {
    if events.is_empty() {
        println!("no events");
    }
    for e in events {
        let secs = e.unix_ms / 1000;
        println!(
            "{}.{:03} {:<17} {}",
            secs,
            e.unix_ms % 1000,
            format!("{:?}", e.kind),
            e.message
        );
    }
}

fn print_policy(p: &PolicyView) {
    println!("{}", p.mode);
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
            "{}: {} hosts, {} VMs, {} rules, no problems",
            a.config.display(),
            cfg.hosts.len(),
            cfg.vms.len(),
            cfg.rules.len()
        );
        return Ok(());
    }
    let ha = ha_options(&a)?;
    daemon::run(&a.config, ha)
        .with_context(|| format!("ferry sched daemon --config {}", a.config.display()))
}

fn simulate(a: SimulateArgs) -> anyhow::Result<()> {
    let mut cfg = SimConfig::published(&a.traces);
    cfg.days = a.days;
    cfg.hosts = a.hosts;
    cfg.shuffle_seed = a.shuffle_seed;
    cfg.vms = a.vms;
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
            "{} {:<12} {:<8} {:8.2} kWh {:6} migrations, RAM bound {} hosts {:.2} kWh ({:.1} s)",
            r.day,
            r.policy,
            r.memory.name(),
            r.energy_kwh,
            r.migrations,
            r.bound.hosts,
            r.bound.energy_kwh,
            r.wall_seconds
        )
    })
    .context("ferry sched simulate")?;
    if a.json {
        println!("{}", ferry_control::json::to_string_pretty(&out.summary)?);
    } else {
        print!("{}", out.table);
    }
    for f in &out.files {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}
