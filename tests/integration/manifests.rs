//! The deploy/ manifests parse into the Kubernetes API types with nothing
//! lost (a misspelt field would be dropped and fail the round trip), and
//! they say what the agent needs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use marmoset_agent::AgentConfig;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn docs(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(deploy().join(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d).unwrap();
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Parses `v` as `T` and checks that serialising it gives `v` back.
fn typed<T: DeserializeOwned + Serialize>(v: &Value) -> T {
    let t: T = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{} {}: {e}", v["kind"], v["metadata"]["name"]));
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(
        &back, v,
        "fields lost parsing {} {}",
        v["kind"], v["metadata"]["name"]
    );
    t
}

fn check(v: &Value) {
    match v["kind"].as_str().unwrap() {
        "Namespace" => drop(typed::<Namespace>(v)),
        "ServiceAccount" => drop(typed::<ServiceAccount>(v)),
        "ConfigMap" => drop(typed::<ConfigMap>(v)),
        "Secret" => drop(typed::<Secret>(v)),
        "ClusterRole" => drop(typed::<ClusterRole>(v)),
        "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(v)),
        "Role" => drop(typed::<Role>(v)),
        "RoleBinding" => drop(typed::<RoleBinding>(v)),
        "DaemonSet" => drop(typed::<DaemonSet>(v)),
        "CronJob" => drop(typed::<CronJob>(v)),
        other => panic!("unexpected kind {other}"),
    }
}

#[test]
fn every_manifest_is_a_valid_kubernetes_object() {
    let kustomization = docs("kustomization.yaml");
    let resources: Vec<String> = kustomization[0]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let mut n = 0;
    for file in resources
        .iter()
        .map(String::as_str)
        .chain(["secret.example.yaml"])
    {
        for v in docs(file) {
            check(&v);
            n += 1;
        }
    }
    assert!(n >= 12, "{n} objects");
}

/// The seed's "What's Protected" table (backup-strategy.md): namespace,
/// PVC, storage class.
const SEED_PROTECTED: &[(&str, &str, &str)] = &[
    ("default", "mongodb-educationelly-pvc", "local-path"),
    ("default", "mongodb-educationelly-graphql-pvc", "local-path"),
    ("default", "mongodb-intervalai-pvc", "local-path"),
    ("default", "mongodb-data-mongodb-intervalai-0", "local-path"),
    ("default", "postgresql-codetalk-pvc", "local-path"),
    ("default", "redis-pvc", "local-path"),
    ("default", "llm-models-pvc", "csi-s3"),
    ("default", "triton-models-pvc", "csi-s3"),
    (
        "langfuse",
        "data-langfuse-clickhouse-shard0-0",
        "local-path",
    ),
    ("langfuse", "langfuse-s3", "local-path"),
    ("microservices", "mongodb", "local-path"),
    ("microservices", "redis-data-redis-replicas-0", "local-path"),
    ("microservices", "data-vertex-kafka-0", "local-path"),
    ("monitoring", "prometheus-db-prometheus-0", "local-path"),
    ("monitoring", "prometheus-minio", "local-path"),
    ("monitoring", "storage-prometheus-mimir-0", "local-path"),
    ("monitoring", "storage-prometheus-loki-0", "local-path"),
    ("monitoring", "gotify-pvc", "local-path"),
    ("monitoring", "alertmanager-db-0", "local-path"),
    (
        "monitoring",
        "kafka-data-prometheus-mimir-kafka-0",
        "local-path",
    ),
    ("vertex-platform", "influxdb-data-pvc", "local-path"),
    ("vertex-platform", "influxdb-config-pvc", "local-path"),
    ("vertex-platform", "mongodb-pvc", "local-path"),
    ("vertex-platform", "redis-pvc", "local-path"),
];

fn agent_config() -> AgentConfig {
    let cm: ConfigMap = typed(&docs("configmap.yaml")[0]);
    let text = &cm.data.unwrap()["agent.yaml"];
    AgentConfig::parse(text, "deploy/configmap.yaml").unwrap()
}

