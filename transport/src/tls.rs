//! Mutual TLS for lanes (rustls, ring provider).
//!
//! Both sides present a certificate from PEM files and verify the peer's
//! against a CA file: the connecting side checks the listener's certificate
//! (and its name, [`TlsSettings::server_name`]), the listener requires and
//! checks the connecting side's (`WebPkiClientVerifier`). A missing or wrong
//! certificate fails the TLS handshake, before any frame is exchanged.
//!
//! A TLS session is one state machine shared by a reading and a writing half
//! ([`split`]), so one thread can receive while another sends. Socket writes
//! happen outside the state-machine lock: a writer blocked on a full socket
//! never stops the reader from draining its side.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};

/// The name a listener's certificate must carry when no other is configured.
/// [`generate_certs`] puts it in every certificate it issues.
pub const DEFAULT_SERVER_NAME: &str = "ferry";

/// What went wrong setting up or running TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("could not read {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A PEM file is malformed.
    #[error("{path} is not valid PEM")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM file holds no certificate.
    #[error("{path} holds no PEM certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A PEM file holds no private key.
    #[error("{path} holds no PEM private key")]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The CA file's certificates could not be used as trust roots.
    #[error("the CA certificate cannot be used as a trust root")]
    BadCa(#[source] rustls::Error),
    /// The name to verify the listener against is not a valid DNS name or IP.
    #[error("{0:?} is not a valid server name")]
    BadServerName(String),
    /// Building the client or server configuration failed (e.g. key does not match).
    #[error("invalid TLS configuration")]
    Config(#[source] rustls::Error),
    /// Building the client-certificate verifier failed.
    #[error("invalid client verifier configuration")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The TLS handshake with the peer failed (certificate refused, protocol error, timeout).
    #[error("TLS handshake with the peer failed")]
    Handshake(#[source] io::Error),
    /// Generating certificates failed.
    #[error("could not generate certificates")]
    Generate(#[source] rcgen::Error),
    /// A node name was given twice.
    #[error("node name {0:?} given twice")]
    DuplicateNode(String),
    /// A node name would take the CA's files.
    #[error("node name {0:?} is reserved for the CA's files")]
    ReservedNode(String),
    /// A file to write exists already (overwriting needs `force`).
    #[error("{path} exists already (give --force to replace it; replacing the CA means making every node's certificate again)")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A CA certificate is there without the key that signs with it.
    #[error("{ca} exists without its key {key}: new nodes cannot be signed by it (give --force for a new CA and make every node's certificate again)")]
    CaKeyMissing {
        /// The CA certificate.
        ca: PathBuf,
        /// Its missing key.
        key: PathBuf,
    },
    /// Writing a generated file failed.
    #[error("could not write {path}")]
    WriteFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Paths of this side's certificate, its key, and the CA that signs peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain presented to the peer.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA certificate(s) the peer's certificate must chain to.
    pub ca: PathBuf,
}

/// Ready-to-use client and server configurations for mutual TLS.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    server_name: ServerName<'static>,
    cert: Vec<CertificateDer<'static>>,
    /// The key, and the PEM text it was parsed from.
    key: Arc<(PrivateKeyDer<'static>, Vec<u8>)>,
    ca: Vec<CertificateDer<'static>>,
}

/// The crypto provider every ferry TLS configuration uses (ring), for
/// other TLS stacks built from a [`TlsSettings`]'s material.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| TlsError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
    Ok(bytes)
}

fn parse_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_owned(),
        },
        source => TlsError::Pem {
            path: path.to_owned(),
            source,
        },
    })
}

impl TlsSettings {
    /// Loads certificate, key and CA from PEM files; the listener's
    /// certificate must be valid for `server_name`.
    pub fn from_files(files: &TlsFiles, server_name: &str) -> Result<TlsSettings, TlsError> {
        let cert = parse_certs(&read_file(&files.cert)?, &files.cert)?;
        let key_pem = read_file(&files.key)?;
        let key = parse_key(&key_pem, &files.key)?;
        let ca = parse_certs(&read_file(&files.ca)?, &files.ca)?;
        TlsSettings::new(cert, (key, key_pem), ca, server_name)
    }

    /// From PEM text already in memory (the `&str`s name the sources in errors).
    pub fn from_pem(
        cert: &str,
        key: &str,
        ca: &str,
        server_name: &str,
    ) -> Result<TlsSettings, TlsError> {
        let cert = parse_certs(cert.as_bytes(), Path::new("<certificate>"))?;
        let key = (
            parse_key(key.as_bytes(), Path::new("<key>"))?,
            key.as_bytes().to_vec(),
        );
        let ca = parse_certs(ca.as_bytes(), Path::new("<ca>"))?;
        TlsSettings::new(cert, key, ca, server_name)
    }

