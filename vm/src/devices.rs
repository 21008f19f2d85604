//! The VM's in-kernel devices and their state sections: the interrupt
//! controllers (two 8259 PICs and an IOAPIC, `KVM_CREATE_IRQCHIP`), the
//! 8254 timer (`KVM_CREATE_PIT2`) and the KVM clock.
//!
//! Each travels as its own named, versioned section (the per-vCPU pieces,
//! LAPIC, pending events and MP state, travel in the `vcpu` section):
//!
//! | section | instances | data (v1) |
//! |---|---|---|
//! | `irqchip` | 0 PIC master, 1 PIC slave, 2 IOAPIC (= KVM's `chip_id`) | `struct kvm_irqchip` as `KVM_GET_IRQCHIP` fills it (520 bytes) |
//! | `pit` | 0 | `struct kvm_pit_state2` as `KVM_GET_PIT2` fills it (112 bytes) |
//! | `clock` | 0 | `clock_ns u64`, `source_realtime_ns u64` (16 bytes, little-endian) |
//!
//! The clock: `clock_ns` is `KVM_GET_CLOCK` read while paused, and
//! `source_realtime_ns` the source host's `CLOCK_REALTIME` at that moment
//! (this KVM's `KVM_GET_CLOCK` has no realtime field, PLATFORM.md). The
//! destination sets `clock_ns + elapsed`, where `elapsed` is its own
//! `CLOCK_REALTIME` minus `source_realtime_ns`, clamped to
//! `[0, MAX_CLOCK_ADVANCE]`: the guest's clock covers the downtime, never
//! goes back, and a destination whose wall clock runs far ahead does not
//! throw it far forward.

use std::time::Duration;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use zerocopy::{FromBytes, IntoBytes};

use crate::error::{kvm_err, VmError};
use crate::state::{SectionInfo, StateSection};

/// Size of `struct kvm_irqchip`.
const IRQCHIP_BYTES: usize = std::mem::size_of::<kvm_irqchip>();
/// Size of `struct kvm_pit_state2`.
const PIT_BYTES: usize = std::mem::size_of::<kvm_pit_state2>();
/// Size of the `clock` record.
const CLOCK_BYTES: usize = 16;

/// The `irqchip` section: PIC master (instance 0), PIC slave (1), IOAPIC (2).
pub const IRQCHIP_SECTION: SectionInfo = SectionInfo {
    name: "irqchip",
    version: 1,
    max_bytes: IRQCHIP_BYTES as u32,
    max_instances: 3,
};

/// The `pit` section: the 8254's three channels.
pub const PIT_SECTION: SectionInfo = SectionInfo {
    name: "pit",
    version: 1,
    max_bytes: PIT_BYTES as u32,
    max_instances: 1,
};

/// The `clock` section: the KVM clock and when the source read it.
pub const CLOCK_SECTION: SectionInfo = SectionInfo {
    name: "clock",
    version: 1,
    max_bytes: CLOCK_BYTES as u32,
    max_instances: 1,
};

/// Most the destination moves the KVM clock past the source's reading: a
/// migration's downtime is milliseconds; more than this means the two
/// hosts' wall clocks disagree, and the guest should not pay for it.
pub const MAX_CLOCK_ADVANCE: Duration = Duration::from_secs(10);

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// Creates the in-kernel PICs, IOAPIC and PIT; before any vCPU exists.
pub(crate) fn create(vm_fd: &VmFd) -> Result<(), VmError> {
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm_fd
        .create_pit2(kvm_pit_config::default())
        .map_err(kvm_err("KVM_CREATE_PIT2"))
}

/// `CLOCK_REALTIME` in ns since the epoch.
fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The `clock` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClockRecord {
    /// `KVM_GET_CLOCK`'s `clock`, ns.
    pub clock_ns: u64,
    /// The source's `CLOCK_REALTIME` when it read `clock_ns`.
    pub source_realtime_ns: u64,
}

