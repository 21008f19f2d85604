//! Rules users set, honoured by every policy (as vSphere DRS rules, oVirt
//! affinity groups, Nova server groups):
//!
//! | kind | meaning | strength |
//! |---|---|---|
//! | `affinity` | the `vms` run on one host | hard |
//! | `anti_affinity` | no two of the `vms` share a host | hard |
//! | `must_run_on` | the `vms` run only on the `hosts` | hard |
//! | `must_not_run_on` | the `vms` never run on the `hosts` | hard |
//! | `should_run_on` | preferred: the `vms` on the `hosts` | soft |
//! | `should_not_run_on` | preferred: the `vms` off the `hosts` | soft |
//!
//! A hard rule is never broken by a plan: a host that would break one is
//! not a target ([`RuleIndex::blocker`]), whatever the policy. A soft rule
//! ranks targets ([`RuleIndex::soft_misses`]): among hosts that fit, those
//! breaking fewer soft rules come first. Rules name VMs and hosts by name;
//! a name the cluster does not (yet) have is simply not there. Affinity
//! moves a group one VM at a time: a VM whose partners all sit on a host
//! being emptied (maintenance, off, a power-save donor) leads, its target
//! must have room for the whole group, and the others follow it.
//!
//! [`check`] refuses a set of rules that contradict each other (a VM
//! that must be with and apart from another, or that no host may take),
//! naming the rules.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{find_target, Action, Ledger, Limits, Plan};
use crate::model::{Cluster, HostId, VmId};

/// What a rule asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// The VMs run on one host.
    Affinity,
    /// No two of the VMs share a host.
    AntiAffinity,
    /// The VMs run only on the hosts.
    MustRunOn,
    /// The VMs never run on the hosts.
    MustNotRunOn,
    /// Preferably the VMs run on the hosts.
    ShouldRunOn,
    /// Preferably the VMs run elsewhere.
    ShouldNotRunOn,
}

impl RuleKind {
    /// Its name in `cluster.toml` and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Affinity => "affinity",
            RuleKind::AntiAffinity => "anti_affinity",
            RuleKind::MustRunOn => "must_run_on",
            RuleKind::MustNotRunOn => "must_not_run_on",
            RuleKind::ShouldRunOn => "should_run_on",
            RuleKind::ShouldNotRunOn => "should_not_run_on",
        }
    }

    /// Between VMs (else between VMs and hosts).
    pub fn vm_vm(self) -> bool {
        matches!(self, RuleKind::Affinity | RuleKind::AntiAffinity)
    }

    /// Never broken by a plan.
    pub fn hard(self) -> bool {
        !matches!(self, RuleKind::ShouldRunOn | RuleKind::ShouldNotRunOn)
    }
}

impl std::fmt::Display for RuleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RuleKind {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Self, RuleError> {
        [
            RuleKind::Affinity,
            RuleKind::AntiAffinity,
            RuleKind::MustRunOn,
            RuleKind::MustNotRunOn,
            RuleKind::ShouldRunOn,
            RuleKind::ShouldNotRunOn,
        ]
        .into_iter()
        .find(|k| k.as_str() == s.replace('-', "_"))
        .ok_or_else(|| RuleError::UnknownKind(s.to_string()))
    }
}

/// One rule (`[[rule]]` in `cluster.toml`, a body of `POST /v1/rules`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique name, used in reasons and errors.
    pub name: String,
    /// What it asks.
    pub kind: RuleKind,
    /// The VMs (names).
    pub vms: Vec<String>,
    /// The hosts (names), for VM-host rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

impl Rule {
    /// `kind "name"`, as errors and reasons name a rule.
    pub fn label(&self) -> String {
        format!("{} {:?}", self.kind, self.name)
    }
}

/// Why a rule or a set of rules is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// Not one of the kinds.
    #[error("unknown rule kind {0:?} (affinity, anti_affinity, must_run_on, must_not_run_on, should_run_on, should_not_run_on)")]
    UnknownKind(String),
    /// The rule's own fields are wrong.
    #[error("rule {rule}: {what}")]
    Malformed {
        /// The rule (`kind "name"`).
        rule: String,
        /// What is wrong.
        what: String,
    },
    /// Two rules share a name.
    #[error("two rules are named {0:?}")]
    DuplicateName(String),
    /// The rules cannot all hold.
    #[error("{}", contradiction(rules, why))]
    Contradiction {
        /// The rules involved (`kind "name"`).
        rules: Vec<String>,
        /// Why.
        why: String,
    },
}

fn contradiction(rules: &[String], why: &str) -> String {
    match rules {
        [one] => format!("rule {one} cannot hold: {why}"),
        _ => format!("rules {} contradict: {why}", rules.join(" and ")),
    }
}

/// Checks one rule on its own: names, members, hosts it names (`hosts`:
/// the cluster's host names; unknown host names are refused, VMs may come
/// later).
fn check_one(r: &Rule, hosts: &[String]) -> Result<(), RuleError> {
    let bad = |what: String| RuleError::Malformed {
        rule: r.label(),
        what,
    };
    if r.name.trim().is_empty() {
        return Err(bad("the name is empty".into()));
    }
    let distinct: BTreeSet<&String> = r.vms.iter().collect();
    if distinct.len() != r.vms.len() {
        return Err(bad("a VM is listed twice".into()));
    }
    if r.kind.vm_vm() {
        if r.vms.len() < 2 {
            return Err(bad("needs at least two VMs".into()));
        }
        if !r.hosts.is_empty() {
            return Err(bad("a VM-VM rule names no hosts".into()));
        }
    } else {
        if r.vms.is_empty() {
            return Err(bad("names no VM".into()));
        }
        if r.hosts.is_empty() {
            return Err(bad("names no host".into()));
        }
        if let Some(h) = r.hosts.iter().find(|h| !hosts.contains(h)) {
            return Err(bad(format!("names unknown host {h:?}")));
        }
    }
    Ok(())
}