    fn new(
        cert: Vec<CertificateDer<'static>>,
        (key, key_pem): (PrivateKeyDer<'static>, Vec<u8>),
        ca: Vec<CertificateDer<'static>>,
        server_name: &str,
    ) -> Result<TlsSettings, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in &ca {
            roots.add(c.clone()).map_err(TlsError::BadCa)?;
        }
        let roots = Arc::new(roots);
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| TlsError::BadServerName(server_name.to_owned()))?;

        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_root_certificates(Arc::clone(&roots))
            .with_client_auth_cert(cert.clone(), key.clone_key())
            .map_err(TlsError::Config)?;
        let material = (cert.clone(), Arc::new((key.clone_key(), key_pem)));

        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(TlsError::Verifier)?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(cert, key)
            .map_err(TlsError::Config)?;

        // No TLS 1.3 session tickets: ferry never resumes sessions, and a
        // ticket left unread on a send-only lane would make closing that
        // lane reset the connection (unread data) and lose the peer's tail.
        let mut server = server;
        server.send_tls13_tickets = 0;
        Ok(TlsSettings {
            client: Arc::new(client),
            server: Arc::new(server),
            server_name,
            cert: material.0,
            key: material.1,
            ca,
        })
    }

    /// The listener's configuration (requires and verifies a client
    /// certificate), for servers on other stacks (the agent's HTTPS API).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.server)
    }

    /// This side's certificate chain, as loaded.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.cert
    }

    /// This side's private key, as loaded.
    pub fn private_key(&self) -> &PrivateKeyDer<'static> {
        &self.key.0
    }

    /// The PEM text [`TlsSettings::private_key`] was parsed from, for TLS
    /// stacks that take a key only as PEM.
    pub fn private_key_pem(&self) -> &[u8] {
        &self.key.1
    }

    /// The CA certificates peers must chain to, as loaded.
    pub fn ca_certs(&self) -> &[CertificateDer<'static>] {
        &self.ca
    }

    /// The name the listener's certificate is checked against.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }

    /// Runs the client handshake on `stream` and splits the session.
    pub fn connect(&self, stream: TcpStream) -> Result<(TlsReader, TlsWriter), TlsError> {
        let conn = ClientConnection::new(Arc::clone(&self.client), self.server_name.clone())
            .map_err(TlsError::Config)?;
        handshake(Connection::Client(conn), stream)
    }

    /// Runs the server handshake on `stream` and splits the session.
    pub fn accept(&self, stream: TcpStream) -> Result<(TlsReader, TlsWriter), TlsError> {
        let conn = ServerConnection::new(Arc::clone(&self.server)).map_err(TlsError::Config)?;
        handshake(Connection::Server(conn), stream)
    }
}

fn handshake(
    mut conn: Connection,
    mut stream: TcpStream,
) -> Result<(TlsReader, TlsWriter), TlsError> {
    let mut run = || -> io::Result<()> {
        while conn.is_handshaking() {
            conn.complete_io(&mut stream)?;
        }
        // Send anything still queued (the client's last flight).
        while conn.wants_write() {
            conn.write_tls(&mut stream)?;
        }
        Ok(())
    };
    if let Err(e) = run() {
        // rustls queued an alert saying why and complete_io tried to send it.
        // Close gracefully so the peer reads that alert rather than a reset:
        // end our direction, then drain what the peer had in flight.
        linger_close(&mut stream);
        return Err(TlsError::Handshake(e));
    }
    split(conn, stream).map_err(TlsError::Handshake)
}

/// Half-closes `stream` and discards input until the peer closes (at most 2 s).
fn linger_close(stream: &mut TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    let mut sink = [0u8; 4096];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
}

struct Shared {
    conn: Mutex<Connection>,
    /// Serialises socket writes; taken while `conn` is held, released after
    /// the (possibly blocking) socket write, with `conn` already released.
    socket_out: Mutex<TcpStream>,
}

impl Drop for Shared {
    /// Both halves are gone: discard whatever the peer sent that nobody read
    /// (a close_notify, say) so closing the socket sends FIN, not a reset
    /// that could destroy data the peer has not read yet.
    fn drop(&mut self) {
        let mut socket = lock(&self.socket_out);
        if socket.set_nonblocking(true).is_ok() {
            let mut sink = [0u8; 4096];
            while matches!(socket.read(&mut sink), Ok(n) if n > 0) {}
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Moves queued TLS records to the socket. Called with `conn` locked;
    /// releases it before writing.
    fn flush_tls(&self, mut conn: MutexGuard<'_, Connection>) -> io::Result<()> {
        let mut records = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut records)?;
        }
        if records.is_empty() {
            return Ok(());
        }
        let mut out = lock(&self.socket_out);
        drop(conn);
        out.write_all(&records)
    }
}

