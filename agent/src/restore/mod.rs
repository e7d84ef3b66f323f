//! `marmoset k8s restore`: a backup set back into the cluster, as
//! `velero restore create` does.
//!
//! The CLI side reads the set's saved manifests, decides what to create
//! (`plan`: filters, namespace mappings, cleaning, order), creates it
//! through the API (existing objects are left alone and reported), and
//! records the restore in a ConfigMap of the agent's namespace (`record`).
//! Restored PVCs are provisioned anew; every pod that mounts one waits in
//! an init container (`marmoset k8s restore-wait`) until the agent of its
//! node has restored the volume's snapshot into it with `--delete`
//! (`worker`). A PVC no restored workload mounts gets a helper pod, its
//! first consumer. `verify` is the weekly test restore.

pub mod apply;
pub mod plan;
pub mod record;
pub mod verify;
pub mod wait;
pub mod worker;

use std::collections::BTreeMap;
use std::path::Path;

use marmoset_storage::{BackupSet, Repository, RestoreOptions as DataRestoreOptions};

use crate::error::{Error, Result};
use crate::objects::{ResourceType, CLUSTER_DIR, INDEX_FILE};
use plan::{Saved, Selector};

/// On restored PVCs and pod templates: the restore they belong to.
pub const RESTORE_ANNOTATION: &str = "marmoset.dev/restore";
/// On restored PVCs: the snapshot their data comes from.
pub const SNAPSHOT_ANNOTATION: &str = "marmoset.dev/restore-snapshot";
/// The init container that holds a restored pod until its data is there.
pub const WAIT_CONTAINER: &str = "marmoset-restore-wait";
/// Its emptyDir, where the agent leaves the outcome (`done` or `failed`).
pub const WAIT_VOLUME: &str = "marmoset-restore-wait";
pub const WAIT_DIR: &str = "/marmoset-restore";
pub const HELPER_POD_PREFIX: &str = "marmoset-restore-";
/// Marker files in the wait volume.
pub const DONE_FILE: &str = "done";
pub const FAILED_FILE: &str = "failed";

/// What to restore and how (the CLI's flags).
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// The restore's name (`<set>-<time>`).
    pub name: String,
    pub include_namespaces: Vec<String>,
    /// Source namespace → target namespace.
    pub namespace_mappings: BTreeMap<String, String>,
    pub selector: Selector,
    /// The selector as given (for the record).
    pub selector_text: String,
    pub include_resources: Vec<String>,
    pub exclude_resources: Vec<String>,
    /// Fill restored PVCs from the set's volume snapshots.
    pub restore_volumes: bool,
    /// Image of the restore-wait container (the agent's).
    pub image: String,
}

/// Parses `a:b,c:d`.
pub fn parse_mappings(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = pair.split_once(':').ok_or_else(|| {
            Error::Restore(format!(
                "--namespace-mappings {s:?}: {pair:?} is not source:target"
            ))
        })?;
        let (a, b) = (a.trim(), b.trim());
        if !valid_dns_label(a) || !valid_dns_label(b) {
            return Err(Error::Restore(format!(
                "--namespace-mappings {s:?}: {pair:?}: namespaces are lowercase DNS labels"
            )));
        }
        if out.insert(a.to_string(), b.to_string()).is_some() {
            return Err(Error::Restore(format!(
                "--namespace-mappings {s:?}: {a} is mapped twice"
            )));
        }
    }
    Ok(out)
}

pub fn valid_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The set named `name`, as of now.
pub fn find_set(repo: &Repository, name: &str) -> Result<BackupSet> {
    let (sets, _) = marmoset_storage::sets(repo, chrono::Utc::now())?;
    let have: Vec<String> = sets.iter().rev().take(5).map(|s| s.name.clone()).collect();
    sets.into_iter().find(|s| s.name == name).ok_or_else(|| {
        Error::Restore(format!(
            "no backup set named {name:?} (newest: {}); see `marmoset sets`",
            if have.is_empty() {
                "none".to_string()
            } else {
                have.join(", ")
            }
        ))
    })
}

