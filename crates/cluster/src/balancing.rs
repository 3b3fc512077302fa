//! The coordinator's balancing step: the model of the cluster built from the store's view and
//! the VMs' measured CPU, the pure policy of [`crate::balance`] over it, and what comes of it —
//! the recommendations published in the store (`manual`), queued as migrations with reason
//! `balance` (`auto`), or nothing (`off`). It works on records and the view alone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing::info;

use crate::balance::{self, BalanceParams, Host, Model, Vm};
use crate::config::{BalanceConfig, PowerConfig};
use crate::db::Db;
use crate::records::*;
use crate::view::View;
use crate::ClusterError;

/// How long a CPU-time sample must be apart from the last for a rate.
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// Moves one balancing pass queues at the most (the admission limits pace them anyway).
const MAX_MOVES: usize = 2;

/// A VM's measured CPU use.
#[derive(Clone, Debug)]
struct Rate {
    cpu_seconds: f64,
    at: Instant,
    /// Cores in use over the last window; `None` until one has passed.
    cores: Option<f64>,
    /// How fast it writes its memory, MiB/s, as its host last reported (0 until then).
    dirty_mib_s: f64,
}

/// The coordinator's balancing state between passes.
#[derive(Debug, Default)]
pub struct Balancer {
    rates: HashMap<String, Rate>,
    last: Option<Instant>,
}

impl Balancer {
    /// Updates the VMs' CPU rates from what each host reports of its VMs' workers.
    pub fn observe(&mut self, view: &View, now: Instant) {
        for h in view.hosts.values() {
            for u in &h.vm_usage {
                if view.vms.get(&u.name).and_then(|v| v.owner.as_deref()) != Some(h.name.as_str()) {
                    continue;
                }
                let dirty_mib_s =
                    u.dirty_bytes_per_second.unwrap_or(0.0).max(0.0) / (1 << 20) as f64;
                match self.rates.get_mut(&u.name) {
                    None => {
                        self.rates.insert(
                            u.name.clone(),
                            Rate {
                                cpu_seconds: u.cpu_seconds,
                                at: now,
                                cores: None,
                                dirty_mib_s,
                            },
                        );
                    }
                    Some(r) if u.cpu_seconds < r.cpu_seconds => {
                        // A new worker (the VM moved or restarted): start the window again.
                        r.cpu_seconds = u.cpu_seconds;
                        r.at = now;
                        r.dirty_mib_s = dirty_mib_s;
                    }
                    Some(r) => {
                        r.dirty_mib_s = dirty_mib_s;
                        let dt = now.duration_since(r.at);
                        if dt >= RATE_WINDOW {
                            r.cores = Some((u.cpu_seconds - r.cpu_seconds) / dt.as_secs_f64());
                            r.cpu_seconds = u.cpu_seconds;
                            r.at = now;
                        }
                    }
                }
            }
        }
        self.rates.retain(|n, _| view.vms.contains_key(n));
    }

    /// The policy's model of the cluster: live hosts (taking VMs unless paused, draining or
    /// fenced) and running VMs with their measured CPU; a VM without a rate yet, migrating, or
    /// moved less than `cooldown` ago is not movable.
    pub fn model(
        &self,
        view: &View,
        cooldown: Duration,
        now_unix: u64,
        power: &PowerConfig,
    ) -> Model {
        let mut hosts: Vec<Host> = view
            .hosts
            .values()
            .map(|h| {
                let adm = view.admin.get(&h.name);
                Host {
                    name: h.name.clone(),
                    cores: f64::from(h.cores.max(1)),
                    memory_mib: h.memory_mib,
                    on: !adm.is_some_and(|a| a.standing_by()),
                    accepts: view.accepts(&h.name),
                    switchable: power.drives(&h.name),
                }
            })
            .collect();
        // Hosts the cluster switched off: capacity it can switch on again.
        for (name, adm) in &view.admin {
            if view.hosts.contains_key(name) || !adm.standing_by() {
                continue;
            }
            let Some(c) = adm.capacity else {
                continue;
            };
            hosts.push(Host {
                name: name.clone(),
                cores: f64::from(c.cores.max(1)),
                memory_mib: c.memory_mib,
                on: false,
                accepts: false,
                switchable: power.drives(name),
            });
        }
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        let recently_moved = |vm: &str| {
            view.migrations.iter().any(|m| {
                m.vm == vm
                    && m.finished
                        .is_some_and(|f| now_unix.saturating_sub(f) < cooldown.as_secs())
            })
        };
        let mut vms: Vec<Vm> = view
            .vms
            .values()
            .filter(|v| v.desired == Desired::Running)
            .filter_map(|v| {
                let owner = v.owner.clone().filter(|o| view.hosts.contains_key(o))?;
                let rate = self.rates.get(&v.config.name);
                let cores = rate.and_then(|r| r.cores);
                let moving = view.active_migration(&v.config.name);
                Some(Vm {
                    name: v.config.name.clone(),
                    // A VM being moved counts where it is going: two decisions never count on
                    // the same room.
                    host: moving
                        .map(|m| m.to.clone())
                        .filter(|to| view.hosts.contains_key(to))
                        .unwrap_or(owner),
                    cpu: cores.unwrap_or(0.0).max(0.0),
                    memory_mib: v.config.memory_mib,
                    dirty_mib_s: rate.map_or(0.0, |r| r.dirty_mib_s),
                    movable: cores.is_some() && moving.is_none() && !recently_moved(&v.config.name),
                    migrating: moving.is_some(),
                })
            })
            .collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Model { hosts, vms }
    }

