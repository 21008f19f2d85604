//! [`Vm`]: one or more vCPUs, guest memory laid out like a PC's (one region
//! at guest-physical 0, or below and above a hole at 3-4 GiB), the in-kernel
//! irqchip and PIT (`crate::devices`), no other devices.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use kvm_bindings::{
    kvm_enable_cap, kvm_mp_state, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::dirty::{SlotLogging, VmDirtyLog};
use crate::entry::{ap_regs, multiboot_regs, multiboot_sregs};
use crate::error::{kvm_err, VmError};
use crate::guest::{GuestStatus, GUEST_ELF};
use crate::loader::{load_multiboot, write_multiboot_info};
use crate::state::{supported_msrs, StateSection, VcpuState, VCPU_SECTION};
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
/// Highest guest-physical address the workload guest maps (64 page
/// directories of 2 MiB pages): RAM above the hole ends there.
const MAX_MEM_END: u64 = 64 << 30;
/// RAM below 4 GiB ends here in a guest larger than this; the rest starts
/// at [`HIGH_MEM_BASE`] (the 3-4 GiB hole, where a PC has its PCI and
/// firmware ranges, as QEMU's `pc` machine lays out guests over 3.5 GiB).
pub const LOW_MEM_END: u64 = 3 << 30;
/// Where RAM above the hole starts.
pub const HIGH_MEM_BASE: u64 = 4 << 30;
/// Most vCPUs a VM may have (the workload guest runs a loop on up to 16).
pub const MAX_VCPUS: usize = 16;

/// How long [`Vm::resume`] gives its vCPU threads to start before it moves
/// one still queued behind a running sibling to another CPU. A thread that
/// finds a free CPU starts within 5-40 us of its wake-up here.
const MOVE_LATE_VCPUS_AFTER: std::time::Duration = std::time::Duration::from_micros(100);

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
    /// vCPUs (1..=[`MAX_VCPUS`]). vCPU 0 enters the image as multiboot says
    /// (with `EDX` = [`AP_MAGIC`]: the VMM starts the others); the others
    /// enter it with `EAX` = [`AP_MAGIC`] (vm/guest/GUEST.md).
    pub cpus: usize,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            mem_bytes: 256 << 20,
            kernel: None,
            cmdline: String::new(),
            dirty: DirtyBackend::Bitmap,
            cpus: 1,
        }
    }
}

/// `EAX` of a vCPU other than the first at the multiboot entry point
/// ("FERA"): the workload guest runs such a vCPU as an application processor.
pub const AP_MAGIC: u32 = 0x4645_5241;

/// Where `mem_bytes` of guest RAM go, as (guest-physical start, bytes): one
/// region at 0 up to [`LOW_MEM_END`], the rest from [`HIGH_MEM_BASE`]. Each
/// region is one KVM memory slot (slot number = index).
pub fn memory_layout(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= LOW_MEM_END {
        vec![(0, mem_bytes)]
    } else {
        vec![(0, LOW_MEM_END), (HIGH_MEM_BASE, mem_bytes - LOW_MEM_END)]
    }
}

