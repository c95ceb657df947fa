//! Read-only views of a running agent's pinned maps, for `lb stats`, `lb backends`, `lb flows`,
//! `lb explain` and the Prometheus metrics. Another process may be writing them meanwhile:
//! every read is a snapshot of one entry.

use std::{collections::BTreeMap, path::Path};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use lb_common::{
    AffinityKey, AffinityValue, Counter, FAMILY_V4, FlowKey, FlowValue, IPPROTO_TCP, MODE_NAT,
    Member, NAT_S_ANSWERED, NAT_S_FIN_BACKEND, NAT_S_FIN_CLIENT, NatFlow, NatReverse, NodeConfig,
    PassiveHealth, SrcRangeKey, TrafficStats, VipKey, VipRangeKey, VipValue,
    flowtab::{self, FlowBucket},
    maps,
};

use crate::{
    kernel::flowmap::FlowMap,
    kernel::program::{LoadError, Sizes, open_pinned, pinned_meta},
    kernel::ring::Ring,
};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("no lb maps are pinned in {0} (is `lb run` running, with the same --pin-dir?)")]
    NotRunning(String),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("reading {what}")]
    Map {
        what: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("mapping the ring")]
    Ring(#[source] std::io::Error),
    #[error("mapping the IPv4 flow table")]
    FlowMap(#[source] std::io::Error),
}

fn merr(what: &'static str) -> impl Fn(aya::maps::MapError) -> InspectError {
    move |source| InspectError::Map { what, source }
}

/// The pinned maps of one agent.
pub struct Pinned {
    pub sizes: Sizes,
    stats: PerCpuArray<MapData, u64>,
    vip_stats: PerCpuArray<MapData, TrafficStats>,
    member_stats: PerCpuArray<MapData, TrafficStats>,
    vips: HashMap<MapData, VipKey, VipValue>,
    members: Array<MapData, Member>,
    node: Array<MapData, NodeConfig>,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    flows4: Array<MapData, FlowBucket>,
    /// The same table mapped into this process, to read it whole.
    flows4_map: FlowMap,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    nat: HashMap<MapData, FlowKey, NatFlow>,
    nat_rev: HashMap<MapData, FlowKey, NatReverse>,
    passive: Array<MapData, PassiveHealth>,
    ring: Ring,
    /// None on pins of a release before 0.3.0 (no source ranges).
    src_ranges: Option<LpmTrie<MapData, SrcRangeKey, u32>>,
    vip_drops: Option<PerCpuArray<MapData, u64>>,
    /// None on pins of a release before 0.3.0 (no new-flow budgets).
    budgets: Option<PerCpuArray<MapData, lb_common::NewFlowBudget>>,
    budget_drops: Option<PerCpuArray<MapData, u64>>,
    /// None on pins of a release before 0.3.0 (no reply counters).
    vip_replies: Option<PerCpuArray<MapData, TrafficStats>>,
    member_replies: Option<PerCpuArray<MapData, TrafficStats>>,
    /// None on pins of a release before 0.3.0 (no port ranges).
    vip_ranges: Option<LpmTrie<MapData, VipRangeKey, VipValue>>,
    /// None on pins of a release before 0.3.0 (no least connections).
    member_conns: Option<Array<MapData, lb_common::MemberConns>>,
}

impl Pinned {
    pub fn open(dir: &Path) -> Result<Self, InspectError> {
        let meta =
            pinned_meta(dir)?.ok_or_else(|| InspectError::NotRunning(dir.display().to_string()))?;
        let sizes = Sizes::from_meta(&meta);
        let open = |name| open_pinned(dir, name);
        let ring_map = open(maps::RING)?;
        let Map::Array(ring_data) = &ring_map else {
            return Err(InspectError::Ring(std::io::Error::other(
                "LB_RING is not an array",
            )));
        };
        let ring = Ring::map(
            ring_data,
            (sizes.max_vips * sizes.table_size) as usize,
            false,
        )
        .map_err(InspectError::Ring)?;
        let flows4 = open(maps::FLOWS4)?;
        let Map::Array(flows4_data) = &flows4 else {
            return Err(InspectError::FlowMap(std::io::Error::other(
                "LB_FLOWS4 is not an array",
            )));
        };
        let buckets = flowtab::buckets_for(sizes.flow_table_size) as usize;
        let flows4_map = FlowMap::map(flows4_data, buckets).map_err(InspectError::FlowMap)?;
        Ok(Self {
            stats: PerCpuArray::try_from(open(maps::STATS)?).map_err(merr("stats"))?,
            vip_stats: PerCpuArray::try_from(open(maps::VIP_STATS)?).map_err(merr("VIP stats"))?,
            member_stats: PerCpuArray::try_from(open(maps::MEMBER_STATS)?)
                .map_err(merr("member stats"))?,
            vips: HashMap::try_from(open(maps::VIPS)?).map_err(merr("VIPs"))?,
            members: Array::try_from(open(maps::MEMBERS)?).map_err(merr("members"))?,
            node: Array::try_from(open(maps::NODE)?).map_err(merr("node settings"))?,
            flows: HashMap::try_from(open(maps::FLOWS)?).map_err(merr("flows"))?,
            flows4: Array::try_from(flows4).map_err(merr("IPv4 flows"))?,
            flows4_map,
            affinity: HashMap::try_from(open(maps::AFFINITY)?).map_err(merr("affinity"))?,
            nat: HashMap::try_from(open(maps::NAT)?).map_err(merr("NAT translations"))?,
            nat_rev: HashMap::try_from(open(maps::NAT_REV)?)
                .map_err(merr("NAT reverse entries"))?,
            passive: Array::try_from(open(maps::MEMBER_PASSIVE)?)
                .map_err(merr("passive health"))?,
            ring,
            src_ranges: open(maps::SRC_RANGES)
                .ok()
                .and_then(|m| LpmTrie::try_from(m).ok()),
            vip_drops: open(maps::VIP_DROPS)
                .ok()
                .and_then(|m| PerCpuArray::try_from(m).ok()),
            budgets: open(maps::NEW_FLOW_BUDGET)
                .ok()
                .and_then(|m| PerCpuArray::try_from(m).ok()),
            budget_drops: open(maps::VIP_BUDGET_DROPS)
                .ok()
                .and_then(|m| PerCpuArray::try_from(m).ok()),
            vip_replies: open(maps::VIP_REPLY_STATS)
                .ok()
                .and_then(|m| PerCpuArray::try_from(m).ok()),
            member_replies: open(maps::MEMBER_REPLY_STATS)
                .ok()
                .and_then(|m| PerCpuArray::try_from(m).ok()),
            vip_ranges: open(maps::VIP_RANGES)
                .ok()
                .and_then(|m| LpmTrie::try_from(m).ok()),
            member_conns: open(maps::MEMBER_CONNS)
                .ok()
                .and_then(|m| Array::try_from(m).ok()),
            sizes,
        })
    }

    /// Packets of VIP id `id` dropped for their source (`drop_source_range`), over all CPUs.
    pub fn vip_source_drops(&self, id: u32) -> u64 {
        self.vip_drops
            .as_ref()
            .and_then(|m| m.get(&id, 0).ok())
            .map_or(0, |v| v.iter().sum())
    }

    /// Packets of VIP id `id` dropped for its new-flow budget (`drop_new_flow_budget`), over
    /// all CPUs.
    pub fn vip_budget_drops(&self, id: u32) -> u64 {
        self.budget_drops
            .as_ref()
            .and_then(|m| m.get(&id, 0).ok())
            .map_or(0, |v| v.iter().sum())
    }

    /// VIP id `id`'s new-flow budget as the program holds it: every CPU's bucket (None: no
    /// budget written).
    pub fn budget(&self, id: u32) -> Option<Vec<lb_common::NewFlowBudget>> {
        let v = self.budgets.as_ref()?.get(&id, 0).ok()?;
        let v: Vec<_> = v.iter().copied().collect();
        v.first().is_some_and(|b| b.burst != 0).then_some(v)
    }

    /// The longest source range of VIP id `vip_id` that `src` (lb's 16-byte form) is in, as
    /// the program's longest-prefix lookup finds it: (address bits, range address).
    pub fn source_range(&self, vip_id: u32, src: &[u8; 16]) -> Option<(u32, [u8; 16])> {
        let t = self.src_ranges.as_ref()?;
        t.keys()
            .filter_map(|k| k.ok())
            .filter_map(|k| {
                let d = k.data();
                let bits = k.prefix_len().checked_sub(32)?;
                (u32::from_be_bytes(d.vip_id) == vip_id && in_prefix(src, &d.addr, bits))
                    .then_some((bits, d.addr))
            })
            .max_by_key(|(bits, _)| *bits)
    }

    /// Global counters, summed over CPUs, in [`Counter`] order (with the derived ones filled
    /// in, see [`lb_common::stats::derive`]).
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, InspectError> {
        let mut counts = Counter::ALL
            .iter()
            .map(|&c| {
                let per_cpu = self.stats.get(&(c as u32), 0).map_err(merr("stats"))?;
                Ok(per_cpu.iter().sum())
            })
            .collect::<Result<Vec<u64>, InspectError>>()?;
        let mut vip_packets = 0;
        for id in 0..self.sizes.max_vips {
            vip_packets += self.vip_stats(id)?.packets;
        }
        lb_common::stats::derive(&mut counts, vip_packets);
        Ok(Counter::ALL.iter().copied().zip(counts).collect())
    }

    fn sum(
        map: &PerCpuArray<MapData, TrafficStats>,
        id: u32,
        what: &'static str,
    ) -> Result<TrafficStats, InspectError> {
        let per_cpu = map.get(&id, 0).map_err(merr(what))?;
        Ok(per_cpu
            .iter()
            .fold(TrafficStats::default(), |a, s| a.plus(*s)))
    }

    pub fn vip_stats(&self, id: u32) -> Result<TrafficStats, InspectError> {
        Self::sum(&self.vip_stats, id, "VIP stats")
    }

    pub fn member_stats(&self, id: u32) -> Result<TrafficStats, InspectError> {
        Self::sum(&self.member_stats, id, "member stats")
    }

    /// NAT replies of VIP id `id` (backend -> client), over all CPUs; zero on older pins.
    pub fn vip_replies(&self, id: u32) -> Result<TrafficStats, InspectError> {
        match &self.vip_replies {
            Some(m) => Self::sum(m, id, "VIP reply stats"),
            None => Ok(TrafficStats::default()),
        }
    }

    /// NAT replies of member id `id`, over all CPUs; zero on older pins.
    pub fn member_replies(&self, id: u32) -> Result<TrafficStats, InspectError> {
        match &self.member_replies {
            Some(m) => Self::sum(m, id, "member reply stats"),
            None => Ok(TrafficStats::default()),
        }
    }

    /// Passive health counters of a member id (NAT mode).
    pub fn passive(&self, id: u32) -> Result<PassiveHealth, InspectError> {
        self.passive.get(&id, 0).map_err(merr("passive health"))
    }

    /// The NAT translation of a client flow, if any.
    pub fn nat(&self, k: &FlowKey) -> Option<NatFlow> {
        self.nat.get(k, 0).ok()
    }

    /// The reverse entry a client flow's NAT pointer `n` leads to, if it is still the flow's:
    /// the translation's state lives there.
    pub fn nat_reverse(&self, k: &FlowKey, n: &NatFlow) -> Option<NatReverse> {
        let b = self.member(n.member_id)?;
        let node = self.node.get(&0, 0).ok()?;
        let mut dst = node.src_v6;
        if k.family == FAMILY_V4 {
            dst = [0; 16];
            dst[..4].copy_from_slice(&node.src_v4);
        }
        let rkey = FlowKey {
            src: b.addr,
            dst,
            src_port: if b.port != 0 { b.port } else { k.dst_port },
            dst_port: n.nat_port,
            proto: k.proto,
            family: k.family,
            _pad: [0; 2],
        };
        self.nat_rev.get(&rkey, 0).ok().filter(|r| r.client == *k)
    }

    /// VIPs, ordered by key: the exact ones and the port-range ones (port 0, see
    /// [`Pinned::port_ranges`]).
    pub fn vips(&self) -> Result<BTreeMap<VipKey, VipValue>, InspectError> {
        let mut out: BTreeMap<VipKey, VipValue> = self
            .vips
            .iter()
            .map(|kv| kv.map_err(merr("VIPs")))
            .collect::<Result<_, _>>()?;
        out.extend(self.range_vips()?.into_iter().map(|(k, (_, v))| (k, v)));
        Ok(out)
    }

    /// The port-range VIPs (`LB_VIP_RANGES`), by key (port 0), with their ranges.
    fn range_vips(
        &self,
    ) -> Result<BTreeMap<VipKey, (crate::model::desired::PortRange, VipValue)>, InspectError> {
        let Some(t) = &self.vip_ranges else {
            return Ok(BTreeMap::new());
        };
        let mut blocks = Vec::new();
        for kv in t.iter() {
            let (k, v) = kv.map_err(merr("port ranges"))?;
            blocks.push((k.prefix_len(), k.data(), v));
        }
        Ok(crate::model::port_ranges::of_blocks(blocks))
    }

    /// The ports of each port-range VIP, by key (port 0).
    pub fn port_ranges(
        &self,
    ) -> Result<BTreeMap<VipKey, crate::model::desired::PortRange>, InspectError> {
        Ok(self
            .range_vips()?
            .into_iter()
            .map(|(k, (r, _))| (k, r))
            .collect())
    }

    /// The VIP a packet to `exact` (address, port, protocol) is balanced by, as the program
    /// finds it: the exact VIP, else the port range its port is in. The key returned is the
    /// VIP's own (port 0 for a range).
    pub fn vip_of(&self, exact: &VipKey) -> Option<(VipKey, VipValue)> {
        if let Ok(v) = self.vips.get(exact, 0) {
            return Some((*exact, v));
        }
        let t = self.vip_ranges.as_ref()?;
        let probe = VipRangeKey {
            family: exact.family,
            proto: exact.proto,
            addr: exact.addr,
            port: exact.port.to_ne_bytes(),
        };
        let v = t
            .get(
                &aya::maps::lpm_trie::Key::new(VipRangeKey::prefix_len(16), probe),
                0,
            )
            .ok()?;
        Some((VipKey { port: 0, ..*exact }, v))
    }

    /// Live members by id.
    pub fn members(&self) -> Result<BTreeMap<u32, Member>, InspectError> {
        let mut out = BTreeMap::new();
        for (id, m) in self.members.iter().enumerate() {
            let m = m.map_err(merr("members"))?;
            if m.is_live() {
                out.insert(id as u32, m);
            }
        }
        Ok(out)
    }

    /// The live member at `id`, if any.
    pub fn member(&self, id: u32) -> Option<Member> {
        self.members.get(&id, 0).ok().filter(|m| m.is_live())
    }

    /// The member id at `index` in the ring (VIP id times the node's table size, plus slot).
    pub fn ring_at(&self, index: u32) -> u32 {
        self.ring.get(index as usize)
    }

    /// The node settings the program uses.
    pub fn node(&self) -> Result<NodeConfig, InspectError> {
        self.node.get(&0, 0).map_err(merr("node settings"))
    }

    /// Slot -> member id of one VIP's table.
    pub fn ring_slot(&self, vip_id: u32, slot: u32) -> u32 {
        self.ring
            .get((vip_id * self.sizes.table_size + slot) as usize)
    }

    /// The size of a VIP's table.
    pub fn table_size(&self, vip: &VipValue) -> u32 {
        vip.table_size_of(self.sizes.table_size)
    }

    /// How many slots each member id holds in one VIP's table.
    pub fn slot_counts(&self, vip: &VipValue) -> BTreeMap<u32, u32> {
        let mut out = BTreeMap::new();
        for s in 0..self.table_size(vip) {
            *out.entry(self.ring_slot(vip.id, s)).or_insert(0) += 1;
        }
        out
    }

    /// Calls `f` with every flow entry (IPv4 from the mapped table, then the IPv6 LRU) until
    /// it returns false. IPv4 entries of a VIP id no VIP has any more are left out.
    pub fn each_flow(
        &self,
        mut f: impl FnMut(FlowKey, FlowValue) -> bool,
    ) -> Result<(), InspectError> {
        let vips: BTreeMap<u32, VipKey> =
            self.vips()?.into_iter().map(|(k, v)| (v.id, k)).collect();
        let now = monotonic_coarse_ns();
        for w in self.flows4_map.ways() {
            let mut b = FlowBucket::default();
            (b.keys[0], b.values[0], b.seen[0]) = (w.key, w.value, w.seen);
            if let Some((k, v)) = Self::flow4(&vips, &b, w.key, now)
                && !f(k, v)
            {
                return Ok(());
            }
        }
        for kv in self.flows.iter() {
            let (k, v) = kv.map_err(merr("flows"))?;
            if !f(k, v) {
                break;
            }
        }
        Ok(())
    }

    /// The flow of key `k` in bucket `b`, if any.
    fn flow4(
        vips: &BTreeMap<u32, VipKey>,
        b: &FlowBucket,
        k: u64,
        now: u64,
    ) -> Option<(FlowKey, FlowValue)> {
        if k == flowtab::EMPTY || k == flowtab::LOCKED {
            return None;
        }
        let value = flowtab::get([b, b], k, now)?;
        let (src4, src_port, vip_id) = flowtab::unpack_key(k);
        let vip = vips.get(&vip_id)?;
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&src4);
        let key = FlowKey {
            src,
            dst: vip.addr,
            src_port,
            dst_port: vip.port,
            proto: vip.proto,
            family: vip.family,
            _pad: [0; 2],
        };
        Some((key, value))
    }

    /// The flow entry of `k`, from the table of its family (IPv4 ones by their VIP's id).
    pub fn flow(&self, k: &FlowKey) -> Option<FlowValue> {
        if !flowtab::in_table(k.family) {
            return self.flows.get(k, 0).ok();
        }
        let vip_id = self.vip_of(&k.vip_key())?.1.id;
        let packed = flowtab::pack_key(k, vip_id);
        let at = flowtab::buckets_of(packed, self.flows4.len());
        let b0 = self.flows4.get(&at[0], 0).ok()?;
        let b1 = self.flows4.get(&at[1], 0).ok()?;
        flowtab::get([&b0, &b1], packed, monotonic_coarse_ns())
    }

    pub fn affinity(&self, k: &AffinityKey) -> Option<AffinityValue> {
        self.affinity.get(k, 0).ok()
    }
}

