//! The agent's work: scheduled runs over the node's volumes (hooks, backup,
//! status, retention) and, on the lease holder, repository maintenance.
//! One volume's backup and its status live in `volume`; pending post hooks
//! (what must be thawed whatever happens) in `freeze`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use marmoset_storage::{
    GroupBy, MaintainOptions, MaintainReport, PartKind, Repository, RetentionPolicy, SetPart,
    SetVolume, SnapshotFilter,
};
use tokio::sync::{OwnedRwLockReadGuard, RwLock};
use tracing::{error, info, warn};

use crate::cluster::{Cluster, Subject};
use crate::config::AgentConfig;
use crate::discovery::{Plan, PodPlan, Skipped, VolumeTarget};
use crate::error::{Error, Result};
use crate::hooks::{Hook, OnError};
use crate::lease::{LeaderLease, LAST_FULL, LAST_QUICK};
use crate::metrics::Metrics;
use crate::schedule::Schedule;
use crate::state::{catch_up_due, ScheduleState, State, StateFile};
use crate::status::Phase;

/// The result of backing up one volume.
#[derive(Debug, Clone)]
pub struct VolumeOutcome {
    pub target: VolumeTarget,
    pub phase: Phase,
    pub snapshot: Option<String>,
    pub error: Option<String>,
    pub bytes_read: u64,
    pub bytes_added: u64,
    pub duration_secs: f64,
}

/// The result of one scheduled run on this node.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub schedule: String,
    /// The run's backup set (`<schedule>-<fire time>`), tagged `set=` on
    /// every snapshot.
    pub set: String,
    pub volumes: Vec<VolumeOutcome>,
    pub skipped: Vec<Skipped>,
    pub hook_failures: Vec<String>,
    pub snapshots_forgotten: u64,
    /// Extra passes made over failed volumes.
    pub retries: u32,
    /// The copy to the secondary repository, when one is configured.
    pub secondary: Option<crate::secondary::SecondaryOutcome>,
}

impl RunReport {
    pub fn failed(&self) -> usize {
        self.volumes
            .iter()
            .filter(|v| v.phase != Phase::Succeeded)
            .count()
    }
}

/// What one pod's turn produced.
#[derive(Default)]
struct PodResult {
    volumes: Vec<VolumeOutcome>,
    hook_failures: Vec<String>,
}

/// A shared hold on the repository for backups: many at once, never
/// during maintenance.
pub(crate) type RepoShare = Arc<OwnedRwLockReadGuard<()>>;

pub struct Agent {
    pub(crate) cfg: AgentConfig,
    schedules: Vec<Schedule>,
    pub(crate) cluster: Cluster,
    pub(crate) repo: Arc<Repository>,
    /// Backups share the repository handle (and its local index cache);
    /// maintenance, which rewrites that cache, has it alone.
    repo_lock: Arc<RwLock<()>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) state: StateFile,
    /// One read-modify-write of the state file at a time.
    pub(crate) state_lock: tokio::sync::Mutex<()>,
    /// How often a running backup rewrites its status object.
    pub status_every: Duration,
    /// Set at shutdown: running backups stop without a snapshot.
    pub(crate) cancel: Arc<std::sync::atomic::AtomicBool>,
    /// Held while failed thaws are retried, and by a run while it checks
    /// a pod's pending thaw and records its freeze.
    pub(crate) thaw_lock: tokio::sync::Mutex<()>,
    /// The second repository kept in step (`secondary` in the config).
    pub(crate) secondary: Option<crate::secondary::Secondary>,
    /// Elects the one agent that saves each set's objects and closes it.
    pub(crate) sets_lease: LeaderLease,
    /// Volume restores running in this process.
    pub(crate) restoring: crate::restore::worker::Restoring,
}

