//! The agent's error type: every variant says which object or volume failed.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("agent configuration {path}: {message}")]
    Config { path: String, message: String },

    #[error("schedule {name:?}: invalid cron expression {cron:?}: {message}")]
    Cron {
        name: String,
        cron: String,
        message: String,
    },

    /// A schedule field other than the cron expression is invalid (its
    /// `keep` duration, its name).
    #[error("schedule {schedule:?}: invalid {field} {value:?}: {reason}")]
    InvalidSchedule {
        schedule: String,
        field: &'static str,
        value: String,
        reason: String,
    },

    #[error("Kubernetes API, {what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },

    #[error("volume {namespace}/{pvc}: {message}")]
    Volume {
        namespace: String,
        pvc: String,
        message: String,
    },

    #[error("hook {phase} in pod {namespace}/{pod} container {container}: {message}")]
    Hook {
        phase: String,
        namespace: String,
        pod: String,
        container: String,
        message: String,
    },

    #[error("repository: {0}")]
    Repository(#[from] marmoset_storage::Error),

    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: String,
        #[source]
        source: std::io::Error,
    },

    #[error("agent state file {path}: {message}")]
    State { path: String, message: String },

    #[error("background task failed: {0}")]
    Task(String),

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// A restore (`k8s restore`) cannot go on: no such set, no objects
    /// saved with it, a bad mapping or selector.
    #[error("restore: {0}")]
    Restore(String),

    /// A restore record of this name exists: another restore took the
    /// name first. Nothing of this restore was created.
    #[error("restore: a restore named {0} exists already (created at the same moment?); run this one again")]
    RestoreExists(String),
}

impl Error {
    pub(crate) fn kube(what: impl Into<String>, source: kube::Error) -> Self {
        Error::Kube {
            what: what.into(),
            source,
        }
    }

    /// True when the API server answered 404 Not Found.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Kube { source: kube::Error::Api(s), .. } if s.is_not_found())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// True when `e` is the API server's 409: a stale resourceVersion
/// (reason Conflict) or an object that already exists (AlreadyExists).
pub(crate) fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}
