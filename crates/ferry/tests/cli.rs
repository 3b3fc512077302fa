//! End-to-end tests of `ferry vm ...` and the worker process, on the machine's own /dev/kvm
//! with the bare-metal dirtier (it checks its own memory and prints `beat <n> ok`).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::Env;
use ferry_guests::{ip, TestBridge};

trait StartDirtier {
    fn start(&self, vm: &str, vcpus: &str);
}

impl StartDirtier for Env {
    fn start(&self, vm: &str, vcpus: &str) {
        let dirtier = dirtier();
        let console = self.console(vm);
        self.ok(&[
            "vm",
            "start",
            vm,
            "--kernel",
            dirtier.to_str().unwrap(),
            "--memory",
            "32M",
            "--vcpus",
            vcpus,
            "--cmdline",
            "mb=2 rate=2000 beat_ms=100",
            "--console-log",
            console.to_str().unwrap(),
        ]);
    }
}

fn dirtier() -> PathBuf {
    ferry_guests::dirtier()
}

use common::beats_in as beats;
use common::wait_beats;

fn all_ok(b: &[(u64, bool)]) -> bool {
    b.iter().all(|x| x.1)
}

#[test]
fn save_then_restore_in_a_new_process_continues_the_guest() {
    let env = Env::new("quick");
    env.start("a", "2");
    let st = env.json(&["vm", "status", "a"]);
    assert_eq!(st["state"], "running");
    let pid_a = st["pid"].as_u64().unwrap();
    assert!(all_ok(&wait_beats(&env.console("a"), 3)));

    let state = env.dir.join("a.state");
    let rep = env.json(&["vm", "save", "a", "--to", state.to_str().unwrap()]);
    assert!(
        rep["report"]["file_bytes"].as_u64().unwrap() < 8 << 20,
        "zero pages must not be stored: {rep}"
    );
    assert!(env.names().is_empty(), "save must stop the worker");
    let last = beats(&env.console("a")).last().unwrap().0;

    env.restore_as(&state, "b");
    let st = env.json(&["vm", "status", "b"]);
    assert_ne!(
        st["pid"].as_u64().unwrap(),
        pid_a,
        "restore must run in a new process"
    );
    wait_beats(&env.console("b"), 4);
    // The two consoles joined are one guest's output: a line cut by the save is whole again.
    let joined = env.dir.join("ab.console");
    std::fs::write(&joined, env.joined_consoles("a", "b")).unwrap();
    let all = beats(&joined);
    assert!(all.last().unwrap().0 >= last + 3, "{all:?}");
    assert!(
        all.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "the beat counter continues without restart: {all:?}"
    );
    assert!(all_ok(&all), "{all:?}");

    env.ok(&["vm", "pause", "b"]);
    assert_eq!(env.json(&["vm", "status", "b"])["state"], "paused");
    env.ok(&["vm", "resume", "b"]);
    let n = beats(&env.console("b")).len();
    assert!(all_ok(&wait_beats(&env.console("b"), n + 2)));
    env.ok(&["vm", "stop", "b"]);
    assert!(env.names().is_empty());
}

#[test]
fn one_state_file_restored_twice_gives_identical_memory() {
    let env = Env::new("twice");
    env.start("a", "1");
    wait_beats(&env.console("a"), 2);
    let state = env.dir.join("a.state");
    env.ok(&["vm", "save", "a", "--to", state.to_str().unwrap()]);
    for n in ["r1", "r2"] {
        env.ok(&[
            "vm",
            "restore",
            state.to_str().unwrap(),
            "--name",
            n,
            "--paused",
        ]);
    }
    let h1 = env.json(&["vm", "memory-hash", "r1"])["hash"].clone();
    let h2 = env.json(&["vm", "memory-hash", "r2"])["hash"].clone();
    assert_eq!(h1, h2);
    assert!(h1.as_str().is_some_and(|h| h.len() == 16));
}

