//! What a `k8s restore` creates, decided from the set's saved manifests
//! alone (pure functions, tested without a cluster): which objects pass
//! the filters, how each is cleaned and renamed into its target
//! namespace, the order of creation, and which PVCs get their data from a
//! volume snapshot (and which pods wait for it).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use crate::objects::ResourceType;
use crate::restore::{
    RestoreOptions, HELPER_POD_PREFIX, RESTORE_ANNOTATION, SNAPSHOT_ANNOTATION, WAIT_CONTAINER,
    WAIT_DIR, WAIT_VOLUME,
};

/// One saved object with its type.
#[derive(Debug, Clone)]
pub struct Saved {
    pub rt: ResourceType,
    pub obj: Value,
}

impl Saved {
    pub fn name(&self) -> &str {
        self.obj["metadata"]["name"].as_str().unwrap_or("")
    }
    pub fn namespace(&self) -> Option<&str> {
        self.obj["metadata"]["namespace"].as_str()
    }
    fn labels(&self) -> BTreeMap<String, String> {
        serde_json::from_value(self.obj["metadata"]["labels"].clone()).unwrap_or_default()
    }
}

/// A volume of the set: its source claim and snapshot.
#[derive(Debug, Clone)]
pub struct SetVolumeRef {
    pub namespace: String,
    pub pvc: String,
    pub snapshot: String,
}

/// One object to create.
#[derive(Debug, Clone)]
pub struct ToCreate {
    pub rt: ResourceType,
    /// Target namespace (None: cluster-scoped).
    pub namespace: Option<String>,
    pub name: String,
    pub obj: Value,
}

/// A PVC whose data comes from a volume snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRestore {
    pub source_namespace: String,
    pub namespace: String,
    pub pvc: String,
    pub snapshot: String,
    /// No restored workload mounts it: a helper pod does.
    pub helper_pod: Option<String>,
}

#[derive(Debug, Default)]
pub struct Plan {
    pub objects: Vec<ToCreate>,
    pub volumes: Vec<VolumeRestore>,
    /// Objects left out on purpose, with why.
    pub skipped: Vec<String>,
}

/// Creation order: what others refer to first, workloads last.
const ORDER: &[&str] = &[
    "namespaces",
    "storageclasses.storage.k8s.io",
    "persistentvolumes",
    "persistentvolumeclaims",
    "serviceaccounts",
    "secrets",
    "configmaps",
    "limitranges",
    "resourcequotas",
    "roles.rbac.authorization.k8s.io",
    "rolebindings.rbac.authorization.k8s.io",
    "services",
    "networkpolicies.networking.k8s.io",
    "ingresses.networking.k8s.io",
    "poddisruptionbudgets.policy",
];
/// Created after everything else, in this order.
const WORKLOADS: &[&str] = &[
    "pods",
    "replicasets.apps",
    "deployments.apps",
    "statefulsets.apps",
    "daemonsets.apps",
    "jobs.batch",
    "cronjobs.batch",
];

fn rank(key: &str) -> (u8, usize) {
    if let Some(i) = ORDER.iter().position(|k| *k == key) {
        (0, i)
    } else if let Some(i) = WORKLOADS.iter().position(|k| *k == key) {
        (2, i)
    } else {
        (1, 0)
    }
}

/// Whether `--include-resources`/`--exclude-resources` entry `want` names
/// this type: its plural (`deployments`), `plural.group`, or its kind.
pub(crate) fn names_type(want: &str, rt: &ResourceType) -> bool {
    let w = want.trim().to_ascii_lowercase();
    w == rt.plural || w == rt.key() || w == rt.kind.to_ascii_lowercase() || w == "*"
}

/// A label selector of equality terms: `app=x,tier!=db,team,!legacy`.
#[derive(Debug, Clone, Default)]
pub struct Selector(Vec<(String, Option<String>, bool)>);

