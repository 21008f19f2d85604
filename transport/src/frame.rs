//! The frame: ferry's unit on the wire.
//!
//! Every message is one frame: a fixed 24-byte little-endian header followed by
//! `len` payload bytes. The layout (also in `transport/PROTOCOL.md`):
//!
//! | offset | size | field      | meaning                                                    |
//! |-------:|-----:|------------|------------------------------------------------------------|
//! | 0      | 4    | `magic`    | [`MAGIC`], the bytes `FERY`: "this is a ferry stream"      |
//! | 4      | 2    | `version`  | [`PROTOCOL_VERSION`]; a peer accepts only its own version  |
//! | 6      | 2    | `kind`     | [`FrameKind`]; `0` is reserved as invalid                  |
//! | 8      | 4    | `flags`    | meaning defined per kind by the layer that owns the kind   |
//! | 12     | 4    | `len`      | payload length in bytes, at most [`MAX_PAYLOAD_LEN`]       |
//! | 16     | 8    | `checksum` | xxh3-64 of header bytes `0..16` followed by the payload    |
//!
//! The checksum covers the first 16 header bytes as well as the payload, so a
//! flipped bit in `kind` or `flags` is caught like one in the payload.
//!
//! Decoding validates in a fixed order (magic, version, kind, length, then the
//! checksum once the payload is there) and returns a [`FrameError`] naming the
//! first thing that is wrong. Nothing read from the wire is trusted before it
//! has been checked against a bound.

use std::fmt;
use std::io::IoSlice;

use xxhash_rust::xxh3::Xxh3;

/// The first four bytes of every frame: ASCII `FERY`, read as a little-endian `u32`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FERY");

/// The protocol version this build speaks. Bumped on any change to the header
/// or to the meaning of an existing kind; a peer rejects frames of any other
/// version (see "The version rule" in `PROTOCOL.md`).
pub const PROTOCOL_VERSION: u16 = 1;

/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 24;

/// Flag bit, for any kind: the checksum covers the header prefix and only
/// the payload's last `n` bytes, where `n` is the payload's last four bytes
/// (u32 LE, `4 <= n <= len`). The layer that owns the kind checks the rest
/// itself, from hashes it carries in the covered part. Meant for bulk data
/// that is hashed anyway: a page batch carries each page's hash in a
/// trailer, so its pages are hashed once on each side instead of twice.
pub const FLAG_COVERED_SUFFIX: u32 = 1 << 31;

/// Largest payload one frame may carry: 32 MiB.
///
/// Why this bound: the receiver allocates a buffer of the announced length
/// before it can verify the checksum, so the length field is the one thing a
/// corrupt or hostile peer could use to make it allocate without limit. 32 MiB
/// holds a batch of 4096 raw 4 KiB pages (16 MiB) with room for per-page
/// descriptors, or a digest of 8-byte hashes for a 16 GiB guest's pages in
/// four frames; senders split anything larger.
pub const MAX_PAYLOAD_LEN: u32 = 32 << 20;

/// What a frame carries. The numbering is part of the wire format; `0` is
/// reserved so that zeroed bytes never decode as a meaningful frame.
///
/// Kinds 1..=31 are the migration engine's (payloads defined by `ferry-engine`),
/// 32..=47 belong to the lane layer, 48..=63 to the byte-stream tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    /// Handshake from the source: protocol version, features, memory layout.
    Hello = 1,
    /// Destination accepts the handshake (its features, its view of the layout).
    HelloAck = 2,
    /// A batch of guest pages (engine-defined encoding).
    PageBatch = 3,
    /// End of a pre-copy round (round number, counts).
    RoundEnd = 4,
    /// Saved vCPU and device state, sent after the VM is paused.
    VcpuState = 5,
    /// Memory digest the destination verifies before READY.
    Digest = 6,
    /// Destination verified everything and is ready to resume.
    Ready = 7,
    /// Source commits the handover: the destination may resume.
    Go = 8,
    /// Destination resumed the guest.
    Running = 9,
    /// Either side gives up; payload is a UTF-8 reason.
    Abort = 10,
    /// Progress report (engine-defined).
    Progress = 11,
    /// Source -> destination on a fresh connection after GO: "did you
    /// resume migration N?" (engine-defined; answered with Running or Abort).
    Resolve = 12,
    /// Lane layer: first frame on every lane (session id, lane index, lane count).
    LaneHello = 32,
    /// Lane layer: the listener accepted the whole session.
    LaneWelcome = 33,
    /// Tunnel: the source accepted a local connection (a new stream).
    StreamOpen = 48,
    /// Tunnel: stream bytes with a sequence number.
    StreamData = 49,
    /// Tunnel: one direction of a stream ended (half-close).
    StreamEof = 50,
    /// Tunnel: a stream failed; close it.
    StreamReset = 51,
    /// Tunnel: flow-control credit for a stream.
    StreamCredit = 52,
}

