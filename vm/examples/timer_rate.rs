//! What tick rate the workload guest's timer mode (`hz=N`) really reaches
//! here, and what the vCPUs cost the host: boots a guest per rate and
//! counts its ticks and the process's CPU time over 2 s of host time.
//! `cargo run --release -p ferry-vm --example timer_rate -- 100 1000 10000`
//! Environment: `CPUS=N` vCPUs (default 1), `GUEST_ARGS` the guest's
//! command line before `hz=` (default `rate=2000 wss=8`), `KERNEL` another
//! guest image (e.g. an older build, for an A/B).
use std::time::{Duration, Instant};

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the buffer it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage");
    // SAFETY: zeroed is a valid rusage, and getrusage filled it in.
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn main() {
    let rates: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rates = if rates.is_empty() {
        vec![100, 1000, 10000]
    } else {
        rates
    };
    let cpus: usize = std::env::var("CPUS").map_or(1, |c| c.parse().expect("CPUS=N"));
    let args = std::env::var("GUEST_ARGS").unwrap_or_else(|_| "rate=2000 wss=8".into());
    let kernel = std::env::var_os("KERNEL")
        .filter(|k| !k.is_empty())
        .map(std::path::PathBuf::from);
    let tsc = ferry_vm::host_tsc_khz().expect("KVM_GET_TSC_KHZ");
    for hz in rates {
        let vm = ferry_vm::Vm::boot(&ferry_vm::VmConfig {
            mem_bytes: 64 << 20,
            cmdline: format!("{args} hz={hz} tsc_khz={tsc}"),
            cpus,
            kernel: kernel.clone(),
            ..ferry_vm::VmConfig::default()
        })
        .expect("boot");
        vm.wait_running(Duration::from_secs(60)).expect("running");
        std::thread::sleep(Duration::from_millis(200));
        let (a, t, c) = (vm.status(), Instant::now(), cpu_time());
        std::thread::sleep(Duration::from_secs(2));
        let (b, dt, cpu) = (vm.status(), t.elapsed().as_secs_f64(), cpu_time() - c);
        let ap_halts: u64 = b
            .vcpus()
            .iter()
            .zip(a.vcpus())
            .skip(1)
            .map(|(n, t)| n.halts - t.halts)
            .sum::<u64>()
            + (b.idle_halts - a.idle_halts);
        println!(
            "hz={hz} cpus={cpus}: {:.0} ticks/s ({:.0} %), {:.0} halts/s (BSP), {:.0} halts/s (APs), {:.0} pages/s dirtied, heartbeat {:.0}/s, host CPU {:.2} s/s",
            (b.ticks - a.ticks) as f64 / dt,
            (b.ticks - a.ticks) as f64 / dt / hz as f64 * 100.0,
            (b.halts - a.halts) as f64 / dt,
            ap_halts as f64 / dt,
            (b.pages_dirtied - a.pages_dirtied) as f64 / dt,
            (b.heartbeat - a.heartbeat) as f64 / dt,
            cpu.as_secs_f64() / dt,
        );
    }
}
