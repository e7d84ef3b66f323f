//! Reading and writing plans, and what backups must know of them: which
//! packs are planned for deletion and whether a plan overlaps a session.

use std::collections::HashSet;

use chrono::{DateTime, Utc};

use super::clock::CLOCK_SKEW;
use super::sealed::{replayed, scan_sealed, write_sealed};
use crate::backend::FileKind;
use crate::error::Result;
pub use crate::format::plan::Plan;
use crate::repo::Repository;

/// An authenticated plan with the storage's time of its last write.
#[derive(Debug, Clone)]
pub(crate) struct ListedPlan {
    pub name: String,
    pub plan: Plan,
    pub modified: Option<DateTime<Utc>>,
}

/// Plans: the genuine ones, and those ignored with why.
#[derive(Debug, Default)]
pub(crate) struct PlanScan {
    pub plans: Vec<ListedPlan>,
    pub rejected: Vec<(String, String)>,
}

/// Reads every plan. A plan that does not authenticate (written without
/// the key) or whose times are far from the storage's stamp (an old plan
/// copied back) is ignored: its packs stay, and are judged afresh.
pub(crate) fn scan_plans(repo: &Repository) -> Result<PlanScan> {
    let (found, rejected) = scan_sealed(
        &**repo.backend(),
        repo.keys(),
        FileKind::Plan,
        "",
        |plan: Plan, modified| {
            replayed(plan.hidden_at.unwrap_or(plan.created), modified)?;
            Ok(plan)
        },
    )?;
    let plans = found
        .into_iter()
        .map(|f| ListedPlan {
            name: f.name,
            plan: f.value,
            modified: f.modified,
        })
        .collect();
    Ok(PlanScan { plans, rejected })
}

/// Names of all packs in any genuine plan: backups must never re-index them.
pub(crate) fn planned_packs(repo: &Repository) -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    for p in scan_plans(repo)?.plans {
        out.extend(p.plan.packs);
    }
    Ok(out)
}

/// Whether a maintenance may have hidden packs that the session `lease`
/// saw: a plan still in phase 1, or one that names the session.
pub(crate) fn plans_overlap(repo: &Repository, lease: &str) -> Result<bool> {
    Ok(scan_plans(repo)?
        .plans
        .iter()
        .any(|p| p.plan.hidden_at.is_none() || p.plan.sessions.iter().any(|s| s == lease)))
}

pub(crate) fn write_plan(repo: &Repository, name: &str, plan: &Plan) -> Result<()> {
    write_sealed(&**repo.backend(), repo.keys(), FileKind::Plan, name, plan)
}

/// Age of a plan's last write: by the storage's clock when it stamps
/// objects, otherwise by the writer's recorded time minus the tolerated
/// skew between hosts.
pub(crate) fn plan_age(p: &ListedPlan, storage_now: Option<DateTime<Utc>>) -> chrono::Duration {
    match (p.modified, storage_now) {
        (Some(m), Some(now)) => now - m,
        _ => crate::util::now() - p.plan.hidden_at.unwrap_or(p.plan.created) - CLOCK_SKEW,
    }
}
