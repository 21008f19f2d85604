//! Host power drivers: a command hook (e.g. `ipmitool ... power on`),
//! Wake-on-LAN (a real magic packet over UDP), and a process driver that
//! starts and stops a local process (an agent) as the host's power.

use std::net::{ToSocketAddrs, UdpSocket};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::Mutex;

use super::config::PowerConfig;

/// Why a power operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    /// A command could not be started.
    #[error("cannot run {command:?}")]
    Spawn {
        /// The argv.
        command: Vec<String>,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("{command:?} exited with {status}")]
    Failed {
        /// The argv.
        command: Vec<String>,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// The MAC address is malformed.
    #[error("bad MAC address {0:?} (want six hex bytes separated by ':' or '-')")]
    BadMac(String),
    /// Sending the Wake-on-LAN packet failed.
    #[error("cannot send Wake-on-LAN packet to {target}")]
    Send {
        /// The broadcast address.
        target: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The driver cannot do this (e.g. WoL without an off command).
    #[error("power driver {driver} cannot {op}")]
    Unsupported {
        /// Driver name.
        driver: &'static str,
        /// Operation.
        op: &'static str,
    },
    /// Stopping the process failed.
    #[error("cannot stop process {pid}")]
    Stop {
        /// The process.
        pid: u32,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Powers one host on and off.
pub trait PowerDriver: Send + Sync + std::fmt::Debug {
    /// Driver name for logs.
    fn name(&self) -> &'static str;
    /// Power the host on.
    fn power_on(&self) -> Result<(), PowerError>;
    /// Power the host off.
    fn power_off(&self) -> Result<(), PowerError>;
}

fn run(argv: &[String]) -> Result<(), PowerError> {
    let (prog, args) = argv.split_first().ok_or(PowerError::Unsupported {
        driver: "command",
        op: "run an empty command",
    })?;
    let status = Command::new(prog)
        .args(args)
        .status()
        .map_err(|source| PowerError::Spawn {
            command: argv.to_vec(),
            source,
        })?;
    if !status.success() {
        return Err(PowerError::Failed {
            command: argv.to_vec(),
            status,
        });
    }
    Ok(())
}

/// Runs a command (no shell) for on and off.
#[derive(Debug, Clone)]
pub struct CommandHook {
    /// Argv to power on.
    pub on: Vec<String>,
    /// Argv to power off.
    pub off: Vec<String>,
}

impl PowerDriver for CommandHook {
    fn name(&self) -> &'static str {
        "command"
    }
    fn power_on(&self) -> Result<(), PowerError> {
        run(&self.on)
    }
    fn power_off(&self) -> Result<(), PowerError> {
        run(&self.off)
    }
}

/// Wake-on-LAN: 6 x 0xFF then the MAC 16 times, over UDP to a broadcast address.
#[derive(Debug, Clone)]
pub struct WakeOnLan {
    /// The MAC address.
    pub mac: [u8; 6],
    /// `address:port` the packet is sent to.
    pub target: String,
    /// Optional argv to power off.
    pub off: Vec<String>,
}

/// Parse `aa:bb:cc:dd:ee:ff` (or with `-`).
pub fn parse_mac(s: &str) -> Result<[u8; 6], PowerError> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(PowerError::BadMac(s.to_string()));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(PowerError::BadMac(s.to_string()));
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| PowerError::BadMac(s.to_string()))?;
    }
    Ok(mac)
}

/// The 102-byte magic packet for `mac`.
pub fn magic_packet(mac: &[u8; 6]) -> [u8; 102] {
    let mut p = [0xFFu8; 102];
    for i in 0..16 {
        p[6 + i * 6..12 + i * 6].copy_from_slice(mac);
    }
    p
}

impl PowerDriver for WakeOnLan {
    fn name(&self) -> &'static str {
        "wol"
    }
    fn power_on(&self) -> Result<(), PowerError> {
        let send_err = |source| PowerError::Send {
            target: self.target.clone(),
            source,
        };
        let addr = self
            .target
            .to_socket_addrs()
            .map_err(send_err)?
            .next()
            .ok_or_else(|| send_err(std::io::Error::other("address resolves to nothing")))?;
        let bind = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let sock = UdpSocket::bind(bind).map_err(send_err)?;
        sock.set_broadcast(true).map_err(send_err)?;
        sock.send_to(&magic_packet(&self.mac), addr)
            .map_err(send_err)?;
        Ok(())
    }
    fn power_off(&self) -> Result<(), PowerError> {
        if self.off.is_empty() {
            return Err(PowerError::Unsupported {
                driver: "wol",
                op: "power off without an off command",
            });
        }
        run(&self.off)
    }
}

