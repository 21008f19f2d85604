//! Frames sealed on their producer's thread and verified on their
//! consumer's.
//!
//! A lane's writer and reader threads move bytes; they do not hash them.
//! The xxh3 checksum of a bulk frame is computed where the frame is built
//! and checked where it is used, so a migration's one writer per lane and
//! one reader per lane never become its bottleneck:
//!
//! - [`SealedFrame`]: the producer builds the payload behind
//!   [`FRAME_HEADROOM`] free bytes and seals it (header and checksum written
//!   in place). A sealed frame may leave parts of its payload where they are
//!   (guest pages, see [`SealedFrame::seal_gathered`]); a socket sink
//!   gathers them with one `sendmsg`, so the kernel's copy into the socket is
//!   the only copy.
//! - [`ReceivedFrame`]: what a lane reader hands out. Its header is
//!   validated (magic, version, kind, length bound) before the payload is
//!   read; [`ReceivedFrame::verify`] checks the checksum and yields the
//!   payload, on whichever thread consumes the frame.

use std::io::{self, IoSlice, Read};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use crate::error::TransportError;
use crate::frame::{
    encode_header, encode_header_for_tail, Frame, FrameError, FrameHeader, FrameKind, HEADER_LEN,
};
use crate::stream::{FrameReader, FrameSource};

/// Free bytes a payload needs in front of it for [`SealedFrame::seal`].
pub const FRAME_HEADROOM: usize = HEADER_LEN;

/// Most iovecs one `sendmsg` takes (`IOV_MAX` on Linux).
const MAX_IOVECS: usize = 1024;

/// A part of a sealed frame's payload that stays where it is: `len` bytes
/// at address `addr`, sent before the frame's own byte at offset `at`
/// (offsets count the frame's own bytes, header included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatherPart {
    /// Offset of the own byte this part goes before.
    pub at: usize,
    /// Address of the part's first byte.
    pub addr: usize,
    /// Its length.
    pub len: usize,
}

/// A complete frame, header and checksum included, built on the producer's
/// thread; a lane writer only moves its bytes.
pub struct SealedFrame {
    kind: FrameKind,
    flags: u32,
    /// Header ‖ the frame's own payload bytes.
    bytes: Vec<u8>,
    /// Parts left in place, by increasing `at`.
    gather: Vec<GatherPart>,
    /// Their total length.
    gathered: usize,
    /// Keeps the memory of `gather` alive; never read.
    _owner: Option<Arc<dyn Send + Sync>>,
}

impl std::fmt::Debug for SealedFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedFrame")
            .field("kind", &self.kind)
            .field("flags", &self.flags)
            .field("own", &self.bytes.len())
            .field("gathered", &self.gathered)
            .finish_non_exhaustive()
    }
}

fn headroom_missing(buf: &[u8]) -> FrameError {
    FrameError::Truncated {
        needed: FRAME_HEADROOM,
        got: buf.len(),
    }
}

impl SealedFrame {
    /// Seals `buf` = [`FRAME_HEADROOM`] free bytes ‖ payload into a frame of
    /// `kind` with `flags`, in place.
    pub fn seal(mut buf: Vec<u8>, kind: FrameKind, flags: u32) -> Result<Self, FrameError> {
        let payload = buf
            .get(FRAME_HEADROOM..)
            .ok_or_else(|| headroom_missing(&buf))?;
        let header = encode_header(kind, flags, &[IoSlice::new(payload)])?;
        buf[..HEADER_LEN].copy_from_slice(&header);
        Ok(SealedFrame {
            kind,
            flags,
            bytes: buf,
            gather: Vec::new(),
            gathered: 0,
            _owner: None,
        })
    }

