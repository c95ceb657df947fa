//! The IPv4 flow table: a set-associative table of 64-byte buckets, one cache line each, in a
//! BPF array (`maps::FLOWS4`). A flow is its client address and port and its VIP id, packed in
//! one `u64`; a bucket holds [`FLOW_WAYS`] of them with their members and last-seen times.
//!
//! - **Lookup**: hash the key, read its first bucket, compare three keys; only if the flow is
//!   not there, its second bucket (two-choice hashing, [`buckets_of`]). Shared by all CPUs
//!   (replies and retransmissions may arrive on any of them), read without locks.
//! - **Insert**: of the six ways of its two buckets, the way holding the key, else an empty
//!   way, else the way seen longest ago among flows not [`confirmed`](FlowBucket::confirmed)
//!   (seen once only: a SYN, or the first packet of a flow met mid-stream), else the confirmed
//!   way seen longest ago if that is at least [`GUARD_UNITS`] ago, else none: the flow is served
//!   by Maglev without an entry (approximate LRU within the bucket: last-seen times are
//!   refreshed at most every [`REFRESH_UNITS`] for TCP, on every packet for UDP, which needs
//!   them for its idle timeout). So a flood of new flows (spoofed SYNs) only ever evicts its
//!   own kind and idle flows, never a flow that has been confirmed and seen within the guard
//!   time.
//!   A writer claims the way with a compare-and-exchange of its key to [`LOCKED`], writes the
//!   value, then publishes the key; readers that meet a key other than theirs (or `LOCKED`)
//!   miss. The value carries a 12-bit tag of its key ([`pack_value`]), so a read that pairs a
//!   key with another flow's value (where loads are reordered, or a rewrite lands between a
//!   reader's two key reads) is a miss too, but for one such read in 4,096.
//! - A flow evicted by a newer one in its bucket is balanced again by Maglev, which gives the
//!   same member while the VIP's table is unchanged.
//!
//! Both the program and the agent (`lb flows`, `lb explain`, tests) use these functions, so
//! they agree on where a flow lives.

use crate::{FAMILY_V4, FlowKey, FlowValue};

/// Ways (flows) per bucket.
pub const FLOW_WAYS: usize = 3;
/// An empty way's key.
pub const EMPTY: u64 = 0;
/// A way being written (claimed by a compare-and-exchange). No real key has a VIP field of 0.
pub const LOCKED: u64 = 1;
/// Last-seen times are `CLOCK_MONOTONIC_COARSE >> TIME_SHIFT` (units of 1.048576 ms); a `u32`
/// of them wraps after 52 days. Differences are taken modulo that ([`age`]): a flow idle for
/// more than 26 days looks recent (harmless: it is only kept longer).
pub const TIME_SHIFT: u32 = 20;
/// TCP flows refresh their last-seen time when it is older than this (about a second): enough
/// for eviction to prefer idle flows, without a write per packet.
pub const REFRESH_UNITS: u32 = 1 << 10;
/// A confirmed flow seen more recently than this (2^16 units: 68.7 s) is never evicted by a new
/// flow; one idle for longer is, after every unconfirmed one of its two buckets.
pub const GUARD_UNITS: u32 = 1 << 16;

/// One bucket: a cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBucket {
    /// [`pack_key`] of each way's flow, [`EMPTY`] or [`LOCKED`].
    pub keys: [u64; FLOW_WAYS],
    /// [`pack_value`] of each way's member.
    pub values: [u64; FLOW_WAYS],
    /// When each way's flow was last seen, in [`TIME_SHIFT`] units.
    pub seen: [u32; FLOW_WAYS],
    /// Bit `w` set: way `w`'s flow is confirmed, a packet of it found the entry (schema 2 of
    /// `LB_FLOWS4`; padding in schema 1, which no release wrote). Bit [`ENDED_SHIFT`] `+ w`
    /// set: way `w`'s connection ended (a FIN or RST went by on a least-connections VIP, and was
    /// counted off its member once; also schema 2, as 0.3.0 is unreleased). Both cleared when a
    /// way is taken.
    pub confirmed: u32,
}

const _: () = assert!(core::mem::size_of::<FlowBucket>() == 64);

/// Where a way's "ended" bit is in [`FlowBucket::confirmed`]: bit `ENDED_SHIFT + w`.
pub const ENDED_SHIFT: u32 = 8;

/// The bits of [`FlowBucket::confirmed`] that belong to way `w` (confirmed and ended), which a
/// new flow taking the way clears.
#[inline(always)]
pub const fn way_bits(w: usize) -> u32 {
    (1 << w) | (1 << (ENDED_SHIFT as usize + w))
}

