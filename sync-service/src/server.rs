//! The sync-service's gRPC services: the data plane, `StreamShard`, `WatchSyncState`,
//! `GetStatus`, the calls recovery-service makes, and `SyncAdmin`.
//!
//! Every request is validated before anything is allocated or stored: ids and shard indices
//! are parsed into checked types, slivers and metadata are verified, page sizes are capped.
//!
//! Who may call what is [`method_table`], enforced by `ferry_shared::authz` before a request is
//! decoded: `StreamShard` for nodes (the handler then checks that the caller is the shard's new
//! owner), sliver reads and writes for committee members, clients and operators, the sync-state
//! stream and the recovery calls for this node itself, `RetryShardSync` and
//! `SetSyncConcurrency` for this node and operators, status for any identity of the cluster.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use ferry_proto::v1::{
    self as pb, sync_admin_server::SyncAdmin, sync_service_client::SyncServiceClient, sync_service_server::SyncService,
};
use ferry_shared::{
    Committee,
    authz::{self, Access, ID_LIST_REQUEST_BYTES, Membership, MethodRule, MethodTable, SMALL_REQUEST_BYTES},
    certificate::Certificate,
    crypto::{self, StreamShardIntent},
    erasure::BlobMetadata,
    failpoints,
    grpc::{self, MAX_MESSAGE_BYTES},
    registry::InconsistencyProof,
    tls::PeerIdentity,
    types::{BlobId, NodeId, NodeStatus, ShardIndex, ShardStatus},
};
use futures::Stream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::{
    node::{
        Node, NodeView, attestation,
        index::{self, Offered},
        shard_state::{self, ShardEvent},
        shard_sync,
    },
    store::{BUCKETS, StoreError, TOP_BUCKETS},
};

/// Largest number of blob ids in one `CheckBlobs`, `AuditBlobs`, `GetCertificates` or
/// `CertifyBlobs` request.
pub const MAX_CHECK_BLOBS: usize = 1024;
/// Largest number of blobs in one `StoreBlobs` request.
pub const MAX_STORE_BLOBS: usize = 256;
/// Largest page of `ListCertified`, `ListPending` and `GetRangeDigests`.
pub const MAX_PAGE: usize = 4096;
/// Sliver bytes after which `GetSlivers` answers the rest empty.
pub const MAX_SLIVERS_BYTES: usize = 32 * 1024 * 1024;

fn internal(e: impl std::fmt::Display) -> Status {
    authz::internal_error(e)
}

fn blob_id(bytes: &[u8]) -> Result<BlobId, Status> {
    BlobId::from_bytes(bytes).map_err(Status::from)
}

/// An optional id: empty bytes for none.
fn optional_blob_id(bytes: &[u8]) -> Result<Option<BlobId>, Status> {
    if bytes.is_empty() { Ok(None) } else { blob_id(bytes).map(Some) }
}

/// A requested page size: 0 for the default (1024), at most [`MAX_PAGE`].
fn page_limit(requested: u32) -> usize {
    match requested {
        0 => 1024,
        n => (n as usize).min(MAX_PAGE),
    }
}

/// The ids of a `CheckBlobs` or `AuditBlobs` request, at most [`MAX_CHECK_BLOBS`].
fn blob_id_list(raw: &[Vec<u8>]) -> Result<Vec<BlobId>, Status> {
    if raw.len() > MAX_CHECK_BLOBS {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_CHECK_BLOBS} blob ids per request, got {}",
            raw.len()
        )));
    }
    raw.iter().map(|b| blob_id(b)).collect()
}

/// Remembers recently used `StreamShard` signatures, per requester, so a captured request
/// cannot be replayed within the allowed clock skew. Only requests from the shard's owner with
/// a valid signature get here, and each owner has its own bounded share, so no member can fill
/// the guard for the others.
#[derive(Default)]
struct ReplayGuard {
    seen: Mutex<HashMap<NodeId, HashMap<Vec<u8>, u64>>>,
}

/// Why [`ReplayGuard::first_use`] refused a request.
#[derive(Debug, PartialEq, Eq)]
enum Replay {
    /// The signature was used before.
    Replayed,
    /// The requester has more live requests than [`ReplayGuard::PER_REQUESTER`].
    TooMany,
}

impl ReplayGuard {
    /// Live signatures per requester: far more than the streams an owner opens per skew window.
    const PER_REQUESTER: usize = 1024;

    /// Records `requester`'s signature, valid until `expires_ms`.
    fn first_use(&self, requester: &NodeId, signature: &[u8], expires_ms: u64, now_ms: u64) -> Result<(), Replay> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, signatures| {
            signatures.retain(|_, expires| *expires > now_ms);
            !signatures.is_empty()
        });
        let signatures = seen.entry(requester.clone()).or_default();
        if signatures.contains_key(signature) {
            return Err(Replay::Replayed);
        }
        if signatures.len() >= Self::PER_REQUESTER {
            return Err(Replay::TooMany);
        }
        signatures.insert(signature.to_vec(), expires_ms);
        Ok(())
    }
}

/// Request limit of methods that carry slivers: one message of the largest size.
const DATA_REQUEST_BYTES: usize = MAX_MESSAGE_BYTES + 1024;

/// Clients' reads and stores: their latency (when a client or an operator calls) is what the
/// background throttle protects.
pub const FOREGROUND_METHODS: &[&str] = &[
    "/ferry.v1.SyncService/StoreBlobs",
    "/ferry.v1.SyncService/CertifyBlobs",
    "/ferry.v1.SyncService/StoreMetadata",
    "/ferry.v1.SyncService/StoreSliver",
    "/ferry.v1.SyncService/GetMetadata",
    "/ferry.v1.SyncService/GetSliver",
    "/ferry.v1.SyncService/GetSlivers",
];

