//! Bounded per-lane send queues and a merged receiver.
//!
//! [`LaneQueues`] gives every lane a writer thread fed by a bounded channel:
//! a producer that runs ahead of the network blocks in [`LaneQueues::send`]
//! (back-pressure) instead of growing a queue without bound. Payloads are
//! [`Bytes`], so a page can be queued without copying it (`Bytes::from_owner`
//! over guest memory) and written with one vectored write.
//! [`LaneInbox`] reads all lanes on one thread each and hands frames out
//! through one bounded channel, tagged with their lane.

use std::io::IoSlice;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use crossbeam_channel::{bounded, Receiver, Sender};

use super::{lane_for_page, LaneRead, LaneWrite, RawLane, TokenBucket};
use crate::error::TransportError;
use crate::frame::{Frame, FrameKind};
use crate::stream::{FrameReader, FrameWriter};
use crate::zerocopy::ZcSender;

/// A frame waiting in a send queue; its payload is the concatenation of `parts`.
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
}

type ErrorSlot = Arc<Mutex<Option<TransportError>>>;

/// What a lane's writer thread sends queued frames through.
pub trait QueuedSink: Send {
    /// Sends (or queues in the kernel) one owned frame.
    fn put(&mut self, frame: OutFrame) -> Result<(), TransportError>;
    /// Pushes out everything put so far.
    fn flush(&mut self) -> Result<(), TransportError>;
}

impl QueuedSink for FrameWriter<LaneWrite> {
    fn put(&mut self, f: OutFrame) -> Result<(), TransportError> {
        let slices: Vec<IoSlice<'_>> = f.parts.iter().map(|p| IoSlice::new(p)).collect();
        self.write_frame_vectored(f.kind, f.flags, &slices)
    }
    fn flush(&mut self) -> Result<(), TransportError> {
        FrameWriter::flush(self)
    }
}

/// Zero-copy lane sender: frames stay owned until the kernel releases them;
/// charges the session's bandwidth bucket, if any, per frame.
struct ZeroCopyLane {
    sender: ZcSender,
    bucket: Option<Arc<TokenBucket>>,
}

