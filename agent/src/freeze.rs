//! No application is left frozen. Before a pod's pre hook runs, its post
//! hook is written to the agent's state file; it is removed once the post
//! hook ran. Whatever stops the run in between (SIGTERM on a drain or a
//! rollout, a crash, `kill -9`), the pending post hooks are run at shutdown
//! and, for a process that could not, by the next agent before anything
//! else.

use std::time::Duration;

use chrono::Utc;
use tracing::{info, warn};

use crate::cluster::Subject;
use crate::discovery::PodPlan;
use crate::hooks::{Hook, OnError};
use crate::runner::Agent;
use crate::state::FrozenPod;

/// A post hook run at shutdown waits at most this long, so that every
/// pending one fits in the DaemonSet's termination grace period (120 s);
/// one that did not finish stays pending for the next start.
pub const SHUTDOWN_HOOK_BUDGET: Duration = Duration::from_secs(90);

/// Post hooks that failed are tried again this often by a running agent.
pub const FAILED_THAW_RETRY: Duration = Duration::from_secs(60);

impl Agent {
    /// Records `post` as pending for `pod`, before its pre hook runs; false
    /// when the state file could not be written (then the pod must not be
    /// frozen: a crash would leave nobody who knows to thaw it).
    pub(crate) async fn remember_frozen(&self, pod: &PodPlan, post: &Hook) -> bool {
        let entry = FrozenPod {
            namespace: pod.namespace.clone(),
            pod: pod.pod.clone(),
            pod_uid: pod.pod_uid.clone(),
            container: post.container.clone(),
            command: post.command.clone(),
            timeout_secs: post.timeout.as_secs().max(1),
            since: Utc::now(),
            failed: false,
        };
        self.update_state(|st| {
            st.frozen.retain(|f| !f.same_pod(&pod.namespace, &pod.pod));
            st.frozen.push(entry);
        })
        .await
    }

    /// After the post hook ran: forgotten when it succeeded, kept (marked
    /// failed, retried) when it did not.
    pub(crate) async fn post_hook_done(&self, namespace: &str, pod: &str, ok: bool) {
        let _ = self
            .update_state(|st| {
                if ok {
                    st.frozen.retain(|f| !f.same_pod(namespace, pod));
                } else {
                    for f in st.frozen.iter_mut().filter(|f| f.same_pod(namespace, pod)) {
                        f.failed = true;
                    }
                }
            })
            .await;
    }

    /// The pending post hook of `pod` from an earlier run, if any.
    pub(crate) async fn pending_thaw(&self, namespace: &str, pod: &str) -> Option<FrozenPod> {
        let _one = self.state_lock.lock().await;
        let st = self.state.load().ok().flatten()?;
        st.frozen.into_iter().find(|f| f.same_pod(namespace, pod))
    }

    /// Runs the pending post hooks the state file lists, all at once (so
    /// the wait is the longest timeout, not their sum), each within
    /// `budget` if given. `only_failed` leaves alone the entries of pods
    /// that a run of this process froze and is about to thaw itself.
    /// Entries whose hook succeeded, or whose pod is gone (a new pod is
    /// not frozen), are forgotten; the others stay, marked failed, and are
    /// tried again later. Returns how many were run.
    pub async fn thaw_leftovers(&self, why: &str, budget: Option<Duration>) -> usize {
        self.thaw_pending(why, budget, false).await
    }

    pub(crate) async fn thaw_pending(
        &self,
        why: &str,
        budget: Option<Duration>,
        only_failed: bool,
    ) -> usize {
        let pending: Vec<FrozenPod> = {
            let _one = self.state_lock.lock().await;
            match self.state.load() {
                Ok(st) => st.map(|st| st.frozen).unwrap_or_default(),
                Err(e) => {
                    warn!(error = %e, "cannot read pending post hooks from the agent state");
                    Vec::new()
                }
            }
        }
        .into_iter()
        .filter(|f| f.failed || !only_failed)
        .collect();
        if pending.is_empty() {
            return 0;
        }
        info!(pods = pending.len(), why, "running pending post hooks");
        let runs = pending.iter().map(|f| self.thaw(f, why, budget));
        let done = futures::future::join_all(runs).await;
        let _ = self
            .update_state(|st| {
                for (f, ok) in pending.iter().zip(&done) {
                    if *ok {
                        st.frozen.retain(|g| g != f);
                    } else if let Some(g) = st.frozen.iter_mut().find(|g| *g == f) {
                        g.failed = true;
                    }
                }
            })
            .await;
        pending.len()
    }

    /// Runs one pending post hook; true when it ran or its pod is gone.
    pub(crate) async fn thaw(&self, f: &FrozenPod, why: &str, budget: Option<Duration>) -> bool {
        let mut timeout = Duration::from_secs(f.timeout_secs);
        if let Some(b) = budget {
            timeout = timeout.min(b);
        }
        let hook = Hook {
            container: f.container.clone(),
            command: f.command.clone(),
            on_error: OnError::Continue,
            timeout,
        };
        let subject = Subject::Pod {
            namespace: &f.namespace,
            name: &f.pod,
            uid: &f.pod_uid,
        };
        // A pod of that name but another UID is a new pod, never frozen:
        // its predecessor's thaw is not run in it.
        if let Ok(uid) = self.cluster.pod_uid(&f.namespace, &f.pod).await {
            if uid.as_deref() != Some(f.pod_uid.as_str()) {
                info!(namespace = %f.namespace, pod = %f.pod, "frozen pod is gone");
                return true;
            }
        }
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
                true
            }
            Err(e) => {
                // A pod that was deleted or replaced is not frozen any more.
                if let Ok(uid) = self.cluster.pod_uid(&f.namespace, &f.pod).await {
                    if uid.as_deref() != Some(f.pod_uid.as_str()) {
                        info!(namespace = %f.namespace, pod = %f.pod, "frozen pod is gone");
                        return true;
                    }
                }
                warn!(namespace = %f.namespace, pod = %f.pod, error = %e, "pending post hook failed");
                self.metrics.hook_failed();
                self.cluster
                    .event(
                        subject,
                        true,
                        "HookFailed",
                        &format!(
                            "post hook {why} failed; the application may still be frozen \
                             (tried again every {}s): {e}",
                            FAILED_THAW_RETRY.as_secs()
                        ),
                    )
                    .await;
                false
            }
        }
    }
}
