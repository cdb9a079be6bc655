//! The erasure code and blob metadata.
//!
//! A blob is encoded for a cluster of `n` shards, tolerating `f = (n - 1) / 3` faulty shards:
//! it is cut into `k = n - 2f` *original* slivers and extended with `n - k` *recovery* slivers
//! by a systematic Reed-Solomon code ([`reed_solomon_simd`]). Sliver `i` belongs to shard `i`:
//! shards `0..k` hold the originals, shards `k..n` the recovery slivers. Any `k` distinct
//! slivers decode the blob.
//!
//! Every sliver has the same length: `ceil(length / k)` rounded up to an even number (the
//! Reed-Solomon library works on 16-bit symbols), and at least 2 bytes, so an empty blob still
//! has 2-byte slivers. The tail of the last original sliver (and any original sliver wholly
//! past the end of the blob) is zero padding. With `n` of 1, 2 or 3 there are no recovery
//! slivers and the slivers are just the padded chunks of the blob.
//!
//! [`BlobMetadata`] records the blob's length, the shape of its encoding and the BLAKE3 digest
//! of every sliver; the blob's id is the BLAKE3 hash of the metadata's canonical bytes. Every
//! sliver received from the network is checked against the metadata
//! ([`BlobMetadata::verify_sliver`]) before it is used, and every sliver this module rebuilds
//! is checked again before it is handed out.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
};

use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::types::{BlobId, ShardIndex};

/// The only encoding version: systematic Reed-Solomon over GF(2^16) with the sliver layout
/// described in the module documentation.
pub const ENCODING_VERSION: u32 = 1;

/// The largest number of shards a blob can be encoded into.
pub const MAX_SHARDS: u32 = 1024;

/// The largest blob, in bytes: 4 GiB.
pub const MAX_BLOB_LEN: u64 = 4 << 30;

/// Domain separator at the start of [`BlobMetadata::canonical_bytes`].
const METADATA_DOMAIN: &[u8] = b"ferry-blob-metadata-v1";

/// A blob, its metadata or one of its slivers is malformed, or a blob cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ErasureError {
    /// A number of shards outside `1..=MAX_SHARDS`.
    #[error("FERRY-EC-001: a blob must be encoded into 1 to {max} shards, but {n_shards} shards were asked for")]
    ShardCount {
        /// The number of shards given.
        n_shards: u32,
        /// [`MAX_SHARDS`].
        max: u32,
    },
    /// A number of original slivers outside `1..=MAX_SHARDS`.
    #[error("FERRY-EC-002: the number of original slivers must be 1 to {max}, got {k}")]
    OriginalCount {
        /// The number of original slivers given.
        k: u32,
        /// [`MAX_SHARDS`].
        max: u32,
    },
    /// A blob longer than [`MAX_BLOB_LEN`] (or than this machine can address).
    #[error("FERRY-EC-003: a blob of {length} bytes is too large: the limit is {max} bytes")]
    BlobTooLarge {
        /// The blob's length.
        length: u64,
        /// The largest length accepted.
        max: u64,
    },
    /// Metadata of an encoding version this build does not know.
    #[error("FERRY-EC-004: blob metadata has encoding version {version}, but only version {supported} is supported")]
    UnsupportedVersion {
        /// The version in the metadata.
        version: u32,
        /// [`ENCODING_VERSION`].
        supported: u32,
    },
    /// Metadata whose `k` does not follow from its number of shards.
    #[error(
        "FERRY-EC-005: blob metadata says k = {k} original slivers for {n_shards} shards, but {n_shards} shards have k = {expected}"
    )]
    WrongOriginalCount {
        /// Shards in the metadata.
        n_shards: u32,
        /// `k` in the metadata.
        k: u32,
        /// `k` for `n_shards`.
        expected: u32,
    },
    /// Metadata without exactly one digest per shard.
    #[error(
        "FERRY-EC-006: blob metadata has {got} sliver digests, but it must have one for each of its {n_shards} shards"
    )]
    DigestCount {
        /// Shards in the metadata.
        n_shards: u32,
        /// Digests in the metadata.
        got: usize,
    },
    /// A sliver digest in protobuf metadata that is not 32 bytes.
    #[error(
        "FERRY-EC-007: the sliver digest for shard {shard} in the blob metadata is {got} bytes long; a BLAKE3 digest is 32 bytes"
    )]
    DigestLength {
        /// The shard whose digest is malformed.
        shard: usize,
        /// Its length.
        got: usize,
    },
    /// Metadata that does not hash to the blob id it was given for.
    #[error("FERRY-EC-008: the blob metadata does not belong to blob {expected}: it hashes to blob id {actual}")]
    IdMismatch {
        /// The id the metadata was expected to have.
        expected: BlobId,
        /// The id the metadata hashes to.
        actual: BlobId,
    },
    /// A shard index not below the blob's number of shards.
    #[error(
        "FERRY-EC-009: shard {shard} is out of range: the blob is encoded into {n_shards} shards (0 to {n_shards} exclusive)"
    )]
    ShardOutOfRange {
        /// The index given.
        shard: u32,
        /// Shards in the metadata.
        n_shards: u32,
    },
    /// A sliver of the wrong length.
    #[error("FERRY-EC-010: sliver for shard {shard} is {got} bytes long, but this blob's slivers are {expected} bytes")]
    SliverLength {
        /// The sliver's shard.
        shard: u32,
        /// The blob's sliver length.
        expected: usize,
        /// The sliver's length.
        got: usize,
    },
    /// A sliver whose BLAKE3 digest differs from the one in the metadata.
    #[error(
        "FERRY-EC-011: sliver for shard {shard} does not match its digest in the metadata: it is corrupt or belongs to another blob"
    )]
    SliverDigest {
        /// The sliver's shard.
        shard: u32,
    },
    /// Fewer distinct verified slivers than decoding needs.
    #[error(
        "FERRY-EC-012: not enough slivers to decode the blob: {have} distinct slivers passed verification, but {need} are needed"
    )]
    NotEnoughSlivers {
        /// Distinct verified slivers available.
        have: usize,
        /// Slivers needed (`k`).
        need: usize,
    },
    /// A sliver rebuilt from verified slivers that does not match its digest: the writer
    /// encoded the blob inconsistently, so its metadata cannot be trusted.
    #[error(
        "FERRY-EC-013: the rebuilt sliver for shard {shard} does not match its digest in the metadata: the blob was encoded inconsistently by its writer"
    )]
    InconsistentEncoding {
        /// The shard whose rebuilt sliver does not match.
        shard: u32,
    },
    /// The Reed-Solomon library refused its input. This is a bug in Ferry, not bad input.
    #[error("FERRY-EC-014: internal Reed-Solomon error (a bug in Ferry; please report it): {0}")]
    Codec(String),
}

