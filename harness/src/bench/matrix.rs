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
    /// All of memory rewritten as fast as the guest can, uncapped.
    Heavy,
    /// A hot working set rewritten as fast as the guest can, over a cap
    /// the link cannot drain it through without help.
    Capped,
}

impl DirtyLevel {
    /// All levels.
    pub const ALL: [Self; 4] = [Self::Idle, Self::Moderate, Self::Heavy, Self::Capped];

    /// Parses the [`fmt::Display`] name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.to_string() == s)
    }
}

impl fmt::Display for DirtyLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Idle => "idle",
            Self::Moderate => "moderate",
            Self::Heavy => "heavy",
            Self::Capped => "capped",
        })
    }
}

/// What the guest's memory holds (its `fill=`, vm/guest/GUEST.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fill {
    /// `fill=1`: every page incompressible, never zero.
    Random,
    /// `fill=mix`: this percent of zero pages and of text-like pages, the
    /// rest incompressible.
    Mix {
        /// Percent of zero pages.
        zero_pct: u8,
        /// Percent of text-like pages.
        text_pct: u8,
    },
}

impl Fill {
    /// The issue's real-like mix: 40 % zero, 30 % text-like, 30 % incompressible.
    pub const MIX: Self = Self::Mix {
        zero_pct: 40,
        text_pct: 30,
    };
}

/// The link between source and destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    /// 127.0.0.1, both sides in this network namespace.
    Loopback,
    /// The destination in a network namespace of its own behind a veth
    /// pair shaped to this many bits/s ([`crate::bench::shaped_link`]).
    Shaped {
        /// Rate, bits per second.
        bits_per_sec: u64,
    },
}

impl Link {
    /// `10gbit`, `1gbit`, `500mbit`, `loopback`.
    pub fn parse(s: &str) -> Option<Self> {
        if s == "loopback" || s == "lo" {
            return Some(Self::Loopback);
        }
        let (num, mult) = if let Some(n) = s.strip_suffix("gbit") {
            (n, 1_000_000_000)
        } else if let Some(n) = s.strip_suffix("mbit") {
            (n, 1_000_000)
        } else {
            return None;
        };
        let n: u64 = num.parse().ok().filter(|&n| n > 0)?;
        Some(Self::Shaped {
            bits_per_sec: n.checked_mul(mult)?,
        })
    }

    /// The link's rate in bytes/s, when shaped.
    pub fn bytes_per_sec(&self) -> Option<f64> {
        match self {
            Self::Loopback => None,
            Self::Shaped { bits_per_sec } => Some(*bits_per_sec as f64 / 8.0),
        }
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Loopback => f.write_str("loopback"),
            Self::Shaped { bits_per_sec: b } if b % 1_000_000_000 == 0 => {
                write!(f, "{}gbit", b / 1_000_000_000)
            }
            Self::Shaped { bits_per_sec: b } => write!(f, "{}mbit", b / 1_000_000),
        }
    }
}

/// How the destinations' guest memory is prepared, the same way for both
/// engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DstMemory {
    /// Allocated and populated before the migration starts: ferry's
    /// `vm receive --mem`, QEMU's `-mem-prealloc`. Neither pays for first
    /// touches (or THP compaction) during the stream.
    Prepared,
    /// Nothing prepared: ferry's destination allocates and populates when
    /// the source says how big the guest is, QEMU's faults its memory in
    /// as pages arrive; both inside the timed migration.
    OnDemand,
}

impl DstMemory {
    /// `prepared` / `on-demand`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::OnDemand => "on-demand",
        }
    }

    /// Parses [`DstMemory::name`].
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Prepared, Self::OnDemand]
            .into_iter()
            .find(|d| d.name() == s)
    }
}

/// How fast the guest dirties its working set (`rate=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rate {
    /// This many pages/s (`0`: no writes).
    Paced(u64),
    /// As fast as it can (`rate=max`).
    Unpaced,
}

impl Rate {
    /// The guest's `rate=` value and `ferry vm run --rate`.
    pub fn arg(&self) -> String {
        match self {
            Self::Paced(r) => r.to_string(),
            Self::Unpaced => "max".into(),
        }
    }

