//! The agent's view of the cluster: reflectors (Services of its class, the EndpointSlices of
//! the Services it serves, UpstreamPolicies; with the Gateway API installed, also every Service,
//! Namespaces, GatewayClasses, Gateways, TCPRoutes, UDPRoutes and ReferenceGrants), the
//! translation of what they hold, and what the agent reports back (status conditions, Events on
//! Services, the LoadBalancer Services of Gateways) while it holds the status writer's Lease,
//! status and Services written through one [`status::Writer`].
//!
//! Which Gateway API kinds to watch is asked of the API server once, at start (discovery):
//! routes at `v1` where served, else `v1alpha2` (the experimental channel before v1.6),
//! ReferenceGrants at `v1` else `v1beta1`. Gateway API CRDs installed after the agent started
//! are seen after a restart.
//!
//! The watchers run over `DynamicObject`s and each object is decoded on its own, so one object
//! that does not decode (a malformed object) is logged and skipped instead of stalling its whole
//! watch stream.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{ApiResource, DynamicObject},
    runtime::{
        WatchStreamExt as _,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{info, warn};

use super::{
    gateway::{
        self,
        types::{GROUP, Gateway, GatewayClass, ReferenceGrant, Route, TCPRoute, UDPRoute},
    },
    lease::{self, Leadership, LeaseFlags},
    nodes::Records,
    policy::UpstreamPolicy,
    programmed::{self, Verdict},
    rollout::OwnDaemonSet,
    slices::SliceWatch,
    status::{self, KubeWriter},
    translate::{
        CLASS_LABEL, Cond, Objects, ServiceEvent, Settings, Translation, Translator, cond,
    },
};
use crate::sources::config::VipConfig;

/// What `lb run --kubernetes` was told.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// Serve Services labelled `lb.dev/class: <class>`.
    pub class: String,
    /// This node (downward API), for `externalTrafficPolicy: Local`; also its identity in the
    /// status writer's Lease.
    pub node_name: String,
    /// The Lease that elects the one status writer.
    pub lease: LeaseFlags,
    /// Serve GatewayClasses with this `controllerName`.
    pub gateway_controller: String,
    /// On SIGTERM, if this DaemonSet (in the agent's namespace) is gone or being deleted, the
    /// agent was uninstalled: it detaches and removes its pins (`lb down`) instead of leaving
    /// them for the next agent. If it is there and its pod template now runs an older release
    /// (a rollback), the agent leaves the pins as that release reads them.
    pub down_when_deleted: Option<String>,
}

/// The Gateway API watchers (when the API server serves the Gateway API).
struct GatewayWatch {
    controller: String,
    namespaces: Store<DynamicObject>,
    classes: Store<DynamicObject>,
    gateways: Store<DynamicObject>,
    /// Route kinds and ReferenceGrants at the version served, if they are.
    tcp: Option<(ApiResource, Store<DynamicObject>)>,
    udp: Option<(ApiResource, Store<DynamicObject>)>,
    grants: Option<Store<DynamicObject>>,
    /// The versions of those watched.
    watched: gateway::Watched,
    /// The last translation's output, for [`Kube::report`].
    last: gateway::Output,
    /// The `Programmed` Event last recorded on each route (`TCPRoute ns/name`), while leading.
    said: BTreeMap<String, String>,
}

impl GatewayWatch {
    /// Starts watching the Gateway API's kinds `served` serves (their tasks go into `tasks`);
    /// None if it serves none.
    fn start(
        client: &Client,
        served: &GatewayApi,
        opts: &KubeOptions,
        changed: &mpsc::Sender<()>,
        tasks: &mut Vec<JoinHandle<()>>,
    ) -> Option<Self> {
        let gateway = served.enabled().then(|| {
            let mut w = |ar: ApiResource| {
                let (store, task) = watch(client, ar, watcher::Config::default(), changed.clone());
                tasks.push(task);
                store
            };
            GatewayWatch {
                controller: opts.gateway_controller.clone(),
                namespaces: w(ApiResource::erase::<k8s_openapi::api::core::v1::Namespace>(
                    &(),
                )),
                classes: w(ApiResource::erase::<GatewayClass>(&())),
                gateways: w(ApiResource::erase::<Gateway>(&())),
                tcp: served.tcp.clone().map(|ar| (ar.clone(), w(ar))),
                udp: served.udp.clone().map(|ar| (ar.clone(), w(ar))),
                grants: served.grants.clone().map(&mut w),
                watched: served.watched(),
                last: gateway::Output::default(),
                said: BTreeMap::new(),
            }
        });
        if let Some(g) = &gateway {
            info!(
                controller = %g.controller,
                tcproute = ?served.tcp.as_ref().map(|a| &a.version),
                udproute = ?served.udp.as_ref().map(|a| &a.version),
                referencegrant = ?served.grants.as_ref().map(|a| &a.version),
                "the Gateway API is served: watching GatewayClasses, Gateways and routes"
            );
        }
        gateway
    }

