//! Live migration between two VMs in one process (the worker-to-worker path is tested through
//! the CLI), on this machine's KVM with the bare-metal dirtier, which checks its own memory.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use migration::protocol::Compression;
use migration::tls::Identity;
use migration::{MigrateOptions, MigrationError, MigrationStatus, Phase};
use vmm::devices::serial::ConsoleOut;
use vmm::machine::{Machine, RunState};
use vmm::VmConfig;

fn tmpdir(name: &str) -> PathBuf {
    ferry_testkit::tmpdir("mig", name)
}

/// A cluster CA with one identity, made once per test process; `other` gives a second,
/// unrelated CA's identity.
fn identity(other: bool) -> Identity {
    static DIRS: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    let (a, b) = DIRS.get_or_init(|| {
        let d = tmpdir("pki");
        let (a, b) = (d.join("a"), d.join("b"));
        for (dir, name) in [(&a, "cluster-a"), (&b, "cluster-b")] {
            migration::tls::init_ca(dir, name).unwrap();
            migration::tls::issue(dir, dir, "host").unwrap();
        }
        (a, b)
    });
    Identity::load(if other { b } else { a }).unwrap()
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
        ..Default::default()
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
        cpu: Default::default(),
        cpu_hide: Vec::new(),
        disks: Vec::new(),
        nics: Vec::new(),
        scsi: None,
    }
}

use ferry_guests::{bad_lines, beats};

use ferry_testkit::console::wait_beats;

/// Runs a migration of `src` to a receiver in a thread, both over TLS with identities of one
/// cluster CA; returns the sender's result and the receiver's.
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
        let id = identity(false);
        migration::dest::receive(&listener, "dst", Some(&id), console(&dl), &phase, false)
    });
    let status = Mutex::new(MigrationStatus::default());
    let id = identity(false);
    let sent = migration::source::migrate(src, &addr, Some(&id), opts, &status, cancel);
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
        "the guest found its memory damaged: {:?} in {all:?}",
        bad_lines(&joined)
    );
}

