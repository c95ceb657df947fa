//! NAT mode fixtures: client packets translated towards backends and replies translated back,
//! byte for byte, with `BPF_PROG_TEST_RUN` in a [`FibNet`] namespace (clients sit behind the
//! uplink, so replies leave with `XDP_TX`).
//!
//! Every expected frame is built from scratch by the test's packet builder, whose IP, TCP and UDP
//! checksums etherparse computes over the whole packet: the program's incremental updates must
//! land on exactly those values.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    thread::sleep,
    time::Duration,
};

use etherparse::{NetHeaders, PacketHeaders, TransportHeader};
use rand::{Rng, SeedableRng, rngs::StdRng};

use lb_common::{
    Counter, FlowKey, IPPROTO_TCP, IPPROTO_UDP, MODE_NAT, NAT_PORT_PROBES, NAT_S_ANSWERED,
    NAT_S_HALF_OPEN, VipValue, flow_hash, maps, nat_port_candidate,
};
use lb_tests::{
    harness::{
        FibNet, Lb, Run, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, action_name, net::*, vip_key,
    },
    hex,
    packet::{self, IcmpError, L4, Pkt, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};
use lb_userspace::kernel::program::Sizes;

const V4: &str = "192.0.2.10";
const V6: &str = "2001:db8::10";
const CLIENT4: &str = "198.51.100.7";
const CLIENT6: &str = "2001:db8:c::7";

/// Backend ids: (id, address, NAT port; 0 keeps the VIP's port).
const B4_MAPPED: (u32, &str, u16) = (1, TX_V4, 8080);
const B4: (u32, &str, u16) = (2, TX_V4_B, 0);
const B6_MAPPED: (u32, &str, u16) = (3, TX_V6, 8443);
const B6: (u32, &str, u16) = (4, TX_V6_B, 0);

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
    for (id, addr, port) in [B4_MAPPED, B4, B6_MAPPED, B6] {
        lb.set_backend_port(id, addr, port, true);
    }
    for (id, (addr, port, proto, backend)) in [
        (V4, 80, IPPROTO_TCP, B4_MAPPED.0),
        (V4, 53, IPPROTO_UDP, B4.0),
        (V6, 443, IPPROTO_TCP, B6_MAPPED.0),
        (V6, 53, IPPROTO_UDP, B6.0),
    ]
    .into_iter()
    .enumerate()
    {
        lb.add_vip(
            vip_key(addr, port, proto),
            VipValue {
                id: id as u32,
                flags: 0,
                affinity_timeout_s: 0,
                mode: MODE_NAT,
                table_size: 0,
            },
        );
        lb.set_ring(id as u32, |_| backend);
    }
    lb
}

/// The NAT port the program picks first for `pkt`'s flow.
fn first_port(lb: &mut Lb, pkt: &Pkt) -> u16 {
    let n = lb.node();
    nat_port_candidate(
        flow_hash(&pkt.flow_key()),
        0,
        n.nat_port_min,
        n.nat_port_max,
    )
}

fn node_of(pkt: &Pkt) -> &'static str {
    if pkt.src.is_ipv4() { NODE_V4 } else { NODE_V6 }
}

/// What `pkt` becomes on its way to `backend:bport` from the node's `nat_port`.
fn translated(pkt: &Pkt, nat_port: u16, backend: &str, bport: u16) -> Pkt {
    let mut out = pkt.clone();
    out.eth_dst = GW0_MAC;
    out.eth_src = LB0_MAC;
    out.vlan = None;
    out.src = node_of(pkt).parse().unwrap();
    out.sport = nat_port;
    out.dst = backend.parse().unwrap();
    out.dport = bport;
    out.ttl = pkt.ttl - 1;
    out
}

/// The backend's answer to `sent` (a translated packet), as it arrives at the load balancer.
fn reply_to(sent: &Pkt, l4: L4) -> Pkt {
    let mut r = sent.clone();
    r.eth_dst = LB0_MAC;
    r.eth_src = GW0_MAC;
    (r.src, r.dst) = (sent.dst, sent.src);
    (r.sport, r.dport) = (sent.dport, sent.sport);
    r.l4 = l4;
    r.ttl = 64;
    r.payload = b"reply from the backend".to_vec();
    r
}

/// What a reply becomes on its way back to the client of `client_pkt`.
fn restored(reply: &Pkt, client_pkt: &Pkt) -> Pkt {
    let mut out = reply.clone();
    out.eth_dst = GW0_MAC;
    out.eth_src = LB0_MAC;
    out.src = client_pkt.dst;
    out.sport = client_pkt.dport;
    out.dst = client_pkt.src;
    out.dport = client_pkt.sport;
    out.ttl = reply.ttl - 1;
    out
}

fn expect(lb: &mut Lb, ingress: u32, desc: &str, input: &Pkt, action: u32, output: &[u8]) -> Run {
    let r = lb.run(&input.frame(), ingress);
    assert_eq!(
        r.action,
        action,
        "{desc}: action {} instead of {}",
        action_name(r.action),
        action_name(action)
    );
    assert_eq!(
        hex(&r.output),
        hex(output),
        "{desc}: output differs (got, expected)"
    );
    r
}

/// (description, client packet, backend, the backend's reply).
type Case = (&'static str, Pkt, (u32, &'static str, u16), L4);

fn delta(lb: &mut Lb, before: &std::collections::HashMap<Counter, u64>, c: Counter) -> u64 {
    lb.counters()[&c] - before[&c]
}

#[test]
fn both_directions_are_translated_with_correct_checksums() {
    let net = FibNet::new("nat-fix");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        let to = LB0_MAC;
        let cases: Vec<Case> = vec![
            (
                "IPv4 TCP, port 80 mapped to 8080",
                Pkt::tcp(CLIENT4, 40000, V4, 80, to),
                B4_MAPPED,
                L4::Tcp {
                    flags: TCP_SYN | TCP_ACK,
                },
            ),
            (
                "IPv4 UDP, VIP port kept",
                Pkt::udp(CLIENT4, 5353, V4, 53, to),
                B4,
                L4::Udp,
            ),
            (
                "IPv4 UDP without checksum: stays without",
                Pkt::udp(CLIENT4, 5354, V4, 53, to).with(|p| p.udp_checksum = false),
                B4,
                L4::Udp,
            ),
            (
                "IPv4 TCP behind a VLAN tag, odd payload, TOS: tag dropped, TOS kept",
                Pkt::tcp(CLIENT4, 40001, V4, 80, to).with(|p| {
                    p.vlan = Some(7);
                    p.tos = 0xb8;
                    p.payload = b"odd".to_vec();
                }),
                B4_MAPPED,
                L4::Tcp {
                    flags: TCP_SYN | TCP_ACK,
                },
            ),
            (
                "IPv4 TCP with IP options",
                Pkt::tcp(CLIENT4, 40002, V4, 80, to).with(|p| p.v4_options = vec![1, 1, 1, 0]),
                B4_MAPPED,
                L4::Tcp {
                    flags: TCP_SYN | TCP_ACK,
                },
            ),
            (
                "IPv6 TCP, port 443 mapped to 8443",
                Pkt::tcp(CLIENT6, 40000, V6, 443, to),
                B6_MAPPED,
                L4::Tcp {
                    flags: TCP_SYN | TCP_ACK,
                },
            ),
            (
                "IPv6 UDP, VIP port kept",
                Pkt::udp(CLIENT6, 5353, V6, 53, to),
                B6,
                L4::Udp,
            ),
        ];
        for (desc, pkt, (_, backend, bport), reply_l4) in cases {
            let before = lb.counters();
            let port = first_port(&mut lb, &pkt);
            let bport = if bport == 0 { pkt.dport } else { bport };
            let out = translated(&pkt, port, backend, bport);
            let mut expected_out = out.clone();
            if pkt.vlan.is_some() {
                expected_out.vlan = None;
            }
            expect(&mut lb, ingress, desc, &pkt, XDP_TX, &expected_out.frame());
            assert_eq!(delta(&mut lb, &before, Counter::NatNew), 1, "{desc}");
            assert_eq!(delta(&mut lb, &before, Counter::NatForward), 1, "{desc}");
            assert_eq!(delta(&mut lb, &before, Counter::Tx), 1, "{desc}");

            // The reply goes back to the client, from the VIP.
            let reply =
                reply_to(&out, reply_l4.clone()).with(|r| r.udp_checksum = pkt.udp_checksum);
            let back = restored(&reply, &pkt);
            expect(
                &mut lb,
                ingress,
                &format!("{desc}: reply"),
                &reply,
                XDP_TX,
                &back.frame(),
            );
            assert_eq!(delta(&mut lb, &before, Counter::NatReverse), 1, "{desc}");

            // An established packet reuses the translation.
            let again = pkt.clone().with(|p| {
                p.l4 = match p.l4 {
                    L4::Tcp { .. } => L4::Tcp { flags: TCP_ACK },
                    ref l => l.clone(),
                };
                p.payload = b"more".to_vec();
            });
            let out2 = translated(&again, port, backend, bport);
            expect(
                &mut lb,
                ingress,
                &format!("{desc}: next packet"),
                &again,
                XDP_TX,
                &out2.frame(),
            );
            assert_eq!(
                delta(&mut lb, &before, Counter::NatNew),
                1,
                "{desc}: a second translation"
            );
        }
        let c = lb.counters();
        let verdicts: u64 = Counter::ALL
            .iter()
            .filter(|c| c.is_verdict())
            .map(|v| c[v])
            .sum();
        assert_eq!(
            verdicts, lb.runs,
            "verdicts do not add up to the frames run"
        );
    });
}

