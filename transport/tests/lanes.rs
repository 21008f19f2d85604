//! Lanes over real loopback TCP: grouping, striping, ordering, refusal.

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use ferry_transport::lanes::{LaneHello, MAX_PENDING_SESSIONS, STRIPE_PAGES};
use ferry_transport::lanes::{LaneInbox, LaneQueues, OutFrame, QueueOptions};
use ferry_transport::{
    frame, lane_for_page, FrameKind, FrameReader, LaneListener, LaneOptions, Lanes, Security,
    TransportError,
};

fn listener() -> LaneListener {
    LaneListener::bind("127.0.0.1:0", LaneOptions::new(1, Security::Insecure)).unwrap()
}

/// A connected session of `lanes` plaintext lanes: (client, server).
fn session(lanes: u16) -> (Lanes, Lanes) {
    let mut l = listener();
    let addr = l.local_addr().unwrap();
    let client = thread::spawn(move || {
        Lanes::connect(addr, &LaneOptions::new(lanes, Security::Insecure)).unwrap()
    });
    let server = l.accept_session().unwrap();
    (client.join().unwrap(), server)
}

#[test]
fn lanes_of_a_session_arrive_grouped_and_indexed() {
    let (client, server) = session(4);
    assert_eq!(server.session(), client.session());
    assert_eq!(server.len(), 4);
    // A frame sent on client lane i arrives on server lane i.
    let mut client = client.into_vec();
    let mut server = server.into_vec();
    for (i, lane) in client.iter_mut().enumerate() {
        assert_eq!(usize::from(lane.index()), i);
        lane.writer
            .write_frame(FrameKind::Progress, 0, &[u8::try_from(i).unwrap()])
            .unwrap();
    }
    for (i, lane) in server.iter_mut().enumerate() {
        assert_eq!(usize::from(lane.index()), i);
        assert_eq!(
            lane.reader.read_frame().unwrap().payload,
            vec![u8::try_from(i).unwrap()]
        );
    }
    // Lane 0 is bidirectional (control).
    server[0]
        .writer
        .write_frame(FrameKind::Ready, 0, b"")
        .unwrap();
    assert_eq!(
        client[0].reader.read_frame().unwrap().kind,
        FrameKind::Ready
    );
}

#[test]
fn concurrent_sessions_are_kept_apart() {
    let mut l = listener();
    let addr = l.local_addr().unwrap();
    let clients: Vec<_> = (0..3)
        .map(|_| {
            thread::spawn(move || {
                Lanes::connect(addr, &LaneOptions::new(3, Security::Insecure)).unwrap()
            })
        })
        .collect();
    let servers: Vec<Lanes> = (0..3).map(|_| l.accept_session().unwrap()).collect();
    let clients: Vec<Lanes> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let mut client_ids: Vec<_> = clients.iter().map(Lanes::session).collect();
    let mut server_ids: Vec<_> = servers.iter().map(Lanes::session).collect();
    client_ids.sort();
    server_ids.sort();
    assert_eq!(client_ids, server_ids);
    client_ids.dedup();
    assert_eq!(client_ids.len(), 3);
}

#[test]
fn a_connection_without_a_lane_hello_is_refused_with_a_reason() {
    let mut l = listener();
    let addr = l.local_addr().unwrap();
    let client = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut bytes = Vec::new();
        frame::encode_frame(FrameKind::Hello, 0, b"not a lane hello", &mut bytes).unwrap();
        s.write_all(&bytes).unwrap();
        FrameReader::new(s).read_frame().unwrap()
    });
    let err = l.accept_session().unwrap_err();
    assert!(matches!(err, TransportError::LaneHandshake(_)), "{err:?}");
    let answer = client.join().unwrap();
    assert_eq!(answer.kind, FrameKind::Abort);
    assert!(String::from_utf8_lossy(&answer.payload).contains("LaneHello"));
}

#[test]
fn garbage_instead_of_a_frame_is_refused() {
    let mut l = listener();
    let addr = l.local_addr().unwrap();
    let client = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        s
    });
    let err = l.accept_session().unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Corrupt(frame::FrameError::BadMagic { .. })
        ),
        "{err:?}"
    );
    drop(client.join().unwrap());
}

#[test]
fn zero_lanes_are_refused_before_connecting() {
    let err = Lanes::connect("127.0.0.1:9", &LaneOptions::new(0, Security::Insecure)).unwrap_err();
    assert!(matches!(err, TransportError::LaneHandshake(_)));
}

