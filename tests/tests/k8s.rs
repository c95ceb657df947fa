//! `lb run --kubernetes` against a fake API server: kube-rs's client, watchers and reflectors
//! run unmodified over a real connection; the agent programs real maps; packets run through the
//! program on those maps (BPF_PROG_TEST_RUN) reach the pods' addresses and ports.
//!
//! One agent, one story, checked at each step through `lb backends --json`, the fake server's
//! record of status patches and Events, the agent's log, and packets.

use std::{
    net::TcpListener,
    path::Path,
    time::{Duration, Instant},
};

use lb_common::Counter;
use lb_tests::{
    agent::{Agent, Dirs, metric, pinned_link_id, pinned_map_id, xdp_attachment},
    cluster::{self, T, World, start_agent},
    config::{RawNode, node_yaml, some, strings},
    deploy_docs,
    harness::{FibNet, Lb, XDP_DROP, XDP_TX, action_name, net::*},
    kubeapi::{FakeApi, gateway_only, granted, on_exit_only, rbac_of},
    packet::{L4, Pkt, TCP_ACK},
    release,
};
use lb_userspace::kernel::migrate::schema;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const V4: &str = "192.0.2.10";
const V6: &str = "2001:db8::10";

fn service(name: &str, extra: Value) -> Value {
    let mut v = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "namespace": "shop", "name": name, "labels": { "lb.dev/class": "default" },
                      "annotations": { "lb.dev/upstream-policy": "sticky" } },
        "spec": {
            "type": "LoadBalancer",
            "ports": [
                { "name": "http", "port": 80, "targetPort": "web", "protocol": "TCP" },
                { "name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP" }
            ]
        },
        "status": { "loadBalancer": { "ingress": [ { "ip": V4 }, { "ip": V6 } ] } }
    });
    json_patch::merge(&mut v, &extra);
    v
}

/// Endpoints as (address, node, ready, serving, terminating).
fn slice(name: &str, family: &str, eps: &[(&str, &str, bool, bool, bool)]) -> Value {
    slice_of("web", name, family, eps)
}

fn slice_of(
    service: &str,
    name: &str,
    family: &str,
    eps: &[(&str, &str, bool, bool, bool)],
) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "namespace": "shop", "name": name, "labels": { "kubernetes.io/service-name": service } },
        "addressType": family,
        "ports": [ { "name": "http", "port": 8080, "protocol": "TCP" }, { "name": "dns", "port": 5353, "protocol": "UDP" } ],
        "endpoints": eps.iter().map(|(a, node, r, s, t)| json!({
            "addresses": [a], "nodeName": node, "conditions": { "ready": r, "serving": s, "terminating": t }
        })).collect::<Vec<_>>()
    })
}

fn policy(spec: Value) -> Value {
    json!({ "apiVersion": "lb.dev/v1alpha1", "kind": "UpstreamPolicy",
            "metadata": { "namespace": "shop", "name": "sticky" }, "spec": spec })
}

fn vip<'a>(v: &'a Value, label: &str) -> Option<&'a Value> {
    v.as_array()?.iter().find(|x| x["vip"]["label"] == label)
}

