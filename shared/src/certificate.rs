//! Compact certificates: proof that owners of a quorum of shards stored a blob.
//!
//! Each confirming node signs [`crypto::confirmation_message`] with its BLS12-381 key; the
//! client adds the signatures into one, and the certificate is that signature, the epoch of
//! the committee that signed, and a bitmap of the signers (bit `i` = `committee.members[i]`).
//! It is about 110 bytes with 100 members and 230 bytes with 1,000, whatever the number of
//! signers, and every node verifies it with one pairing check against the sum of the signers'
//! public keys ([`Certificate::verify`]), or many at once for less
//! ([`verify_batch`]).

use std::{collections::BTreeMap, sync::Arc};

use blst::{BLST_ERROR, min_pk as bls};
use ferry_proto::v1 as pb;
use thiserror::Error;

use crate::{
    committee::Committee,
    crypto::{self, BLS_SIGNATURE_BYTES, BLS_SIGNATURE_DST},
    types::{BlobId, Epoch, NodeId},
};

/// Why a certificate (or a confirmation to go in one) is not valid.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum CertificateError {
    /// Certificate epoch and committee epoch differ.
    #[error("FERRY-CERT-001: certificate is for epoch {cert} but the committee is of epoch {committee}")]
    Epoch {
        /// Certificate epoch.
        cert: Epoch,
        /// Committee epoch.
        committee: Epoch,
    },
    /// The signature does not verify for the signers named (or is malformed).
    #[error("FERRY-CERT-002: the signature does not verify: {0}")]
    BadSignature(String),
    /// The signers own too few shards.
    #[error("FERRY-CERT-003: signers own {have} shards; a quorum needs {need}")]
    NoQuorum {
        /// Shards owned by the signers.
        have: u32,
        /// Quorum.
        need: u32,
    },
    /// The signer bitmap does not fit the committee.
    #[error("FERRY-CERT-004: the signer bitmap has {bytes} bytes for a committee of {members} members")]
    Signers {
        /// Bytes in the bitmap.
        bytes: usize,
        /// Members of the committee.
        members: usize,
    },
    /// A confirmation from a node that is not a member of the committee.
    #[error("FERRY-CERT-005: {0} is not a member of the certifying committee")]
    NotAMember(NodeId),
    /// A member's published BLS key does not parse (the committee was not validated).
    #[error("FERRY-CERT-006: member {0} has an invalid BLS key")]
    MemberKey(NodeId),
}

/// The public keys of a committee's members, parsed and checked once, in member order.
#[derive(Debug)]
pub struct CommitteeKeys {
    committee: Arc<Committee>,
    keys: Vec<bls::PublicKey>,
}

impl CommitteeKeys {
    /// Parses every member's BLS key (checking its proof of possession).
    pub fn new(committee: Arc<Committee>) -> Result<Self, CertificateError> {
        let keys = committee
            .members
            .iter()
            .map(|m| crypto::parse_bls_key(&m.bls_key).map_err(|_| CertificateError::MemberKey(m.node_id.clone())))
            .collect::<Result<_, _>>()?;
        Ok(CommitteeKeys { committee, keys })
    }

    /// The committee.
    pub fn committee(&self) -> &Arc<Committee> {
        &self.committee
    }

    fn index_of(&self, node: &NodeId) -> Option<usize> {
        self.committee.members.iter().position(|m| &m.node_id == node)
    }
}

/// Proof that owners of a quorum of shards of `epoch`'s committee stored a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// Epoch of the committee whose members signed.
    pub epoch: Epoch,
    /// Bit `i` (byte `i / 8`, bit `i % 8`) set when `committee.members[i]` signed.
    pub signers: Vec<u8>,
    /// The signers' confirmation signatures, added up.
    pub signature: [u8; BLS_SIGNATURE_BYTES],
}

impl Certificate {
    /// Largest signer bitmap accepted from the network: 8,192 members.
    pub const MAX_SIGNER_BYTES: usize = 1024;

    /// Parses a certificate received from the network, checking sizes only.
    pub fn from_proto(proto: &pb::Certificate) -> Result<Self, CertificateError> {
        if proto.signers.len() > Self::MAX_SIGNER_BYTES {
            return Err(CertificateError::Signers { bytes: proto.signers.len(), members: Self::MAX_SIGNER_BYTES * 8 });
        }
        let signature = <[u8; BLS_SIGNATURE_BYTES]>::try_from(proto.signature.as_slice())
            .map_err(|_| CertificateError::BadSignature(format!("{} bytes, want 96", proto.signature.len())))?;
        Ok(Certificate { epoch: proto.epoch, signers: proto.signers.clone(), signature })
    }

