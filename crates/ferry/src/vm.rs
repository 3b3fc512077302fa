//! `ferry vm ...`: VMs on this host, each in its own `ferry-vm` worker process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_worker::api::{Request, Status};
use ferry_worker::client::{self, Workers};
use vmm::config::{parse_mib, validate_name};
use vmm::VmConfig;

use crate::cluster::{self, Api};
use crate::output::{mib, print};
use crate::Output;

/// Boot options shared by `run` and `start`.
#[derive(Debug, Args)]
pub struct BootOpts {
    /// Kernel: Linux bzImage or vmlinux, or a bare-metal 64-bit ELF (required on a host;
    /// with --api, `vm start NAME` starts a defined VM and takes none).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (Linux).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Guest RAM (e.g. 256M, 1G).
    #[arg(long, default_value = "256M")]
    memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// CPU model: host, compat, x86-64-v1, x86-64-v2, x86-64-v3 or x86-64-v4
    /// (docs/cpu-compat.md).
    #[arg(long, default_value = "host")]
    cpu: String,
    /// A disk: a raw image (`ferry disk create`) attached as virtio-blk; `PATH,readonly` for
    /// read-only. Repeat for more (Linux names them /dev/vda, /dev/vdb, …).
    #[arg(long = "disk", value_name = "PATH[,readonly]")]
    disks: Vec<String>,
    /// A virtio-scsi controller, whose disks can be added and removed while the VM runs
    /// (`ferry vm disk add|remove`); implied by --scsi-disk.
    #[arg(long)]
    scsi: bool,
    /// A disk on the SCSI controller: a raw image or a host block device (pass-through);
    /// `PATH,readonly` for read-only. Repeat for more (LUNs 0, 1, …; Linux: /dev/sda, …).
    #[arg(long = "scsi-disk", value_name = "PATH[,readonly]")]
    scsi_disks: Vec<String>,
    /// A network interface: a TAP on host bridge BRIDGE, seen by the guest as virtio-net
    /// (eth0, eth1, …). Without mac= one is generated (52:54:00:…) and kept across moves;
    /// queues= gives it that many queue pairs (one per vCPU is usual).
    #[arg(
        long = "nic",
        value_name = "bridge=BRIDGE[,mac=MAC][,mtu=N][,queues=N]"
    )]
    nics: Vec<String>,
}

/// `ferry vm` verbs.
#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Run a VM in the foreground, console on the terminal (Ctrl-C stops it).
    Run {
        /// VM name (default: run-<pid>).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        boot: BootOpts,
    },
    /// Start a VM in a background worker process.
    Start {
        /// VM name.
        name: String,
        #[command(flatten)]
        boot: BootOpts,
        /// Console log file (default: console.log in the VM's run directory).
        #[arg(long)]
        console_log: Option<PathBuf>,
    },
    /// Define a VM in the cluster (and start it on the best host): needs --api.
    Create(crate::cluster::CreateArgs),
    /// Change a stopped VM's CPU model (host, compat, x86-64-v1..v4, cluster): needs --api.
    Set {
        /// VM name.
        name: String,
        /// The new CPU model.
        #[arg(long)]
        cpu: String,
    },
    /// Delete a stopped VM's definition from the cluster: needs --api.
    Delete {
        /// VM name.
        name: String,
    },
    /// List the VMs running on this host (with --api: the cluster's VMs).
    List,
    /// Show one VM.
    #[command(visible_alias = "show")]
    Status {
        /// VM name.
        name: String,
    },
    /// Pause a VM's vCPUs.
    Pause {
        /// VM name.
        name: String,
    },
    /// Resume a paused VM.
    Resume {
        /// VM name.
        name: String,
    },
    /// Stop a VM and its worker.
    Stop {
        /// VM name.
        name: String,
    },
    /// Decide where a VM whose migration's outcome is unknown runs (the source worker is
    /// paused and refuses to resume: `commit outcome unknown`): `destination` stops this
    /// paused copy; `source` resumes it — only when you know the destination does not run it.
    Resolve {
        /// VM name (the paused source).
        name: String,
        /// Where the VM runs from now on.
        #[arg(long, value_enum)]
        running_on: RunningOn,
    },
    /// Save a VM's complete state to a file and stop it (quick migration, first half).
    Save {
        /// VM name.
        name: String,
        /// State file to write.
        #[arg(long)]
        to: PathBuf,
    },
    /// Restore a saved VM in a new worker process (quick migration, second half).
    Restore {
        /// State file.
        file: PathBuf,
        /// Name of the restored VM.
        #[arg(long)]
        name: String,
        /// Console log file (default: console.log in the VM's run directory).
        #[arg(long)]
        console_log: Option<PathBuf>,
        /// Leave the vCPUs paused.
        #[arg(long)]
        paused: bool,
    },
    /// Hash of a VM's memory (pause it first for a stable value).
    MemoryHash {
        /// VM name.
        name: String,
    },
    /// Wait for a VM migrating in: a skeleton worker listening on ADDR:PORT.
    Receive {
        /// Name the VM will have here.
        name: String,
        /// Address to listen on (port 0: any free port, shown in the output).
        #[arg(long)]
        listen: String,
        /// Console log file (default: console.log in the VM's run directory).
        #[arg(long)]
        console_log: Option<PathBuf>,
        /// Take the VM over but leave its vCPUs paused.
        #[arg(long)]
        paused: bool,
        #[command(flatten)]
        security: crate::pki::SecurityArgs,
    },
    /// Add, remove and list the disks of a running VM's SCSI controller (started with --scsi
    /// or --scsi-disk).
    #[command(subcommand)]
    Disk(crate::vm_disk::DiskCmd),
    /// Move a running VM to a receiving worker (live by default); with --api, to another
    /// cluster host through the coordinator.
    Migrate {
        /// VM name.
        name: String,
        /// Destination ADDR:PORT (a `ferry vm receive`); with --api a host name (default:
        /// the best host).
        #[arg(long)]
        to: Option<String>,
        /// With --api: return once the migration is queued.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        opts: crate::migrate::MigrateArgs,
    },
}

