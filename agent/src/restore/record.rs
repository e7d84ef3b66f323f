//! A restore's record: a ConfigMap `marmoset-restore-<name>` in the
//! agent's namespace holding `restore.json`. The CLI writes it with the
//! objects' outcome and one item per volume; the agents update the items
//! they restore (read, change, write with the resourceVersion, again on a
//! conflict). `k8s restore describe` and `--wait` read it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::core::ObjectMeta;
use kube::Client;
use serde::{Deserialize, Serialize};

use crate::error::{is_conflict, Error, Result};

pub const RECORD_PREFIX: &str = "marmoset-restore-";
pub const RECORD_KEY: &str = "restore.json";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
pub const COMPONENT: &str = "restore";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreRecord {
    pub name: String,
    pub set: String,
    pub created: DateTime<Utc>,
    #[serde(default)]
    pub include_namespaces: Vec<String>,
    #[serde(default)]
    pub namespace_mappings: BTreeMap<String, String>,
    #[serde(default)]
    pub selector: String,
    #[serde(default)]
    pub include_resources: Vec<String>,
    #[serde(default)]
    pub exclude_resources: Vec<String>,
    /// Objects created, as `<resource> <namespace>/<name>`.
    #[serde(default)]
    pub created_objects: Vec<String>,
    /// Objects that already existed: left alone, never overwritten.
    #[serde(default)]
    pub existing: Vec<String>,
    /// Objects left out on purpose, with why.
    #[serde(default)]
    pub skipped: Vec<String>,
    /// Objects the API refused, with its answer.
    #[serde(default)]
    pub failed: Vec<String>,
    #[serde(default)]
    pub volumes: Vec<VolumeItem>,
}

/// One PVC filled from a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeItem {
    /// Target namespace and claim.
    pub namespace: String,
    pub pvc: String,
    pub source_namespace: String,
    pub snapshot: String,
    #[serde(default)]
    pub helper_pod: Option<String>,
    /// `New`, `InProgress`, `Completed`, `Failed` or `Skipped`.
    pub phase: String,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub files: u64,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub duration_secs: f64,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub started: Option<DateTime<Utc>>,
    #[serde(default)]
    pub finished: Option<DateTime<Utc>>,
}

pub const NEW: &str = "New";
pub const IN_PROGRESS: &str = "InProgress";
pub const COMPLETED: &str = "Completed";
pub const FAILED: &str = "Failed";
pub const SKIPPED: &str = "Skipped";

impl VolumeItem {
    pub fn done(&self) -> bool {
        matches!(self.phase.as_str(), COMPLETED | FAILED | SKIPPED)
    }
}

impl RestoreRecord {
    /// `InProgress` while a volume waits, then `Completed`, or
    /// `PartiallyFailed` when a volume or an object failed.
    pub fn phase(&self) -> &'static str {
        if self.volumes.iter().any(|v| !v.done()) {
            "InProgress"
        } else if self.failed.is_empty() && self.volumes.iter().all(|v| v.phase != FAILED) {
            "Completed"
        } else {
            "PartiallyFailed"
        }
    }

    pub fn item_mut(&mut self, namespace: &str, pvc: &str) -> Option<&mut VolumeItem> {
        self.volumes
            .iter_mut()
            .find(|v| v.namespace == namespace && v.pvc == pvc)
    }
}

fn api(client: &Client, ns: &str) -> Api<ConfigMap> {
    Api::namespaced(client.clone(), ns)
}

fn decode(cm: &ConfigMap) -> Result<RestoreRecord> {
    let name = cm.metadata.name.clone().unwrap_or_default();
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(RECORD_KEY))
        .ok_or_else(|| Error::Restore(format!("ConfigMap {name} has no {RECORD_KEY}")))?;
    serde_json::from_str(text)
        .map_err(|e| Error::Restore(format!("ConfigMap {name}: unreadable record: {e}")))
}

