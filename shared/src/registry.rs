//! What a storage node keeps per certified blob (its certificate and any inconsistency claim),
//! and the committees certificates are verified against, fetched from the control plane once
//! per epoch with their BLS keys parsed.

use std::{collections::BTreeMap, sync::Arc};

use ferry_proto::v1 as pb;
use prost::Message;
use thiserror::Error;

use crate::{
    certificate::{Certificate, CertificateError, CommitteeKeys},
    control_plane::{ControlPlane, ControlPlaneError},
    types::{BlobId, Epoch, NodeId, ShardIndex, TypeError},
};

/// A malformed registry value (from the network or the store).
#[derive(Debug, Error)]
pub enum RegistryError {
    /// The bytes do not decode.
    #[error("FERRY-REG-001: {what} does not decode: {message}")]
    Decode {
        /// What was decoded.
        what: &'static str,
        /// The decoder's message.
        message: String,
    },
    /// A field out of range.
    #[error(transparent)]
    Type(#[from] TypeError),
    /// The certificate is malformed or does not verify.
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    /// The committee a certificate names is not known.
    #[error("FERRY-REG-002: no committee of epoch {0} is known")]
    NoCommittee(Epoch),
    /// The control plane failed.
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
}

/// Evidence that a blob was encoded inconsistently, verifiable by anyone who can fetch the
/// listed slivers: each matches its digest in the blob's metadata, yet decoding from them
/// rebuilds a sliver that does not ([`crate::erasure::confirms_inconsistency`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InconsistencyProof {
    /// The shards whose (verified) slivers were decoded.
    pub shards: Vec<ShardIndex>,
    /// The shard whose rebuilt sliver did not match its digest.
    pub mismatched: ShardIndex,
    /// The node that found it.
    pub reported_by: NodeId,
}

impl InconsistencyProof {
    /// Most shards a proof may list (the largest cluster's shard count).
    pub const MAX_SHARDS: usize = 1024;

    /// Whether the proof holds for the blob of `metadata`: the slivers it names, as `fetch`
    /// gets them (from their owners), all verify against the metadata and decode
    /// inconsistently. `false` if it names fewer than `k` shards or any sliver is missing or
    /// does not verify. What every node checks before it acts on another's claim.
    pub async fn checks_out<F, Fut>(&self, metadata: &crate::erasure::BlobMetadata, mut fetch: F) -> bool
    where
        F: FnMut(ShardIndex) -> Fut,
        Fut: std::future::Future<Output = Option<Vec<u8>>>,
    {
        if self.shards.len() < metadata.k as usize || self.shards.iter().any(|s| s.0 >= metadata.n_shards) {
            return false;
        }
        let mut got = Vec::with_capacity(self.shards.len());
        for shard in &self.shards {
            let Some(data) = fetch(*shard).await else { return false };
            if metadata.verify_sliver(*shard, &data).is_err() {
                return false;
            }
            got.push((*shard, data));
        }
        let slivers: Vec<(ShardIndex, &[u8])> = got.iter().map(|(s, d)| (*s, d.as_slice())).collect();
        crate::erasure::confirms_inconsistency(metadata, &slivers)
    }

    /// The wire form.
    pub fn to_proto(&self) -> pb::InconsistencyProof {
        pb::InconsistencyProof {
            shards: self.shards.iter().map(|s| s.0).collect(),
            mismatched: self.mismatched.0,
            reported_by: self.reported_by.to_string(),
        }
    }

    /// Parses a proof received from the network, for a cluster of `n_shards`.
    pub fn from_proto(proto: &pb::InconsistencyProof, n_shards: u32) -> Result<Self, RegistryError> {
        if proto.shards.len() > Self::MAX_SHARDS.min(n_shards as usize) {
            return Err(RegistryError::Decode {
                what: "inconsistency proof",
                message: format!("{} shards listed", proto.shards.len()),
            });
        }
        Ok(InconsistencyProof {
            shards: proto.shards.iter().map(|s| ShardIndex::checked(*s, n_shards)).collect::<Result<_, _>>()?,
            mismatched: ShardIndex::checked(proto.mismatched, n_shards)?,
            reported_by: NodeId::new(proto.reported_by.clone())?,
        })
    }
}

