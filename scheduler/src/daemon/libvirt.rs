//! libvirt hosts as first-class hosts (feature `libvirt`, needs
//! libvirt-dev): [`LibvirtHosts`] is the [`Executor`] for hosts whose
//! `cluster.toml` entry has a `libvirt` URI instead of an `agent`.
//!
//! - **Inventory and live stats** from one `virConnectGetAllDomainStats`
//!   call per host: state, CPU time (its rate over the last interval times
//!   the host's MIPS per core is the VM's demand), balloon maximum (memory).
//! - **Live migration** with `virDomainMigrate3` (managed direct: the daemon
//!   holds both connections), `VIR_MIGRATE_LIVE`, libvirt's bandwidth and
//!   downtime limits and QEMU multifd (`parallel_connections`). With
//!   `[libvirt] socket_dir` set, the stream goes through **ferry's tunnel**
//!   (lanes, LZ4, mutual TLS): libvirt is given `unix://SOCKET_DIR/NAME.sock`,
//!   the tunnel's source end listens on the source host's view of that
//!   path and its destination end connects to the destination host's view.
//! - **VMs with local disks** (a `<disk type='file'>` or `'block'` in their
//!   definition, unless `shared_storage`) move with them:
//!   `VIR_MIGRATE_NON_SHARED_DISK`, the disk stream (NBD) through a second
//!   tunnel (`disks_uri`). The destination must hold an image of the same
//!   size at the same path (as with `virsh migrate --copy-storage-all`).
//! - A migration libvirt refuses or fails leaves the VM running where it
//!   was (libvirt rolls back); the error carries libvirt's own text.

use std::collections::HashMap;
use std::ffi::CStr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_transport::tunnel::{Tunnel, TunnelError, TunnelHandle, TunnelOptions};
use ferry_transport::{LaneOptions, Security, TlsFiles, TlsSettings};
use virt::connect::Connect;
use virt::domain::MigrateParameters;
use virt::sys;

use super::agent::{ExecError, Executor};
use super::config::LibvirtSection;
use super::metrics::MigrationMeasure;
use super::protocol::{AgentStatus, AgentVm};

