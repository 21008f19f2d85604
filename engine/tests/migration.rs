//! Live migration between two real KVM guests in one process, over
//! loopback TCP: the happy paths and convergence.

mod common;

use std::time::Duration;

use anyhow::{ensure, Result};
use common::{
    assert_alive, boot, boot_cpus, boot_with, kvm_or_skip, migrate_to, wait_status, Destination,
    FrameFault, FrameRelay,
};
use ferry_engine::{
    ConvergeMode, ConvergencePolicy, Decision, DestinationOptions, DestinationSummary,
    MigrationError, MigrationOptions, MigrationSummary, ProgressEvent,
};
use ferry_vm::{DirtyBackend, RunState};

const TSC: &str = "tsc_khz=2300000";

fn options(policy: ConvergencePolicy) -> MigrationOptions {
    MigrationOptions {
        convergence: policy,
        ..MigrationOptions::default()
    }
}

/// Migrate a guest booted with `cmdline` and check it lives on at the
/// destination and no longer runs at the source.
fn migrates_and_lives_on(
    test: &str,
    mem_mib: u64,
    cmdline: &str,
    opts: MigrationOptions,
) -> Result<Vec<ProgressEvent>> {
    migrates_and_lives_on_with(test, mem_mib, cmdline, opts, DirtyBackend::Bitmap)
}

fn migrates_and_lives_on_with(
    test: &str,
    mem_mib: u64,
    cmdline: &str,
    opts: MigrationOptions,
    dirty: DirtyBackend,
) -> Result<Vec<ProgressEvent>> {
    migrates_and_lives_on_through(test, mem_mib, cmdline, opts, dirty, None)
}

/// As [`migrates_and_lives_on_with`], through a [`FrameRelay`] with
/// `relay`'s fault when there is one; the summary is the last event's.
fn migrates_and_lives_on_through(
    test: &str,
    mem_mib: u64,
    cmdline: &str,
    opts: MigrationOptions,
    dirty: DirtyBackend,
    relay: Option<FrameFault>,
) -> Result<Vec<ProgressEvent>> {
    let Some(_kvm) = kvm_or_skip(test) else {
        return Ok(Vec::new());
    };
    let vm = boot_with(mem_mib, cmdline, dirty)?;
    let dirtying = !cmdline.contains("rate=0");
    if dirtying {
        // Let it dirty a while before migrating.
        let st = vm.status();
        wait_status(&vm, Duration::from_secs(10), |s| {
            s.pages_dirtied > st.pages_dirtied + 1000
        });
    }
    let dest = Destination::spawn(DestinationOptions::default())?;
    let relay = relay
        .map(|fault| FrameRelay::spawn(dest.addr, fault))
        .transpose()?;
    let to = relay.as_ref().map_or(dest.addr, |r| r.addr);
    let (result, events) = migrate_to(&vm, to, opts);
    let summary = result?;
    let (dest_vm, dest_summary) = dest.join()?;
    if let Some(relay) = relay {
        relay.join();
    }
    eprintln!("{test}: {}", serde_json::to_string(&summary)?);
    for e in &events {
        if let ProgressEvent::RoundFinished { .. } = e {
            eprintln!("  {}", serde_json::to_string(e)?);
        }
    }

    // The source is paused for good and frozen at the switchover.
    ensure!(
        vm.run_state() == RunState::Paused,
        "source vCPU is {:?}",
        vm.run_state()
    );
    let at_switchover = vm.status();
    std::thread::sleep(Duration::from_millis(200));
    ensure!(
        vm.status() == at_switchover,
        "the source guest still changes after the handover"
    );

    // Both sides agree on memory.
    ensure!(
        summary.memory_digest == dest_summary.memory_digest,
        "digests differ"
    );
    ensure!(
        summary.wire_bytes == dest_summary.wire_bytes,
        "sent {} bytes, received {}",
        summary.wire_bytes,
        dest_summary.wire_bytes
    );

    // The destination continues where the source stopped.
    let st = assert_alive(&dest_vm, "destination")?;
    ensure!(
        st.heartbeat >= at_switchover.heartbeat,
        "destination heartbeat {} below the source's last {}",
        st.heartbeat,
        at_switchover.heartbeat
    );
    ensure!(
        st.verify_errors == 0,
        "destination guest found bad pages: {st:?}"
    );
    if dirtying {
        let later = wait_status(&dest_vm, Duration::from_secs(10), |s| {
            s.pages_dirtied > at_switchover.pages_dirtied + 1000
        });
        ensure!(
            later.pages_dirtied > at_switchover.pages_dirtied,
            "destination does not dirty pages: {} vs {} at switchover",
            later.pages_dirtied,
            at_switchover.pages_dirtied
        );
    }
    ensure!(
        summary.rounds >= 2,
        "expected round 0 and the final round, got {}",
        summary.rounds
    );
    ensure!(summary.pages.sent() > 0 && summary.wire_bytes > 0);
    ensure!(matches!(
        events.last(),
        Some(ProgressEvent::Completed { .. })
    ));
    Ok(events)
}

