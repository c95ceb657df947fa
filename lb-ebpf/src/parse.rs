//! Bounds-checked parsing of a frame into the flow it belongs to.
//!
//! Every header access goes through [`ptr_at`], which checks the end of the frame first: the
//! verifier insists, and a truncated frame must never fault. The parser reads; it never writes.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Counter, FAMILY_V4, FAMILY_V6, FlowKey, IPPROTO_TCP, IPPROTO_UDP, VipAddr,
    maps::MAX_IPV6_EXT_HEADERS,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
    vlan::VlanHdr,
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;

/// IP protocol numbers and ICMP message types the program handles, defined once here.
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const ICMP_DEST_UNREACH: u8 = 3;
/// Code of `ICMP_DEST_UNREACH`: fragmentation needed and DF set.
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PKT_TOOBIG: u8 = 2;
pub const ICMPV6_TIME_EXCEED: u8 = 3;
/// Type, code, checksum and the 4 bytes after them, in ICMP and ICMPv6 alike.
pub const ICMP_HDR_LEN: usize = 8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

/// IPv4 `frag_off`: more-fragments flag and fragment offset. DF is not a fragment.
const IPV4_MF_OR_OFFSET: u16 = 0x3fff;
/// IPv6 fragment header: offset and M flag. Offset 0 without M is an atomic fragment (RFC 6946).
const IPV6_FRAG_OFFSET_OR_M: u16 = 0xfff9;
pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;
const TCP_HDR_LEN: usize = 20;

/// A pointer to a `T` at `off` bytes into the frame, if the frame is long enough to hold it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

/// A TCP or UDP packet that could be for a VIP.
pub struct Packet {
    pub key: FlowKey,
    /// Offset of the IP header (14, or 18 behind a VLAN tag).
    pub l3_off: usize,
    /// Length of the IP packet by its own header (the frame may carry trailing padding).
    pub ip_len: usize,
    /// Offset of the TCP or UDP header.
    pub l4_off: usize,
    /// IPv4 TOS or IPv6 traffic class (DSCP and ECN), copied to the outer header.
    pub tos: u8,
    /// TCP with SYN set.
    pub syn: bool,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// NAT mode: the VIP balances by least connections, so a new translation is counted
    /// (`NAT_JOB_F_LEAST_CONN`; in the padding after the flags, so it costs no stack).
    pub counted: bool,
}

/// An ICMP (IPv4) or ICMPv6 (IPv6) message: errors about a VIP's flows are sent on to their
/// backend (DSR) or translated back to their client (NAT).
pub struct Icmp {
    pub dst: VipAddr,
    pub l3_off: usize,
    /// Length of the IP packet by its own header.
    pub ip_len: usize,
    pub l4_off: usize,
    pub tos: u8,
}

pub enum Parsed {
    Packet(Packet),
    /// Not IP, or IP but neither TCP, UDP nor ICMP: none of lb's business.
    NotForUs,
    /// ICMP for IPv4, ICMPv6 for IPv6.
    Icmp(Icmp),
    /// The L2 or L3 header is truncated or invalid: we can't even trust the destination.
    Malformed,
    /// A valid IP header to `dst` whose packet can't be balanced (`why` is the verdict to give if
    /// `dst` carries a VIP: `DropFragment` or `DropMalformed`).
    Unbalanceable {
        dst: VipAddr,
        why: Counter,
    },
}

