//! Which volumes on this node are backed up, and where their data is.
//!
//! Pure functions over API objects (pods, PVCs, PVs), so every rule is
//! testable without a cluster; `kube_api` fetches the objects.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};

use crate::config::AgentConfig;
use crate::hooks::{self, PodHooks};

/// Velero's opt-out annotation: comma-separated pod volume names.
pub const VELERO_EXCLUDES: &str = "backup.velero.io/backup-volumes-excludes";
/// Velero's opt-in annotation (used when `defaultVolumesToBackup` is false).
pub const VELERO_INCLUDES: &str = "backup.velero.io/backup-volumes";
/// Velero's pod/PVC label that removes an object from backups.
pub const VELERO_EXCLUDE_LABEL: &str = "velero.io/exclude-from-backup";
/// Our own opt-out: on a pod (comma-separated volume names) …
pub const EXCLUDE_VOLUMES: &str = "marmoset.dev/exclude-volumes";
/// … or on a PVC (`"true"`).
pub const EXCLUDE_PVC: &str = "marmoset.dev/exclude";

/// One volume to back up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeTarget {
    pub namespace: String,
    pub pvc: String,
    pub pvc_uid: Option<String>,
    pub pv: String,
    pub pod: String,
    pub pod_uid: String,
    /// The volume's name inside the pod spec.
    pub volume: String,
    pub storage_class: Option<String>,
    /// Where the data is, as seen from the agent container.
    pub path: PathBuf,
}

impl VolumeTarget {
    /// The snapshot source name: `<namespace>/<pvc>`.
    pub fn source(&self) -> String {
        format!("{}/{}", self.namespace, self.pvc)
    }
}

/// A volume left out of the run, with the reason. Opt-outs are
/// `intentional` (reported in the run's result); anything else (a CSI
/// volume of a pod that is not running, an unbound PVC, a missing PV) is
/// also recorded in the volume's status and as a Warning Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    pub volume: String,
    /// The claim, when the skip concerns one.
    pub pvc: Option<String>,
    pub reason: String,
    pub intentional: bool,
}

/// The pods of one node, grouped with the volumes to back up and their hooks.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub pods: Vec<PodPlan>,
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Clone)]
pub struct PodPlan {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    /// Hooks run only in running pods; a pod that is not running has none.
    pub hooks: PodHooks,
    pub volumes: Vec<VolumeTarget>,
}

impl Plan {
    pub fn volumes(&self) -> impl Iterator<Item = &VolumeTarget> {
        self.pods.iter().flat_map(|p| p.volumes.iter())
    }
}

/// Builds the plan for `node` from the listed objects. PVCs and PVs are
/// looked up by `(namespace, name)` and name.
pub fn plan(
    cfg: &AgentConfig,
    node: &str,
    pods: &[Pod],
    pvcs: &HashMap<(String, String), PersistentVolumeClaim>,
    pvs: &HashMap<String, PersistentVolume>,
) -> Plan {
    let mut out = Plan::default();
    // A ReadWriteMany PVC mounted by two pods on this node is backed up
    // once; running pods come first, so a volume that a running pod also
    // mounts is read through that pod's mount (and under its hooks).
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let (running, others): (Vec<&Pod>, Vec<&Pod>) = pods.iter().partition(|p| is_running(p));
    for pod in running.into_iter().chain(others) {
        let Some(p) = pod_plan(cfg, node, pod, pvcs, pvs, &mut seen, &mut out.skipped) else {
            continue;
        };
        if !p.volumes.is_empty() {
            out.pods.push(p);
        }
    }
    out.pods
        .sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
    out
}