/// Reads the manifests of a set's objects snapshot.
pub fn read_objects(repo: &Repository, set: &BackupSet) -> Result<Vec<Saved>> {
    let snapshot = set
        .objects
        .as_ref()
        .and_then(|o| o.snapshot.clone())
        .ok_or_else(|| {
            let why = set
                .objects
                .as_ref()
                .map(|o| o.errors.join("; "))
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "no agent saved them".into());
            Error::Restore(format!(
                "backup set {} has no saved Kubernetes objects ({why})",
                set.name
            ))
        })?;
    let (_, snap) = repo.resolve_snapshot(&snapshot)?;
    let dir = tempfile::Builder::new()
        .prefix("marmoset-k8s-restore-")
        .tempdir()
        .map_err(|e| Error::Io {
            what: "create a temporary directory".into(),
            source: e,
        })?;
    let opts = DataRestoreOptions {
        no_owner: true,
        no_special: true,
        no_xattrs: true,
        ..Default::default()
    };
    let summary =
        marmoset_storage::restore(repo, &snap, "", dir.path(), &opts, &Default::default())?;
    if let Some(e) = summary.errors.first() {
        return Err(Error::Restore(format!(
            "objects snapshot {snapshot}: {} unreadable ({} …)",
            summary.errors.len(),
            e.path
        )));
    }
    load_dir(dir.path())
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io {
        what: format!("read {}", path.display()),
        source: e,
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Restore(format!("{}: not a manifest: {e}", path.display())))
}

/// Reads a directory laid out as `objects` writes it.
pub fn load_dir(dir: &Path) -> Result<Vec<Saved>> {
    let index: Vec<ResourceType> = serde_json::from_value(read_json(&dir.join(INDEX_FILE))?)
        .map_err(|e| Error::Restore(format!("{INDEX_FILE}: {e}")))?;
    let mut out = Vec::new();
    let list = |p: &Path| -> Result<Vec<std::path::PathBuf>> {
        match std::fs::read_dir(p) {
            Ok(rd) => {
                let mut v: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
                v.sort();
                Ok(v)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(Error::Io {
                what: format!("read {}", p.display()),
                source: e,
            }),
        }
    };
    for scope in list(dir)? {
        if !scope.is_dir() {
            continue;
        }
        let cluster = scope.file_name().is_some_and(|n| n == CLUSTER_DIR);
        for rt in index.iter().filter(|rt| rt.namespaced != cluster) {
            for file in list(&scope.join(rt.key()))? {
                out.push(Saved {
                    rt: rt.clone(),
                    obj: read_json(&file)?,
                });
            }
        }
    }
    Ok(out)
}

/// `<set>-<yyyymmddhhmmss>` (Velero names restores the same way).
pub fn restore_name(set: &str, now: chrono::DateTime<chrono::Utc>) -> String {
    // Object names are lowercase DNS labels; schedule names need not be.
    let mut base: String = set
        .chars()
        .take(40)
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    while base.ends_with('-') {
        base.pop();
    }
    format!("{base}-{}", now.format("%Y%m%d%H%M%S"))
}

/// Finds the set, reads its objects and decides the restore.
pub fn prepare(
    repo: &Repository,
    set: &str,
    opts: &RestoreOptions,
) -> Result<(BackupSet, plan::Plan)> {
    let set = find_set(repo, set)?;
    let saved = read_objects(repo, &set)?;
    validate(&set, &saved, opts)?;
    let volumes: Vec<plan::SetVolumeRef> = set
        .volumes
        .iter()
        .filter_map(|v| {
            Some(plan::SetVolumeRef {
                namespace: v.namespace.clone(),
                pvc: v.pvc.clone(),
                snapshot: v.snapshot.clone()?,
            })
        })
        .collect();
    let p = plan::plan(&saved, &volumes, opts);
    Ok((set, p))
}

/// Waits until every volume of the restore is settled (or `timeout`),
/// then deletes its helper pods. Returns the record as it ended.
pub async fn wait_for(
    client: &kube::Client,
    agent_ns: &str,
    name: &str,
    timeout: std::time::Duration,
    poll: std::time::Duration,
) -> Result<record::RestoreRecord> {
    let start = std::time::Instant::now();
    loop {
        let rec = record::get(client, agent_ns, name)
            .await?
            .ok_or_else(|| Error::Restore(format!("restore {name} is not recorded")))?;
        if rec.volumes.iter().all(|v| v.done()) {
            for v in &rec.volumes {
                if let Some(pod) = &v.helper_pod {
                    delete_pod(client, &v.namespace, pod).await?;
                }
            }
            return Ok(rec);
        }
        if start.elapsed() >= timeout {
            let waiting: Vec<String> = rec
                .volumes
                .iter()
                .filter(|v| !v.done())
                .map(|v| format!("{}/{} ({})", v.namespace, v.pvc, v.phase))
                .collect();
            return Err(Error::Restore(format!(
                "restore {name}: volumes not restored after {}s: {}; is an agent running where their pods are?",
                timeout.as_secs(),
                waiting.join(", ")
            )));
        }
        tokio::time::sleep(poll).await;
    }
}

async fn delete_pod(client: &kube::Client, ns: &str, name: &str) -> Result<()> {
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client.clone(), ns);
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(Error::kube(format!("delete helper pod {ns}/{name}"), e)),
    }
}

