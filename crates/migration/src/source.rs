//! The sending side: runs in the source worker, which owns the VM's memory.

use std::io::{BufWriter, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm::memory::{ram_ranges, GuestRam, PAGE_SIZE};
use vmm::Machine;

use crate::dest::MAX_OUTPUT_WATCH_MS;
use crate::protocol::{
    encode_pages, handshake, read_frame, write_frame, write_frame_flags, write_frame_parts,
    Compression, Kind, MigrationError, Packer, Setup, BATCH_PAGES, IO_TIMEOUT, MAX_CONNECTIONS,
    PRECOMMIT_TIMEOUT,
};
use crate::tls::{Channel, Identity};

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
    /// Compression of page data.
    pub compression: Compression,
    /// TCP connections the memory travels over, in parallel (1 to 16).
    pub connections: u8,
}

/// Ferry's default downtime target. QEMU's is 300 ms; Ferry aims lower: 100 ms stays under
/// the 200 ms minimum TCP retransmission timeout of Linux peers (so the VM's TCP connections
/// see a late segment, not a retransmission back-off) and under what people notice in an
/// interactive session, while still converging on 1 GbE links for guests dirtying a few
/// hundred MiB/s with auto-converge.
pub const DEFAULT_DOWNTIME_MS: u64 = 100;

/// Connections per migration unless told otherwise.
pub const DEFAULT_CONNECTIONS: u8 = 2;

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
            compression: Compression::None,
            connections: DEFAULT_CONNECTIONS,
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
    /// Measured throughput: guest memory moved per second (bytes/s, before compression).
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
    /// Compression used for page data.
    pub compression: Compression,
    /// Page data bytes before compression ÷ after (1.0 without compression).
    pub compression_ratio: f64,
    /// Connections used.
    pub connections: u8,
    /// Whether the connections were TLS (mutually authenticated, encrypted).
    pub tls: bool,
    /// Downtime as the guest shows it: the largest gap between two of its console lines,
    /// host-timestamped, from the start of the migration until its first line on the
    /// destination (ms; `None` when the guest printed nothing to measure with). Across
    /// hosts this relies on their clocks being synchronized (NTP).
    pub guest_downtime_ms: Option<u64>,
}

/// How long a failed migration waits to take its disks back from a destination that still
/// holds them (it lets go when its connection fails, at the latest after its I/O timeout).
const DISK_PATIENCE: Duration = Duration::from_secs(IO_TIMEOUT.as_secs() + 10);

/// Fewest pages a round must move for its throughput to count.
const MEASURE_PAGES: u64 = 64;

/// Per-vCPU state estimate used in the downtime prediction before the real size is known.
const STATE_ESTIMATE: u64 = 64 * 1024;

/// Counters shared by the connections of one migration.
struct Shared<'a> {
    ram: &'a GuestRam,
    status: &'a Mutex<MigrationStatus>,
    cancel: &'a AtomicBool,
    /// Set by a connection that failed: the others stop at their next batch.
    abort: AtomicBool,
    t0: Instant,
    bytes: AtomicU64,
    pages_sent: AtomicU64,
    zero_skipped: AtomicU64,
    /// Page batch payloads before and after compression.
    raw: AtomicU64,
    packed: AtomicU64,
}

impl Shared<'_> {
    fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        s.bytes_sent = self.bytes.load(Ordering::Relaxed);
        s.pages_sent = self.pages_sent.load(Ordering::Relaxed);
        s.elapsed_ms = u64::try_from(self.t0.elapsed().as_millis()).unwrap_or(u64::MAX);
    }

    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(MigrationError::Cancelled(" by request".into()));
        }
        Ok(())
    }
}

/// One connection of a migration and its buffers. Lane 0 also carries the control messages.
struct Lane {
    w: BufWriter<Channel>,
    packer: Packer,
    payload: Vec<u8>,
    data: Vec<u8>,
    batch: Vec<u64>,
    zeros: Vec<u64>,
    /// Bandwidth cap of this connection in bytes/s (0: none), and its current window.
    cap: f64,
    window: (Instant, u64),
    sent: u64,
}

