//! The sending side: runs in the source worker, which owns the VM's memory.

use std::io::{BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm::memory::{ram_ranges, PAGE_SIZE};
use vmm::Machine;

use crate::protocol::{
    encode_pages, handshake, read_frame, write_frame, Kind, MigrationError, Setup, BATCH_PAGES,
};

/// Phase of a migration, as shown to users.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Connecting, sending the config, destination building its skeleton.
    #[default]
    Setup,
    /// Memory rounds while the VM runs.
    Precopy,
    /// VM paused: last pages and device state.
    StopAndCopy,
    /// Ownership moving to the destination.
    Commit,
    /// The VM runs on the destination.
    Completed,
    /// Cancelled; the VM continues on the source.
    Cancelled,
    /// Failed; see the error.
    Failed,
}

/// What to do when pre-copy does not converge in time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimeoutPolicy {
    /// Give up; the VM keeps running on the source.
    #[default]
    Cancel,
    /// Pause and copy the rest anyway (longer downtime).
    SwitchOver,
}

/// Tunables of a live migration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrateOptions {
    /// Largest expected downtime at which to switch over, in ms.
    pub downtime_ms: u64,
    /// Pre-copy rounds before the timeout policy applies.
    pub max_rounds: u32,
    /// Seconds of pre-copy before the timeout policy applies.
    pub timeout_s: u64,
    /// What to do then.
    pub on_timeout: TimeoutPolicy,
    /// Slow the vCPUs down in steps when rounds stop shrinking.
    pub auto_converge: bool,
    /// Bandwidth cap in MiB/s (0: none).
    pub bandwidth_mib_s: u64,
    /// Quick migration: pause first, then copy everything (no pre-copy).
    pub quick: bool,
}

/// Ferry's default downtime target. QEMU's is 300 ms; Ferry aims lower: 100 ms stays under
/// the 200 ms minimum TCP retransmission timeout of Linux peers (so the VM's TCP connections
/// see a late segment, not a retransmission back-off) and under what people notice in an
/// interactive session, while still converging on 1 GbE links for guests dirtying a few
/// hundred MiB/s with auto-converge.
pub const DEFAULT_DOWNTIME_MS: u64 = 100;

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            downtime_ms: DEFAULT_DOWNTIME_MS,
            max_rounds: 30,
            timeout_s: 300,
            on_timeout: TimeoutPolicy::Cancel,
            auto_converge: true,
            bandwidth_mib_s: 0,
            quick: false,
        }
    }
}

/// Live progress.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// Phase.
    pub phase: Phase,
    /// Pre-copy round (0 = the full pass).
    pub round: u32,
    /// Bytes written to the connection.
    pub bytes_sent: u64,
    /// Pages sent with their data.
    pub pages_sent: u64,
    /// Pages dirty at the last sync.
    pub pages_remaining: u64,
    /// Guest dirty rate at the last sync (pages/s).
    pub dirty_rate_pps: u64,
    /// Measured throughput (bytes/s).
    pub throughput_bps: u64,
    /// Expected downtime if switching over now (ms).
    pub expected_downtime_ms: u64,
    /// vCPU throttle from auto-converge (percent).
    pub throttle_pct: u8,
    /// Milliseconds since the start.
    pub elapsed_ms: u64,
    /// Error, once failed.
    pub error: Option<String>,
}

/// Summary of a completed migration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Start to destination running (ms).
    pub total_ms: u64,
    /// Source pause to destination resume acknowledged (ms).
    pub downtime_ms: u64,
    /// Pre-copy rounds after the full pass.
    pub rounds: u32,
    /// Bytes on the wire.
    pub bytes_sent: u64,
    /// Pages sent with data.
    pub pages_sent: u64,
    /// Pages never sent because they were zero.
    pub zero_pages_skipped: u64,
    /// Highest auto-converge throttle used (percent).
    pub max_throttle_pct: u8,
}

/// Per-vCPU state estimate used in the downtime prediction before the real size is known.
const STATE_ESTIMATE: u64 = 64 * 1024;

