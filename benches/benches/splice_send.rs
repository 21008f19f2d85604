//! What sending guest pages by reference costs against sending them by
//! copy, over one loopback TCP connection, in CPU-seconds per side.
//!
//! Frames like a page batch's: a 32-byte header, 64 pages straight from a
//! populated source region (`FERRY_BENCH_PAGES`; on transparent huge pages
//! unless `FERRY_BENCH_THP=0`), an 8-byte-per-page table. Two ways out:
//!
//! - `sendmsg`: one `sendmsg` gathering header, page iovecs and table (the
//!   kernel copies every page into the socket's buffers: ferry's
//!   `SocketSink` and QEMU multifd's `writev`);
//! - `splice`: per connection a pipe (`F_SETPIPE_SZ` 1 MiB); header and
//!   table `write()`n into it, the pages `vmsplice()`d (referenced), the
//!   pipe `splice()`d into the socket: the receiver's `recv` copies straight
//!   from the source's pages.
//!
//! The receiver reads each frame with one `readv`: header and table into a
//! buffer, the pages into place in a populated destination region.
//! Reported per run: sender and receiver thread CPU (`getrusage`
//! `RUSAGE_THREAD`, user+system; loopback's receive processing usually
//! runs in softirq on the sender's thread), and wall time. The modes
//! alternate; medians at the end.
//! It also checks, once, whether `vmsplice` references the pages on this
//! kernel (a page written after `vmsplice` reads back new through the pipe).
//!
//! What it showed on the 6.18 kernel this was written on (2 vCPUs, 260 MiB
//! L3, shared machine, medians of 5, CPU-seconds): vmsplice still
//! references. For 1 GiB, splice halves the sender's CPU (0.205 -> 0.102 s)
//! but the receiver's doubles (0.317 -> 0.545 s), and the wall time grows
//! (0.53 -> 0.66 s): the receiver now copies from the source's pages in
//! DRAM instead of from socket buffers the sender has just written (in the
//! shared cache), and pays per 4 KiB fragment. With 64 MiB (all in L3) the
//! receiver still pays more (0.021 -> 0.038 s, sum 0.035 -> 0.043 s), so it
//! is not only the cold read. One copy fewer is not less work here.
//!
//! ```text
//! cargo bench -p ferry-benches --bench splice_send
//! FERRY_BENCH_MEM_MIB=1024 FERRY_BENCH_RUNS=5 FERRY_BENCH_MODE=both cargo bench -p ferry-benches --bench splice_send
//! ```

use ferry_harness::bench::procfs::this_thread_cpu;
use std::io::{IoSliceMut, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use ferry_benches::cold_region::ColdRegion;
use ferry_benches::median;

/// Pages per frame (`FERRY_BENCH_PAGES`, default 64: a 256 KiB batch).
static PAGES: std::sync::LazyLock<usize> =
    std::sync::LazyLock::new(|| ferry_benches::env_usize("FERRY_BENCH_PAGES", 64).clamp(1, 240));

const PAGE: usize = 4096;
const HEADER: usize = 32;
const PIPE_SIZE: i32 = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Sendmsg,
    Splice,
}

/// The calling thread's user + system CPU seconds so far.
fn thread_cpu() -> f64 {
    this_thread_cpu().expect("getrusage").total()
}

fn check(ret: isize, what: &str) -> usize {
    assert!(ret >= 0, "{what}: {}", std::io::Error::last_os_error());
    ret.unsigned_abs()
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid out-array of two fds.
    check(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } as isize,
        "pipe2",
    );
    // SAFETY: pipe2 returned two fresh fds we own.
    let [r, w] = fds.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: fcntl on our own fd.
    check(
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) } as isize,
        "F_SETPIPE_SZ",
    );
    (r, w)
}

