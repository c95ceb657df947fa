//! A route's backendRefs: whether each resolves to a Service port, and the route's
//! `ResolvedRefs` condition.
//!
//! A backendRef resolves when it names a core `Service` (InvalidKind otherwise), in the route's
//! namespace or in one whose ReferenceGrant lets this route kind from the route's namespace refer
//! to it (RefNotPermitted otherwise; removing the grant revokes the reference at once), that
//! exists and has the port asked for with the route's protocol (BackendNotFound otherwise). One
//! that does not resolve still holds its share of the traffic, which is rejected.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort};

use super::types::{BackendRef, GROUP, ReferenceGrant, Route, RouteKind};
use crate::sources::k8s::translate::{Cond, ObjectKey, cond};

/// What a backendRef refers to, or why it does not resolve (`reason`, `message`).
pub type Resolved<'a> = Result<(&'a Service, &'a ServicePort), (&'static str, String)>;

/// Services by namespace/name.
pub type Services<'a> = BTreeMap<ObjectKey, &'a Service>;

pub fn resolve<'a>(
    route: &Route,
    r: &BackendRef,
    services: &Services<'a>,
    grants: &[ReferenceGrant],
) -> Resolved<'a> {
    let group = r.group.as_deref().unwrap_or("");
    let kind = r.kind.as_deref().unwrap_or("Service");
    if !(group.is_empty() || group == "core") || kind != "Service" {
        return Err((
            "InvalidKind",
            format!(
                "backendRef {}: lb balances over Services, not {group}/{kind}",
                r.name
            ),
        ));
    }
    let route_ns = route.meta.namespace.clone().unwrap_or_default();
    let ns = r.namespace.clone().unwrap_or_else(|| route_ns.clone());
    if ns != route_ns && !granted(route.kind, &route_ns, &ns, &r.name, grants) {
        return Err((
            "RefNotPermitted",
            format!(
                "backendRef {ns}/{}: no ReferenceGrant in namespace {ns} lets {}s in {route_ns} refer to it",
                r.name,
                route.kind.name()
            ),
        ));
    }
    let Some(svc) = services.get(&(ns.clone(), r.name.clone())) else {
        return Err((
            "BackendNotFound",
            format!("backendRef {ns}/{}: no such Service", r.name),
        ));
    };
    let Some(port) = r.port else {
        return Err((
            "BackendNotFound",
            format!("backendRef {ns}/{}: port is required for a Service", r.name),
        ));
    };
    let proto = match route.kind {
        RouteKind::Tcp => "TCP",
        RouteKind::Udp => "UDP",
    };
    svc.spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find(|p| p.port == port && p.protocol.as_deref().unwrap_or("TCP") == proto)
        .map(|p| (*svc, p))
        .ok_or((
            "BackendNotFound",
            format!(
                "backendRef {ns}/{}: the Service has no {proto} port {port}",
                r.name
            ),
        ))
}

/// Whether a ReferenceGrant in `to_ns` lets routes of `kind` in `from_ns` refer to Service `name`.
fn granted(
    kind: RouteKind,
    from_ns: &str,
    to_ns: &str,
    name: &str,
    grants: &[ReferenceGrant],
) -> bool {
    grants
        .iter()
        .filter(|g| g.metadata.namespace.as_deref() == Some(to_ns))
        .any(|g| {
            g.spec
                .from
                .iter()
                .any(|f| f.group == GROUP && f.kind == kind.name() && f.namespace == from_ns)
                && g.spec.to.iter().any(|t| {
                    t.group.is_empty()
                        && t.kind == "Service"
                        && t.name.as_deref().is_none_or(|n| n == name)
                })
        })
}

