//! The coordinator's power step (after VMware DPM): keeps the cluster's load inside the band of
//! `[power]` by switching hosts off when it stays low and on again when it stays high (or a VM
//! cannot be placed), through each host's power driver. The decision is the pure policy of
//! [`crate::balance::power`] over the same model balancing uses; this module carries it out as
//! a sequence of recorded states in the host's admin record:
//!
//! `on` → `evacuating` (draining by live migration, reason `consolidate`) → `standby` (the
//! driver's `off` ran) → `wake` (asked to come on) → `waking` (the driver's `on` ran) → `on`
//! (its agent joined). A host in `standby`, `wake` or `waking` is neither failed nor fenced:
//! it has no VMs, so nothing is restarted for it. Nothing is decided while a host is
//! being switched on; up to [`balance::max_evacuating`] hosts are emptied at once.

use std::time::Duration;

use tracing::{info, warn};

use crate::balance::{self, Power, PowerWindow};
use crate::balancing::{policy, recommendation, Balancer};
use crate::config::{AgentConfig, PowerConfig};
use crate::db::Db;
use crate::records::*;
use crate::view::View;
use crate::ClusterError;

/// How long a power driver's command may run.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(60);
/// The advice record is rewritten at least this often while it says the same.
const ADVICE_EVERY_S: u64 = 5;

/// Why a power driver did not do its job.
#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    /// `[power]` has no command for it.
    #[error("no power driver switches host {host} {way} (set [power] {way} or [power.hosts.{host}] {way})")]
    NoDriver {
        /// The host.
        host: String,
        /// `on` or `off`.
        way: &'static str,
    },
    /// The command could not be started.
    #[error("cannot run the power driver `{command}`: {source}")]
    Spawn {
        /// The command.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The command failed.
    #[error("the power driver `{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command.
        command: String,
        /// Its exit status.
        status: String,
        /// The end of what it wrote to stderr.
        stderr: String,
    },
    /// The command did not end in time.
    #[error("the power driver `{command}` did not end within {}s", DRIVER_TIMEOUT.as_secs())]
    Timeout {
        /// The command.
        command: String,
    },
}

/// Runs host `host`'s driver to switch it on or off.
pub async fn switch(cfg: &PowerConfig, host: &str, on: bool) -> Result<(), PowerError> {
    let way = if on { "on" } else { "off" };
    let command = cfg.command(host, on).ok_or_else(|| PowerError::NoDriver {
        host: host.to_string(),
        way,
    })?;
    info!("power: switching {host} {way}: {command}");
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .env("FERRY_POWER_HOST", host)
        .env("FERRY_POWER", way)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| PowerError::Spawn {
            command: command.clone(),
            source,
        })?;
    let out = tokio::time::timeout(DRIVER_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| PowerError::Timeout {
            command: command.clone(),
        })?
        .map_err(|source| PowerError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr
        .trim()
        .chars()
        .rev()
        .take(400)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(PowerError::Failed {
        command,
        status: out.status.to_string(),
        stderr: tail,
    })
}

/// The coordinator's power state between passes.
#[derive(Debug, Default)]
pub struct PowerManager {
    window: PowerWindow,
    /// What the advice record last said (its figures left out), and when it was written.
    last_advice: Option<(String, u64)>,
}

