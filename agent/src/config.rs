//! The agent's configuration: a YAML document, normally a ConfigMap mounted
//! as a file. Field names follow Kubernetes conventions (camelCase).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::schedule::{Schedule, ScheduleConfig};

/// Namespaces the seed cluster protects (backup-strategy.md).
pub const SEED_NAMESPACES: &[&str] = &[
    "default",
    "monitoring",
    "microservices",
    "vertex-platform",
    "argocd",
    "cert-manager",
    "gpu-operator",
    "keel",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// Repository location (`/path`, `s3:https://host/bucket/prefix`). The
    /// `MARMOSET_REPOSITORY` environment variable wins when set.
    #[serde(default)]
    pub repository: Option<String>,
    pub schedules: Vec<ScheduleConfig>,
    /// Namespaces to back up; empty means every namespace.
    #[serde(default)]
    pub included_namespaces: Vec<String>,
    #[serde(default)]
    pub excluded_namespaces: Vec<String>,
    /// PVCs of these storage classes are skipped (e.g. an S3-backed model store).
    #[serde(default)]
    pub excluded_storage_classes: Vec<String>,
    /// Back up every PVC volume unless opted out (Velero's
    /// `defaultVolumesToFsBackup: true`). When false, only the volumes named
    /// in a pod's `backup.velero.io/backup-volumes` annotation are backed up.
    #[serde(default = "yes")]
    pub default_volumes_to_backup: bool,
    /// Where the host's kubelet directory is mounted in the agent container.
    #[serde(default = "default_kubelet_dir")]
    pub kubelet_dir: PathBuf,
    /// Prefix under which hostPath PersistentVolumes (K3s local-path) are
    /// visible in the container: `""` when mounted at the same path.
    #[serde(default)]
    pub host_path_prefix: PathBuf,
    #[serde(default)]
    pub hooks: HooksConfig,
    #[serde(default)]
    pub maintenance: MaintenanceConfig,
    /// Address of the Prometheus endpoint (`/metrics`, `/healthz`).
    #[serde(default = "default_metrics_addr")]
    pub metrics_address: String,
    /// Namespace of the agent: status ConfigMaps and the maintenance Lease
    /// live here. Defaults to `POD_NAMESPACE`, then `marmoset`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Backup worker threads per volume (default: all cores).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Local state (last completed runs), on a hostPath so restarts resume.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Volumes of this node backed up at the same time (pods with hooks
    /// keep their volumes together). Each backup holds its own bounded
    /// pipeline, so memory grows with this number.
    #[serde(default = "default_parallel_volumes")]
    pub parallel_volumes: usize,
    #[serde(default)]
    pub retry: RetryConfig,
    /// A second repository kept in step with the first: after each run
    /// (and its retention), this node's snapshots of the schedule are
    /// copied there, and the schedule's retention applied there too.
    #[serde(default)]
    pub secondary: Option<SecondaryConfig>,
    /// The backup set of each run: its Kubernetes objects and its closing.
    #[serde(default)]
    pub sets: SetsConfig,
    /// Volume restores into new PVCs (`marmoset k8s restore`), done by the
    /// agent of the node where the restored pod runs.
    #[serde(default)]
    pub restores: RestoresConfig,
}

/// One agent, elected through a Lease, saves each run's Kubernetes
/// objects and closes the set once every node has reported.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetsConfig {
    /// Save the objects of the included namespaces with every set.
    #[serde(default = "yes")]
    pub save_objects: bool,
    /// Resource types never saved, beyond the derived ones always left
    /// out (`secrets`, `ingresses.networking.k8s.io`, …).
    #[serde(default)]
    pub exclude_resources: Vec<String>,
    /// A node that has not reported this long after the set's last report
    /// is taken for failed and the set is closed without it.
    #[serde(default = "default_report_deadline", with = "humantime_secs")]
    pub report_deadline: Duration,
    #[serde(default = "default_sets_lease_name")]
    pub lease_name: String,
    #[serde(default = "default_lease_duration", with = "humantime_secs")]
    pub lease_duration: Duration,
}

impl Default for SetsConfig {
    fn default() -> Self {
        Self {
            save_objects: true,
            exclude_resources: Vec::new(),
            report_deadline: default_report_deadline(),
            lease_name: default_sets_lease_name(),
            lease_duration: default_lease_duration(),
        }
    }
}