/// A running (or paused) KVM guest.
#[derive(Debug)]
pub struct Vm {
    // Declared first so it is dropped first: the vCPU threads must be gone
    // before the guest memory is unmapped. Set once: at boot, or for an
    // incoming VM when the state arrives (as many vCPUs as it carries).
    vcpus: OnceLock<Vec<VcpuThread>>,
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    memory: GuestMem,
    msr_ids: Vec<u32>,
    mem_bytes: u64,
    dirty: DirtyBackend,
    manual_protect: bool,
    /// kHz, 0 until the vCPUs exist.
    tsc_khz: AtomicU32,
    cpuid: CpuId,
    /// The dirty ring, mapped when the vCPUs are created (their fds are free then).
    ring: std::sync::Mutex<Option<ferry_dirtylog::KvmDirtyRing>>,
    /// First to last vCPU out of `KVM_RUN` in the last pause, ns.
    pause_spread_ns: AtomicU64,
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
        let layout = memory_layout(mem_bytes);
        let end = layout.last().map_or(0, |&(gpa, len)| gpa + len);
        if mem_bytes < MIN_MEM || end > MAX_MEM_END || !mem_bytes.is_multiple_of(2 << 20) {
            return Err(VmError::MemorySize {
                bytes: mem_bytes,
                why: "must be a multiple of 2 MiB between 4 MiB and 63 GiB (RAM above the 3-4 GiB hole ends by 64 GiB)",
            });
        }
        // Guest RAM is mapped MAP_NORESERVE (no swap or commit reserved up
        // front, pages come as the guest touches them), so a guest up to the
        // host's RAM can be created; more than that can never be backed.
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
        let memory = map_guest_memory(&layout, host)?;
        for (slot, region) in memory.iter().enumerate() {
            let host_addr = region.as_ptr();
            let len = usize::try_from(region.len()).expect("a mapped region fits usize");
            advise(host_addr, len, populate).map_err(|source| VmError::Memory {
                bytes: mem_bytes,
                host_bytes: host,
                source,
            })?;
            let slot = kvm_userspace_memory_region {
                slot: u32::try_from(slot).expect("two regions at most"),
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host_addr as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned
            // by `memory`, which this Vm keeps until after the VM fd is closed.
            unsafe { vm_fd.set_user_memory_region(slot) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        // The interrupt controllers and the timer before any vCPU (each
        // vCPU then gets its in-kernel LAPIC).
        crate::devices::create(&vm_fd)?;

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_ids = supported_msrs(&kvm);
        let vm_fd = Arc::new(vm_fd);
        Ok(Self {
            kvm,
            vm_fd,
            memory,
            vcpus: OnceLock::new(),
            msr_ids,
            mem_bytes,
            dirty,
            manual_protect,
            tsc_khz: AtomicU32::new(0),
            cpuid,
            ring: std::sync::Mutex::new(None),
            pause_spread_ns: AtomicU64::new(0),
        })
    }

    /// Creates `count` paused vCPUs (once per VM), their dirty rings if the
    /// VM uses rings, and their threads.
    fn create_vcpus(&self, count: usize) -> Result<(), VmError> {
        // Held throughout: vCPUs are created once, by one caller.
        let mut ring_slot = self.ring.lock().expect("ring lock");
        if self.vcpus.get().is_some() {
            return Err(VmError::BadState("the VM already has its vCPUs".into()));
        }
        if !(1..=MAX_VCPUS).contains(&count) {
            return Err(VmError::VcpuCount {
                count,
                max: MAX_VCPUS,
            });
        }
        let mut fds = Vec::with_capacity(count);
        for index in 0..count {
            let id = u64::try_from(index).expect("at most MAX_VCPUS");
            let fd = self
                .vm_fd
                .create_vcpu(id)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid_for(&self.cpuid, index))
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            fds.push(fd);
        }
        if let Ok(khz) = fds[0].get_tsc_khz() {
            self.tsc_khz.store(khz, Ordering::Release);
        }
        if let DirtyBackend::Ring(bytes) = self.dirty {
            let refs: Vec<&kvm_ioctls::VcpuFd> = fds.iter().collect();
            let ring = ferry_dirtylog::KvmDirtyRing::new(
                self.vm_fd.clone(),
                self.slot_descs(),
                &refs,
                bytes,
            )
            .map_err(|source| VmError::DirtyLog {
                backend: "kvm-ring",
                source,
            })?;
            *ring_slot = Some(ring);
        }
        let handler = ring_slot
            .as_ref()
            .map(ferry_dirtylog::KvmDirtyRing::ring_full_handler);
        let mut threads = Vec::with_capacity(count);
        for (index, fd) in fds.into_iter().enumerate() {
            let vcpu = VcpuThread::spawn(fd, index).map_err(VmError::SpawnVcpu)?;
            if let Some(h) = handler.clone() {
                *vcpu.ctl.ring_full.lock().expect("ring-full hook lock") =
                    Some(Box::new(move || {
                        if let Err(e) = h.handle_ring_full() {
                            tracing::warn!(error = %e, "draining a full dirty ring failed");
                        }
                    }));
            }
            threads.push(vcpu);
        }
        self.vcpus
            .set(threads)
            .map_err(|_| VmError::BadState("the VM already has its vCPUs".into()))
    }

    fn vcpus(&self) -> &[VcpuThread] {
        self.vcpus.get().map_or(&[], Vec::as_slice)
    }

    /// Boots a guest: loads the image, writes the multiboot info, starts the vCPU.
    pub fn boot(cfg: &VmConfig) -> Result<Self, VmError> {
        let vm = Self::create(cfg.mem_bytes, cfg.dirty, false)?;
        vm.create_vcpus(cfg.cpus)?;
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
        let regions: Vec<(u64, u64)> = vm
            .memory
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        write_multiboot_info(&vm.memory, &regions, &cfg.cmdline).map_err(VmError::BadCmdline)?;
        // The VMM sets up every vCPU's entry state: no INIT/SIPI needed.
        for (index, vcpu) in vm.vcpus().iter().enumerate() {
            let fd = vcpu.fd().expect("a new vCPU is paused");
            let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            multiboot_sregs(&mut sregs);
            fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            let regs = if index == 0 {
                multiboot_regs(loaded.entry, AP_MAGIC)
            } else {
                ap_regs(loaded.entry, AP_MAGIC)
            };
            fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            // With an in-kernel LAPIC, KVM parks every vCPU but the first
            // until INIT/SIPI; ferry starts them itself.
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        }
        vm.resume()?;
        Ok(vm)
    }

    /// A VM to receive an incoming guest: memory populated, no vCPU yet:
    /// [`Vm::prepare_vcpus`] creates them ahead of the state, or else
    /// [`Vm::restore_state`] creates as many as the state carries.
    pub fn incoming(mem_bytes: u64, dirty: DirtyBackend) -> Result<Self, VmError> {
        Self::create(mem_bytes, dirty, true)
    }

    /// Creates an incoming VM's `count` vCPUs (paused) before its state
    /// arrives, so that [`Vm::restore_state`] only loads them (a
    /// migration's pause then does not wait for vCPU creation). Once per
    /// VM; the state must then carry exactly `count` vCPUs.
    pub fn prepare_vcpus(&self, count: usize) -> Result<(), VmError> {
        self.create_vcpus(count)
    }

    /// Pauses the guest: asks every vCPU to stop at once, then returns once
    /// all are out of `KVM_RUN`. [`Vm::pause_spread`] says how far apart
    /// the first and the last stopped.
    pub fn pause(&self) -> Result<(), VmError> {
        let vcpus = self.vcpus();
        for v in vcpus {
            v.request_pause();
        }
        let mut first_error = None;
        for v in vcpus {
            if let Err(e) = v.wait_paused() {
                first_error.get_or_insert(e);
            }
        }
        let stops = vcpus.iter().map(VcpuThread::stopped_at_unix_ns);
        let spread = stops
            .clone()
            .max()
            .unwrap_or(0)
            .saturating_sub(stops.min().unwrap_or(0));
        self.pause_spread_ns.store(spread, Ordering::Release);
        first_error.map_or(Ok(()), |e| Err(VmError::VcpuGone(e)))
    }

    /// Between the first and the last vCPU leaving `KVM_RUN` in the last
    /// [`Vm::pause`] (zero with one vCPU).
    pub fn pause_spread(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.pause_spread_ns.load(Ordering::Acquire))
    }

