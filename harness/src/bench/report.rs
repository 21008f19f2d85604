//! Turning runs into medians, ratios against QEMU's best profile, a
//! terminal table, JSON lines, and the floor checks of the issue.
//!
//! ## Failures are never hidden
//! - A (workload, profile, limit) whose runs did not all succeed is
//!   *failed*: its medians (of the runs that did) are still shown, but its
//!   `ok` cell says `FAILED` and it gets no ratio.
//! - QEMU's best profile on a workload is the fastest among the QEMU
//!   profiles that succeeded in *every* run, at the same downtime limit as
//!   ferry's: a profile that worked once in three is no one's best.
//! - A floor whose ferry runs failed is missed, not n/a; one with a run
//!   measured while the machine was busy says so instead of a verdict.
//!
//! ## Noise is not a verdict
//! A ratio floor is decided by the interval of ferry's runs against
//! QEMU's ([`RatioInterval`]: every run against every run, 97 % for 5
//! against 5, 90 % for 3 against 3), not by the medians alone: met when
//! all of it is within the floor, missed when none of it is, and
//! *unresolved* when the floor lies inside it (the medians' ratio still
//! shows which side they fell on). With fewer runs than that, the medians
//! decide and the detail says so.

use std::fmt::Write as _;

use serde::Serialize;

use crate::bench::ceiling::Ceiling;
use crate::bench::matrix::{Engine, FerryProfile, Fill, Link, Profile, Workload};
use crate::bench::outcome::RunOutcome;
use crate::bench::stats::{RatioInterval, Spread, Standing};

const GIB: f64 = (1u64 << 30) as f64;

/// All runs of one profile at one downtime limit on one workload, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct Aggregate {
    /// Workload label.
    pub row: String,
    /// The workload.
    pub workload: Workload,
    /// Engine and profile.
    pub profile: Profile,
    /// Engine.
    pub engine: Engine,
    /// The downtime limit the engine was given, ms.
    pub downtime_limit_ms: u64,
    /// Runs made (skipped ones included).
    pub runs: usize,
    /// Runs that succeeded ([`RunOutcome::succeeded`]).
    pub ok: usize,
    /// Runs that were skipped.
    pub skipped: usize,
    /// Runs measured while the machine was busy.
    pub busy: usize,
    /// Why the others did not succeed (one entry per distinct reason).
    pub problems: Vec<String>,
    /// Total time on the harness's clock (migrate issued to the guest
    /// running on the destination), ms.
    pub total_ms: Option<Spread>,
    /// The engine's own total time, ms.
    pub engine_total_ms: Option<Spread>,
    /// Engine's downtime, ms.
    pub downtime_ms: Option<Spread>,
    /// Heartbeat gap seen from guest memory, ms.
    pub heartbeat_gap_ms: Option<Spread>,
    /// The gap's first part: the source's last beat to that value showing
    /// on the destination (the guest's last pass before the pause, the
    /// pause, the final state crossing), ms.
    pub gap_to_switch_ms: Option<Spread>,
    /// The gap's second part: from there to the destination's first new
    /// beat (resume and the guest's first pass there), ms.
    pub gap_after_switch_ms: Option<Spread>,
    /// Rounds.
    pub rounds: Option<Spread>,
    /// Engine's wire bytes, MiB.
    pub wire_mib: Option<Spread>,
    /// Bytes the link carried during the migration, MiB.
    pub link_mib: Option<Spread>,
    /// Source CPU s (guest vCPU included).
    pub src_cpu_s: Option<Spread>,
    /// Source CPU s without the vCPU thread.
    pub src_engine_cpu_s: Option<Spread>,
    /// Destination CPU s.
    pub dst_cpu_s: Option<Spread>,
    /// Destination CPU s without the vCPU thread.
    pub dst_engine_cpu_s: Option<Spread>,
    /// Source engine CPU s (no vCPU) per GiB of guest memory moved.
    pub src_cpu_per_gib: Option<Spread>,
    /// Destination engine CPU s (no vCPU) per GiB of guest memory moved.
    pub dst_cpu_per_gib: Option<Spread>,
    /// Pages/s the guest really dirtied on the source during the migration.
    pub guest_dirty_rate: Option<Spread>,
    /// Guest bytes per second of total time as a fraction of the ceiling
    /// (the TCP ceiling on loopback, the shaped rate on a shaped link).
    pub ceiling_fraction: Option<Spread>,
    /// Median total time / QEMU's best median total time on this workload.
    pub total_vs_qemu_best: Option<f64>,
    /// Median heartbeat gap / QEMU's lowest median gap on this workload
    /// (engines' own downtime figures when a gap is missing).
    pub downtime_vs_qemu_best: Option<f64>,
    /// Median engine CPU per GiB (source + destination, vCPU excluded) /
    /// that of QEMU's best-total profile.
    pub cpu_vs_qemu_best: Option<f64>,
    /// The successful runs' own figures, for intervals on the ratios.
    #[serde(skip)]
    pub samples: Samples,
}

