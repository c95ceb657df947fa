//! The schema of every map lb pins: what its keys and values mean (a version per map), its
//! shape and size for a node's [`Sizes`], and what a migration does with its entries.
//!
//! A map's schema version goes up whenever the layout or the meaning of its keys or values
//! changes; its size is not part of the schema (a size change is a migration of the same
//! schema). Schema 1 of every map is what release 0.1.0 (map layout 7) wrote. A map at schema 1
//! is pinned under its plain name (`LB_NAT`), a later schema N under `LB_NAT@vN`: so a pin's
//! name says which schema its entries have, and a release that does not know that schema never
//! opens it by mistake. The size a map was made with is the kernel's own record of it
//! (`max_entries` in the map's info), checked against what its schema expects of key and value.

use lb_common::{maps, maps as m};

use crate::kernel::program::Sizes;

/// How a map is laid out in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Hash,
    LruHash,
    Array,
    PerCpuArray,
    ProgArray,
    DevMapHash,
    /// `LB_FLOWS4`: an array of [`lb_common::flowtab::FlowBucket`]s, where a flow's place
    /// depends on the number of buckets.
    FlowBuckets,
    /// `LB_SRC_RANGES`, `LB_VIP_RANGES`: a longest-prefix-match trie.
    LpmTrie,
}

/// What a migration does with a map's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moves {
    /// Connection state the program writes (flows, affinity, NAT translations, passive health):
    /// copied while the old program serves, and what the old program wrote after that copy is
    /// merged in once it no longer runs.
    State,
    /// Written by the agent only (VIPs, members, the Maglev ring, next hops, node settings,
    /// redirect ports): copied while the old program serves; the agent then applies its config.
    Config,
    /// Per-CPU counters: copied while the old program serves, and what it counted after that
    /// copy is added once it no longer runs.
    Counters,
    /// Belongs to one program (the tail-call table and the per-CPU scratch it passes on): made
    /// afresh with the new program whenever anything migrates, so the old program keeps its own
    /// until the swap.
    Program,
    /// `LB_META`, the layout record 0.1.0 reads; the agent rewrites it.
    Record,
}

/// One schema of one map.
#[derive(Clone, Copy, Debug)]
pub struct Schema {
    pub map: &'static str,
    pub version: u32,
    pub shape: Shape,
    pub key_size: u32,
    pub value_size: u32,
    pub moves: Moves,
    /// Its `max_entries` for a node's sizes.
    pub entries: fn(&Sizes) -> u32,
}

impl Schema {
    /// The pin name of this schema's map.
    pub fn pin_name(&self) -> String {
        pin_name(self.map, self.version)
    }
}

/// `LB_NAT` for schema 1, `LB_NAT@v2` for schema 2.
pub fn pin_name(map: &str, version: u32) -> String {
    match version {
        1 => map.to_string(),
        v => format!("{map}@v{v}"),
    }
}

/// The map and schema a pin name stands for (`LB_NAT@v2` -> (`LB_NAT`, 2)); None for names
/// that are not lb maps' pins.
pub fn parse_pin_name(name: &str) -> Option<(&str, u32)> {
    if !name.starts_with("LB_") {
        return None;
    }
    match name.split_once("@v") {
        None if !name.contains('@') => Some((name, 1)),
        Some((map, v)) => v.parse().ok().filter(|v| *v > 1).map(|v| (map, v)),
        None => None,
    }
}

const U32: u32 = 4;
const U64: u32 = 8;

const fn size_of<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

fn one(_: &Sizes) -> u32 {
    1
}
fn vip_entries(_: &Sizes) -> u32 {
    maps::DEFAULT_VIP_ENTRIES
}
fn filter_words(_: &Sizes) -> u32 {
    lb_common::hash::VIP_FILTER_BITS / 64
}
fn ring(s: &Sizes) -> u32 {
    s.max_vips.saturating_mul(s.table_size)
}
fn max_vips(s: &Sizes) -> u32 {
    s.max_vips
}
fn max_backends(s: &Sizes) -> u32 {
    s.max_backends
}
fn flows_v6(s: &Sizes) -> u32 {
    s.flow_table_size_v6()
}
fn flow_buckets(s: &Sizes) -> u32 {
    lb_common::flowtab::buckets_for(s.flow_table_size)
}
fn affinity(s: &Sizes) -> u32 {
    s.affinity_table_size
}
fn nat(s: &Sizes) -> u32 {
    s.nat_table_size
}
fn counters(_: &Sizes) -> u32 {
    lb_common::Counter::COUNT
}
fn source_ranges(_: &Sizes) -> u32 {
    maps::MAX_SOURCE_RANGES
}
fn vip_range_keys(_: &Sizes) -> u32 {
    maps::MAX_VIP_RANGE_KEYS
}
fn prog_slots(_: &Sizes) -> u32 {
    maps::PROG_SLOTS
}
fn tx_ports(_: &Sizes) -> u32 {
    maps::MAX_TX_PORTS
}

