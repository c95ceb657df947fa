//! Port-range VIPs (`port_range`), in the XDP program: each test runs frames through it with
//! `BPF_PROG_TEST_RUN` and checks the action, the output bytes (built here with `etherparse`
//! through `lb_tests::packet`) and the counters. A range is looked up (`LB_VIP_RANGES`) only
//! after the exact lookup (`LB_VIPS`) misses: a port inside the range is balanced by the range
//! VIP, an exact VIP inside the range keeps its own packets, and a port outside every range of
//! a VIP address is not balanced (`pass_not_for_vip`, as for any other port without a VIP). The
//! maps are written by hand (see `lb_tests::harness`); the agent's side is checked in the unit
//! tests and `port_ranges_lab.rs`.

use std::net::IpAddr;

use lb_common::{
    Counter, IPPROTO_TCP, IPPROTO_UDP, MODE_DSR, MODE_NAT, VipValue, flow_hash, nat_port_candidate,
};
use lb_tests::{
    harness::{FibNet, Lb, XDP_PASS, XDP_TX, action_name, net::*, vip_key},
    hex,
    packet::{self, Pkt},
};
use lb_userspace::kernel::program::Sizes;

const DSR4: &str = "192.0.2.10";
const DSR6: &str = "2001:db8::10";
const NAT4: &str = "192.0.2.19";
const NAT6: &str = "2001:db8::19";

/// The range of every range VIP here, and the exact VIP inside it.
const LO: u16 = 10000;
const HI: u16 = 10999;
const EXACT: u16 = 10080;

/// VIP ids: the range VIPs, then the exact VIPs inside their ranges.
const V_DSR4: u32 = 0;
const V_DSR6: u32 = 1;
const V_NAT4: u32 = 2;
const V_NAT6: u32 = 3;
const V_EXACT4: u32 = 4;
const V_EXACT6: u32 = 5;
const V_EXACT_NAT4: u32 = 6;
const V_EXACT_NAT6: u32 = 7;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn value(id: u32, mode: u32) -> VipValue {
    VipValue {
        id,
        flags: 0,
        affinity_timeout_s: 0,
        mode,
        table_size: 0,
    }
}

/// The program with a TCP range VIP 10000-10999 on each of four addresses (DSR and NAT, IPv4
/// and IPv6), and on each address an exact VIP at port 10080 whose backend is another one.
/// NAT range members keep the packet's port (port 0); the exact NAT VIPs' go to port 8080.
fn setup() -> Lb {
    let mut lb = Lb::load(Sizes {
        table_size: 13,
        max_vips: 16,
        max_backends: 16,
        flow_table_size: 1024,
        affinity_table_size: 64,
        nat_table_size: 1024,
    });
    lb.set_node(Some(NODE_V4), Some(NODE_V6), 30_000_000_000);
    lb.set_backend_port(1, TX_V4, 0, true);
    lb.set_backend_port(2, TX_V6, 0, true);
    lb.set_backend_port(3, TX_V4_B, 8080, true);
    lb.set_backend_port(4, TX_V6_B, 8080, true);
    let ranges = [
        (V_DSR4, DSR4, MODE_DSR, 1),
        (V_DSR6, DSR6, MODE_DSR, 2),
        (V_NAT4, NAT4, MODE_NAT, 1),
        (V_NAT6, NAT6, MODE_NAT, 2),
    ];
    for (id, addr, mode, backend) in ranges {
        lb.add_vip_range(addr, IPPROTO_TCP, LO, HI, value(id, mode));
        lb.set_ring(id, |_| backend);
    }
    let exact = [
        (V_EXACT4, DSR4, MODE_DSR, 3),
        (V_EXACT6, DSR6, MODE_DSR, 4),
        (V_EXACT_NAT4, NAT4, MODE_NAT, 3),
        (V_EXACT_NAT6, NAT6, MODE_NAT, 4),
    ];
    for (id, addr, mode, backend) in exact {
        lb.add_vip(vip_key(addr, EXACT, IPPROTO_TCP), value(id, mode));
        lb.set_ring(id, |_| backend);
    }
    lb
}

