//! Disks added to and removed from a VM's SCSI controller through the cluster.
//!
//! The VM's record holds the disks it has now (`config.scsi.disks`): that is what an HA restart
//! starts it with, while a live migration (and so a drain or a failback) carries them in the
//! VM's device state. A change to a running VM is made by the agent of the host that runs it —
//! any other agent forwards the request there — on the worker first, then in the record; if the
//! record cannot take it, the worker's change is undone, so the two never disagree for longer
//! than the call. A stopped VM's change is made in the record alone. While the VM migrates a
//! change is refused: the worker would refuse it too.

use std::path::PathBuf;
use std::time::Duration;

use ferry_worker::api::Request;
use serde::{Deserialize, Serialize};
use vmm::config::ScsiDiskSpec;
use vmm::devices::virtio::scsi::{LunInfo, MAX_LUNS};

use crate::agent::Agent;
use crate::peer::{self, Method};
use crate::records::{vm_key, MigrationState, VmRecord};
use crate::view::View;
use crate::ClusterError;

/// A disk to add.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskAdd {
    /// The image or host block device (absolute, on the shared storage).
    pub path: PathBuf,
    /// Attach read-only.
    #[serde(default)]
    pub readonly: bool,
    /// The LUN; absent: the lowest free one.
    #[serde(default)]
    pub lun: Option<u16>,
}

/// What a change is.
#[derive(Clone, Debug)]
enum Change {
    Add(DiskAdd),
    Remove(u16),
}

/// Where the VM is for a change.
enum Place {
    /// Runs on this host.
    Here,
    /// Runs on that host (its API).
    There(String, String),
    /// Runs nowhere: the record alone changes.
    Stopped,
}

fn refuse(status: u16, msg: impl Into<String>) -> ClusterError {
    ClusterError::Request(status, msg.into())
}

impl Agent {
    /// The disks of `name`'s SCSI controller, as its record holds them.
    pub async fn disk_list(&self, name: &str) -> Result<Vec<LunInfo>, ClusterError> {
        let (_, rec) = self.vm_with_scsi(name).await?;
        Ok(disks_of(&rec))
    }

    /// Adds a disk to `name`'s SCSI controller wherever the VM is; `forwarded`: another agent
    /// sent it here because this host runs the VM (it is never sent on again).
    pub async fn disk_add(
        &self,
        name: &str,
        req: DiskAdd,
        forwarded: bool,
    ) -> Result<LunInfo, ClusterError> {
        if !req.path.is_absolute() {
            return Err(refuse(
                400,
                format!(
                    "disk {} must be an absolute path (on the shared storage)",
                    req.path.display()
                ),
            ));
        }
        if let Some(n) = req.lun.filter(|&n| n >= MAX_LUNS) {
            return Err(refuse(
                400,
                format!("LUN {n} is out of range: a controller has LUNs 0 to 255"),
            ));
        }
        self.disk_change(name, Change::Add(req), forwarded).await
    }

    /// Removes LUN `lun` from `name`'s SCSI controller wherever the VM is.
    pub async fn disk_remove(
        &self,
        name: &str,
        lun: u16,
        forwarded: bool,
    ) -> Result<LunInfo, ClusterError> {
        self.disk_change(name, Change::Remove(lun), forwarded).await
    }

    async fn vm_with_scsi(&self, name: &str) -> Result<(i64, VmRecord), ClusterError> {
        let Some((rev, rec)) = self.db.vm(name).await? else {
            return Err(refuse(404, format!("no VM named {name:?} in the cluster")));
        };
        if rec.config.scsi.is_none() {
            return Err(refuse(
                409,
                format!("{name} has no SCSI controller (define it with --scsi)"),
            ));
        }
        Ok((rev, rec))
    }

    /// Where the change to `name` is made. A VM between states — started, or just handed over
    /// by a migration, before its host's reconcile pass has recorded the worker running — is
    /// waited for, up to a lease's time, before the change is refused.
    async fn place(&self, name: &str, forwarded: bool) -> Result<Place, ClusterError> {
        let until = std::time::Instant::now() + Duration::from_secs(self.cfg.lease_ttl_s.max(3));
        loop {
            match self.place_now(name, forwarded).await? {
                None if std::time::Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => {
                    return Err(refuse(
                        409,
                        format!(
                            "{name} is starting or stopping; try again when it runs or has stopped"
                        ),
                    ))
                }
                Some(p) => return Ok(p),
            }
        }
    }

