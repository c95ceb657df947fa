//! What the program does with a packet: an XDP action and the verdict counter that says so,
//! as one value every module returns.

use lb_common::Counter;

/// What to do with a packet (an XDP action), and which verdict counter says so. One register
/// wide, so BPF subprograms can return it (they can't return structs).
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Verdict(u64);

impl Verdict {
    #[inline(always)]
    pub const fn new(counter: Counter, action: u32) -> Self {
        Self(((counter as u64) << 32) | action as u64)
    }

    #[inline(always)]
    pub const fn action(self) -> u32 {
        self.0 as u32
    }

    /// Not a verdict yet: the packet is NAT mode's ([`crate::nat`]), its job in `LB_NAT_JOB`.
    pub const NAT: Self = Self(u64::MAX);

    /// Not a verdict yet: the packet is for a least-connections VIP ([`crate::least_conn`]),
    /// its job in `LB_NAT_JOB` (kind `NAT_JOB_LEAST_CONN`).
    pub const LEAST_CONN: Self = Self(u64::MAX - 1);

    #[inline(always)]
    pub const fn bits(self) -> u64 {
        self.0
    }

    #[inline(always)]
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    #[inline(always)]
    pub const fn is_nat(self) -> bool {
        self.0 == u64::MAX
    }

    #[inline(always)]
    pub const fn is_least_conn(self) -> bool {
        self.0 == u64::MAX - 1
    }

    /// The counter's index in `LB_STATS`.
    #[inline(always)]
    pub const fn counter(self) -> u32 {
        (self.0 >> 32) as u32
    }
}
