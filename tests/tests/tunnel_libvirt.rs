//! libvirt live migration through ferry's tunnel, per shared LIBVIRT.md:
//! two libvirtd "hosts" on this machine (each in its own mount namespace
//! with its own state directories and host UUID), a guest defined on host A
//! running the workload guest, and `virsh migrate --live --migrateuri
//! unix://DIR/qemu.sock` where each host sees its own DIR (a bind mount): the
//! only way from A's socket to B's is ferry's tunnel. Plain, and multifd
//! (`--parallel --parallel-connections 2`: QEMU opens 1 + 2 connections).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ferry_e2e::process::ProcessGuard;
use ferry_e2e::qmp::parse_xp;
use ferry_transport::tunnel::{Tunnel, TunnelOptions};
use ferry_transport::{LaneOptions, Security};

const DOMAIN: &str = "ferry-guest";

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

fn unavailable() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm is missing".into());
    }
    for bin in [
        "libvirtd",
        "virsh",
        "unshare",
        "mount",
        "qemu-system-x86_64",
    ] {
        if !on_path(bin) {
            return Some(format!(
                "{bin} not found (apt-get install libvirt-daemon-system libvirt-clients qemu-system-x86)"
            ));
        }
    }
    // /proc/self belongs to this process's effective user.
    let euid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    if euid.ok() != Some(0) {
        return Some("needs root (mount namespaces, libvirtd)".into());
    }
    let private_mounts = Command::new("unshare")
        .args(["-m", "--propagation", "private", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !private_mounts {
        return Some("cannot create a mount namespace here (unshare -m failed)".into());
    }
    None
}

/// One libvirt "host": a libvirtd in its own mount namespace. Dropping it
/// destroys its domain, kills any QEMU it left (by PID file) and the daemon.
struct LibvirtHost {
    dir: PathBuf,
    uri: String,
    daemon: ProcessGuard,
}

impl LibvirtHost {
    /// Starts the daemon with state under `dir`; `mig_view` is bind-mounted
    /// over `mig_mount` inside its namespace.
    fn start(name: &str, dir: &Path, uuid: &str, mig_mount: &Path) -> Result<LibvirtHost> {
        for sub in ["etc", "run", "lib", "cache", "log", "mig"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        std::fs::write(
            dir.join("etc/libvirtd.conf"),
            format!("host_uuid = \"{uuid}\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\nunix_sock_rw_perms = \"0700\"\n"),
        )?;
        std::fs::write(
            dir.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nsecurity_driver = \"none\"\n\
             cgroup_controllers = [ ]\nnamespaces = [ ]\nstdio_handler = \"file\"\n",
        )?;
        let d = dir.display();
        let script = format!(
            "set -e; mkdir -p /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; \
             mount --bind {d}/etc /etc/libvirt; mount --bind {d}/run /run/libvirt; \
             mount --bind {d}/lib /var/lib/libvirt; mount --bind {d}/cache /var/cache/libvirt; \
             mount --bind {d}/log /var/log/libvirt; mount --bind {d}/mig {m}; \
             exec libvirtd -p {d}/libvirtd.pid",
            m = mig_mount.display()
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "--propagation", "private", "sh", "-c", &script]);
        let daemon = ProcessGuard::spawn(
            &format!("libvirtd-{name}"),
            &mut cmd,
            &dir.join("daemon.log"),
        )?;
        let sock = dir.join("run/libvirt-sock");
        let host = LibvirtHost {
            uri: format!("qemu+unix:///system?socket={}", sock.display()),
            dir: dir.to_owned(),
            daemon,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while virsh(&host.uri, &["version"]).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "libvirtd {name} did not come up: {}",
                    std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(host)
    }

    fn virsh(&self, args: &[&str]) -> Result<String> {
        virsh(&self.uri, args)
    }

    fn status_words(&self) -> Result<Vec<u64>> {
        let mut w = parse_xp(
            &self.virsh(&["qemu-monitor-command", DOMAIN, "--hmp", "xp /4gx 0x1000"])?,
            4,
        )?;
        w.extend(parse_xp(
            &self.virsh(&["qemu-monitor-command", DOMAIN, "--hmp", "xp /1gx 0x1070"])?,
            1,
        )?);
        Ok(w)
    }

    /// Waits for heartbeat (word 2) above `above` with phase 2; returns the words.
    fn heartbeat_above(&self, above: u64) -> Result<Vec<u64>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let w = self.status_words()?;
            if w[1] == 2 && w[2] > above {
                return Ok(w);
            }
            if Instant::now() > deadline {
                bail!("guest heartbeat not above {above}: {w:x?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        let _ = self.virsh(&["destroy", DOMAIN]);
        // QEMU is daemonized by libvirtd: kill any left by its PID file.
        if let Ok(entries) = std::fs::read_dir(self.dir.join("run/qemu")) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "pid") {
                    if let Ok(pid) = std::fs::read_to_string(e.path()) {
                        let _ = Command::new("kill").arg("-9").arg(pid.trim()).status();
                    }
                }
            }
        }
        self.daemon.kill();
    }
}

fn virsh(uri: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .context("running virsh")?;
    if !out.status.success() {
        bail!(
            "virsh {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn domain_xml(kernel: &Path) -> String {
    format!(
        "<domain type='kvm'><name>{DOMAIN}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64'>hvm</type><kernel>{}</kernel><cmdline>rate=2000 tsc_khz=2300000</cmdline></os>\
         <devices><controller type='usb' model='none'/><memballoon model='none'/></devices></domain>",
        kernel.display()
    )
}

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
        &mig,
    )?;
    let b = LibvirtHost::start(
        "b",
        &root.path().join("b"),
        "5e0c07a1-1e55-4d9b-8f00-00000000000b",
        &mig,
    )?;

    step("both libvirtd up");
    let xml = root.path().join("domain.xml");
    std::fs::write(&xml, domain_xml(ferry_vm::guest_elf_path()))?;
    a.virsh(&["create", &xml.to_string_lossy()])?;
    let before = a.heartbeat_above(0)?[2];

    step("guest running on A");
    // The tunnel: A's view of the socket -> lanes -> B's view of it.
    let opts = TunnelOptions::new(LaneOptions::new(2, Security::Insecure));
    let dst = Tunnel::destination("127.0.0.1:0", &b.dir.join("mig/qemu.sock"), &opts)?;
    let addr = dst.local_addr().context("tunnel address")?.to_string();
    let src = Tunnel::source(&a.dir.join("mig/qemu.sock"), &addr, &opts)?;

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
    let first = b.heartbeat_above(before.saturating_sub(1))?;
    ensure!(
        first[2] >= before,
        "heartbeat restarted: {} < {before}",
        first[2]
    );
    let later = b.heartbeat_above(first[2])?;
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
    if let Some(why) = unavailable() {
        assert!(
            std::env::var_os("FERRY_NO_SKIP").is_none(),
            "FERRY_NO_SKIP is set, so this test may not skip"
        );
        eprintln!("SKIP (tunnel_libvirt): {why}");
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
