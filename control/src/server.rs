//! The server side: what a `ferry vm run/receive --api PATH` process
//! answers on its control socket (see [`crate::protocol`]).
//!
//! Every connection gets its own thread. A `migrate` runs on the thread of
//! the connection that asked for it and streams events to that client; the
//! migration itself does not depend on that client: a client that goes
//! away (Ctrl-C, `kill -9`) neither ends nor orphans it. It runs to its end
//! and any other client can follow it (`migration`), cancel it or retune it
//! meanwhile. The last migration's report stays readable until the next
//! one starts.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_engine::{
    resolve_in_doubt, DestinationSummary, InDoubtDecision, InDoubtResolution, MigrationError,
    MigrationOptions, MigrationSteering, Reconnect, Retune, SourceMigration, SteerError,
};
use ferry_transport::lanes::MAX_LANES;
use ferry_transport::{default_lane_count, LaneOptions, Lanes, TransportError};
use ferry_vm::Vm;

use crate::error_chain;
use crate::protocol::{
    decision_words, parse_request, ControlError, ErrorKind, Event, Greeting, GuestHome, Limits,
    MigrateRequest, MigrationReport, Phase, ReceivedSummary, Reply, Request, ResolveAction, Role,
    StatusReply, Summary, MAX_REQUEST_BYTES, PROTOCOL_VERSION,
};
use crate::security::SecuritySpec;
use crate::units::{check_duration, secs_to_duration, MAX_DEADLINE, MAX_DOWNTIME};

/// Most encoder threads a request may ask for.
pub const MAX_WORKERS: usize = 256;

/// How long a `cancel` waits for the migration to wind down before it
/// answers (the source resumes the guest as soon as it sees the cancel;
/// this bounds only the answer).
const CANCEL_ANSWER_WAIT: Duration = Duration::from_secs(30);

