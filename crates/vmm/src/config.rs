//! The VM configuration: what a worker is started with and what a state file carries first.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::memory::{MAX_MEMORY, MIN_MEMORY};

/// Largest number of vCPUs Ferry gives a VM.
pub const MAX_VCPUS: u8 = 32;

/// Errors of configuration validation.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Bad VM name.
    #[error("invalid VM name {0:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ -, not starting with '.'")]
    BadName(String),
    /// Bad vCPU count.
    #[error("invalid vCPU count {0}: must be 1 to {MAX_VCPUS}")]
    BadVcpus(u8),
    /// Bad memory size.
    #[error("invalid memory size {0} MiB: must be {min} to {max} MiB, a multiple of 2", min = MIN_MEMORY >> 20, max = MAX_MEMORY >> 20)]
    BadMemory(u64),
    /// Unparsable size string.
    #[error("invalid size {0:?}: expected a number with an optional K, M or G suffix")]
    BadSize(String),
    /// A feature name Ferry does not know.
    #[error("unknown CPU feature {0:?} in cpu_hide (docs/cpu-compat.md lists them)")]
    UnknownFeature(String),
    /// A disk given wrongly.
    #[error("invalid disk {0:?}: expected an absolute PATH or PATH,readonly (at most {max} disks)", max = crate::devices::virtio::MAX_DEVICES)]
    BadDisk(String),
    /// A SCSI disk given wrongly.
    #[error("invalid SCSI disk {0}: LUNs are 0 to 255, each used once, paths absolute and each used once")]
    BadScsiDisk(String),
    /// A network interface given wrongly.
    #[error("invalid NIC {0:?}: expected bridge=BRIDGE[,mac=xx:xx:xx:xx:xx:xx][,mtu=68..65535][,queues=1..16][,offloads=on|off] with a unicast MAC and a bridge name of 1 to 15 characters")]
    BadNic(String),
    /// Config JSON did not parse (unknown keys included).
    #[error("invalid VM config: {0}")]
    Parse(#[from] serde_json::Error),
}

/// Everything needed to create a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// VM name, unique on a host.
    pub name: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Kernel image: Linux bzImage or vmlinux, or a bare-metal 64-bit ELF.
    pub kernel: PathBuf,
    /// Optional initramfs (Linux only).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (given to bare-metal guests in their boot-info block).
    #[serde(default)]
    pub cmdline: String,
    /// What the guest is told about its processor (docs/cpu-compat.md).
    #[serde(default)]
    pub cpu: crate::cpuid::CpuModel,
    /// Features hidden on top of the model (named as in docs/cpu-compat.md): what the
    /// cluster's `cluster` model resolves to on the host that starts the VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_hide: Vec<String>,
    /// Disks, as virtio-blk devices in this order (Linux: `/dev/vda`, `/dev/vdb`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSpec>,
    /// Network interfaces, as virtio-net devices after the disks (Linux: eth0, eth1, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicSpec>,
    /// A virtio-scsi controller after the NICs, whose disks can be added and removed while
    /// the VM runs (Linux: `/dev/sda`, …); absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scsi: Option<ScsiSpec>,
}

/// A VM's SCSI controller and the disks on it (docs/disks.md).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScsiSpec {
    /// Its disks, each at its LUN (target 0).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<ScsiDiskSpec>,
}

/// A disk on the SCSI controller: an image or a host block device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScsiDiskSpec {
    /// The LUN (0 to 255).
    pub lun: u16,
    /// The image or host block device (absolute path).
    pub path: PathBuf,
    /// Attach read-only.
    #[serde(default)]
    pub readonly: bool,
}

impl ScsiSpec {
    /// A controller holding `disks` at LUNs 0, 1, … in order.
    pub fn with_disks(disks: &[DiskSpec]) -> ScsiSpec {
        ScsiSpec {
            disks: disks
                .iter()
                .zip(0u16..)
                .map(|(d, lun)| ScsiDiskSpec {
                    lun,
                    path: d.path.clone(),
                    readonly: d.readonly,
                })
                .collect(),
        }
    }
}

/// A network interface of a VM: a TAP the worker creates on a host bridge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// The host bridge (the same name on every host the VM may move to).
    pub bridge: String,
    /// The guest's MAC address, `xx:xx:xx:xx:xx:xx` (unicast); kept across moves. Empty
    /// (or absent) only in a request, before [`NicSpec::fill_mac`].
    #[serde(default)]
    pub mac: String,
    /// The MTU the guest is told (68 to 65535; the bridge's should match).
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// Queue pairs (1 to 16): receive/transmit queues the guest may spread over its CPUs,
    /// each a queue of a multi-queue TAP.
    #[serde(default = "default_queues")]
    pub queues: u16,
    /// Checksum and segmentation offloads offered to the guest (off: every frame is
    /// complete, checksummed and at most MTU-sized, both ways).
    #[serde(default = "default_offloads")]
    pub offloads: bool,
}

