//! The host's lease: the heartbeat that renews it and publishes the host record, the renewal
//! of every worker's fence deadline, and the fence itself (every VM here stopped at once when
//! the host can no longer prove its lease; `docs/cluster.md`, "Leases and fencing").

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_store::{LeaseId, StoreError};
use ferry_worker::api::Request;
use tracing::{info, warn};

use crate::agent::{Agent, FENCE_MARGIN};
use crate::inventory;
use crate::records::*;
use crate::ClusterError;

impl Agent {
    /// Keeps the lease and the host record alive; fences the host when the store is lost.
    pub async fn heartbeat_loop(self: Arc<Self>) {
        let every = (self.cfg.ttl() / 5).max(Duration::from_millis(300));
        loop {
            let sent = Instant::now();
            let lease = self.lease();
            let r = match lease {
                Some(l) => self.db.store.keep_alive(l).await.map(|_| l),
                None => self.db.store.grant(self.cfg.ttl()).await,
            };
            match r {
                Ok(l) => {
                    if lease.is_none() || self.lease() == Some(l) {
                        self.st().last_renewal = Some(sent);
                    }
                    if lease.is_none() {
                        self.st().lease = Some(l);
                        self.st().published.clear();
                        if self.set_fenced(false) {
                            info!("re-joined the cluster with a new lease; VMs stopped while fenced stay stopped here until placed again");
                        } else {
                            info!("joined the cluster (lease {l:x})");
                        }
                        if let Err(e) = self.back_from_standby().await {
                            warn!("cannot record that this host is on again: {e}");
                        }
                    }
                    self.renew_worker_deadlines().await;
                    if let Err(e) = self.publish_host(l).await {
                        warn!("cannot publish the host record: {e}");
                    }
                }
                Err(StoreError::LeaseExpired(_)) => {
                    warn!("the lease expired");
                    self.fence("its lease expired").await;
                    self.st().lease = None;
                }
                // The fence watchdog acts if this goes on for too long.
                Err(e) => warn!("cannot renew the lease: {e}"),
            }
            tokio::time::sleep(every.saturating_sub(sent.elapsed())).await;
        }
    }

    /// Tells every worker here that its VM may run until the new fence deadline. A worker
    /// that is not told stops its VM by itself at the last one (`ferry_worker::fence`): the
    /// fence does not depend on this agent being able to run.
    async fn renew_worker_deadlines(&self) {
        let Some(until_ms) = self.fence_deadline_ms() else {
            return;
        };
        let res = self
            .run_blocking(move |w| {
                for s in w.list() {
                    if let Err(e) = w.request(&s.name, &Request::RenewDeadline { until_ms }) {
                        warn!("{}: cannot renew its fence deadline: {e}", s.name);
                    }
                }
            })
            .await;
        if let Err(e) = res {
            warn!("cannot renew the workers' fence deadlines: {e}");
        }
    }

    /// Fences the host when its lease has not been renewed for `TTL - FENCE_MARGIN`. Runs on
    /// its own, so that a store call hanging on a dead link cannot delay it.
    pub async fn fence_watchdog(self: Arc<Self>) {
        let limit = self.cfg.ttl().saturating_sub(FENCE_MARGIN);
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let late = {
                let st = self.st();
                st.lease.is_some() && st.last_renewal.is_some_and(|t| t.elapsed() >= limit)
            };
            if late {
                self.fence("it could not renew its lease in time (cut off from the cluster store)")
                    .await;
                self.st().lease = None;
            }
        }
    }

    /// Leaves the cluster: stops this host's VMs and revokes its lease.
    pub async fn leave(&self) {
        self.fence("the agent is shutting down").await;
        let lease = self.st().lease.take();
        if let Some(l) = lease {
            let _ = self.db.store.revoke(l).await;
        }
    }

    /// Stops every VM on this host at once: the host can no longer prove it owns them.
    async fn fence(&self, why: &str) {
        if self.set_fenced(true) {
            return;
        }
        self.set_coordinator(false);
        let killed = self
            .run_blocking(|w| {
                let list = w.list();
                for s in &list {
                    if let Ok(pid) = i32::try_from(s.pid) {
                        // SAFETY: kill sends a signal to a worker this agent started.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
                list.into_iter().map(|s| s.name).collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
        self.st().epochs.clear();
        warn!(
            "fenced: stopped {} VM(s) {:?} because {why}",
            killed.len(),
            killed
        );
    }

    /// A host the cluster switched off that runs again is on: its agent joining proves it
    /// (whoever switched it on).
    async fn back_from_standby(&self) -> Result<(), ClusterError> {
        let changed = self
            .db
            .update::<HostAdmin, _>(&admin_key(&self.cfg.host), |r| {
                if !r.standing_by() {
                    return false;
                }
                r.power = PowerState::On;
                r.power_since = now();
                r.power_note = Some("switched on: its agent joined".into());
                true
            })
            .await?;
        if changed {
            info!("back from standby: this host takes VMs again");
        }
        Ok(())
    }

    async fn publish_host(&self, lease: LeaseId) -> Result<(), ClusterError> {
        let local = self.run_blocking(|w| w.list()).await?;
        let (total, free) = inventory::memory_mib();
        let rec = HostRecord {
            name: self.cfg.host.clone(),
            api: self.cfg.api_url(),
            migration_ip: self.cfg.migration_ip.clone(),
            cpu_vendor: self.cpu.vendor.clone(),
            cpu_model: self.cpu.model.clone(),
            cpu_features: self.cpu.features.clone(),
            cpu_models: self.cpu.models.clone(),
            cores: self.cores(),
            bridges: inventory::bridges(),
            memory_mib: total,
            free_mib: free,
            load: inventory::load(),
            vm_memory_mib: local.iter().map(|s| s.memory_mib).sum(),
            vms: local.iter().map(|s| s.name.clone()).collect(),
            vm_usage: local
                .iter()
                .filter_map(|s| {
                    let (cpu_seconds, rss_mib) = inventory::process_usage(s.pid)?;
                    Some(VmUsage {
                        name: s.name.clone(),
                        cpu_seconds,
                        rss_mib,
                        dirty_bytes_per_second: s.dirty.map(|d| d.bytes_per_second),
                    })
                })
                .collect(),
            updated: now(),
            fenced: self.is_fenced(),
        };
        self.db
            .store
            .put(&host_key(&self.cfg.host), encode(&rec)?, Some(lease))
            .await?;
        Ok(())
    }
}
