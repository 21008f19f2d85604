//! The guest memory layout both sides agree on in the handshake.

use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::encode::PAGE_SIZE;
use crate::vm::GuestMemoryMmap;

/// Most regions a layout may have (bounds what a Hello can ask for).
pub const MAX_REGIONS: usize = 64;

/// Largest guest memory a destination accepts: 1 TiB.
pub const MAX_GUEST_BYTES: u64 = 1 << 40;

/// One contiguous range of guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryRegion {
    /// Guest-physical start, page aligned.
    pub guest_phys_addr: u64,
    /// Length in bytes, a multiple of the page size.
    pub bytes: u64,
}

impl MemoryRegion {
    /// Index of the region's first page.
    pub fn first_page(&self) -> u64 {
        self.guest_phys_addr / PAGE_SIZE as u64
    }

    /// Index one past the region's last page.
    pub fn end_page(&self) -> u64 {
        (self.guest_phys_addr + self.bytes) / PAGE_SIZE as u64
    }
}

/// Guest memory as a list of regions. Page index = guest-physical address /
/// page size (the guest page frame number), the index dirty logs use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryLayout {
    /// Regions in ascending address order, not overlapping.
    pub regions: Vec<MemoryRegion>,
}

/// Why a layout is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// No region, or more than [`MAX_REGIONS`].
    #[error("{0} memory regions (1..={MAX_REGIONS} allowed)")]
    RegionCount(usize),
    /// A region not page aligned, empty, overlapping or out of order.
    #[error("memory region {index} ({guest_phys_addr:#x}, {bytes} bytes) is unaligned, empty, or overlaps the one before")]
    BadRegion {
        /// Index of the region.
        index: usize,
        /// Its start.
        guest_phys_addr: u64,
        /// Its length.
        bytes: u64,
    },
    /// More memory than [`MAX_GUEST_BYTES`].
    #[error("guest memory ends at {0:#x}, beyond the {MAX_GUEST_BYTES:#x} limit")]
    TooLarge(u64),
    /// The VM's memory does not cover the layout.
    #[error("the VM's memory does not cover region {guest_phys_addr:#x}+{bytes:#x}")]
    NotCovered {
        /// Start of the region missing.
        guest_phys_addr: u64,
        /// Its length.
        bytes: u64,
    },
}

impl MemoryLayout {
    /// The layout of a VM's guest memory.
    pub fn of(memory: &GuestMemoryMmap) -> Self {
        Self {
            regions: memory
                .iter()
                .map(|r| MemoryRegion {
                    guest_phys_addr: r.start_addr().0,
                    bytes: r.len(),
                })
                .collect(),
        }
    }

    /// Check the layout is well formed and bounded.
    pub fn validate(&self) -> Result<(), LayoutError> {
        if self.regions.is_empty() || self.regions.len() > MAX_REGIONS {
            return Err(LayoutError::RegionCount(self.regions.len()));
        }
        let page = PAGE_SIZE as u64;
        let mut end = 0u64;
        for (index, r) in self.regions.iter().enumerate() {
            let bad = r.guest_phys_addr % page != 0
                || r.bytes % page != 0
                || r.bytes == 0
                || r.guest_phys_addr < end;
            if bad {
                return Err(LayoutError::BadRegion {
                    index,
                    guest_phys_addr: r.guest_phys_addr,
                    bytes: r.bytes,
                });
            }
            end = r
                .guest_phys_addr
                .checked_add(r.bytes)
                .filter(|&e| e <= MAX_GUEST_BYTES)
                .ok_or(LayoutError::TooLarge(
                    r.guest_phys_addr.saturating_add(r.bytes),
                ))?;
        }
        Ok(())
    }

    /// Check `memory` has every byte of the layout.
    pub fn check_covered_by(&self, memory: &GuestMemoryMmap) -> Result<(), LayoutError> {
        for r in &self.regions {
            let covered = memory.check_range(
                vm_memory::GuestAddress(r.guest_phys_addr),
                usize::try_from(r.bytes).unwrap_or(usize::MAX),
            );
            if !covered {
                return Err(LayoutError::NotCovered {
                    guest_phys_addr: r.guest_phys_addr,
                    bytes: r.bytes,
                });
            }
        }
        Ok(())
    }

    /// Size of the page index space: one past the highest page.
    pub fn page_index_end(&self) -> u64 {
        self.regions.last().map_or(0, MemoryRegion::end_page)
    }

    /// Each region as a page range `[first, end)`.
    pub fn page_ranges(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.first_page(), r.end_page()))
            .collect()
    }

    /// Pages of guest memory (holes not counted).
    pub fn pages(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.end_page() - r.first_page())
            .sum()
    }

    /// Bytes of guest memory.
    pub fn bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(regions: &[(u64, u64)]) -> MemoryLayout {
        MemoryLayout {
            regions: regions
                .iter()
                .map(|&(guest_phys_addr, bytes)| MemoryRegion {
                    guest_phys_addr,
                    bytes,
                })
                .collect(),
        }
    }

    #[test]
    fn a_plain_layout_is_valid() {
        let l = layout(&[(0, 1 << 20), (1 << 30, 1 << 20)]);
        assert_eq!(l.validate(), Ok(()));
        assert_eq!(l.pages(), 512);
        assert_eq!(l.page_index_end(), (1 << 18) + 256);
    }

    #[test]
    fn bad_layouts_are_refused() {
        assert_eq!(layout(&[]).validate(), Err(LayoutError::RegionCount(0)));
        assert!(matches!(
            layout(&[(1, 4096)]).validate(),
            Err(LayoutError::BadRegion { .. })
        ));
        assert!(matches!(
            layout(&[(0, 0)]).validate(),
            Err(LayoutError::BadRegion { .. })
        ));
        assert!(matches!(
            layout(&[(0, 8192), (4096, 4096)]).validate(),
            Err(LayoutError::BadRegion { .. })
        ));
        assert!(matches!(
            layout(&[(0, 1 << 41)]).validate(),
            Err(LayoutError::TooLarge(_))
        ));
    }
}
