#![deny(missing_docs)]
//! # ferry-engine: pre-copy live migration
//!
//! Moves a running VM's memory and state to another process or host while
//! the guest keeps running: round 0 sends every page, each further round
//! sends the pages the guest dirtied meanwhile, and once what is left fits
//! the downtime budget the guest is paused for a last round, its state
//! sent, and handed over under a commit protocol so that it never runs
//! twice and is never lost (see [`protocol`]).
//!
//! The engine sees a VM only through [`MigratableVm`] (memory, pause/resume,
//! state blob, dirty log, throttle), so any VMM can embed it; `ferry-vm`'s
//! VM implements it (feature `ferry-vm`, on by default).
//!
//! ```no_run
//! use std::sync::Arc;
//! use ferry_engine::{DestinationMigration, DestinationOptions, MigrationOptions, SourceMigration};
//! use ferry_transport::{tcp, FrameListener};
//! use ferry_vm::{DirtyBackend, Vm, VmConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Destination (another process or host).
//! let listener = FrameListener::bind("127.0.0.1:7070")?;
//! let receiving = std::thread::spawn(move || {
//!     let conn = listener.accept().expect("accept");
//!     DestinationMigration::accept(conn, &DestinationOptions::default(), |layout| {
//!         Ok(Vm::incoming(layout.bytes(), DirtyBackend::Bitmap)?)
//!     })
//! });
//!
//! // Source.
//! let vm = Arc::new(Vm::boot(&VmConfig {
//!     mem_bytes: 256 << 20,
//!     kernel: None,
//!     cmdline: "rate=5000 tsc_khz=2300000".into(),
//!     dirty: DirtyBackend::Bitmap,
//!     cpus: 1,
//! })?);
//! let summary = SourceMigration::new(vm, MigrationOptions::default())
//!     .run(tcp::connect("127.0.0.1:7070")?, |event| {
//!         println!("{}", serde_json::to_string(&event).unwrap())
//!     })?;
//! println!("downtime {:?}", summary.downtime);
//! let (_vm, _dest_summary) = receiving.join().unwrap()?; // the guest runs here now
//! # Ok(()) }
//! ```
//!
//! Entry points: [`SourceMigration::run`] / [`DestinationMigration::accept`]
//! over one TCP connection (page frames are checksummed on the worker
//! threads there), `run_lanes` / `accept_lanes` over a ferry lane session
//! (plaintext or mutual TLS; pages striped over the lanes by page index, one
//! writer thread per lane on the source and one reader thread per lane on
//! the destination, control frames on lane 0), and `run_over` /
//! `accept_over` over any `FrameSink`/`FrameSource` pair. Progress comes as
//! [`ProgressEvent`]s (serde: one JSON object per event), the end as a
//! [`MigrationSummary`] whose downtime runs from the source's pause to the
//! destination's resume, measured across the two sides' realtime clocks
//! (exact on one host, as good as clock sync between hosts).
//!
//! Threads: the source's calling thread collects the dirty log, decides and
//! sends control frames; encoder threads read pages (re-protecting each
//! chunk first, so a later write lands in the next round), encode them and
//! queue the batches on their lane (a bounded queue: back-pressure); a
//! writer thread per lane writes. On the destination a reader thread per
//! lane receives each page batch, verifies and decodes it and writes its
//! pages into guest memory, and passes control frames on to the calling
//! thread. A page always travels on the same lane, whose batches are
//! written in order, and every lane ends every round with a RoundEnd that
//! reaches the calling thread only after that lane's pages of the round
//! are written, so a page's newer copy never overtakes an older one.
//! Once every lane has ended a round, the
//! destination says so (`RoundWritten`); before it pauses the guest, the
//! source waits for that, so the pause carries the last dirty set only,
//! never pages still queued in lanes and socket buffers.
//!
//! Modules:
//! - [`encode`]: page encodings (zero, unchanged, XOR delta, LZ4, raw) and
//!   the page-batch format.
//! - [`convergence`]: when to stop copying, throttle, or give up.
//! - [`protocol`]: the frames of a migration and their order.
//! - [`handover`]: how a handover always ends (the destination's record of
//!   its GOs, the source's question after a lost answer, the operator's
//!   resolution of a handover in doubt).

pub mod convergence;
mod destination;
mod digest;
pub mod encode;
mod error;
#[cfg(feature = "ferry-vm")]
mod ferry_vm;
pub mod handover;
pub mod layout;
mod options;
pub mod progress;
pub mod protocol;
pub mod sections;
mod source;
pub mod steer;
mod summary;
mod vm;

pub use convergence::{ConvergeMode, ConvergeSwitch, ConvergencePolicy, Decision, OnDeadline};
pub use destination::{DestinationMigration, Incoming};
pub use digest::PageHashes;
pub use error::MigrationError;
pub use handover::{
    resolve_in_doubt, HandoverOutcome, HandoverRecord, InDoubtDecision, InDoubtResolution,
    Reconnect, ResolveError,
};
pub use layout::{MemoryLayout, MemoryRegion};
pub use options::{
    DestinationOptions, MigrationOptions, PreGoHook, PreGoRefusal, DEFAULT_PAUSE_MARGIN,
};
pub use progress::{HandoverStep, ProgressEvent};
pub use sections::{DeviceSection, SectionError, SectionSpec};
pub use source::SourceMigration;
pub use steer::{MigrationSteering, Retune, SteerError};
pub use summary::{
    describe_converge, DestinationSummary, DowntimeBreakdown, FinalRound, MigrationSummary,
    RegionDigest,
};
pub use vm::{GuestMemoryMmap, MigratableVm, VmOpError};
