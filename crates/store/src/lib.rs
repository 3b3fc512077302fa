//! Ferry's cluster state store: a small key-value interface with revisions, compare-and-put
//! and leases, in two implementations.
//!
//! - [`Store::open_embedded`]: one host with no cluster; the keys live in memory and in one
//!   file (rewritten atomically on every change). Leased keys are not persisted: after a
//!   restart they are gone, like the leases of a restarted etcd member's clients.
//! - [`Store::connect_etcd`]: an etcd v3 cluster (3.4 or later), for any number of hosts.
//!
//! Every value is opaque bytes; `ferry-cluster` stores versioned JSON records
//! (`docs/cluster.md`). Every call to etcd has a deadline ([`CALL_TIMEOUT`]) so that a host
//! cut off from the store finds out in time to fence itself.
#![deny(missing_docs)]

pub mod local_etcd;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Deadline of one etcd call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Version of the embedded store's file.
pub const EMBEDDED_VERSION: u32 = 1;

/// A lease id (etcd's, or the embedded store's own counter).
pub type LeaseId = i64;

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The etcd cluster refused or failed a call.
    #[error("etcd: {0}")]
    Etcd(String),
    /// The call did not finish within [`CALL_TIMEOUT`].
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    /// The lease is gone (expired or revoked).
    #[error("lease {0:x} has expired")]
    LeaseExpired(LeaseId),
    /// The embedded store's file could not be read or written.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The embedded store's file is not one this version reads.
    #[error("{0}: {1}")]
    Corrupt(PathBuf, String),
}

type Result<T> = std::result::Result<T, StoreError>;

/// A key with its value and the revision of its last change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Store revision of the key's last change (never 0 for an existing key).
    pub mod_revision: i64,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// The cluster state store.
#[derive(Clone)]
pub enum Store {
    /// In-process, persisted to one file.
    Embedded(Arc<Embedded>),
    /// An etcd cluster.
    Etcd(Box<etcd_client::Client>),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Embedded(e) => write!(f, "embedded store at {}", e.path.display()),
            Store::Etcd(_) => f.write_str("etcd store"),
        }
    }
}

async fn deadline<T, E: std::fmt::Display>(
    fut: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StoreError::Etcd(e.to_string())),
        Err(_) => Err(StoreError::Timeout(CALL_TIMEOUT)),
    }
}

fn kv_of(k: &etcd_client::KeyValue) -> Kv {
    Kv {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: k.value().to_vec(),
        mod_revision: k.mod_revision(),
        lease: (k.lease() != 0).then_some(k.lease()),
    }
}

impl Store {
    /// Opens (or creates) the embedded store kept in `path`.
    pub fn open_embedded(path: &Path) -> Result<Store> {
        Ok(Store::Embedded(Arc::new(Embedded::open(path)?)))
    }

