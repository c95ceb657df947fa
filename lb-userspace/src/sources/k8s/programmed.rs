//! Whether a Service is served, said where `kubectl describe svc` shows it: the condition
//! [`CONDITION`] in the Service's `status.conditions`, and a Normal Event `Programmed` each time
//! the condition turns True with another message (its VIPs, or the number of nodes serving them).
//! A Gateway API route gets the Event alone (its status is the Gateway API's).
//!
//! Every node reports what its own maps hold in a record of its own ([`NodeRecord`], kept by
//! `nodes.rs`); the status writer counts the nodes whose record agrees with its own for each
//! Service and route. Pure: the writer decides here what to write, and writes only what differs from what
//! the Service already says, so an unchanged resync writes nothing and a new status writer
//! repeats nothing its predecessor said.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::translate::{Cond, ObjectKey, ServiceEvent, Translation, cond};

/// The condition's type (a domain-prefixed type, as for conditions not of Kubernetes' own).
pub const CONDITION: &str = "lb.dev/Programmed";

/// The VIPs a message names before it says how many more there are (an Event's note holds 1 kB).
const NAMED_VIPS: usize = 4;

/// What one node's maps hold: each Service served (`namespace/name`) and route carrying
/// traffic (`TCPRoute namespace/name`), with its VIP labels comma-separated (so two nodes agree
/// when they serve the same addresses and ports).
pub type NodeRecord = BTreeMap<String, String>;

/// This node's record after it applied `t` and, with the Gateway API, `routes` (each route's
/// VIPs).
pub fn record_of(t: &Translation, routes: &BTreeMap<String, Vec<String>>) -> NodeRecord {
    let services = t
        .services
        .iter()
        .filter(|(_, o)| !o.vips.is_empty())
        .map(|(k, o)| (format!("{}/{}", k.0, k.1), o.vips.join(",")));
    let routes = routes.iter().map(|(k, v)| (k.clone(), v.join(",")));
    services.chain(routes).collect()
}

/// What the `Programmed` Event says of the Service or route `key` (as in [`NodeRecord`]) served
/// at `vips`: the VIPs, and how many nodes (this one and the `peers` that agree) serve them.
pub fn served(
    key: &str,
    vips: &[String],
    own: &NodeRecord,
    peers: &BTreeMap<String, NodeRecord>,
) -> String {
    let nodes = 1 + peers
        .values()
        .filter(|r| r.get(key).is_some_and(|v| Some(v) == own.get(key)))
        .count();
    let s = if nodes == 1 { "" } else { "s" };
    format!("{} in the maps of {nodes} node{s}", named(vips))
}

/// A Service's condition, and the generation it judged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub cond: Cond,
    pub generation: Option<i64>,
}

/// The condition of every Service of lb's class: True with its VIPs and how many nodes (`own`,
/// this one, and the `peers` whose record agrees) serve them; False with the reason it is not
/// served (the maps could not be written, or the first Warning Event of the Service).
pub fn verdicts(
    t: &Translation,
    applied: &Result<(), String>,
    own: &NodeRecord,
    peers: &BTreeMap<String, NodeRecord>,
) -> BTreeMap<ObjectKey, Verdict> {
    t.services
        .iter()
        .map(|(key, o)| {
            let c = match (applied, o.vips.is_empty()) {
                (Err(e), _) => cond(
                    CONDITION,
                    false,
                    "ApplyFailed",
                    format!("the maps could not be written: {e}"),
                ),
                (Ok(()), false) => {
                    let message = served(&format!("{}/{}", key.0, key.1), &o.vips, own, peers);
                    cond(CONDITION, true, "Programmed", message)
                }
                (Ok(()), true) => why_not(key, &t.events),
            };
            let verdict = Verdict {
                cond: c,
                generation: o.generation,
            };
            (key.clone(), verdict)
        })
        .collect()
}

/// The first VIP labels, and how many more.
fn named(vips: &[String]) -> String {
    let mut s = vips
        .iter()
        .take(NAMED_VIPS)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if vips.len() > NAMED_VIPS {
        s += &format!(" and {} more", vips.len() - NAMED_VIPS);
    }
    s
}

/// Warnings that leave a Service served (with the defaults, or every source): not why it is not.
const SERVED_ANYWAY: [&str; 4] = [
    "PolicyRejected",
    "PolicyNotFound",
    "InvalidSourceRange",
    "InvalidNewFlowBudget",
];

/// Why a Service of lb's class has no VIP: its first Warning Event that drops addresses or
/// ports, else no address yet.
fn why_not(key: &ObjectKey, events: &[ServiceEvent]) -> Cond {
    let why = events
        .iter()
        .filter(|e| &e.service == key && e.warning)
        .find(|e| !SERVED_ANYWAY.contains(&e.reason.as_str()));
    match why {
        Some(e) => cond(CONDITION, false, &e.reason, e.message.clone()),
        None => cond(
            CONDITION,
            false,
            "NoAddress",
            "no address to serve: status.loadBalancer.ingress and spec.externalIPs are empty (lb does not allocate addresses)",
        ),
    }
}