impl Lane {
    fn new(ch: Channel, opts: &MigrateOptions, lanes: u8) -> Result<Lane, MigrationError> {
        Ok(Lane {
            w: BufWriter::with_capacity(1 << 20, ch),
            packer: Packer::new(opts.compression)?,
            payload: Vec::new(),
            data: Vec::with_capacity(BATCH_PAGES * PAGE_SIZE),
            batch: Vec::new(),
            zeros: Vec::new(),
            cap: opts.bandwidth_mib_s as f64 * 1048576.0 / f64::from(lanes.max(1)),
            window: (Instant::now(), 0),
            sent: 0,
        })
    }

    /// Writes a control frame (never compressed).
    fn control(
        &mut self,
        sh: &Shared<'_>,
        kind: Kind,
        payload: &[u8],
    ) -> Result<(), MigrationError> {
        write_frame(&mut self.w, kind, payload)?;
        self.account(sh, 12 + payload.len() as u64);
        Ok(())
    }

    fn account(&mut self, sh: &Shared<'_>, n: u64) {
        sh.bytes.fetch_add(n, Ordering::Relaxed);
        self.sent += n;
        if self.cap > 0.0 {
            // Token bucket over one-second windows: no burst from time spent elsewhere.
            let (start, base) = self.window;
            let due = Duration::from_secs_f64((self.sent - base) as f64 / self.cap);
            let el = start.elapsed();
            if due > el {
                std::thread::sleep(due - el);
            }
            if start.elapsed() >= Duration::from_secs(1) {
                self.window = (Instant::now(), self.sent);
            }
        }
    }

    /// Reads the peer's next frame (lane 0 only), after sending everything buffered.
    fn read(&mut self, buf: &mut Vec<u8>) -> Result<Kind, MigrationError> {
        self.w.flush()?;
        read_frame(self.w.get_mut(), buf)
    }

    fn flush_batch(&mut self, sh: &Shared<'_>) -> Result<(), MigrationError> {
        if !self.batch.is_empty() {
            // (raw payload bytes, bytes on the wire)
            let (raw, wire_len) = if !self.packer.compresses() && !crate::fault::active() {
                // Uncompressed: the page data goes out from the batch buffer as it is.
                encode_pages(&self.batch, &[], &mut self.payload);
                write_frame_parts(&mut self.w, Kind::Pages, &[&self.payload, &self.data])?;
                let n = (self.payload.len() + self.data.len()) as u64;
                (n, n)
            } else {
                encode_pages(&self.batch, &self.data, &mut self.payload);
                let (flags, wire) = self.packer.pack(&self.payload)?;
                if crate::fault::corrupt_this_batch() {
                    let mut frame = Vec::new();
                    write_frame_flags(&mut frame, Kind::Pages, flags, wire)?;
                    let mid = frame.len() / 2;
                    frame[mid] ^= 0x20;
                    self.w.write_all(&frame)?;
                } else {
                    write_frame_flags(&mut self.w, Kind::Pages, flags, wire)?;
                }
                (self.payload.len() as u64, wire.len() as u64)
            };
            sh.raw.fetch_add(raw, Ordering::Relaxed);
            sh.packed.fetch_add(wire_len, Ordering::Relaxed);
            sh.pages_sent
                .fetch_add(self.batch.len() as u64, Ordering::Relaxed);
            self.account(sh, 12 + wire_len);
            sh.update(|_| {}); // bytes and pages sent, live
            self.batch.clear();
            self.data.clear();
        }
        if !self.zeros.is_empty() {
            encode_pages(&self.zeros, &[], &mut self.payload);
            let p = std::mem::take(&mut self.payload);
            let r = self.control(sh, Kind::ZeroPages, &p);
            self.payload = p;
            r?;
            self.zeros.clear();
        }
        sh.check_cancel()
    }

