//! A real child process whose memory a `ProcessMemoryLog` tracks.
//!
//! Design: the parent maps the region (private, anonymous) and forks. The
//! child creates a userfaultfd (`ferry_dirtylog::create_userfaultfd`, one
//! system call; a userfaultfd always acts on its creator's memory) and sends
//! it to the parent over a UNIX socket with `SCM_RIGHTS`. The parent then
//! owns tracking entirely (handshake, register, write-protect, PAGEMAP_SCAN
//! on /proc/CHILD/pagemap); the child just writes its own private copy of
//! the region on command. The parent reads the child's memory with
//! `process_vm_readv`. Between fork and exit the child makes only raw system
//! calls (no allocation, no locks).

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context};
use ferry_dirtylog::{MemoryRange, ProcessMemoryLog, PAGE_SIZE};

use super::{Collector, Subject, Workload};

const CMD_EXIT: u64 = 0;
const CMD_WRITE: u64 = 1;
const CMD_SPIN: u64 = 2;
/// Most pages one command names.
const MAX_PAGES: usize = 1024;
const MSG_WORDS: usize = 3 + MAX_PAGES;

/// The child process; killed and reaped on drop, panics included.
pub struct ChildWorkload {
    pid: libc::pid_t,
    sock: OwnedFd,
    region: u64,
    pages: usize,
    stop: *const AtomicU64,
}

impl Drop for ChildWorkload {
    fn drop(&mut self) {
        // SAFETY: signals and reaps our own child by pid.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
        }
        let mut status = 0;
        // SAFETY: reaps our own child; `status` is a valid out-pointer.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
        // SAFETY: unmaps the shared stop-flag page mapped in `spawn`.
        unsafe { libc::munmap(self.stop as *mut libc::c_void, PAGE_SIZE as usize) };
        // SAFETY: unmaps the parent's copy of the region mapped in `spawn`.
        unsafe {
            libc::munmap(
                self.region as *mut libc::c_void,
                self.pages * PAGE_SIZE as usize,
            )
        };
    }
}

fn mmap(len: usize, flags: libc::c_int) -> anyhow::Result<*mut libc::c_void> {
    // SAFETY: fresh anonymous mapping; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        bail!("mmap: {}", io::Error::last_os_error());
    }
    Ok(p)
}

/// Forks a child owning `pages` pages of private memory; returns it and a
/// `ProcessMemoryLog` tracking that memory (not started).
pub fn spawn(pages: usize) -> anyhow::Result<(ChildWorkload, ProcessMemoryLog)> {
    let len = pages * PAGE_SIZE as usize;
    let region = mmap(len, libc::MAP_PRIVATE)? as u64;
    let stop = mmap(PAGE_SIZE as usize, libc::MAP_SHARED)? as *const AtomicU64;
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into `fds`.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } < 0
    {
        bail!("socketpair: {}", io::Error::last_os_error());
    }
    // SAFETY: fds[0] is fresh and owned here.
    let ours = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: fds[1] is fresh and owned here.
    let theirs = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    // SAFETY: the child only makes raw system calls, then `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", io::Error::last_os_error());
    }
    if pid == 0 {
        child_main(theirs.as_raw_fd(), region, stop);
    }
    drop(theirs);
    let child = ChildWorkload {
        pid,
        sock: ours,
        region,
        pages,
        stop,
    };
    let uffd = recv_fd(child.sock.as_raw_fd()).context("receiving the child's userfaultfd")?;
    let log = ProcessMemoryLog::with_userfaultfd(
        pid,
        uffd,
        vec![MemoryRange {
            start: region,
            len: len as u64,
        }],
    )?;
    Ok((child, log))
}

/// A subject: a child process tracked by `ProcessMemoryLog`.
pub fn subject(pages: usize) -> anyhow::Result<Subject> {
    let (child, log) = spawn(pages)?;
    Ok(Subject {
        log: Box::new(log),
        work: Box::new(child),
    })
}

fn child_main(sock: RawFd, region: u64, stop: *const AtomicU64) -> ! {
    let code = match ferry_dirtylog::create_userfaultfd() {
        Ok(uffd) if send_fd(sock, uffd.as_raw_fd()) => child_loop(sock, region, stop),
        _ => 10,
    };
    // SAFETY: ends the child without running the parent's destructors.
    unsafe { libc::_exit(code) }
}

fn child_loop(sock: RawFd, region: u64, stop: *const AtomicU64) -> i32 {
    let mut msg = [0u64; MSG_WORDS];
    loop {
        // SAFETY: reads at most `size_of_val(&msg)` bytes into `msg`.
        let n = unsafe {
            libc::recv(
                sock,
                msg.as_mut_ptr().cast(),
                size_of::<[u64; MSG_WORDS]>(),
                0,
            )
        };
        if n < 24 {
            return 11;
        }
        let (cmd, mut value, count) = (msg[0], msg[1], (msg[2] as usize).min(MAX_PAGES));
        let mut passes = 0u64;
        match cmd {
            CMD_WRITE | CMD_SPIN => loop {
                for &p in &msg[3..3 + count] {
                    let addr = (region + p * PAGE_SIZE) as *mut u64;
                    // SAFETY: the parent only names pages inside the region,
                    // which is mapped read-write in this process.
                    unsafe { addr.write_volatile(value) };
                }
                value += 1;
                passes += 1;
                // SAFETY: `stop` points into a shared page mapped before fork.
                if cmd == CMD_WRITE || unsafe { (*stop).load(Ordering::Acquire) } != 0 {
                    break;
                }
            },
            _ => return 0,
        }
        // SAFETY: sends 8 bytes from a live u64.
        if unsafe { libc::send(sock, (&raw const passes).cast(), 8, 0) } != 8 {
            return 12;
        }
    }
}

