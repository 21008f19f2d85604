//! A tiny real KVM VM whose guest writes a given list of pages: the
//! workload of the conformance tests and the collect benchmarks (cargo
//! feature `test-guest`).
//!
//! The vCPU starts directly in 64-bit **ring 3** with IOPL 3 (under nested
//! "PVM" KVM, ring-0 and real-mode code are emulated ~1000× slower; ring-3
//! code runs natively). Two memory slots:
//!
//! * slot 0, GPA `0..mem_bytes`: the tracked memory, created with
//!   `KVM_MEM_LOG_DIRTY_PAGES`; only the guest's listed writes touch it;
//! * slot 1, GPA [`HARNESS_GPA`]: page tables, GDT/TSS, the program, a stop
//!   flag and the page table of addresses to write; not logged.
//!
//! The program (39 bytes, source below) writes `rax` to offset 0 of each page
//! in the list, `rax += 1` per pass, for `passes` passes or until the host
//! sets the stop flag, then exits with `out 0x10, al`:
//!
//! ```text
//! start: mov rdi, rsi ; mov rdx, rcx
//! inner: mov rbx, [rdi] ; mov [rbx], rax ; add rdi, 8 ; dec rdx ; jnz inner
//!        inc rax ; cmp qword [r9], 0 ; jne done ; dec r8 ; jnz start
//! done:  out 0x10, al ; jmp start
//! ```

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::kvm_sys::kvm_err;
use crate::{
    enable_dirty_ring, enable_manual_protect, DirtyLog, DirtyLogError, KvmBitmapLog, KvmDirtyRing,
    MemorySlot, RingFullHandler, KVM_EXIT_DIRTY_RING_FULL, PAGE_SIZE,
};

/// Guest-physical base of the harness slot (4 GiB, above any tracked memory).
pub const HARNESS_GPA: u64 = 1 << 32;
const TWO_MIB: u64 = 2 << 20;
const PML4: u64 = 0x0000;
const PDPT: u64 = 0x1000;
const PD: u64 = 0x2000; // 5 pages: 4 for the low 4 GiB, 1 for the harness
const GDT: u64 = 0x7000;
const TSS: u64 = 0x7100;
const CODE: u64 = 0x8000;
const FLAG: u64 = 0x9000;
const TABLE: u64 = 0x10000;
const EXIT_PORT: u16 = 0x10;

const PROGRAM: [u8; 39] = [
    0x48, 0x89, 0xf7, 0x48, 0x89, 0xca, 0x48, 0x8b, 0x1f, 0x48, 0x89, 0x03, 0x48, 0x83, 0xc7, 0x08,
    0x48, 0xff, 0xca, 0x75, 0xf1, 0x48, 0xff, 0xc0, 0x49, 0x83, 0x39, 0x00, 0x75, 0x05, 0x49, 0xff,
    0xc8, 0x75, 0xdd, 0xe6, 0x10, 0xeb, 0xd9,
];

/// How the test VM's dirty pages are tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking {
    /// `KVM_GET_DIRTY_LOG`, fetch-and-protect in one call.
    Bitmap,
    /// `KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG` (manual protect, initially set).
    BitmapManualProtect,
    /// Dirty ring of this many bytes.
    Ring(u32),
}

