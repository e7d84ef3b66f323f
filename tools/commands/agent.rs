//! `marmoset agent`: opens the repository and the Kubernetes client, then
//! hands both to `marmoset_agent`.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use marmoset_agent::discovery::Plan;
use marmoset_agent::{Agent, AgentConfig, Cluster, RunReport};
use serde_json::json;
use tokio::runtime::Runtime;

use crate::cli::{AgentArgs, Global};
use crate::output::outln;
use crate::output::print_json;
use crate::repo_open::{open, open_secondary};

pub(super) fn run(g: &Global, a: AgentArgs) -> Result<ExitCode> {
    let cfg = AgentConfig::load(&a.config)?;
    // The config's repository applies when no flag or variable names one.
    let mut g = g.clone();
    if g.repo.is_none() {
        g.repo = cfg.repository.clone();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let cluster = rt.block_on(Cluster::connect(&a.node, &cfg.agent_namespace()))?;
    if a.plan {
        let plan = rt.block_on(cluster.discover(&cfg))?;
        return print_plan(&g, &plan);
    }
    let repo = Arc::new(open(&g)?);
    let secondary = cfg.secondary.clone();
    let mut agent = Agent::new(cfg, cluster, repo)?;
    if let Some(s) = secondary {
        let g = g.clone();
        agent = agent.with_secondary(Arc::new(move || {
            open_secondary(&g, &s.repository, s.password_file.as_deref())
                .map_err(|e| format!("{e:#}"))
        }));
    }
    match a.once {
        Some(name) => {
            // SIGTERM or Ctrl-C stops the run, not the promise: every pod
            // frozen by a pre hook is thawed before the process exits.
            let run = rt.block_on(async {
                tokio::select! {
                    r = agent.run_once(&name) => Some(r),
                    _ = shutdown_signal() => None,
                }
            });
            let Some(report) = run else {
                // Running backups stop first: nothing read after the thaw
                // may be saved as the frozen copy.
                agent.cancel_backups();
                rt.block_on(agent.thaw_leftovers(
                    "pending at interruption",
                    Some(marmoset_agent::freeze::SHUTDOWN_HOOK_BUDGET),
                ));
                // Backups still on blocking threads are not waited for.
                rt.shutdown_timeout(std::time::Duration::from_secs(5));
                anyhow::bail!("interrupted; the run resumes at the agent's next start");
            };
            let report = report?;
            print_run(&g, &report)?;
            Ok(if report.failed() > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        None => run_until_stopped(rt, agent),
    }
}

/// Runs every schedule until SIGTERM or Ctrl-C.
fn run_until_stopped(rt: Runtime, agent: Agent) -> Result<ExitCode> {
    let r = rt.block_on(Arc::new(agent).run(shutdown_signal()));
    // A backup still running on a blocking thread is abandoned: the
    // next start catches the run up and reuses its uploaded packs.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    r?;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The outcome of `--once`: one line per volume, then the totals.
fn print_run(g: &Global, report: &RunReport) -> Result<()> {
    if g.json {
        let vols: Vec<_> = report
            .volumes
            .iter()
            .map(|v| {
                json!({"source": v.target.source(), "pod": v.target.pod, "path": v.target.path,
                   "phase": v.phase.as_str(), "snapshot": v.snapshot, "error": v.error,
                   "bytes_read": v.bytes_read, "bytes_added": v.bytes_added})
            })
            .collect();
        let skipped: Vec<_> = report
            .skipped
            .iter()
            .map(|s| {
                json!({"namespace": s.namespace, "pod": s.pod, "volume": s.volume, "pvc": s.pvc,
                "reason": s.reason, "opt_out": s.intentional})
            })
            .collect();
        return print_json(
            &json!({"schedule": report.schedule, "set": report.set, "volumes": vols,
            "skipped": skipped, "retries": report.retries,
            "hook_failures": report.hook_failures, "snapshots_forgotten": report.snapshots_forgotten,
            "secondary": report.secondary}),
        );
    }
    for v in &report.volumes {
        outln!(
            "{:<16} {:<40} {}",
            v.phase.as_str(),
            v.target.source(),
            v.error.as_deref().or(v.snapshot.as_deref()).unwrap_or("")
        );
    }
    for s in report.skipped.iter().filter(|s| !s.intentional) {
        outln!(
            "{:<16} {}/{} volume {}: {}",
            "Skipped",
            s.namespace,
            s.pod,
            s.volume,
            s.reason
        );
    }
    outln!(
        "set {}: {} volumes, {} failed, {} old snapshots forgotten",
        report.set,
        report.volumes.len(),
        report.failed(),
        report.snapshots_forgotten
    );
    if let Some(sec) = &report.secondary {
        match &sec.error {
            Some(e) => outln!("secondary: copy failed: {e}"),
            None => outln!(
                "secondary: {} snapshots copied, {} already there, {} failed, {} forgotten",
                sec.copied,
                sec.already,
                sec.failed.len(),
                sec.forgotten
            ),
        }
    }
    Ok(())
}

fn print_plan(g: &Global, plan: &Plan) -> Result<ExitCode> {
    if g.json {
        let vols: Vec<_> = plan
            .volumes()
            .map(|v| json!({"source": v.source(), "pod": v.pod, "volume": v.volume, "pv": v.pv, "path": v.path, "storage_class": v.storage_class}))
            .collect();
        let skipped: Vec<_> = plan
            .skipped
            .iter()
            .map(|s| json!({"namespace": s.namespace, "pod": s.pod, "volume": s.volume, "reason": s.reason}))
            .collect();
        print_json(&json!({"volumes": vols, "skipped": skipped}))?;
    } else {
        for v in plan.volumes() {
            outln!("back up  {:<40} {}", v.source(), v.path.display());
        }
        for s in &plan.skipped {
            outln!(
                "skip     {}/{} volume {}: {}",
                s.namespace,
                s.pod,
                s.volume,
                s.reason
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
