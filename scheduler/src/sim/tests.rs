//! Simulator behaviour on small synthetic days.

use super::*;
use crate::power::PowerModel;
use crate::trace::SAMPLES_PER_DAY;

fn host_types() -> Vec<HostType> {
    let g4 = PowerModel {
        name: "G4".into(),
        watts: [
            86.0, 89.4, 92.6, 96.0, 99.5, 102.0, 106.0, 108.0, 112.0, 114.0, 117.0,
        ],
    };
    let g5 = PowerModel {
        name: "G5".into(),
        watts: [
            93.7, 97.0, 101.0, 105.0, 110.0, 116.0, 121.0, 125.0, 129.0, 133.0, 135.0,
        ],
    };
    vec![
        HostType {
            pe_mips: 1860.0,
            pes: 2,
            ram_mb: 4096.0,
            bw_mbit: 1000.0,
            power: g4,
        },
        HostType {
            pe_mips: 2660.0,
            pes: 2,
            ram_mb: 4096.0,
            bw_mbit: 1000.0,
            power: g5,
        },
    ]
}

fn constant(name: &str, pct: u8) -> Trace {
    Trace {
        name: name.into(),
        samples: vec![pct; SAMPLES_PER_DAY],
    }
}

#[test]
fn dvfs_energy_matches_hand_computation() {
    // n = 4: one VM of each type. First fit: VM0 (2500) and VM1 (2000) on
    // host 1 (G5; G4 cores are too small), VM2 and VM3 on host 0 (G4).
    let traces: Vec<Trace> = (0..4).map(|i| constant(&format!("v{i}"), 50)).collect();
    let ht = host_types();
    let r = simulate_day("d", &traces, &ht, 4, &Policy::Dvfs, MemoryModel::CloudSim).unwrap();
    let u0 = (500.0 + 250.0) / 3720.0;
    let u1 = (1250.0 + 1000.0) / 5320.0;
    // Energy from the first tick (300.1 s) to the last (86100.1 s).
    let secs = 86_100.0 - 300.0;
    let expect = (ht[0].power.power(u0) + ht[1].power.power(u1)) * secs / 3.6e6;
    assert!(
        (r.energy_kwh - expect).abs() < 1e-6,
        "{} vs {expect}",
        r.energy_kwh
    );
    assert_eq!(r.migrations, 0);
    assert_eq!(r.slatah, 0.0);
    assert!(r.active_hosts.iter().all(|&a| a == 2));
}

#[test]
fn thr_consolidates_idle_hosts_and_pays_migration_degradation() {
    let traces: Vec<Trace> = (0..4).map(|i| constant(&format!("v{i}"), 5)).collect();
    let ht = host_types();
    let thr = Policy::Mmt(baseline::Detector::Thr(0.8));
    let r = simulate_day("d", &traces, &ht, 8, &thr, MemoryModel::CloudSim).unwrap();
    assert!(r.migrations > 0);
    assert_eq!(*r.active_hosts.last().unwrap(), 1, "{:?}", r.active_hosts);
    assert!(r.pdm > 0.0);
    let dvfs = simulate_day("d", &traces, &ht, 8, &Policy::Dvfs, MemoryModel::CloudSim).unwrap();
    assert!(r.energy_kwh < dvfs.energy_kwh);
}

#[test]
fn strict_memory_never_overcommits() {
    // 6 VMs of types 1..2 sizes (1740 MB): at most 2 per 4096 MB host.
    let traces: Vec<Trace> = (0..8).map(|i| constant(&format!("v{i}"), 2)).collect();
    let ht = host_types();
    for policy in [
        Policy::Mmt(baseline::Detector::Thr(0.8)),
        Policy::Ferry(FerryParams::default()),
    ] {
        let strict = simulate_day("d", &traces, &ht, 8, &policy, MemoryModel::Strict).unwrap();
        let loose = simulate_day("d", &traces, &ht, 8, &policy, MemoryModel::CloudSim).unwrap();
        // RAM: 2x870 + 2x1740 + 2x1740 + 2x613 = 9926 MB -> at least 3 hosts.
        assert!(strict.active_hosts.iter().all(|&a| a >= 3), "{policy:?}");
        assert!(*loose.active_hosts.last().unwrap() < 3, "{policy:?}");
    }
}

#[test]
fn ferry_moves_less_than_thr_on_a_bursty_day() {
    // Noisy VMs (deterministic LCG): mostly 0-30 %, sometimes a burst to 80 %.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (x >> 33) % 100
    };
    let traces: Vec<Trace> = (0..40)
        .map(|i| Trace {
            name: format!("v{i:02}"),
            samples: (0..SAMPLES_PER_DAY)
                .map(|_| {
                    let r = next();
                    if r < 5 {
                        80
                    } else {
                        (r % 30) as u8
                    }
                })
                .collect(),
        })
        .collect();
    let ht = host_types();
    let run = |p: &Policy| simulate_day("d", &traces, &ht, 40, p, MemoryModel::CloudSim).unwrap();
    let thr = run(&Policy::Mmt(baseline::Detector::Thr(0.8)));
    let ferry = run(&Policy::Ferry(FerryParams::default()));
    assert!(
        ferry.migrations * 3 < thr.migrations,
        "{} vs {}",
        ferry.migrations,
        thr.migrations
    );
    assert!(ferry.slav < thr.slav, "{} vs {}", ferry.slav, thr.slav);
}