/// The route's `ResolvedRefs` from the resolution of each of its backendRefs.
pub fn resolved_refs(results: &[Resolved<'_>]) -> Cond {
    let failed: Vec<&(&'static str, String)> =
        results.iter().filter_map(|r| r.as_ref().err()).collect();
    match failed.first() {
        None => cond(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "all backendRefs resolved",
        ),
        Some((reason, _)) => cond(
            "ResolvedRefs",
            false,
            reason,
            format!(
                "{} (their share of new connections is refused)",
                failed
                    .iter()
                    .map(|f| f.1.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn svc(ns: &str, name: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": ns },
            "spec": { "ports": [ { "port": 80 }, { "port": 53, "protocol": "UDP" } ] }
        }))
        .unwrap()
    }

    fn route(kind: RouteKind) -> Route {
        Route {
            kind,
            meta: serde_json::from_value(json!({ "name": "r", "namespace": "apps" })).unwrap(),
            spec: Default::default(),
        }
    }

    fn bref(ns: Option<&str>, name: &str, port: Option<i32>) -> BackendRef {
        BackendRef {
            name: name.into(),
            namespace: ns.map(Into::into),
            port,
            ..Default::default()
        }
    }

    fn grant(to_ns: &str, from_kind: &str, name: Option<&str>) -> ReferenceGrant {
        serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
            "metadata": { "name": "g", "namespace": to_ns },
            "spec": { "from": [ { "group": GROUP, "kind": from_kind, "namespace": "apps" } ],
                      "to": [ { "group": "", "kind": "Service", "name": name } ] }
        }))
        .unwrap()
    }

    #[test]
    fn each_way_a_backend_ref_fails_has_its_reason() {
        let (a, b) = (svc("apps", "web"), svc("backends", "db"));
        let services: Services = [
            (("apps".into(), "web".into()), &a),
            (("backends".into(), "db".into()), &b),
        ]
        .into();
        let tcp = route(RouteKind::Tcp);
        let reason = |r: &BackendRef, grants: &[ReferenceGrant]| {
            resolve(&tcp, r, &services, grants).err().map(|e| e.0)
        };
        assert_eq!(reason(&bref(None, "web", Some(80)), &[]), None);
        assert_eq!(
            reason(&bref(None, "web", Some(53)), &[]),
            Some("BackendNotFound"),
            "53 is UDP"
        );
        assert_eq!(
            reason(&bref(None, "web", None), &[]),
            Some("BackendNotFound")
        );
        assert_eq!(
            reason(&bref(None, "nope", Some(80)), &[]),
            Some("BackendNotFound")
        );
        let mut k = bref(None, "web", Some(80));
        k.kind = Some("Pod".into());
        assert_eq!(reason(&k, &[]), Some("InvalidKind"));
        let cross = bref(Some("backends"), "db", Some(80));
        assert_eq!(reason(&cross, &[]), Some("RefNotPermitted"));
        assert_eq!(reason(&cross, &[grant("backends", "TCPRoute", None)]), None);
        assert_eq!(
            reason(&cross, &[grant("backends", "TCPRoute", Some("db"))]),
            None
        );
        assert_eq!(
            reason(&cross, &[grant("backends", "TCPRoute", Some("other"))]),
            Some("RefNotPermitted"),
            "a grant for another Service"
        );
        assert_eq!(
            reason(&cross, &[grant("backends", "UDPRoute", None)]),
            Some("RefNotPermitted"),
            "a grant for another route kind"
        );
        assert_eq!(
            reason(&cross, &[grant("apps", "TCPRoute", None)]),
            Some("RefNotPermitted"),
            "a grant must live in the target's namespace"
        );
    }

    #[test]
    fn resolved_refs_takes_the_first_failures_reason_and_names_them_all() {
        assert!(resolved_refs(&[]).ok);
        let c = resolved_refs(&[
            Err(("RefNotPermitted", "a".into())),
            Err(("BackendNotFound", "b".into())),
        ]);
        assert_eq!((c.ok, c.reason.as_str()), (false, "RefNotPermitted"));
        assert!(c.message.starts_with("a; b"), "{}", c.message);
    }
}
