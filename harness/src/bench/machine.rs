//! The machine state that moves migration results, printed with every run:
//! transparent huge pages (`enabled`, `defrag`), how much free memory is
//! in 2 MiB blocks or larger (`/proc/buddyinfo`: when there is little, every
//! first touch of a huge-page region compacts memory), the load average,
//! and how much CPU *other* work took while a run was measured.
//!
//! ## Busy runs
//! The machine counts as busy when processes other than the benchmark (the
//! harness itself and the engine processes it started) use more than
//! [`crate::bench::settings::RunSettings::busy_cpus`] CPUs: `/proc/stat`'s busy
//! time (user, nice, system, irq, softirq; steal is not another process)
//! minus the CPU time of our own processes, over the same interval. The
//! load average cannot tell: the benchmark's own guest spins a vCPU.

use std::fs;
use std::io;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bench::procfs;

/// Free blocks of 2 MiB (order 9 with 4 KiB pages) or larger.
const HUGE_ORDER: usize = 9;

/// What the machine looked like at one instant.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct MachineState {
    /// `/sys/kernel/mm/transparent_hugepage/enabled` (the selected word).
    pub thp_enabled: String,
    /// `/sys/kernel/mm/transparent_hugepage/defrag` (the selected word).
    pub thp_defrag: String,
    /// Free memory in blocks of 2 MiB or more, in 2 MiB units (all zones).
    pub free_2m_blocks: Option<u64>,
    /// 1-minute load average.
    pub load_1m: Option<f64>,
    /// 5-minute load average.
    pub load_5m: Option<f64>,
}

impl MachineState {
    /// Reads the state now; a file that cannot be read shows as unknown.
    pub fn now() -> Self {
        let thp = |f: &str| {
            fs::read_to_string(format!("/sys/kernel/mm/transparent_hugepage/{f}"))
                .ok()
                .and_then(|t| selected_word(&t))
                .unwrap_or_else(|| "unknown".into())
        };
        let loads = fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let mut l = loads.split_whitespace().map(|x| x.parse::<f64>().ok());
        Self {
            thp_enabled: thp("enabled"),
            thp_defrag: thp("defrag"),
            free_2m_blocks: fs::read_to_string("/proc/buddyinfo")
                .ok()
                .and_then(|t| free_huge_blocks(&t)),
            load_1m: l.next().flatten(),
            load_5m: l.next().flatten(),
        }
    }

    /// One line: `THP always/madvise, free 2M blocks 1234 (2.4 GiB), load 1.20/0.80`.
    pub fn summary(&self) -> String {
        let free = self.free_2m_blocks.map_or("?".into(), |b| {
            format!("{b} ({:.1} GiB)", b as f64 * 2.0 / 1024.0)
        });
        let load = |x: Option<f64>| x.map_or("?".into(), |v| format!("{v:.2}"));
        format!(
            "THP {}/{}, free 2M blocks {free}, load {}/{}",
            self.thp_enabled,
            self.thp_defrag,
            load(self.load_1m),
            load(self.load_5m)
        )
    }
}

/// The `[bracketed]` word of a THP setting file.
fn selected_word(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_string())
}

/// Free memory in blocks of order >= 9, counted in 2 MiB units, from the
/// text of `/proc/buddyinfo` (`Node 0, zone Normal c0 c1 ... c10`).
fn free_huge_blocks(text: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut seen = false;
    for line in text.lines() {
        let counts: Vec<u64> = line
            .split_whitespace()
            .skip(4)
            .filter_map(|c| c.parse().ok())
            .collect();
        for (order, &c) in counts.iter().enumerate().skip(HUGE_ORDER) {
            total += c << (order - HUGE_ORDER);
            seen = true;
        }
    }
    seen.then_some(total)
}

/// CPU seconds all CPUs spent busy since boot (`/proc/stat`: user, nice,
/// system, irq, softirq).
pub fn machine_busy_secs() -> io::Result<f64> {
    let text = fs::read_to_string("/proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no cpu line in /proc/stat"))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if f.len() < 7 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short cpu line in /proc/stat",
        ));
    }
    // user nice system idle iowait irq softirq
    let busy = f[0] + f[1] + f[2] + f[5] + f[6];
    Ok(busy as f64 / procfs::ticks_per_sec())
}

/// CPU seconds the harness process itself has used.
pub fn own_cpu_secs() -> f64 {
    procfs::process_cpu_secs(std::process::id()).unwrap_or(0.0)
}

/// A point to measure others' CPU from: machine busy time and ours.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    at: Instant,
    machine: f64,
    ours: f64,
}

impl CpuMark {
    /// Now, with `ours` = CPU seconds of our processes other than the
    /// harness (the harness's own are added here).
    pub fn take(ours: f64) -> Option<Self> {
        Some(Self {
            at: Instant::now(),
            machine: machine_busy_secs().ok()?,
            ours: ours + own_cpu_secs(),
        })
    }

    /// CPUs others used on average from `self` to `end` (never negative:
    /// the tick-based counters can disagree by a tick or two).
    pub fn others_until(&self, end: &Self) -> Option<f64> {
        let wall = end.at.duration_since(self.at).as_secs_f64();
        if wall <= 0.0 {
            return None;
        }
        let others = (end.machine - self.machine) - (end.ours - self.ours);
        Some((others / wall).max(0.0))
    }
}

/// Waits until others use at most `threshold` CPUs over a 1 s window, for
/// at most `max_wait`; returns the last window's figure (above the
/// threshold when the wait ran out) and how long it waited.
pub fn wait_quiet(threshold: f64, max_wait: Duration) -> (Option<f64>, Duration) {
    let start = Instant::now();
    loop {
        let a = CpuMark::take(0.0);
        std::thread::sleep(Duration::from_secs(1));
        let b = CpuMark::take(0.0);
        let others = a.zip(b).and_then(|(a, b)| a.others_until(&b));
        match others {
            Some(o) if o > threshold && start.elapsed() < max_wait => {}
            _ => return (others, start.elapsed()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thp_word_and_buddyinfo_parse() {
        assert_eq!(
            selected_word("always [madvise] never\n").as_deref(),
            Some("madvise")
        );
        assert_eq!(selected_word("no brackets"), None);
        let buddy = "Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3\n\
                     Node 0, zone   Normal   5347   3388   1292    568    292    163    102     47     11      2     29\n";
        // DMA: order 9 = 1, order 10 = 3 x 2; Normal: 2 + 29 x 2.
        assert_eq!(free_huge_blocks(buddy), Some(1 + 6 + 2 + 58));
        assert_eq!(free_huge_blocks(""), None);
    }

    #[test]
    fn this_machine_is_readable() {
        let m = MachineState::now();
        assert!(m.load_1m.is_some(), "{m:?}");
        assert!(m.summary().starts_with("THP "), "{}", m.summary());
        assert!(machine_busy_secs().unwrap() > 0.0);
    }
}
