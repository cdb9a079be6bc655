//! The node's shard store on RocksDB.
//!
//! Layout: column family `node` holds the node's persisted state (status, processed epoch and
//! committee, the control-plane revision it processed); `shards` holds one [`ShardRecord`]
//! per shard (status and shard-sync progress); `metadata` holds each blob's metadata once per
//! node; `certified` is the node's certified index (blob id -> [`CertifiedRecord`]: every
//! certified blob of the cluster, whether or not this node holds a sliver of it); `pending`
//! holds `(shard, blob)` pairs an owned shard lacks and blob recovery is to fetch; `counts`
//! holds the counts and digests status and attestations report; `buckets` holds the certified
//! index's digest per 1/65,536 of the id space, which anti-entropy compares; and every shard
//! has a column family `shard-<index>` mapping blob id to sliver. Keys are fixed-width
//! big-endian, so iteration order is blob-id order.
//!
//! Every write is one durable write batch: a sliver and the sync progress that covers it are in
//! the same batch (rule 7), an epoch transition is one batch, and every count and digest
//! changes in the batch of the data it counts ([`CountedBatch`]), so a crash replays into a
//! state that still completes and whose counts are right. Calls block: async callers use
//! [`ShardStore::call`].

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use ferry_shared::{
    Committee,
    erasure::BlobMetadata,
    lifecycle::Closing,
    registry::{CertifiedRecord, InconsistencyProof},
    types::{BlobId, Epoch, NodeId, NodeStatus, ShardIndex, ShardStatus},
};
use prost::Message;
use rocksdb::{
    BoundColumnFamily, ColumnFamilyDescriptor, DBWithThreadMode, Direction, IteratorMode, MultiThreaded, Options,
    WriteBatch, WriteOptions,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::StoreConfig;

type Db = DBWithThreadMode<MultiThreaded>;

const CF_NODE: &str = "node";
const CF_SHARDS: &str = "shards";
const CF_METADATA: &str = "metadata";
const CF_PENDING: &str = "pending";
const CF_CERTIFIED: &str = "certified";
const CF_COUNTS: &str = "counts";
const CF_BUCKETS: &str = "buckets";
const NODE_KEY: &[u8] = b"state";
const FIXED_CFS: [&str; 7] = [CF_NODE, CF_SHARDS, CF_METADATA, CF_PENDING, CF_CERTIFIED, CF_COUNTS, CF_BUCKETS];

/// Largest shard index a stored record may name (the largest cluster's shard count).
const MAX_SHARDS: u32 = 1024;

/// A shard-store failure.
#[derive(Debug, Error)]
pub enum StoreError {
    /// RocksDB failed (I/O, corruption, or an iterator error).
    #[error("FERRY-STORE-001: RocksDB at {path}: {message}")]
    Rocks {
        /// Store directory.
        path: String,
        /// RocksDB's message.
        message: String,
    },
    /// A stored record does not decode.
    #[error("FERRY-STORE-002: corrupt record {what}: {message}")]
    Corrupt {
        /// Which record.
        what: String,
        /// Decode error.
        message: String,
    },
    /// The shard has no storage on this node.
    #[error("FERRY-STORE-003: shard {0} has no storage on this node")]
    NoShard(ShardIndex),
    /// A blocking store call panicked or was cancelled.
    #[error("FERRY-STORE-004: store task failed: {0}")]
    Task(String),
}

type Result<T> = std::result::Result<T, StoreError>;

/// What the node persisted about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// Node status.
    pub status: NodeStatus,
    /// Latest epoch whose change this node applied.
    pub epoch: Epoch,
    /// The committee of `epoch` (the previous assignment at the next change).
    pub committee: Committee,
    /// Control-plane revision of the last event applied; the follower resumes after it.
    pub last_revision: u64,
}

/// Progress of a shard sync, persisted with the slivers it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SyncProgress {
    /// Epoch in which the shard was gained; the sync never completes against an older bound.
    pub gained_epoch: Epoch,
    /// The shard's owner before `gained_epoch`, pinned so a later epoch change never makes
    /// the node "sync from itself".
    pub source: Option<NodeId>,
    /// Last blob written; the sync resumes strictly after it.
    pub cursor: Option<BlobId>,
    /// Slivers written.
    pub blobs_done: u64,
    /// Sliver bytes written.
    pub bytes_done: u64,
    /// Attempts started.
    pub attempts: u32,
    /// Last error seen.
    pub last_error: Option<String>,
    /// Blobs handed to blob recovery.
    pub pending: u64,
    /// Whether the transfer finished (successfully or for good).
    pub finished: bool,
    /// When the first attempt started (Unix ms); 0 before it.
    #[serde(default)]
    pub started_at_ms: u64,
    /// When the transfer finished (Unix ms); 0 while it runs.
    #[serde(default)]
    pub finished_at_ms: u64,
}

/// One shard's persisted record. Its status changes only through
/// [`crate::node::shard_state::apply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// Status.
    pub status: ShardStatus,
    /// Sync progress, for shards that are or were filled by shard sync.
    pub sync: Option<SyncProgress>,
    /// For `ActiveRecover`: the scan blob recovery must complete; drawn anew on every entry
    /// into `ActiveRecover`, so progress of an earlier history never counts.
    #[serde(default)]
    pub scan_id: Option<u64>,
    /// For `LockedToMove`: the epoch that moved the shard away.
    #[serde(default)]
    pub locked_epoch: Option<Epoch>,
}

impl ShardRecord {
    /// A record with `status` and nothing else.
    pub fn new(status: ShardStatus) -> Self {
        ShardRecord { status, sync: None, scan_id: None, locked_epoch: None }
    }
}

/// A sliver to write, with its blob's metadata if the node may lack it.
#[derive(Debug)]
pub struct SliverWrite {
    /// Blob.
    pub blob_id: BlobId,
    /// Verified sliver bytes.
    pub data: Vec<u8>,
    /// Verified metadata to store with it.
    pub metadata: Option<BlobMetadata>,
}

/// How many of something, and the XOR of the BLAKE3 hashes of their blob ids: a digest that
/// is kept up to date by one XOR per added blob and equal on two nodes holding the same set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetDigest {
    /// Members of the set.
    pub count: u64,
    /// XOR of `blake3(blob id)` over the members.
    pub xor: [u8; 32],
    /// Bytes of the members' values (slivers; 0 for sets without values).
    pub bytes: u64,
}

