//! Blob recovery: rebuild a blob's missing slivers in this node's shards from other shards'
//! owners by erasure decoding.
//!
//! Metadata comes from this node's sync-service or a peer and is verified against the blob
//! id. Slivers are fetched from the owners of other shards, starting at a blob-dependent
//! offset so load spreads across peers, `k` at a time, moving on to further owners when one is
//! down, slow or sends bytes that do not verify. One decode rebuilds every wanted sliver,
//! each verified again before it is stored through sync-service. Nothing is stored unless the
//! whole decode verified.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use ferry_proto::v1::{self as pb, sync_service_client::SyncServiceClient};
use ferry_shared::{
    Committee,
    erasure::{self, BlobMetadata},
    grpc::{self, Connector, TracedChannel},
    registry::InconsistencyProof,
    types::{BlobId, NodeId, ShardIndex},
};
use futures::{StreamExt, stream::FuturesUnordered};
use thiserror::Error;
use tracing::debug;

/// Why a blob could not be recovered now (it is retried later).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BlobRecoveryError {
    /// No peer served metadata that hashes to the blob id.
    #[error("FERRY-RECOVER-001: no verified metadata for blob {0} from any peer")]
    NoMetadata(BlobId),
    /// Fewer than k verified slivers could be fetched.
    #[error(
        "FERRY-RECOVER-002: only {have} of the {need} slivers needed for blob {blob} could be fetched and verified ({detail})"
    )]
    NotEnoughSlivers {
        /// Blob.
        blob: BlobId,
        /// Verified slivers fetched.
        have: usize,
        /// k.
        need: usize,
        /// What went wrong with the others.
        detail: String,
    },
    /// Decoding or verification of a rebuilt sliver failed.
    #[error("FERRY-RECOVER-003: decoding blob {0} failed: {1}")]
    Decode(BlobId, String),
    /// This node's sync-service refused or failed to store the result.
    #[error("FERRY-RECOVER-004: storing recovered slivers of {0} failed: {1}")]
    Store(BlobId, String),
    /// The blob's verified slivers are not one codeword: its writer encoded it inconsistently.
    /// It can never be recovered; the proof lets every node check that for itself.
    #[error("FERRY-RECOVER-005: blob {blob} is encoded inconsistently: decoding shards {:?} rebuilds shard {} unlike its digest", proof.shards.iter().map(|s| s.0).collect::<Vec<_>>(), proof.mismatched.0)]
    Inconsistent {
        /// Blob.
        blob: BlobId,
        /// The slivers decoded and the sliver that came out wrong.
        proof: InconsistencyProof,
    },
}

/// What a successful recovery did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Slivers stored.
    pub slivers: usize,
    /// Sliver bytes fetched from peers (and this node).
    pub bytes_fetched: u64,
}

/// Clients to peers' sync-services, created lazily and reused. With TLS, each channel checks
/// that the server is the node the committee lists at that address.
pub struct Peers {
    me: NodeId,
    own: TracedChannel,
    connector: Connector,
    timeout: Duration,
    channels: Mutex<HashMap<(NodeId, String), TracedChannel>>,
}

impl Peers {
    /// Peer clients for node `me`, whose own sync-service is reached over `own`.
    pub fn new(me: NodeId, own: TracedChannel, connector: Connector, timeout: Duration) -> Self {
        Peers { me, own, connector, timeout, channels: Mutex::new(HashMap::new()) }
    }

    /// This node.
    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// A client to this node's own sync-service.
    pub fn own(&self) -> SyncServiceClient<TracedChannel> {
        SyncServiceClient::new(self.own.clone())
            .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(grpc::MAX_MESSAGE_BYTES)
    }

    /// A client to `node`'s sync-service at the address `committee` lists.
    pub fn client(&self, committee: &Committee, node: &NodeId) -> Option<SyncServiceClient<TracedChannel>> {
        if node == &self.me {
            return Some(self.own());
        }
        let key = (node.clone(), committee.member(node)?.sync_address.clone());
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(&key) {
            Some(c) => c.clone(),
            None => {
                let c = self.connector.channel(&key.1, node, Some(self.timeout)).ok()?;
                channels.insert(key, c.clone());
                c
            }
        };
        Some(SyncServiceClient::new(channel).max_decoding_message_size(grpc::MAX_MESSAGE_BYTES))
    }
}

fn spread_offset(blob: &BlobId, n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (u64::from_be_bytes([blob.0[0], blob.0[1], blob.0[2], blob.0[3], blob.0[4], blob.0[5], blob.0[6], blob.0[7]])
            % n as u64) as usize
    }
}