/// Every vCPU's loop goes on at the destination from its switchover values.
fn every_vcpu_lives_on(dest: &ferry_vm::Vm, at_switchover: &ferry_vm::GuestStatus) -> Result<()> {
    let later = wait_status(dest, Duration::from_secs(20), |s| {
        s.vcpus().len() == at_switchover.vcpus().len()
            && s.vcpus()
                .iter()
                .zip(at_switchover.vcpus())
                .all(|(now, then)| {
                    now.heartbeat > then.heartbeat + 5
                        && now.pages_dirtied > then.pages_dirtied + 500
                })
    });
    ensure!(
        later.vcpus().len() == at_switchover.vcpus().len(),
        "{} loops at the destination, {} at the switchover",
        later.vcpus().len(),
        at_switchover.vcpus().len()
    );
    for (i, (now, then)) in later.vcpus().iter().zip(at_switchover.vcpus()).enumerate() {
        ensure!(
            now.heartbeat > then.heartbeat + 5 && now.pages_dirtied > then.pages_dirtied + 500,
            "vCPU {i} does not go on: {then:?} at the switchover, {now:?} later"
        );
        ensure!(
            now.verify_errors == 0,
            "vCPU {i} found bad pages (first at {:#x})",
            now.first_bad_addr
        );
    }
    Ok(())
}

#[test]
fn two_vcpus_both_dirtying_migrate_live() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("two_vcpus_both_dirtying_migrate_live") else {
        return Ok(());
    };
    let vm = boot_cpus(
        128,
        &format!("rate=20000 wss=32 cpus=2 {TSC}"),
        DirtyBackend::Bitmap,
        2,
    )?;
    let st = vm.status();
    ensure!(st.cpus == 2, "the guest runs {} loops: {st}", st.cpus);
    wait_status(&vm, Duration::from_secs(10), |s| {
        s.vcpus()
            .iter()
            .zip(st.vcpus())
            .all(|(now, then)| now.pages_dirtied > then.pages_dirtied + 1000)
    });
    let dest = Destination::spawn(DestinationOptions::default())?;
    let (result, _) = migrate_to(&vm, dest.addr, options(ConvergencePolicy::default()));
    let summary = result?;
    let (dest_vm, dest_summary) = dest.join()?;
    eprintln!("two vCPUs: {}", serde_json::to_string(&summary)?);
    ensure!(
        vm.run_state() == RunState::Paused,
        "source is {:?}",
        vm.run_state()
    );
    ensure!(
        summary.memory_digest == dest_summary.memory_digest,
        "digests differ"
    );
    ensure!(
        dest_vm.vcpu_count() == 2,
        "the destination made {} vCPUs",
        dest_vm.vcpu_count()
    );
    every_vcpu_lives_on(&dest_vm, &vm.status())
}

/// Timer mode (`hz=100`, vm/guest/GUEST.md): the guest takes PIT interrupts
/// and counts them as its clock. After the move the destination's PIT
/// keeps interrupting it (the count rises from its switchover value), and
/// its clock is continuous: never below its switchover value, and moved on
/// across the switchover by no more than the downtime plus two ticks
/// (20 ms: one tick in flight at each end), since the PIT runs on host time
/// and the restored one restarts at the restore, within the downtime.
fn unix_ns() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is past 1970");
    u64::try_from(d.as_nanos()).expect("ns fit u64")
}

