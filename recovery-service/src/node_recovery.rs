//! Node recovery: bring a recovering node (or its `ActiveRecover` shards) back to full data,
//! then attest epoch-sync-done exactly once.
//!
//! The work is re-derived from sync-service's published state every time it changes, never
//! from what a previous process was doing: a `RecoveryInProgress(e)` node recovers every
//! owned shard that shard sync is not filling; an `Active` node repairs its `ActiveRecover`
//! shards. The scan walks the registry of certified blobs in blob-id order with one persisted
//! cursor per work shard, so an epoch change keeps the progress of kept shards (rule 8).
//! Before every pass, before every blob and again before completing, it waits until the
//! running-sync count is known and zero (rule 3).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use ferry_proto::v1::{self as pb};
use ferry_shared::{
    Committee,
    control_plane::{AttestOutcome, AttestationRecord, BlobRecord, ControlPlane, ControlPlaneError},
    crypto::{NodeKeypair, ShardEvidence, now_ms},
    types::{BlobId, Epoch, NodeId, NodeStatus, ShardIndex},
};
use thiserror::Error;
use tokio::{
    sync::{Semaphore, watch},
    task::JoinSet,
};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    blob_recovery::{self, Peers},
    config::RecoveryTuning,
    metrics::RecoveryMetrics,
    store::{Cursor, FailedBlob, RecoveryStore, RecoveryStoreError},
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
    /// Shards whose blobs are recovered (owned shards that shard sync is not filling).
    pub shards: Vec<ShardIndex>,
}

impl Work {
    /// Derives the work from a sync state; `None` when there is nothing to recover.
    pub fn derive(state: &pb::SyncState) -> Option<Work> {
        let status = NodeStatus::from_proto(state.node_status, state.recovery_epoch).ok()?;
        let syncing: Vec<u32> = state.syncing_shards.clone();
        match status {
            NodeStatus::RecoveryInProgress(e) if !state.owned_shards.is_empty() => Some(Work {
                target_epoch: e,
                node_recovery: true,
                shards: state.owned_shards.iter().filter(|s| !syncing.contains(s)).map(|s| ShardIndex(*s)).collect(),
            }),
            NodeStatus::Active => {
                let repair: Vec<ShardIndex> =
                    state.shards_not_active.iter().filter(|s| !syncing.contains(s)).map(|s| ShardIndex(*s)).collect();
                (!repair.is_empty()).then_some(Work { target_epoch: state.epoch, node_recovery: false, shards: repair })
            }
            _ => None,
        }
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
        let mut backoff = Duration::from_millis(self.tuning.retry_initial_ms);
        loop {
            let state = match rx.wait_for(|s| s.is_some()).await {
                Ok(s) => s.clone(),
                Err(_) => return, // the follower is gone: the process is shutting down
            };
            let Some(state) = state else { continue };
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
                Ok(()) => backoff = Duration::from_millis(self.tuning.retry_initial_ms),
                Err(RecoveryError::Superseded | RecoveryError::Unknown) => {}
                Err(e) => {
                    warn!(error = %e, "recovery step failed; retrying");
                    self.update(|s| s.last_error = e.to_string());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(self.tuning.retry_max_ms));
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
            let mut paused = self.paused.subscribe();
            if !*paused.borrow_and_update() {
                return Ok(());
            }
            info!("recovery is paused; waiting for resume");
            let _ = paused.wait_for(|p| !*p).await;
        }
    }

    async fn load_cursor(&self, work: &Work, state: &pb::SyncState) -> Result<Cursor, RecoveryError> {
        let stored = self.store.call(|s| s.cursor()).await?;
        let mut cursor = match stored {
            Some(c)
                if c.target_epoch == work.target_epoch
                    && c.shards.keys().copied().collect::<Vec<_>>() == work.shards =>
            {
                return Ok(c);
            }
            Some(c) => {
                // Rule 8: shards the node keeps keep their progress; new ones start at the
                // beginning; dropped shards leave the work.
                let kept: Vec<ShardIndex> = work.shards.iter().copied().filter(|s| c.shards.contains_key(s)).collect();
                let saved = if kept.is_empty() { 0 } else { c.blobs_scanned };
                info!(from = c.target_epoch, to = work.target_epoch, kept = ?kept, saved, "recovery target changed; keeping cursors of kept shards");
                // A shard that joins the work already ACTIVE was filled by shard sync, which
                // checked it against the registry when it finished: it needs no scan.
                let synced: Vec<ShardIndex> = work
                    .shards
                    .iter()
                    .copied()
                    .filter(|s| !c.shards.contains_key(s) && !state.shards_not_active.contains(&s.0))
                    .collect();
                Cursor {
                    target_epoch: work.target_epoch,
                    shards: work.shards.iter().map(|s| (*s, c.shards.get(s).copied().flatten())).collect(),
                    finished: c.finished.iter().copied().filter(|s| kept.contains(s)).chain(synced).collect(),
                    pass: c.pass,
                    blobs_scanned: c.blobs_scanned,
                    rescans_saved: c.rescans_saved + saved,
                    blobs_recovered: c.blobs_recovered,
                    bytes_fetched: c.bytes_fetched,
                }
            }
            None => Cursor {
                target_epoch: work.target_epoch,
                shards: work.shards.iter().map(|s| (*s, None)).collect(),
                ..Cursor::default()
            },
        };
        cursor.finished.sort();
        let c = cursor.clone();
        self.store.call(move |s| s.put_cursor(&c)).await?;
        Ok(cursor)
    }