/// Splits an established TLS session into a reading and a writing half.
fn split(conn: Connection, stream: TcpStream) -> io::Result<(TlsReader, TlsWriter)> {
    let socket_in = stream.try_clone()?;
    let shared = Arc::new(Shared {
        conn: Mutex::new(conn),
        socket_out: Mutex::new(stream),
    });
    Ok((
        TlsReader {
            shared: Arc::clone(&shared),
            socket: socket_in,
            buf: vec![0; 64 << 10],
            start: 0,
            end: 0,
            eof: false,
        },
        TlsWriter { shared },
    ))
}

/// The reading half of a TLS session.
pub struct TlsReader {
    shared: Arc<Shared>,
    socket: TcpStream,
    /// Records read from the socket, `start..end` not yet given to rustls.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The socket reached its end.
    eof: bool,
}

impl std::fmt::Debug for TlsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsReader")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let mut conn = lock(&self.shared.conn);
            match conn.reader().read(out) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.start < self.end || self.eof {
                // Feed one chunk of records, then look for plaintext again.
                let mut records = &self.buf[self.start..self.end];
                let fed = conn.read_tls(&mut records)?;
                self.start += fed;
                if let Err(e) = conn.process_new_packets() {
                    // Try to tell the peer why (an alert), then fail.
                    let _ = self.shared.flush_tls(conn);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
                if self.eof && self.start == self.end {
                    // rustls has seen the end: reader() now says clean close
                    // (close_notify) or UnexpectedEof (truncation).
                    return match conn.reader().read(out) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                        r => r,
                    };
                }
                if conn.wants_write() {
                    self.shared.flush_tls(conn)?;
                }
                continue;
            }
            drop(conn);
            // Nothing buffered: wait for records without holding the lock.
            let n = loop {
                match self.socket.read(&mut self.buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r?,
                }
            };
            self.start = 0;
            self.end = n;
            self.eof = n == 0;
        }
    }
}

/// The writing half of a TLS session.
pub struct TlsWriter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TlsWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsWriter").finish_non_exhaustive()
    }
}

impl TlsWriter {
    /// Sends close_notify: the peer reads a clean end of stream.
    pub fn close(&mut self) -> io::Result<()> {
        let mut conn = lock(&self.shared.conn);
        conn.send_close_notify();
        self.shared.flush_tls(conn)
    }
}

impl Drop for TlsWriter {
    /// Dropping the writing half ends the stream cleanly for the peer
    /// (close_notify); without it the peer sees a truncation.
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut conn = lock(&self.shared.conn);
        let n = conn.writer().write_vectored(bufs)?;
        self.shared.flush_tls(conn)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let conn = lock(&self.shared.conn);
        self.shared.flush_tls(conn)
    }
}

/// Files written by [`generate_certs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedCerts {
    /// The CA certificate both sides trust.
    pub ca: PathBuf,
    /// Per node name: its certificate, key and the CA, ready for [`TlsSettings::from_files`].
    pub nodes: Vec<(String, TlsFiles)>,
}

/// PEM text of a CA and of node certificates it signed, each valid as both
/// TLS server and client for [`DEFAULT_SERVER_NAME`], `localhost`, `127.0.0.1`
/// and its own name. For tests and `ferry tls gen-certs`.
#[derive(Debug, Clone)]
pub struct CertSet {
    /// CA certificate, PEM.
    pub ca_pem: String,
    /// The CA's private key, PEM, when the CA was made here.
    pub ca_key_pem: Option<String>,
    /// (node name, certificate PEM, key PEM).
    pub nodes: Vec<(String, String, String)>,
}

/// Generates a fresh CA and one certificate + key per node name.
pub fn generate_cert_set(node_names: &[&str]) -> Result<CertSet, TlsError> {
    let ca_key = rcgen::KeyPair::generate().map_err(TlsError::Generate)?;
    let mut set = sign_cert_set(&ca_key, node_names)?;
    set.ca_key_pem = Some(ca_key.serialize_pem());
    Ok(set)
}

