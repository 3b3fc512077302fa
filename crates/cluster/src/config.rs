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
