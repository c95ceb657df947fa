//! The Gateway API at L4 against the fake API server: `lb run --kubernetes` watches
//! GatewayClasses, Gateways, TCPRoutes, UDPRoutes and ReferenceGrants, writes their status, and
//! programs real maps; packets run through the program on those maps (BPF_PROG_TEST_RUN).
//!
//! One scenario per test, modelled on the upstream conformance tests of the same name (read,
//! not copied): each checks the status conditions with their reasons and, where traffic is
//! involved, where packets go.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use lb_common::Counter;
use lb_tests::{
    cluster::{self, World},
    harness::{XDP_DROP, action_name, net::*},
    kubeapi::{FakeApi, gateway_only, granted, rbac_of},
    packet::Pkt,
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const CONTROLLER: &str = "lb.dev/gateway-controller";
const GW_ADDR: &str = "192.0.2.10";

// --- Objects -----------------------------------------------------------------------------------

fn class() -> Value {
    json!({ "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": { "name": "lb" }, "spec": { "controllerName": CONTROLLER } })
}

/// Gateway `name` in namespace `infra` with `listeners`, at `GW_ADDR` unless `addresses` is Null.
fn gateway(name: &str, listeners: Value, addresses: Value) -> Value {
    let mut g = json!({ "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": { "namespace": "infra", "name": name, "uid": format!("uid-gw-{name}") },
            "spec": { "gatewayClassName": "lb", "listeners": listeners } });
    if !addresses.is_null() {
        g["spec"]["addresses"] = addresses;
    }
    g
}

fn at_gw_addr() -> Value {
    json!([{ "type": "IPAddress", "value": GW_ADDR }])
}

fn listener(name: &str, port: u16, protocol: &str) -> Value {
    json!({ "name": name, "port": port, "protocol": protocol,
            "allowedRoutes": { "namespaces": { "from": "All" } } })
}

/// A route of `kind` in namespace `ns` with `parents` and one rule of `backends`, created at
/// second `created` of the day.
fn route(kind: &str, ns: &str, name: &str, parents: Value, backends: Value, created: u32) -> Value {
    json!({ "apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
            "metadata": { "namespace": ns, "name": name,
                          "creationTimestamp": format!("2026-01-01T00:00:{created:02}Z") },
            "spec": { "parentRefs": parents, "rules": [ { "backendRefs": backends } ] } })
}

fn parent(section: Option<&str>, port: Option<u16>) -> Value {
    let mut p = json!({ "name": "gw", "namespace": "infra" });
    if let Some(s) = section {
        p["sectionName"] = json!(s);
    }
    if let Some(port) = port {
        p["port"] = json!(port);
    }
    p
}

fn backend(ns: Option<&str>, name: &str, port: u16, weight: Option<u32>) -> Value {
    let mut b = json!({ "name": name, "port": port });
    if let Some(ns) = ns {
        b["namespace"] = json!(ns);
    }
    if let Some(w) = weight {
        b["weight"] = json!(w);
    }
    b
}

/// A ClusterIP Service `ns/name` with TCP port 80 -> 8080 and UDP port 53 -> 5353, and a slice
/// of `pods` (ready) serving them.
fn service(api: &FakeApi, ns: &str, name: &str, pods: &[&str]) {
    api.apply(json!({ "apiVersion": "v1", "kind": "Service",
        "metadata": { "namespace": ns, "name": name },
        "spec": { "ports": [ { "name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP" },
                             { "name": "udp", "port": 53, "targetPort": 5353, "protocol": "UDP" } ] } }));
    api.apply(json!({ "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "namespace": ns, "name": format!("{name}-1"),
                      "labels": { "kubernetes.io/service-name": name } },
        "addressType": "IPv4",
        "ports": [ { "name": "tcp", "port": 8080, "protocol": "TCP" }, { "name": "udp", "port": 5353, "protocol": "UDP" } ],
        "endpoints": pods.iter().map(|a| json!({ "addresses": [a], "conditions": { "ready": true } })).collect::<Vec<_>>() }));
}

fn grant(to_ns: &str, from_ns: &str) -> Value {
    grant_for("TCPRoute", to_ns, from_ns)
}

/// A ReferenceGrant in `to_ns` letting routes of `kind` in `from_ns` refer to its Services.
fn grant_for(kind: &str, to_ns: &str, from_ns: &str) -> Value {
    json!({ "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
            "metadata": { "namespace": to_ns, "name": "routes-may-refer" },
            "spec": { "from": [ { "group": "gateway.networking.k8s.io", "kind": kind, "namespace": from_ns } ],
                      "to": [ { "group": "", "kind": "Service" } ] } })
}

// --- The world ---------------------------------------------------------------------------------

/// A namespace, the fake API server holding the GatewayClass and what `objects` adds, and the
/// agent started on them.
fn start(tag: &str, objects: impl FnOnce(&FakeApi)) -> World {
    let (net, api, dirs) = cluster::setup(Path::new(BIN), tag);
    api.apply(class());
    objects(&api);
    let agent = cluster::start_agent(&net, &dirs, &[]);
    World::new(net, api, dirs, agent)
}

/// A SYN from client `i` (its own address and port) to `addr:port`.
fn syn(i: u32, addr: &str, port: u16) -> Pkt {
    Pkt::tcp(
        &format!("198.51.100.{}", 1 + i % 250),
        10_000 + (i / 250) as u16,
        addr,
        port,
        LB0_MAC,
    )
}

/// A datagram from client `i` (its own address and port) to `addr:port`.
fn dgram(i: u32, addr: &str, port: u16) -> Pkt {
    Pkt::udp(
        &format!("198.51.100.{}", 1 + i % 250),
        40_000 + (i / 250) as u16,
        addr,
        port,
        LB0_MAC,
    )
}

/// The message of condition `kind` in `conds`.
fn message(conds: &Value, kind: &str) -> String {
    conds
        .as_array()
        .and_then(|a| a.iter().find(|c| c["type"] == kind))
        .and_then(|c| c["message"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Whether Gateway `infra/name` is ready as the conformance suite's setup waits for every
/// Gateway of its namespaces (`NamespacesMustBeReady`): `Accepted` and `Programmed` True, for
/// any reason, each condition of the Gateway's current generation.
fn ready(w: &World, name: &str) -> bool {
    let Some(g) = w.api.get("Gateway", "infra", name) else {
        return false;
    };
    let conds = &g["status"]["conditions"];
    let current = conds.as_array().is_some_and(|a| {
        !a.is_empty()
            && a.iter()
                .all(|c| c["observedGeneration"] == g["metadata"]["generation"])
    });
    let holds = |kind| cond(conds, kind).is_some_and(|(status, _)| status == "True");
    current && holds("Accepted") && holds("Programmed")
}

/// (status, reason) of condition `kind` in `conds`.
fn cond(conds: &Value, kind: &str) -> Option<(String, String)> {
    conds
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
            )
        })
}

fn is(conds: &Value, kind: &str, status: &str, reason: &str) -> bool {
    cond(conds, kind) == Some((status.into(), reason.into()))
}

/// The conditions lb wrote for the route's parentRef number `i`.
fn parent_conds(route_status: &Value, i: usize) -> Value {
    route_status["parents"]
        .as_array()
        .and_then(|p| {
            p.iter()
                .filter(|p| p["controllerName"] == CONTROLLER)
                .nth(i)
        })
        .map(|p| p["conditions"].clone())
        .unwrap_or(Value::Null)
}