    /// The wire form.
    pub fn to_proto(&self) -> pb::Certificate {
        pb::Certificate { epoch: self.epoch, signers: self.signers.clone(), signature: self.signature.to_vec() }
    }

    /// Indices (in `committee.members`) of the signers.
    pub fn signer_indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.signers
            .iter()
            .enumerate()
            .flat_map(|(byte, bits)| (0..8).filter(move |b| bits & (1 << b) != 0).map(move |b| byte * 8 + b))
    }

    /// Checks the bitmap and the quorum and returns the signers' aggregated public key.
    fn signers_key(&self, keys: &CommitteeKeys) -> Result<bls::PublicKey, CertificateError> {
        let committee = keys.committee();
        if self.epoch != committee.epoch {
            return Err(CertificateError::Epoch { cert: self.epoch, committee: committee.epoch });
        }
        let members = committee.members.len();
        if self.signers.len() != members.div_ceil(8) || self.signer_indices().any(|i| i >= members) {
            return Err(CertificateError::Signers { bytes: self.signers.len(), members });
        }
        let indices: Vec<usize> = self.signer_indices().collect();
        let have = committee.shards_owned_by(indices.iter().map(|i| &committee.members[*i].node_id));
        if have < committee.quorum_shards() {
            return Err(CertificateError::NoQuorum { have, need: committee.quorum_shards() });
        }
        let selected: Vec<&bls::PublicKey> = indices.iter().map(|i| &keys.keys[*i]).collect();
        // The keys were validated with their proofs of possession when parsed.
        bls::AggregatePublicKey::aggregate(&selected, false)
            .map(|k| k.to_public_key())
            .map_err(|e| CertificateError::BadSignature(format!("{e:?}")))
    }

    /// Verifies the certificate for `blob` against the committee of its epoch: the signers
    /// own a quorum of shards and the signature is theirs.
    pub fn verify(&self, cluster: &str, blob: &BlobId, keys: &CommitteeKeys) -> Result<(), CertificateError> {
        let key = self.signers_key(keys)?;
        let signature = bls::Signature::sig_validate(&self.signature, true)
            .map_err(|e| CertificateError::BadSignature(format!("{e:?}")))?;
        let message = crypto::confirmation_message(cluster, blob, self.epoch);
        match signature.verify(false, &message, BLS_SIGNATURE_DST, &[], &key, false) {
            BLST_ERROR::BLST_SUCCESS => Ok(()),
            e => Err(CertificateError::BadSignature(format!("{e:?}"))),
        }
    }

    /// Bytes of the wire form, for size reports.
    pub fn encoded_len(&self) -> usize {
        prost::Message::encoded_len(&self.to_proto())
    }
}

/// A certificate parsed for verification: the signers' aggregated key, the signature, the
/// signed message.
struct Prepared {
    key: bls::PublicKey,
    signature: bls::Signature,
    message: Vec<u8>,
}

/// Verifies many certificates at once, each against the keys of its own epoch: one multi-pairing
/// with random weights, which costs about half as much per certificate as one by one. Returns
/// one result per certificate; when the batch fails as a whole, each is checked alone, so a bad
/// certificate never hides good ones.
pub fn verify_batch(
    cluster: &str,
    items: &[(BlobId, &Certificate, &CommitteeKeys)],
) -> Vec<Result<(), CertificateError>> {
    if items.len() < 2 {
        return items.iter().map(|(blob, cert, keys)| cert.verify(cluster, blob, keys)).collect();
    }
    let prepared: Vec<Result<Prepared, CertificateError>> = items
        .iter()
        .map(|(blob, cert, keys)| {
            let key = cert.signers_key(keys)?;
            let signature = bls::Signature::sig_validate(&cert.signature, true)
                .map_err(|e| CertificateError::BadSignature(format!("{e:?}")))?;
            Ok(Prepared { key, signature, message: crypto::confirmation_message(cluster, blob, cert.epoch) })
        })
        .collect();
    let ok: Vec<&Prepared> = prepared.iter().filter_map(|p| p.as_ref().ok()).collect();
    if !ok.is_empty() {
        let rands: Vec<blst::blst_scalar> = ok
            .iter()
            .map(|_| {
                let mut bytes = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes[..8]);
                blst::blst_scalar { b: bytes }
            })
            .collect();
        let messages: Vec<&[u8]> = ok.iter().map(|p| p.message.as_slice()).collect();
        let keys: Vec<&bls::PublicKey> = ok.iter().map(|p| &p.key).collect();
        let signatures: Vec<&bls::Signature> = ok.iter().map(|p| &p.signature).collect();
        let all = bls::Signature::verify_multiple_aggregate_signatures(
            &messages,
            BLS_SIGNATURE_DST,
            &keys,
            false,
            &signatures,
            false,
            &rands,
            64,
        );
        if all == BLST_ERROR::BLST_SUCCESS {
            return prepared.into_iter().map(|p| p.map(|_| ())).collect();
        }
    }
    items.iter().map(|(blob, cert, keys)| cert.verify(cluster, blob, keys)).collect()
}

