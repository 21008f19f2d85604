//! The agent protocol, shared by both ends: the daemon (through
//! [`super::agent::HttpAgents`]) and `ferry agent`. HTTP/1.1 with JSON
//! bodies, versioned by the path prefix `/v1`:
//!
//! | request | body | answer (2xx) |
//! |---|---|---|
//! | `GET /v1/status` | - | [`AgentStatus`] |
//! | `POST /v1/migrate` | [`MigrateRequest`] | [`MigrateReply`] once the VM runs on the target |
//! | `POST /v1/incoming` | [`IncomingRequest`] | [`IncomingReply`]: a listener for one migration |
//! | `POST /v1/handback` | [`HandbackRequest`] | [`HandbackReply`]: a migration's source, left with a paused copy, asks the destination |
//! | `POST /v1/vms/start` | [`VmRequest`] | [`Done`] |
//! | `POST /v1/vms/shutdown` | [`VmRequest`] | [`Done`] |
//! | `POST /v1/vms/load` | [`LoadRequest`] | [`Done`]: set a VM's (simulated) CPU demand |
//! | `GET /v1/vms/{name}` | - | the guest's status block |
//! | `GET /metrics` | - | Prometheus text: the agent's migrations (counts, duration, downtime, bytes) |
//!
//! **Every failure answers a non-2xx status** with an [`ErrorReply`] body
//! saying why: 404 for an unknown VM, 409 for a VM that is busy or already
//! there, 400 for a malformed request, 500 when the operation itself failed
//! (a migration that rolled back, a guest that did not boot). A 2xx answer
//! always means done.
//!
//! A migration either completes (the VM runs on the target) or fails and
//! the VM keeps running on the source: the agent rolls back, never leaves a
//! VM nowhere. A listener opened by `/v1/incoming` that sees no migration
//! within [`INCOMING_TIMEOUT`] is closed, so a source that failed before
//! connecting does not leave the port bound.
//!
//! Version rule: fields may be added with `#[serde(default)]`; removing or
//! changing one needs `/v2`.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

/// Protocol version (path prefix).
pub const PROTOCOL_VERSION: &str = "v1";
/// Largest answer accepted from an agent or the daemon: a status of
/// thousands of VMs.
pub const MAX_RESPONSE_BYTES: u64 = 4 << 20;
/// How long an incoming-migration listener waits for its source before it
/// closes (the source asks for it just before connecting).
pub const INCOMING_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// The host's name, as the agent was told (`--host`).
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
    /// With a cluster store: move the VM's ownership record to the target
    /// before GO, under this leader's token. An agent on the store refuses
    /// the migration when the record is not at this epoch on this host,
    /// and abandons it (without resuming the VM unless it still owns it)
    /// when the swap fails.
    #[serde(default)]
    pub ownership: Option<OwnershipClaim>,
}

/// The leader's word that a migration may move a VM's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnershipClaim {
    /// The leader.
    pub candidate: String,
    /// Its fencing token.
    pub token: i64,
    /// The record's epoch the leader saw (on the source).
    pub epoch: u64,
}

/// How the ownership swap went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwapReport {
    /// The record's epoch after the swap.
    pub epoch: u64,
    /// Time the swap took, inside the guest's pause (ms).
    pub swap_ms: f64,
}

/// The answer to [`MigrateRequest`]: what the migration measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateReply {
    /// Wall time, s.
    pub seconds: f64,
    /// Guest pause, ms.
    pub downtime_ms: f64,
    /// Bytes sent on the wire.
    pub bytes: u64,
    /// The ownership swap before GO, when one was asked for and done.
    #[serde(default)]
    pub ownership: Option<SwapReport>,
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

/// `POST /v1/incoming`: the destination side of a migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncomingRequest {
    /// VM name.
    pub vm: String,
    /// Its memory (MB).
    pub mem_mb: u64,
    /// Its CPU demand (MIPS), carried over to the target.
    #[serde(default)]
    pub cpu_mips: f64,
}

/// The answer to [`IncomingRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncomingReply {
    /// The port the migration listener is bound to.
    pub port: u16,
    /// Where the source connects (`ip:port`), when the agent says: its
    /// listener is bound to an address of its own (`--migration-listen`)
    /// or reached through another one (`--migration-advertise`: a NAT, a
    /// relay). Absent: `port` on the agent's own address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

/// `POST /v1/handback`: the source of migration `migration_id` of `vm`
/// kept the guest's paused copy without learning whether the destination
/// resumed it (GO sent and unanswered, or the ownership swap's outcome
/// unknown), while the VM's record names the destination. The
/// destination answers whether it runs the VM; if it does not and never
/// will (it refuses that migration's handover for good when it is still
/// undecided), it gives the record back to the source
/// (`ClusterStore::hand_back`), so that the source's copy may resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandbackRequest {
    /// VM name.
    pub vm: String,
    /// The migration, as the engine names it (its Hello).
    pub migration_id: u64,
}

/// The answer to [`HandbackRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum HandbackReply {
    /// The destination holds the VM (that migration resumed it there):
    /// the source's copy must go.
    Runs,
    /// The destination never resumed that migration and never will, holds
    /// no copy, and the record names the source again at `epoch`: the
    /// source's copy is the VM.
    HandedBack {
        /// The record's epoch now.
        epoch: u64,
        /// Why the destination did not resume it.
        reason: String,
    },
}

/// `POST /v1/vms/load`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadRequest {
    /// VM name.
    pub vm: String,
    /// Its CPU demand from now on (MIPS).
    pub cpu_mips: f64,
}

/// A 2xx answer with nothing to say but "done".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {}

/// The body of every non-2xx answer (agents and the daemon's API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Why the request failed, one line.
    pub error: String,
}

/// A failed request as the server side answers it: a status and a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status (never 2xx).
    pub status: StatusCode,
    /// Why.
    pub error: String,
}

impl Refusal {
    /// 404: the thing named does not exist here.
    pub fn not_found(error: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            error: error.into(),
        }
    }
    /// 409: it exists, but its state forbids this now.
    pub fn conflict(error: impl Into<String>) -> Self {
        Self {
            status: StatusCode::CONFLICT,
            error: error.into(),
        }
    }
    /// 400: the request itself is wrong.
    pub fn bad_request(error: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error: error.into(),
        }
    }
    /// 503: it cannot be done now (no leader, the store unreachable).
    pub fn unavailable(error: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: error.into(),
        }
    }
    /// 500: the operation was tried and failed.
    pub fn failed(error: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            error: error.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorReply { error: self.error })).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_its_status_and_an_error_reply() {
        let r = Refusal::conflict("VM a is already migrating").into_response();
        assert_eq!(r.status(), StatusCode::CONFLICT);
    }

    #[test]
    fn requests_parse_from_their_documented_json() {
        let r: IncomingRequest = serde_json::from_str(r#"{"vm":"a","mem_mb":64}"#).unwrap();
        assert_eq!(r.cpu_mips, 0.0, "cpu_mips defaults");
        let old: IncomingReply = serde_json::from_str(r#"{"port":7410}"#).unwrap();
        assert_eq!(old.addr, None, "an agent that names no address");
        let back: HandbackReply =
            serde_json::from_str(r#"{"outcome":"handed_back","epoch":3,"reason":"no GO"}"#)
                .unwrap();
        assert_eq!(
            back,
            HandbackReply::HandedBack {
                epoch: 3,
                reason: "no GO".into()
            }
        );
        let e = serde_json::from_str::<MigrateRequest>(r#"{"vm":"a"}"#).unwrap_err();
        assert!(e.to_string().contains("target_host"), "{e}");
    }
}
