//! Mutual TLS and per-call authorisation over real sockets: who may stream a shard, read
//! slivers, follow the sync state and pause recovery, and that clients verify the server is
//! the node the committee names.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_e2e::{CLIENT, Cluster};
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

fn stream_request(key: &NodeKeypair, requester: &NodeId, shard: ShardIndex) -> pb::StreamShardRequest {
    StreamShardIntent {
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
    let anon_channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(
                    std::fs::read(cluster.tls_dir().join("ca.pem")).unwrap(),
                ))
                .domain_name(tls::node_server_name(&owner)),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut anon = SyncServiceClient::new(anon_channel);
    let err = anon.stream_shard(stream_request(&owner_key, &owner, shard)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // Public calls need no certificate.
    let status = anon.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.node_id, owner.as_str());

    // A certificate from another CA, for the very same node id: the handshake fails.
    let foreign = tempfile::tempdir().unwrap();
    tls::write_dev_pki(foreign.path(), std::slice::from_ref(&owner), CLIENT).unwrap();
    let mut foreign_cfg = TlsConfig::from_dir(foreign.path(), owner.as_str());
    foreign_cfg.ca_file = cluster.tls_dir().join("ca.pem"); // trusts the real server
    let foreign_connector = Connector::new(foreign_cfg.load(None).unwrap());
    let mut foreign_client = SyncServiceClient::new(foreign_connector.channel(&addr, &owner, None).unwrap());
    let err = foreign_client.stream_shard(stream_request(&owner_key, &owner, shard)).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled),
        "a foreign CA's certificate must not get through: {err:?}"
    );

    // A valid certificate of a member that does not own the shard, with its own key.
    let other = cluster.nodes[2].id.clone();
    let other_key = NodeKeypair::load(&cluster.nodes[2].key_file).unwrap();
    let mut non_owner = cluster.sync_client_as(1, other.as_str()).await.unwrap();
    let err = count_items(&mut non_owner, stream_request(&other_key, &other, shard)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("does not own shard"), "{}", err.message());
    // The non-owner replaying the owner's signed request: the certificate does not match.
    let err = count_items(&mut non_owner, stream_request(&owner_key, &owner, shard)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("on behalf of"), "{}", err.message());
    // A client certificate is no node certificate.
    let mut as_client = cluster.sync_client_as(1, CLIENT).await.unwrap();
    let err = count_items(&mut as_client, stream_request(&owner_key, &owner, shard)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // The owner, with its own certificate and key, gets the whole shard.
    let mut owner_client = cluster.sync_client_as(1, owner.as_str()).await.unwrap();
    assert_eq!(count_items(&mut owner_client, stream_request(&owner_key, &owner, shard)).await.unwrap(), 6);
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

    // Pausing recovery: another node may not, an operator may.
    let mut as_peer = RecoveryServiceClient::new(cluster.recovery_channel_as(0, "node-1").unwrap());
    let err = as_peer.pause_recovery(pb::PauseRecoveryRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut as_operator = RecoveryServiceClient::new(cluster.recovery_channel_as(0, CLIENT).unwrap());
    as_operator.pause_recovery(pb::PauseRecoveryRequest {}).await.unwrap();
    assert!(as_operator.get_recovery_status(pb::GetRecoveryStatusRequest {}).await.unwrap().into_inner().paused);
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