/// The backend answers `sent` (the client's `syn` as translated) with a SYN-ACK, which goes
/// back to the client restored.
fn answer_syn(lb: &mut Lb, ingress: u32, sent: &Pkt, syn: &Pkt) {
    let synack = reply_to(
        sent,
        L4::Tcp {
            flags: TCP_SYN | TCP_ACK,
        },
    );
    expect(
        lb,
        ingress,
        "SYN-ACK",
        &synack,
        XDP_TX,
        &restored(&synack, syn).frame(),
    );
}

/// Completes `syn`'s handshake through its translation on `port`: the backend's SYN-ACK comes
/// back restored, and the client's ACK goes out translated.
fn establish(lb: &mut Lb, ingress: u32, syn: &Pkt, port: u16) {
    answer_syn(lb, ingress, &translated(syn, port, TX_V4, 8080), syn);
    let ack = syn.clone().with(|p| p.l4 = L4::Tcp { flags: TCP_ACK });
    expect(
        lb,
        ingress,
        "the client's ACK",
        &ack,
        XDP_TX,
        &translated(&ack, port, TX_V4, 8080).frame(),
    );
}

/// Sends `syn` and returns the NAT port it was given.
fn open(lb: &mut Lb, ingress: u32, syn: &Pkt) -> u16 {
    let r = lb.run(&syn.frame(), ingress);
    assert_eq!(action_name(r.action), "XDP_TX", "a port for {}", syn.src);
    sport_of(&r.output)
}

/// The state bits of the translation holding `port` towards the first IPv4 backend.
fn state_at(lb: &mut Lb, port: u16) -> u16 {
    lb.nat_reverse(&reply_key(TX_V4, 8080, port, IPPROTO_TCP))
        .expect("a translation holds the port")
        .state
}

#[test]
fn a_reply_is_counted_for_its_vip_and_backend_and_one_to_no_translation_is_not() {
    let net = FibNet::new("nat-replies");
    let ingress = net.lb0;
    net.ns.run(|| replies_counted(ingress));
}

fn replies_counted(ingress: u32) {
    let mut lb = setup();
    let syn = Pkt::tcp(CLIENT4, 40000, V4, 80, LB0_MAC);
    let port = open(&mut lb, ingress, &syn);
    let synack = reply_to(
        &translated(&syn, port, TX_V4, 8080),
        L4::Tcp {
            flags: TCP_SYN | TCP_ACK,
        },
    );
    answer_syn(&mut lb, ingress, &translated(&syn, port, TX_V4, 8080), &syn);
    // A reply to a port no translation holds passes, uncounted.
    let stray = synack.clone().with(|p| p.dport = port.wrapping_add(1));
    expect(
        &mut lb,
        ingress,
        "a stray reply",
        &stray,
        XDP_PASS,
        &stray.frame(),
    );
    let bytes = synack.frame().len() as u64;
    let member = lb.member(0, B4_MAPPED.0);
    for (map, id, what) in [
        (maps::VIP_REPLY_STATS, 0, "the VIP"),
        (maps::MEMBER_REPLY_STATS, member, "the backend"),
    ] {
        let r = lb.traffic(map, id);
        assert_eq!(
            (r.packets, r.bytes, r.new_flows),
            (1, bytes, 0),
            "{what}'s replies"
        );
    }
    // The request side counted the SYN: one packet each way.
    let sent = lb.traffic(maps::MEMBER_STATS, member);
    assert_eq!((sent.packets, sent.new_flows), (1, 1));
}

#[test]
fn only_the_clients_ack_after_the_backends_answer_establishes_a_translation() {
    let net = FibNet::new("nat-est");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        lb.set_nat(20000, 20000, 10_000_000_000, 2_000_000_000);
        let syn = Pkt::tcp("198.51.100.20", 1000, V4, 80, LB0_MAC);
        let out = translated(&syn, 20000, TX_V4, 8080);
        expect(&mut lb, ingress, "SYN", &syn, XDP_TX, &out.frame());
        assert_eq!(
            state_at(&mut lb, 20000),
            NAT_S_HALF_OPEN,
            "a new one is half-open"
        );
        // An ACK before the backend answered (a blind one) establishes nothing.
        let ack = syn.clone().with(|p| p.l4 = L4::Tcp { flags: TCP_ACK });
        expect(
            &mut lb,
            ingress,
            "early ACK",
            &ack,
            XDP_TX,
            &translated(&ack, 20000, TX_V4, 8080).frame(),
        );
        assert_eq!(state_at(&mut lb, 20000), NAT_S_HALF_OPEN);
        answer_syn(&mut lb, ingress, &out, &syn);
        assert_eq!(state_at(&mut lb, 20000), NAT_S_HALF_OPEN | NAT_S_ANSWERED);
        // The client's retransmitted SYN is no ACK either.
        expect(&mut lb, ingress, "SYN again", &syn, XDP_TX, &out.frame());
        assert_eq!(state_at(&mut lb, 20000), NAT_S_HALF_OPEN | NAT_S_ANSWERED);
        let before = lb.counters();
        expect(
            &mut lb,
            ingress,
            "the handshake's ACK",
            &ack,
            XDP_TX,
            &translated(&ack, 20000, TX_V4, 8080).frame(),
        );
        assert_eq!(state_at(&mut lb, 20000), NAT_S_ANSWERED, "established");
        assert_eq!(delta(&mut lb, &before, Counter::NatEstablished), 1);
    });
}

#[test]
fn a_half_open_translation_frees_its_port_after_the_half_open_timeout_an_established_one_keeps_it()
{
    let net = FibNet::new("nat-hot");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        lb.set_nat(20000, 20001, 10_000_000_000, 2_000_000_000);
        let timeout = Duration::from_millis(200);
        lb.set_half_open_timeout(timeout.as_millis() as u32);
        let est = Pkt::tcp("198.51.100.21", 1000, V4, 80, LB0_MAC);
        let pe = open(&mut lb, ingress, &est);
        establish(&mut lb, ingress, &est, pe);
        let half = Pkt::tcp("198.51.100.22", 1000, V4, 80, LB0_MAC);
        let ph = open(&mut lb, ingress, &half);
        assert_ne!(ph, pe);
        // Past the timeout (the program's clock ticks once a jiffy: at most 10 ms late).
        sleep(timeout + Duration::from_millis(50));
        let before = lb.counters();
        let late = Pkt::tcp("198.51.100.23", 1000, V4, 80, LB0_MAC);
        expect(
            &mut lb,
            ingress,
            "takes the half-open one's port",
            &late,
            XDP_TX,
            &translated(&late, ph, TX_V4, 8080).frame(),
        );
        assert_eq!(delta(&mut lb, &before, Counter::NatHalfOpenExpired), 1);
        assert_eq!(delta(&mut lb, &before, Counter::NatHalfOpenReclaimed), 0);
        assert_eq!(delta(&mut lb, &before, Counter::NatNew), 1);
        // The established one, as old, still has its port and its replies.
        let ack = est.clone().with(|p| p.l4 = L4::Tcp { flags: TCP_ACK });
        expect(
            &mut lb,
            ingress,
            "established, past the half-open timeout",
            &ack,
            XDP_TX,
            &translated(&ack, pe, TX_V4, 8080).frame(),
        );
        let reply = reply_to(
            &translated(&est, pe, TX_V4, 8080),
            L4::Tcp { flags: TCP_ACK },
        );
        expect(
            &mut lb,
            ingress,
            "its reply",
            &reply,
            XDP_TX,
            &restored(&reply, &est).frame(),
        );
    });
}