    /// Seals `buf` (as [`SealedFrame::seal`]) with `gather` inserted: parts
    /// of the payload that stay where they are until the frame is sent.
    /// They are not read here, so the checksum must not cover them: the
    /// frame carries [`crate::frame::FLAG_COVERED_SUFFIX`] with a covered
    /// length within the own bytes after the last part (a page batch's
    /// table, which carries each page's hash).
    ///
    /// # Safety
    ///
    /// Every part's `addr..addr + len` must be readable memory (it may
    /// change meanwhile) for as long as `owner` lives.
    pub unsafe fn seal_gathered(
        mut buf: Vec<u8>,
        gather: Vec<GatherPart>,
        owner: Arc<dyn Send + Sync>,
        kind: FrameKind,
        flags: u32,
    ) -> Result<Self, FrameError> {
        if buf.len() < FRAME_HEADROOM {
            return Err(headroom_missing(&buf));
        }
        let mut last = FRAME_HEADROOM;
        for part in &gather {
            if part.at < last || part.at > buf.len() {
                return Err(FrameError::GatherOutside {
                    at: part.at as u64,
                    len: buf.len() as u64,
                });
            }
            last = part.at;
        }
        let gathered = gather.iter().map(|p| p.len).sum::<usize>();
        let len = buf.len() - FRAME_HEADROOM + gathered;
        let header = encode_header_for_tail(kind, flags, len, &buf[last..])?;
        buf[..HEADER_LEN].copy_from_slice(&header);
        Ok(SealedFrame {
            kind,
            flags,
            bytes: buf,
            gather,
            gathered,
            _owner: Some(owner),
        })
    }

    /// The frame's kind.
    pub fn kind(&self) -> FrameKind {
        self.kind
    }

    /// The frame's flags.
    pub fn flags(&self) -> u32 {
        self.flags
    }

    /// Bytes the frame takes on the wire, header included.
    pub fn wire_len(&self) -> usize {
        self.bytes.len() + self.gathered
    }

    /// Whether parts of the payload stay in place (only a sink that
    /// gathers can send it).
    pub fn is_gathered(&self) -> bool {
        !self.gather.is_empty()
    }

    /// The whole frame, header included, when nothing stays in place.
    pub fn contiguous(&self) -> Option<&[u8]> {
        (!self.is_gathered()).then_some(&self.bytes[..])
    }

    /// The buffer, to build the next frame in.
    pub fn into_buffer(self) -> Vec<u8> {
        self.bytes
    }

