//! `ferry vm receive` / `ferry vm migrate` / `ferry migration ...` end to end, worker to worker,
//! on this machine's KVM with the bare-metal dirtier (which checks its own memory).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bad_lines, beats, wait_beats, Env};
use ferry_guests::ip;

fn start(env: &Env, vm: &str, vcpus: &str, cmdline: &str) {
    start_env(env, vm, vcpus, cmdline, &[]);
}

/// [`start`] with extra environment variables for the worker (fault injection).
fn start_env(env: &Env, vm: &str, vcpus: &str, cmdline: &str, extra: &[(&str, &str)]) {
    start_args(env, vm, vcpus, cmdline, extra, &[]);
}

fn start_args(
    env: &Env,
    vm: &str,
    vcpus: &str,
    cmdline: &str,
    vars: &[(&str, &str)],
    more: &[&str],
) {
    let k = ferry_guests::dirtier();
    let c = env.console(vm);
    let mut args = vec![
        "vm",
        "start",
        vm,
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "64M",
        "--vcpus",
        vcpus,
        "--cmdline",
        cmdline,
        "--console-log",
        c.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    let o = env.ferry_env(&args, vars);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Creates the test's disk image (`DIR/d.img`, 16 MiB) and returns its path.
fn new_disk(env: &Env) -> String {
    let p = env.dir.join("d.img");
    let p = p.to_str().unwrap().to_string();
    env.ok(&["disk", "create", &p, "--size", "16M"]);
    p
}

/// Who holds the test's disk: `free`, `read-only` or `read-write`.
fn disk_lock(env: &Env) -> String {
    let p = env.dir.join("d.img");
    env.json(&["disk", "inspect", p.to_str().unwrap()])["lock"]
        .as_str()
        .unwrap()
        .to_string()
}

fn receive(env: &Env, vm: &str, listen: &str) -> String {
    env.receive(vm, listen)
}

/// The guest kept running across the move and found its memory intact.
fn assert_continued(env: &Env, a: &str, b: &str, after: usize) {
    let before = beats(&std::fs::read_to_string(env.console(a)).unwrap()).len();
    wait_beats(&env.console(b), after);
    let text = env.joined_consoles(a, b);
    let all = beats(&text);
    assert!(all.len() >= before + after);
    assert!(
        all.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "counter restarted or skipped: {all:?}"
    );
    assert!(
        all.iter().all(|x| x.1),
        "memory damaged: {:?} in {all:?}",
        bad_lines(&text)
    );
}

/// The VM still runs on the source, intact, and nothing is left on the destination; the
/// test's disk (if any) is held again, by the source alone.
fn assert_stayed(env: &Env, a: &str, b: &str) {
    assert_eq!(env.json(&["vm", "status", a])["state"], "running");
    let n = beats(&std::fs::read_to_string(env.console(a)).unwrap()).len();
    wait_beats(&env.console(a), n + 3);
    assert!(beats(&std::fs::read_to_string(env.console(a)).unwrap())
        .iter()
        .all(|x| x.1));
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.names().contains(&b.to_string()) {
        assert!(
            Instant::now() < deadline,
            "the destination worker is still there"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(beats(&std::fs::read_to_string(env.console(b)).unwrap_or_default()).is_empty());
    if env.dir.join("d.img").exists() {
        assert_eq!(
            disk_lock(env),
            "read-write",
            "the source took its disk back"
        );
    }
}

#[test]
fn live_migration_between_workers_keeps_the_guest_running_and_intact() {
    let env = Env::new("mig-live");
    let disk = new_disk(&env);
    start_args(
        &env,
        "a",
        "2",
        "mb=8 rate=3000 beat_ms=100",
        &[],
        &["--disk", &disk],
    );
    wait_beats(&env.console("a"), 3);
    let addr = receive(&env, "b", "127.0.0.1:0");
    assert_eq!(env.json(&["vm", "status", "b"])["state"], "receiving");
    let report = env.json(&["vm", "migrate", "a", "--to", &addr]);
    assert!(report["downtime_ms"].as_u64().unwrap() < 5000, "{report}");
    // The default: mutually authenticated TLS, more than one connection.
    assert_eq!(report["tls"], true, "{report}");
    // The guest beats every 100 ms: its console shows a gap of at least that much; the
    // vCPUs' own stop and start stamps fit inside the downtime (pause → RESUMED), and the
    // downtime's steps add up to no more than it.
    assert!(report["console_gap_ms"].as_u64().unwrap() >= 80, "{report}");
    let downtime = report["downtime_ms"].as_u64().unwrap();
    assert!(
        report["guest_downtime_ms"].as_u64().unwrap() <= downtime + 1,
        "{report}"
    );
    let steps: u64 = report["downtime_steps"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(steps > 0 && steps / 1000 <= downtime + 1, "{report}");
    assert_eq!(report["downtime_target_ms"], 100, "{report}");
    assert!(report["connections"].as_u64().unwrap() > 1, "{report}");
    assert!(
        report["zero_pages_skipped"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(
        env.names(),
        vec!["b".to_string()],
        "the source worker must be gone"
    );
    assert_eq!(env.json(&["vm", "status", "b"])["state"], "running");
    assert_continued(&env, "a", "b", 4);
    // The disk went with it: held by b, and free once b stops.
    assert_eq!(disk_lock(&env), "read-write");
    env.ok(&["vm", "stop", "b"]);
    assert_eq!(disk_lock(&env), "free");
}

#[test]
fn migration_without_an_identity_is_refused_unless_insecure_is_asked_for() {
    let env = Env::new("mig-insecure");
    start(&env, "a", "1", "mb=4 rate=2000 beat_ms=100 period=8");
    wait_beats(&env.console("a"), 2);
    let nowhere = env.dir.join("no-pki");
    let nowhere = nowhere.to_str().unwrap();
    let e = env.fails(&[
        "vm",
        "receive",
        "b",
        "--listen",
        "127.0.0.1:0",
        "--pki",
        nowhere,
    ]);
    assert!(
        e.contains("no TLS identity") && e.contains("ferry pki init"),
        "{e}"
    );
    let e = env.fails(&[
        "vm",
        "migrate",
        "a",
        "--to",
        "127.0.0.1:1",
        "--pki",
        nowhere,
    ]);
    assert!(e.contains("no TLS identity"), "{e}");
    assert!(!env.names().contains(&"b".to_string()));
    // A TLS source and a plain destination do not talk: refused, the VM stays.
    let c = env.console("b");
    let v = env.json(&[
        "vm",
        "receive",
        "b",
        "--listen",
        "127.0.0.1:0",
        "--insecure",
        "--console-log",
        c.to_str().unwrap(),
    ]);
    let addr = v["listen"].as_str().unwrap().to_string();
    let e = env.fails(&["vm", "migrate", "a", "--to", &addr]);
    assert!(e.contains("TLS"), "{e}");
    assert_eq!(env.json(&["vm", "status", "a"])["state"], "running");
    // Both sides insecure, with zstd over four connections.
    let report = env.json(&[
        "vm",
        "migrate",
        "a",
        "--to",
        &addr,
        "--insecure",
        "--compress",
        "zstd",
        "--connections",
        "4",
    ]);
    assert_eq!(report["tls"], false, "{report}");
    assert_eq!(report["connections"], 4, "{report}");
    assert!(
        report["compression_ratio"].as_f64().unwrap() > 4.0,
        "{report}"
    );
    assert_continued(&env, "a", "b", 3);
}

#[test]
fn quick_migration_through_the_cli() {
    let env = Env::new("mig-quick");
    start(&env, "a", "1", "mb=4 rate=2000 beat_ms=100");
    wait_beats(&env.console("a"), 2);
    let addr = receive(&env, "b", "127.0.0.1:0");
    let report = env.json(&["vm", "migrate", "a", "--to", &addr, "--quick"]);
    assert_eq!(report["rounds"], 0);
    assert_continued(&env, "a", "b", 3);
}

#[test]
fn cancel_during_precopy_leaves_the_vm_on_the_source() {
    let env = Env::new("mig-cancel");
    start(&env, "a", "1", "mb=4 rate=2000 beat_ms=100");
    wait_beats(&env.console("a"), 2);
    let addr = receive(&env, "b", "127.0.0.1:0");
    // 1 MiB/s: pre-copy takes seconds, long enough to cancel in.
    let mig = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "vm",
            "migrate",
            "a",
            "--to",
            &addr,
            "--bandwidth",
            "1",
            "--output",
            "json",
        ])
        .envs(env.vars())
        .spawn()
        .unwrap();
    wait_phase(&env, "a", "precopy");
    env.ok(&["migration", "cancel", "a"]);
    let out = mig.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "the migrate command must report the cancel"
    );
    let st = env.json(&["migration", "status", "a"]);
    assert_eq!(st["phase"], "cancelled", "{st}");
    assert_stayed(&env, "a", "b");
}

#[test]
fn unreachable_or_foreign_destinations_fail_cleanly() {
    let env = Env::new("mig-bad");
    start(&env, "a", "1", "mb=2 rate=1000 beat_ms=100");
    wait_beats(&env.console("a"), 2);
    // Nothing listening.
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let e = env.fails(&["vm", "migrate", "a", "--to", &free]);
    assert!(
        e.contains("migration connection failed") && e.contains("refused"),
        "{e}"
    );
    // A peer that speaks another protocol.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
        let mut b = [0u8; 64];
        let _ = s.read(&mut b);
    });
    let e = env.fails(&["vm", "migrate", "a", "--to", &addr]);
    assert!(e.contains("incompatible protocol"), "{e}");
    peer.join().unwrap();
    // Migrating to itself by name is refused by the destination (name in use).
    assert_eq!(env.json(&["vm", "status", "a"])["state"], "running");
    let n = beats(&std::fs::read_to_string(env.console("a")).unwrap()).len();
    wait_beats(&env.console("a"), n + 2);
    assert!(beats(&std::fs::read_to_string(env.console("a")).unwrap())
        .iter()
        .all(|x| x.1));
}

/// Starts a slow (1 MiB/s) migration of "a" to a receiver "b", kills worker `victim` with
/// SIGKILL once pre-copy runs, and returns the `ferry vm migrate` output.
fn kill_during_precopy(env: &Env, tag_victim: &str) -> std::process::Output {
    start(env, "a", "1", "mb=4 rate=2000 beat_ms=100");
    wait_beats(&env.console("a"), 2);
    let addr = receive(env, "b", "127.0.0.1:0");
    let pid = env.json(&["vm", "status", tag_victim])["pid"]
        .as_u64()
        .unwrap();
    let mig = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["vm", "migrate", "a", "--to", &addr, "--bandwidth", "1"])
        .envs(env.vars())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_phase(env, "a", "precopy");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let out = mig.wait_with_output().unwrap();
    assert!(!out.status.success());
    out
}

#[test]
fn killing_the_destination_during_precopy_leaves_the_vm_on_the_source() {
    let env = Env::new("mig-kill");
    let out = kill_during_precopy(&env, "b");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("migration connection failed") || e.contains("the peer failed"),
        "{e}"
    );
    assert_eq!(env.json(&["migration", "status", "a"])["phase"], "failed");
    assert_stayed(&env, "a", "b");
}

