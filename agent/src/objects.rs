//! The Kubernetes objects of a backup set: every namespaced resource type
//! the API serves (discovered, not a fixed list) in the included
//! namespaces, the Namespace objects themselves and the PersistentVolumes
//! bound to their claims, saved as a snapshot of JSON manifests exactly as
//! the API returned them. `k8s restore` cleans them on the way back.
//!
//! Left out, as Velero does: Events, Endpoints and EndpointSlices,
//! ControllerRevisions and Leases (runtime state), and every object owned
//! by a controller (a Deployment's ReplicaSets and Pods, a CronJob's Jobs,
//! service-account tokens): restoring the owner recreates them.
//!
//! Layout of the snapshot (`docs/FORMAT.md`):
//! `<namespace>/<resource>[.<group>]/<name>.json` for namespaced objects,
//! `_cluster/namespaces/<name>.json` and
//! `_cluster/persistentvolumes/<name>.json`, and `_index.json` describing
//! each resource type saved (apiVersion, kind, plural, namespaced).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use kube::api::{Api, DynamicObject, ListParams};
use kube::core::TypeMeta;
use kube::discovery::{verbs, ApiResource, Discovery, Scope};
use kube::Client;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Snapshot source name of a set's objects.
pub const OBJECTS_SOURCE: &str = "kubernetes";
/// The directory of cluster-scoped objects (no namespace can be named so).
pub const CLUSTER_DIR: &str = "_cluster";
pub const INDEX_FILE: &str = "_index.json";

/// Resource types never saved (`<plural>` or `<plural>.<group>`).
pub const ALWAYS_EXCLUDED: &[&str] = &[
    "events",
    "events.events.k8s.io",
    "endpoints",
    "endpointslices.discovery.k8s.io",
    "controllerrevisions.apps",
    "leases.coordination.k8s.io",
    "pods.metrics.k8s.io",
];

/// One resource type in `_index.json`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceType {
    pub api_version: String,
    pub kind: String,
    pub plural: String,
    pub group: String,
    pub namespaced: bool,
}

impl ResourceType {
    /// `deployments.apps`, `configmaps`: the name used in the snapshot's
    /// paths and in `--include-resources`.
    pub fn key(&self) -> String {
        resource_key(&self.plural, &self.group)
    }

    pub fn api_resource(&self) -> ApiResource {
        let (group, version) = match self.api_version.split_once('/') {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (String::new(), self.api_version.clone()),
        };
        ApiResource {
            group,
            version,
            api_version: self.api_version.clone(),
            kind: self.kind.clone(),
            plural: self.plural.clone(),
        }
    }
}

pub fn resource_key(plural: &str, group: &str) -> String {
    if group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{group}")
    }
}

/// The objects of one set, ready to be written out.
#[derive(Debug, Default)]
pub struct Collected {
    /// Relative path → manifest.
    pub files: BTreeMap<String, Value>,
    pub types: BTreeSet<ResourceType>,
    /// Resource types that could not be listed (the rest are saved).
    pub errors: Vec<String>,
}

impl Collected {
    pub fn count(&self) -> u64 {
        self.files.len() as u64
    }

    fn add(&mut self, rt: &ResourceType, namespace: Option<&str>, obj: DynamicObject) {
        let Some(name) = obj.metadata.name.clone() else {
            return;
        };
        let dir = namespace.unwrap_or(CLUSTER_DIR);
        let mut obj = obj;
        // A list's items carry no apiVersion and kind; a manifest must.
        obj.types = Some(TypeMeta {
            api_version: rt.api_version.clone(),
            kind: rt.kind.clone(),
        });
        match serde_json::to_value(&obj) {
            Ok(v) => {
                self.files
                    .insert(format!("{dir}/{}/{name}.json", rt.key()), v);
                self.types.insert(rt.clone());
            }
            Err(e) => self
                .errors
                .push(format!("{} {name}: cannot encode: {e}", rt.key())),
        }
    }

