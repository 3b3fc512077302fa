//! The control protocol: one JSON request per line, one JSON response per line, over the VM's
//! UNIX socket. Version 1, documented in `docs/worker-api.md`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vmm::machine::{RunState, SaveReport, StopReason};

/// Protocol version, reported in every status.
pub const API_VERSION: u32 = 1;
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

/// What `status` returns.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// Protocol version.
    pub api_version: u32,
    /// VM name.
    pub name: String,
    /// running, paused or stopped.
    pub state: RunState,
    /// vCPU count.
    pub vcpus: u8,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// Kernel image.
    pub kernel: PathBuf,
    /// bzimage, vmlinux or bare-metal.
    pub kernel_kind: vmm::boot::KernelKind,
    /// Worker process id.
    pub pid: u32,
    /// Console log file.
    pub console_log: Option<PathBuf>,
    /// Seconds since the worker started the VM.
    pub uptime_s: u64,
    /// Why it stopped, once it has.
    pub stop_reason: Option<StopReason>,
}

/// What `save` returns.
pub type SaveResult = SaveReport;
