//! Shared helpers for end-to-end tests (process guards, skips).

pub mod etcd;
pub mod libvirt;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod tcp_proxy;
