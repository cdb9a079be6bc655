//! sync-service's Prometheus metrics, served on `metrics_listen` at `/metrics`.

use ferry_shared::metrics::{RpcMetrics, register};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every sync-service metric, in one registry per service.
#[derive(Clone)]
pub struct SyncMetrics {
    /// The registry served at `/metrics`.
    pub registry: Registry,
    /// `ferry_sync_running`: shard-sync tasks running now (the count recovery-service follows).
    pub running_syncs: IntGauge,
    /// `ferry_sync_slivers_total{shard}`: slivers written by shard sync.
    pub synced_slivers: IntCounterVec,
    /// `ferry_sync_bytes_total{shard}`: sliver bytes written by shard sync.
    pub synced_bytes: IntCounterVec,
    /// `ferry_sync_retries_total`: shard-sync attempts that failed and were retried.
    pub sync_retries: IntCounter,
    /// `ferry_sync_failures_total`: shard syncs given up (their shard goes to blob recovery).
    pub sync_failures: IntCounter,
    /// `ferry_sync_completed_total`: shard syncs finished.
    pub sync_completed: IntCounter,
    /// `ferry_stream_items_total{shard}`: slivers served to peers by `StreamShard`.
    pub streamed_items: IntCounterVec,
    /// `ferry_stream_bytes_total{shard}`: sliver bytes served to peers by `StreamShard`.
    pub streamed_bytes: IntCounterVec,
    /// `ferry_attestations_total`: epoch-sync-done attestations this node recorded.
    pub attestations: IntCounter,
    /// `ferry_index_learned_total`: certified blobs that entered the index from any source.
    pub index_learned: IntCounter,
    /// `ferry_control_plane_poisoned_total`: committees or phases read from the control plane
    /// that did not decode or were not valid, and were skipped. Alert on any increase.
    pub control_plane_poisoned: IntCounter,
    /// `ferry_rpc_duration_seconds{method, code}`.
    pub rpc: RpcMetrics,
}

impl SyncMetrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let by_shard = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["shard"]);
        Ok(SyncMetrics {
            running_syncs: register(&registry, IntGauge::new("ferry_sync_running", "Shard-sync tasks running now.")?),
            synced_slivers: register(
                &registry,
                by_shard("ferry_sync_slivers_total", "Slivers written by shard sync, by shard.")?,
            ),
            synced_bytes: register(
                &registry,
                by_shard("ferry_sync_bytes_total", "Sliver bytes written by shard sync, by shard.")?,
            ),
            sync_retries: register(
                &registry,
                IntCounter::new("ferry_sync_retries_total", "Shard-sync attempts that failed and were retried.")?,
            ),
            sync_failures: register(
                &registry,
                IntCounter::new(
                    "ferry_sync_failures_total",
                    "Shard syncs given up; their shard goes to blob recovery.",
                )?,
            ),
            sync_completed: register(
                &registry,
                IntCounter::new("ferry_sync_completed_total", "Shard syncs finished.")?,
            ),
            streamed_items: register(
                &registry,
                by_shard("ferry_stream_items_total", "Slivers served to peers by StreamShard, by shard.")?,
            ),
            streamed_bytes: register(
                &registry,
                by_shard("ferry_stream_bytes_total", "Sliver bytes served to peers by StreamShard, by shard.")?,
            ),
            attestations: register(
                &registry,
                IntCounter::new("ferry_attestations_total", "Epoch-sync-done attestations this node recorded.")?,
            ),
            index_learned: register(
                &registry,
                IntCounter::new(
                    "ferry_index_learned_total",
                    "Certified blobs that entered this node's index (clients, shard streams, peers).",
                )?,
            ),
            control_plane_poisoned: register(
                &registry,
                IntCounter::new(
                    "ferry_control_plane_poisoned_total",
                    "Committees or phases from the control plane that did not decode or were invalid, and were skipped.",
                )?,
            ),
            rpc: RpcMetrics::new(&registry)?,
            registry,
        })
    }
}
