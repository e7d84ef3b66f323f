//! The agent against a fake Kubernetes API server on loopback, with real
//! files laid out like the kubelet's pods directory and a real repository.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use marmoset_agent::lease::{LeaderLease, LAST_FULL};
use marmoset_agent::runner::RunReport;
use marmoset_agent::status::Phase;
use marmoset_agent::{Agent, AgentConfig, Cluster};
use marmoset_storage::backend::fs::FsBackend;
use marmoset_storage::backend::{self, Backend, BackendOptions};
use marmoset_storage::{OpenOptions, Repository};
use marmoset_testing::fake_api::{ExecResult, FakeApi};
use marmoset_testing::s3_server::S3Server;
use serde_json::{json, Value};
use tempfile::TempDir;

pub(super) const NODE: &str = "node-a";
pub(super) const AGENT_NS: &str = "marmoset";

pub(super) struct World {
    pub api: FakeApi,
    pub dir: TempDir,
    pub repo: Arc<Repository>,
}

impl World {
    pub(super) fn kubelet(&self) -> PathBuf {
        self.dir.path().join("kubelet")
    }
    pub(super) fn host(&self) -> PathBuf {
        self.dir.path().join("host")
    }

    pub(super) fn config(&self, extra: &str) -> AgentConfig {
        // Failed volumes are not tried again (after minutes) unless a test
        // is about that.
        let retry = if extra.contains("retry:") {
            ""
        } else {
            "retry:\n  volumeRetries: 0\n"
        };
        let text = format!(
            r#"
schedules:
  - name: daily
    cron: "0 2 * * *"
    keep: 168h
  - name: weekly
    cron: "0 3 * * 0"
    keep: 720h
includedNamespaces: [default, monitoring, microservices, vertex-platform, argocd, cert-manager, gpu-operator, keel]
excludedStorageClasses: [csi-s3]
kubeletDir: {kubelet}
hostPathPrefix: {host}
stateDir: {state}
metricsAddress: 127.0.0.1:0
namespace: {AGENT_NS}
threads: 2
{retry}{extra}
"#,
            kubelet = self.kubelet().display(),
            host = self.host().display(),
            state = self.dir.path().join("state").display(),
        );
        AgentConfig::parse(&text, "test config").unwrap()
    }

    pub(super) fn agent(&self, node: &str, extra: &str) -> Agent {
        let cluster = Cluster::new(self.api.client(AGENT_NS), node, AGENT_NS);
        Agent::new(self.config(extra), cluster, self.repo.clone()).unwrap()
    }
}

pub(super) fn pod(
    ns: &str,
    name: &str,
    uid: &str,
    node: &str,
    phase: &str,
    volumes: Value,
    annotations: Value,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "annotations": annotations,
                     "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "busybox"}, {"name": "sidecar", "image": "busybox"}],
                 "volumes": volumes},
        "status": {"phase": phase}
    })
}

pub(super) fn pvc(ns: &str, name: &str, pv: &str, class: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": class, "volumeName": pv,
                 "resources": {"requests": {"storage": "2Gi"}}},
        "status": {"phase": "Bound"}
    })
}

pub(super) fn pv(name: &str, source: Value) -> Value {
    let mut spec = json!({"capacity": {"storage": "2Gi"}, "accessModes": ["ReadWriteOnce"],
                          "persistentVolumeReclaimPolicy": "Delete"});
    for (k, v) in source.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name}, "spec": spec})
}

pub(super) fn claim(vol: &str, claim: &str) -> Value {
    json!({"name": vol, "persistentVolumeClaim": {"claimName": claim}})
}

/// Files of one volume, deterministic from `seed`.
pub(super) fn fill(dir: &Path, seed: u8, files: usize) {
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    for i in 0..files {
        let body: Vec<u8> = (0..(1000 + i * 3777))
            .map(|j| (j as u8).wrapping_mul(seed).wrapping_add(i as u8))
            .collect();
        let p = if i % 3 == 0 {
            dir.join("sub/deeper").join(format!("f{i}"))
        } else {
            dir.join(format!("f{i}.dat"))
        };
        std::fs::write(p, body).unwrap();
    }
}

pub(super) fn read_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
                out.insert(rel + "/", Vec::new());
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// The volume snapshots of the repository: every run also saves one
/// snapshot of the set's Kubernetes objects (source `kubernetes`).
pub(super) fn volume_snapshots(
    repo: &Repository,
) -> Vec<(marmoset_storage::Id, marmoset_storage::Snapshot)> {
    let (snaps, bad) = repo.snapshots().unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    snaps
        .into_iter()
        .filter(|(_, s)| s.source != marmoset_agent::objects::OBJECTS_SOURCE)
        .collect()
}

/// The seed's kind of cluster, seen from node-a.
pub(super) async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FsBackend::new(dir.path().join("repo")));
    world_on(dir, backend).await
}

