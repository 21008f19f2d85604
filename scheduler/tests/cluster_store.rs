//! The cluster store's conformance suite, run against every backend: in
//! memory always, on a real etcd member (started here on loopback ports,
//! killed on every path) with `--features etcd`. Each behaviour is one
//! function over a `ClusterStore`; the `backends!` macro makes one test
//! per backend of it.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use ferry_scheduler::store::{
    ClusterStore, Decision, DecisionKind, Leadership, StoreError, Transition,
};

const TTL: Duration = Duration::from_secs(1);
/// Upper bound on waiting for a lease expiry to be observed (etcd checks
/// expiries every 500 ms and revokes through raft); only a bound, never
/// the measured quantity.
const EXPIRY_BOUND: Duration = Duration::from_secs(20);

fn lead(store: &ClusterStore, name: &str) -> Leadership {
    store
        .campaign(name, Duration::from_secs(30))
        .unwrap()
        .expect("nobody else leads")
}

/// Polls `cond` until it holds or `bound` passes; whether it held.
fn eventually(bound: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + bound;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

fn start_creates_epoch_one_and_a_second_start_conflicts(store: &ClusterStore) {
    let me = lead(store, "sched-a");
    store.join("h1", Duration::from_secs(30)).unwrap();
    assert_eq!(store.record("web").unwrap(), None);

    let rec = store.start(&me.claim, "web", "h1").unwrap();

    assert_eq!(
        (rec.host.as_str(), rec.epoch, rec.last),
        ("h1", 1, Transition::Start)
    );
    assert_eq!(store.record("web").unwrap(), Some(rec.clone()));
    match store.start(&me.claim, "web", "h1") {
        Err(StoreError::Conflict { vm, current }) => {
            assert_eq!(vm, "web");
            assert_eq!(current.as_deref(), Some(&rec));
        }
        other => panic!("second start: {other:?}"),
    }
}

fn migrate_swaps_only_from_the_current_revision_and_epochs_grow(store: &ClusterStore) {
    let me = lead(store, "sched-a");
    for h in ["h1", "h2"] {
        store.join(h, Duration::from_secs(30)).unwrap();
    }
    let r1 = store.start(&me.claim, "web", "h1").unwrap();

    let r2 = store.migrate(&me.claim, &r1, "h2").unwrap();
    let stale = store.migrate(&me.claim, &r1, "h1");
    let r3 = store.migrate(&me.claim, &r2, "h1").unwrap();

    assert_eq!(
        (r2.host.as_str(), r2.epoch, r2.last),
        ("h2", 2, Transition::Migrate)
    );
    assert_eq!(r2.previous.as_deref(), Some("h1"));
    assert!(r2.revision > r1.revision);
    match stale {
        Err(StoreError::Conflict { current, .. }) => assert_eq!(current.as_deref(), Some(&r2)),
        other => panic!("stale migrate: {other:?}"),
    }
    assert_eq!((r3.host.as_str(), r3.epoch), ("h1", 3));
    assert_eq!(store.records().unwrap(), vec![r3]);
}

fn transitions_need_the_destination_alive(store: &ClusterStore) {
    let me = lead(store, "sched-a");
    store.join("h1", Duration::from_secs(30)).unwrap();

    assert!(matches!(
        store.start(&me.claim, "web", "ghost"),
        Err(StoreError::HostDead { host }) if host == "ghost"
    ));
    let rec = store.start(&me.claim, "web", "h1").unwrap();
    assert!(matches!(
        store.migrate(&me.claim, &rec, "ghost"),
        Err(StoreError::HostDead { host }) if host == "ghost"
    ));
    assert_eq!(store.record("web").unwrap(), Some(rec));
}

fn restart_waits_for_the_owners_lease_to_end(store: &ClusterStore) {
    let me = lead(store, "sched-a");
    let h1 = store.join("h1", Duration::from_secs(30)).unwrap();
    store.join("h2", Duration::from_secs(30)).unwrap();
    let rec = store.start(&me.claim, "web", "h1").unwrap();

    let early = store.restart(&me.claim, &rec, "h2");
    store.leave(&h1).unwrap();
    let restarted = store.restart(&me.claim, &rec, "h2").unwrap();

    assert!(
        matches!(early, Err(StoreError::OwnerAlive { ref host, .. }) if host == "h1"),
        "{early:?}"
    );
    assert_eq!(
        (restarted.host.as_str(), restarted.epoch, restarted.last),
        ("h2", 2, Transition::Restart)
    );
}

fn a_lease_not_kept_alive_expires_and_its_host_is_reported_dead(store: &ClusterStore) {
    let dying = store.join("dying", TTL).unwrap();
    let kept = store.join("kept", TTL).unwrap();
    assert!(store.host_alive("dying").unwrap());

    // Keep one lease alive, let the other lapse.
    let dead = eventually(EXPIRY_BOUND, || {
        store.keep_alive(&kept, Duration::from_secs(2)).unwrap();
        !store.host_alive("dying").unwrap()
    });

    assert!(dead, "the lease of 'dying' never expired");
    assert!(store.host_alive("kept").unwrap(), "a kept lease expired");
    let hosts = store.hosts().unwrap();
    let alive: Vec<(&str, bool)> = hosts.iter().map(|h| (h.host.as_str(), h.alive)).collect();
    assert_eq!(alive, vec![("dying", false), ("kept", true)]);
    assert!(matches!(
        store.keep_alive(&dying, Duration::from_secs(2)),
        Err(StoreError::LeaseExpired { host }) if host == "dying"
    ));
}

fn a_deposed_leaders_writes_fail(store: &ClusterStore) {
    store.join("h1", Duration::from_secs(30)).unwrap();
    let old = store
        .campaign("sched-a", TTL)
        .unwrap()
        .expect("first leads");
    assert_eq!(store.campaign("sched-b", TTL).unwrap(), None);
    let rec = store.start(&old.claim, "web", "h1").unwrap();

    // sched-a stops renewing; sched-b takes over once its lease expired.
    let mut new = None;
    assert!(eventually(EXPIRY_BOUND, || {
        new = store.campaign("sched-b", Duration::from_secs(30)).unwrap();
        new.is_some()
    }));
    let new = new.unwrap();

    assert!(new.claim.token > old.claim.token, "fencing tokens grow");
    assert_eq!(
        store.leader().unwrap().map(|l| l.candidate).as_deref(),
        Some("sched-b")
    );
    let deposed = |r: Result<(), StoreError>| {
        assert!(
            matches!(r, Err(StoreError::NotLeader { ref candidate, token }) if candidate == "sched-a" && token == old.claim.token),
            "{r:?}"
        );
    };
    deposed(store.start(&old.claim, "db", "h1").map(drop));
    deposed(store.migrate(&old.claim, &rec, "h1").map(drop));
    deposed(store.remove(&old.claim, &rec));
    deposed(store.keep_leading(&old, Duration::from_secs(2)));
    deposed(store.record_decision(&old.claim, &decision("d1", "web", old.claim.token)));
    assert_eq!(store.record("web").unwrap(), Some(rec.clone()));
    // The new leader writes.
    store.keep_leading(&new, Duration::from_secs(2)).unwrap();
    store.remove(&new.claim, &rec).unwrap();
    assert_eq!(store.record("web").unwrap(), None);
}

fn a_leader_that_resigned_is_fenced_even_with_nobody_leading(store: &ClusterStore) {
    store.join("h1", Duration::from_secs(30)).unwrap();
    let me = lead(store, "sched-a");
    store.resign(&me).unwrap();
    assert_eq!(store.leader().unwrap(), None);
    assert!(matches!(
        store.start(&me.claim, "web", "h1"),
        Err(StoreError::NotLeader { .. })
    ));
}

fn two_concurrent_migrations_of_one_vm_exactly_one_wins(store: &ClusterStore) {
    let me = lead(store, "sched-a");
    for h in ["h1", "h2", "h3"] {
        store.join(h, Duration::from_secs(30)).unwrap();
    }
    for round in 0..10 {
        let vm = format!("vm{round}");
        let rec = store.start(&me.claim, &vm, "h1").unwrap();
        let gate = Arc::new(Barrier::new(2));
        let racers: Vec<_> = ["h2", "h3"]
            .into_iter()
            .map(|to| {
                let (store, me, rec, gate) = (store.clone(), me.clone(), rec.clone(), gate.clone());
                std::thread::spawn(move || {
                    gate.wait();
                    store.migrate(&me.claim, &rec, to)
                })
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|t| t.join().unwrap()).collect();

        let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let loser = results.iter().find(|r| r.is_err()).unwrap();
        assert!(
            matches!(loser, Err(StoreError::Conflict { .. })),
            "{loser:?}"
        );
        let now = store.record(&vm).unwrap().unwrap();
        assert_eq!(&now, winners[0]);
        assert_eq!(now.epoch, 2);
    }
}

fn decision(id: &str, vm: &str, token: i64) -> Decision {
    Decision {
        id: id.into(),
        vm: vm.into(),
        kind: DecisionKind::Migrate {
            from: "h1".into(),
            to: "h2".into(),
        },
        token,
        reason: "maintenance of h1".into(),
    }
}

fn decisions_in_flight_are_recorded_once_and_outlive_their_leader(store: &ClusterStore) {
    let old = lead(store, "sched-a");
    let d = decision("evacuate-h1-web", "web", old.claim.token);
    store.record_decision(&old.claim, &d).unwrap();
    assert!(matches!(
        store.record_decision(&old.claim, &d),
        Err(StoreError::DuplicateDecision { id }) if id == "evacuate-h1-web"
    ));

    store.resign(&old).unwrap();
    let new = lead(store, "sched-b");

    assert_eq!(store.decisions().unwrap(), vec![d]);
    assert!(matches!(
        store.finish_decision(&old.claim, "evacuate-h1-web"),
        Err(StoreError::NotLeader { .. })
    ));
    store
        .finish_decision(&new.claim, "evacuate-h1-web")
        .unwrap();
    assert_eq!(store.decisions().unwrap(), vec![]);
}

fn wait_change_wakes_on_writes_and_on_lease_expiry(store: &ClusterStore) {
    let me = lead(store, "sched-a");
    store.join("h1", Duration::from_secs(30)).unwrap();
    let before = store.revision().unwrap();
    let writer = {
        let (store, me) = (store.clone(), me.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            store.start(&me.claim, "web", "h1").unwrap()
        })
    };
    let after = store.wait_change(before, EXPIRY_BOUND).unwrap();
    let rec = writer.join().unwrap();
    assert!(
        after >= rec.revision && after > before,
        "{before} -> {after}, record at {}",
        rec.revision
    );

    store.join("short", TTL).unwrap();
    let before = store.revision().unwrap();
    let after = store.wait_change(before, EXPIRY_BOUND).unwrap();
    assert!(after > before, "no change seen within the bound");
    assert!(
        !store.host_alive("short").unwrap(),
        "the change is the expiry"
    );
}

fn bad_names_are_refused(store: &ClusterStore) {
    let me = lead(store, "sched-a");
    for bad in ["", "a/b", "tab\there"] {
        assert!(
            matches!(
                store.start(&me.claim, bad, "h1"),
                Err(StoreError::BadName { .. })
            ),
            "{bad:?}"
        );
        assert!(
            matches!(store.join(bad, TTL), Err(StoreError::BadName { .. })),
            "{bad:?}"
        );
    }
}

fn a_migrated_record_is_handed_back_to_its_source_only_unchanged(store: &ClusterStore) {
    let me = lead(store, "sched-a");
    for h in ["h1", "h2"] {
        store.join(h, Duration::from_secs(30)).unwrap();
    }
    let started = store.start(&me.claim, "web", "h1").unwrap();
    let moved = store.migrate(&me.claim, &started, "h2").unwrap();

    let not_migrated = store.hand_back(&started);
    let back = store.hand_back(&moved).unwrap();
    let stale = store.hand_back(&moved);

    assert!(
        matches!(
            not_migrated,
            Err(StoreError::NotMigrated {
                last: Transition::Start,
                ..
            })
        ),
        "{not_migrated:?}"
    );
    assert_eq!(
        (
            back.host.as_str(),
            back.epoch,
            back.last,
            back.previous.as_deref()
        ),
        ("h1", 3, Transition::HandedBack, Some("h2"))
    );
    assert_eq!(store.record("web").unwrap(), Some(back.clone()));
    match stale {
        Err(StoreError::Conflict { current, .. }) => assert_eq!(current.as_deref(), Some(&back)),
        other => panic!("stale hand-back: {other:?}"),
    }
}

fn a_hand_back_needs_the_source_alive(store: &ClusterStore) {
    let me = lead(store, "sched-a");
    let h1 = store.join("h1", Duration::from_secs(30)).unwrap();
    store.join("h2", Duration::from_secs(30)).unwrap();
    let moved = store
        .migrate(
            &me.claim,
            &store.start(&me.claim, "web", "h1").unwrap(),
            "h2",
        )
        .unwrap();
    store.leave(&h1).unwrap();

    let got = store.hand_back(&moved);

    assert!(
        matches!(&got, Err(StoreError::HostDead { host }) if host == "h1"),
        "{got:?}"
    );
    assert_eq!(store.record("web").unwrap(), Some(moved));
}

fn a_destination_gives_back_only_what_it_neither_holds_nor_resumed(store: &ClusterStore) {
    use ferry_scheduler::store::GiveBack;
    let me = lead(store, "sched-a");
    for h in ["h1", "h2"] {
        store.join(h, Duration::from_secs(30)).unwrap();
    }
    let moved = store
        .migrate(
            &me.claim,
            &store.start(&me.claim, "web", "h1").unwrap(),
            "h2",
        )
        .unwrap();
    let asked = std::cell::Cell::new(0);

    let holds = store.give_back("h2", "web", true, || {
        asked.set(asked.get() + 1);
        Err("never asked".into())
    });
    let resumed = store.give_back("h2", "web", false, || Ok(()));
    let not_here = store.give_back("h1", "web", false, || Err("no GO".into()));
    let back = store
        .give_back("h2", "web", false, || Err("no GO came".into()))
        .unwrap();
    let again = store.give_back("h2", "web", false, || Err("no GO came".into()));

    assert_eq!(holds.unwrap(), GiveBack::Runs);
    assert_eq!(
        asked.get(),
        0,
        "a destination holding a copy refuses nothing"
    );
    assert_eq!(resumed.unwrap(), GiveBack::Runs);
    assert!(
        matches!(&not_here, Err(StoreError::Conflict { current: Some(c), .. }) if **c == moved),
        "the record names h2, not h1: {not_here:?}"
    );
    let GiveBack::HandedBack { record, reason } = back else {
        panic!("not handed back: {back:?}");
    };
    assert_eq!(reason, "no GO came");
    assert_eq!(
        (record.host.as_str(), record.epoch, record.last),
        ("h1", moved.epoch + 1, Transition::HandedBack)
    );
    assert_eq!(store.record("web").unwrap(), Some(record));
    assert!(
        matches!(again, Err(StoreError::Conflict { .. })),
        "{again:?}"
    );
}

fn the_rules_outlive_their_leader_and_a_deposed_one_sets_none(store: &ClusterStore) {
    use ferry_scheduler::plan::rules::{Rule, RuleKind};
    assert_eq!(store.rules().unwrap(), None, "none set yet");
    let old = lead(store, "sched-a");
    let apart = vec![Rule {
        name: "apart".into(),
        kind: RuleKind::AntiAffinity,
        vms: vec!["web".into(), "db".into()],
        hosts: vec![],
    }];
    store.set_rules(&old.claim, &apart).unwrap();
    store.resign(&old).unwrap();
    let new = lead(store, "sched-b");
    assert_eq!(store.rules().unwrap(), Some(apart.clone()));
    assert!(matches!(
        store.set_rules(&old.claim, &[]),
        Err(StoreError::NotLeader { .. })
    ));
    assert_eq!(store.rules().unwrap(), Some(apart));
    store.set_rules(&new.claim, &[]).unwrap();
    assert_eq!(store.rules().unwrap(), Some(vec![]));
}

macro_rules! backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[test]
                fn $name() {
                    super::$name(&ferry_scheduler::store::ClusterStore::in_memory());
                }
            )*
        }
        #[cfg(feature = "etcd")]
        mod etcd {
            $(
                #[test]
                fn $name() {
                    super::on_etcd(stringify!($name), super::$name);
                }
            )*
        }
    };
}

