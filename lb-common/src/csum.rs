//! Incremental Internet checksum updates (RFC 1624), as NAT mode applies them.
//!
//! Pure arithmetic, here rather than in the program so that it runs in host tests too. Sums are
//! in load order (little-endian 16-bit words), as are the checksums they update; the byte order
//! cancels out as long as both are read the same way (RFC 1071, "byte order independence").
//!
//! `bpf_csum_diff` returns a 32-bit one's-complement sum, which before Linux 6.13 is not folded
//! (on x86 it can be anything up to `0xffff_ffff`): every addition to one goes through [`add`],
//! which keeps the carry out of bit 31 instead of losing it.

/// One's-complement sum of two 32-bit partial sums: the carry out of bit 31 comes back in at
/// bit 0 (a plain `+` would drop it, an off-by-one in the final checksum).
#[inline(always)]
pub const fn add(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    // With a carry, s <= 0xffff_fffe: adding it back cannot overflow again.
    s + carry as u32
}

/// The one's-complement change from word `old` to word `new` added to `seed` (RFC 1624, eqn.
/// 3: ~m + m'), as `bpf_csum_diff(old, 4, new, 4, seed)` gives it: two additions.
#[inline(always)]
pub const fn diff(old: [u8; 4], new: [u8; 4], seed: u32) -> u32 {
    add(add(seed, !u32::from_ne_bytes(old)), u32::from_ne_bytes(new))
}

/// One's-complement sum folded to 16 bits.
#[inline(always)]
pub const fn fold(s: u32) -> u16 {
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// A checksum updated by the changes summed in `acc` (RFC 1624, eqn. 3: HC' = ~(~HC + m' - m),
/// where `acc` holds ~m + m').
#[inline(always)]
pub const fn updated(check: [u8; 2], acc: u32) -> [u8; 2] {
    // Two 16-bit values: their sum fits in 17 bits, and `fold` brings the carry back.
    (!fold((!u16::from_ne_bytes(check)) as u32 + fold(acc) as u32)).to_ne_bytes()
}

/// The IPv4 header checksum after the addresses changed by `addrs` (a one's-complement sum of
/// the change, as `bpf_csum_diff` gives it) and the TTL went from `ttl` to `ttl - 1`.
#[inline(always)]
pub const fn ipv4_check(check: [u8; 2], addrs: u32, ttl: u8, proto: u8) -> [u8; 2] {
    let old = (!u16::from_ne_bytes([ttl, proto])) as u32;
    let new = u16::from_ne_bytes([ttl.wrapping_sub(1), proto]) as u32;
    updated(check, add(add(addrs, old), new))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RFC 1071 checksum of an IPv4 header, written out the slow way, independently of
    /// the incremental code above (big-endian words, folded at the end).
    fn full_check(h: &[u8; 20]) -> [u8; 2] {
        let mut s: u64 = 0;
        for (i, w) in h.chunks(2).enumerate() {
            if i != 5 {
                s += u16::from_be_bytes([w[0], w[1]]) as u64;
            }
        }
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        (!(s as u16)).to_be_bytes()
    }

    fn header(src: [u8; 4], dst: [u8; 4], ttl: u8) -> [u8; 20] {
        let mut h = [
            0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, ttl, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        let c = full_check(&h);
        h[10..12].copy_from_slice(&c);
        h
    }

    fn word(a: [u8; 4]) -> u32 {
        u32::from_le_bytes(a)
    }

    /// What `bpf_csum_diff(old, 4, new, 4, seed)` returned on x86-64 before Linux 6.13: the
    /// 32-bit one's-complement sum of ~old, new and the seed, not folded.
    fn kernel_diff(old: [u8; 4], new: [u8; 4], seed: u32) -> u32 {
        add(add(seed, !word(old)), word(new))
    }

    fn check_after(src: [u8; 4], dst: [u8; 4], ns: [u8; 4], nd: [u8; 4]) -> ([u8; 2], [u8; 2]) {
        let h = header(src, dst, 64);
        let addrs = kernel_diff(dst, nd, kernel_diff(src, ns, 0));
        let got = ipv4_check([h[10], h[11]], addrs, 64, 6);
        (got, full_check(&header(ns, nd, 63)))
    }

    #[test]
    fn ipv4_check_keeps_the_carry_of_an_unfolded_address_sum() {
        let (src, dst, ns) = ([198, 51, 100, 7], [192, 0, 2, 10], [10, 0, 0, 1]);
        // A new destination whose address change sums to just under 2^32, where adding the
        // TTL change carries out of bit 31.
        let nd = (0u32..)
            .map(|i| (0x0a01_0000u32 + i).to_be_bytes())
            .find(|nd| kernel_diff(dst, *nd, kernel_diff(src, ns, 0)) >= 0xffff_0002)
            .unwrap();
        let (got, want) = check_after(src, dst, ns, nd);
        assert_eq!(got, want, "new destination {nd:?}");
    }

    #[test]
    fn ipv4_check_matches_a_full_recomputation() {
        let mut x: u32 = 0x1234_5678;
        for _ in 0..10_000 {
            let mut next = || {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x.to_be_bytes()
            };
            let (src, dst, ns, nd) = (next(), next(), next(), next());
            let (got, want) = check_after(src, dst, ns, nd);
            assert_eq!(got, want, "{src:?} -> {ns:?}, {dst:?} -> {nd:?}");
        }
    }
}
