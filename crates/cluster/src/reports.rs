//! The reports (`ferry report …`, `/v1/reports/…`): utilization per host and VM from every
//! host's own history (asked of each live host), where a VM could go and why each host fits
//! or not, and what the cluster's migrations were and cost. Any host answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::agent::Agent;
use crate::history::HostUtilization;
use crate::peer::{self, Method};
use crate::records::*;
use crate::view::View;
use crate::ClusterError;

/// A period given as `90s`, `30m`, `1h`, `1d` or plain seconds.
pub fn parse_period(s: &str) -> Result<u64, ClusterError> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| {
        ClusterError::Request(
            400,
            format!("period {s:?}: a number with s, m, h or d (30m, 1h, 1d)"),
        )
    })?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(ClusterError::Request(
                400,
                format!("period {s:?}: unknown unit {other:?} (s, m, h or d)"),
            ))
        }
    };
    if n == 0 {
        return Err(ClusterError::Request(400, format!("period {s:?} is empty")));
    }
    Ok(n.saturating_mul(mult))
}

/// `GET /v1/reports/utilization`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UtilizationReport {
    /// The period, seconds back from now.
    pub since_s: u64,
    /// Every live host that answered.
    pub hosts: Vec<HostUtilization>,
    /// Live hosts that did not answer, with why.
    pub unreachable: BTreeMap<String, String>,
}

impl Agent {
    /// Every live host's utilization over the last `since_s` seconds.
    pub async fn utilization_report(
        &self,
        since_s: u64,
    ) -> Result<UtilizationReport, ClusterError> {
        let view = View::read(&self.db).await?;
        let since = now().saturating_sub(since_s);
        let mut hosts = Vec::new();
        let mut unreachable = BTreeMap::new();
        let mut names: Vec<&String> = view.hosts.keys().collect();
        names.sort();
        // Every other host is asked at once; the answers are taken in the hosts' order.
        let asked: Vec<_> = names
            .into_iter()
            .map(|h| {
                let call = (h != self.host()).then(|| {
                    let url = format!(
                        "{}/v1/internal/utilization?since={since}",
                        view.hosts[h].api
                    );
                    let token = self.token.clone();
                    tokio::task::spawn_blocking(move || peer::call(&url, &token, Method::Get, None))
                });
                (h, call)
            })
            .collect();
        for (h, call) in asked {
            let Some(call) = call else {
                hosts.push(self.utilization(since));
                continue;
            };
            let r = call
                .await
                .map_err(|e| ClusterError::Request(500, format!("the call to {h} failed: {e}")))?;
            match r.map(serde_json::from_value::<HostUtilization>) {
                Ok(Ok(u)) => hosts.push(u),
                Ok(Err(e)) => {
                    unreachable.insert(h.clone(), format!("bad answer: {e}"));
                }
                Err(e) => {
                    unreachable.insert(h.clone(), e.to_string());
                }
            }
        }
        Ok(UtilizationReport {
            since_s,
            hosts,
            unreachable,
        })
    }
}

/// Percentiles of a measure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// Highest.
    pub max: f64,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> Percentiles {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Percentiles {
            p50: at(0.5),
            p95: at(0.95),
            max: v[v.len() - 1],
        }
    }
}

/// `GET /v1/reports/migrations`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationsReport {
    /// The period, seconds back from now.
    pub since_s: u64,
    /// Migrations requested in it.
    pub count: usize,
    /// By reason (`user`, `drain`, `failback`, `balance`, `consolidate`).
    pub by_reason: BTreeMap<String, usize>,
    /// By state.
    pub by_state: BTreeMap<String, usize>,
    /// Total time of the successful ones, ms.
    pub total_ms: Percentiles,
    /// Their downtime, ms.
    pub downtime_ms: Percentiles,
}

/// What the cluster's migrations requested after `since` (unix time) were and cost.
pub fn migrations_report(view: &View, since_s: u64, now_unix: u64) -> MigrationsReport {
    let since = now_unix.saturating_sub(since_s);
    let mut r = MigrationsReport {
        since_s,
        ..Default::default()
    };
    let (mut total, mut down) = (Vec::new(), Vec::new());
    for m in view.migrations.iter().filter(|m| m.requested >= since) {
        r.count += 1;
        *r.by_reason.entry(m.reason.clone()).or_default() += 1;
        let state = serde_json::to_value(m.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        *r.by_state.entry(state).or_default() += 1;
        if let Some(rep) = m
            .report
            .as_ref()
            .filter(|_| m.state == MigrationState::Succeeded)
        {
            if let Some(t) = rep["total_ms"].as_f64() {
                total.push(t);
            }
            if let Some(d) = rep["downtime_ms"].as_f64() {
                down.push(d);
            }
        }
    }
    r.total_ms = Percentiles::of(total);
    r.downtime_ms = Percentiles::of(down);
    r
}

/// One host as a destination for a VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The host.
    pub host: String,
    /// Whether the VM may go there now.
    pub fits: bool,
    /// Why not, or what to know (it runs there; a migration is already moving through it).
    pub why: Option<String>,
    /// Its CPU load now (cores in use over its cores), from its history.
    pub load_now: Option<f64>,
    /// Its load with the VM there.
    pub load_after: Option<f64>,
    /// Memory not yet promised to VMs, MiB.
    pub uncommitted_mib: Option<u64>,
}

