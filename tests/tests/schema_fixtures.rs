//! Schema 1 of every map is what release 0.1.0 (map layout 7) wrote: pinned down here byte by
//! byte. Each fixture is one key and one value as 0.1.0 lays them out in its maps, written by
//! hand from 0.1.0's `lb-common/src/types.rs` (`git show e4a3143:lb-common/src/types.rs`), with
//! the field values it stands for written out independently; this release's types must read
//! exactly those values from those bytes. A change to a map's key or value type without a
//! schema bump (and a conversion) fails here, before it misreads the pins of a running node.
//!
//! Host-order fields are little-endian in the fixtures (the hosts lb runs on); addresses and
//! ports are in network byte order, as 0.1.0's types say.

use std::collections::BTreeMap;

use lb_common::{
    AffinityKey, AffinityValue, Counter, FlowKey, FlowValue, LayoutMeta, MEMBER_F_ACCEPTS,
    MEMBER_F_LIVE, MODE_NAT, Member, NAT_S_ANSWERED, NAT_S_FIN_CLIENT, NH_FORWARD, NODE_F_SRC_V4,
    NODE_F_SRC_V6, NatFlow, NatReverse, NextHop, NodeConfig, PassiveHealth, TrafficStats,
    VIP_F_HASH_SRC_ONLY, VipAddr, VipKey, VipValue,
    flowtab::{self, FlowBucket},
    maps,
};
use lb_userspace::{
    kernel::migrate::{
        convert,
        schema::{self, Moves, Schema},
    },
    kernel::program::Sizes,
};

/// One key and one value of a map as 0.1.0 wrote them, in hex (spaces and `|` between fields
/// are for the reader).
struct Fixture {
    map: &'static str,
    key: String,
    value: String,
}

const CLIENT_V4: &str = "c6 33 64 09 00 00 00 00 00 00 00 00 00 00 00 00"; // 198.51.100.9
const VIP_V4: &str = "c0 00 02 0a 00 00 00 00 00 00 00 00 00 00 00 00"; // 192.0.2.10
const NAT_VIP: &str = "c0 00 02 0c 00 00 00 00 00 00 00 00 00 00 00 00"; // 192.0.2.12
const BACKEND: &str = "0a 01 00 01 00 00 00 00 00 00 00 00 00 00 00 00"; // 10.1.0.1
const NODE_V4: &str = "0a 00 00 01 00 00 00 00 00 00 00 00 00 00 00 00"; // 10.0.0.1

/// The IPv4 flow table's fixture bucket: where it lies in a table of this many buckets.
const BUCKETS: u32 = 1000;

