//! The scheduler daemon on real libvirt hosts (shared LIBVIRT.md): two or
//! three `libvirtd` "hosts" on this machine, each with its own view of the
//! migration socket folder and of the disk folder, running the workload
//! guest in QEMU/KVM. The daemon (in this process, through its HTTP API)
//! drives them with `virDomainMigrate3` carried by ferry's tunnel (2 lanes,
//! LZ4, mutual TLS): the only way from one host's socket to another's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ferry_e2e::libvirt::{domain_xml, libvirt_or_skip, LibvirtHost};
use ferry_scheduler::daemon::api::{HostView, RoundView};
use ferry_scheduler::daemon::client::{JsonClient, Method};
use ferry_scheduler::daemon::config::Config;
use ferry_scheduler::daemon::{serve, Daemon};

const GUEST_MIB: u64 = 128;

/// Hosts, the daemon serving their cluster, and a client for its API.
/// Dropped in field order: the daemon first, then the hosts.
struct Cluster {
    _rt: tokio::runtime::Runtime,
    api: JsonClient,
    hosts: Vec<LibvirtHost>,
    disks: PathBuf,
    root: tempfile::TempDir,
}

impl Cluster {
    /// `names` libvirt hosts (4 cores of 1000 MIPS, 2 GiB each), and a
    /// daemon with `policy` and `extra` TOML over them (`[daemon]` keys
    /// first, then tables such as `[[rule]]`).
    fn start(names: &[&str], policy: &str, extra: &str) -> Result<Cluster> {
        let sized: Vec<(&str, u32, u64)> = names.iter().map(|&n| (n, 4, 2048)).collect();
        Self::start_sized(&sized, policy, extra)
    }

