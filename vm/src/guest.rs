//! The workload guest (shared GUEST.md): where its image is, how to talk to
//! it (command line) and how to read it (the status block at `0x1000`).

use std::fmt;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// The workload guest built from `vm/guest/` by this crate's build script.
pub fn guest_elf_path() -> &'static Path {
    Path::new(concat!(env!("OUT_DIR"), "/guest.elf"))
}

/// The workload guest image bytes, embedded so a `ferry` binary copied
/// elsewhere still has it.
pub const GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.elf"));

/// Guest-physical address of the status block.
pub const STATUS_ADDR: u64 = 0x1000;
/// `"FERRYGST"`, the status block's magic.
pub const STATUS_MAGIC: u64 = 0x4645_5252_5947_5354;
/// Start of the region the guest fills and dirties.
pub const FILL_BASE: u64 = 0x20_0000;
/// Most vCPUs the workload guest runs a loop on (vm/guest/GUEST.md).
pub const GUEST_MAX_CPUS: usize = 16;
/// Counters of vCPU `i >= 1` at `STATUS_ADDR + CPU_TABLE + CPU_ENTRY * (i - 1)`.
const CPU_TABLE: u64 = 0x200;
const CPU_ENTRY: u64 = 0x40;

/// The guest's phase word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GuestPhase {
    /// Not started or before the status block is set up.
    Boot,
    /// Filling memory.
    Filling,
    /// Running the dirty loop.
    Running,
    /// The guest hit a fatal error.
    Fatal,
    /// A value GUEST.md does not define.
    Unknown(u64),
}

impl GuestPhase {
    /// The phase word as the guest wrote it.
    pub fn raw(self) -> u64 {
        match self {
            Self::Boot => 0,
            Self::Filling => 1,
            Self::Running => 2,
            Self::Fatal => 0xDEAD,
            Self::Unknown(v) => v,
        }
    }
}

impl From<u64> for GuestPhase {
    fn from(v: u64) -> Self {
        match v {
            0 => Self::Boot,
            1 => Self::Filling,
            2 => Self::Running,
            0xDEAD => Self::Fatal,
            v => Self::Unknown(v),
        }
    }
}

/// One vCPU's counters (vm/guest/GUEST.md); vCPU 0's are the shared GUEST.md
/// fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct VcpuCounters {
    /// +1 per loop pass of this vCPU that saw at least 1 ms go by.
    pub heartbeat: u64,
    /// Page writes of this vCPU.
    pub pages_dirtied: u64,
    /// Passes over its share of the working set.
    pub passes: u64,
    /// Pages it verified.
    pub pages_verified: u64,
    /// Its self-check failures.
    pub verify_errors: u64,
    /// Address of its first bad word.
    pub first_bad_addr: u64,
    /// Timer mode: times it halted waiting for a tick (vCPU 0: 0xC8).
    #[serde(default)]
    pub halts: u64,
}

/// A snapshot of the status block (GUEST.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestStatus {
    /// Whether the magic is present (the guest has booted).
    pub magic_ok: bool,
    /// Phase.
    pub phase: GuestPhase,
    /// +1 per main-loop pass that saw at least 1 ms go by.
    pub heartbeat: u64,
    /// Total page writes.
    pub pages_dirtied: u64,
    /// Passes completed over the working set.
    pub passes: u64,
    /// End of the filled region.
    pub mem_top: u64,
    /// Working-set pages.
    pub wss_pages: u64,
    /// Pages verified.
    pub pages_verified: u64,
    /// Self-check failures.
    pub verify_errors: u64,
    /// Address of the first bad word.
    pub first_bad_addr: u64,
    /// Exception vector when phase is fatal (0x80, ferry's guest only).
    pub fatal_vector: u64,
    /// Faulting RIP when phase is fatal (0x88, ferry's guest only).
    pub fatal_rip: u64,
    /// Reason code for a fatal error raised by the guest itself (0x98).
    pub fatal_reason: u64,
    /// vCPUs running a dirty loop (0xB0; 0 from a guest built to the base
    /// GUEST.md, which runs one).
    #[serde(default)]
    pub cpus: u64,
    /// Timer mode: timer interrupts taken (0xB8; 0 without `hz`).
    #[serde(default)]
    pub ticks: u64,
    /// Timer mode: the rate the guest programmed the PIT to (0xC0).
    #[serde(default)]
    pub hz: u64,
    /// Timer mode: times the BSP halted waiting for a tick (0xC8).
    #[serde(default)]
    pub halts: u64,
    /// vCPUs checked in, bit `i` for the one with APIC ID `i` (0xD0; status
    /// slot `i` is that vCPU's, which on ferry's VM is KVM vCPU `i`).
    #[serde(default)]
    pub online_mask: u64,
    /// Timer mode: halts of the vCPUs that run no loop (0xD8).
    #[serde(default)]
    pub idle_halts: u64,
    /// RAM ranges the guest fills and dirties, `[start, end)` each (0x180:
    /// count, then pairs from 0x188; vm/guest/GUEST.md): from 2 MiB up to
    /// the top below 4 GiB, then RAM above the 3-4 GiB hole. 0 from a guest
    /// built to the base GUEST.md.
    #[serde(default)]
    pub ram_ranges: u64,
    /// The ranges themselves (the first `ram_ranges` are valid).
    #[serde(default)]
    pub ram: [(u64, u64); 2],
    /// Counters of the vCPUs running a loop, vCPU 0 first (its values are
    /// the fields above): see [`GuestStatus::vcpus`].
    #[serde(
        rename = "vcpus",
        serialize_with = "serialize_vcpus",
        deserialize_with = "deserialize_vcpus",
        default
    )]
    vcpu_table: VcpuTable,
}