fn fixtures() -> Vec<Fixture> {
    let f = |map, key, value| Fixture { map, key, value };
    vec![
        f(
            maps::VIPS,
            // VipKey: addr | port 80 | proto TCP | family 4
            format!("{VIP_V4} | 00 50 | 06 | 04"),
            // VipValue: id 3 | flags | affinity 600 s | mode NAT | table size 1009
            "03 00 00 00 | 01 00 00 00 | 58 02 00 00 | 01 00 00 00 | f1 03 00 00".into(),
        ),
        f(
            maps::VIP_ADDRS,
            // VipAddr: addr | family 4 | pad
            format!("{VIP_V4} | 04 | 00 00 00"),
            // VIPs on the address: 2
            "02 00 00 00".into(),
        ),
        f(
            maps::VIP_FILTER,
            // word 5
            "05 00 00 00".into(),
            // bits 0 and 63
            "01 00 00 00 00 00 00 80".into(),
        ),
        f(
            maps::RING,
            // slot 7 of VIP 3's table (M = 1009): 3 * 1009 + 7 = 3034
            "da 0b 00 00".into(),
            // member 5
            "05 00 00 00".into(),
        ),
        f(
            maps::MEMBERS,
            // member id 5
            "05 00 00 00".into(),
            // Member: addr | port 9000 | family 4 | flags LIVE|ACCEPTS | VIP 3 | generation 7
            format!("{BACKEND} | 23 28 | 04 | 03 | 03 00 00 00 | 07 00 00 00"),
        ),
        f(
            maps::NEXTHOPS,
            "05 00 00 00".into(),
            // NextHop: dmac | smac | ifindex 3 | mtu 1500 | generation 7 | action FORWARD | pad
            "02 00 00 00 00 fe | 02 00 00 00 00 01 | 03 00 00 00 | dc 05 00 00 | 07 00 00 00 \
             | 01 | 00 00 00"
                .into(),
        ),
        f(
            maps::NODE,
            "00 00 00 00".into(),
            // NodeConfig: src_v6 fd00::1 | src_v4 10.0.0.1 | flags SRC_V4|SRC_V6 |
            // udp idle 30 s | ports 20000-29999 | pad | close grace 10 s | syn timeout 3 s |
            // tcp idle 900 s
            "fd 00 00 00 00 00 00 00 00 00 00 00 00 00 00 01 | 0a 00 00 01 | 03 00 00 00 \
             | 00 ac 23 fc 06 00 00 00 | 20 4e | 2f 75 | 00 00 00 00 | 00 e4 0b 54 02 00 00 00 \
             | 00 5e d0 b2 00 00 00 00 | 00 28 2e 8c d1 00 00 00"
                .into(),
        ),
        f(
            maps::TX_PORTS,
            // ifindex 4
            "04 00 00 00".into(),
            // struct bpf_devmap_val: ifindex 4 | program (none)
            "04 00 00 00 | 00 00 00 00".into(),
        ),
        f(
            maps::FLOWS,
            // FlowKey: [2001:db8:c::1]:30000 -> [2001:db8::10]:80 TCP, family 6
            "20 01 0d b8 00 0c 00 00 00 00 00 00 00 00 00 01 \
             | 20 01 0d b8 00 00 00 00 00 00 00 00 00 00 00 10 | 75 30 | 00 50 | 06 | 06 | 00 00"
                .into(),
            // FlowValue: member 5 | generation 7 | last seen 0x1122334455 ns
            "05 00 00 00 | 07 00 00 00 | 55 44 33 22 11 00 00 00".into(),
        ),
        f(
            maps::FLOWS4,
            // bucket 170 (of 1000)
            "aa 00 00 00".into(),
            // FlowBucket: keys [198.51.100.9:40001 on VIP 3, empty, empty] | values [member 5
            // generation 7 with the key's tag 0xa41, 0, 0] | seen [0x12345678, 0, 0] | pad
            "c6 33 64 09 9c 41 04 00 | 00 00 00 00 00 00 00 00 | 00 00 00 00 00 00 00 00 \
             | 05 00 10 a4 07 00 00 00 | 00 00 00 00 00 00 00 00 | 00 00 00 00 00 00 00 00 \
             | 78 56 34 12 | 00 00 00 00 | 00 00 00 00 | 00 00 00 00"
                .into(),
        ),
        f(
            maps::AFFINITY,
            // AffinityKey: client 198.51.110.1 | VIP 3
            "c6 33 6e 01 00 00 00 00 00 00 00 00 00 00 00 00 | 03 00 00 00".into(),
            // AffinityValue: member 5 | generation 7 | last seen 0x1122334455 ns
            "05 00 00 00 | 07 00 00 00 | 55 44 33 22 11 00 00 00".into(),
        ),
        f(
            maps::NAT,
            // FlowKey: 198.51.100.9:40001 -> 192.0.2.12:80 TCP, family 4
            format!("{CLIENT_V4} | {NAT_VIP} | 9c 41 | 00 50 | 06 | 04 | 00 00"),
            // NatFlow: member 5 | VIP 3 | NAT port 33333 | pad | generation 7
            "05 00 00 00 | 03 00 00 00 | 82 35 | 00 00 | 07 00 00 00".into(),
        ),
        f(
            maps::NAT_REV,
            // FlowKey of the reply: 10.1.0.1:9000 -> 10.0.0.1:33333 TCP, family 4
            format!("{BACKEND} | {NODE_V4} | 23 28 | 82 35 | 06 | 04 | 00 00"),
            // NatReverse: client (the NAT fixture's key) | member 5 | VIP 3 |
            // state FIN_CLIENT|ANSWERED | pad | generation 7 | created 10 s | last 20 s
            format!(
                "{CLIENT_V4} | {NAT_VIP} | 9c 41 | 00 50 | 06 | 04 | 00 00 \
                 | 05 00 00 00 | 03 00 00 00 | 09 00 | 00 00 | 07 00 00 00 \
                 | 00 e4 0b 54 02 00 00 00 | 00 c8 17 a8 04 00 00 00"
            ),
        ),
        f(
            maps::MEMBER_PASSIVE,
            "05 00 00 00".into(),
            // PassiveHealth: answered 100 | refused 2 | unreachable 1 | syn timeouts 3 |
            // consecutive failures 4
            "64 00 00 00 00 00 00 00 | 02 00 00 00 00 00 00 00 | 01 00 00 00 00 00 00 00 \
             | 03 00 00 00 00 00 00 00 | 04 00 00 00 00 00 00 00"
                .into(),
        ),
        f(
            maps::STATS,
            // counter 15: tx (0.1.0's order: packets, 14 verdicts before it)
            "0f 00 00 00".into(),
            // one CPU's count: 123456789
            "15 cd 5b 07 00 00 00 00".into(),
        ),
        f(
            maps::VIP_STATS,
            // VIP 3
            "03 00 00 00".into(),
            // TrafficStats: packets 10 | bytes 1500 | new flows 2
            "0a 00 00 00 00 00 00 00 | dc 05 00 00 00 00 00 00 | 02 00 00 00 00 00 00 00".into(),
        ),
        f(
            maps::MEMBER_STATS,
            // member 5
            "05 00 00 00".into(),
            "0a 00 00 00 00 00 00 00 | dc 05 00 00 00 00 00 00 | 02 00 00 00 00 00 00 00".into(),
        ),
        f(
            maps::META,
            "00 00 00 00".into(),
            // LayoutMeta: version 7 | M 65537 | 64 VIPs | 4096 backends | 2^20 flows |
            // 2^16 affinity | 2^18 NAT | pad
            "07 00 00 00 | 01 00 01 00 | 40 00 00 00 | 00 10 00 00 | 00 00 10 00 | 00 00 01 00 \
             | 00 00 04 00 | 00 00 00 00"
                .into(),
        ),
    ]
}

