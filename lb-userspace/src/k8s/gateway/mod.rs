//! The Gateway API at L4: GatewayClasses whose controller is lb's, their Gateways' TCP and UDP
//! listeners, and the TCPRoutes and UDPRoutes attached to them become the same [`VipConfig`]s a
//! config file gives (one model): a VIP per (Gateway address, listener port, protocol), NAT mode,
//! whose backends are the ready endpoints of the backendRefs' Services.
//!
//! Pure and deterministic like the Service translation: every node computes the same VIPs and
//! the same statuses from the same objects. Split by concern: [`listeners`] (which listeners are
//! served, conflicts), [`attach`] (parentRefs to listeners), [`refs`] (backendRefs to Services,
//! ReferenceGrants), [`weights`] (shares to Maglev weights), [`status`] (what is written back).
//!
//! Several routes on one listener are all `Accepted` (and counted in `attachedRoutes`), but only
//! the oldest (creationTimestamp, then namespace/name) carries its traffic: at L4 nothing tells
//! their connections apart.

pub mod attach;
pub mod listeners;
pub mod refs;
pub mod status;
pub mod types;
pub mod weights;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::ResourceExt as _;
use serde_json::{Value, json};

use self::{
    attach::{NamespaceLabels, attach, names_gateway},
    listeners::Judged,
    refs::{Services, resolve, resolved_refs},
    status::{GatewayStatus, ListenerStatus, Update},
    types::{Gateway, GatewayClass, ReferenceGrant, Route},
    weights::{Share, member_weights},
};
use super::translate::{
    CLASS_LABEL, Cond, Effect, ObjectKey, Settings, cond, endpoints, policy_of,
};
use crate::{
    config::VipConfig,
    model::{BackendSpec, Mode, VipSpec},
};

/// The controller name lb answers to unless told otherwise (`--gateway-controller`).
pub const DEFAULT_CONTROLLER: &str = "lb.dev/gateway-controller";
/// Largest backendRef weight the Gateway API allows.
const MAX_WEIGHT: i32 = 1_000_000;
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The Gateway API objects, as the watchers hold them.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub classes: Vec<GatewayClass>,
    pub gateways: Vec<Gateway>,
    pub routes: Vec<Route>,
    pub grants: Vec<ReferenceGrant>,
    pub namespaces: NamespaceLabels,
}

/// What the Service translation left: the VIPs it took, and the policies' effects.
#[derive(Clone, Debug, Default)]
pub struct Room {
    pub taken: BTreeSet<lb_common::VipKey>,
    pub vips: usize,
    pub members: usize,
    pub effects: BTreeMap<ObjectKey, Option<Effect>>,
}

#[derive(Clone, Debug, Default)]
pub struct Output {
    pub vips: Vec<VipConfig>,
    pub updates: Vec<Update>,
    /// The LoadBalancer Services to apply (server-side) for Gateways without `spec.addresses`.
    pub lb_services: Vec<Value>,
    /// Policies not applied to a route because its backend Services name different ones:
    /// policy -> why.
    pub policy_conflicts: BTreeMap<ObjectKey, Vec<String>>,
}

/// The name of the LoadBalancer Service lb makes for Gateway `name`.
pub fn lb_service_name(gateway: &str) -> String {
    format!("{gateway}-lb")
}

fn key_of(ns: Option<String>, name: String) -> ObjectKey {
    (ns.unwrap_or_default(), name)
}

