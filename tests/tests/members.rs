//! Members: each (VIP, backend) pair has a member id of its own, with its own counters, flows and
//! affinity, and new connections go where health and weights say *now*.
//!
//! The agent runs in this process over the kernel dataplane (maps pinned in a directory of the
//! test's own); a second copy of the program loaded on those pins ([`Lb::adopt`]) runs the
//! frames, so they meet exactly the maps the agent wrote. Where a frame went is read off its
//! outer header; where it *should* go is read off the table the agent wrote (hash -> slot ->
//! member), not asked of the program.

use std::{collections::BTreeMap, net::IpAddr, path::Path, sync::Arc};

use lb_common::{Counter, flow_hash, maglev_slot};
use lb_tests::{
    agent::Dirs,
    config::{
        RawBackend, RawConfig, RawHealthCheck, RawNode, RawVip, backend, some, strings, vip,
        weighted, yaml,
    },
    harness::{FibNet, Lb, XDP_TX, action_name, net::*},
    hex,
    packet::{L4, Pkt, TCP_ACK},
};
use lb_userspace::{
    agent::reconcile::{Agent, Remembered},
    kernel::dataplane::kernel::KernelDataplane,
    kernel::program,
    model::desired::ip_of,
    observe::metrics,
    sources::config::Config,
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const M: u32 = 1009;
const VIP_A: &str = "192.0.2.1";
const VIP_B: &str = "192.0.2.2";
const B1: &str = "10.1.0.1";
const B2: &str = "10.1.0.2";
const B9: &str = "10.1.0.9";
const CLIENT: &str = "198.51.100.7";

/// A VIP: address, affinity timeout in seconds (0: none), backends with weights.
type Vip<'a> = (&'a str, u32, &'a [(&'a str, u32)]);

/// The node: lb0, a table of `M` slots, 8 VIPs, 8 backends.
fn node() -> RawNode {
    RawNode {
        interfaces: strings(&["lb0"]),
        source_v4: some(NODE_V4),
        table_size: Some(M.into()),
        max_vips: Some(8),
        max_backends: Some(8),
        ..RawNode::default()
    }
}

/// `config` read as the agent reads its file.
fn parse(config: &RawConfig) -> Config {
    let y = yaml(config);
    Config::parse(&y, "test").unwrap_or_else(|e| panic!("config:\n{y}\n{e}"))
}

/// A config: the node, then `vips`.
fn config(vips: &[Vip]) -> Config {
    let vips = vips
        .iter()
        .map(|(addr, affinity, backends)| {
            let list: Vec<RawBackend> = backends.iter().map(|(b, w)| weighted(b, *w)).collect();
            RawVip {
                name: None,
                affinity_timeout: (*affinity > 0).then(|| format!("{affinity}s")),
                // Checked, so the tests may set health (the agent runs no probes in this process).
                health_check: Some(RawHealthCheck {
                    kind: some("tcp"),
                    ..RawHealthCheck::default()
                }),
                ..vip("", addr, 80, "tcp", &list)
            }
        })
        .collect();
    parse(&RawConfig { node: node(), vips })
}

/// The agent (in this process) and the program on its pins.
struct Node {
    agent: Agent<KernelDataplane>,
    lb: Lb,
    dirs: Dirs,
}

impl Node {
    fn start(tag: &str, c: Config) -> Self {
        let dirs = Dirs::new(Path::new(BIN), tag);
        std::fs::create_dir_all(&dirs.pins).expect("creating the pin directory");
        let ebpf = program::load(&c.node.sizes, Some(&dirs.pins)).expect("loading the program");
        let dp = KernelDataplane::new(ebpf, c.node.sizes.clone()).expect("the dataplane");
        let (agent, _) = Agent::start(dp, c, &Remembered::default()).expect("starting the agent");
        let lb = Lb::adopt(&dirs.pins);
        Self { agent, lb, dirs }
    }

