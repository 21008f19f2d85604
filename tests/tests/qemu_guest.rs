//! The workload guest boots in stock QEMU too (GUEST.md): the same image,
//! read through QMP, reaches phase 2 with a rising heartbeat.

use std::time::{Duration, Instant};

use ferry_e2e::qemu::{qemu_unavailable, QemuConfig, QemuGuest};
use ferry_e2e::qmp::guest_status;

#[test]
fn workload_guest_runs_in_qemu() {
    if let Some(why) = qemu_unavailable() {
        assert!(
            std::env::var_os("FERRY_NO_SKIP").is_none(),
            "FERRY_NO_SKIP is set, so this test may not skip"
        );
        eprintln!("SKIPPED: workload_guest_runs_in_qemu: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tsc_khz = ferry_vm::host_tsc_khz().expect("KVM reports the TSC frequency");
    let cfg = QemuConfig {
        kernel: ferry_vm::guest_elf_path().to_owned(),
        mem_mib: 256,
        append: format!("rate=2000 tsc_khz={tsc_khz} wss=16 verify=64"),
        incoming: None,
        cpus: 1,
    };
    let mut q = QemuGuest::start("qemu-guest", &cfg, dir.path()).unwrap();
    let first = q.wait_running(1, Duration::from_secs(120)).unwrap();
    let a = guest_status(&mut q.qmp).unwrap();
    assert_eq!(a.magic, 0x4645_5252_5947_5354, "FERRYGST magic");
    let start = Instant::now();
    let b = loop {
        let b = guest_status(&mut q.qmp).unwrap();
        if b.heartbeat > first + 200 && b.pages_dirtied > a.pages_dirtied {
            break b;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "heartbeat or dirty count stuck: {a:?} -> {b:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(b.phase, 2);
    assert_eq!(b.verify_errors, 0);
    // Full status block: mem_top (0x40) and working-set pages (0x48).
    let words = q.qmp.read_phys_u64(0x1040, 2).unwrap();
    assert!(
        words[0] > 200 << 20 && words[0] <= 256 << 20,
        "mem_top {:#x}",
        words[0]
    );
    assert_eq!(words[1], 16 * 256, "wss=16 MiB is 4096 pages");
}

/// With `-smp 2` the guest's BSP wakes the second vCPU itself (INIT/SIPI
/// into its real-mode entry, vm/guest/GUEST.md: QEMU's firmware leaves the
/// APs parked), and each vCPU runs its own loop: both heartbeats rise.
/// With `hz`, the BSP also takes its timer ticks.
fn two_vcpus_run_a_loop_each_in_qemu(test: &str, hz: u64) {
    if let Some(why) = qemu_unavailable() {
        assert!(
            std::env::var_os("FERRY_NO_SKIP").is_none(),
            "FERRY_NO_SKIP is set, so this test may not skip"
        );
        eprintln!("SKIPPED: {test}: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tsc_khz = ferry_vm::host_tsc_khz().expect("KVM reports the TSC frequency");
    let cfg = QemuConfig {
        kernel: ferry_vm::guest_elf_path().to_owned(),
        mem_mib: 128,
        append: format!("rate=2000 tsc_khz={tsc_khz} wss=16 verify=64 cpus=2 hz={hz}"),
        incoming: None,
        cpus: 2,
    };
    let mut q = QemuGuest::start(test, &cfg, dir.path()).unwrap();
    q.wait_running(1, Duration::from_secs(120)).unwrap();
    // 0xB0: loops running; 0x10 and 0x200: the heartbeats of vCPU 0 and 1;
    // 0xB8: timer ticks.
    let read = |q: &mut QemuGuest| {
        let cpus = q.qmp.read_phys_u64(0x10B0, 2).unwrap();
        let hb0 = q.qmp.read_phys_u64(0x1010, 1).unwrap()[0];
        let hb1 = q.qmp.read_phys_u64(0x1200, 1).unwrap()[0];
        let errors =
            q.qmp.read_phys_u64(0x1070, 1).unwrap()[0] + q.qmp.read_phys_u64(0x1220, 1).unwrap()[0];
        (cpus[0], hb0, hb1, cpus[1], errors)
    };
    let (loops, hb0, hb1, ticks, _) = read(&mut q);
    assert_eq!(loops, 2, "the guest runs {loops} loop(s) under QEMU -smp 2");
    let start = Instant::now();
    loop {
        let (_, now0, now1, now_ticks, errors) = read(&mut q);
        assert_eq!(errors, 0, "verify_errors under QEMU");
        if now0 > hb0 + 50 && now1 > hb1 + 50 && (hz == 0 || now_ticks > ticks + 50) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "stuck: heartbeats {hb0}/{hb1} -> {now0}/{now1}, ticks {ticks} -> {now_ticks}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_vcpus_run_a_loop_each_in_qemu_smp_2() {
    two_vcpus_run_a_loop_each_in_qemu("qemu-smp2", 0);
}

#[test]
fn two_vcpus_run_a_loop_each_in_qemu_smp_2_with_a_timer() {
    two_vcpus_run_a_loop_each_in_qemu("qemu-smp2-hz", 100);
}
