//! The source side: rounds, stop-and-copy, handover.

mod inbox;
mod torn;
mod workers;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ferry_dirtylog::{DirtyBitmap, DirtyLog, Reprotect};
use ferry_transport::lanes::{
    FramedSink, LaneCloser, LaneEnds, LaneQueues, LaneSink, OutFrame, QueueOptions, SocketSink,
    TokenBucket,
};
use ferry_transport::{
    FrameConnection, FrameKind, FrameReceive, FrameSink, FrameSource, Lanes, TcpFrameConnection,
    TransportError, VerifiedSource, HEADER_LEN,
};
use tracing::{debug, info, warn};

use crate::convergence::{
    Assessment, ConvergenceController, Decision, OnDeadline, RoundMeasurement,
};
use crate::digest::PageHashes;
use crate::encode::{EncodingCounts, XorDeltaCache, PAGE_SIZE};
use crate::error::MigrationError;
use crate::handover::{self, HandoverOutcome, Reconnect, Unreachable};
use crate::layout::MemoryLayout;
use crate::options::{HookPoint, MigrationOptions};
use crate::progress::{HandoverStep, ProgressEvent};
use crate::protocol::{self, Hello, HelloAck, RoundEnd, Running, STREAM_VERSION};
use crate::steer::MigrationSteering;
use crate::summary::{DowntimeBreakdown, FinalRound, MigrationSummary};
use crate::vm::MigratableVm;
use inbox::Inbox;
use torn::{Collect, TornCheck};
use workers::{group_stretches, run_worker, Chunk, EncodingSelector, WorkerContext, WorkerOutput};

/// Frames a lane's queue holds before its producers wait.
const QUEUE_DEPTH: usize = 4;

/// How long a failed send waits for the destination's Abort reason.
const ABORT_GRACE: Duration = Duration::from_millis(200);

/// A round that sent nothing for this long is stalled, not slow.
const STALLED: Duration = Duration::from_secs(1);

/// How often a round reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Migrates one VM away. See the crate docs for the protocol.
pub struct SourceMigration {
    vm: Arc<dyn MigratableVm>,
    opts: MigrationOptions,
    steering: Option<MigrationSteering>,
    reconnect: Option<Reconnect>,
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
        Self {
            vm,
            opts,
            steering: None,
            reconnect: None,
        }
    }

    /// Lets `steering` (a clone kept elsewhere) cancel or retune this
    /// migration while it runs (see [`crate::steer`]).
    pub fn steered_by(mut self, steering: MigrationSteering) -> Self {
        self.steering = Some(steering);
        self
    }

    /// How to reach the destination again after GO when its answer does not
    /// come: a fresh lane session to the same destination, on which the
    /// source asks whether the guest resumed there (`Resolve`). Without it,
    /// a GO without an answer leaves the handover in doubt at once.
    pub fn resolve_with(mut self, reconnect: Reconnect) -> Self {
        self.reconnect = Some(reconnect);
        self
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
        let FrameConnection { reader, writer } = conn;
        let stream = writer.into_inner();
        let closer = |s: &std::net::TcpStream| s.try_clone().ok().map(LaneCloser::new);
        let (after, queued) = (closer(&stream), closer(&stream));
        let sinks: Vec<Box<dyn LaneSink>> = vec![Box::new(SocketSink::new(stream))];
        let result = self.run_inner(
            sinks,
            queued.into_iter().collect(),
            Box::new(reader),
            None,
            progress,
        );
        if let Some(closer) = after {
            closer.close();
        }
        result
    }

    /// Migrate over a session of ferry lanes (plaintext or mutual TLS, see
    /// `ferry_transport::LaneOptions`). Pages are striped over the lanes by
    /// page index (`ferry_transport::lane_for_page`), each lane written by
    /// its own thread; control frames travel on lane 0. Page batches are
    /// sealed (framed and checksummed) on the encoder threads; on plaintext
    /// lanes their raw pages leave straight from guest memory.
    pub fn run_lanes(
        self,
        lanes: Lanes,
        progress: impl FnMut(ProgressEvent),
    ) -> Result<MigrationSummary, MigrationError> {
        let LaneEnds {
            sinks,
            readers,
            closers,
            bucket,
        } = lanes.into_ends().map_err(MigrationError::Send)?;
        let Some((_, control)) = readers.into_iter().next() else {
            return Err(MigrationError::PeerClosed {
                during: "the lane handshake",
            });
        };
        let queued = closers
            .iter()
            .map(LaneCloser::try_clone)
            .collect::<Result<_, _>>()
            .map_err(MigrationError::Send)?;
        let result = self.run_inner(sinks, queued, control, bucket, progress);
        for closer in closers {
            closer.close();
        }
        result
    }

    /// Migrate over any frame sink/source pair (the seam for other
    /// transports). The reader is consumed by a thread that ends when the
    /// source fails or closes; close the underlying connection after this
    /// returns.
    pub fn run_over<W, R>(
        self,
        sink: W,
        source: R,
        progress: impl FnMut(ProgressEvent),
    ) -> Result<MigrationSummary, MigrationError>
    where
        W: FrameSink + Send + 'static,
        R: FrameSource + Send + 'static,
    {
        let sinks: Vec<Box<dyn LaneSink>> = vec![Box::new(FramedSink(sink))];
        self.run_inner(
            sinks,
            Vec::new(),
            Box::new(VerifiedSource(source)),
            None,
            progress,
        )
    }

    /// `sinks`: how each lane writes; `closers` shut the lanes down when
    /// a writer is stuck at the end; `control`: lane 0's reading half;
    /// `lane_bucket`: a bandwidth cap the lanes came with, used when the
    /// options set none.
    fn run_inner(
        self,
        sinks: Vec<Box<dyn LaneSink>>,
        closers: Vec<LaneCloser>,
        control: Box<dyn FrameReceive>,
        lane_bucket: Option<Arc<TokenBucket>>,
        mut progress: impl FnMut(ProgressEvent),
    ) -> Result<MigrationSummary, MigrationError> {
        let bucket = self
            .opts
            .max_bandwidth
            .map(|r| Arc::new(TokenBucket::with_rate(r)))
            .or(lane_bucket)
            // A steered migration may be capped later: give it a bucket
            // that does not hold anything back until then.
            .or_else(|| {
                self.steering
                    .as_ref()
                    .map(|_| Arc::new(TokenBucket::with_rate(u64::MAX)))
            });
        if let (Some(s), Some(b)) = (&self.steering, &bucket) {
            s.attach_bucket(b.clone());
        }
        let mut queue_opts = QueueOptions::new(QUEUE_DEPTH);
        queue_opts.stall = self.opts.handover_timeout;
        queue_opts.bucket = bucket;
        let out = LaneQueues::spawn(sinks, closers, queue_opts);
        let inbox = Inbox::spawn(control);
        let mut session = Session {
            vm: &*self.vm,
            opts: &self.opts,
            out: &out,
            inbox: &inbox,
            steering: self.steering.as_ref(),
            wire_bytes: 0,
            paused: false,
            go_sent: false,
            xor_delta: false,
            started: Instant::now(),
            migration_id: 0,
            reconnect: self.reconnect.map(|r| Arc::new(Mutex::new(r))),
            pause_bound: None,
        };
        let result = session.migrate(&mut progress);
        if let Err(e) = &result {
            session.recover(e, &mut progress);
        }
        let grace = if result.is_ok() {
            self.opts.handover_timeout
        } else {
            ABORT_GRACE
        };
        out.close(grace);
        // The inbox thread ends when the caller closes the connection.
        result
    }
}

