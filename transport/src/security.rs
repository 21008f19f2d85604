//! How a fresh TCP connection is secured before frames flow over it.

use std::net::TcpStream;
use std::sync::Arc;

use crate::error::TransportError;
use crate::lanes::{LaneRead, LaneWrite};
use crate::tls::TlsSettings;

/// Plaintext or mutual TLS. There is deliberately no `Default`: plaintext is
/// only ever used when asked for by name (`--insecure`).
#[derive(Debug, Clone)]
pub enum Security {
    /// No encryption, no authentication. Only when explicitly requested.
    Insecure,
    /// Mutual TLS: both sides present and verify certificates.
    Tls(Arc<TlsSettings>),
}

impl Security {
    /// Secures the connecting side of `stream`.
    pub fn connect(&self, stream: TcpStream) -> Result<(LaneRead, LaneWrite), TransportError> {
        match self {
            Security::Insecure => plain(stream),
            Security::Tls(t) => {
                let (r, w) = t.connect(stream).map_err(TransportError::Tls)?;
                Ok((Box::new(r), Box::new(w)))
            }
        }
    }

    /// Secures the accepting side of `stream`.
    pub fn accept(&self, stream: TcpStream) -> Result<(LaneRead, LaneWrite), TransportError> {
        match self {
            Security::Insecure => plain(stream),
            Security::Tls(t) => {
                let (r, w) = t.accept(stream).map_err(TransportError::Tls)?;
                Ok((Box::new(r), Box::new(w)))
            }
        }
    }
}

fn plain(stream: TcpStream) -> Result<(LaneRead, LaneWrite), TransportError> {
    let read = stream.try_clone().map_err(TransportError::Configure)?;
    Ok((Box::new(read), Box::new(stream)))
}
