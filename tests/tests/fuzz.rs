//! Robustness: every truncation of valid frames, and well over 100,000 random and mutated frames,
//! aimed at DSR and NAT VIPs (IPv4 and IPv6, TCP and UDP), at the node's NAT address (replies
//! to translations made first, and ICMP errors quoting them), at VIP addresses (ICMP errors
//! quoting VIP flows), and full-size frames to backends behind a small-MTU route (ICMP too big).
//! The program must never return `XDP_ABORTED` (or anything but DROP, PASS, TX, REDIRECT), every
//! packet must end in exactly one verdict counter, and every frame it forwards (and every frame
//! it changes and passes) must be well formed: lengths and checksums of every packet in it, as
//! etherparse reads them ([`lb_tests::wellformed`]).

use std::{collections::BTreeMap, net::IpAddr};

use etherparse::{
    Icmpv4Type, Icmpv6Type, NetSlice, PacketBuilder, SlicedPacket, TransportSlice, UdpHeader,
    icmpv4, icmpv6,
};
use lb_common::{
    Counter, IPPROTO_TCP, IPPROTO_UDP, MODE_DSR, MODE_NAT, VIP_F_HASH_SRC_ONLY, VipValue,
};
use lb_tests::{
    harness::{self, FibNet, Lb, Run, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, net::*, vip_key},
    hex_all,
    packet::{L4, Pkt, ROUTER_MAC, TCP_ACK, TCP_SYN, ext},
    wellformed::{self, Role, check_forwarded},
};
use lb_userspace::kernel::program::Sizes;
use rand::{Rng, SeedableRng, rngs::StdRng};

const RANDOM_FRAMES: usize = 120_000;
/// The replies and ICMP errors to the node are made again this often (translations expire,
/// and mutated client packets close them).
const RENEW_EVERY: usize = 8192;

const CLIENT4: &str = "198.51.100.7";
const CLIENT6: &str = "2001:db8:c::7";
/// A router on the way to the clients, the source of ICMP errors to VIP addresses.
const ROUTER4: &str = "198.51.100.1";
const ROUTER6: &str = "2001:db8:c::1";
/// DSR VIPs (ports 80) and, at .16, a DSR VIP whose only backend is behind the small-MTU route.
const DSR4: &str = "192.0.2.10";
const DSR6: &str = "2001:db8::10";
const DSR4_SMALL: &str = "192.0.2.16";
const DSR6_SMALL: &str = "2001:db8::16";
/// NAT VIPs (TCP 80 / 443, UDP 53) and, at .21, a NAT VIP behind the small-MTU route.
const NAT4: &str = "192.0.2.20";
const NAT6: &str = "2001:db8::20";
const NAT4_SMALL: &str = "192.0.2.21";
const NAT6_SMALL: &str = "2001:db8::21";
/// NAT backends: (id, address, port of their own or 0 for the VIP's), by where routes send them.
const NAT_BACKENDS4: [(u32, &str, u16); 4] = [
    (10, TX_V4_B, 8080),
    (11, REDIRECT_V4, 0),
    (12, NO_NEIGH_V4, 0),
    (13, SMALL_MTU_V4, 8080),
];
const NAT_BACKENDS6: [(u32, &str, u16); 4] = [
    (20, TX_V6_B, 8443),
    (21, REDIRECT_V6, 0),
    (22, NO_NEIGH_V6, 0),
    (23, SMALL_MTU_V6, 8443),
];