#[test]
fn ports_run_short_the_oldest_half_open_translation_is_taken_over_never_an_established_one() {
    let net = FibNet::new("nat-recl");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        // Three ports; the half-open timeout far away: only a shortage frees a port.
        lb.set_nat(20000, 20002, 10_000_000_000, 2_000_000_000);
        let est = Pkt::tcp("198.51.100.30", 1000, V4, 80, LB0_MAC);
        let pe = open(&mut lb, ingress, &est);
        establish(&mut lb, ingress, &est, pe);
        let take = |lb: &mut Lb, src: &str| {
            let p = Pkt::tcp(src, 1000, V4, 80, LB0_MAC);
            let port = open(lb, ingress, &p);
            // Apart by more than a tick of the program's clock.
            sleep(Duration::from_millis(30));
            (p, port)
        };
        let (_older, po) = take(&mut lb, "198.51.100.31");
        let (newer, pn) = take(&mut lb, "198.51.100.32");
        let mut ports = vec![pe, po, pn];
        ports.sort();
        assert_eq!(ports, [20000, 20001, 20002], "every port held");
        // A SYN-ACK for the newer one: answered, still half-open.
        answer_syn(
            &mut lb,
            ingress,
            &translated(&newer, pn, TX_V4, 8080),
            &newer,
        );

        let before = lb.counters();
        let (first, p1) = take(&mut lb, "198.51.100.33");
        assert_eq!(p1, po, "the oldest half-open one's port");
        assert_eq!(delta(&mut lb, &before, Counter::NatHalfOpenReclaimed), 1);
        assert_eq!(delta(&mut lb, &before, Counter::DropNatPortsExhausted), 0);
        // Its replies go to the new client now; the old client's packets take a port anew.
        let r1 = reply_to(
            &translated(&first, p1, TX_V4, 8080),
            L4::Tcp {
                flags: TCP_SYN | TCP_ACK,
            },
        );
        expect(
            &mut lb,
            ingress,
            "the port's replies",
            &r1,
            XDP_TX,
            &restored(&r1, &first).frame(),
        );
        // Next oldest: the newer one (answered, never acknowledged by its client).
        let (_, p2) = take(&mut lb, "198.51.100.34");
        assert_eq!(p2, pn);
        // Every port established: a new flow finds none, and the established ones keep theirs.
        establish(&mut lb, ingress, &first, p1);
        let second = Pkt::tcp("198.51.100.34", 1000, V4, 80, LB0_MAC);
        establish(&mut lb, ingress, &second, p2);
        let before = lb.counters();
        let d = Pkt::tcp("198.51.100.35", 1000, V4, 80, LB0_MAC);
        expect(&mut lb, ingress, "no port left", &d, XDP_DROP, &d.frame());
        assert_eq!(delta(&mut lb, &before, Counter::DropNatPortsExhausted), 1);
        assert_eq!(delta(&mut lb, &before, Counter::NatHalfOpenReclaimed), 0);
        for (p, port) in [(&est, pe), (&first, p1), (&second, p2)] {
            let ack = p.clone().with(|p| p.l4 = L4::Tcp { flags: TCP_ACK });
            expect(
                &mut lb,
                ingress,
                "an established one",
                &ack,
                XDP_TX,
                &translated(&ack, port, TX_V4, 8080).frame(),
            );
        }
    });
}

#[test]
fn colliding_flows_get_distinct_ports_and_exhaustion_is_counted() {
    let net = FibNet::new("nat-coll");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        // Two clients whose flows want the same first port.
        let a = Pkt::tcp(CLIENT4, 40000, V4, 80, LB0_MAC);
        let pa = first_port(&mut lb, &a);
        let b = (1..=254u16)
            .flat_map(|h| (40001..41000).map(move |p| (h, p)))
            .map(|(h, p)| Pkt::tcp(&format!("198.51.100.{h}"), p, V4, 80, LB0_MAC))
            .find(|b| first_port(&mut lb, b) == pa)
            .expect("two flows with one first port");
        expect(
            &mut lb,
            ingress,
            "first flow",
            &a,
            XDP_TX,
            &translated(&a, pa, TX_V4, 8080).frame(),
        );
        let before = lb.counters();
        let n = lb.node();
        let h = flow_hash(&b.flow_key());
        let pb = (1..NAT_PORT_PROBES)
            .map(|i| nat_port_candidate(h, i, n.nat_port_min, n.nat_port_max))
            .find(|p| *p != pa)
            .unwrap();
        expect(
            &mut lb,
            ingress,
            "colliding flow",
            &b,
            XDP_TX,
            &translated(&b, pb, TX_V4, 8080).frame(),
        );
        assert!(delta(&mut lb, &before, Counter::NatPortCollisions) >= 1);
        // Both replies find their own client.
        let ra = reply_to(
            &translated(&a, pa, TX_V4, 8080),
            L4::Tcp {
                flags: TCP_SYN | TCP_ACK,
            },
        );
        let rb = reply_to(
            &translated(&b, pb, TX_V4, 8080),
            L4::Tcp {
                flags: TCP_SYN | TCP_ACK,
            },
        );
        expect(
            &mut lb,
            ingress,
            "reply a",
            &ra,
            XDP_TX,
            &restored(&ra, &a).frame(),
        );
        expect(
            &mut lb,
            ingress,
            "reply b",
            &rb,
            XDP_TX,
            &restored(&rb, &b).frame(),
        );
        // The same port towards another backend is no collision: ports are per backend.
        let udp = Pkt::udp(CLIENT4, 40000, V4, 53, LB0_MAC);
        let pu = first_port(&mut lb, &udp);
        expect(
            &mut lb,
            ingress,
            "other backend",
            &udp,
            XDP_TX,
            &translated(&udp, pu, TX_V4_B, 53).frame(),
        );

        // One port only: a second flow to the backend finds none while the first is
        // established (a half-open one would be taken over: see
        // `ports_run_short_the_oldest_half_open_translation_is_taken_over_never_an_established_one`).
        lb.set_nat(20000, 20000, 10_000_000_000, 2_000_000_000);
        let c = Pkt::tcp("198.51.100.8", 1000, V4, 80, LB0_MAC);
        expect(
            &mut lb,
            ingress,
            "takes the only port",
            &c,
            XDP_TX,
            &translated(&c, 20000, TX_V4, 8080).frame(),
        );
        establish(&mut lb, ingress, &c, 20000);
        let d = Pkt::tcp("198.51.100.9", 1000, V4, 80, LB0_MAC);
        let before = lb.counters();
        expect(&mut lb, ingress, "no port left", &d, XDP_DROP, &d.frame());
        assert_eq!(delta(&mut lb, &before, Counter::DropNatPortsExhausted), 1);
        assert_eq!(
            delta(&mut lb, &before, Counter::NatPortCollisions),
            NAT_PORT_PROBES as u64
        );
        // Once the first one closes (RST) and its grace time is over, the port is free again.
        lb.set_nat(20000, 20000, 1_000_000, 2_000_000_000);
        let rst = c.clone().with(|p| {
            p.l4 = L4::Tcp {
                flags: TCP_RST | TCP_ACK,
            }
        });
        expect(
            &mut lb,
            ingress,
            "RST from the client",
            &rst,
            XDP_TX,
            &translated(&rst, 20000, TX_V4, 8080).frame(),
        );
        sleep(Duration::from_millis(30));
        expect(
            &mut lb,
            ingress,
            "port reused after the grace time",
            &d,
            XDP_TX,
            &translated(&d, 20000, TX_V4, 8080).frame(),
        );
        // The port's replies are d's now.
        let rd = reply_to(
            &translated(&d, 20000, TX_V4, 8080),
            L4::Tcp { flags: TCP_ACK },
        );
        expect(
            &mut lb,
            ingress,
            "reply on the reused port",
            &rd,
            XDP_TX,
            &restored(&rd, &d).frame(),
        );
    });
}

