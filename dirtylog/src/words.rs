//! [`AtomicWords`]: a table of atomic words that starts zeroed, for the
//! per-page tables of a migration (dirty bits, page hashes).
//!
//! Why not `vec![AtomicU64::new(0); n]`: building a table word by word
//! touches every page of it at once, and a table left to the kernel's
//! zero-on-first-touch is paid for page by page in the middle of the
//! migration. Profiled on this machine (a nested KVM, where a first-touch
//! fault costs 1.6 us quiet and 15-25 us while the engine's threads and the
//! guest share the cores), the page hashes of a 1 GiB guest (2 MiB, on
//! each side) took 20-25 ms of the engine's CPU in faults while the first
//! round wrote them. A table of 2 MiB or more is therefore
//! mapped on its own, 2 MiB aligned, backed by transparent huge pages
//! where the host allows, and populated when it is made
//! (`MADV_POPULATE_WRITE`): one 2 MiB page cleared per 2 MiB of table
//! (0.17 us per 4 KiB here). Smaller tables come from the allocator's
//! zeroed memory, as before.

use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

/// Size of a transparent huge page on x86_64.
const HUGE_PAGE: usize = 2 << 20;

/// `n` atomic words, all zero (see the module docs for where they live).
/// Dereferences to `[AtomicU64]`.
pub struct AtomicWords {
    words: NonNull<AtomicU64>,
    len: usize,
    backing: Backing,
}

enum Backing {
    /// From the global allocator (`alloc_zeroed`), with this layout.
    Heap(std::alloc::Layout),
    /// An anonymous mapping of its own, from `base` for `len` bytes.
    Mapped {
        base: NonNull<libc::c_void>,
        len: usize,
    },
    /// No words: nothing allocated.
    Empty,
}

// SAFETY: the table is plain memory owned by this value and only reached
// through `&[AtomicU64]` (which is `Send` and `Sync`) or by `Drop`.
unsafe impl Send for AtomicWords {}
// SAFETY: as above: shared access goes through atomics only.
unsafe impl Sync for AtomicWords {}

impl std::fmt::Debug for AtomicWords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtomicWords")
            .field("len", &self.len)
            .field("mapped", &matches!(self.backing, Backing::Mapped { .. }))
            .finish()
    }
}

impl AtomicWords {
    /// `n` zeroed words.
    ///
    /// # Panics
    /// When `n` words do not fit in an address space, as `vec!` would.
    pub fn zeroed(n: usize) -> Self {
        let Ok(layout) = std::alloc::Layout::array::<AtomicU64>(n) else {
            panic!("{n} atomic words do not fit in memory");
        };
        if layout.size() == 0 {
            return Self {
                words: NonNull::dangling(),
                len: 0,
                backing: Backing::Empty,
            };
        }
        if layout.size() >= HUGE_PAGE {
            if let Some(table) = Self::mapped(n, layout.size()) {
                return table;
            }
        }
        // SAFETY: `layout` has a non-zero size (checked above).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        // The allocation has `layout`'s alignment, `AtomicU64`'s.
        #[allow(clippy::cast_ptr_alignment)]
        let Some(words) = NonNull::new(ptr.cast::<AtomicU64>()) else {
            std::alloc::handle_alloc_error(layout);
        };
        Self {
            words,
            len: n,
            backing: Backing::Heap(layout),
        }
    }

    /// A mapping of its own for `bytes` (> 0) bytes of `n` words, huge-page
    /// aligned and populated; `None` when the kernel gives no mapping.
    fn mapped(n: usize, bytes: usize) -> Option<Self> {
        let table = bytes.checked_next_multiple_of(HUGE_PAGE)?;
        // Room to start the table on a huge-page boundary.
        let len = table.checked_add(HUGE_PAGE)?;
        // SAFETY: a fresh private anonymous mapping: no existing memory is
        // touched; the result is checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let base = NonNull::new(base)?;
        let offset = base.as_ptr().cast::<u8>().align_offset(HUGE_PAGE);
        // `offset < HUGE_PAGE`, so `table` bytes from there stay inside
        // the `len` mapped.
        let start = base.as_ptr().cast::<u8>().wrapping_add(offset);
        // Advice only: without huge pages the table is made of small pages;
        // without memory to populate it now (ENOMEM), its pages fault in on
        // use.
        // SAFETY: `start..start + table` lies inside the private anonymous
        // mapping made above, which nothing else uses yet.
        let _ = unsafe { advise_huge_pages(start, table, true) };
        // Anonymous memory is zeroed and all-zero bytes are a valid
        // `AtomicU64`; `start` is 2 MiB aligned, so aligned for it.
        #[allow(clippy::cast_ptr_alignment)]
        let words = NonNull::new(start.cast::<AtomicU64>())?;
        Some(Self {
            words,
            len: n,
            backing: Backing::Mapped { base, len },
        })
    }
}

impl std::ops::Deref for AtomicWords {
    type Target = [AtomicU64];