impl SetDigest {
    /// The digest with `id` added (the caller knows it was absent).
    fn add(&mut self, id: &BlobId) {
        self.count += 1;
        for (a, b) in self.xor.iter_mut().zip(blake3::hash(id.as_bytes()).as_bytes()) {
            *a ^= b;
        }
    }

    fn combine(&mut self, other: &SetDigest) {
        self.count = self.count.wrapping_add(other.count);
        self.bytes = self.bytes.wrapping_add(other.bytes);
        for (a, b) in self.xor.iter_mut().zip(other.xor) {
            *a ^= b;
        }
    }

    fn encode(&self) -> [u8; 48] {
        let mut out = [0u8; 48];
        out[..8].copy_from_slice(&self.count.to_be_bytes());
        out[8..40].copy_from_slice(&self.xor);
        out[40..].copy_from_slice(&self.bytes.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<SetDigest> {
        let count = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let xor = bytes.get(8..40)?.try_into().ok()?;
        let bytes = u64::from_be_bytes(bytes.get(40..48)?.try_into().ok()?);
        Some(SetDigest { count, xor, bytes })
    }
}

/// What the node holds, counted in the batches that change it: read by `GetStatus` and the
/// attestation evidence in O(shards), never by listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Blobs with metadata.
    pub metadata: u64,
    /// The certified index.
    pub certified: SetDigest,
    /// Slivers per shard.
    pub slivers: BTreeMap<ShardIndex, SetDigest>,
    /// Pending (to recover) per shard.
    pub pending: BTreeMap<ShardIndex, u64>,
}

/// Keys of the `counts` column family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum CountKey {
    Metadata,
    Certified,
    Slivers(ShardIndex),
    Pending(ShardIndex),
}

impl CountKey {
    fn bytes(self) -> Vec<u8> {
        match self {
            CountKey::Metadata => b"m".to_vec(),
            CountKey::Certified => b"c".to_vec(),
            CountKey::Slivers(s) => [b"s".as_slice(), &s.0.to_be_bytes()].concat(),
            CountKey::Pending(s) => [b"p".as_slice(), &s.0.to_be_bytes()].concat(),
        }
    }

    fn parse(bytes: &[u8]) -> Option<CountKey> {
        let shard = || bytes.get(1..5).and_then(|b| b.try_into().ok()).map(|b| ShardIndex(u32::from_be_bytes(b)));
        match bytes.first()? {
            b'm' => Some(CountKey::Metadata),
            b'c' => Some(CountKey::Certified),
            b's' => shard().map(CountKey::Slivers),
            b'p' => shard().map(CountKey::Pending),
            _ => None,
        }
    }
}

/// A page of the certified index: each blob with any inconsistency claim, and whether the
/// range ended.
pub type CertifiedPage = (Vec<(BlobId, Option<InconsistencyProof>)>, bool);

/// Buckets of the certified index's digests: by the first two bytes of the blob id.
pub const BUCKETS: usize = 65_536;
/// Top-level buckets: by the first byte.
pub const TOP_BUCKETS: usize = 256;

fn bucket_of(id: &BlobId) -> u16 {
    u16::from_be_bytes([id.0[0], id.0[1]])
}

/// The node's RocksDB store. Clones share one database; it closes when the last clone is
/// dropped, which [`ShardStore::closed`] reports.
#[derive(Clone)]
pub struct ShardStore {
    inner: Arc<Closing<Db>>,
    path: PathBuf,
    /// Options of every column family, shard ones created later included: the configured
    /// memtable size, the shared block cache and LZ4, so memory stays bounded by the config.
    cf_options: Arc<Options>,
    /// Serialises counted writes from their existence checks to their write, so two writers
    /// of the same blob never both count it. Held for a memtable write, not for the fsync.
    count_lock: Arc<std::sync::Mutex<()>>,
    /// The 256 top-level digests of the certified index (sums of 256 buckets each), kept in
    /// memory and updated under `count_lock`.
    top_buckets: Arc<std::sync::Mutex<Vec<SetDigest>>>,
}

impl std::fmt::Debug for ShardStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardStore({})", self.path.display())
    }
}

fn shard_cf_name(shard: ShardIndex) -> String {
    format!("shard-{:05}", shard.0)
}

fn pending_key(shard: ShardIndex, blob: &BlobId) -> Vec<u8> {
    let mut k = shard.0.to_be_bytes().to_vec();
    k.extend_from_slice(blob.as_bytes());
    k
}

impl ShardStore {
    /// Opens (creating if needed) the store, with every existing shard column family.
    pub fn open(config: &StoreConfig) -> Result<Self> {
        let path = config.path.clone();
        let rocks = |e: rocksdb::Error| StoreError::Rocks { path: path.display().to_string(), message: e.to_string() };
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_open_files(config.max_open_files);
        opts.set_max_background_jobs(config.max_background_jobs);
        opts.set_write_buffer_size(config.write_buffer_mib * 1024 * 1024);
        opts.set_max_write_buffer_number(2);
        // Memory must not grow with blobs or shards: every column family's memtables share one
        // budget (a full budget flushes the oldest memtable), and table index and filter blocks live in
        // the block cache instead of beside it.
        let memtables =
            rocksdb::WriteBufferManager::new_write_buffer_manager(config.memtable_budget_mib * 1024 * 1024, false);
        opts.set_write_buffer_manager(&memtables);
        let cache = rocksdb::Cache::new_lru_cache(config.block_cache_mib * 1024 * 1024);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        // Most point reads ask after what is absent (is this sliver stored yet, is this blob
        // pending): a Bloom filter answers those without reading index and data blocks.
        table.set_bloom_filter(10.0, false);
        table.set_optimize_filters_for_memory(true);
        opts.set_block_based_table_factory(&table);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        std::fs::create_dir_all(&path)
            .map_err(|e| StoreError::Rocks { path: path.display().to_string(), message: e.to_string() })?;
        // A new store has no column families yet.
        let mut names: Vec<String> = Db::list_cf(&opts, &path).unwrap_or_default();
        for fixed in FIXED_CFS {
            if !names.iter().any(|n| n == fixed) {
                names.push(fixed.to_string());
            }
        }
        let cfs = names.into_iter().map(|n| ColumnFamilyDescriptor::new(n, opts.clone()));
        let db = Db::open_cf_descriptors(&opts, &path, cfs).map_err(rocks)?;
        let store = ShardStore {
            inner: Arc::new(Closing::new(db)),
            path,
            cf_options: Arc::new(opts),
            count_lock: Arc::new(std::sync::Mutex::new(())),
            top_buckets: Arc::new(std::sync::Mutex::new(vec![SetDigest::default(); TOP_BUCKETS])),
        };
        let top = store.sum_top_buckets()?;
        *store.top_buckets.lock().unwrap_or_else(|p| p.into_inner()) = top;
        Ok(store)
    }

