//! The vCPU state that must move with the guest: registers, segments and
//! control registers, FPU/SSE/AVX state, extended control registers, MSRs
//! (the TSC among them, so the guest's clock continues), pending events,
//! and with the in-kernel irqchip the vCPU's LAPIC and MP state.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::error::{kvm_err, VmError};

/// Version of the `vcpu` section this ferry writes: 2 adds the LAPIC and
/// the MP state to version 1 (which it still reads: those stay at reset).
pub const STATE_VERSION: u32 = 2;

/// MSRs saved and restored when the host supports them.
const MSRS: &[u32] = &[
    0x10,        // IA32_TSC: the guest clock continues where it stopped
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0x1a0,       // MISC_ENABLE
    0xC000_0081, // STAR
    0xC000_0082, // LSTAR
    0xC000_0083, // CSTAR
    0xC000_0084, // SFMASK
    0xC000_0102, // KERNEL_GS_BASE
    0xC000_0103, // TSC_AUX
    0x4b56_4d01, // KVM system time (new)
    0x4b56_4d02, // KVM async PF
    0x4b56_4d03, // KVM steal time
    0x4b56_4d04, // KVM PV EOI
    0x12,        // KVM system time (old)
];

/// One named, versioned piece of a VM's saved state (a device section in
/// the migration stream): the VMM's devices each save their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSection {
    /// What it is: `vcpu`, `irqchip`, `pit` or `clock`.
    pub name: String,
    /// Which one (the vCPU index).
    pub instance: u32,
    /// Format version of `data`.
    pub version: u32,
    /// The state.
    pub data: Vec<u8>,
}

/// What a VM reads back: a section name, its newest version, a size limit
/// and how many instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionInfo {
    /// The section's name.
    pub name: &'static str,
    /// The newest version read.
    pub version: u32,
    /// Largest data accepted, bytes.
    pub max_bytes: u32,
    /// Most instances.
    pub max_instances: u32,
}

/// The `vcpu` section: one per vCPU, instance = vCPU index, a
/// [`VcpuState`] as JSON.
pub const VCPU_SECTION: SectionInfo = SectionInfo {
    name: "vcpu",
    version: STATE_VERSION,
    // Registers, FPU, 4 KiB of XSAVE, the 1 KiB LAPIC and MSRs as JSON:
    // ~30 KiB; room to grow.
    max_bytes: 1 << 20,
    max_instances: crate::vm::MAX_VCPUS as u32,
};

/// Every section ferry's VM reads.
pub const VM_SECTIONS: &[SectionInfo] = &[
    VCPU_SECTION,
    crate::devices::IRQCHIP_SECTION,
    crate::devices::PIT_SECTION,
    crate::devices::CLOCK_SECTION,
];

impl VcpuState {
    /// The state as a `vcpu` section of vCPU `index`.
    pub fn to_section(&self, index: u32) -> StateSection {
        StateSection {
            name: VCPU_SECTION.name.into(),
            instance: index,
            version: self.version,
            data: serde_json::to_vec(self).expect("vCPU state serialises"),
        }
    }

    /// Parses a `vcpu` section.
    pub fn from_section(s: &StateSection) -> Result<Self, VmError> {
        if s.name != VCPU_SECTION.name || !(1..=STATE_VERSION).contains(&s.version) {
            return Err(VmError::BadState(format!(
                "section `{}` version {} is not a vCPU state (this ferry reads `vcpu` versions 1 to {STATE_VERSION})",
                s.name, s.version
            )));
        }
        let v: Self =
            serde_json::from_slice(&s.data).map_err(|e| VmError::BadState(e.to_string()))?;
        if v.version != s.version {
            return Err(VmError::BadState(format!(
                "vCPU state version {} in a version {} section",
                v.version, s.version
            )));
        }
        Ok(v)
    }
}

/// Everything needed to resume the vCPU elsewhere.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    version: u32,
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: Fpu,
    xsave: Option<kvm_xsave>,
    xcrs: Option<kvm_xcrs>,
    msrs: Vec<(u32, u64)>,
    events: Option<kvm_vcpu_events>,
    /// The local APIC's registers (`KVM_GET_LAPIC`), with the in-kernel
    /// irqchip; version 2.
    #[serde(default)]
    lapic: Option<kvm_lapic_state>,
    /// Runnable, halted, waiting for INIT/SIPI (`KVM_GET_MP_STATE`); version 2.
    #[serde(default)]
    mp_state: Option<kvm_mp_state>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// The MSRs from [`MSRS`] this host can read.
pub fn supported_msrs(kvm: &kvm_ioctls::Kvm) -> Vec<u32> {
    let list = kvm
        .get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .unwrap_or_default();
    MSRS.iter().copied().filter(|m| list.contains(m)).collect()
}

