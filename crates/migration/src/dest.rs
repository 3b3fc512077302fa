//! The receiving side: a skeleton worker that accepts one migration and becomes the VM's
//! worker once the source commits.

use std::io::{BufReader, Write};
use std::net::TcpListener;
use std::sync::Mutex;

use vmm::devices::serial::{unix_us, ConsoleOut};
use vmm::machine::{check_host_cpu, SavedConfig, VmSnapshot};
use vmm::memory::{GuestRam, PAGE_SIZE};
use vmm::Machine;

use crate::protocol::{
    decode_pages, handshake, read_frame, write_frame, Kind, MigrationError, Setup, IO_TIMEOUT,
    MAX_CONNECTIONS,
};
use crate::tls::{Channel, Identity};

/// Free memory of this host (MemAvailable), when known.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
}

/// Writes the pages of a PAGES frame (or, with `zero`, a ZERO_PAGES frame) into `ram`.
fn apply(ram: &GuestRam, payload: &[u8], zero: bool) -> Result<(), MigrationError> {
    let (pages, data) = decode_pages(payload, !zero)?;
    for (i, p) in pages.iter().enumerate() {
        let addr = p
            .checked_mul(PAGE_SIZE as u64)
            .filter(|a| ram.contains(*a, PAGE_SIZE as u64))
            .ok_or_else(|| MigrationError::Corrupt(format!("page {p} is outside guest RAM")))?;
        if zero {
            ram.write(addr, &ZERO_PAGE)?;
        } else {
            ram.write(addr, &data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])?;
        }
    }
    Ok(())
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Receives pages on an additional connection until its DATA_END.
fn data_lane(mut r: BufReader<Channel>, ram: &GuestRam) -> Result<(), MigrationError> {
    let mut buf = Vec::new();
    loop {
        match read_frame(&mut r, &mut buf)? {
            Kind::Pages => apply(ram, &buf, false)?,
            Kind::ZeroPages => apply(ram, &buf, true)?,
            Kind::DataEnd => return Ok(()),
            k => {
                return Err(MigrationError::Corrupt(format!(
                    "unexpected {k:?} on a data connection"
                )))
            }
        }
    }
}

/// Accepts the next connection and completes TLS and HELLO on it. The outer error is the
/// listener's; the inner one the connection's (refused and logged).
fn accept_one(
    listener: &TcpListener,
    id: Option<&Identity>,
) -> std::io::Result<Result<Channel, MigrationError>> {
    let (stream, peer) = listener.accept()?;
    let conn = (|| {
        stream.set_nonblocking(false)?;
        crate::protocol::tune(&stream)?;
        let mut ch = Channel::accept(stream, id)?;
        handshake(&mut ch)?;
        Ok(ch)
    })();
    match &conn {
        Ok(ch) => tracing::info!(%peer, tls = ch.is_tls(), "migration connection"),
        Err(e) => tracing::warn!(%peer, "migration connection refused: {}", describe(e)),
    }
    Ok(conn)
}

/// An error with its causes.
fn describe(e: &MigrationError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Waits (at most [`IO_TIMEOUT`]) for the source's additional connections of `session`.
fn accept_lanes(
    listener: &TcpListener,
    id: Option<&Identity>,
    session: &[u8; 16],
    count: u8,
) -> Result<Vec<BufReader<Channel>>, MigrationError> {
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    let mut lanes: Vec<Option<BufReader<Channel>>> = (1..count).map(|_| None).collect();
    let mut buf = Vec::new();
    listener.set_nonblocking(true)?;
    let result = loop {
        if lanes.iter().all(Option::is_some) {
            break Ok(());
        }
        if std::time::Instant::now() > deadline {
            break Err(MigrationError::Protocol(format!(
                "the source opened {} of its {count} connections",
                1 + lanes.iter().filter(|l| l.is_some()).count()
            )));
        }
        let ch = match accept_one(listener, id) {
            Ok(Ok(ch)) => ch,
            Ok(Err(_)) => continue, // not one of ours; already logged
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(5));
                continue;
            }
            Err(e) => break Err(e.into()),
        };
        let mut r = BufReader::with_capacity(1 << 20, ch);
        let joined = read_frame(&mut r, &mut buf);
        match (joined, buf.get(..16), buf.get(16)) {
            (Ok(Kind::Join), Some(s), Some(&lane)) if s == session => {
                match lanes.get_mut(usize::from(lane).wrapping_sub(1)) {
                    Some(slot @ None) => *slot = Some(r),
                    _ => tracing::warn!(lane, "duplicate or unknown migration lane ignored"),
                }
            }
            _ => tracing::warn!("a connection that is not part of this migration was dropped"),
        }
    };
    listener.set_nonblocking(false)?;
    result?;
    Ok(lanes.into_iter().flatten().collect())
}

