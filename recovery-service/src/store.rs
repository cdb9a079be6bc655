//! recovery-service's own small RocksDB: the scan cursor, the attestation log, failed blobs
//! and the pause flag. Every write is synced, so a SIGKILL loses nothing acknowledged.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use ferry_shared::{
    control_plane::AttestationRecord,
    lifecycle::Closing,
    types::{BlobId, Epoch, ShardIndex},
};
use rocksdb::{DB, Options, WriteBatch, WriteOptions};
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

/// The persisted scan cursor: per work shard, how far the scan it needs has come. Progress is
/// keyed by the shard's scan id, which sync-service draws anew whenever the shard's history
/// breaks (a restart, a catch-up, a loss and re-gain, a failed sync), so progress of an older
/// history is never taken for progress on the current one. A shard kept across an epoch change
/// keeps its scan id and so its progress (rule 8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Cursor {
    /// Epoch recovery brings the node to.
    pub target_epoch: Epoch,
    /// Per work shard: its scan's progress.
    pub shards: BTreeMap<ShardIndex, ShardCursor>,
    /// Pass number.
    pub pass: u32,
    /// Certified blobs checked under this cursor so far.
    pub blobs_scanned: u64,
    /// Blob checks skipped because a kept shard's scan survived an epoch change.
    pub rescans_saved: u64,
    /// Blobs recovered.
    pub blobs_recovered: u64,
    /// Sliver bytes fetched from peers.
    pub bytes_fetched: u64,
}

/// One shard's scan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ShardCursor {
    /// The scan this progress belongs to.
    pub scan_id: u64,
    /// The last blob id checked (inclusive); `None` = from the beginning.
    pub after: Option<BlobId>,
    /// Whether the scan reached the end of the registry in the current pass.
    pub finished: bool,
    /// Blobs checked by this scan.
    pub scanned: u64,
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
/// Prefix of one key per failed blob (`failed/<hex id>`), so a pass rewrites only what changed.
const FAILED_PREFIX: &str = "failed/";
const ATTESTATIONS: &str = "attestations";

fn failed_key(id: &BlobId) -> String {
    format!("{FAILED_PREFIX}{}", id.to_hex())
}

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
        let mut batch = WriteBatch::default();
        batch.put(key, Self::to_json(value)?);
        self.write(batch)
    }

    fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
        serde_json::to_vec(value).map_err(|e| RecoveryStoreError::Corrupt(e.to_string()))
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts).map_err(|e| RecoveryStoreError::Rocks(e.to_string()))
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

    /// Persists the cursor and the changes of the failed set in one write batch, so a crash
    /// never leaves a cursor past a blob whose failure was not recorded (`None` = recovered).
    pub fn save_progress(&self, cursor: &Cursor, failed: &BTreeMap<BlobId, Option<FailedBlob>>) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put(CURSOR, Self::to_json(cursor)?);
        for (id, entry) in failed {
            match entry {
                Some(f) => batch.put(failed_key(id), Self::to_json(f)?),
                None => batch.delete(failed_key(id)),
            }
        }
        self.write(batch)
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
        let mut out = BTreeMap::new();
        let mode = rocksdb::IteratorMode::From(FAILED_PREFIX.as_bytes(), rocksdb::Direction::Forward);
        for item in self.db.iterator(mode) {
            let (k, v) = item.map_err(|e| RecoveryStoreError::Rocks(e.to_string()))?;
            let Some(hex_id) = k.strip_prefix(FAILED_PREFIX.as_bytes()) else { break };
            let id = std::str::from_utf8(hex_id).ok().and_then(|h| h.parse::<BlobId>().ok()).ok_or_else(|| {
                RecoveryStoreError::Corrupt(format!("failed-blob key {}", String::from_utf8_lossy(&k)))
            })?;
            let entry = serde_json::from_slice(&v)
                .map_err(|e| RecoveryStoreError::Corrupt(format!("failed blob {id}: {e}")))?;
            out.insert(id, entry);
        }
        Ok(out)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn failed(attempts: u32) -> FailedBlob {
        FailedBlob { attempts, last_error: "x".into(), first_failed_ms: 1 }
    }

    #[test]
    fn the_cursor_and_the_failed_set_are_saved_together_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (BlobId([1; 32]), BlobId([2; 32]));
        {
            let store = RecoveryStore::open(dir.path()).unwrap();
            let mut cursor = Cursor { target_epoch: 3, ..Cursor::default() };
            cursor
                .shards
                .insert(ShardIndex(1), ShardCursor { scan_id: 9, after: Some(b), finished: false, scanned: 2 });
            store.save_progress(&cursor, &BTreeMap::from([(a, Some(failed(1))), (b, Some(failed(2)))])).unwrap();
            cursor.pass = 2;
            store.save_progress(&cursor, &BTreeMap::from([(a, None)])).unwrap();
        }
        let store = RecoveryStore::open(dir.path()).unwrap();
        assert_eq!(store.cursor().unwrap().unwrap().pass, 2);
        assert_eq!(store.failed().unwrap(), BTreeMap::from([(b, failed(2))]), "a recovered blob leaves the failed set");
        store.set_paused(true).unwrap();
        assert!(store.paused().unwrap());
        assert_eq!(store.failed().unwrap().len(), 1, "other keys are not read as failed blobs");
    }
}
