//! Packet fixtures: each runs one frame through the XDP program with `BPF_PROG_TEST_RUN` and
//! checks the action, the exact output bytes and the verdict counter.
//!
//! All of them run inside a namespace ([`FibNet`]) whose routes give each backend address a known
//! fate in `bpf_fib_lookup`, so the MAC addresses in the expected output are fixed, and so the
//! TX, redirect, no-neighbour, local, MTU and unreachable paths all run for real on veth pairs.

use std::net::IpAddr;

use etherparse::{IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, TcpHeader};
use lb_common::{
    Counter, IPPROTO_TCP, IPPROTO_UDP, MEMBER_F_ACCEPTS, MEMBER_F_LIVE, MEMBER_F_REJECT, MODE_DSR,
    VIP_F_HASH_SRC_ONLY, VipValue,
};
use lb_tests::{
    harness::{
        self, FibNet, Lb, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, action_name, net::*, vip_key,
    },
    hex,
    packet::{self, L4, Pkt, TCP_ACK, TCP_FIN, TCP_RST, ext},
};
use lb_userspace::kernel::program::Sizes;

/// Maglev table size for these tests: prime, small enough to fill quickly.
const M: u32 = 1009;

/// What the program should make of one frame.
struct Fixture {
    desc: &'static str,
    input: Vec<u8>,
    action: u32,
    /// Expected output frame, byte for byte.
    output: Vec<u8>,
    verdict: Counter,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The frame `pkt` becomes when encapsulated to `backend` and sent to next hop `gw` from `dev`.
fn encap(pkt: &Pkt, backend: &str, gw: [u8; 6], dev: [u8; 6]) -> Vec<u8> {
    let b = ip(backend);
    let src = if b.is_ipv4() { NODE_V4 } else { NODE_V6 };
    packet::encapsulated(pkt, gw, dev, ip(src), b)
}

/// Encapsulated but handed to the kernel: the MACs stay as received.
fn encap_kept_macs(pkt: &Pkt, backend: &str) -> Vec<u8> {
    encap(pkt, backend, pkt.eth_dst, pkt.eth_src)
}

fn untouched(desc: &'static str, pkt: &Pkt, action: u32, verdict: Counter) -> Fixture {
    raw(desc, pkt.frame(), action, verdict)
}

fn raw(desc: &'static str, frame: Vec<u8>, action: u32, verdict: Counter) -> Fixture {
    Fixture {
        desc,
        output: frame.clone(),
        input: frame,
        action,
        verdict,
    }
}

/// Not forwarded: answered with an ICMP too big (MTU `mtu`), which leaves back out of the
/// uplink towards the client.
fn too_big_tx(desc: &'static str, pkt: &Pkt, mtu: u32) -> Fixture {
    Fixture {
        desc,
        input: pkt.frame(),
        action: XDP_TX,
        output: packet::too_big_reply(pkt, mtu, GW0_MAC, LB0_MAC),
        verdict: Counter::DropTooBig,
    }
}

/// Answered with an ICMP too big (MTU `mtu`) that goes to the kernel (no neighbour entry for
/// the client's next hop) with the MAC addresses the packet came with.
fn too_big_kept(desc: &'static str, pkt: &Pkt, mtu: u32) -> Fixture {
    Fixture {
        desc,
        input: pkt.frame(),
        action: XDP_PASS,
        output: packet::too_big_reply(pkt, mtu, pkt.eth_dst, pkt.eth_src),
        verdict: Counter::DropTooBig,
    }
}

/// Clears DF on an IPv4 packet.
fn no_df(p: &mut Pkt) {
    p.v4_df = false;
}

/// `pkt`'s frame with `bytes` written at `off` into its TCP or UDP header (checksums are left
/// as they were: the program must reject the header before it would look at them).
fn with_l4_bytes(pkt: &Pkt, off: usize, bytes: &[u8]) -> Vec<u8> {
    let mut f = pkt.frame();
    let l4 = 14 + if pkt.src.is_ipv4() { 20 } else { 40 };
    f[l4 + off..l4 + off + bytes.len()].copy_from_slice(bytes);
    f
}

fn tx(desc: &'static str, pkt: Pkt, backend: &str) -> Fixture {
    Fixture {
        desc,
        input: pkt.frame(),
        action: XDP_TX,
        output: encap(&pkt, backend, GW0_MAC, LB0_MAC),
        verdict: Counter::Tx,
    }
}

struct Vip {
    addr: &'static str,
    port: u16,
    proto: u8,
    flags: u32,
    mode: u32,
    /// Every slot of the VIP's table points at this backend id (None: no backends).
    backend: Option<u32>,
}

const V4: &str = "192.0.2.10";
const V6: &str = "2001:db8::10";
const CLIENT4: &str = "198.51.100.7";
const CLIENT6: &str = "2001:db8:c::7";

/// Backend ids used by the fixtures.
const BACKENDS: &[(u32, &str)] = &[
    (1, TX_V4),
    (2, TX_V4_B),
    (3, TX_V6),
    (4, REDIRECT_V4),
    (5, REDIRECT_V6),
    (6, NO_NEIGH_V4),
    (7, NO_NEIGH_V6),
    (8, UNREACHABLE_V4),
    (9, LOCAL_V4),
    (10, SMALL_MTU_V4),
    (11, NO_TX_PORT_V4),
    (12, SMALL_MTU_V6),
    (13, UNREACHABLE_V6),
    (15, "0.0.0.0"),
    (16, "::"),
];

/// VIPs (by id) whose every slot names a rejecting member (`MEMBER_F_REJECT`), and its backend.
const REJECTING: &[(u32, u32)] = &[(19, 15), (20, 15), (21, 16), (22, 16)];

fn vips() -> Vec<Vip> {
    let v = |addr, port, proto, backend| Vip {
        addr,
        port,
        proto,
        flags: 0,
        mode: MODE_DSR,
        backend,
    };
    vec![
        v(V4, 80, IPPROTO_TCP, Some(1)),              // 0
        v(V4, 53, IPPROTO_UDP, Some(1)),              // 1
        v(V6, 80, IPPROTO_TCP, Some(3)),              // 2
        v(V6, 53, IPPROTO_UDP, Some(3)),              // 3
        v("192.0.2.11", 80, IPPROTO_TCP, Some(3)),    // 4: IPv4 in IPv6
        v("2001:db8::11", 80, IPPROTO_TCP, Some(1)),  // 5: IPv6 in IPv4
        v("192.0.2.12", 80, IPPROTO_TCP, Some(4)),    // 6
        v("2001:db8::12", 80, IPPROTO_TCP, Some(5)),  // 7
        v("192.0.2.13", 80, IPPROTO_TCP, Some(6)),    // 8
        v("2001:db8::13", 80, IPPROTO_TCP, Some(7)),  // 9
        v("192.0.2.14", 80, IPPROTO_TCP, Some(8)),    // 10
        v("192.0.2.15", 80, IPPROTO_TCP, Some(9)),    // 11
        v("192.0.2.16", 80, IPPROTO_TCP, Some(10)),   // 12
        v("192.0.2.17", 80, IPPROTO_TCP, Some(11)),   // 13
        v("192.0.2.18", 80, IPPROTO_TCP, None),       // 14: no backends
        v("192.0.2.19", 80, IPPROTO_TCP, Some(1)),    // 15 (NAT mode: see tests/nat.rs)
        v("2001:db8::16", 80, IPPROTO_TCP, Some(12)), // 16
        Vip {
            flags: VIP_F_HASH_SRC_ONLY,
            ..v("192.0.2.20", 80, IPPROTO_TCP, Some(2))
        }, // 17
        v("2001:db8::14", 80, IPPROTO_TCP, Some(13)), // 18
        v("192.0.2.21", 80, IPPROTO_TCP, Some(15)),   // 19: rejecting (see REJECTING)
        v("192.0.2.21", 53, IPPROTO_UDP, Some(15)),   // 20
        v("2001:db8::21", 80, IPPROTO_TCP, Some(16)), // 21
        v("2001:db8::21", 53, IPPROTO_UDP, Some(16)), // 22
    ]
}

/// Loads the program with the VIPs and backends above. Call it inside `net`'s namespace: the
/// devmap resolves interface indexes there.
fn setup(net: &FibNet) -> Lb {
    let mut lb = Lb::load(Sizes {
        table_size: M,
        max_vips: 32,
        max_backends: 64,
        flow_table_size: 4096,
        affinity_table_size: 1024,
        nat_table_size: 1024,
    });
    lb.set_node(Some(NODE_V4), Some(NODE_V6), 0);
    for &(id, addr) in BACKENDS {
        lb.set_backend(id, addr, true);
    }
    for (id, v) in vips().into_iter().enumerate() {
        let id = id as u32;
        lb.add_vip(
            vip_key(v.addr, v.port, v.proto),
            VipValue {
                id,
                flags: v.flags,
                affinity_timeout_s: 0,
                mode: v.mode,
                table_size: 0,
            },
        );
        match v.backend {
            Some(b) => lb.set_ring(id, |_| b),
            None => lb.clear_ring(id),
        }
    }
    for &(vip_id, backend) in REJECTING {
        let m = lb.member(vip_id, backend);
        lb.write_member(
            m,
            vip_id,
            backend,
            MEMBER_F_LIVE | MEMBER_F_ACCEPTS | MEMBER_F_REJECT,
            1,
        );
    }
    lb.add_tx_port(net.lb1);
    lb
}

/// The reset (RFC 793) the program should answer `pkt` with, built by etherparse: back to the
/// MAC it came from, addresses and ports swapped, `seq`, and `ack` if `Some` (with the ACK flag),
/// no options, window 0, TTL 64, IPv4 with DF and identification 0.
fn reset_frame(pkt: &Pkt, seq: u32, ack: Option<u32>) -> Vec<u8> {
    let mut tcp = TcpHeader::new(pkt.dport, pkt.sport, seq, 0);
    tcp.rst = true;
    if let Some(a) = ack {
        tcp.ack = true;
        tcp.acknowledgment_number = a;
    }
    let mut out = Vec::new();
    out.extend_from_slice(&pkt.eth_src);
    out.extend_from_slice(&pkt.eth_dst);
    if let Some(tci) = pkt.vlan {
        out.extend_from_slice(&0x8100u16.to_be_bytes());
        out.extend_from_slice(&tci.to_be_bytes());
    }
    match (pkt.dst, pkt.src) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = Ipv4Header::new(20, 64, IpNumber::TCP, s.octets(), d.octets()).unwrap();
            ip.dont_fragment = true;
            ip.header_checksum = ip.calc_header_checksum();
            tcp.checksum = tcp.calc_checksum_ipv4(&ip, &[]).unwrap();
            out.extend_from_slice(&ip.to_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&0x86ddu16.to_be_bytes());
            let ip = Ipv6Header {
                traffic_class: 0,
                flow_label: Ipv6FlowLabel::ZERO,
                payload_length: 20,
                next_header: IpNumber::TCP,
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
            };
            tcp.checksum = tcp.calc_checksum_ipv6(&ip, &[]).unwrap();
            out.extend_from_slice(&ip.to_bytes());
        }
        _ => panic!("mixed address families"),
    }
    out.extend_from_slice(&tcp.to_bytes());
    out
}

