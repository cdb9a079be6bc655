//! The blob client `ferryctl` and the tests use: store a blob (encode, register, send
//! metadata and slivers to every shard's owner in parallel, gather signed confirmations
//! until owners of a quorum of shards confirmed, certify) and read it back (any `k` verified
//! slivers, fastest owners first).

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{
    committee::Committee,
    control_plane::{BlobRecord, Certificate, Confirmation, ControlPlane, ControlPlaneError},
    crypto,
    erasure::{self, BlobMetadata, EncodedBlob, ErasureError},
    grpc::{self, Connector, TracedChannel},
    types::{BlobId, NodeId, ShardIndex},
};
use ferry_proto::v1::{self as pb, sync_service_client::SyncServiceClient};
use futures::{StreamExt, stream::FuturesUnordered};
use thiserror::Error;

/// A client failure.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The control plane failed.
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    /// Encoding or decoding failed.
    #[error(transparent)]
    Erasure(#[from] ErasureError),
    /// The cluster has not started.
    #[error("FERRY-CLI-001: the cluster has no committee yet; is it up?")]
    NoCommittee,
    /// Too few owners confirmed.
    #[error("FERRY-CLI-002: owners of {have} shards confirmed blob {blob}; a quorum needs {need} ({detail})")]
    NoQuorum {
        /// Blob.
        blob: BlobId,
        /// Shards confirmed.
        have: u32,
        /// Quorum.
        need: u32,
        /// What the others said.
        detail: String,
    },
    /// The blob is unknown or not certified.
    #[error("FERRY-CLI-003: blob {0} is not certified (unknown, or its store did not finish)")]
    NotCertified(BlobId),
    /// The blob's slivers are not one codeword: its writer encoded it inconsistently.
    #[error("FERRY-CLI-005: blob {0} is invalid: its writer encoded it inconsistently, so no read can be trusted")]
    Invalid(BlobId),
    /// Too few verified slivers for a read.
    #[error("FERRY-CLI-004: could read only {have} of {need} verified slivers of blob {blob} ({detail})")]
    NotEnoughSlivers {
        /// Blob.
        blob: BlobId,
        /// Verified slivers.
        have: usize,
        /// k.
        need: usize,
        /// What went wrong.
        detail: String,
    },
}

/// Called as slivers are sent: (bytes sent so far, bytes to send in all).
pub type ProgressFn = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Stores and reads blobs.
#[derive(Clone)]
pub struct BlobClient {
    control_plane: ControlPlane,
    connector: Connector,
    timeout: Duration,
    progress: Option<ProgressFn>,
}

impl std::fmt::Debug for BlobClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobClient({:?})", self.control_plane)
    }
}

fn sync_client(
    connector: &Connector,
    address: &str,
    node: &NodeId,
    timeout: Duration,
) -> Result<SyncServiceClient<TracedChannel>, String> {
    let channel = connector.channel(address, node, Some(timeout)).map_err(|s| s.message().to_string())?;
    Ok(SyncServiceClient::new(channel)
        .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(grpc::MAX_MESSAGE_BYTES))
}

impl BlobClient {
    /// A client over the control plane that reaches nodes through `connector` (mutual TLS with
    /// a client certificate in production), with a per-request timeout.
    pub fn new(control_plane: ControlPlane, connector: Connector, timeout: Duration) -> Self {
        BlobClient { control_plane, connector, timeout, progress: None }
    }