#[inline(always)]
fn v4_addr(a: [u8; 4]) -> [u8; 16] {
    [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

#[inline(always)]
pub fn parse(ctx: &XdpContext, count: impl Fn(Counter)) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::Malformed;
    };
    let mut l3_off = EthHdr::LEN;
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    if ether_type == ETH_P_8021Q {
        let Some(vlan) = ptr_at::<VlanHdr>(ctx, l3_off) else {
            return Parsed::Malformed;
        };
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        l3_off += VlanHdr::LEN;
    }
    let frame_len = ctx.data_end() - ctx.data();
    match ether_type {
        ETH_P_IP => parse_v4(ctx, l3_off, frame_len, count),
        ETH_P_IPV6 => parse_v6(ctx, l3_off, frame_len, count),
        _ => Parsed::NotForUs,
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3_off: usize, frame_len: usize, count: impl Fn(Counter)) -> Parsed {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3_off) else {
        return Parsed::Malformed;
    };
    let ip = unsafe { &*ip };
    let hdr_len = ((ip.vihl & 0x0f) as usize) * 4;
    let ip_len = u16::from_be_bytes(ip.tot_len) as usize;
    if ip.vihl >> 4 != 4
        || hdr_len < Ipv4Hdr::LEN
        || ip_len < hdr_len
        || l3_off + ip_len > frame_len
    {
        return Parsed::Malformed;
    }
    let dst = VipAddr {
        addr: v4_addr(ip.dst_addr),
        family: FAMILY_V4,
        _pad: [0; 3],
    };
    if u16::from_be_bytes(ip.frags) & IPV4_MF_OR_OFFSET != 0 {
        count(Counter::Fragments);
        return Parsed::Unbalanceable {
            dst,
            why: Counter::DropFragment,
        };
    }
    let key = FlowKey {
        src: v4_addr(ip.src_addr),
        dst: dst.addr,
        src_port: 0,
        dst_port: 0,
        proto: ip.proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    let tos = ip.tos;
    parse_l4(ctx, key, dst, l3_off, l3_off + hdr_len, ip_len, tos)
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3_off: usize, frame_len: usize, count: impl Fn(Counter)) -> Parsed {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3_off) else {
        return Parsed::Malformed;
    };
    let ip = unsafe { &*ip };
    let ip_len = Ipv6Hdr::LEN + u16::from_be_bytes(ip.payload_len) as usize;
    if ip.vcf[0] >> 4 != 6 || l3_off + ip_len > frame_len {
        return Parsed::Malformed;
    }
    let dst = VipAddr {
        addr: ip.dst_addr,
        family: FAMILY_V6,
        _pad: [0; 3],
    };
    let tos = (ip.vcf[0] << 4) | (ip.vcf[1] >> 4);
    let src = ip.src_addr;
    let mut next = ip.next_hdr;
    let mut off = l3_off + Ipv6Hdr::LEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH => {
                let Some(h) = ptr_at::<[u8; 2]>(ctx, off) else {
                    return Parsed::Unbalanceable {
                        dst,
                        why: Counter::DropMalformed,
                    };
                };
                let h = unsafe { *h };
                // AH counts its length in 4-byte units minus 2, the others in 8-byte units minus 1.
                off += if next == IPPROTO_AH {
                    (h[1] as usize + 2) * 4
                } else {
                    (h[1] as usize + 1) * 8
                };
                next = h[0];
            }
            IPPROTO_FRAGMENT => {
                let Some(h) = ptr_at::<[u8; 4]>(ctx, off) else {
                    return Parsed::Unbalanceable {
                        dst,
                        why: Counter::DropMalformed,
                    };
                };
                let h = unsafe { *h };
                if u16::from_be_bytes([h[2], h[3]]) & IPV6_FRAG_OFFSET_OR_M != 0 {
                    count(Counter::Fragments);
                    return Parsed::Unbalanceable {
                        dst,
                        why: Counter::DropFragment,
                    };
                }
                next = h[0];
                off += 8;
            }
            _ => break,
        }
    }
    if matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT
    ) {
        count(Counter::Ipv6ExtLimit);
        return Parsed::Unbalanceable {
            dst,
            why: Counter::DropMalformed,
        };
    }
    let key = FlowKey {
        src,
        dst: dst.addr,
        src_port: 0,
        dst_port: 0,
        proto: next,
        family: FAMILY_V6,
        _pad: [0; 2],
    };
    parse_l4(ctx, key, dst, l3_off, off, ip_len, tos)
}

#[inline(always)]
fn parse_l4(
    ctx: &XdpContext,
    mut key: FlowKey,
    dst: VipAddr,
    l3_off: usize,
    l4_off: usize,
    ip_len: usize,
    tos: u8,
) -> Parsed {
    let ip_end = l3_off + ip_len;
    let malformed = Parsed::Unbalanceable {
        dst,
        why: Counter::DropMalformed,
    };
    let mut tcp_flags = 0;
    match key.proto {
        IPPROTO_TCP => {
            let Some(tcp) = ptr_at::<[u8; TCP_HDR_LEN]>(ctx, l4_off) else {
                return malformed;
            };
            let tcp = unsafe { &*tcp };
            // The data offset (options included) must leave the header inside the IP packet.
            let doff = (tcp[12] >> 4) as usize;
            if doff < 5 || l4_off + doff * 4 > ip_end {
                return malformed;
            }
            key.src_port = u16::from_ne_bytes([tcp[0], tcp[1]]);
            key.dst_port = u16::from_ne_bytes([tcp[2], tcp[3]]);
            tcp_flags = tcp[13];
        }
        IPPROTO_UDP => {
            let Some(udp) = ptr_at::<UdpHdr>(ctx, l4_off) else {
                return malformed;
            };
            let udp = unsafe { &*udp };
            // The UDP length covers header and data: under 8 (0 included: IPv6 jumbograms are
            // not supported) or past the IP packet is a lie the backend would have to resolve.
            let len = u16::from_be_bytes(udp.len) as usize;
            if len < UdpHdr::LEN || l4_off + len > ip_end {
                return malformed;
            }
            key.src_port = u16::from_ne_bytes(udp.src);
            key.dst_port = u16::from_ne_bytes(udp.dst);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6
            if (key.proto == IPPROTO_ICMP) == (key.family == FAMILY_V4) =>
        {
            return Parsed::Icmp(Icmp {
                dst,
                l3_off,
                ip_len,
                l4_off,
                tos,
            });
        }
        _ => return Parsed::NotForUs,
    }
    Parsed::Packet(Packet {
        key,
        l3_off,
        ip_len,
        l4_off,
        tos,
        syn: tcp_flags & TCP_FLAG_SYN != 0,
        tcp_flags,
        counted: false,
    })
}

/// See `lb_floor`: Ethernet, IPv4 (any header length), TCP, then `XDP_TX`; `XDP_PASS` otherwise.
#[inline(always)]
pub fn floor(ctx: &XdpContext) -> u32 {
    use aya_ebpf::bindings::xdp_action;
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return xdp_action::XDP_PASS;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return xdp_action::XDP_PASS;
    };
    let ip = unsafe { &*ip };
    let hdr_len = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.proto != IPPROTO_TCP || hdr_len < Ipv4Hdr::LEN {
        return xdp_action::XDP_PASS;
    }
    match ptr_at::<[u8; TCP_HDR_LEN]>(ctx, EthHdr::LEN + hdr_len) {
        Some(_) => xdp_action::XDP_TX,
        None => xdp_action::XDP_PASS,
    }
}
