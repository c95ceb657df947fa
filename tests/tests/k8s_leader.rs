//! Two agents (two "nodes") against one fake API server: only the holder of the status
//! writer's Lease writes status, the other takes over when the holder dies, and the agents'
//! different views never overwrite each other. Also: the EndpointSlice watch asks only for the
//! slices of the Services lb serves.
//!
//! The two agents share one namespace (so both reach the fake server on loopback) and attach
//! to different interfaces, each with its own pins and state.

use std::{
    net::TcpListener,
    path::Path,
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{Agent, Dirs},
    config::{RawNode, lab_node, node_yaml},
    harness::FibNet,
    kubeapi::{FakeApi, State},
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(30);
const LEASE: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(500);

/// Node settings on `iface` with `table_size` slots per VIP.
fn node_config(iface: &str, table_size: u32) -> String {
    node_yaml(RawNode {
        source_v6: None,
        table_size: Some(table_size.into()),
        max_vips: Some(16),
        nat_table_size: Some(4096),
        ..lab_node(&[iface])
    })
}

fn service(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "namespace": "shop", "name": name, "labels": { "lb.dev/class": "default" },
                      "annotations": { "lb.dev/upstream-policy": "big" } },
        "spec": { "type": "LoadBalancer", "ports": [ { "name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP" } ] },
        "status": { "loadBalancer": { "ingress": [ { "ip": ip } ] } }
    })
}

fn slice(service: &str, name: &str, pod: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "namespace": "shop", "name": name, "labels": { "kubernetes.io/service-name": service } },
        "addressType": "IPv4",
        "ports": [ { "name": "http", "port": 8080, "protocol": "TCP" } ],
        "endpoints": [ { "addresses": [pod], "conditions": { "ready": true, "serving": true, "terminating": false } } ]
    })
}

/// 503 slots: within node A's table (1009), more than node B's (251). A applies the policy as
/// written and B with its table's 251 slots, each saying so: two agents that both wrote status
/// would overwrite each other without end.
fn policy() -> Value {
    json!({ "apiVersion": "lb.dev/v1alpha1", "kind": "UpstreamPolicy",
            "metadata": { "namespace": "shop", "name": "big" }, "spec": { "slots": 503 } })
}

struct Node {
    // Dropped in this order: the agent stops before its dirs are removed (else it writes its
    // status file into a state dir made anew).
    agent: Option<Agent>,
    dirs: Dirs,
}

fn start(net: &FibNet, api: &FakeApi, name: &str, iface: &str, table_size: u32) -> Node {
    start_with(net, api, name, iface, table_size, LEASE)
}

/// [`start`] with a Lease duration of `lease`.
fn start_with(
    net: &FibNet,
    api: &FakeApi,
    name: &str,
    iface: &str,
    table_size: u32,
    lease: Duration,
) -> Node {
    let dirs = Dirs::new(Path::new(BIN), name);
    dirs.write_config(&node_config(iface, table_size));
    let kubeconfig = dirs.state.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let (lease, retry) = (
        format!("{}ms", lease.as_millis()),
        format!("{}ms", RETRY.as_millis()),
    );
    let agent = Agent::start_under(
        &net.ns,
        &dirs,
        &[],
        &[
            "--kubernetes",
            "--lease-duration",
            &lease,
            "--lease-retry",
            &retry,
        ],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", name),
        ],
    );
    Node {
        dirs,
        agent: Some(agent),
    }
}

impl Node {
    fn log(&self) -> String {
        self.agent
            .as_ref()
            .map(|a| a.log_dump().to_string())
            .unwrap_or_default()
    }

