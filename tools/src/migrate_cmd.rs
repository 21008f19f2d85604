//! `ferry migrate`: ask a `ferry vm run --api` process to migrate its guest
//! and follow it with a progress bar (or JSON lines); `ferry migrate
//! status|cancel|set` watch, stop and retune a migration from any shell.
//!
//! The migration runs in the source process, not in this client: a client
//! that is interrupted or killed neither ends the migration nor leaves it
//! without an owner. `ferry migrate status` follows it from anywhere, and
//! the last result stays readable until the next migration: at the
//! destination always, at the source while it runs (it ends once its guest
//! runs at the destination).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use ferry_control::json::MigrateOutcome;
use ferry_control::protocol::decision_words;
use ferry_control::units::{
    format_bytes, format_rate, parse_bytes, parse_duration, parse_rate, BareUnit, MAX_DEADLINE,
    MAX_DOWNTIME,
};
use ferry_control::{client, Event, Limits, MigrateRequest, MigrationReport, Phase, Summary};
use ferry_engine::encode::EncodingChoice;
use ferry_transport::default_lane_count;
use ferry_transport::lanes::MAX_LANES;

use crate::security_args::SecurityArgs;

/// `ferry migrate [status|cancel|set]`
#[derive(Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct MigrateCmd {
    #[command(subcommand)]
    pub action: Option<MigrateAction>,
    #[command(flatten)]
    pub start: MigrateArgs,
}

/// What to do with a migration other than start it.
#[derive(Subcommand, Debug, Clone)]
pub enum MigrateAction {
    /// Show the running migration, or the last one (phase, round, bytes
    /// left, rates, expected downtime, throttle, the summary or error).
    Status(StatusArgs),
    /// Stop the running migration: the guest resumes on the source.
    /// Refused once GO was sent.
    Cancel(ApiArg),
    /// Change the running migration's limits.
    Set(SetArgs),
}

/// `--api PATH`
#[derive(Args, Debug, Clone)]
pub struct ApiArg {
    /// Control socket of the source (or destination) process.
    #[arg(long)]
    pub api: PathBuf,
}

/// `ferry migrate status`
#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// Control socket of the source (or destination) process.
    #[arg(long)]
    pub api: PathBuf,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `ferry migrate set`
#[derive(Args, Debug, Clone)]
pub struct SetArgs {
    /// Control socket of the source.
    #[arg(long)]
    pub api: PathBuf,
    /// New downtime limit (a bare number is ms; or 20ms, 1s).
    #[arg(long = "max-downtime-ms", alias = "max-downtime", value_parser = parse_downtime)]
    pub max_downtime: Option<Duration>,
    /// New bandwidth cap (binary units per second: 100M is 100 MiB/s).
    #[arg(long, value_parser = parse_rate_flag)]
    pub max_bandwidth: Option<u64>,
    /// New deadline from the migration's start (a bare number is seconds;
    /// or 5m).
    #[arg(long = "deadline-s", alias = "deadline", value_parser = parse_deadline)]
    pub deadline: Option<Duration>,
    /// Throttle the guest when rounds stop shrinking: `on` or `off`.
    #[arg(long, value_parser = parse_on_off)]
    pub auto_converge: Option<bool>,
    /// Dirty-limit: the new rate each vCPU is slowed down towards, MB/s
    /// (as `ferry migrate --vcpu-dirty-limit`); used whenever dirty-limit
    /// is in force.
    #[arg(long, value_parser = parse_vcpu_dirty_limit_flag)]
    pub vcpu_dirty_limit: Option<u64>,
}

