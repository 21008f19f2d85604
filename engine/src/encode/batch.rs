//! The page-batch payload: many pages in one frame.
//!
//! ```text
//! payloads, concatenated in entry order
//! count times (the table):
//!   u64 LE  page index           < pages of the memory layout
//!   u8      encoding             PageEncoding (0 invalid)
//!   u16 LE  payload length       allowed range depends on the encoding
//!   u64 LE  content hash         xxh3-64 of the page's 4096 bytes once decoded
//! u32 LE  count                  1..=MAX_BATCH_PAGES
//! u32 LE  trailer length         count * ENTRY_BYTES + 8
//! ```
//! The payload lengths add up to exactly the bytes before the table. The
//! table sits at the end so that pages can be read from guest memory
//! straight into their place, before the batch knows how many it will hold,
//! or left there: a raw page's payload can be gathered from guest memory
//! when the frame is written ([`BatchBuilder::push_in_place`]).
//!
//! Integrity: the frame carries `FLAG_COVERED_SUFFIX` with the trailer as its
//! covered part, so the frame checksum protects the table (where each page
//! goes, how it is encoded, its hash) and the receiver checks every page it
//! decodes against its hash. A page is hashed once on each side (the source
//! needs the hash anyway for skip-unchanged and the memory digest, the
//! destination for the digest), instead of once more for a checksum over
//! the whole frame.
//!
//! A page appears at most once per batch and per round (the source
//! guarantees it; a destination that is fed a page twice simply applies both
//! in order).

use super::{DecodeError, Page, PageEncoding, PAGE_SIZE};

// A table entry is exactly its fields; the decoder slices by these offsets.
const _: () = assert!(ENTRY_BYTES == 19);

/// Most pages one batch may hold: bounds the work one frame can ask for.
pub const MAX_BATCH_PAGES: u32 = 1024;

/// Bytes of one table entry (page index, encoding, payload length, hash).
pub const ENTRY_BYTES: usize = 8 + 1 + 2 + 8;

/// Bytes after the table: count and trailer length.
const TRAILER_FIXED: usize = 8;

/// Largest possible batch: `MAX_BATCH_PAGES` raw pages and their table.
pub const MAX_BATCH_BYTES: usize =
    MAX_BATCH_PAGES as usize * (ENTRY_BYTES + PAGE_SIZE) + TRAILER_FIXED;

/// A raw page of a batch that stays in guest memory: its bytes go into the
/// socket from there ([`BatchBuilder::push_in_place`]), after the batch's
/// own payload bytes up to `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InPlacePage {
    /// Offset in the batch buffer (headroom included) of the own payload
    /// byte this page goes before.
    pub at: usize,
    /// Address of the page's first byte in the source's guest memory.
    pub addr: usize,
}

