//! Node recovery: bring a recovering node (or its `ActiveRecover` shards) back to full data,
//! then attest epoch-sync-done exactly once.
//!
//! The work is re-derived from sync-service's published state every time it changes, never
//! from what a previous process was doing: the owned `ActiveRecover` shards shard sync is not
//! filling, each with the scan id sync-service drew for it. The scan walks the registry of
//! certified blobs in blob-id order with one persisted cursor per work shard and scan id, so an
//! epoch change keeps the progress of kept shards (rule 8) and anything that broke a shard's
//! history (a restart, a catch-up, a loss and re-gain) starts its scan over. Before every pass,
//! before every blob and again before completing, it waits until the running-sync count is
//! known and zero (rule 3). The cursor and the failed set are written in one batch; a blob
//! whose recovery task panics is a failed blob like any other; a blob whose slivers are not one
//! codeword is marked invalid with a proof every node checks, and does not hold recovery up.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use ferry_proto::v1::{self as pb};
use ferry_shared::{
    Committee,
    backoff::Backoff,
    control_plane::{AttestOutcome, AttestationRecord, Attester, ControlPlane, ControlPlaneError},
    crypto::{NodeKeypair, ShardEvidence, now_ms},
    registry::InconsistencyProof,
    types::{BlobId, Epoch, NodeId, NodeStatus, ShardIndex},
};
use thiserror::Error;
use tokio::{sync::watch, task::JoinSet};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    blob_recovery::{self, Peers},
    config::RecoveryTuning,
    metrics::RecoveryMetrics,
    store::{Cursor, FailedBlob, RecoveryStore, RecoveryStoreError, ShardCursor},
    sync_state::{self, SyncStateRx},
};

/// A failure of the recovery loop; it is retried with backoff (none is fatal on its own).
#[derive(Debug, Error)]
pub enum RecoveryError {
    /// The recovery store failed.
    #[error(transparent)]
    Store(#[from] RecoveryStoreError),
    /// The control plane failed.
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    /// This node's sync-service refused or failed a call.
    #[error("FERRY-RECOVERY-001: sync-service call {call} failed: {status}")]
    SyncService {
        /// Which call.
        call: &'static str,
        /// Its status.
        status: String,
    },
    /// The work changed (epoch change, catch-up, removal): re-derive it.
    #[error("FERRY-RECOVERY-002: superseded by a newer node state")]
    Superseded,
    /// The sync-service stream is down.
    #[error("FERRY-RECOVERY-003: sync state unknown (sync-service stream down)")]
    Unknown,
}

fn sync_err(call: &'static str) -> impl Fn(tonic::Status) -> RecoveryError {
    move |s| RecoveryError::SyncService { call, status: format!("{}: {}", s.code(), s.message()) }
}

/// What recovery has to do, derived from sync-service's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Work {
    /// Epoch the work completes at.
    pub target_epoch: Epoch,
    /// Whether the node is recovering (attest and complete) or only repairing shards.
    pub node_recovery: bool,
    /// Shards whose blobs are recovered (the owned `ActiveRecover` shards shard sync is not
    /// filling), each with the scan id its scan runs under.
    pub shards: Vec<(ShardIndex, u64)>,
}

impl Work {
    /// Derives the work from a sync state; `None` when there is nothing to recover.
    ///
    /// A recovering node always has work, if only to wait for its syncs and attest. An
    /// `Active` node has work when a shard of it needs a scan: a failed sync, blobs a sync
    /// could not get, or a restart that may have missed writes.
    pub fn derive(state: &pb::SyncState) -> Option<Work> {
        let status = NodeStatus::from_proto(state.node_status, state.recovery_epoch).ok()?;
        let mut shards: Vec<(ShardIndex, u64)> = state
            .recovering
            .iter()
            .filter(|s| !state.syncing_shards.contains(&s.shard))
            .map(|s| (ShardIndex(s.shard), s.scan_id))
            .collect();
        shards.sort();
        match status {
            NodeStatus::RecoveryInProgress(e) => Some(Work { target_epoch: e, node_recovery: true, shards }),
            NodeStatus::Active if !shards.is_empty() => {
                Some(Work { target_epoch: state.epoch, node_recovery: false, shards })
            }
            _ => None,
        }
    }

    /// The work shards.
    pub fn shard_ids(&self) -> Vec<ShardIndex> {
        self.shards.iter().map(|(s, _)| *s).collect()
    }

    fn contains(&self, shard: ShardIndex) -> bool {
        self.shards.iter().any(|(s, _)| *s == shard)
    }

    /// The cursor to resume this work from, given the one persisted last: a shard keeps its
    /// progress only if its scan id is the same (rule 8 across an epoch change; a fresh scan
    /// after anything that broke its history).
    pub fn resume(&self, stored: Option<Cursor>) -> Cursor {
        let stored = stored.unwrap_or_default();
        let epoch_changed = stored.target_epoch != self.target_epoch;
        let mut saved = 0;
        let mut any_kept = false;
        let shards = self
            .shards
            .iter()
            .map(|(shard, scan_id)| {
                let kept = stored.shards.get(shard).filter(|c| c.scan_id == *scan_id).cloned();
                if let Some(c) = &kept {
                    any_kept = true;
                    if epoch_changed {
                        saved = saved.max(c.scanned);
                    }
                }
                (*shard, kept.unwrap_or(ShardCursor { scan_id: *scan_id, ..ShardCursor::default() }))
            })
            .collect();
        // The counters describe one recovery: they go on only where its scans go on.
        let counters =
            if any_kept || (!epoch_changed && stored.shards.is_empty()) { stored } else { Cursor::default() };
        Cursor { target_epoch: self.target_epoch, shards, rescans_saved: counters.rescans_saved + saved, ..counters }
    }
}