/// `ferry migrate --api PATH --to ADDR ...`
#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Control socket of the source (`ferry vm run --api PATH`).
    #[arg(long, required = true)]
    pub api: Option<PathBuf>,
    /// Destination address (`ferry vm receive --listen ADDR`).
    #[arg(long, required = true)]
    pub to: Option<String>,
    /// TCP lanes to the destination (default: one per core, 4 to 8).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_LANES)))]
    pub lanes: Option<u16>,
    #[command(flatten)]
    pub security: SecurityArgs,
    /// Downtime limit (a bare number is ms; or 20ms, 1s).
    #[arg(long = "max-downtime-ms", alias = "max-downtime", default_value = "20", value_parser = parse_downtime)]
    pub max_downtime: Duration,
    /// Give up after this long, the guest running on the source (a bare
    /// number is seconds; or 5m).
    #[arg(long = "deadline-s", alias = "deadline", default_value = "300", value_parser = parse_deadline)]
    pub deadline: Duration,
    /// Cap on wire bytes per second (binary units: 100M is 100 MiB/s).
    #[arg(long, value_parser = parse_rate_flag)]
    pub max_bandwidth: Option<u64>,
    /// Do not throttle the guest when rounds stop shrinking.
    #[arg(long)]
    pub no_auto_converge: bool,
    /// How to slow down a guest whose rounds stop shrinking:
    /// `auto-converge` takes the same share of time from every vCPU;
    /// `dirty-limit` slows down only the vCPUs that dirty fastest, each
    /// towards a per-vCPU dirty rate (needs `ferry vm run --dirty-log ring`);
    /// `auto` picks dirty-limit when the guest has several vCPUs and the
    /// dirty ring, else auto-converge.
    #[arg(long, default_value = "auto", value_parser = parse_converge, conflicts_with = "no_auto_converge")]
    pub converge: ferry_engine::ConvergeMode,
    /// Dirty-limit: the dirty rate each vCPU is slowed down towards, MB/s
    /// (like QEMU's `vcpu-dirty-limit`; a bare number is MB/s, or e.g.
    /// 64M/s; 1 to 1000000). Default: half the link's bandwidth shared
    /// among the vCPUs.
    #[arg(long, value_parser = parse_vcpu_dirty_limit_flag, conflicts_with = "no_auto_converge")]
    pub vcpu_dirty_limit: Option<u64>,
    /// Encoder threads (1 to 256).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: Option<u16>,
    /// Do not send XOR deltas against earlier copies.
    #[arg(long, conflicts_with = "xor_cache")]
    pub no_delta: bool,
    /// Size of the cache of earlier page copies that XOR deltas are made
    /// against (e.g. 256M; default: a quarter of guest memory).
    #[arg(long, value_parser = parse_cache_size)]
    pub xor_cache: Option<u64>,
    /// Do not LZ4-compress pages.
    #[arg(long)]
    pub no_compress: bool,
    /// When the downtime limit cannot be met by the deadline: `abort`
    /// keeps the guest on the source; `force` completes anyway, and the
    /// summary says by how much the limit was exceeded.
    #[arg(long, value_enum, default_value = "abort")]
    pub on_deadline: OnDeadlineArg,
    /// JSON lines instead of a progress bar: progress events when they
    /// change, then one summary (or one failure).
    #[arg(long)]
    pub json: bool,
}

/// `--on-deadline` values (Nova's `live_migration_timeout_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnDeadlineArg {
    /// Give up; the guest keeps running on the source.
    Abort,
    /// Complete anyway, over the limit.
    Force,
}

impl From<OnDeadlineArg> for ferry_engine::OnDeadline {
    fn from(a: OnDeadlineArg) -> Self {
        match a {
            OnDeadlineArg::Abort => ferry_engine::OnDeadline::Abort,
            OnDeadlineArg::Force => ferry_engine::OnDeadline::Force,
        }
    }
}

fn parse_downtime(s: &str) -> Result<Duration, String> {
    parse_duration(s, BareUnit::Millis, MAX_DOWNTIME).map_err(|e| e.to_string())
}

fn parse_deadline(s: &str) -> Result<Duration, String> {
    parse_duration(s, BareUnit::Secs, MAX_DEADLINE).map_err(|e| e.to_string())
}