#[test]
fn a_timer_guest_migrates_and_keeps_ticking_with_a_continuous_clock() -> Result<()> {
    const HZ: u64 = 100;
    let Some(_kvm) = kvm_or_skip("a_timer_guest_migrates_and_keeps_ticking") else {
        return Ok(());
    };
    let vm = boot_cpus(
        64,
        &format!("rate=2000 wss=8 hz={HZ} {TSC}"),
        DirtyBackend::Bitmap,
        1,
    )?;
    let st = vm.status();
    let st_at = std::time::Instant::now();
    ensure!(st.hz == HZ, "the guest did not start its timer: {st}");
    let ticking = wait_status(&vm, Duration::from_secs(30), |s| s.ticks >= st.ticks + 20);
    let source_rate = (ticking.ticks - st.ticks) as f64 / st_at.elapsed().as_secs_f64();
    ensure!(
        ticking.ticks >= st.ticks + 20,
        "no ticks on the source: {ticking}"
    );
    let dest = Destination::spawn(DestinationOptions::default())?;
    let opts = options(ConvergencePolicy {
        // A loaded machine's pause may run a few ms long: not what this tests.
        on_deadline: ferry_engine::OnDeadline::Force,
        ..ConvergencePolicy::default()
    });
    let (result, _) = migrate_to(&vm, dest.addr, opts);
    let summary = result?;
    let (dest_vm, _) = dest.join()?;
    let first = dest_vm.status();
    let first_at = std::time::Instant::now();
    // How long the destination had run when `first` was read.
    let ran_ns = unix_ns().saturating_sub(dest_vm.resumed_at_unix_ns());
    let at_switchover = vm.status();
    ensure!(
        vm.run_state() == RunState::Paused,
        "source is {:?}",
        vm.run_state()
    );
    ensure!(
        first.ticks >= at_switchover.ticks,
        "the clock went back: {} ticks at the switchover, {} at the destination",
        at_switchover.ticks,
        first.ticks
    );
    let later = wait_status(&dest_vm, Duration::from_secs(30), |s| {
        s.ticks >= at_switchover.ticks + 50 && s.halts > at_switchover.halts
    });
    ensure!(
        later.ticks >= at_switchover.ticks + 50 && later.halts > at_switchover.halts,
        "the destination does not tick: {at_switchover} at the switchover, {later} later"
    );
    let later_at = std::time::Instant::now();
    ensure!(later.is_healthy(), "{later}");
    ensure!(later.pages_dirtied > at_switchover.pages_dirtied, "{later}");
    // Measured, not asserted (timing): the tick rate on both sides, and
    // how far the guest's clock fell behind host time across the move
    // (the ticks of the downtime that are not replayed, vm/guest/GUEST.md).
    let dest_rate =
        (later.ticks - first.ticks) as f64 / (later_at - first_at).as_secs_f64().max(1e-3);
    let host_ms = (later_at - st_at).as_secs_f64() * 1000.0;
    let lag_ms = host_ms - ((later.ticks - st.ticks) * 1000 / HZ) as f64;
    eprintln!(
        "timer guest: {source_rate:.1} ticks/s at the source, {dest_rate:.1} at the destination; \
         the clock {lag_ms:.0} ms behind host time after a {:?} downtime",
        summary.downtime
    );
    // The jump across the switchover, in ms of guest clock, against the
    // host time it can cover: the downtime and how long the destination
    // had run when it was read.
    let jump_ms = (first.ticks - at_switchover.ticks) * 1000 / HZ;
    let allowed_ms = u64::try_from((summary.downtime + Duration::from_nanos(ran_ns)).as_millis())?
        + 2 * 1000 / HZ;
    eprintln!(
        "timer guest: downtime {:?}, clock jump {jump_ms} ms (allowed {allowed_ms} ms), {} -> {} ticks",
        summary.downtime, at_switchover.ticks, later.ticks
    );
    ensure!(
        jump_ms <= allowed_ms,
        "the clock jumped {jump_ms} ms forward across a {:?} downtime",
        summary.downtime
    );
    Ok(())
}

#[test]
fn idle_guest_migrates() -> Result<()> {
    let events = migrates_and_lives_on(
        "idle_guest_migrates",
        128,
        &format!("rate=0 {TSC}"),
        options(ConvergencePolicy::default()),
    )?;
    // JSON progress works for every event.
    for e in &events {
        serde_json::to_string(e)?;
    }
    Ok(())
}

#[test]
fn dirtying_guest_migrates() -> Result<()> {
    migrates_and_lives_on(
        "dirtying_guest_migrates",
        128,
        &format!("rate=20000 wss=32M {TSC}"),
        options(ConvergencePolicy::default()),
    )?;
    Ok(())
}

#[test]
fn dirtying_guest_migrates_with_the_kvm_dirty_ring() -> Result<()> {
    let events = migrates_and_lives_on_with(
        "dirtying_guest_migrates_with_the_kvm_dirty_ring",
        128,
        &format!("rate=20000 wss=32M {TSC}"),
        options(ConvergencePolicy::default()),
        DirtyBackend::Ring(64 << 10),
    )?;
    let backend = events.iter().find_map(|e| match e {
        ProgressEvent::Started { dirty_log, .. } => Some(*dirty_log),
        _ => None,
    });
    ensure!(
        events.is_empty() || backend == Some("kvm-ring"),
        "dirty log used: {backend:?}"
    );
    Ok(())
}