fn reset(desc: &'static str, pkt: Pkt, seq: u32, ack: Option<u32>) -> Fixture {
    Fixture {
        desc,
        output: reset_frame(&pkt, seq, ack),
        input: pkt.frame(),
        action: XDP_TX,
        verdict: Counter::TxReset,
    }
}

/// Packets Maglev gives to a rejecting member. The SYNs carry the builder's sequence number
/// 0x01020304 and 8 bytes of data ("hello lb"), so the reset acknowledges 0x01020304 + 8 + 1.
fn rejecting_fixtures() -> Vec<Fixture> {
    let to = LB0_MAC;
    let syn4 = Pkt::tcp(CLIENT4, 40000, "192.0.2.21", 80, to);
    let syn6 = Pkt::tcp(CLIENT6, 40000, "2001:db8::21", 80, to);
    let isn = 0x0102_0304u32;
    vec![
        reset(
            "IPv4 SYN to a rejected share: RST+ACK acknowledging the SYN and its data",
            syn4.clone(),
            0,
            Some(isn + 9),
        ),
        reset(
            "IPv6 SYN to a rejected share: RST+ACK",
            syn6.clone(),
            0,
            Some(isn + 9),
        ),
        reset(
            "IPv4 SYN without data, with options, behind a VLAN tag: the reset keeps the tag, \
             drops the options and the Ethernet padding",
            syn4.clone().with(|p| {
                p.payload.clear();
                p.vlan = Some(0x0064);
                p.v4_options = vec![0x01; 8];
                p.trailer = vec![0; 6];
            }),
            0,
            Some(isn + 1),
        ),
        reset(
            "mid-stream IPv4 ACK that missed the flow table: RST from its ACK field, no ACK flag",
            syn4.clone().with(|p| p.l4 = L4::Tcp { flags: TCP_ACK }),
            0x0a0b_0c0d,
            None,
        ),
        reset(
            "IPv6 FIN without ACK: RST+ACK counting the FIN",
            syn6.clone().with(|p| {
                p.l4 = L4::Tcp { flags: TCP_FIN };
                p.payload.clear();
            }),
            0,
            Some(isn + 1),
        ),
        untouched(
            "a RST to a rejected share is never answered: dropped",
            &syn4.clone().with(|p| p.l4 = L4::Tcp { flags: TCP_RST }),
            XDP_DROP,
            Counter::DropRejected,
        ),
        untouched(
            "IPv4 UDP to a rejected share: dropped",
            &Pkt::udp(CLIENT4, 5353, "192.0.2.21", 53, to),
            XDP_DROP,
            Counter::DropRejected,
        ),
        untouched(
            "IPv6 UDP to a rejected share: dropped",
            &Pkt::udp(CLIENT6, 5353, "2001:db8::21", 53, to),
            XDP_DROP,
            Counter::DropRejected,
        ),
    ]
}

