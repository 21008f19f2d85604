//! The host lease keeper: keeps a lease alive past its TTL, and, cut off
//! from etcd by a TCP proxy the test closes, fences its host before the
//! lease expires as another etcd client sees it.

use std::time::Duration;

use ferry_scheduler::ha::lease_keeper::{
    FenceEvent, FenceMode, KeeperConfig, KeeperState, LeaseKeeper,
};
use ferry_scheduler::store::ClusterStore;

fn config() -> KeeperConfig {
    KeeperConfig {
        ttl: Duration::from_secs(3),
        margin: Duration::from_millis(1500),
        renew_every: Duration::from_millis(300),
        retry_every: Duration::from_millis(100),
        mode: FenceMode::Kill,
    }
}

#[test]
fn a_kept_lease_outlives_its_ttl_and_leave_ends_it() {
    let store = ClusterStore::in_memory();
    let keeper = LeaseKeeper::start(
        store.clone(),
        "h1",
        config(),
        Box::new(|e: &FenceEvent| panic!("fenced while reachable: {e:?}")),
    )
    .unwrap();

    std::thread::sleep(config().ttl * 2);

    assert_eq!(keeper.state(), KeeperState::Alive);
    assert!(store.host_alive("h1").unwrap());
    keeper.leave().unwrap();
    assert!(!store.host_alive("h1").unwrap());
}

#[test]
fn impossible_timings_are_refused() {
    let store = ClusterStore::in_memory();
    let bad = KeeperConfig {
        margin: Duration::from_secs(3),
        ..config()
    };
    let err =
        LeaseKeeper::start(store.clone(), "h1", bad, Box::new(|_: &FenceEvent| {})).unwrap_err();
    assert!(err.to_string().contains("margin"), "{err}");
    assert!(!store.host_alive("h1").unwrap(), "nothing joined");
    assert!("reboot".parse::<FenceMode>().is_err());
    assert_eq!("pause".parse::<FenceMode>().unwrap(), FenceMode::Pause);
}

/// The keeper talks to etcd through a proxy; an observer talks directly.
/// When the proxy is cut, the keeper fences while the observer still sees
/// the lease alive, and the observer sees it expire only afterwards.
#[cfg(feature = "etcd")]
#[test]
fn cut_off_from_etcd_the_keeper_fences_before_its_lease_expires() {
    use std::sync::mpsc;
    use std::time::Instant;

    use ferry_e2e::etcd::{etcd_or_skip, EtcdCluster};
    use ferry_e2e::tcp_proxy::TcpProxy;
    use ferry_scheduler::ha::lease_keeper::FenceReason;
    use ferry_scheduler::store::etcd::EtcdOptions;

    let Some(bin) = etcd_or_skip("cut_off_from_etcd_the_keeper_fences_before_its_lease_expires")
    else {
        return;
    };
    let etcd = EtcdCluster::start(&bin, "cluster-keeper", 1).unwrap();
    let proxy = TcpProxy::start(etcd.members[0].client).unwrap();
    let opts = EtcdOptions {
        op_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(300),
    };
    let through_proxy = ClusterStore::on_etcd(&[proxy.url()], opts, "/ferry/").unwrap();
    let observer = ClusterStore::on_etcd(&etcd.endpoints(), opts, "/ferry/").unwrap();
    let (fenced_tx, fenced_rx) = mpsc::channel();
    let fence = {
        let observer = observer.clone();
        Box::new(move |e: &FenceEvent| {
            // What the rest of the cluster sees at the moment of fencing.
            let alive = observer.host_alive(&e.host).unwrap();
            fenced_tx.send((e.clone(), alive, Instant::now())).unwrap();
        })
    };
    let keeper = LeaseKeeper::start(through_proxy, "h1", config(), fence).unwrap();
    std::thread::sleep(config().ttl);
    assert_eq!(
        keeper.state(),
        KeeperState::Alive,
        "renewals through the proxy work"
    );

    proxy.cut();
    let event = keeper
        .wait_fenced(Duration::from_secs(20))
        .expect("the keeper fenced");
    let (seen, alive_at_fence, fenced_at) = fenced_rx.recv().unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while observer.host_alive("h1").unwrap() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let expired_at = Instant::now();

    assert_eq!(seen, event);
    assert_eq!((event.host.as_str(), event.mode), ("h1", FenceMode::Kill));
    assert!(
        matches!(event.reason, FenceReason::RenewalsFailed { .. }),
        "{event:?}"
    );
    assert!(
        alive_at_fence,
        "the lease had already expired when the keeper fenced"
    );
    assert!(
        !observer.host_alive("h1").unwrap(),
        "the lease never expired"
    );
    assert!(expired_at > fenced_at);
    assert!(matches!(keeper.state(), KeeperState::Fenced(_)));
}
