//! The README's main demo: a local cluster (etcd; four hosts, each a network namespace with its
//! own ferryd, on a management and a migration bridge; one shared directory), a guest that
//! checks its own memory, a live migration through the coordinator, a host drained for
//! maintenance and returned with failback — the guest's counter never restarting, every check
//! of its memory passing — the utilization, migration and placement reports, an idle host switched off and
//! on by the cluster, then a host whose agent hangs (SIGSTOP): its worker fences itself and
//! the VM restarts elsewhere, never running twice; then `ferry cluster down`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

struct Demo {
    ferry: PathBuf,
    dir: PathBuf,
    console: PathBuf,
    shown: std::cell::Cell<usize>,
    /// The API the CLI talks to (another host's while one is frozen).
    api: std::cell::RefCell<String>,
}

impl Demo {
    /// The guest's lines since its last boot (`dirtier: start`): one fresh run — its counter
    /// from 0, one step at a time; a copy still running elsewhere would interleave its own
    /// counter — and every check passed.
    fn check_restart(&self) -> Result<()> {
        let text = std::fs::read_to_string(&self.console)?;
        let lines: Vec<&str> = whole_lines(&text).collect();
        let from = lines
            .iter()
            .rposition(|l| l.starts_with("dirtier: start"))
            .context("the guest never booted again")?;
        let beats = ferry_testkit::beats(&(lines[from..].join("\n") + "\n"));
        if beats.first().is_some_and(|b| b.0 > 1) {
            bail!(
                "the VM was not restarted: its counter went on at {}",
                beats[0].0
            );
        }
        if let Some(w) = beats
            .windows(2)
            .find(|w| !ferry_testkit::console::one_run(w))
        {
            bail!("two counters on one console: {} then {}", w[0].0, w[1].0);
        }
        if beats.iter().any(|b| !b.1) {
            bail!("the guest found its memory damaged");
        }
        Ok(())
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.ferry);
        c.args(args)
            .env("FERRY_API", self.api.borrow().as_str())
            .env("FERRY_TOKEN_FILE", self.dir.join("token"));
        c
    }

    fn ferry(&self, args: &[&str]) -> Result<()> {
        println!("$ ferry {}", args.join(" "));
        let st = self.cmd(args).status().context("cannot run ferry")?;
        if !st.success() {
            bail!("ferry {} failed", args.join(" "));
        }
        Ok(())
    }

    fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let o = self.cmd(&a).output()?;
        if !o.status.success() {
            bail!(
                "ferry {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(serde_json::from_slice(&o.stdout)?)
    }

    fn host_of(&self, vm: &str) -> Result<String> {
        Ok(self.json(&["vm", "show", vm])?["host"]
            .as_str()
            .unwrap_or("-")
            .to_string())
    }

    /// Prints the guest's new console lines until `count` more beats have appeared.
    fn follow(&self, count: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut seen = 0;
        loop {
            let text = std::fs::read_to_string(&self.console).unwrap_or_default();
            let lines: Vec<&str> = whole_lines(&text).collect();
            for l in lines.iter().skip(self.shown.get()) {
                println!("    | {l}");
                if l.starts_with("beat") {
                    seen += 1;
                    if l.contains("BAD") {
                        bail!("the guest reports memory corruption: {l}");
                    }
                }
            }
            self.shown.set(lines.len());
            if seen >= count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the guest printed {seen} of {count} beats within 180 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every beat of the guest's life, across all its hosts: one counter, all `ok`.
    fn check(&self) -> Result<usize> {
        let text = std::fs::read_to_string(&self.console)?;
        let beats = ferry_testkit::beats(&text);
        if let Some(w) = beats
            .windows(2)
            .find(|w| !ferry_testkit::console::one_run(w))
        {
            bail!("the guest's counter jumped from {} to {}", w[0].0, w[1].0);
        }
        if beats.iter().any(|b| !b.1) {
            bail!("the guest found its memory damaged");
        }
        Ok(beats.len())
    }
}

/// Host `host`'s agent pid (from the state `ferry cluster up` wrote) and another host's API.
fn agent_pid(dir: &Path, host: &str) -> Result<(u32, String)> {
    let st: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("cluster.json"))?)?;
    let hosts = st["hosts"].as_array().context("cluster.json: no hosts")?;
    let pid = hosts
        .iter()
        .find(|h| h["name"] == host)
        .and_then(|h| h["pid"].as_u64())
        .and_then(|p| u32::try_from(p).ok())
        .with_context(|| format!("cluster.json: no agent for {host}"))?;
    let api = hosts
        .iter()
        .find(|h| h["name"] != host)
        .and_then(|h| h["api"].as_str())
        .context("cluster.json: no other host")?;
    Ok((pid, api.to_string()))
}