fn load(net: &FibNet) -> Lb {
    let mut lb = Lb::load(Sizes {
        table_size: 251,
        max_vips: 16,
        max_backends: 64,
        flow_table_size: 1024,
        affinity_table_size: 256,
        nat_table_size: 256,
    });
    lb.set_node(Some(NODE_V4), Some(NODE_V6), 1_000_000_000);
    for (id, a) in [
        (1, TX_V4),
        (2, TX_V6),
        (3, REDIRECT_V4),
        (4, NO_NEIGH_V6),
        (5, UNREACHABLE_V4),
        (6, SMALL_MTU_V4),
        (7, SMALL_MTU_V6),
    ] {
        lb.set_backend(id, a, true);
    }
    for (id, a, port) in NAT_BACKENDS4.into_iter().chain(NAT_BACKENDS6) {
        lb.set_backend_port(id, a, port, true);
    }
    let ring4 = |s: u32| NAT_BACKENDS4[s as usize % 4].0;
    let ring6 = |s: u32| NAT_BACKENDS6[s as usize % 4].0;
    type Ring<'a> = &'a dyn Fn(u32) -> u32;
    let vips: [(&str, u16, u8, u32, u32, u32, Ring); 12] = [
        (DSR4, 80, IPPROTO_TCP, 0, 30, MODE_DSR, &|s| 1 + s % 6),
        (
            DSR4,
            80,
            IPPROTO_UDP,
            VIP_F_HASH_SRC_ONLY,
            0,
            MODE_DSR,
            &|s| 1 + s % 6,
        ),
        (DSR6, 80, IPPROTO_TCP, 0, 0, MODE_DSR, &|s| 1 + s % 6),
        (DSR6, 80, IPPROTO_UDP, 0, 10, MODE_DSR, &|s| 1 + s % 6),
        (DSR4_SMALL, 80, IPPROTO_TCP, 0, 0, MODE_DSR, &|_| 6),
        (DSR6_SMALL, 80, IPPROTO_TCP, 0, 0, MODE_DSR, &|_| 7),
        (NAT4, 80, IPPROTO_TCP, 0, 0, MODE_NAT, &ring4),
        (NAT4, 53, IPPROTO_UDP, 0, 30, MODE_NAT, &ring4),
        (NAT6, 443, IPPROTO_TCP, 0, 30, MODE_NAT, &ring6),
        (NAT6, 53, IPPROTO_UDP, 0, 0, MODE_NAT, &ring6),
        (NAT4_SMALL, 80, IPPROTO_TCP, 0, 0, MODE_NAT, &|_| 13),
        (NAT6_SMALL, 443, IPPROTO_TCP, 0, 0, MODE_NAT, &|_| 23),
    ];
    for (id, (addr, port, proto, flags, affinity, mode, ring)) in vips.into_iter().enumerate() {
        lb.add_vip(
            vip_key(addr, port, proto),
            VipValue {
                id: id as u32,
                flags,
                affinity_timeout_s: affinity,
                mode,
                table_size: 0,
            },
        );
        lb.set_ring(id as u32, ring);
    }
    lb.add_tx_port(net.lb1);
    lb
}

fn big(p: Pkt, payload: usize) -> Pkt {
    p.with(|p| p.payload = vec![0x5a; payload])
}

/// Valid frames of every shape the parser knows aimed at DSR VIPs, and full-size ones over the
/// small-MTU route.
fn dsr_seeds() -> Vec<Vec<u8>> {
    let to = LB0_MAC;
    let s4 = Pkt::tcp(CLIENT4, 40000, DSR4, 80, to);
    let s6 = Pkt::tcp(CLIENT6, 40000, DSR6, 80, to);
    vec![
        s4.frame(),
        s4.clone().with(|p| p.vlan = Some(5)).frame(),
        s4.clone().with(|p| p.v4_options = vec![1; 12]).frame(),
        s4.clone()
            .with(|p| p.l4 = L4::Tcp { flags: TCP_ACK })
            .frame(),
        Pkt::udp(CLIENT4, 5000, DSR4, 80, to).frame(),
        Pkt::udp(CLIENT4, 5000, DSR4, 80, to)
            .with(|p| p.v4_frag = (true, 0))
            .frame(),
        s6.frame(),
        s6.clone()
            .with(|p| p.v6_ext = vec![ext::hop_by_hop(), ext::dest_opts(), ext::ah()])
            .frame(),
        Pkt::udp(CLIENT6, 5000, DSR6, 80, to)
            .with(|p| p.v6_ext = vec![ext::fragment(0, false)])
            .frame(),
        Pkt::udp(CLIENT6, 5000, DSR6, 80, to)
            .with(|p| p.vlan = Some(9))
            .frame(),
        // Over the route MTU (600 / 1280) once encapsulated: answered with ICMP too big.
        big(Pkt::tcp(CLIENT4, 40001, DSR4_SMALL, 80, to), 600).frame(),
        big(Pkt::tcp(CLIENT4, 40001, DSR4_SMALL, 80, to), 600)
            .with(|p| p.vlan = Some(100))
            .frame(),
        big(Pkt::tcp(CLIENT6, 40001, DSR6_SMALL, 80, to), 1250).frame(),
    ]
}

