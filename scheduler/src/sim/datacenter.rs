//! The simulated data centre: hosts, VMs, CPU share allocation, migrations in
//! flight, energy and SLA accounting, with CloudSim 3.0.3's semantics
//! (`PowerDatacenter`, `HostDynamicWorkload`,
//! `VmSchedulerTimeSharedOverSubscription`).

use super::setup::{migration_seconds, HostType, VmType};
use super::MemoryModel;
use crate::trace::{self, Trace};
use std::collections::VecDeque;

/// Host storage in MB and VM image size in MB of the CloudSim setup: at most
/// 400 VMs fit one host's disk.
const HOST_STORAGE_MB: f64 = 1_000_000.0;
const VM_SIZE_MB: f64 = 2500.0;
/// CloudSim's `PowerVm.HISTORY_LENGTH`.
pub const HISTORY_LENGTH: usize = 30;

/// One state-history entry (time, allocated MIPS, requested MIPS, flag).
#[derive(Debug, Clone, Copy)]
struct Entry {
    t: f64,
    alloc: f64,
    req: f64,
    flag: bool,
}

/// A simulated host.
#[derive(Debug, Clone)]
pub struct SimHost {
    /// Total MIPS (cores x core MIPS).
    pub total_mips: f64,
    /// MIPS of one core.
    pub pe_mips: f64,
    /// RAM in MB.
    pub ram_mb: f64,
    /// Bandwidth in Mbit/s.
    pub bw_mbit: f64,
    /// Host type index (power curve).
    pub kind: usize,
    /// VMs on the host (CloudSim `vmList`: includes VMs migrating in).
    pub vms: Vec<usize>,
    /// VMs migrating in.
    pub migrating_in: Vec<usize>,
    /// MIPS in use after the last update.
    pub util_mips: f64,
    last: Option<Entry>,
    active_time: f64,
    violation_time: f64,
    shutdowns: u32,
    ever_updated: bool,
}

/// The last [`HISTORY_LENGTH`] non-zero utilisation samples of a VM, newest
/// first: a ring in place (a new sample overwrites the oldest, nothing
/// shifts).
#[derive(Debug, Clone, Copy)]
pub struct History {
    ring: [f64; HISTORY_LENGTH],
    /// Slot of the newest sample.
    newest: usize,
    len: usize,
}

impl Default for History {
    fn default() -> Self {
        Self {
            ring: [0.0; HISTORY_LENGTH],
            newest: 0,
            len: 0,
        }
    }
}

impl History {
    /// Record `u` as the newest sample (the oldest drops out when full).
    pub fn push_newest(&mut self, u: f64) {
        self.newest = (self.newest + HISTORY_LENGTH - 1) % HISTORY_LENGTH;
        self.ring[self.newest] = u;
        self.len = (self.len + 1).min(HISTORY_LENGTH);
    }

    /// Samples held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no sample is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The samples, newest first.
    pub fn iter(&self) -> impl Iterator<Item = f64> + '_ {
        (0..self.len).map(|i| self.ring[(self.newest + i) % HISTORY_LENGTH])
    }
}

impl SimHost {
    /// Lists no VM and drew nothing at its last update (which happened).
    fn is_idle(&self) -> bool {
        self.vms.is_empty() && matches!(self.last, Some(e) if !e.flag)
    }
}

/// A simulated VM.
#[derive(Debug, Clone)]
pub struct SimVm {
    /// MIPS at 100 %.
    pub mips: f64,
    /// RAM in MB.
    pub ram_mb: f64,
    /// Index of its trace.
    pub trace: usize,
    /// Current host (source while migrating).
    pub host: Option<usize>,
    /// Migration in flight.
    pub in_migration: bool,
    /// Time of the last migration start (`ferry`'s anti-flapping).
    pub last_moved: f64,
    prev_time: f64,
    last: Option<Entry>,
    total_req: f64,
    total_alloc: f64,
    under_migration: f64,
}

