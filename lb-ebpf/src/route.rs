//! The route lookup that sends a packet on its way: a member's next hop (the agent's entry in
//! `LB_NEXTHOPS`, else `bpf_fib_lookup`), the lookup's parameters, and transmitting or redirecting
//! the packet to the hop it gives. Used by DSR ([`crate::forward`]), NAT ([`crate::nat`]), the
//! ICMP errors lb sends ([`crate::too_big`]), replies' cached routes ([`crate::reply_route`]) and
//! the bench's probes.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE, bpf_fib_lookup as FibParams,
        xdp_action,
    },
    helpers::generated::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::{
    Counter, NH_FORWARD, NH_LOCAL, NH_NO_NEIGH, NH_UNRESOLVED, NODE_F_NEXTHOP_CHECK, NextHop,
    NodeConfig,
};
use network_types::eth::EthHdr;

use crate::{LB_NEXTHOPS, LB_TX_PORTS, count, parse::ptr_at, verdict::Verdict};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Where a packet goes next, as `send` needs it: a route lookup's answer or a member's next hop.
#[derive(Clone, Copy)]
pub struct Hop {
    /// `BPF_FIB_LKUP_RET_*`.
    pub rc: u32,
    pub ifindex: u32,
    /// With `BPF_FIB_LKUP_RET_FRAG_NEEDED`: the route's MTU.
    pub mtu: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
}

impl Hop {
    #[inline(always)]
    pub fn of_fib(fib: &FibParams, rc: u32) -> Self {
        Self {
            rc,
            ifindex: fib.ifindex,
            mtu: unsafe { fib.__bindgen_anon_1.mtu_result } as u32,
            dmac: fib.dmac,
            smac: fib.smac,
        }
    }

    /// What `bpf_fib_lookup` would have answered for a packet of `tot_len` bytes, in the order
    /// it decides: the route's type, then the MTU, then the neighbour.
    #[inline(always)]
    fn of_nexthop(nh: &NextHop, tot_len: u32) -> Self {
        let routed = nh.action == NH_FORWARD || nh.action == NH_NO_NEIGH;
        let rc = if routed && tot_len > nh.mtu {
            BPF_FIB_LKUP_RET_FRAG_NEEDED
        } else if nh.action == NH_FORWARD {
            BPF_FIB_LKUP_RET_SUCCESS
        } else if nh.action == NH_NO_NEIGH {
            BPF_FIB_LKUP_RET_NO_NEIGH
        } else if nh.action == NH_LOCAL {
            BPF_FIB_LKUP_RET_NOT_FWDED
        } else {
            BPF_FIB_LKUP_RET_UNREACHABLE
        };
        Self {
            rc,
            ifindex: nh.ifindex,
            mtu: nh.mtu,
            dmac: nh.dmac,
            smac: nh.smac,
        }
    }

    /// Whether `self` and `other` send the packet the same way (every failure is one verdict).
    #[inline(always)]
    fn agrees(&self, other: &Hop) -> bool {
        let known = |rc| {
            rc == BPF_FIB_LKUP_RET_SUCCESS
                || rc == BPF_FIB_LKUP_RET_NO_NEIGH
                || rc == BPF_FIB_LKUP_RET_NOT_FWDED
                || rc == BPF_FIB_LKUP_RET_FRAG_NEEDED
        };
        if !known(self.rc) || !known(other.rc) {
            return known(self.rc) == known(other.rc);
        }
        self.rc == other.rc
            && match self.rc {
                BPF_FIB_LKUP_RET_SUCCESS => {
                    self.ifindex == other.ifindex
                        && self.dmac == other.dmac
                        && self.smac == other.smac
                }
                BPF_FIB_LKUP_RET_FRAG_NEEDED => self.mtu == other.mtu,
                _ => true,
            }
    }
}

/// The next hop of an outer packet of `tot_len` bytes to member `member_id` (allocation
/// `generation`): the agent's entry when it holds one for this allocation, else `fib()` (the
/// route lookup, counted as a fallback). In check mode both, and the route lookup's answer wins.
#[inline(always)]
pub fn next_hop(
    member_id: u32,
    generation: u32,
    tot_len: u32,
    node: &NodeConfig,
    fib: impl FnOnce() -> Hop,
) -> Hop {
    let nh = match LB_NEXTHOPS.get(member_id) {
        Some(nh) if nh.generation == generation && nh.action != NH_UNRESOLVED => {
            Some(Hop::of_nexthop(nh, tot_len))
        }
        _ => None,
    };
    match nh {
        Some(h) if node.flags & NODE_F_NEXTHOP_CHECK == 0 => h,
        Some(h) => {
            let f = fib();
            if !h.agrees(&f) {
                count(Counter::NexthopMismatches);
            }
            f
        }
        None => {
            count(Counter::NexthopFallbacks);
            fib()
        }
    }
}

