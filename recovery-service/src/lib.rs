//! Ferry's recovery-service: follows its sync-service's sync state, recovers missing slivers
//! blob by blob through erasure decoding from peers (never while shard syncs run), and sends
//! the node's single epoch-sync-done attestation once blob recovery and every shard sync are
//! done.

pub mod blob_recovery;
pub mod config;
pub mod metrics;
pub mod node_recovery;
pub mod server;
pub mod store;
pub mod sync_state;

use std::{future::Future, net::SocketAddr, path::Path, sync::Arc};

use anyhow::Context;
use ferry_proto::v1::recovery_service_server::RecoveryServiceServer;
use ferry_shared::{
    authz::{AuthzLayer, NoCommittee},
    config_watch,
    control_plane::ControlPlane,
    crypto::NodeKeypair,
    grpc::Connector,
    metrics::{RpcMetricsLayer, start_metrics_server},
    serving, telemetry,
    types::NodeId,
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    blob_recovery::Peers, config::RecoveryConfig, metrics::RecoveryMetrics, node_recovery::Recovery,
    server::RecoveryServer, store::RecoveryStore,
};

/// Tries to reach etcd at start before giving up (about 35 s with the backoff).
const CONNECT_ATTEMPTS: u32 = 10;

/// A running recovery-service.
pub struct RecoveryServiceHandle {
    /// The recovery loop and its status.
    pub recovery: Arc<Recovery>,
    /// gRPC address.
    pub addr: SocketAddr,
    /// Plaintext health address.
    pub health_addr: SocketAddr,
    /// Prometheus metrics address.
    pub metrics_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RecoveryServiceHandle {
    /// Stops the service and waits for it.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        let closed = self.recovery.store_closed();
        let result = self.task.await.context("recovery-service task")?;
        drop(self.recovery);
        tokio::time::timeout(std::time::Duration::from_secs(30), closed)
            .await
            .context("the recovery store was still in use 30 s after shutdown")?;
        result
    }
}

/// Starts recovery-service.
pub async fn start(config: RecoveryConfig) -> anyhow::Result<RecoveryServiceHandle> {
    // The node's own certificate is also its etcd identity (etcd's RBAC user is its name).
    let identity = config.tls.load(Some(&NodeId::new(config.node_id.as_str())?))?;
    let control_plane = ControlPlane::connect_etcd_with_retry(
        &config.control_plane.etcd_endpoints,
        &config.control_plane.cluster,
        identity.as_deref(),
        CONNECT_ATTEMPTS,
    )
    .await?;
    start_with(config, control_plane).await
}

