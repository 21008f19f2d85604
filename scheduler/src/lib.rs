#![deny(missing_docs)]
//! # ferry-scheduler
//!
//! Decides which VM runs where: a cluster model, policies that turn the
//! model into plans of moves (initial placement, even distribution, power
//! save, maintenance), a trace-driven simulator that reproduces the
//! Beloglazov & Buyya CCPE 2012 setup on the PlanetLab traces, and a daemon.
//!
//! - [`model`]: hosts, VMs, the cluster.
//! - [`plan`]: policies as plans, a ledger that enforces memory, thresholds,
//!   the minimum time between moves of a VM and per-host migration limits;
//!   [`plan::planner::Planner`] runs them each round of the daemon.
//! - [`plan::ferry`]: ferry's policy, **one function for both drivers**: the
//!   daemon's planner (power save mode, through [`plan::power_save`]) and
//!   the simulator ([`sim::ferry`]) call [`plan::ferry::plan`] over a
//!   [`plan::ferry::ClusterView`] of their cluster, with one set of
//!   defaults ([`plan::ferry::FerryParams::default`]: fill hosts to 95 % of
//!   the peak of the last 10 minutes, shed above 105 %, empty a host whose
//!   15-minute peak stayed under 80 % for 5 minutes, at most 4 concurrent
//!   migrations per host, 20 minutes between two moves of a VM). Placement
//!   rules are an input of it. `tests/policy_replay.rs` replays a PlanetLab
//!   day through the daemon's planner and gets the simulator's moves, step
//!   by step.
//! - [`sim`]: the simulator (CloudSim 3.0.3 semantics), the published
//!   baselines (NPA, DVFS, THR/IQR/MAD/LR/LRR-MMT), the driver of ferry's
//!   policy, reports ([`sim::run::run_simulate`] is what `ferry sched
//!   simulate` calls).
//! - [`daemon`]: `ferry sched daemon`: config, HTTP API, metrics, power
//!   drivers, the agent protocol and the [`daemon::agent::Executor`] seam.
//! - [`store`]: the cluster store (VM ownership records, host leases,
//!   leader election with a fencing token) in memory or on etcd.
//! - [`ha`]: the host lease keeper that fences its host, restart planning
//!   and admission control after host failures.
//! - [`trace`], [`power`], [`mod@reference`]: the input files.
//!
//! ```no_run
//! use ferry_scheduler::sim::{simulate, SimConfig};
//! let cfg = SimConfig::published(std::path::Path::new("../shared/traces"));
//! let results = simulate(&cfg, |r| println!("{} {} {:.1} kWh", r.day, r.policy, r.energy_kwh))?;
//! # Ok::<(), ferry_scheduler::sim::SimError>(())
//! ```

pub mod daemon;
pub mod ha;
pub mod model;
pub mod plan;
pub mod power;
pub mod reference;
mod rng;
pub mod sim;
pub mod store;
pub mod trace;
