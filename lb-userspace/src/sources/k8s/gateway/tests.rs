//! The translation as a whole: Gateway API objects in, VIPs and statuses out.

use serde_json::{Value, json};

use super::*;
use crate::model::desired::Protocol;

fn settings() -> Settings {
    Settings {
        class: "default".into(),
        node_name: "n".into(),
        zone: None,
        table_size: 1009,
        max_vips: 64,
        max_backends: 256,
        source_v4: true,
        source_v6: true,
    }
}

fn de<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

/// Service `name` (TCP port 80) and a slice of its ready `pods` on `target`.
fn service(name: &str, pods: &[&str], target: u16) -> (Service, EndpointSlice) {
    (
        de(json!({ "metadata": { "namespace": "shop", "name": name },
                   "spec": { "ports": [ { "port": 80, "targetPort": target, "protocol": "TCP" } ] } })),
        de(
            json!({ "metadata": { "namespace": "shop", "name": format!("{name}-1"),
                                 "labels": { "kubernetes.io/service-name": name } },
                   "addressType": "IPv4",
                   "ports": [ { "port": target, "protocol": "TCP" } ],
                   "endpoints": pods.iter().map(|a| json!({ "addresses": [a], "conditions": { "ready": true } })).collect::<Vec<_>>() }),
        ),
    )
}

fn objects(refs: Value) -> Objects {
    Objects {
        classes: vec![de(
            json!({ "metadata": { "name": "lb" }, "spec": { "controllerName": DEFAULT_CONTROLLER } }),
        )],
        gateways: vec![de(
            json!({ "metadata": { "namespace": "shop", "name": "gw" },
            "spec": { "gatewayClassName": "lb", "addresses": [ { "value": "192.0.2.40" } ],
                      "listeners": [ { "name": "web", "port": 80, "protocol": "TCP" } ] } }),
        )],
        routes: vec![Route::from(de::<types::TCPRoute>(json!({
            "metadata": { "namespace": "shop", "name": "web" },
            "spec": { "parentRefs": [ { "name": "gw" } ], "rules": [ { "backendRefs": refs } ] } })))],
        ..Default::default()
    }
}

fn run(o: &Objects, svcs: &[(Service, EndpointSlice)]) -> Output {
    let services: Vec<Service> = svcs.iter().map(|s| s.0.clone()).collect();
    let slices: Vec<EndpointSlice> = svcs.iter().map(|s| s.1.clone()).collect();
    translate(
        o,
        &services,
        &slices,
        &settings(),
        DEFAULT_CONTROLLER,
        Room::default(),
    )
}

/// (address:port or "reject", weight) of the only VIP.
fn members(out: &Output) -> Vec<(String, u32)> {
    assert_eq!(out.vips.len(), 1, "{:?}", out.vips);
    out.vips[0]
        .spec
        .backends
        .iter()
        .map(|b| {
            let who = if b.reject {
                "reject".to_string()
            } else {
                format!("{}:{}", b.address, b.port)
            };
            (who, b.weight)
        })
        .collect()
}

#[test]
fn weights_200_and_100_over_two_and_three_pods_give_each_pod_its_exact_share() {
    let svcs = [
        service("web-v1", &["10.20.0.11", "10.20.0.12"], 9001),
        service("web-v2", &["10.20.0.11", "10.20.0.12", "10.20.0.13"], 9002),
    ];
    let out = run(
        &objects(
            json!([ { "name": "web-v1", "port": 80, "weight": 200 }, { "name": "web-v2", "port": 80, "weight": 100 } ]),
        ),
        &svcs,
    );
    let m = members(&out);
    // Independently: web-v1's pods 200/300/2 = 1/3 each, web-v2's 100/300/3 = 1/9 each.
    let total: u32 = m.iter().map(|(_, w)| w).sum();
    let share = |who: &str| {
        f64::from(m.iter().find(|(w, _)| w == who).map_or(0, |(_, w)| *w)) / f64::from(total)
    };
    for p in ["10.20.0.11:9001", "10.20.0.12:9001"] {
        assert!((share(p) - 1.0 / 3.0).abs() < 1e-12, "{p}: {m:?}");
    }
    for p in ["10.20.0.11:9002", "10.20.0.12:9002", "10.20.0.13:9002"] {
        assert!((share(p) - 1.0 / 9.0).abs() < 1e-12, "{p}: {m:?}");
    }
    let v = &out.vips[0].spec;
    assert_eq!(
        (v.label(), v.mode, v.protocol),
        ("192.0.2.40:80/tcp".to_string(), Mode::Nat, Protocol::Tcp)
    );
}

#[test]
fn an_unresolved_backend_ref_keeps_its_share_as_one_rejecting_member() {
    let svcs = [service("web", &["10.20.0.11", "10.20.0.12"], 9001)];
    let out = run(
        &objects(json!([ { "name": "web", "port": 80, "weight": 300 },
                         { "name": "gone", "port": 80, "weight": 50 },
                         { "name": "web", "port": 81, "weight": 50 } ])),
        &svcs,
    );
    // 300 over two pods (150 each) and 100 rejected: 3 : 3 : 2.
    assert_eq!(
        members(&out),
        [
            ("10.20.0.11:9001".into(), 3),
            ("10.20.0.12:9001".into(), 3),
            ("reject".into(), 2)
        ]
    );
}

