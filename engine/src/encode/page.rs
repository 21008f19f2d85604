//! Encoding and decoding of one page.

use std::time::Instant;

use super::batch::BatchBuilder;
use super::choice::{EncodingChoice, PROBE_STRIDE, ZSTD_PROBE_STRIDE};
use super::{is_zero, xor_rle, DecodeError, Page, PageEncoding, XorDeltaCache, PAGE_SIZE};

/// A XOR delta is used only when its run-length stream is at most this long;
/// beyond it the page changed so much that LZ4 or raw is as good.
pub const MAX_XOR_STREAM: usize = PAGE_SIZE / 2;

/// A run-length stream shorter than this is sent as is: LZ4 cannot gain on
/// a few dozen bytes.
const MIN_XOR_STREAM_FOR_LZ4: usize = 128;

/// The zstd level: per 4 KiB page of the mix's text-like pages, level 1
/// gives 2.64x, level 3 2.69x for 11 % more time, negative levels less
/// than 2.2x.
pub const ZSTD_LEVEL: i32 = 1;

/// After this many pages in a row that the codec in force (LZ4 or zstd)
/// could not shrink, the encoder stops trying for [`LZ4_BACKOFF_PAGES`]
/// pages, then probes again.
/// Incompressible memory (encrypted, random, the workload guest's fill) then
/// costs no LZ4 time; compressible memory is found again within a probe.
const LZ4_FAILURES_BEFORE_BACKOFF: u32 = 16;
/// See [`LZ4_FAILURES_BEFORE_BACKOFF`].
const LZ4_BACKOFF_PAGES: u32 = 256;

/// Codec probes (LZ4 on [`PROBE_STRIDE`] pages, zstd on
/// [`ZSTD_PROBE_STRIDE`] pages) thin out while they find nothing: after
/// this many probes in a row that no codec shrank, their strides double,
/// up to [`MAX_PROBE_THINNING`] doublings; one probe that shrinks its page
/// brings them back to the full rate. On memory that does not compress
/// (the workload guest's random fill, encrypted or compressed data) the
/// probes cost 2-3 % of the engine's CPU at the full rate (`perf`, 1 GiB
/// idle), and say only that raw wins; thinned 16x they still measure the
/// codecs a few hundred times per GiB. XOR-delta probes keep the full rate:
/// they keep the pages the delta cache measures from cached.
const PROBE_MISSES_PER_DOUBLING: u32 = 16;
/// See [`PROBE_MISSES_PER_DOUBLING`]: strides at most 16x (LZ4 one page in
/// 512, zstd one in 2,048).
const MAX_PROBE_THINNING: u32 = 4;

/// What the codecs cost and gained since the last
/// [`PageEncoder::take_costs`]: the figures
/// [`super::choice::choose_encoding`] decides from. The per-codec figures
/// come from the probe pages only ([`PROBE_STRIDE`]), which try every codec
/// whatever the choice, so they do not depend on the choice in force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CodecCosts {
    /// Time spent in codecs on all pages (to take out of the base cost).
    pub codec_ns: u64,
    /// Probe pages LZ4 was tried on.
    pub lz4_pages: u64,
    /// Time those attempts took.
    pub lz4_ns: u64,
    /// Bytes those pages went out as (LZ4 or, when it did not shrink, raw).
    pub lz4_bytes: u64,
    /// Probe pages a XOR delta was tried on (cache look-up, delta, store).
    pub xor_pages: u64,
    /// Time those attempts took.
    pub xor_ns: u64,
    /// Attempts whose delta was used.
    pub xor_hits: u64,
    /// Bytes the used deltas took.
    pub xor_hit_bytes: u64,
    /// zstd probe pages ([`ZSTD_PROBE_STRIDE`]) zstd was tried on.
    pub zstd_pages: u64,
    /// Time those attempts took.
    pub zstd_ns: u64,
    /// Bytes those pages went out as with zstd (raw when it did not shrink).
    pub zstd_bytes: u64,
}

impl CodecCosts {
    /// Add another set.
    pub fn add(&mut self, o: &CodecCosts) {
        self.codec_ns += o.codec_ns;
        self.lz4_pages += o.lz4_pages;
        self.lz4_ns += o.lz4_ns;
        self.lz4_bytes += o.lz4_bytes;
        self.xor_pages += o.xor_pages;
        self.xor_ns += o.xor_ns;
        self.xor_hits += o.xor_hits;
        self.xor_hit_bytes += o.xor_hit_bytes;
        self.zstd_pages += o.zstd_pages;
        self.zstd_ns += o.zstd_ns;
        self.zstd_bytes += o.zstd_bytes;
    }
}

fn ns_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Encodes pages into a batch. One per worker thread; holds scratch buffers,
/// a reused zstd context, the back-off state, the [`EncodingChoice`] in
/// force and what the codecs cost so far.
pub struct PageEncoder {
    lz4_out: Vec<u8>,
    zstd_out: Vec<u8>,
    xor_stream: Vec<u8>,
    lz4_failures: u32,
    lz4_skip: u32,
    /// Codec probes in a row that shrank nothing (see
    /// [`PROBE_MISSES_PER_DOUBLING`]).
    probe_misses: u32,
    /// Whether a page codec could pay at all now: when not, probes count
    /// as misses whatever they shrink.
    compression_could_pay: bool,
    lz4: bool,
    /// `None`: zstd not negotiated (or its context could not be made).
    zstd: Option<zstd::bulk::Compressor<'static>>,
    choice: EncodingChoice,
    costs: CodecCosts,
}

