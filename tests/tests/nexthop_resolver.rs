//! The next-hop resolver against the kernel's own route lookup, without the agent: in
//! [`FibNet`], where each way `bpf_fib_lookup` can end has a backend, [`Lb::resolve_nexthops`]
//! fills `LB_NEXTHOPS`, and a frame to each backend's VIP must get the verdict (and, when
//! forwarded, the MAC addresses) that the program's `bpf_fib_lookup` gives it.

use lb_common::{
    Counter, IPPROTO_UDP, MODE_DSR, NH_FORWARD, NH_LOCAL, NH_NO_NEIGH, NH_UNREACHABLE, NextHop,
    VipValue,
};
use lb_tests::{
    harness::{FibNet, Lb, net::*, vip_key},
    packet::Pkt,
};
use lb_userspace::kernel::program::Sizes;

/// (backend, what the kernel's routes make of it).
const CASES: &[(&str, u8)] = &[
    (TX_V4, NH_FORWARD),
    (TX_V6, NH_FORWARD),
    (REDIRECT_V4, NH_FORWARD),
    (REDIRECT_V6, NH_FORWARD),
    (NO_NEIGH_V4, NH_NO_NEIGH),
    (NO_NEIGH_V6, NH_NO_NEIGH),
    (UNREACHABLE_V4, NH_UNREACHABLE),
    (UNREACHABLE_V6, NH_UNREACHABLE),
    (LOCAL_V4, NH_LOCAL),
    (SMALL_MTU_V4, NH_FORWARD),
    (SMALL_MTU_V6, NH_FORWARD),
    (NO_TX_PORT_V4, NH_FORWARD),
];

fn vip(i: usize) -> String {
    format!("192.0.2.{}", 100 + i)
}

/// One UDP VIP per case, each with its backend alone.
fn setup(net: &FibNet) -> Lb {
    let mut lb = Lb::load(Sizes {
        table_size: 13,
        max_vips: 16,
        max_backends: 16,
        flow_table_size: 1024,
        affinity_table_size: 64,
        nat_table_size: 64,
    });
    lb.set_node(Some(NODE_V4), Some(NODE_V6), 0);
    for (i, (addr, _)) in CASES.iter().enumerate() {
        let id = i as u32;
        lb.set_backend(id + 1, addr, true);
        let value = VipValue {
            id,
            flags: 0,
            affinity_timeout_s: 0,
            mode: MODE_DSR,
            table_size: 0,
        };
        lb.add_vip(vip_key(&vip(i), 80, IPPROTO_UDP), value);
        lb.set_ring(id, |_| id + 1);
    }
    lb.add_tx_port(net.lb1);
    lb
}

/// The verdict `bpf_fib_lookup` must have given for a small packet if `nh` is what it answered.
fn verdict(nh: &NextHop, net: &FibNet) -> Counter {
    match nh.action {
        NH_FORWARD if nh.ifindex == net.lb0 => Counter::Tx,
        NH_FORWARD if nh.ifindex == net.lb1 => Counter::Redirect,
        NH_FORWARD => Counter::PassNoTxPort,
        NH_NO_NEIGH => Counter::PassNoNeighbour,
        NH_LOCAL => Counter::PassLocalBackend,
        NH_UNREACHABLE => Counter::DropFibFailed,
        a => panic!("unexpected action {a} in {nh:?}"),
    }
}

#[test]
fn resolved_next_hops_give_the_verdicts_and_macs_of_the_route_lookup() {
    let net = FibNet::new("nh-resolve");
    net.ns.run(|| {
        let mut lb = setup(&net);
        let entries = lb.resolve_nexthops();
        assert_eq!(
            entries.len(),
            CASES.len(),
            "one entry per member: {entries:?}"
        );
        for (i, (backend, action)) in CASES.iter().enumerate() {
            let id = lb.member(i as u32, i as u32 + 1);
            let nh = lb.nexthop(id);
            assert_eq!(nh, entries[&id], "{backend}: written as returned");
            assert_eq!(nh.action, *action, "{backend}: {nh:?}");
            assert_eq!(nh.generation, 1, "{backend}: the member's generation");
            let frame = Pkt::udp("198.51.100.7", 40000, &vip(i), 80, LB0_MAC).frame();
            let before = lb.counters();
            let run = lb.run(&frame, net.lb0);
            let after = lb.counters();
            let want = verdict(&nh, &net);
            assert_eq!(
                after[&want] - before[&want],
                1,
                "{backend}: {want:?} for {nh:?}"
            );
            if matches!(want, Counter::Tx | Counter::Redirect) {
                assert_eq!(run.output[0..6], nh.dmac, "{backend}: destination MAC");
                assert_eq!(run.output[6..12], nh.smac, "{backend}: source MAC");
            }
        }
    });
}

#[test]
fn resolved_next_hops_carry_the_macs_interfaces_and_mtus_of_the_routes() {
    let net = FibNet::new("nh-fields");
    net.ns.run(|| {
        let mut lb = setup(&net);
        lb.resolve_nexthops();
        let get = |lb: &mut Lb, backend: &str| {
            let i = CASES.iter().position(|(b, _)| *b == backend).unwrap() as u32;
            let id = lb.member(i, i + 1);
            lb.nexthop(id)
        };
        for (backend, ifindex, dmac, smac, mtu) in [
            (TX_V4, net.lb0, GW0_MAC, LB0_MAC, 1500),
            (TX_V6, net.lb0, GW0_MAC, LB0_MAC, 1500),
            (REDIRECT_V4, net.lb1, GW1_MAC, LB1_MAC, 1500),
            (SMALL_MTU_V4, net.lb1, GW1_MAC, LB1_MAC, 600),
            (SMALL_MTU_V6, net.lb1, GW1_MAC, LB1_MAC, 1280),
            (NO_TX_PORT_V4, net.lb2, [2, 0, 0, 0, 2, 0xfe], LB2_MAC, 1500),
        ] {
            let nh = get(&mut lb, backend);
            assert_eq!(
                (nh.ifindex, nh.dmac, nh.smac, nh.mtu),
                (ifindex, dmac, smac, mtu),
                "{backend}: {nh:?}"
            );
        }
    });
}