#[test]
fn unknown_and_closed_replies_pass_untouched() {
    let net = FibNet::new("nat-unk");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        let stray = Pkt::tcp(TX_V4, 8080, NODE_V4, 20001, LB0_MAC)
            .with(|p| p.l4 = L4::Tcp { flags: TCP_ACK });
        let before = lb.counters();
        let r = lb.run(&stray.frame(), ingress);
        assert_eq!((r.action, hex(&r.output)), (XDP_PASS, hex(&stray.frame())));
        assert_eq!(delta(&mut lb, &before, Counter::PassNotForVip), 1);
        assert_eq!(delta(&mut lb, &before, Counter::NatReverse), 0);

        // Both FINs close a translation; after the grace time replies no longer match it.
        lb.set_nat(1024, 32767, 1_000_000, 2_000_000_000);
        let syn = Pkt::tcp(CLIENT4, 41000, V4, 80, LB0_MAC);
        let port = first_port(&mut lb, &syn);
        let out = translated(&syn, port, TX_V4, 8080);
        expect(&mut lb, ingress, "SYN", &syn, XDP_TX, &out.frame());
        let fin = syn.clone().with(|p| {
            p.l4 = L4::Tcp {
                flags: TCP_FIN | TCP_ACK,
            }
        });
        expect(
            &mut lb,
            ingress,
            "client FIN",
            &fin,
            XDP_TX,
            &translated(&fin, port, TX_V4, 8080).frame(),
        );
        let before = lb.counters();
        let bfin = reply_to(
            &out,
            L4::Tcp {
                flags: TCP_FIN | TCP_ACK,
            },
        );
        expect(
            &mut lb,
            ingress,
            "backend FIN",
            &bfin,
            XDP_TX,
            &restored(&bfin, &syn).frame(),
        );
        assert_eq!(delta(&mut lb, &before, Counter::NatClosed), 1);
        sleep(Duration::from_millis(30));
        let late = reply_to(&out, L4::Tcp { flags: TCP_ACK });
        let before = lb.counters();
        let r = lb.run(&late.frame(), ingress);
        assert_eq!((r.action, hex(&r.output)), (XDP_PASS, hex(&late.frame())));
        assert_eq!(delta(&mut lb, &before, Counter::NatReverseStale), 1);
        // A new SYN on the same 5-tuple opens a new translation.
        let before = lb.counters();
        expect(&mut lb, ingress, "reopened", &syn, XDP_TX, &out.frame());
        assert_eq!(delta(&mut lb, &before, Counter::NatNew), 1);
    });
}

/// An ICMP destination unreachable (port unreachable) from `from` quoting the translated packet
/// `quoted`.
fn icmp_unreachable(from: &str, quoted: &Pkt) -> Vec<u8> {
    icmp_error(IcmpError::PortUnreachable, from, quoted)
}

/// How much of a packet an ICMP error about it quotes: 576 (IPv4, RFC 1812 4.3.2.3) or 1280
/// bytes (IPv6, RFC 4443 2.4(c)) in all, less the IP and ICMP headers.
fn quoted(pkt: &Pkt) -> Vec<u8> {
    let mut b = pkt.ip_bytes();
    b.truncate(if pkt.src.is_ipv4() {
        576 - 28
    } else {
        1280 - 48
    });
    b
}

/// An ICMP (IPv4) or ICMPv6 error `kind` from `from` (TTL 60) to the node, quoting the
/// translated packet `sent`; checksums by etherparse.
fn icmp_error(kind: IcmpError, from: &str, sent: &Pkt) -> Vec<u8> {
    let node = node_of(sent).parse().unwrap();
    let from = from.parse().unwrap();
    packet::icmp_error(kind, from, node, 60, &quoted(sent), LB0_MAC, GW0_MAC)
}

/// What that error becomes for the client of `client_pkt` (which `sent` translates): from the
/// VIP to the client, TTL 59, quoting the packet as the client sent it (with the TTL it had
/// when quoted), through the uplink.
fn icmp_restored(kind: IcmpError, client_pkt: &Pkt, sent: &Pkt) -> Vec<u8> {
    let as_sent = client_pkt.clone().with(|p| p.ttl = sent.ttl);
    packet::icmp_error(
        kind,
        client_pkt.dst,
        client_pkt.src,
        59,
        &quoted(&as_sent),
        GW0_MAC,
        LB0_MAC,
    )
}

#[test]
fn once_the_streak_reaches_the_threshold_new_syns_to_the_backend_are_held_back_not_its_flows() {
    let net = FibNet::new("nat-hold");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        let id = lb.member(0, B4_MAPPED.0);
        lb.set_member_hold(id, 2);
        // An open connection, established before the backend starts refusing.
        let open_syn = Pkt::tcp(CLIENT4, 41000, V4, 80, LB0_MAC);
        let port = open(&mut lb, ingress, &open_syn);
        establish(&mut lb, ingress, &open_syn, port);
        // Two attempts refused with an RST: the streak reaches the threshold.
        for sport in [42000, 42001] {
            let syn = Pkt::tcp(CLIENT4, sport, V4, 80, LB0_MAC);
            let p = first_port(&mut lb, &syn);
            let out = translated(&syn, p, TX_V4, 8080);
            expect(&mut lb, ingress, "SYN", &syn, XDP_TX, &out.frame());
            let rst = reply_to(
                &out,
                L4::Tcp {
                    flags: TCP_RST | TCP_ACK,
                },
            );
            expect(
                &mut lb,
                ingress,
                "RST",
                &rst,
                XDP_TX,
                &restored(&rst, &syn).frame(),
            );
        }
        assert_eq!(lb.passive(id).consecutive_failures, 2);
        let before = lb.counters();
        // A new client's SYN is held back (dropped, for its retransmission to go elsewhere once
        // the agent has taken the backend out)...
        let syn = Pkt::tcp(CLIENT4, 42002, V4, 80, LB0_MAC);
        let r = lb.run(&syn.frame(), ingress);
        assert_eq!(action_name(r.action), action_name(XDP_DROP));
        assert_eq!(delta(&mut lb, &before, Counter::DropBackendFailing), 1);
        // ...and the open connection goes on as before.
        let ack = open_syn.clone().with(|p| p.l4 = L4::Tcp { flags: TCP_ACK });
        let out = translated(&ack, port, TX_V4, 8080);
        expect(
            &mut lb,
            ingress,
            "the open connection's ACK",
            &ack,
            XDP_TX,
            &out.frame(),
        );
        // Without a threshold nothing is held: the agent writes 0 for backends without
        // passive health (and a write clears the time the program noted).
        lb.set_member_hold(id, 0);
        let p = first_port(&mut lb, &syn);
        let out = translated(&syn, p, TX_V4, 8080);
        expect(
            &mut lb,
            ingress,
            "SYN without a threshold",
            &syn,
            XDP_TX,
            &out.frame(),
        );
    });
}

#[test]
fn passive_health_counts_refusals_unreachables_timeouts_and_answers() {
    let net = FibNet::new("nat-pass");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        let id = lb.member(0, B4_MAPPED.0);
        let attempt = |lb: &mut Lb, sport: u16| {
            let syn = Pkt::tcp(CLIENT4, sport, V4, 80, LB0_MAC);
            let port = first_port(lb, &syn);
            let out = translated(&syn, port, TX_V4, 8080);
            expect(lb, ingress, "SYN", &syn, XDP_TX, &out.frame());
            (syn, out)
        };

        // Refused: the backend answers the SYN with an RST (which still goes to the client).
        let (syn, out) = attempt(&mut lb, 42000);
        let rst = reply_to(
            &out,
            L4::Tcp {
                flags: TCP_RST | TCP_ACK,
            },
        );
        expect(
            &mut lb,
            ingress,
            "RST",
            &rst,
            XDP_TX,
            &restored(&rst, &syn).frame(),
        );
        let p = lb.passive(id);
        assert_eq!((p.refused, p.consecutive_failures, p.answered), (1, 1, 0));
        assert!(
            lb.flow(&syn.flow_key()).is_none(),
            "a refused attempt keeps its flow pinned to the backend"
        );

        // Unreachable: an ICMP error about the translated SYN; it goes on to the client.
        let (syn, out) = attempt(&mut lb, 42001);
        let icmp = icmp_unreachable(TX_V4, &out);
        let r = lb.run(&icmp, ingress);
        let back = icmp_restored(IcmpError::PortUnreachable, &syn, &out);
        assert_eq!((r.action, hex(&r.output)), (XDP_TX, hex(&back)));
        assert!(
            lb.flow(&Pkt::tcp(CLIENT4, 42001, V4, 80, LB0_MAC).flow_key())
                .is_none()
        );
        let p = lb.passive(id);
        assert_eq!((p.unreachable, p.consecutive_failures), (1, 2));
        // The same error again does not count twice for one attempt.
        lb.run(&icmp, ingress);
        assert_eq!(lb.passive(id).consecutive_failures, 2);

        // SYN timeout: the client retransmits a SYN nobody answered for longer than the bound.
        lb.set_nat(1024, 32767, 10_000_000_000, 5_000_000);
        let (syn, out) = attempt(&mut lb, 42002);
        sleep(Duration::from_millis(30));
        expect(
            &mut lb,
            ingress,
            "retransmitted SYN",
            &syn,
            XDP_TX,
            &out.frame(),
        );
        let p = lb.passive(id);
        assert_eq!((p.syn_timeouts, p.consecutive_failures), (1, 3));

        // An answer resets the streak.
        let (syn, out) = attempt(&mut lb, 42003);
        answer_syn(&mut lb, ingress, &out, &syn);
        let p = lb.passive(id);
        assert_eq!((p.answered, p.consecutive_failures), (1, 0));
        // An RST after the answer is a normal close, not a failure.
        let rst = reply_to(
            &out,
            L4::Tcp {
                flags: TCP_RST | TCP_ACK,
            },
        );
        expect(
            &mut lb,
            ingress,
            "late RST",
            &rst,
            XDP_TX,
            &restored(&rst, &syn).frame(),
        );
        assert_eq!(lb.passive(id).refused, 1);

        // IPv6: ICMPv6 destination unreachable.
        let syn6 = Pkt::tcp(CLIENT6, 42000, V6, 443, LB0_MAC);
        let port = first_port(&mut lb, &syn6);
        let out6 = translated(&syn6, port, TX_V6, 8443);
        expect(&mut lb, ingress, "SYN v6", &syn6, XDP_TX, &out6.frame());
        let before = lb.counters();
        lb.run(&icmp_unreachable(TX_V6, &out6), ingress);
        let m6 = lb.member(2, B6_MAPPED.0);
        assert_eq!(lb.passive(m6).unreachable, 1);
        assert_eq!(delta(&mut lb, &before, Counter::NatUnreachable), 1);
        let fk: FlowKey = syn6.flow_key();
        assert!(
            lb.nat_flow(&fk).is_some(),
            "translation recorded by client flow"
        );
    });
}

