//! End to end: real connections from a client through a router and the load balancer (the real
//! `lb` agent, XDP on its uplink) to three DSR backends, in the lab of [`lb_tests::dc`].

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    time::Duration,
};

use lb_tests::{
    agent::{Agent, Dirs},
    dc::{BACKENDS, LB_V4, LB_V6, Lab},
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);

/// A config for the lab: `vips` is YAML for the `vips:` list.
fn config(vips: &str) -> String {
    format!(
        "node:
  interfaces: [eth0]
  source_v4: {LB_V4}
  source_v6: {LB_V6}
  table_size: 65537
  max_vips: 16
  max_backends: 64
  flow_table_size: 65536
  udp_idle_timeout: 30s
vips:
{vips}"
    )
}

fn vip(addr: &str, port: u16, proto: &str, extra: &str, backends: &[(usize, u32)], v6: bool) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(i, w)| format!("      - {{ address: {}, weight: {w} }}", if v6 { BACKENDS[*i].2 } else { BACKENDS[*i].1 }))
        .collect();
    format!("  - address: {addr}\n    port: {port}\n    protocol: {proto}\n{extra}    backends:\n{}\n", list.join("\n"))
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn share(t: &BTreeMap<String, usize>, who: &str) -> f64 {
    let total: usize = t.values().sum();
    *t.get(who).unwrap_or(&0) as f64 / total.max(1) as f64
}

fn errors(t: &BTreeMap<String, usize>) -> usize {
    t.iter().filter(|(k, _)| k.starts_with("error")).map(|(_, v)| v).sum()
}

struct Setup {
    lab: Lab,
    dirs: Dirs,
    agent: Agent,
}

fn setup(tag: &str, vips: &str) -> Setup {
    let lab = Lab::new();
    let dirs = Dirs::new(Path::new(BIN), tag);
    dirs.write_config(&config(vips));
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_for("running", 1, T);
    Setup { lab, dirs, agent }
}

#[test]
fn tcp_and_udp_over_ipv4_and_ipv6() {
    let all = [(0, 1), (1, 1), (2, 1)];
    let vips = [
        vip("192.0.2.10", 80, "tcp", "", &all, false),
        vip("192.0.2.10", 80, "udp", "", &all, false),
        vip("2001:db8::10", 80, "tcp", "", &all, true),
        vip("2001:db8::10", 80, "udp", "", &all, true),
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
            assert!(share(&t, b) > 0.2, "{what}: {b} got {:.1} %: {t:?}", share(&t, b) * 100.0);
        }
    }
    let stats = s.dirs.json(&["stats"]);
    assert!(stats["global"]["tx"].as_u64().unwrap() > 1000, "{stats}");
    drop(s);
}
