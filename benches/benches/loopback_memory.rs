//! What moving guest memory over this loopback costs before any engine
//! runs: models of a migration's data path, each one connection, 256 KiB
//! writes, from a cold source region the size of a guest into a cold
//! destination region, with a thread spinning in the guest vCPU's place.
//!
//! - `tcp`: a plain stream between hot 1 MiB buffers (the issue's baseline);
//! - `copy`: each page copied out of the source region into a batch buffer
//!   and hashed there (xxh3); on the receiver, each page hashed and copied
//!   into the destination region (ferry's data path);
//! - `direct`: sent straight from the source region after hashing it in
//!   place, received straight into the destination region, then hashed;
//! - `direct-srchash`: as `direct`, no hash on the receiver;
//! - `direct-nohash`: as `direct`, no hash at all (the floor of any
//!   migration: the memory still has to be read and written).
//!
//! ```text
//! cargo bench -p ferry-benches --bench loopback_memory            # 2 GiB, 2 runs
//! FERRY_BENCH_MEM_MIB=1024 FERRY_BENCH_RUNS=3 cargo bench -p ferry-benches --bench loopback_memory
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ferry_benches::cold_region::ColdRegion;
use xxhash_rust::xxh3::xxh3_64;

const PAGE: usize = 4096;
const SLICE: usize = 256 << 10;
const MODES: [&str; 5] = ["tcp", "copy", "direct", "direct-srchash", "direct-nohash"];

fn hash_pages(bytes: &[u8], sum: &mut u64) {
    for page in bytes.chunks(PAGE) {
        *sum ^= xxh3_64(page);
    }
}

/// One model run; bytes/s.
fn run(mode: &str, src: &ColdRegion, dst: &mut ColdRegion) -> f64 {
    let n = src.len();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        let dst = dst.bytes_mut();
        let reader = scope.spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut buf = vec![0u8; 1 << 20];
            let mut sum = 0u64;
            match mode {
                "tcp" => {
                    let mut got = 0;
                    while got < n {
                        let k = s.read(&mut buf).expect("read");
                        assert!(k > 0, "stream ended early");
                        got += k;
                    }
                }
                "copy" => {
                    for slice in dst.chunks_mut(SLICE) {
                        let batch = &mut buf[..slice.len()];
                        s.read_exact(batch).expect("read");
                        for (to, page) in slice.chunks_mut(PAGE).zip(batch.chunks(PAGE)) {
                            sum ^= xxh3_64(page);
                            to.copy_from_slice(page);
                        }
                    }
                }
                _ => {
                    for slice in dst.chunks_mut(SLICE) {
                        s.read_exact(slice).expect("read");
                        if mode == "direct" {
                            hash_pages(slice, &mut sum);
                        }
                    }
                }
            }
            sum
        });
        let mut s = TcpStream::connect(addr).expect("connect");
        let mut sum = 0u64;
        match mode {
            "tcp" => {
                let buf = vec![0x5au8; 1 << 20];
                let mut sent = 0;
                while sent < n {
                    s.write_all(&buf).expect("write");
                    sent += buf.len();
                }
            }
            "copy" => {
                let mut batch = vec![0u8; SLICE];
                for slice in src.bytes().chunks(SLICE) {
                    let batch = &mut batch[..slice.len()];
                    for (to, page) in batch.chunks_mut(PAGE).zip(slice.chunks(PAGE)) {
                        to.copy_from_slice(page);
                        sum ^= xxh3_64(to);
                    }
                    s.write_all(batch).expect("write");
                }
            }
            _ => {
                for slice in src.bytes().chunks(SLICE) {
                    if mode != "direct-nohash" {
                        hash_pages(slice, &mut sum);
                    }
                    s.write_all(slice).expect("write");
                }
            }
        }
        let theirs = reader.join().expect("reader");
        if matches!(mode, "copy" | "direct") {
            assert_eq!(sum, theirs, "{mode}: the pages arrived changed");
        }
    });
    n as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("loopback_memory: run with `cargo bench` (skipping)");
        return;
    }
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let mib = env("FERRY_BENCH_MEM_MIB", 2048);
    let runs = env("FERRY_BENCH_RUNS", 2);
    let src = ColdRegion::new(mib << 20, true);
    let mut dst = ColdRegion::new(mib << 20, false);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        // The guest's vCPU: a thread that never sleeps.
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        println!("{mib} MiB per run, a spinning thread in the vCPU's place; GB/s, and vs `tcp` of the same round");
        println!("| round | {} |", MODES.join(" | "));
        println!("|---|{}", "---|".repeat(MODES.len()));
        for round in 0..runs {
            let rates: Vec<f64> = MODES.iter().map(|m| run(m, &src, &mut dst)).collect();
            let cells: Vec<String> = rates
                .iter()
                .map(|r| format!("{:.2} ({:.0}%)", r / 1e9, 100.0 * r / rates[0]))
                .collect();
            println!("| {round} | {} |", cells.join(" | "));
        }
        stop.store(true, Ordering::Relaxed);
    });
}
