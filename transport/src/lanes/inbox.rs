//! The lanes' reader threads, merged into one bounded channel.
//!
//! [`LaneInbox`] reads every lane on a thread of its own and hands frames
//! out tagged with their lane, per-lane order kept. Readers move bytes and
//! validate headers; checksums are verified by whoever consumes a frame
//! ([`ReceivedFrame::verify`]): the consumer's threads, or the readers
//! themselves when a [`LaneConsumer`] takes the frames there (the
//! engine's destination lands its page batches that way). Buffers go round: a consumer done with a frame hands its buffer
//! back ([`Recycler`]) and the next frame is read into it.
//!
//! A consumer may also take frames on the reader threads themselves
//! ([`LaneInbox::spawn_with`], one [`LaneConsumer`] per lane): each frame
//! is offered to its lane's consumer first, in the lane's order, and only
//! what it passes on goes to the channel. A frame it keeps costs no
//! hand-over, and its buffer is the one the lane's next frame is read into.
//! A small frame passed on after large ones (a round's end between page
//! batches) goes in a buffer of its own size
//! ([`ReceivedFrame::compacted`]): the lane keeps the buffer it grew.
//!
//! A receiver that waits for a session can make its lanes' buffers
//! beforehand ([`PreparedBuffers`], handed to [`LaneInbox::spawn_primed`]),
//! as it prepares guest memory: a buffer grown when the first frames
//! arrive is faulted in page by page while the session's threads compete
//! for the cores.

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

use crate::error::TransportError;
use crate::sealed::{FrameReceive, ReceivedFrame};

/// One frame from a [`LaneInbox`], or the end of its lane.
#[derive(Debug)]
pub struct LaneEvent {
    /// Which lane.
    pub lane: u16,
    /// The frame (not yet verified), or why the lane ended
    /// ([`TransportError::PeerClosed`] for a clean close).
    pub frame: Result<ReceivedFrame, TransportError>,
}

/// What a [`LaneConsumer`] did with a frame.
#[derive(Debug)]
pub enum Consumed {
    /// Taken here: the frame's buffer, which the lane's next frame is read
    /// into.
    Kept(Vec<u8>),
    /// Not taken: the frame goes on to the inbox's channel.
    PassedOn(ReceivedFrame),
}

/// Takes a lane's frames on that lane's reader thread (see
/// [`LaneInbox::spawn_with`]), one frame at a time in the lane's order,
/// before the channel would.
pub trait LaneConsumer: Send + 'static {
    /// Offered each frame the lane received (not yet verified).
    fn consume(&mut self, frame: ReceivedFrame) -> Consumed;
}

/// The consumer of [`LaneInbox::spawn`]: every frame goes to the channel.
#[derive(Debug, Clone, Copy)]
pub struct PassAll;

impl LaneConsumer for PassAll {
    fn consume(&mut self, frame: ReceivedFrame) -> Consumed {
        Consumed::PassedOn(frame)
    }
}

/// Hands spent frame buffers back to a [`LaneInbox`]'s readers.
#[derive(Debug, Clone)]
pub struct Recycler(Sender<Vec<u8>>);

impl Recycler {
    /// Gives `buffer` back (dropped when enough wait already).
    pub fn recycle(&self, buffer: Vec<u8>) {
        if buffer.capacity() > 0 {
            let _ = self.0.try_send(buffer);
        }
    }
}

/// Reader threads, one per lane, merged into one bounded channel. Each
/// thread ends when its lane ends, or at the next frame it passes on after
/// the inbox is dropped.
#[derive(Debug)]
pub struct LaneInbox {
    rx: Receiver<LaneEvent>,
    threads: Vec<JoinHandle<()>>,
    recycler: Recycler,
    lanes: usize,
}

impl LaneInbox {
    /// Starts one reader thread per lane; at most `depth` frames wait
    /// unread.
    pub fn spawn(readers: Vec<(u16, Box<dyn FrameReceive>)>, depth: usize) -> LaneInbox {
        Self::spawn_with(readers, depth, |_| PassAll)
    }

    /// [`LaneInbox::spawn`], with each frame offered first to its lane's
    /// consumer (`consumer_for(lane)`) on the lane's reader thread: only
    /// the frames it passes on, and the lane's end, reach the channel.
    pub fn spawn_with<C: LaneConsumer>(
        readers: Vec<(u16, Box<dyn FrameReceive>)>,
        depth: usize,
        consumer_for: impl FnMut(u16) -> C,
    ) -> LaneInbox {
        Self::spawn_primed(readers, depth, Vec::new(), consumer_for)
    }