    fn apply(&mut self, c: Config) {
        self.agent.replace_config(c).expect("applying a config");
    }

    /// Runs `pkt` and returns the backend address it was encapsulated to.
    fn send(&mut self, net: &FibNet, pkt: &Pkt) -> IpAddr {
        let run = net.ns.run(|| self.lb.run(&pkt.frame(), net.lb0));
        assert_eq!(
            action_name(run.action),
            action_name(XDP_TX),
            "{}",
            hex(&pkt.frame())
        );
        let o = &run.output;
        assert_eq!(u16::from_be_bytes([o[12], o[13]]), 0x0800, "outer IPv4");
        IpAddr::from(<[u8; 4]>::try_from(&o[30..34]).unwrap())
    }

    /// The VIP id the agent gave `vip`.
    fn vip_id(&self, vip: &str) -> u32 {
        let a: IpAddr = vip.parse().unwrap();
        self.agent
            .state()
            .vips
            .iter()
            .find(|(k, _)| ip_of(&k.addr, k.family) == a)
            .map(|(_, v)| v.id)
            .unwrap_or_else(|| panic!("no VIP {vip}"))
    }

    /// The backend the table the agent wrote gives `pkt` (5-tuple hash -> slot -> member).
    fn table_choice(&self, pkt: &Pkt) -> IpAddr {
        let k = pkt.flow_key();
        let s = self.agent.state();
        let id = s
            .vips
            .iter()
            .find(|(v, _)| v.addr == k.dst && v.port == k.dst_port && v.proto == k.proto)
            .map(|(_, v)| v.id)
            .expect("the packet's VIP");
        let slot = maglev_slot(flow_hash(&pkt.flow_key()), M);
        let member = s.rings[&id][slot as usize];
        let m = s.members[&member];
        ip_of(&m.addr, m.family)
    }

    /// The member id of `backend` in `vip`, if it has one.
    fn member(&self, vip: &str, backend: &str) -> Option<u32> {
        let (v, b): (u32, IpAddr) = (self.vip_id(vip), backend.parse().unwrap());
        self.agent
            .state()
            .members
            .iter()
            .find(|(_, m)| m.vip_id == v && ip_of(&m.addr, m.family) == b)
            .map(|(id, _)| *id)
    }
}

fn syn(sport: u16, vip: &str) -> Pkt {
    Pkt::tcp(CLIENT, sport, vip, 80, LB0_MAC)
}

fn ack(p: &Pkt) -> Pkt {
    p.clone().with(|p| p.l4 = L4::Tcp { flags: TCP_ACK })
}

/// A client port from `from` on whose new connection the table says `want`.
fn port_to(node: &Node, vip: &str, want: &str, from: u16) -> u16 {
    let want: IpAddr = want.parse().unwrap();
    (from..from + 2000)
        .find(|&p| node.table_choice(&syn(p, vip)) == want)
        .unwrap_or_else(|| panic!("no port of {CLIENT} goes to {want}"))
}

