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
/// The guest numbers the vCPUs by APIC ID (both check in: bits 0 and 1 of
/// 0xD0). With `hz`, the BSP takes the timer ticks and passes each on to
/// the AP as an IPI, and both vCPUs halt between ticks (vm/guest/GUEST.md).
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
    // 0xB8: timer ticks; 0xC8 and 0x238: the halts of vCPU 0 and 1; 0xD0:
    // vCPUs checked in.
    let read = |q: &mut QemuGuest| {
        let w = q.qmp.read_phys_u64(0x10B0, 6).unwrap();
        let hb0 = q.qmp.read_phys_u64(0x1010, 1).unwrap()[0];
        let cpu1 = q.qmp.read_phys_u64(0x1200, 8).unwrap();
        let errors = q.qmp.read_phys_u64(0x1070, 1).unwrap()[0] + cpu1[4];
        Sample {
            loops: w[0],
            ticks: w[1],
            online: w[4],
            heartbeats: [hb0, cpu1[0]],
            halts: [w[3], cpu1[7]],
            errors,
        }
    };
    let a = read(&mut q);
    assert_eq!(
        a.loops, 2,
        "the guest runs {} loop(s) under QEMU -smp 2",
        a.loops
    );
    assert_eq!(a.online, 0b11, "vCPUs checked in: {:#b}", a.online);
    let start = Instant::now();
    loop {
        let b = read(&mut q);
        assert_eq!(b.errors, 0, "verify_errors under QEMU");
        let beating = (0..2).all(|i| b.heartbeats[i] > a.heartbeats[i] + 50);
        let ticking =
            hz == 0 || (b.ticks > a.ticks + 50 && (0..2).all(|i| b.halts[i] > a.halts[i] + 20));
        if beating && ticking {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "stuck: {a:?} -> {b:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What `two_vcpus_run_a_loop_each_in_qemu` reads of the status block.
#[derive(Debug)]
struct Sample {
    loops: u64,
    ticks: u64,
    online: u64,
    heartbeats: [u64; 2],
    halts: [u64; 2],
    errors: u64,
}

#[test]
fn two_vcpus_run_a_loop_each_in_qemu_smp_2() {
    two_vcpus_run_a_loop_each_in_qemu("qemu-smp2", 0);
}

#[test]
fn two_vcpus_run_a_loop_each_in_qemu_smp_2_with_a_timer() {
    two_vcpus_run_a_loop_each_in_qemu("qemu-smp2-hz", 100);
}