/// Client packets to NAT VIPs: the ones that make the translations (four clients ports per VIP,
/// spread over its backends), and full-size ones over the small-MTU route.
fn nat_client_packets() -> Vec<Pkt> {
    let to = LB0_MAC;
    let mut out = Vec::new();
    for port in 41000..41004 {
        out.push(Pkt::tcp(CLIENT4, port, NAT4, 80, to));
        out.push(Pkt::udp(CLIENT4, port, NAT4, 53, to));
        out.push(Pkt::tcp(CLIENT6, port, NAT6, 443, to));
        out.push(Pkt::udp(CLIENT6, port, NAT6, 53, to));
    }
    out
}

fn nat_seeds() -> Vec<Vec<u8>> {
    let to = LB0_MAC;
    let mut out: Vec<Vec<u8>> = nat_client_packets().iter().map(Pkt::frame).collect();
    out.extend([
        Pkt::tcp(CLIENT4, 41000, NAT4, 80, to)
            .with(|p| {
                p.vlan = Some(7);
                p.v4_options = vec![1, 1, 1, 0];
                p.l4 = L4::Tcp { flags: TCP_ACK };
            })
            .frame(),
        Pkt::udp(CLIENT4, 41001, NAT4, 53, to)
            .with(|p| p.udp_checksum = false)
            .frame(),
        Pkt::tcp(CLIENT6, 41002, NAT6, 443, to)
            .with(|p| p.v6_ext = vec![ext::hop_by_hop(), ext::dest_opts()])
            .frame(),
        big(Pkt::tcp(CLIENT4, 41005, NAT4_SMALL, 80, to), 600).frame(),
        big(Pkt::tcp(CLIENT6, 41005, NAT6_SMALL, 443, to), 1250).frame(),
    ]);
    out
}

/// An ICMPv4 error of `ty` from `src` to `dst` quoting `quote`.
fn icmp4(src: &str, dst: &str, ty: Icmpv4Type, quote: &[u8], eth_src: [u8; 6]) -> Vec<u8> {
    let (s, d): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
        (src.parse().unwrap(), dst.parse().unwrap());
    let mut out = Vec::new();
    PacketBuilder::ethernet2(eth_src, LB0_MAC)
        .ipv4(s.octets(), d.octets(), 64)
        .icmpv4(ty)
        .write(&mut out, quote)
        .unwrap();
    out
}

/// An ICMPv6 error of `ty` from `src` to `dst` quoting `quote`.
fn icmp6(src: &str, dst: &str, ty: Icmpv6Type, quote: &[u8], eth_src: [u8; 6]) -> Vec<u8> {
    let (s, d): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
        (src.parse().unwrap(), dst.parse().unwrap());
    let mut out = Vec::new();
    PacketBuilder::ethernet2(eth_src, LB0_MAC)
        .ipv6(s.octets(), d.octets(), 64)
        .icmpv6(ty)
        .write(&mut out, quote)
        .unwrap();
    out
}