/// Checks a set of rules: each on its own, unique names, and no
/// contradiction between them (the first one found is returned, naming
/// the rules). `hosts` are the cluster's host names.
pub fn check(rules: &[Rule], hosts: &[String]) -> Result<(), RuleError> {
    for (i, r) in rules.iter().enumerate() {
        check_one(r, hosts)?;
        if rules[..i].iter().any(|o| o.name == r.name) {
            return Err(RuleError::DuplicateName(r.name.clone()));
        }
    }
    // VM names mentioned anywhere, indexed.
    let names: Vec<&String> = rules
        .iter()
        .flat_map(|r| &r.vms)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let idx = |n: &String| names.binary_search(&n).expect("collected above");
    // Affinity closure (union-find), remembering the rules that joined.
    let mut parent: Vec<usize> = (0..names.len()).collect();
    fn root(p: &mut [usize], mut i: usize) -> usize {
        while p[i] != i {
            p[i] = p[p[i]];
            i = p[i];
        }
        i
    }
    for r in rules.iter().filter(|r| r.kind == RuleKind::Affinity) {
        let a = idx(&r.vms[0]);
        for v in &r.vms[1..] {
            let (x, y) = (root(&mut parent, a), root(&mut parent, idx(v)));
            parent[x] = y;
        }
    }
    let group_rules = |p: &mut [usize], g: usize| -> Vec<String> {
        rules
            .iter()
            .filter(|r| r.kind == RuleKind::Affinity && root(p, idx(&r.vms[0])) == g)
            .map(Rule::label)
            .collect()
    };
    // Together and apart.
    for r in rules.iter().filter(|r| r.kind == RuleKind::AntiAffinity) {
        for (i, a) in r.vms.iter().enumerate() {
            for b in &r.vms[i + 1..] {
                let g = root(&mut parent, idx(a));
                if g == root(&mut parent, idx(b)) {
                    let mut involved = group_rules(&mut parent, g);
                    involved.push(r.label());
                    return Err(RuleError::Contradiction {
                        rules: involved,
                        why: format!("{a} and {b} must run both together and apart"),
                    });
                }
            }
        }
    }
    // Hosts each affinity group may use (the hard VM-host rules of all its
    // members).
    let mut allowed: Vec<Option<BTreeSet<&String>>> = vec![None; names.len()];
    let mut by: Vec<Vec<String>> = vec![Vec::new(); names.len()];
    for r in rules.iter().filter(|r| r.kind == RuleKind::MustRunOn) {
        for v in &r.vms {
            let g = root(&mut parent, idx(v));
            let these: BTreeSet<&String> = r.hosts.iter().collect();
            allowed[g] = Some(match allowed[g].take() {
                None => these,
                Some(a) => a.intersection(&these).copied().collect(),
            });
            if !by[g].contains(&r.label()) {
                by[g].push(r.label());
            }
        }
    }
    let all: BTreeSet<&String> = hosts.iter().collect();
    for r in rules.iter().filter(|r| r.kind == RuleKind::MustNotRunOn) {
        for v in &r.vms {
            let g = root(&mut parent, idx(v));
            let a = allowed[g].take().unwrap_or_else(|| all.clone());
            allowed[g] = Some(a.into_iter().filter(|h| !r.hosts.contains(h)).collect());
            if !by[g].contains(&r.label()) {
                by[g].push(r.label());
            }
        }
    }
    for v in 0..names.len() {
        let g = root(&mut parent, v);
        if allowed[g].as_ref().is_some_and(BTreeSet::is_empty) {
            let mut involved = group_rules(&mut parent, g);
            involved.extend(by[g].iter().cloned());
            return Err(RuleError::Contradiction {
                rules: involved,
                why: format!("no host may run {}", names[v]),
            });
        }
    }
    // Apart: as many hosts as groups to keep apart (a necessary condition;
    // the planner reports, as a note, what it still cannot place).
    for r in rules.iter().filter(|r| r.kind == RuleKind::AntiAffinity) {
        let groups: Vec<usize> = r.vms.iter().map(|v| root(&mut parent, idx(v))).collect();
        let usable: BTreeSet<&String> = groups
            .iter()
            .flat_map(|&g| allowed[g].clone().unwrap_or_else(|| all.clone()))
            .collect();
        if usable.len() < groups.len() {
            let mut involved = vec![r.label()];
            for &g in &groups {
                involved.extend(by[g].iter().cloned());
            }
            involved.dedup();
            return Err(RuleError::Contradiction {
                rules: involved,
                why: format!(
                    "{} VMs must run apart on {} allowed host(s)",
                    groups.len(),
                    usable.len()
                ),
            });
        }
    }
    Ok(())
}

/// Names and state rules need from a cluster: the daemon's [`Cluster`]
/// and the simulator's data centre both provide them.
pub trait RuleSubject {
    /// VM `v`'s name.
    fn vm_name(&self, v: VmId) -> &str;
    /// Host `h`'s name.
    fn host_name(&self, h: HostId) -> &str;
    /// Whether `h` runs VMs now (an affinity partner there holds a group).
    fn host_usable(&self, h: HostId) -> bool;
}

impl RuleSubject for Cluster {
    fn vm_name(&self, v: VmId) -> &str {
        &self.vms[v].name
    }
    fn host_name(&self, h: HostId) -> &str {
        &self.hosts[h].name
    }
    fn host_usable(&self, h: HostId) -> bool {
        self.hosts[h].usable()
    }
}

/// A rule resolved against the cluster (indices).
#[derive(Debug, Clone)]
struct Resolved {
    label: String,
    kind: RuleKind,
    vms: Vec<VmId>,
    hosts: Vec<bool>,
}