/// `ferry vm resolve --running-on`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RunningOn {
    /// The destination runs it: stop the paused source.
    Destination,
    /// The destination does not: resume it here.
    Source,
}

/// Runs a `ferry vm` verb against the cluster.
fn run_cluster(cmd: VmCmd, api: &Api, out: Output) -> Result<()> {
    match cmd {
        VmCmd::Create(a) => cluster::vm_create(api, a, out),
        VmCmd::Delete { name } => cluster::vm_action(api, &name, "delete", out),
        VmCmd::Set { name, cpu } => cluster::vm_set_cpu(api, &name, &cpu, out),
        VmCmd::List => cluster::vm_list(api, out),
        VmCmd::Status { name } => cluster::vm_show(api, &name, out),
        VmCmd::Start { name, boot, .. } => {
            if boot.kernel.is_some() {
                bail!("with --api, define VMs with `ferry vm create`; `vm start NAME` starts a defined one");
            }
            cluster::vm_action(api, &name, "start", out)
        }
        VmCmd::Stop { name } => cluster::vm_action(api, &name, "stop", out),
        VmCmd::Disk(c) => crate::vm_disk::run_cluster(api, c, out),
        VmCmd::Migrate {
            name,
            to,
            no_wait,
            opts,
        } => cluster::vm_migrate(api, &name, to, no_wait, crate::migrate::options(&opts), out),
        other => bail!(
            "`ferry vm {}` works on one host's VMs: run it on that host without --api/FERRY_API",
            verb(&other)
        ),
    }
}

fn verb(c: &VmCmd) -> &'static str {
    match c {
        VmCmd::Run { .. } => "run",
        VmCmd::Pause { .. } => "pause",
        VmCmd::Resume { .. } => "resume",
        VmCmd::Resolve { .. } => "resolve",
        VmCmd::Save { .. } => "save",
        VmCmd::Restore { .. } => "restore",
        VmCmd::MemoryHash { .. } => "memory-hash",
        VmCmd::Receive { .. } => "receive",
        VmCmd::Disk(_) => "disk",
        _ => "this verb",
    }
}