    /// The route `key` (`TCPRoute ns/name`) as its watcher holds it, with its resource.
    fn route(&self, key: &str) -> Option<(ApiResource, std::sync::Arc<DynamicObject>)> {
        let (kind, rest) = key.split_once(' ')?;
        let (ns, name) = rest.split_once('/')?;
        let (ar, store) = match kind {
            "TCPRoute" => self.tcp.as_ref()?,
            _ => self.udp.as_ref()?,
        };
        let obj = store
            .state()
            .into_iter()
            .find(|o| o.namespace().as_deref() == Some(ns) && o.name_any() == name)?;
        Some((ar.clone(), obj))
    }
}

/// Why the cluster could not be watched.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(transparent)]
    Lease(#[from] super::lease::LeaseError),
    #[error("connecting to Kubernetes (in-cluster config, KUBECONFIG or ~/.kube/config)")]
    Connect(#[source] kube::Error),
    #[error("asking the API server whether it serves {group_version}")]
    Discovery {
        group_version: String,
        #[source]
        source: kube::Error,
    },
}

pub struct Kube {
    client: Client,
    services: Store<DynamicObject>,
    slices: Store<DynamicObject>,
    policies: Store<DynamicObject>,
    /// This node's Node object (its zone label, for topology hints).
    node: Store<DynamicObject>,
    /// The EndpointSlice watch, restarted when the set of Services it selects changes.
    slice_watch: SliceWatch,
    /// Whether this agent writes status (policy conditions, Events).
    leader: Leadership,
    /// The election task, its flags and this agent's identity in it.
    election: JoinHandle<()>,
    lease_flags: LeaseFlags,
    identity: String,
    tasks: Vec<JoinHandle<()>>,
    translator: Translator,
    pub settings: Settings,
    recorder: Recorder,
    /// Everything written to the cluster goes through it.
    pub writer: Box<dyn status::Writer>,
    gateway: Option<GatewayWatch>,
    /// The translation the maps were last asked to hold.
    pub last: Translation,
    /// Events already recorded (recorded again only after they stop and recur).
    published: BTreeSet<ServiceEvent>,
    /// This node's record of what its maps hold, and (leading) the other nodes'.
    records: Records,
    /// The Programmed condition last written to each Service, with the Service's
    /// resourceVersion then: not written again before the watch has shown the write.
    said: BTreeMap<(String, String), (Verdict, Option<String>)>,
    /// Malformed objects already logged.
    skipped: BTreeSet<String>,
    /// What the last translation skipped or served from a last good version, as logged.
    skipped_now: Vec<String>,
    /// The last version of each object that decoded, to serve while a newer one does not.
    last_good: BTreeMap<(String, String, String), serde_json::Value>,
}

fn watch(
    client: &Client,
    ar: ApiResource,
    config: watcher::Config,
    tx: mpsc::Sender<()>,
) -> (Store<DynamicObject>, JoinHandle<()>) {
    let writer = Writer::new(ar.clone());
    let store = writer.as_reader();
    let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
    let kind = ar.kind.clone();
    let task = tokio::spawn(async move {
        let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
        futures::pin_mut!(stream);
        let mut failing = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => {
                    if failing {
                        info!(%kind, "watching again");
                        failing = false;
                    }
                    let _ = tx.try_send(());
                }
                Err(e) => {
                    // The store keeps the last state; the watcher relists when it can.
                    warn!(%kind, "watch failed, retrying (the last state keeps serving): {}", crate::error_chain(&e));
                    failing = true;
                }
            }
        }
    });
    (store, task)
}

/// The Services watch: those of lb's `class`, or every Service where the Gateway API is
/// `served` (its backendRefs name any Service, not only those of lb's class).
fn watch_services(
    client: &Client,
    served: &GatewayApi,
    class: &str,
    changed: &mpsc::Sender<()>,
) -> (Store<DynamicObject>, JoinHandle<()>) {
    let services_config = if served.enabled() {
        watcher::Config::default()
    } else {
        watcher::Config::default().labels(&format!("{CLASS_LABEL}={class}"))
    };
    watch(
        client,
        ApiResource::erase::<Service>(&()),
        services_config,
        changed.clone(),
    )
}

