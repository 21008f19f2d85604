//! Steering a running migration from another thread: a cancel before GO
//! leaves the guest running on the source; a lower bandwidth cap shows in
//! the next round.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use anyhow::Result;
use common::{assert_alive, boot, kvm_or_skip, Destination};
use ferry_engine::{
    DestinationOptions, MigrationError, MigrationOptions, MigrationSteering, ProgressEvent, Retune,
    SourceMigration,
};
use ferry_transport::tcp;

const GUEST: &str = "rate=2000 wss=4M tsc_khz=2300000";

#[test]
fn a_cancel_before_go_ends_the_migration_with_the_guest_running_here() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("a_cancel_before_go_ends_the_migration") else {
        return Ok(());
    };
    let vm = boot(64, GUEST)?;
    let dst = Destination::spawn(DestinationOptions::default())?;
    let steering = MigrationSteering::new();
    // 4 MiB/s: round 0 of a 64 MiB guest takes seconds, time to cancel.
    let opts = MigrationOptions {
        max_bandwidth: Some(4 << 20),
        ..MigrationOptions::default()
    };
    let conn = tcp::connect(dst.addr)?;
    let cancel = steering.clone();
    let mut asked = false;
    let result = SourceMigration::new(vm.clone(), opts)
        .steered_by(steering)
        .run(conn, |e| {
            if matches!(e, ProgressEvent::RoundProgress { .. }) && !asked {
                cancel.cancel().expect("a cancel before GO is accepted");
                asked = true;
            }
        });
    assert!(
        matches!(result, Err(MigrationError::Cancelled)),
        "{result:?}"
    );
    assert!(
        dst.join().is_err(),
        "the destination must not run the guest"
    );
    assert_alive(&vm, "after a cancel")?;
    Ok(())
}

#[test]
fn a_lower_bandwidth_cap_shows_in_the_next_round() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("a_lower_bandwidth_cap_shows_in_the_next_round") else {
        return Ok(());
    };
    let vm = boot(64, GUEST)?;
    let dst = Destination::spawn(DestinationOptions::default())?;
    let steering = MigrationSteering::new();
    let conn = tcp::connect(dst.addr)?;
    let (tx, rx) = mpsc::channel();
    let tune = steering.clone();
    let mut retuned = false;
    // A limit round 0 cannot meet, so round 1 runs (under the new cap).
    let mut opts = MigrationOptions::default();
    opts.convergence.max_downtime = Duration::from_micros(1);
    opts.convergence.settle_downtime = Duration::from_micros(1);
    let result = SourceMigration::new(vm.clone(), opts)
        .steered_by(steering)
        .run(conn, |e| {
            if let ProgressEvent::RoundFinished {
                round,
                wire_bytes,
                duration,
                ..
            } = &e
            {
                let _ = tx.send((*round, *wire_bytes, *duration));
                if !retuned {
                    tune.retune(Retune {
                        max_bandwidth: Some(2 << 20),
                        max_downtime: Some(Duration::from_millis(2000)),
                        ..Retune::default()
                    })
                    .expect("a retune while live is accepted");
                    retuned = true;
                }
            }
        });
    let summary = result?;
    dst.join()?;
    let rounds: Vec<_> = rx.try_iter().collect();
    // Round 1 ran under the new cap: its rate stays near 2 MiB/s (one
    // burst of 64 KiB above it at most), far below round 0's loopback rate.
    let Some(&(1, bytes, d)) = rounds.get(1) else {
        panic!("no round 1: {rounds:?}");
    };
    let cap = (2u64 << 20) as f64 * d.as_secs_f64() + f64::from(1u32 << 20);
    assert!((bytes as f64) <= cap, "round 1: {bytes} bytes in {d:?}");
    assert!(summary.rounds >= 2);
    Ok(())
}