impl FrameKind {
    /// Every defined kind, in wire order.
    pub const ALL: [FrameKind; 19] = [
        FrameKind::Hello,
        FrameKind::HelloAck,
        FrameKind::PageBatch,
        FrameKind::RoundEnd,
        FrameKind::VcpuState,
        FrameKind::Digest,
        FrameKind::Ready,
        FrameKind::Go,
        FrameKind::Running,
        FrameKind::Abort,
        FrameKind::Progress,
        FrameKind::Resolve,
        FrameKind::LaneHello,
        FrameKind::LaneWelcome,
        FrameKind::StreamOpen,
        FrameKind::StreamData,
        FrameKind::StreamEof,
        FrameKind::StreamReset,
        FrameKind::StreamCredit,
    ];

    /// The kind's number on the wire.
    pub fn to_wire(self) -> u16 {
        self as u16
    }

    /// The kind for a wire number, or `None` for `0` and unknown numbers.
    pub fn from_wire(value: u16) -> Option<FrameKind> {
        FrameKind::ALL
            .iter()
            .copied()
            .find(|k| k.to_wire() == value)
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why bytes are not a valid frame. One variant per kind of corruption.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first four bytes are not [`MAGIC`]: the peer does not speak ferry,
    /// or the stream lost its alignment.
    #[error("bad magic {found:#010x} (expected {MAGIC:#010x}): not a ferry stream or out of sync")]
    BadMagic {
        /// The value found.
        found: u32,
    },
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {found}, this side speaks version {PROTOCOL_VERSION}")]
    UnsupportedVersion {
        /// The version found.
        found: u16,
    },
    /// The kind number is `0` or not one this side knows.
    #[error("unknown frame kind {found}")]
    UnknownKind {
        /// The kind number found.
        found: u16,
    },
    /// The announced payload length exceeds [`MAX_PAYLOAD_LEN`].
    #[error("frame payload of {len} bytes exceeds the limit of {MAX_PAYLOAD_LEN} bytes")]
    TooLong {
        /// The announced length.
        len: u32,
    },
    /// The checksum does not match the header and payload received.
    #[error("checksum mismatch on a {kind} frame: header says {expected:#018x}, data hashes to {computed:#018x}")]
    ChecksumMismatch {
        /// Kind of the damaged frame.
        kind: FrameKind,
        /// Checksum in the header.
        expected: u64,
        /// Checksum computed over what arrived.
        computed: u64,
    },
    /// A [`FLAG_COVERED_SUFFIX`] frame whose covered length is not within
    /// its payload (or not even the length field itself).
    #[error("frame claims its checksum covers {covered} of its {len} payload bytes")]
    BadCoverage {
        /// The covered length found.
        covered: u32,
        /// The payload length.
        len: u32,
    },
    /// A frame to seal has parts left in place (not in the sealer's
    /// hands) inside the bytes its checksum must cover.
    #[error("a frame's checksum must cover {covered} bytes, but only its last {own} bytes are in the sealer's hands")]
    GatherCovered {
        /// Bytes the checksum covers.
        covered: u32,
        /// Bytes after the last part left in place.
        own: u32,
    },
    /// A part of a frame to seal left in place lies before the previous
    /// one or outside the frame's own bytes.
    #[error("a part left in place at offset {at} lies out of order or outside its frame's {len} own bytes")]
    GatherOutside {
        /// Where the part was to go.
        at: u64,
        /// The frame's own bytes (header included).
        len: u64,
    },
    /// The bytes end before the frame does.
    #[error("truncated frame: needed {needed} bytes, got {got}")]
    Truncated {
        /// Bytes the frame needs (header, or header + payload).
        needed: usize,
        /// Bytes available.
        got: usize,
    },
}

/// A decoded, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the frame carries.
    pub kind: FrameKind,
    /// Kind-specific flags.
    pub flags: u32,
    /// Payload length in bytes (at most [`MAX_PAYLOAD_LEN`]).
    pub len: u32,
    /// xxh3-64 of header bytes `0..16` and the payload.
    pub checksum: u64,
}

