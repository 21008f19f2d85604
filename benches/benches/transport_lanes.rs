//! Transport throughput on loopback: a plain TCP stream (baseline) against
//! ferry lanes 1/2/4 with plain `write`, io_uring zero-copy send, and TLS;
//! plain `read` against io_uring receive. All in one run, same machine.
//!
//! `cargo bench -p ferry-benches --bench transport_lanes [-- GIB]`
//! (GIB per case, default 2). CPU is process CPU (user + system, sender and
//! receiver together) per GiB moved.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use bytes::Bytes;
use ferry_transport::lanes::{LaneQueues, OutFrame, QueueOptions};
use ferry_transport::tls::generate_cert_set;
use ferry_transport::zerocopy::{UringReader, ZcSender};
use ferry_transport::{
    FrameKind, FrameReader, LaneListener, LaneOptions, Lanes, Security, TlsSettings,
};

const FRAME_PAYLOAD: usize = 1 << 20; // 256 pages of 4 KiB
const MEMORY: usize = 256 << 20;

fn cpu_seconds() -> f64 {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF is valid and `ru` is a writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Guest-memory stand-in: incompressible, touched before measuring.
fn memory() -> Bytes {
    let mut x = 0x243F_6A88_85A3_08D3u64;
    let mut v = vec![0u8; MEMORY];
    for chunk in v.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    Bytes::from(v)
}

struct Outcome {
    name: String,
    gbps: f64,
    cpu_per_gib: f64,
}

fn measure(name: &str, bytes: u64, run: impl FnOnce()) -> Outcome {
    let (c0, t0) = (cpu_seconds(), Instant::now());
    run();
    let (cpu, secs) = (cpu_seconds() - c0, t0.elapsed().as_secs_f64());
    let gib = bytes as f64 / f64::from(1u32 << 30);
    let o = Outcome {
        name: name.into(),
        gbps: bytes as f64 / secs / 1e9,
        cpu_per_gib: cpu / gib,
    };
    eprintln!(
        "{:<40} {:>6.2} GB/s {:>6.2} CPU s/GiB",
        o.name, o.gbps, o.cpu_per_gib
    );
    o
}

/// Baseline: one TCP connection, `write_all` of 1 MiB slices, `read` into 1 MiB.
fn plain_tcp(mem: &Bytes, total: u64) -> Outcome {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mem = mem.clone();
    measure("plain TCP stream (1 connection)", total, move || {
        let rx = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = vec![0u8; FRAME_PAYLOAD];
            let mut got = 0u64;
            while got < total {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0);
                got += n as u64;
            }
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let mut sent = 0u64;
        let mut off = 0;
        while sent < total {
            s.write_all(&mem[off..off + FRAME_PAYLOAD]).unwrap();
            sent += FRAME_PAYLOAD as u64;
            off = (off + FRAME_PAYLOAD) % MEMORY;
        }
        rx.join().unwrap();
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Send_ {
    Write,
    ZeroCopy,
}

#[derive(Clone, Copy, PartialEq)]
enum Recv {
    Read,
    Uring,
}

fn lanes_case(
    mem: &Bytes,
    total: u64,
    lanes: u16,
    send: Send_,
    recv: Recv,
    tls: Option<(Security, Security)>,
) -> Outcome {
    let name = format!(
        "ferry lanes={lanes} send={} recv={}{}",
        if send == Send_::ZeroCopy {
            "zero-copy"
        } else {
            "write"
        },
        if recv == Recv::Uring {
            "io_uring"
        } else {
            "read"
        },
        if tls.is_some() { " TLS" } else { "" }
    );
    let (client_sec, server_sec) = tls.unwrap_or((Security::Insecure, Security::Insecure));
    let mut listener = LaneListener::bind("127.0.0.1:0", LaneOptions::new(1, server_sec)).unwrap();
    let addr = listener.local_addr().unwrap();
    let connect =
        thread::spawn(move || Lanes::connect(addr, &LaneOptions::new(lanes, client_sec)).unwrap());
    let server = listener.accept_session().unwrap();
    let client = connect.join().unwrap();
    let mem = mem.clone();
    let frames = total / FRAME_PAYLOAD as u64;
    measure(&name, frames * FRAME_PAYLOAD as u64, move || {
        let receivers: Vec<_> = server
            .into_vec()
            .into_iter()
            .map(|lane| {
                thread::spawn(move || {
                    let mut reader: FrameReader<Box<dyn Read + Send>> = match recv {
                        Recv::Read => lane.into_parts().1,
                        Recv::Uring => FrameReader::new(Box::new(
                            UringReader::new(lane.socket_clone().unwrap()).unwrap(),
                        )),
                    };
                    let mut buf = Vec::with_capacity(FRAME_PAYLOAD + 64);
                    loop {
                        let h = reader.read_frame_into(&mut buf).unwrap();
                        if h.kind == FrameKind::RoundEnd {
                            return;
                        }
                    }
                })
            })
            .collect();
        let ends = match send {
            Send_::Write => client.into_ends().unwrap(),
            Send_::ZeroCopy => client.into_ends_zero_copy(8).unwrap(),
        };
        let q = LaneQueues::spawn(ends.sinks, ends.closers, QueueOptions::new(8));
        let pages_per_frame = (FRAME_PAYLOAD / 4096) as u64;
        for i in 0..frames {
            let off = (i as usize * FRAME_PAYLOAD) % MEMORY;
            let first_page = i * pages_per_frame;
            let frame = OutFrame {
                kind: FrameKind::PageBatch,
                flags: 0,
                parts: vec![
                    Bytes::copy_from_slice(&first_page.to_le_bytes()),
                    mem.slice(off..off + FRAME_PAYLOAD),
                ],
            };
            // Lanes by page index: whole 64-page stripes, round-robin.
            q.send(usize::try_from(i % u64::from(lanes)).unwrap(), frame)
                .unwrap();
        }
        q.broadcast(&OutFrame::new(FrameKind::RoundEnd, 0, Vec::new()), None)
            .unwrap();
        q.finish().unwrap();
        for r in receivers {
            r.join().unwrap();
        }
    })
}

fn main() {
    let gib: f64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(2.0);
    let total = (gib * f64::from(1u32 << 30)) as u64;
    let mem = memory();
    let zc = ZcSender::is_supported();
    let certs = generate_cert_set(&["a", "b"]).unwrap();
    let tls = || {
        let s = |i: usize| {
            let (_, c, k) = &certs.nodes[i];
            Security::Tls(Arc::new(
                TlsSettings::from_pem(c, k, &certs.ca_pem, "ferry").unwrap(),
            ))
        };
        Some((s(0), s(1)))
    };
    eprintln!(
        "transport_lanes: {gib} GiB per case, {} MiB frames, loopback",
        FRAME_PAYLOAD >> 20
    );
    // Warm up the path (first touches, TCP autotuning).
    let _ = plain_tcp(&mem, total / 4);
    let mut out = vec![plain_tcp(&mem, total)];
    for lanes in [1u16, 2, 4] {
        out.push(lanes_case(
            &mem,
            total,
            lanes,
            Send_::Write,
            Recv::Read,
            None,
        ));
        if zc {
            out.push(lanes_case(
                &mem,
                total,
                lanes,
                Send_::ZeroCopy,
                Recv::Read,
                None,
            ));
        }
        out.push(lanes_case(
            &mem,
            total,
            lanes,
            Send_::Write,
            Recv::Uring,
            None,
        ));
        out.push(lanes_case(
            &mem,
            total,
            lanes,
            Send_::Write,
            Recv::Read,
            tls(),
        ));
    }
    let base = out[0].gbps;
    println!("| case | GB/s | vs plain TCP | CPU s/GiB (both ends) |");
    println!("|---|---:|---:|---:|");
    for o in &out {
        println!(
            "| {} | {:.2} | {:.0}% | {:.2} |",
            o.name,
            o.gbps,
            100.0 * o.gbps / base,
            o.cpu_per_gib
        );
    }
}
