//! A small stand-in for the Kubernetes API server, enough for kube-rs's client, watcher and
//! reflector to run unmodified over a real HTTP connection: list and watch (resourceVersion,
//! label selectors, ADDED/MODIFIED/DELETED, bookmarks, `410 Gone` for a version that has been
//! compacted away) for Services, EndpointSlices, UpstreamPolicies, Namespaces, Nodes and the Gateway
//! API's GatewayClasses, Gateways, TCPRoutes and UDPRoutes (at v1 and v1alpha2, the same objects)
//! and ReferenceGrants (at v1 and v1beta1, the same objects); discovery of the Gateway API
//! group's versions (a test may hide some); merge-patching any of their statuses; server-side
//! applying Services; creating and patching Events; getting, listing, creating and
//! (resourceVersion-conditionally) updating Leases. Tests change objects through [`FakeApi`] and
//! read back what the agent wrote.
//!
//! It runs on a runtime of its own, so [`FakeApi::stop`] really takes it away (every connection
//! closes) and [`FakeApi::start`] brings it back with the same objects.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use axum::{
    body::{Body, Bytes},
    extract::{Request, State as Extract},
    http::{Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The Gateway API's group.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// The resources served: (plural, apiVersion, kind, path prefix). A kind served at two versions
/// is listed twice; its objects are the same at both.
const RESOURCES: [(&str, &str, &str, &str); 14] = [
    ("services", "v1", "Service", "/api/v1"),
    // The agent's own Node, for its zone label (topology hints).
    ("nodes", "v1", "Node", "/api/v1"),
    // Read by name only: an agent run with --down-when-deleted asks for its DaemonSet on exit.
    ("daemonsets", "apps/v1", "DaemonSet", "/apis/apps/v1"),
    ("namespaces", "v1", "Namespace", "/api/v1"),
    (
        "gatewayclasses",
        "gateway.networking.k8s.io/v1",
        "GatewayClass",
        "/apis/gateway.networking.k8s.io/v1",
    ),
    (
        "gateways",
        "gateway.networking.k8s.io/v1",
        "Gateway",
        "/apis/gateway.networking.k8s.io/v1",
    ),
    (
        "tcproutes",
        "gateway.networking.k8s.io/v1",
        "TCPRoute",
        "/apis/gateway.networking.k8s.io/v1",
    ),
    (
        "udproutes",
        "gateway.networking.k8s.io/v1",
        "UDPRoute",
        "/apis/gateway.networking.k8s.io/v1",
    ),
    (
        "tcproutes",
        "gateway.networking.k8s.io/v1alpha2",
        "TCPRoute",
        "/apis/gateway.networking.k8s.io/v1alpha2",
    ),
    (
        "udproutes",
        "gateway.networking.k8s.io/v1alpha2",
        "UDPRoute",
        "/apis/gateway.networking.k8s.io/v1alpha2",
    ),
    (
        "referencegrants",
        "gateway.networking.k8s.io/v1",
        "ReferenceGrant",
        "/apis/gateway.networking.k8s.io/v1",
    ),
    (
        "referencegrants",
        "gateway.networking.k8s.io/v1beta1",
        "ReferenceGrant",
        "/apis/gateway.networking.k8s.io/v1beta1",
    ),
    (
        "endpointslices",
        "discovery.k8s.io/v1",
        "EndpointSlice",
        "/apis/discovery.k8s.io/v1",
    ),
    (
        "upstreampolicies",
        "lb.dev/v1alpha1",
        "UpstreamPolicy",
        "/apis/lb.dev/v1alpha1",
    ),
];

fn resource_of_kind(kind: &str) -> &'static str {
    RESOURCES
        .iter()
        .find(|r| r.2 == kind)
        .unwrap_or_else(|| panic!("the fake API server does not serve {kind}"))
        .0
}

fn resource(plural: &str) -> (&'static str, &'static str, &'static str, &'static str) {
    *RESOURCES
        .iter()
        .find(|r| r.0 == plural)
        .expect("known resource")
}

/// Whether `r` (a row of [`RESOURCES`]) is served now.
fn served(s: &State, r: &(&str, &str, &str, &str)) -> bool {
    !s.hidden
        .iter()
        .any(|(gv, plural)| gv == r.1 && plural == r.0)
}

/// (resource, namespace, name)
type Key = (String, String, String);

struct Change {
    rv: u64,
    resource: String,
    old: Option<Value>,
    new: Option<Value>,
}