fn route_is(s: &Value, accepted: (&str, &str), resolved: (&str, &str)) -> bool {
    let c = parent_conds(s, 0);
    is(&c, "Accepted", accepted.0, accepted.1) && is(&c, "ResolvedRefs", resolved.0, resolved.1)
}

/// The listener `name` of a Gateway status.
fn listener_status<'a>(gw: &'a Value, name: &str) -> &'a Value {
    gw["listeners"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["name"] == name))
        .unwrap_or(&Value::Null)
}

fn pod(a: &str) -> (IpAddr, u16) {
    (a.parse().unwrap(), 8080)
}

// --- Tests -------------------------------------------------------------------------------------

#[test]
fn gatewayclass_of_lbs_controller_is_accepted_with_its_supported_version() {
    let w = start("gw-class", |api| {
        api.apply(json!({ "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": { "name": "someone-else" }, "spec": { "controllerName": "example.com/other" } }));
    });
    let s = w.status("GatewayClass", "", "lb", |s| {
        is(&s["conditions"], "Accepted", "True", "Accepted")
    });
    assert!(
        is(
            &s["conditions"],
            "SupportedVersion",
            "True",
            "SupportedVersion"
        ),
        "{s:#}"
    );
    // Another controller's class is left alone: lb writes no status there. Both classes were
    // there from the first list, which wrote lb's: had it written this one, it would have then.
    let other = w.api.get("GatewayClass", "", "someone-else").unwrap();
    assert!(other["status"].is_null(), "{other:#}");
    assert!(
        w.api
            .lock()
            .patches
            .iter()
            .all(|(r, who, _)| r != "gatewayclasses" || who == "lb"),
        "lb patched another controller's GatewayClass"
    );
}

#[test]
fn parent_ref_port_and_section_name_select_the_listener() {
    let mut w = start("gw-section", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("a", 8001, "TCP"), listener("b", 8002, "TCP")]),
            at_gw_addr(),
        ));
        service(api, "apps", "svc-a", &[TX_V4]);
        service(api, "apps", "svc-b", &[TX_V4_B]);
        api.apply(route(
            "TCPRoute",
            "apps",
            "by-both",
            json!([parent(Some("a"), Some(8001))]),
            json!([backend(None, "svc-a", 80, None)]),
            1,
        ));
        api.apply(route(
            "TCPRoute",
            "apps",
            "by-port",
            json!([parent(None, Some(8002))]),
            json!([backend(None, "svc-b", 80, None)]),
            2,
        ));
        api.apply(route(
            "TCPRoute",
            "apps",
            "mismatch",
            json!([parent(Some("a"), Some(8002))]),
            json!([backend(None, "svc-a", 80, None)]),
            3,
        ));
    });
    for r in ["by-both", "by-port"] {
        w.status("TCPRoute", "apps", r, |s| {
            route_is(s, ("True", "Accepted"), ("True", "ResolvedRefs"))
        });
    }
    w.status("TCPRoute", "apps", "mismatch", |s| {
        is(&parent_conds(s, 0), "Accepted", "False", "NoMatchingParent")
    });
    let gw = w.status("Gateway", "infra", "gw", |s| {
        listener_status(s, "a")["attachedRoutes"] == 1
            && listener_status(s, "b")["attachedRoutes"] == 1
    });
    assert!(
        is(&gw["conditions"], "Programmed", "True", "Programmed"),
        "{gw:#}"
    );
    w.maps("both listeners in the maps", |v| {
        v.as_array().is_some_and(|a| a.len() == 2)
    });
    assert_eq!(w.pod_of(&syn(1, GW_ADDR, 8001)), pod(TX_V4));
    assert_eq!(w.pod_of(&syn(2, GW_ADDR, 8002)), pod(TX_V4_B));
}

#[test]
fn a_parent_ref_without_section_name_or_port_attaches_to_every_listener_of_its_kind() {
    let mut w = start("gw-attach-all", |api| {
        api.apply(gateway(
            "gw",
            json!([
                listener("a", 8001, "TCP"),
                listener("b", 8002, "TCP"),
                listener("dns", 53, "UDP")
            ]),
            at_gw_addr(),
        ));
        service(api, "apps", "svc", &[TX_V4]);
        api.apply(route(
            "TCPRoute",
            "apps",
            "all",
            json!([parent(None, None)]),
            json!([backend(None, "svc", 80, None)]),
            1,
        ));
    });
    let gw = w.status("Gateway", "infra", "gw", |s| {
        listener_status(s, "a")["attachedRoutes"] == 1
            && listener_status(s, "b")["attachedRoutes"] == 1
    });
    assert_eq!(listener_status(&gw, "dns")["attachedRoutes"], 0, "{gw:#}");
    assert_eq!(
        listener_status(&gw, "a")["supportedKinds"],
        json!([{ "group": "gateway.networking.k8s.io", "kind": "TCPRoute" }])
    );
    w.status("TCPRoute", "apps", "all", |s| {
        route_is(s, ("True", "Accepted"), ("True", "ResolvedRefs"))
    });
    w.maps("three listeners in the maps", |v| {
        v.as_array().is_some_and(|a| a.len() == 3)
    });
    assert_eq!(w.pod_of(&syn(1, GW_ADDR, 8001)), pod(TX_V4));
    assert_eq!(w.pod_of(&syn(2, GW_ADDR, 8002)), pod(TX_V4));
}

#[test]
fn a_tcp_route_is_not_allowed_on_udp_or_http_listeners_nor_from_another_namespace() {
    let w = start("gw-not-allowed", |api| {
        api.apply(gateway(
            "gw",
            json!([
                listener("dns", 53, "UDP"),
                listener("web", 8080, "HTTP"),
                { "name": "same", "port": 9000, "protocol": "TCP" }
            ]),
            at_gw_addr(),
        ));
        service(api, "apps", "svc", &[TX_V4]);
        api.apply(route(
            "TCPRoute",
            "apps",
            "to-udp",
            json!([parent(Some("dns"), None)]),
            json!([backend(None, "svc", 80, None)]),
            1,
        ));
        api.apply(route(
            "TCPRoute",
            "apps",
            "to-http",
            json!([parent(Some("web"), None)]),
            json!([backend(None, "svc", 80, None)]),
            2,
        ));
        api.apply(route(
            "TCPRoute",
            "apps",
            "other-ns",
            json!([parent(Some("same"), None)]),
            json!([backend(None, "svc", 80, None)]),
            3,
        ));
    });
    for r in ["to-udp", "to-http", "other-ns"] {
        w.status("TCPRoute", "apps", r, |s| {
            is(
                &parent_conds(s, 0),
                "Accepted",
                "False",
                "NotAllowedByListeners",
            )
        });
    }
    let gw = w.status("Gateway", "infra", "gw", |s| !s["listeners"].is_null());
    let web = &listener_status(&gw, "web")["conditions"];
    assert!(
        is(web, "Accepted", "False", "UnsupportedProtocol"),
        "{gw:#}"
    );
    assert!(is(web, "Programmed", "False", "Invalid"), "{gw:#}");
    for l in ["dns", "web", "same"] {
        assert_eq!(listener_status(&gw, l)["attachedRoutes"], 0, "{l}: {gw:#}");
    }
}