/// Builds one batch. Its buffer can be recycled ([`BatchBuilder::from_buffer`])
/// and a page can be read straight into it ([`BatchBuilder::page_slot`]),
/// so building a batch costs no allocation and no extra copy of the page.
#[derive(Debug)]
pub struct BatchBuilder {
    /// Initialized bytes; `used` of them hold the payloads so far, after
    /// `headroom` bytes left free for the caller (e.g. a frame header).
    bytes: Vec<u8>,
    /// The table so far.
    table: Vec<u8>,
    headroom: usize,
    used: usize,
    pages: u32,
    /// Raw pages left in guest memory, in payload order.
    in_place: Vec<InPlacePage>,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuilder {
    /// An empty batch.
    pub fn new() -> Self {
        Self::with_capacity(64 * 1024)
    }

    /// An empty batch with room for `bytes` bytes.
    pub fn with_capacity(bytes: usize) -> Self {
        Self::from_buffer(Vec::new(), bytes)
    }

    /// An empty batch in a recycled buffer (e.g. one [`BatchBuilder::finish`]
    /// returned earlier), grown to at least `bytes` bytes.
    pub fn from_buffer(buffer: Vec<u8>, bytes: usize) -> Self {
        Self::with_headroom(buffer, bytes, 0)
    }

    /// Like [`BatchBuilder::from_buffer`], with `headroom` free bytes before
    /// the batch: [`BatchBuilder::finish`] then returns them, unchanged, in
    /// front of the batch.
    ///
    /// Room for `bytes` is reserved, but only what the batch uses gets
    /// initialized (zeroed) as it grows: a small batch in a new buffer does
    /// not pay for zeroing a large one.
    pub fn with_headroom(mut buffer: Vec<u8>, bytes: usize, headroom: usize) -> Self {
        buffer.reserve(bytes.saturating_sub(buffer.len()));
        let len = headroom + PAGE_SIZE;
        if buffer.len() < len {
            buffer.resize(len, 0);
        }
        Self {
            bytes: buffer,
            table: Vec::with_capacity(64 * ENTRY_BYTES),
            headroom,
            used: headroom,
            pages: 0,
            in_place: Vec::new(),
        }
    }

    fn ensure_room(&mut self, payload: usize) {
        let need = self.used + payload;
        if need > self.bytes.len() {
            // Within the reserved capacity: no reallocation, and each byte
            // is zeroed once, when first needed.
            let grown = need.max(self.bytes.len() * 2).min(self.bytes.capacity());
            self.bytes.resize(grown.max(need), 0);
        }
    }

    /// The buffer back, for another batch ([`BatchBuilder::with_headroom`]).
    pub fn into_buffer(self) -> Vec<u8> {
        self.bytes
    }

    fn add_entry(&mut self, page: u64, encoding: PageEncoding, len: usize, hash: u64) {
        let len = u16::try_from(len)
            .ok()
            .filter(|&l| usize::from(l) <= PAGE_SIZE)
            .expect("page payload longer than a page");
        self.table.extend_from_slice(&page.to_le_bytes());
        self.table.push(encoding as u8);
        self.table.extend_from_slice(&len.to_le_bytes());
        self.table.extend_from_slice(&hash.to_le_bytes());
        self.pages += 1;
    }

    /// Append one page whose decoded content hashes to `hash`
    /// ([`super::page_hash`]). Panics when the batch already holds
    /// [`MAX_BATCH_PAGES`] pages or the payload is longer than a page:
    /// callers check [`BatchBuilder::is_full`].
    pub fn push(&mut self, page: u64, encoding: PageEncoding, payload: &[u8], hash: u64) {
        assert!(self.pages < MAX_BATCH_PAGES, "batch full");
        self.ensure_room(payload.len());
        self.bytes[self.used..self.used + payload.len()].copy_from_slice(payload);
        self.used += payload.len();
        self.add_entry(page, encoding, payload.len(), hash);
    }

    /// Room for the next page's bytes, right where its payload goes: fill
    /// it (e.g. straight from guest memory), then either
    /// [`BatchBuilder::commit_slot`] it or let the next call reuse it.
    pub fn page_slot(&mut self) -> &mut Page {
        assert!(self.pages < MAX_BATCH_PAGES, "batch full");
        self.ensure_room(PAGE_SIZE);
        self.slot()
    }

    /// The slot [`BatchBuilder::page_slot`] handed out (same bytes).
    pub(crate) fn slot(&mut self) -> &mut Page {
        let start = self.used;
        (&mut self.bytes[start..start + PAGE_SIZE])
            .try_into()
            .expect("a page-sized slot")
    }

    /// Make the slot's first `len` bytes the payload of `page`, whose
    /// decoded content hashes to `hash`.
    pub fn commit_slot(&mut self, page: u64, encoding: PageEncoding, len: usize, hash: u64) {
        self.used += len;
        self.add_entry(page, encoding, len, hash);
    }

    /// Append raw page `page`, whose bytes stay in guest memory at `addr`
    /// and hashed to `hash` when read there: the payload goes out from
    /// there ([`BatchBuilder::finish_in_place`]). Panics as
    /// [`BatchBuilder::push`].
    pub fn push_in_place(&mut self, page: u64, addr: usize, hash: u64) {
        assert!(self.pages < MAX_BATCH_PAGES, "batch full");
        self.in_place.push(InPlacePage {
            at: self.used,
            addr,
        });
        self.add_entry(page, PageEncoding::Raw, PAGE_SIZE, hash);
    }

    /// Pages in the batch.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Bytes the batch takes so far.
    pub fn len(&self) -> usize {
        self.used - self.headroom
            + self.in_place.len() * PAGE_SIZE
            + self.table.len()
            + TRAILER_FIXED
    }

    /// True when no page was pushed.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// True when the batch holds `max_pages` pages (capped at
    /// [`MAX_BATCH_PAGES`]) or at least `target_bytes` bytes.
    pub fn is_full(&self, max_pages: u32, target_bytes: usize) -> bool {
        self.pages >= max_pages.min(MAX_BATCH_PAGES) || self.len() >= target_bytes
    }

    /// The finished batch bytes (after the headroom, if any). Panics when
    /// pages were pushed in place: see [`BatchBuilder::finish_in_place`].
    pub fn finish(self) -> Vec<u8> {
        let (bytes, in_place) = self.finish_in_place();
        assert!(in_place.is_empty(), "a batch with pages in place");
        bytes
    }

    /// The finished batch: its own bytes (headroom, own payloads, table and
    /// trailer) and the pages left in place. The batch is the own bytes
    /// after the headroom with each page's [`PAGE_SIZE`] bytes inserted
    /// before offset `at`.
    pub fn finish_in_place(mut self) -> (Vec<u8>, Vec<InPlacePage>) {
        self.bytes.truncate(self.used);
        self.bytes.extend_from_slice(&self.table);
        let trailer = u32::try_from(self.table.len() + TRAILER_FIXED).expect("bounded table");
        self.bytes.extend_from_slice(&self.pages.to_le_bytes());
        self.bytes.extend_from_slice(&trailer.to_le_bytes());
        (self.bytes, self.in_place)
    }
}

/// One page of a batch, borrowed from the batch bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchEntry<'a> {
    /// Guest page index (guest physical address / page size).
    pub page: u64,
    /// How the payload is encoded.
    pub encoding: PageEncoding,
    /// The encoded page.
    pub payload: &'a [u8],
    /// xxh3-64 the decoded page must hash to.
    pub hash: u64,
}