/// Two "hosts": network namespaces joined by a veth pair, 10.231.N.1 and 10.231.N.2.
struct Hosts {
    a: String,
    b: String,
    veth_a: String,
    ip_b: String,
}

impl Hosts {
    fn new(n: u8) -> Hosts {
        let tag = format!("{}{n}", std::process::id() % 10000);
        let h = Hosts {
            a: format!("fa{tag}"),
            b: format!("fb{tag}"),
            veth_a: format!("va{tag}"),
            ip_b: format!("10.231.{n}.2"),
        };
        let vb = format!("vb{tag}");
        ip(&["netns", "add", &h.a]);
        ip(&["netns", "add", &h.b]);
        ip(&[
            "link", "add", &h.veth_a, "netns", &h.a, "type", "veth", "peer", "name", &vb, "netns",
            &h.b,
        ]);
        ip(&[
            "-n",
            &h.a,
            "addr",
            "add",
            &format!("10.231.{n}.1/24"),
            "dev",
            &h.veth_a,
        ]);
        ip(&[
            "-n",
            &h.b,
            "addr",
            "add",
            &format!("{}/24", h.ip_b),
            "dev",
            &vb,
        ]);
        for (ns, d) in [(&h.a, &h.veth_a), (&h.b, &vb)] {
            ip(&["-n", ns, "link", "set", d, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        h
    }

    fn ferry(
        &self,
        env: &Env,
        ns: &str,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ferry")])
            .args(args)
            .envs(env.vars())
            .envs(extra.iter().copied())
            .output()
            .unwrap()
    }

    fn ok(&self, env: &Env, ns: &str, args: &[&str]) {
        self.ok_env(env, ns, args, &[]);
    }

    fn ok_env(&self, env: &Env, ns: &str, args: &[&str], extra: &[(&str, &str)]) {
        let o = self.ferry(env, ns, args, extra);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Starts the dirtier as "a" on host A and a receiver "b" on host B; returns B's address.
    fn setup(&self, env: &Env) -> String {
        self.setup_env(env, &[], &[])
    }

    /// [`Hosts::setup`], the source worker started with `extra` in its environment, the
    /// receiving one with `extra_b`.
    /// Starts VM `a` (with a disk on the storage both hosts share) on host A and a receiver
    /// `b` on host B; returns B's migration address.
    fn setup_env(&self, env: &Env, extra: &[(&str, &str)], extra_b: &[(&str, &str)]) -> String {
        let k = ferry_guests::dirtier();
        let (ca, cb) = (env.console("a"), env.console("b"));
        let disk = new_disk(env);
        self.ok_env(
            env,
            &self.a,
            &[
                "vm",
                "start",
                "a",
                "--kernel",
                k.to_str().unwrap(),
                "--memory",
                "64M",
                "--vcpus",
                "2",
                "--cmdline",
                "mb=4 rate=2000 beat_ms=100",
                "--console-log",
                ca.to_str().unwrap(),
                "--disk",
                &disk,
            ],
            extra,
        );
        wait_beats(&ca, 2);
        let addr = format!("{}:7070", self.ip_b);
        self.ok_env(
            env,
            &self.b,
            &[
                "vm",
                "receive",
                "b",
                "--listen",
                &addr,
                "--console-log",
                cb.to_str().unwrap(),
            ],
            extra_b,
        );
        addr
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[test]
fn migration_between_network_namespaces() {
    let env = Env::new("mig-netns");
    let hosts = Hosts::new(7);
    let addr = hosts.setup(&env);
    hosts.ok(&env, &hosts.a, &["vm", "migrate", "a", "--to", &addr]);
    assert_continued(&env, "a", "b", 3);
    assert_eq!(disk_lock(&env), "read-write", "host B holds the disk now");
    env.ok(&["vm", "stop", "b"]);
    assert_eq!(disk_lock(&env), "free");
}

#[test]
fn cutting_the_link_during_precopy_leaves_the_vm_on_the_source() {
    let env = Env::new("mig-cut");
    let hosts = Hosts::new(8);
    let addr = hosts.setup(&env);
    let mig = Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts.a,
            env!("CARGO_BIN_EXE_ferry"),
            "vm",
            "migrate",
            "a",
            "--to",
            &addr,
            "--bandwidth",
            "1",
        ])
        .envs(env.vars())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_phase(&env, "a", "precopy");
    ip(&["-n", &hosts.a, "link", "set", &hosts.veth_a, "down"]);
    let out = mig.wait_with_output().unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("migration connection failed"), "{e}");
    assert_stayed(&env, "a", "b");
}

#[test]
fn killing_the_source_during_precopy_leaves_nothing_on_the_destination() {
    let env = Env::new("mig-ksrc");
    kill_during_precopy(&env, "a");
    // The destination discards what it had: its worker goes away and no guest ran there.
    assert_nowhere(&env);
}

/// Waits until the VM's migration reports `phase`.
fn wait_phase(env: &Env, vm: &str, phase: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = env.ferry(&["migration", "status", vm, "--output", "json"]);
        if o.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            if v["phase"] == phase {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the migration never reached {phase}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- Failures at each point of a migration (FERRY_FAULT, test builds only) ----

/// The source worker "a", started to hold its next migration at `point` (see
/// crates/migration/src/fault.rs); returns the mark file that exists while it holds.
fn fault_env(env: &Env, point: &str) -> (Vec<(&'static str, String)>, std::path::PathBuf) {
    let mark = env.dir.join("fault.mark");
    (
        vec![
            ("FERRY_FAULT", format!("hold:{point}")),
            ("FERRY_FAULT_MARK", mark.to_str().unwrap().to_string()),
        ],
        mark,
    )
}

fn borrowed<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    v.iter().map(|(k, x)| (*k, x.as_str())).collect()
}

fn wait_file(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// On localhost: "a" (held at `point`) migrating to a receiver "b". Returns the running
/// `ferry vm migrate` and the mark file, once the migration holds.
fn held_migration(
    env: &Env,
    point: &str,
    extra_args: &[&str],
) -> (std::process::Child, std::path::PathBuf) {
    let (vars, mark) = fault_env(env, point);
    // With a disk: every failure must also leave the disk with exactly one VM, or none.
    let disk = new_disk(env);
    start_args(
        env,
        "a",
        "1",
        "mb=4 rate=2000 beat_ms=100",
        &borrowed(&vars),
        &["--disk", &disk],
    );
    wait_beats(&env.console("a"), 2);
    let addr = receive(env, "b", "127.0.0.1:0");
    let mig = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["vm", "migrate", "a", "--to", &addr])
        .args(extra_args)
        .envs(env.vars())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_file(&mark);
    (mig, mark)
}

fn kill(env: &Env, vm: &str) {
    let pid = env.json(&["vm", "status", vm])["pid"].as_u64().unwrap();
    let st = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

fn failed(mig: std::process::Child) -> String {
    let out = mig.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the migration succeeded");
    assert!(!e.contains("panicked"), "{e}");
    e
}

/// Nothing runs anywhere any more: both workers gone, no guest output on the destination.
fn assert_nowhere(env: &Env) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while !env.names().is_empty() {
        assert!(
            Instant::now() < deadline,
            "still running: {:?}",
            env.names()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(beats(&std::fs::read_to_string(env.console("b")).unwrap_or_default()).is_empty());
    if env.dir.join("d.img").exists() {
        assert_eq!(
            disk_lock(env),
            "free",
            "a disk held by a VM that runs nowhere"
        );
    }
}

#[test]
fn cancel_in_setup_and_just_before_the_commit_leaves_the_vm_on_the_source() {
    for point in ["setup", "ready"] {
        let env = Env::new(&format!("cancel-{point}"));
        let (mig, _mark) = held_migration(&env, point, &[]);
        env.ok(&["migration", "cancel", "a"]);
        let e = failed(mig);
        assert!(e.contains("cancelled"), "{point}: {e}");
        assert_eq!(
            env.json(&["migration", "status", "a"])["phase"],
            "cancelled"
        );
        if point == "setup" {
            // Nothing but the handshake and the config went out.
            assert_eq!(env.json(&["migration", "status", "a"])["pages_sent"], 0);
        }
        assert_stayed(&env, "a", "b");
    }
}

#[test]
fn killing_the_destination_in_setup_stop_and_copy_or_ready_leaves_the_vm_on_the_source() {
    for point in ["setup", "stop-and-copy", "ready"] {
        let env = Env::new(&format!("kdst-{point}"));
        let (mig, mark) = held_migration(&env, point, &[]);
        kill(&env, "b");
        std::fs::remove_file(&mark).unwrap();
        let e = failed(mig);
        assert!(!e.contains("commit outcome unknown"), "{point}: {e}");
        assert_eq!(env.json(&["migration", "status", "a"])["phase"], "failed");
        assert_stayed(&env, "a", "b");
    }
}

#[test]
fn killing_the_source_in_setup_stop_and_copy_or_ready_runs_the_vm_nowhere() {
    for point in ["setup", "stop-and-copy", "ready"] {
        let env = Env::new(&format!("ksrc-{point}"));
        let (mig, _mark) = held_migration(&env, point, &[]);
        kill(&env, "a");
        failed(mig);
        // The destination never ran a vCPU and discards what it had; the VM's disk (once
        // there are disks) was never opened there. The cluster restarts it.
        assert_nowhere(&env);
    }
}

#[test]
fn a_corrupted_page_batch_is_caught_and_the_vm_stays_on_the_source() {
    let env = Env::new("mig-corrupt");
    start_env(
        &env,
        "a",
        "1",
        "mb=4 rate=2000 beat_ms=100",
        &[("FERRY_FAULT", "corrupt-batch:3")],
    );
    wait_beats(&env.console("a"), 2);
    let addr = receive(&env, "b", "127.0.0.1:0");
    let e = env.fails(&["vm", "migrate", "a", "--to", &addr]);
    assert!(
        e.contains("migration connection failed") || e.contains("peer"),
        "{e}"
    );
    assert_stayed(&env, "a", "b");
    // The destination said why it gave up.
    let log = std::fs::read_to_string(env.dir.join("run/vms/b/worker.log")).unwrap_or_default();
    assert!(log.contains("checksum mismatch"), "{log}");
}

/// Cuts host A's link while the migration holds at `point` (on the destination for
/// `dest-committed`), then lets it go on.
fn cut_at(point: &str, n: u8) -> (Env, Hosts, String) {
    let env = Env::new(&format!("cut-{point}"));
    let hosts = Hosts::new(n);
    let (vars, mark) = fault_env(&env, point);
    let vars = borrowed(&vars);
    let addr = if point.starts_with("dest-") {
        hosts.setup_env(&env, &[], &vars)
    } else {
        hosts.setup_env(&env, &vars, &[])
    };
    let mig = Command::new("ip")
        .args(["netns", "exec", &hosts.a, env!("CARGO_BIN_EXE_ferry")])
        .args(["vm", "migrate", "a", "--to", &addr])
        .envs(env.vars())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_file(&mark);
    ip(&["-n", &hosts.a, "link", "set", &hosts.veth_a, "down"]);
    std::fs::remove_file(&mark).unwrap();
    let e = failed(mig);
    (env, hosts, e)
}

#[test]
fn cutting_the_link_in_stop_and_copy_or_just_before_the_commit_leaves_the_vm_on_the_source() {
    for (point, n) in [("stop-and-copy", 9), ("ready", 10)] {
        let (env, _hosts, e) = cut_at(point, n);
        assert!(!e.contains("commit outcome unknown"), "{point}: {e}");
        assert_stayed(&env, "a", "b");
    }
}

#[test]
fn cutting_the_link_after_the_commit_leaves_the_vm_on_the_destination_only() {
    // The destination holds right after COMMIT arrived; the link goes down before its
    // RESUMED can get back.
    let (env, _hosts, e) = cut_at("dest-committed", 11);
    assert!(e.contains("commit outcome unknown"), "{e}");
    // The destination had COMMIT: it runs the guest, intact; the source stays paused and
    // refuses to resume, so the VM never runs twice.
    assert_eq!(env.json(&["vm", "status", "a"])["state"], "paused");
    let r = env.fails(&["vm", "resume", "a"]);
    assert!(r.contains("handed over") || r.contains("fenced"), "{r}");
    assert_continued(&env, "a", "b", 3);
    // The operator decides: the destination runs it, so the paused source goes.
    let r = env.fails(&["vm", "resolve", "b", "--running-on", "source"]);
    assert!(r.contains("nothing to resolve"), "{r}");
    let v = env.json(&["vm", "resolve", "a", "--running-on", "destination"]);
    assert_eq!(v["state"], "stopped (runs on the destination)", "{v}");
    assert_eq!(env.names(), vec!["b".to_string()]);
    env.ok(&["vm", "stop", "b"]);
}
