//! Cost of one collect-and-iterate pass over 1 GiB of guest memory, per
//! dirty-log backend, at 0 %, 1 %, 10 % and 100 % of pages dirty.
//!
//! The dirty pages are real KVM dirty tracking: before each timed pass the
//! guest of `ferry_dirtylog::test_guest` (64-bit ring 3, one vCPU) writes
//! the chosen pages (every 100th page for 1 %, every 10th for 10 %, all for
//! 100 %); that write is not timed. The timed part is `collect(Now)` (fetch +
//! re-protect) plus iterating the set bits. For the ring, harvesting done on
//! `KVM_EXIT_DIRTY_RING_FULL` exits while the guest wrote (a 1 MiB ring holds
//! 64 Ki entries, fewer than 1 GiB's 256 Ki pages) is added to the time.
//!
//! Rows: `kvm-bitmap` (GET_DIRTY_LOG), `kvm-bitmap-manual` (GET + CLEAR in
//! 128 MiB chunks), `kvm-bitmap-manual-never` (GET only: the stopped final
//! round), `kvm-ring` (1 MiB ring), `process-uffd-wp` (1 GiB of this
//! process's memory written by the host), and `baseline-iterate` (iterating a
//! bitmap with the same bits, no kernel call).
//!
//! Run: `cargo bench -p ferry-benches --bench dirtylog_collect`
//! (needs /dev/kvm; says SKIP otherwise). 100 % dirty takes ~6 s of guest
//! writing per pass under nested PVM KVM, so samples are few.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use ferry_dirtylog::test_guest::{TestGuestError, TestVm, Tracking};
use ferry_dirtylog::{DirtyBitmap, DirtyLog, MemoryRange, ProcessMemoryLog, Reprotect, PAGE_SIZE};

const GIB: u64 = 1 << 30;
const PAGES: usize = (GIB / PAGE_SIZE) as usize;
const PERCENTS: [usize; 4] = [0, 1, 10, 100];

fn dirty_set(percent: usize) -> Vec<usize> {
    match percent {
        0 => Vec::new(),
        p => (0..PAGES).step_by(100 / p).collect(),
    }
}

/// Measurement time per dirty level, so 100 % stays at ~10 passes.
fn measurement_time(percent: usize) -> Duration {
    Duration::from_millis(match percent {
        0 => 200,
        1 => 20,
        _ => 10,
    })
}

/// Times `collect(mode)` + iteration; checks the count (untimed).
fn timed_collect(
    log: &mut dyn DirtyLog,
    out: &mut DirtyBitmap,
    mode: Reprotect,
    expect: usize,
) -> Duration {
    out.clear();
    let t0 = Instant::now();
    log.collect(out, mode).expect("collect");
    black_box(out.iter_ones().fold(0usize, |a, p| a ^ p));
    let t = t0.elapsed();
    assert_eq!(out.count_ones(), expect, "{}: dirty count", log.name());
    t
}

fn kvm_backends(c: &mut Criterion) {
    let mut group = c.benchmark_group("dirtylog_collect_1GiB");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1));
    for tracking in [
        Tracking::Bitmap,
        Tracking::BitmapManualProtect,
        Tracking::Ring(1 << 20),
    ] {
        let mut vm = match TestVm::new(GIB, tracking) {
            Ok(vm) => vm,
            Err(TestGuestError::NoKvm(e)) => {
                eprintln!("SKIP dirtylog_collect KVM rows: no usable /dev/kvm ({e})");
                return;
            }
            Err(e) => panic!("test VM: {e:?}"),
        };
        let mut log = vm.take_dirty_log().expect("log");
        log.start().expect("start");
        let mut out = DirtyBitmap::new(log.pages());
        let name = log.name();
        for percent in PERCENTS {
            let pages = dirty_set(percent);
            group.measurement_time(measurement_time(percent));
            group.bench_function(BenchmarkId::new(name, format!("{percent}%")), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for i in 0..iters {
                        vm.write_pages(&pages, i, 1).expect("guest write");
                        let early = std::mem::take(&mut vm.ring_full_time);
                        total +=
                            early + timed_collect(&mut *log, &mut out, Reprotect::Now, pages.len());
                    }
                    total
                })
            });
        }
        if tracking == Tracking::BitmapManualProtect {
            // Final, stopped round: GET only. The pages stay dirty, so one
            // guest write serves every pass.
            let pages = dirty_set(100);
            vm.write_pages(&pages, 1, 1).expect("guest write");
            group.measurement_time(Duration::from_millis(200));
            group.bench_function(BenchmarkId::new("kvm-bitmap-manual-never", "100%"), |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| timed_collect(&mut *log, &mut out, Reprotect::Never, pages.len()))
                        .sum()
                })
            });
        }
    }
    group.finish();
}

fn process_and_baseline(c: &mut Criterion) {
    let mut group = c.benchmark_group("dirtylog_collect_1GiB");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1));
    // SAFETY: fresh anonymous mapping, checked below, unmapped at the end.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            GIB as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(mem, libc::MAP_FAILED, "mmap 1 GiB");
    let base = mem.cast::<u64>();
    let range = MemoryRange {
        start: mem as u64,
        len: GIB,
    };
    let mut log = ProcessMemoryLog::for_self(vec![range]).expect("process log");
    log.start().expect("start");
    let mut out = DirtyBitmap::new(PAGES);
    for percent in PERCENTS {
        let pages = dirty_set(percent);
        group.measurement_time(Duration::from_millis(200));
        group.bench_function(
            BenchmarkId::new("process-uffd-wp", format!("{percent}%")),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for i in 0..iters {
                        for &p in &pages {
                            // SAFETY: p < PAGES, inside the 1 GiB mapping.
                            let word = unsafe { base.add(p * (PAGE_SIZE as usize) / 8) };
                            // SAFETY: mapped, writable, aligned.
                            unsafe { word.write_volatile(i) };
                        }
                        total += timed_collect(&mut log, &mut out, Reprotect::Now, pages.len());
                    }
                    total
                })
            },
        );
        let mut marked = DirtyBitmap::new(PAGES);
        pages.iter().for_each(|&p| marked.set(p));
        group.bench_function(
            BenchmarkId::new("baseline-iterate", format!("{percent}%")),
            |b| b.iter(|| black_box(marked.iter_ones().fold(0usize, |a, p| a ^ p))),
        );
    }
    drop(log);
    // SAFETY: unmaps the mapping made above; nothing refers to it now.
    unsafe { libc::munmap(mem, GIB as usize) };
    group.finish();
}

criterion_group!(benches, kvm_backends, process_and_baseline);
criterion_main!(benches);
