//! QEMU migrating the same workload guest directly over TCP and through
//! ferry's tunnel (plain lanes, TLS lanes), alternating, in one run.
//!
//! `cargo bench -p ferry-benches --bench transport_tunnel_qemu [-- REPS [MEM_MIB]]`
//! (defaults: 3 repetitions, 512 MiB guest dirtying 2000 pages/s).
//! Prints QEMU's own `total-time`, `downtime` and bytes transferred, the
//! median per variant, and the tunnel's cost relative to direct.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ferry_benches::median;
use ferry_harness::qemu::{qemu_unavailable, QemuConfig, QemuGuest};
use ferry_harness::qmp::{
    Migrate, MigrateIncoming, MigrateSetParameters, MigrationStatus, RunState,
};
use ferry_transport::tls::generate_cert_set;
use ferry_transport::tunnel::{Tunnel, TunnelOptions};
use ferry_transport::{LaneOptions, Security, TlsSettings};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    DirectTcp,
    Tunnel,
    TunnelTls,
}

struct Run {
    /// From the `migrate` command until the destination reports `running`.
    end_to_end_ms: f64,
    /// QEMU's `total-time` (source side: until the source sent everything).
    total_ms: f64,
    downtime_ms: f64,
    bytes: f64,
}

fn config(mem_mib: u32, incoming: Option<&str>) -> QemuConfig {
    QemuConfig {
        kernel: ferry_vm::guest_elf_path().to_owned(),
        mem_mib,
        append: "rate=2000 tsc_khz=2300000".into(),
        incoming: incoming.map(str::to_owned),
        cpus: 1,
    }
}

fn tls_pair() -> Result<(Security, Security)> {
    let set = generate_cert_set(&["source", "destination"])?;
    let s = |i: usize| -> Result<Security> {
        let (_, c, k) = &set.nodes[i];
        Ok(Security::Tls(Arc::new(TlsSettings::from_pem(
            c,
            k,
            &set.ca_pem,
            "ferry",
        )?)))
    };
    Ok((s(0)?, s(1)?))
}

fn one(variant: Variant, mem_mib: u32, dir: &Path, port: u16) -> Result<Run> {
    let mut src = QemuGuest::start("src", &config(mem_mib, None), dir)?;
    let mut dst = QemuGuest::start("dst", &config(mem_mib, Some("defer")), dir)?;
    for q in [&mut src, &mut dst] {
        q.qmp.run(&MigrateSetParameters {
            max_bandwidth: Some(64 << 30),
            ..Default::default()
        })?;
    }
    let mut tunnels = Vec::new();
    let uri = match variant {
        Variant::DirectTcp => {
            let uri = format!("tcp:127.0.0.1:{port}");
            dst.qmp.run(&MigrateIncoming { uri: &uri })?;
            uri
        }
        Variant::Tunnel | Variant::TunnelTls => {
            let (s, d) = if variant == Variant::TunnelTls {
                tls_pair()?
            } else {
                (Security::Insecure, Security::Insecure)
            };
            let dst_sock = dir.join("dst.sock");
            let src_sock = dir.join("src.sock");
            let _ = std::fs::remove_file(&dst_sock);
            dst.qmp.run(&MigrateIncoming {
                uri: &format!("unix:{}", dst_sock.display()),
            })?;
            let t_dst = Tunnel::destination(
                "127.0.0.1:0",
                &dst_sock,
                &TunnelOptions::new(LaneOptions::new(1, d)),
            )?;
            let addr = t_dst.local_addr().context("tunnel address")?.to_string();
            let t_src = Tunnel::source(
                &src_sock,
                &addr,
                &TunnelOptions::new(LaneOptions::new(2, s)),
            )?;
            tunnels.push(t_src);
            tunnels.push(t_dst);
            format!("unix:{}", src_sock.display())
        }
    };
    src.wait_running(100, Duration::from_secs(120))?;
    let t0 = Instant::now();
    src.qmp.run(&Migrate { uri: &uri })?;
    let r = src.qmp.wait_migration(Duration::from_secs(300))?;
    ensure!(
        r.status == Some(MigrationStatus::Completed),
        "{variant:?}: {r:?}"
    );
    while dst.qmp.run_state()? != RunState::Running {
        ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "{variant:?}: destination never ran"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let end_to_end_ms = t0.elapsed().as_secs_f64() * 1e3;
    for t in tunnels {
        t.stop()?;
    }
    Ok(Run {
        end_to_end_ms,
        total_ms: r.total_time.map_or(f64::NAN, |t| t as f64),
        downtime_ms: r.downtime.map_or(f64::NAN, |t| t as f64),
        bytes: r
            .ram
            .as_ref()
            .map_or(f64::NAN, |ram| ram.transferred as f64),
    })
}

fn main() -> Result<()> {
    if let Some(why) = qemu_unavailable() {
        eprintln!("SKIP (transport_tunnel_qemu): {why}");
        return Ok(());
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let reps: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(3);
    let mem_mib: u32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(512);
    let variants = [Variant::DirectTcp, Variant::Tunnel, Variant::TunnelTls];
    let mut results: Vec<Vec<Run>> = variants.iter().map(|_| Vec::new()).collect();
    for rep in 0..reps {
        for (i, &v) in variants.iter().enumerate() {
            let dir = tempfile::tempdir()?;
            let port = 47_000 + u16::try_from(rep * 10 + i).unwrap_or(0);
            let r = one(v, mem_mib, dir.path(), port)?;
            eprintln!(
                "rep {rep} {v:?}: until destination runs {:.0} ms, QEMU total {:.0} ms, downtime {:.0} ms, {:.0} MB",
                r.end_to_end_ms,
                r.total_ms,
                r.downtime_ms,
                r.bytes / 1e6
            );
            results[i].push(r);
        }
    }
    let direct = median(results[0].iter().map(|r| r.end_to_end_ms).collect());
    println!(
        "| QEMU 7.2, {mem_mib} MiB guest, median of {reps} | migrate -> destination running, ms | vs direct | QEMU total-time ms | downtime ms | MB sent |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (i, v) in variants.iter().enumerate() {
        let pick = |f: fn(&Run) -> f64| median(results[i].iter().map(f).collect());
        let e2e = pick(|r| r.end_to_end_ms);
        println!(
            "| {v:?} | {e2e:.0} | {:+.1}% | {:.0} | {:.0} | {:.0} |",
            100.0 * (e2e - direct) / direct,
            pick(|r| r.total_ms),
            pick(|r| r.downtime_ms),
            pick(|r| r.bytes / 1e6)
        );
    }
    Ok(())
}
