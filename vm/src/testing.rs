//! For tests that run guests: skip loudly, never pass quietly, where this
//! host has no usable KVM.

/// Why KVM cannot be used here, if it cannot.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm is not usable ({e})")),
    }
}

/// `true` when KVM is usable; otherwise prints `SKIPPED: <test>: <why>` to
/// stderr and returns `false`, so the caller returns early.
pub fn kvm_or_skip(test: &str) -> bool {
    match kvm_unavailable() {
        None => true,
        Some(why) => {
            assert!(
                std::env::var_os("FERRY_NO_SKIP").is_none(),
                "FERRY_NO_SKIP is set, so this test may not skip"
            );
            eprintln!("SKIPPED: {test}: {why}; this test needs KVM");
            false
        }
    }
}
