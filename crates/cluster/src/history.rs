//! Utilization history, kept by each agent in its own memory (the store holds only the latest
//! figures, in the host record): every [`FINE_EVERY_S`] a sample of the host's CPU and memory
//! and each of its VMs' CPU (cores, from its worker's CPU time), memory (resident against
//! assigned) and disk and network throughput (from its devices' byte counters, which the
//! worker reports); the last hour of them, and a day of [`COARSE_EVERY_S`] averages. Pure but for
//! [`Sampler::sample`], which reads `/proc`.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use vmm::devices::virtio::IoTotals;

/// Seconds between samples.
pub const FINE_EVERY_S: u64 = 10;
/// Samples kept at that rate: an hour.
pub const FINE_KEEP: usize = 360;
/// Seconds each coarse sample averages.
pub const COARSE_EVERY_S: u64 = 300;
/// Coarse samples kept: a day.
pub const COARSE_KEEP: usize = 288;

/// One VM at one time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmSample {
    /// The VM.
    pub name: String,
    /// CPU in use, in cores.
    pub cpu_cores: f64,
    /// Its worker's resident memory, MiB.
    pub rss_mib: u64,
    /// Memory it was given, MiB.
    pub memory_mib: u64,
    /// Its disks' and NICs' throughput (zero until its worker reports counters twice).
    #[serde(default)]
    pub io: Throughput,
    /// How fast the guest wrote its memory, bytes/s (its worker's latest sampling window;
    /// zero until it has one).
    #[serde(default)]
    pub dirty: f64,
}

/// Device throughput, bytes per second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    /// Disk data read for the guest.
    pub disk_read: f64,
    /// Disk data the guest wrote.
    pub disk_write: f64,
    /// Network frames to the guest.
    pub net_rx: f64,
    /// Network frames from the guest.
    pub net_tx: f64,
}

impl Throughput {
    /// The rate between two readings of a worker's counters `elapsed_s` apart; `None` when
    /// a counter went back (not the same devices).
    fn between(a: &IoTotals, b: &IoTotals, elapsed_s: f64) -> Option<Throughput> {
        let d = |x: u64, y: u64| y.checked_sub(x).map(|n| n as f64 / elapsed_s);
        Some(Throughput {
            disk_read: d(a.disk_read_bytes, b.disk_read_bytes)?,
            disk_write: d(a.disk_write_bytes, b.disk_write_bytes)?,
            net_rx: d(a.net_rx_bytes, b.net_rx_bytes)?,
            net_tx: d(a.net_tx_bytes, b.net_tx_bytes)?,
        })
    }

    fn scaled(self, k: f64) -> Throughput {
        Throughput {
            disk_read: self.disk_read * k,
            disk_write: self.disk_write * k,
            net_rx: self.net_rx * k,
            net_tx: self.net_tx * k,
        }
    }

    fn plus(self, o: Throughput) -> Throughput {
        Throughput {
            disk_read: self.disk_read + o.disk_read,
            disk_write: self.disk_write + o.disk_write,
            net_rx: self.net_rx + o.net_rx,
            net_tx: self.net_tx + o.net_tx,
        }
    }
}

/// Device throughput over a period, bytes per second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ThroughputStats {
    /// Disk reads.
    pub disk_read: Stat,
    /// Disk writes.
    pub disk_write: Stat,
    /// Network received.
    pub net_rx: Stat,
    /// Network sent.
    pub net_tx: Stat,
}

impl ThroughputStats {
    fn of<'a>(t: impl Iterator<Item = Throughput> + Clone + 'a) -> ThroughputStats {
        ThroughputStats {
            disk_read: Stat::of(t.clone().map(|x| x.disk_read)),
            disk_write: Stat::of(t.clone().map(|x| x.disk_write)),
            net_rx: Stat::of(t.clone().map(|x| x.net_rx)),
            net_tx: Stat::of(t.map(|x| x.net_tx)),
        }
    }
}

