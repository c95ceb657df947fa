//! Planning: (what the maps hold, what they should hold) -> the writes that differ, in an order
//! that is safe for packets in flight.
//!
//! Pure: no aya here. The order guarantees that between any two writes every ring slot points
//! at a live member of its VIP (or at none): members are published before any slot points at
//! them, slots are rewritten before a member they pointed at is retired, and a new VIP's table is
//! written before the VIP itself. (The one exception: at full `max_backends`, a newcomer may have
//! to take an id retired in the same plan; until its old VIP's table is rewritten, the program
//! drops the few packets that land on it there rather than send them to another VIP's backend.)
//! A resync with nothing changed plans no write at all.
//!
//! Members: each (VIP, backend) pair is a member with an id of its own. A member keeps its id for
//! as long as it stays; an id given to a new member gets the next generation, which is what lets
//! the program ignore flow and affinity entries of the id's previous owners.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use lb_common::{
    FAMILY_V4, FAMILY_V6, MEMBER_F_ACCEPTS, MEMBER_F_LIVE, MEMBER_F_REJECT, MODE_DSR, MODE_NAT,
    Member, NO_BACKEND, NODE_F_NEXTHOP_CHECK, NODE_F_SRC_V4, NODE_F_SRC_V6, NewFlowBudget,
    NodeConfig, VIP_F_HASH_SRC_ONLY, VIP_F_LEAST_CONN, VIP_F_NEW_FLOW_BUDGET, VIP_F_SOURCE_RANGES,
    VipAddr, VipKey, VipValue,
};

use crate::{
    model::desired::{Algorithm, Desired, HashOn, Mode, PortRange, VipSpec, addr16},
    model::maglev::{self, Entry, MaglevError},
    model::table::Table,
};

/// What the maps hold (or, for the in-memory dataplane, what they would hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub node: NodeConfig,
    pub vips: BTreeMap<VipKey, VipValue>,
    pub vip_addrs: BTreeMap<VipAddr, u32>,
    /// Live members by id.
    pub members: BTreeMap<u32, Member>,
    /// The generation each id that is not live now had last (0 or absent: never used).
    pub retired: BTreeMap<u32, u32>,
    /// Tables of the VIP ids in `vips`, compact (see [`Table`]). Shared with the plans that
    /// write them: a table the maps were written from is recognised without comparing slots.
    pub rings: BTreeMap<u32, Arc<Table>>,
    /// Source ranges of the VIPs with [`VIP_F_SOURCE_RANGES`] (`LB_SRC_RANGES`).
    pub src_ranges: BTreeSet<SrcRange>,
    /// Each CPU's share of the new-flow budget of the VIP ids with [`VIP_F_NEW_FLOW_BUDGET`]
    /// (`LB_NEW_FLOW_BUDGET`, the same on every CPU).
    pub budgets: BTreeMap<u32, BudgetShare>,
    /// The ports of the port-range VIPs in `vips` (keyed with port 0): their `LB_VIP_RANGES`
    /// blocks, where an exact VIP is in `LB_VIPS`.
    pub port_ranges: BTreeMap<VipKey, PortRange>,
}

/// The settings of one CPU's bucket of a VIP's new-flow budget (the agent's half of a
/// [`NewFlowBudget`]; the program keeps the other half, its tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BudgetShare {
    pub ns_per_token: u64,
    pub burst: u64,
}

impl BudgetShare {
    /// Each CPU's share of `b` over `cpus` CPUs.
    pub fn of(b: &crate::model::desired::Budget, cpus: u32) -> Self {
        let n = NewFlowBudget::per_cpu(b.rate, b.burst, cpus);
        Self {
            ns_per_token: n.ns_per_token,
            burst: n.burst,
        }
    }

    /// The entry to write: the settings with a full bucket.
    pub fn entry(&self) -> NewFlowBudget {
        NewFlowBudget {
            ns_per_token: self.ns_per_token,
            burst: self.burst,
            ..Default::default()
        }
    }

    /// The settings of an entry (None: no budget).
    pub fn of_entry(e: &NewFlowBudget) -> Option<Self> {
        (e.burst != 0).then_some(Self {
            ns_per_token: e.ns_per_token,
            burst: e.burst,
        })
    }
}

/// One source range of one VIP: an `LB_SRC_RANGES` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrcRange {
    pub vip_id: u32,
    /// Bits of the address that count (the CIDR's prefix length).
    pub bits: u32,
    /// lb's 16-byte form, host bits clear.
    pub addr: [u8; 16],
}

impl SrcRange {
    /// The trie key: its prefix length (VIP id bits included) and data.
    pub fn key(&self) -> (u32, lb_common::SrcRangeKey) {
        (
            lb_common::SrcRangeKey::prefix_len(self.bits),
            lb_common::SrcRangeKey::new(self.vip_id, self.addr),
        )
    }

    /// The range a trie key stands for (None for a key no lb wrote).
    pub fn of_key(prefix_len: u32, k: &lb_common::SrcRangeKey) -> Option<Self> {
        let bits = prefix_len.checked_sub(32).filter(|b| *b <= 128)?;
        Some(Self {
            vip_id: u32::from_be_bytes(k.vip_id),
            bits,
            addr: k.addr,
        })
    }
}

/// Sizes fixed at load time that a plan must fit in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub table_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    /// CPUs that share a VIP's new-flow budget (the online CPUs).
    pub cpus: u32,
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Node(NodeConfig),
    /// Publish (or update) a member. `fresh`: the id starts a new allocation, so its counters
    /// and passive health are zeroed before it is published.
    Member {
        id: u32,
        member: Member,
        fresh: bool,
    },
    /// Retire a member id (flags cleared: array entries can't be deleted; the generation stays,
    /// so the id's next allocation gets a new one).
    RetireMember {
        id: u32,
        generation: u32,
    },
    VipAddr {
        addr: VipAddr,
        count: u32,
    },
    RemoveVipAddr {
        addr: VipAddr,
    },
    /// Set ring slots of one VIP id: (slot, member id) pairs.
    Slots {
        vip_id: u32,
        slots: Vec<(u32, u32)>,
    },
    /// Set every slot of one VIP id's table (a new table, or one most of whose slots move).
    Table {
        vip_id: u32,
        table: Arc<Table>,
    },
    Vip {
        key: VipKey,
        value: VipValue,
    },
    RemoveVip {
        key: VipKey,
    },
    /// Publish (or update) port-range VIP `key` (port 0): `value` in the `LB_VIP_RANGES` blocks
    /// of `range`, then the blocks of `old` (its range before) that `range` has not removed.
    VipRange {
        key: VipKey,
        range: PortRange,
        old: Option<PortRange>,
        value: VipValue,
    },
    /// Remove port-range VIP `key`: the blocks of `range`.
    RemoveVipRange {
        key: VipKey,
        range: PortRange,
    },
    /// Let a VIP take packets from a source range.
    SrcRange(SrcRange),
    RemoveSrcRange(SrcRange),
    /// Give a VIP id a new-flow budget, or change it: every CPU's bucket gets these settings,
    /// full.
    Budget {
        vip_id: u32,
        share: BudgetShare,
    },
    /// Clear a VIP id's budget (all zeroes: no budget).
    RemoveBudget {
        vip_id: u32,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub writes: Vec<Write>,
}