impl Agent {
    pub fn new(cfg: AgentConfig, cluster: Cluster, repo: Arc<Repository>) -> Result<Self> {
        let schedules = cfg.schedules()?;
        let state = StateFile::new(&cfg.state_dir, cluster.node());
        let sets_lease = LeaderLease::new(
            cluster.client().clone(),
            cluster.namespace(),
            &cfg.sets.lease_name,
            cluster.node(),
            cfg.sets.lease_duration,
        );
        Ok(Self {
            sets_lease,
            restoring: Default::default(),
            cfg,
            schedules,
            cluster,
            repo,
            repo_lock: Arc::new(RwLock::new(())),
            metrics: Metrics::new(),
            state,
            state_lock: tokio::sync::Mutex::new(()),
            status_every: Duration::from_secs(30),
            cancel: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            thaw_lock: tokio::sync::Mutex::new(()),
            secondary: None,
        })
    }

    /// Keeps a second repository in step with the primary after every
    /// run. `open` is called when a run first needs it (again after a
    /// failure), so an unreachable secondary fails its copies, reported,
    /// and never the primary's backups.
    pub fn with_secondary(mut self, open: crate::secondary::SecondaryOpener) -> Self {
        self.secondary = Some(crate::secondary::Secondary::new(open));
        self
    }

    /// Waits for a shared hold on the repository (not during maintenance).
    pub(crate) async fn share_repo(&self) -> RepoShare {
        Arc::new(self.repo_lock.clone().read_owned().await)
    }

