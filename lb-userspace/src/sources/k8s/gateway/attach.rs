//! Which listeners of a Gateway a route's parentRef attaches to.
//!
//! A parentRef with neither `sectionName` nor `port` names every listener (attach-all); with one
//! or both, the listeners that match all it gives. Of those, the route attaches to the ones that
//! take its kind and allow its namespace (`allowedRoutes.namespaces.from`: `Same` by default,
//! `All`, or `Selector` on the namespace's labels).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::{
    listeners::Judged,
    types::{GROUP, Gateway, ParentRef, Route},
};
use crate::sources::k8s::translate::{Cond, cond};

/// Namespace name -> its labels.
pub type NamespaceLabels = BTreeMap<String, BTreeMap<String, String>>;

/// Whether `p`, in a route in namespace `route_ns`, names the Gateway `ns/name`.
pub fn names_gateway(p: &ParentRef, route_ns: &str, ns: &str, name: &str) -> bool {
    p.group.as_deref().unwrap_or(GROUP) == GROUP
        && p.kind.as_deref().unwrap_or("Gateway") == "Gateway"
        && p.namespace.as_deref().unwrap_or(route_ns) == ns
        && p.name == name
}

/// The listeners (indices into `judged`) `route`'s parentRef `p` attaches to, or its
/// `Accepted=False` condition.
pub fn attach(
    route: &Route,
    p: &ParentRef,
    gw: &Gateway,
    judged: &[Judged],
    namespaces: &NamespaceLabels,
) -> Result<Vec<usize>, Cond> {
    let named: Vec<usize> = judged
        .iter()
        .enumerate()
        .filter(|(_, l)| {
            p.section_name.as_deref().is_none_or(|s| s == l.name)
                && p.port.is_none_or(|port| port == i32::from(l.port))
        })
        .map(|(i, _)| i)
        .collect();
    if named.is_empty() {
        return Err(cond(
            "Accepted",
            false,
            "NoMatchingParent",
            format!(
                "Gateway {} has no listener{}{}",
                gw.metadata.name.as_deref().unwrap_or(""),
                p.section_name
                    .as_deref()
                    .map(|s| format!(" named {s}"))
                    .unwrap_or_default(),
                p.port.map(|s| format!(" on port {s}")).unwrap_or_default()
            ),
        ));
    }
    let route_ns = route.meta.namespace.as_deref().unwrap_or("");
    let gw_ns = gw.metadata.namespace.as_deref().unwrap_or("");
    let listeners = &gw.spec.listeners;
    let mut why = Vec::new();
    let mut attached = Vec::new();
    for i in named {
        let l = &judged[i];
        if !l.usable() {
            why.push(format!("listener {} is not accepted", l.name));
        } else if !l.takes(route.kind) {
            why.push(format!(
                "listener {} does not take {}s",
                l.name,
                route.kind.name()
            ));
        } else if !allows_namespace(
            listeners[i]
                .allowed_routes
                .as_ref()
                .and_then(|a| a.namespaces.as_ref()),
            route_ns,
            gw_ns,
            namespaces,
        ) {
            why.push(format!(
                "listener {} does not allow routes from namespace {route_ns}",
                l.name
            ));
        } else {
            attached.push(i);
        }
    }
    if attached.is_empty() {
        Err(cond(
            "Accepted",
            false,
            "NotAllowedByListeners",
            why.join("; "),
        ))
    } else {
        Ok(attached)
    }
}

fn allows_namespace(
    from: Option<&super::types::RouteNamespaces>,
    route_ns: &str,
    gw_ns: &str,
    namespaces: &NamespaceLabels,
) -> bool {
    match from.and_then(|f| f.from.as_deref()).unwrap_or("Same") {
        "All" => true,
        "Selector" => {
            let empty = BTreeMap::new();
            let labels = namespaces.get(route_ns).unwrap_or(&empty);
            from.and_then(|f| f.selector.as_ref())
                .is_some_and(|s| selects(s, labels))
        }
        _ => route_ns == gw_ns,
    }
}

