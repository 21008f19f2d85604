//! The destination side: receive pages into a prepared VM, verify, take over.

mod workers;

use std::io::IoSlice;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Receiver;
use ferry_transport::{
    FrameHeader, FrameKind, FrameSink, FrameSource, Lanes, TcpFrameConnection, HEADER_LEN,
};
use tracing::{info, warn};

use crate::digest::PageHashes;
use crate::encode::{EncodingCounts, PAGE_SIZE};
use crate::error::MigrationError;
use crate::layout::MemoryLayout;
use crate::options::DestinationOptions;
use crate::protocol::{self, Hello, HelloAck, RoundEnd, Running, STREAM_VERSION};
use crate::summary::DestinationSummary;
use crate::vm::{MigratableVm, VmOpError};
use crate::wire::{verify_prefixed, Checked, FrameIn, UncheckedTcp, PREFIX_LEN};
use workers::{run_worker, DecodeContext, Job};

/// Receives one migration.
#[derive(Debug)]
pub struct DestinationMigration;

impl DestinationMigration {
    /// Receive a migration over one TCP connection. `make_vm` creates the
    /// VM for the layout the source announces: paused, memory zeroed and
    /// populated (e.g. `ferry_vm::Vm::incoming`). On `Ok` the guest runs in
    /// the returned VM. On `Err` the VM (if made) was never resumed and is
    /// dropped; the source was told why.
    pub fn accept<V: MigratableVm>(
        conn: TcpFrameConnection,
        opts: &DestinationOptions,
        make_vm: impl FnOnce(&MemoryLayout) -> Result<V, VmOpError>,
    ) -> Result<(V, DestinationSummary), MigrationError> {
        let ferry_transport::FrameConnection { reader, mut writer } = conn;
        let stream = reader.into_inner();
        let _ = stream.set_read_timeout(Some(opts.idle_timeout));
        // Page batch checksums are verified on the decoder threads.
        Self::receive_from(&mut writer, UncheckedTcp(stream), opts, make_vm)
    }

    /// Receive a migration over a session of ferry lanes (see
    /// [`crate::SourceMigration::run_lanes`]: lane 0 carries everything).
    pub fn accept_lanes<V: MigratableVm>(
        lanes: Lanes,
        opts: &DestinationOptions,
        make_vm: impl FnOnce(&MemoryLayout) -> Result<V, VmOpError>,
    ) -> Result<(V, DestinationSummary), MigrationError> {
        let (control, closers) = crate::source::control_lane(lanes)?;
        let (_, mut reader, mut writer) = control.into_parts();
        let result = Self::accept_over(&mut writer, &mut reader, opts, make_vm);
        if result.is_err() {
            for closer in closers {
                closer.close();
            }
        }
        result
    }

    /// Receive a migration over any frame sink/source pair.
    pub fn accept_over<V: MigratableVm>(
        sink: &mut impl FrameSink,
        source: &mut impl FrameSource,
        opts: &DestinationOptions,
        make_vm: impl FnOnce(&MemoryLayout) -> Result<V, VmOpError>,
    ) -> Result<(V, DestinationSummary), MigrationError> {
        Self::receive_from(sink, Checked(source), opts, make_vm)
    }

    fn receive_from<V: MigratableVm>(
        sink: &mut impl FrameSink,
        source: impl FrameIn,
        opts: &DestinationOptions,
        make_vm: impl FnOnce(&MemoryLayout) -> Result<V, VmOpError>,
    ) -> Result<(V, DestinationSummary), MigrationError> {
        let mut receiver = Receiving {
            sink,
            source,
            opts,
            wire_bytes: 0,
            started: Instant::now(),
        };
        let result = receiver.receive(make_vm);
        if let Err(e) = &result {
            warn!(error = %e, "incoming migration failed");
            if !matches!(e, MigrationError::PeerAborted(_)) {
                let reason = protocol::encode_reason(&e.to_string());
                let _ = receiver
                    .sink
                    .send_vectored(FrameKind::Abort, 0, &[IoSlice::new(&reason)]);
                let _ = receiver.sink.flush();
            }
        }
        result
    }
}

struct Receiving<'a, S: FrameSink, R: FrameIn> {
    sink: &'a mut S,
    source: R,
    opts: &'a DestinationOptions,
    wire_bytes: u64,
    started: Instant,
}

/// Decoded-batch results the receiving thread still waits for.
struct InFlight<'r> {
    results: &'r Receiver<Result<EncodingCounts, MigrationError>>,
    outstanding: usize,
    counts: EncodingCounts,
}

