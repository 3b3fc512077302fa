//! The README's demo: a guest that checks its own memory runs in a worker process, is saved to
//! a file, and continues in a new worker process restored from it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster_demo::whole_lines;

struct Demo {
    ferry: PathBuf,
}

const HOST_A: &str = "ferry-demo-a";
const HOST_B: &str = "ferry-demo-b";
const ADDR_B: &str = "10.231.99.2:7070";

/// Worker sockets live on a local file system (a UNIX socket cannot be bound on the lab host's
/// 9p share, where the workspace is).
fn run_dir() -> PathBuf {
    std::env::temp_dir().join("ferry-demo-run")
}

fn ip(args: &[&str]) -> Result<()> {
    let st = Command::new("ip")
        .args(args)
        .status()
        .context("cannot run ip (install iproute2)")?;
    if !st.success() {
        bail!("ip {} failed", args.join(" "));
    }
    Ok(())
}

/// Two demo "hosts": network namespaces joined by a veth pair (10.231.99.1 and .2).
fn make_hosts() -> Result<()> {
    remove_hosts();
    ip(&["netns", "add", HOST_A])?;
    ip(&["netns", "add", HOST_B])?;
    ip(&[
        "link", "add", "fdemo-a", "netns", HOST_A, "type", "veth", "peer", "name", "fdemo-b",
        "netns", HOST_B,
    ])?;
    ip(&[
        "-n",
        HOST_A,
        "addr",
        "add",
        "10.231.99.1/24",
        "dev",
        "fdemo-a",
    ])?;
    ip(&[
        "-n",
        HOST_B,
        "addr",
        "add",
        "10.231.99.2/24",
        "dev",
        "fdemo-b",
    ])?;
    for (ns, dev) in [(HOST_A, "fdemo-a"), (HOST_B, "fdemo-b")] {
        ip(&["-n", ns, "link", "set", dev, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    Ok(())
}

fn remove_hosts() {
    for ns in [HOST_A, HOST_B] {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Demo {
    fn ferry(&self, args: &[&str]) -> Result<()> {
        self.ferry_on(None, args)
    }

    fn ferry_on(&self, host: Option<&str>, args: &[&str]) -> Result<()> {
        let mut c = match host {
            Some(ns) => {
                println!("[{ns}]$ ferry {}", args.join(" "));
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.ferry);
                c
            }
            None => {
                println!("$ ferry {}", args.join(" "));
                Command::new(&self.ferry)
            }
        };
        let st = c
            .args(args)
            .env("FERRY_RUN_DIR", run_dir())
            .status()
            .context("cannot run ferry")?;
        if !st.success() {
            bail!("ferry {} failed", args.join(" "));
        }
        Ok(())
    }

    /// Prints the console's new lines until `count` lines starting with `marker` have appeared.
    fn follow(
        &self,
        log: &Path,
        marker: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut shown = 0;
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = whole_lines(&text).collect();
            for l in lines.iter().skip(shown) {
                println!("    | {l}");
            }
            shown = lines.len();
            let hits: Vec<String> = lines
                .iter()
                .filter(|l| l.starts_with(marker))
                .map(|l| l.to_string())
                .collect();
            if hits
                .iter()
                .any(|l| l.contains("BAD") || l.contains("DIRTIER-ERROR"))
                || text.contains("DIRTIER-ERROR")
            {
                bail!("the guest reports memory corruption");
            }
            if hits.len() >= count {
                return Ok(hits);
            }
            if Instant::now() > deadline {
                bail!(
                    "the guest printed {} of {count} '{marker}' lines within {timeout:?}",
                    hits.len()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn counter(line: &str) -> Option<u64> {
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Joins the consoles of one guest across its moves and checks that its counter never
/// restarted or skipped. Returns the last counter of the first console and the first of the
/// second.
fn check_continuous(marker: &str, consoles: &[&Path]) -> Result<(u64, u64)> {
    let mut text = String::new();
    let mut boundary = 0;
    for (i, c) in consoles.iter().enumerate() {
        text.push_str(&std::fs::read_to_string(c).unwrap_or_default());
        if i == 0 {
            boundary = whole_lines(&text).filter(|l| l.starts_with(marker)).count();
        }
    }
    let counters: Vec<u64> = whole_lines(&text)
        .filter(|l| l.starts_with(marker))
        .filter_map(counter)
        .collect();
    if let Some(w) = counters.windows(2).find(|w| w[1] != w[0] + 1) {
        bail!("the guest's counter jumped from {} to {}", w[0], w[1]);
    }
    let last_a = counters
        .get(boundary.saturating_sub(1))
        .copied()
        .unwrap_or(0);
    let first_b = counters.get(boundary).copied().unwrap_or(0);
    Ok((last_a, first_b))
}

/// Runs the demo (the Linux variant inside a lab host).
pub fn run(ws: &Path, linux: bool) -> Result<()> {
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(ws)
        .args(["build", "--release", "-p", "ferry", "-p", "ferry-guests"])
        .status()?;
    if !st.success() {
        bail!("build failed");
    }
    if linux && std::env::var_os("FERRY_DEMO_INSIDE_LAB").is_none() {
        let me = std::env::current_exe()?.display().to_string();
        std::env::set_var("FERRY_DEMO_INSIDE_LAB", "1");
        let opts = crate::lab::LabOpts {
            mem_mib: 4096,
            cpus: 2,
            timeout_s: 1200,
            verbose: false,
        };
        println!("demo: booting a lab host (a VM with a real hardware-virtualization KVM)...");
        let rc = crate::lab::run(ws, &opts, &[me, "demo".into(), "--linux".into()])?;
        if rc != 0 {
            bail!("the demo failed inside the lab host ({rc})");
        }
        return Ok(());
    }
    let dir = ws.join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let _ = std::fs::remove_dir_all(run_dir());
    std::fs::create_dir_all(run_dir())?;
    let d = Demo {
        ferry: ws.join("target/release/ferry"),
    };
    let s = |p: &Path| p.display().to_string();
    let console_a = dir.join("demo.console");
    let console_b = dir.join("demo-restored.console");
    let state = dir.join("demo.state");
    let (marker, start_args): (&str, Vec<String>) = if linux {
        let g = std::env::var_os("FERRY_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| ws.join("../shared/guest"));
        (
            "tick",
            vec![
                "--kernel".into(),
                s(&g.join("vmlinux")),
                "--initrd".into(),
                s(&g.join("initramfs.cpio.gz")),
                "--cmdline".into(),
                "console=ttyS0 dirtier.mb=32".into(),
                "--memory".into(),
                "256M".into(),
                "--vcpus".into(),
                "2".into(),
            ],
        )
    } else {
        (
            "beat",
            vec![
                "--kernel".into(),
                s(&ws.join("target/guests/dirtier.elf")),
                "--cmdline".into(),
                "mb=8 rate=4000 beat_ms=250".into(),
                "--memory".into(),
                "64M".into(),
                "--vcpus".into(),
                "2".into(),
            ],
        )
    };
    make_hosts()?;
    let result = (|| -> Result<()> {
        let console_c = dir.join("demo-back.console");
        println!(
            "\n== 0. a cluster CA, and an identity for each host (migrations use mutual TLS) =="
        );
        let pki = dir.join("pki");
        let _ = std::fs::remove_dir_all(&pki);
        let (pki_a, pki_b) = (s(&pki.join(HOST_A)), s(&pki.join(HOST_B)));
        d.ferry(&[
            "pki",
            "init",
            &s(&pki.join("ca")),
            "--cluster",
            "demo",
            "--host",
            "ca-host",
        ])?;
        for (host, id) in [(HOST_A, &pki_a), (HOST_B, &pki_b)] {
            d.ferry(&[
                "pki",
                "issue",
                "--ca",
                &s(&pki.join("ca")),
                "--host",
                host,
                id,
            ])?;
        }
        println!(
            "\n== 1. on host A, start a VM whose guest keeps rewriting its memory and checks it =="
        );
        let mut a: Vec<&str> = vec!["vm", "start", "demo"];
        a.extend(start_args.iter().map(String::as_str));
        let ca = s(&console_a);
        a.extend(["--console-log", &ca]);
        d.ferry_on(Some(HOST_A), &a)?;
        d.follow(&console_a, marker, 4, Duration::from_secs(300))?;
        println!("\n== 2. on host B, a worker waits for the VM ==");
        d.ferry_on(
            Some(HOST_B),
            &[
                "vm",
                "receive",
                "demo-b",
                "--listen",
                ADDR_B,
                "--console-log",
                &s(&console_b),
                "--pki",
                &pki_b,
            ],
        )?;
        d.ferry(&["vm", "list"])?;
        println!("\n== 3. live-migrate it from A to B while it runs ==");
        d.ferry_on(
            Some(HOST_A),
            &["vm", "migrate", "demo", "--to", ADDR_B, "--pki", &pki_a],
        )?;
        d.ferry(&["vm", "list"])?;
        d.follow(&console_b, marker, 4, Duration::from_secs(300))?;
        let (last_a, first_b) = check_continuous(marker, &[&console_a, &console_b])?;
        println!("\nThe guest went on from {last_a} on host A to {first_b} on host B without a gap; every check of its memory passed.");
        println!("\n== 4. quick migration back: save on B, restore on A ==");
        d.ferry_on(Some(HOST_B), &["vm", "save", "demo-b", "--to", &s(&state)])?;
        d.ferry_on(
            Some(HOST_A),
            &[
                "vm",
                "restore",
                &s(&state),
                "--name",
                "demo",
                "--console-log",
                &s(&console_c),
            ],
        )?;
        let back = d.follow(&console_c, marker, 3, Duration::from_secs(300))?;
        check_continuous(marker, &[&console_a, &console_b, &console_c])?;
        d.ferry(&["vm", "list"])?;
        d.ferry_on(Some(HOST_A), &["vm", "stop", "demo"])?;
        println!(
            "\nBack on host A at {} — one guest, never restarted, memory intact throughout.",
            back.first().map(String::as_str).unwrap_or("?")
        );
        Ok(())
    })();
    for n in ["demo", "demo-b"] {
        let _ = Command::new(&d.ferry)
            .args(["vm", "stop", n])
            .env("FERRY_RUN_DIR", run_dir())
            .output();
    }
    remove_hosts();
    result?;
    Ok(())
}
