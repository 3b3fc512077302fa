//! `ferry disk ...`: raw disk images (docs/disks.md).

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use crate::output::print;
use crate::Output;

/// `ferry disk` verbs.
#[derive(Debug, Subcommand)]
pub enum DiskCmd {
    /// Create a sparse raw image (never overwrites a file).
    Create {
        /// The image file (on the cluster's shared directory for cluster VMs).
        path: PathBuf,
        /// Virtual size (e.g. 10G, 512M; whole 512-byte sectors).
        #[arg(long)]
        size: String,
    },
    /// Size, space used and who holds an image (free, read-only, read-write).
    Inspect {
        /// The image file.
        path: PathBuf,
    },
}

/// Runs a `ferry disk` verb.
pub fn run(cmd: DiskCmd, out: Output) -> Result<()> {
    let info = match cmd {
        DiskCmd::Create { path, size } => {
            let bytes = vmm::config::parse_mib(&size)?.saturating_mul(1 << 20);
            vmm::disk::create(&path, bytes)?
        }
        DiskCmd::Inspect { path } => vmm::disk::inspect(&path)?,
    };
    print(
        out,
        &info,
        &["PATH", "SIZE", "ALLOCATED", "LOCK"],
        vec![vec![
            info.path.display().to_string(),
            crate::output::mib(info.size),
            crate::output::mib(info.allocated),
            info.lock.to_string(),
        ]],
    );
    Ok(())
}
