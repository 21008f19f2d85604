//! Models of a migration's data path over this loopback, before any
//! engine runs: one connection, 256 KiB writes, from a cold source region
//! the size of a guest into a cold destination region ([`ColdRegion`]).
//! Used as ceilings by the `migration_engine` bench and shown side by side
//! by the `loopback_memory` bench.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use xxhash_rust::xxh3::xxh3_64;

use crate::cold_region::ColdRegion;

const PAGE: usize = 4096;
const SLICE: usize = 256 << 10;

/// One way to move the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// A plain stream between hot 1 MiB buffers (the baseline; the
    /// regions are not touched).
    HotStream,
    /// Each page copied out of the source region into a batch buffer and
    /// hashed there (xxh3); on the receiver each page hashed and copied into
    /// the destination region (ferry's data path).
    Copy,
    /// Sent straight from the source region after hashing it in place,
    /// received straight into the destination region, then hashed.
    Direct,
    /// As [`DataPath::Direct`], no hash on the receiver.
    DirectSourceHash,
    /// As [`DataPath::Direct`], no hash at all: the floor of any
    /// migration (the memory still has to be read and written).
    DirectNoHash,
}

impl DataPath {
    /// Every path, the baseline first.
    pub const ALL: [DataPath; 5] = [
        DataPath::HotStream,
        DataPath::Copy,
        DataPath::Direct,
        DataPath::DirectSourceHash,
        DataPath::DirectNoHash,
    ];

    /// Short name (table headers).
    pub fn name(self) -> &'static str {
        match self {
            DataPath::HotStream => "tcp",
            DataPath::Copy => "copy",
            DataPath::Direct => "direct",
            DataPath::DirectSourceHash => "direct-srchash",
            DataPath::DirectNoHash => "direct-nohash",
        }
    }
}

fn hash_pages(bytes: &[u8], sum: &mut u64) {
    for page in bytes.chunks(PAGE) {
        *sum ^= xxh3_64(page);
    }
}

/// Moves all of `src` into `dst` over one loopback connection along
/// `path`; returns bytes/s.
///
/// # Panics
/// On a socket error, or when the pages arrive changed (the hashing paths
/// compare both sides' sums).
pub fn stream(path: DataPath, src: &ColdRegion, dst: &mut ColdRegion) -> f64 {
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
            match path {
                DataPath::HotStream => {
                    let mut got = 0;
                    while got < n {
                        let k = s.read(&mut buf).expect("read");
                        assert!(k > 0, "stream ended early");
                        got += k;
                    }
                }
                DataPath::Copy => {
                    for slice in dst.chunks_mut(SLICE) {
                        let batch = &mut buf[..slice.len()];
                        s.read_exact(batch).expect("read");
                        for (to, page) in slice.chunks_mut(PAGE).zip(batch.chunks(PAGE)) {
                            sum ^= xxh3_64(page);
                            to.copy_from_slice(page);
                        }
                    }
                }
                DataPath::Direct | DataPath::DirectSourceHash | DataPath::DirectNoHash => {
                    for slice in dst.chunks_mut(SLICE) {
                        s.read_exact(slice).expect("read");
                        if path == DataPath::Direct {
                            hash_pages(slice, &mut sum);
                        }
                    }
                }
            }
            sum
        });
        let mut s = TcpStream::connect(addr).expect("connect");
        let mut sum = 0u64;
        match path {
            DataPath::HotStream => {
                let buf = vec![0x5au8; 1 << 20];
                let mut sent = 0;
                while sent < n {
                    s.write_all(&buf).expect("write");
                    sent += buf.len();
                }
            }
            DataPath::Copy => {
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
            DataPath::Direct | DataPath::DirectSourceHash | DataPath::DirectNoHash => {
                for slice in src.bytes().chunks(SLICE) {
                    if path != DataPath::DirectNoHash {
                        hash_pages(slice, &mut sum);
                    }
                    s.write_all(slice).expect("write");
                }
            }
        }
        let theirs = reader.join().expect("reader");
        if matches!(path, DataPath::Copy | DataPath::Direct) {
            assert_eq!(sum, theirs, "{}: the pages arrived changed", path.name());
        }
    });
    n as f64 / t0.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_but_the_hot_stream_moves_the_memory_intact() {
        let src = ColdRegion::new(4 << 20, true);
        for path in DataPath::ALL {
            let mut dst = ColdRegion::new(4 << 20, false);
            assert!(stream(path, &src, &mut dst) > 0.0);
            let moved = dst.bytes() == src.bytes();
            assert_eq!(moved, path != DataPath::HotStream, "{}", path.name());
        }
    }
}
