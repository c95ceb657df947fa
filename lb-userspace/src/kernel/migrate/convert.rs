//! Conversions of a map's entries, old bytes to new bytes, with no kernel in sight: a size
//! change (re-placing the IPv4 flows in a table of another number of buckets, truncating or
//! extending arrays, checking that hash maps fit) and the merge of what the old program wrote
//! after the first copy. Every function is pure, so the fixtures in `tests` pin them down.
//!
//! A map whose schema changes in a later release gets its conversion here, from each schema the
//! release before could leave (and back, for a rollback).

use std::collections::BTreeMap;

use lb_common::flowtab::{self, EMPTY, FLOW_WAYS, FlowBucket, LOCKED};

/// A shrink that would drop live entries: refused, naming the map's config key and how many.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{key} {to} would drop {dropped} of the {live} live entries of {map}: keep the size, or \
     wait until fewer are live"
)]
pub struct WontFit {
    pub map: String,
    pub key: &'static str,
    pub to: u32,
    pub live: u64,
    pub dropped: u64,
}

/// Hash maps: `live` entries into `max_entries`.
pub fn check_fits(
    map: &str,
    key: &'static str,
    to: u32,
    live: usize,
    max_entries: u32,
) -> Result<(), WontFit> {
    let live = live as u64;
    match live.checked_sub(u64::from(max_entries)) {
        Some(dropped) if dropped > 0 => Err(WontFit {
            map: map.to_string(),
            key,
            to,
            live,
            dropped,
        }),
        _ => Ok(()),
    }
}

/// An array's values (`value_size` bytes each, one after another) in an array of `len`
/// entries: cut or zero-extended. Callers check first that no live id lies past `len`.
pub fn resize_array(bytes: &[u8], value_size: usize, len: u32) -> Vec<u8> {
    let want = len as usize * value_size;
    let mut out = bytes[..bytes.len().min(want)].to_vec();
    out.resize(want, 0);
    out
}

/// The flows (packed key -> (packed value, last seen)) of an IPv4 flow table. Ways being
/// written ([`LOCKED`]) are skipped: their writer had not published them.
pub fn flows_of(table: &[FlowBucket]) -> BTreeMap<u64, (u64, u32)> {
    let mut flows = BTreeMap::new();
    for b in table {
        for w in 0..FLOW_WAYS {
            let k = b.keys[w];
            if k != EMPTY && k != LOCKED {
                flows.insert(k, (b.values[w], b.seen[w]));
            }
        }
    }
    flows
}

/// Puts flow `k` where the program would look for it in `table`: its own way if there, else
/// an empty way of its two buckets (the one with more empty ways, as the program chooses).
/// Never evicts: false if both buckets are full of other flows.
pub fn place(table: &mut [FlowBucket], k: u64, value: u64, seen: u32) -> bool {
    let [a, b] = flowtab::buckets_of(k, table.len() as u32);
    let empties = |i: u32| {
        table[i as usize]
            .keys
            .iter()
            .filter(|&&x| x == EMPTY)
            .count()
    };
    let target = [a, b]
        .into_iter()
        .find(|&i| flowtab::find(&table[i as usize], k).is_some())
        .or_else(|| {
            let (ea, eb) = (empties(a), empties(b));
            match (ea, eb) {
                (0, 0) => None,
                _ if ea >= eb => Some(a),
                _ => Some(b),
            }
        });
    let Some(i) = target else {
        return false;
    };
    let bucket = &mut table[i as usize];
    let w = flowtab::find(bucket, k)
        .or_else(|| bucket.keys.iter().position(|&x| x == EMPTY))
        .expect("a bucket with room");
    bucket.keys[w] = k;
    bucket.values[w] = value;
    bucket.seen[w] = seen;
    true
}

/// The IPv4 flow table re-placed in `buckets` buckets, every flow with its value and last-seen
/// time. Refused if any flow finds no room (both of its buckets full): a shrink too far.
pub fn rehash_flows(old: &[FlowBucket], buckets: u32, to: u32) -> Result<Vec<FlowBucket>, WontFit> {
    let flows = flows_of(old);
    let mut table = vec![FlowBucket::default(); buckets as usize];
    let dropped = flows
        .iter()
        .filter(|(k, (v, seen))| !place(&mut table, **k, *v, *seen))
        .count() as u64;
    if dropped > 0 {
        return Err(WontFit {
            map: lb_common::maps::FLOWS4.to_string(),
            key: "node.flow_table_size",
            to,
            live: flows.len() as u64,
            dropped,
        });
    }
    Ok(table)
}

