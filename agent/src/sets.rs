//! The set-wide work of a run, done by one elected agent (the holder of
//! the `marmoset-sets` Lease): saving the run's Kubernetes objects when it
//! starts, and closing the set once every expected node has reported or
//! the report deadline has passed. Each node's own part is written by
//! that node (`runner::record_set_part`); a node that reports after the
//! close still joins the set.

use chrono::{DateTime, Utc};
use marmoset_storage::{BackupOptions, BackupSet, PartKind, Progress, SetObjects, SetPart};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::objects;
use crate::runner::{joined, Agent};
use crate::schedule::Schedule;

impl Agent {
    /// Whether this agent holds the sets Lease now (acquiring it when it
    /// is free or expired).
    async fn elected_for_sets(&self) -> bool {
        match self.sets_lease.try_acquire_or_renew().await {
            Ok(st) => st.leader,
            Err(e) => {
                warn!(error = %e, "sets lease: election failed");
                false
            }
        }
    }

    /// The sets as the repository has them now.
    async fn current_sets(&self) -> Result<Vec<BackupSet>> {
        let share = self.share_repo().await;
        let work = self.on_repo(share, |repo| {
            marmoset_storage::sets(repo, Utc::now()).map(|(s, _)| s)
        });
        joined(work.await)
    }

    async fn save_record(&self, part: SetPart) -> Result<()> {
        let share = self.share_repo().await;
        let work = self.on_repo(share, move |repo| repo.save_set_part(&part));
        joined(work.await).map(|_| ())
    }

    fn record(&self, sched: &str, set: &str, kind: PartKind, started: DateTime<Utc>) -> SetPart {
        SetPart {
            version: 1,
            set: set.to_string(),
            schedule: sched.to_string(),
            node: self.node().to_string(),
            started,
            finished: Utc::now(),
            nodes_expected: Vec::new(),
            volumes: Vec::new(),
            errors: Vec::new(),
            kind,
            objects: None,
        }
    }

    /// At the start of a run: the elected agent saves the Kubernetes
    /// objects of the set, unless they are saved already (a catch-up run
    /// of the same set). Failures are recorded in the set, never fatal.
    pub(crate) async fn save_set_objects(&self, sched: &Schedule, set: &str) {
        if !self.cfg.sets.save_objects || !self.elected_for_sets().await {
            return;
        }
        match self.current_sets().await {
            Ok(sets) if sets.iter().any(|s| s.name == set && s.objects.is_some()) => return,
            Ok(_) => {}
            Err(e) => warn!(error = %e, set, "could not read the sets"),
        }
        let started = Utc::now();
        let record = match self.snapshot_objects(sched, set).await {
            Ok(r) => r,
            Err(e) => SetObjects {
                snapshot: None,
                namespaces: Vec::new(),
                count: 0,
                errors: vec![e.to_string()],
            },
        };
        info!(
            set,
            objects = record.count,
            snapshot = record.snapshot.as_deref().unwrap_or("-"),
            errors = record.errors.len(),
            "Kubernetes objects of the set saved"
        );
        let mut part = self.record(&sched.name, set, PartKind::Objects, started);
        part.objects = Some(record);
        if let Err(e) = self.save_record(part).await {
            warn!(error = %e, set, "could not record the set's objects");
        }
    }

    async fn snapshot_objects(&self, sched: &Schedule, set: &str) -> Result<SetObjects> {
        let client = self.cluster.client();
        let namespaces = objects::namespaces(
            client,
            &self.cfg.included_namespaces,
            &self.cfg.excluded_namespaces,
        )
        .await?;
        let collected =
            objects::collect(client, &namespaces, &self.cfg.sets.exclude_resources).await?;
        // Private to root (0700): Secrets pass through it on their way into
        // the encrypted repository.
        let dir = tempfile::Builder::new()
            .prefix("marmoset-objects-")
            .tempdir()
            .map_err(|e| Error::Io {
                what: "create a temporary directory for the objects".into(),
                source: e,
            })?;
        collected.write(dir.path())?;
        let opts = BackupOptions {
            source: Some(objects::OBJECTS_SOURCE.into()),
            tags: vec![
                sched.tag(),
                format!("set={set}"),
                format!("node={}", self.node()),
            ],
            hostname: Some(self.node().into()),
            threads: self.cfg.threads,
            ..Default::default()
        };
        let path = dir.path().to_path_buf();
        let share = self.share_repo().await;
        let work = self.on_repo(share, move |repo| {
            marmoset_storage::backup(repo, &[path], &opts, &Progress::default())
        });
        let (id, _) = joined(work.await)?;
        drop(dir);
        Ok(SetObjects {
            snapshot: Some(id.to_hex()),
            namespaces,
            count: collected.count(),
            errors: collected.errors,
        })
    }

    /// Closes the open sets of this agent's schedules that are due: every
    /// expected node has reported, or the report deadline has passed.
    /// Only the elected agent closes; returns the sets closed.
    pub async fn finish_sets(&self) -> Result<Vec<String>> {
        let now = Utc::now();
        let deadline = chrono::Duration::from_std(self.cfg.sets.report_deadline)
            .unwrap_or(chrono::Duration::hours(6));
        let open: Vec<BackupSet> = self
            .current_sets()
            .await?
            .into_iter()
            .filter(|s| s.closed.is_none() && self.schedule(&s.schedule).is_some())
            .filter(|s| !s.nodes.is_empty() && now - s.started < deadline * 4)
            .collect();
        if !self.elected_for_sets().await {
            return Ok(Vec::new());
        }
        // Elected after the run started (the holder died): the objects of
        // a set still open are saved now, later than its volumes but not
        // lost.
        if self.cfg.sets.save_objects {
            for s in open.iter().filter(|s| s.objects.is_none()) {
                if let Some(sched) = self.schedule(&s.schedule).cloned() {
                    self.save_set_objects(&sched, &s.name).await;
                }
            }
        }
        let due: Vec<BackupSet> = open
            .into_iter()
            .filter(|s| s.missing_nodes.is_empty() || now - s.finished >= deadline)
            .collect();
        let share = self.share_repo().await;
        let work = self.on_repo(share, move |repo| marmoset_storage::prune_sets(repo, now));
        match joined(work.await) {
            Ok(gone) if !gone.is_empty() => {
                info!(sets = ?gone, "records of expired backup sets removed")
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not remove the records of expired sets"),
        }
        let mut closed = Vec::new();
        for s in due {
            let mut part = self.record(&s.schedule, &s.name, PartKind::Close, s.started);
            part.errors = s
                .missing_nodes
                .iter()
                .map(|n| format!("node {n} had not reported when the set was closed"))
                .collect();
            self.save_record(part).await?;
            info!(set = %s.name, missing = ?s.missing_nodes, "backup set closed");
            closed.push(s.name);
        }
        Ok(closed)
    }
}
