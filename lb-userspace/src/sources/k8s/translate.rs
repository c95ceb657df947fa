//! Kubernetes objects -> the same [`VipConfig`]s a config file gives: one model, two sources.
//!
//! Pure and deterministic: the output depends only on the objects (in any order), the class,
//! the node's name (for `externalTrafficPolicy: Local`) and its table size, so every node builds
//! byte-identical Maglev tables from the same objects. The only memory is the last accepted
//! effect of each policy, so a policy edited into something invalid keeps serving its Services
//! with what it said before.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::ResourceExt as _;

use super::kong::{self, Note};
use super::policy::{
    Algorithm, HashInput, HashInputKind, POLICY_ANNOTATION, SessionPersistence, UpstreamPolicy,
    UpstreamPolicySpec,
};
use super::topology::{self, Place};
use crate::{
    model::desired::{BackendSpec, HashOn, Mode, Protocol, VipSpec},
    sources::config::{CheckKind, HealthCheck, MAX_AFFINITY_TIMEOUT, PassiveCheck, VipConfig},
};

/// The label that puts a Service in an lb instance's care: `lb.dev/class: <class>`.
pub const CLASS_LABEL: &str = "lb.dev/class";
/// The class an agent serves unless told otherwise.
pub const DEFAULT_CLASS: &str = "default";
/// Kubernetes' default ClientIP affinity timeout.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The annotation that says a LoadBalancer Service's source ranges when
/// `spec.loadBalancerSourceRanges` does not (comma-separated CIDRs).
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// The annotation that gives a Service's VIPs a new-flow budget (see
/// [`crate::model::desired::Budget`]): `rate=2000,burst=500` (burst defaults to the rate).
pub const NEW_FLOW_BUDGET_ANNOTATION: &str = "lb.dev/new-flow-budget";
/// The annotation that overrides the weight of some of a Service's endpoints, the cluster's
/// `lb drain` / `lb weight`: `10.0.1.5=0, 10.0.1.6=50` (0 drains: established flows stay).
pub const BACKEND_WEIGHTS_ANNOTATION: &str = "lb.dev/backend-weights";
/// The annotation that gives a LoadBalancer Service a port-range VIP on each of its addresses,
/// for each protocol of its ports (`"10000-10999"`): every port of the range goes to the same
/// port of the Service's endpoints (see [`range_vips`]).
pub const PORT_RANGE_ANNOTATION: &str = "lb.dev/port-range";

/// `namespace/name`.
pub type ObjectKey = (String, String);

/// What the translation needs to know about this node.
#[derive(Clone, Debug)]
pub struct Settings {
    pub class: String,
    pub node_name: String,
    /// This node's zone (its Node's `topology.kubernetes.io/zone` label), for topology hints.
    pub zone: Option<String>,
    /// The node's Maglev table size: the largest `slots` a policy may ask for.
    pub table_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    /// Whether the node has an IPv4 / IPv6 source address (NAT needs one per family).
    pub source_v4: bool,
    pub source_v6: bool,
}

/// The objects, as the watchers hold them.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub policies: Vec<UpstreamPolicy>,
    /// Policies that do not decode: (namespace/name, generation, why).
    pub invalid_policies: Vec<(ObjectKey, Option<i64>, String)>,
}

/// How a policy changes the VIPs of its Services.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Effect {
    pub hash: HashOn,
    pub table_size: Option<u32>,
    pub health_check: Option<HealthCheck>,
    pub passive_health: Option<PassiveCheck>,
    /// `healthchecks.threshold` (percent; 0: none).
    pub health_threshold: u8,
    /// `sessionPersistence` (`type: ClientIP`): the client affinity timeout, in seconds.
    pub affinity_timeout_s: Option<u32>,
    /// `algorithm: least-connections` gives least connections; every other accepted one Maglev.
    pub algorithm: crate::model::desired::Algorithm,
}

/// A status condition to publish: `type`, `status`, `reason`, `message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub kind: &'static str,
    pub ok: bool,
    pub reason: String,
    pub message: String,
}

/// A policy's verdict: its `Accepted` condition and the generation it judged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyVerdict {
    pub generation: Option<i64>,
    pub accepted: Cond,
    /// Services (`namespace/name`) that name it.
    pub services: Vec<String>,
}

/// An event to record on a Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceEvent {
    pub service: ObjectKey,
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

/// What became of one Service of lb's class: the VIPs it is served at (labels, sorted; none:
/// not served, its warning events say why) and the generation judged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceOutcome {
    pub generation: Option<i64>,
    pub vips: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Translation {
    pub vips: Vec<VipConfig>,
    /// Every Service of lb's class (not a Gateway's own), served or not.
    pub services: BTreeMap<ObjectKey, ServiceOutcome>,
    pub policies: BTreeMap<ObjectKey, PolicyVerdict>,
    pub events: Vec<ServiceEvent>,
    /// Objects that could not be used at all, and why (for the log).
    pub skipped: Vec<String>,
    /// Each policy's effect now (None: the defaults), for the Gateway API's backend Services.
    pub effects: BTreeMap<ObjectKey, Option<Effect>>,
}

/// Keeps the last accepted effect of every policy between translations.
#[derive(Debug, Default)]
pub struct Translator {
    last_good: BTreeMap<ObjectKey, Effect>,
    /// Each Service's last port range that read (see [`PORT_RANGE_ANNOTATION`]), kept while
    /// its annotation does not.
    last_ranges: BTreeMap<ObjectKey, crate::model::desired::PortRange>,
}

fn key_of(ns: Option<String>, name: String) -> ObjectKey {
    (ns.unwrap_or_default(), name)
}

fn label(k: &ObjectKey) -> String {
    format!("{}/{}", k.0, k.1)
}

/// A condition to publish.
pub fn cond(kind: &'static str, ok: bool, reason: &str, message: impl Into<String>) -> Cond {
    Cond {
        kind,
        ok,
        reason: reason.into(),
        message: message.into(),
    }
}

/// Judges a policy: its effect and what to say about it, or why it cannot be applied
/// (`reason`, `message`).
pub fn evaluate(
    spec: &UpstreamPolicySpec,
    table_size: u32,
) -> Result<(Effect, Vec<Note>), (&'static str, String)> {
    let mut notes = Vec::new();
    let algorithm = spec.algorithm.unwrap_or(Algorithm::RoundRobin);
    let name = serde_json::to_value(algorithm)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    match algorithm {
        Algorithm::RoundRobin | Algorithm::ConsistentHashing | Algorithm::LeastConnections => {}
        _ => {
            return Err((
                "UnsupportedAlgorithm",
                format!(
                    "algorithm {name} is not supported yet: lb balances by weighted Maglev hashing \
                     (consistent-hashing, or round-robin over the 5-tuple) or least-connections"
                ),
            ));
        }
    }
    let mut effect = Effect {
        hash: hash_of(spec, &name, &mut notes)?,
        ..Effect::default()
    };
    if algorithm == Algorithm::LeastConnections {
        effect.algorithm = crate::model::desired::Algorithm::LeastConnections;
    }
    if let Some(slots) = spec.slots {
        let (used, note) = kong::slots(slots, table_size)?;
        notes.extend(note);
        effect.table_size = Some(used);
    }
    if let Some(h) = &spec.healthchecks {
        effect.health_threshold = kong::threshold(h)?;
        if let Some(a) = &h.active {
            effect.health_check = Some(active_check(a)?);
        }
        if let Some(p) = h.passive.as_ref().and_then(|p| p.unhealthy.as_ref()) {
            // One streak of failures of any kind in the data path: the lower threshold trips it.
            let failures = [p.tcp_failures, p.timeouts]
                .into_iter()
                .flatten()
                .filter(|n| *n > 0)
                .min();
            effect.passive_health = failures.map(|failures| PassiveCheck {
                failures,
                recheck_interval: Duration::from_secs(10),
                timeout: Duration::from_secs(1),
            });
        }
    }
    if let Some(p) = &spec.session_persistence {
        let (timeout, note) = persistence(p)?;
        notes.extend(note);
        effect.affinity_timeout_s = Some(timeout);
    }
    notes.extend(kong::not_applicable(spec));
    Ok((effect, notes))
}

/// What a policy hashes on: `hashOn` (or `hashOnFallback` where L4 cannot see it, noted) for
/// consistent hashing, else the 5-tuple (a `hashOn` for another algorithm is noted).
fn hash_of(
    spec: &UpstreamPolicySpec,
    name: &str,
    notes: &mut Vec<Note>,
) -> Result<HashOn, (&'static str, String)> {
    let hashing = spec.algorithm == Some(Algorithm::ConsistentHashing)
        || (spec.algorithm.is_none() && spec.hash_on.is_some());
    if hashing {
        return Ok(match spec.hash_on.as_ref().map(hash_input) {
            None => HashOn::FiveTuple,
            Some(Err(e)) => return Err(("InvalidHashOn", format!("hashOn: {e}"))),
            Some(Ok(Ok(h))) => h,
            Some(Ok(Err(unseen))) => match spec.hash_on_fallback.as_ref().map(hash_input) {
                Some(Ok(Ok(h))) => {
                    notes.push(Note {
                        reason: "AcceptedWithFallback",
                        message: format!(
                            "hashOn {unseen} cannot be seen at L4: hashing on hashOnFallback (the client address)"
                        ),
                    });
                    h
                }
                Some(Err(e)) => {
                    return Err(("InvalidHashOn", format!("hashOnFallback: {e}")));
                }
                Some(Ok(Err(also))) => {
                    return Err((
                        "NoUsableHash",
                        format!(
                            "hashOn {unseen} cannot be seen at L4, nor can hashOnFallback {also}: \
                             use input: ip (or no hashOn, for the 5-tuple)"
                        ),
                    ));
                }
                None => {
                    return Err((
                        "NoUsableHash",
                        format!(
                            "hashOn {unseen} cannot be seen at L4 and there is no hashOnFallback: \
                             add hashOnFallback: {{input: ip}}"
                        ),
                    ));
                }
            },
        });
    } else if spec.hash_on.is_some() || spec.hash_on_fallback.is_some() {
        notes.push(kong::note(format!(
            "hashOn applies to consistent-hashing only: {name} hashes the 5-tuple"
        )));
    }
    Ok(HashOn::FiveTuple)
}