struct Watcher {
    resource: String,
    selector: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
pub struct State {
    rv: u64,
    /// A watch from a version below this gets 410 Gone.
    oldest: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    watchers: Vec<Watcher>,
    /// `METHOD path?query -> status`, every request in order.
    pub requests: Vec<String>,
    /// (policy `namespace/name`, the merge patch) of every status patch.
    pub status_patches: Vec<(String, Value)>,
    /// Every Event created or patched.
    pub events: Vec<Value>,
    /// The resources of every watch answered with `410 Gone`, in order.
    pub gone: Vec<String>,
    /// (resource, `namespace/name` or `name`, the merge patch) of every status patch, of any
    /// resource.
    pub patches: Vec<(String, String, Value)>,
    /// Every object server-side applied, as sent.
    pub applied: Vec<Value>,
    /// (apiVersion, plural) pairs not served (404 in discovery, list and watch).
    pub hidden: Vec<(String, String)>,
    /// The writer (`fieldManager`) of each entry of `status_patches`.
    pub status_writers: Vec<String>,
    /// Leases (`coordination.k8s.io/v1`), by (namespace, name): kept apart from the watched
    /// resources, with a resourceVersion counter of their own (`lease_rv`), so that renewals
    /// do not move the versions the watch tests compact at.
    pub leases: BTreeMap<(String, String), Value>,
    lease_rv: u64,
    /// Every write of a status writer's Lease that succeeded: (holder, resourceVersion).
    pub lease_writes: Vec<(String, u64)>,
    /// Every write of a node's record (a Lease labelled `lb.dev/node-record`) that succeeded:
    /// (node, the record's annotation).
    pub record_writes: Vec<(String, String)>,
}

/// The terms of a selector: split at the commas outside `in (...)` lists.
fn terms(sel: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in sel.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(sel[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(sel[start..].trim());
    out
}

/// `k=v`, `k in (a,b)` and `k` (exists) terms, comma-separated, all of which must hold.
fn selects(selector: Option<&str>, obj: &Value) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = &obj["metadata"]["labels"];
    terms(sel).into_iter().all(|term| {
        if let Some((k, set)) = term.split_once(" in ") {
            let set = set.trim().trim_start_matches('(').trim_end_matches(')');
            let v = labels[k.trim()].as_str();
            return set.split(',').any(|x| Some(x.trim()) == v);
        }
        match term.split_once('=') {
            Some((k, v)) => labels[k.trim_end_matches('=')].as_str() == Some(v),
            None => labels.get(term).is_some(),
        }
    })
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut s = serde_json::to_vec(&json!({ "type": kind, "object": object })).unwrap();
    s.push(b'\n');
    Bytes::from(s)
}

/// The watch event `change` is for a watcher with `selector`, if any.
fn event_for(change: &Change, selector: Option<&str>) -> Option<Bytes> {
    let was = change.old.as_ref().is_some_and(|o| selects(selector, o));
    match &change.new {
        Some(n) if selects(selector, n) => Some(line(if was { "MODIFIED" } else { "ADDED" }, n)),
        Some(n) if was => Some(line("DELETED", n)),
        None if was => {
            let mut gone = change.old.clone().unwrap();
            gone["metadata"]["resourceVersion"] = json!(change.rv.to_string());
            Some(line("DELETED", &gone))
        }
        _ => None,
    }
}

impl State {
    /// Whether a watch of `resource` (plural) is open now.
    pub fn watching(&self, resource: &str) -> bool {
        self.watchers
            .iter()
            .any(|w| w.resource == resource && !w.tx.is_closed())
    }

    fn key(obj: &Value) -> Key {
        let kind = obj["kind"].as_str().expect("objects have a kind");
        (
            resource_of_kind(kind).into(),
            obj["metadata"]["namespace"].as_str().unwrap_or("").into(),
            obj["metadata"]["name"]
                .as_str()
                .expect("objects have a name")
                .into(),
        )
    }

    fn record(&mut self, resource: String, old: Option<Value>, new: Option<Value>, notify: bool) {
        let change = Change {
            rv: self.rv,
            resource,
            old,
            new,
        };
        if notify {
            self.watchers.retain(|w| {
                w.resource != change.resource
                    || match event_for(&change, w.selector.as_deref()) {
                        Some(l) => w.tx.send(l).is_ok(),
                        None => true,
                    }
            });
        }
        self.history.push(change);
    }

    fn put(&mut self, mut obj: Value, notify: bool) {
        let key = Self::key(&obj);
        self.rv += 1;
        let old = self.objects.get(&key).cloned();
        let generation = match &old {
            Some(o) if o["spec"] == obj["spec"] => {
                o["metadata"]["generation"].as_i64().unwrap_or(1)
            }
            Some(o) => o["metadata"]["generation"].as_i64().unwrap_or(1) + 1,
            None => 1,
        };
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = json!(self.rv.to_string());
        meta["generation"] = json!(generation);
        if meta.get("uid").is_none() {
            meta["uid"] = json!(format!("uid-{}-{}-{}", key.0, key.1, key.2));
        }
        self.objects.insert(key.clone(), obj.clone());
        self.record(key.0, old, Some(obj), notify);
    }

    fn remove(&mut self, key: &Key, notify: bool) {
        if let Some(old) = self.objects.remove(key) {
            self.rv += 1;
            self.record(key.0.clone(), Some(old), None, notify);
        }
    }
}

pub struct FakeApi {
    state: Arc<Mutex<State>>,
    runtime: Option<tokio::runtime::Runtime>,
    pub addr: SocketAddr,
}

impl FakeApi {
    /// Serves on `listener` (bind it in the namespace the agent runs in).
    pub fn new(listener: std::net::TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let mut api = Self {
            state: Arc::default(),
            runtime: None,
            addr,
        };
        api.start(listener);
        api
    }

    /// (Re)starts serving the same objects on `listener`.
    pub fn start(&mut self, listener: std::net::TcpListener) {
        assert!(self.runtime.is_none(), "already serving");
        listener.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let state = self.state.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let app = axum::Router::new().fallback(handle).with_state(state);
            let _ = axum::serve(listener, app).await;
        });
        self.runtime = Some(rt);
    }