struct Sender<'a> {
    m: &'a Machine,
    w: BufWriter<TcpStream>,
    status: &'a Mutex<MigrationStatus>,
    cancel: &'a AtomicBool,
    opts: &'a MigrateOptions,
    t0: Instant,
    bytes: u64,
    pages_sent: u64,
    zero_skipped: u64,
    payload: Vec<u8>,
    page: Vec<u8>,
    data: Vec<u8>,
    batch: Vec<u64>,
    zeros: Vec<u64>,
    pending: Vec<u64>,
    window: (Instant, u64),
}

impl Sender<'_> {
    fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        s.bytes_sent = self.bytes;
        s.pages_sent = self.pages_sent;
        s.elapsed_ms = u64::try_from(self.t0.elapsed().as_millis()).unwrap_or(u64::MAX);
    }

    fn frame(&mut self, kind: Kind, payload_from: Option<&[u8]>) -> Result<(), MigrationError> {
        let p = payload_from.unwrap_or(&self.payload);
        write_frame(&mut self.w, kind, p)?;
        self.bytes += 12 + p.len() as u64;
        if self.opts.bandwidth_mib_s > 0 {
            // Token bucket over one-second windows: no burst from time spent elsewhere.
            let allowed = self.opts.bandwidth_mib_s as f64 * 1048576.0;
            let (start, base) = self.window;
            let due = Duration::from_secs_f64((self.bytes - base) as f64 / allowed);
            let el = start.elapsed();
            if due > el {
                std::thread::sleep(due - el);
            }
            if start.elapsed() >= Duration::from_secs(1) {
                self.window = (Instant::now(), self.bytes);
            }
        }
        Ok(())
    }

    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(MigrationError::Cancelled(" by request".into()));
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<(), MigrationError> {
        if !self.batch.is_empty() {
            let mut p = std::mem::take(&mut self.payload);
            encode_pages(&self.batch, &self.data, &mut p);
            self.payload = p;
            self.frame(Kind::Pages, None)?;
            self.pages_sent += self.batch.len() as u64;
            self.update(|_| {}); // bytes and pages sent, live
            self.batch.clear();
            self.data.clear();
        }
        if !self.zeros.is_empty() {
            let mut p = std::mem::take(&mut self.payload);
            encode_pages(&self.zeros, &[], &mut p);
            self.payload = p;
            self.frame(Kind::ZeroPages, None)?;
            self.zeros.clear();
        }
        self.check_cancel()
    }

    /// Sends `pages` (ascending page numbers). Zero pages go as a list, or not at all when
    /// `skip_zero` (the destination's memory starts zeroed).
    fn send_pages(
        &mut self,
        pages: impl Iterator<Item = u64>,
        skip_zero: bool,
    ) -> Result<(), MigrationError> {
        for p in pages {
            self.m.ram().read(p * PAGE_SIZE as u64, &mut self.page)?;
            if self.page.iter().all(|&b| b == 0) {
                if skip_zero {
                    self.zero_skipped += 1;
                } else {
                    self.zeros.push(p);
                }
            } else {
                self.batch.push(p);
                self.data.extend_from_slice(&self.page);
            }
            if self.batch.len() >= BATCH_PAGES || self.zeros.len() >= BATCH_PAGES * 16 {
                self.flush_batch()?;
            }
        }
        self.flush_batch()
    }

    fn all_pages(&self) -> impl Iterator<Item = u64> {
        ram_ranges(self.m.ram().size())
            .into_iter()
            .flat_map(|(s, l)| (s / PAGE_SIZE as u64)..((s + l) / PAGE_SIZE as u64))
    }

    fn round_end(&mut self, round: u32) -> Result<(), MigrationError> {
        let p = round.to_le_bytes();
        self.frame(Kind::RoundEnd, Some(&p))?;
        self.w.flush()?;
        Ok(())
    }
}