/// The bytes of a fixture's hex.
fn bytes(hex: &str) -> Vec<u8> {
    let digits: Vec<u8> = hex.bytes().filter(u8::is_ascii_hexdigit).collect();
    assert_eq!(digits.len() % 2, 0, "odd hex: {hex}");
    digits
        .chunks(2)
        .map(|d| u8::from_str_radix(std::str::from_utf8(d).unwrap(), 16).unwrap())
        .collect()
}

fn fixture(map: &str) -> (Vec<u8>, Vec<u8>) {
    let all = fixtures();
    let f = all
        .iter()
        .find(|f| f.map == map)
        .unwrap_or_else(|| panic!("no fixture for {map}"));
    (bytes(&f.key), bytes(&f.value))
}

/// `T` read from `b`, which must be exactly its size.
fn read<T: Copy>(b: &[u8]) -> T {
    assert_eq!(b.len(), size_of::<T>(), "{}", std::any::type_name::<T>());
    // SAFETY: lb's map types are plain integers and byte arrays (every bit pattern is valid);
    // the read is unaligned.
    unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) }
}

fn u32_of(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut out = [0; 16];
    out[..4].copy_from_slice(&a);
    out
}

fn v6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

/// The maps whose entries a migration carries (everything but the per-program scratch and
/// tail-call tables).
fn carried() -> Vec<&'static Schema> {
    schema::current()
        .iter()
        .filter(|s| s.moves != Moves::Program)
        .collect()
}

#[test]
#[cfg(target_endian = "little")]
fn every_carried_schema_is_version_1_with_the_key_and_value_sizes_of_its_0_1_0_fixture() {
    let names: Vec<&str> = fixtures().iter().map(|f| f.map).collect();
    let of_0_1_0: Vec<&Schema> = carried()
        .into_iter()
        .filter(|s| schema::RELEASES[0].schemas.contains(&(s.map, 1)))
        .collect();
    for s in &of_0_1_0 {
        assert!(names.contains(&s.map), "{}: no 0.1.0 fixture", s.map);
        let (k, v) = fixture(s.map);
        // A map this release carries at a later schema reads schema 1 through its conversion,
        // with schema 1's sizes.
        let (key, value) = match s.version {
            1 => (s.key_size, s.value_size),
            _ => schema::older(s.map, 1)
                .unwrap_or_else(|| panic!("{} v{}: no conversion from v1", s.map, s.version)),
        };
        assert_eq!(key as usize, k.len(), "{}: key size", s.map);
        assert_eq!(value as usize, v.len(), "{}: value size", s.map);
    }
    assert_eq!(names.len(), of_0_1_0.len(), "a fixture of no schema");
    // Only LB_VIPS (0.3.0: the source-ranges flag), LB_NODE (the half-open timeout),
    // LB_FLOWS4 (the confirmed bits) and LB_NAT_REV (the half-open state) moved on, and only
    // maps of later releases are not 0.1.0's.
    let later: Vec<(&str, u32)> = schema::current()
        .iter()
        .filter(|s| s.version != 1)
        .map(|s| (s.map, s.version))
        .collect();
    assert_eq!(
        later,
        [
            (maps::VIPS, 2),
            (maps::NODE, 2),
            (maps::FLOWS4, 2),
            (maps::NAT_REV, 2)
        ]
    );
}

