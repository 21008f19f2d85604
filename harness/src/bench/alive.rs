//! Does the guest live on at the destination? The same check for both
//! engines, from guest memory.

use std::time::{Duration, Instant};

use ferry_vm::GuestPhase;

use crate::bench::guest_probe::GuestProbe;

/// The verdict and what it is based on.
#[derive(Debug, Clone)]
pub struct Liveness {
    /// All conditions held.
    pub alive: bool,
    /// Self-check errors the guest counted (when readable).
    pub verify_errors: Option<u64>,
    /// What was seen, or what failed.
    pub detail: String,
}

/// Reads the destination guest twice, `window` apart: healthy when the
/// phase is 2, the heartbeat rose and is at least `switch_heartbeat` (it
/// continued, not restarted), pages dirtied rose when `dirtying`, and
/// `verify_errors` is 0.
pub fn check(
    dst_pid: u32,
    mem_bytes: u64,
    switch_heartbeat: Option<u64>,
    dirtying: bool,
    window: Duration,
) -> Liveness {
    let fail = |detail: String| Liveness {
        alive: false,
        verify_errors: None,
        detail,
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let probe = loop {
        match GuestProbe::find(dst_pid, mem_bytes) {
            Ok(Some(p)) => break p,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => return fail("no guest status block in the destination's memory".into()),
            Err(e) => return fail(format!("destination memory unreadable: {e}")),
        }
    };
    let Ok(a) = probe.read() else {
        return fail("destination exited".into());
    };
    std::thread::sleep(window);
    let Ok(b) = probe.read() else {
        return fail("destination exited during the liveness window".into());
    };
    let mut problems = Vec::new();
    if b.phase != GuestPhase::Running {
        problems.push(format!("phase {:?}", b.phase));
    }
    if b.heartbeat <= a.heartbeat {
        problems.push(format!("heartbeat stuck at {}", b.heartbeat));
    }
    if let Some(h) = switch_heartbeat {
        if a.heartbeat < h {
            problems.push(format!(
                "heartbeat {} below the switch value {h}",
                a.heartbeat
            ));
        }
    }
    if dirtying && b.pages_dirtied <= a.pages_dirtied {
        problems.push(format!("pages dirtied stuck at {}", b.pages_dirtied));
    }
    if b.verify_errors != 0 {
        problems.push(format!(
            "{} verify errors (first bad word at {:#x})",
            b.verify_errors, b.first_bad_addr
        ));
    }
    let seen = format!(
        "heartbeat {}->{} (switch {}), dirtied {}->{}, verify_errors {}",
        a.heartbeat,
        b.heartbeat,
        switch_heartbeat.map_or("?".into(), |h| h.to_string()),
        a.pages_dirtied,
        b.pages_dirtied,
        b.verify_errors
    );
    Liveness {
        alive: problems.is_empty(),
        verify_errors: Some(b.verify_errors),
        detail: if problems.is_empty() {
            seen
        } else {
            format!("{}; {seen}", problems.join(", "))
        },
    }
}
