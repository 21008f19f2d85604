//! Migration over several ferry lanes (plaintext and mutual TLS) between two
//! real KVM guests in one process: pages are striped over every lane, the
//! guest lives on, and a lane cut mid-stream leaves it on the source.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use common::{assert_alive, boot, kvm_or_skip, wait_status};
use ferry_engine::{
    DestinationMigration, DestinationOptions, DestinationSummary, MigrationError, MigrationOptions,
    MigrationSummary, SourceMigration,
};
use ferry_transport::lanes::LaneListener;
use ferry_transport::tls::{generate_cert_set, TlsSettings};
use ferry_transport::{LaneOptions, Lanes, Security};
use ferry_vm::{RunState, Vm};

const TSC: &str = "tsc_khz=2300000";

type DestinationResult = Result<(Vm, DestinationSummary), MigrationError>;

/// A destination accepting one lane session on its own thread.
fn destination(
    security: Security,
) -> Result<(
    std::net::SocketAddr,
    std::thread::JoinHandle<DestinationResult>,
)> {
    let mut listener = LaneListener::bind("127.0.0.1:0", LaneOptions::new(1, security))?;
    let addr = listener.local_addr()?;
    let thread = std::thread::spawn(move || {
        let lanes = listener.accept_session().expect("lane session");
        DestinationMigration::accept_lanes(lanes, &DestinationOptions::default(), common::incoming)
    });
    Ok((addr, thread))
}

/// Checks that hold after any successful migration over `lanes` lanes.
fn lived_on(
    vm: &Arc<Vm>,
    summary: &MigrationSummary,
    dest: (Vm, DestinationSummary),
    lanes: usize,
) -> Result<()> {
    let (dest_vm, dest_summary) = dest;
    ensure!(summary.memory_digest == dest_summary.memory_digest);
    ensure!(vm.run_state() == RunState::Paused, "source still runs");
    let per_lane = &dest_summary.wire_bytes_per_lane;
    eprintln!("bytes per lane: {per_lane:?}");
    ensure!(per_lane.len() == lanes, "{} lanes seen", per_lane.len());
    // Every lane carried a real share of the pages, not only its RoundEnds.
    for (lane, &bytes) in per_lane.iter().enumerate() {
        ensure!(
            bytes > 4 << 20,
            "lane {lane} carried only {bytes} bytes: pages are not striped"
        );
    }
    let status = assert_alive(&dest_vm, "destination")?;
    ensure!(status.verify_errors == 0);
    Ok(())
}

#[test]
fn a_dirtying_guest_migrates_over_four_plaintext_lanes() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("a_dirtying_guest_migrates_over_four_plaintext_lanes") else {
        return Ok(());
    };
    let vm = boot(128, &format!("rate=20000 wss=all {TSC}"))?;
    let st = vm.status();
    wait_status(&vm, Duration::from_secs(10), |s| {
        s.pages_dirtied > st.pages_dirtied + 1000
    });
    let (addr, dest) = destination(Security::Insecure)?;
    let lanes = Lanes::connect(addr, &LaneOptions::new(4, Security::Insecure))?;
    let summary =
        SourceMigration::new(vm.clone(), MigrationOptions::default()).run_lanes(lanes, |_| {})?;
    eprintln!("{}", serde_json::to_string(&summary)?);
    ensure!(summary.rounds >= 2, "a dirtying guest needs dirty rounds");
    lived_on(&vm, &summary, dest.join().expect("destination thread")?, 4)
}

#[test]
fn a_guest_migrates_over_three_mutual_tls_lanes() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("a_guest_migrates_over_three_mutual_tls_lanes") else {
        return Ok(());
    };
    let certs = generate_cert_set(&["source", "destination"])?;
    let security = |i: usize| -> Result<Security> {
        let (_, cert, key) = &certs.nodes[i];
        Ok(Security::Tls(Arc::new(TlsSettings::from_pem(
            cert,
            key,
            &certs.ca_pem,
            "localhost",
        )?)))
    };
    let vm = boot(64, &format!("rate=5000 wss=16M {TSC}"))?;
    let (addr, dest) = destination(security(1)?)?;
    let lanes = Lanes::connect(addr, &LaneOptions::new(3, security(0)?))?;
    let summary =
        SourceMigration::new(vm.clone(), MigrationOptions::default()).run_lanes(lanes, |_| {})?;
    lived_on(&vm, &summary, dest.join().expect("destination thread")?, 3)
}

#[test]
fn cutting_one_page_lane_mid_stream_leaves_the_guest_on_the_source() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("cutting_one_page_lane_mid_stream_leaves_the_guest_on_the_source")
    else {
        return Ok(());
    };
    let vm = boot(128, &format!("rate=2000 wss=all {TSC}"))?;
    let (addr, dest) = destination(Security::Insecure)?;
    let mut lanes = Lanes::connect(addr, &LaneOptions::new(3, Security::Insecure))?;
    let cut = lanes.lane_mut(2).expect("lane 2").closer()?;
    // 128 MiB at 40 MB/s: the cut lands in round 0.
    let opts = MigrationOptions {
        max_bandwidth: Some(40_000_000),
        ..MigrationOptions::default()
    };
    let cutter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(800));
        cut.close();
    });
    let result = SourceMigration::new(vm.clone(), opts).run_lanes(lanes, |_| {});
    cutter.join().expect("cutter thread");
    eprintln!("source: {result:?}");
    ensure!(
        result.is_err(),
        "the migration must fail when a lane is cut"
    );
    let dest_result = dest.join().expect("destination thread");
    ensure!(
        dest_result.is_err(),
        "the destination must not take the guest"
    );
    eprintln!("destination: {:?}", dest_result.err());
    ensure!(
        vm.run_state() == RunState::Running,
        "source vCPU is {:?}",
        vm.run_state()
    );
    assert_alive(&vm, "source after the cut")?;
    Ok(())
}
