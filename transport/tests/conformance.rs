//! Conformance tests every `FrameSink`/`FrameSource` backend must pass.
//! Each backend gets a thin `#[test]` wrapper over the shared checks.

use std::io::IoSlice;
use std::thread;

use ferry_transport::{tcp, FrameKind, FrameSink, FrameSource, TransportError, MAX_PAYLOAD_LEN};

/// A connected pair: (sink, source) on two ends of one backend.
type Pair = (Box<dyn FrameSink + Send>, Box<dyn FrameSource + Send>);

fn tcp_pair() -> Pair {
    let listener = tcp::FrameListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client = thread::spawn(move || tcp::connect(addr).unwrap());
    let server = listener.accept().unwrap();
    let client = client.join().unwrap();
    (Box::new(client.writer), Box::new(server.reader))
}

fn lane_pair() -> Pair {
    use ferry_transport::{LaneListener, LaneOptions, Lanes, Security};
    let mut listener =
        LaneListener::bind("127.0.0.1:0", LaneOptions::new(1, Security::Insecure)).unwrap();
    let addr = listener.local_addr().unwrap();
    let client = thread::spawn(move || {
        Lanes::connect(addr, &LaneOptions::new(2, Security::Insecure)).unwrap()
    });
    let server = listener.accept_session().unwrap();
    let client = client.join().unwrap();
    let client_lane = client.into_vec().swap_remove(1);
    let server_lane = server.into_vec().swap_remove(1);
    (Box::new(client_lane), Box::new(server_lane))
}

fn tls_lane_pair() -> Pair {
    use ferry_transport::{LaneListener, LaneOptions, Lanes, Security, TlsSettings};
    use std::sync::Arc;
    let set = ferry_transport::tls::generate_cert_set(&["a", "b"]).unwrap();
    let sec = |i: usize| {
        let (_, cert, key) = &set.nodes[i];
        Security::Tls(Arc::new(
            TlsSettings::from_pem(cert, key, &set.ca_pem, "ferry").unwrap(),
        ))
    };
    let mut listener = LaneListener::bind("127.0.0.1:0", LaneOptions::new(1, sec(0))).unwrap();
    let addr = listener.local_addr().unwrap();
    let client_sec = sec(1);
    let client =
        thread::spawn(move || Lanes::connect(addr, &LaneOptions::new(1, client_sec)).unwrap());
    let server = listener.accept_session().unwrap();
    let client = client.join().unwrap();
    (
        Box::new(client.into_vec().swap_remove(0)),
        Box::new(server.into_vec().swap_remove(0)),
    )
}

