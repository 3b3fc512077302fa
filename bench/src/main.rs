//! Ferry benchmarks (VMM core). Each result is printed beside a baseline measured in the same
//! run, as a ratio:
//!
//! - worker start → first guest output, against starting `/bin/true`;
//! - save time and state-file size of a 256 MiB guest that touched 64 MiB, against `dd` writing
//!   64 MiB with fsync;
//! - restore time (spawn → guest running) against `dd` reading the same file;
//! - live-migration throughput over loopback against a plain TCP transfer and a memory copy
//!   of the same bytes.
//!
//! Run: `cargo run --release -p ferry-bench` (builds the release `ferry` binaries first).
//!
//! `ferry-bench compare-qemu [MiB ...]` (module `qemu`) compares live migration with QEMU's on
//! a Linux guest; it needs a KVM that runs Linux: `cargo xtask bench-qemu` runs it in a lab host.
//!
//! `ferry-bench wire [MiB]` (module `wire`) measures a live migration's rate of guest memory
//! moved over loopback against plain and TLS loopback transfers of the same bytes.
//!
//! `ferry-bench devices` (module `devices`) measures virtio-blk and virtio-net in a Linux
//! guest against the host; `cargo xtask bench-devices` runs it in a lab host.

mod devices;
mod qemu;
mod sim;
mod wire;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn ws() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

struct Bench {
    dir: PathBuf,
    ferry: PathBuf,
}

impl Drop for Bench {
    /// Whatever happened, no benchmark VM outlives the run.
    fn drop(&mut self) {
        if let Ok(o) = Command::new(&self.ferry)
            .args(["vm", "list", "--output", "json"])
            .env("FERRY_RUN_DIR", self.dir.join("run"))
            .output()
        {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            for vm in v.as_array().into_iter().flatten() {
                if let Some(n) = vm["name"].as_str() {
                    let _ = Command::new(&self.ferry)
                        .args(["vm", "stop", n])
                        .env("FERRY_RUN_DIR", self.dir.join("run"))
                        .output();
                }
            }
        }
    }
}

