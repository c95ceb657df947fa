//! Source ranges per VIP (`source_ranges`, `loadBalancerSourceRanges`), in the XDP program:
//! each test runs frames through it with `BPF_PROG_TEST_RUN` and checks the action, the output
//! bytes, the counters (global `drop_source_range` and the VIP's own in `LB_VIP_DROPS`) and
//! that a refused source leaves no state behind. The maps are written by hand (see
//! `lb_tests::harness`): the agent's side is checked in `k8s.rs` and the unit tests.

use std::net::IpAddr;

use lb_common::{
    Counter, IPPROTO_TCP, MODE_DSR, MODE_NAT, VIP_F_SOURCE_RANGES, VipValue, flow_hash,
    nat_port_candidate,
};
use lb_tests::{
    harness::{FibNet, Lb, XDP_DROP, XDP_TX, action_name, net::*, vip_key},
    hex,
    packet::{self, Pkt},
};
use lb_userspace::kernel::program::Sizes;

const DSR4: &str = "192.0.2.10";
const DSR6: &str = "2001:db8::10";
const NAT4: &str = "192.0.2.19";
const NAT6: &str = "2001:db8::19";
const OPEN4: &str = "192.0.2.30";

/// VIP ids.
const V_DSR4: u32 = 0;
const V_DSR6: u32 = 1;
const V_NAT4: u32 = 2;
const V_NAT6: u32 = 3;
const V_OPEN4: u32 = 4;

/// Ranges of the IPv4 VIPs and of the IPv6 ones.
const RANGES4: &[&str] = &["198.51.100.0/24", "203.0.113.128/25"];
const RANGES6: &[&str] = &["2001:db8:c::/48"];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The program with four VIPs that take some sources only (DSR and NAT, IPv4 and IPv6) and
/// one without the flag whose ranges are in the trie all the same.
fn setup() -> Lb {
    let mut lb = Lb::load(Sizes {
        table_size: 13,
        max_vips: 8,
        max_backends: 8,
        flow_table_size: 1024,
        affinity_table_size: 64,
        nat_table_size: 1024,
    });
    lb.set_node(Some(NODE_V4), Some(NODE_V6), 30_000_000_000);
    lb.set_backend_port(1, TX_V4, 0, true);
    lb.set_backend_port(2, TX_V6, 0, true);
    lb.set_backend_port(3, TX_V4_B, 8080, true);
    lb.set_backend_port(4, TX_V6_B, 8443, true);
    let vips = [
        (V_DSR4, DSR4, MODE_DSR, VIP_F_SOURCE_RANGES, 1, RANGES4),
        (V_DSR6, DSR6, MODE_DSR, VIP_F_SOURCE_RANGES, 2, RANGES6),
        (V_NAT4, NAT4, MODE_NAT, VIP_F_SOURCE_RANGES, 3, RANGES4),
        (V_NAT6, NAT6, MODE_NAT, VIP_F_SOURCE_RANGES, 4, RANGES6),
        // No flag: what the agent writes for an empty list. The trie holds ranges for its id
        // anyway (left over, say): the program must not look.
        (V_OPEN4, OPEN4, MODE_DSR, 0, 1, &["10.0.0.0/8"][..]),
    ];
    for (id, addr, mode, flags, backend, ranges) in vips {
        lb.add_vip(
            vip_key(addr, 80, IPPROTO_TCP),
            VipValue {
                id,
                flags,
                affinity_timeout_s: 0,
                mode,
                table_size: 0,
            },
        );
        lb.set_ring(id, |_| backend);
        lb.add_source_ranges(id, ranges);
    }
    lb
}

/// Runs `pkt` and returns (action, output, change of `which` counter, change of the VIP's
/// `drop_source_range`).
fn run(lb: &mut Lb, ingress: u32, pkt: &Pkt, which: Counter, vip: u32) -> (u32, Vec<u8>, u64, u64) {
    let before = lb.counters();
    let drops = lb.vip_source_drops(vip);
    let r = lb.run(&pkt.frame(), ingress);
    let after = lb.counters();
    assert_eq!(
        after[&Counter::Packets] - before[&Counter::Packets],
        1,
        "one packet, one verdict"
    );
    (
        r.action,
        r.output,
        after[&which] - before[&which],
        lb.vip_source_drops(vip) - drops,
    )
}

