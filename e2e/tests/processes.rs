//! End to end with real processes: `sync-service`, `recovery-service` and etcd run as separate
//! processes of a local cluster (the same code as `ferryctl cluster up`), and are killed with
//! SIGKILL at seeded random points. Every blob must read back byte-identical afterwards, and
//! every node attests at most once per epoch.
#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use ferry_proto::v1 as pb;
use ferry_shared::{
    client::BlobClient,
    control_plane::{ControlPlane, EpochPhase},
    types::{BlobId, NodeId},
};
use ferryctl::{
    epoch::{self, MemberChanges},
    local::{LocalCluster, UpOptions},
};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn bin_dir() -> PathBuf {
    // tests run from target/<profile>/deps; the binaries are in target/<profile>.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    assert!(dir.join("sync-service").exists(), "build the binaries first (`make test` does): {}", dir.display());
    dir
}

async fn up(dir: &std::path::Path, sync_extra: &str) -> LocalCluster {
    let options = UpOptions {
        nodes: 4,
        shards: 8,
        dir: dir.to_path_buf(),
        bin_dir: bin_dir(),
        sync_extra: sync_extra.into(),
        recovery_extra: "[recovery]\nretry_initial_ms = 50\nretry_max_ms = 500\n".into(),
        tls: true,
    };
    LocalCluster::up(&options).await.unwrap()
}

async fn store_blobs(cluster: &LocalCluster, cp: &ControlPlane, n: usize, seed: u64) -> Vec<(BlobId, Vec<u8>)> {
    let client = BlobClient::new(cp.clone(), cluster.connector().unwrap(), Duration::from_secs(10));
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for _ in 0..n {
        let mut data = vec![0u8; rng.gen_range(0..3000)];
        rng.fill(&mut data[..]);
        out.push((client.store(&data).await.unwrap(), data));
    }
    out
}

async fn status(cluster: &LocalCluster, i: usize) -> Option<pb::GetStatusResponse> {
    cluster.sync_status(i).await
}

/// The last lines of node `i`'s service logs, for a failure message.
fn log_tails(cluster: &LocalCluster, i: usize) -> String {
    let mut out = String::new();
    for service in ["sync-service", "recovery-service"] {
        let path = cluster.dir.join(format!("logs/{}-{service}.log", cluster.nodes[i].id));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = if text.contains("Error:") {
            ferryctl::local::fatal_error(&text)
        } else {
            lines[lines.len().saturating_sub(25)..].join("\n")
        };
        out.push_str(&format!("--- last lines of {}:\n{tail}\n", path.display()));
    }
    out
}