/// A NAT translation's state, from the packets seen both ways.
#[derive(serde::Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum NatState {
    /// Nothing came back from the backend yet (a TCP SYN sent, or a UDP request).
    Waiting,
    /// TCP: the backend answered, the client has yet to complete the handshake with its ACK
    /// (what a flood of spoofed SYNs leaves behind). Over after `node.nat_half_open_timeout`.
    HalfOpen,
    Established,
    /// One side sent a FIN.
    Closing,
    /// Both FINs or an RST went by: the port is freed after the close grace time.
    Closed,
    /// The translation entry is gone (expired or evicted): its port is free, and the flow's
    /// next packet takes a port again.
    Gone,
}

impl NatState {
    /// The states of a translation that holds its port, in the order `lb status` lists them.
    pub const HOLDING: [NatState; 5] = [
        NatState::Waiting,
        NatState::HalfOpen,
        NatState::Established,
        NatState::Closing,
        NatState::Closed,
    ];

    /// The state of the translation `r` of a flow of protocol `proto` at `now` (`None`: no
    /// entry). A closed TCP translation stays `Closed` until its entry is reused.
    pub fn of(r: Option<&NatReverse>, proto: u8, now: u64, node: &NodeConfig) -> Self {
        let Some(r) = r else {
            return NatState::Gone;
        };
        if r.closed() {
            NatState::Closed
        } else if r.expired(proto, now, node) {
            NatState::Gone
        } else if r.state & NAT_S_ANSWERED == 0 {
            NatState::Waiting
        } else if proto == IPPROTO_TCP && r.half_open() {
            NatState::HalfOpen
        } else if proto == IPPROTO_TCP && r.state & (NAT_S_FIN_CLIENT | NAT_S_FIN_BACKEND) != 0 {
            NatState::Closing
        } else {
            NatState::Established
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            NatState::Waiting => "waiting",
            NatState::HalfOpen => "half-open",
            NatState::Established => "established",
            NatState::Closing => "closing",
            NatState::Closed => "closed",
            NatState::Gone => "gone",
        }
    }
}

