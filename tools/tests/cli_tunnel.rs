//! `ferry tunnel source|destination` as processes: a stock QEMU migration
//! of the workload guest (`migrate unix:PATH`) rides ferry lanes.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_e2e::process::ProcessGuard;
use ferry_e2e::qemu::{qemu_unavailable, QemuConfig, QemuGuest};
use ferry_e2e::qmp::{guest_status, Migrate, MigrateSetParameters, MigrationStatus};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

fn qemu(dir: &Path, name: &str, incoming: Option<&str>) -> QemuGuest {
    let tsc = ferry_vm::host_tsc_khz().unwrap();
    let cfg = QemuConfig {
        kernel: ferry_vm::guest_elf_path().to_owned(),
        mem_mib: 256,
        append: format!("rate=5000 tsc_khz={tsc} wss=64 verify=64"),
        incoming: incoming.map(Into::into),
        cpus: 1,
    };
    QemuGuest::start(name, &cfg, dir).unwrap()
}

fn wait_file(p: &Path, who: &mut ProcessGuard) {
    let start = Instant::now();
    while !p.exists() {
        assert!(who.is_running(), "{} exited", who.name());
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn qemu_migrates_through_ferry_tunnel_processes() {
    if let Some(why) = qemu_unavailable() {
        assert!(
            std::env::var_os("FERRY_NO_SKIP").is_none(),
            "FERRY_NO_SKIP is set, so this test may not skip"
        );
        eprintln!("SKIPPED: qemu_migrates_through_ferry_tunnel_processes: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src_sock, dst_sock) = (d.join("src-tunnel.sock"), d.join("dst-incoming.sock"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");

    let mut src = qemu(d, "src", None);
    let mut dst = qemu(d, "dst", Some(&format!("unix:{}", dst_sock.display())));
    wait_file(&dst_sock, &mut dst.process);
    let mut tun_dst = ProcessGuard::spawn(
        "tunnel-destination",
        Command::new(FERRY)
            .args([
                "tunnel",
                "destination",
                "--insecure",
                "--lz4",
                "--listen",
                &addr,
                "--connect-unix",
            ])
            .arg(&dst_sock),
        &d.join("tun-dst.log"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        tun_dst.is_running(),
        "{}",
        std::fs::read_to_string(d.join("tun-dst.log")).unwrap_or_default()
    );
    let mut tun_src = ProcessGuard::spawn(
        "tunnel-source",
        Command::new(FERRY)
            .args([
                "tunnel",
                "source",
                "--insecure",
                "--lz4",
                "--lanes",
                "2",
                "--to",
                &addr,
                "--listen-unix",
            ])
            .arg(&src_sock),
        &d.join("tun-src.log"),
    )
    .unwrap();
    wait_file(&src_sock, &mut tun_src);

    let before = src.wait_running(1, Duration::from_secs(60)).unwrap();
    src.qmp
        .run(&MigrateSetParameters {
            max_bandwidth: Some(8 << 30),
            ..Default::default()
        })
        .unwrap();
    src.qmp
        .run(&Migrate {
            uri: &format!("unix:{}", src_sock.display()),
        })
        .unwrap();
    let r = src.qmp.wait_migration(Duration::from_secs(180)).unwrap();
    assert_eq!(
        r.status,
        Some(MigrationStatus::Completed),
        "{r:?}\n{}",
        std::fs::read_to_string(d.join("tun-src.log")).unwrap_or_default()
    );
    let start = Instant::now();
    let first = loop {
        let s = guest_status(&mut dst.qmp).unwrap();
        if s.heartbeat > before {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "destination heartbeat never moved past {before}: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(500));
    let later = guest_status(&mut dst.qmp).unwrap();
    assert_eq!(later.phase, 2);
    assert!(later.heartbeat > first.heartbeat);
    assert!(later.pages_dirtied > first.pages_dirtied);
    assert_eq!(later.verify_errors, 0);
}

#[test]
fn tunnel_without_security_choice_is_refused() {
    let out = Command::new(FERRY)
        .args([
            "tunnel",
            "destination",
            "--listen",
            "127.0.0.1:0",
            "--connect-unix",
            "/tmp/x.sock",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--insecure") && err.contains("gen-certs"),
        "{err}"
    );
}
