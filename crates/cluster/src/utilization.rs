//! The agent's utilization sampling: every [`FINE_EVERY_S`] it reads the host's CPU ticks and
//! memory and its workers' CPU time, resident memory and device counters, and keeps the result in its bounded
//! [`History`](crate::history::History) — in this process, not in the store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::agent::Agent;
use crate::history::{
    host_ticks, HostUtilization, Sampler, Throughput, WorkerReading, FINE_EVERY_S,
};
use crate::inventory;
use crate::records::now;

impl Agent {
    /// Samples this host every [`FINE_EVERY_S`] seconds, for as long as the agent runs.
    pub async fn sample_loop(self: Arc<Self>) {
        let mut sampler = Sampler::default();
        let mut last = Instant::now();
        loop {
            let readings = self
                .run_blocking(|w| {
                    w.list()
                        .into_iter()
                        .filter_map(|s| {
                            let (cpu, rss) = inventory::process_usage(s.pid)?;
                            Some(WorkerReading {
                                name: s.name,
                                pid: s.pid,
                                cpu_seconds: cpu,
                                rss_mib: rss,
                                memory_mib: s.memory_mib,
                                io: s.io,
                                dirty: s.dirty.map(|d| d.bytes_per_second),
                            })
                        })
                        .collect::<Vec<WorkerReading>>()
                })
                .await;
            match readings {
                Ok(readings) => {
                    let (total, free) = inventory::memory_mib();
                    let elapsed = last.elapsed().as_secs_f64();
                    last = Instant::now();
                    if let Some(s) = sampler.sample_from(
                        now(),
                        elapsed,
                        host_ticks(),
                        self.cores(),
                        total.saturating_sub(free),
                        &readings,
                    ) {
                        self.st().history.record(s);
                    }
                }
                Err(e) => warn!("cannot sample this host's workers: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(FINE_EVERY_S)).await;
        }
    }

    /// The logical CPUs this host offers VMs.
    pub fn cores(&self) -> u32 {
        self.cfg.vm_cores.unwrap_or_else(inventory::cores)
    }

    /// This host's and its VMs' use since `since` (unix time).
    pub fn utilization(&self, since: u64) -> HostUtilization {
        let (total, _) = inventory::memory_mib();
        self.st()
            .history
            .summary(self.host(), self.cores(), total, since)
    }

    /// The latest sample's device throughput and dirty rate per VM, for `/metrics`.
    pub fn latest_io(&self) -> Vec<(String, Throughput, f64)> {
        self.st().history.latest().map_or_else(Vec::new, |s| {
            s.vms
                .iter()
                .map(|v| (v.name.clone(), v.io, v.dirty))
                .collect()
        })
    }

    /// The latest sample's figures, for `/metrics`: host CPU cores in use, and per VM.
    pub fn latest_cpu(&self) -> Option<(f64, Vec<(String, f64)>)> {
        self.st().history.latest().map(|s| {
            (
                s.cpu_cores,
                s.vms
                    .iter()
                    .map(|v| (v.name.clone(), v.cpu_cores))
                    .collect(),
            )
        })
    }
}
