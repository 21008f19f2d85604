//! The source side: rounds, stop-and-copy, handover.

mod inbox;
mod workers;

use std::io::IoSlice;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ferry_dirtylog::{DirtyBitmap, DirtyLog, Reprotect};
use ferry_transport::lanes::{LaneCloser, TokenBucket};
use ferry_transport::{
    FrameConnection, FrameKind, FrameSink, FrameSource, TcpFrameConnection, TransportError,
    HEADER_LEN,
};
use ferry_transport::{Lane, Lanes};
use tracing::{debug, info, warn};

use crate::convergence::{ConvergenceController, Decision, RoundMeasurement};
use crate::digest::PageHashes;
use crate::encode::{EncodingCounts, XorDeltaCache, PAGE_SIZE};
use crate::error::MigrationError;
use crate::layout::MemoryLayout;
use crate::options::MigrationOptions;
use crate::progress::{HandoverStep, ProgressEvent};
use crate::protocol::{self, Hello, HelloAck, RoundEnd, Running, STREAM_VERSION};
use crate::summary::{DowntimeBreakdown, MigrationSummary};
use crate::vm::MigratableVm;
use crate::wire;
use inbox::Inbox;
use workers::{run_worker, Chunk, WorkerContext, WorkerOutput, CHUNK_WORDS};

/// How long a failed send waits for the destination's Abort reason.
const ABORT_GRACE: Duration = Duration::from_millis(200);

/// How often a round reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Migrates one VM away. See the crate docs for the protocol.
pub struct SourceMigration {
    vm: Arc<dyn MigratableVm>,
    opts: MigrationOptions,
}

impl std::fmt::Debug for SourceMigration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceMigration")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl SourceMigration {
    /// A migration of `vm` (running) with `opts`.
    pub fn new(vm: Arc<dyn MigratableVm>, opts: MigrationOptions) -> Self {
        Self { vm, opts }
    }

    /// Migrate over one TCP connection to a destination, reporting progress
    /// to `progress` (called on this thread).
    ///
    /// On `Ok` the guest runs on the destination and is paused here (the
    /// caller should discard it). On `Err` the guest runs here again, except
    /// for [`MigrationError::InDoubt`], where it stays paused.
    pub fn run(
        self,
        conn: TcpFrameConnection,
        progress: impl FnMut(ProgressEvent),
    ) -> Result<MigrationSummary, MigrationError> {
        let closer = conn.writer.get_ref().try_clone().ok();
        let raw = conn.writer.get_ref().try_clone().ok();
        let FrameConnection { reader, writer } = conn;
        let result = self.run_inner(writer, reader, raw, progress);
        if let Some(stream) = closer {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        result
    }

    /// Migrate over a session of ferry lanes (plaintext or mutual TLS, see
    /// `ferry_transport::LaneOptions`). All frames travel on lane 0 (the
    /// control lane); further lanes are closed unused: striping pages over
    /// lanes is not implemented yet, so open one lane.
    pub fn run_lanes(
        self,
        lanes: Lanes,
        progress: impl FnMut(ProgressEvent),
    ) -> Result<MigrationSummary, MigrationError> {
        let (control, closers) = control_lane(lanes)?;
        let (_, reader, writer) = control.into_parts();
        let result = self.run_over(writer, reader, progress);
        for closer in closers {
            closer.close();
        }
        result
    }

    /// Migrate over any frame sink/source pair (the seam for lanes, TLS and
    /// other transports). The reader is consumed by a thread that ends when
    /// the source fails or closes; close the underlying connection after
    /// this returns.
    pub fn run_over<W, R>(
        self,
        sink: W,
        source: R,
        progress: impl FnMut(ProgressEvent),
    ) -> Result<MigrationSummary, MigrationError>
    where
        W: FrameSink,
        R: FrameSource + Send + 'static,
    {
        self.run_inner(sink, source, None, progress)
    }

    /// `raw`: the socket under `sink` when it is plain TCP, for page frames
    /// whose headers the encoder threads build (see `crate::wire`).
    fn run_inner<W, R>(
        self,
        mut sink: W,
        source: R,
        raw: Option<TcpStream>,
        mut progress: impl FnMut(ProgressEvent),
    ) -> Result<MigrationSummary, MigrationError>
    where
        W: FrameSink,
        R: FrameSource + Send + 'static,
    {
        let inbox = Inbox::spawn(source);
        let mut session = Session {
            vm: &*self.vm,
            opts: &self.opts,
            sink: &mut sink,
            raw,
            inbox: &inbox,
            bucket: self.opts.max_bandwidth.map(TokenBucket::with_rate),
            wire_bytes: 0,
            paused: false,
            go_sent: false,
            xor_delta: false,
            started: Instant::now(),
        };
        let result = session.migrate(&mut progress);
        if let Err(e) = &result {
            session.recover(e, &mut progress);
        }
        // The inbox thread ends when the caller closes the connection.
        result
    }
}

