//! Node keys and the canonical, domain-separated bytes every signed message is signed over.
//!
//! A node has one secret, a 32-byte seed in its key file. Its ed25519 key (the seed itself)
//! signs what only one node says: shard-stream requests and attestations. Its BLS12-381 key
//! (derived from the seed with BLAKE3's key derivation, so there is still one secret to keep)
//! signs storage confirmations, which a client aggregates into one compact certificate
//! ([`crate::certificate`]). BLS keys use the IETF proof-of-possession scheme: every member
//! publishes its public key with a signature of it under a separate domain, which rules out
//! rogue-key attacks on aggregation.

use std::path::Path;

use blst::min_pk as bls;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::types::{BlobId, Epoch, NodeId, ShardIndex};

/// A key or signature problem.
#[derive(Debug, Error)]
pub enum CryptoError {
    /// The key file could not be read or written.
    #[error("FERRY-KEY-001: key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file does not hold 64 hex characters.
    #[error("FERRY-KEY-002: key file {0} must hold a 32-byte ed25519 seed as 64 hex characters")]
    KeyFormat(String),
    /// A public key that is not a valid ed25519 point.
    #[error("FERRY-KEY-003: invalid ed25519 public key")]
    PublicKey,
    /// A signature that is malformed or does not verify.
    #[error("FERRY-KEY-004: signature does not verify")]
    BadSignature,
    /// A BLS key that is malformed, not in the group, or whose proof of possession fails.
    #[error("FERRY-KEY-005: invalid BLS key: {0}")]
    BlsKey(&'static str),
}

/// Domain of storage-confirmation signatures (the IETF BLS proof-of-possession ciphersuite).
pub const BLS_SIGNATURE_DST: &[u8] = b"BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_";
/// Domain of proofs of possession, distinct from every signed message.
pub const BLS_POP_DST: &[u8] = b"BLS_POP_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_";
/// Bytes of a compressed BLS public key.
pub const BLS_PUBLIC_KEY_BYTES: usize = 48;
/// Bytes of a compressed BLS signature.
pub const BLS_SIGNATURE_BYTES: usize = 96;

/// A member's published BLS key: the public key and its proof of possession, as hex.
pub fn parse_bls_key(hex_key: &str) -> Result<bls::PublicKey, CryptoError> {
    let bytes = hex::decode(hex_key).map_err(|_| CryptoError::BlsKey("not hex"))?;
    if bytes.len() != BLS_PUBLIC_KEY_BYTES + BLS_SIGNATURE_BYTES {
        return Err(CryptoError::BlsKey("want 48 bytes of public key and 96 of proof of possession"));
    }
    let (public, proof) = bytes.split_at(BLS_PUBLIC_KEY_BYTES);
    let key = bls::PublicKey::key_validate(public).map_err(|_| CryptoError::BlsKey("not a valid public key"))?;
    let proof = bls::Signature::sig_validate(proof, true).map_err(|_| CryptoError::BlsKey("malformed proof"))?;
    match proof.verify(false, public, BLS_POP_DST, &[], &key, false) {
        blst::BLST_ERROR::BLST_SUCCESS => Ok(key),
        _ => Err(CryptoError::BlsKey("proof of possession does not verify")),
    }
}

/// A node's signing keys. The seed is never logged (`Debug` prints only the public key).
pub struct NodeKeypair {
    signing: SigningKey,
    bls: bls::SecretKey,
}

impl std::fmt::Debug for NodeKeypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKeypair(public={})", self.public_hex())
    }
}

impl NodeKeypair {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        Self::from_seed(seed)
    }

    /// From a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let ikm = blake3::derive_key("ferry node key 2026-12 bls12-381 storage confirmations", &seed);
        // key_gen fails only for input keying material under 32 bytes.
        let bls = match bls::SecretKey::key_gen(&ikm, &[]) {
            Ok(key) => key,
            Err(_) => unreachable!("32 bytes of keying material"),
        };
        NodeKeypair { signing: SigningKey::from_bytes(&seed), bls }
    }

    /// Reads a key file (64 hex characters of seed).
    pub fn load(path: &Path) -> Result<Self, CryptoError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| CryptoError::KeyFile { path: path.display().to_string(), source })?;
        let bytes = hex::decode(text.trim()).map_err(|_| CryptoError::KeyFormat(path.display().to_string()))?;
        let seed: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::KeyFormat(path.display().to_string()))?;
        Ok(Self::from_seed(seed))
    }

    /// Writes the seed to a new key file readable only by its owner.
    pub fn save(&self, path: &Path) -> Result<(), CryptoError> {
        write_new_file(path, hex::encode(self.signing.to_bytes()).as_bytes(), true)
            .map_err(|source| CryptoError::KeyFile { path: path.display().to_string(), source })
    }

    /// Hex of the public key, as listed in the committee.
    pub fn public_hex(&self) -> String {
        hex::encode(self.signing.verifying_key().to_bytes())
    }

    /// Signs a message.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.signing.sign(message).to_bytes().to_vec()
    }

    /// The BLS key a committee lists for this node: public key and proof of possession, hex.
    pub fn bls_key_hex(&self) -> String {
        let public = self.bls.sk_to_pk().to_bytes();
        let proof = self.bls.sign(&public, BLS_POP_DST, &[]).to_bytes();
        hex::encode([public.as_slice(), proof.as_slice()].concat())
    }

    /// Signs a storage confirmation with the BLS key (aggregatable).
    pub fn bls_sign(&self, message: &[u8]) -> [u8; BLS_SIGNATURE_BYTES] {
        self.bls.sign(message, BLS_SIGNATURE_DST, &[]).to_bytes()
    }
}

