//! Hostile bytes as the first frames of a lane: the handshake parser must
//! refuse or accept, never panic; an accepted hello satisfies its bounds.
#![no_main]

use ferry_transport::lanes::handshake::{LaneHello, MAX_LANES};
use ferry_transport::{FrameKind, FrameReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The raw payload parsers.
    if let Ok(h) = LaneHello::decode(data) {
        assert!(h.lanes >= 1 && h.lanes <= MAX_LANES && h.lane < h.lanes);
        assert_eq!(LaneHello::decode(&h.encode()), Ok(h));
        let _ = h.check_welcome(data);
    }
    // The same bytes as a stream of frames, as a listener reads them.
    let mut reader = FrameReader::new(data);
    if let Ok(f) = reader.read_frame() {
        if f.kind == FrameKind::LaneHello {
            let _ = LaneHello::decode(&f.payload);
        }
    }
});