#[test]
#[cfg(target_endian = "little")]
fn the_0_1_0_flow_bucket_converts_up_unconfirmed_and_back_down_without_confirmed_bits() {
    let (_, v1) = fixture(maps::FLOWS4);
    let up = convert::values(maps::FLOWS4, 1, 2).expect("v1 -> v2")(&v1);
    assert_eq!(up, v1, "the same bytes");
    assert!(convert::as_is(maps::FLOWS4, 1, 2), "relabelled, not copied");
    let b: FlowBucket = read(&up);
    assert!(
        !b.is_confirmed(0),
        "carried over unconfirmed, until its next packet"
    );
    // Confirmed (0.3.0: the last four bytes, ways 0 and 2), then back to 0.1.0's padding.
    let mut v2 = up.clone();
    v2[60..64].copy_from_slice(&0b101u32.to_le_bytes());
    let down = convert::values(maps::FLOWS4, 2, 1).expect("v2 -> v1")(&v2);
    assert_eq!(down, v1);
}

#[test]
#[cfg(target_endian = "little")]
fn the_0_1_0_translation_converts_up_established_and_back_down_without_the_half_open_bit() {
    let (_, v1) = fixture(maps::NAT_REV);
    let up = convert::values(maps::NAT_REV, 1, 2).expect("v1 -> v2")(&v1);
    assert_eq!(up, v1, "the same bytes: no v1 translation is half-open");
    let r: NatReverse = read(&up);
    assert!(!r.half_open(), "carried over established");
    assert_eq!(r.state, NAT_S_FIN_CLIENT | NAT_S_ANSWERED);
    // Half-open (0.3.0), then back to 0.1.0's meaning: the bit is gone, the rest stays. The
    // state is the little-endian u16 after the client's key (40 bytes) and two u32 ids.
    let mut v2 = up.clone();
    v2[48..50].copy_from_slice(&(NAT_S_ANSWERED | lb_common::NAT_S_HALF_OPEN).to_le_bytes());
    let down = convert::values(maps::NAT_REV, 2, 1).expect("v2 -> v1")(&v2);
    let mut want = v1.clone();
    want[48..50].copy_from_slice(&NAT_S_ANSWERED.to_le_bytes());
    assert_eq!(down, want);
}

#[test]
#[cfg(target_endian = "little")]
fn the_0_1_0_node_settings_convert_up_unchanged_and_back_down_without_the_half_open_timeout() {
    let (_, v1) = fixture(maps::NODE);
    let up = convert::values(maps::NODE, 1, 2).expect("v1 -> v2")(&v1);
    assert_eq!(up, v1);
    let n: NodeConfig = read(&up);
    assert_eq!(
        n.half_open_timeout_ms, 0,
        "no half-open timeout until the agent writes one"
    );
    // The timeout is the little-endian u32 at byte 36 (after the ports), padding in 0.1.0.
    let mut v2 = up.clone();
    v2[36..40].copy_from_slice(&10_000u32.to_le_bytes());
    assert_eq!(read::<NodeConfig>(&v2).half_open_timeout_ms, 10_000);
    let down = convert::values(maps::NODE, 2, 1).expect("v2 -> v1")(&v2);
    assert_eq!(down, v1);
}