    /// Writes the frame to `socket`, the parts left in place gathered from
    /// where they are by `sendmsg` (as few calls as the socket allows).
    pub fn send_to(&self, socket: &TcpStream) -> io::Result<()> {
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(2 * self.gather.len() + 1);
        let own = |iov: &mut Vec<libc::iovec>, part: &[u8]| {
            if !part.is_empty() {
                iov.push(libc::iovec {
                    iov_base: part.as_ptr().cast_mut().cast(),
                    iov_len: part.len(),
                });
            }
        };
        let mut at = 0;
        for part in &self.gather {
            // `seal_gathered` checked the parts are in order and inside.
            own(&mut iov, &self.bytes[at..part.at]);
            // The memory is never turned into a reference here: the
            // kernel reads it, as others may write it meanwhile.
            iov.push(libc::iovec {
                iov_base: part.addr as *mut libc::c_void,
                iov_len: part.len,
            });
            at = part.at;
        }
        own(&mut iov, &self.bytes[at..]);
        let fd = socket.as_raw_fd();
        let mut first = 0;
        while first < iov.len() {
            let end = iov.len().min(first + MAX_IOVECS);
            let slice = &mut iov[first..end];
            // SAFETY: an all-zero `msghdr` is a valid value (no name, no
            // control data); the iovec fields are set just below.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = slice.as_mut_ptr();
            msg.msg_iovlen = slice.len();
            // SAFETY: `msg` points at `slice`, iovecs over `self.bytes`
            // (borrowed for this call) and over the parts left in place,
            // readable while `self._owner` lives (the contract of
            // `seal_gathered`); the kernel only reads them. MSG_NOSIGNAL:
            // a closed peer is an error, not a signal.
            let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
            let mut n = match n {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n if n > 0 => n.unsigned_abs(),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
            };
            while n > 0 {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                    v.iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(())
    }
}

/// A frame as a lane reader hands it out: header validated, checksum
/// checked by [`ReceivedFrame::verify`] on the consumer's thread (or
/// already, by a source that verifies on receipt).
#[derive(Debug)]
pub struct ReceivedFrame {
    header: FrameHeader,
    /// The payload is `buf[..len]`; the rest is stale bytes of earlier
    /// frames, kept so the buffer is not zeroed again when reused.
    buf: Vec<u8>,
    len: usize,
    verified: bool,
}

impl ReceivedFrame {
    /// `buf[..len]` is the payload.
    pub(crate) fn unverified(header: FrameHeader, buf: Vec<u8>, len: usize) -> Self {
        debug_assert!(len <= buf.len());
        ReceivedFrame {
            header,
            buf,
            len,
            verified: false,
        }
    }

    /// This frame in a buffer of its own size when its payload is small
    /// beside the buffer it was read into (a quarter of it at most, the
    /// buffer 64 KiB or more), and that buffer handed back for
    /// the next frame; otherwise the frame as it is and `None`. For a
    /// reader that passes a small control frame on (a round's end) while
    /// bulk frames go on arriving: without it the grown buffer left with
    /// the control frame, and the next bulk frame grew a fresh one, whose
    /// pages are faulted in one by one (on this machine, a nested KVM, at
    /// 15-25 us each while the migration's threads share the cores: 1 MiB
    /// per lane per round).
    pub fn compacted(self) -> (ReceivedFrame, Option<Vec<u8>>) {
        if self.buf.capacity() < COMPACT_FROM || self.len.saturating_mul(4) > self.buf.capacity() {
            return (self, None);
        }
        let frame = ReceivedFrame {
            header: self.header,
            buf: self.payload().to_vec(),
            len: self.len,
            verified: self.verified,
        };
        (frame, Some(self.buf))
    }

    fn payload(&self) -> &[u8] {
        // `len <= buf.len()` by construction; `get` keeps a bad one from panicking.
        self.buf.get(..self.len).unwrap_or_default()
    }

    /// The frame's validated header.
    pub fn header(&self) -> &FrameHeader {
        &self.header
    }

    /// The frame's kind.
    pub fn kind(&self) -> FrameKind {
        self.header.kind
    }

    /// The frame's flags.
    pub fn flags(&self) -> u32 {
        self.header.flags
    }

    /// Bytes the frame took on the wire, header included.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.len
    }

    /// Checks the checksum; the payload, once it matches.
    pub fn verify(&self) -> Result<&[u8], FrameError> {
        if !self.verified {
            self.header.verify(self.payload())?;
        }
        Ok(self.payload())
    }

    /// [`ReceivedFrame::verify`], then the payload by value.
    pub fn into_payload(self) -> Result<Vec<u8>, FrameError> {
        self.verify()?;
        let mut payload = self.buf;
        payload.truncate(self.len);
        Ok(payload)
    }

    /// [`ReceivedFrame::verify`], then the whole frame.
    pub fn into_frame(self) -> Result<Frame, FrameError> {
        let (kind, flags) = (self.header.kind, self.header.flags);
        Ok(Frame {
            kind,
            flags,
            payload: self.into_payload()?,
        })
    }

    /// The buffer, for the next frame to be read into (its contents are
    /// not to be trusted).
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

/// The smallest buffer [`ReceivedFrame::compacted`] moves a frame out of.
const COMPACT_FROM: usize = 64 << 10;

/// What a lane's reader thread reads frames from.
pub trait FrameReceive: Send {
    /// The next frame, read into `buf` (its allocation reused). A clean
    /// close at a frame boundary is [`TransportError::PeerClosed`].
    fn receive(&mut self, buf: Vec<u8>) -> Result<ReceivedFrame, TransportError>;
}

impl<R: Read + Send> FrameReceive for FrameReader<R> {
    fn receive(&mut self, buf: Vec<u8>) -> Result<ReceivedFrame, TransportError> {
        self.read_unverified(buf)
    }
}

/// Any [`FrameSource`] (the seam for other transports) as a lane's reader:
/// it verifies on receipt.
#[derive(Debug)]
pub struct VerifiedSource<S>(pub S);

impl<S: FrameSource + Send> FrameReceive for VerifiedSource<S> {
    fn receive(&mut self, mut buf: Vec<u8>) -> Result<ReceivedFrame, TransportError> {
        let header = self.0.recv_into(&mut buf)?;
        Ok(ReceivedFrame {
            header,
            len: buf.len(),
            buf,
            verified: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_frame, FLAG_COVERED_SUFFIX};
    use proptest::prelude::*;

    /// `payloads` framed one after another, as on a lane.
    fn wire_of(payloads: &[(FrameKind, Vec<u8>)]) -> Vec<u8> {
        let mut wire = Vec::new();
        for (kind, p) in payloads {
            crate::frame::encode_frame(*kind, 0, p, &mut wire).unwrap();
        }
        wire
    }

    #[test]
    fn a_small_frame_moves_out_of_a_large_buffer_and_a_large_one_stays() {
        let big = vec![7u8; 256 << 10];
        let small = b"round 3 ends".to_vec();
        let wire = wire_of(&[
            (FrameKind::PageBatch, big.clone()),
            (FrameKind::RoundEnd, small.clone()),
        ]);
        let mut reader = FrameReader::new(&wire[..]);
        let first = reader.read_unverified(Vec::new()).unwrap();
        let (first, none) = first.compacted();
        assert!(none.is_none(), "a frame that fills its buffer stays in it");
        let grown = first.into_buffer();
        let at = grown.as_ptr();
        let second = reader.read_unverified(grown).unwrap();
        let (second, back) = second.compacted();
        let back = back.expect("the large buffer is handed back");
        assert_eq!(back.as_ptr(), at);
        assert!(second.into_buffer().capacity() < COMPACT_FROM);
        // The moved frame still verifies to its payload.
        let third = FrameReader::new(&wire_of(&[(FrameKind::RoundEnd, small.clone())])[..])
            .read_unverified(back)
            .unwrap();
        let (third, _) = third.compacted();
        assert_eq!(third.kind(), FrameKind::RoundEnd);
        assert_eq!(third.verify().unwrap(), &small[..]);
        // A small buffer is never worth moving out of.
        let tiny = FrameReader::new(&wire_of(&[(FrameKind::RoundEnd, small)])[..])
            .read_unverified(Vec::new())
            .unwrap();
        assert!(tiny.compacted().1.is_none());
    }

    fn sealed(payload: &[u8], flags: u32) -> Result<SealedFrame, FrameError> {
        let mut buf = vec![0u8; FRAME_HEADROOM];
        buf.extend_from_slice(payload);
        SealedFrame::seal(buf, FrameKind::PageBatch, flags)
    }

    proptest! {
        /// A sealed frame is exactly the frame the encoder would build,
        /// and what the reader hands out verifies to the payload.
        #[test]
        fn sealed_frames_are_the_encoders_frames(payload in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let frame = sealed(&payload, 0).unwrap();
            let mut theirs = Vec::new();
            crate::frame::encode_frame(FrameKind::PageBatch, 0, &payload, &mut theirs).unwrap();
            prop_assert_eq!(frame.contiguous().unwrap(), &theirs[..]);
            let got = FrameReader::new(&theirs[..]).read_unverified(Vec::new()).unwrap();
            prop_assert_eq!(got.wire_len(), theirs.len());
            prop_assert_eq!(got.verify().unwrap(), &payload[..]);
        }

        /// One buffer read into again and again (as a lane reader does):
        /// every frame verifies to exactly its own payload whatever longer
        /// frame the buffer held before, and the buffer only grows to the
        /// longest frame (not zeroed again for each frame after a shorter one).
        #[test]
        fn a_reused_buffer_yields_each_frame_exactly(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..9000), 1..6)
        ) {
            let mut wire = Vec::new();
            for p in &payloads {
                crate::frame::encode_frame(FrameKind::PageBatch, 0, p, &mut wire).unwrap();
            }
            let mut reader = FrameReader::new(&wire[..]);
            let mut buf = Vec::new();
            let mut longest = 0;
            for (i, p) in payloads.iter().enumerate() {
                let got = reader.read_unverified(buf).unwrap();
                prop_assert_eq!(got.wire_len(), HEADER_LEN + p.len());
                prop_assert_eq!(got.verify().unwrap(), &p[..]);
                longest = longest.max(p.len());
                buf = if i % 2 == 0 {
                    let kept = got.into_buffer();
                    prop_assert_eq!(kept.len(), longest);
                    kept
                } else {
                    let exact = got.into_payload().unwrap();
                    prop_assert_eq!(&exact, p);
                    longest = p.len();
                    exact
                };
            }
            prop_assert!(matches!(reader.read_unverified(buf), Err(TransportError::PeerClosed)));
        }

        /// Hostile bytes never verify unless they are a whole valid frame.
        #[test]
        fn received_frames_verify_only_what_decodes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(got) = FrameReader::new(&bytes[..]).read_unverified(Vec::new()) {
                prop_assert_eq!(got.verify().is_ok(), decode_frame(&bytes).is_ok());
            }
        }
    }

    #[test]
    fn a_gathered_frame_is_the_frame_the_encoder_would_build() {
        let pages: Arc<Vec<Vec<u8>>> = Arc::new((1..=3u8).map(|b| vec![b; 4096]).collect());
        let mut table = vec![7u8; 50];
        table.extend_from_slice(&40u32.to_le_bytes());
        let mut buf = vec![0u8; FRAME_HEADROOM];
        buf.extend_from_slice(b"head");
        buf.extend_from_slice(&table);
        let gather = pages
            .iter()
            .map(|p| GatherPart {
                at: FRAME_HEADROOM + 4,
                addr: p.as_ptr() as usize,
                len: p.len(),
            })
            .collect();
        // SAFETY: the pages live in `pages`, which the frame keeps alive.
        let frame = unsafe {
            SealedFrame::seal_gathered(
                buf,
                gather,
                pages.clone(),
                FrameKind::PageBatch,
                FLAG_COVERED_SUFFIX,
            )
        }
        .unwrap();
        let mut whole = b"head".to_vec();
        pages.iter().for_each(|p| whole.extend_from_slice(p));
        whole.extend_from_slice(&table);
        let mut theirs = Vec::new();
        crate::frame::encode_frame(
            FrameKind::PageBatch,
            FLAG_COVERED_SUFFIX,
            &whole,
            &mut theirs,
        )
        .unwrap();
        assert!(frame.is_gathered() && frame.contiguous().is_none());
        assert_eq!(frame.wire_len(), theirs.len());
        // Sent through a socket: the bytes on the wire are the frame.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut rx, _) = listener.accept().unwrap();
        frame.send_to(&tx).unwrap();
        drop(tx);
        let mut wire = Vec::new();
        rx.read_to_end(&mut wire).unwrap();
        assert_eq!(wire, theirs);
    }

    #[test]
    fn a_gathered_part_inside_the_covered_bytes_is_refused() {
        let page = Arc::new(vec![1u8; 64]);
        let mut buf = vec![0u8; FRAME_HEADROOM];
        buf.extend_from_slice(&[9u8; 12]);
        buf.extend_from_slice(&16u32.to_le_bytes());
        let part = GatherPart {
            at: FRAME_HEADROOM + 8,
            addr: page.as_ptr() as usize,
            len: 64,
        };
        // SAFETY: the part lives in `page`, which the frame keeps alive.
        let err = unsafe {
            SealedFrame::seal_gathered(
                buf.clone(),
                vec![part],
                page.clone(),
                FrameKind::PageBatch,
                FLAG_COVERED_SUFFIX,
            )
        }
        .unwrap_err();
        assert_eq!(
            err,
            FrameError::GatherCovered {
                covered: 16,
                own: 8
            }
        );
        // Without the flag the checksum would need every byte.
        let part = GatherPart {
            at: FRAME_HEADROOM,
            ..part
        };
        // SAFETY: as above.
        let err =
            unsafe { SealedFrame::seal_gathered(buf, vec![part], page, FrameKind::PageBatch, 0) }
                .unwrap_err();
        assert!(matches!(err, FrameError::GatherCovered { .. }));
    }

    #[test]
    fn a_flipped_bit_fails_verification_on_the_consumer() {
        let mut payload = vec![5u8; 296];
        payload.extend_from_slice(&100u32.to_le_bytes());
        let frame = sealed(&payload, FLAG_COVERED_SUFFIX).unwrap();
        let mut wire = frame.contiguous().unwrap().to_vec();
        wire[HEADER_LEN + 250] ^= 4;
        let got = FrameReader::new(&wire[..])
            .read_unverified(Vec::new())
            .unwrap();
        assert!(matches!(
            got.verify(),
            Err(FrameError::ChecksumMismatch { .. })
        ));
        // Outside the covered suffix: the owner's hashes catch it.
        let mut wire = frame.contiguous().unwrap().to_vec();
        wire[HEADER_LEN + 10] ^= 4;
        let got = FrameReader::new(&wire[..])
            .read_unverified(Vec::new())
            .unwrap();
        assert!(got.verify().is_ok());
    }

    #[test]
    fn a_buffer_without_headroom_is_refused() {
        assert!(matches!(
            SealedFrame::seal(vec![0; 3], FrameKind::Hello, 0),
            Err(FrameError::Truncated { .. })
        ));
    }
}