/// State of one running migration.
struct Session<'a> {
    vm: &'a dyn MigratableVm,
    opts: &'a MigrationOptions,
    /// The lanes' writer threads.
    out: &'a LaneQueues,
    inbox: &'a Inbox,
    /// Cancel and retune from outside, when asked for.
    steering: Option<&'a MigrationSteering>,
    /// Bytes queued on the lanes so far.
    wire_bytes: u64,
    paused: bool,
    go_sent: bool,
    /// XOR deltas were negotiated.
    xor_delta: bool,
    started: Instant,
    /// This migration's id (from the Hello).
    migration_id: u64,
    /// Reaches the destination again after GO.
    reconnect: Option<Arc<Mutex<Reconnect>>>,
    /// Set at the pause: when every wait ends.
    pause_bound: Option<PauseBound>,
}

/// The end of every wait once the guest is paused.
#[derive(Debug, Clone, Copy)]
struct PauseBound {
    until: Instant,
    budget: Duration,
    margin: Duration,
}

impl PauseBound {
    fn left(&self) -> Duration {
        self.until.saturating_duration_since(Instant::now())
    }

    fn exceeded(&self, waiting_for: &'static str) -> MigrationError {
        MigrationError::PauseBudgetExceeded {
            budget: self.budget,
            margin: self.margin,
            waiting_for,
        }
    }
}

/// Longest downtime budget a pause bound is computed with (an expected
/// downtime can be unbounded on a link that moved nothing).
const MAX_BUDGET: Duration = Duration::from_secs(3600);

/// Totals of one round.
#[derive(Debug, Default)]
struct RoundTotals {
    pages: u64,
    counts: EncodingCounts,
    wire_bytes: u64,
    /// The encoder threads' time on the round, summed.
    encode_busy: Duration,
}

/// The channels to and from the encoder threads.
struct Pipeline<'a> {
    jobs: &'a Sender<Chunk>,
    results: &'a Receiver<WorkerOutput>,
    /// The encoding choice (reported with each round).
    selector: &'a EncodingSelector,
    /// Encoder threads.
    workers: usize,
}

impl Pipeline<'_> {
    /// The encoders' summed time `busy` as a stretch of wall time, all of
    /// them at work.
    fn encode_time(&self, busy: Duration) -> Duration {
        busy / u32::try_from(self.workers.max(1)).unwrap_or(u32::MAX)
    }
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