/// Why a libvirt operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// Connecting failed.
    #[error("cannot connect to libvirt at {uri}")]
    Connect {
        /// The URI.
        uri: String,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// A query failed.
    #[error("libvirt {what} failed")]
    Query {
        /// What was asked.
        what: String,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// libvirt refused or failed the migration; the VM still runs on its source.
    #[error("libvirt did not migrate {vm} to {to}")]
    Migrate {
        /// The VM.
        vm: String,
        /// Target host.
        to: String,
        /// libvirt's own error.
        #[source]
        source: virt::error::Error,
    },
    /// A tunnel end could not start.
    #[error("ferry tunnel for {vm} ({what})")]
    Tunnel {
        /// The VM.
        vm: String,
        /// Which end.
        what: &'static str,
        /// The tunnel's error.
        #[source]
        source: Box<TunnelError>,
    },
    /// The tunnel's TLS files could not be loaded.
    #[error("[libvirt] tls")]
    Tls(#[source] ferry_transport::tls::TlsError),
    /// A VM did not stop after an ACPI shutdown request.
    #[error("{vm} did not shut down within {timeout:?}")]
    ShutdownTimeout {
        /// The VM.
        vm: String,
        /// How long it was given.
        timeout: Duration,
    },
}

fn query(what: impl Into<String>) -> impl FnOnce(virt::error::Error) -> LibvirtError {
    let what = what.into();
    move |source| LibvirtError::Query { what, source }
}

/// One libvirt host.
#[derive(Debug)]
pub struct LibvirtHost {
    /// The connection URI.
    pub uri: String,
    /// MIPS of one host CPU (turns CPU time into demand).
    pub core_mips: f64,
    /// Where the daemon reaches this host's view of `[libvirt] socket_dir`.
    pub tunnel_dir: Option<PathBuf>,
}

/// One domain as the stats call reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainStats {
    /// Name.
    pub name: String,
    /// Running (or blocked, or paused for the switch-over of a migration).
    pub running: bool,
    /// CPU time used so far, ns.
    pub cpu_time_ns: u64,
    /// Memory the guest may use, KiB.
    pub mem_kib: u64,
    /// Its virtual CPUs.
    pub vcpus: u32,
}

/// `virConnectGetAllDomainStats` for state, CPU, balloon and vCPUs, every
/// domain.
pub fn all_domain_stats(conn: &Connect) -> Result<Vec<DomainStats>, LibvirtError> {
    let mut records: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    let stats = sys::VIR_DOMAIN_STATS_STATE
        | sys::VIR_DOMAIN_STATS_CPU_TOTAL
        | sys::VIR_DOMAIN_STATS_BALLOON
        | sys::VIR_DOMAIN_STATS_VCPU;
    // SAFETY: the pointer is only used while `conn` is borrowed (below).
    let conn_ptr = unsafe { conn.as_ptr() };
    // SAFETY: a live connection pointer, a valid out-pointer; on success
    // libvirt stores an array of `n` records we free below.
    let n = unsafe { sys::virConnectGetAllDomainStats(conn_ptr, stats, &mut records, 0) };
    if n < 0 {
        return Err(LibvirtError::Query {
            what: "all domain stats".into(),
            source: virt::error::Error::last_error(),
        });
    }
    let count = usize::try_from(n).unwrap_or(0);
    let list: &[sys::virDomainStatsRecordPtr] = if count == 0 || records.is_null() {
        &[]
    } else {
        // SAFETY: libvirt stored `n` record pointers at `records`; the
        // slice is not used after the list is freed below.
        unsafe { std::slice::from_raw_parts(records, count) }
    };
    let mut out = Vec::with_capacity(count);
    for &rec_ptr in list {
        // SAFETY: each of them points to a record libvirt filled in.
        let rec = unsafe { &*rec_ptr };
        // SAFETY: `rec.dom` is a domain the record holds a reference to; the
        // name it returns lives as long as the domain, and we copy it now.
        let name_ptr = unsafe { sys::virDomainGetName(rec.dom) };
        if name_ptr.is_null() {
            continue;
        }
        // SAFETY: non-null, NUL-terminated, owned by the domain (alive).
        let name = unsafe { CStr::from_ptr(name_ptr) }
            .to_string_lossy()
            .into_owned();
        let params: &[sys::virTypedParameter] = match usize::try_from(rec.nparams) {
            // SAFETY: libvirt gives `nparams` parameters at `params`.
            Ok(len) if len > 0 && !rec.params.is_null() => unsafe {
                std::slice::from_raw_parts(rec.params, len)
            },
            _ => &[],
        };
        let mut d = DomainStats {
            name,
            running: false,
            cpu_time_ns: 0,
            mem_kib: 0,
            vcpus: 0,
        };
        let mut current_kib = 0;
        for p in params {
            // SAFETY: `field` is a NUL-terminated array inside the parameter.
            let field = unsafe { CStr::from_ptr(p.field.as_ptr()) }.to_bytes();
            let int = || typed_u64(p);
            match field {
                b"state.state" => {
                    d.running = matches!(
                        int().and_then(|v| u32::try_from(v).ok()),
                        Some(
                            sys::VIR_DOMAIN_RUNNING
                                | sys::VIR_DOMAIN_BLOCKED
                                | sys::VIR_DOMAIN_PAUSED
                        )
                    )
                }
                b"cpu.time" => d.cpu_time_ns = int().unwrap_or(0),
                b"balloon.maximum" => d.mem_kib = int().unwrap_or(0),
                b"balloon.current" => current_kib = int().unwrap_or(0),
                b"vcpu.current" => d.vcpus = int().and_then(|v| u32::try_from(v).ok()).unwrap_or(0),
                _ => {}
            }
        }
        if d.mem_kib == 0 {
            d.mem_kib = current_kib;
        }
        out.push(d);
    }
    // SAFETY: frees the list and the references it holds, once; nothing
    // borrowed from it is used after this point (names were copied).
    unsafe { sys::virDomainStatsRecordListFree(records) };
    Ok(out)
}

/// An integer typed parameter's value.
fn typed_u64(p: &sys::virTypedParameter) -> Option<u64> {
    let t = u32::try_from(p.type_).ok()?;
    let v = p.value;
    match t {
        sys::VIR_TYPED_PARAM_INT => {
            // SAFETY: `type_` says the `i` member is set.
            let i = unsafe { v.i };
            u64::try_from(i).ok()
        }
        sys::VIR_TYPED_PARAM_UINT => {
            // SAFETY: `type_` says the `ui` member is set.
            let ui = unsafe { v.ui };
            Some(u64::from(ui))
        }
        sys::VIR_TYPED_PARAM_LLONG => {
            // SAFETY: `type_` says the `l` member is set.
            let l = unsafe { v.l };
            u64::try_from(l).ok()
        }
        sys::VIR_TYPED_PARAM_ULLONG => {
            // SAFETY: `type_` says the `ul` member is set.
            Some(unsafe { v.ul })
        }
        _ => None,
    }
}

/// The executor for libvirt hosts.
#[derive(Debug)]
pub struct LibvirtHosts {
    hosts: HashMap<String, LibvirtHost>,
    settings: LibvirtSection,
    security: Security,
    /// Last CPU sample per (host, domain).
    samples: Mutex<HashMap<(String, String), CpuSample>>,
    seq: AtomicU64,
    /// Bytes carried by the tunnels of finished migrations.
    pub tunnel_bytes: AtomicU64,
}

/// A domain's CPU time at one moment, and the demand computed then.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    cpu_ns: u64,
    at: Instant,
    mips: f64,
}

