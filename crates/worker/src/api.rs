//! The control protocol: one JSON request per line, one JSON response per line, over the VM's
//! UNIX socket. Version 2, documented in `docs/worker-api.md`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vmm::machine::{RunState, StopReason};

/// Protocol version, reported in every status.
pub const API_VERSION: u32 = 3;
/// Largest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

/// A request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Current state.
    Status,
    /// Park every vCPU.
    Pause,
    /// Let the vCPUs run.
    Resume,
    /// Pause, write the state file, stop the worker. On failure the VM keeps running.
    Save {
        /// Destination file (absolute path).
        path: PathBuf,
    },
    /// Stop the VM and the worker.
    Shutdown,
    /// Hash of all guest memory (pause first for a stable value).
    MemoryHash,
    /// Live-migrate (or, with `quick`, stop-and-copy) the VM to a receiving worker. The
    /// worker answers with `{"progress": MigrationStatus}` lines until the final response;
    /// after a successful migration it exits.
    Migrate {
        /// Destination `HOST:PORT`.
        to: String,
        /// Tunables.
        #[serde(default)]
        options: migration::MigrateOptions,
        /// This host's TLS identity directory (`ca.pem`, `cert.pem`, `key.pem`); absent:
        /// plain TCP, which the CLI sends only with `--insecure`.
        #[serde(default)]
        pki: Option<std::path::PathBuf>,
        /// The commit point is the caller's (a cluster agent's compare-and-swap in its store):
        /// once the destination holds the whole VM, the worker writes `{"commit_request":true}`
        /// and waits for `{"commit":true}` (send COMMIT) or `{"commit":false,"reason":…}`
        /// (take the VM back) on the same connection.
        #[serde(default)]
        commit_gate: bool,
    },
    /// Progress of the running (or last) migration.
    MigrationStatus,
    /// Cancel the running migration (before its commit point).
    MigrationCancel,
    /// The cluster's decision for a receiving worker started with `--commit-by-store` whose
    /// source went away after READY: `commit` runs the VM here (the store names this host its
    /// owner), otherwise it is discarded.
    MigrationResolve {
        /// Run the VM here.
        commit: bool,
    },
    /// Add a disk to the VM's SCSI controller while it runs: opened under its lock first, the
    /// guest told (Linux: a new `/dev/sdX`). Refused while the VM migrates.
    DiskAdd {
        /// The image or host block device (absolute path).
        path: PathBuf,
        /// Attach read-only.
        #[serde(default)]
        readonly: bool,
        /// The LUN (0 to 255); absent: the lowest free one.
        #[serde(default)]
        lun: Option<u16>,
    },
    /// Remove a disk from the SCSI controller, by LUN or by path (exactly one): the requests
    /// in flight complete, the disk is flushed and closed, the guest told. Refused while the VM
    /// migrates.
    DiskRemove {
        /// The LUN.
        #[serde(default)]
        lun: Option<u16>,
        /// The disk's path.
        #[serde(default)]
        path: Option<PathBuf>,
    },
    /// The SCSI controller's disks.
    DiskList,
    /// Move the self-fencing deadline of a worker started with `--fence-deadline` on to
    /// `until_ms` (CLOCK_BOOTTIME, milliseconds; an earlier value changes nothing). Refused
    /// once the deadline has passed: the worker is then stopping its VM.
    RenewDeadline {
        /// The new deadline.
        until_ms: u64,
    },
}

/// A response.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Error message (with its causes) when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Result when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Response {
    /// A success.
    pub fn ok(result: impl Serialize) -> Self {
        Response {
            ok: true,
            error: None,
            result: serde_json::to_value(result).ok(),
        }
    }
    /// A failure.
    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            result: None,
        }
    }
}

/// What `disk-list` returns.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskList {
    /// The SCSI controller's disks, by LUN.
    pub luns: Vec<vmm::devices::virtio::scsi::LunInfo>,
}

/// What `status` returns.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// Protocol version.
    pub api_version: u32,
    /// VM name.
    pub name: String,
    /// running, paused, stopped, receiving (an incoming migration) or migrating.
    pub state: WorkerState,
    /// vCPU count.
    pub vcpus: u8,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// Kernel image.
    pub kernel: PathBuf,
    /// bzimage, vmlinux or bare-metal (none while receiving).
    pub kernel_kind: Option<vmm::boot::KernelKind>,
    /// CPU model (none while receiving).
    pub cpu_model: Option<vmm::cpuid::CpuModel>,
    /// The named CPU features the guest sees (vCPU 0; docs/cpu-compat.md).
    pub cpu_features: Vec<String>,
    /// Worker process id.
    pub pid: u32,
    /// Console log file.
    pub console_log: Option<PathBuf>,
    /// Seconds since the worker started the VM.
    pub uptime_s: u64,
    /// Why it stopped, once it has.
    pub stop_reason: Option<StopReason>,
    /// The running or last migration, if any.
    pub migration: Option<migration::MigrationStatus>,
    /// For a receiving worker: where it listens and how far the incoming migration is.
    pub incoming: Option<Incoming>,
    /// The last outgoing migration's outcome is not known here: the VM is paused and fenced
    /// until `migration-resolve` says where it runs.
    #[serde(default)]
    pub migration_outcome_unknown: bool,
    /// What the VM's disks and NICs have moved since this worker started it (none while
    /// receiving; absent from workers before this field).
    #[serde(default)]
    pub io: Option<vmm::devices::virtio::IoTotals>,
    /// How fast the guest writes its memory, from the worker's last sampling window (every
    /// [`DIRTY_SAMPLE_EVERY`], over [`DIRTY_WINDOW`]; none until the first has ended, and
    /// absent from workers before this field).
    #[serde(default)]
    pub dirty: Option<vmm::dirty_rate::DirtyRate>,
}

/// How often a worker measures its guest's dirty rate.
pub const DIRTY_SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// Over how long a window.
pub const DIRTY_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// An incoming migration's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Incoming {
    /// Listening address.
    pub listen: String,
    /// Phase, in words.
    pub phase: String,
}

/// What a worker is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// vCPUs running.
    Running,
    /// vCPUs parked.
    Paused,
    /// VM stopped.
    Stopped,
    /// Waiting for / receiving an incoming migration.
    Receiving,
    /// Sending its VM to another host.
    Migrating,
}

impl From<RunState> for WorkerState {
    fn from(s: RunState) -> Self {
        match s {
            RunState::Running => WorkerState::Running,
            RunState::Paused => WorkerState::Paused,
            RunState::Stopped => WorkerState::Stopped,
        }
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerState::Running => "running",
            WorkerState::Paused => "paused",
            WorkerState::Stopped => "stopped",
            WorkerState::Receiving => "receiving",
            WorkerState::Migrating => "migrating",
        })
    }
}
