//! Knobs of a migration.

use std::time::Duration;

use crate::convergence::ConvergencePolicy;

/// Source-side options.
#[derive(Debug, Clone)]
pub struct MigrationOptions {
    /// Downtime limit, deadline, auto-converge.
    pub convergence: ConvergencePolicy,
    /// Cap on wire bytes per second (`None`: as fast as the link goes).
    pub max_bandwidth: Option<u64>,
    /// Encoder threads (at least 1).
    pub workers: usize,
    /// Size of the XOR-delta cache of earlier page copies (0 disables XOR
    /// deltas).
    pub xor_cache_bytes: usize,
    /// Offer LZ4 compression of pages (false: pages that are not zero,
    /// unchanged or a delta go raw).
    pub compress: bool,
    /// Target size of one page batch frame.
    pub batch_bytes: usize,
    /// How long to wait for READY and for RUNNING.
    pub handover_timeout: Duration,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        Self {
            convergence: ConvergencePolicy::default(),
            max_bandwidth: None,
            workers: 2,
            xor_cache_bytes: 64 << 20,
            compress: true,
            batch_bytes: 256 << 10,
            handover_timeout: Duration::from_secs(30),
        }
    }
}

/// Destination-side options.
#[derive(Debug, Clone)]
pub struct DestinationOptions {
    /// Decoder threads (at least 1).
    pub workers: usize,
    /// Give up when the source sends nothing for this long.
    pub idle_timeout: Duration,
}

impl Default for DestinationOptions {
    fn default() -> Self {
        Self {
            workers: 2,
            idle_timeout: Duration::from_secs(60),
        }
    }
}
