//! The source's lanes: one writer thread per lane, fed by a bounded queue.
//!
//! Encoder threads queue their batches straight on the lane that carries
//! their pages (`ferry_transport::lane_for_page`: a page always travels on
//! the same lane, so per-lane order keeps a newer copy behind an older one);
//! control frames (Hello, RoundEnd, state, digest, Go, Abort) go on lane 0.
//! A full queue blocks the producer (back-pressure), and every writer charges
//! the session's one [`TokenBucket`], so `--max-bandwidth` caps all lanes
//! together.

use std::io::{IoSlice, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, SendTimeoutError, Sender};
use ferry_transport::frame::{encode_header, FLAG_COVERED_SUFFIX};
use ferry_transport::lanes::TokenBucket;
use ferry_transport::{FrameKind, FrameSink, TransportError};

use crate::encode::batch::InPlacePage;
use crate::encode::PAGE_SIZE;
use crate::vm::GuestMemoryMmap;

/// Frames a lane's queue holds before its producers wait.
const QUEUE_DEPTH: usize = 4;

/// Frame flags of a page batch: its checksum covers the batch's table,
/// which carries the hash of every page (see `crate::encode::batch`).
pub(crate) const PAGE_BATCH_FLAGS: u32 = FLAG_COVERED_SUFFIX;

/// How often a producer waiting on a full queue checks for cancellation.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// How a lane writes.
pub(crate) enum LaneWriter {
    /// A plaintext TCP socket: page batches arrive as complete frames whose
    /// checksum an encoder thread computed (see `crate::wire`).
    Sealed(TcpStream),
    /// Any frame sink (TLS, or a caller's transport): it frames and
    /// checksums each payload itself.
    Framed(Box<dyn FrameSink + Send>),
}

impl LaneWriter {
    fn write_frame(
        &mut self,
        kind: FrameKind,
        flags: u32,
        payload: &[u8],
    ) -> Result<(), TransportError> {
        match self {
            LaneWriter::Sealed(stream) => {
                let header = encode_header(kind, flags, &[IoSlice::new(payload)])
                    .map_err(TransportError::Encode)?;
                write_all_vectored(stream, &header, payload).map_err(TransportError::Write)
            }
            LaneWriter::Framed(sink) => sink.send_vectored(kind, flags, &[IoSlice::new(payload)]),
        }
    }

    fn write_batch(
        &mut self,
        sealed: bool,
        bytes: &[u8],
        in_place: Option<&InPlace>,
    ) -> Result<(), TransportError> {
        match (self, in_place) {
            (LaneWriter::Sealed(stream), None) if sealed => {
                stream.write_all(bytes).map_err(TransportError::Write)
            }
            (LaneWriter::Sealed(stream), Some(in_place)) if sealed => {
                write_all_in_place(stream, bytes, in_place).map_err(TransportError::Write)
            }
            (writer, None) => writer.write_frame(FrameKind::PageBatch, PAGE_BATCH_FLAGS, bytes),
            (_, Some(_)) => Err(TransportError::Write(std::io::Error::other(
                "a page batch with pages in guest memory on a lane that frames itself",
            ))),
        }
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        match self {
            LaneWriter::Sealed(_) => Ok(()),
            LaneWriter::Framed(sink) => sink.flush(),
        }
    }
}

