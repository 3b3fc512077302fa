//! What the cluster keeps in the store: one JSON record per key under [`PREFIX`], each with
//! a format version (`docs/cluster.md`). A record of another version is refused, never guessed.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use vmm::VmConfig;

use crate::ClusterError;

/// Every key of this format version starts with this.
pub const PREFIX: &str = "/ferry/v1/";
/// Version of every record.
pub const RECORD_VERSION: u32 = 1;

/// Key of host `h`'s live record (leased: gone when the host stops renewing).
pub fn host_key(h: &str) -> String {
    format!("{PREFIX}hosts/{h}")
}
/// Key of host `h`'s administrative state (persistent).
pub fn admin_key(h: &str) -> String {
    format!("{PREFIX}admin/{h}")
}
/// Key of VM `n`'s definition and ownership.
pub fn vm_key(n: &str) -> String {
    format!("{PREFIX}vms/{n}")
}
/// Key of the report that VM `n` runs on host `h` (leased by `h`).
pub fn running_key(n: &str, h: &str) -> String {
    format!("{PREFIX}running/{n}/{h}")
}
/// Key of migration `id` (zero-padded so that keys sort by id).
pub fn migration_key(id: u64) -> String {
    format!("{PREFIX}migrations/{id:010}")
}
/// The coordinator's key (leased by the coordinator).
pub fn coordinator_key() -> String {
    format!("{PREFIX}coordinator")
}
/// The migration id counter.
pub fn migration_seq_key() -> String {
    format!("{PREFIX}seq/migration")
}
/// Prefix of every live host record.
pub fn hosts_prefix() -> String {
    format!("{PREFIX}hosts/")
}
/// Prefix of every host's administrative state.
pub fn admin_prefix() -> String {
    format!("{PREFIX}admin/")
}
/// Prefix of every VM record.
pub fn vms_prefix() -> String {
    format!("{PREFIX}vms/")
}
/// Prefix of every migration record.
pub fn migrations_prefix() -> String {
    format!("{PREFIX}migrations/")
}
/// Prefix of the running reports of VM `n` (every host), or of every VM with `None`.
pub fn running_prefix(n: Option<&str>) -> String {
    match n {
        Some(n) => format!("{PREFIX}running/{n}/"),
        None => format!("{PREFIX}running/"),
    }
}

/// A record with its version, as stored.
#[derive(Serialize, Deserialize)]
struct Versioned<T> {
    v: u32,
    #[serde(flatten)]
    body: T,
}

/// Encodes a record.
pub fn encode<T: Serialize>(body: &T) -> Result<Vec<u8>, ClusterError> {
    serde_json::to_vec(&Versioned {
        v: RECORD_VERSION,
        body,
    })
    .map_err(|e| ClusterError::Record(e.to_string()))
}

/// Decodes a record, refusing other versions.
pub fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, ClusterError> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ClusterError::Record(format!("{key}: {e}")))?;
    match v.get("v").and_then(|v| v.as_u64()) {
        Some(n) if n == u64::from(RECORD_VERSION) => {}
        other => {
            return Err(ClusterError::Record(format!(
                "{key}: record version {other:?}, this Ferry reads {RECORD_VERSION}"
            )))
        }
    }
    let r: Versioned<T> =
        serde_json::from_value(v).map_err(|e| ClusterError::Record(format!("{key}: {e}")))?;
    Ok(r.body)
}

/// A host as it reports itself (renewed with its lease).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostRecord {
    /// Host name.
    pub name: String,
    /// Its REST API (`http://ADDR:PORT`).
    pub api: String,
    /// Address its receiving workers listen on.
    pub migration_ip: String,
    /// CPU vendor.
    pub cpu_vendor: String,
    /// CPU model name.
    pub cpu_model: String,
    /// The CPU features it offers guests.
    pub cpu_features: Vec<String>,
    /// The CPU models it can run.
    pub cpu_models: Vec<String>,
    /// Logical CPUs.
    pub cores: u32,
    /// Its network bridges (a VM's NICs need theirs on the host it runs on).
    #[serde(default)]
    pub bridges: Vec<String>,
    /// Memory.
    pub memory_mib: u64,
    /// Memory available.
    pub free_mib: u64,
    /// One-minute load average.
    pub load: f64,
    /// Memory given to the VMs it runs.
    pub vm_memory_mib: u64,
    /// The VMs it runs.
    pub vms: Vec<String>,
    /// What each of its VMs' workers uses.
    #[serde(default)]
    pub vm_usage: Vec<VmUsage>,
    /// Unix time it last reported.
    pub updated: u64,
    /// Whether it has fenced itself (lost the store) and not yet re-joined.
    #[serde(default)]
    pub fenced: bool,
}