/// Starts a process on power-on, kills and reaps it on power-off (and on
/// drop). The process dies with the daemon: it is started with
/// `PR_SET_PDEATHSIG` from a thread that lives as long as the driver (the
/// signal follows the thread that forked, and the runtime's blocking
/// threads come and go).
#[derive(Debug)]
pub struct ProcessDriver {
    /// Argv of the process.
    pub command: Vec<String>,
    child: Mutex<Option<Child>>,
    launcher: Mutex<Option<Launcher>>,
}

type LaunchReply = std::sync::mpsc::Sender<std::io::Result<Child>>;

/// The long-lived thread that forks the driver's processes.
#[derive(Debug)]
struct Launcher {
    requests: std::sync::mpsc::Sender<(Vec<String>, LaunchReply)>,
}

impl Launcher {
    fn start() -> std::io::Result<Launcher> {
        let (tx, rx) = std::sync::mpsc::channel::<(Vec<String>, LaunchReply)>();
        std::thread::Builder::new()
            .name("power-process".into())
            .spawn(move || {
                for (argv, reply) in rx {
                    let _ = reply.send(spawn_tied(&argv));
                }
            })?;
        Ok(Launcher { requests: tx })
    }

    fn spawn(&self, argv: &[String]) -> std::io::Result<Child> {
        let (tx, rx) = std::sync::mpsc::channel();
        let gone = || std::io::Error::other("the launcher thread is gone");
        self.requests
            .send((argv.to_vec(), tx))
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

/// Spawns `argv` so that it is SIGKILLed when this thread (hence the
/// daemon) dies.
fn spawn_tied(argv: &[String]) -> std::io::Result<Child> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| std::io::Error::other("empty command"))?;
    let parent = std::process::id();
    let mut cmd = Command::new(prog);
    cmd.args(args);
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls prctl(2) and getppid(2), which are async-signal-safe; it
    // allocates nothing and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || tie_to_parent(parent));
    }
    cmd.spawn()
}

/// In a freshly forked child: be SIGKILLed when the parent's forking
/// thread dies; fail if `parent` is already gone.
fn tie_to_parent(parent: u32) -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG and a signal number reads no
    // pointers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The parent may have died before the prctl: then nobody would send
    // the signal.
    // SAFETY: getppid has no arguments and cannot fail.
    if u32::try_from(unsafe { libc::getppid() }).ok() != Some(parent) {
        return Err(std::io::Error::other("the daemon died while starting it"));
    }
    Ok(())
}

impl ProcessDriver {
    /// A driver for `command`, not started.
    pub fn new(command: Vec<String>) -> Self {
        Self {
            command,
            child: Mutex::new(None),
            launcher: Mutex::new(None),
        }
    }

    /// PID of the running process.
    pub fn pid(&self) -> Option<u32> {
        let mut g = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let c = g.as_mut()?;
        matches!(c.try_wait(), Ok(None)).then(|| c.id())
    }
}

impl PowerDriver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
    }
    fn power_on(&self) -> Result<(), PowerError> {
        let mut g = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = g.as_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                return Ok(()); // already on
            }
        }
        if self.command.is_empty() {
            return Err(PowerError::Unsupported {
                driver: "process",
                op: "start an empty command",
            });
        }
        let spawn_err = |source| PowerError::Spawn {
            command: self.command.clone(),
            source,
        };
        let mut launcher = self.launcher.lock().unwrap_or_else(|e| e.into_inner());
        if launcher.is_none() {
            *launcher = Some(Launcher::start().map_err(spawn_err)?);
        }
        let child = launcher
            .as_ref()
            .map_or_else(
                || Err(std::io::Error::other("no launcher")),
                |l| l.spawn(&self.command),
            )
            .map_err(spawn_err)?;
        *g = Some(child);
        Ok(())
    }
    fn power_off(&self) -> Result<(), PowerError> {
        let mut g = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut c) = g.take() {
            let pid = c.id();
            if matches!(c.try_wait(), Ok(None)) {
                c.kill()
                    .map_err(|source| PowerError::Stop { pid, source })?;
            }
            c.wait()
                .map_err(|source| PowerError::Stop { pid, source })?;
        }
        Ok(())
    }
}