impl std::fmt::Debug for PageEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageEncoder")
            .field("lz4", &self.lz4)
            .field("zstd", &self.zstd.is_some())
            .field("choice", &self.choice)
            .field("lz4_failures", &self.lz4_failures)
            .field("lz4_skip", &self.lz4_skip)
            .field("probe_misses", &self.probe_misses)
            .field("compression_could_pay", &self.compression_could_pay)
            .field("costs", &self.costs)
            .finish_non_exhaustive()
    }
}

/// A zstd context for pages: [`ZSTD_LEVEL`], no checksum (each batch
/// entry carries the page's hash), no content size or dictionary id (the
/// size is always a page). `None` when libzstd cannot make one.
fn page_compressor() -> Option<zstd::bulk::Compressor<'static>> {
    let mut c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok()?;
    c.include_checksum(false).ok()?;
    c.include_contentsize(false).ok()?;
    c.include_dictid(false).ok()?;
    Some(c)
}

impl Default for PageEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl PageEncoder {
    /// A fresh encoder.
    pub fn new() -> Self {
        Self {
            lz4_out: vec![0; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)],
            // One byte short of a page: a frame that does not fit did not
            // shrink the page.
            zstd_out: vec![0; PAGE_SIZE - 1],
            xor_stream: Vec::with_capacity(PAGE_SIZE),
            lz4_failures: 0,
            lz4_skip: 0,
            probe_misses: 0,
            compression_could_pay: true,
            lz4: true,
            zstd: None,
            choice: EncodingChoice::XorDeltaLz4,
            costs: CodecCosts::default(),
        }
    }

    /// Encode the next pages with `choice` (every codec by default; the
    /// probe pages, see [`PROBE_STRIDE`], always try every codec).
    pub fn set_choice(&mut self, choice: EncodingChoice) {
        self.choice = choice;
    }

    /// Whether a page codec could pay for itself at all on the figures the
    /// choice was made from (`EncodingInputs::compression_could_pay`; yes
    /// by default). When it could not (a link faster than any codec, whose
    /// speed is itself CPU the codecs would take), a probe that shrinks its
    /// page changes nothing, and the probes thin out as on memory that does
    /// not compress (see [`PROBE_MISSES_PER_DOUBLING`]).
    pub fn set_compression_could_pay(&mut self, could_pay: bool) {
        self.compression_could_pay = could_pay;
    }

    /// What the codecs cost since the last call.
    pub fn take_costs(&mut self) -> CodecCosts {
        std::mem::take(&mut self.costs)
    }

    /// Use LZ4 (for pages and XOR deltas) or not (the peer did not accept
    /// it). On by default.
    pub fn with_lz4(mut self, lz4: bool) -> Self {
        self.lz4 = lz4;
        self
    }

    /// Use zstd for pages (the peer accepted
    /// [`crate::protocol::FEATURE_ZSTD`]) or not. Off by default: a page
    /// goes as zstd only on a probe page or when the choice says so.
    pub fn with_zstd(mut self, zstd: bool) -> Self {
        self.zstd = if zstd { page_compressor() } else { None };
        self
    }

    /// Whether the codec that the choice in force applies to pages (LZ4
    /// or zstd) is negotiated.
    fn page_codec_in_force(&self) -> bool {
        (self.lz4 && self.choice.lz4()) || (self.zstd.is_some() && self.choice.zstd())
    }

    /// Append `data`, the current content of guest page `page`, to `out` in
    /// the cheapest encoding, and return that encoding. With a `delta` cache,
    /// `data` becomes the page's cached copy (or, for a zero page, its
    /// cached copy is dropped).
    pub fn encode(
        &mut self,
        page: u64,
        data: &Page,
        delta: Option<&XorDeltaCache>,
        out: &mut BatchBuilder,
    ) -> PageEncoding {
        out.page_slot().copy_from_slice(data);
        self.encode_slot(page, super::page_hash(data), delta, out)
    }

    /// Whether [`PageEncoder::encode_slot`] tries no codec on `page` (with
    /// a XOR-delta cache or not): it is not a probe page and the choice in
    /// force is raw. Such a page goes out raw unless it is zero, so it
    /// needs no copy: see `source::workers`.
    pub fn sends_raw(&self, page: u64, delta: bool) -> bool {
        !((delta && (page.is_multiple_of(PROBE_STRIDE) || self.choice.delta()))
            || self.is_codec_probe(page)
            || self.page_codec_in_force())
    }

    /// How many times the codec probe strides are doubled now (see
    /// [`PROBE_MISSES_PER_DOUBLING`]).
    fn probe_thinning(&self) -> u32 {
        (self.probe_misses / PROBE_MISSES_PER_DOUBLING).min(MAX_PROBE_THINNING)
    }

    /// Whether `page` is an LZ4 probe at the current thinning.
    fn is_codec_probe(&self, page: u64) -> bool {
        page.is_multiple_of(PROBE_STRIDE << self.probe_thinning())
    }

    /// Like [`PageEncoder::encode`] for a page already read into
    /// `out.page_slot()` and hashed ([`super::page_hash`]) by the caller:
    /// saves a copy of every page sent raw.
    pub fn encode_slot(
        &mut self,
        page: u64,
        hash: u64,
        delta: Option<&XorDeltaCache>,
        out: &mut BatchBuilder,
    ) -> PageEncoding {
        let data = out.slot();
        if hash == zero_page_hash() && is_zero(data) {
            if let Some(cache) = delta {
                cache.forget(page);
            }
            out.commit_slot(page, PageEncoding::Zero, 0, hash);
            return PageEncoding::Zero;
        }
        let probe = page.is_multiple_of(PROBE_STRIDE);
        let codec_probe = self.is_codec_probe(page);
        if let Some(cache) = delta {
            if self.choice.delta() || probe {
                let t0 = Instant::now();
                self.xor_stream.clear();
                let stream = &mut self.xor_stream;
                let fits = cache.with_previous_then_store(page, data, |old| {
                    xor_rle::encode(old, data, MAX_XOR_STREAM, stream)
                });
                let hit = if fits == Some(true) {
                    let lz4 = self.choice.compresses_deltas() || probe;
                    let (encoding, payload) = self.xor_payload(lz4);
                    let len = payload.len();
                    out.slot()[..len].copy_from_slice(payload);
                    out.commit_slot(page, encoding, len, hash);
                    Some((encoding, len))
                } else {
                    None
                };
                let ns = ns_since(t0);
                self.costs.codec_ns += ns;
                if probe {
                    self.costs.xor_pages += 1;
                    self.costs.xor_ns += ns;
                    if let Some((_, len)) = hit {
                        self.costs.xor_hits += 1;
                        self.costs.xor_hit_bytes += len as u64;
                    }
                }
                if let Some((encoding, _)) = hit {
                    return encoding;
                }
            } else {
                // Sent whole: an older cached copy would be the wrong base
                // for a later delta.
                cache.forget(page);
            }
        }
        // The page codecs: the one in force (unless backing off), and on
        // probe pages LZ4 (and on zstd probes zstd) whatever the choice.
        // The smallest result goes.
        let in_force = self.page_codec_in_force();
        let backing_off = in_force && self.lz4_skip > 0;
        if backing_off {
            self.lz4_skip -= 1;
        }
        let use_lz4 = self.lz4 && (codec_probe || (self.choice.lz4() && !backing_off));
        let zstd_probe = page.is_multiple_of(ZSTD_PROBE_STRIDE << self.probe_thinning());
        let use_zstd = self.zstd.is_some() && self.choice.zstd() && !backing_off;
        let data = out.slot();
        let mut lz4_len = None;
        if use_lz4 {
            let t0 = Instant::now();
            let len = match lz4_flex::block::compress_into(data, &mut self.lz4_out) {
                Ok(n) if n < PAGE_SIZE => Some(n),
                _ => None,
            };
            let ns = ns_since(t0);
            self.costs.codec_ns += ns;
            if codec_probe {
                self.costs.lz4_pages += 1;
                self.costs.lz4_ns += ns;
                self.costs.lz4_bytes += len.unwrap_or(PAGE_SIZE) as u64;
            }
            lz4_len = len;
        }
        let mut zstd_len = None;
        let probe_zstd = zstd_probe && self.zstd.is_some();
        if let Some(compressor) = self.zstd.as_mut().filter(|_| use_zstd || probe_zstd) {
            let t0 = Instant::now();
            zstd_len = compressor
                .compress_to_buffer(&data[..], &mut self.zstd_out[..])
                .ok()
                .filter(|&n| n > 0 && n < PAGE_SIZE);
            let ns = ns_since(t0);
            self.costs.codec_ns += ns;
            if probe_zstd {
                self.costs.zstd_pages += 1;
                self.costs.zstd_ns += ns;
                self.costs.zstd_bytes += zstd_len.unwrap_or(PAGE_SIZE) as u64;
            }
        }
        if codec_probe && (self.lz4 || probe_zstd) {
            if self.compression_could_pay && (lz4_len.is_some() || zstd_len.is_some()) {
                self.probe_misses = 0;
            } else {
                self.probe_misses = self.probe_misses.saturating_add(1);
            }
        }
        if in_force && !backing_off {
            let shrank = if self.choice.zstd() {
                zstd_len.is_some()
            } else {
                lz4_len.is_some()
            };
            if shrank {
                self.lz4_failures = 0;
            } else if !codec_probe {
                self.lz4_failures += 1;
                if self.lz4_failures >= LZ4_FAILURES_BEFORE_BACKOFF {
                    // Back off; one more failed attempt backs off again.
                    self.lz4_failures = LZ4_FAILURES_BEFORE_BACKOFF - 1;
                    self.lz4_skip = LZ4_BACKOFF_PAGES;
                }
            }
        }
        match (lz4_len, zstd_len) {
            (_, Some(z)) if lz4_len.is_none_or(|l| z < l) => {
                data[..z].copy_from_slice(&self.zstd_out[..z]);
                out.commit_slot(page, PageEncoding::Zstd, z, hash);
                return PageEncoding::Zstd;
            }
            (Some(l), _) => {
                data[..l].copy_from_slice(&self.lz4_out[..l]);
                out.commit_slot(page, PageEncoding::Lz4, l, hash);
                return PageEncoding::Lz4;
            }
            _ => {}
        }
        out.commit_slot(page, PageEncoding::Raw, PAGE_SIZE, hash);
        PageEncoding::Raw
    }

    /// The XOR stream in `self.xor_stream` as a payload: LZ4-compressed
    /// when that pays.
    fn xor_payload(&mut self, lz4: bool) -> (PageEncoding, &[u8]) {
        let stream = &self.xor_stream;
        if self.lz4 && lz4 && stream.len() >= MIN_XOR_STREAM_FOR_LZ4 {
            let (len_bytes, body) = self.lz4_out.split_at_mut(2);
            if let Ok(n) = lz4_flex::block::compress_into(stream, body) {
                if n + 2 < stream.len() {
                    let len = u16::try_from(stream.len()).expect("stream below MAX_XOR_STREAM");
                    len_bytes.copy_from_slice(&len.to_le_bytes());
                    return (PageEncoding::XorRleLz4, &self.lz4_out[..n + 2]);
                }
            }
        }
        (PageEncoding::XorRle, &self.xor_stream)
    }
}