/// A migration in flight.
#[derive(Debug, Clone, Copy)]
struct Flight {
    end: f64,
    vm: usize,
    target: usize,
}

/// The data centre state and its accounting.
#[derive(Debug)]
pub struct Datacenter<'a> {
    traces: &'a [Trace],
    /// Host types (power curves).
    pub host_types: Vec<HostType>,
    /// Hosts.
    pub hosts: Vec<SimHost>,
    /// VMs.
    pub vms: Vec<SimVm>,
    /// Memory model.
    pub memory: MemoryModel,
    /// Per VM: its non-zero utilisation samples, newest first (`PowerVm`
    /// history; apart from [`SimVm`], which every event reads, as they
    /// change only at scheduling events).
    pub histories: Vec<History>,
    /// Demand (requested MIPS) of every VM at `now`.
    pub req: Vec<f64>,
    /// Current simulation time.
    pub now: f64,
    step: f64,
    /// Energy so far in watt-seconds.
    pub energy_ws: f64,
    /// Migrations started.
    pub migrations: u64,
    flights: VecDeque<Flight>,
    last_process: f64,
    /// VMs that left the simulation (CloudSim's completed VMs).
    pub removed: usize,
    /// `process` skips idle hosts (see [`Datacenter::process`]).
    skip_idle: bool,
    /// Per VM: the samples around the sample interval `spans_at`.
    spans: Vec<DemandSpan>,
    spans_at: Option<usize>,
}

/// A VM's utilisation at the two samples around the current time, and its
/// MIPS (what its demand interpolates between).
#[derive(Debug, Clone, Copy, Default)]
struct DemandSpan {
    from: f64,
    to: f64,
    mips: f64,
}

impl<'a> Datacenter<'a> {
    /// Hosts `n` alternating over `host_types`, one VM per trace with
    /// `vm_types[i]`. Nothing placed yet.
    pub fn new(
        traces: &'a [Trace],
        host_types: Vec<HostType>,
        n_hosts: usize,
        vm_types: &[VmType],
        memory: MemoryModel,
        step: f64,
    ) -> Self {
        let hosts = (0..n_hosts)
            .map(|i| {
                let kind = i % host_types.len();
                let ht = &host_types[kind];
                SimHost {
                    total_mips: ht.pe_mips * f64::from(ht.pes),
                    pe_mips: ht.pe_mips,
                    ram_mb: ht.ram_mb,
                    bw_mbit: ht.bw_mbit,
                    kind,
                    vms: Vec::new(),
                    migrating_in: Vec::new(),
                    util_mips: 0.0,
                    last: None,
                    active_time: 0.0,
                    violation_time: 0.0,
                    shutdowns: 0,
                    ever_updated: false,
                }
            })
            .collect();
        let vms = vm_types
            .iter()
            .enumerate()
            .map(|(i, t)| SimVm {
                mips: t.mips,
                ram_mb: t.ram_mb,
                trace: i,
                host: None,
                in_migration: false,
                last_moved: f64::NEG_INFINITY,
                prev_time: -1.0,
                last: None,
                total_req: 0.0,
                total_alloc: 0.0,
                under_migration: 0.0,
            })
            .collect::<Vec<_>>();
        let n_vms = vms.len();
        Self {
            traces,
            host_types,
            hosts,
            vms,
            memory,
            histories: vec![History::default(); n_vms],
            req: vec![0.0; n_vms],
            now: 0.0,
            step,
            energy_ws: 0.0,
            migrations: 0,
            flights: VecDeque::new(),
            last_process: 0.0,
            removed: 0,
            skip_idle: true,
            spans: vec![DemandSpan::default(); n_vms],
            spans_at: None,
        }
    }

    /// Make [`Datacenter::process`] update every host at every event, idle
    /// or not (CloudSim's loop, literally): the reference the skipping of
    /// idle hosts is checked against.
    pub fn recompute_every_host(&mut self) {
        self.skip_idle = false;
    }

