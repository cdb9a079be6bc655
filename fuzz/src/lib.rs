//! Fixtures the fuzz targets share: a committee with real keys, a blob stored and certified
//! under it, and a node certificate from a cluster CA, all built once and deterministically.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::{Arc, OnceLock};

use ferry_proto::v1 as pb;
use ferry_shared::{
    Committee, Member,
    certificate::{Certificate, CertificateBuilder, CommitteeKeys},
    crypto::{self, NodeKeypair},
    erasure::{self, EncodedBlob},
    types::{NodeId, ShardIndex},
};

pub const CLUSTER: &str = "fuzz";
pub const N_NODES: usize = 4;
pub const N_SHARDS: u32 = 8;

pub struct Fixture {
    pub committee: Arc<Committee>,
    pub keys: CommitteeKeys,
    /// A blob of the committee's shard count, stored and certified by nodes 0, 1 and 3.
    pub blob: EncodedBlob,
    pub certificate: Certificate,
}

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let keypairs: Vec<NodeKeypair> = (0..N_NODES).map(|i| NodeKeypair::from_seed([i as u8 + 1; 32])).collect();
        let members: Vec<Member> = keypairs
            .iter()
            .enumerate()
            .map(|(i, k)| {
                Member::for_key(NodeId::new(format!("node-{i}")).unwrap(), k, "127.0.0.1:1", "127.0.0.1:2", 1)
            })
            .collect();
        let committee = Arc::new(Committee::genesis(N_SHARDS, members).unwrap());
        let keys = CommitteeKeys::new(committee.clone()).unwrap();
        let data: Vec<u8> = (0..3000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let blob = erasure::encode(&data, N_SHARDS).unwrap();
        let mut builder = CertificateBuilder::new(CLUSTER, blob.blob_id, &keys);
        let message = crypto::confirmation_message(CLUSTER, &blob.blob_id, committee.epoch);
        for i in [0, 1, 3] {
            builder.add(&committee.members[i].node_id, &keypairs[i].bls_sign(&message)).unwrap();
        }
        let (certificate, _) = builder.build().unwrap();
        Fixture { committee, keys, blob, certificate }
    })
}

impl Fixture {
    /// The item an honest source streams for the fixture blob in `shard`.
    pub fn honest_item(&self, shard: ShardIndex) -> pb::ShardItem {
        pb::ShardItem {
            blob_id: self.blob.blob_id.0.to_vec(),
            data: self.blob.slivers[shard.as_usize()].clone(),
            metadata: Some(self.blob.metadata.to_proto()),
            certificate: Some(self.certificate.to_proto()),
            ..Default::default()
        }
    }
}

/// Inputs are plain bytes, so seeds are easy to write: a fixed header the target reads first,
/// then the payload. `(header, rest)`, or `None` if the input is shorter than the header.
pub fn header<const N: usize>(data: &[u8]) -> Option<([u8; N], &[u8])> {
    let (head, rest) = data.split_first_chunk::<N>()?;
    Some((*head, rest))
}

/// A length-prefixed field (one byte of length) and the rest.
pub fn field(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = data.split_first()?;
    let len = usize::from(*len).min(rest.len());
    Some(rest.split_at(len))
}
