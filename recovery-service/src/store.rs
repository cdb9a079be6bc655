//! recovery-service's own small RocksDB: the scan cursor, the attestation log, failed blobs
//! and the pause flag. Every write is synced, so a SIGKILL loses nothing acknowledged.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use ferry_shared::{
    control_plane::AttestationRecord,
    lifecycle::Closing,
    types::{BlobId, Epoch, ShardIndex},
};
use rocksdb::{DB, Options, WriteOptions};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use thiserror::Error;

/// A store failure.
#[derive(Debug, Error)]
pub enum RecoveryStoreError {
    /// RocksDB failed.
    #[error("FERRY-RSTORE-001: recovery store: {0}")]
    Rocks(String),
    /// A record does not decode.
    #[error("FERRY-RSTORE-002: corrupt record {0}")]
    Corrupt(String),
    /// A blocking call failed.
    #[error("FERRY-RSTORE-003: store task failed: {0}")]
    Task(String),
}

type Result<T> = std::result::Result<T, RecoveryStoreError>;

/// The persisted scan cursor. One cursor per shard of the work set, so an epoch change keeps
/// the progress of shards the node keeps and starts only the new ones from the beginning
/// (rule 8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Cursor {
    /// Epoch recovery brings the node to.
    pub target_epoch: Epoch,
    /// Per shard: the last blob id checked (inclusive); `None` = from the beginning.
    pub shards: BTreeMap<ShardIndex, Option<BlobId>>,
    /// Shards whose scan reached the end of the registry in the current pass.
    pub finished: Vec<ShardIndex>,
    /// Pass number.
    pub pass: u32,
    /// Certified blobs checked under this cursor so far.
    pub blobs_scanned: u64,
    /// Blob checks skipped because a kept shard's cursor survived an epoch change.
    pub rescans_saved: u64,
    /// Blobs recovered.
    pub blobs_recovered: u64,
    /// Sliver bytes fetched from peers.
    pub bytes_fetched: u64,
}

/// A blob that failed to recover, retried at the next pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedBlob {
    /// Attempts so far.
    pub attempts: u32,
    /// Last error.
    pub last_error: String,
    /// Unix ms of the first failure.
    pub first_failed_ms: u64,
}

/// recovery-service's store.
#[derive(Clone)]
pub struct RecoveryStore {
    db: Arc<Closing<DB>>,
}

const CURSOR: &str = "cursor";
const PAUSED: &str = "paused";
const FAILED: &str = "failed";
const ATTESTATIONS: &str = "attestations";

impl RecoveryStore {
    /// Opens or creates the store.
    pub fn open(path: &Path) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_max_background_jobs(1);
        opts.set_write_buffer_size(4 * 1024 * 1024);
        std::fs::create_dir_all(path).map_err(|e| RecoveryStoreError::Rocks(e.to_string()))?;
        let db = DB::open(&opts, path).map_err(|e| RecoveryStoreError::Rocks(format!("{}: {e}", path.display())))?;
        Ok(RecoveryStore { db: Arc::new(Closing::new(db)) })
    }

    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.db.get(key).map_err(|e| RecoveryStoreError::Rocks(e.to_string()))? {
            Some(bytes) => {
                serde_json::from_slice(&bytes).map(Some).map_err(|e| RecoveryStoreError::Corrupt(format!("{key}: {e}")))
            }
            None => Ok(None),
        }
    }

    fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let bytes = serde_json::to_vec(value).map_err(|e| RecoveryStoreError::Corrupt(e.to_string()))?;
        self.db.put_opt(key, bytes, &opts).map_err(|e| RecoveryStoreError::Rocks(e.to_string()))
    }

    /// Runs a blocking call off the async workers.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RecoveryStore) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let s = self.clone();
        tokio::task::spawn_blocking(move || f(&s)).await.map_err(|e| RecoveryStoreError::Task(e.to_string()))?
    }

    /// Resolves once every clone is dropped and the database is closed.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.db.closed()
    }

    /// The persisted cursor.
    pub fn cursor(&self) -> Result<Option<Cursor>> {
        self.get(CURSOR)
    }

    /// Persists the cursor.
    pub fn put_cursor(&self, cursor: &Cursor) -> Result<()> {
        self.put(CURSOR, cursor)
    }

    /// Whether an operator paused recovery.
    pub fn paused(&self) -> Result<bool> {
        Ok(self.get(PAUSED)?.unwrap_or(false))
    }

    /// Persists the pause flag.
    pub fn set_paused(&self, paused: bool) -> Result<()> {
        self.put(PAUSED, &paused)
    }

    /// Blobs that failed, by id.
    pub fn failed(&self) -> Result<BTreeMap<BlobId, FailedBlob>> {
        Ok(self.get(FAILED)?.unwrap_or_default())
    }

    /// Persists the failed blobs.
    pub fn put_failed(&self, failed: &BTreeMap<BlobId, FailedBlob>) -> Result<()> {
        self.put(FAILED, failed)
    }

    /// Attestations this node made, oldest first.
    pub fn attestations(&self) -> Result<Vec<AttestationRecord>> {
        Ok(self.get(ATTESTATIONS)?.unwrap_or_default())
    }

    /// Appends an attestation to the log unless its epoch is there already.
    pub fn log_attestation(&self, record: &AttestationRecord) -> Result<()> {
        let mut all = self.attestations()?;
        if all.iter().any(|a| a.epoch == record.epoch) {
            return Ok(());
        }
        all.push(record.clone());
        self.put(ATTESTATIONS, &all)
    }
}
