//! `cargo xtask <task>`: Ferry's project tasks.
//!
//! - `test`: the whole test suite: every crate's tests on this machine's KVM (bare-metal guests),
//!   then the Linux-guest tier inside one lab host.
//! - `lab-tests`: only the Linux-guest tier (release build, one lab host boot).
//! - `soak [--migrations N] [--seed S]`: migrations under injected faults on a local cluster.
//! - `lab -- CMD...`: run any command inside a lab host.
//! - `demo`: start the dirtier, save it, restore it in a new worker process, show it continuing.

mod cluster_demo;
mod demo;
mod kvm_hold;
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
    /// Run the fuzz targets (fuzz/: a hostile guest driver against virtio-blk, virtio-net and
    /// virtio-scsi; a hostile migration source; a hostile state file) with cargo-fuzz on the
    /// nightly toolchain, for a while each.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (virtio_blk, virtio_net, virtio_scsi, migration_stream, state_file).
        target: Option<String>,
    },
    /// The soak: a local cluster (3 hosts, real etcd), two HA dirtier VMs migrating back and
    /// forth in every mode while faults are injected at chosen phases; ends with
    /// `soak: N migrations, F faults, lost=0 twice=0 damaged=0 stuck=0` and writes the fault
    /// matrix to target/soak/matrix.md (needs root and /dev/kvm).
    Soak {
        /// Migrations to run.
        #[arg(long, default_value_t = 200)]
        migrations: u64,
        /// Seed of the choices (mode, fault, phase): the same seed makes the same run.
        #[arg(long, default_value_t = 1)]
        seed: u64,
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
    /// Simulate the cluster's balancing and power policy (the coordinator's own code) on a
    /// simulated cluster and clock (bench/src/sim.rs); prints one `sim: …` line at the end.
    Sim {
        /// Hosts.
        #[arg(long, default_value_t = 64)]
        hosts: u64,
        /// VMs.
        #[arg(long, default_value_t = 2000)]
        vms: u64,
        /// Simulated days.
        #[arg(long, default_value_t = 7)]
        days: u64,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Benchmark virtio-blk, virtio-scsi and virtio-net in a Linux guest against the host, inside a lab
    /// host (bench/src/devices.rs): disk throughput and IOPS, TCP streams at MTU 1500/9000 and
    /// with offloads on/off.
    BenchDevices {
        /// Only `disk` or `net`.
        only: Option<String>,
    },
    /// Benchmark live migration against QEMU's on the Linux guest, inside a lab host
    /// (bench/src/qemu.rs). Takes a while: every size × idle/dirtying × 3 link speeds.
    BenchQemu {
        /// Guest sizes in MiB.
        #[arg(default_values_t = [256u64, 1024])]
        sizes: Vec<u64>,
        /// Only this load: idle or dirtying.
        #[arg(long)]
        load: Option<String>,
        /// Only this link: unlimited, 10GbE or 1GbE.
        #[arg(long)]
        link: Option<String>,
        /// Only this side's runs: ferry or qemu.
        #[arg(long)]
        only: Option<String>,
    },
    /// Inside a lab host (started by its init): hold one KVM VM open until killed, so the lab
    /// kernel never patches its code while tests run (xtask/src/kvm_hold.rs).
    #[command(hide = true)]
    LabKvmHold {
        /// File written once the VM exists.
        #[arg(long)]
        ready: PathBuf,
        /// Instead: create and drop this many VMs, then exit.
        #[arg(long)]
        cycles: Option<u32>,
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

/// Builds the release binaries and runs `ferry-bench args…` in a lab host of `mem_mib` MiB
/// for at most `timeout_s`; exits with its status.
fn bench_in_lab(args: Vec<String>, mem_mib: u32, timeout_s: u32) -> Result<()> {
    run({
        let mut c = cargo();
        c.args(["build", "--release", "-p", "ferry", "-p", "ferry-bench"])
            .args(["-p", "ferry-guests"]);
        c
    })?;
    let bench = workspace().join("target/release/ferry-bench");
    let cmd: Vec<String> = std::iter::once(bench.display().to_string())
        .chain(args)
        .collect();
    let opts = lab::LabOpts {
        mem_mib,
        cpus: 2,
        timeout_s,
        verbose: false,
    };
    let rc = lab::run(&workspace(), &opts, &cmd)?;
    std::process::exit(rc);
}

/// The fuzz targets in fuzz/fuzz_targets.
const FUZZ_TARGETS: [&str; 5] = [
    "virtio_blk",
    "virtio_net",
    "virtio_scsi",
    "migration_stream",
    "state_file",
];

/// Runs each fuzz target (or `only`) for `seconds`; fails on the first crash (cargo-fuzz
/// leaves the input under fuzz/artifacts).
fn fuzz(seconds: u64, only: Option<String>) -> Result<()> {
    let targets: Vec<&str> = match &only {
        Some(t) if FUZZ_TARGETS.contains(&t.as_str()) => vec![t.as_str()],
        Some(t) => bail!("no fuzz target {t}: {}", FUZZ_TARGETS.join(", ")),
        None => FUZZ_TARGETS.to_vec(),
    };
    // Through rustup's `cargo` (not the stable one running us) so that `+nightly` works.
    let nightly = || {
        let mut c = Command::new("cargo");
        c.current_dir(workspace())
            .env_remove("CARGO")
            .env_remove("RUSTC")
            .env_remove("RUSTUP_TOOLCHAIN")
            .arg("+nightly");
        c
    };
    let have = |args: &[&str]| {
        nightly()
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !have(&["--version"]) {
        bail!("fuzzing needs the nightly toolchain: rustup toolchain install nightly");
    }
    if !have(&["fuzz", "--version"]) {
        bail!("fuzzing needs cargo-fuzz: cargo install --locked cargo-fuzz");
    }
    for t in targets {
        println!("fuzz: {t} for {seconds} s");
        run({
            let mut c = nightly();
            c.args(["fuzz", "run", t, "--"])
                .arg(format!("-max_total_time={seconds}"));
            c
        })?;
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

fn soak(migrations: u64, seed: u64) -> Result<()> {
    println!("soak: {migrations} migrations, seed {seed}");
    run({
        let mut c = cargo();
        c.args([
            "test",
            "-p",
            "ferry",
            "--test",
            "soak",
            "--",
            "--ignored",
            "--nocapture",
        ])
        .env("FERRY_SOAK_MIGRATIONS", migrations.to_string())
        .env("FERRY_SOAK_SEED", seed.to_string());
        c
    })
    .context("the soak failed (its last line and target/soak/matrix.md say what)")
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
                // `ping -M do` in the lab network test (busybox ping has no -M).
                ("ping", "iputils-ping"),
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
        Task::Soak { migrations, seed } => soak(migrations, seed),
        Task::Fuzz { seconds, target } => fuzz(seconds, target),
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
        Task::Sim {
            hosts,
            vms,
            days,
            seed,
        } => run({
            let mut c = cargo();
            c.args(["run", "--release", "-q", "-p", "ferry-bench", "--", "sim"]);
            for (k, v) in [
                ("--hosts", hosts),
                ("--vms", vms),
                ("--days", days),
                ("--seed", seed),
            ] {
                c.arg(k).arg(v.to_string());
            }
            c
        }),
        Task::BenchDevices { only } => {
            let args = std::iter::once("devices".to_string()).chain(only);
            bench_in_lab(args.collect(), 4096, 3600)
        }
        Task::BenchQemu {
            sizes,
            load,
            link,
            only,
        } => {
            let mut args: Vec<String> = std::iter::once("compare-qemu".to_string())
                .chain(sizes.iter().map(u64::to_string))
                .collect();
            for (flag, v) in [("--load", load), ("--link", link), ("--only", only)] {
                if let Some(v) = v {
                    args.push(flag.into());
                    args.push(v);
                }
            }
            bench_in_lab(args, 8192, 7200)
        }
        Task::LabKvmHold { ready, cycles } => kvm_hold::run(&ready, cycles),
    }
}
