//! The status lb gives GatewayClasses, Gateways and routes, and its JSON.
//!
//! Rendering keeps a condition's `lastTransitionTime` while its status stays the same, so a
//! status that did not change renders to exactly what the object holds and is not written again.
//! A route's `status.parents` is shared with other controllers: only the entries whose
//! `controllerName` is lb's are replaced.

use std::net::IpAddr;

use serde_json::{Value, json};

use super::types::{ParentRef, RouteGroupKind, RouteKind};
use crate::sources::k8s::translate::{Cond, ObjectKey};

/// What to write into one object's status.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    Class {
        name: String,
        generation: Option<i64>,
        conditions: Vec<Cond>,
        /// Its `supportedFeatures`, sorted.
        supported_features: Vec<String>,
    },
    Gateway {
        key: ObjectKey,
        generation: Option<i64>,
        status: GatewayStatus,
    },
    Route {
        kind: RouteKind,
        key: ObjectKey,
        generation: Option<i64>,
        parents: Vec<(ParentRef, Vec<Cond>)>,
    },
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GatewayStatus {
    pub addresses: Vec<IpAddr>,
    pub conditions: Vec<Cond>,
    pub listeners: Vec<ListenerStatus>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ListenerStatus {
    pub name: String,
    pub supported_kinds: Vec<RouteGroupKind>,
    pub attached_routes: u32,
    pub conditions: Vec<Cond>,
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Conditions as JSON, keeping the `lastTransitionTime` of each one in `old` whose status is
/// unchanged.
pub fn conditions(conds: &[Cond], old: &Value, generation: Option<i64>) -> Value {
    Value::Array(
        conds
            .iter()
            .map(|c| {
                let status = if c.ok { "True" } else { "False" };
                let since = old
                    .as_array()
                    .and_then(|a| a.iter().find(|o| o["type"] == c.kind))
                    .filter(|o| o["status"] == status)
                    .map(|o| o["lastTransitionTime"].clone())
                    .unwrap_or_else(|| json!(now()));
                json!({
                    "type": c.kind, "status": status, "reason": c.reason, "message": c.message,
                    "observedGeneration": generation, "lastTransitionTime": since,
                })
            })
            .collect(),
    )
}

impl Update {
    /// The object's key and kind: (kind, namespace, name).
    pub fn target(&self) -> (&'static str, Option<&str>, &str) {
        match self {
            Update::Class { name, .. } => ("GatewayClass", None, name),
            Update::Gateway { key, .. } => ("Gateway", Some(&key.0), &key.1),
            Update::Route { kind, key, .. } => (kind.name(), Some(&key.0), &key.1),
        }
    }

    /// The status to write, given the object's current `status` (Null if none); None when it
    /// already holds exactly that.
    pub fn render(&self, current: &Value, controller: &str) -> Option<Value> {
        let new = match self {
            Update::Class {
                generation,
                conditions: c,
                supported_features,
                ..
            } => {
                let features: Vec<Value> = supported_features
                    .iter()
                    .map(|f| json!({ "name": f }))
                    .collect();
                json!({
                    "conditions": conditions(c, &current["conditions"], *generation),
                    "supportedFeatures": features,
                })
            }
            Update::Gateway {
                generation, status, ..
            } => gateway(status, current, *generation),
            Update::Route {
                generation,
                parents,
                ..
            } => route(parents, current, *generation, controller),
        };
        let unchanged = new
            .as_object()
            .into_iter()
            .flatten()
            .all(|(k, v)| &current[k] == v);
        (!unchanged).then_some(new)
    }
}

fn gateway(s: &GatewayStatus, current: &Value, generation: Option<i64>) -> Value {
    let old_listeners = current["listeners"].as_array().cloned().unwrap_or_default();
    let listeners: Vec<Value> = s
        .listeners
        .iter()
        .map(|l| {
            let old = old_listeners
                .iter()
                .find(|o| o["name"] == l.name.as_str())
                .map(|o| o["conditions"].clone())
                .unwrap_or(Value::Null);
            json!({
                "name": l.name,
                "supportedKinds": l.supported_kinds,
                "attachedRoutes": l.attached_routes,
                "conditions": conditions(&l.conditions, &old, generation),
            })
        })
        .collect();
    let addresses: Vec<Value> = s
        .addresses
        .iter()
        .map(|a| json!({ "type": "IPAddress", "value": a.to_string() }))
        .collect();
    json!({
        "addresses": addresses,
        "conditions": conditions(&s.conditions, &current["conditions"], generation),
        "listeners": listeners,
    })
}

fn route(
    parents: &[(ParentRef, Vec<Cond>)],
    current: &Value,
    generation: Option<i64>,
    controller: &str,
) -> Value {
    let old = current["parents"].as_array().cloned().unwrap_or_default();
    let mut out: Vec<Value> = old
        .iter()
        .filter(|p| p["controllerName"] != controller)
        .cloned()
        .collect();
    for (p, conds) in parents {
        let pref = serde_json::to_value(p).unwrap_or_default();
        let old_conds = old
            .iter()
            .find(|o| o["controllerName"] == controller && o["parentRef"] == pref)
            .map(|o| o["conditions"].clone())
            .unwrap_or(Value::Null);
        out.push(json!({
            "parentRef": pref,
            "controllerName": controller,
            "conditions": conditions(conds, &old_conds, generation),
        }));
    }
    json!({ "parents": out })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::k8s::translate::cond;

    #[test]
    fn an_unchanged_status_renders_to_nothing_and_a_change_keeps_unchanged_transition_times() {
        let u = |ok: bool| Update::Class {
            name: "lb".into(),
            generation: Some(2),
            conditions: vec![
                cond("Accepted", true, "Accepted", "ok"),
                cond("SupportedVersion", ok, "SupportedVersion", "v"),
            ],
            supported_features: vec!["Gateway".into()],
        };
        let first = u(true).render(&Value::Null, "c").expect("new status");
        assert_eq!(u(true).render(&first, "c"), None, "nothing changed");
        let mut aged = first.clone();
        aged["conditions"][0]["lastTransitionTime"] = json!("2020-01-01T00:00:00Z");
        aged["conditions"][1]["lastTransitionTime"] = json!("2020-01-01T00:00:00Z");
        let second = u(false).render(&aged, "c").expect("changed");
        assert_eq!(
            second["conditions"][0]["lastTransitionTime"],
            "2020-01-01T00:00:00Z"
        );
        assert_ne!(
            second["conditions"][1]["lastTransitionTime"],
            "2020-01-01T00:00:00Z"
        );
        assert_eq!(second["conditions"][1]["status"], "False");
    }

    #[test]
    fn a_routes_parents_of_other_controllers_are_kept() {
        let other = json!({ "parents": [
            { "parentRef": { "name": "their-gw" }, "controllerName": "example.com/other", "conditions": [] },
            { "parentRef": { "name": "gw" }, "controllerName": "lb.dev/gateway-controller", "conditions": [] }
        ] });
        let u = Update::Route {
            kind: RouteKind::Tcp,
            key: ("apps".into(), "r".into()),
            generation: Some(1),
            parents: vec![(
                ParentRef {
                    name: "gw".into(),
                    ..Default::default()
                },
                vec![cond("Accepted", true, "Accepted", "ok")],
            )],
        };
        let s = u.render(&other, "lb.dev/gateway-controller").unwrap();
        let parents = s["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 2);
        assert_eq!(parents[0]["controllerName"], "example.com/other");
        assert_eq!(parents[1]["conditions"][0]["reason"], "Accepted");
    }
}
