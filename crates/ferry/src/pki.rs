//! `ferry pki ...`: the cluster CA and host identities that authenticate migrations, and
//! the `--pki`/`--insecure` options of the commands that migrate.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use migration::tls;

use crate::output::print;
use crate::Output;

/// Where a host's identity lives unless told otherwise.
pub const DEFAULT_DIR: &str = "/etc/ferry/pki";

/// `ferry pki` verbs.
#[derive(Debug, Subcommand)]
pub enum PkiCmd {
    /// Create a new cluster CA in DIR, and an identity for this host next to it.
    Init {
        /// Directory (created).
        dir: PathBuf,
        /// Cluster name (goes into the CA's name).
        #[arg(long, default_value = "ferry")]
        cluster: String,
        /// Name of this host's identity (default: the host name).
        #[arg(long)]
        host: Option<String>,
    },
    /// Sign an identity for another host with the CA in --ca; writes ca.pem, cert.pem and
    /// key.pem to OUT (copy that directory to the host).
    Issue {
        /// Directory of the CA (ca.pem, ca-key.pem).
        #[arg(long)]
        ca: PathBuf,
        /// The host's name.
        #[arg(long)]
        host: String,
        /// Output directory (created).
        out: PathBuf,
    },
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Runs a `ferry pki` verb.
pub fn run(cmd: PkiCmd, out: Output) -> Result<()> {
    let (dir, host) = match cmd {
        PkiCmd::Init { dir, cluster, host } => {
            let host = host.unwrap_or_else(host_name);
            tls::init_ca(&dir, &cluster)?;
            tls::issue(&dir, &dir, &host)?;
            (dir, host)
        }
        PkiCmd::Issue { ca, host, out: dir } => {
            tls::issue(&ca, &dir, &host)?;
            (dir, host)
        }
    };
    tls::Identity::load(&dir)?;
    print(
        out,
        &serde_json::json!({"dir": dir, "host": host}),
        &["IDENTITY", "HOST"],
        vec![vec![dir.display().to_string(), host]],
    );
    Ok(())
}

/// How a migration connection is secured.
#[derive(Debug, Args)]
pub struct SecurityArgs {
    /// This host's TLS identity directory (ca.pem, cert.pem, key.pem) [default:
    /// $FERRY_PKI_DIR, else /etc/ferry/pki].
    #[arg(long, conflicts_with = "insecure")]
    pki: Option<PathBuf>,
    /// Plain TCP: no encryption, no authentication (a trusted, isolated network only).
    #[arg(long)]
    insecure: bool,
}

impl SecurityArgs {
    /// The identity directory to use, or `None` for plain TCP.
    pub fn resolve(&self) -> Result<Option<PathBuf>> {
        if self.insecure {
            return Ok(None);
        }
        let dir = match &self.pki {
            Some(d) => d.clone(),
            None => std::env::var_os("FERRY_PKI_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR)),
        };
        if !dir.join(tls::CERT).exists() {
            bail!(
                "no TLS identity in {} (ca.pem, cert.pem, key.pem): create one with `ferry pki init {}` \
                 and give every host an identity of the same CA (`ferry pki issue`), or pass \
                 --insecure for an unencrypted migration on a trusted network",
                dir.display(),
                dir.display()
            );
        }
        let dir = absolute(&dir)?;
        tls::Identity::load(&dir).with_context(|| format!("TLS identity in {}", dir.display()))?;
        Ok(Some(dir))
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
}
