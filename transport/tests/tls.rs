//! Mutual TLS on real loopback lanes: good certificates connect; a wrong,
//! missing or unexpected certificate is refused during the handshake, before
//! any frame moves, with an error that says so.

use std::sync::Arc;
use std::thread;

use ferry_transport::tls::{
    add_certs, generate_cert_set, generate_certs, CertSet, GeneratedCerts, TlsError,
};
use ferry_transport::{
    FrameKind, LaneListener, LaneOptions, Lanes, Security, TlsFiles, TlsSettings, TransportError,
};

fn settings(set: &CertSet, node: usize, server_name: &str) -> Security {
    let (_, cert, key) = &set.nodes[node];
    Security::Tls(Arc::new(
        TlsSettings::from_pem(cert, key, &set.ca_pem, server_name).unwrap(),
    ))
}

/// Runs a listener with `server` and a 2-lane connect with `client`; returns
/// both outcomes (the listener's and the connector's).
fn session(
    server: Security,
    client: Security,
) -> (Result<Lanes, TransportError>, Result<Lanes, TransportError>) {
    let mut l = LaneListener::bind("127.0.0.1:0", LaneOptions::new(1, server)).unwrap();
    let addr = l.local_addr().unwrap();
    let c = thread::spawn(move || Lanes::connect(addr, &LaneOptions::new(2, client)));
    let s = l.accept_session();
    // A refused connector may still be waiting for its welcome: dropping the
    // listener's side (on error it is already gone) ends that wait.
    drop(l);
    (s, c.join().unwrap())
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[test]
fn certificates_from_one_ca_connect_and_carry_frames() {
    let set = generate_cert_set(&["source", "destination"]).unwrap();
    let (s, c) = session(settings(&set, 1, "ferry"), settings(&set, 0, "ferry"));
    let (mut s, mut c) = (s.unwrap().into_vec(), c.unwrap().into_vec());
    let page = vec![0x42u8; 1 << 20];
    let writer = thread::spawn(move || {
        for lane in &mut c {
            lane.writer
                .write_frame(FrameKind::PageBatch, 9, &page)
                .unwrap();
        }
        c
    });
    for lane in &mut s {
        let f = lane.reader.read_frame().unwrap();
        assert_eq!(
            (f.kind, f.flags, f.payload.len()),
            (FrameKind::PageBatch, 9, 1 << 20)
        );
        assert!(f.payload.iter().all(|&b| b == 0x42));
    }
    let mut c = writer.join().unwrap();
    // And back on the control lane.
    s[0].writer.write_frame(FrameKind::Running, 0, b"").unwrap();
    assert_eq!(c[0].reader.read_frame().unwrap().kind, FrameKind::Running);
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let good = generate_cert_set(&["destination"]).unwrap();
    let rogue = generate_cert_set(&["source"]).unwrap();
    // The rogue client trusts the good CA (so it accepts the server) but its
    // own certificate is signed by another CA.
    let (_, cert, key) = &rogue.nodes[0];
    let client = Security::Tls(Arc::new(
        TlsSettings::from_pem(cert, key, &good.ca_pem, "ferry").unwrap(),
    ));
    let (s, c) = session(settings(&good, 0, "ferry"), client);
    let s = s.unwrap_err();
    assert!(matches!(s, TransportError::Tls(_)), "{s:?}");
    assert!(chain(&s).contains("certificate"), "{}", chain(&s));
    let c = c.unwrap_err();
    assert!(matches!(c, TransportError::Refused(_)), "{c:?}");
    assert!(
        chain(&c).contains("does not accept this side's certificate"),
        "{}",
        chain(&c)
    );
}

#[test]
fn a_server_certificate_from_another_ca_is_refused() {
    let good = generate_cert_set(&["source"]).unwrap();
    let rogue = generate_cert_set(&["destination"]).unwrap();
    let (_, cert, key) = &rogue.nodes[0];
    let server = Security::Tls(Arc::new(
        TlsSettings::from_pem(cert, key, &good.ca_pem, "ferry").unwrap(),
    ));
    let (s, c) = session(server, settings(&good, 0, "ferry"));
    let c = c.unwrap_err();
    assert!(matches!(c, TransportError::Tls(_)), "{c:?}");
    assert!(
        chain(&c).contains("invalid peer certificate"),
        "{}",
        chain(&c)
    );
    assert!(s.is_err());
}

#[test]
fn a_server_certificate_for_another_name_is_refused() {
    let set = generate_cert_set(&["source", "destination"]).unwrap();
    let (s, c) = session(
        settings(&set, 1, "ferry"),
        settings(&set, 0, "elsewhere.example"),
    );
    let c = c.unwrap_err();
    assert!(chain(&c).contains("not valid for name"), "{}", chain(&c));
    assert!(s.is_err());
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let set = generate_cert_set(&["destination"]).unwrap();
    let mut l = LaneListener::bind(
        "127.0.0.1:0",
        LaneOptions::new(1, settings(&set, 0, "ferry")),
    )
    .unwrap();
    let addr = l.local_addr().unwrap();
    let ca = set.ca_pem.clone();
    let client = thread::spawn(move || {
        use std::io::{Read, Write};
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), "ferry".try_into().unwrap()).unwrap();
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        // The write may get through (TLS 1.3 finishes the client side first);
        // the read must fail with the server's alert.
        let _ = tls.write_all(b"anything");
        let mut buf = [0u8; 16];
        tls.read(&mut buf)
    });
    let s = l.accept_session().unwrap_err();
    assert!(chain(&s).contains("certificate"), "{}", chain(&s));
    let c = client.join().unwrap();
    assert!(
        c.is_err(),
        "client without certificate was not refused: {c:?}"
    );
}