#[test]
fn a_backend_ref_to_a_missing_service_keeps_its_share_and_its_connections_are_reset() {
    let mut w = start("gw-nonexistent", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("tcp", 80, "TCP")]),
            at_gw_addr(),
        ));
        api.apply(route(
            "TCPRoute",
            "apps",
            "r",
            json!([parent(None, None)]),
            json!([backend(None, "no-such-svc", 80, None)]),
            1,
        ));
    });
    let s = w.status("TCPRoute", "apps", "r", |s| {
        route_is(s, ("True", "Accepted"), ("False", "BackendNotFound"))
    });
    assert!(s.to_string().contains("no-such-svc"), "{s:#}");
    w.maps("the rejecting share", |v| {
        v.as_array().is_some_and(|a| a.len() == 1)
    });
    let before = w.counter(Counter::TxReset);
    for i in 0..20 {
        assert!(w.is_reset(&syn(i, GW_ADDR, 80)), "SYN {i} not reset");
    }
    assert_eq!(w.counter(Counter::TxReset), before + 20);
    // `lb explain` says the same as the program.
    let p = syn(100, GW_ADDR, 80);
    let e = w.dirs.json(&[
        "explain",
        &format!("{}:{}", p.src, p.sport),
        &format!("{GW_ADDR}:80"),
        "tcp",
        "--syn",
    ]);
    assert_eq!(
        (&e["verdict"], &e["reason"]),
        (&json!("reset"), &json!("rejected share")),
        "{e:#}"
    );
}

#[test]
fn a_cross_namespace_backend_ref_without_a_reference_grant_is_not_permitted() {
    let mut w = start("gw-cross-ns", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("tcp", 80, "TCP")]),
            at_gw_addr(),
        ));
        service(api, "backends", "svc", &[TX_V4]);
        api.apply(route(
            "TCPRoute",
            "apps",
            "r",
            json!([parent(None, None)]),
            json!([backend(Some("backends"), "svc", 80, None)]),
            1,
        ));
    });
    w.status("TCPRoute", "apps", "r", |s| {
        route_is(s, ("True", "Accepted"), ("False", "RefNotPermitted"))
    });
    w.maps("the rejecting share", |v| {
        v.as_array().is_some_and(|a| a.len() == 1)
    });
    assert!(w.is_reset(&syn(1, GW_ADDR, 80)));
}

#[test]
fn a_reference_grant_permits_a_cross_namespace_backend_and_its_removal_revokes_it() {
    let mut w = start("gw-grant", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("tcp", 80, "TCP")]),
            at_gw_addr(),
        ));
        service(api, "backends", "svc", &[TX_V4]);
        api.apply(grant("backends", "apps"));
        api.apply(route(
            "TCPRoute",
            "apps",
            "r",
            json!([parent(None, None)]),
            json!([backend(Some("backends"), "svc", 80, None)]),
            1,
        ));
    });
    w.status("TCPRoute", "apps", "r", |s| {
        route_is(s, ("True", "Accepted"), ("True", "ResolvedRefs"))
    });
    w.maps("the granted backend", |v| {
        v[0]["backends"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b["backend"]["address"] == TX_V4))
    });
    assert_eq!(w.pod_of(&syn(1, GW_ADDR, 80)), pod(TX_V4));

    w.api
        .delete("ReferenceGrant", "backends", "routes-may-refer");
    w.status("TCPRoute", "apps", "r", |s| {
        route_is(s, ("True", "Accepted"), ("False", "RefNotPermitted"))
    });
    w.maps("the grant revoked", |v| {
        v[0]["backends"]
            .as_array()
            .is_some_and(|b| b.iter().all(|b| b["backend"]["address"] != TX_V4))
    });
    assert!(
        w.is_reset(&syn(2, GW_ADDR, 80)),
        "a new connection after the revocation"
    );
}

#[test]
fn several_routes_on_one_listener_are_all_accepted_and_only_the_oldest_carries_traffic() {
    let mut w = start("gw-multi", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("tcp", 80, "TCP")]),
            at_gw_addr(),
        ));
        service(api, "apps", "old", &[TX_V4]);
        service(api, "apps", "new", &[TX_V4_B]);
        // Named so that name order and age disagree.
        api.apply(route(
            "TCPRoute",
            "apps",
            "a-newer",
            json!([parent(None, None)]),
            json!([backend(None, "new", 80, None)]),
            30,
        ));
        api.apply(route(
            "TCPRoute",
            "apps",
            "z-older",
            json!([parent(None, None)]),
            json!([backend(None, "old", 80, None)]),
            10,
        ));
    });
    for r in ["a-newer", "z-older"] {
        w.status("TCPRoute", "apps", r, |s| {
            route_is(s, ("True", "Accepted"), ("True", "ResolvedRefs"))
        });
    }
    w.status("Gateway", "infra", "gw", |s| {
        listener_status(s, "tcp")["attachedRoutes"] == 2
    });
    w.maps("the oldest route's backend", |v| {
        v[0]["backends"]
            .as_array()
            .is_some_and(|b| b.len() == 1 && b[0]["backend"]["address"] == TX_V4)
    });
    for i in 0..20 {
        assert_eq!(w.pod_of(&syn(i, GW_ADDR, 80)), pod(TX_V4));
    }
    // The oldest goes: the next oldest takes over.
    w.api.delete("TCPRoute", "apps", "z-older");
    w.status("Gateway", "infra", "gw", |s| {
        listener_status(s, "tcp")["attachedRoutes"] == 1
    });
    w.maps("the remaining route's backend", |v| {
        v[0]["backends"]
            .as_array()
            .is_some_and(|b| b.len() == 1 && b[0]["backend"]["address"] == TX_V4_B)
    });
    assert_eq!(w.pod_of(&syn(100, GW_ADDR, 80)), pod(TX_V4_B));
}

#[test]
fn weighted_backend_refs_split_new_connections_70_30_and_weight_0_gets_none() {
    let (a, b, c) = ("10.1.0.11", "10.1.0.12", "10.1.0.13");
    let mut w = weighted_world("gw-weighted", "TCPRoute", (a, b, c));
    let mut counts: BTreeMap<IpAddr, u32> = BTreeMap::new();
    let n = 500;
    for i in 0..n {
        *counts.entry(w.pod_of(&syn(i, GW_ADDR, 80)).0).or_default() += 1;
    }
    assert_shares(&counts, n, (a, b, c));
}

#[test]
fn a_udp_route_reaches_its_udp_server() {
    let mut w = start("gw-udp", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("dns", 53, "UDP")]),
            at_gw_addr(),
        ));
        service(api, "apps", "dns", &[TX_V4]);
        api.apply(route(
            "UDPRoute",
            "apps",
            "dns",
            json!([parent(None, None)]),
            json!([backend(None, "dns", 53, None)]),
            1,
        ));
    });
    w.status("UDPRoute", "apps", "dns", |s| {
        route_is(s, ("True", "Accepted"), ("True", "ResolvedRefs"))
    });
    let gw = w.status("Gateway", "infra", "gw", |s| {
        listener_status(s, "dns")["attachedRoutes"] == 1
    });
    assert_eq!(
        listener_status(&gw, "dns")["supportedKinds"],
        json!([{ "group": "gateway.networking.k8s.io", "kind": "UDPRoute" }])
    );
    w.maps("the UDP VIP", |v| {
        v[0]["vip"]["label"] == format!("{GW_ADDR}:53/udp")
    });
    let q = Pkt::udp("198.51.100.7", 40000, GW_ADDR, 53, LB0_MAC);
    assert_eq!(w.pod_of(&q), (TX_V4.parse().unwrap(), 5353));
}