    /// Sends `pages` (ascending page numbers). Zero pages go as a list, or not at all when
    /// `skip_zero` (the destination's memory starts zeroed). Stops early, without an error,
    /// when another lane failed.
    fn send(
        &mut self,
        sh: &Shared<'_>,
        pages: &[u64],
        skip_zero: bool,
    ) -> Result<(), MigrationError> {
        let r = self.send_inner(sh, pages, skip_zero);
        if r.is_err() {
            sh.abort.store(true, Ordering::Relaxed);
        }
        r
    }

    fn send_inner(
        &mut self,
        sh: &Shared<'_>,
        pages: &[u64],
        skip_zero: bool,
    ) -> Result<(), MigrationError> {
        for &p in pages {
            // Zero pages are recognised in place; only the others are copied, straight into
            // the batch. (A page written after the check is in the dirty log.)
            let addr = p * PAGE_SIZE as u64;
            if sh.ram.page_is_zero(addr)? {
                if skip_zero {
                    sh.zero_skipped.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.zeros.push(p);
                }
            } else {
                let off = self.data.len();
                self.data.resize(off + PAGE_SIZE, 0);
                sh.ram.read(addr, &mut self.data[off..])?;
                self.batch.push(p);
            }
            if self.batch.len() >= BATCH_PAGES || self.zeros.len() >= BATCH_PAGES * 16 {
                self.flush_batch(sh)?;
                if sh.abort.load(Ordering::Relaxed) {
                    return Ok(());
                }
            }
        }
        self.flush_batch(sh)
    }
}

/// The lane a page always travels on, so that a page's later copies never overtake its
/// earlier ones (each connection is ordered; different connections are not).
fn lane_of(page: u64, lanes: usize) -> usize {
    ((page / BATCH_PAGES as u64) % lanes as u64) as usize
}

struct Sender<'a> {
    m: &'a Machine,
    sh: Shared<'a>,
    opts: &'a MigrateOptions,
    lanes: Vec<Lane>,
}

impl Sender<'_> {
    /// Sends `pages` (ascending) over all lanes in parallel.
    fn send_pages(&mut self, pages: Vec<u64>, skip_zero: bool) -> Result<(), MigrationError> {
        let n = self.lanes.len();
        let sh = &self.sh;
        if n == 1 {
            return self.lanes[0].send(sh, &pages, skip_zero);
        }
        let mut parts = vec![Vec::with_capacity(pages.len() / n + 1); n];
        for p in pages {
            parts[lane_of(p, n)].push(p);
        }
        std::thread::scope(|sc| {
            let handles: Vec<_> = self
                .lanes
                .iter_mut()
                .zip(parts)
                .map(|(lane, part)| sc.spawn(move || lane.send(sh, &part, skip_zero)))
                .collect();
            let mut result = Ok(());
            for h in handles {
                let r = h.join().unwrap_or_else(|_| {
                    Err(MigrationError::Protocol("a sending thread panicked".into()))
                });
                if result.is_ok() {
                    result = r;
                }
            }
            result
        })
    }

    fn all_pages(&self) -> Vec<u64> {
        ram_ranges(self.m.ram().size())
            .into_iter()
            .flat_map(|(s, l)| (s / PAGE_SIZE as u64)..((s + l) / PAGE_SIZE as u64))
            .collect()
    }

    fn round_end(&mut self, round: u32) -> Result<(), MigrationError> {
        for l in &mut self.lanes {
            l.w.flush()?;
        }
        self.lanes[0].control(&self.sh, Kind::RoundEnd, &round.to_le_bytes())?;
        self.lanes[0].w.flush()?;
        Ok(())
    }

    fn bytes(&self) -> u64 {
        self.sh.bytes.load(Ordering::Relaxed)
    }

    fn pages(&self) -> u64 {
        self.sh.pages_sent.load(Ordering::Relaxed)
    }
}

