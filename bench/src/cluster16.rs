//! The seed's cluster size on one machine: a 16-host local cluster (`ferry cluster up --hosts
//! 16`, network namespaces, real etcd), one small self-checking VM per host. Measured:
//! 1. every VM asked to move at once: the most live migrations seen running together (the
//!    limit is ⌊16/2⌋ = 8, one per host), and the wall time of the whole wave against the
//!    baseline of one migration alone in the same run;
//! 2. a rolling maintenance: every host drained in turn and returned, the time per host and
//!    in all;
//!
//! and at the end every guest's memory intact and its counter never restarted.
//!
//! `cargo run --release -p ferry-bench --bin cluster16 [-- --hosts N]` (root).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

fn ws() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Bench {
    ferry: PathBuf,
    dir: PathBuf,
}

impl Bench {
    fn json(&self, args: &[&str]) -> Result<Value> {
        let o = Command::new(&self.ferry)
            .args(args)
            .args(["--output", "json"])
            .env("FERRY_API", "http://10.88.0.11:7400")
            .env("FERRY_TOKEN_FILE", self.dir.join("token"))
            .output()?;
        if !o.status.success() {
            bail!(
                "ferry {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(serde_json::from_slice(&o.stdout)?)
    }

    fn console(&self, vm: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("shared/consoles/{vm}.log")))
            .unwrap_or_default()
    }

    fn beats(&self, vm: &str) -> usize {
        self.console(vm)
            .lines()
            .filter(|l| l.starts_with("beat "))
            .count()
    }

