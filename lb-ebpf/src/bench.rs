//! The benchmarks' programs and maps: the floor (`lb_floor`), the live-frames generator
//! (`lb_gen`) and the cost probes (`lb_probe_*`, see [`crate::probe`]). Not the load balancer:
//! they live in its object so that the bench measures the very code `lb` runs, and they cost an
//! agent only their two small maps (`LB_GEN_FRAME`, `LB_PROBE_FLOWS`), which are never pinned.

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, LruHashMap},
    programs::XdpContext,
};
use lb_common::{
    FlowKey, FlowValue,
    maps::{GEN_FRAME_LEN, PROBE_FLOW_ENTRIES},
};

/// The benchmarks' floor: parses Ethernet, IPv4 and TCP with the same bounds checks as `lb`,
/// then transmits. Anything a load balancer must do costs at least this.
#[xdp]
pub fn lb_floor(ctx: XdpContext) -> u32 {
    crate::parse::floor(&ctx)
}

/// Template frame for `lb_gen` (benchmarks only; never pinned).
#[map]
pub static LB_GEN_FRAME: Array<[u8; GEN_FRAME_LEN]> = Array::with_max_entries(1, 0);

/// The benchmarks' traffic generator for live-frames mode: overwrites the first
/// `GEN_FRAME_LEN` bytes of the frame with the template and transmits it. Recycled pages come
/// back holding whatever the receiver made of them (an encapsulated packet), so the template
/// is restored every time.
#[xdp]
pub fn lb_gen(ctx: XdpContext) -> u32 {
    let Some(tpl) = LB_GEN_FRAME.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    match crate::parse::ptr_at::<[u8; GEN_FRAME_LEN]>(&ctx, 0) {
        Some(p) => {
            unsafe { *p = *tpl };
            xdp_action::XDP_TX
        }
        None => xdp_action::XDP_ABORTED,
    }
}

/// The cost probes' LRU table (benchmarks only; never pinned): small, so it costs an agent
/// little memory and nearly every probe insert evicts.
#[map]
pub static LB_PROBE_FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(PROBE_FLOW_ENTRIES, 0);

/// Cost probes (see [`crate::probe`]; benchmarks only).
#[xdp]
pub fn lb_probe_parse(ctx: XdpContext) -> u32 {
    crate::probe::parse_only(&ctx)
}

#[xdp]
pub fn lb_probe_vip(ctx: XdpContext) -> u32 {
    crate::probe::vip_lookup(&ctx)
}

#[xdp]
pub fn lb_probe_flow(ctx: XdpContext) -> u32 {
    crate::probe::flow_lookup(&ctx)
}

#[xdp]
pub fn lb_probe_lru(ctx: XdpContext) -> u32 {
    crate::probe::lru_lookup(&ctx)
}

#[xdp]
pub fn lb_probe_insert(ctx: XdpContext) -> u32 {
    crate::probe::flow_insert(&ctx)
}

#[xdp]
pub fn lb_probe_fib(ctx: XdpContext) -> u32 {
    crate::probe::fib(&ctx)
}