impl Kube {
    /// Connects (in-cluster config, or KUBECONFIG / ~/.kube/config) and starts watching; every
    /// change sends a unit on `changed`.
    pub async fn start(
        opts: &KubeOptions,
        settings: Settings,
        changed: mpsc::Sender<()>,
    ) -> Result<Self, KubeError> {
        opts.lease.check()?;
        let client = Client::try_default().await.map_err(KubeError::Connect)?;
        let slice_watch = SliceWatch::new(client.clone(), changed.clone());
        let slices = slice_watch.store();
        let (policies, t3) = watch(
            &client,
            ApiResource::erase::<UpstreamPolicy>(&()),
            watcher::Config::default(),
            changed.clone(),
        );
        let (leader, t4) = lease::elect(
            client.clone(),
            client.default_namespace(),
            &opts.lease,
            &opts.node_name,
            changed.clone(),
        );
        // Like the watchers, wait for an API server that does not answer yet.
        let served = GatewayApi::discover_until_answered(&client).await;
        let (services, t1) = watch_services(&client, &served, &opts.class, &changed);
        let (node, t5) = watch(
            &client,
            ApiResource::erase::<k8s_openapi::api::core::v1::Node>(&()),
            watcher::Config::default().fields(&format!("metadata.name={}", opts.node_name)),
            changed.clone(),
        );
        let mut tasks = vec![t1, t3, t5];
        let gateway = GatewayWatch::start(&client, &served, opts, &changed, &mut tasks);
        let records = Records::start(
            client.clone(),
            &opts.lease.namespace(client.default_namespace()),
            &opts.lease,
            &opts.node_name,
            leader.clone(),
            changed.clone(),
        );
        let recorder = Recorder::new(client.clone(), reporter(&opts.node_name));
        let mut kube = Self {
            writer: Box::new(KubeWriter {
                client: client.clone(),
                field_manager: format!("lb-{}", opts.node_name),
            }),
            gateway,
            client,
            services,
            slices,
            policies,
            node,
            slice_watch,
            leader,
            election: t4,
            lease_flags: opts.lease.clone(),
            identity: opts.node_name.clone(),
            tasks,
            translator: Translator::default(),
            settings,
            recorder,
            last: Translation::default(),
            published: BTreeSet::new(),
            records,
            said: BTreeMap::new(),
            skipped: BTreeSet::new(),
            skipped_now: Vec::new(),
            last_good: BTreeMap::new(),
        };
        kube.want_first_slices().await;
        Ok(kube)
    }

    /// EndpointSlices are watched for the Services served only (and the Gateway routes'
    /// backends): lists those first.
    async fn want_first_slices(&mut self) {
        if self.services.wait_until_ready().await.is_err() {
            warn!("the Services watcher ended before its first list");
        }
        let services = self.services.clone();
        let all = self.decode::<Service>(&services, "Service", None);
        let served = self.class_services(&all);
        self.want_slices_of("services", served);
        // And those of the Gateway routes' backends.
        if self.gateway.is_some() {
            self.ready().await;
            let g = self.gateway_objects();
            self.want_slices_of("gateway", backend_names(&g));
        }
    }

    /// The names of the Services lb serves as Services (of its class, not a Gateway's own).
    fn class_services(&self, services: &[Service]) -> BTreeSet<String> {
        services
            .iter()
            .filter(|s| {
                s.labels().get(CLASS_LABEL) == Some(&self.settings.class)
                    && !super::translate::owned_by_gateway(s)
            })
            .map(|s| s.name_any())
            .collect()
    }

    /// Asks for the EndpointSlices of the Services named `names` (any namespace) on behalf of
    /// `source` (Services of lb's class; Gateway routes' backends...): the slice watch selects
    /// the union of every source's names, and restarts when that union changes.
    pub fn want_slices_of(&mut self, source: &'static str, names: BTreeSet<String>) {
        self.slice_watch.want(source, names);
    }

    /// The status writer's handle: whether this agent writes status now.
    pub fn leadership(&self) -> Leadership {
        self.leader.clone()
    }