/// State of one running migration.
struct Session<'a, W: FrameSink> {
    vm: &'a dyn MigratableVm,
    opts: &'a MigrationOptions,
    sink: &'a mut W,
    /// The plain TCP socket under `sink`, if that is what it is.
    raw: Option<TcpStream>,
    inbox: &'a Inbox,
    bucket: Option<TokenBucket>,
    wire_bytes: u64,
    paused: bool,
    go_sent: bool,
    /// XOR deltas were negotiated.
    xor_delta: bool,
    started: Instant,
}

/// Totals of one round.
#[derive(Debug, Default)]
struct RoundTotals {
    pages: u64,
    counts: EncodingCounts,
    wire_bytes: u64,
}

/// The channels to and from the encoder threads.
struct Pipeline<'a> {
    jobs: &'a Sender<Chunk>,
    results: &'a Receiver<WorkerOutput>,
    /// Sent batch buffers go back to the encoders.
    free: &'a Sender<Vec<u8>>,
}

/// How a round is sent.
#[derive(Debug, Clone, Copy)]
struct RoundMode {
    round: u32,
    reprotect: bool,
    force: bool,
    use_delta: bool,
    /// Abort at the deadline while sending (live rounds only).
    deadline: Option<Duration>,
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl<W: FrameSink> Session<'_, W> {
    fn send(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), MigrationError> {
        if let Err(e) = self.sink.send_vectored(kind, 0, &[IoSlice::new(payload)]) {
            return Err(self.send_failed(e));
        }
        self.sent(HEADER_LEN + payload.len());
        Ok(())
    }

    /// Send a page batch; `sealed`: `bytes` is a complete frame the
    /// encoder built for the plain TCP socket.
    fn send_batch(&mut self, sealed: bool, bytes: &[u8]) -> Result<(), MigrationError> {
        match (&mut self.raw, sealed) {
            (Some(stream), true) => {
                if let Err(e) = wire::write_sealed(stream, bytes) {
                    return Err(self.send_failed(TransportError::Write(e)));
                }
                self.sent(bytes.len());
                Ok(())
            }
            _ => self.send(FrameKind::PageBatch, bytes),
        }
    }

    fn sent(&mut self, bytes: usize) {
        self.wire_bytes += bytes as u64;
        if let Some(bucket) = &self.bucket {
            bucket.charge(bytes);
        }
    }

    /// A destination that gives up says why before it closes: prefer its
    /// reason over the broken pipe.
    fn send_failed(&self, e: TransportError) -> MigrationError {
        match self.inbox.abort_reason(ABORT_GRACE) {
            Some(reason) => MigrationError::PeerAborted(reason),
            None => MigrationError::Send(e),
        }
    }

    /// Put things back after a failure: tell the peer, resume the guest
    /// unless GO was sent, drop the throttle.
    fn recover(&mut self, error: &MigrationError, progress: &mut impl FnMut(ProgressEvent)) {
        warn!(%error, "migration failed");
        let _ = self.send(
            FrameKind::Abort,
            &protocol::encode_reason(&error.to_string()),
        );
        let _ = self.sink.flush();
        if self.go_sent {
            return;
        }
        self.vm.set_throttle(0);
        if self.paused {
            match self.vm.resume() {
                Ok(()) => self.paused = false,
                Err(e) => warn!(error = %e, "could not resume the guest after a failed migration"),
            }
        }
        progress(ProgressEvent::Abandoned {
            reason: error.to_string(),
        });
    }

    fn migrate(
        &mut self,
        progress: &mut impl FnMut(ProgressEvent),
    ) -> Result<MigrationSummary, MigrationError> {
        let layout = MemoryLayout::of(self.vm.memory());
        layout.validate().map_err(MigrationError::Layout)?;
        let features = self.handshake(&layout)?;

        let mut log = self
            .vm
            .dirty_log()
            .map_err(MigrationError::CreateDirtyLog)?;
        log.start().map_err(MigrationError::DirtyLog)?;
        let dirty_log_name = log.name();
        let log = Mutex::new(log);
        let result = self.migrate_with_log(&layout, &log, dirty_log_name, features, progress);
        let mut log = log.into_inner().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = log.stop() {
            warn!(error = %e, "could not stop the dirty log");
        }
        result
    }

