//! # ferry-control
//!
//! The control protocol of a ferry VM process (`ferry vm run --api PATH`,
//! `ferry vm receive --api PATH`), typed: requests, replies and events as
//! enums, a versioned greeting, one error shape ([`ControlError`]). The
//! server side ([`server`]) runs migrations with the engine and keeps the
//! guest's state machine ([`GuestHome`]); the client side ([`client`])
//! is what `ferry migrate`, `ferry vm status` and any other program use.
//! Inputs typed by people (sizes, rates, durations) are parsed once, with
//! one meaning, in [`units`]. What the command line prints for scripts
//! (`--json`) goes through [`json`], which writes every 64-bit integer as
//! a string, and reads such lines back into the same types
//! ([`json::from_str`], [`json::MigrateLine`]).
//!
//! Dependencies point one way: `tools -> control -> {engine, vm,
//! transport}`. The command line only parses arguments into these types
//! and prints what comes back.
//!
//! ```no_run
//! use std::path::Path;
//! use ferry_control::{client, Limits};
//!
//! # fn main() -> Result<(), ferry_control::ClientError> {
//! let api = Path::new("/run/ferry/src.sock");
//! let report = client::migration(api)?;
//! println!("{:?}: round {}, {} bytes left", report.phase, report.round, report.bytes_left);
//! // Halve the bandwidth of the running migration.
//! let now = client::set(api, Limits { max_bandwidth: Some(50 << 20), ..Limits::default() })?;
//! println!("{now}");
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod client;
pub mod json;
pub mod protocol;
pub mod security;
pub mod server;
pub mod units;

pub use client::ClientError;
pub use protocol::{
    ControlError, ErrorKind, Event, Greeting, GuestHome, Limits, MigrateRequest, MigrationReport,
    Phase, RegionDigest, Reply, Request, ResolveAction, Role, StatusReply, Summary,
    PROTOCOL_VERSION,
};
pub use security::{SecurityMode, SecuritySpec};
pub use server::{connect_lanes, serve, ControlSocket, Served};

/// An error and its sources on one line, outermost first (the transport's).
pub use ferry_transport::error_chain;