impl From<reed_solomon_simd::Error> for ErasureError {
    fn from(e: reed_solomon_simd::Error) -> Self {
        ErasureError::Codec(e.to_string())
    }
}

/// `k`, the number of original slivers, for `n_shards` shards: `n - 2 * ((n - 1) / 3)`.
///
/// Errors for `n_shards == 0` or `n_shards > MAX_SHARDS`.
pub fn original_count(n_shards: u32) -> Result<u32, ErasureError> {
    if n_shards == 0 || n_shards > MAX_SHARDS {
        return Err(ErasureError::ShardCount { n_shards, max: MAX_SHARDS });
    }
    // 1 <= n <= 1024, so the saturating operations are exact.
    let f = n_shards.saturating_sub(1) / 3;
    Ok(n_shards.saturating_sub(f.saturating_mul(2)))
}

/// The sliver length for a blob of `length` bytes cut into `k` original slivers:
/// `ceil(length / k)` rounded up to an even number, and at least 2.
///
/// Errors if `k` is 0 or above [`MAX_SHARDS`], or `length` is above [`MAX_BLOB_LEN`] or does
/// not fit this machine's address space.
pub fn sliver_len(length: u64, k: u32) -> Result<usize, ErasureError> {
    if k == 0 || k > MAX_SHARDS {
        return Err(ErasureError::OriginalCount { k, max: MAX_SHARDS });
    }
    if length > MAX_BLOB_LEN {
        return Err(ErasureError::BlobTooLarge { length, max: MAX_BLOB_LEN });
    }
    let too_large = || ErasureError::BlobTooLarge { length, max: MAX_BLOB_LEN };
    let per_sliver = length.div_ceil(u64::from(k));
    let even = per_sliver.checked_add(per_sliver & 1).ok_or_else(too_large)?;
    let len = usize::try_from(even.max(2)).map_err(|_| too_large())?;
    // The decoder and encoder hold all k slivers at once: make sure that is addressable too.
    len.checked_mul(k as usize).ok_or_else(too_large)?;
    Ok(len)
}

/// What identifies a blob and lets any sliver of it be verified: its length, the shape of its
/// encoding and the BLAKE3 digest of every sliver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMetadata {
    /// Length of the blob in bytes.
    pub length: u64,
    /// Number of shards (and slivers) the blob is encoded into.
    pub n_shards: u32,
    /// Number of original slivers: any `k` slivers decode the blob.
    pub k: u32,
    /// Encoding version; only [`ENCODING_VERSION`] exists.
    pub encoding_version: u32,
    /// BLAKE3 digest of every sliver, indexed by shard.
    pub sliver_digests: Vec<[u8; 32]>,
}

impl BlobMetadata {
    /// Checks internal consistency: the version is known, `n_shards` is in range,
    /// `k == original_count(n_shards)`, there is one digest per shard and `length` is at most
    /// [`MAX_BLOB_LEN`].
    pub fn validate(&self) -> Result<(), ErasureError> {
        if self.encoding_version != ENCODING_VERSION {
            return Err(ErasureError::UnsupportedVersion {
                version: self.encoding_version,
                supported: ENCODING_VERSION,
            });
        }
        let expected = original_count(self.n_shards)?;
        if self.k != expected {
            return Err(ErasureError::WrongOriginalCount { n_shards: self.n_shards, k: self.k, expected });
        }
        if self.sliver_digests.len() != self.n_shards as usize {
            return Err(ErasureError::DigestCount { n_shards: self.n_shards, got: self.sliver_digests.len() });
        }
        if self.length > MAX_BLOB_LEN {
            return Err(ErasureError::BlobTooLarge { length: self.length, max: MAX_BLOB_LEN });
        }
        // Also rejects lengths this machine cannot address.
        self.sliver_len()?;
        Ok(())
    }

