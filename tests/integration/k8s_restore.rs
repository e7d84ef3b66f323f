//! Backup sets back into a cluster: `marmoset k8s restore` (the binary)
//! and the node agent's volume restores, against the fake API server with
//! the seed's kind of objects (Deployments, StatefulSets with
//! volumeClaimTemplates, Services, ConfigMaps, Secrets, local-path PVCs
//! bound on first use) and real files laid out like the kubelet's.
//!
//! No controller runs behind the fake API server, so `Controllers` plays
//! the parts the restore relies on: the ReplicaSet and StatefulSet
//! controllers make a pod from a restored template, the scheduler puts
//! pods on node-a, the local-path provisioner binds a claim once a pod
//! uses it (WaitForFirstConsumer), and the kubelet creates the pod's
//! emptyDir.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use marmoset_agent::Agent;
use serde_json::{json, Value};

use super::agent::{agent_pod, claim, fill, pv, pvc, read_tree, world, World, AGENT_NS, NODE};

const PASSWORD: &str = "agent test password";
const SET_FIRE: &str = "2026-02-08T02:00:00Z";
const SET: &str = "daily-20260208020000";
const IMAGE: &str = "registry.example/marmoset:test";
/// The selector restore of the seed's procedure: the claims labelled
/// app=bookmarked in `default`.
const BOOKMARKED_CLAIMS: &[&str] = &[
    "--include-namespaces",
    "default",
    "--include-resources",
    "persistentvolumeclaims",
    "--selector",
    "app=bookmarked",
];

/// `--json k8s restore --from SET <args> --wait`, as the tests run it.
fn restore_args<'a>(set: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--json", "k8s", "restore", "--from", set];
    v.extend_from_slice(args);
    v.extend_from_slice(&["--wait", "--timeout", "90s", "--poll", "1s"]);
    v
}

fn bookmarked_dir(w: &World) -> PathBuf {
    w.host()
        .join("var/lib/rancher/k3s/storage/pvc-bm_default_bookmarked-data")
}

fn www_dir(w: &World) -> PathBuf {
    w.kubelet()
        .join("pods/uid-web0/volumes/kubernetes.io~csi/pvc-www/mount")
}

fn owner(kind: &str, name: &str) -> Value {
    json!([{"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": format!("uid-{name}"), "controller": true}])
}

/// The seed's `default` namespace beyond the agent world's pods: an app
/// with a Deployment, a StatefulSet, their Service, configuration and
/// the objects a real API server derives (which are not saved).
fn seed_objects(w: &World) {
    fill(&bookmarked_dir(w), 21, 7);
    fill(&www_dir(w), 23, 5);
    let template = |app: &str, vols: Value| {
        json!({"metadata": {"labels": {"app": app}},
               "spec": {"containers": [{"name": app, "image": format!("{app}:1"),
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                        "volumes": vols}})
    };
    w.api.with(|s| {
        s.add(agent_pod(NODE));
        s.add(json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "marmoset-agent", "namespace": AGENT_NS, "labels": {"app.kubernetes.io/name": "marmoset"}},
            "spec": {"template": {"spec": {"containers": [{"name": "agent", "image": IMAGE}]}}}}));
        s.add(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "default", "uid": "uid-ns-default", "creationTimestamp": "2025-01-01T00:00:00Z",
                         "labels": {"kubernetes.io/metadata.name": "default"}},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}));
        // bookmarked: Deployment → ReplicaSet → Pod, a local-path claim.
        s.add(json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "bookmarked", "namespace": "default", "labels": {"app": "bookmarked"},
                         "generation": 4, "creationTimestamp": "2025-03-01T00:00:00Z",
                         "managedFields": [{"manager": "argocd"}]},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "bookmarked"}},
                     "template": template("bookmarked", json!([claim("data", "bookmarked-data"),
                        {"name": "kube-api-access-x1", "projected": {"sources": []}}]))},
            "status": {"readyReplicas": 1}}));
        s.add(json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": "bookmarked-5c9f", "namespace": "default", "ownerReferences": owner("Deployment", "bookmarked")},
            "spec": {"template": template("bookmarked", json!([claim("data", "bookmarked-data")]))}}));
        let mut bm_pod = super::agent::pod("default", "bookmarked-5c9f-x2", "uid-bm", NODE, "Running",
            json!([claim("data", "bookmarked-data")]), json!({}));
        bm_pod["metadata"]["ownerReferences"] = owner("ReplicaSet", "bookmarked-5c9f");
        bm_pod["metadata"]["labels"] = json!({"app": "bookmarked"});
        s.add(bm_pod);
        let mut bm_pvc = pvc("default", "bookmarked-data", "pvc-bm", "local-path",
            json!({"volume.kubernetes.io/selected-node": NODE, "pv.kubernetes.io/bind-completed": "yes"}));
        bm_pvc["metadata"]["labels"] = json!({"app": "bookmarked"});
        s.add(bm_pvc);
        s.add(pv("pvc-bm", json!({"hostPath": {"path": "/var/lib/rancher/k3s/storage/pvc-bm_default_bookmarked-data"},
            "claimRef": {"namespace": "default", "name": "bookmarked-data", "uid": "uid-old"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE]}]}]}}})));
        s.add(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "bookmarked", "namespace": "default", "labels": {"app": "bookmarked"}},
            "spec": {"type": "NodePort", "clusterIP": "10.43.0.15", "clusterIPs": ["10.43.0.15"],
                     "selector": {"app": "bookmarked"}, "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}]}}));
        s.add(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "bookmarked-config", "namespace": "default", "labels": {"app": "bookmarked"}},
            "data": {"LOG_LEVEL": "info"}}));
        s.add(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "bookmarked-secret", "namespace": "default", "labels": {"app": "bookmarked"}},
            "type": "Opaque", "data": {"password": "aHVudGVyMg=="}}));
        // web: a StatefulSet with a volumeClaimTemplate.
        s.add(json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"replicas": 1, "serviceName": "web", "selector": {"matchLabels": {"app": "web"}},
                     "template": template("web", json!([])),
                     "volumeClaimTemplates": [{"metadata": {"name": "data"},
                        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local-path",
                                 "resources": {"requests": {"storage": "1Gi"}}}}]}}));
        let mut web0 = super::agent::pod("default", "web-0", "uid-web0", NODE, "Running",
            json!([claim("data", "data-web-0")]), json!({}));
        web0["metadata"]["ownerReferences"] = owner("StatefulSet", "web");
        s.add(web0);
        s.add(pvc("default", "data-web-0", "pvc-www", "csi-hostpath", json!({})));
        s.add(pv("pvc-www", json!({"csi": {"driver": "hostpath.csi.k8s.io", "volumeHandle": "www"}})));
        // Derived or per-cluster: never saved, or saved and never restored.
        s.add(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "default-token-abcde", "namespace": "default"},
            "type": "kubernetes.io/service-account-token", "data": {}}));
        s.add(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "kube-root-ca.crt", "namespace": "default"}, "data": {"ca.crt": "x"}}));
        s.add(json!({"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": "bookmarked.1", "namespace": "default"}, "reason": "Pulled"}));
        s.add(json!({"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "bookmarked", "namespace": "default"}, "subsets": []}));
    });
}

