//! Encoder threads: read dirty pages from guest memory and encode them into
//! page batches. They never run on a vCPU thread.
//!
//! Ordering rule (DESIGN.md): a chunk's dirty bits are cleared in the dirty
//! log (re-protected) *before* its pages are read, so a write that lands
//! after the read shows up in the next round.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ferry_dirtylog::DirtyLog;
use ferry_transport::lanes::{LaneQueues, LinkTotals, STRIPE_PAGES};
use ferry_transport::sealed::GatherPart;
use ferry_transport::{lane_for_page, FrameKind, SealedFrame, TransportError, FRAME_HEADROOM};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::digest::PageHashes;
use crate::encode::batch::MAX_BATCH_PAGES;
use crate::encode::page_hash::{copy_hashed, hash_in_place};
use crate::encode::{
    choose_encoding, page_hash, zero_page_hash, BatchBuilder, CodecCosts, EncodingChoice,
    EncodingCounts, EncodingDecision, EncodingInputs, Page, PageEncoder, PageEncoding,
    XorDeltaCache, PAGE_SIZE,
};
use crate::error::MigrationError;
use crate::protocol::PAGE_BATCH_FLAGS;
use crate::vm::GuestMemoryMmap;

/// How often the encoding choice is revisited while pages flow: round 0
/// of a large guest is most of a migration, so one choice per round would
/// come too late.
const DECIDE_EVERY: Duration = Duration::from_millis(50);

/// Probe pages a codec's figures need before they replace the earlier ones.
const MIN_PROBES: u64 = 8;

/// Busy writing time a link figure needs before it replaces the earlier one.
const MIN_LINK_BUSY: Duration = Duration::from_millis(2);

/// New figures count this much against the earlier ones (the rest): enough
/// to follow a change within a few windows, not to jump on one noisy one.
const NEW_WEIGHT: f64 = 0.5;

/// The encoding choice while a migration runs: encoder threads read it
/// per chunk ([`EncodingSelector::choice`]) and report what each chunk
/// cost ([`EncodingSelector::record`]); every [`DECIDE_EVERY`] the figures
/// are folded in and [`choose_encoding`] decides again.
pub(crate) struct EncodingSelector {
    choice: AtomicU8,
    /// [`EncodingInputs::compression_could_pay`] of the last decision.
    compression_could_pay: AtomicBool,
    state: Mutex<SelectorState>,
}

struct SelectorState {
    decision: EncodingDecision,
    window: CostWindow,
    window_start: Instant,
    /// The link meter's totals when the window started.
    link_mark: LinkTotals,
    /// zstd was negotiated: it becomes a choice once its probes measured
    /// it (never on the prior's guess).
    zstd_negotiated: bool,
}

/// What the chunks of one window cost.
#[derive(Default)]
struct CostWindow {
    pages: u64,
    base_ns: u64,
    costs: CodecCosts,
}

/// One codec's probe figures in a [`CodecCosts`]: pages, ns, bytes.
type ProbeFigures = fn(&mut CodecCosts) -> [&mut u64; 3];

fn zstd_probes(c: &mut CodecCosts) -> [&mut u64; 3] {
    [&mut c.zstd_pages, &mut c.zstd_ns, &mut c.zstd_bytes]
}

fn lz4_probes(c: &mut CodecCosts) -> [&mut u64; 3] {
    [&mut c.lz4_pages, &mut c.lz4_ns, &mut c.lz4_bytes]
}

fn blend(old: f64, new: f64) -> f64 {
    old * (1.0 - NEW_WEIGHT) + new * NEW_WEIGHT
}

