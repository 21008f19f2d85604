//! When to stop copying: the convergence controller.
//!
//! After every round the source asks [`ConvergenceController::assess`] what
//! to do next, given what the round measured. The whole policy is the one
//! function [`decide`]; the controller only keeps the state it needs across
//! rounds (best bandwidth seen, the previous dirty set, the throttle).
//!
//! When rounds stop shrinking the guest is slowed down one of two ways
//! ([`ConvergeMode`]): **auto-converge** takes the same share of time from
//! every vCPU; **dirty-limit** (like QEMU's `dirty-limit` capability) uses
//! the dirty log's per-vCPU counts (the KVM dirty ring) and slows down only
//! the vCPUs dirtying faster than a per-vCPU limit, each towards that limit
//! ([`plan_dirty_limit`]), so a vCPU that dirties little keeps running at
//! full speed.

use std::time::Duration;

use serde::Serialize;

use crate::encode::PAGE_SIZE;

/// Rounds that moved fewer wire bytes than this do not update the bandwidth
/// estimate: a small round is dominated by latency, not by the link.
pub const MIN_BYTES_FOR_BANDWIDTH: u64 = 1 << 20;

/// A round "shrinks" when it leaves at most this share (in percent) of the
/// previous round's dirty pages.
pub const SHRINK_PERCENT: u64 = 90;

/// How a guest whose rounds stop shrinking is slowed down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConvergeMode {
    /// The controller picks: dirty-limit when the VM has more than one
    /// vCPU and its dirty log counts pages per vCPU, else auto-converge.
    #[default]
    Auto,
    /// Every vCPU loses the same share of its time.
    AutoConverge,
    /// Only the vCPUs dirtying faster than the per-vCPU limit are slowed
    /// down, each towards the limit. Needs per-vCPU dirty counts (the KVM
    /// dirty ring).
    DirtyLimit,
}

/// A switch of `--converge auto` between the two modes mid-migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ConvergeSwitch {
    /// The live round (from 0) after which the mode changed: the next
    /// round ran in `to`.
    pub after_round: u32,
    /// The mode from then on (`auto-converge` or `dirty-limit`).
    pub to: ConvergeMode,
}

impl ConvergeMode {
    /// The mode in force for a VM of `vcpus` whose dirty log does
    /// (`per_vcpu_counts`) or does not count pages per vCPU; `None` when
    /// dirty-limit was asked for and cannot work.
    pub fn resolve(self, vcpus: usize, per_vcpu_counts: bool) -> Option<Self> {
        match self {
            Self::Auto if vcpus > 1 && per_vcpu_counts => Some(Self::DirtyLimit),
            Self::Auto | Self::AutoConverge => Some(Self::AutoConverge),
            Self::DirtyLimit => per_vcpu_counts.then_some(Self::DirtyLimit),
        }
    }

    /// The name on the command line and in summaries.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::AutoConverge => "auto-converge",
            Self::DirtyLimit => "dirty-limit",
        }
    }
}

impl std::fmt::Display for ConvergeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ConvergeMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "auto-converge" => Ok(Self::AutoConverge),
            "dirty-limit" => Ok(Self::DirtyLimit),
            _ => Err(format!(
                "`{s}`: want `auto-converge`, `dirty-limit` or `auto`"
            )),
        }
    }
}

/// The knobs of convergence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ConvergencePolicy {
    /// Stop-and-copy once the expected downtime is at most this.
    pub max_downtime: Duration,
    /// Once the expected downtime fits `max_downtime`, keep copying while
    /// it is above this and every round at least halves the dirty set: such
    /// a round is short (it sends what the pause would have sent) and makes
    /// the pause shorter. At most log2(dirty pages) extra rounds.
    /// `max_downtime` or more turns this off.
    pub settle_downtime: Duration,
    /// Give up (guest keeps running on the source) once the migration has
    /// run this long without converging. `None`: never give up.
    pub deadline: Option<Duration>,
    /// Throttle the vCPUs when rounds stop shrinking (the way `converge`
    /// says); off: never throttle.
    pub auto_converge: bool,
    /// How to throttle: the whole guest or only the fastest-dirtying vCPUs.
    pub converge: ConvergeMode,
    /// Dirty-limit: the dirty rate each vCPU is slowed down towards, pages
    /// per second. `None`: half the link's bandwidth estimate (in full
    /// pages) shared evenly among the vCPUs.
    pub vcpu_dirty_limit: Option<u64>,
    /// First throttle step, percent of vCPU time taken away.
    pub throttle_initial: u8,
    /// Added per further step.
    pub throttle_step: u8,
    /// Never throttle beyond this.
    pub throttle_max: u8,
    /// What to do when the deadline passes and the expected downtime still
    /// does not fit `max_downtime`, and whether a pause may run past it.
    pub on_deadline: OnDeadline,
}

/// What happens when `max_downtime` cannot be met (like Nova's
/// `live_migration_timeout_action`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDeadline {
    /// Give up at the deadline with the guest running on the source. The
    /// pause's budget is `max_downtime` (plus the pause margin, after which
    /// it is aborted before GO).
    #[default]
    Abort,
    /// Stop and copy at the deadline anyway; the pause's budget is then the
    /// expected downtime, and the summary says by how much the limit was
    /// exceeded.
    Force,
}

impl Default for ConvergencePolicy {
    fn default() -> Self {
        Self {
            max_downtime: Duration::from_millis(20),
            settle_downtime: Duration::from_millis(1),
            deadline: Some(Duration::from_secs(300)),
            auto_converge: true,
            converge: ConvergeMode::Auto,
            vcpu_dirty_limit: None,
            throttle_initial: 20,
            throttle_step: 10,
            throttle_max: 99,
            on_deadline: OnDeadline::Abort,
        }
    }
}

