//! The client side: one request per connection, typed replies.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::{
    ControlError, Event, Greeting, Limits, MigrateRequest, MigrationReport, Reply, Request,
    StatusReply, PROTOCOL_VERSION,
};

/// How long a client waits for the greeting: a socket that says nothing
/// that fast is not ferry's.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client waits for the answer to a short request (all but
/// `migrate` and `cancel`).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest reply line a client reads: a report is a few KiB.
const MAX_REPLY_BYTES: u64 = 1 << 20;

/// Why talking to a control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing at the path.
    #[error("no control socket at {0} (start one with `ferry vm run --api PATH` or `ferry vm receive --api PATH`)")]
    NoSocket(PathBuf),
    /// The path is a file, a directory, ...
    #[error("{0} is not a socket; give the --api PATH of a `ferry vm run` or `ferry vm receive` process")]
    NotASocket(PathBuf),
    /// A socket file with no process behind it.
    #[error("nothing answers on {0}: a stale socket (its ferry process has ended)")]
    Stale(PathBuf),
    /// Connecting failed otherwise.
    #[error("cannot connect to {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The peer did not greet as ferry does.
    #[error(
        "{path} is not a ferry control socket (its first line was not a ferry greeting: {got})"
    )]
    NotFerry {
        /// The socket.
        path: PathBuf,
        /// What it said instead.
        got: String,
    },
    /// The peer speaks another version.
    #[error("{path} speaks control protocol version {theirs}, this ferry speaks {ours}: use the same ferry on both")]
    Version {
        /// The socket.
        path: PathBuf,
        /// Its version.
        theirs: u32,
        /// Ours.
        ours: u32,
    },
    /// The connection broke or timed out.
    #[error("talking to the ferry process")]
    Io(#[source] std::io::Error),
    /// A reply line that does not parse.
    #[error("the ferry process sent a reply this ferry does not understand: {0}")]
    BadReply(String),
    /// The process closed the socket without an answer.
    #[error(
        "the ferry process closed the control socket before it answered (did it exit or crash?)"
    )]
    Closed,
    /// The server refused or failed the request.
    #[error(transparent)]
    Remote(#[from] ControlError),
    /// A reply of another kind than the request calls for.
    #[error("the ferry process answered a {asked} request with something else: {got}")]
    Unexpected {
        /// The request.
        asked: &'static str,
        /// What came.
        got: String,
    },
}

/// An open connection after the greeting.
#[derive(Debug)]
pub struct Connection {
    greeting: Greeting,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Connection {
    /// Connects to the control socket at `path` and checks its greeting.
    pub fn open(path: &Path) -> Result<Self, ClientError> {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ClientError::NoSocket(path.to_owned()))
            }
            Ok(m) if !m.file_type().is_socket() => {
                return Err(ClientError::NotASocket(path.to_owned()))
            }
            _ => {}
        }
        let stream = UnixStream::connect(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::ConnectionRefused {
                ClientError::Stale(path.to_owned())
            } else {
                ClientError::Connect {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        stream
            .set_read_timeout(Some(GREETING_TIMEOUT))
            .map_err(ClientError::Io)?;
        let writer = stream.try_clone().map_err(ClientError::Io)?;
        let mut reader = BufReader::new(stream);
        let not_ferry = |got: String| ClientError::NotFerry {
            path: path.to_owned(),
            got,
        };
        let line = read_line(&mut reader).map_err(|e| match e {
            ClientError::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                not_ferry(format!("nothing in {} s", GREETING_TIMEOUT.as_secs()))
            }
            ClientError::Closed => not_ferry("it closed at once".into()),
            e => e,
        })?;
        let greeting: Greeting = serde_json::from_str(&line).map_err(|_| {
            let mut shown: String = line.chars().take(60).collect();
            if shown.len() < line.len() {
                shown.push_str("...");
            }
            not_ferry(format!("{shown:?}"))
        })?;
        if greeting.ferry_control != PROTOCOL_VERSION {
            return Err(ClientError::Version {
                path: path.to_owned(),
                theirs: greeting.ferry_control,
                ours: PROTOCOL_VERSION,
            });
        }
        Ok(Self {
            greeting,
            reader,
            writer,
        })
    }

    /// What the server said it is.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Sends `req`; the replies follow. `timeout` bounds each reply line
    /// (`None`: wait as long as it takes, for `migrate`).
    pub fn send(
        mut self,
        req: &Request,
        timeout: Option<Duration>,
    ) -> Result<Replies, ClientError> {
        let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Io(e.into()))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(ClientError::Io)?;
        self.writer.flush().map_err(ClientError::Io)?;
        self.reader
            .get_ref()
            .set_read_timeout(timeout)
            .map_err(ClientError::Io)?;
        Ok(Replies {
            reader: self.reader,
        })
    }
}

