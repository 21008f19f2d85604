//! The destination side: receive pages into a prepared VM, verify, take over.

mod landing;

use std::io::IoSlice;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Receiver;
use ferry_transport::lanes::{LaneEnds, LaneInbox, LaneSink, Recycler};
use ferry_transport::{
    FrameKind, FrameReceive, FrameSink, FrameSource, Lanes, ReceivedFrame, TcpFrameConnection,
    TransportError, VerifiedSource,
};
use tracing::{info, warn};

use crate::digest::PageHashes;
use crate::encode::PAGE_SIZE;
use crate::error::MigrationError;
use crate::handover::HandoverOutcome;
use crate::layout::MemoryLayout;
use crate::options::DestinationOptions;
use crate::protocol::{
    self, Hello, HelloAck, RoundEnd, RoundWritten, Running, PAGE_BATCH_FLAGS, STREAM_VERSION,
};
use crate::summary::DestinationSummary;
use crate::vm::{MigratableVm, VmOpError};
use landing::{Landing, LandingTarget, LaneLanding, TornSet};

/// Control frames waiting to be taken from the lanes, per lane (page
/// batches are landed on the lanes' reader threads).
const DEPTH_PER_LANE: usize = 4;

/// A lane's reading half, with its index.
type LaneReader = (u16, Box<dyn FrameReceive>);

/// How long a lane failure waits for the source's Abort reason on lane 0.
const ABORT_GRACE: Duration = Duration::from_millis(200);

/// Receives one migration.
#[derive(Debug)]
pub struct DestinationMigration;

/// What one incoming session was.
#[derive(Debug)]
pub enum Incoming<V> {
    /// A migration: the guest runs in `V` now.
    Guest(V, DestinationSummary),
    /// A source's question about an earlier migration's outcome
    /// (`Resolve`), answered from `DestinationOptions::record`.
    Answered {
        /// The migration asked about.
        migration_id: u64,
        /// The answer given.
        outcome: HandoverOutcome,
    },
}

