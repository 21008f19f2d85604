//! Watching both sides of a migration from outside while it runs: the
//! guest's heartbeat on the source and on the destination, and the CPU time
//! of both engine processes.
//!
//! ## How the heartbeat gap is measured (the same for both engines)
//! One thread reads the status block of both processes through
//! `/proc/PID/mem` about every 200 µs ([`GuestProbe`]). On the source it
//! remembers when the heartbeat last changed and to what value (`H`): the
//! guest stopped within ~1 ms after that (the heartbeat moves about once per
//! ms of guest run time). On the destination it records when each new value
//! was first seen; the first value above `H` means the guest runs there
//! again. The gap between the two instants is the downtime the guest
//! experienced, as seen from memory, to about ±1 ms plus the poll period.
//! Values the destination receives before the switch (copies from earlier
//! rounds) are all `<= H` and are ignored.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ferry_vm::GuestStatus;

use crate::bench::guest_probe::GuestProbe;
use crate::bench::procfs;

/// CPU seconds of one engine process at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    /// Whole process.
    pub process: f64,
    /// Its vCPU threads together (the guest's own run time), those found.
    pub vcpu: f64,
}

/// Reads [`CpuSample`]s of one process.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    pid: u32,
    /// Each vCPU thread found so far and its time at the last read that
    /// found it: a thread that exited keeps its last figure.
    vcpus: Vec<(u32, f64)>,
    /// Samples taken: once a vCPU thread is known, the threads are listed
    /// again only every [`RESCAN_EVERY`] samples (a VMM starts its vCPUs
    /// together, and listing them is `/proc` work the engines share the
    /// cores with).
    samples: u32,
}

/// See [`CpuMeter::samples`].
const RESCAN_EVERY: u32 = 16;

impl CpuMeter {
    /// For `pid`, finding its vCPU threads now if it has any yet.
    pub fn new(pid: u32) -> Self {
        let mut meter = Self {
            pid,
            vcpus: Vec::new(),
            samples: 0,
        };
        meter.find_vcpus();
        meter
    }

    /// Adds vCPU threads that appeared since the last look (a destination
    /// creates its vCPUs as the migration starts).
    fn find_vcpus(&mut self) {
        for tid in procfs::vcpu_threads(self.pid) {
            if !self.vcpus.iter().any(|&(t, _)| t == tid) {
                self.vcpus.push((tid, 0.0));
            }
        }
    }

    /// The process's CPU time now, `None` once it is gone.
    pub fn sample(&mut self) -> Option<CpuSample> {
        if self.vcpus.is_empty() || self.samples.is_multiple_of(RESCAN_EVERY) {
            self.find_vcpus();
        }
        self.samples = self.samples.wrapping_add(1);
        let process = procfs::process_cpu_secs(self.pid).ok()?;
        for (tid, last) in &mut self.vcpus {
            if let Ok(v) = procfs::thread_cpu_secs(self.pid, *tid) {
                *last = v;
            }
        }
        Some(CpuSample {
            process,
            vcpu: self.vcpus.iter().map(|&(_, v)| v).sum(),
        })
    }
}

/// What the watch saw.
#[derive(Debug, Clone, Default)]
pub struct WatchLog {
    /// Source: (ms since t0, heartbeat) when the heartbeat last changed.
    pub src_last_change: Option<(f64, u64)>,
    /// Destination: (ms since t0, heartbeat) each time a new value appeared.
    pub dst_changes: Vec<(f64, u64)>,
    /// Last CPU sample of the source (taken while it still existed).
    pub src_cpu: Option<CpuSample>,
    /// Last CPU sample of the destination.
    pub dst_cpu: Option<CpuSample>,
    /// Last status seen on the destination.
    pub dst_last: Option<GuestStatus>,
    /// Source: (ms, pages dirtied) at the first and the latest read.
    pub src_dirtied: Option<((f64, u64), (f64, u64))>,
}

impl WatchLog {
    /// When the guest was first seen running on the destination (its
    /// heartbeat past the value it had when the source stopped), ms since
    /// t0: the end of the total time, the same for both engines.
    pub fn dst_running_ms(&self) -> Option<f64> {
        let (_, h) = self.src_last_change?;
        self.dst_changes
            .iter()
            .find(|&&(_, v)| v > h)
            .map(|&(t, _)| t)
    }

    /// The heartbeat gap in ms (see the module docs), when both ends were
    /// seen.
    pub fn heartbeat_gap_ms(&self) -> Option<f64> {
        let (t_stop, h) = self.src_last_change?;
        let &(t_run, _) = self.dst_changes.iter().find(|&&(_, v)| v > h)?;
        Some(t_run - t_stop)
    }

    /// Pages per second the guest dirtied on the source while watched (up
    /// to the switch): what it managed under dirty logging and throttling.
    pub fn src_dirty_rate(&self) -> Option<f64> {
        let ((t0, d0), (t1, d1)) = self.src_dirtied?;
        (t1 > t0).then(|| (d1 - d0) as f64 / ((t1 - t0) / 1e3))
    }

    /// The heartbeat gap in two parts: source stop to the switch value
    /// showing on the destination (the final state crossing over), and
    /// from there to the first new value (resume and the guest's first
    /// 1 ms pass there).
    pub fn gap_parts_ms(&self) -> Option<(f64, f64)> {
        let (t_stop, h) = self.src_last_change?;
        let &(t_state, _) = self.dst_changes.iter().find(|&&(_, v)| v == h)?;
        let &(t_run, _) = self.dst_changes.iter().find(|&&(_, v)| v > h)?;
        Some((t_state - t_stop, t_run - t_state))
    }