    /// Resumes the guest: every vCPU is asked to run, then this waits until
    /// all do. With several vCPUs, one still waiting for a CPU after 100 µs
    /// while a sibling runs the guest is moved off that sibling's CPU until
    /// it runs (its affinity is narrowed, never widened, and given back as
    /// it starts).
    pub fn resume(&self) -> Result<(), VmError> {
        let vcpus = self.vcpus();
        if vcpus.is_empty() {
            return Err(VmError::VcpuGone("the VM has no vCPU yet".into()));
        }
        // Every request before any wake-up: a woken vCPU may take this
        // thread's core before it gets to the next one.
        for v in vcpus {
            v.set_run_request().map_err(VmError::VcpuGone)?;
        }
        for v in vcpus {
            v.wake();
        }
        if vcpus.len() > 1 {
            // A vCPU still waiting for a CPU after a while is queued behind
            // something: once that is a sibling running the guest, it is
            // moved off that CPU (`VcpuThread::move_off`, once per thread).
            let mut late: Vec<&VcpuThread> = vcpus.iter().collect();
            loop {
                let until = std::time::Instant::now() + MOVE_LATE_VCPUS_AFTER;
                let mut still = Vec::new();
                for v in late {
                    if !v.wait_running_until(until).map_err(VmError::VcpuGone)? {
                        still.push(v);
                    }
                }
                late = still;
                if late.is_empty() {
                    break;
                }
                let busy: Vec<usize> = vcpus.iter().filter_map(|v| v.running_on()).collect();
                let moved = late.iter().filter(|v| v.move_off(&busy)).count();
                if moved > 0 {
                    tracing::debug!(moved, ?busy, "moved vCPU threads queued behind a sibling");
                }
            }
        }
        for v in vcpus {
            v.wait_running().map_err(VmError::VcpuGone)?;
        }
        Ok(())
    }

    /// Hint that [`Vm::resume`] comes soon (e.g. a migration's handover):
    /// the paused vCPU threads get ready so that the resume is quick.
    pub fn prepare_resume(&self) {
        for v in self.vcpus() {
            v.prepare_resume();
        }
    }

