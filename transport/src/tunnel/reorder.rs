//! Putting a stream striped over lanes back in order.
//!
//! Chunks of one stream carry sequence numbers 0, 1, 2, ...; lanes deliver
//! them in any interleaving. [`Reassembly`] releases chunks strictly in order,
//! holds early ones, and rejects anything a well-behaved peer cannot send:
//! a repeated or stale sequence number, a chunk too far ahead, more buffered
//! bytes than the flow-control window allows, data after the end.

use std::collections::BTreeMap;

use bytes::Bytes;

/// Most chunks held out of order per stream. Why: every held chunk costs
/// memory beyond its bytes; a peer that only ever sends "later" chunks must
/// not make the receiver keep an unbounded map.
pub const MAX_HELD_CHUNKS: usize = 4096;

/// What is wrong with a chunk or end marker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReorderError {
    /// The sequence number was already delivered or is held.
    #[error("chunk {seq} repeated (next expected {next})")]
    Duplicate {
        /// Its sequence number.
        seq: u64,
        /// The next one expected.
        next: u64,
    },
    /// The chunk is further ahead than [`MAX_HELD_CHUNKS`].
    #[error("chunk {seq} is too far ahead of {next}")]
    TooFarAhead {
        /// Its sequence number.
        seq: u64,
        /// The next one expected.
        next: u64,
    },
    /// Held bytes would exceed the flow-control window.
    #[error("{held} bytes held out of order exceed the window of {window}")]
    WindowExceeded {
        /// Bytes that would be held.
        held: usize,
        /// The window.
        window: usize,
    },
    /// Data at or after the announced end.
    #[error("chunk {seq} after the stream ended at {end}")]
    AfterEnd {
        /// Its sequence number.
        seq: u64,
        /// Where the stream ended.
        end: u64,
    },
    /// A second end marker that disagrees, or one before delivered data.
    #[error("stream end at {end} contradicts {seen}")]
    BadEnd {
        /// The end announced.
        end: u64,
        /// What was seen before (earlier end or chunks delivered).
        seen: u64,
    },
}

/// In-order reassembly of one direction of one stream.
#[derive(Debug, Clone)]
pub struct Reassembly {
    next: u64,
    held: BTreeMap<u64, Bytes>,
    held_bytes: usize,
    window: usize,
    end: Option<u64>,
}

impl Reassembly {
    /// A stream whose peer may have at most `window` bytes in flight.
    pub fn new(window: usize) -> Reassembly {
        Reassembly {
            next: 0,
            held: BTreeMap::new(),
            held_bytes: 0,
            window,
            end: None,
        }
    }

    /// Takes chunk `seq`; appends to `out` every chunk now deliverable, in order.
    pub fn push(
        &mut self,
        seq: u64,
        bytes: Bytes,
        out: &mut Vec<Bytes>,
    ) -> Result<(), ReorderError> {
        if let Some(end) = self.end {
            if seq >= end {
                return Err(ReorderError::AfterEnd { seq, end });
            }
        }
        if seq < self.next || self.held.contains_key(&seq) {
            return Err(ReorderError::Duplicate {
                seq,
                next: self.next,
            });
        }
        if seq - self.next > MAX_HELD_CHUNKS as u64 {
            return Err(ReorderError::TooFarAhead {
                seq,
                next: self.next,
            });
        }
        if seq == self.next {
            out.push(bytes);
            self.next += 1;
            while let Some(b) = self.held.remove(&self.next) {
                self.held_bytes -= b.len();
                out.push(b);
                self.next += 1;
            }
            return Ok(());
        }
        let held = self.held_bytes + bytes.len();
        if held > self.window {
            return Err(ReorderError::WindowExceeded {
                held,
                window: self.window,
            });
        }
        self.held_bytes = held;
        self.held.insert(seq, bytes);
        Ok(())
    }

    /// The sender ended the stream after `end` chunks.
    pub fn end(&mut self, end: u64) -> Result<(), ReorderError> {
        match self.end {
            Some(seen) if seen != end => return Err(ReorderError::BadEnd { end, seen }),
            _ => {}
        }
        let highest = self.held.keys().next_back().map_or(self.next, |&s| s + 1);
        if end < highest {
            return Err(ReorderError::BadEnd { end, seen: highest });
        }
        self.end = Some(end);
        Ok(())
    }

    /// Whether every chunk up to the end has been delivered.
    pub fn is_complete(&self) -> bool {
        self.end == Some(self.next)
    }

    /// Chunks delivered so far.
    pub fn delivered(&self) -> u64 {
        self.next
    }

    /// Bytes held out of order.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: u8) -> Bytes {
        Bytes::from(vec![n; usize::from(n)])
    }

    #[test]
    fn any_arrival_order_is_delivered_in_sequence() {
        let orders: [&[u64]; 4] = [
            &[0, 1, 2, 3, 4],
            &[4, 3, 2, 1, 0],
            &[1, 0, 3, 2, 4],
            &[2, 4, 0, 3, 1],
        ];
        for order in orders {
            let mut r = Reassembly::new(1 << 20);
            let mut out = Vec::new();
            for &s in order {
                r.push(s, b(u8::try_from(s).unwrap() + 1), &mut out)
                    .unwrap();
            }
            r.end(5).unwrap();
            assert!(r.is_complete());
            let got: Vec<usize> = out.iter().map(Bytes::len).collect();
            assert_eq!(got, vec![1, 2, 3, 4, 5], "order {order:?}");
            assert_eq!(r.held_bytes(), 0);
        }
    }

    #[test]
    fn duplicates_and_stale_chunks_are_errors() {
        let mut r = Reassembly::new(1 << 20);
        let mut out = Vec::new();
        r.push(0, b(1), &mut out).unwrap();
        r.push(2, b(1), &mut out).unwrap();
        assert_eq!(
            r.push(0, b(1), &mut out),
            Err(ReorderError::Duplicate { seq: 0, next: 1 })
        );
        assert_eq!(
            r.push(2, b(1), &mut out),
            Err(ReorderError::Duplicate { seq: 2, next: 1 })
        );
    }

    #[test]
    fn far_ahead_and_over_window_are_errors() {
        let mut r = Reassembly::new(10);
        let mut out = Vec::new();
        assert!(matches!(
            r.push(MAX_HELD_CHUNKS as u64 + 1, b(1), &mut out),
            Err(ReorderError::TooFarAhead { .. })
        ));
        r.push(1, b(6), &mut out).unwrap();
        assert!(matches!(
            r.push(2, b(6), &mut out),
            Err(ReorderError::WindowExceeded {
                held: 12,
                window: 10
            })
        ));
    }

    #[test]
    fn end_markers_are_checked() {
        let mut r = Reassembly::new(100);
        let mut out = Vec::new();
        r.push(0, b(1), &mut out).unwrap();
        r.push(3, b(1), &mut out).unwrap();
        assert!(matches!(r.end(2), Err(ReorderError::BadEnd { .. })));
        r.end(4).unwrap();
        assert!(!r.is_complete());
        assert!(matches!(r.end(5), Err(ReorderError::BadEnd { .. })));
        assert!(matches!(
            r.push(4, b(1), &mut out),
            Err(ReorderError::AfterEnd { .. })
        ));
        r.push(1, b(1), &mut out).unwrap();
        r.push(2, b(1), &mut out).unwrap();
        assert!(r.is_complete());
        assert_eq!(out.len(), 4);
    }
}