/// Verifies one member's BLS `signature` over a storage confirmation `message`, with the member's
/// published BLS key (checked with its proof of possession).
pub fn verify_bls(bls_key_hex: &str, message: &[u8], signature: &[u8]) -> Result<(), CryptoError> {
    let key = parse_bls_key(bls_key_hex)?;
    let signature = bls::Signature::sig_validate(signature, true).map_err(|_| CryptoError::BadSignature)?;
    match signature.verify(false, message, BLS_SIGNATURE_DST, &[], &key, false) {
        blst::BLST_ERROR::BLST_SUCCESS => Ok(()),
        _ => Err(CryptoError::BadSignature),
    }
}

/// Verifies `signature` over `message` with a hex public key from the committee.
pub fn verify(public_hex: &str, message: &[u8], signature: &[u8]) -> Result<(), CryptoError> {
    let key: [u8; 32] = hex::decode(public_hex).ok().and_then(|b| b.try_into().ok()).ok_or(CryptoError::PublicKey)?;
    let key = VerifyingKey::from_bytes(&key).map_err(|_| CryptoError::PublicKey)?;
    let signature = Signature::from_slice(signature).map_err(|_| CryptoError::BadSignature)?;
    key.verify(message, &signature).map_err(|_| CryptoError::BadSignature)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Bytes a storage confirmation signs: the same for every confirming node, so the
/// confirmations of one blob aggregate into one signature.
pub fn confirmation_message(cluster: &str, blob: &BlobId, epoch: Epoch) -> Vec<u8> {
    let mut out = b"ferry/storage-confirmation/v2".to_vec();
    put_str(&mut out, cluster);
    out.extend_from_slice(blob.as_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out
}

/// The signed fields of a `StreamShard` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamShardIntent<'a> {
    /// The cluster (`control_plane.cluster`): a request for one cluster is void in another.
    pub cluster: &'a str,
    /// The node asked to serve: a request captured on its way to one node is void at another.
    pub server: &'a NodeId,
    /// Shard to stream.
    pub shard: ShardIndex,
    /// Epoch in which the requester owns it.
    pub epoch: Epoch,
    /// First blob id (inclusive), if not the start.
    pub start: Option<BlobId>,
    /// Requesting node.
    pub requester: &'a NodeId,
    /// Signing time.
    pub timestamp_ms: u64,
    /// Whether metadata is requested.
    pub include_metadata: bool,
    /// Item limit (0 = whole shard).
    pub limit: u64,
    /// Whether certificates are requested.
    pub include_certificates: bool,
}

impl StreamShardIntent<'_> {
    /// Bytes the request signs.
    pub fn message(&self) -> Vec<u8> {
        let mut out = b"ferry/stream-shard/v3".to_vec();
        put_str(&mut out, self.cluster);
        put_str(&mut out, self.server.as_str());
        out.extend_from_slice(&self.shard.0.to_be_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        match &self.start {
            Some(id) => {
                out.push(1);
                out.extend_from_slice(id.as_bytes());
            }
            None => out.push(0),
        }
        put_str(&mut out, self.requester.as_str());
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        out.push(u8::from(self.include_metadata));
        out.extend_from_slice(&self.limit.to_be_bytes());
        out.push(u8::from(self.include_certificates));
        out
    }

    /// The wire request for this intent, signed with the requester's `key`.
    pub fn sign(&self, key: &NodeKeypair) -> ferry_proto::v1::StreamShardRequest {
        ferry_proto::v1::StreamShardRequest {
            shard: self.shard.0,
            epoch: self.epoch,
            start_blob_id: self.start.map(|b| b.0.to_vec()).unwrap_or_default(),
            requester: self.requester.to_string(),
            timestamp_ms: self.timestamp_ms,
            include_metadata: self.include_metadata,
            signature: key.sign(&self.message()),
            limit: self.limit,
            include_certificates: self.include_certificates,
        }
    }
}

/// What one owned shard holds, as evidence in an attestation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEvidence {
    /// Shard.
    pub shard: ShardIndex,
    /// Certified blobs held.
    pub blob_count: u64,
    /// Hex BLAKE3 over the held blob ids in order.
    pub blob_ids_digest: String,
}

