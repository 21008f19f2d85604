//! The vCPU throttle on a real KVM guest: a throttled guest keeps running
//! its loop, only less of the time, however high the throttle.

use std::time::{Duration, Instant};

use ferry_vm::testing::kvm_or_skip;
use ferry_vm::{host_tsc_khz, DirtyBackend, GuestStatus, Vm, VmConfig};

/// Waits until the heartbeat is above its value in `floor`.
fn wait_heartbeat_above(vm: &Vm, floor: &GuestStatus) -> GuestStatus {
    let start = Instant::now();
    loop {
        let st = vm.status();
        if st.heartbeat > floor.heartbeat {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the heartbeat is stuck: {floor} -> {st}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Four one-vCPU guests, each running an unpaced dirty loop, throttled 0,
/// 50, 80 and 95 % at once (so they share one window of this machine's
/// load; one guest each, because a guest numbers its vCPUs in the order
/// they arrive): every throttled one keeps making progress, and more
/// throttle means less progress. The share each one got (ideally 100 − p %
/// of the unthrottled one's progress) is printed, not asserted: it depends
/// on the load. Before the fix, kicks landing in the throttle's sleep made
/// the next `KVM_RUN` return at once, and at 80 % the guest made no
/// progress in 60 s.
#[test]
fn a_throttled_guest_gets_its_share_and_keeps_running() {
    if !kvm_or_skip(module_path!()) {
        return;
    }
    let throttles = [0u8, 50, 80, 95];
    let tsc = host_tsc_khz().expect("KVM_GET_TSC_KHZ");
    let vms: Vec<Vm> = throttles
        .iter()
        .map(|_| {
            let vm = Vm::boot(&VmConfig {
                mem_bytes: 32 << 20,
                kernel: None,
                cmdline: format!("rate=max wss=8 verify=16 tsc_khz={tsc}"),
                dirty: DirtyBackend::Bitmap,
                cpus: 1,
            })
            .expect("boot the workload guest");
            vm.wait_running(Duration::from_secs(120))
                .expect("guest reaches phase 2");
            vm
        })
        .collect();
    for (vm, &p) in vms.iter().zip(&throttles) {
        vm.set_throttle(p);
        assert_eq!(vm.vcpu_throttles(), [p]);
    }
    // Every guest has run under its throttle before the window opens.
    let warm: Vec<GuestStatus> = vms
        .iter()
        .map(|vm| wait_heartbeat_above(vm, &vm.status()))
        .collect();
    let before: Vec<GuestStatus> = vms
        .iter()
        .zip(&warm)
        .map(|(vm, w)| wait_heartbeat_above(vm, w))
        .collect();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let after: Vec<GuestStatus> = vms
        .iter()
        .zip(&before)
        .map(|(vm, b)| wait_heartbeat_above(vm, b))
        .collect();
    let window = start.elapsed();

    let progress: Vec<u64> = before
        .iter()
        .zip(&after)
        .map(|(a, b)| b.pages_dirtied - a.pages_dirtied)
        .collect();
    for (i, &p) in throttles.iter().enumerate() {
        let done = progress[i];
        eprintln!(
            "throttled {p:2} %: {done} pages in {window:.2?}, {:.3} of the unthrottled guest's (ideal {:.2})",
            done as f64 / progress[0] as f64,
            f64::from(100 - p) / 100.0
        );
        assert!(
            done > 0,
            "the guest at {p} % made no progress: {} -> {}",
            before[i],
            after[i]
        );
        assert_eq!(after[i].verify_errors, 0, "at {p} %: {}", after[i]);
    }
    for (done, p) in progress.windows(2).zip(throttles.windows(2)) {
        assert!(
            done[0] > done[1],
            "{} % made no more progress than {} %: {progress:?}",
            p[0],
            p[1]
        );
    }

    // A throttled guest still pauses and resumes on request, and lifting
    // the throttle lets it run.
    let vm = &vms[3];
    vm.pause().unwrap();
    let paused = vm.status();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vm.status(), paused, "a paused guest must stand still");
    vm.resume().unwrap();
    let resumed = wait_heartbeat_above(vm, &paused);
    vm.set_throttle(0);
    assert_eq!(vm.vcpu_throttles(), [0]);
    wait_heartbeat_above(vm, &resumed);
}
