//! Retention: which snapshots to keep, and forgetting the others.
//!
//! Snapshots are grouped (by source, by tags, or both); within a group,
//! newest first, a snapshot is kept when any rule keeps it: the last N, the
//! newest one of each of the last N hours/days/ISO weeks/months/years (in a
//! given time zone), those within a duration of the group's newest snapshot
//! (`keep_within`, restic's semantics), those younger than a TTL measured
//! from now (`ttl`, Velero's semantics), or those carrying a kept tag.
//! Forgetting removes only snapshot manifests; data goes at the next
//! `maintain --full`.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use serde::Serialize;

use crate::backend::FileKind;
use crate::error::{Error, Result};
use crate::format::id::Id;
use crate::format::snapshot::Snapshot;
use crate::repo::Repository;

#[derive(Debug, Clone, Default)]
pub struct RetentionPolicy {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    /// Keep snapshots within this span of the group's newest snapshot.
    pub keep_within: Option<chrono::Duration>,
    /// Keep snapshots younger than this, measured from now.
    pub ttl: Option<chrono::Duration>,
    pub keep_tags: Vec<String>,
}

impl RetentionPolicy {
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_hourly.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_monthly.is_none()
            && self.keep_yearly.is_none()
            && self.keep_within.is_none()
            && self.ttl.is_none()
            && self.keep_tags.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupBy {
    #[default]
    Source,
    Tags,
    SourceAndTags,
}

#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub id: Id,
    pub time: DateTime<Utc>,
    pub source: String,
    pub tags: Vec<String>,
    pub keep: bool,
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ForgetReport {
    pub dry_run: bool,
    pub groups: BTreeMap<String, Vec<Decision>>,
    pub kept: u64,
    pub removed: u64,
}

/// Parses durations like `168h`, `30d`, `90m`, `2w`, `1y`, `1d12h`.
pub fn parse_duration(s: &str) -> Result<chrono::Duration> {
    let bad = |why: &str| {
        Error::InvalidArgument(format!(
            "invalid duration {s:?}: {why} (examples: 48h, 7d, 2w, 30m)"
        ))
    };
    let mut total = chrono::Duration::zero();
    let mut num = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: i64 = num
            .parse()
            .map_err(|_| bad("a number must precede each unit"))?;
        num.clear();
        let part = match c {
            's' => chrono::Duration::try_seconds(n),
            'm' => chrono::Duration::try_minutes(n),
            'h' => chrono::Duration::try_hours(n),
            'd' => chrono::Duration::try_days(n),
            'w' => chrono::Duration::try_weeks(n),
            'y' => n.checked_mul(365).and_then(chrono::Duration::try_days),
            _ => return Err(bad("unknown unit (s, m, h, d, w, y)")),
        };
        total = part
            .and_then(|p| total.checked_add(&p))
            .filter(|t| *t <= MAX_DURATION)
            .ok_or_else(|| bad("longer than 1000 years"))?;
    }
    if !num.is_empty() {
        return Err(bad("a unit must follow the last number"));
    }
    if total <= chrono::Duration::zero() {
        return Err(bad("must be positive"));
    }
    Ok(total)
}

/// Longest duration accepted anywhere (retention, ages, margins): far
/// beyond any real policy, and far from the overflow of date arithmetic.
pub const MAX_DURATION: chrono::Duration = chrono::Duration::days(365_000);

fn group_key(s: &Snapshot, by: GroupBy) -> String {
    let mut tags = s.tags.clone();
    tags.sort();
    match by {
        GroupBy::Source => s.source.clone(),
        GroupBy::Tags => format!("tags:{}", tags.join(",")),
        GroupBy::SourceAndTags => format!("{} tags:{}", s.source, tags.join(",")),
    }
}

struct Bucket {
    name: &'static str,
    remaining: u32,
    last: Option<i64>,
    key: fn(&DateTime<chrono::FixedOffset>) -> i64,
}

