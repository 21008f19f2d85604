//! Lanes: one session (a migration or a tunnel) over several TCP connections.
//!
//! The connecting side opens `lanes` connections to a [`LaneListener`] and
//! introduces each with a `LaneHello` (session id, lane index, lane count, see
//! [`handshake`]); the listener groups connections by session id and, once all
//! lanes of a session have arrived, welcomes each and hands the set out as
//! [`Lanes`]. Lane 0 is the control lane (both directions).
//!
//! A session that stops half-way (some lanes arrived, the next one does not
//! come within [`LaneOptions::handshake_timeout`]) is dropped: its lanes get
//! an `Abort` saying why and are closed, and its slot among the
//! [`MAX_PENDING_SESSIONS`] is free again. The listener does this while it
//! waits for connections, so nothing holds a socket for a peer that went
//! away.
//!
//! Pages are striped over lanes by page index ([`lane_for_page`]): a page is
//! always sent on the same lane, so per-lane FIFO order keeps a newer copy of a
//! page behind an older one. A shared [`TokenBucket`] caps the bandwidth of all
//! lanes together. [`queue`] runs the lanes' writer threads behind bounded
//! queues (back-pressure) and [`inbox`] their reader threads, merged into
//! one channel: [`Lanes::into_ends`] hands a session out in the pieces they
//! take.

pub mod bucket;
pub mod handshake;
pub mod inbox;
pub mod queue;

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use bucket::TokenBucket;
pub use handshake::{LaneHello, SessionId, MAX_LANES};
pub use inbox::{Consumed, LaneConsumer, LaneEvent, LaneInbox, PassAll, PreparedBuffers, Recycler};
pub use queue::{
    FramedSink, LaneQueues, LaneSink, LinkMeter, LinkTotals, OutFrame, QueueOptions, SocketSink,
    ZeroCopySink,
};

use crate::error::TransportError;
use crate::frame::FrameKind;
use crate::sealed::FrameReceive;
use crate::security::Security;
use crate::stream::{FrameReader, FrameSink, FrameSource, FrameWriter};

/// Pages per stripe: 1024 pages (4 MiB, sixteen dirty-bitmap words) go to the
/// same lane, so one encoder's unit of work (whole bitmap words, re-protected
/// with one call) travels on one lane and batches stay contiguous.
pub const STRIPE_PAGES: u64 = 1024;

/// The lane that carries guest page `page` in a session of `lanes` lanes.
pub fn lane_for_page(page: u64, lanes: usize) -> usize {
    let lanes = u64::try_from(lanes.max(1)).unwrap_or(u64::MAX);
    // The result is < lanes, which came from a usize.
    usize::try_from((page / STRIPE_PAGES) % lanes).unwrap_or(0)
}

/// A sensible lane count for this machine: one per core, at least 4 and at
/// most 8. Fewer than 4 lose even on a small host: over loopback on 2 cores
/// one TCP stream moved 3.5-5.9 GB/s where 4 moved 4.4-6.6 GB/s in the same
/// runs (the bench's TCP ceiling), and each lane's writer and reader thread
/// is one more share of CPU beside the guest's busy vCPUs. Measured
/// (BENCHMARKS.md, "Session 13"): with 2 cores, 4 lanes instead of 2 took
/// 1 GiB idle from 533 to 450 ms and 2 GiB idle from 1,029 to 919 ms.
pub fn default_lane_count() -> u16 {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    u16::try_from(cores.clamp(4, 8)).unwrap_or(4)
}

/// A boxed reading half of a lane (plain TCP or TLS).
pub type LaneRead = Box<dyn Read + Send>;
/// A boxed writing half of a lane (plain TCP or TLS).
pub type LaneWrite = Box<dyn Write + Send>;

/// How lanes are set up.
#[derive(Debug, Clone)]
pub struct LaneOptions {
    /// Number of lanes to open (connecting side), `1..=MAX_LANES`.
    pub lanes: u16,
    /// Plaintext or mutual TLS. There is no default: plaintext must be asked for.
    pub security: Security,
    /// Cap on the bytes/s written by all lanes of the session together.
    pub max_bandwidth: Option<u64>,
    /// How long a new connection may take to complete its handshake.
    pub handshake_timeout: Duration,
}