#[test]
fn save_failing_half_way_leaves_the_vm_running() {
    let env = Env::new("full");
    let mnt = env.dir.join("tiny");
    std::fs::create_dir_all(&mnt).unwrap();
    let m = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(
        m.success(),
        "mounting a tiny tmpfs needs root (the test suite runs as root)"
    );
    env.start("a", "1");
    wait_beats(&env.console("a"), 2);
    let target = mnt.join("a.state");
    let err = env.fails(&["vm", "save", "a", "--to", target.to_str().unwrap()]);
    assert!(
        err.contains("save failed") && err.contains("No space left"),
        "{err}"
    );
    assert_eq!(env.json(&["vm", "status", "a"])["state"], "running");
    assert_eq!(
        std::fs::read_dir(&mnt).unwrap().count(),
        0,
        "no partial state file may remain"
    );
    let n = beats(&env.console("a")).len();
    assert!(all_ok(&wait_beats(&env.console("a"), n + 2)));
    let _ = Command::new("umount").arg(&mnt).status();
}

#[test]
fn bad_input_gets_a_clear_error_and_nothing_half_done() {
    let env = Env::new("bad");
    let d = dirtier();
    let k = d.to_str().unwrap();
    let e = env.fails(&["vm", "start", "x", "--kernel", "/nonexistent/vmlinux"]);
    assert!(e.contains("cannot read kernel /nonexistent/vmlinux"), "{e}");
    let junk = env.dir.join("junk");
    std::fs::write(&junk, b"hello").unwrap();
    let e = env.fails(&["vm", "start", "x", "--kernel", junk.to_str().unwrap()]);
    assert!(e.contains("not a bootable image"), "{e}");
    let e = env.fails(&["vm", "start", "x", "--kernel", k, "--memory", "8M"]);
    assert!(e.contains("invalid memory size 8 MiB"), "{e}");
    let e = env.fails(&["vm", "start", "x", "--kernel", k, "--vcpus", "0"]);
    assert!(e.contains("invalid vCPU count 0"), "{e}");
    let e = env.fails(&["vm", "start", "../x", "--kernel", k]);
    assert!(e.contains("invalid VM name"), "{e}");

    // An image whose segment lies above the guest's RAM.
    let high = env.dir.join("high.elf");
    std::fs::write(&high, elf_with_segment_at(64 << 20)).unwrap();
    let e = env.fails(&[
        "vm",
        "start",
        "x",
        "--kernel",
        high.to_str().unwrap(),
        "--memory",
        "16M",
    ]);
    assert!(e.contains("too small for the image"), "{e}");

    // No KVM device.
    let o = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["vm", "start", "x", "--kernel", k, "--memory", "32M"])
        .env("FERRY_RUN_DIR", env.dir.join("run"))
        .env("FERRY_VM_BIN", env!("CARGO_BIN_EXE_ferry-vm"))
        .env("FERRY_KVM_DEVICE", "/nonexistent/kvm")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("cannot open /nonexistent/kvm"),
        "{e}"
    );

    // Same name twice.
    env.start("dup", "1");
    let e = env.fails(&["vm", "start", "dup", "--kernel", k, "--memory", "32M"]);
    assert!(e.contains("already running"), "{e}");

    // Unknown VM.
    let e = env.fails(&["vm", "pause", "ghost"]);
    assert!(e.contains("no VM named \"ghost\""), "{e}");

    // Corrupted, truncated and foreign state files.
    let state = env.dir.join("dup.state");
    env.ok(&["vm", "save", "dup", "--to", state.to_str().unwrap()]);
    let good = std::fs::read(&state).unwrap();
    let mut flipped = good.clone();
    let i = good.len() - 3000;
    flipped[i] ^= 0x10;
    for (what, bytes, expect) in [
        ("truncated", good[..good.len() / 3].to_vec(), "truncated"),
        ("corrupted", flipped, "checksum mismatch"),
        (
            "foreign",
            b"#!/bin/sh\necho not a state file\n".to_vec(),
            "not a Ferry state file",
        ),
    ] {
        let p = env.dir.join(what);
        std::fs::write(&p, bytes).unwrap();
        let e = env.fails(&["vm", "restore", p.to_str().unwrap(), "--name", "r"]);
        assert!(e.contains(expect), "{what}: {e}");
    }
    assert!(
        env.names().is_empty(),
        "nothing may be left running: {:?}",
        env.names()
    );

    // Unknown config keys, straight to the worker.
    let cfg = env.dir.join("cfg.json");
    std::fs::write(
        &cfg,
        format!(r#"{{"name":"c","vcpus":1,"memory_mib":32,"kernel":"{k}","turbo":true}}"#),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_ferry-vm"))
        .arg("--config")
        .arg(&cfg)
        .env("FERRY_RUN_DIR", env.dir.join("run"))
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["ready"], false);
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `turbo`"),
        "{report}"
    );
}

