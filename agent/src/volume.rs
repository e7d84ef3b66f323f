//! One volume's turn in a run: its backup, the status object and Events
//! that report it, the record of a volume that could not be backed up, and
//! the removal of status objects whose PVC is gone.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use marmoset_storage::{BackupOptions, Progress};
use tracing::{error, info, warn};

use crate::cluster::Subject;
use crate::discovery::{Skipped, VolumeTarget};
use crate::error::Result;
use crate::metrics::Finished;
use crate::runner::{joined, Agent, RepoShare, VolumeOutcome};
use crate::schedule::Schedule;
use crate::status::{Phase, VolumeStatus};

impl Agent {
    fn base_status(&self, t: &VolumeTarget, sched: &Schedule, phase: Phase) -> VolumeStatus {
        VolumeStatus {
            namespace: t.namespace.clone(),
            pvc: t.pvc.clone(),
            node: self.node().into(),
            pod: t.pod.clone(),
            schedule: sched.name.clone(),
            phase,
            last_attempt: Utc::now(),
            last_success: None,
            last_snapshot: None,
            duration_seconds: 0.0,
            bytes_total: 0,
            bytes_read: 0,
            bytes_added: 0,
            files: 0,
            errors: Vec::new(),
        }
    }

    /// The previous status's last success survives a failed attempt.
    async fn previous_success(
        &self,
        namespace: &str,
        pvc: &str,
        sched: &Schedule,
    ) -> (Option<chrono::DateTime<Utc>>, Option<String>) {
        match self.cluster.status(namespace, pvc, &sched.name).await {
            Ok(Some(s)) => (s.last_success, s.last_snapshot),
            _ => (None, None),
        }
    }

    async fn publish(&self, status: &VolumeStatus) {
        if let Err(e) = self.cluster.write_status(status).await {
            warn!(error = %e, "could not write volume status");
        }
    }

    /// Records a volume left out of the run. Opt-outs are only logged;
    /// anything else gets a status object, a Warning Event and a metric,
    /// so no volume drops out of the backups unnoticed.
    pub(crate) async fn record_skip(&self, s: &Skipped, sched: &Schedule) {
        info!(namespace = %s.namespace, pod = %s.pod, volume = %s.volume, reason = %s.reason, "volume skipped");
        if s.intentional {
            return;
        }
        let subject = Subject::Pod {
            namespace: &s.namespace,
            name: &s.pod,
            uid: &s.pod_uid,
        };
        let what = match &s.pvc {
            Some(pvc) => format!("PVC {pvc} (volume {})", s.volume),
            None => format!("volume {}", s.volume),
        };
        self.cluster
            .event(
                subject,
                true,
                "BackupSkipped",
                &format!(
                    "{what} not backed up (schedule {}): {}",
                    sched.name, s.reason
                ),
            )
            .await;
        let Some(pvc) = &s.pvc else { return };
        self.metrics.skipped(&s.namespace, pvc, &sched.name);
        let (last_success, last_snapshot) = self.previous_success(&s.namespace, pvc, sched).await;
        let status = VolumeStatus {
            namespace: s.namespace.clone(),
            pvc: pvc.clone(),
            node: self.node().into(),
            pod: s.pod.clone(),
            schedule: sched.name.clone(),
            phase: Phase::Skipped,
            last_attempt: Utc::now(),
            last_success,
            last_snapshot,
            duration_seconds: 0.0,
            bytes_total: 0,
            bytes_read: 0,
            bytes_added: 0,
            files: 0,
            errors: vec![s.reason.clone()],
        };
        self.publish(&status).await;
    }

    /// Removes the status objects of this node's volumes whose PVC no
    /// longer exists (and their metrics, so the staleness alert stops), and
    /// status objects under names of older versions.
    pub(crate) async fn clean_up_statuses(&self) -> Result<()> {
        for (name, s) in self.cluster.status_objects().await? {
            if s.node != self.node() {
                continue;
            }
            let current = name == s.object_name();
            if current && self.cluster.pvc_exists(&s.namespace, &s.pvc).await? {
                continue;
            }
            info!(status = %name, "removing the status of a PVC that is gone");
            self.cluster.delete_status(&name).await?;
            if !current {
                continue;
            }
            self.metrics
                .forget_volume(&s.namespace, &s.pvc, &s.schedule);
        }
        Ok(())
    }

    pub(crate) async fn volume_failed(
        &self,
        t: &VolumeTarget,
        sched: &Schedule,
        msg: &str,
    ) -> VolumeOutcome {
        let now = Utc::now().timestamp() as f64;
        self.metrics.started(&t.namespace, &t.pvc, &sched.name, now);
        self.metrics.finished(
            &t.namespace,
            &t.pvc,
            &sched.name,
            &Finished {
                at: now,
                ..Default::default()
            },
        );
        let mut status = self.base_status(t, sched, Phase::Failed);
        (status.last_success, status.last_snapshot) =
            self.previous_success(&t.namespace, &t.pvc, sched).await;
        status.errors = vec![msg.to_string()];
        self.publish(&status).await;
        self.cluster
            .event(Subject::Pvc(t), true, "BackupFailed", msg)
            .await;
        VolumeOutcome {
            target: t.clone(),
            phase: Phase::Failed,
            snapshot: None,
            error: Some(msg.to_string()),
            bytes_read: 0,
            bytes_added: 0,
            duration_secs: 0.0,
        }
    }

