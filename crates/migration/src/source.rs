//! The sending side: runs in the source worker, which owns the VM's memory.

use std::io::{BufWriter, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm::memory::{ram_ranges, GuestRam, PAGE_SIZE};
use vmm::Machine;

use crate::commit::{Gate, GateAnswer};
use crate::dest::MAX_OUTPUT_WATCH_MS;
use crate::policy::{Convergence, Decision, RoundStats};
use crate::protocol::{
    frame, handshake, message, pages, Compression, Kind, Message, MigrationError, Packer, Setup,
    BATCH_PAGES, IO_TIMEOUT, MAX_CONNECTIONS, PRECOMMIT_TIMEOUT,
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

/// Where the downtime went: each step between the source pausing the VM and the
/// destination's RESUMED arriving, in µs, as the source measures it (the destination's own
/// share comes in READY and RESUMED).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DowntimeSteps {
    /// Stopping every vCPU (from the pause request until the last one is out of the guest).
    pub pause_us: u64,
    /// Reading the dirty log a last time (KVM's and the devices').
    pub dirty_log_us: u64,
    /// Sending the last dirty pages, every connection drained.
    pub last_pages_us: u64,
    /// Handing the disks over (flush, close, unlock).
    pub disks_us: u64,
    /// Capturing and encoding the vCPU and device state.
    pub state_capture_us: u64,
    /// STATE on the wire and READY back, less the destination's restore.
    pub state_transfer_us: u64,
    /// The destination building the VM from the state (it reports this in READY).
    pub dest_restore_us: u64,
    /// The last check before the commit (PING → PONG).
    pub precommit_us: u64,
    /// The cluster's commit point: its compare-and-swap in the store (0 between two workers
    /// alone).
    #[serde(default)]
    pub commit_gate_us: u64,
    /// COMMIT sent → RESUMED received, the destination letting the vCPUs go included.
    pub resume_us: u64,
}

/// Summary of a completed migration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Start to destination running (ms).
    pub total_ms: u64,
    /// Source pause to destination resume acknowledged (ms).
    pub downtime_ms: u64,
    /// The downtime target the switch-over aimed at (ms).
    pub downtime_target_ms: u64,
    /// By how much the downtime exceeded the target (ms), when it did.
    pub downtime_missed_by_ms: Option<u64>,
    /// Where the downtime went.
    pub downtime_steps: DowntimeSteps,
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
    /// Downtime as the guest lived it, measured from outside it: from the instant the last
    /// vCPU stopped on the source to the instant the first vCPU entered the guest on the
    /// destination (ms; `None` when the destination took the VM over paused). Across hosts
    /// this relies on their clocks being synchronized (NTP).
    pub guest_downtime_ms: Option<u64>,
    /// The largest gap between two of the guest's console lines, host-timestamped, from the
    /// start of the migration until its first line on the destination (ms; `None` when the
    /// guest printed nothing to measure with): what a guest that prints regularly saw.
    pub console_gap_ms: Option<u64>,
}

/// How a migration that failed before the commit gets its disks back from a destination that
/// still holds them (it lets go when its connection fails, at the latest after its I/O
/// timeout).
const DISK_PATIENCE: Duration = Duration::from_secs(IO_TIMEOUT.as_secs() + 10);

