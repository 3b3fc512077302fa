//! `ferry-bench wire [MiB]`: live migration against the wire, in one process on this machine.
//!
//! A bare-metal guest with `MiB` (default 512) of non-zero memory — written by the host into
//! guest RAM the guest does not use, pseudo-random so that nothing compresses or is skipped as
//! zero — is live-migrated over loopback to a receiver in the same process, and its rate of
//! guest memory moved is compared with, measured in the same run:
//!
//! - a plain TCP loopback transfer of the same number of bytes, one connection;
//! - a TLS loopback transfer of the same bytes over the same TLS configuration (Ferry's
//!   identities, TLS 1.3, the suite rustls negotiates for the migration);
//! - for two connections, the one-connection migration.
//!
//! The guest is paused before each migration, so the figures measure the data path (the
//! guest's emulated vCPU would otherwise take one of this machine's two cores); the live path
//! is exercised all the same (dirty logging, rounds, stop-and-copy, state, commit). Every run
//! checks that the destination's memory equals the source's, byte for byte, and fails if not.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use migration::tls::{Channel, Identity};
use migration::{MigrateOptions, MigrationStatus};
use vmm::devices::serial::ConsoleOut;
use vmm::machine::Machine;
use vmm::VmConfig;

/// Where the filled memory starts: far above the dirtier's own pages (it uses a few MiB from
/// 1 MiB up).
const FILL_START: u64 = 64 << 20;

fn config(name: &str, memory_mib: u64) -> VmConfig {
    VmConfig {
        name: name.into(),
        vcpus: 1,
        memory_mib,
        kernel: ferry_guests::dirtier(),
        initrd: None,
        cmdline: "mb=1 rate=100 beat_ms=1000".into(),
        cpu: Default::default(),
        cpu_hide: Vec::new(),
        disks: Vec::new(),
        nics: Vec::new(),
        scsi: None,
    }
}

/// Fills `bytes` of guest RAM from [`FILL_START`] with incompressible data, a page at a time.
fn fill(m: &Machine, bytes: u64) -> Result<()> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut page = vec![0u8; 4096];
    for p in 0..bytes / 4096 {
        for w in page.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        m.ram().write(FILL_START + p * 4096, &page)?;
    }
    Ok(())
}

/// A digest of all guest RAM.
fn digest(m: &Machine) -> Result<u64> {
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for (start, len) in vmm::memory::ram_ranges(m.ram().size()) {
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            m.ram().read(start + off, &mut buf[..n])?;
            h.update(&buf[..n]);
            off += n as u64;
        }
    }
    Ok(u64::from(h.finalize()) | (m.ram().size() << 32))
}

struct Run {
    total: Duration,
    /// CPU time the whole process used meanwhile (both ends).
    cpu: Duration,
    moved: u64,
    report: migration::MigrationReport,
}

fn migrate(
    src: &Machine,
    id: Option<&Identity>,
    connections: u8,
    console_log: &Path,
) -> Result<(Run, Machine)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let rid = id.cloned();
    let log = console_log.to_path_buf();
    let recv = std::thread::spawn(move || {
        let phase = Mutex::new(String::new());
        let console = ConsoleOut {
            log: std::fs::File::options()
                .create(true)
                .append(true)
                .open(&log)
                .ok(),
            stdout: false,
            ..Default::default()
        };
        migration::dest::receive(&listener, "wire-dst", rid.as_ref(), console, &phase, true)
    });
    let status = Mutex::new(MigrationStatus::default());
    let opts = MigrateOptions {
        connections,
        ..Default::default()
    };
    let cpu0 = cpu_time();
    let t = Instant::now();
    let sent = migration::source::migrate(src, &addr, id, &opts, &status, &AtomicBool::new(false));
    let total = t.elapsed();
    let cpu = cpu_time().saturating_sub(cpu0);
    let got = recv
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    let report = sent.context("migration")?;
    let dst = got.context("receiver")?;
    if digest(src)? != digest(&dst)? {
        bail!("the destination's memory differs from the source's");
    }
    Ok((
        Run {
            total,
            cpu,
            moved: report.pages_sent * 4096,
            report,
        },
        dst,
    ))
}