fn parse_rate_flag(s: &str) -> Result<u64, String> {
    parse_rate(s).map_err(|e| e.to_string())
}

fn parse_cache_size(s: &str) -> Result<u64, String> {
    parse_bytes(s).map_err(|e| e.to_string())
}

fn parse_vcpu_dirty_limit_flag(s: &str) -> Result<u64, String> {
    ferry_control::units::parse_vcpu_dirty_limit(s).map_err(|e| e.to_string())
}

fn parse_converge(s: &str) -> Result<ferry_engine::ConvergeMode, String> {
    s.parse()
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("`{s}`: want `on` or `off`")),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl MigrateArgs {
    /// The request sent to the source (fails when no security is chosen).
    pub fn request(&self) -> anyhow::Result<MigrateRequest> {
        Ok(MigrateRequest {
            to: self.to.clone().context("--to is required")?,
            lanes: Some(self.lanes.unwrap_or_else(default_lane_count)),
            security: Some(self.security.spec()?),
            limits: Limits {
                max_downtime_ms: Some(millis(self.max_downtime)),
                deadline_s: Some(self.deadline.as_secs_f64()),
                max_bandwidth: self.max_bandwidth,
                auto_converge: Some(!self.no_auto_converge),
                vcpu_dirty_limit_mbps: self.vcpu_dirty_limit,
            },
            workers: self.workers.map(usize::from),
            xor_cache_bytes: if self.no_delta {
                Some(0)
            } else {
                self.xor_cache
            },
            compress: Some(!self.no_compress),
            on_deadline: Some(self.on_deadline.into()),
            converge: Some(self.converge),
        })
    }
}

/// What the terminal shows while a migration runs.
struct Terminal {
    bar: ProgressBar,
    round: u32,
}

impl Terminal {
    fn new() -> Self {
        let bar = ProgressBar::new(100);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} round {prefix:>2} [{bar:30}] {percent:>3}%  {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        Self { bar, round: 0 }
    }

    /// A line above the bar; printed plainly when there is no terminal to
    /// draw the bar on (indicatif would drop it).
    fn say(&self, line: String) {
        if self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    fn show(&mut self, ev: &Event) {
        let bar = &self.bar;
        match ev {
            Event::Connected {
                to,
                lanes,
                security,
            } => bar.set_message(format!("connected to {to}: {lanes} lanes, {security}")),
            Event::Started {
                guest_bytes,
                dirty_log,
                ..
            } => bar.set_message(format!(
                "{} guest, dirty log {dirty_log}",
                format_bytes(*guest_bytes)
            )),
            Event::RoundProgress {
                round,
                pages_done,
                pages_total,
                ..
            } => {
                if *round != self.round {
                    self.round = *round;
                    bar.reset();
                }
                bar.set_prefix(round.to_string());
                bar.set_length((*pages_total).max(1));
                bar.set_position(*pages_done);
                bar.set_message(format!(
                    "{} left",
                    format_bytes(pages_total.saturating_sub(*pages_done) * 4096)
                ));
            }
            Event::RoundFinished {
                round,
                pages,
                duration_ms,
                dirty_pages,
                throttle_percent,
                vcpu_throttles,
                assessment: a,
                encoding,
                ..
            } => {
                let throttle = if vcpu_throttles.is_empty() {
                    format!("{throttle_percent} %")
                } else {
                    let each: Vec<String> = vcpu_throttles.iter().map(|t| format!("{t}")).collect();
                    format!("{} % per vCPU", each.join("/"))
                };
                let how = encoding
                    .as_ref()
                    .map(|e| format!(", pages as {}", encoding_words(e.choice)))
                    .unwrap_or_default();
                // The round is done: its bar ends full.
                bar.set_prefix(round.to_string());
                bar.set_length((*pages).max(1));
                bar.set_position((*pages).max(1));
                self.say(format!(
                    "round {round:>2}: {pages:>8} pages in {duration_ms:>7.1} ms{how}, {dirty_pages:>7} dirty after; dirty {:.0} pages/s, bandwidth {}, expected downtime {:.1} ms, throttle {throttle} -> {}",
                    a.dirty_rate_pages_per_sec,
                    format_rate(a.bandwidth_bytes_per_sec),
                    a.expected_downtime_ms,
                    decision_words(&a.decision)
                ));
            }
            Event::StopAndCopy { dirty_pages } => {
                self.round += 1;
                bar.reset();
                bar.set_prefix(self.round.to_string());
                bar.set_message(format!(
                    "guest paused, copying the last {dirty_pages} pages"
                ));
            }
            Event::Handover { step } => {
                bar.set_position(bar.length().unwrap_or(100));
                bar.set_message(format!("handover: {}", step.replace('_', " ")));
            }
            Event::Abandoned { reason } => self.say(format!("abandoned: {reason}")),
        }
    }

    /// A completed migration leaves its bar on the screen at 100 %; a
    /// failed one clears it (the error follows).
    fn finish(&self, done: bool) {
        if done {
            self.bar.set_position(self.bar.length().unwrap_or(100));
            self.bar
                .finish_with_message("done: the guest runs at the destination");
        } else {
            self.bar.finish_and_clear();
        }
    }
}

/// An encoding choice in words.
fn encoding_words(c: EncodingChoice) -> &'static str {
    match c {
        EncodingChoice::Raw => "raw",
        EncodingChoice::XorDelta => "XOR deltas",
        EncodingChoice::Lz4 => "LZ4",
        EncodingChoice::XorDeltaLz4 => "XOR deltas + LZ4",
        EncodingChoice::Zstd => "zstd",
        EncodingChoice::XorDeltaZstd => "XOR deltas + zstd",
    }
}

