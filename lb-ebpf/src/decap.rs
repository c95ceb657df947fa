//! Decapsulation for backends, as an XDP program: strips the outer IPv4 or IPv6 header of an IPIP,
//! IPv6-in-IPv4, IP6IP6 or IPv4-in-IPv6 packet and hands the inner packet to the stack, which
//! delivers it to the VIP on loopback. For backends whose kernel has no tunnel devices (or that
//! would rather not configure them). It decapsulates whatever tunnel packet arrives, like a tunnel
//! device with `remote any`: attach it only where the network in front is trusted.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_adjust_head, programs::XdpContext,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::parse::{ETH_P_IP, ETH_P_IPV6, ptr_at};
use crate::parse::{IPPROTO_IPIP, IPPROTO_IPV6};

#[inline(always)]
pub fn decap(ctx: &XdpContext) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    let (dst, src, ether_type) = unsafe {
        (
            (*eth).dst_addr,
            (*eth).src_addr,
            u16::from_be((*eth).ether_type),
        )
    };
    let (outer_len, inner) = match ether_type {
        ETH_P_IP => {
            let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
                return xdp_action::XDP_PASS;
            };
            let ip = unsafe { &*ip };
            // Only plain 20-byte outer headers, unfragmented: anything else is for the stack.
            if ip.vihl != 0x45 || u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
                return xdp_action::XDP_PASS;
            }
            (Ipv4Hdr::LEN, ip.proto)
        }
        ETH_P_IPV6 => {
            let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
                return xdp_action::XDP_PASS;
            };
            (Ipv6Hdr::LEN, unsafe { (*ip).next_hdr })
        }
        _ => return xdp_action::XDP_PASS,
    };
    let inner_type = match inner {
        IPPROTO_IPIP => ETH_P_IP,
        IPPROTO_IPV6 => ETH_P_IPV6,
        _ => return xdp_action::XDP_PASS,
    };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return xdp_action::XDP_PASS;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    let eth = unsafe { &mut *eth };
    eth.dst_addr = dst;
    eth.src_addr = src;
    eth.ether_type = inner_type.to_be();
    xdp_action::XDP_PASS
}