/// `kill -SIG pid`.
fn signal(pid: u32, sig: &str) -> Result<()> {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .context("kill")?;
    if !st.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

pub(crate) use ferry_testkit::whole_lines;

/// Runs the cluster demo.
pub fn run(ws: &Path) -> Result<()> {
    // etcd for the cluster, protoc to build its client, ip for the namespaces.
    crate::lab::ensure_commands(&[
        ("etcd", "etcd-server"),
        ("protoc", "protobuf-compiler"),
        ("ip", "iproute2"),
        ("gcc", "gcc"),
    ])?;
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(ws)
        .args(["build", "--release", "-p", "ferry", "-p", "ferry-guests"])
        .status()?;
    if !st.success() {
        bail!("build failed");
    }
    let dir = ws.join("target/demo-cluster");
    let d = Demo {
        ferry: ws.join("target/release/ferry"),
        console: dir.join("shared/consoles/demo.log"),
        dir: dir.clone(),
        shown: std::cell::Cell::new(0),
        api: std::cell::RefCell::new("http://10.88.0.11:7400".into()),
    };
    let dir_s = dir.display().to_string();
    let _ = d.cmd(&["cluster", "down", "--dir", &dir_s]).output();
    println!("== 1. a local cluster: etcd, four hosts (network namespaces, each with its ferryd), a management and a migration bridge, a shared directory ==");
    d.ferry(&["cluster", "up", "--hosts", "4", "--dir", &dir_s])?;
    let result = (|| -> Result<()> {
        let image = dir.join("shared/images/dirtier.elf");
        std::fs::copy(ws.join("target/guests/dirtier.elf"), &image)
            .context("copy the guest image to the shared directory")?;
        d.ferry(&["host", "list"])?;
        println!(
            "\n== 2. a highly available VM whose guest keeps rewriting its memory and checks it, with a disk on the shared storage =="
        );
        let disk = dir.join("shared/disks/demo.img").display().to_string();
        if let Some(parent) = Path::new(&disk).parent() {
            std::fs::create_dir_all(parent)?;
        }
        d.ferry(&["disk", "create", &disk, "--size", "64M"])?;
        d.ferry(&[
            "vm",
            "create",
            "demo",
            "--disk",
            &disk,
            "--scsi",
            "--kernel",
            &image.display().to_string(),
            "--memory",
            "64M",
            "--vcpus",
            "2",
            "--cmdline",
            "mb=8 rate=4000 beat_ms=250",
        ])?;
        d.follow(4)?;
        d.ferry(&["vm", "list"])?;
        println!("\n== 3. live-migrate it; the coordinator picks the destination ==");
        let first = d.host_of("demo")?;
        d.ferry(&["vm", "migrate", "demo"])?;
        d.follow(4)?;
        let second = d.host_of("demo")?;
        println!("\n== 3b. give it another disk while it runs: SCSI hot-plug, through any host ==");
        let data = dir.join("shared/disks/data.img").display().to_string();
        d.ferry(&["disk", "create", &data, "--size", "32M"])?;
        d.ferry(&["vm", "disk", "add", "demo", &data])?;
        d.ferry(&["vm", "disk", "list", "demo"])?;
        println!("\n== 4. maintenance: drain {second} (its VMs move away live), then return it with failback ==");
        d.ferry(&["host", "drain", &second])?;
        d.ferry(&["host", "list"])?;
        d.follow(4)?;
        let third = d.host_of("demo")?;
        d.ferry(&["host", "resume", &second, "--failback"])?;
        let deadline = Instant::now() + Duration::from_secs(120);
        // Back on it, and the migration ended (the owner changes a moment before the
        // migration's record does; a disk change is refused until then).
        while d.host_of("demo")? != second || d.json(&["vm", "show", "demo"])?["state"] != "running"
        {
            if Instant::now() > deadline {
                bail!("the VM did not move back to {second}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        d.follow(4)?;
        d.ferry(&["migration", "list"])?;
        // The reports: each host's and VM's use (CPU, memory, disk and network), what the
        // moves cost, and where the VM could go next and why.
        d.ferry(&["report", "utilization", "--since", "10m"])?;
        d.ferry(&["report", "migrations", "--since", "1h"])?;
        d.ferry(&["report", "placement", "demo"])?;
        d.ferry(&["vm", "list"])?;
        d.ferry(&["cluster", "status"])?;
        let n = d.check()?;
        d.ferry(&["disk", "inspect", &disk])?;
        // The hot-plugged disk went along with every move; taken away, its lock goes.
        d.ferry(&["vm", "disk", "list", "demo"])?;
        d.ferry(&["vm", "disk", "remove", "demo", &data])?;
        d.ferry(&["disk", "inspect", &data])?;
        println!(
            "\nThe guest ran on {first}, {second}, {third} and {second} again: {n} beats, one counter, never restarted, every check of its memory passed; its disks moved with it (held read-write by one worker at a time), the one added while it ran included."
        );
        // A host with no VM: the cluster can switch it off and on (its power driver here
        // stops and starts the host's ferryd in its namespace).
        // (Not h1: the CLI talks to its API.)
        let idle = ["h4", "h3"]
            .into_iter()
            .find(|h| *h != second)
            .unwrap_or("h4");
        println!("\n== 4b. power: {idle} switched off (standby: not failed, nothing restarted) and on again; the coordinator's own advice ==");
        d.ferry(&["cluster", "power", "--mode", "manual"])?;
        d.ferry(&["host", "standby", idle])?;
        d.ferry(&["host", "list"])?;
        d.ferry(&["host", "wake", idle])?;
        d.ferry(&["host", "list"])?;
        // The coordinator's next passes publish their advice (one of after the wake).
        let woke = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let deadline = Instant::now() + Duration::from_secs(30);
        while d.json(&["cluster", "power"])?["advice"]["at"]
            .as_u64()
            .is_none_or(|at| at <= woke + 1)
        {
            if Instant::now() > deadline {
                bail!("the coordinator published no power advice");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        d.ferry(&["cluster", "power"])?;
        d.ferry(&["cluster", "power", "--mode", "off"])?;
        println!("\n== 5. {second} hangs: its agent is frozen (SIGSTOP); its worker stops the VM by itself before the lease expires, and the cluster restarts the VM elsewhere, never twice ==");
        let (agent, other_api) = agent_pid(&dir, &second)?;
        *d.api.borrow_mut() = other_api;
        println!("$ kill -STOP {agent}   # the agent of {second}");
        signal(agent, "STOP")?;
        let moved = (|| -> Result<String> {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let v = d.json(&["vm", "show", "demo"])?;
                let h = v["host"].as_str().unwrap_or("-").to_string();
                if h != second && v["state"] == "running" {
                    return Ok(h);
                }
                if Instant::now() > deadline {
                    bail!("the VM did not restart off the frozen host");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })();
        signal(agent, "CONT")?;
        let fourth = moved?;
        d.follow(4)?;
        d.check_restart()?;
        d.ferry(&["vm", "list"])?;
        println!(
            "\nThe worker on the frozen {second} stopped the VM by itself; {fourth} booted it afresh (next epoch), and the console shows one run at a time."
        );
        Ok(())
    })();
    println!("\n== 6. tear the local cluster down ==");
    d.ferry(&["cluster", "down", "--dir", &dir_s])?;
    result
}