    /// Where the change is made now; `None` while the VM is between states.
    async fn place_now(&self, name: &str, forwarded: bool) -> Result<Option<Place>, ClusterError> {
        let view = View::read(&self.db).await?;
        if view
            .active_migration(name)
            .is_some_and(|m| m.state == MigrationState::Running)
        {
            return Err(refuse(
                409,
                format!("{name} is migrating; try again when it ends"),
            ));
        }
        let running = view.running.get(name).cloned().unwrap_or_default();
        let owner = view.vms.get(name).and_then(|v| v.owner.clone());
        let runs_on = running
            .iter()
            .find(|r| Some(&r.host) == owner.as_ref())
            .map(|r| r.host.clone());
        match runs_on {
            Some(h) if h == self.host() => Ok(Some(Place::Here)),
            Some(h) if forwarded => Err(refuse(
                409,
                format!("{name} runs on {h}, not here; try again"),
            )),
            Some(h) => {
                let api = view
                    .hosts
                    .get(&h)
                    .map(|r| r.api.clone())
                    .ok_or_else(|| ClusterError::HostGone(h.clone()))?;
                Ok(Some(Place::There(h, api)))
            }
            None if running.is_empty()
                && view
                    .vms
                    .get(name)
                    .is_some_and(|v| v.desired == crate::records::Desired::Stopped) =>
            {
                Ok(Some(Place::Stopped))
            }
            None => Ok(None),
        }
    }

    async fn disk_change(
        &self,
        name: &str,
        change: Change,
        forwarded: bool,
    ) -> Result<LunInfo, ClusterError> {
        let (_, rec) = self.vm_with_scsi(name).await?;
        match self.place(name, forwarded).await? {
            Place::There(host, api) => self.forward(name, &host, &api, &change).await,
            Place::Stopped => self.change_record(name, &rec, &change).await,
            Place::Here => self.change_worker(name, change).await,
        }
    }

    /// Sends the change to the agent of the host that runs the VM.
    async fn forward(
        &self,
        name: &str,
        host: &str,
        api: &str,
        change: &Change,
    ) -> Result<LunInfo, ClusterError> {
        let token = self.token.clone();
        let (method, url, body) = match change {
            Change::Add(req) => (
                Method::Post,
                format!("{api}/v1/internal/vms/{name}/disks"),
                Some(serde_json::to_value(req).map_err(|e| ClusterError::Record(e.to_string()))?),
            ),
            Change::Remove(lun) => (
                Method::Delete,
                format!("{api}/v1/internal/vms/{name}/disks/{lun}"),
                None,
            ),
        };
        let v = tokio::task::spawn_blocking(move || peer::call(&url, &token, method, body))
            .await
            .map_err(|e| ClusterError::Record(e.to_string()))?
            .map_err(|e| match e {
                // The owner's refusal is the answer.
                peer::PeerError::Refused { status, message } => refuse(status, message),
                other => ClusterError::Peer(host.to_string(), other),
            })?;
        serde_json::from_value(v).map_err(|e| ClusterError::Record(e.to_string()))
    }

    /// The change on this host's worker, then in the record (undone on the worker if the record
    /// cannot take it).
    async fn change_worker(&self, name: &str, change: Change) -> Result<LunInfo, ClusterError> {
        let req = match &change {
            Change::Add(a) => Request::DiskAdd {
                path: a.path.clone(),
                readonly: a.readonly,
                lun: a.lun,
            },
            Change::Remove(lun) => Request::DiskRemove {
                lun: Some(*lun),
                path: None,
            },
        };
        let n = name.to_string();
        let answer = self
            .run_blocking(move |w| w.request(&n, &req))
            .await?
            .map_err(|e| refuse(409, e.to_string()))?;
        let info: LunInfo =
            serde_json::from_value(answer).map_err(|e| ClusterError::Record(e.to_string()))?;
        let recorded = {
            let info = info.clone();
            let add = matches!(change, Change::Add(_));
            self.db
                .update::<VmRecord, _>(&vm_key(name), move |r| set_lun(r, &info, add))
                .await
        };
        if let Err(e) = recorded {
            // Undo on the worker: the record and the VM must not disagree.
            let undo = match change {
                Change::Add(_) => Request::DiskRemove {
                    lun: Some(info.lun),
                    path: None,
                },
                Change::Remove(_) => Request::DiskAdd {
                    path: info.path.clone(),
                    readonly: info.readonly,
                    lun: Some(info.lun),
                },
            };
            let n = name.to_string();
            let undone = self.run_blocking(move |w| w.request(&n, &undo)).await;
            if !matches!(undone, Ok(Ok(_))) {
                tracing::error!(
                    vm = name,
                    lun = info.lun,
                    "a disk change reached the VM but not its record, and could not be undone"
                );
            }
            return Err(e);
        }
        Ok(info)
    }