/// What one round measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RoundMeasurement {
    /// How long the round took (first page read to last page written).
    pub duration: Duration,
    /// Dirty pages the round read (pages found unchanged included).
    pub pages_read: u64,
    /// The encoder threads' time on the round's pages (reading, hashing,
    /// compressing, framing; waits for room on the lanes excluded) over
    /// their number: the round's encoding as a stretch of wall time, all
    /// of them at work.
    pub encode_time: Duration,
    /// Pages the round sent (unchanged pages skipped are not counted).
    pub pages_sent: u64,
    /// Bytes the round put on the wire, frame headers included.
    pub wire_bytes: u64,
    /// Pages dirtied while the round ran: the next round's work.
    pub dirty_pages: u64,
    /// Time since the migration started.
    pub elapsed: Duration,
}

/// What to do after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Pause the guest and send what is left.
    StopAndCopy,
    /// Run another round as is.
    Continue,
    /// Run another round with the vCPUs throttled to `percent`.
    Throttle {
        /// Share of vCPU time taken away.
        percent: u8,
    },
    /// Dirty-limit: run another round with the per-vCPU throttles changed
    /// (raised on the vCPUs dirtying fastest, lowered on those that calmed
    /// down; each vCPU's throttle:
    /// [`ConvergenceController::vcpu_throttles`]).
    LimitVcpus {
        /// vCPUs whose throttle changed.
        vcpus: u32,
        /// The highest per-vCPU throttle now, percent.
        max_percent: u8,
    },
    /// Stop migrating; the guest keeps running on the source.
    GiveUp,
}

/// A decision with the figures it was made from (what progress events
/// report).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Assessment {
    /// Pages dirtied per second during the round.
    pub dirty_rate_pages_per_sec: f64,
    /// The link's bandwidth estimate, bytes per second.
    pub bandwidth_bytes_per_sec: f64,
    /// Wire bytes the dirty pages are expected to take.
    pub bytes_left: u64,
    /// `bytes_left / bandwidth`, plus the encoders' time for the dirty
    /// pages at the round's time per page read (see [`decide`]).
    pub expected_downtime: Duration,
    /// True when the round left fewer dirty pages than the one before.
    pub shrinking: bool,
    /// The decision.
    pub decision: Decision,
}

/// The controller's memory across rounds: what [`decide`] reads besides the
/// round itself.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ControllerState {
    /// Best bandwidth seen on a round of at least
    /// [`MIN_BYTES_FOR_BANDWIDTH`], bytes/s (0 before the first).
    pub bandwidth: f64,
    /// Dirty pages the previous round left (`None` after round 0).
    pub previous_dirty_pages: Option<u64>,
    /// Current throttle, percent.
    pub throttle: u8,
}

/// The convergence decision, in order:
/// 1. The bandwidth estimate is the best seen on a round that moved at least
///    [`MIN_BYTES_FOR_BANDWIDTH`] (this round's figure if none did yet).
/// 2. Bytes left = dirty pages × this round's wire bytes per page sent (a
///    full page plus header when it sent nothing), so compression and XOR
///    deltas count. Expected downtime = bytes left / bandwidth + dirty
///    pages × this round's encoding time per page read. The two add up
///    rather than overlap: a final round is a few batches, each encoded
///    before it goes out, and on a slow link that compresses, the codecs'
///    time is as long as the wire's.
/// 3. It fits `max_downtime` → **stop-and-copy** (even past the deadline:
///    the last round is cheap), unless it is still above `settle_downtime`,
///    the round at least halved the dirty set (round 0: left at most half
///    of the pages it sent) and the deadline has not passed → **continue**
///    (settling).
/// 4. Past the deadline → **give up** ([`OnDeadline::Abort`]) or
///    **stop-and-copy** anyway ([`OnDeadline::Force`]).
/// 5. The round did not shrink the dirty set below [`SHRINK_PERCENT`] % of
///    the previous one and auto-converge is on → **throttle** one step
///    (`throttle_initial`, then `+throttle_step`, capped at `throttle_max`;
///    once at the cap, continue).
/// 6. Otherwise **continue**.
pub fn decide(
    policy: &ConvergencePolicy,
    state: &ControllerState,
    round: &RoundMeasurement,
) -> Assessment {
    let secs = round.duration.as_secs_f64().max(1e-6);
    let round_bandwidth = round.wire_bytes as f64 / secs;
    let bandwidth = if round.wire_bytes >= MIN_BYTES_FOR_BANDWIDTH || state.bandwidth == 0.0 {
        state.bandwidth.max(round_bandwidth)
    } else {
        state.bandwidth
    };
    let bytes_per_page = if round.pages_sent == 0 {
        (PAGE_SIZE + crate::encode::batch::ENTRY_BYTES) as u64
    } else {
        round.wire_bytes.div_ceil(round.pages_sent)
    };
    let bytes_left = round.dirty_pages.saturating_mul(bytes_per_page);
    let encoding_left = if round.pages_read == 0 {
        Duration::ZERO
    } else {
        Duration::try_from_secs_f64(
            round.encode_time.as_secs_f64() * round.dirty_pages as f64 / round.pages_read as f64,
        )
        .unwrap_or(Duration::MAX)
    };
    let expected_downtime = if bytes_left == 0 {
        Duration::ZERO
    } else if bandwidth <= 0.0 {
        Duration::MAX
    } else {
        Duration::try_from_secs_f64(bytes_left as f64 / bandwidth)
            .unwrap_or(Duration::MAX)
            .saturating_add(encoding_left)
    };
    let shrinking = match state.previous_dirty_pages {
        None => true,
        Some(prev) => round.dirty_pages * 100 < prev * SHRINK_PERCENT || round.dirty_pages == 0,
    };
    // Round 0 is compared with what it sent (all of memory): the first
    // dirty set is small next to it, and a pause that carries it (it may
    // be most of `max_downtime`) is what settling avoids.
    let halving = round.dirty_pages.saturating_mul(2)
        <= state.previous_dirty_pages.unwrap_or(round.pages_sent);
    let past_deadline = policy.deadline.is_some_and(|d| round.elapsed >= d);
    let settling = expected_downtime > policy.settle_downtime && halving && !past_deadline;
    let decision = if expected_downtime <= policy.max_downtime && !settling {
        Decision::StopAndCopy
    } else if expected_downtime <= policy.max_downtime {
        Decision::Continue
    } else if past_deadline {
        match policy.on_deadline {
            OnDeadline::Abort => Decision::GiveUp,
            OnDeadline::Force => Decision::StopAndCopy,
        }
    } else if !shrinking && policy.auto_converge && state.throttle < policy.throttle_max {
        let next = if state.throttle == 0 {
            policy.throttle_initial
        } else {
            state.throttle.saturating_add(policy.throttle_step)
        };
        Decision::Throttle {
            percent: next.min(policy.throttle_max),
        }
    } else {
        Decision::Continue
    };
    Assessment {
        dirty_rate_pages_per_sec: round.dirty_pages as f64 / secs,
        bandwidth_bytes_per_sec: bandwidth,
        bytes_left,
        expected_downtime,
        shrinking,
        decision,
    }
}