macro_rules! schema {
    ($map:expr, $v:expr, $shape:ident, $k:expr, $val:expr, $moves:ident, $entries:expr) => {
        Schema {
            map: $map,
            version: $v,
            shape: Shape::$shape,
            key_size: $k,
            value_size: $val,
            moves: Moves::$moves,
            entries: $entries,
        }
    };
}

/// The schema of every pinned map this release writes, in the order a migration copies them.
pub fn current() -> &'static [Schema] {
    CURRENT
}

/// [`current`]'s list: data, one entry a map.
static CURRENT: &[Schema] = {
    use lb_common::{
        AffinityKey, AffinityValue, FlowKey, FlowValue, IcmpJob, LayoutMeta, Member, MemberConns,
        NatFlow, NatJob, NatReverse, NewFlowBudget, NextHop, NodeConfig, PassiveHealth,
        SrcRangeKey, TooBigJob, TrafficStats, VipAddr, VipKey, VipRangeKey, VipValue,
        flowtab::FlowBucket,
    };
    &[
        // v2 (0.3.0): `flags` may hold VIP_F_SOURCE_RANGES, VIP_F_NEW_FLOW_BUDGET and
        // VIP_F_LEAST_CONN (0.3.0 is unreleased: a new bit stays schema 2).
        schema!(
            m::VIPS,
            2,
            Hash,
            size_of::<VipKey>(),
            size_of::<VipValue>(),
            Config,
            vip_entries
        ),
        schema!(
            m::VIP_ADDRS,
            1,
            Hash,
            size_of::<VipAddr>(),
            U32,
            Config,
            vip_entries
        ),
        schema!(m::VIP_FILTER, 1, Array, U32, U64, Config, filter_words),
        schema!(m::RING, 1, Array, U32, U32, Config, ring),
        schema!(
            m::MEMBERS,
            1,
            Array,
            U32,
            size_of::<Member>(),
            Config,
            max_backends
        ),
        schema!(
            m::NEXTHOPS,
            1,
            Array,
            U32,
            size_of::<NextHop>(),
            Config,
            max_backends
        ),
        // v2 (0.3.0): the half-open timeout, where v1 had padding.
        schema!(m::NODE, 2, Array, U32, size_of::<NodeConfig>(), Config, one),
        schema!(m::TX_PORTS, 1, DevMapHash, U32, U64, Config, tx_ports),
        schema!(
            m::FLOWS,
            1,
            LruHash,
            size_of::<FlowKey>(),
            size_of::<FlowValue>(),
            State,
            flows_v6
        ),
        schema!(
            m::FLOWS4,
            2,
            FlowBuckets,
            U32,
            size_of::<FlowBucket>(),
            State,
            flow_buckets
        ),
        schema!(
            m::AFFINITY,
            1,
            LruHash,
            size_of::<AffinityKey>(),
            size_of::<AffinityValue>(),
            State,
            affinity
        ),
        schema!(
            m::NAT,
            1,
            LruHash,
            size_of::<FlowKey>(),
            size_of::<NatFlow>(),
            State,
            nat
        ),
        // v2 (0.3.0): `state` may hold NAT_S_HALF_OPEN.
        schema!(
            m::NAT_REV,
            2,
            LruHash,
            size_of::<FlowKey>(),
            size_of::<NatReverse>(),
            State,
            nat
        ),
        schema!(
            m::MEMBER_PASSIVE,
            1,
            Array,
            U32,
            size_of::<PassiveHealth>(),
            State,
            max_backends
        ),
        schema!(m::STATS, 1, PerCpuArray, U32, U64, Counters, counters),
        schema!(
            m::VIP_STATS,
            1,
            PerCpuArray,
            U32,
            size_of::<TrafficStats>(),
            Counters,
            max_vips
        ),
        schema!(
            m::MEMBER_STATS,
            1,
            PerCpuArray,
            U32,
            size_of::<TrafficStats>(),
            Counters,
            max_backends
        ),
        schema!(m::PROGS, 1, ProgArray, U32, U32, Program, prog_slots),
        schema!(
            m::NAT_JOB,
            1,
            PerCpuArray,
            U32,
            size_of::<NatJob>(),
            Program,
            one
        ),
        schema!(
            m::TOO_BIG_JOB,
            1,
            PerCpuArray,
            U32,
            size_of::<TooBigJob>(),
            Program,
            one
        ),
        schema!(
            m::ICMP_JOB,
            1,
            PerCpuArray,
            U32,
            size_of::<IcmpJob>(),
            Program,
            one
        ),
        schema!(m::META, 1, Array, U32, size_of::<LayoutMeta>(), Record, one),
        schema!(
            m::SRC_RANGES,
            1,
            LpmTrie,
            U32 + size_of::<SrcRangeKey>(),
            U32,
            Config,
            source_ranges
        ),
        schema!(m::VIP_DROPS, 1, PerCpuArray, U32, U64, Counters, max_vips),
        // The agent's settings and the program's tokens in one entry per CPU: copied as
        // they are (a resize keeps each VIP id's settings and tokens), then the agent
        // writes the budgets that differ from its config.
        schema!(
            m::NEW_FLOW_BUDGET,
            1,
            PerCpuArray,
            U32,
            size_of::<NewFlowBudget>(),
            Config,
            max_vips
        ),
        schema!(
            m::VIP_BUDGET_DROPS,
            1,
            PerCpuArray,
            U32,
            U64,
            Counters,
            max_vips
        ),
        schema!(
            m::VIP_REPLY_STATS,
            1,
            PerCpuArray,
            U32,
            size_of::<TrafficStats>(),
            Counters,
            max_vips
        ),
        schema!(
            m::MEMBER_REPLY_STATS,
            1,
            PerCpuArray,
            U32,
            size_of::<TrafficStats>(),
            Counters,
            max_backends
        ),
        // The agent's thresholds and the program's times side by side: copied as they are,
        // then the agent writes every member's threshold.
        schema!(m::MEMBER_HOLD, 1, Array, U32, U64, Config, max_backends),
        // New in 0.3.0: the port-range VIPs' blocks, each with its range VIP's value.
        schema!(
            m::VIP_RANGES,
            1,
            LpmTrie,
            U32 + size_of::<VipRangeKey>(),
            size_of::<VipValue>(),
            Config,
            vip_range_keys
        ),
        // The agent's weights and the program's counts side by side: copied as they are
        // (the counts of established connections carry over), then the agent writes the
        // weights and corrects the counts from its recount.
        schema!(
            m::MEMBER_CONNS,
            1,
            Array,
            U32,
            size_of::<MemberConns>(),
            Config,
            max_backends
        ),
    ]
};

