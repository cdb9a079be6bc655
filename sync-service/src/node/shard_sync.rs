//! Shard-sync tasks: fill a gained shard by streaming it from its previous owner.
//!
//! One task per `ActiveSync` shard. Each owns a [`super::sync_counter::SyncTaskGuard`] for its
//! whole life (waiting, transferring, backing off). An attempt streams the shard from the
//! persisted cursor, verifies every sliver against its blob's metadata, and writes slivers
//! with their progress in one batch. Bad or missing items go to the pending table for blob
//! recovery while the stream goes on. Transport errors are retried with exponential backoff
//! and jitter; a sync that fails for good leaves its shard `ActiveRecover` (rule 4).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ferry_proto::v1::{self as pb, sync_service_client::SyncServiceClient};
use ferry_shared::{
    crypto::{self, StreamShardIntent},
    erasure::BlobMetadata,
    grpc,
    types::{BlobId, NodeId, ShardIndex, ShardStatus},
};
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Code;
use tracing::{Instrument, info, info_span, warn};

use super::{LiveSync, Node, NodeError};
use crate::store::{ShardRecord, SliverWrite, SyncProgress};

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
    let guard = node.counter.guard();
    let task_node = node.clone();
    let span = info_span!("shard_sync", node = %node.id, shard = shard.0);
    let handle = node.spawn_background(
        async move {
            let _guard = guard;
            run(&task_node, shard).await;
            task_node.unregister_sync_task(shard);
            task_node.set_live(shard, None);
        }
        .instrument(span),
    );
    node.register_sync_task(shard, handle);
}

