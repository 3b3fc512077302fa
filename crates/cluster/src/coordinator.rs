//! The cluster loops, run by the one agent that holds the coordinator key (a key bound to its
//! lease: when the coordinator dies, the key goes with its lease and another agent takes it).
//! Every decision is a compare-and-put on a record, so a coordinator that lost its key half-way
//! through a pass cannot overwrite what its successor decided.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::agent::Agent;
use crate::records::*;
use crate::ClusterError;

/// How often the coordinator loop runs.
pub const COORDINATE_EVERY: Duration = Duration::from_millis(700);

/// Memory a host keeps for itself beyond its VMs' RAM when placing.
pub const HOST_RESERVE_MIB: u64 = 256;

/// A snapshot of the cluster taken at the start of a pass.
pub struct View {
    /// Live hosts by name.
    pub hosts: HashMap<String, HostRecord>,
    /// Administrative state by host.
    pub admin: HashMap<String, HostAdmin>,
    /// VMs by name.
    pub vms: HashMap<String, VmRecord>,
    /// Every migration, by id.
    pub migrations: Vec<MigrationRecord>,
    /// Where each VM runs, by VM.
    pub running: HashMap<String, Vec<RunningRecord>>,
}

impl View {
    /// Reads the cluster.
    pub async fn read(a: &Agent) -> Result<View, ClusterError> {
        let migrations = a
            .list::<MigrationRecord>(&format!("{PREFIX}migrations/"))
            .await?
            .into_iter()
            .map(|(_, _, m)| m)
            .collect();
        let vms = a
            .list::<VmRecord>(&format!("{PREFIX}vms/"))
            .await?
            .into_iter()
            .map(|(_, _, v)| (v.config.name.clone(), v))
            .collect();
        let hosts = a
            .hosts()
            .await?
            .into_iter()
            .map(|h| (h.name.clone(), h))
            .collect();
        let admin = a
            .list::<HostAdmin>(&format!("{PREFIX}admin/"))
            .await?
            .into_iter()
            .map(|(k, _, v)| (k.rsplit('/').next().unwrap_or_default().to_string(), v))
            .collect();
        let mut running: HashMap<String, Vec<RunningRecord>> = HashMap::new();
        for (k, _, r) in a
            .list::<RunningRecord>(&format!("{PREFIX}running/"))
            .await?
        {
            let vm = k
                .trim_start_matches(&format!("{PREFIX}running/"))
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string();
            running.entry(vm).or_default().push(r);
        }
        Ok(View {
            hosts,
            admin,
            vms,
            migrations,
            running,
        })
    }

    /// Whether host `h` is alive and takes VMs.
    pub fn accepts(&self, h: &str) -> bool {
        self.hosts.get(h).is_some_and(|r| !r.fenced)
            && !self.admin.get(h).is_some_and(|a| a.paused || a.draining)
    }

    /// Memory promised to the VMs owned by host `h` (running or about to).
    pub fn committed_mib(&self, h: &str) -> u64 {
        let owned: u64 = self
            .vms
            .values()
            .filter(|v| v.owner.as_deref() == Some(h) && v.desired == Desired::Running)
            .map(|v| v.config.memory_mib)
            .sum();
        let arriving: u64 = self
            .migrations
            .iter()
            .filter(|m| m.to == h && !m.state.done())
            .filter_map(|m| self.vms.get(&m.vm))
            .map(|v| v.config.memory_mib)
            .sum();
        owned + arriving
    }

