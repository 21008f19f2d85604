//! Run-length coding of the XOR between two versions of a page
//! (XBZRLE-like).
//!
//! Stream: a sequence of `(skip, len, bytes)` where `skip` and `len` are
//! LEB128 varints (at most [`MAX_VARINT_BYTES`] bytes each): skip `skip`
//! bytes that did not change, then XOR the next `len` bytes of the page with
//! the `len` bytes that follow. Runs never pass the end of the page; `len`
//! is at least 1. Zero gaps shorter than `MIN_GAP` (4) are folded into the
//! surrounding run, since a new run header would cost more than the gap.

use super::{DecodeError, PAGE_SIZE};

/// A varint longer than this cannot describe an offset within a page.
pub const MAX_VARINT_BYTES: usize = 2;

/// Zero gaps shorter than this stay inside a run.
const MIN_GAP: usize = 4;

/// Append the run-length coded `old XOR new` to `out`. Stops and returns
/// `false` as soon as `out` would grow past `limit` bytes (the delta does not
/// pay); `out` then holds a partial stream that must be discarded.
pub fn encode(
    old: &[u8; PAGE_SIZE],
    new: &[u8; PAGE_SIZE],
    limit: usize,
    out: &mut Vec<u8>,
) -> bool {
    let start = out.len();
    let mut pos = 0;
    while pos < PAGE_SIZE {
        // Skip unchanged bytes, a word at a time where possible.
        let run_start = match first_difference(old, new, pos) {
            Some(at) => at,
            None => break,
        };
        // Extend the run until a gap of >= MIN_GAP unchanged bytes.
        let mut last_diff = run_start;
        let mut at = run_start + 1;
        while at < PAGE_SIZE && at - last_diff <= MIN_GAP {
            if old[at] != new[at] {
                last_diff = at;
            }
            at += 1;
        }
        let run_end = last_diff + 1;
        let skip = run_start - pos;
        let len = run_end - run_start;
        if out.len() - start + 2 * MAX_VARINT_BYTES + len > limit {
            return false;
        }
        put_varint(out, skip);
        put_varint(out, len);
        out.extend(
            old[run_start..run_end]
                .iter()
                .zip(&new[run_start..run_end])
                .map(|(a, b)| a ^ b),
        );
        pos = run_end;
    }
    true
}

fn first_difference(old: &[u8; PAGE_SIZE], new: &[u8; PAGE_SIZE], from: usize) -> Option<usize> {
    let mut pos = from;
    while !pos.is_multiple_of(8) && pos < PAGE_SIZE {
        if old[pos] != new[pos] {
            return Some(pos);
        }
        pos += 1;
    }
    while pos < PAGE_SIZE {
        let a = u64::from_ne_bytes(old[pos..pos + 8].try_into().expect("8 bytes"));
        let b = u64::from_ne_bytes(new[pos..pos + 8].try_into().expect("8 bytes"));
        if a != b {
            return (pos..pos + 8).find(|&i| old[i] != new[i]);
        }
        pos += 8;
    }
    None
}

fn put_varint(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn get_varint(stream: &[u8], at: &mut usize) -> Result<usize, DecodeError> {
    let mut value = 0usize;
    for i in 0..MAX_VARINT_BYTES {
        let byte = *stream.get(*at).ok_or(DecodeError::XorRle { at: *at })?;
        *at += 1;
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DecodeError::XorRle { at: *at })
}

/// Apply a run-length coded XOR stream to `page` in place.
pub fn apply(stream: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), DecodeError> {
    let mut at = 0;
    let mut pos = 0usize;
    while at < stream.len() {
        let header_at = at;
        let skip = get_varint(stream, &mut at)?;
        let len = get_varint(stream, &mut at)?;
        let run_start = pos
            .checked_add(skip)
            .filter(|&s| s <= PAGE_SIZE)
            .ok_or(DecodeError::XorRle { at: header_at })?;
        let run_end = run_start
            .checked_add(len)
            .filter(|&e| len > 0 && e <= PAGE_SIZE)
            .ok_or(DecodeError::XorRle { at: header_at })?;
        let bytes = stream.get(at..at + len).ok_or(DecodeError::XorRle { at })?;
        for (dst, x) in page[run_start..run_end].iter_mut().zip(bytes) {
            *dst ^= x;
        }
        at += len;
        pos = run_end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_of(byte: u8) -> Box<[u8; PAGE_SIZE]> {
        Box::new([byte; PAGE_SIZE])
    }

    #[test]
    fn identical_pages_give_an_empty_stream() {
        let p = page_of(7);
        let mut out = Vec::new();
        assert!(encode(&p, &p, PAGE_SIZE, &mut out));
        assert!(out.is_empty());
    }

    #[test]
    fn one_changed_word_costs_its_bytes_plus_two_varints() {
        let old = page_of(1);
        let mut new = old.clone();
        new[4000..4008].copy_from_slice(&0xdead_beef_u64.to_le_bytes());
        let mut out = Vec::new();
        assert!(encode(&old, &new, PAGE_SIZE, &mut out));
        assert!(out.len() <= 8 + 2 * MAX_VARINT_BYTES, "{} bytes", out.len());
        let mut rebuilt = old.clone();
        apply(&out, &mut rebuilt).unwrap();
        assert_eq!(rebuilt, new);
    }

    #[test]
    fn a_delta_over_the_limit_is_refused() {
        let old = page_of(0);
        let new = page_of(0xff);
        let mut out = Vec::new();
        assert!(!encode(&old, &new, 1024, &mut out));
    }

    #[test]
    fn runs_past_the_page_end_are_rejected() {
        let mut page = page_of(0);
        // skip 4095, len 2: one byte past the end.
        let stream = [0xff, 0x1f, 2, 1, 1];
        assert!(matches!(
            apply(&stream, &mut page),
            Err(DecodeError::XorRle { .. })
        ));
    }

    #[test]
    fn zero_length_runs_are_rejected() {
        let mut page = page_of(0);
        assert!(apply(&[0, 0], &mut page).is_err());
    }

    #[test]
    fn over_long_varints_are_rejected() {
        let mut page = page_of(0);
        assert!(apply(&[0x80, 0x80, 0x01, 1, 9], &mut page).is_err());
    }

    #[test]
    fn truncated_run_bytes_are_rejected() {
        let mut page = page_of(0);
        assert!(apply(&[0, 4, 1, 2], &mut page).is_err());
    }
}
