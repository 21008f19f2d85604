//! `ferry completions SHELL` and `ferry man DIR` come from the clap
//! definitions, and `packaging/install.sh` installs them (into a DESTDIR).

use std::process::Command;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

#[test]
fn completions_and_man_pages_are_generated_and_installed() {
    let out = Command::new(FERRY)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let bash = String::from_utf8(out.stdout).unwrap();
    assert!(bash.contains("_ferry()"), "{bash}");
    assert!(bash.contains("rules"), "subcommands are completed");

    let out = Command::new(FERRY)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "an unknown shell is refused");

    let root = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/install.sh");
    let out = Command::new("sh")
        .arg(script)
        .arg(FERRY)
        .env("DESTDIR", root.path())
        .env("PREFIX", "/usr")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = |rel: &str| root.path().join(rel);
    for f in [
        "usr/bin/ferry",
        "etc/systemd/system/ferry-sched.service",
        "usr/share/bash-completion/completions/ferry",
        "usr/share/zsh/site-functions/_ferry",
        "usr/share/fish/vendor_completions.d/ferry.fish",
        "usr/share/man/man1/ferry.1",
        "usr/share/man/man1/ferry-sched-daemon.1",
        "etc/ferry/cluster.toml",
    ] {
        assert!(p(f).is_file(), "{f} not installed");
    }
    let man = std::fs::read_to_string(p("usr/share/man/man1/ferry-sched-daemon.1")).unwrap();
    assert!(man.starts_with(".ie") || man.contains(".TH"), "{man}");
    assert!(man.contains("config"), "the page documents --config");
}