    /// Goes away: the listener and every connection close.
    pub fn stop(&mut self) {
        self.lock().watchers.clear();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// The state (also after a test panicked while holding it: the server must still stop).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates or replaces an object (its `kind` says which resource).
    pub fn apply(&self, obj: Value) {
        self.lock().put(obj, true);
    }

    /// Serves without `plural` at `api_version` (before the agent starts: it asks once).
    pub fn hide(&self, api_version: &str, plural: &str) {
        self.lock().hidden.push((api_version.into(), plural.into()));
    }

    /// Serves no Gateway API at all (a cluster without its CRDs).
    pub fn without_gateway_api(&self) {
        for r in RESOURCES.iter().filter(|r| r.1.starts_with(GATEWAY_GROUP)) {
            self.hide(r.1, r.0);
        }
    }

    /// The current object of `kind` `namespace/name` (namespace "" for cluster-scoped ones).
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (resource_of_kind(kind).into(), namespace.into(), name.into());
        self.lock().objects.get(&key).cloned()
    }

    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let key = (resource_of_kind(kind).into(), namespace.into(), name.into());
        self.lock().remove(&key, true);
    }

    /// Changes objects without telling the watchers, then compacts history past those changes
    /// and closes every watch: the watchers resume from versions that are gone, get `410 Gone`
    /// and must list again to see the changes.
    pub fn expire(&self, changes: impl FnOnce(&mut dyn FnMut(Value))) {
        let mut s = self.lock();
        changes(&mut |obj| s.put(obj, false));
        s.oldest = s.rv;
        s.history.clear();
        s.watchers.clear();
    }

    /// Sends a bookmark with the current version to every watch.
    pub fn bookmark(&self) {
        let mut s = self.lock();
        let rv = s.rv;
        s.watchers.retain(|w| {
            let (_, api_version, kind, _) = resource(&w.resource);
            let obj = json!({ "apiVersion": api_version, "kind": kind, "metadata": { "resourceVersion": rv.to_string() } });
            w.tx.send(line("BOOKMARK", &obj)).is_ok()
        });
    }

    /// Requests so far whose line contains `needle`.
    pub fn requests(&self, needle: &str) -> Vec<String> {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.contains(needle))
            .cloned()
            .collect()
    }

    /// A kubeconfig that points at this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: http://{}
contexts:
- name: fake
  context:
    cluster: fake
    user: nobody
    namespace: default
current-context: fake
users:
- name: nobody
  user: {{}}
",
            self.addr
        )
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16() })
        .to_string(),
    )
        .into_response()
}