/// xxh3-64 of a zero page: a page whose hash differs is not zero, so the
/// zero check runs on (almost) zero pages only and every other page is
/// read once, by the hash.
pub fn zero_page_hash() -> u64 {
    static HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HASH.get_or_init(|| super::page_hash(&[0u8; PAGE_SIZE]))
}

/// Decode one page's payload into `page`. `page` must hold the destination's
/// current copy of the page (XOR deltas apply to it); on error it may be
/// partly changed.
pub fn decode_page(
    encoding: PageEncoding,
    payload: &[u8],
    page: &mut Page,
) -> Result<(), DecodeError> {
    let bad_length = || DecodeError::BadLength {
        encoding,
        len: payload.len(),
    };
    match encoding {
        PageEncoding::Zero => {
            if !payload.is_empty() {
                return Err(bad_length());
            }
            page.fill(0);
        }
        PageEncoding::Raw => {
            if payload.len() != PAGE_SIZE {
                return Err(bad_length());
            }
            page.copy_from_slice(payload);
        }
        PageEncoding::Lz4 => {
            if payload.is_empty() || payload.len() >= PAGE_SIZE {
                return Err(bad_length());
            }
            match lz4_flex::block::decompress_into(payload, page) {
                Ok(PAGE_SIZE) => {}
                _ => {
                    return Err(DecodeError::Lz4 {
                        expected: PAGE_SIZE,
                    })
                }
            }
        }
        PageEncoding::Zstd => {
            if payload.is_empty() || payload.len() >= PAGE_SIZE {
                return Err(bad_length());
            }
            // Into the page itself: whatever the frame claims, nothing
            // beyond a page is written or allocated.
            if zstd_decompress_page(payload, page) != Some(PAGE_SIZE) {
                return Err(DecodeError::Zstd);
            }
        }
        PageEncoding::XorRle => {
            if payload.len() > MAX_XOR_STREAM {
                return Err(bad_length());
            }
            xor_rle::apply(payload, page)?;
        }
        PageEncoding::XorRleLz4 => {
            if payload.len() < 3 || payload.len() > MAX_XOR_STREAM {
                return Err(bad_length());
            }
            let stream_len = usize::from(u16::from_le_bytes([payload[0], payload[1]]));
            if stream_len == 0 || stream_len > MAX_XOR_STREAM {
                return Err(DecodeError::Lz4 {
                    expected: stream_len,
                });
            }
            let mut stream = [0u8; MAX_XOR_STREAM];
            match lz4_flex::block::decompress_into(&payload[2..], &mut stream[..stream_len]) {
                Ok(n) if n == stream_len => {}
                _ => {
                    return Err(DecodeError::Lz4 {
                        expected: stream_len,
                    })
                }
            }
            xor_rle::apply(&stream[..stream_len], page)?;
        }
    }
    Ok(())
}