    /// Reports store progress to `progress` (for a progress bar on large files).
    pub fn with_progress(mut self, progress: ProgressFn) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Stores a blob and returns its id once certified. Storing the same bytes again is
    /// idempotent. If the epoch changes during the store, it retries under the new committee.
    pub async fn store(&self, data: &[u8]) -> Result<BlobId, ClientError> {
        let mut last_err = None;
        for attempt in 0..3u32 {
            let committee = self.control_plane.current_committee().await?.ok_or(ClientError::NoCommittee)?;
            let encoded = erasure::encode(data, committee.n_shards)?;
            match self.store_encoded(&committee, &encoded).await {
                Ok(id) => return Ok(id),
                Err(e @ ClientError::NoQuorum { .. }) => {
                    last_err = Some(e);
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt + 1))).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(ClientError::NoCommittee))
    }

    /// Stores an encoded blob under `committee`.
    pub async fn store_encoded(&self, committee: &Committee, encoded: &EncodedBlob) -> Result<BlobId, ClientError> {
        let id = encoded.blob_id;
        let record = BlobRecord {
            blob_id: id,
            length: encoded.metadata.length,
            registered_epoch: committee.epoch,
            certificate: None,
            invalid: None,
        };
        let stored = self.control_plane.register_blob(&record).await?;
        if stored.certificate.is_some() {
            return Ok(id);
        }
        let mut by_owner: BTreeMap<&NodeId, Vec<ShardIndex>> = BTreeMap::new();
        for (i, owner) in committee.assignment.iter().enumerate() {
            by_owner.entry(owner).or_default().push(ShardIndex(i as u32));
        }
        let mut tasks = FuturesUnordered::new();
        let total: u64 = encoded.slivers.iter().map(|s| s.len() as u64).sum();
        let sent = Arc::new(AtomicU64::new(0));
        for (owner, shards) in by_owner {
            let Some(member) = committee.member(owner) else { continue };
            let address = member.sync_address.clone();
            let owner = owner.clone();
            let metadata = encoded.metadata.to_proto();
            let slivers: Vec<(ShardIndex, Vec<u8>)> =
                shards.iter().map(|s| (*s, encoded.slivers[s.as_usize()].clone())).collect();
            let timeout = self.timeout;
            let (sent, progress) = (sent.clone(), self.progress.clone());
            let connector = self.connector.clone();
            tasks.push(async move {
                let result: Result<Option<pb::StorageConfirmation>, String> = async {
                    let mut client = sync_client(&connector, &address, &owner, timeout)?;
                    client
                        .store_metadata(pb::StoreMetadataRequest { blob_id: id.0.to_vec(), metadata: Some(metadata) })
                        .await
                        .map_err(|s| s.message().to_string())?;
                    let mut confirmation = None;
                    for (shard, data) in slivers {
                        let len = data.len() as u64;
                        let r = client
                            .store_sliver(pb::StoreSliverRequest { blob_id: id.0.to_vec(), shard: shard.0, data })
                            .await
                            .map_err(|s| s.message().to_string())?;
                        confirmation = r.into_inner().confirmation.or(confirmation);
                        let now = sent.fetch_add(len, Ordering::Relaxed) + len;
                        if let Some(p) = &progress {
                            p(now, total);
                        }
                    }
                    Ok(confirmation)
                }
                .await;
                (owner, result)
            });
        }
        let mut confirmations = Vec::new();
        let mut errors = Vec::new();
        while let Some((owner, result)) = tasks.next().await {
            match result {
                Ok(Some(c)) => {
                    // Keep only confirmations of this committee's epoch, from the node itself.
                    let valid = c.epoch == committee.epoch
                        && c.node_id == owner.as_str()
                        && committee.member(&owner).is_some_and(|m| {
                            crypto::verify(
                                &m.public_key,
                                &crypto::confirmation_message(&owner, &id, c.epoch),
                                &c.signature,
                            )
                            .is_ok()
                        });
                    if valid {
                        confirmations.push(Confirmation { node_id: owner, signature: hex::encode(&c.signature) });
                    } else {
                        errors.push(format!(
                            "{owner}: confirmation for epoch {} does not verify under epoch {}",
                            c.epoch, committee.epoch
                        ));
                    }
                }
                Ok(None) => errors.push(format!("{owner}: no confirmation")),
                Err(e) => errors.push(format!("{owner}: {e}")),
            }
        }
        let certificate = Certificate { epoch: committee.epoch, confirmations };
        let have = committee.shards_owned_by(certificate.confirmations.iter().map(|c| &c.node_id));
        if certificate.verify(&id, committee).is_err() {
            return Err(ClientError::NoQuorum {
                blob: id,
                have,
                need: committee.quorum_shards(),
                detail: errors.join("; "),
            });
        }
        self.control_plane.certify_blob(&id, certificate).await?;
        Ok(id)
    }

    /// Reads a certified blob: metadata from any owner (verified), then the first `k`
    /// verified slivers to arrive from all owners, decoded.
    pub async fn read(&self, id: &BlobId) -> Result<Vec<u8>, ClientError> {
        let record = self.control_plane.blob(id).await?.ok_or(ClientError::NotCertified(*id))?;
        if record.certificate.is_none() {
            return Err(ClientError::NotCertified(*id));
        }
        if record.invalid.is_some() {
            return Err(ClientError::Invalid(*id));
        }
        let committee = self.control_plane.current_committee().await?.ok_or(ClientError::NoCommittee)?;
        let metadata = self.metadata(&committee, id).await?;
        let k = metadata.k as usize;
        let mut tasks = FuturesUnordered::new();
        for shard in 0..committee.n_shards {
            let shard = ShardIndex(shard);
            let Some(member) = committee.owner(shard).and_then(|o| committee.member(o)) else { continue };
            let (address, node) = (member.sync_address.clone(), member.node_id.clone());
            let timeout = self.timeout;
            let blob = *id;
            let connector = self.connector.clone();
            tasks.push(async move {
                let r = async {
                    let mut c = sync_client(&connector, &address, &node, timeout)?;
                    c.get_sliver(pb::GetSliverRequest { blob_id: blob.0.to_vec(), shard: shard.0 })
                        .await
                        .map(|r| r.into_inner().data)
                        .map_err(|s| s.message().to_string())
                }
                .await;
                (shard, r)
            });
        }
        let mut got: Vec<(ShardIndex, Vec<u8>)> = Vec::new();
        let mut errors = Vec::new();
        while let Some((shard, r)) = tasks.next().await {
            match r {
                Ok(data) if metadata.verify_sliver(shard, &data).is_ok() => got.push((shard, data)),
                Ok(_) => errors.push(format!("shard {shard}: sliver does not verify")),
                Err(e) => errors.push(format!("shard {shard}: {e}")),
            }
            if got.len() >= k {
                break;
            }
        }
        if got.len() < k {
            return Err(ClientError::NotEnoughSlivers {
                blob: *id,
                have: got.len(),
                need: k,
                detail: errors.join("; "),
            });
        }
        let slivers: Vec<(ShardIndex, &[u8])> = got.iter().map(|(s, d)| (*s, d.as_slice())).collect();
        let data = erasure::decode(&metadata, &slivers).map_err(|e| match e {
            ErasureError::InconsistentEncoding { .. } => ClientError::Invalid(*id),
            other => other.into(),
        })?;
        // Each sliver matched its digest, but only one codeword decodes to the same bytes from
        // any k of them: re-encode and compare, so an inconsistently written blob is refused
        // instead of read differently depending on which owners answered first.
        if erasure::encode(&data, metadata.n_shards)?.blob_id != *id {
            return Err(ClientError::Invalid(*id));
        }
        Ok(data)
    }

    async fn metadata(&self, committee: &Committee, id: &BlobId) -> Result<BlobMetadata, ClientError> {
        let mut errors = Vec::new();
        for member in &committee.members {
            let result = async {
                let mut c = sync_client(&self.connector, &member.sync_address, &member.node_id, self.timeout)?;
                let proto = c
                    .get_metadata(pb::GetMetadataRequest { blob_id: id.0.to_vec() })
                    .await
                    .map_err(|s| s.message().to_string())?
                    .into_inner()
                    .metadata
                    .ok_or("empty metadata")?;
                let m = BlobMetadata::from_proto(&proto).map_err(|e| e.to_string())?;
                m.verify_id(id).map_err(|e| e.to_string())?;
                Ok::<_, String>(m)
            }
            .await;
            match result {
                Ok(m) => return Ok(m),
                Err(e) => errors.push(format!("{}: {e}", member.node_id)),
            }
        }
        Err(ClientError::NotEnoughSlivers {
            blob: *id,
            have: 0,
            need: 1,
            detail: format!("no verified metadata: {}", errors.join("; ")),
        })
    }
}
