//! Shared test subjects: a dirty log plus something that writes the memory
//! it tracks (a real KVM guest or a real child process).
#![allow(dead_code)]

pub mod child;
pub mod kvm;

use ferry_dirtylog::DirtyLog;

/// Reads the first word of a page of the workload's memory.
pub type PageReader<'a> = &'a dyn Fn(usize) -> u64;
/// What runs while a workload spins: collect rounds, reading pages.
pub type Collector<'a> = &'a mut dyn FnMut(PageReader<'_>);

/// Writes pages of the memory a dirty log tracks.
pub trait Workload {
    /// Pages of tracked memory.
    fn pages(&self) -> usize;
    /// Writes `value` into each of `pages` once; returns when done.
    fn write(&mut self, pages: &[usize], value: u64) -> anyhow::Result<()>;
    /// Writes `pages` over and over (value +1 per pass) while `during` runs
    /// with a reader of the first word of a page; returns the passes made.
    fn spin_while(
        &mut self,
        pages: &[usize],
        value: u64,
        during: Collector<'_>,
    ) -> anyhow::Result<u64>;
    /// First word of `page`, as it is now.
    fn read_word(&self, page: usize) -> u64;
}

/// A dirty log and the workload whose writes it must see.
pub struct Subject {
    pub log: Box<dyn DirtyLog>,
    pub work: Box<dyn Workload>,
}

/// Prints a loud SKIP line (tests never pass quietly without what they need).
pub fn skip(test: &str, why: &str) {
    assert!(
        std::env::var_os("FERRY_NO_SKIP").is_none(),
        "FERRY_NO_SKIP is set, so this test may not skip"
    );
    eprintln!("SKIP {test}: {why}");
}

/// Whether this kernel offers userfaultfd async write-protect (Linux ≥ 6.7);
/// prints a loud SKIP for `test` when it does not.
pub fn uffd_wp_async_or_skip(test: &str) -> bool {
    let len = 4096;
    // SAFETY: fresh anonymous mapping, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let range = ferry_dirtylog::MemoryRange {
        start: p as u64,
        len: len as u64,
    };
    let result = ferry_dirtylog::ProcessMemoryLog::for_self(vec![range]).map(drop);
    // SAFETY: unmaps the page mapped above (the log is dropped).
    unsafe { libc::munmap(p, len) };
    match result {
        Ok(()) => true,
        Err(
            e @ (ferry_dirtylog::DirtyLogError::UffdApi(_)
            | ferry_dirtylog::DirtyLogError::CreateUserfaultfd(_)),
        ) => {
            skip(
                test,
                &format!("no userfaultfd async write-protect here: {e}"),
            );
            false
        }
        Err(e) => panic!("{test}: probing userfaultfd failed: {e}"),
    }
}