    /// [`LaneInbox::spawn_with`], with `buffers` (made ready beforehand,
    /// see [`PreparedBuffers`]) put in the readers' shared pool of spare
    /// buffers before they start: each reader takes one for its first
    /// frame, where it would otherwise grow an empty one as the frame
    /// arrives. Buffers beyond what the pool holds are dropped.
    pub fn spawn_primed<C: LaneConsumer>(
        readers: Vec<(u16, Box<dyn FrameReceive>)>,
        depth: usize,
        buffers: Vec<Vec<u8>>,
        mut consumer_for: impl FnMut(u16) -> C,
    ) -> LaneInbox {
        let lanes = readers.len();
        let (tx, rx) = bounded(depth.max(1));
        let (spare_tx, spare) = bounded(2 * depth.max(1) + 8 * lanes);
        for buffer in buffers {
            if spare_tx.try_send(buffer).is_err() {
                break;
            }
        }
        let threads = readers
            .into_iter()
            .map(|(lane, mut reader)| {
                let (tx, spare) = (tx.clone(), spare.clone());
                let mut consumer = consumer_for(lane);
                // The buffer of the last frame the consumer kept.
                let mut kept = None;
                std::thread::Builder::new()
                    .name(format!("ferry-lane-rx-{lane}"))
                    .spawn(move || loop {
                        let buf = kept
                            .take()
                            .unwrap_or_else(|| spare.try_recv().unwrap_or_default());
                        let frame = match reader.receive(buf) {
                            Ok(frame) => match consumer.consume(frame) {
                                Consumed::Kept(buf) => {
                                    kept = Some(buf);
                                    continue;
                                }
                                Consumed::PassedOn(frame) => {
                                    // A small frame leaves in a buffer of
                                    // its own; the lane keeps the one it
                                    // grew for its bulk frames.
                                    let (frame, buf) = frame.compacted();
                                    kept = buf;
                                    Ok(frame)
                                }
                            },
                            Err(e) => Err(e),
                        };
                        let end = frame.is_err();
                        if tx.send(LaneEvent { lane, frame }).is_err() || end {
                            return;
                        }
                    })
                    .expect("spawning a lane reader thread")
            })
            .collect();
        LaneInbox {
            rx,
            threads,
            recycler: Recycler(spare_tx),
            lanes,
        }
    }

    /// Number of lanes read.
    pub fn lanes(&self) -> usize {
        self.lanes
    }

    /// The next frame from any lane (per-lane order kept), or `None` once
    /// every lane has ended and its end was delivered.
    pub fn recv(&self) -> Option<LaneEvent> {
        self.rx.recv().ok()
    }