    /// The canonical bytes the blob id hashes: `b"ferry-blob-metadata-v1"`, then `length`
    /// (u64), `n_shards`, `k` and `encoding_version` (u32 each), all big-endian, then every
    /// sliver digest in shard order.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            METADATA_DOMAIN.len().saturating_add(20).saturating_add(self.sliver_digests.len().saturating_mul(32)),
        );
        out.extend_from_slice(METADATA_DOMAIN);
        out.extend_from_slice(&self.length.to_be_bytes());
        out.extend_from_slice(&self.n_shards.to_be_bytes());
        out.extend_from_slice(&self.k.to_be_bytes());
        out.extend_from_slice(&self.encoding_version.to_be_bytes());
        for digest in &self.sliver_digests {
            out.extend_from_slice(digest);
        }
        out
    }

    /// The blob's id: BLAKE3 of [`canonical_bytes`](Self::canonical_bytes).
    pub fn blob_id(&self) -> BlobId {
        BlobId(*blake3::hash(&self.canonical_bytes()).as_bytes())
    }

    /// Checks that the metadata is consistent ([`validate`](Self::validate)) and is the
    /// metadata of blob `id`.
    pub fn verify_id(&self, id: &BlobId) -> Result<(), ErasureError> {
        self.validate()?;
        let actual = self.blob_id();
        if actual == *id { Ok(()) } else { Err(ErasureError::IdMismatch { expected: *id, actual }) }
    }

    /// The length of each of this blob's slivers.
    pub fn sliver_len(&self) -> Result<usize, ErasureError> {
        sliver_len(self.length, self.k)
    }

    /// Checks that `data` is this blob's sliver for `shard`: the shard is in range, `data`
    /// has the sliver length and its BLAKE3 digest is the one in the metadata.
    pub fn verify_sliver(&self, shard: ShardIndex, data: &[u8]) -> Result<(), ErasureError> {
        let out_of_range = || ErasureError::ShardOutOfRange { shard: shard.0, n_shards: self.n_shards };
        if shard.0 >= self.n_shards {
            return Err(out_of_range());
        }
        let expected_digest = self.sliver_digests.get(shard.as_usize()).ok_or_else(out_of_range)?;
        let expected = self.sliver_len()?;
        if data.len() != expected {
            return Err(ErasureError::SliverLength { shard: shard.0, expected, got: data.len() });
        }
        // `blake3::Hash` compares in constant time.
        if blake3::hash(data) == blake3::Hash::from(*expected_digest) {
            Ok(())
        } else {
            Err(ErasureError::SliverDigest { shard: shard.0 })
        }
    }

    /// The protobuf message.
    pub fn to_proto(&self) -> ferry_proto::v1::BlobMetadata {
        ferry_proto::v1::BlobMetadata {
            length: self.length,
            n_shards: self.n_shards,
            k: self.k,
            encoding_version: self.encoding_version,
            sliver_digests: self.sliver_digests.iter().map(|d| d.to_vec()).collect(),
        }
    }

    /// Parses and validates the protobuf message: every digest must be 32 bytes and the
    /// result must pass [`validate`](Self::validate).
    pub fn from_proto(p: &ferry_proto::v1::BlobMetadata) -> Result<Self, ErasureError> {
        // Cheap checks first, so a huge digest list is refused before it is copied.
        original_count(p.n_shards)?;
        if p.sliver_digests.len() != p.n_shards as usize {
            return Err(ErasureError::DigestCount { n_shards: p.n_shards, got: p.sliver_digests.len() });
        }
        let sliver_digests = p
            .sliver_digests
            .iter()
            .enumerate()
            .map(|(shard, d)| {
                <[u8; 32]>::try_from(d.as_slice()).map_err(|_| ErasureError::DigestLength { shard, got: d.len() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let metadata = BlobMetadata {
            length: p.length,
            n_shards: p.n_shards,
            k: p.k,
            encoding_version: p.encoding_version,
            sliver_digests,
        };
        metadata.validate()?;
        Ok(metadata)
    }
}

/// A blob encoded into its slivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedBlob {
    /// The blob's id: [`BlobMetadata::blob_id`] of `metadata`.
    pub blob_id: BlobId,
    /// The blob's metadata.
    pub metadata: BlobMetadata,
    /// Every sliver, indexed by shard: `slivers[i]` belongs to shard `i`.
    pub slivers: Vec<Vec<u8>>,
}

/// Encodes `data` into `n_shards` slivers and computes its metadata and id.
///
/// Errors if `n_shards` is outside `1..=MAX_SHARDS` or `data` is longer than
/// [`MAX_BLOB_LEN`].
pub fn encode(data: &[u8], n_shards: u32) -> Result<EncodedBlob, ErasureError> {
    let k_u32 = original_count(n_shards)?;
    let length =
        u64::try_from(data.len()).map_err(|_| ErasureError::BlobTooLarge { length: u64::MAX, max: MAX_BLOB_LEN })?;
    let len = sliver_len(length, k_u32)?;
    let k = k_u32 as usize;

    // Full chunks are borrowed straight from `data`; only the last partial chunk is copied
    // and padded, and originals wholly past the end of the blob share one zero buffer.
    let mut chunks = data.chunks_exact(len);
    let remainder = chunks.remainder();
    let padded_last: Option<Vec<u8>> = (!remainder.is_empty()).then(|| {
        let mut last = remainder.to_vec();
        last.resize(len, 0);
        last
    });
    let zeros = vec![0u8; len];
    let mut originals: Vec<&[u8]> = Vec::with_capacity(k);
    originals.extend(chunks.by_ref());
    originals.extend(padded_last.as_deref());
    while originals.len() < k {
        originals.push(&zeros);
    }
    if originals.len() != k {
        // Impossible: len * k >= data.len().
        return Err(ErasureError::Codec(format!("cut the blob into {} originals instead of {k}", originals.len())));
    }

    let n = n_shards as usize;
    let mut slivers: Vec<Vec<u8>> = Vec::with_capacity(n);
    slivers.extend(originals.iter().map(|o| o.to_vec()));
    slivers.extend(encode_recovery(&originals, n.saturating_sub(k), len)?);

    let metadata = BlobMetadata {
        length,
        n_shards,
        k: k_u32,
        encoding_version: ENCODING_VERSION,
        sliver_digests: slivers.iter().map(|s| *blake3::hash(s).as_bytes()).collect(),
    };
    Ok(EncodedBlob { blob_id: metadata.blob_id(), metadata, slivers })
}

/// The `recovery_count` recovery slivers of the given originals (none when it is 0: the
/// Reed-Solomon library refuses a recovery count of 0).
fn encode_recovery<T: AsRef<[u8]>>(
    originals: &[T],
    recovery_count: usize,
    len: usize,
) -> Result<Vec<Vec<u8>>, ErasureError> {
    if recovery_count == 0 {
        return Ok(Vec::new());
    }
    let mut encoder = ReedSolomonEncoder::new(originals.len(), recovery_count, len)?;
    for original in originals {
        encoder.add_original_shard(original)?;
    }
    let result = encoder.encode()?;
    Ok(result.recovery_iter().map(<[u8]>::to_vec).collect())
}

/// The given slivers that pass verification, by shard, each shard once. Unverifiable slivers
/// (out of range, wrong length, wrong digest) are dropped.
fn verified<'a>(metadata: &BlobMetadata, slivers: &[(ShardIndex, &'a [u8])]) -> BTreeMap<u32, &'a [u8]> {
    let mut good = BTreeMap::new();
    for &(shard, data) in slivers {
        if !good.contains_key(&shard.0) && metadata.verify_sliver(shard, data).is_ok() {
            good.insert(shard.0, data);
        }
    }
    good
}

