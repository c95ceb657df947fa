//! The flow hash and the Maglev slot it selects.
//!
//! Both the XDP program and `lb explain` call these, so a flow maps to the same slot everywhere;
//! and since nothing here depends on the node (no random seed), two load balancers with the same
//! tables send a flow to the same backend, which is what lets one take over from another.
//!
//! The hash is MurmurHash3 (x86, 32-bit) over the flow's words. It is written out here rather than
//! taken from a crate because it has to compile for the BPF target and pass the verifier: no
//! slices of run-time length, no loops the compiler cannot unroll.

use crate::types::{FAMILY_V4, FlowKey};

const SEED: u32 = 0x6c62_7631; // "lbv1"

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(h: u32, len: u32) -> u32 {
    let mut h = h ^ len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
const fn word(a: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
}

#[inline(always)]
const fn addr(h: u32, a: &[u8; 16], family: u8) -> u32 {
    let h = mix(h, word(a, 0));
    if family == FAMILY_V4 {
        h
    } else {
        mix(mix(mix(h, word(a, 4)), word(a, 8)), word(a, 12))
    }
}

/// Hash of the 5-tuple. IPv4 flows hash only the four address bytes in use.
#[inline(always)]
pub const fn flow_hash(k: &FlowKey) -> u32 {
    let h = addr(SEED, &k.src, k.family);
    let h = addr(h, &k.dst, k.family);
    let ports = u32::from_le_bytes([
        k.src_port.to_ne_bytes()[0],
        k.src_port.to_ne_bytes()[1],
        k.dst_port.to_ne_bytes()[0],
        k.dst_port.to_ne_bytes()[1],
    ]);
    let h = mix(h, ports);
    let h = mix(h, k.proto as u32 | (k.family as u32) << 8);
    finish(h, if k.family == FAMILY_V4 { 16 } else { 40 })
}

/// Hash of the source address alone, for VIPs that hash on the client address.
#[inline(always)]
pub const fn source_hash(src: &[u8; 16], family: u8) -> u32 {
    let h = addr(SEED, src, family);
    finish(h, if family == FAMILY_V4 { 4 } else { 16 })
}

/// Bits in the VIP-address filter (`maps::VIP_FILTER`): 64 Ki bits, 8 KiB.
pub const VIP_FILTER_BITS: u32 = 1 << 16;

/// Where VIP address `a` (of `family`) sets its bit in the VIP-address filter: the word index
/// and the bit in it. Fibonacci hashing of the address's words (XOR-folded for IPv6).
#[inline(always)]
pub const fn vip_filter_slot(a: &[u8; 16], family: u8) -> (u32, u64) {
    let mut x = word(a, 0);
    if family != FAMILY_V4 {
        x ^= word(a, 4).rotate_left(8) ^ word(a, 8).rotate_left(16) ^ word(a, 12).rotate_left(24);
    }
    let bit = x.wrapping_mul(0x9e37_79b1) >> 16;
    (bit >> 6, 1u64 << (bit & 63))
}

/// Source ports NAT mode tries for one flow before giving up (and counting it). Each probe is an
/// independent draw, so with a fraction `f` of a backend's ports taken a new flow fails with
/// probability `f^128`: 1.4e-6 at 90 %, 0.14 % at 95 % (8 probes failed 43 % of flows at 90 %).
/// Probes stop at the first free port, so a flow costs `1 / (1 - f)` lookups on average (10 at
/// 90 %); all 128 are spent only when the range is (nearly) full. The program runs them in a
/// `bpf_loop`, which the verifier checks once, not per iteration.
pub const NAT_PORT_PROBES: u32 = 128;

/// The `i`-th source port NAT mode tries for a flow with hash `hash`, in `min..=max`: the same
/// on every node and every run, so a flow's translation is predictable (`lb explain`) and tests
/// can aim two flows at one port.
#[inline(always)]
pub const fn nat_port_candidate(hash: u32, i: u32, min: u16, max: u16) -> u16 {
    let span = (max as u32).saturating_sub(min as u32) + 1;
    // Each probe rehashes, so two flows that collide on one port go separate ways after.
    let h = finish(hash ^ i.wrapping_mul(0x9e37_79b9), 4);
    min + maglev_slot(h, span) as u16
}

/// The hash of a flow's `i`-th least-connections candidate, from its Maglev hash `hash`: `hash`
/// itself for the first (Maglev's own choice), a rehash for each other, so the candidates are
/// independent ring slots, the same on every node.
#[inline(always)]
pub const fn candidate_hash(hash: u32, i: u32) -> u32 {
    if i == 0 {
        hash
    } else {
        finish(hash ^ i.wrapping_mul(0x85eb_ca77), 8)
    }
}

/// The Maglev slot (in `0..m`) a hash selects. Multiply-shift instead of `%`: uniform over `0..m`
/// for a uniform 32-bit hash, and a multiplication is cheaper than a division in the fast path.
#[inline(always)]
pub const fn maglev_slot(hash: u32, m: u32) -> u32 {
    ((hash as u64 * m as u64) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{FAMILY_V6, IPPROTO_TCP};

    #[test]
    fn murmur3_matches_reference_vectors() {
        // MurmurHash3_x86_32 of four zero bytes with seed 0 is 0x2362f9de, and of 0x00000001 (LE)
        // with seed 0 ... computed here from the definition instead: mix + finish with len 4.
        assert_eq!(finish(mix(0, 0), 4), 0x2362_f9de);
    }

    #[test]
    fn v4_ignores_unused_address_bytes_but_v6_does_not() {
        let mut a = FlowKey {
            src: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            src_port: 1000u16.to_be(),
            dst_port: 80u16.to_be(),
            proto: IPPROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        let h = flow_hash(&a);
        a.src[15] = 1;
        assert_eq!(flow_hash(&a), h);
        a.family = FAMILY_V6;
        let h6 = flow_hash(&a);
        a.src[15] = 2;
        assert_ne!(flow_hash(&a), h6);
    }

    #[test]
    fn vip_filter_slots_are_in_range_and_ignore_unused_v4_bytes() {
        let mut a = [0u8; 16];
        let mut words = [false; (VIP_FILTER_BITS / 64) as usize];
        for i in 0..=255u8 {
            a[..4].copy_from_slice(&[192, 0, 2, i]);
            let (w, bit) = vip_filter_slot(&a, FAMILY_V4);
            assert!(w < VIP_FILTER_BITS / 64 && bit.count_ones() == 1);
            a[15] = 0xff;
            assert_eq!(vip_filter_slot(&a, FAMILY_V4), (w, bit));
            a[15] = 0;
            words[w as usize] = true;
        }
        // 256 neighbouring addresses spread over many words.
        let used = words.iter().filter(|u| **u).count();
        assert!(used > 200, "only {used} words");
        a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        let v6 = vip_filter_slot(&a, FAMILY_V6);
        a[15] = 1;
        assert_ne!(
            vip_filter_slot(&a, FAMILY_V6),
            v6,
            "the last IPv6 byte counts"
        );
    }

    #[test]
    fn slot_is_in_range_and_spread() {
        let m = 65_537;
        assert_eq!(maglev_slot(0, m), 0);
        assert_eq!(maglev_slot(u32::MAX, m), m - 1);
        let mut hits = [0u32; 16];
        for p in 0..16_000u16 {
            let s = source_hash(
                &[
                    192,
                    168,
                    (p >> 8) as u8,
                    p as u8,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                ],
                FAMILY_V4,
            );
            hits[(maglev_slot(s, 16)) as usize] += 1;
        }
        assert!(
            hits.iter().all(|&n| (800..1200).contains(&n)),
            "uneven: {hits:?}"
        );
    }
}
