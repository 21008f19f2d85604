//! The security flags shared by `ferry tunnel`, `ferry migrate` and
//! `ferry vm receive`: mutual TLS from PEM files, or plaintext only when
//! asked for by name with `--insecure`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use ferry_transport::Security;

pub use ferry_control::SecuritySpec;

/// `--insecure` or `--tls-cert/--tls-key/--tls-ca` [+ `--tls-name`].
#[derive(Args, Debug, Clone)]
pub struct SecurityArgs {
    /// Plaintext, no authentication: only when asked for.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub insecure: bool,
    /// This end's certificate (PEM).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// This end's private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// The CA that signed the peer's certificate (PEM).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// The name the listener's certificate must carry.
    #[arg(long, default_value = ferry_transport::tls::DEFAULT_SERVER_NAME)]
    pub tls_name: String,
}

impl SecurityArgs {
    /// The choice the flags make. Neither TLS files nor `--insecure` is an
    /// error naming both ways out; relative paths become absolute (the spec
    /// may be used by a process with another working directory).
    pub fn spec(&self) -> anyhow::Result<SecuritySpec> {
        if self.insecure {
            return Ok(SecuritySpec::Insecure);
        }
        let given = [
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--tls-ca", &self.tls_ca),
        ];
        let missing: Vec<&str> = given
            .iter()
            .filter(|(_, p)| p.is_none())
            .map(|(flag, _)| *flag)
            .collect();
        if missing.len() == given.len() {
            bail!("no security chosen: give --tls-cert, --tls-key and --tls-ca for mutual TLS (`ferry tls gen-certs DIR` makes them), or --insecure for plaintext");
        }
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca)
        else {
            bail!(
                "mutual TLS needs --tls-cert, --tls-key and --tls-ca together: {} missing (or give --insecure for plaintext)",
                missing.join(" and ")
            );
        };
        Ok(SecuritySpec::Tls {
            cert: absolute(cert)?,
            key: absolute(key)?,
            ca: absolute(ca)?,
            server_name: self.tls_name.clone(),
        })
    }

    /// The choice, with the TLS files loaded.
    pub fn security(&self) -> anyhow::Result<Security> {
        Ok(self.spec()?.load()?)
    }
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        security: SecurityArgs,
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
    }

    #[test]
    fn neither_choice_names_both_ways_out() {
        let e = parse(&[]).unwrap().security.spec().unwrap_err().to_string();
        assert!(
            e.contains("--insecure") && e.contains("--tls-cert") && e.contains("gen-certs"),
            "{e}"
        );
    }

    #[test]
    fn partial_tls_names_the_missing_flags() {
        let e = parse(&["--tls-cert", "c.pem"])
            .unwrap()
            .security
            .spec()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--tls-key and --tls-ca missing"), "{e}");
    }

    #[test]
    fn insecure_conflicts_with_tls_files() {
        assert!(parse(&["--insecure", "--tls-ca", "ca.pem"]).is_err());
        assert_eq!(
            parse(&["--insecure"]).unwrap().security.spec().unwrap(),
            SecuritySpec::Insecure
        );
    }

    #[test]
    fn tls_spec_has_absolute_paths() {
        let cli = parse(&[
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-ca",
            "/etc/ca.pem",
            "--tls-name",
            "dst",
        ])
        .unwrap();
        let spec = cli.security.spec().unwrap();
        let SecuritySpec::Tls {
            cert,
            ca,
            server_name,
            ..
        } = &spec
        else {
            panic!("{spec:?}");
        };
        assert!(cert.is_absolute() && cert.ends_with("c.pem"));
        assert_eq!(ca, Path::new("/etc/ca.pem"));
        assert_eq!(server_name, "dst");
    }
}