#[test]
fn the_example_configuration_is_the_seed_setup_and_parses() {
    let cm: ConfigMap = typed(&docs("configmap.yaml")[0]);
    let text = &cm.data.unwrap()["agent.yaml"];
    let cfg = AgentConfig::parse(text, "deploy/configmap.yaml").unwrap();
    let s = cfg.schedules().unwrap();
    assert_eq!(
        s.iter()
            .map(|s| (s.name.as_str(), s.expr.as_str(), s.keep.num_hours()))
            .collect::<Vec<_>>(),
        [("daily", "0 2 * * *", 168), ("weekly", "0 3 * * 0", 720)]
    );
    // Velero's namespaces are all there.
    for ns in marmoset_agent::config::SEED_NAMESPACES {
        assert!(cfg.namespace_included(ns), "{ns}");
    }
    // Every PVC of the seed's "What's Protected" table would be backed up:
    // its namespace is included and its storage class is not excluded.
    for (ns, pvc, class) in SEED_PROTECTED {
        assert!(cfg.namespace_included(ns), "{ns}/{pvc}: namespace");
        assert!(
            !cfg.excluded_storage_classes.iter().any(|c| c == class),
            "{ns}/{pvc}: storage class {class} excluded"
        );
    }
    assert_eq!(cfg.parallel_volumes, 2);
    assert!(cfg
        .repository
        .unwrap()
        .contains("s3.us-east-005.backblazeb2.com/Marmoset"));
}

#[test]
fn the_daemonset_gives_the_agent_what_it_needs_and_no_more() {
    let ds: DaemonSet = typed(&docs("daemonset.yaml")[0]);
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    let env = c.env.clone().unwrap();
    let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(
        node.value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    let mounts = c.volume_mounts.clone().unwrap();
    let kubelet = mounts
        .iter()
        .find(|m| m.mount_path == "/var/lib/kubelet/pods")
        .unwrap();
    assert_eq!(
        kubelet.mount_propagation.as_deref(),
        Some("HostToContainer")
    );
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.privileged, None, "not privileged");
    // DAC_READ_SEARCH to read every volume; CHOWN, FOWNER and
    // DAC_OVERRIDE to restore owners and modes (k8s restore).
    assert_eq!(
        sc.capabilities.unwrap().add.unwrap(),
        ["DAC_READ_SEARCH", "CHOWN", "FOWNER", "DAC_OVERRIDE"]
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("marmoset-agent"));
}

/// The secondary repository is off until configured; its commented
/// example parses once uncommented, and the DaemonSet already mounts its
/// password and passes its credentials from a secret that may be absent.
#[test]
fn the_secondary_repository_is_optional_and_its_example_is_wired() {
    let cm: ConfigMap = typed(&docs("configmap.yaml")[0]);
    let text = cm.data.unwrap()["agent.yaml"].clone();
    assert!(AgentConfig::parse(&text, "configmap")
        .unwrap()
        .secondary
        .is_none());
    let on = text
        .replace("# secondary:\n", "secondary:\n")
        .replace("#   repository:", "  repository:")
        .replace("#   passwordFile:", "  passwordFile:");
    let sec = AgentConfig::parse(&on, "configmap, secondary on")
        .unwrap()
        .secondary
        .expect("the example, uncommented");
    assert!(sec.repository.starts_with("s3:https://"));
    let password = sec.password_file.unwrap();

    let ds: DaemonSet = typed(&docs("daemonset.yaml")[0]);
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    let mount = c
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .filter(|m| password.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .expect("the password file's directory is mounted");
    let volume = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == mount.name)
        .unwrap();
    let secret = volume.secret.unwrap();
    assert_eq!(secret.secret_name.as_deref(), Some("marmoset-secondary"));
    assert_eq!(secret.optional, Some(true));
    for var in [
        "MARMOSET_SECONDARY_AWS_ACCESS_KEY_ID",
        "MARMOSET_SECONDARY_AWS_SECRET_ACCESS_KEY",
    ] {
        let env = c.env.clone().unwrap();
        let e = env.iter().find(|e| e.name == var).expect(var);
        let key = e.value_from.clone().unwrap().secret_key_ref.unwrap();
        assert_eq!(key.name, "marmoset-secondary");
        assert_eq!(key.optional, Some(true));
    }
}

