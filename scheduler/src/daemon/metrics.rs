//! Prometheus metrics of the daemon and of every agent, through
//! `prometheus-client` (text format 0.0.4; label values escaped, so a host
//! named `a"b` cannot break a scrape).
//!
//! [`MigrationMetrics`] is shared by both: migrations done and failed, and
//! histograms of their duration, guest downtime and bytes moved.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What one finished migration measured (each part when known).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MigrationMeasure {
    /// Wall time, s.
    pub seconds: f64,
    /// Guest pause, ms.
    pub downtime_ms: Option<f64>,
    /// Bytes moved.
    pub bytes: Option<u64>,
}

/// Migration counters and histograms.
#[derive(Debug, Clone)]
pub struct MigrationMetrics {
    done: Counter,
    failed: Counter,
    duration: Histogram,
    downtime: Histogram,
    bytes: Histogram,
}

impl MigrationMetrics {
    /// Registers them in `registry` under `prefix` (`ferry_sched`,
    /// `ferry_agent`).
    pub fn register(registry: &mut Registry, prefix: &str) -> Self {
        let m = Self {
            done: Counter::default(),
            failed: Counter::default(),
            // 50 ms .. ~15 min.
            duration: Histogram::new(exponential_buckets(0.05, 2.0, 15)),
            // 1 ms .. ~16 s.
            downtime: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            // 1 MiB .. 64 GiB.
            bytes: Histogram::new(exponential_buckets(1048576.0, 4.0, 9)),
        };
        registry.register(
            format!("{prefix}_migrations"),
            "Migrations completed",
            m.done.clone(),
        );
        registry.register(
            format!("{prefix}_migrations_failed"),
            "Migrations failed (the VM stayed on its source)",
            m.failed.clone(),
        );
        registry.register(
            format!("{prefix}_migration_duration_seconds"),
            "Wall time of completed migrations",
            m.duration.clone(),
        );
        registry.register(
            format!("{prefix}_migration_downtime_milliseconds"),
            "Guest pause of completed migrations",
            m.downtime.clone(),
        );
        registry.register(
            format!("{prefix}_migration_bytes"),
            "Bytes moved by completed migrations",
            m.bytes.clone(),
        );
        m
    }

    /// A migration completed.
    pub fn done(&self, m: &MigrationMeasure) {
        self.done.inc();
        self.duration.observe(m.seconds);
        if let Some(d) = m.downtime_ms {
            self.downtime.observe(d);
        }
        if let Some(b) = m.bytes {
            self.bytes.observe(b as f64);
        }
    }

    /// A migration failed.
    pub fn failed(&self) {
        self.failed.inc();
    }
}

/// A `host` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabel {
    /// The host's name.
    pub host: String,
}

/// The daemon's metrics.
#[derive(Debug)]
pub struct DaemonMetrics {
    registry: Registry,
    /// Migrations.
    pub migrations: MigrationMetrics,
    /// Planning rounds.
    pub rounds: Counter,
    /// Hosts powered on.
    pub power_on: Counter,
    /// Hosts powered off.
    pub power_off: Counter,
    /// Power operations that failed or were refused.
    pub power_failed: Counter,
    /// Inventory requests that failed.
    pub inventory_failed: Counter,
    /// Hosts powered on now.
    pub hosts_on: Gauge,
    /// Configuration entries left out.
    pub config_problems: Gauge,
    /// CPU demand over capacity, per host.
    pub cpu_demand_ratio: Family<HostLabel, Gauge<f64, AtomicU64>>,
    /// 1 in maintenance, per host.
    pub maintenance: Family<HostLabel, Gauge>,
    /// 1 reachable, 0 not, per host (absent: not asked).
    pub reachable: Family<HostLabel, Gauge>,
    /// High availability on the cluster store (zero without `--etcd`).
    pub ha: HaMetrics,
}

/// The HA metrics of a daemon on the cluster store.
#[derive(Debug, Clone)]
pub struct HaMetrics {
    /// Times this daemon became the leader (failovers to it).
    pub leaderships: Counter,
    /// 1 while this daemon leads.
    pub leading: Gauge,
    /// Host leases seen expire.
    pub hosts_dead: Counter,
    /// VMs restarted after their host died.
    pub restarts: Counter,
    /// Restarts refused (disabled, no room, the store said no).
    pub restarts_refused: Counter,
    /// Restarts whose start failed (retried).
    pub restarts_failed: Counter,
    /// From a host's lease seen expired to its VM running elsewhere.
    pub restart_seconds: Histogram,
    /// Ownership swaps of migrations, right before the pause (and GO).
    pub ownership_swap_ms: Histogram,
    /// Dead hosts fenced from outside (power-off confirmed).
    pub fences: Counter,
    /// Fences that failed (retried; the host's restarts held).
    pub fences_failed: Counter,
}

