//! The vCPU thread: runs `KVM_RUN` until asked to pause, throttle or stop.
//!
//! Another thread asks by setting [`VcpuControl::request`] and kicking the
//! vCPU thread with a real-time signal. The signal handler sets the thread's
//! `kvm_run.immediate_exit`, so a kick that lands just before `KVM_RUN` is
//! not lost: `KVM_RUN` then returns at once with `EINTR`.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// `KVM_EXIT_DIRTY_RING_FULL` (kvm-ioctls reports it as unsupported).
const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;

/// What the controller wants the vCPU thread to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Request {
    Run = 0,
    Pause = 1,
    Stop = 2,
}

/// Where the vCPU thread is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Created, not started or paused by request.
    Paused,
    /// In the `KVM_RUN` loop.
    Running,
    /// The guest stopped itself (halt, triple fault) or KVM failed.
    Failed(String),
    /// The thread has ended.
    Stopped,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Paused => f.write_str("paused"),
            Self::Running => f.write_str("running"),
            Self::Failed(why) => write!(f, "failed: {why}"),
            Self::Stopped => f.write_str("stopped"),
        }
    }
}

thread_local! {
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    IMMEDIATE_EXIT.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: `p` points at `immediate_exit` in this thread's own mapped
            // kvm_run page; the vCPU thread sets it before entering the run loop
            // and clears it (to null) before the page is unmapped.
            unsafe { std::ptr::write_volatile(p, 1) };
        }
    });
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        register_signal_handler(kick_signal(), kick_handler)
            .expect("registering the vCPU kick signal handler");
    });
}

/// Called by the vCPU thread on `KVM_EXIT_DIRTY_RING_FULL`.
pub type RingFullHook = Box<dyn FnMut() + Send>;

/// How long an armed ([`VcpuThread::prepare_resume`]) parked vCPU thread
/// polls for Run before it goes back to sleep.
const HOT_POLL: Duration = Duration::from_millis(200);

/// The armed thread's nap between two looks at the request.
const HOT_NAP: Duration = Duration::from_micros(20);

/// An armed parked thread ([`VcpuThread::prepare_resume`]): waits for a
/// request other than Pause for up to [`HOT_POLL`], on the condvar that
/// [`VcpuThread::wake`] notifies, so a Run wakes it at once, but never
/// longer than [`HOT_NAP`] at a time: its core does not go idle, and waking
/// an idle core is what the arming avoids. Naps, not `sched_yield`: a
/// yielding poller can keep the thread it waits for off a shared core for
/// a whole time slice (milliseconds, seen here), while a sleeping one never
/// holds a core. (A poller that only slept its naps saw the Run when its
/// nap ended; on two busy cores its next turn could then be 1-3 ms away.)
fn wait_armed<'a>(ctl: &VcpuControl, mut st: MutexGuard<'a, RunState>) -> MutexGuard<'a, RunState> {
    let until = Instant::now() + HOT_POLL;
    while ctl.request() == Request::Pause && Instant::now() < until {
        st = ctl
            .changed
            .wait_timeout(st, HOT_NAP)
            .expect("vcpu state lock")
            .0;
    }
    st
}

/// Nanoseconds on the monotonic clock since the first call, never 0 (0
/// means "no slice" in [`VcpuControl::slice_end`]).
fn mono_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let since = EPOCH.get_or_init(Instant::now).elapsed();
    u64::try_from(since.as_nanos())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Shared between the vCPU thread and its controller.
