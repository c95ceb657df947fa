//! A small builder for the frames the fixtures feed the program, and for the frames they expect
//! back. Checksums are computed by etherparse, independently of the program under test.

use std::net::IpAddr;

use etherparse::{
    IpDscp, IpEcn, IpFragOffset, IpNumber, Ipv4Header, Ipv4Options, Ipv6FlowLabel, Ipv6Header,
    TcpHeader, UdpHeader,
};
use lb_common::{FAMILY_V4, FAMILY_V6, FlowKey, IPPROTO_TCP, IPPROTO_UDP};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// MAC of the test's upstream router, the source of every input frame.
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        flags: u8,
    },
    Udp,
    /// Any other IP protocol, with the payload as its body.
    Other(u8),
}

/// One frame: Ethernet (optionally one VLAN tag), IPv4 or IPv6, TCP/UDP/other.
#[derive(Clone, Debug)]
pub struct Pkt {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    /// IPv4 TOS or IPv6 traffic class.
    pub tos: u8,
    /// IPv4 options (a multiple of 4 bytes).
    pub v4_options: Vec<u8>,
    /// IPv4 more-fragments flag and offset (in 8-byte units).
    pub v4_frag: (bool, u16),
    /// IPv4 don't-fragment flag (set unless cleared).
    pub v4_df: bool,
    /// IPv6 extension headers in order: (type, whole header); byte 0 is filled in.
    pub v6_ext: Vec<(u8, Vec<u8>)>,
    pub payload: Vec<u8>,
    /// Bytes after the IP packet (Ethernet padding).
    pub trailer: Vec<u8>,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// IPv4 UDP only: false sends no checksum (zero).
    pub udp_checksum: bool,
}

fn parse_ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("bad address {s}: {e}"))
}

impl Pkt {
    fn new(l4: L4, src: &str, sport: u16, dst: &str, dport: u16, dst_mac: [u8; 6]) -> Self {
        Self {
            eth_dst: dst_mac,
            eth_src: ROUTER_MAC,
            vlan: None,
            src: parse_ip(src),
            dst: parse_ip(dst),
            sport,
            dport,
            l4,
            tos: 0,
            v4_options: vec![],
            v4_frag: (false, 0),
            v4_df: true,
            v6_ext: vec![],
            payload: b"hello lb".to_vec(),
            trailer: vec![],
            ttl: 64,
            udp_checksum: true,
        }
    }