/// Per-vCPU counters in a fixed array, so a status stays `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct VcpuTable {
    len: usize,
    entries: [VcpuCounters; GUEST_MAX_CPUS],
}

fn serialize_vcpus<S: serde::Serializer>(t: &VcpuTable, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(&t.entries[..t.len])
}

fn deserialize_vcpus<'de, D: serde::Deserializer<'de>>(d: D) -> Result<VcpuTable, D::Error> {
    let list = <Vec<VcpuCounters> as serde::Deserialize>::deserialize(d)?;
    if list.len() > GUEST_MAX_CPUS {
        return Err(serde::de::Error::invalid_length(
            list.len(),
            &"at most GUEST_MAX_CPUS vCPUs",
        ));
    }
    let mut t = VcpuTable {
        len: list.len(),
        ..VcpuTable::default()
    };
    t.entries[..list.len()].copy_from_slice(&list);
    Ok(t)
}

impl GuestStatus {
    /// Parses the status block from 20 little-endian words at `0x1000`
    /// (vCPU 0 only; [`GuestStatus::read`] adds the others).
    pub fn from_words(w: &[u64; 20]) -> Self {
        let cpu0 = VcpuCounters {
            heartbeat: w[2],
            pages_dirtied: w[3],
            passes: w[4],
            pages_verified: w[12],
            verify_errors: w[14],
            first_bad_addr: w[15],
            halts: 0,
        };
        let mut entries = [VcpuCounters::default(); GUEST_MAX_CPUS];
        entries[0] = cpu0;
        Self {
            cpus: 0,
            ticks: 0,
            hz: 0,
            halts: 0,
            online_mask: 0,
            idle_halts: 0,
            ram_ranges: 0,
            ram: [(0, 0); 2],
            vcpu_table: VcpuTable { len: 1, entries },
            magic_ok: w[0] == STATUS_MAGIC,
            phase: GuestPhase::from(w[1]),
            heartbeat: w[2],
            pages_dirtied: w[3],
            passes: w[4],
            mem_top: w[8],
            wss_pages: w[9],
            pages_verified: w[12],
            verify_errors: w[14],
            first_bad_addr: w[15],
            fatal_vector: w[16],
            fatal_rip: w[17],
            fatal_reason: w[19],
        }
    }

