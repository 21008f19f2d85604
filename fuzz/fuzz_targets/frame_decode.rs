//! Hostile bytes into the frame decoder: whole-buffer decoding, the
//! streaming reader and the lanes' path (frames read unverified by a lane
//! reader, verified by their consumer; frames sealed by their producer)
//! must return frames or errors, never panic, and never accept a frame
//! whose checksum does not match.
#![no_main]

use ferry_transport::frame::{decode_frame, encode_frame};
use ferry_transport::{FrameReader, SealedFrame, TransportError, FRAME_HEADROOM};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok((header, payload, used)) = decode_frame(rest) {
        // What decodes re-encodes to the same bytes.
        let mut again = Vec::new();
        encode_frame(header.kind, header.flags, payload, &mut again)
            .expect("a decoded frame re-encodes");
        assert_eq!(&again[..], &rest[..used]);
        rest = &rest[used..];
    }
    let mut reader = FrameReader::new(data);
    let mut buf = Vec::new();
    loop {
        match reader.read_frame_into(&mut buf) {
            Ok(h) => assert_eq!(buf.len(), h.payload_len()),
            Err(TransportError::PeerClosed | TransportError::Corrupt(_)) => break,
            Err(e) => panic!("unexpected error from an in-memory stream: {e}"),
        }
    }
    // The lanes' path: read unverified, verified by the consumer. It
    // accepts exactly the frames the whole-buffer decoder accepts.
    let mut reader = FrameReader::new(data);
    let mut rest = data;
    let mut buf = Vec::new();
    loop {
        match reader.read_unverified(buf) {
            Ok(frame) => {
                let whole = decode_frame(rest);
                match (frame.verify(), &whole) {
                    (Ok(payload), Ok((_, theirs, _))) => assert_eq!(payload, *theirs),
                    (Err(_), Err(_)) => break,
                    (mine, theirs) => panic!("lane path {mine:?} vs decoder {theirs:?}"),
                }
                rest = &rest[frame.wire_len()..];
                // Sealing what arrived again gives the same bytes.
                let mut again = vec![0u8; FRAME_HEADROOM];
                again.extend_from_slice(frame.verify().unwrap_or_default());
                if let Ok(sealed) = SealedFrame::seal(again, frame.kind(), frame.flags()) {
                    let used = whole.map(|(_, _, used)| used).unwrap_or(0);
                    assert_eq!(sealed.contiguous(), Some(&data[data.len() - rest.len() - used..][..used]));
                }
                buf = frame.into_buffer();
            }
            Err(TransportError::PeerClosed | TransportError::Corrupt(_)) => break,
            Err(e) => panic!("unexpected error from an in-memory stream: {e}"),
        }
    }
});