#[test]
fn a_gateway_takes_its_addresses_from_spec_addresses() {
    let w = start("gw-spec-addr", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("tcp", 80, "TCP")]),
            json!([{ "type": "IPAddress", "value": GW_ADDR }, { "value": "2001:db8::10" }]),
        ));
    });
    let gw = w.status("Gateway", "infra", "gw", |s| {
        is(&s["conditions"], "Programmed", "True", "Programmed")
    });
    assert_eq!(
        gw["addresses"],
        json!([{ "type": "IPAddress", "value": GW_ADDR }, { "type": "IPAddress", "value": "2001:db8::10" }])
    );
    assert!(
        is(&gw["conditions"], "Accepted", "True", "Accepted"),
        "{gw:#}"
    );
    w.maps("a VIP per address", |v| {
        v.as_array().is_some_and(|a| a.len() == 2)
    });
    assert!(
        w.api.lock().applied.is_empty(),
        "no LoadBalancer Service with spec.addresses"
    );
}

#[test]
fn a_gateway_without_addresses_gets_them_from_the_load_balancer_service_lb_makes() {
    let mut w = start("gw-lb-addr", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("tcp", 80, "TCP"), listener("dns", 53, "UDP")]),
            Value::Null,
        ));
        service(api, "apps", "svc", &[TX_V4]);
        api.apply(route(
            "TCPRoute",
            "apps",
            "r",
            json!([parent(None, None)]),
            json!([backend(None, "svc", 80, None)]),
            1,
        ));
    });
    let gw = w.status("Gateway", "infra", "gw", |s| {
        is(
            &s["conditions"],
            "Programmed",
            "False",
            "AddressNotAssigned",
        )
    });
    assert_eq!(gw["addresses"], json!([]));
    let svc = w.until("the LoadBalancer Service", |w| {
        w.api.get("Service", "infra", "gw-lb")
    });
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["metadata"]["labels"]["lb.dev/class"], "default");
    assert_eq!(
        svc["metadata"]["ownerReferences"][0],
        json!({ "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "name": "gw",
                "uid": "uid-gw-gw", "controller": true })
    );
    assert_eq!(
        svc["spec"]["ports"],
        json!([{ "name": "udp-53", "port": 53, "protocol": "UDP" }, { "name": "tcp-80", "port": 80, "protocol": "TCP" }])
    );
    // The cluster's allocator fills in an address.
    let mut filled = svc.clone();
    filled["status"] = json!({ "loadBalancer": { "ingress": [ { "ip": GW_ADDR } ] } });
    w.api.apply(filled);
    let gw = w.status("Gateway", "infra", "gw", |s| {
        is(&s["conditions"], "Programmed", "True", "Programmed")
    });
    assert_eq!(
        gw["addresses"],
        json!([{ "type": "IPAddress", "value": GW_ADDR }])
    );
    w.maps("the Gateway's VIPs", |v| {
        v.as_array().is_some_and(|a| a.len() == 2)
    });
    assert_eq!(w.pod_of(&syn(1, GW_ADDR, 80)), pod(TX_V4));
    // The Service itself is not served as a VIP of its own (it has no endpoints): only the
    // Gateway's listeners are.
    let v = w.dirs.json(&["backends"]);
    assert!(
        v.as_array().unwrap().iter().all(|x| x["vip"]["name"]
            .as_str()
            .unwrap_or("")
            .starts_with("infra/gw:")),
        "{v:#}"
    );
}

#[test]
fn listeners_sharing_a_port_and_transport_conflict_and_tcp_and_udp_on_one_port_do_not() {
    let mut w = start("gw-conflict", |api| {
        api.apply(gateway(
            "gw",
            json!([
                listener("tcp", 80, "TCP"),
                listener("udp", 80, "UDP"),
                listener("tcp-again", 80, "TCP"),
                listener("tls", 80, "TLS")
            ]),
            at_gw_addr(),
        ));
        service(api, "apps", "svc", &[TX_V4]);
        api.apply(route(
            "TCPRoute",
            "apps",
            "r",
            json!([parent(None, None)]),
            json!([backend(None, "svc", 80, None)]),
            1,
        ));
    });
    let gw = w.status("Gateway", "infra", "gw", |s| {
        is(
            &listener_status(s, "tcp")["conditions"],
            "Programmed",
            "True",
            "Programmed",
        )
    });
    let c = |l: &str| listener_status(&gw, l)["conditions"].clone();
    assert!(
        is(&c("tcp"), "Conflicted", "False", "NoConflicts"),
        "{gw:#}"
    );
    assert!(
        is(&c("udp"), "Conflicted", "False", "NoConflicts"),
        "{gw:#}"
    );
    assert!(
        is(&c("tcp-again"), "Conflicted", "True", "HostnameConflict"),
        "{gw:#}"
    );
    assert!(
        is(&c("tcp-again"), "Accepted", "False", "PortUnavailable"),
        "{gw:#}"
    );
    assert!(
        is(&c("tls"), "Conflicted", "True", "ProtocolConflict"),
        "{gw:#}"
    );
    assert_eq!(listener_status(&gw, "tcp")["attachedRoutes"], 1);
    assert_eq!(listener_status(&gw, "tcp-again")["attachedRoutes"], 0);
    w.maps("TCP and UDP on port 80", |v| {
        v.as_array().is_some_and(|a| a.len() == 2)
    });
    assert_eq!(w.pod_of(&syn(1, GW_ADDR, 80)), pod(TX_V4));
}

#[test]
fn differing_policies_of_one_rules_services_are_not_applied_and_say_conflicted() {
    let policy = |name: &str, slots: u32| {
        json!({ "apiVersion": "lb.dev/v1alpha1", "kind": "UpstreamPolicy",
                "metadata": { "namespace": "apps", "name": name }, "spec": { "slots": slots } })
    };
    let annotate = |api: &FakeApi, svc: &str, p: &str| {
        let mut s = api.get("Service", "apps", svc).unwrap();
        s["metadata"]["annotations"] = json!({ "lb.dev/upstream-policy": p });
        api.apply(s);
    };
    let w = start("gw-policy", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("tcp", 80, "TCP")]),
            at_gw_addr(),
        ));
        service(api, "apps", "a", &[TX_V4]);
        service(api, "apps", "b", &[TX_V4_B]);
        api.apply(policy("small", 251));
        api.apply(policy("smaller", 241));
        annotate(api, "a", "small");
        annotate(api, "b", "smaller");
        api.apply(route(
            "TCPRoute",
            "apps",
            "r",
            json!([parent(None, None)]),
            json!([backend(None, "a", 80, None), backend(None, "b", 80, None)]),
            1,
        ));
    });
    let conflicted = |w: &World, p: &str, status: &str, reason: &str| {
        w.until(&format!("UpstreamPolicy {p} Conflicted={status}"), |w| {
            let s = w.api.get("UpstreamPolicy", "apps", p)?;
            is(&s["status"]["conditions"], "Conflicted", status, reason).then_some(s)
        })
    };
    let s = conflicted(&w, "small", "True", "Conflicted");
    assert!(s.to_string().contains("TCPRoute apps/r"), "{s:#}");
    conflicted(&w, "smaller", "True", "Conflicted");
    w.maps("the node's table size: no policy applied", |v| {
        v[0]["table_size"] == 1009
    });

    annotate(&w.api, "b", "small");
    w.maps("the shared policy's table size", |v| {
        v[0]["table_size"] == 251
    });
    conflicted(&w, "small", "False", "NoConflicts");
}

