//! `ferry agent --etcd` cut off from etcd (a TCP proxy between it and etcd
//! that the test closes) but not from its VM: the agent pauses its VM
//! while its lease is still alive as another etcd client sees it, and the
//! lease expires only afterwards. Real etcd, a real agent process, a real
//! KVM guest; every process is killed on every path.

#![cfg(feature = "etcd")]

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_e2e::etcd::{etcd_or_skip, free_port, EtcdCluster};
use ferry_e2e::process::ProcessGuard;
use ferry_e2e::tcp_proxy::TcpProxy;
use ferry_scheduler::daemon::client::JsonClient;
use ferry_scheduler::daemon::protocol::AgentStatus;
use ferry_scheduler::store::{etcd::EtcdOptions, ClusterStore, DEFAULT_PREFIX};
use ferry_vm::testing::kvm_or_skip;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const HOST: &str = "fence-h1";

fn status(addr: SocketAddr) -> Option<AgentStatus> {
    JsonClient::new(&addr.to_string(), Some(Duration::from_secs(2)))
        .get::<AgentStatus>("/v1/status")
        .ok()
}

fn web_running(addr: SocketAddr) -> Option<bool> {
    status(addr).map(|s| s.vms.iter().any(|v| v.name == "web" && v.running))
}

#[test]
fn an_agent_cut_off_from_etcd_pauses_its_vms_before_its_lease_expires() {
    let test = "an_agent_cut_off_from_etcd_pauses_its_vms_before_its_lease_expires";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(bin) = etcd_or_skip(test) else {
        return;
    };
    let etcd = EtcdCluster::start(&bin, "cluster-agent-fence", 1).unwrap();
    let proxy = TcpProxy::start(etcd.members[0].client).unwrap();
    let observer =
        ClusterStore::on_etcd(&etcd.endpoints(), EtcdOptions::default(), DEFAULT_PREFIX).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let mut agent = ProcessGuard::spawn(
        "agent",
        Command::new(FERRY).args([
            "agent",
            "--host",
            HOST,
            "--listen",
            &listen.to_string(),
            "--vm",
            "web:64",
            "--insecure",
            "--etcd",
            &proxy.url(),
            "--lease-ttl",
            "3s",
            "--fence",
            "pause",
        ]),
        &dir.path().join("agent.log"),
    )
    .unwrap();
    let start = Instant::now();
    while web_running(listen) != Some(true) {
        assert!(agent.is_running(), "the agent exited: see {:?}", dir.path());
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the agent never ran web"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(observer.host_alive(HOST).unwrap(), "the agent joined");

    proxy.cut();
    // Poll both views until the lease is gone. Never may web run after
    // the lease was seen gone; web must be seen paused before the lease
    // was seen gone.
    let mut paused_while_alive = false;
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let alive_before = observer.host_alive(HOST).unwrap();
        let running = web_running(listen).expect("the agent answers");
        let alive_after = observer.host_alive(HOST).unwrap();
        assert!(
            alive_before || !running,
            "web ran after its host's lease expired"
        );
        paused_while_alive |= !running && alive_after;
        if !alive_after {
            break;
        }
        assert!(Instant::now() < end, "the lease never expired");
        std::thread::sleep(Duration::from_millis(20));
    }

    assert!(
        paused_while_alive,
        "web was never seen paused while the lease lived"
    );
    let s = status(listen).unwrap();
    assert_eq!(s.vms.len(), 1, "pause keeps the VM (and its memory)");
    assert!(agent.is_running());
}
