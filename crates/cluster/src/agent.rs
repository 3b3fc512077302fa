//! One host's agent: its configuration, its handle on the store and its workers, and the
//! little state its loops share. The loops live beside it, each in its own module that
//! extends `Agent`: `lease` (lease, fencing, the host record), `reconcile` (this host's
//! workers against the store), `source` and `destination` (cluster migrations), `commit` (the
//! commit swap), `utilization` (the sampled history). This module depends on none of them.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_store::{LeaseId, Store};
use ferry_worker::client::Workers;

use crate::db::Db;
use crate::inventory;
use crate::records::RunningRecord;
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
    /// The cluster store's records.
    pub db: Db,
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
pub(crate) struct State {
    pub(crate) lease: Option<LeaseId>,
    /// When the last successful renewal (or grant) of the lease was *sent*: etcd counted it no
    /// earlier, so the lease lives at least until this plus the TTL.
    pub(crate) last_renewal: Option<Instant>,
    /// The epoch each local VM was started (or received) under.
    pub(crate) epochs: HashMap<String, u64>,
    /// Migrations this host drives (or drove) as the source, until the store shows them ended.
    pub(crate) driving: HashSet<u64>,
    /// Running records as last published.
    pub(crate) published: HashMap<String, RunningRecord>,
    /// VMs that failed to start here, and when (retried after [`RETRY_START`]).
    pub(crate) failed_starts: HashMap<String, Instant>,
    /// Whether this host is the coordinator.
    pub(crate) coordinator: bool,
    /// This host's utilization history (`utilization`).
    pub(crate) history: crate::history::History,
}

pub(crate) const RETRY_START: Duration = Duration::from_secs(10);

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
            db: Db::new(store),
            workers,
            token,
            cpu,
            state: Mutex::new(State::default()),
            fenced: AtomicBool::new(false),
        }))
    }

    pub(crate) fn st(&self) -> std::sync::MutexGuard<'_, State> {
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

    /// Marks the host fenced (or re-joined); whether it was fenced before.
    pub(crate) fn set_fenced(&self, yes: bool) -> bool {
        self.fenced.swap(yes, Ordering::SeqCst)
    }

    /// The console log of VM `name` on the shared directory (every host appends to it in turn).
    pub fn console_log(&self, name: &str) -> PathBuf {
        self.cfg
            .shared_dir
            .join("consoles")
            .join(format!("{name}.log"))
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

    /// Until when (CLOCK_BOOTTIME ms) this host's VMs may run: the instant the agent's own
    /// watchdog would fence them, `TTL - FENCE_MARGIN` after the last renewal was sent, before
    /// the lease can expire. `None` while the host holds no lease or is fenced.
    pub(crate) fn fence_deadline_ms(&self) -> Option<u64> {
        let st = self.st();
        if st.lease.is_none() || self.is_fenced() {
            return None;
        }
        let since = st.last_renewal?.elapsed();
        let valid = self.cfg.ttl().saturating_sub(FENCE_MARGIN);
        let left = u64::try_from(valid.saturating_sub(since).as_millis()).unwrap_or(0);
        Some(ferry_worker::fence::boottime_ms() + left)
    }

    /// The arguments every worker of this host gets: its console on the shared directory,
    /// its end with this agent, and its fence deadline. `None` when the host may not run VMs
    /// (no lease, or fenced).
    pub(crate) fn worker_args(&self, vm: &str) -> Option<Vec<OsString>> {
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
}
