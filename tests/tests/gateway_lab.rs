//! The Gateway API in the lab of [`lb_tests::dc`], with real connections: the agent runs
//! `--kubernetes` against the fake API server in the load balancer's namespace, and a Gateway
//! with a TCP listener and a TCPRoute sends the client's connections (NAT) to "pods": servers on
//! the lab's backends, each pod an address of its own on a backend, answering with its name.

use std::{
    net::{SocketAddr, TcpListener, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{Agent, Dirs},
    config::{RawNode, node_yaml, some, strings},
    dc::{LB_V4, LB_V6, Lab, NatServers, client_v4, errors, share},
    kubeapi::FakeApi,
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(30);
const GW_ADDR: &str = "192.0.2.40";
/// web-v1's pods: second addresses of b1 and b2, on this port (answering "b1-a", "b2-a").
const PODS_A: [&str; 2] = ["10.20.0.21", "10.20.0.22"];
const PORT_A: u16 = 9001;
/// web-v2's pods: the backends' own addresses, on this port (answering "b1-b", ...).
const PODS_B: [&str; 3] = ["10.20.0.11", "10.20.0.12", "10.20.0.13"];
const PORT_B: u16 = 9002;

fn node_config() -> String {
    node_yaml(RawNode {
        interfaces: strings(&["eth0"]),
        source_v4: some(LB_V4),
        source_v6: some(LB_V6),
        table_size: Some(65_537),
        max_vips: Some(16),
        max_backends: Some(64),
        ..RawNode::default()
    })
}

/// Service `name` (TCP port 80) with `pods` ready on `target`.
fn service(api: &FakeApi, name: &str, pods: &[&str], target: u16) {
    service_of(api, "TCP", 80, name, pods, target);
}

/// Service `name` with `protocol` port `port` and `pods` ready on `target`.
fn service_of(api: &FakeApi, protocol: &str, port: u16, name: &str, pods: &[&str], target: u16) {
    api.apply(json!({ "apiVersion": "v1", "kind": "Service",
        "metadata": { "namespace": "shop", "name": name },
        "spec": { "ports": [ { "port": port, "targetPort": target, "protocol": protocol } ] } }));
    api.apply(json!({ "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "namespace": "shop", "name": format!("{name}-1"),
                      "labels": { "kubernetes.io/service-name": name } },
        "addressType": "IPv4",
        "ports": [ { "port": target, "protocol": protocol } ],
        "endpoints": pods.iter().map(|a| json!({ "addresses": [a], "conditions": { "ready": true } })).collect::<Vec<_>>() }));
}

/// The class, a Gateway at `GW_ADDR` with one TCP listener on 80, and a TCPRoute to
/// `backends` (Service name, weight).
fn gateway_and_route(api: &FakeApi, backends: &[(&str, u32)]) {
    gateway_and_route_of(api, "TCP", 80, backends);
}

/// The class, a Gateway at `GW_ADDR` with one `protocol` listener on `port`, and a route of
/// that protocol's kind to `backends` (Service name, weight) at `port`.
fn gateway_and_route_of(api: &FakeApi, protocol: &str, port: u16, backends: &[(&str, u32)]) {
    api.apply(
        json!({ "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
        "metadata": { "name": "lb" }, "spec": { "controllerName": "lb.dev/gateway-controller" } }),
    );
    api.apply(
        json!({ "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": { "namespace": "shop", "name": "shop" },
        "spec": { "gatewayClassName": "lb", "addresses": [ { "value": GW_ADDR } ],
                  "listeners": [ { "name": "web", "port": port, "protocol": protocol } ] } }),
    );
    let refs: Vec<Value> = backends
        .iter()
        .map(|(n, w)| json!({ "name": n, "port": port, "weight": w }))
        .collect();
    api.apply(
        json!({ "apiVersion": "gateway.networking.k8s.io/v1", "kind": format!("{protocol}Route"),
        "metadata": { "namespace": "shop", "name": "web" },
        "spec": { "parentRefs": [ { "name": "shop" } ], "rules": [ { "backendRefs": refs } ] } }),
    );
}

/// The lab, its pods, the fake API server (in the load balancer's namespace) with `objects`,
/// and the agent, once the route's VIP is in the maps with `members` members.
fn start(
    tag: &str,
    objects: impl FnOnce(&FakeApi),
    members: usize,
) -> (Agent, FakeApi, Dirs, [NatServers; 2], Lab) {
    let lab = Lab::new();
    for ((_, ns), a) in lab.backends.iter().zip(PODS_A) {
        ns.ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"]);
    }
    let pods = [
        NatServers::start_as(&lab, PORT_A, "-a", true),
        NatServers::start_as(&lab, PORT_B, "-b", true),
    ];
    let dirs = Dirs::new(Path::new(BIN), tag);
    dirs.write_config(&node_config());
    let api = FakeApi::new(lab.lb.run(|| TcpListener::bind("127.0.0.1:0").unwrap()));
    std::fs::write(dirs.state.join("kubeconfig"), api.kubeconfig()).unwrap();
    objects(&api);
    let kubeconfig = dirs.state.join("kubeconfig");
    let mut agent = Agent::start_under(
        &lab.lb,
        &dirs,
        &[],
        &["--kubernetes"],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", "node-a"),
        ],
    );
    agent.wait_running(&lab.lb, &dirs, T);
    let start = Instant::now();
    loop {
        let v = dirs.json(&["backends"]);
        let n = v[0]["backends"].as_array().map_or(0, Vec::len);
        if n == members {
            break;
        }
        assert!(
            start.elapsed() < T,
            "waiting for {members} members: {v:#}\n{}",
            agent.log_dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (agent, api, dirs, pods, lab)
}

fn gw() -> SocketAddr {
    SocketAddr::new(GW_ADDR.parse().unwrap(), 80)
}

#[test]
fn a_tcproute_weighted_200_100_splits_3000_connections_2_to_1_and_evenly_across_each_services_pods()
{
    let (agent, _api, _dirs, _pods, lab) = start(
        "gwlab-weighted",
        |api| {
            service(api, "web-v1", &PODS_A, PORT_A);
            service(api, "web-v2", &PODS_B, PORT_B);
            gateway_and_route(api, &[("web-v1", 200), ("web-v2", 100)]);
        },
        5,
    );
    let t = lab.tcp_tally(gw(), 3000, 8);
    assert_eq!(errors(&t), 0, "{t:?}");
    let a: f64 = ["b1-a", "b2-a"].iter().map(|p| share(&t, p)).sum();
    let b: f64 = ["b1-b", "b2-b", "b3-b"].iter().map(|p| share(&t, p)).sum();
    assert!(
        (a - 2.0 / 3.0).abs() <= 0.03,
        "web-v1 (200 of 300): {a:.3} {t:?}"
    );
    assert!(
        (b - 1.0 / 3.0).abs() <= 0.03,
        "web-v2 (100 of 300): {b:.3} {t:?}"
    );
    // Each Service's share evenly across its pods: 1/3 each of web-v1's two, 1/9 each of
    // web-v2's three.
    for p in ["b1-a", "b2-a"] {
        assert!((share(&t, p) - 1.0 / 3.0).abs() <= 0.03, "{p}: {t:?}");
    }
    for p in ["b1-b", "b2-b", "b3-b"] {
        assert!((share(&t, p) - 1.0 / 9.0).abs() <= 0.03, "{p}: {t:?}");
    }
    assert!(!t.contains_key("b3-a"), "b3 is no pod of web-v1: {t:?}");
    drop(agent);
}

#[test]
fn a_backend_ref_to_a_missing_service_has_its_share_of_connections_reset_and_the_others_succeed() {
    let (agent, _api, dirs, _pods, lab) = start(
        "gwlab-missing",
        |api| {
            service(api, "web-v1", &PODS_A, PORT_A);
            gateway_and_route(api, &[("web-v1", 300), ("no-such-service", 100)]);
        },
        3,
    );
    let n = 1000;
    let t = lab.tcp_tally(gw(), n, 8);
    let refused: usize = t
        .iter()
        .filter(|(k, _)| k.contains("connection refused"))
        .map(|(_, v)| *v)
        .sum();
    let other_errors = errors(&t) - refused;
    assert_eq!(other_errors, 0, "only refusals may fail: {t:?}");
    let refused_share = refused as f64 / n as f64;
    assert!(
        (refused_share - 0.25).abs() <= 0.04,
        "100 of 400 refused: {t:?}"
    );
    let served: f64 = ["b1-a", "b2-a"].iter().map(|p| share(&t, p)).sum();
    assert!((served - 0.75).abs() <= 0.04, "{t:?}");
    let stats = dirs.json(&["stats"]);
    let resets = stats["global"]["tx_reset"].as_u64().unwrap_or(0);
    assert!(
        resets >= refused as u64,
        "every refusal is an XDP reset: {resets} < {refused}"
    );
    drop(agent);
}

/// The UDP listener's port; its Services' pods are the backends' own addresses on `PORT_B`
/// (answering "b1-b", ...), whose replies leave from the address the datagram went to.
const DNS: u16 = 53;

/// The lab with a Gateway's UDP listener on `DNS` over Services `seventy`, `thirty` and `zero`
/// (pods b1, b2, b3) weighted 70, 30 and 0.
fn udp_weighted(tag: &str) -> (Agent, FakeApi, Dirs, [NatServers; 2], Lab) {
    start(
        tag,
        |api| {
            for (name, pod) in [
                ("seventy", PODS_B[0]),
                ("thirty", PODS_B[1]),
                ("zero", PODS_B[2]),
            ] {
                service_of(api, "UDP", DNS, name, &[pod], PORT_B);
            }
            gateway_and_route_of(
                api,
                "UDP",
                DNS,
                &[("seventy", 70), ("thirty", 30), ("zero", 0)],
            );
        },
        3,
    )
}

/// Waits (up to `T`) until one datagram is answered: the first may wait on neighbour resolution,
/// as the suite's own `ExpectEchoResponse` lets it, before any is counted.
fn until_answered(lab: &Lab, to: SocketAddr) {
    let start = Instant::now();
    for port in 30_000.. {
        let t = lab.udp_tally_ports(client_v4(0), port..port + 1, to, Duration::from_secs(1));
        if errors(&t) == 0 {
            return;
        }
        assert!(start.elapsed() < T, "no answer through {to}: {t:?}");
    }
}

#[test]
fn udproute_weighted_routing_answers_each_of_500_single_datagrams_to_a_connected_socket_70_30_0() {
    let (agent, _api, _dirs, _pods, lab) = udp_weighted("gwlab-udp-weighted");
    let to = SocketAddr::new(GW_ADDR.parse().unwrap(), DNS);
    until_answered(&lab, to);
    // 500 datagrams from one client address, each from a new source port on a socket of its own,
    // each answered within 2 s or counted as an error: the suite's sender.
    let t = lab.udp_tally_ports(client_v4(0), 20_000..20_500, to, Duration::from_secs(2));
    assert_eq!(errors(&t), 0, "every datagram answered: {t:?}");
    assert_eq!(t.values().sum::<usize>(), 500);
    assert!((share(&t, "b1-b") - 0.70).abs() <= 0.05, "70: {t:?}");
    assert!((share(&t, "b2-b") - 0.30).abs() <= 0.05, "30: {t:?}");
    assert!(!t.contains_key("b3-b"), "weight 0 answers nothing: {t:?}");
    drop(agent);
}

#[test]
fn udproute_reply_comes_from_the_gateway_address_and_listener_port() {
    let (agent, _api, _dirs, _pods, lab) = start(
        "gwlab-udp-reply",
        |api| {
            service_of(api, "UDP", DNS, "dns", &[PODS_B[0]], PORT_B);
            gateway_and_route_of(api, "UDP", DNS, &[("dns", 1)]);
        },
        1,
    );
    let to = SocketAddr::new(GW_ADDR.parse().unwrap(), DNS);
    until_answered(&lab, to);
    // An unconnected socket takes a reply from anywhere: it says where this one came from.
    let (from, answer) = lab.client.run(|| {
        let s = UdpSocket::bind(SocketAddr::new(client_v4(1), 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.send_to(b"who?", to).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = s.recv_from(&mut buf).expect("an answer within 2 s");
        (from, String::from_utf8_lossy(&buf[..n]).into_owned())
    });
    assert_eq!(
        (from, answer.as_str()),
        (to, "b1-b"),
        "the pod's reply, from the Gateway"
    );
    // So a socket connected to the Gateway, which drops replies from anywhere else, takes each.
    let t = lab.udp_tally_ports(client_v4(2), 21_000..21_020, to, Duration::from_secs(2));
    assert_eq!(t, [("b1-b".to_string(), 20)].into(), "{t:?}");
    drop(agent);
}

#[test]
fn tcproute_weighted_routing_splits_500_connections_from_one_client_address_70_30_0() {
    let (agent, _api, _dirs, _pods, lab) = start(
        "gwlab-tcp-weighted",
        |api| {
            for (name, pod) in [
                ("seventy", PODS_B[0]),
                ("thirty", PODS_B[1]),
                ("zero", PODS_B[2]),
            ] {
                service(api, name, &[pod], PORT_B);
            }
            gateway_and_route(api, &[("seventy", 70), ("thirty", 30), ("zero", 0)]);
        },
        3,
    );
    // One client address, a new source port per connection, as the suite's client makes them.
    let t = lab.tcp_tally_ports(client_v4(0), 20_000..20_500, gw());
    assert_eq!(errors(&t), 0, "{t:?}");
    assert!((share(&t, "b1-b") - 0.70).abs() <= 0.05, "70: {t:?}");
    assert!((share(&t, "b2-b") - 0.30).abs() <= 0.05, "30: {t:?}");
    assert!(!t.contains_key("b3-b"), "weight 0 takes nothing: {t:?}");
    drop(agent);
}