/// The largest honest `GetMetadata` answer for `n_shards`: a 32-byte digest per shard.
fn metadata_response_limit(n_shards: u32) -> usize {
    n_shards as usize * 40 + grpc::ANSWER_OVERHEAD_BYTES
}

/// Fetches verified metadata: this node first, then the owners of every shard.
pub async fn fetch_metadata(
    peers: &Peers,
    committee: &Committee,
    blob: &BlobId,
) -> Result<BlobMetadata, BlobRecoveryError> {
    let mut candidates: Vec<NodeId> = vec![peers.me.clone()];
    let mut owners: Vec<NodeId> =
        committee.members.iter().map(|m| m.node_id.clone()).filter(|n| n != &peers.me).collect();
    let offset = spread_offset(blob, owners.len());
    owners.rotate_left(offset);
    candidates.extend(owners);
    for node in candidates {
        let Some(client) = peers.client(committee, &node) else { continue };
        let mut client = client.max_decoding_message_size(metadata_response_limit(committee.n_shards));
        let Ok(Ok(response)) = tokio::time::timeout(
            peers.timeout,
            client.get_metadata(pb::GetMetadataRequest { blob_id: blob.0.to_vec() }),
        )
        .await
        else {
            continue;
        };
        let Some(proto) = response.into_inner().metadata else { continue };
        match BlobMetadata::from_proto(&proto).and_then(|m| m.verify_id(blob).map(|()| m)) {
            Ok(m) if m.n_shards == committee.n_shards => return Ok(m),
            Ok(_) | Err(_) => debug!(%node, %blob, "peer served metadata that does not verify"),
        }
    }
    Err(BlobRecoveryError::NoMetadata(*blob))
}

/// Recovers the slivers of `blob` for `wanted` shards and stores them through sync-service.
pub async fn recover_blob(
    peers: &Arc<Peers>,
    committee: &Committee,
    blob: BlobId,
    wanted: &[ShardIndex],
) -> Result<Recovered, BlobRecoveryError> {
    ferry_shared::failpoints::fail_point!("recover-blob");
    let metadata = fetch_metadata(peers, committee, &blob).await?;
    // Make sure our own sync-service has the metadata before it gets slivers.
    let mut own = peers.own();
    own.store_metadata(pb::StoreMetadataRequest { blob_id: blob.0.to_vec(), metadata: Some(metadata.to_proto()) })
        .await
        .map_err(|s| BlobRecoveryError::Store(blob, s.message().to_string()))?;

    let k = metadata.k as usize;
    // Candidate shards: every shard except the wanted ones, rotated to spread load.
    let mut sources: Vec<ShardIndex> =
        (0..committee.n_shards).map(ShardIndex).filter(|s| !wanted.contains(s)).collect();
    let offset = spread_offset(&blob, sources.len());
    sources.rotate_left(offset);
    let mut sources = sources.into_iter();
    let mut got: Vec<(ShardIndex, Vec<u8>)> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let mut in_flight = FuturesUnordered::new();
    let mut bytes_fetched = 0u64;
    loop {
        while got.len() + in_flight.len() < k {
            let Some(shard) = sources.next() else { break };
            let Some(owner) = committee.owner(shard).cloned() else { continue };
            let Some(client) = peers.client(committee, &owner) else {
                errors.push(format!("no address for {owner}"));
                continue;
            };
            let mut client =
                client.max_decoding_message_size(grpc::sliver_answer_limit(metadata.sliver_len().into_iter()));
            let timeout = peers.timeout;
            in_flight.push(async move {
                let r = tokio::time::timeout(
                    timeout,
                    client.get_sliver(pb::GetSliverRequest { blob_id: blob.0.to_vec(), shard: shard.0 }),
                )
                .await;
                (shard, owner, r)
            });
        }
        let Some((shard, owner, result)) = in_flight.next().await else { break };
        match result {
            Err(_) => errors.push(format!("{owner} timed out")),
            Ok(Err(status)) => errors.push(format!("{owner}: {}", status.code())),
            Ok(Ok(response)) => {
                let data = response.into_inner().data;
                bytes_fetched += data.len() as u64;
                match metadata.verify_sliver(shard, &data) {
                    Ok(()) => got.push((shard, data)),
                    Err(_) => errors.push(format!("{owner} sent a sliver of shard {shard} that does not verify")),
                }
            }
        }
        if got.len() >= k {
            break;
        }
    }
    drop(in_flight);
    if got.len() < k {
        errors.truncate(6);
        return Err(BlobRecoveryError::NotEnoughSlivers { blob, have: got.len(), need: k, detail: errors.join("; ") });
    }
    let available: Vec<(ShardIndex, &[u8])> = got.iter().map(|(s, d)| (*s, d.as_slice())).collect();
    let rebuilt = erasure::rebuild(&metadata, &available, wanted).map_err(|e| match e {
        erasure::ErasureError::InconsistentEncoding { shard } => BlobRecoveryError::Inconsistent {
            blob,
            proof: InconsistencyProof {
                shards: got.iter().map(|(s, _)| *s).collect(),
                mismatched: ShardIndex(shard),
                reported_by: peers.me.clone(),
            },
        },
        other => BlobRecoveryError::Decode(blob, other.to_string()),
    })?;

    let mut slivers = 0;
    for (shard, data) in rebuilt {
        own.store_sliver(pb::StoreSliverRequest { blob_id: blob.0.to_vec(), shard: shard.0, data })
            .await
            .map_err(|s| BlobRecoveryError::Store(blob, format!("shard {shard}: {}", s.message())))?;
        slivers += 1;
    }
    Ok(Recovered { slivers, bytes_fetched })
}

