//! [`MigratableVm`] for `ferry_vm::Vm`, the project's own KVM VM.

use ferry_dirtylog::DirtyLog;
use ferry_vm::Vm;

use crate::vm::{GuestMemoryMmap, MigratableVm, VmOpError};

impl MigratableVm for Vm {
    fn memory(&self) -> &GuestMemoryMmap {
        Vm::memory(self)
    }

    fn pause(&self) -> Result<(), VmOpError> {
        Ok(Vm::pause(self)?)
    }

    fn pause_spread(&self) -> Option<std::time::Duration> {
        Some(Vm::pause_spread(self))
    }

    fn resume(&self) -> Result<(), VmOpError> {
        Ok(Vm::resume(self)?)
    }

    fn prepare_resume(&self) {
        Vm::prepare_resume(self);
    }

    fn resumed_at_unix_ns(&self) -> Option<u64> {
        Some(Vm::resumed_at_unix_ns(self)).filter(|&t| t != 0)
    }

    fn save_state(&self) -> Result<Vec<u8>, VmOpError> {
        Ok(Vm::save_state(self)?)
    }

    fn restore_state(&self, blob: &[u8]) -> Result<(), VmOpError> {
        Ok(Vm::restore_state(self, blob)?)
    }

    /// The VM's own log: KVM's (bitmap, manual-protect where offered, or
    /// ring) OR the VMM's writes, logging on while started.
    fn dirty_log(&self) -> Result<Box<dyn DirtyLog>, VmOpError> {
        Ok(Vm::dirty_log(self)?)
    }

    fn set_throttle(&self, percent: u8) {
        Vm::set_throttle(self, percent);
    }
}
