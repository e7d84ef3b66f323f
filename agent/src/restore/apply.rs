//! Creating a restore plan's objects through the API server, in order.
//! An object that exists is left alone and reported; nothing is ever
//! replaced or patched.

use kube::api::{Api, DynamicObject, PostParams};
use kube::Client;
use tracing::{info, warn};

use crate::error::{is_conflict, Error, Result};
use crate::restore::plan::{helper_pod, Plan, ToCreate};
use crate::restore::record::{self, RestoreRecord, VolumeItem, NEW, SKIPPED};
use crate::restore::RestoreOptions;

fn describe(o: &ToCreate) -> String {
    match &o.namespace {
        Some(ns) => format!("{} {ns}/{}", o.rt.key(), o.name),
        None => format!("{} {}", o.rt.key(), o.name),
    }
}

pub(crate) enum Created {
    Yes,
    Existed,
}

pub(crate) async fn create(client: &Client, o: &ToCreate) -> Result<Created> {
    let ar = o.rt.api_resource();
    let api: Api<DynamicObject> = match &o.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let obj: DynamicObject = serde_json::from_value(o.obj.clone())
        .map_err(|e| Error::Restore(format!("{}: not an object: {e}", describe(o))))?;
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => Ok(Created::Yes),
        Err(e) if is_conflict(&e) => Ok(Created::Existed),
        Err(e) => Err(Error::kube(format!("create {}", describe(o)), e)),
    }
}

/// Records the restore, creates the plan's objects and helper pods, and
/// records their outcome. The record exists before the first pod does,
/// so agents find what a waiting pod waits for.
pub async fn apply(
    client: &Client,
    agent_ns: &str,
    set: &str,
    plan: &Plan,
    opts: &RestoreOptions,
) -> Result<RestoreRecord> {
    let mut rec = RestoreRecord {
        name: opts.name.clone(),
        set: set.to_string(),
        created: chrono::Utc::now(),
        include_namespaces: opts.include_namespaces.clone(),
        namespace_mappings: opts.namespace_mappings.clone(),
        selector: opts.selector_text.clone(),
        include_resources: opts.include_resources.clone(),
        exclude_resources: opts.exclude_resources.clone(),
        skipped: plan.skipped.clone(),
        volumes: plan
            .volumes
            .iter()
            .map(|v| VolumeItem {
                namespace: v.namespace.clone(),
                pvc: v.pvc.clone(),
                source_namespace: v.source_namespace.clone(),
                snapshot: v.snapshot.clone(),
                helper_pod: v.helper_pod.clone(),
                phase: NEW.into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    record::create(client, agent_ns, &rec).await?;
    for o in &plan.objects {
        let what = describe(o);
        match create(client, o).await {
            Ok(Created::Yes) => rec.created_objects.push(what),
            Ok(Created::Existed) => {
                if o.rt.key() == "persistentvolumeclaims" {
                    if let Some(item) = rec.item_mut(o.namespace.as_deref().unwrap_or(""), &o.name)
                    {
                        // Its data is live: never overwritten.
                        item.phase = SKIPPED.into();
                        item.error = Some("the PVC exists already; its data was left alone".into());
                        item.helper_pod = None;
                    }
                }
                rec.existing.push(what);
            }
            Err(e) => {
                warn!(error = %e, "restore: object not created");
                rec.failed.push(format!("{what}: {e}"));
                if o.rt.key() == "persistentvolumeclaims" {
                    if let Some(item) = rec.item_mut(o.namespace.as_deref().unwrap_or(""), &o.name)
                    {
                        item.phase = record::FAILED.into();
                        item.error = Some(format!("the PVC could not be created: {e}"));
                        item.helper_pod = None;
                    }
                }
            }
        }
    }
    for v in &rec.volumes {
        let Some(pod) = &v.helper_pod else { continue };
        let obj = helper_pod(pod, &v.namespace, &v.pvc, &opts.name, &opts.image);
        let o = ToCreate {
            rt: crate::objects::ResourceType {
                api_version: "v1".into(),
                kind: "Pod".into(),
                plural: "pods".into(),
                group: String::new(),
                namespaced: true,
            },
            namespace: Some(v.namespace.clone()),
            name: pod.clone(),
            obj,
        };
        match create(client, &o).await {
            Ok(_) => {}
            Err(e) => rec.failed.push(format!("helper {}: {e}", describe(&o))),
        }
    }
    let done = rec.clone();
    // Agents may have started on the volumes meanwhile: only the object
    // outcome and the items decided here are written over.
    record::update(client, agent_ns, &opts.name, |stored| {
        stored.created_objects = done.created_objects.clone();
        stored.existing = done.existing.clone();
        stored.failed = done.failed.clone();
        for item in &done.volumes {
            if item.phase != NEW {
                if let Some(s) = stored.item_mut(&item.namespace, &item.pvc) {
                    *s = item.clone();
                }
            }
        }
        true
    })
    .await?;
    info!(
        restore = %opts.name,
        created = rec.created_objects.len(),
        existing = rec.existing.len(),
        failed = rec.failed.len(),
        volumes = rec.volumes.len(),
        "restore objects created"
    );
    Ok(record::get(client, agent_ns, &opts.name)
        .await?
        .unwrap_or(rec))
}
