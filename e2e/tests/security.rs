//! Mutual TLS and per-call authorisation over real sockets: who may stream a shard, read
//! slivers, follow the sync state and pause recovery, and that clients verify the server is
//! the node the committee names.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_e2e::{APP, CLIENT, Cluster};
use ferry_proto::v1::{
    self as pb, recovery_service_client::RecoveryServiceClient, sync_service_client::SyncServiceClient,
};
use ferry_shared::{
    crypto::{self, NodeKeypair, StreamShardIntent},
    grpc::Connector,
    tls::{self, ClusterCa, TlsConfig},
    types::{NodeId, ShardIndex},
};
use tonic::Code;

/// A `StreamShard` request to node 1 (the server of these tests), signed with `key`.
fn stream_request(
    cluster: &Cluster,
    key: &NodeKeypair,
    requester: &NodeId,
    shard: ShardIndex,
) -> pb::StreamShardRequest {
    StreamShardIntent {
        cluster: &cluster.name,
        server: &cluster.nodes[1].id,
        shard,
        epoch: 0,
        start: None,
        requester,
        timestamp_ms: crypto::now_ms(),
        include_metadata: false,
        limit: 0,
        include_certificates: false,
    }
    .sign(key)
}

async fn count_items(
    client: &mut SyncServiceClient<ferry_shared::grpc::TracedChannel>,
    request: pb::StreamShardRequest,
) -> Result<usize, tonic::Status> {
    let mut stream = client.stream_shard(request).await?.into_inner();
    let mut n = 0;
    while let Some(item) = stream.message().await? {
        n += usize::from(!item.end);
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_shard_owner_with_its_own_certificate_may_stream_it() {
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    let c0 = cluster.start_genesis().await.unwrap();
    cluster.store_random_blobs(6, 500, 3).await.unwrap();
    let owner = cluster.nodes[1].id.clone();
    let shard = c0.shards_of(&owner)[0];
    let owner_key = NodeKeypair::load(&cluster.nodes[1].key_file).unwrap();
    let addr = format!("127.0.0.1:{}", cluster.nodes[1].sync_port);

    // No client certificate: TLS works, the call does not.
    let mut anon = SyncServiceClient::new(cluster.anonymous_channel(1).await.unwrap());
    let err = anon.stream_shard(stream_request(&cluster, &owner_key, &owner, shard)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // Nor does any other call but health and reflection.
    let err = anon.get_status(pb::GetStatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // A certificate from another CA, for the very same node id: the handshake fails.
    let foreign = tempfile::tempdir().unwrap();
    tls::write_dev_pki(foreign.path(), std::slice::from_ref(&owner), CLIENT, APP).unwrap();
    let mut foreign_cfg = TlsConfig::from_dir(foreign.path(), owner.as_str());
    foreign_cfg.ca_file = cluster.tls_dir().join("ca.pem"); // trusts the real server
    let foreign_connector = Connector::new(foreign_cfg.load(None).unwrap());
    let mut foreign_client = SyncServiceClient::new(foreign_connector.channel(&addr, &owner, None).unwrap());
    let err = foreign_client.stream_shard(stream_request(&cluster, &owner_key, &owner, shard)).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled),
        "a foreign CA's certificate must not get through: {err:?}"
    );

    // A valid certificate of a member that does not own the shard, with its own key.
    let other = cluster.nodes[2].id.clone();
    let other_key = NodeKeypair::load(&cluster.nodes[2].key_file).unwrap();
    let mut non_owner = cluster.sync_client_as(1, other.as_str()).await.unwrap();
    let err = count_items(&mut non_owner, stream_request(&cluster, &other_key, &other, shard)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("does not own shard"), "{}", err.message());
    // The non-owner replaying the owner's signed request: the certificate does not match.
    let err = count_items(&mut non_owner, stream_request(&cluster, &owner_key, &owner, shard)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("on behalf of"), "{}", err.message());
    // A client certificate is no node certificate.
    let mut as_client = cluster.sync_client_as(1, CLIENT).await.unwrap();
    let err = count_items(&mut as_client, stream_request(&cluster, &owner_key, &owner, shard)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // The owner, with its own certificate and key, gets the whole shard.
    let mut owner_client = cluster.sync_client_as(1, owner.as_str()).await.unwrap();
    assert_eq!(count_items(&mut owner_client, stream_request(&cluster, &owner_key, &owner, shard)).await.unwrap(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sliver_reads_sync_state_and_operator_calls_follow_the_committee() {
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    let c0 = cluster.start_genesis().await.unwrap();
    cluster.start_recovery(0).await.unwrap();
    let blobs = cluster.store_random_blobs(2, 300, 5).await.unwrap();
    let shard = c0.shards_of(&cluster.nodes[0].id)[0];
    let get = pb::GetSliverRequest { blob_id: blobs[0].0.0.to_vec(), shard: shard.0 };

    // A member node and a client may read slivers.
    let mut member = cluster.sync_client_as(0, "node-2").await.unwrap();
    member.get_sliver(get.clone()).await.unwrap();
    cluster.sync_client(0).await.unwrap().get_sliver(get.clone()).await.unwrap();
    // A node with a valid certificate from the cluster CA that is not in the committee may not.
    let ca = ClusterCa::load(&cluster.tls_dir()).unwrap();
    let outsider = NodeId::new("node-9").unwrap();
    ca.issue_node(&outsider, &[]).unwrap().write(&cluster.tls_dir(), outsider.as_str()).unwrap();
    let mut outsider_client = cluster.sync_client_as(0, outsider.as_str()).await.unwrap();
    let err = outsider_client.get_sliver(get).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // The sync-state stream and the recovery calls are for the node itself.
    let err = member.watch_sync_state(pb::WatchSyncStateRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = member.complete_recovery(pb::CompleteRecoveryRequest { epoch: 0 }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut own = cluster.sync_client_as(0, "node-0").await.unwrap();
    let first = own
        .watch_sync_state(pb::WatchSyncStateRequest {})
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert!(!first.owned_shards.is_empty());

    // An application client reads and stores, but does not operate the node: pausing or
    // resuming recovery, retrying a sync and setting the sync concurrency are refused, and
    // the persisted pause flag stays as it was.
    let mut app = cluster.sync_client_as(0, APP).await.unwrap();
    app.get_sliver(pb::GetSliverRequest { blob_id: blobs[0].0.0.to_vec(), shard: shard.0 }).await.unwrap();
    let mut app_recovery = RecoveryServiceClient::new(cluster.recovery_channel_as(0, APP).unwrap());
    let err = app_recovery.pause_recovery(pb::PauseRecoveryRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("client app"), "{}", err.message());
    let err = app_recovery.resume_recovery(pb::ResumeRecoveryRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(!app_recovery.get_recovery_status(pb::GetRecoveryStatusRequest {}).await.unwrap().into_inner().paused);
    let mut app_admin = pb::sync_admin_client::SyncAdminClient::new(cluster.sync_channel_as(0, APP).unwrap());
    let err = app_admin.retry_shard_sync(pb::RetryShardSyncRequest { shard: shard.0 }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err =
        app_admin.set_sync_concurrency(pb::SetSyncConcurrencyRequest { max_concurrent_syncs: 1 }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Pausing recovery: another node may not, an operator may.
    let mut as_peer = RecoveryServiceClient::new(cluster.recovery_channel_as(0, "node-1").unwrap());
    let err = as_peer.pause_recovery(pb::PauseRecoveryRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut as_operator = RecoveryServiceClient::new(cluster.recovery_channel_as(0, CLIENT).unwrap());
    as_operator.pause_recovery(pb::PauseRecoveryRequest {}).await.unwrap();
    assert!(as_operator.get_recovery_status(pb::GetRecoveryStatusRequest {}).await.unwrap().into_inner().paused);
    let mut operator_admin = pb::sync_admin_client::SyncAdminClient::new(cluster.sync_channel_as(0, CLIENT).unwrap());
    operator_admin.set_sync_concurrency(pb::SetSyncConcurrencyRequest { max_concurrent_syncs: 3 }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_refuse_a_server_that_is_not_the_node_they_expect() {
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    cluster.start_genesis().await.unwrap();
    let connector = cluster.connector_as(CLIENT).unwrap();
    // Node 0's address, but the committee says node 1 lives there (a hijacked address).
    let addr = format!("127.0.0.1:{}", cluster.nodes[0].sync_port);
    let mut wrong = SyncServiceClient::new(connector.channel(&addr, &cluster.nodes[1].id, None).unwrap());
    let err = wrong.get_status(pb::GetStatusRequest {}).await.unwrap_err();
    assert!(matches!(err.code(), Code::Unavailable | Code::Unknown), "{err:?}");
    let mut right = SyncServiceClient::new(connector.channel(&addr, &cluster.nodes[0].id, None).unwrap());
    assert_eq!(right.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner().node_id, "node-0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_refuses_to_start_with_another_nodes_certificate() {
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    cluster.tweak_sync = Box::new(|c| c.tls.cert_file = c.tls.cert_file.with_file_name("node-1.pem"));
    let genesis = ferry_shared::Committee::genesis(4, cluster.nodes.iter().map(|n| n.member(1)).collect()).unwrap();
    cluster.control_plane.propose_epoch(&genesis).await.unwrap();
    let err = format!("{:#}", cluster.start_sync(0).await.unwrap_err());
    assert!(err.contains("FERRY-TLS-002") && err.contains("node-0.node.ferry"), "{err}");
}

/// A channel to node `i`'s sync-service over TLS that presents no client certificate.
/// Sends `message` to `path`, whatever request type the method declares.
async fn call_raw<T, M>(channel: T, path: &'static str, message: M) -> Result<(), tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    M: prost::Message + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.into().to_string()))?;
    // The reply is decoded as an empty message: only the status matters here.
    let codec = tonic_prost::ProstCodec::<M, pb::GetStatusRequest>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(message), path, codec).await.map(|_| ())
}

/// Bytes that are no valid `StoreBlobsRequest`: field 1 holds a `BlobUpload` that does not parse.
fn undecodable_store_request(len: usize) -> pb::GetSliverRequest {
    pb::GetSliverRequest { blob_id: vec![0xff; len], shard: 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_are_checked_and_bodies_bounded_before_anything_is_decoded() {
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    cluster.start_genesis().await.unwrap();
    let store_blobs = "/ferry.v1.SyncService/StoreBlobs";

    // A member's garbage reaches the decoder, which refuses it: the body is decoded only ...
    let err = call_raw(cluster.sync_channel_as(0, "node-1").unwrap(), store_blobs, undecodable_store_request(64))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "a member's undecodable request fails in the decoder: {err:?}");
    // ... after the caller is known: without a certificate the same bytes never get there,
    // not even 8 MiB of them.
    let anonymous = cluster.anonymous_channel(0).await.unwrap();
    for len in [64, 8 << 20] {
        let err = call_raw(anonymous.clone(), store_blobs, undecodable_store_request(len)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{len} bytes without a certificate: {err:?}");
    }
    // Unknown methods are refused before their body too, for everyone.
    let err =
        call_raw(anonymous.clone(), "/ferry.v1.SyncService/NoSuchMethod", pb::GetStatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    // Status needs an identity of the cluster too.
    let err = call_raw(anonymous, "/ferry.v1.SyncService/GetStatus", pb::GetStatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // Each method has its own size limit: 2 MiB of (empty) ids is far more than the 1,024 ids
    // a CheckBlobs may carry, and is cut off while it is read, before the handler's count check.
    let check = pb::CheckBlobsRequest { blob_ids: vec![Vec::new(); 1 << 20] };
    let err = call_raw(cluster.sync_channel_as(0, CLIENT).unwrap(), "/ferry.v1.SyncService/CheckBlobs", check)
        .await
        .unwrap_err();
    assert!(err.message().contains("length limit exceeded"), "the body limit, not the handler: {err:?}");
    // Within the limit the handler's own check answers.
    let check = pb::CheckBlobsRequest { blob_ids: vec![Vec::new(); 2000] };
    let err = call_raw(cluster.sync_channel_as(0, CLIENT).unwrap(), "/ferry.v1.SyncService/CheckBlobs", check)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_connections_are_capped_and_stalled_handshakes_closed() {
    use tokio::io::AsyncReadExt;
    const CAP: usize = 16;
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    cluster.tweak_sync = Box::new(|c| {
        c.server.max_connections = CAP;
        // Longer than opening the connections below takes, so none is closed by it before the
        // cap is reached.
        c.server.tls_handshake_timeout_ms = 5_000;
    });
    cluster.start_genesis().await.unwrap();
    let addr = format!("127.0.0.1:{}", cluster.nodes[0].sync_port);
    let refused = || cluster.nodes[0].node().unwrap().metrics.rpc.refused_connections.get();
    let refused_before = refused();

    // Connections that never start a TLS handshake: the peers may hold a few connections of
    // their own, so at the latest the (CAP + 1)-th of ours is closed at once.
    let mut held = Vec::new();
    let mut closed_at_once = None;
    for i in 0..=CAP {
        let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut byte = [0u8; 1];
        match tokio::time::timeout(std::time::Duration::from_millis(100), socket.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => {
                closed_at_once = Some(i);
                break;
            }
            Ok(Ok(_)) => panic!("the server sent data before any handshake"),
            Err(_) => held.push(socket),
        }
    }
    let closed_at = closed_at_once.expect("a connection beyond server.max_connections must be closed at once");
    assert!(!held.is_empty(), "connections up to the limit are accepted (closed at #{closed_at})");
    assert!(refused() > refused_before, "the refusal is counted");

    // The held connections never handshake, so each is closed after the handshake timeout.
    for (i, socket) in held.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), socket.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "connection {i} without a handshake must be closed after server.tls_handshake_timeout_ms: {read:?}"
        );
    }
    // With the stalled connections gone, calls get through again.
    let mut client = cluster.sync_client(0).await.unwrap();
    assert_eq!(client.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner().node_id, "node-0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_member_loses_access_as_soon_as_a_node_reads_the_new_committee() {
    let mut cluster = Cluster::new(4, 4).await.unwrap();
    let c0 = cluster.start_genesis().await.unwrap();
    let blobs = cluster.store_random_blobs(2, 300, 9).await.unwrap();
    let shard = c0.shards_of(&cluster.nodes[0].id)[0];
    let get = pb::GetSliverRequest { blob_id: blobs[0].0.0.to_vec(), shard: shard.0 };
    let mut removed = cluster.sync_client_as(0, "node-3").await.unwrap();
    removed.get_sliver(get.clone()).await.unwrap();

    // Node 0 reads epoch 1, which removes node-3, and is slow to apply it: it lags.
    ferry_shared::failpoints::fail::cfg("epoch-before-apply", "return(node-0:8000)").unwrap();
    let members = c0.members.iter().filter(|m| m.node_id.as_str() != "node-3").cloned().collect();
    cluster.next_epoch(members).await.unwrap();
    let node0 = cluster.nodes[0].node().unwrap().clone();
    ferry_e2e::wait_until("node-0 refuses the removed node-3", || {
        let (mut removed, get) = (removed.clone(), get.clone());
        async move { Ok(matches!(removed.get_sliver(get).await, Err(e) if e.code() == Code::PermissionDenied)) }
    })
    .await
    .unwrap();
    // Node 0 holds epoch 1 back for 8 s: a refusal that came only with applying it fails here.
    assert_eq!(
        node0.view().committee().map(|c| c.epoch),
        Some(0),
        "node-0 refused node-3 before applying epoch 1, from the committee it read"
    );
    // The remaining members keep access throughout.
    cluster.sync_client_as(0, "node-2").await.unwrap().get_sliver(get).await.unwrap();
    ferry_shared::failpoints::fail::remove("epoch-before-apply");
}
