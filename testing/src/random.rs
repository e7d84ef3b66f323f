//! Seeded random data: the same seed gives the same bytes on every run.

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Incompressible bytes.
pub fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

/// Text-like compressible bytes.
pub fn text_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "alpha ",
        "beta ",
        "gamma ",
        "delta\n",
        "log line ",
        "level=info ",
        "42 ",
    ];
    let mut v = Vec::with_capacity(n + 16);
    while v.len() < n {
        v.extend_from_slice(WORDS[rng.gen_range(0..WORDS.len())].as_bytes());
    }
    v.truncate(n);
    v
}