/// How many NAT source ports are held, by the state of the translation holding each (a closed
/// one holds its port until its grace time is over).
#[derive(serde::Serialize, Debug, Clone, Default, PartialEq)]
pub struct NatPorts {
    pub waiting: u64,
    pub half_open: u64,
    pub established: u64,
    pub closing: u64,
    pub closed: u64,
}

impl NatPorts {
    /// The count of `state` (`Gone` holds no port: 0).
    pub fn get(&self, state: NatState) -> u64 {
        match state {
            NatState::Waiting => self.waiting,
            NatState::HalfOpen => self.half_open,
            NatState::Established => self.established,
            NatState::Closing => self.closing,
            NatState::Closed => self.closed,
            NatState::Gone => 0,
        }
    }

    fn add(&mut self, state: NatState, closed_over: bool) {
        match state {
            NatState::Waiting => self.waiting += 1,
            NatState::HalfOpen => self.half_open += 1,
            NatState::Established => self.established += 1,
            NatState::Closing => self.closing += 1,
            NatState::Closed if !closed_over => self.closed += 1,
            NatState::Closed | NatState::Gone => {}
        }
    }
}

/// A backend's open connections, as IPVS counts them (see [`Pinned::connections`]).
#[derive(serde::Serialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Connections {
    pub active: u64,
    pub inactive: u64,
}

