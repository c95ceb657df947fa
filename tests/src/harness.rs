//! Loads the lb program, fills its maps directly, and runs frames through it.
//!
//! Maps are written here by hand, not by the agent: these tests pin down what the *program* does
//! with a given map state.

use std::{collections::HashMap as StdHashMap, net::IpAddr};

use aya::{
    Ebpf,
    maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{TestRun, TestRunOptions, Xdp, XdpMode},
};
use lb_common::{
    AffinityKey, AffinityValue, Counter, FlowKey, FlowValue, MEMBER_F_ACCEPTS, MEMBER_F_LIVE,
    Member, NO_BACKEND, NODE_F_SRC_V4, NODE_F_SRC_V6, NatFlow, NatReverse, NodeConfig,
    PassiveHealth, RateBucket, VipAddr, VipKey, VipValue, flowtab, maps,
};
use lb_userspace::kernel::program::{self, Sizes};

use crate::{
    netns::NetNs,
    packet::{Pkt, addr16},
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub fn action_name(a: u32) -> &'static str {
    match a {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "unknown action",
    }
}

/// What one run of the program gave.
#[derive(Debug)]
pub struct Run {
    pub action: u32,
    pub output: Vec<u8>,
    /// Run time of the program as the kernel measured it.
    pub duration: std::time::Duration,
}

/// The loaded program and typed access to its maps.
///
/// Tests name *backends* by small ids of their own ([`Lb::set_backend`]); the program balances
/// over *members*, one per (VIP, backend). [`Lb::set_ring`] creates the member of each backend a
/// VIP's table names (ids handed out in order, generation 1), and [`Lb::member`] says which id
/// it got.
pub struct Lb {
    pub ebpf: Ebpf,
    pub sizes: Sizes,
    /// Backend id -> (address, NAT port, live).
    backends: StdHashMap<u32, (IpAddr, u16, bool)>,
    /// (VIP id, backend id) -> member id.
    members: StdHashMap<(u32, u32), u32>,
    /// Frames run through `lb` by [`Lb::run`]: what the verdict counters must add up to when
    /// nothing else sends the program packets.
    pub runs: u64,
}

impl Lb {
    pub fn load(sizes: Sizes) -> Self {
        crate::require_root();
        let ebpf = program::load(&sizes, None)
            .unwrap_or_else(|e| panic!("loading lb: {}", error_chain(&e)));
        Self::new(ebpf, sizes)
    }

    fn new(ebpf: Ebpf, sizes: Sizes) -> Self {
        Self {
            ebpf,
            sizes,
            backends: StdHashMap::new(),
            members: StdHashMap::new(),
            runs: 0,
        }
    }

    /// Loads another copy of the program on the maps an agent pinned in `pin_dir`: frames run
    /// through it meet exactly the state the agent wrote.
    pub fn adopt(pin_dir: &std::path::Path) -> Self {
        crate::require_root();
        let meta = program::pinned_meta(pin_dir)
            .unwrap_or_else(|e| panic!("reading pins: {}", error_chain(&e)))
            .unwrap_or_else(|| panic!("nothing pinned in {}", pin_dir.display()));
        let sizes = Sizes::from_meta(&meta);
        let ebpf = program::load(&sizes, Some(pin_dir))
            .unwrap_or_else(|e| panic!("loading lb on the pins: {}", error_chain(&e)));
        Self::new(ebpf, sizes)
    }

    /// Like [`Lb::adopt`], on the maps an agent of an *older release* pinned, as they are:
    /// each map of this build uses the pin of that map whatever its schema or size (and a map
    /// the older release does not have is this copy's own, unpinned). Only for the maps whose
    /// layout the two releases share (`LB_VIPS` v1 is v2's layout; a shorter `LB_STATS` leaves
    /// the newer counters uncounted): enough to run the older release's flows through its maps.
    pub fn adopt_older(pin_dir: &std::path::Path) -> Self {
        crate::require_root();
        let meta = program::pinned_meta(pin_dir)
            .unwrap_or_else(|e| panic!("reading pins: {}", error_chain(&e)))
            .unwrap_or_else(|| panic!("nothing pinned in {}", pin_dir.display()));
        let sizes = Sizes::from_meta(&meta);
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let own = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/lbt-own-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&own).expect("a pin dir of this copy's own");
        let names: Vec<String> = std::fs::read_dir(pin_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let flow_buckets = flowtab::buckets_for(sizes.flow_table_size);
        let mut loader = aya::EbpfLoader::new();
        program::configure(&mut loader, &sizes, &flow_buckets);
        let paths: Vec<(&str, std::path::PathBuf)> =
            lb_userspace::kernel::migrate::schema::current()
                .iter()
                .map(|s| {
                    let pinned = names.iter().find(|n| {
                        lb_userspace::kernel::migrate::schema::parse_pin_name(n)
                            .is_some_and(|(m, _)| m == s.map)
                    });
                    match pinned {
                        Some(n) => (s.map, pin_dir.join(n)),
                        None => (s.map, own.join(s.map)),
                    }
                })
                .collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(program::OBJECT)
            .unwrap_or_else(|e| panic!("loading lb on the older pins: {e}"));
        program::verify(&mut ebpf).unwrap_or_else(|e| panic!("verifying lb: {}", error_chain(&e)));
        // The maps live on with `ebpf`; their pins of its own go now.
        let _ = std::fs::remove_dir_all(&own);
        Self::new(ebpf, sizes)
    }

    /// Member `id`'s passive-health threshold in `LB_MEMBER_HOLD` (the agent's half), and the
    /// time the program noted there (its half) cleared.
    pub fn set_member_hold(&mut self, id: u32, failures: u32) {
        let mut a: Array<_, u64> =
            Array::try_from(self.map(maps::MEMBER_HOLD)).expect("LB_MEMBER_HOLD");
        a.set(id, u64::from(failures), 0)
            .expect("writing LB_MEMBER_HOLD");
    }

