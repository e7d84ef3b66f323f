//! Clocks that disagree: the storage's time is the reference, a host's
//! clock is only trusted within these bounds.

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};

/// Largest difference between a host's clock and the storage's clock that
/// is tolerated. A backup refuses to start beyond half of it; a lease whose
/// own time is further than this from the storage's stamp is a replay (an
/// old genuine lease copied back) and is ignored.
pub const MAX_CLOCK_SKEW: chrono::Duration = chrono::Duration::minutes(30);
/// Where the storage gives no object times, hosts' clocks are compared
/// with this tolerance.
pub const CLOCK_SKEW: chrono::Duration = chrono::Duration::minutes(5);

/// Stops a writer whose clock is more than half of [`MAX_CLOCK_SKEW`] off
/// the storage's: its leases and plans would look replayed to others.
pub fn refuse_clock_skew(storage_now: Option<DateTime<Utc>>) -> Result<()> {
    let limit = MAX_CLOCK_SKEW / 2;
    match skew(storage_now) {
        Some(d) if d.abs() > limit => Err(Error::ClockSkew {
            skew_secs: d.num_seconds(),
            max_secs: limit.num_seconds(),
        }),
        _ => Ok(()),
    }
}

/// How far this host's clock is from the storage's (positive: ahead).
pub fn skew(storage_now: Option<DateTime<Utc>>) -> Option<chrono::Duration> {
    storage_now.map(|s| crate::util::now() - s)
}
