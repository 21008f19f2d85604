//! Stock QEMU migrating the workload guest through ferry's tunnel: plain,
//! with mutual TLS, multifd, and refused with a wrong certificate.
//!
//! Each test starts a source QEMU running the guest (256 MiB, dirtying 2000
//! pages/s), a destination QEMU waiting with `-incoming defer`, and the two
//! tunnel ends in-process; the source migrates to the tunnel's UNIX socket,
//! the destination's tunnel end connects to the destination QEMU's. Success:
//! `query-migrate` completed, the destination runs, its heartbeat continues
//! from at least the source's value before the migration and keeps rising,
//! pages dirtied keep rising, and the guest's own `verify_errors` stays 0.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ferry_e2e::qemu::{qemu_unavailable, QemuConfig, QemuGuest};
use ferry_e2e::qmp::{
    guest_status, CapabilityState, Migrate, MigrateIncoming, MigrateSetCapabilities,
    MigrateSetParameters, MigrationCapability, MigrationStatus, RunState,
};
use ferry_transport::tls::generate_certs;
use ferry_transport::tunnel::{Tunnel, TunnelOptions};
use ferry_transport::{LaneOptions, Security, TlsFiles, TlsSettings};

const APPEND: &str = "rate=2000 tsc_khz=2300000";

#[derive(Debug, Clone, Copy)]
enum Tls {
    Off,
    On,
    /// The source presents a certificate from a CA the destination does not trust.
    WrongCert,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    tls: Tls,
    lanes: u16,
    lz4: bool,
    multifd_channels: Option<u32>,
}

fn skip() -> bool {
    if let Some(why) = qemu_unavailable() {
        assert!(
            std::env::var_os("FERRY_NO_SKIP").is_none(),
            "FERRY_NO_SKIP is set, so this test may not skip"
        );
        eprintln!("SKIP (tunnel_qemu): {why}");
        return true;
    }
    false
}

fn qemu_config(incoming: Option<&str>) -> QemuConfig {
    QemuConfig {
        kernel: ferry_vm::guest_elf_path().to_owned(),
        mem_mib: 256,
        append: APPEND.into(),
        incoming: incoming.map(str::to_owned),
        cpus: 1,
    }
}

fn security(tls: Tls, dir: &Path) -> Result<(Security, Security)> {
    let load = |f: &TlsFiles| -> Result<Security> {
        Ok(Security::Tls(Arc::new(TlsSettings::from_files(
            f, "ferry",
        )?)))
    };
    Ok(match tls {
        Tls::Off => (Security::Insecure, Security::Insecure),
        Tls::On => {
            let g = generate_certs(&dir.join("pki"), &["source", "destination"])?;
            (load(&g.nodes[0].1)?, load(&g.nodes[1].1)?)
        }
        Tls::WrongCert => {
            let good = generate_certs(&dir.join("pki"), &["destination"])?;
            let rogue = generate_certs(&dir.join("rogue"), &["source"])?;
            // The rogue source trusts the real CA but its own certificate is not from it.
            let src = TlsFiles {
                ca: good.ca.clone(),
                ..rogue.nodes[0].1.clone()
            };
            (load(&src)?, load(&good.nodes[0].1)?)
        }
    })
}

fn enable_multifd(q: &mut QemuGuest, channels: u32) -> Result<()> {
    q.qmp.run(&MigrateSetCapabilities {
        capabilities: vec![CapabilityState {
            capability: MigrationCapability::Multifd,
            state: true,
        }],
    })?;
    q.qmp.run(&MigrateSetParameters {
        multifd_channels: Some(channels),
        ..Default::default()
    })?;
    Ok(())
}

fn wait_state(q: &mut QemuGuest, want: RunState, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = q.qmp.run_state()?;
        if s == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} is {s:?}, not {want:?}", q.process.name());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for the heartbeat to pass `above`; returns the status then.
