//! Routes of NAT replies, remembered per CPU for a short while (see
//! [`lb_common::maps::REPLY_ROUTES`]): a reply goes to its client by the route lookup
//! (`bpf_fib_lookup`) that the client's previous reply on this CPU took, if it was made less
//! than [`REPLY_ROUTE_TTL_NS`] ago for the same destination, ingress interface and TOS and for a
//! packet at least as long. So a stream of replies pays one route lookup a second, not one per
//! packet; a route or neighbour change reaches replies within that second.

use aya_ebpf::bindings::BPF_FIB_LKUP_RET_SUCCESS;
use lb_common::maps::{REPLY_ROUTE_SLOTS, REPLY_ROUTE_TTL_NS};

use crate::{LB_REPLY_ROUTES, route::Hop};

/// The slot of `dst` in this CPU's cache: its words folded and mixed (a multiplicative hash).
#[inline(always)]
fn slot(dst: &[u8; 16]) -> u32 {
    let w = unsafe { &*(dst as *const [u8; 16] as *const [u32; 4]) };
    let x = w[0] ^ w[1].rotate_left(8) ^ w[2].rotate_left(16) ^ w[3].rotate_left(24);
    x.wrapping_mul(0x9e37_79b1) >> (32 - REPLY_ROUTE_SLOTS.trailing_zeros())
}

/// The hop towards `dst` (IPv4 in the first four bytes when `v4`) for a reply of `tot_len`
/// bytes that came in on `ingress`: the remembered one if it still holds, else `fib()`, which
/// is remembered if it succeeded.
#[inline(always)]
pub fn hop(
    dst: &[u8; 16],
    v4: bool,
    ingress: u32,
    tos: u8,
    tot_len: u32,
    now: u64,
    fib: impl FnOnce() -> Hop,
) -> Hop {
    let Some(e) = LB_REPLY_ROUTES.get_ptr_mut(slot(dst)) else {
        return fib();
    };
    let e = unsafe { &mut *e };
    let same = e.dst == *dst && e.ingress == ingress && e.tos == tos && e.v4 == v4 as u8;
    if same && tot_len <= e.fits && now.wrapping_sub(e.stamp_ns) < REPLY_ROUTE_TTL_NS {
        return Hop {
            rc: BPF_FIB_LKUP_RET_SUCCESS,
            ifindex: e.ifindex,
            mtu: 0,
            dmac: e.dmac,
            smac: e.smac,
        };
    }
    let h = fib();
    if h.rc == BPF_FIB_LKUP_RET_SUCCESS {
        // Still fresh (only this packet was longer than any before): what fits widens. Else the
        // entry starts afresh.
        if !(same && now.wrapping_sub(e.stamp_ns) < REPLY_ROUTE_TTL_NS) {
            e.stamp_ns = now;
            e.dst = *dst;
            e.ingress = ingress;
            e.tos = tos;
            e.v4 = v4 as u8;
        }
        e.fits = tot_len;
        e.ifindex = h.ifindex;
        e.dmac = h.dmac;
        e.smac = h.smac;
    }
    h
}