    /// Reads the status block from guest memory, with every vCPU's counters.
    pub fn read<M: GuestMemoryBackend>(mem: &M) -> Result<Self, vm_memory::GuestMemoryError> {
        let word = |off: u64| mem.read_obj::<u64>(GuestAddress(STATUS_ADDR + off));
        let mut w = [0u64; 20];
        for (i, v) in w.iter_mut().enumerate() {
            *v = word(8 * i as u64)?;
        }
        let mut st = Self::from_words(&w);
        st.cpus = word(0xB0)?;
        st.ticks = word(0xB8)?;
        st.hz = word(0xC0)?;
        st.halts = word(0xC8)?;
        st.vcpu_table.entries[0].halts = st.halts;
        st.online_mask = word(0xD0)?;
        st.idle_halts = word(0xD8)?;
        st.ram_ranges = word(0x180)?.min(2);
        for (i, r) in st.ram.iter_mut().enumerate() {
            *r = (word(0x188 + 16 * i as u64)?, word(0x190 + 16 * i as u64)?);
        }
        let cpus = usize::try_from(st.cpus).unwrap_or(0).min(GUEST_MAX_CPUS);
        for i in 1..cpus {
            let base = CPU_TABLE + CPU_ENTRY * (i as u64 - 1);
            st.vcpu_table.len = i + 1;
            st.vcpu_table.entries[i] = VcpuCounters {
                heartbeat: word(base)?,
                pages_dirtied: word(base + 0x08)?,
                passes: word(base + 0x10)?,
                pages_verified: word(base + 0x18)?,
                verify_errors: word(base + 0x20)?,
                first_bad_addr: word(base + 0x28)?,
                halts: word(base + 0x38)?,
            };
        }
        Ok(st)
    }

    /// Counters of every vCPU running a loop, vCPU 0 first.
    pub fn vcpus(&self) -> &[VcpuCounters] {
        &self.vcpu_table.entries[..self.vcpu_table.len]
    }

    /// Self-check failures over every vCPU.
    pub fn verify_errors_total(&self) -> u64 {
        self.vcpus().iter().map(|c| c.verify_errors).sum()
    }

    /// Healthy as GUEST.md defines it, on every vCPU (heartbeat growth is
    /// checked by the caller).
    pub fn is_healthy(&self) -> bool {
        self.magic_ok && self.phase == GuestPhase::Running && self.verify_errors_total() == 0
    }

    /// A one-line explanation of a fatal phase.
    pub fn fatal_reason_text(&self) -> String {
        match self.fatal_reason {
            1 => "the guest could not parse its command line".into(),
            2 => "rate is a number but tsc_khz is unknown".into(),
            3 => "no usable memory (need more than 2 MiB)".into(),
            _ => format!(
                "exception vector {} at rip {:#x}",
                self.fatal_vector, self.fatal_rip
            ),
        }
    }
}

impl fmt::Display for GuestStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "phase {:?} heartbeat {} dirtied {} passes {} verified {} verify_errors {}",
            self.phase,
            self.heartbeat,
            self.pages_dirtied,
            self.passes,
            self.pages_verified,
            self.verify_errors
        )?;
        if self.hz != 0 {
            write!(
                f,
                " ticks {} at {} Hz, halts {}",
                self.ticks, self.hz, self.halts
            )?;
        }
        if self.vcpus().len() > 1 {
            for (i, c) in self.vcpus().iter().enumerate().skip(1) {
                write!(
                    f,
                    " | vcpu{i} heartbeat {} dirtied {} verify_errors {}",
                    c.heartbeat, c.pages_dirtied, c.verify_errors
                )?;
            }
        }
        Ok(())
    }
}

/// What the guest's fill writes (`fill=`, vm/guest/GUEST.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestFill {
    /// `fill=0`: no fill.
    None,
    /// `fill=1`: every page incompressible, never zero.
    Random,
    /// `fill=mix`: `zero_pct` % zero pages, `text_pct` % text-like
    /// compressible pages, the rest incompressible (`mix_zero=`,
    /// `mix_text=`; default 40 and 30).
    Mix {
        /// Percent of pages that are zero.
        zero_pct: u64,
        /// Percent of pages that are text-like.
        text_pct: u64,
    },
}

impl GuestFill {
    /// `fill=mix` with the guest's default shares (40 % zero, 30 % text).
    pub const MIX: Self = Self::Mix {
        zero_pct: 40,
        text_pct: 30,
    };
}

/// The guest's command-line parameters (GUEST.md), validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestParams {
    /// Working set in bytes from 2 MiB; `None` = all.
    pub wss_bytes: Option<u64>,
    /// Pages/s to dirty; `None` = unpaced (`max`).
    pub rate: Option<u64>,
    /// TSC frequency in kHz.
    pub tsc_khz: Option<u64>,
    /// Fill seed.
    pub seed: u64,
    /// What the fill writes.
    pub fill: GuestFill,
    /// Pages self-checked per millisecond.
    pub verify: u64,
    /// vCPUs to wait for before the loops start (vm/guest/GUEST.md).
    pub cpus: u64,
    /// Timer mode: PIT interrupts per second (0 off; else
    /// [`GUEST_MIN_HZ`]..=[`GUEST_MAX_HZ`], vm/guest/GUEST.md).
    pub hz: u64,
    /// Each loop's own pace, pages/s (`rates=R0,R1,...`, vm/guest/GUEST.md):
    /// loop `i` dirties `rates[i]` (0 past the list) instead of its share
    /// of `rate`; empty: the loops split `rate`.
    pub rates: Vec<u64>,
}