/// `sessionPersistence`: the affinity timeout it asks for, and a note if `absoluteTimeout` is
/// applied as the idle timeout.
fn persistence(p: &SessionPersistence) -> Result<(u32, Option<Note>), (&'static str, String)> {
    let unsupported = |why: String| ("UnsupportedSessionPersistence", why);
    match p.kind.as_deref() {
        Some("ClientIP") => {}
        Some(other) => {
            return Err(unsupported(format!(
                "sessionPersistence.type {other} is in the payload, which an L4 balancer does not                  read: use type: ClientIP"
            )));
        }
        None => {
            return Err(unsupported(
                "sessionPersistence.type is required (the Gateway API's default, Cookie, is L7):                  use type: ClientIP"
                    .into(),
            ));
        }
    }
    let (field, text) = match (&p.idle_timeout, &p.absolute_timeout) {
        (Some(t), _) => ("idleTimeout", t),
        (None, Some(t)) => ("absoluteTimeout", t),
        (None, None) => return Ok((DEFAULT_AFFINITY_TIMEOUT_S, None)),
    };
    let max = MAX_AFFINITY_TIMEOUT.as_secs();
    let secs = humantime::parse_duration(text)
        .ok()
        .map(|d| d.as_secs())
        .filter(|s| (1..=max).contains(s))
        .ok_or_else(|| {
            unsupported(format!(
                "sessionPersistence.{field}: {text:?} is not a duration from 1s to 24h (e.g. 1h, 30m)"
            ))
        })?;
    let note = (field == "absoluteTimeout").then(|| Note {
        reason: "AcceptedWithFallback",
        message: format!(
            "sessionPersistence.absoluteTimeout {text} is applied as an idle timeout: a client \
             keeps its backend while it keeps connecting"
        ),
    });
    Ok((secs as u32, note))
}

/// Ok(Ok(hash)) if L4 can hash on it, Ok(Err(what)) if it names something L4 cannot see,
/// Err if it is not one thing.
fn hash_input(h: &HashInput) -> Result<Result<HashOn, String>, String> {
    let mut set = Vec::new();
    if let Some(i) = h.input {
        set.push(match i {
            HashInputKind::Ip => Ok(HashOn::SourceIp),
            HashInputKind::Consumer => Err("input: consumer".to_string()),
            HashInputKind::Path => Err("input: path".to_string()),
        });
    }
    for (field, v) in [
        ("header", &h.header),
        ("cookie", &h.cookie),
        ("queryArg", &h.query_arg),
        ("uriCapture", &h.uri_capture),
    ] {
        if let Some(v) = v {
            set.push(Err(format!("{field} {v:?}")));
        }
    }
    if h.cookie_path.is_some() && h.cookie.is_none() {
        return Err("cookiePath needs cookie".into());
    }
    match set.len() {
        1 => Ok(set.pop().expect("one")),
        0 => Err("set one of input, header, cookie, queryArg, uriCapture".into()),
        _ => Err("set only one of input, header, cookie, queryArg, uriCapture".into()),
    }
}

fn active_check(
    a: &super::policy::ActiveHealthcheck,
) -> Result<HealthCheck, (&'static str, String)> {
    let kind = match a.kind.as_deref().unwrap_or("http") {
        "tcp" => CheckKind::Tcp,
        k @ ("http" | "https") => {
            kong::check_headers(a)?;
            let (headers, tls) = kong::http_extras(a, k == "https");
            CheckKind::Http {
                path: a.http_path.clone().unwrap_or_else(|| "/".into()),
                statuses: a
                    .healthy
                    .as_ref()
                    .and_then(|h| h.http_statuses.clone())
                    .unwrap_or_else(|| (200..=399).collect()),
                headers,
                tls,
            }
        }
        other => {
            return Err((
                "UnsupportedHealthcheck",
                format!(
                    "healthchecks.active.type {other} is not supported: use tcp, http or https"
                ),
            ));
        }
    };
    if let CheckKind::Http { path, .. } = &kind
        && !path.starts_with('/')
    {
        return Err((
            "InvalidHealthcheck",
            format!("healthchecks.active.httpPath {path:?} must start with /"),
        ));
    }
    let secs = |s: Option<u32>, default: u64| Duration::from_secs(s.map_or(default, u64::from));
    let interval = a
        .healthy
        .as_ref()
        .and_then(|h| h.interval)
        .or(a.unhealthy.as_ref().and_then(|u| u.interval))
        .filter(|i| *i > 0);
    let interval = secs(interval, 5);
    let timeout = secs(a.timeout.filter(|t| *t > 0), 1).min(interval);
    let unhealthy = a.unhealthy.as_ref().and_then(|u| {
        [u.tcp_failures, u.http_failures, u.timeouts]
            .into_iter()
            .flatten()
            .filter(|n| *n > 0)
            .min()
    });
    Ok(HealthCheck {
        kind,
        port: 0,
        interval,
        unhealthy_interval: kong::unhealthy_interval(a),
        timeout,
        healthy_threshold: a
            .healthy
            .as_ref()
            .and_then(|h| h.successes)
            .filter(|n| *n > 0)
            .unwrap_or(2)
            .min(255),
        unhealthy_threshold: unhealthy.unwrap_or(3).min(255),
        concurrency: a.concurrency.unwrap_or(0),
    })
}

/// The Service port's protocol, if lb balances it.
fn protocol_of(p: &ServicePort) -> Result<Protocol, String> {
    match p.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        other => Err(other.to_string()),
    }
}

/// Where the endpoints of `slice` serve the Service port `sp`, if they do.
pub(crate) fn endpoint_port(slice: &EndpointSlice, sp: &ServicePort, proto: &str) -> Option<u16> {
    let name = sp.name.as_deref().unwrap_or("");
    let found = slice.ports.iter().flatten().find(|p| {
        p.name.as_deref().unwrap_or("") == name && p.protocol.as_deref().unwrap_or("TCP") == proto
    });
    match (found.and_then(|p| p.port), &sp.target_port) {
        (Some(p), _) => u16::try_from(p).ok().filter(|p| *p > 0),
        // A slice that lists no port for it: a numeric targetPort still says where.
        (None, Some(IntOrString::Int(p))) if found.is_some() || slice.ports.is_none() => {
            u16::try_from(*p).ok().filter(|p| *p > 0)
        }
        (None, None) if slice.ports.is_none() => u16::try_from(sp.port).ok(),
        _ => None,
    }
}

/// The endpoints of a Service port, from its slices of one family: (address, port) -> weight,
/// 1 for ready ones, 0 for terminating ones still serving (they drain: established flows stay,
/// no new ones); others are left out. An endpoint in two slices counts once, the more alive of
/// the two. `local_node`: only that node's endpoints (`externalTrafficPolicy: Local`).
/// Addresses that do not parse are noted in `skipped`.
pub(crate) fn endpoints(
    slices: &[&EndpointSlice],
    sp: &ServicePort,
    v4: bool,
    local_node: Option<&str>,
    namespace: &str,
    skipped: &mut Vec<String>,
) -> BTreeMap<(IpAddr, u16), u32> {
    let family = if v4 { "IPv4" } else { "IPv6" };
    let proto_name = sp.protocol.as_deref().unwrap_or("TCP");
    let mut backends: BTreeMap<(IpAddr, u16), u32> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.address_type == family) {
        let Some(bport) = endpoint_port(slice, sp, proto_name) else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            if local_node.is_some_and(|n| ep.node_name.as_deref() != Some(n)) {
                continue;
            }
            let c = ep.conditions.clone().unwrap_or_default();
            let ready = c.ready.unwrap_or(true);
            let serving = c.serving.unwrap_or(ready);
            let terminating = c.terminating.unwrap_or(false);
            let weight = if ready && !terminating {
                1
            } else if serving && terminating {
                0
            } else {
                continue;
            };
            for a in &ep.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    skipped.push(format!(
                        "EndpointSlice {namespace}/{}: {a:?} is not an IP address",
                        slice.name_any()
                    ));
                    continue;
                };
                if ip.is_ipv4() != v4 {
                    continue;
                }
                let w = backends.entry((ip, bport)).or_insert(0);
                *w = (*w).max(weight);
            }
        }
    }
    backends
}

