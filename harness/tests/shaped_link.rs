//! The bench's shaped links (`ferry bench compare --links 1gbit`): the
//! destination side in a network namespace of its own behind a shaped veth
//! pair, reachable from here, and gone afterwards on every path: when the
//! link is dropped, and when the process that made it is killed outright
//! (Ctrl-C or SIGKILL run no destructors).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_harness::bench::shaped_link::{interface_exists, ShapedLink};

const CHILD_ENV: &str = "FERRY_SHAPED_LINK_CHILD";

/// A link, or a loud SKIP (a failure under `FERRY_NO_SKIP=1`) where this
/// process may not create network namespaces and veth pairs.
fn link_or_skip(test: &str, bits_per_sec: u64) -> Option<ShapedLink> {
    match ShapedLink::create(bits_per_sec) {
        Ok(l) => Some(l),
        Err(e) => {
            assert!(
                std::env::var_os("FERRY_NO_SKIP").is_none(),
                "FERRY_NO_SKIP is set, so {test} may not skip: {e}"
            );
            eprintln!("SKIP {test}: {e} (needs root, iproute2 and veth)");
            None
        }
    }
}

fn wait_gone(name: &str) -> bool {
    let end = Instant::now() + Duration::from_secs(30);
    while interface_exists(name) {
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

#[test]
fn a_shaped_link_is_shaped_reachable_and_removed_when_dropped() {
    let Some(link) = link_or_skip(
        "a_shaped_link_is_shaped_reachable_and_removed_when_dropped",
        100_000_000,
    ) else {
        return;
    };
    let host_if = link.host_if().to_string();
    assert!(interface_exists(&host_if));
    // Reachable: the round-trip probe crossed the pair to a server inside.
    assert!(link.info().rtt_us.is_some(), "{}", link.describe());
    let qdisc = Command::new("tc")
        .args(["qdisc", "show", "dev", &host_if])
        .output()
        .unwrap();
    let qdisc = String::from_utf8_lossy(&qdisc.stdout);
    assert!(qdisc.contains("rate 100Mbit"), "{qdisc}");
    // A destination process runs inside: it sees only its own end and lo.
    let mut ip = Command::new("ip");
    ip.args(["-o", "link"]);
    link.enter(&mut ip);
    let inside = String::from_utf8_lossy(&ip.output().unwrap().stdout).into_owned();
    assert!(!inside.contains(&host_if), "{inside}");
    assert_eq!(inside.lines().count(), 2, "{inside}");
    drop(link);
    assert!(!interface_exists(&host_if), "{host_if} left behind");
}

/// Run by the next test in a child process: makes a link, says its name,
/// then waits to be killed.
#[test]
#[ignore = "the child of a_killed_harness_leaves_no_link_behind, run by it"]
fn child_holds_a_link_until_killed() {
    assert!(std::env::var_os(CHILD_ENV).is_some(), "run as a child only");
    let link = ShapedLink::create(1_000_000_000).expect("a link in the child");
    println!("LINK {}", link.host_if());
    std::thread::sleep(Duration::from_secs(120));
    drop(link);
}

#[test]
fn a_killed_harness_leaves_no_link_behind() {
    // Can this process make links at all?
    let Some(probe) = link_or_skip("a_killed_harness_leaves_no_link_behind", 1_000_000_000) else {
        return;
    };
    drop(probe);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_holds_a_link_until_killed",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut name = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("LINK ") {
            name = Some(n.to_string());
            break;
        }
    }
    let Some(name) = name else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the child made no link");
    };
    assert!(interface_exists(&name));
    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();
    assert!(
        wait_gone(&name),
        "{name} still exists 30 s after its maker died"
    );
}