/// One aggregate's successful runs, figure by figure (in run order).
#[derive(Debug, Clone, Default)]
pub struct Samples {
    /// Total time, ms.
    pub total_ms: Vec<f64>,
    /// Heartbeat gap, ms.
    pub heartbeat_gap_ms: Vec<f64>,
    /// Engine CPU per GiB, source + destination.
    pub cpu_per_gib: Vec<f64>,
}

impl Aggregate {
    /// Every run succeeded and at least one ran.
    pub fn complete(&self) -> bool {
        self.runs > 0 && self.ok == self.runs
    }

    /// Some run was made and failed (skipped runs are not failures).
    pub fn failed(&self) -> bool {
        self.ok + self.skipped < self.runs
    }

    /// Engine CPU per GiB, source + destination (medians).
    pub fn cpu_per_gib(&self) -> Option<f64> {
        Some(self.src_cpu_per_gib?.median + self.dst_cpu_per_gib?.median)
    }

    /// `qemu:multifd` at 20 ms, for notes.
    pub fn name(&self) -> String {
        format!("{} (limit {} ms)", self.profile, self.downtime_limit_ms)
    }
}

/// The limit ferry's runs on a row used (QEMU rows at it are "equal-limit").
fn ferry_limit(runs: &[RunOutcome], row: &str) -> Option<u64> {
    runs.iter()
        .find(|r| r.row == row && r.engine == Engine::Ferry)
        .map(|r| r.downtime_limit_ms)
}

/// Medians per (workload, profile, downtime limit), ratios against QEMU's
/// best complete profile at ferry's limit (or, on a row without ferry, at
/// `default_limit_ms`). `ceiling_bps` is the loopback TCP ceiling.
pub fn aggregate(
    runs: &[RunOutcome],
    ceiling_bps: Option<f64>,
    default_limit_ms: u64,
) -> Vec<Aggregate> {
    let mut keys: Vec<(String, Profile, u64)> = Vec::new();
    for r in runs {
        let k = (r.row.clone(), r.profile, r.downtime_limit_ms);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut out: Vec<Aggregate> = keys
        .into_iter()
        .map(|(row, profile, limit)| {
            let all: Vec<&RunOutcome> = runs
                .iter()
                .filter(|r| r.row == row && r.profile == profile && r.downtime_limit_ms == limit)
                .collect();
            summarise(&all, ceiling_bps)
        })
        .collect();
    let rows: Vec<String> = out.iter().map(|a| a.row.clone()).collect();
    for row in rows {
        let limit = ferry_limit(runs, &row).unwrap_or(default_limit_ms);
        let best = qemu_best(&out, &row, limit).map(|b| (b.total_ms, b.cpu_per_gib()));
        let gap_best = qemu_equal_limit(&out, &row, limit)
            .filter_map(|a| a.heartbeat_gap_ms.map(|s| s.median))
            .min_by(f64::total_cmp);
        let dt_best = qemu_equal_limit(&out, &row, limit)
            .filter_map(|a| a.downtime_ms.map(|s| s.median))
            .min_by(f64::total_cmp);
        for a in out.iter_mut().filter(|a| a.row == row && a.complete()) {
            if let Some((Some(bt), bcpu)) = best {
                a.total_vs_qemu_best = a.total_ms.map(|t| t.median / bt.median);
                a.cpu_vs_qemu_best = match (a.cpu_per_gib(), bcpu) {
                    (Some(c), Some(b)) if b > 0.0 => Some(c / b),
                    _ => None,
                };
            }
            a.downtime_vs_qemu_best = match (a.heartbeat_gap_ms, gap_best, a.downtime_ms, dt_best) {
                (Some(g), Some(gb), _, _) if gb > 0.0 => Some(g.median / gb),
                (_, _, Some(d), Some(db)) if db > 0.0 => Some(d.median / db),
                _ => None,
            };
        }
    }
    out
}

fn summarise(all: &[&RunOutcome], ceiling_bps: Option<f64>) -> Aggregate {
    let first = all[0];
    let ok: Vec<&RunOutcome> = all.iter().copied().filter(|r| r.succeeded()).collect();
    let mut problems: Vec<String> = Vec::new();
    for p in all.iter().filter_map(|r| r.failure()) {
        if !problems.contains(&p) {
            problems.push(p);
        }
    }
    let f = |get: &dyn Fn(&RunOutcome) -> Option<f64>| Spread::of(ok.iter().filter_map(|r| get(r)));
    let mib = |b: Option<u64>| b.map(|b| b as f64 / (1u64 << 20) as f64);
    let mem = first.workload.mem_bytes as f64;
    let ceiling = match first.workload.link {
        Link::Loopback => ceiling_bps,
        Link::Shaped { .. } => first.workload.link.bytes_per_sec(),
    };
    Aggregate {
        row: first.row.clone(),
        workload: first.workload,
        profile: first.profile,
        engine: first.engine,
        downtime_limit_ms: first.downtime_limit_ms,
        runs: all.len(),
        ok: ok.len(),
        skipped: all.iter().filter(|r| r.skipped()).count(),
        busy: all.iter().filter(|r| r.busy).count(),
        problems,
        total_ms: f(&|r| r.total_ms),
        engine_total_ms: f(&|r| r.engine_total_ms),
        downtime_ms: f(&|r| r.downtime_ms),
        heartbeat_gap_ms: f(&|r| r.heartbeat_gap_ms),
        gap_to_switch_ms: f(&|r| r.gap_parts_ms.map(|p| p.0)),
        gap_after_switch_ms: f(&|r| r.gap_parts_ms.map(|p| p.1)),
        rounds: f(&|r| r.rounds.map(|x| x as f64)),
        wire_mib: f(&|r| mib(r.wire_bytes)),
        link_mib: f(&|r| mib(r.link_bytes)),
        src_cpu_s: f(&|r| r.src_cpu_s),
        src_engine_cpu_s: f(&|r| r.src_engine_cpu_s),
        dst_cpu_s: f(&|r| r.dst_cpu_s),
        dst_engine_cpu_s: f(&|r| r.dst_engine_cpu_s),
        src_cpu_per_gib: f(&|r| r.src_engine_cpu_s.map(|c| c / (mem / GIB))),
        dst_cpu_per_gib: f(&|r| r.dst_engine_cpu_s.map(|c| c / (mem / GIB))),
        guest_dirty_rate: f(&|r| r.guest_dirty_rate),
        ceiling_fraction: ceiling
            .and_then(|c| f(&|r| r.total_ms.filter(|&t| t > 0.0).map(|t| mem / (t / 1e3) / c))),
        total_vs_qemu_best: None,
        downtime_vs_qemu_best: None,
        cpu_vs_qemu_best: None,
        samples: Samples {
            total_ms: ok.iter().filter_map(|r| r.total_ms).collect(),
            heartbeat_gap_ms: ok.iter().filter_map(|r| r.heartbeat_gap_ms).collect(),
            cpu_per_gib: ok
                .iter()
                .filter_map(|r| Some((r.src_engine_cpu_s? + r.dst_engine_cpu_s?) / (mem / GIB)))
                .collect(),
        },
    }
}

/// QEMU's complete aggregates on `row` at `limit`.
fn qemu_equal_limit<'a>(
    aggs: &'a [Aggregate],
    row: &'a str,
    limit: u64,
) -> impl Iterator<Item = &'a Aggregate> + 'a {
    aggs.iter().filter(move |a| {
        a.row == row && a.engine == Engine::Qemu && a.downtime_limit_ms == limit && a.complete()
    })
}