    /// The DaemonSet `name` in this agent's namespace, as the agent stops: gone or being deleted
    /// (`helm uninstall`, `kubectl delete`), or there (a rolling update), with the image its pod
    /// template now runs. When the API server cannot say, [`OwnDaemonSet::Unknown`]: the pins
    /// stay as they are, which is the safe way to be wrong.
    pub async fn own_daemonset(&self, name: &str) -> OwnDaemonSet {
        let api: kube::Api<k8s_openapi::api::apps::v1::DaemonSet> =
            kube::Api::default_namespaced(self.client.clone());
        match api.get_opt(name).await {
            Ok(ds) => OwnDaemonSet::of(ds.as_ref()),
            Err(e) => {
                warn!(
                    "asking for the DaemonSet {name} (the pins stay as they are): {}",
                    crate::error_chain(&e)
                );
                OwnDaemonSet::Unknown
            }
        }
    }

    /// On a clean exit: stops the election and gives the Lease up, so another agent writes
    /// status at once rather than after a whole Lease duration.
    pub async fn release_lease(&mut self) {
        self.election.abort();
        if !self.leader.is_leader() {
            return;
        }
        let ns = self.client.default_namespace().to_string();
        match lease::release(self.client.clone(), &ns, &self.lease_flags, &self.identity).await {
            Ok(true) => info!("gave the status writer's Lease up"),
            Ok(false) => {}
            Err(e) => warn!(
                "giving the Lease up (another agent takes it when it expires): {}",
                crate::error_chain(&e)
            ),
        }
    }

    /// Waits until all three watchers have listed once.
    pub async fn ready(&self) {
        for (what, s) in [
            ("Services", &self.services),
            ("EndpointSlices", &self.slices),
            ("UpstreamPolicies", &self.policies),
        ] {
            if s.wait_until_ready().await.is_err() {
                warn!("the {what} watcher ended before its first list");
            }
        }
        if let Some(g) = &self.gateway {
            let stores = [
                Some(&g.namespaces),
                Some(&g.classes),
                Some(&g.gateways),
                g.tcp.as_ref().map(|t| &t.1),
                g.udp.as_ref().map(|t| &t.1),
                g.grants.as_ref(),
            ];
            for s in stores.into_iter().flatten() {
                if s.wait_until_ready().await.is_err() {
                    warn!("a Gateway API watcher ended before its first list");
                }
            }
        }
    }

    /// Decodes every object in `store`. One that does not decode is logged (once) and replaced
    /// by its last version that did, if any (the API server validates built-in objects, so
    /// this is for the unexpected); `bad` collects the rest.
    fn decode<K: DeserializeOwned>(
        &mut self,
        store: &Store<DynamicObject>,
        kind: &str,
        mut bad: Option<&mut Vec<(super::translate::ObjectKey, Option<i64>, String)>>,
    ) -> Vec<K> {
        let mut out = Vec::new();
        let mut present = BTreeSet::new();
        for o in store.state() {
            let (ns, name) = (o.namespace().unwrap_or_default(), o.name_any());
            let key = (kind.to_string(), ns.clone(), name.clone());
            present.insert(key.clone());
            let value = serde_json::to_value(&*o).unwrap_or_default();
            match serde_json::from_value::<K>(value.clone()) {
                Ok(k) => {
                    self.last_good.insert(key, value);
                    out.push(k);
                }
                Err(e) => {
                    let kept = if bad.is_none() {
                        self.last_good
                            .get(&key)
                            .and_then(|v| serde_json::from_value::<K>(v.clone()).ok())
                    } else {
                        None
                    };
                    let msg = format!(
                        "{kind} {ns}/{name} is malformed ({e}): {}",
                        match (&kept, &bad) {
                            (Some(_), _) => "its last good version keeps serving",
                            (None, Some(_)) => "reported in its status",
                            (None, None) => "skipped",
                        }
                    );
                    if self.skipped.insert(msg.clone()) {
                        warn!("{msg}");
                    }
                    self.skipped_now.push(msg);
                    if let Some(k) = kept {
                        out.push(k);
                    }
                    if let Some(bad) = bad.as_deref_mut() {
                        bad.push(((ns, name), o.metadata.generation, e.to_string()));
                    }
                }
            }
        }
        self.last_good
            .retain(|k, _| k.0 != kind || present.contains(k));
        out
    }

    /// This node's zone: its Node's `topology.kubernetes.io/zone` label (None: no such
    /// label, or the Node is not readable).
    fn zone(&self) -> Option<String> {
        let name = &self.settings.node_name;
        let node = self
            .node
            .state()
            .into_iter()
            .find(|n| n.name_any() == *name)?;
        node.labels().get(super::topology::ZONE_LABEL).cloned()
    }

    /// What the last [`Kube::translate`] could not take as it is (malformed objects, skipped or
    /// served as their last good version; addresses that do not parse), one message each.
    pub fn skipped(&self) -> &[String] {
        &self.skipped_now
    }