impl Plan {
    /// Map entries written, counting each ring slot.
    pub fn write_count(&self) -> usize {
        self.writes
            .iter()
            .map(|w| match w {
                Write::Slots { slots, .. } => slots.len(),
                Write::Table { table, .. } => table.len(),
                _ => 1,
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{wanted} VIPs, but the program was loaded for at most {max}")]
    TooManyVips { wanted: usize, max: u32 },
    #[error(
        "{wanted} backends of VIPs (a backend counts once per VIP it serves), but the program was loaded for at most {max} (node.max_backends)"
    )]
    TooManyBackends { wanted: usize, max: u32 },
    #[error("VIP {vip}: {source}")]
    Maglev {
        vip: String,
        #[source]
        source: MaglevError,
    },
    #[error(
        "VIP {vip}: a table of {size} slots does not fit the {max} each VIP has (the node's table_size, fixed at load time)"
    )]
    TableTooLarge { vip: String, size: u32, max: u32 },
    #[error("VIP {0} is listed twice")]
    DuplicateVip(String),
    #[error(
        "{wanted} source ranges over all VIPs, but the program holds at most {max} (LB_SRC_RANGES)"
    )]
    TooManySourceRanges { wanted: usize, max: u32 },
    #[error(
        "the port ranges take {wanted} keys (a range is up to 30 aligned blocks), but the program holds at most {max} (LB_VIP_RANGES): use fewer ranges, or ranges aligned on powers of two"
    )]
    TooManyPortRangeKeys { wanted: usize, max: u32 },
}

/// Who a member is: its VIP id, and its backend's family, address and port (network byte
/// order). The same identity keeps the same member id.
pub type MemberIdentity = (u32, u8, [u8; 16], u16);

pub fn identity(m: &Member) -> MemberIdentity {
    (m.vip_id, m.family, m.addr, m.port)
}

/// The member of VIP id `vip_id` for a backend at `address` and `port` (0 in DSR); `reject`:
/// a rejecting share (see [`crate::model::desired::BackendSpec::reject`]).
pub fn member_of(
    vip_id: u32,
    address: std::net::IpAddr,
    port: u16,
    accepts: bool,
    reject: bool,
) -> Member {
    let (addr, family) = addr16(address);
    Member {
        addr,
        port: port.to_be(),
        family,
        flags: MEMBER_F_LIVE
            | if accepts { MEMBER_F_ACCEPTS } else { 0 }
            | if reject { MEMBER_F_REJECT } else { 0 },
        vip_id,
        generation: 0,
    }
}

/// Key bytes Maglev hashes for a backend: family, address, port. The same on every node (member
/// ids are not: they are only the values the table holds).
pub(crate) type MaglevKey = [u8; 19];

pub(crate) fn maglev_key(address: std::net::IpAddr, port: u16) -> MaglevKey {
    let (addr, family) = addr16(address);
    let mut k = [0; 19];
    k[0] = family;
    k[1..17].copy_from_slice(&addr);
    k[17..].copy_from_slice(&port.to_be().to_ne_bytes());
    k
}

fn nanos(d: std::time::Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

pub(crate) fn node_config(d: &Desired) -> NodeConfig {
    let mut n = NodeConfig {
        udp_idle_timeout_ns: nanos(d.node.udp_idle_timeout),
        nat_port_min: d.node.nat.port_min,
        nat_port_max: d.node.nat.port_max,
        nat_close_grace_ns: nanos(d.node.nat.close_grace),
        syn_timeout_ns: nanos(d.node.nat.syn_timeout),
        half_open_timeout_ms: d
            .node
            .nat
            .half_open_timeout
            .as_millis()
            .min(u32::MAX as u128) as u32,
        tcp_idle_timeout_ns: nanos(d.node.nat.tcp_idle_timeout),
        ..Default::default()
    };
    if let Some(a) = d.node.source_v4 {
        n.src_v4 = a.octets();
        n.flags |= NODE_F_SRC_V4;
    }
    if let Some(a) = d.node.source_v6 {
        n.src_v6 = a.octets();
        n.flags |= NODE_F_SRC_V6;
    }
    if d.node.nexthop_check {
        n.flags |= NODE_F_NEXTHOP_CHECK;
    }
    n
}

/// Lowest ids not in `used`.
pub(crate) fn free_ids(used: &BTreeSet<u32>) -> impl Iterator<Item = u32> + '_ {
    (0u32..).filter(|i| !used.contains(i))
}

/// Plans the writes that turn `current` into `desired`, and returns the state they lead to.
/// Every VIP is planned (see [`crate::model::planner::Planner`] for plans that look at the VIPs that
/// changed only).
pub fn plan(
    current: &State,
    desired: &Desired,
    limits: Limits,
) -> Result<(Plan, State), PlanError> {
    let (plan, next, _) = plan_full(current, desired, limits)?;
    Ok((plan, next))
}

/// [`plan`], with the member ids of each desired VIP's backends (in `desired` order).
pub(crate) fn plan_full(
    current: &State,
    desired: &Desired,
    limits: Limits,
) -> Result<(Plan, State, Vec<Vec<u32>>), PlanError> {
    check_vips(desired, limits)?;
    let vip_ids = vip_ids(current, desired, limits)?;
    let (members, retired) = members(current, desired, &vip_ids, limits)?;
    let by_identity: BTreeMap<MemberIdentity, u32> =
        members.iter().map(|(id, m)| (identity(m), *id)).collect();
    let ids: Vec<Vec<u32>> = desired
        .vips
        .iter()
        .zip(&vip_ids)
        .map(|(v, &id)| {
            v.backends
                .iter()
                .map(|b| by_identity[&identity(&member_of(id, b.address, b.port, false, b.reject))])
                .collect()
        })
        .collect();
    let mut next = State {
        node: node_config(desired),
        members,
        retired,
        ..Default::default()
    };
    let jobs: Vec<TableJob<'_>> = desired
        .vips
        .iter()
        .zip(&ids)
        .map(|(v, ids)| TableJob::new(v, ids, limits.table_size))
        .collect::<Result<_, _>>()?;
    let tables = build_tables(&jobs)?;
    for ((v, &id), table) in desired.vips.iter().zip(&vip_ids).zip(tables) {
        let key = v.key();
        next.vips.insert(key, vip_value(v, id, limits.table_size));
        *next.vip_addrs.entry(key.vip_addr()).or_insert(0) += 1;
        next.rings.insert(id, table);
        if let Some(b) = &v.new_flow_budget {
            next.budgets.insert(id, BudgetShare::of(b, limits.cpus));
        }
        next.src_ranges.extend(vip_ranges(v, id));
        if let Some(r) = v.port_range {
            next.port_ranges.insert(key, r);
        }
    }
    Ok((diff(current, &next), next, ids))
}

/// The `LB_VIPS` value of `v` as VIP id `id`.
pub(crate) fn vip_value(v: &VipSpec, id: u32, node_table_size: u32) -> VipValue {
    let flag = |on: bool, f: u32| if on { f } else { 0 };
    VipValue {
        id,
        flags: flag(v.hash == HashOn::SourceIp, VIP_F_HASH_SRC_ONLY)
            | flag(v.source_ranges.is_some(), VIP_F_SOURCE_RANGES)
            | flag(v.new_flow_budget.is_some(), VIP_F_NEW_FLOW_BUDGET)
            | flag(v.algorithm == Algorithm::LeastConnections, VIP_F_LEAST_CONN),
        affinity_timeout_s: v.affinity_timeout_s,
        mode: match v.mode {
            Mode::Dsr => MODE_DSR,
            Mode::Nat => MODE_NAT,
        },
        table_size: v.table_size.unwrap_or(node_table_size),
    }
}

/// The source ranges of `v` as VIP id `id`: those of its own family.
pub(crate) fn vip_ranges(v: &VipSpec, id: u32) -> impl Iterator<Item = SrcRange> + '_ {
    let family = addr16(v.address).1;
    v.source_ranges.iter().flatten().filter_map(move |c| {
        let (addr, f) = addr16(c.addr);
        (f == family).then_some(SrcRange {
            vip_id: id,
            bits: u32::from(c.prefix),
            addr,
        })
    })
}

