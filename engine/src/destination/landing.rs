//! Landing page batches on the lanes' reader threads: each batch is
//! verified, decoded and its pages written into guest memory on the thread
//! that read it (a [`LaneConsumer`] of the transport's `LaneInbox`), each
//! written page's hash recorded for the digest. Control frames go on to
//! the session's thread.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};

use crossbeam_channel::Sender;
use ferry_transport::lanes::{Consumed, LaneConsumer};
use ferry_transport::{FrameKind, ReceivedFrame};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::digest::PageHashes;
use crate::encode::page_hash::{copy_hashed, store_fence};
use crate::encode::{
    decode_page, page_hash, zero_page_hash, BatchReader, DecodeError, EncodingCounts, Page,
    PageEncoding, PAGE_SIZE,
};
use crate::error::MigrationError;
use crate::protocol::{TornPage, MAX_TORN_PER_REPORT, PAGE_BATCH_FLAGS};
use crate::vm::GuestMemoryMmap;

/// Raw pages that arrived torn (see [`crate::protocol::TornPage`]): the
/// ones still torn (no later copy came yet) and the ones not yet reported
/// to the source.
#[derive(Debug)]
pub(crate) struct TornSet {
    /// One bit per page, set while the page is torn: a reader writing a
    /// page reads its word and takes no lock unless that page is torn.
    /// (A count of open pages checked instead sent every decoder through
    /// the lock, and its cache line from core to core, for every page
    /// written while any page was torn, which on the idle row is all of
    /// round 0: the guest's status page tears early in every run.)
    open_bits: ferry_dirtylog::AtomicWords,
    state: Mutex<TornState>,
}

#[derive(Debug, Default)]
struct TornState {
    /// Page -> the round whose copy arrived torn.
    open: BTreeMap<u64, u32>,
    unreported: Vec<TornPage>,
}

/// A page's word in [`TornSet::open_bits`] and its bit there.
fn torn_bit(page: u64) -> (usize, u64) {
    (
        usize::try_from(page / 64).unwrap_or(usize::MAX),
        1 << (page % 64),
    )
}