impl Translator {
    pub fn translate(&mut self, objects: &Objects, settings: &Settings) -> Translation {
        let mut out = Translation::default();
        let effects = self.judge_policies(objects, settings, &mut out);
        let slices = slices_by_service(&objects.slices);
        let mut services: Vec<&Service> = objects
            .services
            .iter()
            .filter(|s| {
                s.labels().get(CLASS_LABEL) == Some(&settings.class) && !owned_by_gateway(s)
            })
            .collect();
        services.sort_by_key(|s| key_of(s.namespace(), s.name_any()));
        let mut claims = Claims::default();
        let no_slices = Vec::new();
        for svc in services {
            let skey = key_of(svc.namespace(), svc.name_any());
            let outcome = ServiceOutcome {
                generation: svc.metadata.generation,
                vips: Vec::new(),
            };
            out.services.insert(skey.clone(), outcome);
            let svc_slices = slices.get(&skey).unwrap_or(&no_slices);
            let range = self.port_range(svc, &skey, &mut out);
            let vips = service_vips(svc, &skey, svc_slices, &effects, settings, &mut out, range);
            claims.claim(vips, &skey, settings, &mut out);
        }
        self.last_ranges.retain(|k, _| out.services.contains_key(k));
        out.events.sort();
        out.events.dedup();
        out.effects = effects;
        out
    }

    /// Service `skey`'s port range ([`PORT_RANGE_ANNOTATION`]): the annotation's, else (it does
    /// not read: a Warning Event says so) the last one that read, which keeps serving.
    fn port_range(
        &mut self,
        svc: &Service,
        skey: &ObjectKey,
        out: &mut Translation,
    ) -> Option<crate::model::desired::PortRange> {
        let Some(raw) = svc.annotations().get(PORT_RANGE_ANNOTATION) else {
            self.last_ranges.remove(skey);
            return None;
        };
        match raw.trim().parse::<crate::model::desired::PortRange>() {
            Ok(r) => {
                self.last_ranges.insert(skey.clone(), r);
                Some(r)
            }
            Err(e) => {
                let last = self.last_ranges.get(skey).copied();
                let keeps = match last {
                    Some(r) => format!("the last good range, {r}, keeps serving"),
                    None => "no port range".to_string(),
                };
                out.events.push(ServiceEvent {
                    service: skey.clone(),
                    warning: true,
                    reason: "InvalidPortRange".into(),
                    message: format!("{PORT_RANGE_ANNOTATION}: {e}: {keeps}"),
                });
                last
            }
        }
    }

    /// Every policy's verdict (into `out`) and the effect it has now: the last accepted one
    /// while a newer version is refused.
    fn judge_policies(
        &mut self,
        objects: &Objects,
        settings: &Settings,
        out: &mut Translation,
    ) -> BTreeMap<ObjectKey, Option<Effect>> {
        let mut effects: BTreeMap<ObjectKey, Option<Effect>> = BTreeMap::new();
        let mut policies: Vec<&UpstreamPolicy> = objects.policies.iter().collect();
        policies.sort_by_key(|p| key_of(p.namespace(), p.name_any()));
        let mut seen = BTreeSet::new();
        for p in policies {
            let key = key_of(p.namespace(), p.name_any());
            seen.insert(key.clone());
            let (accepted, effect) = match evaluate(&p.spec, settings.table_size) {
                Ok((effect, notes)) => {
                    self.last_good.insert(key.clone(), effect.clone());
                    (accepted(&notes), Some(effect))
                }
                Err((reason, message)) => {
                    let kept = self.last_good.get(&key).cloned();
                    let message = format!("{message}; its Services {}", keeping(&kept));
                    (cond("Accepted", false, reason, message), kept)
                }
            };
            effects.insert(key.clone(), effect);
            let verdict = PolicyVerdict {
                generation: p.metadata.generation,
                accepted,
                services: Vec::new(),
            };
            out.policies.insert(key, verdict);
        }
        for (key, generation, why) in &objects.invalid_policies {
            seen.insert(key.clone());
            let kept = self.last_good.get(key).cloned();
            let message = format!(
                "the policy does not decode ({why}); its Services {}",
                keeping(&kept)
            );
            effects.insert(key.clone(), kept);
            let verdict = PolicyVerdict {
                generation: *generation,
                accepted: cond("Accepted", false, "Invalid", message),
                services: Vec::new(),
            };
            out.policies.insert(key.clone(), verdict);
        }
        // A deleted policy's memory goes with it.
        self.last_good.retain(|k, _| seen.contains(k));
        effects
    }
}

/// What a refused policy's Services do meanwhile.
fn keeping(kept: &Option<Effect>) -> &'static str {
    if kept.is_some() {
        "keep the last accepted version"
    } else {
        "use the defaults"
    }
}

/// The `Accepted` condition of a policy accepted with `notes`.
fn accepted(notes: &[Note]) -> Cond {
    let Some(first) = notes.first() else {
        return cond(
            "Accepted",
            true,
            "Accepted",
            "the policy applies at L4 as written",
        );
    };
    // A hash fallback says the most about what the policy does.
    let reason = notes
        .iter()
        .find(|n| n.reason == "AcceptedWithFallback")
        .unwrap_or(first)
        .reason;
    let message = notes
        .iter()
        .map(|n| n.message.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    cond("Accepted", true, reason, message)
}

/// The EndpointSlices of each Service (by its label), in name order.
fn slices_by_service(all: &[EndpointSlice]) -> BTreeMap<ObjectKey, Vec<&EndpointSlice>> {
    let mut slices: BTreeMap<ObjectKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in all {
        let Some(svc) = s.labels().get(SERVICE_NAME_LABEL) else {
            continue;
        };
        slices
            .entry((s.namespace().unwrap_or_default(), svc.clone()))
            .or_default()
            .push(s);
    }
    for v in slices.values_mut() {
        v.sort_by_key(|s| s.name_any());
    }
    slices
}

/// The VIPs a Service asks for (not claimed yet); its events go to `out`.
fn service_vips(
    svc: &Service,
    skey: &ObjectKey,
    slices: &[&EndpointSlice],
    effects: &BTreeMap<ObjectKey, Option<Effect>>,
    settings: &Settings,
    out: &mut Translation,
    range: Option<crate::model::desired::PortRange>,
) -> Vec<VipConfig> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let mut events = Vec::new();
    let mut event = |warning: bool, reason: &str, message: String| {
        events.push(ServiceEvent {
            service: skey.clone(),
            warning,
            reason: reason.into(),
            message,
        })
    };
    let effect = policy_effect(svc, skey, effects, &mut out.policies, &mut event);
    let (addresses, lb_addrs) = addresses_of(svc, spec, settings, &mut event);
    let mut vips = Vec::new();
    if !addresses.is_empty() {
        let shared = Shared {
            skey,
            slices,
            affinity_timeout_s: affinity_of(spec, &effect),
            source_ranges: source_ranges_of(svc, &mut event),
            new_flow_budget: new_flow_budget_of(svc, &mut event),
            weights: backend_weights_of(svc, &mut event),
            local: spec.external_traffic_policy.as_deref() == Some("Local"),
            effect,
            lb_addrs,
        };
        for sp in spec.ports.iter().flatten() {
            let Some((proto, port)) = port_of(sp, &mut event) else {
                continue;
            };
            for addr in &addresses {
                let v = shared.vip(sp, (proto, port), *addr, settings, &mut out.skipped);
                match v {
                    Ok(v) => vips.push(v),
                    Err((reason, message)) => event(true, reason, message),
                }
            }
        }
        if let Some(range) = range {
            let ports = spec.ports.as_deref().unwrap_or_default();
            for v in range_vips(
                &shared,
                ports,
                range,
                &addresses,
                settings,
                &mut out.skipped,
            ) {
                match v {
                    Ok(v) => vips.push(v),
                    Err((reason, message)) => event(true, reason, message),
                }
            }
        }
    }
    out.events.extend(events);
    vips
}

/// The effect of the policy a Service names (its verdict learns the Service's name), or the
/// defaults.
fn policy_effect(
    svc: &Service,
    skey: &ObjectKey,
    effects: &BTreeMap<ObjectKey, Option<Effect>>,
    verdicts: &mut BTreeMap<ObjectKey, PolicyVerdict>,
    event: &mut impl FnMut(bool, &str, String),
) -> Effect {
    let Some(name) = svc.annotations().get(POLICY_ANNOTATION) else {
        return Effect::default();
    };
    let pkey = (skey.0.clone(), name.clone());
    match (effects.get(&pkey), verdicts.get_mut(&pkey)) {
        (Some(e), Some(verdict)) => {
            verdict.services.push(label(skey));
            if !verdict.accepted.ok {
                let message = format!("UpstreamPolicy {name}: {}", verdict.accepted.message);
                event(true, "PolicyRejected", message);
            }
            e.clone().unwrap_or_default()
        }
        _ => {
            event(
                true,
                "PolicyNotFound",
                format!(
                    "UpstreamPolicy {name} (annotation {POLICY_ANNOTATION}) does not exist in namespace {}: using the defaults",
                    skey.0
                ),
            );
            Effect::default()
        }
    }
}

/// A Service's addresses (load-balancer ingress IPs and external IPs) of the families this
/// node can translate from, and the load balancer's own among them (the ones source ranges
/// restrict, as in Kubernetes: an external IP is reached without the load balancer's firewall).
fn addresses_of(
    svc: &Service,
    spec: &ServiceSpec,
    settings: &Settings,
    event: &mut impl FnMut(bool, &str, String),
) -> (BTreeSet<IpAddr>, BTreeSet<IpAddr>) {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref());
    let from_lb = (spec.type_.as_deref() == Some("LoadBalancer"))
        .then_some(ingress)
        .flatten()
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone());
    let lb_addrs: BTreeSet<IpAddr> = from_lb.clone().filter_map(|a| a.parse().ok()).collect();
    let mut addresses = BTreeSet::new();
    for a in from_lb.chain(spec.external_ips.iter().flatten().cloned()) {
        let Ok(ip) = a.parse::<IpAddr>() else {
            let message = format!("{a:?} is not an IP address: skipped");
            event(true, "InvalidAddress", message);
            continue;
        };
        if (ip.is_ipv4() && !settings.source_v4) || (ip.is_ipv6() && !settings.source_v6) {
            let (family, v) = if ip.is_ipv4() {
                ("IPv4", 4)
            } else {
                ("IPv6", 6)
            };
            let message = format!(
                "{ip}: this node has no {family} address to translate from (node.source_v{v} or HOST_IPS): not served here"
            );
            event(true, "NoNodeAddress", message);
            continue;
        }
        addresses.insert(ip);
    }
    (addresses, lb_addrs)
}

