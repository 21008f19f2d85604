//! The lane handshake: how a receiver groups the connections of one session.
//!
//! The connecting side opens `lanes` connections and sends on each, first,
//! a `LaneHello` frame:
//!
//! | offset | size | field     |
//! |-------:|-----:|-----------|
//! | 0      | 16   | session id (random, the same on every lane of one session) |
//! | 16     | 2    | lane index, `0..lanes` |
//! | 18     | 2    | lanes in the session, `1..=MAX_LANES` |
//!
//! When all lanes of a session have arrived, the accepting side answers on
//! every lane with `LaneWelcome` (session id + lane index, 18 bytes). Lane 0
//! is the control lane.

use crate::frame::FrameError;

/// Most lanes one session may open.
///
/// Why: every lane is a socket and a thread on both ends, and the receiver
/// holds half-open sessions until all their lanes arrive; past a few lanes per
/// core nothing gets faster (PLATFORM.md: 4 connections saturate 2 cores).
pub const MAX_LANES: u16 = 64;

/// Identifies one session (one migration or one tunnel) across its lanes.
pub type SessionId = [u8; 16];

/// Size of a `LaneHello` payload.
pub const LANE_HELLO_LEN: usize = 20;
/// Size of a `LaneWelcome` payload.
pub const LANE_WELCOME_LEN: usize = 18;

/// Why a lane handshake payload is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaneHandshakeError {
    /// The payload has the wrong size.
    #[error("lane handshake payload of {got} bytes, expected {expected}")]
    BadLength {
        /// Bytes expected.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// The lane count is 0 or above [`MAX_LANES`].
    #[error("lane count {lanes} outside 1..={MAX_LANES}")]
    BadLaneCount {
        /// The count received.
        lanes: u16,
    },
    /// The lane index is not below the lane count.
    #[error("lane index {lane} not below the lane count {lanes}")]
    BadLaneIndex {
        /// The index received.
        lane: u16,
        /// The count received.
        lanes: u16,
    },
    /// The first frame on a lane was not the expected handshake kind.
    #[error("expected a {expected} frame first, got {got}")]
    UnexpectedKind {
        /// The kind expected.
        expected: &'static str,
        /// The kind received.
        got: crate::frame::FrameKind,
    },
    /// The welcome answers another session or lane.
    #[error("welcome for another session or lane")]
    Mismatch,
    /// The frame carrying the handshake was corrupt.
    #[error("corrupt handshake frame")]
    Frame(#[source] FrameError),
}

/// A lane's introduction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneHello {
    /// The session this lane belongs to.
    pub session: SessionId,
    /// This lane's index.
    pub lane: u16,
    /// How many lanes the session has.
    pub lanes: u16,
}

impl LaneHello {
    /// Wire form.
    pub fn encode(&self) -> [u8; LANE_HELLO_LEN] {
        let mut b = [0u8; LANE_HELLO_LEN];
        b[..16].copy_from_slice(&self.session);
        b[16..18].copy_from_slice(&self.lane.to_le_bytes());
        b[18..20].copy_from_slice(&self.lanes.to_le_bytes());
        b
    }

    /// Parses and validates a `LaneHello` payload.
    pub fn decode(bytes: &[u8]) -> Result<LaneHello, LaneHandshakeError> {
        let b: &[u8; LANE_HELLO_LEN] =
            bytes
                .try_into()
                .map_err(|_| LaneHandshakeError::BadLength {
                    expected: LANE_HELLO_LEN,
                    got: bytes.len(),
                })?;
        let mut session = [0u8; 16];
        session.copy_from_slice(&b[..16]);
        let lane = u16::from_le_bytes([b[16], b[17]]);
        let lanes = u16::from_le_bytes([b[18], b[19]]);
        if lanes == 0 || lanes > MAX_LANES {
            return Err(LaneHandshakeError::BadLaneCount { lanes });
        }
        if lane >= lanes {
            return Err(LaneHandshakeError::BadLaneIndex { lane, lanes });
        }
        Ok(LaneHello {
            session,
            lane,
            lanes,
        })
    }

    /// Wire form of the `LaneWelcome` answering this hello.
    pub fn welcome(&self) -> [u8; LANE_WELCOME_LEN] {
        let mut b = [0u8; LANE_WELCOME_LEN];
        b[..16].copy_from_slice(&self.session);
        b[16..].copy_from_slice(&self.lane.to_le_bytes());
        b
    }

    /// Checks that a `LaneWelcome` payload answers this hello.
    pub fn check_welcome(&self, bytes: &[u8]) -> Result<(), LaneHandshakeError> {
        if bytes.len() != LANE_WELCOME_LEN {
            return Err(LaneHandshakeError::BadLength {
                expected: LANE_WELCOME_LEN,
                got: bytes.len(),
            });
        }
        if bytes != self.welcome() {
            return Err(LaneHandshakeError::Mismatch);
        }
        Ok(())
    }
}

/// A fresh random session id (from `/dev/urandom`, falling back to time and pid).
pub fn new_session_id() -> SessionId {
    use std::io::Read;
    let mut id = [0u8; 16];
    let from_urandom = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut id));
    if from_urandom.is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        id = (nanos ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_welcome_matches() {
        let h = LaneHello {
            session: new_session_id(),
            lane: 3,
            lanes: 4,
        };
        assert_eq!(LaneHello::decode(&h.encode()), Ok(h));
        assert_eq!(h.check_welcome(&h.welcome()), Ok(()));
        let other = LaneHello { lane: 2, ..h };
        assert_eq!(
            h.check_welcome(&other.welcome()),
            Err(LaneHandshakeError::Mismatch)
        );
    }

    #[test]
    fn bad_hellos_are_rejected() {
        let h = LaneHello {
            session: [1; 16],
            lane: 0,
            lanes: 1,
        };
        let mut b = h.encode();
        assert!(matches!(
            LaneHello::decode(&b[..19]),
            Err(LaneHandshakeError::BadLength { .. })
        ));
        b[18..20].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(
            LaneHello::decode(&b),
            Err(LaneHandshakeError::BadLaneCount { lanes: 0 })
        );
        b[18..20].copy_from_slice(&(MAX_LANES + 1).to_le_bytes());
        assert!(matches!(
            LaneHello::decode(&b),
            Err(LaneHandshakeError::BadLaneCount { .. })
        ));
        b[16..18].copy_from_slice(&5u16.to_le_bytes());
        b[18..20].copy_from_slice(&5u16.to_le_bytes());
        assert_eq!(
            LaneHello::decode(&b),
            Err(LaneHandshakeError::BadLaneIndex { lane: 5, lanes: 5 })
        );
    }

    #[test]
    fn session_ids_differ() {
        assert_ne!(new_session_id(), new_session_id());
    }
}
