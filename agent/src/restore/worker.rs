//! The agent's side of a restore: finds the pods of this node that wait
//! for restored volumes (they carry the restore's annotation and its wait
//! container), restores each volume's snapshot into the new volume with
//! `--delete`, records the outcome in the restore's record and as Events
//! on the pod, and then releases the pod by writing `done` (or `failed`
//! and why) into its wait emptyDir.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams};
use marmoset_storage::{Overwrite, RestoreOptions as DataRestoreOptions, RestoreProgress};
use tracing::{info, warn};

use crate::cluster::Subject;
use crate::discovery::host_path;
use crate::error::{Error, Result};
use crate::restore::record::{self, RestoreRecord, COMPLETED, FAILED, IN_PROGRESS, NEW};
use crate::restore::{DONE_FILE, FAILED_FILE, RESTORE_ANNOTATION, WAIT_CONTAINER, WAIT_VOLUME};
use crate::runner::{joined, Agent};

/// How often a running volume restore records its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// A pod of this node waiting for restored volumes.
struct Waiting {
    namespace: String,
    name: String,
    uid: String,
    restore: String,
    claims: Vec<String>,
    marker_dir: PathBuf,
}

fn waiting_pod(kubelet: &Path, pod: &Pod) -> Option<Waiting> {
    let restore = pod
        .metadata
        .annotations
        .as_ref()?
        .get(RESTORE_ANNOTATION)?
        .clone();
    let spec = pod.spec.as_ref()?;
    let waits = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .any(|c| {
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == WAIT_VOLUME)
                || c.name == WAIT_CONTAINER
        });
    if !waits {
        return None;
    }
    let uid = pod.metadata.uid.clone()?;
    let claims = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| {
            v.persistent_volume_claim
                .as_ref()
                .map(|c| c.claim_name.clone())
        })
        .collect();
    Some(Waiting {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        marker_dir: kubelet
            .join("pods")
            .join(&uid)
            .join("volumes/kubernetes.io~empty-dir")
            .join(WAIT_VOLUME),
        uid,
        restore,
        claims,
    })
}

/// Where a restored claim's data goes.
enum Binding {
    /// Not bound yet (a WaitForFirstConsumer claim being provisioned).
    NotYet,
    Bound(String, Box<PersistentVolume>),
    /// Bound to a volume that is not the claim's: never written.
    Invalid(String),
}

/// Writes a marker file the pod can see. Created new and never followed
/// through a link: the pod can write into that directory too.
fn write_marker(dir: &Path, name: &str, text: &str) -> Result<()> {
    let path = dir.join(name);
    let r = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path);
    match r {
        Ok(mut f) => f.write_all(text.as_bytes()).map_err(|e| Error::Io {
            what: format!("write {}", path.display()),
            source: e,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::Io {
            what: format!("write {}", path.display()),
            source: e,
        }),
    }
}

fn released(dir: &Path) -> bool {
    [DONE_FILE, FAILED_FILE]
        .iter()
        .any(|f| std::fs::symlink_metadata(dir.join(f)).is_ok())
}

