//! The worker's main: start or restore the VM, serve the control socket, exit when the VM stops.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use std::time::Instant;

use clap::Parser;
use vmm::devices::serial::ConsoleOut;
use vmm::machine::Machine;
use vmm::VmConfig;

use migration::commit::{Decision, GateAnswer};
use migration::{MigrateOptions, MigrationError, MigrationStatus};

use crate::api::{
    DiskList, Incoming, Request, Response, Status, WorkerState, API_VERSION, DIRTY_SAMPLE_EVERY,
    DIRTY_WINDOW, MAX_REQUEST,
};
use crate::fence::{boottime_ms, Deadline};
use crate::paths;

/// Errors of the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// A VM of that name is already running here.
    #[error("a VM named {0:?} is already running on this host")]
    Exists(String),
    /// I/O on the run directory or files.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The VM could not be created.
    #[error(transparent)]
    Machine(#[from] vmm::MachineError),
    /// Config file unreadable.
    #[error(transparent)]
    Config(#[from] vmm::config::ConfigError),
    /// The TLS identity cannot be used.
    #[error(transparent)]
    Tls(#[from] migration::tls::TlsError),
    /// The fencing deadline had passed before the VM could start.
    #[error("the fencing deadline passed {0} ms before the worker started: the host may no longer own this VM")]
    Fenced(u64),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> WorkerError {
    let what = what.into();
    move |source| WorkerError::Io { what, source }
}

/// Worker command line.
#[derive(Debug, Parser)]
#[command(
    name = "ferry-vm",
    about = "Ferry's per-VM worker process (started by `ferry vm ...`)"
)]
pub struct Args {
    /// VM config (JSON) to boot.
    #[arg(long, conflicts_with = "restore")]
    pub config: Option<PathBuf>,
    /// State file to restore instead of booting.
    #[arg(long)]
    pub restore: Option<PathBuf>,
    /// Name for the restored VM (default: the saved one).
    #[arg(long)]
    pub name: Option<String>,
    /// Console log file (default: console.log in the VM's run directory).
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Console on the terminal; Ctrl-C stops the VM.
    #[arg(long)]
    pub foreground: bool,
    /// Restore (or receive) with the vCPUs paused.
    #[arg(long)]
    pub paused: bool,
    /// Wait for an incoming migration on this `HOST:PORT` (port 0: any free port).
    #[arg(long, conflicts_with_all = ["config", "restore"])]
    pub receive: Option<String>,
    /// TLS identity directory for --receive (`ca.pem`, `cert.pem`, `key.pem`); without it
    /// the migration connection is plain TCP.
    #[arg(long, requires = "receive")]
    pub pki: Option<PathBuf>,
    /// Stop the VM at once when process PID exits: the host agent that started this worker
    /// (ferryd) is the only one that can fence it, so the VM does not outlive it.
    #[arg(long, value_name = "PID")]
    pub stop_with: Option<u32>,
    /// Run the VM only until this instant (CLOCK_BOOTTIME, milliseconds), unless a
    /// `renew-deadline` request moves it on: a cluster host's agent passes the time its lease
    /// is certain to live and renews it after every lease renewal, so a frozen agent's VMs
    /// stop by themselves before the cluster may restart them elsewhere (docs/worker-api.md).
    #[arg(long, value_name = "BOOTTIME_MS")]
    pub fence_deadline: Option<u64>,
    /// For --receive in a cluster: the store decides the commit. A source that goes away after
    /// READY leaves the VM held here until a `migration-resolve` request says run or discard.
    #[arg(long, requires = "receive")]
    pub commit_by_store: bool,
}

/// Ends this process as soon as process `pid` exits (watched through a pidfd, so a reused pid
/// cannot fool it). Fails if `pid` does not exist.
fn stop_with(pid: u32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    std::thread::Builder::new()
        .name("stop-with".into())
        .spawn(move || loop {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: p is one valid pollfd; a pidfd becomes readable when its process exits.
            let n = unsafe { libc::poll(&mut p, 1, -1) };
            if n > 0 {
                tracing::warn!("the agent (pid {pid}) exited: stopping the VM with it");
                std::process::exit(3);
            }
        })?;
    Ok(())
}

fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        cur = c.source();
    }
    s
}

