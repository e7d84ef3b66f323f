//! Hostile input: every decoder of repository objects gets arbitrary and
//! mutated bytes and must return an error, never panic or loop.
//! (`cargo fuzz` is not used here: proptest runs in the normal test suite.)
#![allow(clippy::expect_used, clippy::unwrap_used)]

use marmoset_storage::blob::{self, BlobType};
use marmoset_storage::format::{self, Config};
use marmoset_storage::pack::{self, PackBuilder};
use marmoset_storage::{Id, KeyFile, Keys, Snapshot, Tree};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("MARMOSET_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn keys() -> &'static Keys {
    static K: std::sync::OnceLock<Keys> = std::sync::OnceLock::new();
    K.get_or_init(|| Keys::from_master([7; 32]))
}

/// Built once: wrapping a key runs the (deliberately slow) KDF.
fn cached_samples() -> &'static [(&'static str, Vec<u8>)] {
    static S: std::sync::OnceLock<Vec<(&'static str, Vec<u8>)>> = std::sync::OnceLock::new();
    S.get_or_init(|| samples(keys()))
}

/// Valid encodings of every object, to mutate.
fn samples(keys: &Keys) -> Vec<(&'static str, Vec<u8>)> {
    let mut cfg = Config::new();
    cfg.sign(keys).unwrap();
    let kf = serde_json::to_vec(&KeyFile::wrap(keys, b"pw").unwrap()).unwrap();
    let data = b"some file content".repeat(50);
    let id = keys.content_id(&data);
    let mut pb = PackBuilder::default();
    pb.add(blob::encode(keys, BlobType::Data, id, &data, 3).unwrap())
        .unwrap();
    let sealed = pb.seal(keys).unwrap();
    let index = format::encode_index(&[(sealed.id, sealed.entries.clone())]);
    let mut n = marmoset_storage::Node::new(b"name".to_vec(), marmoset_storage::NodeKind::File);
    n.content = vec![id];
    let tree = Tree { nodes: vec![n] }.encode().unwrap();
    vec![
        ("config", cfg.to_bytes().unwrap()),
        ("key", kf),
        ("pack", sealed.bytes),
        ("index", index.clone()),
        ("sealed-index", format::seal_file(keys, "index", &index)),
        ("tree", tree),
        ("snapshot", br#"{"version":1,"time":"2026-01-01T00:00:00Z","hostname":"h","username":"u","source":"s","paths":[],"tree":"0000000000000000000000000000000000000000000000000000000000000000","program_version":"x","summary":{"files_new":0,"files_changed":0,"files_unmodified":0,"files_total":0,"dirs_total":0,"bytes_total":0,"bytes_read":0,"bytes_added":0,"data_blobs_added":0,"tree_blobs_added":0,"packs_written":0,"duration_secs":0.0}}"#.to_vec()),
    ]
}

/// Runs every decoder on `bytes`; results are ignored, panics fail the test.
fn decode_all(keys: &Keys, bytes: &[u8]) {
    let _ = Config::parse(bytes).map(|c| c.verify(keys));
    if let Ok(kf) = serde_json::from_slice::<KeyFile>(bytes) {
        // Bound the KDF cost of hostile key files so the test stays fast.
        let mut kf = kf;
        kf.kdf.memory_kib = kf.kdf.memory_kib.min(64);
        kf.kdf.iterations = kf.kdf.iterations.min(1);
        let _ = kf.unwrap_keys(b"pw");
    }
    let _ = format::decode_index("fuzz", bytes);
    let _ = format::open_file(keys, "index", "fuzz", bytes);
    let _ = Tree::decode(&Id::default(), bytes);
    let _ = serde_json::from_slice::<Snapshot>(bytes);
    let size = bytes.len() as u64;
    if size >= pack::FOOTER_LEN {
        if let Ok(tlen) = pack::trailer_len("fuzz", &bytes[bytes.len() - 12..], size) {
            let start = (size - pack::FOOTER_LEN - tlen) as usize;
            let _ =
                pack::decode_trailer(keys, "fuzz", &bytes[start..bytes.len() - 12], start as u64);
        }
    }
    let _ = pack::decode_trailer(keys, "fuzz", bytes, size);
    let _ = blob::decode(keys, BlobType::Data, &Id::default(), 1, 1 << 20, bytes);
    let _ = marmoset_storage::format::decode_index("fuzz", bytes);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        decode_all(keys(), &bytes);
    }

    #[test]
    fn mutated_valid_objects_never_panic_and_are_rejected_or_equal(
        which in 0usize..7,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let mut bytes = cached_samples()[which].1.clone();
        for (pos, x) in flips {
            let i = pos % bytes.len();
            bytes[i] ^= x | 1;
        }
        if let Some(c) = cut {
            bytes.truncate(c % (bytes.len() + 1));
        }
        decode_all(keys(), &bytes);
    }
}

#[test]
fn authenticated_objects_reject_every_single_byte_flip() {
    // Exhaustive over positions for the encrypted kinds: any flip is caught.
    let keys = Keys::from_master([9; 32]);
    let index = format::encode_index(&[]);
    let sealed = format::seal_file(&keys, "index", &index);
    for i in 0..sealed.len() {
        let mut b = sealed.clone();
        b[i] ^= 0x01;
        assert!(
            format::open_file(&keys, "index", "x", &b).is_err(),
            "flip at {i} undetected"
        );
    }
    let data = b"payload".repeat(100);
    let id = keys.content_id(&data);
    let e = blob::encode(&keys, BlobType::Data, id, &data, 3).unwrap();
    for i in 0..e.ciphertext.len() {
        let mut b = e.ciphertext.clone();
        b[i] ^= 0x80;
        assert!(
            blob::decode(&keys, BlobType::Data, &id, e.flags, e.raw_length, &b).is_err(),
            "flip at {i} undetected"
        );
    }
}
