//! A byte-stream tunnel: stock QEMU/libvirt migration over ferry lanes.
//!
//! The **source** end listens on a UNIX socket (QEMU: `migrate
//! "unix:/path"`); the **destination** end connects to a UNIX socket (a
//! QEMU started with `-incoming unix:/path`). Between them, ferry lanes (TCP,
//! optionally mutual TLS, a bandwidth cap, LZ4).
//!
//! Every connection accepted on the source becomes its own stream, and the
//! destination opens its connections one-to-one **in accept order** (QEMU 7.2
//! takes the first connection as the main channel, the next `N` as multifd
//! channels). A stream's bytes are cut into chunks with sequence numbers,
//! striped over the lanes and put back in order on the other side; each
//! direction's end (half-close) is carried across, so QEMU's return path
//! works. The wire format is in `transport/PROTOCOL.md` ("Tunnel").
//!
//! ```no_run
//! use ferry_transport::tunnel::{Tunnel, TunnelOptions};
//! use ferry_transport::{LaneOptions, Security};
//!
//! # fn main() -> Result<(), ferry_transport::tunnel::TunnelError> {
//! let opts = TunnelOptions::new(LaneOptions::new(2, Security::Insecure));
//! // destination host: listen for the source tunnel, deliver into QEMU's socket
//! let dst = Tunnel::destination("127.0.0.1:7000", "/run/dst-qemu.sock".as_ref(), &opts)?;
//! // source host: QEMU migrates to unix:/run/src-tunnel.sock
//! let src = Tunnel::source("/run/src-tunnel.sock".as_ref(), "127.0.0.1:7000", &opts)?;
//! // ... migrate ...
//! src.stop()?;
//! dst.stop()?;
//! # Ok(())
//! # }
//! ```

pub mod reorder;
mod session;
pub mod wire;

use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub use session::{SessionError, MAX_STREAMS_AHEAD};

use crate::error::TransportError;
use crate::lanes::{LaneListener, LaneOptions, Lanes};
use session::{Role, Session};

/// Default per-stream flow-control window: 16 MiB in flight per direction.
/// Enough to fill a 10 Gb/s link at 10 ms round trip with one stream.
pub const DEFAULT_WINDOW: u64 = 16 << 20;

/// How a tunnel end runs.
#[derive(Debug, Clone)]
pub struct TunnelOptions {
    /// Lanes: count (source side decides), security, bandwidth cap, timeout.
    pub lanes: LaneOptions,
    /// Compress chunks with LZ4 (sent raw when that does not shrink them).
    pub lz4: bool,
    /// Per-stream flow-control window in bytes.
    pub window: u64,
}

impl TunnelOptions {
    /// Tunnel over `lanes`, no LZ4, the default window.
    pub fn new(lanes: LaneOptions) -> TunnelOptions {
        TunnelOptions {
            lanes,
            lz4: false,
            window: DEFAULT_WINDOW,
        }
    }
}