/// The table key of an IPv4 flow on VIP `vip_id` (below 65535): client address (as it lies in
/// memory), client port (network byte order) and the VIP id plus one.
#[inline(always)]
pub const fn pack_key(key: &FlowKey, vip_id: u32) -> u64 {
    let src = u32::from_ne_bytes([key.src[0], key.src[1], key.src[2], key.src[3]]) as u64;
    src | (key.src_port as u64) << 32 | ((vip_id as u64 + 1) & 0xffff) << 48
}

/// The client address (first four bytes), port and VIP id a packed key stands for.
pub const fn unpack_key(k: u64) -> ([u8; 4], u16, u32) {
    (
        (k as u32).to_ne_bytes(),
        (k >> 32) as u16,
        ((k >> 48) as u32).wrapping_sub(1),
    )
}

/// Whether `family` flows live in this table (the others are in the LRU `maps::FLOWS`).
#[inline(always)]
pub const fn in_table(family: u8) -> bool {
    family == FAMILY_V4
}

#[inline(always)]
const fn mix64(k: u64) -> u64 {
    // splitmix64's finaliser: every key bit reaches every hash bit.
    let mut z = k ^ (k >> 30);
    z = z.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^= z >> 27;
    z = z.wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The two buckets packed key `k` may live in, in a table of `buckets` buckets (two choices:
/// a flow goes to whichever has room, so a bucket overflows only when both are full). Lookups
/// read the first, and the second only when the first does not hold the flow.
#[inline(always)]
pub const fn buckets_of(k: u64, buckets: u32) -> [u32; 2] {
    let h = mix64(k);
    [
        (((h >> 32) * buckets as u64) >> 32) as u32,
        (((h & 0xffff_ffff) * buckets as u64) >> 32) as u32,
    ]
}

#[inline(always)]
const fn tag(k: u64) -> u64 {
    mix64(k) & 0xfff
}

/// Member ids the value can hold (20 bits).
pub const MAX_MEMBER_ID: u32 = (1 << 20) - 1;

/// The value stored with key `k`: member id (20 bits), a 12-bit tag of `k`, the generation.
#[inline(always)]
pub const fn pack_value(k: u64, member_id: u32, generation: u32) -> u64 {
    (member_id & MAX_MEMBER_ID) as u64 | tag(k) << 20 | (generation as u64) << 32
}

/// The (member id, generation) of value `v` stored with key `k`, if its tag is `k`'s.
#[inline(always)]
pub const fn unpack_value(k: u64, v: u64) -> Option<(u32, u32)> {
    if (v >> 20) & 0xfff != tag(k) {
        return None;
    }
    Some(((v as u32) & MAX_MEMBER_ID, (v >> 32) as u32))
}

/// The way of `bucket` that holds key `k`.
#[inline(always)]
pub fn find(bucket: &FlowBucket, k: u64) -> Option<usize> {
    (0..FLOW_WAYS).find(|&w| bucket.keys[w] == k)
}

/// The ways of a bucket as a writer sees them: keys and last-seen times, copied once (other
/// CPUs may be writing the bucket).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ways {
    pub keys: [u64; FLOW_WAYS],
    pub seen: [u32; FLOW_WAYS],
    /// [`FlowBucket::confirmed`].
    pub confirmed: u32,
}

impl FlowBucket {
    pub const fn ways(&self) -> Ways {
        Ways {
            keys: self.keys,
            seen: self.seen,
            confirmed: self.confirmed,
        }
    }

    /// Whether way `w`'s flow is confirmed.
    pub const fn is_confirmed(&self, w: usize) -> bool {
        self.confirmed & (1 << w) != 0
    }

    /// Whether way `w`'s connection ended (see [`ENDED_SHIFT`]).
    pub const fn is_ended(&self, w: usize) -> bool {
        self.confirmed & (1 << (ENDED_SHIFT as usize + w)) != 0
    }
}

/// How long ago `seen` was, at `now` (table units). A time ahead of `now` (written by another
/// CPU that read the clock just after this one) is no time ago, not 52 days.
#[inline(always)]
pub const fn age(seen: u32, now: u32) -> u32 {
    let d = now.wrapping_sub(seen);
    if (d as i32) < 0 { 0 } else { d }
}

/// The way (bucket 0 or 1 of [`buckets_of`], way) a new flow with key `k` takes at time `now`
/// (in [`TIME_SHIFT`] units), and the key that way held when looked at (the writer claims the
/// way only if it still holds it): its own; else an empty way of the bucket with more empty ways
/// (the first on a tie), which keeps buckets balanced so that both are full only in a table more
/// than half full; else the unconfirmed way seen longest ago; else the confirmed way seen
/// longest ago, if that is at least [`GUARD_UNITS`] ago. Ways being written ([`LOCKED`]) are
/// never taken; `None` if no way may be.
#[inline(always)]
pub fn victim(b: [Ways; 2], k: u64, now: u32) -> Option<(usize, usize, u64)> {
    let first = scan(&b[0], k, now);
    let second = scan(&b[1], k, now);
    if let Some(w) = first.own {
        Some((0, w, k))
    } else if let Some(w) = second.own {
        Some((1, w, k))
    } else if first.empty > 0 && first.empty >= second.empty {
        Some((0, first.empty_way, EMPTY))
    } else if second.empty > 0 {
        Some((1, second.empty_way, EMPTY))
    } else if first.oldest_key != LOCKED && first.oldest_rank >= second.oldest_rank {
        Some((0, first.oldest, first.oldest_key))
    } else if second.oldest_key != LOCKED {
        Some((1, second.oldest, second.oldest_key))
    } else if first.oldest_key != LOCKED {
        Some((0, first.oldest, first.oldest_key))
    } else {
        None
    }
}

/// How readily a way is evicted (higher first; `None`: never): every unconfirmed flow before
/// any confirmed one, the one seen longest ago first; a confirmed flow only if it was seen at
/// least [`GUARD_UNITS`] ago. One number, so that the scan keeps one candidate per bucket.
#[inline(always)]
const fn rank(confirmed: bool, age: u32) -> Option<u64> {
    if !confirmed {
        Some(1 << 32 | age as u64)
    } else if age >= GUARD_UNITS {
        Some(age as u64)
    } else {
        None
    }
}

/// What [`victim`] needs to know of one bucket.
struct Scan {
    own: Option<usize>,
    empty: usize,
    empty_way: usize,
    /// The way to evict first ([`rank`]).
    oldest: usize,
    oldest_rank: u64,
    /// [`LOCKED`] if no way may be evicted.
    oldest_key: u64,
}

#[inline(always)]
fn scan(b: &Ways, k: u64, now: u32) -> Scan {
    let mut s = Scan {
        own: None,
        empty: 0,
        empty_way: 0,
        oldest: 0,
        oldest_rank: 0,
        oldest_key: LOCKED,
    };
    for w in 0..FLOW_WAYS {
        let key = b.keys[w];
        if key == k {
            s.own = Some(w);
        } else if key == EMPTY {
            s.empty += 1;
            s.empty_way = w;
        } else if key != LOCKED {
            let confirmed = b.confirmed & (1 << w) != 0;
            if let Some(r) = rank(confirmed, age(b.seen[w], now))
                && (s.oldest_key == LOCKED || r > s.oldest_rank)
            {
                s.oldest = w;
                s.oldest_rank = r;
                s.oldest_key = key;
            }
        }
    }
    s
}

/// The `CLOCK_MONOTONIC_COARSE` time (to a unit) that last-seen time `seen` stands for, read at
/// `now_ns`: the full-width unit count `seen` is the low 32 bits of, so every reader rebuilds
/// the same time from the same entry.
#[inline(always)]
pub const fn last_seen_ns(seen: u32, now_ns: u64) -> u64 {
    let now_units = now_ns >> TIME_SHIFT;
    let idle = age(seen, now_units as u32) as u64;
    now_units.wrapping_sub(idle) << TIME_SHIFT
}

/// The flow entry the buckets `b` (of [`buckets_of`]) hold for key `k`, as of `now_ns`
/// (single-threaded readers: the agent and tests).
pub fn get(b: [&FlowBucket; 2], k: u64, now_ns: u64) -> Option<FlowValue> {
    b.iter().find_map(|b| {
        let w = find(b, k)?;
        let (member_id, generation) = unpack_value(k, b.values[w])?;
        Some(FlowValue {
            member_id,
            generation,
            last_seen_ns: last_seen_ns(b.seen[w], now_ns),
        })
    })
}

/// Writes flow `k` into copies `b` of its two buckets where the program would (see
/// [`victim`]); the one of the two it changed (to write back), `None` if it can't. The two
/// may be copies of one bucket.
pub fn put(
    b: &mut [FlowBucket; 2],
    k: u64,
    member_id: u32,
    generation: u32,
    seen: u32,
) -> Option<usize> {
    let (i, w, _) = victim([b[0].ways(), b[1].ways()], k, seen)?;
    let bucket = &mut b[i];
    bucket.keys[w] = k;
    bucket.values[w] = pack_value(k, member_id, generation);
    bucket.seen[w] = seen;
    bucket.confirmed &= !way_bits(w);
    Some(i)
}

/// Buckets for a table of (at least) `entries` flows.
pub const fn buckets_for(entries: u32) -> u32 {
    let b = entries.div_ceil(FLOW_WAYS as u32);
    if b == 0 { 1 } else { b }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IPPROTO_TCP;

    fn key(src: [u8; 4], port: u16) -> FlowKey {
        let mut s = [0u8; 16];
        s[..4].copy_from_slice(&src);
        FlowKey {
            src: s,
            src_port: port.to_be(),
            dst: [0; 16],
            dst_port: 80u16.to_be(),
            proto: IPPROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }

    #[test]
    fn keys_round_trip_and_never_look_empty_or_locked() {
        for vip in [0u32, 1, 65_533] {
            let k = pack_key(&key([0, 0, 0, 0], 0), vip);
            assert!(k != EMPTY && k != LOCKED);
            let k = pack_key(&key([10, 1, 2, 3], 40000), vip);
            assert_eq!(unpack_key(k), ([10, 1, 2, 3], 40000u16.to_be(), vip));
        }
    }

    #[test]
    fn a_value_read_with_another_key_is_refused() {
        let (a, b) = (
            pack_key(&key([10, 0, 0, 1], 1), 0),
            pack_key(&key([10, 0, 0, 2], 1), 0),
        );
        let v = pack_value(a, 77, 5);
        assert_eq!(unpack_value(a, v), Some((77, 5)));
        assert_eq!(
            unpack_value(b, v),
            None,
            "the tags of these two keys differ"
        );
    }

    /// Two full buckets: ways 21-23 and 31-33, seen at the given times, confirmed per mask.
    fn full_pair(seen: [[u32; 3]; 2], confirmed: [u32; 2]) -> [Ways; 2] {
        let b = |i: usize, base: u64| FlowBucket {
            keys: [base + 1, base + 2, base + 3],
            seen: seen[i],
            confirmed: confirmed[i],
            ..Default::default()
        };
        [b(0, 20).ways(), b(1, 30).ways()]
    }

    #[test]
    fn a_new_flow_takes_the_oldest_unconfirmed_way_even_if_confirmed_ones_are_older() {
        let now = 100_000;
        // Every way confirmed but bucket 1's way 2, which was seen last of all.
        let b = full_pair([[10, 11, 12], [13, 14, 99_000]], [0b111, 0b011]);
        assert_eq!(victim(b, 5, now), Some((1, 2, 33)));
        // Two unconfirmed ways: the one seen longer ago.
        let b = full_pair([[10, 500, 12], [13, 14, 400]], [0b101, 0b011]);
        assert_eq!(victim(b, 5, now), Some((1, 2, 33)));
    }

    #[test]
    fn confirmed_flows_seen_within_the_guard_time_are_never_evicted() {
        let now = 100_000;
        let recent = now - GUARD_UNITS + 1;
        let b = full_pair([[recent; 3], [recent + 5; 3]], [0b111, 0b111]);
        assert_eq!(victim(b, 5, now), None);
        // One of them idle for the guard time: it goes.
        let b = full_pair(
            [[recent, now - GUARD_UNITS, recent], [recent; 3]],
            [0b111, 0b111],
        );
        assert_eq!(victim(b, 5, now), Some((0, 1, 22)));
    }

    #[test]
    fn put_leaves_the_way_it_takes_unconfirmed() {
        let [a, b] = full_pair([[10, 11, 12], [13, 14, 15]], [0b111, 0b101]);
        let bucket = |w: Ways| FlowBucket {
            keys: w.keys,
            seen: w.seen,
            confirmed: w.confirmed,
            ..Default::default()
        };
        let mut pair = [bucket(a), bucket(b)];
        assert_eq!(put(&mut pair, 5, 7, 1, 20), Some(1));
        assert_eq!(pair[1].keys[1], 5);
        assert!(!pair[1].is_confirmed(1));
        assert!(pair[1].is_confirmed(0) && pair[1].is_confirmed(2));
    }

    #[test]
    fn victim_prefers_own_then_empty_then_oldest_and_never_a_locked_way() {
        let way = |v: Option<(usize, usize, u64)>| v.map(|(i, w, _)| (i, w));
        let k = 0x1234_0000_0000_0005;
        let full = FlowBucket {
            keys: [21, 22, 23],
            seen: [8, 8, 8],
            ..Default::default()
        };
        let mut b = FlowBucket {
            keys: [11, 12, EMPTY],
            seen: [5, 9, 0],
            ..Default::default()
        };
        assert_eq!(
            way(victim([full.ways(), b.ways()], k, 10)),
            Some((1, 2)),
            "the empty way"
        );
        let emptier = FlowBucket {
            keys: [EMPTY, 31, EMPTY],
            ..Default::default()
        };
        assert_eq!(
            victim([b.ways(), emptier.ways()], k, 10).map(|(i, _, _)| i),
            Some(1),
            "the bucket with more room"
        );
        assert_eq!(
            victim([emptier.ways(), b.ways()], k, 10).map(|(i, _, _)| i),
            Some(0),
            "the bucket with more room"
        );
        b.keys[2] = 13;
        b.seen[2] = 7;
        assert_eq!(
            way(victim([b.ways(), full.ways()], k, 10)),
            Some((0, 0)),
            "seen longest ago"
        );
        assert_eq!(
            way(victim([full.ways(), b.ways()], k, 10)),
            Some((1, 0)),
            "seen longest ago, second bucket"
        );
        b.keys[1] = k;
        assert_eq!(
            victim([full.ways(), b.ways()], k, 10),
            Some((1, 1, k)),
            "its own way"
        );
        b.keys = [LOCKED, 12, 13];
        assert_eq!(
            victim([b.ways(), full.ways()], k, 10),
            Some((0, 2, 13)),
            "a way being written is skipped: the oldest of the others"
        );
        let locked = FlowBucket {
            keys: [LOCKED; 3],
            ..Default::default()
        };
        assert_eq!(
            victim([locked.ways(), locked.ways()], k, 10),
            None,
            "every way is being written"
        );
        // A time ahead of now (another CPU's clock) is no time ago: not the oldest.
        let ahead = FlowBucket {
            keys: [11, 12, 13],
            seen: [11, 4, 9],
            ..Default::default()
        };
        assert_eq!(
            way(victim([ahead.ways(), full.ways()], k, 10)),
            Some((0, 1))
        );
        assert_eq!(age(11, 10), 0);
        assert_eq!(last_seen_ns(11, 10 << TIME_SHIFT), 10 << TIME_SHIFT);
        // Times wrap: 2 units before a wrap is older than 1 after it.
        let b = FlowBucket {
            keys: [11, 12, 13],
            seen: [u32::MAX - 1, 1, 2],
            ..Default::default()
        };
        let young = FlowBucket {
            keys: [21, 22, 23],
            seen: [3, 3, 3],
            ..Default::default()
        };
        assert_eq!(way(victim([young.ways(), b.ways()], k, 3)), Some((1, 0)));
    }

    #[test]
    fn with_two_choices_a_table_a_third_full_evicts_nothing_and_half_full_almost_nothing() {
        // What docs/internals.md promises of the table's sizing (a simulation of this rule gave
        // 0 losses at a third, 0.07 % at half).
        for (load, max_lost) in [(3, 0.0), (2, 0.002)] {
            assert!(lost(load) <= max_lost, "1/{load} full: lost {}", lost(load));
        }
    }

    /// The share of flows a table of 3,000 buckets loses when filled to 1/`load`.
    fn lost(load: u32) -> f64 {
        let n = 3_000;
        let mut t = [FlowBucket::default(); 3_000];
        let flows = n * FLOW_WAYS as u32 / load;
        for i in 0..flows {
            let k = pack_key(&key(i.to_be_bytes(), 40000), 0);
            let at = buckets_of(k, n);
            let mut copies = [t[at[0] as usize], t[at[1] as usize]];
            let changed = put(&mut copies, k, 1, 1, i).expect("no way is locked");
            t[at[changed] as usize] = copies[changed];
        }
        let kept = (0..flows)
            .filter(|i| {
                let k = pack_key(&key(i.to_be_bytes(), 40000), 0);
                let [a, b] = buckets_of(k, n);
                get([&t[a as usize], &t[b as usize]], k, 0).is_some()
            })
            .count();
        1.0 - kept as f64 / flows as f64
    }

    #[test]
    fn buckets_spread_neighbouring_clients() {
        let n = 1009;
        let mut hits = [0u32; 1009];
        for i in 0..100_900u32 {
            let k = pack_key(&key(i.to_be_bytes(), 40000), 0);
            hits[buckets_of(k, n)[0] as usize] += 1;
        }
        assert!(
            hits.iter().all(|&h| (50..160).contains(&h)),
            "uneven: {:?}",
            &hits[..16]
        );
    }
}
