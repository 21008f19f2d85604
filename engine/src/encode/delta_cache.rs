//! A size-limited cache of earlier page copies, the base of XOR deltas.

use std::sync::{Mutex, OnceLock};

use super::{Page, PAGE_SIZE};

/// A direct-mapped cache of page copies keyed by page index: slot
/// `page % slots` holds at most one page. A newer page evicts an older one
/// in its slot. Each slot has its own lock so encoder threads can share
/// one cache (a page is only encoded by one thread at a time).
///
/// The destination needs no cache: it applies a delta to the copy already
/// in guest memory, which is the copy the source sent last.
///
/// The slots are made a segment of [`SEGMENT_SLOTS`] at a time, when a page
/// first lands in one: making all of them up front (65,536 locks for a
/// 1 GiB guest's 256 MiB cache) cost ~1 ms on the way to the first page.
#[derive(Debug)]
pub struct XorDeltaCache {
    segments: Box<[OnceLock<Segment>]>,
    slots: usize,
}

/// Slots made together (64 KiB of locks).
const SEGMENT_SLOTS: usize = 4096;

type Segment = Box<[Mutex<Option<CachedPage>>]>;

#[derive(Debug)]
struct CachedPage {
    page: u64,
    data: Box<Page>,
}

impl XorDeltaCache {
    /// A cache holding at most `bytes / PAGE_SIZE` pages (none when
    /// `bytes < PAGE_SIZE`). Memory is taken as pages are inserted.
    pub fn new(bytes: usize) -> Self {
        let slots = bytes / PAGE_SIZE;
        Self {
            segments: (0..slots.div_ceil(SEGMENT_SLOTS))
                .map(|_| OnceLock::new())
                .collect(),
            slots,
        }
    }

    /// Number of pages the cache can hold.
    pub fn capacity(&self) -> usize {
        self.slots
    }

    /// The index of `page`'s segment and of its slot in that segment.
    fn place(&self, page: u64) -> Option<(usize, usize)> {
        if self.slots == 0 {
            return None;
        }
        let index = usize::try_from(page % self.slots as u64).ok()?;
        Some((index / SEGMENT_SLOTS, index % SEGMENT_SLOTS))
    }

    /// `page`'s slot, its segment made if it was not yet (the last segment
    /// holds what is left of the slots).
    fn slot(&self, page: u64) -> Option<&Mutex<Option<CachedPage>>> {
        let (segment, at) = self.place(page)?;
        let len = SEGMENT_SLOTS.min(self.slots - segment * SEGMENT_SLOTS);
        self.segments
            .get(segment)?
            .get_or_init(|| (0..len).map(|_| Mutex::new(None)).collect())
            .get(at)
    }

    /// Run `f` with the cached copy of `page` (if the cache holds one), then
    /// store `new` as the page's cached copy. Returns what `f` returned, or
    /// `None` when there was no earlier copy.
    pub fn with_previous_then_store<R>(
        &self,
        page: u64,
        new: &Page,
        f: impl FnOnce(&Page) -> R,
    ) -> Option<R> {
        let slot = self.slot(page)?;
        let mut guard = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match guard.as_mut() {
            Some(cached) if cached.page == page => {
                let result = f(&cached.data);
                cached.data.copy_from_slice(new);
                Some(result)
            }
            Some(cached) => {
                cached.page = page;
                cached.data.copy_from_slice(new);
                None
            }
            None => {
                *guard = Some(CachedPage {
                    page,
                    data: Box::new(*new),
                });
                None
            }
        }
    }

    /// Forget `page` (it was sent in a way that did not go through the
    /// cache, so the cached copy is stale).
    pub fn forget(&self, page: u64) {
        // A segment not made yet holds no page.
        let slot = self
            .place(page)
            .and_then(|(segment, at)| self.segments.get(segment)?.get()?.get(at));
        if let Some(slot) = slot {
            let mut guard = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if guard.as_ref().is_some_and(|c| c.page == page) {
                *guard = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sight_stores_and_second_sees_the_old_copy() {
        let cache = XorDeltaCache::new(4 * PAGE_SIZE);
        let a = [1u8; PAGE_SIZE];
        let b = [2u8; PAGE_SIZE];
        assert_eq!(cache.with_previous_then_store(9, &a, |old| old[0]), None);
        assert_eq!(cache.with_previous_then_store(9, &b, |old| old[0]), Some(1));
        assert_eq!(cache.with_previous_then_store(9, &a, |old| old[0]), Some(2));
    }

    #[test]
    fn a_cache_spanning_segments_keeps_each_page_in_its_slot() {
        // Two and a half segments: the last one short.
        let slots = 2 * SEGMENT_SLOTS + SEGMENT_SLOTS / 2;
        let cache = XorDeltaCache::new(slots * PAGE_SIZE);
        assert_eq!(cache.capacity(), slots);
        let pages = [
            0,
            1,
            SEGMENT_SLOTS as u64,
            slots as u64 - 1,
            slots as u64 + 3,
        ];
        for (i, &p) in pages.iter().enumerate() {
            cache.forget(p);
            assert_eq!(
                cache.with_previous_then_store(p, &[i as u8; PAGE_SIZE], |o| o[0]),
                None
            );
        }
        for (i, &p) in pages.iter().enumerate() {
            assert_eq!(
                cache.with_previous_then_store(p, &[0; PAGE_SIZE], |o| o[0]),
                Some(i as u8),
                "page {p}"
            );
        }
        // Page slots + 3 shares page 3's slot, and evicts it.
        assert_eq!(
            cache.with_previous_then_store(3, &[9; PAGE_SIZE], |_| ()),
            None
        );
        assert_eq!(
            cache.with_previous_then_store(slots as u64 + 3, &[0; PAGE_SIZE], |_| ()),
            None
        );
        assert!(XorDeltaCache::new(PAGE_SIZE - 1).slot(5).is_none());
    }

    #[test]
    fn pages_sharing_a_slot_evict_each_other() {
        let cache = XorDeltaCache::new(4 * PAGE_SIZE);
        let a = [1u8; PAGE_SIZE];
        cache.with_previous_then_store(1, &a, |_| ());
        cache.with_previous_then_store(5, &a, |_| ());
        assert_eq!(cache.with_previous_then_store(1, &a, |_| ()), None);
    }

    #[test]
    fn forgotten_pages_have_no_previous_copy() {
        let cache = XorDeltaCache::new(4 * PAGE_SIZE);
        let a = [1u8; PAGE_SIZE];
        cache.with_previous_then_store(3, &a, |_| ());
        cache.forget(3);
        assert_eq!(cache.with_previous_then_store(3, &a, |_| ()), None);
    }

    #[test]
    fn a_zero_sized_cache_holds_nothing() {
        let cache = XorDeltaCache::new(0);
        let a = [1u8; PAGE_SIZE];
        assert_eq!(cache.capacity(), 0);
        cache.with_previous_then_store(3, &a, |_| ());
        assert_eq!(cache.with_previous_then_store(3, &a, |_| ()), None);
    }
}
