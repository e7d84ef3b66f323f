//! The one integration-test binary of the root package: one module per
//! command or concern, in `tests/integration/`, linked once (RocksDB and
//! the AWS SDK are linked once, not once per file). Shared helpers live in
//! `marmoset-testing` (`testing/`); only the driver of the `marmoset`
//! binary, which needs Cargo's `CARGO_BIN_EXE_marmoset`, lives here
//! (`integration::cli`).
//!
//! Test names carry the module: `cargo test --test integration --
//! integration::gc_safety::` runs one file's tests.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod integration {
    mod cli;

    mod agent;
    mod agent_cli;
    mod backends;
    mod bad_input;
    mod copy;
    mod crash;
    mod decoders;
    mod dedup;
    mod gc_safety;
    mod hostile;
    mod k8s_restore;
    mod keys;
    mod maintain;
    mod manifests;
    mod mount;
    mod reliability;
    mod restore_plan;
    mod restore_safety;
    mod roundtrip;
    mod s3;
}