/// Accepts one migration on `listener` and returns the VM, running, once the source has
/// committed. `name` renames the VM; `id` is this host's TLS identity (`None`: plain TCP);
/// `phase` is updated for status queries; with `paused` the VM is taken over but left
/// paused (like `restore --paused`). Connections that fail TLS or HELLO are refused and
/// logged while waiting for the source; once a source is accepted, any failure or cancel
/// before the commit drops everything received.
pub fn receive(
    listener: &TcpListener,
    name: &str,
    id: Option<&Identity>,
    console: ConsoleOut,
    phase: &Mutex<String>,
    paused: bool,
) -> Result<Machine, MigrationError> {
    let set = |p: &str| *phase.lock().unwrap_or_else(|e| e.into_inner()) = p.to_string();
    let main = loop {
        match accept_one(listener, id)? {
            Ok(ch) => break ch,
            Err(e) => set(&format!("waiting (refused a connection: {})", describe(&e))),
        }
    };
    let main_tcp = main.tcp().try_clone()?;
    let mut r = BufReader::with_capacity(1 << 20, main);
    let mut buf = Vec::new();

    // Setup: check before a single page is sent.
    if read_frame(&mut r, &mut buf)? != Kind::Setup {
        return Err(MigrationError::Corrupt("expected SETUP".into()));
    }
    let setup: Setup =
        postcard::from_bytes(&buf).map_err(|e| MigrationError::Corrupt(format!("setup: {e}")))?;
    let refuse = |w: &mut Channel, reason: String| {
        let _ = write_frame(w, Kind::Refuse, reason.as_bytes());
        let _ = w.flush();
        MigrationError::Refused(reason)
    };
    let mut saved = match SavedConfig::decode(&setup.config_json) {
        Ok(s) => s,
        Err(e) => return Err(refuse(r.get_mut(), e.to_string())),
    };
    saved.config.name = name.to_string();
    if let Err(e) = saved.config.validate() {
        return Err(refuse(r.get_mut(), e.to_string()));
    }
    if setup.connections == 0 || setup.connections > MAX_CONNECTIONS {
        return Err(refuse(
            r.get_mut(),
            format!(
                "{} connections asked, 1 to {MAX_CONNECTIONS} allowed",
                setup.connections
            ),
        ));
    }
    if let Err(e) = check_host_cpu(&setup.cpuid) {
        return Err(refuse(r.get_mut(), e.to_string()));
    }
    let need = saved.config.memory_bytes();
    if let Some(avail) = mem_available() {
        if avail < need {
            return Err(refuse(
                r.get_mut(),
                format!(
                    "the VM needs {} MiB of memory, this host has {} MiB available",
                    need >> 20,
                    avail >> 20
                ),
            ));
        }
    }
    let ram = match GuestRam::new(name, need) {
        Ok(r) => r,
        Err(e) => return Err(refuse(r.get_mut(), e.to_string())),
    };
    write_frame(r.get_mut(), Kind::Accept, &[])?;
    r.get_mut().flush()?;
    let lanes = accept_lanes(listener, id, &setup.session, setup.connections)?;
    set("precopy");

    let lane_tcp: Vec<_> = lanes
        .iter()
        .map(|l| l.get_ref().tcp().try_clone())
        .collect::<Result<_, _>>()?;
    let snap: VmSnapshot = std::thread::scope(|sc| {
        let ram = &ram;
        let handles: Vec<_> = lanes
            .into_iter()
            .map(|lane| {
                let main_tcp = &main_tcp;
                sc.spawn(move || {
                    let res = data_lane(lane, ram);
                    if matches!(&res, Err(e) if !matches!(e, MigrationError::Io(_))) {
                        // A bad stream from a live source: wake the main connection's
                        // reader, the migration is over. (A lane that merely closed means
                        // the source ended it; its reason comes on the main connection.)
                        let _ = main_tcp.shutdown(std::net::Shutdown::Both);
                    }
                    res
                })
            })
            .collect();
        let main_res = main_lane(&mut r, ram, &set);
        if main_res.is_err() {
            for t in &lane_tcp {
                let _ = t.shutdown(std::net::Shutdown::Both);
            }
        }
        let mut lane_err = None;
        for h in handles {
            let res = h.join().unwrap_or_else(|_| {
                Err(MigrationError::Protocol(
                    "a receiving thread panicked".into(),
                ))
            });
            if let Err(e) = res {
                lane_err.get_or_insert(e);
            }
        }
        // The main connection's error says most (CANCEL, ERROR); a lane's otherwise.
        match (main_res, lane_err) {
            (Err(MigrationError::Io(_)), Some(e)) if !matches!(e, MigrationError::Io(_)) => Err(e),
            (Err(e), _) => Err(e),
            (Ok(_), Some(e)) => Err(e),
            (Ok(snap), None) => Ok(snap),
        }
    })?;
    set("loading state");
    let m = match Machine::from_parts(saved, ram, &snap, console, true) {
        Ok(m) => m,
        Err(e) => {
            let w = r.get_mut();
            let _ = write_frame(w, Kind::Error, e.to_string().as_bytes());
            let _ = w.flush();
            return Err(e.into());
        }
    };
    write_frame(r.get_mut(), Kind::Ready, &[])?;
    r.get_mut().flush()?;
    set("ready, waiting for commit");
    // Before COMMIT arrives the source may still resume: this side never runs a vCPU.
    loop {
        match read_frame(&mut r, &mut buf)? {
            Kind::Commit => break,
            Kind::Ping => {
                let w = r.get_mut();
                write_frame(w, Kind::Pong, &[])?;
                w.flush()?;
            }
            Kind::Cancel => {
                return Err(MigrationError::Cancelled(format!(
                    " by the source: {}",
                    String::from_utf8_lossy(&buf)
                )))
            }
            k => {
                return Err(MigrationError::Corrupt(format!(
                    "expected COMMIT, got {k:?}"
                )))
            }
        }
    }
    crate::fault::hold("dest-committed", &std::sync::atomic::AtomicBool::new(false));
    // Committed: this side owns the VM now, whatever happens to the connection.
    // COMMIT carries how long to watch for the guest's first console line (u32 ms).
    let watch_ms = buf
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
        .min(MAX_OUTPUT_WATCH_MS);
    let resumed_at = unix_us();
    if paused {
        set("paused");
    } else {
        m.resume()?;
        // Switches learn the VM's MACs here now.
        m.announce();
        set("running");
    }
    let w = r.get_mut();
    let _ = write_frame(w, Kind::Resumed, &[]).and_then(|_| Ok(w.flush()?));
    // The guest-observed downtime needs the first line the guest prints here; watch for it
    // without holding the VM's worker up.
    let clock = m.console_clock();
    let watch = if paused { 0 } else { watch_ms };
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(watch.into());
        let first = loop {
            match clock.last_line_us() {
                Some(t) if t > resumed_at => break t,
                _ if std::time::Instant::now() >= deadline => break 0,
                _ => std::thread::sleep(std::time::Duration::from_millis(2)),
            }
        };
        let w = r.get_mut();
        let _ =
            write_frame(w, Kind::FirstOutput, &first.to_le_bytes()).and_then(|_| Ok(w.flush()?));
    });
    Ok(m)
}

