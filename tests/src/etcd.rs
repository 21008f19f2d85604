//! Real etcd members for tests: each on free loopback ports with its own
//! data directory, killed (SIGKILL) and removed when dropped, panics
//! included.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::process::ProcessGuard;

/// The `etcd` binary, or why etcd tests cannot run here.
pub fn etcd_binary() -> Result<PathBuf, String> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("etcd"))
                .find(|f| f.is_file())
        })
        .ok_or_else(|| "etcd is not installed (apt-get install etcd-server)".into())
}

/// The `etcd` binary; `None` after a loud SKIP line when it is missing,
/// a panic instead when `FERRY_NO_SKIP` is set.
pub fn etcd_or_skip(test: &str) -> Option<PathBuf> {
    match etcd_binary() {
        Ok(p) => Some(p),
        Err(why) => {
            assert!(
                std::env::var_os("FERRY_NO_SKIP").is_none(),
                "FERRY_NO_SKIP is set, so {test} may not skip: {why}"
            );
            eprintln!("SKIP {test}: {why}");
            None
        }
    }
}

/// A loopback port free right now (the kernel picks it).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One etcd member.
#[derive(Debug)]
pub struct EtcdMember {
    /// Member name.
    pub name: String,
    /// Its client address.
    pub client: SocketAddr,
    /// Its peer address.
    pub peer: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
    process: ProcessGuard,
}

impl EtcdMember {
    /// The client endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }

    /// Kills the member now (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// A cluster of etcd members on loopback, with fast heartbeats (50 ms,
/// election after 500 ms) so that leases of 1-2 s and elections behave as
/// they would at production timings, only sooner.
#[derive(Debug)]
pub struct EtcdCluster {
    /// The members, in start order.
    pub members: Vec<EtcdMember>,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members named `{tag}-0..` and waits until the cluster
    /// reports healthy (it has a leader). The ports are free when picked,
    /// but another process may take one before etcd binds it: a cluster
    /// whose member found its port taken is started again on new ports
    /// (at most 5 tries).
    pub fn start(etcd: &Path, tag: &str, n: usize) -> Result<Self> {
        let mut tries = 0;
        loop {
            match Self::start_once(etcd, tag, n) {
                Err(e) if tries < 4 && format!("{e:#}").contains("address already in use") => {
                    tries += 1;
                    eprintln!("etcd cluster {tag}: a port was taken meanwhile; new ports");
                }
                r => return r,
            }
        }
    }

    fn start_once(etcd: &Path, tag: &str, n: usize) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ferry-etcd-{tag}-"))
            .tempdir()?;
        // Every port held at once while picking, so no two are the same.
        let held: Vec<TcpListener> = (0..2 * n)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<_>>()?;
        let picked: Vec<u16> = held
            .iter()
            .map(|l| Ok(l.local_addr()?.port()))
            .collect::<std::io::Result<_>>()?;
        drop(held);
        let ports: Vec<(u16, u16)> = picked.chunks(2).map(|p| (p[0], p[1])).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("{tag}-{i}=http://127.0.0.1:{p}"))
            .collect();
        let initial = initial.join(",");
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            dir,
        };
        for (i, &(client, peer)) in ports.iter().enumerate() {
            let name = format!("{tag}-{i}");
            let data = cluster.dir.path().join(&name);
            let log = cluster.dir.path().join(format!("{name}.log"));
            let mut cmd = Command::new(etcd);
            cmd.arg("--name")
                .arg(&name)
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(format!("http://127.0.0.1:{client}"))
                .arg("--advertise-client-urls")
                .arg(format!("http://127.0.0.1:{client}"))
                .arg("--listen-peer-urls")
                .arg(format!("http://127.0.0.1:{peer}"))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://127.0.0.1:{peer}"))
                .arg("--initial-cluster")
                .arg(&initial)
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--initial-cluster-token")
                .arg(format!("ferry-{tag}"))
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"]);
            let process = ProcessGuard::spawn(&name, &mut cmd, &log)?;
            cluster.members.push(EtcdMember {
                name,
                client: SocketAddr::from(([127, 0, 0, 1], client)),
                peer: SocketAddr::from(([127, 0, 0, 1], peer)),
                log,
                process,
            });
        }
        cluster.wait_healthy(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// The client endpoints of the members.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::endpoint).collect()
    }

    /// The index of the member that leads the cluster now, from each
    /// running member's own `etcd_server_is_leader` metric.
    pub fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| {
            get(m.client, "/metrics")
                .is_ok_and(|text| text.lines().any(|l| l == "etcd_server_is_leader 1"))
        })
    }

    /// Waits until every running member answers `/health` with true.
    pub fn wait_healthy(&mut self, within: Duration) -> Result<()> {
        let end = Instant::now() + within;
        for m in &mut self.members {
            if !m.process.is_running() {
                continue;
            }
            loop {
                if health(m.client).unwrap_or(false) {
                    break;
                }
                if !m.process.is_running() || Instant::now() > end {
                    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(20).collect();
                    bail!(
                        "etcd member {} not healthy (running: {}); log tail:\n{}",
                        m.name,
                        m.process.is_running(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

/// `GET /health` on a member: whether it says `"health":"true"`.
fn health(addr: SocketAddr) -> Result<bool> {
    Ok(get(addr, "/health")?.contains("\"health\":\"true\""))
}

/// The member's answer to `GET path` (headers and body), over HTTP/1.0.
fn get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .with_context(|| format!("reading {path}"))?;
    Ok(body)
}