#[test]
fn dirtying_guests_migrate_live_and_keep_verifying() {
    // 1 vCPU over one connection; 2 vCPUs over three, LZ4-compressed.
    for (vcpus, connections, compression) in
        [(1u8, 1u8, Compression::None), (2, 3, Compression::Lz4)]
    {
        let d = tmpdir(&format!("live{vcpus}"));
        let (la, lb) = (d.join("a.log"), d.join("b.log"));
        // period=8: the pattern repeats every 64 bytes, so pages compress.
        let cmdline = "mb=8 rate=3000 beat_ms=100 period=8";
        let src = Machine::boot(dirtier(vcpus, cmdline), console(&la)).unwrap();
        wait_beats(&la, 3);
        let opts = MigrateOptions {
            connections,
            compression,
            ..Default::default()
        };
        let (sent, got) = run_migration(&src, &lb, &opts, &AtomicBool::new(false));
        let report = sent.unwrap();
        assert!(
            report.tls && report.connections == connections,
            "{report:?}"
        );
        if compression != Compression::None {
            assert!(report.compression_ratio > 4.0, "{report:?}");
        }
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
    let src = Machine::boot(
        dirtier(1, "mb=4 rate=2000 beat_ms=100 period=8"),
        console(&la),
    )
    .unwrap();
    wait_beats(&la, 2);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // The destination takes the VM over paused: both copies are frozen at the switch-over.
    // Plain TCP here; four connections and zstd, so that page ordering across connections
    // and decompression are both covered by the hash.
    let recv = std::thread::spawn(move || {
        let phase = Mutex::new(String::new());
        migration::dest::receive(&listener, "dst", None, console(&lb), &phase, true).unwrap()
    });
    let status = Mutex::new(MigrationStatus::default());
    let opts = MigrateOptions {
        connections: 4,
        compression: Compression::Zstd,
        ..Default::default()
    };
    let report =
        migration::source::migrate(&src, &addr, None, &opts, &status, &AtomicBool::new(false))
            .unwrap();
    assert!(!report.tls && report.compression_ratio > 4.0, "{report:?}");
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

/// A TLS client that offers no certificate of its own.
fn anonymous_client(addr: &str) {
    use std::io::{Read, Write};
    let ca_pem = std::fs::read(
        std::env::temp_dir()
            .join(format!("ferry-mig-pki-{}", std::process::id()))
            .join("a")
            .join("ca.pem"),
    )
    .unwrap();
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(migration::tls::PEER_NAME).unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    // The server refuses during the handshake: nothing (no HELLO) ever comes back.
    let _ = s.write_all(b"x");
    let mut b = [0u8; 16];
    assert!(
        !matches!(s.read(&mut b), Ok(n) if n > 0),
        "an unauthenticated client got an answer"
    );
}

#[test]
fn peers_outside_the_cluster_are_refused_and_the_receiver_keeps_waiting() {
    use migration::protocol::{frame, Kind, MAGIC};
    let d = tmpdir("auth");
    let (la, lb) = (d.join("a.log"), d.join("b.log"));
    let src = Machine::boot(dirtier(1, "mb=2 rate=1000 beat_ms=100"), console(&la)).unwrap();
    wait_beats(&la, 2);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let phase = std::sync::Arc::new(Mutex::new(String::new()));
    let p2 = phase.clone();
    let recv = std::thread::spawn(move || {
        let id = identity(false);
        migration::dest::receive(&listener, "dst", Some(&id), console(&lb), &p2, false)
    });
    let refusals = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !phase.lock().unwrap().contains("refused a connection") {
            assert!(Instant::now() < deadline, "refusal {n} not reported");
            std::thread::sleep(Duration::from_millis(10));
        }
        let p = std::mem::take(&mut *phase.lock().unwrap());
        assert!(
            !recv.is_finished(),
            "the receiver gave up after refusal {n}"
        );
        p
    };
    let status = Mutex::new(MigrationStatus::default());
    let no = AtomicBool::new(false);
    let opts = MigrateOptions::default();

    // 1. A source whose certificate is signed by another CA.
    let other = identity(true);
    let e = migration::source::migrate(&src, &addr, Some(&other), &opts, &status, &no)
        .expect_err("a foreign certificate was accepted");
    assert!(matches!(e, MigrationError::Auth(_)), "{e:?}");
    let p = refusals(1);
    assert!(p.contains("authenticated"), "{p}");

    // 2. A client without a certificate.
    anonymous_client(&addr);
    refusals(2);

    // 3. A peer without TLS at all.
    let e = migration::source::migrate(&src, &addr, None, &opts, &status, &no)
        .expect_err("a plain-TCP source was accepted");
    assert!(
        matches!(e, MigrationError::Protocol(_) | MigrationError::Io(_)),
        "{e:?}"
    );
    refusals(3);

    // 4. A cluster member speaking the previous protocol version (4).
    let id = identity(false);
    let tcp = std::net::TcpStream::connect(&addr).unwrap();
    let mut ch = migration::tls::Channel::connect(tcp, Some(&id)).unwrap();
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&4u16.to_le_bytes());
    hello.extend_from_slice(&4u16.to_le_bytes());
    frame::write(&mut ch, Kind::Hello, 0, &[&hello]).unwrap();
    std::io::Write::flush(&mut ch).unwrap();
    let p = refusals(4);
    assert!(p.contains("version 4"), "{p}");
    drop(ch);

    // The VM never stopped on the source, and the right source still gets through.
    assert_eq!(src.state(), RunState::Running);
    let report = migration::source::migrate(&src, &addr, Some(&id), &opts, &status, &no).unwrap();
    assert!(report.tls);
    let dst = recv.join().unwrap().unwrap();
    src.shutdown();
    check_continues(&la, &d.join("b.log"), 3);
    dst.shutdown();
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_destination_of_another_protocol_version_is_refused_before_anything_is_sent() {
    use migration::protocol::{frame, Kind, MAGIC};
    let d = tmpdir("version");
    let la = d.join("a.log");
    let src = Machine::boot(dirtier(1, "mb=2 rate=1000 beat_ms=100"), console(&la)).unwrap();
    wait_beats(&la, 2);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let peer = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let id = identity(false);
        let mut ch = migration::tls::Channel::accept(tcp, Some(&id)).unwrap();
        let mut hello = MAGIC.to_vec();
        let other = migration::protocol::VERSION + 1;
        hello.extend_from_slice(&other.to_le_bytes());
        hello.extend_from_slice(&other.to_le_bytes());
        frame::write(&mut ch, Kind::Hello, 0, &[&hello]).unwrap();
        std::io::Write::flush(&mut ch).unwrap();
        // Whatever comes after the peer's HELLO: the source must send nothing more.
        let mut buf = Vec::new();
        let first = frame::read(&mut ch, &mut buf);
        assert!(matches!(first, Ok(Kind::Hello)), "{first:?}");
        let second = frame::read(&mut ch, &mut buf);
        assert!(
            second.is_err(),
            "the source went on after the version mismatch"
        );
    });
    let status = Mutex::new(MigrationStatus::default());
    let id = identity(false);
    let e = migration::source::migrate(
        &src,
        &addr,
        Some(&id),
        &MigrateOptions::default(),
        &status,
        &AtomicBool::new(false),
    )
    .expect_err("a peer of a newer protocol version was accepted");
    let other = format!("version {}", migration::protocol::VERSION + 1);
    assert!(
        matches!(&e, MigrationError::Protocol(m) if m.contains(&other)),
        "{e:?}"
    );
    peer.join().unwrap();
    assert_eq!(src.state(), RunState::Running);
    let n = beats(&std::fs::read_to_string(&la).unwrap()).len();
    wait_beats(&la, n + 2);
    assert!(beats(&std::fs::read_to_string(&la).unwrap())
        .iter()
        .all(|b| b.1));
    src.shutdown();
    let _ = std::fs::remove_dir_all(&d);
}
