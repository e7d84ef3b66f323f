//! Criterion micro-benchmarks of the per-chunk pipeline: chunking, keyed
//! hashing, compression, encryption, and all of them together, on
//! incompressible and text-like data. Run: `cargo bench --bench pipeline`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fastcdc::v2020::{Normalization, StreamCDC};
use marmoset_storage::blob::{self, BlobType};
use marmoset_storage::pack::PackBuilder;
use marmoset_storage::Keys;

const MIB: usize = 1 << 20;

fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E3779B97F4A7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn text(n: usize) -> Vec<u8> {
    let words = [
        "alpha ",
        "beta ",
        "level=info ",
        "request_id=42 ",
        "GET /api/v1 ",
        "200 OK\n",
    ];
    let mut v = Vec::with_capacity(n);
    let mut i = 7usize;
    while v.len() < n {
        i = i.wrapping_mul(31).wrapping_add(17);
        v.extend_from_slice(words[i % words.len()].as_bytes());
    }
    v.truncate(n);
    v
}

fn datasets() -> Vec<(&'static str, Vec<u8>)> {
    vec![("random", noise(32 * MIB)), ("text", text(32 * MIB))]
}

fn chunker(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunker");
    for (name, data) in datasets() {
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_with_input(BenchmarkId::new("fastcdc_1MiB", name), &data, |b, d| {
            b.iter(|| {
                StreamCDC::with_level_and_seed(
                    &d[..],
                    256 << 10,
                    MIB,
                    4 * MIB,
                    Normalization::Level1,
                    42,
                )
                .map(|c| c.unwrap().length)
                .sum::<usize>()
            })
        });
    }
    g.finish();
}

fn hash(c: &mut Criterion) {
    let keys = Keys::generate();
    let data = noise(MIB);
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("keyed_blake3_1MiB", |b| b.iter(|| keys.content_id(&data)));
    g.finish();
}

fn compress(c: &mut Criterion) {
    let mut g = c.benchmark_group("compress");
    for (name, data) in datasets() {
        let chunk = &data[..MIB];
        g.throughput(Throughput::Bytes(MIB as u64));
        for level in [1, 3, 6] {
            g.bench_with_input(
                BenchmarkId::new(format!("zstd_{level}"), name),
                chunk,
                |b, d| b.iter(|| zstd::bulk::compress(d, level).unwrap().len()),
            );
        }
    }
    g.finish();
}

fn encrypt(c: &mut Criterion) {
    let keys = Keys::generate();
    let data = noise(MIB);
    let id = keys.content_id(&data);
    let mut g = c.benchmark_group("encrypt");
    g.throughput(Throughput::Bytes(MIB as u64));
    g.bench_function("xchacha20poly1305_1MiB", |b| {
        b.iter(|| keys.encrypt(&data, &id.0))
    });
    g.finish();
}

/// chunk → hash → compress (skip if it does not shrink) → encrypt → pack.
fn whole_pipeline(c: &mut Criterion) {
    let keys = Keys::generate();
    let mut g = c.benchmark_group("pipeline_single_core");
    g.sample_size(10);
    for (name, data) in datasets() {
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("chunk_hash_compress_encrypt_pack", name),
            &data,
            |b, d| {
                b.iter(|| {
                    let mut pack = PackBuilder::default();
                    for ch in StreamCDC::with_level_and_seed(
                        &d[..],
                        256 << 10,
                        MIB,
                        4 * MIB,
                        Normalization::Level1,
                        42,
                    ) {
                        let ch = ch.unwrap();
                        let id = keys.content_id(&ch.data);
                        pack.add(blob::encode(&keys, BlobType::Data, id, &ch.data, 3).unwrap())
                            .unwrap();
                    }
                    pack.seal(&keys).unwrap().bytes.len()
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, chunker, hash, compress, encrypt, whole_pipeline);
criterion_main!(benches);
