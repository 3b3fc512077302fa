//! `cargo xtask <task>`: Ferry's project tasks.
//!
//! - `test`: the whole test suite: every crate's tests on this machine's KVM (bare-metal guests),
//!   then the Linux-guest tier inside one lab host.
//! - `lab-tests`: only the Linux-guest tier (release build, one lab host boot).
//! - `lab -- CMD...`: run any command inside a lab host.
//! - `demo`: start the dirtier, save it, restore it in a new worker process, show it continuing.

mod cluster_demo;
mod demo;
mod lab;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run every test tier: the workspace's tests, then the Linux-guest tests in a lab host.
    Test {
        /// Skip the lab-host tier.
        #[arg(long)]
        no_lab: bool,
    },
    /// Run the Linux-guest tests (ignored by a plain `cargo test`) inside one lab host.
    LabTests {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Run a command inside a lab host (a VM whose /dev/kvm is a real hardware KVM).
    Lab {
        /// Memory of the lab host in MiB.
        #[arg(short = 'm', long, default_value_t = 4096)]
        mem: u32,
        /// vCPUs of the lab host.
        #[arg(short = 'c', long, default_value_t = 2)]
        cpus: u32,
        /// Seconds before the lab host is stopped.
        #[arg(short = 't', long, default_value_t = 1800)]
        timeout: u32,
        /// Show the lab kernel's messages.
        #[arg(short = 'v', long)]
        verbose: bool,
        /// The command.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// The main job: a local cluster (etcd, four hosts in network namespaces, each with its
    /// ferryd), a running VM live-migrated through the coordinator, a host drained and
    /// returned with failback, the guest checking its memory throughout; then torn down.
    Demo {
        /// Instead: two worker processes in two namespaces, no cluster — live migration over
        /// mutual TLS, then quick migration back.
        #[arg(long)]
        workers: bool,
        /// With --workers: the Linux guest inside a lab host instead of the bare-metal dirtier.
        #[arg(long)]
        linux: bool,
    },
    /// Benchmark live migration against QEMU's on the Linux guest, inside a lab host
    /// (bench/src/qemu.rs). Takes a while: every size × idle/dirtying × 3 link speeds.
    BenchQemu {
        /// Guest sizes in MiB.
        #[arg(default_values_t = [256u64, 1024])]
        sizes: Vec<u64>,
    },
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace());
    c
}

fn run(mut c: Command) -> Result<()> {
    let st = c.status().with_context(|| format!("cannot run {c:?}"))?;
    if !st.success() {
        bail!("{c:?} failed ({st})");
    }
    Ok(())
}

/// Builds the release test binary of the Linux-guest tier and returns its path.
fn build_lab_tests() -> Result<PathBuf> {
    run({
        let mut c = cargo();
        c.args(["build", "--release", "-p", "ferry", "--bins"]);
        c
    })?;
    let out = cargo()
        .args([
            "test",
            "--release",
            "-p",
            "ferry",
            "--test",
            "linux",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot build the lab tests")?;
    if !out.status.success() {
        bail!("building the lab tests failed");
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact" && v["target"]["name"] == "linux" {
            if let Some(exe) = v["executable"].as_str() {
                return Ok(PathBuf::from(exe));
            }
        }
    }
    bail!("cargo did not report the lab test binary")
}

fn lab_tests(filter: Option<String>) -> Result<()> {
    let exe = build_lab_tests()?;
    let mut cmd = vec![
        exe.display().to_string(),
        "--ignored".into(),
        "--test-threads=1".into(),
        "--color=never".into(),
        "--nocapture".into(),
    ];
    cmd.extend(filter);
    let opts = lab::LabOpts {
        mem_mib: 4096,
        cpus: 2,
        timeout_s: 1200,
        verbose: false,
    };
    println!("lab: running the Linux-guest tests inside a lab host");
    let mut rc = lab::run(&workspace(), &opts, &cmd)?;
    if rc == lab::NO_STATUS {
        // The lab host itself stopped (its emulated CPUs wedged or it ran out of time), which
        // says nothing about the tests: one fresh lab host runs them all again. A test that
        // fails is never retried.
        println!("lab: the lab host hung (its log is above); running the lab tests once more in a fresh one");
        rc = lab::run(&workspace(), &opts, &cmd)?;
    }
    if rc != 0 {
        bail!("lab tests failed (exit status {rc})");
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Test { no_lab } => {
            // etcd for the cluster tests, protoc to build its client, ip for the namespaces.
            lab::ensure_commands(&[
                ("etcd", "etcd-server"),
                ("protoc", "protobuf-compiler"),
                ("ip", "iproute2"),
                ("gcc", "gcc"),
            ])?;
            run({
                let mut c = cargo();
                c.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
                c
            })?;
            if !no_lab {
                lab_tests(None)?;
            }
            Ok(())
        }
        Task::LabTests { filter } => lab_tests(filter),
        Task::Lab {
            mem,
            cpus,
            timeout,
            verbose,
            cmd,
        } => {
            let opts = lab::LabOpts {
                mem_mib: mem,
                cpus,
                timeout_s: timeout,
                verbose,
            };
            let rc = lab::run(&workspace(), &opts, &cmd)?;
            std::process::exit(rc);
        }
        Task::Demo { workers, linux } => {
            if workers || linux {
                demo::run(&workspace(), linux)
            } else {
                cluster_demo::run(&workspace())
            }
        }
        Task::BenchQemu { sizes } => {
            run({
                let mut c = cargo();
                c.args([
                    "build",
                    "--release",
                    "-p",
                    "ferry",
                    "-p",
                    "ferry-bench",
                    "-p",
                    "ferry-guests",
                ]);
                c
            })?;
            let mut cmd = vec![
                workspace()
                    .join("target/release/ferry-bench")
                    .display()
                    .to_string(),
                "compare-qemu".into(),
            ];
            cmd.extend(sizes.iter().map(u64::to_string));
            let opts = lab::LabOpts {
                mem_mib: 8192,
                cpus: 2,
                timeout_s: 7200,
                verbose: false,
            };
            let rc = lab::run(&workspace(), &opts, &cmd)?;
            std::process::exit(rc);
        }
    }
}
