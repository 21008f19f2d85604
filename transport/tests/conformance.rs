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