#[test]
fn dirtying_guest_migrates_without_the_xor_cache() -> Result<()> {
    migrates_and_lives_on(
        "dirtying_guest_migrates_without_the_xor_cache",
        64,
        &format!("rate=5000 wss=16M {TSC}"),
        MigrationOptions {
            xor_cache_bytes: Some(0),
            ..MigrationOptions::default()
        },
    )?;
    Ok(())
}

/// A guest dirtying 40 MB/s of incompressible pages over a 16 MB/s link
/// (XOR deltas off, so each dirty page costs a full page).
fn faster_than_the_link(auto_converge: bool, deadline: Duration) -> MigrationOptions {
    MigrationOptions {
        convergence: ConvergencePolicy {
            auto_converge,
            deadline: Some(deadline),
            ..ConvergencePolicy::default()
        },
        max_bandwidth: Some(16_000_000),
        xor_cache_bytes: Some(0),
        ..MigrationOptions::default()
    }
}

const FAST_DIRTIER: &str = "rate=10000 wss=16M tsc_khz=2300000";

#[test]
fn a_guest_dirtying_faster_than_the_link_converges_with_auto_converge() -> Result<()> {
    let events = migrates_and_lives_on(
        "a_guest_dirtying_faster_than_the_link_converges_with_auto_converge",
        64,
        FAST_DIRTIER,
        faster_than_the_link(true, Duration::from_secs(120)),
    )?;
    if events.is_empty() {
        return Ok(()); // skipped
    }
    let throttled = events.iter().any(|e| {
        matches!(e, ProgressEvent::RoundFinished { assessment, .. } if matches!(assessment.decision, Decision::Throttle { .. }))
    });
    ensure!(
        throttled,
        "converged without throttling: the test does not test auto-converge"
    );
    Ok(())
}

/// Issue 13: auto-converge on the KVM dirty ring lost guest writes. A
/// throttled vCPU thread is kicked with a signal every 10 ms, and it resets
/// the rings on its ring-full exits; since Linux 6.17 a reset that finds a
/// signal pending stops and drops the pages it was about to re-protect,
/// which then stay writable and unlogged, so the destination got stale
/// pages (1-6 bad words per run). Here both vCPUs dirty, their rings are
/// small (a ring-full exit every ~200 faults, so the vCPU threads reset
/// many times while throttled) and the throttle climbs in small steps
/// through the range where the guest still runs: every page must arrive.
#[test]
fn auto_converge_on_the_dirty_ring_loses_no_guest_write() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("auto_converge_on_the_dirty_ring_loses_no_guest_write") else {
        return Ok(());
    };
    let vm = boot_cpus(
        32,
        &format!("rate=max wss=16M cpus=2 {TSC}"),
        DirtyBackend::Ring(4096),
        2,
    )?;
    let st = vm.status();
    ensure!(st.cpus == 2, "the guest runs {} loops: {st}", st.cpus);
    let mut opts = faster_than_the_link(true, Duration::from_secs(60));
    opts.convergence.converge = ConvergeMode::AutoConverge;
    opts.convergence.throttle_initial = 20;
    opts.convergence.throttle_step = 5;
    opts.convergence.on_deadline = ferry_engine::OnDeadline::Force;
    let dest = Destination::spawn(DestinationOptions::default())?;
    let (result, events) = migrate_to(&vm, dest.addr, opts);
    let summary = result?;
    let (dest_vm, dest_summary) = dest.join()?;
    eprintln!(
        "auto-converge on the ring: {}",
        serde_json::to_string(&summary)?
    );
    ensure!(summary.dirty_log == "kvm-ring", "{summary:?}");
    ensure!(
        summary.converge == ConvergeMode::AutoConverge,
        "{summary:?}"
    );
    let throttled = events.iter().any(|e| {
        matches!(e, ProgressEvent::RoundFinished { assessment, .. } if matches!(assessment.decision, Decision::Throttle { .. }))
    });
    ensure!(
        throttled,
        "converged without throttling: the test does not test auto-converge"
    );
    ensure!(
        summary.memory_digest == dest_summary.memory_digest,
        "digests differ"
    );
    ensure!(
        vm.status().verify_errors_total() == 0,
        "the source found bad pages"
    );
    every_vcpu_lives_on(&dest_vm, &vm.status())
}