/// The host and its VMs at one time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Unix time.
    pub at: u64,
    /// The host's CPU in use, in cores (everything on it, not only VMs).
    pub cpu_cores: f64,
    /// The host's memory in use, MiB.
    pub memory_used_mib: u64,
    /// Its VMs.
    pub vms: Vec<VmSample>,
}

/// Average, peak and latest of one measure over a period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// Mean over the samples.
    pub avg: f64,
    /// Highest sample.
    pub peak: f64,
    /// The latest sample.
    pub now: f64,
}

impl Stat {
    fn of(values: impl Iterator<Item = f64>) -> Stat {
        let (mut n, mut sum, mut peak, mut last) = (0usize, 0.0, 0.0f64, 0.0);
        for v in values {
            n += 1;
            sum += v;
            peak = peak.max(v);
            last = v;
        }
        Stat {
            avg: if n > 0 { sum / n as f64 } else { 0.0 },
            peak,
            now: last,
        }
    }
}

/// One VM's use over a period.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmUtilization {
    /// The VM.
    pub name: String,
    /// CPU, cores.
    pub cpu_cores: Stat,
    /// Resident memory, MiB.
    pub rss_mib: Stat,
    /// Memory given, MiB (latest).
    pub memory_mib: u64,
    /// Its disks' and NICs' throughput, bytes/s.
    #[serde(default)]
    pub io: ThroughputStats,
    /// How fast it wrote its memory, bytes/s.
    #[serde(default)]
    pub dirty: Stat,
    /// Samples it appears in.
    pub samples: usize,
}

/// One host's use over a period (`GET /v1/internal/utilization`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostUtilization {
    /// The host.
    pub host: String,
    /// Its cores.
    pub cores: u32,
    /// Its memory, MiB.
    pub memory_mib: u64,
    /// First and last sample's time (unix; 0 without samples).
    pub from: u64,
    /// Last sample's time.
    pub to: u64,
    /// Samples summarized.
    pub samples: usize,
    /// CPU in use, cores.
    pub cpu_cores: Stat,
    /// Memory in use, MiB.
    pub memory_used_mib: Stat,
    /// Its VMs' disk and network throughput together, bytes/s.
    #[serde(default)]
    pub io: ThroughputStats,
    /// How fast its VMs wrote their memory together, bytes/s.
    #[serde(default)]
    pub dirty: Stat,
    /// Its VMs (those it ran in the period), by name.
    pub vms: Vec<VmUtilization>,
}

/// The bounded history.
#[derive(Debug, Default)]
pub struct History {
    fine: VecDeque<Sample>,
    coarse: VecDeque<Sample>,
    /// The fine samples of the coarse bucket being filled.
    bucket: Vec<Sample>,
}

impl History {
    /// Adds a sample (times must not go backwards).
    pub fn record(&mut self, s: Sample) {
        if let Some(first) = self.bucket.first() {
            if s.at / COARSE_EVERY_S != first.at / COARSE_EVERY_S {
                let avg = average(&self.bucket);
                self.coarse.push_back(avg);
                while self.coarse.len() > COARSE_KEEP {
                    self.coarse.pop_front();
                }
                self.bucket.clear();
            }
        }
        self.bucket.push(s.clone());
        self.fine.push_back(s);
        while self.fine.len() > FINE_KEEP {
            self.fine.pop_front();
        }
    }

    /// The latest sample.
    pub fn latest(&self) -> Option<&Sample> {
        self.fine.back()
    }

    /// The samples at or after `since` (unix time): fine ones as far as they go back, coarse
    /// averages before them.
    pub fn since(&self, since: u64) -> Vec<&Sample> {
        let fine_from = self.fine.front().map_or(u64::MAX, |s| s.at);
        let mut out: Vec<&Sample> = self
            .coarse
            .iter()
            .filter(|s| s.at >= since && s.at < fine_from)
            .collect();
        out.extend(self.fine.iter().filter(|s| s.at >= since));
        out
    }

