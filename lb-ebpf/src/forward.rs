//! Encapsulation for direct server return.
//!
//! The inner IP packet is kept byte for byte; any VLAN tag is dropped and a new Ethernet header
//! and an outer IPv4 (IPIP, or IPv6-in-IPv4) or IPv6 (IP6IP6, or IPv4-in-IPv6) header are put in
//! front of it. The outer family is the backend's. The member's next hop (resolved by the agent,
//! see [`next_hop`]) then gives the egress interface and the MAC addresses and checks the egress
//! MTU, or `bpf_fib_lookup` on the outer destination does where the agent has no entry: both in
//! [`crate::route`].

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_FRAG_NEEDED, xdp_action},
    helpers::generated::bpf_xdp_adjust_head,
    programs::XdpContext,
};
use lb_common::{Counter, FAMILY_V4, Member, NodeConfig, flow_hash, maps::OUTER_TTL};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::parse::{IPPROTO_IPIP, IPPROTO_IPV6};
use crate::{
    addr::node_addr,
    ipv4::{IPV4_DF, ipv4_checksum},
    parse::{ETH_P_IP, ETH_P_IPV6, Packet, ptr_at},
    route::{Hop, fib_params, lookup, next_hop, send},
    too_big,
    verdict::Verdict,
};

/// Encapsulates the packet towards member `member_id` (`backend`) and forwards it.
#[inline(always)]
pub fn encap_and_forward(
    ctx: &XdpContext,
    pkt: &Packet,
    member_id: u32,
    backend: &Member,
    node: &NodeConfig,
) -> Verdict {
    let outer_v4 = backend.family == FAMILY_V4;
    let outer_len = if outer_v4 { Ipv4Hdr::LEN } else { Ipv6Hdr::LEN };
    let Some(src) = node_addr(node, backend.family) else {
        return Verdict::new(Counter::DropNoSourceAddress, xdp_action::XDP_DROP);
    };
    let total_len = outer_len + pkt.ip_len;
    if total_len > u16::MAX as usize {
        return Verdict::new(Counter::DropTooBig, xdp_action::XDP_DROP);
    }
    // Keep the MAC addresses as received: if the kernel gets the packet after all (no neighbour
    // yet, local backend), it only accepts frames addressed to this host.
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Verdict::new(Counter::DropEncapFailed, xdp_action::XDP_DROP);
    };
    let (rx_dst, rx_src) = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    let (inner_proto, vcf) = tunnel_fields(pkt, outer_v4);

    // Route first, while the frame is still the client's packet: if the tunnel packet would not
    // fit the egress MTU, the client is told (quoting its packet) instead.
    let ingress = ctx.ingress_ifindex() as u32;
    let hop = next_hop(
        member_id,
        backend.generation,
        total_len as u32,
        node,
        || {
            let mut fib = fib_params(
                ingress,
                outer_v4,
                &src,
                &backend.addr,
                pkt.tos,
                inner_proto,
                total_len as u16,
            );
            if !outer_v4 {
                // With the flow label, so a route lookup that uses it sees the packet's own.
                fib.__bindgen_anon_2.flowinfo = (vcf & 0x0fff_ffff).to_be();
            }
            let rc = lookup(ctx, &mut fib);
            Hop::of_fib(&fib, rc)
        },
    );
    if hop.rc == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        return too_big::hand_over(ctx, pkt, hop.mtu.saturating_sub(outer_len as u32));
    }

    // Grow the headroom by the outer header, less the VLAN tag we drop.
    let grow = outer_len as i32 - (pkt.l3_off - EthHdr::LEN) as i32;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Verdict::new(Counter::DropEncapFailed, xdp_action::XDP_DROP);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Verdict::new(Counter::DropEncapFailed, xdp_action::XDP_DROP);
    };
    let eth = unsafe { &mut *eth };
    eth.dst_addr = rx_dst;
    eth.src_addr = rx_src;

    let written = if outer_v4 {
        eth.ether_type = ETH_P_IP.to_be();
        write_outer_v4(ctx, pkt, backend, node, total_len, inner_proto)
    } else {
        eth.ether_type = ETH_P_IPV6.to_be();
        write_outer_v6(ctx, pkt, backend, node, vcf, inner_proto)
    };
    if !written {
        return Verdict::new(Counter::DropEncapFailed, xdp_action::XDP_DROP);
    }
    send(ctx, &hop, ingress, rx_dst, rx_src)
}

/// The tunnel's inner protocol (IPIP or IPv6-in-IP: the inner packet's family) and, for an
/// IPv6 outer header (`!outer_v4`), its first word: version 6, the inner traffic class, and a
/// flow label from the flow hash so that ECMP and RSS downstream can spread flows (RFC 6438).
#[inline(always)]
fn tunnel_fields(pkt: &Packet, outer_v4: bool) -> (u8, u32) {
    let inner_proto = if pkt.key.family == FAMILY_V4 {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    };
    let vcf = if outer_v4 {
        0
    } else {
        (6u32 << 28) | ((pkt.tos as u32) << 20) | (flow_hash(&pkt.key) & 0x000f_ffff)
    };
    (inner_proto, vcf)
}

/// Writes the outer IPv4 header of a tunnel packet of `total_len` bytes to `backend` after the
/// Ethernet header; false if the frame is too short for it.
#[inline(always)]
fn write_outer_v4(
    ctx: &XdpContext,
    pkt: &Packet,
    backend: &Member,
    node: &NodeConfig,
    total_len: usize,
    inner_proto: u8,
) -> bool {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return false;
    };
    let ip = unsafe { &mut *ip };
    ip.vihl = 0x45;
    ip.tos = pkt.tos;
    ip.tot_len = (total_len as u16).to_be_bytes();
    ip.id = [0, 0];
    ip.frags = IPV4_DF.to_be_bytes();
    ip.ttl = OUTER_TTL;
    ip.proto = inner_proto;
    ip.check = [0, 0];
    ip.src_addr = node.src_v4;
    ip.dst_addr = [
        backend.addr[0],
        backend.addr[1],
        backend.addr[2],
        backend.addr[3],
    ];
    ip.check = ipv4_checksum(ip).to_be_bytes();
    true
}

/// Writes the outer IPv6 header (first word `vcf`) of a tunnel to `backend` after the Ethernet
/// header; false if the frame is too short for it.
#[inline(always)]
fn write_outer_v6(
    ctx: &XdpContext,
    pkt: &Packet,
    backend: &Member,
    node: &NodeConfig,
    vcf: u32,
    inner_proto: u8,
) -> bool {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
        return false;
    };
    let ip = unsafe { &mut *ip };
    ip.vcf = vcf.to_be_bytes();
    ip.payload_len = (pkt.ip_len as u16).to_be_bytes();
    ip.next_hdr = inner_proto;
    ip.hop_limit = OUTER_TTL;
    ip.src_addr = node.src_v6;
    ip.dst_addr = backend.addr;
    true
}
