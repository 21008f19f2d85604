//! Frames from the destination, read on the transport's reader thread of
//! lane 0 so the source can notice an Abort or a dropped connection while
//! it streams pages, and learn which rounds the destination has written.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, TryRecvError};
use ferry_transport::lanes::{LaneEvent, LaneInbox};
use ferry_transport::{Frame, FrameKind, FrameReceive, TransportError};

use crate::error::MigrationError;
use crate::protocol::{decode_reason, RoundWritten, TornPage};

/// The reading half of the source's connection, on a detached thread that
/// ends when the connection fails or is closed.
#[derive(Debug)]
pub(crate) struct Inbox {
    frames: LaneInbox,
    /// What the destination's `Progress` reports said, whichever call read
    /// them.
    reported: Mutex<Reported>,
}

/// Frames from the destination read ahead of the source's checks (it sends
/// one a round, and a few at the end).
const FRAMES_AHEAD: usize = 64;

/// A frame from lane 0, checked.
fn verified(event: LaneEvent) -> Result<Frame, TransportError> {
    event
        .frame
        .and_then(|f| f.into_frame().map_err(TransportError::Corrupt))
}

/// The sum of the `Progress` reports read so far.
#[derive(Debug, Default)]
struct Reported {
    /// Torn pages reported, not yet taken.
    torn: Vec<TornPage>,
    /// The latest round reported written.
    written: Option<u32>,
}

impl Inbox {
    /// Start reading `source` until it fails or closes.
    pub(crate) fn spawn(source: Box<dyn FrameReceive>) -> Self {
        Self {
            frames: LaneInbox::spawn(vec![(0, source)], FRAMES_AHEAD),
            reported: Mutex::default(),
        }
    }

    fn try_recv(&self) -> Result<Result<Frame, TransportError>, TryRecvError> {
        self.frames.receiver().try_recv().map(verified)
    }

    fn recv_timeout(
        &self,
        timeout: Duration,
    ) -> Result<Result<Frame, TransportError>, RecvTimeoutError> {
        self.frames.recv_timeout(timeout).map(verified)
    }

    fn reported(&self) -> std::sync::MutexGuard<'_, Reported> {
        self.reported.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A `Progress` frame: keep its torn pages and its round, whichever
    /// call read it (a report read by [`Inbox::check`] still answers a
    /// later [`Inbox::round_written`]).
    fn note_progress(&self, payload: &[u8]) -> Result<(), MigrationError> {
        let written = RoundWritten::decode(payload).map_err(MigrationError::Message)?;
        let mut reported = self.reported();
        reported.torn.extend_from_slice(&written.torn);
        reported.written = reported.written.max(Some(written.round));
        Ok(())
    }

    /// Whether the destination reported `round` (or a later one) written.
    fn has_written(&self, round: u32) -> bool {
        self.reported().written >= Some(round)
    }

    /// The torn pages reported since the last call, reading what already
    /// arrived first (an Abort or a broken connection fails it).
    pub(crate) fn take_torn(&self, during: &'static str) -> Result<Vec<TornPage>, MigrationError> {
        self.check(during)?;
        Ok(std::mem::take(&mut self.reported().torn))
    }

    /// Fail if the destination aborted or the connection broke; otherwise
    /// return at once. While pages stream the destination sends only
    /// `Progress` (rounds written), whose torn pages are kept here.
    pub(crate) fn check(&self, during: &'static str) -> Result<(), MigrationError> {
        loop {
            match self.try_recv() {
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => {
                    return Err(MigrationError::PeerClosed { during })
                }
                Ok(Ok(frame)) if frame.kind == FrameKind::Progress => {
                    self.note_progress(&frame.payload)?;
                }
                Ok(got) => return Err(unexpected(got, "nothing", during)),
            }
        }
    }

    /// Wait up to `timeout` for the destination to report round `round`
    /// (or a later one) written: `Ok(true)` when it did, `Ok(false)` when
    /// the time ran out first.
    pub(crate) fn round_written(
        &self,
        round: u32,
        timeout: Duration,
    ) -> Result<bool, MigrationError> {
        const WHAT: &str = "the destination to write the round";
        let deadline = Instant::now() + timeout;
        loop {
            if self.has_written(round) {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_timeout(left) {
                Ok(Ok(frame)) if frame.kind == FrameKind::Progress => {
                    self.note_progress(&frame.payload)?;
                }
                Ok(got) => return Err(unexpected(got, "Progress", WHAT)),
                Err(RecvTimeoutError::Timeout) => return Ok(false),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrationError::PeerClosed { during: WHAT })
                }
            }
        }
    }

    /// After a failed send: the destination may have said why it hung up.
    /// Returns its Abort reason if one arrives within `grace`.
    pub(crate) fn abort_reason(&self, grace: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + grace;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.recv_timeout(left) {
                Ok(Ok(frame)) if frame.kind == FrameKind::Abort => {
                    return Some(decode_reason(&frame.payload))
                }
                Ok(Ok(_)) => continue,
                _ => return None,
            }
        }
    }

    /// Wait up to `timeout` for a frame of `kind` (`Progress` frames
    /// before it are noted as in [`Inbox::check`]).
    pub(crate) fn expect(
        &self,
        kind: FrameKind,
        what: &'static str,
        timeout: Duration,
    ) -> Result<Vec<u8>, MigrationError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_timeout(left) {
                Ok(Ok(frame)) if frame.kind == kind => return Ok(frame.payload),
                Ok(Ok(frame)) if frame.kind == FrameKind::Progress => {
                    self.note_progress(&frame.payload)?;
                }
                Ok(got) => return Err(unexpected(got, what, what)),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(MigrationError::Timeout {
                        waiting_for: what,
                        timeout,
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrationError::PeerClosed { during: what })
                }
            }
        }
    }
}

