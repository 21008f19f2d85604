//! Shared helpers for end-to-end tests (process guards, skips).

pub mod process;
pub mod qemu;
pub mod qmp;
