//! Least connections (VIPs with `VIP_F_LEAST_CONN`): the choice among sampled ring slots for a
//! new flow, and the per-member counts of open connections it reads (`LB_MEMBER_CONNS`).
//!
//! Counted here: a DSR VIP's flow entries (+1 when one is made, -1 at the first FIN or RST of its
//! client, marked in the entry so a retransmission is not counted again). A NAT VIP's
//! translations are counted by `nat` (+1 when one is made, -1 when it closes, either side).
//! What the program never sees end (UDP flows, entries evicted or expired, a lost FIN) the agent
//! corrects from its recount of the live entries. Such VIPs are served by a subprogram of their
//! own, [`run`] (`lb`'s `least`): other VIPs' path and stack frame in `body` are unchanged.

use core::intrinsics::{AtomicOrdering, atomic_or, atomic_xadd};

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    Counter, FLOW_ENDED_NS, FlowKey, MODE_NAT, MemberConns, NO_BACKEND, VipValue, candidate_hash,
    flowtab::in_table,
    select::{LEAST_CONN_CANDIDATES, less_loaded, ring_index, ring_member_ok},
};

use crate::{
    LB_FLOWS, LB_MAGLEV_M, LB_MEMBER_CONNS, LB_MEMBERS, LB_NAT_JOB, LB_RING, LB_VIPS, flows,
    parse::Packet, verdict::Verdict,
};

/// `lb`'s `least` subprogram: serves the packet `body` left in `LB_NAT_JOB` (a
/// `NAT_JOB_LEAST_CONN`) as `body` serves other VIPs' packets, with least connections.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> Verdict {
    let unavailable = Verdict::new(Counter::DropNatUnavailable, xdp_action::XDP_DROP);
    let Some(job) = LB_NAT_JOB.get_ptr(0) else {
        return unavailable;
    };
    let job = unsafe { &*job };
    if job.l4_off > crate::nat::MAX_L4_OFF || job.l3_off > job.l4_off || job.ip_len > 0xffff {
        return Verdict::new(Counter::DropMalformed, xdp_action::XDP_DROP);
    }
    let pkt = Packet {
        key: crate::nat::copy_key(&job.key),
        l3_off: job.l3_off as usize,
        ip_len: job.ip_len as usize,
        l4_off: job.l4_off as usize,
        tos: job.tos,
        syn: job.tcp_flags & lb_common::select::TCP_FLAG_SYN != 0,
        tcp_flags: job.tcp_flags,
        counted: false,
    };
    // Gone since `body` looked (the agent removed it): as `body` treats a packet for no VIP.
    let Some(vip) = (unsafe { LB_VIPS.get(pkt.key.vip_key()) }) else {
        return Verdict::new(Counter::PassNotForVip, xdp_action::XDP_PASS);
    };
    let vip = *vip;
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    crate::serve::<true>(ctx, &pkt, &vip, bytes)
}

/// Adds `delta` to member `id`'s open connections (an atomic add: every CPU counts into it).
/// `id` is looked up where it lies (NAT passes one in a map value), not copied to the stack.
#[inline(always)]
pub fn add(id: &u32, delta: i64) {
    let c: *mut MemberConns = crate::nat::entry_at(&LB_MEMBER_CONNS, id);
    if !c.is_null() {
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(&raw mut (*c).conns, delta) };
    }
}

/// A flow entry was made for member `id` of a DSR least-connections VIP: one more connection.
#[inline(always)]
pub fn opened(id: u32) {
    add(&id, 1);
}

/// Whether ring member `id` may take a new flow of `vip` (what Maglev itself checks).
#[inline(always)]
fn eligible(id: u32, vip: &VipValue) -> bool {
    id != NO_BACKEND
        && LB_MEMBERS
            .get(id)
            .is_some_and(|m| ring_member_ok(m, vip) && !m.rejects())
}

/// The member for a new flow on `vip` whose Maglev hash is `hash` and whose Maglev choice is
/// `first`: the least loaded of the sampled candidates (see
/// `lb_common::select::least_conn_pick`, which this follows step by step). `first` itself if
/// it is not eligible (the caller refuses it as Maglev would).
#[inline(always)]
pub fn pick(hash: u32, vip: &VipValue, first: u32) -> u32 {
    if !eligible(first, vip) {
        return first;
    }
    let Some(l0) = LB_MEMBER_CONNS.get(first) else {
        return first;
    };
    let (mut best, mut load): (u32, MemberConns) = (first, *l0);
    let maglev_m = LB_MAGLEV_M.load();
    for i in 1..LEAST_CONN_CANDIDATES {
        let (_, index) = ring_index(candidate_hash(hash, i), vip, maglev_m);
        let Some(id) = LB_RING.get(index) else {
            continue;
        };
        let id = *id;
        if id == best || !eligible(id, vip) {
            continue;
        }
        if let Some(l) = LB_MEMBER_CONNS.get(id)
            && less_loaded(l, &load)
        {
            (best, load) = (id, *l);
        }
    }
    best
}

/// A SYN on a least-connections VIP whose flow entry is there and its connection not ended: a
/// retransmitted SYN, which keeps its first choice (and its count) rather than being balanced
/// again on counts that it changed. The entry's member id, or `NO_BACKEND` if there is none to
/// follow (a new connection, perhaps on a client port an ended one used).
#[inline(always)]
pub fn follow_syn(key: &FlowKey, k4: u64, vip: &VipValue) -> u32 {
    if in_table(key.family) {
        let Some(hit) = flows::lookup(k4) else {
            return NO_BACKEND;
        };
        let m = LB_MEMBERS.get(hit.member_id);
        if flows::is_ended(&hit) || !m.is_some_and(|m| m.is(vip.id, hit.generation)) {
            return NO_BACKEND;
        }
        hit.member_id
    } else {
        let Some(flow) = (unsafe { LB_FLOWS.get(key) }) else {
            return NO_BACKEND;
        };
        let m = LB_MEMBERS.get(flow.member_id);
        if flow.last_seen_ns & FLOW_ENDED_NS != 0
            || !m.is_some_and(|m| m.is(vip.id, flow.generation))
        {
            return NO_BACKEND;
        }
        flow.member_id
    }
}

/// The client sent a FIN or RST on a followed flow of member `member_id` on a least-connections
/// VIP: marks its entry ended, and the first time, for a DSR VIP, takes the connection off the
/// member's count (a NAT VIP's count follows its translation instead).
#[inline(always)]
pub fn ended(key: &FlowKey, k4: u64, mode: u32, member_id: u32) {
    let first = if in_table(key.family) {
        match flows::lookup(k4) {
            Some(hit) if hit.member_id == member_id => flows::end(&hit),
            _ => false,
        }
    } else {
        match LB_FLOWS.get_ptr_mut(key) {
            Some(f) => {
                let p = unsafe { &raw mut (*f).last_seen_ns };
                let was =
                    unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(p, FLOW_ENDED_NS) };
                was & FLOW_ENDED_NS == 0
            }
            None => false,
        }
    };
    if first && mode != MODE_NAT {
        add(&member_id, -1);
    }
}
