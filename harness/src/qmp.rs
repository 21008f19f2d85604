//! A small blocking QMP client (QEMU Machine Protocol, JSON over a UNIX socket).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
    /// A request could not be written as JSON.
    #[error("writing QMP {command} as JSON")]
    Request {
        /// The command.
        command: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
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

/// A QMP command: its name, its arguments (the struct, serialized as the
/// request's `arguments`) and the type its `return` reads as.
pub trait Command: Serialize {
    /// The command's name (`execute`).
    const NAME: &'static str;
    /// What its `return` reads as.
    type Answer: DeserializeOwned;
}

/// The request line: `{"execute": NAME, "arguments": {...}}`.
#[derive(Serialize)]
struct Request<'a, C> {
    execute: &'static str,
    arguments: &'a C,
}

/// The `return` of commands that answer `{}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Empty {}

/// `qmp_capabilities`: leave the greeting, enter command mode.
#[derive(Debug, Serialize)]
pub struct QmpCapabilities {}

impl Command for QmpCapabilities {
    const NAME: &'static str = "qmp_capabilities";
    type Answer = Empty;
}

/// `human-monitor-command`: one HMP command line; answers its text.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HumanMonitorCommand<'a> {
    /// The HMP command line, e.g. `xp /2gx 0x1000`.
    pub command_line: &'a str,
}

impl Command for HumanMonitorCommand<'_> {
    const NAME: &'static str = "human-monitor-command";
    type Answer = String;
}

/// `query-status`: the VM's run state.
#[derive(Debug, Serialize)]
pub struct QueryStatus {}

impl Command for QueryStatus {
    const NAME: &'static str = "query-status";
    type Answer = StatusInfo;
}

/// `query-migrate`: the migration's state and figures.
#[derive(Debug, Serialize)]
pub struct QueryMigrate {}

impl Command for QueryMigrate {
    const NAME: &'static str = "query-migrate";
    type Answer = MigrationInfo;
}

/// `migrate`: start migrating to `uri` (`tcp:HOST:PORT`, `unix:PATH`).
#[derive(Debug, Serialize)]
pub struct Migrate<'a> {
    /// Where to.
    pub uri: &'a str,
}

impl Command for Migrate<'_> {
    const NAME: &'static str = "migrate";
    type Answer = Empty;
}

/// `migrate-incoming`: a QEMU started with `-incoming defer` listens on `uri`.
#[derive(Debug, Serialize)]
pub struct MigrateIncoming<'a> {
    /// Where to listen.
    pub uri: &'a str,
}

impl Command for MigrateIncoming<'_> {
    const NAME: &'static str = "migrate-incoming";
    type Answer = Empty;
}

/// `migrate_cancel`: stop the running migration, the VM stays here.
#[derive(Debug, Serialize)]
pub struct MigrateCancel {}

impl Command for MigrateCancel {
    const NAME: &'static str = "migrate_cancel";
    type Answer = Empty;
}

/// A migration capability (QAPI `MigrationCapability`) ferry's tests and
/// benchmarks turn on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationCapability {
    /// Several channels (`multifd-channels`).
    Multifd,
    /// XOR-delta encoding of pages sent before (`xbzrle-cache-size`).
    Xbzrle,
    /// Throttle the vCPUs when rounds do not shrink.
    AutoConverge,
}

/// One entry of `migrate-set-capabilities`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CapabilityState {
    /// Which.
    pub capability: MigrationCapability,
    /// On or off.
    pub state: bool,
}

/// `migrate-set-capabilities`.
#[derive(Debug, Serialize)]
pub struct MigrateSetCapabilities {
    /// The capabilities to set.
    pub capabilities: Vec<CapabilityState>,
}

impl Command for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    type Answer = Empty;
}

/// `multifd-compression`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MultifdCompression {
    /// None.
    None,
    /// zlib.
    Zlib,
    /// zstd.
    Zstd,
}