#[test]
fn a_user_without_kvm_permission_is_told_so() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // only root can switch to an unprivileged user for this check
    }
    let env = Env::new("perm");
    std::fs::set_permissions(
        &env.dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    std::fs::set_permissions(
        env.dir.join("run"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let kernel = env.dir.join("dirtier.elf");
    std::fs::copy(dirtier(), &kernel).unwrap();
    std::fs::set_permissions(&kernel, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    use std::os::unix::process::CommandExt;
    std::fs::write(
        env.dir.join("cfg.json"),
        format!(
            r#"{{"name":"p","vcpus":1,"memory_mib":32,"kernel":"{}"}}"#,
            kernel.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        env.dir.join("cfg.json"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_ferry-vm"))
        .arg("--config")
        .arg(env.dir.join("cfg.json"))
        .uid(65534)
        .env("FERRY_RUN_DIR", env.dir.join("run"))
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let e = report["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("cannot open /dev/kvm") && e.contains("Permission denied"),
        "{report}"
    );
}

/// A minimal x86-64 ELF with one PT_LOAD segment at `paddr`.
fn elf_with_segment_at(paddr: u64) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000 + 16];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&paddr.to_le_bytes()); // entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = &mut f[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&7u32.to_le_bytes());
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
    ph[16..24].copy_from_slice(&paddr.to_le_bytes());
    ph[24..32].copy_from_slice(&paddr.to_le_bytes());
    ph[32..40].copy_from_slice(&16u64.to_le_bytes());
    ph[40..48].copy_from_slice(&16u64.to_le_bytes());
    f
}

#[test]
fn disk_images_are_created_sparse_inspected_and_never_overwritten() {
    let env = Env::new("disk");
    let p = env.dir.join("d.img");
    let v = env.json(&["disk", "create", p.to_str().unwrap(), "--size", "2G"]);
    assert_eq!(v["size"], 2u64 << 30, "{v}");
    assert!(v["allocated"].as_u64().unwrap() < 1 << 20, "{v}");
    assert_eq!(v["lock"], "free");
    let v = env.json(&["disk", "inspect", p.to_str().unwrap()]);
    assert_eq!(v["size"], 2u64 << 30, "{v}");
    let e = env.fails(&["disk", "create", p.to_str().unwrap(), "--size", "1G"]);
    assert!(e.contains("exists already"), "{e}");
    let e = env.fails(&[
        "disk",
        "create",
        env.dir.join("z.img").to_str().unwrap(),
        "--size",
        "0",
    ]);
    assert!(e.contains("invalid disk size"), "{e}");
    let e = env.fails(&[
        "disk",
        "inspect",
        env.dir.join("none.img").to_str().unwrap(),
    ]);
    assert!(e.contains("none.img"), "{e}");
}

#[test]
fn a_disk_is_attached_to_one_running_vm_at_a_time_and_bad_disks_are_refused() {
    let env = Env::new("disk-attach");
    let k = dirtier();
    let k = k.to_str().unwrap();
    let p = env.dir.join("d.img");
    let p = p.to_str().unwrap();
    env.ok(&["disk", "create", p, "--size", "16M"]);
    let start = |name: &str, disk: &str| start_small(&env, name, &["--disk", disk]);
    let o = start("a", p);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(env.json(&["disk", "inspect", p])["lock"], "read-write");
    // A second VM cannot open it for writing, nor read it while it is written.
    for spec in [p.to_string(), format!("{p},readonly")] {
        let o = start("b", &spec);
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("in use"), "{e}");
    }
    assert_eq!(env.names(), vec!["a".to_string()], "nothing half-started");
    // A failed save gives the disk back to the running VM (the target directory is missing).
    let e = env.fails(&["vm", "save", "a", "--to", "/nonexistent-dir/a.state"]);
    assert!(e.contains("save failed"), "{e}");
    assert_eq!(env.json(&["vm", "status", "a"])["state"], "running");
    assert_eq!(env.json(&["disk", "inspect", p])["lock"], "read-write");
    env.ok(&["vm", "stop", "a"]);
    // Stopped: the lock is gone, and two read-only users may share it.
    assert_eq!(env.json(&["disk", "inspect", p])["lock"], "free");
    for name in ["r1", "r2"] {
        let o = start(name, &format!("{p},readonly"));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    env.ok(&["vm", "stop", "r1"]);
    env.ok(&["vm", "stop", "r2"]);
    // Missing or relative-but-missing images are refused before a worker starts.
    let e = env.fails(&[
        "vm",
        "start",
        "c",
        "--kernel",
        k,
        "--memory",
        "32M",
        "--disk",
        "/nonexistent.img",
    ]);
    assert!(e.contains("nonexistent.img"), "{e}");
}

/// `ferry vm start NAME` of a small dirtier VM with `extra` options.
fn start_small(env: &Env, name: &str, extra: &[&str]) -> std::process::Output {
    let k = dirtier();
    let mut args = vec![
        "vm",
        "start",
        name,
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "32M",
        "--cmdline",
        "mb=1",
    ];
    args.extend_from_slice(extra);
    env.ferry(&args)
}

fn sysfs_net(dev: &str, what: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/class/net/{dev}/{what}"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Waits (10 s at most) until bridge `br` forwards `mac` to port `port`.
fn wait_fdb(br: &str, mac: &str, port: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fdb = Command::new("bridge")
            .args(["fdb", "show", "br", br])
            .output()
            .unwrap();
        let fdb = String::from_utf8_lossy(&fdb.stdout).into_owned();
        if fdb
            .lines()
            .any(|l| l.starts_with(mac) && l.contains(&format!("dev {port} ")))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "MAC not learned on {port}:\n{fdb}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_nic_is_a_tap_on_its_bridge_and_a_moved_or_restored_vm_is_announced_from_its_new_port() {
    let env = Env::new("nic");
    let br = format!("fbrt{}", std::process::id() % 100_000);
    let _gone = TestBridge::new(&br);
    let mac = "52:54:00:aa:00:01";
    let nic = format!("bridge={br},mac={mac},mtu=9000");
    let start = |name: &str, nic: &str| start_small(&env, name, &["--nic", nic]);
    let o = start("a", &nic);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pid_a = env.json(&["vm", "status", "a"])["pid"].as_u64().unwrap();
    let tap_a = format!("fe{pid_a}n0");
    let master = std::fs::read_link(format!("/sys/class/net/{tap_a}/master")).unwrap();
    assert!(master.ends_with(&br), "{master:?}");
    assert_eq!(sysfs_net(&tap_a, "mtu").as_deref(), Some("9000"));
    // The host side sorts above any guest (fe:…) so the bridge never takes its address.
    assert_eq!(
        sysfs_net(&tap_a, "address").as_deref(),
        Some("fe:54:00:aa:00:01")
    );
    // Move it: the destination has its own TAP on the bridge, the source's is gone, and the
    // bridge learned the VM's MAC on the new port from the announcement (this guest never
    // sends a frame itself).
    let addr = env.receive("b", "127.0.0.1:0");
    env.ok(&["vm", "migrate", "a", "--to", &addr]);
    let pid_b = env.json(&["vm", "status", "b"])["pid"].as_u64().unwrap();
    let tap_b = format!("fe{pid_b}n0");
    wait_fdb(&br, mac, &tap_b);
    assert!(
        sysfs_net(&tap_a, "mtu").is_none(),
        "the source's TAP is left"
    );
    // Save, then restore into a new worker: its new TAP is a new bridge port, and the bridge
    // learns the MAC there from the restored VM's announcement too.
    let state = env.dir.join("b.state");
    env.ok(&["vm", "save", "b", "--to", state.to_str().unwrap()]);
    // The TAP goes with the saved VM's worker process, which exits right after the save.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sysfs_net(&tap_b, "mtu").is_some() {
        assert!(Instant::now() < deadline, "the saved VM's TAP is left");
        std::thread::sleep(Duration::from_millis(20));
    }
    env.ok(&["vm", "restore", state.to_str().unwrap(), "--name", "b"]);
    let pid_r = env.json(&["vm", "status", "b"])["pid"].as_u64().unwrap();
    let tap_r = format!("fe{pid_r}n0");
    assert_eq!(sysfs_net(&tap_r, "mtu").as_deref(), Some("9000"));
    wait_fdb(&br, mac, &tap_r);
    let tap_b = tap_r;
    // Bad NICs are refused with the reason, before a worker starts.
    for (spec, why) in [
        ("bridge=no-such-br0".to_string(), "does not exist"),
        (format!("bridge={br},mac=01:00:5e:00:00:01"), "invalid NIC"),
        (format!("bridge={br},mtu=20"), "invalid NIC"),
        (format!("bridge={br},queues=0"), "invalid NIC"),
        (format!("bridge={br},queues=17"), "invalid NIC"),
        ("mac=52:54:00:00:00:09".to_string(), "invalid NIC"),
    ] {
        let o = start("c", &spec);
        assert!(!o.status.success(), "{spec}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(why), "{spec}: {e}");
    }
    env.ok(&["vm", "stop", "b"]);
    assert!(
        sysfs_net(&tap_b, "mtu").is_none(),
        "the TAP outlived its VM"
    );
    ip(&["link", "del", &br]);
}

#[test]
fn a_guest_that_stops_on_its_own_says_how_and_where() {
    let env = Env::new("reset");
    let k = dirtier();
    let o = env.ferry(&[
        "vm",
        "start",
        "r",
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "32M",
        "--cmdline",
        "mb=1 beat_ms=50 reset_after=3",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The guest resets itself after its third beat; the worker stops with it.
    let sock = env.dir.join("run/vms/r/control.sock");
    let deadline = Instant::now() + Duration::from_secs(60);
    while sock.exists() {
        assert!(Instant::now() < deadline, "the worker outlived its guest");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(env.dir.join("run/vms/r/worker.log")).unwrap();
    assert!(
        log.contains("the guest reset itself through the i8042"),
        "{log}"
    );
    assert!(log.contains("stopped at rip="), "{log}");
    assert!(log.contains("GuestShutdown"), "{log}");
}

/// Polls the worker's status until its dirty-rate window satisfies `done` (a window every
/// 10 s; a minute at most).
fn dirty_until(
    env: &Env,
    vm: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = env.json(&["vm", "status", vm])["dirty"].clone();
        if !d.is_null() && done(&d) {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "no such dirty-rate window: last {d}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_worker_measures_how_fast_its_guest_writes_memory() {
    let env = Env::new("dirtyrate");
    let k = dirtier();
    let console = env.console("d");
    // 8 MiB of 64 rewritten page by page at 4,000 pages/s: the whole buffer (2,048 pages)
    // within each 1 s window: 8 MiB/s of unique pages, an eighth of the RAM per window.
    env.ok(&[
        "vm",
        "start",
        "d",
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "64M",
        "--cmdline",
        "mb=8 rate=4000 beat_ms=100",
        "--console-log",
        console.to_str().unwrap(),
    ]);
    wait_beats(&console, 2);
    let d = dirty_until(&env, "d", |d| d["changed_pages"].as_u64() > Some(0));
    let mib_s = d["bytes_per_second"].as_f64().unwrap() / (1u64 << 20) as f64;
    eprintln!("measured: {mib_s:.1} MiB/s ({d})");
    assert_eq!(d["sampled_pages"], 256, "{d}");
    // An eighth of 256 sampled pages is 32 expected: well within 2..16 MiB/s.
    assert!((2.0..16.0).contains(&mib_s), "{mib_s} MiB/s: {d}");
    // Paused, the guest writes nothing: a window that starts after the pause sees no change.
    env.ok(&["vm", "pause", "d"]);
    let before = d["window_ms"].clone();
    let idle = dirty_until(&env, "d", |x| x["changed_pages"] == 0 && *x != d);
    assert_eq!(idle["bytes_per_second"], 0.0, "{idle} (before: {before})");
    env.ok(&["vm", "resume", "d"]);
    let b = beats(&console);
    assert!(all_ok(&b), "the guest's memory checks failed: {b:?}");
    env.ok(&["vm", "stop", "d"]);
}