backends!(
    start_creates_epoch_one_and_a_second_start_conflicts,
    migrate_swaps_only_from_the_current_revision_and_epochs_grow,
    transitions_need_the_destination_alive,
    restart_waits_for_the_owners_lease_to_end,
    a_lease_not_kept_alive_expires_and_its_host_is_reported_dead,
    a_deposed_leaders_writes_fail,
    a_leader_that_resigned_is_fenced_even_with_nobody_leading,
    two_concurrent_migrations_of_one_vm_exactly_one_wins,
    decisions_in_flight_are_recorded_once_and_outlive_their_leader,
    wait_change_wakes_on_writes_and_on_lease_expiry,
    bad_names_are_refused,
    a_migrated_record_is_handed_back_to_its_source_only_unchanged,
    a_hand_back_needs_the_source_alive,
    a_destination_gives_back_only_what_it_neither_holds_nor_resumed,
    the_rules_outlive_their_leader_and_a_deposed_one_sets_none,
);

/// Runs `check` on a store over a fresh one-member etcd (SKIP without
/// etcd, a failure with `FERRY_NO_SKIP=1`).
#[cfg(feature = "etcd")]
fn on_etcd(test: &str, check: fn(&ClusterStore)) {
    use ferry_e2e::etcd::{etcd_or_skip, EtcdCluster};
    use ferry_scheduler::store::etcd::EtcdOptions;

    let Some(bin) = etcd_or_skip(test) else {
        return;
    };
    let etcd = EtcdCluster::start(&bin, "cluster-conf", 1).unwrap();
    let store =
        ClusterStore::on_etcd(&etcd.endpoints(), EtcdOptions::default(), "/ferry/").unwrap();
    check(&store);
}