impl PowerManager {
    /// One power step of a coordinator pass: carries on what is under way, then (in `manual`
    /// and `auto`) decides. `unplaceable`: some VM found no host this pass. Returns whether it
    /// queued migrations (the pass then reads the store again before admitting).
    pub async fn step(
        &mut self,
        db: &Db,
        view: &View,
        balancer: &Balancer,
        cfg: &AgentConfig,
        unplaceable: bool,
    ) -> Result<bool, ClusterError> {
        let busy = carry_on(db, view, cfg).await?;
        let policy = policy(db, &cfg.balance, &cfg.power).await?;
        if policy.power == BalanceMode::Off {
            self.window.reset();
            return Ok(false);
        }
        let t = now();
        let model = balancer.model(
            view,
            Duration::from_secs(cfg.balance.cooldown_s),
            t,
            &cfg.power,
        );
        let pressure = balance::pressure(&model);
        let load = pressure.load;
        let params = cfg.power.params();
        // The windows keep watching the load while hosts change state (as DPM's demand
        // history does). Nothing is decided while a host is being switched on; up to
        // `max_evacuating` hosts are emptied at once (each sends one migration at a time),
        // each decided on a model that counts the VMs being moved where they are going.
        let mut way = self.window.observe(t, &pressure, &params);
        let on = model.hosts.iter().filter(|h| h.on).count();
        let limit = balance::max_evacuating(on);
        let held = match (&busy.waking, busy.evacuating.len()) {
            (Some(what), _) => Some(what.clone()),
            (None, n) if n >= limit && way != Some(true) => Some(format!(
                "{} being emptied to be switched off (at most {limit} at once)",
                busy.evacuating.join(", ")
            )),
            _ => None,
        };
        if let Some(what) = held {
            let advice = PowerAdviceRecord {
                at: t,
                load,
                low: cfg.power.low,
                high: cfg.power.high,
                action: "hold".into(),
                reason: format!("{what}; nothing else is switched meanwhile"),
                ..Default::default()
            };
            self.publish(db, &advice).await?;
            return Ok(false);
        }
        let standby = model.hosts.iter().any(|h| !h.on && h.switchable);
        if unplaceable && standby {
            way = Some(true);
        }
        let fits = |vm: &balance::Vm, h: &balance::Host| {
            view.vms
                .get(&vm.name)
                .is_some_and(|rec| view.unfit(&h.name, rec, 0).is_none())
        };
        let decision = match way {
            Some(w) => balance::power(&model, &params, w, fits),
            None => Power::Hold,
        };
        let mut advice = PowerAdviceRecord {
            at: t,
            load,
            low: params.low,
            high: params.high,
            action: "hold".into(),
            ..Default::default()
        };
        match &decision {
            Power::Hold => {
                advice.reason = if load < params.low {
                    format!(
                        "cluster load {:.0}% is below {:.0}%; a host is switched off after {}s below it, if its VMs fit elsewhere within the HA reserve",
                        load * 100.0,
                        params.low * 100.0,
                        params.off_after_s
                    )
                } else if load > params.high {
                    format!(
                        "cluster load {:.0}% is above {:.0}%; a standby host is switched on after {}s above it{}",
                        load * 100.0,
                        params.high * 100.0,
                        params.on_after_s,
                        if standby { "" } else { " (none is in standby)" }
                    )
                } else if pressure.without_one <= params.target() {
                    format!(
                        "cluster load {:.0}%: one host fewer would carry it at {:.0}% (target {:.0}%); a host is switched off after {}s so, if its VMs fit elsewhere within the HA reserve",
                        load * 100.0,
                        pressure.without_one * 100.0,
                        params.target() * 100.0,
                        params.off_after_s
                    )
                } else {
                    format!(
                        "cluster load {:.0}% is within {:.0}–{:.0}%",
                        load * 100.0,
                        params.low * 100.0,
                        params.high * 100.0
                    )
                };
            }
            Power::Off {
                host,
                moves,
                reason,
            } => {
                advice.action = "standby".into();
                advice.hosts = vec![host.clone()];
                advice.reason = reason.clone();
                advice.moves = moves
                    .iter()
                    .map(|m| recommendation(m, format!("ferry vm migrate {} --to {}", m.vm, m.to)))
                    .collect();
                advice.commands = vec![format!("ferry host standby {host}")];
            }
            Power::On { hosts, reason } => {
                advice.action = "wake".into();
                advice.hosts = hosts.clone();
                advice.reason = reason.clone();
                advice.commands = hosts
                    .iter()
                    .map(|h| format!("ferry host wake {h}"))
                    .collect();
            }
        }
        self.publish(db, &advice).await?;
        if policy.power != BalanceMode::Auto {
            return Ok(false);
        }
        match decision {
            Power::Hold => Ok(false),
            Power::Off {
                host,
                moves,
                reason,
            } => {
                let wrote = db
                    .update::<HostAdmin, _>(&admin_key(&host), |r| {
                        if r.power != PowerState::On || r.draining {
                            return false;
                        }
                        *r = evacuating(reason.clone());
                        true
                    })
                    .await?
                    || db
                        .store
                        .compare_and_put(
                            &admin_key(&host),
                            0,
                            encode(&evacuating(reason.clone()))?,
                            None,
                        )
                        .await?;
                if !wrote {
                    return Ok(false);
                }
                info!("power: emptying {host} to switch it off: {reason}");
                for m in &moves {
                    db.queue_migration(
                        &m.vm,
                        &m.from,
                        &m.to,
                        "consolidate",
                        Default::default(),
                        Some(reason.clone()),
                    )
                    .await?;
                }
                Ok(!moves.is_empty())
            }
            Power::On { hosts, reason } => {
                for h in &hosts {
                    if request_wake(db, h, &reason).await? {
                        info!("power: switching {h} on: {reason}");
                    }
                }
                Ok(false)
            }
        }
    }