/// Logs to standard error at the level `$FERRY_LOG` asks for (default `info`): the setup of
/// every Ferry daemon binary.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
}

/// Entry point of the `ferry-vm` binary; returns the process exit code.
pub fn main() -> i32 {
    let args = Args::parse();
    init_logging();
    let foreground = args.foreground;
    if let Some(pid) = args.stop_with {
        if let Err(e) = stop_with(pid) {
            println!(
                "{}",
                serde_json::json!({ "ready": false, "error": format!("--stop-with {pid}: {e}") })
            );
            return 1;
        }
    }
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            let msg = describe(&e);
            if foreground {
                eprintln!("ferry-vm: {msg}");
            } else {
                println!("{}", serde_json::json!({ "ready": false, "error": msg }));
            }
            1
        }
    }
}

struct Worker {
    machine: OnceLock<Machine>,
    name: String,
    console_log: Option<PathBuf>,
    started: Instant,
    dir: PathBuf,
    incoming: Option<(String, Mutex<String>)>,
    migration: Mutex<Option<Arc<Outgoing>>>,
    /// Set once a migration has committed (or may have): the VM must never run here again.
    fenced: AtomicBool,
    /// The self-fencing deadline of a cluster worker (none outside a cluster).
    deadline: Option<Arc<Deadline>>,
    /// A cluster receiver's commit decision (`--commit-by-store`).
    decision: Option<Arc<Decision>>,
    /// The last migration's outcome is not known here (COMMIT sent and not confirmed, or the
    /// cluster's commit answer lost): the VM is paused and fenced, and `migration-resolve`
    /// says whether it resumes (it runs nowhere else) or is stopped (the destination runs it).
    outcome_unknown: AtomicBool,
    /// The guest's dirty rate from the last sampling window.
    dirty: Mutex<Option<vmm::dirty_rate::DirtyRate>>,
}

struct Outgoing {
    status: Mutex<MigrationStatus>,
    cancel: AtomicBool,
    done: AtomicBool,
}

impl Worker {
    fn status(&self) -> Status {
        let migration = self
            .outgoing()
            .map(|o| o.status.lock().unwrap_or_else(|p| p.into_inner()).clone());
        let incoming = self.incoming.as_ref().map(|(listen, phase)| Incoming {
            listen: listen.clone(),
            phase: phase.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        });
        let migrating = self
            .outgoing()
            .is_some_and(|o| !o.done.load(Ordering::SeqCst));
        match self.machine.get() {
            Some(m) => {
                let c = m.config();
                Status {
                    api_version: API_VERSION,
                    name: c.name.clone(),
                    state: if migrating {
                        WorkerState::Migrating
                    } else {
                        m.state().into()
                    },
                    vcpus: c.vcpus,
                    memory_mib: c.memory_mib,
                    kernel: c.kernel.clone(),
                    kernel_kind: Some(m.kernel_kind()),
                    cpu_model: Some(c.cpu),
                    cpu_features: vmm::cpuid::feature_names(m.guest_cpuid())
                        .into_iter()
                        .map(str::to_string)
                        .collect(),
                    pid: std::process::id(),
                    console_log: self.console_log.clone(),
                    uptime_s: self.started.elapsed().as_secs(),
                    stop_reason: m.stop_reason(),
                    migration,
                    incoming,
                    migration_outcome_unknown: self.outcome_unknown.load(Ordering::SeqCst),
                    io: Some(m.io()),
                    dirty: *self.dirty.lock().unwrap_or_else(|p| p.into_inner()),
                }
            }
            None => Status {
                api_version: API_VERSION,
                name: self.name.clone(),
                state: WorkerState::Receiving,
                vcpus: 0,
                memory_mib: 0,
                kernel: PathBuf::new(),
                kernel_kind: None,
                cpu_model: None,
                cpu_features: Vec::new(),
                pid: std::process::id(),
                console_log: self.console_log.clone(),
                uptime_s: self.started.elapsed().as_secs(),
                stop_reason: None,
                migration,
                incoming,
                migration_outcome_unknown: false,
                io: None,
                dirty: None,
            },
        }
    }

