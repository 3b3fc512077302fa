//! The receiving side: a skeleton worker that accepts one migration and becomes the VM's
//! worker once the source commits.

use std::io::{BufReader, Write};
use std::net::TcpListener;
use std::sync::Mutex;

use vmm::devices::serial::{unix_us, ConsoleOut};
use vmm::machine::{check_host_cpu, SavedConfig, Skeleton, VmSnapshot};
use vmm::memory::GuestRam;
use vmm::Machine;

use crate::commit::Decision;
use crate::protocol::message::{recv, recv_message, send, unexpected};
use crate::protocol::pages::PageReader;
use crate::protocol::{
    handshake, Message, MigrationError, Ready, Received, Resumed, IO_TIMEOUT, MAX_CONNECTIONS,
};
use crate::tls::{Channel, Identity};

/// The read buffer of a connection: large enough that headers and control messages take
/// few reads, small enough that a page batch's body (1 MiB) is read straight into the page
/// buffer, not copied through this one first.
const READ_BUFFER: usize = 64 << 10;

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

/// How a receiver waiting for the cluster's decision shows its phase (its agent looks for it).
pub const AWAITING_DECISION: &str = "ready, source gone: awaiting the cluster's decision";

/// The receiver's phases, as its status shows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReceivePhase {
    /// Waiting for the source; the last connection refused and why, if any.
    Waiting(Option<String>),
    /// Receiving memory; the last round the source finished, if any.
    Precopy(Option<u32>),
    /// Building the VM from the state.
    Loading,
    /// Holding the whole VM, paused, until COMMIT (or CANCEL).
    Ready,
    /// Holding the whole VM, paused; the source went away after READY, and the cluster's
    /// store decides whether it committed ([`crate::commit::Decision`]).
    AwaitingDecision,
    /// Committed and taken over paused.
    Paused,
    /// Committed and running here.
    Running,
}

impl std::fmt::Display for ReceivePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReceivePhase::Waiting(None) => write!(f, "waiting"),
            ReceivePhase::Waiting(Some(why)) => write!(f, "waiting (refused a connection: {why})"),
            ReceivePhase::Precopy(None) => write!(f, "precopy"),
            ReceivePhase::Precopy(Some(r)) => write!(f, "precopy round {r} done"),
            ReceivePhase::Loading => write!(f, "loading state"),
            ReceivePhase::Ready => write!(f, "ready, waiting for commit"),
            ReceivePhase::AwaitingDecision => write!(f, "{AWAITING_DECISION}"),
            ReceivePhase::Paused => write!(f, "paused"),
            ReceivePhase::Running => write!(f, "running"),
        }
    }
}