/// ICMP errors from a router on the way to the clients to VIP addresses, about packets from
/// the VIP to a client (a DSR backend's reply, or a NAT reply translated back): frag needed /
/// time exceeded, ICMPv6 destination unreachable / packet too big.
fn icmp_to_vip_seeds() -> Vec<Vec<u8>> {
    use icmpv4::DestUnreachableHeader as Du4;
    let to = ROUTER_MAC;
    let mut out = Vec::new();
    for (vip, port) in [(DSR4, 80), (NAT4, 80)] {
        let quoted = Pkt::tcp(vip, port, CLIENT4, 41000, to)
            .with(|p| {
                p.l4 = L4::Tcp {
                    flags: TCP_SYN | TCP_ACK,
                }
            })
            .ip_bytes();
        let frag =
            Icmpv4Type::DestinationUnreachable(Du4::FragmentationNeeded { next_hop_mtu: 1400 });
        let ttl = Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit);
        out.push(icmp4(ROUTER4, vip, frag, &quoted, to));
        out.push(icmp4(ROUTER4, vip, ttl, &quoted, to));
    }
    let udp = Pkt::udp(NAT4, 53, CLIENT4, 41001, to).ip_bytes();
    out.push(icmp4(
        ROUTER4,
        NAT4,
        Icmpv4Type::DestinationUnreachable(Du4::Port),
        &udp,
        to,
    ));
    for (vip, port) in [(DSR6, 80), (NAT6, 443)] {
        let quoted = Pkt::tcp(vip, port, CLIENT6, 41000, to)
            .with(|p| {
                p.l4 = L4::Tcp {
                    flags: TCP_SYN | TCP_ACK,
                }
            })
            .ip_bytes();
        let unreach = Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Address);
        out.push(icmp6(ROUTER6, vip, unreach, &quoted, to));
        out.push(icmp6(
            ROUTER6,
            vip,
            Icmpv6Type::PacketTooBig { mtu: 1280 },
            &quoted,
            to,
        ));
    }
    out
}

/// A translated packet as the program sent it: the node's address and NAT port, the backend's
/// address and port, and the IP packet.
struct Translation {
    node: String,
    nat_port: u16,
    backend: String,
    bport: u16,
    ip: Vec<u8>,
}

/// What etherparse reads in a translated frame.
fn translated(frame: &[u8]) -> Option<Translation> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let off = wellformed::layers(frame).ok()?.first()?.offset;
    let (node, backend, len) = match p.net? {
        NetSlice::Ipv4(ip) => {
            let h = ip.header();
            let (s, d) = (h.source_addr(), h.destination_addr());
            (s.to_string(), d.to_string(), h.total_len() as usize)
        }
        NetSlice::Ipv6(ip) => {
            let h = ip.header();
            let (s, d) = (h.source_addr(), h.destination_addr());
            (
                s.to_string(),
                d.to_string(),
                40 + h.payload_length() as usize,
            )
        }
        _ => return None,
    };
    let (nat_port, bport) = match p.transport? {
        TransportSlice::Tcp(t) => (t.source_port(), t.destination_port()),
        TransportSlice::Udp(u) => (u.source_port(), u.destination_port()),
        _ => return None,
    };
    let ip = frame.get(off..off + len)?.to_vec();
    Some(Translation {
        node,
        nat_port,
        backend,
        bport,
        ip,
    })
}

/// Frames to the node about translation `t` of `pkt`: the backend's reply, and ICMP errors
/// quoting the translated packet (from the backend: port unreachable; from a router: frag
/// needed or packet too big, time exceeded).
fn to_node(pkt: &Pkt, t: &Translation) -> Vec<Vec<u8>> {
    use icmpv4::DestUnreachableHeader as Du4;
    let reply = Pkt::udp(&t.backend, t.bport, &t.node, t.nat_port, LB0_MAC).with(|p| {
        p.eth_src = GW0_MAC;
        if let L4::Tcp { .. } = pkt.l4 {
            p.l4 = L4::Tcp {
                flags: TCP_SYN | TCP_ACK,
            };
        }
        p.payload = b"reply from the backend".to_vec();
    });
    let (b, n, ip) = (&t.backend, &t.node, &t.ip[..]);
    if pkt.src.is_ipv4() {
        let frag = Du4::FragmentationNeeded { next_hop_mtu: 1200 };
        let ttl = Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit);
        vec![
            reply.frame(),
            icmp4(
                b,
                n,
                Icmpv4Type::DestinationUnreachable(Du4::Port),
                ip,
                GW0_MAC,
            ),
            icmp4(
                "10.0.0.2",
                n,
                Icmpv4Type::DestinationUnreachable(frag),
                ip,
                GW0_MAC,
            ),
            icmp4("10.0.0.2", n, ttl, ip, GW0_MAC),
        ]
    } else {
        let port = Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port);
        let ttl = Icmpv6Type::TimeExceeded(icmpv6::TimeExceededCode::HopLimitExceeded);
        let too_big = Icmpv6Type::PacketTooBig { mtu: 1280 };
        vec![
            reply.frame(),
            icmp6(b, n, port, ip, GW0_MAC),
            icmp6("fd00::2", n, too_big, ip, GW0_MAC),
            icmp6("fd00::2", n, ttl, ip, GW0_MAC),
        ]
    }
}

