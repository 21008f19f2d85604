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
    eprintln!("SKIP {test}: {why}");
}
