//! `ferry vm run`: run the workload guest (or any GUEST.md multiboot image)
//! and show its heartbeat, dirty count and self-check errors live.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ferry_control::units::{format_bytes, parse_bytes_at_least, parse_duration, BareUnit};
use ferry_control::{client, error_chain, GuestHome, Served};
use ferry_engine::{DestinationMigration, DestinationOptions, HandoverOutcome, Incoming};
use ferry_transport::{LaneListener, LaneOptions, Lanes, TransportError};
use ferry_vm::{host_tsc_khz, DirtyBackend, GuestParams, GuestPhase, RunState, Vm, VmConfig};
use indicatif::{ProgressBar, ProgressStyle};

use crate::security_args::SecurityArgs;

/// Smallest guest: the workload guest's code, tables and status block
/// live in its first 2 MiB, its fill region above.
const MIN_GUEST_BYTES: u64 = 4 << 20;

/// Longest `--duration`: a year.
const MAX_RUN: Duration = Duration::from_secs(365 * 24 * 3600);

/// `ferry vm ...`
#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Boot a guest and show it live.
    Run(RunArgs),
    /// Wait for an incoming guest, then run it.
    Receive(ReceiveArgs),
    /// Show the guest status of a `ferry vm run/receive --api` process.
    Status(StatusArgs),
    /// Finish a handover left in doubt (GO sent, the destination
    /// unreachable): `resume` the guest on this source (refused while the
    /// destination is reachable and runs it) or `discard` this copy.
    Resolve(ResolveArgs),
}

/// `ferry vm resolve`
#[derive(Args, Debug)]
pub struct ResolveArgs {
    /// The control socket of the source process.
    #[arg(long)]
    pub api: PathBuf,
    /// `resume` (run it here again) or `discard` (it lives at the destination).
    #[arg(value_enum)]
    pub decision: ResolveDecision,
}

/// What `ferry vm resolve` decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ResolveDecision {
    /// Resume the guest on the source.
    Resume,
    /// Throw the source's copy away.
    Discard,
}

/// How to build a guest.
#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// Guest RAM (binary units: 512M, 2G; a bare number is bytes).
    #[arg(long, default_value = "1G", value_parser = parse_mem)]
    pub mem: u64,
    /// Pages per second the workload guest dirties (`max` = unpaced).
    #[arg(long, default_value = "0")]
    pub rate: String,
    /// Working set of the dirty loop (e.g. 256M, `all`; at most --mem).
    #[arg(long, default_value = "all")]
    pub wss: String,
    /// Fill seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Pages the guest self-checks per millisecond.
    #[arg(long, default_value_t = 256)]
    pub verify: u64,
    /// A multiboot image that follows GUEST.md instead of the built-in guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// The guest command line, verbatim (overrides --rate/--wss/--seed/--verify).
    #[arg(long)]
    pub append: Option<String>,
    /// Dirty tracking: `bitmap` or `ring`.
    #[arg(long, default_value = "bitmap", value_parser = parse_backend)]
    pub dirty_log: DirtyBackend,
    /// vCPUs; the workload guest runs one dirty loop on each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=ferry_vm::MAX_VCPUS as u64))]
    pub cpus: u64,
    /// vCPUs that run a dirty loop (default: all of --cpus); the others
    /// spin idle without writing memory (e.g. `--cpus 2 --dirty-cpus 1`:
    /// one vCPU dirtying, one quiet, the case dirty-limit is for).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=ferry_vm::MAX_VCPUS as u64))]
    pub dirty_cpus: Option<u64>,
    /// Timer mode: the guest programs the PIT to interrupt it this many
    /// times a second, halts between ticks and uses them as its clock
    /// (vm/guest/GUEST.md); 0 = off.
    #[arg(long, default_value_t = 0, value_parser = parse_hz)]
    pub hz: u64,
}

/// `--hz`: 0 (off) or what the guest can program the PIT to.
pub(crate) fn parse_hz(s: &str) -> Result<u64, String> {
    let hz: u64 = s
        .parse()
        .map_err(|_| format!("`{s}`: want a number of ticks per second"))?;
    if hz != 0 && !(ferry_vm::GUEST_MIN_HZ..=ferry_vm::GUEST_MAX_HZ).contains(&hz) {
        return Err(format!(
            "`{hz}`: want 0 (off) or {}..={}",
            ferry_vm::GUEST_MIN_HZ,
            ferry_vm::GUEST_MAX_HZ
        ));
    }
    Ok(hz)
}

