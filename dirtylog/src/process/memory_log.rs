//! [`ProcessMemoryLog`]: userfaultfd async write-protect + `PAGEMAP_SCAN`.

use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::time::Instant;

use super::pagemap_scan::{scan_written, PageRegion};
use super::{uffd, validate_ranges, MemoryRange};
use crate::log::check_bitmap;
use crate::{CollectStats, DirtyBitmap, DirtyLog, DirtyLogError, Reprotect, PAGE_SIZE};

/// Page regions read per `PAGEMAP_SCAN` call.
const REGIONS_PER_SCAN: usize = 512;

/// Dirty pages of a process's memory, CRIU-style (Linux ≥ 6.7).
///
/// Setup: the tracked process's userfaultfd (see
/// [`create_userfaultfd`](crate::create_userfaultfd)) gets the
/// `UFFD_FEATURE_WP_ASYNC | WP_UNPOPULATED` handshake and each range is
/// registered in write-protect mode. `start` write-protects the ranges
/// (`UFFDIO_WRITEPROTECT`); a write then un-protects its page in the kernel,
/// without any fault message. `collect` runs `PAGEMAP_SCAN` on
/// `/proc/PID/pagemap` asking for `PAGE_IS_WRITTEN` pages with
/// `PM_SCAN_WP_MATCHING`, which reports and re-protects them in one call.
///
/// Page `i` of the log is the `i`-th page of the ranges, taken in order.
/// Every [`Reprotect`] mode but `Never` re-protects inside `collect`.
#[derive(Debug)]
pub struct ProcessMemoryLog {
    pid: i32,
    uffd: OwnedFd,
    pagemap: File,
    ranges: Vec<MemoryRange>,
    pages: usize,
    regions: Vec<PageRegion>,
    started: bool,
}

impl ProcessMemoryLog {
    /// Tracks `ranges` of the calling process.
    pub fn for_self(ranges: Vec<MemoryRange>) -> Result<Self, DirtyLogError> {
        let uffd = uffd::create_userfaultfd()?;
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        Self::with_userfaultfd(pid, uffd, ranges)
    }

    /// Tracks `ranges` of process `pid`, given a fresh (no handshake yet)
    /// userfaultfd that **process `pid` created** (a userfaultfd acts on its
    /// creator's memory): received over a UNIX socket or via `pidfd_getfd`.
    /// The ranges must be mapped in that process.
    pub fn with_userfaultfd(
        pid: i32,
        uffd: OwnedFd,
        ranges: Vec<MemoryRange>,
    ) -> Result<Self, DirtyLogError> {
        let pages = validate_ranges(&ranges)?;
        uffd::api_wp_async(&uffd)?;
        for r in &ranges {
            uffd::register_wp(&uffd, r.start, r.len)?;
        }
        let pagemap = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/pagemap"))
            .map_err(|source| DirtyLogError::OpenPagemap { pid, source })?;
        Ok(Self {
            pid,
            uffd,
            pagemap,
            ranges,
            pages,
            regions: vec![PageRegion::default(); REGIONS_PER_SCAN],
            started: false,
        })
    }

    /// The tracked process.
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

impl DirtyLog for ProcessMemoryLog {
    fn name(&self) -> &'static str {
        "process-uffd-wp"
    }

    fn pages(&self) -> usize {
        self.pages
    }

    fn start(&mut self) -> Result<(), DirtyLogError> {
        for r in &self.ranges {
            uffd::write_protect(&self.uffd, r.start, r.len, true)?;
        }
        self.started = true;
        Ok(())
    }

    fn collect(
        &mut self,
        out: &mut DirtyBitmap,
        reprotect: Reprotect,
    ) -> Result<CollectStats, DirtyLogError> {
        if !self.started {
            return Err(DirtyLogError::NotStarted);
        }
        check_bitmap(self.pages, out)?;
        let t0 = Instant::now();
        let mut stats = CollectStats::default();
        let rewp = reprotect != Reprotect::Never;
        let mut base = 0usize;
        for r in &self.ranges {
            let calls = scan_written(
                &self.pagemap,
                r.start,
                r.start + r.len,
                rewp,
                &mut self.regions,
                |s, e| {
                    let first = base + ((s - r.start) / PAGE_SIZE) as usize;
                    let n = ((e - s) / PAGE_SIZE) as usize;
                    out.set_range(first, first + n);
                    stats.reported += n;
                },
            )?;
            stats.syscalls += calls;
            base += r.pages();
        }
        if rewp {
            stats.reprotected = stats.reported;
        }
        stats.elapsed = t0.elapsed();
        Ok(stats)
    }

    fn reprotect(&mut self, _first_page: usize, _words: &[u64]) -> Result<(), DirtyLogError> {
        Ok(())
    }

    /// Removes the write protection (the process runs at full speed again).
    fn stop(&mut self) -> Result<(), DirtyLogError> {
        for r in &self.ranges {
            uffd::write_protect(&self.uffd, r.start, r.len, false)?;
        }
        self.started = false;
        Ok(())
    }
}
