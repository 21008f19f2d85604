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