    /// Member `id`'s open-connection count and weight in `LB_MEMBER_CONNS` (least connections).
    pub fn set_member_conns(&mut self, id: u32, conns: i64, weight: u32) {
        let mut a = self.array::<lb_common::MemberConns>(maps::MEMBER_CONNS);
        let v = lb_common::MemberConns {
            conns,
            weight,
            _pad: 0,
        };
        a.set(id, v, 0).expect("writing LB_MEMBER_CONNS");
    }

    /// Member `id`'s open-connection count in `LB_MEMBER_CONNS`.
    pub fn member_conns(&mut self, id: u32) -> i64 {
        self.member_load(id).conns
    }

    /// Member `id`'s entry in `LB_MEMBER_CONNS` (count and weight).
    pub fn member_load(&mut self, id: u32) -> lb_common::MemberConns {
        self.array::<lb_common::MemberConns>(maps::MEMBER_CONNS)
            .get(&id, 0)
            .expect("reading LB_MEMBER_CONNS")
    }

    /// The VIP `key`'s entry in `LB_VIPS`, if any.
    pub fn vip(&mut self, key: VipKey) -> Option<VipValue> {
        self.hash::<VipKey, VipValue>(maps::VIPS).get(&key, 0).ok()
    }

    /// Entry `id` of the per-CPU traffic counters `map` (`LB_MEMBER_STATS`,
    /// `LB_VIP_REPLY_STATS`...), added up over the CPUs.
    pub fn traffic(&mut self, map: &str, id: u32) -> lb_common::TrafficStats {
        let m: PerCpuArray<_, lb_common::TrafficStats> =
            PerCpuArray::try_from(self.map(map)).unwrap_or_else(|e| panic!("{map}: {e}"));
        let per_cpu = m.get(&id, 0).unwrap_or_else(|e| panic!("{map}[{id}]: {e}"));
        per_cpu.iter().fold(Default::default(), |a, s| a.plus(*s))
    }