#[test]
fn fragmentation_needed_is_counted_apart_not_as_unreachable() {
    let net = FibNet::new("nat-frag");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        // IPv4 type 3 code 4 (fragmentation needed), ICMPv6 type 2 (packet too big).
        let cases = [
            (
                Pkt::tcp(CLIENT4, 43000, V4, 80, LB0_MAC),
                0,
                B4_MAPPED,
                IcmpError::FragNeeded(1280),
            ),
            (
                Pkt::tcp(CLIENT6, 43000, V6, 443, LB0_MAC),
                2,
                B6_MAPPED,
                IcmpError::PacketTooBig(1280),
            ),
        ];
        for (syn, vip, (b, backend, bport), ty) in cases {
            let id = lb.member(vip, b);
            let port = first_port(&mut lb, &syn);
            let out = translated(&syn, port, backend, bport);
            expect(&mut lb, ingress, "SYN", &syn, XDP_TX, &out.frame());
            let before = lb.counters();
            let health = lb.passive(id);
            let icmp = icmp_error(ty, backend, &out);
            let r = lb.run(&icmp, ingress);
            assert_eq!(r.action, XDP_TX, "{ty:?}: on to the client");
            assert_eq!(delta(&mut lb, &before, Counter::NatFragNeeded), 1, "{ty:?}");
            assert_eq!(
                delta(&mut lb, &before, Counter::NatUnreachable),
                0,
                "{ty:?}"
            );
            assert_eq!(lb.passive(id), health, "{ty:?}: no passive health signal");
            assert!(
                lb.flow(&syn.flow_key()).is_some(),
                "{ty:?}: the flow stays on its backend"
            );
        }
    });
}

/// Checks the IPv4 header, TCP and UDP checksums of `frame` with etherparse (an IPv4 UDP
/// checksum of zero means none and is not checked).
fn assert_checksums(frame: &[u8], desc: &str) {
    let h = PacketHeaders::from_ethernet_slice(frame)
        .unwrap_or_else(|e| panic!("{desc}: etherparse rejects the frame: {e}"));
    let payload = h.payload.slice();
    let (net, transport) = (
        h.net.expect("an IP header"),
        h.transport.expect("TCP or UDP"),
    );
    let (check, want) = match (&net, &transport) {
        (NetHeaders::Ipv4(ip, _), t) => {
            assert_eq!(
                ip.header_checksum,
                ip.calc_header_checksum(),
                "{desc}: IPv4 header checksum"
            );
            match t {
                TransportHeader::Tcp(tcp) => (tcp.checksum, tcp.calc_checksum_ipv4(ip, payload)),
                TransportHeader::Udp(udp) if udp.checksum == 0 => return,
                TransportHeader::Udp(udp) => (udp.checksum, udp.calc_checksum_ipv4(ip, payload)),
                _ => panic!("{desc}: neither TCP nor UDP"),
            }
        }
        (NetHeaders::Ipv6(ip, _), TransportHeader::Tcp(tcp)) => {
            (tcp.checksum, tcp.calc_checksum_ipv6(ip, payload))
        }
        (NetHeaders::Ipv6(ip, _), TransportHeader::Udp(udp)) => {
            (udp.checksum, udp.calc_checksum_ipv6(ip, payload))
        }
        _ => panic!("{desc}: not IP with TCP or UDP"),
    };
    assert_eq!(
        check,
        want.expect("checksum computable"),
        "{desc}: L4 checksum"
    );
}

/// One random NAT case: a client packet to a VIP whose only backend is `backend:bport` (0: the
/// VIP's port).
fn random_case(rng: &mut StdRng) -> (Pkt, IpAddr, u16) {
    let v4 = rng.random_bool(0.5);
    let (client, vip, backend): (IpAddr, IpAddr, IpAddr) = if v4 {
        // Clients and backends inside the routes FibNet has for them; VIPs anywhere in unicast
        // space (not 0/8, 10/8 of the test net, 127/8; below 224/4).
        let vip = loop {
            let a = rng.random::<u32>();
            if !matches!(a >> 24, 0 | 10 | 127 | 224..) {
                break a;
            }
        };
        (
            Ipv4Addr::new(198, 51, 100, rng.random_range(1..255)).into(),
            Ipv4Addr::from(vip).into(),
            Ipv4Addr::from(0x0a01_0000 | rng.random::<u16>() as u32).into(),
        )
    } else {
        let c: u128 = 0x2001_0db8_000c_0000u128 << 64 | rng.random::<u64>() as u128;
        let b: u128 = 0xfd01u128 << 112 | rng.random::<u64>() as u128;
        (
            Ipv6Addr::from(c).into(),
            // Global unicast (2000::/3).
            Ipv6Addr::from(rng.random::<u128>() >> 3 | 1 << 125).into(),
            Ipv6Addr::from(b).into(),
        )
    };
    let (sport, dport) = (
        rng.random_range(1..=u16::MAX),
        rng.random_range(1..=u16::MAX),
    );
    let (client, vip) = (client.to_string(), vip.to_string());
    let mut pkt = if rng.random_bool(0.5) {
        Pkt::tcp(&client, sport, &vip, dport, LB0_MAC)
    } else {
        Pkt::udp(&client, sport, &vip, dport, LB0_MAC)
            .with(|p| p.udp_checksum = !v4 || rng.random_bool(0.7))
    };
    let len = rng.random_range(0..48);
    pkt.payload = (0..len).map(|_| rng.random()).collect();
    pkt.ttl = rng.random_range(2..=255);
    let bport = if rng.random_bool(0.5) {
        0
    } else {
        rng.random_range(1..=u16::MAX)
    };
    (pkt, backend, bport)
}

