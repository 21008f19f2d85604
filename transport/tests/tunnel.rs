//! The tunnel end to end over loopback, with plain UNIX-socket programs at
//! both ends standing in for QEMU: order of streams, integrity, half-close
//! both ways, no head-of-line blocking between streams, refusals.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use ferry_transport::tls::generate_cert_set;
use ferry_transport::tunnel::{Tunnel, TunnelError, TunnelOptions};
use ferry_transport::{LaneOptions, Security, TlsSettings};

/// Deterministic incompressible-ish bytes for stream `k`.
fn pattern(k: u8, len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(k);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Runs `f` on a thread and fails the test if it has not finished after
/// `secs` (a hang guard against deadlocks, not a performance bound).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("tunnel test hung (deadlock?)")
}

struct Ends {
    dir: tempfile::TempDir,
    src_sock: PathBuf,
    dst_sock: PathBuf,
}

fn ends() -> Ends {
    let dir = tempfile::tempdir().unwrap();
    Ends {
        src_sock: dir.path().join("src.sock"),
        dst_sock: dir.path().join("dst.sock"),
        dir,
    }
}

/// The destination "QEMU": accepts `n` connections, reads streams in the
/// order given by `read_order` (indices into accept order) to EOF, answers
/// each with its length and a tag, then closes. Returns the first 8 bytes
/// of each stream in accept order.
fn fake_destination(
    path: &Path,
    n: usize,
    read_order: Vec<usize>,
) -> thread::JoinHandle<Vec<Vec<u8>>> {
    let listener = UnixListener::bind(path).unwrap();
    thread::spawn(move || {
        let mut conns: Vec<UnixStream> = (0..n).map(|_| listener.accept().unwrap().0).collect();
        let mut heads = vec![Vec::new(); n];
        for i in read_order {
            let mut data = Vec::new();
            conns[i].read_to_end(&mut data).unwrap();
            let mut reply = (data.len() as u64).to_le_bytes().to_vec();
            reply.extend_from_slice(&data[..8.min(data.len())]);
            conns[i].write_all(&reply).unwrap();
            conns[i].shutdown(std::net::Shutdown::Write).unwrap();
            heads[i] = data[..8.min(data.len())].to_vec();
        }
        heads
    })
}