    /// The top-level digests, summed from the stored buckets (once, at open).
    fn sum_top_buckets(&self) -> Result<Vec<SetDigest>> {
        let mut top = vec![SetDigest::default(); TOP_BUCKETS];
        for item in self.inner.iterator_cf(&self.cf(CF_BUCKETS)?, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            let digest = SetDigest::decode(&v).ok_or_else(|| StoreError::Corrupt {
                what: "bucket digest".into(),
                message: format!("{} bytes", v.len()),
            })?;
            if let Some(first) = k.first() {
                top[*first as usize].combine(&digest);
            }
        }
        Ok(top)
    }

    /// Resolves once every clone is dropped and the database is closed (its lock released).
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.inner.closed()
    }

    /// Runs a blocking store operation off the async workers.
    pub async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&ShardStore) -> Result<T> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store)).await.map_err(|e| StoreError::Task(e.to_string()))?
    }

    fn rocks(&self, e: rocksdb::Error) -> StoreError {
        StoreError::Rocks { path: self.path.display().to_string(), message: e.to_string() }
    }

    fn cf(&self, name: &str) -> Result<Arc<BoundColumnFamily<'_>>> {
        self.inner.cf_handle(name).ok_or_else(|| StoreError::Rocks {
            path: self.path.display().to_string(),
            message: format!("column family {name} missing"),
        })
    }

    fn shard_cf(&self, shard: ShardIndex) -> Result<Arc<BoundColumnFamily<'_>>> {
        self.inner.cf_handle(&shard_cf_name(shard)).ok_or(StoreError::NoShard(shard))
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true); // acknowledged writes survive a power loss
        self.inner.write_opt(batch, &opts).map_err(|e| self.rocks(e))
    }

    /// Starts a batch whose counts and digests change with its data; holds the count lock
    /// until [`CountedBatch::commit`].
    pub fn counted(&self) -> Result<CountedBatch<'_>> {
        Ok(CountedBatch {
            store: self,
            guard: self.count_lock.lock().unwrap_or_else(|p| p.into_inner()),
            batch: WriteBatch::default(),
            deltas: BTreeMap::new(),
            buckets: BTreeMap::new(),
            added: std::collections::HashSet::new(),
            removed_pending: std::collections::HashSet::new(),
        })
    }

    fn json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes)
            .map_err(|e| StoreError::Corrupt { what: what.to_string(), message: e.to_string() })
    }

    fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
        serde_json::to_vec(value).unwrap_or_default()
    }

    /// The node's persisted state; `None` for a new (or wiped) store.
    pub fn node_state(&self) -> Result<Option<NodeState>> {
        match self.inner.get_cf(&self.cf(CF_NODE)?, NODE_KEY).map_err(|e| self.rocks(e))? {
            Some(bytes) => Ok(Some(Self::json("node state", &bytes)?)),
            None => Ok(None),
        }
    }

    /// Whether the store holds any blob data at all.
    pub fn is_empty(&self) -> Result<bool> {
        let mut it = self.inner.iterator_cf(&self.cf(CF_METADATA)?, IteratorMode::Start);
        match it.next() {
            None => Ok(true),
            Some(Ok(_)) => Ok(false),
            Some(Err(e)) => Err(self.rocks(e)),
        }
    }

    /// Every shard record.
    pub fn shard_records(&self) -> Result<BTreeMap<ShardIndex, ShardRecord>> {
        let mut out = BTreeMap::new();
        for item in self.inner.iterator_cf(&self.cf(CF_SHARDS)?, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            let raw: [u8; 4] = k
                .as_ref()
                .try_into()
                .map_err(|_| StoreError::Corrupt { what: "shard key".into(), message: format!("{} bytes", k.len()) })?;
            let shard = ShardIndex(u32::from_be_bytes(raw));
            out.insert(shard, Self::json(&format!("shard {shard}"), &v)?);
        }
        Ok(out)
    }

    /// One shard's record.
    pub fn shard_record(&self, shard: ShardIndex) -> Result<Option<ShardRecord>> {
        match self.inner.get_cf(&self.cf(CF_SHARDS)?, shard.0.to_be_bytes()).map_err(|e| self.rocks(e))? {
            Some(bytes) => Ok(Some(Self::json(&format!("shard {shard}"), &bytes)?)),
            None => Ok(None),
        }
    }

    /// Creates the column family of a shard if it does not exist. Storage is always created
    /// before any record that refers to it, so "status implies storage exists".
    pub fn ensure_shard_storage(&self, shard: ShardIndex) -> Result<()> {
        if self.inner.cf_handle(&shard_cf_name(shard)).is_none() {
            self.inner.create_cf(shard_cf_name(shard), &self.cf_options).map_err(|e| self.rocks(e))?;
        }
        Ok(())
    }

    /// Applies an epoch transition in one batch: shard records, then the node state.
    pub fn apply_transition(&self, node: &NodeState, shards: &[(ShardIndex, ShardRecord)]) -> Result<()> {
        let mut batch = WriteBatch::default();
        let shards_cf = self.cf(CF_SHARDS)?;
        for (shard, record) in shards {
            self.shard_cf(*shard)?; // storage must exist before its record
            batch.put_cf(&shards_cf, shard.0.to_be_bytes(), Self::to_json(record));
        }
        batch.put_cf(&self.cf(CF_NODE)?, NODE_KEY, Self::to_json(node));
        self.write(batch)
    }

    /// Writes the node state alone.
    pub fn put_node_state(&self, node: &NodeState) -> Result<()> {
        self.apply_transition(node, &[])
    }

    /// Writes one shard record.
    pub fn put_shard_record(&self, shard: ShardIndex, record: &ShardRecord) -> Result<()> {
        self.put_shard_records(&[(shard, record.clone())])
    }

    /// Writes shard records in one batch.
    pub fn put_shard_records(&self, records: &[(ShardIndex, ShardRecord)]) -> Result<()> {
        let mut batch = WriteBatch::default();
        let cf = self.cf(CF_SHARDS)?;
        for (shard, record) in records {
            batch.put_cf(&cf, shard.0.to_be_bytes(), Self::to_json(record));
        }
        self.write(batch)
    }

    /// Removes a shard: its record, pending entries and counts first (one batch), then its
    /// column family.
    pub fn drop_shard(&self, shard: ShardIndex) -> Result<()> {
        {
            let _counting = self.count_lock.lock().unwrap_or_else(|p| p.into_inner());
            let mut batch = WriteBatch::default();
            batch.delete_cf(&self.cf(CF_SHARDS)?, shard.0.to_be_bytes());
            let pending = self.cf(CF_PENDING)?;
            let from = pending_key(shard, &BlobId::MIN);
            let to = (shard.0 + 1).to_be_bytes();
            batch.delete_range_cf(&pending, from.as_slice(), to.as_slice());
            let counts = self.cf(CF_COUNTS)?;
            batch.delete_cf(&counts, CountKey::Slivers(shard).bytes());
            batch.delete_cf(&counts, CountKey::Pending(shard).bytes());
            self.write(batch)?;
        }
        if self.inner.cf_handle(&shard_cf_name(shard)).is_some() {
            self.inner.drop_cf(&shard_cf_name(shard)).map_err(|e| self.rocks(e))?;
        }
        Ok(())
    }

    /// Stores verified metadata.
    pub fn put_metadata(&self, id: &BlobId, metadata: &BlobMetadata) -> Result<()> {
        let mut batch = self.counted()?;
        batch.put_metadata(id, metadata)?;
        batch.commit()
    }

    /// Whether metadata of the blob is stored (no decoding).
    pub fn has_metadata(&self, id: &BlobId) -> Result<bool> {
        Ok(self.inner.get_pinned_cf(&self.cf(CF_METADATA)?, id.as_bytes()).map_err(|e| self.rocks(e))?.is_some())
    }

    /// A blob's metadata, verified again against its id on every read.
    pub fn metadata(&self, id: &BlobId) -> Result<Option<BlobMetadata>> {
        let Some(bytes) = self.inner.get_pinned_cf(&self.cf(CF_METADATA)?, id.as_bytes()).map_err(|e| self.rocks(e))?
        else {
            return Ok(None);
        };
        Self::decode_metadata(id, &bytes).map(Some)
    }

    fn decode_metadata(id: &BlobId, bytes: &[u8]) -> Result<BlobMetadata> {
        let corrupt = |m: String| StoreError::Corrupt { what: format!("metadata of {id}"), message: m };
        let proto = ferry_proto::v1::BlobMetadata::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
        let metadata = BlobMetadata::from_proto(&proto).map_err(|e| corrupt(e.to_string()))?;
        metadata.verify_id(id).map_err(|e| corrupt(e.to_string()))?;
        Ok(metadata)
    }

    /// The values of `ids` in one table, in the order of `ids`: one batched read (RocksDB sorts
    /// unsorted keys itself), values pinned rather than copied.
    fn multi_get<'a>(
        &'a self,
        cf: &impl rocksdb::AsColumnFamilyRef,
        ids: &[BlobId],
    ) -> Vec<std::result::Result<Option<rocksdb::DBPinnableSlice<'a>>, rocksdb::Error>> {
        self.inner.batched_multi_get_cf(cf, ids.iter().map(|id| id.as_bytes().as_slice()), ids.is_sorted())
    }

    /// For each of `ids`, whether it is certified here and its metadata: one multi-get per
    /// table instead of two reads apiece (a stream's batch is in id order, which RocksDB uses).
    pub fn certified_and_metadata(&self, ids: &[BlobId]) -> Result<Vec<(bool, Option<BlobMetadata>)>> {
        let certified = self.multi_get(&self.cf(CF_CERTIFIED)?, ids);
        let metadata = self.multi_get(&self.cf(CF_METADATA)?, ids);
        ids.iter()
            .zip(certified.into_iter().zip(metadata))
            .map(|(id, (c, m))| {
                let certified = c.map_err(|e| self.rocks(e))?.is_some();
                let metadata = m.map_err(|e| self.rocks(e))?.map(|b| Self::decode_metadata(id, &b)).transpose()?;
                Ok((certified, metadata))
            })
            .collect()
    }

    /// For each of `ids`, whether it is certified here: one multi-get (an index page or a batch
    /// of offered certificates) instead of a read apiece.
    pub fn are_certified(&self, ids: &[BlobId]) -> Result<Vec<bool>> {
        self.multi_get(&self.cf(CF_CERTIFIED)?, ids)
            .into_iter()
            .map(|v| Ok(v.map_err(|e| self.rocks(e))?.is_some()))
            .collect()
    }

    /// Every count and digest, read from the `counts` column family (a few keys per shard).
    pub fn counts(&self) -> Result<Counts> {
        let mut counts = Counts::default();
        for item in self.inner.iterator_cf(&self.cf(CF_COUNTS)?, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            let corrupt = || StoreError::Corrupt { what: "count".into(), message: hex::encode(&k) };
            let key = CountKey::parse(&k).ok_or_else(corrupt)?;
            let value = SetDigest::decode(&v).ok_or_else(corrupt)?;
            match key {
                CountKey::Metadata => counts.metadata = value.count,
                CountKey::Certified => counts.certified = value,
                CountKey::Slivers(s) => {
                    counts.slivers.insert(s, value);
                }
                CountKey::Pending(s) => {
                    counts.pending.insert(s, value.count);
                }
            }
        }
        Ok(counts)
    }

    /// Blobs the shard lacks and blob recovery is to fetch.
    pub fn pending_count(&self, shard: ShardIndex) -> Result<u64> {
        Ok(self.count(CountKey::Pending(shard))?.count)
    }

    fn count(&self, key: CountKey) -> Result<SetDigest> {
        match self.inner.get_pinned_cf(&self.cf(CF_COUNTS)?, key.bytes()).map_err(|e| self.rocks(e))? {
            Some(v) => SetDigest::decode(&v)
                .ok_or_else(|| StoreError::Corrupt { what: "count".into(), message: format!("{key:?}") }),
            None => Ok(SetDigest::default()),
        }
    }

    /// Stores one verified sliver.
    pub fn put_sliver(&self, shard: ShardIndex, id: &BlobId, data: &[u8]) -> Result<()> {
        let mut batch = self.counted()?;
        batch.put_sliver(shard, id, data)?;
        batch.commit()
    }

    /// A stored sliver.
    pub fn sliver(&self, shard: ShardIndex, id: &BlobId) -> Result<Option<Vec<u8>>> {
        self.inner.get_cf(&self.shard_cf(shard)?, id.as_bytes()).map_err(|e| self.rocks(e))
    }

    /// The sliver of `id` in `shard` if it still verifies against the blob's metadata: a rotted
    /// sliver is never served as good.
    pub fn verified_sliver(&self, shard: ShardIndex, id: &BlobId) -> Result<Option<Vec<u8>>> {
        let Some(data) = self.sliver(shard, id)? else { return Ok(None) };
        Ok(match self.metadata(id)? {
            Some(m) if m.verify_sliver(shard, &data).is_ok() => Some(data),
            _ => None,
        })
    }

    /// Whether a sliver is stored (no value copy).
    pub fn has_sliver(&self, shard: ShardIndex, id: &BlobId) -> Result<bool> {
        let cf = self.shard_cf(shard)?;
        if !self.inner.key_may_exist_cf(&cf, id.as_bytes()) {
            return Ok(false);
        }
        Ok(self.inner.get_pinned_cf(&cf, id.as_bytes()).map_err(|e| self.rocks(e))?.is_some())
    }

    /// Which of `ids` the shard holds: one multi-get (Bloom filters answer for the absent, and
    /// ids in order share block reads) instead of a read apiece; values are pinned, not copied.
    pub fn slivers_present(&self, shard: ShardIndex, ids: &[BlobId]) -> Result<std::collections::HashSet<BlobId>> {
        let found = self.multi_get(&self.shard_cf(shard)?, ids);
        let mut held = std::collections::HashSet::new();
        for (id, value) in ids.iter().zip(found) {
            if value.map_err(|e| self.rocks(e))?.is_some() {
                held.insert(*id);
            }
        }
        Ok(held)
    }

    /// Writes a batch of synced slivers, their metadata and certificates, the blobs handed to
    /// blob recovery and the shard's progress record atomically (rule 7).
    pub fn write_sync_batch(
        &self,
        shard: ShardIndex,
        items: &[SliverWrite],
        certified: &[(BlobId, CertifiedRecord)],
        missing: &[BlobId],
        record: &ShardRecord,
    ) -> Result<()> {
        let pending = missing;
        let mut batch = self.counted()?;
        for (id, record) in certified {
            batch.put_certified(id, record)?;
        }
        // Under the batch's count lock, so no other writer adds one of them meanwhile.
        let ids: Vec<BlobId> = items.iter().map(|i| i.blob_id).collect();
        let held = self.slivers_present(shard, &ids)?;
        for item in items {
            if let Some(m) = &item.metadata {
                batch.put_metadata(&item.blob_id, m)?;
            }
            batch.put_sliver_known(shard, &item.blob_id, &item.data, held.contains(&item.blob_id))?;
        }
        for blob in pending {
            batch.add_missing(shard, blob)?;
        }
        batch.put_shard_record(shard, record)?;
        batch.commit()
    }

    /// A blob's record in the certified index.
    pub fn certified(&self, id: &BlobId) -> Result<Option<CertifiedRecord>> {
        match self.inner.get_pinned_cf(&self.cf(CF_CERTIFIED)?, id.as_bytes()).map_err(|e| self.rocks(e))? {
            Some(bytes) => Ok(Some(CertifiedRecord::decode(&bytes, MAX_SHARDS).map_err(|e| StoreError::Corrupt {
                what: format!("certified record of {id}"),
                message: e.to_string(),
            })?)),
            None => Ok(None),
        }
    }

    /// Whether the blob is in the certified index (no decoding).
    pub fn is_certified(&self, id: &BlobId) -> Result<bool> {
        Ok(self.inner.get_pinned_cf(&self.cf(CF_CERTIFIED)?, id.as_bytes()).map_err(|e| self.rocks(e))?.is_some())
    }

    /// Up to `limit` certified blobs from `start` (inclusive) to `end` (exclusive), in order,
    /// each with any inconsistency claim; and whether the range ended.
    pub fn list_certified(&self, start: Option<BlobId>, end: Option<BlobId>, limit: usize) -> Result<CertifiedPage> {
        let cf = self.cf(CF_CERTIFIED)?;
        let from = start.unwrap_or(BlobId::MIN);
        let mut out = Vec::new();
        for item in self.inner.iterator_cf(&cf, IteratorMode::From(from.as_bytes(), Direction::Forward)) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            let id = BlobId::from_bytes(&k)
                .map_err(|e| StoreError::Corrupt { what: "certified key".into(), message: e.to_string() })?;
            if end.is_some_and(|e| id >= e) {
                return Ok((out, true));
            }
            if out.len() >= limit {
                return Ok((out, false));
            }
            let record = CertifiedRecord::decode(&v, MAX_SHARDS).map_err(|e| StoreError::Corrupt {
                what: format!("certified record of {id}"),
                message: e.to_string(),
            })?;
            out.push((id, record.invalid));
        }
        Ok((out, true))
    }

    /// Digests of the certified index: `level` 1 gives the 256 top-level buckets (from memory),
    /// level 2 the 65,536 buckets (from the `buckets` column family), `count` from `first`.
    pub fn range_digests(&self, level: u32, first: usize, count: usize) -> Result<Vec<SetDigest>> {
        match level {
            1 => {
                let top = self.top_buckets.lock().unwrap_or_else(|p| p.into_inner());
                Ok(top.iter().skip(first).take(count).copied().collect())
            }
            _ => {
                let mut out = vec![SetDigest::default(); count.min(BUCKETS.saturating_sub(first))];
                let cf = self.cf(CF_BUCKETS)?;
                let Ok(from) = u16::try_from(first) else { return Ok(out) };
                for item in self.inner.iterator_cf(&cf, IteratorMode::From(&from.to_be_bytes(), Direction::Forward)) {
                    let (k, v) = item.map_err(|e| self.rocks(e))?;
                    let bucket = k
                        .as_ref()
                        .try_into()
                        .map(|b: [u8; 2]| u16::from_be_bytes(b) as usize)
                        .map_err(|_| StoreError::Corrupt { what: "bucket key".into(), message: hex::encode(&k) })?;
                    let Some(slot) = out.get_mut(bucket - first) else { break };
                    *slot = SetDigest::decode(&v).ok_or_else(|| StoreError::Corrupt {
                        what: "bucket digest".into(),
                        message: hex::encode(&k),
                    })?;
                }
                Ok(out)
            }
        }
    }

    /// Up to `max_items` slivers of a shard from `start` (inclusive) in blob-id order, stopping
    /// early once `max_bytes` is reached. A read error fails the call; it is never taken as the
    /// end of the data.
    pub fn read_shard(
        &self,
        shard: ShardIndex,
        start: Option<BlobId>,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<(BlobId, Vec<u8>)>> {
        let cf = self.shard_cf(shard)?;
        let from = start.unwrap_or(BlobId::MIN);
        let mut out = Vec::new();
        let mut bytes = 0;
        for item in self.inner.iterator_cf(&cf, IteratorMode::From(from.as_bytes(), Direction::Forward)) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            let id = BlobId::from_bytes(&k)
                .map_err(|e| StoreError::Corrupt { what: format!("key in shard {shard}"), message: e.to_string() })?;
            bytes += v.len();
            out.push((id, v.into_vec()));
            if out.len() >= max_items || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Blob ids held in a shard, in order, passed to `f` one by one.
    pub fn for_each_blob_in_shard(&self, shard: ShardIndex, mut f: impl FnMut(&BlobId)) -> Result<u64> {
        let cf = self.shard_cf(shard)?;
        let mut n = 0;
        for item in self.inner.iterator_cf(&cf, IteratorMode::Start) {
            let (k, _) = item.map_err(|e| self.rocks(e))?;
            let id = BlobId::from_bytes(&k)
                .map_err(|e| StoreError::Corrupt { what: format!("key in shard {shard}"), message: e.to_string() })?;
            f(&id);
            n += 1;
        }
        Ok(n)
    }

    /// Up to `limit` blobs a shard lacks and blob recovery is to fetch, from `start`.
    pub fn pending(&self, shard: ShardIndex, start: Option<BlobId>, limit: usize) -> Result<Vec<BlobId>> {
        let prefix = shard.0.to_be_bytes();
        let from = pending_key(shard, &start.unwrap_or(BlobId::MIN));
        let mut out = Vec::new();
        for item in self.inner.iterator_cf(&self.cf(CF_PENDING)?, IteratorMode::From(&from, Direction::Forward)) {
            let (k, _) = item.map_err(|e| self.rocks(e))?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            out.push(
                BlobId::from_bytes(&k[4..])
                    .map_err(|e| StoreError::Corrupt { what: "pending key".into(), message: e.to_string() })?,
            );
        }
        Ok(out)
    }
}

/// A write batch whose counts and digests change with its data, under the store's count lock:
/// every `put_*` checks whether its key is new (in the store or earlier in this batch) and
/// counts only what is. [`CountedBatch::commit`] writes it all in one batch, lets the lock go,
/// then makes it durable, so concurrent writers share fsyncs.
pub struct CountedBatch<'s> {
    store: &'s ShardStore,
    guard: std::sync::MutexGuard<'s, ()>,
    batch: WriteBatch,
    deltas: BTreeMap<CountKey, SetDigest>,
    buckets: BTreeMap<u16, SetDigest>,
    added: std::collections::HashSet<(u8, u32, BlobId)>,
    removed_pending: std::collections::HashSet<(u32, BlobId)>,
}