impl ClockRecord {
    fn to_bytes(self) -> Vec<u8> {
        let mut b = Vec::with_capacity(CLOCK_BYTES);
        b.extend_from_slice(&self.clock_ns.to_le_bytes());
        b.extend_from_slice(&self.source_realtime_ns.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != CLOCK_BYTES {
            return None;
        }
        Some(Self {
            clock_ns: u64::from_le_bytes(b[..8].try_into().ok()?),
            source_realtime_ns: u64::from_le_bytes(b[8..].try_into().ok()?),
        })
    }

    /// The clock to set on a destination whose `CLOCK_REALTIME` is `now_ns`.
    pub fn advanced_to(self, now_ns: u64) -> u64 {
        let max = u64::try_from(MAX_CLOCK_ADVANCE.as_nanos()).unwrap_or(u64::MAX);
        let elapsed = now_ns.saturating_sub(self.source_realtime_ns).min(max);
        self.clock_ns.saturating_add(elapsed)
    }
}

/// Saves the PICs, the IOAPIC, the PIT and the clock of a paused VM.
pub(crate) fn save(vm_fd: &VmFd) -> Result<Vec<StateSection>, VmError> {
    let mut out = Vec::with_capacity(5);
    for chip_id in CHIPS {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm_fd
            .get_irqchip(&mut chip)
            .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
        out.push(StateSection {
            name: IRQCHIP_SECTION.name.into(),
            instance: chip_id,
            version: IRQCHIP_SECTION.version,
            data: chip.as_bytes().to_vec(),
        });
    }
    let pit = vm_fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?;
    out.push(StateSection {
        name: PIT_SECTION.name.into(),
        instance: 0,
        version: PIT_SECTION.version,
        data: pit.as_bytes().to_vec(),
    });
    let clock = vm_fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
    out.push(StateSection {
        name: CLOCK_SECTION.name.into(),
        instance: 0,
        version: CLOCK_SECTION.version,
        data: ClockRecord {
            clock_ns: clock.clock,
            source_realtime_ns: realtime_ns(),
        }
        .to_bytes(),
    });
    Ok(out)
}

/// Whether `name` is one of the sections [`restore`] reads.
pub(crate) fn is_device_section(name: &str) -> bool {
    [IRQCHIP_SECTION, PIT_SECTION, CLOCK_SECTION]
        .iter()
        .any(|s| s.name == name)
}

fn bad(s: &StateSection, why: &str) -> VmError {
    VmError::BadState(format!(
        "section `{}` instance {} version {}: {why}",
        s.name, s.instance, s.version
    ))
}

/// The device sections of a saved VM, checked and parsed.
#[derive(Debug, Default)]
pub(crate) struct DeviceState {
    chips: Vec<kvm_irqchip>,
    pit: Option<kvm_pit_state2>,
    clock: Option<ClockRecord>,
}

impl DeviceState {
    /// Checks the device sections among `sections` (others are skipped) and
    /// parses them, before anything is written into the VM.
    pub(crate) fn parse(sections: &[StateSection]) -> Result<Self, VmError> {
        parse(sections)
    }