/// JSON lines: an event only when it differs from the last one printed.
#[derive(Default)]
struct JsonLines {
    last: String,
}

impl JsonLines {
    fn show(&mut self, ev: &Event) {
        let line = ferry_control::json::to_string(ev).expect("events serialise");
        if line != self.last {
            println!("{line}");
            self.last = line;
        }
    }
}

/// Runs a migration through the source's control socket and returns its
/// final report (completed, failed or cancelled).
pub fn migrate(api: &Path, req: MigrateRequest, json: bool) -> anyhow::Result<MigrationReport> {
    let mut term = (!json).then(Terminal::new);
    let mut lines = JsonLines::default();
    let result = client::migrate(api, req, |ev| match term.as_mut() {
        Some(t) => t.show(ev),
        None => lines.show(ev),
    });
    if let Some(t) = &term {
        t.finish(matches!(&result, Ok(r) if r.phase == Phase::Completed));
    }
    Ok(result?)
}

/// The summary of a completed migration, or the failure as an error.
pub fn completed(report: &MigrationReport) -> anyhow::Result<&Summary> {
    match (&report.phase, &report.summary) {
        (Phase::Completed, Some(s)) => Ok(s),
        (phase, _) => bail!(
            "migration {}: {} (guest: {})",
            if *phase == Phase::Cancelled {
                "cancelled"
            } else {
                "failed"
            },
            report.error.as_deref().unwrap_or("no reason given"),
            report.guest.describe_at_source()
        ),
    }
}