/// One write the merge makes to the new map: a value for the key, or its removal.
pub type Write<K, V> = (K, Option<V>);

/// A three-way merge of entries by key. `base` is what the first copy read from the old map
/// (and so wrote into the new one), `old` the old map once its program stopped, `new` the new
/// map then. Where the old program changed an entry after the copy (`old != base`) and the new
/// program has not touched it since (`new == base`), the old program's change is taken;
/// otherwise the new map keeps what it has (the new program wrote it last).
pub fn merge3<K: Ord + Clone, V: PartialEq + Clone>(
    base: &BTreeMap<K, V>,
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
) -> Vec<Write<K, V>> {
    let keys: std::collections::BTreeSet<&K> = base.keys().chain(old.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (b, o, n) = (base.get(k), old.get(k), new.get(k));
            (o != b && n == b).then(|| (k.clone(), o.cloned()))
        })
        .collect()
}

/// The keys whose entry differs between `base` and `old` (changed, added or removed).
pub fn changed<K: Ord + Clone, V: PartialEq>(
    base: &BTreeMap<K, V>,
    old: &BTreeMap<K, V>,
) -> Vec<K> {
    let added_or_changed = old.iter().filter(|(k, v)| base.get(*k) != Some(*v));
    let removed = base.keys().filter(|k| !old.contains_key(*k));
    let mut keys: Vec<K> = added_or_changed
        .map(|(k, _)| k.clone())
        .chain(removed.cloned())
        .collect();
    keys.sort();
    keys
}

/// [`merge3`] of two IPv4 flow tables, applied to `new` in place; returns how many flows it
/// wrote and how many found no room (counted, not refused: the program would have evicted).
pub fn merge_flows(base: &[FlowBucket], old: &[FlowBucket], new: &mut [FlowBucket]) -> (u64, u64) {
    let writes = merge3(&flows_of(base), &flows_of(old), &flows_of(new));
    let (mut written, mut lost) = (0, 0);
    for (k, v) in writes {
        match v {
            Some((value, seen)) if place(new, k, value, seen) => written += 1,
            Some(_) => lost += 1,
            None => {
                for i in flowtab::buckets_of(k, new.len() as u32) {
                    let b = &mut new[i as usize];
                    if let Some(w) = flowtab::find(b, k) {
                        b.keys[w] = EMPTY;
                        b.values[w] = 0;
                        b.seen[w] = 0;
                        written += 1;
                    }
                }
            }
        }
    }
    (written, lost)
}

/// Per-CPU counters: adds to `new` what the old program counted after the first copy
/// (`old - base`, word by word as `u64`s; `new` started as `base`'s copy). Slices are one
/// CPU's values, `u64` words in native byte order.
pub fn add_counted(base: &[u8], old: &[u8], new: &mut [u8]) {
    let word = |b: &[u8], i: usize| {
        b.get(i..i + 8)
            .map_or(0, |s| u64::from_ne_bytes(s.try_into().expect("8 bytes")))
    };
    for i in (0..new.len()).step_by(8) {
        if i + 8 > new.len() {
            break;
        }
        let sum = word(new, i).wrapping_add(word(old, i).wrapping_sub(word(base, i)));
        new[i..i + 8].copy_from_slice(&sum.to_ne_bytes());
    }
}

/// A conversion of one map's values between two of its schemas, value bytes to value bytes
/// (keys keep their bytes).
pub type ValueConversion = fn(&[u8]) -> Vec<u8>;

/// The conversion of `map`'s values from schema `from` to schema `to`, if this release has
/// one (up for an upgrade, down for a rollback).
pub fn values(map: &str, from: u32, to: u32) -> Option<ValueConversion> {
    match (map, from, to) {
        (lb_common::maps::VIPS, 1, 2) => Some(vips_v1_to_v2),
        (lb_common::maps::VIPS, 2, 1) => Some(vips_v2_to_v1),
        (lb_common::maps::NAT_REV, 1, 2)
        | (lb_common::maps::NODE, 1, 2)
        | (lb_common::maps::FLOWS4, 1, 2) => Some(same_bytes),
        (lb_common::maps::FLOWS4, 2, 1) => Some(flows4_v2_to_v1),
        (lb_common::maps::NAT_REV, 2, 1) => Some(nat_rev_v2_to_v1),
        (lb_common::maps::NODE, 2, 1) => Some(node_v2_to_v1),
        _ => None,
    }
}

