//! The commit point of a cluster migration: a compare-and-swap of the VM's record in the store
//! (owner source → destination, epoch + 1) that exactly one party can win
//! (docs/cluster.md, "Commit through the store"; the workers' side is `migration::commit`).
//!
//! - The source agent answers its worker's commit request by the swap: won, the worker sends
//!   COMMIT; lost (the record changed: an HA restart, a fence), the worker takes the VM back.
//! - A source worker that never heard the swap's answer (paused, COMMIT unsent) is resumed by
//!   the reconcile loop while the store still names its host under its epoch.
//! - A destination worker whose source went away after READY waits; its agent runs it once
//!   the store names this host the VM's owner (the swap was won, whatever became of COMMIT),
//!   and a receiver for a migration that ended without the swap is stopped by the reconcile
//!   loop like any worker this host does not own.

use std::time::Duration;

use ferry_worker::api::{Request, WorkerState};
use ferry_worker::Status;
use tracing::{info, warn};

use crate::agent::Agent;
use crate::records::{vm_key, MigrationRecord, VmRecord};
use crate::ClusterError;

/// How long the source waits between tries when the store does not answer the swap.
const RETRY: Duration = Duration::from_millis(200);

/// Why the commit swap was lost: the worker takes the VM back.
#[derive(Debug, thiserror::Error)]
pub enum CommitLost {
    /// This host fenced itself while the worker waited.
    #[error("this host fenced itself")]
    Fenced,
    /// Someone else changed the record (an HA restart, an operator).
    #[error("the VM's record changed during the migration (owner {owner}, epoch {epoch})")]
    RecordChanged {
        /// The owner the record names now.
        owner: String,
        /// Its epoch now.
        epoch: u64,
    },
    /// The record was deleted.
    #[error("the VM's record is gone")]
    RecordGone,
}

impl Agent {
    /// The swap for migration `m` of a VM owned here under `epoch`: `Ok` once the store names
    /// `m.to` the owner under `epoch + 1`, `Err(why)` when it names anyone else. While the
    /// store does not answer it keeps trying (the worker waits, paused); a host that fences
    /// itself meanwhile gives up (its worker is killed by the fence anyway).
    pub(crate) async fn commit_migration(
        &self,
        m: &MigrationRecord,
        epoch: u64,
    ) -> Result<(), CommitLost> {
        let (from, to) = (m.from.clone(), m.to.clone());
        loop {
            if self.is_fenced() {
                return Err(CommitLost::Fenced);
            }
            let swapped = self
                .db
                .update::<VmRecord, _>(&vm_key(&m.vm), |r| {
                    if r.owner.as_deref() != Some(from.as_str()) || r.epoch != epoch {
                        return false;
                    }
                    r.owner = Some(to.clone());
                    r.epoch = epoch + 1;
                    true
                })
                .await;
            // Whatever the swap said, the record is the truth (an answer lost after the write
            // reached the store reads as won here).
            let read = match swapped {
                Ok(true) => {
                    info!(
                        "{}: committed to {to} in the store (epoch {})",
                        m.vm,
                        epoch + 1
                    );
                    return Ok(());
                }
                Ok(false) | Err(_) => self.db.vm(&m.vm).await,
            };
            match read {
                Ok(Some((_, r)))
                    if r.owner.as_deref() == Some(to.as_str()) && r.epoch == epoch + 1 =>
                {
                    return Ok(())
                }
                Ok(Some((_, r)))
                    if r.owner.as_deref() == Some(from.as_str()) && r.epoch == epoch =>
                {
                    // Unchanged: the swap did not happen; try again.
                    if let Err(e) = swapped {
                        warn!("{}: the commit swap failed, trying again: {e}", m.vm);
                    }
                }
                Ok(Some((_, r))) => {
                    return Err(CommitLost::RecordChanged {
                        owner: r.owner.unwrap_or_else(|| "none".into()),
                        epoch: r.epoch,
                    })
                }
                Ok(None) => return Err(CommitLost::RecordGone),
                Err(e) => warn!("{}: cannot read the record at the commit: {e}", m.vm),
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Source side, from the reconcile loop: a worker whose migration ended without the swap
    /// (the store still names this host under the worker's epoch) but that never heard the
    /// answer is paused with COMMIT unsent; the VM runs here, nowhere else: resume it.
    pub(crate) async fn resume_unknown_outcome(&self, name: &str) -> Result<(), ClusterError> {
        warn!("{name}: its migration's outcome was lost; the store names this host: resuming it");
        let n = name.to_string();
        let _ = self
            .run_blocking(move |w| w.request(&n, &Request::MigrationResolve { commit: false }))
            .await?;
        Ok(())
    }

    /// Destination side, from the reconcile loop: a receiving worker whose source went away
    /// after READY runs its VM once the store names this host the owner.
    pub(crate) async fn resolve_receivers(&self, local: &[Status], owned: impl Fn(&str) -> bool) {
        for s in local {
            let waiting = s.state == WorkerState::Receiving
                && s.incoming
                    .as_ref()
                    .is_some_and(|i| i.phase == migration::dest::AWAITING_DECISION);
            if !waiting || !owned(&s.name) {
                continue;
            }
            info!(
                "{}: its source went away after READY and the store names this host: running it",
                s.name
            );
            let n = s.name.clone();
            let r = self
                .run_blocking(move |w| w.request(&n, &Request::MigrationResolve { commit: true }))
                .await;
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!("{}: cannot resolve its migration: {e}", s.name),
                Err(e) => warn!("{}: cannot resolve its migration: {e}", s.name),
            }
        }
    }
}
