//! Hostile bytes into the frame decoder: whole-buffer decoding and the
//! streaming reader must return frames or errors, never panic, and never
//! accept a frame whose checksum does not match.
#![no_main]

use ferry_transport::frame::{decode_frame, encode_frame};
use ferry_transport::{FrameReader, TransportError};
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
});
