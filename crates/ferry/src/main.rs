//! `ferry`: the command line.

mod cluster;
mod host;
mod migrate;
mod output;
mod pki;
mod vm;

use clap::{Parser, Subcommand, ValueEnum};

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for scripts.
    Json,
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
    /// The cluster as a whole (needs --api).
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
}

fn main() {
    let cli = Cli::parse();
    let res = cli.api.resolve().and_then(|api| match cli.cmd {
        Cmd::Vm(c) => vm::run(c, cli.output, api.as_ref()),
        Cmd::Migration(c) => migrate::run_cmd(c, cli.output, api.as_ref()),
        Cmd::Pki(c) => pki::run(c, cli.output),
        Cmd::Host(c) => host::run(c, cli.output, api.as_ref()),
        Cmd::Cluster(c) => match api {
            Some(api) => cluster::run_cluster(c, &api, cli.output),
            None => Err(anyhow::anyhow!(
                "`ferry cluster` needs a cluster API: give --api URL (or set FERRY_API)"
            )),
        },
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
