//! How the source secures the lanes it opens: mutual TLS from PEM files,
//! or plaintext when asked for by name. A migrate request carries this;
//! the source process reads the files.

use std::path::PathBuf;
use std::sync::Arc;

use ferry_transport::tls::TlsError;
use ferry_transport::{Security, TlsFiles, TlsSettings};
use serde::{Deserialize, Serialize};

/// Plaintext or mutual TLS, as sent in a migrate request (the TLS paths
/// are absolute: the source process reads them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum SecuritySpec {
    /// Plaintext lanes (`--insecure`).
    Insecure,
    /// Mutual TLS.
    Tls {
        /// This side's certificate chain (PEM).
        cert: PathBuf,
        /// This side's private key (PEM).
        key: PathBuf,
        /// The CA that signed the peer's certificate (PEM).
        ca: PathBuf,
        /// The name the server's certificate must carry.
        server_name: String,
    },
}

/// The TLS files could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("loading the TLS files")]
pub struct SecurityError(#[source] pub TlsError);

/// Plaintext or TLS, in one word (for events and status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityMode {
    /// Mutual TLS.
    Tls,
    /// Plaintext.
    Insecure,
}

impl std::fmt::Display for SecurityMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SecurityMode::Tls => "mutual TLS",
            SecurityMode::Insecure => "plaintext",
        })
    }
}

impl SecuritySpec {
    /// The transport's security settings (reads and checks the TLS files).
    pub fn load(&self) -> Result<Security, SecurityError> {
        match self {
            SecuritySpec::Insecure => Ok(Security::Insecure),
            SecuritySpec::Tls {
                cert,
                key,
                ca,
                server_name,
            } => {
                let files = TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: ca.clone(),
                };
                let settings =
                    TlsSettings::from_files(&files, server_name).map_err(SecurityError)?;
                Ok(Security::Tls(Arc::new(settings)))
            }
        }
    }

    /// `tls` or `insecure`.
    pub fn mode(&self) -> SecurityMode {
        match self {
            SecuritySpec::Insecure => SecurityMode::Insecure,
            SecuritySpec::Tls { .. } => SecurityMode::Tls,
        }
    }

    /// For messages: "plaintext (--insecure)" or "mutual TLS".
    pub fn describe(&self) -> &'static str {
        match self {
            SecuritySpec::Insecure => "plaintext (--insecure)",
            SecuritySpec::Tls { .. } => "mutual TLS",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_a_clear_error() {
        let spec = SecuritySpec::Tls {
            cert: "/nonexistent/c.pem".into(),
            key: "/nonexistent/k.pem".into(),
            ca: "/nonexistent/ca.pem".into(),
            server_name: "ferry".into(),
        };
        let e = spec.load().unwrap_err();
        let chain = crate::error_chain(&e);
        assert!(chain.contains("/nonexistent/"), "{chain}");
    }

    #[test]
    fn a_spec_survives_json() {
        let spec = SecuritySpec::Tls {
            cert: "/c.pem".into(),
            key: "/k.pem".into(),
            ca: "/ca.pem".into(),
            server_name: "dst".into(),
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<SecuritySpec>(&json).unwrap(), spec);
    }
}
