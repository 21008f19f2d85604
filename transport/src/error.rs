//! The transport's error type.

use std::io;

use crate::frame::FrameError;

/// Everything that can go wrong moving frames. One variant per failed operation.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Connecting to the peer failed.
    #[error("could not connect to {addr}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Binding a listening socket failed.
    #[error("could not listen on {addr}")]
    Bind {
        /// The address tried.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Accepting an incoming connection failed.
    #[error("could not accept a connection")]
    Accept(#[source] io::Error),
    /// Setting a socket option or duplicating a socket failed.
    #[error("could not configure the socket")]
    Configure(#[source] io::Error),
    /// Reading a frame from the connection failed.
    #[error("could not read a frame")]
    Read(#[source] io::Error),
    /// Writing a frame to the connection failed.
    #[error("could not write a frame")]
    Write(#[source] io::Error),
    /// The bytes received are not a valid frame; the connection is unusable.
    #[error("received a corrupt frame")]
    Corrupt(#[source] FrameError),
    /// A frame to send breaks a limit of the format (e.g. too long).
    #[error("refused to send an invalid frame")]
    Encode(#[source] FrameError),
    /// A lane handshake was invalid.
    #[error("lane handshake failed")]
    LaneHandshake(#[source] crate::lanes::handshake::LaneHandshakeError),
    /// The peer refused the connection; the reason is the peer's.
    #[error("the peer refused the connection: {0}")]
    Refused(String),
    /// There is no lane with this index.
    #[error("no lane {lane}")]
    NoSuchLane {
        /// The index asked for.
        lane: usize,
    },
    /// A lane's writer failed.
    #[error("lane {lane} failed")]
    Lane {
        /// Which lane.
        lane: usize,
        /// Why.
        #[source]
        source: Box<TransportError>,
    },
    /// A lane's writer has stopped (after an error already reported).
    #[error("lane {lane} is closed")]
    LaneClosed {
        /// Which lane.
        lane: usize,
    },
    /// Setting up TLS on a connection failed (e.g. the peer's certificate was refused).
    #[error("TLS failed")]
    Tls(#[source] crate::tls::TlsError),
    /// Zero-copy sending was asked for on a TLS lane.
    #[error("zero-copy sending needs a plaintext lane (TLS encrypts into its own buffers)")]
    ZeroCopyNeedsPlaintext,
    /// A lane's handshake frame (`LaneHello`, `LaneWelcome`) did not come
    /// within the handshake timeout.
    #[error("the peer sent no lane handshake within {timeout:?}")]
    HandshakeTimeout {
        /// The handshake timeout in force.
        timeout: std::time::Duration,
    },
    /// The peer closed the connection cleanly at a frame boundary.
    #[error("the peer closed the connection")]
    PeerClosed,
}
