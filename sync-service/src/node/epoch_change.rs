//! Epoch changes: the event follower and the transition it applies.
//!
//! The follower resumes the control plane's watch after the last revision the node applied.
//! A `Started(e)` event is applied as one ordered transition: storage for gained shards is
//! created first, then shard records, node status, epoch, committee and revision are written
//! in one batch ("a status implies its storage exists"), then lost shards' syncs are quiesced
//! (they were already locked in the batch) and gained shards' syncs start. Replaying an event
//! after a crash is harmless: events at or below the applied epoch are skipped.

use std::{sync::Arc, time::Duration};

use ferry_shared::{
    Committee,
    control_plane::{ControlPlaneError, EpochEvent, EpochPhase, WatchedEpochEvent},
    diff::{self, FillPath, PreviousAssignment},
    telemetry,
    types::{Epoch, NodeStatus, ShardIndex, ShardStatus},
};
use futures::StreamExt;
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::{Node, NodeError, attestation, shard_sync};
use crate::{
    config::FillMethod,
    store::{NodeState, ShardRecord, SyncProgress},
};

/// Brings the node up to date at start: catches up if it missed epochs (or lost its data),
/// then re-derives all work from persisted state (rule 7 and the start-up lessons).
pub async fn startup(node: &Arc<Node>) -> Result<(), NodeError> {
    // Read the revision first: the watch resumes from it, so nothing after it is missed.
    let revision = node.control_plane.revision().await?;
    let state = node.view().state;
    if let Some(s) = &state {
        if s.last_revision > revision {
            return Err(NodeError::ControlPlaneBehind { etcd: revision, processed: s.last_revision });
        }
    }
    if let Some(current) = node.control_plane.current_committee().await? {
        node.check_key(&current)?;
        let lagging = match &state {
            None => true,
            Some(s) => s.epoch + 1 < current.epoch,
        };
        if lagging {
            let empty = node.store.call(|s| s.is_empty()).await?;
            let registry_empty = node.control_plane.list_blobs(None, 1).await?.is_empty();
            let previous = if state.is_none() && empty && registry_empty && current.epoch == 0 {
                PreviousAssignment::Genesis
            } else {
                PreviousAssignment::Unknown
            };
            apply_committee(node, &current, previous, revision).await?;
        }
    }
    resume_work(node).await;
    Ok(())
}

/// Restarts the work persisted state implies: syncs of `ActiveSync` shards, dropping of
/// locked shards whose epoch change is done, and a pending attestation.
pub async fn resume_work(node: &Arc<Node>) {
    let view = node.view();
    for (shard, record) in &view.shards {
        if record.status == ShardStatus::ActiveSync {
            shard_sync::spawn_shard_sync(node, *shard);
        }
    }
    match node.control_plane.current().await {
        Ok(Some(EpochPhase::Done(e))) if e == view.epoch() => schedule_locked_drop(node, e),
        Ok(_) => {}
        // The next Done event (or restart) schedules the drop instead.
        Err(e) => warn!(error = %e, "cannot read the epoch phase; locked shards are dropped at the next Done event"),
    }
    node.mirror_status().await;
    attestation::attest_if_ready(node).await;
}

/// Follows the control plane for the life of the process. Returns only with an error, which
/// the caller treats as fatal. If etcd compacted the history after the node's last applied
/// revision, the node re-reads the current committee instead (catching up if it missed
/// epochs) and follows from there.
pub async fn run_follower(node: Arc<Node>) -> Result<(), NodeError> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let after = node.view().state.as_ref().map(|s| s.last_revision).unwrap_or(0);
        let events = match node.control_plane.watch_epochs(after).await {
            Ok(events) => Some(events),
            Err(ControlPlaneError::WatchResume { reason, .. }) => {
                warn!(after, %reason, "cannot resume the watch; re-reading the current committee");
                resync(&node).await?;
                None
            }
            Err(e) => {
                warn!(error = %e, "cannot watch the control plane; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                None
            }
        };
        let Some(mut events) = events else { continue };
        node.set_following(true);
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    backoff = Duration::from_millis(200);
                    apply_event(&node, event).await?;
                }
                Err(ControlPlaneError::WatchResume { reason, .. }) => {
                    warn!(%reason, "watch cannot go on; re-reading the current committee");
                    resync(&node).await?;
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "control-plane watch broke; resuming");
                    break;
                }
            }
        }
        node.set_following(false);
        tokio::time::sleep(backoff).await;
    }
}