    fn map(&mut self, name: &str) -> &mut aya::maps::Map {
        self.ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("no map {name}"))
    }

    fn hash<K: aya::Pod, V: aya::Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(self.map(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn array<V: aya::Pod>(&mut self, name: &str) -> Array<&mut MapData, V> {
        Array::try_from(self.map(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    pub fn set_node(
        &mut self,
        src_v4: Option<&str>,
        src_v6: Option<&str>,
        udp_idle_timeout_ns: u64,
    ) {
        let mut node = NodeConfig {
            udp_idle_timeout_ns,
            nat_port_min: maps::DEFAULT_NAT_PORT_MIN,
            nat_port_max: maps::DEFAULT_NAT_PORT_MAX,
            nat_close_grace_ns: maps::DEFAULT_NAT_CLOSE_GRACE_S * 1_000_000_000,
            syn_timeout_ns: maps::DEFAULT_SYN_TIMEOUT_S * 1_000_000_000,
            half_open_timeout_ms: maps::DEFAULT_NAT_HALF_OPEN_TIMEOUT_MS,
            tcp_idle_timeout_ns: maps::DEFAULT_NAT_TCP_IDLE_TIMEOUT_S * 1_000_000_000,
            ..Default::default()
        };
        if let Some(a) = src_v4 {
            node.src_v4 = a.parse::<std::net::Ipv4Addr>().unwrap().octets();
            node.flags |= NODE_F_SRC_V4;
        }
        if let Some(a) = src_v6 {
            node.src_v6 = a.parse::<std::net::Ipv6Addr>().unwrap().octets();
            node.flags |= NODE_F_SRC_V6;
        }
        self.array::<NodeConfig>(maps::NODE)
            .set(0, node, 0)
            .expect("writing node config");
    }

    /// Changes NAT settings of the node config `set_node` wrote.
    pub fn set_nat(
        &mut self,
        port_min: u16,
        port_max: u16,
        close_grace_ns: u64,
        syn_timeout_ns: u64,
    ) {
        let mut a = self.array::<NodeConfig>(maps::NODE);
        let mut node = a.get(&0, 0).expect("reading node config");
        node.nat_port_min = port_min;
        node.nat_port_max = port_max;
        node.nat_close_grace_ns = close_grace_ns;
        node.syn_timeout_ns = syn_timeout_ns;
        a.set(0, node, 0).expect("writing node config");
    }

    /// Changes the NAT TCP idle timeout of the node config `set_node` wrote.
    pub fn set_tcp_idle_timeout(&mut self, ns: u64) {
        let mut a = self.array::<NodeConfig>(maps::NODE);
        let mut node = a.get(&0, 0).expect("reading node config");
        node.tcp_idle_timeout_ns = ns;
        a.set(0, node, 0).expect("writing node config");
    }

    pub fn set_half_open_timeout(&mut self, ms: u32) {
        let mut a = self.array::<NodeConfig>(maps::NODE);
        let mut node = a.get(&0, 0).expect("reading node config");
        node.half_open_timeout_ms = ms;
        a.set(0, node, 0).expect("writing node config");
    }

    pub fn node(&mut self) -> NodeConfig {
        self.array::<NodeConfig>(maps::NODE)
            .get(&0, 0)
            .expect("reading node config")
    }

    /// A NAT translation by the client's flow.
    pub fn nat_flow(&mut self, key: &FlowKey) -> Option<NatFlow> {
        self.hash::<FlowKey, NatFlow>(maps::NAT).get(key, 0).ok()
    }

    /// A NAT reverse entry by the reply's flow.
    pub fn nat_reverse(&mut self, key: &FlowKey) -> Option<NatReverse> {
        self.hash::<FlowKey, NatReverse>(maps::NAT_REV)
            .get(key, 0)
            .ok()
    }

    /// Removes a NAT translation: its reverse entry and the client flow's pointer to it.
    pub fn remove_nat(&mut self, key: &FlowKey, rkey: &FlowKey) {
        self.hash::<FlowKey, NatReverse>(maps::NAT_REV)
            .remove(rkey)
            .expect("removing a NAT reverse entry");
        self.hash::<FlowKey, NatFlow>(maps::NAT)
            .remove(key)
            .expect("removing a NAT flow");
    }

    /// Passive health counters of a member id.
    pub fn passive(&mut self, id: u32) -> PassiveHealth {
        self.array::<PassiveHealth>(maps::MEMBER_PASSIVE)
            .get(&id, 0)
            .expect("reading passive health")
    }

    /// Adds a VIP (and its address to the VIP-address set).
    pub fn add_vip(&mut self, key: VipKey, value: VipValue) {
        self.hash::<VipKey, VipValue>(maps::VIPS)
            .insert(key, value, 0)
            .expect("writing VIP");
        self.hash::<VipAddr, u32>(maps::VIP_ADDRS)
            .insert(key.vip_addr(), 1, 0)
            .expect("writing VIP address");
        let (word, bit) = lb_common::hash::vip_filter_slot(&key.addr, key.family);
        let mut filter = self.array::<u64>(maps::VIP_FILTER);
        let w = filter.get(&word, 0).expect("reading the VIP filter");
        filter
            .set(word, w | bit, 0)
            .expect("writing the VIP filter");
    }

    /// Adds a port-range VIP: `LB_VIP_RANGES` entries for the blocks of `lo..=hi` (written
    /// here from their definition: each block is the largest aligned one that fits), and its
    /// address in the VIP-address set and filter, as the agent would write them.
    pub fn add_vip_range(&mut self, addr: &str, proto: u8, lo: u16, hi: u16, value: VipValue) {
        let (a, family) = lb_userspace::model::desired::addr16(addr.parse().expect("an address"));
        let key = VipKey {
            addr: a,
            port: 0,
            proto,
            family,
        };
        {
            let mut t: aya::maps::LpmTrie<&mut MapData, lb_common::VipRangeKey, VipValue> =
                aya::maps::LpmTrie::try_from(self.map(maps::VIP_RANGES)).expect("LB_VIP_RANGES");
            let (mut p, end) = (u32::from(lo), u32::from(hi) + 1);
            while p < end {
                let mut size = 1u32 << 16;
                while p % size != 0 || p + size > end {
                    size >>= 1;
                }
                let k = lb_common::VipRangeKey {
                    family,
                    proto,
                    addr: a,
                    port: (p as u16).to_be_bytes(),
                };
                let bits = 16 - size.trailing_zeros();
                t.insert(&aya::maps::lpm_trie::Key::new(144 + bits, k), value, 0)
                    .expect("writing a port range");
                p += size;
            }
        }
        self.hash::<VipAddr, u32>(maps::VIP_ADDRS)
            .insert(key.vip_addr(), 1, 0)
            .expect("writing VIP address");
        let (word, bit) = lb_common::hash::vip_filter_slot(&key.addr, key.family);
        let mut filter = self.array::<u64>(maps::VIP_FILTER);
        let w = filter.get(&word, 0).expect("reading the VIP filter");
        filter
            .set(word, w | bit, 0)
            .expect("writing the VIP filter");
    }

    /// Lets VIP `vip_id` take packets from `ranges` (CIDRs): `LB_SRC_RANGES` entries. The
    /// program looks only if the VIP has `VIP_F_SOURCE_RANGES`.
    pub fn add_source_ranges(&mut self, vip_id: u32, ranges: &[&str]) {
        let mut t: aya::maps::LpmTrie<&mut MapData, lb_common::SrcRangeKey, u32> =
            aya::maps::LpmTrie::try_from(self.map(maps::SRC_RANGES)).expect("LB_SRC_RANGES");
        for r in ranges {
            let (a, bits) = r.split_once('/').expect("a CIDR");
            let bits: u32 = bits.parse().unwrap();
            let key = aya::maps::lpm_trie::Key::new(
                32 + bits,
                lb_common::SrcRangeKey::new(vip_id, addr16(a.parse().unwrap())),
            );
            t.insert(&key, 1, 0).expect("writing a source range");
        }
    }

    /// Packets of VIP `vip_id` dropped for their source (`LB_VIP_DROPS`), over all CPUs.
    pub fn vip_source_drops(&mut self, vip_id: u32) -> u64 {
        let a: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map(maps::VIP_DROPS)).expect("LB_VIP_DROPS");
        a.get(&vip_id, 0)
            .expect("reading LB_VIP_DROPS")
            .iter()
            .sum()
    }

    /// Writes `entry` into every CPU's new-flow budget bucket of VIP `vip_id`
    /// (`LB_NEW_FLOW_BUDGET`). The program looks only if the VIP has `VIP_F_NEW_FLOW_BUDGET`.
    pub fn set_budget(&mut self, vip_id: u32, entry: lb_common::NewFlowBudget) {
        let cpus = aya::util::nr_cpus().expect("number of CPUs");
        let v = PerCpuValues::try_from(vec![entry; cpus]).unwrap();
        let mut m: PerCpuArray<_, lb_common::NewFlowBudget> =
            PerCpuArray::try_from(self.map(maps::NEW_FLOW_BUDGET)).expect("LB_NEW_FLOW_BUDGET");
        m.set(vip_id, v, 0).expect("writing LB_NEW_FLOW_BUDGET");
    }

    /// Every CPU's new-flow budget bucket of VIP `vip_id`.
    pub fn budget(&mut self, vip_id: u32) -> Vec<lb_common::NewFlowBudget> {
        let m: PerCpuArray<_, lb_common::NewFlowBudget> =
            PerCpuArray::try_from(self.map(maps::NEW_FLOW_BUDGET)).expect("LB_NEW_FLOW_BUDGET");
        m.get(&vip_id, 0)
            .expect("reading LB_NEW_FLOW_BUDGET")
            .iter()
            .copied()
            .collect()
    }

    /// Packets of VIP `vip_id` dropped over its new-flow budget (`LB_VIP_BUDGET_DROPS`), over
    /// all CPUs.
    pub fn vip_budget_drops(&mut self, vip_id: u32) -> u64 {
        let a: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map(maps::VIP_BUDGET_DROPS)).expect("LB_VIP_BUDGET_DROPS");
        a.get(&vip_id, 0)
            .expect("reading LB_VIP_BUDGET_DROPS")
            .iter()
            .sum()
    }

    pub fn set_backend(&mut self, id: u32, addr: &str, live: bool) {
        self.set_backend_port(id, addr, 0, live);
    }

    /// A backend with a NAT-mode port (0: the VIP's). Members already made for it follow: a
    /// backend that is not live is a member that is not live in every VIP.
    pub fn set_backend_port(&mut self, id: u32, addr: &str, port: u16, live: bool) {
        self.backends
            .insert(id, (addr.parse().unwrap(), port, live));
        let mine: Vec<(u32, u32)> = self
            .members
            .iter()
            .filter(|((_, b), _)| *b == id)
            .map(|((v, _), m)| (*v, *m))
            .collect();
        for (vip_id, member) in mine {
            let flags = if live {
                MEMBER_F_LIVE | MEMBER_F_ACCEPTS
            } else {
                0
            };
            self.write_member(member, vip_id, id, flags, 1);
        }
    }

    /// The member id of backend `backend` in VIP `vip_id` (made by [`Lb::set_ring`]).
    pub fn member(&self, vip_id: u32, backend: u32) -> u32 {
        *self
            .members
            .get(&(vip_id, backend))
            .unwrap_or_else(|| panic!("backend {backend} is no member of VIP {vip_id}"))
    }

    /// The backend a member id stands for.
    pub fn backend_of(&self, member: u32) -> u32 {
        self.members
            .iter()
            .find(|(_, m)| **m == member)
            .map(|((_, b), _)| *b)
            .unwrap_or_else(|| panic!("no member {member}"))
    }

    /// Writes member `id` of VIP `vip_id` for backend `backend` (see [`Lb::set_backend`]).
    pub fn write_member(&mut self, id: u32, vip_id: u32, backend: u32, flags: u8, generation: u32) {
        let (a, port, _) = self.backends[&backend];
        let m = Member {
            addr: addr16(a),
            port: port.to_be(),
            family: if a.is_ipv4() {
                lb_common::FAMILY_V4
            } else {
                lb_common::FAMILY_V6
            },
            flags,
            vip_id,
            generation,
        };
        self.array::<Member>(maps::MEMBERS)
            .set(id, m, 0)
            .expect("writing member");
    }

    /// The member of `backend` in VIP `vip_id`, made (live, taking new flows) if it was not.
    fn ensure_member(&mut self, vip_id: u32, backend: u32) -> u32 {
        if let Some(m) = self.members.get(&(vip_id, backend)) {
            return *m;
        }
        let id = self.members.len() as u32;
        self.members.insert((vip_id, backend), id);
        let live = self.backends.get(&backend).map(|b| b.2);
        let live = live.unwrap_or_else(|| panic!("set_backend({backend}) first"));
        let flags = if live {
            MEMBER_F_LIVE | MEMBER_F_ACCEPTS
        } else {
            0
        };
        self.write_member(id, vip_id, backend, flags, 1);
        id
    }

    /// The VIP-address filter's words with a bit set, by index.
    pub fn vip_filter(&mut self) -> std::collections::BTreeMap<u32, u64> {
        let filter = self.array::<u64>(maps::VIP_FILTER);
        (0..filter.len())
            .map(|i| (i, filter.get(&i, 0).expect("reading the VIP filter")))
            .filter(|(_, w)| *w != 0)
            .collect()
    }

    /// Writes member `id`'s next hop (see [`lb_common::NextHop`]).
    pub fn set_nexthop(&mut self, id: u32, nh: lb_common::NextHop) {
        self.array::<lb_common::NextHop>(maps::NEXTHOPS)
            .set(id, nh, 0)
            .expect("writing next hop");
    }

    /// Member `id`'s next hop as the map holds it.
    pub fn nexthop(&mut self, id: u32) -> lb_common::NextHop {
        self.array::<lb_common::NextHop>(maps::NEXTHOPS)
            .get(&id, 0)
            .expect("reading next hop")
    }

    /// Every live member in `LB_MEMBERS` (whoever wrote it: these tests or an agent).
    pub fn live_members(&mut self) -> std::collections::BTreeMap<u32, Member> {
        self.array::<Member>(maps::MEMBERS)
            .iter()
            .enumerate()
            .filter_map(|(id, m)| Some((id as u32, m.ok()?)))
            .filter(|(_, m)| m.is_live())
            .collect()
    }

    /// Fills `LB_NEXTHOPS` for every live member with what the agent's resolver works out from
    /// the routes and neighbours of the calling thread's namespace (run it inside the test's
    /// namespace: `ns.run(|| lb.resolve_nexthops())`), so frames take the next-hop path.
    /// Returns the entries written; panics if the resolver cannot run.
    pub fn resolve_nexthops(&mut self) -> std::collections::BTreeMap<u32, lb_common::NextHop> {
        use lb_userspace::kernel::nexthop;
        let members = self.live_members();
        let node = self.node();
        let r = nexthop::resolve_blocking(&nexthop::targets(&members), nexthop::sources(&node))
            .unwrap_or_else(|e| panic!("resolving next hops: {}", error_chain(&e)));
        for (id, nh) in &r.entries {
            self.set_nexthop(*id, *nh);
        }
        r.entries
    }

    /// Fills VIP `vip_id`'s table: slot `s` gets (the member of) backend `f(s)`, or none.
    pub fn set_ring(&mut self, vip_id: u32, f: impl Fn(u32) -> u32) {
        let m = self.sizes.table_size;
        let slots: Vec<u32> = (0..m)
            .map(|s| match f(s) {
                NO_BACKEND => NO_BACKEND,
                b => self.ensure_member(vip_id, b),
            })
            .collect();
        let mut ring = self.array::<u32>(maps::RING);
        for (s, id) in slots.into_iter().enumerate() {
            ring.set(vip_id * m + s as u32, id, 0)
                .expect("writing ring slot");
        }
    }

    pub fn clear_ring(&mut self, vip_id: u32) {
        self.set_ring(vip_id, |_| NO_BACKEND);
    }

    /// The slot a flow hashes to, and the member there.
    pub fn ring_backend(&mut self, vip_id: u32, hash: u32) -> u32 {
        let m = self.sizes.table_size;
        let slot = lb_common::maglev_slot(hash, m);
        self.array::<u32>(maps::RING)
            .get(&(vip_id * m + slot), 0)
            .expect("reading ring")
    }

    pub fn add_tx_port(&mut self, ifindex: u32) {
        let mut m: DevMapHash<_> = DevMapHash::try_from(self.map(maps::TX_PORTS)).unwrap();
        m.insert(ifindex, ifindex, None, 0).expect("writing devmap");
    }

    /// The flow entry of `key` (whichever table its family's flows live in). IPv4 entries
    /// are found by their VIP's id, so the VIP must exist.
    pub fn flow(&mut self, key: &FlowKey) -> Option<FlowValue> {
        if !flowtab::in_table(key.family) {
            return self
                .hash::<FlowKey, FlowValue>(maps::FLOWS)
                .get(key, 0)
                .ok();
        }
        let (at, k) = self.flow4_slots(key);
        let table = self.array::<flowtab::FlowBucket>(maps::FLOWS4);
        let b = at.map(|i| table.get(&i, 0).expect("reading a flow bucket"));
        flowtab::get(
            [&b[0], &b[1]],
            k,
            lb_userspace::kernel::inspect::monotonic_coarse_ns(),
        )
    }

    /// Runs `f` on the IPv4 flow table mapped into this process (it is mmapable).
    fn with_flows4<R>(&mut self, f: impl FnOnce(&mut [flowtab::FlowBucket]) -> R) -> R {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let buckets = flowtab::buckets_for(self.sizes.flow_table_size) as usize;
        let aya::maps::Map::Array(data) = self.map(maps::FLOWS4) else {
            panic!("LB_FLOWS4 is not an array");
        };
        let fd = data.fd().as_fd().as_raw_fd();
        let bytes = (buckets * std::mem::size_of::<flowtab::FlowBucket>()).div_ceil(4096) * 4096;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a BPF_F_MMAPABLE array of `buckets` 64-byte values, shared with the kernel;
        // unmapped below, and no reference outlives `f`.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), bytes, prot, libc::MAP_SHARED, fd, 0) };
        assert!(
            p != libc::MAP_FAILED,
            "mapping the IPv4 flow table: {}",
            std::io::Error::last_os_error()
        );
        let table =
            unsafe { std::slice::from_raw_parts_mut(p.cast::<flowtab::FlowBucket>(), buckets) };
        let r = f(table);
        unsafe { libc::munmap(p, bytes) };
        r
    }

    /// Flows in the flow tables: IPv4 ways in use, IPv6 entries.
    pub fn flow_count(&mut self) -> usize {
        let v4 = self.with_flows4(|t| {
            t.iter()
                .flat_map(|b| b.keys)
                .filter(|k| *k != flowtab::EMPTY && *k != flowtab::LOCKED)
                .count()
        });
        v4 + self.hash::<FlowKey, FlowValue>(maps::FLOWS).keys().count()
    }

    /// Empties both flow tables.
    pub fn clear_flows(&mut self) {
        self.with_flows4(|t| t.fill(flowtab::FlowBucket::default()));
        let v6: Vec<FlowKey> = self
            .hash::<FlowKey, FlowValue>(maps::FLOWS)
            .keys()
            .map(|k| k.expect("walking the flow table"))
            .collect();
        let mut h = self.hash::<FlowKey, FlowValue>(maps::FLOWS);
        for k in v6 {
            h.remove(&k).expect("removing flow");
        }
    }

    pub fn set_flow(&mut self, key: FlowKey, value: FlowValue) {
        if !flowtab::in_table(key.family) {
            self.hash::<FlowKey, FlowValue>(maps::FLOWS)
                .insert(key, value, 0)
                .expect("writing flow");
            return;
        }
        let (at, k) = self.flow4_slots(&key);
        let mut table = self.array::<flowtab::FlowBucket>(maps::FLOWS4);
        let mut b = at.map(|i| table.get(&i, 0).expect("reading a flow bucket"));
        let seen = (value.last_seen_ns >> flowtab::TIME_SHIFT) as u32;
        let i = flowtab::put(&mut b, k, value.member_id, value.generation, seen)
            .expect("the bucket is being written");
        table.set(at[i], b[i], 0).expect("writing a flow bucket");
    }

    /// The two buckets and the packed key of IPv4 flow `key`.
    fn flow4_slots(&mut self, key: &FlowKey) -> ([u32; 2], u64) {
        let vip = key.vip_key();
        let vip_id = self
            .hash::<VipKey, VipValue>(maps::VIPS)
            .get(&vip, 0)
            .expect("the flow's VIP")
            .id;
        let k = flowtab::pack_key(key, vip_id);
        (
            flowtab::buckets_of(k, flowtab::buckets_for(self.sizes.flow_table_size)),
            k,
        )
    }

    pub fn affinity(&mut self, key: &AffinityKey) -> Option<AffinityValue> {
        self.hash::<AffinityKey, AffinityValue>(maps::AFFINITY)
            .get(key, 0)
            .ok()
    }

    pub fn set_affinity(&mut self, key: AffinityKey, value: AffinityValue) {
        self.hash::<AffinityKey, AffinityValue>(maps::AFFINITY)
            .insert(key, value, 0)
            .expect("writing affinity");
    }

    /// The NAT reply routes every CPU remembers (`LB_REPLY_ROUTES`), empty slots left out.
    pub fn reply_routes(&mut self) -> Vec<lb_common::ReplyRoute> {
        let m: PerCpuArray<_, lb_common::ReplyRoute> =
            PerCpuArray::try_from(self.map(maps::REPLY_ROUTES)).unwrap();
        let mut out = Vec::new();
        for slot in 0..maps::REPLY_ROUTE_SLOTS {
            let per_cpu = m.get(&slot, 0).expect("reading LB_REPLY_ROUTES");
            out.extend(per_cpu.iter().filter(|e| e.stamp_ns != 0).copied());
        }
        out
    }

    /// Fills every CPU's ICMP too big bucket (all zeroes: see [`lb_common::RateBucket`]).
    pub fn refill_icmp_buckets(&mut self) {
        let cpus = aya::util::nr_cpus().expect("number of CPUs");
        let full = PerCpuValues::try_from(vec![RateBucket::default(); cpus]).unwrap();
        let mut m: PerCpuArray<_, RateBucket> =
            PerCpuArray::try_from(self.map(maps::ICMP_BUCKET)).unwrap();
        m.set(0, full, 0).expect("writing the ICMP buckets");
    }

    /// Global counters summed over CPUs (with the derived ones filled in, as `lb stats` does).
    pub fn counters(&mut self) -> StdHashMap<Counter, u64> {
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map(maps::STATS)).unwrap();
        let mut counts: Vec<u64> = Counter::ALL
            .iter()
            .map(|&c| {
                stats
                    .get(&(c as u32), 0)
                    .expect("reading stats")
                    .iter()
                    .sum()
            })
            .collect();
        let max_vips = self.sizes.max_vips;
        let vips: PerCpuArray<_, lb_common::TrafficStats> =
            PerCpuArray::try_from(self.map(maps::VIP_STATS)).unwrap();
        let vip_packets = (0..max_vips)
            .map(|id| {
                vips.get(&id, 0)
                    .expect("reading VIP stats")
                    .iter()
                    .map(|s| s.packets)
                    .sum::<u64>()
            })
            .sum();
        lb_common::stats::derive(&mut counts, vip_packets);
        Counter::ALL.iter().copied().zip(counts).collect()
    }

    /// Each of `which` counters by CPU, with `packets` derived per CPU as readers derive it
    /// ([`lb_common::stats::derive`]; `vip_packets` is not filled in).
    pub fn per_cpu_counters(&mut self, which: &[Counter]) -> Vec<Vec<u64>> {
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map(maps::STATS)).unwrap();
        let raw: Vec<Vec<u64>> = Counter::ALL
            .iter()
            .map(|&c| stats.get(&(c as u32), 0).expect("reading stats").to_vec())
            .collect();
        let by_cpu: Vec<Vec<u64>> = (0..raw[0].len())
            .map(|cpu| {
                let mut counts: Vec<u64> = raw.iter().map(|c| c[cpu]).collect();
                lb_common::stats::derive(&mut counts, 0);
                counts
            })
            .collect();
        which
            .iter()
            .map(|&c| by_cpu.iter().map(|counts| counts[c as usize]).collect())
            .collect()
    }

    /// Runs `frame` through the program once, as if received on `ingress_ifindex` (0: loopback
    /// of the calling thread's namespace).
    pub fn run(&mut self, frame: &[u8], ingress_ifindex: u32) -> Run {
        self.runs += 1;
        self.run_program(program::PROGRAM, frame, ingress_ifindex)
    }

    /// The object's XDP program `name`, loaded (verified) if it was not yet.
    pub fn xdp(&mut self, name: &str) -> &mut Xdp {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("no program {name}"))
            .try_into()
            .unwrap();
        if prog.fd().is_err() {
            prog.load()
                .unwrap_or_else(|e| panic!("loading {name}: {}", error_chain(&e)));
        }
        prog
    }

    /// Sets the template `lb_gen` restores into every frame it transmits.
    pub fn set_gen_frame(&mut self, frame: &[u8]) {
        let mut tpl = [0u8; maps::GEN_FRAME_LEN];
        assert_eq!(
            frame.len(),
            tpl.len(),
            "the generator's frames are {} bytes",
            tpl.len()
        );
        tpl.copy_from_slice(frame);
        let mut a: Array<_, [u8; maps::GEN_FRAME_LEN]> =
            Array::try_from(self.map(maps::GEN_FRAME)).unwrap();
        a.set(0, tpl, 0).expect("writing the generator template");
    }

    /// Runs `program` on `frame` `repeat` times in the kernel's live-frames mode
    /// (`BPF_F_TEST_XDP_LIVE_FRAMES`): `XDP_TX` and `XDP_REDIRECT` frames really leave through
    /// `ingress_ifindex`. Returns the kernel's time per frame.
    pub fn run_live(
        &mut self,
        program: &str,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> std::time::Duration {
        test_run_live(self.xdp(program), frame, ingress_ifindex, repeat)
    }

    /// Runs `frame` through another program of the object (`lb_decap`, `lb_pass`), loading it
    /// first if needed.
    pub fn run_program(&mut self, name: &str, frame: &[u8], ingress_ifindex: u32) -> Run {
        test_run(self.xdp(name), frame, ingress_ifindex)
    }
}