/// Prints a human summary of a migration.
pub fn print_summary(s: &Summary) {
    let p = &s.downtime_parts;
    println!("migration summary");
    println!("  rounds            {}", s.rounds);
    println!("  total time        {:.1} ms", s.total_ms);
    println!(
        "  downtime          {:.2} ms  (source pause -> destination resume)",
        s.downtime_ms
    );
    println!(
        "    parts (ms)      pause {:.2} (vCPU stop spread {:.2}), state {:.2} (restored at the destination meanwhile in {:.2}), final collect {:.2}, final pages {:.2}, ready wait {:.2} (last pages written {:.2}, verify {:.2}, READY back {:.2}), go to resume {:.2} (resume {:.2})",
        p.pause_ms,
        p.vcpu_stop_spread_ms,
        p.state_ms,
        p.dest_restore_ms,
        p.final_collect_ms,
        p.final_pages_ms,
        p.ready_wait_ms,
        p.dest_pages_ms,
        p.dest_verify_ms,
        p.ready_return_ms,
        p.go_to_resume_ms,
        p.dest_resume_ms
    );
    let f = &s.final_round;
    println!(
        "  final round       {} pages, {} (expected {} pages, {}, {:.2} ms at {}; encoding took {:.2} ms)",
        f.pages,
        format_bytes(f.wire_bytes),
        f.expected_pages,
        format_bytes(f.expected_bytes),
        f.expected_ms,
        format_rate(f.expected_bandwidth_bytes_per_sec),
        f.encode_ms
    );
    println!("  guest memory      {}", format_bytes(s.memory_bytes));
    println!("  guest bytes sent  {}", format_bytes(s.guest_bytes));
    println!("  wire bytes        {}", format_bytes(s.wire_bytes));
    println!(
        "  throughput        {} guest data, {} on the wire",
        format_rate(s.throughput_bytes_per_sec),
        format_rate(s.wire_bytes_per_sec)
    );
    let c = &s.pages;
    println!(
        "  pages by encoding zero {}, unchanged {}, xor delta {}, lz4 {}, zstd {}, raw {}",
        c.zero, c.unchanged, c.xor_delta, c.lz4, c.zstd, c.raw
    );
    println!("  max throttle      {} %", s.max_throttle_percent);
    if let Ok(start) = s.converge.parse::<ferry_engine::ConvergeMode>() {
        println!(
            "  convergence       {}",
            ferry_engine::describe_converge(start, &s.converge_switches)
        );
    }
    if s.vcpu_max_throttle_percent.len() > 1 || !s.vcpu_dirty_pages.is_empty() {
        for (i, t) in s.vcpu_max_throttle_percent.iter().enumerate() {
            let dirtied = s
                .vcpu_dirty_pages
                .get(i)
                .map(|p| format!(", dirtied {p} pages"))
                .unwrap_or_default();
            println!("    vCPU {i:<3}        max throttle {t} %{dirtied}");
        }
    }
    println!("  memory digest     {:#018x}", s.memory_digest);
    print_region_digests(&s.region_digests);
    println!("  dirty log         {}", s.dirty_log);
    if s.over_limit_ms > 0.0 {
        println!(
            "  OVER THE LIMIT    the pause was {:.2} ms over the {:.0} ms downtime limit",
            s.over_limit_ms, s.downtime_limit_ms
        );
    }
}

/// One line per memory region when there are several (RAM below and above
/// the 3-4 GiB hole): each region's digest, checked by the destination.
pub fn print_region_digests(regions: &[ferry_control::RegionDigest]) {
    if regions.len() < 2 {
        return;
    }
    for r in regions {
        println!(
            "    region {:#x} +{:<8} digest {:#018x} (matches)",
            r.guest_phys_addr,
            format_bytes(r.bytes),
            r.digest
        );
    }
}

/// A completed migration whose pause went past the limit fails the
/// command unless `--on-deadline force` accepted that.
fn check_limit(s: &Summary, on_deadline: OnDeadlineArg) -> anyhow::Result<()> {
    if s.over_limit_ms > 0.0 && on_deadline == OnDeadlineArg::Abort {
        bail!(
            "the guest runs at the destination, but its pause ({:.2} ms) was {:.2} ms over the {:.0} ms --max-downtime-ms limit (--on-deadline force accepts this)",
            s.downtime_ms,
            s.over_limit_ms,
            s.downtime_limit_ms
        );
    }
    Ok(())
}