    fn publish_cursor(&self, cursor: &Cursor, failed: &BTreeMap<BlobId, FailedBlob>, clock: &PassClock) {
        let position = cursor
            .shards
            .values()
            .map(|c| {
                c.map(|b| u64::from_be_bytes([b.0[0], b.0[1], b.0[2], b.0[3], b.0[4], b.0[5], b.0[6], b.0[7]]))
                    .unwrap_or(0)
            })
            .min()
            .unwrap_or(0);
        // Blob ids are uniform hashes, so the cursor's position in id space estimates progress.
        let fraction = position as f64 / u64::MAX as f64;
        let elapsed = clock.started.elapsed().as_secs_f64();
        let eta = (fraction > 0.01 && fraction < 1.0).then(|| (elapsed * (1.0 - fraction) / fraction) as u64);
        let now = now_ms();
        let mut stuck: Vec<pb::StuckBlob> = failed
            .iter()
            .map(|(id, f)| pb::StuckBlob {
                blob_id: id.to_hex(),
                attempts: f.attempts,
                last_error: f.last_error.clone(),
                stuck_for_secs: now.saturating_sub(f.first_failed_ms) / 1000,
            })
            .collect();
        stuck.sort_by(|a, b| b.stuck_for_secs.cmp(&a.stuck_for_secs));
        stuck.truncate(5);
        let stalled = clock.last_progress.elapsed() > Duration::from_millis(self.tuning.stall_after_ms);
        self.update(|s| {
            s.target_epoch = cursor.target_epoch;
            s.pass = cursor.pass;
            s.blobs_scanned = cursor.blobs_scanned;
            s.blobs_recovered = cursor.blobs_recovered;
            s.bytes_fetched = cursor.bytes_fetched;
            s.rescans_saved = cursor.rescans_saved;
            s.blobs_failed = failed.len() as u64;
            s.eta_secs = eta;
            s.stalled = stalled;
            s.stuck_blobs = stuck;
            s.cursor = cursor.shards.values().filter_map(|c| *c).min().map(|b| b.to_hex()).unwrap_or_default();
        });
    }

    async fn run_work(&self, work: &Work) -> Result<(), RecoveryError> {
        info!(shards = ?work.shards.iter().map(|s| s.0).collect::<Vec<_>>(), "recovery work");
        let state = self.check_same(work)?;
        let mut cursor = self.load_cursor(work, &state).await?;
        let mut failed = self.store.call(|s| s.failed()).await?;
        let mut backoff = Duration::from_millis(self.tuning.retry_initial_ms);
        let mut clock = PassClock { started: Instant::now(), last_progress: Instant::now() };
        loop {
            self.wait_until_clear(work).await?;
            self.wait_for_storage(work).await?;
            cursor.pass += 1;
            clock.started = Instant::now();
            self.update(|s| {
                s.phase = pb::RecoveryPhase::Scanning as i32;
                s.last_error.clear();
            });
            self.publish_cursor(&cursor, &failed, &clock);
            info!(pass = cursor.pass, "scan pass starts");
            self.scan_pass(work, &mut cursor, &mut failed, &mut clock).await?;
            if failed.is_empty() {
                // Rule 3 again: no completion while any shard sync runs.
                self.update(|s| s.phase = pb::RecoveryPhase::Completing as i32);
                self.wait_until_clear(work).await?;
                if self.complete(work).await? {
                    let c = Cursor::default();
                    self.store.call(move |s| s.put_cursor(&c)).await?;
                    return Ok(());
                }
            } else {
                info!(failed = failed.len(), "pass left blobs unrecovered; retrying them");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(self.tuning.retry_max_ms));
        }
    }

