//! The sync-service node: its identity, store, control plane and in-memory view, and the
//! operations that change persisted state. Topics live in `node/`: the running-sync counter,
//! epoch changes, shard sync and attestation.
//!
//! Every change of persisted node or shard state goes through [`Node::transition`], which
//! serialises writers (epoch changes, shard-sync completions, recovery completions) so no
//! stale task can overwrite a newer status, then republishes the view that `WatchSyncState`
//! and `GetStatus` report. Data-plane writes take the same lock shared ([`Node::data_write`]),
//! so no sliver lands in a shard while its status changes (a shard being locked, say). Both
//! guards reach into the blocking store call they cover: a caller that goes away (a client
//! reset, a cancelled RPC) cannot release the lock while its write is still running.

pub mod attestation;
pub mod epoch_change;
pub mod index;
pub mod shard_state;
pub mod shard_sync;
pub mod sync_counter;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex as StdMutex, atomic::AtomicU64},
};

use anyhow::Context as _;
use ferry_shared::{
    Committee,
    control_plane::{Attester, ControlPlane, ControlPlaneError, NodeRecord},
    crypto::{self, NodeKeypair},
    grpc::Connector,
    registry::CommitteeCache,
    throttle::BackgroundThrottle,
    tls::TlsMaterial,
    types::{Epoch, NodeId, NodeStatus, ShardIndex, ShardStatus},
};
use thiserror::Error;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock, watch};