/// Runs `pkt`; returns (action, output, change of `which`, packets counted for VIP `vip`).
fn run(lb: &mut Lb, ingress: u32, pkt: &Pkt, which: Counter, vip: u32) -> (u32, Vec<u8>, u64, u64) {
    let before = lb.counters();
    let vip_before = lb.traffic(lb_common::maps::VIP_STATS, vip).packets;
    let r = lb.run(&pkt.frame(), ingress);
    let after = lb.counters();
    assert_eq!(
        after[&Counter::Packets] - before[&Counter::Packets],
        1,
        "one packet, one verdict"
    );
    let vip_after = lb.traffic(lb_common::maps::VIP_STATS, vip).packets;
    (
        r.action,
        r.output,
        after[&which] - before[&which],
        vip_after - vip_before,
    )
}

/// A DSR packet encapsulated to `backend` and sent back out (`tx`), counted for VIP `vip`.
fn assert_encapsulated(lb: &mut Lb, ingress: u32, pkt: &Pkt, vip: u32, backend: &str) {
    let (action, output, n, per_vip) = run(lb, ingress, pkt, Counter::Tx, vip);
    assert_eq!(action_name(action), action_name(XDP_TX), "{pkt:?}");
    let src = if pkt.src.is_ipv4() { NODE_V4 } else { NODE_V6 };
    let want = packet::encapsulated(pkt, GW0_MAC, LB0_MAC, ip(src), ip(backend));
    assert_eq!(hex(&output), hex(&want), "port {}", pkt.dport);
    assert_eq!(
        (n, per_vip),
        (1, 1),
        "tx, and the packet counted for VIP {vip}"
    );
}

/// A packet not balanced: passed as it came (`pass_not_for_vip`), counted for no VIP.
fn assert_not_balanced(lb: &mut Lb, ingress: u32, pkt: &Pkt) {
    let (action, output, n, _) = run(lb, ingress, pkt, Counter::PassNotForVip, 0);
    assert_eq!(action_name(action), action_name(XDP_PASS), "{pkt:?}");
    assert_eq!(hex(&output), hex(&pkt.frame()));
    assert_eq!(n, 1, "pass_not_for_vip");
}

/// DSR: ports at both ends and inside the range go to the range VIP's backend, the exact VIP's
/// port to its own, ports just outside are not balanced.
fn dsr_case(tag: &str, vip: &str, range_id: u32, exact_id: u32, backend: &str, exact_be: &str) {
    let net = FibNet::new(tag);
    let ingress = net.lb0;
    let client = if ip(vip).is_ipv4() {
        "198.51.100.7"
    } else {
        "2001:db8:c::7"
    };
    net.ns.run(|| {
        let mut lb = setup();
        for port in [LO, 10500, HI] {
            let p = Pkt::tcp(client, 40000, vip, port, LB0_MAC);
            assert_encapsulated(&mut lb, ingress, &p, range_id, backend);
        }
        let p = Pkt::tcp(client, 40000, vip, EXACT, LB0_MAC);
        assert_encapsulated(&mut lb, ingress, &p, exact_id, exact_be);
        for port in [LO - 1, HI + 1, 80] {
            let p = Pkt::tcp(client, 40000, vip, port, LB0_MAC);
            assert_not_balanced(&mut lb, ingress, &p);
        }
        // The range is TCP's: UDP to a port inside it is not balanced either.
        let p = Pkt::udp(client, 40000, vip, 10500, LB0_MAC);
        assert_not_balanced(&mut lb, ingress, &p);
    });
}

#[test]
fn dsr_ipv4_ports_in_the_range_go_to_the_range_vip_an_exact_vip_inside_wins_and_outside_passes() {
    dsr_case("rng-dsr4", DSR4, V_DSR4, V_EXACT4, TX_V4, TX_V4_B);
}

#[test]
fn dsr_ipv6_ports_in_the_range_go_to_the_range_vip_an_exact_vip_inside_wins_and_outside_passes() {
    dsr_case("rng-dsr6", DSR6, V_DSR6, V_EXACT6, TX_V6, TX_V6_B);
}

