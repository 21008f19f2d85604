//! `ferry migrate`: ask a `ferry vm run --api` process to migrate its guest,
//! follow the migration with a progress bar (or JSON lines), print a summary.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use ferry_transport::default_lane_count;
use ferry_transport::lanes::MAX_LANES;

use crate::api::{self, MigrateRequest};
use crate::security_args::SecurityArgs;

/// `ferry migrate`
#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Control socket of the source (`ferry vm run --api PATH`).
    #[arg(long)]
    pub api: PathBuf,
    /// Destination address (`ferry vm receive --listen ADDR`).
    #[arg(long)]
    pub to: String,
    /// TCP lanes to the destination (default from the core count).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_LANES)))]
    pub lanes: Option<u16>,
    #[command(flatten)]
    pub security: SecurityArgs,
    /// Downtime limit (ms).
    #[arg(long = "max-downtime-ms", alias = "max-downtime", default_value_t = 20)]
    pub max_downtime_ms: u64,
    /// Give up after this many seconds (the guest keeps running on the source).
    #[arg(long = "deadline-s", alias = "deadline", default_value_t = 300.0)]
    pub deadline_s: f64,
    /// Cap on wire bytes per second (e.g. 100M).
    #[arg(long, value_parser = parse_rate)]
    pub max_bandwidth: Option<u64>,
    /// Do not throttle the guest when rounds stop shrinking.
    #[arg(long)]
    pub no_auto_converge: bool,
    /// Encoder threads.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Do not send XOR deltas against earlier copies.
    #[arg(long, conflicts_with = "xor_cache")]
    pub no_delta: bool,
    /// Size of the cache of earlier page copies that XOR deltas are made
    /// against (e.g. 256M; default: a quarter of guest memory).
    #[arg(long, value_parser = parse_cache_size)]
    pub xor_cache: Option<usize>,
    /// Do not LZ4-compress pages.
    #[arg(long)]
    pub no_compress: bool,
    /// JSON lines (events, then the summary) instead of a progress bar.
    #[arg(long)]
    pub json: bool,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    ferry_vm::parse_size(s, 1).ok_or_else(|| format!("`{s}` is not a rate in bytes/s (e.g. 100M)"))
}

fn parse_cache_size(s: &str) -> Result<usize, String> {
    ferry_vm::parse_size(s, 1)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| format!("`{s}` is not a size in bytes (e.g. 256M)"))
}

impl MigrateArgs {
    /// The request sent to the source (fails when no security is chosen).
    pub fn request(&self) -> anyhow::Result<MigrateRequest> {
        Ok(MigrateRequest {
            to: self.to.clone(),
            lanes: Some(self.lanes.unwrap_or_else(default_lane_count)),
            security: Some(self.security.spec()?),
            max_downtime_ms: Some(self.max_downtime_ms),
            deadline_s: Some(self.deadline_s),
            max_bandwidth: self.max_bandwidth,
            auto_converge: Some(!self.no_auto_converge),
            workers: self.workers,
            xor_cache_bytes: if self.no_delta {
                Some(0)
            } else {
                self.xor_cache
            },
            compress: Some(!self.no_compress),
        })
    }
}

