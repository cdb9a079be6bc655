//! recovery-service's Prometheus metrics, served on `metrics_listen` at `/metrics`.

use ferry_shared::metrics::{RpcMetrics, register};
use prometheus::{Counter, IntCounter, Registry};

/// Every recovery-service metric, in one registry per service.
#[derive(Clone)]
pub struct RecoveryMetrics {
    /// The registry served at `/metrics`.
    pub registry: Registry,
    /// `ferry_recovery_blobs_scanned_total`: certified blobs checked for missing slivers.
    pub blobs_scanned: IntCounter,
    /// `ferry_recovery_blobs_recovered_total`: blobs whose missing slivers were rebuilt.
    pub blobs_recovered: IntCounter,
    /// `ferry_recovery_blobs_failed_total`: blob recovery attempts that failed (retried later).
    pub blobs_failed: IntCounter,
    /// `ferry_recovery_bytes_fetched_total`: sliver bytes fetched from peers for decoding.
    pub bytes_fetched: IntCounter,
    /// `ferry_recovery_sync_wait_seconds_total`: time blob recovery waited for shard syncs.
    pub sync_wait_seconds: Counter,
    /// `ferry_recovery_attestations_total`: epoch-sync-done attestations recorded.
    pub attestations: IntCounter,
    /// `ferry_rpc_duration_seconds{method, code}`.
    pub rpc: RpcMetrics,
}

impl RecoveryMetrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        Ok(RecoveryMetrics {
            blobs_scanned: register(
                &registry,
                IntCounter::new("ferry_recovery_blobs_scanned_total", "Certified blobs checked for missing slivers.")?,
            ),
            blobs_recovered: register(
                &registry,
                IntCounter::new("ferry_recovery_blobs_recovered_total", "Blobs whose missing slivers were rebuilt.")?,
            ),
            blobs_failed: register(
                &registry,
                IntCounter::new(
                    "ferry_recovery_blobs_failed_total",
                    "Blob recovery attempts that failed; they are retried.",
                )?,
            ),
            bytes_fetched: register(
                &registry,
                IntCounter::new("ferry_recovery_bytes_fetched_total", "Sliver bytes fetched from peers for decoding.")?,
            ),
            sync_wait_seconds: register(
                &registry,
                Counter::new(
                    "ferry_recovery_sync_wait_seconds_total",
                    "Time blob recovery spent waiting for shard syncs to finish.",
                )?,
            ),
            attestations: register(
                &registry,
                IntCounter::new(
                    "ferry_recovery_attestations_total",
                    "Epoch-sync-done attestations recorded by recovery-service.",
                )?,
            ),
            rpc: RpcMetrics::new(&registry)?,
            registry,
        })
    }
}