/// `current` (a `status.conditions` list, or null) with `v` in place of the condition of its
/// type, or None when `current` already says the same (status, reason, message, generation).
/// `lastTransitionTime` moves only when the status does; other types are kept.
pub fn merged(current: &Value, v: &Verdict, now: &str) -> Option<Value> {
    let list = current.as_array().cloned().unwrap_or_default();
    let status = if v.cond.ok { "True" } else { "False" };
    let old = list.iter().find(|c| c["type"] == v.cond.kind);
    let same = |f: &str, want: Value| old.is_some_and(|o| o[f] == want);
    if same("status", json!(status))
        && same("reason", json!(v.cond.reason))
        && same("message", json!(v.cond.message))
        && same("observedGeneration", json!(v.generation))
    {
        return None;
    }
    let since = old
        .filter(|o| o["status"] == status)
        .map_or_else(|| json!(now), |o| o["lastTransitionTime"].clone());
    let mine = json!({
        "type": v.cond.kind, "status": status, "reason": v.cond.reason,
        "message": v.cond.message, "observedGeneration": v.generation,
        "lastTransitionTime": since,
    });
    let mut out: Vec<Value> = list
        .into_iter()
        .filter(|c| c["type"] != v.cond.kind)
        .collect();
    out.push(mine);
    Some(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::k8s::translate::ServiceOutcome;

    fn translation(vips: &[&str]) -> Translation {
        let mut t = Translation::default();
        t.services.insert(
            ("shop".into(), "web".into()),
            ServiceOutcome {
                generation: Some(3),
                vips: vips.iter().map(|v| v.to_string()).collect(),
            },
        );
        t
    }

    fn web(v: &BTreeMap<ObjectKey, Verdict>) -> &Verdict {
        &v[&("shop".to_string(), "web".to_string())]
    }

    #[test]
    fn a_served_service_counts_the_peers_whose_record_agrees() {
        let t = translation(&["192.0.2.10:80/tcp"]);
        let own = record_of(&t, &BTreeMap::new());
        let agreeing = own.clone();
        let behind = NodeRecord::from([("shop/web".into(), "192.0.2.9:80/tcp".into())]);
        let peers = BTreeMap::from([
            ("node-b".to_string(), agreeing),
            ("node-c".to_string(), behind),
            ("node-d".to_string(), NodeRecord::new()),
        ]);
        let v = verdicts(&t, &Ok(()), &own, &peers);
        assert_eq!(
            web(&v).cond,
            cond(
                CONDITION,
                true,
                "Programmed",
                "192.0.2.10:80/tcp in the maps of 2 nodes"
            )
        );
        assert_eq!(web(&v).generation, Some(3));
    }

    #[test]
    fn an_unserved_service_is_false_with_the_warning_that_dropped_its_vips() {
        let mut t = translation(&[]);
        for reason in ["InvalidAddress", "PolicyNotFound"] {
            t.events.push(ServiceEvent {
                service: ("shop".into(), "web".into()),
                warning: true,
                reason: reason.into(),
                message: "why".into(),
            });
        }
        t.events.sort();
        let v = verdicts(&t, &Ok(()), &NodeRecord::new(), &BTreeMap::new());
        assert!(!web(&v).cond.ok);
        assert_eq!(web(&v).cond.reason, "InvalidAddress");
        let none = verdicts(
            &translation(&[]),
            &Ok(()),
            &NodeRecord::new(),
            &BTreeMap::new(),
        );
        assert_eq!(web(&none).cond.reason, "NoAddress");
    }

    #[test]
    fn a_failed_apply_makes_every_service_false() {
        let t = translation(&["192.0.2.10:80/tcp"]);
        let v = verdicts(
            &t,
            &Err("ENOMEM".into()),
            &record_of(&t, &BTreeMap::new()),
            &BTreeMap::new(),
        );
        assert_eq!(web(&v).cond.reason, "ApplyFailed");
        assert!(web(&v).cond.message.contains("ENOMEM"));
    }

    #[test]
    fn a_message_names_four_vips_and_counts_the_rest() {
        let vips: Vec<String> = (0..6).map(|p| format!("192.0.2.10:{p}/tcp")).collect();
        assert_eq!(
            named(&vips),
            "192.0.2.10:0/tcp, 192.0.2.10:1/tcp, 192.0.2.10:2/tcp, 192.0.2.10:3/tcp and 2 more"
        );
    }

    #[test]
    fn merging_the_same_condition_writes_nothing_and_only_a_new_status_moves_the_transition_time() {
        let v = Verdict {
            cond: cond(CONDITION, true, "Programmed", "in the maps of 1 node"),
            generation: Some(1),
        };
        let other = json!({ "type": "Other", "status": "True" });
        let first = merged(&json!([other]), &v, "t0").expect("new: written");
        assert_eq!(first.as_array().unwrap().len(), 2);
        assert_eq!(merged(&first, &v, "t1"), None, "the same: nothing to write");
        let two = Verdict {
            cond: cond(CONDITION, true, "Programmed", "in the maps of 2 nodes"),
            ..v
        };
        let second = merged(&first, &two, "t2").expect("another message: written");
        let mine = second
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == CONDITION);
        assert_eq!(
            mine.unwrap()["lastTransitionTime"],
            "t0",
            "still True: the transition time stays"
        );
        assert!(second.as_array().unwrap().contains(&other));
        let down = Verdict {
            cond: cond(CONDITION, false, "NoAddress", "no address"),
            generation: Some(2),
        };
        let third = merged(&second, &down, "t3").expect("False: written");
        let mine = third
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == CONDITION);
        assert_eq!(
            mine.unwrap()["lastTransitionTime"],
            "t3",
            "True to False moves it"
        );
    }
}