async fn world_on(dir: TempDir, backend: Arc<dyn Backend>) -> World {
    let api = FakeApi::start().await;
    let kubelet = dir.path().join("kubelet");
    let host = dir.path().join("host");
    let pods = kubelet.join("pods");
    // CSI volume of a database with hooks.
    fill(
        &pods.join("uid-pg/volumes/kubernetes.io~csi/pvc-1111/mount"),
        3,
        12,
    );
    // K3s local-path provisioner: a hostPath PV.
    fill(
        &host.join("var/lib/rancher/k3s/storage/pvc-2222_microservices_mongodb"),
        5,
        9,
    );
    // A local PV, mounted by the kubelet.
    fill(
        &pods.join("uid-prom/volumes/kubernetes.io~local-volume/pv-local-3333"),
        7,
        6,
    );
    // Volumes that must not be read.
    fill(
        &pods.join("uid-mongo/volumes/kubernetes.io~csi/pvc-cache/mount"),
        9,
        2,
    );
    fill(
        &pods.join("uid-triton/volumes/kubernetes.io~csi/pvc-s3/mount"),
        11,
        2,
    );
    api.with(|s| {
        s.add(pod(
            "default", "postgresql-0", "uid-pg", NODE, "Running",
            json!([claim("data", "postgresql-codetalk-pvc"), {"name": "tmp", "emptyDir": {}}]),
            json!({
                "pre.hook.backup.velero.io/container": "app",
                "pre.hook.backup.velero.io/command": "[\"/bin/sh\", \"-c\", \"psql -c CHECKPOINT\"]",
                "pre.hook.backup.velero.io/timeout": "2s",
                "post.hook.backup.velero.io/command": "[\"/bin/sh\", \"-c\", \"echo thawed\"]",
            }),
        ));
        s.add(pvc("default", "postgresql-codetalk-pvc", "pvc-1111", "csi-hostpath", json!({})));
        s.add(pv("pvc-1111", json!({"csi": {"driver": "hostpath.csi.k8s.io", "volumeHandle": "h-1111"}})));

        s.add(pod(
            "microservices", "mongodb-0", "uid-mongo", NODE, "Running",
            json!([claim("datadir", "mongodb"), claim("cache", "mongodb-cache"),
                   {"name": "config", "configMap": {"name": "mongodb-config"}}]),
            json!({"backup.velero.io/backup-volumes-excludes": "cache"}),
        ));
        s.add(pvc("microservices", "mongodb", "pvc-2222", "local-path", json!({})));
        s.add(pv("pvc-2222", json!({"hostPath": {"path": "/var/lib/rancher/k3s/storage/pvc-2222_microservices_mongodb", "type": "DirectoryOrCreate"}})));
        s.add(pvc("microservices", "mongodb-cache", "pvc-cache", "csi-hostpath", json!({})));
        s.add(pv("pvc-cache", json!({"csi": {"driver": "hostpath.csi.k8s.io", "volumeHandle": "h-c"}})));

        s.add(pod(
            "monitoring", "prometheus-db-0", "uid-prom", NODE, "Running",
            json!([claim("db", "prometheus-db-prometheus-0")]), json!({}),
        ));
        s.add(pvc("monitoring", "prometheus-db-prometheus-0", "pv-local-3333", "local-storage", json!({})));
        s.add(pv("pv-local-3333", json!({"local": {"path": "/mnt/disks/ssd1"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE]}]}]}}})));

        // Skipped: excluded storage class, PVC opt-out.
        s.add(pod(
            "default", "triton-0", "uid-triton", NODE, "Running",
            json!([claim("models", "triton-models-pvc")]), json!({}),
        ));
        s.add(pvc("default", "triton-models-pvc", "pvc-s3", "csi-s3", json!({})));
        s.add(pv("pvc-s3", json!({"csi": {"driver": "ru.yandex.s3.csi", "volumeHandle": "models"}})));
        s.add(pod(
            "monitoring", "gotify-0", "uid-gotify", NODE, "Running",
            json!([claim("data", "gotify-pvc")]), json!({}),
        ));
        s.add(pvc("monitoring", "gotify-pvc", "pvc-g", "local-path", json!({"marmoset.dev/exclude": "true"})));
        s.add(pv("pvc-g", json!({"hostPath": {"path": "/var/lib/rancher/k3s/storage/pvc-g"}})));

        // Ignored: other node, not running, namespace not included.
        s.add(pod("default", "redis-0", "uid-redis0", "node-b", "Running", json!([claim("data", "redis-pvc")]), json!({})));
        s.add(pod("default", "redis-1", "uid-redis1", NODE, "Pending", json!([claim("data", "redis-pvc")]), json!({})));
        s.add(pvc("default", "redis-pvc", "pvc-r", "local-path", json!({})));
        s.add(pv("pvc-r", json!({"hostPath": {"path": "/var/lib/rancher/k3s/storage/pvc-r"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-b"]}]}]}}})));
        s.add(pod("kube-system", "etcd-0", "uid-etcd", NODE, "Running", json!([claim("data", "etcd-pvc")]), json!({})));
        s.add(pvc("kube-system", "etcd-pvc", "pvc-e", "local-path", json!({})));
        s.add(pv("pvc-e", json!({"hostPath": {"path": "/var/lib/rancher/k3s/storage/pvc-e"}})));
    });
    let repo = Repository::init(
        backend,
        b"agent test password",
        marmoset_storage::Config::new(),
        &OpenOptions {
            cache_root: Some(dir.path().join("cache")),
        },
    )
    .unwrap();
    World {
        api,
        dir,
        repo: Arc::new(repo),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_finds_this_nodes_volumes_and_honours_opt_outs() {
    let w = world().await;
    let cfg = w.config("");
    let cluster = Cluster::new(w.api.client(AGENT_NS), NODE, AGENT_NS);
    let plan = cluster.discover(&cfg).await.unwrap();
    let got: Vec<(String, PathBuf)> = plan
        .volumes()
        .map(|v| (v.source(), v.path.clone()))
        .collect();
    let pods = w.kubelet().join("pods");
    assert_eq!(
        got,
        vec![
            (
                "default/postgresql-codetalk-pvc".to_string(),
                pods.join("uid-pg/volumes/kubernetes.io~csi/pvc-1111/mount")
            ),
            (
                "microservices/mongodb".to_string(),
                w.host()
                    .join("var/lib/rancher/k3s/storage/pvc-2222_microservices_mongodb")
            ),
            (
                "monitoring/prometheus-db-prometheus-0".to_string(),
                pods.join("uid-prom/volumes/kubernetes.io~local-volume/pv-local-3333")
            ),
        ]
    );
    let mut skipped: Vec<String> = plan
        .skipped
        .iter()
        .map(|s| format!("{}/{}/{}: {}", s.namespace, s.pod, s.volume, s.reason))
        .collect();
    skipped.sort();
    assert_eq!(
        skipped,
        vec![
            // Pending here; its data is on node-b, whose agent backs it up.
            "default/redis-1/data: pod is Pending and PV pvc-r is on another node",
            "default/triton-0/models: storage class csi-s3 is excluded",
            "microservices/mongodb-0/cache: opted out by pod annotation",
            "monitoring/gotify-0/data: PVC gotify-pvc opted out",
        ]
    );
    let problems: Vec<&str> = plan
        .skipped
        .iter()
        .filter(|s| !s.intentional)
        .map(|s| s.pod.as_str())
        .collect();
    assert_eq!(problems, ["redis-1"], "opt-outs are not problems");
    let pg = plan.pods.iter().find(|p| p.pod == "postgresql-0").unwrap();
    assert_eq!(
        pg.hooks.pre.as_ref().unwrap().command,
        ["/bin/sh", "-c", "psql -c CHECKPOINT"]
    );
    assert_eq!(
        pg.hooks.pre.as_ref().unwrap().timeout,
        Duration::from_secs(2)
    );
    // Pods were listed with the node's field selector, not fetched cluster-wide.
    let reqs = w.api.with(|s| s.requests.clone());
    assert!(
        reqs.iter().any(|(m, p)| m == "GET"
            && p.starts_with("/api/v1/pods?")
            && p.contains("spec.nodeName%3Dnode-a")),
        "{reqs:?}"
    );
    // Objects of excluded namespaces are never read.
    assert!(
        !reqs.iter().any(|(_, p)| p.contains("etcd-pvc")),
        "{reqs:?}"
    );

    // Opt-in mode (defaultVolumesToFsBackup: false): only annotated volumes.
    let cfg = w.config("defaultVolumesToBackup: false");
    w.api.with(|s| {
        let mut p = s
            .get("v1", "Pod", Some("monitoring"), "prometheus-db-0")
            .unwrap();
        p["metadata"]["annotations"] = json!({"backup.velero.io/backup-volumes": "db"});
        s.add(p);
    });
    let plan = cluster.discover(&cfg).await.unwrap();
    let got: Vec<String> = plan.volumes().map(|v| v.source()).collect();
    assert_eq!(got, vec!["monitoring/prometheus-db-prometheus-0"]);
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

fn metric(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_makes_one_snapshot_per_volume_and_reports_it() {
    let w = world().await;
    let agent = w.agent(NODE, "");
    let report = agent.run_once("daily").await.unwrap();
    assert_eq!(report.failed(), 0, "{report:#?}");
    assert_eq!(report.volumes.len(), 3);

    // One snapshot per volume, named <namespace>/<pvc>, tagged, restorable,
    // and one of the set's Kubernetes objects.
    let (all, bad) = w.repo.snapshots().unwrap();
    assert!(bad.is_empty());
    assert_eq!(all.len(), 4);
    let snaps = volume_snapshots(&w.repo);
    assert_eq!(snaps.len(), 3);
    for v in &report.volumes {
        let (_, snap) = snaps
            .iter()
            .find(|(id, _)| Some(id.to_hex()) == v.snapshot)
            .expect("snapshot of the outcome exists");
        assert_eq!(snap.source, v.target.source());
        assert_eq!(snap.hostname, NODE);
        assert!(report.set.starts_with("daily-") && report.set.len() == "daily-".len() + 14);
        for tag in [
            "schedule=daily".to_string(),
            format!("set={}", report.set),
            format!("node={NODE}"),
            format!("pod={}", v.target.pod),
        ] {
            assert!(snap.tags.contains(&tag), "{:?} lacks {tag}", snap.tags);
        }
        let target = w.dir.path().join("restore").join(v.target.pvc.clone());
        let progress = marmoset_storage::RestoreProgress::default();
        let summary =
            marmoset_storage::restore(&w.repo, snap, "", &target, &Default::default(), &progress)
                .unwrap();
        assert!(summary.errors.is_empty());
        assert_eq!(
            read_tree(&target),
            read_tree(&v.target.path),
            "{}",
            v.target.source()
        );
        assert!(v.bytes_read > 0 && v.bytes_added > 0);
    }

    // Hooks: pre before post, in the named container, with the commands.
    let execs = w.api.with(|s| s.execs.clone());
    let got: Vec<(String, String, String)> = execs
        .iter()
        .map(|e| (e.pod.clone(), e.container.clone(), e.command.join(" ")))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "postgresql-0".into(),
                "app".into(),
                "/bin/sh -c psql -c CHECKPOINT".into()
            ),
            // No container annotation: the pod's first container.
            (
                "postgresql-0".into(),
                "app".into(),
                "/bin/sh -c echo thawed".into()
            ),
        ]
    );

    // Events on each PVC, in its namespace.
    let events = w.api.with(|s| s.all("Event"));
    for v in &report.volumes {
        let reasons: Vec<&str> = events
            .iter()
            .filter(|e| e["involvedObject"]["name"] == v.target.pvc.as_str())
            .map(|e| e["reason"].as_str().unwrap())
            .collect();
        assert_eq!(
            reasons,
            ["BackupStarted", "BackupSucceeded"],
            "{}",
            v.target.pvc
        );
        let ev = events
            .iter()
            .find(|e| e["involvedObject"]["name"] == v.target.pvc.as_str())
            .unwrap();
        assert_eq!(ev["metadata"]["namespace"], v.target.namespace.as_str());
        assert_eq!(ev["involvedObject"]["kind"], "PersistentVolumeClaim");
        assert_eq!(ev["source"]["host"], NODE);
    }

    // A status object per volume in the agent's namespace.
    for v in &report.volumes {
        let name = format!(
            "marmoset-status.daily.{}.{}",
            v.target.namespace, v.target.pvc
        );
        let cm = w
            .api
            .with(|s| s.get("v1", "ConfigMap", Some(AGENT_NS), &name))
            .expect(&name);
        assert_eq!(cm["data"]["phase"], "Succeeded");
        assert_eq!(cm["data"]["schedule"], "daily");
        assert_eq!(
            cm["data"]["lastSnapshot"],
            v.snapshot.clone().unwrap().as_str()
        );
        assert_eq!(cm["data"]["bytesRead"], v.bytes_read.to_string().as_str());
        assert!(cm["data"]["lastSuccess"]
            .as_str()
            .unwrap()
            .starts_with("20"));
    }

    // Metrics: a last-success timestamp per PVC, scraped over HTTP.
    let (addr, server) = marmoset_agent::metrics::serve("127.0.0.1:0", agent.metrics())
        .await
        .unwrap();
    let text = scrape(addr).await;
    let now = chrono::Utc::now().timestamp() as f64;
    for v in &report.volumes {
        let labels = format!(
            "{{namespace=\"{}\",pvc=\"{}\",schedule=\"daily\"}}",
            v.target.namespace, v.target.pvc
        );
        let ts = metric(
            &text,
            &format!("marmoset_volume_last_success_timestamp_seconds{labels}"),
        )
        .unwrap_or_else(|| panic!("no success metric for {labels}:\n{text}"));
        assert!((now - ts).abs() < 120.0);
        let read = metric(&text, &format!("marmoset_volume_bytes_read_total{labels}")).unwrap();
        assert_eq!(read as u64, v.bytes_read);
        assert_eq!(
            metric(
                &text,
                &format!("marmoset_volume_backup_failures_total{labels}")
            ),
            Some(0.0)
        );
    }
    assert_eq!(metric(&text, "marmoset_schedule_runs_total"), Some(1.0));
    server.abort();

    // A restarted agent knows the last successes from the status objects.
    let restarted = w.agent(NODE, "");
    assert_eq!(restarted.restore_metrics().await.unwrap(), 3);
    let text = restarted.metrics().render();
    for v in &report.volumes {
        let key = format!(
            "marmoset_volume_last_success_timestamp_seconds{{namespace=\"{}\",pvc=\"{}\",schedule=\"daily\"}}",
            v.target.namespace, v.target.pvc
        );
        let ts = metric(&text, &key).unwrap_or_else(|| panic!("{key} missing:\n{text}"));
        assert!((now - ts).abs() < 120.0);
    }
    assert_eq!(
        w.agent("node-b", "").restore_metrics().await.unwrap(),
        0,
        "other nodes' volumes are theirs"
    );

    // A second run adds (almost) nothing: the volumes are unchanged.
    let again = agent.run_once("daily").await.unwrap();
    assert_eq!(again.failed(), 0);
    let added: u64 = again.volumes.iter().map(|v| v.bytes_added).sum();
    let first: u64 = report.volumes.iter().map(|v| v.bytes_added).sum();
    assert!(added * 10 < first, "re-run added {added} of {first}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_failures_follow_the_on_error_policy() {
    let w = world().await;
    // The pre hook fails; on-error defaults to Fail: the volume is not
    // backed up, the post hook still runs (to thaw), and it is reported.
    w.api.with(|s| {
        s.exec_rules.push((
            "CHECKPOINT".into(),
            ExecResult::Exit(1, "psql: connection refused".into()),
        ))
    });
    let agent = w.agent(NODE, "");
    let report = agent.run_once("daily").await.unwrap();
    let pg = report
        .volumes
        .iter()
        .find(|v| v.target.pod == "postgresql-0")
        .unwrap();
    assert_eq!(pg.phase, Phase::Failed);
    assert!(pg.snapshot.is_none());
    assert!(
        pg.error.as_deref().unwrap().contains("pre hook failed"),
        "{:?}",
        pg.error
    );
    assert_eq!(report.failed(), 1, "other pods are not affected");
    let execs: Vec<String> = w
        .api
        .with(|s| s.execs.iter().map(|e| e.command.join(" ")).collect());
    assert_eq!(execs.len(), 2, "{execs:?}");
    assert!(execs[1].contains("thawed"));
    let events = w.api.with(|s| s.all("Event"));
    let hook_ev = events
        .iter()
        .find(|e| e["reason"] == "HookFailed")
        .expect("HookFailed event");
    assert_eq!(hook_ev["type"], "Warning");
    assert_eq!(hook_ev["involvedObject"]["kind"], "Pod");
    assert!(
        hook_ev["message"]
            .as_str()
            .unwrap()
            .contains("exit status 1"),
        "{hook_ev}"
    );
    let cm = w
        .api
        .with(|s| {
            s.get(
                "v1",
                "ConfigMap",
                Some(AGENT_NS),
                "marmoset-status.daily.default.postgresql-codetalk-pvc",
            )
        })
        .unwrap();
    assert_eq!(cm["data"]["phase"], "Failed");
    let (addr, server) = marmoset_agent::metrics::serve("127.0.0.1:0", agent.metrics())
        .await
        .unwrap();
    let text = scrape(addr).await;
    assert_eq!(metric(&text, "marmoset_hook_failures_total"), Some(1.0));
    assert_eq!(
        metric(&text, "marmoset_volume_backup_failures_total{namespace=\"default\",pvc=\"postgresql-codetalk-pvc\",schedule=\"daily\"}"),
        Some(1.0)
    );
    assert!(
        metric(&text, "marmoset_volume_last_success_timestamp_seconds{namespace=\"default\",pvc=\"postgresql-codetalk-pvc\"").is_none(),
        "a failed volume has no success time"
    );
    server.abort();

    // on-error Continue: the same failure is reported, the volume backed up.
    w.api.with(|s| {
        let mut p = s.get("v1", "Pod", Some("default"), "postgresql-0").unwrap();
        p["metadata"]["annotations"]["pre.hook.backup.velero.io/on-error"] = json!("Continue");
        s.add(p);
    });
    let report = agent.run_once("daily").await.unwrap();
    assert_eq!(report.failed(), 0, "{report:#?}");
    assert_eq!(report.hook_failures.len(), 1);

    // A hook that never returns is cut off at its timeout (2s here).
    w.api.with(|s| {
        s.exec_rules.clear();
        s.exec_rules.push(("CHECKPOINT".into(), ExecResult::Hang));
        let mut p = s.get("v1", "Pod", Some("default"), "postgresql-0").unwrap();
        p["metadata"]["annotations"]["pre.hook.backup.velero.io/on-error"] = json!("Fail");
        s.add(p);
    });
    let started = std::time::Instant::now();
    let report = agent.run_once("daily").await.unwrap();
    let pg = report
        .volumes
        .iter()
        .find(|v| v.target.pod == "postgresql-0")
        .unwrap();
    assert_eq!(pg.phase, Phase::Failed);
    assert!(
        pg.error.as_deref().unwrap().contains("timed out"),
        "{:?}",
        pg.error
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_that_is_not_mounted_fails_clearly_and_keeps_its_last_success() {
    let w = world().await;
    let agent = w.agent(NODE, "");
    agent.run_once("daily").await.unwrap();
    let mount = w
        .kubelet()
        .join("pods/uid-prom/volumes/kubernetes.io~local-volume/pv-local-3333");
    std::fs::remove_dir_all(&mount).unwrap();
    let report = agent.run_once("daily").await.unwrap();
    let prom = report
        .volumes
        .iter()
        .find(|v| v.target.pod == "prometheus-db-0")
        .unwrap();
    assert_eq!(prom.phase, Phase::Failed);
    let err = prom.error.clone().unwrap();
    assert!(
        err.contains("not found") && err.contains("pv-local-3333"),
        "{err}"
    );
    let cm = w
        .api
        .with(|s| {
            s.get(
                "v1",
                "ConfigMap",
                Some(AGENT_NS),
                "marmoset-status.daily.monitoring.prometheus-db-prometheus-0",
            )
        })
        .unwrap();
    assert_eq!(cm["data"]["phase"], "Failed");
    assert!(
        cm["data"]["lastSuccess"].is_string(),
        "the earlier success is kept: {cm}"
    );
    assert!(cm["data"]["lastSnapshot"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_is_applied_per_schedule_and_node() {
    let w = world().await;
    let agent = w.agent(NODE, "");
    let first = agent.run_once("daily").await.unwrap();
    // Age copies of the snapshots: 200h-old daily and weekly ones of this
    // node, and a 200h-old daily one from another node.
    let snaps = volume_snapshots(&w.repo);
    let old = chrono::Utc::now() - chrono::Duration::hours(200);
    let mut planted = Vec::new();
    for (i, (_, s)) in snaps.iter().enumerate() {
        let mut s = s.clone();
        s.time = old;
        // Of a set 200h ago, not of the run just made.
        s.tags = s
            .tags
            .iter()
            .map(|t| {
                if t.starts_with("set=") {
                    "set=daily-20250101020000".to_string()
                } else {
                    t.clone()
                }
            })
            .collect();
        match i {
            0 => {
                s.tags = s
                    .tags
                    .iter()
                    .map(|t| t.replace("schedule=daily", "schedule=weekly"))
                    .collect();
            }
            1 => {
                s.tags = s
                    .tags
                    .iter()
                    .map(|t| t.replace("node=node-a", "node=node-b"))
                    .collect();
            }
            _ => {}
        }
        planted.push((i, w.repo.save_snapshot(&s).unwrap()));
    }
    // A volume deleted since, last backed up in a set 300h ago: that set
    // holds its newest complete snapshot, so the set is kept whole, with
    // its objects, past the keep span.
    let (all, _) = w.repo.snapshots().unwrap();
    let objects = all
        .iter()
        .find(|(_, s)| s.source == marmoset_agent::objects::OBJECTS_SOURCE)
        .expect("the run's objects")
        .1
        .clone();
    let very_old = chrono::Utc::now() - chrono::Duration::hours(300);
    let mut kept = Vec::new();
    for (source, base) in [
        ("default/deleted-pvc", &snaps[2].1),
        ("kubernetes", &objects),
    ] {
        let mut s = base.clone();
        s.source = source.into();
        s.time = very_old;
        s.tags = vec![
            "schedule=daily".into(),
            "set=daily-20240101020000".into(),
            format!("node={NODE}"),
        ];
        kept.push(w.repo.save_snapshot(&s).unwrap());
    }
    let second = agent.run_once("daily").await.unwrap();
    assert_eq!(second.failed(), 0);
    assert_eq!(
        second.snapshots_forgotten, 1,
        "only this node's expired daily snapshot goes"
    );
    let (all, _) = w.repo.snapshots().unwrap();
    for id in &kept {
        assert!(
            all.iter().any(|(i, _)| i == id),
            "the deleted volume's last set is kept whole"
        );
    }
    let after: Vec<_> = volume_snapshots(&w.repo)
        .into_iter()
        .filter(|(_, s)| s.source != "default/deleted-pvc")
        .collect();
    let ids: Vec<_> = after.iter().map(|(id, _)| *id).collect();
    assert!(ids.contains(&planted[0].1), "weekly kept (720h)");
    assert!(ids.contains(&planted[1].1), "other node's kept");
    assert!(
        !ids.contains(&planted[2].1),
        "expired daily of this node removed"
    );
    assert_eq!(after.len(), 3 + 2 + 3);
    assert_eq!(first.volumes.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_runs_maintenance_and_the_lease_moves_when_it_expires() {
    let w = world().await;
    let a = w.agent("node-a", "maintenance:\n  leaseDuration: 10s");
    let b = w.agent("node-b", "maintenance:\n  leaseDuration: 10s");
    a.run_once("daily").await.unwrap();
    let client = w.api.client(AGENT_NS);
    let lease_a = lease(&client, "marmoset-maintenance", "node-a", 10);
    let lease_b = lease(&client, "marmoset-maintenance", "node-b", 10);
    // a wins the empty lease and, with no maintenance on record, runs a full one.
    let report = a
        .maintenance_round(&lease_a)
        .await
        .unwrap()
        .expect("leader runs maintenance");
    assert!(report.full);
    assert!(report.snapshots >= 3);
    assert!(
        b.maintenance_round(&lease_b).await.unwrap().is_none(),
        "b is not the holder"
    );
    assert!(
        a.maintenance_round(&lease_a).await.unwrap().is_none(),
        "nothing due right after"
    );
    let obj = lease_object(&w, "marmoset-maintenance").unwrap();
    assert_eq!(obj["spec"]["holderIdentity"], "node-a");
    assert!(obj["metadata"]["annotations"][LAST_FULL].is_string());

    // Short leases for the takeover: a stops renewing, b takes over after expiry.
    let short_a = lease(&client, "short", "node-a", 2);
    let short_b = lease(&client, "short", "node-b", 2);
    assert!(short_a.try_acquire_or_renew().await.unwrap().leader);
    short_a.record(LAST_FULL, chrono::Utc::now()).await.unwrap();
    let st = short_b.try_acquire_or_renew().await.unwrap();
    assert!(!st.leader);
    assert_eq!(st.holder.as_deref(), Some("node-a"));
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let st = short_b.try_acquire_or_renew().await.unwrap();
    assert!(st.leader, "takeover after expiry");
    assert!(
        st.time(LAST_FULL).is_some(),
        "the maintenance record moves with the lease"
    );
    assert!(
        !short_a.try_acquire_or_renew().await.unwrap().leader,
        "a lost it"
    );
    let obj = lease_object(&w, "short").unwrap();
    assert_eq!(obj["spec"]["leaseTransitions"], 1);
    // Releasing hands it over at once.
    short_b.release().await.unwrap();
    assert!(short_a.try_acquire_or_renew().await.unwrap().leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_candidates_never_both_win() {
    let w = world().await;
    let client = w.api.client(AGENT_NS);
    let mut handles = Vec::new();
    for n in 0..6 {
        let c = client.clone();
        handles.push(tokio::spawn(async move {
            let l = lease(&c, "race", &format!("node-{n}"), 30);
            l.try_acquire_or_renew().await.unwrap().leader
        }));
    }
    let mut winners = 0;
    for h in handles {
        winners += usize::from(h.await.unwrap());
    }
    assert_eq!(winners, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_catches_up_an_interrupted_run_and_takes_the_maintenance_lease() {
    let w = world().await;
    // The state a killed agent leaves: the daily run started, never finished.
    let state_dir = w.dir.path().join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    let started = chrono::Utc::now() - chrono::Duration::minutes(5);
    std::fs::write(
        state_dir.join(format!("agent-state-{NODE}.json")),
        serde_json::to_vec(&json!({"schedules": {
            "daily": {"last_started": started, "last_completed": started - chrono::Duration::days(1)},
            "weekly": {"last_started": started, "last_completed": started}
        }}))
        .unwrap(),
    )
    .unwrap();
    let agent = Arc::new(w.agent(NODE, "maintenance:\n  leaseDuration: 10s"));
    // Stop once the state says the daily run completed.
    let state_file = state_dir.join(format!("agent-state-{NODE}.json"));
    let stop = async move {
        for _ in 0..600 {
            let done = std::fs::read(&state_file)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .is_some_and(|v| daily_completed(&v));
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), agent.clone().run(stop))
        .await
        .expect("agent stops when asked")
        .unwrap();
    let snaps = volume_snapshots(&w.repo);
    assert_eq!(
        snaps.len(),
        3,
        "the interrupted daily run was run again at start"
    );
    assert!(snaps
        .iter()
        .all(|(_, s)| s.tags.contains(&"schedule=daily".to_string())));
    let state: Value = serde_json::from_slice(
        &std::fs::read(state_dir.join(format!("agent-state-{NODE}.json"))).unwrap(),
    )
    .unwrap();
    assert!(daily_completed(&state), "{state}");
    // The maintenance election ran alongside and the lease was released on shutdown.
    let obj = lease_object(&w, "marmoset-maintenance").expect("lease created by the daemon");
    assert!(obj["spec"]["holderIdentity"].is_null(), "released: {obj}");
}

fn daily_completed(state: &Value) -> bool {
    let t = |k: &str| {
        state["schedules"]["daily"][k]
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
    };
    matches!((t("last_started"), t("last_completed")), (Some(s), Some(c)) if c >= s)
}

fn lease(client: &kube::Client, name: &str, node: &str, secs: u64) -> LeaderLease {
    LeaderLease::new(
        client.clone(),
        AGENT_NS,
        name,
        node,
        Duration::from_secs(secs),
    )
}

fn lease_object(w: &World, name: &str) -> Option<Value> {
    w.api
        .with(|s| s.get("coordination.k8s.io/v1", "Lease", Some(AGENT_NS), name))
}

/// Regression: every S3 backend owned a tokio runtime, and the agent's
/// shutdown dropped the last repository handle inside the agent's own
/// runtime, where tokio panics ("Cannot drop a runtime in a context where
/// blocking is not allowed"). The agent runs against the S3 server, and
/// the agent and the repository are dropped inside the async context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_shutdown_with_an_s3_repository_does_not_panic() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let options = BackendOptions {
        static_credentials: Some(("test".into(), "test".into())),
        region: Some("us-east-1".into()),
        cache_root: Some(dir.path().join("cache")),
        ..BackendOptions::default()
    };
    let url = server.url("agent-shutdown");
    let backend = tokio::task::spawn_blocking(move || {
        let b = backend::open(&url, &options).unwrap();
        b.create().unwrap();
        b
    })
    .await
    .unwrap();
    let w = world_on(dir, backend).await;
    let agent = w.agent(NODE, "");
    let report = agent.run_once("daily").await.unwrap();
    assert_eq!(report.failed(), 0, "{report:#?}");
    let snaps = volume_snapshots(&w.repo);
    assert_eq!(snaps.len(), 3, "one snapshot per volume, in the S3 bucket");
    let repo = Arc::downgrade(&w.repo);
    drop(agent);
    drop(w);
    assert!(repo.upgrade().is_none(), "the last handle was dropped here");
}

/// The state file of an agent whose daily run was interrupted (so the
/// daemon catches it up at start), with `frozen` pending post hooks.
fn interrupted_state(w: &World, frozen: Value) -> PathBuf {
    let state_dir = w.dir.path().join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    let started = chrono::Utc::now() - chrono::Duration::minutes(5);
    let file = state_dir.join(format!("agent-state-{NODE}.json"));
    std::fs::write(
        &file,
        serde_json::to_vec(&json!({"schedules": {
            "daily": {"last_started": started, "last_completed": started - chrono::Duration::days(1)},
            "weekly": {"last_started": started, "last_completed": started}
        }, "frozen": frozen}))
        .unwrap(),
    )
    .unwrap();
    file
}

/// Gives postgresql-0's pre hook a timeout longer than a slow freeze.
fn slow_freeze(w: &World, delay: Duration) {
    w.api.with(|s| {
        s.exec_rules
            .push(("CHECKPOINT".into(), ExecResult::Delay(delay, String::new())));
        let mut p = s.get("v1", "Pod", Some("default"), "postgresql-0").unwrap();
        p["metadata"]["annotations"]["pre.hook.backup.velero.io/timeout"] = json!("60s");
        s.add(p);
    });
}

fn exec_lines(w: &World) -> Vec<String> {
    w.api
        .with(|s| s.execs.iter().map(|e| e.command.join(" ")).collect())
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..600 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// SIGTERM (the shutdown future) while the application is frozen: the
/// run is dropped, the post hook still runs, and the agent exits well
/// within the DaemonSet's grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_frozen_runs_the_post_hook_before_exit() {
    let w = world().await;
    // The freeze takes a while: shutdown arrives in the middle of it.
    slow_freeze(&w, Duration::from_secs(2));
    let state_file = interrupted_state(&w, json!([]));
    let agent = Arc::new(w.agent(NODE, "maintenance:\n  enabled: false"));
    let api = &w.api;
    let stop = async {
        wait_for("the pre hook", || {
            api.with(|s| {
                s.execs
                    .iter()
                    .any(|e| e.command.join(" ").contains("CHECKPOINT"))
            })
        })
        .await;
    };
    let asked = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(60), agent.clone().run(stop))
        .await
        .expect("the agent stops")
        .unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "exit within the grace period: {:?}",
        asked.elapsed()
    );
    let execs = exec_lines(&w);
    let pre = execs.iter().position(|e| e.contains("CHECKPOINT")).unwrap();
    let post = execs.iter().position(|e| e.contains("thawed"));
    assert!(
        post.is_some_and(|p| p > pre),
        "post hook after the pre hook: {execs:?}"
    );
    let state: Value = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    assert_eq!(state["frozen"], json!([]), "nothing left pending: {state}");
}

/// An agent killed between pre and post hook (its state file says so):
/// the next one thaws the pod before anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_thaws_what_a_crash_left_frozen_before_anything_else() {
    let w = world().await;
    let since = chrono::Utc::now() - chrono::Duration::minutes(3);
    let state_file = interrupted_state(
        &w,
        json!([{"namespace": "default", "pod": "postgresql-0", "pod_uid": "uid-pg",
                "container": "app", "command": ["/usr/sbin/fsfreeze", "-u", "/data"],
                "timeout_secs": 5, "since": since}]),
    );
    let agent = Arc::new(w.agent(NODE, "maintenance:\n  enabled: false"));
    let file = state_file.clone();
    let stop = async move {
        wait_for("the caught-up run", || {
            std::fs::read(&file)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .is_some_and(|v| daily_completed(&v))
        })
        .await;
    };
    tokio::time::timeout(Duration::from_secs(120), agent.clone().run(stop))
        .await
        .expect("the agent stops")
        .unwrap();
    let execs = w.api.with(|s| s.execs.clone());
    assert_eq!(
        execs[0].command.join(" "),
        "/usr/sbin/fsfreeze -u /data",
        "thaw first: {:?}",
        exec_lines(&w)
    );
    assert_eq!(
        (execs[0].pod.as_str(), execs[0].container.as_str()),
        ("postgresql-0", "app")
    );
    // Then the caught-up run's own pre and post hooks.
    assert!(exec_lines(&w)[1..].iter().any(|e| e.contains("CHECKPOINT")));
    let events = w.api.with(|s| s.all("Event"));
    assert!(
        events.iter().any(|e| e["reason"] == "PostHookRecovered"),
        "the thaw is reported"
    );
    let state: Value = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    assert_eq!(state["frozen"], json!([]));
}

/// Pods that are not running: a local-path (hostPath) volume on this node
/// is read from its host path; a CSI one cannot be, and is recorded (status
/// Skipped, Warning Event, metric), never dropped in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_of_pods_that_are_not_running_are_backed_up_or_recorded() {
    let w = world().await;
    fill(
        &w.host()
            .join("var/lib/rancher/k3s/storage/pvc-gitea_default_gitea"),
        13,
        5,
    );
    w.api.with(|s| {
        s.add(pod(
            "default", "gitea-0", "uid-gitea", NODE, "Pending",
            json!([claim("data", "gitea-pvc")]), json!({"pre.hook.backup.velero.io/command": "sync"}),
        ));
        s.add(pvc("default", "gitea-pvc", "pvc-gitea", "local-path", json!({})));
        s.add(pv("pvc-gitea", json!({"hostPath": {"path": "/var/lib/rancher/k3s/storage/pvc-gitea_default_gitea"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE]}]}]}}})));
        s.add(pod(
            "monitoring", "loki-0", "uid-loki", NODE, "Failed",
            json!([claim("storage", "storage-loki-0")]), json!({}),
        ));
        s.add(pvc("monitoring", "storage-loki-0", "pvc-loki", "csi-hostpath", json!({})));
        s.add(pv("pvc-loki", json!({"csi": {"driver": "hostpath.csi.k8s.io", "volumeHandle": "h-l"}})));
    });
    let agent = w.agent(NODE, "");
    let report = agent.run_once("daily").await.unwrap();
    assert_eq!(report.failed(), 0, "{report:#?}");
    let gitea = report
        .volumes
        .iter()
        .find(|v| v.target.pvc == "gitea-pvc")
        .expect("the Pending pod's local-path volume is backed up");
    assert_eq!(gitea.phase, Phase::Succeeded);
    let (snaps, _) = w.repo.snapshots().unwrap();
    let snap = snaps
        .iter()
        .find(|(id, _)| Some(id.to_hex()) == gitea.snapshot)
        .map(|(_, s)| s.clone())
        .unwrap();
    let target = w.dir.path().join("restored-gitea");
    marmoset_storage::restore(
        &w.repo,
        &snap,
        "",
        &target,
        &Default::default(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(read_tree(&target), read_tree(&gitea.target.path));
    // No hook is run in a pod that is not running.
    assert!(!exec_lines(&w).iter().any(|e| e == "sync"));

    let loki = report
        .skipped
        .iter()
        .find(|s| s.pod == "loki-0")
        .expect("the CSI volume is recorded");
    assert!(!loki.intentional);
    assert!(
        loki.reason.contains("Failed") && loki.reason.contains("pvc-loki"),
        "{}",
        loki.reason
    );
    let cm = w
        .api
        .with(|s| {
            s.get(
                "v1",
                "ConfigMap",
                Some(AGENT_NS),
                "marmoset-status.daily.monitoring.storage-loki-0",
            )
        })
        .expect("a status for the skipped volume");
    assert_eq!(cm["data"]["phase"], "Skipped");
    assert!(cm["data"]["status.json"]
        .as_str()
        .unwrap()
        .contains("mounted only while a pod runs"));
    let events = w.api.with(|s| s.all("Event"));
    let ev = events
        .iter()
        .find(|e| e["reason"] == "BackupSkipped" && e["involvedObject"]["name"] == "loki-0")
        .expect("a Warning Event on the pod");
    assert_eq!(ev["type"], "Warning");
    assert!(ev["message"].as_str().unwrap().contains("storage-loki-0"));
    // Opt-outs are not reported as problems.
    assert!(!events
        .iter()
        .any(|e| e["reason"] == "BackupSkipped" && e["involvedObject"]["name"] == "triton-0"));
    let (addr, server) = marmoset_agent::metrics::serve("127.0.0.1:0", agent.metrics())
        .await
        .unwrap();
    let text = scrape(addr).await;
    assert_eq!(
        metric(&text, "marmoset_volume_skips_total{namespace=\"monitoring\",pvc=\"storage-loki-0\",schedule=\"daily\"}"),
        Some(1.0)
    );
    server.abort();
}

/// The API server fails the first listings (a restart): the run waits and
/// retries instead of giving up until tomorrow; past the attempts, the
/// run fails with the API's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_errors_are_retried_with_backoff() {
    let w = world().await;
    w.api.with(|s| s.fail("GET", "/api/v1/pods?", 500, 2));
    let agent = w.agent(NODE, "retry:\n  backoff: 1s\n  discoveryAttempts: 3");
    let started = std::time::Instant::now();
    let report = agent.run_once("daily").await.unwrap();
    assert_eq!(report.volumes.len(), 3);
    assert_eq!(report.failed(), 0);
    // 1s then 2s of backoff.
    assert!(started.elapsed() >= Duration::from_secs(3));
    let lists = w.api.with(|s| {
        s.requests
            .iter()
            .filter(|(m, p)| m == "GET" && p.starts_with("/api/v1/pods?"))
            .count()
    });
    assert_eq!(lists, 3);

    w.api.with(|s| s.fail("GET", "/api/v1/pods?", 500, 3));
    let e = agent.run_once("daily").await.unwrap_err().to_string();
    assert!(e.contains("list pods on node node-a"), "{e}");
}

/// A volume that fails (here: not mounted yet) is tried again later in the
/// same run, and the report keeps its final outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_volumes_are_retried_within_the_run() {
    let w = world().await;
    let mount = w
        .kubelet()
        .join("pods/uid-prom/volumes/kubernetes.io~local-volume/pv-local-3333");
    let hidden = w.dir.path().join("prom-hidden");
    std::fs::rename(&mount, &hidden).unwrap();
    let agent = w.agent(NODE, "retry:\n  volumeRetryDelay: 2s\n  volumeRetries: 2");
    let api = &w.api;
    let remount = async {
        wait_for("the first failure", || {
            api.with(|s| {
                s.all("Event").iter().any(|e| {
                    e["reason"] == "BackupFailed"
                        && e["involvedObject"]["name"] == "prometheus-db-prometheus-0"
                })
            })
        })
        .await;
        std::fs::rename(&hidden, &mount).unwrap();
    };
    let (report, ()) = tokio::join!(agent.run_once("daily"), remount);
    let report = report.unwrap();
    assert_eq!(report.retries, 1, "{report:#?}");
    assert_eq!(report.failed(), 0, "{report:#?}");
    assert_eq!(report.volumes.len(), 3);
    let prom = report
        .volumes
        .iter()
        .find(|v| v.target.pod == "prometheus-db-0")
        .unwrap();
    assert_eq!(prom.phase, Phase::Succeeded);
    let snaps = volume_snapshots(&w.repo);
    assert_eq!(snaps.len(), 3, "the others were not backed up twice");
}

/// Daily and weekly keep a status each; a PVC that is deleted loses both
/// (and its metrics, so the staleness alert does not fire forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_schedule_has_its_own_status_and_a_deleted_pvc_loses_them() {
    let w = world().await;
    let agent = w.agent(NODE, "");
    agent.run_once("daily").await.unwrap();
    agent.run_once("weekly").await.unwrap();
    let names = |w: &World| -> Vec<String> {
        let mut n: Vec<String> = w.api.with(|s| {
            s.all("ConfigMap")
                .iter()
                .map(|c| c["metadata"]["name"].as_str().unwrap().to_string())
                .collect()
        });
        n.sort();
        n
    };
    let before = names(&w);
    for sched in ["daily", "weekly"] {
        for source in [
            "default.postgresql-codetalk-pvc",
            "microservices.mongodb",
            "monitoring.prometheus-db-prometheus-0",
        ] {
            let name = format!("marmoset-status.{sched}.{source}");
            assert!(before.contains(&name), "{name} in {before:?}");
        }
    }
    let weekly = w
        .api
        .with(|s| {
            s.get(
                "v1",
                "ConfigMap",
                Some(AGENT_NS),
                "marmoset-status.weekly.microservices.mongodb",
            )
        })
        .unwrap();
    assert_eq!(weekly["data"]["schedule"], "weekly");
    assert_eq!(
        weekly["metadata"]["labels"]["marmoset.dev/schedule"],
        "weekly"
    );

    // The application and its PVC are deleted.
    w.api.with(|s| {
        s.remove("v1", "Pod", Some("microservices"), "mongodb-0");
        s.remove(
            "v1",
            "PersistentVolumeClaim",
            Some("microservices"),
            "mongodb",
        );
    });
    agent.run_once("daily").await.unwrap();
    let after = names(&w);
    assert!(
        !after.iter().any(|n| n.contains("microservices.mongodb")),
        "{after:?}"
    );
    assert_eq!(after.len(), before.len() - 2, "{after:?}");
    let (addr, server) = marmoset_agent::metrics::serve("127.0.0.1:0", agent.metrics())
        .await
        .unwrap();
    let text = scrape(addr).await;
    assert!(!text.contains("pvc=\"mongodb\""), "{text}");
    assert!(text.contains("pvc=\"postgresql-codetalk-pvc\""));
    server.abort();
}

/// Leadership is judged by watching the lease change, not by comparing
/// the holder's clock with ours: a holder whose clock is an hour behind
/// keeps its lease while it renews; one whose clock is an hour ahead loses
/// it soon after it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_clocks_neither_steal_nor_hold_a_lease() {
    let w = world().await;
    let client = w.api.client(AGENT_NS);
    let b = lease(&client, "skew", "node-b", 10);
    let write = |w: &World, renew: chrono::DateTime<chrono::Utc>| {
        w.api.with(|s| {
            let mut obj = s
                .get("coordination.k8s.io/v1", "Lease", Some(AGENT_NS), "skew")
                .unwrap_or_else(|| {
                    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": "skew", "namespace": AGENT_NS}, "spec": {}})
                });
            obj["spec"] = json!({"holderIdentity": "node-a", "leaseDurationSeconds": 2,
                "renewTime": renew.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "leaseTransitions": 0});
            s.add(obj);
        })
    };
    // node-a's clock is an hour behind: every renewal looks an hour old.
    let behind = || chrono::Utc::now() - chrono::Duration::hours(1);
    write(&w, behind());
    for _ in 0..6 {
        assert!(
            !b.try_acquire_or_renew().await.unwrap().leader,
            "a live lease is not stolen"
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
        write(&w, behind());
    }
    // node-a's clock is an hour ahead, and it stops renewing.
    write(&w, chrono::Utc::now() + chrono::Duration::hours(1));
    assert!(!b.try_acquire_or_renew().await.unwrap().leader);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let st = b.try_acquire_or_renew().await.unwrap();
    assert!(
        st.leader,
        "a dead lease is taken after its duration, whatever its times say"
    );
}

/// Maintenance that waits for running backups keeps its lease: the other
/// candidate never takes it over, though the wait outlasts the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_keeps_its_lease_while_it_waits_for_backups() {
    let w = world().await;
    slow_freeze(&w, Duration::from_secs(13));
    let a = w.agent("node-a", "maintenance:\n  leaseDuration: 10s");
    let client = w.api.client(AGENT_NS);
    let lease_a = lease(&client, "marmoset-maintenance", "node-a", 10);
    let lease_b = lease(&client, "marmoset-maintenance", "node-b", 10);
    let api = &w.api;
    let maintain = async {
        // The backup holds the repository (its pod is frozen for 13s).
        wait_for("the pre hook", || {
            api.with(|s| {
                s.execs
                    .iter()
                    .any(|e| e.command.join(" ").contains("CHECKPOINT"))
            })
        })
        .await;
        let round = a.maintenance_round(&lease_a);
        tokio::pin!(round);
        let mut b_won = false;
        let report = loop {
            tokio::select! {
                r = &mut round => break r,
                _ = tokio::time::sleep(Duration::from_millis(1000)) => {
                    b_won |= lease_b.try_acquire_or_renew().await.unwrap().leader;
                }
            }
        };
        (report.unwrap(), b_won)
    };
    let (run, (report, b_won)) = tokio::join!(a.run_once("daily"), maintain);
    assert_eq!(run.unwrap().failed(), 0);
    assert!(report.is_some(), "maintenance ran after the backups");
    assert!(!b_won, "the waiting holder kept its lease");
}

/// Volumes are backed up `parallelVolumes` at a time: while one pod's
/// freeze takes its time, the other pods' volumes are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_backed_up_in_parallel() {
    for (parallel, overlaps) in [(1, false), (2, true)] {
        let w = world().await;
        slow_freeze(&w, Duration::from_secs(3));
        let agent = w.agent(NODE, &format!("parallelVolumes: {parallel}"));
        let report = agent.run_once("daily").await.unwrap();
        assert_eq!(report.failed(), 0);
        let requests = w.api.with(|s| s.requests.clone());
        let thaw = requests
            .iter()
            .position(|(_, p)| p.contains("/exec?") && p.contains("thawed"))
            .unwrap();
        let mongo_done = requests
            .iter()
            .rposition(|(m, p)| {
                m == "PUT" && p.contains("marmoset-status.daily.microservices.mongodb")
            })
            .unwrap();
        assert_eq!(
            mongo_done < thaw,
            overlaps,
            "parallelVolumes {parallel}: mongodb finished at request {mongo_done}, postgresql thawed at {thaw}"
        );
    }
}

