//! The agent's work: scheduled runs over the node's volumes (hooks, backup,
//! status, retention) and, on the lease holder, repository maintenance.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use marmoset_storage::{
    BackupOptions, GroupBy, MaintainOptions, MaintainReport, Progress, Repository, RetentionPolicy,
    SnapshotFilter,
};
use tokio::sync::{Mutex, OwnedMutexGuard};
use tracing::{error, info, warn};

use crate::cluster::{Cluster, Subject};
use crate::config::AgentConfig;
use crate::discovery::{PodPlan, Skipped, VolumeTarget};
use crate::error::{Error, Result};
use crate::hooks::{Hook, OnError};
use crate::lease::{LeaderLease, LAST_FULL, LAST_QUICK};
use crate::metrics::{Finished, Metrics};
use crate::schedule::Schedule;
use crate::state::{catch_up_due, ScheduleState, State, StateFile};
use crate::status::{Phase, VolumeStatus};

/// The result of backing up one volume.
#[derive(Debug, Clone)]
pub struct VolumeOutcome {
    pub target: VolumeTarget,
    pub phase: Phase,
    pub snapshot: Option<String>,
    pub error: Option<String>,
    pub bytes_read: u64,
    pub bytes_added: u64,
}

/// The result of one scheduled run on this node.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub schedule: String,
    pub volumes: Vec<VolumeOutcome>,
    pub skipped: Vec<Skipped>,
    pub hook_failures: Vec<String>,
    pub snapshots_forgotten: u64,
}

impl RunReport {
    pub fn failed(&self) -> usize {
        self.volumes
            .iter()
            .filter(|v| v.phase != Phase::Succeeded)
            .count()
    }
}

pub struct Agent {
    cfg: AgentConfig,
    schedules: Vec<Schedule>,
    cluster: Cluster,
    repo: Arc<Repository>,
    /// One repository operation at a time in this process: backups and
    /// maintenance share the local index cache.
    repo_lock: Arc<Mutex<()>>,
    metrics: Arc<Metrics>,
    state: StateFile,
    /// How often a running backup rewrites its status object.
    pub status_every: Duration,
}

impl Agent {
    /// Waits for the repository lock (one repository operation at a time).
    async fn lock_repo(&self) -> OwnedMutexGuard<()> {
        self.repo_lock.clone().lock_owned().await
    }