/// The schema of `map` in this release.
pub fn of(map: &str) -> Option<&'static Schema> {
    current().iter().find(|s| s.map == map)
}

/// A release and the schema of each of its maps.
pub struct Release {
    pub version: &'static str,
    /// (map, schema) of every map it pins.
    pub schemas: &'static [(&'static str, u32)],
}

/// Every map at schema 1: what 0.1.0 (layout 7) pins, and what 0.2.0 keeps.
const LAYOUT_7: &[(&str, u32)] = &[
    (m::VIPS, 1),
    (m::VIP_ADDRS, 1),
    (m::VIP_FILTER, 1),
    (m::RING, 1),
    (m::MEMBERS, 1),
    (m::NEXTHOPS, 1),
    (m::NODE, 1),
    (m::TX_PORTS, 1),
    (m::FLOWS, 1),
    (m::FLOWS4, 1),
    (m::AFFINITY, 1),
    (m::NAT, 1),
    (m::NAT_REV, 1),
    (m::MEMBER_PASSIVE, 1),
    (m::STATS, 1),
    (m::VIP_STATS, 1),
    (m::MEMBER_STATS, 1),
    (m::PROGS, 1),
    (m::NAT_JOB, 1),
    (m::TOO_BIG_JOB, 1),
    (m::ICMP_JOB, 1),
    (m::META, 1),
];

/// 0.3.0: `LB_VIPS` at schema 2 (the source-ranges and new-flow budget flags), `LB_NODE` and
/// `LB_NAT_REV` at schema 2 (half-open translations), `LB_FLOWS4` at schema 2 (established flows
/// confirmed, which a flood of new flows cannot evict), the source ranges and their per-VIP drop
/// counters, the new-flow budgets and theirs, the NAT replies per VIP and per member, and the
/// port-range VIPs (`LB_VIP_RANGES`) and the
/// open connections per member (least connections, `LB_MEMBER_CONNS`).
const RELEASE_0_3: &[(&str, u32)] = &[
    (m::VIPS, 2),
    (m::VIP_ADDRS, 1),
    (m::VIP_FILTER, 1),
    (m::RING, 1),
    (m::MEMBERS, 1),
    (m::NEXTHOPS, 1),
    (m::NODE, 2),
    (m::TX_PORTS, 1),
    (m::FLOWS, 1),
    (m::FLOWS4, 2),
    (m::AFFINITY, 1),
    (m::NAT, 1),
    (m::NAT_REV, 2),
    (m::MEMBER_PASSIVE, 1),
    (m::STATS, 1),
    (m::VIP_STATS, 1),
    (m::MEMBER_STATS, 1),
    (m::PROGS, 1),
    (m::NAT_JOB, 1),
    (m::TOO_BIG_JOB, 1),
    (m::ICMP_JOB, 1),
    (m::META, 1),
    (m::SRC_RANGES, 1),
    (m::VIP_DROPS, 1),
    (m::NEW_FLOW_BUDGET, 1),
    (m::VIP_BUDGET_DROPS, 1),
    (m::VIP_REPLY_STATS, 1),
    (m::MEMBER_REPLY_STATS, 1),
    (m::MEMBER_HOLD, 1),
    (m::VIP_RANGES, 1),
    (m::MEMBER_CONNS, 1),
];