/// Runs `frame` through a loaded program once, on the calling thread's CPU (so threads pinned
/// to different CPUs run it concurrently, as two receive queues would).
pub fn test_run(prog: &Xdp, frame: &[u8], ingress_ifindex: u32) -> Run {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    if ingress_ifindex != 0 {
        opts.ctx_in = Some(&ctx);
    }
    let r = prog
        .test_run(opts)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {}", error_chain(&e)));
    out.truncate(r.data_size_out as usize);
    Run {
        action: r.return_value,
        output: out,
        duration: r.duration,
    }
}

/// [`Lb::run_live`] on a loaded program, on the calling thread's CPU (threads pinned to
/// different CPUs generate concurrently).
pub fn test_run_live(
    prog: &Xdp,
    frame: &[u8],
    ingress_ifindex: u32,
    repeat: u32,
) -> std::time::Duration {
    try_test_run_live(prog, frame, ingress_ifindex, repeat)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN (live frames): {}", error_chain(&e)))
}

/// [`test_run_live`], or the kernel's refusal.
pub fn try_test_run_live(
    prog: &Xdp,
    frame: &[u8],
    ingress_ifindex: u32,
    repeat: u32,
) -> Result<std::time::Duration, aya::programs::ProgramError> {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(&ctx);
    opts.repeat = repeat;
    opts.attrs = aya::programs::TestRunAttrs::new().xdp_live_frames(64);
    prog.test_run(opts).map(|r| r.duration)
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let r = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            r,
            0,
            "pinning to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

pub use lb_userspace::error_chain;

/// MACs and addresses of [`FibNet`].
pub mod net {
    /// The load balancer's uplink (where VIP traffic arrives).
    pub const LB0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
    pub const LB1_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 0x01];
    pub const LB2_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 0x01];
    /// Next hop for backends reached back out of the uplink.
    pub const GW0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
    /// Next hop for backends behind lb1.
    pub const GW1_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 0xfe];
    pub const NODE_V4: &str = "10.0.0.1";
    pub const NODE_V6: &str = "fd00::1";

    /// Backends by how the route lookup treats them.
    pub const TX_V4: &str = "10.1.0.1";
    pub const TX_V4_B: &str = "10.1.0.2";
    pub const TX_V6: &str = "fd01::1";
    pub const TX_V6_B: &str = "fd01::2";
    pub const REDIRECT_V4: &str = "10.2.0.1";
    pub const REDIRECT_V6: &str = "fd02::1";
    pub const NO_NEIGH_V4: &str = "10.3.0.1";
    pub const NO_NEIGH_V6: &str = "fd03::1";
    pub const UNREACHABLE_V4: &str = "10.4.0.1";
    pub const UNREACHABLE_V6: &str = "fd04::1";
    pub const LOCAL_V4: &str = "10.5.0.1";
    /// Behind lb1 on a route with MTU 600 (v4) / 1280 (v6).
    pub const SMALL_MTU_V4: &str = "10.6.0.1";
    pub const SMALL_MTU_V6: &str = "fd06::1";
    /// Behind lb2, which is not in the devmap.
    pub const NO_TX_PORT_V4: &str = "10.7.0.1";
}