/// How long the server waits for a client's request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The control socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another live process answers on the path.
    #[error("{0} is in use by another process")]
    InUse(PathBuf),
    /// The path exists and is not a socket: refuse to delete it.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Removing a stale socket failed.
    #[error("removing stale socket {path}")]
    RemoveStale {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Binding failed.
    #[error("binding control socket {path}")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The accept thread could not start.
    #[error("starting the control socket thread")]
    Thread(#[source] std::io::Error),
}

/// The lanes to a destination could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Lanes out of range.
    #[error("{0} lanes asked for: want 1 to {MAX_LANES}")]
    LaneCount(u16),
    /// The TLS files did not load.
    #[error(transparent)]
    Security(#[from] crate::security::SecurityError),
    /// The lane handshake got no answer in time.
    #[error("cannot connect to the destination {to} ({lanes} lanes, {security}): the lane handshake got no answer within {timeout:?} (a stalled link, or something else listening there)")]
    HandshakeTimeout {
        /// The destination.
        to: String,
        /// Lanes asked for.
        lanes: u16,
        /// The security chosen, in words.
        security: &'static str,
        /// The handshake timeout.
        timeout: Duration,
    },
    /// TCP or the lane handshake failed.
    #[error("cannot connect to the destination {to} ({lanes} lanes, {security}){hint}")]
    Connect {
        /// The destination.
        to: String,
        /// Lanes asked for.
        lanes: u16,
        /// The security chosen, in words.
        security: &'static str,
        /// What to check.
        hint: &'static str,
        /// Why.
        #[source]
        source: Box<TransportError>,
    },
}

/// Opens `lanes` lanes to the destination at `to`, secured as `spec` says.
/// The engine applies a bandwidth cap itself (`MigrationOptions`), so the
/// lanes are not capped a second time.
pub fn connect_lanes(to: &str, lanes: u16, spec: &SecuritySpec) -> Result<Lanes, ConnectError> {
    if !(1..=MAX_LANES).contains(&lanes) {
        return Err(ConnectError::LaneCount(lanes));
    }
    let security = spec.load()?;
    let opts = LaneOptions {
        max_bandwidth: None,
        ..LaneOptions::new(lanes, security)
    };
    let timeout = opts.handshake_timeout;
    Lanes::connect(to, &opts).map_err(|source| {
        use std::io::ErrorKind as Io;
        let io = match &source {
            TransportError::Read(e) | TransportError::Write(e) => Some(e.kind()),
            _ => None,
        };
        // Name the cause the error shows: the security hint only where a
        // security mismatch is what it looks like.
        let hint = match (&source, io) {
            (TransportError::HandshakeTimeout { .. }, _)
            | (_, Some(Io::WouldBlock | Io::TimedOut)) => {
                return ConnectError::HandshakeTimeout {
                    to: to.to_owned(),
                    lanes,
                    security: spec.describe(),
                    timeout,
                }
            }
            (TransportError::PeerClosed, _)
            | (_, Some(Io::ConnectionReset | Io::BrokenPipe | Io::UnexpectedEof)) => {
                ": the destination closed the connection during the lane handshake (it died, refused the session, or the link was cut)"
            }
            (TransportError::Tls(_) | TransportError::Corrupt(_), _) => {
                " after TCP connected; check that both ends make the same security choice (TLS with certificates from one CA, or --insecure on both)"
            }
            _ => "",
        };
        ConnectError::Connect {
            to: to.to_owned(),
            lanes,
            security: spec.describe(),
            hint,
            source: Box::new(source),
        }
    })
}

impl Limits {
    /// Checks every field that is set and returns them as an engine retune.
    pub fn validate(&self) -> Result<Retune, ControlError> {
        let bad = |field: &str, e: &dyn std::fmt::Display| {
            ControlError::bad_request(format!("{field}: {e}"))
        };
        let max_downtime = self
            .max_downtime_ms
            .map(|ms| {
                check_duration(&format!("{ms} ms"), Duration::from_millis(ms), MAX_DOWNTIME)
                    .map_err(|e| bad("max_downtime_ms", &e))
            })
            .transpose()?;
        let deadline = self
            .deadline_s
            .map(|s| secs_to_duration(s, MAX_DEADLINE).map_err(|e| bad("deadline_s", &e)))
            .transpose()?;
        if self.max_bandwidth == Some(0) {
            return Err(bad("max_bandwidth", &"0 bytes/s would never finish"));
        }
        let vcpu_dirty_limit = self
            .vcpu_dirty_limit_mbps
            .map(|l| {
                crate::units::check_vcpu_dirty_limit(l)
                    .map(|l| l * MB_IN_PAGES)
                    .map_err(|e| bad("vcpu_dirty_limit_mbps", &e))
            })
            .transpose()?;
        Ok(Retune {
            max_downtime,
            max_bandwidth: self.max_bandwidth,
            deadline,
            auto_converge: self.auto_converge,
            vcpu_dirty_limit,
        })
    }

    /// `self` with the fields `later` sets overridden by it.
    pub fn merged(self, later: Limits) -> Limits {
        Limits {
            max_downtime_ms: later.max_downtime_ms.or(self.max_downtime_ms),
            deadline_s: later.deadline_s.or(self.deadline_s),
            max_bandwidth: later.max_bandwidth.or(self.max_bandwidth),
            auto_converge: later.auto_converge.or(self.auto_converge),
            vcpu_dirty_limit_mbps: later.vcpu_dirty_limit_mbps.or(self.vcpu_dirty_limit_mbps),
        }
    }
}

/// Pages of [`ferry_engine::encode::PAGE_SIZE`] in one MB (MiB).
const MB_IN_PAGES: u64 = (1 << 20) / ferry_engine::encode::PAGE_SIZE as u64;

impl MigrateRequest {
    /// Engine options from this request, every field checked.
    pub fn options(&self) -> Result<MigrationOptions, ControlError> {
        let retune = self.limits.validate()?;
        let mut o = MigrationOptions::default();
        o.convergence = retune.apply(&o.convergence);
        o.max_bandwidth = retune.max_bandwidth;
        if let Some(w) = self.workers {
            if !(1..=MAX_WORKERS).contains(&w) {
                return Err(ControlError::bad_request(format!(
                    "workers: {w}, want 1 to {MAX_WORKERS}"
                )));
            }
            o.workers = w;
        }
        if let Some(b) = self.xor_cache_bytes {
            o.xor_cache_bytes = Some(usize::try_from(b).map_err(|_| {
                ControlError::bad_request(format!("xor_cache_bytes: {b} does not fit in memory"))
            })?);
        }
        if let Some(c) = self.compress {
            o.compress = c;
        }
        if let Some(d) = self.on_deadline {
            o.convergence.on_deadline = d;
        }
        if let Some(c) = self.converge {
            o.convergence.converge = c;
        }
        if let Some(l) = self.lanes {
            if !(1..=MAX_LANES).contains(&l) {
                return Err(ControlError::bad_request(format!(
                    "lanes: {l}, want 1 to {MAX_LANES}"
                )));
            }
        }
        Ok(o)
    }

    /// The limits in force at the start, defaults filled in.
    fn effective_limits(&self, o: &MigrationOptions) -> Limits {
        Limits {
            max_downtime_ms: Some(
                u64::try_from(o.convergence.max_downtime.as_millis()).unwrap_or(u64::MAX),
            ),
            deadline_s: o.convergence.deadline.map(|d| d.as_secs_f64()),
            max_bandwidth: o.max_bandwidth,
            auto_converge: Some(o.convergence.auto_converge),
            vcpu_dirty_limit_mbps: o.convergence.vcpu_dirty_limit.map(|p| p / MB_IN_PAGES),
        }
    }
}

/// The running or last migration of this process.
#[derive(Debug)]
struct Tracked {
    report: MigrationReport,
    started: Instant,
    steering: Option<MigrationSteering>,
}

impl Tracked {
    fn snapshot(&self) -> MigrationReport {
        let mut r = self.report.clone();
        if !r.phase.is_final() {
            r.elapsed_ms = self.started.elapsed().as_secs_f64() * 1e3;
        }
        r
    }

    fn update(&mut self, ev: &Event) {
        let r = &mut self.report;
        match ev {
            Event::Connected { .. } => r.phase = Phase::Copying,
            Event::Started { guest_bytes, .. } => r.bytes_left = *guest_bytes,
            Event::RoundProgress {
                round,
                pages_done,
                pages_total,
                wire_bytes,
            } => {
                r.round = *round;
                r.bytes_left = pages_total.saturating_sub(*pages_done) * PAGE;
                r.wire_bytes = *wire_bytes;
            }
            Event::RoundFinished {
                round,
                dirty_pages,
                throttle_percent,
                assessment,
                ..
            } => {
                r.round = *round;
                r.bytes_left = dirty_pages * PAGE;
                r.throttle_percent = *throttle_percent;
                r.dirty_rate_pages_per_sec = assessment.dirty_rate_pages_per_sec;
                r.bandwidth_bytes_per_sec = assessment.bandwidth_bytes_per_sec;
                r.expected_downtime_ms = assessment.expected_downtime_ms;
                r.decision = Some(decision_words(&assessment.decision));
                match assessment.decision {
                    ferry_engine::Decision::Throttle { percent } => r.throttle_percent = percent,
                    ferry_engine::Decision::LimitVcpus { max_percent, .. } => {
                        r.throttle_percent = max_percent
                    }
                    _ => {}
                }
            }
            Event::StopAndCopy { dirty_pages } => {
                r.phase = Phase::StopAndCopy;
                r.bytes_left = dirty_pages * PAGE;
            }
            Event::Handover { .. } => r.phase = Phase::Handover,
            Event::Abandoned { reason } => r.error = Some(reason.clone()),
        }
    }
}

const PAGE: u64 = 4096;

/// The state a control socket serves.
#[derive(Debug)]
pub struct Served {
    role: Role,
    vm: Mutex<Option<Arc<Vm>>>,
    home: Mutex<GuestHome>,
    quit: AtomicBool,
    migration: Mutex<Option<Tracked>>,
    /// The handover left in doubt, while the guest is [`GuestHome::InDoubt`].
    in_doubt: Mutex<Option<InDoubtCase>>,
    /// Requests read and not yet answered ([`Served::wait_answered`]).
    answering: Mutex<usize>,
    answered: Condvar,
}

/// One request being answered: counted from when it was read until its
/// reply has been written.
struct Answering<'a>(&'a Served);

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        let mut n = lock(&self.0.answering);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.0.answered.notify_all();
        }
    }
}