/// `payload` and two more bytes, chosen so that a UDP datagram `src:sport` -> `dst:dport`
/// carrying it has a computed checksum of zero (sent as 0xffff, RFC 768), by etherparse. With
/// the word 0 the checksum is `c`; the word `c` (at an even offset) adds exactly what is missing.
fn zero_sum_payload(src: &str, sport: u16, dst: &str, dport: u16, payload: &[u8]) -> Vec<u8> {
    assert!(
        payload.len().is_multiple_of(2),
        "the word added must be aligned"
    );
    let (s, d): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    let h = UdpHeader::without_ipv4_checksum(sport, dport, payload.len() + 2).unwrap();
    let sum = |p: &[u8]| match (s, d) {
        (IpAddr::V4(s), IpAddr::V4(d)) => h.calc_checksum_ipv4_raw(s.octets(), d.octets(), p),
        (IpAddr::V6(s), IpAddr::V6(d)) => h.calc_checksum_ipv6_raw(s.octets(), d.octets(), p),
        _ => panic!("mixed address families"),
    };
    let c = sum(&[payload, &[0, 0]].concat()).unwrap();
    let out = [payload, &c.to_be_bytes()].concat();
    assert_eq!(sum(&out).unwrap(), 0xffff, "no zero-sum payload found");
    out
}

/// The UDP checksum field of a frame's packet, as etherparse reads it.
fn udp_checksum(frame: &[u8]) -> Option<u16> {
    match SlicedPacket::from_ethernet(frame).ok()?.transport? {
        TransportSlice::Udp(u) => Some(u.checksum()),
        _ => None,
    }
}

/// For the UDP translation `t` of `pkt`: a packet of the same client flow whose translated
/// checksum comes out zero, and a reply whose checksum translated back does. The program must
/// send 0xffff (for IPv6, where 0 is no checksum and invalid), not 0.
fn zero_sum(pkt: &Pkt, t: &Translation) -> Vec<Vec<u8>> {
    let client = pkt.clone().with(|p| {
        p.payload = zero_sum_payload(&t.node, t.nat_port, &t.backend, t.bport, &pkt.payload);
    });
    let (vip, client_addr) = (pkt.dst.to_string(), pkt.src.to_string());
    let body = zero_sum_payload(&vip, pkt.dport, &client_addr, pkt.sport, b"a reply!");
    let reply = Pkt::udp(&t.backend, t.bport, &t.node, t.nat_port, LB0_MAC).with(|p| {
        p.eth_src = GW0_MAC;
        p.payload = body;
    });
    vec![client.frame(), reply.frame()]
}

/// Runs frames, checks every outcome, and keeps count.
struct Fuzz {
    lb: Lb,
    ingress: u32,
    runs: u64,
    forwarded: u64,
    /// Checked output frames by shape ([`wellformed::shape`]).
    shapes: BTreeMap<String, u64>,
}

impl Fuzz {
    fn new(lb: Lb, ingress: u32) -> Self {
        Self {
            lb,
            ingress,
            runs: 0,
            forwarded: 0,
            shapes: BTreeMap::new(),
        }
    }

