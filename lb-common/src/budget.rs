//! Token buckets: the per-VIP new-flow budget, and the arithmetic it shares with the ICMP too big
//! rate limit (`lb-ebpf`'s `too_big`). Pure, so the program's rule is tested here, on the host.
//!
//! A budget is one [`NewFlowBudget`] per VIP id and CPU (`LB_NEW_FLOW_BUDGET`, a per-CPU
//! array): the program's token count and the agent's settings side by side, so the check is a
//! single per-CPU array lookup, no lock and no atomic. The configured rate and burst are the
//! VIP's total: [`NewFlowBudget::per_cpu`] gives each CPU an even share, so that with new flows
//! spread over the CPUs (RSS) the VIP takes the configured figure, and a flood arriving on one
//! CPU gets that CPU's share only.

use core::mem::size_of;

/// Takes a token from a bucket holding `tokens` as of `last_ns`, where one comes back every
/// `ns_per_token` up to `burst`; false (and nothing taken) when none is left. `last_ns` moves on
/// by whole tokens only, so the fraction of a token earned is kept for the next call and the
/// long-run rate is exact whatever the clock's resolution. A bucket whose `last_ns` is 0 has
/// never been used, and is full (however long a token takes: the clock may have run for less).
#[inline(always)]
pub fn take(tokens: &mut u64, last_ns: &mut u64, now: u64, ns_per_token: u64, burst: u64) -> bool {
    let ns_per_token = if ns_per_token == 0 { 1 } else { ns_per_token };
    let earned = if *last_ns == 0 {
        u64::MAX
    } else {
        now.saturating_sub(*last_ns) / ns_per_token
    };
    if earned > 0 {
        if earned >= burst.saturating_sub(*tokens) {
            *tokens = burst;
            *last_ns = now;
        } else {
            *tokens += earned;
            *last_ns += earned * ns_per_token;
        }
    }
    if *tokens == 0 {
        return false;
    }
    *tokens -= 1;
    true
}

/// One CPU's bucket of one VIP's new-flow budget (`LB_NEW_FLOW_BUDGET`, indexed by VIP id).
/// The agent writes `ns_per_token` and `burst` (with `tokens` and `last_ns` zero: a full
/// bucket) when it gives a VIP a budget or changes it; the program then keeps `tokens` and
/// `last_ns`. Looked up only for VIPs with [`crate::VIP_F_NEW_FLOW_BUDGET`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NewFlowBudget {
    /// Tokens left as of `last_ns` (written by the program).
    pub tokens: u64,
    /// `bpf_ktime_get_coarse_ns` of the last whole token earned (written by the program).
    pub last_ns: u64,
    /// This CPU's share of the VIP's rate: a token comes back every `ns_per_token` (the agent).
    pub ns_per_token: u64,
    /// This CPU's share of the VIP's burst: the most tokens it holds (the agent). 0 is no
    /// budget (every new flow passes), so an entry the agent has not written never drops.
    pub burst: u64,
}

const _: () = assert!(size_of::<NewFlowBudget>() == 32);

const NS_PER_S: u128 = 1_000_000_000;

impl NewFlowBudget {
    /// One CPU's share of a budget of `rate` new flows per second and `burst` at once, over
    /// `cpus` CPUs: the rate divided evenly (a token every `ceil(cpus s / rate)`, so the CPUs
    /// together never exceed `rate`), and the burst divided rounding up, at least 1 per CPU (a
    /// CPU with no burst would never admit a flow; so the total burst is `burst` to
    /// `burst + cpus - 1`).
    pub const fn per_cpu(rate: u64, burst: u64, cpus: u32) -> Self {
        let cpus = if cpus == 0 { 1 } else { cpus as u64 };
        let rate = if rate == 0 { 1 } else { rate };
        let ns = (NS_PER_S * cpus as u128).div_ceil(rate as u128);
        let ns = if ns > u64::MAX as u128 {
            u64::MAX
        } else {
            ns as u64
        };
        let b = burst.div_ceil(cpus);
        Self {
            tokens: 0,
            last_ns: 0,
            ns_per_token: if ns == 0 { 1 } else { ns },
            burst: if b == 0 { 1 } else { b },
        }
    }

