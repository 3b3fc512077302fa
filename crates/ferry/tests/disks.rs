//! `ferry vm disk add|remove|list` on running VMs (the SCSI controller), end to end on this
//! machine's KVM with the bare-metal dirtier, which checks its own memory: the controller's
//! LUN set and the disks' locks through hot-plug, refusals, save/restore and live migration.
//! (What a Linux guest sees of it is in the lab tests, `linux.rs`.)

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{bad_lines, beats, wait_beats, Env};

/// Starts the dirtier as `vm` with `extra` options.
fn start(env: &Env, vm: &str, extra: &[&str]) {
    let k = ferry_guests::dirtier();
    let c = env.console(vm);
    let mut args = vec![
        "vm",
        "start",
        vm,
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "32M",
        "--cmdline",
        "mb=2 rate=2000 beat_ms=100",
        "--console-log",
        c.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = env.ferry(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Creates `DIR/NAME` (8 MiB) and returns its path.
fn image(env: &Env, name: &str) -> String {
    let p = env.dir.join(name).to_str().unwrap().to_string();
    env.ok(&["disk", "create", &p, "--size", "8M"]);
    p
}

fn lock(env: &Env, path: &str) -> String {
    env.json(&["disk", "inspect", path])["lock"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `vm disk list VM` as (lun, path, readonly).
fn luns(env: &Env, vm: &str) -> Vec<(u64, String, bool)> {
    env.json(&["vm", "disk", "list", vm])["luns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["lun"].as_u64().unwrap(),
                l["path"].as_str().unwrap().to_string(),
                l["readonly"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// The guest kept beating, memory intact, from `a`'s console through `b`'s.
fn assert_ran_on(env: &Env, a: &str, b: &str, more: usize) {
    let before = beats(&std::fs::read_to_string(env.console(a)).unwrap()).len();
    wait_beats(&env.console(b), if a == b { before + more } else { more });
    let text = if a == b {
        std::fs::read_to_string(env.console(a)).unwrap()
    } else {
        env.joined_consoles(a, b)
    };
    let all = beats(&text);
    assert!(
        all.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "counter restarted or skipped: {all:?}"
    );
    assert!(
        all.iter().all(|x| x.1),
        "memory damaged: {:?}",
        bad_lines(&text)
    );
}

#[test]
fn disks_come_and_go_on_a_running_vm_and_every_refusal_changes_nothing() {
    let env = Env::new("scsi-hotplug");
    let d0 = image(&env, "d0.img");
    let d1 = image(&env, "d1.img");
    let d2 = image(&env, "d2.img");
    let d3 = image(&env, "d3.img");
    start(&env, "a", &["--scsi-disk", &d0]);
    wait_beats(&env.console("a"), 2);
    assert_eq!(luns(&env, "a"), vec![(0, d0.clone(), false)]);
    assert_eq!(lock(&env, &d0), "read-write");

    // Add: the lowest free LUN, or the one asked for; read-only shares the lock.
    let added = env.json(&["vm", "disk", "add", "a", &d1]);
    assert_eq!(added["lun"], 1, "{added}");
    assert_eq!(lock(&env, &d1), "read-write");
    let added = env.json(&["vm", "disk", "add", "a", &d2, "--readonly", "--lun", "7"]);
    assert_eq!(
        (added["lun"].as_u64(), added["readonly"].as_bool()),
        (Some(7), Some(true))
    );
    assert_eq!(lock(&env, &d2), "read-only");
    let table = env.ok(&["vm", "disk", "list", "a"]);
    for col in [
        "LUN",
        "PATH",
        "MODE",
        "SIZE",
        "LOCK",
        "8.0 MiB",
        "ro",
        "read-write",
    ] {
        assert!(table.contains(col), "{col} missing from\n{table}");
    }
    let want = vec![
        (0, d0.clone(), false),
        (1, d1.clone(), false),
        (7, d2.clone(), true),
    ];
    assert_eq!(luns(&env, "a"), want);

    // Refusals, each with its reason, and nothing changed.
    start(&env, "b", &["--disk", &d3]);
    let refusals: Vec<(Vec<&str>, &str)> = vec![
        (vec!["add", "a", "/nonexistent.img"], "nonexistent.img"),
        (vec!["add", "a", &d1], "is LUN 1 of this VM already"),
        (vec!["add", "a", &d3, "--lun", "7"], "LUN 7 is taken"),
        (vec!["add", "a", &d3, "--lun", "300"], "out of range"),
        (vec!["add", "a", &d3], "in use"),
        (vec!["remove", "a", "--lun", "9"], "no LUN 9"),
        (
            vec!["remove", "a", &d3],
            "no LUN of the SCSI controller holds",
        ),
        (vec!["add", "b", &d1], "no SCSI controller"),
        (vec!["list", "b"], "no SCSI controller"),
    ];
    for (args, why) in refusals {
        let mut full = vec!["vm", "disk"];
        full.extend_from_slice(&args);
        let e = env.fails(&full);
        assert!(e.contains(why), "{args:?}: {e}");
    }
    assert_eq!(luns(&env, "a"), want, "a refusal changed the LUN set");
    assert_eq!(lock(&env, &d3), "read-write", "b keeps its disk");
    env.ok(&["vm", "stop", "b"]);

    // Remove by path: flushed, closed, the lock gone; by LUN too.
    env.ok(&["vm", "disk", "remove", "a", &d1]);
    assert_eq!(lock(&env, &d1), "free");
    env.ok(&["vm", "disk", "remove", "a", "--lun", "7"]);
    assert_eq!(lock(&env, &d2), "free");
    assert_eq!(luns(&env, "a"), vec![(0, d0.clone(), false)]);
    // Added again, at another LUN.
    env.ok(&["vm", "disk", "add", "a", &d1, "--lun", "3"]);
    assert_ran_on(&env, "a", "a", 3);

    // Save and restore: the state file carries the LUNs the VM has now.
    let state = env.dir.join("a.state");
    env.ok(&["vm", "save", "a", "--to", state.to_str().unwrap()]);
    assert_eq!(
        (lock(&env, &d0), lock(&env, &d1)),
        ("free".into(), "free".into())
    );
    env.restore_as(&state, "r");
    assert_eq!(
        luns(&env, "r"),
        vec![(0, d0.clone(), false), (3, d1.clone(), false)]
    );
    assert_eq!(
        (lock(&env, &d0), lock(&env, &d1)),
        ("read-write".into(), "read-write".into())
    );
    assert_ran_on(&env, "a", "r", 3);
    let st = env.json(&["vm", "status", "r"]);
    assert_eq!(st["state"], "running");
    env.ok(&["vm", "stop", "r"]);
    assert_eq!(lock(&env, &d1), "free");
}

#[test]
fn a_live_migration_carries_the_disks_the_vm_has_now_and_refuses_changes_meanwhile() {
    let env = Env::new("scsi-migrate");
    let d1 = image(&env, "m1.img");
    let d2 = image(&env, "m2.img");
    let d3 = image(&env, "m3.img");
    start(&env, "a", &["--scsi"]);
    wait_beats(&env.console("a"), 2);
    assert!(luns(&env, "a").is_empty());
    env.ok(&["vm", "disk", "add", "a", &d1, "--lun", "2"]);
    env.ok(&["vm", "disk", "add", "a", &d2, "--readonly"]);

    // A slow migration: changes are refused while it runs, and nothing is half applied.
    let addr = env.receive("b", "127.0.0.1:0");
    let mig = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["vm", "migrate", "a", "--to", &addr, "--bandwidth", "1"])
        .args(["--output", "json"])
        .envs(env.vars())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.json(&["vm", "status", "a"])["state"] != "migrating" {
        assert!(Instant::now() < deadline, "the migration never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = env.fails(&["vm", "disk", "add", "a", &d3]);
    assert!(e.contains("migrating; try again when it ends"), "{e}");
    let e = env.fails(&["vm", "disk", "remove", "a", "--lun", "2"]);
    assert!(e.contains("migrating; try again when it ends"), "{e}");
    assert_eq!(lock(&env, &d3), "free");
    let out = mig.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The destination has exactly those disks, under its locks.
    assert_eq!(
        luns(&env, "b"),
        vec![(0, d2.clone(), true), (2, d1.clone(), false)]
    );
    assert_eq!(
        (lock(&env, &d1), lock(&env, &d2)),
        ("read-write".into(), "read-only".into())
    );
    assert_ran_on(&env, "a", "b", 3);
    // And takes changes again.
    env.ok(&["vm", "disk", "add", "b", &d3]);
    assert_eq!(luns(&env, "b").len(), 3);
}

#[test]
fn a_host_block_device_is_added_locked_and_released_like_an_image() {
    let env = Env::new("scsi-blockdev");
    let backing = image(&env, "backing.img");
    let out = Command::new("losetup")
        .args(["-f", "--show", &backing])
        .output()
        .expect("losetup (util-linux)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    start(&env, "a", &["--scsi"]);
    start(&env, "b", &["--scsi"]);
    let added = env.json(&["vm", "disk", "add", "a", &dev]);
    assert_eq!(added["size"], 8 << 20, "{added}");
    assert_eq!(lock(&env, &dev), "read-write");
    assert_eq!(env.json(&["disk", "inspect", &dev])["size"], 8 << 20);
    let e = env.fails(&["vm", "disk", "add", "b", &dev, "--readonly"]);
    assert!(e.contains("in use"), "{e}");
    env.ok(&["vm", "disk", "remove", "a", &dev]);
    assert_eq!(lock(&env, &dev), "free");
    env.ok(&["vm", "disk", "add", "b", &dev, "--readonly"]);
    assert_eq!(lock(&env, &dev), "read-only");
    assert_ran_on(&env, "a", "a", 2);
}
