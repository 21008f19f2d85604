//! Xen log-dirty (feature `xen`): this machine is not a Xen dom0, so only
//! the failure path can be exercised: opening libxenctrl must fail with a
//! clear `DirtyLogError::Xen`, not crash. On a dom0 the test says it cannot
//! check more without a domain to track.
#![cfg(feature = "xen")]

use ferry_dirtylog::{DirtyLogError, XenLogDirty};

#[test]
fn opening_without_xen_fails_with_a_clear_error() {
    if std::path::Path::new("/proc/xen/privcmd").exists() {
        eprintln!("SKIP opening_without_xen_fails_with_a_clear_error: this host runs Xen; no test domain to track");
        return;
    }
    let err = XenLogDirty::new(1, 256).unwrap_err();
    assert!(
        matches!(
            err,
            DirtyLogError::Xen {
                call: "xc_interface_open",
                domid: 1,
                ..
            }
        ),
        "{err}"
    );
}