#[test]
fn two_vips_sharing_backends_count_apart_and_add_up_per_backend() {
    let net = FibNet::new("m-count");
    let both: &[(&str, u32)] = &[(B1, 1), (B2, 1)];
    let mut node = Node::start("m-count", config(&[(VIP_A, 0, both), (VIP_B, 0, both)]));
    // What the test saw: packets per (VIP, backend).
    let mut seen: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (vip, n) in [(VIP_A, 12u16), (VIP_B, 5)] {
        for p in 0..n {
            let b = node.send(&net, &syn(30000 + p, vip));
            *seen.entry((vip.into(), b.to_string())).or_default() += 1;
        }
    }
    let label = |vip: &str| format!("{vip}:80/tcp");
    let stats = node.dirs.json(&["stats"]);
    for row in stats["members"].as_array().unwrap() {
        let vip = row["vip"]["address"].as_str().unwrap();
        let key = (
            vip.to_string(),
            row["backend"]["address"].as_str().unwrap().to_string(),
        );
        assert_eq!(
            row["packets"].as_u64(),
            Some(seen.get(&key).copied().unwrap_or(0)),
            "lb stats, member {key:?}"
        );
    }
    for row in stats["backends"].as_array().unwrap() {
        let b = row["backend"]["address"].as_str().unwrap();
        let total: u64 = seen
            .iter()
            .filter(|((_, x), _)| x == b)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(
            row["packets"].as_u64(),
            Some(total),
            "lb stats, total of {b}"
        );
    }
    assert_eq!(stats["members"].as_array().unwrap().len(), 4);

    let backends = node.dirs.json(&["backends"]);
    for vip in backends.as_array().unwrap() {
        let v = vip["vip"]["address"].as_str().unwrap();
        for b in vip["backends"].as_array().unwrap() {
            let key = (
                v.to_string(),
                b["backend"]["address"].as_str().unwrap().to_string(),
            );
            assert_eq!(
                b["packets"].as_u64(),
                Some(seen.get(&key).copied().unwrap_or(0)),
                "lb backends, {key:?}"
            );
        }
    }

    let text = metrics::Scraper::open(&node.dirs.pins, Arc::new(metrics::AgentMetrics::default()))
        .unwrap()
        .scrape(metrics::Format::Text)
        .unwrap();
    for ((vip, b), n) in &seen {
        let line = format!(
            // The backend as address:port (the VIP's port: these are DSR backends).
            "lb_backend_packets_total{{vip=\"{}\",backend=\"{b}:80\"}} {n}",
            label(vip)
        );
        assert!(
            text.lines().any(|l| l == line),
            "/metrics lacks {line}:\n{text}"
        );
    }
}

#[test]
fn a_reused_member_id_reaches_none_of_its_old_flows_and_starts_at_zero() {
    let net = FibNet::new("m-reuse");
    let two: &[(&str, u32)] = &[(B1, 1), (B2, 1)];
    let one: &[(&str, u32)] = &[(B1, 1)];
    let mut node = Node::start("m-reuse", config(&[(VIP_A, 0, two), (VIP_B, 300, two)]));
    // A connection to A on B2, and the client held on B2 by B's affinity.
    let p = port_to(&node, VIP_A, B2, 40000);
    let conn = syn(p, VIP_A);
    assert_eq!(node.send(&net, &conn).to_string(), B2);
    let q = port_to(&node, VIP_B, B2, 41000);
    assert_eq!(node.send(&net, &syn(q, VIP_B)).to_string(), B2);
    let old = (
        node.member(VIP_A, B2).unwrap(),
        node.member(VIP_B, B2).unwrap(),
    );

    // B2 leaves both VIPs (reconcile); then newcomers join a third VIP (reconcile) and take the
    // freed ids, the lowest ones not live.
    node.apply(config(&[(VIP_A, 0, one), (VIP_B, 300, one)]));
    let new: &[(&str, u32)] = &[(B9, 1), ("10.1.0.10", 1)];
    node.apply(config(&[
        (VIP_A, 0, one),
        (VIP_B, 300, one),
        ("192.0.2.3", 0, new),
    ]));
    let newcomers = [
        node.member("192.0.2.3", B9).unwrap(),
        node.member("192.0.2.3", "10.1.0.10").unwrap(),
    ];
    let (mut reused, mut olds) = (newcomers.to_vec(), vec![old.0, old.1]);
    reused.sort();
    olds.sort();
    assert_eq!(reused, olds, "the newcomers took B2's old ids");

    // Its counters start at zero.
    let stats = node.dirs.json(&["stats"]);
    for row in stats["members"].as_array().unwrap() {
        if newcomers.contains(&(row["id"].as_u64().unwrap() as u32)) {
            assert_eq!(row["packets"], 0, "a newcomer inherited counters: {row}");
        }
    }
    // The old connection's next packet and the held client's next connection go to B1.
    assert_eq!(
        node.send(&net, &ack(&conn)).to_string(),
        B1,
        "old flow reached the newcomer"
    );
    let again = syn(q + 1, VIP_B);
    assert_eq!(
        node.send(&net, &again).to_string(),
        B1,
        "old affinity reached the newcomer"
    );
}

