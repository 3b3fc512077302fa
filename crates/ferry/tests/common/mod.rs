//! Shared helpers of the CLI test binaries: a private run directory per test and the `ferry`
//! binary pointed at it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// One test's run directory; VMs left running are stopped on drop.
pub struct Env {
    pub dir: PathBuf,
}

impl Env {
    pub fn new(name: &str) -> Env {
        let dir = std::env::temp_dir().join(format!("ferry-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("run")).unwrap();
        let env = Env { dir };
        // One cluster CA and identity per test: migrations run over mutual TLS, as in
        // production.
        env.ok(&["pki", "init", env.pki().to_str().unwrap(), "--host", "test"]);
        env
    }

    /// This test's TLS identity directory.
    pub fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// The environment every `ferry` of this test runs with.
    pub fn vars(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        vec![
            ("FERRY_RUN_DIR", self.dir.join("run").into_os_string()),
            ("FERRY_VM_BIN", env!("CARGO_BIN_EXE_ferry-vm").into()),
            ("FERRY_PKI_DIR", self.pki().into_os_string()),
        ]
    }

    /// Runs `ferry` with this test's run directory; a command that takes over 5 minutes is
    /// killed and fails the test (a hang must not stall the suite).
    pub fn ferry(&self, args: &[&str]) -> Output {
        self.ferry_env(args, &[])
    }

    /// [`Env::ferry`] with extra environment variables (a worker started by it inherits them).
    pub fn ferry_env(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .envs(self.vars())
            .envs(extra.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(300);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ferry {args:?} did not finish within 300 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().unwrap()
    }

    /// Runs ferry, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.ferry(args);
        // With `--output json` the error is a JSON object on stdout: show both.
        assert!(
            o.status.success(),
            "ferry {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs ferry, asserts failure without a panic, returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.ferry(args);
        assert!(!o.status.success(), "ferry {args:?} unexpectedly succeeded");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!err.contains("panicked"), "{err}");
        err
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    pub fn console(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.console"))
    }

    /// The consoles of a VM before and after a move, joined: one guest's output, with a line
    /// cut by the move whole again.
    pub fn joined_consoles(&self, a: &str, b: &str) -> String {
        let mut text = std::fs::read_to_string(self.console(a)).unwrap_or_default();
        text.push_str(&std::fs::read_to_string(self.console(b)).unwrap_or_default());
        text
    }

    /// `ferry vm restore STATE --name NAME`, its console in this environment.
    #[allow(dead_code)] // not every test binary restores
    pub fn restore_as(&self, state: &std::path::Path, name: &str) {
        self.ok(&[
            "vm",
            "restore",
            state.to_str().unwrap(),
            "--name",
            name,
            "--console-log",
            self.console(name).to_str().unwrap(),
        ]);
    }

    /// `ferry vm receive NAME --listen LISTEN`; returns the address it listens on.
    #[allow(dead_code)] // not every test binary migrates
    pub fn receive(&self, name: &str, listen: &str) -> String {
        let c = self.console(name);
        let v = self.json(&[
            "vm",
            "receive",
            name,
            "--listen",
            listen,
            "--console-log",
            c.to_str().unwrap(),
        ]);
        v["listen"].as_str().unwrap().to_string()
    }

    pub fn names(&self) -> Vec<String> {
        let v = self.json(&["vm", "list"]);
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for n in self.names() {
            let _ = self.ferry(&["vm", "stop", &n]);
        }
        if std::thread::panicking() {
            self.keep_logs();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Env {
    /// A failed test's consoles and worker logs, copied to `target/failed-tests/<dir>/` in the
    /// workspace, which outlives the test's temporary directory (and a lab host's /tmp).
    fn keep_logs(&self) {
        let Some(name) = self.dir.file_name() else {
            return;
        };
        let to = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/failed-tests")
            .join(name);
        let mut stack = vec![self.dir.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "log" || x == "console") {
                    let rel = p.strip_prefix(&self.dir).unwrap_or(&p);
                    let dst = to.join(rel);
                    if let Some(parent) = dst.parent() {
                        let _ = std::fs::create_dir_all(parent);
                    }
                    let _ = std::fs::copy(&p, &dst);
                }
            }
        }
        eprintln!("logs of the failed test kept in {}", to.display());
    }
}

/// The dirtier's `beat <n> ok|BAD` lines: (counter, memory intact).
#[allow(unused_imports)] // not every test binary reports bad lines
pub use ferry_guests::{bad_lines, beats};

/// Waits (up to 120 s) until `log` holds `count` beats.
pub fn wait_beats(log: &std::path::Path, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while beats(&std::fs::read_to_string(log).unwrap_or_default()).len() < count {
        assert!(
            Instant::now() < deadline,
            "fewer than {count} beats in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
