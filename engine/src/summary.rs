//! What a finished migration reports.

use std::time::Duration;

use serde::Serialize;

use crate::encode::EncodingCounts;
use crate::progress::as_ms;

/// Where the downtime went, source pause to destination resume. The top
/// level parts follow each other and add up to the downtime; `dest_*` parts
/// are the destination's share of the part named in their doc.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DowntimeBreakdown {
    /// Pausing the vCPUs.
    #[serde(serialize_with = "as_ms", rename = "pause_ms")]
    pub pause: Duration,
    /// Of `pause`: from the first to the last vCPU out of the guest, as
    /// the VM measured it (zero with one vCPU or a VM that does not say).
    #[serde(serialize_with = "as_ms", rename = "vcpu_stop_spread_ms")]
    pub vcpu_stop_spread: Duration,
    /// Saving the vCPU and device state and sending it (right after the
    /// pause, ahead of the last pages, so the destination restores it
    /// while they come).
    #[serde(serialize_with = "as_ms", rename = "state_ms")]
    pub state: Duration,
    /// Collecting the final dirty set (no re-protection).
    #[serde(serialize_with = "as_ms", rename = "final_collect_ms")]
    pub final_collect: Duration,
    /// Sending the last dirty pages and the digest.
    #[serde(serialize_with = "as_ms", rename = "final_pages_ms")]
    pub final_pages: Duration,
    /// From the digest sent to READY received: the destination writes the
    /// pages still in flight, verifies, answers.
    #[serde(serialize_with = "as_ms", rename = "ready_wait_ms")]
    pub ready_wait: Duration,
    /// Of `ready_wait`: from the digest sent to the destination's last
    /// page written (the final round, state and digest still in flight in
    /// queues and socket buffers, then decoded). Same-host clocks: exact
    /// on loopback, as good as clock sync between hosts.
    #[serde(serialize_with = "as_ms", rename = "dest_pages_ms")]
    pub dest_pages: Duration,
    /// Of `ready_wait`: from the destination sending READY to the source
    /// receiving it (the wire and the source's reader waking).
    #[serde(serialize_with = "as_ms", rename = "ready_return_ms")]
    pub ready_return: Duration,
    /// Of `ready_wait`: the destination checking the memory digest.
    #[serde(serialize_with = "as_ms", rename = "dest_verify_ms")]
    pub dest_verify: Duration,
    /// The destination restoring the state: as soon as it arrives, while
    /// `final_collect` and `final_pages` run on the source (no longer a
    /// part of `ready_wait` unless the last pages came first).
    #[serde(serialize_with = "as_ms", rename = "dest_restore_ms")]
    pub dest_restore: Duration,
    /// From READY received to the guest running on the destination: GO on
    /// the wire, the destination resuming.
    #[serde(serialize_with = "as_ms", rename = "go_to_resume_ms")]
    pub go_to_resume: Duration,
    /// Of `go_to_resume`: the destination's resume call (GO received to
    /// vCPU running).
    #[serde(serialize_with = "as_ms", rename = "dest_resume_ms")]
    pub dest_resume: Duration,
    /// Of `go_to_resume`: the pre-GO hook on the source (zero without
    /// one), e.g. a cluster store's ownership swap.
    #[serde(serialize_with = "as_ms", rename = "pre_go_ms")]
    pub pre_go: Duration,
}

/// The source's account of a completed migration.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationSummary {
    /// Rounds, the final stopped round included.
    pub rounds: u32,
    /// From the start of `run` to RUNNING.
    #[serde(serialize_with = "as_ms", rename = "total_ms")]
    pub total: Duration,
    /// Source pause to destination resume. Measured across two clocks (the
    /// destination reports its resume instant on its realtime clock): exact
    /// on one host (loopback shares the clock), as good as clock sync
    /// between hosts.
    #[serde(serialize_with = "as_ms", rename = "downtime_ms")]
    pub downtime: Duration,
    /// Its parts.
    pub downtime_parts: DowntimeBreakdown,
    /// Guest bytes handled: pages × page size over all rounds (pages found
    /// unchanged included).
    pub guest_bytes: u64,
    /// Bytes put on the wire, frame headers included.
    pub wire_bytes: u64,
    /// Size of guest memory.
    pub memory_bytes: u64,
    /// Pages by how they were sent.
    pub pages: EncodingCounts,
    /// Guest memory size / total time, bytes/s.
    pub throughput_bytes_per_sec: f64,
    /// Wire bytes / total time, bytes/s.
    pub wire_bytes_per_sec: f64,
    /// Highest throttle used (auto-converge, or dirty-limit's highest
    /// vCPU), percent.
    pub max_throttle_percent: u8,
    /// How the guest was slowed down when rounds stopped shrinking, at
    /// the start (the mode `auto` resolved to); `converge_switches` lists
    /// the changes after that.
    pub converge: crate::ConvergeMode,
    /// The switches `--converge auto` made between auto-converge and
    /// dirty-limit, in order (empty: `converge` was in force throughout).
    pub converge_switches: Vec<crate::convergence::ConvergeSwitch>,
    /// Highest throttle each vCPU had, percent (index = vCPU).
    pub vcpu_max_throttle_percent: Vec<u8>,
    /// Pages each vCPU dirtied over the live rounds, when the dirty log
    /// counts them (the KVM dirty ring), else empty.
    pub vcpu_dirty_pages: Vec<u64>,
    /// The memory digest both sides agreed on.
    pub memory_digest: u64,
    /// The digest of each memory region (they add up to `memory_digest`).
    pub region_digests: Vec<RegionDigest>,
    /// The dirty log backend used.
    pub dirty_log: &'static str,
    /// The downtime limit in force (`--max-downtime-ms`).
    #[serde(serialize_with = "as_ms", rename = "downtime_limit_ms")]
    pub downtime_limit: Duration,
    /// How far the downtime went past the limit (0 when it was met): never
    /// more than the pause margin (`MigrationOptions::pause_margin`) past
    /// the budget, which a stop-and-copy cannot pass without being aborted
    /// before GO. `ferry migrate` fails loudly when this is not 0, unless
    /// it was asked to complete anyway (`--on-deadline force`).
    #[serde(serialize_with = "as_ms", rename = "over_limit_ms")]
    pub over_limit: Duration,
    /// Raw pages that arrived torn (the guest wrote them while they were
    /// sent from its memory) and were sent again.
    pub torn_pages_resent: u64,
    /// The stopped round as the decision to pause expected it and as it
    /// went: where a pause past the limit came from.
    pub final_round: FinalRound,
}

