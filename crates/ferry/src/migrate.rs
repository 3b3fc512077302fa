//! `ferry vm migrate` and `ferry migration ...`: live and quick migration with progress.

use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use ferry_worker::api::Request;
use ferry_worker::client::Workers;
use indicatif::{ProgressBar, ProgressStyle};
use migration::protocol::Compression;
use migration::{MigrateOptions, MigrationStatus, TimeoutPolicy};

use crate::output::mib;
use crate::output::print;
use crate::vm::{request, status, wait_exit};
use crate::Output;

/// What to do when pre-copy does not converge in time.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OnTimeout {
    /// Give up; the VM stays on the source.
    Cancel,
    /// Pause and copy the rest anyway.
    SwitchOver,
}

/// Migration tunables.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Quick migration: pause, copy everything, resume on the destination (no pre-copy).
    #[arg(long)]
    quick: bool,
    /// Switch over once the expected downtime is at most this many milliseconds.
    #[arg(long, default_value_t = migration::source::DEFAULT_DOWNTIME_MS)]
    downtime_ms: u64,
    /// Pre-copy rounds before --on-timeout applies.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Seconds of pre-copy before --on-timeout applies.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// What to do when pre-copy does not converge.
    #[arg(long, value_enum, default_value_t = OnTimeout::Cancel)]
    on_timeout: OnTimeout,
    /// Do not slow the vCPUs down when rounds stop shrinking.
    #[arg(long)]
    no_auto_converge: bool,
    /// Bandwidth cap in MiB/s (0: none).
    #[arg(long, default_value_t = 0)]
    bandwidth: u64,
    /// Compression of memory pages on the wire.
    #[arg(long, value_enum, default_value_t = Compress::None)]
    compress: Compress,
    /// TCP connections the memory travels over, in parallel (1-16).
    #[arg(long, default_value_t = migration::source::DEFAULT_CONNECTIONS,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(migration::protocol::MAX_CONNECTIONS)))]
    connections: u8,
    #[command(flatten)]
    security: crate::pki::SecurityArgs,
}

/// Compression of memory pages on the wire.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Compress {
    /// None: best on fast links.
    None,
    /// LZ4: cheap; helps on 1-10 GbE links.
    Lz4,
    /// Zstandard (level 1): smaller, more CPU; for slow links.
    Zstd,
}

/// `ferry migration` verbs.
#[derive(Debug, Subcommand)]
pub enum MigrationCmd {
    /// Progress of a VM's running (or last) migration (with --api: of migration ID).
    Status {
        /// VM name (with --api: migration id).
        name: String,
    },
    /// Cancel a VM's migration (before its commit point the VM simply continues here); with
    /// --api, cluster migration ID (queued or running).
    Cancel {
        /// VM name (with --api: migration id).
        name: String,
    },
    /// The cluster's migrations (needs --api).
    List,
}

/// Runs a `ferry migration` verb.
pub fn run_cmd(cmd: MigrationCmd, out: Output, api: Option<&crate::cluster::Api>) -> Result<()> {
    if let Some(api) = api {
        return match cmd {
            MigrationCmd::List => crate::cluster::migration_list(api, out),
            MigrationCmd::Status { name } => crate::cluster::migration_show(api, &name, out),
            MigrationCmd::Cancel { name } => crate::cluster::migration_cancel(api, &name, out),
        };
    }
    match cmd {
        MigrationCmd::List => {
            anyhow::bail!(
                "`ferry migration list` works on the cluster: give --api URL (or set FERRY_API)"
            )
        }
        MigrationCmd::Status { name } => {
            let v = request(&name, &Request::MigrationStatus)?;
            let st: MigrationStatus = serde_json::from_value(v.clone())?;
            print(out, &v, STATUS_HEADERS, vec![status_row(&name, &st)]);
            Ok(())
        }
        MigrationCmd::Cancel { name } => {
            request(&name, &Request::MigrationCancel)?;
            print(
                out,
                &serde_json::json!({"name": name, "cancelling": true}),
                &["NAME", "MIGRATION"],
                vec![vec![name.clone(), "cancelling".into()]],
            );
            Ok(())
        }
    }
}

const STATUS_HEADERS: &[&str] = &[
    "NAME",
    "PHASE",
    "ROUND",
    "SENT",
    "REMAINING",
    "DIRTY RATE",
    "THROUGHPUT",
    "EXP. DOWNTIME",
];

fn status_row(name: &str, s: &MigrationStatus) -> Vec<String> {
    vec![
        name.to_string(),
        phase_name(s),
        s.round.to_string(),
        mib(s.bytes_sent),
        mib(s.pages_remaining * 4096),
        format!("{} pages/s", s.dirty_rate_pps),
        format!("{}/s", mib(s.throughput_bps)),
        format!("{} ms", s.expected_downtime_ms),
    ]
}

