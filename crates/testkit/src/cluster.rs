//! A local cluster for tests and the soak: one etcd, and per host a `ferryd` process on
//! 127.0.0.1 with its own run directory, all sharing one directory as their shared storage.
//! Each host reaches etcd through its own [`Proxy`], so a test can cut one host off the store
//! (a partition) while the others keep it; a host can be killed, restarted or frozen
//! (SIGSTOP). Its methods panic with the cluster's state and the agents' last log lines when
//! something does not happen in time (they are test assertions).
#![allow(missing_docs)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_cluster::peer::{self, Method};
use ferry_store::local_etcd::LocalEtcd;
use serde_json::Value;

/// Where the binaries under test are (a test binary knows them as `CARGO_BIN_EXE_*`).
#[derive(Clone, Debug)]
pub struct Bins {
    /// `ferry`.
    pub ferry: PathBuf,
    /// `ferryd`.
    pub ferryd: PathBuf,
    /// `ferry-vm`.
    pub ferry_vm: PathBuf,
}

/// The [`Bins`] of the calling test binary of the `ferry` crate (its `CARGO_BIN_EXE_*`, which
/// only a test of the crate that builds the binaries knows).
#[macro_export]
macro_rules! bins {
    () => {
        $crate::cluster::Bins {
            ferry: env!("CARGO_BIN_EXE_ferry").into(),
            ferryd: env!("CARGO_BIN_EXE_ferryd").into(),
            ferry_vm: env!("CARGO_BIN_EXE_ferry-vm").into(),
        }
    };
}

impl Bins {
    /// The three binaries in directory `dir` (`target/debug`, `target/release`).
    pub fn in_dir(dir: &std::path::Path) -> Bins {
        Bins {
            ferry: dir.join("ferry"),
            ferryd: dir.join("ferryd"),
            ferry_vm: dir.join("ferry-vm"),
        }
    }
}

pub const TOKEN: &str = "test-token-0123456789abcdef";

pub struct Host {
    pub name: String,
    pub api: String,
    pub config: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    /// Extra environment of its ferryd (and so of its workers).
    pub env: Vec<(String, String)>,
    /// Its agent is stopped (SIGSTOP): its API does not answer.
    pub frozen: bool,
}

pub struct Cluster {
    pub dir: PathBuf,
    pub rt: tokio::runtime::Runtime,
    pub etcd: Option<LocalEtcd>,
    pub hosts: Vec<Host>,
    /// etcd as each host reaches it: through a proxy the test can cut (a partition).
    pub proxies: HashMap<String, Proxy>,
    /// The binaries it runs.
    pub bins: Bins,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP forwarder from a local port to etcd; `cut` drops every connection and refuses new
/// ones, as a failed link would.
pub struct Proxy {
    pub port: u16,
    pub cut: Arc<AtomicBool>,
}

impl Proxy {
    pub fn new(target: String) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let c = cut.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(a) = s else { continue };
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(b) = TcpStream::connect(&target) else {
                    continue;
                };
                for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)]
                {
                    let c = c.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        from.set_read_timeout(Some(Duration::from_millis(200))).ok();
                        loop {
                            if c.load(Ordering::SeqCst) {
                                let _ = from.shutdown(std::net::Shutdown::Both);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => {
                                    let _ = to.shutdown(std::net::Shutdown::Write);
                                    return;
                                }
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
            }
        });
        Proxy { port, cut }
    }
}

impl Cluster {
    /// `n` hosts h1..hN on one etcd; `limits` is the TOML of the `[limits]` table.
    pub fn new(bins: &Bins, name: &str, n: usize, limits: &str) -> Cluster {
        Cluster::with_env(bins, name, n, limits, &[])
    }

    /// [`Cluster::new`] with extra environment variables for some hosts' agents.
    pub fn with_env(
        bins: &Bins,
        name: &str,
        n: usize,
        limits: &str,
        env: &[(&str, &str, &str)],
    ) -> Cluster {
        Cluster::with_ttl(bins, name, n, limits, env, 3)
    }

    /// [`Cluster::with_env`] with a lease TTL of `ttl_s` seconds (3 elsewhere: fast failure
    /// detection; longer where everything runs slowly, as in a lab host).
    pub fn with_ttl(
        bins: &Bins,
        name: &str,
        n: usize,
        limits: &str,
        env: &[(&str, &str, &str)],
        ttl_s: u32,
    ) -> Cluster {
        Cluster::build(bins, name, n, "", limits, env, ttl_s)
    }