/// A TCPRoute over Services `a` and `b`, both annotated with UpstreamPolicy `p` of `spec`.
fn route_with_policy(tag: &str, spec: Value) -> World {
    start(tag, |api| {
        api.apply(gateway(
            "gw",
            json!([listener("tcp", 80, "TCP")]),
            at_gw_addr(),
        ));
        for (svc, pod) in [("a", TX_V4), ("b", TX_V4_B)] {
            service(api, "apps", svc, &[pod]);
            let mut s = api.get("Service", "apps", svc).unwrap();
            s["metadata"]["annotations"] = json!({ "lb.dev/upstream-policy": "p" });
            api.apply(s);
        }
        api.apply(
            json!({ "apiVersion": "lb.dev/v1alpha1", "kind": "UpstreamPolicy",
                          "metadata": { "namespace": "apps", "name": "p" }, "spec": spec }),
        );
        api.apply(route(
            "TCPRoute",
            "apps",
            "r",
            json!([parent(None, None)]),
            json!([backend(None, "a", 80, None), backend(None, "b", 80, None)]),
            1,
        ));
    })
}

fn policy_accepted(w: &World, status: &str) -> Value {
    w.until(&format!("UpstreamPolicy p Accepted={status}"), |w| {
        let p = w.api.get("UpstreamPolicy", "apps", "p")?;
        let c = p["status"]["conditions"].as_array()?;
        c.iter()
            .find(|c| c["type"] == "Accepted" && c["status"] == status)
            .cloned()
    })
}

#[test]
fn client_ip_session_persistence_on_a_routes_services_keeps_each_client_on_one_pod() {
    let spec = json!({ "sessionPersistence": { "type": "ClientIP", "idleTimeout": "1h" } });
    let mut w = route_with_policy("gw-persist", spec);
    policy_accepted(&w, "True");
    w.maps("the route's VIP with a client affinity of an hour", |v| {
        v[0]["affinity_timeout_s"] == 3600
            && v[0]["backends"].as_array().is_some_and(|b| b.len() == 2)
    });
    // 40 connections from each of 10 clients, each from its own port: one pod per client, and
    // both pods used (by the clients' first connections).
    let mut pods = std::collections::BTreeSet::new();
    for client in 0..10u32 {
        let of =
            |w: &mut World, port: u16| w.pod_of(&syn(client, GW_ADDR, 80).with(|p| p.sport = port));
        let first = of(&mut w, 20_000);
        for port in 20_001..20_040 {
            assert_eq!(of(&mut w, port), first, "client {client}, port {port}");
        }
        pods.insert(first);
    }
    assert_eq!(pods.len(), 2, "{pods:?}");
}

#[test]
fn session_persistence_by_cookie_is_refused_in_the_policys_status_and_not_programmed() {
    let spec = json!({ "sessionPersistence": { "type": "Cookie", "idleTimeout": "1h" } });
    let w = route_with_policy("gw-persist-cookie", spec);
    let c = policy_accepted(&w, "False");
    assert_eq!(c["reason"], "UnsupportedSessionPersistence", "{c:#}");
    w.maps("the route's VIP without client affinity", |v| {
        v[0]["affinity_timeout_s"] == 0 && v[0]["backends"].as_array().is_some_and(|b| b.len() == 2)
    });
}

#[test]
fn the_agent_makes_only_requests_rbac_grants_and_uses_every_gateway_api_grant() {
    let w = start("gw-rbac", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("tcp", 80, "TCP"), listener("dns", 53, "UDP")]),
            Value::Null,
        ));
        service(api, "backends", "svc", &[TX_V4]);
        api.apply(grant("backends", "apps"));
        api.apply(
            json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "apps" } }),
        );
        api.apply(route(
            "TCPRoute",
            "apps",
            "t",
            json!([parent(None, None)]),
            json!([backend(Some("backends"), "svc", 80, None)]),
            1,
        ));
        api.apply(route(
            "UDPRoute",
            "apps",
            "u",
            json!([parent(None, None)]),
            json!([backend(None, "nope", 53, None)]),
            2,
        ));
    });
    w.status("TCPRoute", "apps", "t", |s| {
        route_is(s, ("True", "Accepted"), ("True", "ResolvedRefs"))
    });
    w.status("UDPRoute", "apps", "u", |s| {
        route_is(s, ("True", "Accepted"), ("False", "BackendNotFound"))
    });
    w.status("Gateway", "infra", "gw", |s| !s.is_null());
    w.status("GatewayClass", "", "lb", |s| !s.is_null());
    w.until("the LoadBalancer Service", |w| {
        w.api.get("Service", "infra", "gw-lb")
    });

    let granted = granted();
    let made: Vec<(String, String, String)> = w
        .api
        .requests(" -> ")
        .iter()
        .filter_map(|r| rbac_of(r))
        .collect();
    for m in &made {
        assert!(
            granted.contains(m),
            "the agent made a request RBAC does not grant: {m:?}"
        );
    }
    for g in granted.iter().filter(|(g, r, v)| gateway_only(g, r, v)) {
        assert!(
            made.contains(g),
            "deploy/rbac.yaml grants {g:?}, which the agent never used"
        );
    }
    // Discovery asked once per Gateway API version, at start.
    assert_eq!(
        w.api
            .requests("GET /apis/gateway.networking.k8s.io/v1 ")
            .len(),
        1
    );
}

#[test]
fn routes_are_read_at_v1alpha2_where_v1_is_not_served() {
    let mut w = start("gw-alpha", |api| {
        api.hide("gateway.networking.k8s.io/v1", "tcproutes");
        api.apply(gateway(
            "gw",
            json!([listener("tcp", 80, "TCP")]),
            at_gw_addr(),
        ));
        service(api, "apps", "svc", &[TX_V4]);
        let mut r = route(
            "TCPRoute",
            "apps",
            "r",
            json!([parent(None, None)]),
            json!([backend(None, "svc", 80, None)]),
            1,
        );
        r["apiVersion"] = json!("gateway.networking.k8s.io/v1alpha2");
        api.apply(r);
    });
    w.status("TCPRoute", "apps", "r", |s| {
        route_is(s, ("True", "Accepted"), ("True", "ResolvedRefs"))
    });
    assert!(
        !w.api
            .requests("/apis/gateway.networking.k8s.io/v1alpha2/tcproutes")
            .is_empty()
    );
    assert!(
        w.api
            .requests("/apis/gateway.networking.k8s.io/v1/tcproutes")
            .is_empty()
    );
    w.maps("the route's backend", |v| {
        v.as_array().is_some_and(|a| a.len() == 1)
    });
    assert_eq!(w.pod_of(&syn(1, GW_ADDR, 80)), pod(TX_V4));
}

