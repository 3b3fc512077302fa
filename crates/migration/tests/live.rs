//! Live migration between two VMs in one process (the worker-to-worker path is tested through
//! the CLI), on this machine's KVM with the bare-metal dirtier, which checks its own memory.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use migration::{MigrateOptions, MigrationError, MigrationStatus, Phase};
use vmm::devices::serial::ConsoleOut;
use vmm::machine::{Machine, RunState};
use vmm::VmConfig;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-mig-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn console(path: &Path) -> ConsoleOut {
    ConsoleOut {
        log: Some(
            File::options()
                .create(true)
                .append(true)
                .open(path)
                .unwrap(),
        ),
        stdout: false,
    }
}

fn dirtier(vcpus: u8, cmdline: &str) -> VmConfig {
    VmConfig {
        name: "src".into(),
        vcpus,
        memory_mib: 64,
        kernel: ferry_guests::dirtier(),
        initrd: None,
        cmdline: cmdline.into(),
    }
}

fn beats(text: &str) -> Vec<(u64, bool)> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "beat").then_some(())?;
            Some((w.next()?.parse().ok()?, w.next()? == "ok"))
        })
        .collect()
}

fn wait_beats(log: &Path, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while beats(&std::fs::read_to_string(log).unwrap_or_default()).len() < count {
        assert!(
            Instant::now() < deadline,
            "no {count} beats in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a migration of `src` to a receiver in a thread; returns the sender's result and the
/// receiver's.
fn run_migration(
    src: &Machine,
    dest_log: &Path,
    opts: &MigrateOptions,
    cancel: &AtomicBool,
) -> (
    Result<migration::MigrationReport, MigrationError>,
    Result<Machine, MigrationError>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dl = dest_log.to_path_buf();
    let recv = std::thread::spawn(move || {
        let phase = Mutex::new(String::new());
        migration::dest::receive(&listener, "dst", console(&dl), &phase, false)
    });
    let status = Mutex::new(MigrationStatus::default());
    let sent = migration::source::migrate(src, &addr, opts, &status, cancel);
    (sent, recv.join().unwrap())
}

fn check_continues(a: &Path, b: &Path, min_after: usize) {
    wait_beats(b, min_after);
    let mut joined = std::fs::read_to_string(a).unwrap();
    joined.push_str(&std::fs::read_to_string(b).unwrap());
    let all = beats(&joined);
    assert!(
        all.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "beat counter restarted or skipped: {all:?}"
    );
    assert!(
        all.iter().all(|b| b.1),
        "the guest found its memory damaged: {all:?}"
    );
}

#[test]
fn dirtying_guests_migrate_live_and_keep_verifying() {
    for vcpus in [1u8, 2] {
        let d = tmpdir(&format!("live{vcpus}"));
        let (la, lb) = (d.join("a.log"), d.join("b.log"));
        let src =
            Machine::boot(dirtier(vcpus, "mb=8 rate=3000 beat_ms=100"), console(&la)).unwrap();
        wait_beats(&la, 3);
        let (sent, got) = run_migration(
            &src,
            &lb,
            &MigrateOptions::default(),
            &AtomicBool::new(false),
        );
        let report = sent.unwrap();
        let dst = got.unwrap();
        // The source is paused for good; the destination runs.
        assert_eq!(src.state(), RunState::Paused);
        assert_eq!(dst.state(), RunState::Running);
        // (Memory equality at the switch-over: memory_is_identical_at_the_switch_over.)
        assert!(report.pages_sent > 2048, "{report:?}");
        assert!(
            report.zero_pages_skipped > 8192,
            "zero pages must not be sent: {report:?}"
        );
        src.shutdown();
        let n = beats(&std::fs::read_to_string(&la).unwrap()).len();
        check_continues(&la, &lb, 5);
        assert!(n >= 3);
        dst.shutdown();
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn memory_is_identical_at_the_switch_over() {
    let d = tmpdir("hash");
    let (la, lb) = (d.join("a.log"), d.join("b.log"));
    let src = Machine::boot(dirtier(1, "mb=4 rate=2000 beat_ms=100"), console(&la)).unwrap();
    wait_beats(&la, 2);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // The destination takes the VM over paused: both copies are frozen at the switch-over.
    let recv = std::thread::spawn(move || {
        let phase = Mutex::new(String::new());
        migration::dest::receive(&listener, "dst", console(&lb), &phase, true).unwrap()
    });
    let status = Mutex::new(MigrationStatus::default());
    migration::source::migrate(
        &src,
        &addr,
        &MigrateOptions::default(),
        &status,
        &AtomicBool::new(false),
    )
    .unwrap();
    let dst = recv.join().unwrap();
    assert_eq!(dst.state(), RunState::Paused);
    assert_eq!(
        src.memory_hash().unwrap(),
        dst.memory_hash().unwrap(),
        "memory differs at the switch-over"
    );
    assert_eq!(status.lock().unwrap().phase, Phase::Completed);
    drop((src, dst));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn quick_migration_over_the_wire() {
    let d = tmpdir("quick");
    let (la, lb) = (d.join("a.log"), d.join("b.log"));
    let src = Machine::boot(dirtier(2, "mb=4 rate=2000 beat_ms=100"), console(&la)).unwrap();
    wait_beats(&la, 3);
    let opts = MigrateOptions {
        quick: true,
        ..Default::default()
    };
    let (sent, got) = run_migration(&src, &lb, &opts, &AtomicBool::new(false));
    let report = sent.unwrap();
    assert_eq!(report.rounds, 0);
    let dst = got.unwrap();
    src.shutdown();
    check_continues(&la, &lb, 4);
    dst.shutdown();
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_guest_dirtying_faster_than_the_link_fails_cleanly_by_policy() {
    let d = tmpdir("slow");
    let (la, lb) = (d.join("a.log"), d.join("b.log"));
    // The guest rewrites its 2 MiB as fast as it can; the link carries 1 MiB/s.
    let src = Machine::boot(dirtier(1, "mb=2 rate=0 beat_ms=100"), console(&la)).unwrap();
    wait_beats(&la, 2);
    let opts = MigrateOptions {
        downtime_ms: 20,
        max_rounds: 4,
        auto_converge: false,
        bandwidth_mib_s: 1,
        ..Default::default()
    };
    let (sent, got) = run_migration(&src, &lb, &opts, &AtomicBool::new(false));
    assert!(
        matches!(sent, Err(MigrationError::NotConverged(_))),
        "{sent:?}"
    );
    assert!(got.is_err(), "the destination must discard the VM");
    // The VM goes on at the source, intact.
    assert_eq!(src.state(), RunState::Running);
    let n = beats(&std::fs::read_to_string(&la).unwrap()).len();
    wait_beats(&la, n + 3);
    assert!(beats(&std::fs::read_to_string(&la).unwrap())
        .iter()
        .all(|b| b.1));
    src.shutdown();
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn auto_converge_throttles_a_fast_dirtier_until_it_converges() {
    let d = tmpdir("conv");
    let (la, lb) = (d.join("a.log"), d.join("b.log"));
    let src = Machine::boot(dirtier(1, "mb=2 rate=0 beat_ms=100"), console(&la)).unwrap();
    wait_beats(&la, 2);
    let opts = MigrateOptions {
        downtime_ms: 300,
        bandwidth_mib_s: 1,
        max_rounds: 40,
        ..Default::default()
    };
    let (sent, got) = run_migration(&src, &lb, &opts, &AtomicBool::new(false));
    let report = sent.unwrap();
    assert!(report.max_throttle_pct > 0, "{report:?}");
    let dst = got.unwrap();
    src.shutdown();
    check_continues(&la, &lb, 3);
    dst.shutdown();
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn cancel_keeps_the_vm_on_the_source() {
    let d = tmpdir("cancel");
    let (la, lb) = (d.join("a.log"), d.join("b.log"));
    let src = Machine::boot(dirtier(1, "mb=4 rate=2000 beat_ms=100"), console(&la)).unwrap();
    wait_beats(&la, 2);
    let cancel = AtomicBool::new(true);
    let (sent, got) = run_migration(&src, &lb, &MigrateOptions::default(), &cancel);
    assert!(
        matches!(sent, Err(MigrationError::Cancelled(_))),
        "{sent:?}"
    );
    assert!(
        matches!(got, Err(MigrationError::Cancelled(_))),
        "{:?}",
        got.err()
    );
    assert_eq!(src.state(), RunState::Running);
    let n = beats(&std::fs::read_to_string(&la).unwrap()).len();
    wait_beats(&la, n + 3);
    assert!(beats(&std::fs::read_to_string(&la).unwrap())
        .iter()
        .all(|b| b.1));
    assert!(
        beats(&std::fs::read_to_string(&lb).unwrap_or_default()).is_empty(),
        "nothing may run on the destination"
    );
    src.shutdown();
    let _ = std::fs::remove_dir_all(&d);
}