    /// Measures the guest's dirty rate every [`DIRTY_SAMPLE_EVERY`] over [`DIRTY_WINDOW`]
    /// (by page sampling: `vmm::dirty_rate`), for as long as the process lives; a receiving
    /// worker starts once its VM has arrived.
    fn sample_dirty_rate(&self) {
        let mut round: u64 = 0;
        loop {
            std::thread::sleep(DIRTY_SAMPLE_EVERY.saturating_sub(DIRTY_WINDOW));
            let Some(m) = self.machine.get() else {
                continue;
            };
            round += 1;
            let seed = round ^ u64::from(std::process::id()).rotate_left(32);
            let rate = vmm::dirty_rate::DirtySample::take(m.ram(), seed).and_then(|s| {
                std::thread::sleep(DIRTY_WINDOW);
                s.finish(m.ram())
            });
            match rate {
                Ok(r) => *self.dirty.lock().unwrap_or_else(|p| p.into_inner()) = Some(r),
                Err(e) => tracing::warn!("cannot measure the dirty rate: {e}"),
            }
        }
    }

    fn outgoing(&self) -> Option<Arc<Outgoing>> {
        self.migration
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn cleanup(&self) {
        remove_run_files(&self.dir);
    }

    fn stop(&self) {
        if let Some(m) = self.machine.get() {
            m.shutdown();
        } else {
            self.cleanup();
            std::process::exit(0);
        }
    }

    /// Handles one request; returns the response and whether the worker must exit after it.
    fn handle(&self, req: Request) -> (Response, bool) {
        if matches!(req, Request::Status) {
            return (Response::ok(self.status()), false);
        }
        if matches!(req, Request::Shutdown) {
            return (Response::ok(serde_json::json!({"state": "stopped"})), true);
        }
        if let Request::RenewDeadline { until_ms } = req {
            return match &self.deadline {
                None => (
                    Response::err(
                        "this worker runs without a fencing deadline (not a cluster worker)",
                    ),
                    false,
                ),
                Some(d) => match d.renew(until_ms) {
                    Ok(until_ms) => (
                        Response::ok(serde_json::json!({ "until_ms": until_ms })),
                        false,
                    ),
                    Err(e) => (Response::err(e.to_string()), false),
                },
            };
        }
        if let Request::MigrationResolve { commit } = req {
            return match (&self.decision, self.machine.get()) {
                (Some(d), None) => {
                    let decided = d.decide(commit);
                    (
                        Response::ok(serde_json::json!({ "commit": decided })),
                        false,
                    )
                }
                (Some(_), Some(_)) => (
                    Response::err("the VM has been received already; nothing to resolve"),
                    false,
                ),
                (None, Some(m)) if self.outcome_unknown.load(Ordering::SeqCst) => {
                    if commit {
                        // The destination owns the VM: this copy must never run again.
                        return (Response::ok(serde_json::json!({ "commit": true })), true);
                    }
                    // The VM runs nowhere else (the store still names this host, COMMIT unsent;
                    // or an operator's word): take the disks back and resume.
                    let back = m
                        .reacquire_devices(Duration::from_secs(30))
                        .and_then(|_| m.resume());
                    match back {
                        Ok(()) => {
                            self.outcome_unknown.store(false, Ordering::SeqCst);
                            self.fenced.store(false, Ordering::SeqCst);
                            (Response::ok(serde_json::json!({ "commit": false })), false)
                        }
                        Err(e) => (
                            Response::err(format!("the VM cannot resume here: {}", describe(&e))),
                            false,
                        ),
                    }
                }
                (None, _) => (
                    Response::err(
                        "nothing to resolve: this worker neither waits for a cluster's decision (--commit-by-store) nor has a migration of unknown outcome",
                    ),
                    false,
                ),
            };
        }
        if let Request::MigrationStatus = req {
            return match self.outgoing() {
                Some(o) => (
                    Response::ok(o.status.lock().unwrap_or_else(|p| p.into_inner()).clone()),
                    false,
                ),
                None => (Response::err("no migration has run on this VM"), false),
            };
        }
        if let Request::MigrationCancel = req {
            return match self.outgoing() {
                Some(o) if !o.done.load(Ordering::SeqCst) => {
                    o.cancel.store(true, Ordering::SeqCst);
                    (Response::ok(serde_json::json!({"cancelling": true})), false)
                }
                _ => (Response::err("no migration is running on this VM"), false),
            };
        }
        let Some(m) = self.machine.get() else {
            return (Response::err("the VM is still being received"), false);
        };
        if let Request::DiskList = req {
            return match m.scsi_disks() {
                Some(luns) => (Response::ok(DiskList { luns }), false),
                None => (
                    Response::err("the VM has no SCSI controller (start it with --scsi)"),
                    false,
                ),
            };
        }
        if self
            .outgoing()
            .is_some_and(|o| !o.done.load(Ordering::SeqCst))
        {
            let msg = match req {
                Request::DiskAdd { .. } | Request::DiskRemove { .. } => {
                    "the VM is migrating; try again when it ends"
                }
                _ => "the VM is migrating; cancel the migration first",
            };
            return (Response::err(msg), false);
        }
        if self.fenced.load(Ordering::SeqCst)
            && matches!(req, Request::DiskAdd { .. } | Request::DiskRemove { .. })
        {
            return (
                Response::err("this VM was handed over to another host; its disks are not here"),
                false,
            );
        }
        let r = |res: Result<serde_json::Value, vmm::MachineError>| match res {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(describe(&e)),
        };
        match req {
            Request::Pause => (
                r(m.pause().map(|_| serde_json::json!({"state": "paused"}))),
                false,
            ),
            Request::Resume if self.fenced.load(Ordering::SeqCst) => (
                Response::err(
                    "this VM was handed over to another host; it must not run here again",
                ),
                false,
            ),
            Request::Resume => (
                r(m.resume().map(|_| serde_json::json!({"state": "running"}))),
                false,
            ),
            Request::MemoryHash => (
                r(m.memory_hash()
                    .map(|h| serde_json::json!({"hash": format!("{h:016x}")}))),
                false,
            ),
            Request::DiskAdd {
                path,
                readonly,
                lun,
            } => {
                if !path.is_absolute() {
                    return (Response::err("the disk's path must be absolute"), false);
                }
                (
                    r(m.add_scsi_disk(&path, readonly, lun)
                        .map(|l| serde_json::json!(l))),
                    false,
                )
            }
            Request::DiskRemove { lun, path } => {
                let which = match (lun, path) {
                    (Some(n), None) => vmm::device_manager::LunRef::Lun(n),
                    (None, Some(p)) => vmm::device_manager::LunRef::Path(p),
                    _ => {
                        return (
                            Response::err("disk-remove takes a lun or a path, not both"),
                            false,
                        )
                    }
                };
                (
                    r(m.remove_scsi_disk(&which).map(|l| serde_json::json!(l))),
                    false,
                )
            }
            Request::Save { path } => {
                if !path.is_absolute() {
                    return (Response::err("save path must be absolute"), false);
                }
                match m.save(&path) {
                    Ok(rep) => (Response::ok(rep), true),
                    Err(e) => (
                        Response::err(format!("save failed, VM left as it was: {}", describe(&e))),
                        false,
                    ),
                }
            }
            _ => (Response::err("unexpected request"), false),
        }
    }

    /// Runs a migration, writing progress lines to `out`; returns whether the worker must exit.
    /// With `gate_in` (the connection's reading side), the caller decides the commit point:
    /// see [`Request::Migrate`]'s `commit_gate`.
    fn migrate(
        self: &Arc<Self>,
        to: String,
        opts: MigrateOptions,
        pki: Option<PathBuf>,
        out: &mut UnixStream,
        mut gate_in: Option<&mut dyn BufRead>,
    ) -> bool {
        let id = match pki
            .as_deref()
            .map(migration::tls::Identity::load)
            .transpose()
        {
            Ok(id) => id,
            Err(e) => {
                let _ = writeln!(out, "{}", json(&Response::err(describe(&e))));
                return false;
            }
        };
        if self.machine.get().is_none() {
            let _ = writeln!(
                out,
                "{}",
                json(&Response::err("the VM is still being received"))
            );
            return false;
        }
        if self.fenced.load(Ordering::SeqCst) {
            let _ = writeln!(
                out,
                "{}",
                json(&Response::err("this VM was already handed over"))
            );
            return false;
        }
        let o = Arc::new(Outgoing {
            status: Mutex::new(MigrationStatus::default()),
            cancel: AtomicBool::new(false),
            done: AtomicBool::new(false),
        });
        {
            let mut cur = self.migration.lock().unwrap_or_else(|p| p.into_inner());
            if cur.as_ref().is_some_and(|c| !c.done.load(Ordering::SeqCst)) {
                let _ = writeln!(
                    out,
                    "{}",
                    json(&Response::err("a migration is already running"))
                );
                return false;
            }
            *cur = Some(Arc::clone(&o));
        }
        let w = Arc::clone(self);
        let o2 = Arc::clone(&o);
        // The migration thread asks for the commit through this channel; the loop below asks
        // the caller on the control connection and sends the answer back.
        let (ask, asked) = std::sync::mpsc::channel::<std::sync::mpsc::Sender<GateAnswer>>();
        let gated = gate_in.is_some();
        let handle = std::thread::spawn(move || {
            let ask = Mutex::new(ask);
            let gate = || {
                let (tx, rx) = std::sync::mpsc::channel();
                let sent = ask.lock().map(|a| a.send(tx).is_ok()).unwrap_or(false);
                match sent {
                    true => rx.recv().unwrap_or_else(|_| {
                        GateAnswer::Unknown("the worker stopped asking".into())
                    }),
                    false => GateAnswer::Unknown("the worker stopped asking".into()),
                }
            };
            let res = match w.machine.get() {
                Some(m) => migration::source::migrate_gated(
                    m,
                    &to,
                    id.as_ref(),
                    &opts,
                    &o2.status,
                    &o2.cancel,
                    if gated { Some(&gate) } else { None },
                ),
                None => Err(MigrationError::Protocol("no VM".into())),
            };
            o2.done.store(true, Ordering::SeqCst);
            res
        });
        while !handle.is_finished() {
            let st = o.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
            // A client that went away does not stop the migration.
            let _ = writeln!(out, "{}", serde_json::json!({ "progress": st }));
            if let Ok(reply) = asked.recv_timeout(Duration::from_millis(200)) {
                let answer = match gate_in.as_deref_mut() {
                    Some(rd) => ask_commit(out, rd),
                    None => GateAnswer::Unknown("no one to ask".into()),
                };
                tracing::info!(?answer, "the cluster's answer at the commit point");
                let _ = reply.send(answer);
            }
        }
        let res = handle
            .join()
            .unwrap_or_else(|_| Err(MigrationError::Protocol("migration thread panicked".into())));
        match res {
            Ok(report) => {
                self.fenced.store(true, Ordering::SeqCst);
                tracing::info!(
                    ?report,
                    "migration completed; the VM runs on the destination"
                );
                let _ = writeln!(out, "{}", json(&Response::ok(report)));
                true
            }
            Err(e) => {
                if matches!(
                    e,
                    MigrationError::CommitUnknown(_) | MigrationError::GateLost(_)
                ) {
                    self.fenced.store(true, Ordering::SeqCst);
                    self.outcome_unknown.store(true, Ordering::SeqCst);
                }
                let msg = describe(&e);
                tracing::warn!("migration failed: {msg}");
                let _ = writeln!(out, "{}", json(&Response::err(msg)));
                false
            }
        }
    }
}

/// Removes what says a worker runs in `dir` (its socket and pid file).
fn remove_run_files(dir: &Path) {
    let _ = std::fs::remove_file(dir.join("control.sock"));
    let _ = std::fs::remove_file(dir.join("worker.pid"));
}

/// Asks the caller on the control connection whether the migration may commit.
fn ask_commit(out: &mut UnixStream, rd: &mut dyn BufRead) -> GateAnswer {
    if let Err(e) = writeln!(out, "{}", serde_json::json!({ "commit_request": true })) {
        return GateAnswer::Unknown(format!("cannot ask: {e}"));
    }
    let mut line = String::new();
    match rd.read_line(&mut line) {
        Ok(0) => GateAnswer::Unknown("the caller went away before answering".into()),
        Err(e) => GateAnswer::Unknown(format!("no answer: {e}")),
        Ok(_) => match serde_json::from_str::<serde_json::Value>(line.trim()) {
            Ok(v) if v["commit"] == true => GateAnswer::Commit,
            Ok(v) if v["commit"] == false => GateAnswer::Abort(
                v["reason"]
                    .as_str()
                    .unwrap_or("refused by the caller")
                    .to_string(),
            ),
            _ => GateAnswer::Unknown(format!("an answer that is not one: {}", line.trim())),
        },
    }
}

fn block_termination_signals() {
    // SAFETY: sigset manipulation on a local, zero-initialised set; pthread_sigmask on the
    // calling thread. Threads spawned later inherit the mask, so only the signal thread
    // receives SIGINT/SIGTERM (via sigwait).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn wait_termination_signal() -> i32 {
    // SAFETY: as above; sigwait writes the received signal number into `sig`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
        sig
    }
}

