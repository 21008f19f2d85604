//! Reading the workload guest's status block (GUEST.md) straight out of an
//! engine process's memory through `/proc/PID/mem`.
//!
//! Both QEMU and ferry keep guest RAM in one large anonymous mapping of the
//! guest's size; the status block is at guest-physical `0x1000` of it. The
//! harness finds the mapping by the block's magic and then reads 160 bytes
//! per probe: a few microseconds, with no help from (and no load on) the
//! engine, and exactly the same for both engines.

use std::fs::File;
use std::os::unix::fs::FileExt;

use ferry_vm::{GuestStatus, STATUS_ADDR};

use crate::error::BenchError;
use crate::procfs;

/// Reads one process's guest status block.
#[derive(Debug)]
pub struct GuestProbe {
    mem: File,
    /// Host virtual address of the status block.
    addr: u64,
}

impl GuestProbe {
    /// Finds the guest RAM of `pid` (a mapping of at least `mem_bytes`
    /// holding the status magic at `0x1000`). `Ok(None)` while no mapping
    /// holds it yet (a destination before the page arrived).
    pub fn find(pid: u32, mem_bytes: u64) -> Result<Option<Self>, BenchError> {
        let maps = procfs::large_rw_mappings(pid, mem_bytes)
            .map_err(|e| BenchError::Proc(format!("/proc/{pid}/maps"), e))?;
        let mem = File::open(format!("/proc/{pid}/mem"))
            .map_err(|e| BenchError::Proc(format!("/proc/{pid}/mem"), e))?;
        for (start, len) in maps {
            // RAM normally starts the mapping; allow a 2 MiB alignment pad.
            for pad in [0u64, 2 << 20] {
                if pad + mem_bytes > len {
                    continue;
                }
                let probe = Self {
                    mem: mem
                        .try_clone()
                        .map_err(|e| BenchError::Proc("dup".into(), e))?,
                    addr: start + pad + STATUS_ADDR,
                };
                if let Ok(st) = probe.read() {
                    if st.magic_ok && st.mem_top <= mem_bytes {
                        return Ok(Some(probe));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The status block now.
    pub fn read(&self) -> std::io::Result<GuestStatus> {
        let mut raw = [0u8; 160];
        self.mem.read_exact_at(&mut raw, self.addr)?;
        let mut w = [0u64; 20];
        for (i, word) in w.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[i * 8..i * 8 + 8]);
            *word = u64::from_le_bytes(b);
        }
        Ok(GuestStatus::from_words(&w))
    }
}
