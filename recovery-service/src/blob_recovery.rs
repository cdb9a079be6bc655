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
    control_plane::InconsistencyProof,
    erasure::{self, BlobMetadata},
    grpc::{self, Connector, TracedChannel},
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

    /// A client to this node's own sync-service.
    pub fn own(&self) -> SyncServiceClient<TracedChannel> {
        SyncServiceClient::new(self.own.clone())
            .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(grpc::MAX_MESSAGE_BYTES)
    }

    fn client(&self, committee: &Committee, node: &NodeId) -> Option<SyncServiceClient<TracedChannel>> {
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
        let Some(mut client) = peers.client(committee, &node) else { continue };
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
            let Some(mut client) = peers.client(committee, &owner) else {
                errors.push(format!("no address for {owner}"));
                continue;
            };
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
    if proof.shards.len() < metadata.k as usize || proof.shards.iter().any(|s| s.0 >= committee.n_shards) {
        return false;
    }
    let mut got = Vec::new();
    for shard in &proof.shards {
        let Some(owner) = committee.owner(*shard).cloned() else { return false };
        let Some(mut client) = peers.client(committee, &owner) else { return false };
        let request = pb::GetSliverRequest { blob_id: blob.0.to_vec(), shard: shard.0 };
        let Ok(Ok(response)) = tokio::time::timeout(peers.timeout, client.get_sliver(request)).await else {
            return false;
        };
        let data = response.into_inner().data;
        if metadata.verify_sliver(*shard, &data).is_err() {
            return false;
        }
        got.push((*shard, data));
    }
    let slivers: Vec<(ShardIndex, &[u8])> = got.iter().map(|(s, d)| (*s, d.as_slice())).collect();
    erasure::confirms_inconsistency(&metadata, &slivers)
}
