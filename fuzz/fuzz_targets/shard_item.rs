//! What a shard-sync receiver does with each item a source streams, before anything is stored:
//! the blob id, the sliver checked against local or sent metadata, and the certificate that
//! must verify before a blob this node did not know counts. Nothing a source sends passes
//! unless it is the honest item: the fixture blob's own sliver, metadata and certificate.
#![no_main]

use ferry_fuzz::{CLUSTER, fixture};
use ferry_proto::v1 as pb;
use ferry_shared::{
    certificate::Certificate,
    shard_item::verify_shard_item,
    types::{BlobId, ShardIndex},
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

// Input: `[shard: u8][known here: u8, odd for yes][ShardItem protobuf]`
fuzz_target!(|data: &[u8]| {
    let Some(([shard, known_here], bytes)) = ferry_fuzz::header::<2>(data) else { return };
    let known_here = known_here & 1 == 1;
    let Ok(item) = pb::ShardItem::decode(bytes) else { return };
    let Ok(blob_id) = BlobId::from_bytes(&item.blob_id) else { return };
    let f = fixture();
    let shard = ShardIndex(u32::from(shard) % (f.committee.n_shards + 2));
    let is_fixture = blob_id == f.blob.blob_id;
    // The receiver holds the fixture's metadata only when it knows that blob already.
    let local = (known_here && is_fixture).then(|| f.blob.metadata.clone());
    if let Some(new_metadata) = verify_shard_item(shard, &blob_id, &item, local.clone()) {
        assert!(is_fixture, "a sliver of a blob nobody encoded passed");
        assert_eq!(item.data, f.blob.slivers[shard.as_usize()], "a sliver that is not the blob's own passed");
        match new_metadata {
            Some(m) => {
                assert!(local.is_none(), "metadata offered as new although it was known");
                assert_eq!(m, f.blob.metadata, "other metadata for the same id passed");
            }
            None => assert!(local.is_some(), "no metadata to store for a blob that was not known"),
        }
    }
    if let Some(proto) = &item.certificate
        && let Ok(certificate) = Certificate::from_proto(proto)
        && certificate.verify(CLUSTER, &blob_id, &f.keys).is_ok()
    {
        assert!(is_fixture, "a certificate verified for a blob nobody confirmed");
        assert_eq!(certificate.epoch, f.certificate.epoch);
        assert_eq!(certificate.signature, f.certificate.signature, "a forged aggregate verified");
    }
});