/// Every page is sent in several versions through the queues; because a page
/// always travels on one lane, the receiver sees each page's versions in order.
#[test]
fn queued_lanes_keep_per_page_order() {
    per_page_order(false);
}

#[test]
fn zero_copy_queued_lanes_keep_per_page_order() {
    if !ferry_transport::zerocopy::ZcSender::is_supported() {
        assert!(
            std::env::var_os("FERRY_NO_SKIP").is_none(),
            "FERRY_NO_SKIP is set, so this test may not skip"
        );
        eprintln!("SKIP (zero-copy lanes): io_uring SENDMSG_ZC is not supported here");
        return;
    }
    per_page_order(true);
}

fn per_page_order(zero_copy: bool) {
    let mut l = listener();
    let addr = l.local_addr().unwrap();
    let mut opts = LaneOptions::new(4, Security::Insecure);
    opts.max_bandwidth = Some(1 << 30);
    let sender = thread::spawn(move || {
        let lanes = Lanes::connect(addr, &opts).unwrap();
        let ends = if zero_copy {
            lanes.into_ends_zero_copy(2).unwrap()
        } else {
            lanes.into_ends().unwrap()
        };
        let mut qopts = QueueOptions::new(2);
        qopts.bucket = ends.bucket;
        let q = LaneQueues::spawn(ends.sinks, ends.closers, qopts);
        for version in 0u32..5 {
            for page in (0..STRIPE_PAGES * 8).step_by((STRIPE_PAGES / 16) as usize) {
                let mut payload = page.to_le_bytes().to_vec();
                payload.extend_from_slice(&version.to_le_bytes());
                payload.extend_from_slice(&[0xEE; 4096]);
                q.send_pages(page, OutFrame::new(FrameKind::PageBatch, 0, payload))
                    .unwrap();
            }
        }
        q.broadcast(&OutFrame::new(FrameKind::RoundEnd, 0, Vec::new()), None)
            .unwrap();
        q.finish().unwrap();
    });
    let lanes = l.accept_session().unwrap();
    let inbox = LaneInbox::spawn(lanes.into_ends().unwrap().readers, 8);
    let mut last: HashMap<u64, u32> = HashMap::new();
    let (mut ends, mut closed) = ([false; 4], [false; 4]);
    while let Some(ev) = inbox.recv() {
        let lane = usize::from(ev.lane);
        let f = match ev.frame {
            Err(TransportError::PeerClosed) => {
                assert!(ends[lane], "lane {lane} closed before its RoundEnd");
                closed[lane] = true;
                continue;
            }
            other => other.unwrap().into_frame().unwrap(),
        };
        assert!(!ends[lane], "frame after RoundEnd on lane {lane}");
        match f.kind {
            FrameKind::RoundEnd => ends[lane] = true,
            FrameKind::PageBatch => {
                let page = u64::from_le_bytes(f.payload[..8].try_into().unwrap());
                let version = u32::from_le_bytes(f.payload[8..12].try_into().unwrap());
                assert_eq!(
                    lane,
                    lane_for_page(page, 4),
                    "page {page} on the wrong lane"
                );
                let prev = last.insert(page, version);
                assert_eq!(
                    prev.map_or(0, |p| p + 1),
                    version,
                    "page {page} out of order"
                );
            }
            other => panic!("unexpected {other}"),
        }
    }
    sender.join().unwrap();
    assert_eq!(last.len(), 128);
    assert!(last.values().all(|&v| v == 4));
    // Every lane ended cleanly after its RoundEnd.
    assert_eq!(closed, [true; 4]);
    assert!(inbox.recv().is_none());
}

#[test]
fn pages_stripe_by_stripe_of_pages() {
    assert_eq!(lane_for_page(0, 4), 0);
    assert_eq!(lane_for_page(STRIPE_PAGES - 1, 4), 0);
    assert_eq!(lane_for_page(STRIPE_PAGES, 4), 1);
    assert_eq!(lane_for_page(STRIPE_PAGES * 4, 4), 0);
    assert_eq!(lane_for_page(12345, 1), 0);
}