/// Deletes a namespace (everything in it goes with it).
pub async fn delete_namespace(client: &kube::Client, name: &str) -> Result<()> {
    let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client.clone());
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(Error::kube(format!("delete namespace {name}"), e)),
    }
}

/// The image of the agent DaemonSet in `agent_ns` (the restore-wait
/// container runs the same binary).
pub async fn agent_image(client: &kube::Client, agent_ns: &str) -> Result<Option<String>> {
    let api: kube::Api<k8s_openapi::api::apps::v1::DaemonSet> =
        kube::Api::namespaced(client.clone(), agent_ns);
    let list = api
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/name=marmoset"))
        .await
        .map_err(|e| Error::kube(format!("list DaemonSets in {agent_ns}"), e))?;
    Ok(list
        .items
        .iter()
        .filter_map(|d| {
            d.spec
                .as_ref()?
                .template
                .spec
                .as_ref()?
                .containers
                .first()?
                .image
                .clone()
        })
        .next())
}

pub async fn namespace_exists(client: &kube::Client, name: &str) -> Result<bool> {
    let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client.clone());
    api.get_opt(name)
        .await
        .map(|n| n.is_some())
        .map_err(|e| Error::kube(format!("get namespace {name}"), e))
}

/// Checks the options against the set: mapped namespaces are in it (and
/// included), no two namespaces land in one, and every resource type
/// named exists in it.
fn validate(set: &BackupSet, saved: &[Saved], opts: &RestoreOptions) -> Result<()> {
    let in_set: Vec<String> = match &set.objects {
        Some(o) => o.namespaces.clone(),
        None => Vec::new(),
    };
    for ns in &opts.include_namespaces {
        if !in_set.contains(ns) {
            return Err(Error::Restore(format!(
                "namespace {ns} is not in backup set {} (it has: {})",
                set.name,
                in_set.join(", ")
            )));
        }
    }
    let restored: Vec<&String> = if opts.include_namespaces.is_empty() {
        in_set.iter().collect()
    } else {
        opts.include_namespaces.iter().collect()
    };
    for src in opts.namespace_mappings.keys() {
        if !restored.contains(&src) {
            return Err(Error::Restore(format!(
                "--namespace-mappings names {src}, which this restore does not include (restored: {})",
                restored.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    let mut targets: BTreeMap<String, &String> = BTreeMap::new();
    for src in &restored {
        let target = opts
            .namespace_mappings
            .get(*src)
            .cloned()
            .unwrap_or_else(|| (*src).clone());
        if let Some(other) = targets.insert(target.clone(), src) {
            return Err(Error::Restore(format!(
                "namespaces {other} and {src} would both be restored into {target}"
            )));
        }
    }
    let types: std::collections::BTreeSet<&ResourceType> = saved.iter().map(|s| &s.rt).collect();
    for want in opts.include_resources.iter().chain(&opts.exclude_resources) {
        if want != "*" && !types.iter().any(|rt| plan::names_type(want, rt)) {
            let have: Vec<String> = types.iter().map(|rt| rt.key()).collect();
            return Err(Error::Restore(format!(
                "no resource type {want:?} in backup set {} (it has: {})",
                set.name,
                have.join(", ")
            )));
        }
    }
    Ok(())
}
