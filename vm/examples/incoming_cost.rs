//! How long preparing a destination VM takes (memory populated up front).
//! `cargo run --release -p ferry-vm --example incoming_cost -- 1024`
fn main() {
    let mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let vm =
            ferry_vm::Vm::incoming(mib << 20, ferry_vm::DirtyBackend::Bitmap).expect("incoming VM");
        let dt = t.elapsed();
        println!(
            "incoming {mib} MiB: {:.1} ms ({:.2} GB/s)",
            dt.as_secs_f64() * 1e3,
            (mib << 20) as f64 / dt.as_secs_f64() / 1e9
        );
        drop(vm);
    }
}
