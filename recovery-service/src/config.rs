//! recovery-service configuration: defaults, then a TOML file (`--config`), then
//! `FERRY_RECOVERY__<SECTION>__<KEY>` environment variables.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use ferry_shared::{
    config::{ConfigError, ControlPlaneConfig, Validate, invalid},
    serving::ServerConfig,
    telemetry::LogFormat,
    tls::TlsConfig,
    types::NodeId,
};
use serde::{Deserialize, Serialize};

/// Environment prefix of recovery-service settings.
pub const ENV_PREFIX: &str = "FERRY_RECOVERY";

/// The whole recovery-service configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RecoveryConfig {
    /// This node's id (the same as its sync-service's). Required.
    pub node_id: String,
    /// The node's ed25519 seed file (shared with sync-service; attestations are signed with it).
    pub key_file: PathBuf,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Plaintext gRPC health listen address, for probes.
    pub health_listen: SocketAddr,
    /// Prometheus metrics (`GET /metrics`, plain HTTP) listen address.
    pub metrics_listen: SocketAddr,
    /// Mutual TLS on `listen`, towards this node's sync-service and towards peers (on by
    /// default; the node's certificate, as sync-service uses).
    pub tls: TlsConfig,
    /// Connection limits of the gRPC port (and of the health port).
    pub server: ServerConfig,
    /// Address of this node's own sync-service.
    pub sync_service: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Control plane.
    pub control_plane: ControlPlaneConfig,
    /// recovery-service's own small RocksDB (cursor, attestation log, pause flag).
    pub store_path: PathBuf,
    /// Recovery behaviour.
    pub recovery: RecoveryTuning,
}

/// Knobs of node and blob recovery.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RecoveryTuning {
    /// Blobs recovered at once. Default 8. Applied live when the config file changes.
    pub max_concurrent_blobs: usize,
    /// Registry page size of a scan. Default 256.
    pub scan_page: usize,
    /// Per-request timeout towards peers (ms). Default 10000.
    pub peer_timeout_ms: u64,
    /// Delay before a pass with failures is retried (ms); doubles to `max_retry_ms`. Default 500.
    pub retry_initial_ms: u64,
    /// Largest retry delay (ms). Default 30000.
    pub retry_max_ms: u64,
    /// No progress for this long marks recovery stalled (ms). Default 60000.
    pub stall_after_ms: u64,
}

impl Default for RecoveryTuning {
    fn default() -> Self {
        RecoveryTuning {
            max_concurrent_blobs: 8,
            scan_page: 256,
            peer_timeout_ms: 10_000,
            retry_initial_ms: 500,
            retry_max_ms: 30_000,
            stall_after_ms: 60_000,
        }
    }
}

impl RecoveryTuning {
    /// Peer request timeout.
    pub fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_timeout_ms)
    }
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            node_id: String::new(),
            key_file: PathBuf::from("node.key"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7410)),
            health_listen: SocketAddr::from(([127, 0, 0, 1], 7411)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 7412)),
            tls: TlsConfig::default(),
            server: ServerConfig::default(),
            sync_service: "127.0.0.1:7400".into(),
            log_format: LogFormat::Text,
            control_plane: ControlPlaneConfig::default(),
            store_path: PathBuf::from("data/recovery"),
            recovery: RecoveryTuning::default(),
        }
    }
}

impl Validate for RecoveryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        NodeId::new(self.node_id.clone()).map_err(|e| invalid("node_id", e.to_string()))?;
        self.control_plane.validate()?;
        self.control_plane.check_identity(self.tls.enabled)?;
        if self.sync_service.is_empty() {
            return Err(invalid("sync_service", "the address of this node's sync-service is needed"));
        }
        if self.listen == self.health_listen {
            return Err(invalid("health_listen", "must differ from `listen`"));
        }
        if self.metrics_listen == self.listen || self.metrics_listen == self.health_listen {
            return Err(invalid("metrics_listen", "must differ from `listen` and `health_listen`"));
        }
        self.tls.validate("tls", &[self.listen])?;
        self.server.validate("server")?;
        let r = &self.recovery;
        for (field, value) in [
            ("recovery.max_concurrent_blobs", r.max_concurrent_blobs as u64),
            ("recovery.scan_page", r.scan_page as u64),
            ("recovery.peer_timeout_ms", r.peer_timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if r.scan_page > 1024 {
            return Err(invalid("recovery.scan_page", "at most 1024 (sync-service's CheckBlobs limit)"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn example_config_loads_with_overrides() {
        // Read when the test runs: a test binary reused from another checkout's build would
        // otherwise look there.
        let dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR for tests");
        let path = std::path::Path::new(&dir).join("recovery-service.example.toml");
        let env = vec![("FERRY_RECOVERY__RECOVERY__MAX_CONCURRENT_BLOBS".to_string(), "3".to_string())];
        let c: RecoveryConfig = ferry_shared::config::load_from(Some(&path), ENV_PREFIX, env).unwrap();
        assert_eq!(c.recovery.max_concurrent_blobs, 3);
        let bad = vec![("FERRY_RECOVERY__RECOVERY__SCAN_PAGE".to_string(), "5000".to_string())];
        let err = ferry_shared::config::load_from::<RecoveryConfig>(Some(&path), ENV_PREFIX, bad).unwrap_err();
        assert!(err.to_string().contains("recovery.scan_page"), "{err}");
    }
}
