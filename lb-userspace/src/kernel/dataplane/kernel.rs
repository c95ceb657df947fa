//! The dataplane in the kernel: the loaded program's maps.

use std::os::fd::AsFd as _;

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, PerCpuArray, PerCpuValues, lpm_trie::Key},
};
use lb_common::{
    Member, NewFlowBudget, NodeConfig, PassiveHealth, SrcRangeKey, TrafficStats, VipAddr, VipKey,
    VipRangeKey, VipValue, hash::vip_filter_slot, maps,
};

use super::{Dataplane, DataplaneError};
use crate::{
    kernel::program::Sizes,
    kernel::ring::Ring,
    model::plan::{BudgetShare, Limits, Plan, SrcRange, State, Write, known_family},
    model::table::Table,
};

pub struct KernelDataplane {
    pub ebpf: Ebpf,
    sizes: Sizes,
    /// The VIP addresses by the word of the VIP-address filter they set (read from the maps
    /// at the first removal), so a removal recomputes its word without walking the map.
    filter_words: Option<std::collections::BTreeMap<u32, std::collections::BTreeSet<VipAddr>>>,
    /// How the program is attached to each interface, as the last [`crate::kernel::links::sync`]
    /// chose (for the status file).
    pub xdp: Vec<crate::kernel::xdpmode::Choice>,
}