/// The client affinity timeout of a Service's VIPs: its policy's `sessionPersistence`, else
/// `sessionAffinity: ClientIP` (0: none).
fn affinity_of(spec: &ServiceSpec, effect: &Effect) -> u32 {
    if let Some(t) = effect.affinity_timeout_s {
        return t;
    }
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return 0;
    }
    let t = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .map_or(DEFAULT_AFFINITY_TIMEOUT_S, |t| t.max(1) as u32);
    t.min(MAX_AFFINITY_TIMEOUT.as_secs() as u32)
}

/// A Service port's protocol and number, if lb balances it (else an event says why not).
fn port_of(
    sp: &ServicePort,
    event: &mut impl FnMut(bool, &str, String),
) -> Option<(Protocol, u16)> {
    let proto = match protocol_of(sp) {
        Ok(p) => p,
        Err(other) => {
            let message = format!(
                "port {}: protocol {other} is not balanced by lb (TCP and UDP are)",
                sp.port
            );
            event(true, "UnsupportedProtocol", message);
            return None;
        }
    };
    let Some(port) = u16::try_from(sp.port).ok().filter(|p| *p > 0) else {
        let message = format!("port {} is not a port: skipped", sp.port);
        event(true, "InvalidPort", message);
        return None;
    };
    Some((proto, port))
}

/// What every VIP of one Service shares.
struct Shared<'a> {
    skey: &'a ObjectKey,
    slices: &'a [&'a EndpointSlice],
    effect: Effect,
    affinity_timeout_s: u32,
    source_ranges: Option<Vec<crate::model::desired::Cidr>>,
    /// The load balancer's own addresses: the ones `source_ranges` restrict.
    lb_addrs: BTreeSet<IpAddr>,
    new_flow_budget: Option<crate::model::desired::Budget>,
    /// `lb.dev/backend-weights`.
    weights: BTreeMap<IpAddr, u32>,
    /// `externalTrafficPolicy: Local`.
    local: bool,
}

impl Shared<'_> {
    /// The VIP of Service port `sp` on `addr`, or the event that says why it is not served.
    fn vip(
        &self,
        sp: &ServicePort,
        (protocol, port): (Protocol, u16),
        addr: IpAddr,
        settings: &Settings,
        skipped: &mut Vec<String>,
    ) -> Result<VipConfig, (&'static str, String)> {
        let (skey, effect) = (self.skey, &self.effect);
        let v4 = addr.is_ipv4();
        let local_node = self.local.then_some(settings.node_name.as_str());
        let backends = endpoints(self.slices, sp, v4, local_node, &skey.0, skipped);
        // As kube-proxy: hints shape cluster-wide traffic, not a Local policy's.
        let mut backups = if self.local {
            BTreeMap::new()
        } else {
            let here = Place {
                node: &settings.node_name,
                zone: settings.zone.as_deref(),
            };
            topology::backups(self.slices, sp, v4, here)
        };
        let backends: Vec<BackendSpec> = backends
            .into_iter()
            .map(|((address, port), weight)| {
                let weight = self.weights.get(&address).copied().unwrap_or(weight);
                let b = BackendSpec::new(address, port, weight);
                match backups.remove(&(address, port)) {
                    Some(why) => b.backup(why),
                    None => b,
                }
            })
            .collect();
        let vip = VipSpec {
            name: match &sp.name {
                Some(n) if !n.is_empty() => format!("{}/{}:{n}", skey.0, skey.1),
                _ => format!("{}/{}", skey.0, skey.1),
            },
            address: addr,
            port,
            protocol,
            mode: Mode::Nat,
            hash: effect.hash,
            affinity_timeout_s: self.affinity_timeout_s,
            table_size: effect.table_size,
            backends,
            source_ranges: self
                .source_ranges
                .clone()
                .filter(|_| self.lb_addrs.contains(&addr)),
            new_flow_budget: self.new_flow_budget,
            port_range: None,
            algorithm: effect.algorithm,
        };
        let m = effect.table_size.unwrap_or(settings.table_size);
        if vip.backends.len() > m as usize {
            let message = format!(
                "{}: {} endpoints do not fit a table of {m} slots: VIP not served",
                vip.label(),
                vip.backends.len()
            );
            return Err(("TooManyEndpoints", message));
        }
        Ok(VipConfig {
            spec: vip,
            health_check: effect.health_check.clone(),
            passive_health: effect
                .passive_health
                .clone()
                .filter(|_| protocol == Protocol::Tcp),
            health_threshold: effect.health_threshold,
        })
    }
}

/// The VIPs claimed so far: first come (in namespace/name order) first served, within the
/// sizes the program was loaded with.
#[derive(Default)]
struct Claims {
    taken: BTreeMap<lb_common::VipKey, String>,
    /// `max_backends` counts memberships: a backend takes a member id per VIP it serves.
    members: usize,
}

impl Claims {
    /// Claims Service `skey`'s `vips` that no Service before it holds, if they all fit.
    fn claim(
        &mut self,
        vips: Vec<VipConfig>,
        skey: &ObjectKey,
        settings: &Settings,
        out: &mut Translation,
    ) {
        let mut event = |reason: &str, message: String| {
            out.events.push(ServiceEvent {
                service: skey.clone(),
                warning: true,
                reason: reason.into(),
                message,
            })
        };
        let mut mine = Vec::new();
        for v in vips {
            match self.taken.get(&v.spec.key()) {
                Some(owner) => event(
                    "AddressConflict",
                    format!(
                        "{} is already served for Service {owner}: not served for this one",
                        v.spec.label()
                    ),
                ),
                None => mine.push(v),
            }
        }
        let new_members: usize = mine.iter().map(|v| v.spec.backends.len()).sum();
        if out.vips.len() + mine.len() > settings.max_vips as usize
            || self.members + new_members > settings.max_backends as usize
        {
            if !mine.is_empty() {
                event(
                    "CapacityExceeded",
                    format!(
                        "{} VIP(s) with {} backend(s) do not fit this node's max_vips {} / max_backends {} (a backend counts once per VIP): not served",
                        mine.len(),
                        new_members,
                        settings.max_vips,
                        settings.max_backends
                    ),
                );
            }
            return;
        }
        for v in &mine {
            self.taken.insert(v.spec.key(), label(skey));
        }
        self.members += new_members;
        if let Some(o) = out.services.get_mut(skey) {
            o.vips = mine.iter().map(|v| v.spec.label()).collect();
            o.vips.sort();
        }
        out.vips.extend(mine);
    }
}

/// A Service's source ranges: `spec.loadBalancerSourceRanges`, else the annotation
/// ([`SOURCE_RANGES_ANNOTATION`]), as Kubernetes reads them (host bits cleared). None: every
/// source. An entry that is not a CIDR is left out with a warning event; if none is left, the
/// Service's VIPs take no source at all (the Service asked for a restriction: lb does not
/// widen it to everyone).
pub fn source_ranges_of(
    svc: &Service,
    event: &mut impl FnMut(bool, &str, String),
) -> Option<Vec<crate::model::desired::Cidr>> {
    let from_spec: Vec<String> = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|r| !r.trim().is_empty())
        .collect();
    let (raw, origin) = if !from_spec.is_empty() {
        (from_spec, "spec.loadBalancerSourceRanges")
    } else {
        let a = svc.annotations().get(SOURCE_RANGES_ANNOTATION)?;
        let r: Vec<String> = a
            .split(',')
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
            .collect();
        (r, SOURCE_RANGES_ANNOTATION)
    };
    if raw.is_empty() {
        return None;
    }
    let mut out: Vec<crate::model::desired::Cidr> = Vec::new();
    for r in &raw {
        match crate::model::desired::Cidr::parse(r.trim(), false) {
            Ok(c) if !out.contains(&c) => out.push(c),
            Ok(_) => {}
            Err(e) => event(
                true,
                "InvalidSourceRange",
                format!("{origin}: {e}: left out"),
            ),
        }
    }
    if out.is_empty() {
        event(
            true,
            "InvalidSourceRange",
            format!("{origin}: no valid range: the Service's VIPs take no source"),
        );
    }
    Some(out)
}

/// The port-range VIPs of a Service with [`PORT_RANGE_ANNOTATION`]: on each of its addresses,
/// one per protocol of its ports, whose backends are the endpoints of the first Service port of
/// that protocol, each packet going to the port it was sent to (backend port 0). The Service's
/// own ports stay exact VIPs, which win over the range. A health check that names no port of
/// its own is left out (a range has no one port to check).
fn range_vips(
    shared: &Shared<'_>,
    ports: &[ServicePort],
    range: crate::model::desired::PortRange,
    addresses: &BTreeSet<IpAddr>,
    settings: &Settings,
    skipped: &mut Vec<String>,
) -> Vec<Result<VipConfig, (&'static str, String)>> {
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for sp in ports {
        let Ok(proto) = protocol_of(sp) else {
            continue;
        };
        if !done.insert(proto) {
            continue;
        }
        for addr in addresses {
            out.push(
                shared
                    .vip(sp, (proto, 0), *addr, settings, skipped)
                    .map(|mut v| {
                        v.spec.port_range = Some(range);
                        v.spec.name = format!("{}:{range}", v.spec.name);
                        for b in &mut v.spec.backends {
                            b.port = 0;
                        }
                        let mut seen = BTreeSet::new();
                        v.spec.backends.retain(|b| seen.insert(b.address));
                        v.health_check = v.health_check.filter(|h| h.port != 0);
                        v
                    }),
            );
        }
    }
    out
}