    /// Hello/HelloAck; returns the features both sides use.
    fn handshake(&mut self, layout: &MemoryLayout) -> Result<u64, MigrationError> {
        let mut offered = 0;
        if self.opts.compress {
            offered |= protocol::FEATURE_LZ4;
        }
        if self.opts.xor_cache_bytes >= PAGE_SIZE {
            offered |= protocol::FEATURE_XOR_DELTA;
        }
        self.send(
            FrameKind::Hello,
            &Hello::new(layout.clone(), offered).encode(),
        )?;
        self.sink.flush().map_err(MigrationError::Send)?;
        let ack = self
            .inbox
            .expect(FrameKind::HelloAck, "HelloAck", self.opts.handover_timeout)?;
        let ack = HelloAck::decode(&ack).map_err(MigrationError::Message)?;
        if ack.stream_version != STREAM_VERSION {
            return Err(MigrationError::VersionMismatch {
                ours: STREAM_VERSION,
                theirs: ack.stream_version,
            });
        }
        Ok(ack.features & offered)
    }

    fn migrate_with_log(
        &mut self,
        layout: &MemoryLayout,
        log: &Mutex<Box<dyn DirtyLog>>,
        dirty_log: &'static str,
        features: u64,
        progress: &mut impl FnMut(ProgressEvent),
    ) -> Result<MigrationSummary, MigrationError> {
        self.xor_delta = features & protocol::FEATURE_XOR_DELTA != 0;
        let index_end = log.lock().unwrap_or_else(|p| p.into_inner()).pages();
        let hashes = PageHashes::new(layout.page_index_end().max(index_end as u64));
        let cache = XorDeltaCache::new(self.opts.xor_cache_bytes);
        let cancel = AtomicBool::new(false);
        let memory = self.vm.memory();
        let workers = self.opts.workers.max(1);
        let (free_tx, free_rx) = crossbeam_channel::bounded::<Vec<u8>>(8 * workers);
        let ctx = WorkerContext {
            memory,
            log,
            hashes: &hashes,
            cache: &cache,
            batch_bytes: self.opts.batch_bytes.clamp(PAGE_SIZE, 16 << 20),
            cancel: &cancel,
            free: &free_rx,
            frame_headers: self.raw.is_some(),
            lz4: features & protocol::FEATURE_LZ4 != 0,
        };
        progress(ProgressEvent::Started {
            pages: layout.pages(),
            guest_bytes: layout.bytes(),
            dirty_log,
            workers,
        });
        info!(
            pages = layout.pages(),
            dirty_log, workers, "migration started"
        );
        std::thread::scope(|scope| {
            let (job_tx, job_rx) = crossbeam_channel::unbounded::<Chunk>();
            let (out_tx, out_rx) = crossbeam_channel::bounded::<WorkerOutput>(4 * workers);
            for i in 0..workers {
                let (ctx, jobs, out) = (&ctx, job_rx.clone(), out_tx.clone());
                std::thread::Builder::new()
                    .name(format!("ferry-encode-{i}"))
                    .spawn_scoped(scope, move || run_worker(ctx, &jobs, &out))
                    .expect("spawn an encoder thread");
            }
            drop(out_tx);
            let pipeline = Pipeline {
                jobs: &job_tx,
                results: &out_rx,
                free: &free_tx,
            };
            let result = self.rounds(layout, log, &hashes, dirty_log, &pipeline, progress);
            cancel.store(true, Ordering::Relaxed);
            drop(job_tx);
            drop(out_rx);
            result
        })
    }

