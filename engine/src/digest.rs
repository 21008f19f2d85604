//! Per-page hashes and the memory digest built from them.
//!
//! The digest is a sum, kept up to date as pages are recorded: the wrapping
//! sum over pages of `xxh3_64(hash, seed = page index)`, where a page never
//! recorded (hash 0) adds nothing. Reading it is O(1), so neither side
//! spends downtime hashing the hash table at the handover; a page missing,
//! misplaced or stale on one side changes it except with probability about
//! 2^-64 (the terms are independent 64-bit hashes).

use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The xxh3-64 of each page as last sent (source) or last written
/// (destination), indexed by page, and the digest over them. `0` means
/// "never": a page's hash of 0 (one chance in 2^64) only costs it being
/// sent again.
#[derive(Debug)]
pub struct PageHashes {
    hashes: Vec<AtomicU64>,
    sum: AtomicU64,
}

/// A page's term in the digest.
fn term(page: u64, hash: u64) -> u64 {
    if hash == 0 {
        0
    } else {
        xxh3_64_with_seed(&hash.to_le_bytes(), page)
    }
}

impl PageHashes {
    /// Hashes for a page index space of `pages`, all "never".
    pub fn new(pages: u64) -> Self {
        let n = usize::try_from(pages).expect("page count fits in memory");
        Self {
            hashes: (0..n).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// The hash recorded for `page`.
    pub fn get(&self, page: u64) -> u64 {
        usize::try_from(page)
            .ok()
            .and_then(|i| self.hashes.get(i))
            .map_or(0, |h| h.load(Ordering::Relaxed))
    }

    /// Record `hash` for `page` and update the digest.
    pub fn set(&self, page: u64, hash: u64) {
        let mut delta = 0;
        self.set_deferred(page, hash, &mut delta);
        self.add_to_digest(delta);
    }

    /// Record `hash` for `page`, adding the digest's change to `delta`
    /// (for [`PageHashes::add_to_digest`] once per batch: one shared atomic
    /// update per batch instead of one per page). Each page is handled by
    /// one thread at a time (a round's pages are distinct; rounds are
    /// separated by a barrier), so relaxed ordering suffices, and so does a
    /// load and a store instead of a swap: a swap is a locked instruction,
    /// which waits for every store before it to drain, the destination's
    /// streaming stores of the page just written included (profiled, that
    /// wait was most of a decoder's time outside the copy and the hash).
    pub fn set_deferred(&self, page: u64, hash: u64, delta: &mut u64) {
        if let Some(h) = usize::try_from(page).ok().and_then(|i| self.hashes.get(i)) {
            let old = h.load(Ordering::Relaxed);
            h.store(hash, Ordering::Relaxed);
            if old != hash {
                *delta = delta
                    .wrapping_add(term(page, hash))
                    .wrapping_sub(term(page, old));
            }
        }
    }

    /// Apply changes gathered by [`PageHashes::set_deferred`].
    pub fn add_to_digest(&self, delta: u64) {
        if delta != 0 {
            self.sum.fetch_add(delta, Ordering::Relaxed);
        }
    }

    /// The memory digest (see the module docs). Equal digests on both sides
    /// mean the destination wrote every page with the content the source
    /// sent last. Call it when no thread is recording (between rounds).
    pub fn digest(&self) -> u64 {
        self.sum.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_hashes_give_equal_digests() {
        let (a, b) = (PageHashes::new(4), PageHashes::new(4));
        for p in 0..4 {
            a.set(p, p * 7 + 1);
            b.set(p, p * 7 + 1);
        }
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn one_missing_page_changes_the_digest() {
        let (a, b) = (PageHashes::new(4), PageHashes::new(4));
        for p in 0..4 {
            a.set(p, p + 1);
            if p != 2 {
                b.set(p, p + 1);
            }
        }
        assert_ne!(a.digest(), b.digest());
    }

    #[test]
    fn order_of_recording_does_not_matter_but_the_last_hash_does() {
        let (a, b) = (PageHashes::new(8), PageHashes::new(8));
        for p in 0..8 {
            a.set(p, 100 + p);
        }
        for p in (0..8).rev() {
            b.set(p, 7);
            b.set(p, 100 + p);
        }
        assert_eq!(a.digest(), b.digest());
        b.set(3, 5);
        assert_ne!(a.digest(), b.digest());
        b.set(3, 103);
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn swapped_pages_change_the_digest() {
        let (a, b) = (PageHashes::new(2), PageHashes::new(2));
        a.set(0, 11);
        a.set(1, 22);
        b.set(0, 22);
        b.set(1, 11);
        assert_ne!(a.digest(), b.digest());
    }
}