impl CountedBatch<'_> {
    fn first_time(&mut self, kind: u8, shard: u32, id: &BlobId) -> bool {
        self.added.insert((kind, shard, *id))
    }

    fn count(&mut self, key: CountKey, id: &BlobId) {
        self.deltas.entry(key).or_default().add(id);
    }

    /// Adds verified metadata; returns whether it is new.
    pub fn put_metadata(&mut self, id: &BlobId, metadata: &BlobMetadata) -> Result<bool> {
        if self.store.has_metadata(id)? || !self.first_time(b'm', 0, id) {
            return Ok(false);
        }
        self.batch.put_cf(&self.store.cf(CF_METADATA)?, id.as_bytes(), metadata.to_proto().encode_to_vec());
        self.count(CountKey::Metadata, id);
        Ok(true)
    }

    /// Adds a verified sliver (and clears the shard's pending entry of the blob); returns
    /// whether it is new.
    pub fn put_sliver(&mut self, shard: ShardIndex, id: &BlobId, data: &[u8]) -> Result<bool> {
        let held = self.store.has_sliver(shard, id)?;
        self.put_sliver_known(shard, id, data, held)
    }

    /// [`CountedBatch::put_sliver`] for a sliver whose presence in the store (`held`) was looked
    /// up under this batch's lock already.
    pub fn put_sliver_known(&mut self, shard: ShardIndex, id: &BlobId, data: &[u8], held: bool) -> Result<bool> {
        self.remove_pending(shard, id)?;
        if held || !self.first_time(b's', shard.0, id) {
            return Ok(false);
        }
        self.batch.put_cf(&self.store.shard_cf(shard)?, id.as_bytes(), data);
        self.count(CountKey::Slivers(shard), id);
        if let Some(d) = self.deltas.get_mut(&CountKey::Slivers(shard)) {
            d.bytes += data.len() as u64;
        }
        Ok(true)
    }

    /// Adds a blob to the certified index; returns whether it is new (an existing record,
    /// with any inconsistency claim, is kept).
    pub fn put_certified(&mut self, id: &BlobId, record: &CertifiedRecord) -> Result<bool> {
        if self.store.is_certified(id)? || !self.first_time(b'c', 0, id) {
            return Ok(false);
        }
        self.batch.put_cf(&self.store.cf(CF_CERTIFIED)?, id.as_bytes(), record.encode());
        self.count(CountKey::Certified, id);
        self.buckets.entry(bucket_of(id)).or_default().add(id);
        Ok(true)
    }

    /// Records an inconsistency claim on a certified blob; false if the blob is not certified
    /// here or already has a claim.
    pub fn claim_invalid(&mut self, id: &BlobId, proof: &InconsistencyProof) -> Result<bool> {
        let Some(mut record) = self.store.certified(id)? else { return Ok(false) };
        if record.invalid.is_some() {
            return Ok(false);
        }
        record.invalid = Some(proof.clone());
        self.batch.put_cf(&self.store.cf(CF_CERTIFIED)?, id.as_bytes(), record.encode());
        Ok(true)
    }

    /// Hands a blob to blob recovery if the shard lacks its sliver (in the store or in this
    /// batch); returns whether a pending entry was added.
    pub fn add_missing(&mut self, shard: ShardIndex, id: &BlobId) -> Result<bool> {
        if self.added.contains(&(b's', shard.0, *id)) || self.store.has_sliver(shard, id)? {
            return Ok(false);
        }
        self.add_pending(shard, id)
    }

    /// Hands a blob the shard lacks to blob recovery; returns whether it is new.
    pub fn add_pending(&mut self, shard: ShardIndex, id: &BlobId) -> Result<bool> {
        let key = pending_key(shard, id);
        let cf = self.store.cf(CF_PENDING)?;
        let present = self.store.inner.get_pinned_cf(&cf, &key).map_err(|e| self.store.rocks(e))?.is_some();
        if present || !self.first_time(b'p', shard.0, id) {
            return Ok(false);
        }
        self.batch.put_cf(&cf, key, []);
        self.count(CountKey::Pending(shard), id);
        Ok(true)
    }

    /// Clears a shard's pending entry of a blob, if there is one.
    pub fn remove_pending(&mut self, shard: ShardIndex, id: &BlobId) -> Result<()> {
        let key = pending_key(shard, id);
        let cf = self.store.cf(CF_PENDING)?;
        let added_here = self.added.remove(&(b'p', shard.0, *id));
        let stored = self.store.inner.get_pinned_cf(&cf, &key).map_err(|e| self.store.rocks(e))?.is_some();
        if (added_here || stored) && self.removed_pending.insert((shard.0, *id)) {
            self.batch.delete_cf(&cf, key);
            // A removal undoes the entry's count; its digest is not kept.
            let delta = self.deltas.entry(CountKey::Pending(shard)).or_default();
            delta.count = delta.count.wrapping_sub(1);
        }
        Ok(())
    }

    /// Writes a shard record in the same batch.
    pub fn put_shard_record(&mut self, shard: ShardIndex, record: &ShardRecord) -> Result<()> {
        self.batch.put_cf(&self.store.cf(CF_SHARDS)?, shard.0.to_be_bytes(), ShardStore::to_json(record));
        Ok(())
    }

    /// Writes the batch with its counts, then waits until it is durable.
    pub fn commit(mut self) -> Result<()> {
        let store = self.store;
        let counts_cf = store.cf(CF_COUNTS)?;
        for (key, delta) in std::mem::take(&mut self.deltas) {
            let mut value = store.count(key)?;
            // Pending counts only ever net out to a count; sliver and certified sets also XOR.
            value.combine(&delta);
            self.batch.put_cf(&counts_cf, key.bytes(), value.encode());
        }
        let buckets_cf = store.cf(CF_BUCKETS)?;
        let mut top_changes: Vec<(usize, SetDigest)> = Vec::new();
        for (bucket, delta) in std::mem::take(&mut self.buckets) {
            let mut value =
                match store.inner.get_pinned_cf(&buckets_cf, bucket.to_be_bytes()).map_err(|e| store.rocks(e))? {
                    Some(v) => SetDigest::decode(&v).ok_or_else(|| StoreError::Corrupt {
                        what: "bucket digest".into(),
                        message: format!("{bucket}"),
                    })?,
                    None => SetDigest::default(),
                };
            value.combine(&delta);
            self.batch.put_cf(&buckets_cf, bucket.to_be_bytes(), value.encode());
            top_changes.push(((bucket >> 8) as usize, delta));
        }
        let batch = std::mem::take(&mut self.batch);
        // Into the memtable and the WAL's buffer under the lock; later counted writes see it.
        store.inner.write_opt(batch, &WriteOptions::default()).map_err(|e| store.rocks(e))?;
        {
            let mut top = store.top_buckets.lock().unwrap_or_else(|p| p.into_inner());
            for (i, delta) in top_changes {
                if let Some(t) = top.get_mut(i) {
                    t.combine(&delta);
                }
            }
        }
        drop(self.guard);
        // Durable before it is acknowledged; writers that committed meanwhile share this sync.
        store.inner.flush_wal(true).map_err(|e| store.rocks(e))
    }
}