    /// Power of host `h` at utilisation `u`.
    pub fn power(&self, h: usize, u: f64) -> f64 {
        self.host_types[self.hosts[h].kind].power.power(u)
    }

    /// CloudSim's `getUtilizationOfCpu`: last update's share, (1, 1.01) -> 1.
    pub fn utilization(&self, h: usize) -> f64 {
        clamp_util(self.hosts[h].util_mips / self.hosts[h].total_mips)
    }

    /// Hosts drawing power (non-zero utilisation at the last update).
    pub fn active_hosts(&self) -> usize {
        self.hosts.iter().filter(|h| h.util_mips > 0.0).count()
    }

    /// Peak demand (MIPS) of VM `v` over the trace samples `k+1-window..=k`
    /// (observed history only).
    pub fn recent_peak(&self, v: usize, k: usize, window: usize) -> f64 {
        let s = &self.traces[self.vms[v].trace].samples;
        let hi = k.min(s.len() - 1);
        let lo = (hi + 1).saturating_sub(window.max(1));
        let peak = s[lo..=hi].iter().copied().max().unwrap_or(0);
        f64::from(peak) / 100.0 * self.vms[v].mips
    }

    /// `req` at `t`: each VM's [`Trace::utilization_at`] times its MIPS.
    /// The two samples around `t` are read from the traces once per sample
    /// interval into `spans` (every event in between interpolates the same
    /// pair, with the same arithmetic).
    fn set_demand(&mut self, t: f64) {
        let (i, frac) = trace::sample_position(t, self.step);
        if self.spans_at != Some(i) {
            for (span, vm) in self.spans.iter_mut().zip(&self.vms) {
                let tr = &self.traces[vm.trace];
                *span = DemandSpan {
                    from: tr.sample_utilization(i),
                    to: tr.sample_utilization(i + 1),
                    mips: vm.mips,
                };
            }
            self.spans_at = Some(i);
        }
        for (r, s) in self.req.iter_mut().zip(&self.spans) {
            *r = trace::interpolate(s.from, s.to, frac) * s.mips;
        }
    }

    // ---- planning view (CloudSim's VmScheduler of each host) ----

    /// Sum of per-core-capped requests on `h` (what the scheduler must give).
    pub fn required_mips(&self, h: usize) -> f64 {
        let host = &self.hosts[h];
        host.vms
            .iter()
            .map(|&v| {
                let c = self.req[v].min(host.pe_mips);
                if host.migrating_in.contains(&v) {
                    c * 0.1
                } else {
                    c
                }
            })
            .sum()
    }

    /// `getAvailableMips`: capacity left, 0 when oversubscribed.
    pub fn available_mips(&self, h: usize) -> f64 {
        let r = self.required_mips(h);
        let t = self.hosts[h].total_mips;
        if r <= t {
            t - r
        } else {
            0.0
        }
    }

    /// `PowerVmAllocationPolicyMigrationAbstract.getUtilizationOfCpuMips`:
    /// MIPS allocated to the VMs now listed on `h`.
    pub fn allocated_mips(&self, h: usize) -> f64 {
        let host = &self.hosts[h];
        let required = self.required_mips(h);
        let fits = required <= host.total_mips;
        let factor = host.total_mips / required;
        let mut sum = 0.0;
        for &v in &host.vms {
            let c = self.req[v].min(host.pe_mips);
            let inh = host.migrating_in.contains(&v);
            let out = self.vms[v].in_migration && !inh;
            let a = alloc_share(c, fits, factor, out, inh);
            if inh {
                sum += a * 0.9 / 0.1;
            }
            sum += a;
        }
        sum
    }

    /// Total requested (uncapped) MIPS of the VMs listed on `h`.
    pub fn requested_mips(&self, h: usize) -> f64 {
        self.hosts[h].vms.iter().map(|&v| self.req[v]).sum()
    }

