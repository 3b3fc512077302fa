//! The reconcile loop: every half second this host's workers are made to match the store.
//! One pass reads the store once ([`Pass`]) and then, in order: settles the workers already
//! here (stop what this host must not run, resume a worker whose migration outcome was lost,
//! finish a guest that powered off), runs receivers whose source went away after READY once
//! the store names this host, starts the VMs this host owns but does not run, publishes what
//! runs here, and drives the migrations this host is the source of.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_store::LeaseId;
use ferry_worker::api::{Request, WorkerState};
use ferry_worker::Status;
use tracing::{info, warn};

use crate::agent::{Agent, RETRY_START};
use crate::records::*;
use crate::view::{baseline, View};
use crate::ClusterError;

/// How often the reconcile loop runs.
pub const RECONCILE_EVERY: Duration = Duration::from_millis(500);

/// What one reconcile pass read: the store, then this host's workers.
struct Pass {
    me: String,
    migrations: Vec<MigrationRecord>,
    vms: HashMap<String, (i64, VmRecord)>,
    /// VMs this host is migrating away (a running migration from here).
    outgoing: HashSet<String>,
    /// VMs arriving here (a running migration to here).
    incoming: HashSet<String>,
    local: Vec<Status>,
}

impl Pass {
    fn owned(&self, name: &str) -> bool {
        self.vms
            .get(name)
            .is_some_and(|(_, v)| v.owner.as_deref() == Some(self.me.as_str()))
    }
}

/// What the store and the agent know of one worker on this host.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    /// The store names this host the VM's owner.
    owned: bool,
    /// The VM should run.
    wanted: bool,
    /// A migration brings the VM here.
    receiving: bool,
    /// A migration takes the VM away from here.
    departing: bool,
    /// The guest has stopped (powered off).
    stopped: bool,
    /// The worker's migration ended without it hearing the answer.
    outcome_unknown: bool,
    /// The store's epoch is the one this host started or received the VM under.
    epoch_current: bool,
}

/// What to do with one worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Settle {
    /// Leave it.
    Keep,
    /// Not this host's VM: kill its worker.
    Kill,
    /// Its migration ended without the swap and the worker never heard: it runs here.
    Resume,
    /// Desired stopped: stop it.
    Stop,
    /// Its guest powered off: end the worker and record the VM stopped.
    Finish,
}

/// The rule for one worker. A source whose migration runs keeps its worker until the
/// migration ends (it exits by itself once the destination confirms), and a receiver keeps
/// its worker until its migration decides.
fn settle(s: Seen) -> Settle {
    if s.departing {
        return Settle::Keep;
    }
    if !s.owned {
        return if s.receiving {
            Settle::Keep
        } else {
            Settle::Kill
        };
    }
    if s.outcome_unknown && s.epoch_current {
        Settle::Resume
    } else if !s.wanted {
        Settle::Stop
    } else if s.stopped {
        Settle::Finish
    } else {
        Settle::Keep
    }
}

impl Agent {
    /// Makes this host's workers match the store, forever.
    pub async fn reconcile_loop(self: Arc<Self>) {
        loop {
            if let Err(e) = self.reconcile().await {
                warn!("reconcile: {e}");
            }
            tokio::time::sleep(RECONCILE_EVERY).await;
        }
    }

    async fn reconcile(self: &Arc<Self>) -> Result<(), ClusterError> {
        let Some(lease) = self.lease() else {
            return Ok(());
        };
        if self.is_fenced() {
            return Ok(());
        }
        let pass = self.read_pass().await?;
        self.settle_workers(&pass).await?;
        // Receivers whose source went away after READY: the store says whether they run.
        self.resolve_receivers(&pass.local, |n| pass.owned(n)).await;
        self.start_missing(&pass).await?;
        self.publish_running(lease).await?;
        self.drive_outgoing(pass.migrations);
        Ok(())
    }

    async fn read_pass(&self) -> Result<Pass, ClusterError> {
        let me = self.cfg.host.clone();
        // Migrations first, then VMs: a migration ends by handing the VM over (owner, then
        // state), so whichever of the two this pass sees, it never takes an arriving or a
        // departing VM for one to stop or to restart.
        let migrations: Vec<MigrationRecord> = self
            .db
            .migrations()
            .await?
            .into_iter()
            .map(|(_, _, m)| m)
            .collect();
        let vms = self
            .db
            .vms()
            .await?
            .into_iter()
            .map(|(_, rev, v)| (v.config.name.clone(), (rev, v)))
            .collect();
        let running_via = |mine: fn(&MigrationRecord, &str) -> bool| -> HashSet<String> {
            migrations
                .iter()
                .filter(|m| m.state == MigrationState::Running && mine(m, &me))
                .map(|m| m.vm.clone())
                .collect()
        };
        let outgoing = running_via(|m, me| m.from == me);
        let incoming = running_via(|m, me| m.to == me);
        let local = self.run_blocking(|w| w.list()).await?;
        Ok(Pass {
            me,
            migrations,
            vms,
            outgoing,
            incoming,
            local,
        })
    }