impl HaMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            leaderships: Counter::default(),
            leading: Gauge::default(),
            hosts_dead: Counter::default(),
            restarts: Counter::default(),
            restarts_refused: Counter::default(),
            restarts_failed: Counter::default(),
            // 50 ms .. ~14 min.
            restart_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 15)),
            // 0.1 ms .. ~1.6 s.
            ownership_swap_ms: Histogram::new(exponential_buckets(0.1, 2.0, 15)),
            fences: Counter::default(),
            fences_failed: Counter::default(),
        };
        registry.register(
            "ferry_sched_ha_leaderships",
            "Times this daemon became the leader",
            m.leaderships.clone(),
        );
        registry.register(
            "ferry_sched_ha_leading",
            "1 while this daemon leads",
            m.leading.clone(),
        );
        registry.register(
            "ferry_sched_ha_hosts_dead",
            "Host leases seen expire",
            m.hosts_dead.clone(),
        );
        registry.register(
            "ferry_sched_ha_restarts",
            "VMs restarted after their host died",
            m.restarts.clone(),
        );
        registry.register(
            "ferry_sched_ha_restarts_refused",
            "Restarts refused (disabled, no room, refused by the store)",
            m.restarts_refused.clone(),
        );
        registry.register(
            "ferry_sched_ha_restarts_failed",
            "Restarts whose start failed (retried)",
            m.restarts_failed.clone(),
        );
        registry.register(
            "ferry_sched_ha_restart_seconds",
            "From a host's lease seen expired to its VM running elsewhere",
            m.restart_seconds.clone(),
        );
        registry.register(
            "ferry_sched_ha_ownership_swap_milliseconds",
            "Ownership swaps of migrations, made right before the pause (and GO)",
            m.ownership_swap_ms.clone(),
        );
        registry.register(
            "ferry_sched_ha_fences",
            "Dead hosts fenced from outside (power-off confirmed by their fence driver)",
            m.fences.clone(),
        );
        registry.register(
            "ferry_sched_ha_fences_failed",
            "Fences that failed (retried; the host's VMs are not restarted meanwhile)",
            m.fences_failed.clone(),
        );
        m
    }
}

impl Default for DaemonMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let migrations = MigrationMetrics::register(&mut registry, "ferry_sched");
        let m = Self {
            migrations,
            rounds: Counter::default(),
            power_on: Counter::default(),
            power_off: Counter::default(),
            power_failed: Counter::default(),
            inventory_failed: Counter::default(),
            hosts_on: Gauge::default(),
            config_problems: Gauge::default(),
            cpu_demand_ratio: Family::default(),
            maintenance: Family::default(),
            reachable: Family::default(),
            ha: HaMetrics::register(&mut registry),
            registry: Registry::default(),
        };
        registry.register("ferry_sched_rounds", "Planning rounds", m.rounds.clone());
        registry.register(
            "ferry_sched_power_on",
            "Hosts powered on",
            m.power_on.clone(),
        );
        registry.register(
            "ferry_sched_power_off",
            "Hosts powered off",
            m.power_off.clone(),
        );
        registry.register(
            "ferry_sched_power_failed",
            "Power operations failed or refused",
            m.power_failed.clone(),
        );
        registry.register(
            "ferry_sched_inventory_failed",
            "Inventory requests failed",
            m.inventory_failed.clone(),
        );
        registry.register(
            "ferry_sched_hosts_on",
            "Hosts powered on now",
            m.hosts_on.clone(),
        );
        registry.register(
            "ferry_sched_config_problems",
            "Configuration entries left out",
            m.config_problems.clone(),
        );
        registry.register(
            "ferry_sched_host_cpu_demand_ratio",
            "CPU demand over capacity",
            m.cpu_demand_ratio.clone(),
        );
        registry.register(
            "ferry_sched_host_maintenance",
            "Host in maintenance",
            m.maintenance.clone(),
        );
        registry.register(
            "ferry_sched_host_reachable",
            "Host's agent or libvirt connection answers",
            m.reachable.clone(),
        );
        Self { registry, ..m }
    }
}

impl DaemonMetrics {
    /// The text exposition.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

/// `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let m = DaemonMetrics::default();
        m.maintenance
            .get_or_create(&HostLabel {
                host: "a\"b\\c\nd".into(),
            })
            .set(1);
        let text = m.encode();
        assert!(
            text.contains(r#"ferry_sched_host_maintenance{host="a\"b\\c\nd"} 1"#),
            "{text}"
        );
        // Every sample line is name{labels} value: no line broken by the name.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(l.starts_with("ferry_sched_"), "{l:?} in\n{text}");
        }
    }

    #[test]
    fn a_migration_is_counted_and_measured() {
        let m = DaemonMetrics::default();
        m.migrations.done(&MigrationMeasure {
            seconds: 2.5,
            downtime_ms: Some(40.0),
            bytes: Some(64 << 20),
        });
        m.migrations.failed();
        let text = m.encode();
        for want in [
            "ferry_sched_migrations_total 1\n",
            "ferry_sched_migrations_failed_total 1\n",
            "ferry_sched_migration_duration_seconds_count 1\n",
            "ferry_sched_migration_downtime_milliseconds_sum 40",
            "ferry_sched_migration_bytes_count 1\n",
        ] {
            assert!(text.contains(want), "{want:?} missing in\n{text}");
        }
    }
}
