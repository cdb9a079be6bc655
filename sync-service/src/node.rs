//! The sync-service node: its identity, store, control plane and in-memory view, and the
//! operations that change persisted state. Topics live in `node/`: the running-sync counter,
//! epoch changes, shard sync and attestation.
//!
//! Every change of persisted node or shard state goes through [`Node::transition`], which
//! serialises writers (epoch changes, shard-sync completions, recovery completions) so no
//! stale task can overwrite a newer status, then republishes the view that `WatchSyncState`
//! and `GetStatus` report.

pub mod attestation;
pub mod epoch_change;
pub mod shard_sync;
pub mod sync_counter;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex as StdMutex, atomic::AtomicU64},
};

use anyhow::Context as _;
use ferry_shared::{
    Committee,
    control_plane::{ControlPlane, ControlPlaneError, NodeRecord},
    crypto::{self, NodeKeypair},
    grpc::Connector,
    tls::TlsMaterial,
    types::{Epoch, NodeId, NodeStatus, ShardIndex, ShardStatus},
};
use thiserror::Error;
use tokio::sync::{Mutex, watch};

use crate::{
    config::SyncConfig,
    metrics::SyncMetrics,
    store::{NodeState, ShardRecord, ShardStore, StoreError},
};
use shard_sync::SyncLimiter;
use sync_counter::SyncCounter;

/// A failure of the node's background work. Any of these stopping the event follower or
/// the sync supervisor is fatal and visible: the process exits with it.
#[derive(Debug, Error)]
pub enum NodeError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The control plane failed.
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    /// The control plane is behind what this node already processed (etcd replaced or
    /// restored from an old backup): following it would undo applied epochs.
    #[error(
        "FERRY-NODE-001: etcd is at revision {etcd} but this node already processed revision {processed}; restore etcd or wipe the node"
    )]
    ControlPlaneBehind {
        /// etcd's revision.
        etcd: u64,
        /// The node's last processed revision.
        processed: u64,
    },
    /// The committee does not list this node with the key in its key file.
    #[error("FERRY-NODE-002: committee of epoch {epoch} lists {node} with another public key than the key file holds")]
    KeyMismatch {
        /// Epoch.
        epoch: Epoch,
        /// This node.
        node: NodeId,
    },
    /// A background task ended when it must run for the life of the process.
    #[error("FERRY-NODE-003: background task {0} stopped unexpectedly")]
    TaskStopped(&'static str),
}

/// What the node publishes about itself: persisted state plus the running-sync count.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeView {
    /// Persisted node state, `None` until the cluster starts or the node catches up.
    pub state: Option<NodeState>,
    /// Persisted shard records.
    pub shards: BTreeMap<ShardIndex, ShardRecord>,
}

impl NodeView {
    /// The latest processed epoch (0 before any).
    pub fn epoch(&self) -> Epoch {
        self.state.as_ref().map(|s| s.epoch).unwrap_or(0)
    }

    /// The node status (`Standby` before the node joined).
    pub fn status(&self) -> NodeStatus {
        self.state.as_ref().map(|s| s.status).unwrap_or(NodeStatus::Standby)
    }

    /// The committee of the latest processed epoch.
    pub fn committee(&self) -> Option<&Committee> {
        self.state.as_ref().map(|s| &s.committee)
    }

    /// Shards this node owns in its latest processed epoch.
    pub fn owned(&self, me: &NodeId) -> Vec<ShardIndex> {
        self.committee().map(|c| c.shards_of(me)).unwrap_or_default()
    }
}

/// Live (not persisted) progress of a running sync, for `GetStatus`.
#[derive(Debug, Clone, Default)]
pub struct LiveSync {
    /// When the current attempt started.
    pub started: Option<std::time::Instant>,
    /// Slivers written in the current attempt.
    pub blobs_this_attempt: u64,
}

