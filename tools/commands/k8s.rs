//! `marmoset k8s restore | restore-wait | verify`: backup sets back into
//! the cluster, through `marmoset_agent::restore`. The repository is read
//! here (the set and its saved objects); the agents restore the volumes.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use marmoset_agent::restore::plan::{Plan, Selector};
use marmoset_agent::restore::record::{self, RestoreRecord};
use marmoset_agent::restore::{self, verify, RestoreOptions};
use marmoset_agent::{Cluster, KubeClient};
use tokio::runtime::Runtime;

use crate::cli::{
    Global, K8sCluster, K8sCommand, K8sRestoreArgs, K8sRestoreCommand, K8sVerifyArgs,
};
use crate::output::{errln, outln, print_json};
use crate::progress::bytes;
use crate::repo_open::open;

pub(super) fn run(g: &Global, command: K8sCommand) -> Result<ExitCode> {
    match command {
        K8sCommand::Restore(a) => match a.command {
            Some(K8sRestoreCommand::Get { cluster }) => get(g, &cluster),
            Some(K8sRestoreCommand::Describe { name, cluster }) => describe(g, &name, &cluster),
            None => create(g, a),
        },
        K8sCommand::RestoreWait {
            restore: name,
            dir,
            timeout,
        } => {
            if name.trim().is_empty() {
                bail!("--restore: the restore's name is empty");
            }
            let timeout = span(&timeout)?;
            eprintln!(
                "waiting for the volumes of restore {name} ({})",
                dir.display()
            );
            restore::wait::wait(&dir, timeout, Duration::from_secs(1), |t| {
                eprintln!("still waiting after {}s", t.as_secs());
            })?;
            eprintln!("volumes restored");
            Ok(ExitCode::SUCCESS)
        }
        K8sCommand::Verify(a) => verify_cmd(g, a),
    }
}

fn span(s: &str) -> Result<Duration> {
    marmoset_agent::config::parse_span(s).map_err(|e| anyhow::anyhow!("{e}"))
}

fn runtime() -> Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn connect(rt: &Runtime, c: &K8sCluster) -> Result<KubeClient> {
    let cluster = rt.block_on(Cluster::connect("", &c.agent_namespace))?;
    Ok(cluster.client().clone())
}

/// The restore-wait image: the flag, or the agent DaemonSet's.
fn image(rt: &Runtime, client: &KubeClient, c: &K8sCluster) -> Result<String> {
    if let Some(i) = &c.image {
        return Ok(i.clone());
    }
    rt.block_on(restore::agent_image(client, &c.agent_namespace))?
        .context("no --image given and no marmoset agent DaemonSet found in the agent namespace (--agent-namespace) to take it from")
}

