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

use crate::bench::error::BenchError;
use crate::bench::procfs;

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

    /// xxh3 of guest-physical `[start, end)`, read in 1 MiB pieces.
    pub fn digest(&self, start: u64, end: u64) -> std::io::Result<u64> {
        let base = self.addr - STATUS_ADDR;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = start;
        while at < end {
            let n = usize::try_from((end - at).min(buf.len() as u64)).unwrap_or(buf.len());
            self.mem.read_exact_at(&mut buf[..n], base + at)?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        Ok(h.digest())
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

/// Guest-physical range the workload guest fills and then never writes
/// again: the fill region above its working set (all of it when it does
/// not dirty). Equal on source and destination after any correct
/// migration, whatever the engine; `None` when there is no such range.
pub fn static_range(status: &GuestStatus, dirties: bool) -> Option<(u64, u64)> {
    let start = if !dirties {
        ferry_vm::FILL_BASE
    } else {
        ferry_vm::FILL_BASE + status.wss_pages * 4096
    };
    (status.mem_top > start).then_some((start, status.mem_top))
}

/// What the static-memory comparison found.
#[derive(Debug, Clone, Copy)]
pub struct StaticDigest {
    /// The range hashed.
    pub range: (u64, u64),
    /// Its xxh3 on the source before the migration.
    pub digest: u64,
}

impl StaticDigest {
    /// Hashes the static range of the source's guest (after the fill).
    /// `Ok(None)`: the guest has no static range (it writes all of its
    /// memory); `Err`: the digest could not be taken (why), which must not
    /// pass for a match later.
    pub fn of_source(pid: u32, mem_bytes: u64, dirties: bool) -> Result<Option<Self>, String> {
        let p = GuestProbe::find(pid, mem_bytes)
            .map_err(|e| e.to_string())?
            .ok_or("no guest status block in the source's memory")?;
        let st = p
            .read()
            .map_err(|e| format!("reading the source's status block: {e}"))?;
        let Some(range) = static_range(&st, dirties) else {
            return Ok(None);
        };
        let digest = p
            .digest(range.0, range.1)
            .map_err(|e| format!("hashing the source's memory: {e}"))?;
        Ok(Some(Self { range, digest }))
    }

    /// Whether the destination holds the same bytes there.
    pub fn matches_destination(&self, pid: u32, mem_bytes: u64) -> Result<bool, String> {
        let p = GuestProbe::find(pid, mem_bytes)
            .map_err(|e| e.to_string())?
            .ok_or("no guest in the destination's memory")?;
        let d = p
            .digest(self.range.0, self.range.1)
            .map_err(|e| e.to_string())?;
        Ok(d == self.digest)
    }
}