impl TornSet {
    /// For pages `0..page_index_end`.
    pub(crate) fn new(page_index_end: u64) -> Self {
        let words = usize::try_from(page_index_end.div_ceil(64)).expect("page count fits usize");
        Self {
            open_bits: ferry_dirtylog::AtomicWords::zeroed(words),
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TornState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `page`'s copy of `round` arrived torn.
    fn torn(&self, page: u64, round: u32) {
        let mut s = self.lock();
        s.open.insert(page, round);
        s.unreported.push(TornPage { page, round });
        let (word, bit) = torn_bit(page);
        if let Some(w) = self.open_bits.get(word) {
            w.fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// A copy of `page` that matches its hash was written. A page's copies
    /// are decoded in order (one lane per page, each lane's batches landed
    /// in order on its reader thread), so a torn copy's record (its bit
    /// included) is seen here.
    fn written(&self, page: u64) {
        let (word, bit) = torn_bit(page);
        let open = self
            .open_bits
            .get(word)
            .is_none_or(|w| w.load(Ordering::Relaxed) & bit != 0);
        if !open {
            return;
        }
        let mut s = self.lock();
        s.open.remove(&page);
        if let Some(w) = self.open_bits.get(word) {
            w.fetch_and(!bit, Ordering::Relaxed);
        }
    }

    /// Torn pages not reported yet (at most [`MAX_TORN_PER_REPORT`]; the
    /// rest wait for the next report).
    pub(crate) fn take_report(&self) -> Vec<TornPage> {
        let mut s = self.lock();
        let n = s.unreported.len().min(MAX_TORN_PER_REPORT);
        s.unreported.drain(..n).collect()
    }

    /// With the stream over: fails when a page is still torn.
    pub(crate) fn check_none_open(&self) -> Result<(), MigrationError> {
        let s = self.lock();
        match s.open.iter().next() {
            None => Ok(()),
            Some((&page, &round)) => Err(MigrationError::TornAtHandover {
                count: s.open.len(),
                page,
                round,
            }),
        }
    }
}

/// What decoding a batch needs.
pub(crate) struct DecodeContext<'a> {
    pub memory: &'a GuestMemoryMmap,
    pub hashes: &'a PageHashes,
    pub page_index_end: u64,
    /// Features accepted in the handshake.
    pub features: u64,
    /// Raw pages that arrived torn.
    pub torn: &'a TornSet,
}

/// Where one migration's batches land, shared by the lanes' readers.
pub(crate) struct LandingTarget {
    /// The guest's memory (a handle on the same mappings as the VM's).
    pub memory: GuestMemoryMmap,
    pub hashes: Arc<PageHashes>,
    pub page_index_end: u64,
    /// Features accepted in the handshake.
    pub features: u64,
    pub torn: Arc<TornSet>,
}

impl LandingTarget {
    fn context(&self) -> DecodeContext<'_> {
        DecodeContext {
            memory: &self.memory,
            hashes: &self.hashes,
            page_index_end: self.page_index_end,
            features: self.features,
            torn: &self.torn,
        }
    }
}

/// What the lanes' readers landed so far.
#[derive(Debug, Default)]
pub(crate) struct Landed {
    /// Batches landed.
    pub batches: u64,
    pub counts: EncodingCounts,
    /// Bytes of the batches landed, frame headers included, per lane.
    pub lane_bytes: Vec<u64>,
}

/// The session's side of the lanes' readers: where batches land while the
/// stream is open, what they landed, and where a reader's failure goes.
pub(crate) struct Landing {
    /// Set once the Hello is accepted (before the HelloAck), cleared when
    /// the stream is over: a batch outside it is not landed but passed on
    /// to the session, which refuses it. A reader holds it (read) while it
    /// writes a batch, so once [`Landing::close`] returns no page is
    /// written any more.
    target: RwLock<Option<LandingTarget>>,
    landed: Mutex<Landed>,
    /// A reader's first failure (a corrupt frame, a batch that does not
    /// decode), to wake the session at once; that reader lands nothing
    /// after it.
    failures: Sender<MigrationError>,
}

impl Landing {
    /// For `lanes` lanes, failures sent to `failures`.
    pub(crate) fn new(lanes: usize, failures: Sender<MigrationError>) -> Self {
        Self {
            target: RwLock::new(None),
            landed: Mutex::new(Landed {
                batches: 0,
                counts: EncodingCounts::default(),
                lane_bytes: vec![0; lanes],
            }),
            failures,
        }
    }

    /// Batches land in `target` from now on.
    pub(crate) fn open(&self, target: LandingTarget) {
        *self.target.write().unwrap_or_else(|p| p.into_inner()) = Some(target);
    }

    /// No batch lands any more (waits for one being written).
    pub(crate) fn close(&self) {
        *self.target.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn landed(&self) -> std::sync::MutexGuard<'_, Landed> {
        self.landed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Batches landed so far (the stream is not idle while they come).
    pub(crate) fn batches(&self) -> u64 {
        self.landed().batches
    }

    /// What was landed so far.
    pub(crate) fn take_landed(&self) -> Landed {
        std::mem::take(&mut *self.landed())
    }
}

/// One lane's reader, landing its lane's batches in order. A page always
/// travels on the same lane, so its copies are written in the order they
/// were sent; a lane's RoundEnd reaches the session only after every batch
/// of that round on that lane was written (and fenced).
pub(crate) struct LaneLanding {
    lane: usize,
    landing: Arc<Landing>,
    /// The round this lane is in (RoundEnds passed on so far).
    round: u32,
    page: Box<Page>,
    failed: bool,
}

impl LaneLanding {
    pub(crate) fn new(lane: u16, landing: Arc<Landing>) -> Self {
        Self {
            lane: usize::from(lane),
            landing,
            round: 0,
            page: Box::new([0; PAGE_SIZE]),
            failed: false,
        }
    }
}

impl LaneConsumer for LaneLanding {
    fn consume(&mut self, frame: ReceivedFrame) -> Consumed {
        if self.failed {
            // The session fails on this lane's failure: nothing more.
            return Consumed::Kept(frame.into_buffer());
        }
        match frame.kind() {
            FrameKind::PageBatch if frame.flags() == PAGE_BATCH_FLAGS => {}
            FrameKind::RoundEnd => {
                self.round = self.round.wrapping_add(1);
                return Consumed::PassedOn(frame);
            }
            _ => return Consumed::PassedOn(frame),
        }
        let open = self
            .landing
            .target
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let Some(target) = open.as_ref() else {
            return Consumed::PassedOn(frame);
        };
        let r = match frame.verify() {
            Ok(batch) => decode_batch(&target.context(), batch, self.round, &mut self.page),
            Err(e) => Err(MigrationError::CorruptFrame(e)),
        };
        // The batch's pages, written with streaming stores, are ordered
        // before anything this lane passes on after it.
        store_fence();
        drop(open);
        match r {
            Ok(counts) => {
                let mut landed = self.landing.landed();
                landed.batches += 1;
                landed.counts.add(&counts);
                if let Some(b) = landed.lane_bytes.get_mut(self.lane) {
                    *b += frame.wire_len() as u64;
                }
            }
            Err(e) => {
                self.failed = true;
                let _ = self.landing.failures.send(e);
            }
        }
        Consumed::Kept(frame.into_buffer())
    }
}

/// Write one page into guest memory and return the hash of what was
/// written. Unlike `write_slice`, this does not mark vm-memory's dirty
/// bitmap: those marks track the VMM's own writes to a running guest,
/// while these pages are the guest's memory arriving before it runs (and
/// marking cost a tenth of the decoders' time).
///
/// Why raw pages are read into a buffer first instead of straight into
/// guest memory (`readv` into place): measured, the buffer costs the
/// receiving thread less, even against `readv` with no hash at all. The
/// `destination_landing` bench (`cargo bench -p ferry-benches --bench
/// destination_landing`: 1 GiB of random pages over loopback TCP in 1 MiB
/// batches into a populated 1 GiB region, receiver CPU-seconds user +
/// system, medians of 5 alternating runs, two sessions, on a shared
/// 2-core machine): buffer + [`copy_hashed`] with streaming stores 0.25 /
/// 0.19 s (user 0.06-0.10 s), `readv` of the pages into place then one
/// [`page_hash`] pass there 0.47 / 0.48 s (user 0.15-0.21 s), `readv` into
/// place alone 0.33 / 0.32 s (all of it the kernel's copy). Why: the
/// kernel's copy out of the socket into a reused buffer stays in cache,
/// and the one write into cold guest memory is made here with streaming
/// stores, which skip the read-for-ownership a plain copy pays on every
/// cache line; read into place, the kernel's copy is that cold write, and
/// the hash pass after it costs twice the fused copy and hash (its user
/// time above: the page is not in cache any more). (Reading into place
/// would also need the batch's table, which travels behind its payloads,
/// in front: a wire change that buys nothing here.)
///
/// The hash is computed in the same pass as the copy ([`copy_hashed`],
/// when the CPU has AVX2), so the page is written before the caller
/// compares the hash: a raw page that does not match is torn (it stays
/// as written until its next copy, see [`decode_batch`]), any other
/// page that does not match fails the migration, and a destination whose
/// migration failed never runs its guest (a later attempt rewrites every
/// page in its round 0).
fn write_page_hashed(
    memory: &GuestMemoryMmap,
    page: u64,
    data: &[u8],
) -> Result<u64, MigrationError> {
    let bad = || MigrationError::GuestMemory { page };
    let data: &Page = data.try_into().map_err(|_| bad())?;
    let slice = memory
        .get_slice(GuestAddress(page * PAGE_SIZE as u64), PAGE_SIZE)
        .map_err(|_| bad())?;
    let guard = slice.ptr_guard_mut();
    if guard.len() < PAGE_SIZE {
        return Err(bad());
    }
    // SAFETY: `guard` points at PAGE_SIZE bytes of a live mapping of guest
    // memory (`get_slice` checked the range lies inside one region, and the
    // mapping lives as long as `memory`, borrowed here); `data` is a
    // separate buffer of PAGE_SIZE bytes, so the ranges do not overlap.
    // Guest memory is shared, volatile memory: vm-memory's own `write_slice`
    // copies into it the same way.
    if let Some(hash) = unsafe { copy_hashed(data.as_ptr(), guard.as_ptr(), true) } {
        return Ok(hash);
    }
    let hash = page_hash(data);
    // SAFETY: as above.
    unsafe { copy_page_streaming(data, guard.as_ptr()) };
    Ok(hash)
}

/// Copy a page to `dst` with non-temporal (streaming) stores where the CPU
/// has them (x86_64: SSE2, always there), a plain copy elsewhere or when
/// `dst` is not 16-byte aligned. Ordered before the function returns
/// (`sfence`), so it is seen like any other write by the threads that read
/// guest memory later (the digest check, the vCPUs after a barrier).
///
/// # Safety
/// `dst` must be valid for writes of [`PAGE_SIZE`] bytes and not overlap
/// `src`.
unsafe fn copy_page_streaming(src: &Page, dst: *mut u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        if (dst as usize).is_multiple_of(16) {
            // `loadu` takes any alignment; `dst` is 16-byte aligned (checked
            // just above), as `_mm_stream_si128` needs.
            #[allow(clippy::cast_ptr_alignment)]
            let (from, to) = (src.as_ptr().cast::<__m128i>(), dst.cast::<__m128i>());
            for i in 0..PAGE_SIZE / 16 {
                // `i < PAGE_SIZE / 16`: both stay within their page.
                let (from, to) = (from.wrapping_add(i), to.wrapping_add(i));
                // SAFETY: `from` points at 16 readable bytes of `src` (any
                // alignment is fine for `loadu`); SSE2 is part of x86_64.
                let v = unsafe { _mm_loadu_si128(from) };
                // SAFETY: `to` points at 16 writable, 16-byte aligned bytes
                // of the page the caller vouches for; SSE2 is part of x86_64.
                unsafe { _mm_stream_si128(to, v) };
            }
            // SAFETY: a fence has no memory operands; SSE2 is part of x86_64.
            unsafe { _mm_sfence() };
            return;
        }
    }
    // SAFETY: the caller guarantees `dst` holds PAGE_SIZE writable bytes
    // that do not overlap `src`, a PAGE_SIZE-byte page.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, PAGE_SIZE) };
}

/// A page of zeros, shared.
fn zero_page() -> &'static [u8] {
    static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    &ZERO
}

/// True when a destination page whose recorded hash is `recorded` holds
/// zeros already, so a zero page for it needs no write: it was never
/// written in this migration (`0`; the destination's memory starts zeroed,
/// see [`crate::MigratableVm::memory`]) or its last write was a zero page.
///
/// Most zero pages of a guest arrive in round 0 onto never-written memory:
/// skipping them saves the decoder a pass over each (and, on memory that
/// was not populated beforehand, the page fault and the allocation). A
/// page whose content hashes to `0` counts as never written, as everywhere
/// in [`PageHashes`]: one chance in 2^64, the same as a hash collision
/// letting the source skip a changed page.
fn holds_zeros(recorded: u64) -> bool {
    recorded == 0 || recorded == zero_page_hash()
}

/// Decode `batch`, of round `round`, into guest memory.
///
/// A raw page that does not match its hash is torn, not corrupt: the
/// source sends raw pages from guest memory that the guest may write
/// while they are sent (see [`crate::protocol::TornPage`]). It is written
/// as it came, its hash recorded as that of what was written (so the
/// digest differs until a good copy comes), and it is reported. Every
/// other encoding is decoded from a copy the source made: a mismatch
/// there fails the migration.
fn decode_batch(
    ctx: &DecodeContext<'_>,
    batch: &[u8],
    round: u32,
    page: &mut Page,
) -> Result<EncodingCounts, MigrationError> {
    let mut reader = BatchReader::new(batch, ctx.page_index_end).map_err(MigrationError::Decode)?;
    let mut counts = EncodingCounts::default();
    let mut digest_delta = ctx.hashes.delta();
    while let Some(entry) = reader.next_entry().map_err(MigrationError::Decode)? {
        if entry.encoding.required_features() & !ctx.features != 0 {
            return Err(MigrationError::Decode(DecodeError::NotNegotiated(
                entry.encoding,
            )));
        }
        let addr = GuestAddress(entry.page * PAGE_SIZE as u64);
        let memory_error = |_| MigrationError::GuestMemory { page: entry.page };
        // Each page is checked against the hash the source sent with it
        // (the frame checksum covers only the batch's table) before it is
        // written.
        let checked = |data: &[u8]| {
            let hash = write_page_hashed(ctx.memory, entry.page, data)?;
            if hash != entry.hash {
                return Err(MigrationError::Decode(DecodeError::HashMismatch {
                    page: entry.page,
                }));
            }
            Ok(hash)
        };
        let hash = match entry.encoding {
            PageEncoding::Raw if entry.payload.len() == PAGE_SIZE => {
                let hash = write_page_hashed(ctx.memory, entry.page, entry.payload)?;
                if hash != entry.hash {
                    ctx.torn.torn(entry.page, round);
                    ctx.hashes.set_deferred(entry.page, hash, &mut digest_delta);
                    counts.count(entry.encoding);
                    continue;
                }
                hash
            }
            PageEncoding::Zero if entry.payload.is_empty() => {
                if holds_zeros(ctx.hashes.get(entry.page)) && entry.hash == zero_page_hash() {
                    entry.hash
                } else {
                    checked(zero_page())?
                }
            }
            PageEncoding::XorRle | PageEncoding::XorRleLz4 => {
                ctx.memory.read_slice(page, addr).map_err(memory_error)?;
                decode_page(entry.encoding, entry.payload, page).map_err(MigrationError::Decode)?;
                checked(page)?
            }
            encoding => {
                decode_page(encoding, entry.payload, page).map_err(MigrationError::Decode)?;
                checked(page)?
            }
        };
        ctx.torn.written(entry.page);
        ctx.hashes.set_deferred(entry.page, hash, &mut digest_delta);
        counts.count(entry.encoding);
    }
    ctx.hashes.add_to_digest(&digest_delta);
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::{BatchBuilder, PageEncoder};
    use crate::protocol::{FEATURE_LZ4, SUPPORTED_FEATURES};

    /// Pages of guest memory the tests decode into.
    const PAGES: u64 = 16;

    /// A destination of [`PAGES`] pages: its memory, the pages' hashes,
    /// its torn set, the features accepted, and a decoder's scratch page.
    struct Fixture {
        mem: GuestMemoryMmap,
        hashes: PageHashes,
        torn: TornSet,
        features: u64,
        page: Box<Page>,
    }

    impl Fixture {
        /// With every supported feature accepted.
        fn new() -> Self {
            Self::with_features(SUPPORTED_FEATURES)
        }

        fn with_features(features: u64) -> Self {
            Self {
                mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), PAGES as usize * PAGE_SIZE)])
                    .unwrap(),
                hashes: PageHashes::new(PAGES),
                torn: TornSet::new(PAGES),
                features,
                page: Box::new([0; PAGE_SIZE]),
            }
        }

        /// [`decode_batch`] of `batch`, of round `round`, into this
        /// destination.
        fn decode(&mut self, batch: &[u8], round: u32) -> Result<EncodingCounts, MigrationError> {
            let ctx = DecodeContext {
                memory: &self.mem,
                hashes: &self.hashes,
                page_index_end: PAGES,
                features: self.features,
                torn: &self.torn,
            };
            decode_batch(&ctx, batch, round, &mut self.page)
        }

        /// Decoding `batch` (round 0) fails as page `page` does not match
        /// its hash, and no hash is recorded for that page.
        fn refuses_as_mismatched(&mut self, batch: &[u8], page: u64) {
            let err = self.decode(batch, 0).unwrap_err();
            assert!(
                matches!(
                    err,
                    MigrationError::Decode(DecodeError::HashMismatch { page: p }) if p == page
                ),
                "{err:?}"
            );
            assert_eq!(
                self.hashes.get(page),
                0,
                "the bad page's hash was not recorded"
            );
        }

        /// Page `page` of guest memory as it is now.
        fn read(&self, page: u64) -> Box<Page> {
            let mut back = Box::new([0xa5u8; PAGE_SIZE]);
            self.mem
                .read_slice(&mut back[..], GuestAddress(page * PAGE_SIZE as u64))
                .unwrap();
            back
        }
    }

    /// A page whose byte `i` is `byte(i)`.
    fn page_of(byte: impl Fn(usize) -> u8) -> Box<Page> {
        let mut data = Box::new([0u8; PAGE_SIZE]);
        for (i, b) in data.iter_mut().enumerate() {
            *b = byte(i);
        }
        data
    }

    /// A batch of `data` as page `page`, encoded by `encoder` as `want`.
    fn batch_of(page: u64, data: &Page, mut encoder: PageEncoder, want: PageEncoding) -> Vec<u8> {
        let mut batch = BatchBuilder::new();
        assert_eq!(encoder.encode(page, data, None, &mut batch), want);
        batch.finish()
    }

    fn compressible_batch(page: u64) -> (Vec<u8>, Box<Page>) {
        let data = page_of(|i| (i % 13) as u8 + 1);
        let batch = batch_of(page, &data, PageEncoder::new(), PageEncoding::Lz4);
        (batch, data)
    }

    fn zero_batch(page: u64) -> Vec<u8> {
        batch_of(
            page,
            &page_of(|_| 0),
            PageEncoder::new(),
            PageEncoding::Zero,
        )
    }

    fn patterned_raw_batch(page: u64) -> (Vec<u8>, Box<Page>) {
        let data = page_of(|i| (i * 7 % 251) as u8);
        let raw = PageEncoder::new().with_lz4(false);
        (batch_of(page, &data, raw, PageEncoding::Raw), data)
    }

    #[test]
    fn a_streamed_page_is_an_exact_copy_aligned_or_not() {
        let src = page_of(|i| (i * 31 % 251) as u8);
        let mut dst = vec![0u8; 2 * PAGE_SIZE];
        let aligned = dst.as_ptr().align_offset(16);
        for offset in [aligned, aligned + 1] {
            dst.fill(0);
            let at = dst[offset..].as_mut_ptr();
            // SAFETY: `offset + PAGE_SIZE <= 2 * PAGE_SIZE`: `at` has
            // PAGE_SIZE bytes of `dst` after it, which does not overlap `src`.
            unsafe { copy_page_streaming(&src, at) };
            assert_eq!(
                &dst[offset..offset + PAGE_SIZE],
                &src[..],
                "offset {offset}"
            );
            assert!(dst[..offset].iter().all(|&b| b == 0));
            assert!(dst[offset + PAGE_SIZE..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn pages_land_in_guest_memory_with_their_hash() {
        let mut f = Fixture::new();
        let (batch, data) = compressible_batch(3);
        let counts = f.decode(&batch, 0).unwrap();
        assert_eq!(counts.lz4, 1);
        let back = f.read(3);
        assert_eq!(back, data);
        assert_eq!(f.hashes.get(3), page_hash(&back[..]));
    }

    #[test]
    fn a_zero_page_over_a_written_page_zeroes_it() {
        let mut f = Fixture::new();
        let (batch, _) = compressible_batch(3);
        f.decode(&batch, 0).unwrap();

        let counts = f.decode(&zero_batch(3), 0).unwrap();

        assert_eq!(counts.zero, 1);
        assert!(f.read(3).iter().all(|&b| b == 0), "the page was zeroed");
        assert_eq!(f.hashes.get(3), zero_page_hash());
    }

    #[test]
    fn a_zero_page_onto_never_written_memory_is_recorded_without_a_write() {
        // The destination's memory starts zeroed (MigratableVm::memory), so
        // a zero page for a page never written is not written again. Bytes
        // put there behind the engine's back show that it was not.
        let mut f = Fixture::new();
        f.mem
            .write_slice(&[7u8; 8], GuestAddress(4 * PAGE_SIZE as u64))
            .unwrap();

        let counts = f.decode(&zero_batch(4), 0).unwrap();

        assert_eq!(counts.zero, 1);
        assert_eq!(f.hashes.get(4), zero_page_hash(), "counted in the digest");
        assert_eq!(f.read(4)[..8], [7u8; 8], "not written");
    }

    #[test]
    fn a_zero_page_whose_hash_is_not_the_zero_hash_is_refused() {
        let mut f = Fixture::new();
        let mut batch = BatchBuilder::new();
        batch.push(5, PageEncoding::Zero, &[], zero_page_hash() ^ 1);

        f.refuses_as_mismatched(&batch.finish(), 5);
    }

    #[test]
    fn an_encoding_that_was_not_negotiated_is_refused() {
        let mut f = Fixture::with_features(SUPPORTED_FEATURES & !FEATURE_LZ4);
        let (batch, _) = compressible_batch(3);
        let err = f.decode(&batch, 0).unwrap_err();
        assert!(
            matches!(
                err,
                MigrationError::Decode(DecodeError::NotNegotiated(PageEncoding::Lz4))
            ),
            "{err:?}"
        );
        assert_eq!(f.hashes.get(3), 0, "nothing written");
    }

    #[test]
    fn a_raw_page_that_does_not_match_its_hash_is_torn_until_a_good_copy_comes() {
        let mut f = Fixture::new();
        let (mut bytes, data) = patterned_raw_batch(5);
        bytes[100] ^= 1; // in the payload: not covered by the frame checksum

        let counts = f.decode(&bytes, 3).unwrap();

        assert_eq!(counts.raw, 1);
        // Written as it came, recorded as what was written: the digest
        // differs from the source's until a good copy comes.
        let back = f.read(5);
        assert_eq!(back[100], data[100] ^ 1);
        assert_eq!(f.hashes.get(5), page_hash(&back[..]));
        assert_ne!(f.hashes.get(5), page_hash(&data[..]));
        assert_eq!(f.torn.take_report(), vec![TornPage { page: 5, round: 3 }]);
        assert!(f.torn.take_report().is_empty(), "reported once");
        assert!(matches!(
            f.torn.check_none_open(),
            Err(MigrationError::TornAtHandover {
                count: 1,
                page: 5,
                round: 3
            })
        ));

        let (good, _) = patterned_raw_batch(5);
        f.decode(&good, 4).unwrap();

        f.torn.check_none_open().unwrap();
        assert_eq!(f.hashes.get(5), page_hash(&data[..]));
    }

    #[test]
    fn an_lz4_page_that_does_not_match_its_hash_is_refused_and_not_counted() {
        let mut f = Fixture::new();
        let (batch, data) = compressible_batch(5);
        let mut reader = BatchReader::new(&batch, PAGES).unwrap();
        let entry = reader.next_entry().unwrap().unwrap();
        let mut lie = BatchBuilder::new();
        lie.push(5, entry.encoding, entry.payload, page_hash(&data[..]) ^ 1);

        f.refuses_as_mismatched(&lie.finish(), 5);

        assert_eq!(f.hashes.digest(), 0);
        assert!(f.torn.take_report().is_empty(), "corrupt, not torn");
    }
}
