//! `ferry vm disk add|remove|list`: the disks of a VM's SCSI controller, on this host's
//! worker or, with `--api`, through the cluster (wherever the VM runs, or in a stopped VM's
//! record).

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use ferry_worker::api::Request;
use ferry_worker::client::Workers;
use serde_json::json;
use vmm::devices::virtio::scsi::LunInfo;

use crate::cluster::Api;
use crate::output::{mib, print};
use crate::Output;

/// `p` made absolute against the current directory (the worker or agent may be elsewhere).
fn abs(p: PathBuf) -> Result<PathBuf> {
    Ok(if p.is_absolute() {
        p
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// `ferry vm disk` verbs: the disks on a running VM's SCSI controller.
#[derive(Debug, Subcommand)]
pub enum DiskCmd {
    /// Add a disk while the VM runs (the guest sees a new /dev/sdX).
    Add {
        /// VM name.
        name: String,
        /// A raw image or a host block device.
        path: PathBuf,
        /// Attach read-only.
        #[arg(long)]
        readonly: bool,
        /// The LUN (0 to 255; default: the lowest free one).
        #[arg(long)]
        lun: Option<u16>,
    },
    /// Remove a disk: flushed, closed and gone from the guest.
    Remove {
        /// VM name.
        name: String,
        /// The disk's path (or give --lun).
        #[arg(required_unless_present = "lun", conflicts_with = "lun")]
        path: Option<PathBuf>,
        /// The disk's LUN.
        #[arg(long)]
        lun: Option<u16>,
    },
    /// List the disks on the SCSI controller: LUN, path, mode, size, lock.
    List {
        /// VM name.
        name: String,
    },
}

pub const DISK_HEADERS: &[&str] = &["LUN", "PATH", "MODE", "SIZE", "LOCK"];

/// A row of `vm disk list` (and of add and remove): the LUN as the worker reports it, with
/// who holds its disk's lock now.
pub fn disk_row(l: &LunInfo) -> Vec<String> {
    let lock = vmm::disk::inspect(&l.path)
        .map(|i| i.lock.to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    vec![
        l.lun.to_string(),
        l.path.display().to_string(),
        if l.readonly { "ro" } else { "rw" }.into(),
        mib(l.size),
        lock,
    ]
}

/// `ferry vm disk …` on this host: straight to the VM's worker.
pub fn run_local(c: DiskCmd, out: Output) -> Result<()> {
    let (name, req) = match c {
        DiskCmd::List { name } => {
            let v = Workers::from_env()?.request(&name, &Request::DiskList)?;
            let list: ferry_worker::api::DiskList = serde_json::from_value(v)?;
            let rows = list.luns.iter().map(disk_row).collect();
            print(out, &list, DISK_HEADERS, rows);
            return Ok(());
        }
        DiskCmd::Add {
            name,
            path,
            readonly,
            lun,
        } => {
            let path = abs(path)?;
            (
                name,
                Request::DiskAdd {
                    path,
                    readonly,
                    lun,
                },
            )
        }
        DiskCmd::Remove { name, path, lun } => {
            let path = path.map(abs).transpose()?;
            (name, Request::DiskRemove { lun, path })
        }
    };
    let l: LunInfo = serde_json::from_value(Workers::from_env()?.request(&name, &req)?)?;
    print(out, &l, DISK_HEADERS, vec![disk_row(&l)]);
    Ok(())
}

/// `ferry --api vm disk …`: through the cluster, wherever the VM runs (or in a stopped VM's
/// record).
pub fn run_cluster(api: &Api, c: DiskCmd, out: Output) -> Result<()> {
    let v = match c {
        DiskCmd::List { name } => {
            let v = api.get(&format!("/v1/vms/{name}/disks"))?;
            let luns: Vec<LunInfo> = serde_json::from_value(v["luns"].clone())?;
            print(out, &v, DISK_HEADERS, luns.iter().map(disk_row).collect());
            return Ok(());
        }
        DiskCmd::Add {
            name,
            path,
            readonly,
            lun,
        } => api.post(
            &format!("/v1/vms/{name}/disks"),
            json!({"path": abs(path)?, "readonly": readonly, "lun": lun}),
        )?,
        DiskCmd::Remove { name, path, lun } => {
            let lun = match (lun, path) {
                (Some(n), _) => n,
                (None, Some(p)) => {
                    let p = abs(p)?;
                    let v = api.get(&format!("/v1/vms/{name}/disks"))?;
                    let luns: Vec<LunInfo> = serde_json::from_value(v["luns"].clone())?;
                    luns.iter()
                        .find(|l| l.path == p)
                        .map(|l| l.lun)
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "no LUN of {name}'s SCSI controller holds {}",
                                p.display()
                            )
                        })?
                }
                (None, None) => anyhow::bail!("give the disk's path or --lun"),
            };
            api.delete(&format!("/v1/vms/{name}/disks/{lun}"))?
        }
    };
    let l: LunInfo = serde_json::from_value(v)?;
    print(out, &l, DISK_HEADERS, vec![disk_row(&l)]);
    Ok(())
}
