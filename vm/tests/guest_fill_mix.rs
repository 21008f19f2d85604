//! `fill=mix` (vm/guest/GUEST.md) on a real KVM VM: memory holds the asked
//! shares of zero, text-like and incompressible pages, and the guest's own
//! self-check knows each kind (a changed page of either kind is caught).

use std::time::{Duration, Instant};

use ferry_vm::testing::kvm_or_skip;
use ferry_vm::{DirtyBackend, GuestStatus, Vm, VmConfig, FILL_BASE};
use vm_memory::{Bytes, GuestAddress};

const PAGE: u64 = 4096;

fn boot(mem_mib: u64, cmdline: &str) -> Vm {
    let vm = Vm::boot(&VmConfig {
        mem_bytes: mem_mib << 20,
        kernel: None,
        cmdline: cmdline.into(),
        dirty: DirtyBackend::Bitmap,
        cpus: 1,
    })
    .expect("boot the workload guest");
    vm.wait_running(Duration::from_secs(120))
        .expect("guest reaches phase 2");
    vm
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Zero,
    Text,
    Random,
}

fn kind_of(page: &[u8]) -> Kind {
    if page.iter().all(|&b| b == 0) {
        Kind::Zero
    } else if page
        .iter()
        .all(|&b| b == b'\n' || (0x20..0x7f).contains(&b))
    {
        Kind::Text
    } else {
        Kind::Random
    }
}

fn pages(vm: &Vm) -> Vec<(u64, Kind)> {
    let top = vm.status().mem_top;
    let mut buf = vec![0u8; PAGE as usize];
    (FILL_BASE..top)
        .step_by(PAGE as usize)
        .map(|a| {
            vm.memory()
                .read_slice(&mut buf, GuestAddress(a))
                .expect("read guest memory");
            (a, kind_of(&buf))
        })
        .collect()
}

/// Waits until the guest has self-checked every page at least once more.
fn wait_full_verify_pass(vm: &Vm) -> GuestStatus {
    let a = vm.status();
    let total = (a.mem_top - FILL_BASE) / PAGE;
    let start = Instant::now();
    loop {
        let b = vm.status();
        if b.pages_verified > a.pages_verified + total {
            return b;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "self-check stuck: {a} -> {b}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn mixed_fill_has_the_asked_shares_and_checks_itself() {
    if !kvm_or_skip(module_path!()) {
        return;
    }
    let vm = boot(64, "fill=mix mix_zero=40 mix_text=30 verify=256");
    let all = pages(&vm);
    let share = |k: Kind| all.iter().filter(|p| p.1 == k).count() as f64 / all.len() as f64;
    let (zero, text, random) = (share(Kind::Zero), share(Kind::Text), share(Kind::Random));
    assert!((zero - 0.40).abs() < 0.03, "zero pages {zero:.3}");
    assert!((text - 0.30).abs() < 0.03, "text pages {text:.3}");
    assert!(
        (random - 0.30).abs() < 0.03,
        "incompressible pages {random:.3}"
    );
    let st = wait_full_verify_pass(&vm);
    assert!(st.is_healthy(), "{st}");
    assert_eq!(st.verify_errors, 0);

    // Other shares are honoured too.
    let vm = boot(16, "fill=mix mix_zero=0 mix_text=100");
    assert!(pages(&vm).iter().all(|p| p.1 == Kind::Text));
}

#[test]
fn a_changed_text_or_zero_page_is_caught_by_the_self_check() {
    if !kvm_or_skip(module_path!()) {
        return;
    }
    for kind in [Kind::Text, Kind::Zero] {
        let vm = boot(32, "fill=mix");
        let (addr, _) = *pages(&vm)
            .iter()
            .find(|p| p.1 == kind)
            .expect("a page of that kind");
        let at = GuestAddress(addr + 100);
        let b: u8 = vm.memory().read_obj(at).unwrap();
        vm.memory().write_obj(b ^ 0x01, at).unwrap();
        let st = wait_full_verify_pass(&vm);
        assert!(
            st.verify_errors >= 1,
            "{kind:?} page change not caught: {st}"
        );
        assert_eq!(
            st.first_bad_addr & !(PAGE - 1),
            addr,
            "{kind:?}: first bad word {:#x}",
            st.first_bad_addr
        );
    }
}