fn ok_json(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

async fn handle(Extract(state): Extract<Arc<Mutex<State>>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let line = format!("{method} {}", req.uri());
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let resp = respond(&state, &method, &path, &query, &body);
    state
        .lock()
        .unwrap()
        .requests
        .push(format!("{line} -> {}", resp.status().as_u16()));
    resp
}

/// (plural, namespace or "", name) of an object's path, if it is one of a served resource.
fn object_path(segs: &[&str]) -> Option<(String, String, String)> {
    let (prefix_len, rest) = match segs {
        ["api", "v1", rest @ ..] => (2, rest),
        ["apis", _, _, rest @ ..] => (3, rest),
        _ => return None,
    };
    let prefix = format!("/{}", segs[..prefix_len].join("/"));
    let (ns, plural, name) = match rest {
        ["namespaces", ns, plural, name] => (*ns, *plural, *name),
        [plural, name] => ("", *plural, *name),
        _ => return None,
    };
    RESOURCES
        .iter()
        .any(|r| r.0 == plural && r.3 == prefix)
        .then(|| (plural.into(), ns.into(), name.into()))
}

fn respond(
    state: &Arc<Mutex<State>>,
    method: &Method,
    path: &str,
    query: &BTreeMap<String, String>,
    body: &[u8],
) -> Response {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    // Cluster-wide list and watch of a served resource.
    if method == Method::GET
        && let Some(&(plural, api_version, kind, _)) = RESOURCES.iter().find(|r| {
            path == format!("{}/{}", r.3, r.0)
                && served(&state.lock().unwrap_or_else(|e| e.into_inner()), r)
        })
    {
        let selector = query.get("labelSelector").cloned();
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
            let from: u64 = query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let (tx, rx) = mpsc::unbounded_channel();
            if from < s.oldest {
                // What the API server does: a watch ERROR event, then the end of the stream.
                let err = json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {from} ({})", s.oldest), "reason": "Expired", "code": 410 });
                let _ = tx.send(line("ERROR", &err));
                drop(tx);
                s.gone.push(plural.into());
            } else {
                for c in s
                    .history
                    .iter()
                    .filter(|c| c.rv > from && c.resource == plural)
                {
                    if let Some(l) = event_for(c, selector.as_deref()) {
                        let _ = tx.send(l);
                    }
                }
                if query.get("allowWatchBookmarks").map(String::as_str) == Some("true") {
                    let obj = json!({ "apiVersion": api_version, "kind": kind, "metadata": { "resourceVersion": s.rv.to_string() } });
                    let _ = tx.send(line("BOOKMARK", &obj));
                }
                s.watchers.push(Watcher {
                    resource: plural.into(),
                    selector,
                    tx,
                });
            }
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
            });
            return Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from_stream(stream))
                .unwrap();
        }
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|(k, o)| k.0 == plural && selects(selector.as_deref(), o))
            .map(|(_, o)| {
                let mut o = o.clone();
                o["apiVersion"] = json!(api_version);
                o
            })
            .collect();
        return ok_json(
            StatusCode::OK,
            &json!({ "apiVersion": api_version, "kind": format!("{kind}List"),
                     "metadata": { "resourceVersion": s.rv.to_string() }, "items": items }),
        );
    }
    // Discovery: GET /apis/gateway.networking.k8s.io/{version}
    if method == Method::GET
        && let ["apis", GATEWAY_GROUP, version] = segs[..]
    {
        let s = state.lock().unwrap_or_else(|e| e.into_inner());
        let gv = format!("{GATEWAY_GROUP}/{version}");
        let resources: Vec<Value> = RESOURCES
            .iter()
            .filter(|r| r.1 == gv && served(&s, r))
            .map(|r| {
                json!({ "name": r.0, "singularName": r.2.to_lowercase(), "kind": r.2,
                        "namespaced": r.0 != "gatewayclasses", "verbs": ["get", "list", "watch", "patch"] })
            })
            .collect();
        if resources.is_empty() {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("the server could not find {path}"),
            );
        }
        return ok_json(
            StatusCode::OK,
            &json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources }),
        );
    }
    // GET {prefix}[/namespaces/{ns}]/{plural}/{name}
    if method == Method::GET
        && let Some(key) = object_path(&segs)
    {
        let s = state.lock().unwrap_or_else(|e| e.into_inner());
        let (plural, api_version, ..) = resource(&key.0);
        return match s.objects.get(&key) {
            Some(o) => {
                let mut o = o.clone();
                o["apiVersion"] = json!(api_version);
                ok_json(StatusCode::OK, &o)
            }
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{plural} \"{}\" not found", key.2),
            ),
        };
    }
    // PATCH {prefix}[/namespaces/{ns}]/{plural}/{name}/status
    if method == Method::PATCH
        && segs.last() == Some(&"status")
        && let Some((plural, ns, name)) = object_path(&segs[..segs.len() - 1])
    {
        let Ok(patch) = serde_json::from_slice::<Value>(body) else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON".into());
        };
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        let key: Key = (plural.clone(), ns.clone(), name.clone());
        let Some(mut obj) = s.objects.get(&key).cloned() else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{plural} \"{name}\" not found"),
            );
        };
        let who = if ns.is_empty() {
            name.clone()
        } else {
            format!("{ns}/{name}")
        };
        if plural == "upstreampolicies" {
            s.status_patches.push((who.clone(), patch.clone()));
            let writer = query.get("fieldManager").cloned().unwrap_or_default();
            s.status_writers.push(writer);
        }
        s.patches.push((plural.clone(), who, patch.clone()));
        if let Some(st) = patch.get("status") {
            json_patch::merge(&mut obj, &json!({ "status": st }));
        }
        s.put(obj, true);
        let obj = s.objects[&key].clone();
        return ok_json(StatusCode::OK, &obj);
    }
    // Server-side apply: PATCH /api/v1/namespaces/{ns}/services/{name} (creates or merges).
    if method == Method::PATCH
        && let ["api", "v1", "namespaces", ns, "services", name] = segs[..]
    {
        let Ok(obj) = serde_json::from_slice::<Value>(body) else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON".into());
        };
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.applied.push(obj.clone());
        let key: Key = ("services".into(), ns.into(), name.into());
        let merged = match s.objects.get(&key).cloned() {
            Some(mut old) => {
                json_patch::merge(&mut old, &obj);
                old
            }
            None => obj,
        };
        s.put(merged, true);
        let obj = s.objects[&key].clone();
        return ok_json(StatusCode::OK, &obj);
    }
    if let [
        "apis",
        "coordination.k8s.io",
        "v1",
        "namespaces",
        ns,
        "leases",
        rest @ ..,
    ] = &segs[..]
    {
        return lease(state, method, ns, rest, query, body);
    }
    // Events: POST .../namespaces/{ns}/events, PATCH .../namespaces/{ns}/events/{name}
    if let [
        "apis",
        "events.k8s.io",
        "v1",
        "namespaces",
        _ns,
        "events",
        rest @ ..,
    ] = &segs[..]
    {
        let Ok(mut ev) = serde_json::from_slice::<Value>(body) else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON".into());
        };
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.rv += 1;
        if ev.get("metadata").is_none() {
            ev["metadata"] = json!({});
        }
        ev["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        if let [name] = rest {
            ev["metadata"]["name"] = json!(name);
        }
        s.events.push(ev.clone());
        let code = if method == Method::POST {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        return ok_json(code, &ev);
    }
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("the fake API server does not serve {method} {path}"),
    )
}