#[test]
fn rbac_is_least_privilege() {
    let objs = docs("rbac.yaml");
    let rules = |kind: &str, name: &str| -> Vec<(String, String, Vec<String>)> {
        let v = objs
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap();
        v["rules"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                let verbs: Vec<String> = serde_json::from_value(r["verbs"].clone()).unwrap();
                r["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(move |res| {
                        (
                            r["apiGroups"][0].as_str().unwrap().to_string(),
                            res.as_str().unwrap().to_string(),
                            verbs.clone(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let cluster = rules("ClusterRole", "marmoset-agent");
    for (_, res, verbs) in &cluster {
        assert!(
            !verbs
                .iter()
                .any(|v| v == "*" || v == "delete" || v == "update"),
            "{res}: {verbs:?}"
        );
        if res != "events" {
            assert!(
                !verbs.iter().any(|v| v == "create"),
                "{res} read-only: {verbs:?}"
            );
        }
    }
    assert!(cluster
        .iter()
        .any(|(_, r, v)| r == "events" && v == &["create"]));
    assert!(!cluster
        .iter()
        .any(|(_, r, _)| r == "pods/exec" || r == "secrets"));
    let hooks = rules("ClusterRole", "marmoset-agent-hooks");
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0].1, "pods/exec");
    // pods/exec is granted per included namespace, never cluster-wide.
    assert!(
        !objs
            .iter()
            .any(|o| o["kind"] == "ClusterRoleBinding"
                && o["roleRef"]["name"] == "marmoset-agent-hooks"),
        "pods/exec bound cluster-wide"
    );
    let mut bound: Vec<String> = objs
        .iter()
        .filter(|o| o["kind"] == "RoleBinding" && o["roleRef"]["name"] == "marmoset-agent-hooks")
        .map(|o| o["metadata"]["namespace"].as_str().unwrap().to_string())
        .collect();
    bound.sort();
    let mut included = agent_config().included_namespaces;
    included.sort();
    assert_eq!(bound, included, "one exec binding per included namespace");
    let own = rules("Role", "marmoset-agent");
    assert!(own
        .iter()
        .any(|(g, r, _)| g == "coordination.k8s.io" && r == "leases"));
    assert!(own
        .iter()
        .any(|(_, r, v)| r == "configmaps" && v.contains(&"delete".to_string())));
}

#[test]
fn the_verify_job_runs_the_weekly_restore_test() {
    let cj: CronJob = typed(&docs("verify-cronjob.yaml")[0]);
    let spec = cj.spec.unwrap();
    assert_eq!(spec.schedule, "0 6 * * 0");
    let c = &spec
        .job_template
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0];
    let args = c.args.clone().unwrap().join(" ");
    assert_eq!(
        args, "verify --max-age 48h --stream --newest-tag set=daily-",
        "streams the newest daily set: no scratch space the size of a volume"
    );
}

/// The seed's weekly test restore: Sunday 04:00, `default` into a
/// temporary namespace, within the seed job's limits; its rights create
/// what a namespace holds and never update an existing object.
#[test]
fn the_restore_verify_job_is_the_seeds_and_creates_without_overwriting() {
    let objs = docs("verify-restore-cronjob.yaml");
    let cj: CronJob = typed(objs.iter().find(|o| o["kind"] == "CronJob").unwrap());
    let spec = cj.spec.unwrap();
    assert_eq!(spec.schedule, "0 4 * * 0");
    let pod = spec.job_template.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("marmoset-verify"));
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap().join(" ");
    assert_eq!(
        args,
        "k8s verify --schedule daily --namespace default --max-age 48h --timeout 2h"
    );
    let limits = c.resources.clone().unwrap().limits.unwrap();
    assert_eq!(
        (limits["cpu"].0.as_str(), limits["memory"].0.as_str()),
        ("500m", "256Mi")
    );
    for role in objs
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
    {
        for rule in role["rules"].as_array().unwrap() {
            let verbs = rule["verbs"].to_string();
            assert!(
                !verbs.contains("\"update\"") || rule["resources"] == json!(["configmaps"]),
                "{rule}"
            );
            assert!(!verbs.contains("patch") && !verbs.contains('*'), "{rule}");
        }
    }
    // The agent reads every object of a backed-up namespace, Secrets
    // included, only where it is bound: per included namespace.
    let rbac = docs("rbac.yaml");
    let objects = rbac
        .iter()
        .find(|o| o["kind"] == "ClusterRole" && o["metadata"]["name"] == "marmoset-agent-objects")
        .unwrap();
    assert_eq!(objects["rules"][0]["verbs"], json!(["get", "list"]));
    assert!(!rbac
        .iter()
        .any(|o| o["kind"] == "ClusterRoleBinding"
            && o["roleRef"]["name"] == "marmoset-agent-objects"));
    let mut bound: Vec<String> = rbac
        .iter()
        .filter(|o| o["kind"] == "RoleBinding" && o["roleRef"]["name"] == "marmoset-agent-objects")
        .map(|o| o["metadata"]["namespace"].as_str().unwrap().to_string())
        .collect();
    bound.sort();
    let mut included = agent_config().included_namespaces;
    included.sort();
    assert_eq!(bound, included);
}

#[test]
fn the_verify_job_is_bounded_and_unprivileged() {
    let cj: CronJob = typed(&docs("verify-cronjob.yaml")[0]);
    let job = cj.spec.unwrap().job_template.spec.unwrap();
    assert!(job
        .active_deadline_seconds
        .is_some_and(|s| s > 0 && s <= 24 * 3600));
    let pod = job.template.spec.unwrap();
    let psc = pod.security_context.unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert!(psc.run_as_user.is_some_and(|u| u != 0));
    assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let c = &pod.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);
    // The seed's verify job limits: 500m CPU, 256Mi memory.
    let limits = c.resources.clone().unwrap().limits.unwrap();
    assert_eq!(limits["cpu"].0, "500m");
    assert_eq!(limits["memory"].0, "256Mi");
}