/// A namespace laid out so that each way the route lookup can end has a backend address:
///
/// ```text
///  lb0 (uplink, ingress)  10.0.0.1/24 fd00::1/64   gw 10.0.0.2 / fd00::2 (neighbour known)
///  lb1 (in the devmap)    10.0.1.1/24 fd00:1::1/64 gw 10.0.1.2 / fd00:1::2
///  lb2 (not in devmap)    10.0.2.1/24 fd00:2::1/64 gw 10.0.2.2 / fd00:2::2
///  10.1/16  fd01::/64  via lb0's gw      -> XDP_TX
///  10.2/16  fd02::/64  via lb1's gw      -> XDP_REDIRECT
///  10.3/16  fd03::/64  via 10.0.0.3 / fd00::3, no neighbour entry -> pass
///  10.4/16  fd04::/64  unreachable       -> drop
///  10.5.0.1 on lo                        -> local, pass
///  10.6/16  fd06::/64  via lb1's gw, mtu 600 / 1280
///  10.7/16             via lb2's gw      -> no devmap entry, pass
/// ```
///
/// The peers (up0, dn1, dn2) run `lb_pass` in native mode, as a real next hop's NIC takes what
/// is sent to it: a veth delivers XDP frames only to a peer with an XDP program, and an agent
/// attaches in native mode only where they are delivered (see `lb_userspace::kernel::xdpmode`).
pub struct FibNet {
    pub ns: NetNs,
    pub lb0: u32,
    pub lb1: u32,
    pub lb2: u32,
    /// The object whose `lb_pass` runs on the peers (None: [`FibNet::with_uplink_queues`]).
    _peers: Option<Lb>,
}

