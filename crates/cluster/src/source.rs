//! The source side of a cluster migration: ask the destination's agent for a receiving
//! worker, drive this host's worker (progress and cancellation through the migration record),
//! commit by the swap in the store ([`crate::commit`]), and record the outcome.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_worker::api::Request;
use tracing::info;

use crate::agent::Agent;
use crate::peer::{self, Method};
use crate::records::*;
use crate::ClusterError;

impl Agent {
    /// Source side of a running migration: asks the destination for a receiving worker,
    /// drives the local worker, then hands ownership over (or records the failure).
    pub(crate) async fn drive_migration(self: &Arc<Self>, m: MigrationRecord) {
        let id = m.id;
        info!("{}: migration {id} to {} starting", m.vm, m.to);
        let committed = Arc::new(AtomicBool::new(false));
        let result = self.migrate_once(&m, &committed).await;
        let committed = committed.load(Ordering::SeqCst);
        let (state, error, report) = match result {
            Ok(report) => (MigrationState::Succeeded, None, Some(report)),
            // The store names the destination: the migration happened, whatever the source
            // heard afterwards. The destination runs the VM (on COMMIT, or on its agent's word
            // from the store); this host's paused copy goes with the reconcile loop.
            Err(e) if committed => (
                MigrationState::Succeeded,
                Some(format!(
                    "committed in the store; the source did not hear the destination confirm: {e}"
                )),
                None,
            ),
            Err(e) => {
                let cancelled = self
                    .db
                    .migration(id)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.cancel);
                let st = if cancelled {
                    MigrationState::Cancelled
                } else {
                    MigrationState::Failed
                };
                (st, Some(e.to_string()), None)
            }
        };
        if state == MigrationState::Succeeded {
            // Ownership moved at the commit point (the swap in the store).
            self.st().epochs.remove(&m.vm);
        }
        // A worker whose commit answer was lost (paused, COMMIT unsent) is resumed by the
        // reconcile loop, which reads where the store says the VM runs.
        info!(
            "{}: migration {id} {state:?}{}",
            m.vm,
            error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
        let _ = self
            .db
            .update::<MigrationRecord, _>(&migration_key(id), |r| {
                if r.state != MigrationState::Running {
                    return false;
                }
                r.state = state;
                r.error = error.clone();
                r.report = report.clone();
                r.finished = Some(now());
                true
            })
            .await;
    }

    async fn migrate_once(
        self: &Arc<Self>,
        m: &MigrationRecord,
        committed: &Arc<AtomicBool>,
    ) -> Result<serde_json::Value, ClusterError> {
        // The epoch this host owns the VM under: the commit swaps it for the next one.
        let epoch = match self.db.vm(&m.vm).await? {
            Some((_, v)) if v.owner.as_deref() == Some(self.cfg.host.as_str()) => v.epoch,
            _ => {
                return Err(ClusterError::Request(
                    409,
                    format!("{} is not owned by {}", m.vm, self.cfg.host),
                ))
            }
        };
        let dest = self
            .db
            .hosts()
            .await?
            .into_iter()
            .find(|h| h.name == m.to)
            .ok_or_else(|| ClusterError::HostGone(m.to.clone()))?;
        let url = format!("{}/v1/internal/receive", dest.api);
        let token = self.token.clone();
        let id = m.id;
        let to = m.to.clone();
        let listen = tokio::task::spawn_blocking(move || {
            peer::call(
                &url,
                &token,
                Method::Post,
                Some(serde_json::json!({ "id": id })),
            )
        })
        .await
        .map_err(|e| ClusterError::Record(e.to_string()))?
        .map_err(|e| ClusterError::Peer(to, e))?;
        let listen = listen["listen"].as_str().unwrap_or_default().to_string();

        // Cancellation and progress: a watcher task reads the record while the worker moves.
        let done = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Mutex::new(None::<String>));
        let watcher = {
            let me = Arc::clone(self);
            let done = Arc::clone(&done);
            let progress = Arc::clone(&progress);
            let vm = m.vm.clone();
            tokio::spawn(async move {
                let mut cancel_sent = false;
                while !done.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let p = progress.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let mut cancel = false;
                    let _ = me
                        .db
                        .update::<MigrationRecord, _>(&migration_key(id), |r| {
                            cancel = r.cancel;
                            if p.is_some() && r.progress != p {
                                r.progress = p.clone();
                                true
                            } else {
                                false
                            }
                        })
                        .await;
                    if cancel && !cancel_sent {
                        cancel_sent = true;
                        let vm = vm.clone();
                        let _ = me
                            .run_blocking(move |w| w.request(&vm, &Request::MigrationCancel))
                            .await;
                    }
                }
            })
        };
        let vm = m.vm.clone();
        let options = m.options.clone();
        let pki = self.cfg.pki_dir.clone();
        let p2 = Arc::clone(&progress);
        // The commit point: the swap in the store, asked from the worker's blocking call.
        let rt = tokio::runtime::Handle::current();
        let (me, rec, won) = (Arc::clone(self), m.clone(), Arc::clone(committed));
        let gate = move || -> Result<(), ferry_worker::client::GateError> {
            let r = rt.block_on(me.commit_migration(&rec, epoch));
            if r.is_ok() {
                won.store(true, Ordering::SeqCst);
            }
            Ok(r?)
        };
        let r = self
            .run_blocking(move |w| {
                w.migrate(
                    &vm,
                    &listen,
                    options,
                    pki,
                    |st| {
                        *p2.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
                            "{:?} round {} sent {} MiB, {} MiB remaining",
                            st.phase,
                            st.round,
                            st.bytes_sent >> 20,
                            (st.pages_remaining * 4096) >> 20
                        ));
                    },
                    Some(&gate),
                )
            })
            .await;
        done.store(true, Ordering::SeqCst);
        let _ = watcher.await;
        let report = r??;
        serde_json::to_value(report).map_err(|e| ClusterError::Record(e.to_string()))
    }
}