/// (address, weight, slots) of a VIP's backends.
fn rows(v: &Value, label: &str) -> Vec<(String, u64, u64)> {
    vip(v, label)
        .map(|x| {
            x["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    (
                        b["backend"]["address"].as_str().unwrap().to_string(),
                        b["weight"].as_u64().unwrap_or(u64::MAX),
                        b["slots"].as_u64().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn client(i: u32, port: u16) -> Pkt {
    Pkt::tcp(
        &format!("198.51.100.{}", 1 + i % 250),
        port,
        V4,
        80,
        LB0_MAC,
    )
}

/// The last condition of `kind` the agent patched into the policy's status.
fn condition(api: &lb_tests::kubeapi::State, kind: &str) -> Option<Value> {
    api.status_patches.iter().rev().find_map(|(_, p)| {
        p["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == kind)
            .cloned()
    })
}

fn events(api: &lb_tests::kubeapi::State, reason: &str) -> Vec<Value> {
    api.events
        .iter()
        .filter(|e| e["reason"] == reason)
        .cloned()
        .collect()
}

/// The namespace, the fake API server (without the Gateway API: tests/gateway.rs has one with
/// it) and the agent's directories, without the agent.
fn setup(tag: &str) -> (FibNet, FakeApi, Dirs) {
    let (net, api, dirs) = cluster::setup(Path::new(BIN), tag);
    api.without_gateway_api();
    (net, api, dirs)
}

#[test]
fn the_agent_serves_the_clusters_services_and_follows_every_change() {
    let (net, api, dirs) = setup("k8s");
    let port = api.addr.port();

    // The cluster before the agent starts.
    api.apply(service("web", json!({})));
    api.apply(service(
        "elsewhere",
        json!({ "metadata": { "labels": { "lb.dev/class": "another-lb" } },
                "status": { "loadBalancer": { "ingress": [ { "ip": "192.0.2.99" } ] } } }),
    ));
    api.apply(service(
        "broken",
        json!({ "spec": { "ports": "eighty" }, "status": { "loadBalancer": { "ingress": [ { "ip": "192.0.2.98" } ] } } }),
    ));
    api.apply(slice(
        "web-v4",
        "IPv4",
        &[
            (TX_V4, "node-a", true, true, false),
            (TX_V4_B, "node-b", true, true, false),
        ],
    ));
    api.apply(slice(
        "web-v6",
        "IPv6",
        &[(TX_V6, "node-b", true, true, false)],
    ));
    api.apply(policy(
        json!({ "algorithm": "consistent-hashing", "hashOn": { "input": "ip" } }),
    ));

    let agent = start_agent(&net, &dirs, &[]);
    let mut w = World::new(net, api, dirs, agent);

    // 1. Initial sync: 2 addresses x 2 ports, NAT to the pods' port; other classes ignored,
    //    the malformed Service skipped and named in the status file.
    let v = w.maps("the initial sync", |v| {
        rows(v, &format!("{V4}:80/tcp")).len() == 2
    });
    let labels: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["vip"]["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels.len(), 4, "{labels:?}");
    for l in [
        format!("{V4}:80/tcp"),
        format!("{V4}:53/udp"),
        format!("[{V6}]:80/tcp"),
        format!("[{V6}]:53/udp"),
    ] {
        assert!(labels.contains(&l.as_str()), "{l} missing from {labels:?}");
        assert_eq!(vip(&v, &l).unwrap()["mode"], "nat");
        assert_eq!(
            vip(&v, &l).unwrap()["vip"]["name"]
                .as_str()
                .unwrap()
                .split(':')
                .next(),
            Some("shop/web")
        );
    }
    w.wait_skipped(
        "Service shop/broken is malformed (invalid type: string \"eighty\", expected a sequence): skipped",
    );
    assert!(
        !w.api.requests("/api/v1/services?").is_empty()
            && w.api
                .requests("/api/v1/services?")
                .iter()
                .all(|r| r.contains("labelSelector=lb.dev%2Fclass%3Ddefault")),
        "Services are filtered by the API server: {:?}",
        w.api.requests("/api/v1/services")
    );

    // Packets reach the pods' addresses at their port (8080: the named target port); the
    // policy hashes on the client address, so one client's connections share a pod.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..40 {
        let first = w.pod_of(&client(i, 10000));
        assert_eq!(first.1, 8080);
        assert!([TX_V4, TX_V4_B].contains(&first.0.to_string().as_str()));
        for sport in [10001, 10002, 10003] {
            assert_eq!(w.pod_of(&client(i, sport)), first, "client {i} moved");
        }
        seen.insert(first.0);
    }
    assert_eq!(seen.len(), 2, "both pods get clients");
    let v6 = Pkt::udp("2001:db8:c::7", 4000, V6, 53, LB0_MAC);
    assert_eq!(w.pod_of(&v6), (TX_V6.parse().unwrap(), 5353));
    w.wait_api("the policy's status", |s| {
        condition(s, "Accepted").is_some_and(|c| c["status"] == "True")
            && condition(s, "Programmed").is_some_and(|c| c["status"] == "True")
    });

    // 2. TX_V4_B starts terminating: it drains (weight 0, no slots), its established flows stay.
    let mut on_b = None;
    for i in 100..200 {
        if w.pod_of(&client(i, 20000)).0.to_string() == TX_V4_B {
            on_b = Some(client(i, 20000));
            break;
        }
    }
    let on_b = on_b.expect("some client lands on TX_V4_B");
    w.api.apply(slice(
        "web-v4",
        "IPv4",
        &[
            (TX_V4, "node-a", true, true, false),
            (TX_V4_B, "node-b", false, true, true),
        ],
    ));
    w.maps("TX_V4_B draining", |v| {
        rows(v, &format!("{V4}:80/tcp")).contains(&(TX_V4_B.into(), 0, 0))
    });
    let established = on_b.clone().with(|p| p.l4 = L4::Tcp { flags: TCP_ACK });
    assert_eq!(
        w.pod_of(&established).0.to_string(),
        TX_V4_B,
        "an established flow stays on its draining pod"
    );
    for i in 300..330 {
        assert_eq!(
            w.pod_of(&client(i, 30000)).0.to_string(),
            TX_V4,
            "new flows avoid the draining pod"
        );
    }

    // 2b. A Service added while running, then deleted; and a Service that turns malformed
    //     keeps its last good version serving.
    w.api.apply(service(
        "api",
        json!({ "metadata": { "annotations": null },
                "spec": { "type": "ClusterIP", "externalIPs": ["192.0.2.20"],
                          "ports": [ { "name": "http", "port": 443, "targetPort": 8080 } ] },
                "status": null }),
    ));
    w.api.apply(slice_of(
        "api",
        "api-1",
        "IPv4",
        &[(TX_V4_B, "node-b", true, true, false)],
    ));
    w.maps("the new Service", |v| {
        rows(v, "192.0.2.20:443/tcp") == [(TX_V4_B.to_string(), 1, 1009)]
    });
    let to_api = Pkt::tcp("198.51.100.9", 7000, "192.0.2.20", 443, LB0_MAC);
    assert_eq!(w.pod_of(&to_api), (TX_V4_B.parse().unwrap(), 8080));
    w.api.delete("Service", "shop", "api");
    w.maps("the Service gone", |v| {
        vip(v, "192.0.2.20:443/tcp").is_none()
    });
    w.api
        .apply(service("web", json!({ "spec": { "ports": "eighty" } })));
    w.wait_skipped(
        "Service shop/web is malformed (invalid type: string \"eighty\", expected a sequence): its last good version keeps serving",
    );
    assert_eq!(
        w.pod_of(&established).0.to_string(),
        TX_V4_B,
        "still served"
    );
    w.api.apply(service("web", json!({})));

    // 3. The policy turns unusable: rejected with its reason, an Event on the Service, and the
    //    Service keeps the last accepted version (client-address hashing); then slots.
    w.api.apply(policy(
        json!({ "algorithm": "consistent-hashing", "hashOn": { "header": "x-user" } }),
    ));
    w.wait_api("the rejection", |s| {
        condition(s, "Accepted")
            .is_some_and(|c| c["status"] == "False" && c["reason"] == "NoUsableHash")
            && !events(s, "PolicyRejected").is_empty()
    });
    {
        let s = w.api.lock();
        let e = &events(&s, "PolicyRejected")[0];
        assert_eq!(e["regarding"]["name"], "web", "{e}");
        assert_eq!(e["type"], "Warning");
        assert!(
            e["note"]
                .as_str()
                .unwrap()
                .contains("header \"x-user\" cannot be seen at L4"),
            "{e}"
        );
        assert_eq!(condition(&s, "Programmed").unwrap()["reason"], "Rejected");
    }
    let c = client(7, 1111);
    let pod = w.pod_of(&c);
    assert_eq!(
        w.pod_of(&c.clone().with(|p| p.sport = 2222)),
        pod,
        "still hashing on the client address"
    );
    w.api.apply(policy(
        json!({ "algorithm": "consistent-hashing", "hashOn": { "input": "ip" }, "slots": 5 }),
    ));
    w.wait_api("the slots rejection", |s| {
        condition(s, "Accepted").is_some_and(|c| {
            c["reason"] == "InvalidSlots"
                && c["message"]
                    .as_str()
                    .unwrap()
                    .contains("slots 5 is outside Kong's range")
        })
    });
    w.api.apply(policy(json!({ "algorithm": "consistent-hashing", "hashOn": { "header": "x-user" }, "hashOnFallback": { "input": "ip" }, "slots": 251 })));
    let v = w.maps("a 251-slot table", |v| {
        vip(v, &format!("{V4}:80/tcp")).is_some_and(|x| x["table_size"] == 251)
    });
    assert_eq!(
        rows(&v, &format!("{V4}:80/tcp"))
            .iter()
            .map(|r| r.2)
            .sum::<u64>(),
        251
    );
    w.wait_api("the fallback acceptance", |s| {
        condition(s, "Accepted")
            .is_some_and(|c| c["status"] == "True" && c["reason"] == "AcceptedWithFallback")
    });
    // A policy that does not even decode: Invalid, and the Service keeps the accepted one.
    w.api.apply(policy(json!({ "slots": "lots" })));
    w.wait_api("the Invalid condition", |s| {
        condition(s, "Accepted").is_some_and(|c| {
            c["reason"] == "Invalid"
                && c["message"]
                    .as_str()
                    .unwrap()
                    .contains("keep the last accepted version")
        })
    });
    let v = w.maps("the table", |_| true);
    assert_eq!(vip(&v, &format!("{V4}:80/tcp")).unwrap()["table_size"], 251);
    w.api.apply(policy(json!({ "algorithm": "consistent-hashing", "hashOn": { "header": "x-user" }, "hashOnFallback": { "input": "ip" }, "slots": 251 })));

    // 4. externalTrafficPolicy: Local: only this node's pods; the IPv6 pod is on node-b, so
    //    the IPv6 VIPs have none and drop (counted).
    w.api.apply(service(
        "web",
        json!({ "spec": { "externalTrafficPolicy": "Local" } }),
    ));
    w.maps("Local endpoints only", |v| {
        rows(v, &format!("{V4}:80/tcp")) == [(TX_V4.to_string(), 1, 251)]
            && rows(v, &format!("[{V6}]:53/udp")).is_empty()
    });
    let before = w.counter(Counter::DropNoBackend);
    assert_eq!(
        action_name(w.destination(&v6.clone().with(|p| p.sport = 4001)).0),
        action_name(XDP_DROP)
    );
    assert_eq!(w.counter(Counter::DropNoBackend), before + 1);

    // 5. Changes the watchers never see (compacted away): 410 Gone, relist, and the agent
    //    catches up.
    w.api.expire(|apply| {
        apply(service("web", json!({})));
        apply(slice(
            "web-v4",
            "IPv4",
            &[
                (TX_V4, "node-a", true, true, false),
                (TX_V4_B, "node-b", true, true, false),
            ],
        ));
    });
    w.maps("the relist after 410", |v| {
        rows(v, &format!("{V4}:80/tcp")).len() == 2 && rows(v, &format!("[{V6}]:53/udp")).len() == 1
    });
    assert!(
        w.api
            .requests(" -> 200")
            .iter()
            .any(|r| r.contains("watch=true")),
        "watches were made"
    );
    let lists = w
        .api
        .requests("GET /api/v1/services?")
        .iter()
        .filter(|r| !r.contains("watch="))
        .count();
    assert!(
        lists >= 2,
        "the Services were listed again after 410: {:?}",
        w.api.requests("services")
    );

    // 6. The API server goes away: the agent keeps serving the last state, and resyncs when it
    //    comes back (with changes made meanwhile).
    w.api.stop();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        w.pod_of(&v6.clone().with(|p| p.sport = 4002)),
        (TX_V6.parse().unwrap(), 5353),
        "serving while the API server is away"
    );
    // It notices: it comes back to the address (taken for a moment), then finds it closed.
    let knocks = w
        .net
        .ns
        .run(|| TcpListener::bind(("127.0.0.1", port)).unwrap());
    knocks.set_nonblocking(true).unwrap();
    let start = Instant::now();
    while knocks.accept().is_err() {
        assert!(
            start.elapsed() < T,
            "the agent does not come back to the API server:\n{}",
            w.agent.log_dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(knocks);
    w.api.expire(|apply| {
        apply(slice(
            "web-v4",
            "IPv4",
            &[(TX_V4_B, "node-b", true, true, false)],
        ));
    });
    w.api.start(
        w.net
            .ns
            .run(|| TcpListener::bind(("127.0.0.1", port)).unwrap()),
    );
    w.maps("the resync after the outage", |v| {
        rows(v, &format!("{V4}:80/tcp")) == [(TX_V4_B.to_string(), 1, 251)]
    });
    // Bookmarks: after a change to Services only, the other watches are behind; a bookmark
    // brings every watch to the current version, so when history is compacted and the watches
    // resume, none of them is too old (without the bookmark, step 5 shows what happens).
    // First, every watch must be open again after the outage (a bookmark reaches open ones).
    w.wait_api("all three watches open", |s| {
        ["services", "endpointslices", "upstreampolicies"]
            .iter()
            .all(|r| s.watching(r))
    });
    w.api.apply(service(
        "web",
        json!({ "metadata": { "labels": { "touched": "yes" } } }),
    ));
    std::thread::sleep(Duration::from_millis(300));
    w.api.bookmark();
    std::thread::sleep(Duration::from_millis(300));
    let gone = w.api.lock().gone.len();
    let watches = |api: &FakeApi| api.requests("watch=true").len();
    let before = watches(&w.api);
    w.api.expire(|_| {});
    w.wait_api("the watches to resume", |s| {
        s.requests
            .iter()
            .filter(|r| r.contains("watch=true"))
            .count()
            >= before + 3
    });
    let resumed_too_old = w.api.lock().gone[gone..].to_vec();
    assert!(
        resumed_too_old.is_empty(),
        "watches of {resumed_too_old:?} resumed from before the bookmark"
    );

    // 7. Deletes: the policy (an Event; the defaults), then the slice, then the Service.
    w.api.delete("UpstreamPolicy", "shop", "sticky");
    w.maps("the default table size", |v| {
        vip(v, &format!("{V4}:80/tcp")).is_some_and(|x| x["table_size"] == 1009)
    });
    w.wait_api("PolicyNotFound", |s| {
        !events(s, "PolicyNotFound").is_empty()
    });
    w.api.delete("EndpointSlice", "shop", "web-v4");
    w.maps("no IPv4 pods", |v| {
        vip(v, &format!("{V4}:80/tcp")).is_some() && rows(v, &format!("{V4}:80/tcp")).is_empty()
    });
    w.api.delete("Service", "shop", "web");
    w.maps("no VIPs", |v| v.as_array().is_some_and(|a| a.is_empty()));
    assert!(
        w.agent.exited().is_none(),
        "the agent exited:\n{}",
        w.agent.log_dump()
    );

    // Least rights: every request the agent made is one deploy/rbac.yaml grants, and every
    // resource it grants was used.
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
    // This cluster has no Gateway API: the grants it needs are checked by tests/gateway.rs.
    // An agent's own DaemonSet is asked for on exit only: the uninstall tests check that grant.
    for (g, r, _) in granted
        .iter()
        .filter(|(g, r, v)| !gateway_only(g, r, v) && !on_exit_only(g, r, v))
    {
        assert!(
            made.iter().any(|m| &m.0 == g && &m.1 == r),
            "deploy/rbac.yaml grants {g}/{r}, which the agent never used"
        );
    }
}

#[test]
fn a_rejected_node_config_followed_by_a_cluster_change_applies_the_change() {
    let (net, api, dirs) = setup("k8s-base");
    let metrics = "127.0.0.1:19436";
    let node = RawNode {
        metrics_listen: some(metrics),
        ..cluster::node()
    };
    dirs.write_config(&node_yaml(node.clone()));
    api.apply(service("web", json!({})));
    api.apply(slice(
        "web-v4",
        "IPv4",
        &[(TX_V4, "node-a", true, true, false)],
    ));
    let agent = start_agent(&net, &dirs, &[]);
    let mut w = World::new(net, api, dirs, agent);
    w.maps("the first pod", |v| {
        rows(v, &format!("{V4}:80/tcp")).len() == 1
    });

    // An interface this host lacks: this node config is refused (and is no base for what follows).
    w.dirs.write_config(&node_yaml(RawNode {
        interfaces: strings(&["lb0", "nosuch0"]),
        ..node
    }));
    w.agent
        .wait_metric(&w.net.ns, metrics, "lb_config_reloads_rejected_total", 1, T);
    w.api.apply(slice(
        "web-v4",
        "IPv4",
        &[
            (TX_V4, "node-a", true, true, false),
            (TX_V4_B, "node-a", true, true, false),
        ],
    ));
    w.maps("the second pod", |v| {
        rows(v, &format!("{V4}:80/tcp")).len() == 2
    });
    assert_eq!(
        metric(&w.net.ns, metrics, "lb_config_reloads_rejected_total"),
        Some(1),
        "the cluster change was refused too"
    );
}

/// The Linux capability numbers of `CAP_*` names.
fn cap_number(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("no number for CAP_{other} here"),
    }
}

/// `capsh` arguments that leave exactly `keep` (the DaemonSet's names: `BPF`, `NET_ADMIN`).
fn capsh_keeping(keep: &[String]) -> Vec<String> {
    let keep: Vec<String> = keep
        .iter()
        .map(|k| format!("cap_{}", k.to_lowercase()))
        .collect();
    lb_tests::agent::capsh_keeping(&keep)
}

#[test]
fn the_daemonsets_capabilities_are_enough_and_each_is_needed() {
    let docs = deploy_docs("daemonset.yaml");
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let caps: Vec<String> =
        ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
    assert!(!caps.contains(&"SYS_ADMIN".to_string()), "{caps:?}");

    // Exactly those: the agent loads, attaches and serves.
    let (net, api, dirs) = setup("caps");
    api.apply(service("web", json!({})));
    api.apply(slice(
        "web-v4",
        "IPv4",
        &[(TX_V4, "node-a", true, true, false)],
    ));
    let wrapper = capsh_keeping(&caps);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let agent = start_agent(&net, &dirs, &wrapper);
    let mut w = World::new(net, api, dirs, agent);
    let status = std::fs::read_to_string(format!("/proc/{}/status", w.agent.pid())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    let want: u64 = caps.iter().map(|c| 1u64 << cap_number(c)).sum();
    assert_eq!(
        u64::from_str_radix(eff, 16).unwrap(),
        want,
        "the agent runs with exactly {caps:?}"
    );
    w.maps("the VIP", |v| rows(v, &format!("{V4}:80/tcp")).len() == 1);
    assert_eq!(w.pod_of(&client(1, 5555)), (TX_V4.parse().unwrap(), 8080));
    drop(w);

    // Without any one of them, it cannot.
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let (net, api, dirs) = setup("caps");
        api.apply(service("web", json!({})));
        let wrapper = capsh_keeping(&fewer);
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let mut agent = start_agent(&net, &dirs, &wrapper);
        let said = agent.refusal(T);
        assert!(
            said.contains("Operation not permitted") || said.contains("Permission denied"),
            "without CAP_{missing}: {said}"
        );
        drop((agent, api, dirs, net));
    }
}

/// `lb run --kubernetes --down-when-deleted=lb` as node-a (the chart's `cleanupOnUninstall`),
/// serving one Service, attached and pinned.
fn start_uninstallable(tag: &str) -> (FibNet, FakeApi, Dirs, Agent) {
    let (net, api, dirs) = setup(tag);
    api.apply(json!({ "apiVersion": "apps/v1", "kind": "DaemonSet",
                      "metadata": { "namespace": "default", "name": "lb" } }));
    api.apply(service("web", json!({})));
    api.apply(slice(
        "web-v4",
        "IPv4",
        &[(TX_V4, "node-a", true, true, false)],
    ));
    let kubeconfig = dirs.state.join("kubeconfig");
    let mut agent = Agent::start_under(
        &net.ns,
        &dirs,
        &[],
        &["--kubernetes", "--down-when-deleted=lb"],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", "node-a"),
        ],
    );
    agent.wait_running(&net.ns, &dirs, T);
    assert!(xdp_attachment(&net.ns, "lb0").is_some(), "attached to lb0");
    assert!(!dirs.pin_names().is_empty());
    (net, api, dirs, agent)
}

#[test]
fn an_agent_whose_daemonset_is_deleted_detaches_and_removes_every_pin_when_stopped() {
    let (net, api, dirs, mut agent) = start_uninstallable("uninst");
    // What `helm uninstall` does: the DaemonSet goes, then its pods get SIGTERM.
    api.delete("DaemonSet", "default", "lb");
    assert!(agent.stop().success());
    assert_eq!(xdp_attachment(&net.ns, "lb0"), None, "XDP detached");
    assert_eq!(dirs.pin_names(), Vec::<String>::new(), "no pin left");
    // It asked for its DaemonSet, as the chart's RBAC (deploy/rbac.yaml) lets it.
    let asked: Vec<_> = api
        .requests("daemonsets/lb")
        .iter()
        .filter_map(|r| rbac_of(r))
        .collect();
    assert_eq!(
        asked,
        [(
            "apps".to_string(),
            "daemonsets".to_string(),
            "get".to_string()
        )]
    );
    assert!(granted().contains(&asked[0]), "{:?}", granted());
}

#[test]
fn an_agent_stopped_while_its_daemonset_exists_leaves_program_and_pins_for_the_next() {
    // A rolling update (helm upgrade): the DaemonSet is still there.
    let (net, _api, dirs, mut agent) = start_uninstallable("upgrade");
    let pins = dirs.pin_names();
    let attached = xdp_attachment(&net.ns, "lb0");
    assert!(agent.stop().success());
    assert_eq!(xdp_attachment(&net.ns, "lb0"), attached, "still attached");
    assert_eq!(dirs.pin_names(), pins, "the pins stay for the next agent");
}

/// Where the agents of the rollout tests serve `/readyz` (in the test's namespace).
const METRICS: &str = "127.0.0.1:9477";

/// The chart's DaemonSet (`lb`, as `--down-when-deleted=lb` names it) with its pod template
/// running the agent from the image tagged `tag`, as `helm install`/`upgrade` leaves it.
fn daemonset_at(tag: &str) -> Value {
    json!({ "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": { "namespace": "default", "name": "lb" },
            "spec": {
                "selector": { "matchLabels": { "app.kubernetes.io/name": "lb" } },
                "template": {
                    "metadata": { "labels": { "app.kubernetes.io/name": "lb" } },
                    "spec": { "containers": [ { "name": "lb", "image": format!("ghcr.io/lb-dev/lb:{tag}") } ] }
                }
            } })
}

/// A node of the chart's DaemonSet at `tag`, serving one Service: the namespace, the fake API
/// server, the pin dir (the chart's hostPath) with a node config that serves `/readyz`.
fn rollout_node(tag: &str, image_tag: &str) -> (FibNet, FakeApi, Dirs) {
    let (net, api, dirs) = setup(tag);
    dirs.write_config(&node_yaml(RawNode {
        metrics_listen: some(METRICS),
        ..cluster::node()
    }));
    api.apply(daemonset_at(image_tag));
    api.apply(service("web", json!({})));
    api.apply(slice(
        "web-v4",
        "IPv4",
        &[(TX_V4, "node-a", true, true, false)],
    ));
    (net, api, dirs)
}

/// The pod of `bin` on the node, as the chart runs it (`--kubernetes --down-when-deleted=lb`),
/// once `/readyz` says it is ready.
fn start_pod(net: &FibNet, dirs: &mut Dirs, bin: &Path) -> Agent {
    dirs.bin = bin.to_path_buf();
    let kubeconfig = dirs.state.join("kubeconfig");
    let mut agent = Agent::start_under(
        &net.ns,
        dirs,
        &[],
        &["--kubernetes", "--down-when-deleted=lb"],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", "node-a"),
        ],
    );
    agent.wait_http(&net.ns, METRICS, "/readyz", 200, T);
    // Back to this release's CLI for the test's own `lb` commands.
    dirs.bin = BIN.into();
    agent
}

/// What a node keeps across agents: the link's id on lb0 and the ids of the state maps, under
/// whichever schema's pin name (`LB_NAT_REV` and `LB_FLOWS4` of 0.2.0 are `LB_NAT_REV@v2` and
/// `LB_FLOWS4@v2` of 0.3.0: the same maps, relabelled).
fn kept(dirs: &Dirs) -> (u32, Vec<(&'static str, u32)>) {
    use lb_common::maps::{AFFINITY, FLOWS, FLOWS4, NAT, NAT_REV};
    let names = dirs.pin_names();
    let pin_of = |map: &str| {
        names
            .iter()
            .find(|n| schema::parse_pin_name(n).is_some_and(|(m, _)| m == map))
            .unwrap_or_else(|| panic!("no pin of {map} in {names:?}"))
            .clone()
    };
    (
        pinned_link_id(&dirs.pins, "lb0"),
        [FLOWS4, FLOWS, AFFINITY, NAT, NAT_REV]
            .into_iter()
            .map(|m| (m, pinned_map_id(&dirs.pins, &pin_of(m))))
            .collect(),
    )
}

/// `lb status -o json` on the node (in its namespace, where the interfaces are), whatever its
/// exit status (1 when no agent runs).
fn status(net: &FibNet, dirs: &Dirs) -> Value {
    let out = dirs.cli_in(&net.ns, &["status", "-o", "json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "lb status -o json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// How many IPv4 flows the pinned flow table holds.
fn flows_v4(net: &FibNet, dirs: &Dirs) -> u64 {
    let v = status(net, dirs);
    v["maps"]["tables"]["flows_ipv4"]["entries"]
        .as_u64()
        .unwrap_or_else(|| panic!("lb status shows no flows_ipv4 entries: {v:#}"))
}

#[test]
fn a_rolling_update_from_the_previous_release_and_its_rollback_keep_the_nodes_link_and_maps() {
    let previous = release::previous_version();
    let this = env!("CARGO_PKG_VERSION");
    let (net, api, mut dirs) = rollout_node("rollout", &previous);

    // The previous release's pod, serving; flows go through its program and stay in its maps.
    let mut pod = start_pod(&net, &mut dirs, &release::previous_bin());
    let flows = 10;
    net.ns.run(|| {
        // The previous release's maps as they are (its LB_VIPS is at schema 1).
        let mut lb = Lb::adopt_older(&dirs.pins);
        for i in 0..flows {
            let run = lb.run(&client(i, 40000 + i as u16).frame(), net.lb0);
            assert_eq!(action_name(run.action), action_name(XDP_TX), "flow {i}");
        }
    });
    assert_eq!(flows_v4(&net, &dirs), u64::from(flows));
    let before = kept(&dirs);

    // `helm upgrade`: the template asks for this release; the DaemonSet controller stops the
    // old pod (SIGTERM), which leaves everything for the next; the new pod starts on the same
    // pin dir.
    api.apply(daemonset_at(this));
    assert!(pod.stop().success(), "{}", pod.log_dump());
    assert_eq!(
        kept(&dirs),
        before,
        "the previous release left link and maps"
    );
    let mut pod = start_pod(&net, &mut dirs, Path::new(BIN));
    assert_eq!(kept(&dirs), before, "{this} adopted link and maps");
    assert_eq!(
        flows_v4(&net, &dirs),
        u64::from(flows),
        "{this} kept the flows"
    );

    // `helm rollback`: the template asks for the previous release again.
    api.apply(daemonset_at(&previous));
    assert!(pod.stop().success(), "{}", pod.log_dump());
    assert_eq!(
        kept(&dirs),
        before,
        "{this} left link and maps for {previous}"
    );
    let _pod = start_pod(&net, &mut dirs, &release::previous_bin());
    assert_eq!(kept(&dirs), before, "{previous} adopted link and maps");
    assert_eq!(
        flows_v4(&net, &dirs),
        u64::from(flows),
        "{previous} kept the flows"
    );
}

#[test]
fn an_agent_stopped_for_a_rollback_says_so_and_leaves_link_and_maps_in_place() {
    let previous = release::previous_version();
    let (net, api, mut dirs) = rollout_node("rollback", env!("CARGO_PKG_VERSION"));
    let mut pod = start_pod(&net, &mut dirs, Path::new(BIN));
    let pins = dirs.pin_names();
    let before = kept(&dirs);

    // `helm rollback`: the template asks for the previous release; this pod gets SIGTERM.
    api.apply(daemonset_at(&previous));
    assert!(pod.stop().success(), "{}", pod.log_dump());

    // `lb status` exits 1 (no agent runs), and shows what the stopped agent left.
    let v = status(&net, &dirs);
    assert_eq!(
        v["agent"]["rolled_back_for"],
        previous.as_str(),
        "{v:#}\nagent log:\n{}",
        pod.log_dump()
    );
    // Every pin stays as the previous release reads it: 0.3.0's LB_VIPS@v2, LB_NODE@v2,
    // LB_NAT_REV@v2 and LB_FLOWS4@v2 converted down in place to schema 1's names, and the maps
    // 0.2.0 does not know (source ranges, new-flow budgets, NAT reply counters, the passive
    // holds, the port ranges, the least-connections counts) unpinned.
    let mut want: Vec<String> = pins
        .iter()
        .filter(|p| {
            ![
                "LB_SRC_RANGES",
                "LB_VIP_DROPS",
                "LB_NEW_FLOW_BUDGET",
                "LB_VIP_BUDGET_DROPS",
                "LB_VIP_REPLY_STATS",
                "LB_MEMBER_REPLY_STATS",
                "LB_MEMBER_HOLD",
                "LB_VIP_RANGES",
                "LB_MEMBER_CONNS",
            ]
            .contains(&p.as_str())
        })
        .map(|p| match schema::parse_pin_name(p) {
            Some((map, _)) => map.to_string(),
            None => p.to_string(),
        })
        .collect();
    want.sort();
    assert_eq!(
        dirs.pin_names(),
        want,
        "every pin stays, as {previous} reads it"
    );
    assert_eq!(kept(&dirs), before, "the same link and maps");
    assert!(xdp_attachment(&net.ns, "lb0").is_some(), "still attached");
}

/// `lb explain -o json` of a TCP packet from `src` (ADDRESS:PORT) to the Service's IPv4 VIP.
fn explain(dirs: &Dirs, src: &str) -> Value {
    dirs.json(&["explain", src, &format!("{V4}:80"), "tcp"])
}

fn refused(v: &Value) -> bool {
    v["verdict"] == "drop" && v["reason"] == "source range"
}

/// Waits until `lb explain` says `src` is refused (`want`) or not.
fn wait_refused(dirs: &Dirs, src: &str, want: bool, what: &str) {
    let deadline = Instant::now() + T;
    loop {
        let v = explain(dirs, src);
        if refused(&v) == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {v:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_services_load_balancer_source_ranges_and_the_annotation_reach_the_map() {
    let (net, api, dirs) = setup("k8s-src");
    let metrics = "127.0.0.1:19437";
    dirs.write_config(&node_yaml(RawNode {
        metrics_listen: some(metrics),
        ..cluster::node()
    }));
    api.apply(service(
        "web",
        json!({ "spec": { "loadBalancerSourceRanges": ["198.51.100.0/24", "2001:db8:c::/48"] } }),
    ));
    api.apply(slice(
        "web-v4",
        "IPv4",
        &[(TX_V4, "node-a", true, true, false)],
    ));
    let mut agent = start_agent(&net, &dirs, &[]);
    agent.wait_serving(&net.ns, &dirs, T);
    wait_refused(
        &dirs,
        "203.0.113.7:40000",
        true,
        "a source outside the ranges",
    );
    let inside = explain(&dirs, "198.51.100.7:40000");
    assert_eq!(inside["verdict"], "forward", "{inside:#}");

    // The program on the agent's maps: the refused source is dropped and counted for its VIP.
    net.ns.run(|| {
        let mut lb = Lb::adopt(&dirs.pins);
        let run = lb.run(
            &client(0, 40000)
                .with(|p| p.src = "203.0.113.7".parse().unwrap())
                .frame(),
            net.lb0,
        );
        assert_eq!(action_name(run.action), action_name(XDP_DROP));
        let run = lb.run(&client(6, 40000).frame(), net.lb0);
        assert_eq!(action_name(run.action), action_name(XDP_TX));
    });
    let stats = dirs.json(&["stats"]);
    let row = stats["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["vip"]["label"] == format!("{V4}:80/tcp"))
        .unwrap_or_else(|| panic!("{stats:#}"));
    assert_eq!(row["drop_source_range"], 1, "{row:#}");
    assert_eq!(stats["global"]["drop_source_range"], 1);
    assert_eq!(
        metric(
            &net.ns,
            metrics,
            &format!("lb_vip_drop_source_range_total{{vip=\"{V4}:80/tcp\"}}")
        ),
        Some(1)
    );
    assert_eq!(
        metric(
            &net.ns,
            metrics,
            "lb_packets_total{verdict=\"drop_source_range\"}"
        ),
        Some(1)
    );

    // Ranges from the annotation once the spec field is gone: the other way round now.
    api.apply(service(
        "web",
        json!({ "spec": { "loadBalancerSourceRanges": null },
                "metadata": { "annotations": {
                    "service.beta.kubernetes.io/load-balancer-source-ranges": "203.0.113.0/24" } } }),
    ));
    wait_refused(&dirs, "198.51.100.7:40000", true, "the annotation's ranges");
    assert!(!refused(&explain(&dirs, "203.0.113.7:40000")));

    // Neither: every source.
    api.apply(service("web", json!({})));
    wait_refused(&dirs, "198.51.100.7:40000", false, "no ranges");
    assert!(!refused(&explain(&dirs, "203.0.113.7:40000")));
    assert_eq!(agent.stop().code(), Some(0));
}

/// The `lb.dev/Programmed` condition on the Service `shop/name`, as the API server holds it.
fn programmed(api: &FakeApi, name: &str) -> Option<Value> {
    api.get("Service", "shop", name)?["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "lb.dev/Programmed")
        .cloned()
}

/// Waits until the Service `shop/name`'s Programmed condition satisfies `ok`; the condition.
fn wait_programmed(api: &FakeApi, agent: &Agent, name: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        match programmed(api, name) {
            Some(c) if ok(&c) => return c,
            c => assert!(
                start.elapsed() < T,
                "waiting for {name}'s Programmed condition, now {c:?}; agent log:\n{}",
                agent.log_dump()
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The Normal `Programmed` Events recorded on the Service `shop/name`.
fn programmed_events(api: &FakeApi, name: &str) -> Vec<Value> {
    events(&api.lock(), "Programmed")
        .into_iter()
        .filter(|e| e["regarding"]["name"] == name && e["regarding"]["kind"] == "Service")
        .collect()
}

/// How many times the agent wrote the status of the Service `shop/name`.
fn service_status_writes(api: &FakeApi, name: &str) -> usize {
    let who = format!("shop/{name}");
    let s = api.lock();
    s.patches
        .iter()
        .filter(|(r, w, _)| r == "services" && *w == who)
        .count()
}

/// A Service of lb's class on V4 and V6, ports 80/TCP and 53/UDP, without a policy.
fn plain_service(name: &str) -> Value {
    service(name, json!({ "metadata": { "annotations": null } }))
}

#[test]
fn a_programmed_service_gets_a_true_condition_and_a_normal_event_naming_its_vips_and_nodes() {
    let (net, api, dirs) = setup("k8s-prog");
    api.apply(plain_service("web"));
    api.apply(slice(
        "web-v4",
        "IPv4",
        &[(TX_V4, "node-a", true, true, false)],
    ));
    let mut agent = start_agent(&net, &dirs, &[]);
    let c = wait_programmed(&api, &agent, "web", |c| c["status"] == "True");
    assert_eq!(c["reason"], "Programmed", "{c:#}");
    assert_eq!(
        c["message"],
        format!("{V4}:53/udp, {V4}:80/tcp, [{V6}]:53/udp, [{V6}]:80/tcp in the maps of 1 node"),
        "{c:#}"
    );
    assert_eq!(c["observedGeneration"], 1, "{c:#}");
    assert!(c["lastTransitionTime"].is_string(), "{c:#}");
    let start = Instant::now();
    while programmed_events(&api, "web").is_empty() {
        assert!(
            start.elapsed() < T,
            "no Programmed Event; agent log:\n{}",
            agent.log_dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let e = &programmed_events(&api, "web")[0];
    assert_eq!(e["type"], "Normal", "{e:#}");
    assert_eq!(
        e["note"], c["message"],
        "the Event says what the condition says: {e:#}"
    );
    assert_eq!(e["reportingInstance"], "node-a", "{e:#}");
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn a_service_that_can_no_longer_be_served_turns_its_condition_false_naming_why() {
    let (net, api, dirs) = setup("k8s-unprog");
    api.apply(plain_service("web"));
    let mut agent = start_agent(&net, &dirs, &[]);
    wait_programmed(&api, &agent, "web", |c| c["status"] == "True");
    // Its only port is SCTP now: lb balances TCP and UDP.
    api.apply(service(
        "web",
        json!({ "metadata": { "annotations": null },
                "spec": { "ports": [ { "name": "s", "port": 80, "protocol": "SCTP" } ] } }),
    ));
    let c = wait_programmed(&api, &agent, "web", |c| c["status"] == "False");
    assert_eq!(c["reason"], "UnsupportedProtocol", "{c:#}");
    assert!(
        c["message"].as_str().unwrap().contains("protocol SCTP"),
        "{c:#}"
    );
    assert_eq!(c["observedGeneration"], 2, "the generation judged: {c:#}");
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn an_unchanged_resync_writes_neither_the_condition_nor_the_event_nor_the_record_again() {
    let (net, api, dirs) = setup("k8s-resync");
    api.apply(plain_service("web"));
    api.apply(slice(
        "web-v4",
        "IPv4",
        &[(TX_V4, "node-a", true, true, false)],
    ));
    let mut agent = start_agent(&net, &dirs, &[]);
    wait_programmed(&api, &agent, "web", |c| c["status"] == "True");
    // A change the maps take and the condition does not show: a second pod.
    api.apply(slice(
        "web-v4",
        "IPv4",
        &[
            (TX_V4, "node-a", true, true, false),
            (TX_V4_B, "node-a", true, true, false),
        ],
    ));
    let start = Instant::now();
    loop {
        let v: Value = serde_json::from_slice(&dirs.cli(&["backends", "--json"]).stdout)
            .unwrap_or(Value::Null);
        if rows(&v, &format!("{V4}:80/tcp")).len() == 2 {
            break;
        }
        assert!(
            start.elapsed() < T,
            "the second pod: {v:#}\n{}",
            agent.log_dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Then a change the condition shows, on another Service.
    api.apply(service(
        "api",
        json!({ "metadata": { "annotations": null },
                "status": { "loadBalancer": { "ingress": [ { "ip": "192.0.2.11" } ] } } }),
    ));
    wait_programmed(&api, &agent, "api", |c| c["status"] == "True");
    assert_eq!(
        service_status_writes(&api, "web"),
        1,
        "web's status, written once"
    );
    assert_eq!(
        programmed_events(&api, "web").len(),
        1,
        "web's Event, recorded once"
    );
    // node-a's record is written in the background: wait for the one with api.
    let start = Instant::now();
    while !api
        .lock()
        .record_writes
        .last()
        .is_some_and(|w| w.1.contains("shop/api"))
    {
        assert!(
            start.elapsed() < T,
            "node-a's record of api; agent log:\n{}",
            agent.log_dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let records: Vec<String> = api
        .lock()
        .record_writes
        .iter()
        .map(|w| w.1.clone())
        .collect();
    assert!(
        records.windows(2).all(|w| w[0] != w[1]),
        "node-a's record, written only when what it holds changed: {records:?}"
    );
    assert!(
        records[records.len() - 1].contains("shop/web"),
        "{records:?}"
    );
    assert_eq!(agent.stop().code(), Some(0));
}

/// This node's Node object, in `zone` (None: no zone label).
fn node_in(zone: Option<&str>) -> Value {
    let labels = match zone {
        Some(z) => json!({ "topology.kubernetes.io/zone": z }),
        None => json!({}),
    };
    json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "node-a", "labels": labels } })
}

/// A slice of Service `web` whose ready endpoints carry topology hints: (address, zones,
/// nodes), as the EndpointSlice controller writes them for `trafficDistribution`.
fn hinted_slice(eps: &[(&str, &[&str], &[&str])]) -> Value {
    let mut s = slice("web-v4", "IPv4", &[]);
    s["endpoints"] = eps
        .iter()
        .map(|(a, zones, nodes)| {
            let names = |v: &[&str]| v.iter().map(|n| json!({ "name": n })).collect::<Vec<_>>();
            let mut hints = json!({ "forZones": names(zones) });
            if !nodes.is_empty() {
                hints["forNodes"] = json!(names(nodes));
            }
            json!({ "addresses": [a], "nodeName": "node-b", "hints": hints,
                    "conditions": { "ready": true, "serving": true, "terminating": false } })
        })
        .collect();
    s
}

/// Waits until `lb backends -o json` shows exactly `backups` (addresses) as the VIP's
/// standing-by backups, with no slots, and every other backend with some; returns the rows.
fn wait_backups(dirs: &Dirs, backups: &[&str], what: &str) -> Value {
    let label = format!("{V4}:80/tcp");
    let deadline = Instant::now() + T;
    loop {
        let v = dirs.json(&["backends"]);
        let rows: Vec<Value> = vip(&v, &label)
            .and_then(|x| x["backends"].as_array().cloned())
            .unwrap_or_default();
        let ok = !rows.is_empty()
            && rows.iter().all(|b| {
                let addr = b["backend"]["address"].as_str().unwrap_or("");
                let backup = b["backup"]["standing_in"] == false;
                let slots = b["slots"].as_u64().unwrap_or(0);
                backup == backups.contains(&addr) && (slots == 0) == backup
            });
        if ok {
            return json!(rows);
        }
        assert!(Instant::now() < deadline, "{what}: {v:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn endpoints_hinted_for_another_zone_stand_by_and_follow_the_nodes_zone_label() {
    let (net, api, dirs) = setup("k8s-zone");
    api.apply(node_in(Some("zone-a")));
    api.apply(service("web", json!({})));
    api.apply(hinted_slice(&[
        (TX_V4, &["zone-a"], &[]),
        (TX_V4_B, &["zone-a"], &[]),
        (REDIRECT_V4, &["zone-b"], &[]),
    ]));
    let mut agent = start_agent(&net, &dirs, &[]);
    agent.wait_serving(&net.ns, &dirs, T);
    let rows = wait_backups(
        &dirs,
        &[REDIRECT_V4],
        "zone-a's node: zone-b's endpoint backs up",
    );
    let why = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["backend"]["address"] == REDIRECT_V4)
        .map(|b| b["backup"]["why"].as_str().unwrap_or("").to_string())
        .unwrap();
    assert_eq!(why, "its hints name other zones than this node's (zone-a)");
    let steps = explain(&dirs, "198.51.100.7:40000")["steps"].to_string();
    assert!(
        steps.contains(&format!("{REDIRECT_V4}: backup, standing by")),
        "{steps}"
    );

    // The node moves to zone-b (a relabel): the preference follows.
    api.apply(node_in(Some("zone-b")));
    wait_backups(
        &dirs,
        &[TX_V4, TX_V4_B],
        "zone-b's node: zone-a's endpoints back up",
    );
    // No zone label: hints cannot apply, every endpoint is used alike.
    api.apply(node_in(None));
    wait_backups(&dirs, &[], "no zone: no backups");
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn endpoints_hinted_for_this_node_are_preferred_over_the_zone() {
    // PreferSameNode: every endpoint has node hints, one names this node.
    let (net, api, dirs) = setup("k8s-samenode");
    api.apply(node_in(Some("zone-a")));
    api.apply(service(
        "web",
        json!({ "spec": { "trafficDistribution": "PreferSameNode" } }),
    ));
    api.apply(hinted_slice(&[
        (TX_V4, &["zone-a"], &["node-a"]),
        (TX_V4_B, &["zone-a"], &["node-b"]),
        (REDIRECT_V4, &["zone-b"], &["node-c"]),
    ]));
    let mut agent = start_agent(&net, &dirs, &[]);
    agent.wait_serving(&net.ns, &dirs, T);
    let rows = wait_backups(&dirs, &[TX_V4_B, REDIRECT_V4], "only node-a's endpoint");
    assert!(
        rows.to_string()
            .contains("other nodes than this one (node-a)"),
        "{rows:#}"
    );
    assert_eq!(agent.stop().code(), Some(0));
}

/// `lb explain` of a SYN from a client to `V4:port`.
fn explain_port(dirs: &Dirs, port: u16) -> Value {
    dirs.json(&[
        "explain",
        "198.51.100.7:40000",
        &format!("{V4}:{port}"),
        "tcp",
        "--syn",
    ])
}

/// Waits until `lb explain` of port `port` names the VIP labelled `label`.
fn wait_explained(dirs: &Dirs, agent: &Agent, port: u16, label: &str) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let v = explain_port(dirs, port);
        if v["vip"]["label"] == label {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "port {port} is not {label}'s: {v:#}\nagent log:\n{}",
            agent.log_dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_port_range_annotation_reaches_the_map_and_an_invalid_one_keeps_the_last_good_range() {
    let (net, api, dirs) = setup("k8s-range");
    let with = |range: &str| {
        service(
            "web",
            json!({ "metadata": { "annotations": { "lb.dev/port-range": range } } }),
        )
    };
    api.apply(with("10000-10999"));
    api.apply(slice(
        "web-v4",
        "IPv4",
        &[(TX_V4, "node-a", true, true, false)],
    ));
    let mut agent = start_agent(&net, &dirs, &[]);
    agent.wait_serving(&net.ns, &dirs, T);
    let range = format!("{V4}:10000-10999/tcp");
    let e = wait_explained(&dirs, &agent, 10500, &range);
    assert_eq!(e["verdict"], "forward", "{e:#}");
    // The Service's own port stays an exact VIP.
    assert_eq!(
        explain_port(&dirs, 80)["vip"]["label"],
        format!("{V4}:80/tcp")
    );

    // The program on the agent's maps: a SYN to port 10500 is translated to the endpoint's
    // port 10500 (a Service's VIPs are NAT).
    net.ns.run(|| {
        let mut lb = Lb::adopt(&dirs.pins);
        let syn = Pkt::tcp("198.51.100.7", 40000, V4, 10500, LB0_MAC);
        let run = lb.run(&syn.frame(), net.lb0);
        assert_eq!(action_name(run.action), action_name(XDP_TX));
        let ip = &run.output[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        assert_eq!(
            &ip[16..20],
            &TX_V4.parse::<std::net::Ipv4Addr>().unwrap().octets()
        );
        let dport = u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]);
        assert_eq!(dport, 10500, "the endpoint's port is the packet's");
    });

    // An annotation that does not read: a Warning Event, and the last range keeps serving.
    api.apply(with("10999-10000"));
    let deadline = Instant::now() + T;
    while events(&api.lock(), "InvalidPortRange").is_empty() {
        assert!(Instant::now() < deadline, "no InvalidPortRange event");
        std::thread::sleep(Duration::from_millis(100));
    }
    let e = &events(&api.lock(), "InvalidPortRange")[0];
    assert_eq!(e["type"], "Warning", "{e:#}");
    assert!(
        e["note"]
            .as_str()
            .unwrap_or_default()
            .contains("the last good range, 10000-10999, keeps serving"),
        "{e:#}"
    );
    assert_eq!(explain_port(&dirs, 10500)["vip"]["label"], range);

    // A new range: the old one's ports outside it are no longer served.
    api.apply(with("20000-20099"));
    wait_explained(&dirs, &agent, 20050, &format!("{V4}:20000-20099/tcp"));
    assert_eq!(explain_port(&dirs, 10500)["verdict"], "pass");
    assert_eq!(agent.stop().code(), Some(0));
}

/// (algorithm, [(address, weight, open connections)]) of the VIP `label` in `lb backends`.
fn least_conn_rows(v: &Value, label: &str) -> (String, Vec<(String, u64, Option<u64>)>) {
    let Some(x) = vip(v, label) else {
        return (String::new(), Vec::new());
    };
    let rows = x["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["backend"]["address"].as_str().unwrap().to_string(),
                b["weight"].as_u64().unwrap_or(0),
                b["open_connections"].as_u64(),
            )
        })
        .collect();
    (x["algorithm"].as_str().unwrap_or("").to_string(), rows)
}

#[test]
fn a_least_connections_policy_reaches_the_vip_flag_and_the_member_weights() {
    let (net, api, dirs) = setup("k8s-lc");
    api.apply(service("web", json!({})));
    api.apply(slice(
        "web-v4",
        "IPv4",
        &[
            (TX_V4, "node-a", true, true, false),
            (TX_V4_B, "node-b", true, true, false),
        ],
    ));
    api.apply(policy(json!({ "algorithm": "least-connections" })));
    let agent = start_agent(&net, &dirs, &[]);
    let mut w = World::new(net, api, dirs, agent);
    let label = format!("{V4}:80/tcp");
    let v = w.maps("least connections on the VIP", |v| {
        least_conn_rows(v, &label).0 == "least-connections"
            && least_conn_rows(v, &label).1.len() == 2
    });
    let (_, rows) = least_conn_rows(&v, &label);
    assert!(rows.iter().all(|(_, _, open)| *open == Some(0)), "{rows:?}");
    // The map itself: the VIP's flag, and each member's weight as the status file has it.
    let want: std::collections::BTreeMap<String, u64> =
        rows.iter().map(|(a, w, _)| (a.clone(), *w)).collect();
    let key = lb_tests::harness::vip_key(V4, 80, lb_common::IPPROTO_TCP);
    let start = Instant::now();
    loop {
        let got = w.with_lb(|lb| {
            let vip = lb.vip(key).expect("the VIP in LB_VIPS");
            let weights: std::collections::BTreeMap<String, u64> = lb
                .live_members()
                .into_iter()
                .filter(|(_, m)| m.vip_id == vip.id)
                .map(|(id, m)| {
                    let a = std::net::Ipv4Addr::from(<[u8; 4]>::try_from(&m.addr[..4]).unwrap());
                    (a.to_string(), u64::from(lb.member_load(id).weight))
                })
                .collect();
            (vip.flags & lb_common::VIP_F_LEAST_CONN != 0, weights)
        });
        if got == (true, want.clone()) {
            break;
        }
        assert!(
            start.elapsed() < T,
            "LB_VIPS / LB_MEMBER_CONNS: {got:?}, want the flag and {want:?}; agent log:\n{}",
            w.agent.log_dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Without the policy: Maglev again.
    w.api.delete("UpstreamPolicy", "shop", "sticky");
    w.maps("maglev on the VIP", |v| {
        least_conn_rows(v, &label).0 == "maglev"
    });
    let flags = w.with_lb(|lb| lb.vip(key).expect("the VIP").flags);
    assert_eq!(flags & lb_common::VIP_F_LEAST_CONN, 0);
    assert_eq!(w.agent.stop().code(), Some(0));
}
