//! Builds the workload guest (`guest/`, see shared GUEST.md) with gcc, as and ld.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for f in [
        "guest/boot.S",
        "guest/main.c",
        "guest/guest.ld",
        "guest/build.sh",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    let status = Command::new("sh")
        .arg("guest/build.sh")
        .arg(&out)
        .status()
        .expect("run guest/build.sh (needs sh, gcc, ld, objcopy)");
    assert!(
        status.success(),
        "building the workload guest failed: install gcc and binutils"
    );
}