fn pg_volume(report: &RunReport) -> &marmoset_agent::runner::VolumeOutcome {
    report
        .volumes
        .iter()
        .find(|v| v.target.pod == "postgresql-0")
        .expect("postgresql volume")
}

fn frozen_entries(w: &World) -> Vec<Value> {
    let file = w
        .dir
        .path()
        .join("state")
        .join(format!("agent-state-{NODE}.json"));
    let state: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    state["frozen"].as_array().cloned().unwrap_or_default()
}

/// A post hook that fails leaves the application possibly frozen: it
/// stays pending, the volume says so, the next run tries the thaw first
/// and does not freeze the pod again while it fails, and once it succeeds
/// the pod is backed up as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_post_hook_is_retried_and_the_pod_not_frozen_again() {
    let w = world().await;
    w.api.with(|s| {
        s.exec_rules
            .push(("thawed".into(), ExecResult::Exit(1, "cannot thaw".into())))
    });
    let agent = w.agent(NODE, "maintenance:\n  enabled: false");
    let report = agent.run_once("daily").await.unwrap();
    let pg = pg_volume(&report);
    assert_eq!(pg.phase, Phase::Failed, "{pg:?}");
    assert!(pg.snapshot.is_some(), "the copy itself is good");
    assert!(pg.error.as_deref().unwrap().contains("post hook failed"));
    let frozen = frozen_entries(&w);
    assert_eq!(frozen.len(), 1, "{frozen:?}");
    assert_eq!(frozen[0]["failed"], true);

    // Next run: the thaw is tried first, fails, and no new freeze.
    let before = exec_lines(&w).len();
    let report = agent.run_once("daily").await.unwrap();
    let execs = exec_lines(&w)[before..].to_vec();
    assert!(
        execs.iter().all(|e| !e.contains("CHECKPOINT")),
        "not frozen again: {execs:?}"
    );
    assert!(execs.iter().any(|e| e.contains("thawed")), "{execs:?}");
    let pg = pg_volume(&report);
    assert!(
        pg.error.as_deref().unwrap().contains("still fails"),
        "{pg:?}"
    );
    assert_eq!(frozen_entries(&w).len(), 1);

    // The application recovers: thaw, then the usual freeze and thaw.
    w.api.with(|s| s.exec_rules.clear());
    let before = exec_lines(&w).len();
    let report = agent.run_once("daily").await.unwrap();
    assert_eq!(pg_volume(&report).phase, Phase::Succeeded);
    let execs = exec_lines(&w)[before..].to_vec();
    assert_eq!(execs.len(), 3, "{execs:?}");
    assert!(execs[0].contains("thawed") && execs[1].contains("CHECKPOINT"));
    assert!(frozen_entries(&w).is_empty());
}