fn default_report_deadline() -> Duration {
    Duration::from_secs(6 * 3600)
}
fn default_sets_lease_name() -> String {
    "marmoset-sets".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestoresConfig {
    /// Look for restored pods waiting for their volumes' data.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How often the agent looks.
    #[serde(default = "default_restore_poll", with = "humantime_secs")]
    pub poll_interval: Duration,
}

impl Default for RestoresConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            poll_interval: default_restore_poll(),
        }
    }
}

fn default_restore_poll() -> Duration {
    Duration::from_secs(10)
}

/// The second, independent copy (another bucket, region or provider, its
/// own key). S3 credentials come from `MARMOSET_SECONDARY_AWS_ACCESS_KEY_ID`
/// and `MARMOSET_SECONDARY_AWS_SECRET_ACCESS_KEY` when set.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecondaryConfig {
    /// Its location (`/path`, `s3:https://host/bucket/prefix`).
    pub repository: String,
    /// A file holding its password (a mounted Secret);
    /// `MARMOSET_SECONDARY_PASSWORD` is used when absent.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// What the agent does when the API server or a volume fails mid-run.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts at listing the node's pods and volumes before the run is
    /// given up (until the next fire time).
    #[serde(default = "default_discovery_attempts")]
    pub discovery_attempts: u32,
    /// First wait between discovery attempts; doubled each time, at most 5m.
    #[serde(default = "default_backoff", with = "humantime_secs")]
    pub backoff: Duration,
    /// Further passes over the volumes that failed, within the run's window
    /// (before the schedule's next fire time).
    #[serde(default = "default_volume_retries")]
    pub volume_retries: u32,
    #[serde(default = "default_volume_retry_delay", with = "humantime_secs")]
    pub volume_retry_delay: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            discovery_attempts: default_discovery_attempts(),
            backoff: default_backoff(),
            volume_retries: default_volume_retries(),
            volume_retry_delay: default_volume_retry_delay(),
        }
    }
}

