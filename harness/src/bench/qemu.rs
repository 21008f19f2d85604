//! QEMU's side: two `qemu-system-x86_64 -accel kvm` processes (source
//! running the workload guest, destination `-incoming defer`, with
//! `-mem-prealloc` when the row prepares destinations) driven over QMP,
//! migration over `tcp:HOST:PORT` (loopback, or the shaped link's
//! destination address with the destination process behind it).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::qmp::{
    CapabilityState, Migrate, MigrateCancel, MigrateIncoming, MigrateSetCapabilities,
    MigrateSetParameters, MigrationCapability, MigrationInfo, MigrationStatus, MultifdCompression,
    Qmp, QmpError, SetVcpuDirtyLimit,
};

use crate::bench::error::BenchError;
use crate::bench::guest_probe::StaticDigest;
use crate::bench::matrix::{DstMemory, Profile, QemuProfile, Workload};
use crate::bench::outcome::{BytesLeft, RunOutcome, RunStatus};
use crate::bench::run_common::{self, Baseline, EngineProcess, RunContext};
use crate::bench::settings::RunSettings;
use crate::bench::watch::Watch;

/// `max-bandwidth` for uncapped rows: far above loopback, so QEMU's default
/// 128 MiB/s cap does not decide the result.
pub const UNCAPPED_BANDWIDTH: u64 = 100_000_000_000;

/// Whether QEMU can be run: `Err` says why not and how to install it.
pub fn available(qemu: &Path) -> Result<(), String> {
    match Command::new(qemu).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => {
            return Err(format!(
                "{} not found or not runnable: QEMU rows skipped (install it: apt-get install qemu-system-x86)",
                qemu.display()
            ))
        }
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Err("/dev/kvm not usable: QEMU rows skipped".into());
    }
    Ok(())
}

