//! The check a node makes of each item a shard-sync source streams to it, before any of it is
//! stored. Pure and separate from the receiver so that hostile items are fuzzed on their own
//! (`fuzz/fuzz_targets/shard_item.rs`).

use ferry_proto::v1 as pb;

use crate::{
    erasure::BlobMetadata,
    types::{BlobId, ShardIndex},
};

/// Checks an item's sliver against the metadata this node holds (`local`), or else the
/// metadata sent with it, which must hash to `blob_id`. `Some(metadata to store with the
/// sliver, if it is new here)`, or `None` if the item is bad.
pub fn verify_shard_item(
    shard: ShardIndex,
    blob_id: &BlobId,
    item: &pb::ShardItem,
    local: Option<BlobMetadata>,
) -> Option<Option<BlobMetadata>> {
    let (metadata, is_new) = match (local, &item.metadata) {
        (Some(m), _) => (m, false),
        (None, Some(p)) => (BlobMetadata::from_proto(p).and_then(|m| m.verify_id(blob_id).map(|()| m)).ok()?, true),
        (None, None) => return None,
    };
    metadata.verify_sliver(shard, &item.data).ok()?;
    Some(if is_new { Some(metadata) } else { None })
}
