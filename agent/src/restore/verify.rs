//! `marmoset k8s verify`: the seed's weekly verify job. The newest
//! completed set of a schedule must be younger than `max_age`; its
//! `default` namespace is restored into a temporary namespace
//! (`marmoset-verify-<date>`), the agents restore every PVC's data (each
//! chunk authenticated and checked against its id on the way), and the
//! namespace and the restore's record are deleted again.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use kube::Client;
use marmoset_storage::Repository;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::restore::apply::{self, Created};
use crate::restore::plan::{Plan, ToCreate};
use crate::restore::record::{RestoreRecord, COMPLETED};
use crate::restore::{self, RestoreOptions};

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub schedule: String,
    pub namespace: String,
    pub max_age: chrono::Duration,
    /// Default: `marmoset-verify-<yyyymmdd>`.
    pub target_namespace: Option<String>,
    pub timeout: Duration,
    pub poll: Duration,
    pub image: String,
    /// Leave the namespace for inspection.
    pub keep: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyOutcome {
    pub pass: bool,
    pub set: Option<String>,
    pub age_hours: Option<f64>,
    pub target_namespace: String,
    pub restore: Option<RestoreRecord>,
    pub errors: Vec<String>,
    pub cleaned_up: bool,
}

pub async fn verify(
    repo: Arc<Repository>,
    client: &Client,
    agent_ns: &str,
    opts: &VerifyOptions,
) -> Result<VerifyOutcome> {
    let now = Utc::now();
    let target = opts
        .target_namespace
        .clone()
        .unwrap_or_else(|| format!("marmoset-verify-{}", now.format("%Y%m%d")));
    let mut out = VerifyOutcome {
        pass: false,
        set: None,
        age_hours: None,
        target_namespace: target.clone(),
        restore: None,
        errors: Vec::new(),
        cleaned_up: false,
    };
    // Every failure from here on is reported in the outcome (the weekly
    // job's JSON), never as a bare error.
    macro_rules! or_fail {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => {
                    out.errors.push(e.to_string());
                    return Ok(out);
                }
            }
        };
    }
    let r = repo.clone();
    let sets = or_fail!(tokio::task::spawn_blocking(move || marmoset_storage::sets(
        &r,
        Utc::now()
    ))
    .await
    .map_err(|e| Error::Task(e.to_string()))
    .and_then(|r| r.map_err(Error::from)))
    .0;
    let Some(set) = sets
        .iter()
        .rev()
        .find(|s| s.schedule == opts.schedule && s.phase == "Completed")
    else {
        out.errors.push(format!(
            "no completed backup set of schedule {:?}",
            opts.schedule
        ));
        return Ok(out);
    };
    let age = now - set.started;
    out.set = Some(set.name.clone());
    out.age_hours = Some(age.num_seconds() as f64 / 3600.0);
    if age > opts.max_age {
        out.errors.push(format!(
            "the newest completed {} set, {}, is {:.1}h old (limit {:.1}h)",
            opts.schedule,
            set.name,
            age.num_seconds() as f64 / 3600.0,
            opts.max_age.num_seconds() as f64 / 3600.0
        ));
        return Ok(out);
    }
    let name = or_fail!(
        crate::restore::record::free_name(
            client,
            agent_ns,
            &format!("verify-{}", now.format("%Y%m%d%H%M%S")),
        )
        .await
    );
    let ropts = RestoreOptions {
        name,
        include_namespaces: vec![opts.namespace.clone()],
        namespace_mappings: [(opts.namespace.clone(), target.clone())].into(),
        restore_volumes: true,
        image: opts.image.clone(),
        ..Default::default()
    };
    let (r, name, o) = (repo.clone(), set.name.clone(), ropts.clone());
    let (set, mut plan) = or_fail!(tokio::task::spawn_blocking(move || restore::prepare(
        &r, &name, &o
    ))
    .await
    .map_err(|e| Error::Task(e.to_string()))
    .and_then(|r| r));
    // Verify deletes what it restored, so it creates the namespace itself
    // (one POST, no check-then-create race): a namespace that exists, or
    // that another run created a moment ago, is never touched.
    let ns_obj = take_namespace(&mut plan, &target);
    match or_fail!(apply::create(client, &ns_obj).await) {
        Created::Yes => {}
        Created::Existed => {
            out.errors.push(format!(
                "namespace {target} exists already: the test restore goes only into a namespace it creates and deletes (delete {target}, or pass another --target-namespace)"
            ));
            return Ok(out);
        }
    }
    let result = async {
        restore::apply::apply(client, agent_ns, &set.name, &plan, &ropts).await?;
        restore::wait_for(client, agent_ns, &ropts.name, opts.timeout, opts.poll).await
    }
    .await;
    let mut result_error = None;
    match result {
        Ok(rec) => {
            for v in &rec.volumes {
                if v.phase != COMPLETED {
                    out.errors.push(format!(
                        "PVC {}/{}: {} {}",
                        v.source_namespace,
                        v.pvc,
                        v.phase,
                        v.error.as_deref().unwrap_or("")
                    ));
                }
            }
            out.errors.extend(rec.failed.iter().cloned());
            out.restore = Some(rec);
        }
        Err(e) => {
            out.errors.push(e.to_string());
            result_error = Some(e);
        }
    }
    // A record that another restore had taken the name of is not ours.
    let record_ours = !matches!(result_error, Some(Error::RestoreExists(_)));
    if !opts.keep {
        let cleaned = restore::delete_namespace(client, &target).await;
        let record = if record_ours {
            restore::record::delete(client, agent_ns, &ropts.name).await
        } else {
            Ok(())
        };
        match (cleaned, record) {
            (Ok(()), Ok(())) => out.cleaned_up = true,
            (Err(e), _) | (_, Err(e)) => out.errors.push(format!("clean-up: {e}")),
        }
    }
    out.pass = out.errors.is_empty();
    Ok(out)
}

/// Takes the target Namespace out of the plan (verify creates it first),
/// or makes a bare one when the set saved none.
fn take_namespace(plan: &mut Plan, target: &str) -> ToCreate {
    if let Some(i) = plan
        .objects
        .iter()
        .position(|o| o.rt.key() == "namespaces" && o.name == target)
    {
        return plan.objects.remove(i);
    }
    ToCreate {
        rt: crate::objects::ResourceType {
            api_version: "v1".into(),
            kind: "Namespace".into(),
            plural: "namespaces".into(),
            group: String::new(),
            namespaced: false,
        },
        namespace: None,
        name: target.to_string(),
        obj: serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": target },
        }),
    }
}