#[test]
fn a_service_without_ready_endpoints_is_a_rejected_share_too() {
    let svcs = [
        service("web", &["10.20.0.11"], 9001),
        service("empty", &[], 9001),
    ];
    let out = run(
        &objects(json!([ { "name": "web", "port": 80 }, { "name": "empty", "port": 80 } ])),
        &svcs,
    );
    assert_eq!(
        members(&out),
        [("10.20.0.11:9001".into(), 1), ("reject".into(), 1)]
    );
}

/// The status written for Gateway shop/gw.
fn gateway_status(out: &Output) -> &GatewayStatus {
    out.updates
        .iter()
        .find_map(|u| match u {
            Update::Gateway { status, .. } => Some(status),
            _ => None,
        })
        .expect("a Gateway status")
}

/// (type, status, reason) of each condition.
fn verdicts(conds: &[Cond]) -> Vec<(&str, bool, &str)> {
    conds
        .iter()
        .map(|c| (c.kind, c.ok, c.reason.as_str()))
        .collect()
}

fn with_listeners(listeners: Value) -> Objects {
    let mut o = objects(json!([ { "name": "web", "port": 80 } ]));
    o.gateways[0].spec.listeners = de(listeners);
    o
}

#[test]
fn a_gateway_with_tcp_and_http_listeners_is_accepted_with_listeners_not_valid_and_serves_tcp() {
    let o = with_listeners(json!([ { "name": "tcp", "port": 80, "protocol": "TCP" },
                                   { "name": "web", "port": 8080, "protocol": "HTTP" } ]));
    let out = run(&o, &[service("web", &["10.20.0.11"], 9001)]);
    let s = gateway_status(&out);
    assert_eq!(
        verdicts(&s.conditions),
        [
            ("Accepted", true, "ListenersNotValid"),
            ("Programmed", true, "Programmed")
        ]
    );
    assert!(
        s.conditions[0]
            .message
            .contains("web (UnsupportedProtocol)"),
        "{:?}",
        s.conditions[0]
    );
    assert_eq!(out.vips.len(), 1, "the TCP listener only");
}

#[test]
fn a_gateway_with_only_http_listeners_is_accepted_and_programmed_with_nothing_in_the_maps() {
    let o = with_listeners(json!([ { "name": "http", "port": 80, "protocol": "HTTP" },
                                   { "name": "https", "port": 443, "protocol": "HTTPS" } ]));
    let out = run(&o, &[service("web", &["10.20.0.11"], 9001)]);
    let s = gateway_status(&out);
    assert_eq!(
        verdicts(&s.conditions),
        [
            ("Accepted", true, "ListenersNotValid"),
            ("Programmed", true, "Programmed")
        ]
    );
    assert!(
        s.conditions[1].message.contains("nothing to program"),
        "{:?}",
        s.conditions[1]
    );
    assert!(
        s.addresses.is_empty(),
        "nothing is bound: {:?}",
        s.addresses
    );
    assert!(out.vips.is_empty() && out.lb_services.is_empty());
    for l in &s.listeners {
        assert_eq!(
            verdicts(&l.conditions)[0],
            ("Accepted", false, "UnsupportedProtocol")
        );
    }
}

#[test]
fn a_gateway_whose_listeners_name_no_defined_protocol_is_not_accepted() {
    let o = with_listeners(json!([ { "name": "invalid", "port": 1111, "protocol": "INVALID" } ]));
    let s = gateway_status(&run(&o, &[])).clone();
    assert_eq!(
        verdicts(&s.conditions),
        [
            ("Accepted", false, "ListenersNotValid"),
            ("Programmed", false, "Invalid")
        ]
    );
}

#[test]
fn the_class_lists_its_supported_features_and_the_versions_watched() {
    let mut o = objects(json!([]));
    o.watched = Watched {
        tcp_routes: Some("v1".into()),
        udp_routes: Some("v1alpha2".into()),
        grants: Some("v1".into()),
    };
    let out = run(&o, &[]);
    let Some(Update::Class {
        conditions,
        supported_features,
        ..
    }) = out
        .updates
        .iter()
        .find(|u| matches!(u, Update::Class { .. }))
    else {
        panic!("no class status: {:?}", out.updates)
    };
    assert_eq!(
        supported_features,
        &["Gateway", "ReferenceGrant", "TCPRoute", "UDPRoute"]
    );
    assert_eq!(
        conditions[1].message,
        "lb reads GatewayClass and Gateway v1, TCPRoute v1, UDPRoute v1alpha2, ReferenceGrant v1"
    );
}

#[test]
fn a_routes_parent_in_status_carries_the_group_and_kind_its_spec_left_out() {
    let out = run(&objects(json!([])), &[]);
    let parents = out
        .updates
        .iter()
        .find_map(|u| match u {
            Update::Route { parents, .. } => Some(parents),
            _ => None,
        })
        .expect("a route status");
    let p = &parents[0].0;
    assert_eq!(
        (p.group.as_deref(), p.kind.as_deref(), p.name.as_str()),
        (Some("gateway.networking.k8s.io"), Some("Gateway"), "gw")
    );
    assert_eq!(p.namespace, None, "left as the route gave it");
}