/// Whether a page written after it was vmspliced reads back new through
/// the pipe (the pipe references it) or old (vmsplice copied it).
fn vmsplice_references() -> bool {
    let (r, w) = pipe();
    let mut region = ColdRegion::new(2 << 20, false);
    let page = &mut region.bytes_mut()[..PAGE];
    page.fill(b'o');
    let iov = libc::iovec {
        iov_base: page.as_ptr().cast_mut().cast(),
        iov_len: PAGE,
    };
    // SAFETY: one iovec over a live page; the pipe only reads it.
    check(
        unsafe { libc::vmsplice(w.as_raw_fd(), &iov, 1, 0) },
        "vmsplice",
    );
    page.fill(b'n');
    let mut back = vec![0u8; PAGE];
    std::fs::File::from(r)
        .read_exact(&mut back)
        .expect("read pipe");
    back[0] == b'n'
}

/// Drops the first `n` bytes of `iov[*first..]` (a partial write).
fn advance(iov: &mut [libc::iovec], first: &mut usize, mut n: usize) {
    while n > 0 {
        let v = &mut iov[*first];
        if n >= v.iov_len {
            n -= v.iov_len;
            *first += 1;
        } else {
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
            v.iov_len -= n;
            n = 0;
        }
    }
}

fn send_splice(s: &TcpStream, src: &ColdRegion, pipe_w: &OwnedFd, pipe_r: &OwnedFd) {
    let header = [0x48u8; HEADER];
    let table = vec![0x54u8; *PAGES * 8];
    let (w, r, sock) = (pipe_w.as_raw_fd(), pipe_r.as_raw_fd(), s.as_raw_fd());
    for batch in src.bytes().chunks(PAGE * *PAGES) {
        let len = HEADER + batch.len() + table.len();
        // SAFETY: write of a live buffer into our pipe.
        let n = check(
            unsafe { libc::write(w, header.as_ptr().cast(), HEADER) },
            "write header",
        );
        assert_eq!(n, HEADER);
        let mut iov: Vec<libc::iovec> = batch
            .chunks(PAGE)
            .map(|p| libc::iovec {
                iov_base: p.as_ptr().cast_mut().cast(),
                iov_len: p.len(),
            })
            .collect();
        let mut first = 0;
        while first < iov.len() {
            // SAFETY: iovecs over the live source region; read only.
            let n = check(
                unsafe { libc::vmsplice(w, iov[first..].as_ptr(), iov.len() - first, 0) },
                "vmsplice",
            );
            advance(&mut iov, &mut first, n);
        }
        // SAFETY: as the header.
        let n = check(
            unsafe { libc::write(w, table.as_ptr().cast(), table.len()) },
            "write table",
        );
        assert_eq!(n, table.len());
        let mut left = len;
        while left > 0 {
            // SAFETY: splice between two fds we own, no offsets.
            left -= check(
                unsafe {
                    libc::splice(
                        r,
                        std::ptr::null_mut(),
                        sock,
                        std::ptr::null_mut(),
                        left,
                        libc::SPLICE_F_MOVE | libc::SPLICE_F_MORE,
                    )
                },
                "splice",
            );
        }
    }
}

fn send_sendmsg(s: &TcpStream, src: &ColdRegion) {
    let header = [0x48u8; HEADER];
    let table = vec![0x54u8; *PAGES * 8];
    for batch in src.bytes().chunks(PAGE * *PAGES) {
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(*PAGES + 2);
        iov.push(libc::iovec {
            iov_base: header.as_ptr().cast_mut().cast(),
            iov_len: HEADER,
        });
        iov.extend(batch.chunks(PAGE).map(|p| libc::iovec {
            iov_base: p.as_ptr().cast_mut().cast(),
            iov_len: p.len(),
        }));
        iov.push(libc::iovec {
            iov_base: table.as_ptr().cast_mut().cast(),
            iov_len: table.len(),
        });
        let mut first = 0;
        while first < iov.len() {
            // SAFETY: all-zero msghdr is valid; iov set below.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov[first..].as_mut_ptr();
            msg.msg_iovlen = iov.len() - first;
            // SAFETY: iovecs over live buffers; the kernel reads them.
            let n = check(
                unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) },
                "sendmsg",
            );
            advance(&mut iov, &mut first, n);
        }
    }
}