/// Reads and validates a batch, one entry at a time.
#[derive(Debug)]
pub struct BatchReader<'a> {
    /// The payload area.
    payloads: &'a [u8],
    /// The table.
    table: &'a [u8],
    /// Next payload byte.
    at: usize,
    /// Next table entry.
    entry: usize,
    left: u32,
    pages: u64,
}

impl<'a> BatchReader<'a> {
    /// Start reading `bytes`; page indices must be below `pages`.
    pub fn new(bytes: &'a [u8], pages: u64) -> Result<Self, DecodeError> {
        let u32_at = |at: usize| {
            bytes
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        };
        let end = bytes.len();
        let trailer = end
            .checked_sub(4)
            .and_then(u32_at)
            .ok_or(DecodeError::Truncated { at: 0 })?;
        let count = end
            .checked_sub(8)
            .and_then(u32_at)
            .ok_or(DecodeError::Truncated { at: 0 })?;
        if count == 0 || count > MAX_BATCH_PAGES {
            return Err(DecodeError::TooManyPages(count));
        }
        let table_len = count as usize * ENTRY_BYTES;
        if trailer as usize != table_len + TRAILER_FIXED || table_len + TRAILER_FIXED > end {
            return Err(DecodeError::BadTrailer { trailer, count });
        }
        let table_start = end - TRAILER_FIXED - table_len;
        Ok(Self {
            payloads: &bytes[..table_start],
            table: &bytes[table_start..end - TRAILER_FIXED],
            at: 0,
            entry: 0,
            left: count,
            pages,
        })
    }

