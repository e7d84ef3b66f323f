//! marmoset-agent: the Kubernetes node agent.
//!
//! Owns everything Kubernetes: finding the PersistentVolumes mounted on
//! this node (`discovery`, `cluster`), schedules and retention per schedule
//! (`schedule`, `runner`), Velero-compatible pre/post hooks through
//! `pods/exec` (`hooks`), Events, per-volume status objects and Prometheus
//! metrics (`status`, `metrics`), and the Lease that elects the one
//! maintenance runner (`lease`). A volume's backup and its reporting are in
//! `volume`; the promise that no application is left frozen (pending post
//! hooks, run on shutdown and at start-up) in `freeze`; keeping a second
//! repository in step (`marmoset copy` after each run) in `secondary`.
//!
//! It must not know the repository format: it drives
//! `marmoset_storage`'s public operations (backup, forget, maintain, copy) on a
//! `Repository` the caller opened, and it never parses command lines.

pub mod cluster;
pub mod config;
pub mod discovery;
pub mod error;
pub mod freeze;
pub mod hooks;
pub mod lease;
pub mod metrics;
pub mod objects;
pub mod restore;
pub mod runner;
pub mod schedule;
pub mod secondary;
mod sets;
pub mod state;
pub mod status;
mod volume;

pub use cluster::Cluster;
pub use config::AgentConfig;
pub use error::{Error, Result};
/// The API client the restore functions take (`Cluster::client`).
pub use kube::Client as KubeClient;
pub use runner::{Agent, RunReport, VolumeOutcome};
