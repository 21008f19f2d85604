//! `ferry migrate` over ferry lanes with mutual TLS, as real processes with
//! a real KVM guest: two lanes with certificates from `ferry tls gen-certs`
//! carry the guest; a destination whose certificate comes from another CA is
//! refused and the guest stays on the source; no security choice at all is
//! a clear error before anything happens.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use common::{assert_runs_on_destination, assert_runs_on_source, events, ferry, summary, Pair};
use ferry_control::{
    ControlError, Event, Greeting, GuestHome, MigrateRequest, Reply, Request, SecurityMode,
    SecuritySpec, PROTOCOL_VERSION,
};
use ferry_vm::testing::kvm_or_skip;

/// `ferry tls gen-certs DIR` (a CA, `source.*` and `destination.*`).
fn gen_certs(dir: &Path) {
    let out = ferry(&["tls", "gen-certs", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--tls-cert/--tls-key/--tls-ca` for node `node` of the set in `dir`.
fn tls_flags(dir: &Path, node: &str) -> Vec<String> {
    let f = |name: String| -> String { dir.join(name).to_str().unwrap().to_owned() };
    vec![
        "--tls-cert".into(),
        f(format!("{node}.pem")),
        "--tls-key".into(),
        f(format!("{node}.key")),
        "--tls-ca".into(),
        f("ca.pem".into()),
    ]
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A pair whose destination uses the `destination` certificate of the set
/// in `DIR/certs`.
fn tls_pair(mem: &str, rate: &str) -> (Pair, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    gen_certs(&certs);
    let p = Pair::start_secured(mem, rate, dir, |d| {
        tls_flags(&d.join("certs"), "destination")
    });
    (p, certs)
}

#[test]
fn two_lanes_over_mutual_tls_move_the_guest() {
    if !kvm_or_skip("two_lanes_over_mutual_tls_move_the_guest") {
        return;
    }
    let (mut p, certs) = tls_pair("128M", "5000");
    let mut args = vec!["--lanes", "2"];
    let flags = tls_flags(&certs, "source");
    args.extend(as_strs(&flags));
    let out = p.migrate_with(&args);
    assert!(
        out.status.success(),
        "{}\ndestination log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.log("dst")
    );
    let connected: Vec<_> = events(&out)
        .filter_map(|e| match e {
            Event::Connected {
                lanes, security, ..
            } => Some((lanes, security)),
            _ => None,
        })
        .collect();
    assert_eq!(connected, [(2, SecurityMode::Tls)]);
    let summary = summary(&out);
    assert!(summary.rounds >= 1, "{summary:?}");
    assert_runs_on_destination(&mut p);
}

/// Sends one control-socket request as it is (no client-side checks) and
/// returns the error it must end with.
fn refused_request(api: &Path, req: &Request) -> ControlError {
    let mut conn = UnixStream::connect(api).unwrap();
    let mut line = serde_json::to_vec(req).unwrap();
    line.push(b'\n');
    conn.write_all(&line).unwrap();
    let mut lines = BufReader::new(conn).lines().map(Result::unwrap);
    let greeting: Greeting = serde_json::from_str(&lines.next().expect("a greeting")).unwrap();
    assert_eq!(
        greeting.ferry_control, PROTOCOL_VERSION,
        "the greeting comes first"
    );
    let last = lines.last().expect("a reply");
    match serde_json::from_str(&last).unwrap() {
        Reply::Error(e) => e,
        other => panic!("{req:?} was not refused: {other:?}"),
    }
}

/// A migrate request to `to` with these lanes and security, nothing else.
fn migrate_request(to: &str, lanes: Option<u16>, security: Option<SecuritySpec>) -> Request {
    Request::Migrate(Box::new(MigrateRequest {
        to: to.to_owned(),
        lanes,
        security,
        limits: Default::default(),
        workers: None,
        xor_cache_bytes: None,
        compress: None,
        on_deadline: None,
        converge: None,
    }))
}

#[test]
fn a_destination_from_another_ca_is_refused_and_the_guest_stays() {
    if !kvm_or_skip("a_destination_from_another_ca_is_refused_and_the_guest_stays") {
        return;
    }
    let (mut p, good) = tls_pair("64M", "2000");
    let other = p.dir.path().join("other-ca");
    gen_certs(&other);

    // The source trusts another CA: the destination's certificate is refused.
    let mut args = vec!["--lanes", "2"];
    let flags = tls_flags(&other, "source");
    args.extend(as_strs(&flags));
    let out = p.migrate_with(&args);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to the destination")
            && err.contains("certificate")
            && err.contains("still running on the source"),
        "{err}"
    );
    assert!(
        !events(&out).any(|e| matches!(e, Event::Connected { .. })),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_runs_on_source(&p);

    // Plaintext against a TLS destination: refused, and the message says
    // both ends must choose alike.
    let out = p.migrate(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("same security choice") && err.contains("still running on the source"),
        "{err}"
    );
    assert_runs_on_source(&p);

    // A request that chooses no security is refused by the source itself.
    let e = refused_request(&p.api("src"), &migrate_request(&p.addr, None, None));
    assert!(e.message.contains("no security"), "{e:?}");
    assert_eq!(e.guest, Some(GuestHome::Here), "{e:?}");
    let e = refused_request(
        &p.api("src"),
        &migrate_request(&p.addr, Some(0), Some(SecuritySpec::Insecure)),
    );
    assert!(e.message.contains("want 1 to 64"), "{e:?}");
    assert_runs_on_source(&p);

    // The refused stranger did not end the destination: the right
    // certificates still bring the guest over.
    assert!(p.dst.is_running(), "{}", p.log("dst"));
    assert!(
        p.log("dst").contains("refused a connection"),
        "{}",
        p.log("dst")
    );
    let flags = tls_flags(&good, "source");
    let out = p.migrate_with(&as_strs(&flags));
    assert!(
        out.status.success(),
        "{}\ndestination log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.log("dst")
    );
    assert_runs_on_destination(&mut p);
}

#[test]
fn no_security_choice_is_a_clear_error() {
    let both = |err: &str| {
        err.contains("--insecure") && err.contains("--tls-cert") && err.contains("gen-certs")
    };
    // ferry migrate: refused before the source is even asked.
    let out = ferry(&[
        "migrate",
        "--api",
        "/nonexistent/ferry.sock",
        "--to",
        "127.0.0.1:1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(both(&err), "{err}");
    assert!(!err.contains("cannot reach"), "{err}");

    // ferry vm receive: refused before it listens or prepares memory.
    let port = common::free_port().to_string();
    let addr = format!("127.0.0.1:{port}");
    let out = ferry(&["vm", "receive", "--listen", &addr, "--mem", "64M"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(both(&err), "{err}");

    // Half the TLS flags name the missing ones.
    let out = ferry(&[
        "vm",
        "receive",
        "--listen",
        &addr,
        "--tls-cert",
        "/tmp/c.pem",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-key and --tls-ca missing"), "{err}");

    // --insecure and TLS files contradict each other: a usage error.
    let out = ferry(&[
        "migrate",
        "--api",
        "/nonexistent/ferry.sock",
        "--to",
        "127.0.0.1:1",
        "--insecure",
        "--tls-ca",
        "/tmp/ca.pem",
    ]);
    assert_eq!(out.status.code(), Some(2));
}