/// Whether `map`'s values of schema `from` are values of schema `to` byte for byte, with the
/// same meaning (`to` only gives one to bits or fields `from` leaves zero): then the map is used
/// as it is, by both programs, and only its pin is renamed (see `pins::Action::Relabel`).
pub fn as_is(map: &str, from: u32, to: u32) -> bool {
    use lb_common::maps::{FLOWS4, NAT_REV, NODE, VIPS};
    matches!((map, from, to), (VIPS | NAT_REV | NODE | FLOWS4, 1, 2))
}

/// Byte offset of `FlowBucket::confirmed` (padding in schema 1 of `LB_FLOWS4`).
const CONFIRMED_AT: usize = core::mem::offset_of!(FlowBucket, confirmed);

/// `LB_FLOWS4` v2 -> v1 (a bucket's bytes): the confirmed bits cleared, padding again. A
/// release before 0.3.0 neither reads nor writes them; cleared, they cannot mark the flows it
/// records as established if this release comes back.
pub fn flows4_v2_to_v1(bucket: &[u8]) -> Vec<u8> {
    let mut out = bucket.to_vec();
    if let Some(f) = out.get_mut(CONFIRMED_AT..CONFIRMED_AT + 4) {
        f.fill(0);
    }
    out
}

/// v1 -> v2 of `LB_NAT_REV`, `LB_NODE` and `LB_FLOWS4`: the same bytes. Schema 2 of
/// `LB_FLOWS4` gives a bucket's padding a meaning (a confirmed bit per way): no v1 bucket has
/// one, so every flow carried over is unconfirmed until its next packet, which confirms it. Schema 2 of `LB_NAT_REV` gives a
/// state bit (`NAT_S_HALF_OPEN`) a meaning, and no v1 entry has it: every translation carried
/// over is established, as it was. Schema 2 of `LB_NODE` gives its padding a meaning (the
/// half-open timeout), and 0 there is no such timeout until the agent writes its config.
pub fn same_bytes(value: &[u8]) -> Vec<u8> {
    value.to_vec()
}

/// Byte offset of `NatReverse::state` (after the client's flow key and two ids).
const NAT_STATE_AT: usize = core::mem::offset_of!(lb_common::NatReverse, state);

/// `LB_NAT_REV` v2 -> v1: the half-open and counted bits cleared (a release before 0.3.0 knows
/// no half-open state: its translations are judged by the idle timeout, as they were; nor
/// least connections, whose count the counted bit is for).
pub fn nat_rev_v2_to_v1(value: &[u8]) -> Vec<u8> {
    let mut out = value.to_vec();
    if let Some(f) = out.get_mut(NAT_STATE_AT..NAT_STATE_AT + 2) {
        let state = u16::from_ne_bytes((&*f).try_into().expect("2 bytes"))
            & !(lb_common::NAT_S_HALF_OPEN | lb_common::NAT_S_COUNTED);
        f.copy_from_slice(&state.to_ne_bytes());
    }
    out
}

/// Byte offset of `NodeConfig::half_open_timeout_ms` (padding in schema 1).
const HALF_OPEN_AT: usize = core::mem::offset_of!(lb_common::NodeConfig, half_open_timeout_ms);

/// `LB_NODE` v2 -> v1: the half-open timeout zeroed (padding again).
pub fn node_v2_to_v1(value: &[u8]) -> Vec<u8> {
    let mut out = value.to_vec();
    if let Some(f) = out.get_mut(HALF_OPEN_AT..HALF_OPEN_AT + 4) {
        f.fill(0);
    }
    out
}

/// Byte offset of `VipValue::flags` (after `id`).
const VIP_FLAGS_AT: usize = 4;

/// `LB_VIPS` v1 -> v2: the same bytes. Schema 2 only gives flag bits (`VIP_F_SOURCE_RANGES`,
/// `VIP_F_NEW_FLOW_BUDGET`) a meaning, and no v1 entry has them set: the VIP takes every source
/// and every new flow, as it did.
pub fn vips_v1_to_v2(value: &[u8]) -> Vec<u8> {
    value.to_vec()
}