#[test]
fn a_backend_removed_from_one_vip_keeps_none_of_its_flows_or_affinity_there() {
    let net = FibNet::new("m-remove");
    let two: &[(&str, u32)] = &[(B1, 1), (B2, 1)];
    let one: &[(&str, u32)] = &[(B1, 1)];
    let mut node = Node::start("m-remove", config(&[(VIP_A, 300, two), (VIP_B, 0, two)]));
    let pa = port_to(&node, VIP_A, B2, 40000);
    let on_a = syn(pa, VIP_A);
    assert_eq!(node.send(&net, &on_a).to_string(), B2);
    let pb = port_to(&node, VIP_B, B2, 42000);
    let on_b = syn(pb, VIP_B);
    assert_eq!(node.send(&net, &on_b).to_string(), B2);

    node.apply(config(&[(VIP_A, 300, one), (VIP_B, 0, two)]));
    assert_eq!(
        node.send(&net, &ack(&on_a)).to_string(),
        B1,
        "A's flow stayed on B2"
    );
    assert_eq!(
        node.send(&net, &syn(pa + 1, VIP_A)).to_string(),
        B1,
        "A's affinity stayed on B2"
    );
    assert_eq!(
        node.send(&net, &ack(&on_b)).to_string(),
        B2,
        "B lost its flow"
    );
}

#[test]
fn new_connections_on_reused_ports_follow_health_and_weights_now() {
    let net = FibNet::new("m-ports");
    let mut node = Node::start("m-ports", config(&[(VIP_A, 0, &[(B1, 1), (B2, 1)])]));
    let key = node.agent.config().vips[0].spec.key();
    // Port p's last connection went to B2 (its flow entry names B2).
    let p = port_to(&node, VIP_A, B2, 40000);
    assert_eq!(node.send(&net, &syn(p, VIP_A)).to_string(), B2);
    let established = syn(port_to(&node, VIP_A, B2, p + 1), VIP_A);
    assert_eq!(node.send(&net, &established).to_string(), B2);

    // B2 taken out by its health check: a new connection on p goes to B1; the established one stays.
    node.agent
        .set_health((key, B2.parse().unwrap()), false)
        .unwrap();
    assert_eq!(
        node.send(&net, &syn(p, VIP_A)).to_string(),
        B1,
        "SYN followed the old entry"
    );
    assert_eq!(node.send(&net, &ack(&established)).to_string(), B2);

    // B2 back: p's entry now names B1, but a new connection goes where the table says (B2).
    node.agent
        .set_health((key, B2.parse().unwrap()), true)
        .unwrap();
    assert_eq!(node.table_choice(&syn(p, VIP_A)).to_string(), B2);
    assert_eq!(
        node.send(&net, &syn(p, VIP_A)).to_string(),
        B2,
        "SYN followed the old entry"
    );

    // A weight change: connections on many ports go to B1 under equal weights; after B2's
    // weight goes up, a new connection on a port the new table moves goes to B2.
    let on_b1: Vec<u16> = (43000..43400)
        .filter(|&q| node.table_choice(&syn(q, VIP_A)).to_string() == B1)
        .collect();
    for q in &on_b1 {
        assert_eq!(node.send(&net, &syn(*q, VIP_A)).to_string(), B1);
    }
    node.apply(config(&[(VIP_A, 0, &[(B1, 1), (B2, 4)])]));
    let moved: Vec<u16> = on_b1
        .into_iter()
        .filter(|&q| node.table_choice(&syn(q, VIP_A)).to_string() == B2)
        .collect();
    assert!(
        moved.len() > 10,
        "the weight change moved only {} ports",
        moved.len()
    );
    for q in moved {
        assert_eq!(
            node.send(&net, &syn(q, VIP_A)).to_string(),
            B2,
            "port {q}: a SYN ignored the new weights"
        );
    }
}

