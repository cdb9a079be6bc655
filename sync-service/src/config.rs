//! sync-service configuration: defaults for a small production node, overridable by a TOML
//! file (`--config`) and by `FERRY_SYNC__<SECTION>__<KEY>` environment variables.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use ferry_shared::{
    config::{ConfigError, ControlPlaneConfig, Validate, invalid},
    serving::ServerConfig,
    telemetry::LogFormat,
    throttle::ThrottleConfig,
    tls::TlsConfig,
    types::NodeId,
};
use serde::{Deserialize, Serialize};

/// Environment prefix of sync-service settings.
pub const ENV_PREFIX: &str = "FERRY_SYNC";

/// The whole sync-service configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    /// This node's id, as listed in the committee. Required.
    pub node_id: String,
    /// File holding the node's ed25519 seed (64 hex characters). Required.
    pub key_file: PathBuf,
    /// gRPC listen address of the service.
    pub listen: SocketAddr,
    /// Plaintext gRPC health (and reflection) listen address, for kubelet probes.
    pub health_listen: SocketAddr,
    /// Prometheus metrics (`GET /metrics`, plain HTTP) listen address.
    pub metrics_listen: SocketAddr,
    /// Mutual TLS on `listen` and towards peers (on by default).
    pub tls: TlsConfig,
    /// Connection limits of the gRPC port (and of the health port).
    pub server: ServerConfig,
    /// Log format.
    pub log_format: LogFormat,
    /// Control plane.
    pub control_plane: ControlPlaneConfig,
    /// RocksDB store.
    pub store: StoreConfig,
    /// Shard sync (the receiving side).
    pub shard_sync: ShardSyncConfig,
    /// Shard streaming (the serving side).
    pub stream: StreamConfig,
    /// The certified index: catching it up from peers and keeping it in step (anti-entropy).
    pub index: IndexConfig,
    /// Background work (shard sync, the recovery's writes, serving peers) backs off when
    /// clients' latency rises. Applied live.
    pub throttle: ThrottleConfig,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            node_id: String::new(),
            key_file: PathBuf::from("node.key"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            health_listen: SocketAddr::from(([127, 0, 0, 1], 7401)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 7402)),
            tls: TlsConfig::default(),
            server: ServerConfig::default(),
            log_format: LogFormat::Text,
            control_plane: ControlPlaneConfig::default(),
            store: StoreConfig::default(),
            shard_sync: ShardSyncConfig::default(),
            stream: StreamConfig::default(),
            index: IndexConfig::default(),
            throttle: ThrottleConfig::default(),
        }
    }
}

/// How the node's certified index learns what its peers know.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct IndexConfig {
    /// Pause between two anti-entropy rounds, each with the next peer in turn (ms). Default
    /// 10000: with 100 members a node compares with every peer about every 17 minutes, and
    /// each quiet round costs a peer one 11 KB digest reply.
    pub anti_entropy_interval_ms: u64,
    /// After a start, the index counts as caught up once every member answered a full round;
    /// past this deadline (ms), answers from members owning a quorum of shards (with this
    /// node's own) suffice, so one member that is down does not hold recovery up. Default 30000.
    pub catch_up_deadline_ms: u64,
    /// Blob ids asked per `ListCertified` page and certificates per `GetCertificates`. Default 1024.
    pub page: usize,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig { anti_entropy_interval_ms: 10_000, catch_up_deadline_ms: 30_000, page: 1024 }
    }
}

/// RocksDB options, sized by default for a small machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Store directory.
    pub path: PathBuf,
    /// Block cache shared by all column families (MiB). Default 64.
    pub block_cache_mib: usize,
    /// Memtable size per column family (MiB). Default 16.
    pub write_buffer_mib: usize,
    /// Memtables of all column families together (MiB); with `block_cache_mib` this bounds the
    /// store's memory whatever the number of blobs and shards. Default 128.
    pub memtable_budget_mib: usize,
    /// Open file limit (-1 = unlimited). Default 512.
    pub max_open_files: i32,
    /// Background flush and compaction threads. Default 2.
    pub max_background_jobs: i32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("data/sync"),
            block_cache_mib: 64,
            write_buffer_mib: 16,
            memtable_budget_mib: 128,
            max_open_files: 512,
            max_background_jobs: 2,
        }
    }
}

