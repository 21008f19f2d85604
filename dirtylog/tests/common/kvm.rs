//! KVM subjects: the tiny ring-3 guest of `ferry_dirtylog::test_guest`.

use ferry_dirtylog::test_guest::{TestGuestError, TestVm, Tracking};

use super::{skip, Collector, Subject, Workload};

/// Tracked memory of the test VMs: 8 MiB.
pub const TEST_MEM: u64 = 8 << 20;

pub struct KvmWorkload {
    pub vm: TestVm,
}

impl Workload for KvmWorkload {
    fn pages(&self) -> usize {
        self.vm.memory().pages()
    }

    fn write(&mut self, pages: &[usize], value: u64) -> anyhow::Result<()> {
        Ok(self.vm.write_pages(pages, value, 1)?)
    }

    fn spin_while(
        &mut self,
        pages: &[usize],
        value: u64,
        during: Collector<'_>,
    ) -> anyhow::Result<u64> {
        let ((), passes) = self
            .vm
            .write_pages_while(pages, value, |mem| during(&|p| mem.read_word(p)))?;
        Ok(passes)
    }

    fn read_word(&self, page: usize) -> u64 {
        self.vm.memory().read_word(page)
    }
}

/// A test VM, or `None` after a loud SKIP when this machine has no KVM.
pub fn test_vm(test: &str, mem: u64, tracking: Tracking) -> Option<TestVm> {
    match TestVm::new(mem, tracking) {
        Ok(vm) => Some(vm),
        Err(TestGuestError::NoKvm(e)) => {
            skip(test, &format!("no usable /dev/kvm ({e})"));
            None
        }
        Err(e) => panic!(
            "{test}: building the test VM failed: {:?}",
            anyhow::Error::from(e)
        ),
    }
}

/// A KVM subject tracked as `tracking`.
pub fn subject(test: &str, tracking: Tracking) -> Option<Subject> {
    subject_split(test, tracking, None)
}

/// A KVM subject whose memory is two slots cut at `split` bytes.
pub fn subject_split(test: &str, tracking: Tracking, split: Option<u64>) -> Option<Subject> {
    let mut vm = match TestVm::with_split(TEST_MEM, tracking, split) {
        Ok(vm) => vm,
        Err(TestGuestError::NoKvm(e)) => {
            skip(test, &format!("no usable /dev/kvm ({e})"));
            return None;
        }
        Err(e) => panic!(
            "{test}: building the test VM failed: {:?}",
            anyhow::Error::from(e)
        ),
    };
    let log = vm.take_dirty_log().expect("fresh VM has its log");
    Some(Subject {
        log,
        work: Box::new(KvmWorkload { vm }),
    })
}
