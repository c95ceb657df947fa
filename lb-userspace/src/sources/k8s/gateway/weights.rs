//! From backendRef weights to integer Maglev weights.
//!
//! A backendRef's share of a listener's new connections is `weight / sum of weights`, split
//! evenly across the ready endpoints of its Service; a backendRef that does not resolve keeps its
//! share as one rejecting member. So an endpoint of backendRef `i` (weight `wᵢ`, `nᵢ` endpoints)
//! should get `wᵢ / nᵢ` in relative terms.
//!
//! How they are scaled: with `L` the least common multiple of the `nᵢ`, the integers `wᵢ·L/nᵢ`
//! are exactly proportional to `wᵢ/nᵢ`; divided by their greatest common divisor they stay so.
//! When that still does not fit Maglev's `u32` weights (huge `L`: many backendRefs with
//! co-prime endpoint counts), each is rounded from the exact value scaled so that the largest is
//! `u32::MAX`: each weight is off by at most half a unit in 2³², far finer than a table of at
//! most 65537 slots can show (Maglev gives every member its share within one slot anyway).

/// One share: a backendRef's weight and the number of members it is split across (1 for a
/// rejecting share).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    pub weight: u32,
    pub members: u32,
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The integer Maglev weight of each member of each share (0 for a share of weight 0 or with no
/// members), in the order given.
pub fn member_weights(shares: &[Share]) -> Vec<u32> {
    let live = || shares.iter().filter(|s| s.weight > 0 && s.members > 0);
    let lcm = live().fold(1u128, |l, s| {
        let n = s.members as u128;
        // Saturate: beyond 2^64 the exact path cannot fit anyway.
        (l / gcd(l, n)).saturating_mul(n).min(1 << 64)
    });
    let exact: Vec<u128> = shares
        .iter()
        .map(|s| {
            if s.weight == 0 || s.members == 0 {
                0
            } else {
                s.weight as u128 * lcm / s.members as u128
            }
        })
        .collect();
    let g = exact.iter().fold(0u128, |g, &e| gcd(g, e)).max(1);
    let exact: Vec<u128> = exact.iter().map(|e| e / g).collect();
    let max = exact.iter().copied().max().unwrap_or(0);
    if max <= u32::MAX as u128 {
        return exact.iter().map(|&e| e as u32).collect();
    }
    // Rounded: e * u32::MAX / max, at least 1 for a live share.
    exact
        .iter()
        .map(|&e| {
            if e == 0 {
                0
            } else {
                let scaled = (e * u32::MAX as u128 + max / 2) / max;
                scaled.max(1) as u32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(weight: u32, members: u32) -> Share {
        Share { weight, members }
    }

    /// Each member's fraction of all new connections, from the integer weights.
    fn fractions(shares: &[Share], w: &[u32]) -> Vec<f64> {
        let total: f64 = shares
            .iter()
            .zip(w)
            .map(|(s, &w)| w as f64 * s.members as f64)
            .sum();
        w.iter().map(|&w| w as f64 / total).collect()
    }

    /// What each member should get, computed directly: weight / sum / members.
    fn expected(shares: &[Share]) -> Vec<f64> {
        let total: f64 = shares
            .iter()
            .filter(|s| s.members > 0)
            .map(|s| s.weight as f64)
            .sum();
        shares
            .iter()
            .map(|s| {
                if s.members == 0 || total == 0.0 {
                    0.0
                } else {
                    s.weight as f64 / total / s.members as f64
                }
            })
            .collect()
    }

    #[test]
    fn two_hundred_and_one_hundred_over_two_and_three_pods_are_exact_and_small() {
        let shares = [s(200, 2), s(100, 3)];
        let w = member_weights(&shares);
        assert_eq!(
            w,
            [3, 1],
            "2 pods x 3 + 3 pods x 1: 6/9 = 2/3 and 3/9 = 1/3"
        );
    }

    #[test]
    fn proportions_are_exact_whenever_the_exact_integers_fit() {
        let cases: Vec<Vec<Share>> = vec![
            vec![s(70, 1), s(30, 1), s(0, 4)],
            vec![s(80, 5), s(20, 3)],
            vec![s(1, 7), s(1, 11), s(1, 13), s(3, 1)],
            vec![s(1_000_000, 997), s(1, 1)],
            vec![s(5, 0), s(5, 2)],
        ];
        for shares in cases {
            let w = member_weights(&shares);
            // Cross-multiplied, in integers: wᵢ·nᵢ·Wⱼ == wⱼ·nⱼ·Wᵢ for every two live shares.
            for (i, a) in shares.iter().enumerate() {
                for (j, b) in shares.iter().enumerate() {
                    if a.members == 0 || b.members == 0 {
                        continue;
                    }
                    assert_eq!(
                        w[i] as u128 * a.members as u128 * b.weight as u128,
                        w[j] as u128 * b.members as u128 * a.weight as u128,
                        "{shares:?} -> {w:?}"
                    );
                }
            }
            for (got, want) in fractions(&shares, &w).iter().zip(expected(&shares)) {
                assert!((got - want).abs() < 1e-12, "{shares:?}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn co_prime_endpoint_counts_beyond_u32_are_rounded_far_below_one_slot() {
        // lcm(101, 103, 107, 109, 113) * 1e6 does not fit in u32.
        let shares = [
            s(1_000_000, 101),
            s(999_999, 103),
            s(3, 107),
            s(500_000, 109),
            s(1, 113),
        ];
        let w = member_weights(&shares);
        assert!(w.iter().all(|&w| w > 0), "{w:?}");
        for (got, want) in fractions(&shares, &w).iter().zip(expected(&shares)) {
            // One slot of the largest table is 1/65537 of the traffic.
            assert!(
                (got - want).abs() < 1e-9,
                "{got} vs {want}: off by more than 1e-9 of the traffic"
            );
        }
    }

    #[test]
    fn all_weights_zero_give_no_slots() {
        assert_eq!(member_weights(&[s(0, 2), s(0, 1)]), [0, 0]);
        assert_eq!(member_weights(&[]), Vec::<u32>::new());
    }
}