/// A world with the seed's objects and one daily set taken on node-a.
async fn world_with_set() -> (World, Agent) {
    let w = world().await;
    seed_objects(&w);
    let agent = w.agent(NODE, "restores:\n  pollInterval: 1s\n");
    let sched = agent.schedule("daily").unwrap().clone();
    let fire = chrono::DateTime::parse_from_rfc3339(SET_FIRE)
        .unwrap()
        .with_timezone(&chrono::Utc);
    let report = agent.run_schedule(&sched, fire).await.unwrap();
    assert_eq!(report.set, SET);
    assert_eq!(report.failed(), 0, "{report:#?}");
    (w, agent)
}

fn kubeconfig(w: &World) -> PathBuf {
    let path = w.dir.path().join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: admin\n  user:\n    token: t\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: admin\n    namespace: default\ncurrent-context: fake\n",
            w.api.addr
        ),
    )
    .unwrap();
    path
}

fn cli(w: &World, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_marmoset"));
    c.env("MARMOSET_REPOSITORY", w.dir.path().join("repo"))
        .env("MARMOSET_PASSWORD", PASSWORD)
        .env_remove("MARMOSET_PASSWORD_FILE")
        // Not the agent's cache: that one is open in this process.
        .env("MARMOSET_CACHE_DIR", w.dir.path().join("cli-cache"))
        .env("KUBECONFIG", kubeconfig(w))
        .env_remove("MARMOSET_IMAGE")
        .arg("-q")
        .args(args);
    c
}

/// Runs the CLI in the background while the controllers and the agent
/// do their parts; returns its output.
async fn run_with_cluster(w: &World, agent: &Agent, args: &[&str]) -> Output {
    run_all_with_cluster(w, agent, &[args]).await.remove(0)
}

/// Runs the commands at the same time while the fake controllers and the
/// agent's restore rounds go on; their outputs, in order.
async fn run_all_with_cluster(w: &World, agent: &Agent, commands: &[&[&str]]) -> Vec<Output> {
    let children: Vec<_> = commands
        .iter()
        .map(|args| {
            let mut cmd = cli(w, args);
            tokio::task::spawn_blocking(move || cmd.output().unwrap())
        })
        .collect();
    let start = Instant::now();
    let mut round = 0;
    while !children.iter().all(|c| c.is_finished()) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "marmoset {commands:?} did not finish"
        );
        // Pods wait a few rounds for their claims (WaitForFirstConsumer):
        // the agent must wait too, not fail.
        round += 1;
        controllers(w, round > 5);
        agent.restore_round().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut outputs = Vec::new();
    for c in children {
        outputs.push(c.await.unwrap());
    }
    outputs
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A `--wait --json` restore that exited 1 with its one volume Failed
/// for `why`; returns that volume's item.
fn failed_volume(out: &Output, why: &str) -> Value {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let rec: Value = serde_json::from_slice(&out.stdout).unwrap();
    let v = rec["volumes"][0].clone();
    assert_eq!(v["phase"], "Failed", "{rec:#}");
    assert!(v["error"].as_str().unwrap().contains(why), "{v:#}");
    v
}