    /// RAM (full VM sizes) of the VMs listed on `h`.
    pub fn ram_used(&self, h: usize) -> f64 {
        self.hosts[h].vms.iter().map(|&v| self.vms[v].ram_mb).sum()
    }

    /// `Host.isSuitableForVm` under the memory model. `instantiating`: the VM
    /// is being created (full MIPS and full RAM are requested).
    pub fn is_suitable(&self, h: usize, v: usize, instantiating: bool) -> bool {
        let host = &self.hosts[h];
        let req = if instantiating {
            self.vms[v].mips
        } else {
            self.req[v]
        };
        if host.pe_mips < req {
            return false;
        }
        if self.available_mips(h) < req {
            return false;
        }
        if (host.vms.len() as f64 + 1.0) * VM_SIZE_MB > HOST_STORAGE_MB {
            return false;
        }
        let check_ram = instantiating || self.memory == MemoryModel::Strict;
        if check_ram && self.ram_used(h) + self.vms[v].ram_mb > host.ram_mb {
            return false;
        }
        true
    }

    /// Planning: list `v` on `h` (CloudSim `vmCreate`).
    pub fn plan_add(&mut self, h: usize, v: usize) {
        self.hosts[h].vms.push(v);
    }

    /// Planning: remove `v` from `h` (CloudSim `vmDestroy`).
    pub fn plan_remove(&mut self, h: usize, v: usize) {
        let vms = &mut self.hosts[h].vms;
        if let Some(p) = vms.iter().position(|&x| x == v) {
            vms.remove(p);
        }
    }

    /// The VM lists of all hosts, to restore after planning.
    pub fn save_lists(&self) -> Vec<Vec<usize>> {
        self.hosts.iter().map(|h| h.vms.clone()).collect()
    }

    /// Restore the lists saved by [`Datacenter::save_lists`].
    pub fn restore_lists(&mut self, saved: Vec<Vec<usize>>) {
        for (h, l) in self.hosts.iter_mut().zip(saved) {
            h.vms = l;
        }
    }

    /// Utilisation history of `h` built from its VMs' histories
    /// (`PowerHostUtilizationHistory.getUtilizationHistory`), newest first,
    /// zero tail trimmed; `extra` is counted as if listed too.
    pub fn host_history(&self, h: usize, extra: Option<usize>) -> Vec<f64> {
        let host = &self.hosts[h];
        let mut hist = [0.0f64; HISTORY_LENGTH];
        for &v in host.vms.iter().chain(extra.iter()) {
            let vm = &self.vms[v];
            for (i, u) in self.histories[v].iter().enumerate() {
                hist[i] += u * vm.mips / host.total_mips;
            }
        }
        let mut n = HISTORY_LENGTH;
        while n > 0 && hist[n - 1] == 0.0 {
            n -= 1;
        }
        hist[..n].to_vec()
    }

    // ---- time ----

    /// Place VM `v` on `h` at creation (t = 0).
    pub fn place_initial(&mut self, v: usize, h: usize) {
        self.hosts[h].vms.push(v);
        self.vms[v].host = Some(h);
    }

    /// Update every host at `t`: allocation, state histories and energy.
    /// `scheduling_event`: a 300 s tick (VM utilisation histories advance).
    ///
    /// A host that lists no VM and drew nothing at its last update is left
    /// as it is (unless [`Datacenter::recompute_every_host`] was called):
    /// updating it would change nothing but the time of its last entry, which
    /// counts only after an active entry (active time, violation time and
    /// shutdowns add up only from an entry with non-zero allocation, and its
    /// energy term is skipped at zero utilisation). So every figure is the
    /// same as updating every host, as CloudSim does, while the work per
    /// event follows the hosts in use, not the data centre's size.
    pub fn process(&mut self, t: f64, scheduling_event: bool) {
        self.now = t;
        self.set_demand(t);
        let dt = t - self.last_process;
        for h in 0..self.hosts.len() {
            if self.skip_idle && self.hosts[h].is_idle() {
                continue;
            }
            let prev = self.hosts[h].util_mips;
            self.update_host(h, t, scheduling_event);
            if dt > 0.0 {
                let pu = clamp_util(prev / self.hosts[h].total_mips);
                if pu != 0.0 {
                    let cu = self.utilization(h);
                    let (p0, p1) = (self.power(h, pu), self.power(h, cu));
                    self.energy_ws += (p0 + (p1 - p0) / 2.0) * dt;
                }
            }
        }
        if dt > 0.0 {
            self.last_process = t;
        }
        if self.memory == MemoryModel::CloudSim {
            self.remove_finished_vms();
        }
    }