    /// Pages the batch announced.
    pub fn remaining(&self) -> u32 {
        self.left
    }

    /// The next entry, `None` after the last one (then the batch was fully
    /// consumed, or an error says what is left).
    pub fn next_entry(&mut self) -> Result<Option<BatchEntry<'a>>, DecodeError> {
        if self.left == 0 {
            return match self.payloads.len() - self.at {
                0 => Ok(None),
                extra => Err(DecodeError::TrailingBytes(extra)),
            };
        }
        let e = &self.table[self.entry..self.entry + ENTRY_BYTES];
        let page = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
        let encoding = PageEncoding::from_wire(e[8])?;
        let len = usize::from(u16::from_le_bytes([e[9], e[10]]));
        let hash = u64::from_le_bytes(e[11..19].try_into().expect("8 bytes"));
        if page >= self.pages {
            return Err(DecodeError::PageOutOfRange {
                page,
                pages: self.pages,
            });
        }
        if len > PAGE_SIZE {
            return Err(DecodeError::BadLength { encoding, len });
        }
        let payload = self
            .payloads
            .get(self.at..self.at + len)
            .ok_or(DecodeError::Truncated { at: self.at })?;
        self.at += len;
        self.entry += ENTRY_BYTES;
        self.left -= 1;
        Ok(Some(BatchEntry {
            page,
            encoding,
            payload,
            hash,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::{decode_page, PageEncoder, XorDeltaCache};
    use proptest::prelude::*;

    fn read_all(bytes: &[u8], pages: u64) -> Result<Vec<BatchEntry<'_>>, DecodeError> {
        let mut reader = BatchReader::new(bytes, pages)?;
        let mut out = Vec::new();
        while let Some(e) = reader.next_entry()? {
            out.push(e);
        }
        Ok(out)
    }

    #[test]
    fn entries_come_back_in_order() {
        let mut b = BatchBuilder::new();
        b.push(7, PageEncoding::Zero, &[], 11);
        b.push(2, PageEncoding::Lz4, &[1, 2, 3], 22);
        let bytes = b.finish();
        let entries = read_all(&bytes, 10).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(
            (entries[0].page, entries[0].encoding, entries[0].hash),
            (7, PageEncoding::Zero, 11)
        );
        assert_eq!(
            (entries[1].page, entries[1].payload, entries[1].hash),
            (2, &[1u8, 2, 3][..], 22)
        );
    }

    #[test]
    fn headroom_comes_back_in_front_of_the_batch() {
        let mut b = BatchBuilder::with_headroom(vec![7u8; 100], 0, 24);
        b.push(3, PageEncoding::Lz4, &[1, 2], 5);
        let bytes = b.finish();
        assert_eq!(&bytes[..24], &[7u8; 24]);
        let entries = read_all(&bytes[24..], 10).unwrap();
        assert_eq!((entries[0].page, entries[0].payload), (3, &[1u8, 2][..]));
        assert_eq!(bytes.len(), 24 + 2 + ENTRY_BYTES + 8);
    }

    #[test]
    fn pages_in_place_go_between_own_payloads_in_push_order() {
        let guest: Vec<Vec<u8>> = (1..=2u8).map(|b| vec![b; PAGE_SIZE]).collect();
        let mut b = BatchBuilder::with_headroom(Vec::new(), 0, 24);
        b.push(3, PageEncoding::Lz4, &[9, 9], 5);
        b.push_in_place(4, guest[0].as_ptr() as usize, 6);
        b.push(5, PageEncoding::Zero, &[], 7);
        b.push_in_place(6, guest[1].as_ptr() as usize, 8);
        b.push(7, PageEncoding::Lz4, &[8], 9);
        let len = b.len();
        let (bytes, in_place) = b.finish_in_place();
        assert_eq!(in_place.len(), 2);
        // Assemble the batch as the writer sends it.
        let mut batch = Vec::new();
        let mut at = 24;
        for p in &in_place {
            batch.extend_from_slice(&bytes[at..p.at]);
            let page = guest
                .iter()
                .find(|g| g.as_ptr() as usize == p.addr)
                .unwrap();
            batch.extend_from_slice(page);
            at = p.at;
        }
        batch.extend_from_slice(&bytes[at..]);
        assert_eq!(batch.len(), len);
        let entries = read_all(&batch, 10).unwrap();
        let got: Vec<_> = entries
            .iter()
            .map(|e| (e.page, e.payload.to_vec()))
            .collect();
        assert_eq!(
            got,
            vec![
                (3, vec![9, 9]),
                (4, guest[0].clone()),
                (5, vec![]),
                (6, guest[1].clone()),
                (7, vec![8]),
            ]
        );
    }

    #[test]
    fn an_empty_batch_is_rejected() {
        let bytes = BatchBuilder::new().finish();
        assert_eq!(
            read_all(&bytes, 10).unwrap_err(),
            DecodeError::TooManyPages(0)
        );
    }

    #[test]
    fn a_huge_count_is_rejected() {
        let mut bytes = u32::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(&8u32.to_le_bytes());
        assert!(matches!(
            read_all(&bytes, 10),
            Err(DecodeError::TooManyPages(_))
        ));
    }

    #[test]
    fn a_page_outside_memory_is_rejected() {
        let mut b = BatchBuilder::new();
        b.push(10, PageEncoding::Zero, &[], 1);
        let bytes = b.finish();
        assert!(matches!(
            read_all(&bytes, 10),
            Err(DecodeError::PageOutOfRange { page: 10, .. })
        ));
    }

    #[test]
    fn an_unknown_encoding_is_rejected() {
        let mut b = BatchBuilder::new();
        b.push(1, PageEncoding::Zero, &[], 1);
        let mut bytes = b.finish();
        let at = bytes.len() - 8 - ENTRY_BYTES + 8;
        bytes[at] = 0;
        assert_eq!(
            read_all(&bytes, 10).unwrap_err(),
            DecodeError::UnknownEncoding(0)
        );
    }

    #[test]
    fn truncation_and_trailing_bytes_are_rejected() {
        let mut b = BatchBuilder::new();
        b.push(1, PageEncoding::Lz4, &[1, 2, 3, 4], 1);
        let bytes = b.finish();
        assert!(read_all(&bytes[..bytes.len() - 1], 10).is_err());
        assert!(matches!(
            read_all(&bytes[2..], 10),
            Err(DecodeError::Truncated { .. })
        ));
        let mut longer = bytes.clone();
        longer.insert(0, 0);
        assert_eq!(
            read_all(&longer, 10).unwrap_err(),
            DecodeError::TrailingBytes(1)
        );
    }

    #[test]
    fn an_over_long_payload_length_is_rejected() {
        let mut bytes = vec![0u8; usize::from(u16::MAX)];
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.push(PageEncoding::Raw as u8);
        bytes.extend_from_slice(&u16::MAX.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&((ENTRY_BYTES + 8) as u32).to_le_bytes());
        assert!(matches!(
            read_all(&bytes, 10),
            Err(DecodeError::BadLength { .. })
        ));
    }

    #[test]
    fn a_trailer_that_does_not_match_its_count_is_rejected() {
        let mut b = BatchBuilder::new();
        b.push(1, PageEncoding::Zero, &[], 1);
        let mut bytes = b.finish();
        let n = bytes.len();
        bytes[n - 4..].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(
            read_all(&bytes, 10).unwrap_err(),
            DecodeError::BadTrailer {
                trailer: 7,
                count: 1
            }
        );
    }

    fn page_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(vec![0u8; PAGE_SIZE]),
            proptest::collection::vec(any::<u8>(), PAGE_SIZE),
            (any::<u8>(), 1usize..64).prop_map(|(b, period)| (0..PAGE_SIZE)
                .map(|i| b.wrapping_add((i % period) as u8))
                .collect()),
        ]
    }