impl Bench {
    /// A bench over the release `ferry` with an empty working directory `name` under the
    /// temporary directory (run directory inside).
    fn fresh(name: &str) -> Result<Bench> {
        let dir = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("run"))?;
        Ok(Bench {
            dir,
            ferry: ws().join("target/release/ferry"),
        })
    }

    fn ferry(&self, args: &[&str]) -> Result<serde_json::Value> {
        let o = Command::new(&self.ferry)
            .args(args)
            .args(["--output", "json"])
            .env("FERRY_RUN_DIR", self.dir.join("run"))
            .env("FERRY_PKI_DIR", self.dir.join("pki"))
            .output()?;
        if !o.status.success() {
            bail!("ferry {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(serde_json::from_slice(&o.stdout)?)
    }
}

fn wait_for(log: &Path, needle: &str, timeout: Duration) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(needle)
        {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!(
                "{needle:?} did not appear in {} within {timeout:?}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn time(mut c: Command) -> Result<Duration> {
    let t = Instant::now();
    let st = c.stdout(Stdio::null()).stderr(Stdio::null()).status()?;
    if !st.success() {
        bail!("{c:?} failed");
    }
    Ok(t.elapsed())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("compare-qemu") {
        let mut sizes = Vec::new();
        let mut filter = qemu::Filter::default();
        let mut it = args[1..].iter();
        while let Some(a) = it.next() {
            let slot = match a.as_str() {
                "--load" => &mut filter.load,
                "--link" => &mut filter.link,
                "--only" => &mut filter.only,
                n => {
                    sizes.push(n.parse::<u64>().context("sizes are MiB numbers")?);
                    continue;
                }
            };
            *slot = Some(it.next().context("a value after the option")?.clone());
        }
        let b = Bench::fresh("ferry-bench-qemu")?;
        return qemu::run(
            &b,
            if sizes.is_empty() {
                &[256, 1024]
            } else {
                &sizes
            },
            &filter,
        );
    }
    if args.first().map(String::as_str) == Some("wire") {
        let mut mib = 512;
        let mut only = None;
        let mut it = args[1..].iter();
        while let Some(a) = it.next() {
            if a == "--only" {
                only = Some(it.next().context("a variant after --only")?.clone());
            } else {
                mib = a.parse::<u64>().context("the size is a MiB number")?;
            }
        }
        let b = Bench::fresh("ferry-bench-wire")?;
        return wire::run(&b.dir, mib, only.as_deref());
    }
    if args.first().map(String::as_str) == Some("sim") {
        let mut a = sim::SimArgs {
            hosts: 64,
            vms: 2000,
            days: 7,
            seed: 1,
        };
        let mut it = args[1..].iter();
        while let Some(k) = it.next() {
            let v: u64 = it
                .next()
                .context("a number after each sim option")?
                .parse()
                .context("sim options take numbers")?;
            match k.as_str() {
                "--hosts" => a.hosts = usize::try_from(v)?,
                "--vms" => a.vms = usize::try_from(v)?,
                "--days" => a.days = v,
                "--seed" => a.seed = v,
                other => bail!("unknown sim option {other} (--hosts, --vms, --days, --seed)"),
            }
        }
        return sim::run(&a);
    }
    if args.first().map(String::as_str) == Some("devices") {
        let b = Bench::fresh("ferry-bench-devices")?;
        return devices::run(&b, args.get(1).map(String::as_str));
    }
    let root = ws();
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args(["build", "--release", "-p", "ferry", "-p", "ferry-guests"])
        .status()?;
    if !st.success() {
        bail!("build failed");
    }
    let dir = root.join("target/bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("run"))?;
    let b = Bench {
        dir: dir.clone(),
        ferry: root.join("target/release/ferry"),
    };
    let kernel = root.join("target/guests/dirtier.elf");
    let k = kernel.to_str().context("path")?;

    println!("# Ferry VMM benchmarks (ratios: Ferry / baseline, lower is better)\n");

    // 1. Worker start to first guest output.
    let mut starts = Vec::new();
    let mut trues = Vec::new();
    for i in 0..5 {
        let log = dir.join(format!("start{i}.console"));
        let t0 = Instant::now();
        b.ferry(&[
            "vm",
            "start",
            &format!("s{i}"),
            "--kernel",
            k,
            "--memory",
            "256M",
            "--cmdline",
            "mb=1",
            "--console-log",
            log.to_str().context("path")?,
        ])?;
        let t1 = wait_for(&log, "dirtier: start", Duration::from_secs(30))?;
        starts.push(t1 - t0);
        b.ferry(&["vm", "stop", &format!("s{i}")])?;
        trues.push(time(Command::new("/bin/true"))?);
    }
    starts.sort();
    trues.sort();
    let (s, t) = (starts[2], trues[2]);
    println!(
        "start → first guest output: {} (median of 5); starting /bin/true: {}; ratio {:.1}",
        ms(s),
        ms(t),
        s.as_secs_f64() / t.as_secs_f64()
    );

    // 2. Save / restore of 256 MiB that touched 64 MiB.
    let log = dir.join("big.console");
    b.ferry(&[
        "vm",
        "start",
        "big",
        "--kernel",
        k,
        "--memory",
        "256M",
        "--cmdline",
        "mb=64 rate=100 beat_ms=1000",
        "--console-log",
        log.to_str().context("path")?,
    ])?;
    wait_for(&log, "ready", Duration::from_secs(600))?;
    let state = dir.join("big.state");
    let t0 = Instant::now();
    let rep = b.ferry(&["vm", "save", "big", "--to", state.to_str().context("path")?])?;
    let save = t0.elapsed();
    let size = std::fs::metadata(&state)?.len();
    let paused = rep["report"]["duration_ms"].as_u64().unwrap_or(0);
    let ddfile = dir.join("dd.out");
    let mut dd = Command::new("dd");
    dd.args(["if=/dev/zero", "bs=1M", "count=64", "conv=fsync"])
        .arg(format!("of={}", ddfile.display()));
    let ddw = time(dd)?;
    println!(
        "save (256 MiB guest, 64 MiB touched): {} end to end, VM paused {paused} ms, file {:.1} MiB ({:.2}× the touched bytes); dd write+fsync 64 MiB: {}; ratio {:.2}",
        ms(save),
        size as f64 / 1048576.0,
        size as f64 / (64.0 * 1048576.0),
        ms(ddw),
        save.as_secs_f64() / ddw.as_secs_f64()
    );
    let rlog = dir.join("restored.console");
    let t0 = Instant::now();
    b.ferry(&[
        "vm",
        "restore",
        state.to_str().context("path")?,
        "--name",
        "big2",
        "--console-log",
        rlog.to_str().context("path")?,
    ])?;
    let restore = t0.elapsed();
    b.ferry(&["vm", "stop", "big2"])?;
    let mut dd = Command::new("dd");
    dd.arg(format!("if={}", state.display()))
        .args(["of=/dev/null", "bs=1M"]);
    let ddr = time(dd)?;
    println!(
        "restore (spawn → running): {}; dd read of the state file: {}; ratio {:.2}",
        ms(restore),
        ms(ddr),
        restore.as_secs_f64() / ddr.as_secs_f64()
    );
    // 3. Live migration over loopback, against a plain TCP transfer and a memory copy, with
    //    each transport option. The VM moves back and forth between two workers.
    b.ferry(&["pki", "init", dir.join("pki").to_str().context("path")?])?;
    let mig_log = dir.join("mig.console");
    b.ferry(&[
        "vm",
        "start",
        "mig0",
        "--kernel",
        k,
        "--memory",
        "256M",
        "--cmdline",
        "mb=64 rate=100 beat_ms=1000 period=8",
        "--console-log",
        mig_log.to_str().context("path")?,
    ])?;
    wait_for(&mig_log, "ready", Duration::from_secs(600))?;
    let touched = 64u64 << 20;
    let tcp = tcp_loopback(touched)?;
    let copy = memcpy(touched);
    println!(
        "live migration, 256 MiB guest, 64 MiB touched (pages repeat every 64 bytes), lightly dirtying; \
         baselines for 64 MiB: loopback TCP {:.0} MiB/s, 4 KiB memory copy {:.0} MiB/s",
        mibps(touched, tcp),
        mibps(touched, copy)
    );
    let variants: [(&str, &[&str]); 6] = [
        (
            "plain TCP, 1 connection",
            &["--insecure", "--connections", "1"],
        ),
        ("TLS, 1 connection", &["--connections", "1"]),
        ("TLS, 2 connections (default)", &[]),
        ("TLS, 4 connections", &["--connections", "4"]),
        ("TLS, 2 connections, lz4", &["--compress", "lz4"]),
        ("TLS, 2 connections, zstd", &["--compress", "zstd"]),
    ];
    for (i, (what, args)) in variants.iter().enumerate() {
        let (from, to) = (format!("mig{i}"), format!("mig{}", i + 1));
        let mut recv_args = vec!["vm", "receive", &to, "--listen", "127.0.0.1:0"];
        if args.contains(&"--insecure") {
            recv_args.push("--insecure");
        }
        let recv = b.ferry(&recv_args)?;
        let addr = recv["listen"].as_str().context("listen")?.to_string();
        let mut m = vec!["vm", "migrate", from.as_str(), "--to", &addr];
        m.extend_from_slice(args);
        let rep = b.ferry(&m)?;
        let total = Duration::from_millis(rep["total_ms"].as_u64().unwrap_or(0));
        let moved = rep["pages_sent"].as_u64().unwrap_or(0) * 4096;
        println!(
            "  {what:<30} {:>6} total, downtime {:>3} ms (guest saw {} ms), {:>5.1} MiB on the wire (×{:.2} compression): \
             {:>4.0} MiB/s of guest memory = {:.2}× loopback TCP, {:.3}× memory copy",
            ms(total),
            rep["downtime_ms"],
            rep["guest_downtime_ms"],
            rep["bytes_sent"].as_u64().unwrap_or(0) as f64 / 1048576.0,
            rep["compression_ratio"].as_f64().unwrap_or(1.0),
            mibps(moved, total),
            mibps(moved, total) / mibps(touched, tcp),
            mibps(moved, total) / mibps(touched, copy),
        );
    }
    b.ferry(&["vm", "stop", &format!("mig{}", variants.len())])?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn mibps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1048576.0 / d.as_secs_f64().max(1e-9)
}

/// Time to push `bytes` through a loopback TCP connection.
fn tcp_loopback(bytes: u64) -> Result<Duration> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let rx = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = s.read(&mut buf)?;
            if k == 0 {
                return Ok(n);
            }
            n += k as u64;
        }
    });
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    let buf = vec![0x5au8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..k])?;
        left -= k as u64;
    }
    drop(s);
    rx.join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok(t.elapsed())
}

/// Time to copy `bytes` in memory, 4 KiB at a time (what the sender does per page).
fn memcpy(bytes: u64) -> Duration {
    let src = vec![0x5au8; 64 << 20];
    let mut dst = vec![0u8; 4096];
    let t = Instant::now();
    let mut done = 0u64;
    while done < bytes {
        for page in src.chunks_exact(4096) {
            dst.copy_from_slice(page);
            std::hint::black_box(&dst);
            done += 4096;
            if done >= bytes {
                break;
            }
        }
    }
    t.elapsed()
}