/// A session that was a question, not a migration, where a migration was
/// expected.
fn not_a_migration<V>(
    incoming: Result<Incoming<V>, MigrationError>,
) -> Result<(V, DestinationSummary), MigrationError> {
    match incoming? {
        Incoming::Guest(vm, summary) => Ok((vm, summary)),
        Incoming::Answered { .. } => Err(MigrationError::UnexpectedFrame {
            expected: "Hello",
            got: FrameKind::Resolve,
        }),
    }
}

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
        let shutdown = reader.get_ref().try_clone().ok();
        // Page batch checksums are verified on the reader thread.
        let readers: Vec<LaneReader> = vec![(0, Box::new(reader))];
        let result = not_a_migration(Self::receive_from(&mut writer, readers, opts, make_vm));
        if result.is_err() {
            // Ends the reader thread, whatever the peer does.
            if let Some(s) = shutdown {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        result
    }

    /// Receive a migration over a session of ferry lanes (see
    /// [`crate::SourceMigration::run_lanes`]): every lane is read by its own
    /// thread; lane 0 also carries the control frames, and the answers go
    /// back on it. A session that asks about an earlier migration
    /// (`Resolve`) is answered and reported as an unexpected frame: a
    /// destination that keeps listening uses [`Self::serve_lanes`].
    pub fn accept_lanes<V: MigratableVm>(
        lanes: Lanes,
        opts: &DestinationOptions,
        make_vm: impl FnOnce(&MemoryLayout) -> Result<V, VmOpError>,
    ) -> Result<(V, DestinationSummary), MigrationError> {
        not_a_migration(Self::serve_lanes(lanes, opts, make_vm))
    }

    /// Serve one incoming lane session: a migration (as
    /// [`Self::accept_lanes`]) or a source's question about an earlier
    /// one's outcome, answered from `opts.record`. A destination keeps
    /// serving sessions after a migration (whatever its end) until the
    /// sources that may ask have had their answer.
    pub fn serve_lanes<V: MigratableVm>(
        lanes: Lanes,
        opts: &DestinationOptions,
        make_vm: impl FnOnce(&MemoryLayout) -> Result<V, VmOpError>,
    ) -> Result<Incoming<V>, MigrationError> {
        let LaneEnds {
            sinks,
            readers,
            closers,
            ..
        } = lanes.into_ends().map_err(MigrationError::Send)?;
        let Some(mut control): Option<Box<dyn LaneSink>> = sinks.into_iter().next() else {
            return Err(MigrationError::PeerClosed {
                during: "the lane handshake",
            });
        };
        let result = Self::receive_from(&mut control, readers, opts, make_vm);
        if result.is_err() {
            for closer in closers {
                closer.close();
            }
        }
        result
    }

    /// Receive a migration over any frame sink/source pair. The source is
    /// read on a thread of its own that ends when it fails or closes.
    pub fn accept_over<V: MigratableVm>(
        sink: &mut impl FrameSink,
        source: impl FrameSource + Send + 'static,
        opts: &DestinationOptions,
        make_vm: impl FnOnce(&MemoryLayout) -> Result<V, VmOpError>,
    ) -> Result<(V, DestinationSummary), MigrationError> {
        let readers: Vec<LaneReader> = vec![(0, Box::new(VerifiedSource(source)))];
        not_a_migration(Self::receive_from(sink, readers, opts, make_vm))
    }

    fn receive_from<V: MigratableVm>(
        sink: &mut impl FrameSink,
        readers: Vec<LaneReader>,
        opts: &DestinationOptions,
        make_vm: impl FnOnce(&MemoryLayout) -> Result<V, VmOpError>,
    ) -> Result<Incoming<V>, MigrationError> {
        let lanes = readers.len();
        let (failure_tx, failures) = crossbeam_channel::unbounded();
        let landing = Arc::new(Landing::new(lanes, failure_tx));
        let inbound = LaneInbox::spawn_primed(
            readers,
            DEPTH_PER_LANE * lanes.max(1),
            opts.lane_buffers.take(lanes),
            |lane| LaneLanding::new(lane, landing.clone()),
        );
        let mut receiver = Receiving {
            sink,
            free: inbound.recycler(),
            inbound,
            landing: landing.clone(),
            failures,
            opts,
            wire_bytes: 0,
            lane_bytes: vec![0; lanes],
            started: Instant::now(),
            migration_id: None,
        };
        let result = receiver.receive(make_vm);
        // However it ended, the readers write no page any more.
        landing.close();
        if let Err(e) = &result {
            warn!(error = %e, "incoming migration failed");
            if let Some(id) = receiver.migration_id {
                opts.record.refuse(id, &crate::source::error_chain(e));
            }
            if !matches!(e, MigrationError::PeerAborted(_)) {
                let reason = protocol::encode_reason(&crate::source::error_chain(e));
                let _ = receiver
                    .sink
                    .send_vectored(FrameKind::Abort, 0, &[IoSlice::new(&reason)]);
                let _ = receiver.sink.flush();
            }
        }
        result
    }
}