    fn wait(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !cond()? {
            if Instant::now() > deadline {
                bail!("not within {}s: {what}", timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn migrations(&self) -> Result<Vec<Value>> {
        Ok(self
            .json(&["migration", "list"])?
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    fn active(&self) -> Result<usize> {
        Ok(self
            .migrations()?
            .iter()
            .filter(|m| m["state"] == "running" || m["state"] == "queued")
            .count())
    }

    fn host_of(&self, vm: &str) -> Result<String> {
        Ok(self.json(&["vm", "show", vm])?["host"]
            .as_str()
            .unwrap_or("-")
            .to_string())
    }
}

/// Watches the migrations until none is left: the most running at once across the cluster
/// and on any one host.
fn watch(b: &Bench, timeout: Duration) -> Result<(usize, usize)> {
    let (mut peak, mut per_host_peak) = (0, 0);
    b.wait("every migration ended", timeout, || {
        let ms = b.migrations()?;
        let running: Vec<&Value> = ms.iter().filter(|m| m["state"] == "running").collect();
        peak = peak.max(running.len());
        let mut per: HashMap<String, usize> = HashMap::new();
        for m in &running {
            for end in ["from", "to"] {
                *per.entry(m[end].as_str().unwrap_or("-").to_string())
                    .or_default() += 1;
            }
        }
        per_host_peak = per_host_peak.max(per.values().copied().max().unwrap_or(0));
        Ok(!ms
            .iter()
            .any(|m| m["state"] == "running" || m["state"] == "queued"))
    })?;
    Ok((peak, per_host_peak))
}

fn main() -> Result<()> {
    let mut hosts: u8 = 16;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, n] = args.as_slice() {
        if flag != "--hosts" {
            bail!("usage: cluster16 [--hosts N]");
        }
        hosts = n.parse().context("--hosts takes a number")?;
    }
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(ws())
        .args(["build", "--release", "-p", "ferry", "-p", "ferry-guests"])
        .status()?;
    if !st.success() {
        bail!("build failed");
    }
    let b = Bench {
        ferry: ws().join("target/release/ferry"),
        dir: ws().join("target/bench-cluster16"),
    };
    let dir = b.dir.display().to_string();
    let _ = Command::new(&b.ferry)
        .args(["cluster", "down", "--dir", &dir])
        .output();
    let t_up = Instant::now();
    let up = Command::new(&b.ferry)
        .args([
            "cluster",
            "up",
            "--hosts",
            &hosts.to_string(),
            "--dir",
            &dir,
        ])
        .output()
        .context("ferry cluster up")?;
    if !up.status.success() {
        bail!("{}", String::from_utf8_lossy(&up.stderr));
    }
    let up_time = t_up.elapsed();
    let result = (|| -> Result<String> {
        let image = b.dir.join("shared/images/dirtier.elf");
        std::fs::copy(ws().join("target/guests/dirtier.elf"), &image)?;
        let image = image.display().to_string();
        let vms: Vec<String> = (1..=hosts).map(|i| format!("v{i:02}")).collect();
        for vm in &vms {
            // Small and mostly halted: sixteen of them share this machine's cores.
            b.json(&[
                "vm",
                "create",
                vm,
                "--kernel",
                &image,
                "--memory",
                "64M",
                "--cmdline",
                "mb=2 rate=100 beat_ms=500 busy=0",
            ])?;
        }
        b.wait("every VM beating", Duration::from_secs(300), || {
            Ok(vms.iter().all(|v| b.beats(v) >= 2))
        })?;
        let placed: HashSet<String> = vms.iter().map(|v| b.host_of(v)).collect::<Result<_>>()?;
        let max = b.json(&["cluster", "status"])?["max_migrations"]
            .as_u64()
            .unwrap_or(0);

        // Baseline: one migration alone.
        let t = Instant::now();
        b.json(&["vm", "migrate", &vms[0]])?;
        let single = t.elapsed();

        // Everything at once.
        let t = Instant::now();
        for vm in &vms {
            b.json(&["vm", "migrate", vm, "--no-wait"])?;
        }
        let (peak, per_host_peak) = watch(&b, Duration::from_secs(600))?;
        let wave = t.elapsed();
        let failed: Vec<String> = b
            .migrations()?
            .iter()
            .filter(|m| m["state"] != "succeeded")
            .map(|m| format!("{} {}: {}", m["vm"], m["state"], m["error"]))
            .collect();

        // Rolling maintenance.
        let t_all = Instant::now();
        let mut per_host = Vec::new();
        for i in 1..=hosts {
            let h = format!("h{i}");
            let t = Instant::now();
            b.json(&["host", "drain", &h])?;
            b.json(&["host", "resume", &h])?;
            per_host.push(t.elapsed());
        }
        let rolling = t_all.elapsed();
        b.wait("the last moves ended", Duration::from_secs(120), || {
            Ok(b.active()? == 0)
        })?;

        // Every guest intact: beats go on, no damage, one run.
        let before: Vec<usize> = vms.iter().map(|v| b.beats(v)).collect();
        b.wait("every VM beating on", Duration::from_secs(120), || {
            Ok(vms.iter().zip(&before).all(|(v, n)| b.beats(v) >= n + 2))
        })?;
        let mut intact = 0;
        for vm in &vms {
            let text = b.console(vm);
            let starts = text.lines().filter(|l| *l == "dirtier: start").count();
            if text.contains("BAD") || starts != 1 {
                println!("{vm}: DAMAGED or restarted ({starts} starts)");
            } else {
                intact += 1;
            }
        }
        let n = b.migrations()?.len();
        let slowest = per_host.iter().max().copied().unwrap_or_default();
        let mean =
            per_host.iter().map(Duration::as_secs_f64).sum::<f64>() / per_host.len().max(1) as f64;
        println!(
            "\n{hosts}-host local cluster (up in {:.1} s; {} VMs on {} hosts):",
            up_time.as_secs_f64(),
            vms.len(),
            placed.len()
        );
        println!(
            "  all {} VMs asked to move at once: {:.2} s; peak {peak} running (limit {max}), at most {per_host_peak} per host; {} failed",
            vms.len(),
            wave.as_secs_f64(),
            failed.len()
        );
        for f in &failed {
            println!("    {f}");
        }
        println!(
            "  baseline, one migration alone: {:.2} s; the wave took {:.1}× that ({} VMs, {max} at a time: {:.1}× if perfectly parallel)",
            single.as_secs_f64(),
            wave.as_secs_f64() / single.as_secs_f64().max(1e-3),
            vms.len(),
            (vms.len() as f64 / max.max(1) as f64).ceil()
        );
        println!(
            "  rolling maintenance (drain, resume, every host in turn): {:.1} s in all, {:.2} s per host (slowest {:.2} s)",
            rolling.as_secs_f64(),
            mean,
            slowest.as_secs_f64()
        );
        println!(
            "  {n} migrations in all; guests intact: {intact}/{}",
            vms.len()
        );
        Ok(format!(
            "cluster16: hosts={hosts} vms={} peak_migrations={peak} limit={max} per_host_peak={per_host_peak} failed={} wave_s={:.2} single_s={:.2} rolling_s={:.1} per_host_s={mean:.2} intact={intact}/{}",
            vms.len(),
            failed.len(),
            wave.as_secs_f64(),
            single.as_secs_f64(),
            rolling.as_secs_f64(),
            vms.len()
        ))
    })();
    let _ = Command::new(&b.ferry)
        .args(["cluster", "down", "--dir", &dir])
        .output();
    let line = result?;
    println!("{line}");
    Ok(())
}