#[test]
fn cloudsim_model_drops_vms_that_request_nothing_strict_keeps_them() {
    // VM 0 pauses (two zero samples at steps 10 and 11), then works again.
    let mut traces: Vec<Trace> = (0..4).map(|i| constant(&format!("v{i}"), 30)).collect();
    traces[0].samples[10] = 0;
    traces[0].samples[11] = 0;
    let ht = host_types();
    let run = |m| simulate_day("d", &traces, &ht, 4, &Policy::Dvfs, m).unwrap();
    let loose = run(MemoryModel::CloudSim);
    let strict = run(MemoryModel::Strict);
    // CloudSim drops VM 0 at the pause for good: its later demand is gone.
    // First fit put VM 0 and VM 1 on host 1, which stays on with VM 1.
    assert!(loose.energy_kwh < strict.energy_kwh);
    assert_eq!(loose.active_hosts.last(), strict.active_hosts.last());
}

#[test]
fn policy_names_round_trip() {
    for p in Policy::all() {
        assert_eq!(Policy::parse(&p.name()).unwrap().name(), p.name());
    }
    assert!(Policy::parse("nonsense").is_none());
    let Some(Policy::Ferry(p)) = Policy::parse("ferry:target=0.7:limit=1") else {
        panic!("ferry with parameters")
    };
    assert_eq!((p.target, p.limits.max_migrations_per_host), (0.7, 1));
}

#[test]
fn ferry_in_the_simulator_honours_an_anti_affinity_rule() {
    use crate::plan::rules::{Rule, RuleKind};
    // Eight light VMs (5 %): ferry packs them onto few hosts; v0 and v1
    // (both 2500 MIPS, type 0) would share one.
    let traces: Vec<Trace> = (0..8).map(|i| constant(&format!("t{i}"), 5)).collect();
    let ht = host_types();
    let policy = Policy::Ferry(FerryParams::default());
    // Where every VM is once the step's moves complete.
    let after = |s: &Step<'_, '_>| -> Vec<Option<usize>> {
        let mut at: Vec<Option<usize>> = s.dc.vms.iter().map(|v| v.host).collect();
        for &(v, _, to) in s.moves {
            at[v] = Some(to);
        }
        at
    };
    let run = |rules: &[Rule]| {
        let mut together = 0;
        let mut moves = 0;
        simulate_day_with(
            "d",
            &traces,
            &ht,
            8,
            &policy,
            MemoryModel::Strict,
            rules,
            &mut |s| {
                let at = after(s);
                moves += s.moves.len();
                if at[0].is_some() && at[0] == at[1] {
                    together += 1;
                }
            },
        )
        .unwrap();
        (together, moves)
    };
    // Without rules ferry packs at creation (no moves needed); with one it
    // starts from the rules-aware placement and consolidates.
    let (together, _) = run(&[]);
    assert!(together > 0, "without the rule v0 and v1 share a host");
    let apart = Rule {
        name: "apart".into(),
        kind: RuleKind::AntiAffinity,
        vms: vec!["v0".into(), "v1".into()],
        hosts: Vec::new(),
    };
    let (together, moves) = run(&[apart]);
    assert_eq!(together, 0, "the rule held at every step");
    assert!(moves > 0, "ferry still consolidates the others");
}

#[test]
fn shuffle_seed_changes_which_file_gets_which_type() {
    // Four files, one busy (100 %) and three idle-ish (1 %), sorted as
    // a, b, c, d: sorted order gives the busy file `a` type 0 (2500 MIPS);
    // a shuffle that moves `a` elsewhere gives it a smaller type, so the
    // day's demand and the RAM bound's mean load change with it.
    let dir = tempfile::tempdir().unwrap();
    let day = dir.path().join("planetlab/20990101");
    std::fs::create_dir_all(&day).unwrap();
    for (name, pct) in [("a", 100u8), ("b", 1), ("c", 1), ("d", 1)] {
        let text: String = (0..SAMPLES_PER_DAY).map(|_| format!("{pct}\n")).collect();
        std::fs::write(day.join(name), text).unwrap();
    }
    std::fs::write(
        dir.path().join("power_models.csv"),
        "host_model,cpu,sockets,cores_total,mhz,ram_gb_spec,used_in_beloglazov_ccpe2012,spec_power_ssj2008_result,w_0,w_10,w_20,w_30,w_40,w_50,w_60,w_70,w_80,w_90,w_100\n\
         HP ProLiant ML110 G4,Xeon 3040,1,2,1860,4,yes,x,86,89.4,92.6,96,99.5,102,106,108,112,114,117\n\
         HP ProLiant ML110 G5,Xeon 3075,1,2,2660,4,yes,x,93.7,97,101,105,110,116,121,125,129,133,135\n",
    )
    .unwrap();
    let mut cfg = SimConfig::published(dir.path());
    cfg.policies = vec![Policy::Dvfs];
    cfg.memory = vec![MemoryModel::Strict];
    cfg.hosts = 4;
    let sorted = simulate(&cfg, |_| {}).unwrap();
    // Seed 7 on 4 files: the busy file becomes VM 2 (1000 MIPS).
    assert_eq!(setup::shuffled_order(4, 7), [2, 3, 0, 1]);
    cfg.shuffle_seed = Some(7);
    let shuffled = simulate(&cfg, |_| {}).unwrap();
    assert_eq!(sorted[0].shuffle_seed, None);
    assert_eq!(shuffled[0].shuffle_seed, Some(7));
    // Sorted: 2500 + 3 x ~1 % of the others' MIPS.
    assert!(sorted[0].bound.mean_load_mips > 2500.0);
    assert!(shuffled[0].bound.mean_load_mips < 1100.0);
    assert!(shuffled[0].energy_kwh < sorted[0].energy_kwh);
}

