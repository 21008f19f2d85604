//! A migration that fails leaves the guest running on the source, with an
//! error that says what happened.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{
    assert_alive, boot, kvm_or_skip, migrate_to, Destination, Fault, FrameFault, FrameRelay,
    HookedVm, Relay, VmHooks,
};
use ferry_engine::protocol::{self, Hello, HelloAck, STREAM_VERSION};
use ferry_engine::{
    resolve_in_doubt, DestinationMigration, DestinationOptions, DestinationSummary, DeviceSection,
    InDoubtDecision, InDoubtResolution, Incoming, MemoryLayout, MemoryRegion, MigratableVm,
    MigrationError, MigrationOptions, MigrationSummary, Reconnect, ResolveError, SourceMigration,
};
use ferry_transport::lanes::LaneListener;
use ferry_transport::{
    tcp, FrameKind, FrameListener, FrameSink, FrameSource, LaneOptions, Lanes, Security,
};
use ferry_vm::{RunState, Vm};

const GUEST: &str = "rate=5000 wss=16M tsc_khz=2300000";

fn quick() -> MigrationOptions {
    MigrationOptions {
        handover_timeout: Duration::from_secs(10),
        ..MigrationOptions::default()
    }
}

/// A fake destination: answers the Hello with `answer`, reads `frames`
/// frames, then drops the connection (what a killed process does).
fn fake_destination(
    answer: impl FnOnce(&mut TcpStream) + Send + 'static,
    frames: usize,
) -> Result<std::net::SocketAddr> {
    let (addr, _) = fake_destination_then(answer, move |conn| {
        for _ in 0..frames {
            if conn.reader.recv().is_err() {
                break;
            }
        }
    })?;
    Ok(addr)
}

/// A fake destination that answers the Hello with `answer`, then hands the
/// connection to `then` (on its thread, joined through the handle).
fn fake_destination_then(
    answer: impl FnOnce(&mut TcpStream) + Send + 'static,
    then: impl FnOnce(&mut ferry_transport::TcpFrameConnection) + Send + 'static,
) -> Result<(std::net::SocketAddr, std::thread::JoinHandle<()>)> {
    let listener = FrameListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let thread = std::thread::spawn(move || {
        let mut conn = listener.accept().expect("accept");
        let hello = conn.reader.recv().expect("hello");
        assert_eq!(hello.kind, FrameKind::Hello);
        answer(conn.writer.get_mut());
        then(&mut conn);
    });
    Ok((addr, thread))
}

fn hello_ack(version: u32) -> impl FnOnce(&mut TcpStream) + Send + 'static {
    move |s| {
        let mut frame = Vec::new();
        ferry_transport::frame::encode_frame(
            FrameKind::HelloAck,
            0,
            &HelloAck {
                stream_version: version,
                features: 0,
            }
            .encode(),
            &mut frame,
        )
        .unwrap();
        s.write_all(&frame).unwrap();
    }
}

#[test]
fn a_killed_destination_leaves_the_guest_running_on_the_source() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("a_killed_destination_leaves_the_guest_running_on_the_source")
    else {
        return Ok(());
    };
    let vm = boot(64, GUEST)?;
    let addr = fake_destination(hello_ack(STREAM_VERSION), 20)?;
    let (result, _) = migrate_to(&vm, addr, quick());
    let err = result.err().context("the migration must fail")?;
    ensure!(
        matches!(
            err,
            MigrationError::PeerClosed { .. } | MigrationError::Send(_)
        ),
        "unexpected error: {err:?}"
    );
    assert_alive(&vm, "source")?;
    Ok(())
}

