//! The cluster side of the CLI: with `--api URL` (or `$FERRY_API`) the `vm`, `host`,
//! `migration` and `cluster` verbs talk to any host's `ferryd` instead of this host's workers.

use ferry_cluster::peer::{self, Method};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::output::print;
use crate::Output;

/// How to reach the cluster.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// A cluster host's API (`http://HOST:PORT`); default `$FERRY_API`. Without it, `ferry`
    /// works on this host's VMs directly.
    #[arg(long, global = true)]
    pub api: Option<String>,
    /// File holding the API token; default `$FERRY_TOKEN_FILE`, then `/etc/ferry/token`
    /// (`$FERRY_TOKEN` holds the token itself).
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
}

/// A cluster API endpoint.
pub struct Api {
    url: String,
    token: String,
}

impl ApiArgs {
    /// The API, when one is configured.
    pub fn resolve(&self) -> Result<Option<Api>> {
        let Some(url) = self.api.clone().or_else(|| std::env::var("FERRY_API").ok()) else {
            return Ok(None);
        };
        let token = match (&self.token_file, std::env::var("FERRY_TOKEN")) {
            (Some(f), _) => read_token(f)?,
            (None, Ok(t)) => t,
            (None, Err(_)) => {
                let f = std::env::var_os("FERRY_TOKEN_FILE")
                    .map_or_else(|| PathBuf::from("/etc/ferry/token"), PathBuf::from);
                read_token(&f)?
            }
        };
        Ok(Some(Api {
            url: url.trim_end_matches('/').to_string(),
            token,
        }))
    }
}

fn read_token(f: &std::path::Path) -> Result<String> {
    Ok(std::fs::read_to_string(f)
        .with_context(|| format!("cannot read the API token {}", f.display()))?
        .trim()
        .to_string())
}

impl Api {
    fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        Ok(peer::call(
            &format!("{}{path}", self.url),
            &self.token,
            method,
            body,
        )?)
    }
    /// GET.
    pub fn get(&self, path: &str) -> Result<Value> {
        self.call(Method::Get, path, None)
    }
    /// POST.
    pub fn post(&self, path: &str, body: Value) -> Result<Value> {
        self.call(Method::Post, path, Some(body))
    }
    /// DELETE.
    pub fn delete(&self, path: &str) -> Result<Value> {
        self.call(Method::Delete, path, None)
    }
}

/// A JSON value as a table cell.
pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// `ferry cluster` verbs.
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Hosts, coordinator, VMs and migrations at a glance (needs --api).
    Status,
    /// Start a local cluster on this machine: etcd, and HOSTS hosts, each a network
    /// namespace with its own ferryd on a management and a migration bridge (needs root).
    Up {
        /// Number of hosts (1-16).
        #[arg(long, default_value_t = 4)]
        hosts: u8,
        /// Its directory: configs, logs, etcd data, the shared directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Which local cluster (0-9; several can run side by side on their own subnets).
        #[arg(long, default_value_t = 0)]
        id: u8,
    },
    /// Show or set load balancing for the whole cluster (needs --api): `off`, `manual`
    /// (recommend only) or `auto` (migrate), threshold 1 (conservative) to 5 (aggressive).
    Balance {
        /// The mode.
        #[arg(long, value_parser = ["off", "manual", "auto"])]
        mode: Option<String>,
        /// The threshold.
        #[arg(long)]
        threshold: Option<u8>,
    },
    /// Show or set power consolidation for the whole cluster (needs --api): `off`, `manual`
    /// (advise only) or `auto` (switch idle hosts off through their power driver and back on
    /// when demand rises); shows the coordinator's last advice.
    Power {
        /// The mode.
        #[arg(long, value_parser = ["off", "manual", "auto"])]
        mode: Option<String>,
    },
    /// The coordinator's balancing recommendations, each with its reason and the command that
    /// applies it; `apply VM` queues one (needs --api).
    Recommendations {
        /// `apply`.
        #[arg(value_parser = ["apply"])]
        action: Option<String>,
        /// The VM whose recommendation to apply.
        vm: Option<String>,
    },
    /// The local cluster's power driver (its hosts' `[power]` commands): stops (`off`) or
    /// starts (`on`) a host's ferryd in its namespace.
    HostPower {
        /// The host.
        host: String,
        /// `on` or `off`.
        #[arg(value_parser = ["on", "off"])]
        way: String,
        /// The directory given to `up`.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The id given to `up`.
        #[arg(long, default_value_t = 0)]
        id: u8,
    },
    /// Stop the local cluster and remove everything `up` created (VMs, namespaces, bridges,
    /// etcd, its directory).
    Down {
        /// The directory given to `up`.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The id given to `up`.
        #[arg(long, default_value_t = 0)]
        id: u8,
    },
}