fn restored_marker(w: &World, uid: &str) -> PathBuf {
    w.kubelet()
        .join("pods")
        .join(uid)
        .join("volumes/kubernetes.io~empty-dir/marmoset-restore-wait")
}

/// One round of what the cluster's controllers, scheduler, provisioner
/// and kubelet would do for restored objects; `bind`: whether the
/// provisioner has got round to binding the claims of scheduled pods.
fn controllers(w: &World, bind: bool) {
    let host = w.host();
    let kubelet = w.kubelet();
    w.api.with(|s| {
        // Workload controllers: one pod per restored template.
        for kind in ["Deployment", "StatefulSet"] {
            for obj in s.all(kind) {
                let ns = obj["metadata"]["namespace"].as_str().unwrap().to_string();
                let name = obj["metadata"]["name"].as_str().unwrap().to_string();
                let template = &obj["spec"]["template"];
                if template["metadata"]["annotations"]["marmoset.dev/restore"].is_null() {
                    continue;
                }
                let pod_name = if kind == "StatefulSet" {
                    format!("{name}-0")
                } else {
                    format!("{name}-restored")
                };
                if s.get("v1", "Pod", Some(&ns), &pod_name).is_some() {
                    continue;
                }
                let mut spec = template["spec"].clone();
                for t in obj["spec"]["volumeClaimTemplates"].as_array().into_iter().flatten() {
                    let tn = t["metadata"]["name"].as_str().unwrap();
                    spec["volumes"]
                        .as_array_mut()
                        .unwrap()
                        .push(claim(tn, &format!("{tn}-{name}-0")));
                }
                s.add(json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod_name, "namespace": ns, "uid": format!("uid-{ns}-{pod_name}"),
                                 "annotations": template["metadata"]["annotations"].clone(),
                                 "labels": template["metadata"]["labels"].clone(),
                                 "ownerReferences": owner(kind, &name)},
                    "spec": spec, "status": {"phase": "Pending"}}));
            }
        }
        // Scheduler, provisioner (local-path, WaitForFirstConsumer), kubelet.
        for mut pod in s.all("Pod") {
            let restored = !pod["metadata"]["annotations"]["marmoset.dev/restore"].is_null();
            if !restored {
                continue;
            }
            let ns = pod["metadata"]["namespace"].as_str().unwrap().to_string();
            if pod["spec"]["nodeName"].is_null() {
                pod["spec"]["nodeName"] = json!(NODE);
                s.add(pod.clone());
            }
            let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
            std::fs::create_dir_all(restored_marker(w, &uid)).unwrap();
            let _ = &kubelet;
            for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
                let Some(c) = v["persistentVolumeClaim"]["claimName"].as_str() else {
                    continue;
                };
                let Some(mut claim_obj) = s.get("v1", "PersistentVolumeClaim", Some(&ns), c) else {
                    continue;
                };
                if !bind || claim_obj["spec"]["volumeName"].as_str().is_some() {
                    continue;
                }
                let pv_name = format!("pvc-new-{ns}-{c}");
                let path = format!("/var/lib/rancher/k3s/storage/{pv_name}_{ns}_{c}");
                let dir = host.join(path.trim_start_matches('/'));
                if std::fs::symlink_metadata(&dir).is_err() {
                    std::fs::create_dir_all(&dir).unwrap();
                    // What an application image might have put there first.
                    std::fs::write(dir.join("initialised-by-app"), b"x").unwrap();
                }
                s.add(pv(&pv_name, json!({"hostPath": {"path": path},
                    "claimRef": {"namespace": ns, "name": c}})));
                claim_obj["spec"]["volumeName"] = json!(pv_name);
                claim_obj["status"] = json!({"phase": "Bound"});
                s.add(claim_obj);
            }
        }
    });
}

fn new_volume_dir(w: &World, ns: &str, claim: &str) -> PathBuf {
    w.host().join(format!(
        "var/lib/rancher/k3s/storage/pvc-new-{ns}-{claim}_{ns}_{claim}"
    ))
}

fn tree_without(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    read_tree(dir)
}