/// Two vCPUs, only vCPU 0 dirtying (the guest runs `cpus=1` loop: the
/// other vCPU spins idle, vm/guest/GUEST.md), faster than the link: with
/// the dirty ring's per-vCPU counts, dirty-limit slows down vCPU 0 only,
/// the migration converges and both vCPUs run on at the destination.
#[test]
fn dirty_limit_throttles_only_the_dirtying_vcpu_and_converges() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("dirty_limit_throttles_only_the_dirtying_vcpu_and_converges")
    else {
        return Ok(());
    };
    let vm = boot_cpus(
        64,
        &format!("{FAST_DIRTIER} cpus=1"),
        DirtyBackend::Ring(64 << 10),
        2,
    )?;
    let st = vm.status();
    ensure!(st.cpus == 1, "the guest runs {} loops: {st}", st.cpus);
    let mut opts = faster_than_the_link(true, Duration::from_secs(120));
    opts.convergence.converge = ConvergeMode::DirtyLimit;
    opts.convergence.on_deadline = ferry_engine::OnDeadline::Force;
    let dest = Destination::spawn(DestinationOptions::default())?;
    let (result, events) = migrate_to(&vm, dest.addr, opts);
    let summary = result?;
    let (dest_vm, dest_summary) = dest.join()?;
    eprintln!("dirty-limit: {}", serde_json::to_string(&summary)?);
    assert_dirty_limited(&summary, &dest_summary, &events, &dest_vm)?;
    ensure!(
        vm.run_state() == RunState::Paused,
        "source is {:?}",
        vm.run_state()
    );
    assert_alive(&dest_vm, "destination")?;
    Ok(())
}

/// Two vCPUs both dirtying, at different paces (`rates=10000,300`,
/// vm/guest/GUEST.md: vCPU 0 at 10 000 pages/s, vCPU 1 at 300), the dirty
/// ring on, over a link slower than vCPU 0 alone: dirty-limit throttles
/// vCPU 0, and vCPU 1 not or less (it stays under the per-vCPU limit, ~975
/// pages/s here: half the link's 16 MB/s over two vCPUs, but for the
/// bursts `assert_dirty_limited` describes), the migration converges, and
/// both vCPUs go on dirtying at the destination with no bad page.
#[test]
fn dirty_limit_throttles_only_the_fast_one_of_two_dirtying_vcpus() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("dirty_limit_throttles_only_the_fast_one_of_two_dirtying_vcpus")
    else {
        return Ok(());
    };
    let vm = boot_cpus(
        64,
        &format!("rates=10000,300 wss=16M verify=64 cpus=2 {TSC}"),
        DirtyBackend::Ring(64 << 10),
        2,
    )?;
    let st = vm.status();
    ensure!(st.cpus == 2, "the guest runs {} loops: {st}", st.cpus);
    let both = wait_status(&vm, Duration::from_secs(10), |s| {
        s.vcpus()
            .iter()
            .zip(st.vcpus())
            .all(|(n, t)| n.pages_dirtied > t.pages_dirtied + 100)
    });
    ensure!(
        both.vcpus()
            .iter()
            .zip(st.vcpus())
            .all(|(n, t)| n.pages_dirtied > t.pages_dirtied + 100),
        "both loops must dirty: {both}"
    );
    let mut opts = faster_than_the_link(true, Duration::from_secs(120));
    opts.convergence.converge = ConvergeMode::DirtyLimit;
    opts.convergence.on_deadline = ferry_engine::OnDeadline::Force;
    let dest = Destination::spawn(DestinationOptions::default())?;
    let (result, events) = migrate_to(&vm, dest.addr, opts);
    let summary = result?;
    let (dest_vm, dest_summary) = dest.join()?;
    eprintln!(
        "dirty-limit, fast and slow: {}",
        serde_json::to_string(&summary)?
    );
    assert_dirty_limited(&summary, &dest_summary, &events, &dest_vm)?;
    ensure!(summary.converge_switches.is_empty(), "{summary:?}");
    ensure!(
        summary.vcpu_dirty_pages[1] > 0,
        "the slow vCPU 1 dirtied nothing: {:?}",
        summary.vcpu_dirty_pages
    );
    every_vcpu_lives_on(&dest_vm, &vm.status())
}

