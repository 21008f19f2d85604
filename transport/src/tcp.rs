//! TCP connections carrying frames: connect, listen, accept.
//!
//! Sockets get `TCP_NODELAY` (control frames must not wait for Nagle) and the
//! stream is split into a [`FrameReader`] and a [`FrameWriter`] over two
//! handles of the same socket, so one thread can send while another receives.

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};

use crate::error::TransportError;
use crate::stream::{FrameReader, FrameWriter};

/// Both directions of one framed connection.
#[derive(Debug)]
pub struct FrameConnection<R, W> {
    /// Incoming frames.
    pub reader: FrameReader<R>,
    /// Outgoing frames.
    pub writer: FrameWriter<W>,
}

/// A framed TCP connection.
pub type TcpFrameConnection = FrameConnection<TcpStream, TcpStream>;

impl TcpFrameConnection {
    /// Frames over an already connected stream (sets `TCP_NODELAY`).
    pub fn from_stream(stream: TcpStream) -> Result<TcpFrameConnection, TransportError> {
        stream
            .set_nodelay(true)
            .map_err(TransportError::Configure)?;
        let reader = stream.try_clone().map_err(TransportError::Configure)?;
        Ok(FrameConnection {
            reader: FrameReader::new(reader),
            writer: FrameWriter::new(stream),
        })
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> Result<SocketAddr, TransportError> {
        self.writer
            .get_ref()
            .peer_addr()
            .map_err(TransportError::Configure)
    }

    /// Shuts down both directions: a thread blocked reading returns.
    pub fn shutdown(&self) -> Result<(), TransportError> {
        self.writer
            .get_ref()
            .shutdown(std::net::Shutdown::Both)
            .map_err(TransportError::Configure)
    }
}

/// Connects to a ferry peer at `addr` (`host:port`).
pub fn connect<A: ToSocketAddrs + std::fmt::Debug>(
    addr: A,
) -> Result<TcpFrameConnection, TransportError> {
    let stream = TcpStream::connect(&addr).map_err(|source| TransportError::Connect {
        addr: format!("{addr:?}"),
        source,
    })?;
    TcpFrameConnection::from_stream(stream)
}

/// A listening socket that yields framed connections.
#[derive(Debug)]
pub struct FrameListener {
    listener: TcpListener,
}

impl FrameListener {
    /// Listens on `addr` (`127.0.0.1:0` picks a free port: see [`FrameListener::local_addr`]).
    pub fn bind<A: ToSocketAddrs + std::fmt::Debug>(
        addr: A,
    ) -> Result<FrameListener, TransportError> {
        let listener = TcpListener::bind(&addr).map_err(|source| TransportError::Bind {
            addr: format!("{addr:?}"),
            source,
        })?;
        Ok(FrameListener { listener })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.listener
            .local_addr()
            .map_err(TransportError::Configure)
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> Result<TcpFrameConnection, TransportError> {
        let (stream, _) = self.listener.accept().map_err(TransportError::Accept)?;
        TcpFrameConnection::from_stream(stream)
    }

    /// The underlying listener.
    pub fn get_ref(&self) -> &TcpListener {
        &self.listener
    }
}
