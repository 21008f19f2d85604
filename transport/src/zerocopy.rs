//! io_uring senders and receivers: zero-copy send (`IORING_OP_SENDMSG_ZC`)
//! of frames straight from their buffers, and an io_uring receive path.
//!
//! With zero-copy send the kernel pins the pages of the payload and the NIC
//! reads them by DMA; the buffers must stay untouched until the kernel posts
//! a *notification* completion for the send (rule 7 of STYLE.md: an
//! operation owns its buffer until the kernel says done). [`ZcSender`]
//! therefore owns every queued frame (header + [`Bytes`] parts) in a slot
//! that is freed only after both the send completion and its notification
//! were reaped, keeping up to `depth` frames in flight. Borrowed frames (the
//! [`FrameSink`] interface) are sent the same way and waited for before the
//! call returns.
//!
//! On loopback there is no NIC: the kernel copies anyway (every send
//! completes as "copied", PLATFORM.md), so zero-copy can only add overhead
//! there; see BENCHMARKS.md ("Transport") for what was measured here.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use bytes::Bytes;
use io_uring::{cqueue, opcode, types, IoUring};

use crate::error::TransportError;
use crate::frame::{encode_header, FrameKind, HEADER_LEN};
use crate::lanes::queue::OutFrame;
use crate::stream::FrameSink;

/// Ask the kernel to report in each notification whether it copied
/// (`IORING_SEND_ZC_REPORT_USAGE`, linux/io_uring.h).
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// Set in a notification's result when the kernel copied the data
/// (`IORING_NOTIF_USAGE_ZC_COPIED`, linux/io_uring.h).
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

/// One frame owned by the sender until the kernel is done with it.
struct InFlight {
    header: [u8; HEADER_LEN],
    /// Owned payload parts (empty for a borrowed frame, whose caller waits).
    _parts: Vec<Bytes>,
    /// Byte ranges to send, in order (pointers into `header` or the parts).
    ranges: Vec<(*const u8, usize)>,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
    total: usize,
    sent: usize,
    /// A send for this frame is submitted and not yet completed.
    sending: bool,
    /// Notifications announced (`IORING_CQE_F_MORE`) and not yet reaped.
    notifs: u32,
}

// SAFETY: the raw pointers in an `InFlight` point into its own boxed header
// and its owned `Bytes` parts (or into a borrowed frame whose caller blocks
// until the frame is done); moving the struct between threads does not move
// the data they point to.
unsafe impl Send for InFlight {}

impl InFlight {
    /// Points `iov`/`msg` at the bytes not yet sent.
    fn aim(&mut self) {
        self.iov.clear();
        let mut skip = self.sent;
        for &(ptr, len) in &self.ranges {
            if skip >= len {
                skip -= len;
                continue;
            }
            self.iov.push(libc::iovec {
                // SAFETY: `skip < len`, so the offset stays inside the range.
                iov_base: unsafe { ptr.add(skip) }.cast_mut().cast(),
                iov_len: len - skip,
            });
            skip = 0;
        }
        // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
        self.msg = unsafe { std::mem::zeroed() };
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len();
    }

    fn is_done(&self) -> bool {
        !self.sending && self.notifs == 0 && self.sent == self.total
    }
}

/// Sends frames on a TCP socket with io_uring zero-copy sends.
pub struct ZcSender {
    ring: IoUring,
    stream: TcpStream,
    slots: Vec<Option<Box<InFlight>>>,
    free: Vec<usize>,
    order: VecDeque<usize>,
    depth: usize,
    error: Option<io::Error>,
    bytes_sent: u64,
    copied: u64,
    notifications: u64,
}

impl std::fmt::Debug for ZcSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZcSender")
            .field("stream", &self.stream)
            .field("depth", &self.depth)
            .field("in_flight", &self.order.len())
            .finish_non_exhaustive()
    }
}

impl ZcSender {
    /// A sender on `stream` keeping at most `depth` frames in flight.
    pub fn new(stream: TcpStream, depth: usize) -> Result<ZcSender, TransportError> {
        let depth = depth.clamp(1, 1024);
        let entries = u32::try_from(depth.next_power_of_two() * 2).unwrap_or(2048);
        let ring = IoUring::new(entries).map_err(TransportError::Configure)?;
        Ok(ZcSender {
            ring,
            stream,
            slots: Vec::new(),
            free: Vec::new(),
            order: VecDeque::new(),
            depth,
            error: None,
            bytes_sent: 0,
            copied: 0,
            notifications: 0,
        })
    }