/// The notes of the Normal `Programmed` Events recorded on the TCPRoute `apps/name`.
fn programmed_notes(api: &FakeApi, name: &str) -> Vec<String> {
    api.lock()
        .events
        .iter()
        .filter(|e| {
            e["reason"] == "Programmed"
                && e["type"] == "Normal"
                && e["regarding"]["kind"] == "TCPRoute"
                && e["regarding"]["name"] == name
        })
        .map(|e| e["note"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn the_route_carrying_a_listeners_traffic_gets_a_programmed_event_and_its_successor_one_too() {
    let w = start("gw-event", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("tcp", 80, "TCP")]),
            at_gw_addr(),
        ));
        service(api, "apps", "old", &[TX_V4]);
        service(api, "apps", "new", &[TX_V4_B]);
        for (name, svc, created) in [("a-newer", "new", 30), ("z-older", "old", 10)] {
            api.apply(route(
                "TCPRoute",
                "apps",
                name,
                json!([parent(None, None)]),
                json!([backend(None, svc, 80, None)]),
                created,
            ));
        }
    });
    let note = format!("{GW_ADDR}:80/tcp in the maps of 1 node");
    w.until("z-older's Programmed Event", |w| {
        (!programmed_notes(&w.api, "z-older").is_empty()).then_some(())
    });
    // A change the maps take and the Event does not show: a second pod behind the old route.
    service(&w.api, "apps", "old", &[TX_V4, TX_V4_B]);
    w.maps("the old route's second pod", |v| {
        v[0]["backends"].as_array().is_some_and(|b| b.len() == 2)
    });
    // The oldest goes: the next oldest carries the traffic, and says so.
    w.api.delete("TCPRoute", "apps", "z-older");
    w.until("a-newer's Programmed Event", |w| {
        (!programmed_notes(&w.api, "a-newer").is_empty()).then_some(())
    });
    let (older, newer) = (
        programmed_notes(&w.api, "z-older"),
        programmed_notes(&w.api, "a-newer"),
    );
    assert_eq!(
        older,
        [note.as_str()],
        "one Event while it carried the traffic"
    );
    assert_eq!(newer, [note.as_str()], "none while it carried nothing");
}

// --- Modelled on the upstream L4 conformance suite (docs/conformance.md maps each) ------------

#[test]
fn gatewayclass_status_lists_exactly_the_features_lb_implements() {
    let w = start("gw-features", |_| {});
    let s = w.status("GatewayClass", "", "lb", |s| {
        !s["supportedFeatures"].is_null()
    });
    // Sorted by name, as the API asks; what the suite infers the tests to run from.
    assert_eq!(
        s["supportedFeatures"],
        json!([{ "name": "Gateway" }, { "name": "ReferenceGrant" },
               { "name": "TCPRoute" }, { "name": "UDPRoute" }])
    );
}

#[test]
fn gatewayclass_supported_version_names_reference_grant_v1_where_v1_is_served() {
    let w = start("gw-grant-v1", |_| {});
    let s = w.status("GatewayClass", "", "lb", |s| {
        cond(&s["conditions"], "SupportedVersion").is_some()
    });
    assert_eq!(
        message(&s["conditions"], "SupportedVersion"),
        "lb reads GatewayClass and Gateway v1, TCPRoute v1, UDPRoute v1, ReferenceGrant v1"
    );
    assert!(
        !w.api
            .requests("/apis/gateway.networking.k8s.io/v1/referencegrants")
            .is_empty(),
        "ReferenceGrants are watched at v1"
    );
}

#[test]
fn gatewayclass_supported_version_names_reference_grant_v1beta1_where_only_it_is_served() {
    let w = start("gw-grant-v1beta1", |api| {
        api.hide("gateway.networking.k8s.io/v1", "referencegrants");
    });
    let s = w.status("GatewayClass", "", "lb", |s| {
        cond(&s["conditions"], "SupportedVersion").is_some()
    });
    assert!(
        message(&s["conditions"], "SupportedVersion").ends_with("ReferenceGrant v1beta1"),
        "{s:#}"
    );
}

/// The suite's setup: its base manifests' Gateways have HTTP and HTTPS listeners only, and every
/// Gateway of its namespaces must become Accepted and Programmed before any test runs.
#[test]
fn namespaces_must_be_ready_with_http_only_gateways_beside_a_served_tcp_route() {
    let mut w = start("gw-ready", |api| {
        api.apply(gateway(
            "same-namespace",
            json!([listener("http", 80, "HTTP")]),
            Value::Null,
        ));
        api.apply(gateway(
            "same-namespace-with-https-listener",
            json!([listener("https", 443, "HTTPS")]),
            Value::Null,
        ));
        api.apply(gateway(
            "gw",
            json!([listener("tcp", 80, "TCP")]),
            at_gw_addr(),
        ));
        service(api, "apps", "svc", &[TX_V4]);
        api.apply(route(
            "TCPRoute",
            "apps",
            "r",
            json!([parent(None, None)]),
            json!([backend(None, "svc", 80, None)]),
            1,
        ));
    });
    let names = ["same-namespace", "same-namespace-with-https-listener", "gw"];
    w.until("every Gateway in infra Accepted and Programmed", |w| {
        names.iter().all(|n| ready(w, n)).then_some(())
    });
    let http = w.api.get("Gateway", "infra", "same-namespace").unwrap()["status"].clone();
    assert!(
        is(&http["conditions"], "Accepted", "True", "ListenersNotValid"),
        "{http:#}"
    );
    assert!(
        message(&http["conditions"], "Programmed").contains("nothing to program"),
        "{http:#}"
    );
    assert_eq!(http["addresses"], json!([]), "nothing is bound to it");
    let l = &listener_status(&http, "http")["conditions"];
    assert!(
        is(l, "Accepted", "False", "UnsupportedProtocol"),
        "{http:#}"
    );
    assert!(is(l, "Programmed", "False", "Invalid"), "{http:#}");
    assert!(
        w.api.get("Service", "infra", "same-namespace-lb").is_none(),
        "no address is asked for a Gateway lb serves nothing of"
    );
    w.maps("the TCP Gateway's VIP only", |v| {
        v.as_array().is_some_and(|a| a.len() == 1)
    });
    assert_eq!(w.pod_of(&syn(1, GW_ADDR, 80)), pod(TX_V4));
}

#[test]
fn tcproute_invalid_non_tcp_listener_of_an_http_only_gateway_is_not_allowed_and_attaches_nothing() {
    let w = start("gw-non-tcp", |api| {
        let mut l = listener("only-allow-http-routes", 5300, "HTTP");
        l["allowedRoutes"]["kinds"] = json!([{ "kind": "HTTPRoute" }]);
        api.apply(gateway("gw", json!([l]), Value::Null));
        service(api, "infra", "tcp-echo", &[TX_V4]);
        api.apply(route(
            "TCPRoute",
            "infra",
            "tcp-route",
            json!([parent(Some("only-allow-http-routes"), None)]),
            json!([backend(None, "tcp-echo", 80, None)]),
            1,
        ));
    });
    w.until("the HTTP-only Gateway ready", |w| {
        ready(w, "gw").then_some(())
    });
    w.status("TCPRoute", "infra", "tcp-route", |s| {
        is(
            &parent_conds(s, 0),
            "Accepted",
            "False",
            "NotAllowedByListeners",
        )
    });
    let gw = w.status("Gateway", "infra", "gw", |s| !s["listeners"].is_null());
    let l = listener_status(&gw, "only-allow-http-routes");
    assert_eq!(l["attachedRoutes"], 0, "{gw:#}");
    assert_eq!(l["supportedKinds"], json!([]), "{gw:#}");
}

