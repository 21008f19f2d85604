//! The tunnel's frames (kinds 48..=52) and their payloads.
//!
//! | kind | payload (little-endian) |
//! |---|---|
//! | `StreamOpen` (48)   | `id: u32` |
//! | `StreamData` (49)   | `id: u32, seq: u64, bytes` (flag bit 0: `bytes` is LZ4: `raw_len: u32` + LZ4 block) |
//! | `StreamEof` (50)    | `id: u32, seq: u64` = number of data frames before the end |
//! | `StreamReset` (51)  | `id: u32, reason: UTF-8` |
//! | `StreamCredit` (52) | `id: u32, bytes: u64` more bytes the peer may send on that stream |

use bytes::{Buf, Bytes};

use crate::frame::FrameKind;
use crate::lanes::queue::OutFrame;

/// Largest number of stream bytes in one data frame: what one read of a
/// local socket yields. Also bounds what a decompressed chunk may claim.
pub const MAX_CHUNK: usize = 256 << 10;

/// Data flag: the bytes are an LZ4 block preceded by their raw length.
pub const FLAG_LZ4: u32 = 1;

/// Longest reset reason kept (longer ones are cut).
pub const MAX_REASON: usize = 1024;

/// One tunnel message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelMsg {
    /// The source accepted a new local connection: stream `id`.
    Open {
        /// Stream id (0, 1, 2, ... in accept order).
        id: u32,
    },
    /// Stream bytes, in order `seq` (0, 1, 2, ... per stream and direction).
    Data {
        /// Stream id.
        id: u32,
        /// Position of this chunk in the stream.
        seq: u64,
        /// The raw (decompressed) bytes.
        bytes: Bytes,
    },
    /// The sender's side of the stream ended after `seq` data frames.
    Eof {
        /// Stream id.
        id: u32,
        /// Data frames sent before the end.
        seq: u64,
    },
    /// The stream failed on the sender's side; close it.
    Reset {
        /// Stream id.
        id: u32,
        /// Why.
        reason: String,
    },
    /// The receiver wrote `bytes` more of the stream out: the sender may send that much more.
    Credit {
        /// Stream id.
        id: u32,
        /// Bytes granted.
        bytes: u64,
    },
}

