//! userfaultfd: the few ioctls write-protect tracking needs, defined by hand
//! (this machine's headers are Linux 6.1; `WP_ASYNC` came in 6.7).
#![allow(missing_docs)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::DirtyLogError;

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;
/// Write-protect faults on not-yet-populated memory too.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Write-protect faults resolved by the kernel itself (no fault messages).
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `userfaultfd(2)` flag: only user-mode faults (no privilege needed).
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

#[repr(C)]
#[derive(Debug, Default)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, UFFDIO, 0x06, UffdioWriteprotect);

/// Creates a userfaultfd for the **calling** process's memory.
///
/// A userfaultfd always acts on the memory of the process that created it,
/// whoever holds the fd later. To track another process, that process calls
/// this (it is one system call, safe between `fork` and `exec`) and passes the
/// fd over a UNIX socket (`SCM_RIGHTS`), or the tracker takes it with
/// `pidfd_getfd(2)`; then [`ProcessMemoryLog::with_userfaultfd`](crate::ProcessMemoryLog::with_userfaultfd).
pub fn create_userfaultfd() -> Result<OwnedFd, DirtyLogError> {
    // SAFETY: userfaultfd(2) takes flags only; the result is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
        )
    };
    if fd < 0 {
        return Err(DirtyLogError::CreateUserfaultfd(io::Error::last_os_error()));
    }
    let fd = i32::try_from(fd)
        .map_err(|_| DirtyLogError::CreateUserfaultfd(io::Error::from_raw_os_error(libc::EBADF)))?;
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `UFFDIO_API` handshake asking for async write-protect.
pub fn api_wp_async(uffd: &OwnedFd) -> Result<(), DirtyLogError> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
        ioctls: 0,
    };
    // SAFETY: `uffd` is a userfaultfd; `api` is a valid uffdio_api.
    let ret = unsafe { ioctl_with_mut_ref(uffd, UFFDIO_API(), &mut api) };
    if ret < 0 {
        return Err(DirtyLogError::UffdApi(io::Error::last_os_error()));
    }
    Ok(())
}

/// `UFFDIO_REGISTER` in write-protect mode.
pub fn register_wp(uffd: &impl AsRawFd, start: u64, len: u64) -> Result<(), DirtyLogError> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: `uffd` is a userfaultfd; `reg` is a valid uffdio_register.
    let ret = unsafe { ioctl_with_mut_ref(uffd, UFFDIO_REGISTER(), &mut reg) };
    if ret < 0 {
        return Err(DirtyLogError::UffdRegister {
            start,
            len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// `UFFDIO_WRITEPROTECT`: protect (`protect`) or unprotect a range.
pub fn write_protect(
    uffd: &impl AsRawFd,
    start: u64,
    len: u64,
    protect: bool,
) -> Result<(), DirtyLogError> {
    let mut wp = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        },
    };
    // SAFETY: `uffd` is a userfaultfd; `wp` is a valid uffdio_writeprotect.
    let ret = unsafe { ioctl_with_mut_ref(uffd, UFFDIO_WRITEPROTECT(), &mut wp) };
    if ret < 0 {
        return Err(DirtyLogError::UffdWriteProtect {
            start,
            len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}