/// What `resolve` needs to ask the destination about a handover in doubt.
#[derive(Debug, Clone)]
struct InDoubtCase {
    to: String,
    security: SecuritySpec,
    migration_id: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Served {
    /// A source: its guest runs here.
    pub fn source(vm: Arc<Vm>) -> Arc<Self> {
        Self::new(Role::Source, Some(vm), GuestHome::Here)
    }

    /// A destination waiting for its guest.
    pub fn destination() -> Arc<Self> {
        Self::new(Role::Destination, None, GuestHome::Awaiting)
    }

    fn new(role: Role, vm: Option<Arc<Vm>>, home: GuestHome) -> Arc<Self> {
        Arc::new(Self {
            role,
            vm: Mutex::new(vm),
            home: Mutex::new(home),
            quit: AtomicBool::new(false),
            migration: Mutex::new(None),
            in_doubt: Mutex::new(None),
            answering: Mutex::new(0),
            answered: Condvar::new(),
        })
    }

    fn answering(&self) -> Answering<'_> {
        *lock(&self.answering) += 1;
        Answering(self)
    }

    /// Waits, at most `timeout`, until every request read so far has had
    /// its reply written; whether they all did. A process that ends because
    /// its guest left (or `quit` was asked) calls this first: the state
    /// that ends it changes before the reply that reports it goes out (a
    /// migrate's summary, quit's answer), and exiting in between would cut
    /// the client off with no answer after a migration that succeeded.
    pub fn wait_answered(&self, timeout: Duration) -> bool {
        let n = lock(&self.answering);
        let (n, _) = self
            .answered
            .wait_timeout_while(n, timeout, |n| *n > 0)
            .unwrap_or_else(|p| p.into_inner());
        *n == 0
    }