    /// Why host `h` cannot take VM `v`, if it cannot (`extra_mib` already promised to it
    /// during this pass).
    pub fn unfit(&self, h: &str, v: &VmRecord, extra_mib: u64) -> Option<String> {
        let Some(host) = self.hosts.get(h) else {
            return Some(format!("host {h} is not in the cluster (down or unknown)"));
        };
        if host.fenced {
            return Some(format!("host {h} has fenced itself"));
        }
        if let Some(a) = self.admin.get(h) {
            if a.paused || a.draining {
                return Some(format!("host {h} is paused for maintenance"));
            }
        }
        let model = v.config.cpu.name();
        if !host.cpu_models.iter().any(|m| m == model) {
            return Some(format!("host {h} cannot run CPU model {model}"));
        }
        if let Some(owner) = v.owner.as_deref().and_then(|o| self.hosts.get(o)) {
            if owner.cpu_vendor != host.cpu_vendor {
                return Some(format!(
                    "host {h} is {} and the VM runs on {}",
                    host.cpu_vendor, owner.cpu_vendor
                ));
            }
        }
        if let Some(seen) = self.running_features(v) {
            let lacks: Vec<&str> = seen
                .iter()
                .filter(|f| !host.cpu_features.contains(f))
                .map(String::as_str)
                .collect();
            if !lacks.is_empty() {
                return Some(format!(
                    "host {h} lacks CPU features the VM sees: {} (a VM of CPU model compat, x86-64-v*, or cluster can move)",
                    lacks.join(" ")
                ));
            }
        }
        let need = v.config.memory_mib + HOST_RESERVE_MIB;
        let room = host
            .memory_mib
            .saturating_sub(self.committed_mib(h) + extra_mib);
        if room < need {
            return Some(format!(
                "host {h} has {room} MiB uncommitted, the VM needs {need} MiB"
            ));
        }
        None
    }

    /// The best host for `v` other than `except`: the one with the most uncommitted memory
    /// that fits (ties: fewest VMs, then name).
    pub fn best_host(
        &self,
        v: &VmRecord,
        except: Option<&str>,
        extra: &HashMap<String, u64>,
    ) -> Result<String, String> {
        let mut best: Option<(u64, usize, String)> = None;
        let mut why = Vec::new();
        let mut names: Vec<&String> = self.hosts.keys().collect();
        names.sort();
        for h in names {
            if Some(h.as_str()) == except {
                continue;
            }
            let ext = extra.get(h).copied().unwrap_or(0);
            if let Some(r) = self.unfit(h, v, ext) {
                why.push(r);
                continue;
            }
            let room = self.hosts[h]
                .memory_mib
                .saturating_sub(self.committed_mib(h) + ext);
            let count = self
                .vms
                .values()
                .filter(|x| x.owner.as_deref() == Some(h.as_str()))
                .count();
            let better = match &best {
                None => true,
                Some((r, c, _)) => room > *r || (room == *r && count < *c),
            };
            if better {
                best = Some((room, count, h.clone()));
            }
        }
        best.map(|(_, _, h)| h).ok_or_else(|| {
            if why.is_empty() {
                "no other host is in the cluster".to_string()
            } else {
                format!("no host fits: {}", why.join("; "))
            }
        })
    }

    /// The CPU features a running VM's guest sees (from its owner's report).
    pub fn running_features(&self, v: &VmRecord) -> Option<&Vec<String>> {
        let owner = v.owner.as_ref()?;
        self.running
            .get(&v.config.name)?
            .iter()
            .find(|r| &r.host == owner)
            .map(|r| &r.cpu_features)
            .filter(|f| !f.is_empty())
    }

    /// The migration limit: the configured one, or half the live hosts (at least one).
    pub fn max_migrations(&self, configured: u32) -> usize {
        if configured > 0 {
            configured as usize
        } else {
            (self.hosts.len() / 2).max(1)
        }
    }

    /// The unfinished migration of VM `name`, if any.
    pub fn active_migration(&self, name: &str) -> Option<&MigrationRecord> {
        self.migrations
            .iter()
            .find(|m| m.vm == name && !m.state.done())
    }
}

