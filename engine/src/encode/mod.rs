//! Page encoding: how one 4 KiB guest page travels on the wire.
//!
//! The source picks, per page, the cheapest of (in this order):
//! - **zero**: a flag, no payload ([`PageEncoding::Zero`]);
//! - **unchanged since last sent**: not sent at all; the caller compares the
//!   page's xxh3-64 with the hash of the copy it sent last ([`page_hash`]);
//! - **XOR delta** against a cached earlier copy ([`XorDeltaCache`]): the XOR
//!   of old and new content, run-length coded ([`xor_rle`]), then LZ4 when
//!   that shrinks it further;
//! - **LZ4** (lz4_flex block format) or **zstd** (level 1, one frame per
//!   page) when it shrinks the page;
//! - **raw** otherwise.
//!
//! Which of XOR delta, LZ4 and zstd are tried is decided while pages flow
//! from what they cost and what the link takes ([`choice`]): on a link
//! faster than the encoders, pages go raw; on a slow one, zstd (2.6x on
//! text-like pages where LZ4 gets 1.7x, at about twice LZ4's time).
//!
//! Pages travel in batches ([`batch`]): the payloads, then a table of page
//! index + encoding + length + hash of the decoded page, bounded and
//! validated on decode so hostile bytes give a [`DecodeError`], never a
//! panic.

pub mod batch;
pub mod choice;
mod delta_cache;
mod page;
pub mod page_hash;
pub mod xor_rle;

pub use batch::{BatchBuilder, BatchEntry, BatchReader};
pub use choice::{choose_encoding, EncodingChoice, EncodingDecision, EncodingInputs};
pub use delta_cache::XorDeltaCache;
pub use page::{decode_page, zero_page_hash, CodecCosts, PageEncoder};

use serde::Serialize;

/// Size of a guest page, the unit of everything in this crate.
pub const PAGE_SIZE: usize = 4096;

/// One page's bytes.
pub type Page = [u8; PAGE_SIZE];

/// How one page's payload is encoded. `0` is reserved as invalid so zeroed
/// bytes never decode as a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[repr(u8)]
pub enum PageEncoding {
    /// All bytes zero; no payload.
    Zero = 1,
    /// The page as is; payload is exactly [`PAGE_SIZE`] bytes.
    Raw = 2,
    /// An LZ4 block that decompresses to exactly [`PAGE_SIZE`] bytes.
    Lz4 = 3,
    /// A run-length coded XOR against the destination's current copy of
    /// the page (see [`xor_rle`]).
    XorRle = 4,
    /// `u16` LE length of the run-length coded XOR, then that stream as an
    /// LZ4 block.
    XorRleLz4 = 5,
    /// One zstd frame (no checksum: the batch entry's hash checks the
    /// page) that decompresses to exactly [`PAGE_SIZE`] bytes.
    Zstd = 6,
}

impl PageEncoding {
    /// The handshake features (`crate::protocol::FEATURE_*`) a peer must
    /// have accepted to receive this encoding.
    pub fn required_features(self) -> u64 {
        use crate::protocol::{FEATURE_LZ4, FEATURE_XOR_DELTA, FEATURE_ZSTD};
        match self {
            Self::Zero | Self::Raw => 0,
            Self::Lz4 => FEATURE_LZ4,
            Self::XorRle => FEATURE_XOR_DELTA,
            Self::XorRleLz4 => FEATURE_XOR_DELTA | FEATURE_LZ4,
            Self::Zstd => FEATURE_ZSTD,
        }
    }

    /// The encoding for a wire byte.
    pub fn from_wire(byte: u8) -> Result<Self, DecodeError> {
        Ok(match byte {
            1 => Self::Zero,
            2 => Self::Raw,
            3 => Self::Lz4,
            4 => Self::XorRle,
            5 => Self::XorRleLz4,
            6 => Self::Zstd,
            other => return Err(DecodeError::UnknownEncoding(other)),
        })
    }
}