#[test]
fn a_dropped_connection_mid_round_leaves_the_guest_running_on_the_source() -> Result<()> {
    let Some(_kvm) =
        kvm_or_skip("a_dropped_connection_mid_round_leaves_the_guest_running_on_the_source")
    else {
        return Ok(());
    };
    let vm = boot(64, GUEST)?;
    let dest = Destination::spawn(DestinationOptions::default())?;
    let relay = Relay::spawn(dest.addr, 8 << 20, Fault::Cut)?;
    let (result, _) = migrate_to(&vm, relay.addr, quick());
    let err = result.err().context("the migration must fail")?;
    ensure!(
        matches!(
            err,
            MigrationError::PeerClosed { .. }
                | MigrationError::Send(_)
                | MigrationError::Receive(_)
        ),
        "unexpected error: {err:?}"
    );
    let dest_err = dest.join().err().context("the destination must fail too")?;
    ensure!(
        matches!(
            dest_err,
            MigrationError::PeerClosed { .. }
                | MigrationError::Receive(_)
                | MigrationError::CorruptFrame(_)
        ),
        "{dest_err:?}"
    );
    relay.join();
    assert_alive(&vm, "source")?;
    Ok(())
}

#[test]
fn a_corrupt_frame_is_caught_and_the_guest_keeps_running_on_the_source() -> Result<()> {
    let Some(_kvm) =
        kvm_or_skip("a_corrupt_frame_is_caught_and_the_guest_keeps_running_on_the_source")
    else {
        return Ok(());
    };
    let vm = boot(64, GUEST)?;
    let dest = Destination::spawn(DestinationOptions::default())?;
    let relay = Relay::spawn(dest.addr, 4 << 20, Fault::FlipBit)?;
    let (result, _) = migrate_to(&vm, relay.addr, quick());
    let err = match result {
        Err(e) => e,
        Ok(summary) => {
            // The bit landed in a raw page, which the destination takes for
            // torn (sent from guest memory while the guest wrote it), and
            // the guest wrote that page again: its next copy replaced the
            // bad one. Never silently: the page was resent and the digests
            // (checked on both sides) agree.
            let (_, dest_summary) = dest.join()?;
            ensure!(summary.torn_pages_resent > 0, "{summary:?}");
            ensure!(summary.memory_digest == dest_summary.memory_digest);
            relay.join();
            return Ok(());
        }
    };
    if let MigrationError::TornPageNotRewritten { .. } = err {
        // The bit landed in a raw page the guest did not write again: the
        // source found no write that explains it and gave up.
        ensure!(
            dest.join().is_err(),
            "the destination must not run the guest"
        );
        relay.join();
        assert_alive(&vm, "source")?;
        return Ok(());
    }
    let dest_err = dest
        .join()
        .err()
        .context("the destination must refuse the stream")?;
    // A flipped bit lands in a frame's covered part (checksum) or in an
    // encoded page (its hash): either way the stream is refused as corrupt
    // (a raw page the guest did not write again: see tests/torn_pages.rs).
    ensure!(
        matches!(
            dest_err,
            MigrationError::CorruptFrame(_)
                | MigrationError::Decode(ferry_engine::encode::DecodeError::HashMismatch { .. })
        ),
        "destination: {dest_err:?}"
    );
    match &err {
        MigrationError::PeerAborted(reason) => {
            ensure!(reason.contains("corrupt"), "reason: {reason}")
        }
        other => anyhow::bail!("source should hear the destination's reason, got {other:?}"),
    }
    relay.join();
    assert_alive(&vm, "source")?;
    Ok(())
}

#[test]
fn a_destination_speaking_another_stream_version_is_refused() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("a_destination_speaking_another_stream_version_is_refused") else {
        return Ok(());
    };
    let vm = boot(64, GUEST)?;
    let addr = fake_destination(hello_ack(STREAM_VERSION + 98), 5)?;
    let (result, _) = migrate_to(&vm, addr, quick());
    match result {
        Err(MigrationError::VersionMismatch { ours, theirs }) => {
            ensure!(ours == STREAM_VERSION && theirs == STREAM_VERSION + 98);
        }
        other => anyhow::bail!("expected a version mismatch, got {other:?}"),
    }
    assert_alive(&vm, "source")?;
    Ok(())
}