impl Selector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let term = if let Some((k, v)) = t.split_once("!=") {
                (k.trim().to_string(), Some(v.trim().to_string()), false)
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                (k.trim().to_string(), Some(v.trim().to_string()), true)
            } else if let Some(k) = t.strip_prefix('!') {
                (k.trim().to_string(), None, false)
            } else {
                (t.to_string(), None, true)
            };
            if term.0.is_empty() || term.0.contains([' ', '(', ')']) {
                let short: String = t.chars().take(60).collect();
                return Err(format!(
                    "--selector: term {short:?} is not key=value, key!=value, key or !key"
                ));
            }
            terms.push(term);
        }
        Ok(Self(terms))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, v, eq)| match v {
            Some(v) => (labels.get(k) == Some(v)) == *eq,
            None => labels.contains_key(k) == *eq,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Auto-created in every namespace, or by the API itself: never restored.
fn generated(s: &Saved) -> Option<&'static str> {
    match s.rt.key().as_str() {
        "configmaps" if s.name() == "kube-root-ca.crt" => {
            Some("created by Kubernetes in every namespace")
        }
        "secrets" if s.obj["type"] == "kubernetes.io/service-account-token" => {
            Some("a service account token (Kubernetes issues a new one)")
        }
        "serviceaccounts" if s.name() == "default" => {
            Some("created by Kubernetes in every namespace")
        }
        _ => None,
    }
}

/// Removes what the API server owns and what cannot be created again.
pub fn clean_metadata(obj: &mut Value) {
    if let Some(m) = obj["metadata"].as_object_mut() {
        for k in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "generation",
            "managedFields",
            "selfLink",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "ownerReferences",
        ] {
            m.remove(k);
        }
    }
    if let Some(o) = obj.as_object_mut() {
        o.remove("status");
    }
}

fn remove_annotations(obj: &mut Value, keys: &[&str]) {
    if let Some(a) = obj["metadata"]["annotations"].as_object_mut() {
        for k in keys {
            a.remove(*k);
        }
    }
}

fn annotate(obj: &mut Value, key: &str, value: &str) {
    if !obj["metadata"]["annotations"].is_object() {
        obj["metadata"]["annotations"] = json!({});
    }
    obj["metadata"]["annotations"][key] = json!(value);
}

/// The cleaning of one object for its kind (metadata is done already).
fn clean_kind(key: &str, obj: &mut Value, target_ns: Option<&str>) {
    match key {
        "services" => {
            let spec = &mut obj["spec"];
            let headless = spec["clusterIP"] == "None";
            if let Some(s) = spec.as_object_mut() {
                if !headless {
                    s.remove("clusterIP");
                    s.remove("clusterIPs");
                }
                s.remove("healthCheckNodePort");
            }
            if let Some(ports) = spec["ports"].as_array_mut() {
                for p in ports {
                    if let Some(p) = p.as_object_mut() {
                        p.remove("nodePort");
                    }
                }
            }
        }
        "persistentvolumes" => {
            if let Some(c) = obj["spec"]["claimRef"].as_object_mut() {
                c.remove("uid");
                c.remove("resourceVersion");
                if let Some(ns) = target_ns {
                    c.insert("namespace".into(), json!(ns));
                }
            }
        }
        "namespaces" => {
            if let Some(s) = obj["spec"].as_object_mut() {
                s.remove("finalizers");
            }
        }
        "pods" => clean_pod_spec(&mut obj["spec"], true),
        "jobs.batch" => clean_job(obj),
        _ => {}
    }
}

/// A pod's node and its projected service-account token are the old
/// cluster's: the scheduler and the API server assign new ones.
fn clean_pod_spec(spec: &mut Value, bare_pod: bool) {
    let Some(s) = spec.as_object_mut() else {
        return;
    };
    if bare_pod {
        s.remove("nodeName");
    }
    let tokens: BTreeSet<String> = s
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .filter(|n| n.starts_with("kube-api-access-"))
        .map(String::from)
        .collect();
    if tokens.is_empty() {
        return;
    }
    if let Some(vols) = s.get_mut("volumes").and_then(Value::as_array_mut) {
        vols.retain(|v| !v["name"].as_str().is_some_and(|n| tokens.contains(n)));
    }
    for list in ["containers", "initContainers"] {
        for c in s
            .get_mut(list)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(m) = c["volumeMounts"].as_array_mut() {
                m.retain(|v| !v["name"].as_str().is_some_and(|n| tokens.contains(n)));
            }
        }
    }
}