struct Run {
    send_cpu: f64,
    recv_cpu: f64,
    wall: f64,
}

fn run(mode: Mode, src: &ColdRegion, dst: &mut ColdRegion) -> Run {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let n = src.len();
    let t0 = Instant::now();
    let (send_cpu, recv_cpu) = std::thread::scope(|scope| {
        let dst = dst.bytes_mut();
        let reader = scope.spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let c0 = thread_cpu();
            let mut head = [0u8; HEADER];
            let mut table = vec![0u8; *PAGES * 8];
            for slice in dst.chunks_mut(PAGE * *PAGES) {
                let mut bufs = [
                    IoSliceMut::new(&mut head),
                    IoSliceMut::new(slice),
                    IoSliceMut::new(&mut table),
                ];
                let mut bufs = &mut bufs[..];
                while !bufs.is_empty() {
                    let k = s.read_vectored(bufs).expect("read");
                    assert!(k > 0, "stream ended early");
                    IoSliceMut::advance_slices(&mut bufs, k);
                }
                assert_eq!(head[0], 0x48);
                assert_eq!(table[table.len() - 1], 0x54);
            }
            thread_cpu() - c0
        });
        let s = TcpStream::connect(addr).expect("connect");
        let (pr, pw) = pipe();
        let c0 = thread_cpu();
        match mode {
            Mode::Sendmsg => send_sendmsg(&s, src),
            Mode::Splice => send_splice(&s, src, &pw, &pr),
        }
        let send = thread_cpu() - c0;
        (send, reader.join().expect("reader"))
    });
    let wall = t0.elapsed().as_secs_f64();
    assert!(
        dst.bytes()[..n] == *src.bytes(),
        "{mode:?}: pages arrived changed"
    );
    dst.bytes_mut().fill(0);
    Run {
        send_cpu,
        recv_cpu,
        wall,
    }
}

fn main() {
    if !ferry_benches::started_by_cargo_bench("splice_send") {
        return;
    }
    let env = ferry_benches::env_usize;
    let mib = env("FERRY_BENCH_MEM_MIB", 1024);
    let runs = env("FERRY_BENCH_RUNS", 5);
    let modes: Vec<Mode> = match std::env::var("FERRY_BENCH_MODE").as_deref() {
        Ok("sendmsg") => vec![Mode::Sendmsg],
        Ok("splice") => vec![Mode::Splice],
        _ => vec![Mode::Sendmsg, Mode::Splice],
    };
    println!(
        "vmsplice references the pages on this kernel: {}",
        vmsplice_references()
    );
    let huge = env("FERRY_BENCH_THP", 1) != 0;
    println!("source region on transparent huge pages: {huge}");
    let src = ColdRegion::backed(mib << 20, true, huge);
    let mut dst = ColdRegion::new(mib << 20, false);
    println!("{mib} MiB per run; CPU-seconds per side (thread user+sys), wall s");
    println!("| run | mode | sender cpu | receiver cpu | wall |");
    println!("|---|---|---|---|---|");
    let mut all: Vec<(Mode, Run)> = Vec::new();
    for i in 0..runs {
        for &mode in &modes {
            let r = run(mode, &src, &mut dst);
            println!(
                "| {i} | {mode:?} | {:.3} | {:.3} | {:.3} |",
                r.send_cpu, r.recv_cpu, r.wall
            );
            all.push((mode, r));
        }
    }
    for &mode in &modes {
        let of = |f: fn(&Run) -> f64| {
            median(
                all.iter()
                    .filter(|(m, _)| *m == mode)
                    .map(|(_, r)| f(r))
                    .collect(),
            )
        };
        println!(
            "median {mode:?}: sender {:.3} s, receiver {:.3} s, wall {:.3} s",
            of(|r| r.send_cpu),
            of(|r| r.recv_cpu),
            of(|r| r.wall)
        );
    }
}