#[test]
fn random_addresses_and_ports_through_nat_both_ways_give_checksums_etherparse_accepts() {
    // One VIP and one backend per case: the VIP table holds 1,024.
    const CASES: u32 = 1_000;
    let net = FibNet::new("nat-rand");
    let ingress = net.lb0;
    let seed: u64 = std::env::var("LB_NAT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0a7_c5e0);
    net.ns.run(|| {
        let mut lb = Lb::load(Sizes {
            table_size: 13,
            max_vips: CASES,
            max_backends: CASES,
            flow_table_size: 4 * CASES,
            affinity_table_size: 64,
            nat_table_size: 4 * CASES,
        });
        lb.set_node(Some(NODE_V4), Some(NODE_V6), 30_000_000_000);
        let mut rng = StdRng::seed_from_u64(seed);
        for id in 0..CASES {
            let (pkt, backend, bport) = random_case(&mut rng);
            let desc = format!("seed {seed} case {id}: {pkt:?} to {backend} port {bport}");
            let proto = if matches!(pkt.l4, L4::Tcp { .. }) {
                IPPROTO_TCP
            } else {
                IPPROTO_UDP
            };
            lb.set_backend_port(id, &backend.to_string(), bport, true);
            let vip = VipValue {
                id,
                flags: 0,
                affinity_timeout_s: 0,
                mode: MODE_NAT,
                table_size: 0,
            };
            lb.add_vip(vip_key(&pkt.dst.to_string(), pkt.dport, proto), vip);
            lb.set_ring(id, |_| id);

            let port = first_port(&mut lb, &pkt);
            let bport = if bport == 0 { pkt.dport } else { bport };
            let out = translated(&pkt, port, &backend.to_string(), bport);
            let r = expect(&mut lb, ingress, &desc, &pkt, XDP_TX, &out.frame());
            assert_checksums(&r.output, &format!("{desc}: forward"));

            let l4 = match pkt.l4 {
                L4::Tcp { .. } => L4::Tcp {
                    flags: TCP_SYN | TCP_ACK,
                },
                ref l => l.clone(),
            };
            let len = rng.random_range(0..48);
            let reply = reply_to(&out, l4).with(|r| {
                r.udp_checksum = pkt.udp_checksum;
                r.payload = (0..len).map(|_| rng.random()).collect();
                r.ttl = rng.random_range(2..=255);
            });
            let desc = format!("{desc}: reply");
            let r = expect(
                &mut lb,
                ingress,
                &desc,
                &reply,
                XDP_TX,
                &restored(&reply, &pkt).frame(),
            );
            assert_checksums(&r.output, &desc);
        }
    });
}

/// The NAT source port of a translated IPv4 TCP or UDP frame.
fn sport_of(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[14 + 20], frame[14 + 21]])
}

/// The reply key of a translation towards the IPv4 backend `backend:bport` on `port`.
fn reply_key(backend: &str, bport: u16, port: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: lb_tests::packet::addr16(backend.parse().unwrap()),
        dst: lb_tests::packet::addr16(NODE_V4.parse().unwrap()),
        src_port: bport.to_be(),
        dst_port: port.to_be(),
        proto,
        family: lb_common::FAMILY_V4,
        _pad: [0; 2],
    }
}

#[test]
fn ten_port_range_ten_abandoned_connections_an_eleventh_client_gets_a_port_after_the_idle_timeout()
{
    let net = FibNet::new("nat-idle");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        lb.set_nat(20000, 20009, 10_000_000_000, 2_000_000_000);
        let idle = Duration::from_millis(300);
        lb.set_tcp_idle_timeout(idle.as_nanos() as u64);
        // Ten connections established (the client's ACK after the backend's SYN-ACK), then
        // abandoned: no FIN, no RST.
        let first = std::time::Instant::now();
        for i in 0..10u16 {
            let syn = Pkt::tcp(CLIENT4, 30000 + i, V4, 80, LB0_MAC);
            let r = lb.run(&syn.frame(), ingress);
            assert_eq!(r.action, XDP_TX, "connection {i} gets a port");
            establish(&mut lb, ingress, &syn, sport_of(&r.output));
        }
        let late = Pkt::tcp("198.51.100.99", 40000, V4, 80, LB0_MAC);
        let before = lb.counters();
        let started = std::time::Instant::now();
        let r = lb.run(&late.frame(), ingress);
        assert_eq!(r.action, XDP_DROP, "all ten ports are held");
        assert_eq!(delta(&mut lb, &before, Counter::DropNatPortsExhausted), 1);
        // Poll: the client retransmits its SYN until one gets through.
        let deadline = started + idle + Duration::from_secs(5);
        let r = loop {
            let r = lb.run(&late.frame(), ingress);
            if r.action == XDP_TX || std::time::Instant::now() > deadline {
                break r;
            }
            sleep(Duration::from_millis(20));
        };
        assert_eq!(
            action_name(r.action),
            "XDP_TX",
            "no port freed within {:?} of an idle timeout of {idle:?}",
            deadline - started
        );
        // The program's clock (CLOCK_MONOTONIC_COARSE) ticks once a jiffy (at most 10 ms).
        assert!(
            first.elapsed() + Duration::from_millis(10) >= idle,
            "a port was freed {:?} after the first connection's last packet, before the idle timeout",
            first.elapsed()
        );
        let port = sport_of(&r.output);
        assert!((20000..=20009).contains(&port));
        let out = translated(&late, port, TX_V4, 8080);
        assert_eq!(hex(&r.output), hex(&out.frame()));
        let synack = reply_to(
            &out,
            L4::Tcp {
                flags: TCP_SYN | TCP_ACK,
            },
        );
        expect(
            &mut lb,
            ingress,
            "the port's replies go to the new client",
            &synack,
            XDP_TX,
            &restored(&synack, &late).frame(),
        );
    });
}

#[test]
fn port_search_at_90_percent_occupancy_fails_at_most_one_new_flow_in_a_thousand() {
    const PORTS: u16 = 1000;
    const NEW_FLOWS: u32 = 10_000;
    let net = FibNet::new("nat-occ");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        lb.set_nat(20000, 20000 + PORTS - 1, 10_000_000_000, 2_000_000_000);
        let client = |i: u32| {
            let a = format!("198.51.{}.{}", 100 + i / 60_000 % 2, i % 250 + 1);
            Pkt::tcp(&a, 1024 + (i / 250 % 60_000) as u16, V4, 80, LB0_MAC)
        };
        // 90 % of the backend's ports held by live translations.
        let live = PORTS as u32 * 9 / 10;
        for i in 0..live {
            let r = lb.run(&client(i).frame(), ingress);
            assert_eq!(r.action, XDP_TX, "filling: flow {i}");
        }
        // New flows at that occupancy; each one's translation is removed again (one closes as
        // one opens), so every new flow meets exactly 90 %.
        let before = lb.counters();
        let (mut failed, mut spent) = (0u32, Duration::ZERO);
        for i in live..live + NEW_FLOWS {
            let syn = client(i);
            let r = lb.run(&syn.frame(), ingress);
            spent += r.duration;
            if r.action != XDP_TX {
                failed += 1;
                continue;
            }
            let rkey = reply_key(TX_V4, 8080, sport_of(&r.output), IPPROTO_TCP);
            lb.remove_nat(&syn.flow_key(), &rkey);
        }
        assert_eq!(
            delta(&mut lb, &before, Counter::DropNatPortsExhausted),
            failed as u64,
            "every failure is counted"
        );
        eprintln!(
            "90 % occupancy: {failed} of {NEW_FLOWS} new flows failed; {:?} per new flow",
            spent / NEW_FLOWS
        );
        assert!(
            failed * 1000 <= NEW_FLOWS,
            "{failed} of {NEW_FLOWS} new flows found no port at 90 % occupancy"
        );
    });
}

/// Waits until both racing threads reach `round` (spinning: each is pinned to its own CPU, and
/// a futex wake-up would let them drift microseconds apart).
fn rendezvous(arrived: &std::sync::atomic::AtomicU32, round: u32) {
    use std::sync::atomic::Ordering;
    arrived.fetch_add(1, Ordering::SeqCst);
    while arrived.load(Ordering::SeqCst) < 2 * (round + 1) {
        std::hint::spin_loop();
    }
}