/// `LB_VIPS` v2 -> v1: the source-ranges, new-flow budget and least-connections flags cleared
/// (a release before 0.3.0 has none of them: the VIP takes every source and every new flow,
/// and balances new flows by Maglev; its established flows keep their entries). Flags are
/// host-endian.
pub fn vips_v2_to_v1(value: &[u8]) -> Vec<u8> {
    let mut out = value.to_vec();
    if let Some(f) = out.get_mut(VIP_FLAGS_AT..VIP_FLAGS_AT + 4) {
        let flags = u32::from_ne_bytes((&*f).try_into().expect("4 bytes"))
            & !(lb_common::VIP_F_SOURCE_RANGES
                | lb_common::VIP_F_NEW_FLOW_BUDGET
                | lb_common::VIP_F_LEAST_CONN);
        f.copy_from_slice(&flags.to_ne_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use lb_common::{FAMILY_V4, FlowKey, IPPROTO_TCP, flowtab};

    use super::*;

    fn key(i: u32) -> u64 {
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&(0x0a00_0000 + i).to_be_bytes());
        let k = FlowKey {
            src,
            src_port: ((i % 50_000) as u16 + 1024).to_be(),
            dst: [0; 16],
            dst_port: 80u16.to_be(),
            proto: IPPROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        flowtab::pack_key(&k, i % 7)
    }

    fn table_of(n: u32, buckets: u32) -> Vec<FlowBucket> {
        let mut t = vec![FlowBucket::default(); buckets as usize];
        for i in 0..n {
            let k = key(i);
            assert!(place(&mut t, k, flowtab::pack_value(k, i % 100, 1), i));
        }
        t
    }

    #[test]
    fn growing_the_flow_table_keeps_every_flow_where_the_program_finds_it() {
        let old = table_of(3_000, 3_000);
        let new = rehash_flows(&old, 4_001, 12_003).unwrap();
        assert_eq!(flows_of(&new), flows_of(&old));
        for (k, (v, _)) in flows_of(&old) {
            let [a, b] = flowtab::buckets_of(k, new.len() as u32);
            let got = flowtab::get([&new[a as usize], &new[b as usize]], k, 0).unwrap();
            assert_eq!(
                Some((got.member_id, got.generation)),
                flowtab::unpack_value(k, v)
            );
        }
    }

    #[test]
    fn shrinking_below_the_live_flows_is_refused_with_the_count() {
        let old = table_of(3_000, 3_000);
        let e = rehash_flows(&old, 500, 1_500).unwrap_err();
        assert_eq!(e.live, 3_000);
        assert!(e.dropped >= 1_500, "{e:?}");
        assert!(
            e.to_string()
                .starts_with("node.flow_table_size 1500 would drop")
        );
    }

    #[test]
    fn grow_then_shrink_back_is_the_identity_for_the_flows() {
        let old = table_of(1_000, 1_000);
        let grown = rehash_flows(&old, 2_000, 6_000).unwrap();
        let back = rehash_flows(&grown, 1_000, 3_000).unwrap();
        assert_eq!(flows_of(&back), flows_of(&old));
    }

    #[test]
    fn the_merge_takes_the_old_programs_late_writes_unless_the_new_one_wrote_after() {
        let m = |v: &[(u32, u32)]| v.iter().copied().collect::<BTreeMap<_, _>>();
        let base = m(&[(1, 10), (2, 20), (3, 30), (4, 40)]);
        // Old program: changed 1, added 5, removed 3, changed 4 after the copy.
        let old = m(&[(1, 11), (2, 20), (4, 41), (5, 50)]);
        // New program since the swap: changed 4 itself, added 6.
        let new = m(&[(1, 10), (2, 20), (3, 30), (4, 42), (6, 60)]);
        assert_eq!(
            merge3(&base, &old, &new),
            vec![(1, Some(11)), (3, None), (5, Some(50))]
        );
    }

    #[test]
    fn changed_keys_are_those_added_changed_or_removed_after_the_copy() {
        let m = |v: &[(u32, u32)]| v.iter().copied().collect::<BTreeMap<_, _>>();
        let base = m(&[(1, 10), (2, 20), (3, 30)]);
        let old = m(&[(1, 11), (2, 20), (4, 40)]);
        assert_eq!(changed(&base, &old), vec![1, 3, 4]);
    }

    #[test]
    fn merged_flow_tables_hold_late_flows_of_the_old_program() {
        let base = table_of(100, 100);
        let mut old = base.clone();
        let late = key(1_000);
        assert!(place(&mut old, late, flowtab::pack_value(late, 9, 2), 77));
        let mut new = rehash_flows(&base, 300, 900).unwrap();
        assert_eq!(merge_flows(&base, &old, &mut new), (1, 0));
        assert_eq!(flows_of(&new), flows_of(&old));
    }

    #[test]
    fn counters_add_what_the_old_program_counted_after_the_copy() {
        let w = |v: &[u64]| v.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
        let base = w(&[10, 20, 30]);
        let old = w(&[15, 20, 31]);
        let mut new = w(&[10 + 3, 20, 30 + 100]);
        add_counted(&base, &old, &mut new);
        assert_eq!(new, w(&[18, 20, 131]));
    }

    #[test]
    fn arrays_are_cut_or_zero_extended() {
        assert_eq!(resize_array(&[1, 2, 3, 4], 2, 3), vec![1, 2, 3, 4, 0, 0]);
        assert_eq!(resize_array(&[1, 2, 3, 4], 2, 1), vec![1, 2]);
    }

    #[test]
    fn a_hash_map_that_does_not_fit_is_refused_with_the_count() {
        assert!(check_fits("LB_NAT", "node.nat_table_size", 100, 100, 100).is_ok());
        let e = check_fits("LB_NAT", "node.nat_table_size", 100, 130, 100).unwrap_err();
        assert_eq!((e.live, e.dropped), (130, 30));
    }

    /// A VIP value's bytes, written out field by field (id, flags, affinity, mode, table size:
    /// five host-endian `u32`s), so the fixtures do not go through `VipValue` itself.
    fn vip_bytes(id: u32, flags: u32, affinity: u32, mode: u32, table: u32) -> Vec<u8> {
        [id, flags, affinity, mode, table]
            .iter()
            .flat_map(|x| x.to_ne_bytes())
            .collect()
    }

    #[test]
    fn vips_v1_bytes_are_v2_bytes_and_back_unchanged() {
        // A NAT VIP (mode 1) hashing on the source only (flag bit 0), id 7, table 251.
        let v1 = vip_bytes(7, 1, 30, 1, 251);
        let v2 = values("LB_VIPS", 1, 2).unwrap()(&v1);
        assert_eq!(v2, v1);
        assert_eq!(values("LB_VIPS", 2, 1).unwrap()(&v2), v1);
    }

    #[test]
    fn vips_v2_to_v1_clears_the_source_ranges_flag_and_nothing_else() {
        // Flags 0b11: hash on the source only, and source ranges (bit 1, 0.3.0).
        let v2 = vip_bytes(3, 0b11, 0, 0, 65_537);
        assert_eq!(vips_v2_to_v1(&v2), vip_bytes(3, 0b01, 0, 0, 65_537));
        let v2 = vip_bytes(u32::MAX, 0b10, 5, 1, 13);
        assert_eq!(vips_v2_to_v1(&v2), vip_bytes(u32::MAX, 0, 5, 1, 13));
    }

    #[test]
    fn only_identity_conversions_up_are_used_as_they_are() {
        for (map, from, to) in [
            ("LB_VIPS", 1, 2),
            ("LB_NAT_REV", 1, 2),
            ("LB_NODE", 1, 2),
            ("LB_FLOWS4", 1, 2),
        ] {
            assert!(as_is(map, from, to), "{map} v{from} -> v{to}");
            // And they are the identity indeed.
            let bytes: Vec<u8> = (0..64).collect();
            assert_eq!(values(map, from, to).unwrap()(&bytes), bytes, "{map}");
        }
        // Down, a bit is cleared: another map's bytes.
        assert!(!as_is("LB_VIPS", 2, 1));
        assert!(!as_is("LB_NAT_REV", 2, 1));
        assert!(!as_is("LB_NAT", 1, 2));
        assert!(!as_is("LB_FLOWS4", 2, 1));
    }

    #[test]
    fn flows4_v2_to_v1_clears_the_confirmed_bits_and_keeps_the_flows() {
        // A bucket's bytes written out: three keys, three values, three times, then the
        // confirmed bits (ways 0 and 2) where schema 1 had padding.
        let words: [u64; 6] = [11, 12, 13, 21, 22, 23];
        let mut v2: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        for t in [100u32, 200, 300, 0b101] {
            v2.extend(t.to_ne_bytes());
        }
        let v1 = values("LB_FLOWS4", 2, 1).unwrap()(&v2);
        assert_eq!(v1[..60], v2[..60], "keys, values and times");
        assert_eq!(v1[60..], [0, 0, 0, 0], "no confirmed bits in schema 1");
    }

    #[test]
    fn vips_v2_to_v1_clears_the_least_connections_flag_and_nothing_else() {
        let v2 = vip_bytes(3, lb_common::VIP_F_LEAST_CONN | 1, 60, 1, 251);
        assert_eq!(vips_v2_to_v1(&v2), vip_bytes(3, 1, 60, 1, 251));
    }

    #[test]
    fn nat_rev_v2_to_v1_clears_the_counted_bit() {
        let counted = lb_common::NAT_S_COUNTED | lb_common::NAT_S_ANSWERED;
        assert_eq!(
            nat_rev_v2_to_v1(&nat_rev_bytes(1, counted, 5)),
            nat_rev_bytes(1, lb_common::NAT_S_ANSWERED, 5)
        );
    }

    #[test]
    fn vips_v2_to_v1_clears_the_new_flow_budget_flag_and_nothing_else() {
        // Flags 0b111: hash on the source only, source ranges, new-flow budget (bit 2, 0.3.0).
        let v2 = vip_bytes(9, 0b111, 60, 1, 251);
        assert_eq!(vips_v2_to_v1(&v2), vip_bytes(9, 0b001, 60, 1, 251));
        let v2 = vip_bytes(0, 0b100, 0, 0, 65_537);
        assert_eq!(vips_v2_to_v1(&v2), vip_bytes(0, 0, 0, 0, 65_537));
    }

    #[test]
    fn only_known_schema_pairs_have_a_conversion() {
        assert!(values("LB_VIPS", 1, 3).is_none());
        assert!(values("LB_NAT", 1, 2).is_none());
        assert!(values("LB_NAT_REV", 2, 3).is_none());
    }

    /// A reverse NAT entry's bytes, field by field: the client's flow key (40 bytes, here all
    /// `k`), backend id, VIP id (host-endian u32), state (u16), padding, generation, created,
    /// last (u64), so the fixtures do not go through `NatReverse` itself.
    fn nat_rev_bytes(k: u8, state: u16, created: u64) -> Vec<u8> {
        let mut v = vec![k; 40];
        v.extend(5u32.to_ne_bytes());
        v.extend(2u32.to_ne_bytes());
        v.extend(state.to_ne_bytes());
        v.extend([0, 0]);
        v.extend(9u32.to_ne_bytes());
        v.extend(created.to_ne_bytes());
        v.extend((created + 7).to_ne_bytes());
        v
    }

    #[test]
    fn nat_rev_v1_entries_carry_over_unchanged_and_so_established() {
        // Answered (bit 3) and the client's FIN (bit 0): no half-open bit (bit 5) in schema 1.
        let v1 = nat_rev_bytes(0xab, 0b1001, 1 << 40);
        assert_eq!(v1.len(), std::mem::size_of::<lb_common::NatReverse>());
        assert_eq!(values("LB_NAT_REV", 1, 2).unwrap()(&v1), v1);
    }

    #[test]
    fn nat_rev_v2_to_v1_clears_the_half_open_and_counted_bits_and_nothing_else() {
        let v2 = nat_rev_bytes(0x11, 0b10_1000, 77);
        assert_eq!(
            values("LB_NAT_REV", 2, 1).unwrap()(&v2),
            nat_rev_bytes(0x11, 0b00_1000, 77)
        );
        let all = nat_rev_bytes(0xff, u16::MAX, u64::MAX - 7);
        assert_eq!(
            nat_rev_v2_to_v1(&all),
            nat_rev_bytes(
                0xff,
                !(lb_common::NAT_S_HALF_OPEN | lb_common::NAT_S_COUNTED),
                u64::MAX - 7
            )
        );
    }

    #[test]
    fn node_v2_to_v1_zeroes_the_half_open_timeout_only() {
        // src_v6 (16), src_v4 (4), flags (4), udp idle (8), port min, max (2 + 2), half-open
        // timeout (4, padding in v1), close grace, syn timeout, tcp idle (8 each).
        let node = |half_open: u32| {
            let mut v = vec![0xfd; 16];
            v.extend([10, 0, 0, 1]);
            v.extend(3u32.to_ne_bytes());
            v.extend(30_000_000_000u64.to_ne_bytes());
            v.extend(20000u16.to_ne_bytes());
            v.extend(52767u16.to_ne_bytes());
            v.extend(half_open.to_ne_bytes());
            for x in [10u64, 2, 600] {
                v.extend((x * 1_000_000_000).to_ne_bytes());
            }
            v
        };
        assert_eq!(node(0).len(), std::mem::size_of::<lb_common::NodeConfig>());
        assert_eq!(values("LB_NODE", 2, 1).unwrap()(&node(10_000)), node(0));
        assert_eq!(values("LB_NODE", 1, 2).unwrap()(&node(0)), node(0));
    }
}
