//! Dirty tracking with the real workload guest, for every KVM backend:
//! nothing the guest (or the VMM) writes goes unreported.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_dirtylog::{DirtyBitmap, DirtyLog, Reprotect};
use ferry_vm::testing::kvm_or_skip;
use ferry_vm::{DirtyBackend, Vm, VmConfig, FILL_BASE};
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 32 << 20;
const PAGE: usize = 4096;

fn backends() -> [DirtyBackend; 2] {
    // A small ring (4096 entries) fills often: the ring-full path runs too.
    [DirtyBackend::Bitmap, DirtyBackend::Ring(64 << 10)]
}

fn boot(dirty: DirtyBackend, cmdline: &str) -> Vm {
    let vm = Vm::boot(&VmConfig {
        mem_bytes: MEM,
        kernel: None,
        cmdline: cmdline.into(),
        dirty,
        cpus: 1,
    })
    .unwrap();
    vm.wait_running(Duration::from_secs(60)).unwrap();
    vm
}

fn snapshot(vm: &Vm) -> Vec<u8> {
    let mut buf = vec![0u8; MEM as usize];
    vm.memory().read_slice(&mut buf, GuestAddress(0)).unwrap();
    buf
}

fn changed_pages(a: &[u8], b: &[u8]) -> BTreeSet<usize> {
    a.chunks(PAGE)
        .zip(b.chunks(PAGE))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect()
}

fn collect(log: &mut dyn DirtyLog) -> BTreeSet<usize> {
    let mut bm = DirtyBitmap::new(log.pages());
    log.collect(&mut bm, Reprotect::Now).unwrap();
    bm.iter_ones().collect()
}

/// Pause, collect, snapshot, run, pause, collect, snapshot: every page that
/// changed must be reported.
fn nothing_missed(dirty: DirtyBackend) {
    let vm = boot(dirty, "rate=20000 tsc_khz=2300000 wss=4 verify=16");
    let mut log = vm.dirty_log().unwrap();
    log.start().unwrap();
    for _ in 0..3 {
        vm.pause().unwrap();
        collect(&mut *log);
        let before = snapshot(&vm);
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(150));
        vm.pause().unwrap();
        let reported = collect(&mut *log);
        let after = snapshot(&vm);
        vm.resume().unwrap();
        let changed = changed_pages(&before, &after);
        assert!(
            changed.len() > 100,
            "the guest should have dirtied pages: {}",
            changed.len()
        );
        let missed: Vec<_> = changed.difference(&reported).collect();
        assert!(
            missed.is_empty(),
            "{:?}: pages changed but not reported: {missed:?}",
            dirty
        );
        // Nothing outside what the guest can write: low pages (status block,
        // stacks, image data) and the 4 MiB working set from 2 MiB.
        let wss_end = (FILL_BASE as usize + (4 << 20)) / PAGE;
        let stray: Vec<_> = reported.iter().filter(|&&p| p >= wss_end).collect();
        assert!(
            stray.is_empty(),
            "{dirty:?}: reported pages the guest never writes: {stray:?}"
        );
    }
}

/// Collect while the guest runs, read memory right after: a write that
/// lands after the collect must show up in the next round.
fn racing_write_caught_next_round(dirty: DirtyBackend) {
    let vm = boot(dirty, "rate=max wss=1 verify=0");
    let mut log = vm.dirty_log().unwrap();
    log.start().unwrap();
    collect(&mut *log);
    for _ in 0..5 {
        collect(&mut *log); // guest keeps running: writes race with this
        let read_after_collect = snapshot(&vm);
        std::thread::sleep(Duration::from_millis(20));
        vm.pause().unwrap();
        let next = collect(&mut *log);
        let now = snapshot(&vm);
        vm.resume().unwrap();
        let changed = changed_pages(&read_after_collect, &now);
        assert!(!changed.is_empty());
        let missed: Vec<_> = changed.difference(&next).collect();
        assert!(
            missed.is_empty(),
            "{dirty:?}: a write after the collect was lost: {missed:?}"
        );
    }
}

/// Pages the VMM writes into guest memory are tracked (KVM does not log them).
fn vmm_writes_tracked(dirty: DirtyBackend) {
    let vm = boot(dirty, "rate=0 verify=0");
    let mut log = vm.dirty_log().unwrap();
    log.start().unwrap();
    collect(&mut *log);
    vm.pause().unwrap();
    collect(&mut *log);
    let page = 0x5000u64; // below 2 MiB, never written by the guest
    vm.memory()
        .write_obj(0xfeed_u64, GuestAddress(page))
        .unwrap();
    let reported = collect(&mut *log);
    assert!(
        reported.contains(&((page as usize) / PAGE)),
        "{dirty:?}: VMM write not reported: {reported:?}"
    );
}

/// With a tiny working set rewritten many times per interval, both backends
/// must report exactly the same pages (the ring may repeat entries, the set agrees).
#[test]
fn ring_and_bitmap_agree() {
    if !kvm_or_skip(module_path!()) {
        return;
    }
    let mut sets = Vec::new();
    for dirty in backends() {
        let vm = boot(dirty, "rate=max wss=256K verify=0");
        let mut log = vm.dirty_log().unwrap();
        log.start().unwrap();
        collect(&mut *log);
        std::thread::sleep(Duration::from_millis(100));
        vm.pause().unwrap();
        collect(&mut *log);
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        vm.pause().unwrap();
        let set: BTreeSet<usize> = collect(&mut *log)
            .into_iter()
            .filter(|&p| p >= FILL_BASE as usize / PAGE)
            .collect();
        sets.push(set);
    }
    let wss: BTreeSet<usize> =
        (FILL_BASE as usize / PAGE..FILL_BASE as usize / PAGE + 64).collect();
    assert_eq!(sets[0], wss, "bitmap");
    assert_eq!(sets[1], wss, "ring");
}

