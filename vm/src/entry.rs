//! The multiboot entry state (GUEST.md): 32-bit protected mode, paging off,
//! flat 4 GiB segments, a busy TSS in TR, `EAX = 0x2BADB002`, `EBX` = info.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::loader::MBI_ADDR;

/// Where the (never used) boot TSS lives: KVM only checks TR's descriptor.
const BOOT_TSS: u64 = 0x8000;

fn flat(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets `sregs` to the multiboot entry state, keeping what KVM filled in
/// (APIC base, interrupt bitmap).
pub fn multiboot_sregs(sregs: &mut kvm_sregs) {
    sregs.cs = flat(0x08, 0xB); // code, execute/read, accessed
    let data = flat(0x10, 0x3); // data, read/write, accessed
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: BOOT_TSS,
        limit: 0x67,
        selector: 0x18,
        type_: 0xB, // 32-bit TSS, busy
        present: 1,
        s: 0,
        g: 0,
        db: 0,
        ..data
    };
    sregs.ldt = kvm_segment {
        base: 0,
        limit: 0xFFFF,
        selector: 0,
        type_: 0x2,
        present: 1,
        s: 0,
        g: 0,
        db: 0,
        ..data
    };
    sregs.gdt.base = 0;
    sregs.gdt.limit = 0;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

/// General registers at the multiboot entry point. `EDX` = `ap_magic`
/// tells the workload guest that the VMM starts the other vCPUs itself
/// (vm/guest/GUEST.md; multiboot leaves `EDX` undefined).
pub fn multiboot_regs(entry: u32, ap_magic: u32) -> kvm_regs {
    kvm_regs {
        rip: u64::from(entry),
        rax: 0x2BAD_B002,
        rbx: MBI_ADDR,
        rdx: u64::from(ap_magic),
        rflags: 0x2,
        ..Default::default()
    }
}

/// General registers of a vCPU other than the first at the entry point:
/// `EAX` says it is an application processor (vm/guest/GUEST.md).
pub fn ap_regs(entry: u32, ap_magic: u32) -> kvm_regs {
    kvm_regs {
        rax: u64::from(ap_magic),
        ..multiboot_regs(entry, ap_magic)
    }
}