impl FibNet {
    pub fn new(tag: &str) -> Self {
        let mut net = Self::with_uplink_queues(tag, 1);
        let mut pass = Lb::load(Sizes {
            table_size: 13,
            max_vips: 1,
            max_backends: 1,
            flow_table_size: 1,
            affinity_table_size: 1,
            nat_table_size: 1,
        });
        net.ns.run(|| {
            for peer in ["up0", "dn1", "dn2"] {
                pass.xdp("lb_pass")
                    .attach(peer, XdpMode::Driver)
                    .unwrap_or_else(|e| panic!("attaching lb_pass to {peer}: {}", error_chain(&e)));
            }
        });
        net._peers = Some(pass);
        net
    }

    /// The same namespace with `queues` receive and transmit queues on each end of the uplink
    /// veth (lb0, up0): a veth transmits an XDP frame into the peer queue of the sending CPU, so
    /// each CPU forwards on its own queue. Nothing runs on the peers (the forwarding bench
    /// attaches its own programs there).
    pub fn with_uplink_queues(tag: &str, queues: u32) -> Self {
        let ns = NetNs::new(tag);
        let q = format!("numrxqueues {queues} numtxqueues {queues}");
        ns.script(&format!(
            "link add lb0 address 02:00:00:00:00:01 {q} type veth peer name up0 address 02:00:00:00:00:02 {q}"
        ));
        ns.script(
            "
             link add lb1 address 02:00:00:00:01:01 type veth peer name dn1 address 02:00:00:00:01:02
             link add lb2 address 02:00:00:00:02:01 type veth peer name dn2 address 02:00:00:00:02:02
             link set lb0 up
             link set up0 up
             link set lb1 up
             link set dn1 up
             link set lb2 up
             link set dn2 up
             addr add 10.0.0.1/24 dev lb0
             addr add fd00::1/64 dev lb0 nodad
             addr add 10.0.1.1/24 dev lb1
             addr add fd00:1::1/64 dev lb1 nodad
             addr add 10.0.2.1/24 dev lb2
             addr add fd00:2::1/64 dev lb2 nodad
             addr add 10.5.0.1/32 dev lo
             neigh replace 10.0.0.2 lladdr 02:00:00:00:00:fe dev lb0 nud permanent
             neigh replace fd00::2 lladdr 02:00:00:00:00:fe dev lb0 nud permanent
             neigh replace 10.0.1.2 lladdr 02:00:00:00:01:fe dev lb1 nud permanent
             neigh replace fd00:1::2 lladdr 02:00:00:00:01:fe dev lb1 nud permanent
             neigh replace 10.0.2.2 lladdr 02:00:00:00:02:fe dev lb2 nud permanent
             neigh replace fd00:2::2 lladdr 02:00:00:00:02:fe dev lb2 nud permanent
             route add 10.1.0.0/16 via 10.0.0.2 dev lb0
             route add fd01::/64 via fd00::2 dev lb0
             route add 10.2.0.0/16 via 10.0.1.2 dev lb1
             route add fd02::/64 via fd00:1::2 dev lb1
             route add 10.3.0.0/16 via 10.0.0.3 dev lb0
             route add fd03::/64 via fd00::3 dev lb0
             route add unreachable 10.4.0.0/16
             route add unreachable fd04::/64
             route add 10.6.0.0/16 via 10.0.1.2 dev lb1 mtu lock 600
             route add fd06::/64 via fd00:1::2 dev lb1 mtu lock 1280
             route add 10.7.0.0/16 via 10.0.2.2 dev lb2
             route add 198.51.100.0/24 via 10.0.0.2 dev lb0
             route add 2001:db8:c::/64 via fd00::2 dev lb0",
        );
        ns.sysctl("net.ipv4.ip_forward", "1");
        ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        let (lb0, lb1, lb2) = (ns.ifindex("lb0"), ns.ifindex("lb1"), ns.ifindex("lb2"));
        Self {
            ns,
            lb0,
            lb1,
            lb2,
            _peers: None,
        }
    }
}