fn is_running(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

fn pod_plan(
    cfg: &AgentConfig,
    node: &str,
    pod: &Pod,
    pvcs: &HashMap<(String, String), PersistentVolumeClaim>,
    pvs: &HashMap<String, PersistentVolume>,
    seen: &mut HashSet<(String, String)>,
    skipped: &mut Vec<Skipped>,
) -> Option<PodPlan> {
    let meta = &pod.metadata;
    let ns = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let name = meta.name.clone().unwrap_or_default();
    let spec = pod.spec.as_ref()?;
    if spec.node_name.as_deref() != Some(node) || !cfg.namespace_included(&ns) {
        return None;
    }
    let running = is_running(pod);
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Unknown".into());
    let labels = meta.labels.clone().unwrap_or_default();
    let annotations = meta.annotations.clone().unwrap_or_default();
    let uid = meta.uid.clone().unwrap_or_default();
    let mut skip = |volume: &str, pvc: Option<&str>, reason: String, intentional: bool| {
        skipped.push(Skipped {
            namespace: ns.clone(),
            pod: name.clone(),
            pod_uid: uid.clone(),
            volume: volume.into(),
            pvc: pvc.map(String::from),
            reason,
            intentional,
        })
    };
    if labels.get(VELERO_EXCLUDE_LABEL).map(String::as_str) == Some("true") {
        skip(
            "*",
            None,
            format!("pod labelled {VELERO_EXCLUDE_LABEL}=true"),
            true,
        );
        return None;
    }
    let excluded = list_annotation(&annotations, VELERO_EXCLUDES)
        .into_iter()
        .chain(list_annotation(&annotations, EXCLUDE_VOLUMES))
        .collect::<HashSet<_>>();
    let included = list_annotation(&annotations, VELERO_INCLUDES);
    let mut volumes = Vec::new();
    for vol in spec.volumes.iter().flatten() {
        let Some(claim) = &vol.persistent_volume_claim else {
            continue;
        };
        let claim_name = claim.claim_name.as_str();
        let key = (ns.clone(), claim.claim_name.clone());
        if seen.contains(&key) {
            continue;
        }
        if excluded.contains(&vol.name) {
            skip(
                &vol.name,
                Some(claim_name),
                "opted out by pod annotation".into(),
                true,
            );
            continue;
        }
        if !cfg.default_volumes_to_backup && !included.contains(&vol.name) {
            skip(
                &vol.name,
                Some(claim_name),
                format!("not listed in {VELERO_INCLUDES}"),
                true,
            );
            continue;
        }
        let Some(pvc) = pvcs.get(&key) else {
            skip(
                &vol.name,
                Some(claim_name),
                format!("PVC {claim_name} not found"),
                false,
            );
            continue;
        };
        let found = if running {
            target(cfg, &ns, &name, &uid, &vol.name, pvc, pvs)
        } else {
            target_without_pod(cfg, node, &ns, &name, &uid, &vol.name, pvc, pvs, &phase)
        };
        match found {
            Ok(t) => {
                seen.insert(key);
                volumes.push(t);
            }
            Err(Skip {
                reason,
                intentional,
            }) => skip(&vol.name, Some(claim_name), reason, intentional),
        }
    }
    Some(PodPlan {
        namespace: ns.clone(),
        pod: name.clone(),
        pod_uid: uid,
        hooks: if running {
            hooks::from_annotations(&annotations, cfg.hooks.default_timeout)
        } else {
            PodHooks::default()
        },
        volumes,
    })
}

/// Why a volume is not backed up.
struct Skip {
    reason: String,
    intentional: bool,
}

impl Skip {
    fn opt_out(reason: String) -> Self {
        Self {
            reason,
            intentional: true,
        }
    }
    fn problem(reason: String) -> Self {
        Self {
            reason,
            intentional: false,
        }
    }
}

/// A volume of a pod that is not running (Pending, Succeeded, Failed): no
/// kubelet mount to read, but hostPath and local PVs (K3s local-path) keep
/// their files at a host path, readable without the pod, when the PV lives
/// on this node.
#[allow(clippy::too_many_arguments)]
fn target_without_pod(
    cfg: &AgentConfig,
    node: &str,
    ns: &str,
    pod: &str,
    pod_uid: &str,
    volume: &str,
    pvc: &PersistentVolumeClaim,
    pvs: &HashMap<String, PersistentVolume>,
    phase: &str,
) -> Result<VolumeTarget, Skip> {
    let mut t = target(cfg, ns, pod, pod_uid, volume, pvc, pvs)?;
    let pv = pvs.get(&t.pv).and_then(|pv| pv.spec.as_ref());
    let host = pv.and_then(|spec| {
        spec.host_path
            .as_ref()
            .map(|h| h.path.clone())
            .or_else(|| spec.local.as_ref().map(|l| l.path.clone()))
    });
    let Some(host) = host else {
        return Err(Skip::problem(format!(
            "pod is {phase} and PV {} is mounted only while a pod runs",
            t.pv
        )));
    };
    match pv.map(|spec| pv_node(spec, node)) {
        Some(PvNode::Here) => {}
        Some(PvNode::Elsewhere) => {
            return Err(Skip::problem(format!(
                "pod is {phase} and PV {} is on another node",
                t.pv
            )))
        }
        _ => {
            return Err(Skip::problem(format!(
            "pod is {phase} and PV {} has no node affinity, so its host path may be another node's",
            t.pv
        )))
        }
    }
    t.path = under_prefix(&cfg.host_path_prefix, Path::new(&host));
    Ok(t)
}

enum PvNode {
    Here,
    Elsewhere,
    Unknown,
}

/// Which node a PV's `kubernetes.io/hostname` affinity names.
fn pv_node(spec: &k8s_openapi::api::core::v1::PersistentVolumeSpec, node: &str) -> PvNode {
    let terms = spec
        .node_affinity
        .as_ref()
        .and_then(|a| a.required.as_ref())
        .map(|r| r.node_selector_terms.as_slice())
        .unwrap_or_default();
    let mut named = false;
    for term in terms {
        for e in term.match_expressions.iter().flatten() {
            if e.key == "kubernetes.io/hostname" && e.operator == "In" {
                named = true;
                if e.values.iter().flatten().any(|v| v == node) {
                    return PvNode::Here;
                }
            }
        }
    }
    if named {
        PvNode::Elsewhere
    } else {
        PvNode::Unknown
    }
}

fn target(
    cfg: &AgentConfig,
    ns: &str,
    pod: &str,
    pod_uid: &str,
    volume: &str,
    pvc: &PersistentVolumeClaim,
    pvs: &HashMap<String, PersistentVolume>,
) -> Result<VolumeTarget, Skip> {
    let pvc_name = pvc.metadata.name.clone().unwrap_or_default();
    let pvc_ann = pvc.metadata.annotations.clone().unwrap_or_default();
    let pvc_labels = pvc.metadata.labels.clone().unwrap_or_default();
    if pvc_ann.get(EXCLUDE_PVC).map(String::as_str) == Some("true")
        || pvc_labels.get(VELERO_EXCLUDE_LABEL).map(String::as_str) == Some("true")
    {
        return Err(Skip::opt_out(format!("PVC {pvc_name} opted out")));
    }
    let spec = pvc.spec.clone().unwrap_or_default();
    let storage_class = spec.storage_class_name.clone();
    if let Some(sc) = &storage_class {
        if cfg.excluded_storage_classes.contains(sc) {
            return Err(Skip::opt_out(format!("storage class {sc} is excluded")));
        }
    }
    let pv_name = spec
        .volume_name
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Skip::problem(format!("PVC {pvc_name} is not bound")))?;
    let pv = pvs
        .get(&pv_name)
        .ok_or_else(|| Skip::problem(format!("PV {pv_name} not found")))?;
    let path = host_path(cfg, pod_uid, &pv_name, pv).map_err(Skip::problem)?;
    Ok(VolumeTarget {
        namespace: ns.into(),
        pvc: pvc_name,
        pvc_uid: pvc.metadata.uid.clone(),
        pv: pv_name,
        pod: pod.into(),
        pod_uid: pod_uid.into(),
        volume: volume.into(),
        storage_class,
        path,
    })
}

