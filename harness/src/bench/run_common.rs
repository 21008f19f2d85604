//! Steps both engine runners share: free ports, waiting for a guest to be
//! ready, and turning the watch log and counters into an outcome.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use ferry_vm::GuestPhase;

use crate::bench::alive;
use crate::bench::error::BenchError;
use crate::bench::guest_probe::{GuestProbe, StaticDigest};
use crate::bench::machine::CpuMark;
use crate::bench::outcome::{RunOutcome, StaticCheck};
use crate::bench::procfs;
use crate::bench::settings::RunSettings;
use crate::bench::shaped_link::ShapedLink;
use crate::bench::watch::{CpuMeter, CpuSample, WatchLog};

/// Where a run happens: the session's settings and, for a shaped-link
/// row, the link the destinations sit behind.
#[derive(Debug, Clone, Copy)]
pub struct RunContext<'a> {
    /// The session's settings.
    pub settings: &'a RunSettings,
    /// The shaped link, `None` on loopback.
    pub link: Option<&'a ShapedLink>,
}

impl RunContext<'_> {
    /// The address destinations listen on and sources connect to.
    pub fn dst_host(&self) -> String {
        self.link
            .map_or_else(|| "127.0.0.1".into(), |l| l.dst_ip().to_string())
    }

    /// Makes a destination process run behind the link (no-op on loopback).
    pub fn enter_dst(&self, cmd: &mut std::process::Command) {
        if let Some(l) = self.link {
            l.enter(cmd);
        }
    }

    /// Bytes sent over the link so far (loopback: `lo`; shaped: the host
    /// end of the veth pair).
    pub fn link_tx_bytes(&self) -> Option<u64> {
        match self.link {
            None => procfs::loopback_bytes().ok(),
            Some(l) => procfs::interface_tx_bytes(l.host_if()).ok(),
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, BenchError> {
    let l = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| BenchError::Spawn("a port probe".into(), e))?;
    Ok(l.local_addr()
        .map_err(|e| BenchError::Spawn("a port probe".into(), e))?
        .port())
}

/// Waits until the guest in `pid` runs its dirty loop (phase 2), then
/// `settle` longer. `alive` says whether the process still runs.
pub fn wait_guest_running(
    pid: u32,
    mem_bytes: u64,
    timeout: Duration,
    settle: Duration,
    mut alive: impl FnMut() -> Result<(), BenchError>,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    let mut probe = None;
    loop {
        alive()?;
        if probe.is_none() {
            probe = GuestProbe::find(pid, mem_bytes)?;
        }
        if let Some(p) = &probe {
            let st = p
                .read()
                .map_err(|e| BenchError::Proc(format!("/proc/{pid}/mem"), e))?;
            match st.phase {
                GuestPhase::Running => break,
                GuestPhase::Fatal => {
                    return Err(BenchError::Guest(format!(
                        "fatal: {}",
                        st.fatal_reason_text()
                    )))
                }
                _ => {}
            }
        }
        if Instant::now() > deadline {
            return Err(BenchError::Guest(format!(
                "not running its dirty loop after {} s",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(settle);
    Ok(())
}

/// Counters taken right before the migration starts.
#[derive(Debug, Clone, Copy)]
pub struct Baseline {
    /// Source CPU.
    pub src: CpuSample,
    /// Destination CPU.
    pub dst: CpuSample,
    /// Link tx bytes.
    pub link: Option<u64>,
    /// The machine's busy time and ours, for others' share.
    pub mark: Option<CpuMark>,
}

impl Baseline {
    /// Takes the counters of `src` and `dst` and of the link.
    pub fn take(ctx: &RunContext<'_>, src: u32, dst: u32) -> Self {
        let src = CpuMeter::new(src).sample().unwrap_or_default();
        let dst = CpuMeter::new(dst).sample().unwrap_or_default();
        Self {
            src,
            dst,
            link: ctx.link_tx_bytes(),
            mark: CpuMark::take(src.process + dst.process),
        }
    }
}

/// Fills the measured-from-outside fields of `out`: total time (migrate
/// issued to the guest running on the destination, from the watch),
/// heartbeat gap, CPU, link bytes, others' CPU. `link_end` is the link's
/// tx bytes when the engine said it was done; `extra_src_cpu` adds the CPU
/// of helper processes on the source side (ferry's `migrate` client).
pub fn fill_from_watch(
    out: &mut RunOutcome,
    log: &WatchLog,
    base: &Baseline,
    link_end: Option<u64>,
    extra_src_cpu: f64,
) {
    out.total_ms = log.dst_running_ms();
    out.heartbeat_gap_ms = log.heartbeat_gap_ms();
    out.guest_dirty_rate = log.src_dirty_rate();
    out.gap_parts_ms = log.gap_parts_ms();
    out.heartbeat_trace = log
        .src_last_change
        .into_iter()
        .chain(log.resume_trace(8))
        .collect();
    out.switch_heartbeat = log.switch_heartbeat();
    if let Some(s) = log.src_cpu {
        let total = s.process - base.src.process + extra_src_cpu;
        out.src_cpu_s = Some(total);
        out.src_engine_cpu_s = Some(total - (s.vcpu - base.src.vcpu));
    }
    if let Some(d) = log.dst_cpu {
        let total = d.process - base.dst.process;
        out.dst_cpu_s = Some(total);
        out.dst_engine_cpu_s = Some(total - (d.vcpu - base.dst.vcpu));
    }
    out.link_bytes = link_end.zip(base.link).map(|(e, b)| e.saturating_sub(b));
    let ours = log.src_cpu.map_or(base.src.process, |s| s.process)
        + log.dst_cpu.map_or(base.dst.process, |d| d.process)
        + extra_src_cpu;
    out.others_cpus = base
        .mark
        .zip(CpuMark::take(ours))
        .and_then(|(a, b)| a.others_until(&b));
}

/// Runs the liveness check on the destination and records it, with the
/// static-memory comparison against `before` (taken on the source; an
/// `Err` there is recorded as not compared, which fails the run).
pub fn check_alive(
    out: &mut RunOutcome,
    dst_pid: u32,
    before: &Result<Option<StaticDigest>, String>,
) {
    let l = alive::check(
        dst_pid,
        out.workload.mem_bytes,
        out.switch_heartbeat,
        out.workload.rate.dirties(),
        Duration::from_millis(500),
    );
    out.guest_alive = Some(l.alive);
    out.verify_errors = l.verify_errors;
    out.alive_detail = l.detail;
    out.static_memory = match before {
        Err(e) => StaticCheck::NotCompared(format!("on the source: {e}")),
        Ok(None) => StaticCheck::NoStaticRange,
        Ok(Some(b)) => {
            let bytes = b.range.1 - b.range.0;
            match b.matches_destination(dst_pid, out.workload.mem_bytes) {
                Ok(true) => StaticCheck::Matched(bytes),
                Ok(false) => {
                    out.alive_detail += &format!(
                        "; static memory {:#x}..{:#x} differs from the source's",
                        b.range.0, b.range.1
                    );
                    StaticCheck::Differs(bytes)
                }
                Err(e) => StaticCheck::NotCompared(format!("on the destination: {e}")),
            }
        }
    };
}

/// An engine process under a kill-on-drop guard, with its log file.
#[derive(Debug)]
pub struct EngineProcess {
    /// The guard (kills and reaps by PID on drop).
    pub guard: crate::process::ProcessGuard,
    /// stdout + stderr of the process.
    pub log: std::path::PathBuf,
    what: String,
}

impl EngineProcess {
    /// Spawns `cmd` as `what`, output to `<workdir>/<name>.log`.
    pub fn spawn(
        what: &str,
        name: &str,
        cmd: &mut std::process::Command,
        workdir: &std::path::Path,
    ) -> Result<Self, BenchError> {
        let log = workdir.join(format!("{name}.log"));
        let _ = std::fs::remove_file(&log);
        die_with_parent(cmd);
        let guard = crate::process::ProcessGuard::spawn(name, cmd, &log)
            .map_err(|e| BenchError::Process(what.into(), e))?;
        Ok(Self {
            guard,
            log,
            what: what.into(),
        })
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// `Err` (with the end of its log) once the process has exited.
    pub fn check_running(&mut self) -> Result<(), BenchError> {
        if self.guard.is_running() {
            return Ok(());
        }
        Err(BenchError::Engine(format!(
            "{} exited: {}",
            self.what,
            log_tail(&self.log)
        )))
    }
}

/// The last few lines of a log file, on one line.
pub fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    if tail.is_empty() {
        "(no output)".into()
    } else {
        tail
    }
}

/// Makes the child get SIGKILL when the harness thread that started it
/// dies, even by SIGKILL, when no guard gets to run.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let hook = || {
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers and touches
        // no memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: the hook runs in the child between fork and exec; it only
    // calls prctl (async-signal-safe) and allocates nothing on success.
    unsafe {
        cmd.pre_exec(hook);
    }
}