impl Agent {
    pub(crate) fn restore_loop(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            if !self.cfg.restores.enabled {
                return;
            }
            loop {
                if let Err(e) = self.restore_round().await {
                    warn!(error = %e, "restore round failed");
                }
                tokio::time::sleep(self.cfg.restores.poll_interval).await;
            }
        })
    }

    /// One pass over this node's waiting pods; returns the volumes
    /// restored in it.
    pub async fn restore_round(&self) -> Result<usize> {
        let client = self.cluster.client().clone();
        let pods = Api::<Pod>::all(client.clone())
            .list(&ListParams::default().fields(&format!("spec.nodeName={}", self.node())))
            .await
            .map_err(|e| Error::kube(format!("list pods on node {}", self.node()), e))?
            .items;
        let waiting: Vec<Waiting> = pods
            .iter()
            .filter_map(|p| waiting_pod(&self.cfg.kubelet_dir, p))
            .filter(|w| w.marker_dir.is_dir() && !released(&w.marker_dir))
            .collect();
        if waiting.is_empty() {
            return Ok(0);
        }
        let ns = self.cluster.namespace().to_string();
        let mut records: BTreeMap<String, Option<RestoreRecord>> = BTreeMap::new();
        let mut restored = 0;
        for w in &waiting {
            if !records.contains_key(&w.restore) {
                records.insert(
                    w.restore.clone(),
                    record::get(&client, &ns, &w.restore).await?,
                );
            }
            let Some(Some(rec)) = records.get(&w.restore).cloned() else {
                let msg = format!("restore {} is not recorded (deleted?)", w.restore);
                self.release(w, Err(msg)).await;
                continue;
            };
            let mine: Vec<String> = w
                .claims
                .iter()
                .filter(|c| {
                    rec.volumes
                        .iter()
                        .any(|v| v.namespace == w.namespace && &v.pvc == *c)
                })
                .cloned()
                .collect();
            for claim in &mine {
                let binding = self.binding(&w.namespace, claim).await?;
                if matches!(binding, Binding::NotYet) {
                    // Provisioned on first use: next round.
                    continue;
                }
                if self
                    .claim_item(&ns, &w.restore, &w.namespace, claim)
                    .await?
                {
                    self.restore_item(&ns, w, claim, binding).await;
                    restored += 1;
                }
            }
            // Released once each of its volumes is settled.
            let Some(rec) = record::get(&client, &ns, &w.restore).await? else {
                continue;
            };
            records.insert(w.restore.clone(), Some(rec.clone()));
            let items: Vec<_> = rec
                .volumes
                .iter()
                .filter(|v| v.namespace == w.namespace && mine.contains(&v.pvc))
                .collect();
            if items.iter().all(|v| v.done()) {
                let failed: Vec<String> = items
                    .iter()
                    .filter(|v| v.phase == FAILED)
                    .map(|v| format!("{}: {}", v.pvc, v.error.as_deref().unwrap_or("failed")))
                    .collect();
                let outcome = if failed.is_empty() {
                    Ok(())
                } else {
                    Err(failed.join("; "))
                };
                self.release(w, outcome).await;
            }
        }
        Ok(restored)
    }

    /// The claim's volume, when the claim is bound to it and the volume
    /// says so too: a claim created naming someone else's volume (which
    /// the API server accepts, and which stays unbound) must never get
    /// that volume overwritten.
    async fn binding(&self, namespace: &str, pvc: &str) -> Result<Binding> {
        let client = self.cluster.client().clone();
        let Some(claim) = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
            .get_opt(pvc)
            .await
            .map_err(|e| Error::kube(format!("get PVC {namespace}/{pvc}"), e))?
        else {
            return Ok(Binding::NotYet);
        };
        let bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        let Some(pv_name) = claim
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .filter(|v| !v.is_empty() && bound)
        else {
            return Ok(Binding::NotYet);
        };
        let Some(pv) = Api::<PersistentVolume>::all(client)
            .get_opt(&pv_name)
            .await
            .map_err(|e| Error::kube(format!("get PV {pv_name}"), e))?
        else {
            return Ok(Binding::NotYet);
        };
        let cref = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
        let matches = cref.is_some_and(|r| {
            r.namespace.as_deref() == Some(namespace)
                && r.name.as_deref() == Some(pvc)
                && (r.uid.is_none() || claim.metadata.uid.is_none() || r.uid == claim.metadata.uid)
        });
        if !matches {
            let owner = cref
                .map(|r| {
                    format!(
                        "{}/{}",
                        r.namespace.as_deref().unwrap_or("?"),
                        r.name.as_deref().unwrap_or("?")
                    )
                })
                .unwrap_or_else(|| "no claim".into());
            return Ok(Binding::Invalid(format!(
                "PVC {namespace}/{pvc} names PV {pv_name}, which belongs to {owner}: not written"
            )));
        }
        Ok(Binding::Bound(pv_name, Box::new(pv)))
    }

    /// Takes the item for this node: it is new, or this node had it when
    /// it stopped (an agent restart). False when another node has it or
    /// it is settled.
    async fn claim_item(
        &self,
        ns: &str,
        restore: &str,
        target_ns: &str,
        pvc: &str,
    ) -> Result<bool> {
        let me = self.node().to_string();
        let running = self.restoring.lock().await.contains(&(
            restore.to_string(),
            target_ns.to_string(),
            pvc.to_string(),
        ));
        if running {
            return Ok(false);
        }
        let mut took = false;
        record::update(self.cluster.client(), ns, restore, |rec| {
            took = false;
            let Some(item) = rec.item_mut(target_ns, pvc) else {
                return false;
            };
            let mine = item.phase == IN_PROGRESS && item.node.as_deref() == Some(me.as_str());
            if item.phase != NEW && !mine {
                return false;
            }
            item.phase = IN_PROGRESS.into();
            item.node = Some(me.clone());
            item.started = Some(Utc::now());
            took = true;
            true
        })
        .await?;
        Ok(took)
    }

    async fn restore_item(&self, ns: &str, w: &Waiting, pvc: &str, binding: Binding) {
        let key = (w.restore.clone(), w.namespace.clone(), pvc.to_string());
        self.restoring.lock().await.insert(key.clone());
        let subject = Subject::Pod {
            namespace: &w.namespace,
            name: &w.name,
            uid: &w.uid,
        };
        self.cluster
            .event(
                subject.clone(),
                false,
                "RestoreStarted",
                &format!(
                    "restoring PVC {pvc} (restore {}) on node {}",
                    w.restore,
                    self.node()
                ),
            )
            .await;
        let start = Instant::now();
        let result = self.fill_volume(ns, w, pvc, binding).await;
        let secs = start.elapsed().as_secs_f64();
        let (phase, error, files, bytes) = match &result {
            Ok(s) => (COMPLETED, None, s.files, s.bytes),
            Err(e) => (FAILED, Some(e.to_string()), 0, 0),
        };
        match &result {
            Ok(s) => {
                info!(pvc, namespace = %w.namespace, files = s.files, bytes = s.bytes, "volume restored");
                self.cluster
                    .event(
                        subject,
                        false,
                        "RestoreCompleted",
                        &format!(
                            "PVC {pvc}: {} files, {} bytes restored in {secs:.1}s",
                            s.files, s.bytes
                        ),
                    )
                    .await;
            }
            Err(e) => {
                warn!(pvc, namespace = %w.namespace, error = %e, "volume restore failed");
                self.cluster
                    .event(subject, true, "RestoreFailed", &format!("PVC {pvc}: {e}"))
                    .await;
            }
        }
        let me = self.node().to_string();
        let r = record::update(self.cluster.client(), ns, &w.restore, |rec| {
            let Some(item) = rec.item_mut(&w.namespace, pvc) else {
                return false;
            };
            item.phase = phase.into();
            item.error = error.clone();
            item.files = files;
            item.bytes = bytes;
            item.duration_secs = secs;
            item.node = Some(me.clone());
            item.finished = Some(Utc::now());
            true
        })
        .await;
        if let Err(e) = r {
            warn!(error = %e, "could not record a volume restore");
        }
        self.restoring.lock().await.remove(&key);
    }

    /// Restores the item's snapshot into the pod's volume of `pvc`.
    async fn fill_volume(
        &self,
        ns: &str,
        w: &Waiting,
        pvc: &str,
        binding: Binding,
    ) -> Result<marmoset_storage::RestoreSummary> {
        let client = self.cluster.client().clone();
        let rec = record::get(&client, ns, &w.restore)
            .await?
            .ok_or_else(|| Error::Restore(format!("restore {} vanished", w.restore)))?;
        let item = rec
            .volumes
            .iter()
            .find(|v| v.namespace == w.namespace && v.pvc == pvc)
            .cloned()
            .ok_or_else(|| Error::Restore(format!("no item for {pvc}")))?;
        let (pv_name, pv) = match binding {
            Binding::Bound(name, pv) => (name, pv),
            Binding::Invalid(why) => return Err(Error::Restore(why)),
            Binding::NotYet => {
                return Err(Error::Restore(format!(
                    "PVC {}/{pvc} is not bound",
                    w.namespace
                )))
            }
        };
        let path = host_path(&self.cfg, &w.uid, &pv_name, &pv).map_err(Error::Restore)?;
        let path: PathBuf = path.components().collect();
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::Restore(format!(
                    "{} is not a directory (a link is not followed)",
                    path.display()
                )))
            }
            Err(e) => {
                return Err(Error::Restore(format!(
                "volume not found at {} ({e}); is the kubelet directory mounted into the agent?",
                path.display()
            )))
            }
        }
        let expected_source = format!("{}/{}", item.source_namespace, item.pvc);
        let snapshot = item.snapshot.clone();
        let progress = Arc::new(RestoreProgress::default());
        let p = progress.clone();
        let share = self.share_repo().await;
        let mut work = self.on_repo(share, move |repo| {
            // Other nodes' agents wrote index files since this one started.
            repo.sync_index()?;
            let (_, snap) = repo.resolve_snapshot(&snapshot)?;
            if snap.source != expected_source {
                return Err(marmoset_storage::Error::InvalidArgument(format!(
                    "snapshot {snapshot} is of {}, not of {expected_source}",
                    snap.source
                )));
            }
            let opts = DataRestoreOptions {
                delete: true,
                overwrite: Overwrite::Always,
                ..Default::default()
            };
            marmoset_storage::restore(repo, &snap, "", &path, &opts, &p)
        });
        // A large volume takes a while: its bytes so far go into the
        // record (`k8s restore describe`) every PROGRESS_EVERY.
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        tick.tick().await;
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                _ = tick.tick() => {
                    let (files, bytes) = (
                        progress.files_done.load(Ordering::Relaxed),
                        progress.bytes_written.load(Ordering::Relaxed),
                    );
                    let r = record::update(self.cluster.client(), ns, &w.restore, |rec| {
                        match rec.item_mut(&w.namespace, pvc) {
                            Some(item) if item.phase == IN_PROGRESS => {
                                item.files = files;
                                item.bytes = bytes;
                                true
                            }
                            _ => false,
                        }
                    })
                    .await;
                    if let Err(e) = r {
                        warn!(error = %e, "could not record restore progress");
                    }
                }
            }
        };
        let summary = joined(result)?;
        if summary.files_failed > 0 || !summary.errors.is_empty() {
            let first = summary
                .errors
                .first()
                .map(|e| format!("{}: {}", e.path, e.error))
                .unwrap_or_default();
            return Err(Error::Restore(format!(
                "{} files could not be restored ({first})",
                summary.files_failed.max(summary.errors.len() as u64)
            )));
        }
        Ok(summary)
    }

    /// Lets the pod start (`done`) or stops it with the reason (`failed`).
    async fn release(&self, w: &Waiting, outcome: std::result::Result<(), String>) {
        let r = match &outcome {
            Ok(()) => write_marker(&w.marker_dir, DONE_FILE, "restored\n"),
            Err(why) => write_marker(&w.marker_dir, FAILED_FILE, &format!("{why}\n")),
        };
        if let Err(e) = r {
            warn!(error = %e, pod = %w.name, "could not release a waiting pod");
            return;
        }
        let subject = Subject::Pod {
            namespace: &w.namespace,
            name: &w.name,
            uid: &w.uid,
        };
        match outcome {
            Ok(()) => {
                self.cluster
                    .event(
                        subject,
                        false,
                        "RestoreReleased",
                        "restored volumes are in place; the pod starts",
                    )
                    .await
            }
            Err(why) => {
                self.cluster
                    .event(
                        subject,
                        true,
                        "RestoreHeld",
                        &format!("the pod is held: {why}"),
                    )
                    .await
            }
        }
    }
}

/// Restores this process is doing now (restore, namespace, claim).
pub(crate) type Restoring = tokio::sync::Mutex<HashSet<(String, String, String)>>;