/// Collects confirmations of one blob into a certificate. Signatures are added without a check
/// each (a pairing apiece); [`CertificateBuilder::build`] checks the sum once and, only if that
/// fails, finds and drops the bad ones.
pub struct CertificateBuilder<'a> {
    cluster: &'a str,
    blob: BlobId,
    keys: &'a CommitteeKeys,
    signatures: BTreeMap<usize, bls::Signature>,
}

impl<'a> CertificateBuilder<'a> {
    /// A builder for `blob` under the committee of `keys`.
    pub fn new(cluster: &'a str, blob: BlobId, keys: &'a CommitteeKeys) -> Self {
        CertificateBuilder { cluster, blob, keys, signatures: BTreeMap::new() }
    }

    /// Adds `node`'s confirmation signature (checked for form and membership only).
    pub fn add(&mut self, node: &NodeId, signature: &[u8]) -> Result<(), CertificateError> {
        let index = self.keys.index_of(node).ok_or_else(|| CertificateError::NotAMember(node.clone()))?;
        let signature = bls::Signature::sig_validate(signature, true)
            .map_err(|e| CertificateError::BadSignature(format!("{node}: {e:?}")))?;
        self.signatures.insert(index, signature);
        Ok(())
    }

    /// Shards owned by the nodes that confirmed so far.
    pub fn shards(&self) -> u32 {
        let committee = self.keys.committee();
        committee.shards_owned_by(self.signatures.keys().map(|i| &committee.members[*i].node_id))
    }

    fn assemble(&self, indices: &[usize]) -> Result<Certificate, CertificateError> {
        let members = self.keys.committee().members.len();
        let mut signers = vec![0u8; members.div_ceil(8)];
        for i in indices {
            signers[i / 8] |= 1 << (i % 8);
        }
        let signatures: Vec<&bls::Signature> = indices.iter().filter_map(|i| self.signatures.get(i)).collect();
        let signature = bls::AggregateSignature::aggregate(&signatures, false)
            .map_err(|e| CertificateError::BadSignature(format!("{e:?}")))?
            .to_signature()
            .to_bytes();
        Ok(Certificate { epoch: self.keys.committee().epoch, signers, signature })
    }

    /// The certificate of every confirmation added, not verified here: the members that take
    /// it verify it, so a client saves a pairing per blob and checks only when a member refuses
    /// it ([`CertificateBuilder::build`]). Fails only without a quorum of shards.
    pub fn build_unchecked(&self) -> Result<Certificate, CertificateError> {
        let need = self.keys.committee().quorum_shards();
        if self.shards() < need {
            return Err(CertificateError::NoQuorum { have: self.shards(), need });
        }
        let all: Vec<usize> = self.signatures.keys().copied().collect();
        self.assemble(&all)
    }

