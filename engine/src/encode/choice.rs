//! Which page encodings pay for themselves.
//!
//! Compressing a page costs encoder time and saves link time. On a link
//! faster than the compressor (loopback, a fast NIC, two cores shared with
//! the guest) every compressed page makes the migration slower; on a slow
//! or capped link it makes it faster. The source therefore measures, while
//! it sends, what each encoding costs and what it saves, and picks the one
//! that finishes the round soonest: [`choose_encoding`], the whole policy in
//! one function.
//!
//! Zero pages are always a flag and unchanged pages are always skipped
//! (both cost one hash pass the source makes anyway); the choice is about
//! every other page:
//!
//! | choice | a non-zero, changed page goes as |
//! |---|---|
//! | [`EncodingChoice::Raw`] | its 4096 bytes |
//! | [`EncodingChoice::XorDelta`] | a XOR delta when the page is cached, else raw |
//! | [`EncodingChoice::Lz4`] | LZ4 when it shrinks, else raw |
//! | [`EncodingChoice::XorDeltaLz4`] | a XOR delta (LZ4 on top when that shrinks it) when cached, else LZ4 or raw |
//! | [`EncodingChoice::Zstd`] | zstd when it shrinks, else raw |
//! | [`EncodingChoice::XorDeltaZstd`] | a XOR delta (LZ4 on top when that shrinks it) when cached, else zstd or raw |
//!
//! The costs are measured, not assumed: one page in [`PROBE_STRIDE`] (by
//! page index, so the same pages stay in the XOR cache round after round)
//! is always encoded every way, whatever the choice, so the figures of the
//! encodings not in use stay current and the choice can change back.
//! zstd costs about twice LZ4's time, so it is probed on one page in
//! [`ZSTD_PROBE_STRIDE`] only (a quarter of the probe pages). While the
//! codec probes shrink nothing, their strides double, up to 16x (see
//! `PageEncoder`): on memory that does not compress their figures only
//! confirm that raw wins, and one probe that shrinks its page restores the
//! full rate. XOR-delta probes stay at [`PROBE_STRIDE`].

use serde::Serialize;

use super::batch::ENTRY_BYTES;
use super::PAGE_SIZE;

/// One page in this many (page index multiple of it) is a probe: encoded
/// with XOR delta and LZ4 whatever the choice, to keep their costs measured
/// (LZ4's stride grows while its probes shrink nothing, see `PageEncoder`).
pub const PROBE_STRIDE: u64 = 32;

/// One page in this many (a multiple of [`PROBE_STRIDE`]) is a zstd probe.
pub const ZSTD_PROBE_STRIDE: u64 = 128;

const _: () = assert!(ZSTD_PROBE_STRIDE.is_multiple_of(PROBE_STRIDE));

/// A different choice is taken only when its estimated time per page is
/// below this share (percent) of the current one: measurements are noisy
/// and a choice that flips back and forth pays both costs.
pub const SWITCH_PERCENT: f64 = 90.0;

/// Encoder time also counts a little when the link is the bottleneck: it
/// is taken from the cores the guest runs on. Breaks ties toward less work.
/// When writing is itself CPU work ([`EncodingInputs::link_cpu_share`]),
/// encoder time counts by that share instead.
pub const CPU_WEIGHT: f64 = 0.01;

/// How the non-zero, changed pages of a round are encoded. `0` is not a
/// choice (zeroed bytes never mean one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum EncodingChoice {
    /// Raw pages (zero pages still a flag).
    Raw = 1,
    /// XOR deltas against cached copies, raw otherwise.
    XorDelta = 2,
    /// LZ4 when it shrinks a page, raw otherwise.
    Lz4 = 3,
    /// XOR deltas when cached, LZ4 or raw otherwise.
    XorDeltaLz4 = 4,
    /// zstd when it shrinks a page, raw otherwise.
    Zstd = 5,
    /// XOR deltas when cached (LZ4 on top when it shrinks them), zstd or
    /// raw otherwise.
    XorDeltaZstd = 6,
}

