//! Where a migration's raw pages should land on the destination, measured
//! as the receiving threads' CPU time (getrusage, user + system: the
//! kernel's copy out of the socket counts): 1 GiB of pseudo-random pages
//! over one loopback connection in 1 MiB batches into a populated 1 GiB
//! region laid out like guest memory, with the engine's own page
//! functions.
//!
//! - `buffer`: read each batch into one reused (hot) buffer, then
//!   `copy_hashed` every page into the region with streaming stores (the
//!   destination's decoders today, without their handoff).
//! - `buffer, handoff xN`: as `buffer`, the copy on a second thread that
//!   the reader hands each buffer to (at most N buffers, made as needed):
//!   the engine's lane reader and decoder threads.
//! - `readv+hash`: `readv` the batch's pages straight into the region (one
//!   iovec per page, as scattered pages would need), then `page_hash`
//!   each page in place.
//! - `readv`: as `readv+hash`, no hash (the floor).
//!
//! Reports, never asserts. The sender is another thread (the machine's
//! other core); only the receiver's CPU is compared.
//!
//! ```text
//! cargo bench -p ferry-benches --bench destination_landing
//! FERRY_BENCH_MEM_MIB=1024 FERRY_BENCH_RUNS=5 cargo bench -p ferry-benches --bench destination_landing
//! ```

use ferry_harness::bench::procfs::this_thread_cpu;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::{Scope, ScopedJoinHandle};

use ferry_benches::cold_region::ColdRegion;
use ferry_engine::encode::page_hash::{copy_hashed, page_hash, store_fence};

const PAGE: usize = 4096;
const BATCH: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Landing {
    Buffer,
    /// As `Buffer`, with the copy on another thread: the reader hands each
    /// batch's buffer over (at most this many buffers, made as needed).
    Handoff(usize),
    ReadvHash,
    Readv,
}

impl Landing {
    const ALL: [Landing; 5] = [
        Landing::Buffer,
        Landing::Handoff(2),
        Landing::Handoff(21),
        Landing::ReadvHash,
        Landing::Readv,
    ];

    fn name(self) -> String {
        match self {
            Landing::Buffer => "buffer".into(),
            Landing::Handoff(n) => format!("buffer, handoff x{n}"),
            Landing::ReadvHash => "readv+hash".into(),
            Landing::Readv => "readv".into(),
        }
    }
}

/// The calling thread's user and system CPU seconds so far.
fn thread_cpu_s() -> (f64, f64) {
    let t = this_thread_cpu().expect("getrusage");
    (t.user, t.system)
}

/// `readv` until every byte of `pages` (each PAGE long) has arrived.
fn readv_all(fd: i32, pages: &mut [libc::iovec]) {
    let mut at = 0;
    while at < pages.len() {
        let rest = &mut pages[at..];
        let count = i32::try_from(rest.len().min(1024)).expect("iov count");
        // SAFETY: every iovec points at PAGE writable bytes of the region
        // (or the tail of one, adjusted below), alive for the call.
        let k = unsafe { libc::readv(fd, rest.as_ptr(), count) };
        assert!(k > 0, "readv: {}", std::io::Error::last_os_error());
        let mut k = k as usize;
        while k > 0 {
            let v = &mut pages[at];
            let take = k.min(v.iov_len);
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(take).cast();
            v.iov_len -= take;
            k -= take;
            if v.iov_len == 0 {
                at += 1;
            }
        }
    }
}

/// Copies the pages of `buf` into `batch` with [`copy_hashed`]'s streaming
/// stores (a plain copy and [`page_hash`] where it cannot), fenced; a
/// fold of their hashes.
fn copy_pages(buf: &[u8], batch: &mut [u8]) -> u64 {
    let mut sum = 0u64;
    for (to, page) in batch.chunks_mut(PAGE).zip(buf.chunks(PAGE)) {
        // SAFETY: two separate PAGE-byte ranges.
        let h = unsafe { copy_hashed(page.as_ptr(), to.as_mut_ptr(), true) };
        sum ^= h.unwrap_or_else(|| {
            to.copy_from_slice(page);
            page_hash(page)
        });
    }
    store_fence();
    sum
}

/// A batch read into a buffer, with the place in the region it lands in.
type Handed<'r> = (Vec<u8>, &'r mut [u8]);

/// How the receiving loop of [`land`] lands each batch (a [`Landing`]
/// with what it keeps from batch to batch).
enum BatchLanding<'scope, 'r> {
    /// [`Landing::Buffer`]: one reused, page-aligned buffer.
    Buffer { buf: Vec<u8>, off: usize },
    /// [`Landing::Handoff`]: buffers handed to the copier thread and back.
    Handoff {
        full: SyncSender<Handed<'r>>,
        spare: Receiver<Vec<u8>>,
        made: usize,
        depth: usize,
        copier: ScopedJoinHandle<'scope, ((f64, f64), u64)>,
    },
    /// [`Landing::ReadvHash`] (`hash`) and [`Landing::Readv`].
    Readv { hash: bool },
}

