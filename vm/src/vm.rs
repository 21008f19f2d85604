//! [`Vm`]: one vCPU, one memory region at guest-physical 0, no devices.

use std::path::PathBuf;
use std::sync::Arc;

use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::dirty::{SlotLogging, VmDirtyLog};
use crate::entry::{multiboot_regs, multiboot_sregs};
use crate::error::{kvm_err, VmError};
use crate::guest::{GuestStatus, GUEST_ELF};
use crate::loader::{load_multiboot, write_multiboot_info};
use crate::state::{supported_msrs, VcpuState};
use crate::vcpu::{RunState, VcpuThread};

/// Guest memory as ferry holds it: the bitmap records the VMM's own writes
/// (KVM's dirty log does not see them).
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
const CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;
/// `KVM_CAP_DIRTY_LOG_RING`.
const CAP_DIRTY_LOG_RING: u32 = 192;
/// Smallest guest ferry runs: the fill region starts at 2 MiB.
const MIN_MEM: u64 = 4 << 20;
/// Largest guest the workload guest maps (64 page directories of 2 MiB pages).
const MAX_MEM: u64 = 64 << 30;

/// How the VM learns which pages the guest wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyBackend {
    /// `KVM_GET_DIRTY_LOG`, with manual protect where the kernel has it.
    #[default]
    Bitmap,
    /// Per-vCPU dirty rings of this many bytes each.
    Ring(u32),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// A multiboot image; `None` runs the built-in workload guest.
    pub kernel: Option<PathBuf>,
    /// The guest command line.
    pub cmdline: String,
    /// Dirty-tracking backend.
    pub dirty: DirtyBackend,
}

/// A running (or paused) KVM guest.
#[derive(Debug)]
pub struct Vm {
    // Declared first so it is dropped first: the vCPU thread must be gone
    // before the guest memory is unmapped.
    vcpu: VcpuThread,
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    memory: GuestMem,
    msr_ids: Vec<u32>,
    mem_bytes: u64,
    dirty: DirtyBackend,
    manual_protect: bool,
    tsc_khz: Option<u32>,
    /// The dirty ring, mapped at creation (the vCPU fd is free then).
    ring: std::sync::Mutex<Option<ferry_dirtylog::KvmDirtyRing>>,
}

fn host_ram() -> u64 {
    // SAFETY: sysconf only reads system configuration values.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(pages).unwrap_or(0) * u64::try_from(size).unwrap_or(0)
}

impl Vm {
    /// Creates a VM with `mem_bytes` of RAM and a paused vCPU, guest not loaded.
    fn create(mem_bytes: u64, dirty: DirtyBackend, populate: bool) -> Result<Self, VmError> {
        if !(MIN_MEM..=MAX_MEM).contains(&mem_bytes) || mem_bytes % (2 << 20) != 0 {
            return Err(VmError::MemorySize {
                bytes: mem_bytes,
                why: "must be a multiple of 2 MiB between 4 MiB and 64 GiB",
            });
        }
        let host = host_ram();
        if mem_bytes > host {
            return Err(VmError::Memory {
                bytes: mem_bytes,
                host_bytes: host,
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // Both dirty-log modes must be chosen before any slot or vCPU exists.
        let mut manual_protect = false;
        match dirty {
            DirtyBackend::Bitmap => {
                if kvm.check_extension_raw(u64::from(CAP_MANUAL_DIRTY_LOG_PROTECT2)) > 0 {
                    let cap = kvm_enable_cap {
                        cap: CAP_MANUAL_DIRTY_LOG_PROTECT2,
                        args: [3, 0, 0, 0],
                        ..Default::default()
                    };
                    manual_protect = vm_fd.enable_cap(&cap).is_ok();
                }
            }
            DirtyBackend::Ring(bytes) => {
                let cap = kvm_enable_cap {
                    cap: CAP_DIRTY_LOG_RING,
                    args: [u64::from(bytes), 0, 0, 0],
                    ..Default::default()
                };
                vm_fd
                    .enable_cap(&cap)
                    .map_err(kvm_err("KVM_ENABLE_CAP(DIRTY_LOG_RING)"))?;
            }
        }
        let size = usize::try_from(mem_bytes).map_err(|_| VmError::MemorySize {
            bytes: mem_bytes,
            why: "does not fit the address space",
        })?;
        let memory = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), size)])
            .map_err(|e| VmError::Memory {
                bytes: mem_bytes,
                host_bytes: host,
                source: std::io::Error::other(e.to_string()),
            })?;
        let region = memory
            .find_region(GuestAddress(0))
            .expect("region at 0 exists");
        let host_addr = memory
            .get_host_address(GuestAddress(0))
            .expect("address 0 is mapped");
        advise(host_addr, size, populate);
        let slot = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by
        // `memory`, which this Vm keeps until after the VM fd is closed.
        unsafe { vm_fd.set_user_memory_region(slot) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;

        let vcpu_fd = vm_fd.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu_fd
            .set_cpuid2(&cpuid)
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        let tsc_khz = vcpu_fd.get_tsc_khz().ok();
        let msr_ids = supported_msrs(&kvm);
        let vm_fd = Arc::new(vm_fd);
        let ring = match dirty {
            DirtyBackend::Ring(bytes) => Some(
                ferry_dirtylog::KvmDirtyRing::new(
                    vm_fd.clone(),
                    vec![Self::slot_desc(mem_bytes)],
                    &[&vcpu_fd],
                    bytes,
                )
                .map_err(|source| VmError::DirtyLog {
                    backend: "kvm-ring",
                    source,
                })?,
            ),
            DirtyBackend::Bitmap => None,
        };
        let vcpu = VcpuThread::spawn(vcpu_fd).map_err(VmError::SpawnVcpu)?;
        if let Some(r) = &ring {
            let handler = r.ring_full_handler();
            *vcpu.ctl.ring_full.lock().expect("ring-full hook lock") = Some(Box::new(move || {
                if let Err(e) = handler.handle_ring_full() {
                    tracing::warn!(error = %e, "draining a full dirty ring failed");
                }
            }));
        }
        Ok(Self {
            kvm,
            vm_fd,
            memory,
            vcpu,
            msr_ids,
            mem_bytes,
            dirty,
            manual_protect,
            tsc_khz,
            ring: std::sync::Mutex::new(ring),
        })
    }