/// Runs a `ferry vm` verb: against the cluster with an API, else on this host.
pub fn run(cmd: VmCmd, out: Output, api: Option<&Api>) -> Result<()> {
    if let Some(api) = api {
        return run_cluster(cmd, api, out);
    }
    match cmd {
        VmCmd::Create(_) | VmCmd::Delete { .. } | VmCmd::Set { .. } => {
            bail!("`ferry vm create`, `set` and `delete` work on the cluster: give --api URL (or set FERRY_API)")
        }
        VmCmd::Run { name, boot } => {
            let name = name.unwrap_or_else(|| format!("run-{}", std::process::id()));
            let cfg = make_config(&name, boot)?;
            foreground(&cfg)
        }
        VmCmd::Start {
            name,
            boot,
            console_log,
        } => {
            let cfg = make_config(&name, boot)?;
            let mut args = Vec::new();
            worker_options(&mut args, console_log, false)?;
            workers()?.start(&cfg, &args)?;
            report_started(out, &name)
        }
        VmCmd::Restore {
            file,
            name,
            console_log,
            paused,
        } => {
            validate_name(&name)?;
            let file = absolute(&file)?;
            std::fs::metadata(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let dir = prepare_dir(&name)?;
            let mut args: Vec<std::ffi::OsString> = vec![
                "--restore".into(),
                file.into_os_string(),
                "--name".into(),
                name.clone().into(),
            ];
            worker_options(&mut args, console_log, paused)?;
            spawn_worker(&dir, &args)?;
            report_started(out, &name)
        }
        VmCmd::Receive {
            name,
            listen,
            console_log,
            paused,
            security,
        } => {
            let pki = security.resolve()?;
            let dir = prepare_dir(&name)?;
            let mut args: Vec<std::ffi::OsString> = vec![
                "--receive".into(),
                listen.into(),
                "--name".into(),
                name.clone().into(),
            ];
            if let Some(p) = pki {
                args.push("--pki".into());
                args.push(p.into_os_string());
            }
            worker_options(&mut args, console_log, paused)?;
            let ready = spawn_worker(&dir, &args)?;
            let listen = ready["listen"].as_str().unwrap_or("").to_string();
            print(
                out,
                &serde_json::json!({"name": name, "state": "receiving", "listen": listen, "pid": ready["pid"]}),
                &["NAME", "STATE", "LISTEN"],
                vec![vec![name.clone(), "receiving".into(), listen]],
            );
            Ok(())
        }
        VmCmd::Migrate { name, to, opts, .. } => {
            let to = to.ok_or_else(|| {
                anyhow::anyhow!("--to ADDR:PORT is required (the address of a `ferry vm receive`)")
            })?;
            crate::migrate::run(&name, &to, opts, out)
        }
        VmCmd::List => {
            let list = list_vms();
            let rows = list.iter().map(status_row).collect();
            print(out, &list, STATUS_HEADERS, rows);
            Ok(())
        }
        VmCmd::Status { name } => {
            let s = status(&name)?;
            print(out, &s, STATUS_HEADERS, vec![status_row(&s)]);
            Ok(())
        }
        VmCmd::Pause { name } => simple(out, &name, Request::Pause, "paused"),
        VmCmd::Resume { name } => simple(out, &name, Request::Resume, "running"),
        VmCmd::Resolve { name, running_on } => {
            let commit = running_on == RunningOn::Destination;
            let pid = status(&name)?.pid;
            request(&name, &Request::MigrationResolve { commit })?;
            let state = if commit {
                wait_exit(pid, Duration::from_secs(30))?;
                "stopped (runs on the destination)"
            } else {
                "running"
            };
            print(
                out,
                &serde_json::json!({"name": name, "state": state}),
                &["NAME", "STATE"],
                vec![vec![name.clone(), state.into()]],
            );
            Ok(())
        }
        VmCmd::MemoryHash { name } => {
            let v = request(&name, &Request::MemoryHash)?;
            let hash = v["hash"].as_str().unwrap_or("").to_string();
            print(out, &v, &["NAME", "MEMORY HASH"], vec![vec![name, hash]]);
            Ok(())
        }
        VmCmd::Stop { name } => {
            let pid = status(&name)?.pid;
            request(&name, &Request::Shutdown)?;
            wait_exit(pid, Duration::from_secs(30))?;
            print(
                out,
                &serde_json::json!({"name": name, "state": "stopped"}),
                &["NAME", "STATE"],
                vec![vec![name.clone(), "stopped".into()]],
            );
            Ok(())
        }
        VmCmd::Disk(c) => crate::vm_disk::run_local(c, out),
        VmCmd::Save { name, to } => {
            let to = absolute(&to)?;
            let pid = status(&name)?.pid;
            let v = request(&name, &Request::Save { path: to.clone() })?;
            wait_exit(pid, Duration::from_secs(30))?;
            let size = v["file_bytes"].as_u64().unwrap_or(0);
            let mem = v["memory_bytes"].as_u64().unwrap_or(0);
            let ms = v["duration_ms"].as_u64().unwrap_or(0);
            print(
                out,
                &serde_json::json!({"name": name, "file": to, "report": v}),
                &["NAME", "FILE", "SIZE", "MEMORY STORED", "PAUSED FOR"],
                vec![vec![
                    name.clone(),
                    to.display().to_string(),
                    mib(size),
                    mib(mem),
                    format!("{ms} ms"),
                ]],
            );
            Ok(())
        }
    }
}

const STATUS_HEADERS: &[&str] = &[
    "NAME", "STATE", "VCPUS", "MEMORY", "PID", "UPTIME", "KERNEL",
];

fn status_row(s: &Status) -> Vec<String> {
    vec![
        s.name.clone(),
        s.state.to_string(),
        s.vcpus.to_string(),
        format!("{} MiB", s.memory_mib),
        s.pid.to_string(),
        format!("{}s", s.uptime_s),
        s.kernel.display().to_string(),
    ]
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()
            .context("cannot read the current directory")?
            .join(p))
    }
}