#[test]
fn shutdown_has_time_for_the_post_hooks_and_restores_can_write_volumes() {
    let ds: DaemonSet = typed(&docs("daemonset.yaml")[0]);
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let grace = pod.termination_grace_period_seconds.unwrap();
    let timeout = agent_config().hooks.default_timeout.as_secs() as i64;
    assert!(
        grace >= timeout + 30,
        "grace {grace}s, hook timeout {timeout}s"
    );
    // Restores (k8s restore) write the data of restored volumes and the
    // release marker of the pod waiting for them.
    let mounts = pod.containers[0].volume_mounts.clone().unwrap();
    for path in ["/var/lib/rancher/k3s/storage", "/var/lib/kubelet/pods"] {
        let m = mounts.iter().find(|m| m.mount_path == path).unwrap();
        assert_ne!(m.read_only, Some(true), "{path}");
    }
    let kubelet = mounts
        .iter()
        .find(|m| m.mount_path == "/var/lib/kubelet/pods")
        .unwrap();
    assert_eq!(
        kubelet.mount_propagation.as_deref(),
        Some("HostToContainer")
    );
    let caps = pod.containers[0]
        .security_context
        .clone()
        .unwrap()
        .capabilities
        .unwrap();
    assert_eq!(caps.drop.unwrap(), ["ALL"]);
    let mut add = caps.add.unwrap();
    add.sort();
    assert_eq!(add, ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER"]);
    assert!(agent_config().restores.enabled);
}

#[test]
fn prometheus_operator_scrapes_the_agent_and_alerts_after_48h() {
    let dir = |f: &str| format!("monitoring/{f}");
    let kustomization = docs(&dir("kustomization.yaml"));
    assert_eq!(kustomization[0]["resources"].as_array().unwrap().len(), 2);
    let pm = &docs(&dir("podmonitor.yaml"))[0];
    assert_eq!(pm["kind"], "PodMonitor");
    let ds: DaemonSet = typed(&docs("daemonset.yaml")[0]);
    let template = ds.spec.unwrap().template;
    let labels = template.metadata.unwrap().labels.unwrap();
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            labels.get(k).map(String::as_str),
            v.as_str(),
            "selector {k}"
        );
    }
    let port = pm["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    let ports = template.spec.unwrap().containers[0].ports.clone().unwrap();
    assert!(ports.iter().any(|p| p.name.as_deref() == Some(port)));
    let rule = &docs(&dir("prometheusrule.yaml"))[0];
    assert_eq!(rule["kind"], "PrometheusRule");
    let rules: Vec<&Value> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    let too_old = rules
        .iter()
        .find(|r| r["alert"] == "MarmosetBackupTooOld")
        .unwrap();
    let expr = too_old["expr"].as_str().unwrap();
    assert!(
        expr.contains("marmoset_volume_last_success_timestamp_seconds")
            && expr.contains("48 * 3600")
    );
    // Every metric an alert names is one the agent exports.
    let exported = marmoset_agent::metrics::Metrics::new().render();
    for r in &rules {
        let expr = r["expr"].as_str().unwrap();
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("marmoset_") {
                assert!(
                    exported.contains(&format!("# TYPE {word} ")),
                    "{word} is not exported"
                );
            }
        }
    }
}

