//! `ferryd`: Ferry's host agent (docs/cluster.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

/// Ferry's host agent: supervises this host's VM workers, keeps the host in the cluster and
/// serves the REST API.
#[derive(Parser)]
#[command(name = "ferryd", version)]
struct Args {
    /// Agent configuration (TOML).
    #[arg(long, default_value = "/etc/ferry/ferryd.toml")]
    config: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ferry_worker::server::init_logging();
    let cfg = ferry_cluster::AgentConfig::load(&args.config)?;
    let worker = match std::env::var_os("FERRY_VM_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .context("cannot locate ferryd")?
            .with_file_name("ferry-vm"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(ferry_cluster::serve(cfg, worker))?;
    Ok(())
}