/// The run saves the objects of its namespaces, less the derived ones;
/// `k8s restore --namespace-mappings` brings `default` back as another
/// namespace, cleaned, in order, with each volume's data restored by the
/// agent into a new volume before its pod starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_restores_under_another_name_with_its_volumes() {
    let (w, agent) = world_with_set().await;
    let (sets, _) = marmoset_storage::sets(&w.repo, chrono::Utc::now()).unwrap();
    let set = sets.iter().find(|s| s.name == SET).unwrap();
    let objects = set.objects.clone().expect("objects saved with the set");
    assert!(objects.errors.is_empty(), "{objects:?}");
    assert!(objects.namespaces.contains(&"default".to_string()));
    // What was saved: read back through the same code the restore uses.
    let saved = marmoset_agent::restore::read_objects(&w.repo, set).unwrap();
    let keys: Vec<String> = saved
        .iter()
        .map(|s| {
            format!(
                "{} {}/{}",
                s.rt.key(),
                s.namespace().unwrap_or("-"),
                s.name()
            )
        })
        .collect();
    for want in [
        "deployments.apps default/bookmarked",
        "statefulsets.apps default/web",
        "services default/bookmarked",
        "secrets default/bookmarked-secret",
        "persistentvolumeclaims default/bookmarked-data",
        "persistentvolumes -/pvc-bm",
        "namespaces -/default",
        "pods default/postgresql-0",
    ] {
        assert!(
            keys.iter().any(|k| k == want),
            "{want} not saved: {keys:#?}"
        );
    }
    for never in [
        "replicasets.apps default/bookmarked-5c9f",
        "pods default/bookmarked-5c9f-x2",
        "pods default/web-0",
        "events default/bookmarked.1",
        "endpoints default/bookmarked",
        "persistentvolumes -/pvc-e",
    ] {
        assert!(!keys.iter().any(|k| k == never), "{never} saved: {keys:#?}");
    }
    assert_eq!(objects.count as usize, saved.len());
    // Stored as the API returned it: status and uid included.
    let dep = saved
        .iter()
        .find(|s| s.name() == "bookmarked" && s.rt.kind == "Deployment")
        .unwrap();
    assert_eq!(dep.obj["status"]["readyReplicas"], 1);

    let before_rv = w.api.with(|s| {
        s.get(
            "v1",
            "PersistentVolumeClaim",
            Some("default"),
            "bookmarked-data",
        )
        .unwrap()["metadata"]["resourceVersion"]
            .clone()
    });
    let out = run_with_cluster(
        &w,
        &agent,
        &restore_args(
            SET,
            &[
                "--include-namespaces",
                "default",
                "--namespace-mappings",
                "default:restored-default",
            ],
        ),
    )
    .await;
    let rec = json_of(&out);
    assert_eq!(rec["set"], SET);
    assert!(rec["failed"].as_array().unwrap().is_empty(), "{rec:#}");
    // Static volumes (an S3 CSI volume, another node's claim without a
    // snapshot here) are restored as they were unless they exist.
    let existing = rec["existing"].as_array().unwrap();
    assert!(
        existing
            .iter()
            .all(|e| e.as_str().unwrap().starts_with("persistentvolumes ")),
        "{rec:#}"
    );
    assert!(
        existing.iter().any(|e| e == "persistentvolumes pvc-s3"),
        "{rec:#}"
    );
    let created: Vec<&str> = rec["createdObjects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // Dependency order: namespace, claims, configuration, then workloads.
    let at = |what: &str| {
        created
            .iter()
            .position(|c| *c == what)
            .unwrap_or_else(|| panic!("{what} not created: {created:#?}"))
    };
    assert!(
        at("namespaces restored-default")
            < at("persistentvolumeclaims restored-default/bookmarked-data")
    );
    assert!(
        at("persistentvolumeclaims restored-default/bookmarked-data")
            < at("secrets restored-default/bookmarked-secret")
    );
    assert!(
        at("configmaps restored-default/bookmarked-config")
            < at("services restored-default/bookmarked")
    );
    assert!(at("services restored-default/bookmarked") < at("pods restored-default/postgresql-0"));
    assert!(
        at("pods restored-default/postgresql-0")
            < at("deployments.apps restored-default/bookmarked")
    );
    assert!(
        at("deployments.apps restored-default/bookmarked")
            < at("statefulsets.apps restored-default/web")
    );
    let skipped = rec["skipped"].to_string();
    assert!(
        skipped.contains("kube-root-ca.crt") && skipped.contains("default-token-abcde"),
        "{skipped}"
    );
    assert!(
        skipped.contains(
            "persistentvolumes pvc-bm: not restored; its claim default/bookmarked-data is restored into a new volume"
        ),
        "{skipped}"
    );

    // Every restored claim with a snapshot was filled, by node-a's agent.
    let vols = rec["volumes"].as_array().unwrap();
    let names: Vec<&str> = vols.iter().map(|v| v["pvc"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["bookmarked-data", "data-web-0", "postgresql-codetalk-pvc"],
        "{rec:#}"
    );
    for v in vols {
        assert_eq!(v["phase"], "Completed", "{v:#}");
        assert_eq!(v["node"], NODE);
        assert_eq!(v["namespace"], "restored-default");
        assert!(v["files"].as_u64().unwrap() > 0, "{v:#}");
    }
    // Exactly as backed up: the new volume's own file is gone.
    assert_eq!(
        tree_without(&new_volume_dir(&w, "restored-default", "bookmarked-data")),
        read_tree(&bookmarked_dir(&w))
    );
    assert_eq!(
        tree_without(&new_volume_dir(&w, "restored-default", "data-web-0")),
        read_tree(&www_dir(&w))
    );
    let pg = w
        .kubelet()
        .join("pods/uid-pg/volumes/kubernetes.io~csi/pvc-1111/mount");
    assert_eq!(
        tree_without(&new_volume_dir(
            &w,
            "restored-default",
            "postgresql-codetalk-pvc"
        )),
        read_tree(&pg)
    );

    w.api.with(|s| {
        let ns = s.get("v1", "Namespace", None, "restored-default").unwrap();
        assert_eq!(
            ns["metadata"]["labels"]["kubernetes.io/metadata.name"],
            "restored-default"
        );
        assert!(ns["metadata"]["uid"] != "uid-ns-default" && ns["status"].is_null());
        // Cleaned: no cluster IP or node port of the old cluster.
        let svc = s
            .get("v1", "Service", Some("restored-default"), "bookmarked")
            .unwrap();
        assert!(
            svc["spec"]["clusterIP"].is_null() && svc["spec"]["clusterIPs"].is_null(),
            "{svc:#}"
        );
        assert!(svc["spec"]["ports"][0]["nodePort"].is_null());
        assert_eq!(svc["spec"]["ports"][0]["port"], 80);
        let dep = s
            .get(
                "apps/v1",
                "Deployment",
                Some("restored-default"),
                "bookmarked",
            )
            .unwrap();
        assert!(
            dep["status"].is_null()
                && dep["metadata"]["managedFields"].is_null()
                && dep["metadata"]["generation"].is_null()
        );
        let tpl = &dep["spec"]["template"];
        assert_eq!(
            tpl["spec"]["initContainers"][0]["name"],
            "marmoset-restore-wait"
        );
        assert_eq!(
            tpl["spec"]["initContainers"][0]["image"], IMAGE,
            "the agent DaemonSet's image"
        );
        assert!(
            !tpl["spec"]["volumes"]
                .to_string()
                .contains("kube-api-access"),
            "{tpl:#}"
        );
        let sts = s
            .get("apps/v1", "StatefulSet", Some("restored-default"), "web")
            .unwrap();
        assert_eq!(
            sts["spec"]["template"]["spec"]["initContainers"][0]["name"],
            "marmoset-restore-wait"
        );
        assert_eq!(
            sts["spec"]["template"]["metadata"]["annotations"]["marmoset.dev/restore-volumes"],
            "data"
        );
        let claim = s
            .get(
                "v1",
                "PersistentVolumeClaim",
                Some("restored-default"),
                "bookmarked-data",
            )
            .unwrap();
        let ann = &claim["metadata"]["annotations"];
        assert!(
            ann["volume.kubernetes.io/selected-node"].is_null()
                && ann["pv.kubernetes.io/bind-completed"].is_null(),
            "{claim:#}"
        );
        assert!(ann["marmoset.dev/restore-snapshot"].is_string());
        assert_eq!(
            claim["spec"]["volumeName"],
            "pvc-new-restored-default-bookmarked-data"
        );
        // The old PV is not restored: the claim got a new one.
        assert!(
            s.get("v1", "PersistentVolume", None, "pvc-bm").unwrap()["spec"]["claimRef"]
                ["namespace"]
                == "default"
        );
        // The source namespace is untouched.
        let old = s
            .get(
                "v1",
                "PersistentVolumeClaim",
                Some("default"),
                "bookmarked-data",
            )
            .unwrap();
        assert_eq!(old["metadata"]["resourceVersion"], before_rv);
        // Each waiting pod was released, with Events.
        let events = s
            .all("Event")
            .iter()
            .map(|e| e["reason"].as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>();
        assert!(
            events.iter().filter(|r| *r == "RestoreCompleted").count() >= 3,
            "{events:?}"
        );
        assert!(events.iter().any(|r| r == "RestoreReleased"));
    });
    for pod in [
        "uid-restored-default-bookmarked-restored",
        "uid-restored-default-web-0",
    ] {
        assert!(
            restored_marker(&w, pod).join("done").exists(),
            "{pod} not released"
        );
    }

    // describe and get show it.
    let name = rec["name"].as_str().unwrap();
    let out = cli(&w, &["k8s", "restore", "describe", name])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("Completed")
            && text.contains("restored-default/bookmarked-data"),
        "{text}"
    );
    let list = json_of(
        &cli(&w, &["--json", "k8s", "restore", "get"])
            .output()
            .unwrap(),
    );
    assert_eq!(list.as_array().unwrap().len(), 1);
}

/// The seed's "restore a specific resource" procedure: only the claims
/// (and volumes) labelled app=bookmarked. A claim that exists is left
/// alone with its data; once it is gone, it is created again and a
/// helper pod, its first consumer, gets its data restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selector_restore_brings_back_only_the_labelled_claims() {
    let (w, agent) = world_with_set().await;
    let args = restore_args(
        SET,
        &[
            "--include-namespaces",
            "default",
            "--include-resources",
            "persistentvolumeclaims,persistentvolumes",
            "--selector",
            "app=bookmarked",
        ],
    );
    // In place, while everything still exists: nothing is overwritten.
    let live = bookmarked_dir(&w);
    std::fs::write(live.join("written-after-the-backup"), b"live data").unwrap();
    let before = w.api.with(|s| {
        s.get(
            "v1",
            "PersistentVolumeClaim",
            Some("default"),
            "bookmarked-data",
        )
        .unwrap()
    });
    let rec = json_of(&run_with_cluster(&w, &agent, &args).await);
    assert!(
        rec["createdObjects"].as_array().unwrap().is_empty(),
        "{rec:#}"
    );
    assert!(
        rec["existing"]
            .to_string()
            .contains("persistentvolumeclaims default/bookmarked-data"),
        "{rec:#}"
    );
    assert_eq!(rec["volumes"][0]["phase"], "Skipped");
    assert!(
        live.join("written-after-the-backup").exists(),
        "live data untouched"
    );
    let after = w.api.with(|s| {
        s.get(
            "v1",
            "PersistentVolumeClaim",
            Some("default"),
            "bookmarked-data",
        )
        .unwrap()
    });
    assert_eq!(before, after);

    // The claim is lost: it comes back, bound on first use by the helper.
    w.api.with(|s| {
        s.remove(
            "v1",
            "PersistentVolumeClaim",
            Some("default"),
            "bookmarked-data",
        )
    });
    let rec = json_of(&run_with_cluster(&w, &agent, &args).await);
    let created: Vec<&str> = rec["createdObjects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        created,
        ["persistentvolumeclaims default/bookmarked-data"],
        "only the labelled claim: {rec:#}"
    );
    let v = &rec["volumes"][0];
    assert_eq!(v["phase"], "Completed", "{rec:#}");
    let helper = v["helperPod"].as_str().expect("a helper pod").to_string();
    assert!(helper.starts_with("marmoset-restore-bookmarked-data-"));
    let mut want = read_tree(&live);
    want.remove("written-after-the-backup");
    assert_eq!(
        read_tree(&new_volume_dir(&w, "default", "bookmarked-data")),
        want
    );
    w.api.with(|s| {
        assert!(
            s.get("v1", "Pod", Some("default"), &helper).is_none(),
            "--wait removes the helper pod"
        );
        assert!(s
            .get("apps/v1", "Deployment", Some("default"), "bookmarked")
            .is_some());
    });
}

