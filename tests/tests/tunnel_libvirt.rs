//! libvirt live migration through ferry's tunnel, per shared LIBVIRT.md:
//! two libvirtd "hosts" on this machine (each in its own mount namespace
//! with its own state directories and host UUID), a guest defined on host A
//! running the workload guest, and `virsh migrate --live --migrateuri
//! unix://DIR/qemu.sock` where each host sees its own DIR (a bind mount): the
//! only way from A's socket to B's is ferry's tunnel. Plain, and multifd
//! (`--parallel --parallel-connections 2`: QEMU opens 1 + 2 connections).

use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use ferry_e2e::libvirt::{domain_xml, libvirt_or_skip, LibvirtHost};
use ferry_transport::tunnel::{Tunnel, TunnelOptions};
use ferry_transport::{LaneOptions, Security};

const DOMAIN: &str = "ferry-guest";

fn libvirt_migration(parallel: Option<u32>) -> Result<()> {
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:6.1}s] {what}", t0.elapsed().as_secs_f64());
    let root = tempfile::tempdir()?;
    let mig = root.path().join("mig");
    std::fs::create_dir_all(&mig)?;
    let a = LibvirtHost::start(
        "a",
        &root.path().join("a"),
        "5e0c07a1-1e55-4d9b-8f00-00000000000a",
        &[&mig],
    )?;
    let b = LibvirtHost::start(
        "b",
        &root.path().join("b"),
        "5e0c07a1-1e55-4d9b-8f00-00000000000b",
        &[&mig],
    )?;

    step("both libvirtd up");
    let xml = root.path().join("domain.xml");
    std::fs::write(
        &xml,
        domain_xml(DOMAIN, ferry_vm::guest_elf_path(), 256, 2000, None),
    )?;
    a.virsh(&["create", &xml.to_string_lossy()])?;
    let before = a.heartbeat_above(DOMAIN, 0)?[2];

    step("guest running on A");
    // The tunnel: A's view of the socket -> lanes -> B's view of it.
    let opts = TunnelOptions::new(LaneOptions::new(2, Security::Insecure));
    let dst = Tunnel::destination("127.0.0.1:0", &b.view(&mig).join("qemu.sock"), &opts)?;
    let addr = dst.local_addr().context("tunnel address")?.to_string();
    let src = Tunnel::source(&a.view(&mig).join("qemu.sock"), &addr, &opts)?;

    let uri = format!("unix://{}", mig.join("qemu.sock").display());
    let mut args = vec!["migrate", "--live"];
    let n;
    if let Some(p) = parallel {
        n = p.to_string();
        args.extend(["--parallel", "--parallel-connections", &n]);
    }
    args.extend([DOMAIN, &b.uri, "--migrateuri", &uri]);
    step("migrating");
    a.virsh(&args)?;
    step("migrated");

    ensure!(
        b.virsh(&["domstate", DOMAIN])?.trim() == "running",
        "destination domain not running"
    );
    let first = b.heartbeat_above(DOMAIN, before.saturating_sub(1))?;
    ensure!(
        first[2] >= before,
        "heartbeat restarted: {} < {before}",
        first[2]
    );
    let later = b.heartbeat_above(DOMAIN, first[2])?;
    ensure!(later[3] > first[3], "destination guest stopped dirtying");
    ensure!(later[4] == 0, "guest found {} bad pages", later[4]);
    ensure!(
        a.virsh(&["list", "--name"])?.trim().is_empty(),
        "source still runs a domain"
    );

    let streams = src.stats().streams.load(Ordering::Relaxed);
    ensure!(
        streams == u64::from(parallel.map_or(1, |p| p + 1)),
        "{streams} streams through the tunnel"
    );
    let carried = src.stats().bytes_from_local.load(Ordering::Relaxed);
    ensure!(
        carried > 64 << 20,
        "only {carried} bytes went through the tunnel"
    );
    src.stop()?;
    dst.stop()?;
    drop(b);
    drop(a);
    step("cleaned up");
    Ok(())
}

fn run(parallel: Option<u32>) {
    if !libvirt_or_skip("tunnel_libvirt") {
        return;
    }
    if let Err(e) = libvirt_migration(parallel) {
        panic!("libvirt migration (parallel {parallel:?}): {e:#}");
    }
}

#[test]
fn virsh_migrate_live_through_the_tunnel() {
    run(None);
}

#[test]
fn virsh_migrate_live_parallel_through_the_tunnel() {
    run(Some(2));
}