    /// As [`Cluster::start`], each host declared with its (name, cores,
    /// MB) in `cluster.toml`.
    fn start_sized(sized: &[(&str, u32, u64)], policy: &str, extra: &str) -> Result<Cluster> {
        let names: Vec<&str> = sized.iter().map(|s| s.0).collect();
        let root = tempfile::tempdir()?;
        let mig = root.path().join("mig");
        let disks = root.path().join("disks");
        let mut hosts = Vec::new();
        for (i, n) in names.iter().enumerate() {
            hosts.push(LibvirtHost::start(
                n,
                &root.path().join(n),
                &format!("5e0c07a1-1e55-4d9b-8f00-0000000000{i:02x}"),
                &[&mig, &disks],
            )?);
        }
        let certs = root.path().join("certs");
        std::fs::create_dir_all(&certs)?;
        let g = ferry_transport::tls::generate_certs(&certs, &["daemon"])?;
        let files = &g.nodes[0].1;
        let mut toml = format!(
            "[daemon]\nlisten = \"127.0.0.1:0\"\npolicy = \"{policy}\"\ninterval_s = 86400\n\
             min_move_interval_s = 0\nbalance_duration_s = 0\n{extra}\n\n\
             [libvirt]\nsocket_dir = \"{}\"\nlanes = 2\nlz4 = true\nmax_downtime_ms = 300\n\
             tls = {{ cert = \"{}\", key = \"{}\", ca = \"{}\", server_name = \"daemon\" }}\n",
            mig.display(),
            files.cert.display(),
            files.key.display(),
            files.ca.display(),
        );
        for (&(n, cores, mem_mb), h) in sized.iter().zip(&hosts) {
            toml += &format!(
                "\n[[host]]\nname = \"{n}\"\ncores = {cores}\ncore_mips = 1000\nmem_mb = {mem_mb}\n\
                 libvirt = \"{}\"\ntunnel_dir = \"{}\"\n",
                h.uri,
                h.view(&mig).display()
            );
        }
        let cfg = Config::parse(Path::new("cluster.toml"), &toml)?;
        ensure!(
            cfg.problems.is_empty(),
            "config problems: {:?}",
            cfg.problems
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let daemon = Daemon::from_config(&cfg);
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let api = JsonClient::new(&listener.local_addr()?.to_string(), None);
        rt.spawn(serve(daemon, listener, Duration::from_secs(86400)));
        Ok(Cluster {
            _rt: rt,
            api,
            hosts,
            disks,
            root,
        })
    }

    fn host(&self, name: &str) -> &LibvirtHost {
        let i = self
            .hosts
            .iter()
            .position(|h| h.dir.ends_with(name))
            .expect("a host of the cluster");
        &self.hosts[i]
    }

    /// Starts `name` on `host`, optionally with a local disk, and waits for
    /// its heartbeat. Returns the heartbeat.
    fn start_guest(&self, host: &str, name: &str, rate: u64, disk: Option<&Path>) -> Result<u64> {
        let h = self.host(host);
        let xml = self.root.path().join(format!("{name}.xml"));
        std::fs::write(
            &xml,
            domain_xml(name, ferry_vm::guest_elf_path(), GUEST_MIB, rate, disk),
        )?;
        h.virsh(&["create", &xml.to_string_lossy()])?;
        Ok(h.heartbeat_above(name, 0)?[2])
    }

    /// `name` runs on `host` only, with its heartbeat rising past `from`
    /// and no bad pages. Returns the new heartbeat.
    fn alive_on(&self, host: &str, name: &str, from: u64) -> Result<u64> {
        for h in &self.hosts {
            let here = h.running()?.iter().any(|n| n == name);
            let want = h.dir.ends_with(host);
            ensure!(
                here == want,
                "{name} {} on {}",
                if here { "runs" } else { "does not run" },
                h.dir.display()
            );
        }
        let w = self.host(host).heartbeat_above(name, from)?;
        ensure!(w[4] == 0, "{name} found {} bad pages", w[4]);
        Ok(w[2])
    }

    fn round(&self) -> Result<RoundView, ferry_scheduler::daemon::client::CallError> {
        self.api.call::<(), _>(Method::Post, "/v1/round", None)
    }

    fn diag(&self) -> String {
        let get = |p: &str| {
            self.api
                .get::<serde_json::Value>(p)
                .map(|v| v.to_string())
                .unwrap_or_else(|e| e.to_string())
        };
        format!(
            "\n--- hosts {}\n--- vms {}\n--- plan {}",
            get("/v1/hosts"),
            get("/v1/vms"),
            get("/v1/plan")
        )
    }
}

/// `GET /metrics` (text, not JSON).
fn metrics(c: &Cluster) -> Result<String> {
    use std::io::{Read, Write};
    let addr = c.api.base().trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn qemu_img(args: &[&str]) -> Result<String> {
    let out = Command::new("qemu-img").args(args).output()?;
    if !out.status.success() {
        bail!(
            "qemu-img {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(test: &str, f: impl FnOnce() -> Result<()>) {
    if !libvirt_or_skip(test) {
        return;
    }
    if let Err(e) = f() {
        panic!("{test}: {e:#}");
    }
}

#[test]
fn maintenance_evacuates_every_guest_through_the_tunnel_and_brings_them_back() {
    run("maintenance_evacuates_every_guest", || {
        let c = Cluster::start(&["a", "b"], "manual", "")?;
        let mut hb = [
            c.start_guest("a", "g1", 2000, None)?,
            c.start_guest("a", "g2", 2000, None)?,
        ];
        c.round()?;

        let r: RoundView = c
            .api
            .call::<(), _>(Method::Post, "/v1/hosts/a/maintenance", None)
            .with_context(|| c.diag())?;
        ensure!(r.actions.len() == 2, "{r:?}");
        for (i, g) in ["g1", "g2"].iter().enumerate() {
            hb[i] = c.alive_on("b", g, hb[i]).with_context(|| c.diag())?;
        }
        let hosts: Vec<HostView> = c.api.get("/v1/hosts")?;
        ensure!(hosts[0].maintenance && hosts[0].vms.is_empty(), "{hosts:?}");
        ensure!(
            hosts.iter().all(|h| h.health.reachable == Some(true)),
            "{hosts:?}"
        );

        let _: RoundView = c
            .api
            .call::<(), _>(Method::Delete, "/v1/hosts/a/maintenance", None)
            .with_context(|| c.diag())?;
        for (i, g) in ["g1", "g2"].iter().enumerate() {
            c.alive_on("a", g, hb[i]).with_context(|| c.diag())?;
        }
        let m = metrics(&c)?;
        for want in [
            "ferry_sched_migrations_total 4\n",
            "ferry_sched_migrations_failed_total 0\n",
            "ferry_sched_migration_bytes_count 4\n",
        ] {
            ensure!(m.contains(want), "{want:?} not in the metrics:\n{m}");
        }
        Ok(())
    });
}

#[test]
fn a_guest_with_a_local_disk_moves_with_its_disk() {
    run("a_guest_with_a_local_disk_moves_with_its_disk", || {
        let c = Cluster::start(&["a", "b"], "manual", "")?;
        // A disk with data on a's side; an empty one of the same size on
        // b's side (as `--copy-storage-all` wants). Same path for both.
        let disk = c.disks.join("d1.qcow2");
        let (a_disk, b_disk) = (
            c.host("a").view(&c.disks).join("d1.qcow2"),
            c.host("b").view(&c.disks).join("d1.qcow2"),
        );
        let raw = c.root.path().join("d1.raw");
        let data: Vec<u8> = (0..(16u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(&raw, &data)?;
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &raw.to_string_lossy(),
            &a_disk.to_string_lossy(),
        ])?;
        qemu_img(&["create", "-f", "qcow2", &b_disk.to_string_lossy(), "16M"])?;
        ensure!(
            qemu_img(&[
                "compare",
                &a_disk.to_string_lossy(),
                &b_disk.to_string_lossy()
            ])
            .is_err(),
            "the two disks already match"
        );

        let hb = c.start_guest("a", "d1", 2000, Some(&disk))?;
        c.round()?;
        let _: RoundView = c
            .api
            .call::<(), _>(Method::Post, "/v1/hosts/a/maintenance", None)
            .with_context(|| c.diag())?;
        c.alive_on("b", "d1", hb).with_context(|| c.diag())?;
        let same = qemu_img(&[
            "compare",
            "-U",
            &a_disk.to_string_lossy(),
            &b_disk.to_string_lossy(),
        ])?;
        ensure!(same.contains("Images are identical"), "{same}");
        Ok(())
    });
}

#[test]
fn a_migration_libvirt_refuses_leaves_the_guest_running_and_the_api_says_why() {
    run("a_migration_libvirt_refuses", || {
        let c = Cluster::start(&["a", "b"], "manual", "")?;
        let hb = c.start_guest("a", "r1", 2000, None)?;
        // b already has a different domain named r1 (another UUID): libvirt
        // refuses to bring a second one in.
        let xml = c.root.path().join("r1-other.xml");
        std::fs::write(
            &xml,
            domain_xml("r1", ferry_vm::guest_elf_path(), GUEST_MIB, 2000, None),
        )?;
        c.host("b").virsh(&["define", &xml.to_string_lossy()])?;
        c.round()?;

        let e = c
            .api
            .call::<(), RoundView>(Method::Post, "/v1/hosts/a/maintenance", None)
            .expect_err("the evacuation cannot succeed");
        let (status, why) = e.refusal().context("an HTTP refusal")?;
        ensure!(status == 502, "{e}");
        ensure!(
            why.contains("libvirt did not migrate r1 to b") && why.contains("already exists"),
            "the answer carries libvirt's own words: {why}"
        );
        c.alive_on("a", "r1", hb)?;
        Ok(())
    });
}

/// Even distribution on real CPU use: the workload guest spins its vCPU,
/// which libvirt's stats show. `a` is a small host (1 core declared) that
/// the spinning guest `spin` pushes past the 5 % threshold; `b` (the best
/// fit: least memory left after the move) runs `peer`, and the rule
/// `apart` keeps `spin` and `peer` on different hosts; `c` is big and
/// empty. Returns the round that moved `spin`, if one did within a few
/// rounds, and the cluster.
fn spin_against_an_anti_affinity_rule(names: &[&str]) -> Result<(Cluster, Option<RoundView>)> {
    let sizes = [("a", 1, 2048), ("b", 64, 1024), ("c", 128, 4096)];
    let sized: Vec<(&str, u32, u64)> = sizes
        .iter()
        .copied()
        .filter(|s| names.contains(&s.0))
        .collect();
    let c = Cluster::start_sized(
        &sized,
        "balance",
        "balance_threshold = 0.05\n\n\
         [[rule]]\nname = \"apart\"\nkind = \"anti_affinity\"\nvms = [\"spin\", \"peer\"]\n",
    )?;
    c.start_guest("a", "spin", 2000, None)?;
    c.start_guest("b", "peer", 2000, None)?;
    // CPU use is a difference of two samples: a few rounds apart.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_secs(3));
        let r = c.round().with_context(|| c.diag())?;
        if !r.actions.is_empty() {
            return Ok((c, Some(r)));
        }
        if !r.notes.is_empty() {
            return Ok((c, None));
        }
    }
    Ok((c, None))
}

#[test]
fn even_distribution_moves_a_spinning_guest_around_an_anti_affinity_rule() {
    run("even_distribution_around_anti_affinity", || {
        let (c, r) = spin_against_an_anti_affinity_rule(&["a", "b", "c"])?;
        let r = r.with_context(|| format!("spin never moved{}", c.diag()))?;
        ensure!(r.actions.len() == 1, "{r:?}");
        let a = &r.actions[0];
        ensure!(a.action == "migrate spin a -> c", "{r:?}");
        ensure!(
            a.reason.starts_with("even distribution: a at ")
                && a.reason
                    .contains("rules: anti_affinity \"apart\" keeps spin apart from peer (on b)"),
            "the reason names the threshold and the rule that ruled b out: {}",
            a.reason
        );
        c.alive_on("c", "spin", 0).with_context(|| c.diag())?;
        c.alive_on("b", "peer", 0).with_context(|| c.diag())?;
        Ok(())
    });
}

#[test]
fn with_its_only_target_forbidden_a_spinning_guest_stays_and_the_plan_says_why() {
    run("only_target_forbidden", || {
        let (c, r) = spin_against_an_anti_affinity_rule(&["a", "b"])?;
        ensure!(r.is_none(), "nothing may move: {r:?}{}", c.diag());
        let plan: RoundView = c.api.get("/v1/plan")?;
        ensure!(plan.actions.is_empty(), "{plan:?}");
        ensure!(
            plan.notes.iter().any(|n| {
                n.starts_with("even distribution: a at ")
                && n.ends_with(
                    "spin does not move: anti_affinity \"apart\" keeps spin apart from peer (on b)"
                )
            }),
            "the plan says why spin stays: {plan:?}"
        );
        c.alive_on("a", "spin", 0)?;
        Ok(())
    });
}