#[test]
fn two_cpus_allocating_the_same_candidate_ports_never_give_one_port_to_two_clients() {
    const ROUNDS: u32 = 500;
    const PORTS: u16 = 2;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "the race needs two CPUs, this machine has {cpus}"
    );
    let net = FibNet::new("nat-race");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = Lb::load(Sizes {
            table_size: 13,
            max_vips: ROUNDS,
            // One member per VIP (each round's VIP has the one backend).
            max_backends: ROUNDS,
            flow_table_size: 8 * ROUNDS,
            affinity_table_size: 64,
            nat_table_size: 8 * ROUNDS,
        });
        lb.set_node(Some(NODE_V4), Some(NODE_V6), 30_000_000_000);
        // Two ports, no close grace: a closed translation is free once the clock ticks.
        lb.set_nat(20000, 20000 + PORTS - 1, 0, 2_000_000_000);
        lb.set_backend_port(1, TX_V4, 0, true);
        // Round r is a VIP port of its own, so its translations (towards backend port r) start
        // afresh. Odd rounds find both ports held by closed translations, to be taken over.
        let vip_port = |r: u32| 1000 + r as u16;
        for r in 0..ROUNDS {
            let vip = VipValue {
                id: r,
                flags: 0,
                affinity_timeout_s: 0,
                mode: MODE_NAT,
                table_size: 0,
            };
            lb.add_vip(vip_key(V4, vip_port(r), IPPROTO_TCP), vip);
            lb.set_ring(r, |_| 1);
            for k in 0..(r % 2) * 2 {
                let old = Pkt::tcp(
                    &format!("198.51.100.{}", 200 + k),
                    999,
                    V4,
                    vip_port(r),
                    LB0_MAC,
                );
                assert_eq!(
                    lb.run(&old.frame(), ingress).action,
                    XDP_TX,
                    "round {r}: old flow"
                );
                let rst = old.with(|p| {
                    p.l4 = L4::Tcp {
                        flags: TCP_RST | TCP_ACK,
                    }
                });
                assert_eq!(
                    lb.run(&rst.frame(), ingress).action,
                    XDP_TX,
                    "round {r}: RST"
                );
            }
        }
        sleep(Duration::from_millis(20));
        // Each thread, on its own CPU, sends two new clients' SYNs per round: four clients
        // want the round's two ports at the same moment.
        let client = |cpu: usize, k: usize, r: u32| {
            Pkt::tcp(
                &format!("198.51.100.{}", 10 + cpu * 2 + k),
                2000,
                V4,
                vip_port(r),
                LB0_MAC,
            )
        };
        let arrived = std::sync::atomic::AtomicU32::new(0);
        let before = lb.counters();
        let prog = lb.xdp(lb_userspace::kernel::program::PROGRAM);
        let got: Vec<Vec<(u32, Pkt, u16)>> = std::thread::scope(|sc| {
            let racers: Vec<_> = (0..2)
                .map(|cpu| {
                    let (prog, arrived) = (&*prog, &arrived);
                    sc.spawn(move || {
                        lb_tests::harness::pin_to_cpu(cpu);
                        let mut got = Vec::new();
                        for r in 0..ROUNDS {
                            rendezvous(arrived, r);
                            for k in 0..2 {
                                let syn = client(cpu, k, r);
                                let run = lb_tests::harness::test_run(prog, &syn.frame(), ingress);
                                if run.action == XDP_TX {
                                    got.push((r, syn, sport_of(&run.output)));
                                }
                            }
                        }
                        got
                    })
                })
                .collect();
            racers
                .into_iter()
                .map(|t| t.join().expect("racing thread"))
                .collect()
        });
        // A port may go to a second client only by taking over the first one's half-open
        // translation (four clients, two ports: the late ones reclaim), each such takeover
        // counted once: a port given twice by the race itself would be one takeover too many.
        let mut takers: std::collections::BTreeMap<(u32, u16), Vec<Pkt>> = Default::default();
        for (r, syn, port) in got.into_iter().flatten() {
            takers.entry((r, port)).or_default().push(syn);
        }
        let reclaimed = delta(&mut lb, &before, Counter::NatHalfOpenReclaimed);
        let extra: u64 = takers.values().map(|t| t.len() as u64 - 1).sum();
        assert_eq!(
            extra, reclaimed,
            "ports given more than once ({takers:?}) against takeovers counted"
        );
        assert_eq!(
            takers.len(),
            (ROUNDS * PORTS as u32) as usize,
            "every port was taken"
        );
        // And each port's replies go to the client whose translation holds it now, one of
        // those that got it.
        for ((r, port), got) in &takers {
            let rkey = reply_key(TX_V4, vip_port(*r), *port, IPPROTO_TCP);
            let holder = lb.nat_reverse(&rkey).expect("a translation holds the port");
            let syn = got
                .iter()
                .find(|p| p.flow_key() == holder.client)
                .unwrap_or_else(|| panic!("round {r} port {port}: held by none of {got:?}"));
            let out = translated(syn, *port, TX_V4, vip_port(*r));
            let ack = reply_to(
                &out,
                L4::Tcp {
                    flags: TCP_SYN | TCP_ACK,
                },
            );
            expect(
                &mut lb,
                ingress,
                &format!("round {r} port {port}"),
                &ack,
                XDP_TX,
                &restored(&ack, syn).frame(),
            );
        }
    });
}

#[test]
fn translated_packet_over_the_route_mtu_gets_fragmentation_needed_quoting_it_as_sent() {
    // A NAT VIP whose backend sits behind a route with MTU 600: NAT adds no header, so the
    // client is told 600, and the reply quotes its packet untranslated.
    let net = FibNet::new("nat-mtu");
    net.ns.run(|| {
        let mut lb = setup();
        lb.set_backend_port(5, SMALL_MTU_V4, 0, true);
        lb.add_vip(
            vip_key(V4, 8000, IPPROTO_TCP),
            VipValue {
                id: 4,
                flags: 0,
                affinity_timeout_s: 0,
                mode: MODE_NAT,
                table_size: 0,
            },
        );
        lb.set_ring(4, |_| 5);
        lb.add_tx_port(net.lb1);
        let fits = Pkt::tcp(CLIENT4, 40000, V4, 8000, LB0_MAC).with(|p| p.payload = vec![7; 560]);
        let too_big = fits.clone().with(|p| p.payload = vec![7; 561]);
        let before = lb.counters();
        let r = lb.run(&fits.frame(), net.lb0);
        assert_eq!(
            action_name(r.action),
            action_name(XDP_REDIRECT),
            "600 bytes fit"
        );
        let want = packet::too_big_reply(&too_big, 600, GW0_MAC, LB0_MAC);
        expect(&mut lb, net.lb0, "601 bytes", &too_big, XDP_TX, &want);
        assert_eq!(delta(&mut lb, &before, Counter::DropTooBig), 1);
        assert_eq!(delta(&mut lb, &before, Counter::IcmpTooBigSent), 1);
    });
}

/// The backend's data reply on `sent`'s translation, `len` bytes of IP packet.
fn data_reply(sent: &Pkt, len: usize) -> Pkt {
    reply_to(sent, L4::Tcp { flags: TCP_ACK }).with(|p| p.payload = vec![9; len - 40])
}

#[test]
fn a_reply_longer_than_any_remembered_is_routed_anew_so_one_over_the_route_mtu_is_refused() {
    // The client sits behind lb1's route with MTU 600. The route of its first (short) reply is
    // remembered; a 600-byte reply is routed anew and fits, a 601-byte one gets fragmentation
    // needed (sent to the backend) however fresh the remembered route.
    let net = FibNet::new("nat-rr-mtu");
    net.ns.run(|| {
        let mut lb = setup();
        lb.add_tx_port(net.lb1);
        lb.refill_icmp_buckets();
        let syn = Pkt::tcp("10.6.0.9", 40000, V4, 80, LB0_MAC);
        let port = open(&mut lb, net.lb0, &syn);
        let sent = translated(&syn, port, TX_V4, 8080);
        for (len, action) in [(60, XDP_REDIRECT), (600, XDP_REDIRECT), (601, XDP_TX)] {
            let before = lb.counters();
            let r = lb.run(&data_reply(&sent, len).frame(), net.lb0);
            assert_eq!(
                action_name(r.action),
                action_name(action),
                "{len}-byte reply"
            );
            let too_big = delta(&mut lb, &before, Counter::DropTooBig);
            assert_eq!(
                too_big,
                (len > 600) as u64,
                "{len}-byte reply: drop_too_big"
            );
        }
        let client: Ipv4Addr = "10.6.0.9".parse().unwrap();
        let remembered: Vec<_> = lb
            .reply_routes()
            .into_iter()
            .filter(|e| e.dst[..4] == client.octets())
            .collect();
        assert!(
            remembered
                .iter()
                .any(|e| e.fits == 600 && e.dmac == GW1_MAC),
            "the route to the client, known to fit 600 bytes: {remembered:?}"
        );
    });
}

#[test]
fn a_remembered_reply_route_follows_a_neighbour_change_within_two_seconds() {
    let net = FibNet::new("nat-rr-neigh");
    net.ns.run(|| {
        let mut lb = setup();
        let syn = Pkt::tcp(CLIENT4, 40001, V4, 80, LB0_MAC);
        let port = open(&mut lb, net.lb0, &syn);
        let reply = data_reply(&translated(&syn, port, TX_V4, 8080), 100);
        let r = lb.run(&reply.frame(), net.lb0);
        assert_eq!(
            (action_name(r.action), &r.output[..6]),
            ("XDP_TX", &GW0_MAC[..])
        );
        const NEW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfd];
        net.ns
            .script("neigh replace 10.0.0.2 lladdr 02:00:00:00:00:fd dev lb0 nud permanent");
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let followed = loop {
            let r = lb.run(&reply.frame(), net.lb0);
            assert_eq!(action_name(r.action), "XDP_TX");
            if r.output[..6] == NEW_MAC {
                break true;
            }
            if std::time::Instant::now() > deadline {
                break false;
            }
            sleep(Duration::from_millis(20));
        };
        assert!(followed, "replies still go to the old neighbour after 2 s");
    });
}