    /// A TCP SYN from `src:sport` to `dst:dport`, addressed to the MAC `to`.
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, to: [u8; 6]) -> Self {
        Self::new(L4::Tcp { flags: TCP_SYN }, src, sport, dst, dport, to)
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16, to: [u8; 6]) -> Self {
        Self::new(L4::Udp, src, sport, dst, dport, to)
    }

    pub fn with(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }

    pub fn family(&self) -> u8 {
        if self.src.is_ipv4() {
            FAMILY_V4
        } else {
            FAMILY_V6
        }
    }

    fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp => IPPROTO_UDP,
            L4::Other(p) => p,
        }
    }

    /// The flow key the program should derive from this packet.
    pub fn flow_key(&self) -> FlowKey {
        FlowKey {
            src: addr16(self.src),
            dst: addr16(self.dst),
            src_port: self.sport.to_be(),
            dst_port: self.dport.to_be(),
            proto: self.proto(),
            family: self.family(),
            _pad: [0; 2],
        }
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match (&self.l4, self.src, self.dst) {
            (L4::Tcp { flags }, s, d) => {
                let mut h = TcpHeader::new(self.sport, self.dport, 0x0102_0304, 64240);
                h.fin = flags & TCP_FIN != 0;
                h.syn = flags & TCP_SYN != 0;
                h.rst = flags & TCP_RST != 0;
                h.psh = flags & TCP_PSH != 0;
                h.ack = flags & TCP_ACK != 0;
                if h.ack {
                    h.acknowledgment_number = 0x0a0b_0c0d;
                }
                h.checksum = match (s, d) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => {
                        h.calc_checksum_ipv4_raw(s.octets(), d.octets(), &self.payload)
                    }
                    (IpAddr::V6(s), IpAddr::V6(d)) => {
                        h.calc_checksum_ipv6_raw(s.octets(), d.octets(), &self.payload)
                    }
                    _ => panic!("mixed address families"),
                }
                .expect("tcp checksum");
                out.extend_from_slice(&h.to_bytes());
            }
            (L4::Udp, IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut h =
                    UdpHeader::without_ipv4_checksum(self.sport, self.dport, self.payload.len())
                        .unwrap();
                if self.udp_checksum {
                    h.checksum = h
                        .calc_checksum_ipv4_raw(s.octets(), d.octets(), &self.payload)
                        .unwrap();
                }
                out.extend_from_slice(&h.to_bytes());
            }
            (L4::Udp, IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut h =
                    UdpHeader::without_ipv4_checksum(self.sport, self.dport, self.payload.len())
                        .unwrap();
                h.checksum = h
                    .calc_checksum_ipv6_raw(s.octets(), d.octets(), &self.payload)
                    .unwrap();
                out.extend_from_slice(&h.to_bytes());
            }
            (L4::Udp, _, _) => panic!("mixed address families"),
            (L4::Other(_), _, _) => {}
        }
        out.extend_from_slice(&self.payload);
        out
    }

    /// The IP packet alone (what a backend decapsulates).
    pub fn ip_bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut h =
                    Ipv4Header::new(0, self.ttl, IpNumber(self.proto()), s.octets(), d.octets())
                        .unwrap();
                h.options = Ipv4Options::try_from(&self.v4_options[..])
                    .expect("ipv4 options: a multiple of 4 bytes, at most 40");
                h.set_payload_len(l4.len()).unwrap();
                h.identification = 0x1234;
                h.dscp = IpDscp::try_new(self.tos >> 2).unwrap();
                h.ecn = IpEcn::try_new(self.tos & 3).unwrap();
                h.dont_fragment = self.v4_df;
                h.more_fragments = self.v4_frag.0;
                h.fragment_offset = IpFragOffset::try_new(self.v4_frag.1).unwrap();
                h.header_checksum = h.calc_header_checksum();
                let mut out = h.to_bytes().to_vec();
                out.extend_from_slice(&l4);
                out
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut ext = Vec::new();
                for (i, (_, bytes)) in self.v6_ext.iter().enumerate() {
                    let next = self
                        .v6_ext
                        .get(i + 1)
                        .map(|(t, _)| *t)
                        .unwrap_or(self.proto());
                    let mut b = bytes.clone();
                    b[0] = next;
                    ext.extend_from_slice(&b);
                }
                let h = Ipv6Header {
                    traffic_class: self.tos,
                    flow_label: Ipv6FlowLabel::ZERO,
                    payload_length: (ext.len() + l4.len()) as u16,
                    next_header: IpNumber(
                        self.v6_ext.first().map(|(t, _)| *t).unwrap_or(self.proto()),
                    ),
                    hop_limit: self.ttl,
                    source: s.octets(),
                    destination: d.octets(),
                };
                let mut out = h.to_bytes().to_vec();
                out.extend_from_slice(&ext);
                out.extend_from_slice(&l4);
                out
            }
            _ => panic!("mixed address families"),
        }
    }

    /// The whole frame.
    pub fn frame(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.eth_dst);
        out.extend_from_slice(&self.eth_src);
        if let Some(tci) = self.vlan {
            out.extend_from_slice(&0x8100u16.to_be_bytes());
            out.extend_from_slice(&tci.to_be_bytes());
        }
        let ethertype: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        out.extend_from_slice(&ethertype.to_be_bytes());
        out.extend_from_slice(&self.ip_bytes());
        out.extend_from_slice(&self.trailer);
        out
    }
}