/// Polls a node's GetStatus (another process: no in-process signal to await) until `pred`.
async fn wait_status(
    cluster: &LocalCluster,
    i: usize,
    what: &str,
    pred: impl Fn(&pb::GetStatusResponse) -> bool,
) -> pb::GetStatusResponse {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(s) = status(cluster, i).await {
            if pred(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for node {i}: {what}; last status {s:?}\n{}", log_tails(cluster, i));
            }
        } else if Instant::now() > deadline {
            panic!("timed out waiting for node {i}: {what}; node unreachable");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn all_active(epoch: u64) -> impl Fn(&pb::GetStatusResponse) -> bool {
    move |s| {
        s.epoch == epoch
            && s.node_status == pb::NodeStatus::Active as i32
            && s.shards
                .iter()
                .filter(|r| r.status != pb::ShardStatus::LockedToMove as i32)
                .all(|r| r.status == pb::ShardStatus::Active as i32)
    }
}

async fn check_reads(cluster: &LocalCluster, cp: &ControlPlane, blobs: &[(BlobId, Vec<u8>)]) {
    let client = BlobClient::new(cp.clone(), cluster.connector().unwrap(), Duration::from_secs(10));
    for (id, data) in blobs {
        assert_eq!(&client.read(id).await.unwrap(), data, "blob {id}");
    }
}

/// `ferryctl audit`: every node holds a verified sliver of every certified blob in every shard
/// it owns (reading blobs through other owners cannot show a node with empty shards).
async fn assert_no_holes(cluster: &LocalCluster, cp: &ControlPlane) {
    let report = ferryctl::audit::run(cp, &cluster.connector().unwrap()).await.unwrap();
    assert_eq!(report.holes(), 0, "the audit found holes:\n{}", ferryctl::audit::render(&report));
}

/// Every node attested `epoch`, and its attestation key was written exactly once (a second
/// attestation would have overwritten it).
async fn assert_one_attestation_each(cp: &ControlPlane, epoch: u64, nodes: &[NodeId]) {
    for n in nodes {
        assert_eq!(
            cp.attestation_writes(epoch, n).await.unwrap(),
            1,
            "exactly one attestation of {n} for epoch {epoch}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_scenario_passes_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let result = ferryctl::demo::run(&ferryctl::demo::DemoOptions {
        dir: dir.path().join("demo"),
        bin_dir: bin_dir(),
        blobs: 120,
    })
    .await;
    result.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_the_previous_owner_mid_stream_loses_nothing() {
    for seed in [11u64, 12, 13] {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = up(dir.path(), "[stream]\nmax_bytes_per_sec = 50000\n[shard_sync]\nbatch_items = 4\ninitial_backoff_ms = 50\nmax_backoff_ms = 500\n").await;
        let cp = cluster.control_plane().await.unwrap();
        let blobs = store_blobs(&cluster, &cp, 80, seed).await;
        let plan =
            epoch::plan(&cp, &MemberChanges { weights: vec![(cluster.nodes[0].id.clone(), 3)], ..Default::default() })
                .await
                .unwrap();
        let sources: Vec<NodeId> =
            plan.moves.iter().filter(|m| m.to == cluster.nodes[0].id).map(|m| m.from.clone()).collect();
        cp.propose_epoch(&plan.next).await.unwrap();
        // Kill one previous owner at a random point of the transfer.
        let mut rng = StdRng::seed_from_u64(seed);
        let victim = cluster.index(sources[rng.gen_range(0..sources.len())].as_str()).unwrap();
        let after = rng.gen_range(4..60u64);
        wait_status(&cluster, 0, "sync progress", |s| {
            s.shards.iter().filter_map(|r| r.sync.as_ref()).any(|p| p.blobs_done >= after)
        })
        .await;
        cluster.kill_node(victim).unwrap();
        cluster.start_node(victim).unwrap();
        cluster.wait_healthy(victim).await.unwrap();
        for i in 0..4 {
            wait_status(&cluster, i, "all Active at epoch 1", all_active(1)).await;
        }
        let s = status(&cluster, 0).await.unwrap();
        for r in s.shards.iter().filter(|r| r.sync.is_some()) {
            assert_eq!(r.sliver_count, blobs.len() as u64, "seed {seed}: shard {} complete", r.shard);
        }
        check_reads(&cluster, &cp, &blobs).await;
        assert_no_holes(&cluster, &cp).await;
        let nodes: Vec<NodeId> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
        assert_one_attestation_each(&cp, 1, &nodes).await;
        cluster.down().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_the_recovering_node_mid_recovery_still_completes_once() {
    for seed in [21u64, 22, 23] {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = up(dir.path(), "").await;
        let cp = cluster.control_plane().await.unwrap();
        let blobs = store_blobs(&cluster, &cp, 150, seed).await;
        let victim = 3;
        cluster.wipe_node(victim).unwrap();
        cluster.start_node(victim).unwrap();
        cluster.wait_healthy(victim).await.unwrap();
        // An epoch change while it recovers, then SIGKILL at a random point.
        let plan = epoch::plan(
            &cp,
            &MemberChanges { weights: vec![(cluster.nodes[victim].id.clone(), 2)], ..Default::default() },
        )
        .await
        .unwrap();
        cp.propose_epoch(&plan.next).await.unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1500))).await; // the random kill point
        cluster.kill_node(victim).unwrap();
        cluster.start_node(victim).unwrap();
        cluster.wait_healthy(victim).await.unwrap();
        for i in 0..4 {
            wait_status(&cluster, i, "all Active at epoch 1", all_active(1)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while cp.current().await.unwrap() != Some(EpochPhase::Done(1)) {
            assert!(Instant::now() < deadline, "epoch 1 did not finish");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        check_reads(&cluster, &cp, &blobs).await;
        assert_no_holes(&cluster, &cp).await;
        let nodes: Vec<NodeId> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
        assert_one_attestation_each(&cp, 1, &nodes).await;
        cluster.down().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_epoch_change_while_a_node_is_down_brings_it_back_on_the_catch_up_path() {
    let dir = tempfile::tempdir().unwrap();
    // Shards whose previous owner is the node that is down go to blob recovery after 3 s.
    let mut cluster = up(dir.path(), "[shard_sync]\ngive_up_after_ms = 3000\n").await;
    let cp = cluster.control_plane().await.unwrap();
    let mut blobs = store_blobs(&cluster, &cp, 40, 31).await;
    cluster.kill_node(2).unwrap();
    for (epoch, w) in [(1u64, 2u64), (2, 3)] {
        let plan =
            epoch::plan(&cp, &MemberChanges { weights: vec![(cluster.nodes[0].id.clone(), w)], ..Default::default() })
                .await
                .unwrap();
        cp.propose_epoch(&plan.next).await.unwrap();
        for i in [0, 1, 3] {
            wait_status(&cluster, i, "all Active", all_active(epoch)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while cp.current().await.unwrap() != Some(EpochPhase::Done(epoch)) {
            assert!(Instant::now() < deadline, "epoch {epoch} did not finish");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        blobs.extend(store_blobs(&cluster, &cp, 10, 40 + epoch).await);
    }
    cluster.start_node(2).unwrap();
    cluster.wait_healthy(2).await.unwrap();
    wait_status(&cluster, 2, "caught up and Active at epoch 2", all_active(2)).await;
    let a = cp.attestation(2, &cluster.nodes[2].id).await.unwrap().expect("node 2 attests epoch 2");
    assert_eq!(a.attested_by, "recovery-service", "the catch-up path attests through recovery");
    check_reads(&cluster, &cp, &blobs).await;
    assert_no_holes(&cluster, &cp).await;
    cluster.down().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_phase_flip_lost_with_its_attester_is_completed_by_the_others() {
    let dir = tempfile::tempdir().unwrap();
    // Node 2 gains shards by a paced sync, so it attests last, completing the quorum.
    let mut cluster =
        up(dir.path(), "[stream]\nmax_bytes_per_sec = 20000\n[shard_sync]\ngive_up_after_ms = 3000\n").await;
    let cp = cluster.control_plane().await.unwrap();
    let blobs = store_blobs(&cluster, &cp, 40, 51).await;
    let node2 = cluster.nodes[2].id.clone();
    let plan =
        epoch::plan(&cp, &MemberChanges { weights: vec![(node2.clone(), 2)], ..Default::default() }).await.unwrap();
    assert!(plan.moves.iter().any(|m| m.to == node2), "node 2 gains shards");
    cluster.kill_node(3).unwrap(); // without node 3, node 2's attestation completes the quorum
    // Node 2's sync-service dies the moment it has stored the quorum-completing attestation,
    // before the phase flip: a crash in the window, as SIGKILL would be.
    cluster
        .restart_service_with_env(2, "sync-service", &[("FAILPOINTS", "cp-before-done-flip=return(crash)")])
        .unwrap();
    cluster.wait_healthy(2).await.unwrap();
    cp.propose_epoch(&plan.next).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.sync_alive(2) {
        assert!(
            Instant::now() < deadline,
            "node 2 did not reach the crash window\n{}\n{}\n{}",
            log_tails(&cluster, 2),
            log_tails(&cluster, 0),
            log_tails(&cluster, 1)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cp.attestation(1, &node2).await.unwrap().is_some(), "node 2 attested before it died");
    // Nodes 0 and 1 saw the attestation and complete the flip; the cluster is not wedged.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cp.current().await.unwrap() != Some(EpochPhase::Done(1)) {
        assert!(Instant::now() < deadline, "epoch 1 never became Done: the lost flip wedged the cluster");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the next epoch can start.
    cluster.start_node(2).unwrap();
    cluster.start_node(3).unwrap();
    for i in 0..4 {
        cluster.wait_healthy(i).await.unwrap();
        wait_status(&cluster, i, "all Active at epoch 1", all_active(1)).await;
    }
    let next =
        epoch::plan(&cp, &MemberChanges { weights: vec![(node2.clone(), 1)], ..Default::default() }).await.unwrap();
    cp.propose_epoch(&next.next).await.unwrap();
    for i in 0..4 {
        wait_status(&cluster, i, "all Active at epoch 2", all_active(2)).await;
    }
    check_reads(&cluster, &cp, &blobs).await;
    assert_no_holes(&cluster, &cp).await;
    let nodes: Vec<NodeId> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
    assert_one_attestation_each(&cp, 2, &nodes).await;
    cluster.down().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_few_seeded_chaos_histories_come_to_rest_whole() {
    let dir = tempfile::tempdir().unwrap();
    let options = ferryctl::chaos::ChaosOptions {
        first_seed: 7,
        seeds: 2,
        steps: 8,
        dir: dir.path().to_path_buf(),
        bin_dir: bin_dir(),
    };
    let outcomes = ferryctl::chaos::run(&options).await.unwrap();
    let violations: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.violation.as_ref().map(|v| format!("seed {}: {v} (steps: {})", o.seed, o.steps.join(", "))))
        .collect();
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_while_active_learns_and_repairs_what_it_missed_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = up(dir.path(), "").await;
    let cp = cluster.control_plane().await.unwrap();
    let mut blobs = store_blobs(&cluster, &cp, 20, 41).await;
    let victim = 3;
    let pid = cluster.nodes[victim].sync_pid;
    let learned_before = status(&cluster, victim).await.unwrap().index_learned;
    // Frozen: no client write, no certificate and no peer reaches it; the others still own a
    // quorum of shards (6 of 8), so stores succeed without it.
    cluster.pause_node(victim);
    let client = BlobClient::new(cp.clone(), cluster.connector().unwrap(), Duration::from_secs(2));
    let mut rng = StdRng::seed_from_u64(42);
    let data: Vec<Vec<u8>> = (0..30)
        .map(|_| {
            let mut d = vec![0u8; rng.gen_range(1..3000)];
            rng.fill(&mut d[..]);
            d
        })
        .collect();
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    for (stored, d) in client.store_many(&refs).await.unwrap().into_iter().zip(&data) {
        blobs.push((stored.expect("a quorum of the others stores it"), d.clone()));
    }
    cluster.resume_node(victim);
    // It was never restarted: it learns the certificates from its peers and repairs its shards.
    let s = wait_status(&cluster, victim, "every owned shard holds every blob", |s| {
        s.certified_count == blobs.len() as u64 && s.shards.iter().all(|r| r.sliver_count == blobs.len() as u64)
    })
    .await;
    assert_eq!(cluster.nodes[victim].sync_pid, pid, "the same process");
    assert!(s.index_learned >= learned_before + 30, "learned from peers, not from the client: {s:?}");
    assert_eq!(s.pending_count, 0);
    assert_no_holes(&cluster, &cp).await;
    check_reads(&cluster, &cp, &blobs).await;
    let mut cluster = cluster;
    cluster.down().unwrap();
}