    /// Whether the guest writes at all.
    pub fn dirties(&self) -> bool {
        *self != Self::Paced(0)
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
    pub rate: Rate,
    /// Bandwidth cap both engines get, bytes/s (`None`: uncapped).
    pub cap_bytes_per_sec: Option<u64>,
    /// What guest memory holds.
    pub fill: Fill,
    /// The link.
    pub link: Link,
    /// How both destinations' memory is prepared.
    pub dst_memory: DstMemory,
    /// vCPUs (ferry `--cpus`, QEMU `-smp`); the guest runs a loop on each.
    pub cpus: u32,
    /// vCPUs that run a dirty loop (the guest's `cpus=`); the others spin
    /// idle without writing. 0: all of `cpus`.
    pub dirty_cpus: u32,
    /// The guest's timer mode (`hz=`, vm/guest/GUEST.md); 0 off.
    pub hz: u64,
}

/// Moderate: 5,000 pages/s (20 MB/s) over 256 MiB.
pub const MODERATE_RATE: u64 = 5_000;
/// Capped: unpaced writes (what one vCPU manages while logging is on,
/// PLATFORM.md: ~25-41k pages/s, 100-170 MB/s; the table shows what it
/// really did) against a 48 MiB/s (50 MB/s) cap: the link cannot drain it.
pub const CAPPED_CAP: u64 = 48 << 20;
/// Working set of the moderate and capped rows.
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
                rate: Rate::Paced(0),
                cap_bytes_per_sec: None,
                fill: Fill::Random,
                link: Link::Loopback,
                dst_memory: DstMemory::Prepared,
                cpus: 1,
                dirty_cpus: 0,
                hz: 0,
            },
            DirtyLevel::Moderate => Self {
                mem_bytes,
                level,
                wss_bytes: wss,
                rate: Rate::Paced(MODERATE_RATE),
                cap_bytes_per_sec: None,
                fill: Fill::Random,
                link: Link::Loopback,
                dst_memory: DstMemory::Prepared,
                cpus: 1,
                dirty_cpus: 0,
                hz: 0,
            },
            DirtyLevel::Heavy => Self {
                mem_bytes,
                level,
                wss_bytes: None,
                rate: Rate::Unpaced,
                cap_bytes_per_sec: None,
                fill: Fill::Random,
                link: Link::Loopback,
                dst_memory: DstMemory::Prepared,
                cpus: 1,
                dirty_cpus: 0,
                hz: 0,
            },
            DirtyLevel::Capped => Self {
                mem_bytes,
                level,
                wss_bytes: wss,
                rate: Rate::Unpaced,
                cap_bytes_per_sec: Some(CAPPED_CAP),
                fill: Fill::Random,
                link: Link::Loopback,
                dst_memory: DstMemory::Prepared,
                cpus: 1,
                dirty_cpus: 0,
                hz: 0,
            },
        }
    }

    /// This workload with `fill`.
    pub fn with_fill(self, fill: Fill) -> Self {
        Self { fill, ..self }
    }

    /// This workload over `link`.
    pub fn with_link(self, link: Link) -> Self {
        Self { link, ..self }
    }

    /// This workload with destinations prepared as `dst_memory` says.
    pub fn with_dst_memory(self, dst_memory: DstMemory) -> Self {
        Self { dst_memory, ..self }
    }

    /// This workload on `cpus` vCPUs, with the guest's timer at `hz` (0 off).
    pub fn with_vcpus(self, cpus: u32, hz: u64) -> Self {
        Self {
            cpus: cpus.max(1),
            hz,
            ..self
        }
    }

    /// This workload with only `dirty_cpus` of its vCPUs running a dirty
    /// loop (0: all).
    pub fn with_dirty_cpus(self, dirty_cpus: u32) -> Self {
        Self { dirty_cpus, ..self }
    }

    /// vCPUs running a dirty loop.
    pub fn loops(&self) -> u32 {
        match self.dirty_cpus {
            0 => self.cpus.max(1),
            n => n.min(self.cpus.max(1)),
        }
    }

    /// The guest command line (without `tsc_khz`), the same for both engines.
    pub fn guest_args(&self) -> String {
        let wss = match self.wss_bytes {
            Some(b) => format!("{}M", b >> 20),
            None => "all".into(),
        };
        let mut s = format!("rate={} wss={}", self.rate.arg(), wss);
        if let Fill::Mix { zero_pct, text_pct } = self.fill {
            s += &format!(" fill=mix mix_zero={zero_pct} mix_text={text_pct}");
        }
        if self.loops() > 1 {
            s += &format!(" cpus={}", self.loops());
        }
        if self.hz != 0 {
            s += &format!(" hz={}", self.hz);
        }
        s
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
        if self.rate.dirties() {
            s += &format!(" {}@{}", self.wss_arg(), self.rate.arg());
        }
        if let Some(c) = self.cap_bytes_per_sec {
            s += &format!(" cap {}M/s", c >> 20);
        }
        if let Fill::Mix { zero_pct, text_pct } = self.fill {
            s += &format!(" mix {zero_pct}/{text_pct}");
        }
        if let Link::Shaped { .. } = self.link {
            s += &format!(" {}", self.link);
        }
        if self.dst_memory == DstMemory::OnDemand {
            s += " dst on-demand";
        }
        if self.cpus > 1 {
            s += &format!(" {} vCPUs", self.cpus);
            if self.loops() < self.cpus {
                s += &format!(" ({} dirtying)", self.loops());
            }
        }
        if self.hz != 0 {
            s += &format!(" {} Hz", self.hz);
        }
        s
    }

    /// Whether the link is the bottleneck by design (a cap or a shaped link).
    pub fn limited(&self) -> bool {
        self.cap_bytes_per_sec.is_some() || matches!(self.link, Link::Shaped { .. })
    }

    /// How long a migration of this workload may take before the row is
    /// called not converged: 20 s plus two and a half passes over memory
    /// at the cap (or at a pessimistic 200 MB/s when uncapped).
    pub fn default_deadline_secs(&self) -> u64 {
        let link = self.link.bytes_per_sec().map(|b| b as u64);
        let bw = match (self.cap_bytes_per_sec, link) {
            (Some(c), Some(l)) => c.min(l),
            (c, l) => c.or(l).unwrap_or(200_000_000).min(200_000_000),
        };
        20 + 5 * self.mem_bytes / bw / 2
    }
}