impl EncodingSelector {
    /// Start from the prior figures ([`EncodingInputs::prior`]) for a link
    /// capped at `cap` bytes/s (if it is), `workers` encoder threads and
    /// LZ4 and zstd negotiated or not.
    pub(crate) fn new(cap: Option<f64>, workers: usize, lz4: bool, zstd: bool) -> Self {
        let mut inputs = EncodingInputs::prior(cap, u32::try_from(workers).unwrap_or(u32::MAX));
        inputs.lz4_allowed = lz4;
        let decision = choose_encoding(&inputs, EncodingChoice::Raw);
        Self {
            choice: AtomicU8::new(decision.choice as u8),
            compression_could_pay: AtomicBool::new(inputs.compression_could_pay()),
            state: Mutex::new(SelectorState {
                decision,
                window: CostWindow::default(),
                window_start: Instant::now(),
                link_mark: LinkTotals::default(),
                zstd_negotiated: zstd,
            }),
        }
    }

    /// The choice in force.
    pub(crate) fn choice(&self) -> EncodingChoice {
        EncodingChoice::from_u8(self.choice.load(Ordering::Relaxed)).unwrap_or(EncodingChoice::Raw)
    }

    /// Whether a page codec could pay for itself on the figures of the
    /// last decision ([`EncodingInputs::compression_could_pay`]).
    pub(crate) fn compression_could_pay(&self) -> bool {
        self.compression_could_pay.load(Ordering::Relaxed)
    }

    /// The last decision and the figures it was made from.
    pub(crate) fn decision(&self) -> EncodingDecision {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .decision
    }

    /// A chunk of `pages` took `base_ns` outside its codecs, which cost
    /// `costs`; `delta_allowed`: the chunk could use XOR deltas.
    fn record(
        &self,
        pages: u64,
        base_ns: u64,
        costs: &CodecCosts,
        delta_allowed: bool,
        out: &LaneQueues,
    ) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.window.pages += pages;
        s.window.base_ns += base_ns;
        s.window.costs.add(costs);
        let changed_rounds = s.decision.inputs.delta_allowed != delta_allowed;
        if s.window_start.elapsed() < DECIDE_EVERY && !changed_rounds {
            return;
        }
        let mut w = std::mem::take(&mut s.window);
        s.window_start = Instant::now();
        // Probes too few to go by carry over until there are enough of
        // them: zstd's are 4x rarer than LZ4's, and both thin out on memory
        // that does not compress (`PageEncoder`).
        for probes in [zstd_probes as ProbeFigures, lz4_probes] {
            let [pages, ns, bytes] = probes(&mut w.costs);
            if *pages < MIN_PROBES {
                let [into_pages, into_ns, into_bytes] = probes(&mut s.window.costs);
                *into_pages = std::mem::take(pages);
                *into_ns = std::mem::take(ns);
                *into_bytes = std::mem::take(bytes);
            }
        }
        let mut inputs = s.decision.inputs;
        inputs.delta_allowed = delta_allowed;
        if w.pages > 0 {
            inputs.base_ns_per_page =
                blend(inputs.base_ns_per_page, w.base_ns as f64 / w.pages as f64);
        }
        let c = &w.costs;
        if c.lz4_pages >= MIN_PROBES {
            let n = c.lz4_pages as f64;
            inputs.lz4_ns_per_page = blend(inputs.lz4_ns_per_page, c.lz4_ns as f64 / n);
            inputs.lz4_bytes_per_page = blend(inputs.lz4_bytes_per_page, c.lz4_bytes as f64 / n);
        }
        if c.zstd_pages >= MIN_PROBES && s.zstd_negotiated {
            let n = c.zstd_pages as f64;
            let (ns, bytes) = (c.zstd_ns as f64 / n, c.zstd_bytes as f64 / n);
            if inputs.zstd_allowed {
                inputs.zstd_ns_per_page = blend(inputs.zstd_ns_per_page, ns);
                inputs.zstd_bytes_per_page = blend(inputs.zstd_bytes_per_page, bytes);
            } else {
                // The first figures: a choice from now on.
                (inputs.zstd_ns_per_page, inputs.zstd_bytes_per_page) = (ns, bytes);
                inputs.zstd_allowed = true;
            }
        }
        if c.xor_pages >= MIN_PROBES {
            let n = c.xor_pages as f64;
            inputs.xor_ns_per_page = blend(inputs.xor_ns_per_page, c.xor_ns as f64 / n);
            inputs.xor_hit_share = blend(inputs.xor_hit_share, c.xor_hits as f64 / n);
            if c.xor_hits > 0 {
                inputs.xor_bytes_per_hit = blend(
                    inputs.xor_bytes_per_hit,
                    c.xor_hit_bytes as f64 / c.xor_hits as f64,
                );
            }
        }
        let now = out.meter().totals();
        let then = s.link_mark;
        let busy_delta = now.busy.saturating_sub(then.busy);
        if busy_delta >= MIN_LINK_BUSY && now.bytes > then.bytes {
            let rate = (now.bytes - then.bytes) as f64 / busy_delta.as_secs_f64();
            inputs.link_bytes_per_sec = blend(inputs.link_bytes_per_sec, rate);
            if let Some(share) = now.cpu_share(&then) {
                inputs.link_cpu_share = blend(inputs.link_cpu_share, share);
            }
            s.link_mark = now;
        }
        // A cap set (or lowered) while pages flow counts at once.
        if let Some(cap) = out.cap() {
            inputs.link_bytes_per_sec = inputs.link_bytes_per_sec.min(cap);
        }
        let decision = choose_encoding(&inputs, s.decision.choice);
        if decision.choice != s.decision.choice {
            tracing::debug!(?decision, "encoding choice changed");
        }
        self.choice.store(decision.choice as u8, Ordering::Relaxed);
        self.compression_could_pay
            .store(inputs.compression_could_pay(), Ordering::Relaxed);
        s.decision = decision;
    }
}

