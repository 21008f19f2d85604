//! The physical ceiling: a plain TCP stream over loopback, built in, run in
//! the same session as the migrations so every result can be read as a
//! fraction of what the link and the memory system allow at that moment.
//!
//! It also says what the bytes cost: the CPU seconds its sender and
//! receiver threads spend (user + system, the loopback's receive
//! processing included, as it is for the engines' processes). A bare
//! socket copy from a hot 1 MiB buffer into a buffer that is read and
//! dropped is the least CPU any engine that moves memory over TCP can
//! spend, so the engines' CPU per GiB can be read against it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Instant;

use serde::Serialize;

use crate::bench::error::BenchError;
use crate::bench::procfs::this_thread_cpu;

/// What one ceiling run measured.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ceiling {
    /// TCP connections used in parallel.
    pub connections: usize,
    /// Bytes moved.
    pub bytes: u64,
    /// Seconds from the first write to the last byte read.
    pub secs: f64,
    /// bytes / secs.
    pub bytes_per_sec: f64,
    /// CPU seconds (user + system) of the sender and receiver threads.
    pub cpu_secs: f64,
}

impl Ceiling {
    /// CPU seconds per GiB moved (sender + receiver).
    pub fn cpu_per_gib(&self) -> f64 {
        self.cpu_secs / (self.bytes as f64 / f64::from(1u32 << 30))
    }
}

const CHUNK: usize = 1 << 20;

/// Sends `total` bytes (in 1 MiB writes of non-zero, non-repeating data)
/// from `connections` sender threads to as many receiver threads over
/// 127.0.0.1, and times it and counts its threads' CPU.
pub fn measure(connections: usize, total: u64) -> Result<Ceiling, BenchError> {
    let connections = connections.max(1);
    let listener = TcpListener::bind("127.0.0.1:0").map_err(BenchError::Ceiling)?;
    let addr = listener.local_addr().map_err(BenchError::Ceiling)?;
    let per_conn = total / connections as u64;
    let receivers = thread::spawn(move || -> std::io::Result<(u64, f64)> {
        let mut handles = Vec::new();
        for _ in 0..connections {
            let (mut s, _) = listener.accept()?;
            handles.push(thread::spawn(move || -> std::io::Result<(u64, f64)> {
                let start_cpu = this_thread_cpu()?.total();
                let mut buf = vec![0u8; CHUNK];
                let mut got = 0u64;
                loop {
                    let n = s.read(&mut buf)?;
                    if n == 0 {
                        return Ok((got, this_thread_cpu()?.total() - start_cpu));
                    }
                    got += n as u64;
                }
            }));
        }
        let (mut sum, mut cpu) = (0, 0.0);
        for h in handles {
            let (bytes, secs) = h
                .join()
                .map_err(|_| std::io::Error::other("receiver panicked"))??;
            sum += bytes;
            cpu += secs;
        }
        Ok((sum, cpu))
    });
    let mut data = vec![0u8; CHUNK];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for b in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    let data = std::sync::Arc::new(data);
    let mut streams = Vec::new();
    for _ in 0..connections {
        streams.push(TcpStream::connect(addr).map_err(BenchError::Ceiling)?);
    }
    let start = Instant::now();
    let senders: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let data = data.clone();
            thread::spawn(move || -> std::io::Result<f64> {
                let start_cpu = this_thread_cpu()?.total();
                let mut left = per_conn;
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    s.write_all(&data[..n])?;
                    left -= n as u64;
                }
                s.shutdown(std::net::Shutdown::Write)?;
                Ok(this_thread_cpu()?.total() - start_cpu)
            })
        })
        .collect();
    let mut cpu_secs = 0.0;
    for h in senders {
        cpu_secs += h
            .join()
            .map_err(|_| BenchError::Ceiling(std::io::Error::other("sender panicked")))?
            .map_err(BenchError::Ceiling)?;
    }
    let (bytes, receiver_cpu) = receivers
        .join()
        .map_err(|_| BenchError::Ceiling(std::io::Error::other("receiver panicked")))?
        .map_err(BenchError::Ceiling)?;
    let secs = start.elapsed().as_secs_f64();
    Ok(Ceiling {
        connections,
        bytes,
        secs,
        bytes_per_sec: bytes as f64 / secs,
        cpu_secs: cpu_secs + receiver_cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_arrives() {
        let c = measure(2, 8 << 20).unwrap();
        assert_eq!(c.bytes, 8 << 20);
        assert_eq!(c.connections, 2);
        assert!(c.bytes_per_sec > 0.0);
        assert!(c.cpu_secs > 0.0, "moving 8 MiB cost no CPU: {c:?}");
    }
}
