//! Hostile tunnel traffic: frame payloads decoded as tunnel messages, and a
//! sequence of chunks and end markers fed to the reassembly. Nothing may
//! panic; whatever is delivered is in order, without gaps or repeats.
#![no_main]

use bytes::Bytes;
use ferry_transport::tunnel::reorder::Reassembly;
use ferry_transport::tunnel::wire::TunnelMsg;
use ferry_transport::FrameKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // 1. Message decoding: kind and flags from the first bytes, payload after.
    if data.len() >= 3 {
        let kind = FrameKind::from_wire(48 + u16::from(data[0] % 6));
        let flags = u32::from(data[1] & 3);
        if let Some(kind) = kind {
            let _ = TunnelMsg::decode(kind, flags, Bytes::copy_from_slice(&data[2..]));
        }
    }
    // 2. Reassembly: each 4-byte record is (op, seq: u16, len).
    let mut r = Reassembly::new(1 << 16);
    let mut out = Vec::new();
    let mut delivered = 0u64;
    for rec in data.chunks_exact(4) {
        let seq = u64::from(u16::from_le_bytes([rec[1], rec[2]]));
        if rec[0] & 1 == 0 {
            // The chunk's content is its sequence number, so order is checkable.
            let bytes = Bytes::from(vec![(seq & 0xFF) as u8; usize::from(rec[3])]);
            out.clear();
            if r.push(seq, bytes, &mut out).is_ok() {
                for b in &out {
                    if let Some(&first) = b.first() {
                        assert_eq!(u64::from(first), delivered & 0xFF, "chunk out of order");
                    }
                    delivered += 1;
                }
                assert_eq!(r.delivered(), delivered);
            }
        } else {
            let _ = r.end(seq);
        }
        if r.is_complete() {
            break;
        }
    }
});
