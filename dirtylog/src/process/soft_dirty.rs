//! [`SoftDirtyLog`]: `/proc/PID/clear_refs` + pagemap bit 55, where the
//! kernel has `CONFIG_MEM_SOFT_DIRTY`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::time::Instant;

use super::{validate_ranges, MemoryRange};
use crate::log::check_bitmap;
use crate::{CollectStats, DirtyBitmap, DirtyLog, DirtyLogError, Reprotect, PAGE_SIZE};

/// Pagemap entry bit: the page was written since the last soft-dirty clear.
const PM_SOFT_DIRTY: u64 = 1 << 55;

/// Does this kernel track soft-dirty bits?
///
/// Writing `4` to `clear_refs` succeeds even on kernels without
/// `CONFIG_MEM_SOFT_DIRTY`, so the probe checks the effect: a throw-away child
/// process maps a page, writes it, clears its soft-dirty bits, writes the page
/// again and reads its pagemap entry; bit 55 must be set. (A child, so the
/// probe never clears the caller's own bits.)
pub fn soft_dirty_supported() -> Result<bool, DirtyLogError> {
    // SAFETY: fork has no memory-safety preconditions; the child below only
    // makes raw system calls (no allocation, no locks) and then `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(DirtyLogError::SoftDirtyProbe(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: child process: raw syscalls on memory it owns, then _exit.
        unsafe { libc::_exit(probe_in_child()) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above; `status` is a valid out-pointer.
    let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
    if ret != pid {
        return Err(DirtyLogError::SoftDirtyProbe(io::Error::last_os_error()));
    }
    match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        other => Err(DirtyLogError::SoftDirtyProbe(io::Error::other(format!(
            "probe child failed (exit {other:?})"
        )))),
    }
}

/// Runs in the forked child: 0 supported, 1 not, 2+ a step failed.
fn probe_in_child() -> i32 {
    let len = PAGE_SIZE as usize;
    // SAFETY: fresh anonymous mapping, checked below.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if page == libc::MAP_FAILED {
        return 2;
    }
    let page = page.cast::<u64>();
    // SAFETY: `page` is a mapped, writable, aligned page.
    unsafe { page.write_volatile(1) };
    // SAFETY: opening a NUL-terminated path.
    let fd = unsafe { libc::open(c"/proc/self/clear_refs".as_ptr(), libc::O_WRONLY) };
    if fd < 0 {
        return 3;
    }
    // SAFETY: writes one byte from a static buffer to an fd we own, then closes it.
    let wrote = unsafe { libc::write(fd, c"4".as_ptr().cast(), 1) };
    // SAFETY: closes the fd opened above.
    unsafe { libc::close(fd) };
    if wrote != 1 {
        return 4;
    }
    // SAFETY: as above, the page is mapped and writable.
    unsafe { page.write_volatile(2) };
    // SAFETY: opening a NUL-terminated path.
    let fd = unsafe { libc::open(c"/proc/self/pagemap".as_ptr(), libc::O_RDONLY) };
    if fd < 0 {
        return 5;
    }
    let mut entry = 0u64;
    let Ok(offset) = libc::off_t::try_from(page as u64 / PAGE_SIZE * 8) else {
        return 7;
    };
    // SAFETY: reads 8 bytes into `entry`, a valid u64.
    let got = unsafe { libc::pread(fd, (&raw mut entry).cast(), 8, offset) };
    // SAFETY: closes the fd opened above.
    unsafe { libc::close(fd) };
    if got != 8 {
        return 6;
    }
    if entry & PM_SOFT_DIRTY != 0 {
        0
    } else {
        1
    }
}

/// Soft-dirty tracking of a process's memory (`clear_refs` + pagemap bit 55).
///
/// Only where [`soft_dirty_supported`]; the constructor says so otherwise.
/// `clear_refs` clears the bits of the **whole** process and cannot be
/// combined with reading them atomically: a page first written between the
/// pagemap read and the clear is missed, so the tracked process must be
/// stopped (SIGSTOP, cgroup freezer) while `collect` runs, as CRIU does.
/// Prefer [`ProcessMemoryLog`](crate::ProcessMemoryLog), which has no such gap.
#[derive(Debug)]
pub struct SoftDirtyLog {
    pid: i32,
    pagemap: File,
    ranges: Vec<MemoryRange>,
    pages: usize,
    started: bool,
}

impl SoftDirtyLog {
    /// Tracks `ranges` of process `pid`; fails with
    /// [`DirtyLogError::SoftDirtyUnsupported`] where the kernel lacks soft-dirty.
    pub fn new(pid: i32, ranges: Vec<MemoryRange>) -> Result<Self, DirtyLogError> {
        let pages = validate_ranges(&ranges)?;
        if !soft_dirty_supported()? {
            return Err(DirtyLogError::SoftDirtyUnsupported);
        }
        let pagemap = File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|source| DirtyLogError::OpenPagemap { pid, source })?;
        Ok(Self {
            pid,
            pagemap,
            ranges,
            pages,
            started: false,
        })
    }

    fn clear_refs(&self) -> Result<(), DirtyLogError> {
        let pid = self.pid;
        OpenOptions::new()
            .write(true)
            .open(format!("/proc/{pid}/clear_refs"))
            .and_then(|mut f| f.write_all(b"4"))
            .map_err(|source| DirtyLogError::ClearRefs { pid, source })
    }
}

impl DirtyLog for SoftDirtyLog {
    fn name(&self) -> &'static str {
        "process-soft-dirty"
    }

    fn pages(&self) -> usize {
        self.pages
    }

    fn start(&mut self) -> Result<(), DirtyLogError> {
        self.clear_refs()?;
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
        let mut base = 0;
        for r in &self.ranges {
            let bytes = r.pages() * 8;
            let mut buf = vec![0u8; bytes];
            self.pagemap
                .read_exact_at(&mut buf, r.start / PAGE_SIZE * 8)
                .map_err(|source| DirtyLogError::ReadPagemap {
                    pid: self.pid,
                    source,
                })?;
            stats.syscalls += 1;
            for (i, e) in buf.chunks_exact(8).enumerate() {
                let mut w = [0u8; 8];
                w.copy_from_slice(e);
                if u64::from_ne_bytes(w) & PM_SOFT_DIRTY != 0 {
                    out.set(base + i);
                    stats.reported += 1;
                }
            }
            base += r.pages();
        }
        if reprotect != Reprotect::Never {
            self.clear_refs()?;
            stats.syscalls += 1;
            stats.reprotected = stats.reported;
        }
        stats.elapsed = t0.elapsed();
        Ok(stats)
    }

    fn reprotect(&mut self, _first_page: usize, _words: &[u64]) -> Result<(), DirtyLogError> {
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyLogError> {
        self.started = false;
        Ok(())
    }
}