/// Runs a `ferry cluster` verb.
pub fn run_cluster(cmd: ClusterCmd, api: Option<&Api>, out: Output) -> Result<()> {
    use crate::localcluster;
    match cmd {
        ClusterCmd::Up { hosts, dir, id } => localcluster::up(
            hosts,
            &dir.unwrap_or_else(|| localcluster::default_dir(id)),
            localcluster::Net::new(id)?,
            out,
        ),
        ClusterCmd::HostPower { host, way, dir, id } => localcluster::host_power(
            &dir.unwrap_or_else(|| localcluster::default_dir(id)),
            &host,
            way == "on",
            out,
        ),
        ClusterCmd::Down { dir, id } => localcluster::down(
            &dir.unwrap_or_else(|| localcluster::default_dir(id)),
            localcluster::Net::new(id)?,
            out,
        ),
        ClusterCmd::Balance { mode, threshold } => {
            let api = api.context("`ferry cluster balance` needs --api URL (or FERRY_API)")?;
            let v = if mode.is_none() && threshold.is_none() {
                api.get("/v1/cluster/balance")?
            } else {
                api.post(
                    "/v1/cluster/balance",
                    json!({"mode": mode, "threshold": threshold}),
                )?
            };
            print(
                out,
                &v,
                &["MODE", "THRESHOLD"],
                vec![vec![s(&v["mode"]), s(&v["threshold"])]],
            );
            Ok(())
        }
        ClusterCmd::Power { mode } => {
            let api = api.context("`ferry cluster power` needs --api URL (or FERRY_API)")?;
            if let Some(mode) = mode {
                api.post("/v1/cluster/power", json!({ "mode": mode }))?;
            }
            let v = api.get("/v1/cluster/power")?;
            let a = &v["advice"];
            let pct = |x: &Value| format!("{:.0}%", x.as_f64().unwrap_or(0.0) * 100.0);
            print(
                out,
                &v,
                &[
                    "MODE",
                    "BAND",
                    "LOAD",
                    "ADVICE",
                    "HOSTS",
                    "WHY",
                    "DO IT WITH",
                ],
                vec![vec![
                    s(&v["mode"]),
                    format!("{}–{}", pct(&v["low"]), pct(&v["high"])),
                    if a.is_null() {
                        "-".into()
                    } else {
                        pct(&a["load"])
                    },
                    s(&a["action"]),
                    a["hosts"]
                        .as_array()
                        .map(|h| h.iter().map(s).collect::<Vec<_>>().join(","))
                        .unwrap_or_else(|| "-".into()),
                    s(&a["reason"]),
                    a["commands"]
                        .as_array()
                        .map(|h| h.iter().map(s).collect::<Vec<_>>().join("; "))
                        .filter(|c| !c.is_empty())
                        .unwrap_or_else(|| "-".into()),
                ]],
            );
            Ok(())
        }
        ClusterCmd::Recommendations { action, vm } => {
            let api =
                api.context("`ferry cluster recommendations` needs --api URL (or FERRY_API)")?;
            if action.is_some() {
                let vm = vm.context("`recommendations apply` needs the VM's name")?;
                let m = api.post(
                    &format!("/v1/cluster/recommendations/{vm}/apply"),
                    json!({}),
                )?;
                print(out, &m, MIGRATION_HEADERS, vec![migration_row(&m)]);
                return Ok(());
            }
            let v = api.get("/v1/cluster/recommendations")?;
            let rows = v["moves"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|m| {
                    vec![
                        s(&m["vm"]),
                        s(&m["from"]),
                        s(&m["to"]),
                        s(&m["reason"]),
                        s(&m["command"]),
                    ]
                })
                .collect();
            if out == Output::Table {
                println!(
                    "balancing {} (threshold {}): imbalance {:.3}, target {:.3}",
                    s(&v["mode"]),
                    s(&v["threshold"]),
                    v["imbalance"].as_f64().unwrap_or(0.0),
                    v["target"].as_f64().unwrap_or(0.0)
                );
            }
            print(out, &v, &["VM", "FROM", "TO", "WHY", "APPLY WITH"], rows);
            Ok(())
        }
        ClusterCmd::Status => {
            let Some(api) = api else {
                bail!(
                    "`ferry cluster status` needs a cluster API: give --api URL (or set FERRY_API)"
                );
            };
            let v = api.get("/v1/cluster")?;
            let rows = [
                "coordinator",
                "hosts",
                "hosts_up",
                "vms",
                "vms_running",
                "migrations_running",
                "migrations_queued",
                "max_migrations",
                "per_host_migrations",
            ]
            .iter()
            .map(|k| vec![k.replace('_', " "), s(&v[*k])])
            .collect();
            print(out, &v, &["", ""], rows);
            Ok(())
        }
    }
}

