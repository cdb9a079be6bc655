//! sync-service against a real etcd and real sync-services on loopback ports: shard moves at
//! an epoch change, resume after the previous owner dies mid-stream, a previous owner gone for
//! good, backpressure, and refusal of peers and inputs that are not allowed.
#![allow(clippy::unwrap_used, missing_docs)]

use std::{collections::BTreeMap, time::Duration};

use ferry_e2e::{Cluster, WAIT, describe, status};
use ferry_proto::v1 as pb;
use ferry_shared::{
    crypto::{self, NodeKeypair, StreamShardIntent},
    erasure,
    types::{BlobId, NodeId, ShardIndex, ShardStatus},
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn committee_change_moves_shards_by_shard_sync_and_attests_once() {
    let mut cluster = Cluster::new(4, 8).await.unwrap();
    let c0 = cluster.start_genesis().await.unwrap();
    let blobs = cluster.store_random_blobs(200, 3000, 1).await.unwrap();

    // Node 0 doubles its weight: it gains shards from the others.
    let c1 = cluster.next_epoch(cluster.weighted(0, 3)).await.unwrap();
    let me = cluster.nodes[0].id.clone();
    let gained: Vec<ShardIndex> = c1.shards_of(&me).into_iter().filter(|s| c0.owner(*s) != Some(&me)).collect();
    assert!(!gained.is_empty(), "the new committee must move shards to node 0");
    for i in 0..4 {
        cluster.wait_all_active(i, 1).await.unwrap();
    }
    cluster.wait_done(1).await.unwrap();

    for shard in &gained {
        let previous = c0.owner(*shard).unwrap();
        let view = cluster.nodes[0].node().unwrap().view();
        let record = &view.shards[shard];
        let sync = record.sync.as_ref().expect("gained shard has sync progress");
        assert_eq!(sync.source.as_ref(), Some(previous), "synced from its previous owner");
        assert_eq!(sync.blobs_done, blobs.len() as u64, "every sliver was written exactly once by shard sync");
        assert_eq!(sync.pending, 0);
        // Byte-identical to the previous owner's copy, which is the blob's encoding (the copy
        // itself may already be dropped after the grace period).
        let mine = cluster.shard_contents(0, *shard).unwrap();
        let expected: BTreeMap<BlobId, Vec<u8>> = blobs
            .iter()
            .map(|(id, data)| (*id, erasure::encode(data, 8).unwrap().slivers[shard.as_usize()].clone()))
            .collect();
        let mine_map: BTreeMap<BlobId, Vec<u8>> = mine.into_iter().collect();
        assert_eq!(mine_map, expected, "shard {shard} is byte-identical to the encoding");
    }

    // Lost shards are locked, then dropped after the grace period once the epoch is done.
    for shard in &gained {
        let previous = c0.owner(*shard).unwrap();
        let i = cluster.nodes.iter().position(|n| &n.id == previous).unwrap();
        let s = *shard;
        cluster
            .wait_view(i, &format!("lost shard {shard} dropped"), move |v| !v.shards.contains_key(&s))
            .await
            .unwrap();
    }

    // Exactly one attestation per node for epoch 1, all by sync-service.
    let attestations = cluster.control_plane.attestations(1).await.unwrap();
    let mut by_node: Vec<String> = attestations.iter().map(|a| a.node_id.to_string()).collect();
    by_node.sort();
    assert_eq!(by_node, vec!["node-0", "node-1", "node-2", "node-3"]);
    for a in &attestations {
        assert_eq!(cluster.control_plane.attestation_writes(1, &a.node_id).await.unwrap(), 1, "written once");
        assert_eq!(a.attested_by, "sync-service");

        a.verify(&c1).unwrap();
        assert_eq!(a.evidence.len(), c1.shards_of(&a.node_id).len());
        assert!(
            a.evidence.iter().all(|e| e.blob_count == blobs.len() as u64),
            "evidence counts every blob: {:?}",
            a.evidence
        );
    }
    cluster.check_blobs(&blobs).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_resumes_from_its_cursor_after_the_previous_owner_dies_mid_stream() {
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    // Throttle outgoing streams so the transfer is long enough to interrupt.
    cluster.tweak_sync = Box::new(|c| {
        c.stream.max_bytes_per_sec = 40_000;
        c.shard_sync.batch_items = 4;
    });
    let c0 = cluster.start_genesis().await.unwrap();
    let blobs = cluster.store_random_blobs(60, 4000, 2).await.unwrap();
    let c1 = cluster.next_epoch(cluster.weighted(0, 3)).await.unwrap();
    let me = cluster.nodes[0].id.clone();
    let shard = *c1.shards_of(&me).iter().find(|s| c0.owner(**s) != Some(&me)).unwrap();
    let source = cluster.nodes.iter().position(|n| Some(&n.id) == c0.owner(shard)).unwrap();

    // Wait for some progress, then stop the source mid-stream.
    let view = cluster
        .wait_view(0, "shard sync made progress", move |v| {
            v.shards.get(&shard).and_then(|r| r.sync.as_ref()).is_some_and(|p| p.blobs_done >= 8)
        })
        .await
        .unwrap();
    let done_before = view.shards[&shard].sync.as_ref().unwrap().blobs_done;
    assert!(done_before < blobs.len() as u64, "the stream must be interrupted before its end");
    cluster.stop_sync(source).await.unwrap();
    let stopped = cluster.nodes[0].node().unwrap().view();
    assert_eq!(
        stopped.shards[&shard].status,
        ShardStatus::ActiveSync,
        "the shard waits for its source: {}",
        describe(&stopped)
    );

    cluster.start_sync(source).await.unwrap();
    cluster.wait_all_active(0, 1).await.unwrap();
    let view = cluster.nodes[0].node().unwrap().view();
    let sync = view.shards[&shard].sync.clone().unwrap();
    assert!(sync.attempts >= 2, "the sync resumed in a new attempt: {sync:?}");
    assert_eq!(sync.blobs_done, blobs.len() as u64, "no sliver written twice and none missing: {sync:?}");
    let contents = cluster.shard_contents(0, shard).unwrap();
    assert_eq!(contents.len(), blobs.len());
    for (id, data) in &blobs {
        let expected = &erasure::encode(data, 4).unwrap().slivers[shard.as_usize()];
        assert_eq!(contents.iter().find(|(b, _)| b == id).map(|(_, d)| d), Some(expected));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_previous_owner_gone_for_good_leaves_the_shard_to_blob_recovery() {
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    cluster.tweak_sync = Box::new(|c| c.shard_sync.give_up_after_ms = 1500);
    let c0 = cluster.start_genesis().await.unwrap();
    cluster.store_random_blobs(20, 1000, 3).await.unwrap();
    let me = cluster.nodes[0].id.clone();
    // Stop the node that will lose a shard to node 0 before the change.
    let members = cluster.weighted(0, 3);
    let c1_plan = ferry_shared::committee::rebalance(&c0, members.clone()).unwrap();
    let shard = *c1_plan.shards_of(&me).iter().find(|s| c0.owner(**s) != Some(&me)).unwrap();
    let source = cluster.nodes.iter().position(|n| Some(&n.id) == c0.owner(shard)).unwrap();
    cluster.stop_sync(source).await.unwrap();
    cluster.next_epoch(members).await.unwrap();

    let view = cluster
        .wait_view(0, "gained shard in ActiveRecover", move |v| {
            v.shards.get(&shard).map(|r| r.status) == Some(ShardStatus::ActiveRecover)
        })
        .await
        .unwrap();
    let sync = view.shards[&shard].sync.clone().unwrap();
    assert!(sync.attempts >= 2, "retried before giving up: {sync:?}");
    assert!(sync.last_error.as_ref().is_some_and(|e| e.contains("no progress for")), "{sync:?}");
    let node = cluster.nodes[0].node().unwrap();
    let mut counter = node.counter.subscribe();
    tokio::time::timeout(WAIT, counter.wait_for(|v| v.running_syncs == 0))
        .await
        .expect("counter returns to zero")
        .unwrap();
    // Zero running syncs but an unfilled shard: the node must not attest.
    assert!(
        cluster.control_plane.attestation(1, &me).await.unwrap().is_none(),
        "no attestation while a shard is ActiveRecover"
    );

    // The operator brings the source back and retries the sync through SyncAdmin.
    cluster.start_sync(source).await.unwrap();
    let mut admin = pb::sync_admin_client::SyncAdminClient::new(cluster.sync_channel_as(0, ferry_e2e::CLIENT).unwrap());
    let previous = admin
        .set_sync_concurrency(pb::SetSyncConcurrencyRequest { max_concurrent_syncs: 2 })
        .await
        .unwrap()
        .into_inner()
        .previous;
    assert_eq!(previous, 4);
    let err = admin.set_sync_concurrency(pb::SetSyncConcurrencyRequest { max_concurrent_syncs: 0 }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = admin.retry_shard_sync(pb::RetryShardSyncRequest { shard: 99 }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    admin.retry_shard_sync(pb::RetryShardSyncRequest { shard: shard.0 }).await.unwrap();
    cluster.wait_all_active(0, 1).await.unwrap();
    let cp = cluster.control_plane.clone();
    ferry_e2e::wait_until("node 0 attests once the retried sync filled the shard", || {
        let (cp, me) = (cp.clone(), me.clone());
        async move { Ok(cp.attestation(1, &me).await?.is_some()) }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_that_cannot_go_on_stops_the_service_visibly() {
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    cluster.start_genesis().await.unwrap();
    // A committee that lists node 0 with a key it does not hold: following it would sign
    // with the wrong identity, so the service must stop with the reason, not go on silently.
    let mut members: Vec<_> = cluster.nodes.iter().map(|n| n.member(1)).collect();
    members[0].public_key = NodeKeypair::generate().public_hex();
    cluster.next_epoch(members).await.unwrap();
    let handle = cluster.nodes[0].sync.take().unwrap();
    let result = tokio::time::timeout(WAIT, handle.wait()).await.expect("the service stops by itself");
    let err = format!("{:#}", result.unwrap_err());
    assert!(err.contains("FERRY-NODE-002"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poisoned_control_plane_values_are_counted_and_skipped_not_followed_forever() {
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    let c0 = cluster.start_genesis().await.unwrap();
    // Values a broken writer (or someone with etcd access) could leave: not JSON under
    // `epochs/`, a committee stored under another epoch's key, an invalid committee, a phase
    // that does not parse. Written straight into the real etcd.
    let mut etcd = etcd_client::Client::connect([cluster.etcd.endpoint.as_str()], None).await.unwrap();
    let key = |rest: &str| format!("/ferry/{}/{rest}", cluster.name);
    let mut misfiled = c0.clone();
    misfiled.epoch = 7;
    let mut invalid = c0.clone();
    invalid.epoch = 1;
    invalid.assignment.push(cluster.nodes[0].id.clone()); // longer than the shard count
    let poison: Vec<(String, Vec<u8>)> = vec![
        (key("epochs/00000000000000000001"), b"not json".to_vec()),
        (key("epochs/00000000000000000002"), serde_json::to_vec(&misfiled).unwrap()),
        (key("epochs/00000000000000000003"), serde_json::to_vec(&invalid).unwrap()),
        (key("current"), b"{\"phase\":".to_vec()),
    ];
    let current = etcd.get(key("current"), None).await.unwrap().kvs()[0].value().to_vec();
    for (k, v) in poison {
        etcd.put(k, v, None).await.unwrap();
    }
    let node = cluster.nodes[0].node().unwrap().clone();
    ferry_e2e::wait_until("four poisoned values counted", || {
        let n = node.metrics.control_plane_poisoned.get();
        async move { Ok(n >= 4) }
    })
    .await
    .unwrap();
    // The follower is not wedged: a valid epoch written after the poison is applied. (The
    // epoch number must follow the last valid one, so the garbage is cleaned up first, as an
    // operator would after the alert.)
    for epoch in 1..=3 {
        etcd.delete(key(&format!("epochs/{epoch:020}")), None).await.unwrap();
    }
    etcd.put(key("current"), current, None).await.unwrap();
    cluster.next_epoch(cluster.nodes.iter().map(|n| n.member(1)).collect()).await.unwrap();
    cluster.wait_all_active(0, 1).await.unwrap();
    assert_eq!(node.metrics.control_plane_poisoned.get(), 4, "valid values are not counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpcurl_lists_describes_and_calls_the_service_through_reflection() {
    let Ok(grpcurl) = which("grpcurl") else { panic!("grpcurl is not installed (scripts/setup installs it)") };
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    cluster.start_genesis().await.unwrap();
    let addr = format!("127.0.0.1:{}", cluster.nodes[0].sync_port);
    let health = format!("127.0.0.1:{}", cluster.nodes[0].sync_health_port);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&grpcurl).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    // The service port speaks mutual TLS: the CA, a client certificate, and the node identity
    // the server's certificate must name.
    let tls = cluster.tls_dir();
    let ca = tls.join("ca.pem").display().to_string();
    let (client_cert, client_key) =
        (tls.join("ferryctl.pem").display().to_string(), tls.join("ferryctl.key").display().to_string());
    let (node_cert, node_key) =
        (tls.join("node-0.pem").display().to_string(), tls.join("node-0.key").display().to_string());
    let as_client = ["-cacert", &ca, "-cert", &client_cert, "-key", &client_key, "-servername", "node-0.node.ferry"];
    let with = |extra: &[&str], rest: &[&str]| run(&[extra, rest].concat());
    let (ok, list) = with(&as_client, &[&addr, "list"]);
    assert!(
        ok && list.contains("ferry.v1.SyncService")
            && list.contains("ferry.v1.SyncAdmin")
            && list.contains("grpc.health.v1.Health"),
        "{list}"
    );
    let (ok, describe) = with(&as_client, &[&addr, "describe", "ferry.v1.SyncService.StreamShard"]);
    assert!(ok && describe.contains("Streams a whole shard"), "doc comments reach grpcurl: {describe}");
    let (ok, status) = with(&as_client, &[&addr, "ferry.v1.SyncService/GetStatus"]);
    assert!(ok && status.contains("\"nodeId\": \"node-0\"") && status.contains("NODE_STATUS_ACTIVE"), "{status}");
    // Reflection is public, status is not: TLS without a client certificate lists the
    // services but may not read the node's status.
    let anonymous = ["-cacert", &ca, "-servername", "node-0.node.ferry"];
    let (ok, list) = with(&anonymous, &[&addr, "list"]);
    assert!(ok && list.contains("ferry.v1.SyncService"), "{list}");
    let (ok, status) = with(&anonymous, &[&addr, "ferry.v1.SyncService/GetStatus"]);
    assert!(!ok && status.contains("Unauthenticated"), "{status}");
    // The sync-state stream is for the node itself: a client certificate is refused ...
    let (ok, refused) = with(&as_client, &["-max-time", "5", &addr, "ferry.v1.SyncService/WatchSyncState"]);
    assert!(!ok && refused.contains("PermissionDenied"), "{refused}");
    // ... and the node's own certificate gets the stream at once.
    let as_node = ["-cacert", &ca, "-cert", &node_cert, "-key", &node_key, "-servername", "node-0.node.ferry"];
    let (_, watch) = with(&as_node, &["-max-time", "2", &addr, "ferry.v1.SyncService/WatchSyncState"]);
    assert!(watch.contains("ownedShards"), "the sync-state stream emits at once: {watch}");
    // A server name the certificate does not carry fails verification; plaintext gets nowhere.
    let (ok, wrong) = run(&["-cacert", &ca, "-servername", "node-1.node.ferry", &addr, "list"]);
    assert!(!ok, "node-0's certificate must not pass as node-1's: {wrong}");
    let (ok, _) = run(&["-plaintext", "-max-time", "5", &addr, "list"]);
    assert!(!ok, "the service port refuses plaintext");
    // The health port stays plaintext, for kubelet probes.
    let (ok, check) = run(&["-plaintext", &health, "grpc.health.v1.Health/Check"]);
    assert!(ok && check.contains("SERVING"), "{check}");
}

/// Finds a program on PATH, or in Python's scripts directory (where pip puts grpcurl when
/// that directory is not on PATH).
fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    let mut dirs: Vec<std::path::PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    if let Ok(out) = std::process::Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
        .output()
    {
        dirs.push(String::from_utf8_lossy(&out.stdout).trim().into());
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.exists()).ok_or(())
}

/// A `StreamShard` request to node `server`, signed with `key`.
fn signed_request(
    cluster: &Cluster,
    server: usize,
    key: &NodeKeypair,
    requester: &NodeId,
    shard: u32,
    epoch: u64,
) -> pb::StreamShardRequest {
    StreamShardIntent {
        cluster: &cluster.name,
        server: &cluster.nodes[server].id,
        shard: ShardIndex(shard),
        epoch,
        start: None,
        requester,
        timestamp_ms: crypto::now_ms(),
        include_metadata: false,
        limit: 0,
        include_certificates: false,
    }
    .sign(key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_shard_refuses_non_owners_forgeries_replays_and_bad_input() {
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    let c0 = cluster.start_genesis().await.unwrap();
    cluster.store_random_blobs(5, 100, 4).await.unwrap();
    let server_shard = c0.shards_of(&cluster.nodes[1].id)[0];
    let key2 = NodeKeypair::load(&cluster.nodes[2].key_file).unwrap();
    let id2 = cluster.nodes[2].id.clone();
    // Each request comes over a channel with the requester's own certificate.
    let mut client = cluster.sync_client_as(1, id2.as_str()).await.unwrap();
    let mut owner_client = cluster.sync_client_as(1, cluster.nodes[1].id.as_str()).await.unwrap();

    // Node 2 does not own node 1's shard.
    let err = client.stream_shard(signed_request(&cluster, 1, &key2, &id2, server_shard.0, 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("does not own shard"), "{}", err.message());
    // A forged signature (another key) is refused.
    let err = client
        .stream_shard(signed_request(&cluster, 1, &NodeKeypair::generate(), &id2, server_shard.0, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("does not verify"));
    // The owner's request works once; its replay is refused.
    let owner_req = signed_request(
        &cluster,
        1,
        &NodeKeypair::load(&cluster.nodes[1].key_file).unwrap(),
        &cluster.nodes[1].id,
        server_shard.0,
        0,
    );
    let mut stream = owner_client.stream_shard(owner_req.clone()).await.unwrap().into_inner();
    let mut n = 0;
    let mut ended = false;
    while let Some(item) = stream.message().await.unwrap() {
        if item.end {
            ended = true;
        } else {
            n += 1;
        }
    }
    assert_eq!(n, 5);
    assert!(ended, "a complete stream ends with the end marker");
    let err = owner_client.stream_shard(owner_req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("replayed"));
    // The signed message names the server and the cluster: the same request taken to another
    // node (over the owner's own certificate) does not verify there.
    let mut at_node_2 = cluster.sync_client_as(2, cluster.nodes[1].id.as_str()).await.unwrap();
    let err = at_node_2.stream_shard(owner_req).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("does not verify"), "{}", err.message());
    // A future epoch: the server has not processed it.
    let err = client.stream_shard(signed_request(&cluster, 1, &key2, &id2, server_shard.0, 5)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    // Out-of-range shard and malformed ids.
    let err = client.stream_shard(signed_request(&cluster, 1, &key2, &id2, 99, 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client.get_metadata(pb::GetMetadataRequest { blob_id: vec![1, 2, 3] }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client.check_blobs(pb::CheckBlobsRequest { blob_ids: vec![vec![0; 32]; 2000] }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "the page size is capped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_data_plane_stores_only_verified_slivers_and_metadata() {
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    let c0 = cluster.start_genesis().await.unwrap();
    let mut client = cluster.sync_client(0).await.unwrap();
    let enc = erasure::encode(b"hello ferry", 4).unwrap();
    let id = enc.blob_id.0.to_vec();
    // Metadata of another cluster's shard count.
    let other_cluster = erasure::encode(b"hello ferry", 7).unwrap();
    let err = client
        .store_metadata(pb::StoreMetadataRequest {
            blob_id: other_cluster.blob_id.0.to_vec(),
            metadata: Some(other_cluster.metadata.to_proto()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("7 shards"), "{}", err.message());
    // Metadata that does not hash to the id.
    let mut wrong = enc.metadata.clone();
    wrong.length += 1;
    let err = client
        .store_metadata(pb::StoreMetadataRequest { blob_id: id.clone(), metadata: Some(wrong.to_proto()) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    client
        .store_metadata(pb::StoreMetadataRequest { blob_id: id.clone(), metadata: Some(enc.metadata.to_proto()) })
        .await
        .unwrap();

    let mine = c0.shards_of(&cluster.nodes[0].id)[0];
    let other = c0.shards_of(&cluster.nodes[1].id)[0];
    // A corrupted sliver, and a sliver for a shard the node does not own.
    let mut bad = enc.slivers[mine.as_usize()].clone();
    bad[0] ^= 1;
    let err = client
        .store_sliver(pb::StoreSliverRequest { blob_id: id.clone(), shard: mine.0, data: bad })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .store_sliver(pb::StoreSliverRequest {
            blob_id: id.clone(),
            shard: other.0,
            data: enc.slivers[other.as_usize()].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("does not own"));
    let err = client.get_sliver(pb::GetSliverRequest { blob_id: id.clone(), shard: mine.0 }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "nothing unverified was stored");
    // The good sliver is stored and confirmed with a valid signature.
    let r = client
        .store_sliver(pb::StoreSliverRequest {
            blob_id: id.clone(),
            shard: mine.0,
            data: enc.slivers[mine.as_usize()].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let conf = r.confirmation.expect("the node holds the blob in every shard it owns");
    let member = c0.member(&cluster.nodes[0].id).unwrap();
    crypto::verify_bls(&member.bls_key, &crypto::confirmation_message(&cluster.name, &enc.blob_id, 0), &conf.signature)
        .unwrap();
    assert!(
        crypto::verify_bls(&member.bls_key, &crypto::confirmation_message("other", &enc.blob_id, 0), &conf.signature)
            .is_err(),
        "a confirmation names its cluster"
    );
    let got = client.get_sliver(pb::GetSliverRequest { blob_id: id, shard: mine.0 }).await.unwrap().into_inner();
    assert_eq!(got.data, enc.slivers[mine.as_usize()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_that_stops_reading_does_not_grow_server_memory() {
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    // A small block cache, so the measurement shows buffering, not the cache filling up.
    cluster.tweak_sync = Box::new(|c| c.store.block_cache_mib = 4);
    let c0 = cluster.start_genesis().await.unwrap();
    // About 48 MiB in the streamed shard: 192 blobs with 256 KiB slivers (k = 2).
    let client = cluster.client();
    let mut ids = Vec::new();
    for i in 0..192u32 {
        let data = vec![(i % 251) as u8; 512 * 1024];
        ids.push(client.store(&data).await.unwrap());
    }
    let shard = c0.shards_of(&cluster.nodes[1].id)[0];
    let owner_key = NodeKeypair::load(&cluster.nodes[1].key_file).unwrap();
    let mut grpc = cluster.sync_client_as(1, cluster.nodes[1].id.as_str()).await.unwrap();
    let rss_before = rss_bytes();
    let mut stream = grpc
        .stream_shard(signed_request(&cluster, 1, &owner_key, &cluster.nodes[1].id, shard.0, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    // Stop reading; let the producer run into backpressure, then measure.
    let status_before = status(&mut grpc).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = rss_bytes().saturating_sub(rss_before);
    println!("server-side RSS growth with a stalled reader: {} KiB (shard {} MiB)", grown / 1024, 192 * 256 / 1024);
    assert!(grown < 24 * 1024 * 1024, "RSS grew by {grown} bytes for a stalled 48 MiB stream");
    assert_eq!(status_before.node_id, "node-1");
    // Reading resumes and the stream completes.
    let mut n = 1;
    while let Some(item) = stream.message().await.unwrap() {
        n += usize::from(!item.end);
    }
    assert_eq!(n, ids.len());
}

fn rss_bytes() -> u64 {
    ferryctl::local::proc_status_bytes(std::process::id(), "VmRSS:")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn editing_the_config_file_changes_live_settings_without_a_restart() {
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    cluster.start_genesis().await.unwrap();
    let config = cluster.sync_config(0);
    // A ConfigMap-style directory: the file is a symlink into `..data`, swapped atomically.
    let dir = cluster.dir.path().join("config-0");
    std::fs::create_dir_all(dir.join("..v1")).unwrap();
    std::fs::write(dir.join("..v1/sync-service.toml"), ferry_shared::config::to_toml(&config).unwrap()).unwrap();
    std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/sync-service.toml", dir.join("sync-service.toml")).unwrap();
    let node = cluster.nodes[0].node().unwrap().clone();
    let _watch = ferry_sync_service::apply_config_changes(&node, &dir.join("sync-service.toml")).unwrap();
    assert_eq!(node.sync_limit.limit(), 4);

    let mut edited = config.clone();
    edited.shard_sync.max_concurrent_syncs = 7;
    edited.stream.max_bytes_per_sec = 123_456;
    edited.throttle.enabled = false;
    edited.throttle.max_slowdown = 2.5;
    assert!(node.throttle.config().enabled);
    std::fs::create_dir_all(dir.join("..v2")).unwrap();
    std::fs::write(dir.join("..v2/sync-service.toml"), ferry_shared::config::to_toml(&edited).unwrap()).unwrap();
    std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    let watched = node.clone();
    let throttle = edited.throttle.clone();
    ferry_e2e::wait_until("the edited config is applied", || {
        let node = watched.clone();
        let throttle = throttle.clone();
        async move {
            Ok(node.sync_limit.limit() == 7
                && node.stream_rate.load(std::sync::atomic::Ordering::Relaxed) == 123_456
                && node.throttle.config() == throttle)
        }
    })
    .await
    .unwrap();
}