#[test]
fn affinity_gives_a_new_connection_another_backend_once_its_backend_is_unhealthy() {
    let net = FibNet::new("m-affhealth");
    let mut node = Node::start("m-affhealth", config(&[(VIP_A, 300, &[(B1, 1), (B2, 1)])]));
    let key = node.agent.config().vips[0].spec.key();
    let first = syn(port_to(&node, VIP_A, B2, 40000), VIP_A);
    assert_eq!(node.send(&net, &first).to_string(), B2);
    // Held on B2: a port the table would send to B1 still goes to B2.
    let other = syn(port_to(&node, VIP_A, B1, 41000), VIP_A);
    assert_eq!(
        node.send(&net, &other).to_string(),
        B2,
        "affinity not followed"
    );

    node.agent
        .set_health((key, B2.parse().unwrap()), false)
        .unwrap();
    let before = node.lb.counters();
    let next = syn(port_to(&node, VIP_A, B1, 42000), VIP_A);
    assert_eq!(
        node.send(&net, &next).to_string(),
        B1,
        "affinity kept an unhealthy backend"
    );
    assert_eq!(
        node.lb.counters()[&Counter::AffinityStale] - before[&Counter::AffinityStale],
        1
    );
    assert_eq!(
        node.send(&net, &ack(&first)).to_string(),
        B2,
        "the established connection moved"
    );
}

/// Where the program sent `pkt`, and what `lb explain` says of the same flow (as the maps are
/// just before it is sent).
fn explain_then_send(node: &mut Node, net: &FibNet, pkt: &Pkt, syn: bool) -> (String, IpAddr) {
    let proto = if matches!(pkt.l4, L4::Udp) {
        "udp"
    } else {
        "tcp"
    };
    let src = format!("{}:{}", pkt.src, pkt.sport);
    let dst = format!("{}:{}", pkt.dst, pkt.dport);
    let mut args = vec!["explain", src.as_str(), dst.as_str(), proto];
    if syn {
        args.push("--syn");
    }
    let e = node.dirs.json(&args);
    let said = e["backend"]["address"]
        .as_str()
        .unwrap_or("none")
        .to_string();
    (said, node.send(net, pkt))
}