impl<'scope, 'r: 'scope> BatchLanding<'scope, 'r> {
    /// For `how`; a handoff's copier thread is started in `scope`.
    fn new(how: Landing, scope: &'scope Scope<'scope, '_>) -> Self {
        match how {
            Landing::Buffer => {
                let buf = vec![0u8; BATCH + PAGE];
                let off = buf.as_ptr().align_offset(PAGE);
                BatchLanding::Buffer { buf, off }
            }
            Landing::Handoff(depth) => {
                let (full, full_rx) = sync_channel::<Handed<'r>>(depth);
                let (spare_tx, spare) = sync_channel(depth);
                let copier = scope.spawn(move || {
                    let t0 = thread_cpu_s();
                    let mut sum = 0u64;
                    for (buf, batch) in full_rx {
                        sum ^= copy_pages(&buf, batch);
                        let _ = spare_tx.try_send(buf);
                    }
                    let t1 = thread_cpu_s();
                    ((t1.0 - t0.0, t1.1 - t0.1), sum)
                });
                BatchLanding::Handoff {
                    full,
                    spare,
                    made: 0,
                    depth,
                    copier,
                }
            }
            Landing::ReadvHash => BatchLanding::Readv { hash: true },
            Landing::Readv => BatchLanding::Readv { hash: false },
        }
    }

    /// Reads the next batch from `s` and lands it in `batch` (a handoff:
    /// reads it into a spare buffer, or a new one while fewer than `depth`
    /// exist, and hands it to the copier); a fold of the hashes computed.
    fn land(&mut self, s: &mut TcpStream, batch: &'r mut [u8]) -> u64 {
        match self {
            BatchLanding::Buffer { buf, off } => {
                let buf = &mut buf[*off..*off + batch.len()];
                s.read_exact(buf).expect("read");
                copy_pages(buf, batch)
            }
            BatchLanding::Handoff {
                full,
                spare,
                made,
                depth,
                ..
            } => {
                let mut buf = match spare.try_recv() {
                    Ok(b) => b,
                    Err(_) if *made < *depth => {
                        *made += 1;
                        Vec::new()
                    }
                    Err(_) => spare.recv().expect("a spare buffer"),
                };
                buf.resize(batch.len(), 0);
                s.read_exact(&mut buf).expect("read");
                full.send((buf, batch)).expect("hand over");
                0
            }
            BatchLanding::Readv { hash } => {
                let mut iov: Vec<libc::iovec> = batch
                    .chunks_mut(PAGE)
                    .map(|p| libc::iovec {
                        iov_base: p.as_mut_ptr().cast(),
                        iov_len: p.len(),
                    })
                    .collect();
                readv_all(s.as_raw_fd(), &mut iov);
                if !*hash {
                    return 0;
                }
                batch
                    .chunks(PAGE)
                    .fold(0, |sum, page| sum ^ page_hash(page))
            }
        }
    }

    /// With every batch landed: the CPU seconds of the threads besides the
    /// receiving one (a handoff's copier, once it is done) and the fold of
    /// the hashes they computed.
    fn finish(self) -> ((f64, f64), u64) {
        match self {
            BatchLanding::Handoff { full, copier, .. } => {
                drop(full);
                copier.join().expect("copier")
            }
            _ => ((0.0, 0.0), 0),
        }
    }
}

/// Moves `src` into `dst` along `how`; returns the receiving threads' user
/// and system CPU seconds, added, and a fold of the page hashes they
/// computed (0 without hashing).
fn land(how: Landing, src: &ColdRegion, dst: &mut ColdRegion) -> ((f64, f64), u64) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::scope(|scope| {
        let dst = dst.bytes_mut();
        let receiver = scope.spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut landing = BatchLanding::new(how, scope);
            let t0 = thread_cpu_s();
            let mut sum = 0u64;
            for batch in dst.chunks_mut(BATCH) {
                sum ^= landing.land(&mut s, batch);
            }
            let t1 = thread_cpu_s();
            let ((user, sys), more) = landing.finish();
            ((t1.0 - t0.0 + user, t1.1 - t0.1 + sys), sum ^ more)
        });
        let mut s = TcpStream::connect(addr).expect("connect");
        for batch in src.bytes().chunks(BATCH) {
            s.write_all(batch).expect("write");
        }
        receiver.join().expect("receiver")
    })
}

fn main() {
    if !ferry_benches::started_by_cargo_bench("destination_landing") {
        return;
    }
    let env = ferry_benches::env_usize;
    let mib = env("FERRY_BENCH_MEM_MIB", 1024);
    let runs = env("FERRY_BENCH_RUNS", 5);
    let src = ColdRegion::new(mib << 20, true);
    let mut dst = ColdRegion::new(mib << 20, false);
    let want: u64 = src.bytes().chunks(PAGE).fold(0, |s, p| s ^ page_hash(p));
    println!(
        "{mib} MiB per run, 1 MiB batches; receiver CPU-seconds: total (user + sys), alternating"
    );
    let names: Vec<String> = Landing::ALL.iter().map(|l| l.name()).collect();
    println!("| run | {} |", names.join(" | "));
    println!("|---|{}", "---|".repeat(Landing::ALL.len()));
    let mut all: Vec<Vec<f64>> = vec![Vec::new(); Landing::ALL.len()];
    for run in 0..runs {
        let mut cells = Vec::new();
        for (i, &how) in Landing::ALL.iter().enumerate() {
            let ((user, sys), sum) = land(how, &src, &mut dst);
            let cpu = user + sys;
            if how != Landing::Readv && sum != want {
                eprintln!("{}: the pages arrived changed", how.name());
            }
            if dst.bytes() != src.bytes() {
                eprintln!("{}: the region differs from the source", how.name());
            }
            all[i].push(cpu);
            cells.push(format!("{cpu:.3} ({user:.3} + {sys:.3})"));
        }
        println!("| {run} | {} |", cells.join(" | "));
    }
    let medians: Vec<String> = all
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            format!("{:.3}", v[v.len() / 2])
        })
        .collect();
    println!("| median | {} |", medians.join(" | "));
}
