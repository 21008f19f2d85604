//! Per-page hashes and the memory digest built from them.

use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::Xxh3;

use crate::layout::MemoryLayout;

/// The xxh3-64 of each page as last sent (source) or last written
/// (destination), indexed by page. `0` means "never": a page's hash of 0
/// (one chance in 2^64) only costs it being sent again.
#[derive(Debug)]
pub struct PageHashes {
    hashes: Vec<AtomicU64>,
}

impl PageHashes {
    /// Hashes for a page index space of `pages`, all "never".
    pub fn new(pages: u64) -> Self {
        let n = usize::try_from(pages).expect("page count fits in memory");
        Self {
            hashes: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The hash recorded for `page`.
    pub fn get(&self, page: u64) -> u64 {
        usize::try_from(page)
            .ok()
            .and_then(|i| self.hashes.get(i))
            .map_or(0, |h| h.load(Ordering::Relaxed))
    }

    /// Record `hash` for `page`. Each page is handled by one thread at a
    /// time (a round's pages are distinct; rounds are separated by a
    /// barrier), so relaxed ordering suffices.
    pub fn set(&self, page: u64, hash: u64) {
        if let Some(h) = usize::try_from(page).ok().and_then(|i| self.hashes.get(i)) {
            h.store(hash, Ordering::Relaxed);
        }
    }

    /// The memory digest: xxh3-64 over the little-endian hashes of every
    /// page of `layout`, in page order. Equal digests on both sides mean the
    /// destination wrote every page with the content the source sent last.
    pub fn digest(&self, layout: &MemoryLayout) -> u64 {
        let mut h = Xxh3::new();
        let mut buf = Vec::with_capacity(8 * 1024);
        for r in &layout.regions {
            for page in r.first_page()..r.end_page() {
                buf.extend_from_slice(&self.get(page).to_le_bytes());
                if buf.len() == buf.capacity() {
                    h.update(&buf);
                    buf.clear();
                }
            }
        }
        h.update(&buf);
        h.digest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MemoryRegion;

    fn layout() -> MemoryLayout {
        MemoryLayout {
            regions: vec![MemoryRegion {
                guest_phys_addr: 0,
                bytes: 4 * 4096,
            }],
        }
    }

    #[test]
    fn equal_hashes_give_equal_digests() {
        let (a, b) = (PageHashes::new(4), PageHashes::new(4));
        for p in 0..4 {
            a.set(p, p * 7 + 1);
            b.set(p, p * 7 + 1);
        }
        assert_eq!(a.digest(&layout()), b.digest(&layout()));
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
        assert_ne!(a.digest(&layout()), b.digest(&layout()));
    }
}