    /// Whether this kernel supports zero-copy sends through io_uring.
    pub fn is_supported() -> bool {
        let Ok(ring) = IoUring::new(2) else {
            return false;
        };
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::SendMsgZc::CODE)
    }

    /// Bytes handed to the kernel and completed.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Notifications that reported the kernel copied instead of pinning
    /// (`IORING_NOTIF_USAGE_ZC_COPIED`), and notifications in total.
    pub fn copied_notifications(&self) -> (u64, u64) {
        (self.copied, self.notifications)
    }

    /// Queues an owned frame; blocks while `depth` frames are in flight.
    pub fn send_owned(&mut self, frame: OutFrame) -> Result<(), TransportError> {
        let slices: Vec<IoSlice<'_>> = frame.parts.iter().map(|p| IoSlice::new(p)).collect();
        let header =
            encode_header(frame.kind, frame.flags, &slices).map_err(TransportError::Encode)?;
        let ranges = frame.parts.iter().map(|p| (p.as_ptr(), p.len())).collect();
        self.start(header, frame.parts, ranges)
    }

    /// Queues a frame sealed by its producer (header and checksum in its
    /// first [`HEADER_LEN`] bytes); blocks while `depth` frames are in
    /// flight.
    pub fn send_sealed(&mut self, frame: Bytes) -> Result<(), TransportError> {
        let Some(head) = frame.first_chunk::<HEADER_LEN>() else {
            return Err(TransportError::Encode(
                crate::frame::FrameError::Truncated {
                    needed: HEADER_LEN,
                    got: frame.len(),
                },
            ));
        };
        let header = *head;
        let ranges = vec![(frame[HEADER_LEN..].as_ptr(), frame.len() - HEADER_LEN)];
        self.start(header, vec![frame], ranges)
    }

    fn start(
        &mut self,
        header: [u8; HEADER_LEN],
        parts: Vec<Bytes>,
        part_ranges: Vec<(*const u8, usize)>,
    ) -> Result<(), TransportError> {
        // One send at a time per socket: concurrent sends on a stream socket
        // may complete out of order or interleave after a partial send. Many
        // frames can still wait for their notifications (the zero-copy part).
        while self.order.len() >= self.depth || self.sending_now() {
            self.reap(1)?;
        }
        self.check()?;
        let mut f = Box::new(InFlight {
            header,
            _parts: parts,
            ranges: Vec::with_capacity(part_ranges.len() + 1),
            iov: Vec::with_capacity(part_ranges.len() + 1),
            // SAFETY: msghdr is plain old data; all-zero is valid.
            msg: unsafe { std::mem::zeroed() },
            total: 0,
            sent: 0,
            sending: false,
            notifs: 0,
        });
        let header_ptr = f.header.as_ptr();
        f.ranges.push((header_ptr, HEADER_LEN));
        f.ranges
            .extend(part_ranges.into_iter().filter(|&(_, len)| len > 0));
        f.total = f.ranges.iter().map(|&(_, len)| len).sum();
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[idx] = Some(f);
        self.order.push_back(idx);
        self.submit(idx)
    }

    fn sending_now(&self) -> bool {
        self.order
            .iter()
            .any(|&i| self.slots[i].as_ref().is_some_and(|f| f.sending))
    }

    fn submit(&mut self, idx: usize) -> Result<(), TransportError> {
        let fd = types::Fd(self.stream.as_raw_fd());
        let Some(f) = self.slots[idx].as_mut() else {
            return Ok(());
        };
        f.aim();
        f.sending = true;
        let sqe = opcode::SendMsgZc::new(fd, &f.msg)
            .ioprio(SEND_ZC_REPORT_USAGE)
            .flags(u32::try_from(libc::MSG_WAITALL).unwrap_or(0))
            .build()
            .user_data(u64::try_from(idx).unwrap_or(u64::MAX));
        loop {
            // SAFETY: the msghdr, its iovecs and the bytes they point to live
            // in the boxed slot `idx`, which is freed only after this send's
            // completion and notification are reaped (`reap`), and `Drop`
            // waits for every slot; a borrowed frame's caller waits too.
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            if pushed.is_ok() {
                break;
            }
            self.ring.submit().map_err(TransportError::Write)?;
        }
        self.ring.submit().map_err(TransportError::Write)?;
        Ok(())
    }

    /// Waits for at least `want` completions and processes all available.
    fn reap(&mut self, want: usize) -> Result<(), TransportError> {
        if let Err(e) = self.ring.submit_and_wait(want) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(TransportError::Write(e));
            }
        }
        let cqes: Vec<(u64, i32, u32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        for (data, result, flags) in cqes {
            let Ok(idx) = usize::try_from(data) else {
                continue;
            };
            let Some(f) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
                continue;
            };
            let mut resubmit = false;
            if cqueue::notif(flags) {
                f.notifs = f.notifs.saturating_sub(1);
                self.notifications += 1;
                // The result of a notification carries the "copied" bit.
                if u32::from_ne_bytes(result.to_ne_bytes()) & NOTIF_USAGE_ZC_COPIED != 0 {
                    self.copied += 1;
                }
            } else {
                f.sending = false;
                if cqueue::more(flags) {
                    f.notifs += 1;
                }
                match usize::try_from(result) {
                    Ok(n) => {
                        f.sent += n;
                        self.bytes_sent += n as u64;
                        if n == 0 && f.sent < f.total {
                            self.error.get_or_insert(io::Error::new(
                                io::ErrorKind::WriteZero,
                                "the socket accepted no bytes",
                            ));
                        } else if f.sent < f.total {
                            resubmit = true;
                        }
                    }
                    Err(_) => {
                        let e = io::Error::from_raw_os_error(-result);
                        self.error.get_or_insert(e);
                        // Nothing more will be sent for this frame.
                        f.sent = f.total;
                    }
                }
            }
            if resubmit {
                self.submit(idx)?;
            }
        }
        // Free finished frames (in any order; the kernel keeps TCP order).
        let slots = &mut self.slots;
        let free = &mut self.free;
        self.order.retain(|&i| {
            let done = slots[i].as_ref().is_none_or(|f| f.is_done());
            if done {
                slots[i] = None;
                free.push(i);
            }
            !done
        });
        Ok(())
    }

    fn check(&mut self) -> Result<(), TransportError> {
        match self.error.take() {
            Some(e) => Err(TransportError::Write(e)),
            None => Ok(()),
        }
    }

    /// Waits until every queued frame is sent and released by the kernel.
    pub fn flush(&mut self) -> Result<(), TransportError> {
        while !self.order.is_empty() {
            self.reap(1)?;
        }
        self.check()
    }
}

