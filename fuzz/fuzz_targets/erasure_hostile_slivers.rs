//! The erasure code under a faulty writer: slivers of its choosing, with metadata made of
//! their own digests (so every sliver verifies). Decoding and rebuilding must neither panic nor
//! return a blob of the wrong length, and an inconsistency is reported for a wanted shard.
#![no_main]

use arbitrary::Arbitrary;
use ferry_shared::{
    erasure::{self, BlobMetadata, ENCODING_VERSION, ErasureError},
    types::ShardIndex,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    n_shards: u8,
    length: u16,
    /// The bytes the writer's slivers are cut from (repeated as needed).
    bytes: Vec<u8>,
    present: u64,
    wanted: Vec<u8>,
}

fuzz_target!(|input: Input| {
    if input.bytes.is_empty() {
        return;
    }
    let n_shards = u32::from(input.n_shards % 40) + 1;
    let k = erasure::original_count(n_shards).expect("in range");
    let length = u64::from(input.length);
    let len = erasure::sliver_len(length, k).expect("in range");
    let mut source = input.bytes.iter().cycle();
    let slivers: Vec<Vec<u8>> =
        (0..n_shards).map(|_| (0..len).map(|_| *source.next().unwrap_or(&0)).collect()).collect();
    let metadata = BlobMetadata {
        length,
        n_shards,
        k,
        encoding_version: ENCODING_VERSION,
        sliver_digests: slivers.iter().map(|s| *blake3::hash(s).as_bytes()).collect(),
    };
    metadata.validate().expect("the writer's metadata is well-formed");
    let available: Vec<(ShardIndex, &[u8])> = (0..n_shards)
        .filter(|s| *s >= 64 || input.present & (1 << s) != 0)
        .map(|s| (ShardIndex(s), slivers[s as usize].as_slice()))
        .collect();

    match erasure::decode(&metadata, &available) {
        Ok(out) => assert_eq!(out.len() as u64, length),
        Err(ErasureError::NotEnoughSlivers { .. } | ErasureError::InconsistentEncoding { .. }) => {}
        Err(e) => panic!("unexpected decode error: {e}"),
    }
    let wanted: Vec<ShardIndex> = input.wanted.iter().take(64).map(|w| ShardIndex(u32::from(*w) % n_shards)).collect();
    match erasure::rebuild(&metadata, &available, &wanted) {
        Ok(rebuilt) => {
            for (shard, sliver) in rebuilt {
                // Whatever is handed back verifies: a node never stores an unverified sliver.
                metadata.verify_sliver(shard, &sliver).expect("rebuilt a sliver that does not verify");
            }
        }
        Err(ErasureError::InconsistentEncoding { shard }) => {
            assert!(shard < n_shards, "the proof names a shard out of range");
        }
        Err(ErasureError::NotEnoughSlivers { .. }) => {}
        Err(e) => panic!("unexpected rebuild error: {e}"),
    }
    let _ = erasure::confirms_inconsistency(&metadata, &available);
});
