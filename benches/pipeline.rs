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

/// RocksDB index cache with 1M blobs: hits and misses, and batch inserts.
fn index_lookups(c: &mut Criterion) {
    use marmoset_index::{BlobLocation, IndexCache};
    let dir = std::env::temp_dir().join(format!("mrm-bench-idx-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let idx = IndexCache::open(&dir).unwrap();
    let id = |i: u64| *blake3::hash(&i.to_le_bytes()).as_bytes();
    let loc = BlobLocation {
        pack: [1; 32],
        offset: 0,
        length: 100,
        raw_length: 100,
        kind: 0,
        flags: 0,
    };
    for chunk in (0..1_000_000u64).collect::<Vec<_>>().chunks(50_000) {
        let batch: Vec<_> = chunk.iter().map(|&i| (id(i), loc)).collect();
        idx.insert_blobs(&batch, true).unwrap();
    }
    let mut g = c.benchmark_group("index_1M");
    let mut i = 0u64;
    g.bench_function("lookup_hit", |b| {
        b.iter(|| {
            i = (i + 7919) % 1_000_000;
            idx.get_blob(&id(i)).unwrap()
        })
    });
    g.bench_function("lookup_miss", |b| {
        b.iter(|| {
            i += 1;
            idx.get_blob(&id(2_000_000 + i)).unwrap()
        })
    });
    let mut n = 10_000_000u64;
    g.throughput(Throughput::Elements(1000));
    g.bench_function("insert_batch_1000", |b| {
        b.iter(|| {
            let batch: Vec<_> = (0..1000).map(|k| (id(n + k), loc)).collect();
            n += 1000;
            idx.insert_blobs(&batch, false).unwrap()
        })
    });
    g.finish();
    drop(idx);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Tree encoding and decoding of a 10 000-entry directory part.
fn tree_codec(c: &mut Criterion) {
    use marmoset_storage::{Id, Node, NodeKind, Tree};
    let nodes: Vec<Node> = (0..10_000u32)
        .map(|i| {
            let mut n = Node::new(format!("file-{i:06}.log").into_bytes(), NodeKind::File);
            n.mode = 0o644;
            n.size = u64::from(i) * 1000;
            n.content = vec![Id([i as u8; 32]); 2];
            n
        })
        .collect();
    let tree = Tree { nodes };
    let bytes = tree.encode().unwrap();
    let mut g = c.benchmark_group("tree_10k_entries");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("encode", |b| b.iter(|| tree.encode().unwrap().len()));
    g.bench_function("decode", |b| {
        b.iter(|| Tree::decode(&Id::default(), &bytes).unwrap().nodes.len())
    });
    g.finish();
}

criterion_group!(
    benches,
    chunker,
    hash,
    compress,
    encrypt,
    whole_pipeline,
    index_lookups,
    tree_codec
);
criterion_main!(benches);