/// Applies the current committee directly (the watch history is gone) and moves the cursor to
/// etcd's current revision.
async fn resync(node: &Arc<Node>) -> Result<(), NodeError> {
    let revision = node.control_plane.revision().await?;
    let Some(current) = node.control_plane.current_committee().await? else { return Ok(()) };
    node.check_key(&current)?;
    let state = node.view().state;
    match &state {
        Some(s) if current.epoch <= s.epoch => {
            let mut s = s.clone();
            s.last_revision = revision;
            node.store.call(move |st| st.put_node_state(&s)).await?;
            drop(node.transition().await); // republish the view
            if node.control_plane.current().await? == Some(EpochPhase::Done(current.epoch)) {
                schedule_locked_drop(node, current.epoch);
            }
            Ok(())
        }
        Some(s) if current.epoch == s.epoch + 1 => {
            let previous = s.committee.clone();
            apply_committee(node, &current, PreviousAssignment::Known(&previous), revision).await
        }
        _ => apply_committee(node, &current, PreviousAssignment::Unknown, revision).await,
    }
}

async fn apply_event(node: &Arc<Node>, event: WatchedEpochEvent) -> Result<(), NodeError> {
    match event.event {
        EpochEvent::Started(committee) => {
            debug!(epoch = committee.epoch, revision = event.revision, "epoch event received");
            let state = node.view().state;
            let previous = match &state {
                Some(s) if committee.epoch <= s.epoch => return Ok(()), // applied already
                Some(s) if committee.epoch == s.epoch + 1 => PreviousAssignment::Known(&s.committee),
                Some(_) => PreviousAssignment::Unknown,
                None if committee.epoch == 0 => PreviousAssignment::Genesis,
                None => PreviousAssignment::Unknown,
            };
            node.check_key(&committee)?;
            // Join the proposer's trace: this epoch change and the shard syncs it starts (and
            // the peers they stream from) show up under the `ferryctl epoch next` that began it.
            let traceparent = if telemetry::exporting() {
                node.control_plane.epoch_traceparent(committee.epoch).await.unwrap_or_else(|e| {
                    debug!(error = %e, "no trace context for the epoch");
                    None
                })
            } else {
                None
            };
            let span = telemetry::continue_trace(
                info_span!("epoch_change", ferry.service = "sync-service", ferry.node = %node.id, epoch = committee.epoch),
                traceparent.as_deref(),
            );
            apply_committee(node, &committee, previous, event.revision).instrument(span).await
        }
        EpochEvent::Done(epoch) => {
            if epoch == node.view().epoch() {
                schedule_locked_drop(node, epoch);
            }
            Ok(())
        }
    }
}

