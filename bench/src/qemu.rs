//! Ferry against QEMU: the same Linux guest (../shared/guest), the same host, the same run,
//! the same downtime limit (100 ms), migrated over loopback with the link unlimited or
//! limited by `tc` to 10 GbE and 1 GbE. Needs a KVM that runs Linux: run it in a lab host,
//! `cargo xtask bench-qemu`.
//!
//! QEMU: `-M microvm,acpi=off -accel kvm -cpu host`, migrated with QMP `migrate` to an
//! `-incoming defer` twin, polled with `query-migrate`; `downtime-limit` 100 ms,
//! `max-bandwidth` unlimited, `auto-converge` on (Ferry's is on by default); plain TCP, and
//! again with `tls-creds-x509` (QEMU's TLS, with the same certificates Ferry uses). Ferry:
//! `ferry vm migrate --downtime-ms 100` with its defaults (mutual TLS, default connections),
//! and plain over one connection (`--insecure --connections 1`).
//!
//! Every guest has a virtio-net NIC on one bridge (10.78.0.2); a network namespace on the same
//! bridge pings it every 10 ms (`ping -i 0.01 -D`) through each migration, and the longest
//! gap between two replies and the pings lost are what the guest's users saw, measured from
//! outside it the same way for both.
//!
//! Each (guest, link) prints one line a script can read:
//!
//! ```text
//! row <MiB>M-<idle|dirtying> <link> ferry_total_ms=… ferry_down_ms=… qemu_total_ms=… qemu_down_ms=… ferry_gap_ms=… qemu_gap_ms=… …
//! ```
//! (`ferry_*` Ferry's defaults, `qemu_*` QEMU plain; `ferry_plain_*` and `qemu_tls_*` the
//! like-for-like variants; a figure that could not be read is `NA`, never 0). The run exits
//! non-zero when any migration lost the guest or damaged its memory.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::Bench;

/// The guest's address on the bench bridge, the bridge's, and the pinging namespace's.
const GUEST_IP: &str = "10.78.0.2";
const BRIDGE: &str = "fqbr";
const BRIDGE_IP: &str = "10.78.0.1/24";
const NS: &str = "fqns";
const NS_IP: &str = "10.78.0.3/24";
const MAC: &str = "52:54:00:78:00:02";
/// A gap between ping replies longer than this counts as a stall (pings go every 10 ms).
const STALL_MS: f64 = 40.0;

/// What the pinging namespace saw through one migration.
#[derive(Clone, Debug, Default)]
struct Pings {
    /// Longest time between two replies (ms).
    gap_ms: f64,
    /// Pings sent in the window that got no reply.
    lost: u64,
    /// Gaps longer than [`STALL_MS`].
    stalls: u32,
}

/// One migration's numbers; `None` where a figure could not be read.
#[derive(Clone, Debug, Default)]
struct Outcome {
    total_ms: Option<u64>,
    downtime_ms: Option<u64>,
    guest_ms: Option<u64>,
    bytes: Option<u64>,
    pings: Option<Pings>,
    /// Ferry only: rounds, highest throttle and the downtime's steps, as its report gives them.
    detail: String,
    note: String,
}

