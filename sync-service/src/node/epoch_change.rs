//! Epoch changes: the event follower and the transitions it applies.
//!
//! The follower resumes the control plane's watch after the last revision the node applied.
//! A `Started(e)` event is applied as one ordered transition decided by [`plan::plan`]:
//! storage for gained shards is created first, then shard records, node status, epoch,
//! committee and revision are written in one batch ("a status implies its storage exists"),
//! then the gained shards' syncs start (their guards are taken before the lost shards' syncs
//! are stopped, so the published count never dips to zero in between). Replaying an event
//! after a crash is harmless: events at or below the applied epoch are skipped.
//!
//! Every node also completes the phase flip to `Done` when it sees a quorum of attestations
//! (so a lost flip never wedges the cluster), and drops a locked shard only once the node that
//! took it over has attested an epoch in which it owned it.

pub mod plan;

use std::{sync::Arc, time::Duration};

use ferry_shared::{
    Committee,
    control_plane::{ControlPlaneError, EpochEvent, WatchedEpochEvent},
    diff::{self, PreviousAssignment},
    telemetry,
    types::{Epoch, ShardIndex, ShardStatus},
};
use futures::StreamExt;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use super::{Node, NodeError, attestation, shard_sync};
use crate::store::NodeState;

/// Brings the node up to date at start: catches up if it missed epochs (or lost its data);
/// otherwise marks every owned shard that claims data for a new scan, since the node may have
/// missed writes while it was down (rule 9). Then re-derives all work from persisted state.
pub async fn startup(node: &Arc<Node>) -> Result<(), NodeError> {
    // Read the revision first: the watch resumes from it, so nothing after it is missed.
    let revision = node.control_plane.revision().await?;
    let state = node.view().state;
    if let Some(s) = &state
        && s.last_revision > revision
    {
        return Err(NodeError::ControlPlaneBehind { etcd: revision, processed: s.last_revision });
    }
    let mut caught_up = false;
    if let Some(current) = node.control_plane.current_committee().await? {
        node.observe_committee(&current)?;
        let lagging = match &state {
            None => true,
            Some(s) => s.epoch + 1 < current.epoch,
        };
        if lagging {
            let empty = node.store.call(|s| s.is_empty()).await?;
            let fresh = state.is_none() && empty && current.epoch == 0;
            let previous = if fresh && !super::index::peers_hold_blobs(node, &current).await {
                PreviousAssignment::Genesis
            } else {
                PreviousAssignment::Unknown
            };
            apply_committee(node, &current, previous, revision).await?;
            caught_up = true;
        }
    }
    if !caught_up && state.is_some() {
        mark_restarted(node).await?;
    }
    resume_work(node).await;
    Ok(())
}

/// A restart breaks the history of every owned shard that claims data: new scans for them.
async fn mark_restarted(node: &Arc<Node>) -> Result<(), NodeError> {
    let guard = node.transition().await;
    let view = guard.view().await?;
    let records = plan::restart(&view, &node.id)?;
    if records.is_empty() {
        return Ok(());
    }
    let shards: Vec<u32> = records.iter().map(|(s, _)| s.0).collect();
    guard.call(move |s| s.put_shard_records(&records)).await?;
    info!(?shards, "restarted: owned shards are checked against every certified blob before they count as complete");
    Ok(())
}

