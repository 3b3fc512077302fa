//! `ferryd`'s configuration: one TOML file (`docs/cluster.md` lists every key).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::ClusterError;

/// Where the cluster state lives.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// One host, no cluster: a file.
    Embedded {
        /// The store file.
        path: PathBuf,
    },
    /// An etcd cluster.
    Etcd {
        /// Client URLs (`http://HOST:PORT`).
        endpoints: Vec<String>,
    },
}

/// Cluster-wide limits (every host should carry the same; the coordinator's apply).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Live migrations at once across the cluster; 0: half the live hosts, rounded down
    /// (at least one).
    #[serde(default)]
    pub max_migrations: u32,
    /// Live migrations at once per host, as source or destination.
    #[serde(default = "one")]
    pub per_host: u32,
}

fn one() -> u32 {
    1
}

/// Load balancing (`[balance]`): the mode and threshold the cluster starts with (`ferry
/// cluster balance` changes them for the whole cluster, in the store), how often the
/// coordinator looks, and how long a moved VM is left alone.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceConfig {
    /// `off`, `manual` (recommend) or `auto` (migrate).
    #[serde(default)]
    pub mode: crate::records::BalanceMode,
    /// 1 (conservative) to 5 (aggressive).
    #[serde(default = "three")]
    pub threshold: u8,
    /// Seconds between the coordinator's balancing passes.
    #[serde(default = "sixty")]
    pub interval_s: u64,
    /// Seconds a VM moved by balancing is not moved again by it.
    #[serde(default = "six_hundred")]
    pub cooldown_s: u64,
}

fn three() -> u8 {
    3
}
fn sixty() -> u64 {
    60
}
fn six_hundred() -> u64 {
    600
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            mode: Default::default(),
            threshold: 3,
            interval_s: 60,
            cooldown_s: 600,
        }
    }
}

/// Power consolidation (`[power]`): the mode the cluster starts with (`ferry cluster power`
/// changes it for the whole cluster), the band of cluster load it keeps, how long the load must
/// stay out of it, and each host's power driver: shell commands, `{host}` replaced by the
/// host's name, run by the coordinator (every host should carry the same table).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerConfig {
    /// `off`, `manual` (advise) or `auto` (switch hosts off and on).
    #[serde(default)]
    pub mode: crate::records::BalanceMode,
    /// Below this cluster load (CPU demand over the cores that are on) a host may go off.
    #[serde(default = "low")]
    pub low: f64,
    /// Above it a standby host comes on; no evacuation fills a host past it.
    #[serde(default = "high")]
    pub high: f64,
    /// Hosts always kept on.
    #[serde(default = "two")]
    pub min_on: usize,
    /// Seconds the load must stay below `low` before a host is switched off.
    #[serde(default = "forty_minutes")]
    pub off_after_s: u64,
    /// Seconds it must stay above `high` before a host is switched on.
    #[serde(default = "five_minutes")]
    pub on_after_s: u64,
    /// Seconds a host switched on has to join before it is reported as not coming back.
    #[serde(default = "six_hundred")]
    pub wake_timeout_s: u64,
    /// Switches a host on (e.g. `ipmitool -I lanplus -H {host}-bmc -U admin -f /etc/ferry/ipmi
    /// chassis power on`, or `wakeonlan …`).
    #[serde(default)]
    pub on: Option<String>,
    /// Switches a host off (e.g. `ssh {host} systemctl poweroff`).
    #[serde(default)]
    pub off: Option<String>,
    /// Per-host drivers, overriding `on` and `off`.
    #[serde(default)]
    pub hosts: std::collections::BTreeMap<String, PowerDriver>,
}

/// One host's power driver.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerDriver {
    /// Switches it on.
    #[serde(default)]
    pub on: Option<String>,
    /// Switches it off.
    #[serde(default)]
    pub off: Option<String>,
}

fn low() -> f64 {
    0.45
}
fn high() -> f64 {
    0.81
}
fn two() -> usize {
    2
}
fn forty_minutes() -> u64 {
    40 * 60
}
fn five_minutes() -> u64 {
    5 * 60
}

impl Default for PowerConfig {
    fn default() -> Self {
        PowerConfig {
            mode: Default::default(),
            low: low(),
            high: high(),
            min_on: two(),
            off_after_s: forty_minutes(),
            on_after_s: five_minutes(),
            wake_timeout_s: six_hundred(),
            on: None,
            off: None,
            hosts: Default::default(),
        }
    }
}

impl PowerConfig {
    /// The command that switches `host` on (`on == true`) or off, `{host}` filled in.
    pub fn command(&self, host: &str, on: bool) -> Option<String> {
        let d = self.hosts.get(host);
        let c = if on {
            d.and_then(|d| d.on.as_ref()).or(self.on.as_ref())
        } else {
            d.and_then(|d| d.off.as_ref()).or(self.off.as_ref())
        };
        c.map(|c| c.replace("{host}", host))
    }

    /// Whether the cluster can switch `host` both off and on again.
    pub fn drives(&self, host: &str) -> bool {
        self.command(host, true).is_some() && self.command(host, false).is_some()
    }

    /// The policy's parameters.
    pub fn params(&self) -> crate::balance::PowerParams {
        crate::balance::PowerParams {
            low: self.low,
            high: self.high,
            min_on: self.min_on,
            off_after_s: self.off_after_s,
            on_after_s: self.on_after_s,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_migrations: 0,
            per_host: 1,
        }
    }
}

