//! `marmoset-testing`: the helpers marmoset's tests share, in one crate so
//! the one integration-test binary links them once.
//!
//! What it owns: the real S3-compatible server for tests ([`s3_server`],
//! moto on loopback) and the fault-injecting proxy in front of it
//! ([`fault_proxy`]), the fake Kubernetes API server ([`fake_api`]), seeded
//! random bytes and source trees ([`random`], [`trees`]) with the strict
//! tree comparison, dropping the root capabilities that bypass file
//! permissions ([`privileges`]), and the backend conformance suite every
//! storage backend must pass ([`conformance`]).
//!
//! What it must not know: the `marmoset` command line and its binary (Cargo
//! gives the binary's path only to the root package's own integration
//! tests, so the CLI driver lives in `tests/integration/cli.rs`), and the
//! internals of `marmoset-storage`: it uses the public API only, as any
//! backend author would. No shipped crate depends on it (`publish = false`,
//! a dev-dependency only).
//!
//! Helpers fail the way the tests calling them do, by panicking with a
//! message; hence `unwrap` and `expect` are allowed in this crate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod conformance;
pub mod fake_api;
pub mod fault_proxy;
pub mod ports;
pub mod privileges;
pub mod random;
pub mod s3_server;
pub mod trees;
