//! Next hops in the program: a member's `LB_NEXTHOPS` entry decides where its packets go instead
//! of `bpf_fib_lookup`, an entry of another allocation is ignored, and check mode counts an entry
//! the route lookup disagrees with. Entries here are written by hand, with MACs no route in
//! [`FibNet`] gives, so an output frame shows which of the two sent it.

use lb_common::{
    Counter, IPPROTO_TCP, MODE_DSR, MODE_NAT, NH_FORWARD, NH_LOCAL, NH_NO_NEIGH, NH_UNREACHABLE,
    NODE_F_NEXTHOP_CHECK, NextHop, VipValue, maps,
};
use lb_tests::{
    harness::{FibNet, Lb, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, action_name, net::*, vip_key},
    hex,
    packet::{self, Pkt},
};
use lb_userspace::kernel::program::Sizes;

const DSR_VIP: &str = "192.0.2.10";
const NAT_VIP: &str = "192.0.2.12";
const CLIENT: &str = "198.51.100.7";
/// A MAC no neighbour in [`FibNet`] has.
const ENTRY_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 0x01];
const ENTRY_SRC_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 0x02];

/// One DSR VIP (id 0) and one NAT VIP (id 1), both on backend `TX_V4` (backend id 0); member 0
/// is the DSR VIP's, member 1 the NAT VIP's.
fn setup(net: &FibNet) -> Lb {
    let mut lb = Lb::load(Sizes {
        table_size: 1009,
        max_vips: 4,
        max_backends: 8,
        flow_table_size: 1024,
        affinity_table_size: 64,
        nat_table_size: 1024,
    });
    lb.set_node(Some(NODE_V4), Some(NODE_V6), 0);
    lb.set_backend(0, TX_V4, true);
    for (id, addr, mode) in [(0, DSR_VIP, MODE_DSR), (1, NAT_VIP, MODE_NAT)] {
        let value = VipValue {
            id,
            flags: 0,
            affinity_timeout_s: 0,
            mode,
            table_size: 0,
        };
        lb.add_vip(vip_key(addr, 80, IPPROTO_TCP), value);
        lb.set_ring(id, |_| 0);
    }
    lb.add_tx_port(net.lb1);
    assert_eq!((lb.member(0, 0), lb.member(1, 0)), (0, 1));
    lb
}

/// What the agent would write for `TX_V4` (generation 1, as the harness allocates), with the
/// MACs replaced by [`ENTRY_MAC`] / [`ENTRY_SRC_MAC`].
fn entry(action: u8, ifindex: u32, mtu: u32) -> NextHop {
    NextHop {
        dmac: ENTRY_MAC,
        smac: ENTRY_SRC_MAC,
        ifindex,
        mtu,
        generation: 1,
        action,
        _pad: [0; 3],
    }
}

fn syn(vip: &str) -> Pkt {
    Pkt::tcp(CLIENT, 40000, vip, 80, LB0_MAC)
}

fn set_check_mode(lb: &mut Lb, on: bool) {
    let mut node = lb.node();
    if on {
        node.flags |= NODE_F_NEXTHOP_CHECK;
    } else {
        node.flags &= !NODE_F_NEXTHOP_CHECK;
    }
    let mut a: aya::maps::Array<_, lb_common::NodeConfig> =
        aya::maps::Array::try_from(lb.ebpf.map_mut(maps::NODE).unwrap()).unwrap();
    a.set(0, node, 0).unwrap();
}

/// Runs `input`; checks action and output; returns how each counter moved.
fn run(
    lb: &mut Lb,
    ingress: u32,
    desc: &str,
    input: &[u8],
    action: u32,
    output: &[u8],
) -> impl Fn(Counter) -> u64 + use<> {
    let before = lb.counters();
    let r = lb.run(input, ingress);
    let after = lb.counters();
    assert_eq!(action_name(r.action), action_name(action), "{desc}: action");
    assert!(
        r.output == output,
        "{desc}: wrong output\nexpected:\n{}\ngot:\n{}",
        hex(output),
        hex(&r.output)
    );
    move |c| after[&c] - before[&c]
}

fn dsr_out(pkt: &Pkt, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    packet::encapsulated(
        pkt,
        dst,
        src,
        NODE_V4.parse().unwrap(),
        TX_V4.parse().unwrap(),
    )
}

#[test]
fn a_members_next_hop_sends_its_packets_without_a_route_lookup() {
    let net = FibNet::new("nh-use");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup(&net);
        lb.set_nexthop(0, entry(NH_FORWARD, ingress, 1500));
        let pkt = syn(DSR_VIP);
        let d = run(
            &mut lb,
            ingress,
            "entry on the ingress",
            &pkt.frame(),
            XDP_TX,
            &dsr_out(&pkt, ENTRY_MAC, ENTRY_SRC_MAC),
        );
        assert_eq!((d(Counter::Tx), d(Counter::NexthopFallbacks)), (1, 0));
        lb.set_nexthop(0, entry(NH_FORWARD, net.lb1, 1500));
        let d = run(
            &mut lb,
            ingress,
            "entry on lb1",
            &pkt.frame(),
            XDP_REDIRECT,
            &dsr_out(&pkt, ENTRY_MAC, ENTRY_SRC_MAC),
        );
        assert_eq!(d(Counter::Redirect), 1);
    });
}

