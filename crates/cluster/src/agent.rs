//! The host agent's loops: the lease heartbeat (with self-fencing), the reconcile loop that
//! makes this host's workers match the store, and the source side of cluster migrations.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_store::{LeaseId, Store, StoreError};
use ferry_worker::api::{Request, WorkerState};
use ferry_worker::client::Workers;
use tracing::{info, warn};

use crate::inventory;
use crate::records::*;
use crate::{AgentConfig, ClusterError};

/// The fencing margin: a host that has not renewed its lease for `ttl - FENCE_MARGIN` stops
/// its VMs, so they are stopped before the lease can expire and the coordinator restarts them
/// elsewhere.
pub const FENCE_MARGIN: Duration = Duration::from_millis(1500);

/// How often the reconcile loop runs.
pub const RECONCILE_EVERY: Duration = Duration::from_millis(500);

/// One host's agent.
pub struct Agent {
    /// Its configuration.
    pub cfg: AgentConfig,
    /// The cluster store.
    pub store: Store,
    /// Its workers.
    pub workers: Workers,
    /// The API token.
    pub token: String,
    /// Its processor.
    pub cpu: inventory::Cpu,
    state: Mutex<State>,
    fenced: AtomicBool,
}

#[derive(Default)]
struct State {
    lease: Option<LeaseId>,
    /// When the last successful renewal (or grant) of the lease was *sent*: etcd counted it no
    /// earlier, so the lease lives at least until this plus the TTL.
    last_renewal: Option<Instant>,
    /// The epoch each local VM was started (or received) under.
    epochs: HashMap<String, u64>,
    /// Migrations this host is driving as the source.
    driving: HashSet<u64>,
    /// Running records as last published.
    published: HashMap<String, RunningRecord>,
    /// VMs that failed to start here, and when (retried after [`RETRY_START`]).
    failed_starts: HashMap<String, Instant>,
    /// Whether this host is the coordinator.
    coordinator: bool,
}

const RETRY_START: Duration = Duration::from_secs(10);

/// A list of records with their keys' revisions.
pub type Listed<T> = Vec<(String, i64, T)>;