impl LaneOptions {
    /// `lanes` lanes with `security`, no bandwidth cap, a 10 s handshake timeout.
    pub fn new(lanes: u16, security: Security) -> LaneOptions {
        LaneOptions {
            lanes,
            security,
            max_bandwidth: None,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// One connection of a session.
pub struct Lane {
    index: u16,
    plaintext: bool,
    bucket: Option<Arc<TokenBucket>>,
    /// Frames from the peer.
    pub reader: FrameReader<LaneRead>,
    /// Frames to the peer.
    pub writer: FrameWriter<LaneWrite>,
    socket: TcpStream,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("index", &self.index)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// Shuts a lane's socket down from another thread (unblocks its reader).
#[derive(Debug)]
pub struct LaneCloser(TcpStream);

impl LaneCloser {
    /// A closer for `socket` (a second handle on a lane's socket).
    pub fn new(socket: TcpStream) -> LaneCloser {
        LaneCloser(socket)
    }

    /// A second closer for the same lane.
    pub fn try_clone(&self) -> Result<LaneCloser, TransportError> {
        self.0
            .try_clone()
            .map(LaneCloser)
            .map_err(TransportError::Configure)
    }

    /// Shuts down both directions; errors (already closed) are ignored.
    pub fn close(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }

    /// Shuts down the writing direction: the peer reads a clean end.
    pub fn close_write(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Write);
    }
}

impl Lane {
    /// This lane's index in its session.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Whether the lane is plaintext TCP.
    pub fn is_plaintext(&self) -> bool {
        self.plaintext
    }

    /// A second handle on the lane's TCP socket (e.g. to shut it down from
    /// another thread), if the system gives one.
    pub fn socket_clone(&self) -> Option<TcpStream> {
        self.socket.try_clone().ok()
    }

    /// A handle that can shut this lane down from another thread.
    pub fn closer(&self) -> Result<LaneCloser, TransportError> {
        self.socket
            .try_clone()
            .map(LaneCloser)
            .map_err(TransportError::Configure)
    }

    /// One question and its answer on this lane, on the calling thread:
    /// sends a `kind` frame of `payload` and reads the peer's next frame,
    /// waiting at most `timeout` for it (longer: a [`TransportError::Read`]
    /// of kind `WouldBlock` or `TimedOut`). The question is sealed (header,
    /// checksum) by the lane's writer and the answer validated and verified
    /// by its reader, as every frame of the lane is. For exchanges that
    /// need no threads of their own (the lane handshake, a source's
    /// question about a handover on a fresh session); a migration's or a
    /// tunnel's stream goes through [`Lanes::into_ends`]. Like the
    /// handshake, not charged to the session's bandwidth cap. The lane has
    /// no read timeout again afterwards.
    pub fn request(
        &mut self,
        kind: FrameKind,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<crate::frame::Frame, TransportError> {
        // A zero timeout is refused by the socket (it would mean none).
        let timeout = timeout.max(Duration::from_millis(1));
        self.socket
            .set_read_timeout(Some(timeout))
            .map_err(TransportError::Configure)?;
        let answer = self
            .writer
            .write_frame(kind, 0, payload)
            .and_then(|()| self.writer.flush())
            .and_then(|()| self.reader.read_frame());
        let cleared = self
            .socket
            .set_read_timeout(None)
            .map_err(TransportError::Configure);
        let answer = answer?;
        cleared?;
        Ok(answer)
    }

    /// Splits the lane into its index, reader and writer. The writer is
    /// not charged to the session's bandwidth cap: queues charge it
    /// ([`Lanes::into_ends`]).
    pub fn into_parts(self) -> (u16, FrameReader<LaneRead>, FrameWriter<LaneWrite>) {
        (self.index, self.reader, self.writer)
    }
}

impl FrameSink for Lane {
    fn send_vectored(
        &mut self,
        kind: FrameKind,
        flags: u32,
        parts: &[IoSlice<'_>],
    ) -> Result<(), TransportError> {
        if let Some(b) = &self.bucket {
            b.charge(crate::frame::HEADER_LEN + parts.iter().map(|p| p.len()).sum::<usize>());
        }
        self.writer.write_frame_vectored(kind, flags, parts)
    }
    fn flush(&mut self) -> Result<(), TransportError> {
        self.writer.flush()
    }
}

impl FrameSource for Lane {
    fn recv_into(
        &mut self,
        payload: &mut Vec<u8>,
    ) -> Result<crate::frame::FrameHeader, TransportError> {
        self.reader.read_frame_into(payload)
    }
}

/// All lanes of one session, in lane-index order (lane 0 = control).
#[derive(Debug)]
pub struct Lanes {
    session: SessionId,
    lanes: Vec<Lane>,
}

/// Secures a fresh TCP connection and wraps it for framing.
fn open_lane(
    stream: TcpStream,
    security: &Security,
    server_side: bool,
    bucket: Option<&Arc<TokenBucket>>,
    index: u16,
) -> Result<Lane, TransportError> {
    stream
        .set_nodelay(true)
        .map_err(TransportError::Configure)?;
    let socket = stream.try_clone().map_err(TransportError::Configure)?;
    let (read, write) = if server_side {
        security.accept(stream)?
    } else {
        security.connect(stream)?
    };
    Ok(Lane {
        index,
        plaintext: matches!(security, Security::Insecure),
        bucket: bucket.cloned(),
        reader: FrameReader::new(read),
        writer: FrameWriter::new(write),
        socket,
    })
}

/// A TLS alert while waiting for the welcome means the listener refused
/// this side (with TLS 1.3 the client's certificate is judged after the
/// client's handshake is done): say so instead of "could not read a frame".
fn explain_refusal(e: TransportError) -> TransportError {
    if let TransportError::Read(io) = &e {
        if let Some(rustls::Error::AlertReceived(alert)) = io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return TransportError::Refused(format!(
                "the peer ended the TLS session with alert {alert:?}: it does not accept this side's certificate"
            ));
        }
    }
    e
}

/// A read that timed out during the lane handshake says so, instead of
/// the socket's raw "Resource temporarily unavailable".
fn name_timeout(e: TransportError, timeout: Duration) -> TransportError {
    match &e {
        TransportError::Read(io)
            if matches!(
                io.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            TransportError::HandshakeTimeout { timeout }
        }
        _ => e,
    }
}

fn handshake_err(e: handshake::LaneHandshakeError) -> TransportError {
    TransportError::LaneHandshake(e)
}

impl Lanes {
    /// Opens `opts.lanes` connections to `addr` as one new session and waits
    /// until the listener has welcomed every lane.
    pub fn connect<A: ToSocketAddrs + std::fmt::Debug>(
        addr: A,
        opts: &LaneOptions,
    ) -> Result<Lanes, TransportError> {
        if opts.lanes == 0 || opts.lanes > MAX_LANES {
            return Err(handshake_err(handshake::LaneHandshakeError::BadLaneCount {
                lanes: opts.lanes,
            }));
        }
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| TransportError::Connect {
                addr: format!("{addr:?}"),
                source,
            })?
            .collect();
        let bucket = opts
            .max_bandwidth
            .map(|r| Arc::new(TokenBucket::with_rate(r)));
        let session = handshake::new_session_id();
        let mut lanes = Vec::with_capacity(usize::from(opts.lanes));
        for index in 0..opts.lanes {
            let stream =
                TcpStream::connect(&addrs[..]).map_err(|source| TransportError::Connect {
                    addr: format!("{addr:?}"),
                    source,
                })?;
            stream
                .set_read_timeout(Some(opts.handshake_timeout))
                .map_err(TransportError::Configure)?;
            let mut lane = open_lane(stream, &opts.security, false, bucket.as_ref(), index)?;
            let hello = LaneHello {
                session,
                lane: index,
                lanes: opts.lanes,
            };
            // Wait for this lane's welcome before opening the next, so a
            // refusal (TLS alert, Abort) is reported from the lane it concerns.
            let f = lane
                .request(
                    FrameKind::LaneHello,
                    &hello.encode(),
                    opts.handshake_timeout,
                )
                .map_err(|e| explain_refusal(name_timeout(e, opts.handshake_timeout)))?;
            match f.kind {
                FrameKind::LaneWelcome => hello.check_welcome(&f.payload).map_err(handshake_err)?,
                FrameKind::Abort => {
                    return Err(TransportError::Refused(
                        String::from_utf8_lossy(&f.payload).into_owned(),
                    ))
                }
                other => {
                    return Err(handshake_err(
                        handshake::LaneHandshakeError::UnexpectedKind {
                            expected: "LaneWelcome",
                            got: other,
                        },
                    ))
                }
            }
            lanes.push(lane);
        }
        let out = lanes;
        Ok(Lanes {
            session,
            lanes: out,
        })
    }

    /// The session id shared by all lanes.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// Number of lanes.
    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    /// Whether there are no lanes (never true for a connected session).
    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// The lane that carries guest page `page`.
    pub fn lane_for_page(&self, page: u64) -> usize {
        lane_for_page(page, self.lanes.len())
    }

    /// Lane `i` (0 = control).
    pub fn lane_mut(&mut self, i: usize) -> Option<&mut Lane> {
        self.lanes.get_mut(i)
    }

    /// The lanes, in index order, to move into worker threads.
    pub fn into_vec(self) -> Vec<Lane> {
        self.lanes
    }

    /// The session taken apart for [`LaneQueues`] and [`LaneInbox`]: a
    /// plaintext lane writes through a [`SocketSink`] (sealed frames
    /// gather their pages in place), a TLS lane through its TLS stream.
    pub fn into_ends(self) -> Result<LaneEnds, TransportError> {
        self.take_apart(|lane| {
            let sink: Box<dyn LaneSink> = if lane.plaintext {
                Box::new(SocketSink::new(lane.socket))
            } else {
                Box::new(lane.writer)
            };
            Ok((sink, lane.reader))
        })
    }

    /// [`Lanes::into_ends`] with io_uring zero-copy sinks (up to `depth`
    /// frames in flight per lane); needs plaintext lanes.
    pub fn into_ends_zero_copy(self, depth: usize) -> Result<LaneEnds, TransportError> {
        self.take_apart(|lane| {
            if !lane.plaintext {
                return Err(TransportError::ZeroCopyNeedsPlaintext);
            }
            let sink: Box<dyn LaneSink> = Box::new(ZeroCopySink::new(lane.socket, depth)?);
            Ok((sink, lane.reader))
        })
    }

    fn take_apart(
        self,
        mut split: impl FnMut(
            Lane,
        )
            -> Result<(Box<dyn LaneSink>, FrameReader<LaneRead>), TransportError>,
    ) -> Result<LaneEnds, TransportError> {
        let mut ends = LaneEnds {
            sinks: Vec::with_capacity(self.lanes.len()),
            readers: Vec::with_capacity(self.lanes.len()),
            closers: Vec::with_capacity(self.lanes.len()),
            bucket: None,
        };
        for lane in self.lanes {
            ends.closers.push(lane.closer()?);
            ends.bucket = ends.bucket.or_else(|| lane.bucket.clone());
            let index = lane.index;
            let (sink, reader) = split(lane)?;
            ends.sinks.push(sink);
            ends.readers.push((index, Box::new(reader)));
        }
        Ok(ends)
    }
}

/// A session taken apart ([`Lanes::into_ends`]), in lane-index order.
pub struct LaneEnds {
    /// How each lane writes (for [`LaneQueues::spawn`]).
    pub sinks: Vec<Box<dyn LaneSink>>,
    /// How each lane reads, with its index (for [`LaneInbox::spawn`]).
    pub readers: Vec<(u16, Box<dyn FrameReceive>)>,
    /// Shut each lane down.
    pub closers: Vec<LaneCloser>,
    /// The session's bandwidth cap, if it has one: to charge in
    /// [`QueueOptions::bucket`].
    pub bucket: Option<Arc<TokenBucket>>,
}

impl std::fmt::Debug for LaneEnds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneEnds")
            .field("lanes", &self.sinks.len())
            .field("closers", &self.closers)
            .finish_non_exhaustive()
    }
}

/// Accepts lane connections and groups them into sessions.
#[derive(Debug)]
pub struct LaneListener {
    listener: TcpListener,
    opts: LaneOptions,
    bucket: Option<Arc<TokenBucket>>,
    pending: HashMap<SessionId, PendingSession>,
}

/// A session some of whose lanes arrived.
#[derive(Debug)]
struct PendingSession {
    /// By lane index; `None` until that lane arrives.
    lanes: Vec<Option<Lane>>,
    /// The next lane must arrive by then (`handshake_timeout` after the
    /// last one), or the session is dropped.
    deadline: Instant,
}

/// Most sessions a listener holds half-open (some lanes arrived, not all).
/// Why: a peer that opens lanes and never completes its session must not make
/// the listener hold sockets without bound (and such a session is dropped
/// after [`LaneOptions::handshake_timeout`] anyway, so the slots free up).
pub const MAX_PENDING_SESSIONS: usize = 16;

/// How long the listener tries to tell a dropped half-open lane why.
/// Why: an `Abort` frame fits any socket buffer, but a peer that stopped
/// reading must not hold the listener.
const ABORT_WRITE_TIMEOUT: Duration = Duration::from_millis(200);

impl LaneListener {
    /// Listens on `addr`. `opts.lanes` is ignored (the peer says how many);
    /// `opts.max_bandwidth` caps what this side writes back.
    pub fn bind<A: ToSocketAddrs + std::fmt::Debug>(
        addr: A,
        opts: LaneOptions,
    ) -> Result<LaneListener, TransportError> {
        let listener = TcpListener::bind(&addr).map_err(|source| TransportError::Bind {
            addr: format!("{addr:?}"),
            source,
        })?;
        let bucket = opts
            .max_bandwidth
            .map(|r| Arc::new(TokenBucket::with_rate(r)));
        Ok(LaneListener {
            listener,
            opts,
            bucket,
            pending: HashMap::new(),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.listener
            .local_addr()
            .map_err(TransportError::Configure)
    }

    /// Accepts connections until every lane of some session has arrived, then
    /// welcomes them and returns the session. A connection that fails its
    /// handshake (TLS, bad hello, timeout) ends this call with its error;
    /// lanes of other sessions already accepted stay pending for the next call,
    /// each session until its next lane is `handshake_timeout` late (then it
    /// is dropped, see the module docs).
    pub fn accept_session(&mut self) -> Result<Lanes, TransportError> {
        loop {
            self.drop_stale_sessions();
            let Some(stream) = self.accept_until(self.next_deadline())? else {
                continue;
            };
            stream
                .set_read_timeout(Some(self.opts.handshake_timeout))
                .map_err(TransportError::Configure)?;
            let mut lane = open_lane(stream, &self.opts.security, true, self.bucket.as_ref(), 0)?;
            let f = lane
                .reader
                .read_frame()
                .map_err(|e| name_timeout(e, self.opts.handshake_timeout))?;
            if f.kind != FrameKind::LaneHello {
                let e = handshake::LaneHandshakeError::UnexpectedKind {
                    expected: "LaneHello",
                    got: f.kind,
                };
                let _ = lane
                    .writer
                    .write_frame(FrameKind::Abort, 0, e.to_string().as_bytes());
                return Err(handshake_err(e));
            }
            let hello = match LaneHello::decode(&f.payload) {
                Ok(h) => h,
                Err(e) => {
                    let _ = lane
                        .writer
                        .write_frame(FrameKind::Abort, 0, e.to_string().as_bytes());
                    return Err(handshake_err(e));
                }
            };
            lane.index = hello.lane;
            if !self.pending.contains_key(&hello.session)
                && self.pending.len() >= MAX_PENDING_SESSIONS
            {
                let msg = format!("too many half-open sessions (limit {MAX_PENDING_SESSIONS})");
                let _ = lane.writer.write_frame(FrameKind::Abort, 0, msg.as_bytes());
                return Err(TransportError::Refused(msg));
            }
            let deadline = Instant::now() + self.opts.handshake_timeout;
            let pending = self
                .pending
                .entry(hello.session)
                .or_insert_with(|| PendingSession {
                    lanes: (0..hello.lanes).map(|_| None).collect(),
                    deadline,
                });
            let group = &mut pending.lanes;
            let fits = group.len() == usize::from(hello.lanes)
                && matches!(group.get(usize::from(hello.lane)), Some(None));
            if !fits {
                let msg = format!(
                    "lane {} of {} repeats or contradicts its session's other lanes",
                    hello.lane, hello.lanes
                );
                let _ = lane.writer.write_frame(FrameKind::Abort, 0, msg.as_bytes());
                return Err(TransportError::Refused(msg));
            }
            lane.writer
                .write_frame(FrameKind::LaneWelcome, 0, &hello.welcome())?;
            lane.writer.flush()?;
            lane.socket
                .set_read_timeout(None)
                .map_err(TransportError::Configure)?;
            group[usize::from(hello.lane)] = Some(lane);
            pending.deadline = deadline;
            if pending.lanes.iter().all(Option::is_some) {
                let lanes: Vec<Lane> = self
                    .pending
                    .remove(&hello.session)
                    .map(|p| p.lanes.into_iter().flatten().collect())
                    .unwrap_or_default();
                return Ok(Lanes {
                    session: hello.session,
                    lanes,
                });
            }
        }
    }

    /// Sessions now held half-open.
    pub fn half_open_sessions(&self) -> usize {
        self.pending.len()
    }

    /// When the first half-open session goes stale, if any is held.
    fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// Drops every half-open session whose next lane is late, telling its
    /// lanes why.
    fn drop_stale_sessions(&mut self) {
        let now = Instant::now();
        let timeout = self.opts.handshake_timeout;
        self.pending.retain(|_, p| {
            if p.deadline > now {
                return true;
            }
            let arrived = p.lanes.iter().filter(|l| l.is_some()).count();
            let msg = format!(
                "session dropped: {arrived} of its {} lanes arrived, the next not within {timeout:?}",
                p.lanes.len()
            );
            tracing::warn!("{msg}");
            for mut lane in p.lanes.drain(..).flatten() {
                let _ = lane.socket.set_write_timeout(Some(ABORT_WRITE_TIMEOUT));
                let _ = lane.writer.write_frame(FrameKind::Abort, 0, msg.as_bytes());
                let _ = lane.writer.flush();
                let _ = lane.socket.shutdown(std::net::Shutdown::Both);
            }
            false
        });
    }

    /// The next connection, or `None` when `deadline` passes first (then a
    /// half-open session is due to be dropped).
    fn accept_until(&self, deadline: Option<Instant>) -> Result<Option<TcpStream>, TransportError> {
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            // Round up so the wait never ends just before the deadline.
            let ms = i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX);
            let mut fd = libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `fd` is one valid, initialised pollfd that outlives
            // the call, and the count passed is 1; the listener's descriptor
            // stays open (borrowed from `self`) for the whole call.
            let ready = unsafe { libc::poll(&mut fd, 1, ms) };
            if ready < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    return Ok(None);
                }
                return Err(TransportError::Accept(e));
            }
            if ready == 0 {
                return Ok(None);
            }
        }
        let (stream, _) = self.listener.accept().map_err(TransportError::Accept)?;
        Ok(Some(stream))
    }
}
