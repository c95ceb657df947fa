//! The IPv4 flow table (see `lb_common::flowtab`): one bucket, one cache line, per lookup.
//!
//! Keys are read with volatile loads and re-read after the value, and written with atomic
//! compare-and-exchange (claim) and exchange (publish): a reader sees the old entry, the new one,
//! or a miss. (A write landing between its two key reads could pair a key with another flow's
//! value; the value's 12-bit tag then makes it a miss, but for one such read in 4,096.)

use core::intrinsics::{AtomicOrdering, atomic_and, atomic_cxchg, atomic_or, atomic_xchg};
use core::ptr::{read_volatile, write_volatile};

use lb_common::FlowValue;
use lb_common::flowtab::{
    ENDED_SHIFT, FLOW_WAYS, FlowBucket, LOCKED, REFRESH_UNITS, TIME_SHIFT, Ways, age, buckets_of,
    last_seen_ns, pack_value, unpack_value, victim, way_bits,
};

use crate::{LB_FLOW_BUCKETS, LB_FLOWS4};

/// A flow found in the table.
pub struct Hit {
    bucket: *mut FlowBucket,
    way: usize,
    pub member_id: u32,
    pub generation: u32,
}

/// The coarse clock in the table's time units.
#[inline(always)]
pub fn units(now_ns: u64) -> u32 {
    (now_ns >> TIME_SHIFT) as u32
}

/// The two buckets flow `k` may live in.
#[inline(always)]
fn buckets(k: u64) -> [u32; 2] {
    buckets_of(k, LB_FLOW_BUCKETS.load())
}

/// Flow `k` in bucket `index`, if it is there.
#[inline(always)]
fn lookup_in(index: u32, k: u64) -> Option<Hit> {
    let b = LB_FLOWS4.get_ptr_mut(index)?;
    for way in 0..FLOW_WAYS {
        let key = unsafe { &raw const (*b).keys[way] };
        if unsafe { read_volatile(key) } != k {
            continue;
        }
        let v = unsafe { read_volatile(&raw const (*b).values[way]) };
        if unsafe { read_volatile(key) } != k {
            return None;
        }
        let (member_id, generation) = unpack_value(k, v)?;
        return Some(Hit {
            bucket: b,
            way,
            member_id,
            generation,
        });
    }
    None
}

/// The flow with packed key `k`, if the table holds it: its first bucket, then its second.
#[inline(always)]
pub fn lookup(k: u64) -> Option<Hit> {
    let [first, second] = buckets(k);
    match lookup_in(first, k) {
        Some(h) => Some(h),
        None => lookup_in(second, k),
    }
}

/// When `hit` was last seen, in table units.
#[inline(always)]
pub fn seen(hit: &Hit) -> u32 {
    unsafe { read_volatile(&raw const (*hit.bucket).seen[hit.way]) }
}

/// `hit` as a flow-table value as of `now_ns`: its last-seen time rebuilt from the table's
/// units (to within a unit, 1.05 ms).
#[inline(always)]
pub fn value(hit: &Hit, now_ns: u64) -> FlowValue {
    FlowValue {
        member_id: hit.member_id,
        generation: hit.generation,
        last_seen_ns: last_seen_ns(seen(hit), now_ns),
    }
}

/// Records that `hit` was seen at `now` (table units): always for UDP (its idle timeout reads
/// it), for TCP once a second (enough for eviction to tell busy flows from idle ones).
#[inline(always)]
pub fn touch(hit: &Hit, now: u32, every_packet: bool) {
    let p = unsafe { &raw mut (*hit.bucket).seen[hit.way] };
    let last = unsafe { read_volatile(p) };
    if last != now && (every_packet || age(last, now) >= REFRESH_UNITS) {
        unsafe { write_volatile(p, now) };
    }
}

/// Marks `hit` confirmed (a packet found its entry): from now on only a flow idle for
/// `GUARD_UNITS` may take its way. One atomic OR per flow; later packets only read the bit.
#[inline(always)]
pub fn confirm(hit: &Hit) {
    let p = unsafe { &raw mut (*hit.bucket).confirmed };
    let bit = 1u32 << hit.way;
    if unsafe { read_volatile(p) } & bit == 0 {
        unsafe {
            atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(
                confirmed_word(hit.bucket),
                (bit as u64) << 32,
            )
        };
    }
}

