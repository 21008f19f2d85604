//! A size-limited cache of earlier page copies, the base of XOR deltas.

use std::sync::Mutex;

use super::{Page, PAGE_SIZE};

/// A direct-mapped cache of page copies keyed by page index: slot
/// `page % slots` holds at most one page. A newer page evicts an older one
/// in its slot. Each slot has its own lock so encoder threads can share
/// one cache (a page is only encoded by one thread at a time).
///
/// The destination needs no cache: it applies a delta to the copy already
/// in guest memory, which is the copy the source sent last.
#[derive(Debug)]
pub struct XorDeltaCache {
    slots: Vec<Mutex<Option<CachedPage>>>,
}

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
            slots: (0..slots).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Number of pages the cache can hold.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn slot(&self, page: u64) -> Option<&Mutex<Option<CachedPage>>> {
        if self.slots.is_empty() {
            return None;
        }
        let len = self.slots.len() as u64;
        let index = usize::try_from(page % len).expect("slot index below slot count");
        self.slots.get(index)
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
        if let Some(slot) = self.slot(page) {
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