    /// Runs `frame`: the action must be one of the four, and a frame forwarded (or changed and
    /// passed) well formed.
    fn run(&mut self, frame: &[u8], what: &dyn Fn() -> String) -> Run {
        let run = self.lb.run(frame, self.ingress);
        self.runs += 1;
        assert!(
            matches!(run.action, XDP_DROP | XDP_PASS | XDP_TX | XDP_REDIRECT),
            "{}: action {} ({})\nframe:\n{}",
            what(),
            run.action,
            harness::action_name(run.action),
            hex_all(frame)
        );
        let sent = matches!(run.action, XDP_TX | XDP_REDIRECT);
        self.forwarded += sent as u64;
        if sent || (run.action == XDP_PASS && run.output != frame) {
            match check_forwarded(frame, &run.output) {
                Ok(layers) => *self.shapes.entry(wellformed::shape(&layers)).or_default() += 1,
                Err(e) => panic!(
                    "{}: {} frame not well formed: {e}\ninput:\n{}\noutput:\n{}",
                    what(),
                    harness::action_name(run.action),
                    hex_all(frame),
                    hex_all(&run.output)
                ),
            }
        }
        run
    }

    /// Makes (or refreshes) the NAT translations and returns frames aimed at the node (see
    /// [`to_node`]), then UDP packets both ways whose translation's checksum comes out zero
    /// (see [`zero_sum`]), which are run here too.
    fn node_seeds(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut edges = Vec::new();
        for pkt in nat_client_packets() {
            let run = self.run(&pkt.frame(), &|| {
                format!("making a translation for {pkt:?}")
            });
            if run.action == XDP_DROP {
                continue;
            }
            let t = translated(&run.output).unwrap_or_else(|| {
                panic!(
                    "no translated packet for {pkt:?}:\n{}",
                    hex_all(&run.output)
                )
            });
            out.extend(to_node(&pkt, &t));
            if matches!(pkt.l4, L4::Udp) {
                edges.extend(zero_sum(&pkt, &t));
            }
        }
        for e in &edges {
            let run = self.run(e, &|| "a UDP packet whose translation sums to zero".into());
            if run.action != XDP_DROP {
                assert_eq!(
                    udp_checksum(&run.output),
                    Some(0xffff),
                    "a computed zero UDP checksum is sent as 0xffff (RFC 768)\ninput:\n{}\noutput:\n{}",
                    hex_all(e),
                    hex_all(&run.output)
                );
            }
        }
        out.extend(edges);
        out
    }

    fn assert_counters_add_up(&mut self) {
        let c = self.lb.counters();
        assert_eq!(
            c[&Counter::Packets],
            self.runs,
            "packets counter != frames run"
        );
        assert_eq!(
            harness::verdict_sum(&c),
            self.runs,
            "verdict counters do not add up to the packets: {c:?}"
        );
    }
}

/// Every seed: to DSR and NAT VIPs, replies and ICMP errors to the node, ICMP errors to VIPs.
fn all_seeds(f: &mut Fuzz) -> (Vec<Vec<u8>>, usize) {
    let mut seeds = dsr_seeds();
    seeds.extend(nat_seeds());
    seeds.extend(icmp_to_vip_seeds());
    let fixed = seeds.len();
    seeds.extend(f.node_seeds());
    (seeds, fixed)
}

#[test]
fn every_truncation_of_valid_frames() {
    let net = FibNet::new("trunc");
    net.ns.run(|| {
        let mut f = Fuzz::new(load(&net), net.lb0);
        let (seeds, _) = all_seeds(&mut f);
        for (i, seed) in seeds.iter().enumerate() {
            f.lb.refill_icmp_buckets();
            for len in 0..=seed.len() {
                let frame = &seed[..len];
                if len < 14 {
                    // BPF_PROG_TEST_RUN refuses XDP frames shorter than an Ethernet header (and no
                    // driver delivers one), so the program cannot be run on them: check that
                    // refusal rather than skip silently.
                    let prog: &mut aya::programs::Xdp =
                        f.lb.ebpf.program_mut("lb").unwrap().try_into().unwrap();
                    let mut opts = aya::programs::TestRunOptions::new();
                    opts.data_in = Some(frame);
                    use aya::programs::TestRun as _;
                    assert!(
                        prog.test_run(opts).is_err(),
                        "kernel accepted a {len}-byte XDP frame"
                    );
                    continue;
                }
                f.run(frame, &|| format!("seed {i} cut to {len} bytes"));
            }
        }
        f.assert_counters_add_up();
        eprintln!(
            "{} truncated frames run, {} forwarded; checked: {:?}",
            f.runs, f.forwarded, f.shapes
        );
    });
}