/// Translates the Gateway API objects for `controller`, after the Services took `room`.
pub fn translate(
    o: &Objects,
    services: &[Service],
    slices: &[EndpointSlice],
    settings: &Settings,
    controller: &str,
    mut room: Room,
) -> Output {
    let mut out = Output::default();
    let mut classes: Vec<&GatewayClass> = o
        .classes
        .iter()
        .filter(|c| c.spec.controller_name == controller)
        .collect();
    classes.sort_by_key(|c| c.name_any());
    let ours: BTreeSet<String> = classes.iter().map(|c| c.name_any()).collect();
    for c in classes {
        out.updates.push(Update::Class {
            name: c.name_any(),
            generation: c.metadata.generation,
            conditions: vec![
                cond("Accepted", true, "Accepted", format!("served by {controller}")),
                cond(
                    "SupportedVersion",
                    true,
                    "SupportedVersion",
                    "lb reads Gateway, TCPRoute and UDPRoute v1 (and v1alpha2 routes), ReferenceGrant v1beta1",
                ),
            ],
        });
    }

    let by_key: Services = services
        .iter()
        .map(|s| (key_of(s.namespace(), s.name_any()), s))
        .collect();
    let mut svc_slices: BTreeMap<ObjectKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if let Some(svc) = s.labels().get(SERVICE_NAME_LABEL) {
            svc_slices
                .entry((s.namespace().unwrap_or_default(), svc.clone()))
                .or_default()
                .push(s);
        }
    }
    for v in svc_slices.values_mut() {
        v.sort_by_key(|s| s.name_any());
    }

    // Oldest first: the first route on a listener carries its traffic.
    let mut routes: Vec<&Route> = o.routes.iter().collect();
    routes.sort_by_key(|r| {
        (
            r.meta.creation_timestamp.clone(),
            r.meta.namespace.clone(),
            r.meta.name.clone(),
            r.kind,
        )
    });
    // Each route's parents status, in the route's order.
    let mut parents: BTreeMap<usize, Vec<(types::ParentRef, Vec<Cond>)>> = BTreeMap::new();
    let resolved: Vec<Vec<refs::Resolved<'_>>> = routes
        .iter()
        .map(|r| {
            r.spec
                .rules
                .iter()
                .flat_map(|rule| &rule.backend_refs)
                .map(|b| resolve(r, b, &by_key, &o.grants))
                .collect()
        })
        .collect();

    let mut gateways: Vec<&Gateway> = o
        .gateways
        .iter()
        .filter(|g| ours.contains(&g.spec.gateway_class_name))
        .collect();
    gateways.sort_by_key(|g| key_of(g.namespace(), g.name_any()));
    let effects = std::mem::take(&mut room.effects);
    for gw in gateways {
        let ctx = GatewayCtx {
            gw,
            routes: &routes,
            resolved: &resolved,
            by_key: &by_key,
            slices: &svc_slices,
            settings,
            effects: &effects,
        };
        ctx.translate(o, &mut parents, &mut room, &mut out);
    }

    for (i, p) in parents {
        let r = routes[i];
        out.updates.push(Update::Route {
            kind: r.kind,
            key: key_of(
                r.meta.namespace.clone(),
                r.meta.name.clone().unwrap_or_default(),
            ),
            generation: r.meta.generation,
            parents: p,
        });
    }
    out
}

struct GatewayCtx<'a> {
    gw: &'a Gateway,
    routes: &'a [&'a Route],
    resolved: &'a [Vec<refs::Resolved<'a>>],
    by_key: &'a Services<'a>,
    slices: &'a BTreeMap<ObjectKey, Vec<&'a EndpointSlice>>,
    settings: &'a Settings,
    effects: &'a BTreeMap<ObjectKey, Option<Effect>>,
}