    /// Writes the advice record when it changed, or every few seconds.
    async fn publish(&mut self, db: &Db, advice: &PowerAdviceRecord) -> Result<(), ClusterError> {
        // The gist: action, hosts and reason without its figures (the load moves every pass).
        let gist: String = format!("{} {:?} {}", advice.action, advice.hosts, advice.reason)
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .collect();
        let same = self
            .last_advice
            .as_ref()
            .is_some_and(|(g, at)| *g == gist && advice.at < at + ADVICE_EVERY_S);
        if same {
            return Ok(());
        }
        let key = power_advice_key();
        let rev = db.store.get(&key).await?.map_or(0, |kv| kv.mod_revision);
        db.store
            .compare_and_put(&key, rev, encode(advice)?, None)
            .await?;
        self.last_advice = Some((gist, advice.at));
        Ok(())
    }
}

/// The admin record of a host being emptied to be switched off.
pub fn evacuating(reason: String) -> HostAdmin {
    HostAdmin {
        paused: true,
        draining: true,
        power: PowerState::Evacuating,
        power_since: now(),
        power_note: Some(reason),
        capacity: None,
    }
}

/// Asks the coordinator to switch standby host `h` on. Whether it was in standby.
pub async fn request_wake(db: &Db, h: &str, reason: &str) -> Result<bool, ClusterError> {
    db.update::<HostAdmin, _>(&admin_key(h), |r| {
        if r.power != PowerState::Standby {
            return false;
        }
        r.power = PowerState::Wake;
        r.power_since = now();
        r.power_note = Some(reason.to_string());
        true
    })
    .await
}

/// What is under way after [`carry_on`].
#[derive(Debug, Default)]
struct UnderWay {
    /// A host being switched on, in words (no new decision is taken then).
    waking: Option<String>,
    /// The hosts still being emptied.
    evacuating: Vec<String>,
}

/// Takes host `key` back from power state `from` to `to`, with the reason in its note — nothing
/// if another pass moved it on meanwhile. A host no longer being emptied stops draining.
async fn fall_back(
    db: &Db,
    key: &str,
    from: PowerState,
    to: PowerState,
    note: String,
) -> Result<(), ClusterError> {
    db.update::<HostAdmin, _>(key, |r| {
        if r.power != from {
            return false;
        }
        r.power = to;
        r.power_since = now();
        r.power_note = Some(note.clone());
        if from == PowerState::Evacuating {
            r.draining = false;
        }
        true
    })
    .await?;
    Ok(())
}

