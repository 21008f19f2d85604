//! A small blocking QMP client (QEMU Machine Protocol, JSON over a UNIX socket).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// A line QEMU writes on a QMP socket.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Message {
    /// A command's result (its shape depends on the command).
    Return {
        #[serde(rename = "return")]
        value: Value,
    },
    /// A command's failure.
    Error { error: ErrorReply },
    /// An asynchronous event.
    Event {
        #[allow(dead_code)] // skipped, named only for the message
        event: String,
    },
    /// The greeting, before command mode.
    Greeting {
        #[serde(rename = "QMP")]
        #[allow(dead_code)] // its presence is what counts
        qmp: Value,
    },
}

/// What went wrong talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached (or set up) before the timeout.
    #[error("connecting to QMP at {path}")]
    Connect {
        /// The QMP socket.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading a line from QEMU failed.
    #[error("reading from QMP")]
    Read(#[source] std::io::Error),
    /// Writing a command to QEMU failed.
    #[error("writing to QMP")]
    Write(#[source] std::io::Error),
    /// QEMU closed the connection.
    #[error("QMP connection closed")]
    Closed,
    /// A line QEMU wrote is not a QMP message.
    #[error("parsing QMP message {line:?}")]
    Parse {
        /// The line.
        line: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The first message was not QMP's greeting.
    #[error("no QMP greeting: {0}")]
    NoGreeting(String),
    /// QEMU refused a command.
    #[error("QMP {command} failed: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QMP's error class: `GenericError`, `CommandNotFound`, ...
        class: String,
        /// In words.
        desc: String,
    },
    /// A command's answer is not what ferry reads it as.
    #[error("QMP {command} answered {answer}")]
    Answer {
        /// The command.
        command: String,
        /// Its answer.
        answer: String,
        /// Why it does not read.
        #[source]
        source: serde_json::Error,
    },
    /// HMP `xp` wrote something other than the words asked for.
    #[error("parsing xp output {text:?}: {reason}")]
    Xp {
        /// Its output.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A migration had not ended when the wait ran out.
    #[error("migration not finished after {timeout:?}: {last}")]
    Unfinished {
        /// How long it waited.
        timeout: Duration,
        /// The last `query-migrate` answer.
        last: String,
    },
}

type Result<T, E = QmpError> = std::result::Result<T, E>;

/// A QMP error reply's `error`.
#[derive(Debug, Deserialize)]
pub struct ErrorReply {
    /// `GenericError`, `CommandNotFound`, ...
    pub class: String,
    /// In words.
    pub desc: String,
}

/// `query-status`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// `running`, `paused`, `postmigrate`, `inmigrate`, ...
    pub status: String,
    /// Whether the vCPUs run.
    pub running: bool,
}

/// A migration's state in `query-migrate` (QAPI `MigrationStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration yet.
    None,
    /// Setting up.
    Setup,
    /// Being cancelled.
    Cancelling,
    /// Cancelled.
    Cancelled,
    /// Running.
    Active,
    /// Post-copy running.
    PostcopyActive,
    /// Post-copy paused.
    PostcopyPaused,
    /// Post-copy recovery setting up.
    PostcopyRecoverSetup,
    /// Post-copy recovering.
    PostcopyRecover,
    /// Done.
    Completed,
    /// Failed (`error-desc` says why).
    Failed,
    /// COLO.
    Colo,
    /// Paused before switching over.
    PreSwitchover,
    /// Migrating device state.
    Device,
    /// Waiting for devices to unplug.
    WaitUnplug,
    /// A state this client does not know.
    #[serde(other)]
    Unknown,
}

impl MigrationStatus {
    /// Whether the migration has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// `query-migrate`'s answer (QAPI `MigrationInfo`): the fields ferry reads,
/// typed, and every other one kept as it came.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// Absent before any migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<MigrationStatus>,
    /// RAM figures, while and after it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<RamStats>,
    /// From the start to completion (or so far), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_time: Option<u64>,
    /// Downtime of a completed migration, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
    /// Every other field, as QEMU wrote it.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// `query-migrate`'s `ram` (QAPI `MigrationStats`): the fields ferry reads,
/// and every other one as it came.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes sent.
    pub transferred: u64,
    /// Bytes left to send.
    pub remaining: u64,
    /// Guest RAM, bytes.
    pub total: u64,
    /// Dirty bitmap syncs: QEMU's rounds.
    pub dirty_sync_count: u64,
    /// Every other field, as QEMU wrote it.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Active => "active",
            Self::PostcopyActive => "postcopy-active",
            Self::PostcopyPaused => "postcopy-paused",
            Self::PostcopyRecoverSetup => "postcopy-recover-setup",
            Self::PostcopyRecover => "postcopy-recover",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Colo => "colo",
            Self::PreSwitchover => "pre-switchover",
            Self::Device => "device",
            Self::WaitUnplug => "wait-unplug",
            Self::Unknown => "unknown",
        })
    }
}

