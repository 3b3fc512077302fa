//! Ferry against QEMU: the same Linux guest (../shared/guest), the same host, the same run,
//! the same downtime limit (100 ms), migrated over loopback with the link unlimited or
//! limited by `tc` to 10 GbE and 1 GbE. Needs a KVM that runs Linux: run it in a lab host,
//! `cargo xtask bench-qemu`.
//!
//! QEMU: `-M microvm,acpi=off -accel kvm -cpu host`, migrated with QMP `migrate` to an
//! `-incoming` twin, polled with `query-migrate`; `downtime-limit` 100 ms, `max-bandwidth`
//! unlimited, `auto-converge` on (Ferry's is on by default). Ferry: `ferry vm migrate
//! --downtime-ms 100` with its defaults (TLS, 2 connections) and, like QEMU, plain TCP over one
//! connection (`--insecure --connections 1`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::Bench;

/// One migration's numbers.
#[derive(Clone, Debug, Default)]
struct Outcome {
    total_ms: u64,
    downtime_ms: u64,
    guest_ms: Option<u64>,
    bytes: u64,
    note: String,
}

fn guest_dir() -> PathBuf {
    std::env::var_os("FERRY_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::ws().join("../shared/guest"))
}

/// Sets (or clears, with `None`) a rate limit on loopback, in Mbit/s.
fn set_link(mbit: Option<u64>) -> Result<()> {
    let _ = Command::new("tc")
        .args(["qdisc", "del", "dev", "lo", "root"])
        .stderr(Stdio::null())
        .status();
    if let Some(m) = mbit {
        let st = Command::new("tc")
            .args(["qdisc", "add", "dev", "lo", "root", "tbf", "rate"])
            .arg(format!("{m}mbit"))
            .args(["burst", "1mb", "latency", "200ms"])
            .status()
            .context("tc")?;
        if !st.success() {
            bail!("tc could not limit loopback to {m} Mbit/s");
        }
    }
    Ok(())
}

fn ticks(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("tick "))
        .count()
}

fn intact(log: &Path) -> bool {
    !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("DIRTIER-ERROR")
}

