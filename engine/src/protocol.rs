//! The migration stream: which frames flow when, and their payloads.
//!
//! Frames (kind, length, checksum, frame-format version) are
//! `ferry-transport`'s; this module defines what the engine puts in them.
//! All integers little-endian.
//!
//! ```text
//! source                                   destination
//!   Hello {stream version, page size, features, migration id, vCPUs, layout}  ->
//!                   (destination: creates the VM and its vCPUs now, so the
//!                   pause does not wait for them)
//!                                          <-  HelloAck {stream version, features}  (or Abort)
//!   round 0..n: PageBatch*, RoundEnd {round, pages}  ->
//!                                          <-  Progress: RoundWritten {round}
//!                   (the source waits for it before it pauses the guest)
//!   (guest paused) VcpuState {device sections}  ->
//!                   (destination: restores it while the last pages come)
//!   final round: PageBatch*, RoundEnd  ->
//!   Digest {memory digest, region count, a digest per layout region}  ->
//!                   (destination: all pages written, digest equal, state restored)
//!                                          <-  Ready {digest}               (or Abort)
//!   Go  ->
//!                   (destination: resume)
//!                                          <-  Running {resume instant, times}
//!                                              (or Abort: it did not resume and never will)
//!
//! after Go without Running or Abort, over a fresh connection (a new lane session):
//!   Resolve {migration id}  ->
//!                                          <-  Running {..}  (it resumed)
//!                                              or Abort {reason}  (it did not, and now never will)
//! ```
//! Either side may send `Abort {reason}` instead of its next frame; the other
//! side then stops. Before `Go` the source resumes its guest. After `Go`, an
//! Abort from the destination means it did not resume: the source resumes.
//! When neither comes, the source asks again with `Resolve` (see
//! `crate::handover`); only a destination that cannot be reached at all
//! leaves the handover in doubt, the source guest paused, for an operator
//! to resolve. The states and transitions are tabled in
//! `transport/PROTOCOL.md`.
//!
//! Features: the source offers the optional encodings it would use, the
//! destination accepts the subset it decodes, the source uses only those;
//! the destination refuses a page in an encoding it did not accept.
//!
//! Over several lanes, pages travel on the lane of their 4 MiB stripe,
//! every lane carries every `RoundEnd` (behind its own pages of the round),
//! and everything else travels on lane 0.
//!
//! The memory digest (version 2) is the wrapping sum over pages of
//! `xxh3_64(page hash, seed = page index)`, with a page's hash the xxh3-64
//! of its last content sent (source) or written (destination) and pages
//! never sent adding nothing (see `crate::digest`). Version 1 hashed the
//! table of page hashes in page order at the handover.
//!
//! The VcpuState payload (version 4) is a stream of device state sections
//! (`crate::sections`); versions up to 3 carried one opaque blob.
//!
//! The Digest payload (version 5) is the memory digest, then a u32 count
//! (the Hello layout's region count) and one u64 digest per region, in
//! layout order, adding up to the memory digest: the destination says
//! which region differs. Versions up to 4 carried the memory digest only.
//!
//! `Progress` from the destination (version 6) is [`RoundWritten`]: every
//! page of that round is written, so what the source still has to send is
//! only what the guest dirtied since, not also what sat in queues and
//! socket buffers. The source waits for it before it pauses the guest
//! (the pause then carries only the last dirty set) and skips it anywhere
//! else. Versions up to 5 sent nothing while pages streamed.
//!
//! Torn pages (version 7): the source sends raw pages straight from guest
//! memory, hashed in a read-only pass just before the kernel copies them
//! into the socket, so a guest write in between makes the bytes differ
//! from the hash. The destination writes what it got, records the hash of
//! what it wrote, and lists the page in its next `RoundWritten`
//! ([`TornPage`]); such a write came after the page's dirty bit was
//! cleared, so the source finds the page in a dirty set it collects later
//! and sends it again, whatever its hash then (a torn page that no dirty
//! set holds is corruption: the source aborts). In the final round the
//! guest is paused: a page still torn when the Digest arrives (torn then,
//! or earlier and never sent again) makes the destination abort before
//! Ready. LZ4 and XOR pages are encoded from a copy and never torn: a
//! mismatch there is corruption, as before.
//!
//! Version rule: a Hello whose stream version differs from
//! [`STREAM_VERSION`] is refused with an Abort naming both versions (the
//! frame format itself is versioned by the transport).

use crate::encode::PAGE_SIZE;
use crate::layout::{MemoryLayout, MemoryRegion, MAX_REGIONS};