/// Receives pages on an additional connection until its DATA_END.
fn data_lane(mut r: BufReader<Channel>, ram: &GuestRam) -> Result<(), MigrationError> {
    let mut buf = Vec::new();
    let mut pages = PageReader::default();
    loop {
        match recv(&mut r, &mut buf)? {
            Received::Pages(head) => {
                pages.receive(&mut r, head, ram)?;
            }
            Received::Message(Message::DataEnd) => return Ok(()),
            Received::Message(m) => {
                return Err(MigrationError::Corrupt(format!(
                    "unexpected {} on a data connection",
                    m.name()
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
        let mut r = BufReader::with_capacity(READ_BUFFER, ch);
        match recv_message(&mut r, &mut buf) {
            Ok(Message::Join { session: s, lane }) if &s == session => {
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

/// Writes `m` and flushes, ignoring failures (the migration is failing anyway).
fn tell(w: &mut Channel, m: &Message) {
    let _ = send(w, m).and_then(|_| Ok(w.flush()?));
}

/// Accepts one migration on `listener` and returns the VM, running, once the source has
/// committed. `name` renames the VM; `id` is this host's TLS identity (`None`: plain TCP);
/// `phase` is updated for status queries (a [`ReceivePhase`], written out); with `paused` the
/// VM is taken over but left paused (like `restore --paused`). Connections that fail TLS or
/// HELLO are refused and logged while waiting for the source; once a source is accepted, any
/// failure or cancel before the commit drops everything received.
pub fn receive(
    listener: &TcpListener,
    name: &str,
    id: Option<&Identity>,
    console: ConsoleOut,
    phase: &Mutex<String>,
    paused: bool,
) -> Result<Machine, MigrationError> {
    receive_decided(listener, name, id, console, phase, paused, None)
}

/// [`receive`] for a cluster, whose store decides the commit ([`crate::commit`]): a source
/// lost after READY (its COMMIT, or the connection, gone) does not make this side drop the
/// VM; it waits in [`ReceivePhase::AwaitingDecision`] until `decision` is decided — run the
/// VM (the store names this host) or discard it.
pub fn receive_decided(
    listener: &TcpListener,
    name: &str,
    id: Option<&Identity>,
    console: ConsoleOut,
    phase: &Mutex<String>,
    paused: bool,
    decision: Option<&Decision>,
) -> Result<Machine, MigrationError> {
    let set = |p: ReceivePhase| *phase.lock().unwrap_or_else(|e| e.into_inner()) = p.to_string();
    let main = loop {
        match accept_one(listener, id)? {
            Ok(ch) => break ch,
            Err(e) => set(ReceivePhase::Waiting(Some(describe(&e)))),
        }
    };
    let main_tcp = main.tcp().try_clone()?;
    let mut r = BufReader::with_capacity(READ_BUFFER, main);
    let mut buf = Vec::new();

    // Setup: check before a single page is sent.
    let setup = match recv_message(&mut r, &mut buf)? {
        Message::Setup(s) => s,
        m => return Err(unexpected("SETUP", &m)),
    };
    let refuse = |w: &mut Channel, reason: String| {
        tell(w, &Message::Refuse(reason.clone()));
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
    // The VM, all but its state, before a page is sent: between the source's pause and the
    // resume only the state is left to load, and a host that cannot create the VM says so now.
    let skeleton = match GuestRam::new(name, need)
        .map_err(vmm::MachineError::from)
        .and_then(|ram| Skeleton::new(saved, ram))
    {
        Ok(s) => s,
        Err(e) => return Err(refuse(r.get_mut(), e.to_string())),
    };
    send(r.get_mut(), &Message::Accept)?;
    r.get_mut().flush()?;
    let lanes = accept_lanes(listener, id, &setup.session, setup.connections)?;
    set(ReceivePhase::Precopy(None));

    let lane_tcp: Vec<_> = lanes
        .iter()
        .map(|l| l.get_ref().tcp().try_clone())
        .collect::<Result<_, _>>()?;
    let state: Vec<u8> = std::thread::scope(|sc| {
        let ram = skeleton.ram();
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
            (Ok(state), None) => Ok(state),
        }
    })?;
    set(ReceivePhase::Loading);
    let t_restore = std::time::Instant::now();
    let built = postcard::from_bytes::<VmSnapshot>(&state)
        .map_err(|e| MigrationError::Corrupt(format!("state: {e}")))
        .and_then(|snap| Ok(skeleton.restore(&snap, console, true)?));
    let m = match built {
        Ok(m) => m,
        Err(e) => {
            tell(r.get_mut(), &Message::Error(e.to_string()));
            return Err(e);
        }
    };
    let restore_us = u64::try_from(t_restore.elapsed().as_micros()).unwrap_or(u64::MAX);
    send(r.get_mut(), &Message::Ready(Ready { restore_us }))?;
    r.get_mut().flush()?;
    set(ReceivePhase::Ready);
    // Before COMMIT arrives the source may still resume: this side never runs a vCPU.
    let watch_ms = loop {
        let got = recv_message(&mut r, &mut buf).and_then(|m| match m {
            Message::Ping => {
                let w = r.get_mut();
                send(w, &Message::Pong)?;
                w.flush()?;
                Ok(None)
            }
            m => Ok(Some(m)),
        });
        match got {
            Ok(None) => {}
            Ok(Some(Message::Commit { watch_ms })) => break watch_ms,
            Ok(Some(Message::Cancel(why))) => {
                return Err(MigrationError::Cancelled(format!(" by the source: {why}")))
            }
            Ok(Some(m)) => return Err(unexpected("COMMIT", &m)),
            // The source is gone after READY: in a cluster the store knows whether it
            // committed; between two workers alone the VM is dropped (the source keeps it).
            Err(e) => match decision {
                None => return Err(e),
                Some(d) => {
                    tracing::warn!(
                        "the source went away after READY ({}): waiting for the cluster's decision",
                        describe(&e)
                    );
                    set(ReceivePhase::AwaitingDecision);
                    if !d.wait() {
                        return Err(MigrationError::Cancelled(
                            " by the cluster: the store did not name this host the VM's owner"
                                .into(),
                        ));
                    }
                    tracing::info!("the cluster committed the migration: this host runs the VM");
                    break 0;
                }
            },
        }
    };
    let t_commit = std::time::Instant::now();
    crate::fault::hold("dest-committed", &std::sync::atomic::AtomicBool::new(false));
    // Committed: this side owns the VM now, whatever happens to the connection.
    let watch_ms = watch_ms.min(MAX_OUTPUT_WATCH_MS);
    let resumed_at = unix_us();
    let mut first_entry_us = 0;
    if paused {
        set(ReceivePhase::Paused);
    } else {
        m.resume()?;
        // The instant the guest runs again, for the downtime it saw (a vCPU enters at once
        // unless the host is starved; a second is far beyond that).
        first_entry_us = m
            .wait_first_entry(std::time::Duration::from_secs(1))
            .unwrap_or(0);
        // Switches learn the VM's MACs here now.
        m.announce();
        set(ReceivePhase::Running);
    }
    let resume_us = u64::try_from(t_commit.elapsed().as_micros()).unwrap_or(u64::MAX);
    tell(
        r.get_mut(),
        &Message::Resumed(Resumed {
            first_entry_us,
            resume_us,
        }),
    );
    // The console's view of the downtime needs the first line the guest prints here; watch
    // for it without holding the VM's worker up.
    let clock = m.console_clock();
    let watch = if paused { 0 } else { watch_ms };
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(watch.into());
        let first = loop {
            match clock.last_line_us() {
                Some(t) if t > resumed_at => break Some(t),
                _ if std::time::Instant::now() >= deadline => break None,
                _ => std::thread::sleep(std::time::Duration::from_millis(2)),
            }
        };
        tell(r.get_mut(), &Message::FirstOutput(first));
    });
    Ok(m)
}

/// Longest the destination watches for the guest's first console line after resuming.
pub const MAX_OUTPUT_WATCH_MS: u32 = 10_000;

/// The main connection during pre-copy and stop-and-copy: its share of the pages, round
/// ends, then STATE (or CANCEL/ERROR). Returns the encoded state.
fn main_lane(
    r: &mut BufReader<Channel>,
    ram: &GuestRam,
    set: &dyn Fn(ReceivePhase),
) -> Result<Vec<u8>, MigrationError> {
    let mut buf = Vec::new();
    let mut pages = PageReader::default();
    loop {
        match recv(r, &mut buf)? {
            Received::Pages(head) => {
                pages.receive(r, head, ram)?;
            }
            Received::Message(m) => match m {
                Message::RoundEnd(round) => set(ReceivePhase::Precopy(Some(round))),
                Message::State(state) => return Ok(state),
                Message::Cancel(why) => {
                    return Err(MigrationError::Cancelled(format!(" by the source: {why}")))
                }
                m => return Err(unexpected("pages or STATE", &m)),
            },
        }
    }
}
