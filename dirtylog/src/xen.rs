//! [`XenLogDirty`]: Xen's shadow log-dirty mode through libxenctrl
//! (cargo feature `xen`; needs `libxen-dev` to build).
//!
//! **It cannot run on the development machines** (they are not Xen dom0s):
//! `xc_interface_open` fails there and [`XenLogDirty::new`] returns
//! [`DirtyLogError::Xen`]. It is compiled (and linked) by CI, not exercised.
//!
//! Calls, as declared in Xen 4.17's `xenctrl.h`:
//! `xc_shadow_control(xch, domid, XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY | OFF, NULL, 0)`
//! to switch log-dirty on and off, and `xc_logdirty_control(xch, domid,
//! XEN_DOMCTL_SHADOW_OP_CLEAN | PEEK, buffer, pages, 0, &stats)` to read the
//! bitmap (CLEAN also clears it, PEEK does not). The bitmap is one bit per
//! guest pfn in `unsigned long` words, the layout of [`DirtyBitmap`] on x86-64.

use std::io;
use std::os::raw::{c_int, c_longlong, c_uint, c_ulong, c_void};
use std::ptr::NonNull;
use std::time::Instant;

use crate::bitmap::words_for;
use crate::log::check_bitmap;
use crate::{CollectStats, DirtyBitmap, DirtyLog, DirtyLogError, Reprotect, PAGE_SIZE};

const XEN_DOMCTL_SHADOW_OP_OFF: c_uint = 0;
const XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY: c_uint = 2;
const XEN_DOMCTL_SHADOW_OP_CLEAN: c_uint = 11;
const XEN_DOMCTL_SHADOW_OP_PEEK: c_uint = 12;

/// Opaque `xc_interface`.
#[repr(C)]
struct XcInterface {
    _private: [u8; 0],
}

/// `struct xc_hypercall_buffer` (xenctrl.h).
#[repr(C)]
#[derive(Debug)]
struct XcHypercallBuffer {
    hbuf: *mut c_void,
    param_shadow: *mut XcHypercallBuffer,
    dir: c_int,
    ubuf: *mut c_void,
    sz: usize,
}

/// `struct xen_domctl_shadow_op_stats`.
#[repr(C)]
#[derive(Debug, Default)]
struct XcShadowOpStats {
    fault_count: u32,
    dirty_count: u32,
}

#[link(name = "xenctrl")]
extern "C" {
    fn xc_interface_open(
        logger: *mut c_void,
        dombuild_logger: *mut c_void,
        open_flags: c_uint,
    ) -> *mut XcInterface;
    fn xc_interface_close(xch: *mut XcInterface) -> c_int;
    fn xc_shadow_control(
        xch: *mut XcInterface,
        domid: u32,
        sop: c_uint,
        mb: *mut c_uint,
        mode: c_uint,
    ) -> c_int;
    fn xc_logdirty_control(
        xch: *mut XcInterface,
        domid: u32,
        sop: c_uint,
        dirty_bitmap: *mut XcHypercallBuffer,
        pages: c_ulong,
        mode: c_uint,
        stats: *mut XcShadowOpStats,
    ) -> c_longlong;
    fn xc__hypercall_buffer_alloc_pages(
        xch: *mut XcInterface,
        b: *mut XcHypercallBuffer,
        nr_pages: c_int,
    ) -> *mut c_void;
    fn xc__hypercall_buffer_free_pages(
        xch: *mut XcInterface,
        b: *mut XcHypercallBuffer,
        nr_pages: c_int,
    );
}

/// Xen shadow log-dirty for one domain (see the module docs: compiled, not
/// runnable on non-Xen hosts).
#[derive(Debug)]
pub struct XenLogDirty {
    xch: NonNull<XcInterface>,
    domid: u32,
    pages: usize,
    /// Boxed: libxenctrl refers to the buffer descriptor by address.
    buffer: Box<XcHypercallBuffer>,
    buffer_pages: c_int,
    started: bool,
}

impl std::fmt::Debug for XcInterface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("xc_interface")
    }
}

// SAFETY: an xc_interface handle may be used from any thread, one call at a
// time; all calls go through `&mut self` or `Drop`.
unsafe impl Send for XenLogDirty {}

fn xen_err(call: &'static str, domid: u32) -> DirtyLogError {
    DirtyLogError::Xen {
        call,
        domid,
        source: io::Error::last_os_error(),
    }
}

