//! The workload guest on a real KVM VM: boots, runs, pauses, and resumes
//! from saved state in a second VM.

use std::time::{Duration, Instant};

use ferry_dirtylog::{DirtyBitmap, Reprotect};
use ferry_vm::testing::kvm_or_skip;
use ferry_vm::{DirtyBackend, GuestPhase, GuestStatus, RunState, StateSection, Vm, VmConfig};
use vm_memory::{Bytes, GuestAddress};

fn boot(mem_mib: u64, cmdline: &str) -> Vm {
    boot_with_cpus(mem_mib, cmdline, 1)
}

fn boot_with_cpus(mem_mib: u64, cmdline: &str, cpus: usize) -> Vm {
    let vm = Vm::boot(&VmConfig {
        mem_bytes: mem_mib << 20,
        kernel: None,
        cmdline: cmdline.into(),
        dirty: DirtyBackend::Bitmap,
        cpus,
    })
    .expect("boot the workload guest");
    vm.wait_running(Duration::from_secs(120))
        .expect("guest reaches phase 2");
    vm
}

fn wait_heartbeat_above(vm: &Vm, value: u64) -> u64 {
    let start = Instant::now();
    loop {
        let hb = vm.status().heartbeat;
        if hb > value {
            return hb;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "heartbeat stuck at {hb}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn guest_boots_fills_and_dirties() {
    if !kvm_or_skip(module_path!()) {
        return;
    }
    let vm = boot(64, "rate=5000 tsc_khz=2300000 wss=8");
    let a = vm.status();
    assert!(a.is_healthy(), "{a}");
    assert_eq!(a.mem_top, 64 << 20);
    assert_eq!(a.wss_pages, 8 * 256);
    let hb = wait_heartbeat_above(&vm, a.heartbeat + 50);
    let b = vm.status();
    assert!(b.pages_dirtied > a.pages_dirtied, "{a} -> {b}");
    assert!(b.pages_verified > a.pages_verified);
    assert_eq!(b.verify_errors, 0);
    assert!(hb > a.heartbeat);
}

#[test]
fn paused_guest_stands_still_and_resumes() {
    if !kvm_or_skip(module_path!()) {
        return;
    }
    let vm = boot(32, "rate=2000 tsc_khz=2300000");
    wait_heartbeat_above(&vm, 5);
    vm.pause().unwrap();
    assert_eq!(vm.run_state(), RunState::Paused);
    let a = vm.status();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(vm.status(), a, "a paused guest must not change its memory");
    vm.resume().unwrap();
    wait_heartbeat_above(&vm, a.heartbeat);
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[test]
fn a_resume_prepared_in_advance_runs_the_guest_and_says_when() {
    if !kvm_or_skip(module_path!()) {
        return;
    }
    let vm = boot_with_cpus(32, "rate=2000 tsc_khz=2300000 cpus=2", 2);
    wait_heartbeat_above(&vm, 5);
    let first_run = vm.resumed_at_unix_ns();
    assert!(first_run > 0, "the boot's own run is recorded");
    for _ in 0..3 {
        vm.pause().unwrap();
        let a = vm.status();
        vm.prepare_resume();
        // Longer than a nap, shorter than the prepared window: the vCPU
        // thread is polling, not running the guest.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            vm.run_state(),
            RunState::Paused,
            "prepare_resume must not resume"
        );
        assert_eq!(vm.status(), a, "a prepared guest must stay paused");
        let before = unix_ns();
        vm.resume().unwrap();
        let after = unix_ns();
        // Recorded by each vCPU thread before `resume` returns: every
        // vCPU's instant is this resume's, and the VM's is the last one.
        let each = vm.vcpu_resumed_at_unix_ns();
        assert_eq!(each.len(), 2);
        for (i, at) in each.iter().enumerate() {
            assert!(
                (before..=after).contains(at),
                "vCPU {i} resumed at {at}, outside {before}..={after}"
            );
        }
        assert_eq!(vm.resumed_at_unix_ns(), each.iter().copied().max().unwrap());
        wait_heartbeat_above(&vm, a.heartbeat);
    }
    // A preparation that no resume follows lapses; the guest stays paused
    // and a later resume still works.
    vm.pause().unwrap();
    vm.prepare_resume();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(vm.run_state(), RunState::Paused);
    let a = vm.status();
    vm.resume().unwrap();
    wait_heartbeat_above(&vm, a.heartbeat);
}

#[test]
fn saved_state_resumes_in_a_second_vm() {
    if !kvm_or_skip(module_path!()) {
        return;
    }
    // Small working set, fast rate: many passes, so the self-check covers
    // pages rewritten before and after the move.
    let src = boot(32, "rate=20000 tsc_khz=2300000 wss=2 verify=64");
    wait_heartbeat_above(&src, 200);
    src.pause().unwrap();
    let before = src.status();
    let blob = src.save_state().unwrap();

    let dst = Vm::incoming(32 << 20, DirtyBackend::Bitmap).unwrap();
    let mut buf = vec![0u8; 32 << 20];
    src.memory().read_slice(&mut buf, GuestAddress(0)).unwrap();
    dst.memory().write_slice(&buf, GuestAddress(0)).unwrap();
    dst.restore_state(&blob).unwrap();
    drop(src);
    dst.resume().unwrap();

    let hb = wait_heartbeat_above(&dst, before.heartbeat + 100);
    let after = dst.status();
    assert!(hb >= before.heartbeat);
    assert_eq!(after.phase, GuestPhase::Running);
    assert!(after.pages_dirtied > before.pages_dirtied);
    assert!(after.passes > before.passes);
    assert_eq!(
        after.verify_errors, 0,
        "first bad word at {:#x}",
        after.first_bad_addr
    );
}

/// Waits until every vCPU's heartbeat is above its value in `floor`.
fn wait_all_heartbeats_above(vm: &Vm, floor: &GuestStatus) -> GuestStatus {
    let start = Instant::now();
    loop {
        let st = vm.status();
        let above = st.vcpus().len() == floor.vcpus().len()
            && st
                .vcpus()
                .iter()
                .zip(floor.vcpus())
                .all(|(now, then)| now.heartbeat > then.heartbeat);
        if above {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "a heartbeat is stuck: {floor} -> {st}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn two_vcpus_run_a_loop_each_and_move_together() {
    if !kvm_or_skip(module_path!()) {
        return;
    }
    let src = boot_with_cpus(32, "rate=20000 tsc_khz=2300000 wss=4 verify=64 cpus=2", 2);
    let a = src.status();
    assert_eq!(a.cpus, 2, "{a}");
    assert_eq!(a.vcpus().len(), 2);
    let b = wait_all_heartbeats_above(&src, &a);
    for (i, (then, now)) in a.vcpus().iter().zip(b.vcpus()).enumerate() {
        assert!(
            now.pages_dirtied > then.pages_dirtied,
            "vCPU {i}: {a} -> {b}"
        );
    }
    src.pause().unwrap();
    assert_eq!(src.run_state(), RunState::Paused);
    eprintln!("pause spread of 2 vCPUs: {:?}", src.pause_spread());
    let before = src.status();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(src.status(), before, "every vCPU must stand still");
    let blob = src.save_state().unwrap();

    let dst = Vm::incoming(32 << 20, DirtyBackend::Bitmap).unwrap();
    assert_eq!(dst.vcpu_count(), 0, "an incoming VM waits for its vCPUs");
    let mut buf = vec![0u8; 32 << 20];
    src.memory().read_slice(&mut buf, GuestAddress(0)).unwrap();
    dst.memory().write_slice(&buf, GuestAddress(0)).unwrap();
    dst.restore_state(&blob).unwrap();
    assert_eq!(dst.vcpu_count(), 2, "the destination takes what arrives");
    drop(src);
    dst.resume().unwrap();

    let after = wait_all_heartbeats_above(&dst, &before);
    let later = wait_all_heartbeats_above(&dst, &after);
    for (i, (then, now)) in before.vcpus().iter().zip(later.vcpus()).enumerate() {
        assert!(
            now.pages_dirtied > then.pages_dirtied,
            "vCPU {i}: {before} -> {later}"
        );
        assert_eq!(
            now.verify_errors, 0,
            "vCPU {i}: first bad word at {:#x}",
            now.first_bad_addr
        );
    }
}

/// An incoming VM whose vCPUs were created ahead of the state (as a
/// migration's destination does at the Hello) takes a state with that many
/// vCPUs and runs it; one prepared with another count, or prepared twice,
/// or for 0 vCPUs, refuses.
#[test]
fn vcpus_prepared_before_the_state_take_it_and_other_counts_are_refused() {
    if !kvm_or_skip(module_path!()) {
        return;
    }
    let src = boot_with_cpus(32, "rate=20000 tsc_khz=2300000 wss=4 verify=64 cpus=2", 2);
    wait_all_heartbeats_above(&src, &src.status());
    src.pause().unwrap();
    let before = src.status();
    let blob = src.save_state().unwrap();

    let zero = Vm::incoming(32 << 20, DirtyBackend::Bitmap).unwrap();
    let err = zero.prepare_vcpus(0).unwrap_err().to_string();
    assert!(err.contains("0 vCPUs"), "{err}");

    let one = Vm::incoming(32 << 20, DirtyBackend::Bitmap).unwrap();
    one.prepare_vcpus(1).unwrap();
    let err = one.restore_state(&blob).unwrap_err().to_string();
    assert!(
        err.contains("the state carries 2 vCPU(s), this VM has 1"),
        "{err}"
    );

    let dst = Vm::incoming(32 << 20, DirtyBackend::Bitmap).unwrap();
    dst.prepare_vcpus(2).unwrap();
    assert_eq!(dst.vcpu_count(), 2);
    let err = dst.prepare_vcpus(2).unwrap_err().to_string();
    assert!(err.contains("already has its vCPUs"), "{err}");
    let mut buf = vec![0u8; 32 << 20];
    src.memory().read_slice(&mut buf, GuestAddress(0)).unwrap();
    dst.memory().write_slice(&buf, GuestAddress(0)).unwrap();
    dst.restore_state(&blob).unwrap();
    drop(src);
    dst.resume().unwrap();
    let after = wait_all_heartbeats_above(&dst, &before);
    for (i, v) in after.vcpus().iter().enumerate() {
        assert_eq!(v.verify_errors, 0, "vCPU {i}: {after}");
    }
}

/// Status slot `i` is KVM vCPU `i` (vm/guest/GUEST.md: the guest numbers
/// its vCPUs by APIC ID, and ferry gives vCPU `i` APIC ID `i`), whatever
/// order the APs arrive in. Three vCPUs, only loop 2 dirtying
/// (`rates=0,0,4000`): the dirty ring, which logs each KVM vCPU's writes
/// in that vCPU's own ring, finds vCPU 2 dirtying and the others nearly
/// quiet (their heartbeats and stacks), and the guest reports the writes
/// in slot 2. `verify=0`: here (PVM, shadow paging) a read fault after
/// logging starts maps the page writable and logs it in the reading
/// vCPU's ring (an over-report the dirty log allows), so the quiet loops'
/// self-check reads would count as theirs (measured: 352 of vCPU 1's).
#[test]
fn status_slot_i_is_kvm_vcpu_i() {
    if !kvm_or_skip(module_path!()) {
        return;
    }
    let vm = Vm::boot(&VmConfig {
        mem_bytes: 32 << 20,
        kernel: None,
        cmdline: "rates=0,0,4000 tsc_khz=2300000 wss=8 verify=0 cpus=3".into(),
        dirty: DirtyBackend::Ring(64 << 10),
        cpus: 3,
    })
    .expect("boot the workload guest");
    let a = vm
        .wait_running(Duration::from_secs(120))
        .expect("guest reaches phase 2");
    assert_eq!(a.cpus, 3, "{a}");
    assert_eq!(a.online_mask, 0b111, "{a}");
    let mut log = vm.dirty_log().unwrap();
    log.start().unwrap();
    let mut bitmap = DirtyBitmap::new(log.pages());
    let mut counts = [0u64; 3];
    let start = Instant::now();
    while counts[2] < 2000 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "vCPU 2 dirtied only {counts:?} pages: {}",
            vm.status()
        );
        std::thread::sleep(Duration::from_millis(50));
        log.collect(&mut bitmap, Reprotect::Now).unwrap();
        let per_vcpu = log
            .take_vcpu_dirty_counts()
            .expect("the ring counts per vCPU");
        for (total, n) in counts.iter_mut().zip(per_vcpu) {
            *total += n;
        }
    }
    log.stop().unwrap();
    let b = vm.status();
    eprintln!("dirty ring per vCPU: {counts:?}; guest: {b}");
    assert!(
        counts[0] + counts[1] < counts[2] / 10,
        "KVM vCPUs 0 and 1 dirtied {counts:?}: not the quiet ones"
    );
    let slots: Vec<u64> = b.vcpus().iter().map(|c| c.pages_dirtied).collect();
    assert_eq!(slots[..2], [0, 0], "slots 0 and 1 dirtied: {b}");
    assert!(slots[2] > 0, "slot 2 did not dirty: {b}");
    assert!(b.is_healthy(), "{b}");
}

#[test]
fn a_wrong_blob_is_refused() {
    if !kvm_or_skip(module_path!()) {
        return;
    }
    let vm = Vm::incoming(8 << 20, DirtyBackend::Bitmap).unwrap();
    let section = |name: &str, version: u32, data: &[u8]| StateSection {
        name: name.into(),
        instance: 0,
        version,
        data: data.to_vec(),
    };
    let e = vm
        .restore_state(&[section("vcpu", 1, b"{\"version\": 99}")])
        .unwrap_err();
    assert!(e.to_string().contains("invalid saved state"), "{e}");
    let e = vm.restore_state(&[section("vcpu", 7, b"{}")]).unwrap_err();
    assert!(e.to_string().contains("version 7"), "{e}");
    let e = vm.restore_state(&[section("hpet", 1, b"")]).unwrap_err();
    assert!(e.to_string().contains("unknown section `hpet`"), "{e}");
    let e = vm.restore_state(&[]).unwrap_err();
    assert!(e.to_string().contains("no vCPU state"), "{e}");
    assert_eq!(vm.vcpu_count(), 0, "nothing refused made a vCPU");
}

#[test]
fn bad_inputs_are_clear_errors() {
    if !kvm_or_skip(module_path!()) {
        return;
    }
    let cfg = |mem: u64, kernel: Option<&str>| VmConfig {
        mem_bytes: mem,
        kernel: kernel.map(Into::into),
        cmdline: String::new(),
        dirty: DirtyBackend::Bitmap,
        cpus: 1,
    };
    let e = Vm::boot(&cfg(1 << 40, None)).unwrap_err().to_string();
    assert!(
        e.contains("between 4 MiB and 63 GiB") || e.contains("cannot reserve"),
        "{e}"
    );
    let e = Vm::boot(&cfg(3 << 20, None)).unwrap_err().to_string();
    assert!(e.contains("multiple of 2 MiB"), "{e}");
    let e = Vm::boot(&cfg(16 << 20, Some("/nonexistent/kernel.elf")))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot read kernel image /nonexistent/kernel.elf"),
        "{e}"
    );
    let e = Vm::boot(&cfg(16 << 20, Some("/etc/hostname")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a multiboot v1 image"), "{e}");
}

#[test]
fn a_guest_that_cannot_parse_its_cmdline_is_reported() {
    if !kvm_or_skip(module_path!()) {
        return;
    }
    let vm = Vm::boot(&VmConfig {
        mem_bytes: 16 << 20,
        kernel: None,
        cmdline: "rate=fast".into(),
        dirty: DirtyBackend::Bitmap,
        cpus: 1,
    })
    .unwrap();
    let e = vm
        .wait_running(Duration::from_secs(60))
        .unwrap_err()
        .to_string();
    assert!(e.contains("could not parse its command line"), "{e}");
}