impl QueuedSink for ZeroCopyLane {
    fn put(&mut self, f: OutFrame) -> Result<(), TransportError> {
        let len = crate::frame::HEADER_LEN + f.parts.iter().map(Bytes::len).sum::<usize>();
        self.sender.send_owned(f)?;
        if let Some(b) = &self.bucket {
            b.charge(len);
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<(), TransportError> {
        self.sender.flush()
    }
}

/// Writer threads, one per lane, each behind a bounded queue.
#[derive(Debug)]
pub struct LaneQueues {
    queues: Vec<Sender<OutFrame>>,
    errors: Vec<ErrorSlot>,
    threads: Vec<JoinHandle<bool>>,
}

impl LaneQueues {
    /// Starts one writer thread per lane (plain `write`, or TLS); each queue
    /// holds at most `depth` frames.
    pub fn spawn(writers: Vec<FrameWriter<LaneWrite>>, depth: usize) -> LaneQueues {
        let sinks = writers
            .into_iter()
            .map(|w| Box::new(w) as Box<dyn QueuedSink>)
            .collect();
        LaneQueues::spawn_sinks(sinks, depth)
    }

    /// Starts one zero-copy (io_uring `SENDMSG_ZC`) writer thread per lane;
    /// needs plaintext lanes ([`Lane::into_raw_parts`]). Up to `depth`
    /// frames wait in each queue and up to `depth` more are in the kernel.
    pub fn spawn_zero_copy(
        lanes: Vec<RawLane>,
        depth: usize,
    ) -> Result<LaneQueues, TransportError> {
        let mut sinks: Vec<Box<dyn QueuedSink>> = Vec::with_capacity(lanes.len());
        for lane in lanes {
            sinks.push(Box::new(ZeroCopyLane {
                sender: ZcSender::new(lane.socket, depth)?,
                bucket: lane.bucket,
            }));
        }
        Ok(LaneQueues::spawn_sinks(sinks, depth))
    }

    /// Starts one writer thread per sink.
    pub fn spawn_sinks(sinks: Vec<Box<dyn QueuedSink>>, depth: usize) -> LaneQueues {
        let mut queues = Vec::with_capacity(sinks.len());
        let mut errors = Vec::with_capacity(sinks.len());
        let mut threads = Vec::with_capacity(sinks.len());
        for (lane, mut sink) in sinks.into_iter().enumerate() {
            let (tx, rx): (Sender<OutFrame>, Receiver<OutFrame>) = bounded(depth.max(1));
            let slot: ErrorSlot = Arc::new(Mutex::new(None));
            let thread_slot = Arc::clone(&slot);
            let handle = std::thread::Builder::new()
                .name(format!("ferry-lane-{lane}"))
                .spawn(move || {
                    let fail = |e| {
                        *thread_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        false
                    };
                    for f in rx.iter() {
                        if let Err(e) = sink.put(f) {
                            return fail(e);
                        }
                        if rx.is_empty() {
                            if let Err(e) = sink.flush() {
                                return fail(e);
                            }
                        }
                    }
                    match sink.flush() {
                        Ok(()) => true,
                        Err(e) => fail(e),
                    }
                })
                .expect("spawning a lane writer thread");
            queues.push(tx);
            errors.push(slot);
            threads.push(handle);
        }
        LaneQueues {
            queues,
            errors,
            threads,
        }
    }

    /// Number of lanes.
    pub fn lanes(&self) -> usize {
        self.queues.len()
    }

    /// Queues `frame` on `lane`, blocking while that lane's queue is full.
    pub fn send(&self, lane: usize, frame: OutFrame) -> Result<(), TransportError> {
        let q = self
            .queues
            .get(lane)
            .ok_or(TransportError::NoSuchLane { lane })?;
        q.send(frame).map_err(|_| self.take_error(lane))
    }

    /// Queues a frame of pages starting at `first_page` on that page's lane.
    pub fn send_pages(&self, first_page: u64, frame: OutFrame) -> Result<(), TransportError> {
        self.send(lane_for_page(first_page, self.queues.len()), frame)
    }

    /// Queues a copy of `frame` on every lane (e.g. a round marker).
    pub fn broadcast(&self, frame: &OutFrame) -> Result<(), TransportError> {
        (0..self.queues.len()).try_for_each(|lane| self.send(lane, frame.clone()))
    }

    fn take_error(&self, lane: usize) -> TransportError {
        self.errors[lane]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map(|e| TransportError::Lane {
                lane,
                source: Box::new(e),
            })
            .unwrap_or(TransportError::LaneClosed { lane })
    }

    /// Drains every queue, flushes, stops the threads; the first lane's
    /// error, if any.
    pub fn finish(self) -> Result<(), TransportError> {
        let LaneQueues {
            queues,
            errors,
            threads,
        } = self;
        drop(queues);
        let mut first_err = None;
        for (lane, t) in threads.into_iter().enumerate() {
            if !t.join().unwrap_or(false) {
                let e = errors[lane]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .map(|e| TransportError::Lane {
                        lane,
                        source: Box::new(e),
                    })
                    .unwrap_or(TransportError::LaneClosed { lane });
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// One frame from a [`LaneInbox`], or the end of its lane.
#[derive(Debug)]
pub struct LaneEvent {
    /// Which lane.
    pub lane: u16,
    /// The frame, or why the lane ended (`PeerClosed` for a clean close).
    pub frame: Result<Frame, TransportError>,
}

/// Reader threads, one per lane, merged into one bounded channel.
#[derive(Debug)]
pub struct LaneInbox {
    rx: Receiver<LaneEvent>,
    threads: Vec<JoinHandle<()>>,
}

impl LaneInbox {
    /// Starts one reader thread per lane; at most `depth` frames wait unread.
    pub fn spawn(readers: Vec<(u16, FrameReader<LaneRead>)>, depth: usize) -> LaneInbox {
        let (tx, rx) = bounded(depth.max(1));
        let threads = readers
            .into_iter()
            .map(|(lane, mut reader)| {
                let tx = tx.clone();
                std::thread::Builder::new()
                    .name(format!("ferry-lane-rx-{lane}"))
                    .spawn(move || loop {
                        let frame = reader.read_frame();
                        let end = frame.is_err();
                        if tx.send(LaneEvent { lane, frame }).is_err() || end {
                            return;
                        }
                    })
                    .expect("spawning a lane reader thread")
            })
            .collect();
        LaneInbox { rx, threads }
    }

    /// The next frame from any lane (per-lane order kept), or `None` once
    /// every lane has ended and its end was delivered.
    pub fn recv(&self) -> Option<LaneEvent> {
        self.rx.recv().ok()
    }

    /// The underlying channel (for `select!`).
    pub fn receiver(&self) -> &Receiver<LaneEvent> {
        &self.rx
    }

    /// Waits for the reader threads (after their lanes ended).
    pub fn join(self) {
        drop(self.rx);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