/// What the live rounds carry from one to the next.
struct RoundState<'a> {
    log: &'a Mutex<Box<dyn DirtyLog>>,
    hashes: &'a PageHashes,
    /// The pages the next round sends.
    dirty: DirtyBitmap,
    torn: TornCheck,
    /// Pages sent so far, and how.
    guest_pages: u64,
    counts: EncodingCounts,
    /// Pages each vCPU dirtied so far, when the log counts them.
    vcpu_dirty_total: Vec<u64>,
}

/// Which live round [`SourceMigration::live_round`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LiveRoundKind {
    /// A round of the rounds loop: it ends by waiting for the destination
    /// to write it only when the controller would stop after it.
    Loop,
    /// The round after the pre-pause hook: it first collects what the
    /// guest dirtied while the hook ran, and always ends by waiting, so the
    /// pause waits for its own pages only.
    AfterHook,
}

/// A live round sent and measured, not yet reported.
struct LiveRound {
    round: u32,
    totals: RoundTotals,
    measurement: RoundMeasurement,
    /// Pages each vCPU dirtied during the round, when the log counts them.
    vcpu_dirty_pages: Vec<u64>,
    /// Whether it ended waiting until the destination had written it.
    drained: bool,
    /// The throttles in force during the round.
    throttle_percent: u8,
    vcpu_throttles: Vec<u8>,
}