#[test]
fn gateway_listener_unsupported_protocol_with_no_defined_protocol_leaves_the_gateway_not_accepted()
{
    let w = start("gw-invalid-proto", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("invalid", 1111, "INVALID")]),
            Value::Null,
        ));
    });
    let gw = w.status("Gateway", "infra", "gw", |s| {
        is(&s["conditions"], "Accepted", "False", "ListenersNotValid")
    });
    assert!(
        is(&gw["conditions"], "Programmed", "False", "Invalid"),
        "{gw:#}"
    );
    let l = listener_status(&gw, "invalid");
    assert!(
        is(&l["conditions"], "Accepted", "False", "UnsupportedProtocol"),
        "{gw:#}"
    );
    assert_eq!(l["supportedKinds"], json!([]));
}

#[test]
fn route_parent_status_names_the_gateway_with_the_group_and_kind_the_spec_left_to_defaulting() {
    let w = start("gw-parent-gk", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("tcp", 80, "TCP")]),
            at_gw_addr(),
        ));
        service(api, "apps", "svc", &[TX_V4]);
        // parent() sets neither group nor kind, and the in-test API server defaults nothing.
        api.apply(route(
            "TCPRoute",
            "apps",
            "r",
            json!([parent(Some("tcp"), None)]),
            json!([backend(None, "svc", 80, None)]),
            1,
        ));
    });
    let s = w.status("TCPRoute", "apps", "r", |s| {
        route_is(s, ("True", "Accepted"), ("True", "ResolvedRefs"))
    });
    assert_eq!(
        s["parents"][0]["parentRef"],
        json!({ "group": "gateway.networking.k8s.io", "kind": "Gateway",
                "namespace": "infra", "name": "gw", "sectionName": "tcp" })
    );
}

#[test]
fn tcproute_invalid_cross_namespace_backend_ref_to_a_service_that_exists_nowhere_is_ref_not_permitted()
 {
    let w = start("gw-cross-missing", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("tcp", 80, "TCP")]),
            at_gw_addr(),
        ));
        api.apply(route(
            "TCPRoute",
            "apps",
            "r",
            json!([parent(None, None)]),
            json!([backend(Some("backends"), "no-such-svc", 80, None)]),
            1,
        ));
    });
    // The grant is checked before the Service is looked for: nothing about the other namespace
    // (not even whether the Service exists) shows without one.
    let s = w.status("TCPRoute", "apps", "r", |s| {
        route_is(s, ("True", "Accepted"), ("False", "RefNotPermitted"))
    });
    assert!(
        !message(&parent_conds(&s, 0), "ResolvedRefs").contains("no such Service"),
        "{s:#}"
    );
}

#[test]
fn tcproute_weighted_routing_splits_500_connections_from_one_client_address_70_30_0() {
    let (a, b, c) = ("10.1.0.11", "10.1.0.12", "10.1.0.13");
    let mut w = weighted_world("gw-weighted-ports", "TCPRoute", (a, b, c));
    let n = 500;
    let mut counts: BTreeMap<IpAddr, u32> = BTreeMap::new();
    for i in 0..n {
        // One client address, a new source port per connection, as the suite's client makes.
        let p = Pkt::tcp("198.51.100.7", 20_000 + i as u16, GW_ADDR, 80, LB0_MAC);
        *counts.entry(w.pod_of(&p).0).or_default() += 1;
    }
    assert_shares(&counts, n, (a, b, c));
}

#[test]
fn udproute_weighted_routing_splits_500_datagrams_from_one_client_address_70_30_0() {
    let (a, b, c) = ("10.1.0.11", "10.1.0.12", "10.1.0.13");
    let mut w = weighted_world("gw-udp-weighted", "UDPRoute", (a, b, c));
    let n = 500;
    let mut counts: BTreeMap<IpAddr, u32> = BTreeMap::new();
    for i in 0..n {
        let p = Pkt::udp("198.51.100.7", 20_000 + i as u16, GW_ADDR, 53, LB0_MAC);
        *counts.entry(w.pod_of(&p).0).or_default() += 1;
    }
    assert_shares(&counts, n, (a, b, c));
}

/// A Gateway with a listener of `kind`'s protocol (TCP 80 or UDP 53) and a route of `kind`
/// over Services with weights 70, 30 and 0 (pods `a`, `b`, `c`), once its three members are in
/// the maps.
fn weighted_world(tag: &str, kind: &str, (a, b, c): (&str, &str, &str)) -> World {
    let (l, port) = match kind {
        "TCPRoute" => (listener("tcp", 80, "TCP"), 80),
        _ => (listener("udp", 53, "UDP"), 53),
    };
    let w = start(tag, |api| {
        api.apply(gateway("gw", json!([l]), at_gw_addr()));
        service(api, "apps", "seventy", &[a]);
        service(api, "apps", "thirty", &[b]);
        service(api, "apps", "zero", &[c]);
        api.apply(route(
            kind,
            "apps",
            "r",
            json!([parent(None, None)]),
            json!([
                backend(None, "seventy", port, Some(70)),
                backend(None, "thirty", port, Some(30)),
                backend(None, "zero", port, Some(0))
            ]),
            1,
        ));
    });
    w.maps("three members", |v| {
        v[0]["backends"].as_array().is_some_and(|b| b.len() == 3)
    });
    w
}

/// The suite's check: each share within 5 points of its weight's, none for weight 0.
fn assert_shares(counts: &BTreeMap<IpAddr, u32>, n: u32, (a, b, c): (&str, &str, &str)) {
    let share =
        |p: &str| f64::from(counts.get(&p.parse().unwrap()).copied().unwrap_or(0)) / f64::from(n);
    assert!((share(a) - 0.70).abs() <= 0.05, "70: {counts:?}");
    assert!((share(b) - 0.30).abs() <= 0.05, "30: {counts:?}");
    assert_eq!(share(c), 0.0, "weight 0 takes nothing: {counts:?}");
}

#[test]
fn udproute_parentref_attach_all_listeners_reaches_the_backend_on_every_udp_listener() {
    let mut w = start("gw-udp-all", |api| {
        api.apply(gateway(
            "gw",
            json!([
                listener("udp-a", 5300, "UDP"),
                listener("udp-b", 5301, "UDP"),
                listener("tcp", 8080, "TCP")
            ]),
            at_gw_addr(),
        ));
        service(api, "apps", "dns", &[TX_V4]);
        api.apply(route(
            "UDPRoute",
            "apps",
            "all",
            json!([parent(None, None)]),
            json!([backend(None, "dns", 53, None)]),
            1,
        ));
    });
    let gw = w.status("Gateway", "infra", "gw", |s| {
        listener_status(s, "udp-a")["attachedRoutes"] == 1
            && listener_status(s, "udp-b")["attachedRoutes"] == 1
    });
    assert_eq!(listener_status(&gw, "tcp")["attachedRoutes"], 0, "{gw:#}");
    w.status("UDPRoute", "apps", "all", |s| {
        route_is(s, ("True", "Accepted"), ("True", "ResolvedRefs"))
    });
    w.maps("three listeners in the maps", |v| {
        v.as_array().is_some_and(|a| a.len() == 3)
    });
    let dns = (TX_V4.parse().unwrap(), 5353);
    assert_eq!(w.pod_of(&dgram(1, GW_ADDR, 5300)), dns);
    assert_eq!(w.pod_of(&dgram(2, GW_ADDR, 5301)), dns);
}

