//! Ferry's sync-service: owns the node's RocksDB shard store, serves the data plane and whole
//! shards to their new owners, runs the shard-sync tasks that fill gained shards at an epoch
//! change, and publishes the running-sync count that recovery-service follows.

pub mod config;
pub mod metrics;
pub mod node;
pub mod server;
pub mod store;

use std::{
    future::Future,
    net::SocketAddr,
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context;
use ferry_proto::v1::{sync_admin_server::SyncAdminServer, sync_service_server::SyncServiceServer};
use ferry_shared::{
    authz::AuthzLayer,
    config_watch,
    control_plane::ControlPlane,
    grpc::MAX_MESSAGE_BYTES,
    metrics::{RpcMetricsLayer, start_metrics_server},
    serving, telemetry,
    types::NodeId,
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{error, info, warn};

use crate::{
    config::SyncConfig,
    node::{Node, NodeError, epoch_change},
    server::SyncServer,
};

/// Tries to reach etcd at start before giving up (about 35 s with the backoff).
const CONNECT_ATTEMPTS: u32 = 10;

/// A running sync-service.
pub struct SyncServiceHandle {
    /// The node.
    pub node: Arc<Node>,
    /// Address the gRPC server listens on.
    pub addr: SocketAddr,
    /// Address of the plaintext health server.
    pub health_addr: SocketAddr,
    /// Address of the Prometheus metrics endpoint.
    pub metrics_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl SyncServiceHandle {
    /// Stops the service gracefully and waits for it.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        let closed = self.node.store.closed();
        let result = self.task.await.context("sync-service task")?;
        drop(self.node);
        // Blocking store calls still in flight hold the store for a moment; wait for them so a
        // restart in the same process can open it again.
        tokio::time::timeout(Duration::from_secs(30), closed)
            .await
            .context("the shard store was still in use 30 s after shutdown")?;
        result
    }

    /// Waits until the service ends by itself (a fatal error).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("sync-service task")?
    }
}

/// Starts sync-service: opens the store, connects to etcd, catches up, and serves until
/// `shutdown` resolves or a background task fails (fatal).
pub async fn start(config: SyncConfig) -> anyhow::Result<SyncServiceHandle> {
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
pub async fn start_with(config: SyncConfig, control_plane: ControlPlane) -> anyhow::Result<SyncServiceHandle> {
    let listener = serving::bind_with_retry(config.listen).await.with_context(|| format!("bind {}", config.listen))?;
    let health_listener = serving::bind_with_retry(config.health_listen)
        .await
        .with_context(|| format!("bind {}", config.health_listen))?;
    let addr = listener.local_addr()?;
    let health_addr = health_listener.local_addr()?;
    let node = Node::open(config, control_plane).await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<SyncServiceServer<SyncServer>>().await;
    let health_server = serving::spawn_health_server(
        health_listener,
        health_service.clone(),
        &node.config.server,
        node.id.clone(),
        shutdown_rx.clone(),
    )?;
    let (metrics_addr, metrics_server) =
        start_metrics_server(node.config.metrics_listen, node.metrics.registry.clone(), shutdown_rx.clone())
            .await
            .with_context(|| format!("bind {}", node.config.metrics_listen))?;
    node.spawn_background(node.throttle.clone().run_controller());
    {
        // The gauge mirrors the running-sync counter.
        let gauge = node.metrics.running_syncs.clone();
        let mut counts = node.counter.subscribe();
        node.spawn_background(async move {
            loop {
                gauge.set(i64::from(counts.borrow_and_update().running_syncs));
                if counts.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    epoch_change::startup(&node).await.context("start-up reconciliation")?;
    let server = SyncServer::new(node.clone(), shutdown_rx.clone());
    let limits = &node.config.server;
    let (builder, authentication) = limits.secured_builder(node.tls.as_deref()).context("TLS server configuration")?;
    let methods = Arc::new(server::method_table());
    let main_server = {
        let mut shutdown = shutdown_rx.clone();
        let refused = node.metrics.rpc.refused_connections.clone();
        builder
            .trace_fn(telemetry::grpc_server_span("sync-service", node.id.to_string()))
            .layer(RpcMetricsLayer::new(node.metrics.rpc.clone(), methods.clone()))
            .layer(AuthzLayer::new(methods.clone(), Arc::new(server::NodeMembership(node.clone())), authentication))
            .add_service(health_service)
            .add_service(serving::reflection_v1()?)
            .add_service(serving::reflection_v1alpha()?)
            .add_service(
                SyncServiceServer::new(server.clone())
                    .max_decoding_message_size(methods.max_request_bytes())
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(SyncAdminServer::new(server).max_decoding_message_size(methods.max_request_bytes()))
            .serve_with_incoming_shutdown(limits.incoming(listener, move || refused.inc()), async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
    };
    // Ready once the store is open, a committee is loaded and epoch events are followed (so a
    // node that reports ready does not miss the next epoch change for a moment).
    let readiness = {
        let node = node.clone();
        let mut views = node.subscribe();
        let mut following = node.subscribe_following();
        tokio::spawn(async move {
            if views.wait_for(|v| v.state.is_some()).await.is_ok() && following.wait_for(|f| *f).await.is_ok() {
                health.set_serving::<SyncServiceServer<SyncServer>>().await;
                info!("ready");
            }
        })
    };
    info!(%addr, %health_addr, %metrics_addr, node = %node.id, tls = node.tls.is_some(), "sync-service listening");
    let mut follower = tokio::spawn(epoch_change::run_follower(node.clone()));
    node.spawn_background(crate::node::index::run(node.clone()));
    let task_node = node.clone();
    let mut shutdown = shutdown_rx;
    let task = tokio::spawn(async move {
        let mut follower_done = false;
        let result = tokio::select! {
            r = main_server => r.context("gRPC server failed"),
            r = &mut follower => {
                follower_done = true;
                match r {
                    Ok(Err(e)) => Err(anyhow::Error::new(e).context("epoch follower stopped")),
                    Ok(Ok(())) => Err(NodeError::TaskStopped("epoch follower").into()),
                    Err(e) => Err(anyhow::Error::new(e).context("epoch follower panicked")),
                }
            }
            _ = shutdown.wait_for(|s| *s) => Ok(()),
        };
        if let Err(e) = &result {
            error!(error = format!("{e:#}"), "sync-service stopping on a fatal error");
        }
        if !follower_done {
            follower.abort();
            let _ = follower.await;
        }
        readiness.abort();
        health_server.abort();
        metrics_server.abort();
        task_node.abort_all_syncs();
        task_node.stop_background().await;
        let _ = readiness.await;
        let _ = health_server.await;
        drop(task_node);
        info!("sync-service stopped");
        result
    });
    Ok(SyncServiceHandle { node, addr, health_addr, metrics_addr, shutdown: shutdown_tx, task })
}

/// Applies the settings that may change while running when `config_file` changes:
/// `shard_sync.max_concurrent_syncs`, `stream.max_bytes_per_sec` and `throttle`. Others are logged as
/// needing a restart. Returns the guard that keeps the watch alive.
pub fn apply_config_changes(node: &Arc<Node>, config_file: &Path) -> anyhow::Result<config_watch::ConfigWatchGuard> {
    let (mut changes, guard) =
        config_watch::watch_config::<SyncConfig>(config_file, config::ENV_PREFIX, node.config.clone())?;
    let node = node.clone();
    tokio::spawn(async move {
        let mut applied = node.config.clone();
        while changes.changed().await.is_ok() {
            let new = changes.borrow_and_update().clone();
            if new.shard_sync.max_concurrent_syncs != applied.shard_sync.max_concurrent_syncs {
                let previous = node.sync_limit.set_limit(new.shard_sync.max_concurrent_syncs as usize);
                info!(
                    previous,
                    now = new.shard_sync.max_concurrent_syncs,
                    "shard sync concurrency changed by the config file"
                );
            }
            if new.stream.max_bytes_per_sec != applied.stream.max_bytes_per_sec {
                node.stream_rate.store(new.stream.max_bytes_per_sec, Ordering::Relaxed);
                info!(now = new.stream.max_bytes_per_sec, "shard stream bandwidth cap changed by the config file");
            }
            if new.throttle != applied.throttle {
                node.throttle.set_config(new.throttle.clone());
                info!(now = ?new.throttle, "background throttle changed by the config file");
            }
            let restart = config_watch::needs_restart(&applied, &new, |rest, old| {
                rest.shard_sync.max_concurrent_syncs = old.shard_sync.max_concurrent_syncs;
                rest.stream.max_bytes_per_sec = old.stream.max_bytes_per_sec;
                rest.throttle = old.throttle.clone();
            });
            if restart {
                warn!("the config file changed settings that apply only after a restart");
            }
            applied = new;
        }
    });
    Ok(guard)
}

/// Runs until `signal` resolves, then shuts down gracefully. With `config_file`, changes of
/// the live settings in it are applied while running.
pub async fn run_until(
    config: SyncConfig,
    config_file: Option<&Path>,
    signal: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let handle = start(config).await?;
    let _watch = match config_file {
        Some(file) => Some(apply_config_changes(&handle.node, file)?),
        None => None,
    };
    let shutdown = handle.shutdown.clone();
    let mut task = handle.task;
    tokio::select! {
        r = &mut task => r.context("sync-service task")?,
        () = signal => {
            info!("shutdown requested");
            let _ = shutdown.send(true);
            task.await.context("sync-service task")?
        }
    }
}