/// Prints a migration report (`ferry migrate status`).
fn print_report(r: &MigrationReport) {
    let to =
        r.to.as_deref()
            .map(|t| format!(" to {t}"))
            .unwrap_or_default();
    println!(
        "migration{to} ({}): {}, round {}",
        r.role,
        format!("{:?}", r.phase).to_lowercase(),
        r.round
    );
    if !r.phase.is_final() {
        println!("  bytes left        {}", format_bytes(r.bytes_left));
    }
    let so_far = r.wire_bytes as f64 / (r.elapsed_ms / 1e3).max(1e-3);
    println!(
        "  wire bytes        {} ({} on average)",
        format_bytes(r.wire_bytes),
        format_rate(so_far)
    );
    if r.role == ferry_control::Role::Source {
        if r.decision.is_some() {
            println!(
                "  dirty rate        {:.0} pages/s",
                r.dirty_rate_pages_per_sec
            );
            println!(
                "  bandwidth         {}",
                format_rate(r.bandwidth_bytes_per_sec)
            );
            println!("  expected downtime {:.1} ms", r.expected_downtime_ms);
            println!("  throttle          {} %", r.throttle_percent);
        } else {
            println!("  rates             not measured yet (the first round runs)");
        }
        if let Some(d) = &r.decision {
            println!("  last decision     {d}");
        }
        println!(
            "  limits            {}",
            ferry_control::server::describe_limits(&r.limits)
        );
    }
    println!("  elapsed           {:.1} s", r.elapsed_ms / 1e3);
    println!("  guest             {}", r.guest.describe());
    if let Some(e) = &r.error {
        println!("  error             {e}");
    }
    if let Some(rx) = &r.received {
        println!(
            "  received          {} rounds, {} on the wire, verified in {:.1} ms",
            rx.rounds,
            format_bytes(rx.wire_bytes),
            rx.verify_ms
        );
        print_region_digests(&rx.region_digests);
    }
    if let Some(s) = &r.summary {
        print_summary(s);
    }
}

/// `ferry migrate ...`
pub fn run(cmd: MigrateCmd) -> anyhow::Result<()> {
    match cmd.action {
        Some(MigrateAction::Status(a)) => {
            let report = client::migration(&a.api).context("ferry migrate status")?;
            if a.json {
                println!("{}", ferry_control::json::to_string(&report)?);
            } else {
                print_report(&report);
            }
            Ok(())
        }
        Some(MigrateAction::Cancel(a)) => {
            let msg = client::cancel(&a.api).context("ferry migrate cancel")?;
            println!("{msg}");
            Ok(())
        }
        Some(MigrateAction::Set(a)) => {
            let limits = Limits {
                max_downtime_ms: a.max_downtime.map(millis),
                deadline_s: a.deadline.map(|d| d.as_secs_f64()),
                max_bandwidth: a.max_bandwidth,
                auto_converge: a.auto_converge,
                vcpu_dirty_limit_mbps: a.vcpu_dirty_limit,
            };
            if limits == Limits::default() {
                bail!("ferry migrate set: give at least one of --max-downtime-ms, --max-bandwidth, --deadline-s, --auto-converge, --vcpu-dirty-limit");
            }
            let msg = client::set(&a.api, limits).context("ferry migrate set")?;
            println!("{msg}");
            Ok(())
        }
        None => start(cmd.start),
    }
}

fn start(args: MigrateArgs) -> anyhow::Result<()> {
    let req = args.request()?;
    let api = args.api.clone().context("--api is required")?;
    let report = migrate(&api, req, args.json).context("ferry migrate")?;
    match completed(&report) {
        Ok(summary) if args.json => {
            println!(
                "{}",
                ferry_control::json::to_string(&MigrateOutcome::Summary {
                    summary: Box::new(summary.clone())
                })?
            );
            check_limit(summary, args.on_deadline)
        }
        Ok(summary) => {
            print_summary(summary);
            check_limit(summary, args.on_deadline)
        }
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    ferry_control::json::to_string(&MigrateOutcome::Failed {
                        phase: report.phase,
                        error: report.error.clone(),
                        guest: report.guest,
                    })?
                );
            }
            Err(e)
        }
    }
}
