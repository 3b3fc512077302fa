//! Shared helpers of the CLI test binaries: a private run directory per test and the `ferry`
//! binary pointed at it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Output;

use ferry_testkit::Ferry;

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

    /// The `ferry` CLI with this test's environment.
    pub fn cli(&self) -> Ferry {
        Ferry::new(
            env!("CARGO_BIN_EXE_ferry"),
            self.vars()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    }

    /// Runs `ferry` with this test's run directory; a command that takes over 5 minutes is
    /// killed and fails the test (a hang must not stall the suite).
    pub fn ferry(&self, args: &[&str]) -> Output {
        self.ferry_env(args, &[])
    }

    /// [`Env::ferry`] with extra environment variables (a worker started by it inherits them).
    pub fn ferry_env(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
        let mut cli = self.cli();
        cli.env
            .extend(extra.iter().map(|(k, v)| (k.to_string(), v.into())));
        cli.run(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs ferry, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.cli().ok(args)
    }

    /// Runs ferry, asserts failure without a panic, returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        self.cli().fails(args)
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        self.cli().json(args)
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
            if let Some(to) = ferry_testkit::keep_logs(&self.dir, "failed-tests") {
                eprintln!("logs of the failed test kept in {}", to.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The dirtier's `beat <n> ok|BAD` lines: (counter, memory intact), and waiting for them.
#[allow(unused_imports)] // not every test binary uses every helper
pub use ferry_testkit::console::{beats_in, wait_beats};
#[allow(unused_imports)]
pub use ferry_testkit::{bad_lines, beats};
