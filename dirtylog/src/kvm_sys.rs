//! KVM ioctl numbers and constants that `kvm-ioctls` does not wrap.
#![allow(missing_docs)]

use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log, KVMIO};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// `struct kvm_dirty_gfn` flag: KVM published this entry.
pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// `struct kvm_dirty_gfn` flag: userspace harvested it, KVM may reset it.
pub const KVM_DIRTY_GFN_F_RESET: u32 = 1 << 1;

/// Converts the `errno` of the last failed call into an `io::Error`.
pub fn last_os_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Converts a `kvm-ioctls` error into an `io::Error`.
pub fn kvm_err(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}