    /// The destination's first values from the switch value on (ms since
    /// t0, heartbeat), to show how the guest got going again.
    pub fn resume_trace(&self, n: usize) -> Vec<(f64, u64)> {
        let Some((_, h)) = self.src_last_change else {
            return Vec::new();
        };
        self.dst_changes
            .iter()
            .copied()
            .filter(|&(_, v)| v >= h)
            .take(n)
            .collect()
    }

    /// The heartbeat the guest had when the source stopped it.
    pub fn switch_heartbeat(&self) -> Option<u64> {
        self.src_last_change.map(|(_, h)| h)
    }
}

/// A running watch; [`Watch::finish`] stops it and returns the log.
#[derive(Debug)]
pub struct Watch {
    stop: Arc<AtomicBool>,
    dst_running: Arc<AtomicBool>,
    handle: Option<JoinHandle<WatchLog>>,
}

impl Watch {
    /// Starts watching `src` (already running its guest) and `dst` (whose
    /// guest memory appears as the migration proceeds), times relative to
    /// `t0`.
    pub fn start(t0: Instant, src: u32, dst: u32, mem_bytes: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let dst_running = Arc::new(AtomicBool::new(false));
        let (flag, running) = (stop.clone(), dst_running.clone());
        let handle = thread::Builder::new()
            .name("bench-watch".into())
            .spawn(move || watch_loop(t0, src, dst, mem_bytes, &flag, &running))
            .ok();
        Self {
            stop,
            dst_running,
            handle,
        }
    }

    /// Waits (at most `timeout`) until the guest has been seen running on
    /// the destination; `false` when it was not.
    pub fn wait_dst_running(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while !self.dst_running.load(Ordering::Relaxed) {
            if Instant::now() > end || self.handle.is_none() {
                return false;
            }
            thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Stops the watch and returns what it saw.
    pub fn finish(mut self) -> WatchLog {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn ms_since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

fn watch_loop(
    t0: Instant,
    src: u32,
    dst: u32,
    mem_bytes: u64,
    stop: &AtomicBool,
    dst_running: &AtomicBool,
) -> WatchLog {
    let mut log = WatchLog::default();
    let mut src_probe = GuestProbe::find(src, mem_bytes).ok().flatten();
    let mut dst_probe: Option<GuestProbe> = None;
    let mut src_meter = CpuMeter::new(src);
    let mut dst_meter = CpuMeter::new(dst);
    let mut last_dst_find = Instant::now() - Duration::from_secs(1);
    let mut last_cpu = Instant::now() - Duration::from_secs(1);
    let mut src_last: Option<u64> = None;
    while !stop.load(Ordering::Relaxed) {
        if let Some(p) = &src_probe {
            match p.read() {
                Ok(st) if st.magic_ok => {
                    let now = (ms_since(t0), st.pages_dirtied);
                    log.src_dirtied = Some(match log.src_dirtied {
                        None => (now, now),
                        Some((first, last)) if st.pages_dirtied != last.1 => (first, now),
                        Some(x) => x,
                    });
                    if src_last != Some(st.heartbeat) {
                        src_last = Some(st.heartbeat);
                        log.src_last_change = Some((ms_since(t0), st.heartbeat));
                    }
                }
                Ok(_) => {}
                Err(_) => src_probe = None, // the source exited
            }
        }
        match &dst_probe {
            Some(p) => {
                if let Ok(st) = p.read() {
                    if st.magic_ok && log.dst_changes.last().map(|&(_, h)| h) != Some(st.heartbeat)
                    {
                        log.dst_changes.push((ms_since(t0), st.heartbeat));
                        // A hint to stop waiting; the figures are computed
                        // from the whole log afterwards.
                        if log
                            .src_last_change
                            .is_some_and(|(_, h)| st.heartbeat > h + 1)
                        {
                            dst_running.store(true, Ordering::Relaxed);
                        }
                    }
                    log.dst_last = Some(st);
                }
            }
            None if last_dst_find.elapsed() > Duration::from_millis(5) => {
                last_dst_find = Instant::now();
                dst_probe = GuestProbe::find(dst, mem_bytes).ok().flatten();
            }
            None => {}
        }
        if last_cpu.elapsed() > Duration::from_millis(20) {
            last_cpu = Instant::now();
            if let Some(s) = src_meter.sample() {
                log.src_cpu = Some(s);
            }
            if let Some(s) = dst_meter.sample() {
                log.dst_cpu = Some(s);
            }
        }
        thread::sleep(Duration::from_micros(200));
    }
    if let Some(s) = src_meter.sample() {
        log.src_cpu = Some(s);
    }
    if let Some(s) = dst_meter.sample() {
        log.dst_cpu = Some(s);
    }
    log
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_is_from_last_source_change_to_first_new_value() {
        let log = WatchLog {
            src_last_change: Some((100.0, 50)),
            // Earlier rounds' copies (<= 50), then the guest runs again.
            dst_changes: vec![
                (20.0, 10),
                (90.0, 49),
                (110.0, 50),
                (135.0, 51),
                (136.0, 52),
            ],
            ..WatchLog::default()
        };
        assert_eq!(log.heartbeat_gap_ms(), Some(35.0));
        assert_eq!(log.dst_running_ms(), Some(135.0));
        assert_eq!(log.gap_parts_ms(), Some((10.0, 25.0)));
        assert_eq!(log.switch_heartbeat(), Some(50));
    }

    #[test]
    fn no_gap_when_the_guest_never_ran_again() {
        let log = WatchLog {
            src_last_change: Some((100.0, 50)),
            dst_changes: vec![(110.0, 50)],
            ..WatchLog::default()
        };
        assert_eq!(log.heartbeat_gap_ms(), None);
        assert_eq!(log.dst_running_ms(), None);
    }
}
