//! The agent's view of the cluster: three reflectors (Services of its class, the EndpointSlices
//! of those Services, UpstreamPolicies), the translation of what they hold, and what the agent
//! reports back (policy status conditions, Events on Services) while it holds the status
//! writer's Lease.
//!
//! The watchers run over `DynamicObject`s and each object is decoded on its own, so one object
//! that does not decode (a malformed object) is logged and skipped instead of stalling its whole
//! watch stream.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
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
    lease::{self, Leadership, LeaseFlags},
    policy::UpstreamPolicy,
    slices::SliceWatch,
    translate::{CLASS_LABEL, Objects, ServiceEvent, Settings, Translation, Translator, cond},
};
use crate::config::VipConfig;

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
}

pub struct Kube {
    client: Client,
    services: Store<DynamicObject>,
    slices: Store<DynamicObject>,
    policies: Store<DynamicObject>,
    /// The EndpointSlice watch, restarted when the set of Services it selects changes.
    slice_watch: SliceWatch,
    /// Whether this agent writes status (policy conditions, Events).
    leader: Leadership,
    /// Status patches name this writer (`fieldManager`).
    field_manager: String,
    /// The election task, its flags and this agent's identity in it.
    election: JoinHandle<()>,
    lease_flags: LeaseFlags,
    identity: String,
    tasks: Vec<JoinHandle<()>>,
    translator: Translator,
    pub settings: Settings,
    recorder: Recorder,
    /// The translation the maps were last asked to hold.
    pub last: Translation,
    /// Events already recorded (recorded again only after they stop and recur).
    published: BTreeSet<ServiceEvent>,
    /// Malformed objects already logged.
    skipped: BTreeSet<String>,
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

impl Kube {
    /// Connects (in-cluster config, or KUBECONFIG / ~/.kube/config) and starts watching; every
    /// change sends a unit on `changed`.
    pub async fn start(
        opts: &KubeOptions,
        settings: Settings,
        changed: mpsc::Sender<()>,
    ) -> Result<Self> {
        opts.lease.check()?;
        let client = Client::try_default().await.context(
            "connecting to Kubernetes (in-cluster config, KUBECONFIG or ~/.kube/config)",
        )?;
        let (services, t1) = watch(
            &client,
            ApiResource::erase::<Service>(&()),
            watcher::Config::default().labels(&format!("{CLASS_LABEL}={}", opts.class)),
            changed.clone(),
        );
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
            changed,
        );
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "lb".into(),
                instance: Some(opts.node_name.clone()),
            },
        );
        let mut kube = Self {
            client,
            services,
            slices,
            policies,
            slice_watch,
            leader,
            field_manager: format!("lb-{}", opts.node_name),
            election: t4,
            lease_flags: opts.lease.clone(),
            identity: opts.node_name.clone(),
            tasks: vec![t1, t3],
            translator: Translator::default(),
            settings,
            recorder,
            last: Translation::default(),
            published: BTreeSet::new(),
            skipped: BTreeSet::new(),
            last_good: BTreeMap::new(),
        };
        // EndpointSlices are watched for the Services served only: list those first.
        if kube.services.wait_until_ready().await.is_err() {
            warn!("the Services watcher ended before its first list");
        }
        let services = kube.services.clone();
        let served = kube
            .decode::<Service>(&services, "Service", None)
            .iter()
            .map(|s| s.name_any())
            .collect();
        kube.want_slices_of("services", served);
        Ok(kube)
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

    /// Translates what the watchers hold now; the VIPs to serve.
    pub fn translate(&mut self) -> Vec<VipConfig> {
        let services = self.services.clone();
        let slices = self.slices.clone();
        let policies = self.policies.clone();
        let mut invalid_policies = Vec::new();
        let served = self.decode::<Service>(&services, "Service", None);
        self.want_slices_of("services", served.iter().map(|s| s.name_any()).collect());
        let objects = Objects {
            services: served,
            slices: self.decode(&slices, "EndpointSlice", None),
            policies: self.decode(&policies, "UpstreamPolicy", Some(&mut invalid_policies)),
            invalid_policies,
        };
        let t = self.translator.translate(&objects, &self.settings);
        for s in &t.skipped {
            if self.skipped.insert(s.clone()) {
                warn!("{s}");
            }
        }
        self.last = t;
        self.last.vips.clone()
    }

    /// Reports the outcome of applying the last translation: policy conditions (patched only
    /// when they change) and new Events on Services. Runs in the background.
    /// Only the leader writes: a follower forgets what it would have recorded, so that on a
    /// takeover it writes the whole current status once.
    pub fn report(&mut self, applied: &std::result::Result<(), String>) {
        if !self.leader.is_leader() {
            self.published.clear();
            return;
        }
        // Events: those not recorded yet.
        let now: BTreeSet<ServiceEvent> = self.last.events.iter().cloned().collect();
        let services = self.services.state();
        for e in now.difference(&self.published) {
            let Some(svc) = services.iter().find(|s| {
                s.namespace().as_deref() == Some(&e.service.0) && s.name_any() == e.service.1
            }) else {
                continue;
            };
            let mut reference = svc.object_ref(&ApiResource::erase::<Service>(&()));
            reference.api_version = Some("v1".into());
            let ev = Event {
                type_: if e.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: e.reason.clone(),
                note: Some(e.message.clone()),
                action: "Balancing".into(),
                secondary: None,
            };
            let recorder = self.recorder.clone();
            let what = format!("{}/{} {}", e.service.0, e.service.1, e.reason);
            warn!(service = %format!("{}/{}", e.service.0, e.service.1), reason = %e.reason, "{}", e.message);
            tokio::spawn(async move {
                if let Err(err) = recorder.publish(&ev, &reference).await {
                    warn!("recording the event {what}: {}", crate::error_chain(&err));
                }
            });
        }
        self.published = now;

        // Policy conditions.
        let policies = self.policies.state();
        for ((ns, name), verdict) in &self.last.policies {
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
            let programmed = cond("Programmed", ok, reason, message);
            let current = policies
                .iter()
                .find(|p| p.namespace().as_deref() == Some(ns.as_str()) && &p.name_any() == name)
                .and_then(|p| p.data.pointer("/status/conditions").cloned())
                .unwrap_or(json!([]));
            let mut changed = false;
            let conditions: Vec<serde_json::Value> = [&verdict.accepted, &programmed]
                .into_iter()
                .map(|c| {
                    let status = if c.ok { "True" } else { "False" };
                    let old = current
                        .as_array()
                        .and_then(|a| a.iter().find(|o| o["type"] == c.kind));
                    let same = |f: &str, v: serde_json::Value| old.is_some_and(|o| o[f] == v);
                    if !(same("status", json!(status))
                        && same("reason", json!(c.reason))
                        && same("message", json!(c.message))
                        && same("observedGeneration", json!(verdict.generation)))
                    {
                        changed = true;
                    }
                    let since = old
                        .filter(|o| o["status"] == status)
                        .map(|o| o["lastTransitionTime"].clone())
                        .unwrap_or_else(|| {
                            json!(
                                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                                    .to_string()
                            )
                        });
                    json!({
                        "type": c.kind, "status": status, "reason": c.reason, "message": c.message,
                        "observedGeneration": verdict.generation, "lastTransitionTime": since,
                    })
                })
                .collect();
            if !changed {
                continue;
            }
            let api: Api<UpstreamPolicy> = Api::namespaced(self.client.clone(), ns);
            let (name, ns) = (name.clone(), ns.clone());
            let params = PatchParams {
                field_manager: Some(self.field_manager.clone()),
                ..Default::default()
            };
            tokio::spawn(async move {
                let patch = json!({ "status": { "conditions": conditions } });
                if let Err(e) = api
                    .patch_status(&name, &params, &Patch::Merge(&patch))
                    .await
                {
                    warn!(
                        "updating the status of UpstreamPolicy {ns}/{name}: {}",
                        crate::error_chain(&e)
                    );
                }
            });
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