/// The inputs of one VIP's Maglev table.
pub(crate) struct TableJob<'a> {
    vip: &'a VipSpec,
    /// (backend key, weight, member id).
    entries: Vec<(MaglevKey, u32, u32)>,
    size: u32,
}

impl<'a> TableJob<'a> {
    /// The table of `v` whose backends have member ids `ids`, in a ring of `node_table_size` slots a
    /// VIP.
    pub(crate) fn new(
        v: &'a VipSpec,
        ids: &[u32],
        node_table_size: u32,
    ) -> Result<Self, PlanError> {
        let size = v.table_size.unwrap_or(node_table_size);
        if size > node_table_size {
            return Err(PlanError::TableTooLarge {
                vip: v.label(),
                size,
                max: node_table_size,
            });
        }
        let entries = v
            .backends
            .iter()
            .zip(ids)
            .map(|(b, id)| (maglev_key(b.address, b.port), b.weight, *id))
            .collect();
        Ok(Self {
            vip: v,
            entries,
            size,
        })
    }

    fn build(&self) -> Result<Arc<Table>, PlanError> {
        // Slots hold entry positions (the table depends on keys and weights only), which map
        // onto the compact table's indices without a lookup per slot.
        let refs: Vec<Entry<'_>> = self
            .entries
            .iter()
            .enumerate()
            .map(|(j, (k, w, _))| Entry {
                key: k,
                weight: *w,
                value: j as u32,
            })
            .collect();
        let choices =
            maglev::build(&refs, self.size, u32::MAX).map_err(|source| PlanError::Maglev {
                vip: self.vip.label(),
                source,
            })?;
        let ids: Vec<u32> = self.entries.iter().map(|(_, _, id)| *id).collect();
        Ok(Arc::new(Table::of_choices(&ids, &choices, NO_BACKEND)))
    }
}

/// Tables a plan builds at most before it builds them on every CPU.
const TABLES_ON_ONE_THREAD: usize = 4;

/// Builds the tables of `jobs`, in order: the tables of independent VIPs on every CPU when
/// there are more than a few.
pub(crate) fn build_tables(jobs: &[TableJob<'_>]) -> Result<Vec<Arc<Table>>, PlanError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads < 2 || jobs.len() <= TABLES_ON_ONE_THREAD {
        return jobs.iter().map(TableJob::build).collect();
    }
    // Thread t builds jobs t, t + threads, ...: neighbours in a config tend to be alike.
    let built: Vec<Vec<Result<Arc<Table>, PlanError>>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                sc.spawn(move || {
                    jobs.iter()
                        .skip(t)
                        .step_by(threads)
                        .map(TableJob::build)
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a Maglev build panicked"))
            .collect()
    });
    let mut per_thread: Vec<_> = built.into_iter().map(Vec::into_iter).collect();
    (0..jobs.len())
        .map(|i| per_thread[i % threads].next().expect("one table per job"))
        .collect()
}

/// No VIP twice, and not more VIPs than the maps hold.
fn check_vips(desired: &Desired, limits: Limits) -> Result<(), PlanError> {
    let mut seen = BTreeSet::new();
    for v in &desired.vips {
        if !seen.insert(v.key()) {
            return Err(PlanError::DuplicateVip(v.label()));
        }
    }
    check_counts(desired, limits)
}

/// Not more VIPs, members or source ranges than the maps hold.
pub(crate) fn check_counts(desired: &Desired, limits: Limits) -> Result<(), PlanError> {
    let wanted: usize = desired.vips.iter().map(|v| v.backends.len()).sum();
    if wanted > limits.max_backends as usize {
        return Err(PlanError::TooManyBackends {
            wanted,
            max: limits.max_backends,
        });
    }
    if desired.vips.len() > limits.max_vips as usize {
        return Err(PlanError::TooManyVips {
            wanted: desired.vips.len(),
            max: limits.max_vips,
        });
    }
    let keys: usize = desired
        .vips
        .iter()
        .filter_map(|v| v.port_range)
        .map(|r| r.blocks().count())
        .sum();
    if keys > lb_common::maps::MAX_VIP_RANGE_KEYS as usize {
        return Err(PlanError::TooManyPortRangeKeys {
            wanted: keys,
            max: lb_common::maps::MAX_VIP_RANGE_KEYS,
        });
    }
    // Only the ranges of a VIP's own family are written.
    let ranges: usize = desired
        .vips
        .iter()
        .map(|v| {
            v.source_ranges
                .iter()
                .flatten()
                .filter(|c| c.addr.is_ipv4() == v.address.is_ipv4())
                .count()
        })
        .sum();
    if ranges > lb_common::maps::MAX_SOURCE_RANGES as usize {
        return Err(PlanError::TooManySourceRanges {
            wanted: ranges,
            max: lb_common::maps::MAX_SOURCE_RANGES,
        });
    }
    Ok(())
}

