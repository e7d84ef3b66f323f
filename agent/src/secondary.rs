//! The secondary repository: after a run (and its retention), this node's
//! snapshots of the schedule are copied into a second, independent
//! repository (`marmoset_storage::copy`: its own key, re-encrypted), and
//! the schedule's retention is applied there too. Each volume's
//! `marmoset_secondary_last_success_timestamp_seconds` and an Event say
//! whether its newest snapshot is in the secondary, so the 48 h alert
//! covers both copies.
//!
//! Every node copies its own snapshots: copies from several nodes into one
//! repository are safe (each is a writer with its own session, as backups
//! are), and a copy that failed is caught up by the next run, which copies
//! whatever of the schedule the secondary still lacks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::Utc;
use marmoset_storage::{CopyOptions, CopyReport, GroupBy, Progress, Repository};
use tracing::{info, warn};

use crate::cluster::Subject;
use crate::discovery::VolumeTarget;
use crate::runner::{joined, Agent, RunReport};
use crate::schedule::Schedule;

/// Opens the secondary repository (on a blocking thread); the error is
/// shown as it is.
pub type SecondaryOpener = Arc<dyn Fn() -> std::result::Result<Repository, String> + Send + Sync>;

/// The secondary repository, opened on first use and kept open.
pub(crate) struct Secondary {
    open: SecondaryOpener,
    repo: tokio::sync::Mutex<Option<Arc<Repository>>>,
}

impl Secondary {
    pub(crate) fn new(open: SecondaryOpener) -> Self {
        Self {
            open,
            repo: tokio::sync::Mutex::new(None),
        }
    }

    async fn get(&self) -> std::result::Result<Arc<Repository>, String> {
        let mut slot = self.repo.lock().await;
        if let Some(r) = slot.as_ref() {
            return Ok(r.clone());
        }
        let open = self.open.clone();
        let repo = tokio::task::spawn_blocking(move || open())
            .await
            .map_err(|e| e.to_string())??;
        let repo = Arc::new(repo);
        *slot = Some(repo.clone());
        Ok(repo)
    }
}

/// What the copy to the secondary did after one run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SecondaryOutcome {
    /// Snapshots copied now.
    pub copied: usize,
    /// Snapshots the secondary already had.
    pub already: usize,
    /// Snapshots that could not be copied (damaged in the primary), with why.
    pub failed: Vec<String>,
    /// Snapshots the schedule's retention removed from the secondary.
    pub forgotten: u64,
    /// Why the whole copy failed (the secondary unreachable, ...).
    pub error: Option<String>,
}

impl Agent {
    /// Copies this node's snapshots of `sched` to `secondary`, applies the
    /// retention there, and reports per volume of `report`.
    pub(crate) async fn copy_to_secondary(
        &self,
        sched: &Schedule,
        report: &RunReport,
    ) -> SecondaryOutcome {
        let opened = match &self.secondary {
            Some(s) => s.get().await,
            None => return SecondaryOutcome::default(),
        };
        let secondary = match opened {
            Ok(r) => r,
            Err(e) => {
                let why = format!("opening the secondary repository: {e}");
                return self.secondary_failed(sched, report, why).await;
            }
        };
        let (policy, filter) = self.retention(sched);
        let tags = filter.tags.clone();
        let share = self.share_repo().await;
        let work = self.on_repo(share, move |repo| {
            let (snaps, _) = repo.snapshots()?;
            let chosen: Vec<_> = snaps
                .into_iter()
                .filter(|(_, s)| tags.iter().all(|t| s.tags.contains(t)))
                .collect();
            let copied = if chosen.is_empty() {
                CopyReport::default()
            } else {
                marmoset_storage::copy(
                    repo,
                    &secondary,
                    chosen,
                    &CopyOptions::default(),
                    &Progress::default(),
                )?
            };
            let forgotten = marmoset_storage::forget(
                &secondary,
                &policy,
                &filter,
                GroupBy::Source,
                false,
                &Utc,
            )?
            .removed;
            Ok((copied, forgotten))
        });
        match joined(work.await) {
            Ok((r, forgotten)) => {
                self.report_secondary(sched, report, &r).await;
                info!(
                    schedule = %sched.name,
                    copied = r.copied.len(),
                    already = r.skipped.len(),
                    failed = r.failed.len(),
                    forgotten,
                    "secondary repository in step"
                );
                SecondaryOutcome {
                    copied: r.copied.len(),
                    already: r.skipped.len(),
                    failed: r
                        .failed
                        .iter()
                        .map(|f| format!("{}: {}", f.source_id, f.error.as_deref().unwrap_or("")))
                        .collect(),
                    forgotten,
                    error: None,
                }
            }
            Err(e) => self.secondary_failed(sched, report, e.to_string()).await,
        }
    }

    /// The whole copy failed: every volume of the run is told.
    async fn secondary_failed(
        &self,
        sched: &Schedule,
        report: &RunReport,
        why: String,
    ) -> SecondaryOutcome {
        warn!(schedule = %sched.name, error = %why, "copy to the secondary repository failed");
        for v in report.volumes.iter().filter(|v| v.snapshot.is_some()) {
            let msg = format!("copy to the secondary repository failed: {why}");
            self.volume_not_copied(sched, &v.target, &msg).await;
        }
        SecondaryOutcome {
            error: Some(why),
            ..Default::default()
        }
    }

    /// Per volume of the run: its snapshot is in the secondary (metric and
    /// Event), or could not be copied (Warning Event, failure counter).
    async fn report_secondary(&self, sched: &Schedule, report: &RunReport, r: &CopyReport) {
        let there: HashSet<&str> = r
            .copied
            .iter()
            .chain(&r.skipped)
            .map(|s| s.source_id.as_str())
            .collect();
        let failed: HashMap<&str, &str> = r
            .failed
            .iter()
            .map(|f| (f.source_id.as_str(), f.error.as_deref().unwrap_or("")))
            .collect();
        let now = Utc::now().timestamp() as f64;
        for v in &report.volumes {
            let Some(snap) = v.snapshot.as_deref() else {
                continue;
            };
            let t = &v.target;
            if there.contains(snap) {
                self.metrics
                    .secondary_copied(&t.namespace, &t.pvc, &sched.name, now);
                self.cluster
                    .event(
                        Subject::Pvc(t),
                        false,
                        "SecondaryCopied",
                        &format!(
                            "snapshot {} is in the secondary repository",
                            &snap[..snap.len().min(8)]
                        ),
                    )
                    .await;
            } else if let Some(why) = failed.get(snap) {
                let msg = format!("snapshot {snap} not copied to the secondary: {why}");
                self.volume_not_copied(sched, t, &msg).await;
            }
        }
    }

    /// A volume whose snapshot is not in the secondary: failure counter
    /// and Warning Event.
    async fn volume_not_copied(&self, sched: &Schedule, t: &VolumeTarget, msg: &str) {
        self.metrics
            .secondary_failed(&t.namespace, &t.pvc, &sched.name);
        self.cluster
            .event(Subject::Pvc(t), true, "SecondaryCopyFailed", msg)
            .await;
    }
}