fn default_offloads() -> bool {
    true
}

fn default_mtu() -> u16 {
    1500
}

fn default_queues() -> u16 {
    1
}

impl NicSpec {
    /// The MAC address as bytes, if it is a valid unicast address.
    pub fn mac_bytes(&self) -> Option<[u8; 6]> {
        parse_mac(&self.mac)
    }
}

/// Parses `xx:xx:xx:xx:xx:xx` into a unicast MAC.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (parts.next().is_none() && out[0] & 1 == 0 && out != [0; 6]).then_some(out)
}

/// A locally administered MAC (`52:54:00:…`, like QEMU's) from a seed, for a new NIC.
pub fn generated_mac(seed: u64) -> String {
    let b = seed.to_le_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

impl NicSpec {
    /// Gives the `index`th NIC of a new VM a generated MAC when it has none (from the clock,
    /// the process and the index: two NICs made at once differ).
    pub fn fill_mac(&mut self, index: usize) {
        if !self.mac.is_empty() {
            return;
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (u64::from(std::process::id()) << 20)
            ^ (index as u64) << 40;
        self.mac = generated_mac(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }
}

impl std::str::FromStr for NicSpec {
    type Err = ConfigError;

    /// `bridge=BR[,mac=MAC][,mtu=N][,queues=N][,offloads=on|off]` (a missing MAC is left
    /// empty for the caller to fill).
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::BadNic(s.to_string());
        let mut nic = NicSpec {
            bridge: String::new(),
            mac: String::new(),
            mtu: default_mtu(),
            queues: default_queues(),
            offloads: default_offloads(),
        };
        for kv in s.split(',') {
            match kv.split_once('=') {
                Some(("bridge", v)) => nic.bridge = v.to_string(),
                Some(("mac", v)) => nic.mac = v.to_ascii_lowercase(),
                Some(("mtu", v)) => nic.mtu = v.parse().map_err(|_| bad())?,
                Some(("queues", v)) => nic.queues = v.parse().map_err(|_| bad())?,
                Some(("offloads", "on")) => nic.offloads = true,
                Some(("offloads", "off")) => nic.offloads = false,
                _ => return Err(bad()),
            }
        }
        if nic.bridge.is_empty() {
            return Err(bad());
        }
        Ok(nic)
    }
}

/// A disk of a VM: a raw image file (docs/disks.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// The image (absolute path; on shared storage for VMs that move).
    pub path: PathBuf,
    /// Attach read-only (the guest cannot write; other VMs may read it too).
    #[serde(default)]
    pub readonly: bool,
}

impl std::str::FromStr for DiskSpec {
    type Err = ConfigError;

    /// `PATH` or `PATH,readonly` (also `ro`).
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let (path, opts) = match s.rsplit_once(',') {
            Some((p, o @ ("readonly" | "ro" | "rw"))) => (p, o),
            _ => (s, "rw"),
        };
        if path.is_empty() {
            return Err(ConfigError::BadDisk(s.to_string()));
        }
        Ok(DiskSpec {
            path: PathBuf::from(path),
            readonly: opts != "rw",
        })
    }
}
impl VmConfig {
    /// Checks the values a user can get wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_name(&self.name)?;
        if let Some(f) = self.cpu_hide.iter().find(|f| !crate::cpuid::is_feature(f)) {
            return Err(ConfigError::UnknownFeature(f.clone()));
        }
        if self.disks.len() > crate::devices::virtio::MAX_DEVICES {
            return Err(ConfigError::BadDisk(format!("{} disks", self.disks.len())));
        }
        let controllers = usize::from(self.scsi.is_some());
        if self.disks.len() + self.nics.len() + controllers > crate::devices::virtio::MAX_DEVICES {
            return Err(ConfigError::BadNic(format!(
                "{} NICs with {} disks and {controllers} SCSI controller (at most {} devices)",
                self.nics.len(),
                self.disks.len(),
                crate::devices::virtio::MAX_DEVICES
            )));
        }
        if let Some(scsi) = &self.scsi {
            let mut luns = std::collections::BTreeSet::new();
            let mut paths = std::collections::BTreeSet::new();
            for d in &scsi.disks {
                if d.lun >= crate::devices::virtio::scsi::MAX_LUNS
                    || !d.path.is_absolute()
                    || !luns.insert(d.lun)
                    || !paths.insert(&d.path)
                {
                    return Err(ConfigError::BadScsiDisk(format!(
                        "LUN {} {}",
                        d.lun,
                        d.path.display()
                    )));
                }
            }
        }
        for n in &self.nics {
            let name_ok = !n.bridge.is_empty()
                && n.bridge.len() <= 15
                && !n
                    .bridge
                    .bytes()
                    .any(|b| b == b'/' || b.is_ascii_whitespace());
            let queues_ok =
                (1..=crate::devices::virtio::tap::MAX_QUEUES).contains(&usize::from(n.queues));
            if !name_ok || n.mac_bytes().is_none() || n.mtu < 68 || !queues_ok {
                return Err(ConfigError::BadNic(format!(
                    "bridge={},mac={},mtu={},queues={}",
                    n.bridge, n.mac, n.mtu, n.queues
                )));
            }
        }
        if let Some(d) = self.disks.iter().find(|d| !d.path.is_absolute()) {
            return Err(ConfigError::BadDisk(d.path.display().to_string()));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::BadVcpus(self.vcpus));
        }
        let bytes = self.memory_mib.saturating_mul(1 << 20);
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&bytes) || !self.memory_mib.is_multiple_of(2) {
            return Err(ConfigError::BadMemory(self.memory_mib));
        }
        Ok(())
    }

    /// Parses a config from JSON, refusing unknown keys.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let cfg: VmConfig = serde_json::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Guest RAM size in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

