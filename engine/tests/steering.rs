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