    /// Recovery does not scan while any work shard lacks storage; it waits with backoff.
    async fn wait_for_storage(&self, work: &Work) -> Result<(), RecoveryError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let status =
                self.peers.own().get_status(pb::GetStatusRequest {}).await.map_err(sync_err("GetStatus"))?.into_inner();
            let missing: Vec<u32> =
                work.shards.iter().filter(|s| !status.shards.iter().any(|r| r.shard == s.0)).map(|s| s.0).collect();
            if missing.is_empty() {
                return Ok(());
            }
            warn!(?missing, "owned shards have no storage yet; waiting");
            self.update(|s| s.last_error = format!("waiting for storage of shards {missing:?}"));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            self.check_same(work)?;
        }
    }

    async fn scan_pass(
        &self,
        work: &Work,
        cursor: &mut Cursor,
        failed: &mut BTreeMap<BlobId, FailedBlob>,
        clock: &mut PassClock,
    ) -> Result<(), RecoveryError> {
        // Retry earlier failures first.
        let retry: Vec<BlobId> = failed.keys().copied().collect();
        for chunk in retry.chunks(self.tuning.scan_page) {
            let mut records = Vec::new();
            for id in chunk {
                match self.control_plane.blob(id).await? {
                    Some(r) => records.push(r),
                    None => {
                        failed.remove(id);
                    }
                }
            }
            self.recover_page(work, &records, None, cursor, failed, clock).await?;
        }
        loop {
            self.check_same(work)?;
            let unfinished: Vec<ShardIndex> =
                work.shards.iter().copied().filter(|s| !cursor.finished.contains(s)).collect();
            if unfinished.is_empty() {
                break;
            }
            let from = unfinished.iter().map(|s| cursor.shards.get(s).copied().flatten()).min().flatten();
            let start = match from {
                Some(b) => match b.successor() {
                    Some(next) => Some(next),
                    None => {
                        cursor.finished.extend(unfinished);
                        break;
                    }
                },
                None => None,
            };
            // A registry read error fails the pass (returned); it never ends it as if clean.
            let page = self.control_plane.list_blobs(start, self.tuning.scan_page).await?;
            let Some(last) = page.last().map(|b| b.blob_id) else {
                cursor.finished.extend(unfinished);
                break;
            };
            self.recover_page(work, &page, Some(last), cursor, failed, clock).await?;
        }
        self.persist(cursor, failed, clock).await
    }

    /// Checks and recovers one page of registry records, then advances the cursors to `last`.
    async fn recover_page(
        &self,
        work: &Work,
        page: &[BlobRecord],
        last: Option<BlobId>,
        cursor: &mut Cursor,
        failed: &mut BTreeMap<BlobId, FailedBlob>,
        clock: &mut PassClock,
    ) -> Result<(), RecoveryError> {
        let mut certified = Vec::new();
        for record in page {
            let Some(cert) = &record.certificate else { continue };
            let Some(committee) = self.committee(cert.epoch).await? else { continue };
            match cert.verify(&record.blob_id, &committee) {
                Ok(()) => certified.push(record.blob_id),
                Err(e) => warn!(blob = %record.blob_id, error = %e, "certificate does not verify; ignoring the blob"),
            }
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
        let committee = self.committee(work.target_epoch).await?.ok_or(RecoveryError::Superseded)?;
        let limit =
            Arc::new(Semaphore::new(self.max_concurrent_blobs.load(std::sync::atomic::Ordering::Relaxed).max(1)));
        let mut tasks: JoinSet<(BlobId, Result<blob_recovery::Recovered, blob_recovery::BlobRecoveryError>)> =
            JoinSet::new();
        let mut present = 0u64;
        for p in presence {
            let Ok(blob) = BlobId::from_bytes(&p.blob_id) else { continue };
            // Only shards whose cursor has not passed this blob, and that are in the work.
            let wanted: Vec<ShardIndex> = p
                .missing_shards
                .iter()
                .map(|s| ShardIndex(*s))
                .filter(|s| work.shards.contains(s))
                .filter(|s| last.is_none() || cursor.shards.get(s).copied().flatten().is_none_or(|c| c < blob))
                .collect();
            if wanted.is_empty() {
                failed.remove(&blob);
                present += 1;
                continue;
            }
            // Rule 3 holds per blob too: no new blob recovery while shard syncs run or paused.
            let permit = loop {
                let clear =
                    self.sync_state.borrow().as_ref().is_some_and(|s| s.running_syncs == 0) && !*self.paused.borrow();
                if clear {
                    if let Ok(permit) = limit.clone().acquire_owned().await {
                        break permit;
                    }
                }
                while let Some(done) = tasks.join_next().await {
                    self.record_result(done, cursor, failed, clock);
                }
                self.wait_until_clear(work).await?;
            };
            let peers = self.peers.clone();
            let committee = committee.clone();
            let span = info_span!("recover_blob", blob = %blob, shards = wanted.len());
            tasks.spawn(
                async move {
                    let _permit = permit;
                    (blob, blob_recovery::recover_blob(&peers, &committee, blob, &wanted).await)
                }
                .instrument(span),
            );
        }
        while let Some(done) = tasks.join_next().await {
            self.record_result(done, cursor, failed, clock);
        }
        self.update(|s| s.blobs_present += present);
        if let Some(last) = last {
            for (shard, c) in cursor.shards.iter_mut() {
                if work.shards.contains(shard) && c.is_none_or(|c| c < last) {
                    *c = Some(last);
                }
            }
            cursor.blobs_scanned += certified.len() as u64;
        }
        self.metrics.blobs_scanned.inc_by(certified.len() as u64);
        self.persist(cursor, failed, clock).await
    }

    /// Persists the cursor and failed blobs, then publishes them.
    async fn persist(
        &self,
        cursor: &Cursor,
        failed: &BTreeMap<BlobId, FailedBlob>,
        clock: &PassClock,
    ) -> Result<(), RecoveryError> {
        let c = cursor.clone();
        let f = failed.clone();
        self.store
            .call(move |s| {
                s.put_cursor(&c)?;
                s.put_failed(&f)
            })
            .await?;
        self.publish_cursor(cursor, failed, clock);
        Ok(())
    }

    fn record_result(
        &self,
        done: Result<
            (BlobId, Result<blob_recovery::Recovered, blob_recovery::BlobRecoveryError>),
            tokio::task::JoinError,
        >,
        cursor: &mut Cursor,
        failed: &mut BTreeMap<BlobId, FailedBlob>,
        clock: &mut PassClock,
    ) {
        match done {
            Ok((blob, Ok(r))) => {
                self.metrics.blobs_recovered.inc();
                self.metrics.bytes_fetched.inc_by(r.bytes_fetched);
                cursor.blobs_recovered += 1;
                cursor.bytes_fetched += r.bytes_fetched;
                clock.last_progress = Instant::now();
                failed.remove(&blob);
                // Progress is visible per blob, not only per page.
                let (recovered, fetched) = (cursor.blobs_recovered, cursor.bytes_fetched);
                let running = self.sync_state.borrow().as_ref().map(|st| st.running_syncs);
                self.update(|s| {
                    s.blobs_recovered = recovered;
                    s.bytes_fetched = fetched;
                    s.running_syncs = running;
                });
            }
            Ok((blob, Err(e))) => {
                self.metrics.blobs_failed.inc();
                warn!(%blob, error = %e, "blob recovery failed; retried later");
                let entry = failed.entry(blob).or_insert(FailedBlob {
                    attempts: 0,
                    last_error: String::new(),
                    first_failed_ms: now_ms(),
                });
                entry.attempts += 1;
                entry.last_error = e.to_string();
            }
            Err(e) => warn!(error = %e, "blob recovery task failed"),
        }
    }

    /// Finishes the work: marks repaired shards `Active`, then (for node recovery) attests once
    /// and sets the node `Active`. Returns false if it must scan again.
    async fn complete(&self, work: &Work) -> Result<bool, RecoveryError> {
        let state = self.check_same(work)?;
        if !state.syncing_shards.is_empty() {
            return Ok(false); // shard syncs still own some shards; the count will rise again
        }
        let mut own = self.peers.own();
        let recovered: Vec<u32> = state.shards_not_active.clone();
        if !recovered.is_empty() {
            own.mark_shards_recovered(pb::MarkShardsRecoveredRequest {
                shards: recovered.clone(),
                epoch: work.target_epoch,
            })
            .await
            .map_err(sync_err("MarkShardsRecovered"))?;
            info!(shards = ?recovered, "shards recovered and marked Active");
        }
        if !work.node_recovery {
            self.update(|s| s.phase = pb::RecoveryPhase::Idle as i32);
            return Ok(true);
        }
        let e = work.target_epoch;
        if e > 0 {
            // Never attest for an epoch the node is not a member of.
            let committee = self.committee(e).await?.ok_or(RecoveryError::Superseded)?;
            if !committee.is_member(&self.me) {
                return Err(RecoveryError::Superseded);
            }
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
            let stored = match self.control_plane.attest(&record).await? {
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
        own.complete_recovery(pb::CompleteRecoveryRequest { epoch: e }).await.map_err(sync_err("CompleteRecovery"))?;
        info!(epoch = e, "node recovery complete");
        self.update(|s| s.phase = pb::RecoveryPhase::Done as i32);
        Ok(true)
    }
}