pub struct VcpuControl {
    request: AtomicU8,
    /// Share of time (percent) the vCPU sleeps: auto-converge's throttle.
    throttle: AtomicU8,
    /// Under a throttle: when the vCPU's current run slice ends ([`mono_ns`]),
    /// so the ticker kicks it then; 0 while it runs no slice.
    slice_end: AtomicU64,
    state: Mutex<RunState>,
    changed: Condvar,
    /// Armed by [`VcpuThread::prepare_resume`]: the parked thread polls for
    /// the next Run instead of sleeping on the condvar.
    hot: AtomicBool,
    /// When the thread last left the parked state to run the guest, ns
    /// since the Unix epoch.
    resumed_at: AtomicU64,
    /// When the thread last came out of `KVM_RUN` for a pause, ns since
    /// the Unix epoch.
    stopped_at: AtomicU64,
    /// The thread's id (0 until it starts), for its CPU affinity.
    tid: AtomicI32,
    /// The CPU the thread was on when it last started running the guest.
    cpu: AtomicI32,
    /// The affinity to give back once the thread runs, when a resume
    /// narrowed it ([`VcpuThread::move_off`]). The resume stores it under
    /// this lock only while the thread is not running yet; the thread takes
    /// it under the lock right after it publishes Running, so one that
    /// started meanwhile still finds it.
    moved_from: Mutex<Option<CpuSet>>,
    /// The vCPU fd; the thread holds the lock while it runs the guest.
    pub(crate) fd: Mutex<VcpuFd>,
    /// Called on `KVM_EXIT_DIRTY_RING_FULL` to drain the ring.
    pub(crate) ring_full: Mutex<Option<RingFullHook>>,
    exited: AtomicBool,
}

impl std::fmt::Debug for VcpuControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuControl")
            .field("state", &self.state())
            .field("throttle", &self.throttle())
            .finish_non_exhaustive()
    }
}

impl VcpuControl {
    pub(crate) fn new(fd: VcpuFd) -> Arc<Self> {
        install_kick_handler();
        Arc::new(Self {
            request: AtomicU8::new(Request::Pause as u8),
            throttle: AtomicU8::new(0),
            slice_end: AtomicU64::new(0),
            state: Mutex::new(RunState::Paused),
            changed: Condvar::new(),
            hot: AtomicBool::new(false),
            resumed_at: AtomicU64::new(0),
            stopped_at: AtomicU64::new(0),
            tid: AtomicI32::new(0),
            cpu: AtomicI32::new(-1),
            moved_from: Mutex::new(None),
            fd: Mutex::new(fd),
            ring_full: Mutex::new(None),
            exited: AtomicBool::new(false),
        })
    }

    fn request(&self) -> Request {
        match self.request.load(Ordering::Acquire) {
            0 => Request::Run,
            1 => Request::Pause,
            _ => Request::Stop,
        }
    }

    fn set_state(&self, s: RunState) {
        *self.state.lock().expect("vcpu state lock") = s;
        self.changed.notify_all();
    }

    /// The current run state.
    pub fn state(&self) -> RunState {
        self.state.lock().expect("vcpu state lock").clone()
    }

    /// Sets the throttle (0–99 %).
    pub fn set_throttle(&self, percent: u8) {
        self.throttle.store(percent.min(99), Ordering::Release);
    }

    /// The current throttle.
    pub fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::Acquire)
    }
}

/// Handle to a running vCPU thread.
#[derive(Debug)]
pub struct VcpuThread {
    pub(crate) ctl: Arc<VcpuControl>,
    thread: Option<JoinHandle<()>>,
    ticker: Option<JoinHandle<()>>,
}

