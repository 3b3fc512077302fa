//! The receiving side: a skeleton worker that accepts one migration and becomes the VM's
//! worker once the source commits.

use std::io::{BufReader, Write};
use std::net::TcpListener;
use std::sync::Mutex;

use vmm::devices::serial::ConsoleOut;
use vmm::machine::{check_host_cpu, SavedConfig, VmSnapshot};
use vmm::memory::{GuestRam, PAGE_SIZE};
use vmm::Machine;

use crate::protocol::{
    decode_pages, handshake, read_frame, write_frame, Kind, MigrationError, Setup,
};

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

/// Accepts one migration on `listener` and returns the VM, running, once the source has
/// committed. `name` renames the VM; `phase` is updated for status queries; with `paused`
/// the VM is taken over but left paused (like `restore --paused`). On any failure or cancel
/// before the commit everything received is dropped.
pub fn receive(
    listener: &TcpListener,
    name: &str,
    console: ConsoleOut,
    phase: &Mutex<String>,
    paused: bool,
) -> Result<Machine, MigrationError> {
    let set = |p: &str| *phase.lock().unwrap_or_else(|e| e.into_inner()) = p.to_string();
    let (mut stream, peer) = listener.accept()?;
    tracing::info!(%peer, "incoming migration");
    crate::protocol::tune(&stream)?;
    handshake(&mut stream)?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::with_capacity(1 << 20, stream);
    let mut buf = Vec::new();

    // Setup: check before a single page is sent.
    if read_frame(&mut r, &mut buf)? != Kind::Setup {
        return Err(MigrationError::Corrupt("expected SETUP".into()));
    }
    let setup: Setup =
        postcard::from_bytes(&buf).map_err(|e| MigrationError::Corrupt(format!("setup: {e}")))?;
    let refuse = |w: &mut std::net::TcpStream, reason: String| {
        let _ = write_frame(w, Kind::Refuse, reason.as_bytes());
        let _ = w.flush();
        MigrationError::Refused(reason)
    };
    let mut saved = match SavedConfig::decode(&setup.config_json) {
        Ok(s) => s,
        Err(e) => return Err(refuse(&mut w, e.to_string())),
    };
    saved.config.name = name.to_string();
    if let Err(e) = saved.config.validate() {
        return Err(refuse(&mut w, e.to_string()));
    }
    if let Err(e) = check_host_cpu(&setup.cpuid) {
        return Err(refuse(&mut w, e.to_string()));
    }
    let need = saved.config.memory_bytes();
    if let Some(avail) = mem_available() {
        if avail < need {
            return Err(refuse(
                &mut w,
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
        Err(e) => return Err(refuse(&mut w, e.to_string())),
    };
    write_frame(&mut w, Kind::Accept, &[])?;
    w.flush()?;
    set("precopy");

    let zero = vec![0u8; PAGE_SIZE];
    let snap: VmSnapshot = loop {
        match read_frame(&mut r, &mut buf)? {
            Kind::Pages => {
                let (pages, data) = decode_pages(&buf, true)?;
                for (i, p) in pages.iter().enumerate() {
                    let addr = p
                        .checked_mul(PAGE_SIZE as u64)
                        .filter(|a| ram.contains(*a, PAGE_SIZE as u64))
                        .ok_or_else(|| {
                            MigrationError::Corrupt(format!("page {p} is outside guest RAM"))
                        })?;
                    ram.write(addr, &data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])?;
                }
            }
            Kind::ZeroPages => {
                let (pages, _) = decode_pages(&buf, false)?;
                for p in pages {
                    let addr = p
                        .checked_mul(PAGE_SIZE as u64)
                        .filter(|a| ram.contains(*a, PAGE_SIZE as u64))
                        .ok_or_else(|| {
                            MigrationError::Corrupt(format!("page {p} is outside guest RAM"))
                        })?;
                    ram.write(addr, &zero)?;
                }
            }
            Kind::RoundEnd => {
                let round = buf
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                set(&format!("precopy round {} done", round.unwrap_or(0)));
            }
            Kind::State => {
                break postcard::from_bytes(&buf)
                    .map_err(|e| MigrationError::Corrupt(format!("state: {e}")))?;
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
    };
    set("loading state");
    let m = match Machine::from_parts(saved, ram, &snap, console, true) {
        Ok(m) => m,
        Err(e) => {
            let _ = write_frame(&mut w, Kind::Error, e.to_string().as_bytes());
            let _ = w.flush();
            return Err(e.into());
        }
    };
    write_frame(&mut w, Kind::Ready, &[])?;
    w.flush()?;
    set("ready, waiting for commit");
    // Before COMMIT arrives the source may still resume: this side never runs a vCPU.
    match read_frame(&mut r, &mut buf)? {
        Kind::Commit => {}
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
    // Committed: this side owns the VM now, whatever happens to the connection.
    if paused {
        set("paused");
    } else {
        m.resume()?;
        set("running");
    }
    let _ = write_frame(&mut w, Kind::Resumed, &[]).and_then(|_| Ok(w.flush()?));
    Ok(m)
}