impl Connections {
    fn add(&mut self, active: bool) {
        match active {
            true => self.active += 1,
            false => self.inactive += 1,
        }
    }

    pub fn plus(self, o: Self) -> Self {
        Self {
            active: self.active + o.active,
            inactive: self.inactive + o.inactive,
        }
    }
}

/// How full one of the program's tables is.
#[derive(serde::Serialize, Debug, Clone, Copy, PartialEq)]
pub struct Fill {
    pub entries: u64,
    pub capacity: u64,
    /// entries / capacity.
    pub fill: f64,
}

impl Fill {
    /// `entries` at most `capacity`: a walk that raced with the program can count a key twice.
    fn of(entries: u64, capacity: u64) -> Self {
        let entries = entries.min(capacity);
        Self {
            entries,
            capacity,
            fill: entries as f64 / capacity.max(1) as f64,
        }
    }
}

/// How full the flow, affinity and NAT tables are, and the NAT ports they hold, for `/metrics`
/// and `lb status`.
pub struct Tables {
    pub fill: Vec<(&'static str, Fill)>,
    pub nat_ports: NatPorts,
    pub flows_ipv4: FlowStates,
    /// Open connections per member id, as IPVS counts them (ActiveConn, InActConn): a NAT
    /// VIP's from its translations, a DSR VIP's from its flow entries (IPv4: confirmed ones are
    /// active, those seen once inactive; IPv6: all active). An entry outlives its connection
    /// until it is reused or expires, so DSR counts are an upper bound.
    pub connections: Conns,
}

/// Open connections per member id.
pub type Conns = BTreeMap<u32, Connections>;

/// The IPv4 flow table's flows by state: `established` (a packet after the first found the
/// entry: a flood of new flows never evicts it while it is active) and `new` (seen once: a SYN
/// not yet followed by another packet, what a flood of spoofed SYNs leaves).
#[derive(serde::Serialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowStates {
    pub established: u64,
    pub new: u64,
}