/// Without a state file to record the pending thaw in, a crash would
/// leave the pod frozen for good: it is not frozen, and its volume fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_freeze_without_a_writable_state_file() {
    let w = world().await;
    let state = w.dir.path().join("state");
    std::fs::create_dir_all(state.join(format!("agent-state-{NODE}.json"))).unwrap();
    let agent = w.agent(NODE, "maintenance:\n  enabled: false");
    let report = agent.run_once("daily").await.unwrap();
    assert!(exec_lines(&w).is_empty(), "{:?}", exec_lines(&w));
    let pg = pg_volume(&report);
    assert_eq!(pg.phase, Phase::Failed);
    assert!(
        pg.error.as_deref().unwrap().contains("state file"),
        "{pg:?}"
    );
}

/// Hook annotations that cannot be understood run no hook at all (a thaw
/// without its freeze, or a backup without the freeze asked for), and the
/// volume fails with the reason instead of passing as Succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_hook_annotations_fail_the_volume_and_run_no_hook() {
    let w = world().await;
    w.api.with(|s| {
        let mut p = s.get("v1", "Pod", Some("default"), "postgresql-0").unwrap();
        p["metadata"]["annotations"]["pre.hook.backup.velero.io/timeout"] = json!("90");
        s.add(p);
    });
    let agent = w.agent(NODE, "maintenance:\n  enabled: false");
    let report = agent.run_once("daily").await.unwrap();
    assert!(exec_lines(&w).is_empty(), "{:?}", exec_lines(&w));
    let pg = pg_volume(&report);
    assert_eq!(pg.phase, Phase::Failed);
    assert!(pg.snapshot.is_none());
    assert!(
        pg.error.as_deref().unwrap().contains("not understood"),
        "{pg:?}"
    );
    // A timeout beyond the cap is refused the same way.
    w.api.with(|s| {
        let mut p = s.get("v1", "Pod", Some("default"), "postgresql-0").unwrap();
        p["metadata"]["annotations"]["pre.hook.backup.velero.io/timeout"] = json!("8760h");
        s.add(p);
    });
    let report = agent.run_once("daily").await.unwrap();
    assert_eq!(pg_volume(&report).phase, Phase::Failed);
    assert!(exec_lines(&w).is_empty());
}