/// The pre-GO hook runs once, with the guest paused, before GO: when it
/// agrees the migration completes and its time is in the pause's
/// breakdown; when it refuses with `keep_paused` the destination never
/// runs the guest and the source's copy stays paused (it no longer owns
/// it); a plain refusal resumes the guest here.
#[test]
fn the_pre_go_hook_decides_whether_go_is_sent() -> Result<()> {
    use ferry_engine::{PreGoHook, PreGoRefusal};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let Some(_kvm) = kvm_or_skip("the_pre_go_hook_decides_whether_go_is_sent") else {
        return Ok(());
    };
    // Agrees: completes, the hook ran once while the guest was paused.
    let vm = boot(64, GUEST)?;
    let dst = Destination::spawn(DestinationOptions::default())?;
    let calls = Arc::new(AtomicUsize::new(0));
    let (seen, paused_vm) = (calls.clone(), vm.clone());
    let opts = MigrationOptions {
        pre_go: Some(PreGoHook::new(move || {
            assert!(
                !matches!(paused_vm.run_state(), ferry_vm::RunState::Running),
                "the guest is paused when the hook runs"
            );
            seen.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })),
        ..MigrationOptions::default()
    };
    let summary = SourceMigration::new(vm.clone(), opts).run(tcp::connect(dst.addr)?, |_| {})?;
    let (moved, _) = dst.join()?;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(summary.downtime_parts.pre_go <= summary.downtime_parts.go_to_resume);
    assert_alive(&moved, "after a migration the hook agreed to")?;

    for keep_paused in [true, false] {
        let vm = boot(64, GUEST)?;
        let dst = Destination::spawn(DestinationOptions::default())?;
        let opts = MigrationOptions {
            pre_go: Some(PreGoHook::new(move || {
                Err(PreGoRefusal {
                    reason: "the record moved elsewhere".into(),
                    keep_paused,
                })
            })),
            ..MigrationOptions::default()
        };
        let result = SourceMigration::new(vm.clone(), opts).run(tcp::connect(dst.addr)?, |_| {});
        let err = result.expect_err("a refused GO fails the migration");
        assert!(
            matches!(err, MigrationError::PreGoRefused { keep_paused: k, .. } if k == keep_paused),
            "{err:?}"
        );
        assert_eq!(err.source_left_paused(), keep_paused);
        assert!(
            dst.join().is_err(),
            "the destination must not run the guest"
        );
        if keep_paused {
            assert!(
                !matches!(vm.run_state(), ferry_vm::RunState::Running),
                "a guest the source no longer owns stays paused"
            );
            let before = vm.status().heartbeat;
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(vm.status().heartbeat, before, "a paused guest does not run");
        } else {
            assert_alive(&vm, "after a refused GO")?;
        }
    }
    Ok(())
}

/// The pre-pause hook runs once, with the guest still running, after the
/// live rounds and before the pause: when it agrees the migration
/// completes; a refusal abandons it before the pause, the guest running
/// here, or paused when the refusal says `keep_paused` (the destination
/// never runs it either way).
#[test]
fn the_pre_pause_hook_decides_before_the_pause() -> Result<()> {
    use ferry_engine::{PreGoHook, PreGoRefusal};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let Some(_kvm) = kvm_or_skip("the_pre_pause_hook_decides_before_the_pause") else {
        return Ok(());
    };
    let vm = boot(64, GUEST)?;
    let dst = Destination::spawn(DestinationOptions::default())?;
    let calls = Arc::new(AtomicUsize::new(0));
    let (seen, running_vm) = (calls.clone(), vm.clone());
    let opts = MigrationOptions {
        pre_pause: Some(PreGoHook::new(move || {
            assert!(
                matches!(running_vm.run_state(), ferry_vm::RunState::Running),
                "the guest runs when the pre-pause hook runs"
            );
            seen.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })),
        ..MigrationOptions::default()
    };
    SourceMigration::new(vm.clone(), opts).run(tcp::connect(dst.addr)?, |_| {})?;
    let (moved, _) = dst.join()?;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_alive(&moved, "after a migration the pre-pause hook agreed to")?;

    for keep_paused in [true, false] {
        let vm = boot(64, GUEST)?;
        let dst = Destination::spawn(DestinationOptions::default())?;
        let opts = MigrationOptions {
            pre_pause: Some(PreGoHook::new(move || {
                Err(PreGoRefusal {
                    reason: "the ownership swap failed".into(),
                    keep_paused,
                })
            })),
            ..MigrationOptions::default()
        };
        let err = SourceMigration::new(vm.clone(), opts)
            .run(tcp::connect(dst.addr)?, |_| {})
            .expect_err("a refusal before the pause fails the migration");
        assert!(
            matches!(err, MigrationError::PrePauseRefused { keep_paused: k, .. } if k == keep_paused),
            "{err:?}"
        );
        assert_eq!(err.source_left_paused(), keep_paused);
        assert!(
            dst.join().is_err(),
            "the destination must not run the guest"
        );
        if keep_paused {
            let before = vm.status().heartbeat;
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(vm.status().heartbeat, before, "a paused guest does not run");
        } else {
            assert_alive(&vm, "after a refusal before the pause")?;
        }
    }
    Ok(())
}