/// How gained shards are pulled from their previous owners.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShardSyncConfig {
    /// Shard syncs that may run at once. Default 4. Changeable at run time through `SyncAdmin`
    /// or by editing the config file (applied live).
    pub max_concurrent_syncs: u32,
    /// A sync that makes no progress for this long fails for good and its shard goes to blob
    /// recovery (ms); while it makes progress it is retried however often the stream breaks.
    /// Default 300000 (5 minutes).
    pub give_up_after_ms: u64,
    /// Certified blobs that must settle (stored, or found missing and left to blob recovery)
    /// for a sync to count as progressing, restarting `give_up_after_ms`. Default 64: a source
    /// that trickles a few valid items just inside the deadline is given up on.
    pub progress_blobs: u64,
    /// First retry delay (ms); doubles per attempt, with ±25% jitter. Default 500.
    pub initial_backoff_ms: u64,
    /// Largest retry delay (ms). Default 30000.
    pub max_backoff_ms: u64,
    /// Slivers written per atomic batch (with their progress). Default 1024.
    pub batch_items: usize,
    /// Bytes after which a batch is written early. Default 8 MiB.
    pub batch_bytes: usize,
    /// A stream that yields no item for this long is abandoned and retried (ms). Default 30000.
    pub item_timeout_ms: u64,
    /// How gained shards are filled: `shard_sync` (default) or `blob_recovery` (for
    /// benchmarks that compare the two).
    pub fill_gained_by: FillMethod,
}

/// How a gained shard is filled.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FillMethod {
    /// Stream it from the previous owner.
    ShardSync,
    /// Leave it to blob recovery.
    BlobRecovery,
}

impl Default for ShardSyncConfig {
    fn default() -> Self {
        ShardSyncConfig {
            max_concurrent_syncs: 4,
            give_up_after_ms: 300_000,
            progress_blobs: 64,
            initial_backoff_ms: 500,
            max_backoff_ms: 30_000,
            batch_items: 1024,
            batch_bytes: 8 * 1024 * 1024,
            item_timeout_ms: 30_000,
            fill_gained_by: FillMethod::ShardSync,
        }
    }
}

impl ShardSyncConfig {
    /// The per-item timeout.
    pub fn item_timeout(&self) -> Duration {
        Duration::from_millis(self.item_timeout_ms)
    }

    /// How long a sync may go without progress before it fails for good.
    pub fn give_up_after(&self) -> Duration {
        Duration::from_millis(self.give_up_after_ms)
    }
}

/// Serving shards to peers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Outgoing shard streams served at once; more wait for a permit. Default 4.
    pub max_concurrent_streams: usize,
    /// Items buffered per stream between the store reader and the network. Default 16.
    pub channel_capacity: usize,
    /// Items read from the store per read (at most 8 MiB). Default 128.
    pub read_batch_items: usize,
    /// A reader that takes no item for this long is dropped (ms). Default 60000.
    pub send_timeout_ms: u64,
    /// Allowed clock difference for signed requests (ms). Default 300000.
    pub max_clock_skew_ms: u64,
    /// Largest `limit` a request may ask for; 0 in a request means the whole shard. Default
    /// 10 000 000.
    pub max_items: u64,
    /// Bandwidth cap of each outgoing shard stream in bytes per second, so moving shards does
    /// not starve client traffic; 0 = unlimited (default). Applied live when the config file
    /// changes, to streams already running too.
    pub max_bytes_per_sec: u64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            max_concurrent_streams: 4,
            channel_capacity: 16,
            read_batch_items: 128,
            send_timeout_ms: 60_000,
            max_clock_skew_ms: 300_000,
            max_items: 10_000_000,
            max_bytes_per_sec: 0,
        }
    }
}

