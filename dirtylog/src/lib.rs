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
#[cfg(feature = "xen")]
pub use xen::XenLogDirty;
