//! End to end: real connections from a client through a router and the load balancer (the real
//! `lb` agent, XDP on its uplink) to three DSR backends, in the lab of [`lb_tests::dc`].

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use lb_tests::{
    agent::{Agent, Dirs},
    dc::{Lab, Sinks, client_v4, client_v6, errors, exchange, lab_config, share, vip_yaml},
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);

/// A config for the lab: `vips` is YAML for the `vips:` list.
fn config(vips: &str) -> String {
    lab_config("  flow_table_size: 65536\n  udp_idle_timeout: 30s\n", vips)
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

struct Setup {
    // Dropped in this order: the agent stops before its dirs are removed (else it writes its
    // status file into a state dir made anew), then the lab goes.
    agent: Agent,
    dirs: Dirs,
    lab: Lab,
}

fn setup(tag: &str, vips: &str) -> Setup {
    setup_in(Lab::new(), tag, vips)
}

fn setup_in(lab: Lab, tag: &str, vips: &str) -> Setup {
    let dirs = Dirs::new(Path::new(BIN), tag);
    dirs.write_config(&config(vips));
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_running(&lab.lb, &dirs, T);
    Setup { lab, dirs, agent }
}

#[test]
fn tcp_and_udp_over_ipv4_and_ipv6() {
    let all = [(0, 1), (1, 1), (2, 1)];
    let vips = [
        vip_yaml("192.0.2.10", 80, "tcp", "", &all, false, None),
        vip_yaml("192.0.2.10", 80, "udp", "", &all, false, None),
        vip_yaml("2001:db8::10", 80, "tcp", "", &all, true, None),
        vip_yaml("2001:db8::10", 80, "udp", "", &all, true, None),
    ]
    .concat();
    let s = setup("basic", &vips);
    for (what, t) in [
        ("TCP/IPv4", s.lab.tcp_tally(sa("192.0.2.10:80"), 300, 8)),
        ("UDP/IPv4", s.lab.udp_tally(sa("192.0.2.10:80"), 300, 8)),
        ("TCP/IPv6", s.lab.tcp_tally(sa("[2001:db8::10]:80"), 300, 8)),
        ("UDP/IPv6", s.lab.udp_tally(sa("[2001:db8::10]:80"), 300, 8)),
    ] {
        assert_eq!(errors(&t), 0, "{what}: failures: {t:?}");
        for b in ["b1", "b2", "b3"] {
            assert!(
                share(&t, b) > 0.2,
                "{what}: {b} got {:.1} %: {t:?}",
                share(&t, b) * 100.0
            );
        }
    }
    let stats = s.dirs.json(&["stats"]);
    assert!(stats["global"]["tx"].as_u64().unwrap() > 1000, "{stats}");
    drop(s);
}

const WEB: &str = "192.0.2.10:80";

fn web(backends: &[(usize, u32)]) -> String {
    vip_yaml("192.0.2.10", 80, "tcp", "", backends, false, None)
}

/// Finishes `streams`; returns (broken descriptions, per-backend count of healthy streams).
fn finish(streams: Vec<lb_tests::dc::Stream>) -> (Vec<String>, BTreeMap<String, usize>) {
    let mut broken = Vec::new();
    let mut ok = BTreeMap::new();
    for s in streams {
        let b = s.backend.clone();
        let n = s.exchanged.load(std::sync::atomic::Ordering::Relaxed);
        match s.finish() {
            None => *ok.entry(b).or_insert(0) += 1,
            Some(e) => broken.push(format!("{b} (after {n}): {e}")),
        }
    }
    (broken, ok)
}

fn by_backend(streams: &[lb_tests::dc::Stream]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in streams {
        *m.entry(s.backend.clone()).or_insert(0) += 1;
    }
    m
}

#[test]
fn weights_200_100_give_two_to_one() {
    let s = setup("weights", &web(&[(0, 200), (1, 100)]));
    let n = 3000;
    let t = s.lab.tcp_tally(sa(WEB), n, 8);
    assert_eq!(errors(&t), 0, "failures: {t:?}");
    let b1 = share(&t, "b1");
    eprintln!(
        "weights 200:100 over {n} connections: {t:?} -> b1 {:.2} %",
        b1 * 100.0
    );
    assert!(
        (b1 - 2.0 / 3.0).abs() <= 0.03,
        "b1 got {:.2} % of {n} connections (want 66.67 +- 3): {t:?}",
        b1 * 100.0
    );
    assert_eq!(t.get("b3"), None, "b3 is not a backend of this VIP: {t:?}");
}

#[test]
fn affinity_holds_a_client_until_the_timeout() {
    let s = setup(
        "affinity",
        &vip_yaml(
            "192.0.2.10",
            80,
            "tcp",
            "    affinity_timeout: 1s\n",
            &[(0, 1), (1, 1), (2, 1)],
            false,
            None,
        ),
    );
    // Each client, many connections (new source ports): one backend per client.
    let mut pinned = BTreeMap::new();
    for c in 0..8 {
        let client = lb_tests::dc::client_v4(c);
        let got: Vec<String> = (0..25)
            .map(|_| s.lab.connect(client, sa(WEB)).expect("connection"))
            .collect();
        let first = got[0].clone();
        assert!(
            got.iter().all(|b| *b == first),
            "client {client} was spread: {got:?}"
        );
        pinned.insert(client, first);
    }
    eprintln!("affinity: 8 clients x 25 connections, each on one backend: {pinned:?}");
    let used: std::collections::BTreeSet<_> = pinned.values().collect();
    assert!(
        used.len() >= 2,
        "8 clients all pinned to one backend: {pinned:?}"
    );
    // Past the timeout (1s; the program's clock is coarse, so more than 2s after the last
    // connection) the entries expire and are replaced on the next connection: time itself is
    // what this test waits for, and what follows checks a positive count.
    std::thread::sleep(Duration::from_millis(2300));
    for c in 0..8 {
        s.lab
            .connect(lb_tests::dc::client_v4(c), sa(WEB))
            .expect("connection");
    }
    let stats = s.dirs.json(&["stats"]);
    assert_eq!(
        stats["global"]["affinity_expired"].as_u64(),
        Some(8),
        "expired entries: {}",
        stats["global"]
    );
    assert!(
        stats["global"]["affinity_hits"].as_u64().unwrap() >= 8 * 24,
        "{}",
        stats["global"]
    );
}

#[test]
fn removing_a_backend_moves_only_its_connections() {
    let mut s = setup("remove", &web(&[(0, 1), (1, 1), (2, 1)]));
    let streams = s.lab.streams(sa(WEB), 30);
    let before = by_backend(&streams);
    assert!(before.len() == 3, "streams on {before:?}");
    assert!(
        exchange(&streams, 50, T),
        "the streams stalled before the change"
    );
    s.dirs.write_config(&config(&web(&[(0, 1), (1, 1)])));
    s.agent.wait_applied(&s.lab.lb, &s.dirs, 1, T);
    // Every stream that still runs exchanges 300 echoes through the new tables.
    exchange(&streams, 300, T);
    let t = s.lab.tcp_tally(sa(WEB), 300, 8);
    let (broken, ok) = finish(streams);
    eprintln!(
        "remove b3: streams before {before:?}, unbroken after {ok:?}, broken {}; new connections {t:?}",
        broken.len()
    );
    let broken_elsewhere: Vec<&String> = broken.iter().filter(|b| !b.starts_with("b3")).collect();
    assert!(
        broken_elsewhere.is_empty(),
        "streams to remaining backends broke: {broken_elsewhere:?} (healthy: {ok:?}, before: {before:?})"
    );
    assert_eq!(ok.get("b1"), before.get("b1"), "b1's streams: {ok:?}");
    assert_eq!(ok.get("b2"), before.get("b2"), "b2's streams: {ok:?}");
    assert_eq!(
        t.get("b3"),
        None,
        "new connections still reach the removed backend: {t:?}"
    );
    assert_eq!(errors(&t), 0, "{t:?}");
}

#[test]
fn adding_a_backend_moves_no_established_connection() {
    let mut s = setup("add", &web(&[(0, 1), (1, 1)]));
    let streams = s.lab.streams(sa(WEB), 30);
    let before = by_backend(&streams);
    assert!(
        exchange(&streams, 50, T),
        "the streams stalled before the change"
    );
    s.dirs
        .write_config(&config(&web(&[(0, 1), (1, 1), (2, 1)])));
    s.agent.wait_applied(&s.lab.lb, &s.dirs, 1, T);
    // Every stream that still runs exchanges 300 echoes through the new tables.
    exchange(&streams, 300, T);
    let t = s.lab.tcp_tally(sa(WEB), 300, 8);
    let (broken, ok) = finish(streams);
    eprintln!(
        "adding_a_backend_moves_no_established_connection: streams before {before:?}, unbroken after {ok:?}, broken {}, new connections {t:?}",
        broken.len()
    );
    assert!(
        broken.is_empty(),
        "established connections broke: {broken:?} (before: {before:?})"
    );
    assert_eq!(ok, before);
    assert!(
        share(&t, "b3") > 0.2,
        "the new backend gets {:.1} % of new connections: {t:?}",
        share(&t, "b3") * 100.0
    );
}

#[test]
fn kill9_and_restart_breaks_no_stream() {
    let mut s = setup("kill9", &web(&[(0, 1), (1, 1), (2, 1)]));
    let streams = s.lab.streams(sa(WEB), 30);
    let before = by_backend(&streams);
    assert!(
        exchange(&streams, 50, T),
        "the streams stalled before the change"
    );
    s.agent.kill9();
    // 300 echoes each with no agent running.
    exchange(&streams, 300, T);
    let during = s.lab.tcp_tally(sa(WEB), 60, 8);
    assert_eq!(
        errors(&during),
        0,
        "new connections failed with no agent running: {during:?}"
    );
    let mut agent = Agent::start(&s.lab.lb, &s.dirs);
    let status = agent.wait_running(&s.lab.lb, &s.dirs, T);
    exchange(&streams, 300, T);
    let (broken, ok) = finish(streams);
    eprintln!(
        "kill9_and_restart_breaks_no_stream: streams before {before:?}, unbroken after {ok:?}, broken {}, connections with no agent {during:?}",
        broken.len()
    );
    assert!(
        broken.is_empty(),
        "{} of 30 streams broke across kill -9 and restart: {broken:?}",
        broken.len()
    );
    assert_eq!(ok, before);
    assert_eq!(
        status["agent"]["start"],
        serde_json::json!({ "adopted": true, "map_writes": 0 }),
        "the restart rewrote maps: {status:#}"
    );
}

#[test]
fn an_invalid_reload_under_traffic_changes_nothing() {
    let mut s = setup("badreload", &web(&[(0, 2), (1, 1), (2, 1)]));
    let streams = s.lab.streams(sa(WEB), 20);
    let tables = |d: &Dirs| -> Vec<(String, u64, u64)> {
        d.json(&["backends"])[0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["backend"]["address"].as_str().unwrap().to_string(),
                    b["weight"].as_u64().unwrap(),
                    b["slots"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let slots = tables(&s.dirs);
    s.dirs
        .write_config(&config(&web(&[(0, 2), (1, 1), (2, 99999)])));
    s.agent.wait_rejected(&s.lab.lb, &s.dirs, 1, T);
    exchange(&streams, 300, T);
    let t = s.lab.tcp_tally(sa(WEB), 200, 8);
    let (broken, _) = finish(streams);
    assert!(broken.is_empty(), "streams broke: {broken:?}");
    assert_eq!(errors(&t), 0, "{t:?}");
    assert_eq!(
        tables(&s.dirs),
        slots,
        "the rejected config changed weights or tables"
    );
}

#[test]
fn draining_keeps_established_connections_and_takes_no_new_ones() {
    let mut s = setup("drain", &web(&[(0, 1), (1, 1), (2, 1)]));
    let streams = s.lab.streams(sa(WEB), 30);
    let before = by_backend(&streams);
    assert!(
        before.get("b3").copied().unwrap_or(0) > 0,
        "no stream on b3 to drain: {before:?}"
    );
    s.dirs
        .write_config(&config(&web(&[(0, 1), (1, 1), (2, 0)])));
    s.agent.wait_applied(&s.lab.lb, &s.dirs, 1, T);
    // Every stream that still runs exchanges 300 echoes through the new tables.
    exchange(&streams, 300, T);
    let t = s.lab.tcp_tally(sa(WEB), 300, 8);
    let (broken, ok) = finish(streams);
    eprintln!(
        "draining_keeps_established_connections_and_takes_no_new_ones: streams before {before:?}, unbroken after {ok:?}, broken {}, new connections {t:?}",
        broken.len()
    );
    assert!(
        broken.is_empty(),
        "streams broke while draining: {broken:?}"
    );
    assert_eq!(ok, before, "streams per backend");
    assert_eq!(
        t.get("b3"),
        None,
        "a draining backend got new connections: {t:?}"
    );
    assert_eq!(errors(&t), 0, "{t:?}");
}

const SINK_PORT: u16 = 9100;
const UPLOAD: usize = 10 << 20;

/// A client uploads 10 MB through a DSR VIP on `vip` (IPv6 backends if `v6`) over a fabric of
/// MTU 1500, so its full-size segments no longer fit once encapsulated: the load balancer must
/// tell it (ICMP too big) for the upload to get anywhere. Checks the upload completes, and that
/// the ICMP was sent.
fn upload_over_a_1500_byte_fabric(tag: &str, vip: &str, v6: bool) {
    let all = [(0, 1), (1, 1), (2, 1)];
    let vips = vip_yaml(vip, SINK_PORT, "tcp", "", &all, v6, None);
    let s = setup_in(Lab::with_fabric_mtu(1500), tag, &vips);
    let _sinks = Sinks::start(&s.lab, SINK_PORT);
    let (client, to) = if v6 {
        (
            client_v6(0),
            SocketAddr::new(vip.parse().unwrap(), SINK_PORT),
        )
    } else {
        (
            client_v4(0),
            SocketAddr::new(vip.parse().unwrap(), SINK_PORT),
        )
    };
    let started = std::time::Instant::now();
    let got = s.lab.upload(client, to, UPLOAD, Duration::from_secs(60));
    eprintln!("{tag}: {got:?} in {:?}", started.elapsed());
    let stats = s.dirs.json(&["stats"]);
    assert_eq!(got, Ok(UPLOAD as u64), "the upload through {vip}: {stats}");
    let sent = stats["global"]["icmp_too_big_sent"].as_u64();
    assert!(sent > Some(0), "no ICMP too big sent: {stats}");
    eprintln!("{tag}: {sent:?} ICMP too big sent");
}

#[test]
fn ipv4_upload_through_a_dsr_vip_completes_on_a_1500_byte_fabric() {
    upload_over_a_1500_byte_fabric("upload4", "192.0.2.10", false);
}

#[test]
fn ipv6_upload_through_a_dsr_vip_completes_on_a_1500_byte_fabric() {
    upload_over_a_1500_byte_fabric("upload6", "2001:db8::10", true);
}

/// MTU of the router's routes towards the clients in the PMTU tests (the links and the fabric
/// stay larger, so the client advertises a full-size MSS).
const CLIENT_LINK_MTU: u32 = 1400;

/// The client echoes 1 MB through a DSR VIP whose backends' full-size segments do not fit the
/// router's link towards the client: the router's fragmentation needed / packet too big goes to
/// the VIP, and the load balancer must send it on to the backend. Checks the echo completes, the
/// load balancer counted the ICMP forwarded, and the backend's route towards the client learned
/// the MTU.
fn backend_learns_the_path_mtu_to_its_client(tag: &str, vip: &str, v6: bool) {
    let all = [(0, 1), (1, 1), (2, 1)];
    let vips = vip_yaml(vip, 80, "tcp", "", &all, v6, None);
    let s = setup(tag, &vips);
    let mtu = CLIENT_LINK_MTU.to_string();
    // On routes, not the link: the client's full-size segments must still get in.
    s.lab.router.script(&format!(
        "route add 10.10.0.0/25 dev r0 mtu {mtu}
         route add fd10::/65 dev r0 mtu {mtu}"
    ));
    let client = if v6 { client_v6(0) } else { client_v4(0) };
    let to = SocketAddr::new(vip.parse().unwrap(), 80);
    let got = s
        .lab
        .echo_through(client, to, 1 << 20, Duration::from_secs(30));
    let stats = s.dirs.json(&["stats"]);
    let backend = got.unwrap_or_else(|e| panic!("echo through {vip}: {e}; {stats}"));
    let forwarded = stats["global"]["icmp_forwarded"].as_u64();
    assert!(forwarded > Some(0), "no ICMP error forwarded: {stats}");
    let (_, ns) = s
        .lab
        .backends
        .iter()
        .find(|(n, _)| *n == backend)
        .unwrap_or_else(|| panic!("no backend {backend}"));
    let family = if v6 { "-6" } else { "-4" };
    let out = std::process::Command::new("ip")
        .args(["-n", &ns.name, family, "route", "get", &client.to_string()])
        .output()
        .expect("running ip route get");
    let route = String::from_utf8_lossy(&out.stdout);
    assert!(
        route.contains(&format!("mtu {mtu}")),
        "{backend}'s route to {client} did not learn MTU {mtu}: {route}"
    );
    eprintln!(
        "{tag}: {forwarded:?} ICMP errors forwarded; {backend}: {}",
        route.trim()
    );
}

#[test]
fn ipv4_dsr_backend_learns_the_path_mtu_to_its_client_from_a_forwarded_fragmentation_needed() {
    backend_learns_the_path_mtu_to_its_client("pmtu4", "192.0.2.10", false);
}

#[test]
fn ipv6_dsr_backend_learns_the_path_mtu_to_its_client_from_a_forwarded_packet_too_big() {
    backend_learns_the_path_mtu_to_its_client("pmtu6", "2001:db8::10", true);
}
