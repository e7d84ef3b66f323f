//! Everything the agent asks of or tells the Kubernetes API: pods and
//! volumes of this node, Events, per-volume status objects and hook execs.
//! Rules about what to back up live in `discovery`, not here.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{
    ConfigMap, Event, EventSource, ObjectReference, PersistentVolume, PersistentVolumeClaim, Pod,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, AttachParams, ListParams, PostParams};
use kube::Client;
use tokio::io::AsyncReadExt;
use tracing::{debug, warn};

use crate::config::AgentConfig;
use crate::discovery::{self, Plan, VolumeTarget};
use crate::error::{Error, Result};
use crate::hooks::Hook;
use crate::status::VolumeStatus;

/// Component name in Events and labels.
pub const COMPONENT: &str = "marmoset-agent";
const OUTPUT_LIMIT: usize = 4096;

#[derive(Clone)]
pub struct Cluster {
    client: Client,
    node: String,
    namespace: String,
}

/// What an Event is about.
#[derive(Debug, Clone)]
pub enum Subject<'a> {
    Pvc(&'a VolumeTarget),
    Pod {
        namespace: &'a str,
        name: &'a str,
        uid: &'a str,
    },
}

impl Cluster {
    /// `namespace` is the agent's own (status objects live there).
    pub fn new(client: Client, node: &str, namespace: &str) -> Self {
        Self {
            client,
            node: node.into(),
            namespace: namespace.into(),
        }
    }

    /// Connects with the in-cluster service account, or `KUBECONFIG` /
    /// `~/.kube/config` outside a cluster.
    pub async fn connect(node: &str, namespace: &str) -> Result<Self> {
        let client = Client::try_default()
            .await
            .map_err(|e| Error::kube("connect (in-cluster or KUBECONFIG)", e))?;
        Ok(Self::new(client, node, namespace))
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Pods on this node, PVCs and PVs they use, turned into a plan.
    pub async fn discover(&self, cfg: &AgentConfig) -> Result<Plan> {
        let pods = Api::<Pod>::all(self.client.clone())
            .list(&ListParams::default().fields(&format!("spec.nodeName={}", self.node)))
            .await
            .map_err(|e| Error::kube(format!("list pods on node {}", self.node), e))?
            .items;
        let mut pvcs = HashMap::new();
        let mut pvs = HashMap::new();
        for pod in &pods {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            if !cfg.namespace_included(&ns) {
                continue;
            }
            let claims = pod
                .spec
                .iter()
                .flat_map(|s| s.volumes.iter().flatten())
                .filter_map(|v| v.persistent_volume_claim.as_ref());
            for claim in claims {
                let key = (ns.clone(), claim.claim_name.clone());
                if pvcs.contains_key(&key) {
                    continue;
                }
                let api = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &ns);
                let Some(pvc) = api
                    .get_opt(&claim.claim_name)
                    .await
                    .map_err(|e| Error::kube(format!("get PVC {ns}/{}", claim.claim_name), e))?
                else {
                    continue;
                };
                if let Some(pv_name) = pvc.spec.as_ref().and_then(|s| s.volume_name.clone()) {
                    if let Entry::Vacant(slot) = pvs.entry(pv_name) {
                        let api = Api::<PersistentVolume>::all(self.client.clone());
                        let name = slot.key().clone();
                        if let Some(pv) = api
                            .get_opt(&name)
                            .await
                            .map_err(|e| Error::kube(format!("get PV {name}"), e))?
                        {
                            slot.insert(pv);
                        }
                    }
                }
                pvcs.insert(key, pvc);
            }
        }
        Ok(discovery::plan(cfg, &self.node, &pods, &pvcs, &pvs))
    }

    /// Records an Event; failures are logged, never fatal to a backup.
    pub async fn event(&self, subject: Subject<'_>, warning: bool, reason: &str, message: &str) {
        if let Err(e) = self.try_event(subject, warning, reason, message).await {
            warn!(error = %e, reason, "could not record event");
        }
    }