/// Longest the destination watches for the guest's first console line after resuming.
pub const MAX_OUTPUT_WATCH_MS: u32 = 10_000;

/// The main connection during pre-copy and stop-and-copy: its share of the pages, round
/// ends, then STATE (or CANCEL/ERROR).
fn main_lane(
    r: &mut BufReader<Channel>,
    ram: &GuestRam,
    set: &dyn Fn(&str),
) -> Result<VmSnapshot, MigrationError> {
    let mut buf = Vec::new();
    loop {
        match read_frame(r, &mut buf)? {
            Kind::Pages => apply(ram, &buf, false)?,
            Kind::ZeroPages => apply(ram, &buf, true)?,
            Kind::RoundEnd => {
                let round = buf
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                set(&format!("precopy round {} done", round.unwrap_or(0)));
            }
            Kind::State => {
                return postcard::from_bytes(&buf)
                    .map_err(|e| MigrationError::Corrupt(format!("state: {e}")));
            }
            Kind::Cancel => {
                return Err(MigrationError::Cancelled(format!(
                    " by the source: {}",
                    String::from_utf8_lossy(&buf)
                )))
            }
            Kind::Error => {
                return Err(MigrationError::Peer(
                    String::from_utf8_lossy(&buf).into_owned(),
                ))
            }
            k => return Err(MigrationError::Corrupt(format!("unexpected {k:?}"))),
        }
    }
}