#[test]
fn explain_agrees_with_the_program_on_idle_udp_flows_and_on_syns() {
    let net = FibNet::new("m-explain");
    let unnamed = |protocol: &str| RawVip {
        name: None,
        ..vip("", VIP_A, 80, protocol, &[backend(B1), backend(B2)])
    };
    let config = RawConfig {
        node: RawNode {
            udp_idle_timeout: some("5s"),
            ..node()
        },
        vips: vec![unnamed("udp"), unnamed("tcp")],
    };
    let mut node = Node::start("m-explain", parse(&config));
    let udp_id = node
        .agent
        .state()
        .vips
        .iter()
        .find(|(k, _)| k.proto == 17)
        .unwrap()
        .1
        .id;
    let member_of = |node: &Node, vip: u32, b: &str| {
        let b: IpAddr = b.parse().unwrap();
        let s = node.agent.state();
        let (id, m) = s
            .members
            .iter()
            .find(|(_, m)| m.vip_id == vip && ip_of(&m.addr, m.family) == b)
            .unwrap();
        (*id, m.generation)
    };
    // A UDP flow pinned to the backend Maglev would not give it, then idle past the timeout.
    let udp = Pkt::udp(CLIENT, 5353, VIP_A, 80, LB0_MAC);
    let other = if node.table_choice(&udp).to_string() == B1 {
        B2
    } else {
        B1
    };
    let (id, generation) = member_of(&node, udp_id, other);
    let k = udp.flow_key();
    let pinned = |last_seen_ns| lb_common::FlowValue {
        member_id: id,
        generation,
        last_seen_ns,
    };
    node.lb.set_flow(
        k,
        pinned(lb_userspace::kernel::inspect::monotonic_coarse_ns()),
    );
    let (said, went) = explain_then_send(&mut node, &net, &udp, false);
    assert_eq!(
        (said.as_str(), went.to_string().as_str()),
        (other, other),
        "fresh entry"
    );
    node.lb.set_flow(k, pinned(1));
    let (said, went) = explain_then_send(&mut node, &net, &udp, false);
    assert_eq!(
        said,
        went.to_string(),
        "idle entry: explain and the program disagree"
    );
    assert_ne!(said, other, "the idle entry was followed");

    // A SYN from a port whose entry names the other backend.
    let tcp_id = node
        .agent
        .state()
        .vips
        .iter()
        .find(|(k, _)| k.proto == 6)
        .unwrap()
        .1
        .id;
    let syn_pkt = Pkt::tcp(CLIENT, 40000, VIP_A, 80, LB0_MAC);
    let other = if node.table_choice(&syn_pkt).to_string() == B1 {
        B2
    } else {
        B1
    };
    let (id, generation) = member_of(&node, tcp_id, other);
    node.lb.set_flow(
        syn_pkt.flow_key(),
        lb_common::FlowValue {
            member_id: id,
            generation,
            last_seen_ns: 0,
        },
    );
    let (said, went) = explain_then_send(&mut node, &net, &syn_pkt, true);
    assert_eq!(
        said,
        went.to_string(),
        "SYN: explain and the program disagree"
    );
    assert_ne!(said, other, "the SYN followed the entry");
}

/// The filter words the VIP addresses `addrs` set (what the program's filter must hold).
fn filter_of(addrs: &[&str]) -> BTreeMap<u32, u64> {
    let mut want = BTreeMap::new();
    for a in addrs {
        let ip: IpAddr = a.parse().unwrap();
        let (family, addr) = match ip {
            IpAddr::V4(v) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&v.octets());
                (lb_common::FAMILY_V4, b)
            }
            IpAddr::V6(v) => (lb_common::FAMILY_V6, v.octets()),
        };
        let (w, bit) = lb_common::hash::vip_filter_slot(&addr, family);
        *want.entry(w).or_insert(0u64) |= bit;
    }
    want
}

#[test]
fn the_vip_filter_holds_exactly_the_bits_of_the_addresses_that_carry_vips() {
    let mut node = Node::start(
        "filter",
        config(&[(VIP_A, 0, &[(B1, 1)]), (VIP_B, 0, &[(B2, 1)])]),
    );
    assert_eq!(
        node.lb.vip_filter(),
        filter_of(&[VIP_A, VIP_B]),
        "both VIP addresses"
    );
    node.apply(config(&[(VIP_A, 0, &[(B1, 1)])]));
    assert_eq!(
        node.lb.vip_filter(),
        filter_of(&[VIP_A]),
        "after VIP_B went"
    );
    node.apply(config(&[]));
    assert_eq!(node.lb.vip_filter(), BTreeMap::new(), "with no VIP left");
    // A packet to a former VIP address passes as not for a VIP (the filter alone decides that;
    // the counters cannot tell whether the VIP table was asked too).
    let c0 = node.lb.counters();
    let r = node
        .lb
        .run(&Pkt::tcp(CLIENT, 1000, VIP_B, 80, LB0_MAC).frame(), 1);
    assert_eq!(action_name(r.action), "XDP_PASS");
    let c1 = node.lb.counters();
    assert_eq!(c1[&Counter::PassNotForVip] - c0[&Counter::PassNotForVip], 1);
}
