//! One tunnel session: local streams carried over one set of lanes.
//!
//! Threads per session: one dispatcher (reads every lane through a
//! [`LaneInbox`], reassembles, routes), the lane writer threads of
//! [`LaneQueues`], and per stream a *pump* (local socket -> lanes) and a
//! *writer* (lanes -> local socket). On the destination an *opener* connects
//! streams to the local socket one by one, in stream-id order.
//!
//! Flow control: a pump may have at most `window` bytes of its stream
//! unacknowledged; the peer's writer grants credit back as it writes the
//! bytes out. So the dispatcher never blocks on a slow local consumer (its
//! per-stream queues are bounded by the window), one stalled stream cannot
//! stall another, and QEMU's multifd channels, which wait on each other,
//! cannot deadlock the tunnel.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{unbounded, Receiver, Sender};

use super::reorder::{Reassembly, ReorderError};
use super::wire::{TunnelMsg, TunnelWireError, MAX_CHUNK};
use super::TunnelStats;
use crate::error::TransportError;
use crate::lanes::{LaneCloser, Lanes};
use crate::lanes::{LaneInbox, LaneQueues, QueueOptions};

/// Most streams a destination opens ahead of the last one it has seen.
/// Why: ids are sequential, so a far-ahead id is a corrupt or hostile peer,
/// and each opened stream costs a local connection and two threads.
pub const MAX_STREAMS_AHEAD: u32 = 64;

