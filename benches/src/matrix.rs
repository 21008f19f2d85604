//! What is benchmarked: workloads (memory, working set, dirty rate, link
//! cap) and engine profiles, and the order runs happen in.

use std::fmt;

use serde::Serialize;

/// How hard the guest dirties memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DirtyLevel {
    /// Filled, then no writes.
    Idle,
    /// A working set rewritten at a pace the link drains easily.
    Moderate,
    /// Faster than the (capped) link drains without help.
    Heavy,
}

impl fmt::Display for DirtyLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Idle => "idle",
            Self::Moderate => "moderate",
            Self::Heavy => "heavy",
        })
    }
}

/// One guest and link setting, run with every profile of both engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Guest RAM, bytes.
    pub mem_bytes: u64,
    /// The dirty level this stands for.
    pub level: DirtyLevel,
    /// Working set from 2 MiB, bytes (`None`: all memory).
    pub wss_bytes: Option<u64>,
    /// Pages per second the guest dirties.
    pub rate: u64,
    /// Bandwidth cap both engines get, bytes/s (`None`: uncapped).
    pub cap_bytes_per_sec: Option<u64>,
}

/// Moderate: 5,000 pages/s (20 MB/s) over 256 MiB.
pub const MODERATE_RATE: u64 = 5_000;
/// Heavy: asks for 30,000 pages/s (123 MB/s), near what one vCPU manages
/// while logging is on (PLATFORM.md: ~41k pages/s; on a loaded machine the
/// guest gets 14-25k, 57-100 MB/s: the table shows what it really did)...
pub const HEAVY_RATE: u64 = 30_000;
/// ...against a 48 MiB/s (50 MB/s) cap: the link cannot drain it.
pub const HEAVY_CAP: u64 = 48 << 20;
/// Working set of the dirtying rows.
pub const DIRTY_WSS: u64 = 256 << 20;

impl Workload {
    /// The workload of `level` on a guest of `mem_bytes`.
    pub fn new(mem_bytes: u64, level: DirtyLevel) -> Self {
        let wss = Some(DIRTY_WSS.min(mem_bytes.saturating_sub(4 << 20)));
        match level {
            DirtyLevel::Idle => Self {
                mem_bytes,
                level,
                wss_bytes: None,
                rate: 0,
                cap_bytes_per_sec: None,
            },
            DirtyLevel::Moderate => Self {
                mem_bytes,
                level,
                wss_bytes: wss,
                rate: MODERATE_RATE,
                cap_bytes_per_sec: None,
            },
            DirtyLevel::Heavy => Self {
                mem_bytes,
                level,
                wss_bytes: wss,
                rate: HEAVY_RATE,
                cap_bytes_per_sec: Some(HEAVY_CAP),
            },
        }
    }

    /// The guest command line (without `tsc_khz`).
    pub fn guest_args(&self) -> String {
        let wss = match self.wss_bytes {
            Some(b) => format!("{}M", b >> 20),
            None => "all".into(),
        };
        format!("rate={} wss={}", self.rate, wss)
    }

    /// The `--wss` value for `ferry vm run`.
    pub fn wss_arg(&self) -> String {
        match self.wss_bytes {
            Some(b) => format!("{}M", b >> 20),
            None => "all".into(),
        }
    }

    /// A short label, e.g. `1G moderate (256M @ 5000 p/s)`.
    pub fn label(&self) -> String {
        let mem = if self.mem_bytes.is_multiple_of(1 << 30) {
            format!("{}G", self.mem_bytes >> 30)
        } else {
            format!("{}M", self.mem_bytes >> 20)
        };
        let mut s = format!("{mem} {}", self.level);
        if self.rate > 0 {
            s += &format!(" {}@{}", self.wss_arg(), self.rate);
        }
        if let Some(c) = self.cap_bytes_per_sec {
            s += &format!(" cap {}M/s", c >> 20);
        }
        s
    }

    /// How long a migration of this workload may take before the row is
    /// called not converged: 20 s plus two and a half passes over memory
    /// at the cap (or at a pessimistic 200 MB/s when uncapped).
    pub fn default_deadline_secs(&self) -> u64 {
        let bw = self.cap_bytes_per_sec.unwrap_or(200_000_000);
        20 + 5 * self.mem_bytes / bw / 2
    }
}

/// Which engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// Stock QEMU (`qemu-system-x86_64 -accel kvm`).
    Qemu,
    /// ferry's CLI processes.
    Ferry,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Qemu => "qemu",
            Self::Ferry => "ferry",
        })
    }
}

