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
use serde_json::Value;

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
    assert_eq!(
        cfg.included_namespaces,
        marmoset_agent::config::SEED_NAMESPACES
    );
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
    assert_eq!(kubelet.read_only, Some(true));
    assert_eq!(
        kubelet.mount_propagation.as_deref(),
        Some("HostToContainer")
    );
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.privileged, None, "not privileged");
    assert_eq!(sc.capabilities.unwrap().add.unwrap(), ["DAC_READ_SEARCH"]);
    assert_eq!(pod.service_account_name.as_deref(), Some("marmoset-agent"));
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
    let own = rules("Role", "marmoset-agent");
    assert!(own
        .iter()
        .any(|(g, r, _)| g == "coordination.k8s.io" && r == "leases"));
    assert!(own.iter().any(|(_, r, _)| r == "configmaps"));
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
    assert!(
        args.starts_with("verify --max-age 48h --restore-test"),
        "{args}"
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
    for file in ["daemonset.yaml", "verify-cronjob.yaml"] {
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