/// The CA certificate of `ca_key` (the same subject and key every time, so
/// certificates it signs chain to the `ca.pem` written when it was made)
/// and one certificate + key per node name signed by it.
fn sign_cert_set(ca_key: &rcgen::KeyPair, node_names: &[&str]) -> Result<CertSet, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(TlsError::Generate)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ferry CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(ca_key).map_err(TlsError::Generate)?;
    let mut nodes = Vec::new();
    for name in node_names {
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let mut sans = vec![
            DEFAULT_SERVER_NAME.to_owned(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        if !sans.iter().any(|s| s == name) {
            sans.push((*name).to_owned());
        }
        let mut params = CertificateParams::new(sans).map_err(TlsError::Generate)?;
        params.distinguished_name.push(DnType::CommonName, *name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params
            .signed_by(&key, &ca, ca_key)
            .map_err(TlsError::Generate)?;
        nodes.push(((*name).to_owned(), cert.pem(), key.serialize_pem()));
    }
    Ok(CertSet {
        ca_pem: ca.pem(),
        ca_key_pem: None,
        nodes,
    })
}

/// Writes a fresh CA (`ca.pem`, its key `ca.key`) and `NAME.pem` /
/// `NAME.key` per node into `dir` (created if missing), replacing what is
/// there: for tests. `ferry tls gen-certs` uses [`add_certs`].
pub fn generate_certs(dir: &Path, node_names: &[&str]) -> Result<GeneratedCerts, TlsError> {
    add_certs(dir, node_names, true)
}

/// `ferry tls gen-certs`: certificates for `node_names` in `dir` (created
/// if missing), signed by the CA there (`ca.pem` with its key `ca.key`, so
/// nodes can be added later) or by a new one written there when there is
/// none. Without `force` no existing file is replaced: a node's files, or a
/// CA certificate whose key is gone, are refused with the file named; with
/// `force` a new CA is made and every file replaced. A node name given twice,
/// or named `ca`, is refused.
pub fn add_certs(dir: &Path, node_names: &[&str], force: bool) -> Result<GeneratedCerts, TlsError> {
    for (i, name) in node_names.iter().enumerate() {
        if node_names[..i].contains(name) {
            return Err(TlsError::DuplicateNode((*name).to_owned()));
        }
        if *name == "ca" {
            return Err(TlsError::ReservedNode((*name).to_owned()));
        }
    }
    let (ca_path, ca_key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    let kept_ca = if force || !ca_path.exists() {
        None
    } else if !ca_key_path.exists() {
        return Err(TlsError::CaKeyMissing {
            ca: ca_path,
            key: ca_key_path,
        });
    } else {
        let pem = std::fs::read_to_string(&ca_key_path).map_err(|source| TlsError::ReadFile {
            path: ca_key_path.clone(),
            source,
        })?;
        Some(
            rcgen::KeyPair::from_pem(&pem).map_err(|_| TlsError::NoPrivateKey {
                path: ca_key_path.clone(),
            })?,
        )
    };
    if !force {
        for name in node_names {
            for ext in ["pem", "key"] {
                let path = dir.join(format!("{name}.{ext}"));
                if path.exists() {
                    return Err(TlsError::Exists { path });
                }
            }
        }
    }
    let set = match &kept_ca {
        Some(key) => sign_cert_set(key, node_names)?,
        None => generate_cert_set(node_names)?,
    };
    let write = |path: PathBuf, text: &str| -> Result<PathBuf, TlsError> {
        std::fs::create_dir_all(dir)
            .and_then(|()| write_private(&path, text.as_bytes()))
            .map_err(|source| TlsError::WriteFile {
                path: path.clone(),
                source,
            })?;
        Ok(path)
    };
    let ca = match &set.ca_key_pem {
        Some(key) => {
            write(ca_key_path, key)?;
            write(ca_path, &set.ca_pem)?
        }
        None => ca_path,
    };
    let mut nodes = Vec::new();
    for (name, cert, key) in &set.nodes {
        let files = TlsFiles {
            cert: write(dir.join(format!("{name}.pem")), cert)?,
            key: write(dir.join(format!("{name}.key")), key)?,
            ca: ca.clone(),
        };
        nodes.push((name.clone(), files));
    }
    Ok(GeneratedCerts { ca, nodes })
}

/// Writes a file readable by its owner only (keys are secrets).
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(test)]
mod pem_tests {
    use super::*;

    #[test]
    fn bad_pem_is_refused_with_the_file_named() {
        let p = Path::new("x.pem");
        assert!(matches!(
            parse_certs(b"nothing here", p),
            Err(TlsError::NoCertificate { .. })
        ));
        assert!(matches!(
            parse_key(b"", p),
            Err(TlsError::NoPrivateKey { .. })
        ));
        let broken = b"-----BEGIN PRIVATE KEY-----\n!!!not base64!!!\n-----END PRIVATE KEY-----\n";
        let e = parse_key(broken, p).unwrap_err();
        assert!(matches!(e, TlsError::Pem { .. }), "{e:?}");
        assert_eq!(e.to_string(), "x.pem is not valid PEM");
        let unterminated = b"-----BEGIN CERTIFICATE-----\nMIIB\n";
        assert!(matches!(
            parse_certs(unterminated, p),
            Err(TlsError::Pem { .. })
        ));
    }
}
