//! Criterion benchmarks of Ferry's erasure code (`ferry_shared::erasure`) next to the same
//! operations on `reed-solomon-simd` called directly, on the same data.
//!
//! Ferry's path does more than the bare codec: it hashes every sliver with BLAKE3 for the
//! metadata on encode, and verifies every input and output sliver against it on decode and
//! rebuild. The `rs-simd` rows are the codec alone, so the ratio is what that safety costs.
//!
//! Run: `cargo bench -p ferry-shared --bench erasure` (the README lists the latest figures).

#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferry_shared::{erasure, types::ShardIndex};
use std::{hint::black_box, time::Duration};

const N_SHARDS: u32 = 10;
const SIZES: [usize; 2] = [256 * 1024, 4 * 1024 * 1024];

fn blob(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for size in SIZES {
        let data = blob(size);
        let k = erasure::original_count(N_SHARDS).expect("valid n") as usize;
        let len = erasure::sliver_len(size as u64, k as u32).expect("valid length");
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("ferry", size), &data, |b, data| {
            b.iter(|| erasure::encode(black_box(data), N_SHARDS).expect("encode"))
        });
        group.bench_with_input(BenchmarkId::new("rs-simd", size), &data, |b, data| {
            b.iter(|| {
                let mut originals: Vec<Vec<u8>> = data.chunks(len).map(<[u8]>::to_vec).collect();
                if let Some(last) = originals.last_mut() {
                    last.resize(len, 0);
                }
                originals.resize(k, vec![0; len]);
                reed_solomon_simd::encode(k, N_SHARDS as usize - k, black_box(&originals)).expect("encode")
            })
        });
    }
    group.finish();
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for size in SIZES {
        let data = blob(size);
        let encoded = erasure::encode(&data, N_SHARDS).expect("encode");
        let k = encoded.metadata.k as usize;
        // The worst case: every original lost, decode from recovery slivers only.
        let from: Vec<(ShardIndex, &[u8])> =
            (k..N_SHARDS as usize).take(k).map(|i| (ShardIndex(i as u32), encoded.slivers[i].as_slice())).collect();
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("ferry", size), |b| {
            b.iter(|| erasure::decode(&encoded.metadata, black_box(&from)).expect("decode"))
        });
        group.bench_function(BenchmarkId::new("rs-simd", size), |b| {
            b.iter(|| {
                let recovery = from.iter().map(|(s, d)| (s.as_usize() - k, *d));
                reed_solomon_simd::decode(
                    k,
                    N_SHARDS as usize - k,
                    std::iter::empty::<(usize, &[u8])>(),
                    black_box(recovery),
                )
                .expect("decode")
            })
        });
    }
    group.finish();
}

fn bench_rebuild(c: &mut Criterion) {
    let mut group = c.benchmark_group("rebuild_one_sliver");
    for size in SIZES {
        let data = blob(size);
        let encoded = erasure::encode(&data, N_SHARDS).expect("encode");
        let k = encoded.metadata.k as usize;
        // Shard 0 is lost; rebuild it from the next k slivers (what blob recovery does).
        let from: Vec<(ShardIndex, &[u8])> =
            (1..=k).map(|i| (ShardIndex(i as u32), encoded.slivers[i].as_slice())).collect();
        group.throughput(Throughput::Bytes(encoded.slivers[0].len() as u64));
        group.bench_function(BenchmarkId::new("ferry", size), |b| {
            b.iter(|| erasure::rebuild(&encoded.metadata, black_box(&from), &[ShardIndex(0)]).expect("rebuild"))
        });
        group.bench_function(BenchmarkId::new("rs-simd", size), |b| {
            b.iter(|| {
                let originals = from.iter().filter(|(s, _)| s.as_usize() < k).map(|(s, d)| (s.as_usize(), *d));
                let recovery = from.iter().filter(|(s, _)| s.as_usize() >= k).map(|(s, d)| (s.as_usize() - k, *d));
                reed_solomon_simd::decode(k, N_SHARDS as usize - k, black_box(originals), black_box(recovery))
                    .expect("decode")
            })
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_encode, bench_decode, bench_rebuild
}
criterion_main!(benches);
