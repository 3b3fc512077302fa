//! Device benchmarks: virtio-blk, virtio-scsi and virtio-net inside a Linux guest against the same work done
//! on the host in the same run, printed as ratios. Needs a KVM that runs Linux: `cargo xtask
//! bench-devices` runs it in a lab host.
//!
//! The workload is one static program, `bench/guest/ferrybench.c`, run both in the guest (put
//! into the shared guest's initramfs) and on the host:
//! - **disk**: sequential 1 MiB write and read, then random 4 KiB reads and writes, with
//!   direct I/O, in the guest on `/dev/vda` (virtio-blk) and on `/dev/sda` (the same image as
//!   a virtio-scsi LUN) against the host on the image file itself;
//! - **network**: one TCP stream for 5 s, guest → namespace and namespace → guest, against
//!   namespace → namespace over the same bridge; at MTU 1500 and 9000, and with the NIC's
//!   offloads on and off (`--nic …,offloads=off`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::Bench;

const BRIDGE: &str = "fbrbench";
/// (namespace, its veth's bridge end, its address) for the two namespaces.
const NS: [(&str, &str, &str); 2] = [("fbn1", "fbv1", "10.78.0.3"), ("fbn2", "fbv2", "10.78.0.4")];
const GUEST_IP: &str = "10.78.0.2";
const STREAM_S: u32 = 5;

fn guest_dir() -> PathBuf {
    std::env::var_os("FERRY_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::ws().join("../shared/guest"))
}

/// `BENCH <name> <value> <unit>` lines of `text`: (name, value).
fn results(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("BENCH ")?.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.parse().ok()?))
        })
        .collect()
}

fn value(r: &[(String, f64)], name: &str) -> Result<f64> {
    r.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .with_context(|| format!("no {name} result in {r:?}"))
}

fn sh(cmd: &str) -> Result<()> {
    let st = Command::new("sh").args(["-c", cmd]).status()?;
    if !st.success() {
        bail!("{cmd} failed");
    }
    Ok(())
}

/// Runs `tool args` in namespace `ns` (or on the host) and returns what it printed.
fn tool_output(ns: Option<&str>, tool: &Path, args: &[&str]) -> Result<String> {
    let mut c = netns_cmd(ns, tool);
    let o = c.args(args).output()?;
    if !o.status.success() {
        bail!(
            "ferrybench {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn netns_cmd(ns: Option<&str>, tool: &Path) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(tool);
            c
        }
        None => Command::new(tool),
    }
}

