//! Peers that lie, each a real gRPC server in place of a node's sync-service, on its address
//! and with its own certificate, so every check a node makes of its peer passes: a previous
//! owner streaming junk or trickling, a peer over-answering blob recovery, and claims of
//! inconsistency about a valid blob. The node must store nothing unverified, give a stalled
//! shard to blob recovery, hold no over-sized answer, and record no claim that does not check
//! out.
#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use ferry_e2e::{Cluster, WAIT};
use ferry_proto::v1 as pb;
use ferry_shared::{
    Committee, Member,
    types::{BlobId, ShardIndex, ShardStatus},
};
use futures::{Stream, StreamExt, future::BoxFuture};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status, body::Body, server::NamedService};

/// `StreamShard` that never ends: an item every `every`, each for a fresh, increasing,
/// uncertified blob id, with a sliver that is self-consistent only with metadata nobody has.
#[derive(Clone)]
struct EndlessJunk {
    every: Duration,
}

impl tonic::server::ServerStreamingService<pb::StreamShardRequest> for EndlessJunk {
    type Response = pb::ShardItem;
    type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::ShardItem, Status>> + Send>>;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, _request: Request<pb::StreamShardRequest>) -> Self::Future {
        let every = self.every;
        Box::pin(async move {
            let items = futures::stream::unfold(0u64, move |n| async move {
                tokio::time::sleep(every).await;
                let mut id = [0u8; 32];
                id[24..].copy_from_slice(&n.to_be_bytes());
                id[0] = 0x01; // after any start the receiver asks for, and increasing
                let item =
                    pb::ShardItem { blob_id: BlobId(id).0.to_vec(), data: vec![0xab; 256], ..Default::default() };
                Some((Ok(item), n + 1))
            });
            Ok(Response::new(Box::pin(items) as Self::ResponseStream))
        })
    }
}

/// A `ferry.v1.SyncService` whose every answer is `answer`'s.
#[derive(Clone)]
struct LyingPeer<F>(F);

impl<F> NamedService for LyingPeer<F> {
    const NAME: &'static str = "ferry.v1.SyncService";
}

impl<F> tower::Service<http::Request<Body>> for LyingPeer<F>
where
    F: Fn(http::Request<Body>) -> BoxFuture<'static, http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let answer = (self.0)(request);
        Box::pin(async move { Ok(answer.await) })
    }
}

/// Stops node `i`'s sync-service and serves `answer` in its place, on its port and with its
/// own certificate.
async fn impersonate<F>(cluster: &mut Cluster, i: usize, answer: F) -> JoinHandle<Result<(), tonic::transport::Error>>
where
    F: Fn(http::Request<Body>) -> BoxFuture<'static, http::Response<Body>> + Clone + Send + Sync + 'static,
{
    cluster.stop_sync(i).await.unwrap();
    let node = &cluster.nodes[i];
    let material = cluster.tls_config(node.id.as_str()).load(Some(&node.id)).unwrap().unwrap();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", node.sync_port)).await.unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(material.server_config())
            .unwrap()
            .add_service(LyingPeer(answer))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    )
}

/// The shard node 0 gains when its weight goes to 3, the members of that epoch, and the index
/// of the node that owned the shard before (the source of its sync).
fn gained_shard(cluster: &Cluster, c0: &Committee) -> (ShardIndex, Vec<Member>, usize) {
    let me = cluster.nodes[0].id.clone();
    let members = cluster.weighted(0, 3);
    let plan = ferry_shared::committee::rebalance(c0, members.clone()).unwrap();
    let shard = *plan.shards_of(&me).iter().find(|s| c0.owner(**s) != Some(&me)).unwrap();
    let source = cluster.nodes.iter().position(|n| Some(&n.id) == c0.owner(shard)).unwrap();
    (shard, members, source)
}

