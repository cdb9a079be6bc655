//! The histories that happen, not only the ones that are easy to set up: a restart without a
//! wipe (in an epoch and across one), a second recovery, a removal, a source that restarts
//! mid-stream, a blob whose writer lied, tasks that panic, a transfer that outlives the epoch,
//! a stream cut at the server's item limit, and a write still running when its caller gave up.
//! Every test ends with the audit: each node holds a verified sliver of every certified blob in
//! every shard it owns.
#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ferry_e2e::{Cluster, WAIT, cluster_with_blobs};
use ferry_proto::v1 as pb;
use ferry_shared::{
    certificate::CommitteeKeys,
    client::ClientError,
    committee::rebalance,
    erasure,
    failpoints::fail,
    types::{NodeStatus, ShardStatus},
};

/// Waits until node `i` has attested `epoch`, and checks the evidence covers `blobs` blobs in
/// every shard.
async fn wait_attested(
    cluster: &Cluster,
    i: usize,
    epoch: u64,
    blobs: usize,
) -> ferry_shared::control_plane::AttestationRecord {
    let me = cluster.nodes[i].id.clone();
    let cp = cluster.control_plane.clone();
    let id = me.clone();
    ferry_e2e::wait_until(&format!("{me} attests epoch {epoch}"), || {
        let (cp, id) = (cp.clone(), id.clone());
        async move { Ok(cp.attestation(epoch, &id).await?.is_some()) }
    })
    .await
    .unwrap();
    let a = cluster.control_plane.attestation(epoch, &me).await.unwrap().unwrap();
    assert!(a.evidence.iter().all(|e| e.blob_count == blobs as u64), "{me} attested with holes: {:?}", a.evidence);
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_down_across_one_epoch_recovers_what_it_missed_before_it_attests() {
    let (mut cluster, mut blobs) = cluster_with_blobs(30, |_| {}).await.unwrap();
    cluster.stop_node(3).await.unwrap(); // down, not wiped
    blobs.extend(cluster.store_random_blobs(20, 2000, 71).await.unwrap());
    cluster.next_epoch(cluster.weighted(0, 2)).await.unwrap();
    for i in 0..3 {
        cluster.wait_all_active(i, 1).await.unwrap();
    }
    cluster.wait_done(1).await.unwrap();
    cluster.start_node(3).await.unwrap();
    cluster.wait_all_active(3, 1).await.unwrap();
    wait_attested(&cluster, 3, 1, blobs.len()).await;
    cluster.check_shards_match_encoding(3, &blobs).unwrap();
    cluster.assert_no_holes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_restarted_within_an_epoch_recovers_what_it_missed() {
    let (mut cluster, mut blobs) = cluster_with_blobs(30, |_| {}).await.unwrap();
    cluster.stop_node(2).await.unwrap();
    blobs.extend(cluster.store_random_blobs(20, 2000, 72).await.unwrap());
    cluster.start_node(2).await.unwrap();
    // Back at the same epoch: its shards claim data they may lack, so each needs a scan.
    let view = cluster.nodes[2].node().unwrap().view();
    for shard in view.owned(&cluster.nodes[2].id) {
        assert_eq!(view.shards[&shard].status, ShardStatus::ActiveRecover, "shard {shard} is checked after a restart");
    }
    cluster.wait_all_active(2, 0).await.unwrap();
    cluster.check_shards_match_encoding(2, &blobs).unwrap();
    cluster.assert_no_holes().await.unwrap();
}

/// Wipes node `i` and waits until it has recovered, at `epoch`.
async fn wipe_and_recover(cluster: &mut Cluster, i: usize, epoch: u64) {
    cluster.stop_node(i).await.unwrap();
    cluster.wipe(i).unwrap();
    cluster.start_node(i).await.unwrap();
    cluster.wait_all_active(i, epoch).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_recovery_without_a_wipe_scans_again() {
    let (mut cluster, mut blobs) = cluster_with_blobs(30, |_| {}).await.unwrap();
    wipe_and_recover(&mut cluster, 3, 0).await;
    cluster.check_shards_match_encoding(3, &blobs).unwrap();
    // It crashes again, without a wipe, and misses writes.
    cluster.stop_node(3).await.unwrap();
    blobs.extend(cluster.store_random_blobs(20, 2000, 73).await.unwrap());
    cluster.start_node(3).await.unwrap();
    cluster.wait_all_active(3, 0).await.unwrap();
    cluster.check_shards_match_encoding(3, &blobs).unwrap();
    cluster.assert_no_holes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recovered_node_that_crashes_across_two_epochs_comes_back_whole() {
    let (mut cluster, mut blobs) = cluster_with_blobs(30, |_| {}).await.unwrap();
    wipe_and_recover(&mut cluster, 3, 0).await;
    cluster.stop_node(3).await.unwrap();
    for (epoch, weight) in [(1u64, 2u64), (2, 3)] {
        cluster.next_epoch(cluster.weighted(0, weight)).await.unwrap();
        for i in 0..3 {
            cluster.wait_all_active(i, epoch).await.unwrap();
        }
        cluster.wait_done(epoch).await.unwrap();
        blobs.extend(cluster.store_random_blobs(10, 2000, 80 + epoch).await.unwrap());
    }
    cluster.start_node(3).await.unwrap();
    let view = cluster.wait_view(3, "caught up to epoch 2", |v| v.epoch() == 2).await.unwrap();
    assert_eq!(view.status(), NodeStatus::RecoveryInProgress(2));
    cluster.wait_all_active(3, 2).await.unwrap();
    let a = wait_attested(&cluster, 3, 2, blobs.len()).await;
    assert_eq!(a.attested_by, "recovery-service");
    cluster.check_shards_match_encoding(3, &blobs).unwrap();
    cluster.assert_no_holes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_nodes_shards_move_by_shard_sync_and_are_dropped_once_taken_over() {
    let (cluster, blobs) = cluster_with_blobs(40, |_| {}).await.unwrap();
    let c0 = cluster.committee().await.unwrap();
    let removed = cluster.nodes[3].id.clone();
    let c1 = cluster.next_epoch(cluster.nodes.iter().take(3).map(|n| n.member(1)).collect()).await.unwrap();
    for i in 0..3 {
        cluster.wait_all_active(i, 1).await.unwrap();
    }
    for shard in c0.shards_of(&removed) {
        let owner = cluster.nodes.iter().position(|n| Some(&n.id) == c1.owner(shard)).unwrap();
        let record = cluster.nodes[owner].node().unwrap().view().shards[&shard].clone();
        let sync = record.sync.clone().unwrap();
        assert_eq!(sync.source.as_ref(), Some(&removed), "shard {shard} came from the removed node");
        assert_eq!(
            (record.status, sync.blobs_done, sync.pending),
            (ShardStatus::Active, blobs.len() as u64, 0),
            "shard {shard} was streamed, not rebuilt: {sync:?}"
        );
    }
    cluster.wait_done(1).await.unwrap();
    // The removed node served its locked shards, and drops them once their new owners attested.
    cluster
        .wait_view(3, "locked shards dropped after the new owners attested", |v| {
            v.status() == NodeStatus::Standby && v.shards.is_empty()
        })
        .await
        .unwrap();
    cluster.check_blobs(&blobs).await.unwrap();
    cluster.assert_no_holes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sync_from_a_source_that_restarts_several_times_completes_by_shard_sync() {
    let (mut cluster, blobs) = cluster_with_blobs(120, |c| {
        c.stream.max_bytes_per_sec = 6_000;
        c.shard_sync.batch_items = 4;
    })
    .await
    .unwrap();
    let c0 = cluster.committee().await.unwrap();
    let c1 = cluster.next_epoch(cluster.weighted(0, 2)).await.unwrap();
    let me = cluster.nodes[0].id.clone();
    let shard = *c1.shards_of(&me).iter().find(|s| c0.owner(**s) != Some(&me)).unwrap();
    let source = cluster.nodes.iter().position(|n| Some(&n.id) == c0.owner(shard)).unwrap();
    // Restart the source five times while it streams: each time the sync had made progress.
    let mut restarts = 0;
    for step in 1..=5u64 {
        let done_before = step * 15;
        let reached = cluster
            .wait_view(0, "sync progress", move |v| {
                v.shards
                    .get(&shard)
                    .and_then(|r| r.sync.as_ref())
                    .is_some_and(|p| p.blobs_done >= done_before || p.finished)
            })
            .await
            .unwrap();
        if reached.shards[&shard].sync.as_ref().is_some_and(|p| p.finished) {
            break;
        }
        cluster.stop_sync(source).await.unwrap();
        cluster.start_sync(source).await.unwrap();
        restarts += 1;
    }
    assert!(restarts >= 4, "the source was restarted mid-stream {restarts} times");
    cluster.wait_all_active(0, 1).await.unwrap();
    let record = cluster.nodes[0].node().unwrap().view().shards[&shard].clone();
    let sync = record.sync.unwrap();
    assert_eq!(
        (record.status, sync.blobs_done, sync.pending),
        (ShardStatus::Active, blobs.len() as u64, 0),
        "filled by shard sync across the restarts: {sync:?}"
    );
    assert!(sync.attempts > restarts, "every break was retried: {sync:?}");
    cluster.assert_no_holes().await.unwrap();
}

/// `data` encoded for `n_shards`, with sliver `shard` replaced by other bytes whose digest is
/// put in the metadata: each sliver matches its digest, but they are not one codeword.
fn inconsistent_blob(data: &[u8], n_shards: u32, shard: usize) -> erasure::EncodedBlob {
    let mut enc = erasure::encode(data, n_shards).unwrap();
    let bogus: Vec<u8> = enc.slivers[shard].iter().map(|b| b ^ 0x5a).collect();
    enc.metadata.sliver_digests[shard] = *blake3::hash(&bogus).as_bytes();
    enc.slivers[shard] = bogus;
    enc.blob_id = enc.metadata.blob_id();
    enc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_whose_slivers_are_not_one_codeword_is_marked_invalid_and_recovery_completes() {
    let (mut cluster, blobs) = cluster_with_blobs(20, |_| {}).await.unwrap();
    let keys = CommitteeKeys::new(std::sync::Arc::new(cluster.committee().await.unwrap())).unwrap();
    let bad = inconsistent_blob(&[7u8; 3000], cluster.n_shards, 0);
    let bad_id = cluster.client().store_encoded(&keys, &[(0, bad)]).await.remove(0).unwrap();
    assert!(
        matches!(cluster.client().read(&bad_id).await, Err(ClientError::Invalid(_))),
        "a read re-encodes and refuses it"
    );
    // Node 2 (shards 4 and 5) recovers: every decode involving the blob comes out wrong.
    wipe_and_recover(&mut cluster, 2, 0).await;
    let status = cluster.nodes[2].recovery.as_ref().unwrap().recovery.status();
    assert_eq!(status.blobs_invalid, 1, "{status:?}");
    assert_eq!(status.blobs_failed, 0, "an invalid blob is not retried: {status:?}");
    for node in &cluster.nodes {
        let record = node.node().unwrap().store.certified(&bad_id).unwrap().unwrap();
        let proof = record.invalid.unwrap_or_else(|| panic!("{} has the claim too (passed on)", node.id));
        assert_eq!(proof.reported_by, cluster.nodes[2].id);
        assert!(proof.shards.len() >= 4, "the proof names the k slivers decoded: {proof:?}");
    }
    cluster.check_shards_match_encoding(2, &blobs).unwrap();
    cluster.check_blobs(&blobs).await.unwrap();
    let report = cluster.assert_no_holes().await.unwrap();
    assert_eq!((report.certified, report.invalid), (blobs.len() as u64, 1));
    // A second node's recovery checks the proof instead of decoding again, and completes too.
    wipe_and_recover(&mut cluster, 1, 0).await;
    assert_eq!(cluster.nodes[1].recovery.as_ref().unwrap().recovery.status().blobs_invalid, 1);
    cluster.assert_no_holes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_recovery_task_that_panics_is_retried_not_skipped() {
    let (mut cluster, blobs) = cluster_with_blobs(30, |_| {}).await.unwrap();
    fail::cfg("recover-blob", "1*panic(a blob recovery task dies)").unwrap();
    cluster.stop_node(3).await.unwrap();
    cluster.wipe(3).unwrap();
    cluster.start_node(3).await.unwrap();
    cluster.wait_all_active(3, 0).await.unwrap();
    fail::remove("recover-blob");
    let metrics =
        ferry_shared::metrics::scrape(cluster.nodes[3].recovery.as_ref().unwrap().metrics_addr).await.unwrap();
    let failed = ferry_shared::metrics::sample(&metrics, "ferry_recovery_blobs_failed_total", &[]);
    assert_eq!(failed, 1.0, "the blob whose task panicked was counted failed (and retried)");
    cluster.check_shards_match_encoding(3, &blobs).unwrap();
    cluster.assert_no_holes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_sync_task_that_panics_is_restarted_and_a_failed_status_write_is_retried() {
    let (mut cluster, blobs) = cluster_with_blobs(40, |c| c.shard_sync.batch_items = 8).await.unwrap();
    let c0 = cluster.committee().await.unwrap();
    fail::cfg("sync-after-batch", "1*panic(the sync task dies after a batch)").unwrap();
    let c1 = cluster.next_epoch(cluster.weighted(0, 2)).await.unwrap();
    cluster.wait_all_active(0, 1).await.unwrap();
    fail::remove("sync-after-batch");
    let me = cluster.nodes[0].id.clone();
    let node = cluster.nodes[0].node().unwrap().clone();
    assert!(node.metrics.sync_retries.get() >= 1, "the panic was noticed and the sync restarted");
    for shard in c1.shards_of(&me).into_iter().filter(|s| c0.owner(*s) != Some(&me)) {
        let sync = node.view().shards[&shard].sync.clone().unwrap();
        assert_eq!(
            (sync.blobs_done, sync.pending),
            (blobs.len() as u64, 0),
            "shard {shard} filled by shard sync: {sync:?}"
        );
    }
    let mut views = node.subscribe();
    tokio::time::timeout(WAIT, views.wait_for(|v| v.running_syncs == 0)).await.unwrap().unwrap();
    drop(node);

    // A sync that gives up (its source is down) whose first status write fails: the write is
    // retried, so the shard reaches ActiveRecover (and blob recovery) instead of staying
    // ActiveSync with nobody filling it.
    let one = cluster.nodes[1].id.clone();
    let c2 = rebalance(&c1, cluster.weighted(1, 3)).unwrap();
    let gained = *c2.shards_of(&one).iter().find(|s| c1.owner(**s) != Some(&one)).unwrap();
    let source = cluster.nodes.iter().position(|n| Some(&n.id) == c1.owner(gained)).unwrap();
    cluster.stop_node(source).await.unwrap();
    fail::cfg("sync-mark-failed", "1*return").unwrap();
    cluster.control_plane.propose_epoch(&c2).await.unwrap();
    cluster
        .wait_view(1, "the failed sync's shard handed to blob recovery", move |v| {
            v.shards.get(&gained).map(|r| r.status) == Some(ShardStatus::ActiveRecover)
        })
        .await
        .unwrap();
    fail::remove("sync-mark-failed");
    cluster.wait_all_active(1, 2).await.unwrap();
    cluster.start_node(source).await.unwrap();
    cluster.wait_all_active(source, 2).await.unwrap();
    cluster.assert_no_holes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_locked_shard_is_kept_until_its_new_owner_holds_it() {
    let (cluster, blobs) = cluster_with_blobs(60, |c| c.stream.max_bytes_per_sec = 4_000).await.unwrap();
    let c0 = cluster.committee().await.unwrap();
    let me = cluster.nodes[0].id.clone();
    let c1 = rebalance(&c0, cluster.weighted(0, 2)).unwrap();
    let shard = *c1.shards_of(&me).iter().find(|s| c0.owner(**s) != Some(&me)).unwrap();
    let source = cluster.nodes.iter().position(|n| Some(&n.id) == c0.owner(shard)).unwrap();

    // One channel: no view is ever published with a syncing shard and a count of zero.
    let mut views = cluster.nodes[0].node().unwrap().subscribe();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = violations.clone();
    let id = me.clone();
    let checker = tokio::spawn(async move {
        loop {
            let v = views.borrow_and_update().clone();
            let syncing = v
                .owned(&id)
                .iter()
                .filter(|s| v.shards.get(s).map(|r| r.status) == Some(ShardStatus::ActiveSync))
                .count();
            if syncing > 0 && v.running_syncs == 0 {
                seen.lock().unwrap().push(ferry_e2e::describe(&v));
            }
            if views.changed().await.is_err() {
                return;
            }
        }
    });

    cluster.control_plane.propose_epoch(&c1).await.unwrap();
    // The others reach a quorum while node 0 still streams: the epoch is done, and the shard's
    // previous owner still has it.
    cluster.wait_done(1).await.unwrap();
    let syncing = cluster.nodes[0].node().unwrap().view().shards[&shard].status == ShardStatus::ActiveSync;
    assert!(syncing, "node 0 is still streaming when the epoch is done (pace the stream more)");
    assert_eq!(
        cluster.nodes[source].node().unwrap().view().shards.get(&shard).map(|r| r.status),
        Some(ShardStatus::LockedToMove)
    );
    cluster.wait_all_active(0, 1).await.unwrap();
    wait_attested(&cluster, 0, 1, blobs.len()).await;
    cluster
        .wait_view(source, "the locked shard dropped once node 0 attested", move |v| !v.shards.contains_key(&shard))
        .await
        .unwrap();
    let sync = cluster.nodes[0].node().unwrap().view().shards[&shard].sync.clone().unwrap();
    assert_eq!((sync.blobs_done, sync.pending), (blobs.len() as u64, 0), "streamed to the end: {sync:?}");
    checker.abort();
    assert!(violations.lock().unwrap().is_empty(), "views with syncing shards and a count of 0: {violations:?}");
    cluster.assert_no_holes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_cut_at_the_servers_item_limit_is_resumed_not_taken_as_the_end() {
    let (cluster, blobs) = cluster_with_blobs(50, |c| c.stream.max_items = 7).await.unwrap();
    let c0 = cluster.committee().await.unwrap();
    let c1 = cluster.next_epoch(cluster.weighted(0, 2)).await.unwrap();
    cluster.wait_all_active(0, 1).await.unwrap();
    let me = cluster.nodes[0].id.clone();
    for shard in c1.shards_of(&me).into_iter().filter(|s| c0.owner(*s) != Some(&me)) {
        let record = cluster.nodes[0].node().unwrap().view().shards[&shard].clone();
        let sync = record.sync.unwrap();
        assert_eq!(
            (record.status, sync.blobs_done, sync.pending),
            (ShardStatus::Active, blobs.len() as u64, 0),
            "shard {shard}: {sync:?}"
        );
    }
    cluster.assert_no_holes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_whose_caller_gave_up_still_holds_off_the_shard_lock() {
    let (cluster, _blobs) = cluster_with_blobs(5, |_| {}).await.unwrap();
    let c0 = cluster.committee().await.unwrap();
    // The next epoch moves one of node 0's shards to node 1.
    let me = cluster.nodes[0].id.clone();
    let shard = c0.shards_of(&me)[0];
    let mut c1 = c0.clone();
    c1.epoch = 1;
    c1.assignment[shard.as_usize()] = cluster.nodes[1].id.clone();
    // A blob whose sliver for that shard is stored on node 0 by hand.
    let enc = erasure::encode(&[3u8; 1000], cluster.n_shards).unwrap();
    let mut client = cluster.sync_client(0).await.unwrap();
    client
        .store_metadata(pb::StoreMetadataRequest {
            blob_id: enc.blob_id.0.to_vec(),
            metadata: Some(enc.metadata.to_proto()),
        })
        .await
        .unwrap();
    fail::cfg("store-sliver-write", "1*sleep(1500)").unwrap();
    let request = pb::StoreSliverRequest {
        blob_id: enc.blob_id.0.to_vec(),
        shard: shard.0,
        data: enc.slivers[shard.as_usize()].clone(),
    };
    let mut impatient = client.clone();
    let gave_up = tokio::time::timeout(Duration::from_millis(200), impatient.store_sliver(request)).await;
    assert!(gave_up.is_err(), "the caller went away while the write was in the store");
    let proposed = Instant::now();
    cluster.control_plane.propose_epoch(&c1).await.unwrap();
    cluster
        .wait_view(0, "the lost shard locked", move |v| {
            v.shards.get(&shard).map(|r| r.status) == Some(ShardStatus::LockedToMove)
        })
        .await
        .unwrap();
    let locked_after = proposed.elapsed();
    fail::remove("store-sliver-write");
    assert!(
        locked_after >= Duration::from_millis(1000),
        "the shard was locked {locked_after:?} after the proposal, under a write still running"
    );
    assert!(
        cluster.shard_contents(0, shard).unwrap().iter().any(|(b, _)| *b == enc.blob_id),
        "the write landed before the lock"
    );
    tokio::time::timeout(WAIT, async {
        for i in 0..4 {
            cluster.wait_all_active(i, 1).await.unwrap();
        }
    })
    .await
    .unwrap();
}