/// Zero-copy io_uring sender to an io_uring receiver, or `None` (with a
/// loud SKIP) where this kernel has no io_uring zero-copy send.
fn zc_pair() -> Option<Pair> {
    use ferry_transport::zerocopy::{UringReader, ZcSender};
    use ferry_transport::FrameReader;
    if !ZcSender::is_supported() {
        assert!(
            std::env::var_os("FERRY_NO_SKIP").is_none(),
            "FERRY_NO_SKIP is set, so this test may not skip"
        );
        eprintln!("SKIP (zero-copy conformance): io_uring SENDMSG_ZC is not supported here");
        return None;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client = thread::spawn(move || std::net::TcpStream::connect(addr).unwrap());
    let (server, _) = listener.accept().unwrap();
    let client = client.join().unwrap();
    let sink = ZcSender::new(client, 8).unwrap();
    let source = FrameReader::new(UringReader::new(server).unwrap());
    Some((Box::new(sink), Box::new(source)))
}

/// Frames arrive complete, in order, with kinds, flags and payloads intact,
/// including a maximum-size frame and a vectored one; closing is a clean end.
fn delivers_in_order(make: fn() -> Pair) {
    let (mut sink, mut source) = make();
    let big: Vec<u8> = (0..MAX_PAYLOAD_LEN).map(|i| (i % 253) as u8).collect();
    let big2 = big.clone();
    let sender = thread::spawn(move || {
        for i in 0..200u32 {
            sink.send(FrameKind::Progress, i, &i.to_le_bytes()).unwrap();
        }
        let page = [0x5Au8; 4096];
        sink.send_vectored(
            FrameKind::PageBatch,
            0,
            &[
                IoSlice::new(&7u64.to_le_bytes()),
                IoSlice::new(&page),
                IoSlice::new(&page),
            ],
        )
        .unwrap();
        sink.send(FrameKind::PageBatch, 1, &big2).unwrap();
        sink.send(FrameKind::Go, 0, b"").unwrap();
        sink.flush().unwrap();
    });
    for i in 0..200u32 {
        let f = source.recv().unwrap();
        assert_eq!(
            (f.kind, f.flags, f.payload),
            (FrameKind::Progress, i, i.to_le_bytes().to_vec())
        );
    }
    let f = source.recv().unwrap();
    assert_eq!(f.payload.len(), 8 + 8192);
    assert_eq!(&f.payload[..8], &7u64.to_le_bytes());
    assert!(f.payload[8..].iter().all(|&b| b == 0x5A));
    let f = source.recv().unwrap();
    assert_eq!((f.kind, f.flags), (FrameKind::PageBatch, 1));
    assert!(f.payload == big, "maximum-size payload damaged");
    assert_eq!(source.recv().unwrap().kind, FrameKind::Go);
    sender.join().unwrap();
    assert!(matches!(source.recv(), Err(TransportError::PeerClosed)));
}

/// A payload over the limit is refused on the sending side, and the
/// connection stays usable.
fn refuses_oversized(make: fn() -> Pair) {
    let (mut sink, mut source) = make();
    let too_big = vec![0u8; MAX_PAYLOAD_LEN as usize + 1];
    assert!(matches!(
        sink.send(FrameKind::PageBatch, 0, &too_big),
        Err(TransportError::Encode(_))
    ));
    sink.send(FrameKind::Ready, 0, b"ok").unwrap();
    assert_eq!(source.recv().unwrap().payload, b"ok");
}

#[test]
fn tcp_delivers_in_order() {
    delivers_in_order(tcp_pair);
}

#[test]
fn tcp_refuses_oversized() {
    refuses_oversized(tcp_pair);
}

#[test]
fn lane_delivers_in_order() {
    delivers_in_order(lane_pair);
}

#[test]
fn lane_refuses_oversized() {
    refuses_oversized(lane_pair);
}

#[test]
fn tls_lane_delivers_in_order() {
    delivers_in_order(tls_lane_pair);
}

#[test]
fn tls_lane_refuses_oversized() {
    refuses_oversized(tls_lane_pair);
}

#[test]
fn zero_copy_delivers_in_order() {
    if zc_pair().is_some() {
        delivers_in_order(|| zc_pair().unwrap());
    }
}

#[test]
fn zero_copy_refuses_oversized() {
    if zc_pair().is_some() {
        refuses_oversized(|| zc_pair().unwrap());
    }
}

/// Owned frames pipelined `depth` deep arrive whole and in order.
#[test]
fn zero_copy_pipelined_owned_frames_arrive_in_order() {
    use bytes::Bytes;
    use ferry_transport::lanes::queue::OutFrame;
    use ferry_transport::zerocopy::ZcSender;
    use ferry_transport::FrameReader;
    if !ZcSender::is_supported() {
        assert!(
            std::env::var_os("FERRY_NO_SKIP").is_none(),
            "FERRY_NO_SKIP is set, so this test may not skip"
        );
        eprintln!("SKIP (zero-copy pipeline): io_uring SENDMSG_ZC is not supported here");
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sender = thread::spawn(move || {
        let mut zc = ZcSender::new(std::net::TcpStream::connect(addr).unwrap(), 16).unwrap();
        let memory = Bytes::from(
            (0..1u32 << 22)
                .map(|i| (i % 241) as u8)
                .collect::<Vec<u8>>(),
        );
        for i in 0..500u32 {
            let off = (i as usize * 4096 * 7) % ((1 << 22) - 65536);
            let frame = OutFrame {
                kind: FrameKind::PageBatch,
                flags: i,
                parts: vec![
                    Bytes::copy_from_slice(&i.to_le_bytes()),
                    memory.slice(off..off + 65536),
                ],
            };
            zc.send_owned(frame).unwrap();
        }
        zc.flush().unwrap();
    });
    let (server, _) = listener.accept().unwrap();
    let mut r = FrameReader::new(server);
    for i in 0..500u32 {
        let f = r.read_frame().unwrap();
        assert_eq!(f.flags, i);
        assert_eq!(&f.payload[..4], &i.to_le_bytes());
        let off = (i as usize * 4096 * 7) % ((1 << 22) - 65536);
        assert!(f.payload[4..]
            .iter()
            .enumerate()
            .all(|(j, &b)| b == ((off + j) as u32 % 241) as u8));
    }
    sender.join().unwrap();
    assert!(matches!(r.read_frame(), Err(TransportError::PeerClosed)));
}

// ---------------------------------------------------------------------------
// The lane path: what the engine and the tunnel send and receive through
// (`LaneQueues` writer threads, `LaneInbox` reader threads, frames sealed by
// their producer and verified by their consumer), for every kind of lane
// sink: plaintext sockets (pages gathered in place), TLS, io_uring zero-copy.
// ---------------------------------------------------------------------------

mod lane_path {
    use std::collections::{HashMap, HashSet};
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};
    use std::thread;
    use std::time::{Duration, Instant};

    use ferry_transport::lanes::{
        Consumed, LaneConsumer, LaneEnds, LaneInbox, LaneQueues, OutFrame, QueueOptions,
        TokenBucket, STRIPE_PAGES,
    };
    use ferry_transport::sealed::GatherPart;
    use ferry_transport::{
        frame::FLAG_COVERED_SUFFIX, lane_for_page, FrameKind, LaneListener, LaneOptions, Lanes,
        ReceivedFrame, SealedFrame, Security, TlsSettings, TransportError, FRAME_HEADROOM,
    };

    /// Longest any wait here may take before the test fails (never reached
    /// when the transport works: it bounds a hang, it measures nothing).
    const HANG: Duration = Duration::from_secs(60);

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Sink {
        Plain,
        Tls,
        ZeroCopy,
    }

    fn security(sink: Sink, node: usize) -> Security {
        if sink != Sink::Tls {
            return Security::Insecure;
        }
        let set =
            CERTS.get_or_init(|| ferry_transport::tls::generate_cert_set(&["a", "b"]).unwrap());
        let (_, cert, key) = &set.nodes[node];
        Security::Tls(Arc::new(
            TlsSettings::from_pem(cert, key, &set.ca_pem, "ferry").unwrap(),
        ))
    }

    static CERTS: std::sync::OnceLock<ferry_transport::tls::CertSet> = std::sync::OnceLock::new();

    /// A connected session of `lanes` lanes taken apart: (sending side,
    /// receiving side), or `None` (with a loud SKIP) where this kernel has
    /// no io_uring zero-copy send.
    fn session(sink: Sink, lanes: u16) -> Option<(LaneEnds, LaneEnds)> {
        if sink == Sink::ZeroCopy && !ferry_transport::zerocopy::ZcSender::is_supported() {
            assert!(
                std::env::var_os("FERRY_NO_SKIP").is_none(),
                "FERRY_NO_SKIP is set, so this test may not skip"
            );
            eprintln!("SKIP (zero-copy lane path): io_uring SENDMSG_ZC is not supported here");
            return None;
        }
        let mut listener =
            LaneListener::bind("127.0.0.1:0", LaneOptions::new(1, security(sink, 0))).unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let client_sec = security(sink, 1);
        let client =
            thread::spawn(move || Lanes::connect(addr, &LaneOptions::new(lanes, client_sec)));
        let server = listener.accept_session().unwrap();
        let client = client.join().unwrap().unwrap();
        let sender = match sink {
            Sink::ZeroCopy => client.into_ends_zero_copy(8).unwrap(),
            _ => client.into_ends().unwrap(),
        };
        Some((sender, server.into_ends().unwrap()))
    }

    fn queues(ends: LaneEnds, depth: usize, bucket: Option<Arc<TokenBucket>>) -> LaneQueues {
        let mut opts = QueueOptions::new(depth);
        opts.bucket = bucket;
        LaneQueues::spawn(ends.sinks, ends.closers, opts)
    }

    /// A sealed page batch of `pages` (their first page `first`, `version`
    /// written into each), its pages gathered in place when the lanes can.
    /// Layout: for each page 4096 bytes, then a covered table of
    /// (first, version, count) and its length.
    fn batch(first: u64, version: u32, pages: usize, gather: bool) -> SealedFrame {
        let page = |i: usize| -> Vec<u8> {
            let mut p = vec![0u8; 4096];
            p[..8].copy_from_slice(&(first + i as u64).to_le_bytes());
            p[8..12].copy_from_slice(&version.to_le_bytes());
            p
        };
        let mut table = first.to_le_bytes().to_vec();
        table.extend_from_slice(&version.to_le_bytes());
        table.extend_from_slice(&u32::try_from(pages).unwrap().to_le_bytes());
        table.extend_from_slice(&20u32.to_le_bytes());
        let mut buf = vec![0u8; FRAME_HEADROOM];
        if !gather {
            (0..pages).for_each(|i| buf.extend_from_slice(&page(i)));
            buf.extend_from_slice(&table);
            return SealedFrame::seal(buf, FrameKind::PageBatch, FLAG_COVERED_SUFFIX).unwrap();
        }
        buf.extend_from_slice(&table);
        let memory: Arc<Vec<Vec<u8>>> = Arc::new((0..pages).map(page).collect());
        let parts = memory
            .iter()
            .map(|p| GatherPart {
                at: FRAME_HEADROOM,
                addr: p.as_ptr() as usize,
                len: p.len(),
            })
            .collect();
        // SAFETY: the pages live in `memory`, which the frame keeps alive.
        unsafe {
            SealedFrame::seal_gathered(
                buf,
                parts,
                memory,
                FrameKind::PageBatch,
                FLAG_COVERED_SUFFIX,
            )
        }
        .unwrap()
    }

    /// Checks a received batch: every page is whole and of the batch's
    /// version; returns (first page, version).
    fn check_batch(payload: &[u8]) -> (u64, u32) {
        let table = &payload[payload.len() - 20..];
        let first = u64::from_le_bytes(table[..8].try_into().unwrap());
        let version = u32::from_le_bytes(table[8..12].try_into().unwrap());
        let pages = u32::from_le_bytes(table[12..16].try_into().unwrap()) as usize;
        assert_eq!(payload.len(), pages * 4096 + 20);
        for (i, p) in payload.chunks(4096).take(pages).enumerate() {
            assert_eq!(
                u64::from_le_bytes(p[..8].try_into().unwrap()),
                first + i as u64
            );
            assert_eq!(u32::from_le_bytes(p[8..12].try_into().unwrap()), version);
        }
        (first, version)
    }

    /// Sends four versions of pages striped over the lanes by page index
    /// (gathered frames every other version where the sink gathers), then
    /// a broadcast round end.
    fn send_striped_versions(tx: LaneEnds) -> thread::JoinHandle<()> {
        thread::spawn(move || {
            let q = queues(tx, 2, None);
            let cancel = AtomicBool::new(false);
            for version in 0u32..4 {
                for first in (0..STRIPE_PAGES * 8).step_by(STRIPE_PAGES as usize / 4) {
                    let lane = lane_for_page(first, q.lanes());
                    let frame = batch(first, version, 3, q.gathers() && version % 2 == 0);
                    q.send_sealed(lane, frame, &cancel).unwrap();
                }
            }
            q.broadcast(&OutFrame::new(FrameKind::RoundEnd, 0, Vec::new()), None)
                .unwrap();
            q.finish().unwrap();
        })
    }

    /// Checks a batch of [`send_striped_versions`] received on `lane`: it
    /// came on its pages' lane, as the next version of its pages after the
    /// last one `last` saw.
    fn check_striped(lane: usize, frame: &ReceivedFrame, last: &mut HashMap<u64, u32>) {
        let (first, version) = check_batch(frame.verify().unwrap());
        assert_eq!(lane, lane_for_page(first, 4), "page {first} on lane {lane}");
        let prev = last.insert(first, version);
        assert_eq!(
            prev.map_or(0, |p| p + 1),
            version,
            "page {first} out of order"
        );
    }

    /// Reads `inbox` until each of the 4 lanes of [`send_striped_versions`]
    /// has passed on its round end, each other frame to `on_frame` (with its
    /// lane): nothing comes on a lane after its round end (it may close
    /// cleanly). Then `sender` is done and every page arrived in its last
    /// version, by `last` (page -> last version seen).
    fn until_round_ends(
        inbox: &LaneInbox,
        sender: thread::JoinHandle<()>,
        last: &Mutex<HashMap<u64, u32>>,
        mut on_frame: impl FnMut(usize, ReceivedFrame),
    ) {
        let mut ends = [false; 4];
        while ends.iter().any(|e| !e) {
            let ev = inbox.recv_timeout(HANG).expect("a frame");
            let lane = usize::from(ev.lane);
            let frame = match ev.frame {
                // A lane whose round ended may close cleanly.
                Err(TransportError::PeerClosed) if ends[lane] => continue,
                other => other.unwrap(),
            };
            assert!(!ends[lane], "a frame after lane {lane}'s round end");
            match frame.kind() {
                FrameKind::RoundEnd => ends[lane] = true,
                _ => on_frame(lane, frame),
            }
        }
        sender.join().unwrap();
        let last = last.lock().unwrap();
        assert_eq!(last.len(), 32);
        assert!(last.values().all(|&v| v == 3));
    }

    /// Pages striped over the lanes by page index arrive each on its lane,
    /// each page's versions in order, every sealed frame verified by the
    /// consumer; a broadcast round end closes every lane's round.
    fn striped_pages(sink: Sink) {
        let Some((tx, rx)) = session(sink, 4) else {
            return;
        };
        let sender = send_striped_versions(tx);
        let inbox = LaneInbox::spawn(rx.readers, 8);
        let recycler = inbox.recycler();
        let last = Mutex::new(HashMap::new());
        until_round_ends(&inbox, sender, &last, |lane, frame| match frame.kind() {
            FrameKind::PageBatch => {
                check_striped(lane, &frame, &mut last.lock().unwrap());
                recycler.recycle(frame.into_buffer());
            }
            other => panic!("unexpected {other}"),
        });
    }

    /// Checks page batches on the lane's own reader thread
    /// ([`LaneInbox::spawn_with`]); passes every other frame on. It hands
    /// each buffer back with [`MARK_CAPACITY`] reserved, so a batch that
    /// comes in a smaller buffer was not read into the one handed back.
    struct BatchChecker {
        lane: u16,
        batches: usize,
        /// Page -> last version seen.
        last: Arc<Mutex<HashMap<u64, u32>>>,
        /// Lanes whose batch (after the first) came in another buffer.
        fresh: Arc<Mutex<HashSet<u16>>>,
    }

    const MARK_CAPACITY: usize = 1 << 20;

    impl LaneConsumer for BatchChecker {
        fn consume(&mut self, frame: ReceivedFrame) -> Consumed {
            if frame.kind() != FrameKind::PageBatch {
                return Consumed::PassedOn(frame);
            }
            check_striped(
                usize::from(self.lane),
                &frame,
                &mut self.last.lock().unwrap(),
            );
            let mut buf = frame.into_buffer();
            if self.batches > 0 && buf.capacity() < MARK_CAPACITY {
                self.fresh.lock().unwrap().insert(self.lane);
            }
            self.batches += 1;
            buf.reserve(MARK_CAPACITY.saturating_sub(buf.len()));
            Consumed::Kept(buf)
        }
    }

    /// As [`striped_pages`], the batches taken on each lane's reader
    /// thread: in order, each into the one buffer its lane reuses, and only
    /// the round ends reach the channel.
    fn striped_pages_taken_on_the_readers(sink: Sink) {
        let Some((tx, rx)) = session(sink, 4) else {
            return;
        };
        let sender = send_striped_versions(tx);
        let last = Arc::new(Mutex::new(HashMap::new()));
        let fresh = Arc::new(Mutex::new(HashSet::new()));
        let inbox = LaneInbox::spawn_with(rx.readers, 8, |lane| BatchChecker {
            lane,
            batches: 0,
            last: last.clone(),
            fresh: fresh.clone(),
        });
        until_round_ends(&inbox, sender, &last, |lane, frame| {
            panic!("lane {lane}: a {} reached the channel", frame.kind())
        });
        // Every batch after a lane's first was read into the buffer the
        // consumer handed back.
        assert!(fresh.lock().unwrap().is_empty(), "{fresh:?}");
    }

    #[test]
    fn plain_lanes_hand_batches_to_the_reader_threads_consumer() {
        striped_pages_taken_on_the_readers(Sink::Plain);
    }

    #[test]
    fn tls_lanes_hand_batches_to_the_reader_threads_consumer() {
        striped_pages_taken_on_the_readers(Sink::Tls);
    }

    #[test]
    fn plain_lanes_stripe_sealed_pages() {
        striped_pages(Sink::Plain);
    }

    #[test]
    fn tls_lanes_stripe_sealed_pages() {
        striped_pages(Sink::Tls);
    }

    #[test]
    fn zero_copy_lanes_stripe_sealed_pages() {
        striped_pages(Sink::ZeroCopy);
    }

    /// A bit flipped on the wire in a sealed frame's covered bytes is
    /// caught where the frame is consumed, and the reader goes on.
    #[test]
    fn a_corrupt_frame_fails_the_consumers_verification() {
        use std::io::Write;
        let mut listener =
            LaneListener::bind("127.0.0.1:0", LaneOptions::new(1, Security::Insecure)).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = thread::spawn(move || {
            Lanes::connect(addr, &LaneOptions::new(1, Security::Insecure)).unwrap()
        });
        let server = listener.accept_session().unwrap();
        let mut client = client.join().unwrap();
        let good = batch(0, 1, 2, false);
        let mut damaged = good.contiguous().unwrap().to_vec();
        let at = damaged.len() - 10;
        damaged[at] ^= 0x40;
        let lane = client.lane_mut(0).unwrap();
        lane.writer.get_mut().write_all(&damaged).unwrap();
        lane.writer
            .get_mut()
            .write_all(good.contiguous().unwrap())
            .unwrap();
        lane.writer.get_mut().flush().unwrap();
        let inbox = LaneInbox::spawn(server.into_ends().unwrap().readers, 4);
        let frame = inbox.recv_timeout(HANG).unwrap().frame.unwrap();
        assert!(matches!(
            frame.verify(),
            Err(ferry_transport::FrameError::ChecksumMismatch {
                kind: FrameKind::PageBatch,
                ..
            })
        ));
        let frame = inbox.recv_timeout(HANG).unwrap().frame.unwrap();
        assert_eq!(check_batch(frame.verify().unwrap()), (0, 1));
    }

    /// Control frames count against the session's cap but never wait
    /// behind the pages' debt: with lane 1's writer owing the bucket for
    /// days, lane 0's control frames still go out at once.
    #[test]
    fn control_frames_never_wait_behind_page_debt() {
        let Some((tx, rx)) = session(Sink::Plain, 2) else {
            return;
        };
        // 1 byte/s: one 1 MiB batch is twelve days of debt.
        let bucket = Arc::new(TokenBucket::new(1, 64 << 10));
        let q = queues(tx, 4, Some(bucket.clone()));
        let cancel = AtomicBool::new(false);
        q.send_sealed(1, batch(STRIPE_PAGES, 0, 256, false), &cancel)
            .unwrap();
        q.send_sealed(1, batch(STRIPE_PAGES, 1, 256, false), &cancel)
            .unwrap();
        // Lane 1's writer charges its first batch on its own thread: wait
        // until it has, so the control frames below meet the debt.
        let deadline = Instant::now() + HANG;
        let owed_before = loop {
            let owed = bucket.charge_at(0, Instant::now());
            if owed > Duration::from_secs(86_400) {
                break owed;
            }
            assert!(Instant::now() < deadline, "lane 1 never charged its batch");
            thread::sleep(Duration::from_millis(1));
        };
        for i in 0u8..3 {
            q.send_control(0, OutFrame::new(FrameKind::Progress, 0, vec![i]), None)
                .unwrap();
        }
        q.send_control(0, OutFrame::new(FrameKind::Go, 0, Vec::new()), None)
            .unwrap();
        let inbox = LaneInbox::spawn(rx.readers, 8);
        let mut got = Vec::new();
        while got.last() != Some(&FrameKind::Go) {
            let ev = inbox.recv_timeout(HANG).expect("lane 0's control frames");
            if ev.lane == 0 {
                got.push(ev.frame.unwrap().kind());
            }
        }
        assert_eq!(got.len(), 4);
        // They were charged: the bucket owes for them too (each costs tens
        // of seconds at 1 byte/s, far more than the time this took).
        let owed_after = bucket.charge_at(0, Instant::now());
        assert!(
            owed_after > owed_before,
            "control frames were not charged: owed {owed_before:?} before, {owed_after:?} after"
        );
        // Lane 1's writer sleeps off its debt: left behind, not waited for.
        q.close(Duration::ZERO);
    }

    /// A cut lane is reported by its index, on both sides.
    #[test]
    fn a_cut_lane_is_reported_by_its_index() {
        let Some((tx, rx)) = session(Sink::Plain, 4) else {
            return;
        };
        let cut = tx.closers[2].try_clone().unwrap();
        let q = queues(tx, 2, None);
        let inbox = LaneInbox::spawn(rx.readers, 8);
        cut.close();
        // The receiver sees lane 2 end.
        let ev = inbox.recv_timeout(HANG).expect("lane 2's end");
        assert_eq!(ev.lane, 2);
        assert!(ev.frame.is_err());
        // The sender's writes on lane 2 fail, naming it.
        let cancel = AtomicBool::new(false);
        let mut failed = None;
        for version in 0..64 {
            let frame = batch(STRIPE_PAGES * 2, version, 16, q.gathers());
            if let Err(e) = q.send_sealed(2, frame, &cancel) {
                failed = Some(e);
                break;
            }
        }
        match failed.expect("writes on a cut lane fail") {
            TransportError::Lane { lane: 2, .. } | TransportError::LaneClosed { lane: 2 } => {}
            other => panic!("expected lane 2's failure, got {other:?}"),
        }
        // The other lanes still work.
        q.send_control(0, OutFrame::new(FrameKind::Go, 0, Vec::new()), None)
            .unwrap();
        let ev = inbox.recv_timeout(HANG).unwrap();
        assert_eq!((ev.lane, ev.frame.unwrap().kind()), (0, FrameKind::Go));
    }

    /// An abort drops the batches still queued and goes out before them:
    /// with 64 MiB queued behind a peer that is not reading yet, the
    /// receiver sees some batches (those already in the sockets), then the
    /// Abort, then nothing more.
    fn abort_goes_out_first(sink: Sink) {
        let Some((tx, rx)) = session(sink, 1) else {
            return;
        };
        let q = queues(tx, 64, None);
        let cancel = AtomicBool::new(false);
        for version in 0..64 {
            q.send_sealed(0, batch(0, version, 256, false), &cancel)
                .unwrap();
        }
        assert!(q.abort(OutFrame::new(FrameKind::Abort, 0, b"why".to_vec()), HANG));
        let inbox = LaneInbox::spawn(rx.readers, 8);
        q.close(HANG);
        let mut batches = 0;
        loop {
            let ev = inbox.recv_timeout(HANG).unwrap();
            let frame = ev.frame.expect("the abort before the lane's end");
            match frame.kind() {
                FrameKind::PageBatch => {
                    assert_eq!(check_batch(frame.verify().unwrap()), (0, batches));
                    batches += 1;
                }
                FrameKind::Abort => {
                    assert_eq!(frame.verify().unwrap(), b"why");
                    break;
                }
                other => panic!("unexpected {other}"),
            }
        }
        assert!(batches < 64, "every queued batch went out before the abort");
        assert!(matches!(
            inbox.recv_timeout(HANG).unwrap().frame,
            Err(TransportError::PeerClosed)
        ));
    }

    #[test]
    fn plain_lanes_abort_first() {
        abort_goes_out_first(Sink::Plain);
    }

    #[test]
    fn tls_lanes_abort_first() {
        abort_goes_out_first(Sink::Tls);
    }

    #[test]
    fn zero_copy_lanes_abort_first() {
        abort_goes_out_first(Sink::ZeroCopy);
    }

    /// Idle lanes: a receiver waiting for a frame gets a timeout, not an
    /// end; a control frame on a lane whose peer stopped reading fails
    /// after the stall time, naming the lane.
    #[test]
    fn idleness_is_a_timeout_and_a_stalled_lane_fails_by_index() {
        let Some((tx, rx)) = session(Sink::Plain, 2) else {
            return;
        };
        let inbox = LaneInbox::spawn(rx.readers, 8);
        assert!(inbox
            .recv_timeout(Duration::from_millis(20))
            .unwrap_err()
            .is_timeout());
        let mut opts = QueueOptions::new(2);
        opts.stall = Duration::from_millis(200);
        let q = LaneQueues::spawn(tx.sinks, tx.closers, opts);
        // The inbox reads nothing more: lane 1's socket buffers fill, then
        // its queue, then a control frame waits out the stall.
        drop(inbox);
        let mut failed = None;
        for _ in 0..4096 {
            let big = OutFrame::new(FrameKind::Progress, 0, vec![0u8; 1 << 20]);
            if let Err(e) = q.send_control(1, big, None) {
                failed = Some(e);
                break;
            }
        }
        match failed.expect("a lane whose peer reads nothing stalls") {
            TransportError::Lane { lane: 1, source } => {
                assert!(
                    matches!(&*source, TransportError::Write(e) if e.kind() == std::io::ErrorKind::TimedOut),
                    "{source:?}"
                );
            }
            other => panic!("expected lane 1's stall, got {other:?}"),
        }
        q.close(Duration::ZERO);
    }
}