/// A volume that cannot be restored holds its pod with the reason (the
/// application never starts on an empty volume) and fails the restore.
/// Here a hostile tenant swapped the new volume's directory for a link
/// to another directory: the agent does not follow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_volume_restore_holds_its_pod_and_fails_the_restore() {
    let (w, agent) = world_with_set().await;
    w.api.with(|s| {
        s.remove(
            "v1",
            "PersistentVolumeClaim",
            Some("default"),
            "bookmarked-data",
        )
    });
    let elsewhere = w.dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("precious"), b"keep me").unwrap();
    let link = new_volume_dir(&w, "default", "bookmarked-data");
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    let out = run_with_cluster(&w, &agent, &restore_args(SET, BOOKMARKED_CLAIMS)).await;
    let v = &failed_volume(&out, "not followed");
    assert_eq!(
        std::fs::read(elsewhere.join("precious")).unwrap(),
        b"keep me"
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 1);
    let helper = v["helperPod"].as_str().unwrap();
    let uid = w.api.with(|s| {
        // The held helper stays for inspection when the volume failed?
        // --wait removes it either way; its marker tells why it was held.
        s.all("Event")
            .iter()
            .find(|e| e["reason"] == "RestoreHeld")
            .map(|e| e["involvedObject"]["uid"].as_str().unwrap().to_string())
            .expect("a RestoreHeld event")
    });
    let failed = std::fs::read_to_string(restored_marker(&w, &uid).join("failed")).unwrap();
    assert!(failed.contains("bookmarked-data"), "{failed}");
    assert!(!restored_marker(&w, &uid).join("done").exists());
    // The init container exits non-zero with the agent's reason.
    let out = cli(&w, &["k8s", "restore-wait", "--restore", "x", "--dir"])
        .arg(restored_marker(&w, &uid))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not followed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = helper;
}