/// The node.
pub struct Node {
    /// This node's id.
    pub id: NodeId,
    /// Its signing key.
    pub key: NodeKeypair,
    /// Configuration.
    pub config: SyncConfig,
    /// The shard store.
    pub store: ShardStore,
    /// The control plane.
    pub control_plane: ControlPlane,
    /// Running shard-sync tasks (rule 2).
    pub counter: SyncCounter,
    /// Limits how many shard syncs transfer at once; resizable at run time.
    pub sync_limit: SyncLimiter,
    /// Per-stream bandwidth cap of served shard streams (bytes/s, 0 = none); changeable live.
    pub stream_rate: AtomicU64,
    /// This node's TLS material; `None` only when plaintext is configured explicitly.
    pub tls: Option<Arc<TlsMaterial>>,
    /// Client channels to peers (mutual TLS when `tls` is set).
    pub connector: Connector,
    /// Prometheus metrics.
    pub metrics: SyncMetrics,
    view: watch::Sender<NodeView>,
    /// Whether the epoch follower's watch on the control plane is established (readiness).
    following: watch::Sender<bool>,
    transition_lock: Mutex<()>,
    sync_tasks: StdMutex<HashMap<ShardIndex, tokio::task::AbortHandle>>,
    live: StdMutex<HashMap<ShardIndex, LiveSync>>,
    /// Every background task holding the node (syncs, stream producers, timers), so shutdown
    /// can stop them all and the store closes when the service returns.
    background: StdMutex<tokio::task::JoinSet<()>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({})", self.id)
    }
}

/// A write under the transition lock: holds it for the guard's life.
pub struct TransitionGuard<'a> {
    node: &'a Node,
    _lock: tokio::sync::MutexGuard<'a, ()>,
}

impl TransitionGuard<'_> {
    /// The persisted view now (fresh from the store).
    pub async fn view(&self) -> Result<NodeView, NodeError> {
        self.node.load_view().await
    }
}

impl Drop for TransitionGuard<'_> {
    fn drop(&mut self) {
        // Refresh the published view from the store after every transition.
        let store = self.node.store.clone();
        match (store.node_state(), store.shard_records()) {
            (Ok(state), Ok(shards)) => {
                self.node.view.send_if_modified(|v| {
                    let new = NodeView { state, shards };
                    if *v == new {
                        false
                    } else {
                        *v = new;
                        true
                    }
                });
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot reload node state after a transition; the published view is stale")
            }
        }
    }
}

impl Node {
    /// Opens the node: loads its key, opens the store, connects to the control plane.
    pub async fn open(config: SyncConfig, control_plane: ControlPlane) -> anyhow::Result<Arc<Self>> {
        let id = NodeId::new(config.node_id.clone())?;
        let key = NodeKeypair::load(&config.key_file)?;
        let tls = config.tls.load(Some(&id)).context("TLS material")?;
        let metrics = SyncMetrics::new().context("metrics registry")?;
        let store_config = config.store.clone();
        let store = tokio::task::spawn_blocking(move || ShardStore::open(&store_config)).await??;
        let limit = config.shard_sync.max_concurrent_syncs;
        let node = Arc::new(Node {
            id,
            key,
            store,
            control_plane,
            counter: SyncCounter::default(),
            sync_limit: SyncLimiter::new(limit as usize),
            stream_rate: AtomicU64::new(config.stream.max_bytes_per_sec),
            connector: Connector::new(tls.clone()),
            tls,
            metrics,
            view: watch::channel(NodeView::default()).0,
            following: watch::channel(false).0,
            transition_lock: Mutex::new(()),
            sync_tasks: StdMutex::new(HashMap::new()),
            live: StdMutex::new(HashMap::new()),
            background: StdMutex::new(tokio::task::JoinSet::new()),
            config,
        });
        let view = node.load_view().await?;
        node.view.send_replace(view);
        Ok(node)
    }

    /// Records whether epoch events are being followed.
    pub fn set_following(&self, following: bool) {
        self.following.send_replace(following);
    }

    /// Whether epoch events are being followed, and every change of it.
    pub fn subscribe_following(&self) -> watch::Receiver<bool> {
        self.following.subscribe()
    }

    async fn load_view(&self) -> Result<NodeView, NodeError> {
        Ok(self.store.call(|s| Ok(NodeView { state: s.node_state()?, shards: s.shard_records()? })).await?)
    }