/// Header and payload with as few system calls as the socket allows.
fn write_all_vectored(
    stream: &mut TcpStream,
    header: &[u8],
    payload: &[u8],
) -> std::io::Result<()> {
    let total = header.len() + payload.len();
    let mut done = 0;
    while done < total {
        let n = if done < header.len() {
            stream.write_vectored(&[IoSlice::new(&header[done..]), IoSlice::new(payload)])
        } else {
            stream.write(&payload[done - header.len()..])
        };
        match n {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The pages of a batch left in guest memory, and the guest memory they
/// are in, kept mapped until they are written (a writer outlives a
/// failed migration by up to its close grace).
pub(crate) struct InPlace {
    pub pages: Vec<InPlacePage>,
    /// Held, never read: the pages' mappings.
    pub _memory: Arc<GuestMemoryMmap>,
}

/// Most iovecs one `sendmsg` takes (`IOV_MAX` on Linux).
const MAX_IOVECS: usize = 1024;

/// Write the sealed frame `bytes` with the pages of `in_place` inserted
/// (see `BatchBuilder::finish_in_place`): one `sendmsg` gathers the
/// frame's own bytes and the pages straight from guest memory, so the
/// kernel's copy into the socket is the only copy of a raw page.
fn write_all_in_place(
    stream: &mut TcpStream,
    bytes: &[u8],
    in_place: &InPlace,
) -> std::io::Result<()> {
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(2 * in_place.pages.len() + 1);
    let own = |iov: &mut Vec<libc::iovec>, part: &[u8]| {
        if !part.is_empty() {
            iov.push(libc::iovec {
                iov_base: part.as_ptr().cast_mut().cast(),
                iov_len: part.len(),
            });
        }
    };
    let mut at = 0;
    for page in &in_place.pages {
        let part = bytes
            .get(at..page.at)
            .ok_or_else(|| std::io::Error::other("a page in place outside its batch's bytes"))?;
        own(&mut iov, part);
        // Guest memory is never turned into a reference here: the kernel
        // reads it, as a vCPU may write it (a torn page, see
        // `crate::protocol::TornPage`).
        iov.push(libc::iovec {
            iov_base: page.addr as *mut libc::c_void,
            iov_len: PAGE_SIZE,
        });
        at = page.at;
    }
    own(&mut iov, bytes.get(at..).unwrap_or_default());
    let fd = stream.as_raw_fd();
    let mut first = 0;
    while first < iov.len() {
        let end = iov.len().min(first + MAX_IOVECS);
        let slice = &mut iov[first..end];
        // SAFETY: an all-zero `msghdr` is a valid value (no name, no
        // control data); the iovec fields are set just below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = slice.as_mut_ptr();
        msg.msg_iovlen = slice.len();
        // SAFETY: `msg` points at `slice`, iovecs over `bytes` (borrowed
        // for this call) and over guest pages of `in_place.memory`, whose
        // mappings `in_place._memory` keeps alive (`BatchBuilder::push_in_place`
        // took each address from a checked PAGE_SIZE range of it); the
        // kernel only reads them. MSG_NOSIGNAL: a closed peer is an error,
        // not a signal.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        let mut n = match n {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n if n > 0 => n.unsigned_abs(),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
        };
        while n > 0 {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// One lane as the source's outbound side takes it.
pub(crate) struct OutLane {
    /// How frames are written.
    pub writer: LaneWriter,
    /// Shuts the lane's socket down, to unblock a writer stuck on a peer
    /// that stopped reading.
    pub shutdown: Option<TcpStream>,
}

/// Something queued on a lane.
enum Outgoing {
    Frame {
        kind: FrameKind,
        payload: Vec<u8>,
    },
    Batch {
        sealed: bool,
        bytes: Vec<u8>,
        in_place: Option<InPlace>,
    },
}

type ErrorSlot = Arc<Mutex<Option<TransportError>>>;

/// How fast the lanes take page batches while they write: bytes written
/// and the time at least one writer was busy writing (waits on the
/// bandwidth cap included, waits for work not). Bytes over busy time is the
/// link's rate as the encoders see it, whether they or the link are the
/// bottleneck: the figure [`crate::encode::choose_encoding`] needs.
#[derive(Debug, Default)]
pub(crate) struct LinkMeter {
    state: Mutex<MeterState>,
}

#[derive(Debug, Default)]
struct MeterState {
    active: u32,
    since: Option<Instant>,
    busy: Duration,
    bytes: u64,
}

impl LinkMeter {
    fn begin(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.active == 0 {
            s.since = Some(Instant::now());
        }
        s.active += 1;
    }

    fn end(&self, bytes: usize) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.active = s.active.saturating_sub(1);
        s.bytes += bytes as u64;
        if s.active == 0 {
            if let Some(since) = s.since.take() {
                s.busy += since.elapsed();
            }
        }
    }

    /// Bytes written so far and the busy time so far.
    pub(crate) fn totals(&self) -> (u64, Duration) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let running = s.since.map_or(Duration::ZERO, |t| t.elapsed());
        (s.bytes, s.busy + running)
    }
}

/// The writer threads of a session's lanes.
pub(crate) struct Outbound {
    queues: Vec<Sender<Outgoing>>,
    errors: Vec<ErrorSlot>,
    threads: Vec<JoinHandle<()>>,
    shutdowns: Vec<TcpStream>,
    done: Receiver<()>,
    sealed: bool,
    /// Set when the migration failed: writers drop the page batches still
    /// queued, so the Abort behind them goes out at once.
    aborting: Arc<AtomicBool>,
    /// Longest a control frame waits for room in lane 0's queue.
    stall: Duration,
    /// What the writers measured.
    meter: Arc<LinkMeter>,
    /// The session's bandwidth cap (its rate may change while it runs).
    bucket: Option<Arc<TokenBucket>>,
}

/// A bucket rate at or above this (1 TB/s) is no cap: it is what a session
/// that may be capped later starts with.
const UNCAPPED_FROM: f64 = 1e12;

impl Outbound {
    /// Start one writer thread per lane. Sent batch buffers go back to
    /// `free`; every written byte is charged to `bucket`.
    /// A lane whose queue takes nothing for `stall` counts as failed.
    pub(crate) fn spawn(
        lanes: Vec<OutLane>,
        bucket: Option<Arc<TokenBucket>>,
        free: &Sender<Vec<u8>>,
        stall: Duration,
    ) -> Self {
        let sealed = !lanes.is_empty()
            && lanes
                .iter()
                .all(|l| matches!(l.writer, LaneWriter::Sealed(_)));
        let (done_tx, done) = crossbeam_channel::unbounded();
        let mut out = Outbound {
            queues: Vec::with_capacity(lanes.len()),
            errors: Vec::with_capacity(lanes.len()),
            threads: Vec::with_capacity(lanes.len()),
            shutdowns: Vec::new(),
            done,
            sealed,
            aborting: Arc::new(AtomicBool::new(false)),
            stall,
            meter: Arc::default(),
            bucket: bucket.clone(),
        };
        for (i, lane) in lanes.into_iter().enumerate() {
            let (tx, rx) = crossbeam_channel::bounded::<Outgoing>(QUEUE_DEPTH);
            let slot = ErrorSlot::default();
            let (bucket, free, done_tx, thread_slot, aborting, meter) = (
                bucket.clone(),
                free.clone(),
                done_tx.clone(),
                Arc::clone(&slot),
                Arc::clone(&out.aborting),
                Arc::clone(&out.meter),
            );
            let mut writer = lane.writer;
            let handle = std::thread::Builder::new()
                .name(format!("ferry-send-{i}"))
                .spawn(move || {
                    let sent = drain_queue(
                        &mut writer,
                        &rx,
                        bucket.as_deref(),
                        &free,
                        &aborting,
                        &meter,
                    );
                    if let Err(e) = sent {
                        *thread_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    }
                    let _ = done_tx.send(());
                })
                .expect("spawn a lane writer thread");
            out.queues.push(tx);
            out.errors.push(slot);
            out.threads.push(handle);
            out.shutdowns.extend(lane.shutdown);
        }
        out
    }

    /// Number of lanes.
    pub(crate) fn lanes(&self) -> usize {
        self.queues.len()
    }

    /// The bandwidth cap all lanes share now, bytes/s, if any.
    pub(crate) fn cap(&self) -> Option<f64> {
        self.bucket
            .as_ref()
            .map(|b| b.rate())
            .filter(|&r| r < UNCAPPED_FROM)
    }

    /// What the writers measured of the link.
    pub(crate) fn meter(&self) -> &LinkMeter {
        &self.meter
    }

    /// Whether encoders should build complete frames (every lane is a
    /// plaintext socket).
    pub(crate) fn sealed(&self) -> bool {
        self.sealed
    }

    /// Queue a control frame on lane 0, waiting for room until `until` at
    /// the latest (the guest is paused) or for the stall time.
    pub(crate) fn send_frame(
        &self,
        kind: FrameKind,
        payload: Vec<u8>,
        until: Option<Instant>,
    ) -> Result<(), TransportError> {
        self.queue(0, Outgoing::Frame { kind, payload }, until)
    }

    /// Queue a frame on every lane (round markers); waits as
    /// [`Outbound::send_frame`].
    pub(crate) fn broadcast(
        &self,
        kind: FrameKind,
        payload: &[u8],
        until: Option<Instant>,
    ) -> Result<(), TransportError> {
        (0..self.lanes()).try_for_each(|lane| {
            self.queue(
                lane,
                Outgoing::Frame {
                    kind,
                    payload: payload.to_vec(),
                },
                until,
            )
        })
    }

    /// After a failure: drop the page batches still queued and send
    /// `payload` (an Abort) on lane 0, waiting at most `grace` for room.
    pub(crate) fn abort(&self, kind: FrameKind, payload: Vec<u8>, grace: Duration) -> bool {
        self.aborting.store(true, Ordering::Release);
        self.queues.first().is_some_and(|q| {
            q.send_timeout(Outgoing::Frame { kind, payload }, grace)
                .is_ok()
        })
    }

    /// Queue a page batch on `lane` (a complete frame when `sealed`, with
    /// the pages of `in_place` inserted), waiting while the lane's queue is
    /// full unless `cancel` is set.
    pub(crate) fn send_batch(
        &self,
        lane: usize,
        sealed: bool,
        bytes: Vec<u8>,
        in_place: Option<InPlace>,
        cancel: &AtomicBool,
    ) -> Result<(), TransportError> {
        let q = self
            .queues
            .get(lane)
            .ok_or(TransportError::NoSuchLane { lane })?;
        let mut item = Outgoing::Batch {
            sealed,
            bytes,
            in_place,
        };
        loop {
            match q.send_timeout(item, CANCEL_POLL) {
                Ok(()) => return Ok(()),
                Err(SendTimeoutError::Disconnected(_)) => return Err(self.error(lane)),
                Err(SendTimeoutError::Timeout(back)) => {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(TransportError::LaneClosed { lane });
                    }
                    item = back;
                }
            }
        }
    }

    fn queue(
        &self,
        lane: usize,
        item: Outgoing,
        until: Option<Instant>,
    ) -> Result<(), TransportError> {
        let q = self
            .queues
            .get(lane)
            .ok_or(TransportError::NoSuchLane { lane })?;
        let wait = until.map_or(self.stall, |u| {
            u.saturating_duration_since(Instant::now()).min(self.stall)
        });
        match q.send_timeout(item, wait) {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Disconnected(_)) => Err(self.error(lane)),
            Err(SendTimeoutError::Timeout(_)) => Err(stalled(lane, wait)),
        }
    }

    /// Why `lane`'s writer stopped.
    fn error(&self, lane: usize) -> TransportError {
        self.take_error(lane)
            .unwrap_or(TransportError::LaneClosed { lane })
    }

    /// The error `lane`'s writer stopped with, if any (taken: said once).
    fn take_error(&self, lane: usize) -> Option<TransportError> {
        let e = self.errors[lane]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        Some(TransportError::Lane {
            lane,
            source: Box::new(e),
        })
    }

    /// The first error a writer thread stopped with, if any, without waiting.
    pub(crate) fn failed(&self) -> Option<TransportError> {
        (0..self.lanes()).find_map(|lane| self.take_error(lane))
    }

    /// Let the writers send what is queued, for up to `grace`; then shut
    /// the sockets down (a peer that stopped reading must not hold the
    /// source forever) and wait for the threads.
    pub(crate) fn close(self, grace: Duration) {
        let Outbound {
            queues,
            threads,
            shutdowns,
            done,
            ..
        } = self;
        drop(queues);
        let until = Instant::now() + grace;
        let mut finished = 0;
        while finished < threads.len() {
            match done.recv_deadline(until) {
                Ok(()) => finished += 1,
                Err(_) => break,
            }
        }
        if finished < threads.len() {
            for s in &shutdowns {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            // A writer on a transport without a socket to shut down may
            // stay blocked: give it the grace once more, then leave it
            // (detached) rather than hang the caller.
            let until = Instant::now() + grace;
            while finished < threads.len() {
                match done.recv_deadline(until) {
                    Ok(()) => finished += 1,
                    Err(_) => break,
                }
            }
        }
        if finished == threads.len() {
            for t in threads {
                let _ = t.join();
            }
        }
    }
}

/// A lane that took nothing for `stall`: the peer stopped reading.
fn stalled(lane: usize, stall: Duration) -> TransportError {
    TransportError::Lane {
        lane,
        source: Box::new(TransportError::Write(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the peer took nothing on this lane for {stall:?}"),
        ))),
    }
}

/// A lane writer's loop: write what comes, flush when the queue runs dry.
fn drain_queue(
    writer: &mut LaneWriter,
    rx: &Receiver<Outgoing>,
    bucket: Option<&TokenBucket>,
    free: &Sender<Vec<u8>>,
    aborting: &AtomicBool,
    meter: &LinkMeter,
) -> Result<(), TransportError> {
    for item in rx.iter() {
        match item {
            Outgoing::Batch { bytes, .. } if aborting.load(Ordering::Acquire) => {
                let _ = free.try_send(bytes);
                continue;
            }
            Outgoing::Frame { kind, payload } => {
                // Control frames count against the cap but never wait: a Go
                // or an Abort must not sit behind the pages' debt.
                if let Some(b) = bucket {
                    let _ =
                        b.charge_at(ferry_transport::HEADER_LEN + payload.len(), Instant::now());
                }
                writer.write_frame(kind, 0, &payload)?;
            }
            Outgoing::Batch {
                sealed,
                bytes,
                in_place,
            } => {
                // Charged before it goes out: the lanes share one bucket, so
                // N writers wait off their debt together instead of each
                // bursting a batch past the cap.
                let header = if sealed {
                    0
                } else {
                    ferry_transport::HEADER_LEN
                };
                let len = bytes.len()
                    + header
                    + in_place.as_ref().map_or(0, |p| p.pages.len() * PAGE_SIZE);
                meter.begin();
                if let Some(b) = bucket {
                    b.charge(len);
                }
                let written = writer.write_batch(sealed, &bytes, in_place.as_ref());
                meter.end(len);
                written?;
                let _ = free.try_send(bytes);
            }
        }
        if rx.is_empty() {
            writer.flush()?;
        }
    }
    writer.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_meter_counts_overlapping_writes_once_and_idle_time_never() {
        let meter = LinkMeter::default();
        let t0 = Instant::now();
        meter.begin();
        meter.begin();
        std::thread::sleep(Duration::from_millis(20));
        meter.end(1000);
        meter.end(3000);
        let wall = t0.elapsed();
        let (bytes, busy) = meter.totals();
        assert_eq!(bytes, 4000);
        assert!(busy >= Duration::from_millis(20), "{busy:?}");
        // Two overlapping writers: the wall time once, not twice.
        assert!(busy <= wall, "{busy:?} busy in {wall:?}");
        // Waiting for work is not writing.
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(meter.totals(), (4000, busy));
    }
}