/// Restarts the work persisted state implies: syncs of `ActiveSync` shards, a phase flip that
/// may have been lost, dropping of locked shards their new owners hold, and a pending
/// attestation.
pub async fn resume_work(node: &Arc<Node>) {
    let view = node.view();
    for (shard, record) in &view.shards {
        if record.status == ShardStatus::ActiveSync {
            shard_sync::spawn_shard_sync(node, *shard);
        }
    }
    complete_epoch_if_quorum(node, view.epoch()).await;
    release_locked_shards(node).await;
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
    node.observe_committee(&current)?;
    let state = node.view().state;
    match &state {
        Some(s) if current.epoch <= s.epoch => {
            {
                let guard = node.transition().await;
                let Some(mut fresh) = guard.view().await?.state else { return Ok(()) };
                fresh.last_revision = fresh.last_revision.max(revision);
                guard.call(move |st| st.put_node_state(&fresh)).await?;
            }
            complete_epoch_if_quorum(node, current.epoch).await;
            release_locked_shards(node).await;
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
        EpochEvent::Poisoned { key, reason } => {
            poisoned(node, &key, &reason);
            Ok(())
        }
        EpochEvent::Started(committee) => {
            debug!(epoch = committee.epoch, revision = event.revision, "epoch event received");
            let state = node.view().state;
            if let Some(s) = &state
                && committee.epoch > s.epoch
                && committee.n_shards != s.committee.n_shards
            {
                let reason = format!(
                    "epoch {} has {} shards, the cluster {}; the shard count never changes",
                    committee.epoch, committee.n_shards, s.committee.n_shards
                );
                poisoned(node, &format!("epochs/{}", committee.epoch), &reason);
                return Ok(());
            }
            let previous = match &state {
                Some(s) if committee.epoch <= s.epoch => return Ok(()), // applied already
                Some(s) if committee.epoch == s.epoch + 1 => PreviousAssignment::Known(&s.committee),
                Some(_) => PreviousAssignment::Unknown,
                None if committee.epoch == 0 => PreviousAssignment::Genesis,
                None => PreviousAssignment::Unknown,
            };
            node.observe_committee(&committee)?;
            // The window between reading a committee and applying it (tests: a lagging node).
            if let Some(delay) = ferry_shared::failpoints::delay_for("epoch-before-apply", node.id.as_str()) {
                tokio::time::sleep(delay).await;
            }
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
        EpochEvent::Done(_) => {
            release_locked_shards(node).await;
            Ok(())
        }
        EpochEvent::Attested { epoch, .. } => {
            complete_epoch_if_quorum(node, epoch).await;
            release_locked_shards(node).await;
            Ok(())
        }
    }
}

/// A control-plane value this node will not apply: logged, counted for alerting, skipped.
fn poisoned(node: &Node, key: &str, reason: &str) {
    node.metrics.control_plane_poisoned.inc();
    error!(%key, %reason, "FERRY-NODE-004: skipping a control-plane value that is not valid; fix or remove it");
}

/// Applies the committee of a new epoch (see the module docs for the order of writes).
pub async fn apply_committee(
    node: &Arc<Node>,
    committee: &Committee,
    previous: PreviousAssignment<'_>,
    revision: u64,
) -> Result<(), NodeError> {
    let d = diff::diff(previous, committee, &node.id);
    let epoch = committee.epoch;
    let guard = node.transition().await;
    debug!(epoch, "transition lock taken");
    let view = guard.view().await?;
    let plan = plan::plan(&view, &d, epoch, committee.is_member(&node.id), node.config.shard_sync.fill_gained_by)?;
    let new_state = NodeState { status: plan.status, epoch, committee: committee.clone(), last_revision: revision };
    let (create, records) = (plan.create_storage.clone(), plan.records.clone());
    guard
        .call(move |s| {
            for shard in &create {
                s.ensure_shard_storage(*shard)?;
            }
            s.apply_transition(&new_state, &records)
        })
        .await?;
    // New syncs take their guards (raising the count) before old ones are stopped and before
    // the new view is published when the guard drops: no subscriber ever sees the gained shards,
    // or the moment between old and new syncs, with a count of zero.
    let starting: Vec<(ShardIndex, super::sync_counter::SyncTaskGuard)> =
        plan.start_syncs.iter().map(|s| (*s, node.counter.guard())).collect();
    for shard in &plan.abort_syncs {
        node.abort_sync(*shard);
    }
    for (shard, count) in starting {
        shard_sync::spawn_shard_sync_counted(node, shard, count);
    }
    drop(guard);
    info!(
        epoch,
        path = ?d.path,
        status = %plan.status,
        gained = ?d.gained.iter().map(|g| g.shard.0).collect::<Vec<_>>(),
        lost = ?d.lost.iter().map(|s| s.0).collect::<Vec<_>>(),
        "applied epoch change"
    );
    node.mirror_status().await;
    attestation::attest_if_ready(node).await;
    Ok(())
}

/// Completes a phase flip to `Done(epoch)` that its quorum-completing attester did not (it
/// failed or died right after attesting). Idempotent: the guarded write succeeds once.
async fn complete_epoch_if_quorum(node: &Arc<Node>, epoch: Epoch) {
    match node.control_plane.complete_epoch_if_quorum(epoch).await {
        Ok(true) => info!(epoch, "completed the phase flip to Done for a quorum of attestations"),
        Ok(false) => {}
        Err(e) => {
            warn!(epoch, error = %e, "cannot check the epoch's attestations; the next attestation or restart tries again")
        }
    }
}

/// Drops every `LockedToMove` shard whose new owner holds it: the owner of the shard in some
/// epoch from the one that moved it on attested that epoch, so it had every owned shard whole.
/// Until then the node keeps serving the shard, however long the transfer takes.
async fn release_locked_shards(node: &Arc<Node>) {
    let view = node.view();
    let Some(latest) = view.committee().map(|c| c.epoch) else { return };
    for (shard, record) in &view.shards {
        if record.status != ShardStatus::LockedToMove {
            continue;
        }
        let moved_at = record.locked_epoch.unwrap_or(latest);
        match taken_over(node, *shard, moved_at, latest).await {
            Ok(Some(holder)) => drop_locked(node, *shard, &holder.to_string()).await,
            Ok(None) => debug!(shard = shard.0, moved_at, "locked shard kept: its new owner has not attested yet"),
            Err(e) => warn!(shard = shard.0, error = %e, "cannot check who holds a locked shard; kept for now"),
        }
    }
}

/// The node that attested an epoch in `from..=to` in which it owned `shard`, if any.
async fn taken_over(
    node: &Arc<Node>,
    shard: ShardIndex,
    from: Epoch,
    to: Epoch,
) -> Result<Option<ferry_shared::types::NodeId>, NodeError> {
    for epoch in from..=to {
        let Some(committee) = node.control_plane.committee(epoch).await? else { continue };
        let Some(owner) = committee.owner(shard).cloned() else { continue };
        if owner == node.id {
            return Ok(None); // ours again: the epoch change that gained it decides
        }
        if node.control_plane.attestation(epoch, &owner).await?.is_some() {
            return Ok(Some(owner));
        }
    }
    Ok(None)
}

async fn drop_locked(node: &Arc<Node>, shard: ShardIndex, holder: &str) {
    let guard = node.transition().await;
    let still_locked = node.view().shards.get(&shard).map(|r| r.status) == Some(ShardStatus::LockedToMove);
    if !still_locked {
        return;
    }
    match guard.call(move |st| st.drop_shard(shard)).await {
        Ok(()) => info!(shard = shard.0, %holder, "dropped a locked shard: its new owner holds it"),
        Err(e) => warn!(shard = shard.0, error = %e, "could not drop a locked shard"),
    }
}