    /// Whether a new flow may be made now (a token taken), by this CPU's bucket.
    #[inline(always)]
    pub fn admit(&mut self, now: u64) -> bool {
        if self.burst == 0 {
            return true;
        }
        take(
            &mut self.tokens,
            &mut self.last_ns,
            now,
            self.ns_per_token,
            self.burst,
        )
    }
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, four `u64`s, no padding (size asserted above).
unsafe impl aya::Pod for NewFlowBudget {}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_fresh_bucket_is_full_and_gives_exactly_its_burst() {
        let mut b = NewFlowBudget::per_cpu(10, 3, 1);
        let now = 5_000 * S;
        assert!(b.admit(now) && b.admit(now) && b.admit(now));
        assert!(
            !b.admit(now),
            "the fourth at the same instant is over the burst of 3"
        );
        assert_eq!(b.tokens, 0);
    }

    #[test]
    fn a_fresh_bucket_is_full_even_when_a_token_takes_longer_than_the_clock_has_run() {
        // A token an hour, 10 s after boot.
        let mut b = NewFlowBudget::per_cpu(1, 2, 3_600);
        assert_eq!(b.ns_per_token, 3_600 * S);
        assert!(b.admit(10 * S) && !b.admit(10 * S), "a burst of 1 per CPU");
    }

    #[test]
    fn tokens_come_back_at_the_rate_and_the_fraction_is_kept() {
        // 10 per second: one every 100 ms.
        let mut b = NewFlowBudget::per_cpu(10, 2, 1);
        let t0 = 5_000 * S;
        assert!(b.admit(t0) && b.admit(t0) && !b.admit(t0));
        assert!(!b.admit(t0 + 99_000_000), "99 ms: not a whole token yet");
        assert!(b.admit(t0 + 150_000_000), "150 ms: one token");
        assert!(!b.admit(t0 + 150_000_000));
        // The 50 ms left over from the first token count towards the second.
        assert!(b.admit(t0 + 200_000_000), "200 ms: the second token");
        assert!(!b.admit(t0 + 200_000_000));
    }

    #[test]
    fn a_long_idle_refills_to_the_burst_and_no_more() {
        let mut b = NewFlowBudget::per_cpu(1_000, 4, 1);
        let t0 = 5_000 * S;
        for _ in 0..4 {
            assert!(b.admit(t0));
        }
        let later = t0 + 3_600 * S;
        for _ in 0..4 {
            assert!(b.admit(later));
        }
        assert!(
            !b.admit(later),
            "an hour idle gives the burst, not an hour of tokens"
        );
    }

    #[test]
    fn the_rate_and_burst_are_shared_out_across_cpus() {
        // 1000/s over 4 CPUs: 250/s each, a token every 4 ms; a burst of 10: 3 each (rounded up).
        let b = NewFlowBudget::per_cpu(1_000, 10, 4);
        assert_eq!((b.ns_per_token, b.burst), (4_000_000, 3));
        // A burst below the CPU count still leaves each CPU one token.
        assert_eq!(NewFlowBudget::per_cpu(1_000, 2, 4).burst, 1);
        // Rates that do not divide round the interval up: never more than the configured rate.
        let b = NewFlowBudget::per_cpu(3, 3, 2);
        assert_eq!(b.ns_per_token, 666_666_667);
        assert!(2 * (S / b.ns_per_token) <= 3);
    }

    #[test]
    fn an_entry_the_agent_never_wrote_admits_everything() {
        let mut b = NewFlowBudget::default();
        for _ in 0..100 {
            assert!(b.admit(5_000 * S));
        }
    }
}
