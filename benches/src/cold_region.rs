//! Memory laid out like a guest's, for ceilings that move memory as a
//! migration must (the `migration_engine` and `loopback_memory` benches).

/// An anonymous mapping of `len` bytes backed like guest memory
/// (transparent huge pages when the kernel gives them), every page touched,
/// pseudo-random (incompressible, like the workload guest's fill) when asked.
#[derive(Debug)]
pub struct ColdRegion {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a ColdRegion owns its mapping; mutable access needs `&mut self`,
// shared access only reads.
unsafe impl Send for ColdRegion {}
// SAFETY: as above: through `&self` the mapping is only read.
unsafe impl Sync for ColdRegion {}

impl ColdRegion {
    /// Maps and touches `len` bytes; fills them with an xorshift sequence
    /// when `fill`, else with one repeated word.
    ///
    /// # Panics
    /// When the kernel refuses the mapping.
    pub fn new(len: usize, fill: bool) -> Self {
        Self::backed(len, fill, true)
    }

    /// [`ColdRegion::new`], backed by transparent huge pages only when
    /// `huge` (small pages otherwise: `MADV_NOHUGEPAGE`).
    ///
    /// # Panics
    /// When the kernel refuses the mapping.
    pub fn backed(len: usize, fill: bool, huge: bool) -> Self {
        // SAFETY: a fresh private anonymous mapping, no fd, no fixed address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "mmap {len} bytes");
        let advice = if huge {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: advice on the mapping just made; it never changes what the
        // memory holds.
        unsafe { libc::madvise(ptr, len, advice) };
        let mut region = Self {
            ptr: ptr.cast(),
            len,
        };
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for word in region.bytes_mut().chunks_exact_mut(8) {
            if fill {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
            word.copy_from_slice(&x.to_le_bytes());
        }
        region
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-sized region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes, alive while self is.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `bytes`; `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for ColdRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no borrow of it
        // outlives self.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filled_region_is_not_one_repeated_word_and_a_plain_one_is() {
        let filled = ColdRegion::new(1 << 16, true);
        let plain = ColdRegion::new(1 << 16, false);
        let words = |r: &ColdRegion| {
            r.bytes()
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        };
        assert!(words(&filled) > 1000);
        assert_eq!(words(&plain), 1);
        assert_eq!(filled.len(), 1 << 16);
    }
}
