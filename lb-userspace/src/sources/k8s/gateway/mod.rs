//! The Gateway API at L4: GatewayClasses whose controller is lb's, their Gateways' TCP and UDP
//! listeners, and the TCPRoutes and UDPRoutes attached to them become the same [`VipConfig`]s a
//! config file gives (one model): a VIP per (Gateway address, listener port, protocol), NAT mode,
//! whose backends are the ready endpoints of the backendRefs' Services.
//!
//! Pure and deterministic like the Service translation: every node computes the same VIPs and
//! the same statuses from the same objects. Split by concern: [`listeners`] (which listeners are
//! served, conflicts), [`attach`] (parentRefs to listeners), [`refs`] (backendRefs to Services,
//! ReferenceGrants), `pool` (a route's backendRefs as members, and its policy), [`weights`]
//! (shares to Maglev weights), `addresses` (spec.addresses or the LoadBalancer Service),
//! [`status`] (what is written back).
//!
//! Several routes on one listener are all `Accepted` (and counted in `attachedRoutes`), but only
//! the oldest (creationTimestamp, then namespace/name) carries its traffic: at L4 nothing tells
//! their connections apart.

mod addresses;
pub mod attach;
pub mod listeners;
mod pool;
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
use serde_json::Value;

use self::{
    attach::{NamespaceLabels, attach, names_gateway},
    listeners::Judged,
    refs::{Services, resolve, resolved_refs},
    status::{GatewayStatus, ListenerStatus, Update},
    types::{Gateway, GatewayClass, ReferenceGrant, Route},
};
use super::translate::{Cond, Effect, ObjectKey, Settings, cond};
use crate::{
    model::desired::{Mode, VipSpec},
    sources::config::VipConfig,
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
    /// The versions the route kinds and ReferenceGrants are watched at.
    pub watched: Watched,
}

/// The version each optional Gateway API kind is watched at (None: the API server did not
/// serve it when the agent started), as discovery found them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Watched {
    pub tcp_routes: Option<String>,
    pub udp_routes: Option<String>,
    pub grants: Option<String>,
}

impl Watched {
    /// What the GatewayClass's `SupportedVersion` condition says lb reads.
    fn describe(&self) -> String {
        let at = |kind: &str, v: &Option<String>| match v {
            Some(v) => format!("{kind} {v}"),
            None => format!("no {kind} (not served when the agent started)"),
        };
        format!(
            "lb reads GatewayClass and Gateway v1, {}, {}, {}",
            at("TCPRoute", &self.tcp_routes),
            at("UDPRoute", &self.udp_routes),
            at("ReferenceGrant", &self.grants)
        )
    }
}

/// The conformance features lb implements, as the GatewayClass's `status.supportedFeatures`
/// gives them (sorted by name, as the API asks): the Gateway (core), ReferenceGrant, TCPRoute
/// and UDPRoute. Not `GatewayStaticAddresses`: lb takes `spec.addresses`, but cannot tell an
/// address the network will not route to it (`AddressNotUsable`), which that feature's test asks.
pub const SUPPORTED_FEATURES: [&str; 4] = ["Gateway", "ReferenceGrant", "TCPRoute", "UDPRoute"];

fn class_update(c: &GatewayClass, controller: &str, watched: &Watched) -> Update {
    Update::Class {
        name: c.name_any(),
        generation: c.metadata.generation,
        conditions: vec![
            cond(
                "Accepted",
                true,
                "Accepted",
                format!("served by {controller}"),
            ),
            cond(
                "SupportedVersion",
                true,
                "SupportedVersion",
                watched.describe(),
            ),
        ],
        supported_features: SUPPORTED_FEATURES.map(String::from).to_vec(),
    }
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
    /// Policies applied to routes: policy -> the routes (`TCPRoute ns/name`).
    pub policy_users: BTreeMap<ObjectKey, Vec<String>>,
    /// The VIPs whose traffic each route carries (`TCPRoute ns/name` -> VIP labels, sorted).
    pub route_vips: BTreeMap<String, Vec<String>>,
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
        out.updates.push(class_update(c, controller, &o.watched));
    }

    let by_key: Services = services
        .iter()
        .map(|s| (key_of(s.namespace(), s.name_any()), s))
        .collect();
    let svc_slices = slices_by_service(slices);
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

    let route_updates = parents.into_iter().map(|(i, p)| route_update(routes[i], p));
    out.updates.extend(route_updates);
    out
}

fn route_update(r: &Route, parents: Vec<(types::ParentRef, Vec<Cond>)>) -> Update {
    Update::Route {
        kind: r.kind,
        key: key_of(
            r.meta.namespace.clone(),
            r.meta.name.clone().unwrap_or_default(),
        ),
        generation: r.meta.generation,
        parents,
    }
}