#[test]
fn a_destination_speaking_another_frame_version_is_refused() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("a_destination_speaking_another_frame_version_is_refused") else {
        return Ok(());
    };
    let vm = boot(64, GUEST)?;
    let addr = fake_destination(
        |s| {
            let mut frame = Vec::new();
            ferry_transport::frame::encode_frame(
                FrameKind::HelloAck,
                0,
                &HelloAck {
                    stream_version: STREAM_VERSION,
                    features: 0,
                }
                .encode(),
                &mut frame,
            )
            .unwrap();
            frame[4..6].copy_from_slice(&7u16.to_le_bytes());
            s.write_all(&frame).unwrap();
        },
        5,
    )?;
    let (result, _) = migrate_to(&vm, addr, quick());
    ensure!(
        matches!(
            result,
            Err(MigrationError::VersionMismatch { theirs: 7, .. })
        ),
        "expected a frame version mismatch, got {result:?}"
    );
    assert_alive(&vm, "source")?;
    Ok(())
}

/// No KVM needed: the destination refuses before creating a VM.
#[test]
fn the_destination_refuses_a_foreign_stream_version_and_says_why() -> Result<()> {
    let listener = FrameListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let dest = std::thread::spawn(move || {
        let conn = listener.accept().unwrap();
        DestinationMigration::accept(conn, &DestinationOptions::default(), common::incoming)
            .map(|_| ())
    });
    let mut conn = tcp::connect(addr)?;
    let mut hello = Hello::new(
        MemoryLayout {
            regions: vec![MemoryRegion {
                guest_phys_addr: 0,
                bytes: 64 << 20,
            }],
        },
        0,
        1,
    );
    hello.stream_version = 42;
    conn.writer.send(FrameKind::Hello, 0, &hello.encode())?;
    let reply = conn.reader.recv()?;
    ensure!(
        reply.kind == FrameKind::Abort,
        "expected an Abort, got {:?}",
        reply.kind
    );
    let reason = protocol::decode_reason(&reply.payload);
    ensure!(
        reason.contains("42"),
        "the reason should name the version: {reason}"
    );
    let err = dest
        .join()
        .unwrap()
        .err()
        .context("destination must fail")?;
    ensure!(
        matches!(err, MigrationError::VersionMismatch { theirs: 42, .. }),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn a_link_lost_before_go_leaves_the_guest_running_on_the_source_only() -> Result<()> {
    let Some(_kvm) =
        kvm_or_skip("a_link_lost_before_go_leaves_the_guest_running_on_the_source_only")
    else {
        return Ok(());
    };
    let vm = boot(64, GUEST)?;
    let dest = Destination::spawn(DestinationOptions::default())?;
    // The guest is paused and its state sent; the link dies before the
    // digest reaches the destination.
    let relay = FrameRelay::spawn(dest.addr, FrameFault::CutBefore(FrameKind::Digest))?;
    let (result, _) = migrate_to(&vm, relay.addr, quick());
    let err = result.err().context("the migration must fail")?;
    ensure!(
        !err.source_left_paused(),
        "before GO the source must resume: {err:?}"
    );
    let dest_err = dest
        .join()
        .err()
        .context("the destination must not complete")?;
    ensure!(
        matches!(
            dest_err,
            MigrationError::PeerClosed { .. } | MigrationError::Receive(_)
        ),
        "{dest_err:?}"
    );
    relay.join();
    assert_alive(&vm, "source")?;
    Ok(())
}

#[test]
fn a_go_lost_on_the_way_is_in_doubt_and_runs_the_guest_nowhere_twice() -> Result<()> {
    let Some(_kvm) =
        kvm_or_skip("a_go_lost_on_the_way_is_in_doubt_and_runs_the_guest_nowhere_twice")
    else {
        return Ok(());
    };
    let vm = boot(64, GUEST)?;
    let dest = Destination::spawn(DestinationOptions::default())?;
    let relay = FrameRelay::spawn(dest.addr, FrameFault::CutBefore(FrameKind::Go))?;
    let (result, _) = migrate_to(&vm, relay.addr, quick());
    // The source sent GO and cannot know it was lost: in doubt, paused.
    let err = result.err().context("the migration must not succeed")?;
    ensure!(
        matches!(err, MigrationError::InDoubt { .. }),
        "expected in-doubt, got {err:?}"
    );
    ensure!(
        vm.run_state() == RunState::Paused,
        "source vCPU is {:?}",
        vm.run_state()
    );
    // The destination never got GO: it did not resume either.
    let dest_err = dest
        .join()
        .err()
        .context("the destination must not resume without GO")?;
    ensure!(
        matches!(
            dest_err,
            MigrationError::PeerClosed { .. } | MigrationError::Receive(_)
        ),
        "{dest_err:?}"
    );
    relay.join();
    Ok(())
}

#[test]
fn no_running_after_go_is_in_doubt_and_the_source_stays_paused() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("no_running_after_go_is_in_doubt_and_the_source_stays_paused")
    else {
        return Ok(());
    };
    let vm = boot(64, GUEST)?;
    let dest = Destination::spawn(DestinationOptions::default())?;
    let relay = FrameRelay::spawn(dest.addr, FrameFault::SilenceAfter(FrameKind::Go))?;
    let (result, _) = migrate_to(&vm, relay.addr, quick());
    let err = result
        .err()
        .context("without RUNNING the source cannot call it done")?;
    ensure!(
        matches!(err, MigrationError::InDoubt { .. }),
        "expected in-doubt, got {err:?}"
    );
    ensure!(err.source_left_paused());
    ensure!(
        vm.run_state() == RunState::Paused,
        "source vCPU is {:?}",
        vm.run_state()
    );
    // The destination got GO: the guest runs there, exactly once.
    let (dest_vm, _) = dest.join().context("the destination took over")?;
    relay.join();
    let frozen = vm.status();
    assert_alive(&dest_vm, "destination")?;
    ensure!(vm.status() == frozen, "the source guest must stay frozen");
    Ok(())
}

#[test]
fn a_destination_that_stops_reading_is_given_up_and_the_guest_runs_on() -> Result<()> {
    let Some(_kvm) =
        kvm_or_skip("a_destination_that_stops_reading_is_given_up_and_the_guest_runs_on")
    else {
        return Ok(());
    };
    let vm = boot(64, GUEST)?;
    // Answers the Hello, then holds the connection open without reading a
    // byte (a stopped process, a stuck host) until the test lets it go.
    let (release, held) = std::sync::mpsc::channel::<()>();
    let (addr, stalled) = fake_destination_then(hello_ack(STREAM_VERSION), move |_conn| {
        let _ = held.recv();
    })?;
    let opts = MigrationOptions {
        handover_timeout: Duration::from_secs(2),
        ..MigrationOptions::default()
    };
    let (result, events) = migrate_to(&vm, addr, opts);
    let _ = release.send(());
    stalled.join().expect("stalled destination thread");
    ensure!(
        matches!(result, Err(MigrationError::Timeout { .. })),
        "expected a timeout, got {result:?}"
    );
    ensure!(matches!(
        events.last(),
        Some(ferry_engine::ProgressEvent::Abandoned { .. })
    ));
    assert_alive(&vm, "source after a stalled destination")?;
    Ok(())
}

/// A destination that keeps listening after its migration, as `ferry vm
/// receive` does, and serves every lane session (migrations and questions
/// about a handover) from one record.
struct ListeningDestination {
    addr: std::net::SocketAddr,
    migrations: std::sync::mpsc::Receiver<Result<(Vm, DestinationSummary), MigrationError>>,
}

impl ListeningDestination {
    fn spawn() -> Result<Self> {
        let mut listener =
            LaneListener::bind("127.0.0.1:0", LaneOptions::new(1, Security::Insecure))?;
        let addr = listener.local_addr()?;
        let opts = DestinationOptions::default();
        let (tx, migrations) = std::sync::mpsc::channel();
        // Detached: it ends with the test process (it holds no guest).
        std::thread::spawn(move || {
            while let Ok(lanes) = listener.accept_session() {
                let (opts, tx) = (opts.clone(), tx.clone());
                std::thread::spawn(move || {
                    match DestinationMigration::serve_lanes(lanes, &opts, common::incoming) {
                        Ok(Incoming::Guest(vm, summary)) => {
                            let _ = tx.send(Ok((vm, summary)));
                        }
                        Ok(Incoming::Answered { .. }) => {}
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            }
        });
        Ok(Self { addr, migrations })
    }

    fn reconnect(&self) -> Reconnect {
        let addr = self.addr;
        Box::new(move || Lanes::connect(addr, &LaneOptions::new(1, Security::Insecure)))
    }

    fn outcome(&self) -> Result<Result<(Vm, DestinationSummary), MigrationError>> {
        self.migrations
            .recv_timeout(Duration::from_secs(30))
            .context("the destination's migration did not end")
    }
}

/// Migrate `vm` over one lane through `relay`, asking `dest` again after
/// GO when `ask_again`.
fn migrate_via(
    vm: &Arc<Vm>,
    relay: std::net::SocketAddr,
    dest: &ListeningDestination,
    ask_again: bool,
) -> Result<Result<MigrationSummary, MigrationError>> {
    let lanes = Lanes::connect(relay, &LaneOptions::new(1, Security::Insecure))?;
    let mut migration = SourceMigration::new(vm.clone(), quick());
    if ask_again {
        migration = migration.resolve_with(dest.reconnect());
    }
    Ok(migration.run_lanes(lanes, |_| {}))
}

#[test]
fn a_go_the_destination_rejects_resumes_the_guest_on_the_source() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("a_go_the_destination_rejects_resumes_the_guest_on_the_source")
    else {
        return Ok(());
    };
    let vm = boot(64, GUEST)?;
    let dest = ListeningDestination::spawn()?;
    let relay = FrameRelay::spawn(dest.addr, FrameFault::Corrupt(FrameKind::Go))?;
    // No second connection: the destination's Abort alone must settle it.
    let result = migrate_via(&vm, relay.addr, &dest, false)?;
    let err = result.err().context("a corrupt GO cannot complete")?;
    ensure!(
        matches!(err, MigrationError::HandoverRefused { .. }),
        "expected a refused handover, got {err:?}"
    );
    let dest_err = dest
        .outcome()?
        .err()
        .context("the destination must not resume")?;
    ensure!(
        matches!(dest_err, MigrationError::CorruptFrame(_)),
        "{dest_err:?}"
    );
    relay.join();
    assert_alive(&vm, "source after a rejected GO")?;
    Ok(())
}

#[test]
fn a_lost_running_is_asked_for_again_and_the_migration_completes() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("a_lost_running_is_asked_for_again_and_the_migration_completes")
    else {
        return Ok(());
    };
    let vm = boot(64, GUEST)?;
    let dest = ListeningDestination::spawn()?;
    let relay = FrameRelay::spawn(dest.addr, FrameFault::SilenceAfter(FrameKind::Go))?;
    let summary = migrate_via(&vm, relay.addr, &dest, true)?
        .context("the destination's answer on a fresh connection completes it")?;
    let (dest_vm, dest_summary) = dest.outcome()?.context("the destination resumed")?;
    ensure!(summary.memory_digest == dest_summary.memory_digest);
    ensure!(vm.run_state() == RunState::Paused, "the source must let go");
    relay.join();
    assert_alive(&dest_vm, "destination")?;
    Ok(())
}

#[test]
fn a_go_that_never_arrives_is_asked_about_and_the_source_resumes() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("a_go_that_never_arrives_is_asked_about_and_the_source_resumes")
    else {
        return Ok(());
    };
    let vm = boot(64, GUEST)?;
    let dest = ListeningDestination::spawn()?;
    let relay = FrameRelay::spawn(dest.addr, FrameFault::CutBefore(FrameKind::Go))?;
    let err = migrate_via(&vm, relay.addr, &dest, true)?
        .err()
        .context("GO never arrived: no completion")?;
    ensure!(
        matches!(err, MigrationError::HandoverRefused { .. }),
        "the destination can answer, so no doubt: {err:?}"
    );
    ensure!(dest.outcome()?.is_err(), "the destination must not resume");
    relay.join();
    assert_alive(&vm, "source")?;
    Ok(())
}

#[test]
fn an_unreachable_destination_leaves_doubt_that_resolve_finishes() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("an_unreachable_destination_leaves_doubt_that_resolve_finishes")
    else {
        return Ok(());
    };
    let vm = boot(64, GUEST)?;
    let dest = ListeningDestination::spawn()?;
    // Running is lost and the source has no way back: in doubt, paused.
    let relay = FrameRelay::spawn(dest.addr, FrameFault::SilenceAfter(FrameKind::Go))?;
    let err = migrate_via(&vm, relay.addr, &dest, false)?
        .err()
        .context("no answer, no way to ask")?;
    let MigrationError::InDoubt { migration_id, .. } = err else {
        anyhow::bail!("expected in doubt, got {err:?}");
    };
    ensure!(vm.run_state() == RunState::Paused);
    let (dest_vm, _) = dest.outcome()?.context("the destination resumed")?;
    relay.join();
    // The destination is reachable and runs the guest: resume is refused.
    let refused = resolve_in_doubt(
        &*vm,
        migration_id,
        InDoubtDecision::Resume,
        Some(dest.reconnect()),
        Duration::from_secs(5),
    );
    ensure!(
        matches!(refused, Err(ResolveError::RunsAtDestination)),
        "{refused:?}"
    );
    ensure!(vm.run_state() == RunState::Paused, "resume was refused");
    let discarded = resolve_in_doubt(
        &*vm,
        migration_id,
        InDoubtDecision::Discard,
        None,
        Duration::ZERO,
    )?;
    ensure!(discarded == InDoubtResolution::Discarded);
    assert_alive(&dest_vm, "destination")?;
    Ok(())
}