/// Version of the migration stream described here (3: Hello carries the
/// migration id that `Resolve` names; 4: the VcpuState payload is device
/// state sections; 5: the Digest carries a digest per memory region;
/// 6: the destination reports each round written with [`RoundWritten`],
/// and `Running` says when the last pages were written and Ready sent;
/// 7: raw pages may arrive torn and [`RoundWritten`] lists them;
/// 8: Hello carries the source's vCPU count, and the destination creates
/// its vCPUs before the pages stream instead of in the pause; VcpuState
/// comes right after the pause, ahead of the final round, and is restored
/// on arrival).
pub const STREAM_VERSION: u32 = 8;

/// Frame flags of a page batch: its checksum covers the batch's table,
/// which carries the hash of every page (see `crate::encode::batch`), so
/// its pages may stay in guest memory until they are written.
pub(crate) const PAGE_BATCH_FLAGS: u32 = ferry_transport::frame::FLAG_COVERED_SUFFIX;

/// Longest Abort reason kept.
pub const MAX_REASON_BYTES: usize = 4096;

/// Largest vCPU/device state blob accepted.
pub const MAX_STATE_BYTES: usize = 16 << 20;

/// A payload that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed {message} payload: {problem}")]
pub struct MessageError {
    /// Which message.
    pub message: &'static str,
    /// What is wrong.
    pub problem: String,
}

struct Cursor<'a> {
    message: &'static str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(message: &'static str, bytes: &'a [u8]) -> Self {
        Self {
            message,
            bytes,
            at: 0,
        }
    }

    fn error(&self, problem: impl Into<String>) -> MessageError {
        MessageError {
            message: self.message,
            problem: problem.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], MessageError> {
        let out = self
            .bytes
            .get(self.at..self.at.saturating_add(n))
            .ok_or_else(|| self.error(format!("truncated at byte {}", self.at)))?;
        self.at += n;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, MessageError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, MessageError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn end(self) -> Result<(), MessageError> {
        match self.bytes.len() - self.at {
            0 => Ok(()),
            n => Err(self.error(format!("{n} unexpected trailing bytes"))),
        }
    }
}

/// Source -> destination: what is coming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The source's [`STREAM_VERSION`].
    pub stream_version: u32,
    /// Page size; only [`PAGE_SIZE`] is supported.
    pub page_size: u32,
    /// Optional features the source would use ([`FEATURE_LZ4`], ...).
    pub features: u64,
    /// Names this migration in a later [`FrameKind::Resolve`] question
    /// (random, never 0).
    ///
    /// [`FrameKind::Resolve`]: ferry_transport::FrameKind::Resolve
    pub migration_id: u64,
    /// The source VM's vCPUs: the destination creates as many before the
    /// stream, and the state that comes in the pause must carry as many.
    pub vcpus: u32,
    /// Guest memory layout.
    pub layout: MemoryLayout,
}

impl Hello {
    /// Payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + 16 * self.layout.regions.len());
        out.extend_from_slice(&self.stream_version.to_le_bytes());
        out.extend_from_slice(&self.page_size.to_le_bytes());
        out.extend_from_slice(&self.features.to_le_bytes());
        out.extend_from_slice(&self.migration_id.to_le_bytes());
        out.extend_from_slice(&self.vcpus.to_le_bytes());
        let n = u32::try_from(self.layout.regions.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&n.to_le_bytes());
        for r in &self.layout.regions {
            out.extend_from_slice(&r.guest_phys_addr.to_le_bytes());
            out.extend_from_slice(&r.bytes.to_le_bytes());
        }
        out
    }

    /// Parse a payload. The stream version is returned whatever it is (the
    /// caller refuses a foreign one with a clear message); the rest is only
    /// parsed, not validated (see [`MemoryLayout::validate`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        let mut c = Cursor::new("Hello", bytes);
        let stream_version = c.u32()?;
        if stream_version != STREAM_VERSION {
            return Ok(Self {
                stream_version,
                page_size: 0,
                features: 0,
                migration_id: 0,
                vcpus: 0,
                layout: MemoryLayout {
                    regions: Vec::new(),
                },
            });
        }
        let page_size = c.u32()?;
        let features = c.u64()?;
        let migration_id = c.u64()?;
        let vcpus = c.u32()?;
        let n = c.u32()?;
        if n as usize > MAX_REGIONS {
            return Err(c.error(format!("{n} regions (limit {MAX_REGIONS})")));
        }
        let mut regions = Vec::with_capacity(n as usize);
        for _ in 0..n {
            regions.push(MemoryRegion {
                guest_phys_addr: c.u64()?,
                bytes: c.u64()?,
            });
        }
        c.end()?;
        Ok(Self {
            stream_version,
            page_size,
            features,
            migration_id,
            vcpus,
            layout: MemoryLayout { regions },
        })
    }

    /// Hello for a VM of `vcpus` vCPUs and memory `layout` at this side's
    /// version, offering `features`, under a fresh random migration id.
    pub fn new(layout: MemoryLayout, features: u64, vcpus: u32) -> Self {
        Self {
            stream_version: STREAM_VERSION,
            page_size: PAGE_SIZE as u32,
            features,
            migration_id: new_migration_id(),
            vcpus,
            layout,
        }
    }
}