impl EncodingChoice {
    /// Every choice, in the order [`EncodingEstimates`] lists them.
    pub const ALL: [EncodingChoice; 6] = [
        EncodingChoice::Raw,
        EncodingChoice::XorDelta,
        EncodingChoice::Lz4,
        EncodingChoice::XorDeltaLz4,
        EncodingChoice::Zstd,
        EncodingChoice::XorDeltaZstd,
    ];

    /// Whether pages are XOR-delta coded against the cache.
    pub fn delta(self) -> bool {
        matches!(
            self,
            Self::XorDelta | Self::XorDeltaLz4 | Self::XorDeltaZstd
        )
    }

    /// Whether pages are LZ4-compressed when that shrinks them.
    pub fn lz4(self) -> bool {
        matches!(self, Self::Lz4 | Self::XorDeltaLz4)
    }

    /// Whether pages are zstd-compressed when that shrinks them.
    pub fn zstd(self) -> bool {
        matches!(self, Self::Zstd | Self::XorDeltaZstd)
    }

    /// Whether XOR deltas get LZ4 on top when that shrinks them: with
    /// either compressing choice (zstd gains nothing on a delta's short
    /// run-length stream that LZ4 does not).
    pub fn compresses_deltas(self) -> bool {
        self.lz4() || self.zstd()
    }

    /// The choice for a byte written by `as u8`; `None` for any other byte.
    pub fn from_u8(byte: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|c| *c as u8 == byte)
    }
}

/// What [`choose_encoding`] decides from: the figures measured so far.
/// Times are encoder wall-clock time per page on one worker (a worker that
/// shares its core with the guest is slower, and that is what counts).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct EncodingInputs {
    /// Bytes per second the lanes took while they were writing (a cap
    /// shows up here: its waits count as writing time).
    pub link_bytes_per_sec: f64,
    /// Encoder threads.
    pub workers: u32,
    /// Reading, hashing and batching a page: paid whatever the encoding.
    pub base_ns_per_page: f64,
    /// One LZ4 attempt on a page.
    pub lz4_ns_per_page: f64,
    /// Bytes a page takes after an LZ4 attempt (raw when it did not shrink).
    pub lz4_bytes_per_page: f64,
    /// One XOR-delta attempt (cache look-up, delta, storing the new copy).
    pub xor_ns_per_page: f64,
    /// Share of XOR attempts that found a usable cached copy (0..=1).
    pub xor_hit_share: f64,
    /// Bytes a page takes when its XOR delta was used.
    pub xor_bytes_per_hit: f64,
    /// XOR deltas may be used (negotiated, cache present, not round 0).
    pub delta_allowed: bool,
    /// LZ4 may be used (negotiated).
    pub lz4_allowed: bool,
    /// One zstd attempt on a page.
    #[serde(default)]
    pub zstd_ns_per_page: f64,
    /// Bytes a page takes after a zstd attempt (raw when it did not shrink).
    #[serde(default)]
    pub zstd_bytes_per_page: f64,
    /// zstd may be used (negotiated; absent in reports of older builds).
    #[serde(default)]
    pub zstd_allowed: bool,
    /// Share of the lanes' writing time their writer threads spent on a
    /// CPU or waiting for one (0..=1, `LinkTotals::cpu_share`). Near 1 the
    /// link's rate is CPU:
    /// the kernel's copy and TCP on loopback run on the cores the encoders
    /// share, so encoder time slows the link by as much. Near 0 the writers
    /// wait on the link or a cap, and encoder time is nearly free.
    #[serde(default)]
    pub link_cpu_share: f64,
}

impl EncodingInputs {
    /// Figures to start from before anything was measured: a link of
    /// `cap` bytes/s when capped (compression likely pays), else one far
    /// as fast as loopback (raw); LZ4 assumed to halve a page in 3 µs.
    /// zstd is not allowed (the source allows it once its probes measured
    /// it). The first measurements replace them within milliseconds.
    pub fn prior(cap: Option<f64>, workers: u32) -> Self {
        Self {
            link_bytes_per_sec: cap.unwrap_or(3e9),
            workers,
            base_ns_per_page: 500.0,
            lz4_ns_per_page: 3000.0,
            lz4_bytes_per_page: PAGE_SIZE as f64 / 2.0,
            xor_ns_per_page: 800.0,
            xor_hit_share: 0.0,
            xor_bytes_per_hit: 64.0,
            delta_allowed: false,
            lz4_allowed: true,
            zstd_ns_per_page: 6000.0,
            zstd_bytes_per_page: PAGE_SIZE as f64 / 2.0,
            zstd_allowed: false,
            link_cpu_share: 0.0,
        }
    }