/// A whole frame with an owned payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the frame carries.
    pub kind: FrameKind,
    /// Kind-specific flags.
    pub flags: u32,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame of `kind` with no flags.
    pub fn new(kind: FrameKind, payload: Vec<u8>) -> Frame {
        Frame {
            kind,
            flags: 0,
            payload,
        }
    }
}

/// Header bytes `0..16` (everything but the checksum) for a frame.
fn prefix(kind: FrameKind, flags: u32, len: u32) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    p[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    p[6..8].copy_from_slice(&kind.to_wire().to_le_bytes());
    p[8..12].copy_from_slice(&flags.to_le_bytes());
    p[12..16].copy_from_slice(&len.to_le_bytes());
    p
}

/// How many payload bytes, counted from the end, the checksum covers: all
/// of them, or for a [`FLAG_COVERED_SUFFIX`] frame the count in its last
/// four bytes.
pub fn covered_len(flags: u32, parts: &[IoSlice<'_>]) -> Result<usize, FrameError> {
    let len = payload_len(parts)?;
    if flags & FLAG_COVERED_SUFFIX == 0 {
        return Ok(len as usize);
    }
    let mut field = [0u8; 4];
    let mut need = 4usize;
    for part in parts.iter().rev() {
        let take = need.min(part.len());
        field[need - take..need].copy_from_slice(&part[part.len() - take..]);
        need -= take;
        if need == 0 {
            break;
        }
    }
    let covered = u32::from_le_bytes(field);
    if need > 0 || covered < 4 || covered > len {
        return Err(FrameError::BadCoverage { covered, len });
    }
    Ok(covered as usize)
}

/// Checksum of a frame: xxh3-64 over the header prefix then the covered
/// payload bytes (see [`covered_len`]).
fn checksum(prefix: &[u8; 16], flags: u32, parts: &[IoSlice<'_>]) -> Result<u64, FrameError> {
    let covered = covered_len(flags, parts)?;
    let mut skip = parts.iter().map(|p| p.len()).sum::<usize>() - covered;
    let mut h = Xxh3::new();
    h.update(prefix);
    for part in parts {
        let from = skip.min(part.len());
        h.update(&part[from..]);
        skip -= from;
    }
    Ok(h.digest())
}

/// Total length of vectored payload parts, checked against [`MAX_PAYLOAD_LEN`].
pub(crate) fn payload_len(parts: &[IoSlice<'_>]) -> Result<u32, FrameError> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    match u32::try_from(total) {
        Ok(len) if len <= MAX_PAYLOAD_LEN => Ok(len),
        _ => Err(FrameError::TooLong {
            len: u32::try_from(total).unwrap_or(u32::MAX),
        }),
    }
}

/// Builds the 24-byte header for a payload given as parts (a page batch can be
/// gathered straight from guest memory). Fails if the payload is too long.
pub fn encode_header(
    kind: FrameKind,
    flags: u32,
    parts: &[IoSlice<'_>],
) -> Result<[u8; HEADER_LEN], FrameError> {
    let len = payload_len(parts)?;
    let p = prefix(kind, flags, len);
    let sum = checksum(&p, flags, parts)?;
    let mut header = [0u8; HEADER_LEN];
    header[..16].copy_from_slice(&p);
    header[16..].copy_from_slice(&sum.to_le_bytes());
    Ok(header)
}

/// Builds the header for a payload of `len` bytes of which only the last
/// `tail.len()` bytes are at hand (the rest stays where it is, e.g. guest
/// pages sent in place). The checksum must not need the rest: the frame
/// carries [`FLAG_COVERED_SUFFIX`] with a covered length within `tail`, or
/// `tail` is the whole payload.
pub fn encode_header_for_tail(
    kind: FrameKind,
    flags: u32,
    len: usize,
    tail: &[u8],
) -> Result<[u8; HEADER_LEN], FrameError> {
    let too_long = || FrameError::TooLong {
        len: u32::try_from(len).unwrap_or(u32::MAX),
    };
    let len32 = u32::try_from(len).map_err(|_| too_long())?;
    if len32 > MAX_PAYLOAD_LEN {
        return Err(too_long());
    }
    let own = u32::try_from(tail.len().min(len)).unwrap_or(len32);
    let covered = if flags & FLAG_COVERED_SUFFIX == 0 {
        len32
    } else {
        let field = tail.last_chunk::<4>().map_or(0, |b| u32::from_le_bytes(*b));
        if field < 4 || field > len32 {
            return Err(FrameError::BadCoverage {
                covered: field,
                len: len32,
            });
        }
        field
    };
    if covered > own {
        return Err(FrameError::GatherCovered { covered, own });
    }
    let p = prefix(kind, flags, len32);
    let mut h = Xxh3::new();
    h.update(&p);
    h.update(&tail[tail.len() - covered as usize..]);
    let mut header = [0u8; HEADER_LEN];
    header[..16].copy_from_slice(&p);
    header[16..].copy_from_slice(&h.digest().to_le_bytes());
    Ok(header)
}

/// Appends one whole frame (header + payload) to `out`.
pub fn encode_frame(
    kind: FrameKind,
    flags: u32,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let header = encode_header(kind, flags, &[IoSlice::new(payload)])?;
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    Ok(())
}

impl FrameHeader {
    /// Decodes and validates a header: magic, version, kind and length bound.
    /// The checksum can only be checked with the payload: see [`FrameHeader::verify`].
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<FrameHeader, FrameError> {
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let version = u16_at(4);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion { found: version });
        }
        let kind_raw = u16_at(6);
        let kind =
            FrameKind::from_wire(kind_raw).ok_or(FrameError::UnknownKind { found: kind_raw })?;
        let flags = u32_at(8);
        let len = u32_at(12);
        if len > MAX_PAYLOAD_LEN {
            return Err(FrameError::TooLong { len });
        }
        let mut sum = [0u8; 8];
        sum.copy_from_slice(&bytes[16..24]);
        Ok(FrameHeader {
            kind,
            flags,
            len,
            checksum: u64::from_le_bytes(sum),
        })
    }

    /// Payload length as a `usize`.
    pub fn payload_len(&self) -> usize {
        // u32 -> usize is lossless on every target ferry builds for (64-bit).
        self.len as usize
    }

    /// Checks the checksum against the payload that arrived.
    pub fn verify(&self, payload: &[u8]) -> Result<(), FrameError> {
        if payload.len() != self.payload_len() {
            return Err(FrameError::Truncated {
                needed: HEADER_LEN + self.payload_len(),
                got: HEADER_LEN + payload.len(),
            });
        }
        let p = prefix(self.kind, self.flags, self.len);
        let computed = checksum(&p, self.flags, &[IoSlice::new(payload)])?;
        if computed != self.checksum {
            return Err(FrameError::ChecksumMismatch {
                kind: self.kind,
                expected: self.checksum,
                computed,
            });
        }
        Ok(())
    }
}

/// Decodes one frame from the front of `bytes`. Returns the header, the
/// payload (borrowed) and the number of bytes the frame occupied.
pub fn decode_frame(bytes: &[u8]) -> Result<(FrameHeader, &[u8], usize), FrameError> {
    let Some(head) = bytes.first_chunk::<HEADER_LEN>() else {
        return Err(FrameError::Truncated {
            needed: HEADER_LEN,
            got: bytes.len(),
        });
    };
    let header = FrameHeader::decode(head)?;
    let total = HEADER_LEN + header.payload_len();
    let Some(payload) = bytes.get(HEADER_LEN..total) else {
        return Err(FrameError::Truncated {
            needed: total,
            got: bytes.len(),
        });
    };
    header.verify(payload)?;
    Ok((header, payload, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_bytes(kind: FrameKind, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(kind, flags, payload, &mut out).unwrap();
        out
    }

    /// Rewrites the checksum so that only the field under test is wrong.
    fn reseal(bytes: &mut [u8]) {
        let mut p = [0u8; 16];
        p.copy_from_slice(&bytes[..16]);
        let sum = checksum(&p, 0, &[IoSlice::new(&bytes[HEADER_LEN..])]).unwrap();
        bytes[16..24].copy_from_slice(&sum.to_le_bytes());
    }

    #[test]
    fn every_kind_round_trips() {
        for (i, kind) in FrameKind::ALL.into_iter().enumerate() {
            let payload: Vec<u8> = (0..i * 37).map(|b| (b % 251) as u8).collect();
            let flags = u32::try_from(i).unwrap() * 0x0101;
            let bytes = frame_bytes(kind, flags, &payload);
            let (h, p, used) = decode_frame(&bytes).unwrap();
            assert_eq!(
                (h.kind, h.flags, p, used),
                (kind, flags, &payload[..], bytes.len())
            );
        }
    }

    #[test]
    fn header_layout_is_little_endian_at_documented_offsets() {
        let bytes = frame_bytes(FrameKind::PageBatch, 0x21B2_C3D4, b"abc");
        assert_eq!(&bytes[0..4], b"FERY");
        assert_eq!(&bytes[4..6], &PROTOCOL_VERSION.to_le_bytes());
        assert_eq!(&bytes[6..8], &[3, 0]);
        assert_eq!(&bytes[8..12], &[0xD4, 0xC3, 0xB2, 0x21]);
        assert_eq!(&bytes[12..16], &[3, 0, 0, 0]);
        assert_eq!(bytes.len(), HEADER_LEN + 3);
    }

    #[test]
    fn vectored_header_equals_contiguous_header() {
        let whole = frame_bytes(FrameKind::PageBatch, 7, b"hello, world");
        let parts = [
            IoSlice::new(b"hello"),
            IoSlice::new(b", "),
            IoSlice::new(b"world"),
        ];
        let header = encode_header(FrameKind::PageBatch, 7, &parts).unwrap();
        assert_eq!(&whole[..HEADER_LEN], &header[..]);
    }

    #[test]
    fn zero_kind_is_invalid() {
        assert_eq!(FrameKind::from_wire(0), None);
    }

    #[test]
    fn bad_magic_is_rejected() {
        let mut bytes = frame_bytes(FrameKind::Hello, 0, b"x");
        bytes[0] = b'G';
        reseal(&mut bytes);
        assert!(matches!(
            decode_frame(&bytes),
            Err(FrameError::BadMagic { .. })
        ));
    }

    #[test]
    fn wrong_version_is_rejected() {
        let mut bytes = frame_bytes(FrameKind::Hello, 0, b"x");
        bytes[4..6].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        reseal(&mut bytes);
        assert_eq!(
            decode_frame(&bytes).unwrap_err(),
            FrameError::UnsupportedVersion {
                found: PROTOCOL_VERSION + 1
            }
        );
    }

    #[test]
    fn unknown_kind_is_rejected() {
        for raw in [0u16, 999, u16::MAX] {
            let mut bytes = frame_bytes(FrameKind::Hello, 0, b"x");
            bytes[6..8].copy_from_slice(&raw.to_le_bytes());
            reseal(&mut bytes);
            assert_eq!(
                decode_frame(&bytes).unwrap_err(),
                FrameError::UnknownKind { found: raw }
            );
        }
    }

    #[test]
    fn oversized_length_is_rejected_before_the_payload_is_needed() {
        let mut bytes = frame_bytes(FrameKind::PageBatch, 0, b"");
        bytes[12..16].copy_from_slice(&(MAX_PAYLOAD_LEN + 1).to_le_bytes());
        assert_eq!(
            decode_frame(&bytes).unwrap_err(),
            FrameError::TooLong {
                len: MAX_PAYLOAD_LEN + 1
            }
        );
    }

    #[test]
    fn oversized_payload_is_refused_on_encode() {
        let big = vec![0u8; MAX_PAYLOAD_LEN as usize + 1];
        let err = encode_frame(FrameKind::PageBatch, 0, &big, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, FrameError::TooLong { .. }));
    }

    #[test]
    fn checksum_mismatch_in_payload_is_rejected() {
        let mut bytes = frame_bytes(FrameKind::PageBatch, 0, &[7u8; 4096]);
        bytes[HEADER_LEN + 100] ^= 1;
        assert!(matches!(
            decode_frame(&bytes),
            Err(FrameError::ChecksumMismatch {
                kind: FrameKind::PageBatch,
                ..
            })
        ));
    }

    #[test]
    fn checksum_covers_flags() {
        let mut bytes = frame_bytes(FrameKind::PageBatch, 0, b"payload");
        bytes[8] ^= 0x80;
        assert!(matches!(
            decode_frame(&bytes),
            Err(FrameError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn truncated_header_and_payload_are_rejected() {
        let bytes = frame_bytes(FrameKind::Digest, 0, &[1u8; 64]);
        assert_eq!(
            decode_frame(&bytes[..10]).unwrap_err(),
            FrameError::Truncated {
                needed: HEADER_LEN,
                got: 10
            }
        );
        assert_eq!(
            decode_frame(&bytes[..HEADER_LEN + 63]).unwrap_err(),
            FrameError::Truncated {
                needed: HEADER_LEN + 64,
                got: HEADER_LEN + 63
            }
        );
    }

    #[test]
    fn a_covered_suffix_frame_checks_only_its_covered_bytes() {
        // 5 bytes left to the owner, then 12 covered bytes (the length
        // field included).
        let mut payload = b"tail!covered".to_vec();
        payload.extend_from_slice(&12u32.to_le_bytes());
        let bytes = frame_bytes(FrameKind::PageBatch, FLAG_COVERED_SUFFIX, &payload);
        assert!(decode_frame(&bytes).is_ok());
        // The same checksum whatever the split into parts.
        for at in [1, 5, 14, 15] {
            let parts = [IoSlice::new(&payload[..at]), IoSlice::new(&payload[at..])];
            let split = encode_header(FrameKind::PageBatch, FLAG_COVERED_SUFFIX, &parts).unwrap();
            assert_eq!(&split[..], &bytes[..HEADER_LEN], "split at {at}");
        }
        let mut tail = bytes.clone();
        tail[HEADER_LEN + 2] ^= 1;
        assert!(
            decode_frame(&tail).is_ok(),
            "the uncovered part is the owner's to check"
        );
        let mut covered = bytes.clone();
        covered[HEADER_LEN + 8] ^= 1;
        assert!(matches!(
            decode_frame(&covered),
            Err(FrameError::ChecksumMismatch { .. })
        ));
        // Clearing the flag changes what the checksum must cover: caught.
        let mut unflagged = bytes;
        unflagged[11] &= 0x7f;
        assert!(decode_frame(&unflagged).is_err());
    }

    #[test]
    fn a_covered_length_outside_the_payload_is_refused() {
        for covered in [0u32, 3, 9] {
            let mut payload = vec![1, 2, 3, 4];
            payload.extend_from_slice(&covered.to_le_bytes());
            let mut out = Vec::new();
            assert_eq!(
                encode_frame(
                    FrameKind::PageBatch,
                    FLAG_COVERED_SUFFIX,
                    &payload,
                    &mut out
                ),
                Err(FrameError::BadCoverage { covered, len: 8 })
            );
        }
        let mut out = Vec::new();
        assert!(matches!(
            encode_frame(FrameKind::PageBatch, FLAG_COVERED_SUFFIX, &[1, 0], &mut out),
            Err(FrameError::BadCoverage { .. })
        ));
    }
}
