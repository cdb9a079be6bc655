//! The blob client `ferryctl` and the tests use.
//!
//! Store: encode each blob, send every owner its blobs' metadata and slivers a batch per request
//! (`StoreBlobs`: one durable write per batch on the node), add the owners' BLS confirmations
//! into one certificate per blob, and deliver the certificates to every member
//! (`CertifyBlobs`). A blob is stored once members owning a quorum of shards accepted its
//! certificate; members that missed it learn it from their peers (anti-entropy). The client
//! never writes the control plane; it reads only the committee.
//!
//! Read: a certificate from any node (verified here), metadata from any node (verified against
//! the id), then the first `k` verified slivers to arrive, decoded and re-encoded to check
//! they are one codeword.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{
    certificate::{Certificate, CertificateBuilder, CommitteeKeys},
    committee::Committee,
    control_plane::{ControlPlane, ControlPlaneError},
    erasure::{self, BlobMetadata, EncodedBlob, ErasureError},
    grpc::{self, Connector, TracedChannel},
    registry::{CommitteeCache, RegistryError},
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
    /// A committee or certificate could not be used.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The cluster has not started.
    #[error("FERRY-CLI-001: the cluster has no committee yet; is it up?")]
    NoCommittee,
    /// Too few owners confirmed, or too few members took the certificate.
    #[error("FERRY-CLI-002: owners of {have} shards {what} blob {blob}; a quorum needs {need} ({detail})")]
    NoQuorum {
        /// Blob.
        blob: BlobId,
        /// What the owners did: "confirmed" or "accepted the certificate of".
        what: &'static str,
        /// Shards confirmed.
        have: u32,
        /// Quorum.
        need: u32,
        /// What the others said.
        detail: String,
    },
    /// No node holds a valid certificate of the blob.
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

/// Largest number of blobs in one `StoreBlobs` request (the server's cap).
pub const STORE_BATCH_BLOBS: usize = 256;
/// Largest sliver bytes in one `StoreBlobs` request, well under the message limit.
pub const STORE_BATCH_BYTES: usize = 32 * 1024 * 1024;
/// Largest number of certificates in one `CertifyBlobs` request (the server's cap).
pub const CERTIFY_BATCH: usize = 1024;

/// Stores and reads blobs.
#[derive(Clone)]
pub struct BlobClient {
    committees: Arc<CommitteeCache>,
    connector: Connector,
    timeout: Duration,
    progress: Option<ProgressFn>,
    channels: Arc<Mutex<HashMap<NodeId, SyncServiceClient<TracedChannel>>>>,
}

impl std::fmt::Debug for BlobClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobClient({:?})", self.committees.control_plane())
    }
}

/// What a store of many blobs did with each, in input order.
pub type StoreResults = Vec<Result<BlobId, ClientError>>;

