//! Which member a packet goes to: its flow entry, else its client's affinity entry, else Maglev.
//! The rules are `lb_common::select`'s, shared with `lb explain`; this module does the lookups
//! and the writes.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    AffinityKey, AffinityValue, Counter, FlowKey, FlowValue, IPPROTO_TCP, IPPROTO_UDP, MODE_NAT,
    Member, NO_BACKEND, VIP_F_NEW_FLOW_BUDGET, VipValue,
    select::{
        AffinityCheck, FlowCheck, check_affinity, check_flow, ends_connection, maglev_hash,
        opens_connection, ring_index, ring_member_ok,
    },
};

use lb_common::flowtab::{in_table, pack_key};

use crate::{LB_AFFINITY, LB_FLOWS, LB_MAGLEV_M, LB_MEMBERS, LB_RING, count, flows, least_conn};

/// The member chosen for a packet.
pub struct Choice {
    pub member_id: u32,
    pub member: *const Member,
    /// The flow was new (not followed from the flow table).
    pub new_flow: bool,
}

#[inline(always)]
fn member(id: u32) -> Option<&'static Member> {
    LB_MEMBERS.get(id)
}

#[inline(always)]
fn now() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Chooses the member for `key` on `vip`, recording new flows (and affinity) as it goes.
/// `Err` carries the verdict when there is no member to choose. `LC`: `vip` balances by least
/// connections (`VIP_F_LEAST_CONN`; a constant, so that other VIPs' code has none of it).
#[inline(always)]
pub fn select<const LC: bool>(
    key: &FlowKey,
    vip: &VipValue,
    tcp_flags: u8,
    udp_idle_timeout_ns: u64,
) -> Result<Choice, Counter> {
    let syn = opens_connection(key.proto, tcp_flags);
    let v4 = in_table(key.family);
    let k4 = pack_key(key, vip.id);
    if !syn {
        let followed = if v4 {
            follow_flow4(k4, key.proto, vip, udp_idle_timeout_ns)
        } else {
            follow_flow(key, vip, udp_idle_timeout_ns)
        };
        if let Some(c) = followed {
            if LC && ends_connection(key.proto, tcp_flags) {
                least_conn::ended(key, k4, vip.mode, c.member_id);
            }
            return Ok(c);
        }
    } else if LC {
        let id = least_conn::follow_syn(key, k4, vip);
        if id != NO_BACKEND {
            return flow_hit(id, member(id)).ok_or(Counter::DropNoBackend);
        }
    }
    if key.proto == IPPROTO_TCP && !syn {
        // Mid-stream packet we have no entry for (another node served it, or ours was evicted):
        // Maglev gives the member every node would give, so the connection survives.
        count(Counter::NonSynMiss);
    }

    let t = now();
    // A flow is about to be made: a VIP with a budget gives it a token or refuses it here,
    // before any affinity, flow or NAT state is written.
    if vip.flags & VIP_F_NEW_FLOW_BUDGET != 0 && !crate::budget::admit(vip.id, t) {
        return Err(Counter::DropNewFlowBudget);
    }
    // Least connections balances new connections only: a mid-stream TCP packet without an
    // entry gets Maglev's choice, the member every node would give.
    let lc = LC && (syn || key.proto != IPPROTO_TCP);
    let (member_id, m) = if vip.affinity_timeout_s != 0 {
        with_affinity(key, vip, t, lc)?
    } else {
        maglev(key, vip, lc)?
    };
    let recorded = if v4 {
        flows::insert(k4, member_id, m.generation, flows::units(t))
    } else {
        let value = FlowValue {
            member_id,
            generation: m.generation,
            last_seen_ns: t,
        };
        LB_FLOWS.insert(key, value, 0).is_ok()
    };
    if recorded {
        count(Counter::NewFlows);
        // A DSR VIP's count is of its flow entries (a NAT VIP's, of its translations).
        if LC && vip.mode != MODE_NAT {
            least_conn::opened(member_id);
        }
    } else {
        count(Counter::FlowInsertFailed);
    }
    Ok(Choice {
        member_id,
        member: m,
        new_flow: true,
    })
}

/// The flow entry's member, if the entry is to be followed.
#[inline(always)]
fn follow_flow(key: &FlowKey, vip: &VipValue, udp_idle_timeout_ns: u64) -> Option<Choice> {
    let flow = unsafe { &mut *LB_FLOWS.get_ptr_mut(key)? };
    let m = member(flow.member_id);
    // The clock only matters to UDP flows with an idle timeout: spare TCP the helper call.
    let t = if key.proto == IPPROTO_UDP && udp_idle_timeout_ns != 0 {
        now()
    } else {
        0
    };
    if followed(check_flow(flow, m, vip, key.proto, t, udp_idle_timeout_ns))? {
        flow.last_seen_ns = t;
    }
    flow_hit(flow.member_id, m)
}