/// Applies `policy` to one group (any order); returns decisions newest first.
pub fn apply_policy<Tz: TimeZone>(
    snaps: &[(Id, Snapshot)],
    policy: &RetentionPolicy,
    now: DateTime<Utc>,
    tz: &Tz,
) -> Vec<Decision> {
    let mut sorted: Vec<&(Id, Snapshot)> = snaps.iter().collect();
    sorted.sort_by(|a, b| b.1.time.cmp(&a.1.time).then(b.0.cmp(&a.0)));
    let mut buckets: Vec<Bucket> = [
        (
            "hourly",
            policy.keep_hourly,
            (|t| t.year() as i64 * 1_000_000 + t.ordinal() as i64 * 100 + t.hour() as i64)
                as fn(&DateTime<chrono::FixedOffset>) -> i64,
        ),
        ("daily", policy.keep_daily, |t| {
            t.year() as i64 * 1000 + t.ordinal() as i64
        }),
        ("weekly", policy.keep_weekly, |t| {
            let w = t.iso_week();
            w.year() as i64 * 100 + w.week() as i64
        }),
        ("monthly", policy.keep_monthly, |t| {
            t.year() as i64 * 100 + t.month() as i64
        }),
        ("yearly", policy.keep_yearly, |t| t.year() as i64),
    ]
    .into_iter()
    .filter_map(|(name, n, key)| {
        n.map(|n| Bucket {
            name,
            remaining: n,
            last: None,
            key,
        })
    })
    .collect();
    let newest = sorted.first().map(|(_, s)| s.time);
    let mut out = Vec::new();
    for (i, (id, s)) in sorted.iter().enumerate() {
        let mut reasons = Vec::new();
        if policy.keep_last.is_some_and(|n| (i as u32) < n) {
            reasons.push("last snapshot".to_string());
        }
        let local = s.time.with_timezone(tz).fixed_offset();
        for b in buckets.iter_mut() {
            if b.remaining == 0 {
                continue;
            }
            let k = (b.key)(&local);
            if b.last != Some(k) {
                b.last = Some(k);
                b.remaining -= 1;
                reasons.push(format!("{} snapshot", b.name));
            }
        }
        if let (Some(w), Some(newest)) = (policy.keep_within, newest) {
            if s.time >= newest - w {
                reasons.push(format!("within {}h of the newest", w.num_hours()));
            }
        }
        if let Some(ttl) = policy.ttl {
            if s.time >= now - ttl {
                reasons.push(format!("younger than ttl {}h", ttl.num_hours()));
            }
        }
        if let Some(t) = s.tags.iter().find(|t| policy.keep_tags.contains(t)) {
            reasons.push(format!("tagged {t}"));
        }
        out.push(Decision {
            id: *id,
            time: s.time,
            source: s.source.clone(),
            tags: s.tags.clone(),
            keep: !reasons.is_empty(),
            reasons,
        });
    }
    out
}

/// Which snapshots a forget applies to.
#[derive(Debug, Clone, Default)]
pub struct SnapshotFilter {
    pub sources: Vec<String>,
    /// Snapshots must carry all of these tags.
    pub tags: Vec<String>,
}

impl SnapshotFilter {
    pub fn matches(&self, s: &Snapshot) -> bool {
        (self.sources.is_empty() || self.sources.contains(&s.source))
            && self.tags.iter().all(|t| s.tags.contains(t))
    }
}