    /// [`LaneInbox::recv`] within `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<LaneEvent, RecvTimeoutError> {
        self.rx.recv_timeout(timeout)
    }

    /// [`LaneInbox::recv`] until `until`; `None` when it passed or every
    /// lane ended.
    pub fn recv_deadline(&self, until: Instant) -> Option<LaneEvent> {
        self.rx.recv_deadline(until).ok()
    }

    /// The underlying channel (for `select!`, or to poll).
    pub fn receiver(&self) -> &Receiver<LaneEvent> {
        &self.rx
    }

    /// Where consumers hand spent buffers back.
    pub fn recycler(&self) -> Recycler {
        self.recycler.clone()
    }

    /// Waits for the reader threads (after their lanes ended).
    pub fn join(self) {
        drop(self.rx);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Frame buffers made (and their memory faulted in) before a session
/// starts, for its lane readers ([`LaneInbox::spawn_primed`]). Shared: a
/// receiver prepares them while it waits, and the session that comes
/// takes them.
///
/// ```
/// use ferry_transport::lanes::PreparedBuffers;
///
/// let buffers = PreparedBuffers::default();
/// buffers.prepare(4, 1 << 20);
/// let taken = buffers.take(2);
/// assert_eq!(taken.len(), 2);
/// assert!(taken.iter().all(|b| b.len() == 1 << 20));
/// assert_eq!(buffers.len(), 2);
/// ```
#[derive(Debug, Clone, Default)]
pub struct PreparedBuffers(Arc<Mutex<Vec<Vec<u8>>>>);

impl PreparedBuffers {
    /// Makes ready buffers until `count` wait, each of `bytes` bytes, every
    /// page of them written once (so the frames read into them later fault
    /// nothing in). A frame longer than `bytes` grows its buffer as usual.
    pub fn prepare(&self, count: usize, bytes: usize) {
        // Made outside the lock: a session that starts meanwhile takes
        // what is ready without waiting for the page faults.
        let missing = count.saturating_sub(self.len());
        let made: Vec<Vec<u8>> = (0..missing)
            .map(|_| {
                // `resize` writes the zeros: `vec![0; n]` takes the kernel's
                // zeroed pages untouched, which is what this is here to avoid.
                #[allow(clippy::slow_vector_initialization)]
                let mut buffer = Vec::with_capacity(bytes);
                buffer.resize(bytes, 0);
                buffer
            })
            .collect();
        let mut ready = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let room = count.saturating_sub(ready.len());
        ready.extend(made.into_iter().take(room));
    }

    /// Up to `n` of the buffers made ready (fewer when fewer wait).
    pub fn take(&self, n: usize) -> Vec<Vec<u8>> {
        let mut ready = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let keep = ready.len().saturating_sub(n);
        ready.split_off(keep)
    }

    /// Drops every buffer waiting.
    pub fn clear(&self) {
        drop(self.take(usize::MAX));
    }

    /// Buffers waiting.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, FrameKind};
    use crate::stream::FrameReader;

    /// Keeps page batches, noting the address of each one's buffer; passes
    /// everything else on.
    struct KeepBatches(std::sync::mpsc::Sender<usize>);

    impl LaneConsumer for KeepBatches {
        fn consume(&mut self, frame: ReceivedFrame) -> Consumed {
            if frame.kind() != FrameKind::PageBatch {
                return Consumed::PassedOn(frame);
            }
            let buf = frame.into_buffer();
            let _ = self.0.send(buf.as_ptr() as usize);
            Consumed::Kept(buf)
        }
    }

    #[test]
    fn a_round_end_between_batches_leaves_the_lane_its_grown_buffer() {
        let mut wire = Vec::new();
        let batch = vec![3u8; 512 << 10];
        for (kind, payload) in [
            (FrameKind::PageBatch, &batch[..]),
            (FrameKind::RoundEnd, &b"end of round 1"[..]),
            (FrameKind::PageBatch, &batch[..]),
        ] {
            encode_frame(kind, 0, payload, &mut wire).unwrap();
        }
        let (tx, batches) = std::sync::mpsc::channel();
        let reader: Box<dyn FrameReceive> = Box::new(FrameReader::new(std::io::Cursor::new(wire)));
        let inbox = LaneInbox::spawn_with(vec![(0, reader)], 4, |_| KeepBatches(tx.clone()));
        drop(tx);
        // The round end comes through (and is held here, with its buffer,
        // while the second batch is read), then the lane's clean end.
        let end = inbox.recv().unwrap();
        let end = end.frame.unwrap();
        assert_eq!(end.kind(), FrameKind::RoundEnd);
        assert!(matches!(
            inbox.recv().unwrap().frame,
            Err(TransportError::PeerClosed)
        ));
        let at: Vec<usize> = batches.iter().collect();
        assert_eq!(at.len(), 2);
        assert_eq!(at[0], at[1], "the second batch was read into a new buffer");
        assert_eq!(end.verify().unwrap(), b"end of round 1");
        inbox.join();
    }

    #[test]
    fn a_primed_lane_reads_its_first_frames_into_the_buffer_made_for_it() {
        let mut wire = Vec::new();
        let batch = vec![5u8; 768 << 10];
        for _ in 0..2 {
            encode_frame(FrameKind::PageBatch, 0, &batch, &mut wire).unwrap();
        }
        let prepared = PreparedBuffers::default();
        prepared.prepare(1, 1 << 20);
        let primed = prepared.take(1);
        assert!(prepared.is_empty());
        let at = primed[0].as_ptr() as usize;
        let (tx, batches) = std::sync::mpsc::channel();
        let reader: Box<dyn FrameReceive> = Box::new(FrameReader::new(std::io::Cursor::new(wire)));
        let inbox =
            LaneInbox::spawn_primed(vec![(0, reader)], 4, primed, |_| KeepBatches(tx.clone()));
        drop(tx);
        assert!(matches!(
            inbox.recv().unwrap().frame,
            Err(TransportError::PeerClosed)
        ));
        let got: Vec<usize> = batches.iter().collect();
        assert_eq!(got, vec![at, at], "a batch was read into another buffer");
        inbox.join();
    }

    /// Minor page faults of this thread so far.
    fn minor_faults() -> i64 {
        // SAFETY: an all-zero `rusage` is a valid value; getrusage fills it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `usage` is a valid, writable rusage.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
        assert_eq!(rc, 0);
        usage.ru_minflt
    }

    #[test]
    fn prepared_buffers_are_faulted_in_before_they_are_taken() {
        // Larger than glibc's largest mmap threshold (32 MiB), so each
        // buffer is a fresh mapping whatever other tests freed before:
        // one left to fault in on first write would fault at least once
        // per 2 MiB.
        const BYTES: usize = 33 << 20;
        let prepared = PreparedBuffers::default();
        prepared.prepare(2, BYTES);
        prepared.prepare(2, BYTES);
        assert_eq!(prepared.len(), 2, "prepare tops up to the count");
        let mut buffers = prepared.take(3);
        assert_eq!(buffers.len(), 2);
        assert!(prepared.is_empty());
        let before = minor_faults();
        for buffer in &mut buffers {
            buffer.fill(7);
        }
        let faults = minor_faults() - before;
        assert!(faults < 8, "{faults} page faults writing prepared buffers");
        prepared.prepare(1, 4096);
        prepared.clear();
        assert!(prepared.is_empty());
    }
}