/// [`start`] with a given control plane.
pub async fn start_with(config: RecoveryConfig, control_plane: ControlPlane) -> anyhow::Result<RecoveryServiceHandle> {
    let me = NodeId::new(config.node_id.clone())?;
    let key = NodeKeypair::load(&config.key_file)?;
    let tls = config.tls.load(Some(&me)).context("TLS material")?;
    let metrics = RecoveryMetrics::new().context("metrics registry")?;
    let connector = Connector::new(tls.clone());
    let store_path = config.store_path.clone();
    let store = tokio::task::spawn_blocking(move || RecoveryStore::open(&store_path)).await??;
    let paused = store.paused()?;
    let listener = serving::bind_with_retry(config.listen).await.with_context(|| format!("bind {}", config.listen))?;
    let health_listener = serving::bind_with_retry(config.health_listen)
        .await
        .with_context(|| format!("bind {}", config.health_listen))?;
    let addr = listener.local_addr()?;
    let health_addr = health_listener.local_addr()?;

    // The node's own sync-service must prove it is this node.
    let own = connector
        .channel(&config.sync_service, &me, None)
        .map_err(|s| anyhow::anyhow!("sync_service address: {}", s.message()))?;
    let (sync_state, follower) = sync_state::follow(own.clone());
    let peers = Arc::new(Peers::new(me.clone(), own, connector, config.recovery.peer_timeout()));
    let recovery = Recovery::new(
        me.clone(),
        key,
        control_plane,
        store,
        peers,
        sync_state,
        config.recovery.clone(),
        paused,
        metrics.clone(),
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RecoveryServiceServer<RecoveryServer>>().await;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let health_server = serving::spawn_health_server(
        health_listener,
        health_service.clone(),
        &config.server,
        me.clone(),
        shutdown_rx.clone(),
    )?;
    let (metrics_addr, metrics_server) =
        start_metrics_server(config.metrics_listen, metrics.registry.clone(), shutdown_rx.clone())
            .await
            .with_context(|| format!("bind {}", config.metrics_listen))?;
    let limits = &config.server;
    let (builder, authentication) = limits.secured_builder(tls.as_deref()).context("TLS server configuration")?;
    let methods = Arc::new(server::method_table());
    let main_server = {
        let mut shutdown = shutdown_rx.clone();
        let refused = metrics.rpc.refused_connections.clone();
        builder
            .trace_fn(telemetry::grpc_server_span("recovery-service", me.to_string()))
            .layer(RpcMetricsLayer::new(metrics.rpc.clone(), methods.clone()))
            .layer(AuthzLayer::new(methods.clone(), Arc::new(NoCommittee(me.clone())), authentication))
            .add_service(health_service)
            .add_service(serving::reflection_v1()?)
            .add_service(serving::reflection_v1alpha()?)
            .add_service(
                RecoveryServiceServer::new(RecoveryServer::new(recovery.clone()))
                    .max_decoding_message_size(methods.max_request_bytes()),
            )
            .serve_with_incoming_shutdown(limits.incoming(listener, move || refused.inc()), async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
    };
    let mut loop_task = tokio::spawn(recovery.clone().run());
    info!(%addr, %health_addr, %metrics_addr, node = %me, tls = tls.is_some(), "recovery-service listening");
    let mut shutdown = shutdown_rx;
    let task = tokio::spawn(async move {
        let mut loop_done = false;
        let result = tokio::select! {
            r = main_server => r.context("gRPC server failed"),
            r = &mut loop_task => {
                loop_done = true;
                Err(anyhow::anyhow!("FERRY-RECOVERY-004: the recovery loop stopped unexpectedly: {r:?}"))
            }
            _ = shutdown.wait_for(|s| *s) => Ok(()),
        };
        // Stop every task holding the store, so it is closed when the service returns.
        if !loop_done {
            loop_task.abort();
            let _ = loop_task.await;
        }
        follower.abort();
        let _ = follower.await;
        health_server.abort();
        let _ = health_server.await;
        metrics_server.abort();
        let _ = metrics_server.await;
        result
    });
    Ok(RecoveryServiceHandle { recovery, addr, health_addr, metrics_addr, shutdown: shutdown_tx, task })
}

/// Applies `recovery.max_concurrent_blobs` while running when `config_file` changes; other
/// changed settings are logged as needing a restart. Returns the guard that keeps the watch.
pub fn apply_config_changes(
    recovery: &Arc<Recovery>,
    initial: RecoveryConfig,
    config_file: &Path,
) -> anyhow::Result<config_watch::ConfigWatchGuard> {
    let (mut changes, guard) =
        config_watch::watch_config::<RecoveryConfig>(config_file, config::ENV_PREFIX, initial.clone())?;
    let recovery = recovery.clone();
    tokio::spawn(async move {
        let mut applied = initial;
        while changes.changed().await.is_ok() {
            let new = changes.borrow_and_update().clone();
            if new.recovery.max_concurrent_blobs != applied.recovery.max_concurrent_blobs {
                let previous = recovery.set_max_concurrent_blobs(new.recovery.max_concurrent_blobs);
                info!(
                    previous,
                    now = new.recovery.max_concurrent_blobs,
                    "blob recovery concurrency changed by the config file"
                );
            }
            if config_watch::needs_restart(&applied, &new, |rest, old| {
                rest.recovery.max_concurrent_blobs = old.recovery.max_concurrent_blobs
            }) {
                warn!("the config file changed settings that apply only after a restart");
            }
            applied = new;
        }
    });
    Ok(guard)
}

/// Runs until `signal` resolves. With `config_file`, live settings in it are applied when it
/// changes.
pub async fn run_until(
    config: RecoveryConfig,
    config_file: Option<&Path>,
    signal: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let initial = config.clone();
    let handle = start(config).await?;
    let _watch = match config_file {
        Some(file) => Some(apply_config_changes(&handle.recovery, initial, file)?),
        None => None,
    };
    let shutdown = handle.shutdown.clone();
    let mut task = handle.task;
    tokio::select! {
        r = &mut task => r.context("recovery-service task")?,
        () = signal => {
            let _ = shutdown.send(true);
            task.await.context("recovery-service task")?
        }
    }
}
