//! Shaped links: the destination in a network namespace of its own, behind
//! a veth pair whose both ends are shaped with `tc` to a rate (and, where
//! the kernel has `sch_netem`, a delay of half the asked round-trip time
//! each way). Both engines' destination processes enter the namespace
//! ([`ShapedLink::enter`]) and listen on [`ShapedLink::dst_ip`]; the
//! sources stay outside and reach it through the veth pair.
//!
//! ## Cleanup on every path
//! The namespace has no name (nothing under `/var/run/netns`): it lives as
//! long as something refers to it: this value's descriptor and the
//! destination processes inside. Dropping the value (a normal end or a
//! panic) deletes the veth pair at once; when the harness dies any other
//! way (Ctrl-C, SIGKILL), the descriptor closes with it, its destination
//! processes die with it (`PR_SET_PDEATHSIG`), and the kernel then
//! removes the namespace and, with it, both ends of the veth pair.
//!
//! Needs root (`CAP_NET_ADMIN`), `ip` and `tc` (iproute2).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bench::error::BenchError;

/// Round-trip time asked of a shaped link (netem delay of half each way).
pub const TARGET_RTT_US: u64 = 200;

/// What a shaped link is, as measured.
#[derive(Debug, Clone, Serialize)]
pub struct LinkInfo {
    /// Rate both directions are shaped to, bits/s.
    pub bits_per_sec: u64,
    /// The queueing discipline used on each end (`tc qdisc` arguments).
    pub qdisc: String,
    /// Median round-trip time of a 1-byte TCP ping-pong across the link, µs.
    pub rtt_us: Option<f64>,
    /// Why the link differs from what was asked (no netem here), if it does.
    pub caveat: Option<String>,
}

/// A veth pair into a network namespace of its own, shaped; removed when
/// dropped (see the module docs for the other paths).
#[derive(Debug)]
pub struct ShapedLink {
    ns: Arc<File>,
    host_if: String,
    host_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    info: LinkInfo,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |e| BenchError::Link(format!("{what}: {e}"))
}

