//! NAT mode end to end: the real agent in the lab of [`lb_tests::dc`], in front of plain TCP and
//! UDP servers listening on the backends' own addresses (no VIP on loopback, no tunnel), on a
//! port other than the VIP's. Replies come back through the load balancer.

use std::{net::SocketAddr, path::Path, time::Duration};

use lb_tests::{
    agent::{Agent, Dirs},
    dc::{BACKENDS, Lab, NatServers, client_v4, errors, lab_config, share, vip_yaml},
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);
const PORT: u16 = 9000;

fn nat_vip(addr: &str, port: u16, proto: &str, extra: &str, weights: [u32; 3], v6: bool) -> String {
    let backends: Vec<(usize, u32)> = weights.into_iter().enumerate().collect();
    vip_yaml(addr, port, proto, extra, &backends, v6, Some(PORT))
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn nat_vips_serve_unmodified_backends() {
    let lab = Lab::new();
    let servers = NatServers::start(&lab, PORT);
    let dirs = Dirs::new(Path::new(BIN), "nat");
    let vips = [
        nat_vip(
            "192.0.2.20",
            80,
            "tcp",
            "    passive_health: { failures: 3, recheck_interval: 1s, timeout: 500ms }\n",
            [1, 2, 1],
            false,
        ),
        nat_vip("192.0.2.20", 53, "udp", "", [1, 1, 1], false),
        nat_vip("2001:db8::20", 80, "tcp", "", [1, 1, 1], true),
        nat_vip(
            "192.0.2.30",
            80,
            "tcp",
            "    affinity_timeout: 60s\n",
            [1, 1, 1],
            false,
        ),
    ]
    .concat();
    dirs.write_config(&lab_config("  syn_timeout: 1s\n", &vips));
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_for("running", 1, T);

    // Thousands of connections, weights 1:2:1.
    let t = lab.tcp_tally(sa("192.0.2.20:80"), 2000, 8);
    assert_eq!(errors(&t), 0, "TCP/IPv4 failures: {t:?}");
    assert!(
        (0.42..0.58).contains(&share(&t, "b2")),
        "weight 2 of 4: {t:?}"
    );
    for b in ["b1", "b3"] {
        assert!((0.18..0.32).contains(&share(&t, b)), "weight 1 of 4: {t:?}");
    }
    for (what, t) in [
        ("UDP/IPv4", lab.udp_tally(sa("192.0.2.20:53"), 300, 8)),
        ("TCP/IPv6", lab.tcp_tally(sa("[2001:db8::20]:80"), 300, 8)),
    ] {
        assert_eq!(errors(&t), 0, "{what}: failures: {t:?}");
        for b in ["b1", "b2", "b3"] {
            assert!(share(&t, b) > 0.2, "{what}: {t:?}");
        }
    }
    // Affinity: every client stays on one backend; the clients spread.
    let mut seen = std::collections::BTreeSet::new();
    for c in 0..8 {
        let answers: std::collections::BTreeSet<String> = (0..10)
            .map(|_| {
                lab.connect(client_v4(c), sa("192.0.2.30:80"))
                    .expect("affinity VIP")
            })
            .collect();
        assert_eq!(answers.len(), 1, "client {c} moved between {answers:?}");
        seen.extend(answers);
    }
    assert!(seen.len() > 1, "all clients on one backend: {seen:?}");

    let stats = dirs.json(&["stats"]);
    let g = &stats["global"];
    assert!(g["nat_forward"].as_u64().unwrap() > 10_000, "{stats}");
    assert!(g["nat_reverse"].as_u64().unwrap() > 5_000, "{stats}");
    assert_eq!(g["drop_nat_ports_exhausted"].as_u64(), Some(0), "{stats}");

    // b3 starts refusing every connection: passive health takes it out...
    servers.set_down("b3", true);
    let t = lab.tcp_tally(sa("192.0.2.20:80"), 200, 8);
    assert!(!t.contains_key("b3"), "{t:?}");
    agent.wait_for("passive health", 1, T);
    let t = lab.tcp_tally(sa("192.0.2.20:80"), 300, 8);
    assert_eq!(errors(&t), 0, "after b3 was taken out: {t:?}");
    assert_eq!(share(&t, "b3"), 0.0, "{t:?}");
    let backends = dirs.json(&["backends"]);
    let web = backends
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vip"]["label"] == "192.0.2.20:80/tcp")
        .unwrap();
    let b3 = web["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["backend"]["address"] == BACKENDS[2].1)
        .unwrap();
    assert_eq!(b3["health"], "out-passive", "{b3}");
    assert!(b3["passive"]["refused"].as_u64().unwrap() >= 3, "{b3}");

    // ...and brings it back once it answers again.
    servers.set_down("b3", false);
    agent.wait_for("back in", 1, T);
    let t = lab.tcp_tally(sa("192.0.2.20:80"), 400, 8);
    assert_eq!(errors(&t), 0, "{t:?}");
    assert!(share(&t, "b3") > 0.15, "b3 did not come back: {t:?}");
    drop(agent);
}