fn wait_ticks(log: &Path, n: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while ticks(log) < n {
        if Instant::now() > deadline {
            bail!("no {n} ticks in {} within {timeout:?}", log.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(e).context("QMP socket"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        q.line()?; // greeting
        q.cmd("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<serde_json::Value> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            bail!("QMP connection closed");
        }
        Ok(serde_json::from_str(&l)?)
    }

    fn cmd(&mut self, name: &str, args: serde_json::Value) -> Result<serde_json::Value> {
        let req = serde_json::json!({"execute": name, "arguments": args});
        writeln!(self.w, "{req}")?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {name}: {e}");
            }
            // Events: skip.
        }
    }
}

struct Kill(Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn qemu(
    dir: &Path,
    tag: &str,
    mem_mib: u64,
    cmdline: &str,
    incoming: Option<u16>,
) -> Result<Child> {
    let g = guest_dir();
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,acpi=off",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-smp",
        "1",
    ])
    .args([
        "-m",
        &mem_mib.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ])
    .arg("-kernel")
    .arg(g.join("bzImage"))
    .arg("-initrd")
    .arg(g.join("initramfs.cpio.gz"))
    .args(["-append", cmdline])
    .arg("-chardev")
    .arg(format!(
        "file,id=con,path={}",
        dir.join(format!("{tag}.console")).display()
    ))
    .args(["-serial", "chardev:con"])
    .arg("-qmp")
    .arg(format!(
        "unix:{},server=on,wait=off",
        dir.join(format!("{tag}.qmp")).display()
    ));
    if let Some(p) = incoming {
        c.arg("-incoming").arg(format!("tcp:127.0.0.1:{p}"));
    }
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{tag}.stderr")))?)
        .spawn()
        .context("cannot start qemu-system-x86_64")
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn run_qemu(dir: &Path, mem_mib: u64, cmdline: &str) -> Result<Outcome> {
    let _ = std::fs::remove_file(dir.join("qs.console"));
    let _ = std::fs::remove_file(dir.join("qd.console"));
    let port = free_port()?;
    let src = qemu(dir, "qs", mem_mib, cmdline, None)?;
    let dst = qemu(dir, "qd", mem_mib, cmdline, Some(port))?;
    let _guard = Kill(vec![src, dst]);
    wait_ticks(&dir.join("qs.console"), 3, Duration::from_secs(300))?;
    let mut q = Qmp::connect(&dir.join("qs.qmp"))?;
    q.cmd(
        "migrate-set-capabilities",
        serde_json::json!({"capabilities": [{"capability": "auto-converge", "state": true}]}),
    )?;
    q.cmd(
        "migrate-set-parameters",
        serde_json::json!({"downtime-limit": 100, "max-bandwidth": 1u64 << 40}),
    )?;
    q.cmd(
        "migrate",
        serde_json::json!({"uri": format!("tcp:127.0.0.1:{port}")}),
    )?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let info = loop {
        let v = q.cmd("query-migrate", serde_json::json!({}))?;
        match v["status"].as_str() {
            Some("completed") => break v,
            Some("failed") | Some("cancelled") => bail!("QEMU migration {}: {v}", v["status"]),
            _ if Instant::now() > deadline => {
                let _ = q.cmd("migrate_cancel", serde_json::json!({}));
                return Ok(Outcome {
                    note: "did not complete in 300 s".into(),
                    ..Default::default()
                });
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let before = ticks(&dir.join("qd.console"));
    wait_ticks(
        &dir.join("qd.console"),
        before + 2,
        Duration::from_secs(120),
    )?;
    if !intact(&dir.join("qd.console")) {
        bail!("QEMU: the guest found its memory damaged after the migration");
    }
    Ok(Outcome {
        total_ms: info["total-time"].as_u64().unwrap_or(0),
        downtime_ms: info["downtime"].as_u64().unwrap_or(0),
        guest_ms: None,
        bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
        note: String::new(),
    })
}

fn run_ferry(
    b: &Bench,
    dir: &Path,
    mem_mib: u64,
    cmdline: &str,
    extra: &[&str],
) -> Result<Outcome> {
    let g = guest_dir();
    let (a, c) = (dir.join("fs.console"), dir.join("fd.console"));
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&c);
    let s = |p: &Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("path"))
    };
    b.ferry(&[
        "vm",
        "start",
        "fs",
        "--kernel",
        &s(&g.join("vmlinux"))?,
        "--initrd",
        &s(&g.join("initramfs.cpio.gz"))?,
        "--cmdline",
        cmdline,
        "--memory",
        &format!("{mem_mib}M"),
        "--console-log",
        &s(&a)?,
    ])?;
    let res = (|| -> Result<Outcome> {
        wait_ticks(&a, 3, Duration::from_secs(300))?;
        let mut recv = vec![
            "vm",
            "receive",
            "fd",
            "--listen",
            "127.0.0.1:0",
            "--console-log",
        ];
        let cs = s(&c)?;
        recv.push(&cs);
        if extra.contains(&"--insecure") {
            recv.push("--insecure");
        }
        let r = b.ferry(&recv)?;
        let addr = r["listen"].as_str().context("listen")?.to_string();
        let mut m = vec!["vm", "migrate", "fs", "--to", &addr, "--downtime-ms", "100"];
        m.extend_from_slice(extra);
        let rep = b.ferry(&m)?;
        let before = ticks(&c);
        wait_ticks(&c, before + 2, Duration::from_secs(120))?;
        if !intact(&c) {
            bail!("Ferry: the guest found its memory damaged after the migration");
        }
        Ok(Outcome {
            total_ms: rep["total_ms"].as_u64().unwrap_or(0),
            downtime_ms: rep["downtime_ms"].as_u64().unwrap_or(0),
            guest_ms: rep["guest_downtime_ms"].as_u64(),
            bytes: rep["bytes_sent"].as_u64().unwrap_or(0),
            note: String::new(),
        })
    })();
    let _ = b.ferry(&["vm", "stop", "fd"]);
    let _ = b.ferry(&["vm", "stop", "fs"]);
    res
}

fn cell(o: &Outcome) -> String {
    if !o.note.is_empty() {
        return o.note.clone();
    }
    format!(
        "{:>6} ms, down {:>4} ms{}, {:>7.1} MiB",
        o.total_ms,
        o.downtime_ms,
        o.guest_ms
            .map(|g| format!(" (guest {g} ms)"))
            .unwrap_or_default(),
        o.bytes as f64 / 1048576.0
    )
}

fn ratio(a: u64, b: u64) -> String {
    if a == 0 || b == 0 {
        "-".into()
    } else {
        format!("{:.2}", a as f64 / b as f64)
    }
}

/// `ferry-bench compare-qemu [SIZES_MIB]`.
pub fn run(b: &Bench, sizes: &[u64]) -> Result<()> {
    let dir = b.dir.join("qemu");
    std::fs::create_dir_all(&dir)?;
    b.ferry(&["pki", "init", b.dir.join("pki").to_str().context("path")?])?;
    println!("# Ferry vs QEMU live migration, same guest and host, downtime limit 100 ms");
    println!(
        "# (ratios Ferry/QEMU: lower is better; guest ticks are 1 s apart, so the guest-observed"
    );
    println!("#  downtime is only measured to that resolution, and only for Ferry)\n");
    let links: [(&str, Option<u64>); 3] = [
        ("unlimited", None),
        ("10 GbE", Some(10_000)),
        ("1 GbE", Some(1_000)),
    ];
    for &mem in sizes {
        for (load, mb) in [("idle", 0), ("dirtying", mem / 4)] {
            let cmdline = format!("console=ttyS0 dirtier.mb={mb}");
            for (link, rate) in links {
                set_link(rate)?;
                // A failed run is reported in its row; the others go on.
                let failed = |e: anyhow::Error| Outcome {
                    note: format!("FAILED: {e:#}"),
                    ..Default::default()
                };
                let q = run_qemu(&dir, mem, &cmdline).unwrap_or_else(failed);
                let plain = ["--insecure", "--connections", "1"];
                let f = run_ferry(b, &dir, mem, &cmdline, &plain).unwrap_or_else(failed);
                let ft = run_ferry(b, &dir, mem, &cmdline, &[]).unwrap_or_else(failed);
                set_link(None)?;
                let frac = |o: &Outcome| match rate {
                    Some(m) if o.total_ms > 0 => format!(
                        "{:.2}",
                        (o.bytes as f64 * 8.0 / (o.total_ms as f64 / 1000.0)) / (m as f64 * 1e6)
                    ),
                    _ => "-".into(),
                };
                println!("{mem} MiB {load}, {link}:");
                println!(
                    "  QEMU                        {}  link use {}",
                    cell(&q),
                    frac(&q)
                );
                for (name, o) in [
                    ("Ferry plain, 1 connection", &f),
                    ("Ferry TLS, 2 connections", &ft),
                ] {
                    println!(
                        "  {name:<27} {}  link use {}  total {}× downtime {}× bytes {}×",
                        cell(o),
                        frac(o),
                        ratio(o.total_ms, q.total_ms),
                        ratio(o.downtime_ms, q.downtime_ms),
                        ratio(o.bytes, q.bytes)
                    );
                }
            }
        }
    }
    Ok(())
}