/// Grants used only when an agent run with --down-when-deleted exits (its own DaemonSet): the
/// uninstall tests in tests/tests/k8s.rs check them.
pub fn on_exit_only(group: &str, resource: &str, _verb: &str) -> bool {
    group == "apps" && resource == "daemonsets"
}

/// The rules of the ClusterRole and the Role (the Lease, in lb's namespace) as (API group,
/// resource, verb).
pub fn granted() -> Vec<(String, String, String)> {
    let docs = crate::deploy_docs("rbac.yaml");
    let rules = docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
        .flat_map(|d| d["rules"].as_array().unwrap().clone());
    let mut out = Vec::new();
    for rule in rules {
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                for v in rule["verbs"].as_array().unwrap() {
                    out.push((
                        g.as_str().unwrap().into(),
                        r.as_str().unwrap().into(),
                        v.as_str().unwrap().into(),
                    ));
                }
            }
        }
    }
    out
}

/// What RBAC calls a request the fake server logged (None: discovery) ("GET /api/v1/services?... -> 200").
pub fn rbac_of(request: &str) -> Option<(String, String, String)> {
    let (method, rest) = request.split_once(' ').unwrap();
    let uri = rest.split(' ').next().unwrap();
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, tail) = match segs[0] {
        "api" => ("", &segs[2..]),
        _ => (segs[1], &segs[3..]),
    };
    if tail.is_empty() {
        // Discovery (a non-resource URL): every authenticated user may ask (the cluster's
        // default system:discovery role), so RBAC of lb's own does not list it.
        return None;
    }
    let tail = match tail {
        ["namespaces", _, rest @ ..] => rest,
        t => t,
    };
    let resource = match tail {
        [r] | [r, _] => r.to_string(),
        [r, _, sub] => format!("{r}/{sub}"),
        _ => panic!("unexpected path {path}"),
    };
    let verb = match method {
        "GET" if query.contains("watch=true") || query.contains("watch=1") => "watch",
        "GET" if tail.len() == 1 => "list",
        "GET" => "get",
        "POST" => "create",
        "PATCH" => "patch",
        "PUT" => "update",
        "DELETE" => "delete",
        m => panic!("unexpected method {m}"),
    };
    Some((group.into(), resource, verb.into()))
}