/// A QMP connection in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `path` (retrying until `timeout` while QEMU creates it),
    /// reads the greeting and enters command mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        };
        let connect_err = |source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(connect_err)?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().map_err(connect_err)?),
            writer: stream,
        };
        let greeting = qmp.read_message()?;
        if !matches!(greeting, Message::Greeting { .. }) {
            return Err(QmpError::NoGreeting(format!("{greeting:?}")));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Message> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(QmpError::Read)?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|source| QmpError::Parse { line, source })
    }

    /// Runs a command; returns its `return` value, or its error as an error.
    /// Events arriving meanwhile are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let msg = if arguments.as_object().is_some_and(|o| o.is_empty()) {
            json!({ "execute": command })
        } else {
            json!({ "execute": command, "arguments": arguments })
        };
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(QmpError::Write)?;
        loop {
            match self.read_message()? {
                Message::Return { value } => return Ok(value),
                Message::Error { error } => {
                    return Err(QmpError::Command {
                        command: command.to_owned(),
                        class: error.class,
                        desc: error.desc,
                    })
                }
                Message::Event { .. } | Message::Greeting { .. } => {}
            }
        }
    }

    /// Runs a human monitor (HMP) command and returns its text.
    pub fn hmp(&mut self, command_line: &str) -> Result<String> {
        let r = self.execute(
            "human-monitor-command",
            json!({ "command-line": command_line }),
        )?;
        Ok(r.as_str().unwrap_or_default().to_owned())
    }

    /// Reads `count` guest-physical u64 words at `addr` (via HMP `xp`).
    pub fn read_phys_u64(&mut self, addr: u64, count: usize) -> Result<Vec<u64>> {
        let text = self.hmp(&format!("xp /{count}gx {addr:#x}"))?;
        parse_xp(&text, count)
    }

    /// Runs a command without arguments and reads its answer as a `T`.
    pub fn query<T: DeserializeOwned>(&mut self, command: &str) -> Result<T> {
        let r = self.execute(command, json!({}))?;
        serde_json::from_value(r.clone()).map_err(|source| QmpError::Answer {
            command: command.to_owned(),
            answer: r.to_string(),
            source,
        })
    }

    /// `query-status`'s `status` (`running`, `paused`, `postmigrate`, `inmigrate`, ...).
    pub fn run_state(&mut self) -> Result<String> {
        Ok(self.query::<StatusInfo>("query-status")?.status)
    }

    /// `query-migrate`'s answer.
    pub fn query_migrate(&mut self) -> Result<MigrationInfo> {
        self.query("query-migrate")
    }

    /// Polls `query-migrate` until its status is final (`completed`,
    /// `failed`, `cancelled`) or `timeout` passes; returns the last answer.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<MigrationInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.query_migrate()?;
            if r.status.is_some_and(MigrationStatus::is_final) {
                return Ok(r);
            }
            if Instant::now() > deadline {
                return Err(QmpError::Unfinished {
                    timeout,
                    last: format!("{r:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Parses the output of HMP `xp /Ngx ADDR` into its `count` words.
pub fn parse_xp(text: &str, count: usize) -> Result<Vec<u64>> {
    let words: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split_once(':').map(|(_, rest)| rest))
        .flat_map(str::split_whitespace)
        .map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16))
        .collect::<Result<_, _>>()
        .map_err(|e| QmpError::Xp {
            text: text.to_owned(),
            reason: e.to_string(),
        })?;
    if words.len() != count {
        return Err(QmpError::Xp {
            text: text.to_owned(),
            reason: format!("{} words, expected {count}", words.len()),
        });
    }
    Ok(words)
}

/// The workload guest's status block (GUEST.md), read through QMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestStatusWords {
    /// `FERRYGST` when the guest set the block up.
    pub magic: u64,
    /// 0 boot, 1 filling, 2 running.
    pub phase: u64,
    /// Main-loop passes that saw at least 1 ms go by.
    pub heartbeat: u64,
    /// Page writes so far.
    pub pages_dirtied: u64,
    /// The guest's own self-check failures.
    pub verify_errors: u64,
}

