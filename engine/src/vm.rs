//! What the engine needs from a VM.

use ferry_dirtylog::DirtyLog;

use crate::sections::{DeviceSection, SectionSpec};

/// Guest memory as rust-vmm VMMs hold it, with vm-memory's dirty bitmap for
/// the VMM's own writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Error of a VM operation, whatever the VMM's error type.
pub type VmOpError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A VM the engine can migrate. The source side uses everything; the
/// destination side `memory`, `prepare_vcpus`, `section_specs`,
/// `restore_sections` and `resume` (its VM is created paused, memory
/// prepared, by the caller's `make_vm`).
///
/// vCPU and device state travel as [`DeviceSection`]s: each device of the
/// VMM saves its own named, versioned sections, and says in
/// `section_specs` which ones it reads back (newest version, size limit).
/// The engine carries them opaquely and refuses, before GO, a stream with a
/// section the destination does not read (see [`crate::sections`]).
///
/// Implementations must be usable from several threads: encoder threads
/// read `memory()` while the source thread pauses, resumes and throttles.
pub trait MigratableVm: Send + Sync {
    /// Guest memory. On the destination it must start zeroed and be
    /// populated already (faulting it in during the stream is slow).
    fn memory(&self) -> &GuestMemoryMmap;
    /// Stop the vCPUs (they stay stopped until `resume`).
    fn pause(&self) -> Result<(), VmOpError>;
    /// How far apart the first and the last vCPU stopped in the last
    /// `pause`, if the VMM measures it.
    fn pause_spread(&self) -> Option<std::time::Duration> {
        None
    }
    /// Let the vCPUs run again.
    fn resume(&self) -> Result<(), VmOpError>;
    /// Destination: create the `count` vCPUs the source announced
    /// (paused), before the stream, so that `restore_sections` in the
    /// pause only loads their state. A count this VM cannot have is an
    /// error (the migration is refused before any page moves); the state
    /// that arrives later must then carry exactly `count` vCPUs. The
    /// default does nothing: a VMM that makes its vCPUs at restore.
    fn prepare_vcpus(&self, count: usize) -> Result<(), VmOpError> {
        let _ = count;
        Ok(())
    }
    /// Hint that `resume` comes within a few hundred milliseconds (the
    /// destination calls it when the last pages are in): a VMM can wake its
    /// vCPU threads now so that the resume, which is downtime, is quick.
    fn prepare_resume(&self) {}
    /// When the last `resume` took effect (the vCPUs entered the guest), ns
    /// since the Unix epoch on the realtime clock, if the VMM knows; else
    /// the engine takes the instant `resume` returned.
    fn resumed_at_unix_ns(&self) -> Option<u64> {
        None
    }
    /// The sections this VM reads: name, newest version, size limit,
    /// instances.
    fn section_specs(&self) -> Vec<SectionSpec>;
    /// The vCPU and device state as sections; the VM is paused.
    fn save_sections(&self) -> Result<Vec<DeviceSection>, VmOpError>;
    /// Load the source VM's sections (each already checked against
    /// `section_specs`); the VM is paused.
    fn restore_sections(&self, sections: &[DeviceSection]) -> Result<(), VmOpError>;
    /// A dirty log over the guest memory, not yet started. It must include
    /// the VMM's own writes to guest memory.
    fn dirty_log(&self) -> Result<Box<dyn DirtyLog>, VmOpError>;
    /// Auto-converge: take `percent` (0..=99) of every vCPU's time away.
    /// It replaces every per-vCPU throttle (0 lifts them all: the engine
    /// calls it when a migration ends or fails).
    fn set_throttle(&self, percent: u8);
    /// vCPUs of the VM: the index range of `set_vcpu_throttle` and of the
    /// dirty log's per-vCPU counts
    /// ([`DirtyLog::take_vcpu_dirty_counts`], same order).
    fn vcpu_count(&self) -> usize;
    /// Dirty-limit: take `percent` (0..=99) of vCPU `index`'s time away,
    /// the others unchanged. An index past `vcpu_count` is an error.
    fn set_vcpu_throttle(&self, index: usize, percent: u8) -> Result<(), VmOpError>;
}