/// Shortest interval a CPU demand is measured over: shorter ones are noise
/// (start-up threads, scheduling jitter).
pub const MIN_SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

/// How long a VM is given to stop after an ACPI shutdown.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);

impl LibvirtHosts {
    /// An executor for `hosts` (name -> host) with the `[libvirt]` settings
    /// (defaults when absent: libvirt's own transport, no tunnel).
    pub fn new(
        hosts: HashMap<String, LibvirtHost>,
        settings: Option<LibvirtSection>,
    ) -> Result<Self, LibvirtError> {
        let settings = settings.unwrap_or_else(|| LibvirtSection {
            socket_dir: None,
            tunnel_ip: "127.0.0.1".into(),
            lanes: 2,
            lz4: true,
            max_bandwidth: None,
            bandwidth_mib_s: None,
            max_downtime_ms: None,
            parallel_connections: None,
            shared_storage: false,
            tls: None,
            insecure: false,
        });
        let security = match &settings.tls {
            Some(t) => Security::Tls(Arc::new(
                TlsSettings::from_files(
                    &TlsFiles {
                        cert: t.cert.clone(),
                        key: t.key.clone(),
                        ca: t.ca.clone(),
                    },
                    &t.server_name,
                )
                .map_err(LibvirtError::Tls)?,
            )),
            None => Security::Insecure,
        };
        Ok(Self {
            hosts,
            settings,
            security,
            samples: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            tunnel_bytes: AtomicU64::new(0),
        })
    }

    /// Whether `host` is one of these.
    pub fn has(&self, host: &str) -> bool {
        self.hosts.contains_key(host)
    }

    fn host(&self, name: &str) -> Result<&LibvirtHost, ExecError> {
        self.hosts
            .get(name)
            .ok_or_else(|| ExecError::NoAgent(name.to_string()))
    }

    fn open(&self, name: &str) -> Result<(&LibvirtHost, Connect), ExecError> {
        let h = self.host(name)?;
        let conn = Connect::open(Some(&h.uri)).map_err(|source| ExecError::Libvirt {
            host: name.to_string(),
            source: Box::new(LibvirtError::Connect {
                uri: h.uri.clone(),
                source,
            }),
        })?;
        Ok((h, conn))
    }

    fn tunnel_options(&self) -> TunnelOptions {
        let mut lanes = LaneOptions::new(self.settings.lanes.max(1), self.security.clone());
        lanes.max_bandwidth = self.settings.max_bandwidth;
        let mut opts = TunnelOptions::new(lanes);
        opts.lz4 = self.settings.lz4;
        opts
    }