/// A receiver started in namespace `ns` on `port`; its output once the sender is done.
fn spawn_receiver(ns: &str, tool: &Path, port: u16) -> Result<Child> {
    let mut c = netns_cmd(Some(ns), tool);
    let mut child = c
        .args(["recv", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    // Wait for it to listen.
    use std::io::{BufRead, BufReader};
    let out = child.stdout.take().context("receiver output")?;
    let mut r = BufReader::new(out);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.starts_with("BENCH recv-listening") {
        bail!("receiver: {line}");
    }
    child.stdout = Some(r.into_inner());
    Ok(child)
}

fn finish_receiver(child: Child) -> Result<Vec<(String, f64)>> {
    let o = child.wait_with_output()?;
    Ok(results(&String::from_utf8_lossy(&o.stdout)))
}

/// The bridge and two namespaces on it, at `mtu`.
fn network(mtu: u16) -> Result<()> {
    teardown();
    sh(&format!(
        "ip link add {BRIDGE} type bridge && ip link set {BRIDGE} mtu {mtu} up"
    ))?;
    for (ns, veth, addr) in NS {
        sh(&format!(
            "ip netns add {ns} && ip link add {veth} mtu {mtu} type veth peer name eth0 mtu {mtu} netns {ns} \
             && ip link set {veth} master {BRIDGE} up && ip -n {ns} addr add {addr}/24 dev eth0 \
             && ip -n {ns} link set eth0 up && ip -n {ns} link set lo up"
        ))?;
    }
    Ok(())
}

fn teardown() {
    let _ = Command::new("sh")
        .args([
            "-c",
            &format!("ip link del {BRIDGE}; ip netns del fbn1; ip netns del fbn2"),
        ])
        .stderr(Stdio::null())
        .status();
}

/// Starts a Linux VM running `init` (with ferrybench as /bin/ferrybench) and returns its
/// console once it printed `BENCH-DONE`, after `during` ran against it.
fn guest_run(
    b: &Bench,
    tool: &Path,
    name: &str,
    init: &str,
    extra: &[&str],
    during: impl FnOnce(&Path) -> Result<()>,
) -> Result<String> {
    let bin = std::fs::read(tool)?;
    let initrd =
        ferry_guests::linux_initrd(&guest_dir(), init, &[("bin/ferrybench", 0o100755, &bin)])?;
    let initrd_path = b.dir.join(format!("{name}.initrd"));
    std::fs::write(&initrd_path, initrd)?;
    // Under the workspace, which a lab host shares: the console can be watched from outside.
    let consoles = crate::ws().join("target/bench-devices");
    std::fs::create_dir_all(&consoles)?;
    let console = consoles.join(format!("{name}.console"));
    let _ = std::fs::remove_file(&console);
    let kernel = guest_dir().join("vmlinux");
    let mut args = vec![
        "vm",
        "start",
        name,
        "--kernel",
        kernel.to_str().context("path")?,
        "--initrd",
        initrd_path.to_str().context("path")?,
        "--cmdline",
        "console=ttyS0",
        "--memory",
        "512M",
        "--console-log",
        console.to_str().context("path")?,
    ];
    args.extend_from_slice(extra);
    b.ferry(&args)?;
    eprintln!("  {name} started; console {}", console.display());
    let outcome = during(&console)
        .and_then(|()| wait_console(&console, "BENCH-DONE", Duration::from_secs(900)));
    let text = String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).into_owned();
    let _ = b.ferry(&["vm", "stop", name]);
    outcome.with_context(|| format!("guest {name}:\n{text}"))?;
    if text.contains("ferrybench:") {
        bail!("guest {name} failed:\n{text}");
    }
    Ok(text)
}

/// Waits until the console shows `needle`; fails at once when the workload in the guest
/// reported an error (`ferrybench: …`).
fn wait_console(console: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // Lossy: a console may hold bytes that are not UTF-8 (boot noise).
        let text =
            String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default()).into_owned();
        if text.contains(needle) {
            return Ok(());
        }
        if let Some(l) = text.lines().find(|l| l.contains("ferrybench:")) {
            bail!("the guest's workload failed: {l}");
        }
        if std::time::Instant::now() > deadline {
            bail!("{needle:?} did not appear within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ratio_line(what: &str, guest: f64, host: f64, unit: &str) {
    println!(
        "{what:<44} {guest:>10.1} {unit:<5} vs {host:>10.1} {unit:<5}  ratio {:.2}",
        if host > 0.0 { guest / host } else { 0.0 }
    );
}

fn disk(b: &Bench, tool: &Path) -> Result<()> {
    let img = b.dir.join("bench-disk.img");
    let _ = std::fs::remove_file(&img);
    let img_s = img.to_str().context("path")?;
    b.ferry(&["disk", "create", img_s, "--size", "512M"])?;
    let (mib, secs) = ("256", "3");
    let host = results(&tool_output(None, tool, &["disk", img_s, mib, secs])?);
    let on = |dev: &str| {
        format!("ferrybench disk {dev} {mib} {secs}\necho BENCH-DONE\nexec sleep 1000000\n")
    };
    let blk = results(&guest_run(
        b,
        tool,
        "bench-disk",
        &on("/dev/vda"),
        &["--disk", img_s],
        |_| Ok(()),
    )?);
    // The same image as LUN 0 of the SCSI controller (the guest waits for sd to attach it).
    let scsi_init = format!(
        "i=0; while [ ! -b /dev/sda ] && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done\n{}",
        on("/dev/sda")
    );
    let scsi = results(&guest_run(
        b,
        tool,
        "bench-scsi",
        &scsi_init,
        &["--scsi-disk", img_s],
        |_| Ok(()),
    )?);
    const ROWS: [(&str, &str); 4] = [
        ("disk-seq-write", "MB/s"),
        ("disk-seq-read", "MB/s"),
        ("disk-rand-read", "IOPS"),
        ("disk-rand-write", "IOPS"),
    ];
    for (title, guest) in [
        (
            "guest /dev/vda (virtio-blk) vs the image file on the host",
            &blk,
        ),
        (
            "guest /dev/sda (virtio-scsi LUN) vs the image file on the host",
            &scsi,
        ),
    ] {
        println!("\n## Disk: {title}");
        println!(
            "(direct I/O: guest {}, host {})",
            value(guest, "disk-direct-io")? as u8,
            value(&host, "disk-direct-io")? as u8
        );
        for (name, unit) in ROWS {
            ratio_line(name, value(guest, name)?, value(&host, name)?, unit);
        }
    }
    println!("\n## Disk: virtio-scsi vs virtio-blk, the same guest work on the same image");
    for (name, unit) in ROWS {
        ratio_line(name, value(&scsi, name)?, value(&blk, name)?, unit);
    }
    let _ = std::fs::remove_file(&img);
    Ok(())
}

/// namespace 1 → namespace 2 over the bridge: MB/s at the receiver.
fn ns_to_ns(tool: &Path) -> Result<f64> {
    let rx = spawn_receiver(NS[1].0, tool, 5001)?;
    tool_output(
        Some(NS[0].0),
        tool,
        &["send", NS[1].2, "5001", &STREAM_S.to_string()],
    )?;
    value(&finish_receiver(rx)?, "recv")
}

/// Guest → namespace 2 and namespace 1 → guest at `mtu` with offloads `on`: MB/s at each
/// receiver.
fn guest_streams(b: &Bench, tool: &Path, mtu: u16, offloads: bool) -> Result<(f64, f64)> {
    let name = format!("bench-net-{mtu}-{}", if offloads { "on" } else { "off" });
    let nic = format!(
        "bridge={BRIDGE},mtu={mtu},offloads={}",
        if offloads { "on" } else { "off" }
    );
    let init = format!(
        "ip link set eth0 up\nip addr add {GUEST_IP}/24 dev eth0\n\
         ferrybench recv 5002 > /tmp/recv & R=$!\n\
         ferrybench send {} 5001 {STREAM_S}\n\
         wait $R\ncat /tmp/recv\necho BENCH-DONE\nexec sleep 1000000\n",
        NS[1].2
    );
    let rx = spawn_receiver(NS[1].0, tool, 5001)?;
    let mut to_guest = 0.0;
    let text = guest_run(b, tool, &name, &init, &["--nic", &nic], |console| {
        // The guest sent first; then the namespace sends to it.
        wait_console(console, "BENCH send", Duration::from_secs(600))?;
        eprintln!("  guest sent; now the namespace sends to it");
        let out = tool_output(
            Some(NS[0].0),
            tool,
            &["send", GUEST_IP, "5002", &STREAM_S.to_string()],
        )?;
        to_guest = value(&results(&out), "send")?;
        Ok(())
    })?;
    let from_guest = value(&finish_receiver(rx)?, "recv")?;
    // The guest's receiver measures what arrived; prefer it over the sender's figure.
    let guest_recv = value(&results(&text), "recv").unwrap_or(to_guest);
    Ok((from_guest, guest_recv))
}

fn net(b: &Bench, tool: &Path) -> Result<()> {
    let _ = Command::new("modprobe").arg("tun").status();
    let mut base = Vec::new();
    let mut rows = Vec::new();
    for (mtu, offloads) in [(1500u16, true), (9000, true), (1500, false)] {
        network(mtu)?;
        if offloads {
            eprintln!("net: namespace → namespace, MTU {mtu}");
            base.push((mtu, ns_to_ns(tool)?));
        }
        eprintln!("net: guest ↔ namespace, MTU {mtu}, offloads {offloads}");
        let (from_guest, to_guest) = guest_streams(b, tool, mtu, offloads)?;
        rows.push((mtu, offloads, from_guest, to_guest));
    }
    teardown();
    println!(
        "\n## Network: one TCP stream for {STREAM_S} s, guest (virtio-net) vs namespace → namespace on the same bridge"
    );
    for (mtu, offloads, from_guest, to_guest) in &rows {
        let ns = base.iter().find(|(m, _)| m == mtu).map_or(0.0, |(_, v)| *v);
        let tag = format!(
            "MTU {mtu}, offloads {}",
            if *offloads { "on" } else { "off" }
        );
        ratio_line(
            &format!("guest → namespace, {tag}"),
            *from_guest,
            ns,
            "MB/s",
        );
        ratio_line(&format!("namespace → guest, {tag}"), *to_guest, ns, "MB/s");
    }
    let get = |mtu: u16, off: bool| {
        rows.iter()
            .find(|r| r.0 == mtu && r.1 == off)
            .map_or(0.0, |r| r.2)
    };
    println!(
        "\nOffloads on vs off (guest → namespace, MTU 1500): ratio {:.2}",
        get(1500, true) / get(1500, false).max(0.001)
    );
    println!(
        "MTU 9000 vs 1500 (guest → namespace, offloads on): ratio {:.2}",
        get(9000, true) / get(1500, true).max(0.001)
    );
    Ok(())
}

/// Builds the workload (static, so it runs in the guest's busybox initramfs).
fn build_tool(dir: &Path) -> Result<PathBuf> {
    let out = dir.join("ferrybench");
    let src = crate::ws().join("bench/guest/ferrybench.c");
    let st = Command::new("gcc")
        .args(["-O2", "-static", "-Wall", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .context("gcc")?;
    if !st.success() {
        bail!("gcc could not build {}", src.display());
    }
    Ok(out)
}

/// Runs the device benchmarks: `only` "disk" or "net", or both.
pub fn run(b: &Bench, only: Option<&str>) -> Result<()> {
    let tool = build_tool(&b.dir)?;
    println!("# Ferry device benchmarks (guest ÷ host, same run)");
    let d = if only.is_none_or(|o| o == "disk") {
        disk(b, &tool)
    } else {
        Ok(())
    };
    let n = if only.is_none_or(|o| o == "net") {
        net(b, &tool)
    } else {
        Ok(())
    };
    teardown();
    d?;
    n
}
