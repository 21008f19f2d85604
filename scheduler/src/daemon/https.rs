//! Mutual TLS on the agent API, with the migration lanes' certificates
//! (`ferry tls gen-certs`) loaded by the transport's one loader
//! ([`TlsSettings`]).
//!
//! - [`ClientTls`]: the calling side (the daemon, or an agent asking
//!   another): presents its certificate and checks the agent's against the
//!   CA **and against the agent's host name**, whatever address it is
//!   reached at; so an agent holding another host's certificate is refused.
//! - [`TlsListener`]: the agent's side, for `axum::serve`: every connection
//!   must present a certificate signed by the CA; a refused handshake is
//!   logged with its reason and never reaches the API.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_transport::tls::{TlsError, TlsFiles, TlsSettings, DEFAULT_SERVER_NAME};
use tokio::net::{TcpListener, TcpStream};
use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig, TlsProvider};
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};

/// Why the agent API's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AgentTlsError {
    /// The files could not be loaded.
    #[error("loading the TLS files")]
    Load(#[source] TlsError),
    /// The HTTP client did not take the key.
    #[error("the HTTP client cannot use the private key")]
    Key(#[source] ureq::Error),
}

/// The calling side's TLS: its certificate and the CA agents must chain to.
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: TlsConfig,
}

impl ClientTls {
    /// Loads certificate, key and CA (PEM files) through the transport's
    /// loader, which also checks that the key matches the certificate.
    pub fn load(files: &TlsFiles) -> Result<ClientTls, AgentTlsError> {
        let settings =
            TlsSettings::from_files(files, DEFAULT_SERVER_NAME).map_err(AgentTlsError::Load)?;
        Self::from_settings(&settings)
    }

    /// From settings loaded already (an agent's `--tls-*` files).
    pub fn from_settings(settings: &TlsSettings) -> Result<ClientTls, AgentTlsError> {
        let chain: Vec<Certificate<'static>> = settings
            .cert_chain()
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        // ureq takes a key as PEM only (its key kinds are not public); the
        // transport's loader parsed the same text.
        let key = PrivateKey::from_pem(settings.private_key_pem()).map_err(AgentTlsError::Key)?;
        let roots: Vec<Certificate<'static>> = settings
            .ca_certs()
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        let config = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(ferry_transport::tls::provider())
            .client_cert(Some(ClientCert::new_with_certs(&chain, key)))
            .root_certs(RootCerts::new_with_certs(&roots))
            .build();
        Ok(ClientTls { config })
    }

    /// A ureq agent that reaches `addr` and checks its certificate against
    /// `name`: the URL carries the name, the resolver pins the address.
    pub(crate) fn agent(&self, addr: SocketAddr, timeout: Option<Duration>) -> ureq::Agent {
        let config = super::client::base_config(timeout)
            .tls_config(self.config.clone())
            .build();
        ureq::Agent::with_parts(
            config,
            ureq::unversioned::transport::DefaultConnector::new(),
            PinnedAddress(addr),
        )
    }
}

/// Resolves every name to one address.
#[derive(Debug)]
struct PinnedAddress(SocketAddr);

impl Resolver for PinnedAddress {
    fn resolve(
        &self,
        _uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let mut addrs = self.empty();
        addrs.push(self.0);
        Ok(addrs)
    }
}

/// Whether `name` can be checked against a certificate (a DNS name or an
/// IP address): the agent API's TLS checks each agent against its host's
/// name.
pub fn valid_tls_name(name: &str) -> bool {
    tokio_rustls::rustls::pki_types::ServerName::try_from(name).is_ok()
}

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP listener whose connections come out of a TLS handshake that
/// required a client certificate signed by the CA (`axum::serve` takes
/// it). Handshakes run concurrently: a slow or silent client holds no one
/// else up.
#[derive(Debug)]
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `tcp` with `settings`' server side. Must be called
    /// inside a tokio runtime (it spawns the accepting task).
    pub fn new(tcp: TcpListener, settings: &TlsSettings) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(settings.server_config());
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            while !tx.is_closed() {
                let (sock, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors and the like: try again soon.
                        tracing::warn!(error = %e, "agent API: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, error = %e, "agent API: TLS handshake refused")
                        }
                        Err(_) => {
                            tracing::warn!(%peer, "agent API: TLS handshake timed out")
                        }
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task is gone (the runtime is shutting down).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
