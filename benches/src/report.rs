//! Turning runs into medians, ratios against QEMU's best profile, a
//! terminal table, JSON lines, and the floor checks of the issue.

use std::fmt::Write as _;

use serde::Serialize;

use crate::ceiling::Ceiling;
use crate::matrix::{DirtyLevel, Engine, FerryProfile, Profile, Workload};
use crate::outcome::{RunOutcome, RunStatus};
use crate::stats::Spread;

/// All runs of one profile on one workload, summarised.
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
    /// Runs made.
    pub runs: usize,
    /// Runs that completed with the guest alive at the destination.
    pub ok: usize,
    /// Why the others did not (one entry per distinct reason).
    pub problems: Vec<String>,
    /// Engine's total time, ms.
    pub total_ms: Option<Spread>,
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
    /// Loopback bytes during the migration, MiB.
    pub lo_mib: Option<Spread>,
    /// Source CPU s (guest vCPU included).
    pub src_cpu_s: Option<Spread>,
    /// Source CPU s without the vCPU thread.
    pub src_engine_cpu_s: Option<Spread>,
    /// Destination CPU s.
    pub dst_cpu_s: Option<Spread>,
    /// Destination CPU s without the vCPU thread.
    pub dst_engine_cpu_s: Option<Spread>,
    /// Pages/s the guest really dirtied on the source during the migration.
    pub guest_dirty_rate: Option<Spread>,
    /// Guest bytes per second of total time as a fraction of the TCP
    /// ceiling.
    pub ceiling_fraction: Option<Spread>,
    /// Median total time / QEMU's best median total time on this workload.
    pub total_vs_qemu_best: Option<f64>,
    /// Median downtime / QEMU's lowest median downtime on this workload
    /// (heartbeat gap when both have one, else the engines' own figures).
    pub downtime_vs_qemu_best: Option<f64>,
    /// Median engine CPU (source + destination, vCPU excluded) / that of
    /// QEMU's best-total profile.
    pub cpu_vs_qemu_best: Option<f64>,
}