/// Bytes an attestation signs.
pub fn attestation_message(
    node: &NodeId,
    epoch: Epoch,
    attested_by: &str,
    created_at_ms: u64,
    evidence: &[ShardEvidence],
) -> Vec<u8> {
    let mut out = b"ferry/epoch-sync-done/v1".to_vec();
    put_str(&mut out, node.as_str());
    out.extend_from_slice(&epoch.to_be_bytes());
    put_str(&mut out, attested_by);
    out.extend_from_slice(&created_at_ms.to_be_bytes());
    for e in evidence {
        out.extend_from_slice(&e.shard.0.to_be_bytes());
        out.extend_from_slice(&e.blob_count.to_be_bytes());
        put_str(&mut out, &e.blob_ids_digest);
    }
    out
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Writes `bytes` to `path`. A `secret` file is created new with mode 0600, so the key is
/// never readable by others, not even between a write and a chmod, and an existing key is
/// never overwritten; other files are replaced.
pub fn write_new_file(path: &std::path::Path, bytes: &[u8], secret: bool) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if secret {
        options.create_new(true).mode(0o600);
    } else {
        options.create(true).truncate(true).mode(0o644);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_is_caught() {
        let key = NodeKeypair::generate();
        let msg = confirmation_message("c", &BlobId([7; 32]), 3);
        let sig = key.sign(&msg);
        verify(&key.public_hex(), &msg, &sig).unwrap();
        let other = confirmation_message("c", &BlobId([7; 32]), 4);
        assert!(verify(&key.public_hex(), &other, &sig).is_err());
        assert!(verify(&key.public_hex(), &msg, &sig[..63]).is_err());
        assert!(verify("zz", &msg, &sig).is_err());
    }

    #[test]
    fn key_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let key = NodeKeypair::generate();
        key.save(&path).unwrap();
        assert_eq!(NodeKeypair::load(&path).unwrap().public_hex(), key.public_hex());
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "a key file must be readable by its owner only");
        }
        let overwrite = NodeKeypair::generate().save(&path);
        assert!(overwrite.is_err(), "an existing key must not be overwritten");
        assert_eq!(NodeKeypair::load(&path).unwrap().public_hex(), key.public_hex());
        std::fs::write(&path, "nothex").unwrap();
        assert!(matches!(NodeKeypair::load(&path), Err(CryptoError::KeyFormat(_))));
        assert!(!format!("{key:?}").contains(&hex::encode(key.signing.to_bytes())));
    }

    #[test]
    fn a_bls_key_is_accepted_only_with_its_own_proof_of_possession() {
        let (a, b) = (NodeKeypair::from_seed([1; 32]), NodeKeypair::from_seed([2; 32]));
        assert_eq!(a.bls_key_hex(), NodeKeypair::from_seed([1; 32]).bls_key_hex(), "derived from the seed");
        let key = parse_bls_key(&a.bls_key_hex()).unwrap();
        assert_eq!(key.to_bytes().to_vec(), hex::decode(a.bls_key_hex()).unwrap()[..48].to_vec());
        // a's public key with b's proof: refused (the rogue-key defence).
        let (a_hex, b_hex) = (a.bls_key_hex(), b.bls_key_hex());
        let mixed = format!("{}{}", &a_hex[..96], &b_hex[96..]);
        assert!(matches!(parse_bls_key(&mixed), Err(CryptoError::BlsKey(_))));
        assert!(parse_bls_key(&a_hex[..200]).is_err());
        assert!(parse_bls_key("zz").is_err());
        // A proof of possession is not a confirmation signature: different domains.
        let public = hex::decode(&a_hex).unwrap()[..48].to_vec();
        let as_confirmation = bls::Signature::from_bytes(&a.bls_sign(&public)).unwrap();
        let forged = format!("{}{}", &a_hex[..96], hex::encode(as_confirmation.to_bytes()));
        assert!(parse_bls_key(&forged).is_err());
    }
}
