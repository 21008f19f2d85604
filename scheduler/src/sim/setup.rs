//! The published setup of Beloglazov & Buyya, CCPE 2012 (as CloudSim 3.0.3's
//! PlanetLab runner builds it): 800 hosts alternating HP ProLiant ML110 G4 /
//! G5, four single-core VM types assigned by sorted trace index.

use crate::power::PowerModel;

/// One host type.
#[derive(Debug, Clone)]
pub struct HostType {
    /// MIPS of one core (PE).
    pub pe_mips: f64,
    /// Cores.
    pub pes: u32,
    /// RAM in MB.
    pub ram_mb: f64,
    /// Network bandwidth in Mbit/s.
    pub bw_mbit: f64,
    /// Power curve.
    pub power: PowerModel,
}

/// One VM type (single core).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VmType {
    /// MIPS at 100 %.
    pub mips: f64,
    /// RAM in MB.
    pub ram_mb: f64,
}

/// The four VM types of the setup.
pub const VM_TYPES: [VmType; 4] = [
    VmType {
        mips: 2500.0,
        ram_mb: 870.0,
    },
    VmType {
        mips: 2000.0,
        ram_mb: 1740.0,
    },
    VmType {
        mips: 1000.0,
        ram_mb: 1740.0,
    },
    VmType {
        mips: 500.0,
        ram_mb: 613.0,
    },
];

/// VM type of the `i`-th of `n` sorted trace files: `i / ceil(n / 4)`.
pub fn vm_type_index(i: usize, n: usize) -> usize {
    let per = n.div_ceil(VM_TYPES.len()).max(1);
    (i / per).min(VM_TYPES.len() - 1)
}

/// Host `i`'s type: G4 (index 0) if even, G5 (index 1) if odd.
pub fn host_type_index(i: usize) -> usize {
    i % 2
}

/// Migration duration in seconds: RAM / (half the bandwidth), CloudSim's
/// `ram / (bw / (2 * 8000))` with bw in kbit/s.
pub fn migration_seconds(ram_mb: f64, bw_mbit: f64) -> f64 {
    ram_mb / (bw_mbit * 1000.0 / (2.0 * 8000.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_follow_the_published_rule() {
        // 1052 VMs: ceil(1052/4) = 263 per type.
        assert_eq!(vm_type_index(0, 1052), 0);
        assert_eq!(vm_type_index(262, 1052), 0);
        assert_eq!(vm_type_index(263, 1052), 1);
        assert_eq!(vm_type_index(1051, 1052), 3);
        assert_eq!(host_type_index(0), 0);
        assert_eq!(host_type_index(799), 1);
        // 1 Gbit/s: 62.5 MB/s.
        assert!((migration_seconds(1740.0, 1000.0) - 27.84).abs() < 1e-9);
    }
}