/// A refused packet: dropped as it came, counted once globally and once for its VIP.
fn assert_refused(lb: &mut Lb, ingress: u32, pkt: &Pkt, vip: u32) {
    let (action, output, n, per_vip) = run(lb, ingress, pkt, Counter::DropSourceRange, vip);
    assert_eq!(action_name(action), action_name(XDP_DROP), "{pkt:?}");
    assert_eq!(hex(&output), hex(&pkt.frame()));
    assert_eq!(
        (n, per_vip),
        (1, 1),
        "drop_source_range, global and the VIP's"
    );
}

/// The frame `pkt` becomes encapsulated to `backend` (DSR), sent back out of `lb0`.
fn encap(pkt: &Pkt, backend: &str) -> Vec<u8> {
    let b = ip(backend);
    let src = if b.is_ipv4() { NODE_V4 } else { NODE_V6 };
    packet::encapsulated(pkt, GW0_MAC, LB0_MAC, ip(src), b)
}

/// An allowed DSR packet: encapsulated to `backend` and sent (`tx`), nothing dropped.
fn assert_forwarded(lb: &mut Lb, ingress: u32, pkt: &Pkt, vip: u32, backend: &str) {
    let (action, output, n, per_vip) = run(lb, ingress, pkt, Counter::Tx, vip);
    assert_eq!(action_name(action), action_name(XDP_TX), "{pkt:?}");
    assert_eq!(hex(&output), hex(&encap(pkt, backend)));
    assert_eq!((n, per_vip), (1, 0));
}

#[test]
fn dsr_ipv4_sources_inside_the_ranges_are_forwarded_and_others_dropped_and_counted() {
    let net = FibNet::new("src-dsr4");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        // Inside 198.51.100.0/24 (both ends) and 203.0.113.128/25.
        for src in [
            "198.51.100.0",
            "198.51.100.255",
            "203.0.113.128",
            "203.0.113.200",
        ] {
            let p = Pkt::tcp(src, 40000, DSR4, 80, LB0_MAC);
            assert_forwarded(&mut lb, ingress, &p, V_DSR4, TX_V4);
        }
        // Just outside each, and far away.
        for src in ["198.51.101.0", "198.51.99.255", "203.0.113.127", "10.1.2.3"] {
            let p = Pkt::tcp(src, 40000, DSR4, 80, LB0_MAC);
            assert_refused(&mut lb, ingress, &p, V_DSR4);
        }
        assert_eq!(lb.counters()[&Counter::DropSourceRange], 4);
        assert_eq!(lb.vip_source_drops(V_DSR4), 4);
    });
}

#[test]
fn dsr_ipv6_sources_inside_the_ranges_are_forwarded_and_others_dropped_and_counted() {
    let net = FibNet::new("src-dsr6");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        for src in ["2001:db8:c::7", "2001:db8:c:ffff:ffff:ffff:ffff:ffff"] {
            let p = Pkt::tcp(src, 40000, DSR6, 80, LB0_MAC);
            assert_forwarded(&mut lb, ingress, &p, V_DSR6, TX_V6);
        }
        // The next /48, the one before, and an IPv4-mapped address of an allowed IPv4 range:
        // an IPv6 VIP's ranges are IPv6 ones.
        for src in ["2001:db8:d::7", "2001:db8:b:ffff::1", "::ffff:198.51.100.7"] {
            let p = Pkt::tcp(src, 40000, DSR6, 80, LB0_MAC);
            assert_refused(&mut lb, ingress, &p, V_DSR6);
        }
        assert_eq!(lb.vip_source_drops(V_DSR6), 3);
        assert_eq!(
            lb.vip_source_drops(V_DSR4),
            0,
            "another VIP's counter moved"
        );
    });
}

