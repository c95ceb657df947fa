//! Topology-aware routing: which of a Service's endpoints this node prefers, by the hints the
//! EndpointSlice controller writes for `spec.trafficDistribution` (`PreferSameZone`,
//! `PreferClose`: `hints.forZones`; `PreferSameNode`: `hints.forNodes`) and for the
//! `service.kubernetes.io/topology-mode: Auto` annotation. The rule is kube-proxy's: hints for
//! nodes count if every ready endpoint has some and one names this node; else hints for zones,
//! if every ready endpoint has some and one names this node's zone (the Node's
//! `topology.kubernetes.io/zone` label); else every endpoint is used alike.
//!
//! The endpoints outside the preferred set become backups ([`crate::model::desired::BackendSpec::backup`]):
//! they take new flows only while none of the preferred can (out by health checks, or drained),
//! so a zone whose endpoints all fail falls back to the others, which kube-proxy cannot do (it
//! sees readiness only).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::{core::v1::ServicePort, discovery::v1::EndpointSlice};

use super::translate::endpoint_port;

/// The Node label that names its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Where this node is: its name and its zone, if labelled.
#[derive(Clone, Copy, Debug)]
pub struct Place<'a> {
    pub node: &'a str,
    pub zone: Option<&'a str>,
}

/// A ready endpoint's address, port and hints.
struct Hinted {
    at: (IpAddr, u16),
    nodes: BTreeSet<String>,
    zones: BTreeSet<String>,
}

/// The ready endpoints of a Service port, of one family, with their hints.
fn hinted(slices: &[&EndpointSlice], sp: &ServicePort, v4: bool) -> Vec<Hinted> {
    let family = if v4 { "IPv4" } else { "IPv6" };
    let proto = sp.protocol.as_deref().unwrap_or("TCP");
    let mut out = Vec::new();
    for slice in slices.iter().filter(|s| s.address_type == family) {
        let Some(port) = endpoint_port(slice, sp, proto) else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let c = ep.conditions.clone().unwrap_or_default();
            if !c.ready.unwrap_or(true) || c.terminating.unwrap_or(false) {
                continue;
            }
            let hints = ep.hints.as_ref();
            let nodes = hints.and_then(|h| h.for_nodes.as_ref());
            let zones = hints.and_then(|h| h.for_zones.as_ref());
            for a in &ep.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    continue;
                };
                out.push(Hinted {
                    at: (ip, port),
                    nodes: nodes
                        .iter()
                        .flat_map(|v| v.iter())
                        .map(|n| n.name.clone())
                        .collect(),
                    zones: zones
                        .iter()
                        .flat_map(|v| v.iter())
                        .map(|z| z.name.clone())
                        .collect(),
                });
            }
        }
    }
    out
}

/// The preferred set and what it is: the endpoints whose hints name `want`, if every endpoint
/// has hints of that kind (`of`) and one names it.
fn preferred<'h>(
    eps: &'h [Hinted],
    of: impl Fn(&'h Hinted) -> &'h BTreeSet<String>,
    want: &str,
) -> Option<BTreeSet<(IpAddr, u16)>> {
    let all_hinted = !eps.is_empty() && eps.iter().all(|e| !of(e).is_empty());
    let set: BTreeSet<_> = eps
        .iter()
        .filter(|e| of(e).contains(want))
        .map(|e| e.at)
        .collect();
    (all_hinted && !set.is_empty()).then_some(set)
}

/// The endpoints of a Service port (of one family) that are backups on this node, each with
/// why (for `lb backends`); empty when the hints give no preference here.
pub fn backups(
    slices: &[&EndpointSlice],
    sp: &ServicePort,
    v4: bool,
    here: Place,
) -> BTreeMap<(IpAddr, u16), String> {
    let eps = hinted(slices, sp, v4);
    let (set, what) = if let Some(s) = preferred(&eps, |e| &e.nodes, here.node) {
        (s, format!("other nodes than this one ({})", here.node))
    } else if let Some(zone) = here.zone
        && let Some(s) = preferred(&eps, |e| &e.zones, zone)
    {
        (s, format!("other zones than this node's ({zone})"))
    } else {
        return BTreeMap::new();
    };
    eps.iter()
        .filter(|e| !set.contains(&e.at))
        .map(|e| (e.at, format!("its hints name {what}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn slice(eps: &[(&str, &[&str])]) -> EndpointSlice {
        let eps: Vec<_> = eps
            .iter()
            .map(|(a, zones)| {
                let mut ep = json!({ "addresses": [a], "conditions": { "ready": true } });
                if !zones.is_empty() {
                    let z: Vec<_> = zones.iter().map(|n| json!({ "name": n })).collect();
                    ep["hints"] = json!({ "forZones": z });
                }
                ep
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": { "name": "s" }, "addressType": "IPv4",
            "ports": [{ "name": "", "port": 80, "protocol": "TCP" }], "endpoints": eps
        }))
        .unwrap()
    }

    fn port() -> ServicePort {
        serde_json::from_value(json!({ "port": 80 })).unwrap()
    }

    fn backed_up(eps: &[(&str, &[&str])], zone: Option<&str>) -> Vec<String> {
        let s = slice(eps);
        let here = Place { node: "n", zone };
        backups(&[&s], &port(), true, here)
            .keys()
            .map(|(a, _)| a.to_string())
            .collect()
    }

    #[test]
    fn endpoints_hinted_for_other_zones_are_backups() {
        let eps: &[(&str, &[&str])] = &[("10.0.0.1", &["a"]), ("10.0.0.2", &["b", "c"])];
        assert_eq!(backed_up(eps, Some("a")), ["10.0.0.2"]);
        assert_eq!(backed_up(eps, Some("c")), ["10.0.0.1"]);
    }

    #[test]
    fn one_endpoint_without_hints_or_none_for_this_zone_means_no_preference() {
        let unhinted: &[(&str, &[&str])] = &[("10.0.0.1", &["a"]), ("10.0.0.2", &[])];
        assert!(backed_up(unhinted, Some("a")).is_empty(), "as kube-proxy");
        let elsewhere: &[(&str, &[&str])] = &[("10.0.0.1", &["b"]), ("10.0.0.2", &["c"])];
        assert!(backed_up(elsewhere, Some("a")).is_empty());
        assert!(
            backed_up(elsewhere, None).is_empty(),
            "a node without a zone"
        );
    }
}