/// A QEMU migration profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QemuProfile {
    /// No capabilities; `max-bandwidth` raised (or set to the row's cap).
    Default,
    /// `multifd` with 4 channels.
    Multifd,
    /// `multifd`, 4 channels, zstd compression.
    MultifdZstd,
    /// `xbzrle` with a cache of a quarter of guest memory.
    Xbzrle,
    /// `auto-converge`.
    AutoConverge,
}

/// A ferry migration profile: its defaults and each feature switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FerryProfile {
    /// ferry's defaults.
    Default,
    /// `--lanes 1`.
    OneLane,
    /// `--no-compress`.
    NoCompress,
    /// `--no-delta`.
    NoDelta,
}

/// An engine and its profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum Profile {
    /// A QEMU profile.
    Qemu(QemuProfile),
    /// A ferry profile.
    Ferry(FerryProfile),
}

impl Profile {
    /// All QEMU profiles.
    pub const QEMU: [QemuProfile; 5] = [
        QemuProfile::Default,
        QemuProfile::Multifd,
        QemuProfile::MultifdZstd,
        QemuProfile::Xbzrle,
        QemuProfile::AutoConverge,
    ];
    /// All ferry profiles.
    pub const FERRY: [FerryProfile; 4] = [
        FerryProfile::Default,
        FerryProfile::OneLane,
        FerryProfile::NoCompress,
        FerryProfile::NoDelta,
    ];

    /// The engine.
    pub fn engine(&self) -> Engine {
        match self {
            Self::Qemu(_) => Engine::Qemu,
            Self::Ferry(_) => Engine::Ferry,
        }
    }

    /// The profile's name (`default`, `multifd-zstd`, `no-delta`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Qemu(QemuProfile::Default) | Self::Ferry(FerryProfile::Default) => "default",
            Self::Qemu(QemuProfile::Multifd) => "multifd",
            Self::Qemu(QemuProfile::MultifdZstd) => "multifd-zstd",
            Self::Qemu(QemuProfile::Xbzrle) => "xbzrle",
            Self::Qemu(QemuProfile::AutoConverge) => "auto-converge",
            Self::Ferry(FerryProfile::OneLane) => "one-lane",
            Self::Ferry(FerryProfile::NoCompress) => "no-compress",
            Self::Ferry(FerryProfile::NoDelta) => "no-delta",
        }
    }

    /// Parses `qemu:NAME` or `ferry:NAME`.
    pub fn parse(s: &str) -> Option<Self> {
        let (engine, name) = s.split_once(':')?;
        match engine {
            "qemu" => Self::QEMU
                .iter()
                .map(|&p| Self::Qemu(p))
                .find(|p| p.name() == name),
            "ferry" => Self::FERRY
                .iter()
                .map(|&p| Self::Ferry(p))
                .find(|p| p.name() == name),
            _ => None,
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.engine(), self.name())
    }
}

/// The run order for one workload: `repeat` times, QEMU and ferry
/// profiles alternating (qemu, ferry, qemu, ...), extra profiles of the
/// engine with more of them at the end of each repetition.
pub fn interleave(
    qemu: &[QemuProfile],
    ferry: &[FerryProfile],
    repeat: u32,
) -> Vec<(u32, Profile)> {
    let mut out = Vec::new();
    for rep in 0..repeat {
        let n = qemu.len().max(ferry.len());
        for i in 0..n {
            if let Some(&q) = qemu.get(i) {
                out.push((rep, Profile::Qemu(q)));
            }
            if let Some(&f) = ferry.get(i) {
                out.push((rep, Profile::Ferry(f)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_alternate_engines() {
        let order = interleave(&Profile::QEMU[..2], &Profile::FERRY[..2], 2);
        let engines: Vec<Engine> = order.iter().map(|(_, p)| p.engine()).collect();
        assert_eq!(
            engines,
            [Engine::Qemu, Engine::Ferry, Engine::Qemu, Engine::Ferry].repeat(2)
        );
        assert_eq!(order[4].0, 1);
    }

    #[test]
    fn profile_names_round_trip() {
        for p in Profile::QEMU
            .map(Profile::Qemu)
            .into_iter()
            .chain(Profile::FERRY.map(Profile::Ferry))
        {
            assert_eq!(Profile::parse(&p.to_string()), Some(p));
        }
        assert_eq!(Profile::parse("qemu:nope"), None);
    }

    #[test]
    fn heavy_is_capped_below_its_dirty_rate() {
        let w = Workload::new(1 << 30, DirtyLevel::Heavy);
        assert!(w.rate * 4096 > w.cap_bytes_per_sec.unwrap());
        assert_eq!(w.guest_args(), "rate=30000 wss=256M");
        assert_eq!(
            Workload::new(1 << 30, DirtyLevel::Idle).guest_args(),
            "rate=0 wss=all"
        );
    }
}
