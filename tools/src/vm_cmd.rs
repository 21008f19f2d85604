//! `ferry vm run`: run the workload guest (or any GUEST.md multiboot image)
//! and show its heartbeat, dirty count and self-check errors live.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ferry_vm::{
    host_tsc_khz, parse_size, DirtyBackend, GuestParams, GuestPhase, RunState, Vm, VmConfig,
};
use indicatif::{ProgressBar, ProgressStyle};

/// `ferry vm ...`
#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Boot a guest and show it live.
    Run(RunArgs),
}

/// How to build a guest.
#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// Guest RAM: bytes or with K/M/G (e.g. 2G).
    #[arg(long, default_value = "1G", value_parser = parse_mem)]
    pub mem: u64,
    /// Pages per second the workload guest dirties (`max` = unpaced).
    #[arg(long, default_value = "0")]
    pub rate: String,
    /// Working set of the dirty loop (e.g. 256M, `all`).
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
}

fn parse_mem(s: &str) -> Result<u64, String> {
    parse_size(s, 1).ok_or_else(|| format!("`{s}` is not a size (e.g. 512M, 2G)"))
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
        let mut p = GuestParams::default();
        p.rate = match self.rate.as_str() {
            "max" => None,
            r => Some(
                r.parse()
                    .with_context(|| format!("--rate `{r}`: want pages/s or `max`"))?,
            ),
        };
        p.wss_bytes = match self.wss.as_str() {
            "all" => None,
            w => Some(
                parse_size(w, 1 << 20)
                    .with_context(|| format!("--wss `{w}`: want a size or `all`"))?,
            ),
        };
        p.seed = self.seed;
        p.verify = self.verify;
        p.tsc_khz = Some(u64::from(
            host_tsc_khz().context("asking KVM for the TSC frequency")?,
        ));
        Ok(p.to_cmdline())
    }

    /// The VM configuration.
    pub fn config(&self) -> anyhow::Result<VmConfig> {
        Ok(VmConfig {
            mem_bytes: self.mem,
            kernel: self.kernel.clone(),
            cmdline: self.cmdline()?,
            dirty: self.dirty_log,
        })
    }
}

/// `ferry vm run`
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Print a JSON status line every second instead of a live display.
    #[arg(long)]
    pub json: bool,
}

/// Boots the guest and waits for phase 2, with a spinner.
pub fn boot_with_progress(cfg: &VmConfig, quiet: bool) -> anyhow::Result<Vm> {
    let vm = Vm::boot(cfg).context("starting the VM")?;
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
    Ok(vm)
}

fn run_vm(args: RunArgs) -> anyhow::Result<()> {
    let cfg = args.guest.config()?;
    if !args.json {
        eprintln!(
            "ferry: booting {} MiB guest: {}",
            cfg.mem_bytes >> 20,
            cfg.cmdline
        );
    }
    let t0 = Instant::now();
    let vm = boot_with_progress(&cfg, args.json)?;
    let boot_s = t0.elapsed().as_secs_f64();
    if !args.json {
        eprintln!(
            "ferry: guest running after {boot_s:.2} s (filled {} MiB)",
            vm.status().mem_top >> 20
        );
    }
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
    let start = Instant::now();
    let mut last = vm.status();
    let mut last_t = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(if args.json { 1000 } else { 250 }));
        let st = vm.status();
        let dt = last_t.elapsed().as_secs_f64();
        let rate = (st.pages_dirtied - last.pages_dirtied) as f64 / dt;
        if args.json {
            println!(
                "{}",
                serde_json::json!({"t": start.elapsed().as_secs_f64(), "status": st, "dirty_pages_per_s": rate})
            );
        } else {
            bar.set_message(format!(
                "heartbeat {:>8}  dirtied {:>10} ({:>7.0}/s)  passes {:>5}  verified {:>9}  verify_errors {}",
                st.heartbeat, st.pages_dirtied, rate, st.passes, st.pages_verified, st.verify_errors
            ));
            bar.tick();
        }
        if st.phase == GuestPhase::Fatal {
            bail!("the guest failed: {}", st.fatal_reason_text());
        }
        if let RunState::Failed(why) = vm.run_state() {
            bail!("the guest stopped: {why}");
        }
        last = st;
        last_t = Instant::now();
        if args
            .duration
            .is_some_and(|d| start.elapsed().as_secs_f64() >= d)
        {
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
    }
}