impl XenLogDirty {
    /// Opens libxenctrl for domain `domid` with `pages` guest pfns.
    pub fn new(domid: u32, pages: usize) -> Result<Self, DirtyLogError> {
        // SAFETY: NULL loggers are documented as "log to stderr"; checked below.
        let xch = unsafe { xc_interface_open(std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        let xch = NonNull::new(xch).ok_or_else(|| xen_err("xc_interface_open", domid))?;
        let bytes = words_for(pages) * 8;
        let buffer_pages =
            c_int::try_from(bytes.div_ceil(PAGE_SIZE as usize).max(1)).map_err(|_| {
                DirtyLogError::InvalidLayout(format!("{pages} pages is too many for Xen"))
            })?;
        let mut buffer = Box::new(XcHypercallBuffer {
            hbuf: std::ptr::null_mut(),
            param_shadow: std::ptr::null_mut(),
            dir: 0,
            ubuf: usize::MAX as *mut c_void, // HYPERCALL_BUFFER_INIT_NO_BOUNCE
            sz: 0,
        });
        // SAFETY: `xch` is open; `buffer` is a boxed descriptor initialised as
        // DECLARE_HYPERCALL_BUFFER does.
        let hbuf =
            unsafe { xc__hypercall_buffer_alloc_pages(xch.as_ptr(), &mut *buffer, buffer_pages) };
        if hbuf.is_null() {
            let err = xen_err("xc_hypercall_buffer_alloc_pages", domid);
            // SAFETY: closes the handle opened above.
            unsafe { xc_interface_close(xch.as_ptr()) };
            return Err(err);
        }
        Ok(Self {
            xch,
            domid,
            pages,
            buffer,
            buffer_pages,
            started: false,
        })
    }

    fn shadow(&mut self, sop: c_uint, call: &'static str) -> Result<(), DirtyLogError> {
        // SAFETY: `xch` is open; a NULL `mb` is allowed for these ops.
        let ret = unsafe {
            xc_shadow_control(self.xch.as_ptr(), self.domid, sop, std::ptr::null_mut(), 0)
        };
        if ret < 0 {
            return Err(xen_err(call, self.domid));
        }
        Ok(())
    }

    /// CLEAN or PEEK into the hypercall buffer; returns the bitmap words.
    fn read_bitmap(&mut self, sop: c_uint) -> Result<&[u64], DirtyLogError> {
        let mut stats = XcShadowOpStats::default();
        let pages = c_ulong::try_from(self.pages).unwrap_or(c_ulong::MAX);
        // SAFETY: `xch` is open; the buffer was allocated with room for
        // `pages` bits; `stats` is a valid out-pointer.
        let ret = unsafe {
            xc_logdirty_control(
                self.xch.as_ptr(),
                self.domid,
                sop,
                &mut *self.buffer,
                pages,
                0,
                &mut stats,
            )
        };
        if ret < 0 {
            return Err(xen_err("xc_logdirty_control", self.domid));
        }
        let words = words_for(self.pages);
        // SAFETY: `hbuf` holds `buffer_pages` pages ≥ `words` u64s, page-aligned,
        // and was just filled by Xen; it lives as long as `self`.
        Ok(unsafe { std::slice::from_raw_parts(self.buffer.hbuf.cast::<u64>(), words) })
    }
}

impl DirtyLog for XenLogDirty {
    fn name(&self) -> &'static str {
        "xen-log-dirty"
    }

    fn pages(&self) -> usize {
        self.pages
    }

    fn start(&mut self) -> Result<(), DirtyLogError> {
        self.shadow(
            XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY,
            "xc_shadow_control(ENABLE_LOGDIRTY)",
        )?;
        self.read_bitmap(XEN_DOMCTL_SHADOW_OP_CLEAN)?;
        self.started = true;
        Ok(())
    }

    /// `Never` peeks (bitmap kept); the other modes clean (read and clear).
    fn collect(
        &mut self,
        out: &mut DirtyBitmap,
        reprotect: Reprotect,
    ) -> Result<CollectStats, DirtyLogError> {
        if !self.started {
            return Err(DirtyLogError::NotStarted);
        }
        check_bitmap(self.pages, out)?;
        let t0 = Instant::now();
        let sop = if reprotect == Reprotect::Never {
            XEN_DOMCTL_SHADOW_OP_PEEK
        } else {
            XEN_DOMCTL_SHADOW_OP_CLEAN
        };
        let reported = {
            let words = self.read_bitmap(sop)?;
            let mut scratch = DirtyBitmap::new(out.len());
            let n = scratch.or_words_at(0, words);
            out.merge(&scratch);
            n
        };
        Ok(CollectStats {
            reported,
            reprotected: if sop == XEN_DOMCTL_SHADOW_OP_CLEAN {
                reported
            } else {
                0
            },
            syscalls: 1,
            elapsed: t0.elapsed(),
        })
    }

    fn reprotect(&mut self, _first_page: usize, _words: &[u64]) -> Result<(), DirtyLogError> {
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyLogError> {
        self.started = false;
        self.shadow(XEN_DOMCTL_SHADOW_OP_OFF, "xc_shadow_control(OFF)")
    }
}

impl Drop for XenLogDirty {
    fn drop(&mut self) {
        // SAFETY: frees the buffer allocated in `new` with the same page count.
        unsafe {
            xc__hypercall_buffer_free_pages(self.xch.as_ptr(), &mut *self.buffer, self.buffer_pages)
        };
        // SAFETY: closes the handle opened in `new`; nothing uses it afterwards.
        unsafe { xc_interface_close(self.xch.as_ptr()) };
    }
}