fn encode(rec: &RestoreRecord, cm: &mut ConfigMap) {
    let text = serde_json::to_string_pretty(rec).unwrap_or_default();
    cm.data
        .get_or_insert_with(Default::default)
        .insert(RECORD_KEY.into(), text);
}

pub async fn create(client: &Client, ns: &str, rec: &RestoreRecord) -> Result<()> {
    let mut cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(format!("{RECORD_PREFIX}{}", rec.name)),
            namespace: Some(ns.into()),
            labels: Some(
                [
                    ("app.kubernetes.io/name".to_string(), "marmoset".to_string()),
                    (COMPONENT_LABEL.to_string(), COMPONENT.to_string()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        ..Default::default()
    };
    encode(rec, &mut cm);
    match api(client, ns).create(&PostParams::default(), &cm).await {
        Ok(_) => Ok(()),
        Err(e) if is_conflict(&e) => Err(Error::RestoreExists(rec.name.clone())),
        Err(e) => Err(Error::kube(
            format!("create restore record {}", rec.name),
            e,
        )),
    }
}

pub async fn get(client: &Client, ns: &str, name: &str) -> Result<Option<RestoreRecord>> {
    let cm = api(client, ns)
        .get_opt(&format!("{RECORD_PREFIX}{name}"))
        .await
        .map_err(|e| Error::kube(format!("get restore {name}"), e))?;
    cm.as_ref().map(decode).transpose()
}

/// Every restore recorded, oldest first; unreadable records are skipped.
pub async fn list(client: &Client, ns: &str) -> Result<Vec<RestoreRecord>> {
    let cms = api(client, ns)
        .list(&ListParams::default().labels(&format!("{COMPONENT_LABEL}={COMPONENT}")))
        .await
        .map_err(|e| Error::kube("list restores", e))?;
    let mut out: Vec<RestoreRecord> = cms.items.iter().filter_map(|c| decode(c).ok()).collect();
    out.sort_by(|a, b| a.created.cmp(&b.created).then(a.name.cmp(&b.name)));
    Ok(out)
}

/// Applies `f` to the stored record and writes it back; `f` returns
/// false to write nothing. Retried on a conflict with another writer.
/// Returns the record as written (or as read when `f` declined).
pub async fn update(
    client: &Client,
    ns: &str,
    name: &str,
    mut f: impl FnMut(&mut RestoreRecord) -> bool,
) -> Result<Option<RestoreRecord>> {
    let api = api(client, ns);
    let cm_name = format!("{RECORD_PREFIX}{name}");
    for _ in 0..20 {
        let Some(mut cm) = api
            .get_opt(&cm_name)
            .await
            .map_err(|e| Error::kube(format!("get restore {name}"), e))?
        else {
            return Ok(None);
        };
        let mut rec = decode(&cm)?;
        if !f(&mut rec) {
            return Ok(Some(rec));
        }
        encode(&rec, &mut cm);
        match api.replace(&cm_name, &PostParams::default(), &cm).await {
            Ok(_) => return Ok(Some(rec)),
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(Error::kube(format!("update restore {name}"), e)),
        }
    }
    Err(Error::Restore(format!(
        "restore {name}: too many concurrent updates of its record"
    )))
}

pub async fn delete(client: &Client, ns: &str, name: &str) -> Result<()> {
    match api(client, ns)
        .delete(&format!("{RECORD_PREFIX}{name}"), &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(Error::kube(format!("delete restore {name}"), e)),
    }
}

/// `base`, or `base-2`, `base-3`… when a restore of that name exists (two
/// restores of one set within a second).
pub async fn free_name(client: &Client, ns: &str, base: &str) -> Result<String> {
    for n in 1..100 {
        let name = if n == 1 {
            base.to_string()
        } else {
            format!("{base}-{n}")
        };
        if get(client, ns, &name).await?.is_none() {
            return Ok(name);
        }
    }
    Err(Error::Restore(format!("too many restores named {base}-…")))
}