/// Starts the epoch with `members` and waits until node 0 has given `shard` to blob recovery
/// (within `give_up_ms` and the wait) and its sync count is back at zero; the sync's record.
async fn given_up_after_epoch_change(
    cluster: &Cluster,
    members: Vec<Member>,
    shard: ShardIndex,
    give_up_ms: u64,
) -> ferry_sync_service::store::SyncProgress {
    let started = std::time::Instant::now();
    cluster.next_epoch(members).await.unwrap();
    let view = cluster
        .wait_view(0, "the gained shard handed to blob recovery", move |v| {
            v.shards.get(&shard).map(|r| r.status) == Some(ShardStatus::ActiveRecover)
        })
        .await
        .unwrap();
    let took = started.elapsed();
    let sync = view.shards[&shard].sync.clone().unwrap();
    assert!(sync.last_error.as_ref().is_some_and(|e| e.contains("settled")), "{sync:?}");
    assert!(took < Duration::from_millis(give_up_ms) + WAIT, "given up on within the deadline: {took:?}");
    let node = cluster.nodes[0].node().unwrap();
    let mut counter = node.counter.subscribe();
    tokio::time::timeout(WAIT, counter.wait_for(|v| v.running_syncs == 0))
        .await
        .expect("the sync count returns to zero, so blob recovery may start")
        .unwrap();
    sync
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_streaming_only_uncertified_junk_is_given_up_on_and_nothing_of_it_is_stored() {
    const GIVE_UP_MS: u64 = 3_000;
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    cluster.tweak_sync = Box::new(|c| c.shard_sync.give_up_after_ms = GIVE_UP_MS);
    let c0 = cluster.start_genesis().await.unwrap();
    cluster.store_random_blobs(20, 1000, 3).await.unwrap();
    let (shard, members, source) = gained_shard(&cluster, &c0);

    // The previous owner answers `StreamShard` with junk, far more than a batch per second:
    // before the fix every batch of junk counted as progress.
    let junk = EndlessJunk { every: Duration::from_millis(2) };
    let server = impersonate(&mut cluster, source, move |request| {
        let junk = junk.clone();
        Box::pin(async move {
            if request.uri().path() != "/ferry.v1.SyncService/StreamShard" {
                return Status::unimplemented("a lying source serves only StreamShard").into_http();
            }
            let codec = tonic_prost::ProstCodec::<pb::ShardItem, pb::StreamShardRequest>::default();
            tonic::server::Grpc::new(codec).server_streaming(junk, request).await
        })
    })
    .await;

    let sync = given_up_after_epoch_change(&cluster, members, shard, GIVE_UP_MS).await;
    assert_eq!(sync.blobs_done, 0, "no junk counts as a synced blob: {sync:?}");
    // Nothing of the junk is in the store: the shard holds no sliver at all.
    assert!(cluster.shard_contents(0, shard).unwrap().is_empty(), "uncertified junk must not be stored");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_that_trickles_certified_items_just_inside_the_deadline_is_given_up_on() {
    const GIVE_UP_MS: u64 = 3_000;
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    cluster.tweak_sync = Box::new(|c| {
        c.shard_sync.give_up_after_ms = GIVE_UP_MS;
        c.shard_sync.progress_blobs = 8;
    });
    let c0 = cluster.start_genesis().await.unwrap();
    // 1 KB blobs: slivers of about 500 bytes, 300 of them in the shard that moves.
    cluster.store_random_blobs(300, 1000, 7).await.unwrap();
    let (shard, members, source) = gained_shard(&cluster, &c0);
    // The previous owner is honest in what it sends (certified blobs, slivers that verify) but
    // sends it at 250 bytes/s: an item about every two seconds, inside the three-second deadline,
    // and fewer than the 8 blobs per window that count as progress. Before the fix every item
    // that settled restarted the deadline: the sync would have run for ten minutes and held
    // blob recovery back all along.
    cluster.nodes[source].node().unwrap().stream_rate.store(250, std::sync::atomic::Ordering::Relaxed);

    let sync = given_up_after_epoch_change(&cluster, members, shard, GIVE_UP_MS).await;
    assert!(sync.blobs_done < 64, "given up on long before the shard's 300 blobs were through: {sync:?}");
}

/// What a peer answering every blob-recovery read with a huge message did: calls per method,
/// and the most bytes the caller let it send in any one answer.
#[derive(Default)]
struct OverAnswered {
    calls: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
    most_sent: std::sync::atomic::AtomicU64,
}

/// The length an over-answer declares, and the pieces it is sent in.
const DECLARED: usize = 32 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

/// Answers `GetMetadata`, `GetSliver` and `GetSlivers` with one gRPC message declared
/// [`DECLARED`] bytes long, sent [`CHUNK`] bytes at a time as the caller's flow-control window
/// allows. A caller that checks the declared length refuses after the 5-byte header and resets
/// the stream, so only what one window holds is ever sent.
async fn over_answer(seen: Arc<OverAnswered>, request: http::Request<Body>) -> http::Response<Body> {
    let method = request.uri().path().rsplit('/').next().unwrap_or_default().to_string();
    if !["GetMetadata", "GetSliver", "GetSlivers"].contains(&method.as_str()) {
        return Status::unimplemented("an over-answering peer serves only blob-recovery reads").into_http();
    }
    *seen.calls.lock().unwrap().entry(method).or_default() += 1;
    let mut header = vec![0u8];
    header.extend_from_slice(&(DECLARED as u32).to_be_bytes());
    let header = bytes::Bytes::from(header);
    // Piece `at` is polled only once the caller's window has room for it.
    let chunks = futures::stream::iter(0..=DECLARED / CHUNK + 1).map(move |at| {
        Ok::<_, Status>(match at {
            0 => http_body::Frame::data(header.clone()),
            _ if at <= DECLARED / CHUNK => {
                seen.most_sent.fetch_max((at * CHUNK) as u64, std::sync::atomic::Ordering::Relaxed);
                http_body::Frame::data(bytes::Bytes::from(vec![0u8; CHUNK]))
            }
            _ => {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                http_body::Frame::trailers(trailers)
            }
        })
    });
    http::Response::builder()
        .header("content-type", "application/grpc")
        .body(Body::new(http_body_util::StreamBody::new(chunks)))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_over_answers_blob_recovery_is_refused_and_the_others_suffice() {
    use ferry_recovery_service::blob_recovery::{self, Peers, Wanted};
    let (mut cluster, blobs) = ferry_e2e::cluster_with_blobs(24, |_| {}).await.unwrap();
    let committee = cluster.committee().await.unwrap();
    // Node 0 loses its data; its own recovery-service stays off so that only this test recovers.
    cluster.stop_recovery(0).await.unwrap();
    cluster.stop_sync(0).await.unwrap();
    cluster.wipe(0).unwrap();
    // Node 3 turns over-answering.
    let seen = Arc::new(OverAnswered::default());
    let server = {
        let seen = seen.clone();
        impersonate(&mut cluster, 3, move |request| Box::pin(over_answer(seen.clone(), request))).await
    };
    cluster.start_sync(0).await.unwrap();

    // Node 0 recovers through the recovery-service's own code, as node 0. 8 shards, k = 4:
    // without node 0's 2 shards and node 3's 2, nodes 1 and 2 hold exactly the 4 needed.
    let me = cluster.nodes[0].id.clone();
    let wanted_shards = committee.shards_of(&me);
    let peers = Arc::new(Peers::new(
        me.clone(),
        cluster.sync_channel_as(0, me.as_str()).unwrap(),
        cluster.connector_as(me.as_str()).unwrap(),
        Duration::from_secs(20),
    ));
    let (one_by_one, batched) = blobs.split_at(blobs.len() / 2);
    // One blob at a time: metadata from a peer (node 0 has none) and `GetSliver` per shard.
    for (blob, _) in one_by_one {
        blob_recovery::recover_blob(&peers, &committee, *blob, &wanted_shards)
            .await
            .unwrap_or_else(|e| panic!("{blob} not recovered past the over-answering peer: {e}"));
    }
    // In batches of three, each starting at another source shard: `GetSlivers`.
    for chunk in batched.chunks(3) {
        let wanted = chunk.iter().map(|(blob, _)| Wanted { blob: *blob, shards: wanted_shards.clone() }).collect();
        for (blob, outcome) in blob_recovery::recover_batch(&peers, &committee, wanted).await {
            outcome.unwrap_or_else(|e| panic!("{blob} not recovered past the over-answering peer: {e}"));
        }
    }
    cluster.check_shards_match_encoding(0, &blobs).unwrap();

    let calls = seen.calls.lock().unwrap().clone();
    for method in ["GetMetadata", "GetSliver", "GetSlivers"] {
        assert!(
            calls.get(method).is_some_and(|n| *n > 0),
            "the over-answering peer was never asked {method}: {calls:?}"
        );
    }
    // Each answer was refused at its header: no more than one flow-control window of it was
    // ever sent, of the 32 MiB it declared (a caller that accepted it would have taken it all).
    let most = seen.most_sent.load(std::sync::atomic::Ordering::Relaxed);
    let window = u64::from(ferry_shared::grpc::STREAM_WINDOW_BYTES) + CHUNK as u64;
    assert!(most <= window, "an over-answer was read to {most} bytes, more than one window ({window}): {calls:?}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_that_a_valid_blob_is_inconsistent_is_checked_and_refused() {
    let (cluster, blobs) = ferry_e2e::cluster_with_blobs(4, |_| {}).await.unwrap();
    let (blob, _) = &blobs[0];
    // Found by the `sync_handlers` fuzz target: a claim was recorded unchecked, and a recorded
    // claim drops the node's repairs of the blob, so one call from any client or member could
    // leave a hole that the node would then attest over.
    let proof = pb::InconsistencyProof { shards: vec![1, 2, 3, 4], mismatched: 0, reported_by: "node-2".into() };
    let request = pb::ReportInconsistencyRequest { blob_id: blob.0.to_vec(), proof: Some(proof) };
    for caller in [ferry_e2e::APP, "node-1"] {
        let mut client = cluster.sync_client_as(0, caller).await.unwrap();
        let refused = client.report_inconsistency(request.clone()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{caller}: {refused:?}");
    }
    let record = cluster.nodes[0].node().unwrap().store.certified(blob).unwrap().unwrap();
    assert!(record.invalid.is_none(), "no claim was recorded: {record:?}");
    cluster.assert_no_holes().await.unwrap();
}
