//! What a host reports about itself: its processor (after the host config's hide list), cores,
//! memory and load.

use vmm::cpuid::{self, CpuModel};

/// A host's processor as guests see it.
#[derive(Clone, Debug, Default)]
pub struct Cpu {
    /// Vendor string.
    pub vendor: String,
    /// Brand string.
    pub model: String,
    /// Named features offered to guests.
    pub features: Vec<String>,
    /// CPU models this host can run.
    pub models: Vec<String>,
}

/// Reads the host's processor through KVM.
pub fn cpu() -> Result<Cpu, String> {
    let kvm = vmm::vm::open_kvm().map_err(|e| e.to_string())?;
    let offered = vmm::host::cpuid(&kvm).map_err(|e| e.to_string())?;
    let e = offered.as_slice();
    Ok(Cpu {
        vendor: cpuid::vendor(e),
        model: vmm::host::brand(e),
        features: cpuid::feature_names(e)
            .into_iter()
            .map(String::from)
            .collect(),
        models: CpuModel::ALL
            .into_iter()
            .filter(|m| cpuid::model_missing(e, *m).is_empty())
            .map(|m| m.name().to_string())
            .collect(),
    })
}

/// `(total, available)` memory in MiB.
pub fn memory_mib() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// One-minute load average.
pub fn load() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|l| l.parse().ok()))
        .unwrap_or(0.0)
}

/// Logical CPUs.
pub fn cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// CPU seconds (user + system) and resident MiB of process `pid`.
pub fn process_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start at state (field 3).
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = rest.get(11)?.parse().ok()?;
    let stime: f64 = rest.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Some(((utime + stime) / hz, rss_kib / 1024))
}

/// The host's bridges (interfaces with a `bridge/` directory in sysfs), sorted.
pub fn bridges() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("bridge").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}