/// A random migration id (never 0: zeroed bytes never name a migration).
pub fn new_migration_id() -> u64 {
    let id = ferry_transport::lanes::handshake::new_session_id();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&id[..8]);
    u64::from_le_bytes(bytes).max(1)
}

/// Feature: LZ4-compressed pages ([`crate::encode::PageEncoding::Lz4`]).
pub const FEATURE_LZ4: u64 = 1 << 0;
/// Feature: XOR deltas ([`crate::encode::PageEncoding::XorRle`] and
/// `XorRleLz4`; the latter also needs [`FEATURE_LZ4`]).
pub const FEATURE_XOR_DELTA: u64 = 1 << 1;
/// Feature: zstd-compressed pages ([`crate::encode::PageEncoding::Zstd`]).
/// A peer without it never gets one: the source's choice leaves zstd out.
pub const FEATURE_ZSTD: u64 = 1 << 2;
/// Every feature this build understands. Zero pages and raw pages are not
/// features: every side has them.
pub const SUPPORTED_FEATURES: u64 = FEATURE_LZ4 | FEATURE_XOR_DELTA | FEATURE_ZSTD;

/// Destination -> source: the stream version spoken and the features
/// accepted (a subset of those offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloAck {
    /// The destination's [`STREAM_VERSION`].
    pub stream_version: u32,
    /// Features the source may use.
    pub features: u64,
}

impl HelloAck {
    /// Payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.stream_version.to_le_bytes().to_vec();
        out.extend_from_slice(&self.features.to_le_bytes());
        out
    }

    /// Parse a payload; like [`Hello::decode`], a foreign version is
    /// returned (features 0) for the caller to refuse by name.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        let mut c = Cursor::new("HelloAck", bytes);
        let stream_version = c.u32()?;
        if stream_version != STREAM_VERSION {
            return Ok(Self {
                stream_version,
                features: 0,
            });
        }
        let features = c.u64()?;
        c.end()?;
        Ok(Self {
            stream_version,
            features,
        })
    }
}

/// Encode a message that is one u32.
pub fn encode_u32(value: u32) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}

/// Decode a message that is one u32.
pub fn decode_u32(message: &'static str, bytes: &[u8]) -> Result<u32, MessageError> {
    let mut c = Cursor::new(message, bytes);
    let v = c.u32()?;
    c.end()?;
    Ok(v)
}

/// The Digest message: the memory digest and one digest per layout region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestMessage {
    /// The memory digest (the region digests' wrapping sum).
    pub total: u64,
    /// One per layout region, in layout order.
    pub regions: Vec<u64>,
}

impl DigestMessage {
    /// Encode as the Digest payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(12 + 8 * self.regions.len());
        b.extend_from_slice(&self.total.to_le_bytes());
        let count = u32::try_from(self.regions.len()).expect("at most MAX_REGIONS regions");
        b.extend_from_slice(&count.to_le_bytes());
        for r in &self.regions {
            b.extend_from_slice(&r.to_le_bytes());
        }
        b
    }

    /// Decode a Digest payload; at most [`MAX_REGIONS`] regions.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        let mut c = Cursor::new("Digest", bytes);
        let total = c.u64()?;
        let count = c.u32()? as usize;
        if count == 0 || count > MAX_REGIONS {
            return Err(c.error(format!("{count} region digests (1..={MAX_REGIONS})")));
        }
        let regions = (0..count).map(|_| c.u64()).collect::<Result<_, _>>()?;
        c.end()?;
        Ok(Self { total, regions })
    }
}

/// Encode a message that is one u64.
pub fn encode_u64(value: u64) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}

