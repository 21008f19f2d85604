//! The [`Executor`] seam: how the daemon carries out a plan on real hosts.
//! [`HttpAgents`] drives `ferry agent` processes over the agent protocol
//! ([`super::protocol`]); the libvirt executor (feature `libvirt`) drives
//! libvirt connections; a daemon can mix both, one executor per host kind.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::client::{CallError, JsonClient};
use super::https::ClientTls;
use super::metrics::MigrationMeasure;
use super::protocol::{
    AgentStatus, Done, MigrateReply, MigrateRequest, OwnershipClaim, SwapReport, VmRequest,
};

/// Why an executor operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// No agent or connection is configured for the host.
    #[error("host {0} has no agent")]
    NoAgent(String),
    /// The agent was asked and the call failed (unreachable, or refused
    /// with its reason).
    #[error("agent of host {host}")]
    Agent {
        /// The host.
        host: String,
        /// The failed call.
        #[source]
        source: CallError,
    },
    /// The agent at the host's address says it is another host.
    #[error("the agent at {addr} says it is host {claims:?}, but the configuration has it as host {host:?}")]
    WrongHost {
        /// The configured host.
        host: String,
        /// The agent's address.
        addr: String,
        /// The name the agent gave.
        claims: String,
    },
    /// The two hosts are of different kinds (a ferry agent and a libvirt
    /// host): no migration path between them.
    #[error("cannot migrate between {from} and {to}: one is a ferry agent host, the other a libvirt host")]
    Incompatible {
        /// Source host.
        from: String,
        /// Target host.
        to: String,
    },
    /// The VM's ownership record forbids the migration, or could not
    /// follow it.
    #[error("VM {vm}'s ownership: {why}")]
    Ownership {
        /// The VM.
        vm: String,
        /// Why.
        why: String,
    },
    /// A libvirt operation failed (feature `libvirt`).
    #[cfg(feature = "libvirt")]
    #[error("libvirt host {host}")]
    Libvirt {
        /// The host.
        host: String,
        /// libvirt's own error.
        #[source]
        source: Box<super::libvirt::LibvirtError>,
    },
}

impl ExecError {
    /// The whole chain on one line: this error and every cause.
    pub fn chain(&self) -> String {
        error_chain(self)
    }
}

/// `e` and its sources, joined with `": "` (transport's, the one every
/// crate uses: the scheduler depends on transport, never the other way).
pub use ferry_transport::error_chain;

/// Carries out plans on real machines. Blocking: the daemon calls it from
/// blocking threads.
pub trait Executor: Send + Sync {
    /// Inventory of one host.
    fn status(&self, host: &str) -> Result<AgentStatus, ExecError>;
    /// Live-migrate `vm` from `from` to `to`; on error the VM is still on `from`.
    fn migrate(&self, vm: &str, from: &str, to: &str) -> Result<MigrationMeasure, ExecError>;
    /// [`Executor::migrate`] that also moves the VM's ownership record
    /// before GO under `claim`, where the host can (a ferry agent on the
    /// cluster store); the swap's report when it did. By default the
    /// record is left to the caller.
    fn migrate_owned(
        &self,
        vm: &str,
        from: &str,
        to: &str,
        claim: Option<&OwnershipClaim>,
    ) -> Result<(MigrationMeasure, Option<SwapReport>), ExecError> {
        let _ = claim;
        Ok((self.migrate(vm, from, to)?, None))
    }
    /// Shut `vm` down on `host`.
    fn shutdown_vm(&self, vm: &str, host: &str) -> Result<(), ExecError>;
    /// Start `vm` (of `mem_mb`) on `host`.
    fn start_vm(&self, vm: &str, mem_mb: u64, host: &str) -> Result<(), ExecError>;
}

/// Agents reached over HTTP: HTTPS with mutual TLS when `tls` is given
/// (each agent's certificate must carry its host's name), plaintext
/// otherwise.
#[derive(Debug, Clone, Default)]
pub struct HttpAgents {
    /// Agent address per host name.
    pub agents: HashMap<String, SocketAddr>,
    /// Per-request timeout (migrations can take long).
    pub timeout: Option<Duration>,
    /// The daemon's certificate and the CA agents must chain to.
    pub tls: Option<ClientTls>,
}