/// Dirty-limit leaves a throttle alone while its vCPU dirties at least this
/// share (percent) of the limit: below it, the throttle comes down.
pub const LOWER_BELOW_PERCENT: u64 = 50;

/// `--converge auto` moves from auto-converge to dirty-limit once one vCPU
/// dirtied at least this share (percent) of a round's pages...
pub const DOMINANT_ENTER_PERCENT: u64 = 70;

/// ...and back to auto-converge once the busiest vCPU dirtied less than
/// this share (percent): the gap between the two keeps a guest near the
/// line from switching every round.
pub const DOMINANT_LEAVE_PERCENT: u64 = 55;

/// Dirty-limit's per-vCPU step after every live round, like QEMU's
/// `dirtylimit_set_throttle`: a vCPU's rate in the round is
/// `dirty_pages[i]` over `duration`, and its unthrottled rate is taken as
/// rate / (1 − throttle) (its rate scales with the time it runs).
/// - `raise` ([`decide`] asked for more throttle): each vCPU above `limit`
///   pages/s gets the throttle that brings it to the limit, and at least
///   one policy step more than it had (a working set smaller than the rate
///   understates it), capped at `throttle_max`. When none is above the
///   limit yet the rounds do not shrink, the fastest one (ties: the lowest
///   index) takes the step.
/// - Always: a throttled vCPU whose unthrottled rate is below
///   [`LOWER_BELOW_PERCENT`] % of the limit (its guest calmed down) comes
///   down one policy step a round, and at once if it dirtied nothing, as
///   QEMU lowers a vCPU's throttle when its rate falls below its quota. A
///   vCPU still above that keeps its throttle: the per-round estimate
///   understates small working sets, so lowering it there would undo the
///   steps that raised it.
///
/// Returns the new throttles.
pub fn plan_dirty_limit(
    policy: &ConvergencePolicy,
    current: &[u8],
    dirty_pages: &[u64],
    duration: Duration,
    limit: f64,
    raise: bool,
) -> Vec<u8> {
    let secs = duration.as_secs_f64().max(1e-6);
    let step = |cur: u8| {
        if cur == 0 {
            policy.throttle_initial
        } else {
            cur.saturating_add(policy.throttle_step)
        }
    };
    let unthrottled = |cur: u8, rate: f64| rate / (f64::from(100 - cur.min(99)) / 100.0);
    // The throttle that brings a vCPU at `rate` under `cur` to the limit.
    let at_limit = |cur: u8, rate: f64| -> u8 {
        (100.0 * (1.0 - limit / unthrottled(cur, rate)))
            .ceil()
            .clamp(0.0, 99.0) as u8
    };
    let mut next: Vec<u8> = current.to_vec();
    next.resize(dirty_pages.len().max(current.len()), 0);
    let mut any = false;
    let mut lowered = vec![false; next.len()];
    for (i, &pages) in dirty_pages.iter().enumerate() {
        let rate = pages as f64 / secs;
        let cur = next[i];
        if raise && rate > limit && cur < policy.throttle_max {
            next[i] = at_limit(cur, rate).max(step(cur)).min(policy.throttle_max);
            any = true;
        } else if cur > 0 && pages == 0 {
            next[i] = 0;
            lowered[i] = true;
        } else if cur > 0 && unthrottled(cur, rate) * 100.0 < limit * LOWER_BELOW_PERCENT as f64 {
            next[i] = cur.saturating_sub(policy.throttle_step);
            lowered[i] = true;
        }
    }
    if raise && !any {
        // The step goes to the fastest vCPU not just found quiet.
        let fastest = dirty_pages
            .iter()
            .enumerate()
            .filter(|&(i, &p)| p > 0 && !lowered[i] && next[i] < policy.throttle_max)
            .max_by_key(|&(i, &p)| (p, std::cmp::Reverse(i)));
        if let Some((i, _)) = fastest {
            next[i] = step(next[i]).min(policy.throttle_max);
        }
    }
    next
}

/// Under `--converge auto`, the mode after a round whose per-vCPU dirty
/// counts are `dirty_pages`, in `current` mode: dirty-limit once one vCPU
/// dirtied at least [`DOMINANT_ENTER_PERCENT`] % of the pages,
/// auto-converge once the busiest dirtied less than
/// [`DOMINANT_LEAVE_PERCENT`] %; in between, or when nothing was dirtied
/// or fewer than two vCPUs are counted, `current`.
pub fn auto_mode(current: ConvergeMode, dirty_pages: &[u64]) -> ConvergeMode {
    let total: u64 = dirty_pages.iter().sum();
    let busiest = dirty_pages.iter().copied().max().unwrap_or(0);
    if dirty_pages.len() < 2 || total == 0 {
        return current;
    }
    let share = u128::from(busiest) * 100;
    let total = u128::from(total);
    if share >= total * u128::from(DOMINANT_ENTER_PERCENT) {
        ConvergeMode::DirtyLimit
    } else if share < total * u128::from(DOMINANT_LEAVE_PERCENT) {
        ConvergeMode::AutoConverge
    } else {
        current
    }
}