/// Campaigns for the coordinator key and, while holding it, runs the cluster loops.
pub async fn coordinator_loop(a: Arc<Agent>) {
    loop {
        tokio::time::sleep(COORDINATE_EVERY).await;
        match campaign(&a).await {
            Ok(true) => {
                if !a.is_coordinator() {
                    info!("this host is now the coordinator");
                    a.set_coordinator(true);
                }
                if let Err(e) = pass(&a).await {
                    warn!("coordinator: {e}");
                }
            }
            Ok(false) => {
                if a.is_coordinator() {
                    info!("this host is no longer the coordinator");
                }
                a.set_coordinator(false);
            }
            Err(e) => {
                a.set_coordinator(false);
                warn!("coordinator election: {e}");
            }
        }
    }
}

/// Whether this host holds (or just took) the coordinator key.
async fn campaign(a: &Agent) -> Result<bool, ClusterError> {
    let Some(lease) = a.lease() else {
        return Ok(false);
    };
    if a.is_fenced() {
        return Ok(false);
    }
    match a.store.get(&coordinator_key()).await? {
        Some(kv) => {
            let c: CoordinatorRecord = decode(&kv.key, &kv.value)?;
            Ok(c.host == a.host() && kv.lease == Some(lease))
        }
        None => {
            let rec = CoordinatorRecord {
                host: a.host().to_string(),
                since: now(),
            };
            Ok(a.store
                .compare_and_put(&coordinator_key(), 0, encode(&rec)?, Some(lease))
                .await?)
        }
    }
}

/// Allocates the next migration id.
pub async fn next_migration_id(a: &Agent) -> Result<u64, ClusterError> {
    let key = migration_seq_key();
    for _ in 0..50 {
        let (rev, cur) = match a.store.get(&key).await? {
            Some(kv) => (
                kv.mod_revision,
                String::from_utf8_lossy(&kv.value)
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0),
            ),
            None => (0, 0),
        };
        let next = cur + 1;
        if a.store
            .compare_and_put(&key, rev, next.to_string().into_bytes(), None)
            .await?
        {
            return Ok(next);
        }
    }
    Err(ClusterError::Record(
        "cannot allocate a migration id".into(),
    ))
}

/// Queues a migration of `vm` from `from` to `to` with the engine's default options.
pub async fn queue_migration(
    a: &Agent,
    vm: &str,
    from: &str,
    to: &str,
    reason: &str,
) -> Result<MigrationRecord, ClusterError> {
    queue_migration_with(
        a,
        vm,
        from,
        to,
        reason,
        migration::MigrateOptions::default(),
    )
    .await
}

/// [`queue_migration`] with `options`.
pub async fn queue_migration_with(
    a: &Agent,
    vm: &str,
    from: &str,
    to: &str,
    reason: &str,
    options: migration::MigrateOptions,
) -> Result<MigrationRecord, ClusterError> {
    let id = next_migration_id(a).await?;
    let m = MigrationRecord {
        id,
        vm: vm.to_string(),
        from: from.to_string(),
        to: to.to_string(),
        state: MigrationState::Queued,
        reason: reason.to_string(),
        options,
        requested: now(),
        started: None,
        finished: None,
        cancel: false,
        progress: None,
        report: None,
        error: None,
    };
    a.store
        .compare_and_put(&migration_key(id), 0, encode(&m)?, None)
        .await?;
    info!("{vm}: migration {id} {from} -> {to} queued ({reason})");
    Ok(m)
}

async fn set_migration(
    a: &Agent,
    id: u64,
    from: MigrationState,
    to: MigrationState,
    error: Option<String>,
) -> Result<bool, ClusterError> {
    a.update::<MigrationRecord, _>(&migration_key(id), |r| {
        if r.state != from {
            return false;
        }
        r.state = to;
        if to == MigrationState::Running {
            r.started = Some(now());
        }
        if to.done() {
            r.finished = Some(now());
            r.error = error.clone();
        }
        true
    })
    .await
}

/// One pass of the cluster loops.
async fn pass(a: &Agent) -> Result<(), ClusterError> {
    let view = View::read(a).await?;
    finish_orphaned_migrations(a, &view).await?;
    place(a, &view).await?;
    let view = View::read(a).await?;
    drain(a, &view).await?;
    let view = View::read(a).await?;
    admit(a, &view).await?;
    Ok(())
}

