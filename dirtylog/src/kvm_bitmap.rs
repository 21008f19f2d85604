//! [`KvmBitmapLog`]: KVM's per-slot dirty bitmap (`KVM_GET_DIRTY_LOG`), with
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` + `KVM_CLEAR_DIRTY_LOG` where the
//! kernel offers it.

use std::os::raw::{c_ulong, c_void};
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::bitmap::{words_for, BITS_PER_WORD};
use crate::kvm_sys::{kvm_err, last_os_error, KVM_CLEAR_DIRTY_LOG, KVM_GET_DIRTY_LOG};
use crate::log::{check_bitmap, validate_slots};
use crate::{CollectStats, DirtyBitmap, DirtyLog, DirtyLogError, MemorySlot, Reprotect};

/// Pages re-protected per `KVM_CLEAR_DIRTY_LOG` call (128 MiB): bounds how
/// long KVM holds its MMU lock in one call; chunks with no dirty page are
/// skipped without a call.
pub const CLEAR_CHUNK_PAGES: usize = 32 * 1024;

/// Enables `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with `INITIALLY_SET` on `vm`.
///
/// Call it right after creating the VM, **before any memory slot exists**
/// (KVM refuses it afterwards). Returns `Ok(false)` when the kernel does not
/// offer the capability (use [`KvmBitmapLog`] with `manual_protect = false`).
pub fn enable_manual_protect(vm: &VmFd) -> Result<bool, DirtyLogError> {
    let want = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
    let offered = vm.check_extension_raw(c_ulong::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    if u32::try_from(offered).unwrap_or(0) & want != want {
        return Ok(false);
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = u64::from(want);
    vm.enable_cap(&cap)
        .map_err(|e| DirtyLogError::EnableCap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            source: kvm_err(e),
        })
        .map(|()| true)
}

/// KVM's dirty bitmap, one `KVM_GET_DIRTY_LOG` per slot.
///
/// The VMM creates the slots with `KVM_MEM_LOG_DIRTY_PAGES`. Without manual
/// protect, `KVM_GET_DIRTY_LOG` fetches and re-protects in one call, so every
/// [`Reprotect`] mode behaves as `Now`. With manual protect
/// ([`enable_manual_protect`] returned `true`), `GET` only copies the bitmap and
/// re-protection is a separate `KVM_CLEAR_DIRTY_LOG` of exactly the reported
/// pages, in 64-page-aligned chunks: `Now` clears them all inside `collect`,
/// `Deferred` leaves it to [`DirtyLog::reprotect`] (chunk by chunk, just before
/// the caller reads them), `Never` skips it.
#[derive(Debug)]
pub struct KvmBitmapLog {
    vm: Arc<VmFd>,
    slots: Vec<MemorySlot>,
    pages: usize,
    manual_protect: bool,
    scratch: Vec<u64>,
    started: bool,
}

impl KvmBitmapLog {
    /// A log over `slots` of `vm`. `manual_protect` must be what
    /// [`enable_manual_protect`] returned for this VM (`false` if never called).
    pub fn new(
        vm: Arc<VmFd>,
        slots: Vec<MemorySlot>,
        manual_protect: bool,
    ) -> Result<Self, DirtyLogError> {
        let pages = validate_slots(&slots)?;
        let max_words = slots.iter().map(|s| words_for(s.pages)).max().unwrap_or(0);
        Ok(Self {
            vm,
            slots,
            pages,
            manual_protect,
            scratch: vec![0; max_words],
            started: false,
        })
    }

    /// Whether this log uses manual protect (`KVM_CLEAR_DIRTY_LOG`).
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// `KVM_GET_DIRTY_LOG` of slot `index` into `self.scratch`.
    fn get_log(&mut self, index: usize) -> Result<(), DirtyLogError> {
        let slot = self.slots[index];
        let words = &mut self.scratch[..words_for(slot.pages)];
        let log = kvm_dirty_log {
            slot: slot.slot,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: words.as_mut_ptr().cast::<c_void>(),
            },
        };
        // SAFETY: `self.vm` is a VM fd; the bitmap buffer holds one bit per page
        // of the slot (rounded up to 64) and lives across the call.
        let ret = unsafe { ioctl_with_ref(&*self.vm, KVM_GET_DIRTY_LOG(), &log) };
        if ret < 0 {
            return Err(DirtyLogError::GetDirtyLog {
                slot: slot.slot,
                source: last_os_error(),
            });
        }
        Ok(())
    }

    /// Fetches every slot's log, ORs it into `out` (when given) and clears the
    /// reported pages in manual mode when `clear`. Returns the stats.
    fn harvest(
        &mut self,
        mut out: Option<&mut DirtyBitmap>,
        clear: bool,
    ) -> Result<CollectStats, DirtyLogError> {
        let t0 = Instant::now();
        let mut stats = CollectStats::default();
        for index in 0..self.slots.len() {
            let slot = self.slots[index];
            self.get_log(index)?;
            stats.syscalls += 1;
            let nwords = words_for(slot.pages);
            if let Some(out) = out.as_deref_mut() {
                stats.reported += out.or_words_at(slot.first_page(), &self.scratch[..nwords]);
            } else {
                stats.reported += self.scratch[..nwords]
                    .iter()
                    .map(|w| w.count_ones() as usize)
                    .sum::<usize>();
            }
            if self.manual_protect && clear {
                let (calls, pages) = clear_slot_range(&self.vm, slot, 0, &self.scratch[..nwords])?;
                stats.syscalls += calls;
                stats.reprotected += pages;
            } else if !self.manual_protect {
                stats.reprotected = stats.reported;
            }
        }
        stats.elapsed = t0.elapsed();
        Ok(stats)
    }
}

