//! Real libvirt "hosts" on one machine (shared LIBVIRT.md): each a
//! `libvirtd` in its own mount namespace with its own state directories
//! and host UUID, plus folders of its own bind-mounted over paths every
//! host uses (the migration socket folder, a disk folder): the same path
//! string names a different folder on each host, as on separate machines.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::process::ProcessGuard;
use crate::qmp::parse_xp;

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// Why two libvirt hosts cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm is missing".into());
    }
    for bin in [
        "libvirtd",
        "virsh",
        "unshare",
        "mount",
        "qemu-system-x86_64",
        "qemu-img",
    ] {
        if !on_path(bin) {
            return Some(format!(
                "{bin} not found (apt-get install libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils)"
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

/// `true` when the test may run; otherwise prints a loud SKIP and returns
/// `false`, or fails when `FERRY_NO_SKIP` is set.
pub fn libvirt_or_skip(test: &str) -> bool {
    match unavailable() {
        None => true,
        Some(why) => {
            assert!(
                std::env::var_os("FERRY_NO_SKIP").is_none(),
                "FERRY_NO_SKIP is set, so {test} may not skip ({why})"
            );
            eprintln!("SKIP ({test}): {why}");
            false
        }
    }
}

/// One libvirt "host". Dropping it destroys its domains, kills any QEMU it
/// left (by PID file) and the daemon.
#[derive(Debug)]
pub struct LibvirtHost {
    /// Its state folder (`etc`, `run`, `lib`, ... and its views).
    pub dir: PathBuf,
    /// Its connection URI.
    pub uri: String,
    daemon: ProcessGuard,
}

impl LibvirtHost {
    /// Starts the daemon with state under `dir`. For each `shared` path,
    /// the host's own folder `dir/NAME` (NAME: the path's last component)
    /// is bind-mounted over it inside the host's namespace: see
    /// [`LibvirtHost::view`].
    pub fn start(name: &str, dir: &Path, uuid: &str, shared: &[&Path]) -> Result<LibvirtHost> {
        for sub in ["etc", "run", "lib", "cache", "log"] {
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
        let mut views = String::new();
        for p in shared {
            let own = dir.join(
                p.file_name()
                    .context("a shared path needs a last component")?,
            );
            std::fs::create_dir_all(&own)?;
            std::fs::create_dir_all(p)?;
            views += &format!("mount --bind {} {}; ", own.display(), p.display());
        }
        let script = format!(
            "set -e; mkdir -p /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; \
             mount --bind {d}/etc /etc/libvirt; mount --bind {d}/run /run/libvirt; \
             mount --bind {d}/lib /var/lib/libvirt; mount --bind {d}/cache /var/cache/libvirt; \
             mount --bind {d}/log /var/log/libvirt; {views}\
             exec libvirtd -p {d}/libvirtd.pid"
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

    /// This host's own folder behind the shared path `shared`, as seen
    /// from outside its namespace.
    pub fn view(&self, shared: &Path) -> PathBuf {
        self.dir.join(shared.file_name().unwrap_or_default())
    }

    /// `virsh -c URI args...`.
    pub fn virsh(&self, args: &[&str]) -> Result<String> {
        virsh(&self.uri, args)
    }

    /// Names of the running domains.
    pub fn running(&self) -> Result<Vec<String>> {
        Ok(self
            .virsh(&["list", "--name"])?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// The workload guest's status words (GUEST.md): magic, phase,
    /// heartbeat, pages dirtied, verify errors.
    pub fn status_words(&self, domain: &str) -> Result<Vec<u64>> {
        let mut w = parse_xp(
            &self.virsh(&["qemu-monitor-command", domain, "--hmp", "xp /4gx 0x1000"])?,
            4,
        )?;
        w.extend(parse_xp(
            &self.virsh(&["qemu-monitor-command", domain, "--hmp", "xp /1gx 0x1070"])?,
            1,
        )?);
        Ok(w)
    }

    /// Waits for `domain`'s heartbeat (word 2) above `above` with phase 2;
    /// returns the words.
    pub fn heartbeat_above(&self, domain: &str, above: u64) -> Result<Vec<u64>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let w = self.status_words(domain)?;
            if w[1] == 2 && w[2] > above {
                return Ok(w);
            }
            if Instant::now() > deadline {
                bail!("{domain}: heartbeat not above {above}: {w:x?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        if let Ok(names) = self.running() {
            for n in names {
                let _ = self.virsh(&["destroy", &n]);
            }
        }
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

/// `virsh -c uri args...`; an error carries virsh's own message.
pub fn virsh(uri: &str, args: &[&str]) -> Result<String> {
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

/// A KVM domain running the workload guest (`kernel`) with `mem_mib` of
/// memory dirtying `rate` pages/s, and optionally a local qcow2 disk.
pub fn domain_xml(
    name: &str,
    kernel: &Path,
    mem_mib: u64,
    rate: u64,
    disk: Option<&Path>,
) -> String {
    let disk = disk
        .map(|d| {
            format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{}'/><target dev='vda' bus='virtio'/></disk>",
                d.display()
            )
        })
        .unwrap_or_default();
    format!(
        "<domain type='kvm'><name>{name}</name><memory unit='MiB'>{mem_mib}</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64'>hvm</type><kernel>{}</kernel><cmdline>rate={rate} tsc_khz=2300000</cmdline></os>\
         <devices>{disk}<controller type='usb' model='none'/><memballoon model='none'/></devices></domain>",
        kernel.display()
    )
}