/// Runs `cmd` to completion; `Err` with its stderr when it fails.
fn run(cmd: &mut Command, what: &str) -> Result<(), BenchError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("{what} (is iproute2 installed?)")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(BenchError::Link(format!(
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// Makes `cmd`'s process join the network namespace `ns` before it runs
/// (`ns` must stay open until `cmd` is spawned).
fn join_netns(cmd: &mut Command, ns: &File) {
    let fd = ns.as_raw_fd();
    let hook = move || {
        // SAFETY: setns takes a descriptor and a flag and touches no memory
        // of ours; the descriptor stays open in the child until exec.
        if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: the hook runs between fork and exec and only calls setns
    // (async-signal-safe); it allocates nothing.
    unsafe {
        cmd.pre_exec(hook);
    }
}

impl ShapedLink {
    /// Creates the namespace and the veth pair, shapes both ends to
    /// `bits_per_sec` and measures the round trip.
    pub fn create(bits_per_sec: u64) -> Result<Self, BenchError> {
        // Names and a /30 from our PID and a counter: links of two sessions,
        // or two at once in one process, do not collide.
        static NEXT: AtomicU8 = AtomicU8::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % 64;
        let pid = std::process::id();
        let host_if = format!("fb{pid}x{n}h");
        let ns_if = format!("fb{pid}x{n}n");
        let net = [
            10,
            200 + u8::try_from(pid / 250 % 50).unwrap_or(0),
            u8::try_from(pid % 250).unwrap_or(0),
        ];
        let host_ip = Ipv4Addr::new(net[0], net[1], net[2], 4 * n + 1);
        let dst_ip = Ipv4Addr::new(net[0], net[1], net[2], 4 * n + 2);

        // A short-lived holder process creates the namespace; our descriptor
        // keeps it once the holder is gone.
        let mut holder = Command::new("sleep");
        holder.arg("30").stdin(Stdio::null()).stdout(Stdio::null());
        let hook = || {
            // SAFETY: unshare takes a flag and touches no memory of ours; in
            // the freshly forked child it moves only that child.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            Ok(())
        };
        // SAFETY: the hook runs between fork and exec and only calls
        // unshare and prctl (async-signal-safe), allocating nothing.
        unsafe {
            holder.pre_exec(hook);
        }
        let mut holder = holder
            .spawn()
            .map_err(io_err("creating a network namespace (needs root)"))?;
        let hpid = holder.id();
        let opened = (|| {
            // The holder is in its namespace once its ns link differs from ours.
            let ours =
                std::fs::read_link("/proc/self/ns/net").map_err(io_err("/proc/self/ns/net"))?;
            let end = Instant::now() + Duration::from_secs(5);
            loop {
                let theirs = std::fs::read_link(format!("/proc/{hpid}/ns/net"))
                    .map_err(io_err("the namespace holder exited (is this root?)"))?;
                if theirs != ours {
                    break;
                }
                if Instant::now() > end {
                    return Err(BenchError::Link(
                        "the namespace holder never left our namespace".into(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let ns = File::open(format!("/proc/{hpid}/ns/net"))
                .map_err(io_err("opening the namespace"))?;
            run(
                Command::new("ip").args([
                    "link",
                    "add",
                    &host_if,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &ns_if,
                    "netns",
                    &hpid.to_string(),
                ]),
                "ip link add (veth pair)",
            )?;
            Ok(ns)
        })();
        let _ = holder.kill();
        let _ = holder.wait();
        let ns = Arc::new(opened?);
        let mut link = Self {
            ns,
            host_if,
            host_ip,
            dst_ip,
            info: LinkInfo {
                bits_per_sec,
                qdisc: String::new(),
                rtt_us: None,
                caveat: None,
            },
        };
        // From here on, Drop removes the pair.
        link.configure(&ns_if)?;
        link.info.rtt_us = link.measure_rtt_us().ok();
        Ok(link)
    }

    fn configure(&mut self, ns_if: &str) -> Result<(), BenchError> {
        let host = format!("{}/30", self.host_ip);
        let dst = format!("{}/30", self.dst_ip);
        run(
            Command::new("ip").args(["addr", "add", &host, "dev", &self.host_if]),
            "ip addr add (host end)",
        )?;
        run(
            Command::new("ip").args(["link", "set", &self.host_if, "up"]),
            "ip link set up (host end)",
        )?;
        let mut c = Command::new("ip");
        c.args(["addr", "add", &dst, "dev", ns_if]);
        join_netns(&mut c, &self.ns);
        run(&mut c, "ip addr add (namespace end)")?;
        for dev in [ns_if, "lo"] {
            let mut c = Command::new("ip");
            c.args(["link", "set", dev, "up"]);
            join_netns(&mut c, &self.ns);
            run(&mut c, "ip link set up (namespace)")?;
        }
        let rate = format!("{}bit", self.info.bits_per_sec);
        let delay = format!("{}us", TARGET_RTT_US / 2);
        // netem gives rate and delay; without it (not every kernel has
        // sch_netem) tbf gives the rate only. Bursts: 1/250 s of the rate
        // (a timer tick), at least 256 KiB (GSO packets are up to 64 KiB).
        let burst = (self.info.bits_per_sec / 8 / 250)
            .max(256 << 10)
            .to_string();
        let netem: Vec<String> = ["netem", "delay", &delay, "rate", &rate, "limit", "100000"]
            .map(String::from)
            .to_vec();
        let tbf: Vec<String> = ["tbf", "rate", &rate, "burst", &burst, "latency", "20ms"]
            .map(String::from)
            .to_vec();
        let qdisc = |dev: &str, args: &[String], inside: bool| {
            let mut c = Command::new("tc");
            c.args(["qdisc", "add", "dev", dev, "root"]).args(args);
            if inside {
                join_netns(&mut c, &self.ns);
            }
            run(&mut c, "tc qdisc add")
        };
        let chosen = match qdisc(&self.host_if, &netem, false) {
            Ok(()) => netem,
            Err(netem_err) => {
                qdisc(&self.host_if, &tbf, false)?;
                self.info.caveat = Some(format!(
                    "no netem here ({netem_err}): the link has the rate but no added delay, its round trip is the veth's own"
                ));
                tbf
            }
        };
        qdisc(ns_if, &chosen, true)?;
        self.info.qdisc = chosen.join(" ");
        Ok(())
    }

    /// Median round trip of 200 1-byte TCP ping-pongs to an echo server
    /// inside the namespace, µs.
    fn measure_rtt_us(&self) -> Result<f64, BenchError> {
        let ns = self.ns.clone();
        let dst_ip = self.dst_ip;
        let (tx, rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || -> std::io::Result<()> {
            // SAFETY: setns on this thread only (a thread of our own that
            // ends right after); takes a descriptor and a flag.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let l = TcpListener::bind((dst_ip, 0))?;
            let _ = tx.send(l.local_addr()?);
            let (mut s, _) = l.accept()?;
            s.set_nodelay(true)?;
            let mut b = [0u8; 1];
            while s.read(&mut b)? == 1 {
                s.write_all(&b)?;
            }
            Ok(())
        });
        let addr: SocketAddr = rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| BenchError::Link("the RTT echo server did not start".into()))?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(io_err("RTT probe connect"))?;
        s.set_nodelay(true).map_err(io_err("RTT probe"))?;
        let mut rtts = Vec::new();
        let mut b = [7u8; 1];
        for _ in 0..200 {
            let t = Instant::now();
            s.write_all(&b).map_err(io_err("RTT probe write"))?;
            s.read_exact(&mut b).map_err(io_err("RTT probe read"))?;
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
        drop(s);
        let _ = server.join();
        rtts.sort_by(f64::total_cmp);
        Ok(rtts[rtts.len() / 2])
    }

    /// Makes `cmd` run inside the namespace (for the destination processes).
    pub fn enter(&self, cmd: &mut Command) {
        join_netns(cmd, &self.ns);
    }

    /// The destination's address, inside the namespace.
    pub fn dst_ip(&self) -> Ipv4Addr {
        self.dst_ip
    }

    /// The host end's interface name (its tx bytes are what the sources sent).
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// What the link is, as measured.
    pub fn info(&self) -> &LinkInfo {
        &self.info
    }

    /// One line about the link.
    pub fn describe(&self) -> String {
        let rtt = self
            .info
            .rtt_us
            .map_or("?".into(), |r| format!("{r:.0} µs"));
        let mut s = format!(
            "shaped link {} <-> {} ({}): {}, measured RTT {rtt}",
            self.host_ip, self.dst_ip, self.host_if, self.info.qdisc
        );
        if let Some(c) = &self.info.caveat {
            s += &format!("; {c}");
        }
        s
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        // Deleting one end deletes both; the namespace goes when its last
        // process and our descriptor are gone.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Whether a network interface of this name exists in our namespace.
pub fn interface_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}
