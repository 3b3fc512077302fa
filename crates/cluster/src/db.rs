//! Typed access to the cluster store: every read decodes a versioned record
//! ([`crate::records`]), every change is a compare-and-put. The one place the cluster's code
//! reads and writes records; the raw [`Store`] stays reachable for leases and deletes.

use ferry_store::Store;
use tracing::warn;

use crate::records::*;
use crate::ClusterError;

/// A list of records with their keys and revisions.
pub type Listed<T> = Vec<(String, i64, T)>;

/// The cluster store, seen as records.
pub struct Db {
    /// The store underneath (leases, raw puts and deletes).
    pub store: Store,
}

impl Db {
    /// Records on `store`.
    pub fn new(store: Store) -> Db {
        Db { store }
    }

    /// Lists and decodes every record under `prefix`; a record that does not decode is logged
    /// and skipped.
    pub async fn list<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Listed<T>, ClusterError> {
        let mut out = Vec::new();
        for kv in self.store.list(prefix).await? {
            match decode(&kv.key, &kv.value) {
                Ok(v) => out.push((kv.key, kv.mod_revision, v)),
                Err(e) => warn!("skipping {e}"),
            }
        }
        Ok(out)
    }

    /// Reads one record and its revision.
    pub async fn get<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(i64, T)>, ClusterError> {
        match self.store.get(key).await? {
            Some(kv) => Ok(Some((kv.mod_revision, decode(&kv.key, &kv.value)?))),
            None => Ok(None),
        }
    }

    /// Reads, changes and writes back a record with compare-and-put, retrying on a concurrent
    /// change. `change` returns false to leave it alone. Whether it wrote.
    pub async fn update<T, F>(&self, key: &str, mut change: F) -> Result<bool, ClusterError>
    where
        T: serde::de::DeserializeOwned + serde::Serialize,
        F: FnMut(&mut T) -> bool,
    {
        for _ in 0..20 {
            let Some((rev, mut v)) = self.get::<T>(key).await? else {
                return Ok(false);
            };
            if !change(&mut v) {
                return Ok(false);
            }
            if self
                .store
                .compare_and_put(key, rev, encode(&v)?, None)
                .await?
            {
                return Ok(true);
            }
        }
        Err(ClusterError::Record(format!(
            "{key}: too many concurrent changes"
        )))
    }

    /// Host records of the live hosts.
    pub async fn hosts(&self) -> Result<Vec<HostRecord>, ClusterError> {
        Ok(self
            .list::<HostRecord>(&hosts_prefix())
            .await?
            .into_iter()
            .map(|(_, _, h)| h)
            .collect())
    }

    /// Every VM record with its revision.
    pub async fn vms(&self) -> Result<Listed<VmRecord>, ClusterError> {
        self.list::<VmRecord>(&vms_prefix()).await
    }

    /// Every migration record with its revision, oldest first.
    pub async fn migrations(&self) -> Result<Listed<MigrationRecord>, ClusterError> {
        self.list::<MigrationRecord>(&migrations_prefix()).await
    }

    /// One VM's record and its revision.
    pub async fn vm(&self, name: &str) -> Result<Option<(i64, VmRecord)>, ClusterError> {
        self.get::<VmRecord>(&vm_key(name)).await
    }

    /// One migration's record.
    pub async fn migration(&self, id: u64) -> Result<Option<MigrationRecord>, ClusterError> {
        Ok(self
            .get::<MigrationRecord>(&migration_key(id))
            .await?
            .map(|(_, m)| m))
    }

    /// Allocates the next migration id.
    async fn next_migration_id(&self) -> Result<u64, ClusterError> {
        let key = migration_seq_key();
        for _ in 0..50 {
            let (rev, cur) = match self.store.get(&key).await? {
                Some(kv) => (
                    kv.mod_revision,
                    String::from_utf8_lossy(&kv.value)
                        .trim()
                        .parse::<u64>()
                        .unwrap_or(0),
                ),
                None => (0, 0),
            };
            let next = cur + 1;
            if self
                .store
                .compare_and_put(&key, rev, next.to_string().into_bytes(), None)
                .await?
            {
                return Ok(next);
            }
        }
        Err(ClusterError::Record(
            "cannot allocate a migration id".into(),
        ))
    }

    /// Queues a migration of `vm` from `from` to `to` for `reason` (user, drain, failback,
    /// balance…), with `why` the cluster asked for it, if it did.
    pub async fn queue_migration(
        &self,
        vm: &str,
        from: &str,
        to: &str,
        reason: &str,
        options: migration::MigrateOptions,
        why: Option<String>,
    ) -> Result<MigrationRecord, ClusterError> {
        let id = self.next_migration_id().await?;
        let m = MigrationRecord {
            id,
            vm: vm.to_string(),
            from: from.to_string(),
            to: to.to_string(),
            state: MigrationState::Queued,
            reason: reason.to_string(),
            options,
            requested: now(),
            started: None,
            finished: None,
            cancel: false,
            progress: None,
            report: None,
            error: None,
            why,
        };
        self.store
            .compare_and_put(&migration_key(id), 0, encode(&m)?, None)
            .await?;
        tracing::info!("{vm}: migration {id} {from} -> {to} queued ({reason})");
        Ok(m)
    }

    /// Moves migration `id` from state `from` to `to` (stamping its start or end); false when
    /// it is not in `from` any more.
    pub async fn set_migration_state(
        &self,
        id: u64,
        from: MigrationState,
        to: MigrationState,
        error: Option<String>,
    ) -> Result<bool, ClusterError> {
        self.update::<MigrationRecord, _>(&migration_key(id), |r| {
            if r.state != from {
                return false;
            }
            r.state = to;
            if to == MigrationState::Running {
                r.started = Some(now());
            }
            if to.done() {
                r.finished = Some(now());
                r.error = error.clone();
            }
            true
        })
        .await
    }
}