/// A rejecting member takes no flow and no affinity entry: every attempt is judged afresh, and
/// packets to it are answered (TCP) or dropped (UDP), each counted once.
#[test]
fn packets_to_a_rejected_share_are_reset_or_dropped_and_never_recorded() {
    let net = FibNet::new("reject");
    let ingress = net.lb0;
    let fixtures = rejecting_fixtures();
    net.ns.run(|| {
        let mut lb = setup(&net);
        for fx in &fixtures {
            let _ = check(&mut lb, fx, ingress);
        }
        for fx in &fixtures {
            let _ = check(&mut lb, fx, ingress);
        }
        assert_eq!(lb.flow_count(), 0, "a rejected attempt left a flow entry");
    });
}

fn fixtures() -> Vec<Fixture> {
    let to = LB0_MAC;
    let syn4 = Pkt::tcp(CLIENT4, 40000, V4, 80, to);
    let syn6 = Pkt::tcp(CLIENT6, 40000, V6, 80, to);
    let big = |p: Pkt, n: usize| p.with(|p| p.payload = vec![0x5a; n]);
    let mut f = vec![
        tx(
            "IPv4 TCP SYN to a VIP: IPIP to its backend, back out of the uplink",
            syn4.clone(),
            TX_V4,
        ),
        tx(
            "IPv4 UDP to a VIP",
            Pkt::udp(CLIENT4, 5353, V4, 53, to),
            TX_V4,
        ),
        tx("IPv6 TCP SYN to a VIP: IP6IP6", syn6.clone(), TX_V6),
        tx(
            "IPv6 UDP to a VIP",
            Pkt::udp(CLIENT6, 5353, V6, 53, to),
            TX_V6,
        ),
        tx(
            "IPv4 VIP with an IPv6 backend: IPv4 in IPv6",
            Pkt::tcp(CLIENT4, 40000, "192.0.2.11", 80, to),
            TX_V6,
        ),
        tx(
            "IPv6 VIP with an IPv4 backend: IPv6 in IPv4",
            Pkt::tcp(CLIENT6, 40000, "2001:db8::11", 80, to),
            TX_V4,
        ),
        tx(
            "TCP without SYN that misses the flow table still goes to its Maglev backend",
            Pkt::tcp(CLIENT4, 40001, V4, 80, to).with(|p| p.l4 = L4::Tcp { flags: TCP_ACK }),
            TX_V4,
        ),
        tx(
            "802.1Q tagged frame: balanced, tag dropped from the encapsulated frame",
            syn4.clone().with(|p| p.vlan = Some(0x0064)),
            TX_V4,
        ),
        tx(
            "IPv4 options are skipped and kept in the inner packet",
            syn4.clone()
                .with(|p| p.v4_options = vec![0x01, 0x01, 0x01, 0x00, 0x94, 0x04, 0x00, 0x00]),
            TX_V4,
        ),
        tx(
            "IPv4 with the largest header (40 bytes of options)",
            syn4.clone().with(|p| p.v4_options = vec![0x01; 40]),
            TX_V4,
        ),
        tx(
            "DSCP and ECN are copied to the outer header",
            syn4.clone().with(|p| p.tos = 0xb9),
            TX_V4,
        ),
        tx(
            "IPv6 traffic class is copied",
            syn6.clone().with(|p| p.tos = 0xb9),
            TX_V6,
        ),
        tx(
            "Ethernet padding after a short IPv4 packet is carried but not counted in lengths",
            Pkt::udp(CLIENT4, 5353, V4, 53, to).with(|p| {
                p.payload = vec![1];
                p.trailer = vec![0; 60 - 14 - 29];
            }),
            TX_V4,
        ),
        tx(
            "IPv6 hop-by-hop and destination options are walked",
            syn6.clone()
                .with(|p| p.v6_ext = vec![ext::hop_by_hop(), ext::dest_opts()]),
            TX_V6,
        ),
        tx(
            "IPv6 authentication header is walked",
            syn6.clone()
                .with(|p| p.v6_ext = vec![ext::dest_opts(), ext::ah()]),
            TX_V6,
        ),
        tx(
            "IPv6 atomic fragment (offset 0, no M flag) is not a fragment",
            Pkt::udp(CLIENT6, 5353, V6, 53, to).with(|p| p.v6_ext = vec![ext::fragment(0, false)]),
            TX_V6,
        ),
        tx(
            "a VIP hashing on source address",
            Pkt::tcp(CLIENT4, 40000, "192.0.2.20", 80, to),
            TX_V4_B,
        ),
    ];
    let redirect4 = Pkt::tcp(CLIENT4, 40000, "192.0.2.12", 80, to);
    let redirect6 = Pkt::tcp(CLIENT6, 40000, "2001:db8::12", 80, to);
    let no_neigh4 = Pkt::tcp(CLIENT4, 40000, "192.0.2.13", 80, to);
    let no_neigh6 = Pkt::tcp(CLIENT6, 40000, "2001:db8::13", 80, to);
    let unreachable4 = Pkt::tcp(CLIENT4, 40000, "192.0.2.14", 80, to);
    let unreachable6 = Pkt::tcp(CLIENT6, 40000, "2001:db8::14", 80, to);
    let local = Pkt::tcp(CLIENT4, 40000, "192.0.2.15", 80, to);
    let small_ok = Pkt::tcp(CLIENT4, 40000, "192.0.2.16", 80, to);
    let too_big = big(Pkt::tcp(CLIENT4, 40001, "192.0.2.16", 80, to), 600);
    let too_big6 = big(Pkt::tcp(CLIENT6, 40001, "2001:db8::16", 80, to), 1250);
    let fits6 = big(Pkt::tcp(CLIENT6, 40002, "2001:db8::16", 80, to), 1180);
    let no_port = Pkt::tcp(CLIENT4, 40000, "192.0.2.17", 80, to);
    let redirect = |desc, p: &Pkt, backend, gw| Fixture {
        desc,
        input: p.frame(),
        action: XDP_REDIRECT,
        output: encap(p, backend, gw, LB1_MAC),
        verdict: Counter::Redirect,
    };
    let kept = |desc, p: &Pkt, backend, action, verdict| Fixture {
        desc,
        input: p.frame(),
        action,
        output: encap_kept_macs(p, backend),
        verdict,
    };
    f.extend([
        redirect("backend behind another interface: redirect through the devmap", &redirect4, REDIRECT_V4, GW1_MAC),
        redirect("IPv6 backend behind another interface: redirect", &redirect6, REDIRECT_V6, GW1_MAC),
        kept("next hop without a neighbour entry: encapsulated, passed to the kernel with the received MACs", &no_neigh4, NO_NEIGH_V4, XDP_PASS, Counter::PassNoNeighbour),
        kept("IPv6 next hop without a neighbour entry: passed", &no_neigh6, NO_NEIGH_V6, XDP_PASS, Counter::PassNoNeighbour),
        kept("unreachable backend: dropped", &unreachable4, UNREACHABLE_V4, XDP_DROP, Counter::DropFibFailed),
        kept("unreachable IPv6 backend: dropped", &unreachable6, UNREACHABLE_V6, XDP_DROP, Counter::DropFibFailed),
        kept("backend address local to this node: passed", &local, LOCAL_V4, XDP_PASS, Counter::PassLocalBackend),
        redirect("small packet on a route with MTU 600: fits", &small_ok, SMALL_MTU_V4, GW1_MAC),
        too_big_tx("encapsulated packet over the route MTU (600): fragmentation needed, MTU 580, back to the client", &too_big, 580),
        too_big_tx("IPv6 encapsulated packet over the route MTU (1280): packet too big, MTU 1240", &too_big6, 1240),
        too_big_tx("802.1Q tagged packet over the route MTU: the reply is untagged", &too_big.clone().with(|p| p.vlan = Some(0x0064)), 580),
        too_big_kept("too big, and no neighbour entry towards the client: the reply goes to the kernel with the MACs as received", &big(Pkt::tcp("10.3.0.7", 40001, "192.0.2.16", 80, to), 600), 580),
        too_big_kept("IPv6 too big, no neighbour entry towards the client: to the kernel", &big(Pkt::tcp("fd03::7", 40001, "2001:db8::16", 80, to), 1250), 1240),
        untouched("IPv4 without DF over the route MTU: dropped, not answered", &too_big.clone().with(no_df), XDP_DROP, Counter::DropTooBig),
        redirect("IPv6 encapsulated packet of exactly the route MTU (1280): fits", &fits6, SMALL_MTU_V6, GW1_MAC),
        kept("egress interface not in the devmap: passed with the received MACs", &no_port, NO_TX_PORT_V4, XDP_PASS, Counter::PassNoTxPort),
    ]);

    // Not balanced.
    let trunc = |p: &Pkt, cut: usize| {
        let mut b = p.frame();
        b.truncate(b.len() - cut);
        b
    };
    let arp = {
        let mut b = vec![0xff; 6];
        b.extend_from_slice(&packet::ROUTER_MAC);
        b.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        b.extend_from_slice(&packet::ROUTER_MAC);
        b.extend_from_slice(&[198, 51, 100, 1, 0, 0, 0, 0, 0, 0, 192, 0, 2, 10]);
        b
    };
    let mut bad_ihl = syn4.frame();
    bad_ihl[14] = 0x44;
    let mut long_tot_len = syn4.frame();
    long_tot_len[16..18].copy_from_slice(&2000u16.to_be_bytes());
    let mut bad_doff = syn4.frame();
    bad_doff[14 + 20 + 12] = 0x40;
    // IPv4 packet whose total length covers only 10 bytes of TCP header.
    let short = |dst: &str| {
        let mut b = Pkt::tcp(CLIENT4, 40000, dst, 80, to)
            .with(|p| p.payload.clear())
            .frame();
        b.truncate(14 + 20 + 10);
        b[16..18].copy_from_slice(&30u16.to_be_bytes());
        b
    };
    let short_tcp = short(V4);
    let short_tcp_no_vip = short("203.0.113.1");
    let mut short_v6_payload = syn6.frame();
    short_v6_payload[18..20].copy_from_slice(&10u16.to_be_bytes());
    // Malformed L4 lengths inside a consistent IP packet. Eight bytes of Ethernet trailer behind
    // the IP packet, so "past the packet" means past the IP payload, not past the frame.
    let udp4 = Pkt::udp(CLIENT4, 5353, V4, 53, to).with(|p| p.trailer = vec![0; 8]);
    let udp6 = Pkt::udp(CLIENT6, 5353, V6, 53, to).with(|p| p.trailer = vec![0; 8]);
    let udp_len = |p: &Pkt, len: u16| with_l4_bytes(p, 4, &len.to_be_bytes());
    let udp_past = |p: &Pkt| udp_len(p, (8 + p.payload.len() + 1) as u16);
    let tcp4 = syn4.clone().with(|p| p.trailer = vec![0; 8]);
    let tcp6 = syn6.clone().with(|p| p.trailer = vec![0; 8]);
    // 8 words of header: 32 bytes where the packet has 20 of header and 8 of payload.
    let tcp_doff_past = |p: &Pkt| with_l4_bytes(p, 12, &[0x80]);
    let to_no_vip4 = |p: &Pkt| p.clone().with(|p| p.dst = ip("203.0.113.1"));
    f.extend([
        untouched(
            "TCP to an address that carries no VIP: passed",
            &Pkt::tcp(CLIENT4, 40000, "203.0.113.1", 80, to),
            XDP_PASS,
            Counter::PassNotForVip,
        ),
        untouched(
            "VIP address, port with no VIP: passed",
            &Pkt::tcp(CLIENT4, 40000, V4, 443, to),
            XDP_PASS,
            Counter::PassNotForVip,
        ),
        untouched(
            "VIP address and port, other protocol: passed",
            &Pkt::udp(CLIENT4, 40000, V4, 80, to),
            XDP_PASS,
            Counter::PassNotForVip,
        ),
        untouched(
            "ICMP to a VIP address: passed",
            &syn4.clone().with(|p| p.l4 = L4::Other(1)),
            XDP_PASS,
            Counter::PassNotForVip,
        ),
        raw("ARP: passed", arp, XDP_PASS, Counter::PassNotForVip),
        untouched(
            "IPv6 to no VIP: passed",
            &Pkt::tcp(CLIENT6, 40000, "2001:db8::99", 80, to),
            XDP_PASS,
            Counter::PassNotForVip,
        ),
        untouched(
            "VIP with no backends: dropped",
            &Pkt::tcp(CLIENT4, 40000, "192.0.2.18", 80, to),
            XDP_DROP,
            Counter::DropNoBackend,
        ),
        untouched(
            "IPv4 first fragment to a VIP address: dropped",
            &syn4.clone().with(|p| p.v4_frag = (true, 0)),
            XDP_DROP,
            Counter::DropFragment,
        ),
        untouched(
            "IPv4 later fragment to a VIP address: dropped",
            &Pkt::udp(CLIENT4, 1, V4, 53, to).with(|p| p.v4_frag = (false, 185)),
            XDP_DROP,
            Counter::DropFragment,
        ),
        untouched(
            "IPv4 fragment to no VIP address: passed",
            &Pkt::udp(CLIENT4, 1, "203.0.113.1", 53, to).with(|p| p.v4_frag = (true, 0)),
            XDP_PASS,
            Counter::PassNotForVip,
        ),
        untouched(
            "IPv6 fragment to a VIP address: dropped",
            &Pkt::udp(CLIENT6, 5353, V6, 53, to).with(|p| p.v6_ext = vec![ext::fragment(0, true)]),
            XDP_DROP,
            Counter::DropFragment,
        ),
        untouched(
            "IPv6 later fragment to no VIP address: passed",
            &Pkt::udp(CLIENT6, 5353, "2001:db8::99", 53, to)
                .with(|p| p.v6_ext = vec![ext::fragment(100, false)]),
            XDP_PASS,
            Counter::PassNotForVip,
        ),
        untouched(
            "IPv6 with more extension headers than the parser walks, to a VIP address: dropped",
            &syn6.clone().with(|p| {
                p.v6_ext = vec![
                    ext::hop_by_hop(),
                    ext::dest_opts(),
                    ext::dest_opts(),
                    ext::dest_opts(),
                    ext::dest_opts(),
                    ext::dest_opts(),
                    ext::dest_opts(),
                ]
            }),
            XDP_DROP,
            Counter::DropMalformed,
        ),
        raw(
            "frame cut short of its IPv4 total length: passed as malformed",
            trunc(&syn4.clone().with(|p| p.payload.clear()), 1),
            XDP_PASS,
            Counter::PassMalformed,
        ),
        raw(
            "TCP header cut short inside a consistent IPv4 packet, to a VIP: dropped",
            short_tcp,
            XDP_DROP,
            Counter::DropMalformed,
        ),
        raw(
            "TCP header cut short, to no VIP address: passed as malformed",
            short_tcp_no_vip,
            XDP_PASS,
            Counter::PassMalformed,
        ),
        raw(
            "TCP data offset below 5, to a VIP: dropped",
            bad_doff,
            XDP_DROP,
            Counter::DropMalformed,
        ),
        raw(
            "IPv4 header length 16 bytes: passed as malformed",
            bad_ihl,
            XDP_PASS,
            Counter::PassMalformed,
        ),
        raw(
            "IPv4 total length beyond the frame: passed as malformed",
            long_tot_len,
            XDP_PASS,
            Counter::PassMalformed,
        ),
        raw(
            "IPv6 payload length too short for the TCP header, to a VIP: dropped",
            short_v6_payload,
            XDP_DROP,
            Counter::DropMalformed,
        ),
        raw(
            "IPv4 UDP length 0, to a VIP: dropped",
            udp_len(&udp4, 0),
            XDP_DROP,
            Counter::DropMalformed,
        ),
        raw(
            "IPv4 UDP length 7, to a VIP: dropped",
            udp_len(&udp4, 7),
            XDP_DROP,
            Counter::DropMalformed,
        ),
        raw(
            "IPv4 UDP length past the IP payload (inside the frame), to a VIP: dropped",
            udp_past(&udp4),
            XDP_DROP,
            Counter::DropMalformed,
        ),
        raw(
            "IPv6 UDP length 0, to a VIP: dropped",
            udp_len(&udp6, 0),
            XDP_DROP,
            Counter::DropMalformed,
        ),
        raw(
            "IPv6 UDP length 7, to a VIP: dropped",
            udp_len(&udp6, 7),
            XDP_DROP,
            Counter::DropMalformed,
        ),
        raw(
            "IPv6 UDP length past the IP payload (inside the frame), to a VIP: dropped",
            udp_past(&udp6),
            XDP_DROP,
            Counter::DropMalformed,
        ),
        raw(
            "IPv4 TCP data offset past the IP packet (inside the frame), to a VIP: dropped",
            tcp_doff_past(&tcp4),
            XDP_DROP,
            Counter::DropMalformed,
        ),
        raw(
            "IPv6 TCP data offset past the IP packet (inside the frame), to a VIP: dropped",
            tcp_doff_past(&tcp6),
            XDP_DROP,
            Counter::DropMalformed,
        ),
        raw(
            "UDP length 7, to no VIP address: passed as malformed",
            udp_len(&to_no_vip4(&udp4), 7),
            XDP_PASS,
            Counter::PassMalformed,
        ),
        raw(
            "TCP data offset past the IP packet, to no VIP address: passed as malformed",
            tcp_doff_past(&to_no_vip4(&tcp4)),
            XDP_PASS,
            Counter::PassMalformed,
        ),
        raw(
            "bare Ethernet header saying IPv4: passed as malformed",
            syn4.frame()[..14].to_vec(),
            XDP_PASS,
            Counter::PassMalformed,
        ),
        raw(
            "VLAN tag cut short: passed as malformed",
            syn4.clone().with(|p| p.vlan = Some(7)).frame()[..16].to_vec(),
            XDP_PASS,
            Counter::PassMalformed,
        ),
    ]);
    f
}

