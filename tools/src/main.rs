//! `ferry`: live-migrate KVM guests, tunnel QEMU migrations, benchmark
//! migration engines, and schedule VMs across hosts.
//!
//! Exit codes: 0 success, 1 the operation failed (the message says why),
//! 2 bad usage.

mod agent_cmd;
mod bench_cmd;
mod demo;
mod migrate_cmd;
mod sched_cmd;
mod security_args;
mod tunnel_cmd;
mod vm_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Live migration of KVM guests, and a scheduler that decides where they go"
)]
struct Cli {
    /// Log filter (also RUST_LOG), e.g. `info` or `ferry_engine=debug`.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    /// Log lines as `text` (coloured only on a terminal) or `json` (one
    /// object per line, for log collectors).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run or receive a VM.
    #[command(subcommand)]
    Vm(vm_cmd::VmCmd),
    /// The main job: migrate a live guest between two processes over loopback.
    Demo(demo::DemoArgs),
    /// Migrate the guest of a `ferry vm run --api` process to a `ferry vm
    /// receive`; or watch (`status`), stop (`cancel`) or retune (`set`) a
    /// migration.
    Migrate(migrate_cmd::MigrateCmd),
    /// Benchmark migration engines (ferry vs QEMU).
    Bench(bench_cmd::BenchArgs),
    /// Carry a stock QEMU/libvirt migration (UNIX socket) over ferry lanes.
    #[command(subcommand)]
    Tunnel(tunnel_cmd::TunnelCmd),
    /// TLS certificates for lanes and tunnels.
    #[command(subcommand)]
    Tls(tunnel_cmd::TlsCmd),
    /// A host agent: runs VMs and migrates them when the scheduler asks.
    Agent(agent_cmd::AgentArgs),
    /// The scheduler: simulate policies on traces, or run the daemon.
    Sched(sched_cmd::SchedArgs),
    /// Print a shell completion script (e.g. `ferry completions bash >
    /// /usr/share/bash-completion/completions/ferry`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write man pages for ferry and every subcommand into a folder.
    Man {
        /// The folder (created if missing).
        dir: std::path::PathBuf,
    },
}

/// `ferry man DIR`: one page per command (`ferry.1`, `ferry-sched-daemon.1`, ...).
fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cmd = <Cli as clap::CommandFactory>::command();
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
    Ok(())
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log.clone());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let result = match cli.cmd {
        Cmd::Vm(c) => vm_cmd::run(c),
        Cmd::Migrate(a) => migrate_cmd::run(a),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Bench(a) => bench_cmd::run(a),
        Cmd::Tunnel(c) => tunnel_cmd::run(c),
        Cmd::Tls(c) => tunnel_cmd::tls(c),
        Cmd::Sched(a) => sched_cmd::run(a),
        Cmd::Agent(a) => agent_cmd::run(a),
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "ferry", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man { dir } => write_man_pages(&dir),
    };
    if let Err(e) = result {
        // One readable line: the whole chain, outermost first.
        let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
        eprintln!("ferry: error: {}", chain.join(": "));
        std::process::exit(1);
    }
}