    /// Connects to etcd at `endpoints` (`http://host:port`).
    pub async fn connect_etcd(endpoints: &[String]) -> Result<Store> {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT);
        let c = deadline(etcd_client::Client::connect(endpoints, Some(opts))).await?;
        Ok(Store::Etcd(Box::new(c)))
    }

    /// The key, if present.
    pub async fn get(&self, key: &str) -> Result<Option<Kv>> {
        match self {
            Store::Embedded(e) => Ok(e.get(key)),
            Store::Etcd(c) => {
                let mut kv = c.kv_client();
                let r = deadline(kv.get(key, None)).await?;
                Ok(r.kvs().first().map(kv_of))
            }
        }
    }

    /// Every key starting with `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Kv>> {
        match self {
            Store::Embedded(e) => Ok(e.list(prefix)),
            Store::Etcd(c) => {
                let mut kv = c.kv_client();
                let opts = etcd_client::GetOptions::new().with_prefix();
                let r = deadline(kv.get(prefix, Some(opts))).await?;
                Ok(r.kvs().iter().map(kv_of).collect())
            }
        }
    }

    /// Writes `key` unconditionally (attached to `lease` if given).
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<()> {
        match self {
            Store::Embedded(e) => e.put(key, value, lease, None).map(|_| ()),
            Store::Etcd(c) => {
                let mut kv = c.kv_client();
                let opts = lease.map(|l| etcd_client::PutOptions::new().with_lease(l));
                deadline(kv.put(key, value, opts)).await?;
                Ok(())
            }
        }
    }

    /// Writes `key` only if its mod revision is `expected` (0: only if absent). Whether it
    /// wrote.
    pub async fn compare_and_put(
        &self,
        key: &str,
        expected: i64,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<bool> {
        match self {
            Store::Embedded(e) => e.put(key, value, lease, Some(expected)),
            Store::Etcd(c) => {
                use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                let mut kv = c.kv_client();
                let opts = lease.map(|l| etcd_client::PutOptions::new().with_lease(l));
                let txn = Txn::new()
                    .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
                    .and_then([TxnOp::put(key, value, opts)]);
                let r = deadline(kv.txn(txn)).await?;
                Ok(r.succeeded())
            }
        }
    }

    /// Deletes `key` only if its mod revision is `expected`. Whether it deleted.
    pub async fn compare_and_delete(&self, key: &str, expected: i64) -> Result<bool> {
        match self {
            Store::Embedded(e) => e.delete(key, Some(expected)),
            Store::Etcd(c) => {
                use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                let mut kv = c.kv_client();
                let txn = Txn::new()
                    .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
                    .and_then([TxnOp::delete(key, None)]);
                let r = deadline(kv.txn(txn)).await?;
                Ok(r.succeeded())
            }
        }
    }

    /// Deletes `key`; whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        match self {
            Store::Embedded(e) => e.delete(key, None),
            Store::Etcd(c) => {
                let mut kv = c.kv_client();
                let r = deadline(kv.delete(key, None)).await?;
                Ok(r.deleted() > 0)
            }
        }
    }

    /// A new lease that expires `ttl` after its last renewal.
    pub async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        match self {
            Store::Embedded(e) => Ok(e.grant(ttl)),
            Store::Etcd(c) => {
                let mut l = c.lease_client();
                Ok(deadline(l.grant(secs, None)).await?.id())
            }
        }
    }

    /// Renews `lease`; [`StoreError::LeaseExpired`] when it is already gone.
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        match self {
            Store::Embedded(e) => e.keep_alive(lease),
            Store::Etcd(c) => {
                let mut l = c.lease_client();
                let fut = async {
                    let (mut keeper, mut stream) = l.keep_alive(lease).await?;
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                match deadline(fut).await {
                    Ok(Some(r)) if r.ttl() > 0 => Ok(()),
                    Ok(_) => Err(StoreError::LeaseExpired(lease)),
                    Err(StoreError::Etcd(e)) if e.contains("lease not found") => {
                        Err(StoreError::LeaseExpired(lease))
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Ends `lease` now, deleting its keys.
    pub async fn revoke(&self, lease: LeaseId) -> Result<()> {
        match self {
            Store::Embedded(e) => {
                e.revoke(lease);
                Ok(())
            }
            Store::Etcd(c) => {
                let mut l = c.lease_client();
                deadline(l.revoke(lease)).await?;
                Ok(())
            }
        }
    }
}

/// The embedded store.
pub struct Embedded {
    path: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    revision: i64,
    keys: BTreeMap<String, Entry>,
    next_lease: LeaseId,
    leases: HashMap<LeaseId, (Duration, Instant)>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Entry {
    value: Vec<u8>,
    mod_revision: i64,
    #[serde(skip)]
    lease: Option<LeaseId>,
}

/// The embedded store's file.
#[derive(Serialize, Deserialize)]
struct FileImage {
    version: u32,
    revision: i64,
    keys: BTreeMap<String, Entry>,
}

impl Embedded {
    fn open(path: &Path) -> Result<Embedded> {
        let mut inner = Inner {
            next_lease: 1,
            ..Default::default()
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let img: FileImage = serde_json::from_slice(&bytes)
                    .map_err(|e| StoreError::Corrupt(path.to_path_buf(), e.to_string()))?;
                if img.version != EMBEDDED_VERSION {
                    return Err(StoreError::Corrupt(
                        path.to_path_buf(),
                        format!(
                            "store file version {} (this Ferry reads {EMBEDDED_VERSION})",
                            img.version
                        ),
                    ));
                }
                inner.revision = img.revision;
                inner.keys = img.keys;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::Io(format!("cannot read {}", path.display()), e)),
        }
        Ok(Embedded {
            path: path.to_path_buf(),
            inner: Mutex::new(inner),
        })
    }

    /// The state with expired leases (and their keys) removed.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let expired: Vec<LeaseId> = g
            .leases
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            g.drop_lease(id);
        }
        g
    }

    fn get(&self, key: &str) -> Option<Kv> {
        let g = self.lock();
        g.keys.get(key).map(|e| e.kv(key))
    }

    fn list(&self, prefix: &str) -> Vec<Kv> {
        let g = self.lock();
        g.keys
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| e.kv(k))
            .collect()
    }

    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        expected: Option<i64>,
    ) -> Result<bool> {
        let mut g = self.lock();
        if let Some(l) = lease {
            if !g.leases.contains_key(&l) {
                return Err(StoreError::LeaseExpired(l));
            }
        }
        if let Some(exp) = expected {
            let cur = g.keys.get(key).map_or(0, |e| e.mod_revision);
            if cur != exp {
                return Ok(false);
            }
        }
        g.revision += 1;
        let rev = g.revision;
        let before = g.keys.insert(
            key.to_string(),
            Entry {
                value,
                mod_revision: rev,
                lease,
            },
        );
        if lease.is_none() || before.is_some_and(|b| b.lease.is_none()) {
            self.persist(&g)?;
        }
        Ok(true)
    }

    fn delete(&self, key: &str, expected: Option<i64>) -> Result<bool> {
        let mut g = self.lock();
        let cur = g.keys.get(key).map_or(0, |e| e.mod_revision);
        if cur == 0 || expected.is_some_and(|e| e != cur) {
            return Ok(false);
        }
        g.revision += 1;
        let gone = g.keys.remove(key);
        if gone.is_some_and(|e| e.lease.is_none()) {
            self.persist(&g)?;
        }
        Ok(true)
    }

    fn grant(&self, ttl: Duration) -> LeaseId {
        let mut g = self.lock();
        let id = g.next_lease;
        g.next_lease += 1;
        g.leases.insert(id, (ttl, Instant::now() + ttl));
        id
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let mut g = self.lock();
        match g.leases.get_mut(&lease) {
            Some((ttl, until)) => {
                *until = Instant::now() + *ttl;
                Ok(())
            }
            None => Err(StoreError::LeaseExpired(lease)),
        }
    }

    fn revoke(&self, lease: LeaseId) {
        let mut g = self.lock();
        g.drop_lease(lease);
    }

    /// Writes the persistent keys to a temporary file, syncs it and renames it over the store
    /// file, so that a crash leaves the old or the new state, never a mix.
    fn persist(&self, g: &Inner) -> Result<()> {
        let img = FileImage {
            version: EMBEDDED_VERSION,
            revision: g.revision,
            keys: g
                .keys
                .iter()
                .filter(|(_, e)| e.lease.is_none())
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect(),
        };
        let bytes = serde_json::to_vec(&img)
            .map_err(|e| StoreError::Corrupt(self.path.clone(), e.to_string()))?;
        let tmp = self.path.with_extension("tmp");
        let io = |what: &str, e| StoreError::Io(format!("{what} {}", tmp.display()), e);
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&tmp).map_err(|e| io("cannot create", e))?;
            f.write_all(&bytes).map_err(|e| io("cannot write", e))?;
            f.sync_all().map_err(|e| io("cannot sync", e))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(|e| io("cannot rename", e))?;
        Ok(())
    }
}

impl Inner {
    fn drop_lease(&mut self, id: LeaseId) {
        self.leases.remove(&id);
        let before = self.keys.len();
        self.keys.retain(|_, e| e.lease != Some(id));
        if self.keys.len() != before {
            self.revision += 1;
        }
    }
}

impl Entry {
    fn kv(&self, key: &str) -> Kv {
        Kv {
            key: key.to_string(),
            value: self.value.clone(),
            mod_revision: self.mod_revision,
            lease: self.lease,
        }
    }
}

#[cfg(test)]
mod tests;