const HOST_HEADERS: &[&str] = &[
    "HOST",
    "STATE",
    "CPU",
    "CORES",
    "MEMORY",
    "COMMITTED",
    "FREE",
    "LOAD",
    "VMS",
];

fn host_row(h: &Value) -> Vec<String> {
    let vms = h["vms"]
        .as_array()
        .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
        .unwrap_or_default();
    vec![
        s(&h["name"]),
        s(&h["state"]),
        s(&h["cpu_vendor"]),
        s(&h["cores"]),
        format!("{} MiB", s(&h["memory_mib"])),
        format!("{} MiB", s(&h["committed_mib"])),
        format!("{} MiB", s(&h["free_mib"])),
        s(&h["load"]),
        if vms.is_empty() { "-".into() } else { vms },
    ]
}

/// `ferry host` verbs against the cluster.
pub fn host_list(api: &Api, out: Output) -> Result<()> {
    let v = api.get("/v1/hosts")?;
    let rows = v
        .as_array()
        .map(|a| a.iter().map(host_row).collect())
        .unwrap_or_default();
    print(out, &v, HOST_HEADERS, rows);
    Ok(())
}

/// `ferry host show HOST`.
pub fn host_show(api: &Api, host: &str, out: Output) -> Result<()> {
    let v = api.get(&format!("/v1/hosts/{host}"))?;
    print(out, &v, HOST_HEADERS, vec![host_row(&v)]);
    Ok(())
}

