//! Least connections (`VIP_F_LEAST_CONN`) with `BPF_PROG_TEST_RUN`: which member a new flow
//! goes to, given counts written into `LB_MEMBER_CONNS`, and how the program's own counting
//! moves them (DSR: flow entries, a FIN or RST counted once; NAT: translations, closed once).
//!
//! The expected member is computed from the ring and the counts the test wrote: every member
//! but one is loaded alike, so the one unloaded member wins exactly when it is among the flow's
//! sampled slots, and otherwise the tie goes to the first, Maglev's own choice.

use std::net::IpAddr;

use lb_common::{
    IPPROTO_TCP, MODE_DSR, MODE_NAT, VIP_F_LEAST_CONN, VipValue, candidate_hash, flow_hash,
    select::LEAST_CONN_CANDIDATES,
};
use lb_tests::{
    harness::{FibNet, Lb, XDP_TX, action_name, net::*, vip_key},
    hex,
    packet::{L4, Pkt, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};
use lb_userspace::kernel::program::Sizes;

const M: u32 = 1009;
const V4: &str = "192.0.2.10";
const V6: &str = "2001:db8::10";
/// Backend ids 1..=4, all reached with XDP_TX.
const BACKENDS: [(u32, &str); 4] = [(1, TX_V4), (2, TX_V4_B), (3, TX_V6), (4, TX_V6_B)];

/// A DSR VIP (id 0) on `vip`:80/tcp with `flags`, its slots cycling through the four backends.
fn load(vip: &str, flags: u32) -> Lb {
    let mut lb = Lb::load(Sizes {
        table_size: M,
        max_vips: 4,
        max_backends: 16,
        flow_table_size: 4096,
        affinity_table_size: 1024,
        nat_table_size: 1024,
    });
    lb.set_node(Some(NODE_V4), Some(NODE_V6), 0);
    for (id, addr) in BACKENDS {
        lb.set_backend(id, addr, true);
    }
    lb.add_vip(
        vip_key(vip, 80, IPPROTO_TCP),
        VipValue {
            id: 0,
            flags,
            affinity_timeout_s: 0,
            mode: MODE_DSR,
            table_size: 0,
        },
    );
    lb.set_ring(0, |s| 1 + s % 4);
    lb
}

fn client(vip: &str, i: u32) -> String {
    match vip.parse::<IpAddr>().unwrap() {
        IpAddr::V4(_) => format!("198.51.{}.{}", 100 + i / 250, 1 + i % 250),
        IpAddr::V6(_) => format!("2001:db8:c::{:x}", i + 1),
    }
}

fn tcp(src: &str, port: u16, vip: &str, flags: u8) -> Pkt {
    Pkt::tcp(src, port, vip, 80, LB0_MAC).with(|p| p.l4 = L4::Tcp { flags })
}

/// Runs `pkt` (DSR) and returns the backend id its encapsulated output is addressed to.
fn send(lb: &mut Lb, ingress: u32, pkt: &Pkt) -> u32 {
    let run = lb.run(&pkt.frame(), ingress);
    assert_eq!(
        action_name(run.action),
        action_name(XDP_TX),
        "input:\n{}",
        hex(&pkt.frame())
    );
    let out = &run.output;
    let dst: IpAddr = match u16::from_be_bytes([out[12], out[13]]) {
        0x0800 => IpAddr::from(<[u8; 4]>::try_from(&out[30..34]).unwrap()),
        0x86dd => IpAddr::from(<[u8; 16]>::try_from(&out[38..54]).unwrap()),
        t => panic!("output ethertype {t:#06x}"),
    };
    BACKENDS
        .iter()
        .find(|b| b.1.parse::<IpAddr>().unwrap() == dst)
        .unwrap_or_else(|| panic!("output to unknown backend {dst}"))
        .0
}

/// The backends of `pkt`'s sampled ring slots, Maglev's choice first.
fn candidates(lb: &mut Lb, pkt: &Pkt) -> Vec<u32> {
    let h = flow_hash(&pkt.flow_key());
    (0..LEAST_CONN_CANDIDATES)
        .map(|i| {
            let member = lb.ring_backend(0, candidate_hash(h, i));
            lb.backend_of(member)
        })
        .collect()
}

/// Every member loaded with `busy` connections at weight `busy_weight`, but backend `free`'s
/// member with `free_conns` at `free_weight`; the counts the test wrote, by backend.
fn load_counts(lb: &mut Lb, free: u32, (free_conns, free_weight): (i64, u32), busy: (i64, u32)) {
    for (b, _) in BACKENDS {
        let m = lb.member(0, b);
        let (c, w) = if b == free {
            (free_conns, free_weight)
        } else {
            busy
        };
        lb.set_member_conns(m, c, w);
    }
}

/// New flows (SYNs) from 200 clients; for each, where it went and where the rule says: `free`
/// if it is among the candidates, else Maglev's choice. Returns how many went to `free`.
fn check_choices(
    lb: &mut Lb,
    ingress: u32,
    vip: &str,
    free: u32,
    counts: ((i64, u32), (i64, u32)),
) -> u32 {
    let mut to_free = 0;
    for i in 0..200 {
        load_counts(lb, free, counts.0, counts.1);
        let pkt = tcp(&client(vip, i), 20000 + i as u16, vip, TCP_SYN);
        let cands = candidates(lb, &pkt);
        let want = if cands.contains(&free) {
            free
        } else {
            cands[0]
        };
        let got = send(lb, ingress, &pkt);
        assert_eq!(got, want, "flow {i}: candidates {cands:?}, went to {got}");
        to_free += u32::from(got == free);
    }
    to_free
}

#[test]
fn a_new_flow_goes_to_the_unloaded_candidate_else_to_maglevs_choice_both_families() {
    let net = FibNet::new("lc-pick");
    net.ns.run(|| {
        for vip in [V4, V6] {
            let mut lb = load(vip, VIP_F_LEAST_CONN);
            let to_free = check_choices(&mut lb, net.lb0, vip, 3, ((0, 1), (100, 1)));
            // 1 - (3/4)^4 = 68 % of flows sample the free backend at least once.
            assert!(
                (100..=175).contains(&to_free),
                "{vip}: {to_free} of 200 new flows to the unloaded backend"
            );
        }
    });
}

#[test]
fn counts_are_compared_relative_to_the_weights() {
    let net = FibNet::new("lc-weight");
    net.ns.run(|| {
        let mut lb = load(V4, VIP_F_LEAST_CONN);
        // Backend 2: 30 connections at weight 10 (3 each) against 4 at weight 1 elsewhere.
        let to_free = check_choices(&mut lb, net.lb0, V4, 2, ((30, 10), (4, 1)));
        assert!(
            to_free >= 100,
            "{to_free} of 200 new flows to the backend of weight 10"
        );
    });
}

#[test]
fn a_vip_without_the_flag_takes_maglevs_choice_and_counts_nothing() {
    let net = FibNet::new("lc-off");
    net.ns.run(|| {
        let mut lb = load(V4, 0);
        for i in 0..100 {
            load_counts(&mut lb, 3, (0, 1), (100, 1));
            let pkt = tcp(&client(V4, i), 20000 + i as u16, V4, TCP_SYN);
            let want = candidates(&mut lb, &pkt)[0];
            assert_eq!(send(&mut lb, net.lb0, &pkt), want, "flow {i}");
        }
        for (b, _) in BACKENDS {
            let m = lb.member(0, b);
            let want = if b == 3 { 0 } else { 100 };
            assert_eq!(lb.member_conns(m), want, "backend {b}'s count moved");
        }
    });
}

#[test]
fn a_mid_stream_packet_without_an_entry_gets_maglevs_choice() {
    let net = FibNet::new("lc-mid");
    net.ns.run(|| {
        let mut lb = load(V4, VIP_F_LEAST_CONN);
        let mut differs = 0;
        for i in 0..100 {
            load_counts(&mut lb, 3, (0, 1), (100, 1));
            let pkt = tcp(&client(V4, i), 20000 + i as u16, V4, TCP_ACK);
            let cands = candidates(&mut lb, &pkt);
            differs += u32::from(cands.contains(&3) && cands[0] != 3);
            assert_eq!(send(&mut lb, net.lb0, &pkt), cands[0], "flow {i}");
            lb.clear_flows();
        }
        assert!(
            differs > 20,
            "only {differs} flows where the choices differ"
        );
    });
}

/// The count of the member `pkt`'s flow went to, after each of `steps` (flags, the count
/// expected after it), all from one client port.
fn walk(lb: &mut Lb, ingress: u32, vip: &str, steps: &[(u8, i64)]) {
    for b in BACKENDS.map(|b| b.0) {
        let m = lb.member(0, b);
        lb.set_member_conns(m, 0, 1);
    }
    let src = client(vip, 7);
    let first = send(lb, ingress, &tcp(&src, 40000, vip, TCP_SYN));
    let m = lb.member(0, first);
    assert_eq!(lb.member_conns(m), 1, "{vip}: after the SYN");
    for (i, (flags, want)) in steps.iter().enumerate() {
        let got = send(lb, ingress, &tcp(&src, 40000, vip, *flags));
        assert_eq!(
            got, first,
            "{vip}: step {i} ({flags:#04x}) left the flow's backend"
        );
        assert_eq!(
            lb.member_conns(m),
            *want,
            "{vip}: after step {i} ({flags:#04x})"
        );
    }
}

#[test]
fn dsr_counts_a_connection_once_and_its_end_once_both_families() {
    let net = FibNet::new("lc-dsr");
    net.ns.run(|| {
        for vip in [V4, V6] {
            let mut lb = load(vip, VIP_F_LEAST_CONN);
            // A retransmitted SYN keeps its member and count; the FIN counts the connection
            // off once, its retransmission and the RST after it not again.
            let steps = [
                (TCP_SYN, 1),
                (TCP_ACK, 1),
                (TCP_FIN | TCP_ACK, 0),
                (TCP_FIN | TCP_ACK, 0),
                (TCP_RST, 0),
                (TCP_ACK, 0),
            ];
            walk(&mut lb, net.lb0, vip, &steps);
            // A new connection on the same client port after the end is counted again.
            let src = client(vip, 7);
            let b = send(&mut lb, net.lb0, &tcp(&src, 40000, vip, TCP_SYN));
            let m = lb.member(0, b);
            assert_eq!(lb.member_conns(m), 1, "{vip}: the port's next connection");
        }
    });
}

#[test]
fn dsr_an_rst_alone_ends_the_count() {
    let net = FibNet::new("lc-rst");
    net.ns.run(|| {
        let mut lb = load(V4, VIP_F_LEAST_CONN);
        walk(
            &mut lb,
            net.lb0,
            V4,
            &[(TCP_ACK, 1), (TCP_RST, 0), (TCP_RST, 0)],
        );
    });
}

/// NAT: a least-connections VIP (id 0) on `vip`:80/tcp whose one backend is `backend`.
fn load_nat(vip: &str, backend: (u32, &str)) -> Lb {
    let mut lb = Lb::load(Sizes {
        table_size: 13,
        max_vips: 4,
        max_backends: 8,
        flow_table_size: 1024,
        affinity_table_size: 64,
        nat_table_size: 1024,
    });
    lb.set_node(Some(NODE_V4), Some(NODE_V6), 30_000_000_000);
    lb.set_backend_port(backend.0, backend.1, 8080, true);
    lb.add_vip(
        vip_key(vip, 80, IPPROTO_TCP),
        VipValue {
            id: 0,
            flags: VIP_F_LEAST_CONN,
            affinity_timeout_s: 0,
            mode: MODE_NAT,
            table_size: 0,
        },
    );
    lb.set_ring(0, |_| backend.0);
    lb
}

/// Runs `pkt` and returns the (source port, destination) of the translated output.
fn nat_out(lb: &mut Lb, ingress: u32, pkt: &Pkt) -> (u16, IpAddr) {
    let run = lb.run(&pkt.frame(), ingress);
    assert_eq!(
        action_name(run.action),
        action_name(XDP_TX),
        "input:\n{}",
        hex(&pkt.frame())
    );
    let h = etherparse::SlicedPacket::from_ethernet(&run.output).expect("output parses");
    let dst = match h.net.expect("an IP header") {
        etherparse::NetSlice::Ipv4(ip) => IpAddr::from(ip.header().destination_addr()),
        etherparse::NetSlice::Ipv6(ip) => IpAddr::from(ip.header().destination_addr()),
        _ => panic!("not IP"),
    };
    let sport = match h.transport.expect("a TCP header") {
        etherparse::TransportSlice::Tcp(t) => t.source_port(),
        _ => panic!("not TCP"),
    };
    (sport, dst)
}

#[test]
fn nat_counts_a_translation_once_and_its_close_once_both_families() {
    let net = FibNet::new("lc-nat");
    net.ns.run(|| {
        for (vip, backend, node) in [(V4, (1, TX_V4), NODE_V4), (V6, (3, TX_V6), NODE_V6)] {
            let mut lb = load_nat(vip, backend);
            let m = lb.member(0, backend.0);
            lb.set_member_conns(m, 0, 1);
            let src = client(vip, 9);
            let (port, to) = nat_out(&mut lb, net.lb0, &tcp(&src, 41000, vip, TCP_SYN));
            assert_eq!(to, backend.1.parse::<IpAddr>().unwrap());
            assert_eq!(lb.member_conns(m), 1, "{vip}: after the SYN");
            nat_out(&mut lb, net.lb0, &tcp(&src, 41000, vip, TCP_SYN));
            assert_eq!(
                lb.member_conns(m),
                1,
                "{vip}: after the SYN's retransmission"
            );
            let reply = |flags| {
                Pkt::tcp(backend.1, 8080, node, port, LB0_MAC).with(|p| p.l4 = L4::Tcp { flags })
            };
            nat_out(&mut lb, net.lb0, &reply(TCP_SYN | TCP_ACK));
            nat_out(&mut lb, net.lb0, &tcp(&src, 41000, vip, TCP_ACK));
            nat_out(&mut lb, net.lb0, &tcp(&src, 41000, vip, TCP_FIN | TCP_ACK));
            assert_eq!(
                lb.member_conns(m),
                1,
                "{vip}: half closed (the client's FIN only)"
            );
            nat_out(&mut lb, net.lb0, &reply(TCP_FIN | TCP_ACK));
            assert_eq!(lb.member_conns(m), 0, "{vip}: closed (both FINs)");
            nat_out(&mut lb, net.lb0, &reply(TCP_FIN | TCP_ACK));
            nat_out(&mut lb, net.lb0, &tcp(&src, 41000, vip, TCP_ACK));
            assert_eq!(
                lb.member_conns(m),
                0,
                "{vip}: a retransmitted FIN counted again"
            );
        }
    });
}

#[test]
fn nat_an_rst_from_the_backend_ends_the_count_once() {
    let net = FibNet::new("lc-natrst");
    net.ns.run(|| {
        let mut lb = load_nat(V4, (1, TX_V4));
        let m = lb.member(0, 1);
        lb.set_member_conns(m, 0, 1);
        let src = client(V4, 9);
        let (port, _) = nat_out(&mut lb, net.lb0, &tcp(&src, 41000, V4, TCP_SYN));
        assert_eq!(lb.member_conns(m), 1);
        let rst = Pkt::tcp(TX_V4, 8080, NODE_V4, port, LB0_MAC).with(|p| {
            p.l4 = L4::Tcp {
                flags: TCP_RST | TCP_ACK,
            }
        });
        nat_out(&mut lb, net.lb0, &rst);
        assert_eq!(lb.member_conns(m), 0, "after the backend's RST");
        nat_out(&mut lb, net.lb0, &rst);
        assert_eq!(lb.member_conns(m), 0, "after a second RST");
    });
}
