//! Errors of the `vm` crate.

use std::io;

/// What went wrong while creating, running or migrating a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it? try `ls -l /dev/kvm`)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Kvm {
        /// The operation, e.g. `KVM_CREATE_VM`.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest memory could not be reserved.
    #[error("cannot reserve {bytes} bytes of guest memory (the host has {host_bytes} bytes of RAM; try a smaller --mem)")]
    Memory {
        /// Requested size.
        bytes: u64,
        /// Host RAM.
        host_bytes: u64,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The requested memory size is not usable.
    #[error("invalid guest memory size {bytes} bytes: {why}")]
    MemorySize {
        /// Requested size.
        bytes: u64,
        /// Why it is refused.
        why: &'static str,
    },
    /// Reading or writing guest memory failed.
    #[error("guest memory access at {addr:#x} failed")]
    GuestMemory {
        /// Guest-physical address.
        addr: u64,
        /// Underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The kernel image could not be read.
    #[error("cannot read kernel image {path}")]
    ReadKernel {
        /// Path of the image.
        path: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The kernel image is not a usable multiboot image.
    #[error("{path} is not a multiboot v1 image ferry can load: {why}")]
    BadKernel {
        /// Path of the image.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// The guest command line is invalid.
    #[error("invalid guest command line: {0}")]
    BadCmdline(String),
    /// The VM cannot have this many vCPUs.
    #[error("{count} vCPUs requested (1..={max} supported)")]
    VcpuCount {
        /// Requested.
        count: usize,
        /// Most supported.
        max: usize,
    },
    /// A vCPU index past the VM's vCPUs.
    #[error("no vCPU {index}: the VM has {count}")]
    NoSuchVcpu {
        /// The index asked for.
        index: usize,
        /// vCPUs of the VM.
        count: usize,
    },
    /// The vCPU thread could not be started.
    #[error("cannot start the vCPU thread")]
    SpawnVcpu(#[source] io::Error),
    /// The vCPU thread is gone (the guest crashed or the VM was shut down).
    #[error("the vCPU is not running: {0}")]
    VcpuGone(String),
    /// An operation needs a paused VM.
    #[error("{0} needs the VM paused")]
    NotPaused(&'static str),
    /// Saved state is unusable.
    #[error("invalid saved state: {0}")]
    BadState(String),
    /// The guest did not reach a state in time.
    #[error("the guest did not {what} within {secs} s (phase {phase:#x}); {hint}")]
    GuestTimeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        secs: u64,
        /// The guest's phase word.
        phase: u64,
        /// What to do.
        hint: &'static str,
    },
    /// The guest reported a fatal error or stopped.
    #[error("the guest failed: {0}")]
    GuestFailed(String),
    /// Dirty logging could not be set up.
    #[error("dirty logging ({backend}) could not be set up")]
    DirtyLog {
        /// Backend name.
        backend: &'static str,
        /// Underlying error.
        #[source]
        source: ferry_dirtylog::DirtyLogError,
    },
}

/// Shorthand used across the crate.
pub(crate) fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}