    async fn try_event(
        &self,
        subject: Subject<'_>,
        warning: bool,
        reason: &str,
        message: &str,
    ) -> Result<()> {
        let (ns, object) = match subject {
            Subject::Pvc(t) => (
                t.namespace.clone(),
                ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("PersistentVolumeClaim".into()),
                    name: Some(t.pvc.clone()),
                    namespace: Some(t.namespace.clone()),
                    uid: t.pvc_uid.clone(),
                    ..Default::default()
                },
            ),
            Subject::Pod {
                namespace,
                name,
                uid,
            } => (
                namespace.to_string(),
                ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(name.into()),
                    namespace: Some(namespace.into()),
                    uid: Some(uid.into()),
                    ..Default::default()
                },
            ),
        };
        let now = jiff::Timestamp::now();
        let base = object.name.clone().unwrap_or_default();
        let ev = Event {
            metadata: ObjectMeta {
                // kubectl's convention: object name plus a unique suffix.
                name: Some(format!("{base}.{:x}", now.as_nanosecond())),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: object,
            reason: Some(reason.into()),
            message: Some(truncate(message, 1024)),
            type_: Some(if warning { "Warning" } else { "Normal" }.into()),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            count: Some(1),
            source: Some(EventSource {
                component: Some(COMPONENT.into()),
                host: Some(self.node.clone()),
            }),
            reporting_component: Some(COMPONENT.into()),
            reporting_instance: Some(self.node.clone()),
            action: Some("Backup".into()),
            ..Default::default()
        };
        Api::<Event>::namespaced(self.client.clone(), &ns)
            .create(&PostParams::default(), &ev)
            .await
            .map_err(|e| Error::kube(format!("create event in {ns}"), e))?;
        Ok(())
    }

    /// Creates or replaces the volume's status ConfigMap in the agent's
    /// namespace.
    pub async fn write_status(&self, status: &VolumeStatus) -> Result<()> {
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), &self.namespace);
        let name = status.object_name();
        let mut labels = BTreeMap::new();
        labels.insert("app.kubernetes.io/managed-by".into(), COMPONENT.into());
        // Label values are at most 63 characters; the data holds the full
        // names whatever their length.
        for (k, v) in [
            ("marmoset.dev/namespace", &status.namespace),
            ("marmoset.dev/pvc", &status.pvc),
            ("marmoset.dev/schedule", &status.schedule),
            ("marmoset.dev/node", &status.node),
        ] {
            if v.len() <= 63 {
                labels.insert(k.into(), v.clone());
            }
        }
        let mut cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels),
                ..Default::default()
            },
            data: Some(status.to_data()),
            ..Default::default()
        };
        // Two tries: a concurrent writer (another node after a pod moved)
        // only costs one retry.
        for _ in 0..2 {
            match api.get_opt(&name).await {
                Ok(Some(old)) => {
                    cm.metadata.resource_version = old.metadata.resource_version;
                    match api.replace(&name, &PostParams::default(), &cm).await {
                        Ok(_) => return Ok(()),
                        Err(e) if crate::error::is_conflict(&e) => continue,
                        Err(e) => return Err(Error::kube(format!("replace status {name}"), e)),
                    }
                }
                Ok(None) => match api.create(&PostParams::default(), &cm).await {
                    Ok(_) => return Ok(()),
                    Err(e) if crate::error::is_conflict(&e) => continue,
                    Err(e) => return Err(Error::kube(format!("create status {name}"), e)),
                },
                Err(e) => return Err(Error::kube(format!("get status {name}"), e)),
            }
        }
        Err(Error::Task(format!("status {name}: kept conflicting")))
    }

    /// The status object of one volume and schedule, if it has one.
    pub async fn status(
        &self,
        namespace: &str,
        pvc: &str,
        schedule: &str,
    ) -> Result<Option<VolumeStatus>> {
        let name = crate::status::object_name(schedule, namespace, pvc);
        let cm = Api::<ConfigMap>::namespaced(self.client.clone(), &self.namespace)
            .get_opt(&name)
            .await
            .map_err(|e| Error::kube(format!("get status {name}"), e))?;
        Ok(cm.and_then(|cm| cm.data.as_ref().and_then(VolumeStatus::from_data)))
    }

    /// Deletes a status object (its PVC is gone); a missing one is fine.
    pub async fn delete_status(&self, name: &str) -> Result<()> {
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), &self.namespace);
        match api.delete(name, &Default::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(Error::kube(format!("delete status {name}"), e)),
        }
    }

    /// Whether a PVC exists (an API error is an error, never "gone").
    pub async fn pvc_exists(&self, namespace: &str, name: &str) -> Result<bool> {
        Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map(|p| p.is_some())
            .map_err(|e| Error::kube(format!("get PVC {namespace}/{name}"), e))
    }

    /// Every volume status object in the agent's namespace, with its name.
    pub async fn status_objects(&self) -> Result<Vec<(String, VolumeStatus)>> {
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), &self.namespace);
        let list = api
            .list(
                &ListParams::default().labels(&format!("app.kubernetes.io/managed-by={COMPONENT}")),
            )
            .await
            .map_err(|e| Error::kube(format!("list status objects in {}", self.namespace), e))?;
        Ok(list
            .items
            .iter()
            .filter_map(|cm| {
                let status = cm.data.as_ref().and_then(VolumeStatus::from_data)?;
                Some((cm.metadata.name.clone()?, status))
            })
            .collect())
    }

    /// The nodes running an agent (pods labelled
    /// `app.kubernetes.io/name=marmoset` in the agent's namespace): those
    /// expected to report to a backup set.
    pub async fn agent_nodes(&self) -> Result<Vec<String>> {
        let api = Api::<Pod>::namespaced(self.client.clone(), &self.namespace);
        let pods = api
            .list(&ListParams::default().labels("app.kubernetes.io/name=marmoset"))
            .await
            .map_err(|e| Error::kube("list agent pods", e))?;
        let mut nodes: Vec<String> = pods
            .items
            .into_iter()
            .filter_map(|p| p.spec.and_then(|s| s.node_name))
            .collect();
        nodes.sort();
        nodes.dedup();
        Ok(nodes)
    }

    /// Every volume status object in the agent's namespace.
    pub async fn statuses(&self) -> Result<Vec<VolumeStatus>> {
        Ok(self
            .status_objects()
            .await?
            .into_iter()
            .map(|(_, s)| s)
            .collect())
    }

    /// Runs `hook` in the pod and waits for it, within its timeout.
    /// Returns the command's output (truncated) on success.
    /// The UID of pod `name`, `None` when there is no such pod.
    pub async fn pod_uid(&self, namespace: &str, name: &str) -> Result<Option<String>> {
        let api = Api::<Pod>::namespaced(self.client.clone(), namespace);
        match api.get_opt(name).await {
            Ok(p) => Ok(p.and_then(|p| p.metadata.uid)),
            Err(e) => Err(Error::kube(format!("reading pod {namespace}/{name}"), e)),
        }
    }

    pub async fn exec(
        &self,
        namespace: &str,
        pod: &str,
        phase: &str,
        hook: &Hook,
    ) -> Result<String> {
        let err = |container: &str, message: String| Error::Hook {
            phase: phase.into(),
            namespace: namespace.into(),
            pod: pod.into(),
            container: container.into(),
            message,
        };
        let api = Api::<Pod>::namespaced(self.client.clone(), namespace);
        let container = match &hook.container {
            Some(c) => c.clone(),
            None => {
                let p = api
                    .get(pod)
                    .await
                    .map_err(|e| err("?", format!("reading the pod: {e}")))?;
                p.spec
                    .and_then(|s| s.containers.first().map(|c| c.name.clone()))
                    .ok_or_else(|| err("?", "pod has no containers".into()))?
            }
        };
        let params = AttachParams::default()
            .container(container.clone())
            .stdout(true)
            .stderr(true);
        debug!(namespace, pod, %container, command = ?hook.command, "running {phase} hook");
        let run = async {
            let mut proc = api
                .exec(pod, hook.command.clone(), &params)
                .await
                .map_err(|e| err(&container, format!("exec: {e}")))?;
            let status = proc.take_status();
            let mut out = proc.stdout();
            let mut errout = proc.stderr();
            // Both streams are drained as they come: a full pipe would stall
            // the command.
            let (o, e) = tokio::join!(read_limited(out.as_mut()), read_limited(errout.as_mut()));
            let status = match status {
                Some(s) => s.await,
                None => None,
            };
            let _ = proc.join().await;
            Ok::<_, Error>((status, o, e))
        };
        let (status, stdout, stderr) = tokio::time::timeout(hook.timeout, run)
            .await
            .map_err(|_| err(&container, format!("timed out after {:?}", hook.timeout)))??;
        match status {
            Some(s) if s.status.as_deref() == Some("Success") => Ok(stdout),
            Some(s) => Err(err(
                &container,
                format!(
                    "{} {}",
                    s.message.unwrap_or_else(|| "command failed".into()),
                    truncate(stderr.trim(), 512)
                )
                .trim()
                .to_string(),
            )),
            None => Err(err(&container, "no exit status from the API server".into())),
        }
    }
}

async fn read_limited<R: tokio::io::AsyncRead + Unpin>(r: Option<&mut R>) -> String {
    let Some(r) = r else {
        return String::new();
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if buf.len() < OUTPUT_LIMIT {
                    buf.extend_from_slice(&chunk[..n.min(OUTPUT_LIMIT - buf.len())]);
                }
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