fn claim_dir(name: &str) -> Result<(PathBuf, UnixListener), WorkerError> {
    let dir = paths::vm_dir(name);
    std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let sock = dir.join("control.sock");
    if UnixStream::connect(&sock).is_ok() {
        return Err(WorkerError::Exists(name.to_string()));
    }
    let _ = std::fs::remove_file(&sock); // stale, from a worker that died
    let listener =
        UnixListener::bind(&sock).map_err(io(format!("cannot listen on {}", sock.display())))?;
    Ok((dir, listener))
}

fn run(args: Args) -> Result<(), WorkerError> {
    block_termination_signals();
    let (name, config) = match (&args.config, &args.restore, &args.receive) {
        (Some(c), None, None) => {
            let text =
                std::fs::read_to_string(c).map_err(io(format!("cannot read {}", c.display())))?;
            let cfg = VmConfig::from_json(&text)?;
            (cfg.name.clone(), Some(cfg))
        }
        (None, Some(_), None) | (None, None, Some(_)) => {
            let n = match &args.name {
                Some(n) => n.clone(),
                None => {
                    return Err(WorkerError::Usage(
                        "--restore and --receive need --name".into(),
                    ))
                }
            };
            vmm::config::validate_name(&n)?;
            if let Some(state) = &args.restore {
                std::fs::metadata(state).map_err(io(format!("cannot read {}", state.display())))?;
            }
            (n, None)
        }
        _ => {
            return Err(WorkerError::Usage(
                "give exactly one of --config, --restore and --receive".into(),
            ))
        }
    };
    let identity = args
        .pki
        .as_deref()
        .map(migration::tls::Identity::load)
        .transpose()?;
    let (dir, listener) = claim_dir(&name)?;
    let fail = |e: WorkerError| {
        let _ = std::fs::remove_file(dir.join("control.sock"));
        e
    };
    // The deadline holds from the first instant: a VM must not start after it.
    let deadline = match args.fence_deadline {
        Some(until) => {
            let d = Deadline::new(until);
            if d.passed() {
                return Err(fail(WorkerError::Fenced(boottime_ms() - until)));
            }
            let dir = dir.clone();
            d.watch(move |late| {
                tracing::error!(
                    late_ms = late,
                    "fenced: the host agent did not renew this worker's deadline in time (its lease may expire and the VM run elsewhere): stopping the VM"
                );
                remove_run_files(&dir);
                // Ends the vCPUs with the process at once; nothing here may wait on a lock
                // a stuck thread could hold.
                std::process::exit(4);
            })
            .map_err(io("cannot start the fencing watchdog"))
            .map_err(fail)?;
            Some(d)
        }
        None => None,
    };
    let console_log = if args.foreground && args.console_log.is_none() {
        None
    } else {
        Some(
            args.console_log
                .clone()
                .unwrap_or_else(|| dir.join("console.log")),
        )
    };
    let log_file = match &console_log {
        Some(p) => Some(
            File::options()
                .create(true)
                .append(true)
                .open(p)
                .map_err(io(format!("cannot open console log {}", p.display())))
                .map_err(fail)?,
        ),
        None => None,
    };
    let console = ConsoleOut {
        log: log_file,
        stdout: args.foreground,
        ..Default::default()
    };
    let mut incoming = None;
    let mut console = Some(console);
    let machine = match (config, &args.restore, &args.receive) {
        (Some(cfg), _, _) => Some(Machine::boot(cfg, console.take().unwrap_or_default())),
        (None, Some(state), _) => Some(Machine::restore(
            state,
            Some(&name),
            console.take().unwrap_or_default(),
            args.paused,
        )),
        (None, None, Some(addr)) => {
            let l = TcpListener::bind(addr)
                .map_err(io(format!("cannot listen on {addr}")))
                .map_err(fail)?;
            let local = l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| addr.clone());
            incoming = Some((l, local));
            None
        }
        _ => return Err(fail(WorkerError::Usage("nothing to run".into()))),
    };
    let machine = match machine.transpose() {
        Ok(m) => m,
        Err(e) => return Err(fail(e.into())),
    };
    let _ = std::fs::write(dir.join("worker.pid"), format!("{}\n", std::process::id()));
    let worker = Arc::new(Worker {
        machine: OnceLock::new(),
        name: name.clone(),
        console_log,
        started: Instant::now(),
        dir,
        incoming: incoming.as_ref().map(|(_, local)| {
            (
                local.clone(),
                Mutex::new("waiting for the source".to_string()),
            )
        }),
        migration: Mutex::new(None),
        fenced: AtomicBool::new(false),
        deadline,
        decision: args.commit_by_store.then(|| Arc::new(Decision::new())),
        outcome_unknown: AtomicBool::new(false),
        dirty: Mutex::new(None),
    });
    if let Some(m) = machine {
        let _ = worker.machine.set(m);
    }
    if !args.foreground {
        let mut ready =
            serde_json::json!({ "ready": true, "pid": std::process::id(), "name": name });
        if let Some((_, local)) = &incoming {
            ready["listen"] = local.clone().into();
        }
        println!("{ready}");
        let _ = std::io::stdout().flush();
        detach_stdio();
    }
    {
        let w = Arc::clone(&worker);
        std::thread::spawn(move || {
            let sig = wait_termination_signal();
            tracing::info!("signal {sig}: stopping the VM");
            w.stop();
        });
    }
    {
        let w = Arc::clone(&worker);
        std::thread::spawn(move || serve(&w, &listener));
    }
    {
        let w = Arc::clone(&worker);
        if let Err(e) = std::thread::Builder::new()
            .name("dirty-rate".into())
            .spawn(move || w.sample_dirty_rate())
        {
            tracing::warn!("cannot start the dirty-rate sampler (status will not show it): {e}");
        }
    }
    if let Some((l, _)) = incoming {
        let phase = &worker.incoming.as_ref().map(|(_, p)| p);
        let fallback = Mutex::new(String::new());
        let phase = phase.unwrap_or(&fallback);
        match migration::dest::receive_decided(
            &l,
            &name,
            identity.as_ref(),
            console.take().unwrap_or_default(),
            phase,
            args.paused,
            worker.decision.as_deref(),
        ) {
            Ok(m) => {
                let _ = worker.machine.set(m);
            }
            Err(e) => {
                tracing::warn!("incoming migration failed, nothing kept: {}", describe(&e));
                worker.cleanup();
                return Ok(());
            }
        }
    }
    let Some(m) = worker.machine.get() else {
        worker.cleanup();
        return Ok(());
    };
    let reason = m.wait();
    tracing::info!(?reason, "VM stopped");
    m.shutdown();
    worker.cleanup();
    Ok(())
}

