//! # ferry-e2e: helpers of the end-to-end tests
//!
//! What the tests across processes need besides the runtime machinery of
//! [`ferry_harness`] (re-exported here as [`process`], [`qmp`] and [`qemu`],
//! so a test names one crate): a local etcd cluster ([`etcd`]), two
//! libvirtd hosts on one machine ([`libvirt`], as `shared/LIBVIRT.md`
//! sets them up), and a TCP proxy that can cut a link ([`tcp_proxy`]).
//! Each skips loudly where the machine lacks what it needs
//! (`FERRY_NO_SKIP=1` turns the skip into a failure).
//!
//! ```no_run
//! use ferry_e2e::process::ProcessGuard;
//! let log = std::env::temp_dir().join("sleep.log");
//! let mut p = ProcessGuard::spawn("sleep", std::process::Command::new("sleep").arg("60"), &log)?;
//! assert!(p.is_running());
//! // killed and reaped here, on every path
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub use ferry_harness::{process, qemu, qmp};

pub mod etcd;
pub mod libvirt;
pub mod tcp_proxy;