    /// Takes the transition lock. Hold it across read-check-write of persisted state.
    pub async fn transition(&self) -> TransitionGuard<'_> {
        TransitionGuard { node: self, _lock: self.transition_lock.lock().await }
    }

    /// The published view now.
    pub fn view(&self) -> NodeView {
        self.view.borrow().clone()
    }

    /// A receiver of every view change.
    pub fn subscribe(&self) -> watch::Receiver<NodeView> {
        self.view.subscribe()
    }

    /// Checks that the committee lists this node with this node's key.
    pub fn check_key(&self, committee: &Committee) -> Result<(), NodeError> {
        match committee.member(&self.id) {
            Some(m) if m.public_key != self.key.public_hex() => {
                Err(NodeError::KeyMismatch { epoch: committee.epoch, node: self.id.clone() })
            }
            _ => Ok(()),
        }
    }

    /// Mirrors the node status to the control plane for operators (best effort: the
    /// persisted status in the store is the truth).
    pub async fn mirror_status(&self) {
        let view = self.view();
        let record = NodeRecord {
            node_id: self.id.clone(),
            status: view.status(),
            epoch: view.epoch(),
            updated_at_ms: crypto::now_ms(),
        };
        if let Err(e) = self.control_plane.put_node(&record).await {
            tracing::warn!(error = %e, "could not mirror node status to etcd");
        }
    }

    /// Spawns a background task owned by the node (stopped by [`Node::stop_background`]).
    pub fn spawn_background(
        &self,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::AbortHandle {
        let mut set = self.background.lock().unwrap_or_else(|p| p.into_inner());
        while set.try_join_next().is_some() {} // reap finished tasks so the set stays small
        set.spawn(task)
    }

    /// Aborts every background task and waits until they have all ended.
    pub async fn stop_background(&self) {
        let mut set = std::mem::take(&mut *self.background.lock().unwrap_or_else(|p| p.into_inner()));
        set.abort_all();
        while set.join_next().await.is_some() {}
    }

    pub(crate) fn register_sync_task(&self, shard: ShardIndex, handle: tokio::task::AbortHandle) {
        let mut tasks = self.sync_tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = tasks.insert(shard, handle) {
            old.abort();
        }
    }

    pub(crate) fn unregister_sync_task(&self, shard: ShardIndex) {
        self.sync_tasks.lock().unwrap_or_else(|p| p.into_inner()).remove(&shard);
    }

    /// Whether a sync task is registered for the shard.
    pub fn sync_running(&self, shard: ShardIndex) -> bool {
        self.sync_tasks.lock().unwrap_or_else(|p| p.into_inner()).get(&shard).is_some_and(|h| !h.is_finished())
    }

    /// Aborts the sync task of a shard, if any (quiesce before locking a lost shard).
    pub fn abort_sync(&self, shard: ShardIndex) {
        if let Some(h) = self.sync_tasks.lock().unwrap_or_else(|p| p.into_inner()).remove(&shard) {
            h.abort();
        }
    }

    /// Aborts every sync task (shutdown).
    pub fn abort_all_syncs(&self) {
        for (_, h) in self.sync_tasks.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            h.abort();
        }
    }

    pub(crate) fn set_live(&self, shard: ShardIndex, live: Option<LiveSync>) {
        let mut map = self.live.lock().unwrap_or_else(|p| p.into_inner());
        match live {
            Some(l) => {
                map.insert(shard, l);
            }
            None => {
                map.remove(&shard);
            }
        }
    }

    pub(crate) fn bump_live(&self, shard: ShardIndex, blobs: u64) {
        if let Some(l) = self.live.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&shard) {
            l.blobs_this_attempt += blobs;
        }
    }

    /// Live progress of a shard's sync.
    pub fn live(&self, shard: ShardIndex) -> Option<LiveSync> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).get(&shard).cloned()
    }

    /// The status of a shard on this node, if it has storage.
    pub fn shard_status(&self, shard: ShardIndex) -> Option<ShardStatus> {
        self.view.borrow().shards.get(&shard).map(|r| r.status)
    }
}