/// A Job's selector and its template's controller labels name the old
/// Job's uid; the API server sets new ones.
fn clean_job(obj: &mut Value) {
    if let Some(s) = obj["spec"].as_object_mut() {
        s.remove("selector");
        s.remove("manualSelector");
    }
    let labels = &mut obj["spec"]["template"]["metadata"]["labels"];
    if let Some(l) = labels.as_object_mut() {
        for k in [
            "controller-uid",
            "batch.kubernetes.io/controller-uid",
            "job-name",
            "batch.kubernetes.io/job-name",
        ] {
            l.remove(k);
        }
    }
}

/// The pod template of a workload, if it has one.
fn pod_template_mut<'a>(key: &str, obj: &'a mut Value) -> Option<&'a mut Value> {
    match key {
        "pods" => Some(obj),
        "deployments.apps" | "statefulsets.apps" | "daemonsets.apps" | "replicasets.apps"
        | "jobs.batch" => Some(&mut obj["spec"]["template"]),
        "cronjobs.batch" => Some(&mut obj["spec"]["jobTemplate"]["spec"]["template"]),
        _ => None,
    }
}

/// Claims a pod template reads: its PVC volumes, and for a StatefulSet
/// the claims its volumeClaimTemplates make (`<template>-<sts>-<n>`),
/// matched against `restored` (claim → snapshot). Returns the pod
/// volume names to wait for.
fn waited_volumes(
    key: &str,
    obj: &Value,
    template: &Value,
    restored: &BTreeSet<String>,
) -> (Vec<String>, BTreeSet<String>) {
    let mut names = Vec::new();
    let mut claims = BTreeSet::new();
    for v in template["spec"]["volumes"].as_array().into_iter().flatten() {
        if let (Some(n), Some(c)) = (
            v["name"].as_str(),
            v["persistentVolumeClaim"]["claimName"].as_str(),
        ) {
            if restored.contains(c) {
                names.push(n.to_string());
                claims.insert(c.to_string());
            }
        }
    }
    if key == "statefulsets.apps" {
        let sts = obj["metadata"]["name"].as_str().unwrap_or("");
        for t in obj["spec"]["volumeClaimTemplates"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let Some(tn) = t["metadata"]["name"].as_str() else {
                continue;
            };
            let prefix = format!("{tn}-{sts}-");
            let mine: Vec<&String> = restored
                .iter()
                .filter(|c| {
                    c.strip_prefix(&prefix)
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                })
                .collect();
            if !mine.is_empty() {
                names.push(tn.to_string());
                claims.extend(mine.into_iter().cloned());
            }
        }
    }
    (names, claims)
}

/// The init container that holds a pod until its volumes are restored
/// (Velero's restore-wait): it waits for the agent's marker in a small
/// emptyDir of its own, so the restored volumes stay exactly as backed up.
pub fn wait_container(restore: &str, image: &str) -> Value {
    json!({
        "name": WAIT_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["marmoset", "k8s", "restore-wait", "--restore", restore, "--dir", WAIT_DIR],
        "volumeMounts": [{"name": WAIT_VOLUME, "mountPath": WAIT_DIR}],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}},
        "securityContext": {"runAsNonRoot": true, "runAsUser": 65534, "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
    })
}