#[test]
fn bitmap_misses_nothing() {
    if kvm_or_skip(module_path!()) {
        nothing_missed(DirtyBackend::Bitmap);
    }
}

#[test]
fn ring_misses_nothing() {
    if kvm_or_skip(module_path!()) {
        nothing_missed(DirtyBackend::Ring(64 << 10));
    }
}

#[test]
fn bitmap_catches_racing_writes() {
    if kvm_or_skip(module_path!()) {
        racing_write_caught_next_round(DirtyBackend::Bitmap);
    }
}

#[test]
fn ring_catches_racing_writes() {
    if kvm_or_skip(module_path!()) {
        racing_write_caught_next_round(DirtyBackend::Ring(64 << 10));
    }
}

#[test]
fn vmm_writes_are_tracked_with_every_backend() {
    if kvm_or_skip(module_path!()) {
        for dirty in backends() {
            vmm_writes_tracked(dirty);
        }
    }
}

/// A second dirty log (a migration retried after a failure) works with the
/// ring too, and misses nothing written after the first one stopped.
#[test]
fn a_second_ring_log_after_the_first_stopped() {
    if !kvm_or_skip("a_second_ring_log_after_the_first_stopped") {
        return;
    }
    let vm = boot(
        DirtyBackend::Ring(64 << 10),
        "rate=20000 tsc_khz=2300000 wss=4 verify=16",
    );
    let mut first = vm.dirty_log().unwrap();
    first.start().unwrap();
    collect(&mut *first);
    first.stop().unwrap();
    drop(first);
    let mut second = vm.dirty_log().unwrap();
    second.start().unwrap();
    vm.pause().unwrap();
    collect(&mut *second);
    let before = snapshot(&vm);
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(150));
    vm.pause().unwrap();
    let reported = collect(&mut *second);
    let changed = changed_pages(&before, &snapshot(&vm));
    assert!(changed.len() > 100);
    let missed: Vec<_> = changed.difference(&reported).collect();
    assert!(missed.is_empty(), "second ring log missed {missed:?}");
}

/// A guest over 3 GiB has RAM below the 3-4 GiB hole and above 4 GiB, one
/// KVM slot each: the guest finds both ranges (multiboot memory map), its
/// dirty loop writes on both sides of the hole, and every backend reports
/// those writes in both slots, nothing in the hole.
fn dirties_across_the_hole(dirty: DirtyBackend) {
    const GIB: u64 = 1 << 30;
    // No fill: only the pages the loop writes are ever backed.
    let vm = Vm::boot(&VmConfig {
        mem_bytes: 4 * GIB,
        kernel: None,
        cmdline: "fill=0 rate=20000 tsc_khz=2300000 wss=all verify=0".into(),
        dirty,
        cpus: 1,
    })
    .unwrap();
    let st = vm.wait_running(Duration::from_secs(60)).unwrap();
    assert_eq!(st.ram_ranges, 2, "{st:?}");
    assert_eq!(st.ram[0], (FILL_BASE, 3 * GIB), "RAM below the hole");
    assert_eq!(st.ram[1], (4 * GIB, 5 * GIB), "RAM above the hole");
    assert_eq!(st.mem_top, 5 * GIB);
    assert_eq!(st.wss_pages, (4 * GIB - FILL_BASE) / PAGE as u64);
    let mut log = vm.dirty_log().unwrap();
    log.start().unwrap();
    assert_eq!(
        log.pages() as u64,
        5 * GIB / PAGE as u64,
        "page index space"
    );
    // Enough writes that both sides of the hole are hit many times over
    // (the loop's stride spreads them across the working set), however
    // slowly a loaded machine runs the guest: counted, not timed.
    let first = vm.status().pages_dirtied;
    let start = std::time::Instant::now();
    while vm.status().pages_dirtied < first + 8_000 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{dirty:?}: the guest wrote {} pages in 120 s",
            vm.status().pages_dirtied - first
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.pause().unwrap();
    let reported = collect(&mut *log);
    let page = |addr: u64| (addr / PAGE as u64) as usize;
    let low = reported
        .iter()
        .filter(|&&p| (page(FILL_BASE)..page(3 * GIB)).contains(&p))
        .count();
    let high = reported.iter().filter(|&&p| p >= page(4 * GIB)).count();
    let hole = reported
        .iter()
        .filter(|&&p| (page(3 * GIB)..page(4 * GIB)).contains(&p))
        .count();
    assert!(
        low > 100 && high > 100,
        "{dirty:?}: writes below ({low}) and above ({high}) the hole"
    );
    assert_eq!(hole, 0, "{dirty:?}: pages reported in the hole");
    // What the log reported above the hole is what the guest wrote there.
    let p = *reported.iter().next_back().unwrap() as u64 * PAGE as u64;
    let mut buf = [0u8; PAGE];
    vm.memory().read_slice(&mut buf, GuestAddress(p)).unwrap();
    assert!(
        buf.iter().any(|&b| b != 0),
        "{dirty:?}: page {p:#x} is blank"
    );
}

#[test]
fn both_backends_log_writes_on_both_sides_of_the_hole() {
    if kvm_or_skip(module_path!()) {
        for dirty in backends() {
            dirties_across_the_hole(dirty);
        }
    }
}
