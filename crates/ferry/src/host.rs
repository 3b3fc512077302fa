//! `ferry host ...`: this host's inventory.

use anyhow::Result;
use clap::Subcommand;
use vmm::cpuid::{self, CpuModel};

use crate::cluster::{self, Api};
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
    }
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
