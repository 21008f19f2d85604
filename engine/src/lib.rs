#![deny(missing_docs)]
//! # ferry-engine: pre-copy live migration
//!
//! Moves a running VM's memory and state to another process or host while
//! the guest keeps running: round 0 sends every page, each further round
//! sends the pages the guest dirtied meanwhile, and once what is left fits
//! the downtime budget the guest is paused for a last round, its state
//! sent, and handed over under a commit protocol so it never runs twice and
//! is never lost.
//!
//! The engine sees a VM only through `MigratableVm` (memory, pause/resume,
//! state blob, dirty log, throttle), so any VMM can embed it; `ferry-vm`'s
//! VM implements it (feature `ferry-vm`).
//!
//! - [`encode`]: page encodings (zero, unchanged, XOR delta, LZ4, raw) and
//!   the page-batch format.
//! - [`convergence`]: when to stop copying, throttle, or give up.
pub mod convergence;
pub mod encode;
