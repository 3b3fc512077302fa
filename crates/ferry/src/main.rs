//! `ferry`: the command line.

mod cluster;
mod disk;
mod host;
mod localcluster;
mod migrate;
mod output;
mod pki;
mod report;
mod vm;
mod vm_disk;

use clap::{Parser, Subcommand, ValueEnum};

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for scripts.
    Json,
    /// CSV (a header line, then the table's rows) for spreadsheets.
    Csv,
}

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: run KVM virtual machines and move them between hosts"
)]
struct Cli {
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(flatten)]
    api: cluster::ApiArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Virtual machines on this host.
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// Migrations of this host's VMs.
    #[command(subcommand)]
    Migration(migrate::MigrationCmd),
    /// This host.
    #[command(subcommand)]
    Host(host::HostCmd),
    /// The cluster CA and host identities that authenticate migrations.
    #[command(subcommand)]
    Pki(pki::PkiCmd),
    /// Raw disk images.
    #[command(subcommand)]
    Disk(disk::DiskCmd),
    /// The cluster as a whole; a local cluster on this machine.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Reports on the cluster: utilization, placement, migrations.
    #[command(subcommand)]
    Report(report::ReportCmd),
}

fn main() {
    let cli = Cli::parse();
    // `cluster up|down` make a cluster; they must not need one.
    let local = matches!(
        cli.cmd,
        Cmd::Cluster(cluster::ClusterCmd::Up { .. } | cluster::ClusterCmd::Down { .. })
    );
    let api = if local { Ok(None) } else { cli.api.resolve() };
    let res = api.and_then(|api| match cli.cmd {
        Cmd::Vm(c) => vm::run(c, cli.output, api.as_ref()),
        Cmd::Migration(c) => migrate::run_cmd(c, cli.output, api.as_ref()),
        Cmd::Pki(c) => pki::run(c, cli.output),
        Cmd::Disk(c) => disk::run(c, cli.output),
        Cmd::Host(c) => host::run(c, cli.output, api.as_ref()),
        Cmd::Cluster(c) => cluster::run_cluster(c, api.as_ref(), cli.output),
        Cmd::Report(c) => report::run(c, cli.output, api.as_ref()),
    });
    if let Err(e) = res {
        if cli.output == Output::Json {
            println!("{}", serde_json::json!({ "error": format!("{e:#}") }));
        } else {
            eprintln!("ferry: {e:#}");
        }
        std::process::exit(1);
    }
}