/// Reads the MSRs `ids` that the vCPU has, as (index, value), in one
/// `KVM_GET_MSRS` when it has them all. KVM reads a list up to the first
/// MSR it refuses and returns how many it read; that one is left out and
/// the rest is read again from the next, so each refusal costs one more
/// call. (The vCPU is loaded once per call: 16 MSRs one call each took
/// 100 us here, all in one call 6.5 us, a part of the pause.)
fn read_msrs(vcpu: &VcpuFd, ids: &[u32]) -> Result<Vec<(u32, u64)>, VmError> {
    let mut out = Vec::with_capacity(ids.len());
    let mut rest = ids;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| VmError::BadState(format!("MSR list: {e:?}")))?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        let read = read.min(rest.len());
        out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        // Skip the refused one (if any) and go on after it.
        rest = rest.get(read + 1..).unwrap_or_default();
    }
    Ok(out)
}

impl VcpuState {
    /// Reads the state of a stopped vCPU.
    pub fn save(vcpu: &VcpuFd, msr_ids: &[u32]) -> Result<Self, VmError> {
        let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let fpu = Fpu::from(&vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?);
        let xsave = vcpu.get_xsave().ok();
        let xcrs = vcpu.get_xcrs().ok();
        let events = vcpu.get_vcpu_events().ok();
        // Both fail (ENXIO) without an in-kernel irqchip: nothing to carry.
        let lapic = vcpu.get_lapic().ok();
        let mp_state = vcpu.get_mp_state().ok();
        let msrs = read_msrs(vcpu, msr_ids)?;
        Ok(Self {
            version: STATE_VERSION,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            msrs,
            events,
            lapic,
            mp_state,
        })
    }