    /// Translates what the watchers hold now; the VIPs to serve.
    pub fn translate(&mut self) -> Vec<VipConfig> {
        let services = self.services.clone();
        let slices = self.slices.clone();
        let policies = self.policies.clone();
        let mut invalid_policies = Vec::new();
        self.skipped_now.clear();
        let served = self.decode::<Service>(&services, "Service", None);
        let names = self.class_services(&served);
        self.want_slices_of("services", names);
        let objects = Objects {
            services: served,
            slices: self.decode(&slices, "EndpointSlice", None),
            policies: self.decode(&policies, "UpstreamPolicy", Some(&mut invalid_policies)),
            invalid_policies,
        };
        self.settings.zone = self.zone();
        let mut t = self.translator.translate(&objects, &self.settings);
        for s in &t.skipped {
            if self.skipped.insert(s.clone()) {
                warn!("{s}");
            }
        }
        self.skipped_now.extend(t.skipped.iter().cloned());
        if self.gateway.is_some() {
            let room = gateway::Room {
                taken: t.vips.iter().map(|v| v.spec.key()).collect(),
                vips: t.vips.len(),
                members: t.vips.iter().map(|v| v.spec.backends.len()).sum(),
                effects: std::mem::take(&mut t.effects),
            };
            let g = self.gateway_objects();
            self.want_slices_of("gateway", backend_names(&g));
            let out = {
                let gw = self.gateway.as_ref().expect("checked");
                gateway::translate(
                    &g,
                    &objects.services,
                    &objects.slices,
                    &self.settings,
                    &gw.controller,
                    room,
                )
            };
            t.vips.extend(out.vips.iter().cloned());
            // A policy applied to a route is programmed for it, as for a Service.
            for (p, users) in &out.policy_users {
                if let Some(v) = t.policies.get_mut(p) {
                    v.services.extend(users.iter().cloned());
                }
            }
            if let Some(gw) = self.gateway.as_mut() {
                gw.last = out;
            }
        }
        self.last = t;
        self.last.vips.clone()
    }

    /// The Gateway API objects the watchers hold now.
    fn gateway_objects(&mut self) -> gateway::Objects {
        let Some(g) = &self.gateway else {
            return gateway::Objects::default();
        };
        let (namespaces, classes, gateways) =
            (g.namespaces.clone(), g.classes.clone(), g.gateways.clone());
        let (tcp, udp, grants, watched) = (
            g.tcp.as_ref().map(|t| t.1.clone()),
            g.udp.as_ref().map(|t| t.1.clone()),
            g.grants.clone(),
            g.watched.clone(),
        );
        let mut routes: Vec<Route> = Vec::new();
        if let Some(s) = tcp {
            routes.extend(
                self.decode::<TCPRoute>(&s, "TCPRoute", None)
                    .into_iter()
                    .map(Route::from),
            );
        }
        if let Some(s) = udp {
            routes.extend(
                self.decode::<UDPRoute>(&s, "UDPRoute", None)
                    .into_iter()
                    .map(Route::from),
            );
        }
        gateway::Objects {
            namespaces: namespaces
                .state()
                .iter()
                .map(|n| (n.name_any(), n.labels().clone()))
                .collect(),
            classes: self.decode(&classes, "GatewayClass", None),
            gateways: self.decode(&gateways, "Gateway", None),
            routes,
            grants: grants
                .map(|s| self.decode::<ReferenceGrant>(&s, "ReferenceGrant", None))
                .unwrap_or_default(),
            watched,
        }
    }

    /// Reports the outcome of applying the last translation: policy conditions (patched only
    /// when they change) and new Events on Services. Runs in the background.
    /// Only the leader writes: a follower forgets what it would have recorded, so that on a
    /// takeover it writes the whole current status once.
    pub fn report(&mut self, applied: &std::result::Result<(), String>) {
        if applied.is_ok() {
            self.records.publish(self.own_record());
        }
        if !self.leader.is_leader() {
            self.published.clear();
            self.said.clear();
            if let Some(g) = self.gateway.as_mut() {
                g.said.clear();
            }
            return;
        }
        self.report_events();
        self.report_policies(applied);
        self.report_services(applied);
        self.report_gateway();
        self.report_routes();
    }