/// Counts a flow entry `check` says not to follow (`None`); else whether to record the
/// packet's time in it.
#[inline(always)]
fn followed(check: FlowCheck) -> Option<bool> {
    match check {
        FlowCheck::Follow => Some(false),
        FlowCheck::FollowAndRefresh => Some(true),
        FlowCheck::Stale => {
            count(Counter::FlowStale);
            None
        }
        FlowCheck::IdleExpired => {
            count(Counter::FlowIdleExpired);
            None
        }
    }
}

/// A flow entry followed to member `member_id` (`m`, the live entry at that id).
#[inline(always)]
fn flow_hit(member_id: u32, m: Option<&'static Member>) -> Option<Choice> {
    count(Counter::FlowHits);
    Some(Choice {
        member_id,
        member: m?,
        new_flow: false,
    })
}

/// The IPv4 flow table's entry for packed key `k4`, if it is to be followed (the same rules as
/// [`follow_flow`]). Every hit reads the clock: TCP flows refresh their last-seen time once a
/// second, so that eviction within a bucket spares busy flows.
#[inline(always)]
fn follow_flow4(k4: u64, proto: u8, vip: &VipValue, udp_idle_timeout_ns: u64) -> Option<Choice> {
    let hit = flows::lookup(k4)?;
    let m = member(hit.member_id);
    let t = now();
    let flow = flows::value(&hit, t);
    let every_packet = followed(check_flow(&flow, m, vip, proto, t, udp_idle_timeout_ns))?;
    flows::touch(&hit, flows::units(t), every_packet);
    flows::confirm(&hit);
    flow_hit(hit.member_id, m)
}

/// A new flow on a VIP with session affinity: the client's member if the entry still holds,
/// else a fresh Maglev choice that replaces it.
#[inline(always)]
fn with_affinity(
    key: &FlowKey,
    vip: &VipValue,
    t: u64,
    lc: bool,
) -> Result<(u32, &'static Member), Counter> {
    let akey = AffinityKey {
        addr: key.src,
        vip_id: vip.id,
    };
    if let Some(a) = LB_AFFINITY.get_ptr_mut(akey) {
        let a = unsafe { &mut *a };
        let m = member(a.member_id);
        match check_affinity(a, m, vip, t) {
            AffinityCheck::Follow => {
                if let Some(m) = m {
                    a.last_seen_ns = t;
                    count(Counter::AffinityHits);
                    return Ok((a.member_id, m));
                }
            }
            AffinityCheck::Expired => count(Counter::AffinityExpired),
            AffinityCheck::Stale => count(Counter::AffinityStale),
        }
    }
    let (id, m) = maglev(key, vip, lc)?;
    let value = AffinityValue {
        member_id: id,
        generation: m.generation,
        last_seen_ns: t,
    };
    // An affinity table that is full evicts its oldest entry (LRU): nothing to count.
    let _ = LB_AFFINITY.insert(akey, value, 0);
    Ok((id, m))
}

/// Maglev's choice; with `lc` (a new connection on a least-connections VIP), the least loaded
/// of the candidates of which Maglev's choice is the first (`least_conn::pick`, which keeps
/// Maglev's choice when that is not eligible, so that it is refused here as without `lc`).
#[inline(always)]
pub fn maglev(key: &FlowKey, vip: &VipValue, lc: bool) -> Result<(u32, &'static Member), Counter> {
    let hash = maglev_hash(key, vip);
    let (_, index) = ring_index(hash, vip, LB_MAGLEV_M.load());
    let mut id = *LB_RING.get(index).ok_or(Counter::DropNoBackend)?;
    if id == NO_BACKEND {
        return Err(Counter::DropNoBackend);
    }
    count(Counter::MaglevLookups);
    if lc {
        id = least_conn::pick(hash, vip, id);
    }
    match member(id) {
        // A rejecting member is never recorded (no flow, no affinity): each attempt is
        // rejected on its own, and the check costs only new flows.
        Some(m) if ring_member_ok(m, vip) && m.rejects() => Err(Counter::DropRejected),
        Some(m) if ring_member_ok(m, vip) => Ok((id, m)),
        _ => Err(Counter::DropNoBackend),
    }
}
