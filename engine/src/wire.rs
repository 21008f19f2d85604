//! Frame I/O on the plain TCP path that leaves the frame checksums to the
//! worker threads.
//!
//! The transport's reader and writer compute the xxh3 checksum of every
//! frame on the thread that moves it, which makes the one sending thread
//! and the one receiving thread the bottleneck of a migration. For page
//! batches the engine instead computes the header (checksum included) on
//! the encoder thread that built the batch, and verifies it on the decoder
//! thread that decodes it. The bytes on the wire are the same frames
//! (`ferry_transport::frame`), built and checked with the transport's own
//! `encode_header`, `FrameHeader::decode` and `FrameHeader::verify`.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;

use ferry_transport::frame::FrameError;
use ferry_transport::{FrameHeader, FrameSource, TransportError, HEADER_LEN};

/// Write a frame whose header was encoded elsewhere, header and payload in
/// vectored writes.
pub(crate) fn write_frame(
    stream: &mut TcpStream,
    header: &[u8; HEADER_LEN],
    payload: &[u8],
) -> io::Result<()> {
    let mut written = 0usize;
    let total = HEADER_LEN + payload.len();
    while written < total {
        let r = if written < HEADER_LEN {
            stream.write_vectored(&[IoSlice::new(&header[written..]), IoSlice::new(payload)])
        } else {
            stream.write(&payload[written - HEADER_LEN..])
        };
        match r {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "socket accepted no bytes",
                ))
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Frames in, possibly not yet checksum-verified.
pub(crate) trait FrameIn {
    /// The next frame's header and payload (into `payload`). Returns
    /// whether the checksum was verified already; if not, the caller must
    /// call `FrameHeader::verify` before using the payload.
    fn recv(&mut self, payload: &mut Vec<u8>) -> Result<(FrameHeader, bool), TransportError>;
}

/// Any transport source: verified on receipt.
pub(crate) struct Checked<'a, R: FrameSource>(pub &'a mut R);

impl<R: FrameSource> FrameIn for Checked<'_, R> {
    fn recv(&mut self, payload: &mut Vec<u8>) -> Result<(FrameHeader, bool), TransportError> {
        Ok((self.0.recv_into(payload)?, true))
    }
}

/// A TCP stream read frame by frame: header validated (magic, version,
/// kind, length bound), checksum left to the caller.
pub(crate) struct UncheckedTcp(pub TcpStream);

impl FrameIn for UncheckedTcp {
    fn recv(&mut self, payload: &mut Vec<u8>) -> Result<(FrameHeader, bool), TransportError> {
        let mut head = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match self.0.read(&mut head[got..]) {
                Ok(0) if got == 0 => return Err(TransportError::PeerClosed),
                Ok(0) => {
                    return Err(TransportError::Corrupt(FrameError::Truncated {
                        needed: HEADER_LEN,
                        got,
                    }))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TransportError::Read(e)),
            }
        }
        let header = FrameHeader::decode(&head).map_err(TransportError::Corrupt)?;
        payload.clear();
        payload.resize(header.payload_len(), 0);
        self.0.read_exact(payload).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                TransportError::Corrupt(FrameError::Truncated {
                    needed: HEADER_LEN + header.payload_len(),
                    got: HEADER_LEN,
                })
            } else {
                TransportError::Read(e)
            }
        })?;
        Ok((header, false))
    }
}