    /// The host's and its VMs' use since `since`.
    pub fn summary(&self, host: &str, cores: u32, memory_mib: u64, since: u64) -> HostUtilization {
        let samples = self.since(since);
        let mut by_vm: BTreeMap<&str, Vec<&VmSample>> = BTreeMap::new();
        for s in &samples {
            for v in &s.vms {
                by_vm.entry(v.name.as_str()).or_default().push(v);
            }
        }
        HostUtilization {
            host: host.to_string(),
            cores,
            memory_mib,
            from: samples.first().map_or(0, |s| s.at),
            to: samples.last().map_or(0, |s| s.at),
            samples: samples.len(),
            cpu_cores: Stat::of(samples.iter().map(|s| s.cpu_cores)),
            memory_used_mib: Stat::of(samples.iter().map(|s| s.memory_used_mib as f64)),
            io: ThroughputStats::of(samples.iter().map(|s| {
                s.vms
                    .iter()
                    .fold(Throughput::default(), |t, v| t.plus(v.io))
            })),
            dirty: Stat::of(samples.iter().map(|s| s.vms.iter().map(|v| v.dirty).sum())),
            vms: by_vm
                .into_iter()
                .map(|(name, v)| VmUtilization {
                    name: name.to_string(),
                    cpu_cores: Stat::of(v.iter().map(|x| x.cpu_cores)),
                    rss_mib: Stat::of(v.iter().map(|x| x.rss_mib as f64)),
                    memory_mib: v.last().map_or(0, |x| x.memory_mib),
                    io: ThroughputStats::of(v.iter().map(|x| x.io)),
                    dirty: Stat::of(v.iter().map(|x| x.dirty)),
                    samples: v.len(),
                })
                .collect(),
        }
    }
}

/// The mean of some samples: the first one's time, each VM averaged over the samples it is in.
fn average(samples: &[Sample]) -> Sample {
    let n = samples.len().max(1) as f64;
    /// One VM's sums over the samples it is in.
    #[derive(Default)]
    struct Sums {
        cpu: f64,
        rss: f64,
        memory_mib: u64,
        n: usize,
        io: Throughput,
        dirty: f64,
    }
    let mut vms: BTreeMap<&str, Sums> = BTreeMap::new();
    for s in samples {
        for v in &s.vms {
            let e = vms.entry(v.name.as_str()).or_default();
            e.cpu += v.cpu_cores;
            e.rss += v.rss_mib as f64;
            e.memory_mib = v.memory_mib;
            e.n += 1;
            e.io = e.io.plus(v.io);
            e.dirty += v.dirty;
        }
    }
    Sample {
        at: samples.first().map_or(0, |s| s.at),
        cpu_cores: samples.iter().map(|s| s.cpu_cores).sum::<f64>() / n,
        memory_used_mib: (samples
            .iter()
            .map(|s| s.memory_used_mib as f64)
            .sum::<f64>()
            / n) as u64,
        vms: vms
            .into_iter()
            .map(|(name, e)| {
                let k = e.n.max(1) as f64;
                VmSample {
                    name: name.to_string(),
                    cpu_cores: e.cpu / k,
                    rss_mib: (e.rss / k) as u64,
                    memory_mib: e.memory_mib,
                    io: e.io.scaled(1.0 / k),
                    dirty: e.dirty / k,
                }
            })
            .collect(),
    }
}

/// What a VM's worker reported at the last sample: for the rate of its CPU time.
#[derive(Clone, Copy, Debug)]
struct Seen {
    cpu_seconds: f64,
    pid: u32,
    io: Option<IoTotals>,
}

/// Turns readings of counters (the host's CPU ticks, the workers' CPU time) into a sample.
#[derive(Debug, Default)]
pub struct Sampler {
    host_ticks: Option<(u64, u64)>,
    vms: HashMap<String, Seen>,
    /// Whether it has had a reading (a rate needs two).
    primed: bool,
}