/// Migrates the running VM `m` to the destination listening at `to`. On success the VM runs
/// there and `m` is paused for good (the caller stops it). On any failure before the commit
/// point, `m` runs as before (resumed if this function paused it).
pub fn migrate(
    m: &Machine,
    to: &str,
    opts: &MigrateOptions,
    status: &Mutex<MigrationStatus>,
    cancel: &AtomicBool,
) -> Result<MigrationReport, MigrationError> {
    let t0 = Instant::now();
    let addr = to
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| MigrationError::Protocol(format!("cannot resolve {to}")))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    crate::protocol::tune(&stream)?;
    handshake(&mut stream)?;
    let mut reader = stream.try_clone()?;
    let mut s = Sender {
        m,
        w: BufWriter::with_capacity(1 << 20, stream),
        status,
        cancel,
        opts,
        t0,
        bytes: 24,
        pages_sent: 0,
        zero_skipped: 0,
        payload: Vec::new(),
        page: vec![0u8; PAGE_SIZE],
        data: Vec::with_capacity(BATCH_PAGES * PAGE_SIZE),
        batch: Vec::new(),
        zeros: Vec::new(),
        pending: Vec::new(),
        window: (Instant::now(), 0),
    };
    let setup = Setup {
        config_json: m.saved_config().encode()?,
        cpuid: m.guest_cpuid().to_vec(),
    };
    let setup = postcard::to_stdvec(&setup).map_err(|e| MigrationError::Protocol(e.to_string()))?;
    s.frame(Kind::Setup, Some(&setup))?;
    s.w.flush()?;
    let mut buf = Vec::new();
    match read_frame(&mut reader, &mut buf)? {
        Kind::Accept => {}
        Kind::Refuse => {
            return Err(MigrationError::Refused(
                String::from_utf8_lossy(&buf).into_owned(),
            ))
        }
        k => {
            return Err(MigrationError::Corrupt(format!(
                "expected ACCEPT, got {k:?}"
            )))
        }
    }

    let mut paused_here = false;
    let mut max_throttle = 0u8;
    let result = precopy_and_stop(&mut s, &mut reader, &mut paused_here, &mut max_throttle);
    let (rounds, pause_at) = match result {
        Ok(v) => v,
        Err(e) => {
            // Before the commit point: the VM stays, or becomes again, the source's.
            let reason = e.to_string();
            let kind = if matches!(e, MigrationError::Cancelled(_)) {
                Kind::Cancel
            } else {
                Kind::Error
            };
            let _ = write_frame(&mut s.w, kind, reason.as_bytes()).and_then(|_| Ok(s.w.flush()?));
            m.set_throttle(0);
            let _ = m.set_dirty_logging(false);
            if paused_here {
                let _ = m.resume();
            }
            s.update(|st| {
                st.phase = if matches!(e, MigrationError::Cancelled(_)) {
                    Phase::Cancelled
                } else {
                    Phase::Failed
                };
                st.error = Some(reason);
            });
            return Err(e);
        }
    };

    // The commit point. From here on the source never resumes.
    s.update(|st| st.phase = Phase::Commit);
    let committed = s
        .frame(Kind::Commit, Some(&[]))
        .and_then(|_| Ok(s.w.flush()?));
    m.set_throttle(0);
    if let Err(e) = committed {
        return Err(MigrationError::CommitUnknown(e.to_string()));
    }
    match read_frame(&mut reader, &mut buf) {
        Ok(Kind::Resumed) => {}
        Ok(k) => {
            return Err(MigrationError::CommitUnknown(format!(
                "got {k:?} instead of RESUMED"
            )))
        }
        Err(e) => return Err(MigrationError::CommitUnknown(e.to_string())),
    }
    let downtime = pause_at.elapsed();
    s.update(|st| st.phase = Phase::Completed);
    Ok(MigrationReport {
        total_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
        downtime_ms: u64::try_from(downtime.as_millis()).unwrap_or(u64::MAX),
        rounds,
        bytes_sent: s.bytes,
        pages_sent: s.pages_sent,
        zero_pages_skipped: s.zero_skipped,
        max_throttle_pct: max_throttle,
    })
}

