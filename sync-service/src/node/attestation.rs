//! sync-service's epoch-sync-done attestation (rules 5 and 6).
//!
//! Whether the node may attest is decided from persisted statuses, never from the live task
//! count: the node must be `Active` (while it recovers, recovery-service attests), a member
//! of its latest epoch, and every owned shard must be `Active`. Attestation is
//! create-if-absent in etcd, so repeated checks (after every sync, at start-up) attest once.

use std::{sync::Arc, time::Duration};

use ferry_shared::{
    backoff::Backoff,
    control_plane::{AttestOutcome, AttestationRecord},
    crypto::ShardEvidence,
    types::{NodeStatus, ShardIndex, ShardStatus},
};
use tracing::{info, warn};

use super::{Node, NodeError, NodeView};

/// Per-shard evidence for the owned shards of the view's epoch, or `None` unless the certified
/// index has caught up with the peers since the start (rule 9) and every owned shard is `Active`
/// and lacks no certified blob the node knows of (no pending repairs, rule 6).
pub async fn evidence(node: &Node, view: &NodeView) -> Result<Option<Vec<ShardEvidence>>, NodeError> {
    if !view.index_caught_up {
        return Ok(None);
    }
    let owned = view.owned(&node.id);
    if owned.iter().any(|s| view.shards.get(s).map(|r| r.status) != Some(ShardStatus::Active)) {
        return Ok(None);
    }
    // The counts and digests kept with every write: O(shards), whatever the number of blobs.
    let counts = node.store.call(|s| s.counts()).await?;
    if owned.iter().any(|s| counts.pending.get(s).is_some_and(|n| *n > 0)) {
        return Ok(None);
    }
    let evidence = owned
        .into_iter()
        .map(|shard: ShardIndex| {
            let held = counts.slivers.get(&shard).copied().unwrap_or_default();
            ShardEvidence { shard, blob_count: held.count, blob_ids_digest: hex::encode(held.xor) }
        })
        .collect();
    Ok(Some(evidence))
}

/// Attests the node's latest epoch if the node is `Active`, a member, and every owned shard is
/// `Active`. Errors are logged: the next trigger (sync end, restart) tries again.
pub async fn attest_if_ready(node: &Arc<Node>) {
    if let Err(e) = try_attest(node).await {
        warn!(error = %e, "attestation attempt failed; retrying with backoff");
        retry_in_background(node);
    }
}

/// Retries a failed attempt (etcd unreachable, say) until one goes through: no other trigger
/// may come for an idle node. One retry loop at a time.
fn retry_in_background(node: &Arc<Node>) {
    if node.attest_retrying.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return;
    }
    let task_node = node.clone();
    node.spawn_background(async move {
        let node = task_node;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            backoff.wait().await;
            match try_attest(&node).await {
                Ok(()) => break,
                Err(e) => warn!(error = %e, "attestation retry failed"),
            }
        }
        node.attest_retrying.store(false, std::sync::atomic::Ordering::Release);
    });
}

async fn try_attest(node: &Arc<Node>) -> Result<(), NodeError> {
    let view = node.view();
    let Some(state) = view.state.as_ref() else { return Ok(()) };
    // Rule 5: while recovering, only recovery-service attests.
    if state.status != NodeStatus::Active || state.epoch == 0 || !state.committee.is_member(&node.id) {
        return Ok(());
    }
    let epoch = state.epoch;
    let Some(token) = node.attester.token(epoch).await else { return Ok(()) }; // attested already
    if node.control_plane.attestation(epoch, &node.id).await?.is_some() {
        // Attested before (perhaps by a call whose phase flip then failed): make sure the flip
        // is not lost with it.
        node.control_plane.complete_epoch_if_quorum(epoch).await?;
        token.already_attested();
        return Ok(());
    }

    let Some(evidence) = evidence(node, &view).await? else { return Ok(()) };
    // Re-check, holding off every transition, that nothing moved (a newer epoch, a shard that
    // needs a scan again) while the evidence was read.
    let _hold = node.data_write().await;
    let now = node.view();
    let all_active =
        now.owned(&node.id).iter().all(|s| now.shards.get(s).map(|r| r.status) == Some(ShardStatus::Active));
    if now.epoch() != epoch || now.status() != NodeStatus::Active || !all_active {
        return Ok(());
    }
    let record = AttestationRecord::sign(&node.key, node.id.clone(), epoch, "sync-service", evidence);
    match token.attest(&node.control_plane, &record).await? {
        AttestOutcome::Created { flipped_to_done } => {
            node.metrics.attestations.inc();
            info!(epoch, flipped_to_done, "attested epoch-sync-done");
        }
        AttestOutcome::AlreadyPresent(_) => {}
    }
    Ok(())
}