fn parse_mem(s: &str) -> Result<u64, String> {
    parse_bytes_at_least(s, MIN_GUEST_BYTES).map_err(|e| e.to_string())
}

/// Checks a `--mem` value and keeps it as typed (for commands that pass
/// it on to `ferry vm`).
pub(crate) fn check_mem(s: &str) -> Result<String, String> {
    parse_mem(s).map(|_| s.to_owned())
}

fn parse_run_time(s: &str) -> Result<Duration, String> {
    parse_duration(s, BareUnit::Secs, MAX_RUN).map_err(|e| e.to_string())
}

fn parse_backend(s: &str) -> Result<DirtyBackend, String> {
    match s {
        "bitmap" => Ok(DirtyBackend::Bitmap),
        "ring" => Ok(DirtyBackend::Ring(1 << 20)),
        _ => Err(format!("`{s}`: want `bitmap` or `ring`")),
    }
}

impl GuestArgs {
    /// The guest command line: `--append` as given (checked when it is for
    /// the built-in guest), else built from the flags, with `tsc_khz` added.
    pub fn cmdline(&self) -> anyhow::Result<String> {
        if let Some(a) = &self.append {
            if self.kernel.is_none() {
                GuestParams::parse(a)
                    .map_err(anyhow::Error::msg)
                    .context("--append")?;
            }
            return Ok(a.clone());
        }
        let rate = match self.rate.as_str() {
            "max" => None,
            r => Some(
                r.parse::<u64>()
                    .with_context(|| format!("--rate `{r}`: want pages per second or `max`"))?,
            ),
        };
        let wss_bytes = match self.wss.as_str() {
            "all" => None,
            w => {
                let b = parse_bytes_at_least(w, 4096)
                    .map_err(|e| anyhow::anyhow!("--wss: {e}; want a size (e.g. 32M) or `all`"))?;
                if b > self.mem {
                    bail!(
                        "--wss: `{w}` is larger than the guest's memory (--mem {})",
                        format_bytes(self.mem)
                    );
                }
                Some(b)
            }
        };
        let loops = self.dirty_cpus.unwrap_or(self.cpus);
        if loops > self.cpus {
            bail!(
                "--dirty-cpus {loops} is more than the guest's {} vCPUs (--cpus)",
                self.cpus
            );
        }
        let tsc_khz = host_tsc_khz().context("asking KVM for the TSC frequency")?;
        let p = GuestParams {
            rate,
            wss_bytes,
            seed: self.seed,
            verify: self.verify,
            tsc_khz: Some(u64::from(tsc_khz)),
            cpus: loops,
            hz: self.hz,
            ..GuestParams::default()
        };
        Ok(p.to_cmdline())
    }

    /// The VM configuration.
    pub fn config(&self) -> anyhow::Result<VmConfig> {
        Ok(VmConfig {
            mem_bytes: self.mem,
            kernel: self.kernel.clone(),
            cmdline: self.cmdline()?,
            dirty: self.dirty_log,
            cpus: usize::try_from(self.cpus).context("--cpus")?,
        })
    }
}

/// `ferry vm run`
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Stop after this long (a bare number is seconds; default: run until
    /// Ctrl-C).
    #[arg(long, value_parser = parse_run_time)]
    pub duration: Option<Duration>,
    /// Print a JSON status line every second instead of a live display.
    #[arg(long)]
    pub json: bool,
    /// Serve a control socket here (for `ferry migrate --api`).
    #[arg(long)]
    pub api: Option<PathBuf>,
    /// No live display (for scripts; errors still go to stderr).
    #[arg(long)]
    pub quiet: bool,
}

/// `ferry vm receive`
#[derive(Args, Debug)]
pub struct ReceiveArgs {
    /// Address to listen on for the incoming migration.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    #[command(flatten)]
    pub security: SecurityArgs,
    /// Serve a control socket here.
    #[arg(long)]
    pub api: Option<PathBuf>,
    /// Dirty tracking for the received VM: `bitmap` or `ring`.
    #[arg(long, default_value = "bitmap", value_parser = parse_backend)]
    pub dirty_log: DirtyBackend,
    /// Prepare (allocate and populate) this much guest memory before the
    /// source connects, as a VMM started with `-m` would; used when the
    /// incoming guest has this size. The lanes' read buffers are made
    /// ready with it.
    #[arg(long, value_parser = parse_mem)]
    pub mem: Option<u64>,
    /// Print JSON status lines instead of a live display.
    #[arg(long)]
    pub json: bool,
    /// No live display.
    #[arg(long)]
    pub quiet: bool,
    /// Stop this long after the guest arrived (a bare number is seconds;
    /// default: run until Ctrl-C).
    #[arg(long, value_parser = parse_run_time)]
    pub duration: Option<Duration>,
}