    /// CloudSim 3.0.3 quirk (`HostDynamicWorkload.getCompletedVms`): after
    /// each update a VM that is not migrating and requests exactly 0 MIPS
    /// (two consecutive zero samples) is deallocated and leaves the
    /// simulation for good. Reproduced in the CloudSim memory model only.
    fn remove_finished_vms(&mut self) {
        for h in 0..self.hosts.len() {
            let mut i = 0;
            while i < self.hosts[h].vms.len() {
                let v = self.hosts[h].vms[i];
                if self.req[v] == 0.0 && !self.vms[v].in_migration {
                    self.hosts[h].vms.remove(i);
                    self.vms[v].host = None;
                    self.removed += 1;
                } else {
                    i += 1;
                }
            }
        }
    }

    fn update_host(&mut self, h: usize, t: f64, scheduling_event: bool) {
        let required = self.required_mips(h);
        let host = &self.hosts[h];
        let fits = required <= host.total_mips;
        let factor = host.total_mips / required;
        let pe = host.pe_mips;
        let mut util = 0.0;
        let mut hreq = 0.0;
        for i in 0..self.hosts[h].vms.len() {
            let v = self.hosts[h].vms[i];
            let req = self.req[v];
            let c = req.min(pe);
            let inh = self.hosts[h].migrating_in.contains(&v);
            let out = self.vms[v].in_migration && !inh;
            let mut a = alloc_share(c, fits, factor, out, inh);
            let vm = &mut self.vms[v];
            if scheduling_event && t > vm.prev_time {
                let u = req / vm.mips;
                if u != 0.0 {
                    self.histories[v].push_newest(u);
                }
                vm.prev_time = t;
            }
            if !inh {
                record_vm(vm, t, a, req, out);
                if vm.in_migration {
                    a /= 0.9;
                }
            }
            util += a;
            hreq += req;
        }
        let host = &mut self.hosts[h];
        host.util_mips = util;
        let entry = Entry {
            t,
            alloc: util,
            req: hreq,
            flag: util > 0.0,
        };
        match host.last {
            Some(ref mut last) if last.t == t => *last = entry,
            Some(last) => {
                let dt = t - last.t;
                if last.flag {
                    host.active_time += dt;
                    if last.alloc < last.req {
                        host.violation_time += dt;
                    }
                }
                if last.flag && !entry.flag {
                    host.shutdowns += 1;
                }
                host.last = Some(entry);
            }
            None => {
                if !entry.flag {
                    host.shutdowns += 1;
                }
                host.last = Some(entry);
            }
        }
        host.ever_updated = true;
    }

    /// Start migrating `v` to `target` at `now` (CloudSim `addMigratingInVm`).
    pub fn start_migration(&mut self, v: usize, target: usize) {
        let source = self.vms[v].host.expect("migrating VM has a host");
        debug_assert_ne!(source, target);
        self.vms[v].in_migration = true;
        self.vms[v].last_moved = self.now;
        self.hosts[target].migrating_in.push(v);
        self.hosts[target].vms.push(v);
        self.migrations += 1;
        let end = self.now + migration_seconds(self.vms[v].ram_mb, self.hosts[target].bw_mbit);
        self.flights.push_back(Flight { end, vm: v, target });
        let t = self.now;
        self.update_host(target, t, false);
        self.update_host(source, t, false);
    }