/// `KVM_CLEAR_DIRTY_LOG` of the pages set in `mask`, which covers slot-relative
/// pages `first_page..first_page + 64 * mask.len()` (clamped to the slot), in
/// chunks of [`CLEAR_CHUNK_PAGES`], skipping all-zero chunks. Returns (calls,
/// pages cleared).
fn clear_slot_range(
    vm: &VmFd,
    slot: MemorySlot,
    first_page: usize,
    mask: &[u64],
) -> Result<(usize, usize), DirtyLogError> {
    debug_assert_eq!(first_page % BITS_PER_WORD, 0);
    let chunk_words = CLEAR_CHUNK_PAGES / BITS_PER_WORD;
    let mut calls = 0;
    let mut pages_cleared = 0;
    for (i, chunk) in mask.chunks(chunk_words).enumerate() {
        let ones: usize = chunk.iter().map(|w| w.count_ones() as usize).sum();
        if ones == 0 {
            continue;
        }
        let chunk_first = first_page + i * CLEAR_CHUNK_PAGES;
        if chunk_first >= slot.pages {
            break;
        }
        let num_pages = (chunk.len() * BITS_PER_WORD).min(slot.pages - chunk_first);
        // Both fit: validate_slots bounds slot.pages by u32::MAX.
        let (first, num) = (
            chunk_first as u64,
            u32::try_from(num_pages).unwrap_or(u32::MAX),
        );
        let clear = kvm_clear_dirty_log {
            slot: slot.slot,
            num_pages: num,
            first_page: first,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: chunk.as_ptr().cast_mut().cast::<c_void>(),
            },
        };
        // SAFETY: `vm` is a VM fd; the mask holds at least `num_pages` bits
        // (rounded up to 64) and KVM only reads it during the call.
        let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if ret < 0 {
            return Err(DirtyLogError::ClearDirtyLog {
                slot: slot.slot,
                first_page: first,
                pages: num,
                source: last_os_error(),
            });
        }
        calls += 1;
        pages_cleared += ones;
    }
    Ok((calls, pages_cleared))
}

impl DirtyLog for KvmBitmapLog {
    fn name(&self) -> &'static str {
        if self.manual_protect {
            "kvm-bitmap-manual"
        } else {
            "kvm-bitmap"
        }
    }

    fn pages(&self) -> usize {
        self.pages
    }

    /// Fetches and discards the log (and, in manual mode, clears what was
    /// set, `INITIALLY_SET` included), so the first `collect` reports only
    /// writes made after `start`.
    fn start(&mut self) -> Result<(), DirtyLogError> {
        self.harvest(None, true)?;
        self.started = true;
        Ok(())
    }

    /// With manual protect, nothing to do: the slots' bits are set
    /// (`INITIALLY_SET`, or left set by a log before), and a page is
    /// writable only while its bit is set, so a write is never missed;
    /// the caller's per-chunk `reprotect` write-protects each chunk before
    /// it is read. `start`'s clear of all of memory (GET and CLEAR over
    /// every slot, a few ms per GiB here) is then off the path to the first
    /// page sent. Without manual protect, GET itself re-protects: as `start`.
    fn start_full_pass(&mut self) -> Result<(), DirtyLogError> {
        if !self.manual_protect {
            return self.start();
        }
        self.started = true;
        Ok(())
    }

    fn collect(
        &mut self,
        out: &mut DirtyBitmap,
        reprotect: Reprotect,
    ) -> Result<CollectStats, DirtyLogError> {
        if !self.started {
            return Err(DirtyLogError::NotStarted);
        }
        check_bitmap(self.pages, out)?;
        self.harvest(Some(out), reprotect == Reprotect::Now)
    }

    fn reprotect(&mut self, first_page: usize, words: &[u64]) -> Result<(), DirtyLogError> {
        if !self.started {
            return Err(DirtyLogError::NotStarted);
        }
        let end_page = first_page.saturating_add(words.len() * BITS_PER_WORD);
        if !first_page.is_multiple_of(BITS_PER_WORD) || end_page > self.pages.next_multiple_of(64) {
            return Err(DirtyLogError::ReprotectRange {
                first_page,
                pages: words.len() * BITS_PER_WORD,
            });
        }
        if !self.manual_protect {
            return Ok(());
        }
        for slot in &self.slots {
            let lo = first_page.max(slot.first_page());
            let hi = end_page.min(slot.end_page());
            if lo >= hi {
                continue;
            }
            // Slot starts are 64-page aligned, so `lo` is too, in both spaces.
            let mask = &words[(lo - first_page) / BITS_PER_WORD..(hi - first_page).div_ceil(64)];
            clear_slot_range(&self.vm, *slot, lo - slot.first_page(), mask)?;
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyLogError> {
        self.started = false;
        Ok(())
    }
}
