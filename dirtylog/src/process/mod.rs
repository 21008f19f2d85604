//! Dirty tracking of a process's memory: [`ProcessMemoryLog`] (userfaultfd
//! write-protect, asynchronous, + `PAGEMAP_SCAN`) and [`SoftDirtyLog`]
//! (`clear_refs` + pagemap bit 55, where the kernel has soft-dirty).

mod memory_log;
mod pagemap_scan;
mod soft_dirty;
mod uffd;

pub use memory_log::ProcessMemoryLog;
pub use soft_dirty::{soft_dirty_supported, SoftDirtyLog};
pub use uffd::create_userfaultfd;

use crate::{DirtyLogError, PAGE_SIZE};

/// A page-aligned range of a process's virtual memory. A log over several
/// ranges numbers their pages one after the other, in the order given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRange {
    /// Start address (page-aligned).
    pub start: u64,
    /// Length in bytes (a multiple of 4 KiB).
    pub len: u64,
}

impl MemoryRange {
    /// Pages in the range.
    pub fn pages(&self) -> usize {
        (self.len / PAGE_SIZE) as usize
    }
}

/// Checks ranges; returns the total number of pages.
fn validate_ranges(ranges: &[MemoryRange]) -> Result<usize, DirtyLogError> {
    if ranges.is_empty() {
        return Err(DirtyLogError::InvalidLayout("no memory ranges".into()));
    }
    for r in ranges {
        if r.start % PAGE_SIZE != 0 || r.len % PAGE_SIZE != 0 || r.len == 0 {
            return Err(DirtyLogError::InvalidLayout(format!(
                "range {:#x}+{:#x} is empty or not page-aligned",
                r.start, r.len
            )));
        }
    }
    Ok(ranges.iter().map(MemoryRange::pages).sum())
}