/// Decompress `payload` into `page` with this thread's reused zstd
/// context; the bytes written, `None` on any error (a corrupt frame, one
/// that needs more than a page, no context).
fn zstd_decompress_page(payload: &[u8], page: &mut Page) -> Option<usize> {
    thread_local! {
        static CONTEXT: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    CONTEXT.with(|cell| {
        let mut context = cell.borrow_mut();
        if context.is_none() {
            *context = zstd::bulk::Decompressor::new().ok();
        }
        context
            .as_mut()?
            .decompress_to_buffer(payload, &mut page[..])
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::BatchReader;

    fn encode_one(
        enc: &mut PageEncoder,
        page: u64,
        data: &Page,
        cache: Option<&XorDeltaCache>,
    ) -> (PageEncoding, Vec<u8>) {
        let mut batch = BatchBuilder::new();
        let encoding = enc.encode(page, data, cache, &mut batch);
        (encoding, batch.finish())
    }

    fn decode_into(batch: &[u8], page: &mut Page) {
        let mut reader = BatchReader::new(batch, 1 << 20).unwrap();
        let entry = reader.next_entry().unwrap().unwrap();
        decode_page(entry.encoding, entry.payload, page).unwrap();
        assert!(reader.next_entry().unwrap().is_none());
    }

    fn noise(seed: u64) -> Box<Page> {
        let mut page = Box::new([0u8; PAGE_SIZE]);
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for word in page.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        page
    }

    #[test]
    fn zero_page_is_a_flag() {
        let mut enc = PageEncoder::new();
        let (encoding, batch) = encode_one(&mut enc, 3, &[0; PAGE_SIZE], None);
        assert_eq!(encoding, PageEncoding::Zero);
        let mut page = [9u8; PAGE_SIZE];
        decode_into(&batch, &mut page);
        assert_eq!(page, [0u8; PAGE_SIZE]);
    }

    #[test]
    fn compressible_page_is_lz4() {
        let mut enc = PageEncoder::new();
        let mut data = [0u8; PAGE_SIZE];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 7) as u8;
        }
        let (encoding, batch) = encode_one(&mut enc, 1, &data, None);
        assert_eq!(encoding, PageEncoding::Lz4);
        assert!(batch.len() < PAGE_SIZE / 4);
        let mut page = [0u8; PAGE_SIZE];
        decode_into(&batch, &mut page);
        assert_eq!(page, data);
    }

    #[test]
    fn incompressible_page_is_raw() {
        let mut enc = PageEncoder::new();
        let data = noise(1);
        let (encoding, batch) = encode_one(&mut enc, 1, &data, None);
        assert_eq!(encoding, PageEncoding::Raw);
        let mut page = [0u8; PAGE_SIZE];
        decode_into(&batch, &mut page);
        assert_eq!(&page, &*data);
    }

    #[test]
    fn a_small_change_to_a_cached_page_is_a_xor_delta() {
        let mut enc = PageEncoder::new();
        let cache = XorDeltaCache::new(1 << 20);
        let old = noise(2);
        let (first, _) = encode_one(&mut enc, 5, &old, Some(&cache));
        assert_eq!(first, PageEncoding::Raw);
        let mut new = old.clone();
        new[800..808].copy_from_slice(&0x1234_u64.to_le_bytes());
        let (second, batch) = encode_one(&mut enc, 5, &new, Some(&cache));
        assert_eq!(second, PageEncoding::XorRle);
        assert!(batch.len() < 64, "{} bytes", batch.len());
        let mut page = *old;
        decode_into(&batch, &mut page);
        assert_eq!(&page, &*new);
    }

    #[test]
    fn a_large_regular_change_is_a_compressed_xor_delta() {
        let mut enc = PageEncoder::new();
        let cache = XorDeltaCache::new(1 << 20);
        let old = noise(3);
        encode_one(&mut enc, 5, &old, Some(&cache));
        let mut new = old.clone();
        for b in &mut new[1000..2000] {
            *b ^= 0x55;
        }
        let (encoding, batch) = encode_one(&mut enc, 5, &new, Some(&cache));
        assert_eq!(encoding, PageEncoding::XorRleLz4);
        let mut page = *old;
        decode_into(&batch, &mut page);
        assert_eq!(&page, &*new);
    }

    #[test]
    fn a_rewritten_cached_page_falls_back_to_raw() {
        let mut enc = PageEncoder::new();
        let cache = XorDeltaCache::new(1 << 20);
        encode_one(&mut enc, 5, &noise(4), Some(&cache));
        let (encoding, _) = encode_one(&mut enc, 5, &noise(5), Some(&cache));
        assert_eq!(encoding, PageEncoding::Raw);
    }

    #[test]
    fn lz4_backs_off_on_incompressible_pages_and_probes_again() {
        let mut enc = PageEncoder::new();
        // Odd page indices: never a probe page (PROBE_STRIDE).
        for i in 0..u64::from(LZ4_FAILURES_BEFORE_BACKOFF) {
            encode_one(&mut enc, 2 * i + 1, &noise(i + 10), None);
        }
        let mut data = [0u8; PAGE_SIZE];
        data[0] = 1;
        // In back-off: a compressible page still goes raw (correct, just larger).
        let (encoding, _) = encode_one(&mut enc, 99, &data, None);
        assert_eq!(encoding, PageEncoding::Raw);
        // The rest of the back-off; the next page is a probe.
        for i in 1..u64::from(LZ4_BACKOFF_PAGES) {
            encode_one(&mut enc, 2 * i + 1, &noise(i + 1000), None);
        }
        let (encoding, _) = encode_one(&mut enc, 99, &data, None);
        assert_eq!(encoding, PageEncoding::Lz4);
    }

    #[test]
    fn one_failed_probe_backs_off_again() {
        let mut enc = PageEncoder::new();
        for i in 0..u64::from(LZ4_FAILURES_BEFORE_BACKOFF + LZ4_BACKOFF_PAGES) {
            encode_one(&mut enc, 2 * i + 1, &noise(i + 10), None);
        }
        // The probe: incompressible, fails, and the encoder backs off again.
        encode_one(&mut enc, 1, &noise(5000), None);
        let mut data = [0u8; PAGE_SIZE];
        data[0] = 1;
        let (encoding, _) = encode_one(&mut enc, 99, &data, None);
        assert_eq!(encoding, PageEncoding::Raw);
    }

    #[test]
    fn without_lz4_compressible_pages_and_deltas_go_uncompressed() {
        let mut enc = PageEncoder::new().with_lz4(false);
        let (encoding, _) = encode_one(&mut enc, 1, &[3u8; PAGE_SIZE], None);
        assert_eq!(encoding, PageEncoding::Raw);
        let cache = XorDeltaCache::new(1 << 20);
        let old = noise(3);
        encode_one(&mut enc, 5, &old, Some(&cache));
        let mut new = old.clone();
        for b in &mut new[1000..2000] {
            *b ^= 0x55;
        }
        let (encoding, _) = encode_one(&mut enc, 5, &new, Some(&cache));
        assert_eq!(encoding, PageEncoding::XorRle);
    }

    fn compressible() -> Box<Page> {
        let mut data = Box::new([0u8; PAGE_SIZE]);
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 7) as u8;
        }
        data
    }

    #[test]
    fn the_raw_choice_sends_compressible_pages_raw_but_probes_with_lz4() {
        let mut enc = PageEncoder::new();
        enc.set_choice(EncodingChoice::Raw);
        let data = compressible();
        let (plain, _) = encode_one(&mut enc, 1, &data, None);
        assert_eq!(plain, PageEncoding::Raw);
        let (probe, batch) = encode_one(&mut enc, PROBE_STRIDE, &data, None);
        assert_eq!(probe, PageEncoding::Lz4);
        let costs = enc.take_costs();
        assert_eq!(costs.lz4_pages, 1, "only the probe tried LZ4");
        assert!(costs.lz4_bytes < PAGE_SIZE as u64);
        let mut page = [0u8; PAGE_SIZE];
        decode_into(&batch, &mut page);
        assert_eq!(&page, &*data);
        assert_eq!(enc.take_costs(), CodecCosts::default(), "taken");
    }

    #[test]
    fn codec_probes_thin_out_on_incompressible_memory_and_come_back() {
        let mut enc = PageEncoder::new().with_zstd(true);
        enc.set_choice(EncodingChoice::Raw);
        // Probe pages that nothing shrinks: after PROBE_MISSES_PER_DOUBLING
        // of them, one probe page in two is left, and so on.
        let misses = u64::from(PROBE_MISSES_PER_DOUBLING * MAX_PROBE_THINNING);
        for i in 0..misses {
            let page = (i + 1) * (PROBE_STRIDE << MAX_PROBE_THINNING);
            assert!(!enc.sends_raw(page, false), "a probe at every thinning");
            encode_one(&mut enc, page, &noise(i + 100), None);
        }
        let costs = enc.take_costs();
        assert_eq!(costs.lz4_pages, misses);
        assert!(costs.zstd_pages > 0);
        // Thinned 16x: a page at the full stride is no probe now, and goes
        // from guest memory untouched (no copy).
        let full = PROBE_STRIDE * 3;
        assert!(enc.sends_raw(full, false));
        assert!(
            !enc.sends_raw(full, true),
            "XOR-delta probes keep the full rate"
        );
        let data = compressible();
        let (encoding, _) = encode_one(&mut enc, full, &data, None);
        assert_eq!(encoding, PageEncoding::Raw);
        assert_eq!(enc.take_costs().lz4_pages, 0);
        // A probe that shrinks its page brings the full rate back.
        let thinned = PROBE_STRIDE << MAX_PROBE_THINNING;
        let (encoding, _) = encode_one(&mut enc, thinned, &data, None);
        assert_ne!(encoding, PageEncoding::Raw);
        assert!(!enc.sends_raw(full, false));
        let (encoding, _) = encode_one(&mut enc, full, &data, None);
        assert_ne!(encoding, PageEncoding::Raw);
        assert_eq!(enc.take_costs().lz4_pages, 2);
    }

    #[test]
    fn codec_probes_thin_out_when_no_compression_could_pay() {
        let mut enc = PageEncoder::new().with_zstd(true);
        enc.set_choice(EncodingChoice::Raw);
        enc.set_compression_could_pay(false);
        // Pages that compress well, on a link no codec can beat: each probe
        // shrinks its page and still counts as a miss.
        let data = compressible();
        let misses = u64::from(PROBE_MISSES_PER_DOUBLING * MAX_PROBE_THINNING);
        for i in 0..misses {
            let page = (i + 1) * (PROBE_STRIDE << MAX_PROBE_THINNING);
            let (encoding, _) = encode_one(&mut enc, page, &data, None);
            assert_ne!(encoding, PageEncoding::Raw, "the probe shrank it");
        }
        let full = PROBE_STRIDE * 3;
        assert!(enc.sends_raw(full, false), "thinned 16x");
        // The figures say a codec could pay again: the next shrinking
        // probe restores the full rate.
        enc.set_compression_could_pay(true);
        let thinned = PROBE_STRIDE << MAX_PROBE_THINNING;
        encode_one(&mut enc, thinned, &data, None);
        assert!(!enc.sends_raw(full, false));
    }

    #[test]
    fn a_page_sent_whole_leaves_no_stale_base_in_the_cache() {
        let mut enc = PageEncoder::new();
        let cache = XorDeltaCache::new(1 << 20);
        let v1 = noise(20);
        encode_one(&mut enc, 5, &v1, Some(&cache));
        // Sent raw without the cache: the destination now holds v2.
        enc.set_choice(EncodingChoice::Lz4);
        let mut v2 = v1.clone();
        v2[0] ^= 1;
        encode_one(&mut enc, 5, &v2, Some(&cache));
        // Back to deltas: v3 must not go as a delta against v1.
        enc.set_choice(EncodingChoice::XorDeltaLz4);
        let mut v3 = v2.clone();
        v3[9] ^= 1;
        let (encoding, batch) = encode_one(&mut enc, 5, &v3, Some(&cache));
        assert_eq!(encoding, PageEncoding::Raw, "no cached copy");
        let mut page = *v2;
        decode_into(&batch, &mut page);
        assert_eq!(&page, &*v3);
    }

    #[test]
    fn probe_xor_attempts_are_counted_with_their_hits() {
        let mut enc = PageEncoder::new();
        enc.set_choice(EncodingChoice::XorDelta);
        let cache = XorDeltaCache::new(1 << 20);
        let old = noise(21);
        let probe = 3 * PROBE_STRIDE;
        encode_one(&mut enc, probe, &old, Some(&cache));
        let mut new = old.clone();
        new[100] ^= 0xff;
        let (encoding, _) = encode_one(&mut enc, probe, &new, Some(&cache));
        assert_eq!(encoding, PageEncoding::XorRle);
        let costs = enc.take_costs();
        assert_eq!((costs.xor_pages, costs.xor_hits), (2, 1));
        assert_eq!(costs.lz4_pages, 1, "the probe's miss tried LZ4 once");
        assert!(costs.xor_hit_bytes > 0 && costs.xor_hit_bytes < 64);
        // Not a probe page: nothing counted but the time.
        encode_one(&mut enc, 7, &old, Some(&cache));
        encode_one(&mut enc, 7, &new, Some(&cache));
        let costs = enc.take_costs();
        assert_eq!((costs.xor_pages, costs.lz4_pages), (0, 0));
    }

    /// A text-like page as the workload guest's `fill=mix` writes it
    /// (words, spaces, line breaks, now and then a number).
    fn text_like(seed: u64) -> Box<Page> {
        const WORDS: [&str; 16] = [
            "the", "of", "return", "static", "int", "struct", "memory", "kernel", "buffer",
            "while", "NULL", "{", "}", ");", "->", "#include",
        ];
        let mut page = Box::new([b' '; PAGE_SIZE]);
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let (mut n, mut col) = (0, 0);
        while n < PAGE_SIZE {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let number = format!("{}", (x >> 8) % 100_000);
            let word = if x & 31 == 0 {
                number.as_str()
            } else {
                WORDS[((x >> 8) % 16).min((x >> 24) % 16) as usize]
            };
            for &b in word.as_bytes() {
                if n < PAGE_SIZE {
                    page[n] = b;
                    n += 1;
                    col += 1;
                }
            }
            if n < PAGE_SIZE {
                page[n] = if col > 70 { b'\n' } else { b' ' };
                col = if col > 70 { 0 } else { col + 1 };
                n += 1;
            }
        }
        page
    }

    #[test]
    fn the_zstd_choice_sends_text_like_pages_smaller_than_lz4() {
        let data = text_like(7);
        let mut lz4 = PageEncoder::new().with_zstd(true);
        lz4.set_choice(EncodingChoice::Lz4);
        let (encoding, lz4_batch) = encode_one(&mut lz4, 1, &data, None);
        assert_eq!(encoding, PageEncoding::Lz4);
        let mut enc = PageEncoder::new().with_zstd(true);
        enc.set_choice(EncodingChoice::Zstd);
        let (encoding, batch) = encode_one(&mut enc, 1, &data, None);
        assert_eq!(encoding, PageEncoding::Zstd);
        assert!(
            batch.len() < lz4_batch.len(),
            "zstd {} bytes, LZ4 {}",
            batch.len(),
            lz4_batch.len()
        );
        let mut page = [0u8; PAGE_SIZE];
        decode_into(&batch, &mut page);
        assert_eq!(&page, &*data);
        // Incompressible: raw.
        let (encoding, _) = encode_one(&mut enc, 3, &noise(8), None);
        assert_eq!(encoding, PageEncoding::Raw);
    }

    #[test]
    fn zstd_probes_are_counted_whatever_the_choice() {
        let mut enc = PageEncoder::new().with_zstd(true);
        enc.set_choice(EncodingChoice::Raw);
        let data = text_like(9);
        let (plain, _) = encode_one(&mut enc, PROBE_STRIDE, &data, None);
        assert_eq!(plain, PageEncoding::Lz4, "an LZ4 probe, not a zstd one");
        let (probe, batch) = encode_one(&mut enc, ZSTD_PROBE_STRIDE, &data, None);
        assert_eq!(probe, PageEncoding::Zstd, "the smaller of the two");
        encode_one(&mut enc, 2 * ZSTD_PROBE_STRIDE, &noise(10), None);
        let costs = enc.take_costs();
        assert_eq!((costs.lz4_pages, costs.zstd_pages), (3, 2));
        assert!(costs.zstd_bytes < (PAGE_SIZE + PAGE_SIZE / 2) as u64);
        let mut page = [0u8; PAGE_SIZE];
        decode_into(&batch, &mut page);
        assert_eq!(&page, &*data);
    }

    #[test]
    fn without_zstd_negotiated_no_page_is_zstd() {
        // The choice says zstd, but the peer did not accept it.
        let mut enc = PageEncoder::new();
        enc.set_choice(EncodingChoice::XorDeltaZstd);
        let cache = XorDeltaCache::new(1 << 20);
        for page in [1, PROBE_STRIDE, ZSTD_PROBE_STRIDE, 5 * ZSTD_PROBE_STRIDE] {
            let (encoding, _) = encode_one(&mut enc, page, &text_like(page), Some(&cache));
            assert_ne!(encoding, PageEncoding::Zstd, "page {page}");
        }
        assert_eq!(enc.take_costs().zstd_pages, 0);
    }

    #[test]
    fn zstd_backs_off_on_incompressible_pages() {
        let mut enc = PageEncoder::new().with_zstd(true);
        enc.set_choice(EncodingChoice::Zstd);
        for i in 0..u64::from(LZ4_FAILURES_BEFORE_BACKOFF) {
            encode_one(&mut enc, 2 * i + 1, &noise(i + 30), None);
        }
        let (encoding, _) = encode_one(&mut enc, 99, &text_like(1), None);
        assert_eq!(encoding, PageEncoding::Raw, "backing off");
    }

    #[test]
    fn hostile_zstd_frames_are_one_error() {
        let mut page = [0u8; PAGE_SIZE];
        let mut c = zstd::bulk::Compressor::new(1).unwrap();
        // Decompresses to more than a page: refused, nothing beyond it written.
        let big = c.compress(&[7u8; 2 * PAGE_SIZE]).unwrap();
        assert_eq!(
            decode_page(PageEncoding::Zstd, &big, &mut page),
            Err(DecodeError::Zstd)
        );
        // To less than a page.
        let small = c.compress(&[7u8; PAGE_SIZE - 1]).unwrap();
        assert_eq!(
            decode_page(PageEncoding::Zstd, &small, &mut page),
            Err(DecodeError::Zstd)
        );
        // Cut, and garbage.
        let good = c.compress(&text_like(3)[..]).unwrap();
        assert!(decode_page(PageEncoding::Zstd, &good[..good.len() - 1], &mut page).is_err());
        assert!(decode_page(PageEncoding::Zstd, &[0xff; 40], &mut page).is_err());
        // No payload, or one no smaller than a page.
        assert!(matches!(
            decode_page(PageEncoding::Zstd, &[], &mut page),
            Err(DecodeError::BadLength { .. })
        ));
        assert!(matches!(
            decode_page(PageEncoding::Zstd, &[0; PAGE_SIZE], &mut page),
            Err(DecodeError::BadLength { .. })
        ));
        // The good one decodes.
        decode_page(PageEncoding::Zstd, &good, &mut page).unwrap();
        assert_eq!(&page, &*text_like(3));
    }

    #[test]
    fn corrupt_lz4_is_an_error() {
        let mut page = [0u8; PAGE_SIZE];
        let err = decode_page(PageEncoding::Lz4, &[0xff, 0xff, 0xff], &mut page).unwrap_err();
        assert!(matches!(err, DecodeError::Lz4 { .. }));
    }

    #[test]
    fn raw_with_the_wrong_length_is_an_error() {
        let mut page = [0u8; PAGE_SIZE];
        let err = decode_page(PageEncoding::Raw, &[1; 100], &mut page).unwrap_err();
        assert!(matches!(err, DecodeError::BadLength { .. }));
    }

    #[test]
    fn zero_with_a_payload_is_an_error() {
        let mut page = [0u8; PAGE_SIZE];
        assert!(decode_page(PageEncoding::Zero, &[1], &mut page).is_err());
    }

    #[test]
    fn compressed_xor_with_a_lying_length_is_an_error() {
        let mut page = [0u8; PAGE_SIZE];
        let stream = [0u8, 4, 1, 2, 3, 4];
        let mut payload = vec![0xff, 0x7f];
        payload.extend(lz4_flex::block::compress(&stream));
        assert!(decode_page(PageEncoding::XorRleLz4, &payload, &mut page).is_err());
    }
}