#[test]
fn packet_fixtures() {
    let net = FibNet::new("fixtures");
    let fixtures = fixtures();
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup(&net);
        for fx in &fixtures {
            let _ = check(&mut lb, fx, ingress);
        }
    });
    eprintln!("{} packet fixtures passed", fixtures.len());
}

/// Runs `fx` and checks its action, output bytes and verdict; returns the counters' changes.
fn check(lb: &mut Lb, fx: &Fixture, ingress: u32) -> impl Fn(Counter) -> u64 + use<> {
    let before = lb.counters();
    let run = lb.run(&fx.input, ingress);
    let after = lb.counters();
    assert_eq!(
        action_name(run.action),
        action_name(fx.action),
        "{}: wrong action\ninput:\n{}\noutput:\n{}",
        fx.desc,
        hex(&fx.input),
        hex(&run.output)
    );
    assert!(
        run.output == fx.output,
        "{}: wrong output\nexpected:\n{}\ngot:\n{}",
        fx.desc,
        hex(&fx.output),
        hex(&run.output)
    );
    let delta = move |c: Counter| after[&c] - before[&c];
    assert_eq!(
        delta(fx.verdict),
        1,
        "{}: verdict counter {} not counted once",
        fx.desc,
        fx.verdict.name()
    );
    assert_eq!(delta(Counter::Packets), 1, "{}", fx.desc);
    let total = lb.counters();
    assert_eq!(
        harness::verdict_sum(&total),
        lb.runs,
        "{}: verdicts do not add up",
        fx.desc
    );
    delta
}