/// Running migrations whose source host died: the VM is where the destination says it is.
async fn finish_orphaned_migrations(a: &Agent, v: &View) -> Result<(), ClusterError> {
    for m in &v.migrations {
        if m.state != MigrationState::Running || v.hosts.contains_key(&m.from) {
            continue;
        }
        let arrived = a
            .get::<RunningRecord>(&running_key(&m.vm, &m.to))
            .await?
            .is_some_and(|(_, r)| r.state == "running");
        if arrived {
            let (from, to) = (m.from.clone(), m.to.clone());
            a.update::<VmRecord, _>(&vm_key(&m.vm), |r| {
                if r.owner.as_deref() != Some(from.as_str()) {
                    return false;
                }
                r.owner = Some(to.clone());
                r.epoch += 1;
                true
            })
            .await?;
            set_migration(
                a,
                m.id,
                MigrationState::Running,
                MigrationState::Succeeded,
                None,
            )
            .await?;
            info!("{}: migration {} finished by the coordinator (its source host died after the hand-over)", m.vm, m.id);
        } else {
            set_migration(
                a,
                m.id,
                MigrationState::Running,
                MigrationState::Failed,
                Some(format!("source host {} died during the migration", m.from)),
            )
            .await?;
        }
    }
    // Queued migrations that can no longer happen.
    for m in &v.migrations {
        if m.state != MigrationState::Queued {
            continue;
        }
        let why = if m.cancel {
            Some(None)
        } else if !v.vms.contains_key(&m.vm) {
            Some(Some(format!("VM {} no longer exists", m.vm)))
        } else if v.vms[&m.vm].owner.as_deref() != Some(m.from.as_str()) {
            Some(Some(format!("VM {} is no longer on {}", m.vm, m.from)))
        } else if !v.hosts.contains_key(&m.from) {
            Some(Some(format!("source host {} is down", m.from)))
        } else if !v.hosts.contains_key(&m.to) {
            Some(Some(format!("destination host {} is down", m.to)))
        } else {
            None
        };
        match why {
            Some(None) => {
                set_migration(
                    a,
                    m.id,
                    MigrationState::Queued,
                    MigrationState::Cancelled,
                    None,
                )
                .await?;
            }
            Some(Some(e)) => {
                set_migration(
                    a,
                    m.id,
                    MigrationState::Queued,
                    MigrationState::Failed,
                    Some(e),
                )
                .await?;
            }
            None => {}
        }
    }
    Ok(())
}

/// Gives VMs that should run and have no live owner a host: new VMs, and the HA VMs of dead
/// hosts (a dead host fenced itself before its lease expired, so this is safe).
async fn place(a: &Agent, v: &View) -> Result<(), ClusterError> {
    let mut extra: HashMap<String, u64> = HashMap::new();
    let mut names: Vec<&String> = v.vms.keys().collect();
    names.sort();
    for name in names {
        let vm = &v.vms[name];
        if vm.desired != Desired::Running {
            continue;
        }
        let dead_owner = match vm.owner.as_deref() {
            None => None,
            Some(o) if v.hosts.contains_key(o) => continue,
            Some(o) => Some(o.to_string()),
        };
        if v.active_migration(name).is_some() {
            continue;
        }
        if let Some(o) = &dead_owner {
            if !vm.ha {
                let note = format!("host {o} is down; the VM is not highly available");
                if vm.note.as_deref() != Some(note.as_str()) {
                    a.update::<VmRecord, _>(&vm_key(name), |r| {
                        r.note = Some(note.clone());
                        true
                    })
                    .await?;
                }
                continue;
            }
        }
        match v.best_host(vm, None, &extra) {
            Ok(h) => {
                let expect_owner = vm.owner.clone();
                let note = dead_owner
                    .as_ref()
                    .map(|o| format!("restarted on {h} after host {o} died"));
                let wrote = a
                    .update::<VmRecord, _>(&vm_key(name), |r| {
                        if r.owner != expect_owner || r.desired != Desired::Running {
                            return false;
                        }
                        r.owner = Some(h.clone());
                        r.epoch += 1;
                        if note.is_some() {
                            r.note = note.clone();
                        } else if r.note.as_deref().is_some_and(|n| n.starts_with("cannot")) {
                            r.note = None;
                        }
                        true
                    })
                    .await?;
                if wrote {
                    *extra.entry(h.clone()).or_default() += vm.config.memory_mib;
                    match &dead_owner {
                        Some(o) => warn!("{name}: host {o} is down: restarting the VM on {h}"),
                        None => info!("{name}: placed on {h}"),
                    }
                }
            }
            Err(why) => {
                let note = format!("cannot be placed: {why}");
                if vm.note.as_deref() != Some(note.as_str()) {
                    a.update::<VmRecord, _>(&vm_key(name), |r| {
                        r.note = Some(note.clone());
                        true
                    })
                    .await?;
                }
            }
        }
    }
    Ok(())
}