fn create(g: &Global, a: K8sRestoreArgs) -> Result<ExitCode> {
    let Some(set) = a.from.clone() else {
        bail!("--from SET is required (`marmoset sets` lists the sets)");
    };
    let selector_text = a.selector.clone().unwrap_or_default();
    let selector = Selector::parse(&selector_text).map_err(|e| anyhow::anyhow!(e))?;
    let namespace_mappings = match &a.namespace_mappings {
        Some(m) => restore::parse_mappings(m)?,
        None => Default::default(),
    };
    for ns in &a.include_namespaces {
        if !restore::valid_dns_label(ns) {
            bail!("--include-namespaces: {ns:?} is not a namespace name");
        }
    }
    let timeout = span(&a.timeout)?;
    let poll = span(&a.cluster.poll)?;
    let rt = runtime()?;
    let client = connect(&rt, &a.cluster)?;
    let image = if a.dry_run || a.no_volumes {
        // Shown as it would be; no wait container is started.
        image(&rt, &client, &a.cluster).unwrap_or_else(|_| "marmoset".into())
    } else {
        image(&rt, &client, &a.cluster)?
    };
    let name = rt.block_on(record::free_name(
        &client,
        &a.cluster.agent_namespace,
        &restore::restore_name(&set, chrono::Utc::now()),
    ))?;
    let opts = RestoreOptions {
        name,
        include_namespaces: a.include_namespaces.clone(),
        namespace_mappings,
        selector,
        selector_text,
        include_resources: a.include_resources.clone(),
        exclude_resources: a.exclude_resources.clone(),
        restore_volumes: !a.no_volumes,
        image,
    };
    let repo = open(g)?;
    let (set, plan) = restore::prepare(&repo, &set, &opts)?;
    drop(repo);
    if plan.objects.is_empty() {
        bail!(
            "nothing to restore from {}: no saved object passes the filters",
            set.name
        );
    }
    if a.dry_run {
        print_plan(g, &plan)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut rec = rt.block_on(restore::apply::apply(
        &client,
        &a.cluster.agent_namespace,
        &set.name,
        &plan,
        &opts,
    ))?;
    if !g.json {
        outln!(
            "restore {} from {}: {} objects created, {} existing (left alone), {} failed, {} volumes to restore",
            rec.name,
            set.name,
            rec.created_objects.len(),
            rec.existing.len(),
            rec.failed.len(),
            rec.volumes.len()
        );
    }
    if a.wait {
        match rt.block_on(restore::wait_for(
            &client,
            &a.cluster.agent_namespace,
            &opts.name,
            timeout,
            poll,
        )) {
            Ok(r) => rec = r,
            Err(e) => {
                // The record as it stands, for scripts, then why.
                if g.json {
                    if let Ok(Some(r)) =
                        rt.block_on(record::get(&client, &a.cluster.agent_namespace, &opts.name))
                    {
                        print_json(&serde_json::to_value(&r)?)?;
                    }
                }
                return Err(e.into());
            }
        }
    }
    if g.json {
        print_json(&serde_json::to_value(&rec)?)?;
    } else if a.wait {
        print_record(&rec);
    } else {
        outln!("follow it with: marmoset k8s restore describe {}", rec.name);
    }
    Ok(exit_for(&rec, a.wait))
}

fn exit_for(rec: &RestoreRecord, waited: bool) -> ExitCode {
    let failed =
        !rec.failed.is_empty() || (waited && rec.volumes.iter().any(|v| v.phase == record::FAILED));
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_plan(g: &Global, plan: &Plan) -> Result<()> {
    if g.json {
        let objects: Vec<serde_json::Value> = plan
            .objects
            .iter()
            .map(|o| serde_json::json!({"resource": o.rt.key(), "namespace": o.namespace, "name": o.name, "object": o.obj}))
            .collect();
        let volumes: Vec<serde_json::Value> = plan
            .volumes
            .iter()
            .map(|v| serde_json::json!({"namespace": v.namespace, "pvc": v.pvc, "sourceNamespace": v.source_namespace,
                "snapshot": v.snapshot, "helperPod": v.helper_pod}))
            .collect();
        return print_json(
            &serde_json::json!({"objects": objects, "volumes": volumes, "skipped": plan.skipped}),
        );
    }
    outln!("would create, in this order:");
    for o in &plan.objects {
        match &o.namespace {
            Some(ns) => outln!("  {} {ns}/{}", o.rt.key(), o.name),
            None => outln!("  {} {}", o.rt.key(), o.name),
        }
    }
    for v in &plan.volumes {
        outln!(
            "volume {}/{} from snapshot {}{}",
            v.namespace,
            v.pvc,
            &v.snapshot[..v.snapshot.len().min(8)],
            v.helper_pod
                .as_deref()
                .map(|p| format!(" (through helper pod {p})"))
                .unwrap_or_default()
        );
    }
    for s in &plan.skipped {
        outln!("skipped: {s}");
    }
    Ok(())
}

fn get(g: &Global, c: &K8sCluster) -> Result<ExitCode> {
    let rt = runtime()?;
    let client = connect(&rt, c)?;
    let recs = rt.block_on(record::list(&client, &c.agent_namespace))?;
    if g.json {
        print_json(&serde_json::to_value(&recs)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<40} {:<28} {:<16} {:>8} {:>8} {:<20}",
        "NAME",
        "SET",
        "PHASE",
        "OBJECTS",
        "VOLUMES",
        "CREATED"
    );
    for r in &recs {
        outln!(
            "{:<40} {:<28} {:<16} {:>8} {:>8} {:<20}",
            r.name,
            r.set,
            r.phase(),
            r.created_objects.len(),
            r.volumes.len(),
            r.created
                .with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(g: &Global, name: &str, c: &K8sCluster) -> Result<ExitCode> {
    let rt = runtime()?;
    let client = connect(&rt, c)?;
    let Some(rec) = rt.block_on(record::get(&client, &c.agent_namespace, name))? else {
        bail!("no restore named {name:?} (marmoset k8s restore get lists them)");
    };
    if g.json {
        print_json(&serde_json::to_value(&rec)?)?;
    } else {
        print_record(&rec);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_record(r: &RestoreRecord) {
    outln!("Name:      {}", r.name);
    outln!("Set:       {}", r.set);
    outln!("Phase:     {}", r.phase());
    if !r.namespace_mappings.is_empty() {
        let m: Vec<String> = r
            .namespace_mappings
            .iter()
            .map(|(a, b)| format!("{a}:{b}"))
            .collect();
        outln!("Mappings:  {}", m.join(","));
    }
    outln!(
        "Objects:   {} created, {} existing (left alone), {} skipped, {} failed",
        r.created_objects.len(),
        r.existing.len(),
        r.skipped.len(),
        r.failed.len()
    );
    for e in &r.existing {
        outln!("  exists: {e}");
    }
    for f in &r.failed {
        outln!("  FAILED: {f}");
    }
    outln!();
    outln!(
        "{:<44} {:<12} {:<11} {:>10} {:>9}  {}",
        "VOLUME",
        "NODE",
        "PHASE",
        "BYTES",
        "SECONDS",
        "ERROR"
    );
    for v in &r.volumes {
        outln!(
            "{:<44} {:<12} {:<11} {:>10} {:>9.1}  {}",
            format!("{}/{}", v.namespace, v.pvc),
            v.node.as_deref().unwrap_or("-"),
            v.phase,
            bytes(v.bytes),
            v.duration_secs,
            v.error.as_deref().unwrap_or("")
        );
    }
}

fn verify_cmd(g: &Global, a: K8sVerifyArgs) -> Result<ExitCode> {
    let max_age = marmoset_storage::parse_duration(&a.max_age)?;
    let timeout = span(&a.timeout)?;
    let poll = span(&a.cluster.poll)?;
    if let Some(t) = &a.target_namespace {
        if !restore::valid_dns_label(t) {
            bail!("--target-namespace {t:?} is not a namespace name");
        }
    }
    let rt = runtime()?;
    // The weekly job's JSON says why it failed, whatever failed.
    let setup = (|| -> Result<_> {
        let client = connect(&rt, &a.cluster)?;
        let image = image(&rt, &client, &a.cluster)?;
        let repo = Arc::new(open(g)?);
        Ok((client, image, repo))
    })();
    let (client, image, repo) = match setup {
        Ok(v) => v,
        Err(e) if g.json => {
            print_json(&serde_json::json!({ "pass": false, "errors": [format!("{e:#}")] }))?;
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e),
    };
    let opts = verify::VerifyOptions {
        schedule: a.schedule,
        namespace: a.namespace,
        max_age,
        target_namespace: a.target_namespace,
        timeout,
        poll,
        image,
        keep: a.keep,
    };
    let out = rt.block_on(verify::verify(
        repo,
        &client,
        &a.cluster.agent_namespace,
        &opts,
    ))?;
    if g.json {
        print_json(&serde_json::to_value(&out)?)?;
    } else {
        if let Some(set) = &out.set {
            outln!(
                "backup set {set}, {:.1}h old",
                out.age_hours.unwrap_or_default()
            );
        }
        if let Some(r) = &out.restore {
            for v in &r.volumes {
                outln!(
                    "{} {}/{} → {}: {} files, {} ({})",
                    if v.phase == record::COMPLETED {
                        "PASS"
                    } else {
                        "FAIL"
                    },
                    v.source_namespace,
                    v.pvc,
                    v.namespace,
                    v.files,
                    bytes(v.bytes),
                    v.phase
                );
            }
        }
        for e in &out.errors {
            errln!("FAIL {e}");
        }
        outln!(
            "{}: test restore into {}{}",
            if out.pass { "PASS" } else { "FAIL" },
            out.target_namespace,
            if out.cleaned_up { ", cleaned up" } else { "" }
        );
    }
    Ok(if out.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
