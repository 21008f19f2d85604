//! `ferry tunnel`: carry a UNIX-socket byte stream (stock QEMU or libvirt
//! migration, `migrate "unix:PATH"`) over ferry lanes, with optional LZ4,
//! mutual TLS and a bandwidth cap. `ferry tls gen-certs` makes a CA and
//! certificates for both ends.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_transport::tunnel::{Tunnel, TunnelOptions};
use ferry_transport::{default_lane_count, LaneOptions};

use crate::security_args::SecurityArgs;

/// `ferry tunnel ...`
#[derive(Subcommand, Debug)]
pub enum TunnelCmd {
    /// Source side: listen on a UNIX socket (QEMU's `migrate unix:PATH` connects here).
    Source {
        /// The UNIX socket the source QEMU/libvirt connects to.
        #[arg(long)]
        listen_unix: PathBuf,
        /// The tunnel destination (host:port).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        link: LinkArgs,
    },
    /// Destination side: accept lanes, connect each stream to a UNIX socket
    /// (the destination QEMU's `-incoming unix:PATH`).
    Destination {
        /// Address to accept the source's lanes on.
        #[arg(long)]
        listen: String,
        /// The UNIX socket of the destination QEMU.
        #[arg(long)]
        connect_unix: PathBuf,
        #[command(flatten)]
        link: LinkArgs,
    },
}

/// Lanes, compression, bandwidth and security of the tunnel.
#[derive(Args, Debug)]
pub struct LinkArgs {
    /// TCP lanes (the source decides; default: one per core, 4 to 8).
    #[arg(long)]
    lanes: Option<u16>,
    /// Compress with LZ4 (chunks that do not shrink go raw).
    #[arg(long)]
    lz4: bool,
    /// Cap in bytes per second (binary units: 100M is 100 MiB/s).
    #[arg(long, value_parser = parse_rate)]
    max_bandwidth: Option<u64>,
    #[command(flatten)]
    security: SecurityArgs,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    ferry_control::units::parse_rate(s).map_err(|e| e.to_string())
}

impl LinkArgs {
    fn options(&self) -> anyhow::Result<TunnelOptions> {
        let security = self.security.security()?;
        let mut lanes = LaneOptions::new(self.lanes.unwrap_or_else(default_lane_count), security);
        lanes.max_bandwidth = self.max_bandwidth;
        let mut opts = TunnelOptions::new(lanes);
        opts.lz4 = self.lz4;
        Ok(opts)
    }
}

/// Runs one end until the session ends (source) or the process is killed.
pub fn run(cmd: TunnelCmd) -> anyhow::Result<()> {
    match cmd {
        TunnelCmd::Source {
            listen_unix,
            to,
            link,
        } => {
            let opts = link.options()?;
            let t =
                Tunnel::source(&listen_unix, &to, &opts).context("starting the tunnel source")?;
            eprintln!(
                "ferry tunnel: {} -> {to} ({} lanes)",
                listen_unix.display(),
                opts.lanes.lanes
            );
            t.wait().context("tunnel source")?;
        }
        TunnelCmd::Destination {
            listen,
            connect_unix,
            link,
        } => {
            let opts = link.options()?;
            let t = Tunnel::destination(&listen, &connect_unix, &opts)
                .context("starting the tunnel destination")?;
            let addr = t.local_addr().map(|a| a.to_string()).unwrap_or(listen);
            eprintln!("ferry tunnel: {addr} -> {}", connect_unix.display());
            t.wait().context("tunnel destination")?;
        }
    }
    Ok(())
}

/// `ferry tls ...`
#[derive(Subcommand, Debug)]
pub enum TlsCmd {
    /// A certificate + key for each node in DIR, signed by the CA there
    /// (ca.pem and its key ca.key, kept so nodes can be added later) or by
    /// a new one. Existing files are never replaced without --force.
    GenCerts {
        /// Output folder.
        dir: PathBuf,
        /// Node names (one certificate each).
        #[arg(long, num_args = 1.., default_values = ["source", "destination"])]
        nodes: Vec<String>,
        /// Make a new CA and replace every file named (every node's
        /// certificate must then be made again).
        #[arg(long)]
        force: bool,
    },
}

/// Runs `ferry tls ...`.
pub fn tls(cmd: TlsCmd) -> anyhow::Result<()> {
    match cmd {
        TlsCmd::GenCerts { dir, nodes, force } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
            let g = ferry_transport::tls::add_certs(&dir, &names, force)
                .context("generating certificates")?;
            println!(
                "CA: {} (its key {} signs nodes added later: keep it secret)",
                g.ca.display(),
                dir.join("ca.key").display()
            );
            for (name, f) in g.nodes {
                println!(
                    "{name}: --tls-cert {} --tls-key {} --tls-ca {}",
                    f.cert.display(),
                    f.key.display(),
                    f.ca.display()
                );
            }
        }
    }
    Ok(())
}