/// Whether every `(command, probe argument)` runs; when one does not, the
/// test is skipped, except under MARMOSET_TEST_STRICT (`scripts/test`
/// installs them all), where it fails.
fn tools_present(tools: &[(&str, &str)]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(cmd, arg)| {
            !std::process::Command::new(cmd)
                .arg(arg)
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(cmd, _)| *cmd)
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("MARMOSET_TEST_STRICT").is_none(),
        "needed and not installed: {missing:?}"
    );
    eprintln!("skipped: not installed: {missing:?}");
    false
}

/// The alerts fire when they should, checked by Prometheus's own rule
/// tester on synthetic series: a volume that fails from its first run
/// (its failure counter is born at 1, which `increase()` alone misses),
/// a skip, a failure after earlier successes, and a backup too old.
#[test]
fn the_alert_rules_fire_on_failures_skips_and_old_backups() {
    if !tools_present(&[("promtool", "--version")]) {
        return;
    }
    let rule = &docs("monitoring/prometheusrule.yaml")[0];
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        serde_yaml::to_string(&json!({"groups": rule["spec"]["groups"]})).unwrap(),
    )
    .unwrap();
    // promtool compares annotations too: the expected ones are spelt out.
    let alert = |name: &str, at: &str, labels: Value, summary: &str, description: &str| {
        let mut annotations = json!({"summary": summary});
        if !description.is_empty() {
            annotations["description"] = json!(description);
        }
        json!({"eval_time": at, "alertname": name,
               "exp_alerts": if labels.is_null() { json!([]) } else {
                   json!([{"exp_labels": labels, "exp_annotations": annotations}]) }})
    };
    let tests = json!({
        "rule_files": [rules],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                // A new volume whose every backup fails.
                {"series": "marmoset_volume_backup_failures_total{namespace=\"a\",pvc=\"new\",schedule=\"daily\"}",
                 "values": "_x120 1x100 2x100"},
                {"series": "marmoset_volume_skips_total{namespace=\"a\",pvc=\"s\",schedule=\"daily\"}",
                 "values": "_x120 1x100"},
                // Series born at 0 (a new agent pod, a healthy volume)
                // are not failures.
                {"series": "marmoset_hook_failures_total{pod=\"agent-new\"}",
                 "values": "_x120 0x100"},
                {"series": "marmoset_volume_backup_failures_total{namespace=\"a\",pvc=\"ok\",schedule=\"daily\"}",
                 "values": "_x120 0x100"},
                {"series": "marmoset_volume_last_success_timestamp_seconds{namespace=\"a\",pvc=\"ok\",schedule=\"daily\"}",
                 "values": "_x120 7200x100"},
                // Copies to the secondary: one failing, one stale.
                {"series": "marmoset_secondary_copy_failures_total{namespace=\"a\",pvc=\"sec\",schedule=\"daily\"}",
                 "values": "_x120 1x100"},
                {"series": "marmoset_secondary_last_success_timestamp_seconds{namespace=\"a\",pvc=\"sec\",schedule=\"daily\"}",
                 "values": "0x3500"},
                // An old volume: succeeded at 0, then nothing.
                {"series": "marmoset_volume_last_success_timestamp_seconds{namespace=\"a\",pvc=\"old\",schedule=\"daily\"}",
                 "values": "0x3500"},
            ],
            "alert_rule_test": [
                alert("MarmosetVolumeNeverBackedUp", "200m",
                      json!({"severity": "critical", "namespace": "a", "pvc": "new"}),
                      "a/new fails and has never been backed up completely",
                      "kubectl -n marmoset get cm -l marmoset.dev/pvc=new -o yaml shows the errors."),
                alert("MarmosetVolumeFailing", "200m",
                      json!({"severity": "warning", "namespace": "a", "pvc": "new", "schedule": "daily"}),
                      "A daily backup of a/new failed",
                      "See the BackupFailed Event and the volume's status for the error."),
                alert("MarmosetVolumeSkipped", "200m",
                      json!({"severity": "warning", "namespace": "a", "pvc": "s", "schedule": "daily"}),
                      "a/s was left out of a daily run",
                      "See the BackupSkipped Event and the Skipped status for the reason."),
                alert("MarmosetSecondaryFailing", "200m",
                      json!({"severity": "warning", "namespace": "a", "pvc": "sec", "schedule": "daily"}),
                      "A copy of a/sec to the secondary repository failed",
                      "See the SecondaryCopyFailed Event for the error."),
                alert("MarmosetSecondaryTooOld", "47h", Value::Null, "", ""),
                alert("MarmosetSecondaryTooOld", "50h",
                      json!({"severity": "critical", "namespace": "a", "pvc": "sec"}),
                      "No copy of a/sec in the secondary repository for 48h",
                      "See the SecondaryCopyFailed Events and the agent's log."),
                alert("MarmosetHookFailures", "200m", Value::Null, "", ""),
                alert("MarmosetBackupTooOld", "47h", Value::Null, "", ""),
                alert("MarmosetBackupTooOld", "50h",
                      json!({"severity": "critical", "namespace": "a", "pvc": "old"}),
                      "No complete backup of a/old for 48h",
                      "kubectl -n marmoset get cm -l marmoset.dev/pvc=old -o yaml shows the last attempts and their errors."),
            ],
        }],
    });
    let file = dir.path().join("tests.yaml");
    std::fs::write(&file, serde_yaml::to_string(&tests).unwrap()).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["test", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The rendered kustomization validates against the Kubernetes OpenAPI
/// schemas of the seed's version (K3s 1.33), strictly: a misspelt or
/// misplaced field fails. Needs `kubectl` (Debian's kubernetes-client) and
/// `kubernetes-validate` (PyPI); `scripts/test` installs both and sets
/// MARMOSET_TEST_STRICT so that their absence fails there.
#[test]
fn the_rendered_kustomization_validates_against_the_kubernetes_schemas() {
    if !tools_present(&[("kubectl", "--help"), ("kubernetes-validate", "--help")]) {
        return;
    }
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let rendered = dir.path().join("rendered.yaml");
    std::fs::write(&rendered, &out.stdout).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("kind: DaemonSet") && text.contains("image: marmoset:0.1.0"));
    let v = std::process::Command::new("kubernetes-validate")
        .args(["-k", "1.33.0", "--strict", "--quiet"])
        .arg(&rendered)
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
}

