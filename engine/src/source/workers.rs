//! Encoder threads: read dirty pages from guest memory and encode them into
//! page batches. They never run on a vCPU thread.
//!
//! Ordering rule (DESIGN.md): a chunk's dirty bits are cleared in the dirty
//! log (re-protected) *before* its pages are read, so a write that lands
//! after the read shows up in the next round.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crossbeam_channel::{Receiver, Sender};
use ferry_dirtylog::DirtyLog;
use ferry_transport::lanes::STRIPE_PAGES;
use ferry_transport::{lane_for_page, FrameKind, TransportError, HEADER_LEN};
use vm_memory::{Bytes, GuestAddress};

use crate::digest::PageHashes;
use crate::encode::batch::MAX_BATCH_PAGES;
use crate::encode::{
    page_hash, BatchBuilder, EncodingCounts, PageEncoder, XorDeltaCache, PAGE_SIZE,
};
use crate::error::MigrationError;
use crate::vm::GuestMemoryMmap;
use crate::wire;

use super::outbound::{Outbound, PAGE_BATCH_FLAGS};

/// Dirty-bitmap words per chunk: 16 words = 1024 pages = 4 MiB of guest
/// memory, re-protected with one call. A chunk is exactly one lane stripe,
/// so all its pages travel on one lane.
pub(crate) const CHUNK_WORDS: usize = 16;

const _: () = assert!(CHUNK_WORDS as u64 * 64 == STRIPE_PAGES);

/// A piece of a round's work: the dirty pages of `words`, starting at
/// page `first_page` (a multiple of 64).
#[derive(Debug)]
pub(crate) struct Chunk {
    pub first_page: u64,
    pub words: Vec<u64>,
    /// Call `DirtyLog::reprotect` for these words before reading.
    pub reprotect: bool,
    /// Send every page, even one whose hash matches (round 0).
    pub force: bool,
    /// Use and update the XOR-delta cache.
    pub use_delta: bool,
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
    },
    /// A chunk failed; the migration must stop.
    Failed(MigrationError),
}

/// What all workers share.
pub(crate) struct WorkerContext<'a> {
    pub memory: &'a GuestMemoryMmap,
    pub log: &'a Mutex<Box<dyn DirtyLog>>,
    pub hashes: &'a PageHashes,
    pub cache: &'a XorDeltaCache,
    pub batch_bytes: usize,
    pub cancel: &'a AtomicBool,
    /// Sent batch buffers, back for reuse.
    pub free: &'a Receiver<Vec<u8>>,
    /// The lanes. When every lane is a plaintext socket, each batch's
    /// complete frame (checksum included) is built here, off the lane's
    /// writer thread.
    pub out: &'a Outbound,
    /// LZ4 was negotiated.
    pub lz4: bool,
}

/// Queue a finished batch on `lane`; returns the frame's size.
fn queue(ctx: &WorkerContext<'_>, lane: usize, batch: BatchBuilder) -> Result<u64, MigrationError> {
    let mut bytes = batch.finish();
    let sealed = ctx.out.sealed();
    if sealed {
        wire::seal(&mut bytes, FrameKind::PageBatch, PAGE_BATCH_FLAGS)
            .map_err(|e| MigrationError::Send(TransportError::Encode(e)))?;
    }
    let len = bytes.len() + if sealed { 0 } else { HEADER_LEN };
    ctx.out
        .send_batch(lane, sealed, bytes, ctx.cancel)
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
    let mut encoder = PageEncoder::new().with_lz4(ctx.lz4);
    while let Ok(chunk) = jobs.recv() {
        if ctx.cancel.load(Ordering::Relaxed) {
            return;
        }
        match encode_chunk(ctx, &chunk, &mut encoder, out) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let _ = out.send(WorkerOutput::Failed(e));
                return;
            }
        }
    }
}

/// Encode one chunk. `Ok(false)` when the output channel is gone.
fn encode_chunk(
    ctx: &WorkerContext<'_>,
    chunk: &Chunk,
    encoder: &mut PageEncoder,
    out: &Sender<WorkerOutput>,
) -> Result<bool, MigrationError> {
    if chunk.reprotect {
        let first = usize::try_from(chunk.first_page).expect("page index fits usize");
        let mut log = ctx.log.lock().unwrap_or_else(|p| p.into_inner());
        log.reprotect(first, &chunk.words)
            .map_err(MigrationError::DirtyLog)?;
    }
    let lane = lane_for_page(chunk.first_page, ctx.out.lanes());
    let mut wire_bytes = 0u64;
    let capacity = ctx.batch_bytes + PAGE_SIZE + 64;
    let headroom = if ctx.out.sealed() {
        wire::FRAME_HEADROOM
    } else {
        0
    };
    let new_batch =
        || BatchBuilder::with_headroom(ctx.free.try_recv().unwrap_or_default(), capacity, headroom);
    let mut batch = new_batch();
    let mut counts = EncodingCounts::default();
    let mut pages = 0u64;
    let mut digest_delta = 0u64;
    let delta = chunk.use_delta.then_some(ctx.cache);
    for (i, &word) in chunk.words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let bit = u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            let index = chunk.first_page + 64 * i as u64 + bit;
            // Straight from guest memory into the batch.
            let slot = batch.page_slot();
            ctx.memory
                .read_slice(slot, GuestAddress(index * PAGE_SIZE as u64))
                .map_err(|_| MigrationError::GuestMemory { page: index })?;
            pages += 1;
            let hash = page_hash(slot);
            if !chunk.force && ctx.hashes.get(index) == hash {
                counts.unchanged += 1;
                continue;
            }
            counts.count(encoder.encode_slot(index, hash, delta, &mut batch));
            ctx.hashes.set_deferred(index, hash, &mut digest_delta);
            if batch.is_full(MAX_BATCH_PAGES, ctx.batch_bytes) {
                let full = std::mem::replace(&mut batch, new_batch());
                wire_bytes += queue(ctx, lane, full)?;
            }
        }
    }
    if !batch.is_empty() {
        wire_bytes += queue(ctx, lane, batch)?;
    }
    ctx.hashes.add_to_digest(digest_delta);
    Ok(out
        .send(WorkerOutput::ChunkDone {
            pages,
            counts,
            wire_bytes,
        })
        .is_ok())
}
