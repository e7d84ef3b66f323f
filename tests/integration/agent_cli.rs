//! `marmoset agent` as the DaemonSet runs it: the binary, a kubeconfig
//! pointing at a fake API server on loopback, an S3 repository on a real
//! S3 server (moto), and files laid out like the kubelet's pods directory.
//! Then the operator's restore path: `marmoset restore latest --source
//! <namespace>/<pvc>`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::process::Output;

use marmoset_testing::fake_api;
use marmoset_testing::s3_server::S3Server;
use marmoset_testing::trees::{assert_same_tree, random_tree};
use serde_json::json;

use crate::integration::cli::Env;

async fn run(cmd: std::process::Command) -> Output {
    let mut cmd = cmd;
    tokio::task::spawn_blocking(move || cmd.output().expect("spawn marmoset"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_once_backs_up_the_nodes_volumes_to_s3_and_they_restore() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let env = Env::new();
    let url = server.url("cluster");
    env.s3_ok(&url, &["init"]);
    let api = fake_api::FakeApi::start().await;
    let kubelet = env.path("kubelet");
    let data = kubelet.join("pods/uid-redis/volumes/kubernetes.io~csi/pvc-77/mount");
    random_tree(&data, 7, 60);
    api.with(|s| {
        s.add(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "redis-0", "namespace": "default", "uid": "uid-redis"},
            "spec": {"nodeName": "node-a", "containers": [{"name": "redis", "image": "redis:7"}],
                     "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "redis-pvc"}}]},
            "status": {"phase": "Running"}}));
        s.add(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "redis-pvc", "namespace": "default"},
            "spec": {"storageClassName": "csi-hostpath", "volumeName": "pvc-77"}}));
        s.add(json!({"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": "pvc-77"},
            "spec": {"csi": {"driver": "hostpath.csi.k8s.io", "volumeHandle": "77"}}}));
    });
    let kubeconfig = env.path("kubeconfig");
    fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: agent\n  user:\n    token: test-token\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\n    namespace: marmoset\ncurrent-context: fake\n",
            api.addr
        ),
    )
    .unwrap();
    let config = env.path("agent.yaml");
    fs::write(
        &config,
        format!(
            "schedules:\n  - {{name: daily, cron: \"0 2 * * *\", keep: 168h}}\nkubeletDir: {}\nstateDir: {}\nnamespace: marmoset\n",
            kubelet.display(),
            env.path("state").display()
        ),
    )
    .unwrap();
    let agent = |extra: &[&str]| {
        let mut c = env.s3_cmd(&url);
        c.env("KUBECONFIG", &kubeconfig)
            .env("NODE_NAME", "node-a")
            .args(["--json", "agent", "--config"])
            .arg(&config)
            .args(extra);
        c
    };

    let out = run(agent(&["--plan"])).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["volumes"][0]["source"], "default/redis-pvc");

    let out = run(agent(&["--once", "daily"])).await;
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["volumes"][0]["phase"], "Succeeded", "{report}");
    assert_eq!(report["volumes"][0]["source"], "default/redis-pvc");

    // The operator's restore of a PVC's latest snapshot.
    let target = env.path("restored");
    env.s3_ok(
        &url,
        &[
            "restore",
            "latest",
            "--source",
            "default/redis-pvc",
            "--target",
            target.to_str().unwrap(),
        ],
    );
    assert_same_tree(&data, &target);
    let mut c = env.s3_cmd(&url);
    c.args(["restore", "latest", "--source", "default/nope", "--target"])
        .arg(env.path("x"));
    let out = run(c).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("default/nope"));

    // Unknown schedule: a clear error, exit code non-zero.
    let out = run(agent(&["--once", "hourly"])).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hourly") && err.contains("daily"), "{err}");
    // Events and status reached the API server.
    let reasons: Vec<String> = api.with(|s| {
        s.all("Event")
            .iter()
            .map(|e| e["reason"].as_str().unwrap().to_string())
            .collect()
    });
    assert!(
        reasons.contains(&"BackupSucceeded".to_string()),
        "{reasons:?}"
    );
    assert!(api
        .with(|s| s.get(
            "v1",
            "ConfigMap",
            Some("marmoset"),
            "marmoset-status.daily.default.redis-pvc"
        ))
        .is_some());
}