fn qemu_cmd(
    ctx: &RunContext<'_>,
    w: &Workload,
    p: QemuProfile,
    name: &str,
    qmp: &Path,
    incoming: bool,
) -> Command {
    let s = ctx.settings;
    let mut c = Command::new(&s.qemu_bin);
    c.arg("-name")
        .arg(format!("{name},debug-threads=on"))
        .arg("-accel")
        .arg(accel(p, incoming))
        .arg("-smp")
        .arg(w.cpus.max(1).to_string())
        .arg("-m")
        .arg(format!("{}M", w.mem_bytes >> 20))
        .arg("-kernel")
        .arg(&s.kernel)
        .arg("-append")
        .arg(format!("{} tsc_khz={}", w.guest_args(), s.tsc_khz))
        .args(["-display", "none", "-nodefaults", "-serial", "none"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if incoming {
        c.args(["-incoming", "defer"]);
        if w.dst_memory == DstMemory::Prepared {
            // Populated before the migration, as ferry's `vm receive --mem`.
            c.arg("-mem-prealloc");
        }
        ctx.enter_dst(&mut c);
    }
    c.stdin(std::process::Stdio::null());
    c
}

fn qmp_err(what: &str) -> impl Fn(QmpError) -> BenchError + '_ {
    move |e| BenchError::Qmp(what.into(), error_chain(&e))
}

fn capabilities(p: QemuProfile) -> Vec<MigrationCapability> {
    match p {
        QemuProfile::Default => vec![],
        QemuProfile::Multifd | QemuProfile::MultifdZstd => vec![MigrationCapability::Multifd],
        QemuProfile::Xbzrle => vec![MigrationCapability::Xbzrle],
        QemuProfile::AutoConverge => vec![MigrationCapability::AutoConverge],
        QemuProfile::DirtyLimit => vec![],
    }
}

/// Entries of the dirty ring QEMU's dirty-limit needs, per vCPU. QEMU
/// 7.2 throttles a vCPU only when its ring fills (the vCPU sleeps in the
/// ring-full exit), so the ring must be small: measured here with a guest
/// dirtying ~160 MB/s on one vCPU and a 1 MB/s limit, 4096 entries
/// brought it to ~15 MB/s within 5 s; 65,536 entries left it unthrottled.
const DIRTY_RING_ENTRIES: u32 = 4096;

/// The `-accel` of a source (`incoming` false) or destination. Only the
/// source of dirty-limit runs on the dirty ring: the destination tracks
/// nothing, and QEMU 7.2 started with `-incoming defer -mem-prealloc` and
/// a dirty ring aborts before its QMP socket answers (`kvm_dirty_ring_reap_one:
/// Assertion 'dirty_gfns && ring_size' failed`), which is why this profile
/// failed to start.
fn accel(p: QemuProfile, incoming: bool) -> String {
    match p {
        QemuProfile::DirtyLimit if !incoming => {
            format!("kvm,dirty-ring-size={DIRTY_RING_ENTRIES}")
        }
        _ => "kvm".into(),
    }
}

/// dirty-limit's per-vCPU limit, MB/s: QEMU 8.1's default
/// `vcpu-dirty-limit` (its dirty-limit capability applies it once the
/// migration stops converging; 7.2 has only the limit, set from the start).
/// A static limit must be this low for a 20 ms pause over a capped link;
/// ferry's dirty-limit starts from a share of the bandwidth and tightens
/// while rounds do not shrink.
const VCPU_DIRTY_LIMIT_MB: u64 = 1;

fn parameters(
    p: QemuProfile,
    w: &Workload,
    downtime_limit_ms: u64,
    source: bool,
) -> MigrateSetParameters {
    let mut v = MigrateSetParameters::default();
    if source {
        v.downtime_limit = Some(downtime_limit_ms);
        v.max_bandwidth = Some(w.cap_bytes_per_sec.unwrap_or(UNCAPPED_BANDWIDTH));
    }
    match p {
        QemuProfile::Multifd => v.multifd_channels = Some(4),
        QemuProfile::MultifdZstd => {
            v.multifd_channels = Some(4);
            v.multifd_compression = Some(MultifdCompression::Zstd);
        }
        QemuProfile::Xbzrle if source => v.xbzrle_cache_size = Some(w.mem_bytes / 4),
        _ => {}
    }
    v
}

fn configure(
    q: &mut Qmp,
    p: QemuProfile,
    w: &Workload,
    downtime_limit_ms: u64,
    source: bool,
) -> Result<(), BenchError> {
    let capabilities: Vec<CapabilityState> = capabilities(p)
        .into_iter()
        .map(|capability| CapabilityState {
            capability,
            state: true,
        })
        .collect();
    if !capabilities.is_empty() {
        q.run(&MigrateSetCapabilities { capabilities })
            .map_err(qmp_err("migrate-set-capabilities"))?;
    }
    let params = parameters(p, w, downtime_limit_ms, source);
    if !params.is_empty() {
        q.run(&params).map_err(qmp_err("migrate-set-parameters"))?;
    }
    if p == QemuProfile::DirtyLimit && source {
        // Every vCPU limited; one dirtying less than the limit is not slowed.
        q.run(&SetVcpuDirtyLimit {
            dirty_rate: VCPU_DIRTY_LIMIT_MB,
        })
        .map_err(qmp_err("set-vcpu-dirty-limit"))?;
    }
    Ok(())
}

fn start(
    ctx: &RunContext<'_>,
    w: &Workload,
    p: QemuProfile,
    name: &str,
    incoming: bool,
) -> Result<(EngineProcess, Qmp), BenchError> {
    let s = ctx.settings;
    let sock = s.workdir.join(format!("{name}.qmp"));
    let _ = std::fs::remove_file(&sock);
    let what = format!("QEMU ({name})");
    let guard = EngineProcess::spawn(
        &what,
        name,
        &mut qemu_cmd(ctx, w, p, name, &sock, incoming),
        &s.workdir,
    )?;
    // A preallocating destination answers once its memory is populated.
    let connect = Duration::from_secs(20) + RunSettings::boot_timeout(w.mem_bytes) / 2;
    let qmp = Qmp::connect(&sock, connect).map_err(|e| {
        BenchError::Qmp(
            format!("connect ({})", run_common::log_tail(&guard.log)),
            error_chain(&e),
        )
    })?;
    Ok((guard, qmp))
}

/// Runs one QEMU migration of `w` with profile `p` and downtime limit
/// `downtime_limit_ms`. Failures are in the returned outcome's status;
/// nothing is left running.
pub fn run(
    ctx: &RunContext<'_>,
    w: &Workload,
    p: QemuProfile,
    downtime_limit_ms: u64,
    repeat: u32,
) -> RunOutcome {
    let mut out = RunOutcome::new(
        Profile::Qemu(p),
        *w,
        repeat,
        downtime_limit_ms,
        RunStatus::Completed,
    );
    if let Err(e) = run_inner(ctx, w, p, &mut out) {
        out.status = match e {
            BenchError::Deadline(..) => RunStatus::NotConverged(e.to_string()),
            e => RunStatus::Failed(error_chain(&e)),
        };
    }
    out
}

pub use ferry_transport::error_chain;

fn run_inner(
    ctx: &RunContext<'_>,
    w: &Workload,
    p: QemuProfile,
    out: &mut RunOutcome,
) -> Result<(), BenchError> {
    let s = ctx.settings;
    let limit = out.downtime_limit_ms;
    let (mut src, mut src_qmp) = start(ctx, w, p, "bench-src", false)?;
    let src_pid = src.pid();
    run_common::wait_guest_running(
        src_pid,
        w.mem_bytes,
        RunSettings::boot_timeout(w.mem_bytes),
        Duration::from_secs(1),
        || src.check_running(),
    )?;
    let before = StaticDigest::of_source(src_pid, w.mem_bytes, w.rate.dirties());
    let (mut dst, mut dst_qmp) = start(ctx, w, p, "bench-dst", true)?;
    let dst_pid = dst.pid();
    configure(&mut src_qmp, p, w, limit, true)?;
    configure(&mut dst_qmp, p, w, limit, false)?;
    let port = run_common::free_port()?;
    let uri = format!("tcp:{}:{port}", ctx.dst_host());
    dst_qmp
        .run(&MigrateIncoming { uri: &uri })
        .map_err(qmp_err("migrate-incoming"))?;

    let base = Baseline::take(ctx, src_pid, dst_pid);
    let t0 = Instant::now();
    let watch = Watch::start(t0, src_pid, dst_pid, w.mem_bytes);
    src_qmp
        .run(&Migrate { uri: &uri })
        .map_err(qmp_err("migrate"))?;
    let deadline = s.deadline_for(w);
    let mut last = MigrationInfo::default();
    let mut link_end = None;
    let result = loop {
        let info = src_qmp.query_migrate().map_err(qmp_err("query-migrate"))?;
        if let Some(ram) = &info.ram {
            out.bytes_left.push(BytesLeft {
                t_ms: t0.elapsed().as_secs_f64() * 1e3,
                round: ram.dirty_sync_count,
                bytes: ram.remaining,
            });
        }
        match info.status {
            Some(MigrationStatus::Completed) => {
                out.engine_done_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
                link_end = ctx.link_tx_bytes();
                last = info;
                break Ok(());
            }
            Some(status @ (MigrationStatus::Failed | MigrationStatus::Cancelled)) => {
                let why = info.error_desc.as_deref().unwrap_or("no error-desc");
                break Err(BenchError::Engine(format!(
                    "QEMU migration {status}: {why}"
                )));
            }
            _ => {}
        }
        src.check_running()?;
        dst.check_running()?;
        if t0.elapsed() > deadline {
            let _ = src_qmp.run(&MigrateCancel {});
            break Err(BenchError::Deadline(
                deadline.as_secs(),
                format!(
                    "status {}, {} MiB left in round {}",
                    info.status.unwrap_or(MigrationStatus::None),
                    info.ram.as_ref().map_or(0, |r| r.remaining) >> 20,
                    info.ram.as_ref().map_or(0, |r| r.dirty_sync_count)
                ),
            ));
        }
        last = info;
        std::thread::sleep(Duration::from_millis(50));
    };
    if result.is_ok() {
        // The total time ends when the watch sees the guest run on the
        // destination.
        watch.wait_dst_running(Duration::from_secs(10));
    }
    let log = watch.finish();
    run_common::fill_from_watch(out, &log, &base, link_end, 0.0);
    out.rounds = last.ram.as_ref().map(|r| r.dirty_sync_count);
    out.wire_bytes = last.ram.as_ref().map(|r| r.transferred);
    out.engine_report = serde_json::to_value(&last).unwrap_or_default();
    result?;
    out.engine_total_ms = last.total_time.map(|v| v as f64);
    out.downtime_ms = last.downtime.map(|v| v as f64);
    dst.check_running()?;
    drop(dst_qmp);
    run_common::check_alive(out, dst_pid, &before);
    Ok(())
}