/// The cluster's rules by VM, built once per plan.
#[derive(Debug, Clone, Default)]
pub struct RuleIndex {
    rules: Vec<Resolved>,
    by_vm: Vec<Vec<usize>>,
}

impl RuleIndex {
    /// Resolves `c.rules` against the cluster's VMs and hosts.
    pub fn new(c: &Cluster) -> Self {
        let hosts: Vec<&str> = c.hosts.iter().map(|h| h.name.as_str()).collect();
        Self::resolve(&c.rules, c.vms.len(), |n| c.vm_by_name(n), &hosts)
    }

    /// Resolves `rules` against `vms` VMs (`vm_by_name` finds one) and the
    /// hosts named `hosts` (by index): what the simulator, whose VMs and
    /// hosts are not a [`Cluster`], uses.
    pub fn resolve(
        set: &[Rule],
        vms: usize,
        vm_by_name: impl Fn(&str) -> Option<VmId>,
        host_names: &[&str],
    ) -> Self {
        let mut by_vm = vec![Vec::new(); vms];
        let mut rules = Vec::new();
        for r in set {
            let vms: Vec<VmId> = r.vms.iter().filter_map(|n| vm_by_name(n)).collect();
            if vms.is_empty() {
                continue;
            }
            let hosts = host_names
                .iter()
                .map(|h| r.hosts.iter().any(|x| x == h))
                .collect();
            for &v in &vms {
                by_vm[v].push(rules.len());
            }
            rules.push(Resolved {
                label: r.label(),
                kind: r.kind,
                vms,
                hosts,
            });
        }
        Self { rules, by_vm }
    }

