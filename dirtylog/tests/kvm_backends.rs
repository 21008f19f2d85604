//! KVM-specific behaviour beyond the shared suite: ring and bitmap agree,
//! ring-full exits, VMM writes, manual-protect deferral, error paths.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::kvm::{test_vm, TEST_MEM};
use ferry_dirtylog::test_guest::Tracking;
use ferry_dirtylog::{
    enable_dirty_ring, DirtyBitmap, DirtyLog, DirtyLogError, KvmBitmapLog, MemorySlot, Reprotect,
    VmmWriteLog, WithVmmWrites,
};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

fn collect(log: &mut dyn DirtyLog, mode: Reprotect) -> BTreeSet<usize> {
    let mut out = DirtyBitmap::new(log.pages());
    log.collect(&mut out, mode).expect("collect");
    out.iter_ones().collect()
}

/// A page list with repeats and an order that jumps around.
fn scattered(n: usize, modulo: usize) -> Vec<usize> {
    (0..n).map(|i| (i * 7919 + 13) % modulo).collect()
}

/// The ring and the bitmap report the same set for the same guest writes;
/// with a 4 KiB ring (256 entries, full exit ~64 before the end) 1500 writes
/// force several KVM_EXIT_DIRTY_RING_FULL exits, handled by the pending bitmap.
#[test]
fn ring_and_bitmap_agree_across_ring_full_exits() {
    let pages = scattered(1500, 2048);
    let mut seen = Vec::new();
    for tracking in [
        Tracking::Bitmap,
        Tracking::BitmapManualProtect,
        Tracking::Ring(4096),
    ] {
        let Some(mut vm) = test_vm("ring_and_bitmap_agree", TEST_MEM, tracking) else {
            return;
        };
        let mut log = vm.take_dirty_log().unwrap();
        log.start().unwrap();
        let runs_before = vm.runs;
        vm.write_pages(&pages, 9, 1).unwrap();
        if tracking == Tracking::Ring(4096) {
            assert!(
                vm.runs - runs_before > 3,
                "expected ring-full exits, got {} runs",
                vm.runs - runs_before
            );
        }
        seen.push((tracking, collect(&mut *log, Reprotect::Now)));
    }
    let want: BTreeSet<usize> = pages.iter().copied().collect();
    for (tracking, got) in &seen {
        assert_eq!(got, &want, "{tracking:?}");
    }
}

/// Ring reports may repeat a page; `reported` counts them all, the bitmap
/// holds each once.
#[test]
fn ring_counts_every_report() {
    let Some(mut vm) = test_vm("ring_counts_every_report", TEST_MEM, Tracking::Ring(4096)) else {
        return;
    };
    let mut log = vm.take_dirty_log().unwrap();
    log.start().unwrap();
    let pages = scattered(600, 2048);
    vm.write_pages(&pages, 1, 1).unwrap();
    let mut out = DirtyBitmap::new(log.pages());
    let stats = log.collect(&mut out, Reprotect::Now).unwrap();
    let distinct: BTreeSet<usize> = pages.iter().copied().collect();
    assert_eq!(out.count_ones(), distinct.len());
    assert!(stats.reported >= distinct.len(), "{stats:?}");
}

/// Clones of a ring log share the read positions: a clone collecting after
/// the original sees exactly the writes made since, nothing older, nothing lost.
#[test]
fn ring_clones_continue_where_the_other_stopped() {
    let Some(mut vm) = test_vm("ring_clones", TEST_MEM, Tracking::Ring(4096)) else {
        return;
    };
    let mut first = vm.take_dirty_log().unwrap();
    first.start().unwrap();
    let mut second = vm.ring_log().unwrap();
    second.start().unwrap();
    vm.write_pages(&scattered(300, 2048), 1, 1).unwrap();
    assert_eq!(
        collect(&mut *first, Reprotect::Now),
        scattered(300, 2048).into_iter().collect()
    );
    vm.write_pages(&[7, 8], 2, 1).unwrap();
    assert_eq!(collect(&mut second, Reprotect::Now), BTreeSet::from([7, 8]));
    vm.write_pages(&[9], 3, 1).unwrap();
    assert_eq!(collect(&mut *first, Reprotect::Now), BTreeSet::from([9]));
}

