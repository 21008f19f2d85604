//! A guest larger than 3 GiB (RAM below the 3-4 GiB hole and above 4 GiB,
//! two KVM slots) migrates live between two real KVM VMs: every region's
//! digest matches, and the guest's self-check finds no bad page on either
//! side of the hole.

mod common;

use std::time::Duration;

use anyhow::{ensure, Result};
use common::{assert_alive, boot, kvm_or_skip, migrate_to, wait_status, Destination};
use ferry_engine::{ConvergencePolicy, DestinationOptions, MigrationOptions, OnDeadline};
use ferry_vm::{RunState, HIGH_MEM_BASE, LOW_MEM_END};

const GIB: u64 = 1 << 30;
/// The guest: 6 GiB, 3 below the hole and 3 above it.
const MEM_MIB: u64 = 6 << 10;

/// Host memory this test needs: the source guest (filled) and the
/// destination's (populated before the stream), plus room for the rest.
fn enough_memory(test: &str) -> bool {
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib << 10);
    let need = 13 * GIB;
    if available >= need {
        return true;
    }
    assert!(
        std::env::var_os("FERRY_NO_SKIP").is_none(),
        "FERRY_NO_SKIP is set, so {test} may not skip: {} GiB available, it needs {}",
        available / GIB,
        need / GIB
    );
    eprintln!(
        "SKIP {test}: {} MiB of host memory available, this test needs {} GiB (two 6 GiB guests)",
        available >> 20,
        need / GIB
    );
    false
}

#[test]
fn a_6_gib_guest_with_the_hole_migrates_live_with_matching_region_digests() -> Result<()> {
    let test = "a_6_gib_guest_with_the_hole_migrates_live_with_matching_region_digests";
    let Some(_kvm) = kvm_or_skip(test) else {
        return Ok(());
    };
    if !enough_memory(test) {
        return Ok(());
    }
    // Filled everywhere (so every page can be self-checked), dirtying all
    // of it in a strided walk: writes land on both sides of the hole. A
    // modest rate keeps the rounds short while logging makes every first
    // write a fault (GUEST.md).
    let vm = boot(MEM_MIB, "rate=5000 wss=all tsc_khz=2300000 verify=64")?;
    let st = vm.status();
    ensure!(st.ram_ranges == 2, "the guest sees one RAM range: {st:?}");
    ensure!(
        st.ram[1] == (HIGH_MEM_BASE, HIGH_MEM_BASE + 3 * GIB),
        "RAM above the hole: {:?}",
        st.ram
    );
    ensure!(
        st.ram[0].1 == LOW_MEM_END,
        "RAM below the hole: {:?}",
        st.ram
    );
    wait_status(&vm, Duration::from_secs(10), |s| {
        s.pages_dirtied > st.pages_dirtied + 1000
    });

    let dest = Destination::spawn(DestinationOptions::default())?;
    let opts = MigrationOptions {
        convergence: ConvergencePolicy {
            // A behaviour test: a loaded machine's longer pause must not fail it.
            on_deadline: OnDeadline::Force,
            ..ConvergencePolicy::default()
        },
        ..MigrationOptions::default()
    };
    let (result, _) = migrate_to(&vm, dest.addr, opts);
    let summary = result?;
    let (dest_vm, dest_summary) = dest.join()?;
    eprintln!("{test}: {}", serde_json::to_string(&summary)?);

    ensure!(
        vm.run_state() == RunState::Paused,
        "source is {:?}",
        vm.run_state()
    );
    let at_switchover = vm.status();
    // One digest per region, both sides the same, adding up to the total.
    let starts: Vec<u64> = summary
        .region_digests
        .iter()
        .map(|r| r.guest_phys_addr)
        .collect();
    ensure!(starts == [0, HIGH_MEM_BASE], "regions {starts:?}");
    ensure!(
        summary.region_digests == dest_summary.region_digests,
        "region digests differ: source {:?}, destination {:?}",
        summary.region_digests,
        dest_summary.region_digests
    );
    let sum = summary
        .region_digests
        .iter()
        .fold(0u64, |a, r| a.wrapping_add(r.digest));
    ensure!(sum == summary.memory_digest && sum == dest_summary.memory_digest);
    ensure!(summary.memory_bytes == MEM_MIB << 20);

    // The guest goes on at the destination, self-checking on both sides of
    // the hole, from its switchover values.
    let st = assert_alive(&dest_vm, "destination")?;
    ensure!(st.ram_ranges == 2 && st.ram == at_switchover.ram);
    ensure!(st.heartbeat >= at_switchover.heartbeat);
    let later = wait_status(&dest_vm, Duration::from_secs(20), |s| {
        s.pages_dirtied > at_switchover.pages_dirtied + 1000
            && s.pages_verified > at_switchover.pages_verified + 10_000
    });
    ensure!(
        later.pages_dirtied > at_switchover.pages_dirtied
            && later.pages_verified > at_switchover.pages_verified,
        "destination guest stalls: {later:?}"
    );
    ensure!(
        later.verify_errors_total() == 0,
        "destination guest found bad pages (first at {:#x})",
        later.first_bad_addr
    );
    Ok(())
}