    /// A tunnel pair for one stream named `sock`: the destination end
    /// connects to `to`'s view of it, the source end listens on `from`'s.
    fn tunnel_pair(
        &self,
        vm: &str,
        sock: &str,
        from: &LibvirtHost,
        to: &LibvirtHost,
    ) -> Result<(TunnelHandle, TunnelHandle), LibvirtError> {
        let dir = |h: &LibvirtHost| {
            h.tunnel_dir
                .clone()
                .or_else(|| self.settings.socket_dir.clone())
                .unwrap_or_default()
        };
        let opts = self.tunnel_options();
        let err = |what| {
            let vm = vm.to_string();
            move |source| LibvirtError::Tunnel {
                vm,
                what,
                source: Box::new(source),
            }
        };
        let dst = Tunnel::destination(
            &format!("{}:0", self.settings.tunnel_ip),
            &dir(to).join(sock),
            &opts,
        )
        .map_err(err("destination end"))?;
        let addr = dst.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let src_path = dir(from).join(sock);
        let _ = std::fs::remove_file(&src_path);
        let src = Tunnel::source(&src_path, &addr, &opts).map_err(err("source end"))?;
        Ok((src, dst))
    }

    fn migrate_inner(&self, vm: &str, from: &str, to: &str) -> Result<MigrationMeasure, ExecError> {
        let (src_host, src) = self.open(from)?;
        let (dst_host, dst) = self.open(to)?;
        let lv = |host: &str| {
            let host = host.to_string();
            move |source| ExecError::Libvirt {
                host,
                source: Box::new(source),
            }
        };
        let dom = src
            .lookup_domain_by_name(vm)
            .map_err(query(format!("lookup of {vm}")))
            .map_err(lv(from))?;
        let mut flags = sys::VIR_MIGRATE_LIVE;
        if dom.is_persistent().unwrap_or(false) {
            flags |= sys::VIR_MIGRATE_PERSIST_DEST | sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        }
        let xml = dom
            .xml_desc(0)
            .map_err(query(format!("definition of {vm}")))
            .map_err(lv(from))?;
        let local_disks = !self.settings.shared_storage && has_local_disk(&xml);
        let mut params = MigrateParameters {
            bandwidth: self.settings.bandwidth_mib_s,
            ..MigrateParameters::default()
        };
        if let Some(n) = self.settings.parallel_connections {
            flags |= sys::VIR_MIGRATE_PARALLEL;
            params.parallel_connections = i32::try_from(n).ok();
        }
        if let Some(ms) = self.settings.max_downtime_ms {
            dom.migrate_set_max_downtime(ms, 0)
                .map_err(query("setting the maximum downtime"))
                .map_err(lv(from))?;
        }
        let mut tunnels = Vec::new();
        if let Some(dir) = &self.settings.socket_dir {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let sock = format!("ferry-{}-{seq}.sock", std::process::id());
            tunnels.push(
                self.tunnel_pair(vm, &sock, src_host, dst_host)
                    .map_err(lv(from))?,
            );
            params.uri = Some(format!("unix://{}", dir.join(&sock).display()));
            if local_disks {
                let disks = format!("ferry-{}-{seq}-disks.sock", std::process::id());
                tunnels.push(
                    self.tunnel_pair(vm, &disks, src_host, dst_host)
                        .map_err(lv(from))?,
                );
                params.disks_uri = Some(format!("unix://{}", dir.join(&disks).display()));
            }
        }
        if local_disks {
            flags |= sys::VIR_MIGRATE_NON_SHARED_DISK;
        }
        tracing::info!(
            vm,
            from,
            to,
            local_disks,
            tunnel = !tunnels.is_empty(),
            "libvirt migration starts"
        );
        let started = Instant::now();
        let result = dom.migrate3(&dst, params, flags);
        let mut bytes = None;
        for (s, d) in tunnels {
            let b = s.stats().bytes_from_local.load(Ordering::Relaxed);
            *bytes.get_or_insert(0) += b;
            self.tunnel_bytes.fetch_add(b, Ordering::Relaxed);
            let _ = s.stop();
            let _ = d.stop();
        }
        match result {
            Ok(_) => {
                let seconds = started.elapsed().as_secs_f64();
                tracing::info!(vm, from, to, seconds, bytes, "libvirt migration done");
                Ok(MigrationMeasure {
                    seconds,
                    downtime_ms: None,
                    bytes,
                })
            }
            Err(source) => Err(ExecError::Libvirt {
                host: from.to_string(),
                source: Box::new(LibvirtError::Migrate {
                    vm: vm.to_string(),
                    to: to.to_string(),
                    source,
                }),
            }),
        }
    }
}

