//! A single-member etcd process on loopback, for the demo cluster and the tests: started from
//! Debian's `etcd-server` package (`etcd` on the PATH, or `$FERRY_ETCD_BIN`), stopped (and its
//! data removed) on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Store, StoreError};

/// A running etcd.
pub struct LocalEtcd {
    child: Child,
    data: PathBuf,
    client: u16,
    peer: u16,
    endpoint: String,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn io(what: &str, e: std::io::Error) -> StoreError {
    StoreError::Io(what.to_string(), e)
}

fn spawn(data: &Path, client: u16, peer: u16) -> Result<Child, StoreError> {
    let endpoint = format!("http://127.0.0.1:{client}");
    let bin = std::env::var_os("FERRY_ETCD_BIN").unwrap_or_else(|| "etcd".into());
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(data.join("etcd.log"))
        .map_err(|e| io("cannot create etcd.log", e))?;
    Command::new(&bin)
        .arg("--name")
        .arg("ferry-local")
        .arg("--data-dir")
        .arg(data.join("member"))
        .arg("--listen-client-urls")
        .arg(&endpoint)
        .arg("--advertise-client-urls")
        .arg(&endpoint)
        .arg("--listen-peer-urls")
        .arg(format!("http://127.0.0.1:{peer}"))
        .arg("--initial-advertise-peer-urls")
        .arg(format!("http://127.0.0.1:{peer}"))
        .arg("--initial-cluster")
        .arg(format!("ferry-local=http://127.0.0.1:{peer}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| {
            io(
                "cannot start etcd (install Debian's etcd-server package or set FERRY_ETCD_BIN)",
                e,
            )
        })
}

impl LocalEtcd {
    /// Starts etcd with its data in `data` (created; wiped first) and waits until it answers.
    pub async fn start(data: &Path) -> Result<LocalEtcd, StoreError> {
        let _ = std::fs::remove_dir_all(data);
        std::fs::create_dir_all(data).map_err(|e| io("cannot create the etcd data dir", e))?;
        let client = free_port().map_err(|e| io("no free port", e))?;
        let peer = free_port().map_err(|e| io("no free port", e))?;
        let mut me = LocalEtcd {
            child: spawn(data, client, peer)?,
            data: data.to_path_buf(),
            client,
            peer,
            endpoint: format!("http://127.0.0.1:{client}"),
        };
        me.wait_ready().await?;
        Ok(me)
    }

    /// Kills etcd (SIGKILL, as a crash) and starts it again on the same data and ports.
    pub async fn restart(&mut self) -> Result<(), StoreError> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.data, self.client, self.peer)?;
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<(), StoreError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = Store::connect_etcd(std::slice::from_ref(&self.endpoint)).await {
                if s.get("/ferry-probe").await.is_ok() {
                    return Ok(());
                }
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(StoreError::Etcd(format!(
                    "etcd exited ({st}); see {}",
                    self.data.join("etcd.log").display()
                )));
            }
            if Instant::now() > deadline {
                return Err(StoreError::Timeout(Duration::from_secs(30)));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The client URL.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// etcd's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}
