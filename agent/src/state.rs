//! The agent's local memory of its runs, kept on the node (a hostPath) so a
//! restarted agent knows whether a run was missed or interrupted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScheduleState {
    pub last_started: Option<DateTime<Utc>>,
    pub last_completed: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub schedules: BTreeMap<String, ScheduleState>,
    /// Pods whose pre hook was started and whose post hook has not run
    /// yet: written before the pre hook runs, removed after the post hook,
    /// so an agent killed in between thaws them when it starts again.
    #[serde(default)]
    pub frozen: Vec<FrozenPod>,
}

/// A pending post hook, with everything needed to run it after a restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FrozenPod {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    pub container: Option<String>,
    pub command: Vec<String>,
    pub timeout_secs: u64,
    pub since: DateTime<Utc>,
    /// The post hook ran and failed: the pod may still be frozen. Such
    /// entries are retried until the hook succeeds or the pod is gone,
    /// and the pod is not frozen again meanwhile.
    #[serde(default)]
    pub failed: bool,
}

impl FrozenPod {
    pub fn same_pod(&self, namespace: &str, pod: &str) -> bool {
        self.namespace == namespace && self.pod == pod
    }
}

pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path, node: &str) -> Self {
        Self {
            path: dir.join(format!("agent-state-{node}.json")),
        }
    }

    fn err(&self, message: impl ToString) -> Error {
        Error::State {
            path: self.path.display().to_string(),
            message: message.to_string(),
        }
    }

    /// A missing file is an empty state (first start).
    pub fn load(&self) -> Result<Option<State>> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| self.err(e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Written to a temporary file and renamed, so a crash leaves the old
    /// state or the new one.
    pub fn save(&self, state: &State) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.err(e))?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| self.err(e))?;
        // Durable before it replaces the old state: the pending post hooks
        // in it must survive a crash of the node, not only of the agent.
        let mut f = std::fs::File::create(&tmp).map_err(|e| self.err(e))?;
        std::io::Write::write_all(&mut f, &bytes).map_err(|e| self.err(e))?;
        f.sync_all().map_err(|e| self.err(e))?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(|e| self.err(e))
    }
}

/// Whether a schedule must run now because its last run was interrupted
/// or a fire time passed while the agent was down.
pub fn catch_up_due(s: &ScheduleState, last_fire: Option<DateTime<Utc>>) -> bool {
    let interrupted = match (s.last_started, s.last_completed) {
        (Some(st), Some(done)) => st > done,
        (Some(_), None) => true,
        _ => false,
    };
    let missed = match (last_fire, s.last_started) {
        (Some(fire), Some(st)) => fire > st,
        _ => false,
    };
    interrupted || missed
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, h, 0, 0).unwrap()
    }

    #[test]
    fn interrupted_and_missed_runs_are_caught_up() {
        let done = ScheduleState {
            last_started: Some(t(2)),
            last_completed: Some(t(3)),
        };
        assert!(!catch_up_due(&done, Some(t(2))), "last fire already ran");
        assert!(
            catch_up_due(&done, Some(t(4))),
            "a fire time passed while down"
        );
        let killed = ScheduleState {
            last_started: Some(t(5)),
            last_completed: Some(t(3)),
        };
        assert!(catch_up_due(&killed, Some(t(5))), "the run was interrupted");
        let never = ScheduleState {
            last_started: Some(t(5)),
            last_completed: None,
        };
        assert!(catch_up_due(&never, None));
        assert!(!catch_up_due(&ScheduleState::default(), Some(t(1))));
    }

    #[test]
    fn state_survives_a_restart_and_a_corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path(), "node-a");
        assert!(f.load().unwrap().is_none());
        let mut st = State::default();
        st.schedules.insert(
            "daily".into(),
            ScheduleState {
                last_started: Some(t(2)),
                last_completed: None,
            },
        );
        f.save(&st).unwrap();
        let back = f.load().unwrap().unwrap();
        assert_eq!(back.schedules["daily"].last_started, Some(t(2)));
        std::fs::write(dir.path().join("agent-state-node-a.json"), b"{not json").unwrap();
        let e = f.load().unwrap_err().to_string();
        assert!(e.contains("agent-state-node-a.json"), "{e}");
    }
}
