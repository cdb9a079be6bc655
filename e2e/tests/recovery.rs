//! recovery-service with real sync-services and etcd: the main scenario (a recovering node
//! gains shards at an epoch change) and the regressions around it.
#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use ferry_e2e::{Cluster, WAIT, cluster_with_blobs, describe};
use ferry_proto::v1 as pb;
use ferry_recovery_service::store::RecoveryStore;
use ferry_shared::{
    failpoints::fail,
    types::{NodeStatus, ShardIndex, ShardStatus},
};

/// Crashes node `i` into recovery: stop both services, wipe its stores, optionally pre-set
/// the pause flag, restart both.
async fn wipe_and_restart(cluster: &mut Cluster, i: usize, paused: bool) {
    cluster.stop_recovery(i).await.unwrap();
    cluster.stop_sync(i).await.unwrap();
    cluster.wipe(i).unwrap();
    if paused {
        RecoveryStore::open(&cluster.nodes[i].recovery_dir).unwrap().set_paused(true).unwrap();
    }
    cluster.start_sync(i).await.unwrap();
    cluster
        .wait_view(i, "RecoveryInProgress after a wipe", |v| matches!(v.status(), NodeStatus::RecoveryInProgress(_)))
        .await
        .unwrap();
    cluster.start_recovery(i).await.unwrap();
}

/// What the rule-3 timeline records, in the order one task saw it.
#[derive(Debug, Clone, Copy)]
enum Observed {
    /// sync-service's running-sync count changed.
    Syncs(u32),
    /// recovery-service's count of recovered blobs changed.
    Recovered(u64),
}