/// `migrate-set-parameters` (QAPI `MigrateSetParameters`): the parameters
/// ferry sets; those left `None` are not sent and keep their value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateSetParameters {
    /// Longest pause allowed, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Bandwidth cap, bytes/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Channels with the multifd capability.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u32>,
    /// Compression with the multifd capability.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_compression: Option<MultifdCompression>,
    /// XBZRLE's page cache, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache_size: Option<u64>,
}

impl MigrateSetParameters {
    /// Whether it sets nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl Command for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Answer = Empty;
}

/// `set-vcpu-dirty-limit`: every vCPU's dirty rate capped (needs a dirty
/// ring, `-accel kvm,dirty-ring-size=N`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SetVcpuDirtyLimit {
    /// MB/s per vCPU.
    pub dirty_rate: u64,
}

impl Command for SetVcpuDirtyLimit {
    const NAME: &'static str = "set-vcpu-dirty-limit";
    type Answer = Empty;
}

/// A VM's run state (QAPI `RunState`), as `query-status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Debugger attached.
    Debug,
    /// Waiting for an incoming migration.
    Inmigrate,
    /// Internal error.
    InternalError,
    /// I/O error on a disk.
    IoError,
    /// Paused by a command.
    Paused,
    /// Paused after a migration that completed.
    Postmigrate,
    /// Not started yet (`-S`).
    Prelaunch,
    /// Paused for the last part of a migration.
    FinishMigrate,
    /// Restoring a snapshot.
    RestoreVm,
    /// Running.
    Running,
    /// Saving a snapshot.
    SaveVm,
    /// Shut down (`-no-shutdown`).
    Shutdown,
    /// Suspended (ACPI S3).
    Suspended,
    /// Watchdog fired.
    Watchdog,
    /// Guest panicked.
    GuestPanicked,
    /// Colo.
    Colo,
    /// A state this client does not know.
    #[serde(other)]
    Unknown,
}

