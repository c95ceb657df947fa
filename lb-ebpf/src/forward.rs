//! Encapsulation for direct server return, and the route lookup that sends the result on its way.
//!
//! The inner IP packet is kept byte for byte; any VLAN tag is dropped and a new Ethernet header
//! and an outer IPv4 (IPIP, or IPv6-in-IPv4) or IPv6 (IP6IP6, or IPv4-in-IPv6) header are put in
//! front of it. The outer family is the backend's. The member's next hop (resolved by the agent,
//! see [`next_hop`]) then gives the egress interface and the MAC addresses and checks the egress
//! MTU, or `bpf_fib_lookup` on the outer destination does where the agent has no entry.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE, bpf_fib_lookup as FibParams,
        xdp_action,
    },
    helpers::generated::{bpf_fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{
    Counter, FAMILY_V4, Member, NH_FORWARD, NH_LOCAL, NH_NO_NEIGH, NH_UNRESOLVED,
    NODE_F_NEXTHOP_CHECK, NODE_F_SRC_V4, NODE_F_SRC_V6, NextHop, NodeConfig, flow_hash,
    maps::OUTER_TTL,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::parse::{IPPROTO_IPIP, IPPROTO_IPV6};
use crate::{
    LB_NEXTHOPS, LB_TX_PORTS, count,
    parse::{ETH_P_IP, ETH_P_IPV6, Packet, ptr_at},
    too_big,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
pub const IPV4_DF: u16 = 0x4000;

/// What to do with a packet (an XDP action), and which verdict counter says so. One register
/// wide, so BPF subprograms can return it (they can't return structs).
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Verdict(u64);

impl Verdict {
    #[inline(always)]
    pub const fn new(counter: Counter, action: u32) -> Self {
        Self(((counter as u64) << 32) | action as u64)
    }

    #[inline(always)]
    pub const fn action(self) -> u32 {
        self.0 as u32
    }

    /// Not a verdict yet: the packet is NAT mode's ([`crate::nat`]), its job in `LB_NAT_JOB`.
    pub const NAT: Self = Self(u64::MAX);

    /// Not a verdict yet: the packet is for a least-connections VIP ([`crate::least_conn`]),
    /// its job in `LB_NAT_JOB` (kind `NAT_JOB_LEAST_CONN`).
    pub const LEAST_CONN: Self = Self(u64::MAX - 1);

    #[inline(always)]
    pub const fn bits(self) -> u64 {
        self.0
    }

    #[inline(always)]
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    #[inline(always)]
    pub const fn is_nat(self) -> bool {
        self.0 == u64::MAX
    }

    #[inline(always)]
    pub const fn is_least_conn(self) -> bool {
        self.0 == u64::MAX - 1
    }

    /// The counter's index in `LB_STATS`.
    #[inline(always)]
    pub const fn counter(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

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
    let inner_proto = if pkt.key.family == FAMILY_V4 {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    };
    // Version 6, the inner traffic class, and a flow label from the flow hash so that ECMP and
    // RSS downstream can spread flows (RFC 6438).
    let vcf = if outer_v4 {
        0
    } else {
        (6u32 << 28) | ((pkt.tos as u32) << 20) | (flow_hash(&pkt.key) & 0x000f_ffff)
    };

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

    if outer_v4 {
        eth.ether_type = ETH_P_IP.to_be();
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
            return Verdict::new(Counter::DropEncapFailed, xdp_action::XDP_DROP);
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
    } else {
        eth.ether_type = ETH_P_IPV6.to_be();
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
            return Verdict::new(Counter::DropEncapFailed, xdp_action::XDP_DROP);
        };
        let ip = unsafe { &mut *ip };
        ip.vcf = vcf.to_be_bytes();
        ip.payload_len = (pkt.ip_len as u16).to_be_bytes();
        ip.next_hdr = inner_proto;
        ip.hop_limit = OUTER_TTL;
        ip.src_addr = node.src_v6;
        ip.dst_addr = backend.addr;
    }
    send(ctx, &hop, ingress, rx_dst, rx_src)
}

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

/// This node's source address for `family` (IPv4 in the first four bytes), if configured: the
/// outer source of tunnels (DSR) and the translated source (NAT).
#[inline(always)]
pub fn node_addr(node: &NodeConfig, family: u8) -> Option<[u8; 16]> {
    if family == FAMILY_V4 {
        if node.flags & NODE_F_SRC_V4 == 0 {
            return None;
        }
        let a = node.src_v4;
        Some([a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    } else if node.flags & NODE_F_SRC_V6 != 0 {
        Some(node.src_v6)
    } else {
        None
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

/// RFC 1071 checksum of a 20-byte IPv4 header (no options), `check` zeroed by the caller.
#[inline(always)]
pub fn ipv4_checksum(ip: &Ipv4Hdr) -> u16 {
    let words = unsafe { &*(ip as *const Ipv4Hdr as *const [[u8; 2]; 10]) };
    let mut sum = 0u32;
    for w in words {
        sum += u16::from_be_bytes(*w) as u32;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