fn read_line(reader: &mut BufReader<UnixStream>) -> Result<String, ClientError> {
    let mut buf = Vec::new();
    let n = std::io::Read::take(reader, MAX_REPLY_BYTES)
        .read_until(b'\n', &mut buf)
        .map_err(ClientError::Io)?;
    if n == 0 {
        return Err(ClientError::Closed);
    }
    String::from_utf8(buf)
        .map(|s| s.trim_end().to_owned())
        .map_err(|_| ClientError::BadReply("bytes that are not UTF-8".into()))
}

/// The reply lines to one request.
#[derive(Debug)]
pub struct Replies {
    reader: BufReader<UnixStream>,
}

/// Just the tag of a reply line.
#[derive(serde::Deserialize)]
struct ReplyTag {
    reply: String,
}

impl Replies {
    /// The next reply; `Err(Closed)` when the server closed the socket.
    /// Events this client does not understand (a newer server's new kinds
    /// or fields it cannot read) are skipped, as the version rule says.
    pub fn next_reply(&mut self) -> Result<Reply, ClientError> {
        loop {
            let line = read_line(&mut self.reader)?;
            match serde_json::from_str(&line) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    let is_event =
                        serde_json::from_str::<ReplyTag>(&line).is_ok_and(|t| t.reply == "event");
                    if !is_event {
                        return Err(ClientError::BadReply(format!("{e}: {line}")));
                    }
                    tracing::debug!(error = %e, line, "skipping an event this client cannot read");
                }
            }
        }
    }
}

fn one(path: &Path, req: &Request, timeout: Option<Duration>) -> Result<Reply, ClientError> {
    let reply = Connection::open(path)?.send(req, timeout)?.next_reply()?;
    match reply {
        Reply::Error(e) => Err(ClientError::Remote(e)),
        r => Ok(r),
    }
}

fn unexpected(asked: &'static str, got: &Reply) -> ClientError {
    ClientError::Unexpected {
        asked,
        got: serde_json::to_string(got).unwrap_or_default(),
    }
}

/// `status`: the guest's status and where it is.
pub fn status(path: &Path) -> Result<StatusReply, ClientError> {
    match one(path, &Request::Status, Some(ANSWER_TIMEOUT))? {
        Reply::Status(s) => Ok(*s),
        r => Err(unexpected("status", &r)),
    }
}

/// `migration`: the running or last migration.
pub fn migration(path: &Path) -> Result<MigrationReport, ClientError> {
    match one(path, &Request::Migration, Some(ANSWER_TIMEOUT))? {
        Reply::Migration(m) => Ok(*m),
        r => Err(unexpected("migration", &r)),
    }
}

/// `cancel`: stops the running migration; the answer says where the guest is.
pub fn cancel(path: &Path) -> Result<String, ClientError> {
    match one(path, &Request::Cancel, Some(Duration::from_secs(60)))? {
        Reply::Ok { message } => Ok(message),
        r => Err(unexpected("cancel", &r)),
    }
}

/// `set`: changes the running migration's limits; the answer lists them.
pub fn set(path: &Path, limits: Limits) -> Result<String, ClientError> {
    match one(path, &Request::Set(limits), Some(ANSWER_TIMEOUT))? {
        Reply::Ok { message } => Ok(message),
        r => Err(unexpected("set", &r)),
    }
}

