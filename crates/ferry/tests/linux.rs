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
use ferry_guests::ip;

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

use ferry_testkit::console::ticks;

/// Waits up to 180 s for `cond` on console `log`; a guest that reports damage or a panic fails
/// at once, and one that stays silent fails with what its worker's threads are doing.
fn wait_for(log: &Path, what: &str, cond: impl Fn(&str) -> bool) -> String {
    eprintln!("waiting for {what} in {}", log.display());
    match ferry_testkit::console::wait_for(log, what, Duration::from_secs(180), cond) {
        Ok(text) => text,
        Err(e @ ferry_testkit::KitError::Timeout { .. }) => {
            // The console's end first (where the guest stopped), then its worker's threads.
            let diag = ferry_testkit::diag::silent_guest(log);
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            panic!("{e}; the console ends:\n{tail}\n{diag}")
        }
        Err(e) => panic!("{e}:\n{}", std::fs::read_to_string(log).unwrap_or_default()),
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
    env.restore_as(&state, "b");
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
    let addr = env.receive("b", "127.0.0.1:0");
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

/// The features named in the dirtier's `cpuid ...` line (leaf 0xD subleaf 1 is not printed).
fn guest_cpuid_line(text: &str) -> Option<(Vec<String>, u32)> {
    let line = text.lines().find(|l| l.starts_with("cpuid "))?;
    let mut names = Vec::new();
    let mut xcr0 = 0;
    for kv in line.split_whitespace().skip(1) {
        let (k, v) = kv.split_once('=')?;
        let v = u32::from_str_radix(v, 16).ok()?;
        let (leaf, reg) = match k {
            "1.ecx" => (1, 2),
            "1.edx" => (1, 3),
            "7.ebx" => (7, 1),
            "7.ecx" => (7, 2),
            "x1.ecx" => (0x8000_0001, 2),
            "x1.edx" => (0x8000_0001, 3),
            "d.eax" => {
                xcr0 = v;
                continue;
            }
            _ => continue,
        };
        names.extend(
            vmm::cpuid::names_in(leaf, 0, reg, v)
                .into_iter()
                .map(String::from),
        );
    }
    Some((names, xcr0))
}

#[test]
#[ignore = "needs a KVM that honours the CPUID it is given: run with cargo xtask lab-tests"]
fn guests_see_exactly_the_features_of_their_cpu_model() {
    let env = Env::new("cpu-guest");
    let host = env.json(&["host", "cpu"]);
    let k = ferry_guests::dirtier();
    let mut tried = 0;
    for model in ["host", "compat", "x86-64-v1", "x86-64-v2", "x86-64-v3"] {
        if model != "host" && host["models"][model]["available"] != true {
            eprintln!("{model}: not available on this host");
            continue;
        }
        tried += 1;
        let vm = format!("g{tried}");
        let c = env.console(&vm);
        env.ok(&[
            "vm",
            "start",
            &vm,
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "64M",
            "--cpu",
            model,
            "--cmdline",
            "mb=2",
            "--console-log",
            c.to_str().unwrap(),
        ]);
        let text = wait_for(&c, "the guest's cpuid line", |t| t.contains("\nbeat "));
        let (mut seen, xcr0) = guest_cpuid_line(&text).expect("no cpuid line");
        let st = env.json(&["vm", "status", &vm]);
        let mut want: Vec<String> = st["cpu_features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .filter(|n| !["xsaveopt", "xsavec", "xsaves"].contains(&n.as_str()))
            .collect();
        seen.sort();
        want.sort();
        assert_eq!(
            seen, want,
            "{model}: the guest's CPUID differs from its model"
        );
        if want.iter().any(|n| n == "avx") {
            assert_ne!(xcr0 & 0b100, 0, "{model}: AVX without its XSAVE state");
        } else {
            assert_eq!(xcr0 & 0b100, 0, "{model}: AVX state offered to the guest");
        }
        if !want.iter().any(|n| n == "xsave") {
            assert_eq!(xcr0, 0, "{model}: XSAVE offered to the guest");
        }
        env.ok(&["vm", "stop", &vm]);
    }
    assert!(tried >= 2, "fewer than two CPU models available here");
}

#[test]
#[ignore = "needs a KVM that runs Linux: run with cargo xtask lab-tests"]
fn linux_under_x86_64_v2_gets_no_avx_state() {
    let env = Env::new("cpu-linux");
    let host = env.json(&["host", "cpu"]);
    if host["models"]["x86-64-v2"]["available"] != true {
        eprintln!("x86-64-v2 not available on this host");
        return;
    }
    let g = guest_dir();
    let c = env.console("v2");
    env.ok(&[
        "vm",
        "start",
        "v2",
        "--cpu",
        "x86-64-v2",
        "--kernel",
        g.join("vmlinux").to_str().unwrap(),
        "--initrd",
        g.join("initramfs.cpio.gz").to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 dirtier.mb=16",
        "--memory",
        "256M",
        "--console-log",
        c.to_str().unwrap(),
    ]);
    let text = wait_for(&c, "2 ticks", |t| ticks(t).len() >= 2);
    // The kernel sizes its FPU state from CPUID: without XSAVE it uses FXSAVE and never
    // enables the AVX component (KVM would refuse XSETBV with it anyway).
    assert!(!text.contains("AVX registers"), "{text}");
    assert!(!text.contains("DIRTIER-ERROR"), "{text}");
    env.ok(&["vm", "stop", "v2"]);
    // (The positive side — the guest's leaf 0xD offers AVX state under models with AVX — is
    // checked on the guest's own CPUID in guests_see_exactly_the_features_of_their_cpu_model.)
}

/// The shared initramfs with `body` after the common preamble as its /init
/// ([`ferry_guests::linux_initrd`]), written into the test's directory.
fn initrd_with_init(env: &Env, body: &str) -> PathBuf {
    let initrd = ferry_guests::linux_initrd(&guest_dir(), body, &[]).unwrap();
    let path = env.dir.join("initrd-custom");
    std::fs::write(&path, &initrd).unwrap();
    path
}

/// A new 8 MiB image `name` in the test's directory with `mark` in its first bytes.
fn marked_image(env: &Env, name: &str, mark: &str) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let p = env.dir.join(name);
    env.ok(&["disk", "create", p.to_str().unwrap(), "--size", "8M"]);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(mark.as_bytes(), 0).unwrap();
    p
}

/// The guest's disk workload: reads the host's mark from /dev/vda, says whether the pattern
/// of an earlier boot is already there (`disk-already-there`), writes a 1 MiB pattern at
/// 1 MiB and reads it back past the page cache, discards 4–5 MiB, finds it cannot write the
/// read-only /dev/vdb,
/// then every second re-reads and re-checks the pattern and records its counter in sector 4096.
const DISK_INIT: &str = r#"echo "disk-mark=$(head -c 15 /dev/vda)"
echo "disk-ro-mark=$(head -c 15 /dev/vdb)"
yes FERRY-BLOCK-TEST | head -c 1048576 > /tmp/p
if dd if=/dev/vda bs=65536 skip=16 count=16 2>/dev/null | cmp -s - /tmp/p; then echo disk-already-there; fi
dd if=/tmp/p of=/dev/vda bs=65536 seek=16 conv=fsync 2>/dev/null && echo disk-written
blkdiscard -o 4194304 -l 1048576 /dev/vda && echo "disk-discarded max=$(cat /sys/block/vda/queue/discard_max_bytes)"
if dd if=/tmp/p of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; then echo ro-write-accepted; else echo ro-write-refused; fi
n=0
while true; do
	blockdev --flushbufs /dev/vda
	if dd if=/dev/vda bs=65536 skip=16 count=16 2>/dev/null | cmp -s - /tmp/p; then
		echo "$n" | dd of=/dev/vda bs=512 seek=4096 conv=fsync 2>/dev/null
		echo "disk-tick $n ok"
	else
		echo "DISK-ERROR at tick $n"
	fi
	n=$((n + 1))
	sleep 1
done
"#;

fn disk_ticks(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| {
            l.strip_prefix("disk-tick ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
#[ignore = "needs a KVM that boots Linux: run with `cargo xtask lab-tests`"]
fn linux_virtio_disks_work_and_follow_the_vm_through_save_restore_and_live_migration() {
    use std::os::unix::fs::FileExt;
    let env = Env::new("vblk");
    let g = guest_dir();
    let initrd_path = initrd_with_init(&env, DISK_INIT);
    let rw = marked_image(&env, "rw.img", "FERRY-DISK-MARK");
    let ro = marked_image(&env, "ro.img", "FERRY-RO-MARKER");
    for p in [&rw, &ro] {
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        // Data for the guest to discard.
        f.write_all_at(&[0x5a; 1 << 20], 4 << 20).unwrap();
    }
    let ro_arg = format!("{},readonly", ro.display());
    let start_disk_vm = |name: &str| {
        let console = env.console(name);
        env.ok(&[
            "vm",
            "start",
            name,
            "--kernel",
            g.join("vmlinux").to_str().unwrap(),
            "--initrd",
            initrd_path.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0",
            "--memory",
            "128M",
            "--disk",
            rw.to_str().unwrap(),
            "--disk",
            &ro_arg,
            "--console-log",
            console.to_str().unwrap(),
        ]);
    };
    start_disk_vm("a");
    let no_error = |t: &str| {
        assert!(!t.contains("DISK-ERROR"), "{t}");
    };
    let text = wait_for(&env.console("a"), "2 disk ticks", |t| {
        no_error(t);
        disk_ticks(t).len() >= 2
    });
    assert!(text.contains("disk-mark=FERRY-DISK-MARK"), "{text}");
    assert!(text.contains("disk-ro-mark=FERRY-RO-MARKER"), "{text}");
    assert!(text.contains("disk-written"), "{text}");
    assert!(text.contains("ro-write-refused"), "{text}");
    // The guest's discard reached the image: those bytes read as zeros now.
    assert!(text.contains("disk-discarded max="), "{text}");
    let mut discarded = vec![0xffu8; 1 << 20];
    std::fs::File::open(&rw)
        .unwrap()
        .read_exact_at(&mut discarded, 4 << 20)
        .unwrap();
    assert!(
        discarded.iter().all(|&b| b == 0),
        "discarded range not zero"
    );
    // The worker counted what the guest read and wrote (utilization): at least the marks it
    // read and the megabyte it wrote.
    let io = env.json(&["vm", "status", "a"])["io"].clone();
    assert!(io["disk_read_bytes"].as_u64().unwrap() >= 2 * 512, "{io}");
    assert!(io["disk_write_bytes"].as_u64().unwrap() >= 1 << 20, "{io}");
    // What the guest wrote is in the image file.
    let f = std::fs::File::open(&rw).unwrap();
    let mut got = vec![0u8; 1 << 20];
    f.read_exact_at(&mut got, 1 << 20).unwrap();
    let want: Vec<u8> = b"FERRY-BLOCK-TEST\n"
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect();
    assert!(got == want, "the image does not hold what the guest wrote");
    // A running VM holds its disk: nobody else can open it for writing.
    let busy = env.fails(&[
        "vm",
        "start",
        "c",
        "--kernel",
        g.join("vmlinux").to_str().unwrap(),
        "--memory",
        "64M",
        "--disk",
        rw.to_str().unwrap(),
    ]);
    assert!(busy.contains("in use") || busy.contains("locked"), "{busy}");

    let state = env.dir.join("a.state");
    env.ok(&["vm", "save", "a", "--to", state.to_str().unwrap()]);
    let before = disk_ticks(&std::fs::read_to_string(env.console("a")).unwrap());
    env.restore_as(&state, "b");
    wait_for(&env.console("b"), "3 disk ticks after restore", |t| {
        no_error(t);
        disk_ticks(t).len() >= 3
    });
    // Live migration with the guest doing disk I/O: the disk is handed over at the switch.
    let cc = env.console("c");
    let addr = env.receive("c", "127.0.0.1:0");
    env.ok(&["vm", "migrate", "b", "--to", &addr]);
    let after = wait_for(&cc, "3 disk ticks after the live migration", |t| {
        no_error(t);
        disk_ticks(t).len() >= 3
    });
    env.ok(&["vm", "stop", "c"]);
    let mut joined = env.joined_consoles("a", "b");
    joined.push_str(&std::fs::read_to_string(&cc).unwrap());
    let all = disk_ticks(&joined);
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1),
        "disk counter restarted or skipped: {all:?} ({before:?} before the save)"
    );
    // The last VM's writes reached the image too.
    let last = disk_ticks(&after).last().copied().unwrap();
    let mut sector = [0u8; 512];
    f.read_exact_at(&mut sector, 4096 * 512).unwrap();
    let on_disk: u64 = String::from_utf8_lossy(&sector)
        .trim_end_matches('\0')
        .trim()
        .parse()
        .unwrap();
    assert!(
        on_disk >= last,
        "image says {on_disk}, guest printed {last}"
    );
    // A fresh boot from the disk alone finds what the earlier VMs wrote.
    assert!(!env.joined_consoles("a", "b").contains("disk-already-there"));
    start_disk_vm("d");
    let text = wait_for(&env.console("d"), "a disk tick after a fresh boot", |t| {
        no_error(t);
        !disk_ticks(t).is_empty()
    });
    assert!(text.contains("disk-already-there"), "{text}");
    env.ok(&["vm", "stop", "d"]);
}

/// The guest's SCSI workload, with the dirtier beside it (its `tick` lines check memory):
/// every second, each new `/dev/sd*` is announced with its size, read-only flag and the host's
/// mark; a read-write one gets a 1 MiB pattern at 1 MiB, read back past the page cache; a
/// read-only one is found unwritable; each one gone is announced; then
/// `scsi-tick N sda=ok|BAD|ro …` re-checks the pattern of every read-write disk.
const SCSI_INIT: &str = r#"/bin/dirtier 8 > /dev/console &
yes FERRY-SCSI-TEST | head -c 1048576 > /tmp/p
seen=""
n=0
while true; do
	for d in /sys/block/sd*; do
		[ -e "$d" ] || continue
		s=${d##*/}
		case " $seen " in *" $s "*) continue;; esac
		seen="$seen $s"
		i=0; while [ ! -b /dev/$s ] && [ $i -lt 10 ]; do sleep 1; i=$((i + 1)); done
		echo "scsi-added $s size=$(cat $d/size) ro=$(cat $d/ro) mark=$(head -c 15 /dev/$s)"
		if [ "$(cat $d/ro)" = 0 ]; then
			dd if=/tmp/p of=/dev/$s bs=65536 seek=16 conv=fsync 2>/dev/null
			blockdev --flushbufs /dev/$s
			if dd if=/dev/$s bs=65536 skip=16 count=16 2>/dev/null | cmp -s - /tmp/p; then echo "scsi-rw-ok $s"; else echo "SCSI-ERROR readback $s"; fi
		elif dd if=/tmp/p of=/dev/$s bs=512 count=1 conv=fsync 2>/dev/null; then
			echo "SCSI-ERROR ro-write-accepted $s"
		else
			echo "scsi-ro-refused $s"
		fi
	done
	now=""
	line=""
	for s in $seen; do
		if [ ! -e /sys/block/$s ]; then echo "scsi-removed $s"; continue; fi
		now="$now $s"
		if [ "$(cat /sys/block/$s/ro)" = 1 ]; then line="$line $s=ro"; continue; fi
		blockdev --flushbufs /dev/$s
		if dd if=/dev/$s bs=65536 skip=16 count=16 2>/dev/null | cmp -s - /tmp/p; then line="$line $s=ok"; else line="$line $s=BAD"; fi
	done
	seen=$now
	echo "scsi-tick $n$line"
	n=$((n + 1))
	sleep 1
done
"#;

/// The `scsi-tick` lines of a console: (counter, what each disk said).
fn scsi_ticks(text: &str) -> Vec<(u64, String)> {
    ferry_guests::whole_lines(text)
        .filter_map(|l| {
            let rest = l.strip_prefix("scsi-tick ")?;
            let (n, disks) = rest.split_once(' ').unwrap_or((rest, ""));
            Some((n.parse().ok()?, disks.to_string()))
        })
        .collect()
}

#[test]
#[ignore = "needs a KVM that boots Linux: run with `cargo xtask lab-tests`"]
fn linux_sees_scsi_disks_come_and_go_while_it_runs_and_keeps_them_through_a_live_migration() {
    use std::os::unix::fs::FileExt;
    let env = Env::new("scsi");
    let g = guest_dir();
    let initrd = initrd_with_init(&env, SCSI_INIT);
    let rw = marked_image(&env, "data.img", "FERRY-SCSI-MARK");
    let ro = marked_image(&env, "tools.img", "FERRY-SCSI-ROMK");
    let (rw_s, ro_s) = (rw.to_str().unwrap(), ro.to_str().unwrap());
    env.ok(&[
        "vm",
        "start",
        "a",
        "--kernel",
        g.join("vmlinux").to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0",
        "--memory",
        "128M",
        "--scsi",
        "--console-log",
        env.console("a").to_str().unwrap(),
    ]);
    let healthy = |t: &str| {
        assert!(!t.contains("SCSI-ERROR"), "{t}");
        assert!(!t.contains("=BAD"), "{t}");
    };
    let ca = env.console("a");
    let text = wait_for(&ca, "the guest's SCSI loop and its dirtier", |t| {
        healthy(t);
        scsi_ticks(t).len() >= 2 && !ticks(t).is_empty()
    });
    assert!(text.contains("Virtio SCSI HBA"), "{text}");
    assert!(
        scsi_ticks(&text).iter().all(|(_, d)| d.is_empty()),
        "a disk before any was added"
    );

    // Added at run time: a new /dev/sda with the host's mark, written and read back.
    env.ok(&["vm", "disk", "add", "a", rw_s]);
    wait_for(&ca, "the added disk written and read back", |t| {
        healthy(t);
        t.contains("scsi-rw-ok sda")
    });
    let text = std::fs::read_to_string(&ca).unwrap();
    assert!(
        text.contains("scsi-added sda size=16384 ro=0 mark=FERRY-SCSI-MARK"),
        "{text}"
    );
    let mut got = vec![0u8; 1 << 20];
    std::fs::File::open(&rw)
        .unwrap()
        .read_exact_at(&mut got, 1 << 20)
        .unwrap();
    let want: Vec<u8> = b"FERRY-SCSI-TEST\n"
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect();
    assert!(got == want, "the image does not hold what the guest wrote");
    // A read-only one: seen read-only, writes refused.
    env.ok(&["vm", "disk", "add", "a", ro_s, "--readonly", "--lun", "5"]);
    wait_for(&ca, "the read-only disk refusing a write", |t| {
        healthy(t);
        t.contains("scsi-ro-refused sdb")
    });
    assert!(
        std::fs::read_to_string(&ca)
            .unwrap()
            .contains("scsi-added sdb size=16384 ro=1 mark=FERRY-SCSI-ROMK"),
        "the read-only disk was not seen as such"
    );
    // Removed: gone from the guest, its lock released.
    env.ok(&["vm", "disk", "remove", "a", ro_s]);
    wait_for(&ca, "the removed disk gone", |t| {
        healthy(t);
        t.contains("scsi-removed sdb")
    });
    assert_eq!(env.json(&["disk", "inspect", ro_s])["lock"], "free");
    wait_for(&ca, "a tick with only sda", |t| {
        healthy(t);
        scsi_ticks(t).last().is_some_and(|(_, d)| d == "sda=ok")
    });

    // Live migration: the destination opens the disk the VM has now, the guest keeps it.
    let cb = env.console("b");
    let addr = env.receive("b", "127.0.0.1:0");
    env.ok(&["vm", "migrate", "a", "--to", &addr]);
    let listed = env.json(&["vm", "disk", "list", "b"]);
    assert_eq!(listed["luns"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["luns"][0]["path"], rw_s, "{listed}");
    wait_for(&cb, "3 SCSI ticks and a dirtier tick after the move", |t| {
        healthy(t);
        scsi_ticks(t).len() >= 3 && !ticks(t).is_empty()
    });
    // And takes a disk again on the destination.
    env.ok(&["vm", "disk", "add", "b", ro_s, "--readonly"]);
    wait_for(&cb, "the read-only disk added on the destination", |t| {
        healthy(t);
        t.contains("mark=FERRY-SCSI-ROMK")
    });
    env.ok(&["vm", "stop", "b"]);
    let joined = env.joined_consoles("a", "b");
    let all: Vec<u64> = scsi_ticks(&joined).into_iter().map(|(n, _)| n).collect();
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1),
        "the guest's SCSI loop restarted or skipped: {all:?}"
    );
    let dirtier = ticks(&joined);
    assert!(
        dirtier.windows(2).all(|w| w[1] == w[0] + 1),
        "the dirtier restarted or skipped: {dirtier:?}"
    );
    assert!(!joined.contains("DIRTIER-ERROR"), "{joined}");
}

/// A LAN for a guest's NIC: bridge `fbr<N>` (with the host at 10.N.0.1 if `host_ip`) and a
/// second machine on it, namespace `fns<N>` at 10.N.0.3, both at `mtu`; removed on drop.
struct Lan {
    br: String,
    ns: String,
}

impl Lan {
    fn new(n: u8, mtu: u16, host_ip: bool) -> Lan {
        let lan = Lan {
            br: format!("fbr{n}"),
            ns: format!("fns{n}"),
        };
        lan.remove(); // what a killed run left
                      // A host without udev (the lab) has /dev/net/tun only once the module is loaded.
        let _ = std::process::Command::new("modprobe").arg("tun").status();
        let (br, ns, mtu) = (lan.br.as_str(), lan.ns.as_str(), mtu.to_string());
        let (vh, vn) = (format!("fv{n}h"), format!("fv{n}n"));
        ip(&["link", "add", br, "mtu", &mtu, "type", "bridge"]);
        if host_ip {
            ip(&["addr", "add", &format!("10.{n}.0.1/24"), "dev", br]);
        }
        ip(&["link", "set", br, "up"]);
        ip(&["netns", "add", ns]);
        ip(&[
            "link", "add", &vh, "mtu", &mtu, "type", "veth", "peer", "name", &vn, "mtu", &mtu,
        ]);
        ip(&["link", "set", &vh, "master", br, "up"]);
        ip(&["link", "set", &vn, "netns", ns]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("10.{n}.0.3/24"),
            "dev",
            &vn,
        ]);
        ip(&["-n", ns, "link", "set", &vn, "up"]);
        lan
    }

    fn remove(&self) {
        for args in [["link", "del", &self.br], ["netns", "del", &self.ns]] {
            let _ = std::process::Command::new("ip")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The guest's network workload: eth0 at 10.77.0.2 with the MTU the device says, its queue
/// pairs listed, then every second a ping with an 8972-byte payload to the host — a 9000-byte
/// IP packet, one frame at MTU 9000 (the guest does not fragment at its own MTU, and the
/// bridge drops a frame larger than a port's MTU): `net-tick <n> ok|lost`.
const NET_INIT: &str = r#"ip link set eth0 up
ip addr add 10.77.0.2/24 dev eth0
echo "net-mac=$(cat /sys/class/net/eth0/address) net-mtu=$(cat /sys/class/net/eth0/mtu)"
echo "net-queues=$(ls /sys/class/net/eth0/queues | tr '\n' ' ')"
n=0
while true; do
	if ping -c 1 -W 2 -s 8972 10.77.0.1 >/dev/null 2>&1; then echo "net-tick $n ok"; else echo "net-tick $n lost"; fi
	n=$((n + 1))
	sleep 1
done
"#;

/// (`net-tick` counter, answered) of a console.
fn net_ticks(text: &str) -> Vec<(u64, bool)> {
    ferry_guests::whole_lines(text)
        .filter_map(|l| {
            let mut w = l.strip_prefix("net-tick ")?.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()? == "ok"))
        })
        .collect()
}

/// Whether a gratuitous ARP (sender IP = target IP = `ip`) from `mac` arrives on `fd` within
/// `within`.
fn saw_gratuitous_arp(
    fd: &std::os::fd::OwnedFd,
    mac: [u8; 6],
    ip: [u8; 4],
    within: Duration,
) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 128];
    while Instant::now() < deadline {
        // SAFETY: `buf` is a valid writable buffer of the length given; `fd` is open.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(fd),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
            )
        };
        if n >= 42 {
            let f = &buf[..n as usize];
            // Ethernet source, then ARP: sender MAC at 22, sender IP at 28, target IP at 38.
            if f[6..12] == mac && f[22..28] == mac && f[28..32] == ip && f[38..42] == ip {
                return true;
            }
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    false
}