/// Median totals per profile for the runs of one workload.
pub fn aggregate(runs: &[RunOutcome], ceiling_bps: Option<f64>) -> Vec<Aggregate> {
    let mut keys: Vec<(String, Profile)> = Vec::new();
    for r in runs {
        let k = (r.row.clone(), r.profile);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut out: Vec<Aggregate> = keys
        .into_iter()
        .map(|(row, profile)| {
            let all: Vec<&RunOutcome> = runs
                .iter()
                .filter(|r| r.row == row && r.profile == profile)
                .collect();
            let ok: Vec<&RunOutcome> = all.iter().copied().filter(|r| r.succeeded()).collect();
            let mut problems: Vec<String> = Vec::new();
            for r in &all {
                let p = match &r.status {
                    RunStatus::Completed if !r.succeeded() => {
                        format!("guest not healthy at the destination: {}", r.alive_detail)
                    }
                    RunStatus::Completed => continue,
                    RunStatus::NotConverged(why) => format!("not converged: {why}"),
                    RunStatus::Failed(why) => format!("failed: {why}"),
                    RunStatus::Skipped(why) => format!("skipped: {why}"),
                };
                if !problems.contains(&p) {
                    problems.push(p);
                }
            }
            let f = |get: &dyn Fn(&RunOutcome) -> Option<f64>| {
                Spread::of(ok.iter().filter_map(|r| get(r)))
            };
            let mib = |b: Option<u64>| b.map(|b| b as f64 / (1u64 << 20) as f64);
            let mem = all[0].workload.mem_bytes as f64;
            Aggregate {
                row,
                workload: all[0].workload,
                profile,
                engine: profile.engine(),
                runs: all.len(),
                ok: ok.len(),
                problems,
                total_ms: f(&|r| r.total_ms),
                downtime_ms: f(&|r| r.downtime_ms),
                heartbeat_gap_ms: f(&|r| r.heartbeat_gap_ms),
                gap_to_switch_ms: f(&|r| r.gap_parts_ms.map(|p| p.0)),
                gap_after_switch_ms: f(&|r| r.gap_parts_ms.map(|p| p.1)),
                rounds: f(&|r| r.rounds.map(|x| x as f64)),
                wire_mib: f(&|r| mib(r.wire_bytes)),
                lo_mib: f(&|r| mib(r.lo_bytes)),
                src_cpu_s: f(&|r| r.src_cpu_s),
                src_engine_cpu_s: f(&|r| r.src_engine_cpu_s),
                dst_cpu_s: f(&|r| r.dst_cpu_s),
                dst_engine_cpu_s: f(&|r| r.dst_engine_cpu_s),
                guest_dirty_rate: f(&|r| r.guest_dirty_rate),
                ceiling_fraction: ceiling_bps.and_then(|c| {
                    f(&|r| r.total_ms.filter(|&t| t > 0.0).map(|t| mem / (t / 1e3) / c))
                }),
                total_vs_qemu_best: None,
                downtime_vs_qemu_best: None,
                cpu_vs_qemu_best: None,
            }
        })
        .collect();
    let rows: Vec<String> = out.iter().map(|a| a.row.clone()).collect();
    for row in rows {
        let qemu: Vec<&Aggregate> = out
            .iter()
            .filter(|a| a.row == row && a.engine == Engine::Qemu && a.ok > 0)
            .collect();
        let best_total = qemu
            .iter()
            .filter_map(|a| a.total_ms.map(|s| (s.median, engine_cpu(a))))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        let gap_best = qemu
            .iter()
            .filter_map(|a| a.heartbeat_gap_ms.map(|s| s.median))
            .min_by(f64::total_cmp);
        let dt_best = qemu
            .iter()
            .filter_map(|a| a.downtime_ms.map(|s| s.median))
            .min_by(f64::total_cmp);
        for a in out.iter_mut().filter(|a| a.row == row && a.ok > 0) {
            if let (Some((bt, bcpu)), Some(t)) = (best_total, a.total_ms) {
                a.total_vs_qemu_best = Some(t.median / bt);
                a.cpu_vs_qemu_best = match (engine_cpu(a), bcpu) {
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

fn engine_cpu(a: &Aggregate) -> Option<f64> {
    Some(a.src_engine_cpu_s?.median + a.dst_engine_cpu_s?.median)
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

fn ratio(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}x"))
}

/// The terminal table: one line per workload and profile, medians with
/// [min-max], ratios against QEMU's best profile of the same workload.
pub fn table(aggs: &[Aggregate], ceilings: &[Ceiling]) -> String {
    let mut s = String::new();
    for c in ceilings {
        let _ = writeln!(
            s,
            "TCP ceiling: {} connection(s), {:.0} MB/s ({} MiB in {:.2} s)",
            c.connections,
            c.bytes_per_sec / 1e6,
            c.bytes >> 20,
            c.secs
        );
    }
    let header = [
        "workload",
        "engine:profile",
        "ok",
        "total ms",
        "downtime ms",
        "hb gap ms",
        "gap parts",
        "rounds",
        "wire MiB",
        "lo MiB",
        "guest p/s",
        "src cpu s",
        "dst cpu s",
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
        rows.push(vec![
            a.row.clone(),
            a.profile.to_string(),
            format!("{}/{}", a.ok, a.runs),
            cell(a.total_ms, 0),
            cell(a.downtime_ms, 1),
            cell(a.heartbeat_gap_ms, 1),
            match (a.gap_to_switch_ms, a.gap_after_switch_ms) {
                (Some(b), Some(c)) => format!("{:.1} + {:.1}", b.median, c.median),
                _ => "-".into(),
            },
            cell(a.rounds, 0),
            cell(a.wire_mib, 0),
            cell(a.lo_mib, 0),
            a.guest_dirty_rate
                .map_or("-".into(), |d| format!("{:.0}", d.median)),
            cpu(a.src_cpu_s, a.src_engine_cpu_s),
            cpu(a.dst_cpu_s, a.dst_engine_cpu_s),
            a.ceiling_fraction
                .map_or("-".into(), |c| format!("{:.0}%", c.median * 100.0)),
            ratio(a.total_vs_qemu_best),
            ratio(a.downtime_vs_qemu_best),
            ratio(a.cpu_vs_qemu_best),
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
            let _ = writeln!(s, "note: {} {}: {p}", a.row, a.profile);
        }
    }
    let _ = writeln!(
        s,
        "cpu columns: all CPU of the side's processes during the migration (in parentheses: without the guest's vCPU thread). \
         gap parts: medians of the heartbeat gap's two parts, up to the switch value showing on the destination + from there to the first new beat. \
         x/Qbest: median of this profile / QEMU's best median on the same workload (downtime: heartbeat gap)."
    );
    s
}

/// One floor of the issue, checked (reported, never asserted).
#[derive(Debug, Clone, Serialize)]
pub struct FloorCheck {
    /// Which floor.
    pub floor: String,
    /// Workload.
    pub row: String,
    /// Met, missed, or `None` when there was nothing to compare.
    pub met: Option<bool>,
    /// The figures behind it.
    pub detail: String,
}

/// The floors, against ferry's default profile.
pub fn floors(aggs: &[Aggregate]) -> Vec<FloorCheck> {
    let mut out = Vec::new();
    let mut rows: Vec<&str> = aggs.iter().map(|a| a.row.as_str()).collect();
    rows.dedup();
    for row in rows {
        let of_row: Vec<&Aggregate> = aggs.iter().filter(|a| a.row == row).collect();
        let ferry = of_row
            .iter()
            .find(|a| a.profile == Profile::Ferry(FerryProfile::Default));
        let qemu_ok: Vec<&&Aggregate> = of_row
            .iter()
            .filter(|a| a.engine == Engine::Qemu && a.ok > 0)
            .collect();
        let Some(ferry) = ferry else { continue };
        let w = ferry.workload;
        if w.level == DirtyLevel::Idle && w.mem_bytes == 1 << 30 {
            let best = qemu_ok
                .iter()
                .filter_map(|a| a.total_ms.map(|t| (t.median, a.profile)))
                .min_by(|a, b| a.0.total_cmp(&b.0));
            out.push(FloorCheck {
                floor: "idle 1 GiB: ferry total <= 1/3 of QEMU's best".into(),
                row: row.into(),
                met: match (ferry.total_ms, best) {
                    (Some(f), Some((q, _))) => Some(f.median * 3.0 <= q),
                    _ => None,
                },
                detail: format!(
                    "ferry {} ms, QEMU best {}",
                    ferry
                        .total_ms
                        .map_or("-".into(), |t| format!("{:.0}", t.median)),
                    best.map_or("-".into(), |(t, p)| format!("{t:.0} ms ({p})"))
                ),
            });
        }
        if ferry.ok > 0 && !qemu_ok.is_empty() {
            let pick = |a: &Aggregate| a.heartbeat_gap_ms.or(a.downtime_ms).map(|s| s.median);
            let best = qemu_ok
                .iter()
                .filter_map(|a| pick(a).map(|d| (d, a.profile)))
                .min_by(|a, b| a.0.total_cmp(&b.0));
            out.push(FloorCheck {
                floor: "downtime <= 1/10 of QEMU's (heartbeat gap)".into(),
                row: row.into(),
                met: match (pick(ferry), best) {
                    (Some(f), Some((q, _))) => Some(f * 10.0 <= q),
                    _ => None,
                },
                detail: format!(
                    "ferry {} ms, QEMU lowest {}",
                    pick(ferry).map_or("-".into(), |d| format!("{d:.1}")),
                    best.map_or("-".into(), |(d, p)| format!("{d:.1} ms ({p})"))
                ),
            });
        }
        if !qemu_ok.is_empty() {
            let names: Vec<String> = qemu_ok.iter().map(|a| a.profile.to_string()).collect();
            out.push(FloorCheck {
                floor: "ferry converges where any QEMU profile does".into(),
                row: row.into(),
                met: Some(ferry.ok > 0),
                detail: format!(
                    "ferry {}/{}; QEMU converged with {}",
                    ferry.ok,
                    ferry.runs,
                    names.join(", ")
                ),
            });
        }
    }
    out
}

/// The floors as text.
pub fn floors_text(f: &[FloorCheck]) -> String {
    let mut s = String::new();
    for c in f {
        let verdict = match c.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "n/a",
        };
        let _ = writeln!(s, "floor [{verdict}] {} — {}: {}", c.floor, c.row, c.detail);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::QemuProfile;

    fn run(profile: Profile, w: Workload, total: f64, gap: f64, status: RunStatus) -> RunOutcome {
        let mut r = RunOutcome::new(profile, w, 0, status);
        r.total_ms = Some(total);
        r.heartbeat_gap_ms = Some(gap);
        r.guest_alive = Some(true);
        r
    }

    #[test]
    fn ratios_are_against_qemus_best_converged_profile() {
        let w = Workload::new(1 << 30, DirtyLevel::Idle);
        let q = Profile::Qemu(QemuProfile::Default);
        let qm = Profile::Qemu(QemuProfile::Multifd);
        let f = Profile::Ferry(FerryProfile::Default);
        let runs = vec![
            run(q, w, 9000.0, 100.0, RunStatus::Completed),
            run(qm, w, 6000.0, 200.0, RunStatus::Completed),
            // A failed run of the default counts in neither medians nor best.
            run(q, w, 1.0, 1.0, RunStatus::Failed("x".into())),
            run(f, w, 2000.0, 5.0, RunStatus::Completed),
            run(f, w, 3000.0, 7.0, RunStatus::Completed),
        ];
        let aggs = aggregate(&runs, Some(1e9));
        let ferry = aggs.iter().find(|a| a.profile == f).unwrap();
        assert_eq!(ferry.total_ms.unwrap().median, 2500.0);
        assert_eq!(ferry.total_vs_qemu_best, Some(2500.0 / 6000.0));
        assert_eq!(ferry.downtime_vs_qemu_best, Some(6.0 / 100.0));
        let qemu_default = aggs.iter().find(|a| a.profile == q).unwrap();
        assert_eq!((qemu_default.ok, qemu_default.runs), (1, 2));
        assert_eq!(qemu_default.problems, vec!["failed: x".to_string()]);

        let f = floors(&aggs);
        let total = f
            .iter()
            .find(|c| c.floor.starts_with("idle 1 GiB"))
            .unwrap();
        assert_eq!(
            total.met,
            Some(false),
            "2500 ms is more than a third of 6000 ms"
        );
        let down = f.iter().find(|c| c.floor.starts_with("downtime")).unwrap();
        assert_eq!(down.met, Some(true), "6 ms is under a tenth of 100 ms");
        let conv = f
            .iter()
            .find(|c| c.floor.starts_with("ferry converges"))
            .unwrap();
        assert_eq!(conv.met, Some(true));
    }

    #[test]
    fn a_guest_that_died_at_the_destination_is_not_a_success() {
        let w = Workload::new(256 << 20, DirtyLevel::Moderate);
        let mut r = run(
            Profile::Ferry(FerryProfile::Default),
            w,
            100.0,
            1.0,
            RunStatus::Completed,
        );
        r.guest_alive = Some(false);
        r.alive_detail = "heartbeat stuck at 7".into();
        let aggs = aggregate(&[r], None);
        assert_eq!(aggs[0].ok, 0);
        assert!(aggs[0].problems[0].contains("heartbeat stuck"));
        assert!(aggs[0].total_ms.is_none());
        let t = table(&aggs, &[]);
        assert!(t.contains("note: 256M moderate"), "{t}");
    }
}