#[test]
fn resolve_resume_runs_the_guest_here_when_the_destination_is_gone() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("resolve_resume_runs_the_guest_here_when_the_destination_is_gone")
    else {
        return Ok(());
    };
    let vm = boot(64, GUEST)?;
    let dest = ListeningDestination::spawn()?;
    let relay = FrameRelay::spawn(dest.addr, FrameFault::CutBefore(FrameKind::Go))?;
    let err = migrate_via(&vm, relay.addr, &dest, false)?
        .err()
        .context("GO lost, no way to ask")?;
    let MigrationError::InDoubt { migration_id, .. } = err else {
        anyhow::bail!("expected in doubt, got {err:?}");
    };
    ensure!(dest.outcome()?.is_err(), "the destination never got GO");
    relay.join();
    // Nobody listens there any more: the operator's word decides.
    let gone = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let resolution = resolve_in_doubt(
        &*vm,
        migration_id,
        InDoubtDecision::Resume,
        Some(Box::new(move || {
            Lanes::connect(gone, &LaneOptions::new(1, Security::Insecure))
        })),
        Duration::from_millis(500),
    )?;
    ensure!(
        matches!(resolution, InDoubtResolution::ResumedHere { .. }),
        "{resolution:?}"
    );
    assert_alive(&vm, "source after resolve resume")?;
    Ok(())
}