/// What a dirty-limit migration of a two-vCPU guest whose vCPU 0 dirties
/// fastest must show: dirty-limit stepped in and throttled vCPU 0, never
/// vCPU 1 (in no round), vCPU 0 dirtied more, both sides' memory digests
/// agree, and the destination starts unthrottled.
fn assert_dirty_limited(
    summary: &MigrationSummary,
    dest_summary: &DestinationSummary,
    events: &[ProgressEvent],
    dest_vm: &ferry_vm::Vm,
) -> Result<()> {
    ensure!(summary.converge == ConvergeMode::DirtyLimit, "{summary:?}");
    let limited = events.iter().any(|e| {
        matches!(e, ProgressEvent::RoundFinished { assessment, .. } if matches!(assessment.decision, Decision::LimitVcpus { .. }))
    });
    ensure!(limited, "converged without dirty-limit stepping in");
    // vCPU 0 is throttled, and harder than vCPU 1 in every round. vCPU 1
    // may be held back a little now and then: its loop is paced by the
    // guest's clock, so after the host has kept it off a core for a while
    // it dirties the pages it owes back to back, and a round that sees
    // that burst sees it over the limit (CI, `46cb0e3`'s tree, once in
    // eight runs: maximum throttles [99, 20], 3,231 pages against 11,364).
    let throttles = &summary.vcpu_max_throttle_percent;
    ensure!(
        throttles.len() == 2 && throttles[0] > 0 && throttles[1] < throttles[0],
        "vCPU 0 must be throttled, and harder than vCPU 1: {throttles:?}"
    );
    for e in events {
        if let ProgressEvent::RoundFinished { vcpu_throttles, .. } = e {
            let (fast, slow) = (
                vcpu_throttles.first().copied().unwrap_or(0),
                vcpu_throttles.get(1).copied().unwrap_or(0),
            );
            ensure!(
                slow == 0 || slow < fast,
                "vCPU 1 was throttled more than vCPU 0 in a round: {vcpu_throttles:?}"
            );
        }
    }
    let dirtied = &summary.vcpu_dirty_pages;
    ensure!(
        dirtied.len() == 2 && dirtied[0] > dirtied[1],
        "per-vCPU dirty counts: {dirtied:?}"
    );
    ensure!(
        summary.memory_digest == dest_summary.memory_digest,
        "digests differ"
    );
    ensure!(
        dest_vm.vcpu_throttles().iter().all(|&t| t == 0),
        "the destination starts unthrottled"
    );
    Ok(())
}

/// `--converge auto` on two vCPUs dirtying alike (`rates=6000,6000`) and
/// the dirty ring: it starts in dirty-limit (several vCPUs, per-vCPU
/// counts), and once a round shows no vCPU dominating (each ~50 % of the
/// pages, under the 55 % that keeps dirty-limit) it switches to
/// auto-converge: the summary names the start mode and lists the switch.
#[test]
fn the_summary_lists_the_modes_converge_auto_switched_to() -> Result<()> {
    let Some(_kvm) = kvm_or_skip("the_summary_lists_the_modes_converge_auto_switched_to") else {
        return Ok(());
    };
    let vm = boot_cpus(
        64,
        &format!("rates=6000,6000 wss=16M verify=64 cpus=2 {TSC}"),
        DirtyBackend::Ring(64 << 10),
        2,
    )?;
    let mut opts = faster_than_the_link(true, Duration::from_secs(120));
    opts.convergence.converge = ConvergeMode::Auto;
    opts.convergence.on_deadline = ferry_engine::OnDeadline::Force;
    let dest = Destination::spawn(DestinationOptions::default())?;
    let (result, _) = migrate_to(&vm, dest.addr, opts);
    let summary = result?;
    let (dest_vm, _) = dest.join()?;
    eprintln!(
        "converge auto: {} ({})",
        summary.converge_modes(),
        serde_json::to_string(&summary.converge_switches)?
    );
    ensure!(summary.converge == ConvergeMode::DirtyLimit, "{summary:?}");
    ensure!(
        summary.converge_switches.first().map(|s| s.to) == Some(ConvergeMode::AutoConverge),
        "no switch to auto-converge listed: {:?}",
        summary.converge_switches
    );
    ensure!(
        summary
            .converge_modes()
            .starts_with("dirty-limit, auto-converge from round "),
        "{}",
        summary.converge_modes()
    );
    every_vcpu_lives_on(&dest_vm, &vm.status())
}

/// Dirty-limit needs per-vCPU counts: with the bitmap log it is refused
/// before anything is sent, and the guest keeps running.
#[test]
fn dirty_limit_without_the_dirty_ring_is_refused_and_the_guest_stays() -> Result<()> {
    let Some(_kvm) =
        kvm_or_skip("dirty_limit_without_the_dirty_ring_is_refused_and_the_guest_stays")
    else {
        return Ok(());
    };
    let vm = boot_cpus(
        64,
        &format!("rate=1000 wss=4M {TSC}"),
        DirtyBackend::Bitmap,
        1,
    )?;
    let dest = Destination::spawn(DestinationOptions::default())?;
    let mut opts = options(ConvergencePolicy::default());
    opts.convergence.converge = ConvergeMode::DirtyLimit;
    let (result, _) = migrate_to(&vm, dest.addr, opts);
    ensure!(
        matches!(result, Err(MigrationError::DirtyLimitUnsupported { .. })),
        "{result:?}"
    );
    ensure!(
        result.unwrap_err().to_string().contains("dirty ring"),
        "the error names the fix"
    );
    let _ = dest.join();
    assert_alive(&vm, "source after the refusal")?;
    Ok(())
}

