//! The lanes' writer threads: one per lane, fed by a bounded queue. The
//! engine and the tunnel both send through [`LaneQueues`].
//!
//! A producer that runs ahead of the network blocks (back-pressure) instead
//! of growing a queue without bound. What a queue holds:
//!
//! - *sealed frames* ([`SealedFrame`]), built and checksummed on the
//!   producer's thread: the writer only moves their bytes;
//! - *bulk frames* ([`OutFrame`]), framed and checksummed by the writer;
//! - *control frames* ([`OutFrame`] through [`LaneQueues::send_control`]).
//!
//! The session's one [`TokenBucket`] caps all lanes together: sealed and
//! bulk frames are charged before they go out and wait off the debt;
//! control frames are charged but never wait, so a Go or an Abort never
//! sits behind the pages' debt. [`LaneQueues::abort`] drops the queued
//! sealed and bulk frames and sends its frame first. A lane whose queue
//! takes nothing for the stall time is reported failed, by its index.
//!
//! How a lane writes is a [`LaneSink`]: a plaintext socket that gathers
//! pages in place ([`SocketSink`]), any byte stream (TLS), io_uring
//! zero-copy ([`ZeroCopySink`]) or any [`FrameSink`] ([`FramedSink`]).

use std::io::{IoSlice, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{bounded, Receiver, SendTimeoutError, Sender};

use super::{lane_for_page, LaneCloser, TokenBucket};
use crate::error::TransportError;
use crate::frame::{FrameKind, HEADER_LEN};
use crate::sealed::SealedFrame;
use crate::stream::{FrameSink, FrameWriter};
use crate::zerocopy::ZcSender;

/// A frame the writer thread frames and checksums; its payload is the
/// concatenation of `parts`.
#[derive(Debug, Clone)]
pub struct OutFrame {
    /// Kind.
    pub kind: FrameKind,
    /// Flags.
    pub flags: u32,
    /// Payload parts, written in order with one vectored write.
    pub parts: Vec<Bytes>,
}

impl OutFrame {
    /// A frame with a single payload part.
    pub fn new(kind: FrameKind, flags: u32, payload: impl Into<Bytes>) -> OutFrame {
        OutFrame {
            kind,
            flags,
            parts: vec![payload.into()],
        }
    }

    fn wire_len(&self) -> usize {
        HEADER_LEN + self.parts.iter().map(Bytes::len).sum::<usize>()
    }
}

/// How a lane writes frames. One implementation per way of writing; all
/// pass the lane conformance tests (`tests/lanes.rs`).
pub trait LaneSink: Send {
    /// Frames (header and checksum here) and sends one frame.
    fn send_frame(
        &mut self,
        kind: FrameKind,
        flags: u32,
        parts: &[IoSlice<'_>],
    ) -> Result<(), TransportError>;

    /// [`LaneSink::send_frame`] for an owned frame (a zero-copy sink keeps
    /// it until the kernel releases it).
    fn send_owned(&mut self, frame: OutFrame) -> Result<(), TransportError> {
        let parts: Vec<IoSlice<'_>> = frame.parts.iter().map(|p| IoSlice::new(p)).collect();
        self.send_frame(frame.kind, frame.flags, &parts)
    }

    /// Sends a frame sealed by its producer; returns its buffer for reuse
    /// when the sink is done with it.
    fn send_sealed(&mut self, frame: SealedFrame) -> Result<Option<Vec<u8>>, TransportError>;

    /// Pushes out everything sent so far.
    fn flush(&mut self) -> Result<(), TransportError>;

    /// Whether [`LaneSink::send_sealed`] takes frames with parts left in
    /// place ([`SealedFrame::seal_gathered`]).
    fn gathers(&self) -> bool {
        false
    }
}

/// The control sink of a lane, for frames answered synchronously (the
/// destination's replies).
impl FrameSink for Box<dyn LaneSink> {
    fn send_vectored(
        &mut self,
        kind: FrameKind,
        flags: u32,
        parts: &[IoSlice<'_>],
    ) -> Result<(), TransportError> {
        self.send_frame(kind, flags, parts)
    }
    fn flush(&mut self) -> Result<(), TransportError> {
        LaneSink::flush(&mut **self)
    }
}

fn not_gathering() -> TransportError {
    TransportError::Write(std::io::Error::other(
        "a frame with parts left in place on a lane that cannot gather them",
    ))
}

/// Any byte stream (a TLS session, a plain socket without gathering):
/// sealed frames are written as they are.
impl<W: Write + Send> LaneSink for FrameWriter<W> {
    fn send_frame(
        &mut self,
        kind: FrameKind,
        flags: u32,
        parts: &[IoSlice<'_>],
    ) -> Result<(), TransportError> {
        self.write_frame_vectored(kind, flags, parts)
    }
    fn send_sealed(&mut self, frame: SealedFrame) -> Result<Option<Vec<u8>>, TransportError> {
        let bytes = frame.contiguous().ok_or_else(not_gathering)?;
        self.get_mut()
            .write_all(bytes)
            .map_err(TransportError::Write)?;
        Ok(Some(frame.into_buffer()))
    }
    fn flush(&mut self) -> Result<(), TransportError> {
        FrameWriter::flush(self)
    }
}

/// A plaintext TCP socket: sealed frames leave with one `sendmsg` that
/// gathers their parts left in place (guest pages) from where they are.
#[derive(Debug)]
pub struct SocketSink(FrameWriter<TcpStream>);

impl SocketSink {
    /// Writes to `socket`.
    pub fn new(socket: TcpStream) -> SocketSink {
        SocketSink(FrameWriter::new(socket))
    }
}

impl LaneSink for SocketSink {
    fn send_frame(
        &mut self,
        kind: FrameKind,
        flags: u32,
        parts: &[IoSlice<'_>],
    ) -> Result<(), TransportError> {
        self.0.write_frame_vectored(kind, flags, parts)
    }
    fn send_sealed(&mut self, frame: SealedFrame) -> Result<Option<Vec<u8>>, TransportError> {
        match frame.contiguous() {
            Some(bytes) => self.0.get_mut().write_all(bytes),
            None => frame.send_to(self.0.get_ref()),
        }
        .map_err(TransportError::Write)?;
        Ok(Some(frame.into_buffer()))
    }
    fn flush(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
    fn gathers(&self) -> bool {
        true
    }
}

/// Any [`FrameSink`] (the seam for other transports): it frames and
/// checksums every frame itself, so a sealed frame's payload is framed
/// again.
#[derive(Debug)]
pub struct FramedSink<S>(pub S);

impl<S: FrameSink + Send> LaneSink for FramedSink<S> {
    fn send_frame(
        &mut self,
        kind: FrameKind,
        flags: u32,
        parts: &[IoSlice<'_>],
    ) -> Result<(), TransportError> {
        self.0.send_vectored(kind, flags, parts)
    }
    fn send_sealed(&mut self, frame: SealedFrame) -> Result<Option<Vec<u8>>, TransportError> {
        let bytes = frame.contiguous().ok_or_else(not_gathering)?;
        self.0.send_vectored(
            frame.kind(),
            frame.flags(),
            &[IoSlice::new(&bytes[HEADER_LEN..])],
        )?;
        Ok(Some(frame.into_buffer()))
    }
    fn flush(&mut self) -> Result<(), TransportError> {
        self.0.flush()
    }
}

/// io_uring zero-copy sends: frames stay owned until the kernel releases
/// them (their buffers are not reused).
#[derive(Debug)]
pub struct ZeroCopySink(ZcSender);

impl ZeroCopySink {
    /// Sends on `socket` (plaintext) with up to `depth` frames in flight.
    pub fn new(socket: TcpStream, depth: usize) -> Result<ZeroCopySink, TransportError> {
        Ok(ZeroCopySink(ZcSender::new(socket, depth)?))
    }
}

impl LaneSink for ZeroCopySink {
    fn send_frame(
        &mut self,
        kind: FrameKind,
        flags: u32,
        parts: &[IoSlice<'_>],
    ) -> Result<(), TransportError> {
        self.0.send_vectored(kind, flags, parts)
    }
    fn send_owned(&mut self, frame: OutFrame) -> Result<(), TransportError> {
        self.0.send_owned(frame)
    }
    fn send_sealed(&mut self, frame: SealedFrame) -> Result<Option<Vec<u8>>, TransportError> {
        if frame.is_gathered() {
            return Err(not_gathering());
        }
        self.0.send_sealed(Bytes::from(frame.into_buffer()))?;
        Ok(None)
    }
    fn flush(&mut self) -> Result<(), TransportError> {
        self.0.flush()
    }
}

/// Settings of a set of lane queues.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// Frames a lane's queue holds before its producers wait.
    pub depth: usize,
    /// A lane whose queue takes a control frame for this long has failed
    /// (the peer stopped reading).
    pub stall: Duration,
    /// The session's bandwidth cap (its rate may change while it runs).
    pub bucket: Option<Arc<TokenBucket>>,
}

impl QueueOptions {
    /// `depth` frames per queue, a 30 s stall, no cap.
    pub fn new(depth: usize) -> QueueOptions {
        QueueOptions {
            depth,
            stall: Duration::from_secs(30),
            bucket: None,
        }
    }
}

/// How fast the lanes take sealed and bulk frames while they write: bytes
/// written and the time at least one writer was busy writing (waits on the
/// bandwidth cap included, waits for work not). Bytes over busy time is the
/// link's rate as the producers see it, whether they or the link are the
/// bottleneck.
///
/// It also tells which of the two it is ([`LinkTotals::cpu_share`]): the
/// writer threads' time on a CPU or waiting for one (the scheduler's own
/// figures, `/proc/self/task/<tid>/schedstat`) against their writing time.
/// Near 1, writing is CPU work on busy cores (loopback, where the kernel's
/// copy and TCP run on the writer's core, which the encoders and the guest
/// share); near 0, the writers sleep on the link (a full send buffer on a
/// slower link, a cap).
#[derive(Debug, Default)]
pub struct LinkMeter {
    state: Mutex<MeterState>,
    /// The writer threads' ids, while they run.
    writers: Mutex<Vec<libc::pid_t>>,
}

#[derive(Debug, Default)]
struct MeterState {
    active: u32,
    since: Option<Instant>,
    busy: Duration,
    bytes: u64,
    /// Writing time summed over writers (overlaps counted per writer).
    writing: Duration,
}

/// What a [`LinkMeter`] has counted so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkTotals {
    /// Bytes written.
    pub bytes: u64,
    /// Time at least one writer was writing.
    pub busy: Duration,
    /// Writing time summed over the writers, finished writes only.
    pub writing: Duration,
    /// The running writer threads' time on a CPU and waiting for one, in
    /// all; `None` where the scheduler's figures cannot be read.
    pub writers_on_cpu: Option<Duration>,
}

impl LinkTotals {
    /// The writers' time on a CPU or waiting for one over their writing
    /// time since `earlier` (0..=1); `None` without a finished write or
    /// the scheduler's figures in both.
    pub fn cpu_share(&self, earlier: &LinkTotals) -> Option<f64> {
        let wall = self.writing.saturating_sub(earlier.writing);
        let cpu = self.writers_on_cpu?.checked_sub(earlier.writers_on_cpu?)?;
        (!wall.is_zero()).then(|| (cpu.as_secs_f64() / wall.as_secs_f64()).clamp(0.0, 1.0))
    }
}

/// A thread's time on a CPU and waiting on a run queue, from the first two
/// fields of `/proc/self/task/<tid>/schedstat` (nanoseconds); `None` if it
/// cannot be read.
fn on_cpu_and_waiting(tid: libc::pid_t) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    let mut fields = text.split_ascii_whitespace().map(str::parse::<u64>);
    let on_cpu = fields.next()?.ok()?;
    let waiting = fields.next()?.ok()?;
    Some(Duration::from_nanos(on_cpu.saturating_add(waiting)))
}

impl LinkMeter {
    fn begin(&self) -> Instant {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.active == 0 {
            s.since = Some(now);
        }
        s.active += 1;
        now
    }

    /// Ends the write of `bytes` begun at `began`.
    fn end(&self, bytes: usize, began: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.active = s.active.saturating_sub(1);
        s.bytes += bytes as u64;
        s.writing += began.elapsed();
        if s.active == 0 {
            if let Some(since) = s.since.take() {
                s.busy += since.elapsed();
            }
        }
    }

    /// Counts the calling thread as a writer until the guard drops.
    fn writer_thread(self: &Arc<Self>) -> WriterThread {
        // SAFETY: gettid has no preconditions and cannot fail.
        let tid = unsafe { libc::gettid() };
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tid);
        WriterThread {
            meter: Arc::clone(self),
            tid,
        }
    }

    /// What the writers did so far (a write in progress counts in `busy`).
    pub fn totals(&self) -> LinkTotals {
        let tids = self
            .writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let writers_on_cpu = (!tids.is_empty())
            .then(|| tids.into_iter().map(on_cpu_and_waiting).sum())
            .flatten();
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let running = s.since.map_or(Duration::ZERO, |t| t.elapsed());
        LinkTotals {
            bytes: s.bytes,
            busy: s.busy + running,
            writing: s.writing,
            writers_on_cpu,
        }
    }
}

/// A writer thread counted by its [`LinkMeter`]: uncounted on drop.
struct WriterThread {
    meter: Arc<LinkMeter>,
    tid: libc::pid_t,
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        let mut writers = self.meter.writers.lock().unwrap_or_else(|p| p.into_inner());
        writers.retain(|&t| t != self.tid);
    }
}

/// Something queued on a lane.
enum Queued {
    Control(OutFrame),
    Bulk(OutFrame),
    Sealed(SealedFrame),
}

type ErrorSlot = Arc<Mutex<Option<TransportError>>>;

/// How often a producer waiting on a full queue checks for cancellation.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// A bucket rate at or above this (1 TB/s) is no cap: it is what a session
/// that may be capped later starts with.
const UNCAPPED_FROM: f64 = 1e12;

/// Writer threads, one per lane, each behind a bounded queue.
#[derive(Debug)]
pub struct LaneQueues {
    queues: Vec<Sender<Queued>>,
    errors: Vec<ErrorSlot>,
    threads: Vec<JoinHandle<()>>,
    done: Receiver<()>,
    closers: Vec<LaneCloser>,
    /// Set by [`LaneQueues::abort`]: writers drop what is queued but
    /// control frames.
    aborting: Arc<AtomicBool>,
    stall: Duration,
    meter: Arc<LinkMeter>,
    bucket: Option<Arc<TokenBucket>>,
    /// Buffers of sealed frames sent, for the producers to reuse.
    spare: Receiver<Vec<u8>>,
    gathers: bool,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Queued::Control(o) | Queued::Bulk(o) => o.fmt(f),
            Queued::Sealed(s) => s.fmt(f),
        }
    }
}

impl LaneQueues {
    /// Starts one writer thread per sink (lane index = position). `closers`
    /// shut the lanes down when [`LaneQueues::close`] runs out of patience.
    pub fn spawn(
        sinks: Vec<Box<dyn LaneSink>>,
        closers: Vec<LaneCloser>,
        opts: QueueOptions,
    ) -> LaneQueues {
        let depth = opts.depth.max(1);
        let gathers = !sinks.is_empty() && sinks.iter().all(|s| s.gathers());
        let (done_tx, done) = crossbeam_channel::unbounded();
        let (spare_tx, spare) = bounded(2 * depth * sinks.len() + 16);
        let mut out = LaneQueues {
            queues: Vec::with_capacity(sinks.len()),
            errors: Vec::with_capacity(sinks.len()),
            threads: Vec::with_capacity(sinks.len()),
            done,
            closers,
            aborting: Arc::new(AtomicBool::new(false)),
            stall: opts.stall,
            meter: Arc::default(),
            bucket: opts.bucket,
            spare,
            gathers,
        };
        for (lane, mut sink) in sinks.into_iter().enumerate() {
            let (tx, rx) = bounded::<Queued>(depth);
            let slot = ErrorSlot::default();
            let writer = Writer {
                bucket: out.bucket.clone(),
                spare: spare_tx.clone(),
                aborting: Arc::clone(&out.aborting),
                meter: Arc::clone(&out.meter),
            };
            let (done_tx, thread_slot) = (done_tx.clone(), Arc::clone(&slot));
            let handle = std::thread::Builder::new()
                .name(format!("ferry-lane-{lane}"))
                .spawn(move || {
                    let _counted = writer.meter.writer_thread();
                    if let Err(e) = writer.drain(&mut *sink, &rx) {
                        *thread_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    }
                    let _ = done_tx.send(());
                })
                .expect("spawning a lane writer thread");
            out.queues.push(tx);
            out.errors.push(slot);
            out.threads.push(handle);
        }
        out
    }

    /// Number of lanes.
    pub fn lanes(&self) -> usize {
        self.queues.len()
    }

    /// Whether every lane sends sealed frames with parts left in place.
    pub fn gathers(&self) -> bool {
        self.gathers
    }

    /// The bandwidth cap all lanes share now, bytes/s, if any.
    pub fn cap(&self) -> Option<f64> {
        self.bucket
            .as_ref()
            .map(|b| b.rate())
            .filter(|&r| r < UNCAPPED_FROM)
    }

    /// What the writers measured of the link.
    pub fn meter(&self) -> &LinkMeter {
        &self.meter
    }

    /// A buffer of a sealed frame already sent, to build the next one in.
    pub fn spare_buffer(&self) -> Option<Vec<u8>> {
        self.spare.try_recv().ok()
    }

    /// Queues a bulk frame on `lane`, blocking while that lane's queue is
    /// full.
    pub fn send(&self, lane: usize, frame: OutFrame) -> Result<(), TransportError> {
        let q = self.queue(lane)?;
        q.send(Queued::Bulk(frame)).map_err(|_| self.error(lane))
    }

    /// Queues a bulk frame of pages starting at `first_page` on that page's
    /// lane.
    pub fn send_pages(&self, first_page: u64, frame: OutFrame) -> Result<(), TransportError> {
        self.send(lane_for_page(first_page, self.queues.len()), frame)
    }

    /// Queues a sealed frame on `lane`, waiting while the lane's queue is
    /// full unless `cancel` is set (then the lane counts as closed).
    pub fn send_sealed(
        &self,
        lane: usize,
        frame: SealedFrame,
        cancel: &AtomicBool,
    ) -> Result<(), TransportError> {
        let q = self.queue(lane)?;
        let mut item = Queued::Sealed(frame);
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

    /// Queues a control frame on `lane`, waiting for room until `until` at
    /// the latest, and never longer than the stall time (then the lane has
    /// failed: the peer stopped reading).
    pub fn send_control(
        &self,
        lane: usize,
        frame: OutFrame,
        until: Option<Instant>,
    ) -> Result<(), TransportError> {
        let q = self.queue(lane)?;
        let wait = until.map_or(self.stall, |u| {
            u.saturating_duration_since(Instant::now()).min(self.stall)
        });
        match q.send_timeout(Queued::Control(frame), wait) {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Disconnected(_)) => Err(self.error(lane)),
            Err(SendTimeoutError::Timeout(_)) => Err(stalled(lane, wait)),
        }
    }

    /// Queues a copy of control frame `frame` on every lane (a round
    /// marker); waits as [`LaneQueues::send_control`].
    pub fn broadcast(
        &self,
        frame: &OutFrame,
        until: Option<Instant>,
    ) -> Result<(), TransportError> {
        (0..self.queues.len()).try_for_each(|lane| self.send_control(lane, frame.clone(), until))
    }

    /// After a failure: every writer drops the sealed and bulk frames still
    /// queued, and `frame` (an Abort) goes out on lane 0, waiting at most
    /// `grace` for room. Whether it was queued.
    pub fn abort(&self, frame: OutFrame, grace: Duration) -> bool {
        self.aborting.store(true, Ordering::Release);
        self.queues
            .first()
            .is_some_and(|q| q.send_timeout(Queued::Control(frame), grace).is_ok())
    }

    fn queue(&self, lane: usize) -> Result<&Sender<Queued>, TransportError> {
        self.queues
            .get(lane)
            .ok_or(TransportError::NoSuchLane { lane })
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

    /// The first error a writer stopped with, if any, without waiting.
    pub fn failed(&self) -> Option<TransportError> {
        (0..self.lanes()).find_map(|lane| self.take_error(lane))
    }

    /// Drains every queue, flushes, stops the threads; the first lane's
    /// error, if any. Waits as long as the peer takes to read.
    pub fn finish(self) -> Result<(), TransportError> {
        let LaneQueues {
            queues,
            errors,
            threads,
            ..
        } = self;
        drop(queues);
        for t in threads {
            let _ = t.join();
        }
        (0..errors.len())
            .find_map(|lane| {
                let e = errors[lane]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()?;
                Some(TransportError::Lane {
                    lane,
                    source: Box::new(e),
                })
            })
            .map_or(Ok(()), Err)
    }

    /// Lets the writers send what is queued, for up to `grace`; then shuts
    /// the lanes down (a peer that stopped reading must not hold the
    /// sender forever) and waits for the threads as long again. A writer
    /// on a sink without a lane to shut down may stay blocked: it is left
    /// behind (detached) rather than hang the caller.
    pub fn close(self, grace: Duration) {
        let LaneQueues {
            queues,
            threads,
            closers,
            done,
            ..
        } = self;
        drop(queues);
        let wait = |finished: &mut usize| {
            let until = Instant::now() + grace;
            while *finished < threads.len() {
                match done.recv_deadline(until) {
                    Ok(()) => *finished += 1,
                    Err(_) => break,
                }
            }
        };
        let mut finished = 0;
        wait(&mut finished);
        if finished < threads.len() {
            closers.iter().for_each(LaneCloser::close);
            wait(&mut finished);
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

/// What a writer thread shares with the others.
struct Writer {
    bucket: Option<Arc<TokenBucket>>,
    spare: Sender<Vec<u8>>,
    aborting: Arc<AtomicBool>,
    meter: Arc<LinkMeter>,
}

impl Writer {
    /// Writes what comes, flushing when the queue runs dry.
    fn drain(&self, sink: &mut dyn LaneSink, rx: &Receiver<Queued>) -> Result<(), TransportError> {
        for item in rx.iter() {
            match item {
                Queued::Control(frame) => {
                    // Counts against the cap but never waits: a Go or an
                    // Abort must not sit behind the pages' debt.
                    if let Some(b) = &self.bucket {
                        let _ = b.charge_at(frame.wire_len(), Instant::now());
                    }
                    sink.send_owned(frame)?;
                }
                Queued::Sealed(frame) if self.aborting.load(Ordering::Acquire) => {
                    let _ = self.spare.try_send(frame.into_buffer());
                }
                Queued::Bulk(_) if self.aborting.load(Ordering::Acquire) => {}
                Queued::Sealed(frame) => {
                    let (len, span) = self.charge(frame.wire_len());
                    let sent = sink.send_sealed(frame);
                    self.meter.end(len, span);
                    if let Some(buffer) = sent? {
                        let _ = self.spare.try_send(buffer);
                    }
                }
                Queued::Bulk(frame) => {
                    let (len, span) = self.charge(frame.wire_len());
                    let sent = sink.send_owned(frame);
                    self.meter.end(len, span);
                    sent?;
                }
            }
            if rx.is_empty() {
                sink.flush()?;
            }
        }
        sink.flush()
    }

    /// Starts a bulk write of `len` bytes: charged before it goes out, so
    /// the lanes sharing one bucket wait off their debt together instead of
    /// each bursting a frame past the cap.
    fn charge(&self, len: usize) -> (usize, Instant) {
        let span = self.meter.begin();
        if let Some(b) = &self.bucket {
            b.charge(len);
        }
        (len, span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_meter_counts_overlapping_writes_once_and_idle_time_never() {
        let meter = LinkMeter::default();
        let t0 = Instant::now();
        let a = meter.begin();
        let b = meter.begin();
        std::thread::sleep(Duration::from_millis(20));
        meter.end(1000, a);
        meter.end(3000, b);
        let wall = t0.elapsed();
        let totals = meter.totals();
        assert_eq!(totals.bytes, 4000);
        assert!(totals.busy >= Duration::from_millis(20), "{totals:?}");
        // Two overlapping writers: the wall time once, not twice.
        assert!(totals.busy <= wall, "{totals:?} in {wall:?}");
        // ... but their writing time each.
        assert!(totals.writing >= Duration::from_millis(40), "{totals:?}");
        // Waiting for work is not writing.
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(meter.totals(), totals);
    }

    #[test]
    fn the_link_meter_tells_a_writer_that_waits_from_one_that_works() {
        let meter = Arc::new(LinkMeter::default());
        let start = meter.totals();
        assert_eq!(start.writers_on_cpu, None, "no writer yet");
        let writer = {
            let meter = Arc::clone(&meter);
            move || {
                let _counted = meter.writer_thread();
                // A write that waits (a full send buffer, a cap): no CPU.
                let began = meter.begin();
                std::thread::sleep(Duration::from_millis(40));
                meter.end(1, began);
                let waited = meter.totals();
                // A write that works (the kernel's copy on loopback).
                let began = meter.begin();
                let t0 = Instant::now();
                let mut x = 0u64;
                while t0.elapsed() < Duration::from_millis(40) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
                meter.end(1, began);
                (waited, meter.totals())
            }
        };
        let (waited, worked) = std::thread::spawn(writer).join().expect("writer");
        let slept = waited.cpu_share(&LinkTotals {
            writers_on_cpu: Some(Duration::ZERO),
            ..start
        });
        let slept = slept.expect("schedstat readable here");
        // The thread's whole life so far, spawn included, is in `slept`:
        // well under the sleep's 40 ms still.
        assert!(slept < 0.5, "a sleeping writer's share {slept}");
        let busy = worked.cpu_share(&waited).expect("schedstat readable here");
        // On a CPU or waiting for one, the whole spin.
        assert!(busy > 0.8, "a spinning writer's share {busy}");
        assert_eq!(meter.totals().writers_on_cpu, None, "the writer left");
    }
}
