//! Ferry's cluster: `ferryd`, the agent on every host. It supervises the VM workers of its
//! host, keeps the host's lease and report in the cluster store, serves the REST API, and —
//! on the one host elected coordinator — runs the cluster loops: placement, HA restart of the
//! VMs of dead hosts, admission of live migrations under the cluster's limits, and draining.
//! See `docs/cluster.md`.
#![deny(missing_docs)]

pub mod agent;
pub mod api;
pub mod balance;
mod balancing;
mod commit;
pub mod config;
pub mod coordinator;
pub mod db;
mod destination;
pub mod disks;
pub mod history;
pub mod inventory;
mod lease;
pub mod peer;
pub mod power;
pub mod reconcile;
pub mod records;
pub mod reports;
mod source;
mod utilization;
pub mod view;

pub use config::AgentConfig;

/// Cluster errors.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The configuration is unusable.
    #[error("config: {0}")]
    Config(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] ferry_store::StoreError),
    /// A record could not be read or written.
    #[error("record: {0}")]
    Record(String),
    /// A worker could not be started or asked.
    #[error(transparent)]
    Worker(#[from] ferry_worker::client::ClientError),
    /// Another host's API failed.
    #[error("host {0}: {1}")]
    Peer(String, #[source] peer::PeerError),
    /// A host is not in the cluster (down or unknown).
    #[error("host {0} is not in the cluster")]
    HostGone(String),
    /// The request is wrong (HTTP 400/404/409).
    #[error("{1}")]
    Request(u16, String),
    /// I/O.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

use std::sync::Arc;

/// Runs the agent: joins the cluster, starts its loops and serves the API until SIGTERM or
/// SIGINT. On the way out it stops this host's VMs and gives up its lease, so the cluster
/// restarts its HA VMs elsewhere at once instead of waiting for the lease to expire.
pub async fn serve(cfg: AgentConfig, worker_bin: std::path::PathBuf) -> Result<(), ClusterError> {
    let store = match &cfg.store {
        config::StoreConfig::Embedded { path } => ferry_store::Store::open_embedded(path)?,
        config::StoreConfig::Etcd { endpoints } => {
            ferry_store::Store::connect_etcd(endpoints).await?
        }
    };
    std::fs::create_dir_all(&cfg.run_dir)
        .map_err(|e| ClusterError::Io(format!("cannot create {}", cfg.run_dir.display()), e))?;
    let workers = ferry_worker::client::Workers::new(cfg.run_dir.clone(), worker_bin);
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| ClusterError::Io(format!("cannot listen on {}", cfg.listen), e))?;
    let agent = agent::Agent::new(cfg, store, workers)?;
    tracing::info!(
        "ferryd {} on {} (API {})",
        agent.host(),
        agent.cfg.listen,
        agent.cfg.api_url()
    );
    tokio::spawn(Arc::clone(&agent).heartbeat_loop());
    tokio::spawn(Arc::clone(&agent).fence_watchdog());
    tokio::spawn(Arc::clone(&agent).reconcile_loop());
    tokio::spawn(Arc::clone(&agent).sample_loop());
    tokio::spawn(coordinator::coordinator_loop(Arc::clone(&agent)));
    let app = api::router(Arc::clone(&agent));
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| ClusterError::Io("the API server failed".into(), e))?;
    agent.leave().await;
    Ok(())
}
