//! The README's demo: a guest that checks its own memory runs in a worker process, is saved to
//! a file, and continues in a new worker process restored from it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

struct Demo {
    ferry: PathBuf,
    dir: PathBuf,
}

impl Demo {
    fn ferry(&self, args: &[&str]) -> Result<()> {
        println!("$ ferry {}", args.join(" "));
        let st = Command::new(&self.ferry)
            .args(args)
            .env("FERRY_RUN_DIR", self.dir.join("run"))
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
            let lines: Vec<&str> = text.lines().collect();
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
    std::fs::create_dir_all(dir.join("run"))?;
    let d = Demo {
        ferry: ws.join("target/release/ferry"),
        dir: dir.clone(),
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
    println!("\n== 1. start a VM whose guest keeps rewriting its memory and checks it ==");
    let mut a: Vec<&str> = vec!["vm", "start", "demo"];
    a.extend(start_args.iter().map(String::as_str));
    let ca = s(&console_a);
    a.extend(["--console-log", &ca]);
    d.ferry(&a)?;
    let before = d.follow(&console_a, marker, 4, Duration::from_secs(180))?;
    d.ferry(&["vm", "list"])?;
    println!("\n== 2. save it: pause, write every vCPU/irqchip/device state and the memory, stop the worker ==");
    d.ferry(&["vm", "save", "demo", "--to", &s(&state)])?;
    d.ferry(&["vm", "list"])?;
    println!("\n== 3. restore it in a new worker process ==");
    d.ferry(&[
        "vm",
        "restore",
        &s(&state),
        "--name",
        "demo-restored",
        "--console-log",
        &s(&console_b),
    ])?;
    d.ferry(&["vm", "list"])?;
    let after = d.follow(&console_b, marker, 4, Duration::from_secs(180))?;
    d.ferry(&["vm", "stop", "demo-restored"])?;
    let last = before.last().and_then(|l| counter(l)).unwrap_or(0);
    let first = after.first().and_then(|l| counter(l)).unwrap_or(0);
    if first <= last || first > last + 2 {
        bail!("the counter did not continue: {last} before the save, {first} after");
    }
    println!(
        "\nThe guest's counter went on from {last} to {first} in a new process, and every check of its memory passed."
    );
    Ok(())
}