impl Pinned {
    /// How full each of the program's tables is, by name: `flows_ipv4` (occupied ways of its
    /// buckets, read through the table's mapping: a way, once written, holds a flow until another
    /// evicts it), `flows_ipv6`, `affinity`, `nat` and `nat_reverse` (hash maps, walked key by
    /// key, each walk bounded by the map's capacity); and the NAT ports held, by state, from the
    /// same walk of the reverse translations.
    pub fn tables(&self) -> Result<Tables, InspectError> {
        let s = &self.sizes;
        let ways = self.flows4.len() as u64 * flowtab::FLOW_WAYS as u64;
        let (v6, aff, nat) = (
            s.flow_table_size_v6() as u64,
            s.affinity_table_size as u64,
            s.nat_table_size as u64,
        );
        let vips = self.vips()?;
        let mut connections = BTreeMap::new();
        let (nat_reverse, nat_ports) = self.nat_ports(&mut connections)?;
        let flows_ipv4 = self.flows_ipv4(&vips, &mut connections);
        let flows_ipv6 = self.flows_ipv6(&vips, &mut connections)?;
        let fill = vec![
            (
                "flows_ipv4",
                Fill::of(flows_ipv4.established + flows_ipv4.new, ways),
            ),
            ("flows_ipv6", Fill::of(flows_ipv6, v6)),
            (
                "affinity",
                Fill::of(count(self.affinity.keys(), "affinity", aff)?, aff),
            ),
            (
                "nat",
                Fill::of(count(self.nat.keys(), "NAT translations", nat)?, nat),
            ),
            ("nat_reverse", Fill::of(nat_reverse, nat)),
        ];
        Ok(Tables {
            fill,
            nat_ports,
            flows_ipv4,
            connections,
        })
    }