/// VIP ids, in `desired.vips` order: a VIP that stays keeps its id; a new one takes the lowest id
/// that is neither in use nor being retired now.
fn vip_ids(current: &State, desired: &Desired, limits: Limits) -> Result<Vec<u32>, PlanError> {
    let used: BTreeSet<u32> = current.vips.values().map(|v| v.id).collect();
    let mut fresh = free_ids(&used);
    let mut ids = Vec::with_capacity(desired.vips.len());
    for v in &desired.vips {
        let id = match current.vips.get(&v.key()) {
            Some(old) => old.id,
            None => fresh.next().expect("ids are unbounded"),
        };
        if id >= limits.max_vips {
            return Err(PlanError::TooManyVips {
                wanted: id as usize + 1,
                max: limits.max_vips,
            });
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Live members by id.
type Members = BTreeMap<u32, Member>;

/// The members the desired state needs (by id) and the generations of the ids left retired.
/// A member that stays keeps its id (and generation); a newcomer takes the lowest id that is not
/// live, else (only at full `max_backends`) one being retired in this plan, at its next
/// generation.
fn members(
    current: &State,
    desired: &Desired,
    vip_ids: &[u32],
    limits: Limits,
) -> Result<(Members, BTreeMap<u32, u32>), PlanError> {
    let mut wanted: Vec<Member> = Vec::new();
    for (v, &vip_id) in desired.vips.iter().zip(vip_ids) {
        for b in &v.backends {
            wanted.push(member_of(vip_id, b.address, b.port, b.weight > 0, b.reject));
        }
    }
    if wanted.len() > limits.max_backends as usize {
        return Err(PlanError::TooManyBackends {
            wanted: wanted.len(),
            max: limits.max_backends,
        });
    }
    let old: BTreeMap<MemberIdentity, u32> = current
        .members
        .iter()
        .map(|(id, m)| (identity(m), *id))
        .collect();
    let mut out = BTreeMap::new();
    let mut newcomers = Vec::new();
    for m in wanted {
        match old.get(&identity(&m)) {
            Some(&id) => {
                let generation = current.members[&id].generation;
                out.insert(id, Member { generation, ..m });
            }
            None => newcomers.push(m),
        }
    }
    let live: BTreeSet<u32> = current.members.keys().copied().collect();
    let retiring: Vec<u32> = live
        .iter()
        .copied()
        .filter(|id| !out.contains_key(id))
        .collect();
    let mut ids = free_ids(&live)
        .take_while(|id| *id < limits.max_backends)
        .chain(retiring);
    for m in newcomers {
        let id = ids.next().ok_or(PlanError::TooManyBackends {
            wanted: out.len() + 1,
            max: limits.max_backends,
        })?;
        let last = current
            .members
            .get(&id)
            .map(|m| m.generation)
            .or_else(|| current.retired.get(&id).copied())
            .unwrap_or(0);
        let generation = last.wrapping_add(1).max(1);
        out.insert(id, Member { generation, ..m });
    }
    let mut retired = current.retired.clone();
    retired.retain(|id, _| !out.contains_key(id));
    for (id, m) in &current.members {
        if !out.contains_key(id) {
            retired.insert(*id, m.generation);
        }
    }
    Ok((out, retired))
}

/// The writes from `cur` to `next`, safely ordered.
pub(crate) fn diff(cur: &State, next: &State) -> Plan {
    let mut w = Vec::new();
    if cur.node != next.node {
        w.push(Write::Node(next.node));
    }
    // 1. Publish new or changed members (a new generation starts with zeroed counters).
    for (id, m) in &next.members {
        let before = cur.members.get(id);
        if before != Some(m) {
            let last = before
                .map(|b| b.generation)
                .or_else(|| cur.retired.get(id).copied());
            w.push(Write::Member {
                id: *id,
                member: *m,
                fresh: last != Some(m.generation),
            });
        }
    }
    // 2. Addresses that gain VIPs.
    for (a, n) in &next.vip_addrs {
        if cur.vip_addrs.get(a) != Some(n) {
            w.push(Write::VipAddr {
                addr: *a,
                count: *n,
            });
        }
    }
    // 3. Tables: only the slots that differ (all of them for a VIP id new to the maps).
    for (id, ring) in &next.rings {
        if let Some(write) = table_write(*id, cur.rings.get(id), ring) {
            w.push(write);
        }
    }
    // 4. Source ranges a VIP gains, before a VIP gets the flag that makes the program look
    // (a change of ranges adds before it removes: a source in both is never refused).
    for r in next.src_ranges.difference(&cur.src_ranges) {
        w.push(Write::SrcRange(*r));
    }
    // 4b. Budgets a VIP gains or changes, before a VIP gets the flag that makes the program
    // look (an unchanged budget is not written: its buckets keep their tokens).
    for (id, b) in &next.budgets {
        if cur.budgets.get(id) != Some(b) {
            w.push(Write::Budget {
                vip_id: *id,
                share: *b,
            });
        }
    }
    // 5. VIPs: new and changed ones now that their tables are in place; then removals.
    for (k, v) in &next.vips {
        let (range, old) = (next.port_ranges.get(k), cur.port_ranges.get(k));
        if cur.vips.get(k) != Some(v) || range != old {
            w.push(match range {
                Some(r) => Write::VipRange {
                    key: *k,
                    range: *r,
                    old: old.copied(),
                    value: *v,
                },
                None => Write::Vip { key: *k, value: *v },
            });
        }
    }
    removals(cur, next, &mut w);
    Plan { writes: w }
}

/// The writes of a plan that take away (VIPs, their addresses, ranges and budgets, and last
/// the members), in that order.
fn removals(cur: &State, next: &State, w: &mut Vec<Write>) {
    for k in cur.vips.keys().filter(|k| !next.vips.contains_key(k)) {
        w.push(match cur.port_ranges.get(k) {
            Some(r) => Write::RemoveVipRange { key: *k, range: *r },
            None => Write::RemoveVip { key: *k },
        });
    }
    for a in cur
        .vip_addrs
        .keys()
        .filter(|a| !next.vip_addrs.contains_key(a))
    {
        w.push(Write::RemoveVipAddr { addr: *a });
    }
    // 6. Source ranges no VIP has any more, now that a VIP without ranges has lost the flag.
    for r in cur.src_ranges.difference(&next.src_ranges) {
        w.push(Write::RemoveSrcRange(*r));
    }
    // 6b. Budgets no VIP has any more, now that their VIPs have lost the flag.
    for id in cur
        .budgets
        .keys()
        .filter(|id| !next.budgets.contains_key(id))
    {
        w.push(Write::RemoveBudget { vip_id: *id });
    }
    // 7. Retire members no table points at any more.
    for (id, m) in cur
        .members
        .iter()
        .filter(|(id, _)| !next.members.contains_key(id))
    {
        w.push(Write::RetireMember {
            id: *id,
            generation: m.generation,
        });
    }
}

/// Above this share of a table's slots changing, the whole table is written: a slot written
/// with the value it holds is no change for the program, and a list of (slot, id) pairs takes
/// twice the memory of the table's ids.
const WHOLE_TABLE_ABOVE: usize = 4;

/// The write that turns table `old` (None: none in the maps) of VIP id `id` into `new`.
fn table_write(id: u32, old: Option<&Arc<Table>>, new: &Arc<Table>) -> Option<Write> {
    let whole = || Write::Table {
        vip_id: id,
        table: Arc::clone(new),
    };
    let Some(old) = old.filter(|o| o.len() == new.len()) else {
        return Some(whole());
    };
    // The very table the maps were written from last time: nothing to compare.
    if Arc::ptr_eq(old, new) {
        return None;
    }
    let slots = old.changes(new);
    if slots.is_empty() {
        None
    } else if slots.len() > new.len() / WHOLE_TABLE_ABOVE {
        Some(whole())
    } else {
        Some(Write::Slots { vip_id: id, slots })
    }
}

/// Applies one write to a [`State`] (the in-memory dataplane, and tests of ordering).
pub fn apply_to_state(s: &mut State, w: &Write, m: u32) {
    match w {
        Write::Node(n) => s.node = *n,
        Write::Member { id, member, .. } => {
            s.members.insert(*id, *member);
            s.retired.remove(id);
        }
        Write::RetireMember { id, generation } => {
            s.members.remove(id);
            s.retired.insert(*id, *generation);
        }
        Write::VipAddr { addr, count } => {
            s.vip_addrs.insert(*addr, *count);
        }
        Write::RemoveVipAddr { addr } => {
            s.vip_addrs.remove(addr);
        }
        Write::Slots { vip_id, slots } => apply_slots(s, *vip_id, slots, m),
        Write::Table { vip_id, table } => apply_table(s, *vip_id, table, m),
        Write::VipRange {
            key, range, value, ..
        } => {
            s.port_ranges.insert(*key, *range);
            apply_to_state(
                s,
                &Write::Vip {
                    key: *key,
                    value: *value,
                },
                m,
            );
        }
        Write::RemoveVipRange { key, .. } => {
            s.port_ranges.remove(key);
            s.vips.remove(key);
        }
        Write::Vip { key, value } => apply_vip(s, *key, *value, m),
        Write::RemoveVip { key } => {
            s.vips.remove(key);
        }
        Write::SrcRange(r) => {
            s.src_ranges.insert(*r);
        }
        Write::RemoveSrcRange(r) => {
            s.src_ranges.remove(r);
        }
        Write::Budget { vip_id, share } => {
            s.budgets.insert(*vip_id, *share);
        }
        Write::RemoveBudget { vip_id } => {
            s.budgets.remove(vip_id);
        }
    }
}

/// A VIP's ring slots written one by one (a table growing takes the slots past its end).
fn apply_slots(s: &mut State, vip_id: u32, slots: &[(u32, u32)], m: u32) {
    let mut ring = s
        .rings
        .get(&vip_id)
        .map_or_else(|| vec![NO_BACKEND; m as usize], |r| r.to_vec());
    for (slot, b) in slots {
        if ring.len() <= *slot as usize {
            ring.resize(*slot as usize + 1, NO_BACKEND); // a table growing
        }
        ring[*slot as usize] = *b;
    }
    s.rings.insert(vip_id, Arc::new(Table::new(&ring)));
}

/// A VIP's whole table written; a table shrinking leaves the slots past it as they were.
fn apply_table(s: &mut State, vip_id: u32, table: &Arc<Table>, m: u32) {
    let mut ring = s
        .rings
        .get(&vip_id)
        .map_or_else(|| vec![NO_BACKEND; m as usize], |r| r.to_vec());
    if ring.len() <= table.len() {
        s.rings.insert(vip_id, Arc::clone(table));
    } else {
        ring[..table.len()].copy_from_slice(&table.to_vec());
        s.rings.insert(vip_id, Arc::new(Table::new(&ring)));
    }
}

/// A VIP written: its table is the VIP's size from now on (what a reader of the maps would see).
fn apply_vip(s: &mut State, key: VipKey, value: VipValue, m: u32) {
    if let Some(ring) = s.rings.get_mut(&value.id) {
        let len = value.table_size_of(m) as usize;
        if ring.len() != len {
            let mut slots = ring.to_vec();
            slots.resize(len, NO_BACKEND);
            *ring = Arc::new(Table::new(&slots));
        }
    }
    s.vips.insert(key, value);
}

/// Whether a family byte is one lb knows.
pub fn known_family(f: u8) -> bool {
    f == FAMILY_V4 || f == FAMILY_V6
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::model::desired::{BackendSpec, Protocol, VipSpec};

    const LIMITS: Limits = Limits {
        table_size: 1009,
        max_vips: 16,
        max_backends: 64,
        cpus: 2,
    };

    fn vip(addr: &str, backends: &[(&str, u32)]) -> VipSpec {
        VipSpec {
            name: addr.into(),
            address: addr.parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            mode: Mode::Dsr,
            hash: HashOn::FiveTuple,
            affinity_timeout_s: 0,
            table_size: None,
            source_ranges: None,
            new_flow_budget: None,
            port_range: None,
            algorithm: Default::default(),
            backends: backends
                .iter()
                .map(|(a, w)| BackendSpec::new(a.parse::<IpAddr>().unwrap(), 0, *w))
                .collect(),
        }
    }

    fn desired(vips: Vec<VipSpec>) -> Desired {
        Desired {
            node: crate::model::desired::NodeSpec {
                source_v4: Some("10.0.0.1".parse().unwrap()),
                ..Default::default()
            },
            vips,
        }
    }

    /// Every slot of every VIP visible to the program points at a live member of that VIP or
    /// at none.
    fn consistent(s: &State) -> Result<(), String> {
        for (k, v) in &s.vips {
            let ring = s
                .rings
                .get(&v.id)
                .ok_or(format!("VIP {k:?} has no table"))?;
            if let Some(b) = ring
                .iter()
                .find(|b| *b != NO_BACKEND && s.members.get(b).is_none_or(|m| m.vip_id != v.id))
            {
                return Err(format!(
                    "VIP id {} points at {b}, not a live member of it",
                    v.id
                ));
            }
        }
        Ok(())
    }

    fn apply(s: &mut State, p: &Plan) {
        for w in &p.writes {
            apply_to_state(s, w, LIMITS.table_size);
            consistent(s).unwrap_or_else(|e| panic!("after {w:?}: {e}"));
        }
    }

    #[test]
    fn nexthop_check_is_written_as_the_node_flag() {
        let mut d = desired(vec![vip("192.0.2.1", &[("10.1.0.1", 1)])]);
        let (_, off) = plan(&State::default(), &d, LIMITS).unwrap();
        assert_eq!(off.node.flags & NODE_F_NEXTHOP_CHECK, 0);
        d.node.nexthop_check = true;
        let (p, on) = plan(&off, &d, LIMITS).unwrap();
        assert_ne!(on.node.flags & NODE_F_NEXTHOP_CHECK, 0);
        assert_eq!(
            p.writes,
            [Write::Node(on.node)],
            "only the node entry changes"
        );
    }

    #[test]
    fn unchanged_state_plans_nothing() {
        let d = desired(vec![
            vip("192.0.2.1", &[("10.1.0.1", 1), ("10.1.0.2", 2)]),
            vip("192.0.2.2", &[("10.1.0.1", 1)]),
        ]);
        let (p, next) = plan(&State::default(), &d, LIMITS).unwrap();
        assert!(p.write_count() > 2 * 1009, "first sync writes both tables");
        let mut s = State::default();
        apply(&mut s, &p);
        assert_eq!(s, next, "applying the plan gives the planned state");
        let (again, _) = plan(&s, &d, LIMITS).unwrap();
        assert!(again.is_empty(), "resync wrote {:?}", again.writes);
    }

    #[test]
    fn one_backend_change_touches_only_its_slots() {
        // Five backends: removing one moves about a fifth of the slots, fewer than the share
        // above which the whole table is written.
        let five = [
            ("10.1.0.1", 1),
            ("10.1.0.2", 1),
            ("10.1.0.4", 1),
            ("10.1.0.5", 1),
            ("10.1.0.3", 1),
        ];
        let before = desired(vec![
            vip("192.0.2.1", &five),
            vip("192.0.2.2", &[("10.1.0.9", 1)]),
        ]);
        let (p, s) = plan(&State::default(), &before, LIMITS).unwrap();
        let mut cur = State::default();
        apply(&mut cur, &p);
        assert_eq!(cur, s);
        let removed_id = cur
            .members
            .iter()
            .find(|(_, b)| b.addr[..4] == [10, 1, 0, 3])
            .map(|(id, _)| *id)
            .unwrap();
        let held = cur.rings[&0].iter().filter(|&b| b == removed_id).count();

        let after = desired(vec![
            vip("192.0.2.1", &five[..4]),
            vip("192.0.2.2", &[("10.1.0.9", 1)]),
        ]);
        let (p, _) = plan(&cur, &after, LIMITS).unwrap();
        let slot_writes: Vec<_> = p
            .writes
            .iter()
            .filter(|w| matches!(w, Write::Slots { .. }))
            .collect();
        assert_eq!(
            slot_writes.len(),
            1,
            "only the changed VIP's table: {slot_writes:?}"
        );
        let Write::Slots { vip_id, slots } = slot_writes[0] else {
            unreachable!()
        };
        assert_eq!(*vip_id, 0);
        // Maglev moves the removed backend's slots and a few more; never the whole table.
        assert!(
            slots.len() >= held && slots.len() < 2 * held,
            "{} slots rewritten for {held} held",
            slots.len()
        );
        assert_eq!(
            p.writes.last(),
            Some(&Write::RetireMember {
                id: removed_id,
                generation: 1
            }),
            "retire last"
        );
        assert_eq!(p.write_count(), slots.len() + 1);
        apply(&mut cur, &p);
    }

    #[test]
    fn a_change_that_moves_most_slots_writes_the_whole_table() {
        let two = |w| desired(vec![vip("192.0.2.1", &[("10.1.0.1", 1), ("10.1.0.2", w)])]);
        let (_, s) = plan(&State::default(), &two(1), LIMITS).unwrap();
        // 1:1 to 1:9: about 0.4 of the slots move, more than a quarter.
        let (p, next) = plan(&s, &two(9), LIMITS).unwrap();
        let moved = s.rings[&0]
            .iter()
            .zip(next.rings[&0].iter())
            .filter(|(a, b)| a != b)
            .count();
        assert!(moved > 1009 / 4, "{moved} slots moved");
        assert_eq!(
            p.writes,
            [Write::Table {
                vip_id: 0,
                table: next.rings[&0].clone()
            }]
        );
        let mut cur = s.clone();
        apply(&mut cur, &p);
        assert_eq!(cur, next);
    }

    #[test]
    fn ids_are_kept_and_not_reused_at_once() {
        let (p, s1) = plan(
            &State::default(),
            &desired(vec![vip("192.0.2.1", &[("10.1.0.1", 1), ("10.1.0.2", 1)])]),
            LIMITS,
        )
        .unwrap();
        let mut cur = State::default();
        apply(&mut cur, &p);
        let id_of = |s: &State, last: u8| {
            s.members
                .iter()
                .find(|(_, b)| b.addr[3] == last)
                .map(|(i, _)| *i)
        };
        let (p, s2) = plan(
            &cur,
            &desired(vec![vip("192.0.2.1", &[("10.1.0.2", 1), ("10.1.0.3", 1)])]),
            LIMITS,
        )
        .unwrap();
        assert_eq!(
            id_of(&s1, 2),
            id_of(&s2, 2),
            "a backend that stays keeps its id"
        );
        assert_ne!(
            id_of(&s2, 3),
            id_of(&s1, 1),
            "a newcomer took the id being retired"
        );
        apply(&mut cur, &p);
    }

    /// Random walks between desired states: after every single write, no table points at a
    /// backend that is not there, and the end state is the planned one.
    #[test]
    fn every_intermediate_state_is_safe() {
        let mut rng = StdRng::seed_from_u64(7);
        let pool: Vec<String> = (1..=12).map(|i| format!("10.1.0.{i}")).collect();
        let vips = ["192.0.2.1", "192.0.2.2", "192.0.2.3", "2001:db8::1"];
        let mut cur = State::default();
        for round in 0..60 {
            let mut specs = Vec::new();
            for v in vips {
                if !rng.random_bool(0.8) {
                    continue;
                }
                let mut bs: Vec<(&str, u32)> = Vec::new();
                for b in &pool {
                    if rng.random_bool(0.4) {
                        bs.push((b.as_str(), rng.random_range(0..4)));
                    }
                }
                specs.push(vip(v, &bs));
            }
            let d = desired(specs);
            let (p, next) = plan(&cur, &d, LIMITS).unwrap_or_else(|e| panic!("round {round}: {e}"));
            apply(&mut cur, &p);
            assert_eq!(cur.vips, next.vips, "round {round}");
            assert_eq!(cur.members, next.members, "round {round}");
            assert_eq!(cur.retired, next.retired, "round {round}");
            for (k, v) in &next.vips {
                assert_eq!(
                    cur.rings[&v.id], next.rings[&v.id],
                    "round {round}: table of {k:?}"
                );
            }
        }
    }

    #[test]
    fn limits_and_duplicates_are_errors() {
        let many: Vec<VipSpec> = (0..17).map(|i| vip(&format!("192.0.2.{i}"), &[])).collect();
        assert!(matches!(
            plan(&State::default(), &desired(many), LIMITS),
            Err(PlanError::TooManyVips { .. })
        ));
        let dup = vec![vip("192.0.2.1", &[]), vip("192.0.2.1", &[])];
        assert!(matches!(
            plan(&State::default(), &desired(dup), LIMITS),
            Err(PlanError::DuplicateVip(_))
        ));
        let lots: Vec<(String, u32)> = (0..65).map(|i| (format!("10.2.0.{i}"), 1)).collect();
        let refs: Vec<(&str, u32)> = lots.iter().map(|(a, w)| (a.as_str(), *w)).collect();
        assert!(matches!(
            plan(
                &State::default(),
                &desired(vec![vip("192.0.2.1", &refs)]),
                LIMITS
            ),
            Err(PlanError::TooManyBackends { .. })
        ));
    }

    #[test]
    fn a_vip_can_have_a_smaller_table_and_change_its_size() {
        let mut small = vip("192.0.2.1", &[("10.1.0.1", 1), ("10.1.0.2", 1)]);
        small.table_size = Some(251);
        let (p, next) = plan(&State::default(), &desired(vec![small.clone()]), LIMITS).unwrap();
        let v = *next.vips.values().next().unwrap();
        assert_eq!(v.table_size, 251);
        assert_eq!(next.rings[&v.id].len(), 251);
        let slots: usize = p
            .writes
            .iter()
            .map(|w| match w {
                Write::Slots { slots, .. } => slots.len(),
                Write::Table { table, .. } => table.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(slots, 251, "only the VIP's own table is written");
        let mut s = State::default();
        apply(&mut s, &p);
        assert_eq!(s, next);

        // Growing it to the node's size rewrites the table, and the state read back agrees.
        let mut grown = small.clone();
        grown.table_size = None;
        let (p, next) = plan(&s, &desired(vec![grown]), LIMITS).unwrap();
        assert_eq!(next.rings[&v.id].len(), 1009);
        apply(&mut s, &p);
        assert_eq!(s, next);
        // And shrinking it back.
        let (p, next) = plan(&s, &desired(vec![small.clone()]), LIMITS).unwrap();
        apply(&mut s, &p);
        assert_eq!(s, next);
        assert!(
            plan(&s, &desired(vec![small.clone()]), LIMITS)
                .unwrap()
                .0
                .is_empty()
        );

        let mut big = small;
        big.table_size = Some(1013);
        assert!(matches!(
            plan(&s, &desired(vec![big]), LIMITS),
            Err(PlanError::TableTooLarge {
                size: 1013,
                max: 1009,
                ..
            })
        ));
    }

    fn member_id(s: &State, vip_id: u32, last: u8) -> Option<(u32, Member)> {
        s.members
            .iter()
            .find(|(_, m)| m.vip_id == vip_id && m.addr[3] == last)
            .map(|(id, m)| (*id, *m))
    }

    #[test]
    fn two_vips_sharing_a_backend_get_a_member_each() {
        let d = desired(vec![
            vip("192.0.2.1", &[("10.1.0.1", 1), ("10.1.0.2", 1)]),
            vip("192.0.2.2", &[("10.1.0.1", 1)]),
        ]);
        let (_, s) = plan(&State::default(), &d, LIMITS).unwrap();
        assert_eq!(s.members.len(), 3, "one member per (VIP, backend)");
        let (a, _) = member_id(&s, 0, 1).unwrap();
        let (b, _) = member_id(&s, 1, 1).unwrap();
        assert_ne!(a, b);
        assert!(s.rings[&1].iter().all(|id| id == b));
        assert!(
            !s.rings[&0].contains(b),
            "VIP 0's table names VIP 1's member"
        );
    }

    #[test]
    fn weight_zero_keeps_the_member_but_it_takes_no_new_flows() {
        let d = |w| desired(vec![vip("192.0.2.1", &[("10.1.0.1", 1), ("10.1.0.2", w)])]);
        let (_, s1) = plan(&State::default(), &d(1), LIMITS).unwrap();
        let (p, s2) = plan(&s1, &d(0), LIMITS).unwrap();
        let (id1, m1) = member_id(&s1, 0, 2).unwrap();
        let (id2, m2) = member_id(&s2, 0, 2).unwrap();
        assert_eq!(
            (id1, m1.generation),
            (id2, m2.generation),
            "same allocation"
        );
        assert!(m1.accepts() && !m2.accepts() && m2.is_live());
        assert!(p.writes.contains(&Write::Member {
            id: id2,
            member: m2,
            fresh: false
        }));
    }

    #[test]
    fn a_rejecting_share_is_a_member_with_the_reject_flag_and_its_weight_of_slots() {
        let mut v = vip("192.0.2.1", &[("10.1.0.1", 1)]);
        v.backends.push(BackendSpec::rejecting(true, 2));
        let (_, s) = plan(&State::default(), &desired(vec![v]), LIMITS).unwrap();
        let rejecting: Vec<(u32, Member)> = s
            .members
            .iter()
            .filter(|(_, m)| m.rejects())
            .map(|(id, m)| (*id, *m))
            .collect();
        assert_eq!(rejecting.len(), 1, "{:?}", s.members);
        let (id, m) = rejecting[0];
        assert!(m.is_live() && m.accepts());
        assert_eq!((m.addr, m.port), ([0; 16], 0), "the unspecified address");
        let slots = s.rings[&0].iter().filter(|&x| x == id).count();
        assert!(
            (1009 * 2 / 3 - 1..=1009 * 2 / 3 + 1).contains(&slots),
            "weight 2 of 3: {slots} of 1009 slots"
        );
        let others = s.members.values().filter(|m| !m.rejects()).count();
        assert_eq!(others, 1, "the backend stays an ordinary member");
    }

    #[test]
    fn a_reused_id_gets_a_new_generation_and_fresh_counters() {
        let mut cur = State::default();
        let (p, _) = plan(
            &cur,
            &desired(vec![vip("192.0.2.1", &[("10.1.0.1", 1), ("10.1.0.2", 1)])]),
            LIMITS,
        )
        .unwrap();
        apply(&mut cur, &p);
        let (old_id, old) = member_id(&cur, 0, 2).unwrap();
        // Remove 10.1.0.2, reconcile; add a backend to another VIP, reconcile.
        let one = vip("192.0.2.1", &[("10.1.0.1", 1)]);
        let (p, _) = plan(&cur, &desired(vec![one.clone()]), LIMITS).unwrap();
        apply(&mut cur, &p);
        assert_eq!(cur.retired.get(&old_id), Some(&old.generation));
        let (p, next) = plan(
            &cur,
            &desired(vec![one, vip("192.0.2.2", &[("10.1.0.9", 1)])]),
            LIMITS,
        )
        .unwrap();
        apply(&mut cur, &p);
        let (new_id, new) = member_id(&next, 1, 9).unwrap();
        assert_eq!(new_id, old_id, "the lowest free id is reused");
        assert_eq!(new.generation, old.generation + 1);
        assert!(p.writes.contains(&Write::Member {
            id: new_id,
            member: new,
            fresh: true
        }));
        assert_eq!(cur, next);
    }

    #[test]
    fn replacing_every_backend_at_full_capacity_succeeds() {
        let limits = Limits {
            max_backends: 4,
            ..LIMITS
        };
        let before = desired(vec![vip(
            "192.0.2.1",
            &[
                ("10.1.0.1", 1),
                ("10.1.0.2", 1),
                ("10.1.0.3", 1),
                ("10.1.0.4", 1),
            ],
        )]);
        let after = desired(vec![vip(
            "192.0.2.1",
            &[
                ("10.2.0.1", 1),
                ("10.2.0.2", 1),
                ("10.2.0.3", 1),
                ("10.2.0.4", 1),
            ],
        )]);
        let mut cur = State::default();
        let (p, _) = plan(&cur, &before, limits).unwrap();
        apply(&mut cur, &p);
        let gens: BTreeMap<u32, u32> = cur
            .members
            .iter()
            .map(|(id, m)| (*id, m.generation))
            .collect();
        let (p, next) = plan(&cur, &after, limits).expect("replacing all at capacity");
        for w in &p.writes {
            apply_to_state(&mut cur, w, limits.table_size);
        }
        assert_eq!(cur, next);
        assert_eq!(next.members.len(), 4);
        for (id, m) in &next.members {
            assert_eq!(m.addr[1], 2, "member {id} is a newcomer");
            assert_eq!(
                m.generation,
                gens[id] + 1,
                "member {id} got a new generation"
            );
        }
        consistent(&cur).unwrap();
    }

    fn with_ranges(mut v: VipSpec, ranges: &[&str]) -> VipSpec {
        v.source_ranges = Some(
            ranges
                .iter()
                .map(|r| crate::model::desired::Cidr::parse(r, true).unwrap())
                .collect(),
        );
        v
    }

    /// The entry of range `a/bits` of VIP id `vip_id`, written out by hand.
    fn range(vip_id: u32, a: &str, bits: u32) -> SrcRange {
        let (addr, _) = addr16(a.parse().unwrap());
        SrcRange { vip_id, bits, addr }
    }

    #[test]
    fn source_ranges_set_the_vip_flag_and_are_written_before_the_vip() {
        let d = desired(vec![with_ranges(
            vip("192.0.2.1", &[("10.1.0.1", 1)]),
            &["198.51.100.0/24", "203.0.113.7/32"],
        )]);
        let (p, next) = plan(&State::default(), &d, LIMITS).unwrap();
        let v = next.vips.values().next().unwrap();
        assert_eq!(v.flags, VIP_F_SOURCE_RANGES);
        let want = [range(0, "198.51.100.0", 24), range(0, "203.0.113.7", 32)];
        assert_eq!(next.src_ranges.iter().copied().collect::<Vec<_>>(), want);
        let at = |f: &dyn Fn(&Write) -> bool| p.writes.iter().position(f).unwrap();
        let vip_at = at(&|w| matches!(w, Write::Vip { .. }));
        for r in want {
            assert!(
                at(&|w| *w == Write::SrcRange(r)) < vip_at,
                "{r:?} after the VIP"
            );
        }
    }

    #[test]
    fn a_change_of_ranges_writes_only_ranges_adding_before_removing() {
        let base = vip("192.0.2.1", &[("10.1.0.1", 1), ("10.1.0.2", 1)]);
        let before = desired(vec![with_ranges(
            base.clone(),
            &["198.51.100.0/24", "203.0.113.0/24"],
        )]);
        let after = desired(vec![with_ranges(
            base,
            &["203.0.113.0/24", "192.0.2.128/25"],
        )]);
        let (_, s) = plan(&State::default(), &before, LIMITS).unwrap();
        let (p, next) = plan(&s, &after, LIMITS).unwrap();
        // No VIP, member or slot write: flows of sources still allowed see no change.
        assert_eq!(
            p.writes,
            [
                Write::SrcRange(range(0, "192.0.2.128", 25)),
                Write::RemoveSrcRange(range(0, "198.51.100.0", 24)),
            ]
        );
        assert_eq!(next.vips, s.vips);
    }

    #[test]
    fn dropping_every_range_clears_the_flag_before_the_ranges_go() {
        let base = vip("192.0.2.1", &[("10.1.0.1", 1)]);
        let (_, s) = plan(
            &State::default(),
            &desired(vec![with_ranges(base.clone(), &["198.51.100.0/24"])]),
            LIMITS,
        )
        .unwrap();
        let (p, next) = plan(&s, &desired(vec![base]), LIMITS).unwrap();
        let v = *next.vips.values().next().unwrap();
        assert_eq!(v.flags, 0);
        assert_eq!(
            p.writes,
            [
                Write::Vip {
                    key: *next.vips.keys().next().unwrap(),
                    value: v
                },
                Write::RemoveSrcRange(range(0, "198.51.100.0", 24)),
            ]
        );
    }

    #[test]
    fn ranges_of_the_other_family_only_refuse_every_source() {
        // What Kubernetes gives a dual-stack Service with IPv6 ranges only: its IPv4 VIP
        // takes no IPv4 source (the flag, and no entry of its family).
        let d = desired(vec![with_ranges(
            vip("192.0.2.1", &[("10.1.0.1", 1)]),
            &["2001:db8::/32"],
        )]);
        let (_, next) = plan(&State::default(), &d, LIMITS).unwrap();
        assert_eq!(
            next.vips.values().next().unwrap().flags,
            VIP_F_SOURCE_RANGES
        );
        assert!(next.src_ranges.is_empty());
    }

    fn with_port_range(mut v: VipSpec, lo: u16, hi: u16) -> VipSpec {
        v.port = 0;
        v.port_range = Some(PortRange { lo, hi });
        v
    }

    #[test]
    fn a_port_range_vip_is_written_changed_and_removed_as_range_writes() {
        let range = with_port_range(vip("192.0.2.1", &[("10.1.0.1", 1)]), 10000, 10999);
        let key = range.key();
        let (p, s1) = plan(&State::default(), &desired(vec![range.clone()]), LIMITS).unwrap();
        assert!(
            p.writes.iter().any(
                |w| matches!(w, Write::VipRange { key: k, range: r, old: None, .. }
                if *k == key && *r == PortRange { lo: 10000, hi: 10999 })
            ),
            "{:?}",
            p.writes
        );
        assert!(!p.writes.iter().any(|w| matches!(w, Write::Vip { .. })));
        assert_eq!(
            s1.port_ranges.get(&key),
            Some(&PortRange {
                lo: 10000,
                hi: 10999
            })
        );
        // Narrowed: the same VIP (its id kept), its old range said.
        let narrowed = with_port_range(range.clone(), 10000, 10499);
        let (p, s2) = plan(&s1, &desired(vec![narrowed]), LIMITS).unwrap();
        assert_eq!(s2.vips[&key].id, s1.vips[&key].id);
        let vip_writes: Vec<&Write> = p
            .writes
            .iter()
            .filter(|w| matches!(w, Write::VipRange { .. } | Write::Vip { .. }))
            .collect();
        assert_eq!(
            vip_writes,
            [&Write::VipRange {
                key,
                range: PortRange {
                    lo: 10000,
                    hi: 10499
                },
                old: Some(PortRange {
                    lo: 10000,
                    hi: 10999
                }),
                value: s2.vips[&key],
            }]
        );
        // Gone: removed as a range, and the state the writes lead to is the plan's.
        let (p, s3) = plan(&s2, &desired(vec![]), LIMITS).unwrap();
        assert!(p.writes.contains(&Write::RemoveVipRange {
            key,
            range: PortRange {
                lo: 10000,
                hi: 10499
            }
        }));
        let mut applied = s2.clone();
        for w in &p.writes {
            apply_to_state(&mut applied, w, LIMITS.table_size);
        }
        assert!(applied.port_ranges.is_empty() && applied.vips.is_empty());
        assert!(s3.port_ranges.is_empty());
    }

    #[test]
    fn port_ranges_of_more_keys_than_the_trie_holds_are_an_error() {
        // 1-65534 takes 30 keys: 137 of them take 4,110.
        let vips: Vec<VipSpec> = (0..137)
            .map(|i| {
                let a = format!("192.0.{}.{}", 2 + i / 200, 1 + i % 200);
                with_port_range(vip(&a, &[]), 1, 65534)
            })
            .collect();
        let limits = Limits {
            max_vips: 200,
            ..LIMITS
        };
        assert_eq!(
            plan(&State::default(), &desired(vips), limits).unwrap_err(),
            PlanError::TooManyPortRangeKeys {
                wanted: 137 * 30,
                max: lb_common::maps::MAX_VIP_RANGE_KEYS
            }
        );
    }

    #[test]
    fn more_source_ranges_than_the_trie_holds_are_an_error() {
        let max = lb_common::maps::MAX_SOURCE_RANGES as usize;
        let many: Vec<String> = (0..=max)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let d = desired(vec![with_ranges(
            vip("192.0.2.1", &[("10.1.0.1", 1)]),
            &refs,
        )]);
        assert_eq!(
            plan(&State::default(), &d, LIMITS).unwrap_err(),
            PlanError::TooManySourceRanges {
                wanted: max + 1,
                max: max as u32
            }
        );
    }

    #[test]
    fn least_connections_sets_the_vip_flag_and_maglev_does_not() {
        let mut lc = vip("192.0.2.1", &[("10.1.0.1", 1)]);
        lc.algorithm = Algorithm::LeastConnections;
        let d = desired(vec![lc, vip("192.0.2.2", &[("10.1.0.1", 1)])]);
        let (_, next) = plan(&State::default(), &d, LIMITS).unwrap();
        let flags: Vec<u32> = next.vips.values().map(|v| v.flags).collect();
        assert_eq!(flags, [VIP_F_LEAST_CONN, 0]);
    }

    fn with_budget(mut v: VipSpec, rate: u64, burst: u64) -> VipSpec {
        v.new_flow_budget = Some(crate::model::desired::Budget { rate, burst });
        v
    }

    #[test]
    fn a_budget_sets_the_vip_flag_and_each_cpus_share_is_written_before_the_vip() {
        let d = desired(vec![with_budget(
            vip("192.0.2.1", &[("10.1.0.1", 1)]),
            1_000,
            10,
        )]);
        let (p, next) = plan(&State::default(), &d, LIMITS).unwrap();
        let v = next.vips.values().next().unwrap();
        assert_eq!(v.flags, VIP_F_NEW_FLOW_BUDGET);
        // 1000/s over LIMITS' 2 CPUs: 500/s each, a token every 2 ms; a burst of 10: 5 each.
        let share = BudgetShare {
            ns_per_token: 2_000_000,
            burst: 5,
        };
        assert_eq!(next.budgets.get(&0), Some(&share));
        let at = |f: &dyn Fn(&Write) -> bool| p.writes.iter().position(f).unwrap();
        assert!(
            at(&|w| *w == Write::Budget { vip_id: 0, share })
                < at(&|w| matches!(w, Write::Vip { .. })),
            "the budget after the VIP"
        );
    }

    #[test]
    fn an_unchanged_budget_writes_nothing_and_a_changed_one_only_its_buckets() {
        let base = vip("192.0.2.1", &[("10.1.0.1", 1), ("10.1.0.2", 1)]);
        let (_, s) = plan(
            &State::default(),
            &desired(vec![with_budget(base.clone(), 1_000, 10)]),
            LIMITS,
        )
        .unwrap();
        let (p, _) = plan(
            &s,
            &desired(vec![with_budget(base.clone(), 1_000, 10)]),
            LIMITS,
        )
        .unwrap();
        assert!(p.is_empty(), "a resync rewrote {:?}", p.writes);
        let (p, next) = plan(&s, &desired(vec![with_budget(base, 2_000, 10)]), LIMITS).unwrap();
        assert_eq!(
            p.writes,
            [Write::Budget {
                vip_id: 0,
                share: BudgetShare {
                    ns_per_token: 1_000_000,
                    burst: 5
                }
            }]
        );
        assert_eq!(next.vips, s.vips, "no VIP, member or slot write");
    }

    #[test]
    fn removing_a_budget_clears_the_flag_before_the_buckets() {
        let base = vip("192.0.2.1", &[("10.1.0.1", 1)]);
        let (_, s) = plan(
            &State::default(),
            &desired(vec![with_budget(base.clone(), 100, 100)]),
            LIMITS,
        )
        .unwrap();
        let (p, next) = plan(&s, &desired(vec![base]), LIMITS).unwrap();
        assert_eq!(next.vips.values().next().unwrap().flags, 0);
        assert!(next.budgets.is_empty());
        let at = |f: &dyn Fn(&Write) -> bool| p.writes.iter().position(f).unwrap();
        assert!(
            at(&|w| matches!(w, Write::Vip { .. }))
                < at(&|w| *w == Write::RemoveBudget { vip_id: 0 }),
            "{:?}",
            p.writes
        );
        let mut cur = s.clone();
        apply(&mut cur, &p);
        assert_eq!(cur, next);
    }
}