fn unexpected(
    got: Result<Frame, TransportError>,
    expected: &'static str,
    during: &'static str,
) -> MigrationError {
    match got {
        Ok(frame) if frame.kind == FrameKind::Abort => {
            MigrationError::PeerAborted(decode_reason(&frame.payload))
        }
        Ok(frame) => MigrationError::UnexpectedFrame {
            expected,
            got: frame.kind,
        },
        Err(e) => MigrationError::from_receive(e, during),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use ferry_transport::{FrameReader, FrameSink, FrameWriter};

    use super::*;
    use crate::protocol::encode_reason;

    const LONG: Duration = Duration::from_secs(10);

    fn written(w: &mut FrameWriter<UnixStream>, round: u32) {
        let torn = vec![TornPage { page: 40, round }];
        w.send(
            FrameKind::Progress,
            0,
            &RoundWritten { round, torn }.encode(),
        )
        .unwrap();
        w.flush().unwrap();
    }

    #[test]
    fn rounds_written_are_waited_for_and_skipped_everywhere_else() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let inbox = Inbox::spawn(Box::new(FrameReader::new(ours)));
        let mut dst = FrameWriter::new(theirs);
        // An older round does not answer for a later one; a later one does.
        written(&mut dst, 0);
        written(&mut dst, 2);
        assert!(inbox.round_written(1, LONG).unwrap());
        // Nothing more came: the wait runs out without failing.
        assert!(!inbox.round_written(3, Duration::from_millis(10)).unwrap());
        // Ready behind a round written (the final round's) is what `expect`
        // returns.
        written(&mut dst, 3);
        dst.send(FrameKind::Ready, 0, &[7]).unwrap();
        dst.flush().unwrap();
        assert_eq!(inbox.expect(FrameKind::Ready, "Ready", LONG).unwrap(), [7]);
        // Every report's torn pages were kept, whichever call read it.
        let rounds: Vec<u32> = inbox
            .take_torn("test")
            .unwrap()
            .iter()
            .map(|t| t.round)
            .collect();
        assert_eq!(rounds, [0, 2, 3]);
        assert!(inbox.take_torn("test").unwrap().is_empty());
        // An Abort while waiting for a round is the destination's reason.
        written(&mut dst, 4);
        dst.send(FrameKind::Abort, 0, &encode_reason("disk full"))
            .unwrap();
        dst.flush().unwrap();
        match inbox.round_written(9, LONG) {
            Err(MigrationError::PeerAborted(reason)) => assert_eq!(reason, "disk full"),
            other => panic!("expected the abort, got {other:?}"),
        }
    }

    /// The CI failure of stop 18: the report of the last round was read by
    /// a `check` between rounds, and the wait before the pause then waited
    /// for a frame that had already come, until the handover timeout.
    #[test]
    fn a_round_written_read_by_a_check_still_answers_the_wait() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let inbox = Inbox::spawn(Box::new(FrameReader::new(ours)));
        let mut dst = FrameWriter::new(theirs);
        written(&mut dst, 0);
        written(&mut dst, 1);
        // Both reports are in the inbox's channel before the check reads.
        let t0 = Instant::now();
        while inbox.frames.receiver().len() < 2 {
            assert!(t0.elapsed() < LONG, "the inbox thread read nothing");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(inbox.take_torn("test").unwrap().len(), 2);
        assert!(inbox.frames.receiver().is_empty());
        assert!(inbox.round_written(1, Duration::ZERO).unwrap());
        assert!(inbox.round_written(0, Duration::ZERO).unwrap());
        assert!(!inbox.round_written(2, Duration::ZERO).unwrap());
    }

    #[test]
    fn a_malformed_round_written_fails_the_wait() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let inbox = Inbox::spawn(Box::new(FrameReader::new(ours)));
        let mut dst = FrameWriter::new(theirs);
        dst.send(FrameKind::Progress, 0, &[1, 2]).unwrap();
        dst.flush().unwrap();
        assert!(matches!(
            inbox.round_written(0, LONG),
            Err(MigrationError::Message(_))
        ));
    }
}