/// A volume directory swapped for a symlink is not followed, and not
/// reported as an empty success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_directory_that_is_a_symlink_fails() {
    let w = world().await;
    let mount = w
        .kubelet()
        .join("pods/uid-pg/volumes/kubernetes.io~csi/pvc-1111/mount");
    std::fs::remove_dir_all(&mount).unwrap();
    std::os::unix::fs::symlink("/etc", &mount).unwrap();
    let agent = w.agent(NODE, "maintenance:\n  enabled: false");
    let report = agent.run_once("daily").await.unwrap();
    let pg = pg_volume(&report);
    assert_eq!(pg.phase, Phase::Failed);
    assert!(
        pg.error.as_deref().unwrap().contains("symbolic link"),
        "{pg:?}"
    );
    let (snaps, _) = w.repo.snapshots().unwrap();
    assert!(!snaps.is_empty(), "the other volumes are backed up");
    assert!(snaps
        .iter()
        .all(|(_, s)| s.source != "default/postgresql-codetalk-pvc"));
}

/// A secondary repository with its own password, and the opener the
/// agent calls (counting its calls).
fn secondary(w: &World) -> (PathBuf, marmoset_agent::secondary::SecondaryOpener) {
    let dir = w.dir.path().join("secondary");
    let cache = w.dir.path().join("secondary-cache");
    Repository::init(
        Arc::new(FsBackend::new(&dir)),
        b"secondary password",
        marmoset_storage::Config::new(),
        &OpenOptions {
            cache_root: Some(cache.clone()),
        },
    )
    .unwrap();
    let d = dir.clone();
    let opener: marmoset_agent::secondary::SecondaryOpener = Arc::new(move || {
        Repository::open(
            Arc::new(FsBackend::new(&d)),
            b"secondary password",
            &OpenOptions {
                cache_root: Some(cache.clone()),
            },
        )
        .map_err(|e| e.to_string())
    });
    (dir, opener)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_run_is_copied_to_the_secondary_repository_and_reported() {
    let w = world().await;
    let (dir, opener) = secondary(&w);
    let agent = w.agent(NODE, "").with_secondary(opener);
    let (addr, _task) = marmoset_agent::metrics::serve("127.0.0.1:0", agent.metrics())
        .await
        .unwrap();
    let report = agent.run_once("daily").await.unwrap();
    assert_eq!(report.failed(), 0, "{report:#?}");
    let sec = report.secondary.clone().expect("secondary outcome");
    assert!(sec.error.is_none(), "{sec:?}");
    // The three volumes and the set's Kubernetes objects.
    assert_eq!((sec.copied, sec.already), (4, 0), "{sec:?}");

    // The secondary (read with its own key) holds every volume's
    // snapshot, recorded as a copy of it, and restores it identically.
    let repo = Repository::open(
        Arc::new(FsBackend::new(&dir)),
        b"secondary password",
        &OpenOptions {
            cache_root: Some(w.dir.path().join("reader-cache")),
        },
    )
    .unwrap();
    let (copies, _) = repo.snapshots().unwrap();
    assert_eq!(copies.len(), 4, "three volumes and the set's objects");
    assert_eq!(volume_snapshots(&repo).len(), 3);
    for v in &report.volumes {
        let (_, copy) = copies
            .iter()
            .find(|(_, s)| s.original.map(|o| o.to_hex()) == v.snapshot)
            .expect("a copy of the volume's snapshot");
        assert!(copy.tags.contains(&format!("set={}", report.set)));
        let target = w.dir.path().join("from-secondary").join(&v.target.pvc);
        let progress = marmoset_storage::RestoreProgress::default();
        marmoset_storage::restore(&repo, copy, "", &target, &Default::default(), &progress)
            .unwrap();
        assert_eq!(read_tree(&target), read_tree(&v.target.path));
    }
    let text = scrape(addr).await;
    let at = metric(
        &text,
        "marmoset_secondary_last_success_timestamp_seconds{namespace=\"default\",pvc=\"postgresql-codetalk-pvc\",schedule=\"daily\"}",
    )
    .expect("secondary metric");
    assert!(at > 1.7e9, "{at}");
    let events = w.api.with(|s| s.all("Event"));
    assert_eq!(
        events
            .iter()
            .filter(|e| e["reason"] == "SecondaryCopied")
            .count(),
        3
    );

    // The next run copies its own snapshots only.
    let again = agent.run_once("daily").await.unwrap();
    let sec = again.secondary.expect("secondary outcome");
    // A run within the same second is the same set: its objects are saved once.
    let objects = usize::from(again.set != report.set);
    assert_eq!((sec.copied, sec.already), (3 + objects, 4), "{sec:?}");
    drop(repo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_secondary_fails_its_copy_not_the_backups() {
    let w = world().await;
    let agent = w.agent(NODE, "").with_secondary(Arc::new(|| {
        Err("bucket secondary: connection refused".into())
    }));
    let (addr, _task) = marmoset_agent::metrics::serve("127.0.0.1:0", agent.metrics())
        .await
        .unwrap();
    let report = agent.run_once("daily").await.unwrap();
    assert_eq!(report.failed(), 0, "the primary's backups are done");
    let err = report.secondary.expect("outcome").error.expect("an error");
    assert!(err.contains("connection refused"), "{err}");
    let text = scrape(addr).await;
    assert_eq!(
        metric(
            &text,
            "marmoset_secondary_copy_failures_total{namespace=\"default\",pvc=\"postgresql-codetalk-pvc\",schedule=\"daily\"}"
        ),
        Some(1.0)
    );
    assert!(!text.contains("marmoset_secondary_last_success_timestamp_seconds{"));
    let events = w.api.with(|s| s.all("Event"));
    assert!(events
        .iter()
        .any(|e| e["reason"] == "SecondaryCopyFailed" && e["type"] == "Warning"));
}

pub(super) fn agent_pod(node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("marmoset-agent-{node}"), "namespace": AGENT_NS,
                     "uid": format!("uid-agent-{node}"),
                     "labels": {"app.kubernetes.io/name": "marmoset"}},
        "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "marmoset"}]},
        "status": {"phase": "Running"}
    })
}