/// A Service's new-flow budget, from [`NEW_FLOW_BUDGET_ANNOTATION`] (`rate=N[,burst=M]`, both
/// more than 0, burst the rate if absent), for every VIP of the Service. An annotation that does
/// not read is ignored with a warning event: no budget (a typo must not refuse every new flow).
pub fn new_flow_budget_of(
    svc: &Service,
    event: &mut impl FnMut(bool, &str, String),
) -> Option<crate::model::desired::Budget> {
    let raw = svc.annotations().get(NEW_FLOW_BUDGET_ANNOTATION)?;
    match parse_budget(raw) {
        Ok(b) => Some(b),
        Err(e) => {
            event(
                true,
                "InvalidNewFlowBudget",
                format!("{NEW_FLOW_BUDGET_ANNOTATION}: {raw:?}: {e}: no budget"),
            );
            None
        }
    }
}

/// The weights [`BACKEND_WEIGHTS_ANNOTATION`] gives endpoints of `svc`, by address. An
/// annotation that does not read is ignored as a whole, with a warning event: the endpoints keep
/// their weights.
pub fn backend_weights_of(
    svc: &Service,
    event: &mut impl FnMut(bool, &str, String),
) -> BTreeMap<std::net::IpAddr, u32> {
    let Some(raw) = svc.annotations().get(BACKEND_WEIGHTS_ANNOTATION) else {
        return BTreeMap::new();
    };
    let parse = |part: &str| -> Result<(std::net::IpAddr, u32), String> {
        let (a, w) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not ADDRESS=WEIGHT (like 10.0.1.5=0)"))?;
        let a = a
            .trim()
            .parse()
            .map_err(|_| format!("{:?} is not an address", a.trim()))?;
        let w = w.trim().parse().ok().filter(|w| *w <= 65_535);
        Ok((
            a,
            w.ok_or_else(|| format!("{part:?}: the weight must be 0..=65535"))?,
        ))
    };
    let parts = raw.split(',').map(str::trim).filter(|p| !p.is_empty());
    match parts.map(parse).collect::<Result<BTreeMap<_, _>, _>>() {
        Ok(w) => w,
        Err(e) => {
            event(
                true,
                "InvalidBackendWeights",
                format!(
                    "{BACKEND_WEIGHTS_ANNOTATION}: {raw:?}: {e}: the endpoints keep their weights"
                ),
            );
            BTreeMap::new()
        }
    }
}

/// `rate=2000,burst=500` (spaces allowed around each part; burst optional).
fn parse_budget(raw: &str) -> Result<crate::model::desired::Budget, String> {
    let (mut rate, mut burst) = (None, None);
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not key=value (like rate=2000,burst=500)"))?;
        let n: u64 = v
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=crate::sources::config::MAX_BUDGET_RATE as u64).contains(n))
            .ok_or_else(|| {
                format!(
                    "{}: {:?} must be 1..={}",
                    k.trim(),
                    v.trim(),
                    crate::sources::config::MAX_BUDGET_RATE
                )
            })?;
        match k.trim() {
            "rate" => rate = Some(n),
            "burst" => burst = Some(n),
            other => return Err(format!("{other:?} is neither rate nor burst")),
        }
    }
    let rate = rate.ok_or("no rate (like rate=2000,burst=500)")?;
    Ok(crate::model::desired::Budget {
        rate,
        burst: burst.unwrap_or(rate),
    })
}

/// Whether `svc` is the LoadBalancer Service lb made for a Gateway: it only asks for the
/// Gateway's addresses, and the Gateway's listeners serve them.
pub fn owned_by_gateway(svc: &Service) -> bool {
    svc.owner_references()
        .iter()
        .any(|o| o.kind == "Gateway" && o.api_version.starts_with("gateway.networking.k8s.io/"))
}

