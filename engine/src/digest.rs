//! Per-page hashes and the memory digest built from them.
//!
//! The digest is a sum, kept up to date as pages are recorded: the wrapping
//! sum over pages of `xxh3_64(hash, seed = page index)`, where a page never
//! recorded (hash 0) adds nothing. Reading it is O(1), so neither side
//! spends downtime hashing the hash table at the handover; a page missing,
//! misplaced or stale on one side changes it except with probability about
//! 2^-64 (the terms are independent 64-bit hashes).
//!
//! The sum is also kept per memory region (the layout's regions, e.g. RAM
//! below and above the 3-4 GiB hole): the region digests add up to the
//! digest, and comparing them says which region differs.

use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The xxh3-64 of each page as last sent (source) or last written
/// (destination), indexed by page, and the digest over them. `0` means
/// "never": a page's hash of 0 (one chance in 2^64) only costs it being
/// sent again.
#[derive(Debug)]
pub struct PageHashes {
    hashes: ferry_dirtylog::AtomicWords,
    /// Regions as page ranges `[first, end)`, ascending.
    regions: Vec<(u64, u64)>,
    /// One sum per region, then one for pages outside every region.
    sums: Vec<AtomicU64>,
}

/// Digest changes gathered over a batch of pages, one per region (see
/// [`PageHashes::set_deferred`]).
#[derive(Debug, Default)]
pub struct DigestDelta {
    sums: Vec<u64>,
    /// The region the last page fell in (pages of a batch are mostly in one).
    last: usize,
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
    /// Hashes for a page index space of `pages`, all "never", one region.
    pub fn new(pages: u64) -> Self {
        Self::with_regions(pages, &[(0, pages)])
    }

    /// Hashes for a page index space of `pages`, with a digest per region
    /// (page ranges `[first, end)`, ascending, not overlapping).
    pub fn with_regions(pages: u64, regions: &[(u64, u64)]) -> Self {
        let n = usize::try_from(pages).expect("page count fits in memory");
        Self {
            hashes: ferry_dirtylog::AtomicWords::zeroed(n),
            regions: regions.to_vec(),
            sums: (0..=regions.len()).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// An empty delta for [`PageHashes::set_deferred`].
    pub fn delta(&self) -> DigestDelta {
        DigestDelta {
            sums: vec![0; self.sums.len()],
            last: 0,
        }
    }

    /// Index of the sum `page` counts in.
    fn region_of(&self, page: u64, hint: usize) -> usize {
        let inside = |i: usize| {
            self.regions
                .get(i)
                .is_some_and(|&(first, end)| (first..end).contains(&page))
        };
        if inside(hint) {
            return hint;
        }
        (0..self.regions.len())
            .find(|&i| inside(i))
            .unwrap_or(self.regions.len())
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
        let mut delta = self.delta();
        self.set_deferred(page, hash, &mut delta);
        self.add_to_digest(&delta);
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
    pub fn set_deferred(&self, page: u64, hash: u64, delta: &mut DigestDelta) {
        if let Some(h) = usize::try_from(page).ok().and_then(|i| self.hashes.get(i)) {
            let old = h.load(Ordering::Relaxed);
            h.store(hash, Ordering::Relaxed);
            if old != hash {
                let r = self.region_of(page, delta.last);
                delta.last = r;
                if let Some(sum) = delta.sums.get_mut(r) {
                    *sum = sum
                        .wrapping_add(term(page, hash))
                        .wrapping_sub(term(page, old));
                }
            }
        }
    }

    /// Apply changes gathered by [`PageHashes::set_deferred`].
    pub fn add_to_digest(&self, delta: &DigestDelta) {
        for (sum, &d) in self.sums.iter().zip(&delta.sums) {
            if d != 0 {
                sum.fetch_add(d, Ordering::Relaxed);
            }
        }
    }

    /// The memory digest (see the module docs). Equal digests on both sides
    /// mean the destination wrote every page with the content the source
    /// sent last. Call it when no thread is recording (between rounds).
    pub fn digest(&self) -> u64 {
        self.sums
            .iter()
            .fold(0u64, |acc, s| acc.wrapping_add(s.load(Ordering::Relaxed)))
    }

    /// The digest of each region, in the order given at creation (pages
    /// outside every region count in [`PageHashes::digest`] only).
    pub fn region_digests(&self) -> Vec<u64> {
        self.sums[..self.regions.len()]
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect()
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
    fn region_digests_add_up_and_say_which_region_differs() {
        let regions = [(0, 4), (8, 12)];
        let (a, b) = (
            PageHashes::with_regions(12, &regions),
            PageHashes::with_regions(12, &regions),
        );
        let mut da = a.delta();
        let mut db = b.delta();
        for p in (0..4).chain(8..12) {
            a.set_deferred(p, p + 1, &mut da);
            b.set_deferred(p, p + 1, &mut db);
        }
        a.add_to_digest(&da);
        b.add_to_digest(&db);
        assert_eq!(a.region_digests(), b.region_digests());
        let total = a
            .region_digests()
            .iter()
            .fold(0u64, |x, &y| x.wrapping_add(y));
        assert_eq!(total, a.digest());
        // A whole-space PageHashes gives the same digest.
        let whole = PageHashes::new(12);
        for p in (0..4).chain(8..12) {
            whole.set(p, p + 1);
        }
        assert_eq!(whole.digest(), a.digest());
        b.set(9, 99);
        let (ra, rb) = (a.region_digests(), b.region_digests());
        assert_eq!(ra[0], rb[0], "the low region still agrees");
        assert_ne!(ra[1], rb[1], "the high region differs");
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
