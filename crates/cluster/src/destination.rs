//! The destination side of a cluster migration: a receiving worker started on the source
//! agent's request, which decides its commit by the store (`--commit-by-store`).

use std::ffi::OsString;

use tracing::info;

use crate::agent::Agent;
use crate::records::*;
use crate::ClusterError;

impl Agent {
    /// Destination side: starts a receiving worker for migration `id` and returns the
    /// address it listens on.
    pub async fn receive(&self, id: u64) -> Result<String, ClusterError> {
        if self.is_fenced() || self.lease().is_none() {
            return Err(ClusterError::Request(
                503,
                format!("{} is not in the cluster right now (fenced)", self.cfg.host),
            ));
        }
        let Some(m) = self.db.migration(id).await? else {
            return Err(ClusterError::Request(404, format!("no migration {id}")));
        };
        if m.to != self.cfg.host || m.state != MigrationState::Running {
            return Err(ClusterError::Request(
                409,
                format!(
                    "migration {id} is {:?} to {}, not running to this host",
                    m.state, m.to
                ),
            ));
        }
        let Some((_, vm)) = self.db.vm(&m.vm).await? else {
            return Err(ClusterError::Request(404, format!("no VM {}", m.vm)));
        };
        let Some(common) = self.worker_args(&m.vm) else {
            return Err(ClusterError::Request(
                503,
                format!("{} is not in the cluster right now (fenced)", self.cfg.host),
            ));
        };
        let mut args: Vec<OsString> = vec![
            "--receive".into(),
            format!("{}:0", self.cfg.migration_ip).into(),
            "--name".into(),
            m.vm.clone().into(),
            // The store decides the commit: a lost COMMIT must not drop the VM here.
            "--commit-by-store".into(),
        ];
        args.extend(common);
        if let Some(p) = &self.cfg.pki_dir {
            args.push("--pki".into());
            args.push(p.clone().into_os_string());
        }
        let name = m.vm.clone();
        let ready = self
            .run_blocking(move |w| {
                let dir = w.prepare(&name)?;
                w.spawn(&dir, &args)
            })
            .await??;
        // The VM arrives with the next epoch: the source hands it over under that one.
        self.st().epochs.insert(m.vm.clone(), vm.epoch + 1);
        let listen = ready["listen"].as_str().unwrap_or_default().to_string();
        info!("{}: receiving migration {id} on {listen}", m.vm);
        Ok(listen)
    }
}
