//! The rules that decide which member a packet goes to, as pure functions of map values.
//!
//! The XDP program (`lb-ebpf/src/select.rs`) and `lb explain` both call these, in the same
//! order (flow entry, affinity entry, Maglev), so what `lb explain` says is what the program does.

use crate::{
    AffinityValue, FlowKey, FlowValue, IPPROTO_TCP, IPPROTO_UDP, Member, MemberConns,
    VIP_F_HASH_SRC_ONLY, VipValue, flow_hash, maglev_slot, source_hash,
};

pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
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

/// Ring slots a least-connections VIP samples for a new flow (the power of K choices): the first
/// is Maglev's own choice, the others independent rehashes ([`crate::candidate_hash`]). With
/// three equal backends and one of them busy, a new flow still goes to it only when all K
/// samples land on it: 1 in 3^K, 1 in 81 for K = 4 (1 in 9 for two choices).
pub const LEAST_CONN_CANDIDATES: u32 = 4;

/// Whether a member with load `a` has strictly fewer open connections for its weight than one
/// with load `b` (`a.conns / a.weight < b.conns / b.weight`, compared as products: counts are
/// taken at most `u32::MAX` and weights are `u32`, so neither product overflows).
#[inline(always)]
pub const fn less_loaded(a: &MemberConns, b: &MemberConns) -> bool {
    a.open() * b.weight_or_one() < b.open() * a.weight_or_one()
}

/// Whether a TCP packet ends its connection for the count (a FIN or an RST).
#[inline(always)]
pub const fn ends_connection(proto: u8, tcp_flags: u8) -> bool {
    proto == IPPROTO_TCP && tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0
}

/// The member least connections picks for a new flow whose Maglev hash is `hash`: of the
/// candidates (candidate 0 is Maglev's choice `first`), the least loaded; ties go to the
/// earlier, so with equal loads it is Maglev's choice. `candidate(hash)` gives the member id the
/// ring has for a candidate's hash and its load, or `None` when that slot's member may not take
/// the flow (no member, another VIP's, or one that refuses connections): the same members
/// Maglev itself would skip. The program and `lb explain` both follow this.
pub fn least_conn_pick(
    hash: u32,
    first: (u32, MemberConns),
    mut candidate: impl FnMut(u32) -> Option<(u32, MemberConns)>,
) -> u32 {
    let (mut best, mut load) = first;
    for i in 1..LEAST_CONN_CANDIDATES {
        if let Some((id, l)) = candidate(crate::candidate_hash(hash, i))
            && id != best
            && less_loaded(&l, &load)
        {
            (best, load) = (id, l);
        }
    }
    best
}

#[cfg(test)]
mod least_conn_tests {
    use super::*;

    fn load(conns: i64, weight: u32) -> MemberConns {
        MemberConns {
            conns,
            weight,
            _pad: 0,
        }
    }

    #[test]
    fn fewer_connections_for_the_weight_is_less_loaded() {
        assert!(less_loaded(&load(1, 1), &load(2, 1)));
        assert!(!less_loaded(&load(2, 1), &load(2, 1)));
        // 3 of weight 2 (1.5) against 2 of weight 1 (2).
        assert!(less_loaded(&load(3, 2), &load(2, 1)));
        assert!(!less_loaded(&load(2, 1), &load(3, 2)));
        // Below zero reads as zero; weight 0 as 1.
        assert!(!less_loaded(&load(-5, 1), &load(0, 0)));
        assert!(less_loaded(&load(i64::MAX, u32::MAX), &load(i64::MAX, 1)));
    }

    #[test]
    fn with_equal_loads_the_pick_is_maglevs() {
        let ids = [7, 8, 9];
        let mut n = 0;
        let pick = least_conn_pick(42, (7, load(3, 1)), |h| {
            n += 1;
            Some((ids[(h % 3) as usize], load(3, 1)))
        });
        assert_eq!((pick, n), (7, LEAST_CONN_CANDIDATES - 1));
    }

    #[test]
    fn the_least_loaded_candidate_wins_and_ineligible_ones_are_skipped() {
        // Candidates 1..: member 8 (0 open, but not eligible), then 9 (1 open), then 10 (1).
        let hashes: [u32; 3] = [1, 2, 3].map(|i| crate::candidate_hash(42, i));
        let pick = least_conn_pick(42, (7, load(5, 1)), |h| {
            match hashes.iter().position(|x| *x == h) {
                Some(0) => None,
                Some(1) => Some((9, load(1, 1))),
                _ => Some((10, load(1, 1))),
            }
        });
        assert_eq!(pick, 9);
    }
}