/// All `k` original slivers of a validated blob, from its verified slivers: borrowed where
/// available, restored with one Reed-Solomon decode otherwise. Restored originals are checked
/// against their digests.
fn originals<'a>(metadata: &BlobMetadata, good: &BTreeMap<u32, &'a [u8]>) -> Result<Vec<Cow<'a, [u8]>>, ErasureError> {
    let k = metadata.k;
    let need = k as usize;
    if good.len() < need {
        return Err(ErasureError::NotEnoughSlivers { have: good.len(), need });
    }
    let present = good.range(..k).count();
    if present == need {
        return Ok(good.range(..k).map(|(_, s)| Cow::Borrowed(*s)).collect());
    }

    let len = metadata.sliver_len()?;
    let recovery_count =
        metadata.n_shards.checked_sub(k).ok_or_else(|| ErasureError::Codec("more originals than shards".to_owned()))?
            as usize;
    if recovery_count == 0 {
        // Without recovery slivers every original is needed, and `good.len() >= k` means
        // they are all present; unreachable for validated metadata.
        return Err(ErasureError::NotEnoughSlivers { have: present, need });
    }
    let mut decoder = ReedSolomonDecoder::new(need, recovery_count, len)?;
    for (&shard, data) in good.range(..k) {
        decoder.add_original_shard(shard as usize, data)?;
    }
    // Exactly as many recovery slivers as are missing originals: more would only cost time.
    for (&shard, data) in good.range(k..).take(need.saturating_sub(present)) {
        decoder.add_recovery_shard(shard.saturating_sub(k) as usize, data)?;
    }
    let result = decoder.decode()?;

    let mut out = Vec::with_capacity(need);
    for shard in 0..k {
        match good.get(&shard) {
            Some(data) => out.push(Cow::Borrowed(*data)),
            None => {
                let restored = result
                    .restored_original(shard as usize)
                    .ok_or_else(|| ErasureError::Codec(format!("original sliver {shard} was not restored")))?;
                check_rebuilt(metadata, shard, restored)?;
                out.push(Cow::Owned(restored.to_vec()));
            }
        }
    }
    Ok(out)
}

/// Checks a sliver this module rebuilt against its digest.
fn check_rebuilt(metadata: &BlobMetadata, shard: u32, data: &[u8]) -> Result<(), ErasureError> {
    match metadata.verify_sliver(ShardIndex(shard), data) {
        Ok(()) => Ok(()),
        Err(ErasureError::SliverDigest { shard }) => Err(ErasureError::InconsistentEncoding { shard }),
        Err(e) => Err(e),
    }
}

/// Decodes the blob from any `k` or more of its slivers.
///
/// Every sliver is verified against the metadata first; those that fail are skipped, and a
/// shard given more than once counts once. Fails with [`ErasureError::NotEnoughSlivers`] if
/// fewer than `k` distinct verified slivers remain, and with
/// [`ErasureError::InconsistentEncoding`] if a restored original does not match its digest.
/// The result is exactly `metadata.length` bytes.
pub fn decode(metadata: &BlobMetadata, slivers: &[(ShardIndex, &[u8])]) -> Result<Vec<u8>, ErasureError> {
    metadata.validate()?;
    let good = verified(metadata, slivers);
    let originals = originals(metadata, &good)?;
    let length = usize::try_from(metadata.length)
        .map_err(|_| ErasureError::BlobTooLarge { length: metadata.length, max: MAX_BLOB_LEN })?;
    let mut out = Vec::with_capacity(length);
    for original in &originals {
        let remaining = length.saturating_sub(out.len());
        if remaining == 0 {
            break;
        }
        let take = remaining.min(original.len());
        out.extend_from_slice(original.get(..take).unwrap_or_default());
    }
    if out.len() != length {
        return Err(ErasureError::Codec(format!("decoded {} bytes instead of {length}", out.len())));
    }
    Ok(out)
}

/// Rebuilds the `wanted` slivers (original or recovery ones) from the `available` ones.
///
/// Available slivers are verified first and unverifiable ones skipped. Wanted slivers that are
/// available are returned as copies; the others are rebuilt with at most one Reed-Solomon
/// decode (and one re-encode when recovery slivers are wanted) from `k` or more verified
/// slivers, and each is verified against the metadata before it is returned. The result has
/// one entry per distinct wanted shard, in the order first wanted.
///
/// Fails with [`ErasureError::ShardOutOfRange`] for a wanted shard not in the blob,
/// [`ErasureError::NotEnoughSlivers`] if slivers must be rebuilt but fewer than `k` verified
/// ones are available, and [`ErasureError::InconsistentEncoding`] if a rebuilt sliver does not
/// match its digest.
pub fn rebuild(
    metadata: &BlobMetadata,
    available: &[(ShardIndex, &[u8])],
    wanted: &[ShardIndex],
) -> Result<Vec<(ShardIndex, Vec<u8>)>, ErasureError> {
    metadata.validate()?;
    let n_shards = metadata.n_shards;
    let k = metadata.k;

    let mut seen = BTreeSet::new();
    let mut distinct: Vec<u32> = Vec::new();
    for shard in wanted {
        if shard.0 >= n_shards {
            return Err(ErasureError::ShardOutOfRange { shard: shard.0, n_shards });
        }
        if seen.insert(shard.0) {
            distinct.push(shard.0);
        }
    }

    let good = verified(metadata, available);
    let missing = |s: &u32| !good.contains_key(s);
    let mut rebuilt: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    if distinct.iter().any(missing) {
        let originals = originals(metadata, &good)?;
        if distinct.iter().any(|s| missing(s) && *s >= k) {
            let len = metadata.sliver_len()?;
            let recovery = encode_recovery(&originals, n_shards.saturating_sub(k) as usize, len)?;
            for &shard in distinct.iter().filter(|s| missing(s) && **s >= k) {
                let sliver = recovery
                    .get(shard.saturating_sub(k) as usize)
                    .ok_or_else(|| ErasureError::Codec(format!("recovery sliver {shard} was not produced")))?;
                check_rebuilt(metadata, shard, sliver)?;
                rebuilt.insert(shard, sliver.clone());
            }
        }
        for &shard in distinct.iter().filter(|s| missing(s) && **s < k) {
            // Restored originals were already checked by `originals`.
            let sliver = originals
                .get(shard as usize)
                .ok_or_else(|| ErasureError::Codec(format!("original sliver {shard} was not produced")))?;
            rebuilt.insert(shard, sliver.to_vec());
        }
    }

    distinct
        .into_iter()
        .map(|shard| {
            let sliver = match good.get(&shard) {
                Some(data) => data.to_vec(),
                None => rebuilt
                    .remove(&shard)
                    .ok_or_else(|| ErasureError::Codec(format!("sliver {shard} was not rebuilt")))?,
            };
            Ok((ShardIndex(shard), sliver))
        })
        .collect()
}