/// `GET /v1/reports/placement/{vm}`: every host scored for the VM, best first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlacementReport {
    /// The VM.
    pub vm: String,
    /// Where it runs.
    pub host: Option<String>,
    /// Its CPU use now, cores (from its host's history).
    pub cpu_cores: Option<f64>,
    /// Its memory, MiB.
    pub memory_mib: u64,
    /// Every host, those it fits best first (lowest load after the move).
    pub candidates: Vec<Candidate>,
}

/// Scores every host for VM `name` from the view and the hosts' utilization.
pub fn placement_report(
    view: &View,
    name: &str,
    util: &UtilizationReport,
) -> Result<PlacementReport, ClusterError> {
    let Some(v) = view.vms.get(name) else {
        return Err(ClusterError::Request(
            404,
            format!("no VM named {name:?} in the cluster"),
        ));
    };
    let by_host: BTreeMap<&str, &HostUtilization> =
        util.hosts.iter().map(|u| (u.host.as_str(), u)).collect();
    let cpu = v
        .owner
        .as_deref()
        .and_then(|o| by_host.get(o))
        .and_then(|u| {
            u.vms
                .iter()
                .find(|x| x.name == name)
                .map(|x| x.cpu_cores.now)
        });
    let mut names: Vec<String> = view.hosts.keys().cloned().collect();
    for (h, adm) in &view.admin {
        if !view.hosts.contains_key(h) && adm.standing_by() {
            names.push(h.clone());
        }
    }
    names.sort();
    let mut candidates: Vec<Candidate> = names
        .into_iter()
        .map(|h| {
            let u = by_host.get(h.as_str());
            let cores = u.map_or(0, |u| u.cores).max(1) as f64;
            let used = u.map(|u| u.cpu_cores.now);
            let here = v.owner.as_deref() == Some(h.as_str());
            let load_now = used.map(|c| c / cores);
            let load_after =
                used.map(|c| (c + if here { 0.0 } else { cpu.unwrap_or(0.0) }) / cores);
            let uncommitted_mib = view
                .hosts
                .get(&h)
                .map(|r| r.memory_mib.saturating_sub(view.committed_mib(&h)));
            let (fits, why) = if here {
                (false, Some("it runs here".to_string()))
            } else if !view.hosts.contains_key(&h) {
                (
                    false,
                    Some("in standby: power consolidation switches it on when needed".into()),
                )
            } else {
                match view.unfit(&h, v, 0) {
                    Some(why) => (false, Some(why)),
                    None => {
                        let busy = view.migrations.iter().any(|m| {
                            m.state == MigrationState::Running && (m.from == h || m.to == h)
                        });
                        if u.is_none() {
                            (true, Some("no utilization from it (unreachable)".into()))
                        } else if load_after.is_some_and(|l| l > 1.0) {
                            (
                                true,
                                Some("fits, but its CPU would be over-committed".into()),
                            )
                        } else if busy {
                            (
                                true,
                                Some(
                                    "fits; a migration through it runs now (this one would wait)"
                                        .into(),
                                ),
                            )
                        } else {
                            (true, None)
                        }
                    }
                }
            };
            Candidate {
                host: h,
                fits,
                why,
                load_now,
                load_after,
                uncommitted_mib,
            }
        })
        .collect();
    candidates.sort_by(|a, b| {
        b.fits
            .cmp(&a.fits)
            .then(
                a.load_after
                    .unwrap_or(f64::MAX)
                    .total_cmp(&b.load_after.unwrap_or(f64::MAX)),
            )
            .then(a.host.cmp(&b.host))
    });
    Ok(PlacementReport {
        vm: name.to_string(),
        host: v.owner.clone(),
        cpu_cores: cpu,
        memory_mib: v.config.memory_mib,
        candidates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_read_as_people_write_them_and_bad_ones_are_refused() {
        assert_eq!(parse_period("90s").unwrap(), 90);
        assert_eq!(parse_period("30m").unwrap(), 1800);
        assert_eq!(parse_period("1h").unwrap(), 3600);
        assert_eq!(parse_period("7d").unwrap(), 7 * 86_400);
        assert_eq!(parse_period("120").unwrap(), 120);
        for bad in ["", "h", "1w", "0h", "yesterday", "-1h"] {
            assert!(parse_period(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn percentiles_of_few_and_many() {
        assert_eq!(Percentiles::of(vec![]), Percentiles::default());
        let p = Percentiles::of(vec![5.0]);
        assert_eq!((p.p50, p.p95, p.max), (5.0, 5.0, 5.0));
        let p = Percentiles::of((1..=100).rev().map(f64::from).collect());
        assert_eq!((p.p50, p.p95, p.max), (51.0, 95.0, 100.0));
    }
}