    /// Whether a page codec could pay for itself at all: whether LZ4 (or
    /// zstd, where allowed) shrinking a page to nothing would beat raw.
    /// When it could not, no probe result can change the choice, and the
    /// encoders thin their codec probes as on memory that does not compress.
    pub fn compression_could_pay(&self) -> bool {
        let best_case = |allowed: bool, ns: f64| {
            let mut perfect = *self;
            perfect.lz4_allowed = allowed;
            perfect.lz4_ns_per_page = ns;
            perfect.lz4_bytes_per_page = 0.0;
            perfect.zstd_allowed = false;
            perfect.delta_allowed = false;
            let e = choose_encoding(&perfect, EncodingChoice::Raw).estimates;
            e.lz4_ns.is_some_and(|t| t < e.raw_ns)
        };
        best_case(self.lz4_allowed, self.lz4_ns_per_page)
            || best_case(self.zstd_allowed, self.zstd_ns_per_page)
    }
}

/// Estimated nanoseconds per page of each choice, in [`EncodingChoice::ALL`]
/// order; `None` for a choice that is not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct EncodingEstimates {
    /// [`EncodingChoice::Raw`].
    pub raw_ns: f64,
    /// [`EncodingChoice::XorDelta`].
    pub xor_delta_ns: Option<f64>,
    /// [`EncodingChoice::Lz4`].
    pub lz4_ns: Option<f64>,
    /// [`EncodingChoice::XorDeltaLz4`].
    pub xor_delta_lz4_ns: Option<f64>,
    /// [`EncodingChoice::Zstd`].
    #[serde(default)]
    pub zstd_ns: Option<f64>,
    /// [`EncodingChoice::XorDeltaZstd`].
    #[serde(default)]
    pub xor_delta_zstd_ns: Option<f64>,
}

impl EncodingEstimates {
    fn get(&self, choice: EncodingChoice) -> Option<f64> {
        match choice {
            EncodingChoice::Raw => Some(self.raw_ns),
            EncodingChoice::XorDelta => self.xor_delta_ns,
            EncodingChoice::Lz4 => self.lz4_ns,
            EncodingChoice::XorDeltaLz4 => self.xor_delta_lz4_ns,
            EncodingChoice::Zstd => self.zstd_ns,
            EncodingChoice::XorDeltaZstd => self.xor_delta_zstd_ns,
        }
    }
}

/// A choice, with the figures it was made from (what progress events
/// report).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct EncodingDecision {
    /// How pages go.
    pub choice: EncodingChoice,
    /// The estimate of each choice.
    pub estimates: EncodingEstimates,
    /// The figures.
    pub inputs: EncodingInputs,
}

