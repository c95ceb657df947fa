//! The rules that decide which member a packet goes to, as pure functions of map values.
//!
//! The XDP program (`lb-ebpf/src/select.rs`) and `lb explain` both call these, in the same
//! order (flow entry, affinity entry, Maglev), so what `lb explain` says is what the program does.

use crate::{
    AffinityValue, FlowKey, FlowValue, IPPROTO_TCP, IPPROTO_UDP, Member, VIP_F_HASH_SRC_ONLY,
    VipValue, flow_hash, maglev_slot, source_hash,
};

pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_ACK: u8 = 0x10;
const NS_PER_SEC: u64 = 1_000_000_000;

/// A TCP SYN without ACK: a new connection. It never follows a flow entry (an entry left by an
/// earlier connection on the same client port would otherwise keep it on that connection's
/// backend, whatever health and weights say now); its choice replaces the entry.
#[inline(always)]
pub const fn opens_connection(proto: u8, tcp_flags: u8) -> bool {
    proto == IPPROTO_TCP && tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
}

/// What a flow entry is worth for a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowCheck {
    /// Follow it.
    Follow,
    /// Follow it, and record the packet's time (UDP with an idle timeout).
    FollowAndRefresh,
    /// Its member is gone, re-allocated, or of another VIP: balance afresh.
    Stale,
    /// A UDP flow idle for longer than the timeout: balance afresh.
    IdleExpired,
}

/// Whether to follow `flow` (with `member` the live entry at its member id, if any).
#[inline(always)]
pub fn check_flow(
    flow: &FlowValue,
    member: Option<&Member>,
    vip: &VipValue,
    proto: u8,
    now_ns: u64,
    udp_idle_timeout_ns: u64,
) -> FlowCheck {
    match member {
        Some(m) if m.is(vip.id, flow.generation) => {}
        _ => return FlowCheck::Stale,
    }
    if proto != IPPROTO_UDP || udp_idle_timeout_ns == 0 {
        FlowCheck::Follow
    } else if now_ns.wrapping_sub(flow.last_seen_ns) <= udp_idle_timeout_ns {
        FlowCheck::FollowAndRefresh
    } else {
        FlowCheck::IdleExpired
    }
}

/// What an affinity entry is worth for a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AffinityCheck {
    Follow,
    /// Older than the VIP's timeout: replaced by a fresh choice.
    Expired,
    /// Its member is gone, re-allocated, or takes no new flows (unhealthy, weight 0): replaced
    /// by a fresh choice.
    Stale,
}

#[inline(always)]
pub fn check_affinity(
    a: &AffinityValue,
    member: Option<&Member>,
    vip: &VipValue,
    now_ns: u64,
) -> AffinityCheck {
    if now_ns.wrapping_sub(a.last_seen_ns) > vip.affinity_timeout_s as u64 * NS_PER_SEC {
        return AffinityCheck::Expired;
    }
    match member {
        Some(m) if m.is(vip.id, a.generation) && m.accepts() => AffinityCheck::Follow,
        _ => AffinityCheck::Stale,
    }
}

/// The hash Maglev uses for `key` on `vip`: the source address alone, or the 5-tuple.
#[inline(always)]
pub fn maglev_hash(key: &FlowKey, vip: &VipValue) -> u32 {
    if vip.flags & VIP_F_HASH_SRC_ONLY != 0 {
        source_hash(&key.src, key.family)
    } else {
        flow_hash(key)
    }
}

/// The slot of `vip`'s own table that `hash` selects, and its index in the ring (every VIP has
/// `node_table_size` slots of room there).
#[inline(always)]
pub fn ring_index(hash: u32, vip: &VipValue, node_table_size: u32) -> (u32, u32) {
    let slot = maglev_slot(hash, vip.table_size_of(node_table_size));
    (
        slot,
        vip.id.wrapping_mul(node_table_size).wrapping_add(slot),
    )
}

/// Whether the member a ring slot names may take the packet. The table is the authority on who
/// takes new flows, so only ownership is checked: while the agent rewrites a table, a slot may
/// briefly name an id just given to another VIP's member, and that packet is dropped instead.
#[inline(always)]
pub fn ring_member_ok(member: &Member, vip: &VipValue) -> bool {
    member.is_live() && member.vip_id == vip.id
}