/// Whether `hit`'s connection ended (see `flowtab::ENDED_SHIFT`).
#[inline(always)]
pub fn is_ended(hit: &Hit) -> bool {
    let bit = 1u32 << (ENDED_SHIFT as usize + hit.way);
    unsafe { read_volatile(&raw const (*hit.bucket).confirmed) & bit != 0 }
}

/// Marks `hit`'s connection ended; whether this call did (one atomic fetch-OR: of CPUs that see
/// the same FIN or its retransmission, exactly one gets `true`).
#[inline(always)]
pub fn end(hit: &Hit) -> bool {
    let bit = (1u64 << (ENDED_SHIFT as usize + hit.way)) << 32;
    if unsafe { read_volatile(&raw const (*hit.bucket).confirmed) } as u64 & (bit >> 32) != 0 {
        return false;
    }
    let was = unsafe {
        atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(confirmed_word(hit.bucket), bit)
    };
    was & bit == 0
}

/// The 64-bit word whose high half is `b`'s `confirmed` (its low half is `seen[2]`, which an OR
/// of zero or an AND of ones leaves as it is): the BPF target's atomic OR and AND are 64-bit.
#[inline(always)]
fn confirmed_word(b: *mut FlowBucket) -> *mut u64 {
    const AT: usize = core::mem::offset_of!(FlowBucket, confirmed) - 4;
    const _: () = assert!(AT.is_multiple_of(8) && cfg!(target_endian = "little"));
    unsafe { (b as *mut u8).add(AT) as *mut u64 }
}

/// Records flow `k` on (member, generation) at `now` (table units), unconfirmed, where
/// `flowtab::victim` says: its own entry, an empty way, the unconfirmed way seen longest ago or
/// a confirmed one idle for the guard time, of its two buckets. `false` if there is none (every
/// way holds a confirmed flow seen within the guard time) or that way was being written by
/// another CPU at that moment.
#[inline(always)]
pub fn insert(k: u64, member_id: u32, generation: u32, now: u32) -> bool {
    let [first, second] = buckets(k);
    let (Some(b0), Some(b1)) = (LB_FLOWS4.get_ptr_mut(first), LB_FLOWS4.get_ptr_mut(second)) else {
        return false;
    };
    let Some((i, way, seen_key)) = victim([ways(b0), ways(b1)], k, now) else {
        return false;
    };
    let b = if i == 0 { b0 } else { b1 };
    if way >= FLOW_WAYS {
        return false;
    }
    // Only if the way still holds what `victim` judged it by: another CPU may have taken it.
    let key = unsafe { &raw mut (*b).keys[way] };
    if !claim(key, seen_key, LOCKED) {
        return false;
    }
    unsafe {
        write_volatile(
            &raw mut (*b).values[way],
            pack_value(k, member_id, generation),
        );
        write_volatile(&raw mut (*b).seen[way], now);
        atomic_and::<u64, u64, { AtomicOrdering::Relaxed }>(
            confirmed_word(b),
            !((way_bits(way) as u64) << 32),
        );
        atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(key, k);
    }
    true
}

/// Forgets flow `k`: every way of its two buckets that holds it (two CPUs inserting the flow at
/// once may both have written it). If another CPU is rewriting a way, that write wins.
#[inline(always)]
pub fn remove(k: u64) {
    for index in buckets(k) {
        let Some(b) = LB_FLOWS4.get_ptr_mut(index) else {
            continue;
        };
        for way in 0..FLOW_WAYS {
            let key = unsafe { &raw mut (*b).keys[way] };
            if unsafe { read_volatile(key) } == k {
                claim(key, k, lb_common::flowtab::EMPTY);
            }
        }
    }
}

/// Bucket `b`'s keys and last-seen times, each read once (other CPUs may be writing them).
#[inline(always)]
fn ways(b: *mut FlowBucket) -> Ways {
    let mut w = Ways::default();
    for i in 0..FLOW_WAYS {
        w.keys[i] = unsafe { read_volatile(&raw const (*b).keys[i]) };
        w.seen[i] = unsafe { read_volatile(&raw const (*b).seen[i]) };
    }
    w.confirmed = unsafe { read_volatile(&raw const (*b).confirmed) };
    w
}

#[inline(always)]
fn claim(p: *mut u64, old: u64, new: u64) -> bool {
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new).1
    }
}