/// Opens a store at a path with default options (tests and tools).
pub fn open_default(path: &Path) -> Result<ShardStore> {
    ShardStore::open(&StoreConfig { path: path.to_path_buf(), ..StoreConfig::default() })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ferry_shared::erasure;

    #[test]
    fn slivers_and_progress_survive_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let shard = ShardIndex(2);
        let mut ids = Vec::new();
        {
            let store = open_default(dir.path()).unwrap();
            assert!(store.node_state().unwrap().is_none());
            store.ensure_shard_storage(shard).unwrap();
            let mut items = Vec::new();
            for i in 0..50u32 {
                let enc = erasure::encode(&i.to_be_bytes().repeat(100), 4).unwrap();
                ids.push(enc.blob_id);
                items.push(SliverWrite {
                    blob_id: enc.blob_id,
                    data: enc.slivers[2].clone(),
                    metadata: Some(enc.metadata),
                });
            }
            let record = ShardRecord {
                sync: Some(SyncProgress { cursor: Some(ids[49]), blobs_done: 50, ..Default::default() }),
                ..ShardRecord::new(ShardStatus::ActiveSync)
            };
            store.write_sync_batch(shard, &items, &[], &[BlobId([0xfe; 32])], &record).unwrap();
            // A resumed stream sends the last ten again with ten more: only the new ones count.
            let again: Vec<SliverWrite> = (40..60u32)
                .map(|i| {
                    let enc = erasure::encode(&i.to_be_bytes().repeat(100), 4).unwrap();
                    SliverWrite { blob_id: enc.blob_id, data: enc.slivers[2].clone(), metadata: None }
                })
                .collect();
            ids.extend(again[10..].iter().map(|w| w.blob_id));
            store.write_sync_batch(shard, &again, &[], &[], &record).unwrap();
        }
        let store = open_default(dir.path()).unwrap();
        let rec = store.shard_record(shard).unwrap().unwrap();
        assert_eq!(rec.sync.unwrap().blobs_done, 50);
        ids.sort();
        let read: Vec<BlobId> =
            store.read_shard(shard, None, 1000, usize::MAX).unwrap().into_iter().map(|(id, _)| id).collect();
        assert_eq!(read, ids, "iteration is in blob-id order");
        let from: Vec<BlobId> =
            store.read_shard(shard, Some(ids[10]), 5, usize::MAX).unwrap().into_iter().map(|(id, _)| id).collect();
        assert_eq!(from, ids[10..15].to_vec(), "start is inclusive and the page is capped");
        assert!(store.metadata(&ids[3]).unwrap().is_some());
        let counts = store.counts().unwrap();
        assert_eq!(counts.metadata, 50);
        assert_eq!(counts.slivers[&shard].count, 60, "slivers the shard held already are not counted again");
        assert_eq!(counts.pending[&shard], 1);
        assert_eq!(store.pending(shard, None, 10).unwrap(), vec![BlobId([0xfe; 32])]);
        assert!(store.has_sliver(shard, &ids[7]).unwrap());
        assert!(!store.has_sliver(shard, &BlobId([9; 32])).unwrap());
        assert!(matches!(store.read_shard(ShardIndex(9), None, 1, 1), Err(StoreError::NoShard(_))));
        store.drop_shard(shard).unwrap();
        assert!(store.shard_record(shard).unwrap().is_none());
        assert!(matches!(store.sliver(shard, &ids[0]), Err(StoreError::NoShard(_))));
        let counts = store.counts().unwrap();
        assert!(!counts.slivers.contains_key(&shard) && !counts.pending.contains_key(&shard));
        assert!(store.pending(shard, None, 10).unwrap().is_empty(), "pending entries go with the shard");
    }

    fn record(epoch: u64) -> CertifiedRecord {
        CertifiedRecord {
            certificate: ferry_shared::certificate::Certificate { epoch, signers: vec![7], signature: [1; 96] },
            invalid: None,
        }
    }

    #[test]
    fn slivers_present_finds_exactly_the_held_ones_in_or_out_of_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_default(dir.path()).unwrap();
        let shard = ShardIndex(0);
        store.ensure_shard_storage(shard).unwrap();
        let mut ids: Vec<BlobId> = (0..2000u32).map(|i| BlobId(*blake3::hash(&i.to_be_bytes()).as_bytes())).collect();
        ids.sort();
        let mut batch = store.counted().unwrap();
        for id in ids.iter().step_by(2) {
            batch.put_sliver(shard, id, b"x").unwrap();
        }
        batch.commit().unwrap();
        // Close together: every other one is held.
        let run = &ids[500..600];
        let expected: std::collections::HashSet<BlobId> = run.iter().step_by(2).copied().collect();
        assert_eq!(store.slivers_present(shard, run).unwrap(), expected);
        // Spread over the whole shard and out of order: the same answer.
        let sparse = [ids[1999], ids[0], ids[1001], ids[1998], ids[1]];
        let expected: std::collections::HashSet<BlobId> = [ids[0], ids[1998]].into_iter().collect();
        assert_eq!(store.slivers_present(shard, &sparse).unwrap(), expected);
        assert!(store.slivers_present(shard, &[]).unwrap().is_empty());
    }

    #[test]
    fn are_certified_answers_each_id_in_the_order_asked() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_default(dir.path()).unwrap();
        let ids: Vec<BlobId> = (0..50u32).map(|i| BlobId(*blake3::hash(&i.to_be_bytes()).as_bytes())).collect();
        let mut batch = store.counted().unwrap();
        for id in ids.iter().step_by(3) {
            batch.put_certified(id, &record(0)).unwrap();
        }
        batch.commit().unwrap();
        let asked = [ids[3], ids[1], ids[0], ids[49], ids[48], ids[3]];
        assert_eq!(store.are_certified(&asked).unwrap(), vec![true, false, true, false, true, true]);
        assert!(store.are_certified(&[]).unwrap().is_empty());
    }

    #[test]
    fn counts_and_digests_change_only_with_new_keys_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<BlobId> = (0..300u32).map(|i| BlobId(*blake3::hash(&i.to_be_bytes()).as_bytes())).collect();
        let (a, b) = (ShardIndex(0), ShardIndex(1));
        {
            let store = open_default(dir.path()).unwrap();
            store.ensure_shard_storage(a).unwrap();
            store.ensure_shard_storage(b).unwrap();
            let mut batch = store.counted().unwrap();
            for id in &ids {
                assert!(batch.put_certified(id, &record(0)).unwrap());
                assert!(!batch.put_certified(id, &record(1)).unwrap(), "twice in one batch counts once");
                assert!(batch.add_pending(a, id).unwrap());
            }
            batch.commit().unwrap();
            // Again, in a later batch: nothing new; the first record stays.
            let mut batch = store.counted().unwrap();
            for id in &ids[..10] {
                assert!(!batch.put_certified(id, &record(2)).unwrap());
                assert!(!batch.add_pending(a, id).unwrap());
                assert!(batch.put_sliver(a, id, b"x").unwrap(), "a sliver clears the pending entry");
                assert!(batch.put_sliver(b, id, b"x").unwrap());
            }
            batch.commit().unwrap();
            assert_eq!(store.certified(&ids[0]).unwrap().unwrap().certificate.epoch, 0);
        }
        let store = open_default(dir.path()).unwrap();
        let counts = store.counts().unwrap();
        assert_eq!(counts.certified.count, 300);
        assert_eq!(counts.pending[&a], 290);
        assert_eq!(store.pending(a, None, 1000).unwrap().len(), 290);
        assert_eq!((counts.slivers[&a].count, counts.slivers[&b].count), (10, 10));
        assert_eq!(counts.slivers[&a].xor, counts.slivers[&b].xor, "same blobs, same digest");
        // The digests: every bucket sums to the total, and the top level (rebuilt from the
        // buckets at open) agrees with the buckets.
        let buckets = store.range_digests(2, 0, BUCKETS).unwrap();
        let top = store.range_digests(1, 0, TOP_BUCKETS).unwrap();
        let mut sum = SetDigest::default();
        buckets.iter().for_each(|d| sum.combine(d));
        assert_eq!(sum, counts.certified);
        for (i, t) in top.iter().enumerate() {
            let mut s = SetDigest::default();
            buckets[i * 256..(i + 1) * 256].iter().for_each(|d| s.combine(d));
            assert_eq!(*t, s, "top bucket {i}");
        }
        // Listing by range: start inclusive, end exclusive, capped.
        let mut sorted = ids.clone();
        sorted.sort();
        let (page, done) = store.list_certified(Some(sorted[5]), Some(sorted[20]), 100).unwrap();
        assert!(done);
        assert_eq!(page.iter().map(|(id, _)| *id).collect::<Vec<_>>(), sorted[5..20].to_vec());
        let (page, done) = store.list_certified(None, None, 7).unwrap();
        assert!(!done && page.len() == 7);
    }

    #[test]
    fn a_corrupt_key_fails_the_read_instead_of_ending_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_default(dir.path()).unwrap();
        let shard = ShardIndex(0);
        store.ensure_shard_storage(shard).unwrap();
        store.put_sliver(shard, &BlobId([1; 32]), b"ab").unwrap();
        // A key that is not a blob id (bit rot, a bug): the iteration must fail, not stop.
        let cf = store.shard_cf(shard).unwrap();
        store.inner.put_cf(&cf, [2u8; 5], b"cd").unwrap();
        drop(cf);
        assert!(matches!(store.read_shard(shard, None, 10, usize::MAX), Err(StoreError::Corrupt { .. })));
        assert!(store.for_each_blob_in_shard(shard, |_| {}).is_err());
    }
}
