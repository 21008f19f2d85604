//! [`MigratableVm`] for `ferry_vm::Vm`, the project's own KVM VM.

use ferry_dirtylog::DirtyLog;
use ferry_vm::{StateSection, Vm};

use crate::sections::{DeviceSection, SectionSpec};
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

    fn prepare_vcpus(&self, count: usize) -> Result<(), VmOpError> {
        Ok(Vm::prepare_vcpus(self, count)?)
    }

    fn prepare_resume(&self) {
        Vm::prepare_resume(self);
    }

    fn resumed_at_unix_ns(&self) -> Option<u64> {
        Some(Vm::resumed_at_unix_ns(self)).filter(|&t| t != 0)
    }

    fn section_specs(&self) -> Vec<SectionSpec> {
        ferry_vm::VM_SECTIONS
            .iter()
            .map(|s| SectionSpec {
                name: s.name,
                version: s.version,
                max_bytes: s.max_bytes,
                max_instances: s.max_instances,
            })
            .collect()
    }

    /// One section per device: a `vcpu` section per vCPU.
    fn save_sections(&self) -> Result<Vec<DeviceSection>, VmOpError> {
        Ok(Vm::save_state(self)?
            .into_iter()
            .map(|s| DeviceSection {
                name: s.name,
                instance: s.instance,
                version: s.version,
                data: s.data,
            })
            .collect())
    }

    fn restore_sections(&self, sections: &[DeviceSection]) -> Result<(), VmOpError> {
        let sections: Vec<StateSection> = sections
            .iter()
            .map(|s| StateSection {
                name: s.name.clone(),
                instance: s.instance,
                version: s.version,
                data: s.data.clone(),
            })
            .collect();
        Ok(Vm::restore_state(self, &sections)?)
    }

    /// The VM's own log: KVM's (bitmap, manual-protect where offered, or
    /// ring) OR the VMM's writes, logging on while started.
    fn dirty_log(&self) -> Result<Box<dyn DirtyLog>, VmOpError> {
        Ok(Vm::dirty_log(self)?)
    }

    fn set_throttle(&self, percent: u8) {
        Vm::set_throttle(self, percent);
    }

    fn vcpu_count(&self) -> usize {
        Vm::vcpu_count(self)
    }

    fn set_vcpu_throttle(&self, index: usize, percent: u8) -> Result<(), VmOpError> {
        Ok(Vm::set_vcpu_throttle(self, index, percent)?)
    }
}