    fn rounds(
        &mut self,
        layout: &MemoryLayout,
        log: &Mutex<Box<dyn DirtyLog>>,
        hashes: &PageHashes,
        dirty_log: &'static str,
        pipeline: &Pipeline<'_>,
        progress: &mut impl FnMut(ProgressEvent),
    ) -> Result<MigrationSummary, MigrationError> {
        let index_end = log.lock().unwrap_or_else(|p| p.into_inner()).pages();
        let mut dirty = DirtyBitmap::new(index_end);
        // Round 0: every page. A backend may report (and expect to
        // re-protect) pages already; merge them so they are re-protected.
        self.collect(log, &mut dirty, Reprotect::Deferred)?;
        for r in &layout.regions {
            let end = usize::try_from(r.end_page())
                .unwrap_or(usize::MAX)
                .min(index_end);
            let start = usize::try_from(r.first_page())
                .unwrap_or(usize::MAX)
                .min(end);
            dirty.set_range(start, end);
        }
        let mut controller = ConvergenceController::new(self.opts.convergence);
        let mut guest_pages = 0u64;
        let mut counts = EncodingCounts::default();
        let mut round = 0u32;
        let mut max_throttle = 0u8;
        loop {
            let throttle = controller.throttle();
            let t0 = Instant::now();
            let mode = RoundMode {
                round,
                reprotect: true,
                force: round == 0,
                use_delta: self.xor_delta && round > 0,
                deadline: controller.policy().deadline,
            };
            let totals = self.send_round(&dirty, mode, pipeline, progress)?;
            let duration = t0.elapsed();
            guest_pages += totals.pages;
            counts.add(&totals.counts);
            dirty.clear();
            self.collect(log, &mut dirty, Reprotect::Deferred)?;
            let dirty_pages = dirty.count_ones() as u64;
            let measurement = RoundMeasurement {
                duration,
                pages_sent: totals.counts.sent(),
                wire_bytes: totals.wire_bytes,
                dirty_pages,
                elapsed: self.started.elapsed(),
            };
            let assessment = controller.assess(&measurement);
            debug!(round, ?measurement, ?assessment, "round finished");
            progress(ProgressEvent::RoundFinished {
                round,
                pages: totals.pages,
                encodings: totals.counts,
                wire_bytes: totals.wire_bytes,
                duration,
                dirty_pages,
                throttle_percent: throttle,
                assessment: assessment.into(),
            });
            round += 1;
            match assessment.decision {
                Decision::StopAndCopy => break,
                Decision::Continue => {}
                Decision::Throttle { percent } => {
                    info!(percent, "auto-converge: throttling the guest");
                    self.vm.set_throttle(percent);
                    max_throttle = max_throttle.max(percent);
                }
                Decision::GiveUp => {
                    return Err(MigrationError::DeadlineExceeded {
                        deadline: controller.policy().deadline.unwrap_or_default(),
                        rounds: round,
                        dirty_pages,
                    })
                }
            }
        }

        // Stop-and-copy.
        let paused_at = unix_ns();
        let t_pause = Instant::now();
        self.vm.pause().map_err(MigrationError::Pause)?;
        self.paused = true;
        let pause = t_pause.elapsed();
        let t_collect = Instant::now();
        self.collect(log, &mut dirty, Reprotect::Never)?;
        let final_collect = t_collect.elapsed();
        progress(ProgressEvent::StopAndCopy {
            dirty_pages: dirty.count_ones() as u64,
        });
        let t_final = Instant::now();
        let mode = RoundMode {
            round,
            reprotect: false,
            force: false,
            use_delta: self.xor_delta,
            deadline: None,
        };
        let totals = self.send_round(&dirty, mode, pipeline, progress)?;
        guest_pages += totals.pages;
        counts.add(&totals.counts);
        round += 1;
        let final_pages = t_final.elapsed();

        let t_state = Instant::now();
        let state = self.vm.save_state().map_err(MigrationError::SaveState)?;
        self.send(FrameKind::VcpuState, &state)?;
        let digest = hashes.digest(layout);
        self.send(FrameKind::Digest, &protocol::encode_u64(digest))?;
        self.sink.flush().map_err(MigrationError::Send)?;
        let state_time = t_state.elapsed();
        progress(ProgressEvent::Handover {
            step: HandoverStep::StateSent,
        });

        let t_ready = Instant::now();
        let ready = self
            .inbox
            .expect(FrameKind::Ready, "Ready", self.opts.handover_timeout)?;
        let ready_wait = t_ready.elapsed();
        let theirs = protocol::decode_u64("Ready", &ready).map_err(MigrationError::Message)?;
        if theirs != digest {
            return Err(MigrationError::DigestMismatch {
                source_digest: digest,
                destination_digest: theirs,
            });
        }
        progress(ProgressEvent::Handover {
            step: HandoverStep::Ready,
        });
        self.send(FrameKind::Go, &[])?;
        self.sink.flush().map_err(MigrationError::Send)?;
        self.go_sent = true;
        progress(ProgressEvent::Handover {
            step: HandoverStep::Go,
        });
        let running = self
            .inbox
            .expect(FrameKind::Running, "Running", self.opts.handover_timeout)
            .and_then(|p| Running::decode(&p).map_err(MigrationError::Message))
            .map_err(|e| MigrationError::InDoubt {
                reason: error_chain(&e),
            })?;
        progress(ProgressEvent::Handover {
            step: HandoverStep::Running,
        });
        self.vm.set_throttle(0);

        let total = self.started.elapsed();
        let downtime = Duration::from_nanos(running.resumed_at_unix_ns.saturating_sub(paused_at));
        let before_ready = pause + final_collect + final_pages + state_time + ready_wait;
        let summary = MigrationSummary {
            rounds: round,
            total,
            downtime,
            downtime_parts: DowntimeBreakdown {
                pause,
                final_collect,
                final_pages,
                state: state_time,
                ready_wait,
                dest_verify: Duration::from_nanos(running.verify_ns),
                dest_restore: Duration::from_nanos(running.restore_ns),
                go_to_resume: downtime.saturating_sub(before_ready),
                dest_resume: Duration::from_nanos(running.resume_ns),
            },
            guest_bytes: guest_pages * PAGE_SIZE as u64,
            wire_bytes: self.wire_bytes,
            memory_bytes: layout.bytes(),
            pages: counts,
            throughput_bytes_per_sec: layout.bytes() as f64 / total.as_secs_f64().max(1e-9),
            wire_bytes_per_sec: self.wire_bytes as f64 / total.as_secs_f64().max(1e-9),
            max_throttle_percent: max_throttle,
            memory_digest: digest,
            dirty_log,
        };
        info!(rounds = round, ?total, ?downtime, "migration completed");
        progress(ProgressEvent::Completed {
            summary: Box::new(summary.clone()),
        });
        Ok(summary)
    }