/// EndpointSlices by the Service they belong to (their `kubernetes.io/service-name` label), each
/// Service's sorted by name.
fn slices_by_service(slices: &[EndpointSlice]) -> BTreeMap<ObjectKey, Vec<&EndpointSlice>> {
    let mut by_service: BTreeMap<ObjectKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if let Some(svc) = s.labels().get(SERVICE_NAME_LABEL) {
            by_service
                .entry((s.namespace().unwrap_or_default(), svc.clone()))
                .or_default()
                .push(s);
        }
    }
    for v in by_service.values_mut() {
        v.sort_by_key(|s| s.name_any());
    }
    by_service
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
        let attached = self.attach_routes(&judged, &o.namespaces, parents);

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
        let served = judged.iter().any(Judged::usable);
        let (accepted, programmed) = gateway_conditions(&judged, address_cond, any_programmed);
        // Nothing is bound to a Gateway lb serves no listener of.
        let addresses = if served { addresses } else { Vec::new() };
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

    /// Attaches the routes whose parentRefs name this Gateway to its `judged` listeners: the
    /// routes (indices into `self.routes`) attached to each; each parentRef's entry in `parents`.
    fn attach_routes(
        &self,
        judged: &[Judged],
        namespaces: &NamespaceLabels,
        parents: &mut BTreeMap<usize, Vec<(types::ParentRef, Vec<Cond>)>>,
    ) -> Vec<Vec<usize>> {
        let (gw_ns, gw_name) = self.key();
        let mut attached: Vec<Vec<usize>> = vec![Vec::new(); judged.len()];
        for (i, r) in self.routes.iter().enumerate() {
            let route_ns = r.meta.namespace.clone().unwrap_or_default();
            for p in &r.spec.parent_refs {
                if !names_gateway(p, &route_ns, &gw_ns, &gw_name) {
                    continue;
                }
                let accepted = match attach(r, p, self.gw, judged, namespaces) {
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
                parents.entry(i).or_default().push((
                    p.defaulted(),
                    vec![accepted, resolved_refs(&self.resolved[i])],
                ));
            }
        }
        attached
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
                affinity_timeout_s: effect.affinity_timeout_s.unwrap_or(0),
                table_size: effect.table_size,
                source_ranges: None,
                new_flow_budget: None,
                port_range: None,
                algorithm: effect.algorithm,
                backends,
            };
            if room.taken.contains(&spec.key()) {
                skipped.push(format!("{} is already served for a Service", spec.label()));
                continue;
            }
            let passive_health = effect
                .passive_health
                .clone()
                .filter(|_| protocol == crate::model::desired::Protocol::Tcp);
            mine.push(VipConfig {
                spec,
                health_check: effect.health_check.clone(),
                passive_health,
                health_threshold: effect.health_threshold,
            });
        }
        self.admit(mine, &skipped, carrier.map(|(r, _)| r), room, out)
    }

    /// Takes `mine` (a listener's VIPs) into `out` if they fit the `room` left, and records them
    /// as the VIPs of the route that carries their traffic (`carrier`); the listener's
    /// `Programmed` condition, which names the addresses `skipped`.
    fn admit(
        &self,
        mine: Vec<VipConfig>,
        skipped: &[String],
        carrier: Option<&Route>,
        room: &mut Room,
        out: &mut Output,
    ) -> Cond {
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
        if let Some(r) = carrier {
            let ns = r.meta.namespace.as_deref().unwrap_or_default();
            let name = r.meta.name.as_deref().unwrap_or_default();
            let vips = out
                .route_vips
                .entry(format!("{} {ns}/{name}", r.kind.name()))
                .or_default();
            vips.extend(labels.iter().cloned());
            vips.sort();
        }
        let mut message = format!("in the maps as {}", labels.join(", "));
        if carrier.is_none() {
            message.push_str(" (no route attached: new connections are dropped)");
        }
        if !skipped.is_empty() {
            message.push_str(&format!("; not {}", skipped.join("; ")));
        }
        cond("Programmed", true, "Programmed", message)
    }
}

/// The Gateway's `Accepted` and `Programmed`, from its `judged` listeners, what its addresses
/// gave (`address`: see [`GatewayCtx::addresses`]) and whether any listener is in the maps.
///
/// A listener lb does not serve is `Accepted=False` on its own (`UnsupportedProtocol`,
/// `PortUnavailable`) and leaves the rest of the Gateway served: `Accepted=True` with reason
/// `ListenersNotValid`, which the spec gives for "one or more Listeners have an invalid or
/// unsupported configuration" and allows with True "depending on whether the listener being
/// invalid causes the entire Gateway to not be accepted". Where lb serves none of them but they
/// name protocols the Gateway API defines (HTTP, HTTPS, TLS...), the Gateway is still valid: it
/// is accepted the same way and `Programmed` with nothing to program (no address, nothing in
/// the maps), which every message says. Where every listener names no protocol at all, the
/// Gateway is invalid as a whole: `Accepted=False` (`ListenersNotValid`). See
/// docs/conformance.md.
fn gateway_conditions(
    judged: &[Judged],
    address: Result<Option<Cond>, Cond>,
    any_programmed: bool,
) -> (Cond, Cond) {
    let not_served: Vec<String> = judged
        .iter()
        .filter(|l| !l.usable())
        .map(|l| format!("{} ({})", l.name, l.accepted.reason))
        .collect();
    let served = judged.iter().any(Judged::usable);
    let invalid = |ok: bool, why: String| {
        cond(
            "Accepted",
            ok,
            "ListenersNotValid",
            format!("{why}; not served: {}", not_served.join(", ")),
        )
    };
    let accepted = match &address {
        Err(c) => c.clone(),
        Ok(_) if not_served.is_empty() => cond("Accepted", true, "Accepted", "served by lb"),
        Ok(_) if served => invalid(true, "lb serves its other listeners".into()),
        Ok(_) if judged.iter().any(|l| l.defined) => invalid(
            true,
            "lb serves none of its listeners (TCP and UDP only): nothing to program".into(),
        ),
        Ok(_) => invalid(
            false,
            "no listener names a protocol the Gateway API defines".into(),
        ),
    };
    let programmed = match address {
        _ if !accepted.ok => cond("Programmed", false, "Invalid", "not accepted"),
        _ if !served => cond(
            "Programmed",
            true,
            "Programmed",
            "nothing to program: lb serves none of its listeners, so it has no address and nothing in the maps",
        ),
        Ok(Some(waiting)) => waiting,
        _ => cond("Programmed", true, "Programmed", "in the maps").with_ok(
            any_programmed,
            "Invalid",
            "no listener is in the maps",
        ),
    };
    (accepted, programmed)
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