#[test]
#[cfg(target_endian = "little")]
fn the_0_1_0_vip_converts_up_unchanged_and_back_down_with_the_source_ranges_flag_cleared() {
    let (_, v1) = fixture(maps::VIPS);
    let up = convert::values(maps::VIPS, 1, 2).expect("v1 -> v2")(&v1);
    assert_eq!(up, v1, "the same bytes: no v1 VIP has source ranges");
    let value: VipValue = read(&up);
    assert_eq!((value.id, value.flags), (3, VIP_F_HASH_SRC_ONLY));
    // With ranges (0.3.0) and back to 0.1.0's meaning: the flag is gone, the rest stays.
    let mut v2 = up.clone();
    v2[4..8].copy_from_slice(&(VIP_F_HASH_SRC_ONLY | lb_common::VIP_F_SOURCE_RANGES).to_le_bytes());
    let down = convert::values(maps::VIPS, 2, 1).expect("v2 -> v1")(&v2);
    assert_eq!(down, v1);
}

#[test]
#[cfg(target_endian = "little")]
fn sizes_the_release_fixes_are_0_1_0s() {
    // The maps no config key sizes: another size would be a silent resize of a 0.1.0 map.
    let fixed: BTreeMap<&str, u32> = [
        (maps::VIPS, 1024),
        (maps::VIP_ADDRS, 1024),
        (maps::VIP_FILTER, (1 << 16) / 64),
        (maps::NODE, 1),
        (maps::TX_PORTS, 256),
        // 0.1.0 counted 50; 0.2.0 adds drop_nat_held after them (an upgrade resizes LB_STATS,
        // copying every counter to the same index; 0.1.0 reads the first 50 of a larger one),
        // 0.3.0 drop_source_range, the half-open translations' three, drop_new_flow_budget and
        // drop_backend_failing.
        (maps::STATS, 57),
        (maps::META, 1),
    ]
    .into();
    let sizes = Sizes::default();
    for (map, n) in fixed {
        let s = schema::of(map).unwrap();
        assert_eq!((s.entries)(&sizes), n, "{map}");
    }
    assert_eq!(
        Counter::COUNT,
        57,
        "0.1.0 counted 50 counters, 0.2.0 one more, 0.3.0 six more"
    );
    assert_eq!(Counter::DropNatHeld as u32, 50, "added last");
    assert_eq!(Counter::DropSourceRange as u32, 51, "added last");
    assert_eq!(Counter::NatEstablished as u32, 52, "added last");
    assert_eq!(Counter::NatHalfOpenReclaimed as u32, 54, "added last");
    assert_eq!(Counter::DropNewFlowBudget as u32, 55, "added last");
    assert_eq!(Counter::DropBackendFailing as u32, 56, "added last");
    assert_eq!(Counter::Tx as u32, 15);
    assert_eq!(Counter::FlowHits as u32, 23);
}

#[test]
#[cfg(target_endian = "little")]
fn vips_vip_addresses_filter_and_ring_of_0_1_0_read_field_by_field() {
    let (k, v) = fixture(maps::VIPS);
    let key: VipKey = read(&k);
    assert_eq!(key.addr, v4([192, 0, 2, 10]));
    assert_eq!(u16::from_be(key.port), 80);
    assert_eq!((key.proto, key.family), (6, 4));
    let value: VipValue = read(&v);
    assert_eq!(value.id, 3);
    assert_eq!(value.flags, VIP_F_HASH_SRC_ONLY);
    assert_eq!(value.affinity_timeout_s, 600);
    assert_eq!(value.mode, MODE_NAT);
    assert_eq!(value.table_size, 1009);

    let (k, v) = fixture(maps::VIP_ADDRS);
    let key: VipAddr = read(&k);
    assert_eq!(key.addr, v4([192, 0, 2, 10]));
    assert_eq!(key.family, 4);
    assert_eq!(key._pad, [0; 3]);
    assert_eq!(u32_of(&v), 2);

    let (k, v) = fixture(maps::VIP_FILTER);
    assert_eq!(u32_of(&k), 5);
    assert_eq!(read::<u64>(&v), 1 | 1 << 63);

    let (k, v) = fixture(maps::RING);
    assert_eq!(u32_of(&k), 3 * 1009 + 7);
    assert_eq!(u32_of(&v), 5);
}

