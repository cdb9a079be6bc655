//! The certified index on the nodes (the blob-registry issue): etcd holds control state only,
//! certificates are compact and verified by every node, every node learns every certified blob
//! (also one only a single peer knows), and the cluster works at tens of thousands of blobs.
#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use ferry_e2e::{Cluster, cluster_with_blobs, status};
use ferry_proto::v1 as pb;
use ferry_shared::failpoints::fail;
use ferry_shared::{
    certificate::{Certificate, CertificateBuilder, CommitteeKeys},
    erasure,
    types::{BlobId, NodeStatus, ShardIndex},
};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Stores `data` the way a client does, but delivers its certificate only to the nodes `only`:
/// the blob is certified, yet only their indexes know it.
async fn store_known_to(cluster: &Cluster, data: &[u8], only: &[usize]) -> BlobId {
    let committee = Arc::new(cluster.committee().await.unwrap());
    let keys = CommitteeKeys::new(committee.clone()).unwrap();
    let enc = erasure::encode(data, cluster.n_shards).unwrap();
    let mut builder = CertificateBuilder::new(&cluster.name, enc.blob_id, &keys);
    for (i, node) in cluster.nodes.iter().enumerate() {
        let shards = committee.shards_of(&node.id);
        let upload = pb::BlobUpload {
            blob_id: enc.blob_id.0.to_vec(),
            metadata: Some(enc.metadata.to_proto()),
            slivers: shards
                .iter()
                .map(|s| pb::SliverUpload { shard: s.0, data: enc.slivers[s.as_usize()].clone() })
                .collect(),
        };
        let mut client = cluster.sync_client(i).await.unwrap();
        let stored = client
            .store_blobs(pb::StoreBlobsRequest { blobs: vec![upload], skip_confirmations: false })
            .await
            .unwrap()
            .into_inner();
        let confirmation = stored.blobs[0].confirmation.clone().expect("the owner confirms");
        builder.add(&node.id, &confirmation.signature).unwrap();
    }
    let (certificate, dropped) = builder.build().unwrap();
    assert!(dropped.is_empty());
    for &i in only {
        let mut client = cluster.sync_client(i).await.unwrap();
        let answer = client
            .certify_blobs(pb::CertifyBlobsRequest {
                blobs: vec![pb::CertifiedBlob {
                    blob_id: enc.blob_id.0.to_vec(),
                    certificate: Some(certificate.to_proto()),
                }],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.errors, vec![String::new()]);
    }
    enc.blob_id
}

fn certified_ids(cluster: &Cluster, i: usize) -> BTreeSet<BlobId> {
    let (page, _) = cluster.nodes[i].node().unwrap().store.list_certified(None, None, usize::MAX).unwrap();
    page.into_iter().map(|(id, _)| id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blobs_live_on_the_nodes_with_compact_certificates_and_etcd_never_grows_with_them() {
    let mut cluster = Cluster::new(4, 8).await.unwrap();
    cluster.start_genesis().await.unwrap();
    let before = cluster.control_plane.footprint().await.unwrap();
    let blobs = cluster.store_random_blobs(300, 2000, 3).await.unwrap();
    let after = cluster.control_plane.footprint().await.unwrap();
    assert_eq!(before.0, after.0, "no key per blob in etcd: {before:?} -> {after:?}");
    assert!(after.1.abs_diff(before.1) < 256, "etcd's bytes did not grow with 300 blobs: {before:?} -> {after:?}");
    // Every node's index has every blob, its counts say so, and a certificate is small and
    // verifies against the committee.
    let committee = Arc::new(cluster.committee().await.unwrap());
    let keys = CommitteeKeys::new(committee.clone()).unwrap();
    for i in 0..4 {
        let s = status(&mut cluster.sync_client(i).await.unwrap()).await.unwrap();
        assert_eq!(s.certified_count, 300, "node {i}");
        for shard in s.shards {
            assert_eq!(shard.sliver_count, 300, "node {i} shard {}", shard.shard);
        }
    }
    let mut client = cluster.sync_client(2).await.unwrap();
    let answer = client
        .get_certificates(pb::GetCertificatesRequest {
            blob_ids: blobs.iter().take(50).map(|(id, _)| id.0.to_vec()).collect(),
            include_metadata: false,
        })
        .await
        .unwrap()
        .into_inner();
    for (entry, (id, _)) in answer.blobs.iter().zip(&blobs) {
        let certificate = Certificate::from_proto(entry.certificate.as_ref().unwrap()).unwrap();
        assert!(certificate.encoded_len() < 110, "{} bytes", certificate.encoded_len());
        certificate.verify(&cluster.name, id, &keys).unwrap();
        assert!(certificate.verify(&cluster.name, &BlobId([1; 32]), &keys).is_err());
    }
    // A forged certificate (signers that did not sign) is refused by every node.
    let mut forged = Certificate::from_proto(answer.blobs[0].certificate.as_ref().unwrap()).unwrap();
    forged.signature = Certificate::from_proto(answer.blobs[1].certificate.as_ref().unwrap()).unwrap().signature;
    let enc = erasure::encode(b"never stored", cluster.n_shards).unwrap();
    for i in 0..4 {
        let errors = cluster
            .sync_client(i)
            .await
            .unwrap()
            .certify_blobs(pb::CertifyBlobsRequest {
                blobs: vec![pb::CertifiedBlob {
                    blob_id: enc.blob_id.0.to_vec(),
                    certificate: Some(forged.to_proto()),
                }],
            })
            .await
            .unwrap()
            .into_inner()
            .errors;
        assert!(errors[0].contains("FERRY-CERT-002"), "node {i}: {errors:?}");
    }
    cluster.check_blobs(&blobs[..20]).await.unwrap();
    cluster.assert_no_holes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_node_learns_blobs_only_one_peer_knows_before_it_counts_as_recovered() {
    let (mut cluster, mut blobs) = cluster_with_blobs(20, |c| {
        // Long enough that the node waits for the slow peer rather than settling for a quorum;
        // and no background anti-entropy, so the others do not learn those blobs meanwhile.
        c.index.catch_up_deadline_ms = 30_000;
        c.index.anti_entropy_interval_ms = 3_600_000;
    })
    .await
    .unwrap();
    // Ten certified blobs only node 1's index knows (their certificates reached only it).
    let mut rng = StdRng::seed_from_u64(11);
    let mut only_one = Vec::new();
    for _ in 0..10 {
        let mut data = vec![0u8; rng.gen_range(1..2000)];
        rng.fill(&mut data[..]);
        let id = store_known_to(&cluster, &data, &[1]).await;
        only_one.push(id);
        blobs.push((id, data));
    }
    for i in [0, 2] {
        assert!(only_one.iter().all(|id| !certified_ids(&cluster, i).contains(id)), "node {i} does not know them");
    }
    // Node 3 is wiped and recovers; node 1 answers its index questions slowly.
    fail::cfg("index-digests", &format!("return({}:3000)", cluster.nodes[1].id)).unwrap();
    cluster.stop_node(3).await.unwrap();
    cluster.wipe(3).unwrap();
    let started = Instant::now();
    cluster.start_node(3).await.unwrap();
    let view = cluster.wait_all_active(3, 0).await.unwrap();
    fail::remove("index-digests");
    assert!(view.index_caught_up);
    assert!(started.elapsed() >= Duration::from_secs(3), "it waited for the slow peer: {:?}", started.elapsed());
    // The moment it is Active, it holds every blob, those only node 1 knew included.
    let known = certified_ids(&cluster, 3);
    assert!(only_one.iter().all(|id| known.contains(id)), "its index learned them from node 1");
    cluster.check_shards_match_encoding(3, &blobs).unwrap();
    let report = cluster.assert_no_holes().await.unwrap();
    assert_eq!(report.certified, blobs.len() as u64);
    // The audit sees that nodes 0 and 2 still lack those blobs in their indexes (their slivers
    // they hold: the writer stored them); background anti-entropy is off in this test.
    let lagging: Vec<u64> = report.nodes.iter().map(|n| n.index_missing).collect();
    assert_eq!(lagging, vec![10, 0, 10, 0]);
    cluster.check_blobs(&blobs).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_blobs_through_status_an_epoch_change_a_wipe_and_read_back() {
    const BLOBS: usize = 20_000;
    let mut cluster = Cluster::new(4, 8).await.unwrap();
    let c0 = cluster.start_genesis().await.unwrap();
    for i in 0..4 {
        cluster.start_recovery(i).await.unwrap();
    }
    let footprint = cluster.control_plane.footprint().await.unwrap();
    // Distinct blobs of 8 to 264 bytes (random short blobs would repeat).
    let mut rng = StdRng::seed_from_u64(5);
    let data: Vec<Vec<u8>> = (0..BLOBS as u64)
        .map(|i| {
            let mut d = i.to_be_bytes().to_vec();
            d.extend((0..rng.gen_range(0..=256)).map(|_| rng.r#gen::<u8>()));
            d
        })
        .collect();
    let started = Instant::now();
    let client = cluster.client();
    let mut blobs = Vec::with_capacity(BLOBS);
    for chunk in data.chunks(1024) {
        let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
        for (stored, d) in client.store_many(&refs).await.unwrap().into_iter().zip(chunk) {
            blobs.push((stored.unwrap(), d.clone()));
        }
    }
    eprintln!("stored {BLOBS} blobs in {:?}", started.elapsed());
    assert_eq!(cluster.control_plane.footprint().await.unwrap().0, footprint.0, "no key per blob in etcd");
    // A store succeeds once members owning a quorum of shards took its certificate; a member
    // that missed one (a timeout under load) learns it from its peers.
    for i in 0..4 {
        let node = cluster.nodes[i].node().unwrap().clone();
        ferry_e2e::wait_until(&format!("node {i}'s index holds every blob"), || {
            let node = node.clone();
            async move { Ok(node.store.counts()?.certified.count == BLOBS as u64) }
        })
        .await
        .unwrap();
    }
    // Status from counts, on every node.
    for i in 0..4 {
        let t = Instant::now();
        let s = status(&mut cluster.sync_client(i).await.unwrap()).await.unwrap();
        assert_eq!(s.certified_count, BLOBS as u64);
        assert!(s.shards.iter().all(|r| r.sliver_count == BLOBS as u64), "node {i}: {:?}", s.shards);
        eprintln!("status of node {i} in {:?}", t.elapsed());
    }
    let report = ferryctl::status::collect(&cluster.control_plane, &cluster.connector_as(ferry_e2e::CLIENT).unwrap())
        .await
        .unwrap();
    assert_eq!(report.blobs, BLOBS as u64);
    // An epoch change moves shards to node 0 by shard sync.
    let started = Instant::now();
    let mut members: Vec<_> = cluster.nodes.iter().map(|n| n.member(1)).collect();
    members[0].weight = 3;
    let c1 = cluster.next_epoch(members).await.unwrap();
    for i in 0..4 {
        cluster.wait_all_active(i, 1).await.unwrap();
    }
    cluster.wait_done(1).await.unwrap();
    eprintln!("epoch change with shard moves in {:?}", started.elapsed());
    let me = cluster.nodes[0].id.clone();
    let gained: Vec<ShardIndex> = c1.shards_of(&me).into_iter().filter(|s| c0.owner(*s) != Some(&me)).collect();
    assert!(!gained.is_empty());
    for shard in gained {
        let record = cluster.nodes[0].node().unwrap().view().shards[&shard].clone();
        let sync = record.sync.expect("filled by shard sync");
        assert_eq!((sync.blobs_done, sync.pending), (BLOBS as u64, 0), "shard {shard} by shard sync");
    }
    // Node 2 is wiped and recovers every sliver blob by blob.
    let started = Instant::now();
    cluster.stop_node(2).await.unwrap();
    cluster.wipe(2).unwrap();
    cluster.start_node(2).await.unwrap();
    cluster
        .wait_view(2, "recovering", |v| matches!(v.status(), NodeStatus::RecoveryInProgress(_) | NodeStatus::Active))
        .await
        .unwrap();
    ferry_e2e::wait_until("node 2 recovered", || {
        let view = cluster.nodes[2].node().unwrap().view();
        let id = cluster.nodes[2].id.clone();
        async move {
            Ok(view.status() == NodeStatus::Active
                && view.owned(&id).iter().all(|s| view.shards[s].status == ferry_shared::ShardStatus::Active))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", cluster.nodes[2].recovery.as_ref().unwrap().recovery.status()));
    eprintln!("wiped node recovered {BLOBS} blobs in {:?}", started.elapsed());
    let report = cluster.assert_no_holes().await.unwrap();
    assert_eq!(report.certified, BLOBS as u64);
    // Read back a seeded sample (every blob is audited above).
    let mut rng = StdRng::seed_from_u64(9);
    let sample: Vec<_> = (0..300).map(|_| blobs[rng.gen_range(0..BLOBS)].clone()).collect();
    cluster.check_blobs(&sample).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gained_shards_blobs_this_node_has_no_certificate_of_come_with_the_sync_from_the_source() {
    let (cluster, mut blobs) = cluster_with_blobs(20, |c| {
        // The index must not learn them on its own meanwhile: only the shard syncs can.
        c.index.anti_entropy_interval_ms = 3_600_000;
    })
    .await
    .unwrap();
    let c0 = cluster.committee().await.unwrap();
    let me = cluster.nodes[0].id.clone();
    let members = cluster.weighted(0, 3);
    let plan = ferry_shared::committee::rebalance(&c0, members.clone()).unwrap();
    let gained: Vec<ShardIndex> = plan.shards_of(&me).iter().copied().filter(|s| c0.owner(*s) != Some(&me)).collect();
    let sources: Vec<usize> =
        gained.iter().map(|s| cluster.nodes.iter().position(|n| Some(&n.id) == c0.owner(*s)).unwrap()).collect();
    // Ten certified blobs whose certificates reached only the gained shards' previous owners:
    // the streams carry slivers alone, so node 0 must ask the sources for what it lacks.
    let mut rng = StdRng::seed_from_u64(12);
    let mut only_sources = Vec::new();
    for _ in 0..10 {
        let mut data = vec![0u8; rng.gen_range(1..2000)];
        rng.fill(&mut data[..]);
        let id = store_known_to(&cluster, &data, &sources).await;
        only_sources.push(id);
        blobs.push((id, data));
    }
    assert!(only_sources.iter().all(|id| !certified_ids(&cluster, 0).contains(id)), "node 0 does not know them");

    let next = cluster.next_epoch(members).await.unwrap();
    let view = cluster.wait_all_active(0, next.epoch).await.unwrap();
    for shard in &gained {
        let sync = view.shards[shard].sync.clone().expect("the gained shard was synced");
        assert_eq!(sync.blobs_done, blobs.len() as u64, "the sync of {shard} stored every blob itself: {sync:?}");
        assert_eq!(sync.pending, 0, "nothing of {shard} was left to blob recovery: {sync:?}");
    }
    let known = certified_ids(&cluster, 0);
    assert!(only_sources.iter().all(|id| known.contains(id)), "node 0 learned their certificates with the syncs");
    cluster.check_shards_match_encoding(0, &blobs).unwrap();
}