/// The UpstreamPolicy a Service names, if any: (namespace, name).
pub fn policy_of(svc: &Service) -> Option<ObjectKey> {
    svc.annotations()
        .get(POLICY_ANNOTATION)
        .map(|p| (svc.namespace().unwrap_or_default(), p.clone()))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn settings() -> Settings {
        Settings {
            class: DEFAULT_CLASS.into(),
            node_name: "node-a".into(),
            zone: None,
            table_size: 1009,
            max_vips: 64,
            max_backends: 64,
            source_v4: true,
            source_v6: true,
        }
    }

    fn service(name: &str, extra: Value) -> Service {
        let mut v = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "namespace": "shop", "name": name, "labels": { CLASS_LABEL: DEFAULT_CLASS } },
            "spec": {
                "type": "LoadBalancer",
                "ports": [
                    { "name": "http", "port": 80, "targetPort": "web", "protocol": "TCP" },
                    { "name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP" }
                ]
            },
            "status": { "loadBalancer": { "ingress": [ { "ip": "192.0.2.10" }, { "ip": "2001:db8::10" } ] } }
        });
        json_patch::merge(&mut v, &extra);
        serde_json::from_value(v).unwrap()
    }

    /// Endpoints as (address, node, ready, serving, terminating).
    fn slice(
        svc: &str,
        name: &str,
        family: &str,
        eps: &[(&str, &str, bool, bool, bool)],
    ) -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": { "namespace": "shop", "name": name, "labels": { SERVICE_NAME_LABEL: svc } },
            "addressType": family,
            "ports": [ { "name": "http", "port": 8080, "protocol": "TCP" }, { "name": "dns", "port": 5353, "protocol": "UDP" } ],
            "endpoints": eps.iter().map(|(a, node, r, s, t)| json!({
                "addresses": [a], "nodeName": node,
                "conditions": { "ready": r, "serving": s, "terminating": t }
            })).collect::<Vec<_>>()
        }))
        .unwrap()
    }

    fn policy(name: &str, spec: Value) -> UpstreamPolicy {
        serde_json::from_value(json!({
            "apiVersion": "lb.dev/v1alpha1", "kind": "UpstreamPolicy",
            "metadata": { "namespace": "shop", "name": name, "generation": 3 },
            "spec": spec
        }))
        .unwrap()
    }

    fn objects() -> Objects {
        Objects {
            services: vec![service("web", json!({}))],
            slices: vec![
                slice(
                    "web",
                    "web-v4a",
                    "IPv4",
                    &[
                        ("10.0.1.1", "node-a", true, true, false),
                        ("10.0.1.2", "node-b", true, true, false),
                    ],
                ),
                slice(
                    "web",
                    "web-v4b",
                    "IPv4",
                    &[
                        ("10.0.1.3", "node-b", false, true, true),   // draining
                        ("10.0.1.4", "node-a", false, false, false), // not ready
                        ("10.0.1.1", "node-a", true, true, false),   // also in web-v4a
                    ],
                ),
                slice(
                    "web",
                    "web-v6",
                    "IPv6",
                    &[("fd00::1", "node-b", true, true, false)],
                ),
            ],
            policies: vec![],
            invalid_policies: vec![],
        }
    }

    fn vip<'a>(t: &'a Translation, label: &str) -> &'a VipConfig {
        t.vips
            .iter()
            .find(|v| v.spec.label() == label)
            .unwrap_or_else(|| {
                panic!(
                    "no VIP {label} in {:?}",
                    t.vips.iter().map(|v| v.spec.label()).collect::<Vec<_>>()
                )
            })
    }

    fn backends(v: &VipConfig) -> Vec<(String, u16, u32)> {
        v.spec
            .backends
            .iter()
            .map(|b| (b.address.to_string(), b.port, b.weight))
            .collect()
    }

    #[test]
    fn a_dual_stack_service_becomes_one_nat_vip_per_address_port_and_protocol() {
        let t = Translator::default().translate(&objects(), &settings());
        assert_eq!(t.vips.len(), 4, "2 addresses x 2 ports");
        let http = vip(&t, "192.0.2.10:80/tcp");
        assert_eq!(http.spec.name, "shop/web:http");
        assert_eq!(http.spec.mode, Mode::Nat);
        assert_eq!(http.spec.hash, HashOn::FiveTuple);
        assert_eq!(http.spec.affinity_timeout_s, 0);
        assert_eq!(
            backends(http),
            [
                ("10.0.1.1".into(), 8080, 1),
                ("10.0.1.2".into(), 8080, 1),
                ("10.0.1.3".into(), 8080, 0),
            ],
            "ready endpoints active, the terminating one draining, the unready one gone, \
             the named target port resolved through the slices"
        );
        assert_eq!(
            backends(vip(&t, "192.0.2.10:53/udp")),
            [
                ("10.0.1.1".into(), 5353, 1),
                ("10.0.1.2".into(), 5353, 1),
                ("10.0.1.3".into(), 5353, 0),
            ]
        );
        assert_eq!(
            backends(vip(&t, "[2001:db8::10]:80/tcp")),
            [("fd00::1".into(), 8080, 1)],
            "IPv6 addresses take the IPv6 slices"
        );
        assert!(t.events.is_empty(), "{:?}", t.events);
    }

    #[test]
    fn class_label_external_ips_and_addresses() {
        let mut o = objects();
        o.services = vec![
            service(
                "other",
                json!({ "metadata": { "labels": { CLASS_LABEL: "someone-else" } } }),
            ),
            service(
                "ext",
                json!({ "spec": { "type": "ClusterIP", "externalIPs": ["198.51.100.7", "not-an-ip"] } }),
            ),
            service("pending", json!({ "status": null })),
        ];
        let t = Translator::default().translate(&o, &settings());
        let labels: Vec<String> = t.vips.iter().map(|v| v.spec.label()).collect();
        assert_eq!(
            labels,
            ["198.51.100.7:80/tcp", "198.51.100.7:53/udp"],
            "another class is ignored, a ClusterIP Service's load-balancer status is not an address, \
             a LoadBalancer without ingress has none yet"
        );
        assert_eq!(t.events.len(), 1);
        assert_eq!(t.events[0].reason, "InvalidAddress");
        assert!(t.events[0].message.contains("not-an-ip"));
    }

    #[test]
    fn session_affinity_and_external_traffic_policy() {
        let mut o = objects();
        o.services = vec![
            service(
                "web",
                json!({ "spec": { "sessionAffinity": "ClientIP", "externalTrafficPolicy": "Local" } }),
            ),
            service(
                "timed",
                json!({
                    "spec": { "sessionAffinity": "ClientIP", "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 600 } } },
                    "status": { "loadBalancer": { "ingress": [ { "ip": "192.0.2.11" } ] } }
                }),
            ),
        ];
        let t = Translator::default().translate(&o, &settings());
        let web = vip(&t, "192.0.2.10:80/tcp");
        assert_eq!(web.spec.affinity_timeout_s, DEFAULT_AFFINITY_TIMEOUT_S);
        assert_eq!(
            backends(web),
            [("10.0.1.1".into(), 8080, 1)],
            "Local: only this node's endpoints"
        );
        assert!(
            vip(&t, "[2001:db8::10]:80/tcp").spec.backends.is_empty(),
            "Local with no endpoint here: the VIP exists and drops (counted)"
        );
        assert_eq!(vip(&t, "192.0.2.11:80/tcp").spec.affinity_timeout_s, 600);
    }

    fn with_policy(spec: Value) -> (Objects, Translation) {
        let mut o = objects();
        o.services = vec![service(
            "web",
            json!({ "metadata": { "annotations": { POLICY_ANNOTATION: "p" } } }),
        )];
        o.policies = vec![policy("p", spec)];
        let t = Translator::default().translate(&o, &settings());
        (o, t)
    }

    #[test]
    fn policies_hash_on_the_client_address_or_fall_back_to_it() {
        let (_, t) = with_policy(
            json!({ "algorithm": "consistent-hashing", "hashOn": { "input": "ip" }, "slots": 251 }),
        );
        let v = vip(&t, "192.0.2.10:80/tcp");
        assert_eq!(
            (v.spec.hash, v.spec.table_size),
            (HashOn::SourceIp, Some(251))
        );
        let verdict = &t.policies[&("shop".into(), "p".into())];
        assert!(verdict.accepted.ok);
        assert_eq!(verdict.accepted.reason, "Accepted");
        assert_eq!(verdict.services, ["shop/web"]);
        assert_eq!(verdict.generation, Some(3));

        let (_, t) = with_policy(
            json!({ "algorithm": "consistent-hashing", "hashOn": { "header": "x-user" }, "hashOnFallback": { "input": "ip" } }),
        );
        assert_eq!(vip(&t, "192.0.2.10:80/tcp").spec.hash, HashOn::SourceIp);
        let a = &t.policies[&("shop".into(), "p".into())].accepted;
        assert!(a.ok);
        assert_eq!(a.reason, "AcceptedWithFallback");
        assert!(
            a.message.contains("header \"x-user\" cannot be seen at L4"),
            "{}",
            a.message
        );
        assert!(t.events.is_empty());
    }

    #[test]
    fn an_unusable_policy_is_rejected_with_its_reason_and_the_service_keeps_serving() {
        for (spec, reason, says) in [
            (
                json!({ "algorithm": "consistent-hashing", "hashOn": { "cookie": "session" } }),
                "NoUsableHash",
                "no hashOnFallback",
            ),
            (
                json!({ "algorithm": "consistent-hashing", "hashOn": { "header": "a" }, "hashOnFallback": { "input": "path" } }),
                "NoUsableHash",
                "nor can hashOnFallback input: path",
            ),
            (
                json!({ "slots": 5 }),
                "InvalidSlots",
                "slots 5 is outside Kong's range 10..65536",
            ),
            (
                json!({ "healthchecks": { "threshold": 150 } }),
                "InvalidHealthcheck",
                "threshold 150 is not a percentage",
            ),
            (
                json!({ "healthchecks": { "active": { "type": "http", "headers": { "x bad": ["1"] } } } }),
                "InvalidHealthcheck",
                "\"x bad\" is not a header name",
            ),
            (
                json!({ "algorithm": "latency" }),
                "UnsupportedAlgorithm",
                "latency is not supported yet",
            ),
            (
                json!({ "healthchecks": { "active": { "type": "grpc" } } }),
                "UnsupportedHealthcheck",
                "grpc",
            ),
            (
                json!({ "hashOn": { "header": "a", "input": "ip" } }),
                "InvalidHashOn",
                "only one",
            ),
        ] {
            let (_, t) = with_policy(spec.clone());
            let a = &t.policies[&("shop".into(), "p".into())].accepted;
            assert!(!a.ok, "{spec} accepted");
            assert_eq!(a.reason, reason, "{spec}");
            assert!(a.message.contains(says), "{spec}: {}", a.message);
            assert!(
                a.message.ends_with("its Services use the defaults"),
                "{}",
                a.message
            );
            let v = vip(&t, "192.0.2.10:80/tcp");
            assert_eq!((v.spec.hash, v.spec.table_size), (HashOn::FiveTuple, None));
            assert_eq!(v.spec.backends.len(), 3, "the Service is served regardless");
            assert_eq!(t.events.len(), 1);
            assert_eq!(t.events[0].reason, "PolicyRejected");
            assert!(t.events[0].message.contains(says));
        }
    }

    #[test]
    fn a_policy_edited_into_something_invalid_keeps_its_last_accepted_effect() {
        let (mut o, _) = with_policy(json!({}));
        let mut tr = Translator::default();
        o.policies = vec![policy(
            "p",
            json!({ "hashOn": { "input": "ip" }, "slots": 251 }),
        )];
        let t = tr.translate(&o, &settings());
        assert_eq!(vip(&t, "192.0.2.10:80/tcp").spec.table_size, Some(251));
        o.policies = vec![policy(
            "p",
            json!({ "hashOn": { "input": "ip" }, "slots": 5 }),
        )];
        let t = tr.translate(&o, &settings());
        let v = vip(&t, "192.0.2.10:80/tcp");
        assert_eq!(
            (v.spec.hash, v.spec.table_size),
            (HashOn::SourceIp, Some(251))
        );
        assert!(
            t.policies[&("shop".into(), "p".into())]
                .accepted
                .message
                .ends_with("keep the last accepted version")
        );
        // Deleted, then back invalid: nothing to keep any more.
        o.policies.clear();
        let t = tr.translate(&o, &settings());
        assert_eq!(t.events[0].reason, "PolicyNotFound");
        assert_eq!(vip(&t, "192.0.2.10:80/tcp").spec.table_size, None);
        o.policies = vec![policy("p", json!({ "slots": 5 }))];
        let t = tr.translate(&o, &settings());
        assert_eq!(vip(&t, "192.0.2.10:80/tcp").spec.table_size, None);
    }

    #[test]
    fn health_checks_map_to_the_agents_checks() {
        let (_, t) = with_policy(json!({ "healthchecks": {
            "active": { "type": "http", "httpPath": "/healthz", "timeout": 2,
                        "healthy": { "interval": 5, "successes": 2, "httpStatuses": [200, 204] },
                        "unhealthy": { "httpFailures": 4, "timeouts": 3 } },
            "passive": { "unhealthy": { "tcpFailures": 5, "timeouts": 2 } } } }));
        let http = vip(&t, "192.0.2.10:80/tcp");
        let h = http.health_check.as_ref().unwrap();
        assert_eq!(
            h.kind,
            CheckKind::Http {
                path: "/healthz".into(),
                statuses: vec![200, 204],
                headers: Vec::new(),
                tls: None,
            }
        );
        assert_eq!(
            (h.interval, h.timeout),
            (Duration::from_secs(5), Duration::from_secs(2))
        );
        assert_eq!((h.healthy_threshold, h.unhealthy_threshold), (2, 3));
        assert_eq!(
            h.port_for(&http.spec, &http.spec.backends[0]),
            8080,
            "probes the pod's port"
        );
        assert_eq!(http.passive_health.as_ref().unwrap().failures, 2);
        assert!(
            vip(&t, "192.0.2.10:53/udp").passive_health.is_none(),
            "UDP has no connection attempts"
        );
    }

    #[test]
    fn conflicts_and_capacity_are_events_not_failures() {
        let mut o = objects();
        o.services.push(service("web-copy", json!({})));
        let t = Translator::default().translate(&o, &settings());
        assert_eq!(t.vips.len(), 4);
        assert!(
            t.vips.iter().all(|v| v.spec.name.starts_with("shop/web:")),
            "the first by name wins"
        );
        assert_eq!(t.events.len(), 4);
        assert!(
            t.events
                .iter()
                .all(|e| e.service.1 == "web-copy" && e.reason == "AddressConflict")
        );

        let t = Translator::default().translate(
            &objects(),
            &Settings {
                max_vips: 3,
                ..settings()
            },
        );
        assert!(t.vips.is_empty(), "a Service is served whole or not at all");
        assert_eq!(t.events[0].reason, "CapacityExceeded");
    }

    #[test]
    fn every_node_builds_the_same_tables_from_the_same_objects_in_any_order() {
        use crate::{
            model::desired::Desired,
            model::plan::{Limits, State, plan},
        };
        let mut a = objects();
        a.services.push(service(
            "api",
            json!({ "status": { "loadBalancer": { "ingress": [ { "ip": "192.0.2.20" } ] } } }),
        ));
        let mut b = a.clone();
        b.services.reverse();
        b.slices.reverse();
        for s in &mut b.slices {
            if let Some(eps) = s.endpoints.as_mut() {
                eps.reverse();
            }
        }
        let limits = Limits {
            table_size: 1009,
            max_vips: 64,
            max_backends: 64,
            cpus: 1,
        };
        let tables = |o: &Objects, node: &str| {
            let t = Translator::default().translate(
                o,
                &Settings {
                    node_name: node.into(),
                    ..settings()
                },
            );
            let d = Desired {
                node: Default::default(),
                vips: t.vips.into_iter().map(|v| v.spec).collect(),
            };
            plan(&State::default(), &d, limits).unwrap().1
        };
        let (sa, sb) = (tables(&a, "node-a"), tables(&b, "node-b"));
        assert_eq!(sa.vips, sb.vips);
        assert_eq!(sa.members, sb.members);
        assert_eq!(sa.rings, sb.rings, "Maglev tables differ between nodes");
    }

    #[test]
    fn a_service_means_what_the_same_config_file_vip_means() {
        let t = Translator::default().translate(&objects(), &settings());
        let from_k8s = vip(&t, "192.0.2.10:80/tcp");
        let file = crate::sources::config::Config::parse(
            r#"
node: { interfaces: [eth0], source_v4: 10.0.0.1, table_size: 1009 }
vips:
  - name: shop/web:http
    address: 192.0.2.10
    port: 80
    protocol: tcp
    mode: nat
    backends:
      - { address: 10.0.1.1, port: 8080, weight: 1 }
      - { address: 10.0.1.2, port: 8080, weight: 1 }
      - { address: 10.0.1.3, port: 8080, weight: 0 }
"#,
            "t",
        )
        .unwrap();
        assert_eq!(&file.vips[0], from_k8s);
    }

    #[test]
    fn a_policy_that_does_not_decode_is_invalid_and_keeps_the_last_accepted_effect() {
        let (mut o, _) = with_policy(json!({}));
        let mut tr = Translator::default();
        o.policies = vec![policy("p", json!({ "slots": 251 }))];
        tr.translate(&o, &settings());
        o.policies.clear();
        o.invalid_policies = vec![(
            ("shop".into(), "p".into()),
            Some(4),
            "spec.slots: invalid type".into(),
        )];
        let t = tr.translate(&o, &settings());
        assert_eq!(vip(&t, "192.0.2.10:80/tcp").spec.table_size, Some(251));
        let v = &t.policies[&("shop".into(), "p".into())];
        assert_eq!(
            (v.accepted.ok, v.accepted.reason.as_str(), v.generation),
            (false, "Invalid", Some(4))
        );
        assert!(
            v.accepted.message.contains("spec.slots: invalid type"),
            "{}",
            v.accepted.message
        );
        assert_eq!(
            t.events[0].reason, "PolicyRejected",
            "not PolicyNotFound: it exists"
        );
    }

    #[test]
    fn a_family_the_node_has_no_address_for_is_not_served() {
        let t = Translator::default().translate(
            &objects(),
            &Settings {
                source_v6: false,
                ..settings()
            },
        );
        assert_eq!(t.vips.len(), 2);
        assert!(t.vips.iter().all(|v| v.spec.address.is_ipv4()));
        assert_eq!(t.events.len(), 1);
        assert_eq!(t.events[0].reason, "NoNodeAddress");
    }

    fn ranges_of(t: &Translation, label: &str) -> Option<Vec<String>> {
        vip(t, label)
            .spec
            .source_ranges
            .as_ref()
            .map(|r| r.iter().map(|c| c.to_string()).collect())
    }

    fn translate_with(extra: Value) -> Translation {
        let mut o = objects();
        o.services = vec![service("web", extra)];
        Translator::default().translate(&o, &settings())
    }

    #[test]
    fn load_balancer_source_ranges_reach_every_vip_of_the_service() {
        let t = translate_with(json!({
            "spec": { "loadBalancerSourceRanges": ["198.51.100.0/24", "2001:db8:c::/48"] },
            // The spec field wins over the annotation.
            "metadata": { "annotations": { SOURCE_RANGES_ANNOTATION: "10.0.0.0/8" } }
        }));
        let want = Some(vec![
            "198.51.100.0/24".to_string(),
            "2001:db8:c::/48".into(),
        ]);
        for label in [
            "192.0.2.10:80/tcp",
            "192.0.2.10:53/udp",
            "[2001:db8::10]:80/tcp",
        ] {
            assert_eq!(ranges_of(&t, label), want, "{label}");
        }
        assert!(t.events.is_empty(), "{:?}", t.events);
    }

    #[test]
    fn the_annotation_gives_the_ranges_when_the_spec_field_does_not() {
        let t = translate_with(json!({
            "metadata": { "annotations": { SOURCE_RANGES_ANNOTATION: " 198.51.100.0/24 ,203.0.113.9/32," } }
        }));
        assert_eq!(
            ranges_of(&t, "192.0.2.10:80/tcp"),
            Some(vec!["198.51.100.0/24".to_string(), "203.0.113.9/32".into()])
        );
        let none = Translator::default().translate(&objects(), &settings());
        assert_eq!(
            ranges_of(&none, "192.0.2.10:80/tcp"),
            None,
            "no ranges: every source"
        );
    }

    #[test]
    fn invalid_source_ranges_are_left_out_with_an_event_and_none_valid_refuses_all() {
        let t = translate_with(json!({
            "spec": { "loadBalancerSourceRanges": ["198.51.100.1/24", "not-a-cidr", "10.0.0.0/40"] }
        }));
        // Host bits are cleared, as Kubernetes reads CIDRs.
        assert_eq!(
            ranges_of(&t, "192.0.2.10:80/tcp"),
            Some(vec!["198.51.100.0/24".to_string()])
        );
        let msgs: Vec<&str> = t
            .events
            .iter()
            .filter(|e| e.reason == "InvalidSourceRange")
            .map(|e| e.message.as_str())
            .collect();
        assert_eq!(
            msgs,
            [
                "spec.loadBalancerSourceRanges: \"10.0.0.0/40\": the prefix length must be 0..=32: left out",
                "spec.loadBalancerSourceRanges: \"not-a-cidr\" is not a CIDR (like 192.0.2.0/24 or 2001:db8::/32): left out",
            ]
        );
        let t = translate_with(json!({
            "metadata": { "annotations": { SOURCE_RANGES_ANNOTATION: "garbage" } }
        }));
        assert_eq!(ranges_of(&t, "192.0.2.10:80/tcp"), Some(vec![]));
        assert!(t.events.iter().any(|e| e.message
            == format!(
                "{SOURCE_RANGES_ANNOTATION}: no valid range: the Service's VIPs take no source"
            )));
    }

    #[test]
    fn source_ranges_restrict_the_load_balancers_addresses_not_external_ips() {
        let t = translate_with(json!({
            "spec": { "loadBalancerSourceRanges": ["198.51.100.0/24"], "externalIPs": ["192.0.2.77"] }
        }));
        assert_eq!(
            ranges_of(&t, "192.0.2.10:80/tcp"),
            Some(vec!["198.51.100.0/24".to_string()])
        );
        assert_eq!(ranges_of(&t, "192.0.2.77:80/tcp"), None);
    }

    #[test]
    fn the_port_range_annotation_adds_a_range_vip_per_protocol_to_the_same_endpoint_ports() {
        let t = translate_with(json!({
            "metadata": { "annotations": { PORT_RANGE_ANNOTATION: " 10000-10999 " } }
        }));
        let want = Some(crate::model::desired::PortRange {
            lo: 10000,
            hi: 10999,
        });
        for label in ["192.0.2.10:10000-10999/tcp", "192.0.2.10:10000-10999/udp"] {
            let v = vip(&t, label);
            assert_eq!(v.spec.port_range, want, "{label}");
            assert!(!v.spec.backends.is_empty(), "{label}: no endpoints");
            assert!(
                v.spec.backends.iter().all(|b| b.port == 0),
                "{label}: each packet keeps its port: {:?}",
                v.spec.backends
            );
        }
        // The Service's own ports stay exact VIPs (they win inside the range).
        assert_eq!(vip(&t, "192.0.2.10:80/tcp").spec.port_range, None);
        assert!(t.events.is_empty(), "{:?}", t.events);
    }

    #[test]
    fn an_invalid_port_range_annotation_is_a_warning_event_and_the_ports_stay_served() {
        let t = translate_with(json!({
            "metadata": { "annotations": { PORT_RANGE_ANNOTATION: "10999-10000" } }
        }));
        assert!(t.vips.iter().all(|v| v.spec.port_range.is_none()));
        assert_eq!(vip(&t, "192.0.2.10:80/tcp").spec.port, 80);
        let e: Vec<_> = t
            .events
            .iter()
            .map(|e| (e.warning, e.reason.as_str()))
            .collect();
        assert_eq!(e, [(true, "InvalidPortRange")], "{:?}", t.events);
        assert_eq!(
            t.events[0].message,
            "lb.dev/port-range: \"10999-10000\" is not a port range (like 10000-10999, first port <= last): no port range"
        );
    }

    #[test]
    fn a_port_range_annotation_that_stops_reading_keeps_the_last_good_range_serving() {
        let mut o = objects();
        let mut tr = Translator::default();
        let with = |a: &str| {
            service(
                "web",
                json!({ "metadata": { "annotations": { PORT_RANGE_ANNOTATION: a } } }),
            )
        };
        let served = |t: &Translation| {
            t.vips
                .iter()
                .any(|v| v.spec.label() == "192.0.2.10:10000-10999/tcp")
        };
        o.services = vec![with("10000-10999")];
        assert!(served(&tr.translate(&o, &settings())));
        o.services = vec![with("ten-thousand")];
        let bad = tr.translate(&o, &settings());
        assert!(served(&bad), "the last good range is no longer served");
        let m: Vec<_> = bad.events.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            m,
            [
                "lb.dev/port-range: \"ten-thousand\" is not a port range (like 10000-10999, first port <= last): the last good range, 10000-10999, keeps serving"
            ]
        );
        // Taken away: no range.
        o.services = vec![service("web", json!({}))];
        assert!(!served(&tr.translate(&o, &settings())));
    }

    fn budget_of(t: &Translation, label: &str) -> Option<crate::model::desired::Budget> {
        vip(t, label).spec.new_flow_budget
    }

    #[test]
    fn the_new_flow_budget_annotation_reaches_every_vip_of_the_service() {
        let t = translate_with(json!({
            "metadata": { "annotations": { NEW_FLOW_BUDGET_ANNOTATION: " rate=2000 , burst=500 " } },
            "spec": { "externalIPs": ["192.0.2.77"] }
        }));
        let want = Some(crate::model::desired::Budget {
            rate: 2000,
            burst: 500,
        });
        for label in [
            "192.0.2.10:80/tcp",
            "192.0.2.10:53/udp",
            "192.0.2.77:80/tcp",
        ] {
            assert_eq!(budget_of(&t, label), want, "{label}");
        }
        assert!(t.events.is_empty(), "{:?}", t.events);
        let t = translate_with(json!({
            "metadata": { "annotations": { NEW_FLOW_BUDGET_ANNOTATION: "rate=300" } }
        }));
        assert_eq!(
            budget_of(&t, "192.0.2.10:80/tcp"),
            Some(crate::model::desired::Budget {
                rate: 300,
                burst: 300
            }),
            "burst: the rate"
        );
        let none = Translator::default().translate(&objects(), &settings());
        assert_eq!(
            budget_of(&none, "192.0.2.10:80/tcp"),
            None,
            "no annotation: no budget"
        );
    }

    fn weight_in(t: &Translation, label: &str, backend: &str) -> u32 {
        let v = vip(t, label);
        let b = v
            .spec
            .backends
            .iter()
            .find(|b| b.address.to_string() == backend);
        b.unwrap_or_else(|| panic!("{label} has no backend {backend}"))
            .weight
    }

    #[test]
    fn the_backend_weights_annotation_drains_and_weighs_endpoints_of_every_vip() {
        let t = translate_with(json!({
            "metadata": { "annotations": { BACKEND_WEIGHTS_ANNOTATION: "10.0.1.1=0, 10.0.1.2 = 250," } }
        }));
        for label in ["192.0.2.10:80/tcp", "192.0.2.10:53/udp"] {
            assert_eq!(weight_in(&t, label, "10.0.1.1"), 0, "{label}");
            assert_eq!(weight_in(&t, label, "10.0.1.2"), 250, "{label}");
        }
        assert!(t.events.is_empty(), "{:?}", t.events);
        let plain = translate_with(json!({}));
        assert_eq!(
            weight_in(&plain, "192.0.2.10:80/tcp", "10.0.1.2"),
            1,
            "no annotation"
        );
    }

    #[test]
    fn an_invalid_backend_weights_annotation_keeps_the_weights_with_an_event() {
        for (raw, why) in [
            (
                "10.0.1.1=0,10.0.1.2",
                "\"10.0.1.2\" is not ADDRESS=WEIGHT (like 10.0.1.5=0)",
            ),
            ("pod-a=0", "\"pod-a\" is not an address"),
            (
                "10.0.1.1=70000",
                "\"10.0.1.1=70000\": the weight must be 0..=65535",
            ),
        ] {
            let t = translate_with(json!({
                "metadata": { "annotations": { BACKEND_WEIGHTS_ANNOTATION: raw } }
            }));
            assert_eq!(weight_in(&t, "192.0.2.10:80/tcp", "10.0.1.1"), 1, "{raw}");
            let msgs: Vec<&str> = t
                .events
                .iter()
                .filter(|e| e.reason == "InvalidBackendWeights" && e.warning)
                .map(|e| e.message.as_str())
                .collect();
            let want = format!(
                "{BACKEND_WEIGHTS_ANNOTATION}: {raw:?}: {why}: the endpoints keep their weights"
            );
            assert_eq!(msgs, [want.as_str()], "{raw}");
        }
    }

    #[test]
    fn an_invalid_new_flow_budget_annotation_is_no_budget_with_an_event() {
        for (raw, why) in [
            ("rate=0", "rate: \"0\" must be 1..=1000000000"),
            ("burst=5", "no rate (like rate=2000,burst=500)"),
            ("rate=10,brust=5", "\"brust\" is neither rate nor burst"),
            (
                "2000",
                "\"2000\" is not key=value (like rate=2000,burst=500)",
            ),
        ] {
            let t = translate_with(json!({
                "metadata": { "annotations": { NEW_FLOW_BUDGET_ANNOTATION: raw } }
            }));
            assert_eq!(budget_of(&t, "192.0.2.10:80/tcp"), None, "{raw}");
            let msgs: Vec<&str> = t
                .events
                .iter()
                .filter(|e| e.reason == "InvalidNewFlowBudget")
                .map(|e| e.message.as_str())
                .collect();
            assert!(
                msgs.contains(
                    &format!("{NEW_FLOW_BUDGET_ANNOTATION}: {raw:?}: {why}: no budget").as_str()
                ),
                "{raw}: {msgs:?}"
            );
        }
    }
}