/// SIGTERM to the agent process (a drain, a rollout) while a pod is
/// frozen: the post hook runs before the process exits, quickly, for the
/// daemon and for `--once` alike; and a backup still reading when the
/// pod is thawed is not saved as the frozen copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_thaws_the_frozen_pod_before_the_process_exits() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    for (daemon, slow_backup) in [(true, false), (false, false), (false, true)] {
        let env = Env::new();
        env.init();
        let api = fake_api::FakeApi::start().await;
        let kubelet = env.path("kubelet");
        let mount = kubelet.join("pods/uid-pg/volumes/kubernetes.io~csi/pvc-9/mount");
        random_tree(&mount, 9, 20);
        if slow_backup {
            let mut r = marmoset_testing::random::rng(4);
            fs::write(
                mount.join("big"),
                marmoset_testing::random::random_bytes(&mut r, 16 << 20),
            )
            .unwrap();
        }
        api.with(|s| {
            s.add(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "pg-0", "namespace": "default", "uid": "uid-pg",
                    "annotations": {
                        "pre.hook.backup.velero.io/command": "[\"/sbin/fsfreeze\", \"-f\", \"/data\"]",
                        "pre.hook.backup.velero.io/timeout": "5m",
                        "post.hook.backup.velero.io/command": "[\"/sbin/fsfreeze\", \"-u\", \"/data\"]"}},
                "spec": {"nodeName": "node-a", "containers": [{"name": "pg", "image": "postgres:16"}],
                         "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "pg-pvc"}}]},
                "status": {"phase": "Running"}}));
            s.add(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": "pg-pvc", "namespace": "default"},
                "spec": {"storageClassName": "csi-hostpath", "volumeName": "pvc-9"}}));
            s.add(json!({"apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": "pvc-9"},
                "spec": {"csi": {"driver": "hostpath.csi.k8s.io", "volumeHandle": "9"}}}));
            // The freeze is slow: SIGTERM comes in the middle of it (or
            // the backup is, and SIGTERM comes while it reads).
            if !slow_backup {
                s.exec_rules.push((
                    "-f /data".into(),
                    fake_api::ExecResult::Delay(std::time::Duration::from_secs(60), String::new()),
                ));
            }
        });
        let kubeconfig = env.path("kubeconfig");
        fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: agent\n  user:\n    token: t\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\n    namespace: marmoset\ncurrent-context: fake\n",
                api.addr
            ),
        )
        .unwrap();
        let state = env.path("state");
        if daemon {
            // An interrupted daily run: the daemon runs it at start.
            fs::create_dir_all(&state).unwrap();
            let t = chrono::Utc::now() - chrono::Duration::minutes(5);
            fs::write(
                state.join("agent-state-node-a.json"),
                json!({"schedules": {"daily": {"last_started": t, "last_completed": t - chrono::Duration::days(1)}}})
                    .to_string(),
            )
            .unwrap();
        }
        let config = env.path("agent.yaml");
        fs::write(
            &config,
            format!(
                "schedules:\n  - {{name: daily, cron: \"0 2 * * *\", keep: 168h}}\nkubeletDir: {}\nstateDir: {}\nnamespace: marmoset\nmetricsAddress: 127.0.0.1:0\nmaintenance: {{enabled: false}}\n",
                kubelet.display(),
                state.display()
            ),
        )
        .unwrap();
        let mut c = env.cmd();
        c.env("KUBECONFIG", &kubeconfig)
            .env("NODE_NAME", "node-a")
            .args(["agent", "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if !daemon {
            c.args(["--once", "daily"]);
        }
        if slow_backup {
            c.env("MARMOSET_LIMIT_UPLOAD", "1000");
        }
        let child = c.spawn().unwrap();
        let frozen = |api: &fake_api::FakeApi| {
            api.with(|s| {
                s.execs
                    .iter()
                    .any(|e| e.command.join(" ").contains("-f /data"))
            })
        };
        for _ in 0..600 {
            if frozen(&api) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(frozen(&api), "the pre hook ran (daemon: {daemon})");
        if slow_backup {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        let sent = std::time::Instant::now();
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        let took = sent.elapsed();
        let execs: Vec<String> =
            api.with(|s| s.execs.iter().map(|e| e.command.join(" ")).collect());
        assert_eq!(
            execs,
            ["/sbin/fsfreeze -f /data", "/sbin/fsfreeze -u /data"],
            "thawed before exit (daemon: {daemon}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Well inside the DaemonSet's terminationGracePeriodSeconds.
        assert!(took < std::time::Duration::from_secs(30), "{took:?}");
        assert_eq!(
            out.status.success(),
            daemon,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pending: serde_json::Value =
            serde_json::from_slice(&fs::read(state.join("agent-state-node-a.json")).unwrap())
                .unwrap();
        assert_eq!(pending["frozen"], json!([]));
        if slow_backup {
            // The set's objects are saved before any pod is frozen.
            let snaps = env.json(&["snapshots"]);
            let volumes: Vec<_> = snaps
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["snapshot"]["source"] != "kubernetes")
                .collect();
            assert!(
                volumes.is_empty(),
                "nothing read after the thaw is saved: {snaps}"
            );
        }
    }
}

/// `marmoset sets` lists the agent's backup sets and `sets describe` shows
/// one volume by volume, from the parts the nodes recorded.
#[test]
fn sets_lists_and_describes_backup_sets() {
    use marmoset_storage::{SetPart, SetVolume};
    let env = Env::new();
    env.init();
    let repo = env.open();
    let at = chrono::DateTime::parse_from_rfc3339("2026-02-08T02:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let volume = |pvc: &str, phase: &str, error: Option<&str>| SetVolume {
        namespace: "default".into(),
        pvc: pvc.into(),
        pv: format!("pv-{pvc}"),
        node: String::new(),
        phase: phase.into(),
        snapshot: (phase == "Completed").then(|| "ab".repeat(32)),
        bytes_read: 1 << 20,
        bytes_added: 1 << 10,
        duration_secs: 2.5,
        error: error.map(str::to_string),
    };
    for (node, vols) in [
        ("node-a", vec![volume("pg", "Completed", None)]),
        (
            "node-b",
            vec![volume("mongo", "Failed", Some("disk read error"))],
        ),
    ] {
        repo.save_set_part(&SetPart {
            version: 1,
            set: "daily-20260208020000".into(),
            schedule: "daily".into(),
            node: node.into(),
            started: at,
            finished: at + chrono::Duration::minutes(5),
            nodes_expected: vec!["node-a".into(), "node-b".into()],
            volumes: vols,
            errors: Vec::new(),
            kind: marmoset_storage::PartKind::Node,
            objects: None,
        })
        .unwrap();
    }
    drop(repo);
    let list = env.json(&["sets"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["name"], "daily-20260208020000");
    assert_eq!(list[0]["phase"], "PartiallyFailed");
    let text = String::from_utf8_lossy(&env.ok(&["sets"]).stdout).into_owned();
    assert!(text.contains("daily-20260208020000") && text.contains("PartiallyFailed"));
    let out = env.ok(&["sets", "describe", "daily-20260208020000"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("default/mongo") && text.contains("node-b"),
        "{text}"
    );
    assert!(text.contains("disk read error"), "{text}");
    let out = env
        .cmd()
        .args(["sets", "describe", "weekly-nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no backup set named"));
}