fn default_parallel_volumes() -> usize {
    2
}
fn default_discovery_attempts() -> u32 {
    6
}
fn default_backoff() -> Duration {
    Duration::from_secs(10)
}
fn default_volume_retries() -> u32 {
    2
}
fn default_volume_retry_delay() -> Duration {
    Duration::from_secs(300)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HooksConfig {
    /// Run pre/post hooks from pod annotations (needs `pods/exec` RBAC).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Timeout when the annotation gives none (Velero's default is 30s).
    #[serde(default = "default_hook_timeout", with = "humantime_secs")]
    pub default_timeout: Duration,
}

impl Default for HooksConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            default_timeout: default_hook_timeout(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// Take part in the election of the one maintenance runner.
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_lease_name")]
    pub lease_name: String,
    #[serde(default = "default_lease_duration", with = "humantime_secs")]
    pub lease_duration: Duration,
    #[serde(default = "default_quick_every", with = "humantime_secs")]
    pub quick_every: Duration,
    #[serde(default = "default_full_every", with = "humantime_secs")]
    pub full_every: Duration,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            lease_name: default_lease_name(),
            lease_duration: default_lease_duration(),
            quick_every: default_quick_every(),
            full_every: default_full_every(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_kubelet_dir() -> PathBuf {
    PathBuf::from("/var/lib/kubelet")
}
fn default_metrics_addr() -> String {
    "0.0.0.0:9469".into()
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/cache/marmoset")
}
fn default_hook_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_lease_name() -> String {
    "marmoset-maintenance".into()
}
fn default_lease_duration() -> Duration {
    Duration::from_secs(60)
}
fn default_quick_every() -> Duration {
    Duration::from_secs(3600)
}
fn default_full_every() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// Durations written like retention spans (`30s`, `1h`, `1d12h`).
mod humantime_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_span(&s).map_err(serde::de::Error::custom)
    }
}

/// A span such as `30s`, `5m`, `168h`, `30d` or `1d12h` as a
/// `std::time::Duration`. The parsing is `marmoset_storage::parse_duration`,
/// the one parser the CLI uses too, so both accept the same spellings and
/// refuse the same mistakes (zero, out-of-range values).
pub fn parse_span(s: &str) -> std::result::Result<Duration, String> {
    let d = marmoset_storage::parse_duration(s).map_err(|e| e.to_string())?;
    d.to_std()
        .map_err(|_| format!("duration {s:?} must not be negative"))
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let cfg: AgentConfig = serde_yaml::from_str(text).map_err(|e| Error::Config {
            path: origin.into(),
            message: e.to_string(),
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let bad = |message: String| Error::Config {
            path: origin.into(),
            message,
        };
        if self.schedules.is_empty() {
            return Err(bad("no schedules: nothing would ever be backed up".into()));
        }
        let mut names = std::collections::HashSet::new();
        for s in &self.schedules {
            if !names.insert(&s.name) {
                return Err(bad(format!("schedule {:?} is defined twice", s.name)));
            }
            Schedule::from_config(s).map_err(|e| bad(e.to_string()))?;
        }
        if let Some(ns) = self
            .included_namespaces
            .iter()
            .find(|n| self.excluded_namespaces.contains(n))
        {
            return Err(bad(format!(
                "namespace {ns:?} is both included and excluded"
            )));
        }
        if self.parallel_volumes == 0 {
            return Err(bad("parallelVolumes must be at least 1".into()));
        }
        if self.retry.discovery_attempts == 0 {
            return Err(bad("retry.discoveryAttempts must be at least 1".into()));
        }
        if self.sets.lease_duration < Duration::from_secs(10) {
            return Err(bad("sets.leaseDuration must be at least 10s".into()));
        }
        if self.maintenance.lease_duration < Duration::from_secs(10) {
            return Err(bad("maintenance.leaseDuration must be at least 10s".into()));
        }
        Ok(())
    }

    pub fn schedules(&self) -> Result<Vec<Schedule>> {
        self.schedules.iter().map(Schedule::from_config).collect()
    }

    /// The agent's own namespace.
    pub fn agent_namespace(&self) -> String {
        self.namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "marmoset".into())
    }

    pub fn namespace_included(&self, ns: &str) -> bool {
        (self.included_namespaces.is_empty() || self.included_namespaces.iter().any(|n| n == ns))
            && !self.excluded_namespaces.iter().any(|n| n == ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "schedules:\n  - {name: daily, cron: \"0 2 * * *\", keep: 168h}\n";

    #[test]
    fn defaults_fit_a_k3s_node() {
        let c = AgentConfig::parse(MINIMAL, "t").unwrap();
        assert_eq!(c.kubelet_dir, PathBuf::from("/var/lib/kubelet"));
        assert!(c.default_volumes_to_backup && c.hooks.enabled && c.maintenance.enabled);
        assert_eq!(c.hooks.default_timeout, Duration::from_secs(30));
        assert_eq!(c.maintenance.quick_every, Duration::from_secs(3600));
        assert!(c.namespace_included("anything"));
        assert_eq!(c.parallel_volumes, 2);
        assert_eq!(c.retry.discovery_attempts, 6);
        assert_eq!(c.retry.volume_retries, 2);
    }

    #[test]
    fn mistakes_are_refused_with_a_reason() {
        let cases = [
            ("schedules: []", "no schedules"),
            ("schedules:\n  - {name: d, cron: \"0 2 * * *\", keep: 1d}\n  - {name: d, cron: \"0 3 * * *\", keep: 1d}", "defined twice"),
            ("schedules:\n  - {name: d, cron: \"0 25 * * *\", keep: 1d}", "invalid cron"),
            ("schedules:\n  - {name: d, cron: \"0 2 * * *\", keep: 1d}\nincludedNamespace: [a]", "unknown field"),
            ("schedules:\n  - {name: d, cron: \"0 2 * * *\", keep: 1d}\nincludedNamespaces: [a]\nexcludedNamespaces: [a]", "both included and excluded"),
            ("schedules:\n  - {name: d, cron: \"0 2 * * *\", keep: 1d}\nhooks: {defaultTimeout: soon}", "soon"),
            ("schedules:\n  - {name: d, cron: \"0 2 * * *\", keep: 1d}\nparallelVolumes: 0", "parallelVolumes"),
        ];
        for (text, want) in cases {
            let e = AgentConfig::parse(text, "cm/agent.yaml")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(want) && e.contains("cm/agent.yaml"),
                "{text:?}: {e}"
            );
        }
        let e = AgentConfig::load(Path::new("/nonexistent/agent.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/agent.yaml"), "{e}");
    }
}
