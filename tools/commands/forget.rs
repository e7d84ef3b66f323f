//! `marmoset forget`: remove snapshots no retention rule keeps. Their data
//! goes at the next `maintain --full`.

use std::process::ExitCode;

use anyhow::{bail, Result};
use marmoset_storage::{ForgetReport, GroupBy, RetentionPolicy, SnapshotFilter};

use crate::cli::{ForgetArgs, Global};
use crate::output::outln;
use crate::output::print_json;
use crate::repo_open::open;

pub(super) fn run(g: &Global, a: ForgetArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let policy = RetentionPolicy {
        keep_last: a.keep_last,
        keep_hourly: a.keep_hourly,
        keep_daily: a.keep_daily,
        keep_weekly: a.keep_weekly,
        keep_monthly: a.keep_monthly,
        keep_yearly: a.keep_yearly,
        keep_within: duration(a.keep_within.as_deref())?,
        ttl: duration(a.ttl.as_deref())?,
        keep_tags: a.keep_tags,
    };
    let group_by = group_by(&a.group_by)?;
    let filter = SnapshotFilter {
        sources: a.sources,
        tags: a.tags,
    };
    let report = if a.utc {
        marmoset_storage::forget(&repo, &policy, &filter, group_by, a.dry_run, &chrono::Utc)?
    } else {
        marmoset_storage::forget(&repo, &policy, &filter, group_by, a.dry_run, &chrono::Local)?
    };
    if g.json {
        print_json(&serde_json::to_value(&report)?)?;
    } else {
        print_report(&report, a.dry_run);
    }
    Ok(ExitCode::SUCCESS)
}

/// An optional span flag, parsed by the engine's one duration parser.
fn duration(s: Option<&str>) -> Result<Option<chrono::Duration>> {
    Ok(s.map(marmoset_storage::parse_duration).transpose()?)
}

fn group_by(s: &str) -> Result<GroupBy> {
    Ok(match s {
        "source" => GroupBy::Source,
        "tags" => GroupBy::Tags,
        "source,tags" | "tags,source" => GroupBy::SourceAndTags,
        other => bail!("--group-by {other:?}: use source, tags or source,tags"),
    })
}

/// Every snapshot with its decision and why, group by group, then totals.
fn print_report(report: &ForgetReport, dry_run: bool) {
    for (group, decisions) in &report.groups {
        outln!("group {group}:");
        for d in decisions {
            outln!(
                "  {} {} {:<8} {}",
                if d.keep { "keep  " } else { "remove" },
                d.id.short(),
                d.time
                    .with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M"),
                if d.keep {
                    d.reasons.join(", ")
                } else {
                    "no policy keeps it".into()
                }
            );
        }
    }
    outln!(
        "{} kept, {} {}",
        report.kept,
        report.removed,
        if dry_run {
            "would be removed (dry run)"
        } else {
            "removed"
        }
    );
}