/// `ferry vm status`
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The control socket of the VM process.
    #[arg(long)]
    pub api: PathBuf,
    /// Print the raw JSON reply.
    #[arg(long)]
    pub json: bool,
}

/// Waits for the guest to reach phase 2, with a spinner.
pub fn wait_running(vm: &Vm, quiet: bool) -> anyhow::Result<()> {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    bar.enable_steady_tick(Duration::from_millis(120));
    let start = Instant::now();
    loop {
        let st = vm.status();
        match st.phase {
            GuestPhase::Running if st.magic_ok => break,
            GuestPhase::Fatal if st.magic_ok => {
                bail!("the guest failed: {}", st.fatal_reason_text())
            }
            _ => {}
        }
        if let RunState::Failed(why) = vm.run_state() {
            bail!("the guest stopped: {why}");
        }
        if start.elapsed() > Duration::from_secs(600) {
            bail!(
                "the guest did not reach phase 2 in 600 s (phase {:?}): is it a GUEST.md image?",
                st.phase
            );
        }
        bar.set_message(format!(
            "booting: phase {:?}, {:.1} s",
            st.phase,
            start.elapsed().as_secs_f64()
        ));
        std::thread::sleep(Duration::from_millis(50));
    }
    bar.finish_and_clear();
    Ok(())
}

fn run_vm(args: RunArgs) -> anyhow::Result<()> {
    let cfg = args.guest.config()?;
    let quiet = args.quiet || args.json;
    if !quiet {
        eprintln!(
            "ferry: booting {} MiB guest: {}",
            cfg.mem_bytes >> 20,
            cfg.cmdline
        );
    }
    let t0 = Instant::now();
    let vm = Arc::new(Vm::boot(&cfg).context("starting the VM")?);
    // The control socket answers from the start (its status shows the fill).
    let served = Served::source(vm.clone());
    let _server = args
        .api
        .as_deref()
        .map(|p| ferry_control::serve(p, served.clone()).context("--api"))
        .transpose()?;
    wait_running(&vm, quiet)?;
    if !quiet {
        eprintln!(
            "ferry: guest running after {:.2} s (filled {} MiB)",
            t0.elapsed().as_secs_f64(),
            vm.status().mem_top >> 20
        );
    }
    live(&served, Display::pick(args.json, args.quiet), args.duration)
}

/// `ferry vm receive`: listens until a guest arrives, then runs it.
///
/// The listener keeps listening the whole time, before and after the guest
/// arrived, and serves each session on a thread of its own: a source whose
/// answer to GO got lost asks again on a fresh connection ("did you
/// resume?") and is answered from this process's handover record for as
/// long as it runs. A migration that fails before the guest runs here (the
/// source gave up, aborted, went silent past the idle or GO timeout, sent
/// garbage) frees its guest memory and the wait goes on (with `--mem`,
/// that much is prepared again first): the source still has the guest and
/// may try again. A second migration while one is under way, or once the
/// guest runs here, is refused. `quit` on the control socket ends a
/// receiver that is still waiting.
fn receive(args: ReceiveArgs) -> anyhow::Result<()> {
    // Memory first: once the control socket and the listener exist, this
    // destination is ready and a source's stream never waits on page faults.
    // Bad security flags fail before anything is allocated.
    let spec = args.security.spec()?;
    let security = spec.load()?;
    let session = Arc::new(Receiver {
        prepared: std::sync::Mutex::new(None),
        taken: std::sync::atomic::AtomicBool::new(false),
        served: Served::destination(),
        opts: DestinationOptions::default(),
        dirty: args.dirty_log,
        mem: args.mem,
        quiet: args.quiet || args.json,
    });
    session.ready_for_next()?;
    let served = session.served.clone();
    let mut listener = LaneListener::bind(args.listen.as_str(), LaneOptions::new(1, security))
        .with_context(|| format!("listening on {}", args.listen))?;
    let _server = args
        .api
        .as_deref()
        .map(|p| ferry_control::serve(p, served.clone()).context("--api"))
        .transpose()?;
    if !session.quiet {
        eprintln!(
            "ferry: waiting for a guest on {} ({})",
            listener.local_addr()?,
            spec.describe()
        );
    }
    let (arrived_tx, arrived) = std::sync::mpsc::channel::<()>();
    let (failed_tx, listen_failed) = std::sync::mpsc::channel();
    let listening = session.clone();
    std::thread::Builder::new()
        .name("ferry-listen".into())
        .spawn(move || loop {
            let lanes = match accept_source(&mut listener) {
                Ok(lanes) => lanes,
                Err(e) => {
                    let _ = failed_tx.send(e);
                    return;
                }
            };
            let (session, arrived_tx) = (listening.clone(), arrived_tx.clone());
            let _ = std::thread::Builder::new()
                .name("ferry-session".into())
                .spawn(move || {
                    if session.serve(lanes) {
                        let _ = arrived_tx.send(());
                    }
                });
        })?;
    loop {
        match arrived.recv_timeout(Duration::from_millis(100)) {
            Ok(()) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the listener thread ended")
            }
        }
        if let Ok(e) = listen_failed.try_recv() {
            return Err(e);
        }
        if served.quit_asked() {
            let_replies_go_out(&served);
            if !session.quiet {
                eprintln!("ferry: quit asked while waiting; no guest arrived");
            }
            return Ok(());
        }
    }
    live(&served, Display::pick(args.json, args.quiet), args.duration)
}

