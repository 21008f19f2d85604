//! What tick rate the workload guest's timer mode (`hz=N`) really reaches
//! here: boots a guest per rate and counts its ticks over 2 s of host time.
//! `cargo run --release -p ferry-vm --example timer_rate -- 100 1000 10000`
use std::time::{Duration, Instant};

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
    let tsc = ferry_vm::host_tsc_khz().expect("KVM_GET_TSC_KHZ");
    for hz in rates {
        let vm = ferry_vm::Vm::boot(&ferry_vm::VmConfig {
            mem_bytes: 64 << 20,
            cmdline: format!("rate=2000 wss=8 hz={hz} tsc_khz={tsc}"),
            ..ferry_vm::VmConfig::default()
        })
        .expect("boot");
        vm.wait_running(Duration::from_secs(60)).expect("running");
        std::thread::sleep(Duration::from_millis(200));
        let (a, t) = (vm.status(), Instant::now());
        std::thread::sleep(Duration::from_secs(2));
        let (b, dt) = (vm.status(), t.elapsed().as_secs_f64());
        println!(
            "hz={hz}: {:.0} ticks/s ({:.0} %), {:.0} halts/s, {:.0} pages/s dirtied, heartbeat {:.0}/s",
            (b.ticks - a.ticks) as f64 / dt,
            (b.ticks - a.ticks) as f64 / dt / hz as f64 * 100.0,
            (b.halts - a.halts) as f64 / dt,
            (b.pages_dirtied - a.pages_dirtied) as f64 / dt,
            (b.heartbeat - a.heartbeat) as f64 / dt,
        );
    }
}
