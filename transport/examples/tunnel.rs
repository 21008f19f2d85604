//! Runs one end of ferry's byte-stream tunnel (what `ferry tunnel` wires in).
//!
//! ```text
//! tunnel source      --listen-unix PATH --to HOST:PORT       [options]
//! tunnel destination --listen HOST:PORT --connect-unix PATH  [options]
//! options: --lanes N  --lz4  --max-bandwidth BYTES_PER_SEC
//!          --insecure | --tls-cert PEM --tls-key PEM --tls-ca PEM [--tls-name NAME]
//! ```
//! Runs until the session ends (source) or until killed (destination).

use std::path::PathBuf;
use std::sync::Arc;

use ferry_transport::tunnel::{Tunnel, TunnelOptions};
use ferry_transport::{default_lane_count, LaneOptions, Security, TlsFiles, TlsSettings};

fn main() {
    if let Err(e) = run() {
        eprintln!("tunnel: {e}");
        let mut src = std::error::Error::source(&*e);
        while let Some(s) = src {
            eprintln!("  caused by: {s}");
            src = s.source();
        }
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let role = args.first().cloned().unwrap_or_default();
    let get = |flag: &str| -> Option<String> {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let security = if has("--insecure") {
        Security::Insecure
    } else {
        let (Some(cert), Some(key), Some(ca)) =
            (get("--tls-cert"), get("--tls-key"), get("--tls-ca"))
        else {
            return Err(
                "give --tls-cert, --tls-key and --tls-ca, or --insecure for plaintext".into(),
            );
        };
        let files = TlsFiles {
            cert: cert.into(),
            key: key.into(),
            ca: ca.into(),
        };
        let name =
            get("--tls-name").unwrap_or_else(|| ferry_transport::tls::DEFAULT_SERVER_NAME.into());
        Security::Tls(Arc::new(TlsSettings::from_files(&files, &name)?))
    };
    let lanes = match get("--lanes") {
        Some(n) => n.parse()?,
        None => default_lane_count(),
    };
    let mut lane_opts = LaneOptions::new(lanes, security);
    lane_opts.max_bandwidth = get("--max-bandwidth").map(|b| b.parse()).transpose()?;
    let mut opts = TunnelOptions::new(lane_opts);
    opts.lz4 = has("--lz4");
    match role.as_str() {
        "source" => {
            let listen =
                PathBuf::from(get("--listen-unix").ok_or("source needs --listen-unix PATH")?);
            let to = get("--to").ok_or("source needs --to HOST:PORT")?;
            let t = Tunnel::source(&listen, &to, &opts)?;
            eprintln!(
                "tunnel source: {} -> {to} ({lanes} lanes)",
                listen.display()
            );
            t.wait()?;
        }
        "destination" => {
            let listen = get("--listen").ok_or("destination needs --listen HOST:PORT")?;
            let connect = PathBuf::from(
                get("--connect-unix").ok_or("destination needs --connect-unix PATH")?,
            );
            let t = Tunnel::destination(&listen, &connect, &opts)?;
            eprintln!(
                "tunnel destination: {} -> {}",
                t.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                connect.display()
            );
            t.wait()?;
        }
        _ => return Err("usage: tunnel source|destination ... (see the example's doc)".into()),
    }
    Ok(())
}
