//! Hostile bytes into what the engine's destination parses from the
//! network: page batches (every entry decoded into a page, XOR deltas
//! applied to whatever the page held, LZ4 and zstd frames decompressed into
//! it: encoding bytes 3 and 6) and the handshake/handover messages
//! (the source's too: RoundWritten, Running).
//! Each must return a value or an error, never panic.
#![no_main]

use ferry_engine::encode::{decode_page, BatchReader, PAGE_SIZE};
use ferry_engine::protocol::{DigestMessage, Hello, HelloAck, RoundEnd, RoundWritten, Running};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (selector, body) = match data.split_first() {
        Some((s, b)) => (*s, b),
        None => return,
    };
    match selector % 7 {
        0 => {
            // A batch for a guest of up to 64 Ki pages.
            let Ok(mut reader) = BatchReader::new(body, 1 << 16) else {
                return;
            };
            let mut page = [0x5au8; PAGE_SIZE];
            while let Ok(Some(entry)) = reader.next_entry() {
                assert!(
                    entry.page < 1 << 16,
                    "an entry beyond the layout was accepted"
                );
                let _ = decode_page(entry.encoding, entry.payload, &mut page);
            }
        }
        1 => {
            if let Ok(h) = Hello::decode(body) {
                let _ = h.layout.validate();
                let again = Hello::decode(&h.encode()).expect("a decoded Hello re-decodes");
                assert_eq!(again.layout.regions.len(), h.layout.regions.len());
            }
        }
        2 => drop(HelloAck::decode(body)),
        3 => drop(RoundEnd::decode(body)),
        4 => {
            if let Ok(d) = DigestMessage::decode(body) {
                assert_eq!(DigestMessage::decode(&d.encode()).as_ref(), Ok(&d));
            }
        }
        5 => {
            if let Ok(w) = RoundWritten::decode(body) {
                assert_eq!(RoundWritten::decode(&w.encode()).as_ref(), Ok(&w));
            }
        }
        _ => drop(Running::decode(body)),
    }
});
