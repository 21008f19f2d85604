//! The VM's dirty log: KVM's (bitmap or ring) OR the VMM's own writes
//! (vm-memory's per-region bitmap), with the memory slot's
//! `KVM_MEM_LOG_DIRTY_PAGES` flag on exactly while the log is started.

use std::sync::Arc;

use ferry_dirtylog::{
    CollectStats, DirtyBitmap, DirtyLog, DirtyLogError, Reprotect, WithVmmWrites,
};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;

use crate::vm::GuestMem;

/// Turns dirty logging on and off for every memory slot of the VM.
#[derive(Debug, Clone)]
pub(crate) struct SlotLogging {
    pub(crate) vm_fd: Arc<VmFd>,
    /// The slots as created (flags 0).
    pub(crate) slots: Vec<kvm_userspace_memory_region>,
}

impl SlotLogging {
    pub(crate) fn set(&self, on: bool) -> Result<(), kvm_ioctls::Error> {
        for slot in &self.slots {
            let slot = kvm_userspace_memory_region {
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                ..*slot
            };
            // SAFETY: the same mapping the slot was created with; the Vm that
            // owns it outlives this call (the log holds the Vm's memory handle too).
            unsafe { self.vm_fd.set_user_memory_region(slot) }?;
        }
        Ok(())
    }
}

/// A started-on-demand dirty log over the whole guest.
pub struct VmDirtyLog {
    inner: WithVmmWrites<Box<dyn DirtyLog>, GuestMem>,
    slot: SlotLogging,
    logging: bool,
}

impl std::fmt::Debug for VmDirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmDirtyLog")
            .field("backend", &self.inner.inner().name())
            .field("logging", &self.logging)
            .finish()
    }
}

impl VmDirtyLog {
    /// Wraps `kvm_log`; the slot's logging flag must already be on.
    pub(crate) fn new(kvm_log: Box<dyn DirtyLog>, memory: GuestMem, slot: SlotLogging) -> Self {
        Self {
            inner: WithVmmWrites::new(kvm_log, memory),
            slot,
            logging: true,
        }
    }

    fn logging_off(&mut self) {
        if self.logging {
            if let Err(e) = self.slot.set(false) {
                tracing::warn!(error = %e, "could not turn KVM dirty logging off");
            }
            self.logging = false;
        }
    }
}

impl DirtyLog for VmDirtyLog {
    fn name(&self) -> &'static str {
        self.inner.inner().name()
    }
    fn pages(&self) -> usize {
        self.inner.pages()
    }
    fn start(&mut self) -> Result<(), DirtyLogError> {
        self.inner.start()
    }
    fn collect(
        &mut self,
        out: &mut DirtyBitmap,
        reprotect: Reprotect,
    ) -> Result<CollectStats, DirtyLogError> {
        self.inner.collect(out, reprotect)
    }
    fn reprotect(&mut self, first_page: usize, words: &[u64]) -> Result<(), DirtyLogError> {
        self.inner.reprotect(first_page, words)
    }
    fn take_vcpu_dirty_counts(&mut self) -> Option<Vec<u64>> {
        self.inner.take_vcpu_dirty_counts()
    }
    fn stop(&mut self) -> Result<(), DirtyLogError> {
        let r = self.inner.stop();
        self.logging_off();
        r
    }
}

impl Drop for VmDirtyLog {
    fn drop(&mut self) {
        if self.logging {
            let _ = self.inner.stop();
            self.logging_off();
        }
    }
}
