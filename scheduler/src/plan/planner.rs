//! The planner, what the daemon runs each round: maintenance first, then
//! the rules pass, then the balancing policy: even distribution, or
//! ferry's policy ([`super::ferry`], the function the simulator measures,
//! through [`power_save`]). One shared ledger, so the limits hold across
//! the whole plan; one set of defaults ([`FerryParams::default`]).

use serde::{Deserialize, Serialize};

use super::balance::{self, Balance};
use super::ferry::{FerryParams, FerryState};
use super::maintenance;
use super::power_save::{self, PowerSave};
use super::{Ledger, Limits, Plan, PlanError};
use crate::model::Cluster;

/// Which balancing policy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyMode {
    /// Even distribution only: spread load over the running hosts.
    Balance,
    /// ferry's policy: relieve hot hosts, consolidate light ones, power
    /// hosts down and up.
    PowerSave,
    /// The same as `power_save` (ferry's policy relieves hot hosts
    /// itself); kept as the default name.
    Both,
    /// Maintenance only (no balancing).
    Manual,
}

impl std::str::FromStr for PolicyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "balance" => Ok(Self::Balance),
            "power_save" | "power-save" => Ok(Self::PowerSave),
            "both" => Ok(Self::Both),
            "manual" => Ok(Self::Manual),
            _ => Err(format!(
                "unknown policy {s:?} (balance, power_save, both, manual)"
            )),
        }
    }
}

impl std::fmt::Display for PolicyMode {
    /// The name `FromStr` reads and the API writes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Balance => "balance",
            Self::PowerSave => "power_save",
            Self::Both => "both",
            Self::Manual => "manual",
        })
    }
}

/// Planner state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Planner {
    /// Active policy.
    pub mode: PolicyMode,
    /// Even distribution parameters.
    pub balance: Balance,
    /// ferry's policy, and the limits every plan keeps.
    pub ferry: FerryParams,
    /// Power management around ferry's policy.
    pub power_save: PowerSave,
    over_since: Vec<Option<f64>>,
    ferry_state: FerryState,
}

impl Planner {
    /// A planner with default parameters.
    pub fn new(mode: PolicyMode) -> Self {
        Self {
            mode,
            balance: Balance::default(),
            ferry: FerryParams::default(),
            power_save: PowerSave::default(),
            over_since: Vec::new(),
            ferry_state: FerryState::default(),
        }
    }

    /// The limits every plan keeps (`ferry.limits`).
    pub fn limits(&self) -> &Limits {
        &self.ferry.limits
    }

    fn tick(timers: &mut Vec<Option<f64>>, n: usize, now: f64, hot: &[usize]) {
        timers.resize(n, None);
        let mut is_hot = vec![false; n];
        for &h in hot {
            is_hot[h] = true;
        }
        for (h, t) in timers.iter_mut().enumerate() {
            *t = if is_hot[h] {
                Some(t.unwrap_or(now))
            } else {
                None
            };
        }
    }

    /// Plan for the cluster as it is now.
    pub fn plan(&mut self, c: &Cluster) -> Result<Plan, PlanError> {
        let n = c.hosts.len();
        let limits = self.ferry.limits;
        let window = self.balance.window.max(FerryParams::samples(
            self.ferry.long_window_s(),
            self.power_save.sample_s,
        ));
        let mut ledger = Ledger::new(c, |v| c.vms[v].peak(window));
        let over = balance::overloaded_now(c, &self.balance, &ledger);
        Self::tick(&mut self.over_since, n, c.now, &over);
        let mut plan = Plan::default();
        let mut homes: Vec<bool> = vec![false; n];
        for v in &c.vms {
            if let Some(h) = v.home {
                homes[h] = true;
            }
        }
        for h in 0..n {
            if !c.hosts[h].maintenance && !homes[h] {
                continue;
            }
            if c.hosts[h].maintenance {
                plan.extend(maintenance::evacuate(
                    c,
                    h,
                    self.balance.threshold,
                    &limits,
                    &mut ledger,
                )?);
            } else {
                plan.extend(maintenance::return_home(c, h, &limits, &mut ledger));
            }
        }
        if self.mode != PolicyMode::Manual {
            plan.extend(super::rules::enforce(
                c,
                self.balance.threshold,
                &limits,
                &mut ledger,
            ));
        }
        match self.mode {
            PolicyMode::Balance => {
                let d: Vec<usize> = (0..n)
                    .filter(|&h| {
                        self.over_since[h].is_some_and(|s| c.now - s >= self.balance.duration_s)
                    })
                    .collect();
                plan.extend(balance::plan(c, &self.balance, &limits, &mut ledger, &d));
            }
            PolicyMode::PowerSave | PolicyMode::Both => {
                plan.extend(power_save::plan(
                    c,
                    &self.ferry,
                    &self.power_save,
                    &mut self.ferry_state,
                    &mut ledger,
                ));
            }
            PolicyMode::Manual => {}
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testkit::{add_vm, cluster};
    use crate::plan::{apply, Action};

    #[test]
    fn a_policy_is_written_as_it_is_read_and_sent() {
        for mode in [
            PolicyMode::Balance,
            PolicyMode::PowerSave,
            PolicyMode::Both,
            PolicyMode::Manual,
        ] {
            assert_eq!(mode.to_string().parse::<PolicyMode>(), Ok(mode));
            assert_eq!(serde_json::to_string(&mode).unwrap(), format!("\"{mode}\""));
        }
    }

    #[test]
    fn balance_waits_for_the_duration_then_acts_once() {
        let mut c = cluster(2);
        add_vm(&mut c, 0, 1000.0, 512);
        add_vm(&mut c, 0, 800.0, 512);
        let mut p = Planner::new(PolicyMode::Balance);
        assert_eq!(p.plan(&c).unwrap().migrations(), 0, "not yet long enough");
        c.now += p.balance.duration_s;
        let plan = p.plan(&c).unwrap();
        assert_eq!(plan.migrations(), 1);
        for a in &plan.actions {
            apply(&mut c, a);
        }
        c.now += p.balance.duration_s;
        assert_eq!(p.plan(&c).unwrap().migrations(), 0, "no flapping");
    }

    #[test]
    fn power_save_then_balance_do_not_flap() {
        let mut c = cluster(3);
        add_vm(&mut c, 0, 300.0, 512);
        add_vm(&mut c, 1, 300.0, 512);
        add_vm(&mut c, 2, 300.0, 512);
        let mut p = Planner::new(PolicyMode::Both);
        let mut moves = 0;
        for _ in 0..20 {
            let plan = p.plan(&c).unwrap();
            moves += plan.migrations();
            for a in &plan.actions {
                apply(&mut c, a);
            }
            c.now += 300.0;
        }
        let on = c.hosts.iter().filter(|h| h.usable()).count();
        assert_eq!(on, 1, "consolidated onto one host");
        assert!(moves <= 2, "{moves} moves for 3 VMs");
        assert!(c.vms.iter().all(|v| v.host.is_some()));
        let _ = Action::PowerOn {
            host: 0,
            reason: String::new(),
        };
    }
}
