//! Port-range VIPs in `LB_VIP_RANGES`: a range is written as the aligned blocks it is made of
//! (`lb_common::PortPrefixes`), each an LPM key holding the range VIP's value, and read back by
//! joining the blocks of each address and protocol. Pure: the kernel dataplane, `lb explain`
//! and the tests share it.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{VipKey, VipRangeKey, VipValue};

use crate::model::desired::PortRange;

/// The `LB_VIP_RANGES` keys of range VIP `key` (port 0) serving `range`: (prefix length, data).
pub fn blocks(key: &VipKey, range: PortRange) -> Vec<(u32, VipRangeKey)> {
    range
        .blocks()
        .map(|(first, bits)| {
            let data = VipRangeKey {
                family: key.family,
                proto: key.proto,
                addr: key.addr,
                port: first.to_be_bytes(),
            };
            (VipRangeKey::prefix_len(bits), data)
        })
        .collect()
}

/// The blocks of `old` that `new` does not write again: what an update removes once `new`'s
/// blocks are in (a port in both ranges is served throughout).
pub fn stale_blocks(
    key: &VipKey,
    old: PortRange,
    new: PortRange,
) -> impl Iterator<Item = (u32, VipRangeKey)> {
    let keep: BTreeSet<(u32, VipRangeKey)> = blocks(key, new).into_iter().collect();
    blocks(key, old)
        .into_iter()
        .filter(move |b| !keep.contains(b))
}

/// The range VIPs the trie's entries stand for, by key (port 0): the blocks of one address
/// and protocol joined into one range (lb writes one range per address and protocol), with the
/// value of its first block. Keys no lb wrote (a prefix shorter than the address) are left out.
pub fn of_blocks(
    entries: impl IntoIterator<Item = (u32, VipRangeKey, VipValue)>,
) -> BTreeMap<VipKey, (PortRange, VipValue)> {
    let mut out: BTreeMap<VipKey, (PortRange, VipValue)> = BTreeMap::new();
    for (len, k, v) in entries {
        let Some(bits) = len.checked_sub(VipRangeKey::ADDR_BITS).filter(|b| *b <= 16) else {
            continue;
        };
        let lo = k.port();
        let hi = (u32::from(lo) + (1u32 << (16 - bits)) - 1) as u16;
        let key = VipKey {
            addr: k.addr,
            port: 0,
            proto: k.proto,
            family: k.family,
        };
        out.entry(key)
            .and_modify(|(r, first)| {
                if lo < r.lo {
                    *first = v;
                }
                r.lo = r.lo.min(lo);
                r.hi = r.hi.max(hi);
            })
            .or_insert((PortRange { lo, hi }, v));
    }
    out
}

/// The range VIP of `ranges` that serves `port`, if any (what the program finds after an exact
/// miss).
pub fn find(ranges: &BTreeMap<VipKey, PortRange>, exact: &VipKey) -> Option<(VipKey, PortRange)> {
    let key = VipKey { port: 0, ..*exact };
    let r = ranges.get(&key)?;
    r.contains(u16::from_be(exact.port)).then_some((key, *r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::desired::addr16;

    fn key(a: &str) -> VipKey {
        let (addr, family) = addr16(a.parse().unwrap());
        VipKey {
            addr,
            port: 0,
            proto: lb_common::IPPROTO_TCP,
            family,
        }
    }

    fn value(id: u32) -> VipValue {
        VipValue {
            id,
            ..Default::default()
        }
    }

    #[test]
    fn ranges_written_as_blocks_read_back_as_the_same_ranges() {
        let a = (
            key("192.0.2.1"),
            PortRange {
                lo: 10000,
                hi: 10999,
            },
        );
        let b = (key("2001:db8::1"), PortRange::ALL);
        let c = (key("192.0.2.2"), PortRange { lo: 1, hi: 65534 });
        let entries = [(a, 1), (b, 2), (c, 3)]
            .into_iter()
            .flat_map(|((k, r), id)| {
                blocks(&k, r)
                    .into_iter()
                    .map(move |(len, d)| (len, d, value(id)))
            });
        let read = of_blocks(entries);
        assert_eq!(read.len(), 3);
        assert_eq!(read[&a.0], (a.1, value(1)));
        assert_eq!(read[&b.0], (b.1, value(2)));
        assert_eq!(read[&c.0], (c.1, value(3)));
    }

    #[test]
    fn a_narrowed_range_removes_only_the_blocks_it_lost() {
        let k = key("192.0.2.1");
        let old = PortRange {
            lo: 10000,
            hi: 10999,
        };
        let new = PortRange {
            lo: 10000,
            hi: 10499,
        };
        let stale: Vec<_> = stale_blocks(&k, old, new).collect();
        let new_blocks: BTreeSet<_> = blocks(&k, new).into_iter().collect();
        assert!(stale.iter().all(|b| !new_blocks.contains(b)));
        let ports_left: u32 = stale.iter().map(|(len, _)| 1u32 << (160 - len)).sum();
        assert!(
            ports_left >= 500,
            "the blocks removed cover 10500-10999 at least"
        );
    }

    #[test]
    fn find_gives_the_range_of_a_port_inside_and_none_outside() {
        let mut ranges = BTreeMap::new();
        ranges.insert(
            key("192.0.2.1"),
            PortRange {
                lo: 10000,
                hi: 10999,
            },
        );
        let at = |port: u16| VipKey {
            port: port.to_be(),
            ..key("192.0.2.1")
        };
        assert!(find(&ranges, &at(10000)).is_some());
        assert!(find(&ranges, &at(10999)).is_some());
        assert!(find(&ranges, &at(9999)).is_none());
        assert!(find(&ranges, &at(11000)).is_none());
    }
}
