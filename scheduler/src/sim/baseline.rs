//! The published baselines: CloudSim 3.0.3's
//! `PowerVmAllocationPolicyMigrationAbstract` with an overload detector
//! (THR, IQR, MAD, LR, LRR), minimum-migration-time VM selection and
//! power-aware best-fit-decreasing placement, plus the simple first-fit
//! placement used by DVFS.

#![allow(clippy::needless_range_loop)] // parallel per-host arrays read best by index

use super::datacenter::Datacenter;
use super::setup::migration_seconds;
use super::stats;

/// An overload detector with its parameter.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Detector {
    /// Static threshold: utilisation > t.
    Thr(f64),
    /// Interquartile range: u > 1 - s * IQR.
    Iqr(f64),
    /// Median absolute deviation: u > 1 - s * MAD.
    Mad(f64),
    /// Local regression: predicted * s >= 1.
    Lr(f64),
    /// Robust local regression.
    Lrr(f64),
}

/// THR threshold the adaptive detectors fall back to without history.
const FALLBACK_THR: f64 = 0.7;
/// Samples the regression uses.
const LR_LENGTH: usize = 10;
/// Leading samples the IQR/MAD detectors need.
const MIN_HISTORY: usize = 12;

impl Detector {
    /// `isHostOverUtilized` for the VMs now listed on `h` (plus `extra`).
    pub fn overloaded(&self, dc: &Datacenter<'_>, h: usize, extra: Option<usize>) -> bool {
        let host = &dc.hosts[h];
        let requested: f64 = host
            .vms
            .iter()
            .chain(extra.iter())
            .map(|&v| dc.req[v])
            .sum();
        let util = requested / host.total_mips;
        let thr = |t: f64| util > t;
        match *self {
            Detector::Thr(t) => thr(t),
            Detector::Iqr(s) | Detector::Mad(s) => {
                let hist = dc.host_history(h, extra);
                if stats::count_non_zero_beginning(&hist) < MIN_HISTORY {
                    return thr(FALLBACK_THR);
                }
                let spread = if matches!(self, Detector::Iqr(_)) {
                    stats::iqr(&hist)
                } else {
                    stats::mad(&hist)
                };
                util > 1.0 - s * spread
            }
            Detector::Lr(s) | Detector::Lrr(s) => {
                let hist = dc.host_history(h, extra);
                if hist.len() < LR_LENGTH {
                    return thr(FALLBACK_THR);
                }
                let y: Vec<f64> = (0..LR_LENGTH).map(|i| hist[LR_LENGTH - i - 1]).collect();
                let est = if matches!(self, Detector::Lr(_)) {
                    stats::loess_estimates(&y)
                } else {
                    stats::robust_loess_estimates(&y)
                };
                let Some((a, b)) = est else {
                    return thr(FALLBACK_THR);
                };
                let max_ram = host
                    .vms
                    .iter()
                    .chain(extra.iter())
                    .map(|&v| dc.vms[v].ram_mb)
                    .fold(f64::MIN, f64::max);
                let mig = (migration_seconds(max_ram, host.bw_mbit) / 300.0).ceil();
                let predicted = (a + b * (LR_LENGTH as f64 + mig)) * s;
                predicted >= 1.0
            }
        }
    }
}

/// Power-aware best fit (`findHostForVm`): the host whose power rises least,
/// skipping `excluded` and hosts that would become overloaded.
pub fn find_host(
    dc: &Datacenter<'_>,
    det: &Detector,
    v: usize,
    excluded: &[bool],
    instantiating: bool,
) -> Option<usize> {
    let mut min_power = f64::MAX;
    let mut best = None;
    let vm_req = if instantiating {
        dc.vms[v].mips
    } else {
        dc.req[v]
    };
    for h in 0..dc.hosts.len() {
        if excluded[h] || !dc.is_suitable(h, v, instantiating) {
            continue;
        }
        let host_mips = if instantiating {
            initial_allocated(dc, h)
        } else {
            dc.allocated_mips(h)
        };
        let after = (host_mips + vm_req) / dc.hosts[h].total_mips;
        if after > 1.0 {
            continue;
        }
        let diff = dc.power(h, after) - dc.power(h, dc.utilization(h));
        if diff >= min_power {
            continue;
        }
        if host_mips != 0.0 {
            let over = if instantiating {
                // At creation the VMs placed before request nothing yet.
                vm_req / dc.hosts[h].total_mips > fallback_thr(det)
            } else {
                det.overloaded(dc, h, Some(v))
            };
            if over {
                continue;
            }
        }
        min_power = diff;
        best = Some(h);
    }
    best
}

fn fallback_thr(det: &Detector) -> f64 {
    match det {
        Detector::Thr(t) => *t,
        _ => FALLBACK_THR,
    }
}

