//! sync-service's handlers driven by arbitrary requests from arbitrary callers, against a real
//! node: a real RocksDB store, its committee (the fixture's, this node being `node-0`) read
//! from an in-memory control plane, the server built the way the service builds it. What the
//! authorisation layer lets through before decoding is the `peer_identity` target's; this one
//! is what a handler then does with any body.
//!
//! Invariants, checked after every call: no panic; every sliver stored verifies against
//! metadata stored under its blob id, which itself hashes to that id; no blob is certified but
//! the fixture's (no certificate can be forged) and none is marked invalid (the fixture blob
//! is one codeword, so no proof against it can check out).
#![no_main]

use std::{sync::OnceLock, time::Duration};

use ferry_fuzz::{CLUSTER, fixture};
use ferry_proto::v1::{self as pb, sync_admin_server::SyncAdmin, sync_service_server::SyncService};
use ferry_shared::{
    authz::VerifiedCaller,
    config::ControlPlaneConfig,
    control_plane::ControlPlane,
    crypto::NodeKeypair,
    tls::{PeerIdentity, TlsConfig},
    types::{BlobId, NodeId},
};
use ferry_sync_service::{SyncServiceHandle, config::SyncConfig, server::SyncServer};
use futures::StreamExt;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tokio::runtime::Runtime;

struct Harness {
    runtime: Runtime,
    handle: SyncServiceHandle,
    server: SyncServer,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let f = fixture();
        let key_file = dir.path().join("node-0.key");
        // The fixture's committee member `node-0` holds this key (seeded like the fixture's).
        NodeKeypair::from_seed([1; 32]).save(&key_file).unwrap();
        let mut config = SyncConfig {
            node_id: "node-0".into(),
            key_file,
            listen: ([127, 0, 0, 1], 0).into(),
            health_listen: ([127, 0, 0, 1], 0).into(),
            metrics_listen: ([127, 0, 0, 1], 0).into(),
            tls: TlsConfig::plaintext(),
            control_plane: ControlPlaneConfig { cluster: CLUSTER.into(), ..ControlPlaneConfig::default() },
            ..SyncConfig::default()
        };
        config.store.path = dir.path().join("store");
        // No peer answers (their addresses are closed ports): do not wait long for them.
        config.index.catch_up_deadline_ms = 100;
        let (handle, server) = runtime.block_on(async {
            let control_plane = ControlPlane::in_memory(CLUSTER);
            control_plane.propose_epoch(&f.committee).await.unwrap();
            let handle = ferry_sync_service::start_with(config, control_plane).await.unwrap();
            let mut view = handle.node.subscribe();
            tokio::time::timeout(Duration::from_secs(30), view.wait_for(|v| v.state.is_some()))
                .await
                .expect("the node loads its committee")
                .unwrap();
            let (_, shutdown) = tokio::sync::watch::channel(false);
            let server = SyncServer::new(handle.node.clone(), shutdown);
            (handle, server)
        });
        Harness { runtime, handle, server, _dir: dir }
    })
}

fn caller(selector: u8) -> Option<PeerIdentity> {
    let node = |n: &str| Some(PeerIdentity::Node(NodeId::new(n).unwrap()));
    match selector % 6 {
        0 => None,
        1 => node("node-0"),
        2 => node("node-1"),
        3 => node("stranger"),
        4 => Some(PeerIdentity::Client("app".into())),
        _ => Some(PeerIdentity::Operator("ops".into())),
    }
}

fn request<T>(message: T, caller: &Option<PeerIdentity>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.extensions_mut().insert(VerifiedCaller(caller.clone()));
    request
}

/// Decodes `bytes` as the request of method `$method` and calls it; a body that does not
/// decode is what tonic refuses before any handler runs.
macro_rules! call {
    ($server:expr, $caller:expr, $bytes:expr, $method:ident, $request:ty) => {{
        if let Ok(message) = <$request>::decode($bytes) {
            let _ = $server.$method(request(message, $caller)).await;
        }
    }};
}