/// Every method of the sync-service port: who may call it and its largest request.
pub fn method_table() -> MethodTable {
    use Access::*;
    let rule = |path, access, max_request_bytes| MethodRule { path, access, max_request_bytes };
    MethodTable::new([
        rule("/ferry.v1.SyncService/StoreMetadata", MemberOrClient, ID_LIST_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/StoreSliver", MemberOrClient, DATA_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/StoreBlobs", MemberOrClient, DATA_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/CertifyBlobs", MemberOrClient, DATA_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/GetCertificates", MemberOrClient, ID_LIST_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/ListCertified", MemberOrClient, SMALL_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/GetRangeDigests", MemberOrClient, SMALL_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/ListPending", SelfOnly, SMALL_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/ReportInconsistency", MemberOrClient, DATA_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/GetMetadata", MemberOrClient, SMALL_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/GetSliver", MemberOrClient, SMALL_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/GetSlivers", MemberOrClient, ID_LIST_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/StreamShard", AnyNode, SMALL_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/WatchSyncState", SelfOnly, SMALL_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/GetStatus", Authenticated, SMALL_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/CheckBlobs", MemberOrClient, ID_LIST_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/AuditBlobs", MemberOrClient, ID_LIST_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/MarkShardsRecovered", SelfOnly, ID_LIST_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/GetShardEvidence", SelfOnly, SMALL_REQUEST_BYTES),
        rule("/ferry.v1.SyncService/CompleteRecovery", SelfOnly, SMALL_REQUEST_BYTES),
        rule("/ferry.v1.SyncAdmin/RetryShardSync", SelfOrOperator, SMALL_REQUEST_BYTES),
        rule("/ferry.v1.SyncAdmin/SetSyncConcurrency", SelfOrOperator, SMALL_REQUEST_BYTES),
    ])
}

/// The committee as the authorisation layer sees it: members of the epoch this node is in
/// and of the newest committee it has read ([`Node::admits`]).
pub struct NodeMembership(pub Arc<Node>);

impl Membership for NodeMembership {
    fn me(&self) -> &NodeId {
        &self.0.id
    }
    fn is_member(&self, node: &NodeId) -> bool {
        self.0.admits(node)
    }
}

/// The sync-service gRPC implementation.
#[derive(Clone)]
pub struct SyncServer {
    node: Arc<Node>,
    stream_permits: Arc<Semaphore>,
    replay: Arc<ReplayGuard>,
    shutdown: watch::Receiver<bool>,
}

impl SyncServer {
    /// Waits for the background throttle when a node (a peer, or this node's own recovery)
    /// makes the call: background work yields to clients before it costs disk and CPU.
    /// Clients' and operators' calls never wait here; their latency is what the throttle
    /// protects.
    async fn throttle_nodes<T>(&self, request: &Request<T>, bytes: u64) {
        if matches!(authz::caller(request), Some(PeerIdentity::Node(_))) {
            self.node.throttle.acquire(bytes).await;
        }
    }

    /// Whether the slivers `proof` names, fetched from their owners in `committee` and verified
    /// against this node's metadata of `blob`, decode inconsistently. `false` when this node
    /// has no metadata for the blob, or any sliver cannot be fetched or does not verify.
    async fn claim_checks_out(
        &self,
        committee: &Committee,
        blob: BlobId,
        proof: &InconsistencyProof,
    ) -> Result<bool, Status> {
        let Some(metadata) = self.node.store.call(move |s| s.metadata(&blob)).await.map_err(internal)? else {
            return Ok(false);
        };
        let limit = grpc::sliver_answer_limit(metadata.sliver_len().into_iter());
        let connector = &self.node.connector;
        Ok(proof
            .checks_out(&metadata, |shard| async move {
                let owner = committee.owner(shard)?;
                let address = &committee.member(owner)?.sync_address;
                let channel = connector.channel(address, owner, Some(CLAIM_CHECK_TIMEOUT)).ok()?;
                let mut client = SyncServiceClient::new(channel).max_decoding_message_size(limit);
                let request = pb::GetSliverRequest { blob_id: blob.0.to_vec(), shard: shard.0 };
                Some(client.get_sliver(request).await.ok()?.into_inner().data)
            })
            .await)
    }

    /// A server for `node`; streams end when `shutdown` turns true.
    pub fn new(node: Arc<Node>, shutdown: watch::Receiver<bool>) -> Self {
        let permits = node.config.stream.max_concurrent_streams;
        SyncServer {
            node,
            stream_permits: Arc::new(Semaphore::new(permits)),
            replay: Arc::new(ReplayGuard::default()),
            shutdown,
        }
    }