#[cfg(test)]
mod persistence_tests {
    use serde_json::json;

    use super::*;

    fn judged(p: serde_json::Value) -> Result<(Effect, Vec<Note>), (&'static str, String)> {
        let spec: UpstreamPolicySpec =
            serde_json::from_value(json!({ "sessionPersistence": p })).unwrap();
        evaluate(&spec, 1009)
    }

    #[test]
    fn least_connections_is_accepted_and_gives_the_algorithm() {
        let spec: UpstreamPolicySpec =
            serde_json::from_value(json!({ "algorithm": "least-connections" })).unwrap();
        let (e, notes) = evaluate(&spec, 1009).unwrap();
        assert_eq!(
            e.algorithm,
            crate::model::desired::Algorithm::LeastConnections
        );
        assert!(notes.is_empty(), "{notes:?}");
        let spec: UpstreamPolicySpec =
            serde_json::from_value(json!({ "algorithm": "consistent-hashing" })).unwrap();
        assert_eq!(
            evaluate(&spec, 1009).unwrap().0.algorithm,
            crate::model::desired::Algorithm::Maglev
        );
    }

    #[test]
    fn client_ip_persistence_gives_its_idle_timeout_or_kubernetes_default() {
        let (e, notes) = judged(json!({ "type": "ClientIP", "idleTimeout": "1h30m" })).unwrap();
        assert_eq!((e.affinity_timeout_s, notes.len()), (Some(5400), 0));
        let (e, _) = judged(json!({ "type": "ClientIP" })).unwrap();
        assert_eq!(e.affinity_timeout_s, Some(DEFAULT_AFFINITY_TIMEOUT_S));
    }