/// The stopped round: what the decision to pause assumed, and what it
/// sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct FinalRound {
    /// Dirty pages the decision counted on.
    pub expected_pages: u64,
    /// Wire bytes it expected them to take.
    pub expected_bytes: u64,
    /// The link's bandwidth it assumed, bytes/s.
    pub expected_bandwidth_bytes_per_sec: f64,
    /// How long it expected them to take: `expected_bytes` over that
    /// bandwidth plus the encoders' time per page (the last live round's)
    /// for `expected_pages`.
    #[serde(serialize_with = "as_ms", rename = "expected_ms")]
    pub expected: Duration,
    /// Dirty pages the stopped round found (the final collect included).
    pub pages: u64,
    /// Wire bytes it sent.
    pub wire_bytes: u64,
    /// The encoder threads' time on it over their number.
    #[serde(serialize_with = "as_ms", rename = "encode_ms")]
    pub encode: Duration,
}

impl MigrationSummary {
    /// The convergence modes in force, in order: the starting one, then
    /// each `--converge auto` switch, e.g. "auto-converge, dirty-limit
    /// from round 3".
    pub fn converge_modes(&self) -> String {
        describe_converge(self.converge, &self.converge_switches)
    }
}

/// "auto-converge" or "auto-converge, dirty-limit from round 3, ..." for a
/// start mode and its switches.
pub fn describe_converge(
    start: crate::ConvergeMode,
    switches: &[crate::convergence::ConvergeSwitch],
) -> String {
    let mut s = start.as_str().to_owned();
    for sw in switches {
        s.push_str(&format!(", {} from round {}", sw.to, sw.after_round + 1));
    }
    s
}

/// One memory region's digest (see `crate::digest`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RegionDigest {
    /// The region's guest-physical start.
    pub guest_phys_addr: u64,
    /// Its length in bytes.
    pub bytes: u64,
    /// The digest of its pages.
    pub digest: u64,
}

impl RegionDigest {
    /// Pairs a layout's regions with their digests.
    pub fn list(layout: &crate::MemoryLayout, digests: &[u64]) -> Vec<Self> {
        layout
            .regions
            .iter()
            .zip(digests)
            .map(|(r, &digest)| Self {
                guest_phys_addr: r.guest_phys_addr,
                bytes: r.bytes,
                digest,
            })
            .collect()
    }
}

/// The destination's account of a completed migration.
#[derive(Debug, Clone, Serialize)]
pub struct DestinationSummary {
    /// Rounds received, final included.
    pub rounds: u32,
    /// Page entries received.
    pub pages: EncodingCounts,
    /// Bytes received, frame headers included.
    pub wire_bytes: u64,
    /// The same, per lane (lane 0 first).
    pub wire_bytes_per_lane: Vec<u64>,
    /// The memory digest verified.
    pub memory_digest: u64,
    /// The digest of each memory region, each checked against the source's.
    pub region_digests: Vec<RegionDigest>,
    /// When the guest resumed, ns since the Unix epoch (realtime clock).
    pub resumed_at_unix_ns: u64,
    /// Checking the digest.
    #[serde(serialize_with = "as_ms", rename = "verify_ms")]
    pub verify: Duration,
    /// Restoring state.
    #[serde(serialize_with = "as_ms", rename = "restore_ms")]
    pub restore: Duration,
    /// From the Hello to RUNNING.
    #[serde(serialize_with = "as_ms", rename = "total_ms")]
    pub total: Duration,
}