impl BlobClient {
    /// A client over the control plane that reaches nodes through `connector` (mutual TLS with
    /// a client certificate in production), with a per-request timeout.
    pub fn new(control_plane: ControlPlane, connector: Connector, timeout: Duration) -> Self {
        BlobClient {
            committees: Arc::new(CommitteeCache::new(control_plane)),
            connector,
            timeout,
            progress: None,
            channels: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Reports store progress to `progress` (for a progress bar on large files).
    pub fn with_progress(mut self, progress: ProgressFn) -> Self {
        self.progress = Some(progress);
        self
    }

    fn control_plane(&self) -> &ControlPlane {
        self.committees.control_plane()
    }

    /// One reused channel per node (HTTP/2 multiplexes the requests).
    fn client(&self, member: &crate::Member) -> Result<SyncServiceClient<TracedChannel>, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(&member.node_id) {
            return Ok(c.clone());
        }
        let channel = self
            .connector
            .channel(&member.sync_address, &member.node_id, Some(self.timeout))
            .map_err(|s| s.message().to_string())?;
        let client = SyncServiceClient::new(channel)
            .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(grpc::MAX_MESSAGE_BYTES);
        channels.insert(member.node_id.clone(), client.clone());
        Ok(client)
    }

    async fn current(&self) -> Result<Arc<CommitteeKeys>, ClientError> {
        let phase = self.control_plane().current().await?.ok_or(ClientError::NoCommittee)?;
        Ok(self.committees.require(phase.epoch()).await?)
    }

    /// Stores a blob and returns its id once certified. Storing the same bytes again is
    /// idempotent. If the epoch changes during the store, it retries under the new committee.
    pub async fn store(&self, data: &[u8]) -> Result<BlobId, ClientError> {
        self.store_many(&[data]).await?.pop().unwrap_or(Err(ClientError::NoCommittee))
    }

    /// Stores many blobs in batches and returns, in input order, each one's id once certified
    /// or why it failed. Blobs that fail for want of a quorum (an epoch change under way, a
    /// node restarting) are retried twice under the committee current then. Fails as a whole
    /// only when the committee cannot be read.
    pub async fn store_many(&self, blobs: &[&[u8]]) -> Result<StoreResults, ClientError> {
        let mut results: Vec<Option<Result<BlobId, ClientError>>> = (0..blobs.len()).map(|_| None).collect();
        let mut todo: Vec<usize> = (0..blobs.len()).collect();
        for attempt in 0..3u32 {
            let keys = self.current().await?;
            let mut encoded = Vec::with_capacity(todo.len());
            for &i in &todo {
                match erasure::encode(blobs[i], keys.committee().n_shards) {
                    Ok(e) => encoded.push((i, e)),
                    Err(e) => results[i] = Some(Err(e.into())),
                }
            }
            let outcomes = self.store_encoded(&keys, &encoded).await;
            todo.clear();
            for ((i, _), outcome) in encoded.iter().zip(outcomes) {
                match outcome {
                    Err(ClientError::NoQuorum { .. }) if attempt < 2 => todo.push(*i),
                    other => results[*i] = Some(other),
                }
            }
            if todo.is_empty() {
                break;
            }
            tracing::debug!(blobs = todo.len(), attempt, "no quorum: retrying under the committee current then");
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt + 1))).await;
        }
        Ok(results.into_iter().map(|r| r.unwrap_or(Err(ClientError::NoCommittee))).collect())
    }

    /// Stores encoded blobs under the committee of `keys`: slivers to their owners, then the
    /// certificates to every member. One result per blob, in order.
    pub async fn store_encoded(
        &self,
        keys: &CommitteeKeys,
        encoded: &[(usize, EncodedBlob)],
    ) -> Vec<Result<BlobId, ClientError>> {
        let committee = keys.committee().clone();
        let cluster = self.control_plane().cluster().to_string();
        let confirmations = self.upload(&committee, encoded).await;
        // Certificates for the blobs whose confirmers own a quorum, not checked here: the members
        // verify them when they take them.
        let mut builders = Vec::with_capacity(encoded.len());
        let mut certificates: Vec<Result<Certificate, ClientError>> = Vec::with_capacity(encoded.len());
        for (j, (_, blob)) in encoded.iter().enumerate() {
            let mut builder = CertificateBuilder::new(&cluster, blob.blob_id, keys);
            let mut errors = Vec::new();
            for (node, outcome) in &confirmations[j] {
                match outcome {
                    Ok(signature) => {
                        if let Err(e) = builder.add(node, signature) {
                            errors.push(format!("{node}: {e}"));
                        }
                    }
                    Err(e) => errors.push(format!("{node}: {e}")),
                }
            }
            let have = builder.shards();
            certificates.push(builder.build_unchecked().map_err(|_| ClientError::NoQuorum {
                blob: blob.blob_id,
                what: "confirmed",
                have,
                need: committee.quorum_shards(),
                detail: errors.join("; "),
            }));
            builders.push(builder);
        }
        let mut accepted = self.deliver_certificates(&committee, encoded, &certificates).await;
        // A member that refused a certificate's signature means a confirmation in it was bad
        // (a faulty or lying node): check each, drop the bad ones, deliver again.
        let refused: Vec<usize> = (0..encoded.len())
            .filter(|j| certificates[*j].is_ok() && accepted[*j].0 < committee.quorum_shards())
            .filter(|j| accepted[*j].1.iter().any(|e| e.contains("FERRY-CERT-002")))
            .collect();
        if !refused.is_empty() {
            for &j in &refused {
                certificates[j] = match builders[j].build() {
                    Ok((certificate, dropped)) => {
                        tracing::warn!(blob = %encoded[j].1.blob_id, ?dropped, "confirmations that did not verify were left out");
                        Ok(certificate)
                    }
                    Err(e) => Err(ClientError::NoQuorum {
                        blob: encoded[j].1.blob_id,
                        what: "confirmed",
                        have: 0,
                        need: committee.quorum_shards(),
                        detail: e.to_string(),
                    }),
                };
            }
            let again = self.deliver_certificates(&committee, encoded, &certificates).await;
            for j in refused {
                accepted[j] = again[j].clone();
            }
        }
        let mut out = Vec::with_capacity(encoded.len());
        for (j, certificate) in certificates.into_iter().enumerate() {
            let id = encoded[j].1.blob_id;
            out.push(match certificate {
                Err(e) => Err(e),
                Ok(_) => {
                    let (shards, errors) = std::mem::take(&mut accepted[j]);
                    if shards >= committee.quorum_shards() {
                        Ok(id)
                    } else {
                        Err(ClientError::NoQuorum {
                            blob: id,
                            what: "accepted the certificate of",
                            have: shards,
                            need: committee.quorum_shards(),
                            detail: errors.join("; "),
                        })
                    }
                }
            });
        }
        out
    }

    /// Delivers the certificates that exist to every member; per blob (in `encoded`'s order),
    /// the shards owned by members that took its certificate and what the others said.
    async fn deliver_certificates(
        &self,
        committee: &Committee,
        encoded: &[(usize, EncodedBlob)],
        certificates: &[Result<Certificate, ClientError>],
    ) -> Vec<(u32, Vec<String>)> {
        let certified: Vec<(usize, BlobId, &Certificate)> = certificates
            .iter()
            .enumerate()
            .filter_map(|(j, c)| c.as_ref().ok().map(|c| (j, encoded[j].1.blob_id, c)))
            .collect();
        let mut out = vec![(0u32, Vec::new()); encoded.len()];
        for ((j, _, _), answer) in certified.iter().zip(self.deliver(committee, &certified).await) {
            out[*j] = answer;
        }
        out
    }

    /// Sends every owner its slivers of `encoded`, batched; per blob, each owner's signature
    /// or error.
    async fn upload(
        &self,
        committee: &Committee,
        encoded: &[(usize, EncodedBlob)],
    ) -> Vec<BTreeMap<NodeId, Result<Vec<u8>, String>>> {
        let mut by_owner: BTreeMap<&NodeId, Vec<ShardIndex>> = BTreeMap::new();
        for (i, owner) in committee.assignment.iter().enumerate() {
            by_owner.entry(owner).or_default().push(ShardIndex(i as u32));
        }
        let total: u64 = encoded.iter().flat_map(|(_, e)| e.slivers.iter()).map(|s| s.len() as u64).sum();
        let sent = Arc::new(AtomicU64::new(0));
        let mut tasks = FuturesUnordered::new();
        for (owner, shards) in by_owner {
            let Some(member) = committee.member(owner) else { continue };
            // Batches of whole blobs, bounded by count and bytes.
            let mut batches: Vec<Vec<(usize, pb::BlobUpload)>> = vec![Vec::new()];
            let mut batch_bytes = 0usize;
            for (j, (_, blob)) in encoded.iter().enumerate() {
                let bytes: usize = shards.iter().map(|s| blob.slivers[s.as_usize()].len()).sum();
                let current = batches.last().map(Vec::len).unwrap_or(0);
                if current > 0 && (current >= STORE_BATCH_BLOBS || batch_bytes + bytes > STORE_BATCH_BYTES) {
                    batches.push(Vec::new());
                    batch_bytes = 0;
                }
                batch_bytes += bytes;
                let upload = pb::BlobUpload {
                    blob_id: blob.blob_id.0.to_vec(),
                    metadata: Some(blob.metadata.to_proto()),
                    slivers: shards
                        .iter()
                        .map(|s| pb::SliverUpload { shard: s.0, data: blob.slivers[s.as_usize()].clone() })
                        .collect(),
                };
                if let Some(b) = batches.last_mut() {
                    b.push((j, upload));
                }
            }
            for batch in batches.into_iter().filter(|b| !b.is_empty()) {
                let client = self.client(member);
                let owner = owner.clone();
                let (sent, progress) = (sent.clone(), self.progress.clone());
                tasks.push(async move {
                    let (indices, uploads): (Vec<usize>, Vec<pb::BlobUpload>) = batch.into_iter().unzip();
                    let bytes: u64 = uploads.iter().flat_map(|u| &u.slivers).map(|s| s.data.len() as u64).sum();
                    let began = std::time::Instant::now();
                    let answer = match client {
                        Ok(mut c) => c
                            .store_blobs(pb::StoreBlobsRequest { blobs: uploads, skip_confirmations: false })
                            .await
                            .map(|r| r.into_inner().blobs)
                            .map_err(|s| s.message().to_string()),
                        Err(e) => Err(e),
                    };
                    tracing::debug!(node = %owner, blobs = indices.len(), bytes, took_ms = began.elapsed().as_millis() as u64, ok = answer.is_ok(), "StoreBlobs answered");
                    let now = sent.fetch_add(bytes, Ordering::Relaxed) + bytes;
                    if let Some(p) = &progress {
                        p(now, total);
                    }
                    (owner, indices, answer)
                });
            }
        }
        let mut out: Vec<BTreeMap<NodeId, Result<Vec<u8>, String>>> = vec![BTreeMap::new(); encoded.len()];
        while let Some((owner, indices, answer)) = tasks.next().await {
            match answer {
                Ok(stored) if stored.len() == indices.len() => {
                    for (j, s) in indices.into_iter().zip(stored) {
                        let outcome = match s.confirmation {
                            Some(c) if c.node_id == owner.as_str() && c.epoch == committee.epoch => Ok(c.signature),
                            Some(c) => Err(format!("confirmation of {} for epoch {}", c.node_id, c.epoch)),
                            None => Err(if s.error.is_empty() { "no confirmation".into() } else { s.error }),
                        };
                        out[j].insert(owner.clone(), outcome);
                    }
                }
                Ok(stored) => {
                    let e = format!("answered {} of {} blobs", stored.len(), indices.len());
                    for j in indices {
                        out[j].insert(owner.clone(), Err(e.clone()));
                    }
                }
                Err(e) => {
                    for j in indices {
                        out[j].insert(owner.clone(), Err(e.clone()));
                    }
                }
            }
        }
        out
    }

    /// Delivers certificates to every member; per certificate, the shards owned by members that
    /// took it and what the others said.
    async fn deliver(
        &self,
        committee: &Committee,
        certified: &[(usize, BlobId, &Certificate)],
    ) -> Vec<(u32, Vec<String>)> {
        let mut tasks = FuturesUnordered::new();
        for member in &committee.members {
            for (chunk_index, chunk) in certified.chunks(CERTIFY_BATCH).enumerate() {
                let blobs: Vec<pb::CertifiedBlob> = chunk
                    .iter()
                    .map(|(_, id, c)| pb::CertifiedBlob { blob_id: id.0.to_vec(), certificate: Some(c.to_proto()) })
                    .collect();
                let client = self.client(member);
                let node = member.node_id.clone();
                let n = chunk.len();
                tasks.push(async move {
                    let began = std::time::Instant::now();
                    let answer = match client {
                        Ok(mut c) => c
                            .certify_blobs(pb::CertifyBlobsRequest { blobs })
                            .await
                            .map(|r| r.into_inner().errors)
                            .map_err(|s| s.message().to_string()),
                        Err(e) => Err(e),
                    };
                    tracing::debug!(%node, blobs = n, took_ms = began.elapsed().as_millis() as u64, ok = answer.is_ok(), "CertifyBlobs answered");
                    (node, chunk_index * CERTIFY_BATCH, n, answer)
                });
            }
        }
        let mut accepted_by: Vec<Vec<&NodeId>> = vec![Vec::new(); certified.len()];
        let mut errors: Vec<Vec<String>> = vec![Vec::new(); certified.len()];
        let mut answers = Vec::new();
        while let Some(answer) = tasks.next().await {
            answers.push(answer);
        }
        for (node, offset, n, answer) in &answers {
            for k in 0..*n {
                match answer {
                    Ok(errs) => match errs.get(k) {
                        Some(e) if e.is_empty() => accepted_by[offset + k].push(node),
                        Some(e) => errors[offset + k].push(format!("{node}: {e}")),
                        None => errors[offset + k].push(format!("{node}: no answer for this blob")),
                    },
                    Err(e) => errors[offset + k].push(format!("{node}: {e}")),
                }
            }
        }
        accepted_by.into_iter().zip(errors).map(|(nodes, errs)| (committee.shards_owned_by(nodes), errs)).collect()
    }

    /// A verified certificate of `id` from the first member that holds one.
    async fn certificate(&self, committee: &Committee, id: &BlobId) -> Result<Certificate, ClientError> {
        let cluster = self.control_plane().cluster().to_string();
        for member in &committee.members {
            let Ok(mut client) = self.client(member) else { continue };
            let Ok(answer) = client
                .get_certificates(pb::GetCertificatesRequest { blob_ids: vec![id.0.to_vec()], include_metadata: false })
                .await
            else {
                continue;
            };
            let Some(proto) = answer.into_inner().blobs.into_iter().next().and_then(|e| e.certificate) else {
                continue;
            };
            let Ok(certificate) = Certificate::from_proto(&proto) else { continue };
            let Ok(Some(keys)) = self.committees.get(certificate.epoch).await else { continue };
            if certificate.verify(&cluster, id, &keys).is_ok() {
                return Ok(certificate);
            }
        }
        Err(ClientError::NotCertified(*id))
    }

    /// Reads a certified blob: metadata from any owner (verified), then the first `k`
    /// verified slivers to arrive from all owners, decoded.
    pub async fn read(&self, id: &BlobId) -> Result<Vec<u8>, ClientError> {
        let keys = self.current().await?;
        let committee = keys.committee().clone();
        self.certificate(&committee, id).await?;
        let metadata = self.metadata(&committee, id).await?;
        let k = metadata.k as usize;
        let mut tasks = FuturesUnordered::new();
        for shard in 0..committee.n_shards {
            let shard = ShardIndex(shard);
            let Some(member) = committee.owner(shard).and_then(|o| committee.member(o)) else { continue };
            let client = self.client(member);
            let blob = *id;
            tasks.push(async move {
                let r = match client {
                    Ok(mut c) => c
                        .get_sliver(pb::GetSliverRequest { blob_id: blob.0.to_vec(), shard: shard.0 })
                        .await
                        .map(|r| r.into_inner().data)
                        .map_err(|s| s.message().to_string()),
                    Err(e) => Err(e),
                };
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
                let mut c = self.client(member)?;
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