/// How the controller slows the guest down, and what it has set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slowdown {
    /// Auto-converge: every vCPU loses the same share of its time
    /// ([`ControllerState::throttle`]).
    AutoConverge,
    /// Dirty-limit: each vCPU's own throttle, percent (index = vCPU).
    DirtyLimit {
        /// Each vCPU's throttle in force.
        vcpu_throttles: Vec<u8>,
    },
}

/// Keeps [`ControllerState`] across rounds and applies [`decide`].
#[derive(Debug, Clone)]
pub struct ConvergenceController {
    policy: ConvergencePolicy,
    state: ControllerState,
    /// The mode in force and its throttles.
    slowdown: Slowdown,
    /// vCPUs of the VM.
    vcpus: usize,
    /// `--converge auto` over per-vCPU dirty counts and several vCPUs: the
    /// controller may switch mode between rounds ([`auto_mode`]).
    switchable: bool,
    /// Rounds assessed so far.
    rounds: u32,
    /// The mode switches made, in order.
    switches: Vec<ConvergeSwitch>,
}

impl ConvergenceController {
    /// A controller for `policy`, before round 0: auto-converge over one
    /// vCPU until [`Self::start`] says otherwise.
    pub fn new(policy: ConvergencePolicy) -> Self {
        Self {
            policy,
            state: ControllerState::default(),
            slowdown: Slowdown::AutoConverge,
            vcpus: 1,
            switchable: false,
            rounds: 0,
            switches: Vec::new(),
        }
    }

    /// Start in `mode` (resolved: auto-converge or dirty-limit) over
    /// `vcpus` vCPUs, all unthrottled. With `--converge auto`, several
    /// vCPUs and a log that counts pages per vCPU (`per_vcpu_counts`), the
    /// controller then moves between the two modes as the counts say.
    pub fn start(&mut self, mode: ConvergeMode, vcpus: usize, per_vcpu_counts: bool) {
        self.vcpus = vcpus.max(1);
        self.switchable =
            self.policy.converge == ConvergeMode::Auto && per_vcpu_counts && self.vcpus > 1;
        self.slowdown = match mode {
            ConvergeMode::DirtyLimit => Slowdown::DirtyLimit {
                vcpu_throttles: vec![0; self.vcpus],
            },
            ConvergeMode::Auto | ConvergeMode::AutoConverge => Slowdown::AutoConverge,
        };
    }

    /// Throttle with dirty-limit from now on, over `vcpus` vCPUs (all
    /// unthrottled), never switching.
    pub fn use_dirty_limit(&mut self, vcpus: usize) {
        self.start(ConvergeMode::DirtyLimit, vcpus, false);
        self.switchable = false;
    }

    /// The mode in force.
    pub fn mode(&self) -> ConvergeMode {
        match self.slowdown {
            Slowdown::AutoConverge => ConvergeMode::AutoConverge,
            Slowdown::DirtyLimit { .. } => ConvergeMode::DirtyLimit,
        }
    }

    /// The switches `--converge auto` made between the modes, in order
    /// (empty when the starting mode stayed in force throughout).
    pub fn switches(&self) -> &[ConvergeSwitch] {
        &self.switches
    }

    /// The mode in force and its throttles.
    pub fn slowdown(&self) -> &Slowdown {
        &self.slowdown
    }