    /// A stopped VM's change: checked like the controller would, then made in its record.
    async fn change_record(
        &self,
        name: &str,
        rec: &VmRecord,
        change: &Change,
    ) -> Result<LunInfo, ClusterError> {
        let disks = rec
            .config
            .scsi
            .as_ref()
            .map(|s| s.disks.clone())
            .unwrap_or_default();
        let (info, keep) = match change {
            Change::Add(a) => {
                if let Some(d) = disks.iter().find(|d| d.path == a.path) {
                    return Err(refuse(
                        409,
                        format!("{} is LUN {} of this VM already", a.path.display(), d.lun),
                    ));
                }
                let lun = match a.lun {
                    Some(n) => {
                        if let Some(d) = disks.iter().find(|d| d.lun == n) {
                            return Err(refuse(
                                409,
                                format!("LUN {n} is taken by {}", d.path.display()),
                            ));
                        }
                        n
                    }
                    None => (0..MAX_LUNS)
                        .find(|n| disks.iter().all(|d| d.lun != *n))
                        .ok_or_else(|| refuse(409, "the SCSI controller is full"))?,
                };
                let size = vmm::disk::inspect(&a.path)
                    .map_err(|e| refuse(400, e.to_string()))?
                    .size;
                let info = LunInfo {
                    lun,
                    path: a.path.clone(),
                    readonly: a.readonly,
                    size,
                };
                (info, true)
            }
            Change::Remove(lun) => {
                let d = disks
                    .iter()
                    .find(|d| d.lun == *lun)
                    .ok_or_else(|| refuse(404, format!("the SCSI controller has no LUN {lun}")))?;
                let size = vmm::disk::inspect(&d.path).map(|i| i.size).unwrap_or(0);
                let info = LunInfo {
                    lun: d.lun,
                    path: d.path.clone(),
                    readonly: d.readonly,
                    size,
                };
                (info, false)
            }
        };
        let changed = {
            let info = info.clone();
            self.db
                .update::<VmRecord, _>(&vm_key(name), move |r| {
                    r.desired == crate::records::Desired::Stopped && set_lun(r, &info, keep)
                })
                .await?
        };
        if !changed {
            return Err(refuse(
                409,
                format!("{name} was started meanwhile; try again"),
            ));
        }
        Ok(info)
    }
}

/// Puts `info` at its LUN in the record (`keep`), or takes that LUN out; false if the VM has no
/// controller.
fn set_lun(r: &mut VmRecord, info: &LunInfo, keep: bool) -> bool {
    let Some(scsi) = r.config.scsi.as_mut() else {
        return false;
    };
    scsi.disks.retain(|d| d.lun != info.lun);
    if keep {
        scsi.disks.push(ScsiDiskSpec {
            lun: info.lun,
            path: info.path.clone(),
            readonly: info.readonly,
        });
        scsi.disks.sort_by_key(|d| d.lun);
    }
    true
}

/// The disks a record holds, with their sizes now (0 for a disk that cannot be read).
fn disks_of(rec: &VmRecord) -> Vec<LunInfo> {
    rec.config
        .scsi
        .iter()
        .flat_map(|s| s.disks.iter())
        .map(|d| LunInfo {
            lun: d.lun,
            path: d.path.clone(),
            readonly: d.readonly,
            size: vmm::disk::inspect(&d.path).map(|i| i.size).unwrap_or(0),
        })
        .collect()
}