/// Dirty-bitmap words per [`Stretch`]: 16 words = 1024 pages = 4 MiB of
/// guest memory, re-protected with one call. A stretch is exactly one lane
/// stripe, so all its pages travel on one lane.
pub(crate) const CHUNK_WORDS: usize = 16;

const _: () = assert!(CHUNK_WORDS as u64 * 64 == STRIPE_PAGES);

/// A piece of a round's work: one or more stretches of the dirty bitmap,
/// all on one lane ([`lane_for_page`]), encoded into the same batches.
/// A dense stretch is a job of its own; sparse ones (a late round's few
/// pages spread over memory) are grouped up to [`JOB_PAGES`] dirty pages,
/// so a round of scattered pages goes out in full frames, not in one small
/// frame (a lane wake-up, a header, a checksum) per stretch.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub stretches: Vec<Stretch>,
    /// Call `DirtyLog::reprotect` for every stretch's words before
    /// reading any of its pages.
    pub reprotect: bool,
    /// Send every page, even one whose hash matches (round 0).
    pub force: bool,
    /// Use and update the XOR-delta cache.
    pub use_delta: bool,
}

/// [`CHUNK_WORDS`] words of the dirty bitmap: the dirty pages from page
/// `first_page` (a multiple of [`STRIPE_PAGES`]) on.
#[derive(Debug)]
pub(crate) struct Stretch {
    pub first_page: u64,
    pub words: Vec<u64>,
}

/// Dirty pages a job gathers from sparse stretches before it goes to an
/// encoder: a full stretch's worth.
pub(crate) const JOB_PAGES: u64 = STRIPE_PAGES;

/// A round's dirty bitmap as the stretches of each job, in the order the
/// jobs fill: a lane's stretches gather until they hold [`JOB_PAGES`]
/// dirty pages (a dense stretch is a job at once), and what each lane
/// gathered short of that goes last.
pub(crate) fn group_stretches(words: &[u64], lanes: usize) -> Vec<Vec<Stretch>> {
    let mut jobs = Vec::new();
    let mut gathering: Vec<(Vec<Stretch>, u64)> =
        (0..lanes.max(1)).map(|_| (Vec::new(), 0)).collect();
    for (first_page, words) in (0u64..)
        .step_by(CHUNK_WORDS * 64)
        .zip(words.chunks(CHUNK_WORDS))
    {
        let pages: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        if pages == 0 {
            continue;
        }
        let (stretches, gathered) = &mut gathering[lane_for_page(first_page, lanes)];
        stretches.push(Stretch {
            first_page,
            words: words.to_vec(),
        });
        *gathered += pages;
        if *gathered >= JOB_PAGES {
            jobs.push(std::mem::take(stretches));
            *gathered = 0;
        }
    }
    jobs.extend(
        gathering
            .into_iter()
            .map(|(stretches, _)| stretches)
            .filter(|s| !s.is_empty()),
    );
    jobs
}