    /// One table entry with hostile fields and the payload bytes that go
    /// with it (whose length may differ from the declared one).
    #[derive(Debug, Clone)]
    struct HostileEntry {
        page: u64,
        encoding: u8,
        declared: u16,
        hash: u64,
        payload: Vec<u8>,
    }

    fn hostile_entry() -> impl Strategy<Value = HostileEntry> {
        let page = prop_oneof![0u64..8, 0u64..8192, any::<u64>()];
        let encoding = prop_oneof![4 => 1u8..=6, 1 => any::<u8>()];
        let payload = prop_oneof![
            Just(Vec::new()),
            proptest::collection::vec(any::<u8>(), 1..64),
            proptest::collection::vec(any::<u8>(), PAGE_SIZE / 2..=PAGE_SIZE / 2 + 8),
            proptest::collection::vec(any::<u8>(), PAGE_SIZE..=PAGE_SIZE),
            // Valid LZ4 of a page-ish block, then possibly cut.
            (any::<u8>(), 0usize..2 * PAGE_SIZE)
                .prop_map(|(b, n)| { lz4_flex::block::compress(&vec![b; n]) }),
            // A valid zstd frame of a page-ish block, possibly cut or with a
            // byte flipped.
            (
                any::<u8>(),
                0usize..2 * PAGE_SIZE,
                any::<u16>(),
                any::<u8>()
            )
                .prop_map(|(b, n, cut, flip)| {
                    let mut frame = zstd::bulk::compress(&vec![b; n], 1).expect("zstd");
                    let len = frame.len();
                    frame[usize::from(cut) % len] ^= flip;
                    frame.truncate(len - usize::from(cut % 3 == 0));
                    frame
                }),
        ];
        // Mostly the payload's true length; sometimes a lie.
        (
            page,
            encoding,
            payload,
            prop_oneof![3 => Just(None), 1 => any::<u16>().prop_map(Some)],
            any::<u64>(),
        )
            .prop_map(|(page, encoding, payload, lie, hash)| HostileEntry {
                page,
                encoding,
                declared: lie.unwrap_or(u16::try_from(payload.len()).unwrap_or(u16::MAX)),
                hash,
                payload,
            })
    }