/// An address in lb's 16-byte form (IPv4 in the first four bytes).
pub fn addr16(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => {
            let mut out = [0; 16];
            out[..4].copy_from_slice(&a.octets());
            out
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// IPv6 extension headers for fixtures (byte 0, the next header, is filled in by the builder).
pub mod ext {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const AH: u8 = 51;
    pub const DEST_OPTS: u8 = 60;

    /// Hop-by-hop options, 8 bytes: one PadN option.
    pub fn hop_by_hop() -> (u8, Vec<u8>) {
        (HOP_BY_HOP, vec![0, 0, 1, 4, 0, 0, 0, 0])
    }

    /// Destination options, 16 bytes: one PadN option.
    pub fn dest_opts() -> (u8, Vec<u8>) {
        let mut b = vec![0, 1, 1, 12];
        b.resize(16, 0);
        (DEST_OPTS, b)
    }

    /// Authentication header with a 12-byte ICV: 24 bytes, length field 4.
    pub fn ah() -> (u8, Vec<u8>) {
        let mut b = vec![0, 4, 0, 0, 0, 0, 0x10, 0x01, 0, 0, 0, 1];
        b.resize(24, 0xab);
        (AH, b)
    }

    /// Fragment header with `offset` (8-byte units) and the M flag.
    pub fn fragment(offset: u16, more: bool) -> (u8, Vec<u8>) {
        let v = (offset << 3) | more as u16;
        let [hi, lo] = v.to_be_bytes();
        (FRAGMENT, vec![0, 0, hi, lo, 0xde, 0xad, 0xbe, 0xef])
    }
}

/// The frame the program should emit for `pkt` encapsulated to `backend`, from `outer_src`, with
/// the given MAC addresses: what a correct IPIP / IP6IP6 encapsulation looks like, built here
/// from the RFCs (2003, 2473) rather than from the program.
pub fn encapsulated(
    pkt: &Pkt,
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    outer_src: IpAddr,
    backend: IpAddr,
) -> Vec<u8> {
    let mut out = encapsulated_ip(
        &pkt.ip_bytes(),
        pkt.tos,
        &pkt.flow_key(),
        eth_dst,
        eth_src,
        outer_src,
        backend,
    );
    out.extend_from_slice(&pkt.trailer);
    out
}

/// [`encapsulated`] for any IP packet `inner` (traffic class `tos`) of flow `key` (which gives
/// the IPv6 flow label).
pub fn encapsulated_ip(
    inner: &[u8],
    tos: u8,
    key: &FlowKey,
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    outer_src: IpAddr,
    backend: IpAddr,
) -> Vec<u8> {
    let inner_proto = if inner[0] >> 4 == 4 { 4 } else { 41 };
    let mut out = Vec::new();
    out.extend_from_slice(&eth_dst);
    out.extend_from_slice(&eth_src);
    match (outer_src, backend) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut h = Ipv4Header::new(
                inner.len() as u16,
                64,
                IpNumber(inner_proto),
                s.octets(),
                d.octets(),
            )
            .unwrap();
            h.dont_fragment = true;
            h.identification = 0;
            h.dscp = IpDscp::try_new(tos >> 2).unwrap();
            h.ecn = IpEcn::try_new(tos & 3).unwrap();
            h.header_checksum = h.calc_header_checksum();
            out.extend_from_slice(&h.to_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&0x86ddu16.to_be_bytes());
            let label = lb_common::flow_hash(key) & 0xf_ffff;
            let h = Ipv6Header {
                traffic_class: tos,
                flow_label: Ipv6FlowLabel::try_new(label).unwrap(),
                payload_length: inner.len() as u16,
                next_header: IpNumber(inner_proto),
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
            };
            out.extend_from_slice(&h.to_bytes());
        }
        _ => panic!("outer source and backend of different families"),
    }
    out.extend_from_slice(inner);
    out
}

/// An ICMP error kind, for [`icmp_error`].
#[derive(Clone, Copy, Debug)]
pub enum IcmpError {
    /// IPv4 destination unreachable, fragmentation needed, with this next-hop MTU.
    FragNeeded(u16),
    /// ICMPv6 packet too big with this MTU.
    PacketTooBig(u32),
    /// Time exceeded in transit (IPv4 or IPv6).
    TimeExceeded,
    /// Port unreachable (IPv4 or IPv6).
    PortUnreachable,
}

