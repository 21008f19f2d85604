//! [`KvmDirtyRing`]: KVM's per-vCPU dirty rings (`KVM_CAP_DIRTY_LOG_RING`).
//!
//! Protocol (Documentation/virt/kvm/api.rst, "KVM_CAP_DIRTY_LOG_RING"): KVM
//! publishes a `kvm_dirty_gfn` with `flags = DIRTY` (release); userspace reads
//! it after an acquire load of `flags`, then stores `flags = RESET` (release)
//! to hand it back; `KVM_RESET_DIRTY_RINGS` re-protects the handed-back pages
//! and recycles their entries. A page can be reported more than once.
//!
//! Since Linux 6.17 `KVM_RESET_DIRTY_RINGS` stops early when the calling
//! thread has a signal pending, and what it stops with is lost: the entries
//! it had already taken off a ring but not yet re-protected (it coalesces
//! neighbouring pages, up to 64, before re-protecting them) are recycled
//! without being re-protected, so those pages stay writable and the
//! guest's next writes to them are never logged. It still returns a count,
//! not an error. vCPU threads get kicked with signals and reset on
//! ring-full exits, so every reset here runs with the calling thread's
//! signals blocked, and a reset that comes back short fails the log
//! ([`DirtyLogError::ResetCutShort`]).

use std::os::fd::AsRawFd;
use std::os::raw::c_ulong;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl;

use crate::kvm_sys::{
    kvm_err, last_os_error, KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, KVM_RESET_DIRTY_RINGS,
};
use crate::log::{check_bitmap, validate_slots};
use crate::{CollectStats, DirtyBitmap, DirtyLog, DirtyLogError, MemorySlot, Reprotect};

/// `KVM_EXIT_DIRTY_RING_FULL`: the exit reason a vCPU returns with when its
/// ring is nearly full (`kvm_ioctls` reports it as `VcpuExit::Unsupported(31)`).
pub const KVM_EXIT_DIRTY_RING_FULL: u32 = kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;

/// Enables a dirty ring of `bytes` per vCPU on `vm` (a power of two, 4 KiB to
/// the kernel's maximum; each entry is 16 bytes). Prefers the `ACQ_REL`
/// flavour, which is the one that is safe on weakly ordered CPUs.
///
/// Call it **before creating any vCPU** (KVM refuses it afterwards). The VMM
/// creates its slots with `KVM_MEM_LOG_DIRTY_PAGES`. Once a ring is on,
/// `KVM_GET_DIRTY_LOG` no longer works on this VM.
pub fn enable_dirty_ring(vm: &VmFd, bytes: u32) -> Result<(), DirtyLogError> {
    let (cap, max) = [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
        .into_iter()
        .map(|c| (c, vm.check_extension_raw(c_ulong::from(c))))
        .find(|&(_, max)| max > 0)
        .ok_or(DirtyLogError::MissingCap("KVM_CAP_DIRTY_LOG_RING"))?;
    let max = u32::try_from(max).unwrap_or(u32::MAX);
    if !bytes.is_power_of_two() || bytes < 4096 || bytes > max {
        return Err(DirtyLogError::InvalidLayout(format!(
            "dirty ring of {bytes} bytes: must be a power of two from 4096 to {max}"
        )));
    }
    let mut enable = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    enable.args[0] = u64::from(bytes);
    vm.enable_cap(&enable)
        .map_err(|e| DirtyLogError::EnableCap {
            cap,
            source: kvm_err(e),
        })
}

/// One vCPU's ring, mapped from its fd.
#[derive(Debug)]
struct MappedRing {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    bytes: usize,
    /// Next entry to read (free-running; index = fetch % entries).
    fetch: u32,
}

// SAFETY: the mapping is plain shared memory owned by this struct; all access
// goes through `&mut self` (under the state mutex) with atomic loads/stores of
// `flags`, so moving it to another thread is sound.
unsafe impl Send for MappedRing {}

impl MappedRing {
    fn map(vcpu: &VcpuFd, bytes: usize, index: usize) -> Result<Self, DirtyLogError> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let offset = libc::off_t::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page;
        // SAFETY: a fresh shared mapping of the vCPU fd at the ring's offset;
        // the kernel validates fd, size and offset; we check the result.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DirtyLogError::MapRing {
                vcpu: index,
                source: last_os_error(),
            });
        }
        let base = NonNull::new(ptr.cast::<kvm_dirty_gfn>()).ok_or(DirtyLogError::MapRing {
            vcpu: index,
            source: std::io::Error::from_raw_os_error(libc::EFAULT),
        })?;
        let entries = u32::try_from(bytes / std::mem::size_of::<kvm_dirty_gfn>()).unwrap_or(0);
        Ok(Self {
            base,
            entries,
            bytes,
            fetch: 0,
        })
    }

    /// Reads every published entry, calls `f(slot, offset)` for each, hands
    /// them back (RESET). Returns how many were read.
    fn harvest(&mut self, mut f: impl FnMut(u32, u64)) -> usize {
        let mut n = 0;
        loop {
            let index = (self.fetch % self.entries) as usize;
            // SAFETY: index < entries, so the entry lies inside the mapping.
            let entry = unsafe { self.base.as_ptr().add(index) };
            // SAFETY: `entry` points inside the mapping; taking a field's
            // address reads nothing.
            let flags_ptr = unsafe { std::ptr::addr_of_mut!((*entry).flags) };
            // SAFETY: `flags` is a naturally aligned u32 in shared memory that
            // KVM also accesses atomically; viewing it as AtomicU32 is the
            // documented protocol.
            let flags = unsafe { AtomicU32::from_ptr(flags_ptr) };
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                return n;
            }
            // SAFETY: the acquire load above saw DIRTY, so KVM finished writing
            // slot and offset; they stay put until we store RESET.
            let gfn = unsafe { entry.read() };
            let (slot, offset) = (gfn.slot, gfn.offset);
            f(slot, offset);
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
    }
}

