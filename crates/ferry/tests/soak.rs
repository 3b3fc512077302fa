//! The soak (`cargo xtask soak [--migrations N] [--seed S]`; ignored by the plain test run):
//! a local cluster of three hosts on a real etcd, two highly available dirtier VMs that check
//! their own memory every beat, and migrations back and forth in every mode the cluster takes
//! (1–4 connections, no compression, LZ4 or zstd, auto-converge, quick), always over mutual
//! TLS. Most migrations get a fault, injected at a chosen phase: the source or destination
//! worker or agent killed, an agent frozen past its lease, a host cut off the store, etcd
//! restarted, the migration cancelled, a page frame corrupted. A fault is placed exactly by
//! holding the worker at a named point of the protocol (`FERRY_FAULT_FILE`, see
//! `migration::fault`), or at a random instant.
//!
//! After every step the cluster is healed (agents restarted, links back) and each VM must
//! run in exactly one place with its memory intact. What is counted:
//! - `lost`: a VM that runs nowhere 60 s after healing;
//! - `twice`: two copies of one VM running at once, seen either in the workers' states (two
//!   `running` at one sample) or in the console (both copies print into the same log, so the
//!   beat counter repeats or goes back without a reboot);
//! - `damaged`: a beat that found its memory changed (`beat N BAD …`);
//! - `stuck`: a migration that did not end within 90 s, or a VM that stops beating.
//!
//! It ends with `soak: N migrations, F faults, lost=0 twice=0 damaged=0 stuck=0` and writes
//! the fault matrix (fault × phase → outcomes) to `target/soak/matrix.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_cluster::peer::{self, Method};
use ferry_testkit::cluster::{Bins, Cluster, TOKEN};
use ferry_testkit::console::{beats_in, wait_beats};
use ferry_testkit::{bad_lines, beats};
use migration::protocol::Compression;
use migration::MigrateOptions;
use serde_json::{json, Value};

fn bins() -> Bins {
    ferry_testkit::bins!()
}

/// xorshift64*: the soak's choices, reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    None,
    Cancel,
    KillSourceWorker,
    KillDestWorker,
    KillSourceAgent,
    KillDestAgent,
    FreezeSourceAgent,
    FreezeDestAgent,
    CutSourceStore,
    CutDestStore,
    RestartEtcd,
    CorruptFrame,
}

const FAULTS: &[Fault] = &[
    Fault::None,
    Fault::Cancel,
    Fault::KillSourceWorker,
    Fault::KillDestWorker,
    Fault::KillSourceAgent,
    Fault::KillDestAgent,
    Fault::FreezeSourceAgent,
    Fault::FreezeDestAgent,
    Fault::CutSourceStore,
    Fault::CutDestStore,
    Fault::RestartEtcd,
    Fault::CorruptFrame,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::Cancel => "cancel",
            Fault::KillSourceWorker => "kill source worker",
            Fault::KillDestWorker => "kill destination worker",
            Fault::KillSourceAgent => "kill source agent",
            Fault::KillDestAgent => "kill destination agent",
            Fault::FreezeSourceAgent => "freeze source agent",
            Fault::FreezeDestAgent => "freeze destination agent",
            Fault::CutSourceStore => "cut source from store",
            Fault::CutDestStore => "cut destination from store",
            Fault::RestartEtcd => "restart etcd",
            Fault::CorruptFrame => "corrupt a page frame",
        }
    }
}

/// Where a fault is injected: at a hold point of the protocol (on the source, or `dest-…` on
/// the destination), or after a random delay.
const PHASES: &[&str] = &[
    "setup",
    "precopy",
    "stop-and-copy",
    "ready",
    "gated",
    "dest-committed",
    "random",
];

/// What one step's outcome looked like.
#[derive(Default)]
struct Tally {
    migrations: usize,
    faults: usize,
    lost: usize,
    twice: usize,
    damaged: usize,
    stuck: usize,
    /// fault → phase → outcome → count.
    matrix: BTreeMap<&'static str, BTreeMap<String, BTreeMap<String, usize>>>,
    problems: Vec<String>,
}

