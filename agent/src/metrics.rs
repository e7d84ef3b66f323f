//! Prometheus metrics in the text exposition format, served on `/metrics`.
//!
//! A "no successful backup for 48h" alert is one line:
//! `time() - marmoset_volume_last_success_timestamp_seconds > 48 * 3600`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::debug;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct VolumeKey {
    namespace: String,
    pvc: String,
    schedule: String,
}

#[derive(Debug, Default, Clone)]
struct VolumeMetrics {
    last_success: Option<f64>,
    last_attempt: Option<f64>,
    duration: f64,
    bytes_read: u64,
    bytes_added: u64,
    failures: u64,
    in_progress_bytes: u64,
    running: bool,
    skips: u64,
    /// When the volume's newest snapshot was last found in (or copied to)
    /// the secondary repository.
    secondary_success: Option<f64>,
    secondary_failures: u64,
}

/// How one volume backup ended.
#[derive(Debug, Clone, Default)]
pub struct Finished {
    /// A complete snapshot was written (partial snapshots count as
    /// failures, so they alert).
    pub ok: bool,
    /// Unix time.
    pub at: f64,
    pub duration: f64,
    pub bytes_read: u64,
    pub bytes_added: u64,
}

/// Shared, cheap to update from the backup tasks.
#[derive(Debug, Default)]
pub struct Metrics {
    volumes: Mutex<BTreeMap<VolumeKey, VolumeMetrics>>,
    hook_failures: AtomicU64,
    leader: AtomicU64,
    maintenance: Mutex<BTreeMap<&'static str, (f64, f64)>>,
    maintenance_failures: AtomicU64,
    runs: AtomicU64,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn with<F: FnOnce(&mut VolumeMetrics)>(&self, ns: &str, pvc: &str, schedule: &str, f: F) {
        let key = VolumeKey {
            namespace: ns.into(),
            pvc: pvc.into(),
            schedule: schedule.into(),
        };
        if let Ok(mut m) = self.volumes.lock() {
            f(m.entry(key).or_default());
        }
    }

    pub fn started(&self, ns: &str, pvc: &str, schedule: &str, now: f64) {
        self.with(ns, pvc, schedule, |v| {
            v.last_attempt = Some(now);
            v.running = true;
            v.in_progress_bytes = 0;
        });
    }

    /// Seeds a volume's last success (from its status object) after a
    /// restart, so the staleness alert keeps working across restarts.
    pub fn remember_success(&self, ns: &str, pvc: &str, schedule: &str, at: f64) {
        self.with(ns, pvc, schedule, |v| {
            if v.last_success.is_none_or(|t| t < at) {
                v.last_success = Some(at);
            }
        });
    }

    pub fn progress(&self, ns: &str, pvc: &str, schedule: &str, bytes: u64) {
        self.with(ns, pvc, schedule, |v| v.in_progress_bytes = bytes);
    }

    pub fn finished(&self, ns: &str, pvc: &str, schedule: &str, f: &Finished) {
        self.with(ns, pvc, schedule, |v| {
            v.running = false;
            v.in_progress_bytes = 0;
            v.duration = f.duration;
            v.bytes_read += f.bytes_read;
            v.bytes_added += f.bytes_added;
            if f.ok {
                v.last_success = Some(f.at);
            } else {
                v.failures += 1;
            }
        });
    }

    /// A volume was left out of a run for a reason other than an opt-out.
    pub fn skipped(&self, ns: &str, pvc: &str, schedule: &str) {
        self.with(ns, pvc, schedule, |v| v.skips += 1);
    }

    /// Drops every series of a volume whose PVC is gone, so the staleness
    /// alert does not fire forever for a deleted volume.
    pub fn forget_volume(&self, ns: &str, pvc: &str, schedule: &str) {
        if let Ok(mut m) = self.volumes.lock() {
            m.remove(&VolumeKey {
                namespace: ns.into(),
                pvc: pvc.into(),
                schedule: schedule.into(),
            });
        }
    }

    /// The volume's newest snapshot is in the secondary repository.
    pub fn secondary_copied(&self, ns: &str, pvc: &str, schedule: &str, at: f64) {
        self.with(ns, pvc, schedule, |v| v.secondary_success = Some(at));
    }

    pub fn secondary_failed(&self, ns: &str, pvc: &str, schedule: &str) {
        self.with(ns, pvc, schedule, |v| v.secondary_failures += 1);
    }