fn heartbeat_rises(q: &mut QemuGuest, above: u64) -> Result<ferry_e2e::qmp::GuestStatusWords> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = guest_status(&mut q.qmp)?;
        if s.heartbeat > above {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!(
                "heartbeat of {} stuck at {} (status {s:?})",
                q.process.name(),
                s.heartbeat
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn migrate_through_tunnel(case: Case) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (src_sec, dst_sec) = security(case.tls, dir.path())?;
    let dst_mig = dir.path().join("dst-migration.sock");
    let src_tun = dir.path().join("src-tunnel.sock");

    let mut src = QemuGuest::start("src", &qemu_config(None), dir.path())?;
    let mut dst = QemuGuest::start("dst", &qemu_config(Some("defer")), dir.path())?;
    for q in [&mut src, &mut dst] {
        if let Some(n) = case.multifd_channels {
            enable_multifd(q, n)?;
        }
        q.qmp.run(&MigrateSetParameters {
            max_bandwidth: Some(8 << 30),
            ..Default::default()
        })?;
    }
    dst.qmp.run(&MigrateIncoming {
        uri: &format!("unix:{}", dst_mig.display()),
    })?;

    let mut dst_opts = TunnelOptions::new(LaneOptions::new(1, dst_sec));
    dst_opts.lz4 = case.lz4;
    let dst_tunnel = Tunnel::destination("127.0.0.1:0", &dst_mig, &dst_opts)?;
    let addr = dst_tunnel
        .local_addr()
        .context("destination tunnel address")?
        .to_string();
    let mut src_opts = TunnelOptions::new(LaneOptions::new(case.lanes, src_sec));
    src_opts.lz4 = case.lz4;
    let src_tunnel = Tunnel::source(&src_tun, &addr, &src_opts);

    let before = src.wait_running(1, Duration::from_secs(60))?;

    if let Tls::WrongCert = case.tls {
        let err = src_tunnel
            .err()
            .context("a source with a wrong certificate got lanes")?;
        let msg = format!("{:#}", anyhow::Error::from(err));
        ensure!(
            msg.contains("alert") || msg.contains("certificate"),
            "unclear refusal: {msg}"
        );
        eprintln!("refused as expected: {msg}");
        // QEMU finds nothing listening: the migration fails, the guest runs on.
        let started = src.qmp.run(&Migrate {
            uri: &format!("unix:{}", src_tun.display()),
        });
        if started.is_ok() {
            let r = src.qmp.wait_migration(Duration::from_secs(60))?;
            ensure!(
                r.status == Some(MigrationStatus::Failed),
                "migration without a tunnel did not fail: {r:?}"
            );
        }
        ensure!(
            src.qmp.run_state()? == RunState::Running,
            "source guest not running after the refusal"
        );
        heartbeat_rises(&mut src, before)?;
        ensure!(
            dst.qmp.run_state()? == RunState::Inmigrate,
            "destination left inmigrate"
        );
        dst_tunnel.stop()?;
        return Ok(());
    }
    let src_tunnel = src_tunnel?;

    src.qmp.run(&Migrate {
        uri: &format!("unix:{}", src_tun.display()),
    })?;
    let r = src.qmp.wait_migration(Duration::from_secs(180))?;
    ensure!(
        r.status == Some(MigrationStatus::Completed),
        "migration did not complete: {r:?}\nsource log: {}\ndestination log: {}",
        std::fs::read_to_string(&src.log).unwrap_or_default(),
        std::fs::read_to_string(&dst.log).unwrap_or_default()
    );
    eprintln!(
        "migrated: total {:?} ms, downtime {:?} ms, {:?} bytes",
        r.total_time,
        r.downtime,
        r.ram.as_ref().map(|ram| ram.transferred)
    );
    ensure!(
        src.qmp.run_state()? == RunState::Postmigrate,
        "source still running after completion"
    );
    wait_state(&mut dst, RunState::Running, Duration::from_secs(30))?;

    let first = guest_status(&mut dst.qmp)?;
    ensure!(
        first.phase == 2,
        "destination guest phase {} (status {first:?})",
        first.phase
    );
    ensure!(
        first.heartbeat >= before,
        "heartbeat restarted: {} < {before}",
        first.heartbeat
    );
    // ~200 ms of guest time: at rate=2000 that is ~400 page writes, so a
    // guest that still dirties cannot show the same count by chance.
    let later = heartbeat_rises(&mut dst, first.heartbeat + 200)?;
    ensure!(
        later.pages_dirtied > first.pages_dirtied,
        "destination guest stopped dirtying"
    );
    ensure!(
        later.verify_errors == 0,
        "guest found {} bad pages",
        later.verify_errors
    );

    let streams = src_tunnel
        .stats()
        .streams
        .load(std::sync::atomic::Ordering::Relaxed);
    let carried = src_tunnel
        .stats()
        .bytes_from_local
        .load(std::sync::atomic::Ordering::Relaxed);
    ensure!(
        streams == u64::from(case.multifd_channels.map_or(1, |n| n + 1)),
        "{streams} streams"
    );
    ensure!(
        carried > 64 << 20,
        "only {carried} bytes went through the tunnel"
    );
    src_tunnel.stop()?;
    dst_tunnel.stop()?;
    Ok(())
}

fn run(case: Case) {
    if skip() {
        return;
    }
    if let Err(e) = migrate_through_tunnel(case) {
        panic!("{case:?}: {e:#}");
    }
}

#[test]
fn qemu_migrates_through_the_tunnel() {
    run(Case {
        tls: Tls::Off,
        lanes: 2,
        lz4: false,
        multifd_channels: None,
    });
}

#[test]
fn qemu_migrates_through_the_tunnel_with_tls_and_lz4() {
    run(Case {
        tls: Tls::On,
        lanes: 2,
        lz4: true,
        multifd_channels: None,
    });
}

#[test]
fn qemu_migration_with_a_wrong_certificate_is_refused_and_the_guest_runs_on() {
    run(Case {
        tls: Tls::WrongCert,
        lanes: 2,
        lz4: false,
        multifd_channels: None,
    });
}

#[test]
fn qemu_multifd_migrates_through_the_tunnel() {
    run(Case {
        tls: Tls::Off,
        lanes: 2,
        lz4: false,
        multifd_channels: Some(2),
    });
}