/// Time to push `bytes` through one loopback connection, plain or TLS with `id`: the wire
/// alone — sent from memory already touched, received into one reused 1 MiB buffer.
fn transfer(bytes: u64, id: Option<&Identity>) -> Result<Duration> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let rid = id.cloned();
    let n = usize::try_from(bytes)?;
    let rx = std::thread::spawn(move || -> Result<()> {
        let (s, _) = l.accept()?;
        let mut ch = Channel::accept(s, rid.as_ref())?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < n {
            let k = ch.read(&mut buf[..(n - got).min(1 << 20)])?;
            if k == 0 {
                bail!("short transfer");
            }
            got += k;
        }
        std::hint::black_box(&buf);
        Ok(())
    });
    let src: Vec<u8> = (0..n).map(|i| (i * 7 + i / 4096) as u8).collect();
    let t = Instant::now();
    let sent = (|| -> Result<()> {
        let mut ch = Channel::connect(TcpStream::connect(addr)?, id)?;
        for chunk in src.chunks(1 << 20) {
            ch.write_all(chunk)?;
        }
        ch.flush()?;
        Ok(())
    })();
    let got = rx.join();
    let d = t.elapsed();
    sent?;
    got.map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok(d)
}

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Duration {
    // SAFETY: rusage is plain data; all zeros is a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the rusage it is given, which lives for the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Time to write `bytes` into a fresh memory file, 1 MiB per `pwrite`: the memory any
/// destination must back (allocated by the host's kernel — on a virtual machine whose freed
/// memory is reported to its host, also faulted in by the host's).
fn fresh_memory(bytes: u64) -> Result<Duration> {
    let ram = vmm::memory::GuestRam::new("wire-fresh", bytes)?;
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut off = 0;
    while off < bytes {
        ram.store(off, &chunk)?;
        off += chunk.len() as u64;
    }
    Ok(t.elapsed())
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The variants: key for `--only`, label, TLS, connections.
const VARIANTS: [(&str, &str, bool, u8); 4] = [
    ("plain1", "plain, 1 connection", false, 1),
    ("plain2", "plain, 2 connections", false, 2),
    ("tls1", "TLS, 1 connection", true, 1),
    ("tls2", "TLS, 2 connections (default)", true, 2),
];

/// The benchmark; `mib` of filled memory, every variant or only one.
pub fn run(dir: &Path, mib: u64, only: Option<&str>) -> Result<()> {
    if only.is_some_and(|o| !VARIANTS.iter().any(|v| v.0 == o)) {
        bail!("--only takes plain1, plain2, tls1 or tls2");
    }
    let bytes = mib << 20;
    let memory_mib = (mib + 64 + 64).next_multiple_of(64);
    let pki = dir.join("pki");
    migration::tls::init_ca(&pki, "bench")?;
    migration::tls::issue(&pki, &pki, "bench")?;
    let id = Identity::load(&pki)?;
    let log = dir.join("wire.console");
    let src = Machine::boot(
        config("wire-src", memory_mib),
        ConsoleOut {
            log: Some(std::fs::File::create(&log)?),
            stdout: false,
            ..Default::default()
        },
    )?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("ready")
    {
        if Instant::now() > deadline {
            bail!("the guest did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    fill(&src, bytes)?;
    src.pause()?;
    println!(
        "# live migration against the wire: {memory_mib} MiB guest, {mib} MiB non-zero (incompressible), loopback, \
         guest paused (data path only); medians of 3\n"
    );
    let plain = median(
        (0..3)
            .map(|_| transfer(bytes, None))
            .collect::<Result<_>>()?,
    );
    let tls = median(
        (0..3)
            .map(|_| transfer(bytes, Some(&id)))
            .collect::<Result<_>>()?,
    );
    let fresh = median((0..3).map(|_| fresh_memory(bytes)).collect::<Result<_>>()?);
    println!(
        "baseline: plain TCP {:.0} MB/s, TLS {:.0} MB/s (one connection, {mib} MiB); \
         writing fresh memory {:.0} MB/s",
        mbps(bytes, plain),
        mbps(bytes, tls),
        mbps(bytes, fresh)
    );
    let mut current = src;
    let mut rates = Vec::new();
    for (key, what, with_tls, conns) in VARIANTS {
        if only.is_some_and(|o| o != key) {
            continue;
        }
        let mut runs = Vec::new();
        for _ in 0..3 {
            let (run, next) = migrate(&current, with_tls.then_some(&id), conns, &log)?;
            drop(std::mem::replace(&mut current, next));
            let s = &run.report.downtime_steps;
            println!(
                "  run: {key} {:.1} ms, {:.2} cores busy, {} rounds, downtime {} ms (pause {} dirty log {} last pages {} state {}+{} restore {} resume {} µs)",
                run.total.as_secs_f64() * 1000.0,
                run.cpu.as_secs_f64() / run.total.as_secs_f64().max(1e-9),
                run.report.rounds,
                run.report.downtime_ms,
                s.pause_us,
                s.dirty_log_us,
                s.last_pages_us,
                s.state_capture_us,
                s.state_transfer_us,
                s.dest_restore_us,
                s.resume_us
            );
            runs.push(run);
        }
        runs.sort_by_key(|r| r.total);
        let r = &runs[1];
        let rate = mbps(r.moved, r.total);
        let base = if with_tls { tls } else { plain };
        rates.push(rate);
        println!(
            "{what:<30} {:>7.1} ms total, downtime {:>3} ms (destination restore {:.1} ms), {:>6.1} MiB moved: {:>5.0} MB/s = {:.2}× {} loopback",
            r.total.as_secs_f64() * 1000.0,
            r.report.downtime_ms,
            r.report.downtime_steps.dest_restore_us as f64 / 1000.0,
            r.moved as f64 / 1048576.0,
            rate,
            rate / mbps(bytes, base),
            if with_tls { "TLS" } else { "plain TCP" },
        );
    }
    if rates.len() == 4 {
        println!(
            "\n2 connections vs 1: plain {:.2}×, TLS {:.2}×",
            rates[1] / rates[0],
            rates[3] / rates[2]
        );
    }
    Ok(())
}