/// Checks another node's claim that `blob` is encoded inconsistently: fetches the slivers the
/// proof names from their owners, checks each against the metadata and decodes them. `false`
/// if any cannot be fetched or the decode comes out consistent: the claim is then not honoured
/// and the blob is recovered as any other (which finds a real inconsistency again).
pub async fn confirm_inconsistency(
    peers: &Arc<Peers>,
    committee: &Committee,
    blob: BlobId,
    proof: &InconsistencyProof,
) -> bool {
    let Ok(metadata) = fetch_metadata(peers, committee, &blob).await else { return false };
    let limit = grpc::sliver_answer_limit(metadata.sliver_len().into_iter());
    proof
        .checks_out(&metadata, |shard| async move {
            let owner = committee.owner(shard)?.clone();
            let mut client = peers.client(committee, &owner)?.max_decoding_message_size(limit);
            let request = pb::GetSliverRequest { blob_id: blob.0.to_vec(), shard: shard.0 };
            let response = tokio::time::timeout(peers.timeout, client.get_sliver(request)).await.ok()?.ok()?;
            Some(response.into_inner().data)
        })
        .await
}

/// One blob of a batch: the shards of this node to rebuild it into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The blob.
    pub blob: BlobId,
    /// Shards lacking its sliver.
    pub shards: Vec<ShardIndex>,
}

/// Sliver bytes fetched per source shard in one go: bounds a batch's memory at about
/// `k x BATCH_BYTES`, plus what is rebuilt.
pub const BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Per blob of a batch, what its recovery came to.
pub type BatchOutcome = Vec<(BlobId, Result<Recovered, BlobRecoveryError>)>;

/// Slivers by shard.
type Slivers = Vec<(ShardIndex, Vec<u8>)>;

/// Blobs rebuilt, with how many slivers each, and their uploads: one `StoreBlobs` request.
type UploadChunk = (Vec<(BlobId, usize)>, Vec<pb::BlobUpload>);