/// Agents on two nodes report into one backup set; a third node's agent
/// that never reports leaves it in progress, then PartiallyFailed once
/// the deadline has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_several_nodes_make_one_backup_set() {
    let w = world().await;
    fill(&w.host().join("var/lib/rancher/k3s/storage/pvc-r"), 13, 4);
    w.api.with(|s| {
        for n in [NODE, "node-b", "node-c"] {
            s.add(agent_pod(n));
        }
    });
    let a = w.agent(NODE, "");
    let b = w.agent("node-b", "");
    let sched = a.schedule("daily").unwrap().clone();
    let fire = chrono::DateTime::parse_from_rfc3339("2026-02-08T02:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let ra = a.run_schedule(&sched, fire).await.unwrap();
    let rb = b.run_schedule(&sched, fire).await.unwrap();
    assert_eq!(ra.set, "daily-20260208020000");
    assert_eq!(rb.set, ra.set);

    let now = chrono::Utc::now();
    let (sets, bad) = marmoset_storage::sets(&w.repo, now).unwrap();
    assert!(bad.is_empty());
    assert_eq!(sets.len(), 1, "{sets:#?}");
    let set = &sets[0];
    assert_eq!(set.name, "daily-20260208020000");
    assert_eq!(set.schedule, "daily");
    assert_eq!(set.nodes, [NODE, "node-b"]);
    assert_eq!(set.missing_nodes, ["node-c"]);
    assert_eq!(set.phase, "InProgress");
    assert_eq!(set.volumes.len(), ra.volumes.len() + rb.volumes.len());
    let redis = set
        .volumes
        .iter()
        .find(|v| v.pvc == "redis-pvc")
        .expect("node-b's volume");
    assert_eq!(redis.node, "node-b");
    assert_eq!(redis.phase, "Completed", "{redis:?}");
    assert!(redis.snapshot.is_some() && redis.bytes_read > 0);

    let (later, _) =
        marmoset_storage::sets(&w.repo, now + marmoset_storage::REPORT_DEADLINE).unwrap();
    assert_eq!(later[0].phase, "PartiallyFailed");
    assert!(later[0]
        .errors
        .iter()
        .any(|e| e.contains("node node-c did not report")));

    // The elected agent (the first to run) saved the set's objects, and
    // closes the set once node-c is past the deadline; no other agent does.
    let objects = set
        .objects
        .clone()
        .expect("objects saved by the elected agent");
    assert!(
        objects.count > 0 && objects.snapshot.is_some(),
        "{objects:?}"
    );
    assert!(
        a.finish_sets().await.unwrap().is_empty(),
        "node-c may still report"
    );
    let quick = "sets:\n  reportDeadline: 1s\n";
    let a = w.agent(NODE, quick);
    let b = w.agent("node-b", quick);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        b.finish_sets().await.unwrap().is_empty(),
        "only the elected agent closes"
    );
    assert_eq!(a.finish_sets().await.unwrap(), ["daily-20260208020000"]);
    let (sets, _) = marmoset_storage::sets(&w.repo, chrono::Utc::now()).unwrap();
    assert!(sets[0].closed.is_some());
    assert_eq!(sets[0].phase, "PartiallyFailed", "closed without node-c");
    assert_eq!(sets[0].missing_nodes, ["node-c"]);
    assert!(a.finish_sets().await.unwrap().is_empty(), "closed once");
    // A late node still joins the closed set.
    let c = w.agent("node-c", quick);
    c.run_schedule(&sched, fire).await.unwrap();
    let (sets, _) = marmoset_storage::sets(&w.repo, chrono::Utc::now()).unwrap();
    assert_eq!(sets[0].nodes, [NODE, "node-b", "node-c"]);
    assert!(sets[0].missing_nodes.is_empty());
}