    /// Backs up one volume into a snapshot `<namespace>/<pvc>` tagged with
    /// the run's set. Never gives up on time: a large volume takes as long
    /// as it takes, and a run that is killed resumes from the packs it
    /// already stored.
    pub(crate) async fn backup_volume(
        &self,
        t: &VolumeTarget,
        sched: &Schedule,
        set: &str,
        share: RepoShare,
    ) -> VolumeOutcome {
        // Not followed if it is a symlink: a volume whose directory was
        // swapped for a link would be backed up as that link alone. The
        // path is normalised first: a trailing `/` or `/.` would make the
        // kernel resolve the link after all.
        let path: PathBuf = t.path.components().collect();
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(m) => {
                let what = if m.file_type().is_symlink() {
                    "a symbolic link (not followed)"
                } else {
                    "not a directory"
                };
                let msg = format!("{} is {what}", t.path.display());
                return self.volume_failed(t, sched, &msg).await;
            }
            Err(e) => {
                let msg = format!(
                    "volume data not found at {} ({e}); is the kubelet directory mounted into the agent?",
                    t.path.display()
                );
                return self.volume_failed(t, sched, &msg).await;
            }
        }
        let start = Instant::now();
        let (prev_success, prev_snapshot) =
            self.previous_success(&t.namespace, &t.pvc, sched).await;
        let mut status = self.base_status(t, sched, Phase::Running);
        status.last_success = prev_success;
        status.last_snapshot = prev_snapshot;
        self.metrics.started(
            &t.namespace,
            &t.pvc,
            &sched.name,
            status.last_attempt.timestamp() as f64,
        );
        self.publish(&status).await;
        self.cluster
            .event(
                Subject::Pvc(t),
                false,
                "BackupStarted",
                &format!(
                    "backing up {} (schedule {}, set {set}) from node {}",
                    t.source(),
                    sched.name,
                    self.node()
                ),
            )
            .await;
        let progress = Arc::new(Progress::default());
        let opts = BackupOptions {
            source: Some(t.source()),
            tags: vec![
                sched.tag(),
                format!("set={set}"),
                format!("node={}", self.node()),
                format!("pod={}", t.pod),
            ],
            threads: self.cfg.threads,
            hostname: Some(self.node().into()),
            cancel: Some(self.cancel.clone()),
            ..Default::default()
        };
        let p = progress.clone();
        let mut work = self.on_repo(share, move |repo| {
            marmoset_storage::backup(repo, &[path], &opts, &p)
        });
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_status = Instant::now();
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                _ = tick.tick() => {
                    let read = progress.bytes_read.load(Ordering::Relaxed);
                    self.metrics.progress(&t.namespace, &t.pvc, &sched.name, read);
                    if last_status.elapsed() >= self.status_every {
                        last_status = Instant::now();
                        status.bytes_read = read;
                        status.bytes_added = progress.bytes_added.load(Ordering::Relaxed);
                        status.files = progress.files_done.load(Ordering::Relaxed);
                        status.duration_seconds = start.elapsed().as_secs_f64();
                        info!(volume = %t.source(), bytes_read = read, "backup in progress");
                        self.publish(&status).await;
                    }
                }
            }
        };
        let duration = start.elapsed().as_secs_f64();
        let now = Utc::now();
        status.duration_seconds = duration;
        match joined(result) {
            Ok((id, snap)) => {
                let s = &snap.summary;
                let phase = if snap.incomplete || !s.errors.is_empty() {
                    Phase::PartiallyFailed
                } else {
                    Phase::Succeeded
                };
                let ok = phase == Phase::Succeeded;
                self.metrics.finished(
                    &t.namespace,
                    &t.pvc,
                    &sched.name,
                    &Finished {
                        ok,
                        at: now.timestamp() as f64,
                        duration,
                        bytes_read: s.bytes_read,
                        bytes_added: s.bytes_added,
                    },
                );
                status.phase = phase;
                if ok {
                    status.last_success = Some(now);
                }
                status.last_snapshot = Some(id.to_hex());
                status.bytes_total = s.bytes_total;
                status.bytes_read = s.bytes_read;
                status.bytes_added = s.bytes_added;
                status.files = s.files_total;
                status.errors = s
                    .errors
                    .iter()
                    .take(20)
                    .map(|e| format!("{}: {}", e.path, e.error))
                    .collect();
                self.publish(&status).await;
                let msg = format!(
                    "snapshot {} of {}: {} files, {} bytes read, {} bytes added in {:.1}s{}",
                    &id.to_hex()[..8],
                    t.source(),
                    s.files_total,
                    s.bytes_read,
                    s.bytes_added,
                    duration,
                    if ok {
                        String::new()
                    } else {
                        format!("; {} unreadable files", s.errors.len())
                    }
                );
                let reason = if ok {
                    "BackupSucceeded"
                } else {
                    "BackupPartiallyFailed"
                };
                self.cluster.event(Subject::Pvc(t), !ok, reason, &msg).await;
                VolumeOutcome {
                    target: t.clone(),
                    phase,
                    snapshot: Some(id.to_hex()),
                    error: (!ok).then(|| msg.clone()),
                    bytes_read: s.bytes_read,
                    bytes_added: s.bytes_added,
                    duration_secs: duration,
                }
            }
            Err(e) => {
                let msg = e.to_string();
                error!(volume = %t.source(), error = %msg, "backup failed");
                self.metrics.finished(
                    &t.namespace,
                    &t.pvc,
                    &sched.name,
                    &Finished {
                        at: now.timestamp() as f64,
                        duration,
                        ..Default::default()
                    },
                );
                status.phase = Phase::Failed;
                status.errors = vec![msg.clone()];
                self.publish(&status).await;
                self.cluster
                    .event(Subject::Pvc(t), true, "BackupFailed", &msg)
                    .await;
                VolumeOutcome {
                    target: t.clone(),
                    phase: Phase::Failed,
                    snapshot: None,
                    error: Some(msg),
                    bytes_read: 0,
                    bytes_added: 0,
                    duration_secs: duration,
                }
            }
        }
    }
}