/// One VM worker's use of its host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmUsage {
    /// The VM.
    pub name: String,
    /// CPU time its worker used (user + system), seconds.
    pub cpu_seconds: f64,
    /// Its worker's resident memory (guest RAM it touched included), MiB.
    pub rss_mib: u64,
    /// How fast its guest writes its memory, bytes/s, from the worker's last sampling window
    /// (absent until it has one, and from hosts before this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_bytes_per_second: Option<f64>,
}

/// A host's administrative state, kept across its restarts.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostAdmin {
    /// No new VMs are placed on it.
    pub paused: bool,
    /// Its VMs are being moved away.
    pub draining: bool,
    /// Its power state (power consolidation, `ferry host standby|wake`).
    #[serde(default)]
    pub power: PowerState,
    /// Unix time the power state last changed.
    #[serde(default)]
    pub power_since: u64,
    /// Why it is in that state, or what went wrong switching it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_note: Option<String>,
    /// What it offers VMs, recorded when it went to standby (the policy counts on it when it
    /// decides to switch it back on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
}

impl HostAdmin {
    /// Whether the cluster switched it off or is switching it on again: neither failed nor
    /// fenced, and never a reason to restart VMs elsewhere.
    pub fn standing_by(&self) -> bool {
        matches!(
            self.power,
            PowerState::Standby | PowerState::Wake | PowerState::Waking
        )
    }
}

/// A host's power state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    /// On, or down for a reason of its own (no lease: failed).
    #[default]
    On,
    /// Its VMs are being moved away by live migration; it is switched off once it has none.
    Evacuating,
    /// Switched off by the cluster through its power driver.
    Standby,
    /// To be switched on: the coordinator runs its power driver.
    Wake,
    /// Its power driver was told to switch it on; its agent has not joined yet.
    Waking,
}

/// What a host offers VMs.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Capacity {
    /// Logical CPUs.
    pub cores: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
}

/// Whether a VM should run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    /// Run it (somewhere).
    Running,
    /// Keep it stopped.
    Stopped,
}

/// A VM of the cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmRecord {
    /// Its configuration.
    pub config: VmConfig,
    /// Restart it on another host when its host dies.
    pub ha: bool,
    /// Whether it should run.
    pub desired: Desired,
    /// The host that may run it (and open its disks); none until placed.
    pub owner: Option<String>,
    /// Fencing epoch: raised on every change of owner. A host runs the VM only with the
    /// epoch it was given; a host holding an older one must not touch its disks.
    pub epoch: u64,
    /// Why it is not running where it should, if it is not.
    #[serde(default)]
    pub note: Option<String>,
    /// CPU model `cluster`: the features every live host has, resolved when the VM starts
    /// (`config.cpu` is then `host` and `config.cpu_hide` what the starting host has beyond).
    #[serde(default)]
    pub cluster_cpu: bool,
}

/// A host's report that it runs a VM (leased by that host).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunningRecord {
    /// The host.
    pub host: String,
    /// The VM's fencing epoch the host runs it under.
    pub epoch: u64,
    /// The worker's state.
    pub state: String,
    /// The worker's pid on that host.
    pub pid: u32,
    /// The named CPU features the guest sees.
    #[serde(default)]
    pub cpu_features: Vec<String>,
}

