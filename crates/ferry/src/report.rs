//! `ferry report …`: the cluster's utilization, where a VM could go, and its migrations
//! (needs --api); table, JSON or CSV.

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::Value;

use crate::cluster::{s, Api};
use crate::output::print;
use crate::Output;

/// `ferry report` verbs.
#[derive(Debug, Subcommand)]
pub enum ReportCmd {
    /// CPU and memory of every host and VM over a period: average, peak and now (from each
    /// host's own history: an hour at 10 s, a day at 5 min).
    Utilization {
        /// The period back from now: 90s, 30m, 1h, 1d.
        #[arg(long, default_value = "1h")]
        since: String,
    },
    /// Every host scored for a VM: whether it fits, why not, and its CPU load now and with
    /// the VM (best first).
    Placement {
        /// The VM.
        vm: String,
    },
    /// The cluster's migrations over a period: count, reasons, states, total time and
    /// downtime percentiles.
    Migrations {
        /// The period back from now.
        #[arg(long, default_value = "1d")]
        since: String,
    },
}

fn f(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

fn pct(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |x| format!("{:.0}%", x * 100.0))
}

fn stat(v: &Value, digits: usize) -> [String; 3] {
    [
        f(&v["avg"], digits),
        f(&v["peak"], digits),
        f(&v["now"], digits),
    ]
}

/// Two throughputs' averages over the period in kB/s, as `read/write` (`-` when not reported).
fn io(v: &Value, a: &str, b: &str) -> String {
    let avg = |k: &str| v[k]["avg"].as_f64().map(|x| format!("{:.0}", x / 1000.0));
    match (avg(a), avg(b)) {
        (Some(x), Some(y)) => format!("{x}/{y}"),
        _ => "-".into(),
    }
}

/// A dirty rate's average and peak over the period in MiB/s, as `avg/peak`.
fn dirty(v: &Value) -> String {
    let mib = |k: &str| {
        v[k].as_f64()
            .map(|x| format!("{:.1}", x / (1 << 20) as f64))
    };
    match (mib("avg"), mib("peak")) {
        (Some(a), Some(p)) => format!("{a}/{p}"),
        _ => "-".into(),
    }
}

/// One row of the utilization table: the host's (`vm` none) or one of its VMs'.
fn utilization_row(h: &Value, vm: Option<&Value>) -> Vec<String> {
    let (e, name, cores, mem) = match vm {
        None => (h, "-".to_string(), s(&h["cores"]), "memory_used_mib"),
        Some(vm) => (vm, s(&vm["name"]), "-".to_string(), "rss_mib"),
    };
    let [a, p, n] = stat(&e["cpu_cores"], 2);
    let [ma, mp, mn] = stat(&e[mem], 0);
    vec![
        s(&h["host"]),
        name,
        cores,
        a,
        p,
        n,
        ma,
        mp,
        mn,
        io(&e["io"], "disk_read", "disk_write"),
        io(&e["io"], "net_rx", "net_tx"),
        dirty(&e["dirty"]),
        s(&e["samples"]),
    ]
}

/// Runs a `ferry report` verb.
pub fn run(cmd: ReportCmd, out: Output, api: Option<&Api>) -> Result<()> {
    let api =
        api.context("`ferry report` works on the cluster: give --api URL (or set FERRY_API)")?;
    match cmd {
        ReportCmd::Utilization { since } => {
            let v = api.get(&format!("/v1/reports/utilization?since={since}"))?;
            let mut rows = Vec::new();
            for h in v["hosts"].as_array().into_iter().flatten() {
                rows.push(utilization_row(h, None));
                for vm in h["vms"].as_array().into_iter().flatten() {
                    rows.push(utilization_row(h, Some(vm)));
                }
            }
            print(
                out,
                &v,
                &[
                    "HOST",
                    "VM",
                    "CORES",
                    "CPU AVG",
                    "CPU PEAK",
                    "CPU NOW",
                    "MEM AVG MiB",
                    "MEM PEAK MiB",
                    "MEM NOW MiB",
                    "DISK R/W KB/s",
                    "NET RX/TX KB/s",
                    "DIRTY AVG/PEAK MiB/s",
                    "SAMPLES",
                ],
                rows,
            );
            if out == Output::Table {
                for (h, why) in v["unreachable"].as_object().into_iter().flatten() {
                    eprintln!("ferry: {h} did not answer: {}", s(why));
                }
            }
        }
        ReportCmd::Placement { vm } => {
            let v = api.get(&format!("/v1/reports/placement/{vm}"))?;
            let rows = v["candidates"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    vec![
                        s(&c["host"]),
                        if c["fits"] == true { "yes" } else { "no" }.into(),
                        pct(&c["load_now"]),
                        pct(&c["load_after"]),
                        s(&c["uncommitted_mib"]),
                        s(&c["why"]),
                    ]
                })
                .collect();
            if out == Output::Table {
                println!(
                    "{vm} runs on {} using {} cores and {} MiB",
                    s(&v["host"]),
                    f(&v["cpu_cores"], 2),
                    s(&v["memory_mib"])
                );
            }
            print(
                out,
                &v,
                &[
                    "HOST",
                    "FITS",
                    "LOAD NOW",
                    "LOAD AFTER",
                    "UNCOMMITTED MiB",
                    "WHY",
                ],
                rows,
            );
        }
        ReportCmd::Migrations { since } => {
            let v = api.get(&format!("/v1/reports/migrations?since={since}"))?;
            let join = |m: &Value| {
                m.as_object()
                    .map(|o| {
                        o.iter()
                            .map(|(k, n)| format!("{k}={n}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .filter(|x| !x.is_empty())
                    .unwrap_or_else(|| "-".into())
            };
            let p = |x: &Value| {
                format!(
                    "{} / {} / {}",
                    f(&x["p50"], 0),
                    f(&x["p95"], 0),
                    f(&x["max"], 0)
                )
            };
            let rows = vec![
                vec!["migrations".into(), s(&v["count"])],
                vec!["by reason".into(), join(&v["by_reason"])],
                vec!["by state".into(), join(&v["by_state"])],
                vec!["total ms (p50 / p95 / max)".into(), p(&v["total_ms"])],
                vec!["downtime ms (p50 / p95 / max)".into(), p(&v["downtime_ms"])],
            ];
            print(out, &v, &["", ""], rows);
        }
    }
    Ok(())
}