/// A failure of the test VM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestGuestError {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm")]
    NoKvm(#[source] io::Error),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Kvm {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Mapping guest memory failed.
    #[error("mmap of {0} bytes of guest memory failed")]
    Mmap(usize, #[source] io::Error),
    /// A bad size or page list.
    #[error("{0}")]
    Invalid(String),
    /// The guest stopped in an unexpected way.
    #[error("guest exited unexpectedly: {0}")]
    GuestExit(String),
    /// Setting up the dirty log failed.
    #[error("dirty log setup failed")]
    DirtyLog(#[from] DirtyLogError),
}

fn kvm_op(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> TestGuestError {
    move |e| TestGuestError::Kvm {
        op,
        source: kvm_err(e),
    }
}

/// An anonymous mapping that unmaps itself.
#[derive(Debug)]
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is process memory owned by this struct; the guest and
// host access it concurrently only through volatile/atomic accesses.
unsafe impl Send for Mapping {}
// SAFETY: as above: shared access is by raw volatile/atomic reads and writes.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: usize) -> Result<Self, TestGuestError> {
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(TestGuestError::Mmap(len, io::Error::last_os_error()));
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The word at `offset` (in bounds, 8-aligned: checked by callers), as
    /// an atomic: the guest may access it concurrently.
    fn word(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: callers checked offset + 8 <= len, so the pointer stays in
        // the mapping.
        let ptr = unsafe { self.ptr.add(offset) };
        // SAFETY: 8-aligned (mapping is page-aligned, offset % 8 == 0), valid
        // for the mapping's lifetime, accessed only atomically or by the guest.
        unsafe { AtomicU64::from_ptr(ptr.cast()) }
    }

    fn write_u64(&self, offset: u64, value: u64) {
        let offset = offset as usize;
        assert!(offset + 8 <= self.len && offset.is_multiple_of(8));
        let word = self.word(offset);
        word.store(value, Ordering::SeqCst);
    }

    fn read_u64(&self, offset: u64) -> u64 {
        let offset = offset as usize;
        assert!(offset + 8 <= self.len && offset.is_multiple_of(8));
        let word = self.word(offset);
        word.load(Ordering::SeqCst)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Read access to the tracked guest memory that can be shared with a thread
/// collecting while the guest runs.
#[derive(Debug, Clone)]
pub struct GuestMemory {
    mem: Arc<Mapping>,
}

impl GuestMemory {
    /// The first 8 bytes of `page` (where the guest writes).
    pub fn read_word(&self, page: usize) -> u64 {
        self.mem.read_u64(page as u64 * PAGE_SIZE)
    }

    /// Host (VMM) write of `value` at offset 8 of `page`: KVM does not log it.
    pub fn host_write(&self, page: usize, value: u64) {
        self.mem.write_u64(page as u64 * PAGE_SIZE + 8, value);
    }

    /// The second word of `page` (where [`host_write`](Self::host_write) writes).
    pub fn read_host_word(&self, page: usize) -> u64 {
        self.mem.read_u64(page as u64 * PAGE_SIZE + 8)
    }

    /// Host address of the tracked memory.
    pub fn host_addr(&self) -> *mut u8 {
        self.mem.ptr
    }

    /// Number of 4 KiB pages of tracked memory.
    pub fn pages(&self) -> usize {
        self.mem.len / PAGE_SIZE as usize
    }
}

/// The test VM: one vCPU, tracked memory at GPA 0, a harness slot at 4 GiB.
pub struct TestVm {
    vm: Arc<VmFd>,
    vcpu: VcpuFd,
    mem: GuestMemory,
    harness: Arc<Mapping>,
    ring: Option<RingFullHandler>,
    ring_log: Option<KvmDirtyRing>,
    log: Option<Box<dyn DirtyLog>>,
    max_entries: usize,
    /// `KVM_RUN` calls made so far (each costs ~300 µs under PVM).
    pub runs: u64,
    /// Time spent harvesting rings on `KVM_EXIT_DIRTY_RING_FULL` exits so far
    /// (collect work done early, on the vCPU thread).
    pub ring_full_time: Duration,
}

impl std::fmt::Debug for TestVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestVm")
            .field("pages", &self.max_entries)
            .field("ring", &self.ring.is_some())
            .field("runs", &self.runs)
            .finish()
    }
}

impl TestVm {
    /// Opens `/dev/kvm`, or says why not.
    pub fn open_kvm() -> Result<Kvm, TestGuestError> {
        Kvm::new().map_err(|e| TestGuestError::NoKvm(kvm_err(e)))
    }

    /// A VM with `mem_bytes` (a multiple of 2 MiB, at most 4 GiB) of tracked
    /// memory, tracked as `tracking` says. The dirty log is built but not
    /// started: take it with [`take_dirty_log`](Self::take_dirty_log).
    pub fn new(mem_bytes: u64, tracking: Tracking) -> Result<Self, TestGuestError> {
        Self::with_split(mem_bytes, tracking, None)
    }

    /// Like [`new`](Self::new), but with the tracked memory cut into two KVM
    /// slots at `split` bytes (a multiple of 256 KiB inside the memory):
    /// slot 0 below, slot 2 above, one log over both. Page indices stay
    /// guest frame numbers, so the guest and the tests see no difference.
    pub fn with_split(
        mem_bytes: u64,
        tracking: Tracking,
        split: Option<u64>,
    ) -> Result<Self, TestGuestError> {
        if let Some(at) = split {
            if at == 0 || at >= mem_bytes || at % (64 * PAGE_SIZE) != 0 {
                return Err(TestGuestError::Invalid(format!(
                    "split at {at:#x}: must be a non-zero multiple of 256 KiB below {mem_bytes:#x}"
                )));
            }
        }
        if mem_bytes == 0 || !mem_bytes.is_multiple_of(TWO_MIB) || mem_bytes > HARNESS_GPA {
            return Err(TestGuestError::Invalid(format!(
                "test VM memory {mem_bytes:#x}: must be a non-zero multiple of 2 MiB up to 4 GiB"
            )));
        }
        let kvm = Self::open_kvm()?;
        let vm = Arc::new(kvm.create_vm().map_err(kvm_op("create_vm"))?);
        let manual = match tracking {
            Tracking::BitmapManualProtect => {
                if !enable_manual_protect(&vm)? {
                    return Err(
                        DirtyLogError::MissingCap("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2").into(),
                    );
                }
                true
            }
            Tracking::Ring(bytes) => {
                enable_dirty_ring(&vm, bytes)?;
                false
            }
            Tracking::Bitmap => false,
        };

        let max_entries = usize::try_from(mem_bytes / PAGE_SIZE).unwrap_or(usize::MAX);
        let harness_bytes = (TABLE + max_entries as u64 * 8).next_multiple_of(TWO_MIB);
        let mem = Arc::new(Mapping::new(mem_bytes as usize)?);
        let harness = Arc::new(Mapping::new(harness_bytes as usize)?);
        build_harness(&harness, harness_bytes);

        // (slot, guest address, host address, bytes, flags)
        let mut regions = vec![(1, HARNESS_GPA, harness.ptr as u64, harness.len as u64, 0)];
        let mut slots = Vec::new();
        let cuts = match split {
            Some(at) => vec![(0u32, 0, at), (2, at, mem_bytes - at)],
            None => vec![(0, 0, mem_bytes)],
        };
        for (slot, gpa, bytes) in cuts {
            regions.push((
                slot,
                gpa,
                mem.ptr as u64 + gpa,
                bytes,
                KVM_MEM_LOG_DIRTY_PAGES,
            ));
            slots.push(MemorySlot {
                slot,
                guest_phys_addr: gpa,
                pages: (bytes / PAGE_SIZE) as usize,
            });
        }
        for (slot, gpa, host, bytes, flags) in regions {
            let region = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: gpa,
                memory_size: bytes,
                userspace_addr: host,
            };
            // SAFETY: the region maps memory owned by `mem`/`harness`, which
            // the VM holds (Arc) for as long as it exists.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_op("set_user_memory_region"))?;
        }

        let vcpu = vm.create_vcpu(0).map_err(kvm_op("create_vcpu"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_op("get_supported_cpuid"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_op("set_cpuid2"))?;
        set_long_mode_ring3(&vcpu)?;

        let (log, ring, ring_log): (Box<dyn DirtyLog>, _, _) = match tracking {
            Tracking::Ring(bytes) => {
                let ring = KvmDirtyRing::new(vm.clone(), slots, &[&vcpu], bytes)?;
                let handler = ring.ring_full_handler();
                (Box::new(ring.clone()), Some(handler), Some(ring))
            }
            _ => (
                Box::new(KvmBitmapLog::new(vm.clone(), slots, manual)?),
                None,
                None,
            ),
        };
        Ok(Self {
            vm,
            vcpu,
            mem: GuestMemory { mem },
            harness,
            ring,
            ring_log,
            log: Some(log),
            max_entries,
            runs: 0,
            ring_full_time: Duration::ZERO,
        })
    }

    /// The dirty log of this VM (once; later calls return `None`).
    pub fn take_dirty_log(&mut self) -> Option<Box<dyn DirtyLog>> {
        self.log.take()
    }

    /// With a dirty ring: a clone of the ring log (sharing read positions
    /// with the one [`take_dirty_log`](Self::take_dirty_log) returns).
    pub fn ring_log(&self) -> Option<KvmDirtyRing> {
        self.ring_log.clone()
    }

    /// The VM fd.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// Tracked guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Makes the guest write `value` (then `value + 1`, ... per pass) to each
    /// of `pages`, `passes` times; returns when it is done.
    pub fn write_pages(
        &mut self,
        pages: &[usize],
        value: u64,
        passes: u64,
    ) -> Result<(), TestGuestError> {
        if passes == 0 {
            return Err(TestGuestError::Invalid("passes must be at least 1".into()));
        }
        self.load(pages, value, passes)?;
        if pages.is_empty() {
            return Ok(());
        }
        self.run_to_exit()
    }

    /// Makes the guest write `pages` over and over (value `value`, +1 per
    /// pass) on another thread while `during` runs here with the guest
    /// memory; then stops the guest at the end of a pass and returns what
    /// `during` returned and the number of full passes made.
    pub fn write_pages_while<R>(
        &mut self,
        pages: &[usize],
        value: u64,
        during: impl FnOnce(&GuestMemory) -> R,
    ) -> Result<(R, u64), TestGuestError> {
        if pages.is_empty() {
            return Err(TestGuestError::Invalid("no pages to write".into()));
        }
        self.load(pages, value, 0)?;
        let mem = self.mem.clone();
        let harness = self.harness.clone();
        let (r, run) = std::thread::scope(|s| {
            let writer = s.spawn(|| self.run_to_exit());
            let r = during(&mem);
            harness.write_u64(FLAG, 1);
            (r, writer.join())
        });
        run.unwrap_or_else(|p| std::panic::resume_unwind(p))?;
        let regs = self.vcpu.get_regs().map_err(kvm_op("get_regs"))?;
        Ok((r, regs.rax.wrapping_sub(value)))
    }

    fn load(&mut self, pages: &[usize], value: u64, passes: u64) -> Result<(), TestGuestError> {
        if pages.len() > self.max_entries {
            return Err(TestGuestError::Invalid(format!(
                "{} pages to write, the table holds {}",
                pages.len(),
                self.max_entries
            )));
        }
        for (i, &p) in pages.iter().enumerate() {
            if p >= self.max_entries {
                return Err(TestGuestError::Invalid(format!(
                    "page {p} outside the {} pages of guest memory",
                    self.max_entries
                )));
            }
            self.harness
                .write_u64(TABLE + i as u64 * 8, p as u64 * PAGE_SIZE);
        }
        self.harness.write_u64(FLAG, 0);
        let mut regs = self.vcpu.get_regs().map_err(kvm_op("get_regs"))?;
        regs.rip = HARNESS_GPA + CODE;
        regs.rflags = 0x2 | 0x3000; // IOPL 3: `out` allowed in ring 3
        regs.rsi = HARNESS_GPA + TABLE;
        regs.rcx = pages.len() as u64;
        regs.r8 = passes;
        regs.r9 = HARNESS_GPA + FLAG;
        regs.rax = value;
        self.vcpu.set_regs(&regs).map_err(kvm_op("set_regs"))
    }

    fn run_to_exit(&mut self) -> Result<(), TestGuestError> {
        loop {
            self.runs += 1;
            match self.vcpu.run().map_err(kvm_op("KVM_RUN"))? {
                VcpuExit::IoOut(EXIT_PORT, _) => return Ok(()),
                VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => match &self.ring {
                    Some(h) => {
                        let t0 = Instant::now();
                        h.handle_ring_full()?;
                        self.ring_full_time += t0.elapsed();
                    }
                    None => {
                        return Err(TestGuestError::GuestExit("ring full without a ring".into()))
                    }
                },
                other => {
                    let what = format!("{other:?}");
                    let regs = self.vcpu.get_regs().map_err(kvm_op("get_regs"))?;
                    return Err(TestGuestError::GuestExit(format!(
                        "{what} at rip {:#x}",
                        regs.rip
                    )));
                }
            }
        }
    }
}

/// Page tables (2 MiB pages, user-accessible) identity-mapping the low 4 GiB
/// and the harness slot, a GDT with 64-bit user segments and a TSS, the
/// program.
fn build_harness(h: &Mapping, harness_bytes: u64) {
    const P_RW_US: u64 = 0x7;
    const PS: u64 = 0x80;
    h.write_u64(PML4, (HARNESS_GPA + PDPT) | P_RW_US);
    for gib in 0..5u64 {
        h.write_u64(PDPT + gib * 8, (HARNESS_GPA + PD + gib * 0x1000) | P_RW_US);
    }
    for i in 0..4 * 512u64 {
        h.write_u64(PD + i * 8, (i * TWO_MIB) | P_RW_US | PS);
    }
    for i in 0..harness_bytes / TWO_MIB {
        h.write_u64(
            PD + 4 * 0x1000 + i * 8,
            (HARNESS_GPA + i * TWO_MIB) | P_RW_US | PS,
        );
    }
    let tss = HARNESS_GPA + TSS;
    let gdt = [
        0,
        0x00af_9a00_0000_ffff, // 0x08 kernel code 64
        0x00cf_9200_0000_ffff, // 0x10 kernel data
        0x00af_fa00_0000_ffff, // 0x18 user code 64 (DPL 3)
        0x00cf_f200_0000_ffff, // 0x20 user data (DPL 3)
        // 0x28 TSS (busy, type 11), 16 bytes
        0x67 | (tss & 0xff_ffff) << 16 | 0x8b << 40 | ((tss >> 24) & 0xff) << 56,
        tss >> 32,
    ];
    for (i, d) in gdt.iter().enumerate() {
        h.write_u64(GDT + i as u64 * 8, *d);
    }
    let mut code = [0u8; 40];
    code[..PROGRAM.len()].copy_from_slice(&PROGRAM);
    for (i, chunk) in code.chunks(8).enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        h.write_u64(CODE + i as u64 * 8, u64::from_le_bytes(w));
    }
}

fn segment(selector: u16, type_: u8, dpl: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn set_long_mode_ring3(vcpu: &VcpuFd) -> Result<(), TestGuestError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_op("get_sregs"))?;
    sregs.cs = segment(0x1b, 0xb, 3, 1, 0);
    let data = segment(0x23, 0x3, 3, 0, 1);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        base: HARNESS_GPA + TSS,
        limit: 0x67,
        selector: 0x28,
        type_: 0xb,
        present: 1,
        s: 0,
        g: 0,
        ..segment(0x28, 0xb, 0, 0, 0)
    };
    sregs.gdt.base = HARNESS_GPA + GDT;
    sregs.gdt.limit = 7 * 8 - 1;
    sregs.cr3 = HARNESS_GPA + PML4;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
    sregs.efer = 0x500; // LME | LMA
    vcpu.set_sregs(&sregs).map_err(kvm_op("set_sregs"))
}
