//! Machine tests on the machine's own /dev/kvm with the bare-metal dirtier: boot, pause,
//! save, restore into a new VM, corruption refused.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm::devices::serial::ConsoleOut;
use vmm::machine::{Machine, MachineError, RunState};
use vmm::VmConfig;

fn tmpdir(name: &str) -> PathBuf {
    ferry_testkit::tmpdir("vmm", name)
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

fn dirtier(name: &str, vcpus: u8) -> VmConfig {
    VmConfig {
        name: name.into(),
        vcpus,
        memory_mib: 32,
        kernel: ferry_guests::dirtier(),
        initrd: None,
        cmdline: "mb=2 rate=2000 beat_ms=100".into(),
        cpu: Default::default(),
        cpu_hide: Vec::new(),
        disks: Vec::new(),
        nics: Vec::new(),
        scsi: None,
    }
}

use ferry_testkit::console::beats_in as beats;

use ferry_testkit::console::wait_beats;

#[test]
fn dirtier_saves_and_continues_in_a_new_vm() {
    for vcpus in [1u8, 2] {
        let d = tmpdir(&format!("save{vcpus}"));
        let log1 = d.join("a.log");
        let m = Machine::boot(dirtier("a", vcpus), console(&log1)).unwrap();
        let before = wait_beats(&log1, 3);
        assert!(before.iter().all(|b| b.1), "{before:?}");
        let state = d.join("a.state");
        let report = m.save(&state).unwrap();
        assert_eq!(m.state(), RunState::Paused);
        let hash = m.memory_hash().unwrap();
        let last = beats(&log1).last().unwrap().0;
        m.shutdown();
        assert!(
            report.memory_bytes < 32 << 20,
            "zero pages must not be stored"
        );

        let log2 = d.join("b.log");
        let r = Machine::restore(&state, Some("b"), console(&log2), true).unwrap();
        assert_eq!(r.memory_hash().unwrap(), hash, "restored memory differs");
        r.resume().unwrap();
        wait_beats(&log2, 3);
        // Both consoles joined are one guest's output (a line cut by the save is whole again).
        let joined = d.join("ab.log");
        let mut text = std::fs::read(&log1).unwrap();
        text.extend(std::fs::read(&log2).unwrap());
        std::fs::write(&joined, text).unwrap();
        let all = beats(&joined);
        assert!(all.last().unwrap().0 >= last + 3, "{all:?}");
        assert!(
            all.windows(2).all(|w| w[1].0 == w[0].0 + 1),
            "counter must continue: {all:?}"
        );
        assert!(all.iter().all(|b| b.1), "{all:?}");
        r.shutdown();
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn restoring_twice_gives_identical_memory_and_bad_files_are_refused() {
    let d = tmpdir("twice");
    let log = d.join("a.log");
    let m = Machine::boot(dirtier("a", 1), console(&log)).unwrap();
    wait_beats(&log, 2);
    let state = d.join("a.state");
    m.save(&state).unwrap();
    m.shutdown();
    let r1 = Machine::restore(&state, Some("r1"), console(&d.join("r1.log")), true).unwrap();
    let r2 = Machine::restore(&state, Some("r2"), console(&d.join("r2.log")), true).unwrap();
    assert_eq!(r1.memory_hash().unwrap(), r2.memory_hash().unwrap());
    drop((r1, r2));

    let bytes = std::fs::read(&state).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("corrupted", {
            let mut b = bytes.clone();
            let i = b.len() - 5000;
            b[i] ^= 1;
            b
        }),
        (
            "foreign",
            b"PK\x03\x04 this is a zip file, not a state file".to_vec(),
        ),
        ("version", {
            let mut b = bytes.clone();
            b[8] = 9;
            b
        }),
    ];
    for (what, content) in cases {
        let p = d.join(what);
        std::fs::write(&p, content).unwrap();
        let err = Machine::restore(&p, None, ConsoleOut::default(), true)
            .err()
            .unwrap();
        let msg = err.to_string();
        assert!(matches!(err, MachineError::Snapshot(_)), "{what}: {msg}");
        let expect = match what {
            "truncated" => "truncated",
            "corrupted" => "checksum",
            "foreign" => "not a Ferry state file",
            _ => "not supported",
        };
        assert!(msg.contains(expect), "{what}: {msg}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn failed_save_leaves_the_vm_running() {
    let d = tmpdir("fail");
    let log = d.join("a.log");
    let m = Machine::boot(dirtier("a", 1), console(&log)).unwrap();
    wait_beats(&log, 2);
    // A directory that does not exist: the write fails before any byte.
    let err = m.save(&d.join("missing/dir/a.state")).unwrap_err();
    assert!(matches!(err, MachineError::Snapshot(_)), "{err}");
    assert_eq!(m.state(), RunState::Running);
    let n = beats(&log).len();
    let b = wait_beats(&log, n + 2);
    assert!(b.iter().all(|x| x.1));
    m.shutdown();
    let _ = std::fs::remove_dir_all(&d);
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// CPU time (user + system, in clock ticks) of this process's thread named `name`.
fn thread_ticks(name: &str) -> u64 {
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap();
            // Fields after the parenthesised name: state is the 3rd field, utime the 14th.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split(' ').collect();
            return f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        }
    }
    panic!("no thread {name}");
}

#[test]
fn a_nic_vm_idles_until_its_driver_is_ready_and_lets_go_of_its_tap() {
    let d = tmpdir("nic");
    let log = d.join("a.log");
    let br = ferry_guests::TestBridge::new(&format!("fevb{}", std::process::id() % 100_000));
    let mut config = dirtier("a", 1);
    config.nics.push(vmm::config::NicSpec {
        bridge: br.name().to_string(),
        mac: "52:54:00:00:0b:01".into(),
        mtu: 1500,
        queues: 2,
        offloads: true,
    });
    let m = Machine::boot(config, console(&log)).unwrap();
    wait_beats(&log, 2);
    let tap = format!("fe{}n0", std::process::id());
    assert!(
        link_exists(&tap),
        "the NIC's TAP {tap} is there while the VM runs"
    );
    assert!(
        Path::new("/sys/class/net")
            .join(&tap)
            .join("master")
            .exists(),
        "and on the bridge"
    );
    // A frame for the guest, whose driver never comes up (the dirtier has none): it waits in
    // the TAP, and the NIC's I/O thread must not spin on it.
    let sock = ferry_guests::packet_socket(&tap, 0x88b5);
    let mut frame = [0u8; 60];
    frame[..6].copy_from_slice(&[0x52, 0x54, 0x00, 0x00, 0x0b, 0x01]);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    // SAFETY: a valid socket and a buffer of the length given.
    let sent = unsafe {
        libc::send(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            frame.as_ptr().cast(),
            frame.len(),
            0,
        )
    };
    assert_eq!(sent, 60, "{}", std::io::Error::last_os_error());
    let ticks = thread_ticks("dev0-io");
    let start = Instant::now();
    let n = beats(&log).len();
    wait_beats(&log, n + 5);
    let busy = Duration::from_millis((thread_ticks("dev0-io") - ticks) * 10);
    assert!(
        busy < start.elapsed() / 10,
        "the NIC's I/O thread used {busy:?} of CPU in {:?} with no driver to take input",
        start.elapsed()
    );
    // Shutting down ends the NIC's I/O thread too (it waits without a timeout; the stop
    // wakes it, and shutdown joins it), so once the machine is dropped nothing holds the
    // TAP's descriptors.
    m.shutdown();
    drop(m);
    assert!(
        !link_exists(&tap),
        "the TAP outlived the dropped VM: something still holds its descriptors"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// Rewrites the VCPU section of a state file through `edit`, with valid checksums.
fn rewrite_vcpus(src: &Path, dst: &Path, edit: impl Fn(&mut Vec<vmm::vcpu::VcpuState>)) {
    use vmm::snapshot::{encode, SnapshotReader, SnapshotWriter, MAX_CONFIG};
    let mut r = SnapshotReader::open(src).unwrap();
    let conf = r.section(MAX_CONFIG).unwrap();
    let mut vcpus: Vec<vmm::vcpu::VcpuState> = r.decode().unwrap();
    let vm = r.section(vmm::snapshot::MAX_STATE).unwrap();
    let devs = r.section(vmm::snapshot::MAX_STATE).unwrap();
    let conf_json: serde_json::Value = serde_json::from_slice(&conf).unwrap();
    let mb = conf_json["config"]["memory_mib"].as_u64().unwrap();
    let ram = vmm::memory::GuestRam::new("edit", mb << 20).unwrap();
    r.memory(&ram).unwrap();
    edit(&mut vcpus);
    let mut w = SnapshotWriter::new(File::create(dst).unwrap()).unwrap();
    w.section(*b"CONF", &conf).unwrap();
    w.section(*b"VCPU", &encode(&vcpus).unwrap()).unwrap();
    w.section(*b"VMST", &vm).unwrap();
    w.section(*b"DEVS", &devs).unwrap();
    w.memory(&ram).unwrap();
    w.finish().unwrap();
}

#[test]
fn a_host_lacking_what_the_guest_saw_refuses_the_restore_and_names_it() {
    let d = tmpdir("cpu");
    let log = d.join("a.log");
    let m = Machine::boot(dirtier("a", 1), console(&log)).unwrap();
    wait_beats(&log, 1);
    let state = d.join("a.state");
    m.save(&state).unwrap();
    m.shutdown();

    // Another vendor.
    let other = d.join("vendor.state");
    rewrite_vcpus(&state, &other, |v| {
        for s in v.iter_mut() {
            for e in s.cpuid.iter_mut().filter(|e| e.function == 0) {
                e.ebx = u32::from_le_bytes(*b"Othe");
                e.edx = u32::from_le_bytes(*b"rVen");
                e.ecx = u32::from_le_bytes(*b"dor!");
            }
        }
    });
    let err = Machine::restore(&other, None, ConsoleOut::default(), true)
        .err()
        .unwrap();
    assert!(matches!(err, MachineError::IncompatibleCpu(_)), "{err}");
    assert!(
        err.to_string().contains("CPU vendor \"OtherVendor!\""),
        "{err}"
    );

    // Every named feature switched on: the ones this host's KVM lacks are listed.
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let host = vmm::cpuid::supported(&kvm).unwrap();
    let host_has = vmm::cpuid::feature_names(host.as_slice());
    let lacking: Vec<&str> = vmm::cpuid::FEATURES
        .iter()
        .map(|f| f.4)
        .filter(|n| !host_has.contains(n))
        .collect();
    if lacking.is_empty() {
        return; // a host with every feature Ferry names: nothing to be missing
    }
    let rich = d.join("rich.state");
    rewrite_vcpus(&state, &rich, |v| {
        for s in v.iter_mut() {
            for &(leaf, sub, reg, bit, _) in vmm::cpuid::FEATURES {
                if let Some(e) = s
                    .cpuid
                    .iter_mut()
                    .find(|e| e.function == leaf && e.index == sub)
                {
                    let r = match reg {
                        0 => &mut e.eax,
                        1 => &mut e.ebx,
                        2 => &mut e.ecx,
                        _ => &mut e.edx,
                    };
                    *r |= 1 << bit;
                }
            }
        }
    });
    let err = Machine::restore(&rich, None, ConsoleOut::default(), true)
        .err()
        .unwrap();
    let msg = err.to_string();
    for f in lacking.iter().take(3) {
        assert!(
            msg.contains(&format!("feature {f}")),
            "{f} not named: {msg}"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// CPU time (user + system) the thread named `name` of this process has used so far.
fn thread_cpu(name: &str) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = t.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        return Duration::from_millis((f[0] + f[1]) * 1000 / hz);
    }
    panic!("no thread named {name}");
}

#[test]
fn a_throttled_guest_runs_in_short_slices_and_only_its_share() {
    let d = tmpdir("throttle");
    let log = d.join("console.log");
    // A guest that dirties as fast as it can keeps its vCPU thread busy all the time it may run.
    let mut cfg = dirtier("throttle", 1);
    cfg.cmdline = "mb=2 rate=0 beat_ms=100".into();
    let m = Machine::boot(cfg, console(&log)).unwrap();
    wait_beats(&log, 3);
    m.set_throttle(90);
    let clock = m.console_clock();
    clock.reset_gap();
    let before = beats(&log).len();
    let (cpu0, t0) = (thread_cpu("vcpu0"), Instant::now());
    // The guest goes on beating (its beats follow the TSC, i.e. wall time)...
    let b = wait_beats(&log, before + 20);
    let share = (thread_cpu("vcpu0") - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    // ...with about a tenth of its time (it had all of a core a moment ago)...
    assert!(
        share < 0.3,
        "a 90% throttle left the guest {share:.2} of a CPU"
    );
    // ...in slices: a throttle that stops the guest for long leaves the console silent (the
    // old one: no beat in 20 s). The bound is loose: this machine's KVM emulates the guest at
    // a few million instructions a second, so with 5 ms of every 50 and other tests on both
    // cores a beat (one exit per character) can take most of a second.
    let gap_ms = clock.max_gap_us() / 1000;
    assert!(
        gap_ms < 5000,
        "the throttled guest was silent for {gap_ms} ms"
    );
    assert!(b.iter().all(|b| b.1), "memory damaged: {b:?}");
    // A pause and resume while throttled (a cancelled migration's) leave the guest intact, and
    // lifting the throttle gives it its time back.
    m.pause().unwrap();
    m.resume().unwrap();
    m.set_throttle(0);
    let (cpu1, t1) = (thread_cpu("vcpu0"), Instant::now());
    let after = wait_beats(&log, before + 30);
    let share0 = (thread_cpu("vcpu0") - cpu1).as_secs_f64() / t1.elapsed().as_secs_f64();
    eprintln!("vCPU share: throttled to 90% {share:.3}, unthrottled {share0:.3}");
    assert!(
        share0 > share,
        "unthrottled {share0:.2} of a CPU, throttled {share:.2}"
    );
    assert!(after.iter().all(|b| b.1), "memory damaged: {after:?}");
    m.shutdown();
    let _ = std::fs::remove_dir_all(&d);
}
