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

use std::io::{self, Read};
use std::net::TcpStream;

use std::io::IoSlice;

use ferry_transport::frame::{encode_header, FrameError, FLAG_COVERED_SUFFIX};
use ferry_transport::{FrameHeader, FrameKind, FrameSource, TransportError, HEADER_LEN};

use crate::encode::PAGE_SIZE;

/// Bytes of the frame header's prefix: everything but the checksum.
pub(crate) const PREFIX_LEN: usize = 16;

/// Free bytes a payload needs in front of it for [`seal`].
pub(crate) const FRAME_HEADROOM: usize = HEADER_LEN;

/// Turn `frame` = [`FRAME_HEADROOM`] free bytes ‖ payload into a complete
/// frame of `kind` with `flags`, in place. Page batches carry
/// `FLAG_COVERED_SUFFIX`: the checksum then covers their table only.
pub(crate) fn seal(frame: &mut [u8], kind: FrameKind, flags: u32) -> Result<(), FrameError> {
    let header = encode_header(kind, flags, &[IoSlice::new(&frame[FRAME_HEADROOM..])])?;
    frame[..HEADER_LEN].copy_from_slice(&header);
    Ok(())
}

/// [`seal`] for a page batch of `in_place` pages left in guest memory
/// besides the payload in `frame` (see
/// [`crate::encode::batch::BatchBuilder::finish_in_place`]). The checksum
/// of a page batch covers only its table (`FLAG_COVERED_SUFFIX`, which
/// `flags` must carry), at the end of `frame`: the pages count for the
/// frame's length only, so they are not read here (a zero page stands in
/// for each).
pub(crate) fn seal_in_place(
    frame: &mut [u8],
    in_place: usize,
    kind: FrameKind,
    flags: u32,
) -> Result<(), FrameError> {
    assert!(
        flags & FLAG_COVERED_SUFFIX != 0,
        "pages in place are never covered by the checksum"
    );
    static STAND_IN: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    let mut parts = vec![IoSlice::new(&STAND_IN); in_place];
    parts.push(IoSlice::new(&frame[FRAME_HEADROOM..]));
    let header = encode_header(kind, flags, &parts)?;
    frame[..HEADER_LEN].copy_from_slice(&header);
    Ok(())
}

/// Check `prefixed` = the frame's 16-byte prefix ‖ payload against the
/// checksum in `header`.
pub(crate) fn verify_prefixed(header: &FrameHeader, prefixed: &[u8]) -> Result<(), FrameError> {
    let payload = prefixed.len().saturating_sub(PREFIX_LEN);
    if prefixed.len() < PREFIX_LEN || payload != header.payload_len() {
        return Err(FrameError::Truncated {
            needed: HEADER_LEN + header.payload_len(),
            got: HEADER_LEN + payload,
        });
    }
    header.verify(&prefixed[PREFIX_LEN..])
}

/// Frames in, possibly not yet checksum-verified.
pub(crate) trait FrameIn {
    /// The next frame's header and payload (into `payload`). Returns
    /// whether the checksum was verified already. If not, `payload` holds
    /// the 16-byte header prefix followed by the payload, and the caller
    /// must call [`verify_prefixed`] before using `payload[PREFIX_LEN..]`.
    fn recv(&mut self, payload: &mut Vec<u8>) -> Result<(FrameHeader, bool), TransportError>;
}

/// Any transport source: verified on receipt.
pub(crate) struct Checked<R: FrameSource>(pub R);

impl<R: FrameSource> FrameIn for Checked<R> {
    fn recv(&mut self, payload: &mut Vec<u8>) -> Result<(FrameHeader, bool), TransportError> {
        Ok((self.0.recv_into(payload)?, true))
    }
}

/// A TCP stream read frame by frame: header validated (magic, version,
/// kind, length bound), checksum left to the caller, prefix kept in front
/// of the payload.
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
        // Recycled buffers keep their length: only growth is zero-filled,
        // not every frame (that would be one more pass over the data).
        let need = PREFIX_LEN + header.payload_len();
        if payload.len() > need {
            payload.truncate(need);
        } else {
            payload.resize(need, 0);
        }
        payload[..PREFIX_LEN].copy_from_slice(&head[..PREFIX_LEN]);
        self.0.read_exact(&mut payload[PREFIX_LEN..]).map_err(|e| {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A sealed frame is exactly what the transport would have written,
        /// and the transport's verify and ours agree.
        #[test]
        fn sealed_frames_match_the_transport(payload in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let mut frame = vec![0u8; FRAME_HEADROOM];
            frame.extend_from_slice(&payload);
            seal(&mut frame, FrameKind::PageBatch, 0).unwrap();
            let theirs = encode_header(FrameKind::PageBatch, 0, &[IoSlice::new(&payload)]).unwrap();
            prop_assert_eq!(&frame[..HEADER_LEN], &theirs[..]);
            let header = FrameHeader::decode(&theirs).unwrap();
            header.verify(&payload).unwrap();
            let mut prefixed = theirs[..PREFIX_LEN].to_vec();
            prefixed.extend_from_slice(&payload);
            prop_assert!(verify_prefixed(&header, &prefixed).is_ok());
        }
    }

    #[test]
    fn a_frame_sealed_with_pages_in_place_is_the_one_the_transport_would_send() {
        let pages: Vec<Vec<u8>> = (1..=3u8).map(|b| vec![b; PAGE_SIZE]).collect();
        let mut own = vec![7u8; 50];
        own.extend_from_slice(&(40u32).to_le_bytes()); // a 40-byte "table"
        let mut frame = vec![0u8; FRAME_HEADROOM];
        frame.extend_from_slice(&own);
        seal_in_place(
            &mut frame,
            pages.len(),
            FrameKind::PageBatch,
            FLAG_COVERED_SUFFIX,
        )
        .unwrap();
        let mut whole: Vec<IoSlice<'_>> = pages.iter().map(|p| IoSlice::new(p)).collect();
        whole.push(IoSlice::new(&own));
        let theirs = encode_header(FrameKind::PageBatch, FLAG_COVERED_SUFFIX, &whole).unwrap();
        assert_eq!(&frame[..HEADER_LEN], &theirs[..]);
    }

    #[test]
    fn a_flipped_bit_fails_verification() {
        let mut frame = vec![0u8; FRAME_HEADROOM];
        frame.extend_from_slice(&[5u8; 296]);
        frame.extend_from_slice(&100u32.to_le_bytes());
        seal(&mut frame, FrameKind::PageBatch, FLAG_COVERED_SUFFIX).unwrap();
        let header = FrameHeader::decode(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
        let mut prefixed = frame[..PREFIX_LEN].to_vec();
        prefixed.extend_from_slice(&frame[HEADER_LEN..]);
        prefixed[PREFIX_LEN + 250] ^= 4;
        assert!(matches!(
            verify_prefixed(&header, &prefixed),
            Err(FrameError::ChecksumMismatch { .. })
        ));
    }
}
