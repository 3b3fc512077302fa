//! `ferry host ...`: this host's inventory, and the cluster's hosts.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Subcommand;
use serde_json::json;
use vmm::cpuid::{self, CpuModel};

use crate::cluster::{self, s, spinner, Api};
use crate::output::print;
use crate::Output;

/// `ferry host` verbs.
#[derive(Debug, Subcommand)]
pub enum HostCmd {
    /// This host's processor as guests see it: vendor, model, the features it offers (after
    /// the host config's hide list), and what each CPU model leaves of them.
    Cpu,
    /// The CPU features every cluster host offers (the `cluster` CPU model) and which hosts
    /// limit it (needs --api).
    CpuBaseline,
    /// The cluster's hosts (needs --api).
    List,
    /// One cluster host (needs --api).
    Show {
        /// Host name.
        host: String,
    },
    /// Pause a host and live-migrate its VMs away (needs --api); waits until it is empty.
    Drain {
        /// Host name.
        host: String,
        /// Return once the drain has started.
        #[arg(long)]
        no_wait: bool,
    },
    /// Return a paused host to service (needs --api).
    Resume {
        /// Host name.
        host: String,
        /// Move the VMs its last drain moved away back to it.
        #[arg(long)]
        failback: bool,
    },
    /// Live-migrate a host's VMs away and switch it off through its power driver (needs
    /// --api); waits until it is in standby. Refused, changing nothing, when a VM has nowhere
    /// to go or the host has no power driver.
    Standby {
        /// Host name.
        host: String,
        /// Return once it is being emptied.
        #[arg(long)]
        no_wait: bool,
    },
    /// Switch a standby host on again through its power driver (needs --api); waits until its
    /// agent has joined.
    Wake {
        /// Host name.
        host: String,
        /// Return once the coordinator has been asked.
        #[arg(long)]
        no_wait: bool,
    },
}

/// Runs a `ferry host` verb.
pub fn run(cmd: HostCmd, out: Output, api: Option<&Api>) -> Result<()> {
    let need = || {
        api.ok_or_else(|| {
            anyhow::anyhow!("this verb works on the cluster: give --api URL (or set FERRY_API)")
        })
    };
    match cmd {
        HostCmd::Cpu => cpu(out),
        HostCmd::List => cluster::host_list(need()?, out),
        HostCmd::CpuBaseline => cluster::cpu_baseline(need()?, out),
        HostCmd::Show { host } => cluster::host_show(need()?, &host, out),
        HostCmd::Drain { host, no_wait } => cluster::host_drain(need()?, &host, no_wait, out),
        HostCmd::Resume { host, failback } => cluster::host_resume(need()?, &host, failback, out),
        HostCmd::Standby { host, no_wait } => power(need()?, &host, false, no_wait, out),
        HostCmd::Wake { host, no_wait } => power(need()?, &host, true, no_wait, out),
    }
}

/// `ferry host standby|wake HOST`: asks, then (unless `no_wait`) follows the host's state
/// until it is in standby (`on == false`) or up.
fn power(api: &Api, host: &str, on: bool, no_wait: bool, out: Output) -> Result<()> {
    let verb = if on { "wake" } else { "standby" };
    let v = api.post(&format!("/v1/hosts/{host}/{verb}"), json!({}))?;
    let mut state = s(&v["state"]);
    if !no_wait {
        let want = if on { "up" } else { "standby" };
        let bar = spinner(out);
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            let h = match api.get(&format!("/v1/hosts/{host}")) {
                Ok(h) => h,
                // The host answering the CLI may be the one switched off.
                Err(e)
                    if !on
                        && state == "evacuating"
                        && format!("{e:#}").contains("cannot reach") =>
                {
                    if let Some(b) = &bar {
                        b.finish_and_clear();
                    }
                    eprintln!("ferry: the API host stopped answering as {host} went off; ask another host from now on");
                    state = "standby".into();
                    break;
                }
                Err(e) => return Err(e),
            };
            state = s(&h["state"]);
            if state == want {
                break;
            }
            // The coordinator gave up: the power driver failed or the host did not join.
            let note = s(&h["power_note"]);
            if (on && state == "standby") || (!on && state == "up") {
                bail!("{host} is {state}: {note}");
            }
            let left = h["vms"].as_array().map_or(0, Vec::len);
            let msg = match state.as_str() {
                "evacuating" => format!("emptying {host}: {left} VM(s) left"),
                "waking" => format!("switching {host} on: waiting for its agent to join"),
                other => format!("{host}: {other}"),
            };
            if let Some(b) = &bar {
                b.set_message(msg);
            }
            if Instant::now() > deadline {
                bail!("{host} is still {state} after an hour");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
    }
    print(
        out,
        &json!({"host": host, "state": state}),
        &["HOST", "STATE"],
        vec![vec![host.to_string(), state]],
    );
    Ok(())
}

fn cpu(out: Output) -> Result<()> {
    let kvm = vmm::vm::open_kvm()?;
    let cfg = vmm::host::HostConfig::load()?;
    let offered = vmm::host::cpuid(&kvm)?;
    let entries = offered.as_slice();
    let features = cpuid::feature_names(entries);
    let mut models = serde_json::Map::new();
    let mut rows = vec![
        vec!["vendor".to_string(), cpuid::vendor(entries)],
        vec!["model".to_string(), {
            let b = vmm::host::brand(entries);
            if b.is_empty() {
                "-".into()
            } else {
                b
            }
        }],
        vec!["features".to_string(), features.join(" ")],
        vec![
            "hidden by the host config".to_string(),
            cfg.cpu.hide.join(" "),
        ],
    ];
    for m in CpuModel::ALL.into_iter().skip(1) {
        let mut e = entries.to_vec();
        cpuid::apply_model(&mut e, m);
        let seen = cpuid::feature_names(&e);
        let missing = cpuid::model_missing(entries, m);
        rows.push(vec![
            format!("guests of model {m}"),
            if missing.is_empty() {
                seen.join(" ")
            } else {
                format!("unavailable: this host lacks {}", missing.join(" "))
            },
        ]);
        models.insert(
            m.name().to_string(),
            serde_json::json!({ "available": missing.is_empty(), "features": seen, "lacks": missing }),
        );
    }
    let v = serde_json::json!({
        "vendor": cpuid::vendor(entries),
        "model": vmm::host::brand(entries),
        "features": features,
        "hidden": cfg.cpu.hide,
        "models": models,
    });
    print(out, &v, &["", ""], rows);
    Ok(())
}