    /// When the guest last started running after a pause (ns since the Unix
    /// epoch, realtime clock; 0 before it first ran): the instant
    /// [`Vm::resume`] took effect on the last vCPU thread.
    pub fn resumed_at_unix_ns(&self) -> u64 {
        self.vcpus()
            .iter()
            .map(VcpuThread::resumed_at_unix_ns)
            .max()
            .unwrap_or(0)
    }

    /// When each vCPU last started running the guest after a pause (ns
    /// since the Unix epoch, realtime clock; 0 before it first ran), by
    /// vCPU index. Once [`Vm::resume`] returned, every one of them is this
    /// resume's.
    pub fn vcpu_resumed_at_unix_ns(&self) -> Vec<u64> {
        self.vcpus()
            .iter()
            .map(VcpuThread::resumed_at_unix_ns)
            .collect()
    }

    /// The number of vCPUs (0 for an incoming VM before its state arrived).
    pub fn vcpu_count(&self) -> usize {
        self.vcpus().len()
    }

    /// Where the vCPUs are: failed if any failed, running if any runs.
    pub fn run_state(&self) -> RunState {
        let states: Vec<RunState> = self.vcpus().iter().map(|v| v.ctl.state()).collect();
        if let Some(f) = states.iter().find(|s| matches!(s, RunState::Failed(_))) {
            return f.clone();
        }
        if states.contains(&RunState::Running) {
            return RunState::Running;
        }
        states.into_iter().next().unwrap_or(RunState::Paused)
    }

    /// Saves the state of a paused VM as sections: one `vcpu` section per
    /// vCPU (with its LAPIC, events and MP state), then the `irqchip`,
    /// `pit` and `clock` sections ([`crate::VM_SECTIONS`] lists what
    /// [`Vm::restore_state`] reads).
    pub fn save_state(&self) -> Result<Vec<StateSection>, VmError> {
        let mut sections = Vec::with_capacity(self.vcpus().len() + 5);
        for (index, v) in self.vcpus().iter().enumerate() {
            let fd = v.fd().ok_or(VmError::NotPaused("save_state"))?;
            let index = u32::try_from(index).expect("at most MAX_VCPUS");
            sections.push(VcpuState::save(&fd, &self.msr_ids)?.to_section(index));
        }
        sections.extend(crate::devices::save(&self.vm_fd)?);
        Ok(sections)
    }

    /// Restores sections made by [`Vm::save_state`] into a paused VM; an
    /// incoming VM gets as many vCPUs as there are `vcpu` sections, which
    /// must be instances `0..n`. A section this VM does not read is an error.
    pub fn restore_state(&self, sections: &[StateSection]) -> Result<(), VmError> {
        // Checked before anything is written into the VM.
        let devices = crate::devices::DeviceState::parse(sections)?;
        let mut vcpus: Vec<Option<VcpuState>> = Vec::new();
        for s in sections {
            if crate::devices::is_device_section(&s.name) {
                continue;
            }
            if s.name != VCPU_SECTION.name {
                return Err(VmError::BadState(format!("unknown section `{}`", s.name)));
            }
            let index = usize::try_from(s.instance).unwrap_or(usize::MAX);
            if index >= MAX_VCPUS {
                return Err(VmError::VcpuCount {
                    count: index.saturating_add(1),
                    max: MAX_VCPUS,
                });
            }
            if vcpus.len() <= index {
                vcpus.resize_with(index + 1, || None);
            }
            if vcpus[index].replace(VcpuState::from_section(s)?).is_some() {
                return Err(VmError::BadState(format!("vCPU {index} appears twice")));
            }
        }
        let vcpus: Vec<VcpuState> = vcpus
            .into_iter()
            .enumerate()
            .map(|(i, v)| v.ok_or_else(|| VmError::BadState(format!("no state for vCPU {i}"))))
            .collect::<Result<_, _>>()?;
        if vcpus.is_empty() {
            return Err(VmError::BadState("no vCPU state".into()));
        }
        if self.vcpus.get().is_none() {
            self.create_vcpus(vcpus.len())?;
        }
        if vcpus.len() != self.vcpus().len() {
            return Err(VmError::BadState(format!(
                "the state carries {} vCPU(s), this VM has {} (created as announced)",
                vcpus.len(),
                self.vcpus().len()
            )));
        }
        for (s, v) in vcpus.iter().zip(self.vcpus()) {
            let fd = v.fd().ok_or(VmError::NotPaused("restore_state"))?;
            s.restore(&fd)?;
        }
        devices.restore(&self.vm_fd)
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
        Some(self.tsc_khz.load(Ordering::Acquire)).filter(|&k| k != 0)
    }