/// `lb_decap`, the backends' decapsulation program: the output of `lb` goes in, the client's
/// packet comes out, with the MACs it arrived with.
#[test]
fn decap_fixtures() {
    let net = FibNet::new("decap");
    let to = [0x02, 0, 0, 0, 0, 0x42];
    let from = GW0_MAC;
    let cases: Vec<(&str, Pkt, &str, &str)> = vec![
        ("IPIP", Pkt::tcp(CLIENT4, 40000, V4, 80, to), NODE_V4, TX_V4),
        (
            "IPv6 in IPv4",
            Pkt::tcp(CLIENT6, 40000, V6, 80, to),
            NODE_V4,
            TX_V4,
        ),
        (
            "IP6IP6",
            Pkt::udp(CLIENT6, 40000, V6, 53, to),
            NODE_V6,
            TX_V6,
        ),
        (
            "IPv4 in IPv6",
            Pkt::udp(CLIENT4, 40000, V4, 53, to).with(|p| p.v4_options = vec![1; 4]),
            NODE_V6,
            TX_V6,
        ),
    ];
    net.ns.run(|| {
        let mut lb = setup(&net);
        for (desc, inner, outer_src, backend) in &cases {
            let input = packet::encapsulated(inner, to, from, ip(outer_src), ip(backend));
            let mut want = inner.clone();
            want.eth_dst = to;
            want.eth_src = from;
            let run = lb.run_program("lb_decap", &input, net.lb0);
            assert_eq!(action_name(run.action), action_name(XDP_PASS), "{desc}");
            assert!(
                run.output == want.frame(),
                "{desc}: expected\n{}\ngot\n{}",
                hex(&want.frame()),
                hex(&run.output)
            );
        }
        // Not tunnelled, or a tunnel header it does not handle: untouched.
        let plain = Pkt::tcp(CLIENT4, 40000, V4, 80, to).frame();
        let ipip = || {
            packet::encapsulated(
                &Pkt::tcp(CLIENT4, 1, V4, 80, to),
                to,
                from,
                ip(NODE_V4),
                ip(TX_V4),
            )
        };
        let mut options = ipip();
        options[14] = 0x46; // outer IPv4 header claims options
        let mut fragment = ipip();
        fragment[20] |= 0x20; // outer more-fragments
        for (desc, frame) in [
            ("plain TCP", plain),
            ("outer header with options", options),
            ("outer fragment", fragment),
        ] {
            let run = lb.run_program("lb_decap", &frame, net.lb0);
            assert_eq!(run.action, XDP_PASS, "{desc}");
            assert!(run.output == frame, "{desc}: changed\n{}", hex(&run.output));
        }
    });
}

