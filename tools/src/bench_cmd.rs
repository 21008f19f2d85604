//! `ferry bench compare`: ferry and stock QEMU migrate the same workload
//! guest on this machine, in one run; the table gives ferry/QEMU ratios.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ferry_harness::bench::compare::{self, CompareConfig};
use ferry_harness::bench::matrix::{
    DirtyLevel, DstMemory, FerryProfile, Fill, Link, Profile, QemuProfile,
};
use ferry_harness::bench::settings::RunSettings;

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
    /// pages/s), heavy (all memory, unpaced writes, uncapped), capped (256M,
    /// unpaced writes, over a 48 MiB/s cap).
    #[arg(
        long,
        default_value = "idle,moderate,heavy,capped",
        value_delimiter = ','
    )]
    pub levels: Vec<String>,
    /// Guest memory contents: `random` (incompressible, never zero) and/or
    /// `mix` (zero, text-like and incompressible pages, vm/guest/GUEST.md).
    #[arg(long, default_value = "random", value_delimiter = ',')]
    pub fill: Vec<String>,
    /// With `--fill mix`: percent of zero pages.
    #[arg(long, default_value_t = 40)]
    pub mix_zero: u8,
    /// With `--fill mix`: percent of text-like pages (the rest incompressible).
    #[arg(long, default_value_t = 30)]
    pub mix_text: u8,
    /// Links: `loopback`, and shaped links such as `10gbit`, `1gbit`,
    /// `500mbit` (the destinations in a network namespace of their own
    /// behind a veth pair shaped with tc; needs root).
    #[arg(long, default_value = "loopback", value_delimiter = ',')]
    pub links: Vec<String>,
    /// How both engines' destinations get their memory: `prepared`
    /// (populated before the migration: ferry `vm receive --mem`, QEMU
    /// `-mem-prealloc`) and/or `on-demand` (during the migration, in the
    /// timed part, for both).
    #[arg(long, default_value = "prepared,on-demand", value_delimiter = ',')]
    pub dst_memory: Vec<String>,
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
    /// vCPUs of the guest, for both engines (ferry `--cpus`, QEMU `-smp`;
    /// the guest runs a dirty loop on each, `rate` is their total).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=ferry_vm::MAX_VCPUS as i64))]
    pub cpus: u32,
    /// vCPUs that run a dirty loop (default: all of --cpus); the others
    /// spin idle without writing, for both engines (the guest's `cpus=`).
    /// `--cpus 2 --dirty-cpus 1 --levels capped --ferry-profiles
    /// auto-converge,dirty-limit --qemu-profiles auto-converge,dirty-limit`
    /// compares the convergence modes.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=ferry_vm::MAX_VCPUS as i64))]
    pub dirty_cpus: Option<u32>,
    /// The guest's timer mode for both engines: PIT ticks per second, the
    /// guest halting between them (vm/guest/GUEST.md); 0 = off.
    #[arg(long, default_value_t = 0, value_parser = crate::vm_cmd::parse_hz)]
    pub hz: u64,
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
    /// ferry's downtime limit, ms (and QEMU's unless
    /// --qemu-max-downtime-ms says otherwise).
    #[arg(long, default_value_t = 20)]
    pub max_downtime_ms: u64,
    /// QEMU's downtime limits, ms, comma-separated: each QEMU profile runs
    /// at each (e.g. `20,300` to show QEMU's own 300 ms default beside the
    /// equal-limit rows). Ratios and floors use QEMU at ferry's limit.
    #[arg(long, value_delimiter = ',')]
    pub qemu_max_downtime_ms: Vec<u64>,
    /// A run counts as busy when other work used more than this many CPUs
    /// before or during it; busy rows' floors get no verdict.
    #[arg(long, default_value_t = RunSettings::BUSY_CPUS)]
    pub busy_cpus: f64,
    /// Before each run, wait up to this long for the machine to be quiet
    /// (default 60 s; 0 with --quick, the CI row, which only reports).
    #[arg(long)]
    pub quiet_wait_s: Option<u64>,
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
        busy_cpus: a.busy_cpus,
        quiet_wait: Duration::from_secs(a.quiet_wait_s.unwrap_or(if a.quick { 0 } else { 60 })),
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
                levels: parse_list(&a.levels, "levels", DirtyLevel::parse)?,
                fills: parse_list(&a.fill, "fill", |f| match f {
                    "random" => Some(Fill::Random),
                    "mix" => Some(Fill::Mix {
                        zero_pct: a.mix_zero,
                        text_pct: a.mix_text,
                    }),
                    _ => None,
                })?,
                links: parse_list(&a.links, "links", Link::parse)?,
                dst_memories: parse_list(&a.dst_memory, "dst-memory", DstMemory::parse)?,
                qemu_profiles: parse_list(&a.qemu_profiles, "qemu-profiles", |p| {
                    match Profile::parse(&format!("qemu:{p}")) {
                        Some(Profile::Qemu(q)) => Some(q),
                        _ => None::<QemuProfile>,
                    }
                })?,
                cpus: 1,
                dirty_cpus: 0,
                hz: 0,
                ferry_profiles: parse_list(&a.ferry_profiles, "ferry-profiles", |p| {
                    match Profile::parse(&format!("ferry:{p}")) {
                        Some(Profile::Ferry(f)) => Some(f),
                        _ => None::<FerryProfile>,
                    }
                })?,
                qemu_downtime_limits_ms: if a.qemu_max_downtime_ms.is_empty() {
                    vec![a.max_downtime_ms]
                } else {
                    a.qemu_max_downtime_ms.clone()
                },
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
    if u16::from(a.mix_zero) + u16::from(a.mix_text) > 100 {
        bail!(
            "--mix-zero {} and --mix-text {} add up to more than 100 %",
            a.mix_zero,
            a.mix_text
        );
    }
    if a.busy_cpus.is_nan() || a.busy_cpus < 0.0 {
        bail!("--busy-cpus: want a number of CPUs >= 0");
    }
    for (what, empty) in [
        ("--levels", cfg.levels.is_empty()),
        ("--fill", cfg.fills.is_empty()),
        ("--links", cfg.links.is_empty()),
        ("--dst-memory", cfg.dst_memories.is_empty()),
    ] {
        if empty && !a.quick {
            bail!("{what}: give at least one");
        }
    }
    cfg.cpus = a.cpus;
    if let Some(d) = a.dirty_cpus {
        if d > a.cpus {
            bail!(
                "--dirty-cpus {d} is more than the guest's {} vCPUs (--cpus)",
                a.cpus
            );
        }
        cfg.dirty_cpus = d;
    }
    cfg.hz = a.hz;
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
                "ferry bench compare: {} workload(s) x ({} QEMU profile(s) x {} limit(s) + {} ferry profile(s)) x {} repeat(s) = {} runs",
                cfg.workloads().len(),
                cfg.qemu_profiles.len(),
                cfg.qemu_downtime_limits_ms.len(),
                cfg.ferry_profiles.len(),
                cfg.repeat,
                cfg.workloads().len() * cfg.runs_per_workload()
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