async fn run(node: &Arc<Node>, shard: ShardIndex) {
    let cfg = node.config.shard_sync.clone();
    let mut backoff = Duration::from_millis(cfg.initial_backoff_ms);
    loop {
        let Some(_permit) = node.sync_limit.acquire().await else { return };
        let progress = match start_attempt(node, shard).await {
            Ok(Some(p)) => p,
            Ok(None) => return, // no longer ActiveSync
            Err(e) => {
                warn!(error = %e, "cannot start shard sync attempt");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        node.set_live(shard, Some(LiveSync { started: Some(Instant::now()), blobs_this_attempt: 0 }));
        let outcome = attempt(node, shard, &progress).await;
        node.set_live(shard, None);
        match outcome {
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
            Err(AttemptError::Retryable(msg)) => {
                if progress.attempts >= cfg.max_attempts {
                    let msg = format!("gave up after {} attempts: {msg}", progress.attempts);
                    warn!(error = %msg, "shard sync failed for good; the shard goes to blob recovery");
                    fail_for_good(node, shard, &msg).await;
                    return;
                }
                warn!(error = %msg, attempt = progress.attempts, backoff_ms = backoff.as_millis() as u64, "shard sync attempt failed; retrying");
                node.metrics.sync_retries.inc();
                record_error(node, shard, &msg).await;
            }
            Err(AttemptError::Local(e)) => {
                warn!(error = %e, "shard sync attempt failed locally; retrying");
                node.metrics.sync_retries.inc();
                record_error(node, shard, &e.to_string()).await;
            }
        }
        drop(_permit);
        let jitter = rand::thread_rng().gen_range(0.75..1.25);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_millis(cfg.max_backoff_ms));
    }
}

/// Counts the attempt in the persisted record; `None` if the shard is no longer syncing.
async fn start_attempt(node: &Arc<Node>, shard: ShardIndex) -> Result<Option<SyncProgress>, NodeError> {
    let _t = node.transition().await;
    let Some(mut record) = node.store.call(move |s| s.shard_record(shard)).await? else { return Ok(None) };
    if record.status != ShardStatus::ActiveSync {
        return Ok(None);
    }
    let mut progress = record.sync.clone().unwrap_or_default();
    progress.attempts += 1;
    if progress.started_at_ms == 0 {
        progress.started_at_ms = crypto::now_ms();
    }
    record.sync = Some(progress.clone());
    node.store.call(move |s| s.put_shard_record(shard, &record)).await?;
    Ok(Some(progress))
}

/// Updates the persisted record of a shard that is still `ActiveSync`, under the lock.
async fn update_syncing(
    node: &Arc<Node>,
    shard: ShardIndex,
    what: &str,
    update: impl FnOnce(&mut ShardRecord) + Send + 'static,
) {
    let _t = node.transition().await;
    let result = node
        .store
        .call(move |s| {
            if let Some(mut r) = s.shard_record(shard)? {
                if r.status == ShardStatus::ActiveSync {
                    update(&mut r);
                    s.put_shard_record(shard, &r)?;
                }
            }
            Ok(())
        })
        .await;
    if let Err(e) = result {
        warn!(error = %e, "could not {what}");
    }
}

async fn record_error(node: &Arc<Node>, shard: ShardIndex, msg: &str) {
    let msg = msg.to_string();
    update_syncing(node, shard, "record the sync error", move |r| {
        if let Some(p) = r.sync.as_mut() {
            p.last_error = Some(msg);
        }
    })
    .await;
}

async fn fail_for_good(node: &Arc<Node>, shard: ShardIndex, msg: &str) {
    node.metrics.sync_failures.inc();
    let msg = msg.to_string();
    update_syncing(node, shard, "mark the shard for blob recovery", move |r| {
        r.status = ShardStatus::ActiveRecover;
        if let Some(p) = r.sync.as_mut() {
            p.last_error = Some(msg);
            p.finished = true;
        }
    })
    .await;
    node.mirror_status().await;
}

/// Writes a batch under the transition lock, after checking the shard is still ours to sync.
async fn write_batch(
    node: &Arc<Node>,
    shard: ShardIndex,
    gained_epoch: u64,
    items: Vec<SliverWrite>,
    pending: Vec<BlobId>,
    progress: SyncProgress,
    finish: Option<ShardStatus>,
) -> Result<(), AttemptError> {
    let _t = node.transition().await;
    let n = items.len() as u64;
    let bytes: u64 = items.iter().map(|i| i.data.len() as u64).sum();
    let wrote = node
        .store
        .call(move |s| {
            let Some(current) = s.shard_record(shard)? else { return Ok(false) };
            let same_sync = current.sync.as_ref().map(|p| p.gained_epoch) == Some(gained_epoch);
            if current.status != ShardStatus::ActiveSync || !same_sync {
                return Ok(false);
            }
            let record = ShardRecord { status: finish.unwrap_or(ShardStatus::ActiveSync), sync: Some(progress) };
            s.write_sync_batch(shard, &items, &pending, &record)?;
            Ok(true)
        })
        .await?;
    if !wrote {
        return Err(AttemptError::Superseded);
    }
    node.bump_live(shard, n);
    let label = shard.0.to_string();
    node.metrics.synced_slivers.with_label_values(&[label.as_str()]).inc_by(n);
    node.metrics.synced_bytes.with_label_values(&[label.as_str()]).inc_by(bytes);
    Ok(())
}

async fn attempt(node: &Arc<Node>, shard: ShardIndex, start: &SyncProgress) -> Result<(), AttemptError> {
    let cfg = node.config.shard_sync.clone();
    let view = node.view();
    let current = view.committee().cloned().ok_or(AttemptError::Superseded)?;
    let source = start.source.clone().ok_or_else(|| AttemptError::Fatal("no previous owner is known".into()))?;
    // The source must still be a member: a node that left the committee is gone for good.
    let source_member = current
        .member(&source)
        .ok_or_else(|| AttemptError::Fatal(format!("previous owner {source} left the committee")))?
        .clone();
    let channel = node
        .connector
        .channel(&source_member.sync_address, &source, None)
        .map_err(|s| AttemptError::Fatal(s.message().to_string()))?;
    let mut client = SyncServiceClient::new(channel)
        .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(grpc::MAX_MESSAGE_BYTES);
    let resume_from = match start.cursor {
        Some(c) => match c.successor() {
            Some(next) => Some(next),
            None => None,
        },
        None => None,
    };
    if start.cursor.is_some() && resume_from.is_none() {
        // The cursor is the largest possible id: the transfer is complete.
        return complete(node, shard, start.clone()).await;
    }
    let request = StreamShardIntent {
        shard,
        epoch: current.epoch,
        start: resume_from,
        requester: &node.id,
        timestamp_ms: crypto::now_ms(),
        include_metadata: true,
        limit: 0,
    }
    .sign(&node.key);
    let mut stream = match tokio::time::timeout(cfg.item_timeout(), client.stream_shard(request)).await {
        Err(_) => {
            return Err(AttemptError::Retryable(format!("{source} did not answer within {:?}", cfg.item_timeout())));
        }
        Ok(Err(status)) => return Err(classify(&status)),
        Ok(Ok(r)) => r.into_inner(),
    };
    let mut progress = start.clone();
    // Items arrive into `incoming` and are verified and written a batch at a time: one
    // blocking-pool hop verifies the whole batch (metadata reads and BLAKE3), one writes it.
    let mut incoming: Vec<(BlobId, pb::ShardItem)> = Vec::new();
    let mut incoming_bytes = 0usize;
    let mut last = start.cursor;
    loop {
        let next = match tokio::time::timeout(cfg.item_timeout(), stream.message()).await {
            Err(_) => Some(Err(tonic::Status::deadline_exceeded(format!(
                "no item from {source} for {:?}",
                cfg.item_timeout()
            )))),
            Ok(Err(status)) => Some(Err(status)),
            Ok(Ok(Some(item))) if item.end => None,
            Ok(Ok(Some(item))) => Some(Ok(item)),
            Ok(Ok(None)) => Some(Err(tonic::Status::unavailable(format!(
                "the stream from {source} ended before the end of the shard"
            )))),
        };
        let item = match next {
            None => break,
            Some(Ok(item)) => item,
            Some(Err(status)) => {
                // Keep what arrived intact before the break; resume after it.
                verify_and_write(node, shard, &source, &mut progress, &mut incoming).await?;
                return Err(classify(&status));
            }
        };
        let blob_id = match BlobId::from_bytes(&item.blob_id) {
            Ok(id) => id,
            Err(e) => {
                verify_and_write(node, shard, &source, &mut progress, &mut incoming).await?;
                return Err(AttemptError::Retryable(format!("corrupt stream from {source}: {e}")));
            }
        };
        if last.is_some_and(|l| blob_id <= l) {
            verify_and_write(node, shard, &source, &mut progress, &mut incoming).await?;
            return Err(AttemptError::Retryable(format!("stream from {source} is out of order at {blob_id}")));
        }
        last = Some(blob_id);
        incoming_bytes += item.data.len();
        incoming.push((blob_id, item));
        if incoming.len() >= cfg.batch_items || incoming_bytes >= cfg.batch_bytes {
            verify_and_write(node, shard, &source, &mut progress, &mut incoming).await?;
            incoming_bytes = 0;
        }
    }
    verify_and_write(node, shard, &source, &mut progress, &mut incoming).await?;
    complete(node, shard, progress).await
}

/// Checks an item against the metadata this node holds (or the metadata sent with it, which
/// must hash to the blob id). `Some(metadata to store with it, if new)`, or `None` if it is bad.
fn verify_item(
    shard: ShardIndex,
    blob_id: &BlobId,
    item: &pb::ShardItem,
    local: Option<BlobMetadata>,
) -> Option<Option<BlobMetadata>> {
    let (metadata, is_new) = match (local, &item.metadata) {
        (Some(m), _) => (m, false),
        (None, Some(p)) => (BlobMetadata::from_proto(p).and_then(|m| m.verify_id(blob_id).map(|()| m)).ok()?, true),
        (None, None) => return None,
    };
    metadata.verify_sliver(shard, &item.data).ok()?;
    Some(if is_new { Some(metadata) } else { None })
}

/// Verifies the items received so far and writes them with the progress in one atomic batch;
/// items that fail verification go to pending (blob recovery) instead.
async fn verify_and_write(
    node: &Arc<Node>,
    shard: ShardIndex,
    source: &NodeId,
    progress: &mut SyncProgress,
    incoming: &mut Vec<(BlobId, pb::ShardItem)>,
) -> Result<(), AttemptError> {
    if incoming.is_empty() {
        return Ok(());
    }
    let batch = std::mem::take(incoming);
    let checked = node
        .store
        .call(move |s| {
            let mut out = Vec::with_capacity(batch.len());
            for (id, item) in batch {
                let verdict = verify_item(shard, &id, &item, s.metadata(&id)?);
                out.push((id, item.data, verdict));
            }
            Ok(out)
        })
        .await?;
    let mut items = Vec::with_capacity(checked.len());
    let mut pending = Vec::new();
    for (blob_id, data, verdict) in checked {
        match verdict {
            Some(metadata) => {
                progress.blobs_done += 1;
                progress.bytes_done += data.len() as u64;
                items.push(SliverWrite { blob_id, data, metadata });
            }
            None => {
                warn!(blob = %blob_id, "sliver from {source} failed verification; handing it to blob recovery");
                pending.push(blob_id);
                progress.pending += 1;
            }
        }
        progress.cursor = Some(blob_id);
    }
    progress.last_error = None;
    write_batch(node, shard, progress.gained_epoch, items, pending, progress.clone(), None).await
}

/// The stream ended: every certified blob the source did not send goes to pending, then the
/// shard becomes `Active` (or `ActiveRecover` if anything is pending) with the cursor cleared
/// in the same batch.
async fn complete(node: &Arc<Node>, shard: ShardIndex, mut progress: SyncProgress) -> Result<(), AttemptError> {
    let mut missing = Vec::new();
    let mut after = None;
    loop {
        let page = node.control_plane.list_blobs(after, 512).await.map_err(|e| AttemptError::Local(e.into()))?;
        let Some(last) = page.last().map(|b| b.blob_id) else { break };
        let ids: Vec<BlobId> = page.iter().filter(|b| b.certificate.is_some()).map(|b| b.blob_id).collect();
        let absent = node
            .store
            .call(move |s| {
                let mut absent = Vec::new();
                for id in ids {
                    if !s.has_sliver(shard, &id)? {
                        absent.push(id);
                    }
                }
                Ok(absent)
            })
            .await?;
        missing.extend(absent);
        match last.successor() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let already_pending = node.store.call(move |s| s.pending(shard, usize::MAX)).await?;
    progress.pending = (missing.len() + already_pending.len()) as u64;
    progress.finished = true;
    progress.finished_at_ms = crypto::now_ms();
    progress.cursor = None;
    let status = if progress.pending == 0 { ShardStatus::Active } else { ShardStatus::ActiveRecover };
    info!(
        blobs = progress.blobs_done,
        bytes = progress.bytes_done,
        pending = progress.pending,
        ?status,
        "shard sync finished"
    );
    node.metrics.sync_completed.inc();
    write_batch(node, shard, progress.gained_epoch, Vec::new(), missing, progress, Some(status)).await?;
    node.mirror_status().await;
    super::attestation::attest_if_ready(node).await;
    Ok(())
}
