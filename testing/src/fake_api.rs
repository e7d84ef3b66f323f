//! A fake Kubernetes API server on loopback: enough of the real protocol
//! (JSON objects, resourceVersion conflicts, field selectors, Status errors
//! and the `pods/exec` WebSocket channel protocol) for the agent's client
//! code to run unchanged against it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::SinkExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[derive(Debug, Clone)]
pub struct ExecCall {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub command: Vec<String>,
}

/// How the fake "container" answers an exec whose command line contains
/// the rule's text.
#[derive(Debug, Clone)]
pub enum ExecResult {
    Ok(String),
    Exit(i32, String),
    Hang,
    /// Succeeds with this output after a while (a slow freeze).
    Delay(Duration, String),
}

/// Answers the next `times` requests whose method is `method` and whose
/// path and query contain `path` with `code` (an outage, throttling).
#[derive(Debug, Clone)]
pub struct FailRule {
    pub method: String,
    pub path: String,
    pub code: u16,
    pub times: usize,
}

#[derive(Default)]
pub struct Store {
    objects: BTreeMap<String, Value>,
    rv: u64,
    pub requests: Vec<(String, String)>,
    pub execs: Vec<ExecCall>,
    pub exec_rules: Vec<(String, ExecResult)>,
    pub fail_rules: Vec<FailRule>,
}

