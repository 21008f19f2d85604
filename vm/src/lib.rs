//! # ferry-vm: a minimal KVM VM that ferry can run and migrate
//!
//! One or more vCPUs, memory like a PC's (one region at guest-physical 0; a
//! guest over 3 GiB has RAM below a hole at 3-4 GiB and the rest above
//! 4 GiB, one KVM slot per region), an in-kernel interrupt controller
//! (PICs, IOAPIC, a LAPIC per vCPU) and PIT, no other devices: enough to
//! run the workload guest of GUEST.md (or any multiboot image that follows
//! it; with several vCPUs, a timer or memory above 4 GiB, vm/guest/GUEST.md),
//! pause all its vCPUs from another thread, save and restore their state and
//! the devices' as sections, and read its status block. Built on the rust-vmm crates (`kvm-ioctls`,
//! `kvm-bindings`, `vm-memory`).
//!
//! ```no_run
//! use ferry_vm::{Vm, VmConfig, DirtyBackend};
//! let vm = Vm::boot(&VmConfig {
//!     mem_bytes: 256 << 20,
//!     kernel: None, // the built-in workload guest
//!     cmdline: "rate=2000 tsc_khz=2300000".into(),
//!     dirty: DirtyBackend::Bitmap,
//!     cpus: 2,
//! })?;
//! vm.wait_running(std::time::Duration::from_secs(60))?;
//! println!("{}", vm.status());
//! vm.pause()?;
//! let sections = vm.save_state()?; // a `vcpu` section per vCPU, irqchip, pit, clock
//! # Ok::<(), ferry_vm::VmError>(())
//! ```
#![deny(missing_docs)]

mod devices;
mod dirty;
mod entry;
mod error;
mod guest;
mod loader;
mod state;
pub mod testing;
mod vcpu;
mod vm;

pub use devices::{CLOCK_SECTION, IRQCHIP_SECTION, MAX_CLOCK_ADVANCE, PIT_SECTION};
pub use dirty::VmDirtyLog;
pub use error::VmError;
pub use guest::{
    guest_elf_path, parse_size, GuestFill, GuestParams, GuestPhase, GuestStatus, VcpuCounters,
    FILL_BASE, GUEST_ELF, GUEST_MAX_CPUS, GUEST_MAX_HZ, GUEST_MIN_HZ, STATUS_ADDR,
};
pub use loader::{load_multiboot, LoadedImage};
pub use state::{SectionInfo, StateSection, VCPU_SECTION, VM_SECTIONS};
pub use vcpu::RunState;
pub use vm::{
    host_tsc_khz, memory_layout, DirtyBackend, GuestMem, Vm, VmConfig, AP_MAGIC, HIGH_MEM_BASE,
    LOW_MEM_END, MAX_VCPUS,
};