impl Tally {
    /// Records a problem, printed at once so that an interrupted soak still tells.
    fn problem(&mut self, p: String) {
        eprintln!("soak: PROBLEM {p}");
        self.problems.push(p);
    }
}

struct Soak {
    c: Cluster,
    /// Per host: the fault file its workers read, and the mark a held worker creates.
    fault_file: BTreeMap<String, PathBuf>,
    mark: BTreeMap<String, PathBuf>,
    /// Per VM: how many beats of its console were already judged.
    judged: BTreeMap<String, usize>,
}

impl Soak {
    fn api_call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        peer::call(&format!("{}{path}", self.c.api()), TOKEN, method, body)
            .map_err(|e| e.to_string())
    }

    fn host_of(&self, vm: &str) -> Option<String> {
        self.c.vm(vm)["host"].as_str().map(str::to_string)
    }

    fn migration(&self, id: u64) -> Value {
        self.api_call(Method::Get, &format!("/v1/migrations/{id}"), None)
            .unwrap_or(Value::Null)
    }

    fn arm(&self, host: &str, setting: &str) {
        std::fs::write(&self.fault_file[host], setting).unwrap();
    }

    fn disarm_all(&self) {
        for (h, f) in &self.fault_file {
            let _ = std::fs::remove_file(f);
            let _ = std::fs::remove_file(&self.mark[h]);
        }
    }

    fn worker_pid(&self, vm: &str, host: &str) -> Option<u32> {
        self.c
            .worker_states(vm)
            .into_iter()
            .find(|(h, _, _)| h == host)
            .map(|(_, p, _)| p)
    }

    /// Injects `f` for a migration of `vm` from `from` to `to`; what to heal afterwards.
    fn inject(&mut self, f: Fault, vm: &str, id: u64, from: &str, to: &str) -> Vec<Heal> {
        let kill = |pid: Option<u32>| {
            if let Some(p) = pid {
                // SAFETY: signalling a worker of this soak's cluster.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
        };
        match f {
            Fault::None | Fault::CorruptFrame => vec![],
            Fault::Cancel => {
                let _ = self.api_call(Method::Post, &format!("/v1/migrations/{id}/cancel"), None);
                vec![]
            }
            Fault::KillSourceWorker => {
                kill(self.worker_pid(vm, from));
                vec![]
            }
            Fault::KillDestWorker => {
                kill(self.worker_pid(vm, to));
                vec![]
            }
            Fault::KillSourceAgent | Fault::KillDestAgent => {
                let h = if f == Fault::KillSourceAgent {
                    from
                } else {
                    to
                };
                self.c.kill_host(h);
                vec![Heal::Start(h.to_string())]
            }
            Fault::FreezeSourceAgent | Fault::FreezeDestAgent => {
                let h = if f == Fault::FreezeSourceAgent {
                    from
                } else {
                    to
                };
                self.c.freeze_host(h, true);
                vec![Heal::Thaw(h.to_string())]
            }
            Fault::CutSourceStore | Fault::CutDestStore => {
                let h = if f == Fault::CutSourceStore { from } else { to };
                self.c.proxies[h].cut.store(true, Ordering::SeqCst);
                vec![Heal::Reconnect(h.to_string())]
            }
            Fault::RestartEtcd => {
                if let Some(mut e) = self.c.etcd.take() {
                    if let Err(err) = self.c.rt.block_on(e.restart()) {
                        panic!("etcd did not restart: {err}");
                    }
                    self.c.etcd = Some(e);
                }
                vec![]
            }
        }
    }

    /// Judges `vm`'s console since the last step: damage, and a counter that repeats or goes
    /// back without a reboot (two copies printing). Whether the guest rebooted in the step.
    fn judge_console(&mut self, vm: &str, t: &mut Tally) -> bool {
        let log = self.c.console(vm);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let all = beats(&text);
        let from = self.judged.get(vm).copied().unwrap_or(0);
        let new = &all[from.saturating_sub(1).min(all.len())..];
        let mut rebooted = false;
        for w in new.windows(2) {
            if w[1].0 == w[0].0 + 1 {
                continue;
            }
            if w[1].0 <= 1 {
                rebooted = true; // a fresh boot (an HA restart) starts its counter again
                continue;
            }
            t.twice += 1;
            t.problem(format!("{vm}: beat {} followed by beat {}", w[0].0, w[1].0));
        }
        let bad = bad_lines(&text);
        if new.iter().any(|b| !b.1) {
            t.damaged += 1;
            t.problem(format!("{vm}: damaged memory: {bad:?}"));
        }
        self.judged.insert(vm.to_string(), all.len());
        rebooted
    }
}

