//! The new-flow budget (see [`lb_common::budget`]): a packet that would make a new flow at a VIP
//! with [`lb_common::VIP_F_NEW_FLOW_BUDGET`] takes a token from this CPU's bucket of the VIP,
//! or is refused and counted per VIP. Called by `select` after the flow table missed (a SYN
//! always does) and before affinity or Maglev, so a refused packet writes no flow, affinity or
//! NAT state, and packets of established flows never get here.

use crate::{LB_NEW_FLOW_BUDGET, LB_VIP_BUDGET_DROPS};

/// Whether VIP `vip_id` takes a new flow at `now` (`bpf_ktime_get_coarse_ns`): one per-CPU
/// array lookup. A refusal is counted in the VIP's `LB_VIP_BUDGET_DROPS`; the caller counts
/// the verdict.
#[inline(always)]
pub fn admit(vip_id: u32, now: u64) -> bool {
    let Some(b) = LB_NEW_FLOW_BUDGET.get_ptr_mut(vip_id) else {
        return true;
    };
    if unsafe { (*b).admit(now) } {
        return true;
    }
    if let Some(n) = LB_VIP_BUDGET_DROPS.get_ptr_mut(vip_id) {
        unsafe { *n += 1 };
    }
    false
}
