//! Child processes that cannot outlive the test that started them.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Why a child process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Its log file could not be opened.
    #[error("opening log {path}")]
    Log {
        /// The log file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process could not be spawned.
    #[error("starting {name}: {command}")]
    Spawn {
        /// The name given at spawn.
        name: String,
        /// The command line, as `Command`'s `Debug` writes it.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A child process killed (SIGKILL) and reaped when the guard drops, on
/// every path, panics included.
#[derive(Debug)]
pub struct ProcessGuard {
    name: String,
    child: Option<Child>,
}

impl ProcessGuard {
    /// Spawns `cmd` with stdin closed and stdout/stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<ProcessGuard, ProcessError> {
        let log_err = |source| ProcessError::Log {
            path: log.to_path_buf(),
            source,
        };
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(log_err)?;
        let err = out.try_clone().map_err(log_err)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                name: name.to_owned(),
                command: format!("{cmd:?}"),
                source,
            })?;
        Ok(ProcessGuard {
            name: name.to_owned(),
            child: Some(child),
        })
    }

    /// Wraps an already spawned child.
    pub fn adopt(name: &str, child: Child) -> ProcessGuard {
        ProcessGuard {
            name: name.to_owned(),
            child: Some(child),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills and reaps the process now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