    /// [`Cluster::new`] with top-level keys for every host's config (`vm_cores = 1`, ...).
    pub fn with_host_keys(bins: &Bins, name: &str, n: usize, top: &str, tables: &str) -> Cluster {
        Cluster::build(bins, name, n, top, tables, &[], 3)
    }

    fn build(
        bins: &Bins,
        name: &str,
        n: usize,
        top: &str,
        limits: &str,
        env: &[(&str, &str, &str)],
        ttl_s: u32,
    ) -> Cluster {
        let dir = std::env::temp_dir().join(format!("ferry-cluster-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("shared")).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let etcd = rt.block_on(LocalEtcd::start(&dir.join("etcd"))).unwrap();
        std::fs::write(dir.join("token"), TOKEN).unwrap();
        let pki = dir.join("pki");
        let o = Command::new(&bins.ferry)
            .args(["pki", "init", pki.to_str().unwrap(), "--host", "cluster"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let mut c = Cluster {
            dir,
            rt,
            etcd: Some(etcd),
            hosts: Vec::new(),
            proxies: HashMap::new(),
            bins: bins.clone(),
        };
        for i in 1..=n {
            let h = format!("h{i}");
            let proxy = Proxy::new(
                c.etcd
                    .as_ref()
                    .unwrap()
                    .endpoint()
                    .trim_start_matches("http://")
                    .to_string(),
            );
            let port = free_port();
            let config = c.dir.join(format!("{h}.toml"));
            std::fs::write(
                &config,
                format!(
                    r#"host = "{h}"
listen = "127.0.0.1:{port}"
migration_ip = "127.0.0.1"
shared_dir = "{shared}"
run_dir = "{run}"
token_file = "{token}"
pki_dir = "{pki}"
lease_ttl_s = {ttl_s}
{top}

[store]
kind = "etcd"
endpoints = ["http://127.0.0.1:{proxy}"]

[limits]
{limits}
{drivers}"#,
                    drivers = power_drivers(&c.dir, n),
                    shared = c.dir.join("shared").display(),
                    run = c.dir.join(format!("run-{h}")).display(),
                    token = c.dir.join("token").display(),
                    pki = pki.display(),
                    proxy = proxy.port,
                ),
            )
            .unwrap();
            c.proxies.insert(h.clone(), proxy);
            let host_env: Vec<(String, String)> = env
                .iter()
                .filter(|(host, _, _)| *host == h)
                .map(|(_, k, v)| (k.to_string(), v.to_string()))
                .collect();
            c.write_power_driver(&h, &config, &host_env);
            c.hosts.push(Host {
                name: h.clone(),
                api: format!("http://127.0.0.1:{port}"),
                log: c.dir.join(format!("{h}.log")),
                config,
                child: None,
                env: host_env,
                frozen: false,
            });
            c.start_host(&h);
        }
        c.wait_until(
            "every host joined and one coordinates",
            Duration::from_secs(60),
            |c| {
                let s = c.api_get("/v1/cluster");
                s["hosts"] == n && s["coordinator"].is_string()
            },
        );
        c
    }

    /// Where host `h`'s ferryd records its pid (whoever started it: the test or the power
    /// driver).
    pub fn pid_file(&self, h: &str) -> PathBuf {
        self.dir.join(format!("{h}.pid"))
    }

    /// Host `h`'s power driver, `power-h.sh on|off`: the command line [`Cluster::start_host`]
    /// runs, detached (it is started by the coordinator's ferryd), or a SIGTERM (the agent
    /// leaves the cluster: its lease is revoked, as a host switched off loses it).
    fn write_power_driver(&self, h: &str, config: &std::path::Path, env: &[(String, String)]) {
        let mut envs = format!(
            "FERRY_VM_BIN='{}' FERRY_LOG=info",
            self.bins.ferry_vm.display()
        );
        for (k, v) in env {
            envs.push_str(&format!(" {k}='{v}'"));
        }
        let script = format!(
            r#"#!/bin/sh
# Power driver of test cluster host {h}: on | off.
set -e
pid_file='{pid}'
case "$1" in
on)
    {envs} setsid '{ferryd}' --config '{config}' </dev/null >/dev/null 2>>'{log}' &
    echo $! > "$pid_file"
    ;;
off)
    kill -TERM "$(cat "$pid_file")"
    ;;
*)
    echo "usage: $0 on|off" >&2
    exit 2
    ;;
esac
"#,
            pid = self.pid_file(h).display(),
            ferryd = self.bins.ferryd.display(),
            config = config.display(),
            log = self.dir.join(format!("{h}.log")).display(),
        );
        std::fs::write(self.dir.join(format!("power-{h}.sh")), script).unwrap();
    }

    pub fn host(&mut self, h: &str) -> &mut Host {
        self.hosts.iter_mut().find(|x| x.name == h).unwrap()
    }

    pub fn start_host(&mut self, h: &str) {
        let ferryd = self.bins.ferryd.clone();
        let worker = self.bins.ferry_vm.clone();
        let host = self.host(h);
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&host.log)
            .unwrap();
        let child = Command::new(ferryd)
            .arg("--config")
            .arg(&host.config)
            .env("FERRY_VM_BIN", worker)
            .env("FERRY_LOG", "info")
            .envs(host.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id();
        host.child = Some(child);
        std::fs::write(self.pid_file(h), pid.to_string()).unwrap();
    }

    /// SIGKILLs host `h`'s agent (its workers follow it: they watch it).
    pub fn kill_host(&mut self, h: &str) {
        let _ = std::fs::remove_file(self.pid_file(h));
        let host = self.host(h);
        if let Some(mut c) = host.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) host `h`'s agent; its workers go on.
    pub fn freeze_host(&mut self, h: &str, frozen: bool) {
        let host = self.host(h);
        let pid = host.child.as_ref().unwrap().id() as i32;
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: signalling a child of this test.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
        host.frozen = frozen;
    }

    /// An API on a live host.
    pub fn api(&self) -> String {
        self.hosts
            .iter()
            .find(|h| h.child.is_some() && !h.frozen && self.agent_alive(&h.name))
            .map(|h| h.api.clone())
            .unwrap()
    }

    /// Whether host `h`'s ferryd runs (a power driver may have stopped it).
    pub fn agent_alive(&self, h: &str) -> bool {
        let pid = std::fs::read_to_string(self.pid_file(h))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        // A stopped child of this test is a zombie until reaped: its state in /proc says so.
        pid.is_some_and(|p| {
            // SAFETY: signal 0 only checks that the process exists.
            let exists = unsafe { libc::kill(p, 0) } == 0;
            exists
                && !std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                    s.rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('Z'))
                })
        })
    }

    pub fn ferry_at(&self, api: &str, args: &[&str]) -> Output {
        Command::new(&self.bins.ferry)
            .args(args)
            .env("FERRY_API", api)
            .env("FERRY_TOKEN_FILE", self.dir.join("token"))
            .output()
            .unwrap()
    }

    /// `ferry ... --output json` against a live host; asserts success.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let mut o = self.ferry_at(&self.api(), &a);
        // A host leaving (a power driver stopping it) refuses connections before its process
        // is gone: nothing reached it, so asking another host is safe. One stopped while it
        // answered resets the connection: asking again is safe only for a question.
        let question = matches!(
            args,
            [.., "list"] | [.., "show", _] | ["cluster", "power"] | ["report", ..]
        );
        for _ in 0..20 {
            let retry = [&o.stdout, &o.stderr].iter().any(|b| {
                let b = String::from_utf8_lossy(b);
                b.contains("Connection refused") || (question && b.contains("Connection reset"))
            });
            if o.status.success() || !retry {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
            o = self.ferry_at(&self.api(), &a);
        }
        assert!(
            o.status.success(),
            "ferry {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// `ferry ...` that must fail; its error.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.ferry_at(&self.api(), args);
        assert!(!o.status.success(), "ferry {args:?} unexpectedly succeeded");
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!e.contains("panicked"), "{e}");
        e
    }

    pub fn api_get(&self, path: &str) -> Value {
        peer::call(&format!("{}{path}", self.api()), TOKEN, Method::Get, None)
            .unwrap_or(Value::Null)
    }

    pub fn wait_until(&self, what: &str, timeout: Duration, cond: impl Fn(&Cluster) -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond(self) {
            if Instant::now() > deadline {
                panic!(
                    "not within {timeout:?}: {what}\nvms: {}\nmigrations: {}\n{}",
                    self.api_get("/v1/vms"),
                    self.api_get("/v1/migrations"),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every line every host's agent logged, in host order.
    pub fn all_logs(&self) -> String {
        self.hosts
            .iter()
            .map(|h| std::fs::read_to_string(&h.log).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The last lines of every host's log (for a failure's message).
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for h in &self.hosts {
            let t = std::fs::read_to_string(&h.log).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            s.push_str(&format!("--- {} (last lines)\n", h.name));
            for l in &lines[lines.len().saturating_sub(25)..] {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    pub fn console(&self, vm: &str) -> PathBuf {
        self.dir.join("shared/consoles").join(format!("{vm}.log"))
    }

    pub fn vm(&self, name: &str) -> Value {
        self.api_get(&format!("/v1/vms/{name}"))
    }

    /// Creates a dirtier VM and waits until it runs and beats.
    pub fn create(&self, name: &str, extra: &[&str]) -> String {
        self.define(name, extra);
        self.wait_until(&format!("{name} running"), Duration::from_secs(60), |c| {
            c.vm(name)["state"] == "running"
        });
        crate::console::wait_beats(&self.console(name), 3);
        self.vm(name)["host"].as_str().unwrap().to_string()
    }

    /// Defines a dirtier VM (the cluster starts it).
    pub fn define(&self, name: &str, extra: &[&str]) {
        let k = crate::dirtier();
        let mut args = dirtier_create(name, k.to_str().unwrap());
        // The caller's memory size and guest parameters replace the default ones.
        for flag in ["--cmdline", "--memory"] {
            if extra.contains(&flag) {
                if let Some(i) = args.iter().position(|a| *a == flag) {
                    args.drain(i..(i + 2).min(args.len()));
                }
            }
        }
        args.extend(extra);
        self.json(&args);
    }

    /// Every worker process of VM `name` on any host: (host, pid).
    pub fn workers_of(&self, name: &str) -> Vec<(String, u32)> {
        self.worker_states(name)
            .into_iter()
            .map(|(h, pid, _)| (h, pid))
            .collect()
    }

    /// Every live worker of VM `name` on any host: (host, pid, state as the worker reports
    /// it: `running`, `paused`, `receiving`, …). A worker is alive when its control socket
    /// answers.
    pub fn worker_states(&self, name: &str) -> Vec<(String, u32, String)> {
        let mut out = Vec::new();
        for h in &self.hosts {
            let sock = self
                .dir
                .join(format!("run-{}", h.name))
                .join("vms")
                .join(name)
                .join("control.sock");
            if !sock.exists() {
                continue;
            }
            if let Ok(r) = ferry_worker::server::call_socket(&sock, &ferry_worker::Request::Status)
            {
                let v = r.result.unwrap_or_default();
                if let Some(pid) = v["pid"].as_u64() {
                    let state = v["state"].as_str().unwrap_or("?").to_string();
                    out.push((h.name.clone(), pid as u32, state));
                }
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut reaped = Vec::new();
        for h in &mut self.hosts {
            if let Some(mut c) = h.child.take() {
                reaped.push(c.id() as i32);
                if h.frozen {
                    // SAFETY: signalling a child of this test.
                    unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
                }
                // SIGTERM: the agent stops its VMs and leaves.
                // SAFETY: signalling a child of this test.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(10);
                while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Agents a power driver started (not children of this test).
        for h in &self.hosts {
            let pid = std::fs::read_to_string(self.pid_file(&h.name))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
            let Some(pid) = pid.filter(|p| *p > 0 && !reaped.contains(p)) else {
                continue;
            };
            // SAFETY: signalling an agent this test's cluster started.
            if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            // SAFETY: signal 0 only checks that the process exists.
            while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        drop(self.etcd.take());
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The test cluster's power drivers, the same table in every host's config (the coordinator
/// runs them): `power-hN.sh on|off` stops and starts host hN's ferryd.
fn power_drivers(dir: &std::path::Path, n: usize) -> String {
    let mut t = String::new();
    for i in 1..=n {
        let script = dir.join(format!("power-h{i}.sh"));
        t.push_str(&format!(
            "\n[power.hosts.h{i}]\non = \"sh {s} on\"\noff = \"sh {s} off\"\n",
            s = script.display()
        ));
    }
    t
}

/// `ferry vm create NAME` for a small dirtier VM (16 MiB, 4 MiB rewritten, a beat every 100 ms).
pub fn dirtier_create<'a>(name: &'a str, kernel: &'a str) -> Vec<&'a str> {
    vec![
        "vm",
        "create",
        name,
        "--kernel",
        kernel,
        "--memory",
        "16M",
        "--cmdline",
        "mb=4 rate=2000 beat_ms=100",
    ]
}
