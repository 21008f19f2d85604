//! The page-batch payload: many pages in one frame.
//!
//! ```text
//! u32 LE  count                  1..=MAX_BATCH_PAGES
//! count times:
//!   u64 LE  page index           < pages of the memory layout
//!   u8      encoding             PageEncoding (0 invalid)
//!   u16 LE  payload length       allowed range depends on the encoding
//!   [u8]    payload
//! ```
//! Nothing may follow the last entry. A page appears at most once per batch
//! and per round (the source guarantees it; a destination that is fed a page
//! twice simply applies both in order).

use super::{DecodeError, Page, PageEncoding, PAGE_SIZE};

/// Most pages one batch may hold: bounds the work one frame can ask for.
pub const MAX_BATCH_PAGES: u32 = 1024;

/// Bytes of one entry's header (page index, encoding, payload length).
pub const ENTRY_HEADER_BYTES: usize = 8 + 1 + 2;

/// Largest possible batch: the header plus `MAX_BATCH_PAGES` raw pages.
pub const MAX_BATCH_BYTES: usize = 4 + MAX_BATCH_PAGES as usize * (ENTRY_HEADER_BYTES + PAGE_SIZE);

/// Builds one batch. Its buffer can be recycled ([`BatchBuilder::from_buffer`])
/// and a page can be read straight into it ([`BatchBuilder::page_slot`]),
/// so building a batch costs no allocation and no extra copy of the page.
#[derive(Debug)]
pub struct BatchBuilder {
    /// Initialized bytes; `used` of them hold the batch so far, after
    /// `headroom` bytes left free for the caller (e.g. a frame header).
    bytes: Vec<u8>,
    headroom: usize,
    used: usize,
    pages: u32,
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
    pub fn with_headroom(mut buffer: Vec<u8>, bytes: usize, headroom: usize) -> Self {
        let len = bytes.max(headroom + 4 + ENTRY_HEADER_BYTES + PAGE_SIZE);
        buffer.resize(len, 0);
        buffer[headroom..headroom + 4].fill(0);
        Self {
            bytes: buffer,
            headroom,
            used: headroom + 4,
            pages: 0,
        }
    }

    fn ensure_room(&mut self, payload: usize) {
        let need = self.used + ENTRY_HEADER_BYTES + payload;
        if need > self.bytes.len() {
            self.bytes.resize(need.max(self.bytes.len() * 2), 0);
        }
    }

    fn write_header(&mut self, page: u64, encoding: PageEncoding, len: usize) {
        let len = u16::try_from(len)
            .ok()
            .filter(|&l| usize::from(l) <= PAGE_SIZE)
            .expect("page payload longer than a page");
        let h = &mut self.bytes[self.used..self.used + ENTRY_HEADER_BYTES];
        h[..8].copy_from_slice(&page.to_le_bytes());
        h[8] = encoding as u8;
        h[9..11].copy_from_slice(&len.to_le_bytes());
    }

    /// Append one page. Panics when the batch already holds
    /// [`MAX_BATCH_PAGES`] pages or the payload is longer than a page:
    /// callers check [`BatchBuilder::is_full`].
    pub fn push(&mut self, page: u64, encoding: PageEncoding, payload: &[u8]) {
        assert!(self.pages < MAX_BATCH_PAGES, "batch full");
        self.ensure_room(payload.len());
        self.write_header(page, encoding, payload.len());
        let start = self.used + ENTRY_HEADER_BYTES;
        self.bytes[start..start + payload.len()].copy_from_slice(payload);
        self.used = start + payload.len();
        self.pages += 1;
    }

    /// Room for the next page's bytes, right where a raw payload goes: fill
    /// it (e.g. straight from guest memory), then either
    /// [`BatchBuilder::commit_slot`] it or let the next call reuse it.
    pub fn page_slot(&mut self) -> &mut Page {
        assert!(self.pages < MAX_BATCH_PAGES, "batch full");
        self.ensure_room(PAGE_SIZE);
        self.slot()
    }

    /// The slot [`BatchBuilder::page_slot`] handed out (same bytes).
    pub(crate) fn slot(&mut self) -> &mut Page {
        let start = self.used + ENTRY_HEADER_BYTES;
        (&mut self.bytes[start..start + PAGE_SIZE])
            .try_into()
            .expect("a page-sized slot")
    }

    /// Make the slot's first `len` bytes the payload of `page`.
    pub fn commit_slot(&mut self, page: u64, encoding: PageEncoding, len: usize) {
        self.write_header(page, encoding, len);
        self.used += ENTRY_HEADER_BYTES + len;
        self.pages += 1;
    }