    /// Records the Services' events not recorded yet.
    fn report_events(&mut self) {
        let now: BTreeSet<ServiceEvent> = self.last.events.iter().cloned().collect();
        let services = self.services.state();
        for e in now.difference(&self.published) {
            let Some(svc) = services.iter().find(|s| {
                s.namespace().as_deref() == Some(&e.service.0) && s.name_any() == e.service.1
            }) else {
                continue;
            };
            warn!(service = %format!("{}/{}", e.service.0, e.service.1), reason = %e.reason, "{}", e.message);
            let (ar, recorder) = (ApiResource::erase::<Service>(&()), self.recorder.clone());
            record_event(recorder, &ar, svc, e.warning, &e.reason, &e.message);
        }
        self.published = now;
    }

    /// Patches each policy's conditions (Accepted, Programmed, Conflicted) where they changed.
    fn report_policies(&mut self, applied: &std::result::Result<(), String>) {
        let policies = self.policies.state();
        for ((ns, name), verdict) in &self.last.policies {
            let programmed = self.policy_programmed(verdict, applied);
            let current = policies
                .iter()
                .find(|p| p.namespace().as_deref() == Some(ns.as_str()) && &p.name_any() == name)
                .and_then(|p| p.data.pointer("/status/conditions").cloned())
                .unwrap_or(json!([]));
            let conflicted = self.policy_conflicted(ns, name, &current);
            let conds = [&verdict.accepted, &programmed]
                .into_iter()
                .chain(conflicted.as_ref());
            let Some(conditions) = conditions_if_changed(conds, &current, verdict.generation)
            else {
                continue;
            };
            self.writer.patch_status(
                &ApiResource::erase::<UpstreamPolicy>(&()),
                Some(ns),
                name,
                json!({ "conditions": conditions }),
            );
        }
    }

    /// A policy's `Programmed` condition, given how applying the translation went.
    fn policy_programmed(
        &self,
        verdict: &super::translate::PolicyVerdict,
        applied: &std::result::Result<(), String>,
    ) -> Cond {
        let (ok, reason, message) =
            match (verdict.accepted.ok, applied, verdict.services.is_empty()) {
                (_, Err(e), _) => (
                    false,
                    "ApplyFailed",
                    format!("the maps could not be written: {e}"),
                ),
                (_, Ok(()), true) => (
                    false,
                    "NoServices",
                    format!(
                        "no Service of class {:?} names this policy ({} annotation)",
                        self.settings.class,
                        super::policy::POLICY_ANNOTATION
                    ),
                ),
                (true, Ok(()), false) => (
                    true,
                    "Programmed",
                    format!("in the maps for {}", verdict.services.join(", ")),
                ),
                (false, Ok(()), false) => (
                    false,
                    "Rejected",
                    "this version is not in the maps (see Accepted)".into(),
                ),
            };
        cond("Programmed", ok, reason, message)
    }