/// Recovers many blobs together: metadata from this node's index (which holds it for the
/// blobs it learned) or from peers, slivers from the owners of `k` other shards with one
/// `GetSlivers` call per shard and sub-batch, a decode per blob off the async workers (a task
/// each, so one panicking decode fails only its blob), and one `StoreBlobs` write per sub-batch
/// of everything rebuilt. A blob that cannot be completed this way (an owner down, a sliver
/// that does not verify) falls back to [`recover_blob`], which tries every other owner.
pub async fn recover_batch(peers: &Arc<Peers>, committee: &Committee, batch: Vec<Wanted>) -> BatchOutcome {
    let mut results = Vec::with_capacity(batch.len());
    // Metadata: this node's own copy first (one call), then peers for the rest.
    let ids: Vec<Vec<u8>> = batch.iter().map(|w| w.blob.0.to_vec()).collect();
    let mut own = peers.own();
    let local: HashMap<BlobId, BlobMetadata> =
        match own.get_certificates(pb::GetCertificatesRequest { blob_ids: ids, include_metadata: true }).await {
            Ok(r) => r
                .into_inner()
                .blobs
                .iter()
                .filter_map(|e| {
                    let id = BlobId::from_bytes(&e.blob_id).ok()?;
                    let m = BlobMetadata::from_proto(e.metadata.as_ref()?).ok()?;
                    (m.verify_id(&id).is_ok() && m.n_shards == committee.n_shards).then_some((id, m))
                })
                .collect(),
            Err(_) => HashMap::new(),
        };
    let mut ready: Vec<(Wanted, BlobMetadata)> = Vec::with_capacity(batch.len());
    for w in batch {
        match local.get(&w.blob) {
            Some(m) => ready.push((w, m.clone())),
            None => match fetch_metadata(peers, committee, &w.blob).await {
                Ok(m) => ready.push((w, m)),
                Err(e) => results.push((w.blob, Err(e))),
            },
        }
    }
    // Sub-batches bounded by sliver bytes per source shard.
    let mut sub: Vec<(Wanted, BlobMetadata)> = Vec::new();
    let mut bytes = 0usize;
    for (w, m) in ready {
        let len = m.sliver_len().unwrap_or(0);
        if !sub.is_empty() && bytes + len > BATCH_BYTES {
            results.extend(recover_sub_batch(peers, committee, std::mem::take(&mut sub)).await);
            bytes = 0;
        }
        bytes += len;
        sub.push((w, m));
    }
    if !sub.is_empty() {
        results.extend(recover_sub_batch(peers, committee, sub).await);
    }
    results
}

