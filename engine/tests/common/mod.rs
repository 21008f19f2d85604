//! Shared by the engine's KVM tests: boot guests, run a migration between
//! two in-process VMs over loopback TCP, fake peers and link faults.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_engine::{
    DestinationMigration, DestinationOptions, DestinationSummary, DeviceSection, GuestMemoryMmap,
    MigratableVm, MigrationError, MigrationOptions, MigrationSummary, ProgressEvent, SectionSpec,
    SourceMigration, VmOpError,
};
use ferry_transport::{tcp, FrameKind, FrameListener};
use ferry_vm::{DirtyBackend, GuestStatus, RunState, Vm, VmConfig};

/// KVM tests run one at a time: two cores, and each test runs two guests.
static KVM_LOCK: Mutex<()> = Mutex::new(());

/// Take the KVM lock, or `None` (after a loud SKIP line) without /dev/kvm.
pub fn kvm_or_skip(test: &str) -> Option<MutexGuard<'static, ()>> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        assert!(
            std::env::var_os("FERRY_NO_SKIP").is_none(),
            "FERRY_NO_SKIP is set, so this test may not skip"
        );
        eprintln!("SKIP {test}: /dev/kvm is not usable ({e}); this test needs KVM");
        return None;
    }
    Some(KVM_LOCK.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Boot the workload guest and wait until it runs its dirty loop.
pub fn boot(mem_mib: u64, cmdline: &str) -> Result<Arc<Vm>> {
    boot_with(mem_mib, cmdline, DirtyBackend::Bitmap)
}

/// [`boot`] with a chosen dirty-log backend.
pub fn boot_with(mem_mib: u64, cmdline: &str, dirty: DirtyBackend) -> Result<Arc<Vm>> {
    boot_cpus(mem_mib, cmdline, dirty, 1)
}

/// [`boot_with`] with `cpus` vCPUs.
pub fn boot_cpus(mem_mib: u64, cmdline: &str, dirty: DirtyBackend, cpus: usize) -> Result<Arc<Vm>> {
    let vm = Vm::boot(&VmConfig {
        mem_bytes: mem_mib << 20,
        kernel: None,
        cmdline: cmdline.into(),
        dirty,
        cpus,
    })
    .context("boot the workload guest")?;
    vm.wait_running(Duration::from_secs(120))
        .context("wait for the guest to run")?;
    Ok(Arc::new(vm))
}

/// The destination's VM factory used by the tests.
pub fn incoming(layout: &ferry_engine::MemoryLayout) -> Result<Vm, ferry_engine::VmOpError> {
    Ok(Vm::incoming(layout.bytes(), DirtyBackend::Bitmap)?)
}

/// A real destination on a loopback port, on its own thread.
pub struct Destination {
    pub addr: std::net::SocketAddr,
    thread: JoinHandle<Result<(Vm, DestinationSummary), MigrationError>>,
}

impl Destination {
    pub fn spawn(opts: DestinationOptions) -> Result<Self> {
        let listener = FrameListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let thread = std::thread::spawn(move || {
            let conn = listener.accept().expect("accept the source");
            DestinationMigration::accept(conn, &opts, incoming)
        });
        Ok(Self { addr, thread })
    }

    pub fn join(self) -> Result<(Vm, DestinationSummary), MigrationError> {
        self.thread.join().expect("destination thread panicked")
    }
}

/// Run a migration of `vm` to `addr`, collecting progress events.
pub fn migrate_to(
    vm: &Arc<Vm>,
    addr: std::net::SocketAddr,
    opts: MigrationOptions,
) -> (Result<MigrationSummary, MigrationError>, Vec<ProgressEvent>) {
    let conn = tcp::connect(addr).expect("connect to the destination");
    let mut events = Vec::new();
    let result = SourceMigration::new(vm.clone(), opts).run(conn, |e| events.push(e));
    (result, events)
}

/// Wait until `f(status)` holds or `timeout` passes; return the last status.
pub fn wait_status(vm: &Vm, timeout: Duration, f: impl Fn(&GuestStatus) -> bool) -> GuestStatus {
    let start = Instant::now();
    loop {
        let st = vm.status();
        if f(&st) || start.elapsed() > timeout {
            return st;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest keeps running here: the heartbeat rises, and self-checks pass.
pub fn assert_alive(vm: &Vm, what: &str) -> Result<GuestStatus> {
    let before = vm.status();
    let after = wait_status(vm, Duration::from_secs(20), |s| {
        s.heartbeat > before.heartbeat + 5
    });
    if vm.run_state() != RunState::Running {
        bail!("{what}: vCPU is {:?}, not running", vm.run_state());
    }
    if after.heartbeat <= before.heartbeat + 5 {
        bail!(
            "{what}: heartbeat stuck at {} (was {})",
            after.heartbeat,
            before.heartbeat
        );
    }
    if !after.is_healthy() {
        bail!("{what}: guest unhealthy: {after:?}");
    }
    Ok(after)
}

/// What a test changes about ferry's VM as the engine sees it: each hook
/// does nothing by default.
pub trait VmHooks: Send + Sync {
    /// Runs before the VM pauses.
    fn before_pause(&self) {}
    /// The device sections the source sends, given those the VM saved.
    fn saved_sections(&self, sections: Vec<DeviceSection>) -> Vec<DeviceSection> {
        sections
    }
}

/// ferry's VM with a test's [`VmHooks`]: every other [`MigratableVm`]
/// method (the defaulted ones included) goes to the VM unchanged.
pub struct HookedVm<H> {
    pub vm: Arc<Vm>,
    pub hooks: H,
}

impl<H: VmHooks> MigratableVm for HookedVm<H> {
    fn memory(&self) -> &GuestMemoryMmap {
        MigratableVm::memory(&*self.vm)
    }
    fn pause(&self) -> Result<(), VmOpError> {
        self.hooks.before_pause();
        MigratableVm::pause(&*self.vm)
    }
    fn pause_spread(&self) -> Option<Duration> {
        MigratableVm::pause_spread(&*self.vm)
    }
    fn resume(&self) -> Result<(), VmOpError> {
        MigratableVm::resume(&*self.vm)
    }
    fn prepare_resume(&self) {
        MigratableVm::prepare_resume(&*self.vm);
    }
    fn resumed_at_unix_ns(&self) -> Option<u64> {
        MigratableVm::resumed_at_unix_ns(&*self.vm)
    }
    fn section_specs(&self) -> Vec<SectionSpec> {
        MigratableVm::section_specs(&*self.vm)
    }
    fn save_sections(&self) -> Result<Vec<DeviceSection>, VmOpError> {
        Ok(self
            .hooks
            .saved_sections(MigratableVm::save_sections(&*self.vm)?))
    }
    fn restore_sections(&self, sections: &[DeviceSection]) -> Result<(), VmOpError> {
        MigratableVm::restore_sections(&*self.vm, sections)
    }
    fn dirty_log(&self) -> Result<Box<dyn ferry_dirtylog::DirtyLog>, VmOpError> {
        MigratableVm::dirty_log(&*self.vm)
    }
    fn set_throttle(&self, percent: u8) {
        MigratableVm::set_throttle(&*self.vm, percent);
    }
    fn vcpu_count(&self) -> usize {
        MigratableVm::vcpu_count(&*self.vm)
    }
    fn set_vcpu_throttle(&self, index: usize, percent: u8) -> Result<(), VmOpError> {
        MigratableVm::set_vcpu_throttle(&*self.vm, index, percent)
    }
}

/// A TCP relay between the source and a destination that can cut or corrupt
/// the stream from the source once `after_bytes` went through.
pub struct Relay {
    pub addr: std::net::SocketAddr,
    thread: JoinHandle<()>,
}

#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Close both connections.
    Cut,
    /// Flip one bit of the byte at that position, then go on relaying.
    FlipBit,
}

/// Faults placed by frame kind (source -> destination direction).
#[derive(Debug, Clone, Copy)]
pub enum FrameFault {
    /// Close both connections instead of forwarding the first frame of
    /// this kind.
    CutBefore(FrameKind),
    /// Forward the first frame of this kind, then stop relaying anything
    /// back to the source (and close the source's connection).
    SilenceAfter(FrameKind),
    /// Flip a bit of the checksum of the first frame of this kind, then go
    /// on relaying.
    Corrupt(FrameKind),
    /// Flip a byte in the first raw copy of this page in a page batch (its
    /// payload, which the frame checksum does not cover), then go on
    /// relaying.
    CorruptRawPage(u64),
    /// Clear these feature bits in the Hello (checksum redone), as if the
    /// destination were a build that does not know them: it accepts only
    /// the others, and the source must use only those.
    HelloWithout(u64),
}

/// In page batch `payload`, the offset of a byte of raw page `page`'s bytes.
fn raw_page_byte(payload: &[u8], page: u64) -> Option<usize> {
    use ferry_engine::encode::{BatchReader, PageEncoding};
    let mut reader = BatchReader::new(payload, u64::MAX).ok()?;
    while let Ok(Some(e)) = reader.next_entry() {
        if e.page == page && e.encoding == PageEncoding::Raw {
            return Some(e.payload.as_ptr() as usize - payload.as_ptr() as usize + 100);
        }
    }
    None
}

/// A frame-aware relay.
pub struct FrameRelay {
    pub addr: std::net::SocketAddr,
    thread: JoinHandle<()>,
}

impl FrameRelay {
    pub fn spawn(to: std::net::SocketAddr, fault: FrameFault) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let thread = std::thread::spawn(move || {
            let (src, _) = listener.accept().expect("accept the source");
            let dst = TcpStream::connect(to).expect("connect to the destination");
            let (src2, dst2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
            let silenced = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let silenced2 = silenced.clone();
            let back = std::thread::spawn(move || {
                let (mut from, mut to) = (dst2, src2);
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match from.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if silenced2.load(std::sync::atomic::Ordering::SeqCst)
                        || to.write_all(&buf[..n]).is_err()
                    {
                        break;
                    }
                }
                let _ = to.shutdown(Shutdown::Both);
            });
            let (mut from, mut to) = (src, dst);
            let mut header = [0u8; ferry_transport::HEADER_LEN];
            let mut corrupted = false;
            loop {
                if from.read_exact(&mut header).is_err() {
                    break;
                }
                let kind = u16::from_le_bytes([header[6], header[7]]);
                let len = u32::from_le_bytes(header[12..16].try_into().unwrap()) as usize;
                let mut payload = vec![0u8; len];
                if from.read_exact(&mut payload).is_err() {
                    break;
                }
                match fault {
                    FrameFault::CutBefore(k) if k.to_wire() == kind => {
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                        break;
                    }
                    FrameFault::Corrupt(k) if k.to_wire() == kind && !corrupted => {
                        header[16] ^= 0x01;
                        corrupted = true;
                    }
                    FrameFault::CorruptRawPage(page)
                        if kind == FrameKind::PageBatch.to_wire() && !corrupted =>
                    {
                        if let Some(at) = raw_page_byte(&payload, page) {
                            payload[at] ^= 0x10;
                            corrupted = true;
                        }
                    }
                    FrameFault::HelloWithout(features) if kind == FrameKind::Hello.to_wire() => {
                        let mut hello = ferry_engine::protocol::Hello::decode(&payload)
                            .expect("the source's Hello decodes");
                        hello.features &= !features;
                        payload = hello.encode();
                        let flags = u32::from_le_bytes(header[8..12].try_into().unwrap());
                        header = ferry_transport::frame::encode_header(
                            FrameKind::Hello,
                            flags,
                            &[std::io::IoSlice::new(&payload)],
                        )
                        .expect("a Hello fits a frame");
                    }
                    FrameFault::SilenceAfter(k) if k.to_wire() == kind => {
                        silenced.store(true, std::sync::atomic::Ordering::SeqCst);
                        let _ = to.write_all(&header);
                        let _ = to.write_all(&payload);
                        // Let the destination read it before the source goes away.
                        std::thread::sleep(Duration::from_millis(500));
                        let _ = from.shutdown(Shutdown::Both);
                        break;
                    }
                    _ => {}
                }
                if to.write_all(&header).is_err() || to.write_all(&payload).is_err() {
                    break;
                }
            }
            // The source is done (or cut): the destination sees the end.
            let _ = to.shutdown(Shutdown::Write);
            let _ = back.join();
        });
        Ok(Self { addr, thread })
    }

    pub fn join(self) {
        let _ = self.thread.join();
    }
}

impl Relay {
    pub fn spawn(to: std::net::SocketAddr, after_bytes: u64, fault: Fault) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let thread = std::thread::spawn(move || {
            let (src, _) = listener.accept().expect("accept the source");
            let dst = TcpStream::connect(to).expect("connect to the destination");
            let (src2, dst2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
            // Destination -> source: plain copy.
            let back = std::thread::spawn(move || {
                let (mut from, mut to) = (dst2, src2);
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(Shutdown::Write);
            });
            let (mut from, mut to) = (src, dst);
            let mut buf = vec![0u8; 64 << 10];
            let mut passed = 0u64;
            let mut faulted = false;
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let chunk = &mut buf[..n];
                if !faulted && passed + n as u64 > after_bytes {
                    let at = usize::try_from(after_bytes.saturating_sub(passed)).unwrap();
                    match fault {
                        Fault::Cut => {
                            let _ = to.write_all(&chunk[..at]);
                            let _ = from.shutdown(Shutdown::Both);
                            let _ = to.shutdown(Shutdown::Both);
                            break;
                        }
                        Fault::FlipBit => {
                            chunk[at] ^= 0x10;
                            faulted = true;
                        }
                    }
                }
                passed += n as u64;
                if to.write_all(chunk).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
            let _ = back.join();
        });
        Ok(Self { addr, thread })
    }

    pub fn join(self) {
        let _ = self.thread.join();
    }
}