/// Puts the wait container first among the template's init containers,
/// with its emptyDir, and marks the pods with the restore's name.
fn inject_wait(template: &mut Value, restore: &str, image: &str, volumes: &[String]) {
    if !template["metadata"].is_object() {
        template["metadata"] = json!({});
    }
    annotate(template, RESTORE_ANNOTATION, restore);
    annotate(template, "marmoset.dev/restore-volumes", &volumes.join(","));
    let spec = &mut template["spec"];
    if !spec["initContainers"].is_array() {
        spec["initContainers"] = json!([]);
    }
    if let Some(ic) = spec["initContainers"].as_array_mut() {
        ic.retain(|c| c["name"] != WAIT_CONTAINER);
        ic.insert(0, wait_container(restore, image));
    }
    if !spec["volumes"].is_array() {
        spec["volumes"] = json!([]);
    }
    if let Some(v) = spec["volumes"].as_array_mut() {
        v.retain(|c| c["name"] != WAIT_VOLUME);
        v.push(json!({"name": WAIT_VOLUME, "emptyDir": {"sizeLimit": "1Mi"}}));
    }
}

/// A pod that only mounts `pvc` and waits: the first consumer of a
/// WaitForFirstConsumer claim, so it binds on a node whose agent then
/// restores the data into it.
pub fn helper_pod(name: &str, namespace: &str, pvc: &str, restore: &str, image: &str) -> Value {
    let mut c = wait_container(restore, image);
    c["name"] = json!("restore");
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "marmoset", "app.kubernetes.io/component": "restore-helper",
                       "marmoset.dev/restore": restore},
            "annotations": {RESTORE_ANNOTATION: restore, "marmoset.dev/restore-volumes": "data"},
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [c],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": pvc}},
                {"name": WAIT_VOLUME, "emptyDir": {"sizeLimit": "1Mi"}},
            ],
        },
    })
}

