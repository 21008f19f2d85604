//! Frames from the destination, read on their own thread so the source can
//! notice an Abort or a dropped connection while it streams pages.

use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use ferry_transport::{Frame, FrameKind, FrameSource, TransportError};

use crate::error::MigrationError;
use crate::protocol::decode_reason;

/// The reading half of the source's connection, on a detached thread that
/// ends when the connection fails or is closed.
#[derive(Debug)]
pub(crate) struct Inbox {
    frames: Receiver<Result<Frame, TransportError>>,
}

impl Inbox {
    /// Start reading `source` until it fails or closes.
    pub(crate) fn spawn<R: FrameSource + Send + 'static>(mut source: R) -> Self {
        let (tx, frames) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("ferry-src-inbox".into())
            .spawn(move || loop {
                let got = source.recv();
                let failed = got.is_err();
                if tx.send(got).is_err() || failed {
                    return;
                }
            })
            .expect("spawn the inbox thread");
        Self { frames }
    }

    /// Fail if the destination aborted or the connection broke; otherwise
    /// return at once. The destination sends nothing while pages stream.
    pub(crate) fn check(&self, during: &'static str) -> Result<(), MigrationError> {
        match self.frames.try_recv() {
            Err(TryRecvError::Empty) => Ok(()),
            Err(TryRecvError::Disconnected) => Err(MigrationError::PeerClosed { during }),
            Ok(got) => Err(unexpected(got, "nothing", during)),
        }
    }

    /// After a failed send: the destination may have said why it hung up.
    /// Returns its Abort reason if one arrives within `grace`.
    pub(crate) fn abort_reason(&self, grace: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + grace;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.frames.recv_timeout(left) {
                Ok(Ok(frame)) if frame.kind == FrameKind::Abort => {
                    return Some(decode_reason(&frame.payload))
                }
                Ok(Ok(_)) => continue,
                _ => return None,
            }
        }
    }

    /// Wait up to `timeout` for a frame of `kind`.
    pub(crate) fn expect(
        &self,
        kind: FrameKind,
        what: &'static str,
        timeout: Duration,
    ) -> Result<Vec<u8>, MigrationError> {
        match self.frames.recv_timeout(timeout) {
            Ok(Ok(frame)) if frame.kind == kind => Ok(frame.payload),
            Ok(got) => Err(unexpected(got, what, what)),
            Err(RecvTimeoutError::Timeout) => Err(MigrationError::Timeout {
                waiting_for: what,
                timeout,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(MigrationError::PeerClosed { during: what }),
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
