//! Blob metadata as a peer sends it (`GetMetadata`, shard-sync items, `StoreMetadata`): any
//! bytes decode to an error or to metadata that validates, round-trips and bounds its slivers.
#![no_main]

use ferry_proto::v1 as pb;
use ferry_shared::{
    erasure::{BlobMetadata, MAX_BLOB_LEN},
    types::ShardIndex,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

// Input: `[shard: u32 LE][sliver length: u8][sliver][BlobMetadata protobuf]`
fuzz_target!(|data: &[u8]| {
    let Some((shard, rest)) = ferry_fuzz::header::<4>(data) else { return };
    let shard = u32::from_le_bytes(shard);
    let Some((sliver, proto_bytes)) = ferry_fuzz::field(rest) else { return };
    let Ok(proto) = pb::BlobMetadata::decode(proto_bytes) else { return };
    let Ok(metadata) = BlobMetadata::from_proto(&proto) else { return };
    // Whatever was accepted is consistent, names itself and is bounded.
    metadata.validate().expect("from_proto accepted metadata that does not validate");
    metadata.verify_id(&metadata.blob_id()).expect("metadata does not verify against its own id");
    assert!(metadata.length <= MAX_BLOB_LEN);
    let sliver_len = metadata.sliver_len().expect("validated metadata has a sliver length");
    assert!((sliver_len as u64) <= MAX_BLOB_LEN / u64::from(metadata.k) + 2);
    assert_eq!(BlobMetadata::from_proto(&metadata.to_proto()).as_ref(), Ok(&metadata), "round trip");
    // A sliver of any shard and size is checked without panicking, and only the right length
    // and digest pass.
    if metadata.verify_sliver(ShardIndex(shard), sliver).is_ok() {
        assert!(shard < metadata.n_shards);
        assert_eq!(sliver.len(), sliver_len);
    }
});