pub struct FakeApi {
    pub addr: SocketAddr,
    pub store: Arc<Mutex<Store>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The resource types this server serves (what a K3s cluster serves,
/// less what no test needs): group version, plural, kind, namespaced,
/// verbs. Discovery (`/api`, `/apis`, `/api/v1`, `/apis/<g>/<v>`) is
/// answered from it.
pub const RESOURCES: &[(&str, &str, &str, bool)] = &[
    ("v1", "pods", "Pod", true),
    (
        "v1",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        true,
    ),
    ("v1", "persistentvolumes", "PersistentVolume", false),
    ("v1", "configmaps", "ConfigMap", true),
    ("v1", "secrets", "Secret", true),
    ("v1", "services", "Service", true),
    ("v1", "serviceaccounts", "ServiceAccount", true),
    ("v1", "endpoints", "Endpoints", true),
    ("v1", "events", "Event", true),
    ("v1", "namespaces", "Namespace", false),
    ("v1", "nodes", "Node", false),
    ("apps/v1", "deployments", "Deployment", true),
    ("apps/v1", "statefulsets", "StatefulSet", true),
    ("apps/v1", "daemonsets", "DaemonSet", true),
    ("apps/v1", "replicasets", "ReplicaSet", true),
    ("apps/v1", "controllerrevisions", "ControllerRevision", true),
    ("batch/v1", "jobs", "Job", true),
    ("batch/v1", "cronjobs", "CronJob", true),
    ("networking.k8s.io/v1", "ingresses", "Ingress", true),
    (
        "networking.k8s.io/v1",
        "networkpolicies",
        "NetworkPolicy",
        true,
    ),
    ("coordination.k8s.io/v1", "leases", "Lease", true),
    ("events.k8s.io/v1", "events", "Event", true),
    (
        "discovery.k8s.io/v1",
        "endpointslices",
        "EndpointSlice",
        true,
    ),
    ("rbac.authorization.k8s.io/v1", "roles", "Role", true),
    (
        "rbac.authorization.k8s.io/v1",
        "rolebindings",
        "RoleBinding",
        true,
    ),
    ("storage.k8s.io/v1", "storageclasses", "StorageClass", false),
];

fn resource_of(kind: &str) -> String {
    RESOURCES
        .iter()
        .find(|r| r.2 == kind)
        .map(|r| r.1.to_string())
        .unwrap_or_else(|| format!("{}s", kind.to_lowercase()))
}

fn kind_of(resource: &str) -> &'static str {
    RESOURCES
        .iter()
        .find(|r| r.1 == resource)
        .map(|r| r.2)
        .unwrap_or("Unknown")
}

/// Discovery documents, or None when `path` is not a discovery path.
fn discovery(path: &str) -> Option<Value> {
    let path = path.trim_end_matches('/');
    let group_versions: Vec<&str> = {
        let mut v: Vec<&str> = RESOURCES.iter().map(|r| r.0).collect();
        v.dedup();
        v
    };
    if path == "/api" {
        return Some(json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]}));
    }
    if path == "/apis" {
        let groups: Vec<Value> = group_versions
            .iter()
            .filter_map(|gv| gv.split_once('/'))
            .map(|(g, v)| {
                let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
                json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
            })
            .collect();
        return Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}));
    }
    let gv = path
        .strip_prefix("/api/")
        .or_else(|| path.strip_prefix("/apis/"))?;
    if !group_versions.contains(&gv) {
        return None;
    }
    let mut resources: Vec<Value> = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.0 == gv) {
        resources.push(
            json!({"name": r.1, "singularName": r.2.to_lowercase(), "namespaced": r.3,
            "kind": r.2, "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}),
        );
        if r.1 == "pods" {
            resources.push(
                json!({"name": "pods/exec", "singularName": "", "namespaced": true,
                "kind": "PodExecOptions", "verbs": ["create", "get"]}),
            );
        }
    }
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

/// `/api/v1` or `/apis/<group>/<version>` for an apiVersion.
fn prefix_of(api_version: &str) -> String {
    if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    respond(code, &body)
}

fn respond(code: u16, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(h, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// A request path, split: `/api/v1/namespaces/default/pods/x/exec`.
struct Route {
    prefix: String,
    namespace: Option<String>,
    resource: String,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match *segs.first()? {
        "api" => (format!("/api/{}", segs.get(1)?), &segs[2..]),
        "apis" => (
            format!("/apis/{}/{}", segs.get(1)?, segs.get(2)?),
            &segs[3..],
        ),
        _ => return None,
    };
    let (namespace, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    Some(Route {
        prefix,
        namespace,
        resource: rest.first()?.to_string(),
        name: rest.get(1).map(|s| s.to_string()),
        sub: rest.get(2).map(|s| s.to_string()),
    })
}

fn key(prefix: &str, ns: Option<&str>, resource: &str, name: &str) -> String {
    match ns {
        Some(ns) => format!("{prefix}/namespaces/{ns}/{resource}/{name}"),
        None => format!("{prefix}/{resource}/{name}"),
    }
}

/// `key=value` terms of a selector parameter (equality only).
fn selector_pairs(query: &[(String, String)], param: &str) -> Vec<(String, String)> {
    query
        .iter()
        .filter(|(k, _)| k == param)
        .flat_map(|(_, v)| v.split(',').map(String::from).collect::<Vec<_>>())
        .filter_map(|s| {
            s.split_once('=')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect()
}

fn field(v: &Value, path: &str) -> Option<String> {
    let mut cur = v;
    for p in path.split('.') {
        cur = cur.get(p)?;
    }
    cur.as_str().map(String::from)
}

impl Store {
    /// Fails the next `times` matching requests with `code`.
    pub fn fail(&mut self, method: &str, path: &str, code: u16, times: usize) {
        self.fail_rules.push(FailRule {
            method: method.into(),
            path: path.into(),
            code,
            times,
        });
    }

    fn injected_failure(&mut self, method: &str, target: &str) -> Option<u16> {
        let rule = self
            .fail_rules
            .iter_mut()
            .find(|r| r.times > 0 && r.method == method && target.contains(&r.path))?;
        rule.times -= 1;
        Some(rule.code)
    }

    /// Adds an object as if `kubectl apply` had created it.
    pub fn add(&mut self, mut obj: Value) {
        let kind = obj["kind"].as_str().unwrap().to_string();
        let prefix = prefix_of(obj["apiVersion"].as_str().unwrap());
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let ns = obj["metadata"]["namespace"].as_str().map(String::from);
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if obj["metadata"].get("uid").is_none() {
            obj["metadata"]["uid"] = json!(format!("uid-{}-{}", kind.to_lowercase(), self.rv));
        }
        self.objects
            .insert(key(&prefix, ns.as_deref(), &resource_of(&kind), &name), obj);
    }

    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        self.objects
            .get(&key(&prefix_of(api_version), ns, &resource_of(kind), name))
            .cloned()
    }

    pub fn remove(&mut self, api_version: &str, kind: &str, ns: Option<&str>, name: &str) {
        self.objects
            .remove(&key(&prefix_of(api_version), ns, &resource_of(kind), name));
    }

    /// All objects of a kind (any namespace).
    pub fn all(&self, kind: &str) -> Vec<Value> {
        let res = format!("/{}/", resource_of(kind));
        self.objects
            .iter()
            .filter(|(k, _)| k.contains(&res))
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn list(
        &self,
        prefix: &str,
        ns: Option<&str>,
        resource: &str,
        query: &[(String, String)],
    ) -> Value {
        let want = match ns {
            Some(ns) => format!("{prefix}/namespaces/{ns}/{resource}/"),
            None => format!("{prefix}/"),
        };
        let selectors = selector_pairs(query, "fieldSelector");
        let labels = selector_pairs(query, "labelSelector");
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|(k, _)| k.starts_with(&want) && k.contains(&format!("/{resource}/")))
            .filter(|(k, _)| ns.is_some() || k.split('/').nth_back(1) == Some(resource))
            .map(|(_, v)| v)
            .filter(|v| {
                selectors
                    .iter()
                    .all(|(f, val)| field(v, f).as_deref() == Some(val.as_str()))
            })
            .filter(|v| {
                labels
                    .iter()
                    .all(|(k, val)| v["metadata"]["labels"][k].as_str() == Some(val.as_str()))
            })
            .cloned()
            .collect();
        json!({"kind": format!("{}List", kind_of(resource)), "apiVersion": prefix.trim_start_matches("/api/").trim_start_matches("/apis/"),
            "metadata": {"resourceVersion": self.rv.to_string()}, "items": items})
    }
}

impl FakeApi {
    pub async fn start() -> FakeApi {
        Self::start_on(0).await
    }

    /// Listens on `127.0.0.1:port` (0: any free port).
    pub async fn start_on(port: u16) -> FakeApi {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let store = Arc::new(Mutex::new(Store::default()));
        let s = store.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(s.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        FakeApi { addr, store, task }
    }

    /// A client for this server, with `namespace` as its default.
    pub fn client(&self, namespace: &str) -> kube::Client {
        let mut cfg = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        cfg.default_namespace = namespace.into();
        cfg.read_timeout = Some(Duration::from_secs(30));
        kube::Client::try_from(cfg).unwrap()
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        f(&mut self.store.lock().unwrap())
    }
}

async fn handle(
    store: Arc<Mutex<Store>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = query_pairs(req.uri().query());
    let target = format!("{}?{}", path, req.uri().query().unwrap_or(""));
    let injected = {
        let mut st = store.lock().unwrap();
        st.requests.push((method.clone(), target.clone()));
        st.injected_failure(&method, &target)
    };
    if let Some(code) = injected {
        return Ok(status(
            code,
            "ServiceUnavailable",
            "injected failure: the server is currently unable to handle the request",
        ));
    }
    if method == "GET" {
        if let Some(doc) = discovery(&path) {
            return Ok(respond(200, &doc));
        }
    }
    let Some(Route {
        prefix,
        namespace: ns,
        resource,
        name,
        sub,
    }) = parse_path(&path)
    else {
        return Ok(status(404, "NotFound", &format!("no route {path}")));
    };
    if sub.as_deref() == Some("exec") {
        return Ok(exec(
            store,
            req,
            ns.unwrap_or_default(),
            name.unwrap_or_default(),
            &query,
        ));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut st = store.lock().unwrap();
    let resp = match (method.as_str(), name) {
        ("GET", None) => respond(200, &st.list(&prefix, ns.as_deref(), &resource, &query)),
        ("GET", Some(name)) => match st
            .objects
            .get(&key(&prefix, ns.as_deref(), &resource, &name))
        {
            Some(o) => respond(200, o),
            None => status(404, "NotFound", &format!("{resource} \"{name}\" not found")),
        },
        ("POST", None) => {
            let mut obj: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
            let k = key(&prefix, ns.as_deref(), &resource, &name);
            if st.objects.contains_key(&k) {
                status(
                    409,
                    "AlreadyExists",
                    &format!("{resource} \"{name}\" already exists"),
                )
            } else {
                st.rv += 1;
                obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                obj["metadata"]["uid"] = json!(format!("uid-{}", st.rv));
                obj["metadata"]["namespace"] = json!(ns);
                obj["kind"] = json!(kind_of(&resource));
                st.objects.insert(k, obj.clone());
                respond(201, &obj)
            }
        }
        ("PUT", Some(name)) => {
            let mut obj: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let k = key(&prefix, ns.as_deref(), &resource, &name);
            match st.objects.get(&k).cloned() {
                None => status(404, "NotFound", &format!("{resource} \"{name}\" not found")),
                Some(old) => {
                    let sent = obj["metadata"]["resourceVersion"]
                        .as_str()
                        .map(String::from);
                    if sent.is_some()
                        && sent
                            != old["metadata"]["resourceVersion"]
                                .as_str()
                                .map(String::from)
                    {
                        status(409, "Conflict", "the object has been modified; please apply your changes to the latest version and try again")
                    } else {
                        st.rv += 1;
                        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                        obj["metadata"]["uid"] = old["metadata"]["uid"].clone();
                        obj["kind"] = json!(kind_of(&resource));
                        st.objects.insert(k, obj.clone());
                        respond(200, &obj)
                    }
                }
            }
        }
        ("DELETE", Some(name)) => {
            let k = key(&prefix, ns.as_deref(), &resource, &name);
            if resource == "namespaces" && ns.is_none() {
                // Like the namespace controller, once the namespace goes.
                let inside = format!("/namespaces/{name}/");
                st.objects.retain(|k, _| !k.contains(&inside));
            }
            match st.objects.remove(&k) {
                Some(_) => respond(
                    200,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                ),
                None => status(404, "NotFound", &format!("{resource} \"{name}\" not found")),
            }
        }
        _ => status(
            405,
            "MethodNotAllowed",
            &format!("{method} not supported here"),
        ),
    };
    Ok(resp)
}

/// Answers a `pods/exec` upgrade with the v4 channel protocol: stdout on
/// channel 1, then a Status on channel 3.
fn exec(
    store: Arc<Mutex<Store>>,
    mut req: Request<Incoming>,
    namespace: String,
    pod: String,
    query: &[(String, String)],
) -> Response<Full<Bytes>> {
    let command: Vec<String> = query
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    let container = query
        .iter()
        .find(|(k, _)| k == "container")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let Some(ws_key) = req.headers().get("sec-websocket-key").cloned() else {
        return status(400, "BadRequest", "exec needs a WebSocket upgrade");
    };
    let result = {
        let mut st = store.lock().unwrap();
        st.execs.push(ExecCall {
            namespace,
            pod,
            container,
            command: command.clone(),
        });
        let line = command.join(" ");
        st.exec_rules
            .iter()
            .find(|(pat, _)| line.contains(pat.as_str()))
            .map(|(_, r)| r.clone())
            .unwrap_or(ExecResult::Ok(String::new()))
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let result = match result {
            ExecResult::Delay(d, out) => {
                tokio::time::sleep(d).await;
                ExecResult::Ok(out)
            }
            other => other,
        };
        let status = match result {
            ExecResult::Ok(out) => {
                let mut m = vec![1u8];
                m.extend_from_slice(out.as_bytes());
                let _ = ws.send(Message::binary(m)).await;
                json!({"metadata": {}, "status": "Success"})
            }
            ExecResult::Exit(code, err) => {
                let mut m = vec![2u8];
                m.extend_from_slice(err.as_bytes());
                let _ = ws.send(Message::binary(m)).await;
                json!({"metadata": {}, "status": "Failure",
                    "message": format!("command terminated with non-zero exit code: exit status {code}"),
                    "reason": "NonZeroExitCode",
                    "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
            }
            ExecResult::Hang | ExecResult::Delay(..) => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
        };
        let mut m = vec![3u8];
        m.extend_from_slice(status.to_string().as_bytes());
        let _ = ws.send(Message::binary(m)).await;
        let _ = ws.close(None).await;
    });
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(ws_key.as_bytes());
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .header("sec-websocket-protocol", "v4.channel.k8s.io")
        .body(Full::new(Bytes::new()))
        .unwrap()
}