/// Checks a VM name (also used as a directory name).
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadName(name.to_string()))
    }
}

/// Parses `256M`, `1G`, `65536K` or a plain number of MiB into MiB.
pub fn parse_mib(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let bad = || ConfigError::BadSize(s.to_string());
    let (num, mul_kib): (&str, u64) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1),
        Some('M' | 'm') => (&t[..t.len() - 1], 1024),
        Some('G' | 'g') => (&t[..t.len() - 1], 1024 * 1024),
        _ => (t, 1024),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let kib = n.checked_mul(mul_kib).ok_or_else(bad)?;
    if !kib.is_multiple_of(1024) {
        return Err(bad());
    }
    Ok(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            name: "vm-1".into(),
            vcpus: 2,
            memory_mib: 256,
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            cpu: Default::default(),
            cpu_hide: Vec::new(),
            disks: Vec::new(),
            nics: Vec::new(),
            scsi: None,
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_mib("256M").unwrap(), 256);
        assert_eq!(parse_mib("1G").unwrap(), 1024);
        assert_eq!(parse_mib("64").unwrap(), 64);
        assert_eq!(parse_mib("2048k").unwrap(), 2);
        assert!(parse_mib("12X").is_err());
        assert!(parse_mib("1K").is_err());
    }

    #[test]
    fn validation_refuses_bad_values() {
        assert!(cfg().validate().is_ok());
        assert!(matches!(
            VmConfig { vcpus: 0, ..cfg() }.validate(),
            Err(ConfigError::BadVcpus(0))
        ));
        assert!(matches!(
            VmConfig {
                memory_mib: 8,
                ..cfg()
            }
            .validate(),
            Err(ConfigError::BadMemory(8))
        ));
        assert!(matches!(
            VmConfig {
                name: "../x".into(),
                ..cfg()
            }
            .validate(),
            Err(ConfigError::BadName(_))
        ));
    }

    #[test]
    fn scsi_disks_need_distinct_luns_and_paths() {
        let disk = |lun, path: &str| ScsiDiskSpec {
            lun,
            path: path.into(),
            readonly: false,
        };
        let with = |disks| VmConfig {
            scsi: Some(ScsiSpec { disks }),
            ..cfg()
        };
        assert!(with(vec![disk(0, "/a"), disk(255, "/b")])
            .validate()
            .is_ok());
        for bad in [
            vec![disk(256, "/a")],
            vec![disk(0, "a")],
            vec![disk(1, "/a"), disk(1, "/b")],
            vec![disk(1, "/a"), disk(2, "/a")],
        ] {
            assert!(
                matches!(
                    with(bad.clone()).validate(),
                    Err(ConfigError::BadScsiDisk(_))
                ),
                "{bad:?}"
            );
        }
        let specs: Vec<DiskSpec> = ["/x,readonly", "/y"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let s = ScsiSpec::with_disks(&specs);
        assert_eq!(
            s.disks[0],
            ScsiDiskSpec {
                lun: 0,
                path: "/x".into(),
                readonly: true
            }
        );
        assert_eq!(s.disks[1].lun, 1);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let mut v = serde_json::to_value(cfg()).unwrap();
        v["colour"] = "blue".into();
        let err = VmConfig::from_json(&v.to_string()).unwrap_err();
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
    }
}