/// Three members, one killed: every store operation still succeeds on the
/// remaining quorum of two.
#[cfg(feature = "etcd")]
#[test]
fn three_member_etcd_keeps_working_with_one_member_stopped() {
    use ferry_e2e::etcd::{etcd_or_skip, EtcdCluster};
    use ferry_scheduler::store::etcd::EtcdOptions;

    let Some(bin) = etcd_or_skip("three_member_etcd_keeps_working_with_one_member_stopped") else {
        return;
    };
    let mut etcd = EtcdCluster::start(&bin, "cluster-three", 3).unwrap();
    let store =
        ClusterStore::on_etcd(&etcd.endpoints(), EtcdOptions::default(), "/ferry/").unwrap();
    let me = lead(&store, "sched-a");
    let h1 = store.join("h1", Duration::from_secs(30)).unwrap();
    store.join("h2", Duration::from_secs(30)).unwrap();
    let rec = store.start(&me.claim, "web", "h1").unwrap();

    etcd.members[0].kill();
    etcd.wait_healthy(Duration::from_secs(30)).unwrap();

    store.keep_leading(&me, Duration::from_secs(5)).unwrap();
    store.keep_alive(&h1, Duration::from_secs(5)).unwrap();
    let moved = store.migrate(&me.claim, &rec, "h2").unwrap();
    assert_eq!((moved.host.as_str(), moved.epoch), ("h2", 2));
    store.join("h3", Duration::from_secs(30)).unwrap();
    assert_eq!(store.records().unwrap(), vec![moved]);
    assert_eq!(store.hosts().unwrap().len(), 3);
    assert_eq!(
        store.leader().unwrap().map(|l| l.token),
        Some(me.claim.token)
    );
}