/// A full-size TCP segment (a 1500-byte IP packet) from the client to `vip`.
fn full_size_segment(client: &str, vip: &str) -> Pkt {
    let ip_hdr = if client.contains(':') { 40 } else { 20 };
    Pkt::tcp(client, 40100, vip, 80, LB0_MAC).with(|p| {
        p.l4 = L4::Tcp { flags: TCP_ACK };
        p.payload = (0..1500 - ip_hdr - 20).map(|i| i as u8).collect();
    })
}

/// What etherparse reads in an ICMP too big: (source, destination, IP length, MTU, quote), with
/// the IP header checksum (IPv4) and the ICMP checksum checked against etherparse's own.
fn read_too_big(frame: &[u8]) -> (IpAddr, IpAddr, usize, u32, Vec<u8>) {
    use etherparse::{
        Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type, NetSlice, SlicedPacket, TransportSlice,
        icmpv4::DestUnreachableHeader,
    };
    let p = SlicedPacket::from_ethernet(frame).expect("etherparse reads the reply");
    match (
        p.net.expect("an IP header"),
        p.transport.expect("an ICMP header"),
    ) {
        (NetSlice::Ipv4(ip), TransportSlice::Icmpv4(icmp)) => {
            let h = ip.header().to_header();
            assert_eq!(
                h.header_checksum,
                h.calc_header_checksum(),
                "IPv4 header checksum"
            );
            let Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu,
            }) = icmp.icmp_type()
            else {
                panic!("not a fragmentation needed: {:?}", icmp.icmp_type());
            };
            let want = Icmpv4Header::with_checksum(icmp.icmp_type(), icmp.payload()).checksum;
            assert_eq!(icmp.checksum(), want, "ICMP checksum");
            let len = h.total_len as usize;
            let (s, d) = (h.source.into(), h.destination.into());
            (s, d, len, next_hop_mtu as u32, icmp.payload().to_vec())
        }
        (NetSlice::Ipv6(ip), TransportSlice::Icmpv6(icmp)) => {
            let h = ip.header().to_header();
            let Icmpv6Type::PacketTooBig { mtu } = icmp.icmp_type() else {
                panic!("not a packet too big: {:?}", icmp.icmp_type());
            };
            let want = Icmpv6Header::with_checksum(
                icmp.icmp_type(),
                h.source,
                h.destination,
                icmp.payload(),
            )
            .unwrap()
            .checksum;
            assert_eq!(icmp.checksum(), want, "ICMPv6 checksum");
            let len = 40 + h.payload_length as usize;
            let (s, d) = (h.source.into(), h.destination.into());
            (s, d, len, mtu, icmp.payload().to_vec())
        }
        (net, t) => panic!("not an ICMP too big: {net:?} {t:?}"),
    }
}

