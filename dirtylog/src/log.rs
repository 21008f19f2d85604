//! The [`DirtyLog`] trait every backend implements, and what it shares.

use std::time::Duration;

use crate::{DirtyBitmap, DirtyLogError};

/// Size of the pages a dirty log tracks.
pub const PAGE_SIZE: u64 = 4096;

/// What `collect` does about the pages it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reprotect {
    /// Every reported page is write-protected again before `collect` returns:
    /// a later write shows up in the next round.
    Now,
    /// KVM manual-protect only (others treat it as `Now`): reported pages stay
    /// unprotected until the caller calls [`DirtyLog::reprotect`] for a chunk,
    /// right before reading those pages.
    Deferred,
    /// Final round, VM stopped: report, do not re-protect (saves the expensive
    /// clear after stop). Backends that cannot avoid re-protecting do it anyway.
    Never,
}

/// What one `collect` call saw and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CollectStats {
    /// Pages reported by the kernel, duplicates included (a dirty ring may
    /// report a page twice).
    pub reported: usize,
    /// Pages write-protected again by this call.
    pub reprotected: usize,
    /// System calls made.
    pub syscalls: usize,
    /// Wall time spent in `collect`.
    pub elapsed: Duration,
}

/// A KVM memory slot as a dirty log sees it. The page index of a byte at
/// guest-physical address `a` is `a / 4096` (the guest page frame number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySlot {
    /// KVM slot id (address space 0).
    pub slot: u32,
    /// Guest-physical start; a multiple of 256 KiB (64 pages), so slot bitmaps
    /// line up with [`DirtyBitmap`] words.
    pub guest_phys_addr: u64,
    /// Size in 4 KiB pages.
    pub pages: usize,
}

impl MemorySlot {
    /// Page index of the slot's first page.
    pub fn first_page(&self) -> usize {
        usize::try_from(self.guest_phys_addr / PAGE_SIZE).unwrap_or(usize::MAX)
    }

    /// Page index one past the slot's last page.
    pub fn end_page(&self) -> usize {
        self.first_page().saturating_add(self.pages)
    }
}

/// Checks slot descriptions and returns the size of the page index space
/// (one past the highest page of any slot).
pub(crate) fn validate_slots(slots: &[MemorySlot]) -> Result<usize, DirtyLogError> {
    if slots.is_empty() {
        return Err(DirtyLogError::InvalidLayout("no memory slots".into()));
    }
    let mut sorted: Vec<_> = slots.to_vec();
    sorted.sort_by_key(|s| s.guest_phys_addr);
    for s in &sorted {
        if s.guest_phys_addr % (PAGE_SIZE * 64) != 0 {
            return Err(DirtyLogError::InvalidLayout(format!(
                "slot {} starts at {:#x}, not a multiple of 256 KiB",
                s.slot, s.guest_phys_addr
            )));
        }
        if s.pages == 0 || u32::try_from(s.pages).is_err() {
            return Err(DirtyLogError::InvalidLayout(format!(
                "slot {} has {} pages",
                s.slot, s.pages
            )));
        }
    }
    for w in sorted.windows(2) {
        if w[0].end_page() > w[1].first_page() {
            return Err(DirtyLogError::InvalidLayout(format!(
                "slots {} and {} overlap",
                w[0].slot, w[1].slot
            )));
        }
    }
    Ok(sorted.iter().map(MemorySlot::end_page).max().unwrap_or(0))
}

/// "Give me the pages dirtied since last time, and reset."
///
/// Correctness rule for pre-copy: a page must be re-protected (its dirty bit
/// cleared) *before* it is read; a write landing after the read then shows up
/// in the next `collect`. With [`Reprotect::Now`] `collect` does that for all
/// reported pages; with [`Reprotect::Deferred`] the caller does it per chunk
/// with [`reprotect`](Self::reprotect).
///
/// Backends may report a page that was not written (never miss one that was).
pub trait DirtyLog: Send {
    /// Short backend name, e.g. `"kvm-bitmap"`.
    fn name(&self) -> &'static str;
    /// Size of the page index space: bitmaps passed to `collect` have this length.
    fn pages(&self) -> usize;
    /// Begins tracking: after it returns, `collect` reports every page written
    /// since (pages written before may be reported too).
    fn start(&mut self) -> Result<(), DirtyLogError>;
    /// Begins tracking for a caller whose first pass reads every page and
    /// re-protects each chunk before reading it ([`Reprotect::Deferred`]
    /// and [`reprotect`](Self::reprotect)), as pre-copy's round 0 does: the
    /// first `collect` may report every page, and a backend may leave
    /// pages unprotected until their chunk is re-protected, so protecting
    /// all of memory is spread over that pass instead of delaying its start.
    /// The default is [`start`](Self::start).
    fn start_full_pass(&mut self) -> Result<(), DirtyLogError> {
        self.start()
    }
    /// ORs the pages dirtied since the last `collect` (or `start`) into `out`.
    fn collect(
        &mut self,
        out: &mut DirtyBitmap,
        reprotect: Reprotect,
    ) -> Result<CollectStats, DirtyLogError>;
    /// Deferred mode: write-protect again the pages set in `words`, which
    /// cover pages `first_page..first_page + 64 * words.len()`
    /// (`first_page` a multiple of 64). A no-op for backends that re-protect
    /// in `collect`.
    fn reprotect(&mut self, first_page: usize, words: &[u64]) -> Result<(), DirtyLogError>;
    /// Pages each vCPU dirtied since the last call (or `start`), index =
    /// vCPU, for backends that know which vCPU wrote a page (the KVM dirty
    /// ring: one ring per vCPU); `None` for those that do not. Counts may
    /// include a page twice, like [`CollectStats::reported`]. Dirty-limit
    /// convergence reads them after each round's `collect` to slow down
    /// only the vCPUs that dirty fastest.
    fn take_vcpu_dirty_counts(&mut self) -> Option<Vec<u64>> {
        None
    }
    /// Stops tracking and releases what `start` set up.
    fn stop(&mut self) -> Result<(), DirtyLogError>;
}

impl<T: DirtyLog + ?Sized> DirtyLog for Box<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn pages(&self) -> usize {
        (**self).pages()
    }
    fn start(&mut self) -> Result<(), DirtyLogError> {
        (**self).start()
    }
    fn start_full_pass(&mut self) -> Result<(), DirtyLogError> {
        (**self).start_full_pass()
    }
    fn collect(
        &mut self,
        out: &mut DirtyBitmap,
        reprotect: Reprotect,
    ) -> Result<CollectStats, DirtyLogError> {
        (**self).collect(out, reprotect)
    }
    fn reprotect(&mut self, first_page: usize, words: &[u64]) -> Result<(), DirtyLogError> {
        (**self).reprotect(first_page, words)
    }
    fn take_vcpu_dirty_counts(&mut self) -> Option<Vec<u64>> {
        (**self).take_vcpu_dirty_counts()
    }
    fn stop(&mut self) -> Result<(), DirtyLogError> {
        (**self).stop()
    }
}

/// Checks that `out` matches the log's size.
pub(crate) fn check_bitmap(expected: usize, out: &DirtyBitmap) -> Result<(), DirtyLogError> {
    if out.len() == expected {
        Ok(())
    } else {
        Err(DirtyLogError::BitmapSize {
            expected,
            got: out.len(),
        })
    }
}