    /// No rule mentions any VM.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn of(&self, v: VmId) -> impl Iterator<Item = &Resolved> {
        self.by_vm
            .get(v)
            .into_iter()
            .flatten()
            .map(|&i| &self.rules[i])
    }

    /// The hard rule moving `v` to `to` would break, described, given the
    /// planned placement `at` and the hosts being emptied (`leaving`).
    pub fn blocker(
        &self,
        c: &(impl RuleSubject + ?Sized),
        v: VmId,
        to: HostId,
        at: &[Option<HostId>],
        leaving: &[bool],
    ) -> Option<String> {
        let host = c.host_name(to);
        for r in self.of(v) {
            match r.kind {
                RuleKind::MustRunOn if !r.hosts[to] => {
                    return Some(format!("{} keeps {} off {host}", r.label, c.vm_name(v)))
                }
                RuleKind::MustNotRunOn if r.hosts[to] => {
                    return Some(format!("{} keeps {} off {host}", r.label, c.vm_name(v)))
                }
                RuleKind::AntiAffinity => {
                    if let Some(&u) = r.vms.iter().find(|&&u| u != v && at[u] == Some(to)) {
                        return Some(format!(
                            "{} keeps {} apart from {} (on {host})",
                            r.label,
                            c.vm_name(v),
                            c.vm_name(u)
                        ));
                    }
                }
                RuleKind::Affinity => {
                    // Partners that stay where they are (their host is not
                    // being emptied) hold the group there.
                    let staying = r.vms.iter().find(|&&u| {
                        u != v && at[u].is_some_and(|h| h != to && c.host_usable(h) && !leaving[h])
                    });
                    if let Some(&u) = staying {
                        let h = at[u].map_or("?", |h| c.host_name(h));
                        return Some(format!(
                            "{} keeps {} with {} (on {h})",
                            r.label,
                            c.vm_name(v),
                            c.vm_name(u)
                        ));
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Affinity partners of `v` that follow it when it leads its group
    /// off `from` (placed there, not yet moved): the whole group, through
    /// chained rules too (a partner's partners), so that a group never
    /// leaves in parts.
    pub fn followers(&self, v: VmId, from: HostId, at: &[Option<HostId>]) -> Vec<VmId> {
        let mut out: Vec<VmId> = Vec::new();
        let mut next = 0;
        let mut member = v;
        loop {
            for r in self.of(member).filter(|r| r.kind == RuleKind::Affinity) {
                for &u in &r.vms {
                    if u != v && at[u] == Some(from) && !out.contains(&u) {
                        out.push(u);
                    }
                }
            }
            let Some(&m) = out.get(next) else { break };
            member = m;
            next += 1;
        }
        out
    }

    /// The soft rules of `v`, each with whether `v` on `to` meets it.
    pub fn soft(&self, v: VmId, to: HostId) -> Vec<(&str, bool)> {
        self.of(v)
            .filter_map(|r| match r.kind {
                RuleKind::ShouldRunOn => Some((r.label.as_str(), r.hosts[to])),
                RuleKind::ShouldNotRunOn => Some((r.label.as_str(), !r.hosts[to])),
                _ => None,
            })
            .collect()
    }

    /// The soft rules `v` on `to` would not meet (labels).
    pub fn soft_misses(&self, v: VmId, to: HostId) -> Vec<&str> {
        self.soft(v, to)
            .into_iter()
            .filter(|&(_, met)| !met)
            .map(|(l, _)| l)
            .collect()
    }

    /// The hard rules `v` breaks where it is now (e.g. a rule added while
    /// it ran there), described.
    pub fn broken_now(&self, c: &Cluster, v: VmId, at: &[Option<HostId>]) -> Option<String> {
        let h = at[v]?;
        for r in self.of(v) {
            let broken = match r.kind {
                RuleKind::MustRunOn => !r.hosts[h],
                RuleKind::MustNotRunOn => r.hosts[h],
                RuleKind::AntiAffinity => r.vms.iter().any(|&u| u != v && at[u] == Some(h)),
                // Split (a follower's move failed): rejoin the others.
                RuleKind::Affinity => r
                    .vms
                    .iter()
                    .any(|&u| u != v && at[u].is_some_and(|x| x != h && c.hosts[x].usable())),
                _ => false,
            };
            if broken {
                return Some(format!(
                    "{} is broken by {} on {}",
                    r.label, c.vms[v].name, c.hosts[h].name
                ));
            }
        }
        None
    }

    /// Whether any rule mentions `v`.
    pub fn mentions(&self, v: VmId) -> bool {
        self.by_vm.get(v).is_some_and(|r| !r.is_empty())
    }
}

/// The rules policy, run by the planner before balancing: a VM that
/// breaks a hard rule where it runs (a rule set while it ran there) moves
/// to a host that keeps every rule, at once (the minimum interval between
/// moves is waived); a VM missing a soft rule moves when a host meeting
/// more of them has room under `cpu_cap` and the VM may move now. What
/// cannot be fixed is a note of the plan.
pub fn enforce(c: &Cluster, cpu_cap: f64, limits: &Limits, ledger: &mut Ledger) -> Plan {
    let mut out = Plan::default();
    if ledger.rules.is_empty() {
        return out;
    }
    for v in 0..c.vms.len() {
        let Some(from) = ledger.at[v] else { continue };
        if ledger.moved[v] || !ledger.rules.mentions(v) || !c.hosts[from].usable() {
            continue;
        }
        let mips = c.vms[v].peak(3);
        let (why, fit) = if let Some(broken) = ledger.rules.broken_now(c, v, &ledger.at) {
            if !ledger.may_move(c, limits, v, true) {
                out.notes.push(format!(
                    "rules: {broken}; it waits for the per-host migration limit"
                ));
                continue;
            }
            let fit = find_target(c, ledger, limits, v, mips, cpu_cap, &|_| false);
            let fit = if fit.host.is_some() {
                fit
            } else {
                find_target(c, ledger, limits, v, mips, 1.0, &|_| false)
            };
            (broken, fit)
        } else {
            let misses = ledger.rules.soft_misses(v, from).len();
            if misses == 0 || !ledger.may_move(c, limits, v, false) {
                continue;
            }
            let fit = find_target(c, ledger, limits, v, mips, cpu_cap, &|_| false);
            match fit.host {
                Some(to) if ledger.rules.soft_misses(v, to).len() < misses => {}
                _ => continue,
            }
            let missed = ledger.rules.soft_misses(v, from).join(", ");
            (
                format!(
                    "{missed} not met by {} on {}",
                    c.vms[v].name, c.hosts[from].name
                ),
                fit,
            )
        };
        let Some(to) = fit.host else {
            out.notes.push(format!(
                "rules: {why}; no host can take it now{}",
                if fit.notes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", fit.notes.join("; "))
                }
            ));
            continue;
        };
        let followers = ledger.commit(c, limits, v, mips, to);
        out.actions.push(Action::Migrate {
            vm: v,
            from,
            to,
            reason: fit.reason(format!("rules: {why}; moving it to {}", c.hosts[to].name)),
        });
        out.followers_moved(c, v, from, to, &followers, &format!("rules: {why}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, kind: RuleKind, vms: &[&str], hosts: &[&str]) -> Rule {
        Rule {
            name: name.into(),
            kind,
            vms: vms.iter().map(|s| s.to_string()).collect(),
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn hosts() -> Vec<String> {
        vec!["h0".into(), "h1".into(), "h2".into()]
    }

    #[test]
    fn a_consistent_set_passes() {
        let rules = [
            rule("db", RuleKind::Affinity, &["a", "b"], &[]),
            rule("web", RuleKind::AntiAffinity, &["a", "c"], &[]),
            rule("pin", RuleKind::MustRunOn, &["c"], &["h1", "h2"]),
            rule("pref", RuleKind::ShouldRunOn, &["a"], &["h0"]),
        ];
        check(&rules, &hosts()).unwrap();
    }

    #[test]
    fn together_and_apart_names_both_rules() {
        let rules = [
            rule("t1", RuleKind::Affinity, &["a", "b"], &[]),
            rule("t2", RuleKind::Affinity, &["b", "c"], &[]),
            rule("apart", RuleKind::AntiAffinity, &["a", "c"], &[]),
        ];
        let e = check(&rules, &hosts()).unwrap_err().to_string();
        assert_eq!(
            e,
            "rules affinity \"t1\" and affinity \"t2\" and anti_affinity \"apart\" contradict: a and c must run both together and apart"
        );
    }

    #[test]
    fn no_host_left_names_the_rules() {
        let rules = [
            rule("t", RuleKind::Affinity, &["a", "b"], &[]),
            rule("pa", RuleKind::MustRunOn, &["a"], &["h0"]),
            rule("pb", RuleKind::MustRunOn, &["b"], &["h1"]),
        ];
        let e = check(&rules, &hosts()).unwrap_err().to_string();
        assert!(e.contains("affinity \"t\""), "{e}");
        assert!(e.contains("must_run_on \"pa\""), "{e}");
        assert!(e.contains("must_run_on \"pb\""), "{e}");
        assert!(e.ends_with("no host may run a"), "{e}");
        let rules = [
            rule("on", RuleKind::MustRunOn, &["a"], &["h0"]),
            rule("off", RuleKind::MustNotRunOn, &["a"], &["h0"]),
        ];
        let e = check(&rules, &hosts()).unwrap_err().to_string();
        assert_eq!(
            e,
            "rules must_run_on \"on\" and must_not_run_on \"off\" contradict: no host may run a"
        );
    }

    #[test]
    fn apart_needs_enough_hosts() {
        let rules = [
            rule("apart", RuleKind::AntiAffinity, &["a", "b", "c"], &[]),
            rule("pin", RuleKind::MustRunOn, &["a", "b"], &["h0", "h1"]),
            rule("pin2", RuleKind::MustRunOn, &["c"], &["h2"]),
        ];
        check(&rules, &hosts()).unwrap();
        let rules = [
            rule("apart", RuleKind::AntiAffinity, &["a", "b", "c"], &[]),
            rule("pin", RuleKind::MustRunOn, &["a", "b", "c"], &["h0", "h1"]),
        ];
        let e = check(&rules, &hosts()).unwrap_err().to_string();
        assert!(
            e.contains("3 VMs must run apart on 2 allowed host(s)"),
            "{e}"
        );
        assert!(
            e.contains("anti_affinity \"apart\" and must_run_on \"pin\""),
            "{e}"
        );
    }

    #[test]
    fn malformed_rules_are_refused_one_line_each() {
        let cases = [
            (
                rule("x", RuleKind::Affinity, &["a"], &[]),
                "rule affinity \"x\": needs at least two VMs",
            ),
            (
                rule("x", RuleKind::MustRunOn, &["a"], &["nope"]),
                "rule must_run_on \"x\": names unknown host \"nope\"",
            ),
            (
                rule("x", RuleKind::ShouldRunOn, &["a"], &[]),
                "rule should_run_on \"x\": names no host",
            ),
            (
                rule("x", RuleKind::AntiAffinity, &["a", "a"], &[]),
                "rule anti_affinity \"x\": a VM is listed twice",
            ),
        ];
        for (r, msg) in cases {
            assert_eq!(check(&[r], &hosts()).unwrap_err().to_string(), msg);
        }
        let twice = [
            rule("x", RuleKind::Affinity, &["a", "b"], &[]),
            rule("x", RuleKind::AntiAffinity, &["c", "d"], &[]),
        ];
        assert_eq!(
            check(&twice, &hosts()).unwrap_err().to_string(),
            "two rules are named \"x\""
        );
        assert_eq!(
            "together".parse::<RuleKind>().unwrap_err().to_string(),
            "unknown rule kind \"together\" (affinity, anti_affinity, must_run_on, must_not_run_on, should_run_on, should_not_run_on)"
        );
        assert_eq!(
            "anti-affinity".parse::<RuleKind>().unwrap(),
            RuleKind::AntiAffinity
        );
    }
    /// Policies with rules: each test sets a cluster up, plans, and checks
    /// what moved and what the reasons and notes say.
    mod policies {
        use super::super::*;
        use super::rule;
        use crate::model::{OnEvacuate, Vm};
        use crate::plan::balance::{self, Balance};
        use crate::plan::planner::{Planner, PolicyMode};
        use crate::plan::testkit::{add_vm, cluster, power_save_plan};
        use crate::plan::{apply, maintenance, placement, PlanError};

        fn balance_plan(c: &Cluster) -> Plan {
            let p = Balance::default();
            let mut ledger = Ledger::new(c, |v| c.vms[v].peak(p.window));
            let due = balance::overloaded_now(c, &p, &ledger);
            balance::plan(c, &p, &Limits::default(), &mut ledger, &due)
        }

        fn migrations(p: &Plan) -> Vec<(VmId, HostId, HostId)> {
            p.actions
                .iter()
                .filter_map(|a| match *a {
                    Action::Migrate { vm, from, to, .. } => Some((vm, from, to)),
                    _ => None,
                })
                .collect()
        }

        /// h0 is overloaded by a spinning VM; h1 (the best fit) runs its
        /// anti-affine peer, h2 is empty.
        fn spinning() -> Cluster {
            let mut c = cluster(3);
            add_vm(&mut c, 0, 900.0, 512); // v0: spins
            add_vm(&mut c, 0, 800.0, 2048); // v1: busy too, costlier to move
            add_vm(&mut c, 1, 200.0, 512); // v2: the peer
            c
        }

        #[test]
        fn balance_moves_the_spinning_vm_to_the_best_fit_without_rules() {
            let c = spinning();
            assert_eq!(migrations(&balance_plan(&c)), vec![(0, 0, 1)]);
        }

        #[test]
        fn balance_skips_a_target_anti_affinity_forbids_and_says_so() {
            let mut c = spinning();
            c.rules = vec![rule("apart", RuleKind::AntiAffinity, &["v0", "v2"], &[])];
            let plan = balance_plan(&c);
            assert_eq!(migrations(&plan), vec![(0, 0, 2)]);
            assert!(
                plan.actions[0]
                    .reason()
                    .contains("rules: anti_affinity \"apart\" keeps v0 apart from v2 (on h1)"),
                "{}",
                plan.actions[0].reason()
            );
        }

        #[test]
        fn balance_with_the_only_target_forbidden_moves_nothing_and_says_why() {
            let mut c = spinning();
            c.hosts.pop();
            c.rules = vec![rule("apart", RuleKind::AntiAffinity, &["v0", "v2"], &[])];
            let plan = balance_plan(&c);
            // v0 may not go to h1; v1 (2 GB) would fit, but is not enough
            // alone and pushes nothing over: it still moves if it helps.
            assert!(
                migrations(&plan).iter().all(|&(v, _, _)| v != 0),
                "{plan:?}"
            );
            assert!(
                plan.notes.iter().any(|n| n.contains("v0 does not move")
                    && n.contains("anti_affinity \"apart\" keeps v0 apart from v2 (on h1)")),
                "{:?}",
                plan.notes
            );
        }

        #[test]
        fn balance_honours_must_run_on() {
            let mut c = spinning();
            c.rules = vec![rule("pin", RuleKind::MustRunOn, &["v0"], &["h0", "h2"])];
            let plan = balance_plan(&c);
            assert_eq!(migrations(&plan), vec![(0, 0, 2)]);
            assert!(plan.actions[0]
                .reason()
                .contains("must_run_on \"pin\" keeps v0 off h1"));
        }

        #[test]
        fn balance_does_not_split_an_affinity_group() {
            let mut c = spinning();
            c.rules = vec![rule("pair", RuleKind::Affinity, &["v0", "v1"], &[])];
            let plan = balance_plan(&c);
            assert!(migrations(&plan).is_empty(), "{plan:?}");
            assert!(plan.notes.iter().any(|n| n.contains("affinity \"pair\"")));
        }

        #[test]
        fn maintenance_moves_an_affinity_group_to_one_host_with_room_for_all() {
            let mut c = cluster(3);
            let a = add_vm(&mut c, 0, 300.0, 1500);
            let b = add_vm(&mut c, 0, 300.0, 1500);
            // h1 has room for one of them only; h2 for both.
            add_vm(&mut c, 1, 300.0, 2000);
            add_vm(&mut c, 2, 300.0, 500);
            c.rules = vec![rule("pair", RuleKind::Affinity, &["v0", "v1"], &[])];
            c.hosts[0].maintenance = true;
            let mut ledger = Ledger::new(&c, |v| c.vms[v].peak(3));
            let plan = maintenance::evacuate(&c, 0, 0.8, &Limits::default(), &mut ledger).unwrap();
            let m = migrations(&plan);
            assert_eq!(m.len(), 2, "{plan:?}");
            assert!(m.iter().all(|&(_, _, to)| to == 2), "{m:?}");
            assert!(m.iter().any(|&(v, _, _)| v == a) && m.iter().any(|&(v, _, _)| v == b));
        }

        #[test]
        fn maintenance_keeps_the_room_of_a_partner_the_limit_holds_back() {
            // h0 enters maintenance with x (3000 MB) and the pair a + b
            // (1500 + 1000 MB); two migrations per host. x goes first (to
            // h3), a leads the pair to h1 (room for both) and takes h0's
            // second slot: b must wait for the next round. Its room on h1
            // stays reserved: y (1000 MB, from h2) may not take it.
            let mut c = cluster(4);
            add_vm(&mut c, 0, 100.0, 3000); // x
            let a = add_vm(&mut c, 0, 100.0, 1500);
            let b = add_vm(&mut c, 0, 100.0, 1000);
            add_vm(&mut c, 1, 100.0, 1500); // h1: 2596 MB free, a + b fit
            add_vm(&mut c, 3, 100.0, 1050); // h3: the best fit for x
            let y = add_vm(&mut c, 2, 100.0, 1000);
            c.rules = vec![rule("pair", RuleKind::Affinity, &["v1", "v2"], &[])];
            c.hosts[0].maintenance = true;
            let limits = Limits {
                max_migrations_per_host: 2,
                min_move_interval_s: 0.0,
            };
            let mut ledger = Ledger::new(&c, |v| c.vms[v].peak(3));
            let plan = maintenance::evacuate(&c, 0, 0.8, &limits, &mut ledger).unwrap();
            assert_eq!(migrations(&plan), vec![(0, 0, 3), (a, 0, 1)], "{plan:?}");
            assert_eq!(ledger.at[b], Some(0), "held back by h0's limit");
            let fit = find_target(&c, &ledger, &limits, y, 100.0, 0.8, &|h| h == 2);
            assert_eq!(fit.host, None, "b's room on h1 went to y");
        }

        #[test]
        fn restarts_reserve_a_groups_room_before_other_vms_take_it() {
            // h0 fails with a (2000 MB) and b (1000 MB), a pair, and c
            // (1000 MB, restarted before b: same size, lower id). h1 has
            // 3000 MB free, the best fit for the pair; h2 is empty. c must
            // not take b's room on h1.
            use crate::ha::restart::{plan_restarts, HaPolicy};
            let mut c = cluster(3);
            let a = add_vm(&mut c, 0, 100.0, 2000);
            let vc = add_vm(&mut c, 0, 100.0, 1000);
            let b = add_vm(&mut c, 0, 100.0, 1000);
            add_vm(&mut c, 1, 100.0, 1096);
            c.rules = vec![rule("pair", RuleKind::Affinity, &["v0", "v2"], &[])];
            let plan = plan_restarts(&c, &[0], &HaPolicy::default());
            assert!(plan.refused.is_empty(), "{plan:?}");
            let mut r = plan.restarts.clone();
            r.sort_unstable();
            assert_eq!(r, vec![(a, 1), (vc, 2), (b, 1)], "{plan:?}");
        }

        #[test]
        fn maintenance_refuses_when_rules_leave_no_host() {
            let mut c = cluster(3);
            add_vm(&mut c, 0, 100.0, 512);
            c.rules = vec![rule("pin", RuleKind::MustRunOn, &["v0"], &["h0"])];
            c.hosts[0].maintenance = true;
            let mut ledger = Ledger::new(&c, |v| c.vms[v].peak(3));
            let e = maintenance::evacuate(&c, 0, 0.8, &Limits::default(), &mut ledger).unwrap_err();
            assert!(matches!(e, PlanError::Rules { .. }));
            assert_eq!(
                e.to_string(),
                "no host may take VM v0: must_run_on \"pin\" keeps v0 off h1; must_run_on \"pin\" keeps v0 off h2"
            );
        }

        #[test]
        fn a_vm_does_not_return_home_against_a_rule() {
            let mut c = cluster(2);
            let v = add_vm(&mut c, 1, 100.0, 512);
            c.vms[v].home = Some(0);
            c.rules = vec![rule("off", RuleKind::MustNotRunOn, &["v0"], &["h0"])];
            let mut ledger = Ledger::new(&c, |v| c.vms[v].peak(3));
            let plan = maintenance::return_home(&c, 0, &Limits::default(), &mut ledger);
            assert!(plan.actions.is_empty());
            assert_eq!(
                plan.notes,
                vec!["maintenance over: v0 stays away from h0: must_not_run_on \"off\" keeps v0 off h0".to_string()]
            );
        }

        #[test]
        fn power_save_keeps_a_host_on_rather_than_break_anti_affinity() {
            let mut c = cluster(2);
            add_vm(&mut c, 0, 100.0, 512);
            add_vm(&mut c, 1, 200.0, 512);
            let run = |c: &Cluster| power_save_plan(c);
            assert_eq!(run(&c).migrations(), 1, "without the rule h0 empties");
            c.rules = vec![rule("apart", RuleKind::AntiAffinity, &["v0", "v1"], &[])];
            let plan = run(&c);
            assert_eq!(plan.migrations(), 0, "{plan:?}");
            assert!(!plan
                .actions
                .iter()
                .any(|a| matches!(a, Action::PowerOff { .. })));
            assert!(plan
                .notes
                .iter()
                .any(|n| n.contains("anti_affinity \"apart\"")));
        }

        #[test]
        fn power_save_empties_a_host_with_an_affinity_group_together() {
            let mut c = cluster(3);
            add_vm(&mut c, 0, 100.0, 512);
            add_vm(&mut c, 0, 100.0, 512);
            add_vm(&mut c, 1, 450.0, 512);
            add_vm(&mut c, 2, 500.0, 512);
            c.rules = vec![rule("pair", RuleKind::Affinity, &["v0", "v1"], &[])];
            let plan = power_save_plan(&c);
            let m = migrations(&plan);
            assert_eq!(m.len(), 2, "{plan:?}");
            assert_eq!(m[0].2, m[1].2, "the pair stays together: {m:?}");
        }

        #[test]
        fn placement_prefers_should_hosts_and_says_so() {
            let mut c = cluster(3);
            add_vm(&mut c, 1, 500.0, 512); // h1 is the best fit by load
            c.vms.push(Vm::new("new", 400.0, 512));
            let v = c.vms.len() - 1;
            assert_eq!(placement::place(&c, v, 0.9).unwrap(), 1);
            c.rules = vec![rule("pref", RuleKind::ShouldRunOn, &["new"], &["h2"])];
            assert_eq!(placement::place(&c, v, 0.9).unwrap(), 2);
            let ledger = Ledger::new(&c, |v| c.vms[v].peak(12));
            let fit = find_target(&c, &ledger, &Limits::default(), v, 400.0, 0.9, &|_| false);
            assert_eq!(fit.notes, vec!["should_run_on \"pref\" met".to_string()]);
            // Full preferred host: elsewhere, and the reason says so.
            add_vm(&mut c, 2, 100.0, 4000);
            let ledger = Ledger::new(&c, |v| c.vms[v].peak(12));
            let fit = find_target(&c, &ledger, &Limits::default(), v, 400.0, 0.9, &|_| false);
            assert_ne!(fit.host, Some(2));
            assert_eq!(
                fit.notes,
                vec!["should_run_on \"pref\" not met: no preferred host has room".to_string()]
            );
        }

        #[test]
        fn a_rule_set_while_vms_share_a_host_moves_one_of_them() {
            let mut c = cluster(2);
            add_vm(&mut c, 0, 100.0, 512);
            add_vm(&mut c, 0, 100.0, 512);
            c.rules = vec![rule("apart", RuleKind::AntiAffinity, &["v0", "v1"], &[])];
            let mut p = Planner::new(PolicyMode::Balance);
            let plan = p.plan(&c).unwrap();
            assert_eq!(plan.migrations(), 1, "{plan:?}");
            assert!(plan.actions[0].reason().starts_with(
                "rules: anti_affinity \"apart\" is broken by v0 on h0; moving it to h1"
            ));
            for a in &plan.actions {
                apply(&mut c, a);
            }
            assert_eq!(p.plan(&c).unwrap().migrations(), 0, "settled");
            // Manual mode only reports nothing and moves nothing.
            c.vms[0].host = Some(1);
            let mut p = Planner::new(PolicyMode::Manual);
            assert_eq!(p.plan(&c).unwrap().migrations(), 0);
        }

        #[test]
        fn restarts_keep_groups_together_and_hosts_allowed() {
            use crate::ha::restart::{plan_restarts, HaPolicy, RestartRefusal};
            let mut c = cluster(3);
            add_vm(&mut c, 0, 100.0, 512);
            add_vm(&mut c, 0, 100.0, 512);
            add_vm(&mut c, 0, 100.0, 512);
            add_vm(&mut c, 1, 100.0, 512);
            c.rules = vec![
                rule("pair", RuleKind::Affinity, &["v0", "v1"], &[]),
                rule("pin", RuleKind::MustNotRunOn, &["v0"], &["h1"]),
                rule("only", RuleKind::MustRunOn, &["v2"], &["h0"]),
            ];
            let plan = plan_restarts(&c, &[0], &HaPolicy::default());
            assert_eq!(plan.restarts, vec![(0, 2), (1, 2)], "{plan:?}");
            assert!(matches!(
                &plan.refused[..],
                [(2, RestartRefusal::Rules { .. })]
            ));
        }

        #[test]
        fn a_split_affinity_group_rejoins() {
            let mut c = cluster(3);
            add_vm(&mut c, 0, 100.0, 512);
            add_vm(&mut c, 1, 100.0, 512);
            c.rules = vec![rule("pair", RuleKind::Affinity, &["v0", "v1"], &[])];
            let plan = Planner::new(PolicyMode::Balance).plan(&c).unwrap();
            assert_eq!(migrations(&plan), vec![(0, 0, 1)]);
            assert!(plan.actions[0]
                .reason()
                .starts_with("rules: affinity \"pair\" is broken by v0 on h0; moving it to h1"));
        }

        #[test]
        fn shutdown_vms_are_not_counted_as_partners() {
            let mut c = cluster(2);
            add_vm(&mut c, 0, 100.0, 512);
            add_vm(&mut c, 1, 100.0, 512);
            c.vms[1].host = None;
            c.vms[1].on_evacuate = OnEvacuate::Shutdown;
            c.rules = vec![rule("pair", RuleKind::Affinity, &["v0", "v1"], &[])];
            c.hosts[0].maintenance = true;
            let mut ledger = Ledger::new(&c, |v| c.vms[v].peak(3));
            let plan = maintenance::evacuate(&c, 0, 0.8, &Limits::default(), &mut ledger).unwrap();
            assert_eq!(migrations(&plan), vec![(0, 0, 1)]);
        }
    }

    /// Whatever the cluster and the (consistent) rules, no policy breaks a
    /// hard rule: rounds of the planner (both policies, a host entering
    /// maintenance) starting from a placement that keeps every rule keep
    /// anti-affinity and VM-host rules at every step, and affinity among
    /// the members on usable hosts.
    mod property {
        use super::super::*;
        use crate::model::Vm;
        use crate::plan::apply;
        use crate::plan::planner::{Planner, PolicyMode};
        use crate::plan::testkit::cluster;
        use proptest::prelude::*;

        fn hard_rules_hold(c: &Cluster) -> Result<(), String> {
            for r in &c.rules {
                let at: Vec<(String, HostId)> = r
                    .vms
                    .iter()
                    .filter_map(|n| c.vm_by_name(n))
                    .filter_map(|v| c.vms[v].host.map(|h| (c.vms[v].name.clone(), h)))
                    .collect();
                let on = |h: HostId| r.hosts.contains(&c.hosts[h].name);
                let ok = match r.kind {
                    RuleKind::MustRunOn => at.iter().all(|&(_, h)| on(h)),
                    RuleKind::MustNotRunOn => at.iter().all(|&(_, h)| !on(h)),
                    RuleKind::AntiAffinity => {
                        let hosts: BTreeSet<HostId> = at.iter().map(|&(_, h)| h).collect();
                        hosts.len() == at.len()
                    }
                    RuleKind::Affinity => {
                        let hosts: BTreeSet<HostId> = at
                            .iter()
                            .map(|&(_, h)| h)
                            .filter(|&h| c.hosts[h].usable())
                            .collect();
                        hosts.len() <= 1
                    }
                    _ => true,
                };
                if !ok {
                    return Err(format!("{} broken: {at:?}", r.label()));
                }
            }
            Ok(())
        }

        /// VMs (host, demand, MB); raw rules (kind, VM indices, host
        /// indices); the host that enters maintenance.
        type Case = (
            Vec<(usize, f64, u64)>,
            Vec<(u8, Vec<usize>, Vec<usize>)>,
            usize,
        );

        fn arb_case() -> impl Strategy<Value = Case> {
            (
                prop::collection::vec((0usize..4, 50.0f64..900.0, 128u64..1024), 2..10),
                prop::collection::vec(
                    (
                        0u8..6,
                        prop::collection::vec(0usize..10, 1..4),
                        prop::collection::vec(0usize..4, 1..3),
                    ),
                    0..5,
                ),
                0usize..4,
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]
            #[test]
            fn no_policy_breaks_a_hard_rule((vms, raw, maint) in arb_case()) {
                let mut c = cluster(4);
                for (i, &(h, d, m)) in vms.iter().enumerate() {
                    let mut vm = Vm::new(&format!("v{i}"), 1000.0, m);
                    vm.host = Some(h);
                    for _ in 0..12 {
                        vm.record(d);
                    }
                    c.vms.push(vm);
                }
                let names: Vec<String> = c.hosts.iter().map(|h| h.name.clone()).collect();
                // Keep the rules that are consistent and hold now.
                for (i, (k, vs, hs)) in raw.into_iter().enumerate() {
                    let kind = [
                        RuleKind::Affinity,
                        RuleKind::AntiAffinity,
                        RuleKind::MustRunOn,
                        RuleKind::MustNotRunOn,
                        RuleKind::ShouldRunOn,
                        RuleKind::ShouldNotRunOn,
                    ][usize::from(k)];
                    let mut vms: Vec<String> = vs.iter().map(|v| format!("v{}", v % c.vms.len())).collect();
                    vms.sort();
                    vms.dedup();
                    let mut hosts: Vec<String> = hs.iter().map(|&h| names[h].clone()).collect();
                    hosts.sort();
                    hosts.dedup();
                    if kind.vm_vm() {
                        hosts.clear();
                    }
                    let r = Rule { name: format!("r{i}"), kind, vms, hosts };
                    let mut trial = c.rules.clone();
                    trial.push(r);
                    let before = c.rules.clone();
                    c.rules = trial;
                    if check(&c.rules, &names).is_err() || hard_rules_hold(&c).is_err() {
                        c.rules = before;
                    }
                }
                let mut p = Planner::new(PolicyMode::Both);
                p.ferry.limits.min_move_interval_s = 0.0;
                for round in 0..12 {
                    if round == 3 {
                        c.hosts[maint].maintenance = true;
                    }
                    if round == 8 {
                        c.hosts[maint].maintenance = false;
                    }
                    let Ok(plan) = p.plan(&c) else { continue };
                    // Within a plan an affinity group moves one VM at a
                    // time; once the plan is done every rule holds.
                    for a in &plan.actions {
                        apply(&mut c, a);
                    }
                    prop_assert!(hard_rules_hold(&c).is_ok(), "after {plan:?}: {:?}", hard_rules_hold(&c));
                    c.now += 700.0;
                }
            }
        }
    }
}