/// Which engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
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
    /// The KVM dirty ring (`-accel kvm,dirty-ring-size=`) and a per-vCPU
    /// dirty-rate limit (`set-vcpu-dirty-limit`) set on the source before
    /// the migration: QEMU 7.2's dirtylimit. (QEMU 8.1 adds a `dirty-limit`
    /// migration capability that sets it when the migration stops
    /// converging; 7.2 does not have it.)
    DirtyLimit,
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
    /// The KVM dirty ring (`vm run --dirty-log ring`) and `--converge
    /// auto-converge`: every vCPU throttled alike.
    AutoConverge,
    /// The KVM dirty ring and `--converge dirty-limit`: only the vCPUs
    /// dirtying fastest throttled.
    DirtyLimit,
}

impl FerryProfile {
    /// Whether the source runs with the KVM dirty ring.
    pub fn dirty_ring(&self) -> bool {
        matches!(self, Self::AutoConverge | Self::DirtyLimit)
    }
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
    pub const QEMU: [QemuProfile; 6] = [
        QemuProfile::Default,
        QemuProfile::Multifd,
        QemuProfile::MultifdZstd,
        QemuProfile::Xbzrle,
        QemuProfile::AutoConverge,
        QemuProfile::DirtyLimit,
    ];
    /// All ferry profiles.
    pub const FERRY: [FerryProfile; 6] = [
        FerryProfile::Default,
        FerryProfile::OneLane,
        FerryProfile::NoCompress,
        FerryProfile::NoDelta,
        FerryProfile::AutoConverge,
        FerryProfile::DirtyLimit,
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
            Self::Qemu(QemuProfile::AutoConverge) | Self::Ferry(FerryProfile::AutoConverge) => {
                "auto-converge"
            }
            Self::Qemu(QemuProfile::DirtyLimit) | Self::Ferry(FerryProfile::DirtyLimit) => {
                "dirty-limit"
            }
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
    fn levels_are_the_issues_rows() {
        let w = Workload::new(1 << 30, DirtyLevel::Capped);
        assert_eq!(w.cap_bytes_per_sec, Some(48 << 20));
        assert_eq!(w.guest_args(), "rate=max wss=256M");
        let h = Workload::new(1 << 30, DirtyLevel::Heavy);
        assert_eq!(
            (h.guest_args().as_str(), h.limited()),
            ("rate=max wss=all", false)
        );
        assert_eq!(DirtyLevel::parse("capped"), Some(DirtyLevel::Capped));
        assert_eq!(
            Workload::new(1 << 30, DirtyLevel::Idle).guest_args(),
            "rate=0 wss=all"
        );
        // Two vCPUs, one dirtying: the guest runs one loop (no `cpus=`).
        let one = Workload::new(1 << 30, DirtyLevel::Capped)
            .with_vcpus(2, 0)
            .with_dirty_cpus(1);
        assert_eq!(one.guest_args(), "rate=max wss=256M");
        assert_eq!(
            one.label(),
            "1G capped 256M@max cap 48M/s 2 vCPUs (1 dirtying)"
        );
        assert_eq!(
            one.with_dirty_cpus(0).guest_args(),
            "rate=max wss=256M cpus=2"
        );
    }

    #[test]
    fn fill_link_and_destination_preparation_are_part_of_the_row() {
        let w = Workload::new(1 << 30, DirtyLevel::Idle)
            .with_fill(Fill::MIX)
            .with_link(Link::parse("1gbit").unwrap())
            .with_dst_memory(DstMemory::OnDemand);
        assert_eq!(
            w.guest_args(),
            "rate=0 wss=all fill=mix mix_zero=40 mix_text=30"
        );
        assert_eq!(w.label(), "1G idle mix 40/30 1gbit dst on-demand");
        assert!(w.limited());
        assert_eq!(Link::parse("10gbit").unwrap().to_string(), "10gbit");
        assert_eq!(
            Link::parse("500mbit").unwrap().bytes_per_sec(),
            Some(62.5e6)
        );
        assert_eq!(Link::parse("0gbit"), None);
        assert_eq!(Link::parse("fast"), None);
        assert_eq!(DstMemory::parse("on-demand"), Some(DstMemory::OnDemand));
        // The deadline follows the slowest of cap and link.
        assert_eq!(
            w.default_deadline_secs(),
            20 + 5 * (1 << 30) / 125_000_000 / 2
        );
    }
}
