//! The `DirtyLog` conformance suite, run against every backend that runs
//! here: KVM bitmap, KVM bitmap with manual protect, KVM dirty ring (real
//! guests writing real pages), and process memory (a real child process).
//! Each `#[test]` is a thin wrapper over one parameterised check.

mod common;

use std::collections::BTreeSet;

use common::{child, kvm, Subject};
use ferry_dirtylog::test_guest::Tracking;
use ferry_dirtylog::{DirtyBitmap, DirtyLogError, Reprotect};

/// Pages of the child process's region (the KVM subjects have 8 MiB = 2048 too).
const CHILD_PAGES: usize = 2048;

/// Word-edge pages plus a scattered spread, all inside 2048 pages.
fn known_pages() -> Vec<usize> {
    let mut set: BTreeSet<usize> = [0, 1, 63, 64, 65, 127, 128, 1023, 1024, 2047].into();
    set.extend((0..40).map(|i| (i * 389 + 7) % 2048));
    set.into_iter().collect()
}

fn collect_set(s: &mut Subject, mode: Reprotect) -> BTreeSet<usize> {
    let mut out = DirtyBitmap::new(s.log.pages());
    s.log.collect(&mut out, mode).expect("collect");
    out.iter_ones().collect()
}

fn as_set(pages: &[usize]) -> BTreeSet<usize> {
    pages.iter().copied().collect()
}

/// A known set of written pages is reported, nothing missed (and, since
/// nothing else writes the tracked memory, nothing more); a second collect
/// with no writes in between reports nothing.
fn reports_the_written_pages(mut s: Subject) {
    let pages = known_pages();
    s.log.start().expect("start");
    s.work.write(&pages, 0x1111).expect("write");
    assert_eq!(
        collect_set(&mut s, Reprotect::Now),
        as_set(&pages),
        "{}",
        s.log.name()
    );
    assert_eq!(
        collect_set(&mut s, Reprotect::Now),
        BTreeSet::new(),
        "{}",
        s.log.name()
    );
}

/// A page written again after it was collected is reported again in the next
/// round; pages not written again are not.
fn write_after_collect_is_caught_next_round(mut s: Subject) {
    let first = known_pages();
    let second: Vec<usize> = first.iter().copied().step_by(3).chain([5, 700]).collect();
    s.log.start().expect("start");
    s.work.write(&first, 1).expect("write");
    assert_eq!(collect_set(&mut s, Reprotect::Now), as_set(&first));
    s.work.write(&second, 2).expect("write");
    assert_eq!(
        collect_set(&mut s, Reprotect::Now),
        as_set(&second),
        "{}",
        s.log.name()
    );
}

/// `Deferred` + `reprotect` chunk by chunk behaves like `Now`.
fn deferred_reprotect_rearms_the_chunks(mut s: Subject) {
    let first = known_pages();
    let second = vec![2, 64, 1500];
    s.log.start().expect("start");
    s.work.write(&first, 1).expect("write");
    let mut out = DirtyBitmap::new(s.log.pages());
    s.log
        .collect(&mut out, Reprotect::Deferred)
        .expect("collect");
    assert_eq!(out.iter_ones().collect::<BTreeSet<_>>(), as_set(&first));
    rearm_then_catch(&mut s, &out, &second);
}

/// Re-protects the chunks of `pass` (4 words, 256 pages at a time, as a
/// deferred pass does), writes `second`, and checks that the next collect
/// reports exactly `second`.
fn rearm_then_catch(s: &mut Subject, pass: &DirtyBitmap, second: &[usize]) {
    for (i, chunk) in pass.words().chunks(4).enumerate() {
        s.log.reprotect(i * 256, chunk).expect("reprotect");
    }
    s.work.write(second, 2).expect("write");
    assert_eq!(
        collect_set(s, Reprotect::Now),
        as_set(second),
        "{}",
        s.log.name()
    );
}

/// `start_full_pass`, then a first pass that reads every page chunk by
/// chunk after re-protecting it: the first collect reports at least the
/// pages written before it (it may report every page), and after the pass
/// exactly the pages written since their chunk was re-protected.
fn a_full_pass_start_misses_nothing(mut s: Subject) {
    let first = known_pages();
    let second = vec![2, 64, 1500];
    s.log.start_full_pass().expect("start_full_pass");
    s.work.write(&first, 1).expect("write");
    let mut out = DirtyBitmap::new(s.log.pages());
    s.log
        .collect(&mut out, Reprotect::Deferred)
        .expect("collect");
    let reported = out.iter_ones().collect::<BTreeSet<_>>();
    assert!(reported.is_superset(&as_set(&first)), "{}", s.log.name());
    // The pass: every page, chunk by chunk.
    let mut all = DirtyBitmap::new(s.log.pages());
    all.set_range(0, s.log.pages());
    rearm_then_catch(&mut s, &all, &second);
}

/// `Never` (final round) still reports every written page.
fn never_still_reports(mut s: Subject) {
    let pages = known_pages();
    s.log.start().expect("start");
    s.work.write(&pages, 7).expect("write");
    assert_eq!(
        collect_set(&mut s, Reprotect::Never),
        as_set(&pages),
        "{}",
        s.log.name()
    );
}