    /// Writes every manifest and `_index.json` below `dir` (private).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let io = |what: &Path, e: std::io::Error| Error::Io {
            what: format!("write {}", what.display()),
            source: e,
        };
        for (rel, v) in &self.files {
            let path = dir.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
            }
            let body = serde_json::to_vec_pretty(v).unwrap_or_default();
            std::fs::write(&path, body).map_err(|e| io(&path, e))?;
        }
        let index: Vec<&ResourceType> = self.types.iter().collect();
        let path = dir.join(INDEX_FILE);
        std::fs::write(&path, serde_json::to_vec_pretty(&index).unwrap_or_default())
            .map_err(|e| io(&path, e))
    }
}

/// Whether a controller owns the object (it is recreated from its owner).
pub fn controller_owned(meta: &kube::core::ObjectMeta) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true))
}

/// Lists the objects of `namespaces` (every namespaced type served, less
/// [`ALWAYS_EXCLUDED`] and `excluded`), their Namespace objects and the
/// PVs bound to their PVCs.
pub async fn collect(
    client: &Client,
    namespaces: &[String],
    excluded: &[String],
) -> Result<Collected> {
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .map_err(|e| Error::kube("discover the API's resource types", e))?;
    let mut out = Collected::default();
    let mut bound_pvs = BTreeSet::new();
    for group in discovery.groups() {
        for (ar, caps) in group.recommended_resources() {
            let rt = ResourceType {
                api_version: ar.api_version.clone(),
                kind: ar.kind.clone(),
                plural: ar.plural.clone(),
                group: ar.group.clone(),
                namespaced: caps.scope == Scope::Namespaced,
            };
            let key = rt.key();
            if !rt.namespaced
                || !caps.supports_operation(verbs::LIST)
                || !caps.supports_operation(verbs::CREATE)
                || ALWAYS_EXCLUDED.contains(&key.as_str())
                || excluded.iter().any(|x| x == &key || x == &rt.plural)
            {
                continue;
            }
            for ns in namespaces {
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
                match api.list(&ListParams::default()).await {
                    Ok(list) => {
                        for obj in list.items {
                            if controller_owned(&obj.metadata) {
                                continue;
                            }
                            if key == "persistentvolumeclaims" {
                                if let Some(pv) = obj.data["spec"]["volumeName"].as_str() {
                                    bound_pvs.insert(pv.to_string());
                                }
                            }
                            out.add(&rt, Some(ns), obj);
                        }
                    }
                    Err(e) => out.errors.push(format!("list {key} in {ns}: {e}")),
                }
            }
        }
    }
    let cluster = |plural: &str, kind: &str| ResourceType {
        api_version: "v1".into(),
        kind: kind.into(),
        plural: plural.into(),
        group: String::new(),
        namespaced: false,
    };
    let ns_type = cluster("namespaces", "Namespace");
    let pv_type = cluster("persistentvolumes", "PersistentVolume");
    for (rt, names) in [
        (&ns_type, namespaces.to_vec()),
        (&pv_type, bound_pvs.into_iter().collect()),
    ] {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &rt.api_resource());
        for name in names {
            match api.get_opt(&name).await {
                Ok(Some(obj)) => out.add(rt, None, obj),
                Ok(None) => {}
                Err(e) => out.errors.push(format!("get {} {name}: {e}", rt.plural)),
            }
        }
    }
    Ok(out)
}

/// The namespaces a set covers: the configured ones, or every namespace
/// the API lists when none is configured, less the excluded ones.
pub async fn namespaces(
    client: &Client,
    included: &[String],
    excluded: &[String],
) -> Result<Vec<String>> {
    let mut names: Vec<String> = if included.is_empty() {
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        api.list(&ListParams::default())
            .await
            .map_err(|e| Error::kube("list namespaces", e))?
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect()
    } else {
        included.to_vec()
    };
    names.retain(|n| !excluded.contains(n));
    names.sort();
    names.dedup();
    Ok(names)
}