/// One more device section than ferry's VM reads: what a source VMM with
/// a device the destination lacks sends.
struct ExtraSection(DeviceSection);

impl VmHooks for ExtraSection {
    fn saved_sections(&self, mut sections: Vec<DeviceSection>) -> Vec<DeviceSection> {
        sections.push(self.0.clone());
        sections
    }
}

/// Migrates `vm` seen through `hooks` to a fresh destination that must
/// refuse it before GO: the source's error (its guest resumed, not left
/// paused) and the destination's.
fn refused_before_go(
    vm: &Arc<Vm>,
    hooks: impl VmHooks + 'static,
) -> Result<(MigrationError, MigrationError)> {
    let dest = Destination::spawn(DestinationOptions::default())?;
    let wrapped: Arc<dyn MigratableVm> = Arc::new(HookedVm {
        vm: vm.clone(),
        hooks,
    });
    let conn = tcp::connect(dest.addr)?;
    let result = SourceMigration::new(wrapped, quick()).run(conn, |_| {});
    let err = result.err().context("the migration must fail")?;
    ensure!(
        !err.source_left_paused(),
        "before GO the source must resume: {err:?}"
    );
    let dest_err = dest.join().err().context("the destination must refuse")?;
    Ok((err, dest_err))
}

fn a_refused_section_leaves_the_guest_on_the_source(
    extra: DeviceSection,
    says: &str,
) -> Result<()> {
    let vm = boot(64, GUEST)?;
    let (err, dest_err) = refused_before_go(&vm, ExtraSection(extra))?;
    ensure!(
        matches!(dest_err, MigrationError::Sections(_)),
        "{dest_err:?}"
    );
    let chain = format!("{:#}", anyhow::Error::from(dest_err));
    ensure!(chain.contains(says), "the destination says: {chain}");
    ensure!(
        format!("{err:#}").contains(says) || matches!(err, MigrationError::PeerAborted(_)),
        "the source hears why: {err:?}"
    );
    assert_alive(&vm, "source")?;
    Ok(())
}