#[test]
fn a_refused_connection_also_frees_its_client_from_affinity() {
    let net = FibNet::new("nat-affref");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        // VIP 4: NAT with session affinity over B4_MAPPED and B4, alternating slots.
        lb.add_vip(
            vip_key(V4, 8001, IPPROTO_TCP),
            VipValue {
                id: 4,
                flags: 0,
                affinity_timeout_s: 300,
                mode: MODE_NAT,
                table_size: 0,
            },
        );
        lb.set_ring(4, |s| if s % 2 == 0 { B4_MAPPED.0 } else { B4.0 });
        let addr_of = |b: u32| if b == B4_MAPPED.0 { TX_V4 } else { TX_V4_B };
        let table = |lb: &mut Lb, p: &Pkt| {
            let m = lb.ring_backend(4, flow_hash(&p.flow_key()));
            lb.backend_of(m)
        };
        let syn = Pkt::tcp(CLIENT4, 44000, V4, 8001, LB0_MAC);
        let held = table(&mut lb, &syn);
        let r = lb.run(&syn.frame(), ingress);
        assert_eq!(action_name(r.action), action_name(XDP_TX));
        let o = &r.output;
        let to: IpAddr = Ipv4Addr::from(<[u8; 4]>::try_from(&o[30..34]).unwrap()).into();
        assert_eq!(to.to_string(), addr_of(held));
        let akey = lb_tests::harness::affinity_key(&syn, 4);
        assert!(
            lb.affinity(&akey).is_some(),
            "the SYN made an affinity entry"
        );

        // The backend refuses it (RST to the node's NAT port).
        let (nat_port, bport) = (sport_of(o), u16::from_be_bytes([o[36], o[37]]));
        let rst = Pkt::tcp(addr_of(held), bport, NODE_V4, nat_port, LB0_MAC).with(|p| {
            p.l4 = L4::Tcp {
                flags: TCP_RST | TCP_ACK,
            }
        });
        let before = lb.counters();
        lb.run(&rst.frame(), ingress);
        assert_eq!(delta(&mut lb, &before, Counter::NatRefused), 1);
        assert!(
            lb.affinity(&akey).is_none(),
            "the refusal kept the client's affinity"
        );

        // The client's next connection goes where the table says, not back to the refuser.
        let next = (44001..45000)
            .map(|p| Pkt::tcp(CLIENT4, p, V4, 8001, LB0_MAC))
            .find(|p| table(&mut lb, p) != held)
            .unwrap();
        let r = lb.run(&next.frame(), ingress);
        let to: IpAddr = Ipv4Addr::from(<[u8; 4]>::try_from(&r.output[30..34]).unwrap()).into();
        assert_ne!(
            to.to_string(),
            addr_of(held),
            "the next connection went back to the refuser"
        );
    });
}

/// A full-size TCP segment (1500 bytes of IP) of the client's connection `syn` opened.
fn full_size(syn: &Pkt) -> Pkt {
    let hdr = if syn.src.is_ipv4() { 20 } else { 40 };
    syn.clone().with(|p| {
        p.l4 = L4::Tcp { flags: TCP_ACK };
        p.payload = vec![0x3c; 1500 - hdr - 20];
    })
}

#[test]
fn fragmentation_needed_from_the_backend_path_reaches_the_client_translated_back() {
    let net = FibNet::new("nat-icmp");
    let ingress = net.lb0;
    let router4 = "10.1.255.254";
    let router6 = "fd01::fe";
    net.ns.run(|| {
        let mut lb = setup();
        let cases = [
            (
                "IPv4 fragmentation needed",
                Pkt::tcp(CLIENT4, 44000, V4, 80, LB0_MAC),
                B4_MAPPED,
                router4,
                IcmpError::FragNeeded(1400),
            ),
            (
                "ICMPv6 packet too big",
                Pkt::tcp(CLIENT6, 44000, V6, 443, LB0_MAC),
                B6_MAPPED,
                router6,
                IcmpError::PacketTooBig(1400),
            ),
        ];
        for (desc, syn, (_, backend, bport), router, kind) in cases {
            let port = first_port(&mut lb, &syn);
            expect(
                &mut lb,
                ingress,
                desc,
                &syn,
                XDP_TX,
                &translated(&syn, port, backend, bport).frame(),
            );
            let seg = full_size(&syn);
            let out = translated(&seg, port, backend, bport);
            expect(&mut lb, ingress, desc, &seg, XDP_TX, &out.frame());
            let before = lb.counters();
            let back = icmp_restored(kind, &seg, &out);
            let r = lb.run(&icmp_error(kind, router, &out), ingress);
            assert_eq!(
                (action_name(r.action), hex(&r.output)),
                (action_name(XDP_TX), hex(&back)),
                "{desc}: translated back for the client"
            );
            assert_eq!(
                delta(&mut lb, &before, Counter::NatIcmpReverse),
                1,
                "{desc}"
            );
            assert_eq!(delta(&mut lb, &before, Counter::Tx), 1, "{desc}");
        }
    });
}

#[test]
fn icmp_error_quoting_only_eight_bytes_of_tcp_is_translated_back_without_the_tcp_checksum() {
    let net = FibNet::new("nat-icmp8");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        let syn = Pkt::tcp(CLIENT4, 44100, V4, 80, LB0_MAC);
        let port = first_port(&mut lb, &syn);
        let out = translated(&syn, port, TX_V4, 8080);
        expect(&mut lb, ingress, "SYN", &syn, XDP_TX, &out.frame());
        // RFC 792: the IP header and the first 8 bytes of its payload (the ports, the sequence).
        let kind = IcmpError::FragNeeded(1400);
        let error = packet::icmp_error(
            kind,
            "10.1.255.254".parse().unwrap(),
            NODE_V4.parse().unwrap(),
            60,
            &out.ip_bytes()[..28],
            LB0_MAC,
            GW0_MAC,
        );
        let as_sent = syn.clone().with(|p| p.ttl = out.ttl);
        let back = packet::icmp_error(
            kind,
            syn.dst,
            syn.src,
            59,
            &as_sent.ip_bytes()[..28],
            GW0_MAC,
            LB0_MAC,
        );
        let r = lb.run(&error, ingress);
        assert_eq!(
            (action_name(r.action), hex(&r.output)),
            (action_name(XDP_TX), hex(&back))
        );
    });
}

#[test]
fn icmp_error_about_no_live_translation_passes_untouched() {
    let net = FibNet::new("nat-icmp-none");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        // A packet from the node's address and a NAT port no translation holds.
        let never = translated(
            &Pkt::tcp(CLIENT4, 44200, V4, 80, LB0_MAC),
            2000,
            TX_V4,
            8080,
        );
        let error = icmp_error(IcmpError::FragNeeded(1400), "10.1.255.254", &never);
        let before = lb.counters();
        let r = lb.run(&error, ingress);
        assert_eq!(
            (action_name(r.action), hex(&r.output)),
            (action_name(XDP_PASS), hex(&error))
        );
        assert_eq!(delta(&mut lb, &before, Counter::PassNotForVip), 1);
        assert_eq!(delta(&mut lb, &before, Counter::NatIcmpReverse), 0);
    });
}

#[test]
fn time_exceeded_about_translated_udp_reaches_the_client_translated_back() {
    let net = FibNet::new("nat-icmp-udp");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        let cases = [
            (
                "IPv4 UDP",
                Pkt::udp(CLIENT4, 45000, V4, 53, LB0_MAC),
                TX_V4_B,
                "10.1.255.254",
            ),
            (
                "IPv4 UDP without checksum (zero stays zero)",
                Pkt::udp(CLIENT4, 45001, V4, 53, LB0_MAC).with(|p| p.udp_checksum = false),
                TX_V4_B,
                "10.1.255.254",
            ),
            (
                "IPv6 UDP",
                Pkt::udp(CLIENT6, 45000, V6, 53, LB0_MAC),
                TX_V6_B,
                "fd01::fe",
            ),
        ];
        for (desc, dgram, backend, router) in cases {
            let port = first_port(&mut lb, &dgram);
            let out = translated(&dgram, port, backend, 53);
            expect(&mut lb, ingress, desc, &dgram, XDP_TX, &out.frame());
            let kind = IcmpError::TimeExceeded;
            let back = icmp_restored(kind, &dgram, &out);
            let r = lb.run(&icmp_error(kind, router, &out), ingress);
            assert_eq!(
                (action_name(r.action), hex(&r.output)),
                (action_name(XDP_TX), hex(&back)),
                "{desc}: translated back for the client"
            );
        }
    });
}