/// The releases this one knows, oldest first; the last is this one.
pub const RELEASES: &[Release] = &[
    Release {
        version: "0.1.0",
        schemas: LAYOUT_7,
    },
    Release {
        version: "0.2.0",
        schemas: LAYOUT_7,
    },
    Release {
        version: "0.3.0",
        schemas: RELEASE_0_3,
    },
];

/// Key and value sizes of the older schemas this release converts from (a pin of an older
/// schema is checked against these before its conversion reads it).
pub fn older(map: &str, version: u32) -> Option<(u32, u32)> {
    use lb_common::{VipKey, VipValue};
    match (map, version) {
        // Schema 1 has schema 2's layout: only the meaning of a flag bit differs.
        (m::VIPS, 1) => Some((size_of::<VipKey>(), size_of::<VipValue>())),
        // Likewise: a state bit, and what was padding.
        (m::NAT_REV, 1) => Some((
            size_of::<lb_common::FlowKey>(),
            size_of::<lb_common::NatReverse>(),
        )),
        (m::NODE, 1) => Some((U32, size_of::<lb_common::NodeConfig>())),
        // A bucket's padding became its confirmed bits.
        (m::FLOWS4, 1) => Some((U32, size_of::<lb_common::flowtab::FlowBucket>())),
        _ => None,
    }
}

/// The layout version 0.1.0 checks in `LB_META`: written while every map is at the schema 0.1.0
/// reads, so that 0.1.0 adopts the pins as they are (a rollback with no conversion).
pub const LAYOUT_7_VERSION: u32 = 7;

/// The version `LB_META` records: 7 while every map is at a schema 0.1.0 reads (so 0.1.0 adopts
/// the pins), 8 once one is not (so 0.1.0 refuses them rather than misread them).
pub fn record_version() -> u32 {
    if readable_by_layout_7() {
        LAYOUT_7_VERSION
    } else {
        LAYOUT_7_VERSION + 1
    }
}

/// Whether the maps of this release are all at the schemas 0.1.0 reads.
pub fn readable_by_layout_7() -> bool {
    current()
        .iter()
        .all(|s| LAYOUT_7.contains(&(s.map, s.version)))
}

/// The release of `version`, if this one knows it.
pub fn release(version: &str) -> Option<&'static Release> {
    RELEASES.iter().find(|r| r.version == version)
}

/// `LB_VIPS v1, LB_VIP_ADDRS v1, ...`: for `lb --version` and logs.
pub fn summary() -> String {
    current()
        .iter()
        .map(|s| format!("{} v{}", s.map, s.version))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pinned_map_has_one_schema_and_this_release_is_the_last_known() {
        let names: Vec<&str> = current().iter().map(|s| s.map).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "a map listed twice");
        let mut all: Vec<&str> = maps::ALL.to_vec();
        all.sort();
        assert_eq!(sorted, all, "the registry and maps::ALL disagree");
        let last = RELEASES.last().unwrap();
        assert_eq!(last.version, env!("CARGO_PKG_VERSION"));
        for s in current() {
            assert!(
                last.schemas.contains(&(s.map, s.version)),
                "{} v{} is not in this release's list",
                s.map,
                s.version
            );
        }
    }

    #[test]
    fn pin_names_say_the_schema_and_read_back() {
        assert_eq!(pin_name("LB_NAT", 1), "LB_NAT");
        assert_eq!(pin_name("LB_NAT", 2), "LB_NAT@v2");
        assert_eq!(parse_pin_name("LB_NAT"), Some(("LB_NAT", 1)));
        assert_eq!(parse_pin_name("LB_NAT@v2"), Some(("LB_NAT", 2)));
        assert_eq!(parse_pin_name("LB_NAT@v1"), None);
        assert_eq!(parse_pin_name("LB_NAT@next"), None);
        assert_eq!(parse_pin_name("link-eth0"), None);
    }
}