    /// Pages in the batch.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Bytes the batch takes so far.
    pub fn len(&self) -> usize {
        self.used - self.headroom
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

    /// The finished batch bytes (after the headroom, if any).
    pub fn finish(mut self) -> Vec<u8> {
        let h = self.headroom;
        self.bytes[h..h + 4].copy_from_slice(&self.pages.to_le_bytes());
        self.bytes.truncate(self.used);
        self.bytes
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
}

/// Reads and validates a batch, one entry at a time.
#[derive(Debug)]
pub struct BatchReader<'a> {
    bytes: &'a [u8],
    at: usize,
    left: u32,
    pages: u64,
}

impl<'a> BatchReader<'a> {
    /// Start reading `bytes`; page indices must be below `pages`.
    pub fn new(bytes: &'a [u8], pages: u64) -> Result<Self, DecodeError> {
        let count = bytes.get(..4).ok_or(DecodeError::Truncated { at: 0 })?;
        let count = u32::from_le_bytes(count.try_into().expect("4 bytes"));
        if count == 0 || count > MAX_BATCH_PAGES {
            return Err(DecodeError::TooManyPages(count));
        }
        Ok(Self {
            bytes,
            at: 4,
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
            return match self.bytes.len() - self.at {
                0 => Ok(None),
                extra => Err(DecodeError::TrailingBytes(extra)),
            };
        }
        let header = self
            .bytes
            .get(self.at..self.at + ENTRY_HEADER_BYTES)
            .ok_or(DecodeError::Truncated { at: self.at })?;
        let page = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        let encoding = PageEncoding::from_wire(header[8])?;
        let len = usize::from(u16::from_le_bytes([header[9], header[10]]));
        if page >= self.pages {
            return Err(DecodeError::PageOutOfRange {
                page,
                pages: self.pages,
            });
        }
        if len > PAGE_SIZE {
            return Err(DecodeError::BadLength { encoding, len });
        }
        let start = self.at + ENTRY_HEADER_BYTES;
        let payload = self
            .bytes
            .get(start..start + len)
            .ok_or(DecodeError::Truncated { at: start })?;
        self.at = start + len;
        self.left -= 1;
        Ok(Some(BatchEntry {
            page,
            encoding,
            payload,
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
        b.push(7, PageEncoding::Zero, &[]);
        b.push(2, PageEncoding::Lz4, &[1, 2, 3]);
        let bytes = b.finish();
        let entries = read_all(&bytes, 10).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(
            (entries[0].page, entries[0].encoding),
            (7, PageEncoding::Zero)
        );
        assert_eq!((entries[1].page, entries[1].payload), (2, &[1u8, 2, 3][..]));
    }

    #[test]
    fn headroom_comes_back_in_front_of_the_batch() {
        let mut b = BatchBuilder::with_headroom(vec![7u8; 100], 0, 24);
        b.push(3, PageEncoding::Lz4, &[1, 2]);
        let bytes = b.finish();
        let entries = read_all(&bytes[24..], 10).unwrap();
        assert_eq!((entries[0].page, entries[0].payload), (3, &[1u8, 2][..]));
        assert_eq!(bytes.len(), 24 + 4 + ENTRY_HEADER_BYTES + 2);
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
        let bytes = u32::MAX.to_le_bytes();
        assert!(matches!(
            read_all(&bytes, 10),
            Err(DecodeError::TooManyPages(_))
        ));
    }

    #[test]
    fn a_page_outside_memory_is_rejected() {
        let mut b = BatchBuilder::new();
        b.push(10, PageEncoding::Zero, &[]);
        let bytes = b.finish();
        assert!(matches!(
            read_all(&bytes, 10),
            Err(DecodeError::PageOutOfRange { page: 10, .. })
        ));
    }

    #[test]
    fn an_unknown_encoding_is_rejected() {
        let mut b = BatchBuilder::new();
        b.push(1, PageEncoding::Zero, &[]);
        let mut bytes = b.finish();
        bytes[4 + 8] = 0;
        assert_eq!(
            read_all(&bytes, 10).unwrap_err(),
            DecodeError::UnknownEncoding(0)
        );
    }

    #[test]
    fn truncation_and_trailing_bytes_are_rejected() {
        let mut b = BatchBuilder::new();
        b.push(1, PageEncoding::Lz4, &[1, 2, 3, 4]);
        let bytes = b.finish();
        assert!(matches!(
            read_all(&bytes[..bytes.len() - 1], 10),
            Err(DecodeError::Truncated { .. })
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            read_all(&longer, 10).unwrap_err(),
            DecodeError::TrailingBytes(1)
        );
    }

    #[test]
    fn an_over_long_payload_length_is_rejected() {
        let mut bytes = 1u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.push(PageEncoding::Raw as u8);
        bytes.extend_from_slice(&u16::MAX.to_le_bytes());
        bytes.extend(vec![0u8; usize::from(u16::MAX)]);
        assert!(matches!(
            read_all(&bytes, 10),
            Err(DecodeError::BadLength { .. })
        ));
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the pages and however they change, the destination ends
        /// with the source's bytes.
        #[test]
        fn pages_round_trip_through_batches(
            first in proptest::collection::vec(page_strategy(), 1..6),
            edits in proptest::collection::vec((0usize..6, 0usize..PAGE_SIZE, any::<u8>(), 1usize..600), 0..20),
        ) {
            let cache = XorDeltaCache::new(64 * PAGE_SIZE);
            let mut enc = PageEncoder::new();
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

        /// Hostile bytes never panic the decoder.
        #[test]
        fn hostile_batches_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
            let mut page = [0u8; PAGE_SIZE];
            if let Ok(mut reader) = BatchReader::new(&bytes, 1 << 20) {
                while let Ok(Some(e)) = reader.next_entry() {
                    let _ = decode_page(e.encoding, e.payload, &mut page);
                }
            }
        }

        /// Valid batch structure around hostile payloads never panics.
        #[test]
        fn hostile_payloads_never_panic(enc in 1u8..=5, payload in proptest::collection::vec(any::<u8>(), 0..PAGE_SIZE)) {
            let mut page = [0u8; PAGE_SIZE];
            let _ = decode_page(PageEncoding::from_wire(enc).unwrap(), &payload, &mut page);
        }
    }
}
