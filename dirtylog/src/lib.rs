//! # ferry-dirtylog: which pages changed?
//!
//! One trait, [`DirtyLog`], for "give me the pages dirtied since last time,
//! and reset", and a dense [`DirtyBitmap`] shared by all backends:
//!
//! | backend | source | notes |
//! |---|---|---|
//! | [`KvmBitmapLog`] | `KVM_GET_DIRTY_LOG` per slot | with [`enable_manual_protect`]: `KVM_CLEAR_DIRTY_LOG` in 64-page chunks, [`Reprotect::Deferred`] |
//! | [`KvmDirtyRing`] | per-vCPU dirty rings | [`enable_dirty_ring`] before vCPUs; [`RingFullHandler`] for ring-full exits |
//! | [`ProcessMemoryLog`] | userfaultfd WP-async + `PAGEMAP_SCAN` | any process's memory, CRIU-style |
//! | [`SoftDirtyLog`] | `/proc/PID/clear_refs` + pagemap bit 55 | only where [`soft_dirty_supported`] |
//! | `XenLogDirty` | libxenctrl shadow log-dirty | cargo feature `xen` |
//! | [`WithVmmWrites`] | any backend OR the VMM's own writes | KVM does not log host writes |
//!
//! ## Wiring it into a VMM
//!
//! 1. Bitmap with manual protect: call [`enable_manual_protect`] right after
//!    creating the VM, before any memory slot. Ring: call
//!    [`enable_dirty_ring`] before creating any vCPU.
//! 2. Create the memory slots with `KVM_MEM_LOG_DIRTY_PAGES`, each starting
//!    on a 256 KiB boundary; describe them as [`MemorySlot`]s.
//! 3. Ring: build one [`KvmDirtyRing`] after the vCPUs exist (clone it to
//!    hand out more logs); give each vCPU thread its
//!    [`KvmDirtyRing::ring_full_handler`] and, on
//!    `VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)`, call
//!    [`RingFullHandler::handle_ring_full`] before re-entering `KVM_RUN`.
//! 4. Wrap the log in [`WithVmmWrites`] with a clone of the VMM's
//!    `GuestMemoryMmap<AtomicBitmap>` (or a shared [`VmmWriteLog`]) so pages
//!    the VMM writes itself are reported too.
//!
//! Process memory ([`ProcessMemoryLog`]): a userfaultfd always acts on the
//! memory of the process that created it, so the tracked process creates
//! one ([`create_userfaultfd`], one system call) and hands it over
//! (`SCM_RIGHTS` or `pidfd_getfd`); the tracker does everything else. The
//! tests do exactly this with a forked child.
//!
//! Pre-copy correctness rests on one ordering rule: **clear a page's dirty
//! bit before reading the page**; a later write then shows up next round.
//!
//! ```no_run
//! use std::sync::Arc;
//! use ferry_dirtylog::{DirtyBitmap, DirtyLog, KvmBitmapLog, MemorySlot, Reprotect};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = kvm_ioctls::Kvm::new()?;
//! let vm = Arc::new(kvm.create_vm()?);
//! let manual = ferry_dirtylog::enable_manual_protect(&vm)?; // before any slot
//! // ... create slot 0 at GPA 0 with KVM_MEM_LOG_DIRTY_PAGES, vCPUs, run ...
//! let slots = vec![MemorySlot { slot: 0, guest_phys_addr: 0, pages: 256 }];
//! let mut log = KvmBitmapLog::new(vm, slots, manual)?;
//! log.start()?;
//! let mut dirty = DirtyBitmap::new(log.pages());
//! log.collect(&mut dirty, Reprotect::Now)?;
//! for page in dirty.iter_ones() { /* send page */ let _ = page; }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod bitmap;
mod error;
mod kvm_bitmap;
mod kvm_ring;
mod kvm_sys;
mod log;
mod process;
mod vmm_writes;
mod words;
#[cfg(feature = "xen")]
mod xen;

#[cfg(feature = "test-guest")]
pub mod test_guest;

pub use bitmap::{words_for, DirtyBitmap, OnesIter, BITS_PER_WORD};
pub use error::DirtyLogError;
pub use kvm_bitmap::{enable_manual_protect, KvmBitmapLog, CLEAR_CHUNK_PAGES};
pub use kvm_ring::{enable_dirty_ring, KvmDirtyRing, RingFullHandler, KVM_EXIT_DIRTY_RING_FULL};
pub use log::{CollectStats, DirtyLog, MemorySlot, Reprotect, PAGE_SIZE};
pub use process::{
    create_userfaultfd, soft_dirty_supported, MemoryRange, ProcessMemoryLog, SoftDirtyLog,
};
pub use vmm_writes::{VmmWriteLog, VmmWriteSource, WithVmmWrites};
pub use words::{advise_huge_pages, AtomicWords};
#[cfg(feature = "xen")]
pub use xen::XenLogDirty;