/// `process` leaves idle hosts alone; a data centre that updates every host
/// at every event (CloudSim's loop) must agree with it exactly, event by
/// event, while random migrations fill empty hosts and empty full ones and
/// (CloudSim model) VMs that request nothing leave the simulation.
#[test]
fn skipping_idle_hosts_changes_no_figure() {
    use crate::rng::SplitMix64;
    use datacenter::Datacenter;
    for (seed, memory) in [(1, MemoryModel::CloudSim), (2, MemoryModel::Strict)] {
        let mut rng = SplitMix64(seed);
        // Bursty traces with runs of zeros (VMs that finish in the CloudSim
        // model), 40 VMs on 30 hosts: many hosts idle, some filling up.
        let traces: Vec<Trace> = (0..40)
            .map(|i| Trace {
                name: format!("v{i}"),
                samples: (0..SAMPLES_PER_DAY)
                    .map(|k| match rng.below(10) {
                        0 | 1 if k > 50 => 0,
                        2 => 100,
                        _ => rng.below(60) as u8,
                    })
                    .collect(),
            })
            .collect();
        let types: Vec<_> = (0..traces.len())
            .map(|i| VM_TYPES[vm_type_index(i, traces.len())])
            .collect();
        let make = || {
            let mut dc = Datacenter::new(&traces, host_types(), 30, &types, memory, STEP_SECONDS);
            baseline::place_all_first_fit(&mut dc).unwrap();
            dc
        };
        let (mut lazy, mut full) = (make(), make());
        full.recompute_every_host();
        let mut t = FIRST_EVENT;
        let mut events = 0;
        while t + STEP_SECONDS <= DAY_SECONDS {
            t += STEP_SECONDS;
            lazy.process(t, true);
            full.process(t, true);
            // A few migrations to random hosts, empty ones included.
            for _ in 0..rng.below(4) {
                let v = rng.below(traces.len() as u64) as usize;
                let to = rng.below(30) as usize;
                let vm = &lazy.vms[v];
                if vm.in_migration || vm.host.is_none_or(|h| h == to) {
                    continue;
                }
                lazy.start_migration(v, to);
                full.start_migration(v, to);
            }
            lazy.complete_migrations_before(t + STEP_SECONDS);
            full.complete_migrations_before(t + STEP_SECONDS);
            events += 1;
            let at = format!("seed {seed}, {memory:?}, t = {t}");
            assert_eq!(lazy.energy_ws.to_bits(), full.energy_ws.to_bits(), "{at}");
            assert_eq!(lazy.slatah().to_bits(), full.slatah().to_bits(), "{at}");
            assert_eq!(lazy.pdm().to_bits(), full.pdm().to_bits(), "{at}");
            assert_eq!(
                lazy.overall_sla().to_bits(),
                full.overall_sla().to_bits(),
                "{at}"
            );
            assert_eq!(lazy.host_shutdowns(), full.host_shutdowns(), "{at}");
            assert_eq!(lazy.active_hosts(), full.active_hosts(), "{at}");
            assert_eq!(lazy.removed, full.removed, "{at}");
            for h in 0..30 {
                assert_eq!(lazy.hosts[h].vms, full.hosts[h].vms, "{at}, host {h}");
                assert_eq!(
                    lazy.hosts[h].util_mips.to_bits(),
                    full.hosts[h].util_mips.to_bits(),
                    "{at}, host {h}"
                );
            }
        }
        assert!(events > 250);
        // The setup exercised what the skipping must get right.
        assert!(lazy.migrations > 100, "{}", lazy.migrations);
        assert!(lazy.host_shutdowns() > 10, "{}", lazy.host_shutdowns());
        if memory == MemoryModel::CloudSim {
            assert!(lazy.removed > 0);
        }
    }
}