/// Why a session broke off.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A lane failed or closed.
    #[error("a lane of the session failed")]
    Lane(#[source] TransportError),
    /// The peer sent an invalid tunnel frame.
    #[error("invalid tunnel frame from the peer")]
    Wire(#[source] TunnelWireError),
    /// The peer broke a stream's ordering rules.
    #[error("stream {id} broke its ordering rules")]
    Reorder {
        /// The stream.
        id: u32,
        /// What was wrong.
        #[source]
        source: ReorderError,
    },
    /// The peer referenced a stream that was never opened.
    #[error("the peer referenced stream {id}, which was never opened")]
    UnknownStream {
        /// The stream id.
        id: u32,
    },
    /// The destination sent `StreamOpen` (only the source opens streams).
    #[error("the destination tried to open stream {id}")]
    UnexpectedOpen {
        /// The stream id.
        id: u32,
    },
    /// A stream id too far ahead of the streams seen.
    #[error("stream {id} is more than {MAX_STREAMS_AHEAD} ahead of stream {next}")]
    TooFarAhead {
        /// The id.
        id: u32,
        /// The next id expected.
        next: u32,
    },
}

/// Which end of the tunnel a session is.
#[derive(Debug, Clone)]
pub(crate) enum Role {
    /// Accepts local connections; opens streams.
    Source,
    /// Connects each stream to this local socket.
    Destination(PathBuf),
}

enum ToSocket {
    Data(Bytes),
    Eof,
    Reset,
}

/// Bytes a pump may still send on its stream.
#[derive(Debug, Default)]
struct Credit {
    state: Mutex<(u64, bool)>,
    cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Credit {
    fn new(window: u64) -> Credit {
        Credit {
            state: Mutex::new((window, false)),
            cv: Condvar::new(),
        }
    }
    /// Takes up to `max` bytes of credit, waiting for some; `None` when closed.
    fn take(&self, max: u64) -> Option<u64> {
        let mut s = lock(&self.state);
        while s.0 == 0 && !s.1 {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.1 {
            return None;
        }
        let n = s.0.min(max);
        s.0 -= n;
        Some(n)
    }
    fn give(&self, n: u64) {
        let mut s = lock(&self.state);
        s.0 = s.0.saturating_add(n);
        self.cv.notify_all();
    }
    fn close(&self) {
        lock(&self.state).1 = true;
        self.cv.notify_all();
    }
}

/// Where a stream's writer gets its local socket (or why there is none).
type SocketReply = Sender<Result<UnixStream, String>>;
/// Requests to the destination's opener: connect stream `id`, reply here.
type OpenRequests = Sender<(u32, SocketReply)>;
/// The dispatcher thread of a session.
pub(crate) type Dispatcher = std::thread::JoinHandle<Result<(), SessionError>>;

struct StreamEntry {
    reasm: Reassembly,
    to_socket: Option<Sender<ToSocket>>,
    eof_delivered: bool,
    credit: Arc<Credit>,
    socket: Arc<OnceLock<UnixStream>>,
}

struct Streams {
    map: HashMap<u32, StreamEntry>,
    /// Source: the next id to assign. Destination: the next id to open.
    next: u32,
}

pub(crate) struct Session {
    queues: LaneQueues,
    closers: Vec<LaneCloser>,
    lz4: bool,
    window: u64,
    streams: Mutex<Streams>,
    stats: Arc<TunnelStats>,
    ended: AtomicBool,
    opener: Mutex<Option<OpenRequests>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl Session {
    /// Starts a session over `lanes`: returns it and its dispatcher thread,
    /// which runs until a lane ends and returns why.
    pub(crate) fn start(
        lanes: Lanes,
        role: Role,
        lz4: bool,
        window: u64,
        stats: Arc<TunnelStats>,
    ) -> Result<(Arc<Session>, Dispatcher), TransportError> {
        let ends = lanes.into_ends()?;
        let inbox = LaneInbox::spawn(ends.readers, 256);
        let mut opts = QueueOptions::new(64);
        opts.bucket = ends.bucket;
        let session = Arc::new(Session {
            queues: LaneQueues::spawn(ends.sinks, Vec::new(), opts),
            closers: ends.closers,
            lz4,
            window,
            streams: Mutex::new(Streams {
                map: HashMap::new(),
                next: 0,
            }),
            stats,
            ended: AtomicBool::new(false),
            opener: Mutex::new(None),
        });
        if let Role::Destination(path) = &role {
            let (tx, rx) = unbounded::<(u32, SocketReply)>();
            *lock(&session.opener) = Some(tx);
            let path = path.clone();
            std::thread::Builder::new()
                .name("ferry-tunnel-open".into())
                .spawn(move || {
                    for (id, reply) in rx {
                        let r = UnixStream::connect(&path).map_err(|e| {
                            format!("stream {id}: could not connect to {}: {e}", path.display())
                        });
                        let _ = reply.send(r);
                    }
                })
                .expect("spawning the tunnel opener thread");
        }
        let s = Arc::clone(&session);
        let dispatcher = std::thread::Builder::new()
            .name("ferry-tunnel-dispatch".into())
            .spawn(move || {
                let r = s.dispatch(&inbox, &role);
                if let Err(e) = &r {
                    let mut msg = e.to_string();
                    let mut src = std::error::Error::source(e);
                    while let Some(c) = src {
                        msg.push_str(": ");
                        msg.push_str(&c.to_string());
                        src = c.source();
                    }
                    tracing::warn!("tunnel session ended: {msg}");
                    s.record_error(&msg);
                }
                s.end();
                inbox.join();
                r
            })
            .expect("spawning the tunnel dispatcher thread");
        Ok((session, dispatcher))
    }

    fn lanes(&self) -> u64 {
        u64::try_from(self.queues.lanes()).unwrap_or(1).max(1)
    }

    fn send(&self, lane: u64, msg: &TunnelMsg) -> Result<(), TransportError> {
        let lane = usize::try_from(lane % self.lanes()).unwrap_or(0);
        self.queues.send(lane, msg.encode(self.lz4))
    }

    /// Whether the session has ended.
    pub(crate) fn has_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Ends the session: closes lanes and every stream.
    pub(crate) fn end(&self) {
        if self.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        for c in &self.closers {
            c.close();
        }
        *lock(&self.opener) = None;
        let mut streams = lock(&self.streams);
        for e in streams.map.values_mut() {
            e.to_socket = None;
            e.credit.close();
            if let Some(s) = e.socket.get() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Source: a new local connection becomes the next stream.
    pub(crate) fn open_local(
        self: &Arc<Session>,
        socket: UnixStream,
    ) -> Result<u32, TransportError> {
        let (id, socket_tx) = {
            let mut streams = lock(&self.streams);
            let id = streams.next;
            streams.next += 1;
            let socket_tx = self.new_stream(&mut streams, id);
            (id, socket_tx)
        };
        // Open goes out before the pump can send any data of the stream.
        self.send(0, &TunnelMsg::Open { id })?;
        let _ = socket_tx.send(Ok(socket));
        Ok(id)
    }

    /// Registers stream `id` and starts its writer thread, which starts the
    /// pump once it has the socket from the returned channel.
    fn new_stream(self: &Arc<Session>, streams: &mut Streams, id: u32) -> SocketReply {
        let (socket_tx, socket_rx) = crossbeam_channel::bounded(1);
        let (tx, rx) = unbounded();
        let credit = Arc::new(Credit::new(self.window));
        let socket = Arc::new(OnceLock::new());
        streams.map.insert(
            id,
            StreamEntry {
                reasm: Reassembly::new(usize::try_from(self.window).unwrap_or(usize::MAX)),
                to_socket: Some(tx),
                eof_delivered: false,
                credit: Arc::clone(&credit),
                socket: Arc::clone(&socket),
            },
        );
        self.stats.streams.fetch_add(1, Ordering::Relaxed);
        let s = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("ferry-tunnel-w{id}"))
            .spawn(move || s.stream_writer(id, &socket_rx, &rx, &credit, &socket))
            .expect("spawning a tunnel stream writer");
        socket_tx
    }

    fn stream_writer(
        self: Arc<Session>,
        id: u32,
        socket_rx: &Receiver<Result<UnixStream, String>>,
        rx: &Receiver<ToSocket>,
        credit: &Arc<Credit>,
        slot: &OnceLock<UnixStream>,
    ) {
        let mut socket = match socket_rx.recv() {
            Ok(Ok(s)) => s,
            Ok(Err(reason)) => {
                tracing::warn!("{reason}");
                self.record_error(&reason);
                let _ = self.send(0, &TunnelMsg::Reset { id, reason });
                credit.close();
                return;
            }
            Err(_) => return,
        };
        let (Ok(pump_socket), Ok(slot_socket)) = (socket.try_clone(), socket.try_clone()) else {
            let _ = self.send(
                0,
                &TunnelMsg::Reset {
                    id,
                    reason: "could not duplicate the socket".into(),
                },
            );
            return;
        };
        let _ = slot.set(slot_socket);
        if self.has_ended() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
            return;
        }
        let s = Arc::clone(&self);
        let pump_credit = Arc::clone(credit);
        std::thread::Builder::new()
            .name(format!("ferry-tunnel-p{id}"))
            .spawn(move || s.stream_pump(id, pump_socket, &pump_credit))
            .expect("spawning a tunnel stream pump");
        let mut granted = 0u64;
        for cmd in rx.iter() {
            match cmd {
                ToSocket::Data(bytes) => {
                    if let Err(e) = socket.write_all(&bytes) {
                        let reason =
                            format!("stream {id}: writing to the local socket failed: {e}");
                        let _ = self.send(0, &TunnelMsg::Reset { id, reason });
                        let _ = socket.shutdown(std::net::Shutdown::Both);
                        credit.close();
                        return;
                    }
                    let n = u64::try_from(bytes.len()).unwrap_or(0);
                    self.stats.bytes_to_local.fetch_add(n, Ordering::Relaxed);
                    granted += n;
                    if granted >= self.window / 4 || rx.is_empty() {
                        if self
                            .send(0, &TunnelMsg::Credit { id, bytes: granted })
                            .is_err()
                        {
                            return;
                        }
                        granted = 0;
                    }
                }
                ToSocket::Eof => {
                    let _ = socket.shutdown(std::net::Shutdown::Write);
                }
                ToSocket::Reset => {
                    let _ = socket.shutdown(std::net::Shutdown::Both);
                    credit.close();
                    return;
                }
            }
        }
        // The session ended.
        let _ = socket.shutdown(std::net::Shutdown::Both);
    }

    fn stream_pump(self: Arc<Session>, id: u32, mut socket: UnixStream, credit: &Credit) {
        let mut seq = 0u64;
        let max = u64::try_from(MAX_CHUNK).unwrap_or(u64::MAX);
        loop {
            let Some(allowed) = credit.take(max) else {
                return;
            };
            let allowed_len = usize::try_from(allowed).unwrap_or(MAX_CHUNK);
            let mut buf = BytesMut::zeroed(allowed_len);
            let n = loop {
                match socket.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            };
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    if !self.has_ended() {
                        let reason = format!("stream {id}: reading the local socket failed: {e}");
                        let _ = self.send(0, &TunnelMsg::Reset { id, reason });
                    }
                    return;
                }
            };
            credit.give(allowed - u64::try_from(n).unwrap_or(0));
            let lane = u64::from(id) + seq;
            if n == 0 {
                let _ = self.send(lane, &TunnelMsg::Eof { id, seq });
                return;
            }
            buf.truncate(n);
            self.stats
                .bytes_from_local
                .fetch_add(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
            let msg = TunnelMsg::Data {
                id,
                seq,
                bytes: buf.freeze(),
            };
            if self.send(lane, &msg).is_err() {
                return;
            }
            seq += 1;
        }
    }

    fn record_error(&self, reason: &str) {
        *lock(&self.stats.last_error) = Some(reason.to_owned());
    }

    fn dispatch(self: &Arc<Session>, inbox: &LaneInbox, role: &Role) -> Result<(), SessionError> {
        let mut ready = Vec::new();
        while let Some(ev) = inbox.recv() {
            let frame = match ev
                .frame
                .and_then(|f| f.into_frame().map_err(TransportError::Corrupt))
            {
                Ok(f) => f,
                // The peer ended the session (its lanes closed; over TLS
                // possibly without close_notify). Streams are torn down hard,
                // so nothing truncated is ever passed off as a clean end.
                Err(TransportError::PeerClosed) => return Ok(()),
                Err(TransportError::Read(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(())
                }
                Err(_) if self.has_ended() => return Ok(()),
                Err(e) => return Err(SessionError::Lane(e)),
            };
            let msg = TunnelMsg::decode(frame.kind, frame.flags, Bytes::from(frame.payload))
                .map_err(SessionError::Wire)?;
            self.handle(msg, role, &mut ready)?;
        }
        Ok(())
    }

    fn handle(
        self: &Arc<Session>,
        msg: TunnelMsg,
        role: &Role,
        ready: &mut Vec<Bytes>,
    ) -> Result<(), SessionError> {
        let id = match &msg {
            TunnelMsg::Open { id }
            | TunnelMsg::Data { id, .. }
            | TunnelMsg::Eof { id, .. }
            | TunnelMsg::Reset { id, .. }
            | TunnelMsg::Credit { id, .. } => *id,
        };
        let mut streams = lock(&self.streams);
        match role {
            Role::Source => {
                if let TunnelMsg::Open { id } = msg {
                    return Err(SessionError::UnexpectedOpen { id });
                }
                if id >= streams.next {
                    return Err(SessionError::UnknownStream { id });
                }
            }
            Role::Destination(_) => {
                if id >= streams.next {
                    if id - streams.next >= MAX_STREAMS_AHEAD {
                        return Err(SessionError::TooFarAhead {
                            id,
                            next: streams.next,
                        });
                    }
                    // Open every stream up to `id`, in order: the opener
                    // connects them to the local socket one by one.
                    while streams.next <= id {
                        let k = streams.next;
                        streams.next += 1;
                        let socket_tx = self.new_stream(&mut streams, k);
                        if let Some(opener) = lock(&self.opener).as_ref() {
                            let _ = opener.send((k, socket_tx));
                        }
                    }
                }
            }
        }
        // A stream already closed on this side: late frames are dropped.
        let Some(entry) = streams.map.get_mut(&id) else {
            return Ok(());
        };
        match msg {
            TunnelMsg::Open { .. } => {}
            TunnelMsg::Data { seq, bytes, .. } => {
                ready.clear();
                entry
                    .reasm
                    .push(seq, bytes, ready)
                    .map_err(|source| SessionError::Reorder { id, source })?;
                if let Some(tx) = &entry.to_socket {
                    for b in ready.drain(..) {
                        let _ = tx.send(ToSocket::Data(b));
                    }
                }
            }
            TunnelMsg::Eof { seq, .. } => {
                entry
                    .reasm
                    .end(seq)
                    .map_err(|source| SessionError::Reorder { id, source })?;
            }
            TunnelMsg::Reset { reason, .. } => {
                tracing::warn!("tunnel stream {id} reset by the peer: {reason}");
                if let Some(tx) = entry.to_socket.take() {
                    let _ = tx.send(ToSocket::Reset);
                }
                entry.credit.close();
                if let Some(s) = entry.socket.get() {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                streams.map.remove(&id);
                return Ok(());
            }
            TunnelMsg::Credit { bytes, .. } => entry.credit.give(bytes),
        }
        if entry.reasm.is_complete() && !entry.eof_delivered {
            entry.eof_delivered = true;
            if let Some(tx) = &entry.to_socket {
                let _ = tx.send(ToSocket::Eof);
            }
        }
        Ok(())
    }
}

/// Per-stream and session counters, shared with the handle.
impl TunnelStats {
    pub(crate) fn add_session(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }
}
