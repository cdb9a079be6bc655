//! The erasure code against itself: a blob encoded honestly decodes and rebuilds exactly from
//! any `k` verified slivers, whichever slivers are missing or tampered with, and never from
//! fewer. An honest encoding is never "proved" inconsistent.
#![no_main]

use arbitrary::Arbitrary;
use ferry_shared::{
    erasure::{self, ErasureError},
    types::ShardIndex,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    n_shards: u8,
    data: Vec<u8>,
    /// Bit `i` keeps the sliver of shard `i`.
    present: u64,
    /// A sliver to alter: shard, byte offset, and what to xor into it.
    tamper: Option<(u8, u16, u8)>,
    /// Truncate a sliver instead: shard and how much shorter.
    truncate: Option<(u8, u8)>,
    wanted: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let n_shards = u32::from(input.n_shards % 40) + 1;
    let data = &input.data[..input.data.len().min(16 * 1024)];
    let encoded = erasure::encode(data, n_shards).expect("encoding in-range input");
    let k = encoded.metadata.k as usize;
    let mut slivers: Vec<(ShardIndex, Vec<u8>)> = (0..n_shards)
        .filter(|s| *s >= 64 || input.present & (1 << s) != 0)
        .map(|s| (ShardIndex(s), encoded.slivers[s as usize].clone()))
        .collect();
    let mut bad = std::collections::BTreeSet::new();
    if let Some((shard, offset, xor)) = input.tamper
        && xor != 0
        && let Some((s, sliver)) = slivers.iter_mut().find(|(s, _)| s.0 == u32::from(shard))
    {
        let at = usize::from(offset) % sliver.len();
        sliver[at] ^= xor;
        bad.insert(s.0);
    }
    if let Some((shard, by)) = input.truncate
        && by != 0
        && let Some((s, sliver)) = slivers.iter_mut().find(|(s, _)| s.0 == u32::from(shard))
    {
        sliver.truncate(sliver.len().saturating_sub(usize::from(by)));
        bad.insert(s.0);
    }
    let good = slivers.iter().filter(|(s, _)| !bad.contains(&s.0)).count();
    let available: Vec<(ShardIndex, &[u8])> = slivers.iter().map(|(s, d)| (*s, d.as_slice())).collect();

    match erasure::decode(&encoded.metadata, &available) {
        Ok(out) => {
            assert!(good >= k, "decoded from {good} verified slivers, k = {k}");
            assert_eq!(out, data, "decoded a different blob");
        }
        Err(ErasureError::NotEnoughSlivers { .. }) => assert!(good < k, "{good} verified slivers, k = {k}"),
        Err(e) => panic!("honest slivers failed to decode: {e}"),
    }

    let wanted: Vec<ShardIndex> = input.wanted.iter().take(64).map(|w| ShardIndex(u32::from(*w) % n_shards)).collect();
    let have = |s: &ShardIndex| slivers.iter().any(|(h, _)| h == s) && !bad.contains(&s.0);
    match erasure::rebuild(&encoded.metadata, &available, &wanted) {
        Ok(rebuilt) => {
            for (shard, sliver) in rebuilt {
                assert_eq!(sliver, encoded.slivers[shard.as_usize()], "rebuilt a different sliver");
            }
        }
        Err(ErasureError::NotEnoughSlivers { .. }) => {
            assert!(good < k && !wanted.iter().all(have), "refused a rebuild it could do");
        }
        Err(e) => panic!("honest slivers failed to rebuild: {e}"),
    }
    assert!(!erasure::confirms_inconsistency(&encoded.metadata, &available), "an honest blob proved inconsistent");
});