/// A full-size segment to a VIP whose backend sits behind a small-MTU route gets an ICMP too
/// big back out of the uplink (MTU: the route's less the outer header; quote: `quote` bytes of
/// the segment; `len` bytes in all), and is not forwarded.
fn check_full_size_segment_answered(seg: Pkt, mtu: u32, quote: usize, len: usize) {
    let net = FibNet::new("toobig");
    net.ns.run(|| {
        let mut lb = setup(&net);
        let before = lb.counters();
        let run = lb.run(&seg.frame(), net.lb0);
        let after = lb.counters();
        assert_eq!(action_name(run.action), action_name(XDP_TX));
        let want = packet::too_big_reply(&seg, mtu, GW0_MAC, LB0_MAC);
        assert!(
            run.output == want,
            "expected\n{}\ngot\n{}",
            hex(&want),
            hex(&run.output)
        );
        let (src, dst, ip_len, got_mtu, got_quote) = read_too_big(&run.output);
        assert_eq!((src, dst), (seg.dst, seg.src), "from the VIP to the client");
        assert_eq!((ip_len, got_mtu), (len, mtu), "IP length and MTU");
        assert_eq!(got_quote, seg.ip_bytes()[..quote], "the quote");
        assert_eq!(run.output.len(), 14 + len, "nothing after the quote");
        let delta = |c: Counter| after[&c] - before[&c];
        assert_eq!(delta(Counter::DropTooBig), 1, "verdict: not forwarded");
        assert_eq!(delta(Counter::IcmpTooBigSent), 1, "ICMP sent");
        assert_eq!(
            harness::verdict_sum(&after),
            lb.runs,
            "one verdict per frame run"
        );
    });
}

#[test]
fn full_size_ipv4_segment_to_a_small_mtu_backend_gets_fragmentation_needed() {
    // Route MTU 600, IPIP: 580 left; the reply is 576 bytes, 548 of them quote (RFC 1812).
    let seg = full_size_segment(CLIENT4, "192.0.2.16");
    check_full_size_segment_answered(seg, 580, 548, 576);
}

#[test]
fn full_size_ipv6_segment_to_a_small_mtu_backend_gets_packet_too_big() {
    // Route MTU 1280, IP6IP6: 1240 left; the reply is 1280 bytes, 1232 of them quote (RFC 4443).
    let seg = full_size_segment(CLIENT6, "2001:db8::16");
    check_full_size_segment_answered(seg, 1240, 1232, 1280);
}