/// MIPS held by VMs created on `h` at t = 0 (each holds its full MIPS).
pub(crate) fn initial_allocated(dc: &Datacenter<'_>, h: usize) -> f64 {
    dc.hosts[h].vms.iter().map(|&v| dc.vms[v].mips).sum()
}

/// Initial placement of all VMs at t = 0 with `find_host` (migration policies).
pub fn place_all_power_aware(dc: &mut Datacenter<'_>, det: &Detector) -> Result<(), usize> {
    place_all_power_aware_with(dc, det, &super::ferry::InitialRules::new(&[], 0, 0))
}

/// [`place_all_power_aware`] keeping the hard placement rules `rules`.
pub fn place_all_power_aware_with(
    dc: &mut Datacenter<'_>,
    det: &Detector,
    rules: &super::ferry::InitialRules,
) -> Result<(), usize> {
    let excluded = vec![false; dc.hosts.len()];
    let mut groups = InitialGroups::new(dc);
    for v in 0..dc.vms.len() {
        let h = if rules.constrains(v) {
            find_host_initial(dc, det, v, &excluded, rules)
        } else {
            groups.find(dc, det, v)
        }
        .ok_or(v)?;
        groups.remove(dc, h);
        dc.place_initial(v, h);
        groups.insert(dc, h);
    }
    Ok(())
}

/// What decides a host's fitness and power rise at creation: its type,
/// the MIPS and RAM its VMs hold and how many they are.
type Signature = (usize, u64, u64, usize);

/// Hosts grouped by [`Signature`] (lowest index first): hosts alike give
/// [`find_host_initial`] the same answer, so it looks at one host per group
/// (the scan keeps the first host of least power rise; so does this), not
/// every host: O(VMs x groups) instead of O(VMs x hosts).
struct InitialGroups {
    groups: std::collections::BTreeMap<Signature, std::collections::BTreeSet<usize>>,
}

impl InitialGroups {
    fn new(dc: &Datacenter<'_>) -> Self {
        let mut g = Self {
            groups: std::collections::BTreeMap::new(),
        };
        for h in 0..dc.hosts.len() {
            g.insert(dc, h);
        }
        g
    }

    fn signature(dc: &Datacenter<'_>, h: usize) -> Signature {
        (
            dc.hosts[h].kind,
            initial_allocated(dc, h).to_bits(),
            dc.ram_used(h).to_bits(),
            dc.hosts[h].vms.len(),
        )
    }

    fn insert(&mut self, dc: &Datacenter<'_>, h: usize) {
        self.groups
            .entry(Self::signature(dc, h))
            .or_default()
            .insert(h);
    }

    fn remove(&mut self, dc: &Datacenter<'_>, h: usize) {
        let s = Self::signature(dc, h);
        if let Some(set) = self.groups.get_mut(&s) {
            set.remove(&h);
            if set.is_empty() {
                self.groups.remove(&s);
            }
        }
    }

    /// [`find_host_initial`] without rules, one host per group.
    fn find(&self, dc: &Datacenter<'_>, det: &Detector, v: usize) -> Option<usize> {
        let mut best: Option<(f64, usize)> = None;
        for set in self.groups.values() {
            let Some(&h) = set.first() else { continue };
            let Some(diff) = initial_power_increase(dc, det, h, v) else {
                continue;
            };
            if best.is_none_or(|(d, bh)| diff < d || (diff == d && h < bh)) {
                best = Some((diff, h));
            }
        }
        best.map(|(_, h)| h)
    }
}

fn find_host_initial(
    dc: &Datacenter<'_>,
    det: &Detector,
    v: usize,
    ex: &[bool],
    rules: &super::ferry::InitialRules,
) -> Option<usize> {
    // At t = 0 the scheduler's view: full MIPS held by created VMs.
    let mut min_power = f64::MAX;
    let mut best = None;
    for h in 0..dc.hosts.len() {
        if ex[h] || !rules.allows(dc, v, h) {
            continue;
        }
        let Some(diff) = initial_power_increase(dc, det, h, v) else {
            continue;
        };
        if diff < min_power {
            min_power = diff;
            best = Some(h);
        }
    }
    best
}

/// The power host `h` would add by taking VM `v` at t = 0 (PABFD's
/// criterion), or `None` when `v` may not go there (no room, or a big VM
/// onto a non-empty host past the detector's fallback threshold).
fn initial_power_increase(dc: &Datacenter<'_>, det: &Detector, h: usize, v: usize) -> Option<f64> {
    if !suitable_initial(dc, h, v) {
        return None;
    }
    let held = initial_allocated(dc, h);
    let after = (held + dc.vms[v].mips) / dc.hosts[h].total_mips;
    if after > 1.0 {
        return None;
    }
    if held != 0.0 && dc.vms[v].mips / dc.hosts[h].total_mips > fallback_thr(det) {
        return None;
    }
    Some(dc.power(h, after) - dc.power(h, 0.0))
}