/// Pings the VM (10.77.0.2) `count` times from namespace `ns` with `size`-byte payloads that
/// may not be fragmented (`ping -M do`); whether all were answered, and what ping printed.
fn df_ping(ns: &str, size: u32, count: u32) -> (bool, String) {
    let o = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-M", "do", "-W", "5"])
        .args([
            "-c",
            &count.to_string(),
            "-s",
            &size.to_string(),
            "10.77.0.2",
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

#[test]
#[ignore = "needs a KVM that boots Linux: run with `cargo xtask lab-tests`"]
fn linux_virtio_net_talks_over_a_bridge_with_jumbo_frames_and_keeps_talking_after_a_live_migration()
{
    let env = Env::new("vnet");
    let lan = Lan::new(77, 9000, true);
    let (br, ns) = (lan.br.as_str(), lan.ns.as_str());
    let initrd = initrd_with_init(&env, NET_INIT);
    let mac = "52:54:00:77:00:02";
    let mac_bytes = [0x52, 0x54, 0x00, 0x77, 0x00, 0x02];
    let nic = format!("bridge={br},mac={mac},mtu=9000,queues=2");
    env.ok(&[
        "vm",
        "start",
        "a",
        "--kernel",
        guest_dir().join("vmlinux").to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0",
        "--memory",
        "128M",
        "--vcpus",
        "2",
        "--nic",
        &nic,
        "--console-log",
        env.console("a").to_str().unwrap(),
    ]);
    let answered = |t: &str| net_ticks(t).iter().filter(|x| x.1).count();
    let text = wait_for(&env.console("a"), "3 answered pings", |t| answered(t) >= 3);
    assert!(
        text.contains(&format!("net-mac={mac} net-mtu=9000")),
        "{text}"
    );
    // Two vCPUs, two queue pairs offered: the guest's driver uses both.
    let queues = text
        .lines()
        .find_map(|l| l.strip_prefix("net-queues="))
        .unwrap_or_default();
    for q in ["rx-0", "rx-1", "tx-0", "tx-1"] {
        assert!(
            queues.split_whitespace().any(|x| x == q),
            "queues: {queues}"
        );
    }
    // The namespace reaches the VM with 9000-byte packets that may not be fragmented, and a
    // byte more does not fit.
    let (ok, out) = df_ping(ns, 8972, 3);
    assert!(ok, "DF ping at MTU 9000: {out}");
    let (ok, out) = df_ping(ns, 8973, 1);
    assert!(!ok, "a 9001-byte DF packet went through: {out}");
    // The worker counted the frames both ways (utilization): the three big pings at least.
    let io = env.json(&["vm", "status", "a"])["io"].clone();
    assert!(io["net_rx_bytes"].as_u64().unwrap() >= 3 * 9000, "{io}");
    assert!(io["net_tx_bytes"].as_u64().unwrap() >= 3 * 9000, "{io}");

    let arp = ferry_guests::packet_socket(br, 0x0806); // every ARP frame on the bridge
    let addr = env.receive("b", "127.0.0.1:0");
    let report = env.ok(&["vm", "migrate", "a", "--to", &addr, "--output", "json"]);
    eprintln!("migration report: {report}");
    // The guest took VIRTIO_NET_F_GUEST_ANNOUNCE: asked by the destination's device, it
    // announces its own address (a gratuitous ARP for 10.77.0.2 from its MAC).
    assert!(
        saw_gratuitous_arp(&arp, mac_bytes, [10, 77, 0, 2], Duration::from_secs(60)),
        "no gratuitous ARP from the guest after the move"
    );
    let on_a = net_ticks(&std::fs::read_to_string(env.console("a")).unwrap());
    wait_for(&env.console("b"), "3 answered pings after the move", |t| {
        answered(t) >= 3
    });
    let (ok, out) = df_ping(ns, 8972, 3);
    assert!(ok, "DF ping at MTU 9000 after the move: {out}");
    // The bridge now sends the VM's MAC to the destination's TAP.
    let pid = env.json(&["vm", "status", "b"])["pid"].as_u64().unwrap();
    let fdb = std::process::Command::new("bridge")
        .args(["fdb", "show", "br", br])
        .output()
        .unwrap();
    let fdb = String::from_utf8_lossy(&fdb.stdout);
    assert!(
        fdb.lines()
            .any(|l| l.starts_with(mac) && l.contains(&format!("dev fe{pid}n0"))),
        "{fdb}"
    );
    env.ok(&["vm", "stop", "b"]);
    let all = net_ticks(&env.joined_consoles("a", "b"));
    assert!(
        all.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "counter restarted or skipped: {all:?}"
    );
    // Every ping answered before the move, and at most one lost across it (the VM is down for
    // ~100 ms; a ping in flight then may go unanswered).
    assert!(
        on_a.iter().all(|x| x.1),
        "pings lost before the move: {on_a:?}"
    );
    let on_b = net_ticks(&std::fs::read_to_string(env.console("b")).unwrap());
    let lost = on_b.iter().filter(|x| !x.1).count();
    assert!(lost <= 1, "{lost} pings lost across the move: {on_b:?}");
}

/// The cluster guest: checks a pattern it wrote on its disk and pings the peer every second;
/// once a SCSI disk appears (/dev/sda, added while it runs) it writes a pattern there too and
/// checks it every second (`scsi=none` before).
const CLUSTER_INIT: &str = r#"ip link set eth0 up
ip addr add 10.78.0.2/24 dev eth0
yes FERRY-CLUSTER-DISK | head -c 262144 > /tmp/p
yes FERRY-CLUSTER-SCSI | head -c 262144 > /tmp/q
dd if=/tmp/p of=/dev/vda bs=65536 seek=16 conv=fsync 2>/dev/null && echo cl-disk-written
n=0
w=""
while true; do
	blockdev --flushbufs /dev/vda
	if dd if=/dev/vda bs=65536 skip=16 count=4 2>/dev/null | cmp -s - /tmp/p; then d=ok; else d=BAD; fi
	if ping -c 1 -W 2 10.78.0.3 >/dev/null 2>&1; then p=ok; else p=lost; fi
	s=none
	if [ -b /dev/sda ]; then
		if [ -z "$w" ]; then dd if=/tmp/q of=/dev/sda bs=65536 seek=16 conv=fsync 2>/dev/null && w=1 && echo cl-scsi-written; fi
		blockdev --flushbufs /dev/sda
		if dd if=/dev/sda bs=65536 skip=16 count=4 2>/dev/null | cmp -s - /tmp/q; then s=ok; else s=BAD; fi
	fi
	echo "cl-tick $n disk=$d net=$p scsi=$s"
	n=$((n + 1))
	sleep 1
done
"#;

/// (`cl-tick` counter, disk intact, peer answered) of a console.
fn cluster_ticks(text: &str) -> Vec<(u64, bool, bool)> {
    ferry_guests::whole_lines(text)
        .filter_map(|l| {
            let mut w = l.strip_prefix("cl-tick ")?.split_whitespace();
            Some((
                w.next()?.parse().ok()?,
                w.next()? == "disk=ok",
                w.next()? == "net=ok",
            ))
        })
        .collect()
}

#[test]
#[ignore = "needs a KVM that boots Linux: run with `cargo xtask lab-tests`"]
fn linux_guest_in_a_cluster_keeps_its_disks_and_peer_through_a_migration_and_a_drain() {
    use ferry_testkit::cluster::Cluster;
    // The peer: a namespace at 10.78.0.3 on the bridge, as another machine of the VM's LAN.
    let lan = Lan::new(78, 1500, false);
    let (br, ns) = (lan.br.as_str(), lan.ns.as_str());
    let peer_pings = |what: &str| {
        let o = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "ping",
                "-c",
                "3",
                "-W",
                "5",
                "10.78.0.2",
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{what}: the peer cannot reach the VM: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    };

    let bins = ferry_testkit::bins!();
    // Everything in a lab host runs ~12 times slower: a longer lease than the other tests'.
    let c = Cluster::with_ttl(&bins, "lab", 2, "", &[], 10);
    let initrd = ferry_guests::linux_initrd(&guest_dir(), CLUSTER_INIT, &[]).unwrap();
    let initrd_path = c.dir.join("shared/initrd-cluster");
    std::fs::write(&initrd_path, initrd).unwrap();
    let disk = c.dir.join("shared/lx.img");
    c.json(&["disk", "create", disk.to_str().unwrap(), "--size", "16M"]);
    c.json(&[
        "vm",
        "create",
        "lx",
        "--kernel",
        guest_dir().join("vmlinux").to_str().unwrap(),
        "--initrd",
        initrd_path.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0",
        "--memory",
        "128M",
        "--disk",
        disk.to_str().unwrap(),
        "--nic",
        &format!("bridge={br},mac=52:54:00:78:00:02"),
        "--scsi",
    ]);
    let console = c.console("lx");
    let good = |t: &str| cluster_ticks(t).iter().filter(|x| x.1 && x.2).count();
    wait_for(&console, "3 ticks with disk and peer", |t| good(t) >= 3);
    peer_pings("before any move");
    let first = c.vm("lx")["host"].as_str().unwrap().to_string();
    // A disk added through the cluster while the guest runs: it writes and checks it.
    let scsi = c.dir.join("shared/lx-data.img");
    c.json(&["disk", "create", scsi.to_str().unwrap(), "--size", "16M"]);
    c.json(&["vm", "disk", "add", "lx", scsi.to_str().unwrap()]);
    let scsi_ok = |t: &str| {
        ferry_guests::whole_lines(t)
            .filter(|l| l.ends_with("scsi=ok"))
            .count()
    };
    wait_for(&console, "the added SCSI disk written and checked", |t| {
        assert!(!t.contains("scsi=BAD"), "{t}");
        scsi_ok(t) >= 2
    });

    // A live migration, then a drain of the host it went to: the VM comes back to the first.
    let m = c.json(&["vm", "migrate", "lx"]);
    assert_eq!(m["state"], "succeeded", "{m}");
    let second = c.vm("lx")["host"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    let n = good(&std::fs::read_to_string(&console).unwrap());
    wait_for(&console, "3 more good ticks after the migration", |t| {
        good(t) >= n + 3
    });
    peer_pings("after the migration");
    c.json(&["host", "drain", &second]);
    assert_eq!(c.vm("lx")["host"], first.as_str());
    let n = good(&std::fs::read_to_string(&console).unwrap());
    let s = scsi_ok(&std::fs::read_to_string(&console).unwrap());
    wait_for(&console, "3 more good ticks after the drain", |t| {
        good(t) >= n + 3 && scsi_ok(t) >= s + 3
    });
    peer_pings("after the drain");
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(
        !text.contains("scsi=BAD"),
        "the SCSI disk's pattern changed: {text}"
    );
    assert_eq!(
        c.json(&["vm", "disk", "list", "lx"])["luns"][0]["path"],
        scsi.to_str().unwrap()
    );
    assert_eq!(
        c.json(&["disk", "inspect", scsi.to_str().unwrap()])["lock"],
        "read-write"
    );

    // One boot throughout (the counter never restarted), the disk always intact.
    let all = cluster_ticks(&std::fs::read_to_string(&console).unwrap());
    assert!(
        all.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "the guest restarted or lost ticks: {all:?}"
    );
    assert!(all.iter().all(|x| x.1), "the disk pattern changed: {all:?}");
    assert_eq!(c.workers_of("lx").len(), 1);
}
