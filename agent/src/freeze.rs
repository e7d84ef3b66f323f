//! No application is left frozen. Before a pod's pre hook runs, its post
//! hook is written to the agent's state file; it is removed once the post
//! hook ran. Whatever stops the run in between (SIGTERM on a drain or a
//! rollout, a crash, `kill -9`), the pending post hooks are run at shutdown
//! and, for a process that could not, by the next agent before anything
//! else.

use chrono::Utc;
use tracing::{info, warn};

use crate::cluster::Subject;
use crate::discovery::PodPlan;
use crate::hooks::{Hook, OnError};
use crate::runner::Agent;
use crate::state::FrozenPod;

impl Agent {
    /// Records `post` as pending for `pod`, before its pre hook runs.
    pub(crate) async fn remember_frozen(&self, pod: &PodPlan, post: &Hook) {
        let entry = FrozenPod {
            namespace: pod.namespace.clone(),
            pod: pod.pod.clone(),
            pod_uid: pod.pod_uid.clone(),
            container: post.container.clone(),
            command: post.command.clone(),
            timeout_secs: post.timeout.as_secs().max(1),
            since: Utc::now(),
        };
        self.update_state(|st| {
            st.frozen.retain(|f| !f.same_pod(&pod.namespace, &pod.pod));
            st.frozen.push(entry);
        })
        .await;
    }

    pub(crate) async fn forget_frozen(&self, namespace: &str, pod: &str) {
        self.update_state(|st| st.frozen.retain(|f| !f.same_pod(namespace, pod)))
            .await;
    }

    /// Runs every post hook the state file lists as pending, all at once
    /// (so the wait is the longest timeout, not their sum), and forgets
    /// them: one attempt each, a failure is reported as a Warning Event.
    /// Returns how many were run.
    pub async fn thaw_leftovers(&self, why: &str) -> usize {
        let pending = {
            let _one = self.state_lock.lock().await;
            match self.state.load() {
                Ok(st) => st.map(|st| st.frozen).unwrap_or_default(),
                Err(e) => {
                    warn!(error = %e, "cannot read pending post hooks from the agent state");
                    Vec::new()
                }
            }
        };
        if pending.is_empty() {
            return 0;
        }
        info!(pods = pending.len(), why, "running pending post hooks");
        let runs = pending.iter().map(|f| self.thaw(f, why));
        futures::future::join_all(runs).await;
        self.update_state(|st| st.frozen.retain(|f| !pending.contains(f)))
            .await;
        pending.len()
    }

    async fn thaw(&self, f: &FrozenPod, why: &str) {
        let hook = Hook {
            container: f.container.clone(),
            command: f.command.clone(),
            on_error: OnError::Continue,
            timeout: std::time::Duration::from_secs(f.timeout_secs),
        };
        let subject = Subject::Pod {
            namespace: &f.namespace,
            name: &f.pod,
            uid: &f.pod_uid,
        };
        match self.cluster.exec(&f.namespace, &f.pod, "post", &hook).await {
            Ok(_) => {
                info!(namespace = %f.namespace, pod = %f.pod, "post hook run");
                self.cluster
                    .event(
                        subject,
                        false,
                        "PostHookRecovered",
                        &format!(
                            "post hook {why} run (pre hook ran at {})",
                            f.since.to_rfc3339()
                        ),
                    )
                    .await;
            }
            Err(e) => {
                warn!(namespace = %f.namespace, pod = %f.pod, error = %e, "pending post hook failed");
                self.metrics.hook_failed();
                self.cluster
                    .event(
                        subject,
                        true,
                        "HookFailed",
                        &format!(
                            "post hook {why} failed; the application may still be frozen: {e}"
                        ),
                    )
                    .await;
            }
        }
    }
}