/// Whether `slivers` (each checked against the metadata first) prove the blob inconsistent:
/// decoding from them rebuilds some other sliver, or an original, that does not match its
/// digest. What a node checks before it honours another's claim that a blob is invalid.
pub fn confirms_inconsistency(metadata: &BlobMetadata, slivers: &[(ShardIndex, &[u8])]) -> bool {
    let others: Vec<ShardIndex> =
        (0..metadata.n_shards).map(ShardIndex).filter(|s| !slivers.iter().any(|(have, _)| have == s)).collect();
    matches!(rebuild(metadata, slivers, &others), Err(ErasureError::InconsistentEncoding { .. }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic pseudo-random bytes.
    fn blob(len: usize, seed: u64) -> Vec<u8> {
        let mut out = vec![0; len];
        blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut out);
        out
    }

    fn refs(enc: &EncodedBlob, shards: &[u32]) -> Vec<(ShardIndex, Vec<u8>)> {
        shards.iter().map(|&s| (ShardIndex(s), enc.slivers[s as usize].clone())).collect()
    }

    fn as_input(v: &[(ShardIndex, Vec<u8>)]) -> Vec<(ShardIndex, &[u8])> {
        v.iter().map(|(s, d)| (*s, d.as_slice())).collect()
    }

    /// Encodes, checks the layout, and decodes from every window of k consecutive shards
    /// (mod n), from all shards and from the last k shards.
    fn round_trip(data: &[u8], n: u32) -> EncodedBlob {
        let enc = encode(data, n).unwrap();
        let md = &enc.metadata;
        md.validate().unwrap();
        assert_eq!(md.k, original_count(n).unwrap());
        assert_eq!(md.length, data.len() as u64);
        assert_eq!(enc.blob_id, md.blob_id());
        assert_eq!(enc.slivers.len(), n as usize);
        let len = md.sliver_len().unwrap();
        assert!(len >= 2 && len.is_multiple_of(2));
        for (i, s) in enc.slivers.iter().enumerate() {
            assert_eq!(s.len(), len);
            md.verify_sliver(ShardIndex(i as u32), s).unwrap();
        }
        // Systematic: the originals are the padded blob.
        let joined: Vec<u8> = enc.slivers[..md.k as usize].concat();
        assert_eq!(&joined[..data.len()], data);
        assert!(joined[data.len()..].iter().all(|&b| b == 0), "padding must be zero");

        let all: Vec<u32> = (0..n).collect();
        assert_eq!(decode(md, &as_input(&refs(&enc, &all))).unwrap(), data);
        for start in 0..n {
            let subset: Vec<u32> = (0..md.k).map(|i| (start + i) % n).collect();
            assert_eq!(decode(md, &as_input(&refs(&enc, &subset))).unwrap(), data, "{subset:?}");
        }
        enc
    }

    #[test]
    fn original_count_follows_the_fault_model() {
        let expected = [(1, 1), (2, 2), (3, 3), (4, 2), (5, 3), (6, 4), (7, 3), (10, 4), (13, 5)];
        for (n, k) in expected {
            assert_eq!(original_count(n), Ok(k), "n = {n}");
        }
        assert_eq!(original_count(1024), Ok(1024 - 2 * 341));
        assert_eq!(original_count(0), Err(ErasureError::ShardCount { n_shards: 0, max: 1024 }));
        assert!(original_count(1025).is_err());
        assert!(original_count(u32::MAX).is_err());
    }

    #[test]
    fn sliver_len_rules() {
        assert_eq!(sliver_len(0, 1), Ok(2));
        assert_eq!(sliver_len(0, 5), Ok(2));
        assert_eq!(sliver_len(1, 1), Ok(2));
        assert_eq!(sliver_len(3, 1), Ok(4));
        assert_eq!(sliver_len(10, 3), Ok(4));
        assert_eq!(sliver_len(12, 3), Ok(4));
        assert_eq!(sliver_len(13, 3), Ok(6));
        assert_eq!(sliver_len(MAX_BLOB_LEN, 1), Ok(MAX_BLOB_LEN as usize));
        assert!(matches!(sliver_len(MAX_BLOB_LEN + 1, 1), Err(ErasureError::BlobTooLarge { .. })));
        assert!(matches!(sliver_len(u64::MAX, 3), Err(ErasureError::BlobTooLarge { .. })));
        assert!(matches!(sliver_len(10, 0), Err(ErasureError::OriginalCount { .. })));
        assert!(matches!(sliver_len(10, 1025), Err(ErasureError::OriginalCount { .. })));
    }

    #[test]
    fn empty_blob() {
        for n in [1, 2, 3, 4, 7, 10] {
            let enc = round_trip(&[], n);
            assert_eq!(enc.metadata.sliver_len(), Ok(2));
        }
    }

    #[test]
    fn one_byte_blob() {
        for n in [1, 4, 7, 10] {
            round_trip(&[0xab], n);
        }
    }

    #[test]
    fn odd_length_blob() {
        for n in [1, 4, 7, 10] {
            round_trip(&blob(1001, 1), n);
        }
    }

    #[test]
    fn exactly_k_times_sliver_len() {
        for n in [1, 4, 7, 10] {
            let k = original_count(n).unwrap() as usize;
            let enc = round_trip(&blob(k * 64, 2), n);
            assert_eq!(enc.metadata.sliver_len(), Ok(64));
        }
    }

    #[test]
    fn shard_counts_1_4_7_10() {
        for n in [1, 4, 7, 10] {
            round_trip(&blob(4097, u64::from(n)), n);
        }
    }

    #[test]
    fn two_and_three_shards_have_no_recovery_slivers() {
        for n in [2, 3] {
            let data = blob(777, 3);
            let enc = round_trip(&data, n);
            assert_eq!(enc.metadata.k, n);
            let few: Vec<u32> = (1..n).collect();
            assert!(matches!(
                decode(&enc.metadata, &as_input(&refs(&enc, &few))),
                Err(ErasureError::NotEnoughSlivers { .. })
            ));
        }
    }

    #[test]
    fn max_shards_round_trip() {
        let data = blob(5000, 4);
        let enc = encode(&data, MAX_SHARDS).unwrap();
        let k = enc.metadata.k;
        let recovery_only: Vec<u32> = (MAX_SHARDS - k..MAX_SHARDS).collect();
        assert_eq!(decode(&enc.metadata, &as_input(&refs(&enc, &recovery_only))).unwrap(), data);
        assert!(matches!(encode(&data, 0), Err(ErasureError::ShardCount { .. })));
        assert!(matches!(encode(&data, MAX_SHARDS + 1), Err(ErasureError::ShardCount { .. })));
    }

    #[test]
    fn encoding_is_deterministic() {
        let data = blob(300, 5);
        assert_eq!(encode(&data, 7).unwrap(), encode(&data, 7).unwrap());
        assert_ne!(encode(&data, 7).unwrap().blob_id, encode(&data, 10).unwrap().blob_id);
    }

    #[test]
    fn canonical_bytes_layout() {
        let md = encode(b"hello", 4).unwrap().metadata;
        let bytes = md.canonical_bytes();
        assert!(bytes.starts_with(b"ferry-blob-metadata-v1"));
        let rest = &bytes[22..];
        assert_eq!(&rest[..8], &5u64.to_be_bytes());
        assert_eq!(&rest[8..12], &4u32.to_be_bytes());
        assert_eq!(&rest[12..16], &2u32.to_be_bytes());
        assert_eq!(&rest[16..20], &1u32.to_be_bytes());
        assert_eq!(rest.len(), 20 + 4 * 32);
        assert_eq!(&rest[20..52], &md.sliver_digests[0]);
        assert_eq!(md.blob_id().0, *blake3::hash(&bytes).as_bytes());
    }

    #[test]
    fn metadata_id_mismatch_detected() {
        let enc = encode(&blob(100, 6), 4).unwrap();
        enc.metadata.verify_id(&enc.blob_id).unwrap();
        let mut other = enc.metadata.clone();
        other.length -= 1;
        assert_eq!(
            other.verify_id(&enc.blob_id),
            Err(ErasureError::IdMismatch { expected: enc.blob_id, actual: other.blob_id() })
        );
        let mut digest = enc.metadata.clone();
        digest.sliver_digests[3][0] ^= 1;
        assert!(matches!(digest.verify_id(&enc.blob_id), Err(ErasureError::IdMismatch { .. })));
        // An inconsistent metadata is refused even if its id matches.
        let mut bad = enc.metadata.clone();
        bad.k = 3;
        assert!(matches!(
            bad.verify_id(&bad.blob_id()),
            Err(ErasureError::WrongOriginalCount { n_shards: 4, k: 3, expected: 2 })
        ));
    }

    #[test]
    fn validate_rejects_inconsistent_metadata() {
        let md = encode(&blob(100, 7), 7).unwrap().metadata;
        let mut m = md.clone();
        m.encoding_version = 2;
        assert!(matches!(m.validate(), Err(ErasureError::UnsupportedVersion { version: 2, .. })));
        let mut m = md.clone();
        m.n_shards = 0;
        assert!(matches!(m.validate(), Err(ErasureError::ShardCount { .. })));
        let mut m = md.clone();
        m.n_shards = 2000;
        assert!(matches!(m.validate(), Err(ErasureError::ShardCount { .. })));
        let mut m = md.clone();
        m.sliver_digests.pop();
        assert!(matches!(m.validate(), Err(ErasureError::DigestCount { n_shards: 7, got: 6 })));
        let mut m = md.clone();
        m.length = MAX_BLOB_LEN + 1;
        assert!(matches!(m.validate(), Err(ErasureError::BlobTooLarge { .. })));
        assert!(matches!(decode(&m, &[]), Err(ErasureError::BlobTooLarge { .. })));
    }

    #[test]
    fn verify_sliver_rejects_wrong_length() {
        let enc = encode(&blob(100, 8), 4).unwrap();
        let mut long = enc.slivers[0].clone();
        long.push(0);
        assert_eq!(
            enc.metadata.verify_sliver(ShardIndex(0), &long),
            Err(ErasureError::SliverLength { shard: 0, expected: 50, got: 51 })
        );
        assert!(matches!(
            enc.metadata.verify_sliver(ShardIndex(0), &enc.slivers[0][1..]),
            Err(ErasureError::SliverLength { .. })
        ));
        assert!(matches!(enc.metadata.verify_sliver(ShardIndex(0), &[]), Err(ErasureError::SliverLength { .. })));
    }

    #[test]
    fn verify_sliver_rejects_wrong_shard() {
        let enc = encode(&blob(100, 9), 4).unwrap();
        assert_eq!(
            enc.metadata.verify_sliver(ShardIndex(1), &enc.slivers[0]),
            Err(ErasureError::SliverDigest { shard: 1 })
        );
        let other = encode(&blob(100, 10), 4).unwrap();
        assert!(matches!(
            enc.metadata.verify_sliver(ShardIndex(0), &other.slivers[0]),
            Err(ErasureError::SliverDigest { shard: 0 })
        ));
    }

    #[test]
    fn verify_sliver_rejects_out_of_range_shard() {
        let enc = encode(&blob(100, 11), 4).unwrap();
        assert_eq!(
            enc.metadata.verify_sliver(ShardIndex(4), &enc.slivers[0]),
            Err(ErasureError::ShardOutOfRange { shard: 4, n_shards: 4 })
        );
        assert!(enc.metadata.verify_sliver(ShardIndex(u32::MAX), &enc.slivers[0]).is_err());
        // Metadata whose digest list is short must not panic either.
        let mut short = enc.metadata.clone();
        short.sliver_digests.truncate(2);
        assert!(short.verify_sliver(ShardIndex(3), &enc.slivers[3]).is_err());
    }

    #[test]
    fn proto_round_trip() {
        let md = encode(&blob(1234, 12), 10).unwrap().metadata;
        let p = md.to_proto();
        assert_eq!(p.sliver_digests.len(), 10);
        assert_eq!(BlobMetadata::from_proto(&p), Ok(md));
    }

    #[test]
    fn from_proto_rejects_31_byte_digest() {
        let mut p = encode(&blob(10, 13), 4).unwrap().metadata.to_proto();
        p.sliver_digests[2].pop();
        assert_eq!(BlobMetadata::from_proto(&p), Err(ErasureError::DigestLength { shard: 2, got: 31 }));
    }

    #[test]
    fn from_proto_rejects_inconsistent_metadata() {
        let good = encode(&blob(10, 14), 4).unwrap().metadata.to_proto();
        let mut p = good.clone();
        p.sliver_digests.push(vec![0; 32]);
        assert!(matches!(BlobMetadata::from_proto(&p), Err(ErasureError::DigestCount { .. })));
        let mut p = good.clone();
        p.k = 4;
        assert!(matches!(BlobMetadata::from_proto(&p), Err(ErasureError::WrongOriginalCount { .. })));
        let mut p = good.clone();
        p.encoding_version = 0;
        assert!(matches!(BlobMetadata::from_proto(&p), Err(ErasureError::UnsupportedVersion { .. })));
        let mut p = good;
        p.n_shards = 0;
        assert!(matches!(BlobMetadata::from_proto(&p), Err(ErasureError::ShardCount { .. })));
    }

    #[test]
    fn serde_round_trip() {
        let md = encode(&blob(10, 15), 4).unwrap().metadata;
        let json = serde_json::to_string(&md).unwrap();
        assert_eq!(serde_json::from_str::<BlobMetadata>(&json).unwrap(), md);
    }

    #[test]
    fn not_enough_slivers_with_k_minus_1() {
        for n in [4, 7, 10, 13] {
            let enc = encode(&blob(999, 16), n).unwrap();
            let k = enc.metadata.k;
            let few: Vec<u32> = (n - k + 1..n).collect();
            assert_eq!(few.len() as u32, k - 1);
            let input = refs(&enc, &few);
            assert_eq!(
                decode(&enc.metadata, &as_input(&input)),
                Err(ErasureError::NotEnoughSlivers { have: k as usize - 1, need: k as usize })
            );
            assert!(matches!(
                rebuild(&enc.metadata, &as_input(&input), &[ShardIndex(0)]),
                Err(ErasureError::NotEnoughSlivers { .. })
            ));
        }
        let enc = encode(b"x", 4).unwrap();
        assert_eq!(decode(&enc.metadata, &[]), Err(ErasureError::NotEnoughSlivers { have: 0, need: 2 }));
    }

    #[test]
    fn duplicate_shards_count_once() {
        let enc = encode(&blob(500, 17), 7).unwrap();
        let input = refs(&enc, &[5, 5, 5]);
        assert_eq!(decode(&enc.metadata, &as_input(&input)), Err(ErasureError::NotEnoughSlivers { have: 1, need: 3 }));
        // A bad copy before a good one of the same shard does not hide the good one.
        let mut input = refs(&enc, &[5, 5, 6, 0]);
        input[0].1[0] ^= 0xff;
        assert_eq!(decode(&enc.metadata, &as_input(&input)).unwrap(), blob(500, 17));
    }

    #[test]
    fn decode_skips_unverifiable_slivers() {
        let data = blob(2000, 18);
        let enc = encode(&data, 7).unwrap();
        let mut input = refs(&enc, &[0, 1, 2, 3, 4, 5, 6]);
        input[0].1[7] ^= 1;
        input[1].1.pop();
        input[2].0 = ShardIndex(99);
        input[3].1 = enc.slivers[4].clone();
        assert_eq!(decode(&enc.metadata, &as_input(&input)).unwrap(), data);
        input[4].1[0] ^= 1;
        assert_eq!(decode(&enc.metadata, &as_input(&input)), Err(ErasureError::NotEnoughSlivers { have: 2, need: 3 }));
    }

    #[test]
    fn inconsistent_encoding_detected() {
        // A writer that lies: a recovery sliver replaced by garbage, with its digest updated.
        let enc = encode(&blob(600, 19), 4).unwrap();
        let mut md = enc.metadata.clone();
        let garbage = blob(enc.slivers[3].len(), 20);
        md.sliver_digests[3] = *blake3::hash(&garbage).as_bytes();
        let input = vec![(ShardIndex(0), enc.slivers[0].as_slice()), (ShardIndex(3), &garbage)];
        assert_eq!(decode(&md, &input), Err(ErasureError::InconsistentEncoding { shard: 1 }));
        let originals = refs(&enc, &[0, 1]);
        assert_eq!(
            rebuild(&md, &as_input(&originals), &[ShardIndex(3)]),
            Err(ErasureError::InconsistentEncoding { shard: 3 })
        );
        // Shard 2 is still consistent and can be rebuilt.
        assert_eq!(
            rebuild(&md, &as_input(&originals), &[ShardIndex(2)]).unwrap(),
            vec![(ShardIndex(2), enc.slivers[2].clone())]
        );
    }

    #[test]
    fn rebuild_rejects_out_of_range_wanted() {
        let enc = encode(&blob(100, 21), 4).unwrap();
        let input = refs(&enc, &[0, 1, 2, 3]);
        assert_eq!(
            rebuild(&enc.metadata, &as_input(&input), &[ShardIndex(1), ShardIndex(4)]),
            Err(ErasureError::ShardOutOfRange { shard: 4, n_shards: 4 })
        );
    }

    #[test]
    fn rebuild_copies_available_and_dedups() {
        let enc = encode(&blob(100, 22), 7).unwrap();
        // Only one sliver available: enough, since it is the only one wanted.
        let input = refs(&enc, &[5]);
        assert_eq!(
            rebuild(&enc.metadata, &as_input(&input), &[ShardIndex(5), ShardIndex(5)]).unwrap(),
            vec![(ShardIndex(5), enc.slivers[5].clone())]
        );
        assert_eq!(rebuild(&enc.metadata, &[], &[]).unwrap(), vec![]);
        let input = refs(&enc, &[6, 4, 5]);
        let wanted = [6, 0, 3, 1, 0, 2].map(ShardIndex);
        let got = rebuild(&enc.metadata, &as_input(&input), &wanted).unwrap();
        let expected: Vec<_> =
            [6, 0, 3, 1, 2].into_iter().map(|s| (ShardIndex(s), enc.slivers[s as usize].clone())).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn rebuild_without_recovery_slivers() {
        let enc = encode(&blob(100, 23), 3).unwrap();
        let input = refs(&enc, &[0, 1, 2]);
        assert_eq!(
            rebuild(&enc.metadata, &as_input(&input), &[ShardIndex(2)]).unwrap(),
            vec![(ShardIndex(2), enc.slivers[2].clone())]
        );
        let input = refs(&enc, &[0, 1]);
        assert!(matches!(
            rebuild(&enc.metadata, &as_input(&input), &[ShardIndex(2)]),
            Err(ErasureError::NotEnoughSlivers { have: 2, need: 3 })
        ));
    }

    #[test]
    fn error_messages_have_stable_codes() {
        let errors = [
            ErasureError::ShardCount { n_shards: 0, max: MAX_SHARDS },
            ErasureError::SliverDigest { shard: 3 },
            ErasureError::NotEnoughSlivers { have: 1, need: 2 },
            ErasureError::Codec("x".into()),
        ];
        for e in errors {
            assert!(e.to_string().starts_with("FERRY-EC-0"), "{e}");
        }
        assert_eq!(
            ErasureError::SliverDigest { shard: 3 }.to_string(),
            "FERRY-EC-011: sliver for shard 3 does not match its digest in the metadata: \
             it is corrupt or belongs to another blob"
        );
    }

    /// A random shard count, blob and choices of shards.
    #[derive(Debug, Clone)]
    struct Case {
        n: u32,
        len: usize,
        seed: u64,
        subset: Vec<u32>,
        wanted: Vec<u32>,
        flip_shard: prop::sample::Index,
        flip_byte: prop::sample::Index,
        flip_mask: u8,
    }

    fn case() -> impl Strategy<Value = Case> {
        prop::sample::select(vec![4u32, 5, 7, 10, 13]).prop_flat_map(|n| {
            let k = original_count(n).unwrap() as usize;
            let all: Vec<u32> = (0..n).collect();
            (
                0usize..=3 << 20,
                any::<u64>(),
                prop::sample::subsequence(all.clone(), k),
                prop::sample::subsequence(all, 0..=n as usize),
                any::<prop::sample::Index>(),
                any::<prop::sample::Index>(),
                1u8..=255,
            )
                .prop_map(move |(len, seed, subset, wanted, flip_shard, flip_byte, flip_mask)| Case {
                    n,
                    len,
                    seed,
                    subset,
                    wanted,
                    flip_shard,
                    flip_byte,
                    flip_mask,
                })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn any_k_slivers_decode(c in case()) {
            let data = blob(c.len, c.seed);
            let enc = encode(&data, c.n).unwrap();
            let mut input = refs(&enc, &c.subset);
            input.reverse();
            prop_assert_eq!(decode(&enc.metadata, &as_input(&input)).unwrap(), data);
        }

        #[test]
        fn rebuild_matches_encoding(c in case()) {
            let enc = encode(&blob(c.len, c.seed), c.n).unwrap();
            let input = refs(&enc, &c.subset);
            let wanted: Vec<ShardIndex> = c.wanted.iter().copied().map(ShardIndex).collect();
            let got = rebuild(&enc.metadata, &as_input(&input), &wanted).unwrap();
            prop_assert_eq!(got.len(), wanted.len());
            for (shard, sliver) in got {
                prop_assert_eq!(&sliver, &enc.slivers[shard.as_usize()]);
            }
        }

        #[test]
        fn flipped_byte_is_detected(c in case()) {
            let data = blob(c.len, c.seed);
            let enc = encode(&data, c.n).unwrap();
            let shard = c.flip_shard.index(c.n as usize);
            let mut bad = enc.slivers[shard].clone();
            let at = c.flip_byte.index(bad.len());
            bad[at] ^= c.flip_mask;
            let detected = matches!(
                enc.metadata.verify_sliver(ShardIndex(shard as u32), &bad),
                Err(ErasureError::SliverDigest { .. })
            );
            prop_assert!(detected, "flipping byte {} of sliver {} went unnoticed", at, shard);
            // The corrupt sliver first, then k other good ones.
            let others: Vec<u32> =
                (0..c.n).filter(|&s| s as usize != shard).take(enc.metadata.k as usize).collect();
            let mut input = vec![(ShardIndex(shard as u32), bad.as_slice())];
            input.extend(others.iter().map(|&s| (ShardIndex(s), enc.slivers[s as usize].as_slice())));
            prop_assert_eq!(decode(&enc.metadata, &input).unwrap(), data);
        }
    }
}