    /// Waits until this agent's maps serve `vip` with `slots` slots in all.
    fn wait_slots(&self, vip: &str, slots: u64) {
        let start = Instant::now();
        loop {
            let out = self.dirs.cli(&["backends", "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let total: Option<u64> = v.as_array().and_then(|a| {
                a.iter().find(|x| x["vip"]["label"] == vip).map(|x| {
                    x["backends"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|b| b["slots"].as_u64().unwrap())
                        .sum()
                })
            });
            if total == Some(slots) {
                return;
            }
            assert!(
                start.elapsed() < T,
                "waiting for {vip} with {slots} slots: {v:#}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn wait_api(api: &FakeApi, what: &str, logs: &dyn Fn() -> String, pred: impl Fn(&State) -> bool) {
    let start = Instant::now();
    while !pred(&api.lock()) {
        assert!(start.elapsed() < T, "waiting for {what}; logs:\n{}", logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn holder(s: &State) -> Option<String> {
    s.lease_writes.last().map(|w| w.0.clone())
}

/// The agents (reportingInstance) that recorded PolicyNotFound Events, in order.
fn event_writers(s: &State) -> Vec<String> {
    s.events
        .iter()
        .filter(|e| e["reason"] == "PolicyNotFound")
        .map(|e| {
            e["reportingInstance"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// Writers of the status patches, in order.
fn writers(s: &State) -> Vec<String> {
    s.status_writers.clone()
}

/// The reason of the `Accepted` condition in a status patch.
fn accepted(patch: &Value) -> Option<String> {
    patch["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
        .map(|c| c["reason"].as_str().unwrap_or_default().to_string())
}

#[test]
fn only_the_lease_holder_writes_status_and_the_other_takes_over_when_it_dies() {
    let net = FibNet::new("lease");
    let api = FakeApi::new(net.ns.run(|| TcpListener::bind("127.0.0.1:0").unwrap()));
    api.apply(service("web", "192.0.2.10"));
    api.apply(slice("web", "web-1", "10.1.0.1"));
    api.apply(policy());
    // A Service naming a policy that does not exist: a Warning Event (PolicyNotFound) that
    // both agents would record.
    let mut orphan = service("orphan", "192.0.2.20");
    orphan["metadata"]["annotations"]["lb.dev/upstream-policy"] = json!("missing");
    api.apply(orphan);
    api.apply(slice("orphan", "orphan-1", "10.1.0.2"));

    let mut a = start(&net, &api, "node-a", "lb1", 1009);
    wait_api(&api, "node-a to hold the Lease", &|| a.log(), |s| {
        holder(s).as_deref() == Some("node-a")
    });
    let b = start(&net, &api, "node-b", "lb2", 251);
    let dumps = [&a, &b].map(|n| n.agent.as_ref().unwrap().log_dumper());
    let logs = || format!("node-a:\n{}\nnode-b:\n{}", dumps[0](), dumps[1]());
    // Each agent serves with its own view: A with the policy's 503 slots, B with its table's 251.
    a.wait_slots("192.0.2.10:80/tcp", 503);
    b.wait_slots("192.0.2.10:80/tcp", 251);
    wait_api(&api, "A's status (Accepted as written)", &logs, |s| {
        s.status_patches
            .last()
            .is_some_and(|p| accepted(&p.1).as_deref() == Some("Accepted"))
    });
    // Four more renewals by A: B has had two Lease durations to write if it were going to.
    let renewals = api.lock().lease_writes.len();
    wait_api(&api, "four renewals", &logs, |s| {
        s.lease_writes.len() >= renewals + 4
    });
    {
        let s = api.lock();
        assert!(
            s.lease_writes.iter().all(|w| w.0 == "node-a"),
            "B took the Lease from a live holder: {:?}",
            s.lease_writes
        );
        assert!(
            writers(&s).iter().all(|w| w == "lb-node-a"),
            "status writers: {:?}",
            writers(&s)
        );
        assert_eq!(
            event_writers(&s),
            ["node-a"],
            "only A records the Event, once"
        );
        assert!(
            (1..=2).contains(&s.status_patches.len()),
            "A writes its view once (twice if a watch event overtakes its patch): {:?}",
            s.status_patches
        );
    }

    // Kill the holder: B takes over once the Lease has gone unrenewed for its duration, as B
    // observed it (at most one retry late), checked once per retry; 1 s more for a busy machine.
    a.agent.as_mut().unwrap().kill9();
    let killed = Instant::now();
    wait_api(&api, "node-b to take the Lease", &logs, |s| {
        holder(s).as_deref() == Some("node-b")
    });
    let took = killed.elapsed();
    assert!(
        took <= LEASE + RETRY * 2 + Duration::from_secs(1),
        "B took over after {took:?} (Lease {LEASE:?}, retry {RETRY:?})"
    );
    assert!(
        took >= LEASE - RETRY,
        "B took over after {took:?}, before the Lease ({LEASE:?}) could have expired"
    );
    // On taking over, B writes its view of the current status, once.
    wait_api(
        &api,
        "B's status (Accepted with its table's size)",
        &logs,
        |s| {
            s.status_patches
                .last()
                .is_some_and(|p| accepted(&p.1).as_deref() == Some("AcceptedWithNotes"))
        },
    );
    let renewals = api.lock().lease_writes.len();
    wait_api(&api, "four renewals by B", &logs, |s| {
        s.lease_writes.len() >= renewals + 4
    });
    let s = api.lock();
    let w = writers(&s);
    let by_b = w.iter().filter(|x| *x == "lb-node-b").count();
    assert_eq!(by_b, 1, "B writes the status once: {w:?}");
    let first_b = w.iter().position(|x| x == "lb-node-b").unwrap();
    assert!(
        w[..first_b].iter().all(|x| x == "lb-node-a")
            && w[first_b..].iter().all(|x| x == "lb-node-b"),
        "one handover, no flapping: {w:?}"
    );
    let message = s.status_patches.last().unwrap().1["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("slots 503: 251 used"),
        "B's own view: {message}"
    );
}

#[test]
fn a_holder_that_exits_cleanly_gives_the_lease_up_at_once() {
    // A long Lease: without the release B would wait all of it.
    let long = Duration::from_secs(20);
    let net = FibNet::new("release");
    let api = FakeApi::new(net.ns.run(|| TcpListener::bind("127.0.0.1:0").unwrap()));
    api.apply(service("web", "192.0.2.10"));
    api.apply(slice("web", "web-1", "10.1.0.1"));
    let mut a = start_with(&net, &api, "node-a", "lb1", 1009, long);
    wait_api(&api, "node-a to hold the Lease", &|| a.log(), |s| {
        holder(s).as_deref() == Some("node-a")
    });
    let mut b = start_with(&net, &api, "node-b", "lb2", 1009, long);
    b.wait_slots("192.0.2.10:80/tcp", 1009);
    // Both in their event loop, where SIGTERM is a clean exit (A took the Lease while starting).
    for n in [&mut a, &mut b] {
        n.agent.as_mut().unwrap().wait_running(&net.ns, &n.dirs, T);
    }
    let status = a.agent.as_mut().unwrap().stop();
    assert!(status.success(), "{status}: {}", a.log());
    let stopped = Instant::now();
    wait_api(&api, "node-b to take the Lease", &|| b.log(), |s| {
        holder(s).as_deref() == Some("node-b")
    });
    let took = stopped.elapsed();
    assert!(
        took < RETRY * 4,
        "B took over {took:?} after A exited (retry {RETRY:?}, Lease {long:?})"
    );
    let s = api.lock();
    let holders: Vec<&str> = s.lease_writes.iter().map(|w| w.0.as_str()).collect();
    let released = holders
        .iter()
        .position(|h| h.is_empty())
        .expect("A released it");
    assert!(
        holders[..released].iter().all(|h| *h == "node-a")
            && holders[released + 1..].iter().all(|h| *h == "node-b"),
        "A, its release, then B: {holders:?}"
    );
}

#[test]
fn endpoint_slices_are_watched_only_for_the_services_lb_serves() {
    let net = FibNet::new("slices");
    let api = FakeApi::new(net.ns.run(|| TcpListener::bind("127.0.0.1:0").unwrap()));
    api.apply(service("web", "192.0.2.10"));
    api.apply(slice("web", "web-1", "10.1.0.1"));
    // A Service of another class: its slices are none of lb's business.
    let mut other = service("other", "192.0.2.11");
    other["metadata"]["labels"]["lb.dev/class"] = json!("another-lb");
    api.apply(other);
    api.apply(slice("other", "other-1", "10.1.0.9"));

    let n = start(&net, &api, "node-a", "lb1", 1009);
    n.wait_slots("192.0.2.10:80/tcp", 1009);
    let slice_requests = || api.requests("/apis/discovery.k8s.io/v1/endpointslices?");
    let selector =
        |names: &str| format!("labelSelector=kubernetes.io%2Fservice-name+in+%28{names}%29");
    assert!(
        !slice_requests().is_empty()
            && slice_requests()
                .iter()
                .all(|r| r.contains(&selector("web"))),
        "only web's slices are asked for: {:?}",
        slice_requests()
    );

    // A second Service of lb's class: the watch restarts for both, and api's pod is served.
    api.apply(slice("api", "api-1", "10.1.0.2"));
    api.apply(service("api", "192.0.2.12"));
    n.wait_slots("192.0.2.12:80/tcp", 1009);
    let after: Vec<String> = slice_requests();
    assert!(
        after.iter().any(|r| r.contains(&selector("api%2Cweb"))),
        "the watch names both Services: {after:?}"
    );
    assert!(
        after
            .iter()
            .all(|r| r.contains(&selector("web")) || r.contains(&selector("api%2Cweb"))),
        "no request for every slice in the cluster: {after:?}"
    );
    let out = n.dirs.cli(&["backends", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let labels: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["vip"]["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        ["192.0.2.10:80/tcp", "192.0.2.12:80/tcp"],
        "lb's two Services, not the other class's"
    );
}

/// The message of the last `lb.dev/Programmed` condition written on the Service `shop/name`.
fn programmed_message(s: &State, name: &str) -> Option<String> {
    let who = format!("shop/{name}");
    s.patches
        .iter()
        .rev()
        .filter(|(r, w, _)| r == "services" && *w == who)
        .find_map(|(_, _, p)| {
            p["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "lb.dev/Programmed")?["message"]
                .as_str()
                .map(str::to_string)
        })
}

/// The notes of the `Programmed` Events, in order.
fn programmed_notes(s: &State) -> Vec<String> {
    s.events
        .iter()
        .filter(|e| e["reason"] == "Programmed")
        .map(|e| e["note"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn a_service_served_by_a_second_node_says_two_nodes_in_its_condition_and_a_new_event() {
    let net = FibNet::new("count");
    let api = FakeApi::new(net.ns.run(|| TcpListener::bind("127.0.0.1:0").unwrap()));
    api.apply(service("web", "192.0.2.10"));
    api.apply(slice("web", "web-1", "10.1.0.1"));
    api.apply(policy());
    let a = start(&net, &api, "node-a", "lb1", 1009);
    let one = "192.0.2.10:80/tcp in the maps of 1 node";
    wait_api(&api, "web programmed on node-a", &|| a.log(), |s| {
        programmed_message(s, "web").as_deref() == Some(one)
    });
    // B serves the same VIP (with its smaller table: the VIP, not the table, is compared).
    let b = start(&net, &api, "node-b", "lb2", 251);
    let logs = || format!("node-a:\n{}\nnode-b:\n{}", a.log(), b.log());
    let two = "192.0.2.10:80/tcp in the maps of 2 nodes";
    wait_api(&api, "web programmed on both nodes", &logs, |s| {
        programmed_message(s, "web").as_deref() == Some(two) && programmed_notes(s).len() >= 2
    });
    let s = api.lock();
    assert_eq!(programmed_notes(&s), [one, two], "one Event per count");
    assert!(
        s.record_writes.iter().any(|(node, _)| node == "node-b"),
        "B keeps its own record: {:?}",
        s.record_writes
    );
}
