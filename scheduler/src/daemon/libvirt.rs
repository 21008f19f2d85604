//! Inventory and stats from libvirt (feature `libvirt`, needs libvirt-dev):
//! the host's CPUs and memory, its domains with memory, state and CPU
//! demand (from the CPU time consumed between two samples).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use virt::connect::Connect;
use virt::domain::DomainState;

use super::agent::{AgentStatus, AgentVm};

/// Why libvirt could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// Connecting failed.
    #[error("cannot connect to libvirt at {uri}")]
    Connect {
        /// The URI.
        uri: String,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// A query failed.
    #[error("libvirt {what} failed")]
    Query {
        /// What was asked.
        what: &'static str,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
}

/// The node's capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeCapacity {
    /// Logical CPUs.
    pub cpus: u32,
    /// MHz per CPU (used as MIPS).
    pub mhz: u32,
    /// Memory in MB.
    pub mem_mb: u64,
}

/// A libvirt connection used for inventory.
#[derive(Debug)]
pub struct LibvirtInventory {
    uri: String,
    conn: Mutex<Connect>,
    last: Mutex<HashMap<String, (u64, Instant)>>,
}

impl LibvirtInventory {
    /// Connect to `uri` (e.g. `qemu:///system`, `test:///default`).
    pub fn open(uri: &str) -> Result<Self, LibvirtError> {
        let conn = Connect::open(Some(uri)).map_err(|source| LibvirtError::Connect {
            uri: uri.to_string(),
            source,
        })?;
        Ok(Self {
            uri: uri.to_string(),
            conn: Mutex::new(conn),
            last: Mutex::new(HashMap::new()),
        })
    }

    /// The URI connected to.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// CPUs, MHz and memory of the node.
    pub fn node(&self) -> Result<NodeCapacity, LibvirtError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let n = conn.node_info().map_err(|source| LibvirtError::Query {
            what: "node info",
            source,
        })?;
        Ok(NodeCapacity {
            cpus: n.cpus,
            mhz: n.mhz,
            mem_mb: n.memory / 1024,
        })
    }

    /// The domains as an agent status for `host`. CPU demand (MIPS) is the
    /// share of CPU time used since the previous call times `mips_per_cpu`
    /// (0 on the first call).
    pub fn status(&self, host: &str, mips_per_cpu: f64) -> Result<AgentStatus, LibvirtError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let domains = conn
            .list_all_domains(0)
            .map_err(|source| LibvirtError::Query {
                what: "list domains",
                source,
            })?;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let mut vms = Vec::new();
        for d in domains {
            let name = d.name().map_err(|source| LibvirtError::Query {
                what: "domain name",
                source,
            })?;
            let info = d.info().map_err(|source| LibvirtError::Query {
                what: "domain info",
                source,
            })?;
            let running = matches!(
                Result::<DomainState, _>::from(info.state),
                Ok(DomainState::Running | DomainState::Blocked)
            );
            let cpu_mips = match last.insert(name.clone(), (info.cpu_time, now)) {
                Some((t0, i0)) => {
                    let wall = now.duration_since(i0).as_secs_f64();
                    if wall > 0.0 {
                        (info.cpu_time.saturating_sub(t0) as f64 / 1e9) / wall * mips_per_cpu
                    } else {
                        0.0
                    }
                }
                None => 0.0,
            };
            vms.push(AgentVm {
                name,
                mem_mb: info.max_mem / 1024,
                cpu_mips,
                running,
            });
        }
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(AgentStatus {
            host: host.to_string(),
            vms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_test_driver_inventory() {
        let inv = LibvirtInventory::open("test:///default").unwrap();
        let node = inv.node().unwrap();
        assert!(node.cpus > 0 && node.mem_mb > 0, "{node:?}");
        let s = inv.status("node", f64::from(node.mhz)).unwrap();
        let test = s
            .vms
            .iter()
            .find(|v| v.name == "test")
            .expect("the test domain");
        assert!(test.running);
        assert!(test.mem_mb > 0);
        // Second sample: demand is computed from CPU time deltas, never negative.
        let s2 = inv.status("node", f64::from(node.mhz)).unwrap();
        assert!(s2.vms.iter().all(|v| v.cpu_mips >= 0.0));
    }

    #[test]
    fn a_bad_uri_is_a_clear_error() {
        let e = LibvirtInventory::open("nosuchdriver:///x").unwrap_err();
        assert!(e.to_string().contains("nosuchdriver:///x"), "{e}");
    }
}
