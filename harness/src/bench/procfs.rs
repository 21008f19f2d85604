//! What `/proc` says about an engine process: CPU time (whole process and
//! its vCPU thread), bytes it read, and where its guest memory is.
//!
//! Both engines are measured through these same files, so the figures are
//! comparable: QEMU and ferry are just PIDs here.

use std::fs;
use std::io;

/// Clock ticks per second of `/proc/PID/stat` times.
pub(crate) fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime in seconds from the text of a `stat` file.
fn stat_cpu_secs(stat: &str) -> Option<f64> {
    // The command name (field 2) may contain spaces and parentheses: split
    // after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_sec())
}

/// CPU seconds (user + system) of a whole process, threads that already
/// exited included. Readable until the process is reaped (zombies too).
pub fn process_cpu_secs(pid: u32) -> io::Result<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat_cpu_secs(&s).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad stat"))
}

/// CPU seconds of one thread.
pub fn thread_cpu_secs(pid: u32, tid: u32) -> io::Result<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))?;
    stat_cpu_secs(&s).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad stat"))
}

/// User and system CPU seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTime {
    /// User mode.
    pub user: f64,
    /// Kernel mode (system calls, and softirq work such as loopback's
    /// receive processing when it runs in this thread's time).
    pub system: f64,
}

impl CpuTime {
    /// User + system.
    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

/// The CPU time the calling thread has used so far, from
/// `getrusage(RUSAGE_THREAD)` (microseconds, not the clock ticks of
/// `/proc/PID/task/TID/stat`): for timing a piece of work on one thread.
pub fn this_thread_cpu() -> io::Result<CpuTime> {
    // SAFETY: rusage is plain integers, for which all zeros is a value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into the one we own here.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(CpuTime {
        user: secs(u.ru_utime),
        system: secs(u.ru_stime),
    })
}

/// Whether a thread named `comm` runs a guest vCPU: QEMU's `CPU N/KVM`
/// (with `-name ...,debug-threads=on`), ferry's `vcpuN` (not its
/// `vcpuN-throttle` tickers, which are the VMM's own work).
pub fn is_vcpu_thread(comm: &str) -> bool {
    let number = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
    comm.strip_prefix("vcpu").is_some_and(number)
        || comm
            .strip_prefix("CPU ")
            .and_then(|r| r.strip_suffix("/KVM"))
            .is_some_and(number)
}

/// The threads of `pid` that run guest vCPUs ([`is_vcpu_thread`]).
pub fn vcpu_threads(pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| {
            let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            is_vcpu_thread(comm.trim_end())
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Bytes the process has read through read-like system calls (`rchar` of
/// `/proc/PID/io`): sockets included, so on an engine's destination the
/// growth during a migration is the bytes it took off the wire.
pub fn read_bytes(pid: u32) -> io::Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/io"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no rchar in io"))
}

/// The 1-minute load average (how busy the shared machine was).
pub fn load_1m() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What machine this is: CPU model, online CPUs, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    // SAFETY: sysconf has no memory-safety preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let mem_kib: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cpus} CPUs, {} GiB RAM, kernel {}",
        mem_kib >> 20,
        kernel.trim()
    )
}

/// Bytes sent over the loopback interface since boot.
pub fn loopback_bytes() -> io::Result<u64> {
    interface_tx_bytes("lo")
}

/// Bytes sent over network interface `name` (of this network namespace)
/// since it was created.
pub fn interface_tx_bytes(name: &str) -> io::Result<u64> {
    fs::read_to_string(format!("/sys/class/net/{name}/statistics/tx_bytes"))?
        .trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad {name} tx_bytes")))
}

/// Writable private or shared mappings of at least `min_len` bytes, as
/// `(start, len)`: candidates for guest RAM.
pub fn large_rw_mappings(pid: u32, min_len: u64) -> io::Result<Vec<(u64, u64)>> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(maps
        .lines()
        .filter_map(|l| parse_map_line(l, min_len))
        .collect())
}

fn parse_map_line(line: &str, min_len: u64) -> Option<(u64, u64)> {
    let mut it = line.split_whitespace();
    let (a, b) = it.next()?.split_once('-')?;
    let perms = it.next()?;
    if !perms.starts_with("rw") {
        return None;
    }
    let start = u64::from_str_radix(a, 16).ok()?;
    let end = u64::from_str_radix(b, 16).ok()?;
    (end - start >= min_len).then_some((start, end - start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vcpu_thread_is_found_and_nothing_else() {
        for (comm, vcpu) in [
            ("vcpu0", true),
            ("vcpu12", true),
            ("CPU 0/KVM", true),
            ("CPU 3/KVM", true),
            ("vcpu0-throttle", false),
            ("vcpu", false),
            ("CPU /KVM", false),
            ("live_migration", false),
            ("ferry-lane-0", false),
        ] {
            assert_eq!(is_vcpu_thread(comm), vcpu, "{comm}");
        }
        // Threads of this very process, named as a VMM names them.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let threads: Vec<_> = ["vcpu0", "vcpu1", "vcpu0-throttle", "CPU 2/KVM"]
            .into_iter()
            .map(|name| {
                let (stop, tx) = (stop.clone(), tx.clone());
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || {
                        // SAFETY: gettid takes no arguments and cannot fail.
                        let tid = unsafe { libc::gettid() } as u32;
                        tx.send((name, tid)).unwrap();
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                    })
                    .unwrap()
            })
            .collect();
        let named: Vec<(&str, u32)> = rx.iter().take(4).collect();
        let found = vcpu_threads(std::process::id());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        for (name, tid) in named {
            assert_eq!(
                found.contains(&tid),
                name != "vcpu0-throttle",
                "{name}: {found:?}"
            );
        }
    }

    #[test]
    fn this_threads_cpu_grows_while_it_works() {
        let before = this_thread_cpu().expect("getrusage");
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = this_thread_cpu().expect("getrusage");
        assert!(after.total() > before.total(), "{before:?} -> {after:?}");
        assert!(after.user >= before.user && after.system >= before.system);
    }

    #[test]
    fn stat_with_spaces_in_name_parses() {
        let line = "600 (CPU 0/KVM) R 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        let secs = stat_cpu_secs(line).unwrap();
        assert!((secs - 300.0 / ticks_per_sec()).abs() < 1e-9);
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(process_cpu_secs(me).unwrap() >= 0.0);
        assert!(read_bytes(me).unwrap() > 0);
        let mut v = vec![1u8; 64 << 20];
        v[12345] = 2;
        let maps = large_rw_mappings(me, 64 << 20).unwrap();
        let addr = v.as_ptr() as u64;
        assert!(maps.iter().any(|&(s, l)| addr >= s && addr < s + l));
    }

    #[test]
    fn map_lines_filter_by_perms_and_size() {
        let l = "7ff25fe00000-7ff26fe00000 rw-p 00000000 00:00 0";
        assert_eq!(
            parse_map_line(l, 1 << 20),
            Some((0x7ff2_5fe0_0000, 256 << 20))
        );
        assert_eq!(parse_map_line(l, 512 << 20), None);
        let ro = "7ff25fe00000-7ff26fe00000 r--p 00000000 00:00 0";
        assert_eq!(parse_map_line(ro, 1), None);
    }
}