#[test]
#[cfg(target_endian = "little")]
fn members_next_hops_passive_health_and_node_of_0_1_0_read_field_by_field() {
    let (k, v) = fixture(maps::MEMBERS);
    assert_eq!(u32_of(&k), 5);
    let m: Member = read(&v);
    assert_eq!(m.addr, v4([10, 1, 0, 1]));
    assert_eq!(u16::from_be(m.port), 9000);
    assert_eq!(m.family, 4);
    assert_eq!(m.flags, MEMBER_F_LIVE | MEMBER_F_ACCEPTS);
    assert!(m.is_live() && m.accepts() && !m.rejects());
    assert_eq!((m.vip_id, m.generation), (3, 7));
    assert!(m.is(3, 7));

    let (k, v) = fixture(maps::NEXTHOPS);
    assert_eq!(u32_of(&k), 5);
    let nh: NextHop = read(&v);
    assert_eq!(nh.dmac, [2, 0, 0, 0, 0, 0xfe]);
    assert_eq!(nh.smac, [2, 0, 0, 0, 0, 1]);
    assert_eq!((nh.ifindex, nh.mtu, nh.generation), (3, 1500, 7));
    assert_eq!(nh.action, NH_FORWARD);
    assert_eq!(nh._pad, [0; 3]);

    let (k, v) = fixture(maps::MEMBER_PASSIVE);
    assert_eq!(u32_of(&k), 5);
    let p: PassiveHealth = read(&v);
    assert_eq!(
        (
            p.answered,
            p.refused,
            p.unreachable,
            p.syn_timeouts,
            p.consecutive_failures
        ),
        (100, 2, 1, 3, 4)
    );

    let (k, v) = fixture(maps::NODE);
    assert_eq!(u32_of(&k), 0);
    let n: NodeConfig = read(&v);
    assert_eq!(n.src_v6, v6("fd00::1"));
    assert_eq!(n.src_v4, [10, 0, 0, 1]);
    assert_eq!(n.flags, NODE_F_SRC_V4 | NODE_F_SRC_V6);
    assert_eq!(n.udp_idle_timeout_ns, 30_000_000_000);
    assert_eq!((n.nat_port_min, n.nat_port_max), (20_000, 29_999));
    // Padding in 0.1.0; the half-open timeout in schema 2 (0.3.0).
    assert_eq!(n.half_open_timeout_ms, 0);
    assert_eq!(n.nat_close_grace_ns, 10_000_000_000);
    assert_eq!(n.syn_timeout_ns, 3_000_000_000);
    assert_eq!(n.tcp_idle_timeout_ns, 900_000_000_000);

    let (k, v) = fixture(maps::TX_PORTS);
    assert_eq!(u32_of(&k), 4);
    assert_eq!((u32_of(&v[..4]), u32_of(&v[4..])), (4, 0));
}

/// The NAT fixture's key: 198.51.100.9:40001 -> 192.0.2.12:80, TCP.
fn nat_client() -> FlowKey {
    FlowKey {
        src: v4([198, 51, 100, 9]),
        dst: v4([192, 0, 2, 12]),
        src_port: 40001u16.to_be(),
        dst_port: 80u16.to_be(),
        proto: 6,
        family: 4,
        _pad: [0; 2],
    }
}

#[test]
#[cfg(target_endian = "little")]
fn ipv6_flows_affinity_and_nat_translations_of_0_1_0_read_field_by_field() {
    let (k, v) = fixture(maps::FLOWS);
    let key: FlowKey = read(&k);
    assert_eq!(key.src, v6("2001:db8:c::1"));
    assert_eq!(key.dst, v6("2001:db8::10"));
    assert_eq!(u16::from_be(key.src_port), 30000);
    assert_eq!(u16::from_be(key.dst_port), 80);
    assert_eq!((key.proto, key.family, key._pad), (6, 6, [0; 2]));
    assert!(
        !flowtab::in_table(key.family),
        "IPv6 flows live in LB_FLOWS"
    );
    let value: FlowValue = read(&v);
    assert_eq!(
        (value.member_id, value.generation, value.last_seen_ns),
        (5, 7, 0x11_2233_4455)
    );

    let (k, v) = fixture(maps::AFFINITY);
    let key: AffinityKey = read(&k);
    assert_eq!(key.addr, v4([198, 51, 110, 1]));
    assert_eq!(key.vip_id, 3);
    let value: AffinityValue = read(&v);
    assert_eq!(
        (value.member_id, value.generation, value.last_seen_ns),
        (5, 7, 0x11_2233_4455)
    );

    let (k, v) = fixture(maps::NAT);
    let key: FlowKey = read(&k);
    assert_eq!(key, nat_client());
    let value: NatFlow = read(&v);
    assert_eq!((value.member_id, value.vip_id), (5, 3));
    assert_eq!(u16::from_be(value.nat_port), 33333);
    assert_eq!((value._pad, value.generation), (0, 7));

    let (k, v) = fixture(maps::NAT_REV);
    let key: FlowKey = read(&k);
    assert_eq!(key.src, v4([10, 1, 0, 1]));
    assert_eq!(key.dst, v4([10, 0, 0, 1]));
    assert_eq!(u16::from_be(key.src_port), 9000);
    assert_eq!(u16::from_be(key.dst_port), 33333);
    assert_eq!((key.proto, key.family), (6, 4));
    let r: NatReverse = read(&v);
    assert_eq!(r.client, nat_client());
    assert_eq!((r.member_id, r.vip_id), (5, 3));
    assert_eq!(r.state, NAT_S_FIN_CLIENT | NAT_S_ANSWERED);
    assert!(!r.closed(), "one FIN is not closed");
    assert_eq!((r._pad, r.generation), (0, 7));
    assert_eq!((r.created_ns, r.last_ns), (10_000_000_000, 20_000_000_000));
}