/// The encoding choice, in order:
/// 1. For each allowed choice, the time one non-zero changed page costs is
///    the slower of its two stages, which run in parallel: the encoders
///    (`(base + codec time) / workers`) and the link (`bytes / link rate`),
///    where
///    - raw: `base`, 4096 bytes;
///    - XOR delta: `base + xor`, `hit × delta bytes + miss × 4096`;
///    - LZ4: `base + lz4`, LZ4 bytes;
///    - both: `base + xor + miss × lz4`, `hit × delta bytes + miss × LZ4 bytes`
///    - zstd, and XOR delta with zstd: as the two above with zstd's figures
///
///    (plus each page's batch table entry), plus the encoder time weighed
///    by the link's CPU share (at least [`CPU_WEIGHT`]).
/// 2. The fastest choice wins, but it replaces `current` only when it is
///    estimated at most [`SWITCH_PERCENT`] % of `current`'s time (or
///    `current` is no longer allowed): noise must not flip the choice.
///    Between equally fast choices, the earlier in [`EncodingChoice::ALL`]
///    (less encoder work) wins.
pub fn choose_encoding(inputs: &EncodingInputs, current: EncodingChoice) -> EncodingDecision {
    let i = inputs;
    let workers = f64::from(i.workers.max(1));
    let link = i.link_bytes_per_sec.max(1.0);
    let page = PAGE_SIZE as f64;
    let entry = ENTRY_BYTES as f64;
    let hit = i.xor_hit_share.clamp(0.0, 1.0);
    let miss = 1.0 - hit;
    let lz4_bytes = i.lz4_bytes_per_page.clamp(0.0, page);
    let zstd_bytes = i.zstd_bytes_per_page.clamp(0.0, page);
    let weight = CPU_WEIGHT.max(i.link_cpu_share.clamp(0.0, 1.0));
    let time = |cpu_ns: f64, bytes: f64| {
        (cpu_ns / workers).max((bytes + entry) / link * 1e9) + cpu_ns * weight
    };
    // A page coded by a codec of `ns` a page giving `bytes` (raw: 0 ns,
    // a whole page); with XOR deltas, only the cache misses go to it.
    let plain = |ns: f64, bytes: f64| time(i.base_ns_per_page + ns, bytes);
    let with_delta = |ns: f64, bytes: f64| {
        time(
            i.base_ns_per_page + i.xor_ns_per_page + miss * ns,
            hit * i.xor_bytes_per_hit + miss * bytes,
        )
    };
    let estimates = EncodingEstimates {
        raw_ns: plain(0.0, page),
        xor_delta_ns: i.delta_allowed.then(|| with_delta(0.0, page)),
        lz4_ns: i.lz4_allowed.then(|| plain(i.lz4_ns_per_page, lz4_bytes)),
        xor_delta_lz4_ns: (i.delta_allowed && i.lz4_allowed)
            .then(|| with_delta(i.lz4_ns_per_page, lz4_bytes)),
        zstd_ns: i
            .zstd_allowed
            .then(|| plain(i.zstd_ns_per_page, zstd_bytes)),
        xor_delta_zstd_ns: (i.delta_allowed && i.zstd_allowed)
            .then(|| with_delta(i.zstd_ns_per_page, zstd_bytes)),
    };
    let mut best = EncodingChoice::Raw;
    for c in EncodingChoice::ALL {
        if let Some(t) = estimates.get(c) {
            if t < estimates.get(best).unwrap_or(f64::INFINITY) {
                best = c;
            }
        }
    }
    let choice = match estimates.get(current) {
        Some(now) if best != current => {
            let candidate = estimates.get(best).unwrap_or(f64::INFINITY);
            if candidate <= now * SWITCH_PERCENT / 100.0 {
                best
            } else {
                current
            }
        }
        Some(_) => current,
        None => best,
    };
    EncodingDecision {
        choice,
        estimates,
        inputs: *inputs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: f64 = 1e9;
    const MB: f64 = 1e6;

    /// Inputs with the given link, LZ4 cost and ratio, XOR hit share.
    fn inputs(link: f64, lz4_ns: f64, lz4_bytes: f64, hit: f64, delta: bool) -> EncodingInputs {
        EncodingInputs {
            link_bytes_per_sec: link,
            workers: 2,
            base_ns_per_page: 400.0,
            lz4_ns_per_page: lz4_ns,
            lz4_bytes_per_page: lz4_bytes,
            xor_ns_per_page: 700.0,
            xor_hit_share: hit,
            xor_bytes_per_hit: 40.0,
            delta_allowed: delta,
            lz4_allowed: true,
            zstd_ns_per_page: 2.0 * lz4_ns,
            zstd_bytes_per_page: lz4_bytes,
            zstd_allowed: false,
            link_cpu_share: 0.0,
        }
    }

    /// As [`inputs`], with writing `share` CPU work.
    fn cpu_bound(mut i: EncodingInputs, share: f64) -> EncodingInputs {
        i.link_cpu_share = share;
        i
    }

    /// As [`inputs`], with zstd negotiated at `zstd_ns` a page giving
    /// `zstd_bytes`.
    fn with_zstd(mut i: EncodingInputs, zstd_ns: f64, zstd_bytes: f64) -> EncodingInputs {
        i.zstd_allowed = true;
        i.zstd_ns_per_page = zstd_ns;
        i.zstd_bytes_per_page = zstd_bytes;
        i
    }

    #[test]
    fn the_choice_follows_the_bottleneck() {
        use EncodingChoice::*;
        // (what, inputs, current choice, expected choice)
        let table = [
            // Loopback, 3 GB/s: one page takes 1.4 µs on the link, LZ4
            // takes 2 µs on each of 2 workers plus base: raw is faster.
            (
                "fast link, compressible",
                inputs(3.0 * GB, 4000.0, 1000.0, 0.0, false),
                Lz4,
                Raw,
            ),
            (
                "fast link, incompressible",
                inputs(3.0 * GB, 3000.0, 4096.0, 0.0, false),
                Lz4,
                Raw,
            ),
            // A 48 MiB/s cap: a raw page takes 81 µs on the link, anything
            // that shrinks it wins.
            (
                "capped, compressible",
                inputs(50.0 * MB, 4000.0, 1000.0, 0.0, false),
                Raw,
                Lz4,
            ),
            (
                "capped, incompressible",
                inputs(50.0 * MB, 4000.0, 4096.0, 0.0, false),
                Raw,
                Raw,
            ),
            (
                "capped, hot cached pages",
                inputs(50.0 * MB, 4000.0, 4096.0, 0.9, true),
                Raw,
                XorDelta,
            ),
            (
                "capped, cached and compressible",
                inputs(50.0 * MB, 2000.0, 1000.0, 0.5, true),
                Raw,
                XorDeltaLz4,
            ),
            // 1 Gbit/s NIC: 33 µs a raw page; LZ4 at 4 µs on 2 workers pays.
            (
                "gigabit, compressible",
                inputs(125.0 * MB, 4000.0, 2000.0, 0.0, false),
                Raw,
                Lz4,
            ),
            // 10 Gbit/s: 3.3 µs a raw page vs 2.2 µs of encoder time: LZ4
            // (half the bytes, 1.6 µs on the link) pays, barely.
            (
                "10 Gbit/s, compressible",
                inputs(1.25 * GB, 4000.0, 2000.0, 0.0, false),
                Raw,
                Lz4,
            ),
            // Hysteresis: within 10 % the current choice stays.
            (
                "close call keeps the current choice",
                inputs(1.25 * GB, 4000.0, 3800.0, 0.0, false),
                Raw,
                Raw,
            ),
            // The mix's text-like pages (measured per page: LZ4 1.7x in
            // 13 µs, zstd -1 2.6x in 25 µs, on a loaded core), 1 Gbit/s:
            // a raw page takes 33 µs on the link, zstd's 12.5 µs per page
            // on 2 workers hides behind the link and sends fewer bytes.
            (
                "gigabit, text-like",
                with_zstd(
                    inputs(125.0 * MB, 13_000.0, 2450.0, 0.0, false),
                    25_000.0,
                    1550.0,
                ),
                Lz4,
                Zstd,
            ),
            // 10 Gbit/s: a raw page takes 3.3 µs on the link; both
            // codecs' encoders (12.7 and 6.7 µs a page) are slower.
            (
                "10 Gbit/s, text-like",
                with_zstd(
                    inputs(1.25 * GB, 13_000.0, 2450.0, 0.0, false),
                    25_000.0,
                    1550.0,
                ),
                Zstd,
                Raw,
            ),
            (
                "loopback, text-like",
                with_zstd(
                    inputs(3.0 * GB, 13_000.0, 2450.0, 0.0, false),
                    25_000.0,
                    1550.0,
                ),
                Zstd,
                Raw,
            ),
            (
                "capped, incompressible, zstd negotiated",
                with_zstd(inputs(50.0 * MB, 4000.0, 4096.0, 0.0, false), 100.0, 4096.0),
                Raw,
                Raw,
            ),
            (
                "capped, cached and text-like",
                with_zstd(
                    inputs(50.0 * MB, 13_000.0, 2450.0, 0.5, true),
                    25_000.0,
                    1550.0,
                ),
                XorDeltaLz4,
                XorDeltaZstd,
            ),
            // The heavy guest's pages on loopback: LZ4 halves them in 2.5 µs,
            // and the link, measured at 1.5 GB/s, looks slower than 2
            // workers' LZ4. But writing is CPU work on the same 2 cores:
            // the encoders' time is the link's.
            (
                "loopback, cheap compression, writers waiting",
                inputs(1.5 * GB, 2500.0, 2000.0, 0.0, false),
                Raw,
                Lz4,
            ),
            (
                "loopback, cheap compression, writers on CPU",
                cpu_bound(inputs(1.5 * GB, 2500.0, 2000.0, 0.0, false), 0.9),
                Lz4,
                Raw,
            ),
            // A capped link's writers sleep on the cap: compression pays.
            (
                "capped, writers asleep",
                cpu_bound(inputs(50.0 * MB, 4000.0, 1000.0, 0.0, false), 0.05),
                Raw,
                Lz4,
            ),
            // Pages that nearly vanish pay even when writing is CPU work.
            (
                "loopback, near-empty pages, writers on CPU",
                cpu_bound(inputs(1.5 * GB, 300.0, 40.0, 0.0, false), 0.9),
                Raw,
                Lz4,
            ),
            // A choice no longer allowed is replaced whatever the margin.
            (
                "delta no longer allowed",
                inputs(3.0 * GB, 4000.0, 1000.0, 0.0, false),
                XorDelta,
                Raw,
            ),
            (
                "zstd no longer allowed",
                inputs(125.0 * MB, 13_000.0, 2450.0, 0.0, false),
                Zstd,
                Lz4,
            ),
        ];
        for (what, inputs, current, expected) in table {
            let d = choose_encoding(&inputs, current);
            assert_eq!(d.choice, expected, "{what}: {:?}", d.estimates);
        }
    }

    #[test]
    fn choices_not_allowed_get_no_estimate() {
        let mut i = inputs(50.0 * MB, 4000.0, 1000.0, 0.9, false);
        i.lz4_allowed = false;
        let d = choose_encoding(&i, EncodingChoice::Raw);
        assert_eq!(d.choice, EncodingChoice::Raw);
        assert_eq!(d.estimates.lz4_ns, None);
        assert_eq!(d.estimates.xor_delta_ns, None);
        assert_eq!(d.estimates.xor_delta_lz4_ns, None);
        assert_eq!(d.estimates.zstd_ns, None);
        assert_eq!(d.estimates.xor_delta_zstd_ns, None);
    }

    #[test]
    fn the_prior_sends_raw_uncapped_and_compresses_capped() {
        let fast = choose_encoding(&EncodingInputs::prior(None, 2), EncodingChoice::Raw);
        assert_eq!(fast.choice, EncodingChoice::Raw);
        let capped = choose_encoding(
            &EncodingInputs::prior(Some(50.0 * MB), 2),
            EncodingChoice::Raw,
        );
        assert_eq!(capped.choice, EncodingChoice::Lz4);
    }

    #[test]
    fn compression_could_pay_only_where_a_perfect_codec_would_win() {
        let fast = inputs(3.0 * GB, 3000.0, 4096.0, 0.0, false);
        assert!(!fast.compression_could_pay(), "LZ4 slower than the link");
        assert!(!EncodingInputs::prior(None, 2).compression_could_pay());
        assert!(EncodingInputs::prior(Some(50.0 * MB), 2).compression_could_pay());
        let cheap = inputs(1.5 * GB, 2500.0, 4096.0, 0.0, false);
        assert!(cheap.compression_could_pay());
        assert!(!cpu_bound(cheap, 0.9).compression_could_pay());
        // zstd alone (LZ4 not negotiated) counts too.
        let mut zstd_only = with_zstd(
            inputs(125.0 * MB, 4000.0, 4096.0, 0.0, false),
            8000.0,
            4096.0,
        );
        zstd_only.lz4_allowed = false;
        assert!(zstd_only.compression_could_pay());
        zstd_only.zstd_allowed = false;
        assert!(!zstd_only.compression_could_pay(), "no codec at all");
    }

    #[test]
    fn choices_round_trip_through_their_byte() {
        for c in EncodingChoice::ALL {
            assert_eq!(EncodingChoice::from_u8(c as u8), Some(c));
        }
        assert_eq!(EncodingChoice::from_u8(0), None);
        assert_eq!(EncodingChoice::from_u8(7), None);
    }
}