#[test]
fn without_auto_converge_it_is_abandoned_at_the_deadline_and_keeps_running() -> Result<()> {
    let Some(_kvm) =
        kvm_or_skip("without_auto_converge_it_is_abandoned_at_the_deadline_and_keeps_running")
    else {
        return Ok(());
    };
    let vm = boot(64, FAST_DIRTIER)?;
    let dest = Destination::spawn(DestinationOptions::default())?;
    let (result, events) = migrate_to(
        &vm,
        dest.addr,
        faster_than_the_link(false, Duration::from_secs(8)),
    );
    ensure!(
        matches!(result, Err(MigrationError::DeadlineExceeded { .. })),
        "expected the deadline to end it, got {result:?}"
    );
    ensure!(matches!(
        events.last(),
        Some(ProgressEvent::Abandoned { .. })
    ));
    ensure!(dest.join().is_err(), "the destination must not complete");
    assert_alive(&vm, "source after giving up")?;
    Ok(())
}

/// The pre-pause hook's time is not pause time. A hook that holds the
/// migration while the guest writes thousands of pages (as the HA
/// ownership swap, an etcd round trip, does on a busy host) must not leave
/// those pages to the pause: the final, paused round sends at most what
/// the guest wrote after the hook returned.
///
/// The guest's single loop walks 8192 working-set pages with a stride
/// coprime to their count and counts every write (`pages_dirtied`, after
/// the write): the hook's 2048 writes land on 2048 distinct pages. The
/// bound is read from that counter, not from a clock: at the hook's end
/// and with the guest paused. Besides working-set pages the guest writes
/// only its status block and stack, and one write may be counted only
/// after the pause: [`OUTSIDE_THE_LOOP`] pages.
///
/// The bound is on the final round's pages whose content changed (sent,
/// not skipped as unchanged), not on its dirty set: KVM's log here also
/// holds pages the guest did not write (15-700 per round, every round,
/// all found unchanged; seen under PVM), so a bound on the set alone
/// failed about one run in five with the fix in place.
#[test]
fn what_the_guest_dirties_during_the_pre_pause_hook_goes_out_before_the_pause() -> Result<()> {
    use ferry_engine::{PreGoHook, PreGoRefusal};
    use std::sync::{Arc, Mutex};
    /// Writes the hook waits for, far more than [`OUTSIDE_THE_LOOP`].
    const DURING_THE_HOOK: u64 = 2048;
    /// Pages a final set may hold beyond the loop's counted writes.
    const OUTSIDE_THE_LOOP: u64 = 16;
    let Some(_kvm) = kvm_or_skip("what_the_guest_dirties_during_the_pre_pause_hook") else {
        return Ok(());
    };
    let vm = boot(64, &format!("rate=20000 wss=32M {TSC}"))?;
    ensure!(
        vm.status().wss_pages == 8192,
        "working set: {}",
        vm.status()
    );
    // pages_dirtied when the hook started and when it returned.
    let hook_writes = Arc::new(Mutex::new(None));
    let (seen, guest) = (hook_writes.clone(), vm.clone());
    let opts = MigrationOptions {
        pre_pause: Some(PreGoHook::new(move || {
            let start = guest.status().pages_dirtied;
            let end = wait_status(&guest, Duration::from_secs(60), |s| {
                s.pages_dirtied >= start + DURING_THE_HOOK
            })
            .pages_dirtied;
            *seen.lock().expect("hook lock") = Some((start, end));
            if end < start + DURING_THE_HOOK {
                return Err(PreGoRefusal {
                    reason: format!("the guest wrote {} pages in 60 s", end - start),
                    keep_paused: false,
                });
            }
            Ok(())
        })),
        ..MigrationOptions::default()
    };
    let dest = Destination::spawn(DestinationOptions::default())?;
    let conn = ferry_transport::tcp::connect(dest.addr)?;
    // (final set, pages_dirtied with the guest paused)
    let mut at_pause = None;
    // Pages of the live rounds, by encoding: the summary's totals less
    // these are the final round's.
    let mut live = ferry_engine::encode::EncodingCounts::default();
    let summary = ferry_engine::SourceMigration::new(vm.clone(), opts).run(conn, |e| match e {
        ProgressEvent::StopAndCopy { dirty_pages } => {
            at_pause = Some((dirty_pages, vm.status().pages_dirtied));
        }
        ProgressEvent::RoundFinished { encodings, .. } => live.add(&encodings),
        _ => {}
    })?;
    let (dest_vm, dest_summary) = dest.join()?;
    let (start, end) = hook_writes
        .lock()
        .expect("hook lock")
        .take()
        .expect("the hook ran");
    let (final_set, paused) = at_pause.expect("a stop-and-copy");
    let all = summary.pages;
    // Final-round pages whose content had changed since they were sent.
    let final_changed = (all.zero + all.xor_delta + all.lz4 + all.raw)
        .saturating_sub(live.zero + live.xor_delta + live.lz4 + live.raw);
    eprintln!(
        "pre-pause hook: {} writes during it, {} after it, final set {final_set} pages of which {final_changed} changed, downtime {:?}",
        end - start,
        paused - end,
        summary.downtime
    );
    ensure!(
        final_changed <= paused - end + OUTSIDE_THE_LOOP,
        "the final round sent {final_changed} changed pages (of a set of {final_set}): what the guest wrote during the hook ({} writes), not only after it ({} writes)",
        end - start,
        paused - end
    );
    ensure!(
        summary.memory_digest == dest_summary.memory_digest,
        "digests differ"
    );
    assert_alive(&dest_vm, "destination")?;
    ensure!(
        dest_vm.status().verify_errors == 0,
        "the destination found bad pages: {}",
        dest_vm.status()
    );
    Ok(())
}