/// The IPv4 flow of the FLOWS4 fixture: 198.51.100.9:40001 -> 192.0.2.10:80 TCP on VIP 3.
fn flow4() -> FlowKey {
    FlowKey {
        src: v4([198, 51, 100, 9]),
        dst: v4([192, 0, 2, 10]),
        src_port: 40001u16.to_be(),
        dst_port: 80u16.to_be(),
        proto: 6,
        family: 4,
        _pad: [0; 2],
    }
}

#[test]
#[cfg(target_endian = "little")]
fn an_ipv4_flow_bucket_of_0_1_0_reads_back_where_and_as_0_1_0_put_it() {
    let (k, v) = fixture(maps::FLOWS4);
    let at = u32_of(&k);
    assert_eq!(at, 170);
    let b: FlowBucket = read(&v);
    // The packed key: client address as it lies in memory, client port (network order), VIP
    // id + 1; the value: member id (20 bits), the key's 12-bit tag, generation.
    let packed = u64::from_le_bytes([198, 51, 100, 9, 0x9c, 0x41, 4, 0]);
    assert_eq!(b.keys, [packed, flowtab::EMPTY, flowtab::EMPTY]);
    assert_eq!(flowtab::pack_key(&flow4(), 3), packed);
    assert_eq!(
        flowtab::unpack_key(packed),
        ([198, 51, 100, 9], 40001u16.to_be(), 3)
    );
    assert_eq!(b.values, [5 | 0xa41 << 20 | 7 << 32, 0, 0]);
    assert_eq!(flowtab::unpack_value(packed, b.values[0]), Some((5, 7)));
    assert_eq!(b.seen, [0x1234_5678, 0, 0]);
    // Padding in schema 1: read by schema 2 as no confirmed way.
    assert_eq!(b.confirmed, 0);
    assert!(!b.is_confirmed(0));
    // Where the program looks for it: bucket 170 of 1,000 is its first choice.
    assert_eq!(flowtab::buckets_of(packed, BUCKETS), [170, 277]);
    let other = FlowBucket::default();
    let got = flowtab::get([&b, &other], packed, 0x1234_5678 << flowtab::TIME_SHIFT).unwrap();
    assert_eq!((got.member_id, got.generation), (5, 7));
}

#[test]
#[cfg(target_endian = "little")]
fn counters_and_the_layout_record_of_0_1_0_read_field_by_field() {
    let (k, v) = fixture(maps::STATS);
    assert_eq!(u32_of(&k), Counter::Tx as u32);
    assert_eq!(Counter::ALL[u32_of(&k) as usize].name(), "tx");
    assert_eq!(read::<u64>(&v), 123_456_789);

    for map in [maps::VIP_STATS, maps::MEMBER_STATS] {
        let (_, v) = fixture(map);
        let t: TrafficStats = read(&v);
        assert_eq!((t.packets, t.bytes, t.new_flows), (10, 1500, 2), "{map}");
    }

    let (k, v) = fixture(maps::META);
    assert_eq!(u32_of(&k), 0);
    let m: LayoutMeta = read(&v);
    assert_eq!(m.version, schema::LAYOUT_7_VERSION);
    assert_eq!(
        Sizes::from_meta(&m),
        Sizes {
            table_size: 65537,
            max_vips: 64,
            max_backends: 4096,
            flow_table_size: 1 << 20,
            affinity_table_size: 1 << 16,
            nat_table_size: 1 << 18,
        }
    );
    assert_eq!(m._pad, 0);
    // This release writes 0.1.0's record but for the version: 8, as LB_VIPS is at schema 2 (and
    // LB_NODE and LB_NAT_REV)
    // (0.1.0 refuses the pins rather than misread them; `lb migrate --to-release 0.1.0` writes
    // 7 again).
    assert_eq!(
        Sizes::from_meta(&m).meta(),
        LayoutMeta { version: 8, ..m },
        "this release writes 0.1.0's record, at version 8"
    );
}