impl GatewayCtx<'_> {
    fn key(&self) -> ObjectKey {
        key_of(self.gw.namespace(), self.gw.name_any())
    }

    fn translate(
        &self,
        o: &Objects,
        parents: &mut BTreeMap<usize, Vec<(types::ParentRef, Vec<Cond>)>>,
        room: &mut Room,
        out: &mut Output,
    ) {
        let (gw_ns, gw_name) = self.key();
        let judged = listeners::judge(&self.gw.spec.listeners);
        // Attach routes; every parentRef naming this Gateway gets a parents entry.
        let mut attached: Vec<Vec<usize>> = vec![Vec::new(); judged.len()];
        for (i, r) in self.routes.iter().enumerate() {
            let route_ns = r.meta.namespace.clone().unwrap_or_default();
            for p in &r.spec.parent_refs {
                if !names_gateway(p, &route_ns, &gw_ns, &gw_name) {
                    continue;
                }
                let accepted = match attach(r, p, self.gw, &judged, &o.namespaces) {
                    Ok(ls) => {
                        for l in ls {
                            if !attached[l].contains(&i) {
                                attached[l].push(i);
                            }
                        }
                        cond("Accepted", true, "Accepted", "attached")
                    }
                    Err(c) => c,
                };
                parents
                    .entry(i)
                    .or_default()
                    .push((p.clone(), vec![accepted, resolved_refs(&self.resolved[i])]));
            }
        }

        let (addresses, address_cond) = self.addresses(out);
        let mut listener_status = Vec::new();
        let mut any_programmed = false;
        for (li, l) in judged.iter().enumerate() {
            let programmed = self.program(l, &attached[li], &addresses, room, out);
            any_programmed |= programmed.ok;
            listener_status.push(ListenerStatus {
                name: l.name.clone(),
                supported_kinds: l.kinds.clone(),
                attached_routes: attached[li].len() as u32,
                conditions: vec![
                    l.accepted.clone(),
                    l.conflicted.clone(),
                    l.resolved_refs.clone(),
                    programmed,
                ],
            });
        }
        let accepted = match (&address_cond, judged.iter().any(Judged::usable)) {
            (Err(c), _) => c.clone(),
            (Ok(_), false) => cond(
                "Accepted",
                false,
                "ListenersNotValid",
                "no listener lb can serve (TCP or UDP, without conflicts)",
            ),
            (Ok(_), true) => cond("Accepted", true, "Accepted", "served by lb"),
        };
        let programmed = match address_cond {
            Err(_) => cond("Programmed", false, "Invalid", "not accepted"),
            Ok(None) => cond("Programmed", true, "Programmed", "in the maps").with_ok(
                any_programmed,
                "Invalid",
                "no listener is in the maps",
            ),
            Ok(Some(c)) => c,
        };
        out.updates.push(Update::Gateway {
            key: (gw_ns, gw_name),
            generation: self.gw.metadata.generation,
            status: GatewayStatus {
                addresses,
                conditions: vec![accepted, programmed],
                listeners: listener_status,
            },
        });
    }

    /// The Gateway's addresses, and Ok(None), Ok(Some(Programmed=False)) while it has none yet,
    /// or Err(Accepted=False) for addresses lb cannot take.
    #[allow(clippy::type_complexity)]
    fn addresses(&self, out: &mut Output) -> (Vec<IpAddr>, Result<Option<Cond>, Cond>) {
        let spec = &self.gw.spec.addresses;
        if !spec.is_empty() {
            let mut addrs = Vec::new();
            for a in spec {
                let t = a.type_.as_deref().unwrap_or("IPAddress");
                match (t, a.value.parse::<IpAddr>()) {
                    ("IPAddress", Ok(ip)) => addrs.push(ip),
                    _ => {
                        return (
                            Vec::new(),
                            Err(cond(
                                "Accepted",
                                false,
                                "UnsupportedAddress",
                                format!(
                                    "address {:?} of type {t}: lb takes IPAddress addresses only",
                                    a.value
                                ),
                            )),
                        );
                    }
                }
            }
            addrs.sort();
            addrs.dedup();
            return (addrs, Ok(None));
        }
        // No addresses asked for: a LoadBalancer Service of lb's asks the cluster for them.
        let (ns, name) = self.key();
        if let Some(svc) = self.lb_service(&ns, &name) {
            out.lb_services.push(svc);
        }
        let mut addrs: Vec<IpAddr> = self
            .by_key
            .get(&(ns.clone(), lb_service_name(&name)))
            .and_then(|s| s.status.as_ref())
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref()?.parse().ok())
            .collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            let c = cond(
                "Programmed",
                false,
                "AddressNotAssigned",
                format!(
                    "waiting for an address on Service {ns}/{} (type LoadBalancer: MetalLB, a cloud or kube-vip fills it)",
                    lb_service_name(&name)
                ),
            );
            return (addrs, Ok(Some(c)));
        }
        (addrs, Ok(None))
    }

    /// The LoadBalancer Service (a server-side apply body) that asks for this Gateway's
    /// addresses, with a port per TCP/UDP listener.
    fn lb_service(&self, ns: &str, name: &str) -> Option<Value> {
        let mut ports: Vec<(u16, &str)> = listeners::judge(&self.gw.spec.listeners)
            .iter()
            .filter(|l| l.usable())
            .map(|l| {
                let p = if l.protocol == Some(crate::model::Protocol::Udp) {
                    "UDP"
                } else {
                    "TCP"
                };
                (l.port, p)
            })
            .collect();
        ports.sort();
        ports.dedup();
        if ports.is_empty() {
            return None;
        }
        let ports: Vec<Value> = ports
            .iter()
            .map(|(port, p)| json!({ "name": format!("{}-{port}", p.to_lowercase()), "port": port, "protocol": p }))
            .collect();
        Some(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": lb_service_name(name), "namespace": ns,
                "labels": { CLASS_LABEL: self.settings.class, "lb.dev/gateway": name },
                "ownerReferences": [ {
                    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "name": name,
                    "uid": self.gw.metadata.uid.clone().unwrap_or_default(), "controller": true,
                } ],
            },
            "spec": { "type": "LoadBalancer", "allocateLoadBalancerNodePorts": false, "ports": ports },
        }))
    }

    /// Puts listener `l`'s VIPs (one per address of a family the node serves) in `out`, the
    /// oldest of its `routes` carrying the traffic; its `Programmed` condition.
    fn program(
        &self,
        l: &Judged,
        routes: &[usize],
        addresses: &[IpAddr],
        room: &mut Room,
        out: &mut Output,
    ) -> Cond {
        let Some(protocol) = l.protocol.filter(|_| l.usable()) else {
            return cond("Programmed", false, "Invalid", "not accepted");
        };
        if addresses.is_empty() {
            return cond(
                "Programmed",
                false,
                "Pending",
                "the Gateway has no address yet",
            );
        }
        let carrier = routes.first().map(|&i| (self.routes[i], &self.resolved[i]));
        let (gw_ns, gw_name) = self.key();
        let mut mine = Vec::new();
        let mut skipped = Vec::new();
        for addr in addresses {
            if (addr.is_ipv4() && !self.settings.source_v4)
                || (addr.is_ipv6() && !self.settings.source_v6)
            {
                skipped.push(format!(
                    "{addr}: this node has no address of its family to translate from"
                ));
                continue;
            }
            let (backends, effect) = match carrier {
                Some((r, res)) => self.backends(r, res, addr.is_ipv4(), out),
                None => (Vec::new(), Effect::default()),
            };
            let spec = VipSpec {
                name: format!("{gw_ns}/{gw_name}:{}", l.name),
                address: *addr,
                port: l.port,
                protocol,
                mode: Mode::Nat,
                hash: effect.hash,
                affinity_timeout_s: 0,
                table_size: effect.table_size,
                backends,
            };
            if room.taken.contains(&spec.key()) {
                skipped.push(format!("{} is already served for a Service", spec.label()));
                continue;
            }
            let passive_health = effect
                .passive_health
                .clone()
                .filter(|_| protocol == crate::model::Protocol::Tcp);
            mine.push(VipConfig {
                spec,
                health_check: effect.health_check.clone(),
                passive_health,
            });
        }
        let members: usize = mine.iter().map(|v| v.spec.backends.len()).sum();
        if room.vips + mine.len() > self.settings.max_vips as usize
            || room.members + members > self.settings.max_backends as usize
        {
            return cond(
                "Programmed",
                false,
                "Pending",
                format!(
                    "{} VIP(s) with {members} member(s) do not fit this node's max_vips {} / max_backends {}",
                    mine.len(),
                    self.settings.max_vips,
                    self.settings.max_backends
                ),
            );
        }
        if mine.is_empty() {
            return cond("Programmed", false, "Pending", skipped.join("; "));
        }
        room.vips += mine.len();
        room.members += members;
        let labels: Vec<String> = mine.iter().map(|v| v.spec.label()).collect();
        for v in &mine {
            room.taken.insert(v.spec.key());
        }
        out.vips.extend(mine);
        let mut message = format!("in the maps as {}", labels.join(", "));
        if carrier.is_none() {
            message.push_str(" (no route attached: new connections are dropped)");
        }
        if !skipped.is_empty() {
            message.push_str(&format!("; not {}", skipped.join("; ")));
        }
        cond("Programmed", true, "Programmed", message)
    }

    /// The members of route `r`'s VIP for one family, and the policy effect that applies.
    fn backends(
        &self,
        r: &Route,
        resolved: &[refs::Resolved<'_>],
        v4: bool,
        out: &mut Output,
    ) -> (Vec<BackendSpec>, Effect) {
        let refs = r.spec.rules.iter().flat_map(|rule| &rule.backend_refs);
        // Per backendRef: its weight and its endpoints (None: rejected).
        let mut shares: Vec<(u32, Option<BTreeMap<(IpAddr, u16), u32>>)> = Vec::new();
        let mut policies: BTreeSet<Option<ObjectKey>> = BTreeSet::new();
        let mut services = Vec::new();
        for (b, res) in refs.zip(resolved) {
            let weight = b.weight.unwrap_or(1).clamp(0, MAX_WEIGHT) as u32;
            let eps = match res {
                Ok((svc, sp)) => {
                    let key = key_of(svc.namespace(), svc.name_any());
                    policies.insert(policy_of(svc));
                    services.push(format!("{}/{}", key.0, key.1));
                    let slices = self.slices.get(&key).map(Vec::as_slice).unwrap_or(&[]);
                    let eps = endpoints(slices, sp, v4, None, &key.0, &mut Vec::new());
                    Some(eps).filter(|e| e.values().any(|w| *w > 0))
                }
                Err(_) => None,
            };
            shares.push((weight, eps));
        }
        let effect = match policies.len() {
            0 => Effect::default(),
            1 => policies
                .first()
                .cloned()
                .flatten()
                .and_then(|p| self.effect_of(&p))
                .unwrap_or_default(),
            _ => {
                let named: Vec<String> = policies
                    .iter()
                    .map(|p| p.as_ref().map_or("(none)".to_string(), |p| p.1.clone()))
                    .collect();
                for p in policies.iter().flatten() {
                    out.policy_conflicts.entry(p.clone()).or_default().push(format!(
                        "{} {}/{}: its backend Services ({}) name different policies ({}): none is applied to the route",
                        r.kind.name(),
                        r.meta.namespace.as_deref().unwrap_or(""),
                        r.meta.name.as_deref().unwrap_or(""),
                        services.join(", "),
                        named.join(", ")
                    ));
                }
                Effect::default()
            }
        };
        (members(&shares, v4), effect)
    }

    fn effect_of(&self, p: &ObjectKey) -> Option<Effect> {
        self.effects.get(p).cloned().flatten()
    }
}