/// What NAT mode makes of `pkt` towards `backend:bport`: from the node's address and the first
/// source port it tries (the table is empty, so no collision).
fn translated(lb: &mut Lb, pkt: &Pkt, backend: &str, bport: u16) -> Vec<u8> {
    let n = lb.node();
    let port = nat_port_candidate(
        flow_hash(&pkt.flow_key()),
        0,
        n.nat_port_min,
        n.nat_port_max,
    );
    let mut want = pkt.clone();
    want.eth_dst = GW0_MAC;
    want.eth_src = LB0_MAC;
    want.src = ip(if pkt.src.is_ipv4() { NODE_V4 } else { NODE_V6 });
    want.sport = port;
    want.dst = ip(backend);
    want.dport = bport;
    want.ttl = pkt.ttl - 1;
    want.frame()
}

/// NAT: a port inside the range is translated to the same port of the range VIP's backend
/// (its member has port 0); the exact VIP's port to its backend's 8080; ports outside pass.
fn nat_case(tag: &str, vip: &str, range_id: u32, exact_id: u32, backend: &str, exact_be: &str) {
    let net = FibNet::new(tag);
    let ingress = net.lb0;
    let client = if ip(vip).is_ipv4() {
        "198.51.100.7"
    } else {
        "2001:db8:c::7"
    };
    net.ns.run(|| {
        let mut lb = setup();
        for (sport, port) in [(40001, LO), (40002, 10777), (40003, HI)] {
            let p = Pkt::tcp(client, sport, vip, port, LB0_MAC);
            let want = translated(&mut lb, &p, backend, port);
            let (action, output, n, per_vip) = run(&mut lb, ingress, &p, Counter::Tx, range_id);
            assert_eq!(action_name(action), action_name(XDP_TX), "{p:?}");
            assert_eq!(hex(&output), hex(&want), "port {port}");
            assert_eq!((n, per_vip), (1, 1));
            let t = lb.nat_flow(&p.flow_key()).expect("the flow's translation");
            assert_eq!(t.vip_id, range_id, "translated for the range VIP");
        }
        let p = Pkt::tcp(client, 40004, vip, EXACT, LB0_MAC);
        let want = translated(&mut lb, &p, exact_be, 8080);
        let (action, output, n, per_vip) = run(&mut lb, ingress, &p, Counter::Tx, exact_id);
        assert_eq!(action_name(action), action_name(XDP_TX));
        assert_eq!(hex(&output), hex(&want), "the exact VIP's port");
        assert_eq!((n, per_vip), (1, 1));
        for port in [LO - 1, HI + 1] {
            let p = Pkt::tcp(client, 40005, vip, port, LB0_MAC);
            assert_not_balanced(&mut lb, ingress, &p);
            assert!(
                lb.nat_flow(&p.flow_key()).is_none(),
                "port {port} translated"
            );
        }
    });
}

#[test]
fn nat_ipv4_ports_in_the_range_keep_their_port_on_the_backend_and_an_exact_vip_inside_wins() {
    nat_case("rng-nat4", NAT4, V_NAT4, V_EXACT_NAT4, TX_V4, TX_V4_B);
}

#[test]
fn nat_ipv6_ports_in_the_range_keep_their_port_on_the_backend_and_an_exact_vip_inside_wins() {
    nat_case("rng-nat6", NAT6, V_NAT6, V_EXACT_NAT6, TX_V6, TX_V6_B);
}

#[test]
fn an_all_ports_range_takes_every_port_of_its_address_and_protocol_only() {
    let net = FibNet::new("rng-all");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        let all = "192.0.2.40";
        lb.add_vip_range(all, IPPROTO_UDP, 0, u16::MAX, value(V_EXACT4 + 4, MODE_DSR));
        lb.set_ring(V_EXACT4 + 4, |_| 1);
        for port in [1, 53, 10500, u16::MAX] {
            let p = Pkt::udp("198.51.100.7", 40000, all, port, LB0_MAC);
            assert_encapsulated(&mut lb, ingress, &p, V_EXACT4 + 4, TX_V4);
        }
        let p = Pkt::tcp("198.51.100.7", 40000, all, 53, LB0_MAC);
        assert_not_balanced(&mut lb, ingress, &p);
    });
}