/// The agent's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's name in the cluster.
    pub host: String,
    /// Address the REST API listens on.
    pub listen: String,
    /// URL other hosts and the CLI reach the API at (default: `http://` + `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Address receiving workers listen on for incoming migrations (the migration network).
    pub migration_ip: String,
    /// The shared directory every host sees (VM console logs, and disks).
    pub shared_dir: PathBuf,
    /// This host's run directory for worker sockets.
    pub run_dir: PathBuf,
    /// File holding the cluster's API token.
    pub token_file: PathBuf,
    /// This host's TLS identity for migrations (`ferry pki`); absent: migrations in the clear.
    #[serde(default)]
    pub pki_dir: Option<PathBuf>,
    /// Lease time-to-live in seconds: a host silent this long is dead; it fences itself
    /// (stops its VMs) before that.
    #[serde(default = "default_ttl")]
    pub lease_ttl_s: u64,
    /// The store.
    pub store: StoreConfig,
    /// Limits.
    #[serde(default)]
    pub limits: Limits,
    /// Load balancing.
    #[serde(default)]
    pub balance: BalanceConfig,
    /// Power consolidation.
    #[serde(default)]
    pub power: PowerConfig,
    /// Logical CPUs this host offers VMs (default: all it has); the capacity balancing and
    /// power consolidation count.
    #[serde(default)]
    pub vm_cores: Option<u32>,
}

fn default_ttl() -> u64 {
    5
}

impl AgentConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<AgentConfig, ClusterError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ClusterError::Config(format!("cannot read {}: {e}", path.display())))?;
        let c: AgentConfig = toml::from_str(&text)
            .map_err(|e| ClusterError::Config(format!("{}: {e}", path.display())))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks values.
    pub fn validate(&self) -> Result<(), ClusterError> {
        vmm::config::validate_name(&self.host)
            .map_err(|e| ClusterError::Config(format!("host: {e}")))?;
        if self.lease_ttl_s < 3 {
            return Err(ClusterError::Config(
                "lease_ttl_s must be at least 3 (the host fences itself a second before it expires)"
                    .into(),
            ));
        }
        if !(1..=5).contains(&self.balance.threshold) {
            return Err(ClusterError::Config(
                "balance.threshold must be 1 (conservative) to 5 (aggressive)".into(),
            ));
        }
        let p = &self.power;
        if !((0.0..1.0).contains(&p.low) && p.low < p.high && p.high <= 1.0) {
            return Err(ClusterError::Config(
                "power.low and power.high must satisfy 0 <= low < high <= 1 (fractions of the cores that are on)"
                    .into(),
            ));
        }
        if p.min_on == 0 {
            return Err(ClusterError::Config(
                "power.min_on must be at least 1".into(),
            ));
        }
        if self.vm_cores == Some(0) {
            return Err(ClusterError::Config("vm_cores must be at least 1".into()));
        }
        if self.limits.per_host == 0 {
            return Err(ClusterError::Config(
                "limits.per_host must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_s)
    }

    /// The API URL others use.
    pub fn api_url(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
    }

    /// The API token.
    pub fn token(&self) -> Result<String, ClusterError> {
        let t = std::fs::read_to_string(&self.token_file).map_err(|e| {
            ClusterError::Config(format!("cannot read {}: {e}", self.token_file.display()))
        })?;
        let t = t.trim().to_string();
        if t.len() < 16 {
            return Err(ClusterError::Config(format!(
                "the token in {} is shorter than 16 characters",
                self.token_file.display()
            )));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_drivers_fill_in_the_host_and_per_host_ones_win() {
        let text = r#"
host = "h1"
listen = "127.0.0.1:7400"
migration_ip = "127.0.0.1"
shared_dir = "/srv/ferry"
run_dir = "/run/ferry"
token_file = "/etc/ferry/token"
vm_cores = 8
[store]
kind = "etcd"
endpoints = ["http://127.0.0.1:2379"]
[power]
on = "ipmitool -H {host}-bmc chassis power on"
off = "ssh {host} systemctl poweroff"
[power.hosts.h7]
on = "wakeonlan 52:54:00:12:34:07"
"#;
        let c: AgentConfig = toml::from_str(text).unwrap();
        c.validate().unwrap();
        let p = &c.power;
        assert_eq!(
            p.command("h2", true).as_deref(),
            Some("ipmitool -H h2-bmc chassis power on")
        );
        assert_eq!(
            p.command("h7", true).as_deref(),
            Some("wakeonlan 52:54:00:12:34:07")
        );
        assert_eq!(
            p.command("h7", false).as_deref(),
            Some("ssh h7 systemctl poweroff")
        );
        assert!(p.drives("h7"));
        assert_eq!(p.params().low, 0.45);
        assert_eq!(c.vm_cores, Some(8));
        // No driver: nothing to run.
        assert!(!PowerConfig::default().drives("h1"));
        // A band upside down, unknown keys: refused.
        let bad: AgentConfig =
            toml::from_str(&text.replace("[power]", "[power]\nlow = 0.9\nhigh = 0.5")).unwrap();
        assert!(bad.validate().is_err());
        assert!(
            toml::from_str::<AgentConfig>(&text.replace("[power]", "[power]\nlwo = 0.1")).is_err()
        );
    }
}
