//! [`DirtyLogError`]: every way collecting a dirty log can fail.

use std::io;

/// A failed dirty-log operation. One variant per operation; the OS error is
/// the `#[source]`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirtyLogError {
    /// A slot or range description is unusable.
    #[error("invalid memory layout: {0}")]
    InvalidLayout(String),
    /// A bitmap handed to `collect` has the wrong size.
    #[error("bitmap covers {got} pages, the log covers {expected}")]
    BitmapSize {
        /// Pages the log covers.
        expected: usize,
        /// Pages the bitmap covers.
        got: usize,
    },
    /// `reprotect` got a range that is not 64-page aligned or not inside the log.
    #[error(
        "reprotect range at page {first_page} ({pages} pages) is not 64-aligned or out of range"
    )]
    ReprotectRange {
        /// First page of the range.
        first_page: usize,
        /// Pages in the range.
        pages: usize,
    },
    /// `collect`/`reprotect` called before `start`.
    #[error("the dirty log is not started")]
    NotStarted,
    /// `KVM_ENABLE_CAP` failed.
    #[error("KVM_ENABLE_CAP({cap}) failed (it must be enabled before memory slots / vCPUs exist)")]
    EnableCap {
        /// The capability number.
        cap: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel lacks a KVM capability a backend needs.
    #[error("KVM lacks capability {0}")]
    MissingCap(&'static str),
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("KVM_GET_DIRTY_LOG on slot {slot} failed (was the slot created with KVM_MEM_LOG_DIRTY_PAGES?)")]
    GetDirtyLog {
        /// The memory slot.
        slot: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `KVM_CLEAR_DIRTY_LOG` failed.
    #[error("KVM_CLEAR_DIRTY_LOG on slot {slot}, pages {first_page}+{pages} failed")]
    ClearDirtyLog {
        /// The memory slot.
        slot: u32,
        /// First page (slot-relative).
        first_page: u64,
        /// Number of pages.
        pages: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Mapping a vCPU's dirty ring failed.
    #[error("mapping the dirty ring of vCPU {vcpu} failed (was the ring enabled before the vCPU was created?)")]
    MapRing {
        /// Position of the vCPU in the list given to the backend.
        vcpu: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `KVM_RESET_DIRTY_RINGS` failed.
    #[error("KVM_RESET_DIRTY_RINGS failed")]
    ResetRings(#[source] io::Error),
    /// `KVM_RESET_DIRTY_RINGS` stopped before it had re-protected every
    /// entry handed back: the pages of the entries it had taken but not
    /// re-protected stay writable and their next writes are never logged,
    /// so the log can no longer be trusted (until logging is restarted).
    #[error(
        "KVM_RESET_DIRTY_RINGS re-protected {reset} of the {handed_back} entries handed back: \
         some guest pages may be written without being logged"
    )]
    ResetCutShort {
        /// Entries the ioctl reported reset.
        reset: usize,
        /// Entries handed back (flagged RESET) since the previous reset.
        handed_back: usize,
    },
    /// A ring entry named a slot or offset the log does not know.
    #[error("dirty ring entry for slot {slot} offset {offset} is outside the tracked slots")]
    RingEntryOutOfRange {
        /// Slot id as KVM reports it (address space in the high 16 bits).
        slot: u32,
        /// Page offset in the slot.
        offset: u64,
    },
    /// Creating a userfaultfd failed.
    #[error("userfaultfd() failed")]
    CreateUserfaultfd(#[source] io::Error),
    /// The `UFFDIO_API` handshake failed.
    #[error("UFFDIO_API handshake failed (kernel lacks userfaultfd WP_ASYNC/WP_UNPOPULATED, Linux >= 6.7?)")]
    UffdApi(#[source] io::Error),
    /// `UFFDIO_REGISTER` failed.
    #[error("UFFDIO_REGISTER(MODE_WP) of {start:#x}+{len:#x} failed")]
    UffdRegister {
        /// Range start.
        start: u64,
        /// Range length.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `UFFDIO_WRITEPROTECT` failed.
    #[error("UFFDIO_WRITEPROTECT of {start:#x}+{len:#x} failed")]
    UffdWriteProtect {
        /// Range start.
        start: u64,
        /// Range length.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Opening `/proc/PID/pagemap` failed.
    #[error("opening /proc/{pid}/pagemap failed")]
    OpenPagemap {
        /// The process.
        pid: i32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The `PAGEMAP_SCAN` ioctl failed.
    #[error("PAGEMAP_SCAN of {start:#x}..{end:#x} failed (kernel older than 6.7?)")]
    PagemapScan {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading `/proc/PID/pagemap` failed.
    #[error("reading /proc/{pid}/pagemap failed")]
    ReadPagemap {
        /// The process.
        pid: i32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing `/proc/PID/clear_refs` failed.
    #[error("writing /proc/{pid}/clear_refs failed")]
    ClearRefs {
        /// The process.
        pid: i32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel does not track soft-dirty bits.
    #[error("soft-dirty tracking is not available: this kernel lacks CONFIG_MEM_SOFT_DIRTY (pagemap bit 55 stays 0 after a write); use ProcessMemoryLog instead")]
    SoftDirtyUnsupported,
    /// Probing soft-dirty support failed.
    #[error("probing soft-dirty support failed")]
    SoftDirtyProbe(#[source] io::Error),
    /// A libxenctrl call failed.
    #[error("libxenctrl {call} failed for domain {domid}")]
    Xen {
        /// The libxenctrl function.
        call: &'static str,
        /// The domain.
        domid: u32,
        /// The OS error (errno after the call).
        #[source]
        source: io::Error,
    },
}
