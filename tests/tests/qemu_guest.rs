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