/// What the sessions of one `ferry vm receive` share.
struct Receiver {
    /// Memory prepared for the next guest (`--mem`).
    prepared: std::sync::Mutex<Option<Vm>>,
    /// Set while a migration is under way or its guest runs here.
    taken: std::sync::atomic::AtomicBool,
    served: Arc<Served>,
    /// One handover record for every session.
    opts: DestinationOptions,
    dirty: DirtyBackend,
    mem: Option<u64>,
    quiet: bool,
}

impl Receiver {
    /// With `--mem`: the next guest's memory and the lanes' read buffers
    /// made ready (whatever of them is not ready already), before a source
    /// connects.
    fn ready_for_next(&self) -> anyhow::Result<()> {
        let Some(mem) = self.mem else {
            return Ok(());
        };
        self.opts.prepare_lane_buffers();
        // Populated outside the lock (a second or more for large guests): no
        // session claims the memory meanwhile (none has, or the one that
        // failed still holds `taken`).
        if self.prepared.lock().expect("prepared lock").is_none() {
            let vm = Vm::incoming(mem, self.dirty).context("preparing the destination VM")?;
            *self.prepared.lock().expect("prepared lock") = Some(vm);
        }
        Ok(())
    }

    /// After a session that was no migration here (a question, a refusal,
    /// a failure before the guest's memory was claimed): its lanes took
    /// read buffers made ready; make them again while no migration is
    /// under way.
    fn replace_taken_buffers(&self) {
        if self.mem.is_some() && !self.taken.load(std::sync::atomic::Ordering::Acquire) {
            self.opts.prepare_lane_buffers();
        }
    }

    /// Serves one session: a migration (refused while another is under
    /// way or its guest runs here) or a question about an earlier
    /// handover. True when a guest arrived and runs here.
    fn serve(&self, lanes: Lanes) -> bool {
        use std::sync::atomic::Ordering;
        let mut claimed = false;
        let result = DestinationMigration::serve_lanes(lanes, &self.opts, |layout| {
            if self.taken.swap(true, Ordering::AcqRel) {
                return Err("this destination already has a guest (arrived or arriving)".into());
            }
            claimed = true;
            self.served.receiving();
            let ready = self.prepared.lock().expect("prepared lock").take();
            match ready {
                Some(vm) if vm.mem_bytes() == layout.bytes() => Ok(vm),
                _ => Ok(Vm::incoming(layout.bytes(), self.dirty)?),
            }
        });
        match result {
            Ok(Incoming::Guest(vm, summary)) => {
                if !self.quiet {
                    eprintln!(
                        "ferry: guest arrived: {} rounds, {} on the wire, verified in {:.1} ms; running here",
                        summary.rounds,
                        format_bytes(summary.wire_bytes),
                        summary.verify.as_secs_f64() * 1e3
                    );
                }
                self.served.arrived(Arc::new(vm), &summary);
                // Buffers the source's lanes did not take are not needed.
                self.opts.lane_buffers.clear();
                true
            }
            Ok(Incoming::Answered {
                migration_id,
                outcome,
            }) => {
                let answer = match outcome {
                    HandoverOutcome::Resumed(_) => "resumed here".to_owned(),
                    HandoverOutcome::NotResumed(why) => format!("not resumed ({why})"),
                };
                eprintln!("ferry: a source asked about migration {migration_id:#x}: {answer}");
                self.replace_taken_buffers();
                false
            }
            Err(e) => {
                let why = error_chain(&e);
                eprintln!("ferry: the incoming session failed: {why}");
                if claimed {
                    // Its guest memory is freed (the VM was dropped): get
                    // ready for the next source as at the start.
                    self.served.receive_failed(&why);
                    if let Err(e) = self.ready_for_next() {
                        eprintln!("ferry: {e:#}");
                    }
                    self.taken.store(false, Ordering::Release);
                    eprintln!("ferry: guest memory freed; waiting for the source again");
                } else {
                    self.replace_taken_buffers();
                }
                false
            }
        }
    }
}