/// What a worker's process and status say at one time.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerReading {
    /// The VM.
    pub name: String,
    /// The worker's process.
    pub pid: u32,
    /// CPU time it has used, seconds.
    pub cpu_seconds: f64,
    /// Resident memory, MiB.
    pub rss_mib: u64,
    /// Memory the VM was given, MiB.
    pub memory_mib: u64,
    /// Its devices' byte counters (`None` from a worker that does not report them).
    pub io: Option<IoTotals>,
    /// Its guest's dirty rate, bytes/s (`None` until the worker has measured it).
    pub dirty: Option<f64>,
}

impl Sampler {
    /// A sample from the host's `/proc/stat` ticks (busy, total), its memory in use and its
    /// workers' readings; `None` the first time (a rate needs two readings).
    pub fn sample_from(
        &mut self,
        at: u64,
        elapsed_s: f64,
        ticks: Option<(u64, u64)>,
        cores: u32,
        memory_used_mib: u64,
        workers: &[WorkerReading],
    ) -> Option<Sample> {
        let host_cpu = match (self.host_ticks, ticks) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                Some(b1.saturating_sub(b0) as f64 / (t1 - t0) as f64 * f64::from(cores))
            }
            _ => None,
        };
        self.host_ticks = ticks;
        let first = !self.primed;
        let mut vms = Vec::new();
        let mut seen = HashMap::new();
        for w in workers {
            if let Some(prev) = self.vms.get(&w.name) {
                // A new worker (moved, restarted) starts its rate again.
                if prev.pid == w.pid && w.cpu_seconds >= prev.cpu_seconds && elapsed_s > 0.0 {
                    let io = match (&prev.io, &w.io) {
                        (Some(a), Some(b)) => Throughput::between(a, b, elapsed_s),
                        _ => None,
                    };
                    vms.push(VmSample {
                        name: w.name.clone(),
                        cpu_cores: (w.cpu_seconds - prev.cpu_seconds) / elapsed_s,
                        rss_mib: w.rss_mib,
                        memory_mib: w.memory_mib,
                        io: io.unwrap_or_default(),
                        dirty: w.dirty.unwrap_or(0.0),
                    });
                }
            }
            seen.insert(
                w.name.clone(),
                Seen {
                    cpu_seconds: w.cpu_seconds,
                    pid: w.pid,
                    io: w.io,
                },
            );
        }
        self.vms = seen;
        self.primed = true;
        if first {
            return None;
        }
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Some(Sample {
            at,
            cpu_cores: host_cpu.unwrap_or_else(|| vms.iter().map(|v| v.cpu_cores).sum()),
            memory_used_mib,
            vms,
        })
    }
}