    fn deref(&self) -> &[AtomicU64] {
        // SAFETY: `words` points at `len` initialised (zeroed, then only
        // changed through atomics) `AtomicU64`s owned by `self` (or is
        // dangling with `len == 0`, which a slice allows).
        unsafe { std::slice::from_raw_parts(self.words.as_ptr(), self.len) }
    }
}

impl Drop for AtomicWords {
    fn drop(&mut self) {
        match self.backing {
            // SAFETY: allocated by `alloc_zeroed` with this layout, freed
            // once, here.
            Backing::Heap(layout) => unsafe {
                std::alloc::dealloc(self.words.as_ptr().cast(), layout);
            },
            Backing::Mapped { base, len } => {
                // SAFETY: the mapping made in `mapped`, unmapped once,
                // here; no reference into it outlives `self`.
                unsafe { libc::munmap(base.as_ptr(), len) };
            }
            Backing::Empty => {}
        }
    }
}

/// Asks the kernel to back `len` bytes at `addr` with transparent huge
/// pages (advice: no error when it cannot) and, with `populate`, to
/// allocate them now (`MADV_POPULATE_WRITE`) instead of at first touch. A
/// kernel without it (before Linux 5.14: EINVAL) leaves the pages to fault
/// in on use; any other failure to populate (ENOMEM: the host cannot back
/// the range now) is returned. For guest RAM and for [`AtomicWords`].
///
/// # Safety
/// `addr..addr + len` must be a private anonymous mapping the caller owns:
/// the advice changes how it is backed, never what it holds.
pub unsafe fn advise_huge_pages(addr: *mut u8, len: usize, populate: bool) -> std::io::Result<()> {
    // SAFETY: the caller vouches for the range (above).
    let _ = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    // SAFETY: as above; populating writes zeros into fresh anonymous pages.
    if populate && unsafe { libc::madvise(addr.cast(), len, libc::MADV_POPULATE_WRITE) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn check(n: usize) {
        let words = AtomicWords::zeroed(n);
        assert_eq!(words.len(), n);
        assert!(words.iter().all(|w| w.load(Ordering::Relaxed) == 0));
        if n > 0 {
            words[n - 1].store(7, Ordering::Relaxed);
            words[0].fetch_or(1, Ordering::Relaxed);
            assert_eq!(words[n - 1].load(Ordering::Relaxed), 7 | u64::from(n == 1));
            assert_eq!(words[0].load(Ordering::Relaxed) & 1, 1);
        }
    }

    #[test]
    fn small_and_empty_tables_come_from_the_allocator_zeroed() {
        check(0);
        check(1);
        check(300);
        let w = AtomicWords::zeroed(300);
        assert!(format!("{w:?}").contains("mapped: false"));
    }

    #[test]
    fn large_tables_are_mapped_aligned_populated_and_zeroed() {
        // 2 MiB and 2 MiB + 8 bytes, over the threshold; odd lengths too.
        for n in [HUGE_PAGE / 8, HUGE_PAGE / 8 + 1, 300_000] {
            check(n);
            let w = AtomicWords::zeroed(n);
            assert!(format!("{w:?}").contains("mapped: true"), "{n}");
            assert!((w.as_ptr() as usize).is_multiple_of(HUGE_PAGE));
        }
        // Made and dropped many times: every mapping is given back (a leak
        // of 4 MiB each would show in the process's mappings).
        let before = mapped_bytes();
        for _ in 0..64 {
            drop(AtomicWords::zeroed(HUGE_PAGE / 8));
        }
        assert!(mapped_bytes() < before + (16 << 20));
    }

    /// The process's mapped bytes (`VmSize`).
    fn mapped_bytes() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kb: usize = status
            .lines()
            .find_map(|l| l.strip_prefix("VmSize:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb << 10
    }

    /// This thread's minor page faults so far.
    fn minor_faults() -> i64 {
        // SAFETY: `rusage` is plain integers, for which zeros are valid.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `getrusage` writes one `rusage` into the value given;
        // RUSAGE_THREAD (Linux) is for the calling thread.
        let ok = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
        assert_eq!(ok, 0);
        usage.ru_minflt
    }

    #[test]
    fn writing_a_large_table_does_not_fault_page_by_page() {
        let words = AtomicWords::zeroed(HUGE_PAGE / 4);
        let before = minor_faults();
        for w in words.iter().step_by(512) {
            w.store(1, Ordering::Relaxed);
        }
        let faults = minor_faults() - before;
        // 1024 pages of 4 KiB: one fault each if left to first touch.
        assert!(faults < 16, "{faults} faults writing a 4 MiB table");
    }

    #[test]
    fn tables_are_shared_across_threads() {
        let words = std::sync::Arc::new(AtomicWords::zeroed(HUGE_PAGE / 8));
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let words = words.clone();
                std::thread::spawn(move || {
                    for i in (t..words.len()).step_by(4) {
                        words[i].fetch_add(i as u64, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(words
            .iter()
            .enumerate()
            .all(|(i, w)| w.load(Ordering::Relaxed) == i as u64));
    }
}