impl VcpuThread {
    /// Starts the thread of vCPU `index` (paused) and its throttle ticker.
    pub fn spawn(fd: VcpuFd, index: usize) -> std::io::Result<Self> {
        let ctl = VcpuControl::new(fd);
        let c = ctl.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || run_loop(&c))?;
        // The ticker kicks the vCPU out of KVM_RUN when its run slice ends
        // while a throttle is set, so the vCPU thread gets to sleep.
        let c = ctl.clone();
        let handle_for_ticker = ThreadKicker::of(&thread);
        let ticker = std::thread::Builder::new()
            .name(format!("vcpu{index}-throttle"))
            .spawn(move || throttle_ticker(&c, handle_for_ticker))?;
        Ok(Self {
            ctl,
            thread: Some(thread),
            ticker: Some(ticker),
        })
    }

    fn kicker(&self) -> Option<ThreadKicker> {
        self.thread.as_ref().map(ThreadKicker::of)
    }

    /// Asks the thread to run the guest, without waking it yet
    /// ([`VcpuThread::wake`]): a VM resuming several vCPUs stores every
    /// request first, so a woken vCPU that takes this thread's core does
    /// not hold back the requests of the others (measured: the second
    /// request then came up to 1.9 ms after the first). An armed thread
    /// ([`VcpuThread::prepare_resume`]) sees it on its next look.
    pub fn set_run_request(&self) -> Result<(), String> {
        if let RunState::Failed(why) = self.ctl.state() {
            return Err(why);
        }
        // Stored under the state lock: the parked thread reads the request
        // under it and then waits on the condvar, so a store between its
        // read and its wait would be a lost wake-up.
        let _st = self.ctl.state.lock().expect("vcpu state lock");
        self.ctl.hot.store(false, Ordering::Release);
        self.ctl
            .request
            .store(Request::Run as u8, Ordering::Release);
        Ok(())
    }

    /// Wakes the parked thread to look at its request.
    pub fn wake(&self) {
        self.ctl.changed.notify_all();
    }

    /// Waits until the thread runs the guest after [`VcpuThread::set_run_request`]
    /// and [`VcpuThread::wake`].
    pub fn wait_running(&self) -> Result<(), String> {
        let mut st = self.ctl.state.lock().expect("vcpu state lock");
        while *st == RunState::Paused {
            st = self.ctl.changed.wait(st).expect("vcpu state lock");
        }
        match &*st {
            RunState::Running => Ok(()),
            other => Err(format!("{other:?}")),
        }
    }

    /// Like [`VcpuThread::wait_running`], but only until `deadline`:
    /// `Ok(false)` when the thread is not running the guest by then.
    pub fn wait_running_until(&self, deadline: Instant) -> Result<bool, String> {
        let mut st = self.ctl.state.lock().expect("vcpu state lock");
        while *st == RunState::Paused {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            st = self
                .ctl
                .changed
                .wait_timeout(st, left)
                .expect("vcpu state lock")
                .0;
        }
        match &*st {
            RunState::Running => Ok(true),
            other => Err(format!("{other:?}")),
        }
    }

    /// The CPU this thread started its current run of the guest on, while
    /// it runs the guest.
    pub fn running_on(&self) -> Option<usize> {
        if self.ctl.state() != RunState::Running {
            return None;
        }
        usize::try_from(self.ctl.cpu.load(Ordering::Acquire)).ok()
    }

    /// The thread's id (for `taskset -p`, `/proc/PID/task/TID`), once it
    /// has started.
    pub fn tid(&self) -> Option<i32> {
        Some(self.ctl.tid.load(Ordering::Acquire)).filter(|&t| t > 0)
    }

    /// A thread asked to run but still waiting for a CPU: takes `busy`
    /// (the CPUs its sibling vCPUs just started on) out of its affinity
    /// until it runs, so the kernel moves it to another CPU it may use
    /// rather than leave it queued behind a sibling that runs the guest.
    /// Its own affinity comes back as soon as it runs (and the CPUs it
    /// may use are only ever narrowed, so an operator's pinning holds).
    /// Returns whether the thread was moved: not when it already runs,
    /// when nothing would be left, or when the kernel refuses.
    ///
    /// Why: a woken thread goes to its last CPU, or to its waker's. On this
    /// project's 2-core build machines (a nested KVM), `sched_switch`
    /// traces showed both vCPUs of a resume queued on one CPU while the
    /// other idled for 2-5 ms: the idle CPU does not pull a thread that ran
    /// within the last 0.5 ms, so it waited for the periodic load balance
    /// (BENCHMARKS.md, session 17).
    pub fn move_off(&self, busy: &[usize]) -> bool {
        let mut slot = self.ctl.moved_from.lock().expect("vcpu affinity lock");
        if slot.is_some() || self.ctl.state() != RunState::Paused {
            return false;
        }
        let Some(tid) = self.tid() else {
            return false;
        };
        let Ok(own) = CpuSet::of(tid) else {
            return false;
        };
        let mut narrowed = own;
        for &cpu in busy {
            narrowed.remove(cpu);
        }
        if narrowed.is_empty() || narrowed == own {
            return false;
        }
        if narrowed.apply(tid).is_err() {
            return false;
        }
        *slot = Some(own);
        true
    }

    /// Asks the thread to leave `KVM_RUN` and park, without waiting.
    pub fn request_pause(&self) {
        self.ctl
            .request
            .store(Request::Pause as u8, Ordering::Release);
        if let Some(k) = self.kicker() {
            k.kick();
        }
    }

    /// Waits until the thread is parked after [`VcpuThread::request_pause`].
    pub fn wait_paused(&self) -> Result<(), String> {
        let kicker = self.kicker();
        let mut st = self.ctl.state.lock().expect("vcpu state lock");
        while *st == RunState::Running {
            if let Some(k) = &kicker {
                k.kick();
            }
            st = self
                .ctl
                .changed
                .wait_timeout(st, Duration::from_millis(1))
                .expect("vcpu state lock")
                .0;
        }
        match &*st {
            RunState::Paused => Ok(()),
            RunState::Failed(w) => Err(w.clone()),
            other => Err(format!("{other:?}")),
        }
    }

    /// When the vCPU thread last went from parked to running the guest (ns
    /// since the Unix epoch; 0 before the first run): the instant a resume
    /// took effect, which the caller of `resume` may see only later.
    pub fn resumed_at_unix_ns(&self) -> u64 {
        self.ctl.resumed_at.load(Ordering::Acquire)
    }

    /// When the vCPU thread last came out of `KVM_RUN` for a pause (ns since
    /// the Unix epoch; 0 before the first pause).
    pub fn stopped_at_unix_ns(&self) -> u64 {
        self.ctl.stopped_at.load(Ordering::Acquire)
    }

    /// Hint that a resume comes within a few hundred
    /// milliseconds: the parked vCPU thread wakes now and polls for it, so
    /// the resume does not wait for a sleeping thread to be scheduled.
    pub fn prepare_resume(&self) {
        {
            // Under the state lock for the reason given in `resume`; and
            // only while paused, so a later pause does not poll for nothing.
            let st = self.ctl.state.lock().expect("vcpu state lock");
            if *st != RunState::Paused {
                return;
            }
            self.ctl.hot.store(true, Ordering::Release);
        }
        self.ctl.changed.notify_all();
    }

    /// The vCPU fd, for state save/restore; only while paused.
    pub fn fd(&self) -> Option<MutexGuard<'_, VcpuFd>> {
        match self.ctl.state() {
            RunState::Paused | RunState::Failed(_) => {
                Some(self.ctl.fd.lock().expect("vcpu fd lock"))
            }
            _ => None,
        }
    }
}