/// Decode a message that is one u64.
pub fn decode_u64(message: &'static str, bytes: &[u8]) -> Result<u64, MessageError> {
    let mut c = Cursor::new(message, bytes);
    let v = c.u64()?;
    c.end()?;
    Ok(v)
}

/// End of a round: every page batch of round `round` came before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundEnd {
    /// Round number, 0 first.
    pub round: u32,
    /// Page entries the round sent.
    pub pages: u64,
}

impl RoundEnd {
    /// Payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.round.to_le_bytes().to_vec();
        out.extend_from_slice(&self.pages.to_le_bytes());
        out
    }

    /// Parse a payload.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        let mut c = Cursor::new("RoundEnd", bytes);
        let v = Self {
            round: c.u32()?,
            pages: c.u64()?,
        };
        c.end()?;
        Ok(v)
    }
}

/// Most torn pages one [`RoundWritten`] lists; more wait for the next one.
pub const MAX_TORN_PER_REPORT: usize = 1 << 16;

/// A raw page whose bytes did not match the hash the source sent with it
/// (version 7). The source sends raw pages straight from guest memory
/// (no copy), hashed just before: a guest write in between tears the
/// page. Such a write came after the page's dirty bit was cleared for
/// `round`, so it is in a dirty set the source collects later; the source
/// checks that it is and sends the page again (a torn page that was not
/// written again is corruption).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TornPage {
    /// Page index.
    pub page: u64,
    /// The round whose copy of the page arrived torn.
    pub round: u32,
}

/// Destination -> source (a `Progress` frame on lane 0): every lane's
/// `RoundEnd` of `round` arrived and every page before them is written;
/// `torn` lists the pages that arrived torn since the last report
/// (version 7; at most [`MAX_TORN_PER_REPORT`]; a lane that is a round
/// ahead may have torn pages of a later round among them).
///
/// ```text
/// u32 round, u32 count, count times { u64 page, u32 round }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundWritten {
    /// Round number, 0 first.
    pub round: u32,
    /// Pages that arrived torn.
    pub torn: Vec<TornPage>,
}

impl RoundWritten {
    /// Payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let count = u32::try_from(self.torn.len()).expect("bounded by MAX_TORN_PER_REPORT");
        let mut out = Vec::with_capacity(8 + 12 * self.torn.len());
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        for t in &self.torn {
            out.extend_from_slice(&t.page.to_le_bytes());
            out.extend_from_slice(&t.round.to_le_bytes());
        }
        out
    }

    /// Parse a payload.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        let mut c = Cursor::new("RoundWritten", bytes);
        let round = c.u32()?;
        let count = c.u32()? as usize;
        if count > MAX_TORN_PER_REPORT {
            return Err(c.error(format!(
                "{count} torn pages (at most {MAX_TORN_PER_REPORT})"
            )));
        }
        let mut torn = Vec::with_capacity(count.min(bytes.len() / 12));
        for _ in 0..count {
            let page = c.u64()?;
            // A page may come from a later round than `round`: lanes end
            // rounds on their own, and one may be a round ahead.
            let torn_round = c.u32()?;
            torn.push(TornPage {
                page,
                round: torn_round,
            });
        }
        c.end()?;
        Ok(Self { round, torn })
    }
}

/// Destination -> source after Go: when and how it resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    /// When the guest resumed: nanoseconds since the Unix epoch on the
    /// destination's realtime clock.
    pub resumed_at_unix_ns: u64,
    /// Time spent checking the memory digest, ns.
    pub verify_ns: u64,
    /// Time spent restoring the state blob, ns.
    pub restore_ns: u64,
    /// Time from receiving Go to the guest running, ns.
    pub resume_ns: u64,
    /// When every page of the final round was written (realtime clock, ns
    /// since the Unix epoch; version 6).
    pub pages_written_at_unix_ns: u64,
    /// When Ready was sent (realtime clock, ns since the Unix epoch;
    /// version 6).
    pub ready_sent_at_unix_ns: u64,
}

impl Running {
    /// Payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        [
            self.resumed_at_unix_ns,
            self.verify_ns,
            self.restore_ns,
            self.resume_ns,
            self.pages_written_at_unix_ns,
            self.ready_sent_at_unix_ns,
        ]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
    }

    /// Parse a payload.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        let mut c = Cursor::new("Running", bytes);
        let v = Self {
            resumed_at_unix_ns: c.u64()?,
            verify_ns: c.u64()?,
            restore_ns: c.u64()?,
            resume_ns: c.u64()?,
            pages_written_at_unix_ns: c.u64()?,
            ready_sent_at_unix_ns: c.u64()?,
        };
        c.end()?;
        Ok(v)
    }
}