/// `query-status`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// Running, paused, in or after a migration, ...
    pub status: RunState,
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
        qmp.greeting()?;
        qmp.run(&QmpCapabilities {})?;
        Ok(qmp)
    }

    /// Reads up to the greeting. Events may come first: in one of 20
    /// source QEMUs (7.2) of a `bench compare` run, the first line on a
    /// fresh connection was the RESUME event of the guest starting (it
    /// started while the harness connected), then the greeting. Anything
    /// else, or more than a few events, is no QMP server.
    fn greeting(&mut self) -> Result<()> {
        const EVENTS_BEFORE_GREETING: usize = 8;
        for _ in 0..=EVENTS_BEFORE_GREETING {
            match self.read_message()? {
                Message::Greeting { .. } => return Ok(()),
                Message::Event { .. } => {}
                other => return Err(QmpError::NoGreeting(format!("{other:?}"))),
            }
        }
        Err(QmpError::NoGreeting(format!(
            "more than {EVENTS_BEFORE_GREETING} events and no greeting"
        )))
    }

    fn read_message(&mut self) -> Result<Message> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(QmpError::Read)?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|source| QmpError::Parse { line, source })
    }

    /// Runs `command`; returns its `return` read as the command's answer,
    /// or its error as [`QmpError::Command`]. Events arriving meanwhile are
    /// skipped.
    pub fn run<C: Command>(&mut self, command: &C) -> Result<C::Answer> {
        let request = Request {
            execute: C::NAME,
            arguments: command,
        };
        let mut text = serde_json::to_string(&request).map_err(|source| QmpError::Request {
            command: C::NAME,
            source,
        })?;
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(QmpError::Write)?;
        let value = loop {
            match self.read_message()? {
                Message::Return { value } => break value,
                Message::Error { error } => {
                    return Err(QmpError::Command {
                        command: C::NAME.to_owned(),
                        class: error.class,
                        desc: error.desc,
                    })
                }
                Message::Event { .. } | Message::Greeting { .. } => {}
            }
        };
        C::Answer::deserialize(&value).map_err(|source| QmpError::Answer {
            command: C::NAME.to_owned(),
            answer: value.to_string(),
            source,
        })
    }

    /// Runs a human monitor (HMP) command and returns its text.
    pub fn hmp(&mut self, command_line: &str) -> Result<String> {
        self.run(&HumanMonitorCommand { command_line })
    }

    /// Reads `count` guest-physical u64 words at `addr` (via HMP `xp`).
    pub fn read_phys_u64(&mut self, addr: u64, count: usize) -> Result<Vec<u64>> {
        let text = self.hmp(&format!("xp /{count}gx {addr:#x}"))?;
        parse_xp(&text, count)
    }

    /// `query-status`'s run state.
    pub fn run_state(&mut self) -> Result<RunState> {
        Ok(self.run(&QueryStatus {})?.status)
    }

    /// `query-migrate`'s answer.
    pub fn query_migrate(&mut self) -> Result<MigrationInfo> {
        self.run(&QueryMigrate {})
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
    use serde_json::json;

    fn request_line<C: Command>(command: &C) -> String {
        serde_json::to_string(&Request {
            execute: C::NAME,
            arguments: command,
        })
        .unwrap()
    }

    #[test]
    fn requests_are_written_with_qemus_names() {
        assert_eq!(
            request_line(&MigrateSetParameters {
                downtime_limit: Some(20),
                multifd_compression: Some(MultifdCompression::Zstd),
                ..Default::default()
            }),
            r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":20,"multifd-compression":"zstd"}}"#
        );
        assert_eq!(
            request_line(&MigrateSetCapabilities {
                capabilities: vec![CapabilityState {
                    capability: MigrationCapability::AutoConverge,
                    state: true,
                }],
            }),
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"auto-converge","state":true}]}}"#
        );
        assert_eq!(
            request_line(&HumanMonitorCommand {
                command_line: "xp /1gx 0x1000"
            }),
            r#"{"execute":"human-monitor-command","arguments":{"command-line":"xp /1gx 0x1000"}}"#
        );
        assert_eq!(
            request_line(&QueryStatus {}),
            r#"{"execute":"query-status","arguments":{}}"#
        );
        assert!(MigrateSetParameters::default().is_empty());
    }

    #[test]
    fn run_states_read_typed_and_unknown_ones_still_read() {
        let s: StatusInfo = serde_json::from_str(
            r#"{"status": "finish-migrate", "singlestep": false, "running": false}"#,
        )
        .unwrap();
        assert_eq!(s.status, RunState::FinishMigrate);
        let s: StatusInfo =
            serde_json::from_str(r#"{"status": "levitating", "running": true}"#).unwrap();
        assert_eq!(s.status, RunState::Unknown);
        let empty: Empty = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, Empty {});
    }

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

    /// A QMP server on a socket pair that writes `first` (lines), then
    /// answers one command with an empty return.
    fn serve(first: String) -> (Qmp, std::thread::JoinHandle<String>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        // A client that waits for more than the server wrote fails, not hangs.
        ours.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let server = std::thread::spawn(move || {
            let mut out = theirs.try_clone().unwrap();
            out.write_all(first.as_bytes()).unwrap();
            let mut command = String::new();
            let _ = BufReader::new(theirs).read_line(&mut command);
            let _ = out.write_all(b"{\"return\": {}}\n");
            command
        });
        let qmp = Qmp {
            reader: BufReader::new(ours.try_clone().unwrap()),
            writer: ours,
        };
        (qmp, server)
    }

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}"#;

    #[test]
    fn an_event_before_the_greeting_is_skipped() {
        let lines = format!(
            "{}\n{GREETING}\n",
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}"#
        );
        let (mut qmp, server) = serve(lines);
        qmp.greeting().unwrap();
        qmp.run(&QmpCapabilities {}).unwrap();
        assert!(server.join().unwrap().contains("qmp_capabilities"));
    }

    #[test]
    fn a_server_that_never_greets_is_refused() {
        let (mut qmp, _server) = serve("{\"return\": {}}\n".to_owned());
        assert!(matches!(qmp.greeting(), Err(QmpError::NoGreeting(_))));
        let events = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#;
        let (mut qmp, _server) = serve(format!("{events}\n").repeat(9));
        let err = qmp.greeting().unwrap_err();
        assert!(err.to_string().contains("no greeting"), "{err}");
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