enum Heal {
    Start(String),
    Thaw(String),
    Reconnect(String),
}

fn options(rng: &mut Rng) -> MigrateOptions {
    MigrateOptions {
        connections: 1 + rng.below(4) as u8,
        compression: *rng.pick(&[Compression::None, Compression::Lz4, Compression::Zstd]),
        auto_converge: rng.below(2) == 0,
        quick: rng.below(8) == 0,
        ..MigrateOptions::default()
    }
}

fn mode(o: &MigrateOptions) -> String {
    format!(
        "{}{} ×{} {:?}",
        if o.quick { "quick" } else { "live" },
        if o.auto_converge {
            " auto-converge"
        } else {
            ""
        },
        o.connections,
        o.compression,
    )
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "the soak: cargo xtask soak"]
fn soak() {
    let migrations = setting("FERRY_SOAK_MIGRATIONS", 30) as usize;
    let seed = setting("FERRY_SOAK_SEED", 1).max(1);
    let fdir = ferry_testkit::tmpdir("soak", "faults");
    let hosts = ["h1", "h2", "h3"];
    let env: Vec<(String, String, String)> = hosts
        .iter()
        .flat_map(|h| {
            [
                (
                    h.to_string(),
                    "FERRY_FAULT_FILE".to_string(),
                    fdir.join(format!("fault-{h}")).display().to_string(),
                ),
                (
                    h.to_string(),
                    "FERRY_FAULT_MARK".to_string(),
                    fdir.join(format!("mark-{h}")).display().to_string(),
                ),
            ]
        })
        .collect();
    let env_ref: Vec<(&str, &str, &str)> = env
        .iter()
        .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
        .collect();
    let c = Cluster::with_env(&bins(), "soak", hosts.len(), "", &env_ref);
    let mut s = Soak {
        fault_file: hosts
            .iter()
            .map(|h| (h.to_string(), fdir.join(format!("fault-{h}"))))
            .collect(),
        mark: hosts
            .iter()
            .map(|h| (h.to_string(), fdir.join(format!("mark-{h}"))))
            .collect(),
        c,
        judged: BTreeMap::new(),
    };
    let vms = ["s1", "s2"];
    for vm in vms {
        s.c.create(vm, &[]);
    }
    let mut rng = Rng(seed);
    let mut t = Tally::default();
    let started = Instant::now();

    // Two running copies of one VM, sampled all along.
    let stop = Arc::new(AtomicBool::new(false));
    let seen_twice = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let dir = s.c.dir.clone();
        let (stop, seen) = (Arc::clone(&stop), Arc::clone(&seen_twice));
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for vm in vms {
                    let running = hosts.iter().filter(|h| worker_running(&dir, h, vm)).count();
                    if running > 1 {
                        seen.fetch_add(1, Ordering::SeqCst);
                        eprintln!("soak: {vm} has {running} running workers");
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    for step in 0..migrations {
        let vm = *rng.pick(&vms);
        let Some(from) = s.host_of(vm) else {
            panic!("{vm} has no host before step {step}");
        };
        let others: Vec<&str> = hosts.iter().copied().filter(|h| *h != from).collect();
        let to = rng.pick(&others).to_string();
        let opts = options(&mut rng);
        let fault = if rng.below(4) == 0 {
            Fault::None
        } else {
            *rng.pick(FAULTS)
        };
        let phase = if fault == Fault::CorruptFrame {
            "stream"
        } else {
            *rng.pick(PHASES)
        };
        // Arm the hold (or the corruption) on the host that reaches that point.
        let holder = if phase.starts_with("dest-") {
            &to
        } else {
            &from
        };
        match phase {
            "stream" => s.arm(&from, "corrupt-batch:2"),
            "random" => {}
            p => s.arm(holder, &format!("hold:{p}")),
        }
        let m = s.api_call(
            Method::Post,
            &format!("/v1/vms/{vm}/migrate"),
            Some(json!({ "to": to, "options": opts })),
        );
        let id = match m {
            Ok(m) => m["id"].as_u64().unwrap_or(0),
            Err(e) => panic!("step {step}: cannot start the migration of {vm}: {e}"),
        };
        t.migrations += 1;
        // Wait for the phase: the hold's mark, or a random delay.
        let reached = match phase {
            "stream" => true,
            "random" => {
                std::thread::sleep(Duration::from_millis(rng.below(1500)));
                true
            }
            _ => {
                let mark = s.mark[holder.as_str()].clone();
                wait_until(Duration::from_secs(60), || {
                    mark.exists() || migration_done(&s.migration(id))
                });
                mark.exists()
            }
        };
        let mut heals = Vec::new();
        if reached && fault != Fault::None {
            t.faults += 1;
            heals = s.inject(fault, vm, id, &from, &to);
        }
        // Let the held worker go on, then heal after a while (a frozen agent or a cut link must
        // outlast the lease to matter). A cancel first has to reach the worker (its agent
        // reads the record every 300 ms): a hold that watches for it ends by itself, so the
        // hold stays until the migration ends or 10 s pass (the holds after the commit point
        // cannot be cancelled).
        if fault == Fault::Cancel && reached {
            wait_until(Duration::from_secs(10), || migration_done(&s.migration(id)));
        }
        // A corruption stays armed while the migration streams.
        if fault != Fault::CorruptFrame {
            s.disarm_all();
        }
        if !heals.is_empty() {
            std::thread::sleep(Duration::from_secs(5));
        }
        for h in heals {
            match h {
                Heal::Start(h) => s.c.start_host(&h),
                Heal::Thaw(h) => s.c.freeze_host(&h, false),
                Heal::Reconnect(h) => s.c.proxies[&h].cut.store(false, Ordering::SeqCst),
            }
        }
        // The whole cluster is back (every host joined, none fenced) before anything is
        // judged: an after-effect of this step's fault must not land in the next one.
        let whole = wait_until(Duration::from_secs(60), || {
            s.api_call(Method::Get, "/v1/hosts", None)
                .ok()
                .and_then(|v| v.as_array().cloned())
                .is_some_and(|hs| hs.len() == hosts.len() && hs.iter().all(|h| h["state"] == "up"))
        });
        if !whole {
            t.stuck += 1;
            t.problem(format!(
                "step {step}: the cluster did not come back whole in 60 s"
            ));
        }
        // The migration ends.
        let ended = wait_until(Duration::from_secs(90), || migration_done(&s.migration(id)));
        s.disarm_all();
        let record = s.migration(id);
        let state = record["state"].as_str().unwrap_or("?").to_string();
        if !ended {
            t.stuck += 1;
            t.problem(format!(
                "step {step}: migration {id} of {vm} still {state} after 90 s"
            ));
        }
        // Every VM runs in exactly one place and beats.
        let mut outcome = state.clone();
        for v in vms {
            let settled = wait_until(Duration::from_secs(60), || {
                s.c.vm(v)["state"] == "running"
                    && s.c
                        .worker_states(v)
                        .iter()
                        .filter(|w| w.2 == "running")
                        .count()
                        == 1
            });
            if !settled {
                t.lost += 1;
                t.problem(format!(
                    "step {step}: {v} not running in exactly one place 60 s after healing: {:?} {}",
                    s.c.worker_states(v),
                    s.c.vm(v)
                ));
                continue;
            }
            let log = s.c.console(v);
            let n = beats_in(&log).len();
            if ferry_testkit::console::try_wait_beats(&log, n + 2).is_err() {
                t.stuck += 1;
                t.problem(format!("step {step}: {v} runs but does not beat"));
            }
            let rebooted = s.judge_console(v, &mut t);
            if v == vm {
                let now = s.host_of(v).unwrap_or_default();
                let place = if now == to {
                    "moved"
                } else if now == from {
                    "stayed"
                } else {
                    "elsewhere"
                };
                outcome = format!(
                    "{state}, {place}{}",
                    if rebooted { ", rebooted (HA)" } else { "" }
                );
            }
        }
        eprintln!(
            "soak: step {step}: {vm} {from} -> {to} {} fault {} at {phase}{}: {outcome}",
            mode(&opts),
            fault.name(),
            if reached { "" } else { " (not reached)" }
        );
        let phase_key = if reached {
            phase.to_string()
        } else {
            format!("{phase} (not reached)")
        };
        *t.matrix
            .entry(fault.name())
            .or_default()
            .entry(phase_key)
            .or_default()
            .entry(outcome)
            .or_default() += 1;
        // The matrix so far: an interrupted soak leaves what it saw.
        let so_far = format!(
            "soak (still running, or interrupted): {} migrations, {} faults, lost={} twice={} damaged={} stuck={}",
            t.migrations, t.faults, t.lost, t.twice, t.damaged, t.stuck
        );
        write_matrix(&t, seed, started.elapsed(), &so_far);
    }
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    t.twice += seen_twice.load(Ordering::SeqCst);

    let line = format!(
        "soak: {} migrations, {} faults, lost={} twice={} damaged={} stuck={}",
        t.migrations, t.faults, t.lost, t.twice, t.damaged, t.stuck
    );
    write_matrix(&t, seed, started.elapsed(), &line);
    println!("{line}");
    assert!(
        t.lost + t.twice + t.damaged + t.stuck == 0,
        "{line}\n{}\n{}",
        t.problems.join("\n"),
        s.c.logs()
    );
    // The guests are intact at the end too.
    for vm in vms {
        let log = s.c.console(vm);
        let n = beats_in(&log).len();
        wait_beats(&log, n + 1);
    }
}

/// Whether VM `vm`'s worker on `host` (under the cluster's `dir`) is running its guest.
fn worker_running(dir: &Path, host: &str, vm: &str) -> bool {
    let sock = dir.join(format!("run-{host}/vms/{vm}/control.sock"));
    if !sock.exists() {
        return false;
    }
    ferry_worker::server::call_socket(&sock, &ferry_worker::Request::Status)
        .ok()
        .and_then(|r| r.result)
        .is_some_and(|v| v["state"] == "running")
}

fn migration_done(m: &Value) -> bool {
    matches!(
        m["state"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

/// Polls `cond` every 100 ms until it holds (true) or `timeout` passes (false).
fn wait_until(timeout: Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write_matrix(t: &Tally, seed: u64, took: Duration, line: &str) {
    let mut md = format!(
        "# Soak fault matrix\n\n`{line}`\n\nSeed {seed}, {} s, 3 hosts, 2 HA dirtier VMs (16 MiB), \
         mutual TLS. Each cell: the migration's final state, where the VM ran afterwards \
         (moved / stayed / elsewhere) and whether it rebooted (an HA restart), with counts.\n\n\
         | fault | phase | outcomes |\n|---|---|---|\n",
        took.as_secs()
    );
    for (fault, phases) in &t.matrix {
        for (phase, outcomes) in phases {
            let cells: Vec<String> = outcomes.iter().map(|(o, n)| format!("{o} ×{n}")).collect();
            md.push_str(&format!("| {fault} | {phase} | {} |\n", cells.join("; ")));
        }
    }
    if !t.problems.is_empty() {
        md.push_str("\n## Problems\n\n");
        for p in &t.problems {
            md.push_str(&format!("- {p}\n"));
        }
    }
    let dir = ferry_testkit::target_dir().join("soak");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("matrix.md"), md);
}