/// The agent elected for the sets dies: another takes the `marmoset-sets`
/// Lease once it has seen it unrenewed for its duration, saves the
/// objects of the set still open (later than its volumes, not lost) and
/// closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_agent_takes_over_the_sets_when_the_elected_one_dies() {
    let w = world().await;
    fill(&w.host().join("var/lib/rancher/k3s/storage/pvc-r"), 13, 4);
    w.api.with(|s| s.add(agent_pod("node-b")));
    let short = "sets:\n  leaseDuration: 10s\n";
    let a = w.agent(NODE, short);
    let sched = a.schedule("daily").unwrap().clone();
    let at = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    a.run_schedule(&sched, at("2026-02-08T02:00:00Z"))
        .await
        .unwrap();
    // node-a is gone; node-b runs the next set alone.
    drop(a);
    let b = w.agent("node-b", short);
    let rb = b
        .run_schedule(&sched, at("2026-02-09T02:00:00Z"))
        .await
        .unwrap();
    assert_eq!(rb.set, "daily-20260209020000");
    let (sets, _) = marmoset_storage::sets(&w.repo, chrono::Utc::now()).unwrap();
    let second = sets.iter().find(|s| s.name == rb.set).unwrap();
    assert!(second.objects.is_none(), "node-a still held the lease");
    assert!(second.closed.is_none());
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(b.finish_sets().await.unwrap(), vec![rb.set.clone()]);
    let (sets, _) = marmoset_storage::sets(&w.repo, chrono::Utc::now()).unwrap();
    let second = sets.iter().find(|s| s.name == rb.set).unwrap();
    let objects = second.objects.clone().expect("saved by the new holder");
    assert!(
        objects.snapshot.is_some() && objects.count > 0,
        "{objects:?}"
    );
    assert!(second.closed.is_some());
    let first = sets
        .iter()
        .find(|s| s.name == "daily-20260208020000")
        .unwrap();
    assert!(first.objects.is_some(), "the first set kept its own");
}