#[test]
fn plaintext_and_tls_do_not_mix() {
    let set = generate_cert_set(&["source", "destination"]).unwrap();
    let (s, c) = session(settings(&set, 1, "ferry"), Security::Insecure);
    assert!(matches!(s, Err(TransportError::Tls(_))), "{s:?}");
    assert!(c.is_err());
    let (s, c) = session(Security::Insecure, settings(&set, 0, "ferry"));
    assert!(s.is_err());
    assert!(matches!(c, Err(TransportError::Tls(_))), "{c:?}");
}

#[test]
fn generated_files_load() {
    let dir = tempfile::tempdir().unwrap();
    let gen = generate_certs(dir.path(), &["source", "destination"]).unwrap();
    assert_eq!(gen.nodes.len(), 2);
    let files: &TlsFiles = &gen.nodes[0].1;
    TlsSettings::from_files(files, "ferry").unwrap();
    let mode = std::fs::metadata(&files.key).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077,
        0,
        "key readable by others"
    );
    let missing = TlsFiles {
        cert: dir.path().join("nope.pem"),
        ..files.clone()
    };
    let err = TlsSettings::from_files(&missing, "ferry").unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");
    let swapped = TlsFiles {
        cert: files.key.clone(),
        ..files.clone()
    };
    let err = TlsSettings::from_files(&swapped, "ferry").unwrap_err();
    assert!(err.to_string().contains("no PEM certificate"), "{err}");
}

#[test]
fn gen_certs_keeps_its_ca_adds_nodes_and_replaces_nothing_unasked() {
    let dir = tempfile::tempdir().unwrap();
    let first = add_certs(dir.path(), &["h1"], false).unwrap();
    let ca_pem = std::fs::read(&first.ca).unwrap();
    // A node added later is signed by the same CA: it and h1 talk.
    let later = add_certs(dir.path(), &["h2"], false).unwrap();
    assert_eq!(
        std::fs::read(&later.ca).unwrap(),
        ca_pem,
        "the CA was replaced"
    );
    let load = |g: &GeneratedCerts| {
        Security::Tls(Arc::new(
            TlsSettings::from_files(&g.nodes[0].1, "ferry").unwrap(),
        ))
    };
    let (s, c) = session(load(&first), load(&later));
    assert!(s.is_ok() && c.is_ok(), "{s:?} {c:?}");
    // Nothing existing is replaced without force, and nothing is written.
    let err = add_certs(dir.path(), &["h3", "h1"], false).unwrap_err();
    assert!(matches!(err, TlsError::Exists { .. }), "{err}");
    assert!(err.to_string().contains("h1.pem"), "{err}");
    assert!(
        !dir.path().join("h3.pem").exists(),
        "h3 written though refused"
    );
    // Duplicate or reserved names.
    let err = add_certs(dir.path(), &["h4", "h4"], false).unwrap_err();
    assert!(
        matches!(err, TlsError::DuplicateNode(ref n) if n == "h4"),
        "{err}"
    );
    assert!(matches!(
        add_certs(dir.path(), &["ca"], false),
        Err(TlsError::ReservedNode(_))
    ));
    // A CA without its key cannot sign new nodes.
    std::fs::remove_file(dir.path().join("ca.key")).unwrap();
    let err = add_certs(dir.path(), &["h5"], false).unwrap_err();
    assert!(matches!(err, TlsError::CaKeyMissing { .. }), "{err}");
    // --force: a new CA, every file replaced; h1 and h2 no longer talk.
    let new = add_certs(dir.path(), &["h1"], true).unwrap();
    assert_ne!(std::fs::read(&new.ca).unwrap(), ca_pem);
    assert!(
        dir.path().join("ca.key").exists(),
        "the new CA's key is kept"
    );
    let (s, c) = session(load(&new), load(&later));
    assert!(
        s.is_err() || c.is_err(),
        "a node of the old CA still talks to the new one"
    );
}
