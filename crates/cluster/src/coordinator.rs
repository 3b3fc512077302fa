//! The cluster loops, run by the one agent that holds the coordinator key (a key bound to its
//! lease: when the coordinator dies, the key goes with its lease and another agent takes it).
//! Every decision is a compare-and-put on a record, so a coordinator that lost its key half-way
//! through a pass cannot overwrite what its successor decided. Only the election uses the
//! agent (its lease); a pass works on the store's records, the view and the configuration.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::agent::Agent;
use crate::balancing::Balancer;
use crate::config::{AgentConfig, Limits};
use crate::db::Db;
use crate::power::PowerManager;
use crate::records::*;
use crate::view::View;
use crate::ClusterError;

/// How often the coordinator loop runs.
pub const COORDINATE_EVERY: Duration = Duration::from_millis(700);

/// Campaigns for the coordinator key and, while holding it, runs the cluster loops.
pub async fn coordinator_loop(a: Arc<Agent>) {
    let mut balancer = Balancer::default();
    let mut power = PowerManager::default();
    loop {
        tokio::time::sleep(COORDINATE_EVERY).await;
        match campaign(&a).await {
            Ok(true) => {
                if !a.is_coordinator() {
                    info!("this host is now the coordinator");
                    a.set_coordinator(true);
                }
                if let Err(e) = pass(&a.db, &a.cfg, &mut balancer, &mut power).await {
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
    match a.db.store.get(&coordinator_key()).await? {
        Some(kv) => {
            let c: CoordinatorRecord = decode(&kv.key, &kv.value)?;
            Ok(c.host == a.host() && kv.lease == Some(lease))
        }
        None => {
            let rec = CoordinatorRecord {
                host: a.host().to_string(),
                since: now(),
            };
            Ok(a.db
                .store
                .compare_and_put(&coordinator_key(), 0, encode(&rec)?, Some(lease))
                .await?)
        }
    }
}

/// One pass of the cluster loops.
async fn pass(
    db: &Db,
    cfg: &AgentConfig,
    balancer: &mut Balancer,
    power: &mut PowerManager,
) -> Result<(), ClusterError> {
    let view = View::read(db).await?;
    finish_orphaned_migrations(db, &view).await?;
    let unplaceable = place(db, &view).await?;
    let view = View::read(db).await?;
    drain(db, &view).await?;
    let view = View::read(db).await?;
    let balanced = balancer.step(db, &view, &cfg.balance, &cfg.power).await?;
    let powered = power.step(db, &view, balancer, cfg, unplaceable).await?;
    let view = if balanced || powered {
        View::read(db).await?
    } else {
        view
    };
    admit(db, &view, &cfg.limits).await?;
    Ok(())
}

/// Running migrations whose source host died: the VM is where the destination says it is.
async fn finish_orphaned_migrations(db: &Db, v: &View) -> Result<(), ClusterError> {
    for m in &v.migrations {
        if m.state != MigrationState::Running || v.hosts.contains_key(&m.from) {
            continue;
        }
        let arrived = db
            .get::<RunningRecord>(&running_key(&m.vm, &m.to))
            .await?
            .is_some_and(|(_, r)| r.state == "running");
        if arrived {
            let (from, to) = (m.from.clone(), m.to.clone());
            db.update::<VmRecord, _>(&vm_key(&m.vm), |r| {
                if r.owner.as_deref() != Some(from.as_str()) {
                    return false;
                }
                r.owner = Some(to.clone());
                r.epoch += 1;
                true
            })
            .await?;
            db.set_migration_state(
                m.id,
                MigrationState::Running,
                MigrationState::Succeeded,
                None,
            )
            .await?;
            info!("{}: migration {} finished by the coordinator (its source host died after the hand-over)", m.vm, m.id);
        } else {
            db.set_migration_state(
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
                db.set_migration_state(
                    m.id,
                    MigrationState::Queued,
                    MigrationState::Cancelled,
                    None,
                )
                .await?;
            }
            Some(Some(e)) => {
                db.set_migration_state(
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
/// hosts (a dead host fenced itself before its lease expired, so this is safe). A host the
/// cluster switched off (standby) is not dead: a VM it owns (stopped when it was emptied) is
/// placed like a new one. Whether some VM found no host.
async fn place(db: &Db, v: &View) -> Result<bool, ClusterError> {
    let mut unplaceable = false;
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
            Some(o) if v.admin.get(o).is_some_and(|adm| adm.standing_by()) => None,
            Some(o) => Some(o.to_string()),
        };
        if v.active_migration(name).is_some() {
            continue;
        }
        if let Some(o) = &dead_owner {
            if !vm.ha {
                let note = format!("host {o} is down; the VM is not highly available");
                if vm.note.as_deref() != Some(note.as_str()) {
                    db.update::<VmRecord, _>(&vm_key(name), |r| {
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
                let wrote = db
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
                unplaceable = true;
                let note = format!("cannot be placed: {why}");
                if vm.note.as_deref() != Some(note.as_str()) {
                    db.update::<VmRecord, _>(&vm_key(name), |r| {
                        r.note = Some(note.clone());
                        true
                    })
                    .await?;
                }
            }
        }
    }
    Ok(unplaceable)
}

/// Queues a migration for every VM of a draining host (reason `drain`, or `consolidate` when
/// power consolidation empties it); ends a maintenance drain when none is left (the power
/// step switches an emptied host off).
async fn drain(db: &Db, v: &View) -> Result<(), ClusterError> {
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
                    let reason = match adm.power {
                        PowerState::Evacuating => "consolidate",
                        _ => "drain",
                    };
                    db.queue_migration(
                        name,
                        h,
                        &to,
                        reason,
                        Default::default(),
                        adm.power_note.clone().filter(|_| reason == "consolidate"),
                    )
                    .await?;
                }
                Err(why) => warn!("drain of {h}: {name} stays: {why}"),
            }
        }
        if left == 0 && adm.power == PowerState::On {
            db.update::<HostAdmin, _>(&admin_key(h), |r| {
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
async fn admit(db: &Db, v: &View, limits: &Limits) -> Result<(), ClusterError> {
    let max = v.max_migrations(limits.max_migrations);
    let per_host = limits.per_host as usize;
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
        if db
            .set_migration_state(m.id, MigrationState::Queued, MigrationState::Running, None)
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