    /// One dirty-log slot per memory region (slot number = region index).
    fn slot_descs(&self) -> Vec<ferry_dirtylog::MemorySlot> {
        self.memory
            .iter()
            .enumerate()
            .map(|(slot, r)| ferry_dirtylog::MemorySlot {
                slot: u32::try_from(slot).expect("two regions at most"),
                guest_phys_addr: r.start_addr().0,
                pages: usize::try_from(r.len() / 4096).expect("a mapped region fits usize"),
            })
            .collect()
    }

    fn slot_logging(&self) -> SlotLogging {
        SlotLogging {
            vm_fd: self.vm_fd.clone(),
            slots: self
                .memory
                .iter()
                .enumerate()
                .map(|(slot, r)| kvm_userspace_memory_region {
                    slot: u32::try_from(slot).expect("two regions at most"),
                    flags: 0,
                    guest_phys_addr: r.start_addr().0,
                    memory_size: r.len(),
                    userspace_addr: r.as_ptr() as u64,
                })
                .collect(),
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
                    self.slot_descs(),
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

    /// Auto-converge: every vCPU sleeps `percent` % of its time (0 = off,
    /// which also lifts every per-vCPU throttle); each vCPU thread
    /// throttles itself.
    pub fn set_throttle(&self, percent: u8) {
        for v in self.vcpus() {
            v.ctl.set_throttle(percent);
        }
    }

    /// Dirty-limit: vCPU `index` alone sleeps `percent` % of its time (0 =
    /// off); the others keep theirs.
    pub fn set_vcpu_throttle(&self, index: usize, percent: u8) -> Result<(), VmError> {
        let vcpus = self.vcpus();
        let v = vcpus.get(index).ok_or(VmError::NoSuchVcpu {
            index,
            count: vcpus.len(),
        })?;
        v.ctl.set_throttle(percent);
        Ok(())
    }

    /// Each vCPU's throttle in force, percent (index = vCPU).
    pub fn vcpu_throttles(&self) -> Vec<u8> {
        self.vcpus().iter().map(|v| v.ctl.throttle()).collect()
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

/// Maps guest RAM, one anonymous private mapping per region of `layout`,
/// `MAP_NORESERVE`: nothing is committed up front, so the size is bounded by
/// what the host can back as the guest touches it, not by overcommit rules.
fn map_guest_memory(layout: &[(u64, u64)], host: u64) -> Result<GuestMem, VmError> {
    let total: u64 = layout.iter().map(|&(_, len)| len).sum();
    let map_err = |source: std::io::Error| VmError::Memory {
        bytes: total,
        host_bytes: host,
        source,
    };
    let mut regions = Vec::with_capacity(layout.len());
    for &(gpa, len) in layout {
        let size = usize::try_from(len).map_err(|_| VmError::MemorySize {
            bytes: total,
            why: "does not fit the address space",
        })?;
        let mapping = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()
            .map_err(|e| map_err(std::io::Error::other(e.to_string())))?;
        regions.push(
            GuestRegionMmap::new(mapping, GuestAddress(gpa))
                .ok_or_else(|| map_err(std::io::Error::other("region wraps the address space")))?,
        );
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| map_err(std::io::Error::other(e.to_string())))
}

/// THP for guest RAM (fewer faults, faster fill); on the receive side also
/// populate now, so the stream does not wait on first-touch faults
/// (PLATFORM.md). Populating fails (ENOMEM) when the host cannot back the
/// whole guest: that destination could never hold it.
fn advise(addr: *mut u8, len: usize, populate: bool) -> Result<(), std::io::Error> {
    // SAFETY: the range is a private anonymous mapping of guest memory
    // owned by the caller.
    unsafe { ferry_dirtylog::advise_huge_pages(addr, len, populate) }
}

/// The TSC frequency (kHz) KVM gives guests on this host, which the workload
/// guest needs for pacing (`tsc_khz=`).
pub fn host_tsc_khz() -> Result<u32, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    vcpu.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))
}

/// The supported CPUID with vCPU `index`'s APIC ID in it (leaf 1 `EBX[31:24]`,
/// leaves 0xB and 0x1F `EDX`).
fn cpuid_for(supported: &CpuId, index: usize) -> CpuId {
    let mut cpuid = supported.clone();
    let id = u32::try_from(index).expect("at most MAX_VCPUS");
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00FF_FFFF) | (id << 24),
            0xB | 0x1F => e.edx = id,
            _ => {}
        }
    }
    cpuid
}