    /// Migrations in flight.
    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }

    /// Complete every migration that ends before `until`, processing the
    /// data centre at each completion time.
    pub fn complete_migrations_before(&mut self, until: f64) {
        self.flights
            .make_contiguous()
            .sort_by(|a, b| a.end.total_cmp(&b.end));
        while let Some(first) = self.flights.front().copied() {
            if first.end >= until {
                break;
            }
            let te = first.end;
            self.process(te, false);
            let mut touched = Vec::new();
            while let Some(f) = self.flights.front().copied() {
                if f.end != te {
                    break;
                }
                self.flights.pop_front();
                let source = self.vms[f.vm].host.expect("host");
                self.plan_remove(source, f.vm);
                let tgt = &mut self.hosts[f.target];
                tgt.migrating_in.retain(|&x| x != f.vm);
                tgt.vms.retain(|&x| x != f.vm);
                tgt.vms.push(f.vm);
                self.vms[f.vm].host = Some(f.target);
                self.vms[f.vm].in_migration = false;
                touched.push(source);
                touched.push(f.target);
            }
            for h in touched {
                self.update_host(h, te, false);
            }
        }
    }

    /// Set the clock (after processing a tick).
    pub fn set_now(&mut self, t: f64) {
        self.now = t;
        self.set_demand(t);
    }

    /// SLATAH: share of active host time with allocated < requested MIPS.
    pub fn slatah(&self) -> f64 {
        let (v, a) = self.hosts.iter().fold((0.0, 0.0), |(v, a), h| {
            (v + h.violation_time, a + h.active_time)
        });
        if a > 0.0 {
            v / a
        } else {
            0.0
        }
    }

    /// PDM: MIPS lost to migrations over MIPS requested.
    pub fn pdm(&self) -> f64 {
        let (u, r) = self.vms.iter().fold((0.0, 0.0), |(u, r), vm| {
            (u + vm.under_migration, r + vm.total_req)
        });
        if r > 0.0 {
            u / r
        } else {
            0.0
        }
    }

    /// Overall share of requested MIPS not allocated.
    pub fn overall_sla(&self) -> f64 {
        let (a, r) = self.vms.iter().fold((0.0, 0.0), |(a, r), vm| {
            (a + vm.total_alloc, r + vm.total_req)
        });
        if r > 0.0 {
            (r - a) / r
        } else {
            0.0
        }
    }

    /// Transitions of hosts from active to idle (never-used hosts count once).
    pub fn host_shutdowns(&self) -> u64 {
        self.hosts.iter().map(|h| u64::from(h.shutdowns)).sum()
    }
}

fn clamp_util(u: f64) -> f64 {
    if u > 1.0 && u < 1.01 {
        1.0
    } else {
        u.min(1.0)
    }
}

/// MIPS given to one VM by `VmSchedulerTimeSharedOverSubscription`.
fn alloc_share(capped: f64, fits: bool, factor: f64, out: bool, inh: bool) -> f64 {
    if fits {
        if out {
            capped * 0.9
        } else if inh {
            capped * 0.1
        } else {
            capped
        }
    } else if out {
        (capped * factor * 0.9).floor()
    } else if inh {
        (capped * 0.1 * factor).floor()
    } else {
        (capped * factor).floor()
    }
}

fn record_vm(vm: &mut SimVm, t: f64, alloc: f64, req: f64, in_migration: bool) {
    let entry = Entry {
        t,
        alloc,
        req,
        flag: in_migration,
    };
    match vm.last {
        Some(ref mut last) if last.t == t => *last = entry,
        Some(last) => {
            let dt = t - last.t;
            vm.total_alloc += last.alloc * dt;
            vm.total_req += last.req * dt;
            if last.alloc < last.req && last.flag {
                vm.under_migration += (last.req - last.alloc) * dt;
            }
            vm.last = Some(entry);
        }
        None => vm.last = Some(entry),
    }
}