/// A frame derived from the seeds (or none): noise, a few bytes changed (half of them with
/// their checksums made right again, so the output must be entirely right), or cut / extended.
fn mutant(rng: &mut StdRng, seeds: &[Vec<u8>], n: usize) -> Vec<u8> {
    match n % 4 {
        // Pure noise, of any length from an Ethernet header up.
        0 => (0..rng.random_range(14..200))
            .map(|_| rng.random())
            .collect(),
        // A valid frame with a few bytes changed (mostly in the headers).
        1 | 2 => {
            let mut f = seeds[rng.random_range(0..seeds.len())].clone();
            for _ in 0..rng.random_range(1..5) {
                let limit = if rng.random_bool(0.8) {
                    f.len().min(80)
                } else {
                    f.len()
                };
                let at = rng.random_range(0..limit);
                f[at] = rng.random();
            }
            if rng.random_bool(0.5) {
                wellformed::repair(&mut f);
            }
            f
        }
        // A valid frame cut or extended at random.
        _ => {
            let mut f = seeds[rng.random_range(0..seeds.len())].clone();
            let len = rng.random_range(14..f.len() + 40);
            f.resize(len, rng.random());
            f
        }
    }
}

#[test]
fn random_and_mutated_frames() {
    let net = FibNet::new("fuzz");
    let seed: u64 = std::env::var("LB_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x005e_ed1b);
    eprintln!("fuzz seed {seed:#x} (LB_FUZZ_SEED={seed})");
    net.ns.run(|| {
        let mut f = Fuzz::new(load(&net), net.lb0);
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut seeds, fixed) = all_seeds(&mut f);
        for n in 0..RANDOM_FRAMES {
            if n % RENEW_EVERY == RENEW_EVERY - 1 {
                seeds.truncate(fixed);
                seeds.extend(f.node_seeds());
            }
            if n % 64 == 0 {
                f.lb.refill_icmp_buckets();
            }
            let frame = mutant(&mut rng, &seeds, n);
            f.run(&frame, &|| format!("frame {n} (LB_FUZZ_SEED={seed})"));
        }
        f.assert_counters_add_up();
        // The mutations must reach the deep paths too, not just bounce off the parser.
        assert!(
            f.forwarded > RANDOM_FRAMES as u64 / 20,
            "only {} frames were forwarded",
            f.forwarded
        );
        let c = f.lb.counters();
        for k in [
            Counter::PassMalformed,
            Counter::DropMalformed,
            Counter::DropFragment,
            Counter::PassNotForVip,
            Counter::PassNoNeighbour,
            Counter::Tx,
            Counter::Redirect,
            Counter::NewFlows,
            Counter::FlowHits,
            Counter::NatNew,
            Counter::NatForward,
            Counter::NatReverse,
            Counter::NatUnreachable,
            Counter::NatFragNeeded,
            Counter::IcmpTooBigSent,
        ] {
            assert!(c[&k] > 0, "no frame reached {}", k.name());
        }
        // And the checker must have seen every kind of frame the program makes.
        for shape in [
            "IPv4/IPIP > IPv4/TCP",
            "IPv4/IPIP > IPv4/UDP",
            "IPv6/IPv6 > IPv6/TCP",
            "IPv4/IPv6 > IPv6/TCP",
            "IPv6/IPIP > IPv4/TCP",
            "IPv4/TCP",
            "IPv4/UDP",
            "IPv6/TCP",
            "IPv6/UDP",
            "IPv4/ICMP > IPv4/quoted",
            "IPv6/ICMPv6 > IPv6/quoted",
        ] {
            assert!(f.shapes.contains_key(shape), "no {shape} frame was checked: {:?}", f.shapes);
        }
        eprintln!(
            "{RANDOM_FRAMES} random frames (seed {seed:#x}), {} forwarded; checked: {:?}; counters: {:?}",
            f.forwarded,
            f.shapes,
            Counter::ALL
                .iter()
                .filter(|k| c[k] > 0)
                .map(|k| (k.name(), c[k]))
                .collect::<Vec<_>>()
        );
    });
}