/// Opens one connection to the destination: TCP, TLS when `id` is given, HELLO.
fn open(addr: &SocketAddr, id: Option<&Identity>) -> Result<Channel, MigrationError> {
    let stream = TcpStream::connect_timeout(addr, Duration::from_secs(10))?;
    crate::protocol::tune(&stream)?;
    let mut ch = Channel::connect(stream, id)?;
    handshake(&mut ch)?;
    Ok(ch)
}

fn session_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut id);
    }
    id
}

/// Migrates the running VM `m` to the destination listening at `to`, over TLS with `id`
/// (`None`: plain TCP). On success the VM runs there and `m` is paused for good (the caller
/// stops it). On any failure before the commit point, `m` runs as before (resumed if this
/// function paused it).
pub fn migrate(
    m: &Machine,
    to: &str,
    id: Option<&Identity>,
    opts: &MigrateOptions,
    status: &Mutex<MigrationStatus>,
    cancel: &AtomicBool,
) -> Result<MigrationReport, MigrationError> {
    let t0 = Instant::now();
    if opts.connections == 0 || opts.connections > MAX_CONNECTIONS {
        return Err(MigrationError::Protocol(format!(
            "connections must be 1 to {MAX_CONNECTIONS}, not {}",
            opts.connections
        )));
    }
    let addr = to
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| MigrationError::Protocol(format!("cannot resolve {to}")))?;
    let main = open(&addr, id)?;
    let tls = main.is_tls();
    let clock = m.console_clock();
    clock.reset_gap();
    let sh = Shared {
        ram: m.ram(),
        status,
        cancel,
        abort: AtomicBool::new(false),
        t0,
        bytes: AtomicU64::new(24),
        pages_sent: AtomicU64::new(0),
        zero_skipped: AtomicU64::new(0),
        raw: AtomicU64::new(0),
        packed: AtomicU64::new(0),
    };
    let mut s = Sender {
        m,
        sh,
        opts,
        lanes: vec![Lane::new(main, opts, opts.connections)?],
    };
    let session = session_id();
    let setup = Setup {
        config_json: m.saved_config().encode()?,
        cpuid: m.guest_cpuid().to_vec(),
        connections: opts.connections,
        session,
    };
    let setup = postcard::to_stdvec(&setup).map_err(|e| MigrationError::Protocol(e.to_string()))?;
    s.lanes[0].control(&s.sh, Kind::Setup, &setup)?;
    let mut buf = Vec::new();
    match s.lanes[0].read(&mut buf)? {
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
    for lane in 1..opts.connections {
        let mut join = session.to_vec();
        join.push(lane);
        let mut l = Lane::new(open(&addr, id)?, opts, opts.connections)?;
        l.control(&s.sh, Kind::Join, &join)?;
        l.w.flush()?;
        s.lanes.push(l);
    }
    crate::fault::hold("setup", cancel);

    let mut paused_here = false;
    let mut max_throttle = 0u8;
    let result = precopy_and_stop(&mut s, &mut paused_here, &mut max_throttle);
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
            let w = &mut s.lanes[0].w;
            let _ = write_frame(w, kind, reason.as_bytes()).and_then(|_| Ok(w.flush()?));
            m.set_throttle(0);
            let _ = m.set_dirty_logging(false);
            let mut result = e;
            if paused_here {
                // Disks handed over come back first; a destination that has not noticed the
                // failure yet gives them up within its I/O timeout.
                let back = m.reacquire_devices(DISK_PATIENCE).and_then(|_| m.resume());
                if let Err(cause) = back {
                    tracing::error!("the VM cannot resume here: {cause}");
                    result = MigrationError::SourcePaused {
                        failure: reason,
                        cause: cause.to_string(),
                    };
                }
            }
            let reason = result.to_string();
            s.sh.update(|st| {
                st.phase = if matches!(result, MigrationError::Cancelled(_)) {
                    Phase::Cancelled
                } else {
                    Phase::Failed
                };
                st.error = Some(reason);
            });
            return Err(result);
        }
    };

    // The commit point. From here on the source never resumes.
    s.sh.update(|st| st.phase = Phase::Commit);
    // The guest is paused: its last line here is final. Ask the destination to watch for
    // the next one for three of the largest gaps seen (0: the guest printed nothing).
    let last_line = clock.last_line_us();
    let gap_before = clock.max_gap_us();
    // The guest's usual interval: the largest gap during the migration, or the last one
    // before it when the migration was shorter than one interval.
    let interval = gap_before.max(clock.last_gap_us());
    let watch_ms = if last_line.is_some() && interval > 0 {
        u32::try_from((interval * 3 / 1000).clamp(500, u64::from(MAX_OUTPUT_WATCH_MS)))
            .unwrap_or(MAX_OUTPUT_WATCH_MS)
    } else {
        0
    };
    let committed = s.lanes[0]
        .control(&s.sh, Kind::Commit, &watch_ms.to_le_bytes())
        .and_then(|_| Ok(s.lanes[0].w.flush()?));
    m.set_throttle(0);
    if let Err(e) = committed {
        return Err(MigrationError::CommitUnknown(e.to_string()));
    }
    crate::fault::hold("committed", &AtomicBool::new(false));
    match s.lanes[0].read(&mut buf) {
        Ok(Kind::Resumed) => {}
        Ok(k) => {
            return Err(MigrationError::CommitUnknown(format!(
                "got {k:?} instead of RESUMED"
            )))
        }
        Err(e) => return Err(MigrationError::CommitUnknown(e.to_string())),
    }
    let downtime = pause_at.elapsed();
    let total = t0.elapsed();
    s.sh.update(|st| st.phase = Phase::Completed);
    // Committed and resumed: a missing FIRST_OUTPUT only loses the measurement.
    let first_there = match s.lanes[0].read(&mut buf) {
        Ok(Kind::FirstOutput) => buf
            .get(..8)
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .filter(|&t| t != 0),
        _ => None,
    };
    let guest_downtime_ms = match (last_line, first_there) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a).max(gap_before) / 1000),
        _ => None,
    };
    let raw = s.sh.raw.load(Ordering::Relaxed);
    let packed = s.sh.packed.load(Ordering::Relaxed).max(1);
    Ok(MigrationReport {
        total_ms: u64::try_from(total.as_millis()).unwrap_or(u64::MAX),
        downtime_ms: u64::try_from(downtime.as_millis()).unwrap_or(u64::MAX),
        rounds,
        bytes_sent: s.bytes(),
        pages_sent: s.sh.pages_sent.load(Ordering::Relaxed),
        zero_pages_skipped: s.sh.zero_skipped.load(Ordering::Relaxed),
        max_throttle_pct: max_throttle,
        compression: opts.compression,
        compression_ratio: if raw == 0 {
            1.0
        } else {
            raw as f64 / packed as f64
        },
        connections: opts.connections,
        tls,
        guest_downtime_ms,
    })
}