pub fn forget<Tz: TimeZone>(
    repo: &Repository,
    policy: &RetentionPolicy,
    filter: &SnapshotFilter,
    group_by: GroupBy,
    dry_run: bool,
    tz: &Tz,
) -> Result<ForgetReport> {
    if policy.is_empty() {
        return Err(Error::InvalidArgument(
            "no retention policy given; refusing to forget every snapshot (use --keep-* or --ttl)"
                .into(),
        ));
    }
    let (snaps, _) = repo.snapshots()?;
    let mut groups: BTreeMap<String, Vec<(Id, Snapshot)>> = BTreeMap::new();
    for (id, s) in snaps.into_iter().filter(|(_, s)| filter.matches(s)) {
        groups
            .entry(group_key(&s, group_by))
            .or_default()
            .push((id, s));
    }
    let now = Utc::now();
    let mut report = ForgetReport {
        dry_run,
        ..Default::default()
    };
    for (key, members) in groups {
        let decisions = apply_policy(&members, policy, now, tz);
        for d in &decisions {
            if d.keep {
                report.kept += 1;
            } else {
                report.removed += 1;
                if !dry_run {
                    repo.backend().remove(FileKind::Snapshot, &d.id.to_hex())?;
                }
            }
        }
        report.groups.insert(key, decisions);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::snapshot::BackupSummary;

    fn snap(time: &str, tags: &[&str]) -> (Id, Snapshot) {
        let t = DateTime::parse_from_rfc3339(time)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default();
        let s = Snapshot {
            version: 1,
            time: t,
            hostname: "h".into(),
            username: "u".into(),
            source: "default/pvc".into(),
            paths: vec![],
            tags: tags.iter().map(|t| t.to_string()).collect(),
            tree: Id::default(),
            tree_parts: vec![],
            parent: None,
            program_version: String::new(),
            incomplete: false,
            original: None,
            summary: BackupSummary::default(),
        };
        (Id::of_bytes(time.as_bytes()), s)
    }

    fn kept(d: &[Decision]) -> Vec<String> {
        d.iter()
            .filter(|d| d.keep)
            .map(|d| d.time.format("%Y-%m-%dT%H:%M").to_string())
            .collect()
    }

    /// Regression: `chrono::Duration::hours(n)` panics on large `n`, and
    /// `--keep-within`, `verify --max-age`, `maintain --safety-margin` and
    /// the agent's `keep:` all came through here.
    #[test]
    fn duration_overflow_is_an_error_not_a_panic() {
        for huge in [
            "9223372036854775807s",
            "9223372036854775807h",
            "99999999999999d",
            "9999999999999w",
            "99999999999999999y",
            "1000001y",
            "999999999999999999999h",
            "300000y300000y",
        ] {
            match parse_duration(huge) {
                Err(Error::InvalidArgument(msg)) => assert!(msg.contains(huge), "{msg}"),
                other => panic!("{huge}: expected a clear error, got {other:?}"),
            }
        }
        assert_eq!(
            parse_duration("1000y").ok(),
            chrono::Duration::try_days(365_000)
        );
    }

    #[test]
    fn parse_durations() -> Result<()> {
        assert_eq!(parse_duration("168h")?, chrono::Duration::hours(168));
        assert_eq!(parse_duration("1d12h")?, chrono::Duration::hours(36));
        assert_eq!(parse_duration("2w")?, chrono::Duration::days(14));
        for bad in ["", "h", "12", "5x", "0h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn daily_keeps_newest_per_day_across_month_and_year_boundaries() {
        let snaps = vec![
            snap("2025-12-30T02:00:00Z", &[]),
            snap("2025-12-31T02:00:00Z", &[]),
            snap("2025-12-31T14:00:00Z", &[]),
            snap("2026-01-01T02:00:00Z", &[]),
            snap("2026-01-01T03:00:00Z", &[]),
            snap("2026-01-02T02:00:00Z", &[]),
        ];
        let p = RetentionPolicy {
            keep_daily: Some(3),
            ..Default::default()
        };
        let d = apply_policy(&snaps, &p, Utc::now(), &Utc);
        assert_eq!(
            kept(&d),
            vec!["2026-01-02T02:00", "2026-01-01T03:00", "2025-12-31T14:00"]
        );
    }

    #[test]
    fn weekly_uses_iso_weeks_and_monthly_and_yearly_buckets() {
        // 2026-01-04 is a Sunday (ISO week 2026-W01); 2025-12-29 is Monday of W01.
        let snaps = vec![
            snap("2025-12-21T03:00:00Z", &[]), // W51
            snap("2025-12-28T03:00:00Z", &[]), // W52
            snap("2025-12-29T03:00:00Z", &[]), // 2026-W01
            snap("2026-01-04T03:00:00Z", &[]), // 2026-W01 (newest of it)
            snap("2026-01-11T03:00:00Z", &[]), // W02
        ];
        let p = RetentionPolicy {
            keep_weekly: Some(3),
            ..Default::default()
        };
        assert_eq!(
            kept(&apply_policy(&snaps, &p, Utc::now(), &Utc)),
            vec!["2026-01-11T03:00", "2026-01-04T03:00", "2025-12-28T03:00"]
        );
        let p = RetentionPolicy {
            keep_monthly: Some(2),
            keep_yearly: Some(2),
            ..Default::default()
        };
        // Monthly: Jan 2026 newest (01-11), Dec 2025 newest (12-29). Yearly: same two.
        assert_eq!(
            kept(&apply_policy(&snaps, &p, Utc::now(), &Utc)),
            vec!["2026-01-11T03:00", "2025-12-29T03:00"]
        );
    }

    #[test]
    fn time_zone_moves_day_boundaries() {
        // 23:30 UTC on Dec 31 is already Jan 1 in UTC+2.
        let snaps = vec![
            snap("2025-12-31T23:30:00Z", &[]),
            snap("2026-01-01T10:00:00Z", &[]),
        ];
        let p = RetentionPolicy {
            keep_daily: Some(5),
            ..Default::default()
        };
        assert_eq!(kept(&apply_policy(&snaps, &p, Utc::now(), &Utc)).len(), 2);
        let plus2 = chrono::FixedOffset::east_opt(2 * 3600).expect("offset");
        assert_eq!(
            kept(&apply_policy(&snaps, &p, Utc::now(), &plus2)),
            vec!["2026-01-01T10:00"]
        );
        // In UTC-11 both fall on Dec 31.
        let minus11 = chrono::FixedOffset::west_opt(11 * 3600).expect("offset");
        assert_eq!(
            kept(&apply_policy(&snaps, &p, Utc::now(), &minus11)),
            vec!["2026-01-01T10:00"]
        );
    }

    #[test]
    fn seed_schedules_daily_168h_and_weekly_720h_ttls() {
        let now = DateTime::parse_from_rfc3339("2026-02-08T05:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default();
        let mut snaps = Vec::new();
        for day in 1..=8 {
            snaps.push(snap(&format!("2026-02-{day:02}T02:00:00Z"), &["daily"]));
        }
        for day in [
            "2026-01-04",
            "2026-01-11",
            "2026-01-18",
            "2026-01-25",
            "2026-02-01",
            "2026-02-08",
        ] {
            snaps.push(snap(&format!("{day}T03:00:00Z"), &["weekly"]));
        }
        let daily: Vec<_> = snaps
            .iter()
            .filter(|(_, s)| s.tags[0] == "daily")
            .cloned()
            .collect();
        let weekly: Vec<_> = snaps
            .iter()
            .filter(|(_, s)| s.tags[0] == "weekly")
            .cloned()
            .collect();
        let p = RetentionPolicy {
            ttl: Some(chrono::Duration::hours(168)),
            ..Default::default()
        };
        // 168h before 02-08T05:00 is 02-01T05:00: 02-01T02:00 expired.
        assert_eq!(kept(&apply_policy(&daily, &p, now, &Utc)).len(), 7);
        assert!(
            !kept(&apply_policy(&daily, &p, now, &Utc)).contains(&"2026-02-01T02:00".to_string())
        );
        let p = RetentionPolicy {
            ttl: Some(chrono::Duration::hours(720)),
            ..Default::default()
        };
        // 720h = 30 days before 02-08T05:00 is 01-09T05:00.
        assert_eq!(
            kept(&apply_policy(&weekly, &p, now, &Utc)),
            vec![
                "2026-02-08T03:00",
                "2026-02-01T03:00",
                "2026-01-25T03:00",
                "2026-01-18T03:00",
                "2026-01-11T03:00"
            ]
        );
    }

    #[test]
    fn keep_last_within_and_tags_combine() {
        let snaps = vec![
            snap("2026-03-01T00:00:00Z", &["pinned"]),
            snap("2026-03-05T00:00:00Z", &[]),
            snap("2026-03-09T00:00:00Z", &[]),
            snap("2026-03-10T00:00:00Z", &[]),
        ];
        let p = RetentionPolicy {
            keep_last: Some(1),
            keep_within: Some(chrono::Duration::days(2)),
            keep_tags: vec!["pinned".into()],
            ..Default::default()
        };
        let d = apply_policy(&snaps, &p, Utc::now(), &Utc);
        assert_eq!(
            kept(&d),
            vec!["2026-03-10T00:00", "2026-03-09T00:00", "2026-03-01T00:00"]
        );
        assert!(d[0].reasons.iter().any(|r| r == "last snapshot"));
        assert!(d[3].reasons.iter().any(|r| r == "tagged pinned"));
    }
}