/// The members of a VIP from its backendRefs' shares: each ready endpoint of a resolved ref, and
/// one rejecting member holding the shares that have nowhere to go.
fn members(shares: &[(u32, Option<BTreeMap<(IpAddr, u16), u32>>)], v4: bool) -> Vec<BackendSpec> {
    let rejected: u32 = shares
        .iter()
        .filter(|(_, e)| e.is_none())
        .map(|(w, _)| *w)
        .fold(0u32, u32::saturating_add);
    let mut list: Vec<Share> = shares
        .iter()
        .filter_map(|(w, e)| {
            let e = e.as_ref()?;
            Some(Share {
                weight: *w,
                members: e.values().filter(|w| **w > 0).count() as u32,
            })
        })
        .collect();
    list.push(Share {
        weight: rejected,
        members: 1,
    });
    let per_member = member_weights(&list);
    // (address, port) -> weight; an endpoint named by two refs gets both shares.
    let mut by_endpoint: BTreeMap<(IpAddr, u16), u32> = BTreeMap::new();
    for ((_, e), w) in shares.iter().filter(|(_, e)| e.is_some()).zip(&per_member) {
        for (ep, ready) in e.iter().flatten() {
            let add = if *ready > 0 { *w } else { 0 };
            let slot = by_endpoint.entry(*ep).or_insert(0);
            *slot = slot.saturating_add(add);
        }
    }
    let mut out: Vec<BackendSpec> = by_endpoint
        .into_iter()
        .map(|((a, p), w)| BackendSpec::new(a, p, w))
        .collect();
    let reject_weight = per_member.last().copied().unwrap_or(0);
    if reject_weight > 0 {
        out.push(BackendSpec::rejecting(v4, reject_weight));
    }
    out
}

impl Cond {
    /// This condition if `ok`, else False with `reason` and `message`.
    fn with_ok(self, ok: bool, reason: &str, message: &str) -> Cond {
        if ok {
            self
        } else {
            cond(self.kind, false, reason, message)
        }
    }
}

#[cfg(test)]
mod tests;