/// `marmoset k8s restore-wait`, as the init container runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_wait_waits_for_the_agent_and_reports_why_it_gave_up() {
    let w = world().await;
    let dir = w.dir.path().join("wait");
    std::fs::create_dir_all(&dir).unwrap();
    let wait = |timeout: &str| {
        cli(
            &w,
            &[
                "k8s",
                "restore-wait",
                "--restore",
                "r1",
                "--timeout",
                timeout,
                "--dir",
            ],
        )
        .arg(&dir)
        .output()
        .unwrap()
    };
    let out = wait("2s");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the marmoset agent running"));
    let d = dir.clone();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        std::fs::write(d.join("done"), b"restored\n").unwrap();
    });
    let start = Instant::now();
    let out = wait("60s");
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(start.elapsed() >= Duration::from_millis(1400));
    let out = cli(
        &w,
        &[
            "k8s",
            "restore-wait",
            "--restore",
            "r1",
            "--dir",
            "/nonexistent/wait",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not mounted"));
}

/// The weekly verify: the newest daily set, younger than 48h, restored
/// into a temporary namespace, every volume's data restored and checked,
/// then cleaned up. A stale set fails without restoring anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_weekly_verify_restores_default_into_a_temporary_namespace_and_cleans_up() {
    let w = world().await;
    seed_objects(&w);
    // The seed's verify looks for a successful daily set: no volume of
    // this node may be left out (a pending pod's claim on another node is).
    w.api
        .with(|s| s.remove("v1", "Pod", Some("default"), "redis-1"));
    let agent = w.agent(NODE, "");
    let report = agent.run_once("daily").await.unwrap();
    assert_eq!(report.failed(), 0);
    let out = run_with_cluster(
        &w,
        &agent,
        &[
            "--json",
            "k8s",
            "verify",
            "--max-age",
            "48h",
            "--timeout",
            "90s",
            "--poll",
            "1s",
        ],
    )
    .await;
    let v = json_of(&out);
    assert_eq!(v["pass"], true, "{v:#}");
    assert_eq!(v["set"], report.set);
    let target = v["targetNamespace"].as_str().unwrap().to_string();
    assert!(target.starts_with("marmoset-verify-"), "{target}");
    let vols = v["restore"]["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 3, "{v:#}");
    assert!(vols
        .iter()
        .all(|x| x["phase"] == "Completed" && x["namespace"] == target.as_str()));
    assert_eq!(v["cleanedUp"], true);
    w.api.with(|s| {
        assert!(
            s.get("v1", "Namespace", None, &target).is_none(),
            "namespace deleted"
        );
        assert!(s
            .all("Deployment")
            .iter()
            .all(|d| d["metadata"]["namespace"] != target.as_str()));
        assert!(
            s.all("ConfigMap").iter().all(|c| !c["metadata"]["name"]
                .as_str()
                .unwrap()
                .starts_with("marmoset-restore-")),
            "record deleted"
        );
    });
    // Two runs aimed at one target namespace at the same moment: the one
    // that creates it restores and cleans up; the other touches nothing
    // (neither the winner's namespace nor its record).
    let race: &[&str] = &[
        "--json",
        "k8s",
        "verify",
        "--target-namespace",
        "verify-race",
        "--timeout",
        "90s",
        "--poll",
        "1s",
    ];
    let outs = run_all_with_cluster(&w, &agent, &[race, race]).await;
    let vs: Vec<Value> = outs
        .iter()
        .map(|o| {
            serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
                panic!(
                    "{e}: {}\n{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
        })
        .collect();
    let passed: Vec<&Value> = vs.iter().filter(|v| v["pass"] == true).collect();
    assert_eq!(passed.len(), 1, "{vs:#?}");
    assert!(passed[0]["restore"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x["phase"] == "Completed"));
    let lost = vs.iter().find(|v| v["pass"] == false).unwrap();
    assert!(
        lost["errors"][0]
            .as_str()
            .unwrap()
            .contains("exists already"),
        "{lost:#}"
    );
    assert!(lost["restore"].is_null(), "{lost:#}");
    w.api
        .with(|s| assert!(s.get("v1", "Namespace", None, "verify-race").is_none()));
    // A namespace that exists is never the verify's: refused, untouched.
    w.api.with(|s| {
        s.add(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}));
        s.add(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "orders", "namespace": "shop"}}));
    });
    let out = cli(
        &w,
        &[
            "--json",
            "k8s",
            "verify",
            "--target-namespace",
            "shop",
            "--timeout",
            "30s",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["errors"][0].as_str().unwrap().contains("exists already"),
        "{v:#}"
    );
    w.api.with(|s| {
        assert!(s.get("v1", "Namespace", None, "shop").is_some());
        assert!(s.get("v1", "ConfigMap", Some("shop"), "orders").is_some());
    });
    // Nothing younger than the limit: FAIL, and nothing is created.
    std::thread::sleep(Duration::from_millis(1100));
    let out = cli(
        &w,
        &[
            "--json",
            "k8s",
            "verify",
            "--max-age",
            "1s",
            "--target-namespace",
            "verify-stale",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pass"], false);
    assert!(
        v["errors"][0].as_str().unwrap().contains("old (limit"),
        "{v:#}"
    );
    w.api
        .with(|s| assert!(s.get("v1", "Namespace", None, "verify-stale").is_none()));
}

/// Bad input to `k8s restore`: clear errors, nothing created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_bad_input_clearly() {
    let (w, _agent) = world_with_set().await;
    let cases: &[(&[&str], &str)] = &[
        (
            &["k8s", "restore", "--from", "daily-19990101000000"],
            "no backup set named",
        ),
        (
            &[
                "k8s",
                "restore",
                "--from",
                SET,
                "--include-namespaces",
                "nope",
            ],
            "not in backup set",
        ),
        (
            &[
                "k8s",
                "restore",
                "--from",
                SET,
                "--namespace-mappings",
                "default",
            ],
            "not source:target",
        ),
        (
            &[
                "k8s",
                "restore",
                "--from",
                SET,
                "--namespace-mappings",
                "default:Bad_Name",
            ],
            "DNS labels",
        ),
        (
            &["k8s", "restore", "--from", SET, "--selector", "a b"],
            "--selector",
        ),
        (
            &[
                "k8s",
                "restore",
                "--from",
                SET,
                "--include-namespaces",
                "default",
                "--include-resources",
                "widgets,deployments",
            ],
            "no resource type \"widgets\"",
        ),
        (
            &[
                "k8s",
                "restore",
                "--from",
                SET,
                "--include-namespaces",
                "default",
                "--namespace-mappings",
                "defualt:x",
            ],
            "does not include",
        ),
        (
            &[
                "k8s",
                "restore",
                "--from",
                SET,
                "--include-namespaces",
                "default,monitoring",
                "--namespace-mappings",
                "default:merged,monitoring:merged",
            ],
            "both be restored into merged",
        ),
        (
            &[
                "k8s",
                "restore",
                "--from",
                SET,
                "--include-namespaces",
                "default,monitoring",
                "--namespace-mappings",
                "monitoring:default",
            ],
            "both be restored into default",
        ),
        (
            &[
                "k8s",
                "restore",
                "--from",
                SET,
                "--include-namespaces",
                "monitoring",
                "--include-resources",
                "deployments",
                "--selector",
                "app=nothing-has-this",
            ],
            "nothing to restore",
        ),
        (&["k8s", "restore"], "--from SET is required"),
        (&["k8s", "restore", "describe", "nope"], "no restore named"),
    ];
    let count = w
        .api
        .with(|s| s.all("Namespace").len() + s.all("ConfigMap").len());
    for (args, want) in cases {
        let out = cli(&w, args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(
        count,
        w.api
            .with(|s| s.all("Namespace").len() + s.all("ConfigMap").len())
    );
    // A dry run prints the plan and creates nothing.
    let out = cli(
        &w,
        &[
            "--json",
            "k8s",
            "restore",
            "--from",
            SET,
            "--include-namespaces",
            "default",
            "--dry-run",
        ],
    )
    .output()
    .unwrap();
    let plan = json_of(&out);
    assert!(plan["objects"].as_array().unwrap().len() > 5);
    assert_eq!(
        count,
        w.api
            .with(|s| s.all("Namespace").len() + s.all("ConfigMap").len())
    );
}

/// A tenant who controls the namespace restored into recreates the
/// restored claim naming another namespace's volume (the API server
/// accepts such a claim). The agent must not write into that volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_naming_another_namespaces_volume_is_never_written() {
    let (w, agent) = world_with_set().await;
    let victim = bookmarked_dir(&w);
    let before = read_tree(&victim);
    let mut cmd = cli(
        &w,
        &restore_args(
            SET,
            &[
                "--include-namespaces",
                "default",
                "--namespace-mappings",
                "default:tenant",
                "--include-resources",
                "persistentvolumeclaims",
                "--selector",
                "app=bookmarked",
            ],
        ),
    );
    let child = tokio::task::spawn_blocking(move || cmd.output().unwrap());
    // The tenant swaps the new claim for one naming default's volume,
    // and marks it bound.
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(30));
        let swapped = w.api.with(|s| {
            let Some(mut c) = s.get(
                "v1",
                "PersistentVolumeClaim",
                Some("tenant"),
                "bookmarked-data",
            ) else {
                return false;
            };
            c["spec"]["volumeName"] = json!("pvc-bm");
            c["status"] = json!({"phase": "Bound"});
            s.add(c);
            true
        });
        if swapped {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while !child.is_finished() {
        controllers(&w, true);
        agent.restore_round().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = child.await.unwrap();
    failed_volume(&out, "belongs to default/bookmarked-data");
    assert_eq!(
        read_tree(&victim),
        before,
        "the other namespace's volume is untouched"
    );
}

/// A set written by another process (another node's agent) after this
/// agent opened the repository restores: the agent reads the index files
/// written since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_restores_what_other_agents_backed_up_after_it_started() {
    let (w, agent) = world_with_set().await;
    let other = marmoset_storage::Repository::open(
        std::sync::Arc::new(marmoset_storage::backend::fs::FsBackend::new(
            w.dir.path().join("repo"),
        )),
        PASSWORD.as_bytes(),
        &marmoset_storage::OpenOptions {
            cache_root: Some(w.dir.path().join("other-cache")),
        },
    )
    .unwrap();
    let b = Agent::new(
        w.config(""),
        marmoset_agent::Cluster::new(w.api.client(AGENT_NS), NODE, AGENT_NS),
        std::sync::Arc::new(other),
    )
    .unwrap();
    // New data, only in the other process's index files.
    fill(&bookmarked_dir(&w).join("new"), 77, 6);
    let sched = b.schedule("daily").unwrap().clone();
    let fire = chrono::DateTime::parse_from_rfc3339("2026-02-09T02:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let report = b.run_schedule(&sched, fire).await.unwrap();
    assert_eq!(report.failed(), 0);
    drop(b);
    w.api.with(|s| {
        s.remove(
            "v1",
            "PersistentVolumeClaim",
            Some("default"),
            "bookmarked-data",
        )
    });
    let rec =
        json_of(&run_with_cluster(&w, &agent, &restore_args(&report.set, BOOKMARKED_CLAIMS)).await);
    assert_eq!(rec["volumes"][0]["phase"], "Completed", "{rec:#}");
    assert_eq!(
        read_tree(&new_volume_dir(&w, "default", "bookmarked-data")),
        read_tree(&bookmarked_dir(&w))
    );
}
