//! Pages the VMM writes itself: [`VmmWriteLog`], [`VmmWriteSource`] and
//! [`WithVmmWrites`], which ORs them into any backend's report.
//!
//! KVM logs only guest writes; whatever the VMM (or an emulated device)
//! writes into guest memory through its own mapping must be marked by the
//! VMM. Two sources are supported:
//!
//! * vm-memory's own dirty tracking: a `GuestMemoryMmap<AtomicBitmap>`
//!   marks every page written through its `Bytes` API (`write_slice`,
//!   `write_obj`, ...); [`VmmWriteSource`] is implemented for it, so a VMM
//!   that writes guest memory only through vm-memory gets this for free;
//! * [`VmmWriteLog`], an atomic bitmap to mark explicitly, for writes made
//!   through raw pointers.
//!
//! Draining swaps each word with zero atomically, so a mark racing with a
//! drain lands in this round or the next, never nowhere.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use crate::bitmap::{words_for, BITS_PER_WORD};
use crate::words::AtomicWords;
use crate::{CollectStats, DirtyBitmap, DirtyLog, DirtyLogError, Reprotect, PAGE_SIZE};

/// Something that knows which pages the VMM wrote.
pub trait VmmWriteSource: Send {
    /// Takes (and clears) the marked pages, ORing them into `out`. Returns
    /// how many were marked.
    fn drain_into(&self, out: &mut DirtyBitmap) -> usize;
    /// Forgets every mark.
    fn reset(&self);
}

/// An atomic bitmap the VMM marks when it writes guest memory itself
/// (index = guest page frame number, like [`DirtyBitmap`]). Share it with
/// `Arc`; marking is lock-free.
#[derive(Debug)]
pub struct VmmWriteLog {
    words: AtomicWords,
    pages: usize,
}

impl VmmWriteLog {
    /// A log of `pages` pages, nothing marked.
    pub fn new(pages: usize) -> Self {
        Self {
            words: AtomicWords::zeroed(words_for(pages)),
            pages,
        }
    }

    /// Pages covered.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Marks `page`; pages past the end are ignored.
    pub fn mark(&self, page: usize) {
        if page < self.pages {
            self.words[page / BITS_PER_WORD]
                .fetch_or(1 << (page % BITS_PER_WORD), Ordering::Release);
        }
    }

    /// Marks every page touched by the guest-physical range `gpa..gpa+len`.
    pub fn mark_range(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / PAGE_SIZE;
        let last = (gpa + len - 1) / PAGE_SIZE;
        for page in first..=last.min(self.pages as u64) {
            self.mark(page as usize);
        }
    }
}

impl VmmWriteSource for VmmWriteLog {
    fn drain_into(&self, out: &mut DirtyBitmap) -> usize {
        let mut n = 0;
        for (i, w) in self.words.iter().enumerate() {
            if w.load(Ordering::Relaxed) != 0 {
                let bits = w.swap(0, Ordering::AcqRel);
                n += out.or_words_at(i * BITS_PER_WORD, &[bits]);
            }
        }
        n
    }

    fn reset(&self) {
        self.words
            .iter()
            .for_each(|w| w.store(0, Ordering::Release));
    }
}

impl<T: VmmWriteSource + Sync> VmmWriteSource for Arc<T> {
    fn drain_into(&self, out: &mut DirtyBitmap) -> usize {
        (**self).drain_into(out)
    }
    fn reset(&self) {
        (**self).reset()
    }
}

/// vm-memory's per-region `AtomicBitmap`s (cargo feature `backend-bitmap` of
/// vm-memory). Region bitmaps count pages from the region start; a region
/// starting at GPA `a` maps to page index `a / 4096`.
impl VmmWriteSource for GuestMemoryMmap<AtomicBitmap> {
    fn drain_into(&self, out: &mut DirtyBitmap) -> usize {
        let mut n = 0;
        for region in self.iter() {
            let first = (region.start_addr().0 / PAGE_SIZE) as usize;
            let words = MmapRegion::bitmap(region).get_and_reset();
            if first.is_multiple_of(BITS_PER_WORD) {
                n += out.or_words_at(first, &words);
            } else {
                let marked = DirtyBitmap::from_words(words);
                let end = out.len();
                for p in marked.iter_ones().map(|p| p + first).filter(|&p| p < end) {
                    out.set(p);
                    n += 1;
                }
            }
        }
        n
    }

    fn reset(&self) {
        for region in self.iter() {
            MmapRegion::bitmap(region).reset();
        }
    }
}

/// A dirty log that also reports the pages the VMM wrote itself: the
/// backend's pages OR the source's. The source is drained *before* the
/// backend is collected, in the same `collect`.
#[derive(Debug)]
pub struct WithVmmWrites<B, S = Arc<VmmWriteLog>> {
    inner: B,
    vmm: S,
}

impl<B: DirtyLog, S: VmmWriteSource> WithVmmWrites<B, S> {
    /// Wraps `inner`, adding the pages marked in `vmm`.
    pub fn new(inner: B, vmm: S) -> Self {
        Self { inner, vmm }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The VMM-write source.
    pub fn vmm_writes(&self) -> &S {
        &self.vmm
    }
}

impl<B: DirtyLog, S: VmmWriteSource> DirtyLog for WithVmmWrites<B, S> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn pages(&self) -> usize {
        self.inner.pages()
    }

    fn start(&mut self) -> Result<(), DirtyLogError> {
        self.vmm.reset();
        self.inner.start()
    }

    fn collect(
        &mut self,
        out: &mut DirtyBitmap,
        reprotect: Reprotect,
    ) -> Result<CollectStats, DirtyLogError> {
        crate::log::check_bitmap(self.inner.pages(), out)?;
        let from_vmm = self.vmm.drain_into(out);
        let mut stats = self.inner.collect(out, reprotect)?;
        stats.reported += from_vmm;
        Ok(stats)
    }

    fn reprotect(&mut self, first_page: usize, words: &[u64]) -> Result<(), DirtyLogError> {
        self.inner.reprotect(first_page, words)
    }

    /// The inner log's counts: the VMM's own writes belong to no vCPU.
    fn take_vcpu_dirty_counts(&mut self) -> Option<Vec<u64>> {
        self.inner.take_vcpu_dirty_counts()
    }

    fn stop(&mut self) -> Result<(), DirtyLogError> {
        self.inner.stop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_drained_once() {
        let log = VmmWriteLog::new(200);
        log.mark(3);
        log.mark_range(64 * 4096 + 4000, 200); // straddles pages 64 and 65
        log.mark(500); // past the end: ignored
        let mut out = DirtyBitmap::new(200);
        assert_eq!(log.drain_into(&mut out), 3);
        assert_eq!(out.iter_ones().collect::<Vec<_>>(), [3, 64, 65]);
        let mut again = DirtyBitmap::new(200);
        assert_eq!(log.drain_into(&mut again), 0);
    }

    #[test]
    fn marks_racing_with_drains_are_never_lost() {
        let log = Arc::new(VmmWriteLog::new(4096));
        let mut seen = DirtyBitmap::new(4096);
        std::thread::scope(|s| {
            let marker = log.clone();
            let h = s.spawn(move || (0..4096).for_each(|p| marker.mark(p)));
            while !h.is_finished() {
                log.drain_into(&mut seen);
            }
        });
        log.drain_into(&mut seen);
        assert_eq!(seen.count_ones(), 4096);
    }
}