/// Points standard input and output at /dev/null so the starter's pipe closes.
fn detach_stdio() {
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto the standard descriptors with a valid open fd.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}

fn serve(worker: &Arc<Worker>, listener: &UnixListener) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let w = Arc::clone(worker);
        std::thread::spawn(move || {
            if serve_conn(&w, conn) == Some(true) {
                w.stop();
            }
        });
    }
}

/// Serves one connection; Some(true) when the worker must stop.
fn serve_conn(worker: &Arc<Worker>, conn: UnixStream) -> Option<bool> {
    let mut out = conn.try_clone().ok()?;
    let mut rd = BufReader::new(conn).take(MAX_REQUEST as u64 * 16);
    let mut line = String::new();
    loop {
        line.clear();
        match rd.read_line(&mut line) {
            Ok(0) | Err(_) => return Some(false),
            Ok(_) => {}
        }
        if line.len() > MAX_REQUEST {
            let _ = writeln!(out, "{}", json(&Response::err("request too large")));
            return Some(false);
        }
        let (resp, exit) = match serde_json::from_str::<Request>(line.trim()) {
            Ok(Request::Migrate {
                to,
                options,
                pki,
                commit_gate,
            }) => {
                let gate_in: Option<&mut dyn BufRead> = match commit_gate {
                    true => Some(&mut rd),
                    false => None,
                };
                return Some(worker.migrate(to, options, pki, &mut out, gate_in));
            }
            Ok(req) => worker.handle(req),
            Err(e) => (Response::err(format!("bad request: {e}")), false),
        };
        let _ = writeln!(out, "{}", json(&resp));
        if exit {
            return Some(true);
        }
    }
}

fn json(r: &Response) -> String {
    serde_json::to_string(r).unwrap_or_else(|_| r#"{"ok":false,"error":"encoding"}"#.into())
}

/// Sends one request to the worker of VM `name` and returns its response.
pub fn call(name: &str, req: &Request) -> Result<Response, std::io::Error> {
    call_socket(&paths::socket(name), req)
}

/// Sends one request over a given socket.
pub fn call_socket(sock: &Path, req: &Request) -> Result<Response, std::io::Error> {
    let mut s = UnixStream::connect(sock)?;
    let text = serde_json::to_string(req).map_err(std::io::Error::other)?;
    writeln!(s, "{text}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the worker closed the connection without answering",
        ));
    }
    serde_json::from_str(&line).map_err(std::io::Error::other)
}