fn io(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl KernelDataplane {
    /// Wraps a loaded program (see [`crate::kernel::program::load`]).
    pub fn new(ebpf: Ebpf, sizes: Sizes) -> Result<Self, DataplaneError> {
        let dp = Self {
            ebpf,
            sizes,
            filter_words: None,
            xdp: vec![],
        };
        // A table's window maps (checked here, not at the first write).
        dp.ring(0, 1, true)?;
        Ok(dp)
    }

    /// Writes whole tables (a run of a plan's [`Write::Table`]s) on every CPU: the tables of
    /// different VIPs are disjoint parts of the ring, and a plan does not order them among
    /// themselves. Each thread maps one table's window at a time.
    fn fill_tables(&self, writes: &[Write]) -> Result<(), DataplaneError> {
        let tables: Vec<(u32, &Table)> = writes
            .iter()
            .filter_map(|w| match w {
                Write::Table { vip_id, table } => Some((*vip_id, &**table)),
                _ => None,
            })
            .collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_thread = tables.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = tables
                .chunks(per_thread)
                .map(|chunk| {
                    s.spawn(move || {
                        chunk.iter().try_for_each(|(id, table)| {
                            self.ring(*id, table.len(), true).map(|mut r| r.fill(table))
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("a table write panicked"))
        })
    }

    /// Range VIP `key`'s blocks of `range` with `value`, then the blocks of `old` it lost.
    fn write_vip_range(
        &mut self,
        key: &VipKey,
        range: crate::model::desired::PortRange,
        old: Option<crate::model::desired::PortRange>,
        value: &VipValue,
    ) -> Result<(), DataplaneError> {
        let label = crate::model::desired::range_label(key, range);
        let mut t: LpmTrie<_, VipRangeKey, VipValue> =
            LpmTrie::try_from(self.map_mut(maps::VIP_RANGES)?).map_err(werr(maps::VIP_RANGES))?;
        for (len, data) in crate::model::port_ranges::blocks(key, range) {
            t.insert(&Key::new(len, data), value, 0)
                .map_err(werr(label.clone()))?;
        }
        match old {
            Some(old) => {
                self.remove_range_blocks(crate::model::port_ranges::stale_blocks(key, old, range))
            }
            None => Ok(()),
        }
    }

    /// Removes `LB_VIP_RANGES` blocks (gone already is no error: a retried plan).
    fn remove_range_blocks(
        &mut self,
        blocks: impl Iterator<Item = (u32, VipRangeKey)>,
    ) -> Result<(), DataplaneError> {
        let mut t: LpmTrie<_, VipRangeKey, VipValue> =
            LpmTrie::try_from(self.map_mut(maps::VIP_RANGES)?).map_err(werr(maps::VIP_RANGES))?;
        for (len, data) in blocks {
            match t.remove(&Key::new(len, data)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                r => r.map_err(werr(maps::VIP_RANGES))?,
            }
        }
        Ok(())
    }

    fn remove_src_range(&mut self, r: &SrcRange) -> Result<(), DataplaneError> {
        let (len, data) = r.key();
        let mut t: LpmTrie<_, SrcRangeKey, u32> =
            LpmTrie::try_from(self.map_mut(maps::SRC_RANGES)?).map_err(werr(maps::SRC_RANGES))?;
        match t.remove(&Key::new(len, data)) {
            // Gone already (a retried plan).
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            r => r.map_err(werr(maps::SRC_RANGES)),
        }
    }

    /// Sets (slot, member id) pairs of VIP id `vip_id`'s table.
    fn write_slots(&self, vip_id: u32, slots: &[(u32, u32)]) -> Result<(), DataplaneError> {
        let len = slots
            .iter()
            .map(|(s, _)| *s as usize + 1)
            .max()
            .unwrap_or(0);
        let mut ring = self.ring(vip_id, len, true)?;
        for (slot, b) in slots {
            ring.set(*slot as usize, *b);
        }
        Ok(())
    }

    /// The `len` slots of VIP id `vip_id`'s table in the ring, mapped while the window lives.
    fn ring(&self, vip_id: u32, len: usize, writable: bool) -> Result<Ring, DataplaneError> {
        let what = || format!("the table of VIP id {vip_id}");
        let err = |source| match writable {
            true => DataplaneError::Write {
                what: what(),
                source,
            },
            false => DataplaneError::Read {
                what: what(),
                source,
            },
        };
        let m = self.sizes.table_size as usize;
        if vip_id >= self.sizes.max_vips || len > m {
            return Err(err(io("beyond the ring (max_vips x table_size)")));
        }
        let Some(Map::Array(data)) = self.ebpf.map(maps::RING) else {
            return Err(err(io("no LB_RING array")));
        };
        Ring::window(data, vip_id as usize * m, len, writable).map_err(err)
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut Map, DataplaneError> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| DataplaneError::Write {
                what: name.into(),
                source: io("no such map"),
            })
    }

    /// Passive health counters of member `id` (NAT mode).
    pub fn passive(&self, id: u32) -> Result<PassiveHealth, DataplaneError> {
        let a: Array<_, PassiveHealth> =
            Array::try_from(self.map(maps::MEMBER_PASSIVE)?).map_err(rerr(maps::MEMBER_PASSIVE))?;
        a.get(&id, 0)
            .map_err(rerr(format!("passive health of member {id}")))
    }

    /// Sets the passive-health failure threshold of member `id` (0: none) in `LB_MEMBER_HOLD`,
    /// which also clears the time the program noted there.
    pub fn set_member_hold(&mut self, id: u32, failures: u32) -> Result<(), DataplaneError> {
        let mut a: Array<_, u64> =
            Array::try_from(self.map_mut(maps::MEMBER_HOLD)?).map_err(werr(maps::MEMBER_HOLD))?;
        a.set(id, u64::from(failures), 0)
            .map_err(werr(format!("the passive-health threshold of member {id}")))
    }

    /// Starts member `id`'s failure streak afresh (when its backend is brought back in).
    pub fn reset_passive_streak(&mut self, id: u32) -> Result<(), DataplaneError> {
        let mut a: Array<_, PassiveHealth> = Array::try_from(self.map_mut(maps::MEMBER_PASSIVE)?)
            .map_err(werr(maps::MEMBER_PASSIVE))?;
        let mut p = a
            .get(&id, 0)
            .map_err(werr(format!("passive health of member {id}")))?;
        p.consecutive_failures = 0;
        a.set(id, p, 0)
            .map_err(werr(format!("passive health of member {id}")))
    }

    /// Zeroes member `id`'s traffic counters (on every CPU) and passive health: a new
    /// allocation of the id starts from nothing.
    fn reset_member_counters(&mut self, id: u32) -> Result<(), DataplaneError> {
        let stats_err = |source| DataplaneError::Write {
            what: format!("counters of member {id}"),
            source,
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| stats_err(e))?;
        for map in [maps::MEMBER_STATS, maps::MEMBER_REPLY_STATS] {
            let zeros =
                PerCpuValues::try_from(vec![TrafficStats::default(); cpus]).map_err(stats_err)?;
            let mut st: PerCpuArray<_, TrafficStats> =
                PerCpuArray::try_from(self.map_mut(map)?).map_err(werr(map))?;
            st.set(id, zeros, 0)
                .map_err(werr(format!("counters of member {id}")))?;
        }
        let mut p: Array<_, PassiveHealth> = Array::try_from(self.map_mut(maps::MEMBER_PASSIVE)?)
            .map_err(werr(maps::MEMBER_PASSIVE))?;
        p.set(id, PassiveHealth::default(), 0)
            .map_err(werr(format!("passive health of member {id}")))
    }

    /// Publishes a run of members (a plan's first step) with a few batch calls instead of up
    /// to four system calls a member: the counters and passive health of the fresh ones
    /// zeroed first, then every member. The members of a run are independent of each other:
    /// no slot points at a fresh one before the run ends.
    fn publish_members(&mut self, writes: &[Write]) -> Result<(), DataplaneError> {
        let mut fresh = Vec::new();
        let mut members = Vec::with_capacity(writes.len());
        for w in writes {
            if let Write::Member {
                id,
                member,
                fresh: f,
            } = w
            {
                if *f {
                    fresh.push(*id);
                }
                members.push((*id, *member));
            }
        }
        if !fresh.is_empty() {
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Write {
                what: "counters of new members".into(),
                source: e,
            })?;
            // A per-CPU value is each CPU's, at 8-byte strides.
            let stats = vec![0u8; cpus * size_of::<TrafficStats>().next_multiple_of(8)];
            let passive = vec![0u8; size_of::<PassiveHealth>()];
            for (map, zeros) in [
                (maps::MEMBER_STATS, &stats),
                (maps::MEMBER_REPLY_STATS, &stats),
                (maps::MEMBER_PASSIVE, &passive),
            ] {
                let entries: Vec<([u8; 4], &[u8])> = fresh
                    .iter()
                    .map(|id| (id.to_ne_bytes(), zeros.as_slice()))
                    .collect();
                self.update_batch(map, &entries)?;
            }
        }
        let entries: Vec<([u8; 4], &[u8])> = members
            .iter()
            .map(|(id, m)| (id.to_ne_bytes(), pod_bytes(m)))
            .collect();
        self.update_batch(maps::MEMBERS, &entries)
    }

    /// Writes (key, value) entries into the array `name` in batches (`BPF_MAP_UPDATE_BATCH`).
    fn update_batch(&self, name: &str, entries: &[([u8; 4], &[u8])]) -> Result<(), DataplaneError> {
        let data = match self.map(name)? {
            Map::Array(d) | Map::PerCpuArray(d) => d,
            _ => {
                return Err(DataplaneError::Write {
                    what: name.into(),
                    source: io("not an array"),
                });
            }
        };
        let Some(value_size) = entries.first().map(|(_, v)| v.len()) else {
            return Ok(());
        };
        let refs: Vec<(&[u8], &[u8])> = entries.iter().map(|(k, v)| (&k[..], *v)).collect();
        crate::kernel::migrate::batch::update_all(data.fd().as_fd(), 4, value_size, &refs).map_err(
            |e| DataplaneError::Write {
                what: format!("{} entries of {name}", entries.len()),
                source: e,
            },
        )
    }

    /// Writes `entry` into every CPU's bucket of VIP id `vip_id` (`LB_NEW_FLOW_BUDGET`).
    fn set_budget(&mut self, vip_id: u32, entry: NewFlowBudget) -> Result<(), DataplaneError> {
        let what = || format!("new-flow budget of VIP id {vip_id}");
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Write {
            what: what(),
            source: e,
        })?;
        let values =
            PerCpuValues::try_from(vec![entry; cpus]).map_err(|e| DataplaneError::Write {
                what: what(),
                source: e,
            })?;
        let mut a: PerCpuArray<_, NewFlowBudget> =
            PerCpuArray::try_from(self.map_mut(maps::NEW_FLOW_BUDGET)?)
                .map_err(werr(maps::NEW_FLOW_BUDGET))?;
        a.set(vip_id, values, 0).map_err(werr(what()))
    }

    fn set_member(&mut self, id: u32, m: &Member) -> Result<(), DataplaneError> {
        let mut a: Array<_, Member> =
            Array::try_from(self.map_mut(maps::MEMBERS)?).map_err(werr(maps::MEMBERS))?;
        a.set(id, m, 0).map_err(werr(format!("member {id}")))
    }

    /// Sets VIP address `addr`'s bit in the VIP-address filter.
    fn set_filter_bit(&mut self, addr: &VipAddr) -> Result<(), DataplaneError> {
        let (word, bit) = vip_filter_slot(&addr.addr, addr.family);
        if let Some(words) = &mut self.filter_words {
            words.entry(word).or_default().insert(*addr);
        }
        let mut f: Array<_, u64> =
            Array::try_from(self.map_mut(maps::VIP_FILTER)?).map_err(werr(maps::VIP_FILTER))?;
        let w = f.get(&word, 0).map_err(rerr(maps::VIP_FILTER))?;
        if w & bit == 0 {
            f.set(word, w | bit, 0).map_err(werr(maps::VIP_FILTER))?;
        }
        Ok(())
    }

    /// Recomputes the filter word of (removed) address `gone` from the addresses that still
    /// carry VIPs: a bit stays set while any of them uses it.
    fn rebuild_filter_word(&mut self, gone: &VipAddr) -> Result<(), DataplaneError> {
        if self.filter_words.is_none() {
            let addrs: HashMap<_, VipAddr, u32> =
                HashMap::try_from(self.map(maps::VIP_ADDRS)?).map_err(rerr(maps::VIP_ADDRS))?;
            let mut words = std::collections::BTreeMap::<u32, std::collections::BTreeSet<_>>::new();
            for k in addrs.keys() {
                let k = k.map_err(rerr(maps::VIP_ADDRS))?;
                words
                    .entry(vip_filter_slot(&k.addr, k.family).0)
                    .or_default()
                    .insert(k);
            }
            self.filter_words = Some(words);
        }
        let (word, _) = vip_filter_slot(&gone.addr, gone.family);
        let words = self.filter_words.as_mut().expect("built above");
        let left = words.entry(word).or_default();
        left.remove(gone);
        let bits = left
            .iter()
            .fold(0u64, |b, a| b | vip_filter_slot(&a.addr, a.family).1);
        let mut f: Array<_, u64> =
            Array::try_from(self.map_mut(maps::VIP_FILTER)?).map_err(werr(maps::VIP_FILTER))?;
        f.set(word, bits, 0).map_err(werr(maps::VIP_FILTER))
    }

    fn map(&self, name: &str) -> Result<&Map, DataplaneError> {
        self.ebpf.map(name).ok_or_else(|| DataplaneError::Read {
            what: name.into(),
            source: io("no such map"),
        })
    }
}

/// The bytes of a map value (`#[repr(C)]`, padding-free: see `lb_common::types`).
fn pod_bytes<T: aya::Pod>(v: &T) -> &[u8] {
    // SAFETY: a Pod type has no padding and every byte is initialised.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

fn werr(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    let what = what.into();
    move |e| DataplaneError::Write {
        what,
        source: io(e),
    }
}

fn rerr(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    let what = what.into();
    move |e| DataplaneError::Read {
        what,
        source: io(e),
    }
}

impl Dataplane for KernelDataplane {
    fn limits(&self) -> Limits {
        self.sizes.limits()
    }

    fn read(&self) -> Result<State, DataplaneError> {
        let mut s = State::default();
        let node: Array<_, NodeConfig> =
            Array::try_from(self.map(maps::NODE)?).map_err(rerr(maps::NODE))?;
        s.node = node.get(&0, 0).map_err(rerr(maps::NODE))?;
        let vips: HashMap<_, VipKey, VipValue> =
            HashMap::try_from(self.map(maps::VIPS)?).map_err(rerr(maps::VIPS))?;
        for kv in vips.iter() {
            let (k, v) = kv.map_err(rerr(maps::VIPS))?;
            s.vips.insert(k, v);
        }
        let vip_ranges: LpmTrie<_, VipRangeKey, VipValue> =
            LpmTrie::try_from(self.map(maps::VIP_RANGES)?).map_err(rerr(maps::VIP_RANGES))?;
        let mut blocks = Vec::new();
        for kv in vip_ranges.iter() {
            let (k, v) = kv.map_err(rerr(maps::VIP_RANGES))?;
            blocks.push((k.prefix_len(), k.data(), v));
        }
        for (key, (range, value)) in crate::model::port_ranges::of_blocks(blocks) {
            s.vips.insert(key, value);
            s.port_ranges.insert(key, range);
        }
        let addrs: HashMap<_, VipAddr, u32> =
            HashMap::try_from(self.map(maps::VIP_ADDRS)?).map_err(rerr(maps::VIP_ADDRS))?;
        for kv in addrs.iter() {
            let (k, v) = kv.map_err(rerr(maps::VIP_ADDRS))?;
            s.vip_addrs.insert(k, v);
        }
        let members: Array<_, Member> =
            Array::try_from(self.map(maps::MEMBERS)?).map_err(rerr(maps::MEMBERS))?;
        for (id, m) in members.iter().enumerate() {
            let m = m.map_err(rerr(maps::MEMBERS))?;
            if m.is_live() && known_family(m.family) {
                s.members.insert(id as u32, m);
            } else if m.generation != 0 {
                s.retired.insert(id as u32, m.generation);
            }
        }
        let ranges: LpmTrie<_, SrcRangeKey, u32> =
            LpmTrie::try_from(self.map(maps::SRC_RANGES)?).map_err(rerr(maps::SRC_RANGES))?;
        for k in ranges.keys() {
            let k = k.map_err(rerr(maps::SRC_RANGES))?;
            if let Some(r) = SrcRange::of_key(k.prefix_len(), &k.data()) {
                s.src_ranges.insert(r);
            }
        }
        let budgets: PerCpuArray<_, NewFlowBudget> =
            PerCpuArray::try_from(self.map(maps::NEW_FLOW_BUDGET)?)
                .map_err(rerr(maps::NEW_FLOW_BUDGET))?;
        for v in s.vips.values().filter(|v| v.id < self.sizes.max_vips) {
            // Every CPU's entry has the agent's settings: the first CPU's say them.
            let e = budgets.get(&v.id, 0).map_err(rerr(maps::NEW_FLOW_BUDGET))?;
            if let Some(share) = e.first().and_then(BudgetShare::of_entry) {
                s.budgets.insert(v.id, share);
            }
        }
        for v in s.vips.values().filter(|v| v.id < self.sizes.max_vips) {
            let ring = self.ring(v.id, v.table_size_of(self.sizes.table_size) as usize, false)?;
            let slots: Vec<u32> = (0..ring.len()).map(|i| ring.get(i)).collect();
            s.rings
                .insert(v.id, std::sync::Arc::new(Table::new(&slots)));
        }
        Ok(s)
    }

    /// Performs a plan's writes in order, a run of whole tables on every CPU (a full sync
    /// writes every slot of the ring).
    fn apply(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        let mut rest = &plan.writes[..];
        while let Some(w) = rest.first() {
            let run = rest
                .iter()
                .take_while(|w| matches!(w, Write::Table { .. }))
                .count();
            let members = rest
                .iter()
                .take_while(|w| matches!(w, Write::Member { .. }))
                .count();
            if run > 1 {
                self.fill_tables(&rest[..run])?;
                rest = &rest[run..];
            } else if members > 1 {
                self.publish_members(&rest[..members])?;
                rest = &rest[members..];
            } else {
                self.write(w)?;
                rest = &rest[1..];
            }
        }
        Ok(())
    }

    fn write(&mut self, w: &Write) -> Result<(), DataplaneError> {
        match w {
            Write::Node(n) => {
                let mut a: Array<_, NodeConfig> =
                    Array::try_from(self.map_mut(maps::NODE)?).map_err(werr(maps::NODE))?;
                a.set(0, n, 0).map_err(werr(maps::NODE))
            }
            Write::Member { id, member, fresh } => {
                if *fresh {
                    self.reset_member_counters(*id)?;
                }
                self.set_member(*id, member)
            }
            Write::RetireMember { id, generation } => {
                let retired = Member {
                    generation: *generation,
                    ..Default::default()
                };
                self.set_member(*id, &retired)
            }
            Write::VipAddr { addr, count } => {
                // The filter first: from then on the program looks the address up.
                self.set_filter_bit(addr)?;
                let mut h: HashMap<_, VipAddr, u32> =
                    HashMap::try_from(self.map_mut(maps::VIP_ADDRS)?)
                        .map_err(werr(maps::VIP_ADDRS))?;
                h.insert(addr, count, 0).map_err(werr(maps::VIP_ADDRS))
            }
            Write::RemoveVipAddr { addr } => {
                let mut h: HashMap<_, VipAddr, u32> =
                    HashMap::try_from(self.map_mut(maps::VIP_ADDRS)?)
                        .map_err(werr(maps::VIP_ADDRS))?;
                match h.remove(addr) {
                    // Gone already (a retried plan): still rebuild its word.
                    Err(aya::maps::MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                    r => r.map_err(werr(maps::VIP_ADDRS))?,
                }
                self.rebuild_filter_word(addr)
            }
            Write::Slots { vip_id, slots } => self.write_slots(*vip_id, slots),
            Write::Table { vip_id, table } => {
                self.ring(*vip_id, table.len(), true)?.fill(table);
                Ok(())
            }
            Write::Vip { key, value } => {
                let mut h: HashMap<_, VipKey, VipValue> =
                    HashMap::try_from(self.map_mut(maps::VIPS)?).map_err(werr(maps::VIPS))?;
                h.insert(key, value, 0)
                    .map_err(werr(crate::model::desired::vip_label(key)))
            }
            Write::RemoveVip { key } => {
                let mut h: HashMap<_, VipKey, VipValue> =
                    HashMap::try_from(self.map_mut(maps::VIPS)?).map_err(werr(maps::VIPS))?;
                h.remove(key)
                    .map_err(werr(crate::model::desired::vip_label(key)))
            }
            Write::VipRange {
                key,
                range,
                old,
                value,
            } => self.write_vip_range(key, *range, *old, value),
            Write::RemoveVipRange { key, range } => {
                let gone = crate::model::port_ranges::blocks(key, *range);
                self.remove_range_blocks(gone.into_iter())
            }
            Write::SrcRange(r) => {
                let (len, data) = r.key();
                let mut t: LpmTrie<_, SrcRangeKey, u32> =
                    LpmTrie::try_from(self.map_mut(maps::SRC_RANGES)?)
                        .map_err(werr(maps::SRC_RANGES))?;
                t.insert(&Key::new(len, data), 1, 0)
                    .map_err(werr(format!("source range of VIP id {}", r.vip_id)))
            }
            Write::RemoveSrcRange(r) => self.remove_src_range(r),
            Write::Budget { vip_id, share } => self.set_budget(*vip_id, share.entry()),
            Write::RemoveBudget { vip_id } => self.set_budget(*vip_id, NewFlowBudget::default()),
        }
    }
}

/// Next hops are written by [`crate::kernel::nexthop::Keeper`] from the routes, not by the planner.
impl crate::kernel::nexthop::NexthopMap for KernelDataplane {
    /// Member `id`'s next hop as `LB_NEXTHOPS` holds it.
    fn nexthop(&self, id: u32) -> Result<lb_common::NextHop, DataplaneError> {
        let a: Array<_, lb_common::NextHop> =
            Array::try_from(self.map(maps::NEXTHOPS)?).map_err(rerr(maps::NEXTHOPS))?;
        a.get(&id, 0)
            .map_err(rerr(format!("next hop of member {id}")))
    }

    /// Writes member `id`'s next hop (not a planner write: the routes decide it, not the config).
    fn set_nexthop(&mut self, id: u32, nh: &lb_common::NextHop) -> Result<(), DataplaneError> {
        let mut a: Array<_, lb_common::NextHop> =
            Array::try_from(self.map_mut(maps::NEXTHOPS)?).map_err(werr(maps::NEXTHOPS))?;
        a.set(id, nh, 0)
            .map_err(werr(format!("next hop of member {id}")))
    }
}
