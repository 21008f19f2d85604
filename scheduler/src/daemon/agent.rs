//! The agent protocol: how the daemon talks to `ferry agent` (one per
//! host, runs VMs and performs engine migrations). HTTP/1.1 with JSON
//! bodies, versioned by path prefix `/v1`:
//!
//! | request | body | answer |
//! |---|---|---|
//! | `GET /v1/status` | - | [`AgentStatus`] |
//! | `POST /v1/migrate` | [`MigrateRequest`] | [`OpResult`] when the migration finished |
//! | `POST /v1/vms/start` | [`VmRequest`] | [`OpResult`] |
//! | `POST /v1/vms/shutdown` | [`VmRequest`] | [`OpResult`] |
//!
//! A migration either completes (the VM runs on the target) or fails and
//! the VM keeps running on the source: the agent rolls back, never leaves
//! a VM nowhere. The daemon re-plans after a failure (retry).
//!
//! [`Executor`] is the seam: [`HttpAgents`] drives real agents over this
//! protocol; other executors (libvirt, the simulator) plug in the same way.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Protocol version (path prefix).
pub const PROTOCOL_VERSION: &str = "v1";
/// Largest answer accepted from an agent: a status of thousands of VMs.
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// One VM as an agent reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentVm {
    /// VM name.
    pub name: String,
    /// Memory in MB.
    pub mem_mb: u64,
    /// CPU demand now (MIPS).
    pub cpu_mips: f64,
    /// Running (false: defined but stopped).
    pub running: bool,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The host's name.
    pub host: String,
    /// Its VMs.
    pub vms: Vec<AgentVm>,
}

/// `POST /v1/migrate`: send `vm` to the agent at `target`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// VM name.
    pub vm: String,
    /// Target host name.
    pub target_host: String,
    /// Target agent address (`ip:port`).
    pub target: String,
}

/// `POST /v1/vms/start|shutdown`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRequest {
    /// VM name.
    pub vm: String,
    /// Memory (MB), for start.
    #[serde(default)]
    pub mem_mb: u64,
}

/// Result of an operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpResult {
    /// Done.
    pub ok: bool,
    /// Why not.
    #[serde(default)]
    pub error: Option<String>,
}

/// Why an executor operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// No agent is configured for the host.
    #[error("host {0} has no agent")]
    NoAgent(String),
    /// The agent could not be reached.
    #[error("agent {addr} unreachable")]
    Io {
        /// Agent address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The agent answered something that is not the protocol.
    #[error("agent {addr}: bad answer: {what}")]
    Protocol {
        /// Agent address.
        addr: SocketAddr,
        /// What was wrong.
        what: String,
    },
    /// The agent refused or failed the operation.
    #[error("agent {addr}: {what}")]
    Refused {
        /// Agent address.
        addr: SocketAddr,
        /// The agent's message.
        what: String,
    },
}

/// Carries out plans on real machines.
pub trait Executor: Send + Sync {
    /// Inventory of one host.
    fn status(&self, host: &str) -> Result<AgentStatus, ExecError>;
    /// Live-migrate `vm` from `from` to `to`; on error the VM is still on `from`.
    fn migrate(&self, vm: &str, from: &str, to: &str) -> Result<(), ExecError>;
    /// Shut `vm` down on `host`.
    fn shutdown_vm(&self, vm: &str, host: &str) -> Result<(), ExecError>;
    /// Start `vm` (of `mem_mb`) on `host`.
    fn start_vm(&self, vm: &str, mem_mb: u64, host: &str) -> Result<(), ExecError>;
}

/// Agents reached over HTTP.
#[derive(Debug, Clone, Default)]
pub struct HttpAgents {
    /// Agent address per host name.
    pub agents: HashMap<String, SocketAddr>,
    /// Per-request timeout (migrations can take long).
    pub timeout: Option<Duration>,
}

impl HttpAgents {
    fn addr(&self, host: &str) -> Result<SocketAddr, ExecError> {
        self.agents
            .get(host)
            .copied()
            .ok_or_else(|| ExecError::NoAgent(host.to_string()))
    }

    fn op(&self, host: &str, path: &str, body: &impl Serialize) -> Result<(), ExecError> {
        let addr = self.addr(host)?;
        let r: OpResult = request(addr, "POST", path, Some(body), self.timeout)?;
        if r.ok {
            Ok(())
        } else {
            Err(ExecError::Refused {
                addr,
                what: r.error.unwrap_or_else(|| "failed without a reason".into()),
            })
        }
    }
}

impl Executor for HttpAgents {
    fn status(&self, host: &str) -> Result<AgentStatus, ExecError> {
        let addr = self.addr(host)?;
        request::<(), _>(addr, "GET", "/v1/status", None, self.timeout)
    }
    fn migrate(&self, vm: &str, from: &str, to: &str) -> Result<(), ExecError> {
        let target = self.addr(to)?;
        self.op(
            from,
            "/v1/migrate",
            &MigrateRequest {
                vm: vm.to_string(),
                target_host: to.to_string(),
                target: target.to_string(),
            },
        )
    }
    fn shutdown_vm(&self, vm: &str, host: &str) -> Result<(), ExecError> {
        self.op(
            host,
            "/v1/vms/shutdown",
            &VmRequest {
                vm: vm.to_string(),
                mem_mb: 0,
            },
        )
    }
    fn start_vm(&self, vm: &str, mem_mb: u64, host: &str) -> Result<(), ExecError> {
        self.op(
            host,
            "/v1/vms/start",
            &VmRequest {
                vm: vm.to_string(),
                mem_mb,
            },
        )
    }
}

/// One blocking HTTP/1.1 request with a JSON body and answer.
pub fn request<B: Serialize, T: DeserializeOwned>(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&B>,
    timeout: Option<Duration>,
) -> Result<T, ExecError> {
    let io = |source| ExecError::Io { addr, source };
    let proto = |what: String| ExecError::Protocol { addr, what };
    let body = match body {
        Some(b) => serde_json::to_vec(b).map_err(|e| proto(e.to_string()))?,
        None => Vec::new(),
    };
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(io)?;
    s.set_read_timeout(timeout).map_err(io)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).map_err(io)?;
    s.write_all(&body).map_err(io)?;
    let mut buf = Vec::new();
    s.take(MAX_RESPONSE_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(io)?;
    if buf.len() > MAX_RESPONSE_BYTES {
        return Err(proto(format!(
            "answer longer than {MAX_RESPONSE_BYTES} bytes"
        )));
    }
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| proto("no end of headers".into()))?;
    let head = String::from_utf8_lossy(&buf[..split]);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| proto(format!("bad status line {:?}", head.lines().next())))?;
    let mut payload = buf[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        payload = dechunk(&payload).ok_or_else(|| proto("bad chunked body".into()))?;
    }
    if !(200..300).contains(&status) {
        return Err(ExecError::Refused {
            addr,
            what: format!("HTTP {status}: {}", String::from_utf8_lossy(&payload)),
        });
    }
    serde_json::from_slice(&payload).map_err(|e| proto(e.to_string()))
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..eol]).ok()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}