/// Queues a migration for every VM of a draining host; ends the drain when none is left.
async fn drain(a: &Agent, v: &View) -> Result<(), ClusterError> {
    let mut extra: HashMap<String, u64> = HashMap::new();
    for (h, adm) in &v.admin {
        if !adm.draining || !v.hosts.contains_key(h) {
            continue;
        }
        let mut left = 0;
        let mut names: Vec<&String> = v.vms.keys().collect();
        names.sort();
        for name in names {
            let vm = &v.vms[name];
            if vm.owner.as_deref() != Some(h.as_str()) || vm.desired != Desired::Running {
                continue;
            }
            left += 1;
            if v.active_migration(name).is_some() {
                continue;
            }
            match v.best_host(vm, Some(h), &extra) {
                Ok(to) => {
                    *extra.entry(to.clone()).or_default() += vm.config.memory_mib;
                    queue_migration(a, name, h, &to, "drain").await?;
                }
                Err(why) => warn!("drain of {h}: {name} stays: {why}"),
            }
        }
        if left == 0 {
            a.update::<HostAdmin, _>(&admin_key(h), |r| {
                let ch = r.draining;
                r.draining = false;
                r.paused = true;
                ch
            })
            .await?;
            info!("host {h} is drained and paused");
        }
    }
    Ok(())
}

/// Admits queued migrations in order while the limits allow: at most
/// [`View::max_migrations`] at once across the cluster and `per_host` per host.
async fn admit(a: &Agent, v: &View) -> Result<(), ClusterError> {
    let max = v.max_migrations(a.cfg.limits.max_migrations);
    let per_host = a.cfg.limits.per_host as usize;
    let mut running = 0usize;
    let mut busy: HashMap<String, usize> = HashMap::new();
    let mut vms_moving: HashSet<String> = HashSet::new();
    for m in v
        .migrations
        .iter()
        .filter(|m| m.state == MigrationState::Running)
    {
        running += 1;
        *busy.entry(m.from.clone()).or_default() += 1;
        *busy.entry(m.to.clone()).or_default() += 1;
        vms_moving.insert(m.vm.clone());
    }
    for m in v
        .migrations
        .iter()
        .filter(|m| m.state == MigrationState::Queued)
    {
        if running >= max {
            break;
        }
        if busy.get(&m.from).copied().unwrap_or(0) >= per_host
            || busy.get(&m.to).copied().unwrap_or(0) >= per_host
            || vms_moving.contains(&m.vm)
        {
            continue;
        }
        if set_migration(
            a,
            m.id,
            MigrationState::Queued,
            MigrationState::Running,
            None,
        )
        .await?
        {
            info!(
                "{}: migration {} admitted ({} of {max} running)",
                m.vm,
                m.id,
                running + 1
            );
            running += 1;
            *busy.entry(m.from.clone()).or_default() += 1;
            *busy.entry(m.to.clone()).or_default() += 1;
            vms_moving.insert(m.vm.clone());
        }
    }
    Ok(())
}