impl InFlight<'_> {
    /// Collect finished batches without blocking; fail on the first error.
    fn poll(&mut self) -> Result<(), MigrationError> {
        while let Ok(r) = self.results.try_recv() {
            self.finish(r)?;
        }
        Ok(())
    }

    /// Wait until every batch sent to the workers is written.
    fn drain(&mut self) -> Result<(), MigrationError> {
        while self.outstanding > 0 {
            let r = self
                .results
                .recv()
                .map_err(|_| MigrationError::WorkerPanicked)?;
            self.finish(r)?;
        }
        Ok(())
    }

    fn finish(&mut self, r: Result<EncodingCounts, MigrationError>) -> Result<(), MigrationError> {
        self.outstanding -= 1;
        self.counts.add(&r?);
        Ok(())
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl<S: FrameSink, R: FrameIn> Receiving<'_, S, R> {
    fn send(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), MigrationError> {
        self.sink
            .send_vectored(kind, 0, &[IoSlice::new(payload)])
            .map_err(MigrationError::Send)?;
        self.sink.flush().map_err(MigrationError::Send)
    }

    fn recv(
        &mut self,
        buf: &mut Vec<u8>,
        during: &'static str,
    ) -> Result<FrameKind, MigrationError> {
        match self.recv_maybe_unchecked(buf, during)? {
            (kind, None) => Ok(kind),
            (_, Some(header)) => {
                verify_prefixed(&header, buf).map_err(MigrationError::CorruptFrame)?;
                buf.drain(..PREFIX_LEN);
                Ok(header.kind)
            }
        }
    }

    /// The next frame. Page batches may come back unverified (with the
    /// header to verify them against, on a decoder thread); every other
    /// kind is verified here.
    fn recv_maybe_unchecked(
        &mut self,
        buf: &mut Vec<u8>,
        during: &'static str,
    ) -> Result<(FrameKind, Option<FrameHeader>), MigrationError> {
        let (header, verified) = self
            .source
            .recv(buf)
            .map_err(|e| MigrationError::from_receive(e, during))?;
        let prefix = if verified { 0 } else { PREFIX_LEN };
        self.wire_bytes += (HEADER_LEN + buf.len() - prefix) as u64;
        if !verified {
            if header.kind == FrameKind::PageBatch {
                return Ok((header.kind, Some(header)));
            }
            verify_prefixed(&header, buf).map_err(MigrationError::CorruptFrame)?;
            buf.drain(..PREFIX_LEN);
        }
        if header.kind == FrameKind::Abort {
            return Err(MigrationError::PeerAborted(protocol::decode_reason(buf)));
        }
        Ok((header.kind, None))
    }

    fn receive<V: MigratableVm>(
        &mut self,
        make_vm: impl FnOnce(&MemoryLayout) -> Result<V, VmOpError>,
    ) -> Result<(V, DestinationSummary), MigrationError> {
        let mut buf = Vec::new();
        let kind = self.recv(&mut buf, "the handshake")?;
        if kind != FrameKind::Hello {
            return Err(MigrationError::UnexpectedFrame {
                expected: "Hello",
                got: kind,
            });
        }
        let hello = Hello::decode(&buf).map_err(MigrationError::Message)?;
        if hello.stream_version != STREAM_VERSION {
            return Err(MigrationError::VersionMismatch {
                ours: STREAM_VERSION,
                theirs: hello.stream_version,
            });
        }
        if hello.page_size as usize != PAGE_SIZE {
            return Err(MigrationError::Message(protocol::MessageError {
                message: "Hello",
                problem: format!(
                    "page size {} (only {PAGE_SIZE} is supported)",
                    hello.page_size
                ),
            }));
        }
        let layout = hello.layout;
        layout.validate().map_err(MigrationError::Layout)?;
        let vm = make_vm(&layout).map_err(MigrationError::MakeVm)?;
        layout
            .check_covered_by(vm.memory())
            .map_err(MigrationError::Layout)?;
        let features = hello.features & protocol::SUPPORTED_FEATURES;
        let ack = HelloAck {
            stream_version: STREAM_VERSION,
            features,
        };
        self.send(FrameKind::HelloAck, &ack.encode())?;
        info!(pages = layout.pages(), "incoming migration accepted");

        let hashes = PageHashes::new(layout.page_index_end());
        let ctx = DecodeContext {
            memory: vm.memory(),
            hashes: &hashes,
            page_index_end: layout.page_index_end(),
            features,
        };
        let workers = self.opts.workers.max(1);
        let outcome = std::thread::scope(|scope| {
            let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(4 * workers);
            let (res_tx, res_rx) = crossbeam_channel::unbounded();
            let (free_tx, free_rx) = crossbeam_channel::bounded::<Vec<u8>>(8 * workers);
            for i in 0..workers {
                let (ctx, jobs, out, free) =
                    (&ctx, job_rx.clone(), res_tx.clone(), free_tx.clone());
                std::thread::Builder::new()
                    .name(format!("ferry-decode-{i}"))
                    .spawn_scoped(scope, move || run_worker(ctx, &jobs, &out, &free))
                    .expect("spawn a decoder thread");
            }
            drop(res_tx);
            let mut inflight = InFlight {
                results: &res_rx,
                outstanding: 0,
                counts: EncodingCounts::default(),
            };
            let r = self.stream(&mut buf, &job_tx, &free_rx, &mut inflight);
            drop(job_tx);
            let counts = inflight.counts;
            drop(res_rx);
            r.map(|(rounds, state, digest)| (rounds, state, digest, counts))
        });
        let (rounds, state, source_digest, counts) = outcome?;

        let t_verify = Instant::now();
        let digest = hashes.digest(&layout);
        let verify = t_verify.elapsed();
        if digest != source_digest {
            return Err(MigrationError::DigestMismatch {
                source_digest,
                destination_digest: digest,
            });
        }
        let t_restore = Instant::now();
        vm.restore_state(&state)
            .map_err(MigrationError::RestoreState)?;
        let restore = t_restore.elapsed();
        self.send(FrameKind::Ready, &protocol::encode_u64(digest))?;

        let kind = self.recv(&mut buf, "waiting for Go")?;
        if kind != FrameKind::Go {
            return Err(MigrationError::UnexpectedFrame {
                expected: "Go",
                got: kind,
            });
        }
        let t_go = Instant::now();
        vm.resume().map_err(MigrationError::Resume)?;
        let resumed_at = unix_ns();
        let running = Running {
            resumed_at_unix_ns: resumed_at,
            verify_ns: nanos(verify),
            restore_ns: nanos(restore),
            resume_ns: nanos(t_go.elapsed()),
        };
        // The guest runs here now, whatever happens to this message.
        if let Err(e) = self.send(FrameKind::Running, &running.encode()) {
            warn!(error = %e, "could not tell the source the guest runs here");
        }
        info!("incoming migration completed; guest running");
        Ok((
            vm,
            DestinationSummary {
                rounds,
                pages: counts,
                wire_bytes: self.wire_bytes,
                memory_digest: digest,
                resumed_at_unix_ns: resumed_at,
                verify,
                restore,
                total: self.started.elapsed(),
            },
        ))
    }

    /// Receive rounds until the Digest: returns (rounds, state blob, the
    /// source's digest), with every page written.
    fn stream(
        &mut self,
        buf: &mut Vec<u8>,
        jobs: &crossbeam_channel::Sender<Job>,
        free: &Receiver<Vec<u8>>,
        inflight: &mut InFlight<'_>,
    ) -> Result<(u32, Vec<u8>, u64), MigrationError> {
        let mut rounds = 0u32;
        let mut state = None;
        loop {
            let (kind, unverified) = self.recv_maybe_unchecked(buf, "the page stream")?;
            match kind {
                FrameKind::PageBatch => {
                    inflight.poll()?;
                    let next = free.try_recv().unwrap_or_default();
                    let batch = std::mem::replace(buf, next);
                    jobs.send(Job { unverified, batch })
                        .map_err(|_| MigrationError::WorkerPanicked)?;
                    inflight.outstanding += 1;
                }
                FrameKind::RoundEnd => {
                    let end = RoundEnd::decode(buf).map_err(MigrationError::Message)?;
                    // Barrier: a page of the next round must not overtake
                    // its copy from this round.
                    inflight.drain()?;
                    if end.round != rounds {
                        return Err(MigrationError::Message(protocol::MessageError {
                            message: "RoundEnd",
                            problem: format!(
                                "round {} after round {}",
                                end.round,
                                rounds.wrapping_sub(1)
                            ),
                        }));
                    }
                    rounds += 1;
                }
                FrameKind::VcpuState => {
                    if buf.len() > protocol::MAX_STATE_BYTES {
                        return Err(MigrationError::Message(protocol::MessageError {
                            message: "VcpuState",
                            problem: format!(
                                "{} bytes (limit {})",
                                buf.len(),
                                protocol::MAX_STATE_BYTES
                            ),
                        }));
                    }
                    state = Some(std::mem::take(buf));
                }
                FrameKind::Digest => {
                    let digest =
                        protocol::decode_u64("Digest", buf).map_err(MigrationError::Message)?;
                    inflight.drain()?;
                    let state = state.take().ok_or(MigrationError::UnexpectedFrame {
                        expected: "VcpuState",
                        got: FrameKind::Digest,
                    })?;
                    return Ok((rounds, state, digest));
                }
                other => {
                    return Err(MigrationError::UnexpectedFrame {
                        expected: "PageBatch, RoundEnd, VcpuState or Digest",
                        got: other,
                    })
                }
            }
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