/// A blob of the node's certified index, as the scan reads it from its sync-service (which
/// verified the certificate when the blob entered the index).
#[derive(Debug, Clone)]
pub struct IndexEntry {
    /// The blob.
    pub blob_id: BlobId,
    /// A claim that it is encoded inconsistently, if one was made.
    pub invalid: Option<InconsistencyProof>,
}

impl IndexEntry {
    fn from_proto(entry: &pb::CertifiedEntry, n_shards: u32) -> Option<IndexEntry> {
        Some(IndexEntry {
            blob_id: BlobId::from_bytes(&entry.blob_id).ok()?,
            invalid: entry.invalid.as_ref().and_then(|p| InconsistencyProof::from_proto(p, n_shards).ok()),
        })
    }
}

/// Aborts a task when dropped (the loop's helper tasks end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Node recovery and its published status.
pub struct Recovery {
    me: NodeId,
    key: NodeKeypair,
    control_plane: ControlPlane,
    store: RecoveryStore,
    peers: Arc<Peers>,
    sync_state: SyncStateRx,
    tuning: RecoveryTuning,
    status: watch::Sender<pb::RecoveryStatus>,
    paused: watch::Sender<bool>,
    committees: std::sync::Mutex<HashMap<Epoch, Arc<Committee>>>,
    metrics: RecoveryMetrics,
    /// Blobs recovered at once; read per registry page, so a config change applies at the next page.
    max_concurrent_blobs: std::sync::atomic::AtomicUsize,
    /// recovery-service's single attester of this node (rule 5).
    attester: Attester,
    /// Blobs whose invalidity proof this process checked.
    invalid: std::sync::Mutex<std::collections::HashSet<BlobId>>,
}

struct PassClock {
    started: Instant,
    last_progress: Instant,
}