/// Memory like a real guest's (`fill=mix`: zero, text-like and
/// incompressible pages) over a link capped at 40 MB/s: compressing pays.
const MIX_IDLE: &str = "fill=mix rate=0 tsc_khz=2300000";

fn capped_mix() -> MigrationOptions {
    MigrationOptions {
        max_bandwidth: Some(40_000_000),
        ..MigrationOptions::default()
    }
}

/// The encoding decisions of the rounds.
fn round_choices(events: &[ProgressEvent]) -> Vec<ferry_engine::encode::EncodingDecision> {
    events
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::RoundFinished { encoding, .. } => Some(**encoding),
            _ => None,
        })
        .collect()
}

/// On a capped link with zstd negotiated, text-like pages travel as zstd
/// and land right: the destination ends with the same memory (digests,
/// the guest's own check of every page). Whether and when the source's
/// choice turns to zstd depends on how fast its probes run on this
/// machine (two CI runs: the turn came late in round 0, or after the last
/// round-end report), so that is left to `choose_encoding`'s own tests;
/// the zstd probe pages, sent as zstd when it is the smaller, go whatever
/// the choice.
#[test]
fn a_capped_link_sends_text_like_pages_as_zstd() -> Result<()> {
    let events = migrates_and_lives_on(
        "a_capped_link_sends_text_like_pages_as_zstd",
        128,
        MIX_IDLE,
        capped_mix(),
    )?;
    let Some(ProgressEvent::Completed { summary, .. }) = events.last() else {
        return Ok(()); // skipped
    };
    let choices = round_choices(&events);
    eprintln!("decisions: {}", serde_json::to_string(&choices)?);
    ensure!(
        choices.iter().any(|d| d.estimates.zstd_ns.is_some()),
        "zstd not considered: {choices:?}"
    );
    ensure!(summary.pages.zstd > 0, "no zstd page: {:?}", summary.pages);
    Ok(())
}

/// A destination that does not know zstd (its Hello arrives without the
/// feature, so it does not accept it) never gets a zstd page, probes
/// included: the same capped migration goes with LZ4.
#[test]
fn a_destination_without_zstd_never_gets_a_zstd_page() -> Result<()> {
    let events = migrates_and_lives_on_through(
        "a_destination_without_zstd_never_gets_a_zstd_page",
        128,
        MIX_IDLE,
        capped_mix(),
        DirtyBackend::Bitmap,
        Some(FrameFault::HelloWithout(
            ferry_engine::protocol::FEATURE_ZSTD,
        )),
    )?;
    let Some(ProgressEvent::Completed { summary, .. }) = events.last() else {
        return Ok(()); // skipped
    };
    ensure!(summary.pages.zstd == 0, "{:?}", summary.pages);
    ensure!(summary.pages.lz4 > 0, "LZ4 not used: {:?}", summary.pages);
    for d in round_choices(&events) {
        ensure!(
            !d.choice.zstd() && d.estimates.zstd_ns.is_none(),
            "zstd considered: {d:?}"
        );
    }
    Ok(())
}