/// Why a page or a batch could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The encoding byte names no known encoding.
    #[error("unknown page encoding {0}")]
    UnknownEncoding(u8),
    /// A payload length that the encoding does not allow.
    #[error("{encoding:?} page with a payload of {len} bytes")]
    BadLength {
        /// The page's encoding.
        encoding: PageEncoding,
        /// The length found.
        len: usize,
    },
    /// The LZ4 block was corrupt or did not give the expected size.
    #[error("LZ4 block does not decompress to {expected} bytes")]
    Lz4 {
        /// The size it had to decompress to.
        expected: usize,
    },
    /// The zstd frame was corrupt or did not give exactly a page.
    #[error("zstd frame does not decompress to {PAGE_SIZE} bytes")]
    Zstd,
    /// The run-length coded XOR runs past the page or is malformed.
    #[error("XOR delta malformed at byte {at}")]
    XorRle {
        /// Offset in the run-length stream.
        at: usize,
    },
    /// The batch ended in the middle of an entry.
    #[error("page batch truncated at byte {at}")]
    Truncated {
        /// Offset where more bytes were needed.
        at: usize,
    },
    /// More pages in one batch than [`batch::MAX_BATCH_PAGES`].
    #[error("page batch claims {0} pages (limit {limit})", limit = batch::MAX_BATCH_PAGES)]
    TooManyPages(u32),
    /// The trailer's length does not fit its page count or the batch.
    #[error("page batch trailer of {trailer} bytes for {count} pages")]
    BadTrailer {
        /// The trailer length found.
        trailer: u32,
        /// The page count found.
        count: u32,
    },
    /// A page decoded to content other than its hash says: corrupted on
    /// the way, or decoded against the wrong base.
    #[error("page {page} does not match its hash once decoded (corrupted on the way?)")]
    HashMismatch {
        /// The page index.
        page: u64,
    },
    /// Bytes left after the last entry the header announced.
    #[error("{0} bytes after the last page of the batch")]
    TrailingBytes(usize),
    /// An encoding the destination did not accept in the handshake.
    #[error("{0:?} page, but that encoding was not negotiated")]
    NotNegotiated(PageEncoding),
    /// A page index outside guest memory.
    #[error("page {page} outside guest memory ({pages} pages)")]
    PageOutOfRange {
        /// The page index found.
        page: u64,
        /// Number of pages of the memory layout.
        pages: u64,
    },
}

/// xxh3-64 of a page: what "unchanged since last sent" and the memory digest
/// compare (the widest vectors the CPU has, see [`mod@page_hash`]).
pub use page_hash::page_hash;

/// True when every byte of the page is zero.
pub fn is_zero(page: &Page) -> bool {
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8-byte chunk")) == 0)
}

/// Counts of pages per way they were sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EncodingCounts {
    /// Sent as a zero flag.
    pub zero: u64,
    /// Not sent: unchanged since last sent.
    pub unchanged: u64,
    /// Sent as a XOR delta (with or without LZ4 on top).
    pub xor_delta: u64,
    /// Sent LZ4-compressed.
    pub lz4: u64,
    /// Sent raw.
    pub raw: u64,
    /// Sent zstd-compressed (absent in reports of older builds).
    #[serde(default)]
    pub zstd: u64,
}

impl EncodingCounts {
    /// Count one page sent with `encoding`.
    pub fn count(&mut self, encoding: PageEncoding) {
        match encoding {
            PageEncoding::Zero => self.zero += 1,
            PageEncoding::Raw => self.raw += 1,
            PageEncoding::Lz4 => self.lz4 += 1,
            PageEncoding::XorRle | PageEncoding::XorRleLz4 => self.xor_delta += 1,
            PageEncoding::Zstd => self.zstd += 1,
        }
    }

    /// Add another set of counts.
    pub fn add(&mut self, other: &EncodingCounts) {
        self.zero += other.zero;
        self.unchanged += other.unchanged;
        self.xor_delta += other.xor_delta;
        self.lz4 += other.lz4;
        self.raw += other.raw;
        self.zstd += other.zstd;
    }

    /// Pages that went on the wire (all but the unchanged ones).
    pub fn sent(&self) -> u64 {
        self.zero + self.xor_delta + self.lz4 + self.raw + self.zstd
    }
}