fn make_config(name: &str, b: BootOpts) -> Result<VmConfig> {
    let kernel = b
        .kernel
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("--kernel is required"))?;
    let kernel = absolute(kernel)?;
    std::fs::File::open(&kernel)
        .with_context(|| format!("cannot read kernel {}", kernel.display()))?;
    let initrd = match b.initrd {
        Some(i) => {
            let i = absolute(&i)?;
            std::fs::File::open(&i)
                .with_context(|| format!("cannot read initrd {}", i.display()))?;
            Some(i)
        }
        None => None,
    };
    let mut disks = Vec::new();
    for d in &b.disks {
        let mut spec: vmm::config::DiskSpec = d.parse()?;
        spec.path = absolute(&spec.path)?;
        vmm::disk::inspect(&spec.path)
            .with_context(|| format!("cannot use disk {}", spec.path.display()))?;
        disks.push(spec);
    }
    let mut scsi_disks = Vec::new();
    for d in &b.scsi_disks {
        let mut spec: vmm::config::DiskSpec = d.parse()?;
        spec.path = absolute(&spec.path)?;
        vmm::disk::inspect(&spec.path)
            .with_context(|| format!("cannot use disk {}", spec.path.display()))?;
        scsi_disks.push(spec);
    }
    let mut nics = Vec::new();
    for (i, n) in b.nics.iter().enumerate() {
        let mut spec: vmm::config::NicSpec = n.parse()?;
        spec.fill_mac(i);
        nics.push(spec);
    }
    let cfg = VmConfig {
        name: name.to_string(),
        vcpus: b.vcpus,
        memory_mib: parse_mib(&b.memory)?,
        kernel,
        initrd,
        cmdline: b.cmdline,
        cpu: vmm::cpuid::CpuModel::parse(&b.cpu)?,
        cpu_hide: Vec::new(),
        disks,
        nics,
        scsi: (b.scsi || !scsi_disks.is_empty())
            .then(|| vmm::config::ScsiSpec::with_disks(&scsi_disks)),
    };
    cfg.validate()?;
    vmm::boot::detect(&cfg.kernel)?;
    Ok(cfg)
}

fn workers() -> Result<Workers> {
    Ok(Workers::from_env()?)
}

fn prepare_dir(name: &str) -> Result<PathBuf> {
    Ok(workers()?.prepare(name)?)
}

fn spawn_worker(dir: &Path, args: &[std::ffi::OsString]) -> Result<serde_json::Value> {
    Ok(workers()?.spawn(dir, args)?)
}

/// Adds the worker options shared by start, restore and receive.
fn worker_options(
    args: &mut Vec<std::ffi::OsString>,
    console_log: Option<PathBuf>,
    paused: bool,
) -> Result<()> {
    if let Some(c) = console_log {
        args.push("--console-log".into());
        args.push(absolute(&c)?.into_os_string());
    }
    if paused {
        args.push("--paused".into());
    }
    Ok(())
}

fn report_started(out: Output, name: &str) -> Result<()> {
    let s = status(name)?;
    print(out, &s, STATUS_HEADERS, vec![status_row(&s)]);
    Ok(())
}

/// Runs the worker in the foreground and waits for it.
fn foreground(cfg: &VmConfig) -> Result<()> {
    let dir = prepare_dir(&cfg.name)?;
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(cfg)?)?;
    // Ctrl-C reaches the worker (same process group); this process just waits for it.
    // SAFETY: installing SIG_IGN for SIGINT has no preconditions.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let status = Command::new(workers()?.bin())
        .arg("--config")
        .arg(&cfg_path)
        .arg("--foreground")
        .status()
        .context("cannot start the worker process")?;
    if !status.success() {
        bail!("the VM worker failed ({status})");
    }
    Ok(())
}

pub fn request(name: &str, req: &Request) -> Result<serde_json::Value> {
    Ok(workers()?.request(name, req)?)
}

pub fn status(name: &str) -> Result<Status> {
    Ok(workers()?.status(name)?)
}

fn simple(out: Output, name: &str, req: Request, state: &str) -> Result<()> {
    request(name, &req)?;
    print(
        out,
        &serde_json::json!({"name": name, "state": state}),
        &["NAME", "STATE"],
        vec![vec![name.to_string(), state.to_string()]],
    );
    Ok(())
}

fn list_vms() -> Vec<Status> {
    workers().map(|w| w.list()).unwrap_or_default()
}

pub fn wait_exit(pid: u32, timeout: Duration) -> Result<()> {
    Ok(client::wait_exit(pid, timeout)?)
}
