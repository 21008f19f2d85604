//! ferry's own consolidation policy in the simulator: pack by a robust
//! estimate of each VM's demand (its peak over a recent window), move only
//! when a host is really at risk or has been idle-ish for a while, and never
//! move the same VM twice within a minimum interval. Few migrations, each
//! one worth it.

#![allow(clippy::needless_range_loop)] // parallel per-host arrays read best by index

use serde::{Deserialize, Serialize};

use super::datacenter::Datacenter;
use super::MemoryModel;

/// Tunables of the ferry policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FerryParams {
    /// Placement fills a host's estimated demand up to this share.
    pub target: f64,
    /// A host whose estimated demand passes this share sheds VMs.
    pub upper: f64,
    /// A host whose estimated demand stays below this share ...
    pub low: f64,
    /// ... for this many consecutive steps is emptied and switched off.
    pub low_steps: u32,
    /// Steps of history the per-VM peak estimate covers (overload side).
    pub window: usize,
    /// Steps of history consolidation looks at: a host is emptied only if
    /// its VMs would have fitted their new hosts over this whole window.
    pub consolidation_window: usize,
    /// Minimum seconds between two moves of the same VM (unless its host
    /// is really over capacity).
    pub min_move_interval_s: f64,
    /// Concurrent migrations (in + out) per host.
    pub max_migrations_per_host: usize,
}

impl Default for FerryParams {
    fn default() -> Self {
        Self {
            target: 0.95,
            upper: 1.05,
            low: 0.8,
            low_steps: 1,
            window: 2,
            consolidation_window: 3,
            min_move_interval_s: 1200.0,
            max_migrations_per_host: 4,
        }
    }
}

/// Per-VM demand estimate in MIPS: the peak of the last `window` samples.
fn estimates(dc: &Datacenter<'_>, step_index: usize, window: usize) -> Vec<f64> {
    (0..dc.vms.len())
        .map(|v| dc.recent_peak(v, step_index, window).max(dc.req[v]))
        .collect()
}

struct View {
    est: Vec<f64>,
    host_est: Vec<f64>,
    est_long: Vec<f64>,
    host_est_long: Vec<f64>,
    long: bool,
    ram: Vec<f64>,
    busy: Vec<usize>,
}

impl View {
    fn fits(&self, dc: &Datacenter<'_>, p: &FerryParams, h: usize, v: usize) -> bool {
        let host = &dc.hosts[h];
        let e = self.est[v].min(dc.vms[v].mips);
        if e > host.pe_mips {
            return false;
        }
        if self.host_est[h] + e > p.target * host.total_mips {
            return false;
        }
        if self.long
            && self.host_est_long[h] + self.est_long[v].min(dc.vms[v].mips)
                > p.target * host.total_mips
        {
            return false;
        }
        if dc.memory == MemoryModel::Strict && self.ram[h] + dc.vms[v].ram_mb > host.ram_mb {
            return false;
        }
        self.busy[h] < p.max_migrations_per_host
    }

    fn unapply(&mut self, dc: &Datacenter<'_>, v: usize, from: usize, to: usize) {
        let e = self.est[v].min(dc.vms[v].mips);
        self.host_est[from] += e;
        self.host_est[to] -= e;
        let l = self.est_long[v].min(dc.vms[v].mips);
        self.host_est_long[from] += l;
        self.host_est_long[to] -= l;
        self.ram[from] += dc.vms[v].ram_mb;
        self.ram[to] -= dc.vms[v].ram_mb;
        self.busy[from] -= 1;
        self.busy[to] -= 1;
    }

    fn apply(&mut self, dc: &Datacenter<'_>, v: usize, from: usize, to: usize) {
        let e = self.est[v].min(dc.vms[v].mips);
        self.host_est[from] -= e;
        self.host_est[to] += e;
        let l = self.est_long[v].min(dc.vms[v].mips);
        self.host_est_long[from] -= l;
        self.host_est_long[to] += l;
        self.ram[from] -= dc.vms[v].ram_mb;
        self.ram[to] += dc.vms[v].ram_mb;
        self.busy[from] += 1;
        self.busy[to] += 1;
    }
}

/// Best-fit target for `v`: the active host left fullest (by estimate),
/// else the largest idle host.
fn pick_target(
    dc: &Datacenter<'_>,
    p: &FerryParams,
    view: &View,
    v: usize,
    skip: &[bool],
) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for h in 0..dc.hosts.len() {
        if skip[h] || dc.hosts[h].vms.is_empty() || !view.fits(dc, p, h, v) {
            continue;
        }
        let fill = (view.host_est[h] + view.est[v]) / dc.hosts[h].total_mips;
        if best.is_none_or(|(_, f)| fill > f) {
            best = Some((h, fill));
        }
    }
    if let Some((h, _)) = best {
        return Some(h);
    }
    // Power one up: the biggest idle host (most MIPS per idle watt).
    (0..dc.hosts.len())
        .filter(|&h| !skip[h] && dc.hosts[h].vms.is_empty() && view.fits(dc, p, h, v))
        .max_by(|&a, &b| dc.hosts[a].total_mips.total_cmp(&dc.hosts[b].total_mips))
}