impl Recovery {
    /// Sets up recovery; [`Recovery::run`] drives it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: NodeId,
        key: NodeKeypair,
        control_plane: ControlPlane,
        store: RecoveryStore,
        peers: Arc<Peers>,
        sync_state: SyncStateRx,
        tuning: RecoveryTuning,
        paused: bool,
        metrics: RecoveryMetrics,
    ) -> Arc<Self> {
        let status = pb::RecoveryStatus { phase: pb::RecoveryPhase::Idle as i32, paused, ..Default::default() };
        let max_blobs = tuning.max_concurrent_blobs;
        Arc::new(Recovery {
            me,
            key,
            control_plane,
            store,
            peers,
            sync_state,
            tuning,
            status: watch::channel(status).0,
            paused: watch::channel(paused).0,
            committees: std::sync::Mutex::new(HashMap::new()),
            metrics,
            max_concurrent_blobs: std::sync::atomic::AtomicUsize::new(max_blobs),
            attester: Attester::default(),
            invalid: std::sync::Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// How many blobs are recovered at once.
    pub fn max_concurrent_blobs(&self) -> usize {
        self.max_concurrent_blobs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Changes how many blobs are recovered at once (from the next registry page on).
    pub fn set_max_concurrent_blobs(&self, n: usize) -> usize {
        self.max_concurrent_blobs.swap(n.max(1), std::sync::atomic::Ordering::Relaxed)
    }

    /// A receiver of every status change.
    pub fn subscribe(&self) -> watch::Receiver<pb::RecoveryStatus> {
        self.status.subscribe()
    }

    /// The status now.
    pub fn status(&self) -> pb::RecoveryStatus {
        self.status.borrow().clone()
    }

    fn update(&self, f: impl FnOnce(&mut pb::RecoveryStatus)) {
        self.status.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            *s != before
        });
    }

    /// Pauses (true) or resumes (false) recovery; persisted so a restart keeps it.
    pub async fn set_paused(&self, paused: bool) -> Result<(), RecoveryError> {
        self.store.call(move |s| s.set_paused(paused)).await?;
        self.paused.send_replace(paused);
        self.update(|s| s.paused = paused);
        info!(paused, "recovery pause flag changed");
        Ok(())
    }

    /// Resolves once the recovery store is closed.
    pub fn store_closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.store.closed()
    }

    /// Attestations this node made.
    pub async fn attestations(&self) -> Result<Vec<AttestationRecord>, RecoveryError> {
        Ok(self.store.call(|s| s.attestations()).await?)
    }

    async fn committee(&self, epoch: Epoch) -> Result<Option<Arc<Committee>>, RecoveryError> {
        if let Some(c) = self.committees.lock().unwrap_or_else(|p| p.into_inner()).get(&epoch) {
            return Ok(Some(c.clone()));
        }
        let Some(c) = self.control_plane.committee(epoch).await? else { return Ok(None) };
        let c = Arc::new(c);
        self.committees.lock().unwrap_or_else(|p| p.into_inner()).insert(epoch, c.clone());
        Ok(Some(c))
    }

    /// Runs recovery for the life of the process.
    pub async fn run(self: Arc<Self>) {
        // The status shows the running-sync count as it is now, wherever the loop is.
        let mirror = {
            let this = self.clone();
            let mut rx = self.sync_state.clone();
            tokio::spawn(async move {
                loop {
                    let state = rx.borrow_and_update().clone();
                    this.update(|s| {
                        s.running_syncs = state.as_ref().map(|st| st.running_syncs);
                        let busy =
                            s.phase != pb::RecoveryPhase::Idle as i32 && s.phase != pb::RecoveryPhase::Done as i32;
                        // Unknown means waiting, whatever the loop was doing; a count above
                        // zero means waiting only when there is work.
                        if state.is_none() || (busy && state.as_ref().is_some_and(|st| st.running_syncs > 0)) {
                            s.waiting_for_syncs = true;
                        }
                    });
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            })
        };
        let _mirror = AbortOnDrop(mirror);
        let mut rx = self.sync_state.clone();
        let mut backoff = Backoff::new(
            Duration::from_millis(self.tuning.retry_initial_ms),
            Duration::from_millis(self.tuning.retry_max_ms),
        );
        // The repair generation last handled completely; generations are drawn at random per
        // sync-service process, so a restarted sync-service is repaired again.
        let mut repaired: Option<u64> = None;
        loop {
            let state = match rx.wait_for(|s| s.is_some()).await {
                Ok(s) => s.clone(),
                Err(_) => return, // the follower is gone: the process is shutting down
            };
            let Some(state) = state else { continue };
            if Work::derive(&state).is_none() && Self::needs_repair(&state, repaired) {
                match self.repair(&state).await {
                    Ok(0) => {
                        repaired = Some(state.repair_generation);
                        backoff.reset();
                    }
                    Ok(failed) => {
                        warn!(failed, "repairs left blobs unrecovered; retrying");
                        backoff.wait().await;
                    }
                    Err(RecoveryError::Superseded | RecoveryError::Unknown) => {}
                    Err(e) => {
                        warn!(error = %e, "repair pass failed; retrying");
                        self.update(|s| s.last_error = e.to_string());
                        backoff.wait().await;
                    }
                }
                continue;
            }
            let Some(work) = Work::derive(&state) else {
                self.update(|s| {
                    s.phase = if s.phase == pb::RecoveryPhase::Done as i32 {
                        s.phase
                    } else {
                        pb::RecoveryPhase::Idle as i32
                    };
                    s.waiting_for_syncs = false;
                    s.running_syncs = Some(state.running_syncs);
                });
                let _ = rx.changed().await;
                continue;
            };
            let span = info_span!("node_recovery", ferry.service = "recovery-service", ferry.node = %self.me, target = work.target_epoch, node_recovery = work.node_recovery);
            match self.run_work(&work).instrument(span).await {
                Ok(()) => {
                    backoff.reset();
                    // The completion changes sync-service's state; derive the next work from
                    // that, not from the state this work came from.
                    let _ = rx.changed().await;
                }
                Err(RecoveryError::Superseded | RecoveryError::Unknown) => {}
                Err(e) => {
                    warn!(error = %e, "recovery step failed; retrying");
                    self.update(|s| s.last_error = e.to_string());
                    backoff.wait().await;
                }
            }
        }
    }

    /// The current work, or `Superseded` if it is no longer `work`.
    fn check_same(&self, work: &Work) -> Result<pb::SyncState, RecoveryError> {
        let state = self.sync_state.borrow().clone().ok_or(RecoveryError::Unknown)?;
        if Work::derive(&state).as_ref() != Some(work) {
            return Err(RecoveryError::Superseded);
        }
        Ok(state)
    }

    /// Waits until shard syncs are known to be zero and recovery is not paused (rule 3).
    async fn wait_until_clear(&self, work: &Work) -> Result<(), RecoveryError> {
        loop {
            let mut rx = self.sync_state.clone();
            let phase_before = self.status().phase;
            let waiting_since = Instant::now();
            let state = sync_state::wait_for_no_syncs(&mut rx, || {
                info!("waiting for shard syncs to finish before recovering blobs");
                self.update(|s| {
                    s.waiting_for_syncs = true;
                    s.phase = pb::RecoveryPhase::WaitingForSyncs as i32;
                    s.running_syncs = None;
                });
            })
            .await
            .ok_or(RecoveryError::Unknown)?;
            self.metrics.sync_wait_seconds.inc_by(waiting_since.elapsed().as_secs_f64());
            self.update(|s| {
                s.waiting_for_syncs = false;
                s.running_syncs = Some(state.running_syncs);
                if s.phase == pb::RecoveryPhase::WaitingForSyncs as i32 {
                    s.phase = phase_before.max(pb::RecoveryPhase::Scanning as i32);
                }
            });
            self.check_same(work)?;
            if !state.index_caught_up {
                // Rule 9: the index is scanned only once it knows what the peers know.
                info!("waiting for the certified index to catch up with the peers before scanning");
                self.update(|s| s.phase = pb::RecoveryPhase::WaitingForIndex as i32);
                let mut rx = self.sync_state.clone();
                rx.wait_for(|s| s.as_ref().is_none_or(|s| s.index_caught_up || Work::derive(s).as_ref() != Some(work)))
                    .await
                    .map_err(|_| RecoveryError::Unknown)?;
                continue;
            }
            let mut paused = self.paused.subscribe();
            if !*paused.borrow_and_update() {
                return Ok(());
            }
            info!("recovery is paused; waiting for resume");
            let _ = paused.wait_for(|p| !*p).await;
        }
    }

    async fn load_cursor(&self, work: &Work) -> Result<Cursor, RecoveryError> {
        let stored = self.store.call(|s| s.cursor()).await?;
        let kept: Vec<u32> = work
            .shards
            .iter()
            .filter(|(shard, scan)| {
                stored.as_ref().and_then(|c| c.shards.get(shard)).is_some_and(|c| c.scan_id == *scan)
            })
            .map(|(s, _)| s.0)
            .collect();
        let cursor = work.resume(stored);
        info!(
            target = work.target_epoch,
            ?kept,
            saved = cursor.rescans_saved,
            "recovery work resumes; shards keep their scan's progress only under the same scan id"
        );
        let c = cursor.clone();
        self.store.call(move |s| s.save_progress(&c, &BTreeMap::new())).await?;
        Ok(cursor)
    }

    fn publish_cursor(&self, progress: &Progress, clock: &PassClock) {
        let cursor = &progress.cursor;
        let position = cursor
            .shards
            .values()
            .map(|c| {
                c.after
                    .map(|b| u64::from_be_bytes([b.0[0], b.0[1], b.0[2], b.0[3], b.0[4], b.0[5], b.0[6], b.0[7]]))
                    .unwrap_or(0)
            })
            .min()
            .unwrap_or(0);
        // Blob ids are uniform hashes, so the cursor's position in id space estimates progress.
        let fraction = position as f64 / u64::MAX as f64;
        let elapsed = clock.started.elapsed().as_secs_f64();
        let eta = (fraction > 0.01 && fraction < 1.0).then(|| (elapsed * (1.0 - fraction) / fraction) as u64);
        let now = now_ms();
        let mut stuck: Vec<pb::StuckBlob> = progress
            .failed
            .iter()
            .map(|(id, f)| pb::StuckBlob {
                blob_id: id.to_hex(),
                attempts: f.attempts,
                last_error: f.last_error.clone(),
                stuck_for_secs: now.saturating_sub(f.first_failed_ms) / 1000,
            })
            .collect();
        stuck.sort_by_key(|b| std::cmp::Reverse(b.stuck_for_secs));
        stuck.truncate(5);
        let stalled = clock.last_progress.elapsed() > Duration::from_millis(self.tuning.stall_after_ms);
        let invalid = self.invalid_count();
        self.update(|s| {
            s.target_epoch = cursor.target_epoch;
            s.pass = cursor.pass;
            s.blobs_scanned = cursor.blobs_scanned;
            s.blobs_recovered = cursor.blobs_recovered;
            s.bytes_fetched = cursor.bytes_fetched;
            s.rescans_saved = cursor.rescans_saved;
            s.blobs_failed = progress.failed.len() as u64;
            s.blobs_invalid = invalid;
            s.eta_secs = eta;
            s.stalled = stalled;
            s.stuck_blobs = stuck;
            s.cursor = cursor.shards.values().filter_map(|c| c.after).min().map(|b| b.to_hex()).unwrap_or_default();
        });
    }

    fn invalid_count(&self) -> u64 {
        self.invalid.lock().unwrap_or_else(|p| p.into_inner()).len() as u64
    }

    async fn run_work(&self, work: &Work) -> Result<(), RecoveryError> {
        info!(shards = ?work.shards, "recovery work");
        self.check_same(work)?;
        let cursor = self.load_cursor(work).await?;
        let failed = self.store.call(|s| s.failed()).await?;
        let mut progress = Progress { cursor, failed, changes: BTreeMap::new() };
        let mut backoff = Backoff::new(
            Duration::from_millis(self.tuning.retry_initial_ms),
            Duration::from_millis(self.tuning.retry_max_ms),
        );
        let mut clock = PassClock { started: Instant::now(), last_progress: Instant::now() };
        loop {
            self.wait_until_clear(work).await?;
            self.wait_for_storage(work).await?;
            progress.cursor.pass += 1;
            clock.started = Instant::now();
            self.update(|s| {
                s.phase = pb::RecoveryPhase::Scanning as i32;
                s.last_error.clear();
            });
            self.publish_cursor(&progress, &clock);
            info!(pass = progress.cursor.pass, "scan pass starts");
            self.scan_pass(work, &mut progress, &mut clock).await?;
            if progress.failed.is_empty() {
                // Rule 3 again: no completion while any shard sync runs.
                self.update(|s| s.phase = pb::RecoveryPhase::Completing as i32);
                self.wait_until_clear(work).await?;
                if self.complete(work).await? {
                    return Ok(());
                }
            } else {
                info!(failed = progress.failed.len(), "pass left blobs unrecovered; retrying them");
            }
            backoff.wait().await;
        }
    }

    /// Recovery does not scan while any work shard lacks storage; it waits with backoff.
    async fn wait_for_storage(&self, work: &Work) -> Result<(), RecoveryError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let status =
                self.peers.own().get_status(pb::GetStatusRequest {}).await.map_err(sync_err("GetStatus"))?.into_inner();
            let missing: Vec<u32> = work
                .shard_ids()
                .iter()
                .filter(|s| !status.shards.iter().any(|r| r.shard == s.0))
                .map(|s| s.0)
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            warn!(?missing, "owned shards have no storage yet; waiting");
            self.update(|s| s.last_error = format!("waiting for storage of shards {missing:?}"));
            backoff.wait().await;
            self.check_same(work)?;
        }
    }

    async fn scan_pass(
        &self,
        work: &Work,
        progress: &mut Progress,
        clock: &mut PassClock,
    ) -> Result<(), RecoveryError> {
        let n_shards = self.committee(work.target_epoch).await?.ok_or(RecoveryError::Superseded)?.n_shards;
        // Retry earlier failures first.
        let retry: Vec<BlobId> = progress.failed.keys().copied().collect();
        for chunk in retry.chunks(self.tuning.scan_page) {
            let answer = self
                .peers
                .own()
                .get_certificates(pb::GetCertificatesRequest {
                    blob_ids: chunk.iter().map(|id| id.0.to_vec()).collect(),
                    include_metadata: false,
                })
                .await
                .map_err(sync_err("GetCertificates"))?
                .into_inner();
            let mut records = Vec::new();
            for (id, entry) in chunk.iter().zip(&answer.blobs) {
                match entry.certificate.is_some().then(|| IndexEntry::from_proto(entry, n_shards)).flatten() {
                    Some(r) => records.push(r),
                    None => progress.forget(*id),
                }
            }
            self.recover_page(work, &records, None, progress, clock).await?;
        }
        loop {
            self.check_same(work)?;
            let unfinished: Vec<ShardIndex> =
                progress.cursor.shards.iter().filter(|(_, c)| !c.finished).map(|(s, _)| *s).collect();
            if unfinished.is_empty() {
                break;
            }
            let from = unfinished.iter().map(|s| progress.cursor.shards.get(s).and_then(|c| c.after)).min().flatten();
            let start = match from {
                Some(b) => match b.successor() {
                    Some(next) => Some(next),
                    None => {
                        progress.finish(&unfinished);
                        break;
                    }
                },
                None => None,
            };
            // An index read error fails the pass (returned); it never ends it as if clean.
            let listed = self
                .peers
                .own()
                .list_certified(pb::ListCertifiedRequest {
                    start_blob_id: start.map(|b| b.0.to_vec()).unwrap_or_default(),
                    end_blob_id: Vec::new(),
                    limit: self.tuning.scan_page as u32,
                })
                .await
                .map_err(sync_err("ListCertified"))?
                .into_inner();
            let page: Vec<IndexEntry> =
                listed.blobs.iter().filter_map(|e| IndexEntry::from_proto(e, n_shards)).collect();
            let Some(last) = page.last().map(|b| b.blob_id) else {
                progress.finish(&unfinished);
                break;
            };
            self.recover_page(work, &page, Some(last), progress, clock).await?;
        }
        self.persist(progress, clock).await
    }

    /// Whether a blob marked invalid really is: the proof is checked once per process.
    async fn confirmed_invalid(&self, record: &IndexEntry, committee: &Committee) -> bool {
        let Some(proof) = &record.invalid else { return false };
        if self.invalid.lock().unwrap_or_else(|p| p.into_inner()).contains(&record.blob_id) {
            return true;
        }
        let confirmed = blob_recovery::confirm_inconsistency(&self.peers, committee, record.blob_id, proof).await;
        if confirmed {
            self.invalid.lock().unwrap_or_else(|p| p.into_inner()).insert(record.blob_id);
        } else {
            warn!(blob = %record.blob_id, reported_by = %proof.reported_by, "a claim that the blob is invalid does not check out; recovering it as any other");
        }
        confirmed
    }

    /// Checks and recovers one page of the index, then advances the cursors to `last`.
    async fn recover_page(
        &self,
        work: &Work,
        page: &[IndexEntry],
        last: Option<BlobId>,
        progress: &mut Progress,
        clock: &mut PassClock,
    ) -> Result<(), RecoveryError> {
        let committee = self.committee(work.target_epoch).await?.ok_or(RecoveryError::Superseded)?;
        let mut certified = Vec::new();
        for record in page {
            if self.confirmed_invalid(record, &committee).await {
                progress.forget(record.blob_id); // never recoverable: not a failure to retry
                continue;
            }
            certified.push(record.blob_id);
        }
        let presence = if certified.is_empty() {
            Vec::new()
        } else {
            self.peers
                .own()
                .check_blobs(pb::CheckBlobsRequest { blob_ids: certified.iter().map(|b| b.0.to_vec()).collect() })
                .await
                .map_err(sync_err("CheckBlobs"))?
                .into_inner()
                .blobs
        };
        let mut present = 0u64;
        let mut wanted = Vec::new();
        for p in presence {
            let Ok(blob) = BlobId::from_bytes(&p.blob_id) else { continue };
            // Only shards whose cursor has not passed this blob, and that are in the work.
            let shards: Vec<ShardIndex> = p
                .missing_shards
                .iter()
                .map(|s| ShardIndex(*s))
                .filter(|s| work.contains(*s))
                .filter(|s| {
                    last.is_none() || progress.cursor.shards.get(s).and_then(|c| c.after).is_none_or(|c| c < blob)
                })
                .collect();
            if shards.is_empty() {
                progress.forget(blob);
                present += 1;
                continue;
            }
            wanted.push(blob_recovery::Wanted { blob, shards });
        }
        self.recover_batches(work, &committee, wanted, progress, clock).await?;
        self.update(|s| s.blobs_present += present);
        if let Some(last) = last {
            for c in progress.cursor.shards.values_mut() {
                if !c.finished && c.after.is_none_or(|a| a < last) {
                    c.after = Some(last);
                    c.scanned += certified.len() as u64;
                }
            }
            progress.cursor.blobs_scanned += certified.len() as u64;
        }
        self.metrics.blobs_scanned.inc_by(certified.len() as u64);
        self.persist(progress, clock).await
    }

    /// Recovers `wanted` a batch at a time ([`blob_recovery::recover_batch`]), up to
    /// `max_concurrent_blobs / BATCH_BLOBS` batches at once (at least two, so one batch's
    /// fetch overlaps another's decode and write). Rule 3 holds per batch: none starts while
    /// shard syncs run or recovery is paused.
    async fn recover_batches(
        &self,
        work: &Work,
        committee: &Arc<Committee>,
        wanted: Vec<blob_recovery::Wanted>,
        progress: &mut Progress,
        clock: &mut PassClock,
    ) -> Result<(), RecoveryError> {
        const BATCH_BLOBS: usize = 128;
        let parallel = (self.max_concurrent_blobs() / BATCH_BLOBS).max(2);
        let mut tasks: JoinSet<Vec<(BlobId, Result<blob_recovery::Recovered, blob_recovery::BlobRecoveryError>)>> =
            JoinSet::new();
        let mut running: HashMap<tokio::task::Id, Vec<BlobId>> = HashMap::new();
        let mut batches = wanted.chunks(BATCH_BLOBS).map(<[_]>::to_vec).collect::<Vec<_>>().into_iter();
        loop {
            let clear =
                self.sync_state.borrow().as_ref().is_some_and(|s| s.running_syncs == 0) && !*self.paused.borrow();
            if !clear {
                while let Some(done) = tasks.join_next_with_id().await {
                    self.record_batch(done, &mut running, progress, clock).await;
                }
                self.wait_until_clear(work).await?;
                continue;
            }
            if tasks.len() < parallel
                && let Some(batch) = batches.next()
            {
                let ids: Vec<BlobId> = batch.iter().map(|w| w.blob).collect();
                let (peers, committee) = (self.peers.clone(), committee.clone());
                let span = info_span!("recover_batch", blobs = ids.len());
                let handle = tasks.spawn(
                    async move { blob_recovery::recover_batch(&peers, &committee, batch).await }.instrument(span),
                );
                running.insert(handle.id(), ids);
                continue;
            }
            match tasks.join_next_with_id().await {
                Some(done) => self.record_batch(done, &mut running, progress, clock).await,
                None => return Ok(()),
            }
        }
    }

    async fn record_batch(
        &self,
        done: Result<(tokio::task::Id, blob_recovery::BatchOutcome), tokio::task::JoinError>,
        running: &mut HashMap<tokio::task::Id, Vec<BlobId>>,
        progress: &mut Progress,
        clock: &mut PassClock,
    ) {
        match done {
            Ok((task, outcomes)) => {
                running.remove(&task);
                for (blob, outcome) in outcomes {
                    self.record_outcome(blob, Ok(outcome), progress, clock).await;
                }
            }
            Err(e) => {
                // A batch task that panicked: each of its blobs failed, and is retried.
                for blob in running.remove(&e.id()).unwrap_or_default() {
                    self.record_outcome(blob, Err(format!("blob recovery task failed: {e}")), progress, clock).await;
                }
            }
        }
    }

    /// Persists the cursor and the failed set's changes in one batch, then publishes them.
    async fn persist(&self, progress: &mut Progress, clock: &PassClock) -> Result<(), RecoveryError> {
        let c = progress.cursor.clone();
        let changes = std::mem::take(&mut progress.changes);
        self.store.call(move |s| s.save_progress(&c, &changes)).await?;
        self.publish_cursor(progress, clock);
        Ok(())
    }

    async fn record_outcome(
        &self,
        blob: BlobId,
        outcome: Result<Result<blob_recovery::Recovered, blob_recovery::BlobRecoveryError>, String>,
        progress: &mut Progress,
        clock: &mut PassClock,
    ) {
        match outcome {
            Ok(Ok(r)) => {
                self.metrics.blobs_recovered.inc();
                self.metrics.bytes_fetched.inc_by(r.bytes_fetched);
                progress.cursor.blobs_recovered += 1;
                progress.cursor.bytes_fetched += r.bytes_fetched;
                progress.forget(blob);
                clock.last_progress = Instant::now();
                // Progress is visible per blob, not only per page.
                let (recovered, fetched) = (progress.cursor.blobs_recovered, progress.cursor.bytes_fetched);
                let running_syncs = self.sync_state.borrow().as_ref().map(|st| st.running_syncs);
                self.update(|s| {
                    s.blobs_recovered = recovered;
                    s.bytes_fetched = fetched;
                    s.running_syncs = running_syncs;
                });
            }
            Ok(Err(blob_recovery::BlobRecoveryError::Inconsistent { proof, .. })) => {
                warn!(%blob, shards = ?proof.shards, mismatched = proof.mismatched.0, "blob is encoded inconsistently; marking it invalid cluster-wide");
                match self.report_inconsistency(blob, &proof).await {
                    Ok(()) => {
                        self.invalid.lock().unwrap_or_else(|p| p.into_inner()).insert(blob);
                        progress.forget(blob);
                    }
                    Err(e) => progress.fail(blob, format!("cannot mark the inconsistent blob invalid: {e}")),
                }
            }
            Ok(Err(e)) => {
                self.metrics.blobs_failed.inc();
                warn!(%blob, error = %e, "blob recovery failed; retried later");
                progress.fail(blob, e.to_string());
            }
            Err(e) => {
                // A task that panicked is a failure of its blob, retried later like any other.
                self.metrics.blobs_failed.inc();
                warn!(%blob, error = %e, "blob recovery task failed");
                progress.fail(blob, e);
            }
        }
    }

    fn needs_repair(state: &pb::SyncState, repaired: Option<u64>) -> bool {
        let active = NodeStatus::from_proto(state.node_status, state.recovery_epoch) == Ok(NodeStatus::Active);
        active && repaired != Some(state.repair_generation)
    }

    /// Recovers what owned `Active` shards lack (certified blobs learned after the shards were
    /// filled: a node that missed writes, a certificate that arrived late), from the node's
    /// pending table, under rule 3. Returns how many blobs are still missing.
    async fn repair(&self, state: &pb::SyncState) -> Result<u64, RecoveryError> {
        let committee = self.committee(state.epoch).await?.ok_or(RecoveryError::Superseded)?;
        // Every owned shard shard sync is not filling: pending entries of a shard under a scan
        // are blobs the scan fetches too, so repairing them early costs nothing twice.
        let shards: Vec<ShardIndex> =
            state.owned_shards.iter().filter(|s| !state.syncing_shards.contains(s)).map(|s| ShardIndex(*s)).collect();
        let mut own = self.peers.own();
        let mut failed = 0u64;
        let mut repaired = 0u64;
        for shard in shards {
            let mut start: Option<BlobId> = None;
            loop {
                let mut rx = self.sync_state.clone();
                sync_state::wait_for_no_syncs(&mut rx, || info!("waiting for shard syncs to finish before repairing"))
                    .await
                    .ok_or(RecoveryError::Unknown)?;
                let _ = self.paused.subscribe().wait_for(|p| !*p).await;
                let ids: Vec<BlobId> = own
                    .list_pending(pb::ListPendingRequest {
                        shard: shard.0,
                        start_blob_id: start.map(|b| b.0.to_vec()).unwrap_or_default(),
                        limit: self.tuning.scan_page as u32,
                    })
                    .await
                    .map_err(sync_err("ListPending"))?
                    .into_inner()
                    .blob_ids
                    .iter()
                    .filter_map(|b| BlobId::from_bytes(b).ok())
                    .collect();
                let Some(last) = ids.last().copied() else { break };
                if repaired == 0 && failed == 0 {
                    info!(shard = shard.0, "repairing blobs owned shards lack");
                    self.update(|s| s.phase = pb::RecoveryPhase::Repairing as i32);
                }
                for chunk in ids.chunks(128) {
                    let batch: Vec<blob_recovery::Wanted> =
                        chunk.iter().map(|blob| blob_recovery::Wanted { blob: *blob, shards: vec![shard] }).collect();
                    for (blob, outcome) in blob_recovery::recover_batch(&self.peers, &committee, batch).await {
                        match outcome {
                            Ok(r) => {
                                repaired += 1;
                                self.metrics.blobs_recovered.inc();
                                self.metrics.bytes_fetched.inc_by(r.bytes_fetched);
                            }
                            Err(blob_recovery::BlobRecoveryError::Inconsistent { proof, .. }) => {
                                if self.report_inconsistency(blob, &proof).await.is_err() {
                                    failed += 1;
                                }
                            }
                            Err(e) => {
                                failed += 1;
                                warn!(%blob, error = %e, "repair of a blob failed; retried later");
                            }
                        }
                    }
                }
                match last.successor() {
                    Some(next) => start = Some(next),
                    None => break,
                }
            }
        }
        if repaired > 0 || failed > 0 {
            info!(repaired, failed, "repair pass done");
            self.update(|s| {
                s.slivers_repaired += repaired;
                if s.phase == pb::RecoveryPhase::Repairing as i32 {
                    s.phase = pb::RecoveryPhase::Idle as i32;
                }
            });
            // A node holding back its attestation for these repairs can attest now.
            own.mark_shards_recovered(pb::MarkShardsRecoveredRequest { shards: Vec::new(), epoch: state.epoch })
                .await
                .map_err(sync_err("MarkShardsRecovered"))?;
        }
        Ok(failed)
    }

    /// Records an inconsistency in this node's index, then passes it on to every member (best
    /// effort: a member that misses it finds the inconsistency itself at decode).
    async fn report_inconsistency(&self, blob: BlobId, proof: &InconsistencyProof) -> Result<(), RecoveryError> {
        let request = pb::ReportInconsistencyRequest { blob_id: blob.0.to_vec(), proof: Some(proof.to_proto()) };
        self.peers.own().report_inconsistency(request.clone()).await.map_err(sync_err("ReportInconsistency"))?;
        let epoch = self.sync_state.borrow().as_ref().map(|s| s.epoch);
        if let Some(committee) = match epoch {
            Some(e) => self.committee(e).await?,
            None => None,
        } {
            for member in committee.members.iter().filter(|m| m.node_id != self.me) {
                if let Some(mut client) = self.peers.client(&committee, &member.node_id)
                    && let Err(e) = client.report_inconsistency(request.clone()).await
                {
                    warn!(peer = %member.node_id, error = %e.message(), "could not pass the inconsistency on");
                }
            }
        }
        Ok(())
    }

    /// Finishes the work: marks the scanned shards `Active` (under the scan ids they were
    /// scanned with), then, for node recovery, attests once and sets the node `Active`. Returns
    /// false if it must scan again.
    async fn complete(&self, work: &Work) -> Result<bool, RecoveryError> {
        let state = self.check_same(work)?;
        if !state.syncing_shards.is_empty() {
            return Ok(false); // shard syncs still own some shards; the count will rise again
        }
        let mut own = self.peers.own();
        if !work.shards.is_empty() {
            let shards = work
                .shards
                .iter()
                .map(|(shard, scan_id)| pb::ShardScan { shard: shard.0, scan_id: *scan_id })
                .collect();
            own.mark_shards_recovered(pb::MarkShardsRecoveredRequest { shards, epoch: work.target_epoch })
                .await
                .map_err(sync_err("MarkShardsRecovered"))?;
            info!(shards = ?work.shard_ids().iter().map(|s| s.0).collect::<Vec<_>>(), "shards recovered and marked Active");
        }
        if !work.node_recovery {
            self.update(|s| s.phase = pb::RecoveryPhase::Idle as i32);
            return Ok(true);
        }
        // Blobs learned while the scan ran, past its position, are pending repairs: recovered
        // before the node attests (its evidence refuses pending blobs). The state has changed
        // (the shards just turned Active), so it is read afresh, not compared with the work's.
        let state = self.sync_state.borrow().clone().ok_or(RecoveryError::Unknown)?;
        if state.epoch != work.target_epoch {
            return Err(RecoveryError::Superseded);
        }
        if self.repair(&state).await? > 0 {
            return Ok(false);
        }
        let e = work.target_epoch;
        if e > 0 {
            // Never attest for an epoch the node is not a member of.
            let committee = self.committee(e).await?.ok_or(RecoveryError::Superseded)?;
            if !committee.is_member(&self.me) {
                return Err(RecoveryError::Superseded);
            }
            // No token: this process attested the epoch already (a retry after a failed
            // completion); CompleteRecovery checks the attestation exists.
            if let Some(token) = self.attester.token(e).await {
                let evidence = own
                    .get_shard_evidence(pb::GetShardEvidenceRequest {})
                    .await
                    .map_err(sync_err("GetShardEvidence"))?
                    .into_inner();
                if evidence.epoch != e {
                    return Err(RecoveryError::Superseded);
                }
                let evidence: Vec<ShardEvidence> = evidence
                    .evidence
                    .into_iter()
                    .map(|x| ShardEvidence {
                        shard: ShardIndex(x.shard),
                        blob_count: x.blob_count,
                        blob_ids_digest: hex::encode(x.blob_ids_digest),
                    })
                    .collect();
                let record = AttestationRecord::sign(&self.key, self.me.clone(), e, "recovery-service", evidence);
                let stored = match token.attest(&self.control_plane, &record).await? {
                    AttestOutcome::Created { flipped_to_done } => {
                        self.metrics.attestations.inc();
                        info!(epoch = e, flipped_to_done, "attested epoch-sync-done after recovery");
                        record
                    }
                    AttestOutcome::AlreadyPresent(existing) => existing,
                };
                if stored.node_id == self.me && stored.attested_by == "recovery-service" {
                    self.store.call(move |s| s.log_attestation(&stored)).await?;
                }
            }
        }
        own.complete_recovery(pb::CompleteRecoveryRequest { epoch: e }).await.map_err(sync_err("CompleteRecovery"))?;
        info!(epoch = e, "node recovery complete");
        self.update(|s| s.phase = pb::RecoveryPhase::Done as i32);
        Ok(true)
    }
}