/// Decides the whole restore.
pub fn plan(saved: &[Saved], volumes: &[SetVolumeRef], opts: &RestoreOptions) -> Plan {
    let mut out = Plan::default();
    let map_ns = |ns: &str| {
        opts.namespace_mappings
            .get(ns)
            .cloned()
            .unwrap_or_else(|| ns.to_string())
    };
    let ns_included = |ns: &str| {
        opts.include_namespaces.is_empty() || opts.include_namespaces.iter().any(|n| n == ns)
    };
    let type_included = |rt: &ResourceType| {
        (opts.include_resources.is_empty()
            || opts.include_resources.iter().any(|w| names_type(w, rt)))
            && !opts.exclude_resources.iter().any(|w| names_type(w, rt))
    };
    // Namespaced objects that pass the filters.
    let mut chosen: Vec<&Saved> = Vec::new();
    for s in saved.iter().filter(|s| s.rt.namespaced) {
        let ns = s.namespace().unwrap_or("");
        if !ns_included(ns) || !type_included(&s.rt) || !opts.selector.matches(&s.labels()) {
            continue;
        }
        if let Some(why) = generated(s) {
            out.skipped
                .push(format!("{} {ns}/{}: {why}", s.rt.key(), s.name()));
            continue;
        }
        chosen.push(s);
    }
    // Claims whose data comes from the set's snapshots.
    let snapshots: BTreeMap<(String, String), String> = volumes
        .iter()
        .map(|v| ((v.namespace.clone(), v.pvc.clone()), v.snapshot.clone()))
        .collect();
    let mut restored: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut restored_pvs = BTreeSet::new();
    for s in chosen
        .iter()
        .filter(|s| s.rt.key() == "persistentvolumeclaims")
    {
        let ns = s.namespace().unwrap_or("");
        if opts.restore_volumes && snapshots.contains_key(&(ns.to_string(), s.name().to_string())) {
            restored
                .entry(ns.to_string())
                .or_default()
                .insert(s.name().to_string());
            if let Some(pv) = s.obj["spec"]["volumeName"].as_str() {
                restored_pvs.insert(pv.to_string());
            }
        }
    }
    // Which restored claims a restored workload mounts.
    let mut mounted: BTreeSet<(String, String)> = BTreeSet::new();
    let mut namespaces_used = BTreeSet::new();
    for s in &chosen {
        let ns = s.namespace().unwrap_or("").to_string();
        let key = s.rt.key();
        let mut obj = s.obj.clone();
        clean_metadata(&mut obj);
        let target = map_ns(&ns);
        obj["metadata"]["namespace"] = json!(target);
        clean_kind(&key, &mut obj, None);
        if key == "rolebindings.rbac.authorization.k8s.io" {
            // Its service accounts moved with the namespace.
            for subj in obj["subjects"].as_array_mut().into_iter().flatten() {
                if let Some(sns) = subj["namespace"].as_str().map(String::from) {
                    if ns_included(&sns) {
                        subj["namespace"] = json!(map_ns(&sns));
                    }
                }
            }
        }
        let empty = BTreeSet::new();
        let claims = restored.get(&ns).unwrap_or(&empty);
        if key == "persistentvolumeclaims" {
            if claims.contains(s.name()) {
                // A new volume is provisioned (on the node where its first
                // pod runs) and filled from the snapshot.
                if let Some(spec) = obj["spec"].as_object_mut() {
                    spec.remove("volumeName");
                }
                remove_annotations(
                    &mut obj,
                    &[
                        "pv.kubernetes.io/bind-completed",
                        "pv.kubernetes.io/bound-by-controller",
                        "volume.kubernetes.io/selected-node",
                    ],
                );
                annotate(&mut obj, RESTORE_ANNOTATION, &opts.name);
                if let Some(id) = snapshots.get(&(ns.clone(), s.name().to_string())) {
                    annotate(&mut obj, SNAPSHOT_ANNOTATION, id);
                }
            } else if !saved.iter().any(|p| {
                p.rt.key() == "persistentvolumes"
                    && Some(p.name()) == s.obj["spec"]["volumeName"].as_str()
                    && type_included(&p.rt)
            }) {
                if let Some(spec) = obj["spec"].as_object_mut() {
                    spec.remove("volumeName");
                }
                remove_annotations(
                    &mut obj,
                    &[
                        "pv.kubernetes.io/bind-completed",
                        "pv.kubernetes.io/bound-by-controller",
                        "volume.kubernetes.io/selected-node",
                    ],
                );
                out.skipped.push(format!(
                    "persistentvolumeclaims {ns}/{}: no volume snapshot in the set; a new empty volume is provisioned",
                    s.name()
                ));
            }
        }
        if let Some(template) = pod_template_mut(&key, &mut obj) {
            if key != "pods" {
                clean_pod_spec(&mut template["spec"], false);
            }
            let (vols, cl) = waited_volumes(&key, &s.obj, template, claims);
            if !vols.is_empty() {
                inject_wait(template, &opts.name, &opts.image, &vols);
                mounted.extend(cl.into_iter().map(|c| (ns.clone(), c)));
            }
        }
        namespaces_used.insert(ns.clone());
        out.objects.push(ToCreate {
            rt: s.rt.clone(),
            namespace: Some(target),
            name: s.name().to_string(),
            obj,
        });
    }
    // Namespaces of everything restored (created even when filtered out,
    // as nothing else could be created).
    for ns in &namespaces_used {
        let target = map_ns(ns);
        let saved_ns = saved
            .iter()
            .find(|s| s.rt.key() == "namespaces" && s.name() == ns);
        let mut obj = match saved_ns {
            Some(s) => s.obj.clone(),
            None => json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        };
        clean_metadata(&mut obj);
        clean_kind("namespaces", &mut obj, None);
        obj["metadata"]["name"] = json!(target);
        if let Some(l) = obj["metadata"]["labels"].as_object_mut() {
            l.insert("kubernetes.io/metadata.name".into(), json!(target));
        }
        let rt = saved_ns.map(|s| s.rt.clone()).unwrap_or(ResourceType {
            api_version: "v1".into(),
            kind: "Namespace".into(),
            plural: "namespaces".into(),
            group: String::new(),
            namespaced: false,
        });
        out.objects.push(ToCreate {
            rt,
            namespace: None,
            name: target,
            obj,
        });
    }
    // PVs: only those whose claim is restored without a snapshot (static
    // volumes such as NFS); a claim restored from a snapshot gets a new one.
    for s in saved.iter().filter(|s| s.rt.key() == "persistentvolumes") {
        // Its claim: the restored PVC naming it, else its claimRef.
        let by_claim = chosen.iter().find(|c| {
            c.rt.key() == "persistentvolumeclaims"
                && c.obj["spec"]["volumeName"].as_str() == Some(s.name())
        });
        let (claim_ns, claim) = match by_claim {
            Some(c) => (c.namespace().unwrap_or(""), c.name()),
            None => (
                s.obj["spec"]["claimRef"]["namespace"]
                    .as_str()
                    .unwrap_or(""),
                s.obj["spec"]["claimRef"]["name"].as_str().unwrap_or(""),
            ),
        };
        if !type_included(&s.rt) || !namespaces_used.contains(claim_ns) {
            continue;
        }
        let claimed = by_claim.is_some();
        if restored_pvs.contains(s.name()) {
            out.skipped.push(format!(
                "persistentvolumes {}: not restored; its claim {claim_ns}/{claim} is restored into a new volume from its snapshot (or left alone if it exists)",
                s.name()
            ));
            continue;
        }
        if !claimed && !opts.selector.matches(&s.labels()) {
            continue;
        }
        let mut obj = s.obj.clone();
        clean_metadata(&mut obj);
        clean_kind("persistentvolumes", &mut obj, Some(&map_ns(claim_ns)));
        out.objects.push(ToCreate {
            rt: s.rt.clone(),
            namespace: None,
            name: s.name().to_string(),
            obj,
        });
    }
    out.objects.sort_by(|a, b| {
        rank(&a.rt.key())
            .cmp(&rank(&b.rt.key()))
            .then_with(|| a.rt.key().cmp(&b.rt.key()))
            .then_with(|| a.namespace.cmp(&b.namespace))
            .then_with(|| a.name.cmp(&b.name))
    });
    for (ns, claims) in &restored {
        for c in claims {
            let snapshot = snapshots
                .get(&(ns.clone(), c.clone()))
                .cloned()
                .unwrap_or_default();
            let helper_pod =
                (!mounted.contains(&(ns.clone(), c.clone()))).then(|| helper_name(&opts.name, c));
            out.volumes.push(VolumeRestore {
                source_namespace: ns.clone(),
                namespace: map_ns(ns),
                pvc: c.clone(),
                snapshot,
                helper_pod,
            });
        }
    }
    out
}