/// Whether the agent needs grant (group, resource, verb) only for the Gateway API.
pub fn gateway_only(g: &str, r: &str, v: &str) -> bool {
    g == GATEWAY_GROUP || (g.is_empty() && (r == "namespaces" || (r == "services" && v == "patch")))
}

impl State {
    /// Logs a successful Lease write: a node's record, or a status writer's Lease.
    fn lease_written(&mut self, l: &Value) {
        let holder = l["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if l["metadata"]["labels"]["lb.dev/node-record"].is_string() {
            let record = l["metadata"]["annotations"]["lb.dev/programmed"].as_str();
            let record = record.unwrap_or_default().to_string();
            self.record_writes.push((holder, record));
        } else {
            let rv = self.lease_rv;
            self.lease_writes.push((holder, rv));
        }
    }

    /// Puts a Lease as written by someone else (another node's record, say).
    pub fn put_lease(&mut self, ns: &str, mut l: Value) {
        self.lease_rv += 1;
        let name = l["metadata"]["name"].as_str().expect("a name").to_string();
        l["metadata"]["namespace"] = json!(ns);
        l["metadata"]["resourceVersion"] = json!(self.lease_rv.to_string());
        self.leases.insert((ns.into(), name), l);
    }
}

/// Leases: get, list (by label), create (409 AlreadyExists) and update, which is conditional
/// on the `metadata.resourceVersion` sent (409 Conflict when it is not the current one), as the
/// API server does.
fn lease(
    state: &Arc<Mutex<State>>,
    method: &Method,
    ns: &str,
    rest: &[&str],
    query: &BTreeMap<String, String>,
    body: &[u8],
) -> Response {
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    let not_found = |name: &str| {
        status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("leases.coordination.k8s.io \"{name}\" not found"),
        )
    };
    let parsed = || serde_json::from_slice::<Value>(body).ok();
    match (method, rest) {
        (&Method::GET, []) => {
            let selector = query.get("labelSelector").map(String::as_str);
            let items: Vec<&Value> = s
                .leases
                .iter()
                .filter(|((n, _), l)| n == ns && selects(selector, l))
                .map(|(_, l)| l)
                .collect();
            ok_json(
                StatusCode::OK,
                &json!({ "apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList",
                         "metadata": { "resourceVersion": s.lease_rv.to_string() }, "items": items }),
            )
        }
        (&Method::GET, [name]) => match s.leases.get(&(ns.into(), name.to_string())) {
            Some(l) => ok_json(StatusCode::OK, l),
            None => not_found(name),
        },
        (&Method::POST, []) => {
            let Some(mut l) = parsed() else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON".into());
            };
            let name = l["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if s.leases.contains_key(&(ns.into(), name.clone())) {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("leases.coordination.k8s.io \"{name}\" already exists"),
                );
            }
            s.lease_rv += 1;
            l["metadata"]["namespace"] = json!(ns);
            l["metadata"]["resourceVersion"] = json!(s.lease_rv.to_string());
            s.lease_written(&l);
            s.leases.insert((ns.into(), name), l.clone());
            ok_json(StatusCode::CREATED, &l)
        }
        (&Method::PUT, [name]) => {
            let Some(mut l) = parsed() else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON".into());
            };
            let key = (ns.to_string(), name.to_string());
            let Some(current) = s.leases.get(&key) else {
                return not_found(name);
            };
            if l["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                    ),
                );
            }
            s.lease_rv += 1;
            l["metadata"]["resourceVersion"] = json!(s.lease_rv.to_string());
            s.lease_written(&l);
            s.leases.insert(key, l.clone());
            ok_json(StatusCode::OK, &l)
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("the fake API server does not serve {method} on leases"),
        ),
    }
}