/// Errors starting or running a tunnel end.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The source could not listen on its UNIX socket.
    #[error("could not listen on {path}")]
    BindUnix {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The source could not open its lanes to the destination.
    #[error("could not open lanes to the tunnel destination {peer}")]
    Connect {
        /// The destination address.
        peer: String,
        /// Why (a refused certificate shows here).
        #[source]
        source: TransportError,
    },
    /// The destination could not listen for the source.
    #[error("could not listen for the tunnel source")]
    Listen(#[source] TransportError),
    /// Starting a session failed.
    #[error("could not start the tunnel session")]
    Start(#[source] TransportError),
    /// A session broke off.
    #[error("the tunnel session failed")]
    Session(#[source] SessionError),
}

/// Counters of a tunnel end.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Sessions served.
    pub sessions: AtomicU64,
    /// Streams opened.
    pub streams: AtomicU64,
    /// Bytes read from local sockets (sent into the tunnel).
    pub bytes_from_local: AtomicU64,
    /// Bytes written to local sockets (received from the tunnel).
    pub bytes_to_local: AtomicU64,
    /// The last error seen (refused session, failed local connect, ...).
    pub last_error: Mutex<Option<String>>,
}

/// A running tunnel end. Dropping it stops it.
#[derive(Debug)]
pub struct TunnelHandle {
    stop: Arc<AtomicBool>,
    stats: Arc<TunnelStats>,
    local_addr: Option<SocketAddr>,
    unix_path: Option<PathBuf>,
    main: Option<JoinHandle<Result<(), TunnelError>>>,
    session: Arc<Mutex<Option<Arc<Session>>>>,
}

/// Namespace for starting tunnel ends.
#[derive(Debug)]
pub struct Tunnel;

impl Tunnel {
    /// Source end: opens lanes to the destination end at `peer` (`host:port`)
    /// first (so a refused certificate fails here, before anything listens),
    /// then listens on the UNIX socket `listen` (replacing a stale socket
    /// file) and carries every accepted connection as a stream.
    pub fn source(
        listen: &Path,
        peer: &str,
        opts: &TunnelOptions,
    ) -> Result<TunnelHandle, TunnelError> {
        let lanes = Lanes::connect(peer, &opts.lanes).map_err(|source| TunnelError::Connect {
            peer: peer.to_owned(),
            source,
        })?;
        if std::fs::symlink_metadata(listen).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            let _ = std::fs::remove_file(listen);
        }
        let listener = UnixListener::bind(listen).map_err(|source| TunnelError::BindUnix {
            path: listen.to_owned(),
            source,
        })?;
        let stats = Arc::new(TunnelStats::default());
        stats.add_session();
        let (session, dispatcher) = Session::start(
            lanes,
            Role::Source,
            opts.lz4,
            opts.window,
            Arc::clone(&stats),
        )
        .map_err(TunnelError::Start)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, session2) = (Arc::clone(&stop), Arc::clone(&session));
        let accept = std::thread::Builder::new()
            .name("ferry-tunnel-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) || session2.has_ended() {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    if let Err(e) = session2.open_local(conn) {
                        tracing::warn!("tunnel: could not open a stream: {e}");
                        break;
                    }
                }
            })
            .expect("spawning the tunnel accept thread");
        let (path, stop3, session3) = (listen.to_owned(), Arc::clone(&stop), Arc::clone(&session));
        let main = std::thread::Builder::new()
            .name("ferry-tunnel-source".into())
            .spawn(move || {
                let r = dispatcher.join().unwrap_or(Ok(()));
                session3.end();
                // Wake the accept loop and let it see the end.
                stop3.store(true, Ordering::SeqCst);
                let _ = UnixStream::connect(&path);
                let _ = accept.join();
                let _ = std::fs::remove_file(&path);
                r.map_err(TunnelError::Session)
            })
            .expect("spawning the tunnel source thread");
        Ok(TunnelHandle {
            stop,
            stats,
            local_addr: None,
            unix_path: Some(listen.to_owned()),
            main: Some(main),
            session: Arc::new(Mutex::new(Some(session))),
        })
    }

    /// Destination end: listens on `listen` (`host:port`) for source ends;
    /// each session's streams are connected, in order, to the UNIX socket
    /// `connect`. Serves one session after another until stopped; a refused
    /// source (e.g. wrong certificate) is logged and recorded in
    /// [`TunnelStats::last_error`], and listening goes on.
    pub fn destination(
        listen: &str,
        connect: &Path,
        opts: &TunnelOptions,
    ) -> Result<TunnelHandle, TunnelError> {
        let mut listener =
            LaneListener::bind(listen, opts.lanes.clone()).map_err(TunnelError::Listen)?;
        let local_addr = listener.local_addr().map_err(TunnelError::Listen)?;
        let stats = Arc::new(TunnelStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let current: Arc<Mutex<Option<Arc<Session>>>> = Arc::new(Mutex::new(None));
        let (stop2, stats2, current2) =
            (Arc::clone(&stop), Arc::clone(&stats), Arc::clone(&current));
        let (path, lz4, window) = (connect.to_owned(), opts.lz4, opts.window);
        let main = std::thread::Builder::new()
            .name("ferry-tunnel-destination".into())
            .spawn(move || -> Result<(), TunnelError> {
                let mut dispatchers = Vec::new();
                while !stop2.load(Ordering::SeqCst) {
                    let lanes = match listener.accept_session() {
                        Ok(l) => l,
                        Err(e) => {
                            if !stop2.load(Ordering::SeqCst) {
                                let msg = error_chain(&e);
                                tracing::warn!("tunnel: refused a source: {msg}");
                                *stats2.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                                    Some(msg);
                            }
                            continue;
                        }
                    };
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    stats2.add_session();
                    match Session::start(
                        lanes,
                        Role::Destination(path.clone()),
                        lz4,
                        window,
                        Arc::clone(&stats2),
                    ) {
                        Ok((s, d)) => {
                            *current2.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                            dispatchers.push(d);
                        }
                        Err(e) => tracing::warn!("tunnel: could not start a session: {e}"),
                    }
                }
                if let Some(s) = current2.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    s.end();
                }
                let mut first_err = None;
                for d in dispatchers {
                    if let Ok(Err(e)) = d.join() {
                        first_err.get_or_insert(e);
                    }
                }
                first_err.map_or(Ok(()), |e| Err(TunnelError::Session(e)))
            })
            .expect("spawning the tunnel destination thread");
        Ok(TunnelHandle {
            stop,
            stats,
            local_addr: Some(local_addr),
            unix_path: None,
            main: Some(main),
            session: current,
        })
    }
}

/// An error and its sources on one line, outermost first (`a: b: c`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl TunnelHandle {
    /// The TCP address a destination end listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Counters.
    pub fn stats(&self) -> &TunnelStats {
        &self.stats
    }

    /// Waits until the tunnel ends by itself (source: its session ended;
    /// destination: only after [`TunnelHandle::stop`] from elsewhere).
    pub fn wait(mut self) -> Result<(), TunnelError> {
        match self.main.take() {
            Some(m) => m.join().unwrap_or(Ok(())),
            None => Ok(()),
        }
    }

    /// Stops the tunnel end (closes lanes and local connections) and waits for it.
    pub fn stop(mut self) -> Result<(), TunnelError> {
        self.shutdown();
        self.wait_inner()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(s) = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            s.end();
        }
        if let Some(addr) = self.local_addr {
            // Wake a destination blocked in accept.
            let _ = std::net::TcpStream::connect(addr);
        }
        if let Some(path) = &self.unix_path {
            let _ = UnixStream::connect(path);
        }
    }

    fn wait_inner(&mut self) -> Result<(), TunnelError> {
        match self.main.take() {
            Some(m) => m.join().unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for TunnelHandle {
    fn drop(&mut self) {
        if self.main.is_some() {
            self.shutdown();
            let _ = self.wait_inner();
        }
    }
}