#[test]
fn the_image_is_one_kustomize_setting() {
    let kustomization = docs("kustomization.yaml");
    let images = kustomization[0]["images"]
        .as_array()
        .expect("an images: entry");
    assert_eq!(images.len(), 1);
    assert_eq!(images[0]["name"].as_str(), Some("marmoset"));
    assert!(images[0]["newTag"].as_str().is_some_and(|t| !t.is_empty()));
    // Every workload names the image the setting replaces.
    for file in [
        "daemonset.yaml",
        "verify-cronjob.yaml",
        "verify-restore-cronjob.yaml",
    ] {
        let text = std::fs::read_to_string(deploy().join(file)).unwrap();
        let images: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("image:"))
            .map(str::trim)
            .collect();
        assert!(!images.is_empty(), "{file}");
        assert!(
            images.iter().all(|i| *i == "marmoset"),
            "{file}: {images:?}"
        );
    }
}

#[test]
fn the_agent_reaches_every_node_and_is_not_evicted_first() {
    let ds: DaemonSet = typed(&docs("daemonset.yaml")[0]);
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    // One toleration of everything covers NoSchedule and NoExecute taints
    // (K3s servers: CriticalAddonsOnly=true:NoExecute).
    let tolerations = pod.tolerations.unwrap();
    assert!(tolerations
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()));
    let seccomp = pod.security_context.unwrap().seccomp_profile.unwrap();
    assert_eq!(seccomp.type_, "RuntimeDefault");
}