/// Carries on what is under way: an emptied host is switched off, a host asked to wake is
/// switched on, one that does not join in time is reported. Returns what is still under way.
async fn carry_on(db: &Db, view: &View, cfg: &AgentConfig) -> Result<UnderWay, ClusterError> {
    let mut busy = UnderWay::default();
    let t = now();
    let mut names: Vec<&String> = view.admin.keys().collect();
    names.sort();
    for h in names {
        let adm = &view.admin[h];
        let key = admin_key(h);
        match adm.power {
            PowerState::On => {}
            PowerState::Evacuating => {
                let Some(rec) = view.hosts.get(h) else {
                    // It died while being emptied: a failed host like any other.
                    fall_back(
                        db,
                        &key,
                        PowerState::Evacuating,
                        PowerState::On,
                        "it went down while being emptied".into(),
                    )
                    .await?;
                    continue;
                };
                let has_vms = view.vms.values().any(|v| {
                    v.owner.as_deref() == Some(h.as_str()) && v.desired == Desired::Running
                });
                let moving = view
                    .migrations
                    .iter()
                    .any(|m| !m.state.done() && (m.from == *h || m.to == *h));
                if has_vms || moving {
                    busy.evacuating.push(h.clone());
                    continue;
                }
                let capacity = Capacity {
                    cores: rec.cores,
                    memory_mib: rec.memory_mib,
                };
                // Recorded before the driver runs: the host may be the coordinator itself.
                let wrote = db
                    .update::<HostAdmin, _>(&key, |r| {
                        if r.power != PowerState::Evacuating {
                            return false;
                        }
                        r.power = PowerState::Standby;
                        r.power_since = t;
                        r.draining = false;
                        r.paused = false;
                        r.capacity = Some(capacity);
                        true
                    })
                    .await?;
                if !wrote {
                    continue;
                }
                if let Err(e) = switch(&cfg.power, h, false).await {
                    warn!("power: {h} stays on: {e}");
                    fall_back(
                        db,
                        &key,
                        PowerState::Standby,
                        PowerState::On,
                        format!("could not be switched off: {e}"),
                    )
                    .await?;
                } else {
                    info!("power: {h} is switched off (standby)");
                }
            }
            PowerState::Standby => {
                // Switched off, yet its agent still reports: the driver did not work.
                let timeout = cfg.power.wake_timeout_s.max(cfg.lease_ttl_s * 2);
                if view.hosts.contains_key(h) && t.saturating_sub(adm.power_since) > timeout {
                    fall_back(
                        db,
                        &key,
                        PowerState::Standby,
                        PowerState::On,
                        format!("still running {timeout}s after its power driver switched it off"),
                    )
                    .await?;
                }
            }
            PowerState::Wake => {
                busy.waking = Some(format!("{h} is being switched on"));
                let r = switch(&cfg.power, h, true).await;
                db.update::<HostAdmin, _>(&key, |a| {
                    if a.power != PowerState::Wake {
                        return false;
                    }
                    a.power_since = now();
                    match &r {
                        Ok(()) => a.power = PowerState::Waking,
                        Err(e) => {
                            a.power = PowerState::Standby;
                            a.power_note = Some(format!("could not be switched on: {e}"));
                        }
                    }
                    true
                })
                .await?;
                if let Err(e) = r {
                    warn!("power: {h} stays in standby: {e}");
                }
            }
            PowerState::Waking => {
                busy.waking = Some(format!(
                    "{h} is being switched on (waiting for its agent to join)"
                ));
                let timeout = cfg.power.wake_timeout_s;
                if t.saturating_sub(adm.power_since) > timeout {
                    warn!("power: {h} did not join within {timeout}s of being switched on");
                    fall_back(
                        db,
                        &key,
                        PowerState::Waking,
                        PowerState::Standby,
                        format!("did not join within {timeout}s of being switched on"),
                    )
                    .await?;
                }
            }
        }
    }
    Ok(busy)
}