    /// Runs `f` on a blocking thread that keeps `hold` until it is done,
    /// even if the caller stops waiting.
    pub(crate) fn on_repo<T: Send + 'static, H: Send + 'static>(
        &self,
        hold: H,
        f: impl FnOnce(&Repository) -> marmoset_storage::Result<T> + Send + 'static,
    ) -> tokio::task::JoinHandle<marmoset_storage::Result<T>> {
        let repo = self.repo.clone();
        tokio::task::spawn_blocking(move || {
            let r = f(&repo);
            drop(hold);
            r
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
        self.run_schedule(&sched, Utc::now()).await
    }

    /// Stops every running backup before its snapshot is written: called
    /// before pods are thawed at shutdown, so that nothing read after a
    /// thaw is recorded as a consistent copy. The process is exiting.
    pub fn cancel_backups(&self) {
        self.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the state was saved (a pod is frozen only if it was).
    pub(crate) async fn update_state(&self, f: impl FnOnce(&mut State)) -> bool {
        let _one = self.state_lock.lock().await;
        let r = self.state.load().and_then(|st| {
            let mut st = st.unwrap_or_default();
            f(&mut st);
            self.state.save(&st)
        });
        match r {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "could not save agent state");
                false
            }
        }
    }

    async fn mark(&self, name: &str, f: impl FnOnce(&mut ScheduleState)) {
        let _ = self
            .update_state(|st| f(st.schedules.entry(name.to_string()).or_default()))
            .await;
    }

    /// Lists this node's pods and volumes; the API server may be briefly
    /// unavailable (restart, upgrade, overload), so a failure is retried
    /// with a doubling wait before the run is given up.
    async fn discover_with_retry(&self) -> Result<Plan> {
        let r = &self.cfg.retry;
        let mut wait = r.backoff;
        let mut attempt = 1;
        loop {
            match self.cluster.discover(&self.cfg).await {
                Ok(plan) => return Ok(plan),
                Err(e) if attempt < r.discovery_attempts => {
                    warn!(error = %e, attempt, retry_in = ?wait, "discovery failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(300));
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One run of `sched` (fired at `fire`) over every volume of this node.
    pub async fn run_schedule(&self, sched: &Schedule, fire: DateTime<Utc>) -> Result<RunReport> {
        let started = Utc::now();
        self.mark(&sched.name, |s| s.last_started = Some(started))
            .await;
        let plan = self.discover_with_retry().await?;
        let set = sched.set_name(fire);
        info!(
            schedule = %sched.name,
            set = %set,
            pods = plan.pods.len(),
            volumes = plan.volumes().count(),
            skipped = plan.skipped.len(),
            "starting scheduled backup"
        );
        let mut report = RunReport {
            schedule: sched.name.clone(),
            set: set.clone(),
            skipped: plan.skipped.clone(),
            ..Default::default()
        };
        for s in &plan.skipped {
            self.record_skip(s, sched).await;
        }
        self.save_set_objects(sched, &set).await;
        let results = self.run_pods(plan.pods.clone(), sched, &set).await;
        for r in results {
            report.volumes.extend(r.volumes);
            report.hook_failures.extend(r.hook_failures);
        }
        self.retry_failed(&plan, sched, fire, &set, &mut report)
            .await;
        report.volumes.sort_by_key(|v| v.target.source());
        match self.apply_retention(sched).await {
            Ok(n) => report.snapshots_forgotten = n,
            Err(e) => error!(error = %e, schedule = %sched.name, "retention failed"),
        }
        if self.secondary.is_some() {
            report.secondary = Some(self.copy_to_secondary(sched, &report).await);
        }
        self.record_set_part(sched, &set, started, &report).await;
        if let Err(e) = self.finish_sets().await {
            warn!(error = %e, "could not close the finished backup sets");
        }
        if let Err(e) = self.clean_up_statuses().await {
            warn!(error = %e, "could not clean up status objects");
        }
        self.mark(&sched.name, |s| s.last_completed = Some(Utc::now()))
            .await;
        self.metrics.run_completed();
        info!(
            schedule = %sched.name,
            set = %set,
            volumes = report.volumes.len(),
            failed = report.failed(),
            retries = report.retries,
            forgotten = report.snapshots_forgotten,
            "scheduled backup finished"
        );
        Ok(report)
    }

    /// Records this node's part of the run's backup set in the repository
    /// (`marmoset sets`). A failure is logged: the snapshots stand.
    async fn record_set_part(
        &self,
        sched: &Schedule,
        set: &str,
        started: DateTime<Utc>,
        report: &RunReport,
    ) {
        let nodes_expected = match self.cluster.agent_nodes().await {
            Ok(n) if !n.is_empty() => n,
            Ok(_) => vec![self.node().to_string()],
            Err(e) => {
                warn!(error = %e, "could not list the agents expected in the set");
                vec![self.node().to_string()]
            }
        };
        let mut errors: Vec<String> = report
            .skipped
            .iter()
            .filter(|s| !s.intentional)
            .map(|s| {
                format!(
                    "{}/{} volume {} skipped: {}",
                    s.namespace, s.pod, s.volume, s.reason
                )
            })
            .collect();
        errors.extend(report.hook_failures.iter().map(|h| format!("hook: {h}")));
        let part = SetPart {
            version: 1,
            set: set.to_string(),
            schedule: sched.name.clone(),
            node: self.node().to_string(),
            started,
            finished: Utc::now(),
            nodes_expected,
            volumes: report
                .volumes
                .iter()
                .map(|v| SetVolume {
                    namespace: v.target.namespace.clone(),
                    pvc: v.target.pvc.clone(),
                    pv: v.target.pv.clone(),
                    node: self.node().to_string(),
                    phase: match v.phase {
                        Phase::Succeeded => "Completed".to_string(),
                        other => other.as_str().to_string(),
                    },
                    snapshot: v.snapshot.clone(),
                    bytes_read: v.bytes_read,
                    bytes_added: v.bytes_added,
                    duration_secs: v.duration_secs,
                    error: v.error.clone(),
                })
                .collect(),
            errors,
            kind: PartKind::Node,
            objects: None,
        };
        let share = self.share_repo().await;
        let work = self.on_repo(share, move |repo| repo.save_set_part(&part));
        if let Err(e) = joined(work.await) {
            warn!(error = %e, set, "could not record the backup set");
        }
    }

    /// Up to `retry.volumeRetries` more passes over the volumes that
    /// failed, as long as the schedule's next fire time is not reached.
    async fn retry_failed(
        &self,
        plan: &Plan,
        sched: &Schedule,
        fire: DateTime<Utc>,
        set: &str,
        report: &mut RunReport,
    ) {
        let r = &self.cfg.retry;
        let deadline = sched.next_after(fire);
        for _ in 0..r.volume_retries {
            let failed: HashSet<String> = report
                .volumes
                .iter()
                .filter(|v| v.phase == Phase::Failed)
                .map(|v| v.target.source())
                .collect();
            if failed.is_empty() {
                return;
            }
            let delay = chrono::Duration::from_std(r.volume_retry_delay).unwrap_or_default();
            if deadline.is_some_and(|d| Utc::now() + delay >= d) {
                warn!(
                    volumes = failed.len(),
                    "no time left in this run to retry failed volumes"
                );
                return;
            }
            info!(volumes = failed.len(), delay = ?r.volume_retry_delay, "retrying failed volumes");
            tokio::time::sleep(r.volume_retry_delay).await;
            let pods: Vec<PodPlan> = plan
                .pods
                .iter()
                .filter_map(|p| {
                    let mut p = p.clone();
                    p.volumes.retain(|v| failed.contains(&v.source()));
                    (!p.volumes.is_empty()).then_some(p)
                })
                .collect();
            report.retries += 1;
            for result in self.run_pods(pods, sched, set).await {
                report.hook_failures.extend(result.hook_failures);
                for outcome in result.volumes {
                    let source = outcome.target.source();
                    if let Some(old) = report
                        .volumes
                        .iter_mut()
                        .find(|v| v.target.source() == source)
                    {
                        *old = outcome;
                    }
                }
            }
        }
    }

    /// Pods run `parallelVolumes` at a time: one large volume no longer
    /// holds up every other volume of the node.
    async fn run_pods(&self, pods: Vec<PodPlan>, sched: &Schedule, set: &str) -> Vec<PodResult> {
        futures::stream::iter(pods)
            .map(|pod| async move { self.run_pod(&pod, sched, set).await })
            .buffer_unordered(self.cfg.parallel_volumes.max(1))
            .collect()
            .await
    }

    async fn run_pod(&self, pod: &PodPlan, sched: &Schedule, set: &str) -> PodResult {
        let mut result = PodResult::default();
        let hooks_on = self.cfg.hooks.enabled;
        let mut blocked: Option<String> = None;
        for e in &pod.hooks.errors {
            self.cluster
                .event(
                    pod_subject(pod),
                    true,
                    "HookInvalid",
                    &format!("hook not run: {e}"),
                )
                .await;
            result
                .hook_failures
                .push(format!("{}/{}: {e}", pod.namespace, pod.pod));
        }
        // Hooks asked for but not understood: the pod would be backed up
        // unfrozen (or thawed without a freeze), so none runs and its
        // volumes fail, as Velero fails them.
        if hooks_on && !pod.hooks.errors.is_empty() {
            blocked = Some(format!(
                "hook annotations not understood, nothing backed up: {}",
                pod.hooks.errors.join("; ")
            ));
        }
        let pre = pod
            .hooks
            .pre
            .as_ref()
            .filter(|_| hooks_on && blocked.is_none());
        let post = pod
            .hooks
            .post
            .as_ref()
            .filter(|_| hooks_on && blocked.is_none());
        // Everything the backup needs comes before the application is
        // frozen: the hold on the repository (maintenance may have it for
        // minutes) and an up-to-date index.
        let share = self.share_repo().await;
        if blocked.is_none() && (pre.is_some() || post.is_some()) {
            let prepared = self.on_repo(share.clone(), |repo| repo.sync_index()).await;
            if let Err(e) = crate::runner::joined(prepared) {
                blocked = Some(format!("repository not ready, hooks not run: {e}"));
            }
        }
        // A post hook of an earlier run that failed: the pod may still be
        // frozen. It is thawed first, and not frozen again while it fails.
        // One thaw of a pod at a time: the minute retry of failed thaws
        // must not still be thawing when this run freezes the pod again.
        // Pods without a post hook are never frozen: they do not wait.
        let thawing = match post {
            Some(_) => Some(self.thaw_lock.lock().await),
            None => None,
        };
        if blocked.is_none() && post.is_some() {
            if let Some(f) = self.pending_thaw(&pod.namespace, &pod.pod).await {
                if !self.thaw(&f, "of an earlier run", None).await {
                    blocked = Some(
                        "the post hook of an earlier run still fails; not frozen again".into(),
                    );
                } else {
                    self.post_hook_done(&pod.namespace, &pod.pod, true).await;
                }
            }
        }
        let mut frozen = false;
        if blocked.is_none() {
            if let Some(post) = post {
                if self.remember_frozen(pod, post).await {
                    frozen = true;
                } else {
                    blocked = Some(
                        "the agent state file cannot be written, so the pod is not frozen".into(),
                    );
                }
            }
        }
        // Recorded as frozen by this run: the retry leaves it alone.
        drop(thawing);
        if blocked.is_none() {
            if let Some(pre) = pre {
                if let Err(msg) = self.hook(pod, "pre", pre, &mut result).await {
                    if pre.on_error == OnError::Fail {
                        blocked = Some(format!("pre hook failed: {msg}"));
                    }
                }
            }
        }
        let mut outcomes = Vec::new();
        for target in &pod.volumes {
            let outcome = match &blocked {
                Some(msg) => self.volume_failed(target, sched, msg).await,
                None => self.backup_volume(target, sched, set, share.clone()).await,
            };
            outcomes.push((target, outcome));
        }
        drop(share);
        // The post hook runs even after a failed pre hook or backup: it is
        // where applications are unfrozen, and a half-applied pre hook
        // must not leave them frozen.
        if let (Some(post), true) = (post, frozen) {
            let ok = self.hook(pod, "post", post, &mut result).await;
            self.post_hook_done(&pod.namespace, &pod.pod, ok.is_ok())
                .await;
            if let Err(msg) = ok {
                // The copy is good (taken frozen), but the application may
                // still be, whatever on-error says: the status says so.
                for (target, outcome) in &mut outcomes {
                    if outcome.error.is_none() {
                        let why = format!("backed up, but the post hook failed: {msg}");
                        let snapshot = outcome.snapshot.take();
                        *outcome = self.volume_failed(target, sched, &why).await;
                        outcome.snapshot = snapshot;
                    }
                }
            }
        }
        result.volumes = outcomes.into_iter().map(|(_, o)| o).collect();
        result
    }

    async fn hook(
        &self,
        pod: &PodPlan,
        phase: &str,
        hook: &Hook,
        result: &mut PodResult,
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
                let policy = match hook.on_error {
                    OnError::Fail => "Fail",
                    OnError::Continue => "Continue",
                };
                self.cluster
                    .event(
                        pod_subject(pod),
                        true,
                        "HookFailed",
                        &format!("{msg} (on-error: {policy})"),
                    )
                    .await;
                result.hook_failures.push(msg.clone());
                Err(msg)
            }
        }
    }

    /// The retention of `sched` on this node: its keep span, the newest
    /// snapshot of every volume kept, over this node's snapshots of the
    /// schedule (the same in the primary and the secondary repository).
    pub(crate) fn retention(&self, sched: &Schedule) -> (RetentionPolicy, SnapshotFilter) {
        let policy = RetentionPolicy {
            ttl: Some(sched.keep),
            keep_last: Some(1),
            ..Default::default()
        };
        let filter = SnapshotFilter {
            sources: Vec::new(),
            tags: vec![sched.tag(), format!("node={}", self.node())],
        };
        (policy, filter)
    }

    /// Forgets this node's snapshots of `sched` older than its keep span.
    /// The newest snapshot of every volume is always kept, so a volume
    /// whose backups keep failing still has its last good copy.
    async fn apply_retention(&self, sched: &Schedule) -> Result<u64> {
        let (mut policy, filter) = self.retention(sched);
        let tag = sched.tag();
        let share = self.share_repo().await;
        let work = self.on_repo(share, move |repo| {
            // Sets holding a volume's newest complete snapshot are kept
            // whole, with their objects, whichever node wrote them.
            let (snaps, _) = repo.snapshots()?;
            policy.keep_tags = marmoset_storage::newest_complete_sets(&snaps, &tag);
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
    /// (renewing the lease meanwhile, also while it waits for running
    /// backups to finish) and records it on the lease.
    pub async fn maintenance_round(&self, lease: &LeaderLease) -> Result<Option<MaintainReport>> {
        let st = lease.try_acquire_or_renew().await?;
        self.metrics.set_leader(st.leader);
        if !st.leader {
            return Ok(None);
        }
        let Some(full) = self.maintenance_due(&st) else {
            return Ok(None);
        };
        let mut renew = tokio::time::interval(self.cfg.maintenance.lease_duration / 3);
        renew.tick().await;
        let exclusive = self.repo_lock.clone().write_owned();
        tokio::pin!(exclusive);
        let hold = loop {
            tokio::select! {
                g = &mut exclusive => break g,
                _ = renew.tick() => {
                    if !self.renew_lease(lease).await {
                        info!("maintenance lease lost while waiting for backups; not running it");
                        return Ok(None);
                    }
                }
            }
        };
        info!(full, "running repository maintenance");
        let started = Instant::now();
        let opts = MaintainOptions {
            full,
            ..Default::default()
        };
        let mut work = self.on_repo(hold, move |repo| marmoset_storage::maintain(repo, &opts));
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                _ = renew.tick() => { self.renew_lease(lease).await; }
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

    /// Renews the maintenance lease; false only when another agent holds
    /// it now (an API error keeps what we have: the next round decides).
    async fn renew_lease(&self, lease: &LeaderLease) -> bool {
        match lease.try_acquire_or_renew().await {
            Ok(st) => {
                self.metrics.set_leader(st.leader);
                st.leader
            }
            Err(e) => {
                warn!(error = %e, "could not renew the maintenance lease");
                true
            }
        }
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
    /// maintenance election and the schedules. Post hooks left pending by
    /// an earlier process are run first; those pending when `shutdown`
    /// comes are run before returning.
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let (addr, server) =
            crate::metrics::serve(&self.cfg.metrics_address, self.metrics()).await?;
        info!(%addr, node = %self.node(), "marmoset agent started");
        self.thaw_leftovers("left pending by the previous agent", None)
            .await;
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
        let sets = {
            let me = self.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(me.cfg.sets.lease_duration / 3).await;
                    if let Err(e) = me.finish_sets().await {
                        warn!(error = %e, "could not close the finished backup sets");
                    }
                }
            })
        };
        let restores = self.clone().restore_loop();
        let retry = {
            let me = self.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(crate::freeze::FAILED_THAW_RETRY).await;
                    let _one = me.thaw_lock.lock().await;
                    me.thaw_pending("that failed before", None, true).await;
                }
            })
        };
        let result = tokio::select! {
            r = self.clone().schedule_loop() => r,
            _ = shutdown => {
                info!("shutting down");
                Ok(())
            }
        };
        retry.abort();
        sets.abort();
        restores.abort();
        // The schedule loop is gone, and with it any hook it was waiting
        // for: running backups stop (nothing read after a thaw is saved),
        // and every pod it froze is thawed before the process exits.
        self.cancel_backups();
        self.thaw_leftovers(
            "pending at shutdown",
            Some(crate::freeze::SHUTDOWN_HOOK_BUDGET),
        )
        .await;
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
        let first_start = state.as_ref().is_none_or(|st| st.schedules.is_empty());
        if first_start {
            // First start: nothing was missed; the schedules start now.
            self.update_state(|st| {
                for s in &self.schedules {
                    st.schedules.insert(
                        s.name.clone(),
                        ScheduleState {
                            last_started: Some(now),
                            last_completed: Some(now),
                        },
                    );
                }
            })
            .await;
        } else if let Some(st) = state {
            for s in &self.schedules {
                let ss = st.schedules.get(&s.name).cloned().unwrap_or_default();
                let fire = s.last_at_or_before(now);
                if catch_up_due(&ss, fire) {
                    info!(schedule = %s.name, "catching up a missed or interrupted run");
                    if let Err(e) = self.run_schedule(s, fire.unwrap_or(now)).await {
                        error!(schedule = %s.name, error = %e, "run failed");
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
            if let Err(e) = self.run_schedule(s, at).await {
                error!(schedule = %s.name, error = %e, "run failed");
            }
            next[i] = s.next_after(Utc::now().max(at));
        }
    }
}

/// A blocking task's outcome as the agent's result.
pub(crate) fn joined<T>(
    r: std::result::Result<marmoset_storage::Result<T>, tokio::task::JoinError>,
) -> Result<T> {
    r.map_err(|e| Error::Task(e.to_string()))?
        .map_err(Error::from)
}

pub(crate) fn pod_subject(pod: &PodPlan) -> Subject<'_> {
    Subject::Pod {
        namespace: &pod.namespace,
        name: &pod.pod,
        uid: &pod.pod_uid,
    }
}
