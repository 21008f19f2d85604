//! # ferry-harness: stock QEMU and ferry, run side by side from outside
//!
//! The machinery that `ferry demo` and `ferry bench compare` run, and that
//! the end-to-end tests (`ferry-e2e`) and the criterion benches
//! (`ferry-benches`) share:
//!
//! - [`process`]: child processes killed and reaped when their guard drops,
//!   on every path;
//! - [`qmp`]: a small blocking client of the QEMU Machine Protocol, its
//!   requests and the answers ferry reads typed;
//! - [`qemu`]: stock QEMU started with the workload guest (GUEST.md), and
//!   waiting for it to run;
//! - [`bench`]: the migration benchmark harness, the same guest migrated
//!   by QEMU and by ferry and measured the same way for both.
//!
//! It lives in a library of its own so that the `ferry` binary depends on
//! no test or bench crate.
//!
//! ```no_run
//! use std::time::Duration;
//! use ferry_harness::qemu::{QemuConfig, QemuGuest};
//! use ferry_harness::qmp::guest_status;
//!
//! let cfg = QemuConfig {
//!     kernel: ferry_vm::guest_elf_path().to_path_buf(),
//!     mem_mib: 64,
//!     append: format!("rate=1000 wss=16 tsc_khz={}", ferry_vm::host_tsc_khz()?),
//!     incoming: None,
//!     cpus: 1,
//! };
//! let mut guest = QemuGuest::start("src", &cfg, &std::env::temp_dir())?;
//! guest.wait_running(1, Duration::from_secs(30))?;
//! println!("heartbeat {}", guest_status(&mut guest.qmp)?.heartbeat);
//! // QEMU is killed when `guest` drops.
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod bench;
pub mod process;
pub mod qemu;
pub mod qmp;
