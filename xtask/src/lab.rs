//! The lab host: a QEMU VM with an emulated AMD CPU that has SVM and nested paging (TCG), booting
//! this machine's Debian kernel with `kvm_amd`, so that `/dev/kvm` inside it is a real
//! hardware-virtualization KVM. The lab sees this machine's file system read-only (under a tmpfs
//! overlay) and the workspace read-write at the same path; the command's exit status is returned.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Lab host options.
pub struct LabOpts {
    /// Memory in MiB.
    pub mem_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// Seconds before the lab host is killed.
    pub timeout_s: u32,
    /// Show the lab kernel's messages.
    pub verbose: bool,
}

const MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci",
    "net/9p/9pnet",
    "net/9p/9pnet_virtio",
    "fs/netfs/netfs",
    "fs/fscache/fscache",
    "fs/9p/9p",
    "fs/overlayfs/overlay",
];

fn newest(dir: &str, prefix: &str) -> Option<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort_by_key(|n| {
        n.trim_start_matches(prefix)
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse::<u64>().ok())
            .collect::<Vec<_>>()
    });
    v.pop()
}

fn have(c: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {c}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs the Debian packages of `needs` (command, package) whose command is missing.
pub fn ensure_commands(needs: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = needs
        .iter()
        .filter(|(c, _)| !have(c))
        .map(|(_, p)| *p)
        .collect();
    install(&missing)
}

fn install(missing: &[&str]) -> Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {}", missing.join(" "));
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {} >/dev/null",
            missing.join(" ")
        ))
        .status()?
        .success();
    if !ok {
        bail!(
            "cannot install {} (run as root, or install them yourself)",
            missing.join(" ")
        );
    }
    Ok(())
}

/// Installs what the lab host needs and is missing (needs root and Debian's package index).
pub fn ensure_packages() -> Result<()> {
    let mut missing = Vec::new();
    if !have("qemu-system-x86_64") {
        missing.push("qemu-system-x86");
    }
    if newest("/boot", "vmlinuz-").is_none() {
        missing.push("linux-image-amd64");
    }
    if !Path::new("/bin/busybox").exists() {
        missing.push("busybox-static");
    }
    if !have("cpio") {
        missing.push("cpio");
    }
    install(&missing)
}

/// Builds (or reuses) the lab initramfs for `kver` under `cache`.
fn initramfs(workspace: &Path, cache: &Path, kver: &str) -> Result<PathBuf> {
    let init = workspace.join("xtask/lab/init");
    let out = cache.join(format!("labinit-{kver}.gz"));
    let fresh = |o: &Path| -> bool {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        matches!((m(o), m(&init)), (Some(a), Some(b)) if a >= b)
    };
    if fresh(&out) {
        return Ok(out);
    }
    let work = cache.join("initramfs.work");
    let _ = std::fs::remove_dir_all(&work);
    for d in [
        "bin", "proc", "sys", "dev", "mod", "lower", "upper", "newroot", "rw",
    ] {
        std::fs::create_dir_all(work.join(d))?;
    }
    std::fs::copy("/bin/busybox", work.join("bin/busybox")).context("copy busybox")?;
    for a in [
        "sh",
        "mount",
        "umount",
        "insmod",
        "mkdir",
        "cat",
        "cp",
        "sed",
        "switch_root",
        "poweroff",
    ] {
        std::os::unix::fs::symlink("busybox", work.join("bin").join(a))?;
    }
    let moddir = PathBuf::from(format!("/lib/modules/{kver}/kernel"));
    for (i, m) in MODULES.iter().enumerate() {
        let src = moddir.join(format!("{m}.ko"));
        let name = Path::new(m)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Numbered so that the init's glob loads them in dependency order.
        if src.exists() {
            std::fs::copy(&src, work.join("mod").join(format!("{i:02}-{name}.ko")))?;
        }
    }
    std::fs::copy(&init, work.join("init"))?;
    std::fs::set_permissions(
        work.join("init"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc 2>/dev/null | gzip -1 > {}",
            work.display(),
            out.display()
        ))
        .status()?;
    if !st.success() {
        bail!("building the lab initramfs failed");
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(out)
}

/// Every 20 s: uptime, load, memory, the overlay's use and the busiest processes.
const MONITOR: &str = r#"echo 60 > /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null
( while sleep 20; do
  echo "lab-monitor: up $(cut -d' ' -f1 /proc/uptime)s load $(cut -d' ' -f1-3 /proc/loadavg)"
  grep -E '^(MemAvailable|Shmem|Dirty):' /proc/meminfo | tr -s ' ' | tr '\n' ' '; echo
  df -m / | tail -1
  ps -eo pid,rss,pcpu,stat,wchan:20,args --sort=-pcpu | head -8 | cut -c1-160
done ) >/dev/ttyS1 2>&1 &
"#;

/// Whether the lab kernel reports a CPU stuck for a minute or more.
fn wedged(log: &Path) -> bool {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().any(|l| {
        l.split("stuck for ")
            .nth(1)
            .and_then(|r| r.split('s').next())
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n >= 60)
    })
}