impl Drop for MappedRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; nothing refers to
        // it after drop.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

/// Rings plus the pages harvested early (on ring-full exits), shared between
/// the collector and the vCPU threads.
#[derive(Debug)]
struct RingState {
    rings: Vec<MappedRing>,
    slots: Vec<MemorySlot>,
    /// Pages harvested by [`RingFullHandler`] not yet handed to `collect`.
    pending: DirtyBitmap,
    pending_reported: usize,
    /// Entries harvested from each vCPU's ring (index = vCPU) since the
    /// last [`DirtyLog::take_vcpu_dirty_counts`]: which vCPU dirties how
    /// fast, for dirty-limit.
    vcpu_entries: Vec<u64>,
    /// Entries handed back (flagged RESET) since the last reset.
    handed_back: usize,
    /// What a reset that came back short reported (its pages may be written
    /// unlogged), until the log is started again.
    cut_short: Option<(usize, usize)>,
}

impl RingState {
    /// Harvests all rings into `out`. Returns (entries, first unknown entry).
    fn harvest_into(&mut self, out: &mut DirtyBitmap) -> (usize, Option<(u32, u64)>) {
        let slots = &self.slots;
        let mut unknown = None;
        let mut n = 0;
        for (ring, count) in self.rings.iter_mut().zip(&mut self.vcpu_entries) {
            let before = n;
            n += ring.harvest(|slot, offset| {
                let page = slots
                    .iter()
                    .find(|s| s.slot == slot)
                    .filter(|s| offset < s.pages as u64)
                    .map(|s| s.first_page() + offset as usize);
                match page {
                    Some(p) => out.set(p),
                    None => unknown = unknown.or(Some((slot, offset))),
                }
            });
            *count += (n - before) as u64;
        }
        self.handed_back += n;
        (n, unknown)
    }

    /// `KVM_RESET_DIRTY_RINGS` for every entry handed back so far. Fails
    /// when it re-protected fewer, and from then on until `start`.
    fn reset(&mut self, vm: &VmFd) -> Result<usize, DirtyLogError> {
        if let Some((reset, handed_back)) = self.cut_short {
            return Err(DirtyLogError::ResetCutShort { reset, handed_back });
        }
        let reset = reset_rings(vm)?;
        let handed_back = std::mem::take(&mut self.handed_back);
        if reset < handed_back {
            self.cut_short = Some((reset, handed_back));
            return Err(DirtyLogError::ResetCutShort { reset, handed_back });
        }
        Ok(reset)
    }
}

/// Every signal blocked on the calling thread while it lives; the previous
/// mask comes back on drop, and a signal that arrived meanwhile is
/// delivered then.
struct SignalsBlocked(libc::sigset_t);