/// `ferry host drain HOST`: pauses the host and live-migrates its VMs away; waits (with
/// progress) until the host holds none, unless `no_wait`.
pub fn host_drain(api: &Api, host: &str, no_wait: bool, out: Output) -> Result<()> {
    let v = api.post(&format!("/v1/hosts/{host}/drain"), json!({}))?;
    if !no_wait {
        let bar = spinner(out);
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            let h = api.get(&format!("/v1/hosts/{host}"))?;
            let left = h["vms"].as_array().map_or(0, Vec::len);
            if h["state"] == "paused" && left == 0 {
                break;
            }
            if h["state"] == "down" {
                bail!("{host} went down while draining");
            }
            let ms = api.get("/v1/migrations")?;
            let active: Vec<String> = ms
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| {
                    m["from"] == host && (m["state"] == "running" || m["state"] == "queued")
                })
                .map(|m| {
                    format!(
                        "{} {}→{} {}",
                        s(&m["vm"]),
                        s(&m["from"]),
                        s(&m["to"]),
                        s(&m["state"])
                    )
                })
                .collect();
            let msg = format!(
                "draining {host}: {left} VM(s) left · {}",
                active.join(" · ")
            );
            if let Some(b) = &bar {
                b.set_message(msg);
            }
            if Instant::now() > deadline {
                bail!("{host} still holds {left} VM(s) after an hour");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
    }
    let state = if no_wait { "draining" } else { "paused" };
    print(
        out,
        &json!({"host": host, "state": state, "request": v}),
        &["HOST", "STATE"],
        vec![vec![host.to_string(), state.into()]],
    );
    Ok(())
}

/// `ferry host resume HOST [--failback]`.
pub fn host_resume(api: &Api, host: &str, failback: bool, out: Output) -> Result<()> {
    let v = api.post(
        &format!("/v1/hosts/{host}/resume"),
        json!({ "failback": failback }),
    )?;
    let moving: Vec<String> = v["failback"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| format!("{} (migration {})", s(&m["vm"]), s(&m["id"])))
        .collect();
    print(
        out,
        &v,
        &["HOST", "STATE", "MOVING BACK"],
        vec![vec![
            host.into(),
            "up".into(),
            if moving.is_empty() {
                "-".into()
            } else {
                moving.join(", ")
            },
        ]],
    );
    Ok(())
}

const VM_HEADERS: &[&str] = &[
    "NAME", "STATE", "HOST", "VCPUS", "MEMORY", "CPU", "HA", "NOTE",
];

fn vm_row(v: &Value) -> Vec<String> {
    let mut state = s(&v["state"]);
    if let Some(m) = v["migration"].as_object() {
        state = format!("{state} (migration {} {})", s(&m["id"]), s(&m["state"]));
    }
    vec![
        s(&v["name"]),
        state,
        s(&v["host"]),
        s(&v["vcpus"]),
        format!("{} MiB", s(&v["memory_mib"])),
        s(&v["cpu_model"]),
        if v["ha"] == true {
            "yes".into()
        } else {
            "no".into()
        },
        s(&v["note"]),
    ]
}

/// `ferry host cpu-baseline`.
pub fn cpu_baseline(api: &Api, out: Output) -> Result<()> {
    let v = api.get("/v1/cpu-baseline")?;
    let list = |x: &Value| {
        x.as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let mut rows = vec![
        vec!["hosts".to_string(), list(&v["hosts"])],
        vec!["vendors".to_string(), list(&v["vendors"])],
        vec!["common features".to_string(), list(&v["common"])],
    ];
    if let Some(m) = v["limited_by"].as_object() {
        for (h, lacks) in m {
            rows.push(vec![format!("{h} lacks"), list(lacks)]);
        }
    }
    print(out, &v, &["", ""], rows);
    Ok(())
}

/// `ferry vm set NAME --cpu MODEL`.
pub fn vm_set_cpu(api: &Api, name: &str, cpu: &str, out: Output) -> Result<()> {
    let v = api.post(&format!("/v1/vms/{name}/cpu"), json!({ "cpu": cpu }))?;
    print(
        out,
        &v,
        &["NAME", "CPU"],
        vec![vec![name.into(), cpu.into()]],
    );
    Ok(())
}

/// `ferry vm create` options.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// VM name.
    pub name: String,
    /// Kernel on the shared storage (absolute path every host sees).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initramfs on the shared storage.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Guest RAM.
    #[arg(long, default_value = "256M")]
    pub memory: String,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// CPU model: host, compat, x86-64-v1..v4, or cluster (the features every host has;
    /// docs/cpu-compat.md).
    #[arg(long, default_value = "host")]
    pub cpu: String,
    /// Do not restart it elsewhere when its host dies.
    #[arg(long)]
    pub no_ha: bool,
    /// Define it without starting it.
    #[arg(long)]
    pub no_start: bool,
    /// A disk image on the shared storage (`ferry disk create`), attached as virtio-blk;
    /// `PATH,readonly` for read-only. Repeat for more.
    #[arg(long = "disk", value_name = "PATH[,readonly]")]
    pub disks: Vec<String>,
    /// A network interface: a TAP on host bridge BRIDGE (which every host the VM may run on
    /// must have), seen by the guest as virtio-net. Without mac= the cluster generates one,
    /// kept across every move.
    #[arg(
        long = "nic",
        value_name = "bridge=BRIDGE[,mac=MAC][,mtu=N][,queues=N]"
    )]
    pub nics: Vec<String>,
    /// A virtio-scsi controller, whose disks can be added and removed while the VM runs;
    /// implied by --scsi-disk.
    #[arg(long)]
    pub scsi: bool,
    /// A disk on the SCSI controller (image or host block device on every host);
    /// `PATH,readonly` for read-only. Repeat for more (LUNs 0, 1, …).
    #[arg(long = "scsi-disk", value_name = "PATH[,readonly]")]
    pub scsi_disks: Vec<String>,
}