#[test]
fn an_unknown_device_section_is_refused_before_go_and_the_guest_stays() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("an_unknown_device_section_is_refused_before_go") else {
        return Ok(());
    };
    a_refused_section_leaves_the_guest_on_the_source(
        DeviceSection {
            name: "hpet".into(),
            instance: 0,
            version: 1,
            data: vec![1, 2, 3],
        },
        "unknown device section `hpet`",
    )
}

#[test]
fn a_newer_device_section_is_refused_before_go_and_the_guest_stays() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("a_newer_device_section_is_refused_before_go") else {
        return Ok(());
    };
    a_refused_section_leaves_the_guest_on_the_source(
        DeviceSection {
            name: "vcpu".into(),
            instance: 1,
            version: ferry_vm::VCPU_SECTION.version + 1,
            data: b"{}".to_vec(),
        },
        "reads up to version",
    )
}

/// A Hello announcing a vCPU count ferry's VM cannot have: the destination
/// refuses it before any page moves and tells the source why.
#[test]
fn a_hello_with_an_impossible_vcpu_count_is_refused_with_the_count() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("a_hello_with_an_impossible_vcpu_count_is_refused") else {
        return Ok(());
    };
    for count in [0, ferry_vm::MAX_VCPUS as u32 + 1] {
        let listener = FrameListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let dest = std::thread::spawn(move || {
            let conn = listener.accept().unwrap();
            DestinationMigration::accept(conn, &DestinationOptions::default(), common::incoming)
                .map(|_| ())
        });
        let mut conn = tcp::connect(addr)?;
        let hello = Hello::new(
            MemoryLayout {
                regions: vec![MemoryRegion {
                    guest_phys_addr: 0,
                    bytes: 64 << 20,
                }],
            },
            0,
            count,
        );
        conn.writer.send(FrameKind::Hello, 0, &hello.encode())?;
        let reply = conn.reader.recv()?;
        ensure!(
            reply.kind == FrameKind::Abort,
            "{count} vCPUs: expected an Abort, got {:?}",
            reply.kind
        );
        let reason = protocol::decode_reason(&reply.payload);
        ensure!(
            reason.contains(&format!("{count} vCPU")),
            "the reason should name the count {count}: {reason}"
        );
        let err = dest
            .join()
            .unwrap()
            .err()
            .context("the destination must refuse")?;
        ensure!(
            matches!(err, MigrationError::PrepareVcpus { count: c, .. } if c == count),
            "{err:?}"
        );
    }
    Ok(())
}