use crate::{
    config::SyncConfig,
    metrics::SyncMetrics,
    server,
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
    /// A shard-status change the state machine does not allow (a bug, or a corrupt record).
    #[error(transparent)]
    Transition(#[from] shard_state::IllegalTransition),
    /// A committee needed to verify certificates could not be read or parsed.
    #[error(transparent)]
    Registry(#[from] ferry_shared::registry::RegistryError),
}

/// What the node publishes about itself: persisted state plus the running-sync count, in one
/// value so that no subscriber sees one without the other.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeView {
    /// Persisted node state, `None` until the cluster starts or the node catches up.
    pub state: Option<NodeState>,
    /// Persisted shard records.
    pub shards: BTreeMap<ShardIndex, ShardRecord>,
    /// Shard-sync tasks running now (rule 2).
    pub running_syncs: u32,
    /// Whether the certified index caught up with the peers since the process started (rule 9).
    pub index_caught_up: bool,
    /// Rises each time the node learns certified blobs that owned `Active` shards lack.
    pub repair_generation: u64,
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
    /// The byte budget of background work, closed on clients' latency.
    pub throttle: Arc<BackgroundThrottle>,
    /// This node's TLS material; `None` only when plaintext is configured explicitly.
    pub tls: Option<Arc<TlsMaterial>>,
    /// Client channels to peers (mutual TLS when `tls` is set).
    pub connector: Connector,
    /// Prometheus metrics.
    pub metrics: SyncMetrics,
    /// sync-service's single attester of this node (rule 5).
    pub attester: Attester,
    /// Committees with parsed BLS keys, for verifying certificates.
    pub committees: CommitteeCache,
    /// Whether a failed attestation is being retried in the background.
    attest_retrying: std::sync::atomic::AtomicBool,
    /// The newest committee read from the control plane, applied or not.
    newest_committee: StdMutex<Option<Arc<Committee>>>,
    view: Arc<watch::Sender<NodeView>>,
    /// Whether the epoch follower's watch on the control plane is established (readiness).
    following: watch::Sender<bool>,
    transition_lock: Arc<RwLock<()>>,
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

/// The transition lock, held exclusively, and what republishes the view when it is let go.
struct HeldTransition {
    store: ShardStore,
    view: Arc<watch::Sender<NodeView>>,
    _lock: OwnedRwLockWriteGuard<()>,
}

impl Drop for HeldTransition {
    fn drop(&mut self) {
        // Refresh the published view from the store after every transition, before the lock
        // is released (fields drop after this body).
        match (self.store.node_state(), self.store.shard_records()) {
            (Ok(state), Ok(shards)) => {
                self.view.send_if_modified(|v| {
                    let new = NodeView { state, shards, ..v.clone() };
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

/// A change of persisted node or shard state: holds the transition lock exclusively until
/// this guard and every store call made through it have ended.
pub struct TransitionGuard {
    held: Arc<HeldTransition>,
}

impl TransitionGuard {
    /// The persisted view now (fresh from the store).
    pub async fn view(&self) -> Result<NodeView, NodeError> {
        let published = self.held.view.borrow().clone();
        let (state, shards) = self.call(|s| Ok((s.node_state()?, s.shard_records()?))).await?;
        Ok(NodeView { state, shards, ..published })
    }

    /// A blocking store call under this guard: the lock stays held until the call is done,
    /// even if the awaiting future is dropped first.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&ShardStore) -> Result<T, StoreError> + Send + 'static,
    {
        let held = self.held.clone();
        self.held
            .store
            .call(move |s| {
                let _held = held;
                f(s)
            })
            .await
    }
}

/// A data-plane write: holds the transition lock shared, so no status changes under it.
pub struct DataGuard {
    lock: Arc<OwnedRwLockReadGuard<()>>,
    store: ShardStore,
}

impl DataGuard {
    /// A blocking store call under this guard, holding it until the call is done.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&ShardStore) -> Result<T, StoreError> + Send + 'static,
    {
        let lock = self.lock.clone();
        self.store
            .call(move |s| {
                let _lock = lock;
                f(s)
            })
            .await
    }
}

impl Node {
    /// Opens the node: loads its key, opens the store, connects to the control plane.
    pub async fn open(config: SyncConfig, control_plane: ControlPlane) -> anyhow::Result<Arc<Self>> {
        let id = NodeId::new(config.node_id.clone())?;
        let key = NodeKeypair::load(&config.key_file)?;
        let tls = config.tls.load(Some(&id)).context("TLS material")?;
        let mut metrics = SyncMetrics::new().context("metrics registry")?;
        let throttle =
            BackgroundThrottle::new(config.throttle.clone(), &metrics.registry).context("metrics registry")?;
        metrics.rpc = metrics.rpc.clone().with_foreground(throttle.clone(), server::FOREGROUND_METHODS);
        let store_config = config.store.clone();
        let store = tokio::task::spawn_blocking(move || ShardStore::open(&store_config)).await??;
        let limit = config.shard_sync.max_concurrent_syncs;
        let view = Arc::new(watch::channel(NodeView::default()).0);
        let node = Arc::new(Node {
            id,
            key,
            store,
            committees: CommitteeCache::new(control_plane.clone()),
            control_plane,
            counter: SyncCounter::new(view.clone()),
            sync_limit: SyncLimiter::new(limit as usize),
            stream_rate: AtomicU64::new(config.stream.max_bytes_per_sec),
            throttle,
            connector: Connector::new(tls.clone()),
            tls,
            metrics,
            attester: Attester::default(),
            attest_retrying: std::sync::atomic::AtomicBool::new(false),
            newest_committee: StdMutex::new(None),

            view,
            following: watch::channel(false).0,
            transition_lock: Arc::new(RwLock::new(())),
            sync_tasks: StdMutex::new(HashMap::new()),
            live: StdMutex::new(HashMap::new()),
            background: StdMutex::new(tokio::task::JoinSet::new()),
            config,
        });
        let loaded = node.load_view().await?;
        node.view.send_replace(loaded);
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
        let running_syncs = self.counter.current();
        let (state, shards) = self.store.call(|s| Ok((s.node_state()?, s.shard_records()?))).await?;
        // Drawn per process, so recovery-service repairs again after a sync-service restart.
        let repair_generation = rand::random();
        Ok(NodeView { state, shards, running_syncs, repair_generation, ..NodeView::default() })
    }

    /// The cluster's name (part of every storage confirmation).
    pub fn cluster(&self) -> &str {
        self.control_plane.cluster()
    }

    /// Records that the certified index has caught up with the peers (once per process).
    pub fn set_index_caught_up(&self) {
        self.view.send_if_modified(|v| !std::mem::replace(&mut v.index_caught_up, true));
    }

    /// Tells recovery-service that owned `Active` shards lack newly learned blobs.
    pub fn bump_repair_generation(&self) {
        self.view.send_modify(|v| v.repair_generation += 1);
    }

    /// Takes the transition lock exclusively. Hold it across read-check-write of persisted state.
    pub async fn transition(&self) -> TransitionGuard {
        let lock = self.transition_lock.clone().write_owned().await;
        TransitionGuard {
            held: Arc::new(HeldTransition { store: self.store.clone(), view: self.view.clone(), _lock: lock }),
        }
    }

    /// Takes the transition lock shared, for a data-plane write: the published view stays
    /// current (no transition runs) until the write is done.
    pub async fn data_write(&self) -> DataGuard {
        let lock = self.transition_lock.clone().read_owned().await;
        DataGuard { lock: Arc::new(lock), store: self.store.clone() }
    }

    /// The published view now.
    pub fn view(&self) -> NodeView {
        self.view.borrow().clone()
    }

    /// A receiver of every view change.
    pub fn subscribe(&self) -> watch::Receiver<NodeView> {
        self.view.subscribe()
    }

    /// Takes note of a committee read from the control plane before it is applied: checks that
    /// it lists this node with this node's key (a changed key stops the node), and remembers
    /// the newest one, so a member it removes loses access here at once ([`Node::admits`]),
    /// not only once this node has caught up with it.
    pub fn observe_committee(&self, committee: &Committee) -> Result<(), NodeError> {
        if let Some(m) = committee.member(&self.id)
            && m.public_key != self.key.public_hex()
        {
            return Err(NodeError::KeyMismatch { epoch: committee.epoch, node: self.id.clone() });
        }
        let mut newest = self.newest_committee.lock().unwrap_or_else(|p| p.into_inner());
        if newest.as_ref().is_none_or(|c| c.epoch < committee.epoch) {
            *newest = Some(Arc::new(committee.clone()));
        }
        Ok(())
    }

    /// Whether `node` counts as a committee member for authorisation: a member of the
    /// committee this node is in and of the newest one it has seen.
    pub fn admits(&self, node: &NodeId) -> bool {
        let in_newest =
            self.newest_committee.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_none_or(|c| c.is_member(node));
        // Borrowed, not cloned: this runs on every authorised call.
        in_newest && self.view.borrow().committee().is_some_and(|c| c.is_member(node))
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

    /// Forgets the sync task of `shard` if it is the task `task` (a newer task for the same
    /// shard stays registered).
    pub(crate) fn unregister_sync_task(&self, shard: ShardIndex, task: Option<tokio::task::Id>) {
        let mut tasks = self.sync_tasks.lock().unwrap_or_else(|p| p.into_inner());
        if tasks.get(&shard).is_some_and(|h| Some(h.id()) == task) {
            tasks.remove(&shard);
        }
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