impl SignalsBlocked {
    fn new() -> Self {
        // SAFETY: sigset_t is plain data, valid all zero.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: writes only the local set it is given.
        unsafe { libc::sigfillset(&mut all) };
        // SAFETY: reads `all`, writes `previous`, both locals that outlive
        // the call; changes only this thread's mask.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous) };
        Self(previous)
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask `new` saved, on the same thread (the
        // guard lives in one function call).
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// `KVM_RESET_DIRTY_RINGS` with the thread's signals blocked, so that KVM
/// does not stop midway (see the module docs). Returns the entries reset.
fn reset_rings(vm: &VmFd) -> Result<usize, DirtyLogError> {
    let blocked = SignalsBlocked::new();
    // SAFETY: `vm` is a VM fd; KVM_RESET_DIRTY_RINGS takes no argument.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    let result = usize::try_from(ret).map_err(|_| DirtyLogError::ResetRings(last_os_error()));
    drop(blocked);
    result
}

fn unknown_entry((slot, offset): (u32, u64)) -> DirtyLogError {
    DirtyLogError::RingEntryOutOfRange { slot, offset }
}

/// KVM's per-vCPU dirty rings.
///
/// Harvesting works from any thread while the vCPUs run. A vCPU whose ring
/// fills exits with [`KVM_EXIT_DIRTY_RING_FULL`]; its thread must then call
/// [`RingFullHandler::handle_ring_full`] (from [`KvmDirtyRing::ring_full_handler`])
/// before running again: it harvests every ring into a pending bitmap that
/// the next `collect` reports, and resets the rings so the vCPU can go on.
///
/// Create it **once per VM**: it remembers where it stopped reading each
/// ring, which a second `new` over the same vCPUs would not know. Hand out
/// more logs with `clone()`, which shares the rings, the read positions and
/// the pending pages (and copies whether the log is started).
#[derive(Debug, Clone)]
pub struct KvmDirtyRing {
    vm: Arc<VmFd>,
    state: Arc<Mutex<RingState>>,
    pages: usize,
    started: bool,
}

/// A handle a vCPU thread uses on `KVM_EXIT_DIRTY_RING_FULL`.
#[derive(Debug, Clone)]
pub struct RingFullHandler {
    vm: Arc<VmFd>,
    state: Arc<Mutex<RingState>>,
}

fn lock(state: &Mutex<RingState>) -> MutexGuard<'_, RingState> {
    // A panic while holding the lock leaves the state consistent (entries are
    // only ever handed back after being recorded), so poisoning is ignored.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl RingFullHandler {
    /// Harvests every ring into the pending bitmap and resets the rings.
    /// Returns the number of entries harvested.
    pub fn handle_ring_full(&self) -> Result<usize, DirtyLogError> {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let mut pending = std::mem::replace(&mut state.pending, DirtyBitmap::new(0));
        let (n, unknown) = state.harvest_into(&mut pending);
        state.pending = pending;
        state.pending_reported += n;
        state.reset(&self.vm)?;
        unknown.map_or(Ok(n), |u| Err(unknown_entry(u)))
    }
}

impl KvmDirtyRing {
    /// Maps the ring of each of `vcpus` (ring size `ring_bytes`, as passed to
    /// [`enable_dirty_ring`]) and tracks `slots`.
    pub fn new(
        vm: Arc<VmFd>,
        slots: Vec<MemorySlot>,
        vcpus: &[&VcpuFd],
        ring_bytes: u32,
    ) -> Result<Self, DirtyLogError> {
        let pages = validate_slots(&slots)?;
        let rings = vcpus
            .iter()
            .enumerate()
            .map(|(i, v)| MappedRing::map(v, ring_bytes as usize, i))
            .collect::<Result<Vec<_>, _>>()?;
        let vcpu_entries = vec![0; rings.len()];
        Ok(Self {
            vm,
            state: Arc::new(Mutex::new(RingState {
                rings,
                slots,
                pending: DirtyBitmap::new(pages),
                pending_reported: 0,
                vcpu_entries,
                handed_back: 0,
                cut_short: None,
            })),
            pages,
            started: false,
        })
    }

    /// The handle vCPU threads call on `KVM_EXIT_DIRTY_RING_FULL`.
    pub fn ring_full_handler(&self) -> RingFullHandler {
        RingFullHandler {
            vm: self.vm.clone(),
            state: self.state.clone(),
        }
    }
}

impl DirtyLog for KvmDirtyRing {
    fn name(&self) -> &'static str {
        "kvm-ring"
    }

    fn pages(&self) -> usize {
        self.pages
    }

    /// Drains and resets the rings and forgets pending pages.
    fn start(&mut self) -> Result<(), DirtyLogError> {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let mut scratch = DirtyBitmap::new(self.pages);
        let (_, unknown) = state.harvest_into(&mut scratch);
        // The VM turns logging on for its slots just before it starts a
        // log (vm/src/dirty.rs), which write-protects every page again:
        // what a short reset left writable is protected once more.
        state.cut_short = None;
        state.reset(&self.vm)?;
        state.pending.clear();
        state.pending_reported = 0;
        state.vcpu_entries.fill(0);
        self.started = true;
        unknown.map_or(Ok(()), |u| Err(unknown_entry(u)))
    }

    /// `Now`/`Deferred`: harvest, then `KVM_RESET_DIRTY_RINGS`. `Never`:
    /// harvest only (entries stay handed back until the next reset).
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
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let (n, unknown) = state.harvest_into(out);
        out.merge(&state.pending);
        state.pending.clear();
        let mut stats = CollectStats {
            reported: n + std::mem::take(&mut state.pending_reported),
            ..Default::default()
        };
        if reprotect != Reprotect::Never {
            stats.reprotected = state.reset(&self.vm)?;
            stats.syscalls += 1;
        }
        drop(guard);
        stats.elapsed = t0.elapsed();
        unknown.map_or(Ok(stats), |u| Err(unknown_entry(u)))
    }

    fn reprotect(&mut self, _first_page: usize, _words: &[u64]) -> Result<(), DirtyLogError> {
        Ok(())
    }

    /// Entries each vCPU's ring gave up since the last call (collects and
    /// ring-full harvests alike), in the order of the `vcpus` given to
    /// [`KvmDirtyRing::new`]. A page written by two vCPUs counts for the
    /// one whose write KVM logged; one rewritten after a reset counts again.
    fn take_vcpu_dirty_counts(&mut self) -> Option<Vec<u64>> {
        let mut guard = lock(&self.state);
        let counts = guard.vcpu_entries.clone();
        guard.vcpu_entries.fill(0);
        Some(counts)
    }

    fn stop(&mut self) -> Result<(), DirtyLogError> {
        self.started = false;
        Ok(())
    }
}
