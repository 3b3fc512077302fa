//! Starting and talking to worker processes: what `ferry vm ...` on one host and `ferryd` both
//! do. A [`Workers`] is one run directory (`<run>/vms/<name>/` per VM) and the `ferry-vm`
//! binary.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::api::{Request, Response, Status};
use crate::server::call_socket;

/// Errors of [`Workers`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No worker answers for this VM.
    #[error("no VM named {0:?} is running on this host")]
    NotRunning(String),
    /// A worker for this VM already runs.
    #[error("a VM named {0:?} is already running on this host")]
    AlreadyRunning(String),
    /// The worker refused or failed the request.
    #[error("{0}")]
    Refused(String),
    /// The worker did not start.
    #[error("the worker failed to start: {0}")]
    Start(String),
    /// The worker binary is missing.
    #[error("cannot find the worker binary {0} (set FERRY_VM_BIN)")]
    NoBinary(PathBuf),
    /// The worker did not exit in time.
    #[error("the worker (pid {0}) did not exit within {1:?}")]
    ExitTimeout(u32, Duration),
    /// A bad VM name.
    #[error(transparent)]
    Name(#[from] vmm::config::ConfigError),
    /// File system trouble.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// A response that does not parse.
    #[error("unexpected answer from the worker: {0}")]
    Decode(#[from] serde_json::Error),
}

type Result<T> = std::result::Result<T, ClientError>;

/// The workers of one run directory.
#[derive(Clone, Debug)]
pub struct Workers {
    run_dir: PathBuf,
    bin: PathBuf,
}

impl Workers {
    /// Workers under `run_dir`, started from the `ferry-vm` binary `bin`.
    pub fn new(run_dir: PathBuf, bin: PathBuf) -> Self {
        Workers { run_dir, bin }
    }

    /// This host's default: [`crate::paths::run_dir`] and `$FERRY_VM_BIN`, else `ferry-vm`
    /// next to the running executable.
    pub fn from_env() -> Result<Self> {
        let bin = match std::env::var_os("FERRY_VM_BIN") {
            Some(p) => PathBuf::from(p),
            None => {
                let me = std::env::current_exe()
                    .map_err(|e| ClientError::Io("cannot locate this executable".into(), e))?;
                me.with_file_name("ferry-vm")
            }
        };
        if !bin.exists() {
            return Err(ClientError::NoBinary(bin));
        }
        Ok(Workers::new(crate::paths::run_dir(), bin))
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The worker binary.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The directory of VM `name`.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.run_dir.join("vms").join(name)
    }

    /// Sends one request to VM `name`'s worker; its result, or its error as [`ClientError`].
    pub fn request(&self, name: &str, req: &Request) -> Result<serde_json::Value> {
        let resp: Response = call_socket(&self.vm_dir(name).join("control.sock"), req)
            .map_err(|_| ClientError::NotRunning(name.to_string()))?;
        if resp.ok {
            Ok(resp.result.unwrap_or(serde_json::Value::Null))
        } else {
            Err(ClientError::Refused(
                resp.error.unwrap_or_else(|| "request failed".into()),
            ))
        }
    }

    /// VM `name`'s status.
    pub fn status(&self, name: &str) -> Result<Status> {
        vmm::config::validate_name(name)?;
        let v = self.request(name, &Request::Status)?;
        Ok(serde_json::from_value(v)?)
    }

    /// Every VM whose worker answers, by name.
    pub fn list(&self) -> Vec<Status> {
        let Ok(rd) = std::fs::read_dir(self.run_dir.join("vms")) else {
            return Vec::new();
        };
        let mut names: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names.iter().filter_map(|n| self.status(n).ok()).collect()
    }

    /// Checks the name, that no worker runs for it, and creates its directory.
    pub fn prepare(&self, name: &str) -> Result<PathBuf> {
        vmm::config::validate_name(name)?;
        if self.request(name, &Request::Status).is_ok() {
            return Err(ClientError::AlreadyRunning(name.to_string()));
        }
        let dir = self.vm_dir(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ClientError::Io(format!("cannot create {}", dir.display()), e))?;
        Ok(dir)
    }

    /// Starts a VM from `cfg` in a detached worker; `extra` are further worker options
    /// (e.g. `--console-log`). Returns the worker's readiness report.
    pub fn start(&self, cfg: &vmm::VmConfig, extra: &[OsString]) -> Result<serde_json::Value> {
        let dir = self.prepare(&cfg.name)?;
        let cfg_path = dir.join("config.json");
        let text = serde_json::to_vec_pretty(cfg)?;
        std::fs::write(&cfg_path, text)
            .map_err(|e| ClientError::Io(format!("cannot write {}", cfg_path.display()), e))?;
        let mut args: Vec<OsString> = vec!["--config".into(), cfg_path.into_os_string()];
        args.extend(extra.iter().cloned());
        self.spawn(&dir, &args)
    }

    /// Starts a detached worker with `args` (its run directory set to this one) and waits for
    /// its one-line readiness report.
    pub fn spawn(&self, dir: &Path, args: &[OsString]) -> Result<serde_json::Value> {
        let log_path = dir.join("worker.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| ClientError::Io(format!("cannot open {}", log_path.display()), e))?;
        let mut child = Command::new(&self.bin)
            .args(args)
            .env("FERRY_RUN_DIR", &self.run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| ClientError::Io("cannot start the worker process".into(), e))?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ClientError::Start("no worker stdout".into()));
        };
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| ClientError::Io("cannot read the worker's report".into(), e))?;
        let v: serde_json::Value = match serde_json::from_str(line.trim()) {
            Ok(v) => v,
            Err(_) => {
                let _ = child.wait();
                return Err(ClientError::Start(format!(
                    "the worker exited without reporting; see {}",
                    log_path.display()
                )));
            }
        };
        if v["ready"].as_bool() != Some(true) {
            let _ = child.wait();
            return Err(ClientError::Start(
                v["error"]
                    .as_str()
                    .unwrap_or("the worker failed to start")
                    .to_string(),
            ));
        }
        // The worker runs on in its own process group; a thread reaps it so that it never
        // lingers as a zombie of a long-lived parent (ferryd).
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(v)
    }

    /// Migrates VM `name` to a receiving worker at `to`, calling `progress` with each status
    /// the worker streams; the engine's report once the VM runs there. With `gate`, the
    /// commit point is the caller's: once the destination holds the whole VM the worker asks,
    /// and `gate` answers `Ok` (commit) or `Err(reason)` (take the VM back).
    pub fn migrate(
        &self,
        name: &str,
        to: &str,
        options: migration::MigrateOptions,
        pki: Option<PathBuf>,
        mut progress: impl FnMut(&migration::MigrationStatus),
        gate: Option<&dyn Fn() -> std::result::Result<(), GateError>>,
    ) -> Result<migration::MigrationReport> {
        use std::io::Write as _;
        let sock = self.vm_dir(name).join("control.sock");
        let mut s = std::os::unix::net::UnixStream::connect(&sock)
            .map_err(|_| ClientError::NotRunning(name.to_string()))?;
        let req = serde_json::to_string(&Request::Migrate {
            to: to.to_string(),
            options,
            pki,
            commit_gate: gate.is_some(),
        })?;
        writeln!(s, "{req}").map_err(|e| ClientError::Io("cannot ask the worker".into(), e))?;
        let mut answer_to = s
            .try_clone()
            .map_err(|e| ClientError::Io("cannot ask the worker".into(), e))?;
        for line in BufReader::new(s).lines() {
            let line =
                line.map_err(|e| ClientError::Io("lost the worker's connection".into(), e))?;
            let v: serde_json::Value = serde_json::from_str(&line)?;
            if let Some(p) = v.get("progress") {
                progress(&serde_json::from_value(p.clone())?);
                continue;
            }
            if v.get("commit_request").is_some() {
                let answer = match gate.map(|g| g()) {
                    Some(Ok(())) => serde_json::json!({ "commit": true }),
                    Some(Err(reason)) => {
                        serde_json::json!({ "commit": false, "reason": reason.to_string() })
                    }
                    None => serde_json::json!({ "commit": false, "reason": "no commit gate" }),
                };
                writeln!(answer_to, "{answer}")
                    .map_err(|e| ClientError::Io("cannot answer the worker".into(), e))?;
                continue;
            }
            let resp: Response = serde_json::from_value(v)?;
            if !resp.ok {
                return Err(ClientError::Refused(
                    resp.error.unwrap_or_else(|| "migration failed".into()),
                ));
            }
            return Ok(serde_json::from_value(resp.result.unwrap_or_default())?);
        }
        Err(ClientError::Refused(
            "the worker closed the connection without a result".into(),
        ))
    }

    /// Asks VM `name`'s worker to stop and waits up to `timeout` for it to exit.
    pub fn stop(&self, name: &str, timeout: Duration) -> Result<()> {
        let pid = self.status(name)?.pid;
        self.request(name, &Request::Shutdown)?;
        wait_exit(pid, timeout)
    }
}

/// Why a commit gate refused: the caller's own error, told to the worker as its reason.
pub type GateError = Box<dyn std::error::Error + Send + Sync>;

/// Waits until process `pid` has exited.
pub fn wait_exit(pid: u32, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while process_alive(pid) {
        if Instant::now() > deadline {
            return Err(ClientError::ExitTimeout(pid, timeout));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Whether `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks for the process's existence.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}
