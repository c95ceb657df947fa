//! The IPv4 flow table (`maps::FLOWS4`, `BPF_F_MMAPABLE`) mapped read-only into this process,
//! so that reading every flow is a walk through memory instead of one syscall per bucket
//! (hundreds of thousands for the default size).
//!
//! The program writes ways while we read them. A way is read the way `lb_common::flowtab`'s
//! readers do: its key, then its value and last-seen time, then its key again; a way whose key
//! changed meanwhile (or is [`flowtab::LOCKED`]) is being rewritten and is read again, and a value
//! that belongs to another key is refused by its tag ([`flowtab::unpack_value`]).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use aya::maps::MapData;
use lb_common::flowtab::{self, FLOW_WAYS, FlowBucket};

use crate::kernel::mapping::Mapping;

/// How often a way that is being rewritten is read again before it is skipped.
const RETRIES: usize = 4;

/// One way of a bucket, as read at one moment: a flow, its packed value and last-seen time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Way {
    pub key: u64,
    pub value: u64,
    pub seen: u32,
    /// A later packet of the flow found its entry (`FlowBucket::confirmed`).
    pub confirmed: bool,
    /// Its connection ended (a FIN or RST on a least-connections VIP: `flowtab::ENDED_SHIFT`).
    pub ended: bool,
}

pub struct FlowMap {
    mem: Mapping,
    buckets: usize,
}

impl FlowMap {
    /// Maps the `buckets` buckets of `map` read-only. (A BPF_F_MMAPABLE array of 64-byte values:
    /// 64 is a multiple of 8, so its elements are packed.)
    pub fn map(map: &MapData, buckets: usize) -> std::io::Result<Self> {
        Ok(Self {
            mem: Mapping::new(map, buckets * size_of::<FlowBucket>(), false)?,
            buckets,
        })
    }

    pub fn buckets(&self) -> usize {
        self.buckets
    }

    /// Way `w` of bucket `i` if it holds a flow, read consistently (see the module's doc).
    pub fn way(&self, i: usize, w: usize) -> Option<Way> {
        assert!(
            i < self.buckets && w < FLOW_WAYS,
            "way {i}.{w} beyond the table"
        );
        // SAFETY: in bounds of the mapping; the fields are naturally aligned, and the program
        // writes them with single stores or compare-and-exchanges, so atomic loads see whole
        // values.
        let b = unsafe { self.mem.ptr().cast::<FlowBucket>().add(i) };
        let (key, value, seen, confirmed) = unsafe {
            (
                &*(&raw const (*b).keys[w]).cast::<AtomicU64>(),
                &*(&raw const (*b).values[w]).cast::<AtomicU64>(),
                &*(&raw const (*b).seen[w]).cast::<AtomicU32>(),
                &*(&raw const (*b).confirmed).cast::<AtomicU32>(),
            )
        };
        for _ in 0..RETRIES {
            let k = key.load(Ordering::Acquire);
            if k == flowtab::EMPTY {
                return None;
            }
            if k == flowtab::LOCKED {
                std::hint::spin_loop();
                continue;
            }
            let (v, s) = (value.load(Ordering::Relaxed), seen.load(Ordering::Relaxed));
            let bits = confirmed.load(Ordering::Relaxed);
            let c = bits & (1 << w) != 0;
            let ended = bits & (1 << (flowtab::ENDED_SHIFT as usize + w)) != 0;
            fence(Ordering::Acquire);
            if key.load(Ordering::Relaxed) == k {
                return Some(Way {
                    key: k,
                    value: v,
                    seen: s,
                    confirmed: c,
                    ended,
                });
            }
        }
        None
    }

    /// Every way that holds a flow.
    pub fn ways(&self) -> impl Iterator<Item = Way> + '_ {
        (0..self.buckets).flat_map(move |i| (0..FLOW_WAYS).filter_map(move |w| self.way(i, w)))
    }
}