fn precopy_and_stop(
    s: &mut Sender<'_>,
    reader: &mut TcpStream,
    paused_here: &mut bool,
    max_throttle: &mut u8,
) -> Result<(u32, Instant), MigrationError> {
    let m = s.m;
    let target = Duration::from_millis(s.opts.downtime_ms);
    let mut round = 0u32;
    if s.opts.quick {
        *paused_here = m.pause()?;
    } else {
        // Dirty logging on before the first page is read: nothing written later is missed.
        m.set_dirty_logging(true)?;
        s.update(|st| st.phase = Phase::Precopy);
        let mut round_start = Instant::now();
        let mut round_bytes = s.bytes;
        let all: Vec<u64> = s.all_pages().collect();
        s.send_pages(all.into_iter(), true)?;
        s.round_end(0)?;
        let mut prev_dirty = u64::MAX;
        let mut throttle = 0u8;
        let mut stalled = 0;
        loop {
            let dirty = m.dirty_pages()?;
            let el = round_start.elapsed().as_secs_f64().max(1e-3);
            let throughput = ((s.bytes - round_bytes) as f64 / el).max(1.0);
            let dirty_rate = dirty.len() as f64 / el;
            let remaining = dirty.len() as u64 * PAGE_SIZE as u64
                + STATE_ESTIMATE * u64::from(m.config().vcpus);
            let expected = Duration::from_secs_f64(remaining as f64 / throughput);
            s.update(|st| {
                st.round = round;
                st.pages_remaining = dirty.len() as u64;
                st.dirty_rate_pps = dirty_rate as u64;
                st.throughput_bps = throughput as u64;
                st.expected_downtime_ms = u64::try_from(expected.as_millis()).unwrap_or(u64::MAX);
                st.throttle_pct = throttle;
            });
            tracing::info!(
                round,
                dirty = dirty.len(),
                ?expected,
                throughput,
                "pre-copy round"
            );
            if expected <= target {
                // Put the pages back in the log's place: they are sent after the pause.
                s.pending = dirty;
                break;
            }
            let over_time = s.t0.elapsed() > Duration::from_secs(s.opts.timeout_s);
            if over_time || round >= s.opts.max_rounds {
                match s.opts.on_timeout {
                    TimeoutPolicy::Cancel => {
                        return Err(MigrationError::NotConverged(format!(
                            "after {round} rounds the guest still dirties {} pages per round (expected downtime {} ms, target {} ms)",
                            dirty.len(),
                            expected.as_millis(),
                            target.as_millis()
                        )))
                    }
                    TimeoutPolicy::SwitchOver => {
                        s.pending = dirty;
                        break;
                    }
                }
            }
            if s.opts.auto_converge && round >= 1 {
                if dirty.len() as u64 * 10 >= prev_dirty * 9 {
                    stalled += 1;
                } else {
                    stalled = 0;
                }
                if stalled >= 1 && throttle < 90 {
                    throttle = if throttle == 0 {
                        20
                    } else {
                        (throttle + 10).min(90)
                    };
                    *max_throttle = (*max_throttle).max(throttle);
                    m.set_throttle(throttle);
                    stalled = 0;
                }
            }
            prev_dirty = dirty.len() as u64;
            round += 1;
            round_start = Instant::now();
            round_bytes = s.bytes;
            s.send_pages(dirty.into_iter(), false)?;
            s.round_end(round)?;
        }
    }

    // Stop-and-copy.
    s.update(|st| st.phase = Phase::StopAndCopy);
    let pause_at = Instant::now();
    if !*paused_here {
        *paused_here = m.pause()?;
    }
    let mut last = std::mem::take(&mut s.pending);
    if s.opts.quick {
        let all: Vec<u64> = s.all_pages().collect();
        s.send_pages(all.into_iter(), true)?;
    } else {
        last.extend(m.dirty_pages()?);
        last.sort_unstable();
        last.dedup();
        s.send_pages(last.into_iter(), false)?;
    }
    let snap = m.capture()?;
    let state = postcard::to_stdvec(&snap).map_err(|e| MigrationError::Protocol(e.to_string()))?;
    s.frame(Kind::State, Some(&state))?;
    s.w.flush()?;
    let mut buf = Vec::new();
    match read_frame(reader, &mut buf)? {
        Kind::Ready => {}
        Kind::Error | Kind::Refuse => {
            return Err(MigrationError::Peer(
                String::from_utf8_lossy(&buf).into_owned(),
            ))
        }
        k => {
            return Err(MigrationError::Corrupt(format!(
                "expected READY, got {k:?}"
            )))
        }
    }
    s.check_cancel()?;
    Ok((round, pause_at))
}