/// One planning round at step `k`: the moves (vm, target).
pub fn optimize(dc: &mut Datacenter<'_>, p: &FerryParams, k: usize) -> Vec<(usize, usize)> {
    let n = dc.hosts.len();
    let est = estimates(dc, k, p.window);
    let est_long = estimates(dc, k, p.consolidation_window.max(p.window));
    let mut host_est = vec![0.0; n];
    let mut host_est_long = vec![0.0; n];
    let mut ram = vec![0.0; n];
    for (h, host) in dc.hosts.iter().enumerate() {
        for &v in &host.vms {
            host_est[h] += est[v].min(dc.vms[v].mips);
            host_est_long[h] += est_long[v].min(dc.vms[v].mips);
            ram[h] += dc.vms[v].ram_mb;
        }
    }
    let mut view = View {
        est,
        host_est,
        est_long,
        host_est_long,
        long: false,
        ram,
        busy: vec![0; n],
    };
    let now = dc.now;
    let movable = |dc: &Datacenter<'_>, v: usize, urgent: bool| {
        !dc.vms[v].in_migration && (urgent || now - dc.vms[v].last_moved >= p.min_move_interval_s)
    };
    let mut moves = Vec::new();
    let mut skip = vec![false; n];

    // 1. Hosts at risk: shed the fewest, cheapest VMs to get back to target.
    let mut over: Vec<usize> = (0..n)
        .filter(|&h| view.host_est[h] > p.upper * dc.hosts[h].total_mips)
        .collect();
    over.sort_by(|&a, &b| {
        let ea = view.host_est[a] / dc.hosts[a].total_mips;
        let eb = view.host_est[b] / dc.hosts[b].total_mips;
        eb.total_cmp(&ea)
    });
    for &h in &over {
        skip[h] = true;
    }
    for &h in &over {
        let urgent = dc.requested_mips(h) > dc.hosts[h].total_mips;
        let mut cands: Vec<usize> = dc.hosts[h]
            .vms
            .iter()
            .copied()
            .filter(|&v| movable(dc, v, urgent))
            .collect();
        while view.host_est[h] > p.target * dc.hosts[h].total_mips
            && view.busy[h] < p.max_migrations_per_host
            && !cands.is_empty()
        {
            let need = view.host_est[h] - p.target * dc.hosts[h].total_mips;
            // Cheapest VM that alone is enough, else the biggest.
            let enough = cands
                .iter()
                .copied()
                .filter(|&v| view.est[v] >= need)
                .min_by(|&a, &b| dc.vms[a].ram_mb.total_cmp(&dc.vms[b].ram_mb));
            let v = enough.unwrap_or_else(|| {
                cands
                    .iter()
                    .copied()
                    .max_by(|&a, &b| view.est[a].total_cmp(&view.est[b]))
                    .expect("non-empty")
            });
            cands.retain(|&x| x != v);
            if let Some(t) = pick_target(dc, p, &view, v, &skip) {
                view.apply(dc, v, h, t);
                moves.push((v, t));
            }
        }
    }

    // 2. Hosts that stayed lightly loaded: empty them (all or nothing),
    // judged on the long window so that a periodic burst does not make us
    // consolidate and spread again every period.
    view.long = true;
    for h in 0..n {
        let low =
            !dc.hosts[h].vms.is_empty() && view.host_est_long[h] < p.low * dc.hosts[h].total_mips;
        dc.hosts[h].low_since = match (low, dc.hosts[h].low_since) {
            (true, Some(s)) => Some(s),
            (true, None) => Some(now),
            (false, _) => None,
        };
    }
    let mut under: Vec<usize> = (0..n)
        .filter(|&h| {
            !skip[h]
                && dc.hosts[h]
                    .low_since
                    .is_some_and(|s| now - s >= f64::from(p.low_steps) * 300.0 - 1.0)
        })
        .collect();
    under.sort_by(|&a, &b| {
        let ea = view.host_est[a] / dc.hosts[a].total_mips;
        let eb = view.host_est[b] / dc.hosts[b].total_mips;
        ea.total_cmp(&eb)
    });
    let mut donor = vec![false; n];
    for &h in &under {
        if skip[h] {
            continue;
        }
        let vms: Vec<usize> = dc.hosts[h].vms.clone();
        let allowed = p.max_migrations_per_host.saturating_sub(view.busy[h]);
        if allowed == 0 || !vms.iter().all(|&v| movable(dc, v, false)) {
            continue;
        }
        donor[h] = true;
        let mut skip2 = skip.clone();
        for (x, d) in skip2.iter_mut().zip(&donor) {
            *x |= *d;
        }
        let mut sorted = vms.clone();
        sorted.sort_by(|&a, &b| view.est[b].total_cmp(&view.est[a]));
        // Plan the whole evacuation (all or nothing) without the per-host
        // limit on the donor, then start only what the limit allows now;
        // the rest follows in the next steps (the host keeps draining).
        let donor_busy = view.busy[h];
        let mut trial = Vec::new();
        let mut ok = true;
        for v in sorted {
            view.busy[h] = 0;
            // Never wake a host to empty another.
            match pick_target(dc, p, &view, v, &skip2) {
                Some(t) if !dc.hosts[t].vms.is_empty() => {
                    view.apply(dc, v, h, t);
                    trial.push((v, t));
                }
                _ => {
                    ok = false;
                    break;
                }
            }
        }
        view.busy[h] = donor_busy + trial.len();
        if ok {
            // Cheapest moves first.
            trial.sort_by(|a, b| dc.vms[a.0].ram_mb.total_cmp(&dc.vms[b.0].ram_mb));
            let later = trial.split_off(allowed.min(trial.len()));
            for &(v, t) in later.iter().rev() {
                view.unapply(dc, v, h, t);
            }
            for &(_, t) in &trial {
                skip[t] = true; // receivers are not emptied this round
            }
            skip[h] = true;
            moves.extend(trial);
        } else {
            for &(v, t) in trial.iter().rev() {
                view.unapply(dc, v, h, t);
            }
            donor[h] = false;
        }
    }
    moves
}
