//! A blocking JSON-over-HTTP client (through `ureq`) for both of the
//! daemon's conversations: the daemon asking agents ([`super::protocol`]),
//! and people or tests asking the daemon ([`super::api`], `ferry sched`).
//! A non-2xx answer becomes [`CallError::Status`] carrying the server's own
//! reason (the [`ErrorReply`] body).

use std::net::SocketAddr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::https::ClientTls;
use super::protocol::{ErrorReply, MAX_RESPONSE_BYTES};

/// The settings every client shares: `timeout` bounds a call, connecting
/// gets 5 s, a non-2xx answer is read (it carries the reason).
pub(crate) fn base_config(
    timeout: Option<Duration>,
) -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope> {
    ureq::Agent::config_builder()
        .timeout_global(timeout)
        .timeout_connect(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
}

/// HTTP methods the protocols use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// `POST`.
    Post,
    /// `PUT`.
    Put,
    /// `DELETE`.
    Delete,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        })
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nothing answered, or the connection broke.
    #[error("{method} {url}: unreachable")]
    Unreachable {
        /// Method.
        method: Method,
        /// The URL.
        url: String,
        /// What the HTTP client said.
        #[source]
        source: ureq::Error,
    },
    /// The server answered with a non-2xx status.
    #[error("{method} {url}: HTTP {status}: {error}")]
    Status {
        /// Method.
        method: Method,
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
        /// The server's reason ([`ErrorReply::error`], or the raw body).
        error: String,
    },
    /// The answer is not what the protocol says.
    #[error("{method} {url}: bad answer: {what}")]
    Protocol {
        /// Method.
        method: Method,
        /// The URL.
        url: String,
        /// What was wrong.
        what: String,
    },
}

impl CallError {
    /// The server's reason when it refused (non-2xx), if it did.
    pub fn refusal(&self) -> Option<(u16, &str)> {
        match self {
            CallError::Status { status, error, .. } => Some((*status, error.as_str())),
            _ => None,
        }
    }
}

/// A client for one server at `base` (`http://host:port`).
#[derive(Debug, Clone)]
pub struct JsonClient {
    base: String,
    agent: ureq::Agent,
}

impl JsonClient {
    /// A client for `addr` (`host:port`, or a URL with `http://`), each call
    /// bounded by `timeout` (`None`: no bound; migrations can take long).
    pub fn new(addr: &str, timeout: Option<Duration>) -> Self {
        let base = if addr.contains("://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{addr}")
        };
        let agent = base_config(timeout).build().into();
        Self { base, agent }
    }

    /// A client for the agent of `host` at `addr`: HTTPS with `tls` when
    /// given (the agent's certificate must carry `host`), plain HTTP
    /// otherwise.
    pub fn for_agent(
        host: &str,
        addr: SocketAddr,
        tls: Option<&ClientTls>,
        timeout: Option<Duration>,
    ) -> Self {
        match tls {
            None => Self::new(&addr.to_string(), timeout),
            Some(tls) => Self {
                base: format!("https://{host}:{}", addr.port()),
                agent: tls.agent(addr, timeout),
            },
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET path`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        self.call::<(), T>(Method::Get, path, None)
    }

    /// `POST path` with a JSON body.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CallError> {
        self.call(Method::Post, path, Some(body))
    }

    /// One call; `body` is sent as JSON, the answer parsed as `T`.
    pub fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, CallError> {
        let url = format!("{}{path}", self.base);
        let proto = |what: String| CallError::Protocol {
            method,
            url: url.clone(),
            what,
        };
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| proto(format!("cannot encode the request: {e}")))?
            .unwrap_or_default();
        let sent = match method {
            Method::Get => self.agent.get(&url).call(),
            Method::Delete => self.agent.delete(&url).call(),
            Method::Post => self
                .agent
                .post(&url)
                .content_type("application/json")
                .send(&body[..]),
            Method::Put => self
                .agent
                .put(&url)
                .content_type("application/json")
                .send(&body[..]),
        };
        let mut resp = sent.map_err(|source| CallError::Unreachable {
            method,
            url: url.clone(),
            source,
        })?;
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .read_to_vec()
            .map_err(|e| proto(format!("reading the answer: {e}")))?;
        if !(200..300).contains(&status) {
            let error = serde_json::from_slice::<ErrorReply>(&bytes)
                .map(|r| r.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().to_string());
            return Err(CallError::Status {
                method,
                url,
                status,
                error,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| proto(e.to_string()))
    }
}