    /// The guest, once there is one.
    pub fn vm(&self) -> Option<Arc<Vm>> {
        lock(&self.vm).clone()
    }

    /// Where the guest is.
    pub fn home(&self) -> GuestHome {
        *lock(&self.home)
    }

    /// Whether `quit` was asked for.
    pub fn quit_asked(&self) -> bool {
        self.quit.load(Ordering::Acquire)
    }

    /// The running or last migration.
    pub fn migration(&self) -> Option<MigrationReport> {
        lock(&self.migration).as_ref().map(Tracked::snapshot)
    }

    fn blank_report(&self, to: Option<String>, phase: Phase, limits: Limits) -> MigrationReport {
        MigrationReport {
            role: self.role,
            phase,
            guest: self.home(),
            to,
            round: 0,
            bytes_left: 0,
            wire_bytes: 0,
            dirty_rate_pages_per_sec: 0.0,
            bandwidth_bytes_per_sec: 0.0,
            expected_downtime_ms: 0.0,
            throttle_percent: 0,
            decision: None,
            limits,
            elapsed_ms: 0.0,
            summary: None,
            received: None,
            error: None,
        }
    }

    /// A destination: a source connected, a guest is on its way.
    pub fn receiving(&self) {
        let report = self.blank_report(None, Phase::Receiving, Limits::default());
        *lock(&self.migration) = Some(Tracked {
            report,
            started: Instant::now(),
            steering: None,
        });
    }

    /// A destination: the guest arrived and runs here.
    pub fn arrived(&self, vm: Arc<Vm>, summary: &DestinationSummary) {
        *lock(&self.vm) = Some(vm);
        *lock(&self.home) = GuestHome::Here;
        self.finish_receive(Phase::Completed, |r| {
            r.received = Some(ReceivedSummary::from(summary));
            r.wire_bytes = summary.wire_bytes;
            r.round = summary.rounds;
        });
    }

    /// A destination: the incoming migration failed; no guest here.
    pub fn receive_failed(&self, why: &str) {
        self.finish_receive(Phase::Failed, |r| r.error = Some(why.to_owned()));
    }

    fn finish_receive(&self, phase: Phase, f: impl FnOnce(&mut MigrationReport)) {
        let home = self.home();
        let mut m = lock(&self.migration);
        let t = m.get_or_insert_with(|| Tracked {
            report: self.blank_report(None, Phase::Receiving, Limits::default()),
            started: Instant::now(),
            steering: None,
        });
        t.report.elapsed_ms = t.started.elapsed().as_secs_f64() * 1e3;
        t.report.phase = phase;
        t.report.guest = home;
        f(&mut t.report);
    }
}