async fn recover_sub_batch(
    peers: &Arc<Peers>,
    committee: &Committee,
    batch: Vec<(Wanted, BlobMetadata)>,
) -> Vec<(BlobId, Result<Recovered, BlobRecoveryError>)> {
    let Some(k) = batch.first().map(|(_, m)| m.k as usize) else { return Vec::new() };
    let wanted_anywhere: std::collections::BTreeSet<ShardIndex> =
        batch.iter().flat_map(|(w, _)| w.shards.iter().copied()).collect();
    let mut sources: Vec<ShardIndex> =
        (0..committee.n_shards).map(ShardIndex).filter(|s| !wanted_anywhere.contains(s)).collect();
    let offset = spread_offset(&batch[0].0.blob, sources.len());
    sources.rotate_left(offset);
    let ids: Vec<Vec<u8>> = batch.iter().map(|(w, _)| w.blob.0.to_vec()).collect();
    // At most k answers of this size are held at once, whatever the peers send.
    let answer_limit = grpc::sliver_answer_limit(batch.iter().map(|(_, m)| m.sliver_len().unwrap_or(0)));
    // Verified slivers per blob, filled source shard by source shard until each has k.
    let mut got: Vec<Slivers> = vec![Vec::new(); batch.len()];
    let mut fetched = vec![0u64; batch.len()];
    let mut sources = sources.into_iter();
    loop {
        let short = got.iter().filter(|g| g.len() < k).count();
        if short == 0 {
            break;
        }
        // As many sources at once as the neediest blob still lacks.
        let need = got.iter().map(|g| k.saturating_sub(g.len())).max().unwrap_or(0);
        let round: Vec<ShardIndex> = sources.by_ref().take(need).collect();
        if round.is_empty() {
            break;
        }
        let mut calls = FuturesUnordered::new();
        for shard in round {
            let Some(owner) = committee.owner(shard).cloned() else { continue };
            let Some(client) = peers.client(committee, &owner) else { continue };
            let mut client = client.max_decoding_message_size(answer_limit);
            let request = pb::GetSliversRequest { shard: shard.0, blob_ids: ids.clone() };
            let timeout = peers.timeout;
            calls.push(async move { (shard, tokio::time::timeout(timeout, client.get_slivers(request)).await) });
        }
        while let Some((shard, answer)) = calls.next().await {
            let Ok(Ok(answer)) = answer else {
                debug!(shard = shard.0, "a source shard's owner did not answer GetSlivers");
                continue;
            };
            for (i, data) in answer.into_inner().slivers.into_iter().enumerate() {
                let Some((_, metadata)) = batch.get(i) else { break };
                if got[i].len() < k && !data.is_empty() && metadata.verify_sliver(shard, &data).is_ok() {
                    fetched[i] += data.len() as u64;
                    got[i].push((shard, data));
                }
            }
        }
    }
    // Decode each blob that has k verified slivers, a task apiece.
    let mut decodes = tokio::task::JoinSet::new();
    let mut by_task = HashMap::new();
    let mut results = Vec::with_capacity(batch.len());
    let mut fallback = Vec::new();
    for ((wanted, metadata), slivers) in batch.into_iter().zip(got) {
        if slivers.len() < k {
            fallback.push(wanted);
            continue;
        }
        let me = peers.me.clone();
        let blob = wanted.blob;
        let handle = decodes.spawn_blocking(move || {
            ferry_shared::failpoints::fail_point!("recover-blob", |_| Err(BlobRecoveryError::Decode(
                blob,
                "fail point recover-blob".into()
            )));
            let available: Vec<(ShardIndex, &[u8])> = slivers.iter().map(|(s, d)| (*s, d.as_slice())).collect();
            erasure::rebuild(&metadata, &available, &wanted.shards).map(|rebuilt| (metadata, rebuilt)).map_err(|e| {
                match e {
                    erasure::ErasureError::InconsistentEncoding { shard } => BlobRecoveryError::Inconsistent {
                        blob,
                        proof: InconsistencyProof {
                            shards: slivers.iter().map(|(s, _)| *s).collect(),
                            mismatched: ShardIndex(shard),
                            reported_by: me,
                        },
                    },
                    other => BlobRecoveryError::Decode(blob, other.to_string()),
                }
            })
        });
        by_task.insert(handle.id(), blob);
    }
    let fetched_of: HashMap<BlobId, u64> =
        ids.iter().zip(&fetched).filter_map(|(id, n)| Some((BlobId::from_bytes(id).ok()?, *n))).collect();
    let mut to_store: Vec<(BlobId, BlobMetadata, Slivers)> = Vec::new();
    while let Some(done) = decodes.join_next_with_id().await {
        match done {
            Ok((task, Ok((metadata, rebuilt)))) => {
                if let Some(blob) = by_task.remove(&task) {
                    to_store.push((blob, metadata, rebuilt));
                }
            }
            Ok((task, Err(e))) => {
                if let Some(blob) = by_task.remove(&task) {
                    results.push((blob, Err(e)));
                }
            }
            Err(e) => {
                if let Some(blob) = by_task.remove(&e.id()) {
                    results.push((blob, Err(BlobRecoveryError::Decode(blob, format!("the decode task failed: {e}")))));
                }
            }
        }
    }
    // One write per chunk of what was rebuilt.
    let mut own = peers.own();
    let mut chunk: Vec<(BlobId, usize)> = Vec::new();
    let mut uploads: Vec<pb::BlobUpload> = Vec::new();
    let mut chunk_bytes = 0usize;
    let mut pending_chunks: Vec<UploadChunk> = Vec::new();
    for (blob, metadata, rebuilt) in to_store {
        let bytes: usize = rebuilt.iter().map(|(_, d)| d.len()).sum();
        if !uploads.is_empty() && (uploads.len() >= 256 || chunk_bytes + bytes > BATCH_BYTES) {
            pending_chunks.push((std::mem::take(&mut chunk), std::mem::take(&mut uploads)));
            chunk_bytes = 0;
        }
        chunk_bytes += bytes;
        chunk.push((blob, rebuilt.len()));
        uploads.push(pb::BlobUpload {
            blob_id: blob.0.to_vec(),
            metadata: Some(metadata.to_proto()),
            slivers: rebuilt.into_iter().map(|(s, data)| pb::SliverUpload { shard: s.0, data }).collect(),
        });
    }
    if !uploads.is_empty() {
        pending_chunks.push((chunk, uploads));
    }
    for (chunk, uploads) in pending_chunks {
        match own.store_blobs(pb::StoreBlobsRequest { blobs: uploads, skip_confirmations: true }).await {
            Ok(answer) => {
                let answer = answer.into_inner().blobs;
                for (i, (blob, slivers)) in chunk.into_iter().enumerate() {
                    let error = answer.get(i).map(|a| a.error.clone()).unwrap_or_else(|| "no answer".into());
                    results.push((
                        blob,
                        if error.is_empty() {
                            Ok(Recovered { slivers, bytes_fetched: fetched_of.get(&blob).copied().unwrap_or(0) })
                        } else {
                            Err(BlobRecoveryError::Store(blob, error))
                        },
                    ));
                }
            }
            Err(status) => {
                for (blob, _) in chunk {
                    results.push((blob, Err(BlobRecoveryError::Store(blob, status.message().to_string()))));
                }
            }
        }
    }
    // The rest one by one, trying every owner.
    for wanted in fallback {
        results.push((wanted.blob, recover_blob(peers, committee, wanted.blob, &wanted.shards).await));
    }
    results
}
