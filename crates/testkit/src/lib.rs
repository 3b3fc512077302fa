//! Ferry's test kit, dev-only: what the tests, the soak, the benchmarks and xtask share, so that
//! each exists once.
//!
//! - [`tmpdir`]: a fresh temporary directory per test and process.
//! - [`console`]: the guests' console lines (beats and ticks) and waiting for them, failing at
//!   once on a guest that reports damaged memory.
//! - [`Ferry`]: the `ferry` CLI with a given environment, with a time limit, as text or JSON.
//! - [`diag`]: what a worker's threads are doing, for the message of a guest that went silent.
//! - `cluster` (feature `cluster`): a local cluster of `ferryd` processes on one etcd, each
//!   host's store link behind a proxy that can be cut.
//!
//! The helpers named `assert_*` and the [`Ferry`] methods `ok`/`json`/`fails` panic with a
//! message (they are for tests); everything else returns [`KitError`].
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

#[cfg(feature = "cluster")]
pub mod cluster;
pub mod console;
pub mod diag;

pub use ferry_guests::{bad_lines, beats, dirtier, whole_lines};

/// Why a kit helper failed.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// A condition did not come true in time.
    #[error("not within {timeout:?}: {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        timeout: Duration,
    },
    /// The guest reported damaged memory.
    #[error("the guest reports damaged memory: {0}")]
    Damaged(String),
    /// A command failed.
    #[error("{cmd} failed: {output}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its stderr and stdout.
        output: String,
    },
    /// A command's output was not the JSON expected.
    #[error("{cmd}: bad JSON: {source}")]
    Json {
        /// The command line.
        cmd: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// I/O.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// A fresh directory `<tmp>/ferry-<kind>-<name>-<pid>` (an old one of the same name removed).
pub fn tmpdir(kind: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-{kind}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    if let Err(e) = std::fs::create_dir_all(&d) {
        panic!("cannot create {}: {e}", d.display());
    }
    d
}

/// The workspace's `target/` directory (for logs kept after a failure).
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target")
}

/// The `ferry` CLI, run with a fixed environment (a run directory, a cluster API, a token).
#[derive(Clone, Debug)]
pub struct Ferry {
    /// The binary.
    pub bin: PathBuf,
    /// Its environment (added to this process's).
    pub env: Vec<(String, std::ffi::OsString)>,
    /// A command taking longer is killed (a hang must not stall a suite).
    pub timeout: Duration,
}

impl Ferry {
    /// `bin` with `env`, a 300 s limit per command.
    pub fn new(bin: impl Into<PathBuf>, env: Vec<(String, std::ffi::OsString)>) -> Ferry {
        Ferry {
            bin: bin.into(),
            env,
            timeout: Duration::from_secs(300),
        }
    }

    fn line(&self, args: &[&str]) -> String {
        format!("ferry {}", args.join(" "))
    }

    /// Runs it; its output whatever the exit status.
    pub fn run(&self, args: &[&str]) -> Result<Output, KitError> {
        let cmd = self.line(args);
        let mut child = Command::new(&self.bin)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| KitError::Io(format!("cannot run {cmd}"), e))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(KitError::Timeout {
                        what: cmd,
                        timeout: self.timeout,
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(KitError::Io(format!("waiting for {cmd}"), e)),
            }
        }
        child
            .wait_with_output()
            .map_err(|e| KitError::Io(format!("reading {cmd}"), e))
    }

    /// Runs it and wants success: its stdout.
    pub fn try_ok(&self, args: &[&str]) -> Result<String, KitError> {
        let o = self.run(args)?;
        if !o.status.success() {
            // With `--output json` the error is a JSON object on stdout: keep both.
            return Err(KitError::Command {
                cmd: self.line(args),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stderr),
                    String::from_utf8_lossy(&o.stdout)
                ),
            });
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Runs it with `--output json` and wants success: the JSON.
    pub fn try_json(&self, args: &[&str]) -> Result<serde_json::Value, KitError> {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let out = self.try_ok(&a)?;
        serde_json::from_str(&out).map_err(|source| KitError::Json {
            cmd: self.line(args),
            source,
        })
    }

    /// [`Ferry::try_ok`], panicking on failure (tests).
    pub fn ok(&self, args: &[&str]) -> String {
        self.try_ok(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Ferry::try_json`], panicking on failure (tests).
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        self.try_json(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs it and wants a clean failure (no panic): its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !o.status.success(),
            "{} unexpectedly succeeded",
            self.line(args)
        );
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!err.contains("panicked"), "{err}");
        err
    }
}

/// Copies the `*.log` and `*.console` files under `dir` to `target/<kind>/<dir's name>/`, which
/// outlives a temporary directory (and a lab host's /tmp); where they went.
pub fn keep_logs(dir: &Path, kind: &str) -> Option<PathBuf> {
    let to = target_dir().join(kind).join(dir.file_name()?);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "log" || x == "console") {
                let rel = p.strip_prefix(dir).unwrap_or(&p);
                let dst = to.join(rel);
                if let Some(parent) = dst.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                let _ = std::fs::copy(&p, &dst);
            }
        }
    }
    Some(to)
}