/// Whether a label selector matches `labels` (matchLabels and matchExpressions, all of them).
pub fn selects(s: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = s
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = s.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let have = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => have.is_none_or(|v| !values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        }
    });
    by_labels && by_expressions
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::sources::k8s::gateway::{listeners::judge, types::RouteKind};

    fn gateway(listeners: serde_json::Value) -> Gateway {
        serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": { "name": "gw", "namespace": "infra" },
            "spec": { "gatewayClassName": "lb", "listeners": listeners }
        }))
        .unwrap()
    }

    fn route(ns: &str, kind: RouteKind) -> Route {
        Route {
            kind,
            meta: serde_json::from_value(json!({ "name": "r", "namespace": ns })).unwrap(),
            spec: Default::default(),
        }
    }

    fn pref(section: Option<&str>, port: Option<i32>) -> ParentRef {
        ParentRef {
            name: "gw".into(),
            namespace: Some("infra".into()),
            section_name: section.map(Into::into),
            port,
            ..Default::default()
        }
    }

    fn two_listeners() -> Gateway {
        gateway(json!([
            { "name": "a", "port": 80, "protocol": "TCP", "allowedRoutes": { "namespaces": { "from": "All" } } },
            { "name": "b", "port": 81, "protocol": "TCP", "allowedRoutes": { "namespaces": { "from": "All" } } },
            { "name": "dns", "port": 53, "protocol": "UDP", "allowedRoutes": { "namespaces": { "from": "All" } } }
        ]))
    }

    #[test]
    fn section_name_and_port_narrow_and_neither_attaches_to_all_that_take_the_kind() {
        let gw = two_listeners();
        let j = judge(&gw.spec.listeners);
        let r = route("apps", RouteKind::Tcp);
        let ns = NamespaceLabels::new();
        let at = |s, p| attach(&r, &pref(s, p), &gw, &j, &ns);
        assert_eq!(at(None, None), Ok(vec![0, 1]), "UDP listener left out");
        assert_eq!(at(Some("b"), None), Ok(vec![1]));
        assert_eq!(at(None, Some(80)), Ok(vec![0]));
        assert_eq!(at(Some("a"), Some(80)), Ok(vec![0]));
        assert_eq!(
            at(Some("a"), Some(81)).unwrap_err().reason,
            "NoMatchingParent"
        );
        assert_eq!(at(Some("zz"), None).unwrap_err().reason, "NoMatchingParent");
        let e = at(Some("dns"), None).unwrap_err();
        assert_eq!(e.reason, "NotAllowedByListeners");
        assert!(
            e.message.contains("does not take TCPRoutes"),
            "{}",
            e.message
        );
    }

    #[test]
    fn namespaces_same_all_and_selector() {
        let gw = gateway(json!([
            { "name": "same", "port": 80, "protocol": "TCP" },
            { "name": "sel", "port": 81, "protocol": "TCP",
              "allowedRoutes": { "namespaces": { "from": "Selector", "selector": {
                  "matchLabels": { "team": "web" },
                  "matchExpressions": [ { "key": "env", "operator": "NotIn", "values": ["prod"] } ] } } } }
        ]));
        let j = judge(&gw.spec.listeners);
        let mut ns = NamespaceLabels::new();
        ns.insert("web".into(), [("team".into(), "web".into())].into());
        ns.insert(
            "web-prod".into(),
            [("team".into(), "web".into()), ("env".into(), "prod".into())].into(),
        );
        let at = |r: &str| attach(&route(r, RouteKind::Tcp), &pref(None, None), &gw, &j, &ns);
        assert_eq!(at("infra"), Ok(vec![0]), "Same: the Gateway's namespace");
        assert_eq!(at("web"), Ok(vec![1]));
        assert_eq!(at("web-prod").unwrap_err().reason, "NotAllowedByListeners");
        assert_eq!(at("other").unwrap_err().reason, "NotAllowedByListeners");
    }

    #[test]
    fn a_parent_ref_names_a_gateway_by_group_kind_namespace_and_name() {
        let p = ParentRef {
            name: "gw".into(),
            ..Default::default()
        };
        assert!(names_gateway(&p, "infra", "infra", "gw"));
        assert!(
            !names_gateway(&p, "apps", "infra", "gw"),
            "namespace defaults to the route's"
        );
        let svc = ParentRef {
            kind: Some("Service".into()),
            group: Some("".into()),
            ..p.clone()
        };
        assert!(!names_gateway(&svc, "infra", "infra", "gw"));
    }
}