    /// Runs `f` on a blocking thread, releasing `guard` when it is done; the
    /// returned handle's result goes through `joined`.
    fn on_repo<T: Send + 'static>(
        &self,
        guard: OwnedMutexGuard<()>,
        f: impl FnOnce(&Repository) -> marmoset_storage::Result<T> + Send + 'static,
    ) -> tokio::task::JoinHandle<marmoset_storage::Result<T>> {
        let repo = self.repo.clone();
        tokio::task::spawn_blocking(move || {
            let r = f(&repo);
            drop(guard);
            r
        })
    }

    pub fn new(cfg: AgentConfig, cluster: Cluster, repo: Arc<Repository>) -> Result<Self> {
        let schedules = cfg.schedules()?;
        let state = StateFile::new(&cfg.state_dir, cluster.node());
        Ok(Self {
            cfg,
            schedules,
            cluster,
            repo,
            repo_lock: Arc::new(Mutex::new(())),
            metrics: Metrics::new(),
            state,
            status_every: Duration::from_secs(30),
        })
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn schedule(&self, name: &str) -> Option<&Schedule> {
        self.schedules.iter().find(|s| s.name == name)
    }

    pub fn node(&self) -> &str {
        self.cluster.node()
    }

    /// Runs the named schedule once, now.
    pub async fn run_once(&self, name: &str) -> Result<RunReport> {
        let sched = self.schedule(name).cloned().ok_or_else(|| Error::Config {
            path: "schedules".into(),
            message: format!(
                "no schedule named {name:?} (have: {})",
                self.schedules
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
        self.run_schedule(&sched).await
    }

    async fn mark(&self, name: &str, f: impl FnOnce(&mut ScheduleState)) {
        let r = async {
            let mut st = self.state.load()?.unwrap_or_default();
            f(st.schedules.entry(name.to_string()).or_default());
            self.state.save(&st)
        };
        if let Err(e) = r.await {
            warn!(error = %e, "could not save agent state");
        }
    }

    /// One run of `sched` over every volume of this node.
    pub async fn run_schedule(&self, sched: &Schedule) -> Result<RunReport> {
        let started = Utc::now();
        self.mark(&sched.name, |s| s.last_started = Some(started))
            .await;
        let plan = self.cluster.discover(&self.cfg).await?;
        info!(
            schedule = %sched.name,
            pods = plan.pods.len(),
            volumes = plan.volumes().count(),
            skipped = plan.skipped.len(),
            "starting scheduled backup"
        );
        for s in &plan.skipped {
            info!(namespace = %s.namespace, pod = %s.pod, volume = %s.volume, reason = %s.reason, "volume skipped");
        }
        let mut report = RunReport {
            schedule: sched.name.clone(),
            skipped: plan.skipped.clone(),
            ..Default::default()
        };
        for pod in &plan.pods {
            self.run_pod(pod, sched, &mut report).await;
        }
        match self.apply_retention(sched).await {
            Ok(n) => report.snapshots_forgotten = n,
            Err(e) => error!(error = %e, schedule = %sched.name, "retention failed"),
        }
        self.mark(&sched.name, |s| s.last_completed = Some(Utc::now()))
            .await;
        self.metrics.run_completed();
        info!(
            schedule = %sched.name,
            volumes = report.volumes.len(),
            failed = report.failed(),
            forgotten = report.snapshots_forgotten,
            "scheduled backup finished"
        );
        Ok(report)
    }

    async fn run_pod(&self, pod: &PodPlan, sched: &Schedule, report: &mut RunReport) {
        let subject = || pod_subject(pod);
        for e in &pod.hooks.errors {
            self.cluster
                .event(
                    subject(),
                    true,
                    "HookInvalid",
                    &format!("hook not run: {e}"),
                )
                .await;
            report
                .hook_failures
                .push(format!("{}/{}: {e}", pod.namespace, pod.pod));
        }
        let hooks_on = self.cfg.hooks.enabled;
        let mut blocked: Option<String> = None;
        if let (true, Some(pre)) = (hooks_on, &pod.hooks.pre) {
            if let Err(msg) = self.hook(pod, "pre", pre, report).await {
                if pre.on_error == OnError::Fail {
                    blocked = Some(format!("pre hook failed: {msg}"));
                }
            }
        }
        for target in &pod.volumes {
            let outcome = match &blocked {
                Some(msg) => self.volume_failed(target, sched, msg).await,
                None => self.backup_volume(target, sched).await,
            };
            report.volumes.push(outcome);
        }
        // The post hook runs even after a failed pre hook or backup: it is
        // where applications are unfrozen, and a half-applied pre hook
        // must not leave them frozen.
        if let (true, Some(post)) = (hooks_on, &pod.hooks.post) {
            let _ = self.hook(pod, "post", post, report).await;
        }
    }

    async fn hook(
        &self,
        pod: &PodPlan,
        phase: &str,
        hook: &Hook,
        report: &mut RunReport,
    ) -> std::result::Result<(), String> {
        match self
            .cluster
            .exec(&pod.namespace, &pod.pod, phase, hook)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let msg = e.to_string();
                warn!(error = %msg, "hook failed");
                self.metrics.hook_failed();
                let subject = pod_subject(pod);
                let policy = match hook.on_error {
                    OnError::Fail => "Fail",
                    OnError::Continue => "Continue",
                };
                self.cluster
                    .event(
                        subject,
                        true,
                        "HookFailed",
                        &format!("{msg} (on-error: {policy})"),
                    )
                    .await;
                report.hook_failures.push(msg.clone());
                Err(msg)
            }
        }
    }

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
        t: &VolumeTarget,
    ) -> (Option<chrono::DateTime<Utc>>, Option<String>) {
        match self.cluster.status(&t.namespace, &t.pvc).await {
            Ok(Some(s)) => (s.last_success, s.last_snapshot),
            _ => (None, None),
        }
    }

    async fn publish(&self, status: &VolumeStatus) {
        if let Err(e) = self.cluster.write_status(status).await {
            warn!(error = %e, "could not write volume status");
        }
    }

    async fn volume_failed(&self, t: &VolumeTarget, sched: &Schedule, msg: &str) -> VolumeOutcome {
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
        (status.last_success, status.last_snapshot) = self.previous_success(t).await;
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
        }
    }

    /// Backs up one volume into a snapshot `<namespace>/<pvc>`. Never gives
    /// up on time: a large volume takes as long as it takes, and a run
    /// that is killed resumes from the packs it already stored.
    pub async fn backup_volume(&self, t: &VolumeTarget, sched: &Schedule) -> VolumeOutcome {
        match std::fs::metadata(&t.path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                let msg = format!("{} is not a directory", t.path.display());
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
        let guard = self.lock_repo().await;
        let start = Instant::now();
        let (prev_success, prev_snapshot) = self.previous_success(t).await;
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
                    "backing up {} (schedule {}) from node {}",
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
                format!("node={}", self.node()),
                format!("pod={}", t.pod),
            ],
            threads: self.cfg.threads,
            hostname: Some(self.node().into()),
            ..Default::default()
        };
        let path: PathBuf = t.path.clone();
        let p = progress.clone();
        let mut work = self.on_repo(guard, move |repo| {
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
        let result = joined(result);
        let now = Utc::now();
        status.duration_seconds = duration;
        match result {
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
                }
            }
        }
    }

    /// Forgets this node's snapshots of `sched` older than its keep span.
    /// The newest snapshot of every volume is always kept, so a volume
    /// whose backups keep failing still has its last good copy.
    async fn apply_retention(&self, sched: &Schedule) -> Result<u64> {
        let policy = RetentionPolicy {
            ttl: Some(sched.keep),
            keep_last: Some(1),
            ..Default::default()
        };
        let filter = SnapshotFilter {
            sources: Vec::new(),
            tags: vec![sched.tag(), format!("node={}", self.node())],
        };
        let guard = self.lock_repo().await;
        let work = self.on_repo(guard, move |repo| {
            marmoset_storage::forget(repo, &policy, &filter, GroupBy::Source, false, &Utc)
        });
        Ok(joined(work.await)?.removed)
    }

    /// Which maintenance is due, judged from the times on the lease.
    fn maintenance_due(&self, st: &crate::lease::LeaseState) -> Option<bool> {
        let now = Utc::now();
        let m = &self.cfg.maintenance;
        let older = |t: Option<chrono::DateTime<Utc>>, every: Duration| match t {
            None => true,
            Some(t) => (now - t).to_std().unwrap_or_default() >= every,
        };
        let last_full = st.time(LAST_FULL);
        if older(last_full, m.full_every) {
            return Some(true);
        }
        let last_quick = st.time(LAST_QUICK).max(last_full);
        older(last_quick, m.quick_every).then_some(false)
    }

    /// One election round; on the holder, runs the maintenance that is due
    /// (renewing the lease meanwhile) and records it on the lease.
    pub async fn maintenance_round(&self, lease: &LeaderLease) -> Result<Option<MaintainReport>> {
        let st = lease.try_acquire_or_renew().await?;
        self.metrics.set_leader(st.leader);
        if !st.leader {
            return Ok(None);
        }
        let Some(full) = self.maintenance_due(&st) else {
            return Ok(None);
        };
        info!(full, "running repository maintenance");
        let started = Instant::now();
        let opts = MaintainOptions {
            full,
            ..Default::default()
        };
        let guard = self.lock_repo().await;
        let mut work = self.on_repo(guard, move |repo| marmoset_storage::maintain(repo, &opts));
        let mut renew = tokio::time::interval(self.cfg.maintenance.lease_duration / 3);
        renew.tick().await;
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                _ = renew.tick() => {
                    if let Err(e) = lease.try_acquire_or_renew().await {
                        warn!(error = %e, "could not renew the maintenance lease");
                    }
                }
            }
        };
        let report = match joined(result) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.maintenance_failed();
                return Err(e);
            }
        };
        let kind = if full { "full" } else { "quick" };
        self.metrics.maintenance_done(
            kind,
            Utc::now().timestamp() as f64,
            started.elapsed().as_secs_f64(),
        );
        lease
            .record(if full { LAST_FULL } else { LAST_QUICK }, Utc::now())
            .await?;
        Ok(Some(report))
    }

    /// Loads the last successes of this node's volumes from their status
    /// objects into the metrics, so `time() - last_success` stays meaningful
    /// after the agent restarts. Returns how many were found.
    pub async fn restore_metrics(&self) -> Result<usize> {
        let mut n = 0;
        for s in self.cluster.statuses().await? {
            if s.node != self.node() {
                continue;
            }
            if let Some(t) = s.last_success {
                self.metrics.remember_success(
                    &s.namespace,
                    &s.pvc,
                    &s.schedule,
                    t.timestamp() as f64,
                );
                n += 1;
            }
        }
        Ok(n)
    }

    /// Runs until `shutdown` resolves: the metrics endpoint, the
    /// maintenance election and the schedules.
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let (addr, server) =
            crate::metrics::serve(&self.cfg.metrics_address, self.metrics()).await?;
        info!(%addr, node = %self.node(), "marmoset agent started");
        match self.restore_metrics().await {
            Ok(n) => info!(volumes = n, "last successes loaded from status objects"),
            Err(e) => warn!(error = %e, "could not read status objects"),
        }
        let maintenance = if self.cfg.maintenance.enabled {
            let lease = Arc::new(LeaderLease::new(
                self.cluster.client().clone(),
                self.cluster.namespace(),
                &self.cfg.maintenance.lease_name,
                self.node(),
                self.cfg.maintenance.lease_duration,
            ));
            let me = self.clone();
            let l = lease.clone();
            Some((
                lease,
                tokio::spawn(async move {
                    loop {
                        if let Err(e) = me.maintenance_round(&l).await {
                            error!(error = %e, "maintenance round failed");
                        }
                        tokio::time::sleep(me.cfg.maintenance.lease_duration / 3).await;
                    }
                }),
            ))
        } else {
            None
        };
        let result = tokio::select! {
            r = self.clone().schedule_loop() => r,
            _ = shutdown => {
                info!("shutting down");
                Ok(())
            }
        };
        if let Some((lease, task)) = maintenance {
            task.abort();
            if let Err(e) = lease.release().await {
                warn!(error = %e, "could not release the maintenance lease");
            }
        }
        server.abort();
        // The scheduler only returns on an error: the process exits non-zero
        // and Kubernetes restarts it.
        result
    }

    async fn schedule_loop(self: Arc<Self>) -> Result<()> {
        let now = Utc::now();
        // A damaged state file costs at most one catch-up decision, never
        // the schedules: start over from now.
        let state = self.state.load().unwrap_or_else(|e| {
            warn!(error = %e, "ignoring unreadable agent state");
            None
        });
        match state {
            None => {
                // First start: nothing was missed; the schedules start now.
                let mut st = State::default();
                for s in &self.schedules {
                    st.schedules.insert(
                        s.name.clone(),
                        ScheduleState {
                            last_started: Some(now),
                            last_completed: Some(now),
                        },
                    );
                }
                self.state.save(&st)?;
            }
            Some(st) => {
                for s in &self.schedules {
                    let ss = st.schedules.get(&s.name).cloned().unwrap_or_default();
                    if catch_up_due(&ss, s.last_at_or_before(now)) {
                        info!(schedule = %s.name, "catching up a missed or interrupted run");
                        if let Err(e) = self.run_schedule(s).await {
                            error!(schedule = %s.name, error = %e, "run failed");
                        }
                    }
                }
            }
        }
        let mut next: Vec<Option<chrono::DateTime<Utc>>> = self
            .schedules
            .iter()
            .map(|s| s.next_after(Utc::now()))
            .collect();
        loop {
            let Some((i, at)) = next
                .iter()
                .enumerate()
                .filter_map(|(i, t)| t.map(|t| (i, t)))
                .min_by_key(|(_, t)| *t)
            else {
                return Err(Error::Task("no schedule has a future run".into()));
            };
            let now = Utc::now();
            if at > now {
                // Wake at least every minute: the wall clock may jump.
                let wait = (at - now)
                    .to_std()
                    .unwrap_or_default()
                    .min(Duration::from_secs(60));
                tokio::time::sleep(wait).await;
                continue;
            }
            let s = &self.schedules[i];
            if let Err(e) = self.run_schedule(s).await {
                error!(schedule = %s.name, error = %e, "run failed");
            }
            next[i] = s.next_after(Utc::now().max(at));
        }
    }
}

/// A blocking task's outcome as the agent's result.
fn joined<T>(
    r: std::result::Result<marmoset_storage::Result<T>, tokio::task::JoinError>,
) -> Result<T> {
    r.map_err(|e| Error::Task(e.to_string()))?
        .map_err(Error::from)
}

fn pod_subject(pod: &PodPlan) -> Subject<'_> {
    Subject::Pod {
        namespace: &pod.namespace,
        name: &pod.pod,
        uid: &pod.pod_uid,
    }
}