/// KVM does not log writes the VMM makes through its own mapping;
/// `WithVmmWrites` adds them from an explicitly marked `VmmWriteLog`.
#[test]
fn vmm_writes_are_tracked_with_a_vmm_write_log() {
    for tracking in [
        Tracking::Bitmap,
        Tracking::BitmapManualProtect,
        Tracking::Ring(65536),
    ] {
        let Some(mut vm) = test_vm("vmm_writes_vmm_write_log", TEST_MEM, tracking) else {
            return;
        };
        let inner = vm.take_dirty_log().unwrap();
        let marks = Arc::new(VmmWriteLog::new(inner.pages()));
        let mut log = WithVmmWrites::new(inner, marks.clone());
        log.start().unwrap();

        let guest = [3usize, 64, 900];
        let host = [10usize, 64, 1999];
        vm.write_pages(&guest, 5, 1).unwrap();
        for &p in &host {
            vm.memory().host_write(p, 0xabc);
            marks.mark(p);
        }
        let want: BTreeSet<usize> = guest.iter().chain(&host).copied().collect();
        assert_eq!(collect(&mut log, Reprotect::Now), want, "{tracking:?}");

        // The same host writes, unmarked: KVM alone misses them.
        for &p in &host {
            vm.memory().host_write(p, 0xdef);
        }
        assert_eq!(
            collect(&mut log, Reprotect::Now),
            BTreeSet::new(),
            "{tracking:?}: KVM logged a host write?"
        );
        assert_eq!(vm.memory().read_host_word(1999), 0xdef);
    }
}

/// A VMM that writes guest memory through vm-memory's `Bytes` API with an
/// `AtomicBitmap` gets its writes tracked with no explicit marking.
#[test]
fn vmm_writes_are_tracked_through_vm_memory_atomic_bitmap() {
    let Some(mut vm) = test_vm(
        "vmm_writes_vm_memory",
        TEST_MEM,
        Tracking::BitmapManualProtect,
    ) else {
        return;
    };
    let mem = vm.memory().clone();
    // SAFETY: the test VM's tracked memory stays mapped while `vm` lives,
    // which outlives `gm` (dropped at the end of this test, before `vm`).
    let region = unsafe {
        MmapRegion::<AtomicBitmap>::build_raw(
            mem.host_addr(),
            TEST_MEM as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        )
    }
    .unwrap();
    let gm =
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap();

    let inner = vm.take_dirty_log().unwrap();
    let mut log = WithVmmWrites::new(inner, gm.clone());
    log.start().unwrap();
    vm.write_pages(&[1, 2], 5, 1).unwrap();
    gm.write_obj(0x1234_5678u64, GuestAddress(700 * 4096 + 16))
        .unwrap();
    gm.write_slice(&[7u8; 8192], GuestAddress(1000 * 4096 + 100))
        .unwrap();
    assert_eq!(
        collect(&mut log, Reprotect::Now),
        BTreeSet::from([1, 2, 700, 1000, 1001, 1002])
    );
    assert_eq!(collect(&mut log, Reprotect::Now), BTreeSet::new());
}