    /// Boots a guest: loads the image, writes the multiboot info, starts the vCPU.
    pub fn boot(cfg: &VmConfig) -> Result<Self, VmError> {
        let vm = Self::create(cfg.mem_bytes, cfg.dirty, false)?;
        let (image, path) = match &cfg.kernel {
            Some(p) => (
                std::fs::read(p).map_err(|source| VmError::ReadKernel {
                    path: p.display().to_string(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (GUEST_ELF.to_vec(), "built-in workload guest".to_string()),
        };
        let loaded =
            load_multiboot(&vm.memory, &image).map_err(|why| VmError::BadKernel { path, why })?;
        write_multiboot_info(&vm.memory, cfg.mem_bytes, &cfg.cmdline)
            .map_err(VmError::BadCmdline)?;
        {
            let fd = vm.vcpu.fd().expect("a new vCPU is paused");
            let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            multiboot_sregs(&mut sregs);
            fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            fd.set_regs(&multiboot_regs(loaded.entry))
                .map_err(kvm_err("KVM_SET_REGS"))?;
        }
        vm.resume()?;
        Ok(vm)
    }

    /// A VM to receive an incoming guest: memory populated, vCPU paused.
    pub fn incoming(mem_bytes: u64, dirty: DirtyBackend) -> Result<Self, VmError> {
        Self::create(mem_bytes, dirty, true)
    }

    /// Pauses the guest (returns once the vCPU is out of `KVM_RUN`).
    pub fn pause(&self) -> Result<(), VmError> {
        self.vcpu.pause().map_err(VmError::VcpuGone)
    }

    /// Resumes the guest.
    pub fn resume(&self) -> Result<(), VmError> {
        self.vcpu.resume().map_err(VmError::VcpuGone)
    }

    /// Hint that [`Vm::resume`] comes soon (e.g. a migration's handover):
    /// the paused vCPU thread gets ready so that the resume is quick.
    pub fn prepare_resume(&self) {
        self.vcpu.prepare_resume();
    }

    /// When the guest last started running after a pause (ns since the Unix
    /// epoch, realtime clock; 0 before it first ran): the instant
    /// [`Vm::resume`] took effect on the vCPU thread.
    pub fn resumed_at_unix_ns(&self) -> u64 {
        self.vcpu.resumed_at_unix_ns()
    }

    /// Where the vCPU is.
    pub fn run_state(&self) -> RunState {
        self.vcpu.ctl.state()
    }

    /// Saves the vCPU state of a paused VM as a versioned blob.
    pub fn save_state(&self) -> Result<Vec<u8>, VmError> {
        let fd = self.vcpu.fd().ok_or(VmError::NotPaused("save_state"))?;
        Ok(VcpuState::save(&fd, &self.msr_ids)?.to_bytes())
    }

    /// Restores a blob made by [`Vm::save_state`] into a paused VM.
    pub fn restore_state(&self, blob: &[u8]) -> Result<(), VmError> {
        let state = VcpuState::from_bytes(blob)?;
        let fd = self.vcpu.fd().ok_or(VmError::NotPaused("restore_state"))?;
        state.restore(&fd)
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMem {
        &self.memory
    }

    /// Guest RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// The VM fd (for dirty-log backends).
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    /// The KVM system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The chosen dirty backend.
    pub fn dirty_backend(&self) -> DirtyBackend {
        self.dirty
    }

    /// Whether `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` is on for this VM.
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// The TSC frequency KVM reports (kHz).
    pub fn tsc_khz(&self) -> Option<u32> {
        self.tsc_khz
    }

    fn slot_desc(mem_bytes: u64) -> ferry_dirtylog::MemorySlot {
        ferry_dirtylog::MemorySlot {
            slot: 0,
            guest_phys_addr: 0,
            pages: (mem_bytes / 4096) as usize,
        }
    }

    fn slot_logging(&self) -> SlotLogging {
        let host_addr = self
            .memory
            .get_host_address(GuestAddress(0))
            .expect("address 0 is mapped");
        SlotLogging {
            vm_fd: self.vm_fd.clone(),
            host_addr: host_addr as u64,
            size: self.mem_bytes,
        }
    }

    /// A dirty log over all guest memory: KVM's log (bitmap or ring, as
    /// configured) OR the pages the VMM itself wrote. KVM's logging is on
    /// from this call until the log is stopped or dropped.
    pub fn dirty_log(&self) -> Result<Box<dyn ferry_dirtylog::DirtyLog>, VmError> {
        let kvm_log: Box<dyn ferry_dirtylog::DirtyLog> = match self.dirty {
            DirtyBackend::Bitmap => Box::new(
                ferry_dirtylog::KvmBitmapLog::new(
                    self.vm_fd.clone(),
                    vec![Self::slot_desc(self.mem_bytes)],
                    self.manual_protect,
                )
                .map_err(|source| VmError::DirtyLog {
                    backend: "kvm-bitmap",
                    source,
                })?,
            ),
            DirtyBackend::Ring(_) => Box::new(
                // Clones share the rings' read positions: a second log (a
                // retried migration) goes on where the first one stopped.
                self.ring
                    .lock()
                    .expect("ring lock")
                    .clone()
                    .expect("a ring-backed VM maps its ring at creation"),
            ),
        };
        let slot = self.slot_logging();
        slot.set(true).map_err(kvm_err(
            "KVM_SET_USER_MEMORY_REGION(KVM_MEM_LOG_DIRTY_PAGES)",
        ))?;
        Ok(Box::new(VmDirtyLog::new(
            kvm_log,
            self.memory.clone(),
            slot,
        )))
    }

    /// Auto-converge: the vCPU sleeps `percent` % of the time (0 = off).
    pub fn set_throttle(&self, percent: u8) {
        self.vcpu.ctl.set_throttle(percent);
    }

    /// Runs `f` with the vCPU fd of a paused VM (e.g. to map a dirty ring).
    pub fn with_vcpu_fd<T>(&self, f: impl FnOnce(&kvm_ioctls::VcpuFd) -> T) -> Result<T, VmError> {
        let fd = self.vcpu.fd().ok_or(VmError::NotPaused("with_vcpu_fd"))?;
        Ok(f(&fd))
    }

    /// Installs what the vCPU thread calls on `KVM_EXIT_DIRTY_RING_FULL`.
    pub fn on_dirty_ring_full(&self, drain: Option<Box<dyn FnMut() + Send>>) {
        *self.vcpu.ctl.ring_full.lock().expect("ring-full hook lock") = drain;
    }

    /// Reads the guest's status block.
    pub fn status(&self) -> GuestStatus {
        GuestStatus::read(&self.memory).expect("the status block lies in guest memory")
    }

    /// Waits until the guest is running its dirty loop (phase 2), failing
    /// early if it reports a fatal error or the vCPU stops.
    pub fn wait_running(&self, timeout: std::time::Duration) -> Result<GuestStatus, VmError> {
        let start = std::time::Instant::now();
        loop {
            let st = self.status();
            if st.magic_ok && st.phase == crate::GuestPhase::Running {
                return Ok(st);
            }
            if st.magic_ok && st.phase == crate::GuestPhase::Fatal {
                return Err(VmError::GuestFailed(st.fatal_reason_text()));
            }
            if let RunState::Failed(why) = self.run_state() {
                return Err(VmError::GuestFailed(why));
            }
            if start.elapsed() > timeout {
                return Err(VmError::GuestTimeout {
                    what: "reach phase 2 (running)",
                    secs: timeout.as_secs(),
                    phase: if st.magic_ok { st.phase.raw() } else { 0 },
                    hint:
                        "is the image a GUEST.md workload guest? a big --mem takes a while to fill",
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// THP for guest RAM (fewer faults, faster fill); on the receive side also
/// populate now, so the stream does not wait on first-touch faults (PLATFORM.md).
fn advise(addr: *mut u8, len: usize, populate: bool) {
    // SAFETY: the range is a private anonymous mapping owned by the caller;
    // madvise only changes how the kernel backs it, never its contents' validity.
    let _ = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    if populate {
        // MADV_POPULATE_WRITE (Linux 5.14); older kernels: pages fault in on use.
        // SAFETY: as above; populating writes zeros into fresh anonymous pages.
        let _ = unsafe { libc::madvise(addr.cast(), len, 23) };
    }
}

/// The TSC frequency (kHz) KVM gives guests on this host, which the workload
/// guest needs for pacing (`tsc_khz=`).
pub fn host_tsc_khz() -> Result<u32, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    vcpu.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))
}