/// Drops the last vCPU's section: a state that carries fewer vCPUs than the
/// Hello announced (and the destination created).
struct LastVcpuMissing;

impl VmHooks for LastVcpuMissing {
    fn saved_sections(&self, mut sections: Vec<DeviceSection>) -> Vec<DeviceSection> {
        let last = sections
            .iter()
            .rposition(|s| s.name == ferry_vm::VCPU_SECTION.name)
            .expect("a vcpu section");
        sections.remove(last);
        sections
    }
}

/// The destination creates the vCPUs the Hello announced before the
/// stream; a state that then carries another count is refused before GO
/// and the guest runs on at the source.
#[test]
fn a_state_with_fewer_vcpus_than_announced_is_refused_and_the_guest_stays() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("a_state_with_fewer_vcpus_than_announced_is_refused") else {
        return Ok(());
    };
    let vm = common::boot_cpus(64, GUEST, ferry_vm::DirtyBackend::Bitmap, 2)?;
    let (_, dest_err) = refused_before_go(&vm, LastVcpuMissing)?;
    ensure!(
        matches!(dest_err, MigrationError::RestoreState(_)),
        "{dest_err:?}"
    );
    let chain = format!("{:#}", anyhow::Error::from(dest_err));
    ensure!(
        chain.contains("the state carries 1 vCPU(s), this VM has 2"),
        "the destination says: {chain}"
    );
    assert_alive(&vm, "source")?;
    Ok(())
}