    /// The batch bytes of `entries`, with a consistent count and trailer.
    fn hostile_batch(entries: &[HostileEntry]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for e in entries {
            bytes.extend_from_slice(&e.payload);
        }
        for e in entries {
            bytes.extend_from_slice(&e.page.to_le_bytes());
            bytes.push(e.encoding);
            bytes.extend_from_slice(&e.declared.to_le_bytes());
            bytes.extend_from_slice(&e.hash.to_le_bytes());
        }
        let count = u32::try_from(entries.len()).unwrap();
        bytes.extend_from_slice(&count.to_le_bytes());
        let trailer = u32::try_from(entries.len() * ENTRY_BYTES + TRAILER_FIXED).unwrap();
        bytes.extend_from_slice(&trailer.to_le_bytes());
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the pages and however they change, the destination ends
        /// with the source's bytes.
        #[test]
        fn pages_round_trip_through_batches(
            first in proptest::collection::vec(page_strategy(), 1..6),
            edits in proptest::collection::vec((0usize..6, 0usize..PAGE_SIZE, any::<u8>(), 1usize..600), 0..20),
            choice in proptest::sample::select(crate::encode::EncodingChoice::ALL.to_vec()),
        ) {
            let cache = XorDeltaCache::new(64 * PAGE_SIZE);
            let mut enc = PageEncoder::new().with_zstd(true);
            enc.set_choice(choice);
            let mut src: Vec<[u8; PAGE_SIZE]> = first.iter().map(|p| p.as_slice().try_into().unwrap()).collect();
            let mut dst = vec![[0u8; PAGE_SIZE]; src.len()];
            let send = |src: &Vec<[u8; PAGE_SIZE]>, dst: &mut Vec<[u8; PAGE_SIZE]>, enc: &mut PageEncoder| {
                let mut b = BatchBuilder::new();
                for (i, p) in src.iter().enumerate() {
                    enc.encode(i as u64, p, Some(&cache), &mut b);
                }
                let bytes = b.finish();
                let mut reader = BatchReader::new(&bytes, src.len() as u64).unwrap();
                while let Some(e) = reader.next_entry().unwrap() {
                    decode_page(e.encoding, e.payload, &mut dst[e.page as usize]).unwrap();
                    assert_eq!(e.hash, crate::encode::page_hash(&dst[e.page as usize]));
                }
            };
            send(&src, &mut dst, &mut enc);
            prop_assert_eq!(&src, &dst);
            for (page, at, byte, len) in edits {
                let page = page % src.len();
                let end = (at + len).min(PAGE_SIZE);
                for b in &mut src[page][at..end] {
                    *b = b.wrapping_add(byte) ^ 0x5a;
                }
                send(&src, &mut dst, &mut enc);
                prop_assert_eq!(&src, &dst);
            }
        }

        /// Random bytes never panic the decoder (they rarely get past the
        /// trailer check: see the next test for hostile entries).
        #[test]
        fn hostile_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
            let mut page = [0u8; PAGE_SIZE];
            if let Ok(mut reader) = BatchReader::new(&bytes, 1 << 20) {
                while let Ok(Some(e)) = reader.next_entry() {
                    let _ = decode_page(e.encoding, e.payload, &mut page);
                }
            }
        }

