//! HA failover time: a local cluster (`ferry cluster up`, 3 hosts, lease TTL 5 s), a dirtier
//! VM, its host's agent killed (SIGKILL; its workers go with it). Measured: from the kill to the
//! guest's first beat on another host. Baseline, same run: from `ferry vm create` of an
//! identical VM to its first beat (what a restart costs without the failure detection). The
//! target is 10 s.
//!
//! `cargo run --release -p ferry-bench --bin failover` (root: network namespaces, /dev/kvm).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn ws() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Bench {
    ferry: PathBuf,
    dir: PathBuf,
}

impl Bench {
    fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let o = Command::new(&self.ferry)
            .args(args)
            .args(["--output", "json"])
            .env("FERRY_API", "http://10.88.0.11:7400")
            .env("FERRY_TOKEN_FILE", self.dir.join("token"))
            .output()?;
        if !o.status.success() {
            bail!(
                "ferry {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(serde_json::from_slice(&o.stdout)?)
    }

    fn console(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("shared/consoles/{vm}.log"))
    }

    /// Waits for the `n`th `beat` line of `vm`'s console.
    fn wait_beats(&self, vm: &str, n: usize) -> Result<Instant> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let text = std::fs::read_to_string(self.console(vm)).unwrap_or_default();
            if text.lines().filter(|l| l.starts_with("beat ")).count() >= n {
                return Ok(Instant::now());
            }
            if text.contains("BAD") {
                bail!("{vm}: memory damaged");
            }
            if Instant::now() > deadline {
                bail!("{vm}: fewer than {n} beats");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn create(&self, vm: &str) -> Result<()> {
        let k = ws().join("target/guests/dirtier.elf");
        self.json(&[
            "vm",
            "create",
            vm,
            "--kernel",
            &k.display().to_string(),
            "--memory",
            "32M",
            "--cmdline",
            "mb=4 rate=2000 beat_ms=50",
        ])?;
        Ok(())
    }
}

fn main() -> Result<()> {
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(ws())
        .args(["build", "--release", "-p", "ferry", "-p", "ferry-guests"])
        .status()?;
    if !st.success() {
        bail!("build failed");
    }
    let b = Bench {
        ferry: ws().join("target/release/ferry"),
        dir: ws().join("target/bench-failover"),
    };
    let dir = b.dir.display().to_string();
    let _ = Command::new(&b.ferry)
        .args(["cluster", "down", "--dir", &dir])
        .output();
    let up = Command::new(&b.ferry)
        .args(["cluster", "up", "--hosts", "3", "--dir", &dir])
        .output()
        .context("ferry cluster up")?;
    if !up.status.success() {
        bail!("{}", String::from_utf8_lossy(&up.stderr));
    }
    let result = (|| -> Result<(Duration, Duration, Duration)> {
        // Baseline: define to first beat.
        let t = Instant::now();
        b.create("boot")?;
        let boot = b.wait_beats("boot", 1)?.duration_since(t);

        b.create("ha")?;
        b.wait_beats("ha", 3)?;
        let host = b.json(&["vm", "show", "ha"])?["host"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(b.dir.join("cluster.json"))?)?;
        let pid = state["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|h| h["name"] == host.as_str())
            .and_then(|h| h["pid"].as_u64())
            .context("the VM's host is not in cluster.json")?;
        let before = std::fs::read_to_string(b.console("ha"))?
            .lines()
            .filter(|l| l.starts_with("beat "))
            .count();
        let t = Instant::now();
        let pid = i32::try_from(pid).context("bad pid")?;
        // SAFETY: kill sends SIGKILL to the agent `ferry cluster up` started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        // Running again: a worker with running vCPUs on a live host, as the API reports it.
        let running = loop {
            let v = b.json(&["vm", "show", "ha"])?;
            if v["state"] == "running" && v["host"] != host.as_str() {
                break t.elapsed();
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("ha did not run again within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let back = b.wait_beats("ha", before + 1)?.duration_since(t);
        let now_on = b.json(&["vm", "show", "ha"])?["host"].clone();
        println!("ha: {host} killed; running again on {now_on}");
        Ok((running, back, boot))
    })();
    let _ = Command::new(&b.ferry)
        .args(["cluster", "down", "--dir", &dir])
        .output();
    let (running, failover, boot) = result?;
    let ttl = Duration::from_secs(5);
    println!(
        "\nHA failover (3 hosts, lease TTL 5 s, host agent SIGKILLed):\n  kill → running on another host: {:>6} ms ({:.2}× the lease TTL; target 10 s: {})\n  kill → guest's first beat there: {:>6} ms\n  baseline create → first beat:    {:>6} ms (a cold start of the same VM)\n  ratio (kill → first beat) / baseline: {:.1}×",
        running.as_millis(),
        running.as_secs_f64() / ttl.as_secs_f64(),
        if running <= Duration::from_secs(10) { "met" } else { "MISSED" },
        failover.as_millis(),
        boot.as_millis(),
        failover.as_secs_f64() / boot.as_secs_f64().max(1e-3),
    );
    Ok(())
}