fn send_fd(sock: RawFd, fd: RawFd) -> bool {
    let mut byte = 0u8;
    let mut iov = libc::iovec {
        iov_base: (&raw mut byte).cast(),
        iov_len: 1,
    };
    // Room for one cmsghdr carrying one int, 8-aligned.
    let mut cbuf = [0u64; 4];
    // SAFETY: zeroed msghdr is a valid "empty" message.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    // SAFETY: msg_control points at `cbuf`, large enough for one cmsghdr + int.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    // SAFETY: CMSG_LEN is a pure size computation.
    let cmsg_len = unsafe { libc::CMSG_LEN(size_of::<RawFd>() as u32) } as usize;
    // SAFETY: `cmsg` points into `cbuf`, which is large enough for one
    // header plus an int (CMSG_FIRSTHDR returned non-null for that space).
    let header = unsafe { &mut *cmsg };
    header.cmsg_level = libc::SOL_SOCKET;
    header.cmsg_type = libc::SCM_RIGHTS;
    header.cmsg_len = cmsg_len;
    // SAFETY: the data area of this header lies inside `cbuf`.
    let data = unsafe { libc::CMSG_DATA(cmsg) };
    // SAFETY: room for one int at `data`, possibly unaligned.
    unsafe { data.cast::<RawFd>().write_unaligned(fd) };
    // SAFETY: `msg` and everything it points to are live for the call.
    unsafe { libc::sendmsg(sock, &msg, 0) == 1 }
}

fn recv_fd(sock: RawFd) -> anyhow::Result<OwnedFd> {
    let mut byte = 0u8;
    let mut iov = libc::iovec {
        iov_base: (&raw mut byte).cast(),
        iov_len: 1,
    };
    let mut cbuf = [0u64; 4];
    // SAFETY: zeroed msghdr is a valid "empty" message.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 4]>();
    // SAFETY: `msg` and its buffers are live for the call.
    if unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) } != 1 {
        bail!("recvmsg: {}", io::Error::last_os_error());
    }
    // SAFETY: the kernel filled msg_control; CMSG_FIRSTHDR checks its length.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    // SAFETY: non-null `cmsg` points at a complete header in `cbuf`.
    if cmsg.is_null() || unsafe { (*cmsg).cmsg_type } != libc::SCM_RIGHTS {
        bail!("the child sent no file descriptor");
    }
    // SAFETY: the data area of this header lies inside `cbuf`.
    let data = unsafe { libc::CMSG_DATA(cmsg) };
    // SAFETY: an SCM_RIGHTS message carries an int fd now owned by us.
    let fd = unsafe { data.cast::<RawFd>().read_unaligned() };
    // SAFETY: `fd` was just installed in this process for us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl ChildWorkload {
    fn command(&self, cmd: u64, pages: &[usize], value: u64) -> anyhow::Result<()> {
        if pages.len() > MAX_PAGES || pages.iter().any(|&p| p >= self.pages) {
            bail!("bad page list for the child ({} pages)", pages.len());
        }
        let mut msg = vec![cmd, value, pages.len() as u64];
        msg.extend(pages.iter().map(|&p| p as u64));
        // SAFETY: sends the bytes of `msg`, which is live for the call.
        let n = unsafe { libc::send(self.sock.as_raw_fd(), msg.as_ptr().cast(), msg.len() * 8, 0) };
        if usize::try_from(n).ok() != Some(msg.len() * 8) {
            bail!("send to child: {}", io::Error::last_os_error());
        }
        Ok(())
    }

    fn reply(&self) -> anyhow::Result<u64> {
        let mut passes = 0u64;
        // SAFETY: receives at most 8 bytes into `passes`.
        let n = unsafe { libc::recv(self.sock.as_raw_fd(), (&raw mut passes).cast(), 8, 0) };
        if n != 8 {
            bail!("child did not answer: {}", io::Error::last_os_error());
        }
        Ok(passes)
    }

    fn stop_flag(&self) -> &AtomicU64 {
        // SAFETY: `stop` is a shared page mapped for the child's lifetime.
        unsafe { &*self.stop }
    }

    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }
}

fn read_child_word(pid: libc::pid_t, addr: u64) -> u64 {
    let mut word = 0u64;
    let local = libc::iovec {
        iov_base: (&raw mut word).cast(),
        iov_len: 8,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: 8,
    };
    // SAFETY: copies 8 bytes from the child into `word`.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    assert_eq!(n, 8, "process_vm_readv: {}", io::Error::last_os_error());
    word
}

impl Workload for ChildWorkload {
    fn pages(&self) -> usize {
        self.pages
    }

    fn write(&mut self, pages: &[usize], value: u64) -> anyhow::Result<()> {
        self.command(CMD_WRITE, pages, value)?;
        self.reply().map(drop)
    }

    fn spin_while(
        &mut self,
        pages: &[usize],
        value: u64,
        during: Collector<'_>,
    ) -> anyhow::Result<u64> {
        self.stop_flag().store(0, Ordering::Release);
        self.command(CMD_SPIN, pages, value)?;
        let (pid, region) = (self.pid, self.region);
        during(&|p| read_child_word(pid, region + p as u64 * PAGE_SIZE));
        self.stop_flag().store(1, Ordering::Release);
        self.reply()
    }

    fn read_word(&self, page: usize) -> u64 {
        read_child_word(self.pid, self.region + page as u64 * PAGE_SIZE)
    }
}

impl ChildWorkload {
    /// Asks the child to exit cleanly (drop kills it anyway).
    pub fn exit(&self) -> anyhow::Result<()> {
        self.command(CMD_EXIT, &[], 0)
    }
}