/// What workers hand back (their batches go straight to the lanes).
#[derive(Debug)]
pub(crate) enum WorkerOutput {
    /// A chunk is done: its batches are queued on its lane.
    ChunkDone {
        /// Dirty pages the chunk covered.
        pages: u64,
        /// How they went.
        counts: EncodingCounts,
        /// Frame bytes queued for it.
        wire_bytes: u64,
        /// The worker's time on it, waits for room on the lane excluded.
        busy: Duration,
    },
    /// A chunk failed; the migration must stop.
    Failed(MigrationError),
}

/// What all workers share.
pub(crate) struct WorkerContext<'a> {
    pub memory: &'a GuestMemoryMmap,
    /// The same guest memory, for batches whose raw pages the lane
    /// writers send straight from it (kept mapped until they are written).
    /// `None`: every page is copied into its batch.
    pub in_place: Option<&'a Arc<GuestMemoryMmap>>,
    pub log: &'a Mutex<Box<dyn DirtyLog>>,
    pub hashes: &'a PageHashes,
    pub cache: &'a XorDeltaCache,
    pub batch_bytes: usize,
    pub cancel: &'a AtomicBool,
    /// The lanes. Each batch's complete frame (checksum included) is
    /// sealed here, off the lane's writer thread.
    pub out: &'a LaneQueues,
    /// LZ4 was negotiated.
    pub lz4: bool,
    /// zstd was negotiated.
    pub zstd: bool,
    /// The encoding choice.
    pub selector: &'a EncodingSelector,
}

/// Queue a finished batch on `lane`; returns the frame's size. The time
/// spent here (waiting for room included) is added to `queue_time`.
fn queue(
    ctx: &WorkerContext<'_>,
    lane: usize,
    batch: BatchBuilder,
    queue_time: &mut Duration,
) -> Result<u64, MigrationError> {
    let t0 = Instant::now();
    let r = queue_batch(ctx, lane, batch);
    *queue_time += t0.elapsed();
    r
}

fn queue_batch(
    ctx: &WorkerContext<'_>,
    lane: usize,
    batch: BatchBuilder,
) -> Result<u64, MigrationError> {
    let (bytes, pages) = batch.finish_in_place();
    let encode_error = |e| MigrationError::Send(TransportError::Encode(e));
    let frame = match ctx.in_place {
        Some(memory) if !pages.is_empty() => {
            let gather = pages
                .iter()
                .map(|p| GatherPart {
                    at: p.at,
                    addr: p.addr,
                    len: PAGE_SIZE,
                })
                .collect();
            let owner: Arc<GuestMemoryMmap> = Arc::clone(memory);
            // SAFETY: each address came from a checked PAGE_SIZE range of
            // `memory` (`BatchBuilder::push_in_place`), whose mappings the
            // frame keeps alive through `owner` until it is written.
            unsafe {
                SealedFrame::seal_gathered(
                    bytes,
                    gather,
                    owner,
                    FrameKind::PageBatch,
                    PAGE_BATCH_FLAGS,
                )
            }
        }
        _ => SealedFrame::seal(bytes, FrameKind::PageBatch, PAGE_BATCH_FLAGS),
    }
    .map_err(encode_error)?;
    let len = frame.wire_len();
    ctx.out
        .send_sealed(lane, frame, ctx.cancel)
        .map_err(MigrationError::Send)?;
    Ok(len as u64)
}