/// Waits for a source whose lanes all pass the handshake. A connection that
/// fails it (wrong or missing certificate, plaintext against TLS, a port
/// scanner) is reported and refused, and the wait goes on: a stranger must
/// not end a destination before the real source arrives. Only a failing
/// listening socket ends the wait.
pub(crate) fn accept_source(listener: &mut LaneListener) -> anyhow::Result<Lanes> {
    loop {
        match listener.accept_session() {
            Ok(lanes) => return Ok(lanes),
            Err(TransportError::Accept(io))
                if io.kind() == std::io::ErrorKind::ConnectionAborted => {}
            Err(e @ TransportError::Accept(_)) => {
                return Err(e).context("accepting the incoming migration")
            }
            Err(e) => eprintln!(
                "ferry: refused a connection: {}; still waiting for a source",
                error_chain(&e)
            ),
        }
    }
}

fn show_status(args: StatusArgs) -> anyhow::Result<()> {
    let reply = client::status(&args.api).context("ferry vm status")?;
    if args.json {
        println!("{}", ferry_control::json::to_string(&reply)?);
        return Ok(());
    }
    match &reply.status {
        // The guest's own phase (its status block) says Running even while
        // its vCPU is paused: the vCPU's state comes first.
        Some(st) => println!(
            "{} (guest {}, vCPU {}): heartbeat {} dirtied {} verify_errors {} guest phase {:?}",
            reply.role,
            reply.state.describe(),
            reply
                .run_state
                .as_ref()
                .map_or_else(|| "none".to_owned(), ToString::to_string),
            st.heartbeat,
            st.pages_dirtied,
            st.verify_errors,
            st.phase
        ),
        None => println!("{} (guest {})", reply.role, reply.state.describe()),
    }
    if let Some(st) = reply.status.as_ref().filter(|st| st.ram_ranges > 1) {
        let ranges: Vec<String> = st.ram[..2]
            .iter()
            .map(|(a, b)| format!("{a:#x}-{b:#x}"))
            .collect();
        println!(
            "  guest RAM in use  {} (around the 3-4 GiB hole)",
            ranges.join(", ")
        );
    }
    // The last migration's digest, per memory region, as this side saw it.
    if let Ok(m) = client::migration(&args.api) {
        let (digest, regions) = match (&m.summary, &m.received) {
            (Some(s), _) => (Some(s.memory_digest), s.region_digests.as_slice()),
            (None, Some(r)) => (Some(r.memory_digest), r.region_digests.as_slice()),
            _ => (None, &[][..]),
        };
        if let Some(d) = digest.filter(|_| m.phase.is_final()) {
            println!("  last migration    memory digest {d:#018x}");
            crate::migrate_cmd::print_region_digests(regions);
        }
    }
    if reply.state == GuestHome::Migrating {
        if let Ok(m) = client::migration(&args.api) {
            println!(
                "  migrating to {}: {}, round {}, {} left, expected downtime {:.1} ms (details: ferry migrate status --api {})",
                m.to.as_deref().unwrap_or("?"),
                format!("{:?}", m.phase).to_lowercase(),
                m.round,
                format_bytes(m.bytes_left),
                m.expected_downtime_ms,
                args.api.display()
            );
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Display {
    Live,
    Json,
    Quiet,
}

impl Display {
    fn pick(json: bool, quiet: bool) -> Self {
        if json {
            Self::Json
        } else if quiet {
            Self::Quiet
        } else {
            Self::Live
        }
    }
}

/// Shows the guest until it migrates away, `quit` is asked, it fails, or `duration` passes.
/// A line of `ferry vm run|receive --json`: seconds since the start, where
/// the guest is, its status block (typed, so [`ferry_control::json`] knows
/// which integers are 64-bit).
#[derive(serde::Serialize)]
struct StatusLine<'a> {
    t: f64,
    state: GuestHome,
    status: &'a ferry_vm::GuestStatus,
}

/// How long a process that is about to end waits for the replies its
/// control socket still owes ([`Served::wait_answered`]).
const ANSWER_GRACE: Duration = Duration::from_secs(2);

/// Waits up to [`ANSWER_GRACE`] for the replies the control socket still
/// owes, and says so when one did not go out (its client then reads the
/// socket closing instead of an answer).
fn let_replies_go_out(served: &Served) {
    if !served.wait_answered(ANSWER_GRACE) {
        tracing::warn!(
            grace_s = ANSWER_GRACE.as_secs(),
            "exiting with a control reply still unsent"
        );
    }
}

fn live(served: &Served, display: Display, duration: Option<Duration>) -> anyhow::Result<()> {
    let vm = served.vm().context("no guest")?;
    let bar = if display == Display::Live {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
    let start = Instant::now();
    let mut last = vm.status();
    let mut last_t = Instant::now();
    let mut last_json = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        match served.home() {
            GuestHome::MigratedAway => {
                // The migrate request's reply (its summary) goes out after
                // the guest is marked gone: let it, before this exits.
                let_replies_go_out(served);
                bar.finish_and_clear();
                if display != Display::Json {
                    eprintln!(
                        "ferry: the guest now runs at the destination; this copy is discarded"
                    );
                }
                return Ok(());
            }
            GuestHome::InDoubt => {
                bar.set_message("in doubt: GO was sent but the destination never confirmed; the guest stays paused here");
                continue;
            }
            GuestHome::Here | GuestHome::Migrating | GuestHome::Awaiting => {}
        }
        if served.quit_asked() {
            let_replies_go_out(served);
            bar.finish_and_clear();
            return Ok(());
        }
        let st = vm.status();
        if st.phase == GuestPhase::Fatal {
            bail!("the guest failed: {}", st.fatal_reason_text());
        }
        if let RunState::Failed(why) = vm.run_state() {
            bail!("the guest stopped: {why}");
        }
        if last_t.elapsed() >= Duration::from_millis(500) {
            let rate = st.pages_dirtied.saturating_sub(last.pages_dirtied) as f64
                / last_t.elapsed().as_secs_f64();
            let migrating = if served.home() == GuestHome::Migrating {
                "  [migrating]"
            } else {
                ""
            };
            bar.set_message(format!(
                "heartbeat {:>8}  dirtied {:>10} ({:>7.0}/s)  passes {:>5}  verified {:>9}  verify_errors {}{migrating}",
                st.heartbeat, st.pages_dirtied, rate, st.passes, st.pages_verified, st.verify_errors
            ));
            bar.tick();
            last = st;
            last_t = Instant::now();
        }
        if display == Display::Json && last_json.elapsed() >= Duration::from_secs(1) {
            println!(
                "{}",
                ferry_control::json::to_string(&StatusLine {
                    t: start.elapsed().as_secs_f64(),
                    state: served.home(),
                    status: &st,
                })?
            );
            last_json = Instant::now();
        }
        if duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
    }
    bar.finish();
    if last.verify_errors > 0 {
        bail!(
            "the guest's self-check found {} bad pages (first bad word at {:#x})",
            last.verify_errors,
            last.first_bad_addr
        );
    }
    Ok(())
}

/// Runs a `ferry vm` subcommand.
pub fn run(cmd: VmCmd) -> anyhow::Result<()> {
    match cmd {
        VmCmd::Run(a) => run_vm(a),
        VmCmd::Receive(a) => receive(a),
        VmCmd::Status(a) => show_status(a),
        VmCmd::Resolve(a) => {
            let action = match a.decision {
                ResolveDecision::Resume => ferry_control::ResolveAction::Resume,
                ResolveDecision::Discard => ferry_control::ResolveAction::Discard,
            };
            let msg = client::resolve(&a.api, action).context("ferry vm resolve")?;
            println!("{msg}");
            Ok(())
        }
    }
}