impl LiveRound {
    /// Adds the round's per-vCPU counts to `state` and reports the round
    /// with the decision taken after it.
    fn finish(
        self,
        state: &mut RoundState<'_>,
        assessment: Assessment,
        pipeline: &Pipeline<'_>,
        progress: &mut impl FnMut(ProgressEvent),
    ) {
        add_per_vcpu(&mut state.vcpu_dirty_total, &self.vcpu_dirty_pages);
        let round = self.round;
        let measurement = self.measurement;
        debug!(round, ?measurement, ?assessment, "round finished");
        progress(ProgressEvent::RoundFinished {
            round,
            pages: self.totals.pages,
            encodings: self.totals.counts,
            wire_bytes: self.totals.wire_bytes,
            duration: measurement.duration,
            dirty_pages: measurement.dirty_pages,
            throttle_percent: self.throttle_percent,
            vcpu_throttles: self.vcpu_throttles,
            vcpu_dirty_pages: self.vcpu_dirty_pages,
            assessment: assessment.into(),
            encoding: Box::new(pipeline.selector.decision()),
        });
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Session<'_> {
    /// Queue a control frame on lane 0.
    fn send(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), MigrationError> {
        let until = self.pause_bound.map(|b| b.until);
        let frame = OutFrame::new(kind, 0, payload.to_vec());
        if let Err(e) = self.out.send_control(0, frame, until) {
            if let Some(b) = self.pause_bound.filter(|b| b.left().is_zero()) {
                return Err(b.exceeded("room for a control frame on lane 0"));
            }
            return Err(self.send_failed(e));
        }
        self.wire_bytes += (HEADER_LEN + payload.len()) as u64;
        Ok(())
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
        if !self.go_sent && !error.source_left_paused() {
            self.vm.set_throttle(0);
            if self.paused {
                match self.vm.resume() {
                    Ok(()) => self.paused = false,
                    Err(e) => {
                        warn!(error = %e, "could not resume the guest after a failed migration")
                    }
                }
            }
        }
        // Page batches still queued are dropped so the reason goes out at
        // once; a lane stuck on a peer that stopped reading gets a bounded
        // wait (the guest already runs again here).
        let reason = protocol::encode_reason(&error_chain(error));
        self.out
            .abort(OutFrame::new(FrameKind::Abort, 0, reason), ABORT_GRACE);
        if !self.go_sent {
            progress(ProgressEvent::Abandoned {
                reason: error.to_string(),
            });
        }
    }

    fn migrate(
        &mut self,
        progress: &mut impl FnMut(ProgressEvent),
    ) -> Result<MigrationSummary, MigrationError> {
        let layout = MemoryLayout::of(self.vm.memory());
        layout.validate().map_err(MigrationError::Layout)?;
        let offered = self.send_hello(&layout)?;
        // The dirty log starts while the Hello crosses and the destination
        // prepares (KVM turning logging on for the slots takes ~1 ms here):
        // not after the HelloAck, on the way to the first page.
        let mut log = self
            .vm
            .dirty_log()
            .map_err(MigrationError::CreateDirtyLog)?;
        // Round 0 reads every page, re-protecting each chunk first.
        log.start_full_pass().map_err(MigrationError::DirtyLog)?;
        let log = Mutex::new(log);
        let result = match self.await_hello_ack(offered) {
            Ok(features) => {
                let name = log.lock().unwrap_or_else(|p| p.into_inner()).name();
                self.migrate_with_log(&layout, &log, name, features, progress)
            }
            Err(e) => Err(e),
        };
        let mut log = log.into_inner().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = log.stop() {
            warn!(error = %e, "could not stop the dirty log");
        }
        result
    }

    /// Sends the Hello; returns the features it offered.
    fn send_hello(&mut self, layout: &MemoryLayout) -> Result<u64, MigrationError> {
        let mut offered = 0;
        if self.opts.compress {
            offered |= protocol::FEATURE_LZ4 | protocol::FEATURE_ZSTD;
        }
        if self.opts.xor_cache_bytes_for(layout.bytes()) >= PAGE_SIZE {
            offered |= protocol::FEATURE_XOR_DELTA;
        }
        let vcpus = u32::try_from(self.vm.vcpu_count()).unwrap_or(u32::MAX);
        let hello = Hello::new(layout.clone(), offered, vcpus);
        self.migration_id = hello.migration_id;
        self.send(FrameKind::Hello, &hello.encode())?;
        Ok(offered)
    }

    /// Waits for the HelloAck to the Hello that offered `offered`; returns
    /// the features both sides use.
    fn await_hello_ack(&mut self, offered: u64) -> Result<u64, MigrationError> {
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
        let hashes = PageHashes::with_regions(
            layout.page_index_end().max(index_end as u64),
            &layout.page_ranges(),
        );
        let cache = XorDeltaCache::new(self.opts.xor_cache_bytes_for(layout.bytes()));
        let cancel = AtomicBool::new(false);
        let memory = self.vm.memory();
        let workers = self.opts.workers.max(1);
        let lz4 = features & protocol::FEATURE_LZ4 != 0;
        let zstd = features & protocol::FEATURE_ZSTD != 0;
        let selector = EncodingSelector::new(self.out.cap(), workers, lz4, zstd);
        // Plaintext lanes send raw pages from guest memory (a clone of the
        // memory's region handles keeps it mapped while they are queued);
        // lanes that encrypt copy anyway.
        let in_place = self.out.gathers().then(|| Arc::new(memory.clone()));
        let ctx = WorkerContext {
            memory,
            in_place: in_place.as_ref(),
            log,
            hashes: &hashes,
            cache: &cache,
            batch_bytes: self.opts.batch_bytes.clamp(PAGE_SIZE, 16 << 20),
            cancel: &cancel,
            out: self.out,
            lz4,
            zstd,
            selector: &selector,
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
                selector: &selector,
                workers,
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
        let vcpus = self.vm.vcpu_count().max(1);
        let per_vcpu = self.take_vcpu_dirty_counts(log).is_some();
        let converge = self
            .opts
            .convergence
            .converge
            .resolve(vcpus, per_vcpu)
            .ok_or(MigrationError::DirtyLimitUnsupported { dirty_log })?;
        controller.start(converge, vcpus, per_vcpu);
        info!(%converge, vcpus, "convergence mode");
        let mut state = RoundState {
            log,
            hashes,
            dirty,
            torn: TornCheck::new(index_end),
            guest_pages: 0,
            counts: EncodingCounts::default(),
            vcpu_dirty_total: vec![0u64; if per_vcpu { vcpus } else { 0 }],
        };
        let mut round = 0u32;
        let mut max_throttle = 0u8;
        let mut vcpu_max_throttle = vec![0u8; vcpus];
        let mut expected_downtime;
        // Whether the last round ended waiting for the destination to write
        // it (the pipe then held that round only).
        let mut drained_before = false;
        let (decided, decided_pages) = loop {
            self.steer(&mut controller)?;
            let mode = RoundMode {
                round,
                reprotect: true,
                force: round == 0,
                use_delta: self.xor_delta && round > 0,
                deadline: controller.policy().deadline,
            };
            let live = self.live_round(
                &mut state,
                mode,
                LiveRoundKind::Loop,
                &controller,
                pipeline,
                progress,
            )?;
            // When the pipe held more than this round (the round before did
            // not wait), what the guest dirtied while it emptied is not
            // what a round leaves: one more round, whose end waits only for
            // its own pages, is measured instead.
            let drained = live.drained;
            let one_more = drained && !drained_before;
            drained_before = drained;
            let measurement = live.measurement;
            let mut assessment = controller.assess(&measurement, &live.vcpu_dirty_pages);
            if one_more
                && assessment.decision == Decision::StopAndCopy
                && assessment.expected_downtime > controller.policy().settle_downtime
                && controller
                    .policy()
                    .deadline
                    .is_none_or(|d| measurement.elapsed < d)
            {
                assessment.decision = Decision::Continue;
            }
            expected_downtime = assessment.expected_downtime;
            live.finish(&mut state, assessment, pipeline, progress);
            round += 1;
            match assessment.decision {
                Decision::StopAndCopy => {
                    // Every torn page of the live rounds must be known
                    // before the final set is: it goes out in the final
                    // round, or the destination refuses the handover.
                    if !drained {
                        self.await_round_written(round - 1)?;
                    }
                    break (assessment, measurement.dirty_pages);
                }
                Decision::Continue => {}
                Decision::Throttle { percent } => {
                    info!(percent, "auto-converge: throttling the guest");
                    self.vm.set_throttle(percent);
                    max_throttle = max_throttle.max(percent);
                    vcpu_max_throttle
                        .iter_mut()
                        .for_each(|m| *m = (*m).max(percent));
                }
                Decision::LimitVcpus { max_percent, .. } => {
                    let wanted = controller.vcpu_throttles();
                    info!(
                        ?wanted,
                        "dirty-limit: throttling the fastest-dirtying vCPUs"
                    );
                    for (vcpu, (&t, max)) in wanted.iter().zip(&mut vcpu_max_throttle).enumerate() {
                        self.vm
                            .set_vcpu_throttle(vcpu, t)
                            .map_err(|source| MigrationError::ThrottleVcpu { vcpu, source })?;
                        *max = (*max).max(t);
                    }
                    max_throttle = max_throttle.max(max_percent);
                }
                Decision::GiveUp => {
                    return Err(MigrationError::DeadlineExceeded {
                        deadline: controller.policy().deadline.unwrap_or_default(),
                        rounds: round,
                        dirty_pages: measurement.dirty_pages,
                    })
                }
            }
        };

        if let Some(s) = self.steering {
            s.pausing()?;
        }
        // The hook's agreement comes before the pause: GO follows it, and
        // its time is not the guest's.
        if let Some(hook) = &self.opts.pre_pause {
            if let Err(r) = (hook.0)() {
                if r.keep_paused {
                    self.vm.pause().map_err(MigrationError::Pause)?;
                    self.paused = true;
                }
                return Err(r.into_error(HookPoint::PrePause, self.migration_id));
            }
            // The guest kept dirtying while the hook ran (an etcd
            // compare-and-swap: tens of ms on a busy host). Send the set
            // the rounds decided on plus that in one more live round, so
            // the pause sends only what the guest dirties during this
            // round: the hook's time never becomes pause time.
            let mode = RoundMode {
                round,
                reprotect: true,
                force: false,
                use_delta: self.xor_delta,
                deadline: None,
            };
            let live = self.live_round(
                &mut state,
                mode,
                LiveRoundKind::AfterHook,
                &controller,
                pipeline,
                progress,
            )?;
            // The decision to stop stands: this round only sends what the
            // hook's time added.
            live.finish(&mut state, decided, pipeline, progress);
            round += 1;
        }
        let RoundState {
            mut dirty,
            mut torn,
            mut guest_pages,
            mut counts,
            vcpu_dirty_total,
            ..
        } = state;
        // Stop-and-copy. From here every wait ends by the downtime budget
        // plus the margin: what cannot finish by then is aborted before GO.
        let policy = *controller.policy();
        let budget = match policy.on_deadline {
            OnDeadline::Abort => policy.max_downtime,
            OnDeadline::Force => policy.max_downtime.max(expected_downtime),
        }
        .min(MAX_BUDGET);
        let paused_at = unix_ns();
        let t_pause = Instant::now();
        self.pause_bound = Some(PauseBound {
            until: t_pause + budget + self.opts.pause_margin.min(MAX_BUDGET),
            budget,
            margin: self.opts.pause_margin,
        });
        self.vm.pause().map_err(MigrationError::Pause)?;
        self.paused = true;
        let pause = t_pause.elapsed();
        // The state first: the destination restores it while the last
        // pages are still on their way, not after them.
        let t_state = Instant::now();
        let sections = self.vm.save_sections().map_err(MigrationError::SaveState)?;
        let state = crate::sections::encode(&sections);
        self.send(FrameKind::VcpuState, &state)?;
        let state_time = t_state.elapsed();
        let t_collect = Instant::now();
        self.collect_settling(log, &mut dirty, Collect::Final, round, &mut torn, hashes)?;
        let final_collect = t_collect.elapsed();
        let final_dirty = dirty.count_ones() as u64;
        progress(ProgressEvent::StopAndCopy {
            dirty_pages: final_dirty,
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
        let final_round = FinalRound {
            expected_pages: decided_pages,
            expected_bytes: decided.bytes_left,
            expected_bandwidth_bytes_per_sec: decided.bandwidth_bytes_per_sec,
            expected: decided.expected_downtime,
            pages: final_dirty,
            wire_bytes: totals.wire_bytes,
            encode: pipeline.encode_time(totals.encode_busy),
        };
        let digest = hashes.digest();
        let region_digests = hashes.region_digests();
        let message = protocol::DigestMessage {
            total: digest,
            regions: region_digests.clone(),
        };
        self.send(FrameKind::Digest, &message.encode())?;
        let final_pages = t_final.elapsed();
        progress(ProgressEvent::Handover {
            step: HandoverStep::StateSent,
        });

        let t_ready = Instant::now();
        let digest_sent_at = unix_ns();
        let bound = self.pause_bound.expect("set at the pause");
        let ready = match self.inbox.expect(FrameKind::Ready, "Ready", bound.left()) {
            Err(MigrationError::Timeout { .. }) => return Err(bound.exceeded("Ready")),
            other => other?,
        };
        let ready_wait = t_ready.elapsed();
        let ready_received_at = unix_ns();
        let theirs = protocol::decode_u64("Ready", &ready).map_err(MigrationError::Message)?;
        if theirs != digest {
            return Err(MigrationError::DigestMismatch {
                source_digest: digest,
                destination_digest: theirs,
                differing_regions: Vec::new(),
            });
        }
        progress(ProgressEvent::Handover {
            step: HandoverStep::Ready,
        });
        if let Some(s) = self.steering {
            s.commit()?;
        }
        // Last point where the guest can stay here: a pause past the budget
        // and its margin is not completed.
        if bound.left().is_zero() {
            return Err(bound.exceeded("GO to be sent"));
        }
        // After the last check that may still resume the guest here: once
        // the hook agreed (the VM may belong to the destination now), GO
        // goes out.
        let t_pre_go = Instant::now();
        if let Some(hook) = &self.opts.pre_go {
            (hook.0)().map_err(|r| r.into_error(HookPoint::PreGo, self.migration_id))?;
        }
        let pre_go = t_pre_go.elapsed();
        self.send(FrameKind::Go, &[])?;
        self.go_sent = true;
        progress(ProgressEvent::Handover {
            step: HandoverStep::Go,
        });
        let running = self.outcome_after_go(bound)?;
        progress(ProgressEvent::Handover {
            step: HandoverStep::Running,
        });
        self.vm.set_throttle(0);

        let total = self.started.elapsed();
        let downtime = Duration::from_nanos(running.resumed_at_unix_ns.saturating_sub(paused_at));
        let over_limit = downtime.saturating_sub(policy.max_downtime);
        if !over_limit.is_zero() {
            warn!(
                ?downtime,
                limit = ?policy.max_downtime,
                ?over_limit,
                "the pause exceeded the downtime limit"
            );
        }
        let before_ready = pause + final_collect + final_pages + state_time + ready_wait;
        let summary = MigrationSummary {
            rounds: round,
            total,
            downtime,
            downtime_parts: DowntimeBreakdown {
                pause,
                vcpu_stop_spread: self.vm.pause_spread().unwrap_or_default(),
                final_collect,
                final_pages,
                state: state_time,
                ready_wait,
                dest_pages: Duration::from_nanos(
                    running
                        .pages_written_at_unix_ns
                        .saturating_sub(digest_sent_at),
                ),
                ready_return: Duration::from_nanos(
                    ready_received_at.saturating_sub(running.ready_sent_at_unix_ns),
                ),
                dest_verify: Duration::from_nanos(running.verify_ns),
                dest_restore: Duration::from_nanos(running.restore_ns),
                go_to_resume: downtime.saturating_sub(before_ready),
                dest_resume: Duration::from_nanos(running.resume_ns),
                pre_go,
            },
            guest_bytes: guest_pages * PAGE_SIZE as u64,
            wire_bytes: self.wire_bytes,
            memory_bytes: layout.bytes(),
            pages: counts,
            throughput_bytes_per_sec: layout.bytes() as f64 / total.as_secs_f64().max(1e-9),
            wire_bytes_per_sec: self.wire_bytes as f64 / total.as_secs_f64().max(1e-9),
            max_throttle_percent: max_throttle,
            converge,
            converge_switches: controller.switches().to_vec(),
            vcpu_max_throttle_percent: vcpu_max_throttle,
            vcpu_dirty_pages: vcpu_dirty_total,
            memory_digest: digest,
            region_digests: crate::summary::RegionDigest::list(layout, &region_digests),
            dirty_log,
            downtime_limit: policy.max_downtime,
            over_limit,
            torn_pages_resent: torn.resent(),
            final_round,
        };
        info!(rounds = round, ?total, ?downtime, "migration completed");
        progress(ProgressEvent::Completed {
            summary: Box::new(summary.clone()),
        });
        Ok(summary)
    }

    /// One live round (the guest running): sends `state.dirty`, then
    /// collects into it what the guest dirtied meanwhile. When `kind` says
    /// so (see [`LiveRoundKind`]) it then waits until the destination has
    /// written the round and collects again: a round ends when its pages
    /// are queued, not delivered, and lane queues and socket buffers may
    /// still hold megabytes that the pause would wait for (on a slow link,
    /// tens of milliseconds); the destination writes them while the guest
    /// runs instead.
    fn live_round(
        &mut self,
        state: &mut RoundState<'_>,
        mode: RoundMode,
        kind: LiveRoundKind,
        controller: &ConvergenceController,
        pipeline: &Pipeline<'_>,
        progress: &mut impl FnMut(ProgressEvent),
    ) -> Result<LiveRound, MigrationError> {
        let round = mode.round;
        let throttle_percent = controller.throttle();
        let vcpu_throttles = controller.vcpu_throttles().to_vec();
        let t0 = Instant::now();
        let mut vcpu_dirty_pages = Vec::new();
        if kind == LiveRoundKind::AfterHook {
            self.collect_live(state, &mut vcpu_dirty_pages, round)?;
        }
        let totals = self.send_round(&state.dirty, mode, pipeline, progress)?;
        state.guest_pages += totals.pages;
        state.counts.add(&totals.counts);
        state.dirty.clear();
        // The round after the hook always waits: it collects once, after.
        let wait_always = kind == LiveRoundKind::AfterHook;
        if !wait_always {
            self.collect_live(state, &mut vcpu_dirty_pages, round + 1)?;
        }
        let mut measurement = RoundMeasurement {
            duration: t0.elapsed(),
            pages_read: totals.pages,
            encode_time: pipeline.encode_time(totals.encode_busy),
            pages_sent: totals.counts.sent(),
            wire_bytes: totals.wire_bytes,
            dirty_pages: state.dirty.count_ones() as u64,
            elapsed: self.started.elapsed(),
        };
        let drained = wait_always || controller.would_stop(&measurement);
        if drained {
            self.await_round_written(round)?;
            self.collect_live(state, &mut vcpu_dirty_pages, round + 1)?;
            measurement.duration = t0.elapsed();
            measurement.dirty_pages = state.dirty.count_ones() as u64;
            measurement.elapsed = self.started.elapsed();
        }
        Ok(LiveRound {
            round,
            totals,
            measurement,
            vcpu_dirty_pages,
            drained,
            throttle_percent,
            vcpu_throttles,
        })
    }

    /// Between rounds: a cancel ends the migration, a retune changes the
    /// policy the next decision uses.
    fn steer(&self, controller: &mut ConvergenceController) -> Result<(), MigrationError> {
        let Some(s) = self.steering else {
            return Ok(());
        };
        s.check()?;
        if let Some(r) = s.take_retune() {
            info!(?r, "limits changed while migrating");
            controller.set_policy(r.apply(controller.policy()));
        }
        Ok(())
    }

    /// Before the pause: wait (the guest running) until the destination
    /// reports every page of `round` written. Cancels are honoured while
    /// waiting; a destination that reports nothing for the handover
    /// timeout fails the migration (the guest keeps running here).
    fn await_round_written(&self, round: u32) -> Result<(), MigrationError> {
        let since = Instant::now();
        loop {
            if self.inbox.round_written(round, PROGRESS_EVERY)? {
                return Ok(());
            }
            if let Some(s) = self.steering {
                s.check()?;
            }
            if let Some(e) = self.out.failed() {
                return Err(self.send_failed(e));
            }
            if since.elapsed() >= self.opts.handover_timeout {
                return Err(MigrationError::Timeout {
                    waiting_for: "report that the last round is written",
                    timeout: self.opts.handover_timeout,
                });
            }
        }
    }

    /// After GO: the destination's Running, or its refusal (then the guest
    /// resumes here), or, when neither comes by the pause bound, its answer
    /// to the same question over a fresh connection. Only when it cannot be
    /// reached at all is the handover in doubt.
    fn outcome_after_go(&mut self, bound: PauseBound) -> Result<Running, MigrationError> {
        let silence = match self
            .inbox
            .expect(FrameKind::Running, "Running", bound.left())
        {
            Ok(payload) => match Running::decode(&payload) {
                Ok(running) => return Ok(running),
                Err(e) => MigrationError::Message(e),
            },
            Err(MigrationError::PeerAborted(reason)) => {
                // The destination answers GO with Abort only when it did not
                // resume and never will.
                self.go_sent = false;
                return Err(MigrationError::HandoverRefused { reason });
            }
            Err(e) => e,
        };
        let Some(reconnect) = self.reconnect.clone() else {
            return Err(MigrationError::InDoubt {
                reason: error_chain(&silence),
                migration_id: self.migration_id,
            });
        };
        info!(error = %silence, "no answer to GO: asking the destination over a fresh connection");
        let until = Instant::now() + self.opts.pause_margin.min(MAX_BUDGET);
        match handover::ask(&reconnect, self.migration_id, until) {
            Ok(HandoverOutcome::Resumed(running)) => Ok(running),
            Ok(HandoverOutcome::NotResumed(reason)) => {
                self.go_sent = false;
                Err(MigrationError::HandoverRefused { reason })
            }
            Err(Unreachable(why)) => Err(MigrationError::InDoubt {
                reason: format!(
                    "{}; asking again over a fresh connection failed: {why}",
                    error_chain(&silence)
                ),
                migration_id: self.migration_id,
            }),
        }
    }

    /// Pages each vCPU dirtied since the last call, if the log counts them.
    fn take_vcpu_dirty_counts(&self, log: &Mutex<Box<dyn DirtyLog>>) -> Option<Vec<u64>> {
        log.lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_vcpu_dirty_counts()
    }

    /// [`Self::collect_settling`] (pages re-protected later) into
    /// `state`'s dirty set for live round `round`, adding the pages each
    /// vCPU dirtied meanwhile, if the log counts them, to
    /// `vcpu_dirty_pages`.
    fn collect_live(
        &self,
        state: &mut RoundState<'_>,
        vcpu_dirty_pages: &mut Vec<u64>,
        round: u32,
    ) -> Result<(), MigrationError> {
        self.collect_settling(
            state.log,
            &mut state.dirty,
            Collect::Live,
            round,
            &mut state.torn,
            state.hashes,
        )?;
        if let Some(counts) = self.take_vcpu_dirty_counts(state.log) {
            add_per_vcpu(vcpu_dirty_pages, &counts);
        }
        Ok(())
    }

    /// Collect the set round `round` sends into `into`, settling the torn
    /// pages the destination reported before it (see [`torn`]). A live
    /// collect leaves re-protection to the encoders, chunk by chunk; the
    /// final one (the guest stopped) re-protects nothing.
    fn collect_settling(
        &self,
        log: &Mutex<Box<dyn DirtyLog>>,
        into: &mut DirtyBitmap,
        collect: Collect,
        round: u32,
        torn: &mut TornCheck,
        hashes: &PageHashes,
    ) -> Result<(), MigrationError> {
        let reports = self.inbox.take_torn("the page stream")?;
        let mode = match collect {
            Collect::Live => Reprotect::Deferred,
            Collect::Final => Reprotect::Never,
        };
        // The torn check counts what the log reported only: `into` may
        // already hold pages a settle added (a drained round collects twice,
        // the final collect adds to the last live set).
        let mut reported = DirtyBitmap::new(into.len());
        self.collect(log, &mut reported, mode)?;
        torn.note_dirty(&reported, round);
        into.merge(&reported);
        if !reports.is_empty() {
            debug!(pages = reports.len(), round, "torn pages to send again");
        }
        torn.settle(&reports, into, hashes, collect)
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
        for stretches in group_stretches(dirty.words(), self.out.lanes()) {
            let chunk = Chunk {
                stretches,
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
        let mut last_chunk = Instant::now();
        while done < chunks {
            match pipeline.results.recv_timeout(PROGRESS_EVERY) {
                Ok(WorkerOutput::ChunkDone {
                    pages,
                    counts,
                    wire_bytes,
                    busy,
                }) => {
                    done += 1;
                    totals.pages += pages;
                    totals.encode_busy += busy;
                    totals.counts.add(&counts);
                    self.wire_bytes += wire_bytes;
                    last_chunk = Instant::now();
                }
                Ok(WorkerOutput::Failed(MigrationError::Send(e))) => {
                    return Err(self.send_failed(e))
                }
                Ok(WorkerOutput::Failed(e)) => return Err(e),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(MigrationError::WorkerPanicked),
            }
            self.inbox.check("the page stream")?;
            if let Some(s) = self.steering {
                s.check()?;
            }
            if let Some(e) = self.out.failed() {
                return Err(self.send_failed(e));
            }
            // A destination that stays connected but stops reading would
            // otherwise hold the round (and, in the final round, the paused
            // guest) forever.
            if let Some(b) = self.pause_bound.filter(|b| b.left().is_zero()) {
                return Err(b.exceeded("the last pages to go out"));
            }
            if last_chunk.elapsed() >= self.opts.handover_timeout {
                return Err(MigrationError::Timeout {
                    waiting_for: "room on the lanes (the destination stopped reading)",
                    timeout: self.opts.handover_timeout,
                });
            }
            if let Some(deadline) = mode.deadline {
                if self.started.elapsed() >= deadline {
                    // Not converging means rounds that run but do not
                    // shrink; a first copy that never finished, or a link
                    // that stopped moving, is another story.
                    let stalled_for = last_chunk.elapsed();
                    if mode.round == 0 || stalled_for >= STALLED {
                        return Err(MigrationError::DeadlineDuringRound {
                            deadline,
                            round: mode.round,
                            pages_done: totals.pages,
                            pages_total,
                            stalled_for,
                        });
                    }
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
        // Every lane ends the round behind its own pages of the round.
        let end = RoundEnd {
            round: mode.round,
            pages: totals.counts.sent(),
        }
        .encode();
        let until = self.pause_bound.map(|b| b.until);
        let frame = OutFrame::new(FrameKind::RoundEnd, 0, end.clone());
        if let Err(e) = self.out.broadcast(&frame, until) {
            if let Some(b) = self.pause_bound.filter(|b| b.left().is_zero()) {
                return Err(b.exceeded("room for the last round's end"));
            }
            return Err(self.send_failed(e));
        }
        self.wire_bytes += (self.out.lanes() * (HEADER_LEN + end.len())) as u64;
        totals.wire_bytes = self.wire_bytes - wire_before;
        Ok(totals)
    }
}

pub(crate) use ferry_transport::error_chain;

/// Adds per-vCPU counts into `into`, growing it to `more`'s vCPUs.
fn add_per_vcpu(into: &mut Vec<u64>, more: &[u64]) {
    if into.len() < more.len() {
        into.resize(more.len(), 0);
    }
    for (n, m) in into.iter_mut().zip(more) {
        *n += m;
    }
}