/// QEMU's best profile on `row` at `limit`: the lowest median total among
/// those that succeeded in every run.
pub fn qemu_best<'a>(aggs: &'a [Aggregate], row: &'a str, limit: u64) -> Option<&'a Aggregate> {
    qemu_equal_limit(aggs, row, limit)
        .filter(|a| a.total_ms.is_some())
        .min_by(|a, b| {
            let t = |x: &Aggregate| x.total_ms.map_or(f64::INFINITY, |s| s.median);
            t(a).total_cmp(&t(b))
        })
}

fn cell(s: Option<Spread>, prec: usize) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.n == 1 => format!("{:.*}", prec, s.median),
        Some(s) => format!(
            "{:.*} [{:.*}-{:.*}]",
            prec, s.median, prec, s.min, prec, s.max
        ),
    }
}

fn ratio(a: &Aggregate, r: Option<f64>) -> String {
    if a.failed() {
        return "FAILED".into();
    }
    r.map_or("-".into(), |r| format!("{r:.2}x"))
}

/// The terminal table: one line per workload, profile and limit, medians
/// with [min-max], ratios against QEMU's best profile of the same workload.
pub fn table(aggs: &[Aggregate], ceilings: &[Ceiling]) -> String {
    let mut s = String::new();
    for c in ceilings {
        let _ = writeln!(
            s,
            "TCP ceiling: {} connection(s), {:.0} MB/s ({} MiB in {:.2} s), {:.2} CPU-s/GiB (sender + receiver)",
            c.connections,
            c.bytes_per_sec / 1e6,
            c.bytes >> 20,
            c.secs,
            c.cpu_per_gib()
        );
    }
    let header = [
        "workload",
        "engine:profile",
        "limit",
        "ok",
        "total ms",
        "engine ms",
        "downtime ms",
        "hb gap ms",
        "gap parts",
        "rounds",
        "wire MiB",
        "link MiB",
        "guest p/s",
        "src cpu s",
        "dst cpu s",
        "cpu s/GiB",
        "of ceil",
        "total/Qbest",
        "down/Qbest",
        "cpu/Qbest",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for a in aggs {
        let cpu = |x: Option<Spread>, e: Option<Spread>| match (x, e) {
            (Some(x), Some(e)) => format!("{:.2} ({:.2})", x.median, e.median),
            _ => "-".into(),
        };
        let mut ok = format!("{}/{}", a.ok, a.runs);
        if a.failed() {
            ok += " FAILED";
        }
        if a.busy > 0 {
            ok += &format!(" busy:{}", a.busy);
        }
        rows.push(vec![
            a.row.clone(),
            a.profile.to_string(),
            a.downtime_limit_ms.to_string(),
            ok,
            cell(a.total_ms, 0),
            cell(a.engine_total_ms, 0),
            cell(a.downtime_ms, 1),
            cell(a.heartbeat_gap_ms, 1),
            match (a.gap_to_switch_ms, a.gap_after_switch_ms) {
                (Some(b), Some(c)) => format!("{:.1} + {:.1}", b.median, c.median),
                _ => "-".into(),
            },
            cell(a.rounds, 0),
            cell(a.wire_mib, 0),
            cell(a.link_mib, 0),
            a.guest_dirty_rate
                .map_or("-".into(), |d| format!("{:.0}", d.median)),
            cpu(a.src_cpu_s, a.src_engine_cpu_s),
            cpu(a.dst_cpu_s, a.dst_engine_cpu_s),
            match (a.src_cpu_per_gib, a.dst_cpu_per_gib) {
                (Some(x), Some(y)) => format!("{:.2}+{:.2}", x.median, y.median),
                _ => "-".into(),
            },
            a.ceiling_fraction
                .map_or("-".into(), |c| format!("{:.0}%", c.median * 100.0)),
            ratio(a, a.total_vs_qemu_best),
            ratio(a, a.downtime_vs_qemu_best),
            ratio(a, a.cpu_vs_qemu_best),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for (n, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i < 2 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        let _ = writeln!(s, "{}", line.join("  ").trim_end());
        if n == 0 {
            let _ = writeln!(
                s,
                "{}",
                "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1))
            );
        }
    }
    for a in aggs.iter().filter(|a| !a.problems.is_empty()) {
        for p in &a.problems {
            let _ = writeln!(s, "note: {} {}: {p}", a.row, a.name());
        }
    }
    let _ = writeln!(
        s,
        "total ms: the harness's clock, from the migrate command to the guest seen running on the destination (both engines); \
         engine ms: the engine's own figure. limit: the downtime limit the engine was given. \
         cpu columns: all CPU of the side's processes during the migration (in parentheses: without the guest's vCPU thread); \
         cpu s/GiB: engine CPU without the vCPU per GiB of guest memory, source+destination. \
         gap parts: medians of the heartbeat gap's two parts, up to the switch value showing on the destination + from there to the first new beat. \
         x/Qbest: median of this profile / QEMU's best median on the same workload at ferry's downtime limit, among QEMU profiles that succeeded in every run (downtime: heartbeat gap). \
         FAILED: not every run succeeded (medians are of those that did; no ratios). busy:N: N runs measured while other work used the machine."
    );
    s
}

/// A floor's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Held.
    Met,
    /// Did not hold (or ferry failed).
    Missed,
    /// Nothing to compare against (the detail says why).
    NotApplicable,
    /// Some run behind it was measured while the machine was busy: no verdict.
    Busy,
    /// The ratio's confidence interval ([`RatioInterval`]) holds the floor:
    /// the median ratio falls on one side, but these runs cannot tell.
    Unresolved,
}

/// The least confidence an interval needs to decide a floor (3 runs
/// against 3 give 0.9); with fewer runs the medians' ratio decides alone,
/// and the detail says so.
pub const MIN_CONFIDENCE: f64 = 0.85;

/// One floor of the issue, checked (reported, never asserted).
#[derive(Debug, Clone, Serialize)]
pub struct FloorCheck {
    /// Which floor.
    pub floor: String,
    /// Workload.
    pub row: String,
    /// The verdict.
    pub verdict: Verdict,
    /// The ratio's interval, when there was one to compute.
    pub interval: Option<RatioInterval>,
    /// The figures behind it.
    pub detail: String,
}

/// The floors, for ferry's default profile on each row:
/// - total time <= 1.0x QEMU's best on every uncapped row of incompressible
///   memory over loopback, <= 0.5x on `fill=mix` rows and shaped-link rows;
/// - heartbeat gap <= 1/3 of QEMU's lowest at the same downtime limit;
/// - engine CPU per GiB (source + destination) <= 0.7x QEMU's best profile's;
/// - on a capped row, ferry converges in every run (QEMU's profiles listed).
///
/// On loopback rows the details also say what the session's TCP ceilings
/// (`ceilings`) imply: the time a bare TCP stream needs for the bytes ferry
/// sent, and the CPU it spends on them, each against QEMU's best. Those are
/// bounds no engine that moves the same bytes over the same sockets can
/// beat, so a floor below them cannot be met on this machine.
pub fn floors(aggs: &[Aggregate], ceilings: &[Ceiling]) -> Vec<FloorCheck> {
    let fastest = ceilings
        .iter()
        .max_by(|a, b| a.bytes_per_sec.total_cmp(&b.bytes_per_sec));
    let cheapest = ceilings
        .iter()
        .map(Ceiling::cpu_per_gib)
        .filter(|c| *c > 0.0)
        .min_by(f64::total_cmp);
    let mut out = Vec::new();
    let mut rows: Vec<&str> = Vec::new();
    for a in aggs {
        if !rows.contains(&a.row.as_str()) {
            rows.push(&a.row);
        }
    }
    for row in rows {
        let of_row: Vec<&Aggregate> = aggs.iter().filter(|a| a.row == row).collect();
        let Some(ferry) = of_row
            .iter()
            .find(|a| a.profile == Profile::Ferry(FerryProfile::Default))
        else {
            continue;
        };
        let w = ferry.workload;
        let limit = ferry.downtime_limit_ms;
        let loopback = matches!(w.link, Link::Loopback);
        // Ferry's wire bytes as a share of guest memory (what the ceiling's
        // per-byte figures are scaled by).
        let wire_share = ferry
            .wire_mib
            .map(|m| m.median * f64::from(1u32 << 20) / w.mem_bytes as f64);
        let busy = of_row.iter().any(|a| a.busy > 0);
        let best = qemu_best(aggs, row, limit);
        let ferry_failed = (!ferry.complete()).then(|| {
            format!(
                "ferry succeeded in {}/{} runs: {}",
                ferry.ok,
                ferry.runs,
                ferry.problems.join("; ")
            )
        });
        let no_qemu = || {
            let tried: Vec<String> = of_row
                .iter()
                .filter(|a| a.engine == Engine::Qemu && a.downtime_limit_ms == limit)
                .map(|a| format!("{} {}/{}", a.profile, a.ok, a.runs))
                .collect();
            format!(
                "no QEMU profile at {limit} ms succeeded in every run ({})",
                if tried.is_empty() {
                    "none ran".into()
                } else {
                    tried.join(", ")
                }
            )
        };
        let mut push = |floor: String,
                        ratio: Option<f64>,
                        interval: Option<RatioInterval>,
                        max: f64,
                        mut detail: String| {
            let decisive = interval.filter(|i| i.confidence >= MIN_CONFIDENCE);
            let verdict = if ferry_failed.is_some() {
                Verdict::Missed
            } else if busy {
                Verdict::Busy
            } else {
                match (ratio, decisive.map(|i| i.against(max))) {
                    (None, _) => Verdict::NotApplicable,
                    (Some(_), Some(Standing::Below)) => Verdict::Met,
                    (Some(_), Some(Standing::Above)) => Verdict::Missed,
                    (Some(_), Some(Standing::Straddles)) => Verdict::Unresolved,
                    (Some(r), None) if r <= max => Verdict::Met,
                    (Some(_), None) => Verdict::Missed,
                }
            };
            if let (Some(_), Some(i)) = (ratio, interval) {
                detail += &if decisive.is_some() {
                    format!(
                        "; runs against runs {:.2}x, {:.0} % interval {:.2}-{:.2}x",
                        i.estimate,
                        i.confidence * 100.0,
                        i.low,
                        i.high
                    )
                } else {
                    format!(
                        "; too few runs for an interval ({:.0} % at most): the medians decide",
                        i.confidence * 100.0
                    )
                };
            }
            let detail = match &ferry_failed {
                Some(f) => format!("{f}; {detail}"),
                None => detail,
            };
            out.push(FloorCheck {
                floor,
                row: row.into(),
                verdict,
                interval,
                detail,
            });
        };
        let ms = |s: Option<Spread>| s.map_or("-".into(), |s| format!("{:.0} ms", s.median));
        if w.cap_bytes_per_sec.is_none() {
            let max = if w.fill != Fill::Random || matches!(w.link, Link::Shaped { .. }) {
                0.5
            } else {
                1.0
            };
            let ratio = best.and_then(|b| Some(ferry.total_ms?.median / b.total_ms?.median));
            let others: Vec<String> = of_row
                .iter()
                .filter(|a| {
                    a.engine == Engine::Qemu && a.downtime_limit_ms != limit && a.complete()
                })
                .map(|a| format!("{} {}", a.name(), ms(a.total_ms)))
                .collect();
            let mut detail = format!(
                "ferry {}, QEMU best {}",
                ms(ferry.total_ms),
                best.map_or_else(no_qemu, |b| format!("{} {}", b.name(), ms(b.total_ms)))
            );
            if let Some(r) = ratio {
                detail += &format!(" = {r:.2}x");
            }
            if !others.is_empty() {
                detail += &format!("; QEMU at other limits: {}", others.join(", "));
            }
            if let (true, Some(c), Some(wire)) = (loopback, fastest, ferry.wire_mib) {
                let bare_ms = wire.median * f64::from(1u32 << 20) / c.bytes_per_sec * 1e3;
                detail += &format!(
                    "; the TCP ceiling ({} connection(s)) alone moves ferry's {:.0} MiB in {bare_ms:.0} ms",
                    c.connections, wire.median
                );
                if let Some(q) = best.and_then(|b| b.total_ms) {
                    detail += &format!(" = {:.2}x QEMU's best", bare_ms / q.median);
                }
            }
            let interval =
                best.and_then(|b| RatioInterval::of(&ferry.samples.total_ms, &b.samples.total_ms));
            push(
                format!("total time <= {max}x QEMU's best"),
                ratio,
                interval,
                max,
                detail,
            );
        }
        {
            let lowest = of_row
                .iter()
                .filter(|a| {
                    a.engine == Engine::Qemu && a.downtime_limit_ms == limit && a.complete()
                })
                .filter_map(|a| a.heartbeat_gap_ms.map(|g| (g.median, a.name(), *a)))
                .min_by(|a, b| a.0.total_cmp(&b.0));
            let ratio = lowest
                .as_ref()
                .and_then(|(q, _, _)| Some(ferry.heartbeat_gap_ms?.median / q));
            let interval = lowest.as_ref().and_then(|(_, _, a)| {
                RatioInterval::of(&ferry.samples.heartbeat_gap_ms, &a.samples.heartbeat_gap_ms)
            });
            let detail = format!(
                "ferry {}, QEMU lowest {}",
                ferry
                    .heartbeat_gap_ms
                    .map_or("-".into(), |g| format!("{:.1} ms", g.median)),
                lowest.map_or_else(no_qemu, |(g, n, _)| format!("{g:.1} ms ({n})"))
            );
            push(
                "guest-seen downtime (heartbeat gap) <= 1/3 of QEMU's lowest at the same limit"
                    .into(),
                ratio,
                interval,
                1.0 / 3.0,
                detail,
            );
        }
        {
            let q = best.and_then(|b| b.cpu_per_gib().map(|c| (c, b.name())));
            let ratio = q
                .as_ref()
                .and_then(|(c, _)| Some(ferry.cpu_per_gib()? / c).filter(|_| *c > 0.0));
            let mut detail = format!(
                "ferry {}, QEMU best profile {}",
                ferry
                    .cpu_per_gib()
                    .map_or("-".into(), |c| format!("{c:.2} s/GiB")),
                q.as_ref()
                    .map_or_else(no_qemu, |(c, n)| format!("{c:.2} s/GiB ({n})"))
            );
            if let (true, Some(bare), Some(share)) = (loopback, cheapest, wire_share) {
                let bare = bare * share;
                detail += &format!(
                    "; bare TCP over loopback costs {bare:.2} s/GiB for ferry's bytes (this session's ceiling)"
                );
                if let Some((c, _)) = q.as_ref().filter(|(c, _)| *c > 0.0) {
                    detail += &format!(
                        " = {:.2}x QEMU's, leaving {:.2} s/GiB under the floor for all other work",
                        bare / c,
                        0.7 * c - bare
                    );
                }
            }
            let interval = best.and_then(|b| {
                RatioInterval::of(&ferry.samples.cpu_per_gib, &b.samples.cpu_per_gib)
            });
            push(
                "engine CPU per GiB (source + destination, no vCPU) <= 0.7x QEMU's best profile's"
                    .into(),
                ratio,
                interval,
                0.7,
                detail,
            );
        }
        if w.cap_bytes_per_sec.is_some() {
            let converged: Vec<String> = of_row
                .iter()
                .filter(|a| a.engine == Engine::Qemu && a.complete())
                .map(|a| a.name())
                .collect();
            let detail = format!(
                "ferry {}/{}; QEMU converged in every run with: {}",
                ferry.ok,
                ferry.runs,
                if converged.is_empty() {
                    "none".into()
                } else {
                    converged.join(", ")
                }
            );
            push(
                "capped: ferry converges (in every run)".into(),
                Some(if ferry.complete() { 0.0 } else { 1.0 }),
                None,
                0.5,
                detail,
            );
        }
    }
    out
}

/// The floors as text.
pub fn floors_text(f: &[FloorCheck]) -> String {
    let mut s = String::new();
    for c in f {
        let verdict = match c.verdict {
            Verdict::Met => "met",
            Verdict::Missed => "MISSED",
            Verdict::NotApplicable => "n/a",
            Verdict::Busy => "BUSY: no verdict",
            Verdict::Unresolved => "UNRESOLVED: within the runs' spread",
        };
        let _ = writeln!(s, "floor [{verdict}] {} — {}: {}", c.floor, c.row, c.detail);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::matrix::{DirtyLevel, QemuProfile};
    use crate::bench::outcome::{RunStatus, StaticCheck};

    const F: Profile = Profile::Ferry(FerryProfile::Default);
    const Q: Profile = Profile::Qemu(QemuProfile::Default);
    const QM: Profile = Profile::Qemu(QemuProfile::Multifd);

    fn run(profile: Profile, w: Workload, total: f64, gap: f64, status: RunStatus) -> RunOutcome {
        let mut r = RunOutcome::new(profile, w, 0, 20, status);
        r.total_ms = Some(total);
        r.heartbeat_gap_ms = Some(gap);
        r.guest_alive = Some(true);
        r.static_memory = StaticCheck::Matched(1 << 20);
        r.src_engine_cpu_s = Some(0.5);
        r.dst_engine_cpu_s = Some(0.5);
        r
    }

    fn ok(profile: Profile, w: Workload, total: f64, gap: f64) -> RunOutcome {
        run(profile, w, total, gap, RunStatus::Completed)
    }

    fn floor<'a>(f: &'a [FloorCheck], prefix: &str) -> &'a FloorCheck {
        f.iter()
            .find(|c| c.floor.starts_with(prefix))
            .unwrap_or_else(|| panic!("no floor {prefix}: {f:?}"))
    }

    #[test]
    fn a_profile_that_failed_once_is_not_qemus_best() {
        let w = Workload::new(1 << 30, DirtyLevel::Idle);
        let runs = vec![
            // The default profile is fastest when it works, but it failed once.
            ok(Q, w, 500.0, 100.0),
            run(Q, w, 1.0, 1.0, RunStatus::Failed("x".into())),
            ok(QM, w, 6000.0, 200.0),
            ok(QM, w, 6000.0, 200.0),
            ok(F, w, 2000.0, 5.0),
            ok(F, w, 3000.0, 7.0),
        ];
        let aggs = aggregate(&runs, Some(1e9), 20);
        let ferry = aggs.iter().find(|a| a.profile == F).unwrap();
        assert_eq!(ferry.total_ms.unwrap().median, 2500.0);
        assert_eq!(ferry.total_vs_qemu_best, Some(2500.0 / 6000.0));
        assert_eq!(ferry.downtime_vs_qemu_best, Some(6.0 / 200.0));
        let qemu_default = aggs.iter().find(|a| a.profile == Q).unwrap();
        assert_eq!((qemu_default.ok, qemu_default.runs), (1, 2));
        assert!(qemu_default.failed());
        assert_eq!(qemu_default.total_vs_qemu_best, None);
        assert!(table(&aggs, &[]).contains("1/2 FAILED"));

        let f = floors(&aggs, &[]);
        assert_eq!(floor(&f, "total time <= 1x").verdict, Verdict::Met);
        assert_eq!(floor(&f, "guest-seen downtime").verdict, Verdict::Met);
    }

    #[test]
    fn loopback_floors_say_what_the_tcp_ceiling_allows() {
        let w = Workload::new(1 << 30, DirtyLevel::Idle);
        let with_wire = |mut r: RunOutcome| {
            r.wire_bytes = Some(1 << 30);
            r
        };
        let runs = vec![
            with_wire(ok(QM, w, 1000.0, 10.0)),
            with_wire(ok(F, w, 800.0, 2.0)),
        ];
        // 2 GiB in 0.5 s for 1.6 CPU-s: 4 GiB/s at 0.8 s/GiB.
        let ceiling = Ceiling {
            connections: 4,
            bytes: 2 << 30,
            secs: 0.5,
            bytes_per_sec: 4.0 * f64::from(1u32 << 30),
            cpu_secs: 1.6,
        };
        let f = floors(&aggregate(&runs, None, 20), &[ceiling]);
        let total = floor(&f, "total time <= 1x");
        assert!(
            total
                .detail
                .contains("alone moves ferry's 1024 MiB in 250 ms = 0.25x QEMU's best"),
            "{total:?}"
        );
        // Both engines spent 0.5 + 0.5 s on 1 GiB: ferry's floor is 0.70
        // s/GiB and a bare stream of its bytes costs 0.80 already.
        let cpu = floor(&f, "engine CPU per GiB");
        assert_eq!(cpu.verdict, Verdict::Missed);
        assert!(
            cpu.detail
                .contains("costs 0.80 s/GiB for ferry's bytes (this session's ceiling) = 0.80x QEMU's, leaving -0.10 s/GiB"),
            "{cpu:?}"
        );
        // Without ceilings (or on a shaped link) the details have no bound.
        let f = floors(&aggregate(&runs, None, 20), &[]);
        assert!(!floor(&f, "engine CPU per GiB").detail.contains("bare TCP"));
    }

    #[test]
    fn overlapping_runs_leave_a_floor_unresolved_and_apart_ones_decide_it() {
        let w = Workload::new(1 << 30, DirtyLevel::Idle);
        let rows = |ferry: [f64; 5], qemu: [f64; 5]| {
            let mut runs = Vec::new();
            for (f, q) in ferry.iter().zip(&qemu) {
                runs.push(ok(QM, w, *q, 30.0));
                runs.push(ok(F, w, *f, 3.0));
            }
            floors(&aggregate(&runs, None, 20), &[])
        };
        // Session 17's 1G idle totals: ferry's median is 1.08x QEMU's, but
        // the runs overlap.
        let f = rows(
            [403.0, 356.0, 408.0, 437.0, 337.0],
            [464.0, 348.0, 389.0, 371.0, 373.0],
        );
        let total = floor(&f, "total time <= 1x");
        assert_eq!(total.verdict, Verdict::Unresolved, "{total:?}");
        let i = total.interval.unwrap();
        assert!(i.low < 1.0 && i.high > 1.0 && i.confidence > 0.96, "{i:?}");
        assert!(total.detail.contains("97 % interval"), "{total:?}");
        assert!(floors_text(&f).contains("UNRESOLVED"));
        // Gaps 3 ms against 30 ms in every run: shown.
        assert_eq!(floor(&f, "guest-seen downtime").verdict, Verdict::Met);
        // Ferry slower in every run, and faster in every run.
        let slower = rows(
            [450.0, 460.0, 455.0, 470.0, 452.0],
            [380.0, 375.0, 390.0, 385.0, 379.0],
        );
        assert_eq!(floor(&slower, "total time <= 1x").verdict, Verdict::Missed);
        let faster = rows(
            [350.0, 360.0, 355.0, 340.0, 352.0],
            [380.0, 375.0, 390.0, 385.0, 379.0],
        );
        assert_eq!(floor(&faster, "total time <= 1x").verdict, Verdict::Met);
        // Equal CPU in every run: the interval is the point 1.0x, over 0.7x.
        assert_eq!(
            floor(&faster, "engine CPU per GiB").verdict,
            Verdict::Missed
        );
    }

    #[test]
    fn a_ferry_row_without_one_success_misses_its_floors() {
        let w = Workload::new(1 << 30, DirtyLevel::Idle);
        let runs = vec![
            ok(Q, w, 900.0, 100.0),
            run(F, w, 1.0, 1.0, RunStatus::NotConverged("deadline".into())),
        ];
        let f = floors(&aggregate(&runs, None, 20), &[]);
        for c in &f {
            assert_eq!(c.verdict, Verdict::Missed, "{c:?}");
            assert!(c.detail.contains("ferry succeeded in 0/1"), "{c:?}");
        }
        assert!(!f.is_empty());
    }

    #[test]
    fn a_missing_digest_or_total_is_not_a_success() {
        let w = Workload::new(256 << 20, DirtyLevel::Moderate);
        let mut r = ok(F, w, 100.0, 1.0);
        r.static_memory = StaticCheck::NotCompared("no guest status block".into());
        assert!(r.failure().unwrap().contains("not compared"));
        let mut r2 = ok(F, w, 100.0, 1.0);
        r2.total_ms = None;
        assert!(!r2.succeeded());
        let mut r3 = ok(F, w, 100.0, 1.0);
        r3.guest_alive = Some(false);
        r3.alive_detail = "heartbeat stuck at 7".into();
        let aggs = aggregate(&[r, r2, r3], None, 20);
        assert_eq!(aggs[0].ok, 0);
        assert!(aggs[0]
            .problems
            .iter()
            .any(|p| p.contains("heartbeat stuck")));
        assert!(aggs[0].total_ms.is_none());
        let t = table(&aggs, &[]);
        assert!(t.contains("note: 256M moderate"), "{t}");
        assert!(t.contains("0/3 FAILED"), "{t}");
    }

    #[test]
    fn busy_runs_get_no_verdict_and_other_limits_are_shown_beside() {
        let w = Workload::new(1 << 30, DirtyLevel::Idle).with_fill(Fill::MIX);
        let mut q300 = ok(Q, w, 400.0, 150.0);
        q300.downtime_limit_ms = 300;
        let mut slow = ok(F, w, 450.0, 3.0);
        slow.busy = true;
        let runs = vec![ok(Q, w, 1000.0, 30.0), q300, slow];
        let aggs = aggregate(&runs, None, 20);
        // ferry is compared with QEMU at its own 20 ms limit only.
        let ferry = aggs.iter().find(|a| a.profile == F).unwrap();
        assert_eq!(ferry.total_vs_qemu_best, Some(0.45));
        let f = floors(&aggs, &[]);
        let total = floor(&f, "total time <= 0.5x");
        assert_eq!(total.verdict, Verdict::Busy);
        assert!(
            total
                .detail
                .contains("QEMU at other limits: qemu:default (limit 300 ms) 400 ms"),
            "{}",
            total.detail
        );
        assert!(floors_text(&f).contains("BUSY"));
    }

    #[test]
    fn capped_rows_check_convergence() {
        let w = Workload::new(1 << 30, DirtyLevel::Capped);
        let runs = vec![
            run(Q, w, 1.0, 1.0, RunStatus::NotConverged("60 s".into())),
            ok(F, w, 20000.0, 4.0),
        ];
        let f = floors(&aggregate(&runs, None, 20), &[]);
        let c = floor(&f, "capped");
        assert_eq!(c.verdict, Verdict::Met);
        assert!(c.detail.contains("with: none"), "{}", c.detail);
        assert!(f.iter().all(|c| !c.floor.starts_with("total time")));
        assert_eq!(floor(&f, "guest-seen").verdict, Verdict::NotApplicable);
    }
}