    /// The IPv4 flow table's flows by state, and the open connections of DSR VIPs' members.
    fn flows_ipv4(&self, vips: &BTreeMap<VipKey, VipValue>, conns: &mut Conns) -> FlowStates {
        // DSR VIPs only: a flow of a NAT VIP is counted from its translation.
        let dsr: BTreeMap<u32, VipKey> = vips
            .iter()
            .filter(|(_, v)| v.mode != MODE_NAT)
            .map(|(k, v)| (v.id, *k))
            .collect();
        let now = monotonic_coarse_ns();
        let mut out = FlowStates::default();
        for w in self.flows4_map.ways() {
            match w.confirmed {
                true => out.established += 1,
                false => out.new += 1,
            }
            let mut b = FlowBucket::default();
            (b.keys[0], b.values[0], b.seen[0]) = (w.key, w.value, w.seen);
            if let Some((_, v)) = Self::flow4(&dsr, &b, w.key, now) {
                conns.entry(v.member_id).or_default().add(w.confirmed);
            }
        }
        out
    }

    /// The IPv6 flow table's entries (at most its capacity), and the open connections of DSR
    /// VIPs' members (every entry counts as active: IPv6 entries record no confirmation).
    fn flows_ipv6(
        &self,
        vips: &BTreeMap<VipKey, VipValue>,
        conns: &mut Conns,
    ) -> Result<u64, InspectError> {
        let mut n = 0;
        for kv in self
            .flows
            .iter()
            .take(self.sizes.flow_table_size_v6() as usize)
        {
            let (k, v) = kv.map_err(merr("flows"))?;
            n += 1;
            let vip = VipKey {
                addr: k.dst,
                port: k.dst_port,
                proto: k.proto,
                family: k.family,
            };
            if vips.get(&vip).is_some_and(|v| v.mode != MODE_NAT) {
                conns.entry(v.member_id).or_default().add(true);
            }
        }
        Ok(n)
    }