/// Where the kubelet (or the provisioner) keeps a PV's files.
///
/// CSI volumes are mounted at `pods/<uid>/volumes/kubernetes.io~csi/<pv>/mount`,
/// local PVs at `kubernetes.io~local-volume/<pv>`, NFS at
/// `kubernetes.io~nfs/<pv>`; hostPath PVs (K3s local-path provisioner) are
/// not mounted under the kubelet at all: their host path is read directly.
pub fn host_path(
    cfg: &AgentConfig,
    pod_uid: &str,
    pv_name: &str,
    pv: &PersistentVolume,
) -> Result<PathBuf, String> {
    let spec = pv.spec.as_ref().ok_or("PV has no spec")?;
    let volumes = cfg.kubelet_dir.join("pods").join(pod_uid).join("volumes");
    if spec.csi.is_some() {
        return Ok(volumes
            .join("kubernetes.io~csi")
            .join(pv_name)
            .join("mount"));
    }
    if spec.local.is_some() {
        return Ok(volumes.join("kubernetes.io~local-volume").join(pv_name));
    }
    if spec.nfs.is_some() {
        return Ok(volumes.join("kubernetes.io~nfs").join(pv_name));
    }
    if let Some(hp) = &spec.host_path {
        return Ok(under_prefix(&cfg.host_path_prefix, Path::new(&hp.path)));
    }
    Err(format!("PV {pv_name}: unsupported volume type"))
}

fn under_prefix(prefix: &Path, p: &Path) -> PathBuf {
    if prefix.as_os_str().is_empty() {
        return p.to_path_buf();
    }
    prefix.join(p.strip_prefix("/").unwrap_or(p))
}

fn list_annotation(ann: &BTreeMap<String, String>, key: &str) -> Vec<String> {
    ann.get(key)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}