    fn collect(
        &self,
        log: &Mutex<Box<dyn DirtyLog>>,
        into: &mut DirtyBitmap,
        mode: Reprotect,
    ) -> Result<(), MigrationError> {
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        log.collect(into, mode).map_err(MigrationError::DirtyLog)?;
        Ok(())
    }

    /// Send the pages set in `dirty` through the encoder threads, then a
    /// RoundEnd.
    fn send_round(
        &mut self,
        dirty: &DirtyBitmap,
        mode: RoundMode,
        pipeline: &Pipeline<'_>,
        progress: &mut impl FnMut(ProgressEvent),
    ) -> Result<RoundTotals, MigrationError> {
        let wire_before = self.wire_bytes;
        let pages_total = dirty.count_ones() as u64;
        let mut chunks = 0usize;
        for (i, words) in dirty.words().chunks(CHUNK_WORDS).enumerate() {
            if words.iter().all(|&w| w == 0) {
                continue;
            }
            let chunk = Chunk {
                first_page: (i * CHUNK_WORDS * 64) as u64,
                words: words.to_vec(),
                reprotect: mode.reprotect,
                force: mode.force,
                use_delta: mode.use_delta,
            };
            pipeline
                .jobs
                .send(chunk)
                .map_err(|_| MigrationError::WorkerPanicked)?;
            chunks += 1;
        }
        let mut totals = RoundTotals::default();
        let mut done = 0usize;
        let mut last_progress = Instant::now();
        while done < chunks {
            match pipeline.results.recv_timeout(PROGRESS_EVERY) {
                Ok(WorkerOutput::Batch { sealed, bytes }) => {
                    self.send_batch(sealed, &bytes)?;
                    let _ = pipeline.free.try_send(bytes);
                }
                Ok(WorkerOutput::ChunkDone { pages, counts }) => {
                    done += 1;
                    totals.pages += pages;
                    totals.counts.add(&counts);
                }
                Ok(WorkerOutput::Failed(e)) => return Err(e),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(MigrationError::WorkerPanicked),
            }
            self.inbox.check("the page stream")?;
            if let Some(deadline) = mode.deadline {
                if self.started.elapsed() >= deadline {
                    return Err(MigrationError::DeadlineExceeded {
                        deadline,
                        rounds: mode.round,
                        dirty_pages: pages_total - totals.pages,
                    });
                }
            }
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                progress(ProgressEvent::RoundProgress {
                    round: mode.round,
                    pages_done: totals.pages,
                    pages_total,
                    wire_bytes: self.wire_bytes,
                });
            }
        }
        let end = RoundEnd {
            round: mode.round,
            pages: totals.counts.sent(),
        };
        self.send(FrameKind::RoundEnd, &end.encode())?;
        totals.wire_bytes = self.wire_bytes - wire_before;
        Ok(totals)
    }
}

/// Lane 0 of a session, and closers for every lane (lane 0 included) to
/// call when the migration is over.
pub(crate) fn control_lane(lanes: Lanes) -> Result<(Lane, Vec<LaneCloser>), MigrationError> {
    let mut lanes = lanes.into_vec();
    let closers = lanes
        .iter()
        .map(Lane::closer)
        .collect::<Result<Vec<_>, _>>()
        .map_err(MigrationError::Send)?;
    if lanes.is_empty() {
        return Err(MigrationError::PeerClosed {
            during: "the lane handshake",
        });
    }
    let control = lanes.swap_remove(0);
    closers.iter().skip(1).for_each(LaneCloser::close);
    Ok((control, closers))
}

/// An error and its sources on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