    /// Restores the parsed state into a paused VM (a device without a
    /// section keeps its reset state, as from a source that had none). The
    /// clock is set last, advanced by the time since the source read it
    /// ([`ClockRecord::advanced_to`]).
    pub(crate) fn restore(&self, vm_fd: &VmFd) -> Result<(), VmError> {
        for chip in &self.chips {
            vm_fd
                .set_irqchip(chip)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        if let Some(pit) = &self.pit {
            vm_fd.set_pit2(pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        }
        if let Some(clock) = self.clock {
            let data = kvm_clock_data {
                clock: clock.advanced_to(realtime_ns()),
                ..Default::default()
            };
            vm_fd.set_clock(&data).map_err(kvm_err("KVM_SET_CLOCK"))?;
        }
        Ok(())
    }
}

fn parse(sections: &[StateSection]) -> Result<DeviceState, VmError> {
    let mut p = DeviceState::default();
    for s in sections.iter().filter(|s| is_device_section(&s.name)) {
        if s.version != 1 {
            return Err(bad(s, "this ferry reads version 1"));
        }
        match s.name.as_str() {
            "irqchip" => {
                let chip = kvm_irqchip::read_from_bytes(&s.data)
                    .map_err(|_| bad(s, "not a struct kvm_irqchip (520 bytes)"))?;
                if chip.chip_id != s.instance || !CHIPS.contains(&chip.chip_id) {
                    return Err(bad(s, "chip id does not match the instance"));
                }
                p.chips.push(chip);
            }
            "pit" => {
                if s.instance != 0 {
                    return Err(bad(s, "there is one PIT"));
                }
                p.pit = Some(
                    kvm_pit_state2::read_from_bytes(&s.data)
                        .map_err(|_| bad(s, "not a struct kvm_pit_state2 (112 bytes)"))?,
                );
            }
            _ => {
                if s.instance != 0 {
                    return Err(bad(s, "there is one clock"));
                }
                p.clock = Some(
                    ClockRecord::from_bytes(&s.data)
                        .ok_or_else(|| bad(s, "not a 16-byte clock record"))?,
                );
            }
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;
    use proptest::prelude::*;

    fn restore(vm: &VmFd, sections: &[StateSection]) {
        DeviceState::parse(sections)
            .expect("parse")
            .restore(vm)
            .expect("restore");
    }

    fn vm_with_devices(kvm: &Kvm) -> VmFd {
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        create(&vm).expect("create the irqchip and PIT");
        vm
    }

    /// The state a test compares: the PIT's `count_load_time` is the host
    /// instant the count was loaded, which `KVM_SET_PIT2` sets to now.
    fn comparable(sections: &[StateSection]) -> Vec<StateSection> {
        sections
            .iter()
            .filter(|s| s.name != CLOCK_SECTION.name)
            .map(|s| {
                let mut s = s.clone();
                if s.name == PIT_SECTION.name {
                    let mut pit = kvm_pit_state2::read_from_bytes(&s.data).unwrap();
                    for c in &mut pit.channels {
                        c.count_load_time = 0;
                    }
                    s.data = pit.as_bytes().to_vec();
                }
                s
            })
            .collect()
    }

    #[test]
    fn the_clock_covers_the_downtime_and_never_goes_back() {
        let r = ClockRecord {
            clock_ns: 5_000,
            source_realtime_ns: 1_000_000,
        };
        assert_eq!(r.advanced_to(1_000_000 + 30), 5_030);
        // A destination whose wall clock is behind the source's: no step back.
        assert_eq!(r.advanced_to(10), 5_000);
        // One far ahead: at most MAX_CLOCK_ADVANCE.
        let max = u64::try_from(MAX_CLOCK_ADVANCE.as_nanos()).unwrap();
        assert_eq!(r.advanced_to(u64::MAX), 5_000 + max);
        assert_eq!(ClockRecord::from_bytes(&r.to_bytes()), Some(r));
        assert_eq!(ClockRecord::from_bytes(&[0; 15]), None);
    }

    #[test]
    fn a_malformed_device_section_is_refused_before_anything_is_set() {
        let pit = StateSection {
            name: "pit".into(),
            instance: 0,
            version: 1,
            data: vec![0; PIT_BYTES - 1],
        };
        assert!(parse(std::slice::from_ref(&pit)).is_err());
        let newer = StateSection {
            version: 2,
            data: vec![0; PIT_BYTES],
            ..pit
        };
        assert!(parse(&[newer]).is_err());
        let chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        let wrong_instance = StateSection {
            name: "irqchip".into(),
            instance: 0,
            version: 1,
            data: chip.as_bytes().to_vec(),
        };
        let e = parse(&[wrong_instance]).expect_err("refused");
        assert!(e.to_string().contains("chip id"), "{e}");
    }

    #[test]
    fn the_clock_moves_with_the_state_and_does_not_go_back() {
        if !crate::testing::kvm_or_skip("the_clock_moves_with_the_state") {
            return;
        }
        let kvm = Kvm::new().expect("open /dev/kvm");
        let a = vm_with_devices(&kvm);
        let saved = save(&a).expect("save");
        let source_clock = a.get_clock().expect("KVM_GET_CLOCK").clock;
        std::thread::sleep(Duration::from_millis(50));
        let b = vm_with_devices(&kvm);
        restore(&b, &saved);
        let after = b.get_clock().expect("KVM_GET_CLOCK").clock;
        let now = realtime_ns();
        let record = saved
            .iter()
            .find(|s| s.name == "clock")
            .and_then(|s| ClockRecord::from_bytes(&s.data))
            .expect("a clock section");
        // Not the destination's own fresh clock (near 0): the source's,
        // moved on by at least the 50 ms between save and restore, and by
        // no more than the wall-clock time since the save (1 ms for the two
        // clocks' rates).
        assert!(record.clock_ns <= source_clock);
        assert!(
            after >= record.clock_ns + 50_000_000,
            "{after} vs {record:?}"
        );
        assert!(
            after <= record.clock_ns + (now - record.source_realtime_ns) + 1_000_000,
            "{after} vs {record:?} at {now}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// Random PIC, IOAPIC and PIT contents set into one VM, saved as
        /// sections and restored into another VM read back the same.
        #[test]
        fn irqchip_and_pit_round_trip_into_another_vm(
            imr in any::<[u8; 2]>(),
            irq_base in any::<[u8; 2]>(),
            elcr in any::<[u8; 2]>(),
            prio in any::<[u8; 2]>(),
            redir in prop::collection::vec((any::<u8>(), 0u64..8, any::<bool>(), any::<bool>(), any::<bool>(), any::<u8>()), 24),
            ioapic_id in 0u32..16,
            pit in prop::collection::vec((1u32..=0x10000, 0u8..6, 1u8..4, any::<bool>()), 3),
        ) {
            if !crate::testing::kvm_or_skip("irqchip_and_pit_round_trip") {
                return Ok(());
            }
            let kvm = Kvm::new().expect("open /dev/kvm");
            let a = vm_with_devices(&kvm);
            for (i, chip_id) in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE].into_iter().enumerate() {
                let mut chip = kvm_irqchip { chip_id, ..Default::default() };
                a.get_irqchip(&mut chip).unwrap();
                // SAFETY: chip_id names the PIC member of the union.
                let pic = unsafe { &mut chip.chip.pic };
                pic.imr = imr[i];
                pic.irq_base = irq_base[i] & 0xF8;
                pic.elcr = elcr[i] & pic.elcr_mask;
                pic.priority_add = prio[i] & 7;
                a.set_irqchip(&chip).unwrap();
            }
            let mut chip = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
            a.get_irqchip(&mut chip).unwrap();
            // SAFETY: chip_id names the IOAPIC member of the union.
            let ioapic = unsafe { &mut chip.chip.ioapic };
            ioapic.id = ioapic_id;
            for (e, &(vector, mode, logical, level, masked, dest)) in ioapic.redirtbl.iter_mut().zip(&redir) {
                // vector, delivery mode, destination mode, trigger mode,
                // mask, destination (not the read-only status bits 12, 14)
                e.bits = u64::from(vector)
                    | (mode << 8)
                    | (u64::from(logical) << 11)
                    | (u64::from(level) << 15)
                    | (u64::from(masked) << 16)
                    | (u64::from(dest) << 56);
            }
            a.set_irqchip(&chip).unwrap();
            let mut state = a.get_pit2().unwrap();
            for (c, &(count, mode, rw, bcd)) in state.channels.iter_mut().zip(&pit) {
                c.count = count;
                c.mode = mode;
                c.rw_mode = rw;
                c.read_state = rw;
                c.write_state = rw;
                c.bcd = u8::from(bcd);
            }
            a.set_pit2(&state).unwrap();

            let saved = save(&a).expect("save");
            prop_assert_eq!(saved.len(), 5);
            let b = vm_with_devices(&kvm);
            let fresh = save(&b).expect("save a fresh VM");
            restore(&b, &saved);
            let back = save(&b).expect("save it again");
            prop_assert_eq!(comparable(&back), comparable(&saved));
            // The state did travel: the IOAPIC's table is not the reset one.
            prop_assert_ne!(&back[2].data, &fresh[2].data);
        }
    }
}
