//! The benchmark's cost probes (never attached, never pinned): each runs the program's own parser
//! and then one operation of the fast path in isolation, so `cargo xtask bench` can say what each
//! costs next to the floor. They return `XDP_TX` when the operation did what it should, else
//! `XDP_ABORTED`, so a probe that did not take its path cannot pass for fast.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::FlowValue;

use crate::{
    LB_FLOWS, LB_PROBE_FLOWS, LB_VIPS,
    parse::{Packet, Parsed, parse},
    route::{fib_params, lookup},
};

#[inline(always)]
fn packet(ctx: &XdpContext) -> Option<Packet> {
    match parse(ctx, |_| {}) {
        Parsed::Packet(p) => Some(p),
        _ => None,
    }
}

#[inline(always)]
fn verdict(ok: bool) -> u32 {
    if ok {
        xdp_action::XDP_TX
    } else {
        xdp_action::XDP_ABORTED
    }
}

/// The parser alone.
#[inline(always)]
pub fn parse_only(ctx: &XdpContext) -> u32 {
    verdict(packet(ctx).is_some())
}

/// Parser + VIP-table lookup (a hit).
#[inline(always)]
pub fn vip_lookup(ctx: &XdpContext) -> u32 {
    let Some(p) = packet(ctx) else {
        return verdict(false);
    };
    let key = p.key.vip_key();
    verdict(unsafe { LB_VIPS.get(key) }.is_some())
}

/// Parser + IPv4 flow-table lookup (a hit for an established flow of VIP id 0).
#[inline(always)]
pub fn flow_lookup(ctx: &XdpContext) -> u32 {
    let Some(p) = packet(ctx) else {
        return verdict(false);
    };
    verdict(crate::flows::lookup(lb_common::flowtab::pack_key(&p.key, 0)).is_some())
}

/// Parser + IPv6-style flow-table lookup (the LRU hash of 40-byte keys; a miss for IPv4).
#[inline(always)]
pub fn lru_lookup(ctx: &XdpContext) -> u32 {
    let Some(p) = packet(ctx) else {
        return verdict(false);
    };
    verdict(unsafe { LB_FLOWS.get(p.key) }.is_none())
}

/// Parser + an insert into an LRU hash like the IPv6 flow table (`LB_PROBE_FLOWS`, small, so
/// nearly every insert evicts): what an IPv4 new flow cost before the bucket table.
#[inline(always)]
pub fn flow_insert(ctx: &XdpContext) -> u32 {
    let Some(p) = packet(ctx) else {
        return verdict(false);
    };
    verdict(
        LB_PROBE_FLOWS
            .insert(p.key, FlowValue::default(), 0)
            .is_ok(),
    )
}

/// Parser + `bpf_fib_lookup` towards the packet's own source (a route that must resolve).
#[inline(always)]
pub fn fib(ctx: &XdpContext) -> u32 {
    let Some(p) = packet(ctx) else {
        return verdict(false);
    };
    let ingress = ctx.ingress_ifindex() as u32;
    let mut f = fib_params(
        ingress,
        true,
        &p.key.dst,
        &p.key.src,
        0,
        p.key.proto,
        p.ip_len as u16,
    );
    verdict(lookup(ctx, &mut f) == aya_ebpf::bindings::BPF_FIB_LKUP_RET_SUCCESS)
}
