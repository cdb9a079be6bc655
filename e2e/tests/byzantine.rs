//! A previous owner that lies: a real gRPC server with the previous owner's own certificate,
//! on its address, that answers `StreamShard` with an endless stream of items for blobs that
//! were never certified. The receiving node must store none of them and give the shard to
//! blob recovery once nothing certified has settled for `shard_sync.give_up_after_ms`, so the
//! sync count that holds blob recovery back drops to zero.
#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use ferry_e2e::{Cluster, WAIT};
use ferry_proto::v1 as pb;
use ferry_shared::{
    Committee, Member,
    types::{BlobId, ShardIndex, ShardStatus},
};
use futures::{Stream, future::BoxFuture};
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

/// A `ferry.v1.SyncService` that serves only `StreamShard`, with [`EndlessJunk`].
#[derive(Clone)]
struct LyingSource {
    junk: EndlessJunk,
}

impl NamedService for LyingSource {
    const NAME: &'static str = "ferry.v1.SyncService";
}

impl tower::Service<http::Request<Body>> for LyingSource {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let junk = self.junk.clone();
        Box::pin(async move {
            if request.uri().path() != "/ferry.v1.SyncService/StreamShard" {
                return Ok(Status::unimplemented("a lying source serves only StreamShard").into_http());
            }
            let codec = tonic_prost::ProstCodec::<pb::ShardItem, pb::StreamShardRequest>::default();
            Ok(tonic::server::Grpc::new(codec).server_streaming(junk, request).await)
        })
    }
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

    // The previous owner's sync-service goes; in its place, on its port and with its own
    // certificate (so every check a node makes of its peer passes), the lying source.
    cluster.stop_sync(source).await.unwrap();
    let material = cluster.tls_config(cluster.nodes[source].id.as_str()).load(Some(&cluster.nodes[source].id)).unwrap();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", cluster.nodes[source].sync_port)).await.unwrap();
    // Far more than a batch per second: before the fix every batch of junk counted as progress.
    let lying = LyingSource { junk: EndlessJunk { every: Duration::from_millis(2) } };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(material.unwrap().server_config())
            .unwrap()
            .add_service(lying)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

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
