//! Which backend a packet goes to: its flow entry, else its client's affinity entry, else Maglev.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    AffinityKey, AffinityValue, Backend, Counter, FlowKey, FlowValue, IPPROTO_TCP, IPPROTO_UDP,
    NO_BACKEND, VIP_F_HASH_SRC_ONLY, VipValue, flow_hash, maglev_slot, source_hash,
};

use crate::{LB_AFFINITY, LB_BACKENDS, LB_FLOWS, LB_MAGLEV_M, LB_RING, count};

const NS_PER_SEC: u64 = 1_000_000_000;

/// The backend chosen for a packet.
pub struct Choice {
    pub backend_id: u32,
    pub backend: *const Backend,
    /// The flow was new (not followed from the flow table).
    pub new_flow: bool,
}

#[inline(always)]
fn live_backend(id: u32) -> Option<*const Backend> {
    let b = LB_BACKENDS.get_ptr(id)?;
    if unsafe { (*b).is_live() } {
        Some(b)
    } else {
        None
    }
}

#[inline(always)]
fn now() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Chooses the backend for `key` on `vip`, recording new flows (and affinity) as it goes.
/// `Err` carries the verdict when there is no backend to choose.
#[inline(always)]
pub fn select(
    key: &FlowKey,
    vip: &VipValue,
    syn: bool,
    udp_idle_timeout_ns: u64,
) -> Result<Choice, Counter> {
    if let Some(flow) = LB_FLOWS.get_ptr_mut(key) {
        let flow = unsafe { &mut *flow };
        match live_backend(flow.backend_id) {
            Some(backend) if flow.vip_id == vip.id => {
                if key.proto != IPPROTO_UDP || udp_idle_timeout_ns == 0 {
                    count(Counter::FlowHits);
                    return Ok(Choice {
                        backend_id: flow.backend_id,
                        backend,
                        new_flow: false,
                    });
                }
                let t = now();
                if t.wrapping_sub(flow.last_seen_ns) <= udp_idle_timeout_ns {
                    flow.last_seen_ns = t;
                    count(Counter::FlowHits);
                    return Ok(Choice {
                        backend_id: flow.backend_id,
                        backend,
                        new_flow: false,
                    });
                }
                count(Counter::FlowIdleExpired);
            }
            _ => count(Counter::FlowStale),
        }
    }
    if key.proto == IPPROTO_TCP && !syn {
        // Mid-stream packet we have no entry for (another node served it, or ours was evicted):
        // Maglev gives the backend every node would give, so the connection survives.
        count(Counter::NonSynMiss);
    }

    let t = now();
    let (backend_id, backend) = if vip.affinity_timeout_s != 0 {
        let akey = AffinityKey {
            addr: key.src,
            vip_id: vip.id,
        };
        let timeout_ns = vip.affinity_timeout_s as u64 * NS_PER_SEC;
        let mut hit = None;
        if let Some(a) = LB_AFFINITY.get_ptr_mut(akey) {
            let a = unsafe { &mut *a };
            if t.wrapping_sub(a.last_seen_ns) <= timeout_ns {
                if let Some(b) = live_backend(a.backend_id) {
                    a.last_seen_ns = t;
                    count(Counter::AffinityHits);
                    hit = Some((a.backend_id, b));
                }
            } else {
                count(Counter::AffinityExpired);
            }
        }
        match hit {
            Some(h) => h,
            None => {
                let chosen = maglev(key, vip)?;
                let value = AffinityValue {
                    backend_id: chosen.0,
                    _pad: 0,
                    last_seen_ns: t,
                };
                // An affinity table that is full evicts its oldest entry (LRU): nothing to count.
                let _ = LB_AFFINITY.insert(akey, value, 0);
                chosen
            }
        }
    } else {
        maglev(key, vip)?
    };

    let value = FlowValue {
        backend_id,
        vip_id: vip.id,
        last_seen_ns: t,
    };
    if LB_FLOWS.insert(key, value, 0).is_ok() {
        count(Counter::NewFlows);
    } else {
        count(Counter::FlowInsertFailed);
    }
    Ok(Choice {
        backend_id,
        backend,
        new_flow: true,
    })
}

#[inline(always)]
fn maglev(key: &FlowKey, vip: &VipValue) -> Result<(u32, *const Backend), Counter> {
    let m = LB_MAGLEV_M.load();
    let hash = if vip.flags & VIP_F_HASH_SRC_ONLY != 0 {
        source_hash(&key.src, key.family)
    } else {
        flow_hash(key)
    };
    let slot = vip
        .id
        .wrapping_mul(m)
        .wrapping_add(maglev_slot(hash, vip.table_size_of(m)));
    let id = *LB_RING.get(slot).ok_or(Counter::DropNoBackend)?;
    if id == NO_BACKEND {
        return Err(Counter::DropNoBackend);
    }
    count(Counter::MaglevLookups);
    let backend = live_backend(id).ok_or(Counter::DropNoBackend)?;
    Ok((id, backend))
}
