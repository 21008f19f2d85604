//! Blocking frame I/O over any byte stream, and the traits the engine sends
//! and receives through.
//!
//! [`FrameWriter`] writes each frame with one vectored write of header +
//! payload parts (so page payloads go from guest memory to the socket without
//! an intermediate copy); [`FrameReader`] reads and validates frames. Both
//! count the bytes they moved, for bandwidth figures.

use std::io::{self, IoSlice, Read, Write};

use crate::error::TransportError;
use crate::frame::{encode_header, Frame, FrameHeader, FrameKind, HEADER_LEN};
use crate::sealed::ReceivedFrame;

/// Something frames can be sent to: a TCP connection today, lanes, TLS and
/// zero-copy senders later. All implementations pass the same conformance
/// tests (`tests/conformance.rs`).
pub trait FrameSink {
    /// Sends one frame whose payload is the concatenation of `parts`.
    fn send_vectored(
        &mut self,
        kind: FrameKind,
        flags: u32,
        parts: &[IoSlice<'_>],
    ) -> Result<(), TransportError>;

    /// Sends one frame with a contiguous payload.
    fn send(&mut self, kind: FrameKind, flags: u32, payload: &[u8]) -> Result<(), TransportError> {
        self.send_vectored(kind, flags, &[IoSlice::new(payload)])
    }

    /// Pushes out anything buffered.
    fn flush(&mut self) -> Result<(), TransportError>;
}

/// Something frames can be received from.
pub trait FrameSource {
    /// Receives the next frame, its payload into `payload` (cleared first, its
    /// allocation reused). A clean close at a frame boundary is
    /// [`TransportError::PeerClosed`].
    fn recv_into(&mut self, payload: &mut Vec<u8>) -> Result<FrameHeader, TransportError>;

    /// Receives the next frame into a fresh buffer.
    fn recv(&mut self) -> Result<Frame, TransportError> {
        let mut payload = Vec::new();
        let h = self.recv_into(&mut payload)?;
        Ok(Frame {
            kind: h.kind,
            flags: h.flags,
            payload,
        })
    }
}

/// Writes frames to a byte stream.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    bytes_written: u64,
    frames_written: u64,
}

impl<W: Write> FrameWriter<W> {
    /// Wraps a stream. Nothing is buffered: each frame is written when sent.
    pub fn new(inner: W) -> FrameWriter<W> {
        FrameWriter {
            inner,
            bytes_written: 0,
            frames_written: 0,
        }
    }

    /// Writes one frame with a contiguous payload.
    pub fn write_frame(
        &mut self,
        kind: FrameKind,
        flags: u32,
        payload: &[u8],
    ) -> Result<(), TransportError> {
        self.write_frame_vectored(kind, flags, &[IoSlice::new(payload)])
    }

    /// Writes one frame whose payload is the concatenation of `parts`, with
    /// vectored writes straight from the caller's buffers (no copy).
    pub fn write_frame_vectored(
        &mut self,
        kind: FrameKind,
        flags: u32,
        parts: &[IoSlice<'_>],
    ) -> Result<(), TransportError> {
        let header = encode_header(kind, flags, parts).map_err(TransportError::Encode)?;
        let mut slices = Vec::with_capacity(parts.len() + 1);
        slices.push(IoSlice::new(&header));
        slices.extend(
            parts
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| IoSlice::new(p)),
        );
        let total =
            write_all_vectored(&mut self.inner, &mut slices).map_err(TransportError::Write)?;
        self.bytes_written += total as u64;
        self.frames_written += 1;
        Ok(())
    }

    /// Flushes the underlying stream.
    pub fn flush(&mut self) -> Result<(), TransportError> {
        self.inner.flush().map_err(TransportError::Write)
    }