    /// One balancing step of a coordinator pass: every `interval_s` it computes the moves,
    /// publishes them and, in `auto`, queues them (none while an earlier balancing migration is
    /// still queued or running). Returns whether it queued any (the pass then reads the store
    /// again before admitting).
    pub async fn step(
        &mut self,
        db: &Db,
        view: &View,
        cfg: &BalanceConfig,
        power: &PowerConfig,
    ) -> Result<bool, ClusterError> {
        let t = Instant::now();
        self.observe(view, t);
        if self
            .last
            .is_some_and(|l| t.duration_since(l) < Duration::from_secs(cfg.interval_s))
        {
            return Ok(false);
        }
        self.last = Some(t);
        let policy = policy(db, cfg, power).await?;
        if policy.balance == BalanceMode::Off {
            return Ok(false);
        }
        let model = self.model(view, Duration::from_secs(cfg.cooldown_s), now(), power);
        let params = BalanceParams {
            threshold: policy.threshold,
            max_moves: MAX_MOVES,
            ..Default::default()
        };
        let fits = |vm: &Vm, h: &Host| {
            view.vms
                .get(&vm.name)
                .is_some_and(|rec| view.unfit(&h.name, rec, 0).is_none())
        };
        let moves = balance::balance(&model, &params, fits);
        let rec = RecommendationsRecord {
            at: now(),
            imbalance: balance::imbalance(&model),
            target: balance::target(policy.threshold),
            moves: moves
                .iter()
                .map(|m| recommendation(m, format!("ferry cluster recommendations apply {}", m.vm)))
                .collect(),
        };
        put_recommendations(db, &rec).await?;
        if policy.balance != BalanceMode::Auto {
            return Ok(false);
        }
        let balancing = view
            .migrations
            .iter()
            .any(|m| m.reason == "balance" && !m.state.done());
        if balancing {
            return Ok(false);
        }
        let mut queued = false;
        for m in &moves {
            if view.active_migration(&m.vm).is_some() {
                continue;
            }
            info!("balance: {} {} -> {}: {}", m.vm, m.from, m.to, m.reason);
            db.queue_migration(
                &m.vm,
                &m.from,
                &m.to,
                "balance",
                Default::default(),
                Some(m.reason.clone()),
            )
            .await?;
            queued = true;
        }
        Ok(queued)
    }
}

/// A move of the policy as published, with the command that carries it out.
pub fn recommendation(m: &balance::Move, command: String) -> Recommendation {
    Recommendation {
        vm: m.vm.clone(),
        from: m.from.clone(),
        to: m.to.clone(),
        before: m.before,
        after: m.after,
        reason: m.reason.clone(),
        command,
    }
}

/// The cluster's policy: the store's record, or this agent's `[balance]` and `[power]`.
pub async fn policy(
    db: &Db,
    balance: &BalanceConfig,
    power: &PowerConfig,
) -> Result<PolicyRecord, ClusterError> {
    Ok(match db.get::<PolicyRecord>(&policy_key()).await? {
        Some((_, p)) => p,
        None => PolicyRecord {
            balance: balance.mode,
            threshold: balance.threshold,
            power: power.mode,
        },
    })
}

/// Writes the recommendations record (whatever its revision: only the coordinator writes it).
async fn put_recommendations(db: &Db, rec: &RecommendationsRecord) -> Result<(), ClusterError> {
    let key = recommendations_key();
    let rev = db.store.get(&key).await?.map_or(0, |kv| kv.mod_revision);
    db.store
        .compare_and_put(&key, rev, encode(rec)?, None)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::tests::{host, view, vm_with_nic};

    #[test]
    fn the_model_takes_cpu_from_two_readings_and_the_dirty_rate_as_reported() {
        let usage = |cpu_seconds: f64| VmUsage {
            name: "a".into(),
            cpu_seconds,
            rss_mib: 64,
            dirty_bytes_per_second: Some(32.0 * (1 << 20) as f64),
        };
        let mut h = host("h1", &["br-lan"]);
        h.vm_usage = vec![usage(10.0)];
        let mut v = view(vec![h]);
        let mut rec = vm_with_nic("br-lan");
        rec.owner = Some("h1".into());
        v.vms.insert("a".into(), rec);
        let mut b = Balancer::default();
        let t0 = Instant::now();
        b.observe(&v, t0);
        let m = b.model(&v, Duration::from_secs(60), 0, &PowerConfig::default());
        assert_eq!(m.vms.len(), 1);
        assert!(!m.vms[0].movable, "no CPU rate yet: {:?}", m.vms[0]);
        assert_eq!(m.vms[0].dirty_mib_s, 32.0);
        // 3 CPU seconds in 6 s: half a core.
        if let Some(h) = v.hosts.get_mut("h1") {
            h.vm_usage = vec![usage(13.0)];
        }
        b.observe(&v, t0 + Duration::from_secs(6));
        let m = b.model(&v, Duration::from_secs(60), 0, &PowerConfig::default());
        assert!((m.vms[0].cpu - 0.5).abs() < 1e-9, "{:?}", m.vms[0]);
        assert!(m.vms[0].movable);
    }
}