/// Whether byte `at` of a frame is one no check covers: the MAC addresses, and outside an ICMP
/// quote (the ICMP checksum covers those) an IPv6 header's traffic class, flow label and hop
/// limit, and the addresses of an IPv6 tunnel header (no checksum covers them).
fn uncovered(layers: &[wellformed::Layer], at: usize) -> bool {
    let tunnel = |l: &wellformed::Layer| l.proto == 4 || l.proto == 41;
    at < 12
        || layers.iter().any(|l| {
            let o = l.offset;
            l.v6 && l.role != Role::Quoted
                && ((o..o + 4).contains(&at)
                    || at == o + 7
                    || (tunnel(l) && (o + 8..o + 40).contains(&at)))
        })
}

/// The checker can fail: of a well-formed frame the program forwarded (each kind: encapsulated
/// both ways, translated both ways, ICMP too big), every byte a check covers, changed, is
/// rejected; and a mutated frame `repair` fixes up reads as well formed.
#[test]
fn checker_rejects_every_changed_byte_of_forwarded_frames() {
    let net = FibNet::new("fuzzchk");
    net.ns.run(|| {
        let mut f = Fuzz::new(load(&net), net.lb0);
        let mut inputs = vec![
            Pkt::tcp(CLIENT4, 40000, DSR4, 80, LB0_MAC).frame(),
            Pkt::udp(CLIENT6, 40000, DSR6, 80, LB0_MAC).frame(),
            big(Pkt::tcp(CLIENT4, 40001, DSR4_SMALL, 80, LB0_MAC), 600).frame(),
            big(Pkt::tcp(CLIENT6, 40001, DSR6_SMALL, 80, LB0_MAC), 1250).frame(),
        ];
        let replies = f.node_seeds();
        inputs.extend(nat_client_packets().iter().take(4).map(Pkt::frame));
        inputs.extend(replies.into_iter().step_by(4).take(4));
        let mut kinds = BTreeMap::new();
        for input in &inputs {
            let run = f.run(input, &|| "a clean frame".into());
            if run.action == XDP_DROP || run.output == *input {
                continue;
            }
            let layers = check_forwarded(input, &run.output).unwrap();
            *kinds.entry(wellformed::shape(&layers)).or_insert(0) += 1;
            for at in 12..run.output.len() {
                if uncovered(&layers, at) {
                    continue;
                }
                let mut bad = run.output.clone();
                bad[at] ^= 1;
                assert!(
                    check_forwarded(input, &bad).is_err(),
                    "byte {at} of a {} frame changed, and the checker accepted it:\n{}",
                    wellformed::shape(&layers),
                    hex_all(&bad)
                );
            }
        }
        eprintln!("checked with every covered byte changed: {kinds:?}");
        for shape in [
            "IPv4/IPIP > IPv4/TCP",
            "IPv4/IPv6 > IPv6/UDP",
            "IPv4/TCP",
            "IPv4/UDP",
            "IPv6/TCP",
            "IPv6/UDP",
            "IPv4/ICMP > IPv4/quoted",
            "IPv6/ICMPv6 > IPv6/quoted",
        ] {
            assert!(kinds.contains_key(shape), "no {shape} frame: {kinds:?}");
        }
        // `repair` makes a mutated frame's checksums right again.
        for input in &inputs {
            let mut m = input.clone();
            let last = m.len() - 1;
            m[last] ^= 0x55;
            m[22] ^= 0x10;
            assert!(
                wellformed::layers(&m)
                    .unwrap()
                    .iter()
                    .any(|l| !l.problems.is_empty())
            );
            wellformed::repair(&mut m);
            let layers = wellformed::layers(&m).unwrap();
            assert!(
                layers.iter().all(|l| l.problems.is_empty()),
                "repaired frame still has problems: {layers:?}\n{}",
                hex_all(&m)
            );
        }
    });
}
