//! The control socket of a `ferry vm run` / `ferry vm receive` process:
//! JSON lines over a UNIX socket, one request per connection.
//!
//! | request | reply |
//! |---|---|
//! | `{"op":"status"}` | `{"ok":true,"role":..,"state":..,"status":{..}}` |
//! | `{"op":"migrate","to":ADDR,"lanes":N,"security":SEC,..options}` | `{"event":"connected","lanes":N,"security":"tls"\|"insecure"}`, progress events (`{"event":..}`), then `{"result":"ok","summary":{..}}` or `{"result":"error","error":..,"guest":..}` |
//! | `{"op":"quit"}` | `{"ok":true}`, then the process ends |
//!
//! `SEC` is `{"mode":"tls","cert":PATH,"key":PATH,"ca":PATH,"server_name":NAME}`
//! or `{"mode":"insecure"}`; a migrate request without it is refused. The
//! source opens the lanes itself, so the paths are read by the source process.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_engine::{MigrationError, MigrationOptions, SourceMigration};
use ferry_transport::lanes::MAX_LANES;
use ferry_transport::{default_lane_count, LaneOptions, Lanes, TransportError};
use ferry_vm::Vm;
use serde::{Deserialize, Serialize};

use crate::security_args::SecuritySpec;

/// Where the guest of this process is, as far as this process knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestHome {
    /// Runs here.
    Here,
    /// A migration is in progress (the guest still runs here until GO).
    Migrating,
    /// Runs at the destination; this copy is paused for good.
    MigratedAway,
    /// GO was sent but RUNNING never came: paused here, the destination decides.
    InDoubt,
}

/// A migration request's options (all optional: engine defaults).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// Destination address (host:port).
    pub to: String,
    /// TCP lanes to open (default: `ferry_transport::default_lane_count()`).
    pub lanes: Option<u16>,
    /// Plaintext or mutual TLS: required, there is no default.
    pub security: Option<SecuritySpec>,
    /// Downtime limit in milliseconds.
    pub max_downtime_ms: Option<u64>,
    /// Give up after this many seconds.
    pub deadline_s: Option<f64>,
    /// Wire bytes per second cap.
    pub max_bandwidth: Option<u64>,
    /// Throttle the guest when rounds stop shrinking.
    pub auto_converge: Option<bool>,
    /// Encoder threads.
    pub workers: Option<usize>,
    /// XOR-delta cache bytes (0 disables deltas; absent: a quarter of
    /// guest memory).
    pub xor_cache_bytes: Option<usize>,
    /// LZ4-compress pages (default on).
    pub compress: Option<bool>,
}

impl MigrateRequest {
    /// Engine options from this request.
    pub fn options(&self) -> MigrationOptions {
        let mut o = MigrationOptions::default();
        if let Some(ms) = self.max_downtime_ms {
            o.convergence.max_downtime = Duration::from_millis(ms);
        }
        if let Some(s) = self.deadline_s {
            o.convergence.deadline = Some(Duration::from_secs_f64(s));
        }
        if let Some(a) = self.auto_converge {
            o.convergence.auto_converge = a;
        }
        o.max_bandwidth = self.max_bandwidth;
        if let Some(w) = self.workers {
            o.workers = w.max(1);
        }
        if self.xor_cache_bytes.is_some() {
            o.xor_cache_bytes = self.xor_cache_bytes;
        }
        if let Some(c) = self.compress {
            o.compress = c;
        }
        o
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Status,
    Migrate(Box<MigrateRequest>),
    Quit,
}

/// The state a control socket serves.
#[derive(Debug)]
pub struct Served {
    /// The VM (None on a receiver before a guest arrived).
    pub vm: Mutex<Option<Arc<Vm>>>,
    /// Where the guest is.
    pub home: Mutex<GuestHome>,
    /// `source` or `destination`.
    pub role: &'static str,
    /// Set by `quit`.
    pub quit: std::sync::atomic::AtomicBool,
}

impl Served {
    /// State for a process whose guest runs here.
    pub fn new(vm: Option<Arc<Vm>>, role: &'static str) -> Arc<Self> {
        Arc::new(Self {
            vm: Mutex::new(vm),
            home: Mutex::new(GuestHome::Here),
            role,
            quit: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Where the guest is.
    pub fn home(&self) -> GuestHome {
        *self.home.lock().expect("home lock")
    }

    fn set_home(&self, h: GuestHome) {
        *self.home.lock().expect("home lock") = h;
    }
}

/// Removes the socket file when the server goes away.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves `served` on a UNIX socket at `path` (replacing a stale socket).
pub fn serve(path: &Path, served: Arc<Served>) -> anyhow::Result<ApiServer> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("{} is in use by another ferry process", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
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
        })?;
    Ok(ApiServer {
        path: path.to_owned(),
    })
}

fn send(w: &mut impl Write, v: &serde_json::Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).expect("JSON value serialises");
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

fn handle(conn: UnixStream, served: &Served) -> anyhow::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut w = conn;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            send(
                &mut w,
                &serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
            )?;
            return Ok(());
        }
    };
    match req {
        Request::Status => {
            let vm = served.vm.lock().expect("vm lock").clone();
            let status = vm.as_ref().map(|v| v.status());
            let run_state = vm.as_ref().map(|v| format!("{:?}", v.run_state()));
            send(
                &mut w,
                &serde_json::json!({"ok": true, "role": served.role, "state": served.home(), "run_state": run_state, "status": status}),
            )?;
        }
        Request::Quit => {
            served
                .quit
                .store(true, std::sync::atomic::Ordering::Release);
            send(&mut w, &serde_json::json!({"ok": true}))?;
        }
        Request::Migrate(m) => migrate(&mut w, served, &m)?,
    }
    Ok(())
}

