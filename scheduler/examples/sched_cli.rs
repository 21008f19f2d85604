//! Compiles and runs `tools/src/sched_cmd.rs` (the `ferry sched` module)
//! from the scheduler crate: `cargo run --release -p ferry-scheduler
//! --example sched_cli -- simulate --traces ../shared/traces`.
#[path = "../../tools/src/sched_cmd.rs"]
mod sched_cmd;

use clap::Parser;

#[derive(Debug, clap::Parser)]
struct Cli {
    #[command(flatten)]
    sched: sched_cmd::SchedArgs,
}

fn main() -> anyhow::Result<()> {
    sched_cmd::run(Cli::parse().sched)
}