    /// Conflicted: said when a route's backend Services name different policies (so none
    /// applies to the route), and cleared once it no longer holds.
    fn policy_conflicted(&self, ns: &str, name: &str, current: &serde_json::Value) -> Option<Cond> {
        let key = (ns.to_string(), name.to_string());
        let conflicts = self
            .gateway
            .as_ref()
            .and_then(|g| g.last.policy_conflicts.get(&key));
        let had_conflicted = current
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["type"] == "Conflicted"));
        match conflicts {
            Some(why) => Some(cond("Conflicted", true, "Conflicted", why.join("; "))),
            None if had_conflicted => Some(cond(
                "Conflicted",
                false,
                "NoConflicts",
                "no route mixes this policy with another",
            )),
            None => None,
        }
    }

    /// Records a Normal Event `Programmed` on each route whose VIPs or number of nodes changed
    /// since this agent last said it (routes have no condition of lb's to read back, so a new
    /// status writer says it once more).
    fn report_routes(&mut self) {
        let own = self.own_record();
        let peers = self.records.peers();
        let reporter = reporter(&self.identity);
        let Some(g) = self.gateway.as_mut() else {
            return;
        };
        let mut said = BTreeMap::new();
        for (key, vips) in &g.last.route_vips {
            let message = programmed::served(key, vips, &own, &peers);
            if g.said.get(key) != Some(&message)
                && let Some((ar, route)) = g.route(key)
            {
                let recorder = Recorder::new(self.client.clone(), reporter.clone());
                record_event(recorder, &ar, &route, false, "Programmed", &message);
            }
            said.insert(key.clone(), message);
        }
        g.said = said;
    }

    /// What this node's maps hold, by Service and route (see [`programmed::NodeRecord`]).
    fn own_record(&self) -> programmed::NodeRecord {
        let routes = self.gateway.as_ref().map(|g| &g.last.route_vips);
        programmed::record_of(&self.last, routes.unwrap_or(&BTreeMap::new()))
    }

    /// Writes the [`programmed::CONDITION`] of each Service of lb's class where it differs from
    /// what the Service says, with a Normal Event `Programmed` when it is True with a new
    /// message (first programmed, other VIPs, another number of nodes).
    fn report_services(&mut self, applied: &std::result::Result<(), String>) {
        let own = self.own_record();
        let verdicts = programmed::verdicts(&self.last, applied, &own, &self.records.peers());
        let services = self.services.state();
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let ar = ApiResource::erase::<Service>(&());
        self.said.retain(|k, _| verdicts.contains_key(k));
        for (key, v) in verdicts {
            let Some(svc) = services
                .iter()
                .find(|s| s.namespace().as_deref() == Some(&key.0) && s.name_any() == key.1)
            else {
                continue;
            };
            let version = svc.resource_version();
            if self.said.get(&key) == Some(&(v.clone(), version.clone())) {
                continue;
            }
            let current = &svc.data["status"]["conditions"];
            let Some(conditions) = programmed::merged(current, &v, &now) else {
                continue;
            };
            self.writer.patch_status(
                &ar,
                Some(&key.0),
                &key.1,
                json!({ "conditions": conditions }),
            );
            if v.cond.ok {
                // A recorder of its own: kube's (as client-go's) folds an Event with the same
                // reason into the first one's series, keeping the first note (1 node, say).
                let recorder = Recorder::new(self.client.clone(), reporter(&self.identity));
                record_event(recorder, &ar, svc, false, "Programmed", &v.cond.message);
            }
            self.said.insert(key, (v, version));
        }
    }

    /// Writes the Gateway API statuses that changed, and the LoadBalancer Services of Gateways
    /// that lack theirs or whose ports changed.
    fn report_gateway(&self) {
        let Some(g) = &self.gateway else { return };
        let current = |store: &Store<DynamicObject>, ns: Option<&str>, name: &str| {
            store
                .state()
                .iter()
                .find(|o| o.namespace().as_deref() == ns && o.name_any() == name)
                .map(|o| o.data["status"].clone())
        };
        for u in &g.last.updates {
            let (kind, ns, name) = u.target();
            let (ar, store) = match kind {
                "GatewayClass" => (ApiResource::erase::<GatewayClass>(&()), &g.classes),
                "Gateway" => (ApiResource::erase::<Gateway>(&()), &g.gateways),
                "TCPRoute" => match &g.tcp {
                    Some((ar, s)) => (ar.clone(), s),
                    None => continue,
                },
                _ => match &g.udp {
                    Some((ar, s)) => (ar.clone(), s),
                    None => continue,
                },
            };
            // Gone since the translation: nothing to write to.
            let Some(now) = current(store, ns, name) else {
                continue;
            };
            if let Some(status) = u.render(&now, &g.controller) {
                self.writer.patch_status(&ar, ns, name, status);
            }
        }
        let services = self.services.state();
        for want in &g.last.lb_services {
            let ns = want["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = want["metadata"]["name"].as_str().unwrap_or_default();
            let have = services
                .iter()
                .find(|s| s.namespace().as_deref() == Some(ns) && s.name_any() == name);
            let same = have.is_some_and(|h| {
                h.data["spec"]["ports"] == want["spec"]["ports"]
                    && h.data["spec"]["type"] == want["spec"]["type"]
                    && h.metadata.owner_references.as_ref().map(|o| o.len()) == Some(1)
            });
            if !same {
                self.writer
                    .apply(&ApiResource::erase::<Service>(&()), ns, name, want.clone());
            }
        }
    }
}

/// Records an Event on `obj` (of `ar`) through `recorder` (in the background).
fn record_event(
    recorder: Recorder,
    ar: &ApiResource,
    obj: &DynamicObject,
    warning: bool,
    reason: &str,
    message: &str,
) {
    let mut reference = obj.object_ref(ar);
    reference.api_version = Some(ar.api_version.clone());
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(message.into()),
        action: "Balancing".into(),
        secondary: None,
    };
    let what = format!(
        "{}/{} {reason}",
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    );
    tokio::spawn(async move {
        if let Err(err) = recorder.publish(&ev, &reference).await {
            warn!("recording the event {what}: {}", crate::error_chain(&err));
        }
    });
}