/// Run one worker until the job channel closes or the output channel is
/// dropped.
pub(crate) fn run_worker(
    ctx: &WorkerContext<'_>,
    jobs: &Receiver<Chunk>,
    out: &Sender<WorkerOutput>,
) {
    let mut encoder = PageEncoder::new().with_lz4(ctx.lz4).with_zstd(ctx.zstd);
    let mut spare = None;
    while let Ok(chunk) = jobs.recv() {
        if ctx.cancel.load(Ordering::Relaxed) {
            return;
        }
        match encode_chunk(ctx, &chunk, &mut encoder, &mut spare, out) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let _ = out.send(WorkerOutput::Failed(e));
                return;
            }
        }
    }
}

/// A batch in a recycled buffer: the worker's `spare` (a batch that stayed
/// empty), else one the lane writers sent back, else a new one. A chunk of
/// a late round often sends nothing (its pages unchanged): keeping its
/// buffer saves allocating and zeroing a fresh one for the next chunk.
fn recycled_batch(
    ctx: &WorkerContext<'_>,
    spare: &mut Option<Vec<u8>>,
    capacity: usize,
    headroom: usize,
) -> BatchBuilder {
    let buffer = spare
        .take()
        .or_else(|| ctx.out.spare_buffer())
        .unwrap_or_default();
    BatchBuilder::with_headroom(buffer, capacity, headroom)
}

/// Read guest page `index` into `slot` and return the hash of what was
/// read: in one pass over the page when the CPU allows
/// ([`copy_hashed`]), else a copy and a hash of the copy.
fn read_page_hashed(
    memory: &GuestMemoryMmap,
    index: u64,
    slot: &mut Page,
) -> Result<u64, MigrationError> {
    let bad = || MigrationError::GuestMemory { page: index };
    let addr = GuestAddress(index * PAGE_SIZE as u64);
    let slice = memory.get_slice(addr, PAGE_SIZE).map_err(|_| bad())?;
    let guard = slice.ptr_guard();
    if guard.len() >= PAGE_SIZE {
        // SAFETY: `guard` points at PAGE_SIZE readable bytes of a live
        // mapping of guest memory (`get_slice` checked the range lies inside
        // one region; the mapping lives as long as `memory`, borrowed here);
        // `slot` is a separate buffer of PAGE_SIZE bytes. The guest may
        // write the page meanwhile, as with vm-memory's own copy: the hash
        // is of the bytes copied, and the dirty log sends the page again.
        if let Some(hash) = unsafe { copy_hashed(guard.as_ptr(), slot.as_mut_ptr(), false) } {
            return Ok(hash);
        }
    }
    memory.read_slice(slot, addr).map_err(|_| bad())?;
    Ok(page_hash(slot))
}

/// Hash guest page `index` where it is, in one read-only pass that also
/// tells a zero page: its address, hash and whether it read as zeros.
/// `None` when the CPU cannot (no AVX2) or the page is not one mapped
/// range: the caller copies it instead.
fn hash_page_in_place(
    memory: &GuestMemoryMmap,
    index: u64,
) -> Result<Option<(usize, u64, bool)>, MigrationError> {
    let bad = || MigrationError::GuestMemory { page: index };
    let addr = GuestAddress(index * PAGE_SIZE as u64);
    let slice = memory.get_slice(addr, PAGE_SIZE).map_err(|_| bad())?;
    let guard = slice.ptr_guard();
    if guard.len() < PAGE_SIZE {
        return Ok(None);
    }
    // SAFETY: `guard` points at PAGE_SIZE readable bytes of a live mapping
    // of guest memory (`get_slice` checked the range lies inside one
    // region; the mapping lives as long as `memory`, borrowed here). The
    // guest may write the page meanwhile, as with vm-memory's own reads:
    // the hash is of the bytes read, and a later write lands in the next
    // dirty set.
    let hashed = unsafe { hash_in_place(guard.as_ptr()) };
    Ok(hashed.map(|(hash, zero)| (guard.as_ptr() as usize, hash, zero)))
}