    /// Applies [`settle`] to every worker here.
    async fn settle_workers(&self, pass: &Pass) -> Result<(), ClusterError> {
        for s in &pass.local {
            let vm = pass.vms.get(&s.name).map(|(_, v)| v);
            let seen = Seen {
                owned: pass.owned(&s.name),
                wanted: vm.is_some_and(|v| v.desired == Desired::Running),
                receiving: pass.incoming.contains(&s.name),
                departing: pass.outgoing.contains(&s.name),
                stopped: s.state == WorkerState::Stopped,
                outcome_unknown: s.migration_outcome_unknown,
                epoch_current: vm.map(|v| v.epoch) == self.st().epochs.get(&s.name).copied(),
            };
            let n = s.name.clone();
            match settle(seen) {
                Settle::Keep => {}
                Settle::Kill => {
                    warn!("{n}: not owned by this host any more: stopping its worker");
                    self.kill(&n, s.pid).await;
                }
                Settle::Resume => self.resume_unknown_outcome(&n).await?,
                Settle::Stop => {
                    info!("{n}: stopping (desired state: stopped)");
                    self.st().epochs.remove(&n);
                    let _ = self
                        .run_blocking(move |w| w.stop(&n, Duration::from_secs(20)))
                        .await?;
                }
                Settle::Finish => {
                    self.st().epochs.remove(&n);
                    let _ = self
                        .run_blocking(move |w| w.request(&n, &Request::Shutdown))
                        .await?;
                    self.db
                        .update::<VmRecord, _>(&vm_key(&s.name), |r| {
                            let ch = r.desired != Desired::Stopped;
                            r.desired = Desired::Stopped;
                            r.note = Some("the guest powered off".into());
                            ch
                        })
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Starts the VMs this host owns and should run but does not; hands back the ones whose
    /// worker vanished.
    async fn start_missing(&self, pass: &Pass) -> Result<(), ClusterError> {
        let local: HashSet<&str> = pass.local.iter().map(|s| s.name.as_str()).collect();
        for (name, (rev, v)) in &pass.vms {
            if !pass.owned(name)
                || v.desired != Desired::Running
                || local.contains(name.as_str())
                || pass.outgoing.contains(name)
            {
                continue;
            }
            if self
                .st()
                .failed_starts
                .get(name)
                .is_some_and(|t| t.elapsed() < RETRY_START)
            {
                continue;
            }
            // Started here under this epoch and gone without being asked: the agent does not
            // restart it by itself; it hands the VM back to the cluster.
            let started_here = self.st().epochs.get(name) == Some(&v.epoch);
            if started_here {
                let pid = self.st().published.get(name).map(|r| r.pid);
                if pid.is_some_and(ferry_worker::client::process_alive) {
                    continue; // alive but not answering: look again next pass
                }
                self.worker_lost(name, v.epoch).await?;
                continue;
            }
            self.start_owned(name, *rev, v).await;
        }
        Ok(())
    }

    /// Publishes what runs here, as the cluster sees it (leased running records).
    async fn publish_running(&self, lease: LeaseId) -> Result<(), ClusterError> {
        let me = self.cfg.host.clone();
        let local = self.run_blocking(|w| w.list()).await?;
        let mut now_running = HashMap::new();
        for s in &local {
            let epoch = self.st().epochs.get(&s.name).copied().unwrap_or(0);
            now_running.insert(
                s.name.clone(),
                RunningRecord {
                    host: me.clone(),
                    epoch,
                    state: s.state.to_string(),
                    pid: s.pid,
                    cpu_features: s.cpu_features.clone(),
                },
            );
        }
        let published = self.st().published.clone();
        for (n, r) in &now_running {
            if published.get(n) != Some(r) {
                self.db
                    .store
                    .put(&running_key(n, &me), encode(r)?, Some(lease))
                    .await?;
            }
        }
        for n in published.keys() {
            if !now_running.contains_key(n) {
                self.db.store.delete(&running_key(n, &me)).await?;
            }
        }
        self.st().published = now_running;
        Ok(())
    }

    /// Starts a driver for every running migration from this host not driven yet. A
    /// driver's id stays in `driving` after it ends, until a pass reads the migration as no
    /// longer running: a pass that read the record before the driver's last write must not
    /// drive the same migration a second time.
    fn drive_outgoing(self: &Arc<Self>, migrations: Vec<MigrationRecord>) {
        let mine: Vec<MigrationRecord> = migrations
            .into_iter()
            .filter(|m| m.state == MigrationState::Running && m.from == self.cfg.host)
            .collect();
        let running: HashSet<u64> = mine.iter().map(|m| m.id).collect();
        self.st().driving.retain(|id| running.contains(id));
        for m in mine {
            if self.st().driving.insert(m.id) {
                let me = Arc::clone(self);
                tokio::spawn(async move { me.drive_migration(m).await });
            }
        }
    }

    /// VM `name`'s worker exited without being asked (crash, killed): an HA VM goes back to
    /// the coordinator for placement (next epoch); another stays stopped.
    async fn worker_lost(&self, name: &str, epoch: u64) -> Result<(), ClusterError> {
        self.st().epochs.remove(name);
        let me = self.cfg.host.clone();
        warn!("{name}: its worker exited unexpectedly; handing the VM back to the cluster");
        self.db.update::<VmRecord, _>(&vm_key(name), |r| {
            if r.owner.as_deref() != Some(me.as_str()) || r.epoch != epoch {
                return false;
            }
            if r.ha {
                r.owner = None;
                r.epoch += 1;
                r.note = Some(format!(
                    "its worker on {me} exited unexpectedly; placed again by the cluster"
                ));
            } else {
                r.desired = Desired::Stopped;
                r.note = Some(format!(
                    "its worker on {me} exited unexpectedly; not highly available, so it stays stopped"
                ));
            }
            true
        })
        .await?;
        Ok(())
    }

    async fn kill(&self, name: &str, pid: u32) {
        if let Ok(p) = i32::try_from(pid) {
            // SAFETY: kill sends a signal to a worker this agent started.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        self.st().epochs.remove(name);
    }

    /// Starts VM `name` that this host owns, after checking (fencing) that the record it read
    /// is still current, i.e. that no other host has been given the VM since.
    async fn start_owned(&self, name: &str, rev: i64, v: &VmRecord) {
        let current = self.db.store.get(&vm_key(name)).await;
        if !matches!(&current, Ok(Some(kv)) if kv.mod_revision == rev) {
            return;
        }
        let mut cfg = v.config.clone();
        if v.cluster_cpu {
            // The `cluster` model: hide what this host has beyond the live hosts' common set.
            match View::read(&self.db).await {
                Ok(view) => {
                    let (common, _) = baseline(&view);
                    cfg.cpu_hide = self
                        .cpu
                        .features
                        .iter()
                        .filter(|f| !common.contains(f))
                        .cloned()
                        .collect();
                }
                Err(e) => {
                    warn!("{name}: cannot compute the cluster CPU baseline: {e}");
                    return;
                }
            }
        }
        let Some(extra) = self.worker_args(name) else {
            return;
        };
        info!("{name}: starting (epoch {})", v.epoch);
        match self.run_blocking(move |w| w.start(&cfg, &extra)).await {
            Ok(Ok(ready)) if self.is_fenced() => {
                // Fenced while it started: it must not run here.
                if let Some(pid) = ready["pid"].as_u64() {
                    self.kill(name, u32::try_from(pid).unwrap_or(0)).await;
                }
            }
            Ok(Ok(_)) => {
                {
                    let mut st = self.st();
                    st.epochs.insert(name.to_string(), v.epoch);
                    st.failed_starts.remove(name);
                }
                let _ = self
                    .db
                    .update::<VmRecord, _>(&vm_key(name), |r| {
                        let stale = r.note.as_deref().is_some_and(|n| n.starts_with("cannot"));
                        if stale {
                            r.note = None;
                        }
                        stale
                    })
                    .await;
            }
            Ok(Err(e)) | Err(ClusterError::Worker(e)) => {
                warn!("{name}: cannot start: {e}");
                self.st()
                    .failed_starts
                    .insert(name.to_string(), Instant::now());
                let host = self.cfg.host.clone();
                let msg = format!("cannot start on {host}: {e}");
                let _ = self
                    .db
                    .update::<VmRecord, _>(&vm_key(name), |r| {
                        r.note = Some(msg.clone());
                        true
                    })
                    .await;
            }
            Err(e) => warn!("{name}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned() -> Seen {
        Seen {
            owned: true,
            wanted: true,
            epoch_current: true,
            ..Seen::default()
        }
    }

    #[test]
    fn a_worker_of_a_vm_another_host_owns_is_killed_unless_it_is_arriving() {
        assert_eq!(settle(Seen::default()), Settle::Kill);
        let arriving = Seen {
            receiving: true,
            ..Seen::default()
        };
        assert_eq!(settle(arriving), Settle::Keep);
    }

    #[test]
    fn a_departing_vm_is_left_to_its_migration_whatever_the_store_says() {
        for owned in [false, true] {
            for wanted in [false, true] {
                let s = Seen {
                    owned,
                    wanted,
                    departing: true,
                    stopped: true,
                    outcome_unknown: true,
                    ..Seen::default()
                };
                assert_eq!(settle(s), Settle::Keep, "{s:?}");
            }
        }
    }

    #[test]
    fn a_lost_outcome_resumes_only_under_the_epoch_this_host_holds() {
        let lost = Seen {
            outcome_unknown: true,
            ..owned()
        };
        assert_eq!(settle(lost), Settle::Resume);
        let stale = Seen {
            epoch_current: false,
            ..lost
        };
        assert_eq!(settle(stale), Settle::Keep);
    }

    #[test]
    fn an_owned_vm_stops_when_unwanted_and_finishes_when_its_guest_powered_off() {
        assert_eq!(settle(owned()), Settle::Keep);
        let unwanted = Seen {
            wanted: false,
            ..owned()
        };
        assert_eq!(settle(unwanted), Settle::Stop);
        let off = Seen {
            stopped: true,
            ..owned()
        };
        assert_eq!(settle(off), Settle::Finish);
    }
}