/// Kernel memory of each map of a loaded object, by name: the kernel's own accounting (the
/// `memlock` line of `/proc/self/fdinfo/<map fd>`).
pub fn map_memory(ebpf: &Ebpf) -> std::collections::BTreeMap<String, u64> {
    use std::os::fd::{AsFd, AsRawFd};
    let mut out = std::collections::BTreeMap::new();
    for (name, map) in ebpf.maps() {
        let fd = match map {
            aya::maps::Map::Array(d)
            | aya::maps::Map::HashMap(d)
            | aya::maps::Map::LruHashMap(d)
            | aya::maps::Map::PerCpuArray(d)
            | aya::maps::Map::PerCpuHashMap(d)
            | aya::maps::Map::PerCpuLruHashMap(d)
            | aya::maps::Map::LpmTrie(d)
            | aya::maps::Map::ProgramArray(d)
            | aya::maps::Map::DevMapHash(d)
            | aya::maps::Map::RingBuf(d) => d.fd().as_fd().as_raw_fd(),
            _ => continue,
        };
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
        if let Some(b) = info
            .lines()
            .find(|l| l.starts_with("memlock:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        {
            out.insert(name.to_string(), b);
        }
    }
    out
}

/// Builds a [`VipKey`].
pub fn vip_key(addr: &str, port: u16, proto: u8) -> VipKey {
    let a: IpAddr = addr.parse().unwrap();
    VipKey {
        addr: addr16(a),
        port: port.to_be(),
        proto,
        family: if a.is_ipv4() {
            lb_common::FAMILY_V4
        } else {
            lb_common::FAMILY_V6
        },
    }
}

/// Affinity key of a packet's client on `vip_id`.
pub fn affinity_key(pkt: &Pkt, vip_id: u32) -> AffinityKey {
    AffinityKey {
        addr: addr16(pkt.src),
        vip_id,
    }
}

/// Sum of the verdict counters, which must equal `packets`.
pub fn verdict_sum(c: &StdHashMap<Counter, u64>) -> u64 {
    Counter::ALL
        .iter()
        .filter(|c| c.is_verdict())
        .map(|k| c[k])
        .sum()
}