        /// A structurally valid batch (count and trailer consistent) whose
        /// entries carry hostile fields: any page index, encoding byte,
        /// declared length (matching its payload or not) and payload. The
        /// reader and decoder never panic, never hand out a payload past
        /// the batch, and accept every entry whose fields are all valid.
        #[test]
        fn hostile_batches_never_panic(
            entries in proptest::collection::vec(hostile_entry(), 1..12),
            pages in prop_oneof![Just(1u64), 1u64..4096, Just(u64::MAX)],
        ) {
            let bytes = hostile_batch(&entries);
            let mut page = [0u8; PAGE_SIZE];
            let mut reader = BatchReader::new(&bytes, pages).expect("the structure is valid");
            prop_assert_eq!(reader.remaining() as usize, entries.len());
            let mut all_valid = true;
            for entry in &entries {
                let expected_ok = all_valid
                    && entry.page < pages
                    && PageEncoding::from_wire(entry.encoding).is_ok()
                    && usize::from(entry.declared) <= PAGE_SIZE;
                match reader.next_entry() {
                    Ok(Some(e)) => {
                        prop_assert!(entry.page < pages, "a page outside memory was accepted");
                        prop_assert!(usize::from(entry.declared) <= PAGE_SIZE);
                        prop_assert_eq!(e.encoding as u8, entry.encoding);
                        prop_assert_eq!(e.payload.len(), usize::from(entry.declared));
                        prop_assert_eq!(e.page, entry.page);
                        let _ = decode_page(e.encoding, e.payload, &mut page);
                    }
                    Ok(None) => prop_assert!(false, "ended before its count"),
                    Err(_) => {
                        prop_assert!(!expected_ok || entry.declared as usize != entry.payload.len());
                        all_valid = false;
                        break;
                    }
                }
                all_valid &= usize::from(entry.declared) == entry.payload.len();
            }
            if all_valid {
                prop_assert_eq!(reader.next_entry(), Ok(None));
            }
        }
        /// Valid batch structure around hostile payloads never panics.
        #[test]
        fn hostile_payloads_never_panic(enc in 1u8..=6, payload in proptest::collection::vec(any::<u8>(), 0..PAGE_SIZE)) {
            let mut page = [0u8; PAGE_SIZE];
            let _ = decode_page(PageEncoding::from_wire(enc).unwrap(), &payload, &mut page);
        }
    }
}