    /// Metadata from the network, checked against its id and the cluster's shard count.
    fn checked_metadata(&self, id: &BlobId, proto: &pb::BlobMetadata) -> Result<BlobMetadata, Status> {
        let metadata = BlobMetadata::from_proto(proto).map_err(|e| Status::invalid_argument(e.to_string()))?;
        metadata.verify_id(id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(c) = self.node.view().committee()
            && metadata.n_shards != c.n_shards
        {
            return Err(Status::invalid_argument(format!(
                "metadata is for {} shards; this cluster has {}",
                metadata.n_shards, c.n_shards
            )));
        }
        Ok(metadata)
    }

    /// This node's BLS-signed confirmation that it holds the blob in every owned shard.
    fn confirmation(&self, id: &BlobId, epoch: u64) -> pb::StorageConfirmation {
        pb::StorageConfirmation {
            node_id: self.node.id.to_string(),
            blob_id: id.0.to_vec(),
            epoch,
            signature: self.node.key.bls_sign(&crypto::confirmation_message(self.node.cluster(), id, epoch)).to_vec(),
        }
    }

    fn committee_shard(&self, view: &NodeView, raw: u32) -> Result<ShardIndex, Status> {
        let committee =
            view.committee().ok_or_else(|| Status::unavailable("this node has not loaded a committee yet; retry"))?;
        Ok(ShardIndex::checked(raw, committee.n_shards)?)
    }

    /// A shard of the committee that this node holds storage for.
    fn stored_shard(&self, raw: u32) -> Result<ShardIndex, Status> {
        let view = self.node.view();
        let shard = self.committee_shard(&view, raw)?;
        if !view.shards.contains_key(&shard) {
            return Err(Status::not_found(format!("this node holds no storage for shard {shard}")));
        }
        Ok(shard)
    }

    /// Checks a `StreamShard` request: epoch, signature, freshness, ownership, our status.
    fn authorize_stream(&self, req: &pb::StreamShardRequest) -> Result<(ShardIndex, Option<BlobId>), Status> {
        let view = self.node.view();
        let shard = self.committee_shard(&view, req.shard)?;
        let my_epoch = view.epoch();
        if req.epoch > my_epoch {
            return Err(Status::unavailable(format!(
                "this node has processed epoch {my_epoch} only, not {}; retry later",
                req.epoch
            )));
        }
        let requester = NodeId::new(req.requester.clone())?;
        let start = if req.start_blob_id.is_empty() { None } else { Some(blob_id(&req.start_blob_id)?) };
        let committee = view.committee().ok_or_else(|| Status::unavailable("no committee loaded"))?;
        let member = committee
            .member(&requester)
            .ok_or_else(|| Status::permission_denied(format!("{requester} is not a member of epoch {my_epoch}")))?;
        let intent = StreamShardIntent {
            cluster: self.node.cluster(),
            server: &self.node.id,
            shard,
            epoch: req.epoch,
            start,
            requester: &requester,
            timestamp_ms: req.timestamp_ms,
            include_metadata: req.include_metadata,
            limit: req.limit,
            include_certificates: req.include_certificates,
        };
        crypto::verify(&member.public_key, &intent.message(), &req.signature)
            .map_err(|_| Status::permission_denied(format!("the signature of {requester} does not verify")))?;
        let now = crypto::now_ms();
        let skew = self.node.config.stream.max_clock_skew_ms;
        if req.timestamp_ms.abs_diff(now) > skew {
            return Err(Status::permission_denied(format!(
                "request timestamp is {} ms off this node's clock (allowed {skew} ms)",
                req.timestamp_ms.abs_diff(now)
            )));
        }
        let owner = committee.owner(shard);
        if owner != Some(&requester) {
            return Err(Status::permission_denied(format!(
                "{requester} does not own shard {shard} in epoch {my_epoch} (owner: {})",
                owner.map(|o| o.to_string()).unwrap_or_default()
            )));
        }
        // Last, so that only the owner's valid requests take room in the guard.
        match self.replay.first_use(&requester, &req.signature, req.timestamp_ms.saturating_add(skew), now) {
            Ok(()) => {}
            Err(Replay::Replayed) => {
                return Err(Status::permission_denied("replayed request: this signature was used before"));
            }
            Err(Replay::TooMany) => {
                return Err(Status::resource_exhausted(format!(
                    "{requester} has {} shard-stream requests within the clock skew already; retry later",
                    ReplayGuard::PER_REQUESTER
                )));
            }
        }
        // A shard under blob recovery (after a restart, say) is served too: it holds what it
        // holds, and the receiver checks its copy against every certified blob at the end.
        match view.shards.get(&shard).map(|r| r.status) {
            Some(ShardStatus::Active | ShardStatus::ActiveRecover | ShardStatus::LockedToMove) => Ok((shard, start)),
            Some(other) => Err(Status::failed_precondition(format!(
                "this node holds shard {shard} as {other}, still being filled; it cannot serve it"
            ))),
            None => Err(Status::failed_precondition(format!("this node holds no storage for shard {shard}"))),
        }
    }
}

/// How long each owner has to hand over a sliver a claim of inconsistency names.
const CLAIM_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SyncService for SyncServer {
    async fn store_metadata(
        &self,
        request: Request<pb::StoreMetadataRequest>,
    ) -> Result<Response<pb::StoreMetadataResponse>, Status> {
        let req = request.into_inner();
        let id = blob_id(&req.blob_id)?;
        let proto = req.metadata.ok_or_else(|| Status::invalid_argument("metadata is required"))?;
        let metadata = self.checked_metadata(&id, &proto)?;
        self.node.store.call(move |s| s.put_metadata(&id, &metadata)).await.map_err(internal)?;
        Ok(Response::new(pb::StoreMetadataResponse {}))
    }

    async fn store_sliver(
        &self,
        request: Request<pb::StoreSliverRequest>,
    ) -> Result<Response<pb::StoreSliverResponse>, Status> {
        self.throttle_nodes(&request, request.get_ref().data.len() as u64).await;
        let req = request.into_inner();
        let id = blob_id(&req.blob_id)?;
        // Shared transition lock from the status check to the end of the write (also if this
        // call is cancelled meanwhile): no shard is locked or dropped under a sliver landing.
        let data_guard = self.node.data_write().await;
        let view = self.node.view();
        let shard = self.committee_shard(&view, req.shard)?;
        let epoch = view.epoch();
        match view.shards.get(&shard).map(|r| r.status) {
            Some(ShardStatus::LockedToMove) => {
                return Err(Status::failed_precondition(format!(
                    "shard {shard} is locked: it moved to another node in epoch {epoch}"
                )));
            }
            None => {
                let owner = view.committee().and_then(|c| c.owner(shard)).map(|o| o.to_string()).unwrap_or_default();
                return Err(Status::failed_precondition(format!(
                    "this node does not own shard {shard} in epoch {epoch} (owner: {owner})"
                )));
            }
            Some(_) => {}
        }
        let owned: Vec<ShardIndex> = view
            .owned(&self.node.id)
            .into_iter()
            .filter(|s| view.shards.get(s).is_some_and(|r| r.status.is_owned()))
            .collect();
        let data = req.data;
        let complete = data_guard
            .call(move |s| {
                let metadata = s.metadata(&id)?;
                let Some(metadata) = metadata else {
                    return Ok(Err(Status::failed_precondition(format!("no metadata for blob {id}: store it first"))));
                };
                if let Err(e) = metadata.verify_sliver(shard, &data) {
                    return Ok(Err(Status::invalid_argument(e.to_string())));
                }
                // A slow disk write (tests make it slower) that outlives its caller.
                failpoints::fail_point!("store-sliver-write");
                s.put_sliver(shard, &id, &data)?;
                for o in &owned {
                    if !s.has_sliver(*o, &id)? {
                        return Ok(Ok(false));
                    }
                }
                Ok(Ok(true))
            })
            .await
            .map_err(internal)??;
        let confirmation = complete.then(|| self.confirmation(&id, epoch));
        Ok(Response::new(pb::StoreSliverResponse { confirmation }))
    }

    async fn store_blobs(
        &self,
        request: Request<pb::StoreBlobsRequest>,
    ) -> Result<Response<pb::StoreBlobsResponse>, Status> {
        self.throttle_nodes(&request, prost::Message::encoded_len(request.get_ref()) as u64).await;
        let request = request.into_inner();
        let skip_confirmations = request.skip_confirmations;
        let uploads = request.blobs;
        if uploads.len() > MAX_STORE_BLOBS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_STORE_BLOBS} blobs per request, got {}",
                uploads.len()
            )));
        }
        // Everything is checked before anything is written: ids, metadata, shard ownership and
        // every sliver's digest. A bad blob is answered with its error; the others are stored.
        let data_guard = self.node.data_write().await;
        let view = self.node.view();
        let epoch = view.epoch();
        let committee = view.committee().ok_or_else(|| Status::unavailable("no committee loaded yet; retry"))?;
        let owned: Vec<ShardIndex> = view
            .owned(&self.node.id)
            .into_iter()
            .filter(|s| view.shards.get(s).is_some_and(|r| r.status.is_owned()))
            .collect();
        let mut answers: Vec<pb::BlobStored> = Vec::with_capacity(uploads.len());
        let mut accepted: Vec<(usize, BlobId, BlobMetadata, Vec<(ShardIndex, Vec<u8>)>)> = Vec::new();
        for (i, upload) in uploads.into_iter().enumerate() {
            let checked = (|| {
                let id = blob_id(&upload.blob_id)?;
                let proto = upload.metadata.as_ref().ok_or_else(|| Status::invalid_argument("metadata is required"))?;
                let metadata = self.checked_metadata(&id, proto)?;
                let mut slivers = Vec::with_capacity(upload.slivers.len());
                for sliver in upload.slivers {
                    let shard = ShardIndex::checked(sliver.shard, committee.n_shards)?;
                    if !owned.contains(&shard) {
                        return Err(Status::failed_precondition(format!(
                            "this node does not hold shard {shard} for writes in epoch {epoch}"
                        )));
                    }
                    metadata.verify_sliver(shard, &sliver.data).map_err(|e| Status::invalid_argument(e.to_string()))?;
                    slivers.push((shard, sliver.data));
                }
                Ok((id, metadata, slivers))
            })();
            match checked {
                Ok((id, metadata, slivers)) => {
                    answers.push(pb::BlobStored { blob_id: id.0.to_vec(), ..Default::default() });
                    accepted.push((i, id, metadata, slivers));
                }
                Err(status) => answers.push(pb::BlobStored {
                    blob_id: upload.blob_id.clone(),
                    confirmation: None,
                    error: status.message().to_string(),
                }),
            }
        }
        let owned_for_check = owned.clone();
        let complete = data_guard
            .call(move |s| {
                let mut batch = s.counted()?;
                for (_, id, metadata, slivers) in &accepted {
                    batch.put_metadata(id, metadata)?;
                    for (shard, data) in slivers {
                        batch.put_sliver(*shard, id, data)?;
                    }
                }
                batch.commit()?;
                let mut complete = Vec::with_capacity(accepted.len());
                for (i, id, _, _) in &accepted {
                    let mut all = true;
                    for shard in &owned_for_check {
                        if !s.has_sliver(*shard, id)? {
                            all = false;
                            break;
                        }
                    }
                    complete.push((*i, *id, all));
                }
                Ok(complete)
            })
            .await
            .map_err(internal)?;
        for (i, id, all) in complete {
            if skip_confirmations {
                continue;
            }
            if all {
                answers[i].confirmation = Some(self.confirmation(&id, epoch));
            } else {
                answers[i].error = "this node does not hold every owned shard's sliver of the blob yet".into();
            }
        }
        Ok(Response::new(pb::StoreBlobsResponse { blobs: answers }))
    }

    async fn certify_blobs(
        &self,
        request: Request<pb::CertifyBlobsRequest>,
    ) -> Result<Response<pb::CertifyBlobsResponse>, Status> {
        let blobs = request.into_inner().blobs;
        if blobs.len() > MAX_CHECK_BLOBS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_CHECK_BLOBS} certificates per request, got {}",
                blobs.len()
            )));
        }
        let mut errors: Vec<String> = vec![String::new(); blobs.len()];
        let mut offered = Vec::with_capacity(blobs.len());
        let mut positions = Vec::with_capacity(blobs.len());
        for (i, b) in blobs.iter().enumerate() {
            let parsed = BlobId::from_bytes(&b.blob_id).map_err(|e| e.to_string()).and_then(|blob| {
                let proto = b.certificate.as_ref().ok_or("a certificate is required")?;
                let certificate = Certificate::from_proto(proto).map_err(|e| e.to_string())?;
                Ok(Offered { blob, certificate, metadata: None })
            });
            match parsed {
                Ok(o) => {
                    offered.push(o);
                    positions.push(i);
                }
                Err(e) => errors[i] = e,
            }
        }
        let outcomes = index::ingest(&self.node, offered).await.map_err(|e| Status::unavailable(e.to_string()))?;
        for (i, outcome) in positions.into_iter().zip(outcomes) {
            if let Err(e) = outcome {
                errors[i] = e;
            }
        }
        Ok(Response::new(pb::CertifyBlobsResponse { errors }))
    }

    async fn get_certificates(
        &self,
        request: Request<pb::GetCertificatesRequest>,
    ) -> Result<Response<pb::GetCertificatesResponse>, Status> {
        let req = request.into_inner();
        let ids = blob_id_list(&req.blob_ids)?;
        let include_metadata = req.include_metadata;
        let blobs = self
            .node
            .store
            .call(move |s| {
                ids.into_iter()
                    .map(|id| {
                        let mut entry = match s.certified(&id)? {
                            Some(record) => record.to_entry(&id),
                            None => pb::CertifiedEntry { blob_id: id.0.to_vec(), ..Default::default() },
                        };
                        // Metadata checks itself against the blob id: it is sent whenever
                        // asked for, also beside no certificate (a shard sync's receiver may
                        // know the certificate already and lack only the metadata).
                        if include_metadata {
                            entry.metadata = s.metadata(&id)?.map(|m| m.to_proto());
                        }
                        Ok(entry)
                    })
                    .collect::<Result<Vec<_>, StoreError>>()
            })
            .await
            .map_err(internal)?;
        Ok(Response::new(pb::GetCertificatesResponse { blobs }))
    }

    async fn list_certified(
        &self,
        request: Request<pb::ListCertifiedRequest>,
    ) -> Result<Response<pb::ListCertifiedResponse>, Status> {
        let req = request.into_inner();
        let start = optional_blob_id(&req.start_blob_id)?;
        let end = optional_blob_id(&req.end_blob_id)?;
        let limit = page_limit(req.limit);
        let (page, complete) =
            self.node.store.call(move |s| s.list_certified(start, end, limit)).await.map_err(internal)?;
        let blobs = page
            .into_iter()
            .map(|(id, invalid)| pb::CertifiedEntry {
                blob_id: id.0.to_vec(),
                invalid: invalid.as_ref().map(InconsistencyProof::to_proto),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(pb::ListCertifiedResponse { blobs, complete }))
    }

    async fn get_range_digests(
        &self,
        request: Request<pb::GetRangeDigestsRequest>,
    ) -> Result<Response<pb::GetRangeDigestsResponse>, Status> {
        if let Some(delay) = failpoints::delay_for("index-digests", self.node.id.as_str()) {
            tokio::time::sleep(delay).await; // a slow peer, for tests
        }
        let req = request.into_inner();
        let buckets = match req.level {
            1 => TOP_BUCKETS,
            2 => BUCKETS,
            other => return Err(Status::invalid_argument(format!("level must be 1 or 2, got {other}"))),
        };
        let first = req.first as usize;
        let count = (req.count as usize).min(MAX_PAGE);
        if first >= buckets {
            return Err(Status::invalid_argument(format!("first bucket {first} is past the last ({})", buckets - 1)));
        }
        let level = req.level;
        let digests = self.node.store.call(move |s| s.range_digests(level, first, count)).await.map_err(internal)?;
        Ok(Response::new(pb::GetRangeDigestsResponse {
            buckets: digests
                .into_iter()
                .enumerate()
                .map(|(i, d)| pb::RangeDigest { bucket: (first + i) as u32, count: d.count, digest: d.xor.to_vec() })
                .collect(),
        }))
    }

    async fn list_pending(
        &self,
        request: Request<pb::ListPendingRequest>,
    ) -> Result<Response<pb::ListPendingResponse>, Status> {
        let req = request.into_inner();
        let data_guard = self.node.data_write().await;
        let shard = self.stored_shard(req.shard)?;
        let start = optional_blob_id(&req.start_blob_id)?;
        let limit = page_limit(req.limit);
        // Entries whose sliver arrived another way (a client's late write, a scan) are dropped
        // here, so what is listed is what is missing.
        let ids = data_guard
            .call(move |s| {
                let listed = s.pending(shard, start, limit)?;
                let mut missing = Vec::with_capacity(listed.len());
                let mut batch = s.counted()?;
                for id in listed {
                    if s.has_sliver(shard, &id)? || s.certified(&id)?.is_some_and(|r| r.invalid.is_some()) {
                        batch.remove_pending(shard, &id)?;
                    } else {
                        missing.push(id);
                    }
                }
                batch.commit()?;
                Ok(missing)
            })
            .await
            .map_err(internal)?;
        Ok(Response::new(pb::ListPendingResponse { blob_ids: ids.into_iter().map(|id| id.0.to_vec()).collect() }))
    }

    async fn report_inconsistency(
        &self,
        request: Request<pb::ReportInconsistencyRequest>,
    ) -> Result<Response<pb::ReportInconsistencyResponse>, Status> {
        let from_self = matches!(authz::caller(&request), Some(PeerIdentity::Node(n)) if *n == self.node.id);
        let req = request.into_inner();
        let id = blob_id(&req.blob_id)?;
        let view = self.node.view();
        let committee = view.committee().cloned().ok_or_else(|| Status::unavailable("no committee yet"))?;
        let proto = req.proof.ok_or_else(|| Status::invalid_argument("a proof is required"))?;
        let proof = InconsistencyProof::from_proto(&proto, committee.n_shards)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // A recorded claim drops this node's repairs of the blob, so a claim from anyone but this
        // node's own recovery-service (which decoded the blob itself, or checked the claim) is
        // checked here first: the slivers it names, fetched from their owners and verified
        // against this node's metadata, must decode inconsistently.
        if !from_self && !self.claim_checks_out(&committee, id, &proof).await? {
            return Err(Status::failed_precondition(format!(
                "the claim that blob {id} is encoded inconsistently does not check out: the slivers it names \
                 could not all be fetched and verified, or they decode consistently"
            )));
        }
        let shards: Vec<ShardIndex> = view.shards.keys().copied().collect();
        let recorded = self
            .node
            .store
            .call(move |s| {
                let mut batch = s.counted()?;
                let recorded = batch.claim_invalid(&id, &proof)?;
                for shard in &shards {
                    batch.remove_pending(*shard, &id)?;
                }
                batch.commit()?;
                Ok(recorded)
            })
            .await
            .map_err(internal)?;
        if recorded {
            warn!(blob = %id, "blob recorded as encoded inconsistently");
        }
        Ok(Response::new(pb::ReportInconsistencyResponse {}))
    }

    async fn get_metadata(
        &self,
        request: Request<pb::GetMetadataRequest>,
    ) -> Result<Response<pb::GetMetadataResponse>, Status> {
        let id = blob_id(&request.into_inner().blob_id)?;
        let metadata = self.node.store.call(move |s| s.metadata(&id)).await.map_err(internal)?;
        let metadata = metadata.ok_or_else(|| Status::not_found(format!("no metadata for blob {id} on this node")))?;
        Ok(Response::new(pb::GetMetadataResponse { metadata: Some(metadata.to_proto()) }))
    }

    async fn get_sliver(
        &self,
        request: Request<pb::GetSliverRequest>,
    ) -> Result<Response<pb::GetSliverResponse>, Status> {
        let id = blob_id(&request.get_ref().blob_id)?;
        let shard = self.stored_shard(request.get_ref().shard)?;
        let data = self.node.store.call(move |s| s.verified_sliver(shard, &id)).await.map_err(internal)?;
        let data = data.ok_or_else(|| {
            Status::not_found(format!("no verified sliver of blob {id} in shard {shard} on this node"))
        })?;
        self.throttle_nodes(&request, data.len() as u64).await;
        Ok(Response::new(pb::GetSliverResponse { data }))
    }

    async fn get_slivers(
        &self,
        request: Request<pb::GetSliversRequest>,
    ) -> Result<Response<pb::GetSliversResponse>, Status> {
        let ids = blob_id_list(&request.get_ref().blob_ids)?;
        let shard = self.stored_shard(request.get_ref().shard)?;
        let slivers = self
            .node
            .store
            .call(move |s| {
                let mut out = Vec::with_capacity(ids.len());
                let mut bytes = 0usize;
                for id in ids {
                    // Serve only what still verifies, and stop at the size limit (the caller
                    // asks again for what came back empty).
                    let sliver = match (bytes < MAX_SLIVERS_BYTES).then(|| s.verified_sliver(shard, &id)).transpose()? {
                        Some(Some(data)) => data,
                        _ => Vec::new(),
                    };
                    bytes += sliver.len();
                    out.push(sliver);
                }
                Ok(out)
            })
            .await
            .map_err(internal)?;
        self.throttle_nodes(&request, slivers.iter().map(|s| s.len() as u64).sum()).await;
        Ok(Response::new(pb::GetSliversResponse { slivers }))
    }

    type StreamShardStream = BoxStream<pb::ShardItem>;

    async fn stream_shard(
        &self,
        request: Request<pb::StreamShardRequest>,
    ) -> Result<Response<Self::StreamShardStream>, Status> {
        let caller = authz::caller(&request).cloned();
        let req = request.into_inner();
        if let Some(PeerIdentity::Node(id)) = &caller {
            // The signature proves the key; the certificate must prove the same node.
            if id.as_str() != req.requester {
                return Err(Status::permission_denied(format!(
                    "node {id} may not stream shards on behalf of {:?}",
                    req.requester
                )));
            }
        }
        let (shard, start) = self.authorize_stream(&req)?;
        let cfg = self.node.config.stream.clone();
        // The permit moves into the producer, so it bounds streams for their whole life.
        let permit = tokio::time::timeout(Duration::from_secs(5), self.stream_permits.clone().acquire_owned())
            .await
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "this node is serving {} shard streams already; retry",
                    cfg.max_concurrent_streams
                ))
            })?
            .map_err(internal)?;
        let limit = if req.limit == 0 { cfg.max_items } else { req.limit.min(cfg.max_items) };
        let (tx, rx) = mpsc::channel(cfg.channel_capacity);
        let store = self.node.store.clone();
        let include_metadata = req.include_metadata;
        let include_certificates = req.include_certificates;
        let requester = req.requester.clone();
        let mut shutdown = self.shutdown.clone();
        info!(shard = shard.0, %requester, start = ?start, "serving shard stream");
        let node = self.node.clone();
        let label = shard.0.to_string();
        let (streamed_items, streamed_bytes) = (
            node.metrics.streamed_items.with_label_values(&[label.as_str()]),
            node.metrics.streamed_bytes.with_label_values(&[label.as_str()]),
        );
        self.node.spawn_background(async move {
            let _permit = permit;
            let mut cursor = start;
            let mut sent: u64 = 0;
            let mut sent_bytes: u64 = 0;
            let started = tokio::time::Instant::now();
            let send_timeout = Duration::from_millis(cfg.send_timeout_ms);
            loop {
                let batch_items = cfg.read_batch_items.min((limit - sent) as usize).max(1);
                let read = store
                    .call(move |s| {
                        let slivers = s.read_shard(shard, cursor, batch_items, 8 * 1024 * 1024)?;
                        slivers
                            .into_iter()
                            .map(|(id, data)| {
                                let metadata = if include_metadata { s.metadata(&id)?.map(|m| m.to_proto()) } else { None };
                                let certificate = if include_certificates {
                                    s.certified(&id)?.map(|r| r.certificate.to_proto())
                                } else {
                                    None
                                };
                                Ok(pb::ShardItem {
                                    blob_id: id.0.to_vec(),
                                    data,
                                    metadata,
                                    certificate,
                                    ..Default::default()
                                })
                            })
                            .collect::<Result<Vec<_>, StoreError>>()
                    })
                    .await;
                let items = match read {
                    Ok(items) => items,
                    Err(e) => {
                        // A read error ends the stream with an error, never as a clean end.
                        warn!(shard = shard.0, error = %e, "store read failed while streaming");
                        let _ = tx.send(Err(internal(format!("store read failed: {e}")))).await;
                        return;
                    }
                };
                let Some(last) = items.last().and_then(|i| BlobId::from_bytes(&i.blob_id).ok()) else {
                    let _ = tokio::time::timeout(send_timeout, tx.send(Ok(pb::ShardItem { end: true, ..Default::default() }))).await;
                    return;
                };
                for item in items {
                    let item_len = item.data.len() as u64;
                    tokio::select! {
                        sent_result = tokio::time::timeout(send_timeout, tx.send(Ok(item))) => match sent_result {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => { debug!(shard = shard.0, "reader went away"); return; }
                            Err(_) => { warn!(shard = shard.0, %requester, "reader took no item for {:?}; dropping the stream", send_timeout); return; }
                        },
                        _ = shutdown.wait_for(|s| *s) => {
                            let _ = tx.try_send(Err(Status::unavailable("node shutting down; resume from your cursor")));
                            return;
                        }
                    }
                    sent += 1;
                    sent_bytes += item_len;
                    streamed_items.inc();
                    streamed_bytes.inc_by(item_len);
                    // Serving a shard is background work: it yields to this node's clients.
                    node.throttle.acquire(item_len).await;
                    // Read per item so a live config change applies to running streams too.
                    let rate = node.stream_rate.load(Ordering::Relaxed);
                    if rate > 0 {
                        // Pace the stream: sleep until the bytes sent fit the configured rate.
                        let due = started + Duration::from_secs_f64(sent_bytes as f64 / rate as f64);
                        tokio::time::sleep_until(due).await;
                    }
                    if sent >= limit {
                        break;
                    }
                }
                let finale = match last.successor() {
                    Some(next) if sent < limit => {
                        cursor = Some(next);
                        continue;
                    }
                    // Stopped at the limit, not at the end: the receiver asks again.
                    Some(_) => pb::ShardItem { limit_reached: true, ..Default::default() },
                    None => pb::ShardItem { end: true, ..Default::default() }, // the largest id
                };
                let _ = tokio::time::timeout(send_timeout, tx.send(Ok(finale))).await;
                return;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchSyncStateStream = BoxStream<pb::SyncState>;

    async fn watch_sync_state(
        &self,
        _request: Request<pb::WatchSyncStateRequest>,
    ) -> Result<Response<Self::WatchSyncStateStream>, Status> {
        if failpoints::is_on("sync-state-stream") {
            return Err(Status::unavailable("fail point sync-state-stream: the sync-state stream is down"));
        }
        // One channel carries the view and the running-sync count, so every state sent is one
        // the node was actually in.
        let node = self.node.clone();
        let views = node.subscribe();
        let shutdown = self.shutdown.clone();
        let stream = futures::stream::unfold(
            (node, views, shutdown, None::<pb::SyncState>, false),
            |(node, mut views, mut shutdown, last, broken)| async move {
                if broken {
                    return None;
                }
                loop {
                    if last.is_some() {
                        let broke = tokio::select! {
                            r = views.changed() => if r.is_err() { return None } else { false },
                            _ = shutdown.wait_for(|s| *s) => return None,
                            () = failpoints::tripped("sync-state-stream") => true,
                        };
                        if broke {
                            let down = Status::unavailable("fail point sync-state-stream: the sync-state stream broke");
                            return Some((Err(down), (node, views, shutdown, last, true)));
                        }
                    }
                    let view = views.borrow_and_update().clone();
                    let state = sync_state(&node, &view);
                    if last.as_ref() != Some(&state) {
                        return Some((Ok(state.clone()), (node, views, shutdown, Some(state), false)));
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let view = self.node.view();
        let (status, recovery_epoch) = view.status().to_proto();
        // Counts kept with the data they count: O(shards), whatever the number of blobs.
        let counts = self.node.store.call(|s| s.counts()).await.map_err(internal)?;
        let shards = view
            .shards
            .iter()
            .map(|(shard, record)| {
                let live = self.node.live(*shard);
                pb::ShardReport {
                    shard: shard.0,
                    status: record.status.to_proto() as i32,
                    sliver_count: counts.slivers.get(shard).map(|d| d.count).unwrap_or(0),
                    sliver_bytes: counts.slivers.get(shard).map(|d| d.bytes).unwrap_or(0),
                    pending: counts.pending.get(shard).copied().unwrap_or(0),
                    sync: record.sync.as_ref().map(|p| {
                        let rate = live
                            .as_ref()
                            .and_then(|l| {
                                l.started.map(|t| l.blobs_this_attempt as f64 / t.elapsed().as_secs_f64().max(0.001))
                            })
                            .unwrap_or(0.0);
                        pb::ShardSyncProgress {
                            gained_epoch: p.gained_epoch,
                            source: p.source.as_ref().map(|s| s.to_string()).unwrap_or_default(),
                            blobs_done: p.blobs_done,
                            bytes_done: p.bytes_done,
                            last_blob_id: p.cursor.map(|c| c.to_hex()).unwrap_or_default(),
                            attempts: p.attempts,
                            last_error: p.last_error.clone().unwrap_or_default(),
                            rate_blobs_per_sec: rate,
                            pending_recovery: p.pending,
                            running: self.node.sync_running(*shard),
                            started_at_ms: p.started_at_ms,
                            finished_at_ms: p.finished_at_ms,
                        }
                    }),
                }
            })
            .collect();
        Ok(Response::new(pb::GetStatusResponse {
            node_id: self.node.id.to_string(),
            epoch: view.epoch(),
            node_status: status as i32,
            recovery_epoch,
            running_syncs: self.node.counter.current(),
            shards,
            metadata_count: counts.metadata,
            certified_count: counts.certified.count,
            index_caught_up: view.index_caught_up,
            index_learned: self.node.metrics.index_learned.get(),
            pending_count: counts.pending.values().sum(),
        }))
    }

    async fn check_blobs(
        &self,
        request: Request<pb::CheckBlobsRequest>,
    ) -> Result<Response<pb::CheckBlobsResponse>, Status> {
        let ids = blob_id_list(&request.into_inner().blob_ids)?;
        let view = self.node.view();
        let owned: Vec<ShardIndex> =
            view.owned(&self.node.id).into_iter().filter(|s| view.shards.contains_key(s)).collect();
        let blobs = self
            .node
            .store
            .call(move |s| {
                let held = owned.iter().map(|shard| Ok((shard.0, s.slivers_present(*shard, &ids)?))).collect::<Result<
                    Vec<_>,
                    StoreError,
                >>(
                )?;
                ids.iter()
                    .map(|id| {
                        let has_metadata = s.has_metadata(id)?;
                        let missing = held.iter().filter(|(_, h)| !h.contains(id)).map(|(shard, _)| *shard).collect();
                        Ok(pb::BlobPresence { blob_id: id.0.to_vec(), has_metadata, missing_shards: missing })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()
            })
            .await
            .map_err(internal)?;
        Ok(Response::new(pb::CheckBlobsResponse { blobs }))
    }

    async fn audit_blobs(
        &self,
        request: Request<pb::AuditBlobsRequest>,
    ) -> Result<Response<pb::AuditBlobsResponse>, Status> {
        let ids = blob_id_list(&request.into_inner().blob_ids)?;
        let view = self.node.view();
        let owned = view.owned(&self.node.id);
        let with_storage: Vec<(ShardIndex, bool)> = owned.iter().map(|s| (*s, view.shards.contains_key(s))).collect();
        let blobs = self
            .node
            .store
            .call(move |s| {
                ids.into_iter()
                    .map(|id| {
                        let metadata = s.metadata(&id)?;
                        let mut audit = pb::BlobAudit {
                            blob_id: id.0.to_vec(),
                            has_metadata: metadata.is_some(),
                            ..Default::default()
                        };
                        for (shard, stored) in &with_storage {
                            let sliver = if *stored { s.sliver(*shard, &id)? } else { None };
                            match (sliver, &metadata) {
                                (None, _) => audit.missing_shards.push(shard.0),
                                (Some(data), Some(m)) if m.verify_sliver(*shard, &data).is_ok() => {}
                                (Some(_), _) => audit.corrupt_shards.push(shard.0),
                            }
                        }
                        Ok(audit)
                    })
                    .collect::<Result<Vec<_>, StoreError>>()
            })
            .await
            .map_err(internal)?;
        Ok(Response::new(pb::AuditBlobsResponse {
            epoch: view.epoch(),
            owned_shards: owned.iter().map(|s| s.0).collect(),
            blobs,
        }))
    }

    async fn mark_shards_recovered(
        &self,
        request: Request<pb::MarkShardsRecoveredRequest>,
    ) -> Result<Response<pb::MarkShardsRecoveredResponse>, Status> {
        let req = request.into_inner();
        let activated = {
            let guard = self.node.transition().await;
            let view = guard.view().await.map_err(internal)?;
            if req.epoch != view.epoch() {
                return Err(Status::failed_precondition(format!(
                    "the node is at epoch {}, not {}; rescan and retry",
                    view.epoch(),
                    req.epoch
                )));
            }
            let owned = view.owned(&self.node.id);
            let mut updates = Vec::new();
            for scan in req.shards {
                let shard = self.committee_shard(&view, scan.shard)?;
                if !owned.contains(&shard) {
                    return Err(Status::failed_precondition(format!(
                        "this node does not own shard {shard} in epoch {}",
                        view.epoch()
                    )));
                }
                match view.shards.get(&shard) {
                    Some(r) if r.status == ShardStatus::Active => {}
                    other => {
                        // Only the scan the shard needs now completes it: a scan of an earlier
                        // history (before a restart, say) is refused, and recovery scans again.
                        let next = shard_state::apply(other, &ShardEvent::Recovered { scan_id: scan.scan_id })
                            .map_err(|e| Status::failed_precondition(format!("shard {shard}: {e}")))?;
                        updates.push((shard, next));
                    }
                }
            }
            let activated: Vec<u32> = updates.iter().map(|(s, _)| s.0).collect();
            guard.call(move |s| s.put_shard_records(&updates)).await.map_err(internal)?;
            activated
        };
        if !activated.is_empty() {
            info!(shards = ?activated, "blob recovery completed shards");
        }
        self.node.mirror_status().await;
        attestation::attest_if_ready(&self.node).await;
        Ok(Response::new(pb::MarkShardsRecoveredResponse { activated }))
    }

    async fn get_shard_evidence(
        &self,
        _request: Request<pb::GetShardEvidenceRequest>,
    ) -> Result<Response<pb::GetShardEvidenceResponse>, Status> {
        let view = self.node.view();
        let evidence = attestation::evidence(&self.node, &view).await.map_err(internal)?;
        let evidence = evidence.ok_or_else(|| {
            Status::failed_precondition("the certified index has not caught up with the peers, or an owned shard is not ACTIVE or has pending repairs")
        })?;
        Ok(Response::new(pb::GetShardEvidenceResponse {
            epoch: view.epoch(),
            evidence: evidence
                .into_iter()
                .map(|e| pb::ShardEvidence {
                    shard: e.shard.0,
                    blob_count: e.blob_count,
                    blob_ids_digest: hex::decode(&e.blob_ids_digest).unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn complete_recovery(
        &self,
        request: Request<pb::CompleteRecoveryRequest>,
    ) -> Result<Response<pb::CompleteRecoveryResponse>, Status> {
        let epoch = request.into_inner().epoch;
        {
            let guard = self.node.transition().await;
            let view = guard.view().await.map_err(internal)?;
            let Some(mut state) = view.state.clone() else {
                return Err(Status::failed_precondition("the node has no state yet"));
            };
            if state.status != NodeStatus::RecoveryInProgress(epoch) {
                return Err(Status::failed_precondition(format!(
                    "the node is {}, not RecoveryInProgress({epoch})",
                    state.status
                )));
            }
            if !state.committee.is_member(&self.node.id) {
                return Err(Status::failed_precondition(format!("the node is not a member of epoch {epoch}")));
            }
            let owned = view.owned(&self.node.id);
            if let Some(s) = owned.iter().find(|s| view.shards.get(s).map(|r| r.status) != Some(ShardStatus::Active)) {
                return Err(Status::failed_precondition(format!("shard {s} is not ACTIVE yet")));
            }
            if epoch > 0
                && self
                    .node
                    .control_plane
                    .attestation(epoch, &self.node.id)
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?
                    .is_none()
            {
                return Err(Status::failed_precondition(format!("attest epoch {epoch} before completing recovery")));
            }
            state.status = NodeStatus::Active;
            guard.call(move |s| s.put_node_state(&state)).await.map_err(internal)?;
        }
        info!(epoch, "node recovery complete; node is Active");
        self.node.mirror_status().await;
        Ok(Response::new(pb::CompleteRecoveryResponse { node_status: pb::NodeStatus::Active as i32 }))
    }
}

fn sync_state(node: &Node, view: &NodeView) -> pb::SyncState {
    let (status, recovery_epoch) = view.status().to_proto();
    let owned = view.owned(&node.id);
    let status_of = |s: &ShardIndex| view.shards.get(s).map(|r| r.status);
    let recovering = owned
        .iter()
        .filter_map(|s| {
            let r = view.shards.get(s)?;
            (r.status == ShardStatus::ActiveRecover)
                .then(|| pb::ShardScan { shard: s.0, scan_id: r.scan_id.unwrap_or(0) })
        })
        .collect();
    pb::SyncState {
        epoch: view.epoch(),
        node_status: status as i32,
        recovery_epoch,
        running_syncs: view.running_syncs,
        shards_not_active: owned.iter().filter(|s| status_of(s) != Some(ShardStatus::Active)).map(|s| s.0).collect(),
        owned_shards: owned.iter().map(|s| s.0).collect(),
        syncing_shards: owned.iter().filter(|s| status_of(s) == Some(ShardStatus::ActiveSync)).map(|s| s.0).collect(),
        recovering,
        index_caught_up: view.index_caught_up,
        repair_generation: view.repair_generation,
    }
}

#[tonic::async_trait]
impl SyncAdmin for SyncServer {
    async fn retry_shard_sync(
        &self,
        request: Request<pb::RetryShardSyncRequest>,
    ) -> Result<Response<pb::RetryShardSyncResponse>, Status> {
        let raw = request.into_inner().shard;
        {
            let guard = self.node.transition().await;
            let view = guard.view().await.map_err(internal)?;
            let shard = self.committee_shard(&view, raw)?;
            let current =
                view.shards.get(&shard).ok_or_else(|| Status::not_found(format!("no storage for shard {shard}")))?;
            let record = shard_state::apply(Some(current), &ShardEvent::RetrySync).map_err(|_| {
                Status::failed_precondition(format!(
                    "shard {shard} is {} and has no failed sync to retry",
                    current.status
                ))
            })?;
            guard.call(move |s| s.put_shard_record(shard, &record)).await.map_err(internal)?;
            drop(guard);
            info!(shard = shard.0, "operator retried shard sync");
            shard_sync::spawn_shard_sync(&self.node, shard);
        }
        Ok(Response::new(pb::RetryShardSyncResponse {}))
    }

    async fn set_sync_concurrency(
        &self,
        request: Request<pb::SetSyncConcurrencyRequest>,
    ) -> Result<Response<pb::SetSyncConcurrencyResponse>, Status> {
        let n = request.into_inner().max_concurrent_syncs;
        if n == 0 || n > 1024 {
            return Err(Status::invalid_argument("max_concurrent_syncs must be between 1 and 1024"));
        }
        let previous = self.node.sync_limit.set_limit(n as usize) as u32;
        info!(previous, now = n, "shard sync concurrency changed");
        Ok(Response::new(pb::SetSyncConcurrencyResponse { previous }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_method_has_exactly_one_rule() {
        let services = ["ferry.v1.SyncService", "ferry.v1.SyncAdmin"];
        let mismatches = method_table().mismatches(ferry_proto::FILE_DESCRIPTOR_SET, &services).unwrap();
        assert!(mismatches.is_empty(), "{mismatches:#?}");
    }

    #[test]
    fn the_replay_guard_refuses_replays_and_bounds_each_requester_alone() {
        let guard = ReplayGuard::default();
        let (a, b) = (NodeId::new("node-a").unwrap(), NodeId::new("node-b").unwrap());
        guard.first_use(&a, b"sig", 100, 0).unwrap();
        assert_eq!(guard.first_use(&a, b"sig", 100, 50), Err(Replay::Replayed));
        // One requester filling its share does not lock the others out.
        for i in 1..ReplayGuard::PER_REQUESTER {
            guard.first_use(&a, &i.to_be_bytes(), 100, 0).unwrap();
        }
        assert_eq!(guard.first_use(&a, b"one more", 100, 0), Err(Replay::TooMany));
        guard.first_use(&b, b"sig", 100, 0).unwrap();
        // Expired signatures leave room again (a replay after expiry fails the clock-skew check).
        guard.first_use(&a, b"one more", 300, 101).unwrap();
    }
}