/// Applies the committee of a new epoch (see the module docs for the order of writes).
pub async fn apply_committee(
    node: &Arc<Node>,
    committee: &Committee,
    previous: PreviousAssignment<'_>,
    revision: u64,
) -> Result<(), NodeError> {
    let d = diff::diff(previous, committee, &node.id);
    let member = committee.is_member(&node.id);
    let epoch = committee.epoch;
    let fill = node.config.shard_sync.fill_gained_by;

    let guard = node.transition().await;
    debug!(epoch, "transition lock taken");
    let view = guard.view().await?;
    let old_status = view.status();
    let status = match (member, d.path, old_status) {
        (false, _, _) => NodeStatus::Standby,
        (true, FillPath::Genesis, _) => NodeStatus::Active,
        (true, FillPath::CatchUp, _) => NodeStatus::RecoveryInProgress(epoch),
        (true, FillPath::Incremental, NodeStatus::RecoveryInProgress(_) | NodeStatus::RecoveryCatchUp) => {
            NodeStatus::RecoveryInProgress(epoch)
        }
        (true, FillPath::Incremental, _) => NodeStatus::Active,
    };

    let mut updates: Vec<(ShardIndex, ShardRecord)> = Vec::new();
    for g in &d.gained {
        let existing = view.shards.get(&g.shard);
        let record = match (d.path, &g.previous_owner, fill) {
            (FillPath::Genesis, _, _) => ShardRecord { status: ShardStatus::Active, sync: None },
            (FillPath::Incremental, Some(source), FillMethod::ShardSync) => ShardRecord {
                // A re-gained shard keeps its old slivers but is re-synced from scratch.
                status: ShardStatus::ActiveSync,
                sync: Some(SyncProgress {
                    gained_epoch: epoch,
                    source: Some(source.clone()),
                    ..SyncProgress::default()
                }),
            },
            // Catch-up: a shard this node already holds as Active stays Active (node recovery
            // fills what it lacks); anything else is filled by blob recovery.
            (FillPath::CatchUp, _, _) if existing.map(|r| r.status) == Some(ShardStatus::Active) => continue,
            _ => ShardRecord { status: ShardStatus::ActiveRecover, sync: None },
        };
        updates.push((g.shard, record));
    }
    // Lost shards: quiesce their syncs, then lock. On catch-up, every held shard not owned now.
    let owned_next = d.owned_next();
    for (shard, record) in &view.shards {
        if !owned_next.contains(shard) && record.status != ShardStatus::LockedToMove {
            node.abort_sync(*shard);
            updates.push((*shard, ShardRecord { status: ShardStatus::LockedToMove, sync: record.sync.clone() }));
        }
    }
    for (shard, _) in &updates {
        if owned_next.contains(shard) {
            node.abort_sync(*shard); // a re-gained shard restarts its sync
        }
    }
    let gained: Vec<ShardIndex> = updates.iter().map(|(s, _)| *s).filter(|s| owned_next.contains(s)).collect();
    let new_state = NodeState { status, epoch, committee: committee.clone(), last_revision: revision };
    let store_updates = updates.clone();
    node.store
        .call(move |s| {
            for shard in &gained {
                s.ensure_shard_storage(*shard)?;
            }
            s.apply_transition(&new_state, &store_updates)
        })
        .await?;
    // Start the syncs (and so raise the running-sync count) before the new state is
    // published when the guard drops: no subscriber ever sees the gained shards with a count
    // of zero. The tasks wait for the lock before their first write.
    for (shard, record) in &updates {
        if record.status == ShardStatus::ActiveSync {
            shard_sync::spawn_shard_sync(node, *shard);
        }
    }
    drop(guard);
    info!(epoch, path = ?d.path, %status, gained = ?d.gained.iter().map(|g| g.shard.0).collect::<Vec<_>>(), lost = ?d.lost.iter().map(|s| s.0).collect::<Vec<_>>(), "applied epoch change");
    node.mirror_status().await;
    attestation::attest_if_ready(node).await;
    Ok(())
}

/// Drops `LockedToMove` shards once epoch `epoch` is done and the grace period has passed.
fn schedule_locked_drop(node: &Arc<Node>, epoch: Epoch) {
    let grace = Duration::from_millis(node.config.epoch.locked_shard_grace_ms);
    let task_node = node.clone();
    node.spawn_background(async move {
        let node = task_node;
        tokio::time::sleep(grace).await;
        let _t = node.transition().await;
        let view = node.view();
        if view.epoch() != epoch {
            return; // a newer epoch decides
        }
        for (shard, record) in view.shards {
            if record.status == ShardStatus::LockedToMove {
                let s = shard;
                match node.store.call(move |st| st.drop_shard(s)).await {
                    Ok(()) => info!(shard = shard.0, epoch, "dropped locked shard after the grace period"),
                    Err(e) => warn!(shard = shard.0, error = %e, "could not drop locked shard"),
                }
            }
        }
    });
}
