//! The harness's error type.

use std::io;

/// What went wrong while setting up or running a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Reading a `/proc` file failed.
    #[error("reading {0}")]
    Proc(String, #[source] io::Error),
    /// Starting a process failed.
    #[error("starting {0}")]
    Spawn(String, #[source] io::Error),
    /// A child process (or its log file) could not be started.
    #[error("{0}")]
    Process(String, #[source] crate::process::ProcessError),
    /// A QMP command failed or QMP could not be reached.
    #[error("QMP {0}: {1}")]
    Qmp(String, String),
    /// The guest did not get ready in time or failed.
    #[error("guest: {0}")]
    Guest(String),
    /// An engine process exited or misbehaved.
    #[error("{0}")]
    Engine(String),
    /// A row ran past its deadline.
    #[error("deadline of {0} s passed: {1}")]
    Deadline(u64, String),
    /// Socket I/O for the TCP ceiling.
    #[error("TCP ceiling: {0}")]
    Ceiling(#[source] io::Error),
    /// Writing an output file.
    #[error("writing {0}")]
    Output(String, #[source] io::Error),
    /// Setting up a shaped link (network namespace, veth pair, tc).
    #[error("shaped link: {0}")]
    Link(String),
    /// Drawing the plot.
    #[error("plotting: {0}")]
    Plot(String),
}
