//! ferry's wire: how migration bytes cross the network.
//!
//! Everything travels in [frames](frame): a fixed little-endian header (magic,
//! protocol version, kind, flags, length, xxh3-64 checksum) and a bounded
//! payload. [`FrameWriter`] and [`FrameReader`] move frames over any blocking
//! byte stream; [`tcp`] connects and accepts framed TCP connections. The
//! engine sends through the [`FrameSink`] / [`FrameSource`] traits, so lanes,
//! TLS and zero-copy senders slot in behind them. A session's lanes are
//! written by the threads of [`lanes::LaneQueues`] and read by those of
//! [`lanes::LaneInbox`], for the engine and the tunnel alike; bulk frames
//! are [sealed](sealed) on their producer's thread and verified on their
//! consumer's. The wire format and the
//! migration's state machine are specified in `transport/PROTOCOL.md`.
//!
//! ```no_run
//! use ferry_transport::{tcp, FrameKind, FrameSink, FrameSource};
//!
//! # fn main() -> Result<(), ferry_transport::TransportError> {
//! let listener = tcp::FrameListener::bind("127.0.0.1:0")?;
//! let addr = listener.local_addr()?;
//! let sender = std::thread::spawn(move || -> Result<(), ferry_transport::TransportError> {
//!     let mut conn = tcp::connect(addr)?;
//!     conn.writer.send(FrameKind::Hello, 0, b"layout...")
//! });
//! let mut conn = listener.accept()?;
//! let frame = conn.reader.recv()?;
//! assert_eq!(frame.kind, FrameKind::Hello);
//! sender.join().unwrap()?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod error;
pub mod frame;
pub mod lanes;
pub mod sealed;
pub mod security;
mod stream;
pub mod tcp;
pub mod tls;
pub mod tunnel;
pub mod zerocopy;

pub use error::TransportError;
pub use frame::{
    Frame, FrameError, FrameHeader, FrameKind, HEADER_LEN, MAX_PAYLOAD_LEN, PROTOCOL_VERSION,
};
pub use lanes::{default_lane_count, lane_for_page, Lane, LaneListener, LaneOptions, Lanes};
pub use sealed::{FrameReceive, ReceivedFrame, SealedFrame, VerifiedSource, FRAME_HEADROOM};
pub use security::Security;
pub use stream::{FrameReader, FrameSink, FrameSource, FrameWriter};
pub use tcp::{FrameConnection, FrameListener, TcpFrameConnection};
pub use tls::{TlsFiles, TlsSettings};
pub use tunnel::error_chain;