/// Runs a migration through the source's control socket. Returns the summary.
pub fn migrate(api_path: &Path, req: &MigrateRequest, json: bool) -> anyhow::Result<Value> {
    let mut msg = serde_json::to_value(req).expect("request serialises");
    msg["op"] = "migrate".into();
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(100)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} round {prefix:>2} [{bar:30}] {percent:>3}%  {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    let mut assessment = String::new();
    for line in api::request(api_path, &msg)? {
        let v = line?;
        if json {
            println!("{v}");
        }
        if let Some(result) = v.get("result").and_then(Value::as_str) {
            bar.finish_and_clear();
            if result == "ok" {
                return Ok(v["summary"].clone());
            }
            bail!(
                "migration failed: {} (guest: {})",
                v["error"].as_str().unwrap_or("unknown error"),
                v["guest"].as_str().map(describe_home).unwrap_or("unknown")
            );
        }
        match v["event"].as_str() {
            Some("connected") => bar.set_message(format!(
                "connected to {}: {} lanes, {}",
                v["to"].as_str().unwrap_or("?"),
                v["lanes"],
                v["security"].as_str().unwrap_or("?")
            )),
            Some("started") => bar.set_message(format!(
                "{} MiB, dirty log {}",
                v["guest_bytes"].as_u64().unwrap_or(0) >> 20,
                v["dirty_log"].as_str().unwrap_or("?")
            )),
            Some("round_progress") => {
                let total = v["pages_total"].as_u64().unwrap_or(1).max(1);
                bar.set_prefix(v["round"].to_string());
                bar.set_length(total);
                bar.set_position(v["pages_done"].as_u64().unwrap_or(0));
                bar.set_message(format!(
                    "{} pages left  {assessment}",
                    total.saturating_sub(v["pages_done"].as_u64().unwrap_or(0))
                ));
            }
            Some("round_finished") => {
                let a = &v["assessment"];
                assessment = format!(
                    "dirty {:.0} pages/s  bw {:.0} MB/s  expected downtime {:.1} ms  throttle {}%",
                    a["dirty_rate_pages_per_sec"].as_f64().unwrap_or(0.0),
                    a["bandwidth_bytes_per_sec"].as_f64().unwrap_or(0.0) / 1e6,
                    a["expected_downtime_ms"].as_f64().unwrap_or(0.0),
                    v["throttle_percent"]
                );
                if !json {
                    bar.println(format!(
                        "round {:>2}: {:>8} pages in {:>8.1} ms, {:>8} dirty after; {} -> {}",
                        v["round"],
                        v["pages"],
                        v["duration_ms"].as_f64().unwrap_or(0.0),
                        v["dirty_pages"],
                        assessment,
                        a["decision"]
                    ));
                }
            }
            Some("stop_and_copy") => {
                bar.set_message(format!("stop-and-copy: {} pages", v["dirty_pages"]))
            }
            Some("handover") => {
                bar.set_message(format!("handover: {}", v["step"].as_str().unwrap_or("?")))
            }
            Some("abandoned") => bar.println(format!(
                "abandoned: {}",
                v["reason"].as_str().unwrap_or("?")
            )),
            _ => {}
        }
    }
    bar.finish_and_clear();
    bail!("the source closed the control socket before the migration ended (did it crash?)")
}

fn describe_home(h: &str) -> &'static str {
    match h {
        "here" => "still running on the source",
        "migrated_away" => "running on the destination",
        "in_doubt" => "IN DOUBT: paused on the source; check the destination",
        _ => "unknown",
    }
}

/// Prints a human summary of a migration.
pub fn print_summary(s: &Value) {
    let ms = |k: &str| s[k].as_f64().unwrap_or(0.0);
    let gib = |k: &str| s[k].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64;
    println!("migration summary");
    println!("  rounds            {}", s["rounds"]);
    println!("  total time        {:.1} ms", ms("total_ms"));
    println!(
        "  downtime          {:.2} ms  (source pause -> destination resume)",
        ms("downtime_ms")
    );
    if let Some(parts) = s["downtime_parts"].as_object() {
        let list: Vec<String> = parts
            .iter()
            .map(|(k, v)| {
                format!(
                    "{} {:.2}",
                    k.trim_end_matches("_ms"),
                    v.as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        println!("    parts (ms)      {}", list.join(", "));
    }
    println!("  guest memory      {:.1} MiB", gib("memory_bytes"));
    println!("  guest bytes sent  {:.1} MiB", gib("guest_bytes"));
    println!("  wire bytes        {:.1} MiB", gib("wire_bytes"));
    println!(
        "  throughput        {:.0} MB/s guest data, {:.0} MB/s on the wire",
        s["throughput_bytes_per_sec"].as_f64().unwrap_or(0.0) / 1e6,
        s["wire_bytes_per_sec"].as_f64().unwrap_or(0.0) / 1e6
    );
    if let Some(p) = s["pages"].as_object() {
        let list: Vec<String> = p.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("  pages by encoding {}", list.join(", "));
    }
    println!("  max throttle      {}%", s["max_throttle_percent"]);
    println!(
        "  dirty log         {}",
        s["dirty_log"].as_str().unwrap_or("?")
    );
}

/// `ferry migrate`
pub fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let req = args.request()?;
    let summary = migrate(&args.api, &req, args.json).context("ferry migrate")?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"event": "summary", "summary": summary})
        );
    } else {
        print_summary(&summary);
    }
    Ok(())
}