/// Per-vCPU state estimate used in the downtime prediction before the real size is known.
const STATE_ESTIMATE: u64 = 64 * 1024;

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

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
    index: Vec<u8>,
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
            index: Vec::new(),
            data: Vec::with_capacity(BATCH_PAGES * PAGE_SIZE),
            batch: Vec::new(),
            zeros: Vec::new(),
            cap: opts.bandwidth_mib_s as f64 * 1048576.0 / f64::from(lanes.max(1)),
            window: (Instant::now(), 0),
            sent: 0,
        })
    }

    /// Writes a control message (not flushed).
    fn send_msg(&mut self, sh: &Shared<'_>, m: &Message) -> Result<(), MigrationError> {
        let n = message::send(&mut self.w, m)?;
        self.account(sh, n);
        Ok(())
    }

    /// Writes a control message and flushes the connection.
    fn say(&mut self, sh: &Shared<'_>, m: &Message) -> Result<(), MigrationError> {
        self.send_msg(sh, m)?;
        self.w.flush()?;
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

    /// Reads the peer's next message (lane 0 only), after sending everything buffered.
    fn read(&mut self, buf: &mut Vec<u8>) -> Result<Message, MigrationError> {
        self.w.flush()?;
        message::recv_message(self.w.get_mut(), buf)
    }

    fn flush_batch(&mut self, sh: &Shared<'_>) -> Result<(), MigrationError> {
        if !self.batch.is_empty() {
            let corrupt = crate::fault::active() && crate::fault::corrupt_this_batch();
            let (raw, wire_len) = pages::write_batch(
                &mut self.w,
                &mut self.packer,
                &self.batch,
                &self.data,
                &mut self.index,
                corrupt,
            )?;
            sh.raw.fetch_add(raw, Ordering::Relaxed);
            sh.packed.fetch_add(wire_len, Ordering::Relaxed);
            sh.pages_sent
                .fetch_add(self.batch.len() as u64, Ordering::Relaxed);
            self.account(
                sh,
                (frame::HEADER_LEN + frame::TRAILER_LEN) as u64 + wire_len,
            );
            sh.update(|_| {}); // bytes and pages sent, live
            self.batch.clear();
            self.data.clear();
        }
        if !self.zeros.is_empty() {
            pages::encode_index(&self.zeros, &mut self.index);
            frame::write(&mut self.w, Kind::ZeroPages, 0, &[&self.index])?;
            let n = (frame::HEADER_LEN + frame::TRAILER_LEN + self.index.len()) as u64;
            self.account(sh, n);
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
            // the batch — the one copy a page takes, which is also the snapshot its CRC
            // covers (the guest may write the page meanwhile: the dirty log has it).
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

/// The sender's phases, in order; each is one method of [`Sender`] that returns the next.
/// Any error before [`SendPhase::Commit`] takes the VM back (see [`migrate`]).
enum SendPhase {
    /// Memory rounds while the VM runs: `round` was just sent, from `started`, when
    /// `pages_before` pages had been sent.
    Precopy {
        round: u32,
        started: Instant,
        pages_before: u64,
    },
    /// Pause, last dirty pages, disks, state; `pending` were dirty at the switch-over
    /// decision.
    StopAndCopy { pending: Vec<u64> },
    /// STATE is out: wait for READY, then make sure the destination is still there.
    Handover,
    /// The point of no return: COMMIT, then RESUMED.
    Commit,
}

/// What the sender has measured by the time it commits.
#[derive(Default)]
struct Progress {
    rounds: u32,
    pause_at: Option<Instant>,
    steps: DowntimeSteps,
}

struct Sender<'a> {
    m: &'a Machine,
    sh: Shared<'a>,
    opts: &'a MigrateOptions,
    lanes: Vec<Lane>,
    policy: Convergence,
    progress: Progress,
    /// Whether this migration paused the VM (so that a failure resumes it).
    paused_here: bool,
    buf: Vec<u8>,
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

    /// Every page of RAM that may hold data, ascending: the holes of the RAM's memfd are
    /// zero and never touched (reading one would allocate it), only counted as skipped.
    fn all_pages(&self) -> Result<Vec<u64>, MigrationError> {
        let ram = self.m.ram();
        let ranges = ram.data_ranges()?;
        let page = PAGE_SIZE as u64;
        let pages: Vec<u64> = ranges
            .iter()
            .flat_map(|&(s, l)| (s / page)..((s + l) / page))
            .collect();
        let total: u64 = ram_ranges(ram.size()).iter().map(|r| r.1 / page).sum();
        self.sh
            .zero_skipped
            .fetch_add(total.saturating_sub(pages.len() as u64), Ordering::Relaxed);
        Ok(pages)
    }

    fn round_end(&mut self, round: u32) -> Result<(), MigrationError> {
        for l in &mut self.lanes {
            l.w.flush()?;
        }
        self.lanes[0].say(&self.sh, &Message::RoundEnd(round))
    }

    fn pages(&self) -> u64 {
        self.sh.pages_sent.load(Ordering::Relaxed)
    }

    /// Runs the phases from the first page to RESUMED.
    fn run(&mut self) -> Result<(), MigrationError> {
        self.sh.check_cancel()?; // cancelled during setup: nothing was sent yet
        let mut phase = if self.opts.quick {
            self.paused_here = self.m.pause()?;
            SendPhase::StopAndCopy {
                pending: Vec::new(),
            }
        } else {
            self.start_precopy()?
        };
        loop {
            phase = match phase {
                SendPhase::Precopy {
                    round,
                    started,
                    pages_before,
                } => self.precopy_round(round, started, pages_before)?,
                SendPhase::StopAndCopy { pending } => self.stop_and_copy(pending)?,
                SendPhase::Handover => self.handover()?,
                SendPhase::Commit => return Ok(()),
            };
        }
    }

    /// Round 0: dirty logging on, then every non-zero page.
    fn start_precopy(&mut self) -> Result<SendPhase, MigrationError> {
        // Dirty logging on before the first page is read: nothing written later is missed.
        self.m.set_dirty_logging(true)?;
        self.sh.update(|st| st.phase = Phase::Precopy);
        let (started, pages_before) = (Instant::now(), self.pages());
        let all = self.all_pages()?;
        self.send_pages(all, true)?;
        self.round_end(0)?;
        crate::fault::hold("precopy", self.sh.cancel);
        Ok(SendPhase::Precopy {
            round: 0,
            started,
            pages_before,
        })
    }

    /// After round `round`: read the dirty log, ask the policy, and send another round or
    /// switch over.
    fn precopy_round(
        &mut self,
        round: u32,
        started: Instant,
        pages_before: u64,
    ) -> Result<SendPhase, MigrationError> {
        let dirty = self.m.dirty_pages()?;
        let stats = RoundStats {
            round,
            dirty_pages: dirty.len() as u64,
            moved_pages: self.pages() - pages_before,
            elapsed: started.elapsed(),
            since_start: self.sh.t0.elapsed(),
            state_bytes: STATE_ESTIMATE * u64::from(self.m.config().vcpus),
        };
        let step = self.policy.decide(&stats);
        let throttle = self.policy.throttle();
        self.sh.update(|st| {
            st.round = round;
            st.pages_remaining = stats.dirty_pages;
            st.dirty_rate_pps = step.dirty_rate as u64;
            st.throughput_bps = step.throughput as u64;
            st.expected_downtime_ms = u64::try_from(step.expected.as_millis()).unwrap_or(u64::MAX);
            st.throttle_pct = throttle;
        });
        tracing::info!(
            round,
            dirty = stats.dirty_pages,
            expected = ?step.expected,
            throughput = step.throughput,
            decision = ?step.decision,
            "pre-copy round"
        );
        match step.decision {
            Decision::SwitchOver => return Ok(SendPhase::StopAndCopy { pending: dirty }),
            Decision::GiveUp(why) => return Err(MigrationError::NotConverged(why)),
            Decision::Throttle(t) => self.m.set_throttle(t),
            Decision::Continue => {}
        }
        let (started, pages_before) = (Instant::now(), self.pages());
        let round = round + 1;
        self.send_pages(dirty, false)?;
        self.round_end(round)?;
        self.progress.rounds = round;
        Ok(SendPhase::Precopy {
            round,
            started,
            pages_before,
        })
    }

    /// Pause, the last pages, the disks, the state.
    fn stop_and_copy(&mut self, pending: Vec<u64>) -> Result<SendPhase, MigrationError> {
        let m = self.m;
        self.sh.update(|st| st.phase = Phase::StopAndCopy);
        let pause_at = Instant::now();
        self.progress.pause_at = Some(pause_at);
        if !self.paused_here {
            self.paused_here = m.pause()?;
        }
        let lap = |t: &mut Instant| {
            let d = us(t.elapsed());
            *t = Instant::now();
            d
        };
        self.progress.steps.pause_us = us(pause_at.elapsed());
        crate::fault::hold("stop-and-copy", self.sh.cancel);
        self.sh.check_cancel()?;
        let mut t = Instant::now();
        if self.opts.quick {
            let all = self.all_pages()?;
            self.progress.steps.dirty_log_us = lap(&mut t);
            self.send_pages(all, true)?;
        } else {
            let mut last = pending;
            last.extend(m.dirty_pages()?);
            last.sort_unstable();
            last.dedup();
            self.progress.steps.dirty_log_us = lap(&mut t);
            self.send_pages(last, false)?;
        }
        // Every additional connection is drained before the state goes out on the main one.
        for l in self.lanes.iter_mut().skip(1) {
            l.say(&self.sh, &Message::DataEnd)?;
        }
        self.progress.steps.last_pages_us = lap(&mut t);
        // Disk hand-over: everything the guest was told is written gets to the image, then the
        // images are closed and unlocked so the destination can open them before it says READY.
        // Until the commit, any failure takes them back here (`migrate`'s error path).
        m.release_devices()?;
        self.progress.steps.disks_us = lap(&mut t);
        let snap = m.capture()?;
        let state =
            postcard::to_stdvec(&snap).map_err(|e| MigrationError::Protocol(e.to_string()))?;
        self.progress.steps.state_capture_us = lap(&mut t);
        self.lanes[0].say(&self.sh, &Message::State(state))?;
        Ok(SendPhase::Handover)
    }

    /// READY, then PING/PONG: the destination holds the whole VM and is still there.
    fn handover(&mut self) -> Result<SendPhase, MigrationError> {
        let t = Instant::now();
        let ready = match self.lanes[0].read(&mut self.buf)? {
            Message::Ready(r) => r,
            m => return Err(message::unexpected("READY", &m)),
        };
        let round_trip = us(t.elapsed());
        self.progress.steps.dest_restore_us = ready.restore_us.min(round_trip);
        self.progress.steps.state_transfer_us = round_trip - self.progress.steps.dest_restore_us;
        crate::fault::hold("ready", self.sh.cancel);
        self.sh.check_cancel()?;
        // Last check before the point of no return: the destination must answer right now.
        // A dead destination or a cut link is found here, while the VM can still resume on the
        // source; what is left is a failure in the one round trip between PONG and COMMIT.
        let t = Instant::now();
        let lane = &mut self.lanes[0];
        lane.say(&self.sh, &Message::Ping)?;
        lane.w
            .get_ref()
            .tcp()
            .set_read_timeout(Some(PRECOMMIT_TIMEOUT))?;
        let pong = lane.read(&mut self.buf);
        lane.w.get_ref().tcp().set_read_timeout(Some(IO_TIMEOUT))?;
        match pong {
            Ok(Message::Pong) => {}
            Ok(m) => return Err(message::unexpected("PONG", &m)),
            Err(e) => {
                return Err(MigrationError::Peer(format!(
                    "the destination did not answer before the commit ({e}); the VM stays here"
                )))
            }
        }
        self.progress.steps.precommit_us = us(t.elapsed());
        self.sh.check_cancel()?;
        Ok(SendPhase::Commit)
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
    migrate_gated(m, to, id, opts, status, cancel, None)
}

/// [`migrate`] with the commit point decided by `gate` (a cluster's compare-and-swap in its
/// store, [`crate::commit`]): asked once the destination holds the whole VM and answered the
/// last PING; COMMIT goes out only on [`GateAnswer::Commit`], and on
/// [`GateAnswer::Abort`] the VM is taken back here as for any failure before the commit.
pub fn migrate_gated(
    m: &Machine,
    to: &str,
    id: Option<&Identity>,
    opts: &MigrateOptions,
    status: &Mutex<MigrationStatus>,
    cancel: &AtomicBool,
    gate: Option<Gate<'_>>,
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
        policy: Convergence::new(opts),
        progress: Progress::default(),
        paused_here: false,
        buf: Vec::new(),
    };
    let session = session_id();
    let setup = Setup {
        config_json: m.saved_config().encode()?,
        cpuid: m.guest_cpuid().to_vec(),
        connections: opts.connections,
        session,
    };
    s.lanes[0].send_msg(&s.sh, &Message::Setup(Box::new(setup)))?;
    match s.lanes[0].read(&mut s.buf)? {
        Message::Accept => {}
        m => return Err(message::unexpected("ACCEPT", &m)),
    }
    for lane in 1..opts.connections {
        let mut l = Lane::new(open(&addr, id)?, opts, opts.connections)?;
        l.say(&s.sh, &Message::Join { session, lane })?;
        s.lanes.push(l);
    }
    crate::fault::hold("setup", cancel);
    crate::fault::begin();

    if let Err(e) = s.run() {
        return Err(roll_back(&mut s, e));
    }
    if let Some(gate) = gate {
        let t = Instant::now();
        match gate() {
            GateAnswer::Commit => {}
            GateAnswer::Abort(why) => {
                let e = MigrationError::Cancelled(format!(" by the cluster at the commit: {why}"));
                return Err(roll_back(&mut s, e));
            }
            GateAnswer::Unknown(why) => {
                m.set_throttle(0);
                return Err(MigrationError::GateLost(why));
            }
        }
        s.progress.steps.commit_gate_us = us(t.elapsed());
        crate::fault::hold("gated", &AtomicBool::new(false));
    }

    // The commit point. From here on the source never resumes.
    s.sh.update(|st| st.phase = Phase::Commit);
    let pause_at = s.progress.pause_at.unwrap_or(t0);
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
    let t_commit = Instant::now();
    let committed = s.lanes[0].say(&s.sh, &Message::Commit { watch_ms });
    m.set_throttle(0);
    if let Err(e) = committed {
        return Err(MigrationError::CommitUnknown(e.to_string()));
    }
    crate::fault::hold("committed", &AtomicBool::new(false));
    let resumed = match s.lanes[0].read(&mut s.buf) {
        Ok(Message::Resumed(r)) => r,
        Ok(other) => {
            return Err(MigrationError::CommitUnknown(format!(
                "got {} instead of RESUMED",
                other.name()
            )))
        }
        Err(e) => return Err(MigrationError::CommitUnknown(e.to_string())),
    };
    let downtime = pause_at.elapsed();
    let total = t0.elapsed();
    s.progress.steps.resume_us = us(t_commit.elapsed());
    s.sh.update(|st| st.phase = Phase::Completed);
    // Committed and resumed: a missing FIRST_OUTPUT only loses the console measurement.
    let first_there = match s.lanes[0].read(&mut s.buf) {
        Ok(Message::FirstOutput(t)) => t,
        _ => None,
    };
    let console_gap_ms = match (last_line, first_there) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a).max(gap_before) / 1000),
        _ => None,
    };
    let guest_downtime_ms = match (m.paused_at_us(), resumed.first_entry_us) {
        (Some(a), b) if b != 0 => Some(b.saturating_sub(a) / 1000),
        _ => None,
    };
    let raw = s.sh.raw.load(Ordering::Relaxed);
    let packed = s.sh.packed.load(Ordering::Relaxed).max(1);
    let downtime_ms = u64::try_from(downtime.as_millis()).unwrap_or(u64::MAX);
    Ok(MigrationReport {
        total_ms: u64::try_from(total.as_millis()).unwrap_or(u64::MAX),
        downtime_ms,
        downtime_target_ms: opts.downtime_ms,
        downtime_missed_by_ms: downtime_ms.checked_sub(opts.downtime_ms).filter(|&d| d > 0),
        downtime_steps: s.progress.steps.clone(),
        rounds: s.progress.rounds,
        bytes_sent: s.sh.bytes.load(Ordering::Relaxed),
        pages_sent: s.pages(),
        zero_pages_skipped: s.sh.zero_skipped.load(Ordering::Relaxed),
        max_throttle_pct: s.policy.max_throttle(),
        compression: opts.compression,
        compression_ratio: if raw == 0 {
            1.0
        } else {
            raw as f64 / packed as f64
        },
        connections: opts.connections,
        tls,
        guest_downtime_ms,
        console_gap_ms,
    })
}

/// Before the commit point: the VM stays, or becomes again, the source's. Tells the
/// destination, takes the disks back and resumes the VM if this migration paused it;
/// returns the error to report.
fn roll_back(s: &mut Sender<'_>, e: MigrationError) -> MigrationError {
    let m = s.m;
    let reason = e.to_string();
    let msg = if matches!(e, MigrationError::Cancelled(_)) {
        Message::Cancel(reason.clone())
    } else {
        Message::Error(reason.clone())
    };
    let _ = s.lanes[0].say(&s.sh, &msg);
    m.set_throttle(0);
    let _ = m.set_dirty_logging(false);
    let mut result = e;
    if s.paused_here {
        // Disks handed over come back first; a destination that has not noticed the failure
        // yet gives them up within its I/O timeout.
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
    result
}