impl FrameSink for ZcSender {
    fn send_vectored(
        &mut self,
        kind: FrameKind,
        flags: u32,
        parts: &[IoSlice<'_>],
    ) -> Result<(), TransportError> {
        let header = encode_header(kind, flags, parts).map_err(TransportError::Encode)?;
        let ranges = parts.iter().map(|p| (p.as_ptr(), p.len())).collect();
        self.start(header, Vec::new(), ranges)?;
        // The parts are borrowed: wait until the kernel released them.
        self.flush()
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        ZcSender::flush(self)
    }
}

impl Drop for ZcSender {
    fn drop(&mut self) {
        // Buffers must outlive the kernel's use of them.
        while !self.order.is_empty() {
            if self.reap(1).is_err() {
                // The ring is unusable: leak the buffers rather than free
                // memory the kernel may still read.
                for slot in self.slots.drain(..).flatten() {
                    std::mem::forget(slot);
                }
                return;
            }
        }
    }
}

/// Reads a TCP socket through io_uring (`IORING_OP_RECV`), one operation per
/// `read`: the same readiness model as `read(2)`, submitted through the ring.
pub struct UringReader {
    ring: IoUring,
    stream: TcpStream,
}

impl std::fmt::Debug for UringReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringReader")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl UringReader {
    /// A reader on `stream`.
    pub fn new(stream: TcpStream) -> io::Result<UringReader> {
        Ok(UringReader {
            ring: IoUring::new(4)?,
            stream,
        })
    }
}

impl Read for UringReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let sqe = opcode::Recv::new(types::Fd(self.stream.as_raw_fd()), buf.as_mut_ptr(), len)
            .build()
            .user_data(1);
        // SAFETY: `buf` stays borrowed until this function returns, and it
        // returns only after the receive completed (its CQE was reaped).
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let done = self.ring.completion().next().map(|c| c.result());
            if let Some(r) = done {
                if r == -libc::EINTR {
                    // SAFETY: as above; the retried receive is reaped before returning.
                    unsafe { self.ring.submission().push(&sqe) }
                        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                    continue;
                }
                return usize::try_from(r).map_err(|_| io::Error::from_raw_os_error(-r));
            }
        }
    }
}