/// Encode one chunk. `Ok(false)` when the output channel is gone.
///
/// Pages that will go out raw (the choice is raw and the page is no probe,
/// see [`PageEncoder::sends_raw`]) are not copied on plaintext lanes: they
/// are hashed where they are, zero pages found in the same pass, and the
/// lane writer hands them to the kernel from guest memory
/// ([`BatchBuilder::push_in_place`]). A guest write between the hash and
/// the kernel's copy tears such a page; the destination reports it and it
/// is sent again (see `super::torn`). The others are copied into the batch
/// (hashed on the way) and encoded from the copy.
fn encode_chunk(
    ctx: &WorkerContext<'_>,
    chunk: &Chunk,
    encoder: &mut PageEncoder,
    spare: &mut Option<Vec<u8>>,
    out: &Sender<WorkerOutput>,
) -> Result<bool, MigrationError> {
    if chunk.reprotect {
        let mut log = ctx.log.lock().unwrap_or_else(|p| p.into_inner());
        for stretch in &chunk.stretches {
            let first = usize::try_from(stretch.first_page).expect("page index fits usize");
            log.reprotect(first, &stretch.words)
                .map_err(MigrationError::DirtyLog)?;
        }
    }
    let started = Instant::now();
    let mut queue_time = Duration::ZERO;
    encoder.set_choice(ctx.selector.choice());
    encoder.set_compression_could_pay(ctx.selector.compression_could_pay());
    // Every stretch of a job is on one lane (`group_stretches`).
    let lane = chunk
        .stretches
        .first()
        .map_or(0, |s| lane_for_page(s.first_page, ctx.out.lanes()));
    let mut wire_bytes = 0u64;
    let capacity = ctx.batch_bytes + PAGE_SIZE + 64;
    let headroom = FRAME_HEADROOM;
    let mut batch = recycled_batch(ctx, spare, capacity, headroom);
    let mut counts = EncodingCounts::default();
    let mut pages = 0u64;
    let mut digest_delta = ctx.hashes.delta();
    let delta = chunk.use_delta.then_some(ctx.cache);
    let words = chunk.stretches.iter().flat_map(|stretch| {
        debug_assert_eq!(lane_for_page(stretch.first_page, ctx.out.lanes()), lane);
        (0u64..)
            .zip(&stretch.words)
            .map(move |(i, &word)| (stretch.first_page + 64 * i, word))
    });
    for (word_first_page, word) in words {
        let mut bits = word;
        while bits != 0 {
            let bit = u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            let index = word_first_page + bit;
            let in_place = match ctx.in_place {
                Some(_) if encoder.sends_raw(index, delta.is_some()) => {
                    hash_page_in_place(ctx.memory, index)?
                }
                _ => None,
            };
            if let Some((addr, hash, zero)) = in_place {
                pages += 1;
                if !chunk.force && ctx.hashes.get(index) == hash {
                    counts.unchanged += 1;
                    continue;
                }
                if let Some(cache) = delta {
                    // Sent whole: a cached copy would be the wrong base.
                    cache.forget(index);
                }
                if zero {
                    debug_assert_eq!(hash, zero_page_hash());
                    batch.push(index, PageEncoding::Zero, &[], hash);
                    counts.count(PageEncoding::Zero);
                } else {
                    batch.push_in_place(index, addr, hash);
                    counts.count(PageEncoding::Raw);
                }
                ctx.hashes.set_deferred(index, hash, &mut digest_delta);
                if batch.is_full(MAX_BATCH_PAGES, ctx.batch_bytes) {
                    let next = recycled_batch(ctx, spare, capacity, headroom);
                    let full = std::mem::replace(&mut batch, next);
                    wire_bytes += queue(ctx, lane, full, &mut queue_time)?;
                }
                continue;
            }
            // Straight from guest memory into the batch, hashed on the way.
            let slot = batch.page_slot();
            let hash = read_page_hashed(ctx.memory, index, slot)?;
            pages += 1;
            if !chunk.force && ctx.hashes.get(index) == hash {
                counts.unchanged += 1;
                continue;
            }
            counts.count(encoder.encode_slot(index, hash, delta, &mut batch));
            ctx.hashes.set_deferred(index, hash, &mut digest_delta);
            if batch.is_full(MAX_BATCH_PAGES, ctx.batch_bytes) {
                let next = recycled_batch(ctx, spare, capacity, headroom);
                let full = std::mem::replace(&mut batch, next);
                wire_bytes += queue(ctx, lane, full, &mut queue_time)?;
            }
        }
    }
    if batch.is_empty() {
        *spare = Some(batch.into_buffer());
    } else {
        wire_bytes += queue(ctx, lane, batch, &mut queue_time)?;
    }
    ctx.hashes.add_to_digest(&digest_delta);
    let costs = encoder.take_costs();
    let busy = started.elapsed().saturating_sub(queue_time);
    let base_ns = u64::try_from(busy.as_nanos())
        .unwrap_or(u64::MAX)
        .saturating_sub(costs.codec_ns);
    ctx.selector
        .record(pages, base_ns, &costs, delta.is_some(), ctx.out);
    Ok(out
        .send(WorkerOutput::ChunkDone {
            pages,
            counts,
            wire_bytes,
            busy,
        })
        .is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pages_of(stretches: &[Stretch]) -> Vec<u64> {
        let mut pages = Vec::new();
        for s in stretches {
            for (i, &w) in (0u64..).zip(&s.words) {
                let mut bits = w;
                while bits != 0 {
                    pages.push(s.first_page + 64 * i + u64::from(bits.trailing_zeros()));
                    bits &= bits - 1;
                }
            }
        }
        pages
    }

    #[test]
    fn scattered_pages_go_out_in_one_job_per_lane_and_dense_stretches_alone() {
        // One dirty page in each of 256 stretches (1 GiB), 4 lanes.
        let mut words = vec![0u64; 256 * CHUNK_WORDS];
        for s in 0..256 {
            words[s * CHUNK_WORDS + 3] = 1 << 7;
        }
        let jobs = group_stretches(&words, 4);
        assert_eq!(jobs.len(), 4);
        assert!(jobs.iter().all(|j| j.len() == 64));
        // Every page dirty: each stretch is a job of its own.
        let jobs = group_stretches(&vec![u64::MAX; 256 * CHUNK_WORDS], 4);
        assert_eq!(jobs.len(), 256);
        assert!(jobs.iter().all(|j| j.len() == 1));
    }

    proptest! {
        #[test]
        fn grouping_covers_each_dirty_page_once_on_its_own_lane(
            words in prop::collection::vec(
                prop_oneof![
                    4 => Just(0u64),
                    2 => any::<u64>().prop_map(|w| w & (w >> 7) & (w >> 13)),
                    1 => Just(u64::MAX),
                ],
                0..(64 * CHUNK_WORDS),
            ),
            lanes in 1usize..9,
        ) {
            let jobs = group_stretches(&words, lanes);
            let mut seen = Vec::new();
            for job in &jobs {
                prop_assert!(!job.is_empty());
                let lane = lane_for_page(job[0].first_page, lanes);
                let mut before_last = 0u64;
                for (k, s) in job.iter().enumerate() {
                    prop_assert_eq!(lane_for_page(s.first_page, lanes), lane);
                    prop_assert_eq!(s.first_page % STRIPE_PAGES, 0);
                    let pages = pages_of(std::slice::from_ref(s)).len() as u64;
                    prop_assert!(pages > 0);
                    if k + 1 < job.len() {
                        before_last += pages;
                    }
                }
                // A job stops gathering once it holds JOB_PAGES.
                prop_assert!(before_last < JOB_PAGES);
                seen.extend(pages_of(job));
            }
            seen.sort_unstable();
            let mut expected = Vec::new();
            for (i, &w) in (0u64..).zip(&words) {
                let mut bits = w;
                while bits != 0 {
                    expected.push(64 * i + u64::from(bits.trailing_zeros()));
                    bits &= bits - 1;
                }
            }
            prop_assert_eq!(seen, expected);
        }
    }
}
