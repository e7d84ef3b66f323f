//! Backup schedules: a cron expression (UTC) and how long its snapshots
//! are kept.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use croner::Cron;
use serde::Deserialize;

use crate::error::{Error, Result};

/// One entry of the agent config's `schedules:` list, as written.
/// [`Schedule::from_config`] validates it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScheduleConfig {
    pub name: String,
    /// Five-field cron expression, evaluated in UTC.
    pub cron: String,
    /// Snapshots of this schedule are kept this long (`168h`, `30d`).
    pub keep: String,
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub name: String,
    pub cron: Cron,
    pub expr: String,
    pub keep: chrono::Duration,
}

impl Schedule {
    pub fn from_config(c: &ScheduleConfig) -> Result<Self> {
        let bad = |message: String| Error::Cron {
            name: c.name.clone(),
            cron: c.cron.clone(),
            message,
        };
        // Five fields like Kubernetes CronJobs and Velero schedules; croner
        // would also take a seconds field, which would surprise operators.
        if c.cron.split_whitespace().count() != 5 && !c.cron.trim_start().starts_with('@') {
            return Err(bad(
                "expected five fields: minute hour day month weekday".into()
            ));
        }
        let cron = Cron::from_str(&c.cron).map_err(|e| bad(e.to_string()))?;
        let invalid = |field: &'static str, value: &str, reason: String| Error::InvalidSchedule {
            schedule: c.name.clone(),
            field,
            value: value.to_owned(),
            reason,
        };
        let keep = marmoset_storage::parse_duration(&c.keep).map_err(|e| {
            let reason = match e {
                // Already says "invalid duration ...": no "invalid argument".
                marmoset_storage::Error::InvalidArgument(why) => why,
                other => other.to_string(),
            };
            invalid("keep", &c.keep, reason)
        })?;
        if !valid_tag_value(&c.name) {
            return Err(invalid(
                "name",
                &c.name,
                "the name must be letters, digits, '-' or '_'".into(),
            ));
        }
        Ok(Schedule {
            name: c.name.clone(),
            cron,
            expr: c.cron.clone(),
            keep,
        })
    }

    /// The first run strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&t, false).ok()
    }

    /// The latest run at or before `t`.
    pub fn last_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_previous_occurrence(&t, true).ok()
    }

    /// The tag every snapshot of this schedule carries.
    pub fn tag(&self) -> String {
        format!("schedule={}", self.name)
    }

    /// The name of the run that fired at `fire`, the same on every node
    /// (Velero's `daily-20260208020000`): all volume snapshots of one run
    /// carry `set=<name>`, so `verify --newest-tag set=daily-` finds the
    /// newest complete run across nodes.
    pub fn set_name(&self, fire: DateTime<Utc>) -> String {
        format!("{}-{}", self.name, fire.format("%Y%m%d%H%M%S"))
    }
}

fn valid_tag_value(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The schedule that fires first after `now`, with its time.
pub fn next_due(schedules: &[Schedule], now: DateTime<Utc>) -> Option<(usize, DateTime<Utc>)> {
    schedules
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.next_after(now).map(|t| (i, t)))
        .min_by_key(|(_, t)| *t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn sched(cron: &str, keep: &str) -> Result<Schedule> {
        Schedule::from_config(&ScheduleConfig {
            name: "daily".into(),
            cron: cron.into(),
            keep: keep.into(),
        })
    }

    #[test]
    fn seed_schedules_fire_when_velero_would() {
        let daily = sched("0 2 * * *", "168h").unwrap();
        let weekly = sched("0 3 * * 0", "720h").unwrap();
        // Saturday 2026-11-28 08:00 UTC.
        let now = Utc.with_ymd_and_hms(2026, 11, 28, 8, 0, 0).unwrap();
        assert_eq!(
            daily.next_after(now),
            Some(Utc.with_ymd_and_hms(2026, 11, 29, 2, 0, 0).unwrap())
        );
        assert_eq!(
            weekly.next_after(now),
            Some(Utc.with_ymd_and_hms(2026, 11, 29, 3, 0, 0).unwrap())
        );
        assert_eq!(
            daily.last_at_or_before(now),
            Some(Utc.with_ymd_and_hms(2026, 11, 28, 2, 0, 0).unwrap())
        );
        assert_eq!(
            weekly.last_at_or_before(now),
            Some(Utc.with_ymd_and_hms(2026, 11, 22, 3, 0, 0).unwrap())
        );
        assert_eq!(daily.keep, chrono::Duration::hours(168));
        assert_eq!(weekly.keep, chrono::Duration::days(30));
        // Exactly at a fire time, the next run is the following one.
        let at = Utc.with_ymd_and_hms(2026, 11, 29, 2, 0, 0).unwrap();
        assert_eq!(
            daily.next_after(at),
            Some(Utc.with_ymd_and_hms(2026, 11, 30, 2, 0, 0).unwrap())
        );
        let (i, t) = next_due(&[daily, weekly], now).unwrap();
        assert_eq!((i, t.format("%H").to_string()), (0, "02".to_string()));
    }

    #[test]
    fn bad_expressions_are_refused_with_the_schedule_name() {
        for bad in ["0 2 * *", "61 2 * * *", "0 2 * * * *", "every day"] {
            let e = sched(bad, "168h").unwrap_err().to_string();
            assert!(e.contains("daily") && e.contains(bad), "{e}");
        }
        assert!(sched("0 2 * * *", "forever").is_err());
    }

    /// Regression: a bad `keep` (or name) was reported as an invalid cron
    /// expression.
    #[test]
    fn a_bad_keep_or_name_is_not_reported_as_a_cron_error() {
        for keep in ["9999999999999h", "forever", "7x"] {
            let e = sched("0 2 * * *", keep).unwrap_err();
            assert!(
                matches!(&e, Error::InvalidSchedule { field: "keep", .. }),
                "{e:?}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains("daily") && msg.contains("keep") && msg.contains(keep),
                "{msg}"
            );
            assert!(!msg.contains("cron"), "{msg}");
        }
        let e = Schedule::from_config(&ScheduleConfig {
            name: "nightly db".into(),
            cron: "0 2 * * *".into(),
            keep: "168h".into(),
        })
        .unwrap_err();
        assert!(
            matches!(&e, Error::InvalidSchedule { field: "name", .. }),
            "{e:?}"
        );
        assert!(!e.to_string().contains("cron"), "{e}");
        // A bad cron expression is still reported as one.
        assert!(matches!(
            sched("61 2 * * *", "168h"),
            Err(Error::Cron { .. })
        ));
    }
}