/// `p` made absolute against the current directory (paths go to agents on other hosts).
fn abs(p: PathBuf) -> Result<PathBuf> {
    Ok(if p.is_absolute() {
        p
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// `ferry vm create`.
pub fn vm_create(api: &Api, a: CreateArgs, out: Output) -> Result<()> {
    let mut disks = Vec::new();
    for d in &a.disks {
        let spec: vmm::config::DiskSpec = d.parse()?;
        disks.push(json!({"path": abs(spec.path)?, "readonly": spec.readonly}));
    }
    let mut scsi_disks = Vec::new();
    for d in &a.scsi_disks {
        let mut spec: vmm::config::DiskSpec = d.parse()?;
        spec.path = abs(spec.path)?;
        scsi_disks.push(spec);
    }
    let scsi =
        (a.scsi || !scsi_disks.is_empty()).then(|| vmm::config::ScsiSpec::with_disks(&scsi_disks));
    let nics = a
        .nics
        .iter()
        .map(|n| n.parse::<vmm::config::NicSpec>())
        .collect::<Result<Vec<_>, _>>()?;
    let body = json!({
        "disks": disks,
        "nics": nics,
        "scsi": scsi,
        "name": a.name,
        "kernel": abs(a.kernel)?,
        "initrd": a.initrd.map(abs).transpose()?,
        "cmdline": a.cmdline,
        "memory": a.memory,
        "vcpus": a.vcpus,
        "cpu": a.cpu,
        "ha": !a.no_ha,
        "start": !a.no_start,
    });
    let v = api.post("/v1/vms", body)?;
    print(out, &v, VM_HEADERS, vec![vm_row(&v)]);
    Ok(())
}

/// `ferry vm list`.
pub fn vm_list(api: &Api, out: Output) -> Result<()> {
    let v = api.get("/v1/vms")?;
    let rows = v
        .as_array()
        .map(|a| a.iter().map(vm_row).collect())
        .unwrap_or_default();
    print(out, &v, VM_HEADERS, rows);
    Ok(())
}

/// `ferry vm show NAME`.
pub fn vm_show(api: &Api, name: &str, out: Output) -> Result<()> {
    let v = api.get(&format!("/v1/vms/{name}"))?;
    print(out, &v, VM_HEADERS, vec![vm_row(&v)]);
    Ok(())
}

/// `ferry vm start|stop|delete NAME`.
pub fn vm_action(api: &Api, name: &str, action: &str, out: Output) -> Result<()> {
    let v = if action == "delete" {
        api.delete(&format!("/v1/vms/{name}"))?
    } else {
        api.post(&format!("/v1/vms/{name}/{action}"), json!({}))?
    };
    let what = match action {
        "start" => "should run",
        "stop" => "should stop",
        _ => "deleted",
    };
    print(
        out,
        &v,
        &["NAME", "STATE"],
        vec![vec![name.into(), what.into()]],
    );
    Ok(())
}

/// A progress spinner on stderr for table output.
pub(crate) fn spinner(out: Output) -> Option<ProgressBar> {
    if out != Output::Table {
        return None;
    }
    let b = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    b.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    b.enable_steady_tick(Duration::from_millis(120));
    Some(b)
}

const MIGRATION_HEADERS: &[&str] = &[
    "ID",
    "VM",
    "FROM",
    "TO",
    "STATE",
    "REASON",
    "PROGRESS / RESULT",
];

fn migration_row(m: &Value) -> Vec<String> {
    let detail = if let Some(e) = m["error"].as_str() {
        e.to_string()
    } else if let Some(r) = m["report"].as_object() {
        format!(
            "total {} ms, downtime {} ms",
            s(&r["total_ms"]),
            s(&r["downtime_ms"])
        )
    } else {
        s(&m["progress"])
    };
    vec![
        s(&m["id"]),
        s(&m["vm"]),
        s(&m["from"]),
        s(&m["to"]),
        s(&m["state"]),
        s(&m["reason"]),
        detail,
    ]
}

/// `ferry vm migrate NAME [--to HOST]`: queues the migration with the coordinator and, unless
/// `no_wait`, follows it to its end.
pub fn vm_migrate(
    api: &Api,
    name: &str,
    to: Option<String>,
    no_wait: bool,
    options: migration::MigrateOptions,
    out: Output,
) -> Result<()> {
    let m = api.post(
        &format!("/v1/vms/{name}/migrate"),
        json!({ "to": to, "options": options }),
    )?;
    let id = m["id"]
        .as_u64()
        .ok_or_else(|| anyhow!("the API returned no migration id"))?;
    let m = if no_wait { m } else { follow(api, id, out)? };
    print(out, &m, MIGRATION_HEADERS, vec![migration_row(&m)]);
    if m["state"] == "failed" || m["state"] == "cancelled" {
        bail!("migration {id} {}: {}", s(&m["state"]), s(&m["error"]));
    }
    Ok(())
}

fn follow(api: &Api, id: u64, out: Output) -> Result<Value> {
    let bar = spinner(out);
    loop {
        let m = api.get(&format!("/v1/migrations/{id}"))?;
        let state = s(&m["state"]);
        if matches!(state.as_str(), "succeeded" | "failed" | "cancelled") {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            return Ok(m);
        }
        if let Some(b) = &bar {
            b.set_message(format!(
                "migration {id}: {} {}→{} {state} {}",
                s(&m["vm"]),
                s(&m["from"]),
                s(&m["to"]),
                if state == "queued" {
                    "(waiting for a free slot)".into()
                } else {
                    s(&m["progress"])
                }
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `ferry migration list`.
pub fn migration_list(api: &Api, out: Output) -> Result<()> {
    let v = api.get("/v1/migrations")?;
    let rows = v
        .as_array()
        .map(|a| a.iter().map(migration_row).collect())
        .unwrap_or_default();
    print(out, &v, MIGRATION_HEADERS, rows);
    Ok(())
}

/// `ferry migration status ID`.
pub fn migration_show(api: &Api, id: &str, out: Output) -> Result<()> {
    let v = api.get(&format!("/v1/migrations/{id}"))?;
    print(out, &v, MIGRATION_HEADERS, vec![migration_row(&v)]);
    Ok(())
}

/// `ferry migration cancel ID`.
pub fn migration_cancel(api: &Api, id: &str, out: Output) -> Result<()> {
    let v = api.post(&format!("/v1/migrations/{id}/cancel"), json!({}))?;
    print(
        out,
        &v,
        &["ID", "CANCEL"],
        vec![vec![id.into(), "requested".into()]],
    );
    Ok(())
}