/// Why a tunnel frame is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TunnelWireError {
    /// The payload is shorter than its fixed fields.
    #[error("{kind} payload of {got} bytes is shorter than its {need}-byte header")]
    Short {
        /// Frame kind.
        kind: FrameKind,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// Fixed-size payload with extra bytes.
    #[error("{kind} payload of {got} bytes, expected {need}")]
    Long {
        /// Frame kind.
        kind: FrameKind,
        /// Bytes expected.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// A data chunk (raw or claimed decompressed) is larger than [`MAX_CHUNK`].
    #[error("data chunk of {len} bytes exceeds {MAX_CHUNK}")]
    ChunkTooLarge {
        /// The size.
        len: usize,
    },
    /// The LZ4 block does not decompress to its announced size.
    #[error("LZ4 block does not decompress to its announced {raw_len} bytes")]
    BadLz4 {
        /// The announced size.
        raw_len: usize,
    },
    /// Unknown flag bits.
    #[error("unknown flags {flags:#x} on a {kind} frame")]
    UnknownFlags {
        /// Frame kind.
        kind: FrameKind,
        /// The flags.
        flags: u32,
    },
    /// A frame kind that is not the tunnel's.
    #[error("{0} frame inside a tunnel session")]
    NotTunnel(FrameKind),
}

fn need(kind: FrameKind, p: &Bytes, n: usize) -> Result<(), TunnelWireError> {
    if p.len() < n {
        return Err(TunnelWireError::Short {
            kind,
            need: n,
            got: p.len(),
        });
    }
    Ok(())
}

fn exact(kind: FrameKind, p: &Bytes, n: usize) -> Result<(), TunnelWireError> {
    need(kind, p, n)?;
    if p.len() != n {
        return Err(TunnelWireError::Long {
            kind,
            need: n,
            got: p.len(),
        });
    }
    Ok(())
}

impl TunnelMsg {
    /// Decodes a tunnel frame. Never panics on hostile bytes.
    pub fn decode(
        kind: FrameKind,
        flags: u32,
        payload: Bytes,
    ) -> Result<TunnelMsg, TunnelWireError> {
        let mut p = payload;
        if kind != FrameKind::StreamData && flags != 0 {
            return Err(TunnelWireError::UnknownFlags { kind, flags });
        }
        match kind {
            FrameKind::StreamOpen => {
                exact(kind, &p, 4)?;
                Ok(TunnelMsg::Open { id: p.get_u32_le() })
            }
            FrameKind::StreamData => {
                if flags & !FLAG_LZ4 != 0 {
                    return Err(TunnelWireError::UnknownFlags { kind, flags });
                }
                need(kind, &p, 12)?;
                let id = p.get_u32_le();
                let seq = p.get_u64_le();
                let bytes = if flags & FLAG_LZ4 != 0 {
                    need(kind, &p, 4)?;
                    let raw_len = usize::try_from(p.get_u32_le()).unwrap_or(usize::MAX);
                    if raw_len > MAX_CHUNK {
                        return Err(TunnelWireError::ChunkTooLarge { len: raw_len });
                    }
                    let mut out = vec![0u8; raw_len];
                    match lz4_flex::block::decompress_into(&p, &mut out) {
                        Ok(n) if n == raw_len => Bytes::from(out),
                        _ => return Err(TunnelWireError::BadLz4 { raw_len }),
                    }
                } else {
                    if p.len() > MAX_CHUNK {
                        return Err(TunnelWireError::ChunkTooLarge { len: p.len() });
                    }
                    p
                };
                Ok(TunnelMsg::Data { id, seq, bytes })
            }
            FrameKind::StreamEof => {
                exact(kind, &p, 12)?;
                Ok(TunnelMsg::Eof {
                    id: p.get_u32_le(),
                    seq: p.get_u64_le(),
                })
            }
            FrameKind::StreamReset => {
                need(kind, &p, 4)?;
                let id = p.get_u32_le();
                let cut = p.len().min(MAX_REASON);
                Ok(TunnelMsg::Reset {
                    id,
                    reason: String::from_utf8_lossy(&p[..cut]).into_owned(),
                })
            }
            FrameKind::StreamCredit => {
                exact(kind, &p, 12)?;
                Ok(TunnelMsg::Credit {
                    id: p.get_u32_le(),
                    bytes: p.get_u64_le(),
                })
            }
            other => Err(TunnelWireError::NotTunnel(other)),
        }
    }

    /// Encodes into a queued frame. Data is LZ4-compressed when `lz4` is set
    /// and compression shrinks it; otherwise the bytes are sent as they are
    /// (no copy).
    pub fn encode(&self, lz4: bool) -> OutFrame {
        let head = |id: u32, tail: &[u8]| {
            let mut v = Vec::with_capacity(4 + tail.len());
            v.extend_from_slice(&id.to_le_bytes());
            v.extend_from_slice(tail);
            Bytes::from(v)
        };
        match self {
            TunnelMsg::Open { id } => OutFrame::new(FrameKind::StreamOpen, 0, head(*id, &[])),
            TunnelMsg::Data { id, seq, bytes } => {
                let h = head(*id, &seq.to_le_bytes());
                if lz4 && !bytes.is_empty() {
                    let c = lz4_flex::block::compress(bytes);
                    if c.len() + 4 < bytes.len() {
                        let raw_len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                        let mut v = Vec::with_capacity(16 + c.len());
                        v.extend_from_slice(&h);
                        v.extend_from_slice(&raw_len.to_le_bytes());
                        v.extend_from_slice(&c);
                        return OutFrame::new(FrameKind::StreamData, FLAG_LZ4, v);
                    }
                }
                OutFrame {
                    kind: FrameKind::StreamData,
                    flags: 0,
                    parts: vec![h, bytes.clone()],
                }
            }
            TunnelMsg::Eof { id, seq } => {
                OutFrame::new(FrameKind::StreamEof, 0, head(*id, &seq.to_le_bytes()))
            }
            TunnelMsg::Reset { id, reason } => {
                let cut = reason.len().min(MAX_REASON);
                let cut = (0..=cut)
                    .rev()
                    .find(|&i| reason.is_char_boundary(i))
                    .unwrap_or(0);
                OutFrame::new(
                    FrameKind::StreamReset,
                    0,
                    head(*id, &reason.as_bytes()[..cut]),
                )
            }
            TunnelMsg::Credit { id, bytes } => {
                OutFrame::new(FrameKind::StreamCredit, 0, head(*id, &bytes.to_le_bytes()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: &TunnelMsg, lz4: bool) -> TunnelMsg {
        let f = m.encode(lz4);
        let payload: Vec<u8> = f.parts.iter().flat_map(|p| p.iter().copied()).collect();
        TunnelMsg::decode(f.kind, f.flags, Bytes::from(payload)).unwrap()
    }

    #[test]
    fn every_message_round_trips_with_and_without_lz4() {
        let compressible = Bytes::from(vec![7u8; 100_000]);
        let noise: Bytes = (0..5000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let msgs = [
            TunnelMsg::Open { id: 3 },
            TunnelMsg::Data {
                id: 1,
                seq: 9,
                bytes: compressible,
            },
            TunnelMsg::Data {
                id: 1,
                seq: 10,
                bytes: noise,
            },
            TunnelMsg::Data {
                id: 2,
                seq: 0,
                bytes: Bytes::new(),
            },
            TunnelMsg::Eof { id: 1, seq: 11 },
            TunnelMsg::Reset {
                id: 4,
                reason: "connection refused".into(),
            },
            TunnelMsg::Credit {
                id: 0,
                bytes: 1 << 40,
            },
        ];
        for m in &msgs {
            assert_eq!(&round_trip(m, false), m);
            assert_eq!(&round_trip(m, true), m);
        }
    }

    #[test]
    fn lz4_is_used_only_when_it_shrinks() {
        let m = TunnelMsg::Data {
            id: 0,
            seq: 0,
            bytes: Bytes::from(vec![0u8; 4096]),
        };
        assert_eq!(m.encode(true).flags, FLAG_LZ4);
        assert_eq!(m.encode(false).flags, 0);
    }

    #[test]
    fn hostile_payloads_are_errors() {
        let k = FrameKind::StreamData;
        assert!(matches!(
            TunnelMsg::decode(k, 0, Bytes::from_static(&[1, 2, 3])),
            Err(TunnelWireError::Short { .. })
        ));
        let mut lz = vec![0u8; 12];
        lz.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            TunnelMsg::decode(k, FLAG_LZ4, Bytes::from(lz.clone())),
            Err(TunnelWireError::ChunkTooLarge { .. })
        ));
        lz[12..16].copy_from_slice(&100u32.to_le_bytes());
        lz.extend_from_slice(&[0xFF; 8]);
        assert!(matches!(
            TunnelMsg::decode(k, FLAG_LZ4, Bytes::from(lz)),
            Err(TunnelWireError::BadLz4 { raw_len: 100 })
        ));
        assert!(matches!(
            TunnelMsg::decode(k, 2, Bytes::from(vec![0u8; 12])),
            Err(TunnelWireError::UnknownFlags { .. })
        ));
        assert!(matches!(
            TunnelMsg::decode(FrameKind::StreamEof, 0, Bytes::from(vec![0u8; 13])),
            Err(TunnelWireError::Long { .. })
        ));
        assert!(matches!(
            TunnelMsg::decode(FrameKind::Go, 0, Bytes::new()),
            Err(TunnelWireError::NotTunnel(_))
        ));
        let big = Bytes::from(vec![0u8; 12 + MAX_CHUNK + 1]);
        assert!(matches!(
            TunnelMsg::decode(k, 0, big),
            Err(TunnelWireError::ChunkTooLarge { .. })
        ));
    }
}