    /// The certificate of every valid confirmation added, if they own a quorum of shards.
    /// Returns the nodes whose signatures were dropped as invalid alongside.
    pub fn build(&self) -> Result<(Certificate, Vec<NodeId>), CertificateError> {
        let all: Vec<usize> = self.signatures.keys().copied().collect();
        if all.is_empty() {
            return Err(CertificateError::NoQuorum { have: 0, need: self.keys.committee().quorum_shards() });
        }
        let certificate = self.assemble(&all)?;
        match certificate.verify(self.cluster, &self.blob, self.keys) {
            Ok(()) => return Ok((certificate, Vec::new())),
            Err(e @ (CertificateError::NoQuorum { .. } | CertificateError::Epoch { .. })) => return Err(e),
            Err(_) => {}
        }
        // A bad signature among them: check each alone (rare; a faulty or lying node).
        let message = crypto::confirmation_message(self.cluster, &self.blob, self.keys.committee().epoch);
        let (good, bad): (Vec<usize>, Vec<usize>) = all.into_iter().partition(|i| {
            self.signatures[i].verify(false, &message, BLS_SIGNATURE_DST, &[], &self.keys.keys[*i], false)
                == BLST_ERROR::BLST_SUCCESS
        });
        let dropped = bad.iter().map(|i| self.keys.committee().members[*i].node_id.clone()).collect();
        if good.is_empty() {
            return Err(CertificateError::NoQuorum { have: 0, need: self.keys.committee().quorum_shards() });
        }
        let certificate = self.assemble(&good)?;
        certificate.verify(self.cluster, &self.blob, self.keys)?;
        Ok((certificate, dropped))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{Member, crypto::NodeKeypair};

    fn committee(n: usize, n_shards: u32) -> (Vec<NodeKeypair>, CommitteeKeys) {
        let keys: Vec<NodeKeypair> =
            (0..n).map(|i| NodeKeypair::from_seed(*blake3::hash(&(i as u64).to_be_bytes()).as_bytes())).collect();
        let members = keys
            .iter()
            .enumerate()
            .map(|(i, k)| Member::for_key(NodeId::new(format!("n{i:03}")).unwrap(), k, "a:1", "a:2", 1))
            .collect();
        let committee = Committee::genesis(n_shards, members).unwrap();
        (keys, CommitteeKeys::new(Arc::new(committee)).unwrap())
    }

    fn confirm<'a>(keys: &[NodeKeypair], ck: &'a CommitteeKeys, blob: BlobId, who: &[usize]) -> CertificateBuilder<'a> {
        let mut b = CertificateBuilder::new("c", blob, ck);
        for i in who {
            let node = &ck.committee().members[*i].node_id;
            b.add(node, &keys[*i].bls_sign(&crypto::confirmation_message("c", &blob, 0))).unwrap();
        }
        b
    }

    #[test]
    fn a_quorum_certifies_and_anything_less_or_altered_does_not() {
        let (keys, ck) = committee(4, 8); // 2 shards each; quorum 2f+1 = 5 shards = 3 nodes
        let blob = BlobId([3; 32]);
        let (cert, dropped) = confirm(&keys, &ck, blob, &[0, 1, 3]).build().unwrap();
        assert!(dropped.is_empty());
        cert.verify("c", &blob, &ck).unwrap();
        assert_eq!(cert.signer_indices().collect::<Vec<_>>(), vec![0, 1, 3]);
        assert!(cert.encoded_len() < 110, "compact: {} bytes", cert.encoded_len());
        // Another blob, another cluster: refused.
        assert!(matches!(cert.verify("c", &BlobId([4; 32]), &ck), Err(CertificateError::BadSignature(_))));
        assert!(matches!(cert.verify("other", &blob, &ck), Err(CertificateError::BadSignature(_))));
        // Claiming a signer that did not sign, or dropping one that did: refused.
        let mut more = cert.clone();
        more.signers[0] |= 1 << 2;
        assert!(matches!(more.verify("c", &blob, &ck), Err(CertificateError::BadSignature(_))));
        let mut fewer = cert.clone();
        fewer.signers[0] &= !(1 << 3);
        assert!(matches!(fewer.verify("c", &blob, &ck), Err(CertificateError::NoQuorum { have: 4, need: 5 })));
        // Two nodes own 4 of 8 shards: no quorum.
        assert!(matches!(confirm(&keys, &ck, blob, &[0, 1]).build(), Err(CertificateError::NoQuorum { .. })));
        // Bitmap of the wrong size, bits beyond the members, another epoch.
        let mut long = cert.clone();
        long.signers.push(0);
        assert!(matches!(long.verify("c", &blob, &ck), Err(CertificateError::Signers { .. })));
        let mut beyond = cert.clone();
        beyond.signers[0] |= 1 << 7;
        assert!(matches!(beyond.verify("c", &blob, &ck), Err(CertificateError::Signers { .. })));
        let mut later = cert.clone();
        later.epoch = 1;
        assert!(matches!(later.verify("c", &blob, &ck), Err(CertificateError::Epoch { .. })));
        // The wire form round-trips and refuses a short signature.
        assert_eq!(Certificate::from_proto(&cert.to_proto()).unwrap(), cert);
        let mut short = cert.to_proto();
        short.signature.pop();
        assert!(Certificate::from_proto(&short).is_err());
    }

    #[test]
    fn a_bad_confirmation_is_dropped_and_the_rest_still_certify() {
        let (keys, ck) = committee(4, 8);
        let blob = BlobId([5; 32]);
        let mut b = confirm(&keys, &ck, blob, &[0, 1, 2]);
        // Node 3 signs another blob.
        let n3 = ck.committee().members[3].node_id.clone();
        b.add(&n3, &keys[3].bls_sign(&crypto::confirmation_message("c", &BlobId([6; 32]), 0))).unwrap();
        let (cert, dropped) = b.build().unwrap();
        assert_eq!(dropped, vec![n3]);
        assert_eq!(cert.signer_indices().collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(matches!(b.add(&NodeId::new("zz").unwrap(), &[0; 96]), Err(CertificateError::NotAMember(_))));
    }

    #[test]
    fn a_batch_reports_each_bad_certificate_and_passes_the_rest() {
        let (keys, ck) = committee(4, 8);
        let certs: Vec<(BlobId, Certificate)> = (0..6u8)
            .map(|i| {
                let blob = BlobId([i; 32]);
                (blob, confirm(&keys, &ck, blob, &[0, 1, 2]).build().unwrap().0)
            })
            .collect();
        let mut items: Vec<(BlobId, &Certificate, &CommitteeKeys)> = certs.iter().map(|(b, c)| (*b, c, &ck)).collect();
        assert!(verify_batch("c", &items).iter().all(Result::is_ok));
        // Two certificates swapped between their blobs: exactly those two fail.
        items[1] = (certs[1].0, &certs[4].1, &ck);
        items[4] = (certs[4].0, &certs[1].1, &ck);
        let results = verify_batch("c", &items);
        let failed: Vec<usize> = results.iter().enumerate().filter(|(_, r)| r.is_err()).map(|(i, _)| i).collect();
        assert_eq!(failed, vec![1, 4]);
    }

    /// A node checks clients' certificates while a catch-up verifies a large batch: no check may
    /// wait for the batch (blst's shared worker pool queued each one behind all of it).
    #[test]
    fn single_certificates_are_checked_while_a_large_batch_runs() {
        let (keys, ck) = committee(4, 8);
        let certs: Vec<(BlobId, Certificate)> = (0..768u32)
            .map(|i| {
                let mut id = [0u8; 32];
                id[..4].copy_from_slice(&i.to_be_bytes());
                let blob = BlobId(id);
                (blob, confirm(&keys, &ck, blob, &[0, 1, 2]).build_unchecked().unwrap())
            })
            .collect();
        let (single_blob, single) = (certs[0].0, certs[0].1.clone());
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (longest_single, checks, batch_took) = std::thread::scope(|scope| {
            let batch = scope.spawn(|| {
                let items: Vec<(BlobId, &Certificate, &CommitteeKeys)> =
                    certs.iter().map(|(b, c)| (*b, c, &ck)).collect();
                started_tx.send(()).unwrap();
                let started = std::time::Instant::now();
                let results = verify_batch("c", &items);
                (started.elapsed(), results)
            });
            started_rx.recv().unwrap();
            let (mut longest, mut checks) = (std::time::Duration::ZERO, 0);
            while !batch.is_finished() {
                let started = std::time::Instant::now();
                single.verify("c", &single_blob, &ck).unwrap();
                longest = longest.max(started.elapsed());
                checks += 1;
            }
            let (took, results) = batch.join().unwrap();
            assert!(results.iter().all(Result::is_ok));
            (longest, checks, took)
        });
        assert!(
            longest_single < batch_took / 4,
            "a single check waited {longest_single:?} beside a batch of {} that took {batch_took:?} ({checks} checks)",
            certs.len()
        );
    }

    #[test]
    fn a_certificate_stays_small_with_a_thousand_members() {
        let (keys, ck) = committee(1000, 1000);
        let blob = BlobId([9; 32]);
        let who: Vec<usize> = (0..700).collect();
        let (cert, _) = confirm(&keys, &ck, blob, &who).build().unwrap();
        assert!(cert.encoded_len() < 240, "{} bytes", cert.encoded_len());
        cert.verify("c", &blob, &ck).unwrap();
    }
}