/// Slowest timer the guest programs (the PIT's divisor is 16 bits).
pub const GUEST_MIN_HZ: u64 = 19;
/// Fastest timer the guest programs.
pub const GUEST_MAX_HZ: u64 = 10_000;

impl Default for GuestParams {
    fn default() -> Self {
        Self {
            wss_bytes: None,
            rate: Some(0),
            tsc_khz: None,
            seed: 1,
            fill: GuestFill::Random,
            verify: 256,
            cpus: 1,
            hz: 0,
            rates: Vec::new(),
        }
    }
}

impl GuestParams {
    /// Parses a GUEST.md command line; unknown keys and bad values are errors.
    pub fn parse(cmdline: &str) -> Result<Self, String> {
        let mut p = Self::default();
        let (mut mix, mut zero_pct, mut text_pct) = (false, 40, 30);
        for word in cmdline.split_whitespace() {
            let (key, val) = word
                .split_once('=')
                .ok_or_else(|| format!("`{word}` is not key=value"))?;
            let num = |v: &str| -> Result<u64, String> {
                parse_size(v, 1).ok_or_else(|| format!("`{key}={v}`: not a number"))
            };
            match key {
                "wss" if val == "all" => p.wss_bytes = None,
                "wss" => {
                    p.wss_bytes = Some(
                        parse_size(val, 1 << 20)
                            .ok_or_else(|| format!("`wss={val}`: want MiB, a K/M/G size or `all`"))?,
                    )
                }
                "rate" if val == "max" => p.rate = None,
                "rate" => p.rate = Some(num(val)?),
                "tsc_khz" => p.tsc_khz = Some(num(val)?),
                "seed" => p.seed = num(val)?,
                "fill" if val == "mix" => mix = true,
                "fill" => {
                    mix = false;
                    p.fill = if num(val)? != 0 {
                        GuestFill::Random
                    } else {
                        GuestFill::None
                    };
                }
                "mix_zero" => zero_pct = num(val)?,
                "mix_text" => text_pct = num(val)?,
                "verify" => p.verify = num(val)?,
                "cpus" => {
                    p.cpus = num(val)?;
                    if !(1..=GUEST_MAX_CPUS as u64).contains(&p.cpus) {
                        return Err(format!("`cpus={val}`: want 1..={GUEST_MAX_CPUS}"));
                    }
                }
                "rates" => {
                    p.rates = val
                        .split(',')
                        .map(|r| {
                            parse_size(r, 1).ok_or_else(|| {
                                format!("`rates={val}`: want pages/s per loop, e.g. `rates=8000,500`")
                            })
                        })
                        .collect::<Result<_, _>>()?;
                    if p.rates.len() > GUEST_MAX_CPUS {
                        return Err(format!(
                            "`rates={val}`: {} rates, at most {GUEST_MAX_CPUS} loops",
                            p.rates.len()
                        ));
                    }
                }
                "hz" => {
                    p.hz = num(val)?;
                    if p.hz != 0 && !(GUEST_MIN_HZ..=GUEST_MAX_HZ).contains(&p.hz) {
                        return Err(format!(
                            "`hz={val}`: want 0 (off) or {GUEST_MIN_HZ}..={GUEST_MAX_HZ}"
                        ));
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown guest parameter `{key}` (known: wss, rate, rates, tsc_khz, seed, fill, mix_zero, mix_text, verify, cpus, hz)"
                    ))
                }
            }
        }
        if zero_pct.saturating_add(text_pct) > 100 {
            return Err(format!(
                "`mix_zero={zero_pct}` and `mix_text={text_pct}` add up to more than 100 %"
            ));
        }
        if mix {
            p.fill = GuestFill::Mix { zero_pct, text_pct };
        }
        Ok(p)
    }

    /// Renders the command line the guest reads.
    pub fn to_cmdline(&self) -> String {
        let mut s = String::new();
        match self.wss_bytes {
            None => s.push_str("wss=all"),
            Some(b) => s.push_str(&format!("wss={}K", b / 1024)),
        }
        match self.rate {
            None => s.push_str(" rate=max"),
            Some(r) => s.push_str(&format!(" rate={r}")),
        }
        if let Some(t) = self.tsc_khz {
            s.push_str(&format!(" tsc_khz={t}"));
        }
        s.push_str(&format!(" seed={}", self.seed));
        match self.fill {
            GuestFill::None => s.push_str(" fill=0"),
            GuestFill::Random => s.push_str(" fill=1"),
            GuestFill::Mix { zero_pct, text_pct } => s.push_str(&format!(
                " fill=mix mix_zero={zero_pct} mix_text={text_pct}"
            )),
        }
        s.push_str(&format!(" verify={}", self.verify));
        if self.cpus != 1 {
            s.push_str(&format!(" cpus={}", self.cpus));
        }
        if self.hz != 0 {
            s.push_str(&format!(" hz={}", self.hz));
        }
        if !self.rates.is_empty() {
            let rates: Vec<String> = self.rates.iter().map(u64::to_string).collect();
            s.push_str(&format!(" rates={}", rates.join(",")));
        }
        s
    }
}