    /// Bytes written so far, headers included.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Frames written so far.
    pub fn frames_written(&self) -> u64 {
        self.frames_written
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The underlying stream, mutably (writing to it directly breaks framing).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Unwraps the stream.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> FrameSink for FrameWriter<W> {
    fn send_vectored(
        &mut self,
        kind: FrameKind,
        flags: u32,
        parts: &[IoSlice<'_>],
    ) -> Result<(), TransportError> {
        self.write_frame_vectored(kind, flags, parts)
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        FrameWriter::flush(self)
    }
}

/// Writes every byte of `slices`, advancing through partial writes. Returns
/// the number of bytes written. (`Write::write_all_vectored` is unstable.)
fn write_all_vectored<W: Write>(w: &mut W, slices: &mut [IoSlice<'_>]) -> io::Result<usize> {
    let total: usize = slices.iter().map(|s| s.len()).sum();
    // Index of the first slice not yet fully written, and how much of it was.
    let mut first = 0;
    let mut offset = 0;
    while first < slices.len() {
        let n = if offset == 0 {
            w.write_vectored(&slices[first..])
        } else {
            // A partially written slice: finish it on its own, then go on vectored.
            let s: &[u8] = &slices[first];
            w.write(&s[offset..])
        };
        let mut n = match n {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "stream accepted no bytes",
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while n > 0 {
            let left = slices[first].len() - offset;
            if n >= left {
                n -= left;
                first += 1;
                offset = 0;
            } else {
                offset += n;
                n = 0;
            }
        }
    }
    Ok(total)
}

/// How far ahead of the bytes received a payload buffer grows.
const READ_STEP: usize = 1 << 20;

/// Reads and validates frames from a byte stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    bytes_read: u64,
    frames_read: u64,
}

impl<R: Read> FrameReader<R> {
    /// Wraps a stream. Put a `BufReader` in between for many small frames.
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner,
            bytes_read: 0,
            frames_read: 0,
        }
    }

    /// Reads the next frame, its payload into `payload` (cleared first).
    /// The header is validated before the payload is read, so a bad length
    /// never makes this allocate beyond [`crate::frame::MAX_PAYLOAD_LEN`].
    pub fn read_frame_into(
        &mut self,
        payload: &mut Vec<u8>,
    ) -> Result<FrameHeader, TransportError> {
        let (header, len) = self.read_unchecked_into(payload)?;
        payload.truncate(len);
        header.verify(payload).map_err(TransportError::Corrupt)?;
        Ok(header)
    }

    /// Reads the next frame into `buf` (its allocation reused) without
    /// checking its checksum: the header is validated (magic, version,
    /// kind, length bound) and the consumer verifies the payload
    /// ([`ReceivedFrame::verify`]), on its own thread.
    pub fn read_unverified(&mut self, mut buf: Vec<u8>) -> Result<ReceivedFrame, TransportError> {
        let (header, len) = self.read_unchecked_into(&mut buf)?;
        Ok(ReceivedFrame::unverified(header, buf, len))
    }

    /// Reads the next frame's header and its payload into the front of
    /// `payload`; returns the header and the payload's length. `payload`
    /// keeps its length when the frame is shorter (the bytes past the
    /// frame are stale), so a buffer read into again and again is zeroed
    /// only where it grows past every frame before: zeroing the growth to
    /// each frame's length after a shorter one cost the lane readers a
    /// `memset` of 2 % of their time (`perf`, a 1 GiB migration).
    fn read_unchecked_into(
        &mut self,
        payload: &mut Vec<u8>,
    ) -> Result<(FrameHeader, usize), TransportError> {
        let mut head = [0u8; HEADER_LEN];
        let got = read_full(&mut self.inner, &mut head).map_err(TransportError::Read)?;
        if got == 0 {
            return Err(TransportError::PeerClosed);
        }
        if got < HEADER_LEN {
            return Err(TransportError::Corrupt(
                crate::frame::FrameError::Truncated {
                    needed: HEADER_LEN,
                    got,
                },
            ));
        }
        let header = FrameHeader::decode(&head).map_err(TransportError::Corrupt)?;
        // Grow the buffer as the payload arrives, at most 1 MiB ahead, so a
        // hostile length on a stream that then ends costs no more memory
        // than what was actually sent; reads stay large.
        let len = header.payload_len();
        // Bytes already in the buffer are overwritten, not zeroed again.
        let mut got = 0;
        while got < len {
            let step = (len - got).min(READ_STEP);
            if payload.len() < got + step {
                payload.resize(got + step, 0);
            }
            let n = read_full(&mut self.inner, &mut payload[got..got + step])
                .map_err(TransportError::Read)?;
            got += n;
            if n < step {
                break;
            }
        }
        if got < len {
            payload.truncate(got);
            return Err(TransportError::Corrupt(
                crate::frame::FrameError::Truncated {
                    needed: HEADER_LEN + len,
                    got: HEADER_LEN + got,
                },
            ));
        }
        self.bytes_read += (HEADER_LEN + got) as u64;
        self.frames_read += 1;
        Ok((header, len))
    }

    /// Reads the next frame into a fresh buffer.
    pub fn read_frame(&mut self) -> Result<Frame, TransportError> {
        FrameSource::recv(self)
    }

    /// Bytes read so far, headers included.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Frames read so far.
    pub fn frames_read(&self) -> u64 {
        self.frames_read
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The underlying stream, mutably (reading from it directly breaks framing).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Unwraps the stream.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> FrameSource for FrameReader<R> {
    fn recv_into(&mut self, payload: &mut Vec<u8>) -> Result<FrameHeader, TransportError> {
        self.read_frame_into(payload)
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameError, MAX_PAYLOAD_LEN};

    /// A writer that accepts at most `chunk` bytes per call, to drive the
    /// partial-write paths.
    struct Trickle {
        out: Vec<u8>,
        chunk: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.chunk);
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut left = self.chunk;
            for b in bufs {
                let n = b.len().min(left);
                self.out.extend_from_slice(&b[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
            Ok(self.chunk - left)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn frames_survive_partial_writes() {
        for chunk in [1, 5, 23, 24, 25, 4096] {
            let mut w = FrameWriter::new(Trickle {
                out: Vec::new(),
                chunk,
            });
            let page = vec![0xABu8; 4096];
            w.write_frame(FrameKind::Hello, 1, b"hello").unwrap();
            w.write_frame_vectored(
                FrameKind::PageBatch,
                2,
                &[
                    IoSlice::new(b"desc"),
                    IoSlice::new(&page),
                    IoSlice::new(b""),
                    IoSlice::new(&page),
                ],
            )
            .unwrap();
            let bytes = w.into_inner().out;
            let mut r = FrameReader::new(&bytes[..]);
            let a = r.read_frame().unwrap();
            let b = r.read_frame().unwrap();
            assert_eq!(
                (a.kind, a.flags, &a.payload[..]),
                (FrameKind::Hello, 1, &b"hello"[..])
            );
            assert_eq!(
                (b.kind, b.flags, b.payload.len()),
                (FrameKind::PageBatch, 2, 4 + 8192)
            );
            assert!(matches!(r.read_frame(), Err(TransportError::PeerClosed)));
            assert_eq!(r.bytes_read(), bytes.len() as u64);
        }
    }

    #[test]
    fn eof_inside_a_frame_is_truncation_not_a_clean_close() {
        let mut w = FrameWriter::new(Vec::new());
        w.write_frame(FrameKind::Digest, 0, &[9u8; 100]).unwrap();
        let bytes = w.into_inner();
        for cut in [1, HEADER_LEN - 1, HEADER_LEN, HEADER_LEN + 99] {
            let mut r = FrameReader::new(&bytes[..cut]);
            let err = r.read_frame().unwrap_err();
            assert!(
                matches!(err, TransportError::Corrupt(FrameError::Truncated { .. })),
                "cut at {cut}: {err:?}"
            );
        }
    }

    #[test]
    fn corrupt_stream_is_reported_as_corrupt() {
        let mut w = FrameWriter::new(Vec::new());
        w.write_frame(FrameKind::Go, 0, b"").unwrap();
        let mut bytes = w.into_inner();
        bytes[0] = 0;
        let err = FrameReader::new(&bytes[..]).read_frame().unwrap_err();
        assert!(matches!(
            err,
            TransportError::Corrupt(FrameError::BadMagic { .. })
        ));
    }

    #[test]
    fn hostile_length_does_not_allocate() {
        let mut bytes = Vec::new();
        crate::frame::encode_frame(FrameKind::PageBatch, 0, b"", &mut bytes).unwrap();
        bytes[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut payload = Vec::new();
        let err = FrameReader::new(&bytes[..])
            .read_frame_into(&mut payload)
            .unwrap_err();
        assert!(matches!(
            err,
            TransportError::Corrupt(FrameError::TooLong { len: u32::MAX })
        ));
        assert!(payload.capacity() <= MAX_PAYLOAD_LEN as usize);
    }

    #[test]
    fn a_reused_longer_buffer_does_not_read_past_the_frame() {
        let mut w = FrameWriter::new(Vec::new());
        w.write_frame(FrameKind::PageBatch, 0, &[1u8; 5000])
            .unwrap();
        w.write_frame(FrameKind::PageBatch, 0, &[2u8; 10]).unwrap();
        w.write_frame(FrameKind::Go, 0, b"go").unwrap();
        let bytes = w.into_inner();
        let mut r = FrameReader::new(&bytes[..]);
        let mut buf = Vec::new();
        r.read_frame_into(&mut buf).unwrap();
        assert_eq!(buf.len(), 5000);
        r.read_frame_into(&mut buf).unwrap();
        assert_eq!(buf, vec![2u8; 10]);
        assert_eq!(r.read_frame_into(&mut buf).unwrap().kind, FrameKind::Go);
        assert_eq!(buf, b"go");
    }

    #[test]
    fn write_errors_surface() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let err = FrameWriter::new(Broken)
            .write_frame(FrameKind::Go, 0, b"")
            .unwrap_err();
        assert!(matches!(err, TransportError::Write(e) if e.kind() == io::ErrorKind::BrokenPipe));
    }
}