impl Drop for ProcessDriver {
    fn drop(&mut self) {
        let _ = self.power_off();
    }
}

/// The driver a config entry describes (checked: no empty command, a
/// well-formed MAC address).
pub fn from_config(cfg: &PowerConfig) -> Result<Box<dyn PowerDriver>, PowerError> {
    let empty = |driver, argv: &[String], op| {
        if argv.is_empty() {
            Err(PowerError::Unsupported { driver, op })
        } else {
            Ok(())
        }
    };
    match cfg {
        PowerConfig::Command { on, off } => {
            empty("command", on, "power on with an empty `on` command")?;
            empty("command", off, "power off with an empty `off` command")?;
        }
        PowerConfig::Process { command } => {
            empty("process", command, "start an empty command")?;
        }
        PowerConfig::Wol { .. } => {}
    }
    Ok(match cfg {
        PowerConfig::Command { on, off } => Box::new(CommandHook {
            on: on.clone(),
            off: off.clone(),
        }),
        PowerConfig::Wol {
            mac,
            broadcast,
            off,
        } => Box::new(WakeOnLan {
            mac: parse_mac(mac)?,
            target: broadcast.clone(),
            off: off.clone(),
        }),
        PowerConfig::Process { command } => Box::new(ProcessDriver::new(command.clone())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn wake_on_lan_sends_a_real_magic_packet() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let wol = WakeOnLan {
            mac: parse_mac("52:54:00:ab:cd:ef").unwrap(),
            target: rx.local_addr().unwrap().to_string(),
            off: Vec::new(),
        };
        wol.power_on().unwrap();
        let mut buf = [0u8; 200];
        let (n, _) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(n, 102);
        assert_eq!(&buf[..6], &[0xFF; 6]);
        for i in 0..16 {
            assert_eq!(
                &buf[6 + i * 6..12 + i * 6],
                &[0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]
            );
        }
        assert!(matches!(
            wol.power_off(),
            Err(PowerError::Unsupported { .. })
        ));
    }

    #[test]
    fn bad_macs_are_rejected() {
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:zz",
            "525:4:00:ab:cd:ef",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_mac("01-02-03-04-05-06").unwrap(), [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn command_hook_runs_and_reports_failure() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("on");
        let hook = CommandHook {
            on: vec!["touch".into(), flag.display().to_string()],
            off: vec!["false".into()],
        };
        hook.power_on().unwrap();
        assert!(flag.exists());
        assert!(matches!(hook.power_off(), Err(PowerError::Failed { .. })));
        let missing = CommandHook {
            on: vec!["/nonexistent/ipmitool".into()],
            off: vec![],
        };
        assert!(matches!(missing.power_on(), Err(PowerError::Spawn { .. })));
    }

    #[test]
    fn a_started_process_dies_with_the_thread_that_started_it() {
        use std::os::unix::process::ExitStatusExt;
        let argv = vec!["sleep".to_string(), "300".to_string()];
        let mut child = std::thread::spawn(move || spawn_tied(&argv).unwrap())
            .join()
            .unwrap();
        // The thread is gone: the kernel kills the process (no timing
        // assumed: wait blocks until it happens).
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }

    #[test]
    fn process_driver_starts_and_stops_a_real_process() {
        let d = ProcessDriver::new(vec!["sleep".into(), "300".into()]);
        assert_eq!(d.pid(), None);
        d.power_on().unwrap();
        let pid = d.pid().expect("running");
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        d.power_on().unwrap();
        assert_eq!(d.pid(), Some(pid), "power on twice keeps one process");
        d.power_off().unwrap();
        assert_eq!(d.pid(), None);
        // Reaped: no zombie left under our pid.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(!stat.contains(") Z "), "{stat}");
    }
}