fn run_streams(opts: TunnelOptions, sizes: Vec<usize>, read_order: Vec<usize>) {
    let e = ends();
    let n = sizes.len();
    let dst_app = fake_destination(&e.dst_sock, n, read_order);
    let dst = Tunnel::destination("127.0.0.1:0", &e.dst_sock, &opts).unwrap();
    let addr = dst.local_addr().unwrap().to_string();
    let src = Tunnel::source(&e.src_sock, &addr, &opts).unwrap();
    let src_sock = e.src_sock.clone();
    let replies = within(120, move || {
        // Connect all streams first, in order (like QEMU: main then multifd).
        let conns: Vec<UnixStream> = (0..n)
            .map(|_| UnixStream::connect(&src_sock).unwrap())
            .collect();
        let writers: Vec<_> = conns
            .iter()
            .zip(&sizes)
            .enumerate()
            .map(|(k, (c, &len))| {
                let mut c = c.try_clone().unwrap();
                let k = u8::try_from(k).unwrap();
                thread::spawn(move || {
                    c.write_all(&pattern(k, len)).unwrap();
                    c.shutdown(std::net::Shutdown::Write).unwrap();
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        conns
            .into_iter()
            .map(|mut c| {
                let mut r = Vec::new();
                c.read_to_end(&mut r).unwrap();
                r
            })
            .collect::<Vec<_>>()
    });
    let heads = dst_app.join().unwrap();
    for (k, &len) in sizes_of(&replies).iter().enumerate() {
        let expect = pattern(u8::try_from(k).unwrap(), 8);
        // Opened on the destination in the same order as accepted on the source.
        assert_eq!(
            heads[k],
            expect[..heads[k].len()],
            "stream {k} opened out of order"
        );
        // Every byte arrived (the destination echoes the length and head back:
        // that also proves the return path and both half-closes).
        assert_eq!(
            replies[k][8..],
            expect[..replies[k].len() - 8],
            "reply head of stream {k}"
        );
        assert_eq!(len, replies_len(&replies[k]), "stream {k} length");
    }
    let stats = src.stats();
    assert_eq!(
        stats.streams.load(std::sync::atomic::Ordering::Relaxed),
        n as u64
    );
    src.stop().unwrap();
    dst.stop().unwrap();
    drop(e.dir);
}

fn replies_len(r: &[u8]) -> usize {
    usize::try_from(u64::from_le_bytes(r[..8].try_into().unwrap())).unwrap()
}

fn sizes_of(replies: &[Vec<u8>]) -> Vec<usize> {
    replies.iter().map(|r| replies_len(r)).collect()
}

fn plain(lanes: u16) -> TunnelOptions {
    TunnelOptions::new(LaneOptions::new(lanes, Security::Insecure))
}

#[test]
fn streams_arrive_whole_in_accept_order_over_one_lane() {
    run_streams(plain(1), vec![3_000_000, 10, 0, 700_000], vec![0, 1, 2, 3]);
}

#[test]
fn streams_striped_over_four_lanes_are_reassembled() {
    run_streams(plain(4), vec![8_000_000, 5_000_000, 1], vec![0, 1, 2]);
}

#[test]
fn lz4_streams_are_reassembled() {
    let mut o = plain(3);
    o.lz4 = true;
    run_streams(o, vec![6_000_000, 123_457], vec![0, 1]);
}

/// The destination reads the last stream first: with a small window, a
/// tunnel that blocked all streams behind the unread first one would hang.
#[test]
fn a_stream_that_is_not_read_does_not_block_the_others() {
    let mut o = plain(2);
    o.window = 1 << 20;
    run_streams(o, vec![8_000_000, 8_000_000, 8_000_000], vec![2, 1, 0]);
}

#[test]
fn tls_tunnel_carries_streams() {
    let set = generate_cert_set(&["a"]).unwrap();
    let (_, cert, key) = &set.nodes[0];
    let tls = Security::Tls(Arc::new(
        TlsSettings::from_pem(cert, key, &set.ca_pem, "ferry").unwrap(),
    ));
    let mut o = TunnelOptions::new(LaneOptions::new(2, tls));
    o.lanes.max_bandwidth = Some(2 << 30);
    run_streams(o, vec![4_000_000, 100], vec![0, 1]);
}

#[test]
fn wrong_certificate_is_refused_before_the_source_listens() {
    let good = generate_cert_set(&["dst"]).unwrap();
    let rogue = generate_cert_set(&["src"]).unwrap();
    let sec = |set: &ferry_transport::tls::CertSet, ca: &str| {
        let (_, cert, key) = &set.nodes[0];
        Security::Tls(Arc::new(
            TlsSettings::from_pem(cert, key, ca, "ferry").unwrap(),
        ))
    };
    let e = ends();
    let dst = Tunnel::destination(
        "127.0.0.1:0",
        &e.dst_sock,
        &TunnelOptions::new(LaneOptions::new(1, sec(&good, &good.ca_pem))),
    )
    .unwrap();
    let addr = dst.local_addr().unwrap().to_string();
    let err = Tunnel::source(
        &e.src_sock,
        &addr,
        &TunnelOptions::new(LaneOptions::new(2, sec(&rogue, &good.ca_pem))),
    )
    .unwrap_err();
    assert!(matches!(err, TunnelError::Connect { .. }), "{err:?}");
    assert!(
        !e.src_sock.exists(),
        "source listens although its lanes were refused"
    );
    // The destination recorded why, and keeps serving.
    let seen = within(30, move || loop {
        let seen = dst.stats().last_error.lock().unwrap().clone();
        if let Some(e) = seen {
            return (e, dst);
        }
        thread::sleep(Duration::from_millis(20));
    });
    let (seen, dst) = seen;
    assert!(seen.contains("certificate"), "destination error: {seen}");
    dst.stop().unwrap();
}

#[test]
fn nothing_listening_on_the_destination_resets_the_stream() {
    let e = ends();
    let dst = Tunnel::destination("127.0.0.1:0", &e.dst_sock, &plain(1)).unwrap();
    let addr = dst.local_addr().unwrap().to_string();
    let src = Tunnel::source(&e.src_sock, &addr, &plain(1)).unwrap();
    let sock = e.src_sock.clone();
    let got = within(60, move || {
        let mut c = UnixStream::connect(&sock).unwrap();
        let _ = c.write_all(b"hello");
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).map(|_| buf.len())
    });
    // The source closed the connection without data (EOF or reset).
    assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");
    let err = dst
        .stats()
        .last_error
        .lock()
        .unwrap()
        .clone()
        .unwrap_or_default();
    assert!(err.contains("could not connect"), "{err}");
    src.stop().unwrap();
    dst.stop().unwrap();
}

/// A peer that speaks the lane handshake but then sends tunnel frames that
/// break the rules ends its session with an error; nothing panics and the
/// destination keeps listening.
#[test]
fn hostile_tunnel_frames_end_the_session_with_an_error() {
    use ferry_transport::tunnel::wire::TunnelMsg;
    use ferry_transport::tunnel::SessionError;
    use ferry_transport::{FrameKind, Lanes};
    let e = ends();
    let _app = UnixListener::bind(&e.dst_sock).unwrap();
    let dst = Tunnel::destination("127.0.0.1:0", &e.dst_sock, &plain(1)).unwrap();
    let addr = dst.local_addr().unwrap();
    let cases: Vec<(FrameKind, Vec<u8>)> = vec![
        // A stream id far beyond any opened.
        (FrameKind::StreamOpen, 1000u32.to_le_bytes().to_vec()),
        // A payload too short for its fixed fields.
        (FrameKind::StreamData, vec![0, 0]),
        // An engine frame inside a tunnel session.
        (FrameKind::Go, Vec::new()),
    ];
    for (kind, payload) in cases {
        let mut lanes = Lanes::connect(addr, &LaneOptions::new(1, Security::Insecure))
            .unwrap()
            .into_vec();
        lanes[0].writer.write_frame(kind, 0, &payload).unwrap();
        // The destination closes the session: the lane ends.
        let end = within(30, move || lanes[0].reader.read_frame().map(|f| f.kind));
        assert!(end.is_err(), "{kind}: session not ended ({end:?})");
        let seen = dst
            .stats()
            .last_error
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_default();
        assert!(
            seen.contains("tunnel") || seen.contains("stream"),
            "{kind}: {seen}"
        );
    }
    // Data for an opened stream out of its window is refused too.
    let mut lanes = Lanes::connect(addr, &LaneOptions::new(1, Security::Insecure))
        .unwrap()
        .into_vec();
    let data = TunnelMsg::Data {
        id: 0,
        seq: 99_999,
        bytes: bytes::Bytes::from_static(b"x"),
    }
    .encode(false);
    let payload: Vec<u8> = data.parts.iter().flat_map(|p| p.iter().copied()).collect();
    lanes[0]
        .writer
        .write_frame(data.kind, data.flags, &payload)
        .unwrap();
    let end = within(30, move || lanes[0].reader.read_frame().map(|f| f.kind));
    assert!(end.is_err());
    let err = dst.stop().unwrap_err();
    assert!(
        matches!(
            err,
            TunnelError::Session(
                SessionError::TooFarAhead { .. }
                    | SessionError::Wire(_)
                    | SessionError::Reorder { .. }
            )
        ),
        "{err:?}"
    );
}