    /// Dirty-limit: each vCPU's throttle in force, percent (empty with
    /// auto-converge).
    pub fn vcpu_throttles(&self) -> &[u8] {
        match &self.slowdown {
            Slowdown::AutoConverge => &[],
            Slowdown::DirtyLimit { vcpu_throttles } => vcpu_throttles,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &ConvergencePolicy {
        &self.policy
    }

    /// Replaces the policy (a retune while the migration runs); what the
    /// rounds measured so far is kept.
    pub fn set_policy(&mut self, policy: ConvergencePolicy) {
        self.policy = policy;
    }

    /// The current throttle, percent (dirty-limit: the highest vCPU's).
    pub fn throttle(&self) -> u8 {
        self.state.throttle
    }

    /// The per-vCPU dirty rate dirty-limit aims at, pages/s, given the
    /// bandwidth estimate.
    pub fn vcpu_dirty_limit(&self, bandwidth_bytes_per_sec: f64) -> f64 {
        match self.policy.vcpu_dirty_limit {
            Some(l) => l as f64,
            None => {
                let page = (PAGE_SIZE + crate::encode::batch::ENTRY_BYTES) as f64;
                bandwidth_bytes_per_sec / page / 2.0 / self.vcpus as f64
            }
        }
    }

    /// Whether [`Self::assess`] would stop and copy after `round`, without
    /// remembering anything (the source then makes sure the destination
    /// has caught up and measures again before it decides for good).
    pub fn would_stop(&self, round: &RoundMeasurement) -> bool {
        decide(&self.policy, &self.state, round).decision == Decision::StopAndCopy
    }

    /// Under `--converge auto`, switch mode if the round's per-vCPU counts
    /// say so ([`auto_mode`]). Auto-converge's throttle becomes every
    /// vCPU's (dirty-limit then lowers the quiet ones); dirty-limit's
    /// highest throttle becomes the whole guest's. Returns the throttle the
    /// whole guest now needs when it went to auto-converge.
    fn switch_mode(&mut self, vcpu_dirty_pages: &[u64]) -> Option<u8> {
        if !self.switchable {
            return None;
        }
        let next = auto_mode(self.mode(), vcpu_dirty_pages);
        if next == self.mode() {
            return None;
        }
        tracing::info!(from = %self.mode(), to = %next, ?vcpu_dirty_pages, "convergence mode switched");
        self.switches.push(ConvergeSwitch {
            after_round: self.rounds.saturating_sub(1),
            to: next,
        });
        match next {
            ConvergeMode::DirtyLimit => {
                self.slowdown = Slowdown::DirtyLimit {
                    vcpu_throttles: vec![self.state.throttle; self.vcpus],
                };
                None
            }
            ConvergeMode::Auto | ConvergeMode::AutoConverge => {
                self.slowdown = Slowdown::AutoConverge;
                Some(self.state.throttle)
            }
        }
    }

    /// Decide after a round, and remember what the next decision needs.
    /// `vcpu_dirty_pages`: pages each vCPU dirtied during the round, when
    /// the dirty log counts them (dirty-limit needs them; with none, a
    /// dirty-limit step becomes a whole-guest throttle step).
    pub fn assess(&mut self, round: &RoundMeasurement, vcpu_dirty_pages: &[u64]) -> Assessment {
        let mut assessment = decide(&self.policy, &self.state, round);
        self.rounds = self.rounds.saturating_add(1);
        self.state.bandwidth = assessment.bandwidth_bytes_per_sec;
        self.state.previous_dirty_pages = Some(round.dirty_pages);
        if matches!(
            assessment.decision,
            Decision::StopAndCopy | Decision::GiveUp
        ) {
            return assessment;
        }
        let to_whole = self.switch_mode(vcpu_dirty_pages);
        let raise = matches!(assessment.decision, Decision::Throttle { .. });
        let limit = self.vcpu_dirty_limit(assessment.bandwidth_bytes_per_sec);
        match &mut self.slowdown {
            Slowdown::DirtyLimit { vcpu_throttles } if !vcpu_dirty_pages.is_empty() => {
                let next = plan_dirty_limit(
                    &self.policy,
                    vcpu_throttles,
                    vcpu_dirty_pages,
                    round.duration,
                    limit,
                    raise,
                );
                let changed = next
                    .iter()
                    .zip(vcpu_throttles.iter().chain(std::iter::repeat(&0)))
                    .filter(|(n, c)| n != c)
                    .count();
                *vcpu_throttles = next;
                let max_percent = vcpu_throttles.iter().copied().max().unwrap_or(0);
                self.state.throttle = max_percent;
                assessment.decision = if changed == 0 {
                    Decision::Continue
                } else {
                    Decision::LimitVcpus {
                        vcpus: u32::try_from(changed).unwrap_or(u32::MAX),
                        max_percent,
                    }
                };
            }
            Slowdown::DirtyLimit { vcpu_throttles } => {
                // No per-vCPU counts: a dirty-limit step is a whole-guest step.
                if let Decision::Throttle { percent } = assessment.decision {
                    self.state.throttle = percent;
                    vcpu_throttles.iter_mut().for_each(|t| *t = percent);
                }
            }
            Slowdown::AutoConverge => {
                if let Decision::Throttle { percent } = assessment.decision {
                    self.state.throttle = percent;
                } else if let Some(percent) = to_whole.filter(|&p| p > 0) {
                    assessment.decision = Decision::Throttle { percent };
                }
            }
        }
        assessment
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;
    const MIB: u64 = 1 << 20;

    fn round(
        duration_ms: u64,
        pages_sent: u64,
        wire_bytes: u64,
        dirty_pages: u64,
        elapsed_ms: u64,
    ) -> RoundMeasurement {
        RoundMeasurement {
            duration: MS(duration_ms),
            pages_read: pages_sent,
            encode_time: Duration::ZERO,
            pages_sent,
            wire_bytes,
            dirty_pages,
            elapsed: MS(elapsed_ms),
        }
    }

    fn state(bandwidth: f64, previous: Option<u64>, throttle: u8) -> ControllerState {
        ControllerState {
            bandwidth,
            previous_dirty_pages: previous,
            throttle,
        }
    }

    #[test]
    fn decision_table() {
        let policy = ConvergencePolicy::default();
        let no_auto = ConvergencePolicy {
            auto_converge: false,
            ..policy
        };
        // 1 GB/s link; raw pages (4107 wire bytes each).
        let gbps = 1e9;
        let cases: Vec<(
            &str,
            ConvergencePolicy,
            ControllerState,
            RoundMeasurement,
            Decision,
        )> = vec![
            (
                "idle after round 0: nothing left",
                policy,
                state(0.0, None, 0),
                round(1000, 262_144, 1 << 30, 0, 1000),
                Decision::StopAndCopy,
            ),
            (
                "round 0 left 17 ms of pages: settle instead of pausing on them",
                policy,
                state(0.0, None, 0),
                round(1000, 262_144, 1 << 30, 4_371, 1000),
                Decision::Continue,
            ),
            (
                "round 0 left under 1 ms of pages: stop",
                policy,
                state(0.0, None, 0),
                round(1000, 262_144, 1 << 30, 100, 1000),
                Decision::StopAndCopy,
            ),
            (
                "few pages left fit 20 ms, no longer halving",
                policy,
                state(gbps, Some(2_100), 0),
                round(100, 10_000, 41_070_000, 2_000, 5000),
                Decision::StopAndCopy,
            ),
            (
                "fits 20 ms but still halving: settle with another round",
                policy,
                state(gbps, Some(10_000), 0),
                round(100, 10_000, 41_070_000, 2_000, 5000),
                Decision::Continue,
            ),
            (
                "settled below 1 ms: stop",
                policy,
                state(gbps, Some(2_000), 0),
                round(8, 2_000, 8_214_000, 200, 5000),
                Decision::StopAndCopy,
            ),
            (
                "halving but past the deadline: stop rather than settle",
                policy,
                state(gbps, Some(10_000), 0),
                round(100, 10_000, 41_070_000, 2_000, 300_000),
                Decision::StopAndCopy,
            ),
            (
                "settling off (settle = max downtime)",
                ConvergencePolicy {
                    settle_downtime: Duration::from_millis(20),
                    ..policy
                },
                state(gbps, Some(10_000), 0),
                round(100, 10_000, 41_070_000, 2_000, 5000),
                Decision::StopAndCopy,
            ),
            (
                "too many left but shrinking: continue",
                policy,
                state(gbps, Some(100_000), 0),
                round(400, 100_000, 410_700_000, 20_000, 5000),
                Decision::Continue,
            ),
            (
                "not shrinking: first throttle step",
                policy,
                state(gbps, Some(20_000), 0),
                round(100, 20_000, 82_140_000, 19_500, 5000),
                Decision::Throttle { percent: 20 },
            ),
            (
                "not shrinking again: next step",
                policy,
                state(gbps, Some(20_000), 20),
                round(100, 20_000, 82_140_000, 19_500, 5000),
                Decision::Throttle { percent: 30 },
            ),
            (
                "step capped at the maximum",
                policy,
                state(gbps, Some(20_000), 95),
                round(100, 20_000, 82_140_000, 19_500, 5000),
                Decision::Throttle { percent: 99 },
            ),
            (
                "at the cap: continue",
                policy,
                state(gbps, Some(20_000), 99),
                round(100, 20_000, 82_140_000, 19_500, 5000),
                Decision::Continue,
            ),
            (
                "auto-converge off: continue",
                no_auto,
                state(gbps, Some(20_000), 0),
                round(100, 20_000, 82_140_000, 19_500, 5000),
                Decision::Continue,
            ),
            (
                "past the deadline: give up",
                no_auto,
                state(gbps, Some(20_000), 0),
                round(100, 20_000, 82_140_000, 19_500, 300_000),
                Decision::GiveUp,
            ),
            (
                "past the deadline, forced: stop and copy anyway",
                ConvergencePolicy {
                    on_deadline: OnDeadline::Force,
                    ..no_auto
                },
                state(gbps, Some(20_000), 0),
                round(100, 20_000, 82_140_000, 19_500, 300_000),
                Decision::StopAndCopy,
            ),
            (
                "past the deadline but fits: stop",
                policy,
                state(gbps, Some(20_000), 0),
                round(100, 20_000, 82_140_000, 100, 300_000),
                Decision::StopAndCopy,
            ),
            (
                "xor deltas make many pages cheap",
                policy,
                state(gbps, Some(60_000), 0),
                round(100, 50_000, 1_500_000, 50_000, 5000),
                Decision::StopAndCopy,
            ),
        ];
        for (name, policy, st, r, expected) in cases {
            let got = decide(&policy, &st, &r);
            assert_eq!(got.decision, expected, "{name}: {got:?}");
        }
    }

    #[test]
    fn small_rounds_do_not_lower_the_bandwidth_estimate() {
        let policy = ConvergencePolicy::default();
        let got = decide(
            &policy,
            &state(1e9, Some(10), 0),
            &round(100, 10, 41_070, 10, 1000),
        );
        assert_eq!(got.bandwidth_bytes_per_sec, 1e9);
    }

    #[test]
    fn the_first_round_sets_the_bandwidth_even_when_small() {
        let policy = ConvergencePolicy::default();
        let got = decide(
            &policy,
            &state(0.0, None, 0),
            &round(1000, 10, 500_000, 10, 1000),
        );
        assert_eq!(got.bandwidth_bytes_per_sec, 500_000.0);
    }

    #[test]
    fn expected_downtime_is_bytes_left_over_bandwidth() {
        let policy = ConvergencePolicy::default();
        // 100 MiB/s, 4 KiB per page on the wire, 2560 pages = 10 MiB: 100 ms.
        let got = decide(
            &policy,
            &state(100.0 * MIB as f64, Some(100_000), 0),
            &round(1000, 1000, 4096 * 1000, 2560, 1000),
        );
        assert_eq!(got.bytes_left, 10 * MIB);
        assert_eq!(got.expected_downtime, MS(100));
        assert_eq!(got.dirty_rate_pages_per_sec, 2560.0);
    }

    #[test]
    fn expected_downtime_adds_the_encoders_time_for_the_pages_left() {
        let policy = ConvergencePolicy {
            max_downtime: MS(8),
            ..ConvergencePolicy::default()
        };
        // 50 MiB/s, 1 KiB per page on the wire (compressed): 250 pages
        // take 4.88 ms on the link; the encoders took 20 ms for 1000 pages,
        // so 5 ms for 250. The previous round left 300: not halving.
        let encoded = RoundMeasurement {
            encode_time: MS(20),
            ..round(100, 1000, 1000 * 1024, 250, 1000)
        };
        let link_only = RoundMeasurement {
            encode_time: Duration::ZERO,
            ..encoded
        };
        let at = state(50.0 * MIB as f64, Some(300), 0);
        let without = decide(&policy, &at, &link_only);
        assert_eq!(without.expected_downtime, Duration::from_nanos(4_882_812));
        assert_eq!(without.decision, Decision::StopAndCopy);
        let with = decide(&policy, &at, &encoded);
        assert_eq!(with.bytes_left, without.bytes_left);
        assert_eq!(with.expected_downtime, Duration::from_nanos(9_882_812));
        assert_eq!(with.decision, Decision::Continue);
        // Pages read but not sent (unchanged) count: the time is per page
        // read, as the final round reads every dirty page.
        let half_unchanged = RoundMeasurement {
            pages_read: 2000,
            ..encoded
        };
        let got = decide(&policy, &at, &half_unchanged);
        assert_eq!(got.expected_downtime, Duration::from_nanos(7_382_812));
    }

    #[test]
    fn the_controller_walks_up_the_throttle_and_remembers_it() {
        let mut c = ConvergenceController::new(ConvergencePolicy::default());
        let stuck = round(100, 20_000, 82_140_000, 20_000, 1000);
        assert_eq!(
            c.assess(&stuck, &[]).decision,
            Decision::Continue,
            "round 0 has nothing to compare with"
        );
        assert_eq!(
            c.assess(&stuck, &[]).decision,
            Decision::Throttle { percent: 20 }
        );
        assert_eq!(
            c.assess(&stuck, &[]).decision,
            Decision::Throttle { percent: 30 }
        );
        assert_eq!(c.throttle(), 30);
    }

    #[test]
    fn dirty_limit_slows_only_the_vcpus_above_the_limit() {
        let policy = ConvergencePolicy::default();
        // 1 s round, limit 1000 pages/s: vCPU 0 dirties 10 000/s
        // (unthrottled), vCPU 1 500/s, vCPU 2 nothing.
        let next = plan_dirty_limit(
            &policy,
            &[0, 0, 0],
            &[10_000, 500, 0],
            MS(1000),
            1000.0,
            true,
        );
        assert_eq!(next, vec![90, 0, 0]);
        // Already at 50 % and still 2000/s: unthrottled ~4000/s, so 75 %.
        let next = plan_dirty_limit(&policy, &[50, 0], &[2000, 10], MS(1000), 1000.0, true);
        assert_eq!(next, vec![75, 0]);
        // Just above the limit: at least one policy step.
        let next = plan_dirty_limit(&policy, &[0, 0], &[1100, 0], MS(1000), 1000.0, true);
        assert_eq!(next, vec![policy.throttle_initial, 0]);
        // Capped at the maximum.
        let capped = ConvergencePolicy {
            throttle_max: 80,
            ..policy
        };
        let next = plan_dirty_limit(&capped, &[0], &[1_000_000], MS(1000), 1000.0, true);
        assert_eq!(next, vec![80]);
    }

    #[test]
    fn with_every_vcpu_under_the_limit_the_fastest_takes_a_step() {
        let policy = ConvergencePolicy::default();
        let next = plan_dirty_limit(
            &policy,
            &[0, 0, 0],
            &[300, 900, 900],
            MS(1000),
            1000.0,
            true,
        );
        assert_eq!(next, vec![0, 20, 0]);
        // Nobody dirtying: nobody to slow down.
        let next = plan_dirty_limit(&policy, &[0, 0], &[0, 0], MS(1000), 1000.0, true);
        assert_eq!(next, vec![0, 0]);
    }

    #[test]
    fn the_controller_in_dirty_limit_throttles_the_dirtying_vcpu_only() {
        let mut c = ConvergenceController::new(ConvergencePolicy::default());
        c.use_dirty_limit(2);
        assert_eq!(c.mode(), ConvergeMode::DirtyLimit);
        // 100 ms rounds of 20 000 pages at 821 MB/s: the limit is 50 000
        // pages/s per vCPU; vCPU 0 dirties 200 000/s (so 75 %), vCPU 1
        // nothing.
        let stuck = round(100, 20_000, 82_140_000, 20_000, 1000);
        assert_eq!(c.assess(&stuck, &[20_000, 0]).decision, Decision::Continue);
        let got = c.assess(&stuck, &[20_000, 0]).decision;
        assert!(
            matches!(got, Decision::LimitVcpus { vcpus: 1, max_percent } if max_percent >= 75),
            "{got:?}"
        );
        assert_eq!(c.vcpu_throttles()[1], 0);
        assert!(c.vcpu_throttles()[0] >= 75);
        assert_eq!(c.throttle(), c.vcpu_throttles()[0]);
    }

    #[test]
    fn dirty_limit_lowers_the_throttle_of_a_vcpu_gone_quiet() {
        let policy = ConvergencePolicy::default();
        // Limit 1000 pages/s. vCPU 0 dirtied nothing: lifted at once.
        // vCPU 1 at 60 % dirtied 100/s (250/s unthrottled, below half the
        // limit): down one step. vCPU 2 at 40 % dirtied 600/s (1000/s
        // unthrottled): kept. vCPU 3 was never throttled.
        let next = plan_dirty_limit(
            &policy,
            &[80, 60, 40, 0],
            &[0, 100, 600, 10],
            MS(1000),
            1000.0,
            false,
        );
        assert_eq!(next, vec![0, 50, 40, 0]);
        // At 90 %, 60/s is 600/s unthrottled: above half the limit, kept.
        let next = plan_dirty_limit(&policy, &[90], &[60], MS(1000), 1000.0, false);
        assert_eq!(next, vec![90]);
        // Rounds not shrinking and nobody above the limit: the step goes
        // to the fastest vCPU that is not the one coming down.
        let next = plan_dirty_limit(&policy, &[90, 0], &[20, 30], MS(1000), 1000.0, true);
        assert_eq!(next, vec![80, 20]);
    }

    /// A guest model for the controller: vCPU `i` dirties `rates[i]` pages
    /// per second unthrottled and `rates[i] * (100 - t) / 100` under a
    /// throttle `t`; each round lasts 1 s over a 10 MB/s link (2435 pages).
    fn model_round(c: &mut ConvergenceController, rates: &[u64], second: u64) -> Assessment {
        let throttles = match c.slowdown() {
            Slowdown::DirtyLimit { vcpu_throttles } => vcpu_throttles.clone(),
            Slowdown::AutoConverge => vec![c.throttle(); rates.len()],
        };
        let pages: Vec<u64> = rates
            .iter()
            .zip(&throttles)
            .map(|(&r, &t)| r * u64::from(100 - t) / 100)
            .collect();
        let r = round(1000, 2435, 10_000_000, pages.iter().sum(), second * 1000);
        c.assess(&r, &pages)
    }

    #[test]
    fn the_controller_lowers_dirty_limit_once_the_hot_vcpu_calms_down() {
        let mut c = ConvergenceController::new(ConvergencePolicy {
            vcpu_dirty_limit: Some(1000),
            ..ConvergencePolicy::default()
        });
        c.use_dirty_limit(2);
        // vCPU 0 hot, vCPU 1 under the limit: only vCPU 0 is slowed.
        for s in 0..5 {
            model_round(&mut c, &[20_000, 900], s);
        }
        let hot = c.vcpu_throttles()[0];
        assert!(hot >= 90, "{:?}", c.vcpu_throttles());
        // vCPU 0 calms down to 100 pages/s: its throttle comes down, a
        // step a round, to nothing; the rounds still do not shrink, so
        // vCPU 1 takes the steps up.
        let mut seen = vec![hot];
        for s in 5..20 {
            model_round(&mut c, &[100, 900], s);
            seen.push(c.vcpu_throttles()[0]);
        }
        assert!(seen.windows(2).all(|w| w[1] <= w[0]), "{seen:?}");
        assert_eq!(*seen.last().unwrap(), 0, "{seen:?}");
        assert!(c.vcpu_throttles()[1] > 0, "{:?}", c.vcpu_throttles());
        assert_eq!(c.throttle(), c.vcpu_throttles()[1]);
    }

    #[test]
    fn auto_mode_follows_the_busiest_vcpus_share() {
        use ConvergeMode::*;
        let cases: &[(ConvergeMode, &[u64], ConvergeMode)] = &[
            (AutoConverge, &[9_000, 1_000], DirtyLimit),
            (AutoConverge, &[7_000, 3_000], DirtyLimit),
            (AutoConverge, &[6_900, 3_100], AutoConverge),
            (DirtyLimit, &[6_000, 4_000], DirtyLimit),
            (DirtyLimit, &[5_500, 4_500], DirtyLimit),
            (DirtyLimit, &[5_400, 4_600], AutoConverge),
            (DirtyLimit, &[3_000, 3_000, 3_000, 1_000], AutoConverge),
            (AutoConverge, &[8_000, 1_000, 1_000, 0], DirtyLimit),
            (AutoConverge, &[0, 0], AutoConverge),
            (DirtyLimit, &[0, 0], DirtyLimit),
            (AutoConverge, &[5_000], AutoConverge),
            (DirtyLimit, &[], DirtyLimit),
        ];
        for &(from, counts, to) in cases {
            assert_eq!(auto_mode(from, counts), to, "{from} {counts:?}");
        }
    }

    #[test]
    fn converge_auto_switches_mode_as_the_dirtying_moves() {
        let mut c = ConvergenceController::new(ConvergencePolicy {
            vcpu_dirty_limit: Some(1000),
            ..ConvergencePolicy::default()
        });
        c.start(ConvergeMode::AutoConverge, 2, true);
        // Both vCPUs dirty alike: auto-converge, the whole guest throttled.
        for s in 0..3 {
            model_round(&mut c, &[5_000, 5_000], s);
        }
        assert_eq!(c.mode(), ConvergeMode::AutoConverge);
        let whole = c.throttle();
        assert!(whole > 0);
        assert!(c.vcpu_throttles().is_empty());
        // vCPU 1 goes quiet: dirty-limit, vCPU 0 keeps its throttle (and
        // more), vCPU 1's comes down.
        model_round(&mut c, &[5_000, 10], 3);
        assert_eq!(c.mode(), ConvergeMode::DirtyLimit);
        let t = c.vcpu_throttles().to_vec();
        assert!(t[0] >= whole && t[1] < whole, "{whole} -> {t:?}");
        // Both dirty alike again: back to auto-converge, the whole guest at
        // the highest vCPU throttle.
        let highest = c.throttle();
        let a = model_round(&mut c, &[5_000, 5_000], 4);
        assert_eq!(c.mode(), ConvergeMode::AutoConverge);
        assert!(
            matches!(a.decision, Decision::Throttle { percent } if percent >= highest),
            "{a:?}"
        );
        // A policy that names the mode never switches.
        let mut fixed = ConvergenceController::new(ConvergencePolicy {
            converge: ConvergeMode::AutoConverge,
            ..ConvergencePolicy::default()
        });
        fixed.start(ConvergeMode::AutoConverge, 2, true);
        for s in 0..4 {
            model_round(&mut fixed, &[5_000, 0], s);
        }
        assert_eq!(fixed.mode(), ConvergeMode::AutoConverge);
    }

    #[test]
    fn the_mode_resolves_from_the_vm_and_its_dirty_log() {
        use ConvergeMode::*;
        assert_eq!(Auto.resolve(2, true), Some(DirtyLimit));
        assert_eq!(Auto.resolve(1, true), Some(AutoConverge));
        assert_eq!(Auto.resolve(4, false), Some(AutoConverge));
        assert_eq!(AutoConverge.resolve(4, true), Some(AutoConverge));
        assert_eq!(DirtyLimit.resolve(1, true), Some(DirtyLimit));
        assert_eq!(DirtyLimit.resolve(2, false), None);
        for m in [Auto, AutoConverge, DirtyLimit] {
            assert_eq!(m.as_str().parse::<ConvergeMode>(), Ok(m));
        }
        assert!("dirtylimit".parse::<ConvergeMode>().is_err());
    }

    #[test]
    fn decisions_serialize_for_json_progress() {
        let json = serde_json::to_string(&Decision::LimitVcpus {
            vcpus: 1,
            max_percent: 90,
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"decision":"limit_vcpus","vcpus":1,"max_percent":90}"#
        );
        let json = serde_json::to_string(&Decision::Throttle { percent: 40 }).unwrap();
        assert_eq!(json, r#"{"decision":"throttle","percent":40}"#);
    }
}