/// Encode an Abort reason (cut to [`MAX_REASON_BYTES`] at a char boundary).
pub fn encode_reason(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.as_bytes()[..end].to_vec()
}

/// Decode an Abort reason (lossy, bounded).
pub fn decode_reason(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_REASON_BYTES)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hello_round_trips() {
        let hello = Hello::new(
            MemoryLayout {
                regions: vec![MemoryRegion {
                    guest_phys_addr: 0,
                    bytes: 1 << 30,
                }],
            },
            SUPPORTED_FEATURES,
            3,
        );
        assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
        let ack = HelloAck {
            stream_version: STREAM_VERSION,
            features: FEATURE_LZ4,
        };
        assert_eq!(HelloAck::decode(&ack.encode()).unwrap(), ack);
    }

    #[test]
    fn a_foreign_hello_version_is_reported_not_parsed() {
        let mut bytes = Hello::new(MemoryLayout { regions: vec![] }, 0, 1).encode();
        bytes[..4].copy_from_slice(&99u32.to_le_bytes());
        bytes.truncate(4);
        assert_eq!(Hello::decode(&bytes).unwrap().stream_version, 99);
    }

    #[test]
    fn too_many_regions_are_refused_before_allocating() {
        let mut bytes = encode_u32(STREAM_VERSION);
        bytes.extend_from_slice(&4096u32.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&7u64.to_le_bytes());
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Hello::decode(&bytes).is_err());
    }

    #[test]
    fn round_end_and_running_round_trip() {
        let r = RoundEnd {
            round: 3,
            pages: 77,
        };
        assert_eq!(RoundEnd::decode(&r.encode()).unwrap(), r);
        let w = RoundWritten {
            round: 9,
            torn: vec![
                TornPage { page: 7, round: 8 },
                TornPage { page: 1, round: 9 },
            ],
        };
        assert_eq!(RoundWritten::decode(&w.encode()).unwrap(), w);
        assert!(RoundWritten::decode(&[1, 0, 0]).is_err());
        assert!(RoundWritten::decode(&[1, 0, 0, 0, 0]).is_err());
        let mut cut = w.encode();
        cut.pop();
        assert!(RoundWritten::decode(&cut).is_err());
        // A lane a round ahead: its torn page is reported with this round.
        let ahead = RoundWritten {
            round: 2,
            torn: vec![TornPage { page: 1, round: 3 }],
        };
        assert_eq!(RoundWritten::decode(&ahead.encode()).unwrap(), ahead);
        let mut huge = 1u32.to_le_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(RoundWritten::decode(&huge).is_err());
        let run = Running {
            resumed_at_unix_ns: 1,
            verify_ns: 2,
            restore_ns: 3,
            resume_ns: 4,
            pages_written_at_unix_ns: 5,
            ready_sent_at_unix_ns: 6,
        };
        assert_eq!(Running::decode(&run.encode()).unwrap(), run);
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = RoundEnd { round: 1, pages: 1 }.encode();
        bytes.push(0);
        assert!(RoundEnd::decode(&bytes).is_err());
        assert!(decode_u64("Digest", &[0; 9]).is_err());
        let d = DigestMessage {
            total: 7,
            regions: vec![3, 4],
        };
        assert_eq!(DigestMessage::decode(&d.encode()).unwrap(), d);
        let bytes = d.encode();
        assert!(DigestMessage::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(DigestMessage::decode(&[bytes.as_slice(), &[0]].concat()).is_err());
        let mut none = 7u64.to_le_bytes().to_vec();
        none.extend_from_slice(&0u32.to_le_bytes());
        assert!(DigestMessage::decode(&none).is_err());
        let mut huge = 7u64.to_le_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(DigestMessage::decode(&huge).is_err());
    }

    #[test]
    fn reasons_are_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_REASON_BYTES);
        let bytes = encode_reason(&long);
        assert!(bytes.len() <= MAX_REASON_BYTES);
        assert!(std::str::from_utf8(&bytes).is_ok());
    }

    proptest! {
        #[test]
        fn hostile_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Hello::decode(&bytes);
            let _ = HelloAck::decode(&bytes);
            let _ = RoundEnd::decode(&bytes);
            let _ = RoundWritten::decode(&bytes);
            let _ = Running::decode(&bytes);
            let _ = decode_u32("x", &bytes);
            let _ = decode_reason(&bytes);
        }
    }
}