/// Reads the guest status block at `0x1000`.
pub fn guest_status(qmp: &mut Qmp) -> Result<GuestStatusWords> {
    let w = qmp.read_phys_u64(0x1000, 4)?;
    let v = qmp.read_phys_u64(0x1070, 1)?;
    Ok(GuestStatusWords {
        magic: w[0],
        phase: w[1],
        heartbeat: w[2],
        pages_dirtied: w[3],
        verify_errors: v[0],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_migrate_answer_reads_typed_and_keeps_the_rest() {
        // As QEMU 7.2 answers for a completed precopy migration.
        let text = r#"{"expected-downtime": 300, "status": "completed", "setup-time": 3,
            "total-time": 1467, "downtime": 171, "ram": {"total": 1091379200,
            "postcopy-requests": 0, "dirty-sync-count": 3, "multifd-bytes": 0,
            "pages-per-second": 32710, "downtime-bytes": 0, "page-size": 4096,
            "remaining": 0, "postcopy-bytes": 0, "mbps": 2454.3, "transferred": 450158734,
            "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 450158734,
            "duplicate": 157003, "dirty-pages-rate": 0, "skipped": 0,
            "normal-bytes": 446795776, "normal": 109081}}"#;
        let info: MigrationInfo = serde_json::from_str(text).unwrap();
        assert_eq!(info.status, Some(MigrationStatus::Completed));
        assert_eq!((info.total_time, info.downtime), (Some(1467), Some(171)));
        let ram = info.ram.as_ref().unwrap();
        assert_eq!(
            (ram.transferred, ram.remaining, ram.dirty_sync_count),
            (450_158_734, 0, 3)
        );
        assert_eq!(ram.other.get("mbps"), Some(&json!(2454.3)));
        assert_eq!(info.other.get("setup-time"), Some(&json!(3)));
        // Written back, nothing is lost.
        let back = serde_json::to_value(&info).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(text).unwrap());
    }

    #[test]
    fn before_any_migration_and_in_unknown_states_it_still_reads() {
        let none: MigrationInfo = serde_json::from_str("{}").unwrap();
        assert_eq!(none, MigrationInfo::default());
        let odd: MigrationInfo = serde_json::from_str(r#"{"status": "teleporting"}"#).unwrap();
        assert_eq!(odd.status, Some(MigrationStatus::Unknown));
        let failed: MigrationInfo =
            serde_json::from_str(r#"{"status": "failed", "error-desc": "Unable to write"}"#)
                .unwrap();
        assert!(failed.status.is_some_and(MigrationStatus::is_final));
        assert_eq!(failed.error_desc.as_deref(), Some("Unable to write"));
        assert_eq!(
            MigrationStatus::PostcopyActive.to_string(),
            "postcopy-active"
        );
    }

    #[test]
    fn qmp_lines_read_as_what_they_are() {
        let m: Message = serde_json::from_str(r#"{"return": {}}"#).unwrap();
        assert!(matches!(m, Message::Return { .. }));
        let m: Message = serde_json::from_str(
            r#"{"error": {"class": "GenericError", "desc": "no such thing"}}"#,
        )
        .unwrap();
        assert!(matches!(m, Message::Error { error } if error.desc == "no such thing"));
        let m: Message = serde_json::from_str(
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#,
        )
        .unwrap();
        assert!(matches!(m, Message::Event { .. }));
        let m: Message = serde_json::from_str(
            r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}"#,
        )
        .unwrap();
        assert!(matches!(m, Message::Greeting { .. }));
    }
}