fn suitable_initial(dc: &Datacenter<'_>, h: usize, v: usize) -> bool {
    let host = &dc.hosts[h];
    let mips = dc.vms[v].mips;
    host.pe_mips >= mips
        && host.total_mips - initial_allocated(dc, h) >= mips
        && dc.ram_used(h) + dc.vms[v].ram_mb <= host.ram_mb
        // VM bandwidth 100 Mbit/s of the host's 1 Gbit/s at creation.
        && host.vms.len() < 10
}

/// First fit at t = 0 (`PowerVmAllocationPolicySimple`, used by DVFS).
pub fn place_all_first_fit(dc: &mut Datacenter<'_>) -> Result<(), usize> {
    for v in 0..dc.vms.len() {
        let h = (0..dc.hosts.len())
            .find(|&h| suitable_initial(dc, h, v))
            .ok_or(v)?;
        dc.place_initial(v, h);
    }
    Ok(())
}

/// One optimisation round (`optimizeAllocation`): the migration map.
pub fn optimize(dc: &mut Datacenter<'_>, det: &Detector) -> Vec<(usize, usize)> {
    let n = dc.hosts.len();
    let over: Vec<usize> = (0..n).filter(|&h| det.overloaded(dc, h, None)).collect();
    let saved = dc.save_lists();
    // VMs off overloaded hosts, minimum migration time first.
    let mut to_migrate = Vec::new();
    for &h in &over {
        loop {
            let pick = dc.hosts[h]
                .vms
                .iter()
                .copied()
                .filter(|&v| !dc.vms[v].in_migration)
                .fold(None::<usize>, |best, v| match best {
                    Some(b) if dc.vms[b].ram_mb <= dc.vms[v].ram_mb => Some(b),
                    _ => Some(v),
                });
            let Some(v) = pick else { break };
            to_migrate.push(v);
            dc.plan_remove(h, v);
            if !det.overloaded(dc, h, None) {
                break;
            }
        }
    }
    let mut excluded = vec![false; n];
    for &h in &over {
        excluded[h] = true;
    }
    let mut map = Vec::new();
    sort_by_cpu_desc(dc, &mut to_migrate);
    for v in to_migrate {
        if let Some(h) = find_host(dc, det, v, &excluded, false) {
            dc.plan_add(h, v);
            map.push((v, h));
        }
    }
    // Under-utilised hosts: empty them completely or not at all.
    let mut ex_under = excluded.clone();
    let mut ex_place = excluded;
    for h in 0..n {
        if dc.utilization(h) == 0.0 {
            ex_under[h] = true;
            ex_place[h] = true;
        }
    }
    loop {
        if ex_under.iter().all(|x| *x) {
            break;
        }
        let mut min_u = 1.0;
        let mut under = None;
        for h in 0..n {
            if ex_under[h] {
                continue;
            }
            let u = dc.utilization(h);
            if u > 0.0 && u < min_u && !all_migrating_out_or_any_in(dc, h) {
                min_u = u;
                under = Some(h);
            }
        }
        let Some(h) = under else { break };
        ex_under[h] = true;
        ex_place[h] = true;
        let mut vms: Vec<usize> = dc.hosts[h]
            .vms
            .iter()
            .copied()
            .filter(|&v| !dc.vms[v].in_migration)
            .collect();
        if vms.is_empty() {
            continue;
        }
        sort_by_cpu_desc(dc, &mut vms);
        let mut placed = Vec::new();
        let mut ok = true;
        for v in vms {
            match find_host(dc, det, v, &ex_place, false) {
                Some(t) => {
                    dc.plan_add(t, v);
                    placed.push((v, t));
                }
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if !ok {
            for &(v, t) in &placed {
                dc.plan_remove(t, v);
            }
            continue;
        }
        for &(_, t) in &placed {
            ex_under[t] = true;
        }
        map.extend(placed);
    }
    dc.restore_lists(saved);
    map
}

fn all_migrating_out_or_any_in(dc: &Datacenter<'_>, h: usize) -> bool {
    for &v in &dc.hosts[h].vms {
        if !dc.vms[v].in_migration {
            return false;
        }
        if dc.hosts[h].migrating_in.contains(&v) {
            return true;
        }
    }
    true
}

/// `PowerVmList.sortByCpuUtilization`: decreasing current MIPS, stable.
pub fn sort_by_cpu_desc(dc: &Datacenter<'_>, vms: &mut [usize]) {
    vms.sort_by(|&a, &b| dc.req[b].total_cmp(&dc.req[a]));
}