#[test]
fn udproute_parentref_port_and_section_name_select_the_udp_listener() {
    let mut w = start("gw-udp-section", |api| {
        api.apply(gateway(
            "gw",
            json!([
                listener("a", 5300, "UDP"),
                listener("b", 5301, "UDP"),
                listener("c", 5302, "UDP")
            ]),
            at_gw_addr(),
        ));
        service(api, "apps", "svc-a", &[TX_V4]);
        service(api, "apps", "svc-b", &[TX_V4_B]);
        let parents = [
            ("by-both", parent(Some("a"), Some(5300)), "svc-a"),
            ("by-port", parent(None, Some(5301)), "svc-b"),
            ("by-section", parent(Some("c"), None), "svc-a"),
            ("mismatch", parent(Some("a"), Some(5301)), "svc-a"),
        ];
        for (i, (name, p, svc)) in parents.into_iter().enumerate() {
            api.apply(route(
                "UDPRoute",
                "apps",
                name,
                json!([p]),
                json!([backend(None, svc, 53, None)]),
                i as u32 + 1,
            ));
        }
    });
    for r in ["by-both", "by-port", "by-section"] {
        w.status("UDPRoute", "apps", r, |s| {
            route_is(s, ("True", "Accepted"), ("True", "ResolvedRefs"))
        });
    }
    w.status("UDPRoute", "apps", "mismatch", |s| {
        is(&parent_conds(s, 0), "Accepted", "False", "NoMatchingParent")
    });
    w.maps("three listeners in the maps", |v| {
        v.as_array().is_some_and(|a| a.len() == 3)
    });
    let at = |a: &str| (a.parse::<IpAddr>().unwrap(), 5353);
    assert_eq!(w.pod_of(&dgram(1, GW_ADDR, 5300)), at(TX_V4));
    assert_eq!(w.pod_of(&dgram(2, GW_ADDR, 5301)), at(TX_V4_B));
    assert_eq!(w.pod_of(&dgram(3, GW_ADDR, 5302)), at(TX_V4));
}

#[test]
fn udproute_multiple_routes_attachment_accepts_both_and_only_the_oldest_answers() {
    let mut w = start("gw-udp-multi", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("udp", 5300, "UDP")]),
            at_gw_addr(),
        ));
        service(api, "apps", "old", &[TX_V4]);
        service(api, "apps", "new", &[TX_V4_B]);
        for (name, svc, created) in [("a-newer", "new", 30), ("z-older", "old", 10)] {
            api.apply(route(
                "UDPRoute",
                "apps",
                name,
                json!([parent(Some("udp"), None)]),
                json!([backend(None, svc, 53, None)]),
                created,
            ));
        }
    });
    for r in ["a-newer", "z-older"] {
        w.status("UDPRoute", "apps", r, |s| {
            route_is(s, ("True", "Accepted"), ("True", "ResolvedRefs"))
        });
    }
    w.status("Gateway", "infra", "gw", |s| {
        listener_status(s, "udp")["attachedRoutes"] == 2
    });
    w.maps("the oldest route's backend", |v| {
        v[0]["backends"]
            .as_array()
            .is_some_and(|b| b.len() == 1 && b[0]["backend"]["address"] == TX_V4)
    });
    for i in 0..20 {
        assert_eq!(
            w.pod_of(&dgram(i, GW_ADDR, 5300)),
            (TX_V4.parse().unwrap(), 5353)
        );
    }
}

#[test]
fn udproute_reference_grant_permits_a_cross_namespace_backend_and_its_removal_revokes_it() {
    let mut w = start("gw-udp-grant", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("udp", 5300, "UDP")]),
            at_gw_addr(),
        ));
        service(api, "backends", "dns", &[TX_V4]);
        api.apply(grant_for("UDPRoute", "backends", "apps"));
        api.apply(route(
            "UDPRoute",
            "apps",
            "r",
            json!([parent(None, None)]),
            json!([backend(Some("backends"), "dns", 53, None)]),
            1,
        ));
    });
    w.status("UDPRoute", "apps", "r", |s| {
        route_is(s, ("True", "Accepted"), ("True", "ResolvedRefs"))
    });
    w.maps("the granted backend", |v| {
        v[0]["backends"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b["backend"]["address"] == TX_V4))
    });
    assert_eq!(
        w.pod_of(&dgram(1, GW_ADDR, 5300)),
        (TX_V4.parse().unwrap(), 5353)
    );

    w.api
        .delete("ReferenceGrant", "backends", "routes-may-refer");
    w.status("UDPRoute", "apps", "r", |s| {
        route_is(s, ("True", "Accepted"), ("False", "RefNotPermitted"))
    });
    w.maps("the grant revoked", |v| {
        v[0]["backends"]
            .as_array()
            .is_some_and(|b| b.iter().all(|b| b["backend"]["address"] != TX_V4))
    });
    // A rejected share's datagram is dropped (a TCP SYN would be reset).
    let before = w.counter(Counter::DropRejected);
    let (action, _) = w.send(&dgram(2, GW_ADDR, 5300));
    assert_eq!(action_name(action), action_name(XDP_DROP));
    assert_eq!(w.counter(Counter::DropRejected), before + 1);
}

/// The suite applies this test's TLS-only Gateway also where it skips the test (no TLSRoute
/// support), and later tests wait for every Gateway of the namespace to be ready.
#[test]
fn udproute_not_allowed_by_listeners_of_a_tls_only_gateway_attaches_nothing_and_it_stays_ready() {
    let w = start("gw-udp-tls", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("tls", 443, "TLS")]),
            Value::Null,
        ));
        service(api, "infra", "coredns", &[TX_V4]);
        api.apply(route(
            "UDPRoute",
            "infra",
            "r",
            json!([parent(None, None)]),
            json!([backend(None, "coredns", 53, None)]),
            1,
        ));
    });
    w.status("UDPRoute", "infra", "r", |s| {
        is(
            &parent_conds(s, 0),
            "Accepted",
            "False",
            "NotAllowedByListeners",
        )
    });
    w.until("the TLS-only Gateway ready", |w| {
        ready(w, "gw").then_some(())
    });
    let gw = w.status("Gateway", "infra", "gw", |s| !s["listeners"].is_null());
    assert_eq!(listener_status(&gw, "tls")["attachedRoutes"], 0, "{gw:#}");
}

#[test]
fn udproute_invalid_backendref_nonexistent_is_backend_not_found_and_its_datagrams_dropped() {
    let mut w = start("gw-udp-missing", |api| {
        api.apply(gateway(
            "gw",
            json!([listener("udp", 5300, "UDP")]),
            at_gw_addr(),
        ));
        api.apply(route(
            "UDPRoute",
            "apps",
            "r",
            json!([parent(None, None)]),
            json!([backend(None, "no-such-svc", 53, None)]),
            1,
        ));
    });
    w.status("UDPRoute", "apps", "r", |s| {
        route_is(s, ("True", "Accepted"), ("False", "BackendNotFound"))
    });
    w.maps("the rejecting share", |v| {
        v.as_array().is_some_and(|a| a.len() == 1)
    });
    let before = w.counter(Counter::DropRejected);
    for i in 0..10 {
        let (action, _) = w.send(&dgram(i, GW_ADDR, 5300));
        assert_eq!(action_name(action), action_name(XDP_DROP), "datagram {i}");
    }
    assert_eq!(w.counter(Counter::DropRejected), before + 10);
}