/// Prints the last `n` lines of the lab's kernel and monitor log.
fn print_tail(log: &Path, n: usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    eprintln!(
        "lab: last {} lines of the lab's kernel and monitor log ({}):",
        n.min(lines.len()),
        log.display()
    );
    for l in &lines[lines.len().saturating_sub(n)..] {
        eprintln!("  | {l}");
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// QEMU's TCG threading for the lab host: `multi` (a host thread per emulated CPU, the
/// default) or `single` (all emulated CPUs on one thread), from `FERRY_LAB_TCG`.
fn tcg_threads() -> &'static str {
    match std::env::var("FERRY_LAB_TCG").as_deref() {
        Ok("single") => "single",
        _ => "multi",
    }
}

/// The status [`run`] returns when the lab host ended without the command's (a hang or timeout).
pub const NO_STATUS: i32 = 125;

/// Runs `cmd` inside a lab host; returns its exit status (125 when the lab ended without one).
pub fn run(workspace: &Path, opts: &LabOpts, cmd: &[String]) -> Result<i32> {
    ensure_packages()?;
    let kernel = newest("/boot", "vmlinuz-").context("no kernel in /boot")?;
    let kver = kernel.trim_start_matches("vmlinuz-").to_string();
    let cache = std::env::var_os("FERRY_LAB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target/lab"));
    std::fs::create_dir_all(&cache)?;
    let initrd = initramfs(workspace, &cache, &kver)?;
    let id = format!("run-{}", std::process::id());
    let rundir = workspace.join(".lab").join(&id);
    std::fs::create_dir_all(&rundir)?;
    let mut s = String::from("#!/bin/sh\n");
    s.push_str("mount -t proc proc /proc; mount -t sysfs sys /sys\n");
    s.push_str("mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm\n");
    s.push_str("modprobe kvm_amd 2>/dev/null || modprobe kvm_intel 2>/dev/null || echo 'lab: no kvm module'\n");
    s.push_str("ip link set lo up 2>/dev/null; hostname lab\n");
    // One KVM VM held open until power-off, so that the tests' VMs never make the lab kernel
    // patch its own code (xtask/src/kvm_hold.rs says why).
    let me = std::env::current_exe().context("cannot find the xtask binary")?;
    let _ = writeln!(
        s,
        "{me} lab-kvm-hold --ready /run/ferry-kvm-held &\n\
         while [ ! -e /run/ferry-kvm-held ] && kill -0 $! 2>/dev/null; do sleep 0.1; done\n\
         [ -e /run/ferry-kvm-held ] || echo 'lab: could not hold a KVM VM open (see above)'",
        me = shell_quote(&me.display().to_string())
    );
    if !opts.verbose {
        // The lab's own health on the second serial port (with the kernel's messages): when a
        // run hangs, the log says whether memory ran out, a CPU locked up or a task hung.
        s.push_str(MONITOR);
    }
    let ws = workspace.display().to_string();
    let _ = writeln!(
        s,
        "mkdir -p {q} && mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 rwshare {q}",
        q = shell_quote(&ws)
    );
    for (k, v) in std::env::vars() {
        if k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !matches!(k.as_str(), "PWD" | "OLDPWD" | "SHLVL" | "_" | "HOSTNAME")
        {
            let _ = writeln!(s, "export {k}={}", shell_quote(&v));
        }
    }
    let cwd = std::env::current_dir()?.display().to_string();
    let _ = writeln!(s, "cd {}", shell_quote(&cwd));
    let line: Vec<String> = cmd.iter().map(|a| shell_quote(a)).collect();
    if opts.verbose {
        let _ = writeln!(s, "{}", line.join(" "));
    } else {
        let _ = writeln!(s, "{} </dev/null >/dev/ttyS0 2>&1", line.join(" "));
    }
    let _ = writeln!(
        s,
        "echo $? > {}",
        shell_quote(&rundir.join("rc").display().to_string())
    );
    s.push_str("sync; poweroff -f\n");
    std::fs::write(rundir.join("stage2.sh"), s)?;
    // `tsc=reliable`: the emulated AMD CPU lacks the constant-TSC flag, so a 2-CPU lab kernel
    // would mark its TSC unstable ("TSCs unsynchronized") although TCG's TSCs all follow the
    // machine's. KVM then re-offsets each guest's TSC whenever a vCPU changes host CPU (and
    // warns "SMP vm created on host with unstable TSC"), the guest finds its vCPUs' TSCs
    // unsynchronized, and timer deadlines can drift (suspected, not proven, in a 2-vCPU guest
    // that stalled at boot); production hosts have a constant, synchronized TSC, and so does
    // the lab with this.
    let mut append = format!("panic=-1 tsc=reliable ferrylab.rw={ws} ferrylab.run=.lab/{id}");
    let kernel_log = cache.join("last-kernel.log");
    std::fs::write(&kernel_log, b"").context("cannot create the lab kernel log")?;
    if opts.verbose {
        append.push_str(" console=ttyS0");
    } else {
        append.push_str(" console=ttyS1 loglevel=6");
    }
    let mut child = Command::new("timeout")
        .arg(opts.timeout_s.to_string())
        .arg("qemu-system-x86_64")
        .args([
            "-M",
            "q35",
            "-accel",
            &format!("tcg,thread={}", tcg_threads()),
            "-cpu",
            "max",
        ])
        .args([
            "-smp",
            &opts.cpus.to_string(),
            "-m",
            &opts.mem_mib.to_string(),
        ])
        .args([
            "-nographic",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-nic",
            "none",
            "-serial",
        ])
        .arg(if opts.verbose {
            "null".to_string()
        } else {
            format!("file:{}", kernel_log.display())
        })
        .arg("-kernel")
        .arg(format!("/boot/{kernel}"))
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", &append])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={ws},mount_tag=rwshare,security_model=none"
        ))
        .stdin(std::process::Stdio::null())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    // The lab's emulated CPUs can wedge (seen in CI: both stuck in the scheduler with the
    // soft-lockup watchdog firing, or the whole lab kernel silent). Once a CPU has been stuck
    // for a minute, or the monitor (which writes every 20 s) has been silent for two, the run
    // is lost: end it then instead of at the timeout.
    let mut last_len = 0u64;
    let mut last_growth = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st.to_string();
        }
        if !opts.verbose {
            let len = std::fs::metadata(&kernel_log).map_or(0, |m| m.len());
            if len != last_len {
                last_len = len;
                last_growth = std::time::Instant::now();
            }
            let silent =
                last_len > 0 && last_growth.elapsed() > std::time::Duration::from_secs(120);
            if silent || wedged(&kernel_log) {
                eprintln!(
                    "lab: the lab host is wedged ({}); stopping it",
                    if silent {
                        "its kernel and monitor silent for 2 minutes"
                    } else {
                        "a CPU stuck for over 60 s"
                    }
                );
                // SIGTERM to `timeout`, which passes it on to QEMU.
                let _ = Command::new("kill").arg(child.id().to_string()).status();
                let _ = child.wait();
                break "stopped: wedged".to_string();
            }
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    };
    let rc = std::fs::read_to_string(rundir.join("rc"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let _ = std::fs::remove_dir_all(&rundir);
    match rc {
        Some(rc) => Ok(rc),
        None => {
            eprintln!("lab: the lab host ended without the command's status (qemu: {status})");
            if !opts.verbose {
                print_tail(&kernel_log, 120);
            }
            Ok(NO_STATUS)
        }
    }
}