/// `resolve`: finishes a handover left in doubt; the answer says what
/// happened to the guest.
pub fn resolve(path: &Path, action: crate::ResolveAction) -> Result<String, ClientError> {
    // `resume` may ask the destination first (a few seconds at most).
    match one(
        path,
        &Request::Resolve { action },
        Some(Duration::from_secs(30)),
    )? {
        Reply::Ok { message } => Ok(message),
        r => Err(unexpected("resolve", &r)),
    }
}

/// `quit`: asks the process to end.
pub fn quit(path: &Path) -> Result<(), ClientError> {
    match one(path, &Request::Quit, Some(ANSWER_TIMEOUT))? {
        Reply::Ok { .. } => Ok(()),
        r => Err(unexpected("quit", &r)),
    }
}

/// `migrate`: runs a migration, calling `on_event` per event, and returns
/// its final report (completed, failed or cancelled: see its `phase`).
pub fn migrate(
    path: &Path,
    req: MigrateRequest,
    mut on_event: impl FnMut(&Event),
) -> Result<MigrationReport, ClientError> {
    let mut replies = Connection::open(path)?.send(&Request::Migrate(Box::new(req)), None)?;
    loop {
        match replies.next_reply()? {
            Reply::Event(e) => on_event(&e),
            Reply::Done(report) => return Ok(*report),
            Reply::Error(e) => return Err(ClientError::Remote(e)),
            r => return Err(unexpected("migrate", &r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;
    use crate::protocol::{GuestHome, Phase, Role};

    /// A server on a real socket that greets, reads the request and sends `lines`.
    fn serve_lines(
        lines: Vec<String>,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let greeting = Greeting {
                ferry_control: PROTOCOL_VERSION,
                role: Role::Source,
                pid: 1,
            };
            writeln!(c, "{}", serde_json::to_string(&greeting).unwrap()).unwrap();
            let mut req = String::new();
            BufReader::new(c.try_clone().unwrap())
                .read_line(&mut req)
                .unwrap();
            for l in lines {
                writeln!(c, "{l}").unwrap();
            }
        });
        (dir, path, t)
    }

    fn report() -> MigrationReport {
        MigrationReport {
            role: Role::Source,
            phase: Phase::Completed,
            guest: GuestHome::MigratedAway,
            to: Some("h:1".into()),
            round: 2,
            bytes_left: 0,
            wire_bytes: 1,
            dirty_rate_pages_per_sec: 0.0,
            bandwidth_bytes_per_sec: 0.0,
            expected_downtime_ms: 0.0,
            throttle_percent: 0,
            decision: None,
            limits: Limits::default(),
            elapsed_ms: 1.0,
            summary: None,
            received: None,
            error: None,
        }
    }

    #[test]
    fn events_a_client_cannot_read_are_skipped_and_the_end_still_arrives() {
        let done = serde_json::to_string(&Reply::Done(Box::new(report()))).unwrap();
        let (_dir, path, t) = serve_lines(vec![
            r#"{"reply":"event","event":"teleported","to":"mars"}"#.into(),
            r#"{"reply":"event","event":"stop_and_copy","dirty_pages":5}"#.into(),
            done,
        ]);
        let mut seen = Vec::new();
        let req = MigrateRequest {
            to: "h:1".into(),
            lanes: None,
            security: None,
            limits: Limits::default(),
            workers: None,
            xor_cache_bytes: None,
            compress: None,
            on_deadline: None,
            converge: None,
        };
        let got = migrate(&path, req, |e| seen.push(e.clone())).unwrap();
        t.join().unwrap();
        assert_eq!(got, report());
        assert_eq!(seen, vec![Event::StopAndCopy { dirty_pages: 5 }]);
    }

    #[test]
    fn a_reply_that_is_not_an_event_and_does_not_parse_is_an_error() {
        let (_dir, path, t) = serve_lines(vec![r#"{"reply":"nonsense"}"#.into()]);
        let e = status(&path).unwrap_err();
        t.join().unwrap();
        assert!(matches!(e, ClientError::BadReply(_)), "{e}");
    }

    #[test]
    fn another_protocol_version_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            writeln!(c, r#"{{"ferry_control":99,"role":"source","pid":1}}"#).unwrap();
        });
        let e = status(&path).unwrap_err();
        t.join().unwrap();
        assert!(e.to_string().contains("version 99"), "{e}");
    }
}