struct Receiving<'a, S: FrameSink> {
    sink: &'a mut S,
    /// The lanes' reader threads (detached: each ends when its lane ends,
    /// or at its next frame once this is dropped).
    inbound: LaneInbox,
    /// Spent buffers go back to the lane readers.
    free: Recycler,
    /// Where the lanes' readers land page batches.
    landing: Arc<Landing>,
    /// A reader's failure to land a batch.
    failures: Receiver<MigrationError>,
    opts: &'a DestinationOptions,
    wire_bytes: u64,
    lane_bytes: Vec<u64>,
    started: Instant,
    /// The migration's id, once its Hello was accepted.
    migration_id: Option<u64>,
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl<S: FrameSink> Receiving<'_, S> {
    fn send(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), MigrationError> {
        self.sink
            .send_vectored(kind, 0, &[IoSlice::new(payload)])
            .map_err(MigrationError::Send)?;
        self.sink.flush().map_err(MigrationError::Send)
    }

    /// The next frame from any lane, verified: its lane and kind.
    fn recv(
        &mut self,
        buf: &mut Vec<u8>,
        during: &'static str,
    ) -> Result<(usize, FrameKind), MigrationError> {
        let timeout = self.opts.idle_timeout;
        self.recv_within(buf, during, timeout, false)
    }

    /// [`Self::recv`] within `timeout`; with `control_only`, events of
    /// lanes other than 0 are dropped unseen (after the last RoundEnd they
    /// carry nothing the handover needs, and a lane that closes must not
    /// overtake a GO already on lane 0).
    fn recv_within(
        &mut self,
        buf: &mut Vec<u8>,
        during: &'static str,
        timeout: Duration,
        control_only: bool,
    ) -> Result<(usize, FrameKind), MigrationError> {
        let (lane, frame) = self.recv_frame(during, timeout, control_only)?;
        let kind = frame.kind();
        self.take_payload(buf, frame)?;
        Ok((lane, kind))
    }

    /// A control frame's payload, verified, swapped into `buf` (the spent
    /// buffer goes back to the readers). An Abort is the source's reason.
    fn take_payload(&self, buf: &mut Vec<u8>, frame: ReceivedFrame) -> Result<(), MigrationError> {
        let kind = frame.kind();
        let payload = frame.into_payload().map_err(MigrationError::CorruptFrame)?;
        self.free.recycle(std::mem::replace(buf, payload));
        if kind == FrameKind::Abort {
            return Err(MigrationError::PeerAborted(protocol::decode_reason(buf)));
        }
        Ok(())
    }

    /// The next frame from any lane (per-lane order kept) that its reader
    /// did not land, flags checked, not yet verified (see
    /// [`Self::take_payload`]); a reader's failure to land a batch.
    fn recv_frame(
        &mut self,
        during: &'static str,
        timeout: Duration,
        control_only: bool,
    ) -> Result<(usize, ReceivedFrame), MigrationError> {
        // Idle means no frame on any lane: a lane may carry nothing for a
        // while (its stripes were clean this round). Batches the readers
        // landed count: a round over a slow link may bring nothing else
        // for longer than the timeout.
        let mut until = Instant::now() + timeout;
        let mut landed = self.landing.batches();
        let event = loop {
            let left = until.saturating_duration_since(Instant::now());
            crossbeam_channel::select! {
                recv(self.inbound.receiver()) -> event => match event {
                    Ok(event) if !control_only || event.lane == 0 => break event,
                    Ok(_) => {}
                    Err(_) => return Err(MigrationError::PeerClosed { during }),
                },
                // The sender lives as long as `self.landing`.
                recv(self.failures) -> failure => {
                    if let Ok(e) = failure {
                        return Err(e);
                    }
                }
                default(left) => {
                    let now_landed = self.landing.batches();
                    if now_landed == landed {
                        return Err(MigrationError::Timeout {
                            waiting_for: if control_only {
                                "frame on lane 0"
                            } else {
                                "frame on any lane"
                            },
                            timeout,
                        });
                    }
                    landed = now_landed;
                    until = Instant::now() + timeout;
                }
            }
        };
        let lane = usize::from(event.lane);
        let frame = match event.frame {
            Ok(frame) => frame,
            Err(e) => return Err(self.lane_failed(lane, e, during)),
        };
        let expected_flags = if frame.kind() == FrameKind::PageBatch {
            PAGE_BATCH_FLAGS
        } else {
            0
        };
        if frame.flags() != expected_flags {
            return Err(MigrationError::UnexpectedFlags {
                kind: frame.kind(),
                flags: frame.flags(),
            });
        }
        let frame_bytes = frame.wire_len() as u64;
        self.wire_bytes += frame_bytes;
        self.lane_bytes[lane] += frame_bytes;
        Ok((lane, frame))
    }

    /// A lane ended with `error`. A source that gives up closes every lane
    /// after saying why on lane 0: prefer its reason when it comes soon.
    fn lane_failed(
        &mut self,
        lane: usize,
        error: TransportError,
        during: &'static str,
    ) -> MigrationError {
        let cause = MigrationError::from_receive(error, during);
        if lane == 0 {
            return cause;
        }
        let fallback = MigrationError::LaneFailed {
            lane,
            cause: Box::new(cause),
        };
        let until = Instant::now() + ABORT_GRACE;
        while let Some(event) = self.inbound.recv_deadline(until) {
            match event.frame {
                Ok(frame) if event.lane == 0 && frame.kind() == FrameKind::Abort => {
                    return match frame.verify() {
                        Ok(body) => MigrationError::PeerAborted(protocol::decode_reason(body)),
                        Err(e) => MigrationError::CorruptFrame(e),
                    };
                }
                Err(_) if event.lane == 0 => break,
                _ => {}
            }
        }
        fallback
    }

    fn receive<V: MigratableVm>(
        &mut self,
        make_vm: impl FnOnce(&MemoryLayout) -> Result<V, VmOpError>,
    ) -> Result<Incoming<V>, MigrationError> {
        let mut buf = Vec::new();
        let (_, kind) = self.recv(&mut buf, "the handshake")?;
        if kind == FrameKind::Resolve {
            let id = protocol::decode_u64("Resolve", &buf).map_err(MigrationError::Message)?;
            let outcome = self.opts.record.answer(id);
            match &outcome {
                HandoverOutcome::Resumed(running) => {
                    self.send(FrameKind::Running, &running.encode())?
                }
                HandoverOutcome::NotResumed(reason) => {
                    self.send(FrameKind::Abort, &protocol::encode_reason(reason))?
                }
            }
            info!(
                migration_id = id,
                ?outcome,
                "answered a source's question about a handover"
            );
            return Ok(Incoming::Answered {
                migration_id: id,
                outcome,
            });
        }
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
        let migration_id = hello.migration_id;
        let vm = make_vm(&layout).map_err(MigrationError::MakeVm)?;
        layout
            .check_covered_by(vm.memory())
            .map_err(MigrationError::Layout)?;
        // Created now, not in the pause (where restoring used to create
        // them): the pause then only loads their state.
        let t_vcpus = Instant::now();
        vm.prepare_vcpus(hello.vcpus as usize)
            .map_err(|source| MigrationError::PrepareVcpus {
                count: hello.vcpus,
                source,
            })?;
        info!(
            vcpus = hello.vcpus,
            ms = t_vcpus.elapsed().as_secs_f64() * 1e3,
            "vCPUs created before the stream"
        );
        let features = hello.features & protocol::SUPPORTED_FEATURES;
        let hashes = Arc::new(PageHashes::with_regions(
            layout.page_index_end(),
            &layout.page_ranges(),
        ));
        let torn = Arc::new(TornSet::new(layout.page_index_end()));
        // Batches land from here on, before the source hears it may send.
        self.landing.open(LandingTarget {
            memory: vm.memory().clone(),
            hashes: hashes.clone(),
            page_index_end: layout.page_index_end(),
            features,
            torn: torn.clone(),
        });
        let ack = HelloAck {
            stream_version: STREAM_VERSION,
            features,
        };
        self.opts.record.open(migration_id);
        self.migration_id = Some(migration_id);
        self.send(FrameKind::HelloAck, &ack.encode())?;
        info!(pages = layout.pages(), "incoming migration accepted");

        let (rounds, restore, source_digest) = self.stream(&mut buf, &torn, &vm)?;
        let landed = self.landing.take_landed();
        self.wire_bytes += landed.lane_bytes.iter().sum::<u64>();
        for (ours, theirs) in self.lane_bytes.iter_mut().zip(&landed.lane_bytes) {
            *ours += theirs;
        }
        let pages_written_at = unix_ns();
        // Every page is written: one whose last copy arrived torn was not
        // sent again (the source resends every torn page it hears of
        // before the pause; in the final round nothing can tear).
        torn.check_none_open()?;

        let t_verify = Instant::now();
        let digest = hashes.digest();
        let region_digests = hashes.region_digests();
        let verify = t_verify.elapsed();
        let differing_regions: Vec<u64> = layout
            .regions
            .iter()
            .zip(region_digests.iter().zip(&source_digest.regions))
            .filter(|(_, (ours, theirs))| ours != theirs)
            .map(|(r, _)| r.guest_phys_addr)
            .collect();
        if source_digest.regions.len() != layout.regions.len() {
            return Err(MigrationError::Message(protocol::MessageError {
                message: "Digest",
                problem: format!(
                    "{} region digests for a layout of {} regions",
                    source_digest.regions.len(),
                    layout.regions.len()
                ),
            }));
        }
        if digest != source_digest.total || !differing_regions.is_empty() {
            return Err(MigrationError::DigestMismatch {
                source_digest: source_digest.total,
                destination_digest: digest,
                differing_regions,
            });
        }
        // Go comes after one round trip: have the vCPU ready for it.
        vm.prepare_resume();
        let ready_sent_at = unix_ns();
        self.send(FrameKind::Ready, &protocol::encode_u64(digest))?;

        // Only lane 0 matters now: the other lanes' ends are not read
        // ahead of a GO already on lane 0.
        let go_timeout = self.opts.go_timeout;
        let (_, kind) = self.recv_within(&mut buf, "waiting for Go", go_timeout, true)?;
        if kind != FrameKind::Go {
            return Err(MigrationError::UnexpectedFrame {
                expected: "Go",
                got: kind,
            });
        }
        // Resume unless this migration was refused meanwhile (a question
        // about its outcome came first): decided once, under the record's
        // lock, so an answer given never changes.
        let go_at = unix_ns();
        let resumed = self.opts.record.resume_with(migration_id, || {
            vm.resume()?;
            let returned_at = unix_ns();
            // The guest runs from when its vCPUs entered it, which the VMM
            // may know more precisely than this thread's return (a busy
            // core can keep this thread waiting after the guest already
            // runs).
            let resumed_at = vm
                .resumed_at_unix_ns()
                .filter(|&t| t >= go_at && t <= returned_at)
                .unwrap_or(returned_at);
            Ok::<_, VmOpError>(Running {
                resumed_at_unix_ns: resumed_at,
                verify_ns: nanos(verify),
                restore_ns: nanos(restore),
                resume_ns: resumed_at.saturating_sub(go_at),
                pages_written_at_unix_ns: pages_written_at,
                ready_sent_at_unix_ns: ready_sent_at,
            })
        });
        let running = match resumed {
            Ok(Ok(running)) => running,
            Ok(Err(e)) => return Err(MigrationError::Resume(e)),
            Err(refused) => return Err(MigrationError::GoAfterRefusal(refused)),
        };
        let resumed_at = running.resumed_at_unix_ns;
        // The guest runs here now, whatever happens to this message.
        if let Err(e) = self.send(FrameKind::Running, &running.encode()) {
            warn!(error = %e, "could not tell the source the guest runs here");
        }
        info!("incoming migration completed; guest running");
        Ok(Incoming::Guest(
            vm,
            DestinationSummary {
                rounds,
                pages: landed.counts,
                wire_bytes: self.wire_bytes,
                wire_bytes_per_lane: self.lane_bytes.clone(),
                memory_digest: digest,
                region_digests: crate::summary::RegionDigest::list(&layout, &region_digests),
                resumed_at_unix_ns: resumed_at,
                verify,
                restore,
                total: self.started.elapsed(),
            },
        ))
    }

    /// Receive rounds until the Digest and every lane's last RoundEnd:
    /// returns (rounds, the time restoring the state took, the source's
    /// digest), with every page written and the state restored into `vm`.
    /// The state is restored as soon as it arrives (the source sends it
    /// right after the pause, ahead of the last pages), while the lanes'
    /// readers write those pages.
    ///
    /// Each lane ends each round with its own RoundEnd, behind that lane's
    /// pages of the round; its reader lands the lane's batches in order
    /// and passes the RoundEnd on only after them, so a lane's RoundEnd
    /// here means its pages of the round are written. On return the
    /// readers land nothing more.
    fn stream<V: MigratableVm>(
        &mut self,
        buf: &mut Vec<u8>,
        torn: &TornSet,
        vm: &V,
    ) -> Result<(u32, Duration, protocol::DigestMessage), MigrationError> {
        let mut lane_rounds = vec![0u32; self.inbound.lanes()];
        // How long restoring took, once the state is in.
        let mut restored: Option<Duration> = None;
        // The source's digest and the round count every lane must reach.
        let mut digest: Option<(protocol::DigestMessage, u32)> = None;
        loop {
            if let Some((digest, rounds)) = &digest {
                let rounds = *rounds;
                if lane_rounds.iter().all(|&r| r == rounds) {
                    // Nothing lands after this (the guest may run): a
                    // failure before it fails the migration.
                    self.landing.close();
                    if let Ok(e) = self.failures.try_recv() {
                        return Err(e);
                    }
                    let restore = restored.ok_or(MigrationError::UnexpectedFrame {
                        expected: "VcpuState",
                        got: FrameKind::Digest,
                    })?;
                    return Ok((rounds, restore, digest.clone()));
                }
            }
            let idle = self.opts.idle_timeout;
            let (lane, frame) = self.recv_frame("the page stream", idle, false)?;
            let kind = frame.kind();
            self.take_payload(buf, frame)?;
            match kind {
                FrameKind::RoundEnd => {
                    let end = RoundEnd::decode(buf).map_err(MigrationError::Message)?;
                    let expected = lane_rounds[lane];
                    let past_digest = digest
                        .as_ref()
                        .is_some_and(|(_, rounds)| expected >= *rounds);
                    if end.round != expected || past_digest {
                        return Err(MigrationError::Message(protocol::MessageError {
                            message: "RoundEnd",
                            problem: format!(
                                "round {} on lane {lane} after round {}",
                                end.round,
                                expected.wrapping_sub(1)
                            ),
                        }));
                    }
                    lane_rounds[lane] += 1;
                    // The last lane to end this round: every page of it is
                    // written (each lane's reader landed its batches before
                    // passing its RoundEnd on). The source waits for this before it
                    // pauses; once the Digest is here it waits for Ready.
                    let reached = lane_rounds[lane];
                    if digest.is_none() && lane_rounds.iter().all(|&r| r >= reached) {
                        let written = RoundWritten {
                            round: end.round,
                            torn: torn.take_report(),
                        };
                        self.send(FrameKind::Progress, &written.encode())?;
                    }
                }
                FrameKind::VcpuState if digest.is_none() && restored.is_none() => {
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
                    let t_restore = Instant::now();
                    let sections = crate::sections::decode(buf, &vm.section_specs())
                        .map_err(MigrationError::Sections)?;
                    vm.restore_sections(&sections)
                        .map_err(MigrationError::RestoreState)?;
                    restored = Some(t_restore.elapsed());
                }
                FrameKind::Digest if digest.is_none() => {
                    let d =
                        protocol::DigestMessage::decode(buf).map_err(MigrationError::Message)?;
                    if restored.is_none() {
                        return Err(MigrationError::UnexpectedFrame {
                            expected: "VcpuState",
                            got: FrameKind::Digest,
                        });
                    }
                    digest = Some((d, lane_rounds[lane]));
                }
                other => {
                    return Err(MigrationError::UnexpectedFrame {
                        expected: "RoundEnd, VcpuState or Digest",
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