/// One line of migration progress, for people.
pub fn progress_line(st: &MigrationStatus) -> String {
    format!(
        "{} round {} · sent {} · remaining {} · dirty {} pages/s · {}/s · expected downtime {} ms{}",
        phase_name(st),
        st.round,
        mib(st.bytes_sent),
        mib(st.pages_remaining * 4096),
        st.dirty_rate_pps,
        mib(st.throughput_bps),
        st.expected_downtime_ms,
        if st.throttle_pct > 0 {
            format!(" · throttle {}%", st.throttle_pct)
        } else {
            String::new()
        }
    )
}

/// The engine's options from the command line.
pub fn options(a: &MigrateArgs) -> MigrateOptions {
    MigrateOptions {
        downtime_ms: a.downtime_ms,
        max_rounds: a.max_rounds,
        timeout_s: a.timeout,
        on_timeout: match a.on_timeout {
            OnTimeout::Cancel => TimeoutPolicy::Cancel,
            OnTimeout::SwitchOver => TimeoutPolicy::SwitchOver,
        },
        auto_converge: !a.no_auto_converge,
        bandwidth_mib_s: a.bandwidth,
        quick: a.quick,
        compression: match a.compress {
            Compress::None => Compression::None,
            Compress::Lz4 => Compression::Lz4,
            Compress::Zstd => Compression::Zstd,
        },
        connections: a.connections,
    }
}

/// `ferry vm migrate NAME --to ADDR`.
pub fn run(name: &str, to: &str, a: MigrateArgs, out: Output) -> Result<()> {
    let pid = status(name)?.pid;
    let options = options(&a);
    let pki = a.security.resolve()?;
    let bar = if out == Output::Table && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let b = ProgressBar::new_spinner();
        b.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        Some(b)
    } else {
        None
    };
    let mut last_phase = String::new();
    let result = Workers::from_env()?.migrate(
        name,
        to,
        options,
        pki,
        |st| {
            let phase = phase_name(st);
            let msg = progress_line(st);
            match &bar {
                Some(b) => b.set_message(msg),
                None if out == Output::Table && phase != last_phase => eprintln!("{msg}"),
                None => {}
            }
            last_phase = phase;
        },
        None,
    );
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let report = result?;
    wait_exit(pid, Duration::from_secs(30))?;
    print(
        out,
        &report,
        &[
            "NAME",
            "TO",
            "TOTAL",
            "DOWNTIME",
            "GUEST-OBSERVED",
            "ROUNDS",
            "ON THE WIRE",
            "ZERO PAGES SKIPPED",
            "MAX THROTTLE",
            "COMPRESSION",
            "CHANNEL",
        ],
        vec![vec![
            name.to_string(),
            to.to_string(),
            format!("{} ms", report.total_ms),
            match report.downtime_missed_by_ms {
                Some(over) => format!(
                    "{} ms (target {} ms, missed by {over} ms)",
                    report.downtime_ms, report.downtime_target_ms
                ),
                None => format!("{} ms", report.downtime_ms),
            },
            report
                .guest_downtime_ms
                .map(|g| format!("{g} ms"))
                .unwrap_or_else(|| "-".into()),
            report.rounds.to_string(),
            mib(report.bytes_sent),
            report.zero_pages_skipped.to_string(),
            format!("{}%", report.max_throttle_pct),
            format!(
                "{} ({:.2}×)",
                serde_json::to_value(report.compression)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                report.compression_ratio
            ),
            format!(
                "{} × {}",
                report.connections,
                if report.tls { "TLS" } else { "plain TCP" }
            ),
        ]],
    );
    if out == Output::Table {
        println!("downtime: {}", downtime_steps(&report.downtime_steps));
    }
    Ok(())
}

/// The downtime's steps on one line, in ms.
pub fn downtime_steps(d: &migration::source::DowntimeSteps) -> String {
    let ms = |us: u64| format!("{:.1}", us as f64 / 1000.0);
    format!(
        "pause {} · dirty log {} · last pages {} · disks {} · state capture {} · state transfer {} · destination restore {} · pre-commit check {} · resume {} (ms)",
        ms(d.pause_us),
        ms(d.dirty_log_us),
        ms(d.last_pages_us),
        ms(d.disks_us),
        ms(d.state_capture_us),
        ms(d.state_transfer_us),
        ms(d.dest_restore_us),
        ms(d.precommit_us),
        ms(d.resume_us),
    )
}

fn phase_name(s: &MigrationStatus) -> String {
    serde_json::to_value(s.phase)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