impl Drop for VcpuThread {
    fn drop(&mut self) {
        self.ctl
            .request
            .store(Request::Stop as u8, Ordering::Release);
        self.ctl.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let kicker = ThreadKicker::of(&t);
            while !t.is_finished() {
                kicker.kick();
                self.ctl.changed.notify_all();
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = t.join();
        }
        self.ctl.exited.store(true, Ordering::Release);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}

/// A thread's CPU affinity mask.
#[derive(Clone, Copy)]
pub(crate) struct CpuSet(libc::cpu_set_t);

impl PartialEq for CpuSet {
    fn eq(&self, other: &Self) -> bool {
        // SAFETY: CPU_EQUAL only reads the two sets.
        unsafe { libc::CPU_EQUAL(&self.0, &other.0) }
    }
}

impl std::fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| self.contains(c))
            .collect();
        f.debug_tuple("CpuSet").field(&cpus).finish()
    }
}

impl CpuSet {
    /// Thread `tid`'s affinity (0: the calling thread).
    fn of(tid: i32) -> std::io::Result<Self> {
        // SAFETY: an all-zero cpu_set_t is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes
        // into `set`, which lives for the call.
        let rc = unsafe {
            libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set)
        };
        if rc == 0 {
            Ok(Self(set))
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Makes this thread `tid`'s affinity (0: the calling thread).
    fn apply(&self, tid: i32) -> std::io::Result<()> {
        // SAFETY: the kernel reads size_of::<cpu_set_t>() bytes of `self.0`.
        let rc = unsafe {
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &self.0)
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn contains(&self, cpu: usize) -> bool {
        // SAFETY: CPU_ISSET reads the set; it checks `cpu` against the
        // set's size.
        cpu < libc::CPU_SETSIZE as usize && unsafe { libc::CPU_ISSET(cpu, &self.0) }
    }

    fn remove(&mut self, cpu: usize) {
        if cpu < libc::CPU_SETSIZE as usize {
            // SAFETY: CPU_CLR writes the bit of `cpu`, which is in range.
            unsafe { libc::CPU_CLR(cpu, &mut self.0) };
        }
    }

    fn is_empty(&self) -> bool {
        // SAFETY: CPU_COUNT only reads the set.
        unsafe { libc::CPU_COUNT(&self.0) == 0 }
    }
}

/// Sends the kick signal to one thread.
#[derive(Debug, Clone, Copy)]
struct ThreadKicker(libc::pthread_t);

impl ThreadKicker {
    fn of(t: &JoinHandle<()>) -> Self {
        Self(t.as_pthread_t())
    }
    fn kick(&self) {
        // A thread that already ended makes pthread_kill fail with ESRCH; the
        // callers check the thread's state, so the result is not needed.
        // SAFETY: pthread_kill only sends a signal; the handler installed by
        // `install_kick_handler` touches nothing but a thread-local pointer.
        let _ = unsafe { libc::pthread_kill(self.0, kick_signal()) };
    }
}

fn run_loop(ctl: &VcpuControl) {
    // SAFETY: gettid takes no arguments and cannot fail.
    ctl.tid.store(unsafe { libc::gettid() }, Ordering::Release);
    loop {
        // Parked: wait for Run or Stop.
        {
            let mut st = ctl.state.lock().expect("vcpu state lock");
            loop {
                match ctl.request() {
                    Request::Stop => {
                        *st = RunState::Stopped;
                        ctl.changed.notify_all();
                        return;
                    }
                    Request::Run if !matches!(*st, RunState::Failed(_)) => break,
                    _ => {
                        if *st == RunState::Running {
                            *st = RunState::Paused;
                            ctl.changed.notify_all();
                        }
                        if ctl.hot.swap(false, Ordering::AcqRel) {
                            st = wait_armed(ctl, st);
                            continue;
                        }
                        st = ctl.changed.wait(st).expect("vcpu state lock");
                    }
                }
            }
            // The guest runs from the KVM_RUN right after the fd lock below
            // (free now: its other users take it only while paused).
            // Stamped before Running is published, so a caller that saw
            // Running (`wait_running`, then `Vm::resumed_at_unix_ns`) reads
            // this resume's instant, not the last one's (or 0).
            ctl.resumed_at.store(unix_ns(), Ordering::Release);
            // SAFETY: sched_getcpu takes no arguments; -1 on failure.
            ctl.cpu
                .store(unsafe { libc::sched_getcpu() }, Ordering::Release);
            *st = RunState::Running;
            ctl.changed.notify_all();
        }
        // Running is published: a resume that moved this thread off a
        // sibling's CPU stored the affinity to give back before that.
        let moved_from = ctl.moved_from.lock().expect("vcpu affinity lock").take();
        if let Some(set) = moved_from {
            if let Err(e) = set.apply(0) {
                tracing::warn!(error = %e, "could not give a vCPU thread its CPU affinity back");
            }
        }
        let mut fd = ctl.fd.lock().expect("vcpu fd lock");
        let exit_ptr: *mut u8 = &mut fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|p| p.set(exit_ptr));
        let outcome = run_until_request(ctl, &mut fd);
        ctl.stopped_at.store(unix_ns(), Ordering::Release);
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
        fd.set_kvm_immediate_exit(0);
        drop(fd);
        if let Err(why) = outcome {
            tracing::warn!(%why, "vCPU stopped");
            ctl.set_state(RunState::Failed(why));
        } else {
            ctl.set_state(RunState::Paused);
        }
    }
}

/// Longest throttle sleep between two looks at a pause request.
const THROTTLE_NAP: Duration = Duration::from_micros(500);

/// A throttled vCPU runs the guest this long, then sleeps `p / (100 − p)`
/// times as long as it ran (QEMU's `cpu_throttle`: a 10 ms timeslice, then
/// `timeslice × p / (1 − p)` asleep), so it runs `100 − p` % of the time.
/// Long next to the cost of a `KVM_RUN` round trip (~0.3 ms under PVM).
const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// A slice that ran longer than this (the kick came late) is charged as
/// this long, so one late kick cannot put the vCPU to sleep for seconds.
const THROTTLE_SLICE_CHARGED_MAX: Duration = Duration::from_millis(40);

/// How long a vCPU that ran `ran` sleeps under a throttle of `percent`.
fn throttle_sleep(percent: u8, ran: Duration) -> Duration {
    let p = u32::from(percent.min(99));
    ran.min(THROTTLE_SLICE_CHARGED_MAX) * p / (100 - p)
}

/// The ticker of one vCPU: while a throttle is set and the vCPU runs, it
/// kicks the vCPU out of `KVM_RUN` once when its run slice ends (and, until
/// the vCPU has noticed the throttle, every slice). Kicking on a fixed beat
/// instead would land kicks in the vCPU's sleep, and each such kick makes
/// the next `KVM_RUN` return at once: at 50 % and above the guest all but
/// stopped.
fn throttle_ticker(c: &VcpuControl, kicker: ThreadKicker) {
    let mut kicked = 0;
    while !c.exited.load(Ordering::Acquire) {
        if c.throttle() == 0 || c.request() != Request::Run {
            std::thread::sleep(THROTTLE_SLICE);
            continue;
        }
        let end = c.slice_end.load(Ordering::Acquire);
        let now = mono_ns();
        if end == 0 {
            // Running without a slice: the throttle came while it ran.
            kicker.kick();
            std::thread::sleep(THROTTLE_SLICE);
        } else if end == kicked {
            // Kicked; the vCPU sleeps, then starts a slice at least
            // THROTTLE_SLICE long, so this look cannot miss its end.
            std::thread::sleep(THROTTLE_SLICE);
        } else if now < end {
            std::thread::sleep(Duration::from_nanos(end - now).min(THROTTLE_SLICE));
        } else {
            kicker.kick();
            kicked = end;
        }
    }
}

/// Runs the guest until a pause/stop request (Ok) or a guest/KVM failure (Err).
fn run_until_request(ctl: &VcpuControl, fd: &mut VcpuFd) -> Result<(), String> {
    let outcome = run_slices(ctl, fd);
    ctl.slice_end.store(0, Ordering::Release);
    outcome
}

/// [`run_until_request`]'s loop. Under a throttle the vCPU runs in slices:
/// [`THROTTLE_SLICE`] of guest time, then [`throttle_sleep`] for what it
/// ran; exits within a slice (a kick, I/O, a full dirty ring) go straight
/// back into the guest.
fn run_slices(ctl: &VcpuControl, fd: &mut VcpuFd) -> Result<(), String> {
    // When the current slice began; None: no throttle seen yet.
    let mut slice_start: Option<Instant> = None;
    loop {
        if ctl.request() != Request::Run {
            return Ok(());
        }
        let throttle = ctl.throttle();
        if throttle == 0 {
            if slice_start.take().is_some() {
                ctl.slice_end.store(0, Ordering::Release);
            }
        } else if slice_start.is_some_and(|s| s.elapsed() >= THROTTLE_SLICE) {
            let ran = slice_start.map_or(THROTTLE_SLICE, |s| s.elapsed());
            // Sleep in naps short enough that a pause never waits behind
            // the throttle (at 99 % the sleep is ~1 s).
            let until = Instant::now() + throttle_sleep(throttle, ran);
            loop {
                if ctl.request() != Request::Run {
                    return Ok(());
                }
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::sleep(left.min(THROTTLE_NAP));
            }
            // Kicks that landed during the sleep (the ticker's, a
            // pause's) asked KVM_RUN to return at once; drop them. A pause
            // is seen by the look at the request below, and a later kick
            // sets the flag again.
            fd.set_kvm_immediate_exit(0);
            if ctl.request() != Request::Run {
                return Ok(());
            }
            slice_start = None;
        }
        if throttle > 0 && slice_start.is_none() {
            let now = Instant::now();
            slice_start = Some(now);
            let end = mono_ns()
                .saturating_add(u64::try_from(THROTTLE_SLICE.as_nanos()).unwrap_or(u64::MAX));
            ctl.slice_end.store(end, Ordering::Release);
        }
        match fd.run() {
            Ok(exit) => match exit {
                VcpuExit::Hlt => {
                    return Err("the guest halted (fatal exception in the guest?)".into())
                }
                VcpuExit::Shutdown => return Err("the guest shut down (triple fault)".into()),
                VcpuExit::FailEntry(reason, cpu) => {
                    return Err(format!(
                        "KVM could not enter the guest (reason {reason:#x}, cpu {cpu})"
                    ))
                }
                VcpuExit::InternalError => return Err("KVM internal error".into()),
                VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => {
                    let mut f = ctl.ring_full.lock().expect("ring-full hook lock");
                    match f.as_mut() {
                        Some(drain) => drain(),
                        None => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
                // No devices: writes are dropped, reads see zeros.
                VcpuExit::IoIn(_, data) | VcpuExit::MmioRead(_, data) => data.fill(0),
                VcpuExit::IoOut(..) | VcpuExit::MmioWrite(..) => {}
                VcpuExit::Intr => {}
                other => return Err(format!("unexpected vCPU exit {other:?}")),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
            }
            Err(e) => return Err(format!("KVM_RUN failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_vcpu_sleeps_p_over_100_minus_p_of_what_it_ran() {
        let ms = Duration::from_millis;
        assert_eq!(throttle_sleep(0, ms(10)), Duration::ZERO);
        assert_eq!(throttle_sleep(50, ms(10)), ms(10));
        assert_eq!(throttle_sleep(80, ms(10)), ms(40));
        assert_eq!(throttle_sleep(99, ms(10)), ms(990));
        assert_eq!(
            throttle_sleep(50, ms(12)),
            ms(12),
            "a late kick: ran longer, sleeps longer"
        );
        assert_eq!(throttle_sleep(50, ms(500)), ms(40), "charged at most 40 ms");
        assert_eq!(throttle_sleep(100, ms(10)), ms(990), "100 is taken as 99");
    }

    #[test]
    fn a_vcpu_moved_off_busy_cpus_gets_its_own_affinity_back_once_it_runs() {
        if !crate::testing::kvm_or_skip(module_path!()) {
            return;
        }
        let own = CpuSet::of(0).expect("this thread's affinity");
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| own.contains(c))
            .collect();
        if cpus.len() < 2 {
            assert!(
                std::env::var_os("FERRY_NO_SKIP").is_none(),
                "FERRY_NO_SKIP is set, so this test may not skip"
            );
            eprintln!("SKIPPED: {}: needs 2 CPUs, has {cpus:?}", module_path!());
            return;
        }
        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create a VM");
        let thread = VcpuThread::spawn(vm.create_vcpu(0).expect("a vCPU"), 0).expect("spawn");
        let started = Instant::now();
        let tid = loop {
            if let Some(tid) = thread.tid() {
                break tid;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "no tid");
            std::thread::sleep(Duration::from_millis(1));
        };
        let before = CpuSet::of(tid).expect("the vCPU thread's affinity");
        assert!(!thread.move_off(&cpus), "with every CPU busy it stays");
        assert_eq!(CpuSet::of(tid).unwrap(), before);
        assert!(thread.move_off(&cpus[..1]));
        let moved = CpuSet::of(tid).unwrap();
        assert!(!moved.contains(cpus[0]), "{moved:?} still has {}", cpus[0]);
        assert!(moved.contains(cpus[1]), "{moved:?} lost {}", cpus[1]);
        assert!(!thread.move_off(&cpus[1..2]), "moved once until it runs");
        assert_eq!(CpuSet::of(tid).unwrap(), moved);
        // Run it (a vCPU with no memory: whatever KVM_RUN then does, the
        // affinity comes back before it).
        thread.set_run_request().expect("run request");
        thread.wake();
        while thread.ctl.state() == RunState::Paused {
            assert!(started.elapsed() < Duration::from_secs(5), "never ran");
            std::thread::sleep(Duration::from_millis(1));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while CpuSet::of(tid).unwrap() != before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(CpuSet::of(tid).unwrap(), before, "its own affinity again");
        assert!(
            !thread.move_off(&cpus[..1]),
            "a thread that runs is not moved"
        );
    }
}