/// Pre-copy with writes racing the collection: while the writer rewrites a
/// set of pages nonstop, collect round after round and copy each reported
/// page into a shadow (after collect returned, i.e. after re-protecting);
/// then stop the writer, collect once more and copy. The shadow must equal
/// the memory: a write missed by any round would leave a stale word.
fn racing_writes_are_never_lost(mut s: Subject) {
    let pages: Vec<usize> = (0..64).map(|i| (i * 97 + 3) % 2048).collect();
    let mut shadow = vec![0u64; s.work.pages()];
    s.log.start().expect("start");
    let log = &mut s.log;
    let mut rounds_with_pages = 0;
    let passes = s
        .work
        .spin_while(&pages, 1 << 32, &mut |read| {
            for _ in 0..30 {
                let mut out = DirtyBitmap::new(log.pages());
                log.collect(&mut out, Reprotect::Now).expect("collect");
                rounds_with_pages += usize::from(out.count_ones() > 0);
                for p in out.iter_ones() {
                    shadow[p] = read(p);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        })
        .expect("spin");
    let mut out = DirtyBitmap::new(log.pages());
    log.collect(&mut out, Reprotect::Never)
        .expect("final collect");
    for p in out.iter_ones() {
        shadow[p] = s.work.read_word(p);
    }
    assert!(passes >= 1, "the writer made no full pass");
    assert!(rounds_with_pages >= 1, "no round saw the racing writes");
    for &p in &pages {
        assert_eq!(
            shadow[p],
            s.work.read_word(p),
            "{}: page {p} stale",
            s.log.name()
        );
        assert!(s.work.read_word(p) >= 1 << 32, "page {p} never written");
    }
}

/// A backend that counts pages per vCPU (the dirty ring: the test guest
/// has one vCPU, which does every write) accounts for every page it
/// reported, and a second take finds nothing new; the others say `None`.
fn vcpu_counts_account_for_the_reported_pages(mut s: Subject) {
    let pages = known_pages();
    s.log.start().expect("start");
    s.work.write(&pages, 0x2222).expect("write");
    let mut out = DirtyBitmap::new(s.log.pages());
    let stats = s.log.collect(&mut out, Reprotect::Now).expect("collect");
    let counts = s.log.take_vcpu_dirty_counts();
    if s.log.name() != "kvm-ring" {
        assert_eq!(counts, None, "{}", s.log.name());
        return;
    }
    let counts = counts.expect("the dirty ring counts per vCPU");
    assert_eq!(counts.len(), 1, "one vCPU, one count: {counts:?}");
    assert!(
        counts[0] >= pages.len() as u64,
        "{counts:?} for {} pages",
        pages.len()
    );
    assert_eq!(counts[0], stats.reported as u64, "{stats:?}");
    assert_eq!(s.log.take_vcpu_dirty_counts(), Some(vec![0]));
}

/// Misuse is refused with a clear error, nothing changed.
fn misuse_is_refused(mut s: Subject) {
    let mut out = DirtyBitmap::new(s.log.pages());
    assert!(matches!(
        s.log.collect(&mut out, Reprotect::Now),
        Err(DirtyLogError::NotStarted)
    ));
    s.log.start().expect("start");
    let mut wrong = DirtyBitmap::new(s.log.pages() + 1);
    let err = s.log.collect(&mut wrong, Reprotect::Now).unwrap_err();
    assert!(matches!(err, DirtyLogError::BitmapSize { .. }), "{err}");
}

macro_rules! suite {
    ($($check:ident),*) => {
        mod kvm_bitmap {
            use super::*;
            $(#[test] fn $check() {
                if let Some(s) = kvm::subject(stringify!($check), Tracking::Bitmap) { super::$check(s) }
            })*
        }
        mod kvm_bitmap_manual_protect {
            use super::*;
            $(#[test] fn $check() {
                if let Some(s) = kvm::subject(stringify!($check), Tracking::BitmapManualProtect) { super::$check(s) }
            })*
        }
        mod kvm_ring {
            use super::*;
            $(#[test] fn $check() {
                if let Some(s) = kvm::subject(stringify!($check), Tracking::Ring(64 * 1024)) { super::$check(s) }
            })*
        }
        /// Two KVM slots cut at 4 MiB (page 1024, between 1023 and 1024 of
        /// the known pages): slot-to-page mapping and chunked clears across slots.
        mod kvm_bitmap_manual_protect_two_slots {
            use super::*;
            $(#[test] fn $check() {
                if let Some(s) = kvm::subject_split(stringify!($check), Tracking::BitmapManualProtect, Some(4 << 20)) { super::$check(s) }
            })*
        }
        mod kvm_ring_two_slots {
            use super::*;
            $(#[test] fn $check() {
                if let Some(s) = kvm::subject_split(stringify!($check), Tracking::Ring(64 * 1024), Some(4 << 20)) { super::$check(s) }
            })*
        }
        mod process_child {
            use super::*;
            $(#[test] fn $check() {
                if common::uffd_wp_async_or_skip(stringify!($check)) {
                    super::$check(child::subject(CHILD_PAGES).expect("child process subject"))
                }
            })*
        }
    };
}

suite!(
    reports_the_written_pages,
    vcpu_counts_account_for_the_reported_pages,
    write_after_collect_is_caught_next_round,
    deferred_reprotect_rearms_the_chunks,
    a_full_pass_start_misses_nothing,
    never_still_reports,
    racing_writes_are_never_lost,
    misuse_is_refused
);
