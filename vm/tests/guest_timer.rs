//! The workload guest's timer mode (`hz=N`, vm/guest/GUEST.md) on a real
//! KVM VM with the in-kernel irqchip and PIT: the PIT interrupts the guest,
//! the guest halts between ticks and counts them as its clock, and a pause
//! or a move to another VM does not turn that clock back.

use std::time::{Duration, Instant};

use ferry_vm::testing::kvm_or_skip;
use ferry_vm::{host_tsc_khz, DirtyBackend, GuestStatus, Vm, VmConfig};
use vm_memory::{Bytes, GuestAddress};

const HZ: u64 = 100;

fn boot(mem_mib: u64, cmdline: &str, cpus: usize) -> Vm {
    let tsc = host_tsc_khz().expect("KVM_GET_TSC_KHZ");
    let vm = Vm::boot(&VmConfig {
        mem_bytes: mem_mib << 20,
        kernel: None,
        cmdline: format!("{cmdline} tsc_khz={tsc}"),
        dirty: DirtyBackend::Bitmap,
        cpus,
    })
    .expect("boot the workload guest");
    vm.wait_running(Duration::from_secs(120))
        .expect("guest reaches phase 2");
    vm
}

/// Polls until `f` holds (60 s at most: a loaded machine is slow, never wrong).
fn wait_for(vm: &Vm, what: &str, f: impl Fn(&GuestStatus) -> bool) -> GuestStatus {
    let start = Instant::now();
    loop {
        let st = vm.status();
        if f(&st) {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what}: still {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_timer_guest_takes_ticks_halts_between_them_and_keeps_dirtying() {
    if !kvm_or_skip(module_path!()) {
        return;
    }
    let vm = boot(64, &format!("rate=2000 wss=8 hz={HZ}"), 1);
    let a = vm.status();
    assert_eq!(a.hz, HZ, "{a}");
    let t0 = Instant::now();
    let b = wait_for(&vm, "ticks, halts and writes", |s| {
        s.ticks >= a.ticks + 50 && s.halts > a.halts && s.pages_dirtied > a.pages_dirtied + 100
    });
    let host = t0.elapsed();
    assert!(b.is_healthy(), "{b}");
    assert!(b.heartbeat > a.heartbeat, "{a} -> {b}");
    // The PIT runs on host time: the guest cannot count more ticks than
    // the time that passed allows (plus the one in flight at each end).
    let most = host.as_millis() as u64 * HZ / 1000 + 2;
    assert!(
        b.ticks - a.ticks <= most,
        "{} ticks in {host:?} at {HZ} Hz",
        b.ticks - a.ticks
    );
    eprintln!(
        "timer: {} ticks in {:?} at hz={HZ} ({:.1}/s), {} halts",
        b.ticks - a.ticks,
        host,
        (b.ticks - a.ticks) as f64 / host.as_secs_f64(),
        b.halts - a.halts
    );
}

#[test]
fn a_timer_guest_moved_to_another_vm_keeps_ticking_from_where_it_was() {
    if !kvm_or_skip(module_path!()) {
        return;
    }
    let src = boot(32, &format!("rate=2000 wss=2 verify=64 hz={HZ}"), 2);
    let a = src.status();
    wait_for(&src, "ticks on the source", |s| s.ticks >= a.ticks + 20);
    src.pause().unwrap();
    let before = src.status();
    let sections = src.save_state().unwrap();
    for name in ["irqchip", "pit", "clock"] {
        assert!(
            sections.iter().any(|s| s.name == name),
            "no `{name}` section"
        );
    }

    let dst = Vm::incoming(32 << 20, DirtyBackend::Bitmap).unwrap();
    let mut buf = vec![0u8; 32 << 20];
    src.memory().read_slice(&mut buf, GuestAddress(0)).unwrap();
    dst.memory().write_slice(&buf, GuestAddress(0)).unwrap();
    // The restored PIT runs from here (ticks due before the resume are
    // delivered at the resume).
    let restored = Instant::now();
    dst.restore_state(&sections).unwrap();
    drop(src);
    dst.resume().unwrap();

    let first = dst.status();
    assert!(first.ticks >= before.ticks, "{before} -> {first}");
    let after = wait_for(&dst, "ticks at the destination", |s| {
        s.ticks >= before.ticks + 20 && s.vcpus().iter().all(|c| c.pages_dirtied > 0)
    });
    let host = restored.elapsed();
    assert!(after.is_healthy(), "{after}");
    assert!(after.halts > before.halts, "{before} -> {after}");
    // No catch-up for the time the guest was stopped before the restore:
    // at most what the time since the restore allows.
    let most = host.as_millis() as u64 * HZ / 1000 + 2;
    assert!(
        after.ticks - before.ticks <= most,
        "{} ticks in {host:?} since the restore",
        after.ticks - before.ticks
    );
}

/// Every vCPU halts between ticks (vm/guest/GUEST.md, timer mode): the BSP
/// on the PIT's interrupt, the APs on the tick IPI the BSP sends them after
/// each tick, and an AP that runs no loop halts too. Three vCPUs, two
/// loops: vCPUs 0 and 1 dirty, halt and keep their heartbeats; vCPU 2 only
/// halts.
#[test]
fn every_vcpu_halts_between_ticks_and_the_aps_keep_dirtying() {
    if !kvm_or_skip(module_path!()) {
        return;
    }
    let vm = boot(64, &format!("rate=2000 wss=8 cpus=2 hz={HZ}"), 3);
    let a = vm.status();
    assert_eq!(a.cpus, 2, "{a}");
    assert_eq!(a.online_mask, 0b111, "{a}");
    let b = wait_for(&vm, "every vCPU halting and the loops dirtying", |s| {
        s.ticks >= a.ticks + 50
            && s.idle_halts > a.idle_halts + 20
            && s.vcpus().iter().zip(a.vcpus()).all(|(now, then)| {
                now.halts > then.halts + 20
                    && now.pages_dirtied > then.pages_dirtied + 100
                    && now.heartbeat > then.heartbeat
            })
    });
    assert!(b.is_healthy(), "{b}");
    // An AP halts at most once per tick it is woken by (plus the one it
    // was halted in): it sleeps until the next tick, it does not spin.
    for (i, (now, then)) in b.vcpus().iter().zip(a.vcpus()).enumerate() {
        assert!(
            now.halts - then.halts <= b.ticks - a.ticks + 1,
            "vCPU {i}: {} halts over {} ticks",
            now.halts - then.halts,
            b.ticks - a.ticks
        );
    }
    assert!(
        b.idle_halts - a.idle_halts <= b.ticks - a.ticks + 1,
        "the idle vCPU 2: {} halts over {} ticks",
        b.idle_halts - a.idle_halts,
        b.ticks - a.ticks
    );
    eprintln!(
        "{} ticks: halts {:?}, idle vCPU {}",
        b.ticks - a.ticks,
        b.vcpus()
            .iter()
            .zip(a.vcpus())
            .map(|(n, t)| n.halts - t.halts)
            .collect::<Vec<_>>(),
        b.idle_halts - a.idle_halts
    );
}
