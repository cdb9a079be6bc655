//! Shard-sync tasks: fill a gained shard by streaming it from its previous owner.
//!
//! One supervised task per `ActiveSync` shard. The supervisor owns a
//! [`super::sync_counter::SyncTaskGuard`] for its whole life (waiting, transferring, backing
//! off) and restarts the transfer if it panics, so no shard is left `ActiveSync` with no task.
//! An attempt streams the shard from the persisted cursor, verifies every sliver against its
//! blob's metadata, and writes slivers with their progress in one batch. Bad or missing items
//! go to the pending table for blob recovery while the stream goes on. Failures are retried
//! with backoff for as long as the sync makes progress; only a sync with no progress for
//! `shard_sync.give_up_after_ms` fails for good, leaving its shard `ActiveRecover` (rule 4).
//!
//! The source is the shard's owner in the epoch before the gain, looked up in that epoch's
//! committee: a node that left the committee (decommissioned) still serves its locked shards.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ferry_proto::v1::{self as pb, sync_service_client::SyncServiceClient};
use ferry_shared::{
    backoff::Backoff,
    certificate::Certificate,
    crypto::{self, StreamShardIntent},
    grpc,
    registry::CertifiedRecord,
    shard_item::verify_shard_item,
    types::{BlobId, NodeId, ShardIndex, ShardStatus},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Code;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{
    LiveSync, Node, NodeError,
    shard_state::{self, ShardEvent},
    sync_counter::SyncTaskGuard,
};
use crate::{
    config::ShardSyncConfig,
    store::{ShardRecord, SliverWrite, SyncProgress},
};

/// A resizable limit on concurrently transferring shard syncs.
#[derive(Debug)]
pub struct SyncLimiter {
    semaphore: Arc<Semaphore>,
    limit: std::sync::Mutex<usize>,
}

impl SyncLimiter {
    /// A limiter allowing `limit` transfers at once.
    pub fn new(limit: usize) -> Self {
        SyncLimiter { semaphore: Arc::new(Semaphore::new(limit)), limit: std::sync::Mutex::new(limit) }
    }

    /// Waits for a transfer slot.
    pub async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.semaphore.clone().acquire_owned().await.ok()
    }

    /// The limit now.
    pub fn limit(&self) -> usize {
        *self.limit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the limit; returns the previous one. Shrinking takes effect as running
    /// transfers end.
    pub fn set_limit(&self, new: usize) -> usize {
        let mut limit = self.limit.lock().unwrap_or_else(|p| p.into_inner());
        let old = *limit;
        *limit = new;
        if new > old {
            self.semaphore.add_permits(new - old);
        } else if new < old {
            let semaphore = self.semaphore.clone();
            let excess = (old - new) as u32;
            tokio::spawn(async move {
                if let Ok(permits) = semaphore.acquire_many_owned(excess).await {
                    permits.forget();
                }
            });
        }
        old
    }
}

/// How one attempt ended.
#[derive(Debug)]
enum AttemptError {
    /// Worth retrying after a backoff (transport, timeouts, a source that is behind).
    Retryable(String),
    /// The source cannot serve this shard: stop and hand the shard to blob recovery.
    Fatal(String),
    /// The shard is no longer ours to sync (lost, or re-gained at a later epoch).
    Superseded,
    /// A local failure (store or control plane).
    Local(NodeError),
}

impl From<NodeError> for AttemptError {
    fn from(e: NodeError) -> Self {
        AttemptError::Local(e)
    }
}

impl From<crate::store::StoreError> for AttemptError {
    fn from(e: crate::store::StoreError) -> Self {
        AttemptError::Local(e.into())
    }
}

fn classify(status: &tonic::Status) -> AttemptError {
    let msg = format!("{}: {}", status.code(), status.message());
    match status.code() {
        // The source does not (or no longer) hold the shard, or refuses the request outright.
        Code::FailedPrecondition | Code::NotFound | Code::InvalidArgument | Code::Unimplemented => {
            AttemptError::Fatal(msg)
        }
        // Everything else may pass: the source is down, behind the epoch, or overloaded.
        _ => AttemptError::Retryable(msg),
    }
}

/// Starts a sync task for `shard` unless one is running. The guard is taken before the spawn.
pub fn spawn_shard_sync(node: &Arc<Node>, shard: ShardIndex) {
    if node.sync_running(shard) {
        return;
    }
    spawn_shard_sync_counted(node, shard, node.counter.guard());
}

/// Starts the supervised sync task of `shard` with a count taken already (an epoch change
/// takes the counts of its new syncs before it stops the old ones).
pub fn spawn_shard_sync_counted(node: &Arc<Node>, shard: ShardIndex, count: SyncTaskGuard) {
    let task_node = node.clone();
    let span = info_span!("shard_sync", node = %node.id, shard = shard.0);
    let handle = node.spawn_background(
        async move {
            let _count = count;
            supervise(&task_node, shard).await;
            task_node.unregister_sync_task(shard, tokio::task::try_id());
            task_node.set_live(shard, None);
        }
        .instrument(span),
    );
    node.register_sync_task(shard, handle);
}

/// When the sync last made progress: shared by the supervisor and its transfer task, so a
/// restart after a panic does not reset the give-up deadline. Progress is `quantum` certified
/// blobs settled since the last progress, not any one: an honest source streams that many in
/// well under a second, while one that trickles a valid item just inside the deadline would
/// otherwise keep the sync, and the count that holds blob recovery back, alive for as long as
/// it likes.
#[derive(Debug)]
struct ProgressClock {
    state: Mutex<(Instant, u64)>,
    quantum: u64,
}

impl ProgressClock {
    fn now(quantum: u64) -> Arc<Self> {
        Arc::new(ProgressClock { state: Mutex::new((Instant::now(), 0)), quantum: quantum.max(1) })
    }

    /// `blobs` more certified blobs settled.
    fn settled(&self, blobs: u64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.1 += blobs;
        if state.1 >= self.quantum {
            *state = (Instant::now(), 0);
        }
    }

    fn stalled_for(&self) -> Duration {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0.elapsed()
    }
}

/// Runs the transfer in a task of its own and restarts it if it panics, until the shard is no
/// longer `ActiveSync`: no shard is ever left `ActiveSync` with nobody filling it (rule 4).
async fn supervise(node: &Arc<Node>, shard: ShardIndex) {
    let cfg = node.config.shard_sync.clone();
    let clock = ProgressClock::now(cfg.progress_blobs);
    let mut backoff =
        Backoff::new(Duration::from_millis(cfg.initial_backoff_ms), Duration::from_millis(cfg.max_backoff_ms));
    loop {
        let mut transfer = tokio::task::JoinSet::new(); // aborted with the supervisor
        transfer.spawn(run(node.clone(), shard, clock.clone()).in_current_span());
        match transfer.join_next().await {
            Some(Ok(())) | None => {}
            Some(Err(e)) => {
                let msg = if e.is_panic() { "the shard-sync task panicked".to_string() } else { e.to_string() };
                warn!(error = %msg, "shard sync task ended abnormally; restarting it");
                node.metrics.sync_retries.inc();
                record_error(node, shard, &msg).await;
            }
        }
        match node.store.call(move |s| s.shard_record(shard)).await {
            Ok(Some(r)) if r.status == ShardStatus::ActiveSync => {}
            Ok(_) => return,
            Err(e) => warn!(error = %e, "cannot read the shard record after the sync task ended; retrying"),
        }
        if clock.stalled_for() >= cfg.give_up_after() {
            let msg = format!("no progress for {:?}", clock.stalled_for());
            fail_for_good(node, shard, &msg).await;
            return;
        }
        backoff.wait().await;
    }
}

/// The retry loop of one sync. Returns when the shard is filled, handed to blob recovery, or no
/// longer ours to sync.
async fn run(node: Arc<Node>, shard: ShardIndex, clock: Arc<ProgressClock>) {
    let node = &node;
    let cfg = node.config.shard_sync.clone();
    let mut backoff =
        Backoff::new(Duration::from_millis(cfg.initial_backoff_ms), Duration::from_millis(cfg.max_backoff_ms));
    loop {
        let Some(permit) = node.sync_limit.acquire().await else { return };
        let progress = match start_attempt(node, shard).await {
            Ok(Some(p)) => p,
            Ok(None) => return, // no longer ActiveSync
            Err(e) => {
                warn!(error = %e, "cannot start shard sync attempt");
                drop(permit);
                backoff.wait().await;
                continue;
            }
        };
        node.set_live(shard, Some(LiveSync { started: Some(Instant::now()), blobs_this_attempt: 0 }));
        let outcome = attempt(node, shard, &progress, &clock).await;
        node.set_live(shard, None);
        drop(permit);
        let msg = match outcome {
            Ok(()) => return,
            Err(AttemptError::Superseded) => {
                info!("shard sync superseded by a newer epoch change");
                return;
            }
            Err(AttemptError::Fatal(msg)) => {
                warn!(error = %msg, "shard sync failed for good; the shard goes to blob recovery");
                fail_for_good(node, shard, &msg).await;
                return;
            }
            Err(AttemptError::Retryable(msg)) => msg,
            Err(AttemptError::Local(e)) => format!("local: {e}"),
        };
        let stalled = clock.stalled_for();
        if stalled >= cfg.give_up_after() {
            let msg = format!("no progress for {stalled:?} (attempt {}): {msg}", progress.attempts);
            warn!(error = %msg, "shard sync failed for good; the shard goes to blob recovery");
            fail_for_good(node, shard, &msg).await;
            return;
        }
        warn!(error = %msg, attempt = progress.attempts, ?stalled, "shard sync attempt failed; retrying");
        node.metrics.sync_retries.inc();
        record_error(node, shard, &msg).await;
        backoff.wait().await;
    }
}

/// Counts the attempt in the persisted record; `None` if the shard is no longer syncing.
async fn start_attempt(node: &Arc<Node>, shard: ShardIndex) -> Result<Option<SyncProgress>, NodeError> {
    let guard = node.transition().await;
    let progress = guard
        .call(move |s| {
            let Some(mut record) = s.shard_record(shard)? else { return Ok(None) };
            if record.status != ShardStatus::ActiveSync {
                return Ok(None);
            }
            let mut progress = record.sync.clone().unwrap_or_default();
            progress.attempts += 1;
            if progress.started_at_ms == 0 {
                progress.started_at_ms = crypto::now_ms();
            }
            record.sync = Some(progress.clone());
            s.put_shard_record(shard, &record)?;
            Ok(Some(progress))
        })
        .await?;
    Ok(progress)
}

/// Updates the persisted record of a shard that is still `ActiveSync`, under the lock; returns
/// whether the shard was still syncing.
async fn update_syncing(
    node: &Arc<Node>,
    shard: ShardIndex,
    update: impl FnOnce(&mut ShardRecord) -> Result<(), NodeError> + Send + 'static,
) -> Result<bool, NodeError> {
    let guard = node.transition().await;

    guard
        .call(move |s| {
            let Some(mut r) = s.shard_record(shard)? else { return Ok(Ok(false)) };
            if r.status != ShardStatus::ActiveSync {
                return Ok(Ok(false));
            }
            if let Err(e) = update(&mut r) {
                return Ok(Err(e));
            }
            s.put_shard_record(shard, &r)?;
            Ok(Ok(true))
        })
        .await?
}

async fn record_error(node: &Arc<Node>, shard: ShardIndex, msg: &str) {
    let msg = msg.to_string();
    let result = update_syncing(node, shard, move |r| {
        if let Some(p) = r.sync.as_mut() {
            p.last_error = Some(msg);
        }
        Ok(())
    })
    .await;
    if let Err(e) = result {
        warn!(error = %e, "could not record the sync error");
    }
}

/// Hands the shard to blob recovery. The write is retried until it lands (or the shard moved
/// on): a sync that gave up never leaves its shard `ActiveSync`.
async fn fail_for_good(node: &Arc<Node>, shard: ShardIndex, msg: &str) {
    node.metrics.sync_failures.inc();
    let cfg = &node.config.shard_sync;
    let mut backoff =
        Backoff::new(Duration::from_millis(cfg.initial_backoff_ms), Duration::from_millis(cfg.max_backoff_ms));
    loop {
        let msg = msg.to_string();
        let written = async {
            ferry_shared::failpoints::fail_point!("sync-mark-failed", |arg| {
                ferry_shared::failpoints::crash_if_asked(arg);
                Err(NodeError::TaskStopped("fail point sync-mark-failed"))
            });
            update_syncing(node, shard, move |r| {
                if let Some(p) = r.sync.as_mut() {
                    p.last_error = Some(msg);
                    p.finished = true;
                }
                *r = shard_state::apply(Some(r), &ShardEvent::SyncFailed)?;
                Ok(())
            })
            .await
        }
        .await;
        match written {
            Ok(_) => break,
            Err(e) => {
                warn!(error = %e, "could not hand the failed sync's shard to blob recovery; retrying the write");
                backoff.wait().await;
            }
        }
    }
    node.mirror_status().await;
}

/// What one batch of a sync writes, atomically with its progress.
#[derive(Default)]
struct SyncBatch {
    /// Verified slivers (with metadata the node lacked).
    items: Vec<SliverWrite>,
    /// Certificates the node lacked, verified, that came with the items.
    certified: Vec<(BlobId, CertifiedRecord)>,
    /// Certified blobs the source did not send (or sent bad): pending unless the shard holds
    /// them by now.
    missing: Vec<BlobId>,
}

/// Writes a batch under the transition lock, after checking the shard is still ours to sync.
/// With `finish`, the sync completes: `Active`, or `ActiveRecover` if the shard has pending
/// blobs.
async fn write_batch(
    node: &Arc<Node>,
    shard: ShardIndex,
    batch: SyncBatch,
    progress: SyncProgress,
    finish: bool,
) -> Result<(), AttemptError> {
    let SyncBatch { items, certified, missing } = batch;
    let n = items.len() as u64;
    let bytes: u64 = items.iter().map(|i| i.data.len() as u64).sum();
    // Background work yields to clients; before the lock, so a throttled sync holds nothing.
    node.throttle.acquire(bytes).await;
    let guard = node.transition().await;
    let gained_epoch = progress.gained_epoch;
    let wrote = guard
        .call(move |s| {
            let Some(current) = s.shard_record(shard)? else { return Ok(Ok(false)) };
            let same_sync = current.sync.as_ref().map(|p| p.gained_epoch) == Some(gained_epoch);
            if current.status != ShardStatus::ActiveSync || !same_sync {
                return Ok(Ok(false));
            }
            let mut record = ShardRecord { sync: Some(progress), ..current };
            if finish {
                let pending = s.pending_count(shard)?;
                if let Some(p) = record.sync.as_mut() {
                    p.pending = pending;
                }
                record = match shard_state::apply(Some(&record), &ShardEvent::SyncCompleted { pending: pending > 0 }) {
                    Ok(r) => r,
                    Err(e) => return Ok(Err(e)),
                };
            }
            s.write_sync_batch(shard, &items, &certified, &missing, &record)?;
            Ok(Ok(true))
        })
        .await?
        .map_err(|e| AttemptError::Local(e.into()))?;
    drop(guard);
    if !wrote {
        return Err(AttemptError::Superseded);
    }
    node.bump_live(shard, n);
    let label = shard.0.to_string();
    node.metrics.synced_slivers.with_label_values(&[label.as_str()]).inc_by(n);
    node.metrics.synced_bytes.with_label_values(&[label.as_str()]).inc_by(bytes);
    // The crash window after a batch and its progress are durable.
    ferry_shared::failpoints::fail_point!("sync-after-batch", |arg| {
        ferry_shared::failpoints::crash_if_asked(arg);
        Err(AttemptError::Retryable("fail point sync-after-batch".into()))
    });
    Ok(())
}

/// The source's committee entry: the shard's owner in the epoch before the gain, looked up in
/// that epoch's committee (it may have left the current one).
async fn source_member(
    node: &Arc<Node>,
    progress: &SyncProgress,
) -> Result<(NodeId, ferry_shared::Member), AttemptError> {
    let source = progress.source.clone().ok_or_else(|| AttemptError::Fatal("no previous owner is known".into()))?;
    let previous_epoch = progress
        .gained_epoch
        .checked_sub(1)
        .ok_or_else(|| AttemptError::Fatal("a shard gained at genesis has no source".into()))?;
    let committee = node
        .control_plane
        .committee(previous_epoch)
        .await
        .map_err(|e| AttemptError::Local(e.into()))?
        .ok_or_else(|| AttemptError::Fatal(format!("the committee of epoch {previous_epoch} is unknown")))?;
    let member = committee
        .member(&source)
        .ok_or_else(|| AttemptError::Fatal(format!("{source} is not a member of epoch {previous_epoch}")))?
        .clone();
    Ok((source, member))
}

/// How one request's stream ended.
enum StreamEnd {
    /// The whole shard was sent.
    EndOfShard,
    /// The server stopped at a request limit; ask again from the cursor.
    LimitReached,
}

async fn attempt(
    node: &Arc<Node>,
    shard: ShardIndex,
    start: &SyncProgress,
    clock: &ProgressClock,
) -> Result<(), AttemptError> {
    let cfg = node.config.shard_sync.clone();
    let current = node.view().committee().cloned().ok_or(AttemptError::Superseded)?;
    let (source, source_member) = source_member(node, start).await?;
    let channel = node
        .connector
        .channel(&source_member.sync_address, &source, None)
        .map_err(|s| AttemptError::Fatal(s.message().to_string()))?;
    let mut client = SyncServiceClient::new(channel)
        .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(grpc::MAX_MESSAGE_BYTES);
    let mut progress = start.clone();
    loop {
        let resume_from = match progress.cursor {
            Some(c) => match c.successor() {
                Some(next) => Some(next),
                // The cursor is the largest possible id: the transfer is complete.
                None => return complete(node, shard, progress).await,
            },
            None => None,
        };
        let request = StreamShardIntent {
            cluster: node.cluster(),
            server: &source,
            shard,
            epoch: current.epoch,
            start: resume_from,
            requester: &node.id,
            timestamp_ms: crypto::now_ms(),
            // Most gained blobs are known here already (the node holds other shards of them, and
            // the index learns certificates with their metadata): items carry the sliver alone,
            // and what this node lacks is asked for per batch (`fill_lacking`).
            include_metadata: false,
            limit: 0,
            include_certificates: false,
        }
        .sign(&node.key);
        let stream = match tokio::time::timeout(cfg.item_timeout(), client.stream_shard(request)).await {
            Err(_) => {
                return Err(AttemptError::Retryable(format!(
                    "{source} did not answer within {:?}",
                    cfg.item_timeout()
                )));
            }
            Ok(Err(status)) => return Err(classify(&status)),
            Ok(Ok(r)) => r.into_inner(),
        };
        match receive(node, shard, &source, &client, stream, &mut progress, clock).await? {
            StreamEnd::EndOfShard => return complete(node, shard, progress).await,
            StreamEnd::LimitReached => {
                info!(cursor = ?progress.cursor, "the source stopped at its item limit; asking for the rest")
            }
        }
    }
}

/// Why a received batch stopped filling; `None` in [`Received::stop`] means it is full.
enum BatchStop {
    /// The stream ended (the whole shard, or the source's item limit).
    End(StreamEnd),
    /// Nothing settled for `give_up_after`: write what arrived, then give up unless that
    /// (or the batch written meanwhile) was progress.
    Stalled,
    /// The stream broke or sent something wrong: write what arrived intact, then fail.
    Failed(AttemptError),
}

/// Items received for one batch, and why it stopped filling.
struct Received {
    items: Vec<(BlobId, pb::ShardItem)>,
    stop: Option<BatchStop>,
}

/// Reads one stream to its end, verifying and writing a batch at a time. The next batch is
/// read from the stream while the previous one is verified and written, so the network and
/// the disk work at once.
async fn receive(
    node: &Arc<Node>,
    shard: ShardIndex,
    source: &NodeId,
    client: &SourceClient,
    mut stream: tonic::Streaming<pb::ShardItem>,
    progress: &mut SyncProgress,
    clock: &ProgressClock,
) -> Result<StreamEnd, AttemptError> {
    let cfg = node.config.shard_sync.clone();
    let mut last = progress.cursor;
    let mut received = next_batch(&cfg, source, &mut stream, &mut last, clock).await;
    loop {
        let Received { mut items, stop } = received;
        match stop {
            None => {
                let write = verify_and_write(node, shard, source, client, progress, &mut items, clock);
                let read = async { Ok(next_batch(&cfg, source, &mut stream, &mut last, clock).await) };
                received = tokio::try_join!(write, read)?.1;
            }
            Some(BatchStop::End(end)) => {
                verify_and_write(node, shard, source, client, progress, &mut items, clock).await?;
                return Ok(end);
            }
            Some(BatchStop::Failed(e)) => {
                // Keep what arrived intact before the break; resume after it.
                verify_and_write(node, shard, source, client, progress, &mut items, clock).await?;
                return Err(e);
            }
            Some(BatchStop::Stalled) => {
                verify_and_write(node, shard, source, client, progress, &mut items, clock).await?;
                let stalled = clock.stalled_for();
                if stalled >= cfg.give_up_after() {
                    return Err(AttemptError::Fatal(format!(
                        "fewer than {} certified blobs settled from {source}'s stream in {stalled:?} \
                         (shard_sync.progress_blobs, give_up_after_ms)",
                        cfg.progress_blobs
                    )));
                }
                received = next_batch(&cfg, source, &mut stream, &mut last, clock).await;
            }
        }
    }
}

/// Reads items until a batch is full (`batch_items` or `batch_bytes`) or the stream stops.
async fn next_batch(
    cfg: &ShardSyncConfig,
    source: &NodeId,
    stream: &mut tonic::Streaming<pb::ShardItem>,
    last: &mut Option<BlobId>,
    clock: &ProgressClock,
) -> Received {
    let mut items: Vec<(BlobId, pb::ShardItem)> = Vec::new();
    let mut bytes = 0usize;
    let stop = |items, stop| Received { items, stop: Some(stop) };
    loop {
        // The no-progress deadline holds inside a stream too: a source that trickles items
        // just inside the item timeout, or sends only what settles nothing, cannot keep the
        // sync (and the count that holds blob recovery back) alive.
        let stalled = clock.stalled_for();
        if stalled >= cfg.give_up_after() {
            return stop(items, BatchStop::Stalled);
        }
        let wait = cfg.item_timeout().min(cfg.give_up_after().saturating_sub(stalled)).max(Duration::from_millis(1));
        let item = match tokio::time::timeout(wait, stream.message()).await {
            Err(_) if clock.stalled_for() >= cfg.give_up_after() => continue,
            Err(_) => {
                let status =
                    tonic::Status::deadline_exceeded(format!("no item from {source} for {:?}", cfg.item_timeout()));
                return stop(items, BatchStop::Failed(classify(&status)));
            }
            Ok(Err(status)) => return stop(items, BatchStop::Failed(classify(&status))),
            Ok(Ok(Some(item))) if item.end => return stop(items, BatchStop::End(StreamEnd::EndOfShard)),
            Ok(Ok(Some(item))) if item.limit_reached => return stop(items, BatchStop::End(StreamEnd::LimitReached)),
            Ok(Ok(Some(item))) => item,
            Ok(Ok(None)) => {
                let status =
                    tonic::Status::unavailable(format!("the stream from {source} ended before the end of the shard"));
                return stop(items, BatchStop::Failed(classify(&status)));
            }
        };
        let blob_id = match BlobId::from_bytes(&item.blob_id) {
            Ok(id) => id,
            Err(e) => {
                let e = AttemptError::Retryable(format!("corrupt stream from {source}: {e}"));
                return stop(items, BatchStop::Failed(e));
            }
        };
        if last.is_some_and(|l| blob_id <= l) {
            let e = AttemptError::Retryable(format!("stream from {source} is out of order at {blob_id}"));
            return stop(items, BatchStop::Failed(e));
        }
        *last = Some(blob_id);
        // Everything the item holds counts against the batch: metadata and certificate too.
        bytes += prost::Message::encoded_len(&item);
        items.push((blob_id, item));
        if items.len() >= cfg.batch_items || bytes >= cfg.batch_bytes {
            return Received { items, stop: None };
        }
    }
}

type SourceClient = SyncServiceClient<grpc::TracedChannel>;

/// What the blocking check of a received batch found for one item.
enum Checked {
    /// Certified here already; the sliver verifies.
    Good(SliverWrite),
    /// Not certified here; the sliver verifies; the certificate that came with it is to be
    /// verified before the item counts.
    NeedsCertificate(SliverWrite, Certificate),
    /// Certified here, but the sliver does not verify (or lacks metadata): blob recovery.
    Bad(BlobId),
    /// Not certified here and no valid certificate came with it: not stored (a blob that is
    /// certified later is recovered then).
    Uncertified(BlobId),
}

/// Verifies the items received so far and writes them with the progress in one atomic batch:
/// good slivers, certificates learned with them, and the certified blobs in the range the batch
/// covers that the source did not send (the diff against the index, made while streaming).
async fn verify_and_write(
    node: &Arc<Node>,
    shard: ShardIndex,
    source: &NodeId,
    client: &SourceClient,
    progress: &mut SyncProgress,
    incoming: &mut Vec<(BlobId, pb::ShardItem)>,
    clock: &ProgressClock,
) -> Result<(), AttemptError> {
    let Some(last) = incoming.last().map(|(id, _)| *id) else { return Ok(()) };
    let batch = std::mem::take(incoming);
    let (mut checked, lacking) = check_items(node, shard, batch, true).await?;
    if !lacking.is_empty() {
        let filled = fill_lacking(node, source, client, lacking).await?;
        checked.extend(check_items(node, shard, filled, false).await?.0);
    }
    // Certificates that came with items for blobs this node did not know: verified as a batch.
    let offered: Vec<(BlobId, Certificate)> = checked
        .iter()
        .filter_map(|c| match c {
            Checked::NeedsCertificate(w, cert) => Some((w.blob_id, cert.clone())),
            _ => None,
        })
        .collect();
    let verified = verify_certificates(node, offered).await?;
    let mut next = progress.clone();
    let mut batch = SyncBatch::default();
    let mut sent = std::collections::BTreeSet::new();
    let mut uncertified = 0u64;
    for c in checked {
        match c {
            Checked::Good(w) => {
                sent.insert(w.blob_id);
                next.blobs_done += 1;
                next.bytes_done += w.data.len() as u64;
                batch.items.push(w);
            }
            Checked::NeedsCertificate(w, certificate) if verified.contains(&w.blob_id) => {
                sent.insert(w.blob_id);
                next.blobs_done += 1;
                next.bytes_done += w.data.len() as u64;
                batch.certified.push((w.blob_id, CertifiedRecord { certificate, invalid: None }));
                batch.items.push(w);
            }
            Checked::NeedsCertificate(w, _) => {
                uncertified += 1;
                sent.insert(w.blob_id);
            }
            Checked::Bad(id) => {
                warn!(blob = %id, "sliver from {source} failed verification; handing it to blob recovery");
            }
            Checked::Uncertified(id) => {
                uncertified += 1;
                sent.insert(id);
            }
        }
    }
    if uncertified > 0 {
        debug!(uncertified, "items of blobs this node holds no valid certificate of were not stored");
    }
    // The diff against the index over the range this batch covers: what the source skipped.
    let from = match progress.cursor {
        Some(c) => c.successor(),
        None => Some(BlobId::MIN),
    };
    let missing = diff_against_index(node, shard, from, last.successor(), &sent, progress).await?;
    // Progress is certified blobs settled: their slivers stored, or found missing and left to
    // blob recovery. Both are bounded by what the index holds, so a source that streams
    // uncertified ids (however many) or nothing keeps the clock still and is given up on.
    let settled = (batch.items.len() + missing.len()) as u64;
    batch.missing = missing;
    next.cursor = Some(last);
    next.last_error = None;
    write_batch(node, shard, batch, next.clone(), false).await?;
    *progress = next;
    clock.settled(settled);
    Ok(())
}

/// Checks received items against the store: certified here, and the sliver matches its blob's
/// metadata (stored here, or the item's own when this node lacks it). With `ask_source`, the
/// items of blobs this node lacks the certificate or metadata of are returned unchecked, second.
async fn check_items(
    node: &Arc<Node>,
    shard: ShardIndex,
    items: Vec<(BlobId, pb::ShardItem)>,
    ask_source: bool,
) -> Result<(Vec<Checked>, Vec<(BlobId, pb::ShardItem)>), AttemptError> {
    let checked = node
        .store
        .call(move |s| {
            let mut out = Vec::with_capacity(items.len());
            let mut lacking = Vec::new();
            let ids: Vec<BlobId> = items.iter().map(|(id, _)| *id).collect();
            let known = s.certified_and_metadata(&ids)?;
            for ((id, item), (certified, local)) in items.into_iter().zip(known) {
                let lacks_certificate = !certified && item.certificate.is_none();
                let lacks_metadata = local.is_none() && item.metadata.is_none();
                if ask_source && (lacks_certificate || lacks_metadata) {
                    lacking.push((id, item));
                    continue;
                }
                let certificate = item.certificate.as_ref().and_then(|c| Certificate::from_proto(c).ok());
                let verdict = verify_shard_item(shard, &id, &item, local);
                out.push(match (verdict, certified, certificate) {
                    (Some(metadata), true, _) => Checked::Good(SliverWrite { blob_id: id, data: item.data, metadata }),
                    (Some(metadata), false, Some(c)) => {
                        Checked::NeedsCertificate(SliverWrite { blob_id: id, data: item.data, metadata }, c)
                    }
                    (None, true, _) => Checked::Bad(id),
                    (_, false, _) => Checked::Uncertified(id),
                });
            }
            Ok((out, lacking))
        })
        .await?;
    Ok(checked)
}

/// Asks the source for the certificates and metadata of `lacking`'s blobs (what the stream
/// leaves out) and puts them into the items. An answer is only a claim: the metadata must
/// match its blob id and the certificate must verify before anything is stored.
async fn fill_lacking(
    node: &Arc<Node>,
    source: &NodeId,
    client: &SourceClient,
    mut lacking: Vec<(BlobId, pb::ShardItem)>,
) -> Result<Vec<(BlobId, pb::ShardItem)>, AttemptError> {
    let timeout = node.config.shard_sync.item_timeout();
    for start in (0..lacking.len()).step_by(crate::server::MAX_CHECK_BLOBS) {
        let range = start..lacking.len().min(start + crate::server::MAX_CHECK_BLOBS);
        let blob_ids = lacking[range.clone()].iter().map(|(id, _)| id.0.to_vec()).collect();
        let request = pb::GetCertificatesRequest { blob_ids, include_metadata: true };
        let answer = match tokio::time::timeout(timeout, client.clone().get_certificates(request)).await {
            Err(_) => {
                return Err(AttemptError::Retryable(format!(
                    "{source} did not answer GetCertificates within {timeout:?}"
                )));
            }
            Ok(Err(status)) => match classify(&status) {
                // A source that will not tell: its items stay as they came (not stored unless
                // this node can check them), and the no-progress deadline decides.
                AttemptError::Fatal(e) => {
                    warn!(error = %e, "{source} refused GetCertificates; its items are checked as they came");
                    return Ok(lacking);
                }
                retryable => return Err(retryable),
            },
            Ok(Ok(r)) => r.into_inner(),
        };
        let mut entries: std::collections::HashMap<Vec<u8>, pb::CertifiedEntry> =
            answer.blobs.into_iter().map(|e| (e.blob_id.clone(), e)).collect();
        for (id, item) in &mut lacking[range] {
            if let Some(entry) = entries.remove(id.0.as_slice()) {
                item.certificate = entry.certificate;
                item.metadata = entry.metadata;
            }
        }
    }
    Ok(lacking)
}

/// The certificates among `offered` that verify against the committee of their epoch.
async fn verify_certificates(
    node: &Arc<Node>,
    offered: Vec<(BlobId, Certificate)>,
) -> Result<std::collections::BTreeSet<BlobId>, AttemptError> {
    if offered.is_empty() {
        return Ok(Default::default());
    }
    let mut keys = std::collections::BTreeMap::new();
    for (_, c) in &offered {
        if let std::collections::btree_map::Entry::Vacant(e) = keys.entry(c.epoch)
            && let Some(k) = node.committees.get(c.epoch).await.map_err(|e| AttemptError::Local(e.into()))?
        {
            e.insert(k);
        }
    }
    let cluster = node.cluster().to_string();
    let verdicts = tokio::task::spawn_blocking(move || {
        let items: Vec<(BlobId, &Certificate, &ferry_shared::certificate::CommitteeKeys)> =
            offered.iter().filter_map(|(b, c)| keys.get(&c.epoch).map(|k| (*b, c, k.as_ref()))).collect();
        let results = ferry_shared::certificate::verify_batch(&cluster, &items);
        items.iter().zip(results).filter(|(_, r)| r.is_ok()).map(|((b, _, _), _)| *b).collect()
    })
    .await
    .map_err(|e| AttemptError::Local(crate::store::StoreError::Task(e.to_string()).into()))?;
    Ok(verdicts)
}

/// The certified blobs (not claimed invalid) in `[from, upto)` that are not in `sent`, a page at
/// a time: every page but the last is written at once (as pending, the progress unchanged), the
/// last is returned to go with the batch that covers the range.
async fn diff_against_index(
    node: &Arc<Node>,
    shard: ShardIndex,
    from: Option<BlobId>,
    upto: Option<BlobId>,
    sent: &std::collections::BTreeSet<BlobId>,
    progress: &SyncProgress,
) -> Result<Vec<BlobId>, AttemptError> {
    const PAGE: usize = 4096;
    let Some(mut at) = from else { return Ok(Vec::new()) };
    loop {
        let (page, done) = node.store.call(move |s| s.list_certified(Some(at), upto, PAGE)).await?;
        let missing: Vec<BlobId> =
            page.iter().filter(|(id, invalid)| invalid.is_none() && !sent.contains(id)).map(|(id, _)| *id).collect();
        let next = page.last().and_then(|(id, _)| id.successor());
        match next {
            Some(n) if !done => {
                let batch = SyncBatch { missing, ..SyncBatch::default() };
                write_batch(node, shard, batch, progress.clone(), false).await?;
                at = n;
            }
            _ => return Ok(missing),
        }
    }
}

/// The stream ended: the rest of the index after the cursor is diffed, the node waits until
/// its index has caught up with its peers (so nothing certified elsewhere is overlooked), then
/// the shard becomes `Active`, or `ActiveRecover` if any certified blob is pending, with the
/// cursor cleared in the same batch.
async fn complete(node: &Arc<Node>, shard: ShardIndex, mut progress: SyncProgress) -> Result<(), AttemptError> {
    let from = match progress.cursor {
        Some(c) => c.successor(),
        None => Some(BlobId::MIN),
    };
    let missing = diff_against_index(node, shard, from, None, &Default::default(), &progress).await?;
    if !missing.is_empty() {
        write_batch(node, shard, SyncBatch { missing, ..SyncBatch::default() }, progress.clone(), false).await?;
    }
    let mut views = node.subscribe();
    if !views.borrow().index_caught_up {
        info!("the stream is complete; waiting for the certified index to catch up before the shard counts as filled");
        views.wait_for(|v| v.index_caught_up).await.map_err(|_| AttemptError::Superseded)?;
    }
    progress.finished = true;
    progress.finished_at_ms = crypto::now_ms();
    progress.cursor = None;
    write_batch(node, shard, SyncBatch::default(), progress.clone(), true).await?;
    let pending = node.store.call(move |s| s.pending_count(shard)).await?;
    info!(blobs = progress.blobs_done, bytes = progress.bytes_done, pending, "shard sync finished");
    node.metrics.sync_completed.inc();
    node.mirror_status().await;
    super::attestation::attest_if_ready(node).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_trouble_is_retried_and_refusals_are_final() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Internal,
            Code::Cancelled,
            Code::PermissionDenied,
            Code::Unknown,
        ] {
            assert!(
                matches!(classify(&tonic::Status::new(code, "x")), AttemptError::Retryable(_)),
                "{code:?} is retried"
            );
        }
        for code in [Code::FailedPrecondition, Code::NotFound, Code::InvalidArgument, Code::Unimplemented] {
            assert!(matches!(classify(&tonic::Status::new(code, "x")), AttemptError::Fatal(_)), "{code:?} is final");
        }
    }
}