impl Validate for SyncConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        NodeId::new(self.node_id.clone()).map_err(|e| invalid("node_id", e.to_string()))?;
        self.control_plane.validate()?;
        self.control_plane.check_identity(self.tls.enabled)?;
        if self.listen == self.health_listen {
            return Err(invalid("health_listen", "must differ from `listen`"));
        }
        if self.metrics_listen == self.listen || self.metrics_listen == self.health_listen {
            return Err(invalid("metrics_listen", "must differ from `listen` and `health_listen`"));
        }
        self.tls.validate("tls", &[self.listen])?;
        self.server.validate("server")?;
        let s = &self.shard_sync;
        for (field, value) in [
            ("shard_sync.max_concurrent_syncs", s.max_concurrent_syncs as u64),
            ("shard_sync.give_up_after_ms", s.give_up_after_ms),
            ("shard_sync.progress_blobs", s.progress_blobs),
            ("shard_sync.batch_items", s.batch_items as u64),
            ("shard_sync.item_timeout_ms", s.item_timeout_ms),
            ("stream.max_concurrent_streams", self.stream.max_concurrent_streams as u64),
            ("stream.channel_capacity", self.stream.channel_capacity as u64),
            ("stream.read_batch_items", self.stream.read_batch_items as u64),
            ("store.block_cache_mib", self.store.block_cache_mib as u64),
            ("store.write_buffer_mib", self.store.write_buffer_mib as u64),
            ("store.memtable_budget_mib", self.store.memtable_budget_mib as u64),
            ("index.anti_entropy_interval_ms", self.index.anti_entropy_interval_ms),
            ("index.page", self.index.page as u64),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if self.store.memtable_budget_mib < self.store.write_buffer_mib {
            return Err(invalid("store.memtable_budget_mib", "must be at least `store.write_buffer_mib`"));
        }
        if s.initial_backoff_ms > s.max_backoff_ms {
            return Err(invalid("shard_sync.initial_backoff_ms", "must not exceed shard_sync.max_backoff_ms"));
        }
        if self.index.page > 4096 {
            return Err(invalid("index.page", "at most 4096 (the servers' cap)"));
        }
        self.throttle.validate()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The example beside the crate. The directory is read when the test runs, not when it is
    /// built: a test binary reused from a build in another checkout would look there.
    fn example_path() -> std::path::PathBuf {
        let dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR for tests");
        std::path::Path::new(&dir).join("sync-service.example.toml")
    }

    #[test]
    fn the_example_config_loads_and_environment_overrides_it() {
        let path = example_path();
        let env = vec![
            ("FERRY_SYNC__SHARD_SYNC__MAX_CONCURRENT_SYNCS".to_string(), "9".to_string()),
            ("FERRY_SYNC_CONFIG".to_string(), "/elsewhere.toml".to_string()),
        ];
        let c: SyncConfig = ferry_shared::config::load_from(Some(&path), ENV_PREFIX, env).unwrap();
        assert_eq!(c.node_id, "node-0");
        assert_eq!(c.shard_sync.max_concurrent_syncs, 9);
        let bad = vec![("FERRY_SYNC__SHARD_SYNC__GIVE_UP_AFTER_MS".to_string(), "0".to_string())];
        let err = ferry_shared::config::load_from::<SyncConfig>(Some(&path), ENV_PREFIX, bad).unwrap_err();
        assert!(err.to_string().contains("shard_sync.give_up_after_ms"), "{err}");
    }

    #[test]
    fn a_memtable_budget_below_one_memtable_is_refused() {
        let path = example_path();
        let env = vec![("FERRY_SYNC__STORE__MEMTABLE_BUDGET_MIB".to_string(), "8".to_string())];
        let err = ferry_shared::config::load_from::<SyncConfig>(Some(&path), ENV_PREFIX, env).unwrap_err();
        assert!(err.to_string().contains("store.memtable_budget_mib"), "{err}");
    }

    #[test]
    fn plaintext_beyond_loopback_needs_the_insecure_setting() {
        let path = example_path();
        let load = |pairs: &[(&str, &str)]| {
            let env: Vec<(String, String)> =
                pairs.iter().map(|(k, v)| (format!("FERRY_SYNC__{k}"), v.to_string())).collect();
            ferry_shared::config::load_from::<SyncConfig>(Some(&path), ENV_PREFIX, env)
        };
        // Plaintext on loopback (tests, a single machine) is allowed.
        load(&[("TLS__ENABLED", "false"), ("LISTEN", "127.0.0.1:7400")]).unwrap();
        // Plaintext on a routable address needs the setting that names the risk.
        let err = load(&[("TLS__ENABLED", "false"), ("LISTEN", "0.0.0.0:7400")]).unwrap_err();
        assert!(err.to_string().contains("tls.insecure_plaintext_beyond_loopback"), "{err}");
        load(&[
            ("TLS__ENABLED", "false"),
            ("LISTEN", "0.0.0.0:7400"),
            ("TLS__INSECURE_PLAINTEXT_BEYOND_LOOPBACK", "true"),
        ])
        .unwrap();
        // TLS on any address is fine.
        load(&[("LISTEN", "0.0.0.0:7400")]).unwrap();
        let err = load(&[("SERVER__MAX_CONNECTIONS", "0")]).unwrap_err();
        assert!(err.to_string().contains("server.max_connections"), "{err}");
    }

    #[test]
    fn a_missing_node_id_is_named() {
        let err = ferry_shared::config::load_from::<SyncConfig>(None, ENV_PREFIX, Vec::new()).unwrap_err();
        assert!(err.to_string().contains("node_id"), "{err}");
    }
}