#[test]
fn a_refused_source_leaves_no_flow_entry_and_an_allowed_one_does() {
    let net = FibNet::new("src-flow");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        let refused = Pkt::tcp("10.9.9.9", 40000, DSR4, 80, LB0_MAC);
        let refused6 = Pkt::tcp("2001:db8:d::9", 40000, DSR6, 80, LB0_MAC);
        for _ in 0..3 {
            assert_refused(&mut lb, ingress, &refused, V_DSR4);
            assert_refused(&mut lb, ingress, &refused6, V_DSR6);
        }
        assert_eq!(lb.flow_count(), 0, "a refused source made a flow entry");
        assert!(lb.flow(&refused.flow_key()).is_none());
        let allowed = Pkt::tcp("198.51.100.7", 40000, DSR4, 80, LB0_MAC);
        assert_forwarded(&mut lb, ingress, &allowed, V_DSR4, TX_V4);
        assert_eq!(lb.flow_count(), 1);
        assert!(lb.flow(&allowed.flow_key()).is_some());
    });
}

/// The source port NAT mode takes first for `pkt` (no collision: the table is empty).
fn first_port(lb: &mut Lb, pkt: &Pkt) -> u16 {
    let n = lb.node();
    nat_port_candidate(
        flow_hash(&pkt.flow_key()),
        0,
        n.nat_port_min,
        n.nat_port_max,
    )
}

/// NAT: the refused source gets no translation (and no flow); the allowed one is translated
/// towards `backend:bport` from the node's address.
fn nat_case(
    tag: &str,
    vip_addr: &str,
    vip: u32,
    inside: &str,
    outside: &str,
    backend: &str,
    bport: u16,
) {
    let net = FibNet::new(tag);
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        let refused = Pkt::tcp(outside, 40000, vip_addr, 80, LB0_MAC);
        assert_refused(&mut lb, ingress, &refused, vip);
        assert!(
            lb.nat_flow(&refused.flow_key()).is_none(),
            "a refused source got a translation"
        );
        assert_eq!(lb.flow_count(), 0);

        let allowed = Pkt::tcp(inside, 40000, vip_addr, 80, LB0_MAC);
        let port = first_port(&mut lb, &allowed);
        let (action, output, n, per_vip) = run(&mut lb, ingress, &allowed, Counter::Tx, vip);
        let node = if allowed.src.is_ipv4() {
            NODE_V4
        } else {
            NODE_V6
        };
        let mut want = allowed.clone();
        want.eth_dst = GW0_MAC;
        want.eth_src = LB0_MAC;
        want.src = ip(node);
        want.sport = port;
        want.dst = ip(backend);
        want.dport = bport;
        want.ttl = allowed.ttl - 1;
        assert_eq!(action_name(action), action_name(XDP_TX));
        assert_eq!(hex(&output), hex(&want.frame()));
        assert_eq!((n, per_vip), (1, 0));
        let t = lb
            .nat_flow(&allowed.flow_key())
            .expect("the allowed source's translation");
        assert_eq!(u16::from_be(t.nat_port), port);
    });
}

#[test]
fn nat_ipv4_refused_source_gets_no_translation_and_an_allowed_one_is_translated() {
    nat_case(
        "src-nat4",
        NAT4,
        V_NAT4,
        "203.0.113.129",
        "203.0.113.1",
        TX_V4_B,
        8080,
    );
}

#[test]
fn nat_ipv6_refused_source_gets_no_translation_and_an_allowed_one_is_translated() {
    nat_case(
        "src-nat6",
        NAT6,
        V_NAT6,
        "2001:db8:c:1::1",
        "2001:db8:cc::1",
        TX_V6_B,
        8443,
    );
}

#[test]
fn a_vip_without_the_flag_takes_every_source_whatever_the_trie_holds() {
    let net = FibNet::new("src-open");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        // Its trie entry is 10.0.0.0/8; sources outside it are served all the same.
        for src in ["198.51.100.7", "10.1.2.3", "203.0.113.1"] {
            let p = Pkt::tcp(src, 40000, OPEN4, 80, LB0_MAC);
            assert_forwarded(&mut lb, ingress, &p, V_OPEN4, TX_V4);
        }
        assert_eq!(lb.counters()[&Counter::DropSourceRange], 0);
    });
}