fn migrate(w: &mut UnixStream, served: &Served, req: &MigrateRequest) -> anyhow::Result<()> {
    let vm = {
        let mut home = served.home.lock().expect("home lock");
        let vm = served.vm.lock().expect("vm lock").clone();
        match (*home, vm) {
            (GuestHome::Here, Some(vm)) => {
                *home = GuestHome::Migrating;
                vm
            }
            (h, _) => {
                send(
                    w,
                    &serde_json::json!({"result": "error", "error": format!("cannot migrate: the guest is {h:?}"), "guest": h}),
                )?;
                return Ok(());
            }
        }
    };
    let lanes = match connect_request_lanes(req) {
        Ok(l) => l,
        Err(e) => {
            served.set_home(GuestHome::Here);
            let msg = format!("{e:#}");
            send(
                w,
                &serde_json::json!({"result": "error", "error": msg, "guest": GuestHome::Here}),
            )?;
            return Ok(());
        }
    };
    // Before the engine's own events: what the link is.
    let mut client_gone = send(
        w,
        &serde_json::json!({"event": "connected", "to": req.to, "lanes": lanes.len(), "security": req.security.as_ref().map(SecuritySpec::mode)}),
    )
    .is_err();
    let result = SourceMigration::new(vm, req.options()).run_lanes(lanes, |ev| {
        if !client_gone {
            let v = serde_json::to_value(&ev).expect("progress events serialise");
            client_gone = send(w, &v).is_err();
        }
    });
    let reply = match result {
        Ok(summary) => {
            served.set_home(GuestHome::MigratedAway);
            serde_json::json!({"result": "ok", "summary": summary, "guest": GuestHome::MigratedAway})
        }
        Err(e) => {
            let home = if matches!(e, MigrationError::InDoubt { .. }) {
                GuestHome::InDoubt
            } else {
                GuestHome::Here
            };
            served.set_home(home);
            let chain = error_chain(&e);
            serde_json::json!({"result": "error", "error": chain, "guest": home})
        }
    };
    let _ = send(w, &reply);
    Ok(())
}

/// Opens the request's lanes to its destination, secured as it asks.
fn connect_request_lanes(req: &MigrateRequest) -> anyhow::Result<Lanes> {
    let Some(spec) = &req.security else {
        bail!("the migrate request chooses no security: send \"security\" with TLS files (ferry migrate --tls-cert/--tls-key/--tls-ca) or insecure (--insecure)");
    };
    connect_lanes(&req.to, req.lanes.unwrap_or_else(default_lane_count), spec)
}

/// Opens `lanes` lanes to the destination at `to`, secured as `spec` says.
/// The engine applies `max_bandwidth` itself (MigrationOptions), so the
/// lanes are not capped a second time.
pub fn connect_lanes(to: &str, lanes: u16, spec: &SecuritySpec) -> anyhow::Result<Lanes> {
    let security = spec.load()?;
    if !(1..=MAX_LANES).contains(&lanes) {
        bail!("{lanes} lanes asked for: want 1 to {MAX_LANES}");
    }
    let opts = LaneOptions {
        max_bandwidth: None,
        ..LaneOptions::new(lanes, security)
    };
    Lanes::connect(to, &opts).map_err(|e| {
        // TCP worked but the lane handshake did not: most often the two ends
        // chose differently (plaintext against TLS) or trust different CAs.
        let hint = if matches!(e, TransportError::Connect { .. }) {
            ""
        } else {
            "; both ends must make the same security choice: TLS with certificates from one CA, or --insecure on both"
        };
        anyhow::anyhow!(
            "cannot connect to the destination {to} ({lanes} lanes, {}): {}{hint}",
            spec.describe(),
            error_chain(&e)
        )
    })
}

/// An error and its sources in one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Sends one request and returns a reader over the reply lines.
pub fn request(
    path: &Path,
    req: &serde_json::Value,
) -> anyhow::Result<impl Iterator<Item = anyhow::Result<serde_json::Value>>> {
    let mut conn = UnixStream::connect(path).with_context(|| {
        format!(
            "cannot reach the ferry process at {} (is `ferry vm run --api {}` running?)",
            path.display(),
            path.display()
        )
    })?;
    send(&mut conn, req)?;
    let reader = BufReader::new(conn);
    Ok(reader.lines().map(|l| {
        let l = l.context("reading from the control socket")?;
        serde_json::from_str(&l).with_context(|| format!("bad reply line: {l}"))
    }))
}

/// `status` request: the one reply.
pub fn status(path: &Path) -> anyhow::Result<serde_json::Value> {
    request(path, &serde_json::json!({"op": "status"}))?
        .next()
        .context("the ferry process closed the control socket without a reply")?
}