async fn call(server: &SyncServer, method: u8, who: &Option<PeerIdentity>, bytes: &[u8]) {
    match method % 17 {
        0 => call!(server, who, bytes, store_metadata, pb::StoreMetadataRequest),
        1 => call!(server, who, bytes, store_sliver, pb::StoreSliverRequest),
        2 => call!(server, who, bytes, store_blobs, pb::StoreBlobsRequest),
        3 => call!(server, who, bytes, certify_blobs, pb::CertifyBlobsRequest),
        4 => call!(server, who, bytes, get_certificates, pb::GetCertificatesRequest),
        5 => call!(server, who, bytes, list_certified, pb::ListCertifiedRequest),
        6 => call!(server, who, bytes, get_range_digests, pb::GetRangeDigestsRequest),
        7 => call!(server, who, bytes, list_pending, pb::ListPendingRequest),
        8 => call!(server, who, bytes, report_inconsistency, pb::ReportInconsistencyRequest),
        9 => call!(server, who, bytes, get_metadata, pb::GetMetadataRequest),
        10 => call!(server, who, bytes, get_sliver, pb::GetSliverRequest),
        11 => call!(server, who, bytes, get_slivers, pb::GetSliversRequest),
        12 => call!(server, who, bytes, get_status, pb::GetStatusRequest),
        13 => call!(server, who, bytes, check_blobs, pb::CheckBlobsRequest),
        14 => call!(server, who, bytes, audit_blobs, pb::AuditBlobsRequest),
        15 => call!(server, who, bytes, set_sync_concurrency, pb::SetSyncConcurrencyRequest),
        _ => {
            if let Ok(message) = pb::StreamShardRequest::decode(bytes)
                && let Ok(response) = server.stream_shard(request(message, who)).await
            {
                // A few items are enough to run the producer; the rest is dropped unread.
                let mut items = response.into_inner().take(4);
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), async { while items.next().await.is_some() {} }).await;
            }
        }
    }
}

fuzz_target!(
    // The node starts before the first input, so its start-up is not timed as one.
    init: {
        harness();
    },
    |data: &[u8]| run(data)
);

// Input: `[method: u8][caller: u8][request protobuf]`
fn run(data: &[u8]) {
    let Some(([method, who], bytes)) = ferry_fuzz::header::<2>(data) else { return };
    let h = harness();
    // This node's own recovery-service reports what it decoded itself: trusted by design, so
    // not a claim to fuzz (every other caller's claim is checked before it is recorded).
    if method % 17 == 8 && who % 6 == 1 {
        return;
    }
    let who = caller(who);
    h.runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), call(&h.server, method, &who, bytes))
            .await
            .expect("a handler took over 10 s");
        let fixture_id = fixture().blob.blob_id;
        let problems = h
            .handle
            .node
            .store
            .call(move |s| {
                let mut problems = Vec::new();
                let (certified, _) = s.list_certified(None, None, 1000)?;
                for (id, invalid) in certified {
                    if id != fixture_id {
                        problems.push(format!("{id} certified, but only the fixture blob has a certificate"));
                    }
                    if invalid.is_some() {
                        problems.push(format!("{id} marked invalid, yet it is one codeword"));
                    }
                }
                // Every shard this node holds storage for (the others have none to check).
                for shard in s.shard_records()?.into_keys() {
                    let mut ids: Vec<BlobId> = Vec::new();
                    s.for_each_blob_in_shard(shard, |id| ids.push(*id))?;
                    for id in ids {
                        let Some(metadata) = s.metadata(&id)? else {
                            problems.push(format!("a sliver of {id} in shard {shard} without metadata"));
                            continue;
                        };
                        if metadata.verify_id(&id).is_err() {
                            problems.push(format!("metadata stored under {id} is not its own"));
                        }
                        let sliver = s.sliver(shard, &id)?.unwrap_or_default();
                        if metadata.verify_sliver(shard, &sliver).is_err() {
                            problems.push(format!("the sliver of {id} in shard {shard} does not verify"));
                        }
                    }
                }
                Ok(problems)
            })
            .await
            .expect("the store answers");
        assert!(problems.is_empty(), "{problems:#?}");
    });
}