/// Opens lane 0 of a 2-lane session and never the other: the listener
/// welcomes it and holds the session half-open.
fn half_open_lane(addr: std::net::SocketAddr) -> FrameReader<TcpStream> {
    let mut s = TcpStream::connect(addr).unwrap();
    // Generous: a listener that never drops the session fails the test
    // here instead of hanging it.
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let hello = LaneHello {
        session: ferry_transport::lanes::handshake::new_session_id(),
        lane: 0,
        lanes: 2,
    };
    let mut bytes = Vec::new();
    frame::encode_frame(FrameKind::LaneHello, 0, &hello.encode(), &mut bytes).unwrap();
    s.write_all(&bytes).unwrap();
    let mut r = FrameReader::new(s);
    assert_eq!(r.read_frame().unwrap().kind, FrameKind::LaneWelcome);
    r
}

#[test]
fn half_open_sessions_are_dropped_and_free_their_slots() {
    let mut opts = LaneOptions::new(1, Security::Insecure);
    opts.handshake_timeout = Duration::from_millis(300);
    let mut l = LaneListener::bind("127.0.0.1:0", opts).unwrap();
    let addr = l.local_addr().unwrap();
    let listening = thread::spawn(move || {
        let session = l.accept_session();
        (session, l.half_open_sessions())
    });
    // Every slot taken by a half-open session; each peer then waits for
    // what the listener says, and only after that does a real session
    // connect: the listener must drop the stale ones while it waits for a
    // connection, and their slots must be free again.
    let peers = thread::spawn(move || {
        let held: Vec<_> = (0..MAX_PENDING_SESSIONS)
            .map(|_| half_open_lane(addr))
            .collect();
        let answers: Vec<_> = held
            .into_iter()
            .map(|mut r| (r.read_frame().unwrap(), r.read_frame().unwrap_err()))
            .collect();
        let lanes = Lanes::connect(addr, &LaneOptions::new(2, Security::Insecure));
        (answers, lanes)
    });
    let (answers, client) = peers.join().unwrap();
    let (server, half_open) = listening.join().unwrap();
    for (f, then) in &answers {
        assert_eq!(f.kind, FrameKind::Abort);
        let why = String::from_utf8_lossy(&f.payload);
        assert!(why.contains("1 of its 2 lanes arrived"), "{why}");
        assert!(matches!(then, TransportError::PeerClosed), "{then:?}");
    }
    assert_eq!(server.unwrap().session(), client.unwrap().session());
    assert_eq!(half_open, 0);
}

#[test]
fn a_connection_that_says_nothing_is_a_named_handshake_timeout() {
    let mut opts = LaneOptions::new(1, Security::Insecure);
    opts.handshake_timeout = Duration::from_millis(200);
    let mut l = LaneListener::bind("127.0.0.1:0", opts).unwrap();
    let silent = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let err = l.accept_session().unwrap_err();
    assert!(
        matches!(err, TransportError::HandshakeTimeout { .. }),
        "{err:?}"
    );
    let text = ferry_transport::error_chain(&err);
    assert!(text.contains("no lane handshake within 200ms"), "{text}");
    assert!(!text.contains("os error"), "{text}");
    drop(silent);
}

#[test]
fn a_request_gets_the_peers_answer_and_leaves_no_read_timeout() {
    let (mut client, mut server) = session(1);
    let answerer = thread::spawn(move || {
        let lane = server.lane_mut(0).unwrap();
        let question = lane.reader.read_frame().unwrap();
        let mut answer = question.payload.clone();
        answer.reverse();
        lane.writer
            .write_frame(FrameKind::Running, 0, &answer)
            .unwrap();
        lane.writer.flush().unwrap();
        (question.kind, server)
    });
    let lane = client.lane_mut(0).unwrap();
    let got = lane
        .request(FrameKind::Resolve, b"abc", Duration::from_secs(30))
        .unwrap();
    let (asked, _server) = answerer.join().unwrap();
    assert_eq!(asked, FrameKind::Resolve);
    assert_eq!(
        (got.kind, &got.payload[..]),
        (FrameKind::Running, &b"cba"[..])
    );
    let socket = lane.socket_clone().unwrap();
    assert_eq!(socket.read_timeout().unwrap(), None);
}

#[test]
fn a_request_nobody_answers_fails_when_its_time_is_up() {
    let (mut client, _server) = session(1);
    let lane = client.lane_mut(0).unwrap();
    let err = lane
        .request(FrameKind::Resolve, b"abc", Duration::ZERO)
        .unwrap_err();
    assert!(
        matches!(&err, TransportError::Read(e)
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "{err:?}"
    );
    let socket = lane.socket_clone().unwrap();
    assert_eq!(socket.read_timeout().unwrap(), None);
}