impl Agent {
    /// An agent for `cfg` on `store`.
    pub fn new(
        cfg: AgentConfig,
        store: Store,
        workers: Workers,
    ) -> Result<Arc<Agent>, ClusterError> {
        let token = cfg.token()?;
        let cpu = inventory::cpu().map_err(|e| ClusterError::Config(format!("KVM: {e}")))?;
        std::fs::create_dir_all(cfg.shared_dir.join("consoles")).map_err(|e| {
            ClusterError::Io(format!("cannot create {}", cfg.shared_dir.display()), e)
        })?;
        Ok(Arc::new(Agent {
            cfg,
            store,
            workers,
            token,
            cpu,
            state: Mutex::new(State::default()),
            fenced: AtomicBool::new(false),
        }))
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This host's name.
    pub fn host(&self) -> &str {
        &self.cfg.host
    }

    /// This host's current lease.
    pub fn lease(&self) -> Option<LeaseId> {
        self.st().lease
    }

    /// Whether this host is the coordinator.
    pub fn is_coordinator(&self) -> bool {
        self.st().coordinator
    }

    pub(crate) fn set_coordinator(&self, yes: bool) {
        self.st().coordinator = yes;
    }

    /// Whether this host has fenced itself and not re-joined.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// The console log of VM `name` on the shared directory (every host appends to it in turn).
    pub fn console_log(&self, name: &str) -> PathBuf {
        self.cfg
            .shared_dir
            .join("consoles")
            .join(format!("{name}.log"))
    }

    /// Lists and decodes every record under `prefix`; a record that does not decode is logged
    /// and skipped.
    pub async fn list<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Listed<T>, ClusterError> {
        let mut out = Vec::new();
        for kv in self.store.list(prefix).await? {
            match decode(&kv.key, &kv.value) {
                Ok(v) => out.push((kv.key, kv.mod_revision, v)),
                Err(e) => warn!("skipping {e}"),
            }
        }
        Ok(out)
    }

    /// Reads one record and its revision.
    pub async fn get<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(i64, T)>, ClusterError> {
        match self.store.get(key).await? {
            Some(kv) => Ok(Some((kv.mod_revision, decode(&kv.key, &kv.value)?))),
            None => Ok(None),
        }
    }

    /// Reads, changes and writes back a record with compare-and-put, retrying on a concurrent
    /// change. `change` returns false to leave it alone. Whether it wrote.
    pub async fn update<T, F>(&self, key: &str, mut change: F) -> Result<bool, ClusterError>
    where
        T: serde::de::DeserializeOwned + serde::Serialize,
        F: FnMut(&mut T) -> bool,
    {
        for _ in 0..20 {
            let Some((rev, mut v)) = self.get::<T>(key).await? else {
                return Ok(false);
            };
            if !change(&mut v) {
                return Ok(false);
            }
            if self
                .store
                .compare_and_put(key, rev, encode(&v)?, None)
                .await?
            {
                return Ok(true);
            }
        }
        Err(ClusterError::Record(format!(
            "{key}: too many concurrent changes"
        )))
    }

    /// Host records of the live hosts.
    pub async fn hosts(&self) -> Result<Vec<HostRecord>, ClusterError> {
        Ok(self
            .list::<HostRecord>(&format!("{PREFIX}hosts/"))
            .await?
            .into_iter()
            .map(|(_, _, h)| h)
            .collect())
    }

    pub(crate) async fn run_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Workers) -> T + Send + 'static,
    ) -> Result<T, ClusterError> {
        let w = self.workers.clone();
        tokio::task::spawn_blocking(move || f(w))
            .await
            .map_err(|e| ClusterError::Record(format!("worker task: {e}")))
    }

    // ---------------------------------------------------------------- heartbeat and fencing

    /// Keeps the lease and the host record alive; fences the host when the store is lost.
    pub async fn heartbeat_loop(self: Arc<Self>) {
        let every = (self.cfg.ttl() / 5).max(Duration::from_millis(300));
        loop {
            let sent = Instant::now();
            let lease = self.lease();
            let r = match lease {
                Some(l) => self.store.keep_alive(l).await.map(|_| l),
                None => self.store.grant(self.cfg.ttl()).await,
            };
            match r {
                Ok(l) => {
                    if lease.is_none() || self.lease() == Some(l) {
                        self.st().last_renewal = Some(sent);
                    }
                    if lease.is_none() {
                        self.st().lease = Some(l);
                        self.st().published.clear();
                        if self.fenced.swap(false, Ordering::SeqCst) {
                            info!("re-joined the cluster with a new lease; VMs stopped while fenced stay stopped here until placed again");
                        } else {
                            info!("joined the cluster (lease {l:x})");
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

    /// Until when (CLOCK_BOOTTIME ms) this host's VMs may run: the instant the agent's own
    /// watchdog would fence them, `TTL - FENCE_MARGIN` after the last renewal was sent, before
    /// the lease can expire. `None` while the host holds no lease or is fenced.
    fn fence_deadline_ms(&self) -> Option<u64> {
        let st = self.st();
        if st.lease.is_none() || self.is_fenced() {
            return None;
        }
        let since = st.last_renewal?.elapsed();
        let valid = self.cfg.ttl().saturating_sub(FENCE_MARGIN);
        let left = u64::try_from(valid.saturating_sub(since).as_millis()).unwrap_or(0);
        Some(ferry_worker::fence::boottime_ms() + left)
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

    /// The arguments every worker of this host gets: its console on the shared directory,
    /// its end with this agent, and its fence deadline. `None` when the host may not run VMs
    /// (no lease, or fenced).
    fn worker_args(&self, vm: &str) -> Option<Vec<OsString>> {
        let until = self.fence_deadline_ms()?;
        Some(vec![
            "--console-log".into(),
            self.console_log(vm).into_os_string(),
            "--stop-with".into(),
            std::process::id().to_string().into(),
            "--fence-deadline".into(),
            until.to_string().into(),
        ])
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
            let _ = self.store.revoke(l).await;
        }
    }

    /// Stops every VM on this host at once: the host can no longer prove it owns them.
    async fn fence(&self, why: &str) {
        if self.fenced.swap(true, Ordering::SeqCst) {
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
            cores: inventory::cores(),
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
                    })
                })
                .collect(),
            updated: now(),
            fenced: self.is_fenced(),
        };
        self.store
            .put(&host_key(&self.cfg.host), encode(&rec)?, Some(lease))
            .await?;
        Ok(())
    }

    // ---------------------------------------------------------------- reconcile

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
        let me = self.cfg.host.clone();
        // Migrations first, then VMs: a migration ends by handing the VM over (owner, then
        // state), so whichever of the two this pass sees, it never takes an arriving or a
        // departing VM for one to stop or to restart.
        let migrations = self
            .list::<MigrationRecord>(&format!("{PREFIX}migrations/"))
            .await?;
        let vms: HashMap<String, (i64, VmRecord)> = self
            .list::<VmRecord>(&format!("{PREFIX}vms/"))
            .await?
            .into_iter()
            .map(|(_, rev, v)| (v.config.name.clone(), (rev, v)))
            .collect();
        let outgoing: HashSet<String> = migrations
            .iter()
            .filter(|(_, _, m)| m.state == MigrationState::Running && m.from == me)
            .map(|(_, _, m)| m.vm.clone())
            .collect();
        let incoming: HashSet<String> = migrations
            .iter()
            .filter(|(_, _, m)| m.state == MigrationState::Running && m.to == me)
            .map(|(_, _, m)| m.vm.clone())
            .collect();
        let local = self.run_blocking(|w| w.list()).await?;
        let local_names: HashSet<String> = local.iter().map(|s| s.name.clone()).collect();

        // Workers this host must not run (any more).
        for s in &local {
            let owned = vms
                .get(&s.name)
                .is_some_and(|(_, v)| v.owner.as_deref() == Some(me.as_str()));
            let wanted = vms
                .get(&s.name)
                .is_some_and(|(_, v)| v.desired == Desired::Running);
            let receiving = incoming.contains(&s.name);
            // A source whose migration committed in the store keeps its worker until the
            // migration ends (the worker exits by itself once the destination confirms).
            if !owned && !receiving && !outgoing.contains(&s.name) {
                warn!(
                    "{}: not owned by this host any more: stopping its worker",
                    s.name
                );
                self.kill(&s.name, s.pid).await;
            } else if owned
                && s.migration_outcome_unknown
                && !outgoing.contains(&s.name)
                && vms.get(&s.name).map(|(_, v)| v.epoch) == self.st().epochs.get(&s.name).copied()
            {
                // Its migration ended without the swap (the store still names this host) but
                // the worker never heard the answer: the VM runs here, nowhere else.
                warn!(
                    "{}: its migration's outcome was lost; the store names this host: resuming it",
                    s.name
                );
                let n = s.name.clone();
                let _ = self
                    .run_blocking(move |w| {
                        w.request(&n, &Request::MigrationResolve { commit: false })
                    })
                    .await?;
            } else if owned && !wanted && !outgoing.contains(&s.name) {
                info!("{}: stopping (desired state: stopped)", s.name);
                self.st().epochs.remove(&s.name);
                let n = s.name.clone();
                let _ = self
                    .run_blocking(move |w| w.stop(&n, Duration::from_secs(20)))
                    .await?;
            } else if owned && s.state == WorkerState::Stopped && !outgoing.contains(&s.name) {
                // The guest powered off: the worker is done.
                self.st().epochs.remove(&s.name);
                let n = s.name.clone();
                let _ = self
                    .run_blocking(move |w| w.request(&n, &Request::Shutdown))
                    .await?;
                if let Some(v) = vms.get(&s.name).map(|(_, v)| v.config.name.clone()) {
                    self.update::<VmRecord, _>(&vm_key(&v), |r| {
                        let ch = r.desired != Desired::Stopped;
                        r.desired = Desired::Stopped;
                        r.note = Some("the guest powered off".into());
                        ch
                    })
                    .await?;
                }
            }
        }

        // Receivers whose source went away after READY: the store says whether they run.
        self.resolve_receivers(&local, |n| {
            vms.get(n)
                .is_some_and(|(_, v)| v.owner.as_deref() == Some(me.as_str()))
        })
        .await;

        // VMs this host should run but does not.
        for (name, (rev, v)) in &vms {
            if v.owner.as_deref() != Some(me.as_str())
                || v.desired != Desired::Running
                || local_names.contains(name)
                || outgoing.contains(name)
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

        // What runs here, as seen by the cluster.
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
                self.store
                    .put(&running_key(n, &me), encode(r)?, Some(lease))
                    .await?;
            }
        }
        for n in published.keys() {
            if !now_running.contains_key(n) {
                self.store.delete(&running_key(n, &me)).await?;
            }
        }
        self.st().published = now_running;

        // Migrations this host is the source of.
        for (_, _, m) in migrations {
            if m.state == MigrationState::Running && m.from == me && self.st().driving.insert(m.id)
            {
                let me = Arc::clone(self);
                tokio::spawn(async move {
                    let id = m.id;
                    me.drive_migration(m).await;
                    me.st().driving.remove(&id);
                });
            }
        }
        Ok(())
    }

    /// VM `name`'s worker exited without being asked (crash, killed): an HA VM goes back to
    /// the coordinator for placement (next epoch); another stays stopped.
    async fn worker_lost(&self, name: &str, epoch: u64) -> Result<(), ClusterError> {
        self.st().epochs.remove(name);
        let me = self.cfg.host.clone();
        warn!("{name}: its worker exited unexpectedly; handing the VM back to the cluster");
        self.update::<VmRecord, _>(&vm_key(name), |r| {
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
        let current = self.store.get(&vm_key(name)).await;
        if !matches!(&current, Ok(Some(kv)) if kv.mod_revision == rev) {
            return;
        }
        let mut cfg = v.config.clone();
        if v.cluster_cpu {
            // The `cluster` model: hide what this host has beyond the live hosts' common set.
            match crate::coordinator::View::read(self).await {
                Ok(view) => {
                    let (common, _) = crate::api::baseline(&view);
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
                    .update::<VmRecord, _>(&vm_key(name), |r| {
                        r.note = Some(msg.clone());
                        true
                    })
                    .await;
            }
            Err(e) => warn!("{name}: {e}"),
        }
    }

    // ---------------------------------------------------------------- migrations

    /// Destination side: starts a receiving worker for migration `id` and returns the
    /// address it listens on.
    pub async fn receive(&self, id: u64) -> Result<String, ClusterError> {
        if self.is_fenced() || self.lease().is_none() {
            return Err(ClusterError::Request(
                503,
                format!("{} is not in the cluster right now (fenced)", self.cfg.host),
            ));
        }
        let Some((_, m)) = self.get::<MigrationRecord>(&migration_key(id)).await? else {
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
        let Some((_, vm)) = self.get::<VmRecord>(&vm_key(&m.vm)).await? else {
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

    /// Source side of a running migration: asks the destination for a receiving worker,
    /// drives the local worker, then hands ownership over (or records the failure).
    async fn drive_migration(self: &Arc<Self>, m: MigrationRecord) {
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
                    .get::<MigrationRecord>(&migration_key(id))
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|(_, r)| r.cancel);
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
        let epoch = match self.get::<VmRecord>(&vm_key(&m.vm)).await? {
            Some((_, v)) if v.owner.as_deref() == Some(self.cfg.host.as_str()) => v.epoch,
            _ => {
                return Err(ClusterError::Request(
                    409,
                    format!("{} is not owned by {}", m.vm, self.cfg.host),
                ))
            }
        };
        let dest = self
            .hosts()
            .await?
            .into_iter()
            .find(|h| h.name == m.to)
            .ok_or_else(|| ClusterError::Peer(m.to.clone(), "is not in the cluster".into()))?;
        let url = format!("{}/v1/internal/receive", dest.api);
        let token = self.token.clone();
        let id = m.id;
        let to = m.to.clone();
        let listen = tokio::task::spawn_blocking(move || {
            crate::api::call(&url, &token, "POST", Some(serde_json::json!({ "id": id })))
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
        let gate = move || -> Result<(), String> {
            let r = rt.block_on(me.commit_migration(&rec, epoch));
            if r.is_ok() {
                won.store(true, Ordering::SeqCst);
            }
            r
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