/// A table of [`BUCKETS`] buckets holding the fixture's bucket where 0.1.0 put it, and 600
/// other flows placed as the program places them (a fifth of the ways: well below the load
/// where both buckets of a flow may be full, which `rehash_flows` refuses rather than evict).
fn fixture_table() -> Vec<FlowBucket> {
    let (k, v) = fixture(maps::FLOWS4);
    let mut table = vec![FlowBucket::default(); BUCKETS as usize];
    table[u32_of(&k) as usize] = read(&v);
    for i in 0..600u32 {
        let mut key = flow4();
        key.src = v4([10, 20, (i >> 8) as u8, i as u8]);
        let packed = flowtab::pack_key(&key, 1 + i % 4);
        let value = flowtab::pack_value(packed, i % 30, 1 + i % 3);
        assert!(convert::place(&mut table, packed, value, i), "flow {i}");
    }
    table
}

#[test]
#[cfg(target_endian = "little")]
fn the_flow_table_grown_then_shrunk_back_holds_the_same_flows_where_the_program_finds_them() {
    let table = fixture_table();
    let flows = convert::flows_of(&table);
    assert_eq!(flows.len(), 601);
    let grown = convert::rehash_flows(&table, 2 * BUCKETS, 6 * BUCKETS).unwrap();
    assert_eq!(
        convert::flows_of(&grown),
        flows,
        "growing lost or changed flows"
    );
    let back = convert::rehash_flows(&grown, BUCKETS, 3 * BUCKETS).unwrap();
    assert_eq!(
        convert::flows_of(&back),
        flows,
        "shrinking back lost or changed flows"
    );
    assert_eq!(
        back,
        convert::rehash_flows(&table, BUCKETS, 3 * BUCKETS).unwrap(),
        "not the table a direct re-placing gives"
    );
    for (k, (v, seen)) in &flows {
        let [a, b] = flowtab::buckets_of(*k, BUCKETS);
        let got = flowtab::get([&back[a as usize], &back[b as usize]], *k, 0)
            .unwrap_or_else(|| panic!("flow {k:#x} not where the program looks"));
        assert_eq!(
            Some((got.member_id, got.generation)),
            flowtab::unpack_value(*k, *v)
        );
        let w = [a, b]
            .iter()
            .find_map(|&i| flowtab::find(&back[i as usize], *k).map(|w| (i, w)))
            .unwrap();
        assert_eq!(back[w.0 as usize].seen[w.1], *seen, "last seen of {k:#x}");
    }
}

#[test]
#[cfg(target_endian = "little")]
fn arrays_grown_then_cut_back_are_the_same_bytes() {
    for s in carried()
        .into_iter()
        .filter(|s| matches!(s.shape, schema::Shape::Array | schema::Shape::PerCpuArray))
        .filter(|s| schema::RELEASES[0].schemas.contains(&(s.map, 1)))
    {
        let (k, v) = fixture(s.map);
        let vs = s.value_size as usize;
        // An array of 8 slots holding the fixture's value at its index (kept below 8).
        let at = u32_of(&k) as usize % 8;
        let mut array = vec![0u8; 8 * vs];
        array[at * vs..(at + 1) * vs].copy_from_slice(&v);
        let grown = convert::resize_array(&array, vs, 20);
        assert_eq!(grown.len(), 20 * vs, "{}", s.map);
        assert_eq!(&grown[..8 * vs], &array[..], "{}", s.map);
        assert!(grown[8 * vs..].iter().all(|b| *b == 0), "{}", s.map);
        assert_eq!(convert::resize_array(&grown, vs, 8), array, "{}", s.map);
    }
}