#[test]
fn next_hop_actions_give_the_route_lookups_verdicts() {
    let net = FibNet::new("nh-act");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup(&net);
        let pkt = syn(DSR_VIP);
        let kept = dsr_out(&pkt, pkt.eth_dst, pkt.eth_src);
        for (action, xdp, verdict) in [
            (NH_NO_NEIGH, XDP_PASS, Counter::PassNoNeighbour),
            (NH_LOCAL, XDP_PASS, Counter::PassLocalBackend),
            (NH_UNREACHABLE, XDP_DROP, Counter::DropFibFailed),
        ] {
            lb.set_nexthop(0, entry(action, ingress, 1500));
            let input = pkt.frame();
            let before = lb.counters();
            let r = lb.run(&input, ingress);
            let after = lb.counters();
            assert_eq!(
                action_name(r.action),
                action_name(xdp),
                "{}",
                verdict.name()
            );
            if xdp == XDP_PASS {
                assert!(
                    r.output == kept,
                    "{}: passed with other bytes than the encapsulated packet as received\n{}",
                    verdict.name(),
                    hex(&r.output)
                );
            }
            assert_eq!(after[&verdict] - before[&verdict], 1, "{}", verdict.name());
            assert_eq!(
                after[&Counter::NexthopFallbacks],
                before[&Counter::NexthopFallbacks]
            );
        }
    });
}

#[test]
fn a_next_hop_of_another_generation_is_ignored_for_the_route_lookup() {
    let net = FibNet::new("nh-gen");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup(&net);
        lb.set_nexthop(
            0,
            NextHop {
                generation: 2,
                ..entry(NH_FORWARD, ingress, 1500)
            },
        );
        let pkt = syn(DSR_VIP);
        let d = run(
            &mut lb,
            ingress,
            "stale entry",
            &pkt.frame(),
            XDP_TX,
            &dsr_out(&pkt, GW0_MAC, LB0_MAC),
        );
        assert_eq!(d(Counter::NexthopFallbacks), 1);
    });
}

#[test]
fn a_packet_longer_than_the_next_hops_mtu_is_answered_with_too_big() {
    let net = FibNet::new("nh-mtu");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup(&net);
        // The client's 1000-byte packet becomes 1020 bytes in IPIP: over an MTU of 900.
        lb.set_nexthop(0, entry(NH_FORWARD, ingress, 900));
        let pkt = syn(DSR_VIP).with(|p| p.payload = vec![0; 1000 - 40]);
        let d = run(
            &mut lb,
            ingress,
            "too big",
            &pkt.frame(),
            XDP_TX,
            &packet::too_big_reply(&pkt, 880, GW0_MAC, LB0_MAC),
        );
        assert_eq!((d(Counter::DropTooBig), d(Counter::IcmpTooBigSent)), (1, 1));
    });
}

#[test]
fn check_mode_counts_a_next_hop_the_route_lookup_disagrees_with_and_sends_by_the_route() {
    let net = FibNet::new("nh-check");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup(&net);
        set_check_mode(&mut lb, true);
        let pkt = syn(DSR_VIP);
        let routed = dsr_out(&pkt, GW0_MAC, LB0_MAC);
        lb.set_nexthop(0, entry(NH_FORWARD, ingress, 1500));
        let d = run(
            &mut lb,
            ingress,
            "wrong MACs",
            &pkt.frame(),
            XDP_TX,
            &routed,
        );
        assert_eq!(d(Counter::NexthopMismatches), 1);
        // The route's own answer (GW0 via lb0, lb0's MTU) agrees.
        let right = NextHop {
            dmac: GW0_MAC,
            smac: LB0_MAC,
            ..entry(NH_FORWARD, ingress, 1500)
        };
        lb.set_nexthop(0, right);
        let d = run(
            &mut lb,
            ingress,
            "right entry",
            &pkt.frame(),
            XDP_TX,
            &routed,
        );
        assert_eq!(
            (d(Counter::NexthopMismatches), d(Counter::NexthopFallbacks)),
            (0, 0)
        );
        lb.set_nexthop(0, entry(NH_NO_NEIGH, ingress, 1500));
        let d = run(
            &mut lb,
            ingress,
            "no neighbour claimed",
            &pkt.frame(),
            XDP_TX,
            &routed,
        );
        assert_eq!(d(Counter::NexthopMismatches), 1);
    });
}

#[test]
fn nat_forwarding_uses_the_members_next_hop() {
    let net = FibNet::new("nh-nat");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup(&net);
        lb.set_nexthop(1, entry(NH_FORWARD, ingress, 1500));
        let before = lb.counters();
        let r = lb.run(&syn(NAT_VIP).frame(), ingress);
        let after = lb.counters();
        assert_eq!(action_name(r.action), "XDP_TX");
        assert_eq!(
            (&r.output[0..6], &r.output[6..12]),
            (&ENTRY_MAC[..], &ENTRY_SRC_MAC[..]),
            "{}",
            hex(&r.output)
        );
        let dst: [u8; 4] = r.output[30..34].try_into().unwrap();
        assert_eq!(
            std::net::Ipv4Addr::from(dst).to_string(),
            TX_V4,
            "translated towards the backend"
        );
        assert_eq!(
            after[&Counter::NatForward] - before[&Counter::NatForward],
            1
        );
        assert_eq!(
            after[&Counter::NexthopFallbacks],
            before[&Counter::NexthopFallbacks]
        );
    });
}