/// The host's CPU ticks from `/proc/stat`: (busy, total), or `None` if it cannot be read.
pub fn host_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: u64, cpu: f64, vm_cpu: &[(&str, f64)]) -> Sample {
        Sample {
            at,
            cpu_cores: cpu,
            memory_used_mib: 1000,
            vms: vm_cpu
                .iter()
                .map(|(n, c)| VmSample {
                    name: n.to_string(),
                    cpu_cores: *c,
                    rss_mib: 10,
                    memory_mib: 16,
                    io: Throughput {
                        disk_read: 1000.0 * c,
                        ..Default::default()
                    },
                    dirty: 2000.0 * c,
                })
                .collect(),
        }
    }

    #[test]
    fn the_history_is_bounded_and_summarizes_average_peak_and_now() {
        let mut h = History::default();
        // Two days at 10 s.
        let start = 1_000_000 * COARSE_EVERY_S;
        for i in 0..(2 * 86_400 / FINE_EVERY_S) {
            let t = start + i * FINE_EVERY_S;
            let cpu = if i % 2 == 0 { 1.0 } else { 3.0 };
            h.record(sample(t, cpu, &[("a", cpu / 2.0)]));
        }
        assert_eq!(h.fine.len(), FINE_KEEP);
        assert_eq!(h.coarse.len(), COARSE_KEEP);
        let end = start + (2 * 86_400 / FINE_EVERY_S - 1) * FINE_EVERY_S;
        // The last hour: fine samples alternating 1 and 3.
        let u = h.summary("h1", 4, 8192, end + 1 - 3600);
        assert_eq!(u.samples, 360);
        assert!((u.cpu_cores.avg - 2.0).abs() < 1e-9, "{u:?}");
        assert_eq!(u.cpu_cores.peak, 3.0);
        assert_eq!(u.cpu_cores.now, 3.0);
        assert_eq!(u.vms.len(), 1);
        assert!((u.vms[0].cpu_cores.avg - 1.0).abs() < 1e-9);
        // Throughput the same way (the VM reads 1000 bytes/s per core), per VM and per host.
        assert!(
            (u.vms[0].io.disk_read.avg - 1000.0).abs() < 1e-6,
            "{:?}",
            u.vms[0].io
        );
        assert_eq!(u.vms[0].io.disk_read.peak, 1500.0);
        assert_eq!(u.io.disk_read.now, 1500.0);
        // The dirty rate too (2000 bytes/s per core).
        assert!(
            (u.vms[0].dirty.avg - 2000.0).abs() < 1e-6,
            "{:?}",
            u.vms[0].dirty
        );
        assert_eq!(u.dirty.peak, 3000.0);
        // The last day: coarse averages (2.0 each: peaks are smoothed) before the fine hour.
        let d = h.summary("h1", 4, 8192, end - 86_400 + 1);
        assert!(
            d.samples > 360 && d.samples <= 360 + COARSE_KEEP,
            "{}",
            d.samples
        );
        assert!((d.cpu_cores.avg - 2.0).abs() < 1e-6);
        assert!(
            (d.vms[0].io.disk_read.avg - 1000.0).abs() < 1e-3,
            "averaged like CPU"
        );
        assert!((d.vms[0].dirty.avg - 2000.0).abs() < 1e-3);
        assert!(d.from >= end - 86_400);
        // Nothing before the kept day.
        assert!(h.since(0).len() <= FINE_KEEP + COARSE_KEEP);
    }

    #[test]
    fn rates_come_from_two_readings_of_the_same_worker() {
        let mut s = Sampler::default();
        let w = |cpu: f64, pid: u32| {
            vec![WorkerReading {
                name: "a".to_string(),
                pid,
                cpu_seconds: cpu,
                rss_mib: 20,
                memory_mib: 16,
                // 4 KiB read per CPU second, 1 MiB received per CPU second.
                io: Some(IoTotals {
                    disk_read_bytes: (cpu * 4096.0) as u64,
                    net_rx_bytes: (cpu * 1048576.0) as u64,
                    ..Default::default()
                }),
                dirty: Some(cpu * 100.0),
            }]
        };
        assert!(s
            .sample_from(100, 10.0, Some((0, 0)), 2, 500, &w(5.0, 7))
            .is_none());
        let x = s
            .sample_from(110, 10.0, Some((10, 40)), 2, 500, &w(10.0, 7))
            .unwrap();
        assert!((x.vms[0].cpu_cores - 0.5).abs() < 1e-9);
        // 5 CPU seconds more in 10 s: 20480 bytes read, 5 MiB received.
        assert!(
            (x.vms[0].io.disk_read - 2048.0).abs() < 1e-9,
            "{:?}",
            x.vms[0].io
        );
        assert!((x.vms[0].io.net_rx - 524288.0).abs() < 1e-9);
        assert_eq!(x.vms[0].io.disk_write, 0.0);
        // The dirty rate is the worker's own measure, taken as it is.
        assert_eq!(x.vms[0].dirty, 1000.0);
        assert!(
            (x.cpu_cores - 0.5).abs() < 1e-9,
            "10 of 40 ticks of 2 cores"
        );
        // A new worker (another pid): no rate until its second reading.
        let y = s
            .sample_from(120, 10.0, Some((20, 80)), 2, 500, &w(1.0, 8))
            .unwrap();
        assert!(y.vms.is_empty());
    }
}