    #[test]
    fn an_absolute_timeout_alone_is_applied_as_the_idle_timeout_and_says_so() {
        let (e, notes) = judged(json!({ "type": "ClientIP", "absoluteTimeout": "10m" })).unwrap();
        assert_eq!(e.affinity_timeout_s, Some(600));
        assert_eq!(notes[0].reason, "AcceptedWithFallback");
        assert!(
            notes[0].message.contains("absoluteTimeout 10m"),
            "{}",
            notes[0].message
        );
    }

    #[test]
    fn cookie_header_missing_types_and_bad_durations_are_refused_naming_the_field() {
        for (p, field) in [
            (
                json!({ "type": "Cookie" }),
                "sessionPersistence.type Cookie",
            ),
            (
                json!({ "type": "Header" }),
                "sessionPersistence.type Header",
            ),
            (json!({}), "sessionPersistence.type is required"),
            (
                json!({ "type": "ClientIP", "idleTimeout": "2d" }),
                "idleTimeout: \"2d\"",
            ),
            (
                json!({ "type": "ClientIP", "idleTimeout": "soon" }),
                "idleTimeout: \"soon\"",
            ),
        ] {
            let (reason, message) = judged(p).unwrap_err();
            assert_eq!(reason, "UnsupportedSessionPersistence");
            assert!(message.contains(field), "{message}");
        }
    }
}
