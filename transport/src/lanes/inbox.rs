//! The lanes' reader threads, merged into one bounded channel.
//!
//! [`LaneInbox`] reads every lane on a thread of its own and hands frames
//! out tagged with their lane, per-lane order kept. Readers move bytes and
//! validate headers; checksums are verified by whoever consumes a frame
//! ([`ReceivedFrame::verify`]), so the hashing is spread over the
//! consumer's threads (the engine's decoders) instead of one reader per
//! lane. Buffers go round: a consumer done with a frame hands its buffer
//! back ([`Recycler`]) and the next frame is read into it.

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
/// thread ends when its lane ends, or at the next frame after the inbox is
/// dropped.
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
        let lanes = readers.len();
        let (tx, rx) = bounded(depth.max(1));
        let (spare_tx, spare) = bounded(2 * depth.max(1) + 8 * lanes);
        let threads = readers
            .into_iter()
            .map(|(lane, mut reader)| {
                let (tx, spare) = (tx.clone(), spare.clone());
                std::thread::Builder::new()
                    .name(format!("ferry-lane-rx-{lane}"))
                    .spawn(move || loop {
                        let buf = spare.try_recv().unwrap_or_default();
                        let frame = reader.receive(buf);
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