    /// The reverse translations (at most the table's capacity), the ports they hold by state,
    /// and the open connections of NAT VIPs' members: established translations are active;
    /// waiting, half-open, closing and closed ones (still holding their port) inactive.
    fn nat_ports(&self, conns: &mut Conns) -> Result<(u64, NatPorts), InspectError> {
        let node = self.node()?;
        let now = monotonic_coarse_ns();
        let (mut entries, mut out) = (0, NatPorts::default());
        for e in self.nat_rev.iter().take(self.sizes.nat_table_size as usize) {
            let (k, r) = e.map_err(merr("NAT reverse entries"))?;
            entries += 1;
            let state = NatState::of(Some(&r), k.proto, now, &node);
            let expired = r.expired(k.proto, now, &node);
            out.add(state, expired);
            if !expired && state != NatState::Gone {
                let active = state == NatState::Established;
                conns.entry(r.member_id).or_default().add(active);
            }
        }
        Ok((entries, out))
    }
}

impl Pinned {
    /// Member `id`'s open connections and weight as the program counts them for least
    /// connections (`LB_MEMBER_CONNS`); None on pins without that map.
    pub fn member_conns(&self, id: u32) -> Option<lb_common::MemberConns> {
        self.member_conns.as_ref()?.get(&id, 0).ok()
    }