fn precopy_and_stop(
    s: &mut Sender<'_>,
    paused_here: &mut bool,
    max_throttle: &mut u8,
) -> Result<(u32, Instant), MigrationError> {
    let m = s.m;
    let target = Duration::from_millis(s.opts.downtime_ms);
    let mut round = 0u32;
    // Pages dirty at the switch-over decision: sent after the pause.
    let mut pending = Vec::new();
    s.sh.check_cancel()?; // cancelled during setup: nothing was sent yet
    if s.opts.quick {
        *paused_here = m.pause()?;
    } else {
        // Dirty logging on before the first page is read: nothing written later is missed.
        m.set_dirty_logging(true)?;
        s.sh.update(|st| st.phase = Phase::Precopy);
        let mut round_start = Instant::now();
        let mut round_pages = s.pages();
        // Effective rate in guest bytes per second (pages moved, whatever their size on the
        // wire): what the downtime estimate needs. Kept from the last round that moved
        // enough pages to measure it.
        let mut throughput = 1.0f64;
        let all = s.all_pages();
        s.send_pages(all, true)?;
        s.round_end(0)?;
        crate::fault::hold("precopy", s.sh.cancel);
        let mut prev_dirty = u64::MAX;
        let mut throttle = 0u8;
        let mut stalled = 0;
        loop {
            let dirty = m.dirty_pages()?;
            let el = round_start.elapsed().as_secs_f64().max(1e-3);
            let moved = s.pages() - round_pages;
            if moved >= MEASURE_PAGES || throughput <= 1.0 {
                throughput = (moved as f64 * PAGE_SIZE as f64 / el).max(1.0);
            }
            let dirty_rate = dirty.len() as f64 / el;
            let remaining = dirty.len() as u64 * PAGE_SIZE as u64
                + STATE_ESTIMATE * u64::from(m.config().vcpus);
            let expected = Duration::from_secs_f64(remaining as f64 / throughput);
            s.sh.update(|st| {
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
            // Fewer dirty pages than a round needs to measure throughput: what is left is
            // below any link's resolution (< 256 KiB), and a throughput measured on a tiny
            // round is latency, not bandwidth — waiting for a better estimate would only spin
            // (seen: "still dirties 0 pages per round, expected downtime 101 ms").
            let tiny = (dirty.len() as u64) < MEASURE_PAGES;
            if expected <= target || tiny {
                // Put the pages back in the log's place: they are sent after the pause.
                pending = dirty;
                break;
            }
            let over_time = s.sh.t0.elapsed() > Duration::from_secs(s.opts.timeout_s);
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
                        pending = dirty;
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
            round_pages = s.pages();
            s.send_pages(dirty, false)?;
            s.round_end(round)?;
        }
    }

    // Stop-and-copy.
    s.sh.update(|st| st.phase = Phase::StopAndCopy);
    let pause_at = Instant::now();
    if !*paused_here {
        *paused_here = m.pause()?;
    }
    crate::fault::hold("stop-and-copy", s.sh.cancel);
    s.sh.check_cancel()?;
    if s.opts.quick {
        let all = s.all_pages();
        s.send_pages(all, true)?;
    } else {
        let mut last = pending;
        last.extend(m.dirty_pages()?);
        last.sort_unstable();
        last.dedup();
        s.send_pages(last, false)?;
    }
    // Every additional connection is drained before the state goes out on the main one.
    for l in s.lanes.iter_mut().skip(1) {
        l.control(&s.sh, Kind::DataEnd, &[])?;
        l.w.flush()?;
    }
    // Disk hand-over: everything the guest was told is written gets to the image, then the
    // images are closed and unlocked so the destination can open them before it says READY.
    // Until the commit, any failure takes them back here (`migrate`'s error path).
    m.release_devices()?;
    let snap = m.capture()?;
    let state = postcard::to_stdvec(&snap).map_err(|e| MigrationError::Protocol(e.to_string()))?;
    s.lanes[0].control(&s.sh, Kind::State, &state)?;
    let mut buf = Vec::new();
    match s.lanes[0].read(&mut buf)? {
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
    crate::fault::hold("ready", s.sh.cancel);
    s.sh.check_cancel()?;
    // Last check before the point of no return: the destination must answer right now.
    // A dead destination or a cut link is found here, while the VM can still resume on the
    // source; what is left is a failure in the one round trip between PONG and COMMIT.
    let lane = &mut s.lanes[0];
    lane.control(&s.sh, Kind::Ping, &[])?;
    lane.w.flush()?;
    lane.w
        .get_ref()
        .tcp()
        .set_read_timeout(Some(PRECOMMIT_TIMEOUT))?;
    let pong = lane.read(&mut buf);
    lane.w.get_ref().tcp().set_read_timeout(Some(IO_TIMEOUT))?;
    match pong {
        Ok(Kind::Pong) => {}
        Ok(k) => return Err(MigrationError::Corrupt(format!("expected PONG, got {k:?}"))),
        Err(e) => {
            return Err(MigrationError::Peer(format!(
                "the destination did not answer before the commit ({e}); the VM stays here"
            )))
        }
    }
    s.sh.check_cancel()?;
    Ok((round, pause_at))
}
