//! This host's configuration, as far as the VMM is concerned: one TOML file,
//! `$FERRY_HOST_CONFIG` or else `/etc/ferry/host.toml` (absent: defaults).
//!
//! ```toml
//! [cpu]
//! # Features this host never offers to guests, nor counts as its own when a VM moves here:
//! # for a host that must look like an older generation, or for tests.
//! hide = ["avx512f", "avx2"]
//! ```

use std::path::PathBuf;

use kvm_bindings::CpuId;
use kvm_ioctls::Kvm;
use serde::Deserialize;

use crate::cpuid::{self, CpuidError};

/// Where the host config is read from unless `$FERRY_HOST_CONFIG` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/ferry/host.toml";

/// Errors of the host config.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Unreadable file.
    #[error("cannot read the host config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML or unknown keys.
    #[error("invalid host config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// CPUID trouble (unknown feature names included).
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
}

/// The `[cpu]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostCpu {
    /// Feature names (as in `ferry host cpu`) hidden from every guest of this host.
    #[serde(default)]
    pub hide: Vec<String>,
}

/// The host config.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// CPU settings.
    #[serde(default)]
    pub cpu: HostCpu,
}

impl HostConfig {
    /// Loads the host config (defaults when the default file does not exist).
    pub fn load() -> Result<HostConfig, HostError> {
        let (path, must_exist) = match std::env::var_os("FERRY_HOST_CONFIG") {
            Some(p) => (PathBuf::from(p), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !must_exist && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(HostConfig::default())
            }
            Err(source) => return Err(HostError::Read { path, source }),
        };
        let cfg: HostConfig = toml::from_str(&text).map_err(|e| HostError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        // Unknown feature names are refused now, not when a guest starts.
        cpuid::hide(&mut [], &cfg.cpu.hide)?;
        Ok(cfg)
    }
}

/// The CPUID this host offers guests: what KVM supports, minus the host's hide list.
pub fn cpuid(kvm: &Kvm) -> Result<CpuId, HostError> {
    let cfg = HostConfig::load()?;
    let sup = cpuid::supported(kvm)?;
    let mut entries = sup.as_slice().to_vec();
    cpuid::hide(&mut entries, &cfg.cpu.hide)?;
    CpuId::from_entries(&entries).map_err(|_| CpuidError::TooMany(entries.len()).into())
}

/// The processor's brand string (leaves 0x8000_0002–4), if it has one.
pub fn brand(entries: &[kvm_bindings::kvm_cpuid_entry2]) -> String {
    let mut b = Vec::with_capacity(48);
    for leaf in 0x8000_0002u32..=0x8000_0004 {
        if let Some(e) = entries.iter().find(|e| e.function == leaf) {
            for r in [e.eax, e.ebx, e.ecx, e.edx] {
                b.extend_from_slice(&r.to_le_bytes());
            }
        }
    }
    String::from_utf8_lossy(&b)
        .trim_matches(char::from(0))
        .trim()
        .to_string()
}