/// Manual protect really defers: without `reprotect`, pages collected with
/// `Deferred` stay dirty (reported again) and stay writable without faults
/// being logged anew; after `reprotect` only new writes show.
#[test]
fn manual_protect_deferred_keeps_pages_until_reprotected() {
    let Some(mut vm) = test_vm("manual_deferred", TEST_MEM, Tracking::BitmapManualProtect) else {
        return;
    };
    let mut log = vm.take_dirty_log().unwrap();
    log.start().unwrap();
    vm.write_pages(&[5, 130, 131], 1, 1).unwrap();
    let mut out = DirtyBitmap::new(log.pages());
    log.collect(&mut out, Reprotect::Deferred).unwrap();
    assert_eq!(
        collect(&mut *log, Reprotect::Deferred),
        BTreeSet::from([5, 130, 131])
    );
    // Re-protect only the chunk holding pages 128..191.
    log.reprotect(128, &out.words()[2..3]).unwrap();
    assert_eq!(collect(&mut *log, Reprotect::Deferred), BTreeSet::from([5]));
    vm.write_pages(&[131], 2, 1).unwrap();
    assert_eq!(collect(&mut *log, Reprotect::Now), BTreeSet::from([5, 131]));
}

#[test]
fn reprotect_rejects_unaligned_or_out_of_range_chunks() {
    let Some(mut vm) = test_vm("reprotect_range", TEST_MEM, Tracking::BitmapManualProtect) else {
        return;
    };
    let mut log = vm.take_dirty_log().unwrap();
    log.start().unwrap();
    let err = log.reprotect(3, &[1]).unwrap_err();
    assert!(
        matches!(err, DirtyLogError::ReprotectRange { first_page: 3, .. }),
        "{err}"
    );
    let err = log.reprotect(2048, &[1]).unwrap_err();
    assert!(matches!(err, DirtyLogError::ReprotectRange { .. }), "{err}");
}

#[test]
fn dirty_ring_after_vcpu_creation_is_refused() {
    let Some(vm) = test_vm("ring_after_vcpu", TEST_MEM, Tracking::Bitmap) else {
        return;
    };
    let err = enable_dirty_ring(vm.vm(), 65536).unwrap_err();
    assert!(matches!(err, DirtyLogError::EnableCap { .. }), "{err}");
    assert!(err.to_string().contains("before"), "{err}");
}

#[test]
fn bad_ring_size_is_refused() {
    let Some(vm) = test_vm("bad_ring_size", TEST_MEM, Tracking::Bitmap) else {
        return;
    };
    for bytes in [1000, 2048, 4 << 20] {
        let err = enable_dirty_ring(vm.vm(), bytes).unwrap_err();
        assert!(
            matches!(err, DirtyLogError::InvalidLayout(_)),
            "{bytes}: {err}"
        );
    }
}

#[test]
fn unknown_slot_fails_with_the_slot_named() {
    let Some(vm) = test_vm("unknown_slot", TEST_MEM, Tracking::Bitmap) else {
        return;
    };
    let slots = vec![MemorySlot {
        slot: 7,
        guest_phys_addr: 0,
        pages: 64,
    }];
    let mut log = KvmBitmapLog::new(vm.vm().clone(), slots, false).unwrap();
    let err = log.start().unwrap_err();
    assert!(
        matches!(err, DirtyLogError::GetDirtyLog { slot: 7, .. }),
        "{err}"
    );
}

#[test]
fn bad_slot_layouts_are_refused() {
    let Some(vm) = test_vm("bad_slots", TEST_MEM, Tracking::Bitmap) else {
        return;
    };
    let bad = [
        vec![],
        vec![MemorySlot {
            slot: 0,
            guest_phys_addr: 4096,
            pages: 64,
        }],
        vec![MemorySlot {
            slot: 0,
            guest_phys_addr: 0,
            pages: 0,
        }],
        vec![
            MemorySlot {
                slot: 0,
                guest_phys_addr: 0,
                pages: 128,
            },
            MemorySlot {
                slot: 1,
                guest_phys_addr: 256 * 1024,
                pages: 64,
            },
        ],
    ];
    for slots in bad {
        let err = KvmBitmapLog::new(vm.vm().clone(), slots.clone(), false).unwrap_err();
        assert!(
            matches!(err, DirtyLogError::InvalidLayout(_)),
            "{slots:?}: {err}"
        );
    }
}
