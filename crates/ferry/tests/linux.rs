//! Linux-guest tests. They need a KVM that runs Linux (a production host, or the lab host of
//! `cargo xtask lab-tests`), so a plain `cargo test` skips them as ignored.
//!
//! The guest is ../shared/guest (or `$FERRY_GUEST_DIR`): a tiny Linux whose `dirtier` prints
//! `tick <n> <checksum>` every second and `DIRTIER-ERROR ...` when its memory is not intact.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn guest_dir() -> PathBuf {
    std::env::var_os("FERRY_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/guest"))
}

mod common;

use common::Env;

fn start_linux(env: &Env, vm: &str, kernel: &str, vcpus: u8) {
    let g = guest_dir();
    let console = env.console(vm);
    env.ok(&[
        "vm",
        "start",
        vm,
        "--kernel",
        g.join(kernel).to_str().unwrap(),
        "--initrd",
        g.join("initramfs.cpio.gz").to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 dirtier.mb=16",
        "--memory",
        "256M",
        "--vcpus",
        &vcpus.to_string(),
        "--console-log",
        console.to_str().unwrap(),
    ]);
}

/// `tick` counters of a console, whole lines only.
fn ticks(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| {
            l.strip_prefix("tick ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn wait_for(log: &Path, what: &str, cond: impl Fn(&str) -> bool) -> String {
    eprintln!("waiting for {what} in {}", log.display());
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(
            !text.contains("DIRTIER-ERROR"),
            "memory corruption:\n{text}"
        );
        assert!(!text.contains("Kernel panic"), "guest panicked:\n{text}");
        if cond(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "no {what} within 300 s:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn boot_save_restore(kernel: &str, vcpus: u8) {
    let env = Env::new(&format!("{kernel}-{vcpus}"));
    start_linux(&env, "a", kernel, vcpus);
    let text = wait_for(&env.console("a"), "3 ticks", |t| ticks(t).len() >= 3);
    assert!(text.contains("GUEST-READY"), "{text}");
    assert!(
        text.contains(&format!("Processors: {vcpus}")),
        "MP table: {text}"
    );
    if vcpus > 1 {
        assert!(
            text.contains(&format!("Total of {vcpus} processors activated")),
            "SMP: {text}"
        );
    }
    let state = env.dir.join("a.state");
    env.ok(&["vm", "save", "a", "--to", state.to_str().unwrap()]);
    let before = ticks(&std::fs::read_to_string(env.console("a")).unwrap());
    env.ok(&[
        "vm",
        "restore",
        state.to_str().unwrap(),
        "--name",
        "b",
        "--console-log",
        env.console("b").to_str().unwrap(),
    ]);
    wait_for(&env.console("b"), "3 ticks after restore", |t| {
        ticks(t).len() >= 3
    });
    env.ok(&["vm", "stop", "b"]);
    let joined = env.joined_consoles("a", "b");
    let all = ticks(&joined);
    assert!(all.len() >= before.len() + 3, "{all:?}");
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1),
        "tick counter restarted or skipped: {all:?}"
    );
    assert!(!joined.contains("DIRTIER-ERROR"));
}

#[test]
#[ignore = "needs a KVM that boots Linux: run with `cargo xtask lab-tests`"]
fn linux_vmlinux_1_vcpu_boots_ticks_and_survives_save_restore() {
    boot_save_restore("vmlinux", 1);
}

#[test]
#[ignore = "needs a KVM that boots Linux: run with `cargo xtask lab-tests`"]
fn linux_vmlinux_2_vcpus_boots_ticks_and_survives_save_restore() {
    boot_save_restore("vmlinux", 2);
}

#[test]
#[ignore = "needs a KVM that boots Linux: run with `cargo xtask lab-tests`"]
fn linux_bzimage_boots_and_ticks() {
    let env = Env::new("bz");
    start_linux(&env, "a", "bzImage", 1);
    let text = wait_for(&env.console("a"), "2 ticks", |t| ticks(t).len() >= 2);
    assert!(
        text.contains("GUEST-READY") && text.contains("Processors: 1"),
        "{text}"
    );
    env.ok(&["vm", "stop", "a"]);
}

fn live_migrate(tag: &str, vcpus: u8, extra: &[&str]) {
    let env = Env::new(tag);
    start_linux(&env, "a", "vmlinux", vcpus);
    wait_for(&env.console("a"), "3 ticks", |t| ticks(t).len() >= 3);
    let cb = env.console("b");
    let v: serde_json::Value = serde_json::from_str(&env.ok(&[
        "vm",
        "receive",
        "b",
        "--listen",
        "127.0.0.1:0",
        "--console-log",
        cb.to_str().unwrap(),
        "--output",
        "json",
    ]))
    .unwrap();
    let addr = v["listen"].as_str().unwrap().to_string();
    let before = ticks(&std::fs::read_to_string(env.console("a")).unwrap()).len();
    let mut args = vec![
        "vm",
        "migrate",
        "a",
        "--to",
        addr.as_str(),
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    let report: serde_json::Value = serde_json::from_str(&env.ok(&args)).unwrap();
    eprintln!("migration report: {report}");
    wait_for(&cb, "3 ticks after the migration", |t| ticks(t).len() >= 3);
    env.ok(&["vm", "stop", "b"]);
    let joined = env.joined_consoles("a", "b");
    let all = ticks(&joined);
    assert!(all.len() >= before + 3, "{all:?}");
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1),
        "tick counter restarted or skipped: {all:?}"
    );
    assert!(!joined.contains("DIRTIER-ERROR"), "{joined}");
}

#[test]
#[ignore = "needs a KVM that boots Linux: run with `cargo xtask lab-tests`"]
fn linux_1_vcpu_live_migrates_with_memory_intact() {
    live_migrate("lm1", 1, &[]);
}

#[test]
#[ignore = "needs a KVM that boots Linux: run with `cargo xtask lab-tests`"]
fn linux_2_vcpus_live_migrate_with_memory_intact() {
    live_migrate("lm2", 2, &[]);
}

#[test]
#[ignore = "needs a KVM that boots Linux: run with `cargo xtask lab-tests`"]
fn linux_quick_migration_over_the_wire() {
    live_migrate("quick1", 1, &["--quick"]);
}