/// The frame of an ICMP (IPv4) or ICMPv6 error `kind` from `from` to `to` quoting `quote`,
/// with TTL / hop limit `ttl`, DF and identification 0, traffic class 0. Built, checksums
/// included, by etherparse.
pub fn icmp_error(
    kind: IcmpError,
    from: IpAddr,
    to: IpAddr,
    ttl: u8,
    quote: &[u8],
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
) -> Vec<u8> {
    use etherparse::{
        Icmpv4Type, Icmpv6Type, IpHeaders, PacketBuilder,
        icmpv4::{self, DestUnreachableHeader},
        icmpv6::{self, DestUnreachableCode},
    };
    let builder = PacketBuilder::ethernet2(eth_src, eth_dst);
    let mut out = Vec::new();
    match (from, to) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            let mut h =
                Ipv4Header::new(0, ttl, IpNumber::ICMP, from.octets(), to.octets()).unwrap();
            h.dont_fragment = true;
            h.identification = 0;
            let ty =
                match kind {
                    IcmpError::FragNeeded(next_hop_mtu) => Icmpv4Type::DestinationUnreachable(
                        DestUnreachableHeader::FragmentationNeeded { next_hop_mtu },
                    ),
                    IcmpError::TimeExceeded => {
                        Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit)
                    }
                    IcmpError::PortUnreachable => {
                        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
                    }
                    IcmpError::PacketTooBig(_) => panic!("packet too big is ICMPv6"),
                };
            builder
                .ip(IpHeaders::Ipv4(h, Default::default()))
                .icmpv4(ty)
                .write(&mut out, quote)
                .unwrap();
        }
        (IpAddr::V6(from), IpAddr::V6(to)) => {
            let h = Ipv6Header {
                traffic_class: 0,
                flow_label: Ipv6FlowLabel::ZERO,
                payload_length: 0,
                next_header: IpNumber::IPV6_ICMP,
                hop_limit: ttl,
                source: from.octets(),
                destination: to.octets(),
            };
            let ty = match kind {
                IcmpError::PacketTooBig(mtu) => Icmpv6Type::PacketTooBig { mtu },
                IcmpError::TimeExceeded => {
                    Icmpv6Type::TimeExceeded(icmpv6::TimeExceededCode::HopLimitExceeded)
                }
                IcmpError::PortUnreachable => {
                    Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port)
                }
                IcmpError::FragNeeded(_) => panic!("fragmentation needed is ICMPv4"),
            };
            builder
                .ip(IpHeaders::Ipv6(h, Default::default()))
                .icmpv6(ty)
                .write(&mut out, quote)
                .unwrap();
        }
        _ => panic!("mixed address families"),
    }
    out
}

/// The ICMP too big a router sends back for `pkt` (RFC 792/1191 fragmentation needed for IPv4,
/// RFC 4443 packet too big for IPv6) with MTU `mtu`, from `pkt`'s destination to its source,
/// quoting as much of `pkt` as fits in 576 (IPv4, RFC 1812 4.3.2.3) or 1280 bytes (IPv6, RFC
/// 4443 2.4(c)); marked CS6 (network control), TTL 64, IPv4 with DF and identification 0.
/// Built, checksums included, by etherparse.
pub fn too_big_reply(pkt: &Pkt, mtu: u32, eth_dst: [u8; 6], eth_src: [u8; 6]) -> Vec<u8> {
    use etherparse::{
        Icmpv4Type, Icmpv6Type, IpHeaders, PacketBuilder, icmpv4::DestUnreachableHeader,
    };
    let ip = pkt.ip_bytes();
    let builder = PacketBuilder::ethernet2(eth_src, eth_dst);
    let mut out = Vec::new();
    match (pkt.dst, pkt.src) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            let quote = &ip[..ip.len().min(576 - 20 - 8)];
            let mut h = Ipv4Header::new(0, 64, IpNumber::ICMP, from.octets(), to.octets()).unwrap();
            h.dont_fragment = true;
            h.identification = 0;
            h.dscp = IpDscp::try_new(0xc0 >> 2).unwrap();
            let next_hop_mtu = u16::try_from(mtu).unwrap();
            builder
                .ip(IpHeaders::Ipv4(h, Default::default()))
                .icmpv4(Icmpv4Type::DestinationUnreachable(
                    DestUnreachableHeader::FragmentationNeeded { next_hop_mtu },
                ))
                .write(&mut out, quote)
                .unwrap();
        }
        (IpAddr::V6(from), IpAddr::V6(to)) => {
            let quote = &ip[..ip.len().min(1280 - 40 - 8)];
            let h = Ipv6Header {
                traffic_class: 0xc0,
                flow_label: Ipv6FlowLabel::ZERO,
                payload_length: 0,
                next_header: IpNumber::IPV6_ICMP,
                hop_limit: 64,
                source: from.octets(),
                destination: to.octets(),
            };
            builder
                .ip(IpHeaders::Ipv6(h, Default::default()))
                .icmpv6(Icmpv6Type::PacketTooBig { mtu })
                .write(&mut out, quote)
                .unwrap();
        }
        _ => panic!("mixed address families"),
    }
    out
}