async fn recovery_status(cluster: &Cluster, i: usize) -> pb::RecoveryStatus {
    cluster.nodes[i].recovery.as_ref().unwrap().recovery.status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recovering_node_fills_gained_shards_by_shard_sync_and_attests_once() {
    let (mut cluster, blobs) = cluster_with_blobs(120, |c| c.stream.max_bytes_per_sec = 12_000).await.unwrap();
    let c0 = cluster.committee().await.unwrap();
    wipe_and_restart(&mut cluster, 3, true).await;
    let me = cluster.nodes[3].id.clone();
    assert!(recovery_status(&cluster, 3).await.paused);

    // The epoch change gives node 3 more shards while it recovers.
    let members = cluster.nodes.iter().enumerate().map(|(i, n)| n.member(if i == 3 { 3 } else { 1 })).collect();
    let c1 = cluster.next_epoch(members).await.unwrap();
    let gained: Vec<ShardIndex> = c1.shards_of(&me).into_iter().filter(|s| c0.owner(*s) != Some(&me)).collect();
    assert!(!gained.is_empty());
    let node = cluster.nodes[3].node().unwrap().clone();
    let view = cluster.wait_view(3, "epoch 1 applied while recovering", |v| v.epoch() == 1).await.unwrap();
    assert_eq!(view.status(), NodeStatus::RecoveryInProgress(1), "{}", describe(&view));
    for s in &gained {
        assert_eq!(view.shards[s].status, ShardStatus::ActiveSync, "gained shard {s} is filled by shard sync");
    }
    assert!(node.counter.current() > 0, "shard syncs are running");

    // One task watches sync-service's own running-sync count (its published view) and
    // recovery's count of recovered blobs, and records each change in the order it saw them:
    // blob recovery must never progress while sync-service counts a running sync. (Recovery
    // is paused until the syncs are running, so no blob was in flight when they started.)
    let timeline: Arc<Mutex<Vec<Observed>>> = Arc::default();
    let mut counts = node.subscribe();
    let mut progress = cluster.nodes[3].recovery.as_ref().unwrap().recovery.subscribe();
    let t = timeline.clone();
    let progress_task = tokio::spawn(async move {
        t.lock().unwrap().push(Observed::Syncs(counts.borrow_and_update().running_syncs));
        loop {
            tokio::select! {
                r = counts.changed() => {
                    if r.is_err() { return }
                    t.lock().unwrap().push(Observed::Syncs(counts.borrow_and_update().running_syncs));
                }
                r = progress.changed() => {
                    if r.is_err() { return }
                    t.lock().unwrap().push(Observed::Recovered(progress.borrow_and_update().blobs_recovered));
                }
            }
        }
    });

    // Resume while the syncs still run: recovery must wait for them.
    let mut rclient = ferry_proto::v1::recovery_service_client::RecoveryServiceClient::new(
        cluster.recovery_channel_as(3, ferry_e2e::CLIENT).unwrap(),
    );
    rclient.resume_recovery(pb::ResumeRecoveryRequest {}).await.unwrap();
    let mut watch = cluster.nodes[3].recovery.as_ref().unwrap().recovery.subscribe();
    tokio::time::timeout(WAIT, watch.wait_for(|s| s.waiting_for_syncs || s.blobs_recovered > 0))
        .await
        .unwrap()
        .unwrap();

    cluster.wait_all_active(3, 1).await.unwrap();
    progress_task.abort();

    // Rule 3: no blob was recovered while a shard sync was running.
    let timeline = timeline.lock().unwrap().clone();
    let (mut syncs, mut recovered, mut while_running) = (0, 0, 0); // the first event is a count
    for event in &timeline {
        match event {
            Observed::Syncs(n) => syncs = *n,
            Observed::Recovered(n) if *n > recovered => {
                assert_eq!(
                    syncs, 0,
                    "blob recovery progressed to {n} while sync-service counted {syncs} running syncs; timeline {timeline:?}"
                );
                recovered = *n;
            }
            Observed::Recovered(_) => {}
        }
        if syncs > 0 {
            while_running += 1;
        }
    }
    assert!(while_running > 0, "the timeline saw the syncs running: {timeline:?}");
    let status = recovery_status(&cluster, 3).await;
    assert!(status.blobs_recovered > 0, "kept shards were filled by blob recovery: {status:?}");
    println!("main scenario: {status:?}");

    // Gained shards were filled by shard sync, every sliver counted.
    let view = cluster.nodes[3].node().unwrap().view();
    for s in &gained {
        let sync = view.shards[s].sync.clone().unwrap();
        assert_eq!(sync.blobs_done, blobs.len() as u64, "shard {s} filled by shard sync: {sync:?}");
    }
    // Exactly one attestation for node 3 and epoch 1, from recovery-service, with complete
    // evidence (so it came after everything completed).
    let attestations: Vec<_> =
        cluster.control_plane.attestations(1).await.unwrap().into_iter().filter(|a| a.node_id == me).collect();
    assert_eq!(attestations.len(), 1);
    assert_eq!(cluster.control_plane.attestation_writes(1, &me).await.unwrap(), 1, "the attestation was written once");
    assert_eq!(attestations[0].attested_by, "recovery-service");
    assert_eq!(attestations[0].evidence.len(), c1.shards_of(&me).len());
    assert!(
        attestations[0].evidence.iter().all(|e| e.blob_count == blobs.len() as u64),
        "{:?}",
        attestations[0].evidence
    );
    let listed = rclient.list_attestations(pb::ListAttestationsRequest {}).await.unwrap().into_inner().attestations;
    assert_eq!(listed.len(), 1);
    cluster.check_shards_match_encoding(3, &blobs).unwrap();
    cluster.check_blobs(&blobs).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovery_service_restarted_mid_recovery_resumes_from_its_cursor() {
    let mut cluster = Cluster::new(4, 8).await.unwrap();
    // Small pages, so the cursor is persisted often.
    cluster.tweak_recovery = Box::new(|c| c.recovery.scan_page = 16);
    cluster.start_genesis().await.unwrap();
    for i in 0..4 {
        cluster.start_recovery(i).await.unwrap();
    }
    let blobs = cluster.store_random_blobs(300, 2000, 8).await.unwrap();
    wipe_and_restart(&mut cluster, 2, false).await;
    let mut watch = cluster.nodes[2].recovery.as_ref().unwrap().recovery.subscribe();
    tokio::time::timeout(WAIT, watch.wait_for(|s| s.blobs_recovered >= 60)).await.unwrap().unwrap();
    cluster.stop_recovery(2).await.unwrap();
    let cursor = RecoveryStore::open(&cluster.nodes[2].recovery_dir).unwrap().cursor().unwrap().unwrap();
    assert!(
        cursor.blobs_recovered >= 16 && cursor.shards.values().all(|c| c.after.is_some()),
        "progress was persisted: {cursor:?}"
    );
    cluster.start_recovery(2).await.unwrap();
    cluster.wait_all_active(2, 0).await.unwrap();
    // Counted across both runs, nothing was recovered twice; at most the one page in flight
    // at the stop was recovered but not yet counted.
    let total = cluster.nodes[2].recovery.as_ref().unwrap().recovery.status().blobs_recovered;
    assert!(
        total <= blobs.len() as u64 && total + 16 >= blobs.len() as u64,
        "recovered {total} of {} across the restart",
        blobs.len()
    );
    cluster.check_shards_match_encoding(2, &blobs).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_the_sync_state_stream_makes_the_count_unknown_not_zero_while_sync_service_serves() {
    let (mut cluster, mut blobs) = cluster_with_blobs(40, |_| {}).await.unwrap();
    wipe_and_restart(&mut cluster, 1, true).await;
    let recovery = cluster.nodes[1].recovery.as_ref().unwrap().recovery.clone();
    let mut watch = recovery.subscribe();
    // Only the sync-state stream breaks (and cannot be reopened); sync-service itself keeps
    // serving, so recovery could store slivers if it (wrongly) took the unknown count for zero.
    fail::cfg("sync-state-stream", "return").unwrap();
    tokio::time::timeout(WAIT, watch.wait_for(|s| s.running_syncs.is_none())).await.unwrap().unwrap();
    recovery.set_paused(false).await.unwrap();
    blobs.extend(cluster.store_random_blobs(2, 500, 41).await.unwrap()); // node 1 still takes writes
    tokio::time::timeout(WAIT, watch.wait_for(|s| s.running_syncs.is_none() && s.waiting_for_syncs))
        .await
        .unwrap()
        .unwrap();
    // A measurement window (there is no event for "nothing happened"): recovery waits.
    let window = tokio::time::timeout(Duration::from_secs(2), watch.wait_for(|s| s.blobs_recovered > 0)).await;
    assert!(window.is_err(), "blob recovery progressed while the count was unknown: {:?}", recovery.status());
    fail::remove("sync-state-stream");
    cluster.wait_all_active(1, 0).await.unwrap();
    assert!(recovery.status().blobs_recovered > 0, "recovery went on once the count was known again");
    cluster.check_shards_match_encoding(1, &blobs).unwrap();
    cluster.assert_no_holes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_node_that_missed_two_epochs_catches_up_by_blob_recovery() {
    let (mut cluster, mut blobs) = cluster_with_blobs(30, |_| {}).await.unwrap();
    cluster.stop_recovery(3).await.unwrap();
    cluster.stop_sync(3).await.unwrap();
    for (epoch, weight) in [(1u64, 2u64), (2, 3)] {
        let members =
            cluster.nodes.iter().enumerate().map(|(i, n)| n.member(if i == 0 { weight } else { 1 })).collect();
        cluster.next_epoch(members).await.unwrap();
        for i in 0..3 {
            cluster.wait_all_active(i, epoch).await.unwrap();
        }
        cluster.wait_done(epoch).await.unwrap();
        blobs.extend(cluster.store_random_blobs(10, 1000, 100 + epoch).await.unwrap());
    }
    cluster.start_sync(3).await.unwrap();
    let view = cluster.wait_view(3, "catch-up to epoch 2", |v| v.epoch() == 2).await.unwrap();
    assert_eq!(view.status(), NodeStatus::RecoveryInProgress(2), "{}", describe(&view));
    cluster.start_recovery(3).await.unwrap();
    cluster.wait_all_active(3, 2).await.unwrap();
    let me = cluster.nodes[3].id.clone();
    let a = cluster.control_plane.attestation(2, &me).await.unwrap().expect("attested epoch 2");
    assert_eq!(a.attested_by, "recovery-service");
    assert!(cluster.control_plane.attestation(1, &me).await.unwrap().is_none(), "never attests an epoch it skipped");
    cluster.check_shards_match_encoding(3, &blobs).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_sync_that_fails_for_good_during_recovery_is_covered_by_blob_recovery() {
    let (mut cluster, blobs) = cluster_with_blobs(40, |c| c.shard_sync.give_up_after_ms = 1000).await.unwrap();
    let c0 = cluster.committee().await.unwrap();
    wipe_and_restart(&mut cluster, 3, true).await;
    let members: Vec<_> = cluster.nodes.iter().enumerate().map(|(i, n)| n.member(if i == 3 { 2 } else { 1 })).collect();
    let plan = ferry_shared::committee::rebalance(&c0, members.clone()).unwrap();
    let me = cluster.nodes[3].id.clone();
    let gained: Vec<ShardIndex> = plan.shards_of(&me).into_iter().filter(|s| c0.owner(*s) != Some(&me)).collect();
    // The previous owner of the first gained shard is down during the change.
    let source = cluster.nodes.iter().position(|n| Some(&n.id) == c0.owner(gained[0])).unwrap();
    cluster.stop_sync(source).await.unwrap();
    cluster.next_epoch(members).await.unwrap();
    let g = gained[0];
    cluster
        .wait_view(3, "failed sync leaves ActiveRecover", move |v| {
            v.shards.get(&g).map(|r| r.status) == Some(ShardStatus::ActiveRecover)
        })
        .await
        .unwrap();
    cluster.start_sync(source).await.unwrap();
    cluster.nodes[3].recovery.as_ref().unwrap().recovery.set_paused(false).await.unwrap();
    cluster.wait_all_active(3, 1).await.unwrap();
    cluster.check_shards_match_encoding(3, &blobs).unwrap();
    assert_eq!(cluster.control_plane.attestation_writes(1, &me).await.unwrap(), 1, "one attestation, written once");
    cluster.assert_no_holes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_dropped_while_recovering_never_attests_nor_becomes_active() {
    let (mut cluster, _blobs) = cluster_with_blobs(20, |_| {}).await.unwrap();
    wipe_and_restart(&mut cluster, 3, true).await;
    let members = cluster.nodes.iter().take(3).map(|n| n.member(1)).collect();
    cluster.next_epoch(members).await.unwrap();
    cluster
        .wait_view(3, "Standby after removal", |v| v.status() == NodeStatus::Standby && v.epoch() == 1)
        .await
        .unwrap();
    cluster.nodes[3].recovery.as_ref().unwrap().recovery.set_paused(false).await.unwrap();
    for i in 0..3 {
        cluster.wait_all_active(i, 1).await.unwrap();
    }
    cluster.wait_done(1).await.unwrap();
    // Give recovery every chance to misbehave: wait until it reports idle.
    let mut watch = cluster.nodes[3].recovery.as_ref().unwrap().recovery.subscribe();
    tokio::time::timeout(WAIT, watch.wait_for(|s| s.phase == pb::RecoveryPhase::Idle as i32)).await.unwrap().unwrap();
    let me = cluster.nodes[3].id.clone();
    assert!(cluster.control_plane.attestation(1, &me).await.unwrap().is_none());
    assert!(cluster.control_plane.attestation(0, &me).await.unwrap().is_none());
    assert_eq!(cluster.nodes[3].node().unwrap().view().status(), NodeStatus::Standby);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_with_fewer_than_k_reachable_owners_is_retried_and_reported() {
    let (mut cluster, blobs) = cluster_with_blobs(10, |_| {}).await.unwrap();
    wipe_and_restart(&mut cluster, 0, true).await;
    // Its index learns the blobs from its peers first (without a quorum of peers it would not
    // know what to recover, and would wait).
    cluster.wait_view(0, "index caught up", |v| v.index_caught_up).await.unwrap();
    // 8 shards, k = 4: with nodes 1 and 2 down only node 3's 2 shards are reachable.
    cluster.stop_sync(1).await.unwrap();
    cluster.stop_sync(2).await.unwrap();
    let recovery = cluster.nodes[0].recovery.as_ref().unwrap().recovery.clone();
    recovery.set_paused(false).await.unwrap();
    let mut watch = recovery.subscribe();
    let s = tokio::time::timeout(WAIT, watch.wait_for(|s| s.blobs_failed > 0)).await.unwrap().unwrap().clone();
    assert!(!s.stuck_blobs.is_empty() && s.stuck_blobs[0].last_error.contains("FERRY-RECOVER-002"), "{s:?}");
    // Nothing half-done was stored: node 0's shards are still empty.
    for shard in cluster.nodes[0].node().unwrap().view().owned(&cluster.nodes[0].id) {
        assert!(cluster.shard_contents(0, shard).unwrap().is_empty());
    }
    cluster.start_sync(1).await.unwrap();
    cluster.start_sync(2).await.unwrap();
    cluster.wait_all_active(0, 0).await.unwrap();
    cluster.check_shards_match_encoding(0, &blobs).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_epoch_change_mid_recovery_keeps_the_cursor_of_kept_shards() {
    let (mut cluster, blobs) = cluster_with_blobs(240, |_| {}).await.unwrap();
    let c0 = cluster.committee().await.unwrap();
    // Small pages, so a re-scan from the first blob shows as more than one page of extra work.
    const PAGE: u64 = 16;
    cluster.tweak_recovery = Box::new(|c| c.recovery.scan_page = PAGE as usize);
    wipe_and_restart(&mut cluster, 3, false).await;
    let recovery = cluster.nodes[3].recovery.as_ref().unwrap().recovery.clone();
    let mut watch = recovery.subscribe();
    tokio::time::timeout(WAIT, watch.wait_for(|s| s.blobs_scanned >= 60)).await.unwrap().unwrap();
    recovery.set_paused(true).await.unwrap();
    let scanned_before = recovery.status().blobs_scanned;
    // Node 3 gains shards while recovering: its kept shards keep their cursor.
    let members = cluster.nodes.iter().enumerate().map(|(i, n)| n.member(if i == 3 { 2 } else { 1 })).collect();
    let c1 = cluster.next_epoch(members).await.unwrap();
    let me = cluster.nodes[3].id.clone();
    assert!(c0.shards_of(&me).iter().all(|s| c1.shards_of(&me).contains(s)), "node 3 keeps its shards");
    recovery.set_paused(false).await.unwrap();
    cluster.wait_all_active(3, 1).await.unwrap();
    let status = recovery.status();
    println!(
        "rule 8: {scanned_before} blobs scanned before the epoch change, {} saved from re-scan, {} scanned in all for {} blobs",
        status.rescans_saved,
        status.blobs_scanned,
        blobs.len()
    );
    assert!(scanned_before > PAGE, "the change came after more than a page was scanned: {scanned_before}");
    // Every certified blob was checked once, but for the page in flight at the pause: a scan
    // started over after the epoch change would have checked the first `scanned_before` again.
    assert!(
        status.blobs_scanned <= blobs.len() as u64 + PAGE,
        "the kept shards' scan went on from its cursor: {status:?}"
    );
    assert!(status.rescans_saved >= scanned_before, "{status:?}");
    cluster.check_shards_match_encoding(3, &blobs).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn editing_the_recovery_config_file_changes_blob_concurrency_live() {
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    cluster.start_genesis().await.unwrap();
    cluster.start_recovery(0).await.unwrap();
    let config = cluster.recovery_config(0);
    let file = cluster.dir.path().join("recovery-0.toml");
    std::fs::write(&file, ferry_shared::config::to_toml(&config).unwrap()).unwrap();
    let recovery = cluster.nodes[0].recovery.as_ref().unwrap().recovery.clone();
    let _watch = ferry_recovery_service::apply_config_changes(&recovery, config.clone(), &file).unwrap();
    assert_eq!(recovery.max_concurrent_blobs(), 8);
    let mut edited = config.clone();
    edited.recovery.max_concurrent_blobs = 3;
    std::fs::write(&file, ferry_shared::config::to_toml(&edited).unwrap()).unwrap();
    let watched = recovery.clone();
    ferry_e2e::wait_until("the edited recovery config is applied", || {
        let r = watched.clone();
        async move { Ok(r.max_concurrent_blobs() == 3) }
    })
    .await
    .unwrap();
}