    /// Writes the state into a stopped vCPU.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), VmError> {
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.set_fpu(&kvm_fpu::from(&self.fpu))
            .map_err(kvm_err("KVM_SET_FPU"))?;
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        if let Some(x) = &self.xsave {
            // SAFETY: `x` is a plain kvm_xsave of the legacy 4 KiB size, which is
            // what KVM_SET_XSAVE reads; no extended (larger) area is involved.
            unsafe { vcpu.set_xsave(x) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        }
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        if !entries.is_empty() {
            let msrs = Msrs::from_entries(&entries)
                .map_err(|e| VmError::BadState(format!("MSR list: {e:?}")))?;
            let n = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
            if n != entries.len() {
                return Err(VmError::BadState(format!(
                    "this host refused MSR {:#x}",
                    entries[n].index
                )));
            }
        }
        // The LAPIC after the MSRs (its base is in sregs), the MP state and
        // pending events last, as QEMU orders them.
        if let Some(lapic) = &self.lapic {
            vcpu.set_lapic(lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        }
        if let Some(mp) = self.mp_state {
            vcpu.set_mp_state(mp).map_err(kvm_err("KVM_SET_MP_STATE"))?;
        }
        if let Some(ev) = &self.events {
            vcpu.set_vcpu_events(ev)
                .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }
}

/// `kvm_fpu` in a form serde can carry (kvm-bindings does not derive it).
#[derive(Serialize, Deserialize)]
struct Fpu {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&Fpu> for kvm_fpu {
    fn from(f: &Fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
    use kvm_ioctls::{Kvm, VmFd};
    use proptest::prelude::*;

    /// A fresh VM (in-kernel irqchip and PIT) with one vCPU ready for long
    /// mode state (CPUID set).
    fn fresh_vcpu(kvm: &Kvm) -> (VmFd, VcpuFd) {
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        crate::devices::create(&vm).expect("create the irqchip and PIT");
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
        (vm, vcpu)
    }

    /// An MSR the vCPU refuses, between two it has, is left out and the
    /// one after it is still read, with the value a read of its own gives.
    #[test]
    fn a_refused_msr_is_skipped_and_the_rest_read() {
        if !crate::testing::kvm_or_skip("a_refused_msr_is_skipped") {
            return;
        }
        let kvm = Kvm::new().expect("open /dev/kvm");
        let (_vm, vcpu) = fresh_vcpu(&kvm);
        let lstar = 0xFFFF_FFFF_8100_0000u64;
        let set = Msrs::from_entries(&[kvm_msr_entry {
            index: 0xC000_0082,
            data: lstar,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.set_msrs(&set).expect("KVM_SET_MSRS"), 1);
        // Not an MSR on any CPU: KVM stops its list there.
        let bogus = 0x4000_7fff;
        let ids = [0x174, bogus, 0xC000_0082, bogus, bogus];
        let got = read_msrs(&vcpu, &ids).expect("read MSRs");
        assert_eq!(
            got.iter().map(|m| m.0).collect::<Vec<_>>(),
            vec![0x174, 0xC000_0082]
        );
        assert_eq!(got[1].1, lstar);
        assert!(read_msrs(&vcpu, &[]).expect("no MSRs").is_empty());
    }

    /// Canonical 48-bit addresses, as LSTAR and friends must hold.
    fn canonical() -> impl Strategy<Value = u64> {
        (0u64..(1 << 47), any::<bool>())
            .prop_map(|(a, high)| if high { a | !((1 << 47) - 1) } else { a })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Random registers and MSRs saved from one vCPU, carried as a
        /// `vcpu` section and restored into a vCPU of another VM read back
        /// the same.
        #[test]
        fn vcpu_state_round_trips_through_a_section_into_another_vm(
            gprs in prop::array::uniform16(any::<u64>()),
            flags in any::<u64>(),
            sysenter in (any::<u16>(), canonical(), canonical()),
            syscall in (any::<u64>(), canonical(), canonical(), any::<u32>()),
            kernel_gs in canonical(),
            tsc_aux in any::<u32>(),
            lapic_regs in (any::<u8>(), any::<u8>(), prop::array::uniform4((any::<u8>(), 0u32..8, any::<bool>())), 0u32..16),
            halted in any::<bool>(),
        ) {
            if !crate::testing::kvm_or_skip("vcpu_state_round_trips") {
                return Ok(());
            }
            let kvm = Kvm::new().expect("open /dev/kvm");
            let msr_ids = supported_msrs(&kvm);
            let (_vm_a, a) = fresh_vcpu(&kvm);
            let mut state = VcpuState::save(&a, &msr_ids).expect("save a fresh vCPU");
            let r = &mut state.regs;
            [r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp,
             r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15] = gprs;
            r.rip = gprs[0] & 0xFFFF_FFFF;
            // Arithmetic flags, DF; bit 1 is always set.
            r.rflags = 0x2 | (flags & 0xCD5);
            let set = |msrs: &mut Vec<(u32, u64)>, index: u32, value: u64| {
                if let Some(m) = msrs.iter_mut().find(|m| m.0 == index) {
                    m.1 = value;
                }
            };
            set(&mut state.msrs, 0x174, u64::from(sysenter.0));
            set(&mut state.msrs, 0x175, sysenter.1);
            set(&mut state.msrs, 0x176, sysenter.2);
            set(&mut state.msrs, 0xC000_0081, syscall.0 & 0xFFFF_FFFF_0000_0000);
            set(&mut state.msrs, 0xC000_0082, syscall.1);
            set(&mut state.msrs, 0xC000_0083, syscall.2);
            set(&mut state.msrs, 0xC000_0084, u64::from(syscall.3));
            set(&mut state.msrs, 0xC000_0102, kernel_gs);
            set(&mut state.msrs, 0xC000_0103, u64::from(tsc_aux));

            // LAPIC: task priority, spurious vector (enabled), the timer,
            // LINT0, LINT1 and error LVTs (vector, delivery mode, mask) and
            // the timer divider; 32-bit registers at their xAPIC offsets.
            let (tpr, spurious, lvts, divide) = lapic_regs;
            let lapic = state.lapic.as_mut().expect("the VM has an in-kernel LAPIC");
            let mut put = |offset: usize, value: u32| {
                for (i, b) in value.to_le_bytes().into_iter().enumerate() {
                    lapic.regs[offset + i] = std::os::raw::c_char::from_ne_bytes([b]);
                }
            };
            put(0x80, u32::from(tpr));
            // The processor priority follows the TPR while nothing is in service.
            put(0xA0, u32::from(tpr));
            put(0xF0, 0x100 | u32::from(spurious));
            for ((vector, mode, masked), offset) in lvts.into_iter().zip([0x320, 0x350, 0x360, 0x370]) {
                put(offset, u32::from(vector) | (mode << 8) | (u32::from(masked) << 16));
            }
            put(0x3E0, divide & 0xB);
            // CR8 is the TPR's priority class: KVM keeps the two in step.
            state.sregs.cr8 = u64::from(tpr >> 4);
            state.mp_state = Some(kvm_mp_state {
                mp_state: if halted {
                    kvm_bindings::KVM_MP_STATE_HALTED
                } else {
                    kvm_bindings::KVM_MP_STATE_RUNNABLE
                },
            });

            let section = state.to_section(0);
            let carried = VcpuState::from_section(&section).expect("parse the section");
            let (_vm_b, b) = fresh_vcpu(&kvm);
            carried.restore(&b).expect("restore into another VM");
            let back = VcpuState::save(&b, &msr_ids).expect("save it again");

            prop_assert_eq!(back.regs, state.regs);
            prop_assert_eq!(back.sregs, state.sregs);
            prop_assert_eq!(back.mp_state, state.mp_state);
            let regs = |l: &Option<kvm_lapic_state>| {
                l.as_ref().map(|l| l.regs.to_vec()).unwrap_or_default()
            };
            prop_assert_eq!(regs(&back.lapic), regs(&state.lapic));
            // The TSC runs on between restore and save: every other MSR is exact.
            let without_tsc = |m: &[(u32, u64)]| -> Vec<(u32, u64)> {
                m.iter().copied().filter(|&(i, _)| i != 0x10).collect()
            };
            prop_assert_eq!(without_tsc(&back.msrs), without_tsc(&state.msrs));
            prop_assert_eq!(
                serde_json::to_value(&back.fpu).unwrap(),
                serde_json::to_value(&state.fpu).unwrap()
            );
        }
    }
}