/// Routes the packet now in the frame (Ethernet header at 0; `fib` filled in by the caller)
/// with `bpf_fib_lookup`, writes the MAC addresses and transmits or redirects it. When XDP can't
/// (no neighbour yet, local destination, egress outside the devmap) the packet goes to the
/// kernel with the MAC addresses it came with, `rx_dst` and `rx_src`.
#[inline(always)]
pub fn route(ctx: &XdpContext, fib: &mut FibParams, rx_dst: [u8; 6], rx_src: [u8; 6]) -> Verdict {
    let ingress = fib.ifindex;
    let rc = lookup(ctx, fib);
    send(ctx, &Hop::of_fib(fib, rc), ingress, rx_dst, rx_src)
}

/// `bpf_fib_lookup` on `fib` (which it fills in): one of `BPF_FIB_LKUP_RET_*`. On
/// `BPF_FIB_LKUP_RET_FRAG_NEEDED`, `fib.mtu_result` holds the route's MTU.
#[inline(always)]
pub fn lookup(ctx: &XdpContext, fib: &mut FibParams) -> u32 {
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    rc as u32
}

/// The second half of [`route`]: acts on the next hop `hop` for a packet that came in on
/// `ingress`. (The caller reads the ingress interface once: LLVM would keep a pointer into the
/// context for a second read, across frame changes, and the verifier refuses that.)
#[inline(always)]
pub fn send(
    ctx: &XdpContext,
    hop: &Hop,
    ingress: u32,
    rx_dst: [u8; 6],
    rx_src: [u8; 6],
) -> Verdict {
    match hop.rc {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            return Verdict::new(Counter::PassNoNeighbour, xdp_action::XDP_PASS);
        }
        BPF_FIB_LKUP_RET_NOT_FWDED => {
            return Verdict::new(Counter::PassLocalBackend, xdp_action::XDP_PASS);
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            return Verdict::new(Counter::DropTooBig, xdp_action::XDP_DROP);
        }
        _ => return Verdict::new(Counter::DropFibFailed, xdp_action::XDP_DROP),
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Verdict::new(Counter::DropEncapFailed, xdp_action::XDP_DROP);
    };
    let eth = unsafe { &mut *eth };
    eth.dst_addr = hop.dmac;
    eth.src_addr = hop.smac;
    if hop.ifindex == ingress {
        return Verdict::new(Counter::Tx, xdp_action::XDP_TX);
    }
    match LB_TX_PORTS.redirect(hop.ifindex, xdp_action::XDP_PASS as u64) {
        Ok(action) => Verdict::new(Counter::Redirect, action),
        Err(_) => {
            eth.dst_addr = rx_dst;
            eth.src_addr = rx_src;
            Verdict::new(Counter::PassNoTxPort, xdp_action::XDP_PASS)
        }
    }
}

/// Route-lookup parameters for a packet of `tot_len` bytes from `src` to `dst` (IPv4 in the
/// first four bytes when `v4`), entering on interface `ingress`.
#[inline(always)]
pub fn fib_params(
    ingress: u32,
    v4: bool,
    src: &[u8; 16],
    dst: &[u8; 16],
    tos: u8,
    l4_protocol: u8,
    tot_len: u16,
) -> FibParams {
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.ifindex = ingress;
    fib.__bindgen_anon_1.tot_len = tot_len;
    fib.l4_protocol = l4_protocol;
    if v4 {
        fib.family = AF_INET;
        fib.__bindgen_anon_2.tos = tos;
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([src[0], src[1], src[2], src[3]]);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([dst[0], dst[1], dst[2], dst[3]]);
    } else {
        fib.family = AF_INET6;
        fib.__bindgen_anon_2.flowinfo = ((tos as u32) << 20).to_be();
        fib.__bindgen_anon_3.ipv6_src = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*src) };
        fib.__bindgen_anon_4.ipv6_dst = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*dst) };
    }
    fib
}
