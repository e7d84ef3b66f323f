//! The plan object: a deferred deletion written by maintenance (phase 1)
//! and executed by a later run (phase 2). How plans are scanned and
//! honoured lives in `repo::coordination::plans`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A deferred deletion (phase 1 output, phase 2 input): `plans/<id>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub created: DateTime<Utc>,
    /// When the packs' index entries were gone; `None` if the run that
    /// wrote the plan died before (the plan is then discarded).
    pub hidden_at: Option<DateTime<Utc>>,
    /// Session leases that existed once the packs were hidden: only they
    /// can have seen the packs in an index. Deletion waits for each.
    #[serde(default)]
    pub sessions: Vec<String>,
    pub packs: Vec<String>,
}