/// A served control socket; the file is removed when this is dropped.
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves `served` on a UNIX socket at `path` (replacing a stale socket,
/// never another kind of file).
pub fn serve(path: &Path, served: Arc<Served>) -> Result<ControlSocket, ServeError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServeError::NotASocket(path.to_owned()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ServeError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(|source| ServeError::RemoveStale {
            path: path.to_owned(),
            source,
        })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| ServeError::Bind {
        path: path.to_owned(),
        source,
    })?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let s = served.clone();
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || {
                        if let Err(e) = handle(conn, &s) {
                            tracing::debug!(error = %e, "control connection ended");
                        }
                    });
            }
        })
        .map_err(ServeError::Thread)?;
    Ok(ControlSocket {
        path: path.to_owned(),
    })
}

fn send_line(w: &mut impl Write, v: &impl serde::Serialize) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

/// Reads one request line of at most [`MAX_REQUEST_BYTES`].
fn read_request(conn: &UnixStream) -> std::io::Result<Vec<u8>> {
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut reader = BufReader::new(conn.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    Ok(line)
}

fn handle(conn: UnixStream, served: &Served) -> std::io::Result<()> {
    let mut w = conn.try_clone()?;
    send_line(
        &mut w,
        &Greeting {
            ferry_control: PROTOCOL_VERSION,
            role: served.role,
            pid: std::process::id(),
        },
    )?;
    let line = read_request(&conn)?;
    let answering = served.answering();
    let reply = match parse_request(&line) {
        Err(e) => Reply::Error(e),
        Ok(Request::Status) => status(served),
        Ok(Request::Migration) => match served.migration() {
            Some(r) => Reply::Migration(Box::new(r)),
            None => Reply::Error(ControlError::new(
                ErrorKind::NoMigration,
                format!("no migration yet: this {} has not run one", served.role),
                Some(served.home()),
            )),
        },
        Ok(Request::Cancel) => cancel(served),
        Ok(Request::Set(limits)) => set(served, &limits),
        Ok(Request::Resolve { action }) => resolve(served, action),
        Ok(Request::Quit) if served.home() == GuestHome::InDoubt => Reply::Error(ControlError::new(
            ErrorKind::WrongState,
            "the guest is in doubt (paused here, GO sent, the destination unreachable): finish it with `ferry vm resolve --api PATH resume|discard` first",
            Some(GuestHome::InDoubt),
        )),
        Ok(Request::Quit) => {
            served.quit.store(true, Ordering::Release);
            Reply::Ok {
                message: "quitting".into(),
            }
        }
        Ok(Request::Migrate(m)) => match migrate(&mut w, served, &m) {
            Ok(report) => Reply::Done(Box::new(report)),
            Err(e) => Reply::Error(e),
        },
    };
    let sent = send_line(&mut w, &reply);
    drop(answering);
    sent
}

fn status(served: &Served) -> Reply {
    let vm = served.vm();
    Reply::Status(Box::new(StatusReply {
        role: served.role,
        state: served.home(),
        run_state: vm.as_ref().map(|v| v.run_state()),
        status: vm.as_ref().map(|v| v.status()),
    }))
}

fn no_migration(served: &Served, what: &str) -> ControlError {
    let last = served
        .migration()
        .map(|r| format!(" (the last one: {:?})", r.phase).to_lowercase())
        .unwrap_or_default();
    ControlError::new(
        ErrorKind::NoMigration,
        format!("nothing to {what}: no migration is running{last}"),
        Some(served.home()),
    )
}

fn steering(served: &Served) -> Option<MigrationSteering> {
    lock(&served.migration)
        .as_ref()
        .filter(|t| !t.report.phase.is_final())
        .and_then(|t| t.steering.clone())
}

fn steer_error(served: &Served, e: SteerError) -> ControlError {
    let kind = match e {
        SteerError::ZeroBandwidth => ErrorKind::BadRequest,
        SteerError::TooLate | SteerError::Paused => ErrorKind::TooLate,
    };
    ControlError::new(kind, e.to_string(), Some(served.home()))
}

fn cancel(served: &Served) -> Reply {
    let Some(s) = steering(served) else {
        return Reply::Error(no_migration(served, "cancel"));
    };
    if let Err(e) = s.cancel() {
        return Reply::Error(steer_error(served, e));
    }
    let end = Instant::now() + CANCEL_ANSWER_WAIT;
    while Instant::now() < end {
        match served.migration().map(|r| r.phase) {
            Some(Phase::Cancelled) => {
                return Reply::Ok {
                    message: format!("cancelled: the guest is {}", served.home().describe()),
                }
            }
            Some(p) if p.is_final() => {
                return Reply::Error(ControlError::new(
                    ErrorKind::WrongState,
                    format!(
                    "the migration ended as {p:?} before the cancel took effect; the guest is {}",
                    served.home().describe()
                ),
                    Some(served.home()),
                ))
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    Reply::Ok {
        message: "cancel asked; the migration is still winding down".into(),
    }
}

fn set(served: &Served, limits: &Limits) -> Reply {
    let retune = match limits.validate() {
        Ok(r) if r.is_empty() => {
            return Reply::Error(ControlError::bad_request(
                "nothing to set: give at least one limit",
            ))
        }
        Ok(r) => r,
        Err(e) => return Reply::Error(e),
    };
    let Some(s) = steering(served) else {
        return Reply::Error(no_migration(served, "set"));
    };
    if let Err(e) = s.retune(retune) {
        return Reply::Error(steer_error(served, e));
    }
    let mut m = lock(&served.migration);
    let now = match m.as_mut() {
        Some(t) => {
            t.report.limits = t.report.limits.merged(*limits);
            t.report.limits
        }
        None => *limits,
    };
    Reply::Ok {
        message: format!("limits now: {}", describe_limits(&now)),
    }
}

/// Limits in words: "max downtime 20 ms, deadline 300 s, bandwidth 100.0 MiB/s, auto-converge on".
pub fn describe_limits(l: &Limits) -> String {
    let mut parts = Vec::new();
    if let Some(ms) = l.max_downtime_ms {
        parts.push(format!("max downtime {ms} ms"));
    }
    if let Some(s) = l.deadline_s {
        parts.push(format!("deadline {s} s"));
    }
    match l.max_bandwidth {
        Some(b) => parts.push(format!(
            "bandwidth cap {}",
            crate::units::format_rate(b as f64)
        )),
        None => parts.push("no bandwidth cap".into()),
    }
    if let Some(a) = l.auto_converge {
        parts.push(format!("auto-converge {}", if a { "on" } else { "off" }));
    }
    if let Some(mbps) = l.vcpu_dirty_limit_mbps {
        parts.push(format!("vCPU dirty limit {mbps} MB/s"));
    }
    parts.join(", ")
}

fn resolve(served: &Served, action: ResolveAction) -> Reply {
    let home = served.home();
    if home != GuestHome::InDoubt {
        return Reply::Error(ControlError::new(
            ErrorKind::WrongState,
            format!(
                "nothing to resolve ({action:?}): the guest is {}",
                home.describe()
            )
            .to_lowercase(),
            Some(home),
        ));
    }
    let (Some(case), Some(vm)) = (lock(&served.in_doubt).clone(), served.vm()) else {
        return Reply::Error(ControlError::new(
            ErrorKind::WrongState,
            "nothing to resolve: no handover in doubt is recorded",
            Some(home),
        ));
    };
    let decision = match action {
        ResolveAction::Resume => InDoubtDecision::Resume,
        ResolveAction::Discard => InDoubtDecision::Discard,
    };
    let reconnect = reconnect_to(&case.to, &case.security);
    match resolve_in_doubt(
        &*vm,
        case.migration_id,
        decision,
        Some(reconnect),
        RESOLVE_ASK,
    ) {
        Ok(resolution) => {
            *lock(&served.in_doubt) = None;
            let (now, message) = match resolution {
                InDoubtResolution::ResumedHere { destination } => (
                    GuestHome::Here,
                    format!("the guest runs here again (the destination: {destination})"),
                ),
                InDoubtResolution::Discarded => (
                    GuestHome::MigratedAway,
                    "this copy is discarded; the guest lives at the destination".to_owned(),
                ),
            };
            *lock(&served.home) = now;
            if let Some(t) = lock(&served.migration).as_mut() {
                t.report.guest = now;
            }
            Reply::Ok { message }
        }
        Err(e) => Reply::Error(ControlError::new(
            ErrorKind::WrongState,
            error_chain(&e),
            Some(home),
        )),
    }
}

/// How long `resolve resume` tries to reach the destination before it
/// takes the operator's word that the destination is gone.
const RESOLVE_ASK: Duration = Duration::from_secs(3);

/// Opens one fresh lane to `to`, secured as `spec` says, to ask the
/// destination about a handover (its handshake bounded to 2 s).
pub fn reconnect_to(to: &str, spec: &SecuritySpec) -> Reconnect {
    let (to, spec) = (to.to_owned(), spec.clone());
    Box::new(move || {
        let security = spec
            .load()
            .map_err(|e| TransportError::Refused(error_chain(&e)))?;
        let opts = LaneOptions {
            max_bandwidth: None,
            handshake_timeout: Duration::from_secs(2),
            ..LaneOptions::new(1, security)
        };
        Lanes::connect(to.as_str(), &opts)
    })
}

/// Why a migrate request is refused in the state the guest is in.
fn refuse_migrate(served: &Served, home: GuestHome) -> ControlError {
    let message = match (served.role, home) {
        (Role::Destination, GuestHome::Awaiting) => "cannot migrate from here: this is a destination still waiting for its guest; send `ferry migrate` to the source's control socket".to_owned(),
        (_, GuestHome::Migrating) => "cannot migrate: a migration is already running (`ferry migrate status` follows it, `ferry migrate cancel` stops it)".to_owned(),
        (_, GuestHome::MigratedAway) => "cannot migrate: the guest already left; it runs on the destination".to_owned(),
        (_, GuestHome::InDoubt) => "cannot migrate: the last handover is in doubt (GO sent, RUNNING never came); the guest stays paused here until it is resolved".to_owned(),
        (_, h) => format!("cannot migrate: the guest is {}", h.describe()),
    };
    ControlError::new(ErrorKind::WrongState, message, Some(home))
}

fn migrate(
    w: &mut UnixStream,
    served: &Served,
    req: &MigrateRequest,
) -> Result<MigrationReport, ControlError> {
    let with_guest = |mut e: ControlError| {
        e.guest = Some(served.home());
        e
    };
    let opts = req.options().map_err(with_guest)?;
    let Some(spec) = req.security.clone() else {
        return Err(with_guest(ControlError::bad_request("the migrate request chooses no security: send \"security\" with TLS files (ferry migrate --tls-cert/--tls-key/--tls-ca) or insecure (--insecure)")));
    };
    let vm = {
        let mut home = lock(&served.home);
        match (*home, served.vm()) {
            (GuestHome::Here, Some(vm)) => {
                *home = GuestHome::Migrating;
                vm
            }
            (h, _) => {
                drop(home);
                return Err(refuse_migrate(served, h));
            }
        }
    };
    let steering = MigrationSteering::new();
    let limits = req.effective_limits(&opts);
    *lock(&served.migration) = Some(Tracked {
        report: served.blank_report(Some(req.to.clone()), Phase::Connecting, limits),
        started: Instant::now(),
        steering: Some(steering.clone()),
    });
    let lanes = req.lanes.unwrap_or_else(default_lane_count);
    let mut client_gone = false;
    let mut emit = |ev: Event| {
        if let Some(t) = lock(&served.migration).as_mut() {
            t.update(&ev);
        }
        if !client_gone {
            client_gone = send_line(w, &Reply::Event(Box::new(ev))).is_err();
            if client_gone {
                tracing::info!("the client that asked for the migration went away; it goes on");
            }
        }
    };
    let outcome = match connect_lanes(&req.to, lanes, &spec) {
        Err(e) => Err((Phase::Failed, GuestHome::Here, error_chain(&e))),
        Ok(l) => {
            emit(Event::Connected {
                to: req.to.clone(),
                lanes: u16::try_from(l.len()).unwrap_or(u16::MAX),
                security: spec.mode(),
            });
            // A cancel that came while connecting.
            let result = if steering.cancel_asked() {
                Err(MigrationError::Cancelled)
            } else {
                SourceMigration::new(vm, opts)
                    .steered_by(steering)
                    .resolve_with(reconnect_to(&req.to, &spec))
                    .run_lanes(l, |ev| {
                        if let Some(e) = Event::from_engine(&ev) {
                            emit(e);
                        }
                    })
            };
            match result {
                Ok(summary) => Ok(summary),
                Err(e @ MigrationError::Cancelled) => {
                    Err((Phase::Cancelled, GuestHome::Here, error_chain(&e)))
                }
                Err(e @ MigrationError::InDoubt { migration_id, .. }) => {
                    *lock(&served.in_doubt) = Some(InDoubtCase {
                        to: req.to.clone(),
                        security: spec.clone(),
                        migration_id,
                    });
                    Err((Phase::Failed, GuestHome::InDoubt, error_chain(&e)))
                }
                Err(e) => Err((Phase::Failed, GuestHome::Here, error_chain(&e))),
            }
        }
    };
    let (phase, home) = match &outcome {
        Ok(_) => (Phase::Completed, GuestHome::MigratedAway),
        Err((p, h, _)) => (*p, *h),
    };
    *lock(&served.home) = home;
    let mut m = lock(&served.migration);
    let t = m.as_mut().expect("the migration was tracked above");
    t.report.elapsed_ms = t.started.elapsed().as_secs_f64() * 1e3;
    t.report.phase = phase;
    t.report.guest = home;
    t.steering = None;
    match outcome {
        Ok(summary) => {
            t.report.bytes_left = 0;
            t.report.wire_bytes = summary.wire_bytes;
            t.report.summary = Some(Summary::from(&summary));
        }
        Err((_, _, why)) => {
            tracing::warn!(error = %why, "migration failed");
            t.report.error = Some(why);
        }
    }
    Ok(t.report.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guard [`handle`] holds from reading a request until its reply is
    /// written: `wait_answered` returns only after the reply went out, at
    /// once with nothing in flight, and gives up (false) on a reply that
    /// never goes.
    #[test]
    fn an_exit_waits_for_the_replies_being_answered() {
        let served = Served::destination();
        let replied = Arc::new(AtomicBool::new(false));
        let answering = served.answering();
        let waiter = std::thread::spawn({
            let (served, replied) = (served.clone(), replied.clone());
            move || {
                let all = served.wait_answered(Duration::from_secs(60));
                (all, replied.load(Ordering::SeqCst))
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        replied.store(true, Ordering::SeqCst);
        drop(answering);
        assert_eq!(waiter.join().unwrap(), (true, true));
        assert!(served.wait_answered(Duration::ZERO));
        let _stuck = served.answering();
        assert!(!served.wait_answered(Duration::from_millis(10)));
    }

    fn request(vcpu_dirty_limit_mbps: Option<u64>) -> MigrateRequest {
        MigrateRequest {
            to: "h:1".into(),
            lanes: None,
            security: None,
            limits: Limits {
                vcpu_dirty_limit_mbps,
                ..Limits::default()
            },
            workers: None,
            xor_cache_bytes: None,
            compress: None,
            on_deadline: None,
            converge: None,
        }
    }

    #[test]
    fn a_vcpu_dirty_limit_in_mb_per_second_becomes_pages_per_second() {
        let o = request(Some(64)).options().unwrap();
        assert_eq!(o.convergence.vcpu_dirty_limit, Some(64 * 256));
        let o = request(None).options().unwrap();
        assert_eq!(o.convergence.vcpu_dirty_limit, None);
        let e = request(Some(0)).options().unwrap_err().to_string();
        assert!(
            e.contains("vcpu_dirty_limit_mbps: `0 MB/s` is less than"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
    }

    #[test]
    fn a_set_retunes_the_vcpu_dirty_limit_in_pages_per_second() {
        let limits = Limits {
            vcpu_dirty_limit_mbps: Some(8),
            ..Limits::default()
        };
        let r = limits.validate().unwrap();
        assert_eq!(r.vcpu_dirty_limit, Some(8 * 256));
        assert!(!r.is_empty());
        let policy = r.apply(&ferry_engine::ConvergencePolicy::default());
        assert_eq!(policy.vcpu_dirty_limit, Some(8 * 256));
        let e = Limits {
            vcpu_dirty_limit_mbps: Some(2_000_000),
            ..Limits::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("vcpu_dirty_limit_mbps: "), "{e}");
        let merged = Limits::default().merged(limits);
        assert_eq!(merged.vcpu_dirty_limit_mbps, Some(8));
        assert!(describe_limits(&merged).contains("vCPU dirty limit 8 MB/s"));
    }
}
