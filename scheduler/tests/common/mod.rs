//! What the trace-driven tests share.

use std::path::PathBuf;

/// The PlanetLab traces (`FERRY_TRACES`, else `../shared/traces`), or `None`
/// after a loud SKIP when they are missing (a failure under
/// `FERRY_NO_SKIP`).
pub fn traces() -> Option<PathBuf> {
    let p = std::env::var_os("FERRY_TRACES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces"));
    if p.join("planetlab").is_dir() {
        Some(p)
    } else {
        assert!(
            std::env::var_os("FERRY_NO_SKIP").is_none(),
            "FERRY_NO_SKIP is set, so this test may not skip"
        );
        eprintln!(
            "SKIP: no PlanetLab traces at {} (set FERRY_TRACES)",
            p.display()
        );
        None
    }
}