/// Parses `123`, `4K`, `16M`, `2G` (bytes); a bare number is multiplied by `unit`.
pub fn parse_size(s: &str, unit: u64) -> Option<u64> {
    let (digits, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, unit),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_round_trip() {
        let p = GuestParams::parse(
            "wss=64 rate=20000 tsc_khz=2300000 seed=7 verify=0 cpus=2 hz=100 rates=8000,0",
        )
        .unwrap();
        assert_eq!(p.cpus, 2);
        assert_eq!(p.rates, [8000, 0]);
        assert_eq!(p.hz, 100);
        assert_eq!(p.wss_bytes, Some(64 << 20));
        assert_eq!(p.rate, Some(20000));
        assert_eq!(GuestParams::parse(&p.to_cmdline()).unwrap(), p);
    }

    #[test]
    fn mixed_fill_round_trips_and_checks_its_shares() {
        let p = GuestParams::parse("mix_zero=50 fill=mix mix_text=20").unwrap();
        assert_eq!(
            p.fill,
            GuestFill::Mix {
                zero_pct: 50,
                text_pct: 20
            }
        );
        assert_eq!(GuestParams::parse(&p.to_cmdline()).unwrap(), p);
        assert_eq!(GuestParams::parse("fill=mix").unwrap().fill, GuestFill::MIX);
        assert_eq!(GuestParams::parse("fill=0").unwrap().fill, GuestFill::None);
        let e = GuestParams::parse("fill=mix mix_zero=80 mix_text=30").unwrap_err();
        assert!(e.contains("more than 100"), "{e}");
        assert!(GuestParams::parse("fill=lots").is_err());
    }

    #[test]
    fn a_status_with_vcpus_round_trips_through_json() {
        let mut w = [0u64; 20];
        w[0] = STATUS_MAGIC;
        w[2] = 7;
        let st = GuestStatus::from_words(&w);
        let back: GuestStatus = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        assert_eq!(back, st);
        assert_eq!(back.vcpus()[0].heartbeat, 7);
    }

    #[test]
    fn unknown_key_is_an_error() {
        let e = GuestParams::parse("rate=1 colour=blue").unwrap_err();
        assert!(e.contains("unknown guest parameter `colour`"), "{e}");
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(GuestParams::parse("rate=fast").is_err());
        assert!(GuestParams::parse("wss=12X").is_err());
        assert!(GuestParams::parse("wss").is_err());
        assert!(GuestParams::parse("hz=18").is_err());
        assert!(GuestParams::parse("hz=10001").is_err());
        assert_eq!(GuestParams::parse("hz=0").unwrap().hz, 0);
        for bad in ["rates=", "rates=1,", "rates=,1", "rates=fast", "rates=+1"] {
            assert!(GuestParams::parse(bad).is_err(), "{bad}");
        }
        let seventeen = vec!["1"; GUEST_MAX_CPUS + 1].join(",");
        assert!(GuestParams::parse(&format!("rates={seventeen}")).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2G", 1), Some(2 << 30));
        assert_eq!(parse_size("16", 1 << 20), Some(16 << 20));
        assert_eq!(parse_size("", 1), None);
        assert_eq!(parse_size("99999999999999999999G", 1), None);
    }
}