impl HttpAgents {
    fn client(&self, host: &str) -> Result<(SocketAddr, JsonClient), ExecError> {
        let addr = self
            .agents
            .get(host)
            .copied()
            .ok_or_else(|| ExecError::NoAgent(host.to_string()))?;
        Ok((
            addr,
            JsonClient::for_agent(host, addr, self.tls.as_ref(), self.timeout),
        ))
    }

    fn op(&self, host: &str, path: &str, body: &impl serde::Serialize) -> Result<(), ExecError> {
        let (_, c) = self.client(host)?;
        c.post::<_, Done>(path, body)
            .map(drop)
            .map_err(|source| ExecError::Agent {
                host: host.to_string(),
                source,
            })
    }
}

impl Executor for HttpAgents {
    fn status(&self, host: &str) -> Result<AgentStatus, ExecError> {
        let (addr, c) = self.client(host)?;
        let s: AgentStatus = c.get("/v1/status").map_err(|source| ExecError::Agent {
            host: host.to_string(),
            source,
        })?;
        if s.host != host {
            return Err(ExecError::WrongHost {
                host: host.to_string(),
                addr: addr.to_string(),
                claims: s.host,
            });
        }
        Ok(s)
    }
    fn migrate(&self, vm: &str, from: &str, to: &str) -> Result<MigrationMeasure, ExecError> {
        Ok(self.migrate_owned(vm, from, to, None)?.0)
    }
    fn migrate_owned(
        &self,
        vm: &str,
        from: &str,
        to: &str,
        claim: Option<&OwnershipClaim>,
    ) -> Result<(MigrationMeasure, Option<SwapReport>), ExecError> {
        let (target, _) = self.client(to)?;
        let (_, c) = self.client(from)?;
        let r: MigrateReply = c
            .post(
                "/v1/migrate",
                &MigrateRequest {
                    vm: vm.to_string(),
                    target_host: to.to_string(),
                    target: target.to_string(),
                    ownership: claim.cloned(),
                },
            )
            .map_err(|source| ExecError::Agent {
                host: from.to_string(),
                source,
            })?;
        Ok((
            MigrationMeasure {
                seconds: r.seconds,
                downtime_ms: Some(r.downtime_ms),
                bytes: Some(r.bytes),
            },
            r.ownership,
        ))
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

/// The executor of a whole cluster: each host's own (agents over HTTP,
/// libvirt connections), the same policies over all of them. A migration
/// between hosts of different kinds is refused.
#[derive(Default)]
pub struct ClusterExecutor {
    by_host: HashMap<String, std::sync::Arc<dyn Executor>>,
}

impl std::fmt::Debug for ClusterExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterExecutor")
            .field("hosts", &self.by_host.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ClusterExecutor {
    /// `host` is driven by `e`.
    pub fn insert(&mut self, host: &str, e: std::sync::Arc<dyn Executor>) {
        self.by_host.insert(host.to_string(), e);
    }

    fn of(&self, host: &str) -> Result<&std::sync::Arc<dyn Executor>, ExecError> {
        self.by_host
            .get(host)
            .ok_or_else(|| ExecError::NoAgent(host.to_string()))
    }
}

impl Executor for ClusterExecutor {
    fn status(&self, host: &str) -> Result<AgentStatus, ExecError> {
        self.of(host)?.status(host)
    }
    fn migrate(&self, vm: &str, from: &str, to: &str) -> Result<MigrationMeasure, ExecError> {
        let (a, b) = (self.of(from)?, self.of(to)?);
        if !std::sync::Arc::ptr_eq(a, b) {
            return Err(ExecError::Incompatible {
                from: from.to_string(),
                to: to.to_string(),
            });
        }
        a.migrate(vm, from, to)
    }
    fn migrate_owned(
        &self,
        vm: &str,
        from: &str,
        to: &str,
        claim: Option<&OwnershipClaim>,
    ) -> Result<(MigrationMeasure, Option<SwapReport>), ExecError> {
        let (a, b) = (self.of(from)?, self.of(to)?);
        if !std::sync::Arc::ptr_eq(a, b) {
            return Err(ExecError::Incompatible {
                from: from.to_string(),
                to: to.to_string(),
            });
        }
        a.migrate_owned(vm, from, to, claim)
    }
    fn shutdown_vm(&self, vm: &str, host: &str) -> Result<(), ExecError> {
        self.of(host)?.shutdown_vm(vm, host)
    }
    fn start_vm(&self, vm: &str, mem_mb: u64, host: &str) -> Result<(), ExecError> {
        self.of(host)?.start_vm(vm, mem_mb, host)
    }
}
