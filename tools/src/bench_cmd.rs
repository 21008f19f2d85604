//! `ferry bench compare`: ferry and stock QEMU migrate the same workload
//! guest on this machine, in one run; the table gives ferry/QEMU ratios.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ferry_benches::compare::{self, CompareConfig};
use ferry_benches::matrix::{DirtyLevel, FerryProfile, Profile, QemuProfile};
use ferry_benches::settings::RunSettings;

/// `ferry bench ...`
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub cmd: BenchCmd,
}

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Migrate the same guest with ferry and with QEMU, side by side.
    Compare(CompareArgs),
}

/// `ferry bench compare`
#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Guest memory sizes, comma-separated.
    #[arg(long, default_value = "1G,2G", value_delimiter = ',')]
    pub mem: Vec<String>,
    /// Dirty levels: idle (filled, no writes), moderate (256M at 5000
    /// pages/s), heavy (256M at 30000 pages/s over a 48 MiB/s cap).
    #[arg(long, default_value = "idle,moderate,heavy", value_delimiter = ',')]
    pub levels: Vec<String>,
    /// QEMU profiles (default, multifd, multifd-zstd, xbzrle, auto-converge); `none` for none.
    #[arg(
        long,
        default_value = "default,multifd,multifd-zstd,xbzrle,auto-converge",
        value_delimiter = ','
    )]
    pub qemu_profiles: Vec<String>,
    /// ferry profiles (default, one-lane, no-compress, no-delta); `none` for none.
    #[arg(
        long,
        default_value = "default,one-lane,no-compress,no-delta",
        value_delimiter = ','
    )]
    pub ferry_profiles: Vec<String>,
    /// Runs per workload and profile (medians, min, max).
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// The CI row: a 256 MiB guest dirtying 64 MiB at 1000 pages/s, both engines
    /// default profiles, once. Reports; never asserts a speed.
    #[arg(long)]
    pub quick: bool,
    /// A GUEST.md multiboot image to use for both engines instead of the
    /// built-in workload guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Downtime limit for both engines, ms.
    #[arg(long, default_value_t = 20)]
    pub max_downtime_ms: u64,
    /// Per-row migration deadline, s (default: 20 s + 2.5 passes at the cap
    /// or at 200 MB/s).
    #[arg(long)]
    pub deadline_s: Option<u64>,
    /// JSON lines: every run, the ceilings, the aggregates, the floors.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// The SVG plot of bytes left over time.
    #[arg(long, default_value = "bench-compare.svg")]
    pub plot: PathBuf,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// The ferry binary to benchmark (default: this one).
    #[arg(long)]
    pub ferry: Option<PathBuf>,
    /// Bytes the TCP ceiling moves (default 2 GiB; 256 MiB with --quick).
    #[arg(long)]
    pub ceiling_bytes: Option<String>,
}

fn parse_list<T>(
    items: &[String],
    what: &str,
    f: impl Fn(&str) -> Option<T>,
) -> anyhow::Result<Vec<T>> {
    if items.len() == 1 && items[0] == "none" {
        return Ok(Vec::new());
    }
    items
        .iter()
        .map(|s| f(s.trim()).with_context(|| format!("--{what}: unknown `{s}`")))
        .collect()
}

fn settings(a: &CompareArgs) -> anyhow::Result<RunSettings> {
    let kernel = match &a.kernel {
        Some(k) => {
            if !k.is_file() {
                bail!("--kernel {}: no such file", k.display());
            }
            k.clone()
        }
        None => {
            let p = ferry_vm::guest_elf_path().to_path_buf();
            if p.is_file() {
                p
            } else {
                // A binary copied elsewhere: write the embedded guest out.
                let out =
                    std::env::temp_dir().join(format!("ferry-guest-{}.elf", std::process::id()));
                std::fs::write(&out, ferry_vm::GUEST_ELF)
                    .context("writing the workload guest image")?;
                out
            }
        }
    };
    let workdir = std::env::temp_dir().join(format!("ferry-bench-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    Ok(RunSettings {
        custom_kernel: a.kernel.is_some(),
        kernel,
        tsc_khz: ferry_vm::host_tsc_khz()
            .context("asking KVM for the TSC frequency (is /dev/kvm usable?)")?,
        max_downtime_ms: a.max_downtime_ms,
        deadline: a.deadline_s.map(Duration::from_secs),
        ferry_bin: match &a.ferry {
            Some(f) => f.clone(),
            None => std::env::current_exe().context("locating the ferry binary")?,
        },
        qemu_bin: a.qemu.clone(),
        workdir,
        verbose: true,
    })
}

fn config(a: &CompareArgs) -> anyhow::Result<CompareConfig> {
    let s = settings(a)?;
    let mut cfg =
        if a.quick {
            CompareConfig::quick(s)
        } else {
            CompareConfig {
                mems: parse_list(&a.mem, "mem", |m| ferry_vm::parse_size(m, 1 << 20))?,
                levels: parse_list(&a.levels, "levels", |l| match l {
                    "idle" => Some(DirtyLevel::Idle),
                    "moderate" => Some(DirtyLevel::Moderate),
                    "heavy" => Some(DirtyLevel::Heavy),
                    _ => None,
                })?,
                qemu_profiles: parse_list(&a.qemu_profiles, "qemu-profiles", |p| {
                    match Profile::parse(&format!("qemu:{p}")) {
                        Some(Profile::Qemu(q)) => Some(q),
                        _ => None::<QemuProfile>,
                    }
                })?,
                ferry_profiles: parse_list(&a.ferry_profiles, "ferry-profiles", |p| {
                    match Profile::parse(&format!("ferry:{p}")) {
                        Some(Profile::Ferry(f)) => Some(f),
                        _ => None::<FerryProfile>,
                    }
                })?,
                repeat: a.repeat.max(1),
                ceiling_bytes: 2 << 30,
                json_out: None,
                plot_out: None,
                settings: s,
                custom: None,
            }
        };
    if let Some(c) = &a.ceiling_bytes {
        cfg.ceiling_bytes =
            ferry_vm::parse_size(c, 1).with_context(|| format!("--ceiling-bytes `{c}`"))?;
    }
    if cfg.mems.iter().any(|&m| m < 64 << 20) {
        bail!("--mem: guests need at least 64 MiB");
    }
    cfg.json_out = a.json_out.clone();
    cfg.plot_out = Some(a.plot.clone());
    Ok(cfg)
}

/// `ferry bench`
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.cmd {
        BenchCmd::Compare(a) => {
            let cfg = config(&a)?;
            let workdir = cfg.settings.workdir.clone();
            eprintln!(
                "ferry bench compare: {} workload(s) x {} QEMU + {} ferry profile(s) x {} run(s)",
                cfg.workloads().len(),
                cfg.qemu_profiles.len(),
                cfg.ferry_profiles.len(),
                cfg.repeat
            );
            let result = compare::run(&cfg, |r| eprintln!("{}", compare::run_line(r)));
            let _ = std::fs::remove_dir_all(&workdir);
            let report = result.context("bench compare")?;
            print!("{}", report.text());
            if let Some(p) = &cfg.json_out {
                eprintln!("JSON lines: {}", p.display());
            }
            if let Some(p) = &cfg.plot_out {
                eprintln!("plot: {}", p.display());
            }
            Ok(())
        }
    }
}