/// `marmoset-restore-<claim>-<hash>`, at most 63 characters.
fn helper_name(restore: &str, claim: &str) -> String {
    let h = blake3::hash(format!("{restore}/{claim}").as_bytes()).to_hex();
    let mut base: String = claim.chars().take(37).collect();
    while base.ends_with('-') || base.ends_with('.') {
        base.pop();
    }
    format!("{HELPER_POD_PREFIX}{base}-{}", &h[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(plural: &str, kind: &str, api_version: &str, namespaced: bool) -> ResourceType {
        ResourceType {
            api_version: api_version.into(),
            kind: kind.into(),
            plural: plural.into(),
            group: api_version
                .split_once('/')
                .map(|(g, _)| g.to_string())
                .unwrap_or_default(),
            namespaced,
        }
    }

    fn saved(plural: &str, kind: &str, av: &str, obj: Value) -> Saved {
        Saved {
            rt: rt(
                plural,
                kind,
                av,
                plural != "persistentvolumes" && plural != "namespaces",
            ),
            obj,
        }
    }

    fn opts() -> RestoreOptions {
        RestoreOptions {
            name: "r1".into(),
            restore_volumes: true,
            image: "img".into(),
            ..Default::default()
        }
    }

    #[test]
    fn selectors_parse_and_match_like_kubectl() {
        let s = Selector::parse("app=x, tier!=db,team,!legacy").unwrap_or_default();
        let l = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert!(s.matches(&l(&[("app", "x"), ("team", "a")])));
        assert!(!s.matches(&l(&[("app", "x"), ("team", "a"), ("tier", "db")])));
        assert!(!s.matches(&l(&[("app", "x")])));
        assert!(!s.matches(&l(&[("app", "x"), ("team", "a"), ("legacy", "")])));
        assert!(Selector::parse("a b").is_err());
        assert!(Selector::parse("").is_ok_and(|s| s.is_empty()));
    }

    #[test]
    fn objects_are_cleaned_mapped_and_ordered() {
        let objs = vec![
            saved(
                "deployments",
                "Deployment",
                "apps/v1",
                json!({"metadata": {"name": "app", "namespace": "a", "uid": "u1",
                "resourceVersion": "9", "ownerReferences": [{"kind": "X", "name": "y", "uid": "z"}]},
                "spec": {"template": {"spec": {"containers": [{"name": "c", "volumeMounts": [{"name": "kube-api-access-1"}]}],
                    "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}, {"name": "kube-api-access-1", "projected": {}}]}}},
                "status": {"replicas": 1}}),
            ),
            saved(
                "services",
                "Service",
                "v1",
                json!({"metadata": {"name": "svc", "namespace": "a"},
                "spec": {"clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.1"], "ports": [{"port": 80, "nodePort": 30001}]}}),
            ),
            saved(
                "services",
                "Service",
                "v1",
                json!({"metadata": {"name": "headless", "namespace": "a"},
                "spec": {"clusterIP": "None"}}),
            ),
            saved(
                "persistentvolumeclaims",
                "PersistentVolumeClaim",
                "v1",
                json!({"metadata": {"name": "data", "namespace": "a",
                "annotations": {"volume.kubernetes.io/selected-node": "n1"}}, "spec": {"volumeName": "pv-1"}}),
            ),
            saved(
                "persistentvolumeclaims",
                "PersistentVolumeClaim",
                "v1",
                json!({"metadata": {"name": "scratch", "namespace": "a"},
                "spec": {"volumeName": "pv-2"}}),
            ),
            saved(
                "jobs",
                "Job",
                "batch/v1",
                json!({"metadata": {"name": "once", "namespace": "a"},
                "spec": {"selector": {"matchLabels": {"controller-uid": "u"}},
                         "template": {"metadata": {"labels": {"controller-uid": "u", "job-name": "once", "app": "j"}}, "spec": {}}}}),
            ),
            saved(
                "pods",
                "Pod",
                "v1",
                json!({"metadata": {"name": "bare", "namespace": "a"}, "spec": {"nodeName": "n1", "containers": []}}),
            ),
            saved(
                "configmaps",
                "ConfigMap",
                "v1",
                json!({"metadata": {"name": "cfg", "namespace": "a"}}),
            ),
            saved(
                "configmaps",
                "ConfigMap",
                "v1",
                json!({"metadata": {"name": "other", "namespace": "b"}}),
            ),
        ];
        let vols = vec![SetVolumeRef {
            namespace: "a".into(),
            pvc: "data".into(),
            snapshot: "abc".into(),
        }];
        let mut o = opts();
        o.include_namespaces = vec!["a".into()];
        o.namespace_mappings = [("a".to_string(), "a2".to_string())].into();
        let p = plan(&objs, &vols, &o);
        let order: Vec<String> = p
            .objects
            .iter()
            .map(|o| format!("{} {}", o.rt.key(), o.name))
            .collect();
        assert_eq!(
            order,
            [
                "namespaces a2",
                "persistentvolumeclaims data",
                "persistentvolumeclaims scratch",
                "configmaps cfg",
                "services headless",
                "services svc",
                "pods bare",
                "deployments.apps app",
                "jobs.batch once",
            ]
        );
        assert!(p
            .objects
            .iter()
            .all(|o| o.rt.key() == "namespaces" || o.namespace.as_deref() == Some("a2")));
        let get = |name: &str| {
            p.objects
                .iter()
                .find(|o| o.name == name)
                .map(|o| o.obj.clone())
                .unwrap_or_default()
        };
        let dep = get("app");
        assert!(dep["metadata"]["uid"].is_null() && dep["metadata"]["resourceVersion"].is_null());
        assert!(dep["metadata"]["ownerReferences"].is_null() && dep["status"].is_null());
        let tpl = &dep["spec"]["template"];
        assert_eq!(tpl["spec"]["initContainers"][0]["name"], WAIT_CONTAINER);
        assert_eq!(tpl["metadata"]["annotations"][RESTORE_ANNOTATION], "r1");
        assert!(!tpl.to_string().contains("kube-api-access"));
        assert!(tpl["spec"]["volumes"].to_string().contains(WAIT_VOLUME));
        let svc = get("svc");
        assert!(
            svc["spec"]["clusterIP"].is_null() && svc["spec"]["ports"][0]["nodePort"].is_null()
        );
        assert_eq!(get("headless")["spec"]["clusterIP"], "None");
        let data = get("data");
        assert!(data["spec"]["volumeName"].is_null());
        assert!(data["metadata"]["annotations"]["volume.kubernetes.io/selected-node"].is_null());
        assert_eq!(data["metadata"]["annotations"][SNAPSHOT_ANNOTATION], "abc");
        // No snapshot and no saved PV: a new, empty volume, and said so.
        assert!(get("scratch")["spec"]["volumeName"].is_null());
        assert!(p
            .skipped
            .iter()
            .any(|s| s.contains("scratch") && s.contains("empty")));
        let job = get("once");
        assert!(job["spec"]["selector"].is_null());
        assert_eq!(
            job["spec"]["template"]["metadata"]["labels"],
            json!({"app": "j"})
        );
        assert!(get("bare")["spec"]["nodeName"].is_null());
        // The claim is mounted by the Deployment: no helper pod.
        assert_eq!(p.volumes.len(), 1);
        assert_eq!(p.volumes[0].namespace, "a2");
        assert!(p.volumes[0].helper_pod.is_none());
    }

    #[test]
    fn a_statefulsets_claims_are_found_by_template_name() {
        let sts = json!({"metadata": {"name": "web", "namespace": "a"},
            "spec": {"template": {"spec": {"containers": []}}, "volumeClaimTemplates": [{"metadata": {"name": "data"}}]}});
        let claims: BTreeSet<String> = ["data-web-0", "data-web-1", "data-webby-0", "data-web-x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (names, found) =
            waited_volumes("statefulsets.apps", &sts, &sts["spec"]["template"], &claims);
        assert_eq!(names, ["data"]);
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            ["data-web-0", "data-web-1"]
        );
        let long = helper_name("r", &"x".repeat(100));
        assert!(long.len() <= 63, "{long}");
    }

    #[test]
    fn role_binding_subjects_move_with_their_namespace() {
        let rb = Saved {
            rt: ResourceType {
                api_version: "rbac.authorization.k8s.io/v1".into(),
                kind: "RoleBinding".into(),
                plural: "rolebindings".into(),
                group: "rbac.authorization.k8s.io".into(),
                namespaced: true,
            },
            obj: json!({"metadata": {"name": "db-edit", "namespace": "shop"},
                "roleRef": {"kind": "ClusterRole", "name": "edit"},
                "subjects": [{"kind": "ServiceAccount", "name": "db", "namespace": "shop"},
                             {"kind": "ServiceAccount", "name": "ci", "namespace": "tools"}]}),
        };
        let mut o = opts();
        o.namespace_mappings = [("shop".to_string(), "rb".to_string())].into();
        o.include_namespaces = vec!["shop".into()];
        let p = plan(&[rb], &[], &o);
        let got = &p
            .objects
            .iter()
            .find(|x| x.name == "db-edit")
            .map(|x| x.obj.clone())
            .unwrap_or_default();
        assert_eq!(got["subjects"][0]["namespace"], "rb");
        assert_eq!(
            got["subjects"][1]["namespace"], "tools",
            "not restored: left as it was"
        );
    }
}