/// Whether a domain definition has a disk backed by a local file or device.
fn has_local_disk(xml: &str) -> bool {
    xml.split("<disk ").skip(1).any(|d| {
        let head = d.split('>').next().unwrap_or("");
        (head.contains("type='file'") || head.contains("type='block'"))
            && head.contains("device='disk'")
    })
}

impl Executor for LibvirtHosts {
    fn status(&self, host: &str) -> Result<AgentStatus, ExecError> {
        let (h, conn) = self.open(host)?;
        let stats = all_domain_stats(&conn).map_err(|source| ExecError::Libvirt {
            host: host.to_string(),
            source: Box::new(source),
        })?;
        let now = Instant::now();
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let mut vms: Vec<AgentVm> = stats
            .into_iter()
            .map(|d| {
                let key = (host.to_string(), d.name.clone());
                let cpu_mips = match samples.get(&key).copied() {
                    // Too soon after the last sample to say anything new.
                    Some(s) if now.duration_since(s.at) < MIN_SAMPLE_INTERVAL => s.mips,
                    last => {
                        let mips = last.map_or(0.0, |s| {
                            let wall = now.duration_since(s.at).as_secs_f64();
                            let cores = d.cpu_time_ns.saturating_sub(s.cpu_ns) as f64 / 1e9 / wall;
                            // Never more than its vCPUs can use.
                            cores.min(f64::from(d.vcpus.max(1))) * h.core_mips
                        });
                        samples.insert(
                            key,
                            CpuSample {
                                cpu_ns: d.cpu_time_ns,
                                at: now,
                                mips,
                            },
                        );
                        mips
                    }
                };
                AgentVm {
                    name: d.name,
                    mem_mb: d.mem_kib / 1024,
                    cpu_mips,
                    running: d.running,
                }
            })
            .collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(AgentStatus {
            host: host.to_string(),
            vms,
        })
    }

    fn migrate(&self, vm: &str, from: &str, to: &str) -> Result<MigrationMeasure, ExecError> {
        self.migrate_inner(vm, from, to)
    }

    fn shutdown_vm(&self, vm: &str, host: &str) -> Result<(), ExecError> {
        let (_, conn) = self.open(host)?;
        let lv = |source| ExecError::Libvirt {
            host: host.to_string(),
            source: Box::new(source),
        };
        let dom = conn
            .lookup_domain_by_name(vm)
            .map_err(query(format!("lookup of {vm}")))
            .map_err(lv)?;
        dom.shutdown()
            .map_err(query(format!("shutdown of {vm}")))
            .map_err(lv)?;
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        while dom.is_active().unwrap_or(false) {
            if Instant::now() > deadline {
                return Err(lv(LibvirtError::ShutdownTimeout {
                    vm: vm.to_string(),
                    timeout: SHUTDOWN_TIMEOUT,
                }));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    fn start_vm(&self, vm: &str, _mem_mb: u64, host: &str) -> Result<(), ExecError> {
        let (_, conn) = self.open(host)?;
        let lv = |source| ExecError::Libvirt {
            host: host.to_string(),
            source: Box::new(source),
        };
        let dom = conn
            .lookup_domain_by_name(vm)
            .map_err(query(format!(
                "lookup of {vm} (it must be defined on {host})"
            )))
            .map_err(lv)?;
        dom.create()
            .map_err(query(format!("start of {vm}")))
            .map_err(lv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_disks_are_found_in_a_definition() {
        let with = "<domain><devices><disk type='file' device='disk'><source file='/a.qcow2'/></disk></devices></domain>";
        let cdrom = "<domain><devices><disk type='file' device='cdrom'/></devices></domain>";
        let net = "<domain><devices><disk type='network' device='disk'/></devices></domain>";
        assert!(has_local_disk(with));
        assert!(!has_local_disk(cdrom));
        assert!(!has_local_disk(net));
        assert!(!has_local_disk("<domain/>"));
    }

    #[test]
    fn a_bad_uri_is_a_clear_error() {
        let hosts = LibvirtHosts::new(
            HashMap::from([(
                "h".to_string(),
                LibvirtHost {
                    uri: "nosuchdriver:///x".into(),
                    core_mips: 1000.0,
                    tunnel_dir: None,
                },
            )]),
            None,
        )
        .unwrap();
        let e = hosts.status("h").unwrap_err().chain();
        assert!(e.contains("nosuchdriver:///x"), "{e}");
    }
}