/// A blob in a node's certified index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertifiedRecord {
    /// Its certificate, verified when it entered the index.
    pub certificate: Certificate,
    /// A claim that the blob is encoded inconsistently, if one was made (checked by whoever
    /// acts on it).
    pub invalid: Option<InconsistencyProof>,
}

impl CertifiedRecord {
    /// The stored form (a `CertifiedEntry` without id or metadata).
    pub fn encode(&self) -> Vec<u8> {
        pb::CertifiedEntry {
            blob_id: Vec::new(),
            certificate: Some(self.certificate.to_proto()),
            metadata: None,
            invalid: self.invalid.as_ref().map(InconsistencyProof::to_proto),
        }
        .encode_to_vec()
    }

    /// Decodes the stored form.
    pub fn decode(bytes: &[u8], n_shards: u32) -> Result<Self, RegistryError> {
        let entry = pb::CertifiedEntry::decode(bytes)
            .map_err(|e| RegistryError::Decode { what: "certified record", message: e.to_string() })?;
        let certificate = entry
            .certificate
            .as_ref()
            .ok_or(RegistryError::Decode { what: "certified record", message: "no certificate".into() })?;
        Ok(CertifiedRecord {
            certificate: Certificate::from_proto(certificate)?,
            invalid: entry.invalid.as_ref().map(|p| InconsistencyProof::from_proto(p, n_shards)).transpose()?,
        })
    }

    /// The wire form for `blob`.
    pub fn to_entry(&self, blob: &BlobId) -> pb::CertifiedEntry {
        pb::CertifiedEntry {
            blob_id: blob.0.to_vec(),
            certificate: Some(self.certificate.to_proto()),
            metadata: None,
            invalid: self.invalid.as_ref().map(InconsistencyProof::to_proto),
        }
    }
}

/// Committees by epoch with their parsed BLS keys, fetched from the control plane on first use.
/// Committees never change once proposed, so entries are never stale; the oldest are dropped
/// past [`CommitteeCache::CAPACITY`] to bound memory.
#[derive(Debug)]
pub struct CommitteeCache {
    control_plane: ControlPlane,
    cached: std::sync::Mutex<BTreeMap<Epoch, Arc<CommitteeKeys>>>,
}

impl CommitteeCache {
    /// Epochs kept.
    pub const CAPACITY: usize = 64;

    /// A cache over `control_plane`.
    pub fn new(control_plane: ControlPlane) -> Self {
        CommitteeCache { control_plane, cached: std::sync::Mutex::new(BTreeMap::new()) }
    }

    /// The committee of `epoch` with its keys, `None` if no such epoch was proposed.
    pub async fn get(&self, epoch: Epoch) -> Result<Option<Arc<CommitteeKeys>>, RegistryError> {
        if let Some(keys) = self.cached.lock().unwrap_or_else(|p| p.into_inner()).get(&epoch) {
            return Ok(Some(keys.clone()));
        }
        let Some(committee) = self.control_plane.committee(epoch).await? else { return Ok(None) };
        let keys = Arc::new(CommitteeKeys::new(Arc::new(committee))?);
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        cached.insert(epoch, keys.clone());
        while cached.len() > Self::CAPACITY {
            cached.pop_first();
        }
        Ok(Some(keys))
    }

    /// Like [`CommitteeCache::get`], but an unknown epoch is an error.
    pub async fn require(&self, epoch: Epoch) -> Result<Arc<CommitteeKeys>, RegistryError> {
        self.get(epoch).await?.ok_or(RegistryError::NoCommittee(epoch))
    }

    /// The control plane it reads.
    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }
}