    /// The live connections of the members of the least-connections VIPs `vips` (id -> mode),
    /// by member id, counted as the program counts them (walking only the tables such VIPs use:
    /// the IPv4 or IPv6 flow table for DSR VIPs of that family, the reverse NAT table for NAT
    /// VIPs): a DSR VIP's flow entries whose
    /// connection has not ended (TCP: no FIN or RST seen, and seen within the node's TCP idle
    /// timeout where the entry records when; UDP: within its idle timeout); a NAT VIP's counted
    /// translations that are neither closed nor expired.
    pub fn live_connections(
        &self,
        vips: &BTreeMap<u32, u32>,
    ) -> Result<BTreeMap<u32, i64>, InspectError> {
        let mut out = BTreeMap::new();
        if vips.is_empty() {
            return Ok(out);
        }
        let node = self.node()?;
        let now = monotonic_coarse_ns();
        let keys: BTreeMap<VipKey, VipValue> = self.vips()?;
        let dsr: BTreeMap<u32, VipKey> = keys
            .iter()
            .filter(|(_, v)| vips.get(&v.id).is_some_and(|m| *m != MODE_NAT))
            .map(|(k, v)| (v.id, *k))
            .collect();
        let family = |f: u8| dsr.values().any(|k| k.family == f);
        if family(lb_common::FAMILY_V4) {
            for w in self.flows4_map.ways() {
                let mut b = FlowBucket::default();
                (b.keys[0], b.values[0], b.seen[0]) = (w.key, w.value, w.seen);
                let Some((k, v)) = Self::flow4(&dsr, &b, w.key, now) else {
                    continue;
                };
                if !w.ended && live(k.proto, now.saturating_sub(v.last_seen_ns), &node) {
                    *out.entry(v.member_id).or_default() += 1;
                }
            }
        }
        if family(lb_common::FAMILY_V6) {
            for kv in self
                .flows
                .iter()
                .take(self.sizes.flow_table_size_v6() as usize)
            {
                let (k, v) = kv.map_err(merr("flows"))?;
                let vip = VipKey {
                    addr: k.dst,
                    port: k.dst_port,
                    proto: k.proto,
                    family: k.family,
                };
                let ours = keys.get(&vip).is_some_and(|x| dsr.contains_key(&x.id));
                let idle = match k.proto {
                    lb_common::IPPROTO_UDP => now.saturating_sub(v.last_seen_ns),
                    // A TCP entry records when it was made, not when last seen.
                    _ => 0,
                };
                if ours
                    && v.last_seen_ns & lb_common::FLOW_ENDED_NS == 0
                    && live(k.proto, idle, &node)
                {
                    *out.entry(v.member_id).or_default() += 1;
                }
            }
        }
        let nat = vips.values().any(|m| *m == MODE_NAT);
        let walk = if nat { self.sizes.nat_table_size } else { 0 };
        for e in self.nat_rev.iter().take(walk as usize) {
            let (k, r) = e.map_err(merr("NAT reverse entries"))?;
            if r.state & lb_common::NAT_S_COUNTED != 0
                && vips.contains_key(&r.vip_id)
                && !r.closed()
                && !r.expired(k.proto, now, &node)
            {
                *out.entry(r.member_id).or_default() += 1;
            }
        }
        Ok(out)
    }
}

/// Whether a DSR flow idle for `idle_ns` still counts as open: UDP within the node's UDP idle
/// timeout, TCP within its TCP idle timeout (0: no timeout, either).
fn live(proto: u8, idle_ns: u64, node: &NodeConfig) -> bool {
    let limit = match proto {
        lb_common::IPPROTO_UDP => node.udp_idle_timeout_ns,
        _ => node.tcp_idle_timeout_ns,
    };
    limit == 0 || idle_ns <= limit
}

/// Keys of a hash map (one read each), at most `cap`. The program adds and evicts entries
/// meanwhile (a key gone from under the walk sends the kernel back to the first key, so without
/// the bound a walk under churn need not end): the count is a snapshot, and can be off by what
/// changed during the walk.
fn count<K>(
    keys: impl Iterator<Item = Result<K, aya::maps::MapError>>,
    what: &'static str,
    cap: u64,
) -> Result<u64, InspectError> {
    let mut n = 0;
    for k in keys.take(cap as usize) {
        k.map_err(merr(what))?;
        n += 1;
    }
    Ok(n)
}

/// CLOCK_MONOTONIC_COARSE now, the clock the program stamps entries with.
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether the first `bits` bits of `a` and `prefix` agree.
fn in_prefix(a: &[u8; 16], prefix: &[u8; 16], bits: u32) -> bool {
    a.iter().zip(prefix).enumerate().all(|(i, (x, p))| {
        let keep = bits.saturating_sub(i as u32 * 8).min(8);
        let mask = (0xff_u16 << (8 - keep)) as u8;
        x & mask == p & mask
    })
}