    pub fn hook_failed(&self) {
        self.hook_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn run_completed(&self) {
        self.runs.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.store(u64::from(leader), Ordering::Relaxed);
    }

    pub fn maintenance_done(&self, kind: &'static str, at: f64, duration: f64) {
        if let Ok(mut m) = self.maintenance.lock() {
            m.insert(kind, (at, duration));
        }
    }

    pub fn maintenance_failed(&self) {
        self.maintenance_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let vols = self.volumes.lock().map(|m| m.clone()).unwrap_or_default();
        let lbl = |k: &VolumeKey| {
            format!(
                "namespace=\"{}\",pvc=\"{}\",schedule=\"{}\"",
                escape(&k.namespace),
                escape(&k.pvc),
                escape(&k.schedule)
            )
        };
        let mut family =
            |name: &str, kind: &str, help: &str, f: &dyn Fn(&VolumeMetrics) -> Option<String>| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (k, v) in &vols {
                    if let Some(val) = f(v) {
                        let _ = writeln!(out, "{name}{{{}}} {val}", lbl(k));
                    }
                }
            };
        family(
            "marmoset_volume_last_success_timestamp_seconds",
            "gauge",
            "Unix time of the last complete backup of the volume.",
            &|v| v.last_success.map(|t| format!("{t:.0}")),
        );
        family(
            "marmoset_volume_last_attempt_timestamp_seconds",
            "gauge",
            "Unix time the last backup of the volume started.",
            &|v| v.last_attempt.map(|t| format!("{t:.0}")),
        );
        family(
            "marmoset_volume_backup_duration_seconds",
            "gauge",
            "Duration of the last finished backup of the volume.",
            &|v| Some(format!("{:.3}", v.duration)),
        );
        family(
            "marmoset_volume_bytes_read_total",
            "counter",
            "Bytes read from the volume by finished backups.",
            &|v| Some(v.bytes_read.to_string()),
        );
        family(
            "marmoset_volume_bytes_added_total",
            "counter",
            "New bytes stored in the repository for the volume.",
            &|v| Some(v.bytes_added.to_string()),
        );
        family(
            "marmoset_volume_backup_failures_total",
            "counter",
            "Backups of the volume that failed or were incomplete.",
            &|v| Some(v.failures.to_string()),
        );
        family(
            "marmoset_volume_skips_total",
            "counter",
            "Runs that could not back up the volume (pod not running with a CSI volume, PVC unbound, ...).",
            &|v| (v.skips > 0).then(|| v.skips.to_string()),
        );
        family(
            "marmoset_secondary_last_success_timestamp_seconds",
            "gauge",
            "Unix time the volume's newest snapshot was last confirmed in the secondary repository.",
            &|v| v.secondary_success.map(|t| format!("{t:.0}")),
        );
        family(
            "marmoset_secondary_copy_failures_total",
            "counter",
            "Copies of the volume's snapshots to the secondary repository that failed.",
            &|v| (v.secondary_failures > 0).then(|| v.secondary_failures.to_string()),
        );
        family(
            "marmoset_volume_backup_in_progress_bytes",
            "gauge",
            "Bytes read so far by the running backup (0 when idle).",
            &|v| v.running.then(|| v.in_progress_bytes.to_string()),
        );
        let _ = writeln!(
            out,
            "# HELP marmoset_hook_failures_total Pre/post hooks that failed or timed out.\n# TYPE marmoset_hook_failures_total counter\nmarmoset_hook_failures_total {}",
            self.hook_failures.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP marmoset_schedule_runs_total Scheduled runs completed by this agent.\n# TYPE marmoset_schedule_runs_total counter\nmarmoset_schedule_runs_total {}",
            self.runs.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP marmoset_maintenance_leader 1 when this agent holds the maintenance lease.\n# TYPE marmoset_maintenance_leader gauge\nmarmoset_maintenance_leader {}",
            self.leader.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP marmoset_maintenance_failures_total Maintenance runs that failed.\n# TYPE marmoset_maintenance_failures_total counter\nmarmoset_maintenance_failures_total {}",
            self.maintenance_failures.load(Ordering::Relaxed)
        );
        let maint = self
            .maintenance
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        let _ = writeln!(out, "# HELP marmoset_maintenance_last_success_timestamp_seconds Unix time of the last maintenance run by this agent.\n# TYPE marmoset_maintenance_last_success_timestamp_seconds gauge");
        for (kind, (at, _)) in &maint {
            let _ = writeln!(
                out,
                "marmoset_maintenance_last_success_timestamp_seconds{{kind=\"{kind}\"}} {at:.0}"
            );
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Binds `addr` and serves `/metrics` and `/healthz` until the task is
/// dropped. Returns the bound address (useful with port 0).
pub async fn serve(
    addr: &str,
    metrics: Arc<Metrics>,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await.map_err(|e| Error::Metrics {
        addr: addr.into(),
        source: e,
    })?;
    let local = listener.local_addr().map_err(|e| Error::Metrics {
        addr: addr.into(),
        source: e,
    })?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut buf),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("/");
                let (code, ctype, body) = match path {
                    "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                    "/healthz" | "/readyz" => ("200 OK", "text/plain", "ok\n".to_string()),
                    _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
                };
                let resp = format!(
                    "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                if let Err(e) = sock.write_all(resp.as_bytes()).await {
                    debug!(error = %e, "metrics client went away");
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok((local, task))
}
