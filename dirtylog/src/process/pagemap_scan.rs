//! The `PAGEMAP_SCAN` ioctl on `/proc/PID/pagemap` (Linux 6.7), defined by hand.

use std::fs::File;
use std::io;

use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::DirtyLogError;

/// Write-protect the pages that match (atomically with reporting them).
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail if a page in the range is not under async userfaultfd write-protect.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// Page category: written since it was last write-protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`: `start..end` has `categories`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PageRegion {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Categories (masked by the return mask).
    pub categories: u64,
}

ioctl_iowr_nr!(PAGEMAP_SCAN, 'f' as u32, 16, PmScanArg);

/// Reports the written pages of `start..end` as address ranges to `f`,
/// write-protecting them again when `reprotect`. Loops until the whole range
/// is walked (`walk_end`). Returns the number of ioctls made.
pub fn scan_written(
    pagemap: &File,
    start: u64,
    end: u64,
    reprotect: bool,
    regions: &mut [PageRegion],
    mut f: impl FnMut(u64, u64),
) -> Result<usize, DirtyLogError> {
    let mut calls = 0;
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: PM_SCAN_CHECK_WPASYNC | if reprotect { PM_SCAN_WP_MATCHING } else { 0 },
            start: at,
            end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..Default::default()
        };
        // SAFETY: `pagemap` is an open pagemap file; `arg` is a valid
        // pm_scan_arg whose `vec` points at `regions.len()` page_region slots
        // that stay alive and unaliased during the call.
        let ret = unsafe { ioctl_with_mut_ref(pagemap, PAGEMAP_SCAN(), &mut arg) };
        calls += 1;
        let filled = usize::try_from(ret).map_err(|_| DirtyLogError::PagemapScan {
            start: at,
            end,
            source: io::Error::last_os_error(),
        })?;
        for r in &regions[..filled.min(regions.len())] {
            f(r.start, r.end);
        }
        if arg.walk_end <= at {
            // No progress would loop forever; the kernel always advances.
            return Err(DirtyLogError::PagemapScan {
                start: at,
                end,
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        at = arg.walk_end;
    }
    Ok(calls)
}