/// The scan's state while it runs: the cursor, the failed set, and the failed set's changes
/// not yet persisted (written with the cursor in one batch).
struct Progress {
    cursor: Cursor,
    failed: BTreeMap<BlobId, FailedBlob>,
    changes: BTreeMap<BlobId, Option<FailedBlob>>,
}

impl Progress {
    /// The blob needs nothing more (recovered, present, invalid or gone).
    fn forget(&mut self, blob: BlobId) {
        if self.failed.remove(&blob).is_some() {
            self.changes.insert(blob, None);
        }
    }

    fn fail(&mut self, blob: BlobId, error: String) {
        let entry = self.failed.entry(blob).or_insert(FailedBlob {
            attempts: 0,
            last_error: String::new(),
            first_failed_ms: now_ms(),
        });
        entry.attempts += 1;
        entry.last_error = error;
        self.changes.insert(blob, Some(entry.clone()));
    }

    fn finish(&mut self, shards: &[ShardIndex]) {
        for s in shards {
            if let Some(c) = self.cursor.shards.get_mut(s) {
                c.finished = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn state(status: pb::NodeStatus, recovery_epoch: u64, recovering: &[(u32, u64)], syncing: &[u32]) -> pb::SyncState {
        pb::SyncState {
            epoch: 4,
            node_status: status as i32,
            recovery_epoch,
            running_syncs: syncing.len() as u32,
            recovering: recovering
                .iter()
                .map(|(shard, scan_id)| pb::ShardScan { shard: *shard, scan_id: *scan_id })
                .collect(),
            syncing_shards: syncing.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn work_is_the_shards_that_need_a_scan() {
        use pb::NodeStatus::*;
        // (state, expected work)
        let cases = [
            (state(RecoveryInProgress, 4, &[(1, 10), (2, 20)], &[]), Some((4, true, vec![(1, 10), (2, 20)]))),
            (state(RecoveryInProgress, 4, &[], &[3]), Some((4, true, vec![]))), // wait for syncs, then attest
            (state(Active, 0, &[(5, 50)], &[]), Some((4, false, vec![(5, 50)]))), // a restart or a failed sync
            (state(Active, 0, &[], &[3]), None),                                // only syncing
            (state(Active, 0, &[], &[]), None),
            (state(Standby, 0, &[(1, 1)], &[]), None),
        ];
        for (st, want) in cases {
            let got = Work::derive(&st).map(|w| {
                (w.target_epoch, w.node_recovery, w.shards.iter().map(|(s, id)| (s.0, *id)).collect::<Vec<_>>())
            });
            assert_eq!(got, want, "{st:?}");
        }
    }

    fn stored(target: u64, shards: &[(u32, u64, u8)]) -> Cursor {
        Cursor {
            target_epoch: target,
            shards: shards
                .iter()
                .map(|(s, scan, at)| {
                    (
                        ShardIndex(*s),
                        ShardCursor {
                            scan_id: *scan,
                            after: Some(BlobId([*at; 32])),
                            finished: *at == 255,
                            scanned: u64::from(*at),
                        },
                    )
                })
                .collect(),
            pass: 3,
            blobs_scanned: 100,
            ..Cursor::default()
        }
    }

    fn work(target: u64, shards: &[(u32, u64)]) -> Work {
        Work {
            target_epoch: target,
            node_recovery: true,
            shards: shards.iter().map(|(s, id)| (ShardIndex(*s), *id)).collect(),
        }
    }

    #[test]
    fn a_cursor_counts_only_for_the_scan_it_was_made_in() {
        // Same scans across an epoch change: kept, and the saved re-scan is counted (rule 8).
        let c = work(5, &[(1, 10), (2, 20)]).resume(Some(stored(4, &[(1, 10, 40), (2, 20, 60)])));
        assert_eq!(c.shards[&ShardIndex(1)].after, Some(BlobId([40; 32])));
        assert_eq!(c.rescans_saved, 60);
        assert_eq!(c.blobs_scanned, 100);
        // A shard whose scan id changed (restart, catch-up, lost and gained again) starts over.
        let c = work(4, &[(1, 11), (2, 20)]).resume(Some(stored(4, &[(1, 10, 40), (2, 20, 60)])));
        assert_eq!(c.shards[&ShardIndex(1)].after, None);
        assert!(!c.shards[&ShardIndex(1)].finished);
        assert_eq!(c.shards[&ShardIndex(2)].after, Some(BlobId([60; 32])));
        // A finished cursor of earlier work never finishes new work (the empty-cursor bug).
        let c = work(6, &[(1, 12)]).resume(Some(stored(4, &[(1, 10, 255)])));
        assert!(!c.shards[&ShardIndex(1)].finished && c.shards[&ShardIndex(1)].after.is_none());
        assert_eq!((c.pass, c.blobs_scanned), (0, 0), "a new recovery starts its counters afresh");
        // Shards that left the work leave the cursor; none stored: start at the beginning.
        let c = work(4, &[(2, 20)]).resume(Some(stored(4, &[(1, 10, 40), (2, 20, 60)])));
        assert_eq!(c.shards.keys().copied().collect::<Vec<_>>(), vec![ShardIndex(2)]);
        let c = work(4, &[(3, 30)]).resume(None);
        assert_eq!(c.shards[&ShardIndex(3)], ShardCursor { scan_id: 30, ..ShardCursor::default() });
    }
}