fn guest_dir() -> PathBuf {
    std::env::var_os("FERRY_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::ws().join("../shared/guest"))
}

fn sh(cmd: &str, args: &[&str]) -> Result<()> {
    let st = Command::new(cmd)
        .args(args)
        .status()
        .with_context(|| format!("{cmd} {args:?}"))?;
    if !st.success() {
        bail!("{cmd} {args:?}: {st}");
    }
    Ok(())
}

fn quiet(cmd: &str, args: &[&str]) {
    let _ = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The bench network: bridge, pinging namespace, one TAP per QEMU; removed on drop.
struct Net;

impl Net {
    fn up() -> Result<Net> {
        quiet("modprobe", &["tun"]);
        Net::clean();
        sh("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        sh("ip", &["addr", "add", BRIDGE_IP, "dev", BRIDGE])?;
        sh("ip", &["link", "set", BRIDGE, "up"])?;
        sh("ip", &["netns", "add", NS])?;
        sh(
            "ip",
            &[
                "link", "add", "fqvh", "type", "veth", "peer", "name", "fqvn",
            ],
        )?;
        sh("ip", &["link", "set", "fqvh", "master", BRIDGE, "up"])?;
        sh("ip", &["link", "set", "fqvn", "netns", NS])?;
        sh("ip", &["-n", NS, "addr", "add", NS_IP, "dev", "fqvn"])?;
        sh("ip", &["-n", NS, "link", "set", "fqvn", "up"])?;
        sh("ip", &["-n", NS, "link", "set", "lo", "up"])?;
        for tap in ["fqtqs", "fqtqd"] {
            sh("ip", &["tuntap", "add", tap, "mode", "tap"])?;
            sh("ip", &["link", "set", tap, "master", BRIDGE, "up"])?;
        }
        Ok(Net)
    }

    fn clean() {
        for args in [
            vec!["link", "del", BRIDGE],
            vec!["link", "del", "fqvh"],
            vec!["link", "del", "fqtqs"],
            vec!["link", "del", "fqtqd"],
            vec!["netns", "del", NS],
        ] {
            quiet("ip", &args);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        Net::clean();
    }
}

/// Pings the guest from the namespace every 10 ms until stopped.
struct Pinger {
    child: Child,
    out: PathBuf,
}

impl Pinger {
    /// Starts pinging and waits for the first reply (the guest's NIC is up, ARP done).
    fn start(dir: &Path) -> Result<Pinger> {
        let out = dir.join("ping.out");
        let child = Command::new("ip")
            .args(["netns", "exec", NS, "ping", "-i", "0.01", "-D", "-W", "1"])
            .arg(GUEST_IP)
            .stdout(std::fs::File::create(&out)?)
            .stderr(Stdio::null())
            .spawn()
            .context("ping (iputils-ping)")?;
        let p = Pinger { child, out };
        let deadline = Instant::now() + Duration::from_secs(120);
        while p.replies()?.is_empty() {
            if Instant::now() > deadline {
                bail!("the guest does not answer pings");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(p)
    }

    /// (time in s since the epoch, icmp_seq) of every reply so far.
    fn replies(&self) -> Result<Vec<(f64, u64)>> {
        let text = std::fs::read_to_string(&self.out)?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let t = l
                    .strip_prefix('[')?
                    .split(']')
                    .next()?
                    .parse::<f64>()
                    .ok()?;
                let seq = l.split("icmp_seq=").nth(1)?.split_whitespace().next()?;
                Some((t, seq.parse().ok()?))
            })
            .collect())
    }

    /// What the pings saw between `from` and `to` (s since the epoch).
    fn window(&self, from: f64, to: f64) -> Result<Pings> {
        let r: Vec<_> = self
            .replies()?
            .into_iter()
            .filter(|&(t, _)| t >= from && t <= to)
            .collect();
        if r.len() < 2 {
            bail!("{} ping replies during the migration", r.len());
        }
        let mut p = Pings::default();
        for w in r.windows(2) {
            let gap = (w[1].0 - w[0].0) * 1000.0;
            p.gap_ms = p.gap_ms.max(gap);
            if gap > STALL_MS {
                p.stalls += 1;
            }
            p.lost += w[1].1.saturating_sub(w[0].1 + 1);
        }
        Ok(p)
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Pings through `migrate`: from just before it to a second after it returns.
fn pinged<T>(dir: &Path, migrate: impl FnOnce() -> Result<T>) -> Result<(T, Result<Pings>)> {
    let p = Pinger::start(dir)?;
    let from = now_s();
    let out = migrate()?;
    std::thread::sleep(Duration::from_secs(1));
    let pings = p.window(from, now_s());
    Ok((out, pings))
}

/// Sets (or clears, with `None`) a rate limit on loopback, in Mbit/s.
fn set_link(mbit: Option<u64>) -> Result<()> {
    quiet("tc", &["qdisc", "del", "dev", "lo", "root"]);
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

/// Damage a migration did to the guest (the run fails for it, not just the row).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Damage(String);

/// The guest goes on ticking on the destination, with its memory intact.
fn check_guest(who: &str, log: &Path) -> Result<()> {
    let before = ticks(log);
    if wait_ticks(log, before + 2, Duration::from_secs(120)).is_err() {
        return Err(Damage(format!(
            "{who}: the guest stopped ticking after the migration"
        ))
        .into());
    }
    if std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("DIRTIER-ERROR")
    {
        return Err(Damage(format!(
            "{who}: the guest found its memory damaged after the migration"
        ))
        .into());
    }
    Ok(())
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

/// The guest's /init: eth0 up at [`GUEST_IP`], then the dirtier as the shared guest runs it.
const INIT: &str = r#"ip link set eth0 up
ip addr add 10.78.0.2/24 dev eth0
MB=64
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	dirtier.mb=*) MB="${arg#dirtier.mb=}" ;;
	esac
done
/bin/dirtier "$MB"
echo "dirtier exited with status $?"
while true; do sleep 1; done
"#;

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
    initrd: &Path,
    tls: Option<(&Path, &str)>,
    incoming: bool,
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
    .arg(initrd)
    .args(["-append", cmdline])
    .arg("-netdev")
    .arg(format!("tap,id=n0,ifname=fqt{tag},script=no,downscript=no"))
    .arg("-device")
    .arg(format!("virtio-net-device,netdev=n0,mac={MAC}"))
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
    if let Some((creds, endpoint)) = tls {
        c.arg("-object").arg(format!(
            "tls-creds-x509,id=tls0,endpoint={endpoint},dir={},verify-peer=on",
            creds.display()
        ));
    }
    if incoming {
        c.args(["-incoming", "defer"]);
    }
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{tag}.stderr")))?)
        .spawn()
        .context("cannot start qemu-system-x86_64")
}

/// QEMU's TLS credentials directory made from a Ferry host identity (the same CA and
/// certificate, which is good for both ends).
fn qemu_creds(pki: &Path, dir: &Path) -> Result<PathBuf> {
    let d = dir.join("qemu-tls");
    std::fs::create_dir_all(&d)?;
    for (from, to) in [
        ("ca.pem", "ca-cert.pem"),
        ("cert.pem", "server-cert.pem"),
        ("key.pem", "server-key.pem"),
        ("cert.pem", "client-cert.pem"),
        ("key.pem", "client-key.pem"),
    ] {
        std::fs::copy(pki.join(from), d.join(to))?;
    }
    Ok(d)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn run_qemu(
    dir: &Path,
    mem_mib: u64,
    cmdline: &str,
    initrd: &Path,
    creds: Option<&Path>,
) -> Result<Outcome> {
    let _ = std::fs::remove_file(dir.join("qs.console"));
    let _ = std::fs::remove_file(dir.join("qd.console"));
    let port = free_port()?;
    let src = qemu(
        dir,
        "qs",
        mem_mib,
        cmdline,
        initrd,
        creds.map(|c| (c, "client")),
        false,
    )?;
    let dst = qemu(
        dir,
        "qd",
        mem_mib,
        cmdline,
        initrd,
        creds.map(|c| (c, "server")),
        true,
    )?;
    let _guard = Kill(vec![src, dst]);
    wait_ticks(&dir.join("qs.console"), 3, Duration::from_secs(300))?;
    let mut params = serde_json::json!({"downtime-limit": 100, "max-bandwidth": 1u64 << 40});
    if creds.is_some() {
        params["tls-creds"] = "tls0".into();
        params["tls-hostname"] = "member.ferry-cluster".into();
    }
    let mut qd = Qmp::connect(&dir.join("qd.qmp"))?;
    let caps =
        serde_json::json!({"capabilities": [{"capability": "auto-converge", "state": true}]});
    if creds.is_some() {
        let mut p = serde_json::json!({"tls-creds": "tls0"});
        p["tls-hostname"] = "member.ferry-cluster".into();
        qd.cmd("migrate-set-parameters", p)?;
    }
    qd.cmd(
        "migrate-incoming",
        serde_json::json!({"uri": format!("tcp:127.0.0.1:{port}")}),
    )?;
    let mut q = Qmp::connect(&dir.join("qs.qmp"))?;
    q.cmd("migrate-set-capabilities", caps)?;
    q.cmd("migrate-set-parameters", params)?;
    let (info, pings) = pinged(dir, || {
        q.cmd(
            "migrate",
            serde_json::json!({"uri": format!("tcp:127.0.0.1:{port}")}),
        )?;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let v = q.cmd("query-migrate", serde_json::json!({}))?;
            match v["status"].as_str() {
                Some("completed") => break Ok(Some(v)),
                Some("failed") | Some("cancelled") => {
                    bail!("QEMU migration {}: {v}", v["status"])
                }
                _ if Instant::now() > deadline => {
                    let _ = q.cmd("migrate_cancel", serde_json::json!({}));
                    break Ok(None);
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    })?;
    let Some(info) = info else {
        return Ok(Outcome {
            note: "did not complete in 300 s".into(),
            ..Default::default()
        });
    };
    check_guest("QEMU", &dir.join("qd.console"))?;
    // A completed migration that does not show its figures is reported as unreadable.
    let total_ms = info["total-time"].as_u64();
    let downtime_ms = info["downtime"].as_u64();
    let note = if total_ms.is_none() || downtime_ms.is_none() {
        format!("query-migrate had no total-time/downtime: {info}")
    } else {
        String::new()
    };
    Ok(Outcome {
        total_ms,
        downtime_ms,
        guest_ms: None,
        bytes: info["ram"]["transferred"].as_u64(),
        pings: pings.ok(),
        detail: String::new(),
        note,
    })
}

fn run_ferry(
    b: &Bench,
    dir: &Path,
    mem_mib: u64,
    cmdline: &str,
    initrd: &Path,
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
    let nic = format!("bridge={BRIDGE},mac={MAC}");
    b.ferry(&[
        "vm",
        "start",
        "fs",
        "--kernel",
        &s(&g.join("vmlinux"))?,
        "--initrd",
        &s(initrd)?,
        "--cmdline",
        cmdline,
        "--memory",
        &format!("{mem_mib}M"),
        "--nic",
        &nic,
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
        let (rep, pings) = pinged(dir, || b.ferry(&m))?;
        // Kept with the logs if the guest then fails its check.
        let _ = std::fs::write(dir.join("ferry-report.log"), format!("{rep:#}\n"));
        if let Err(e) = check_guest("Ferry", &c) {
            // What the destination's worker thinks of its VM (stop reason, state).
            let st = b
                .ferry(&["vm", "status", "fd"])
                .map(|v| format!("{v:#}"))
                .unwrap_or_else(|e| format!("{e:#}"));
            // Whether the guest's kernel still answers on its NIC (alive but silent on its
            // console, or not running at all).
            let ping = Command::new("ip")
                .args([
                    "netns", "exec", NS, "ping", "-c", "5", "-i", "0.2", "-W", "1",
                ])
                .arg(GUEST_IP)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_else(|e| format!("ping: {e}"));
            // Where the destination's threads are, five times 200 ms apart: a vCPU looping
            // inside KVM shows the same kernel stack each time, a hung guest a HLT.
            let pid = b
                .ferry(&["vm", "status", "fd"])
                .ok()
                .and_then(|v| v["pid"].as_u64());
            let stacks = ferry_testkit::diag::threads(
                pid.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
                5,
                Duration::from_millis(200),
                true,
            );
            let _ = std::fs::write(dir.join("fd-status.log"), format!("{st}\n{ping}\n{stacks}"));
            return Err(e);
        }
        let steps = rep["downtime_steps"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| {
                        let ms = v.as_u64().unwrap_or(0) as f64 / 1000.0;
                        format!("{}={ms:.1}", k.trim_end_matches("_us"))
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        Ok(Outcome {
            total_ms: rep["total_ms"].as_u64(),
            downtime_ms: rep["downtime_ms"].as_u64(),
            guest_ms: rep["guest_downtime_ms"].as_u64(),
            bytes: rep["bytes_sent"].as_u64(),
            pings: pings.ok(),
            detail: format!(
                "rounds {} throttle {}% downtime steps (ms): {steps}{}",
                rep["rounds"],
                rep["max_throttle_pct"],
                restore_line(b)
            ),
            note: String::new(),
        })
    })();
    if res.is_err() {
        keep_logs(b, dir);
    }
    let _ = b.ferry(&["vm", "stop", "fd"]);
    let _ = b.ferry(&["vm", "stop", "fs"]);
    res
}

/// The destination worker's account of its restore (`restored the skeleton VM in …`), if
/// its log has one.
fn restore_line(b: &Bench) -> String {
    std::fs::read_to_string(b.dir.join("run/vms/fd/worker.log"))
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(|l| l.split_once("restored the skeleton VM in "))
        .map(|(_, rest)| format!("\n                             destination restore {rest}"))
        .unwrap_or_default()
}

/// Copies a failed run's consoles and worker logs into the workspace (`target/bench-qemu-failed/
/// N/`), which outlives the lab host.
fn keep_logs(b: &Bench, dir: &Path) {
    let base = crate::ws().join("target/bench-qemu-failed");
    let n = std::fs::read_dir(&base).map(|d| d.count()).unwrap_or(0);
    let to = base.join(n.to_string());
    if std::fs::create_dir_all(&to).is_err() {
        return;
    }
    for d in [dir.to_path_buf(), b.dir.join("run")] {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "console" || x == "log") {
                let _ = std::fs::copy(&p, to.join(e.file_name()));
            }
        }
    }
    // Each worker's own log, from its run directory.
    for e in std::fs::read_dir(b.dir.join("run/vms"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let _ = std::fs::copy(
            e.path().join("worker.log"),
            to.join(format!("{name}-worker.log")),
        );
    }
    println!("  (logs of the failed run kept in {})", to.display());
}

fn na<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "NA".into())
}

fn cell(o: &Outcome) -> String {
    if o.total_ms.is_none() && !o.note.is_empty() {
        return o.note.clone();
    }
    format!(
        "{:>6} ms, down {:>4} ms{}, {:>7} MiB, ping gap {} ms, lost {}, stalls {}{}",
        na(o.total_ms),
        na(o.downtime_ms),
        o.guest_ms
            .map(|g| format!(" (guest {g} ms)"))
            .unwrap_or_default(),
        na(o.bytes.map(|b| format!("{:.1}", b as f64 / 1048576.0))),
        na(o.pings.as_ref().map(|p| format!("{:.0}", p.gap_ms))),
        na(o.pings.as_ref().map(|p| p.lost)),
        na(o.pings.as_ref().map(|p| p.stalls)),
        if o.note.is_empty() {
            String::new()
        } else {
            format!(" ({})", o.note)
        }
    )
}

fn ratio(a: Option<u64>, b: Option<u64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a > 0 && b > 0 => format!("{:.2}", a as f64 / b as f64),
        _ => "NA".into(),
    }
}

/// The `key=value` fields of one outcome under `prefix`.
fn fields(prefix: &str, o: &Outcome) -> String {
    let p = o.pings.as_ref();
    format!(
        "{prefix}_total_ms={} {prefix}_down_ms={} {prefix}_gap_ms={} {prefix}_lost={} {prefix}_stalls={} {prefix}_bytes={}",
        na(o.total_ms),
        na(o.downtime_ms),
        na(p.map(|p| format!("{:.0}", p.gap_ms))),
        na(p.map(|p| p.lost)),
        na(p.map(|p| p.stalls)),
        na(o.bytes),
    )
}

/// Which cases to run (all by default).
#[derive(Debug, Default)]
pub struct Filter {
    /// `idle` or `dirtying`.
    pub load: Option<String>,
    /// `unlimited`, `10GbE` or `1GbE`.
    pub link: Option<String>,
    /// `ferry` or `qemu`: only that side's runs.
    pub only: Option<String>,
}

impl Filter {
    fn want(v: &Option<String>, x: &str) -> bool {
        v.as_deref().is_none_or(|w| w == x)
    }
}

/// `ferry-bench compare-qemu [SIZES_MIB] [--load L] [--link L] [--only ferry|qemu]`.
pub fn run(b: &Bench, sizes: &[u64], filter: &Filter) -> Result<()> {
    let dir = b.dir.join("qemu");
    std::fs::create_dir_all(&dir)?;
    let pki = b.dir.join("pki");
    b.ferry(&["pki", "init", pki.to_str().context("path")?])?;
    let creds = qemu_creds(&pki, &dir)?;
    let initrd = dir.join("initrd-net");
    std::fs::write(
        &initrd,
        ferry_guests::linux_initrd(&guest_dir(), INIT, &[])?,
    )?;
    let _net = Net::up()?;
    println!("# Ferry vs QEMU live migration, same guest and host, downtime limit 100 ms");
    println!("# (ratios Ferry/QEMU: lower is better; ping gap: the longest time between two");
    println!("#  replies to pings every 10 ms from a namespace on the guest's bridge)\n");
    let links: [(&str, Option<u64>); 3] = [
        ("unlimited", None),
        ("10GbE", Some(10_000)),
        ("1GbE", Some(1_000)),
    ];
    let mut damage = Vec::new();
    for &mem in sizes {
        for (load, mb) in [("idle", 0), ("dirtying", mem / 4)] {
            if !Filter::want(&filter.load, load) {
                continue;
            }
            let cmdline = format!("console=ttyS0 dirtier.mb={mb}");
            for (link, rate) in links {
                if !Filter::want(&filter.link, link) {
                    continue;
                }
                set_link(rate)?;
                // A failed run is reported in its row; the others go on. Damage to a guest
                // fails the whole run at the end.
                let mut failed = |e: anyhow::Error| {
                    if e.downcast_ref::<Damage>().is_some() {
                        damage.push(format!("{mem} MiB {load} {link}: {e}"));
                    }
                    Outcome {
                        note: format!("FAILED: {e:#}"),
                        ..Default::default()
                    }
                };
                let skipped = || Outcome {
                    note: "not run".into(),
                    ..Default::default()
                };
                let (qemu_on, ferry_on) = (
                    Filter::want(&filter.only, "qemu"),
                    Filter::want(&filter.only, "ferry"),
                );
                let q = match qemu_on {
                    true => {
                        run_qemu(&dir, mem, &cmdline, &initrd, None).unwrap_or_else(&mut failed)
                    }
                    false => skipped(),
                };
                let qt = match qemu_on {
                    true => run_qemu(&dir, mem, &cmdline, &initrd, Some(&creds))
                        .unwrap_or_else(&mut failed),
                    false => skipped(),
                };
                let plain = ["--insecure", "--connections", "1"];
                let f = match ferry_on {
                    true => {
                        run_ferry(b, &dir, mem, &cmdline, &initrd, &[]).unwrap_or_else(&mut failed)
                    }
                    false => skipped(),
                };
                let fp = match ferry_on {
                    true => run_ferry(b, &dir, mem, &cmdline, &initrd, &plain)
                        .unwrap_or_else(&mut failed),
                    false => skipped(),
                };
                set_link(None)?;
                let frac = |o: &Outcome| match (rate, o.total_ms, o.bytes) {
                    (Some(m), Some(t), Some(bytes)) if t > 0 => format!(
                        "{:.2}",
                        (bytes as f64 * 8.0 / (t as f64 / 1000.0)) / (m as f64 * 1e6)
                    ),
                    _ => "-".into(),
                };
                println!("{mem} MiB {load}, {link}:");
                for (name, o, base) in [
                    ("QEMU plain", &q, None),
                    ("QEMU TLS", &qt, None),
                    ("Ferry defaults (TLS)", &f, Some(&q)),
                    ("Ferry TLS vs QEMU TLS", &f, Some(&qt)),
                    ("Ferry plain, 1 connection", &fp, Some(&q)),
                ] {
                    let vs = base
                        .map(|q| {
                            format!(
                                "  total {}× downtime {}× bytes {}×",
                                ratio(o.total_ms, q.total_ms),
                                ratio(o.downtime_ms, q.downtime_ms),
                                ratio(o.bytes, q.bytes)
                            )
                        })
                        .unwrap_or_default();
                    println!("  {name:<26} {}  link use {}{vs}", cell(o), frac(o));
                    if !o.detail.is_empty() {
                        println!("  {:<26} {}", "", o.detail);
                    }
                }
                println!(
                    "row {mem}M-{load} {link} {} {} {} {}",
                    fields("ferry", &f),
                    fields("qemu", &q),
                    fields("ferry_plain", &fp),
                    fields("qemu_tls", &qt),
                );
            }
        }
    }
    if !damage.is_empty() {
        bail!("guests lost or damaged:\n{}", damage.join("\n"));
    }
    Ok(())
}
