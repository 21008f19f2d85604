//! Raw pages leave straight from guest memory, so a write between their
//! hash and the kernel's copy tears them (`ferry_engine::protocol::TornPage`):
//! with a writer that keeps rewriting pages while they are sent, the
//! destination reports torn copies, the source sends them again, and the
//! migration ends with equal digests and equal pages.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{ensure, Result};
use common::{
    assert_alive, boot, kvm_or_skip, Destination, FrameFault, FrameRelay, HookedVm, VmHooks,
};
use ferry_engine::{
    DestinationOptions, MigratableVm, MigrationError, MigrationOptions, SourceMigration,
};
use ferry_transport::tcp;
use vm_memory::{Bytes, GuestAddress};

/// An idle guest: nothing but the test's writer dirties its memory.
const IDLE: &str = "rate=0 tsc_khz=2300000";

/// Pages the writer keeps rewriting: between 640 KiB and 1 MiB, which the
/// guest neither runs from nor verifies (its checked RAM starts at 2 MiB,
/// vm/guest/GUEST.md), none a probe page (those are copied, see
/// `ferry_engine::encode::choice::PROBE_STRIDE`).
const HOT: [u64; 8] = [161, 163, 170, 175, 181, 185, 189, 191];

/// A writer thread that rewrites [`HOT`] in ferry's VM while it runs
/// (through the VMM's write path, which the dirty log sees, as a device
/// doing DMA would), stopped before the VM pauses.
struct Rewriter {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Rewriter {
    fn start(vm: Arc<ferry_vm::Vm>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let (thread_stop, thread_writes) = (stop.clone(), writes.clone());
        let writer = std::thread::spawn(move || {
            let mut page = vec![0u8; 4096];
            let mut n = 0u64;
            while !thread_stop.load(Ordering::Relaxed) {
                n += 1;
                for (i, chunk) in page.chunks_exact_mut(8).enumerate() {
                    chunk.copy_from_slice(&(n * 4096 + i as u64).to_le_bytes());
                }
                for &p in &HOT {
                    MigratableVm::memory(&*vm)
                        .write_slice(&page, GuestAddress(p * 4096))
                        .expect("write a hot page");
                }
                thread_writes.fetch_add(1, Ordering::Relaxed);
            }
        });
        Self {
            stop,
            writes,
            writer: Mutex::new(Some(writer)),
        }
    }

    fn stop_writing(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.writer.lock().unwrap().take() {
            w.join().expect("the writer thread panicked");
        }
    }
}

impl Drop for Rewriter {
    fn drop(&mut self) {
        self.stop_writing();
    }
}

impl VmHooks for Rewriter {
    fn before_pause(&self) {
        self.stop_writing();
    }
}

#[test]
fn pages_torn_while_sent_are_sent_again_and_the_digests_agree() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("pages_torn_while_sent_are_sent_again") else {
        return Ok(());
    };
    let vm = boot(64, IDLE)?;
    let rewritten = Arc::new(HookedVm {
        vm: vm.clone(),
        hooks: Rewriter::start(vm.clone()),
    });
    // Let the writer get going before the first round reads the pages.
    while rewritten.hooks.writes.load(Ordering::Relaxed) < 100 {
        std::thread::yield_now();
    }
    let dest = Destination::spawn(DestinationOptions::default())?;
    let conn = tcp::connect(dest.addr)?;
    let source: Arc<dyn MigratableVm> = rewritten.clone();
    // A cap holds each batch in its lane's writer (the bucket is charged
    // before the write) for tens of milliseconds after its pages were
    // hashed, so the writer tears them for sure; without LZ4 and XOR
    // deltas every page still goes raw from guest memory.
    let opts = MigrationOptions {
        max_bandwidth: Some(32 << 20),
        compress: false,
        xor_cache_bytes: Some(0),
        ..MigrationOptions::default()
    };
    let summary = SourceMigration::new(source, opts).run(conn, |_| {})?;
    let (dest_vm, dest_summary) = dest.join()?;

    ensure!(
        summary.torn_pages_resent > 0,
        "no page tore in {} rewrites of {} pages while they were sent: {summary:?}",
        rewritten.hooks.writes.load(Ordering::Relaxed),
        HOT.len()
    );
    ensure!(summary.memory_digest == dest_summary.memory_digest);
    for &p in &HOT {
        let (mut ours, mut theirs) = (vec![0u8; 4096], vec![1u8; 4096]);
        MigratableVm::memory(&*vm).read_slice(&mut ours, GuestAddress(p * 4096))?;
        MigratableVm::memory(&dest_vm).read_slice(&mut theirs, GuestAddress(p * 4096))?;
        ensure!(ours == theirs, "page {p} differs after the migration");
    }
    assert_alive(&dest_vm, "destination")?;
    Ok(())
}

/// A raw page whose bytes are changed on the way (past the frame checksum,
/// which covers only the batch's table) looks torn to the destination;
/// the guest never wrote it again, so the source finds it in no later
/// dirty set and aborts, saying which page, with the guest running on.
#[test]
fn a_mismatch_the_guest_did_not_cause_aborts_and_the_guest_runs_on() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("a_mismatch_the_guest_did_not_cause_aborts") else {
        return Ok(());
    };
    const PAGE: u64 = 177;
    let vm = boot(64, IDLE)?;
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8 + 1).collect();
    MigratableVm::memory(&*vm).write_slice(&pattern, GuestAddress(PAGE * 4096))?;
    let dest = Destination::spawn(DestinationOptions::default())?;
    let relay = FrameRelay::spawn(dest.addr, FrameFault::CorruptRawPage(PAGE))?;
    let conn = tcp::connect(relay.addr)?;
    let result = SourceMigration::new(vm.clone(), MigrationOptions::default()).run(conn, |_| {});
    let err = result
        .err()
        .ok_or_else(|| anyhow::anyhow!("the migration must fail"))?;
    ensure!(
        matches!(
            err,
            MigrationError::TornPageNotRewritten {
                page: PAGE,
                round: 0
            }
        ),
        "{err:?}"
    );
    ensure!(!err.source_left_paused(), "{err:?}");
    ensure!(
        dest.join().is_err(),
        "the destination must not run the guest"
    );
    relay.join();
    assert_alive(&vm, "source")?;
    Ok(())
}