/// `conds` as status conditions, if any differs from `current` (the object's conditions) in
/// status, reason, message or generation; a condition's `lastTransitionTime` stays while its
/// status does.
fn conditions_if_changed<'a>(
    conds: impl Iterator<Item = &'a Cond>,
    current: &serde_json::Value,
    generation: Option<i64>,
) -> Option<Vec<serde_json::Value>> {
    let mut changed = false;
    let conditions = conds
        .map(|c| {
            let status = if c.ok { "True" } else { "False" };
            let old = current
                .as_array()
                .and_then(|a| a.iter().find(|o| o["type"] == c.kind));
            let same = |f: &str, v: serde_json::Value| old.is_some_and(|o| o[f] == v);
            if !(same("status", json!(status))
                && same("reason", json!(c.reason))
                && same("message", json!(c.message))
                && same("observedGeneration", json!(generation)))
            {
                changed = true;
            }
            let since = old
                .filter(|o| o["status"] == status)
                .map(|o| o["lastTransitionTime"].clone())
                .unwrap_or_else(|| {
                    json!(
                        humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
                    )
                });
            json!({
                "type": c.kind, "status": status, "reason": c.reason, "message": c.message,
                "observedGeneration": generation, "lastTransitionTime": since,
            })
        })
        .collect();
    changed.then_some(conditions)
}

/// Events name lb and the node that recorded them.
fn reporter(node: &str) -> Reporter {
    Reporter {
        controller: "lb".into(),
        instance: Some(node.to_string()),
    }
}

/// The names of the Services the routes' backendRefs name (their slices are watched).
fn backend_names(g: &gateway::Objects) -> BTreeSet<String> {
    g.routes
        .iter()
        .flat_map(|r| &r.spec.rules)
        .flat_map(|rule| &rule.backend_refs)
        .map(|b| b.name.clone())
        .collect()
}

/// Which Gateway API kinds the API server serves, at which version.
#[derive(Default)]
struct GatewayApi {
    core: bool,
    tcp: Option<ApiResource>,
    udp: Option<ApiResource>,
    grants: Option<ApiResource>,
}

impl GatewayApi {
    /// [`GatewayApi::discover`], retried (1 s, doubling up to 10 s) until the API server answers.
    async fn discover_until_answered(client: &Client) -> Self {
        let mut wait = std::time::Duration::from_secs(1);
        loop {
            match Self::discover(client).await {
                Ok(s) => return s,
                Err(e) => {
                    warn!("{}, retrying in {wait:?}", crate::error_chain(&e));
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(10));
                }
            }
        }
    }

    /// Asks the API server (discovery) which Gateway API kinds and versions it serves.
    async fn discover(client: &Client) -> Result<Self, KubeError> {
        let mut versions = BTreeMap::new();
        for v in ["v1", "v1alpha2", "v1beta1"] {
            let gv = format!("{GROUP}/{v}");
            let names: BTreeSet<String> = match client.list_api_group_resources(&gv).await {
                Ok(list) => list.resources.into_iter().map(|r| r.name).collect(),
                Err(kube::Error::Api(s)) if s.code == 404 => BTreeSet::new(),
                Err(source) => {
                    return Err(KubeError::Discovery {
                        group_version: gv,
                        source,
                    });
                }
            };
            versions.insert(v, names);
        }
        let at = |plural: &str, order: &[&str], ar: ApiResource| {
            order
                .iter()
                .find(|v| versions[**v].contains(plural))
                .map(|v| ApiResource {
                    api_version: format!("{GROUP}/{v}"),
                    version: (*v).to_string(),
                    ..ar
                })
        };
        Ok(Self {
            core: versions["v1"].contains("gateways") && versions["v1"].contains("gatewayclasses"),
            tcp: at(
                "tcproutes",
                &["v1", "v1alpha2"],
                ApiResource::erase::<TCPRoute>(&()),
            ),
            udp: at(
                "udproutes",
                &["v1", "v1alpha2"],
                ApiResource::erase::<UDPRoute>(&()),
            ),
            grants: at(
                "referencegrants",
                &["v1", "v1beta1"],
                ApiResource::erase::<ReferenceGrant>(&()),
            ),
        })
    }

    /// Whether there are Gateways to serve (GatewayClass and Gateway at v1).
    fn enabled(&self) -> bool {
        self.core
    }

    /// The versions found, as the GatewayClass's status names them.
    fn watched(&self) -> gateway::Watched {
        let v = |a: &Option<ApiResource>| a.as_ref().map(|a| a.version.clone());
        gateway::Watched {
            tcp_routes: v(&self.tcp),
            udp_routes: v(&self.udp),
            grants: v(&self.grants),
        }
    }
}

impl Drop for Kube {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.election.abort();
        self.slice_watch.stop();
    }
}
