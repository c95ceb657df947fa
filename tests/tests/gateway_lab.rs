//! The Gateway API in the lab of [`lb_tests::dc`], with real connections: the agent runs
//! `--kubernetes` against the fake API server in the load balancer's namespace, and a Gateway
//! with a TCP listener and a TCPRoute sends the client's connections (NAT) to "pods": servers on
//! the lab's backends, each pod an address of its own on a backend, answering with its name.

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{Agent, Dirs},
    dc::{LB_V4, LB_V6, Lab, NatServers, errors, share},
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
    format!(
        "node:
  interfaces: [eth0]
  source_v4: {LB_V4}
  source_v6: {LB_V6}
  table_size: 65537
  max_vips: 16
  max_backends: 64
"
    )
}

/// Service `name` (port 80) with `pods` ready on `target`.
fn service(api: &FakeApi, name: &str, pods: &[&str], target: u16) {
    api.apply(json!({ "apiVersion": "v1", "kind": "Service",
        "metadata": { "namespace": "shop", "name": name },
        "spec": { "ports": [ { "port": 80, "targetPort": target, "protocol": "TCP" } ] } }));
    api.apply(json!({ "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "namespace": "shop", "name": format!("{name}-1"),
                      "labels": { "kubernetes.io/service-name": name } },
        "addressType": "IPv4",
        "ports": [ { "port": target, "protocol": "TCP" } ],
        "endpoints": pods.iter().map(|a| json!({ "addresses": [a], "conditions": { "ready": true } })).collect::<Vec<_>>() }));
}

/// The class, a Gateway at `GW_ADDR` with one TCP listener on 80, and a TCPRoute to
/// `backends` (Service name, weight).
fn gateway_and_route(api: &FakeApi, backends: &[(&str, u32)]) {
    api.apply(
        json!({ "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
        "metadata": { "name": "lb" }, "spec": { "controllerName": "lb.dev/gateway-controller" } }),
    );
    api.apply(
        json!({ "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": { "namespace": "shop", "name": "shop" },
        "spec": { "gatewayClassName": "lb", "addresses": [ { "value": GW_ADDR } ],
                  "listeners": [ { "name": "web", "port": 80, "protocol": "TCP" } ] } }),
    );
    let refs: Vec<Value> = backends
        .iter()
        .map(|(n, w)| json!({ "name": n, "port": 80, "weight": w }))
        .collect();
    api.apply(
        json!({ "apiVersion": "gateway.networking.k8s.io/v1", "kind": "TCPRoute",
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
    agent.wait_for("running", 1, T);
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
            agent.log_text()
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