/// Keeps the calling thread on one CPU, so that every run meets the same per-CPU bucket.
fn pin_to_one_cpu() {
    // SAFETY: a zeroed cpu_set_t is valid; we set one CPU we are allowed on.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(libc::sched_getcpu() as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}

#[test]
fn icmp_too_big_beyond_the_burst_within_a_token_interval_is_dropped_and_counted() {
    use lb_common::maps::{ICMP_TOO_BIG_BURST, ICMP_TOO_BIG_RATE};
    let interval = std::time::Duration::from_nanos(1_000_000_000 / ICMP_TOO_BIG_RATE);
    let burst = ICMP_TOO_BIG_BURST;
    let frame = full_size_segment(CLIENT4, "192.0.2.16").frame();
    let net = FibNet::new("ratelimit");
    net.ns.run(|| {
        pin_to_one_cpu();
        let mut lb = setup(&net);
        // A token comes back every `interval`: only a burst sent faster than that shows the
        // limit. A slower one (a busy machine) is tried again.
        for _attempt in 0..20 {
            lb.refill_icmp_buckets();
            let before = lb.counters();
            let start = std::time::Instant::now();
            let actions: Vec<u32> = (0..=burst)
                .map(|_| lb.run(&frame, net.lb0).action)
                .collect();
            if start.elapsed() >= interval {
                continue;
            }
            let after = lb.counters();
            let delta = |c: Counter| after[&c] - before[&c];
            let sent = actions.iter().filter(|&&a| a == XDP_TX).count() as u64;
            assert_eq!(sent, burst, "the first {burst} are answered: {actions:?}");
            assert_eq!(actions.last(), Some(&XDP_DROP), "the one after is dropped");
            assert_eq!(delta(Counter::IcmpTooBigSent), burst);
            assert_eq!(delta(Counter::IcmpTooBigRateLimited), 1);
            assert_eq!(delta(Counter::DropTooBig), burst + 1, "none forwarded");
            return;
        }
        panic!("never sent {} packets within {interval:?}", burst + 1);
    });
}

/// A router on the way to the clients (the source of the ICMP errors below).
const ROUTER4: &str = "203.0.113.254";
const ROUTER6: &str = "2001:db8:ff::fe";

/// What a DSR backend sends client `client:cport` from `vip:vport`: a full-size TCP segment
/// (1500 bytes of IP), or a UDP datagram.
fn from_backend(vip: &str, vport: u16, client: &str, cport: u16, udp: bool) -> Pkt {
    let hdr = if vip.contains(':') { 40 } else { 20 };
    let p = if udp {
        Pkt::udp(vip, vport, client, cport, GW0_MAC)
    } else {
        Pkt::tcp(vip, vport, client, cport, GW0_MAC).with(|p| {
            p.l4 = L4::Tcp { flags: TCP_ACK };
        })
    };
    let l4 = if udp { 8 } else { 20 };
    p.with(|p| p.payload = vec![0x6b; 1500 - hdr - l4])
}

/// The error `kind` a router sends the VIP about `sent` (quoting as much as RFC 1812 / RFC 4443
/// allow: 576 / 1280 bytes in all), as it arrives on the uplink.
fn error_about(kind: packet::IcmpError, sent: &Pkt) -> Vec<u8> {
    let bytes = sent.ip_bytes();
    let (router, room) = if sent.src.is_ipv4() {
        (ROUTER4, 576 - 28)
    } else {
        (ROUTER6, 1280 - 48)
    };
    let quote = &bytes[..bytes.len().min(room)];
    packet::icmp_error(
        kind,
        ip(router),
        sent.src,
        60,
        quote,
        LB0_MAC,
        packet::ROUTER_MAC,
    )
}

/// The client's flow key for what `sent` (VIP -> client) answers.
fn client_flow(sent: &Pkt) -> lb_common::FlowKey {
    let mut k = sent.flow_key();
    (k.src, k.dst) = (k.dst, k.src);
    (k.src_port, k.dst_port) = (k.dst_port, k.src_port);
    k
}

/// `error` (a frame), encapsulated to `backend` like any packet of `flow`, out of the uplink.
fn error_forwarded(
    desc: &'static str,
    error: Vec<u8>,
    flow: &lb_common::FlowKey,
    backend: &str,
) -> Fixture {
    let b = ip(backend);
    let src = if b.is_ipv4() { NODE_V4 } else { NODE_V6 };
    Fixture {
        desc,
        output: packet::encapsulated_ip(&error[14..], 0, flow, GW0_MAC, LB0_MAC, ip(src), b),
        input: error,
        action: XDP_TX,
        verdict: Counter::Tx,
    }
}

#[test]
fn icmp_errors_aimed_at_a_dsr_vip_go_encapsulated_to_the_backend_of_the_flow_they_quote() {
    use lb_common::{FlowValue, MEMBER_F_ACCEPTS, MEMBER_F_LIVE};
    use packet::IcmpError::*;
    let net = FibNet::new("icmp-flow");
    let ingress = net.lb0;
    // (VIP id, VIP, port, UDP, client, error kind, member id to pin the flow to, its backend)
    let cases = [
        (
            0,
            V4,
            80,
            false,
            CLIENT4,
            FragNeeded(1400),
            50,
            (2, TX_V4_B),
        ),
        (
            2,
            V6,
            80,
            false,
            CLIENT6,
            PacketTooBig(1400),
            51,
            (14, TX_V6_B),
        ),
        (1, V4, 53, true, CLIENT4, TimeExceeded, 52, (2, TX_V4_B)),
    ];
    net.ns.run(|| {
        let mut lb = setup(&net);
        lb.set_backend(14, TX_V6_B, true);
        for (vip_id, vip, port, udp, client, kind, member, (backend, addr)) in cases {
            // The flow is pinned to another backend than the VIP's table gives: the error follows it.
            let sent = from_backend(vip, port, client, 40000, udp);
            let flow = client_flow(&sent);
            lb.write_member(member, vip_id, backend, MEMBER_F_LIVE | MEMBER_F_ACCEPTS, 1);
            let pinned = FlowValue {
                member_id: member,
                generation: 1,
                last_seen_ns: 0,
            };
            lb.set_flow(flow, pinned);
            let fx = error_forwarded(
                "ICMP error quoting a known flow",
                error_about(kind, &sent),
                &flow,
                addr,
            );
            let delta = check(&mut lb, &fx, ingress);
            assert_eq!(delta(Counter::IcmpForwarded), 1, "{kind:?}: icmp_forwarded");
            assert_eq!(
                lb.flow(&flow),
                Some(pinned),
                "{kind:?}: the flow entry is left as it was"
            );
        }
    });
}

#[test]
fn icmp_error_about_a_dsr_flow_without_an_entry_goes_to_the_maglev_choice_of_the_reversed_tuple() {
    use packet::IcmpError::*;
    let net = FibNet::new("icmp-maglev");
    let ingress = net.lb0;
    let cases = [
        (0, V4, CLIENT4, FragNeeded(1400), (2, TX_V4_B)),
        (2, V6, CLIENT6, PacketTooBig(1400), (14, TX_V6_B)),
    ];
    net.ns.run(|| {
        let mut lb = setup(&net);
        lb.set_backend(14, TX_V6_B, true);
        for (vip_id, vip, client, kind, (backend, addr)) in cases {
            let sent = from_backend(vip, 80, client, 40001, false);
            let flow = client_flow(&sent);
            // Only the slot of the client's flow (client -> VIP) names `backend`.
            let slot = lb_common::maglev_slot(lb_common::flow_hash(&flow), M);
            let unreversed = lb_common::maglev_slot(lb_common::flow_hash(&sent.flow_key()), M);
            assert_ne!(
                slot, unreversed,
                "pick another client port: both tuples hash alike"
            );
            lb.set_ring(vip_id, |s| {
                if s == slot {
                    backend
                } else {
                    1 + 2 * (vip_id / 2)
                }
            });
            let fx = error_forwarded(
                "ICMP error quoting a flow without entry",
                error_about(kind, &sent),
                &flow,
                addr,
            );
            let delta = check(&mut lb, &fx, ingress);
            assert_eq!(delta(Counter::IcmpForwarded), 1, "{kind:?}");
            assert_eq!(delta(Counter::MaglevLookups), 1, "{kind:?}");
            assert!(
                lb.flow(&flow).is_none(),
                "{kind:?}: an error records no flow"
            );
        }
    });
}

#[test]
fn icmp_errors_quoting_no_dsr_vip_flow_pass_untouched() {
    const NAT_VIP: &str = "192.0.2.21";
    use packet::IcmpError::*;
    let net = FibNet::new("icmp-pass");
    let ingress = net.lb0;
    let gre = from_backend(V4, 80, CLIENT4, 40000, false).with(|p| p.l4 = L4::Other(47));
    let other_vip = from_backend("192.0.2.12", 80, CLIENT4, 40000, false);
    let mut aimed_elsewhere = error_about(FragNeeded(1400), &other_vip);
    // Aimed at V4 (192.0.2.10), quoting a packet from 192.0.2.12: IP header checksum fixed up.
    aimed_elsewhere[14 + 19] = 10;
    let c = u16::from_be_bytes([aimed_elsewhere[24], aimed_elsewhere[25]]) as u32 + 2;
    let c = (c & 0xffff) + (c >> 16);
    aimed_elsewhere[24..26].copy_from_slice(&(c as u16).to_be_bytes());
    let cases = [
        (
            "quoting a port with no VIP",
            error_about(
                FragNeeded(1400),
                &from_backend(V4, 81, CLIENT4, 40000, false),
            ),
        ),
        (
            "quoting a protocol other than TCP and UDP",
            error_about(FragNeeded(1400), &gre),
        ),
        (
            "IPv6, quoting a port with no VIP",
            error_about(
                PacketTooBig(1400),
                &from_backend(V6, 81, CLIENT6, 40000, false),
            ),
        ),
        (
            "quoting a packet from another address than the one it is aimed at",
            aimed_elsewhere,
        ),
        (
            "quoting a NAT VIP's packet",
            error_about(
                FragNeeded(1400),
                &from_backend(NAT_VIP, 80, CLIENT4, 40000, false),
            ),
        ),
        (
            "port unreachable quoting a VIP -> client packet of a protocol the VIP does not serve",
            error_about(PortUnreachable, &from_backend(V4, 80, CLIENT4, 40000, true)),
        ),
    ];
    net.ns.run(|| {
        let mut lb = setup(&net);
        lb.add_vip(
            vip_key(NAT_VIP, 80, IPPROTO_TCP),
            VipValue {
                id: 20,
                flags: 0,
                affinity_timeout_s: 0,
                mode: lb_common::MODE_NAT,
                table_size: 0,
            },
        );
        lb.set_ring(20, |_| 1);
        for (desc, frame) in cases {
            let delta = check(
                &mut lb,
                &raw(desc, frame, XDP_PASS, Counter::PassNotForVip),
                ingress,
            );
            assert_eq!(delta(Counter::IcmpForwarded), 0, "{desc}");
        }
    });
}