/// A migration's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationState {
    /// Waiting for the coordinator to admit it.
    Queued,
    /// Admitted; moving.
    Running,
    /// The VM runs on the destination.
    Succeeded,
    /// The VM stayed on the source.
    Failed,
    /// Cancelled before it finished; the VM stayed on the source.
    Cancelled,
}

impl MigrationState {
    /// Whether it has ended.
    pub fn done(self) -> bool {
        matches!(
            self,
            MigrationState::Succeeded | MigrationState::Failed | MigrationState::Cancelled
        )
    }
}

/// A live migration requested of the cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// Id (increasing).
    pub id: u64,
    /// The VM.
    pub vm: String,
    /// Source host.
    pub from: String,
    /// Destination host.
    pub to: String,
    /// State.
    pub state: MigrationState,
    /// Why: `user`, `drain`, `failback`, `balance`, `consolidate`.
    pub reason: String,
    /// The engine's tunables (downtime target, compression, connections, quick, ...).
    #[serde(default)]
    pub options: migration::MigrateOptions,
    /// Unix times.
    pub requested: u64,
    /// When the coordinator admitted it.
    pub started: Option<u64>,
    /// When it ended.
    pub finished: Option<u64>,
    /// Cancellation requested.
    #[serde(default)]
    pub cancel: bool,
    /// Last progress, in words.
    #[serde(default)]
    pub progress: Option<String>,
    /// The engine's report, once it succeeded.
    #[serde(default)]
    pub report: Option<serde_json::Value>,
    /// The error, once it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Why the cluster asked for it (balancing: the loads and the expected gain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// The coordinator's record (leased by it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CoordinatorRecord {
    /// The host that coordinates.
    pub host: String,
    /// Since (unix time).
    pub since: u64,
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Load balancing's mode, and power consolidation's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BalanceMode {
    /// Nothing is computed.
    #[default]
    Off,
    /// Recommendations are published; nothing moves until applied.
    Manual,
    /// Recommendations are queued as migrations (reason `balance`).
    Auto,
}

/// The cluster's policy, set by `ferry cluster balance` (absent: each agent's `[balance]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// Balancing mode.
    pub balance: BalanceMode,
    /// Balancing threshold, 1 to 5.
    pub threshold: u8,
    /// Power consolidation's mode (absent in records of before it: `off`).
    #[serde(default)]
    pub power: BalanceMode,
}

/// A balancing recommendation the coordinator published.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    /// The VM (also the recommendation's id: one per VM at most).
    pub vm: String,
    /// From this host.
    pub from: String,
    /// To this host.
    pub to: String,
    /// Imbalance before.
    pub before: f64,
    /// Imbalance after.
    pub after: f64,
    /// Why, in words.
    pub reason: String,
    /// The command that applies it.
    pub command: String,
}

/// What the coordinator's last balancing pass found.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecommendationsRecord {
    /// Unix time of the pass.
    pub at: u64,
    /// The cluster's imbalance then.
    pub imbalance: f64,
    /// The target of the threshold.
    pub target: f64,
    /// The moves, best first.
    pub moves: Vec<Recommendation>,
}

/// The policy record's key.
pub fn policy_key() -> String {
    format!("{PREFIX}policy")
}

/// The recommendations record's key.
pub fn recommendations_key() -> String {
    format!("{PREFIX}recommendations")
}

/// What the coordinator's power consolidation advises (published in `manual` mode, and in
/// `auto` what it did last).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PowerAdviceRecord {
    /// Unix time of the pass.
    pub at: u64,
    /// The cluster's load then: CPU demand over the cores of the hosts that are on.
    pub load: f64,
    /// The band it is kept in.
    pub low: f64,
    /// The band's top.
    pub high: f64,
    /// `hold`, `standby` (switch `hosts` off) or `wake` (switch `hosts` on).
    pub action: String,
    /// The hosts concerned.
    pub hosts: Vec<String>,
    /// Why, in words.
    pub reason: String,
    /// The moves that empty a host to be switched off.
    pub moves: Vec<Recommendation>,
    /// The commands that carry it out.
    pub commands: Vec<String>,
}

/// The power advice record's key.
pub fn power_advice_key() -> String {
    format!("{PREFIX}power")
}
