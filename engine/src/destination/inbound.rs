//! The destination's lanes: one reader thread per lane, merged into one
//! bounded channel with per-lane order kept.
//!
//! Each reader moves its lane's bytes into a buffer of its own (recycled
//! from the decoders), so reading from the kernel happens on as many threads
//! as there are lanes. Page batches of plaintext lanes arrive unverified
//! (their checksum is checked on a decoder thread, see `crate::wire`).

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ferry_transport::{FrameHeader, TransportError};

use crate::wire::FrameIn;

/// A frame that arrived on a lane: header, whether its checksum was
/// verified, and the payload buffer (prefixed when unverified).
pub(crate) type Arrival = (FrameHeader, bool, Vec<u8>);

/// One lane's next frame, or why the lane ended.
pub(crate) struct LaneEvent {
    pub lane: usize,
    pub frame: Result<Arrival, TransportError>,
}

/// Frames waiting in the merged channel, per lane.
const DEPTH_PER_LANE: usize = 4;

/// The reader threads (detached: each ends when its lane fails or closes,
/// or when the channel is dropped and a frame arrives).
pub(crate) struct Inbound {
    events: Receiver<LaneEvent>,
    lanes: usize,
}

impl Inbound {
    /// Start one reader per lane (index = position). Empty buffers are taken
    /// from `free` when there are any.
    pub(crate) fn spawn(readers: Vec<Box<dyn FrameIn + Send>>, free: &Receiver<Vec<u8>>) -> Self {
        let lanes = readers.len();
        let (tx, events) = crossbeam_channel::bounded(DEPTH_PER_LANE * lanes.max(1));
        for (lane, reader) in readers.into_iter().enumerate() {
            let (tx, free) = (tx.clone(), free.clone());
            std::thread::Builder::new()
                .name(format!("ferry-recv-{lane}"))
                .spawn(move || read_lane(lane, reader, &tx, &free))
                .expect("spawn a lane reader thread");
        }
        Self { events, lanes }
    }

    /// Number of lanes.
    pub(crate) fn lanes(&self) -> usize {
        self.lanes
    }

    /// The next frame from any lane within `timeout`; `Err(true)` when
    /// none came in time, `Err(false)` when every reader is gone.
    pub(crate) fn recv_timeout(&self, timeout: Duration) -> Result<LaneEvent, bool> {
        self.events
            .recv_timeout(timeout)
            .map_err(|e| e.is_timeout())
    }

    /// Like [`Inbound::recv`], giving up at `until`.
    pub(crate) fn recv_until(&self, until: Instant) -> Option<LaneEvent> {
        self.events.recv_deadline(until).ok()
    }
}

fn read_lane(
    lane: usize,
    mut reader: Box<dyn FrameIn + Send>,
    tx: &Sender<LaneEvent>,
    free: &Receiver<Vec<u8>>,
) {
    loop {
        let mut buf = free.try_recv().unwrap_or_default();
        let frame = reader
            .recv(&mut buf)
            .map(|(header, verified)| (header, verified, buf));
        let end = frame.is_err();
        if tx.send(LaneEvent { lane, frame }).is_err() || end {
            return;
        }
    }
}
