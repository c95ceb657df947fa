//! Plans that cost what changed: the planner remembers what each VIP was last planned from, so
//! a resync re-plans only the VIPs whose spec differs (and those that went), and one with
//! nothing changed compares the specs and stops.
//!
//! The first plan, and the first after [`Planner::reset`] (maps read back after a failed write,
//! other maps after a migration), plans every VIP with [`plan::plan`]: the state it starts from
//! may hold members and tables no spec accounts for. A plan of some VIPs gives the same writes
//! and the same next state as planning all of them would (`tests`): it diffs the part of the
//! state those VIPs touch, with [`plan::diff`]'s order, and patches that part in.
//!
//! What is kept: the state the maps hold ([`State`], its tables compact: see
//! [`crate::model::table::Table`]), each VIP's spec as last planned with its backends' member ids
//! (about the size of the config), and a bit per member id in use (the lowest free id without
//! walking the members).

use std::collections::{BTreeMap, HashMap, HashSet};

use lb_common::{Member, VipKey};

use crate::{
    model::desired::{Desired, VipSpec},
    model::plan::{
        self, BudgetShare, Limits, MemberIdentity, Plan, PlanError, SrcRange, State, TableJob,
        identity, member_of,
    },
};

/// What a VIP was last planned from, and the member ids its backends got.
#[derive(Debug)]
struct Planned {
    spec: VipSpec,
    id: u32,
    /// The member id of each of `spec.backends`, in order.
    members: Vec<u32>,
}

/// What the last plan was made from.
#[derive(Debug)]
struct Memo {
    limits: Limits,
    vips: HashMap<VipKey, Planned>,
    /// Member ids in use, a bit each.
    live: Vec<u64>,
}

impl Memo {
    fn of(desired: &Desired, next: &State, ids: Vec<Vec<u32>>, limits: Limits) -> Self {
        let vips = desired
            .vips
            .iter()
            .zip(ids)
            .map(|(v, members)| {
                let key = v.key();
                let id = next.vips[&key].id;
                let spec = v.clone();
                (key, Planned { spec, id, members })
            })
            .collect();
        let mut memo = Self {
            limits,
            vips,
            live: Vec::new(),
        };
        for id in next.members.keys() {
            memo.set_live(*id, true);
        }
        memo
    }

    fn set_live(&mut self, id: u32, live: bool) {
        let (w, b) = (id as usize / 64, id % 64);
        if w >= self.live.len() {
            self.live.resize(w + 1, 0);
        }
        if live {
            self.live[w] |= 1 << b;
        } else {
            self.live[w] &= !(1 << b);
        }
    }

    /// Member ids not in use below `max`, lowest first.
    fn free_ids(&self, max: u32) -> impl Iterator<Item = u32> + '_ {
        (0..max).filter(|id| {
            self.live
                .get(*id as usize / 64)
                .is_none_or(|w| w & (1 << (id % 64)) == 0)
        })
    }
}

/// Plans map writes from what the maps hold (which it keeps) to a desired state.
#[derive(Debug)]
pub struct Planner {
    state: State,
    memo: Option<Memo>,
}

/// A plan's effect on the planner's state, for [`Planner::commit`] once its writes landed.
#[must_use]
pub struct Pending(Change);

enum Change {
    Nothing,
    Whole {
        next: State,
        memo: Memo,
    },
    /// `before` is the part of the state the plan changes, `after` what it becomes.
    Part {
        before: State,
        after: State,
        vips: Vec<(VipKey, Option<Planned>)>,
    },
}

/// The VIPs of a desired state a plan looks at: changed (index in `desired.vips`, key and VIP
/// id) and gone.
struct Changes {
    changed: Vec<(usize, VipKey, u32)>,
    removed: Vec<VipKey>,
}

/// The members of the changed and removed VIPs now (`before`) and next (`after`).
struct MemberPlan {
    /// The member id of each backend of each changed VIP.
    ids: Vec<Vec<u32>>,
    before: BTreeMap<u32, Member>,
    after: BTreeMap<u32, Member>,
    /// Retired ids a newcomer takes, with their generations now.
    retired_before: BTreeMap<u32, u32>,
    /// Ids this plan retires.
    retired_after: BTreeMap<u32, u32>,
}

impl Planner {
    /// A planner starting from what the maps hold: its first plan looks at every VIP.
    pub fn new(state: State) -> Self {
        Self { state, memo: None }
    }

    /// What the maps hold, as of the last plan committed.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Starts again from `state` (the maps as read back): the next plan looks at every VIP.
    pub fn reset(&mut self, state: State) {
        *self = Self::new(state);
    }

    /// Plans the writes from the maps to `desired`. Nothing changes until [`Planner::commit`].
    pub fn plan(&self, desired: &Desired, limits: Limits) -> Result<(Plan, Pending), PlanError> {
        match &self.memo {
            Some(memo) if memo.limits == limits => self.plan_part(memo, desired, limits),
            _ => {
                let (plan, next, ids) = plan::plan_full(&self.state, desired, limits)?;
                let memo = Memo::of(desired, &next, ids, limits);
                Ok((plan, Pending(Change::Whole { next, memo })))
            }
        }
    }

    /// Takes the state `pending` leads to as the maps' (its plan's writes all landed). It must
    /// come from this planner's last [`Planner::plan`].
    pub fn commit(&mut self, pending: Pending) {
        match pending.0 {
            Change::Nothing => {}
            Change::Whole { next, memo } => {
                self.state = next;
                self.memo = Some(memo);
            }
            Change::Part {
                before,
                after,
                vips,
            } => {
                let memo = self.memo.as_mut().expect("a plan of some VIPs has a memo");
                for id in before.members.keys() {
                    memo.set_live(*id, false);
                }
                for id in after.members.keys() {
                    memo.set_live(*id, true);
                }
                for (k, p) in vips {
                    match p {
                        Some(p) => memo.vips.insert(k, p),
                        None => memo.vips.remove(&k),
                    };
                }
                patch(&mut self.state, before, after);
            }
        }
    }

    /// Plans the VIPs that changed since the plan `memo` was made from.
    fn plan_part(
        &self,
        memo: &Memo,
        desired: &Desired,
        limits: Limits,
    ) -> Result<(Plan, Pending), PlanError> {
        plan::check_counts(desired, limits)?;
        let node = plan::node_config(desired);
        let c = self.changes(memo, desired, limits)?;
        if c.changed.is_empty() && c.removed.is_empty() && node == self.state.node {
            return Ok((Plan::default(), Pending(Change::Nothing)));
        }
        let mp = self.members(memo, desired, &c, limits)?;
        let jobs: Vec<TableJob<'_>> = c
            .changed
            .iter()
            .zip(&mp.ids)
            .map(|((i, _, _), ids)| TableJob::new(&desired.vips[*i], ids, limits.table_size))
            .collect::<Result<_, _>>()?;
        let tables = plan::build_tables(&jobs)?;
        let mut before = self.before(memo, &c);
        let mut after = State {
            node,
            ..Default::default()
        };
        for (((i, key, id), table), ids) in c.changed.iter().zip(tables).zip(&mp.ids) {
            let v = &desired.vips[*i];
            after
                .vips
                .insert(*key, plan::vip_value(v, *id, limits.table_size));
            after.rings.insert(*id, table);
            if let Some(b) = &v.new_flow_budget {
                after.budgets.insert(*id, BudgetShare::of(b, limits.cpus));
            }
            after.src_ranges.extend(plan::vip_ranges(v, *id));
            if let Some(r) = v.port_range {
                after.port_ranges.insert(*key, r);
            }
            debug_assert_eq!(ids.len(), v.backends.len());
        }
        after.vip_addrs = self.vip_addrs(&before, &c);
        (before.members, after.members) = (mp.before, mp.after);
        (before.retired, after.retired) = (mp.retired_before, mp.retired_after);
        let plan = plan::diff(&before, &after);
        let vips = c
            .changed
            .iter()
            .zip(mp.ids)
            .map(|((i, key, id), members)| {
                let spec = desired.vips[*i].clone();
                let p = Planned {
                    spec,
                    id: *id,
                    members,
                };
                (*key, Some(p))
            })
            .chain(c.removed.iter().map(|k| (*k, None)))
            .collect();
        let change = Change::Part {
            before,
            after,
            vips,
        };
        Ok((plan, Pending(change)))
    }

    /// The VIPs whose spec differs from the one last planned (with their ids: kept, or the
    /// lowest free for a new VIP), and those no longer desired.
    fn changes(
        &self,
        memo: &Memo,
        desired: &Desired,
        limits: Limits,
    ) -> Result<Changes, PlanError> {
        let mut seen = HashSet::with_capacity(desired.vips.len());
        let mut changed = Vec::new();
        let mut used = None;
        let mut next_fresh = 0;
        for (i, v) in desired.vips.iter().enumerate() {
            let key = v.key();
            if !seen.insert(key) {
                return Err(PlanError::DuplicateVip(v.label()));
            }
            let id = match memo.vips.get(&key) {
                Some(p) if p.spec == *v => continue,
                Some(p) => p.id,
                None => {
                    // Ids of VIPs removed now stay taken until the next plan, as in `plan`.
                    let used = used
                        .get_or_insert_with(|| self.state.vips.values().map(|v| v.id).collect());
                    let id = plan::free_ids(used)
                        .find(|id| *id >= next_fresh)
                        .expect("ids are unbounded");
                    next_fresh = id + 1;
                    id
                }
            };
            if id >= limits.max_vips {
                return Err(PlanError::TooManyVips {
                    wanted: id as usize + 1,
                    max: limits.max_vips,
                });
            }
            changed.push((i, key, id));
        }
        let mut removed: Vec<VipKey> = memo
            .vips
            .keys()
            .filter(|k| !seen.contains(*k))
            .copied()
            .collect();
        removed.sort();
        Ok(Changes { changed, removed })
    }

    /// The members of the changed VIPs: a backend that stays keeps its member; a newcomer
    /// takes the lowest id not in use, else (at full `max_backends`) one retired now, as
    /// [`plan::plan`] gives them.
    fn members(
        &self,
        memo: &Memo,
        desired: &Desired,
        c: &Changes,
        limits: Limits,
    ) -> Result<MemberPlan, PlanError> {
        let mut before = BTreeMap::new();
        let mut old: HashMap<MemberIdentity, u32> = HashMap::new();
        let planned = c.changed.iter().filter_map(|(_, k, _)| memo.vips.get(k));
        for p in planned.chain(c.removed.iter().map(|k| &memo.vips[k])) {
            for id in &p.members {
                let m = self.state.members[id];
                before.insert(*id, m);
                old.insert(identity(&m), *id);
            }
        }
        let mut after = BTreeMap::new();
        let mut ids = Vec::with_capacity(c.changed.len());
        let mut newcomers = Vec::new();
        for (n, (i, _, vip_id)) in c.changed.iter().enumerate() {
            let backends = &desired.vips[*i].backends;
            let mut these = Vec::with_capacity(backends.len());
            for (j, b) in backends.iter().enumerate() {
                let m = member_of(*vip_id, b.address, b.port, b.weight > 0, b.reject);
                if let Some(&id) = old.get(&identity(&m)) {
                    let generation = before[&id].generation;
                    after.insert(id, Member { generation, ..m });
                    these.push(id);
                } else {
                    newcomers.push((n, j, m));
                    these.push(u32::MAX);
                }
            }
            ids.push(these);
        }
        let retiring: Vec<u32> = before
            .keys()
            .filter(|id| !after.contains_key(*id))
            .copied()
            .collect();
        let mut free = memo.free_ids(limits.max_backends).chain(retiring);
        let mut retired_before = BTreeMap::new();
        for (n, j, m) in newcomers {
            let id = free.next().ok_or(PlanError::TooManyBackends {
                wanted: self.state.members.len() - before.len() + after.len() + 1,
                max: limits.max_backends,
            })?;
            let gone = self.state.retired.get(&id).copied();
            if let Some(g) = gone {
                retired_before.insert(id, g);
            }
            let last = before.get(&id).map(|m| m.generation).or(gone);
            let generation = last.unwrap_or(0).wrapping_add(1).max(1);
            after.insert(id, Member { generation, ..m });
            ids[n][j] = id;
        }
        let retired_after = before
            .iter()
            .filter(|(id, _)| !after.contains_key(*id))
            .map(|(id, m)| (*id, m.generation))
            .collect();
        Ok(MemberPlan {
            ids,
            before,
            after,
            retired_before,
            retired_after,
        })
    }

    /// The part of the state the changed and removed VIPs hold now (members aside).
    fn before(&self, memo: &Memo, c: &Changes) -> State {
        let s = &self.state;
        let mut before = State {
            node: s.node,
            ..Default::default()
        };
        let keys = c
            .changed
            .iter()
            .map(|(_, k, _)| *k)
            .chain(c.removed.clone());
        for key in keys {
            if let Some(v) = s.vips.get(&key) {
                before.vips.insert(key, *v);
            }
            if let Some(r) = s.port_ranges.get(&key) {
                before.port_ranges.insert(key, *r);
            }
            let addr = key.vip_addr();
            if let Some(n) = s.vip_addrs.get(&addr) {
                before.vip_addrs.insert(addr, *n);
            }
        }
        let ids = c
            .changed
            .iter()
            .filter_map(|(_, k, _)| memo.vips.get(k).map(|p| p.id))
            .chain(c.removed.iter().map(|k| memo.vips[k].id));
        for id in ids {
            if let Some(r) = s.rings.get(&id) {
                before.rings.insert(id, r.clone());
            }
            if let Some(b) = s.budgets.get(&id) {
                before.budgets.insert(id, *b);
            }
            before
                .src_ranges
                .extend(s.src_ranges.range(ranges_of(id)).copied());
        }
        before
    }

    /// The VIP counts of the addresses in `before` after the plan.
    fn vip_addrs(&self, before: &State, c: &Changes) -> BTreeMap<lb_common::VipAddr, u32> {
        let mut counts = before.vip_addrs.clone();
        for (_, key, _) in &c.changed {
            if !self.state.vips.contains_key(key) {
                *counts.entry(key.vip_addr()).or_insert(0) += 1;
            }
        }
        for key in &c.removed {
            if let Some(n) = counts.get_mut(&key.vip_addr()) {
                *n -= 1;
            }
        }
        counts.retain(|_, n| *n > 0);
        counts
    }
}

/// Every source range of VIP id `id`, as a range of the ordered set.
fn ranges_of(id: u32) -> std::ops::RangeInclusive<SrcRange> {
    let at = |bits, addr| SrcRange {
        vip_id: id,
        bits,
        addr,
    };
    at(0, [0; 16])..=at(u32::MAX, [0xff; 16])
}

/// Replaces the entries of `before` in `s` with those of `after`.
fn patch(s: &mut State, before: State, after: State) {
    fn map<K: Ord, V>(m: &mut BTreeMap<K, V>, before: BTreeMap<K, V>, after: BTreeMap<K, V>) {
        for k in before.keys() {
            m.remove(k);
        }
        m.extend(after);
    }
    s.node = after.node;
    map(&mut s.vips, before.vips, after.vips);
    map(&mut s.vip_addrs, before.vip_addrs, after.vip_addrs);
    map(&mut s.members, before.members, after.members);
    map(&mut s.retired, before.retired, after.retired);
    map(&mut s.rings, before.rings, after.rings);
    map(&mut s.budgets, before.budgets, after.budgets);
    map(&mut s.port_ranges, before.port_ranges, after.port_ranges);
    for r in &before.src_ranges {
        s.src_ranges.remove(r);
    }
    s.src_ranges.extend(after.src_ranges);
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::model::desired::{BackendSpec, Budget, Cidr, HashOn, Mode, NodeSpec, Protocol};

    const LIMITS: Limits = Limits {
        table_size: 1009,
        max_vips: 8,
        max_backends: 40,
        cpus: 2,
    };

    const VIPS: [&str; 5] = [
        "192.0.2.1",
        "192.0.2.2",
        "192.0.2.3",
        "2001:db8::1",
        "2001:db8::2",
    ];

    /// A random VIP at one of [`VIPS`] (two ports each, so addresses carry one VIP or two).
    fn random_vip(rng: &mut StdRng, addr: &str, port: u16) -> VipSpec {
        let v6 = addr.contains(':');
        let mut backends = Vec::new();
        for i in 1..=10 {
            if !rng.random_bool(0.5) {
                continue;
            }
            let a: IpAddr = match v6 {
                true => format!("2001:db8:1::{i}").parse().unwrap(),
                false => format!("10.1.0.{i}").parse().unwrap(),
            };
            backends.push(BackendSpec::new(a, 0, rng.random_range(0..3)));
        }
        let ranges = rng
            .random_bool(0.2)
            .then(|| vec![Cidr::parse("198.51.100.0/24", true).unwrap()]);
        VipSpec {
            name: format!("{addr}:{port}"),
            address: addr.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            mode: Mode::Dsr,
            hash: HashOn::FiveTuple,
            affinity_timeout_s: 0,
            table_size: rng.random_bool(0.2).then_some(251),
            backends,
            source_ranges: ranges,
            new_flow_budget: rng.random_bool(0.2).then_some(Budget {
                rate: rng.random_range(1..4) * 100,
                burst: 10,
            }),
            // Port 0: a port-range VIP, whose range may change under the same key.
            port_range: (port == 0).then(|| {
                let lo = rng.random_range(1000..2000);
                crate::model::desired::PortRange {
                    lo,
                    hi: lo + rng.random_range(0..500),
                }
            }),
            algorithm: match rng.random_bool(0.2) {
                true => crate::model::desired::Algorithm::LeastConnections,
                false => crate::model::desired::Algorithm::Maglev,
            },
        }
    }

    /// `d` with a few of its VIPs changed, removed or added, and now and then the node.
    fn churn(rng: &mut StdRng, d: &Desired) -> Desired {
        let mut next = d.clone();
        for _ in 0..rng.random_range(1..3) {
            let (addr, port) = (
                VIPS[rng.random_range(0..VIPS.len())],
                [0, 80][rng.random_range(0..2)],
            );
            let at = next
                .vips
                .iter()
                .position(|v| v.address == addr.parse::<IpAddr>().unwrap() && v.port == port);
            match (at, rng.random_range(0..4)) {
                (Some(i), 0) => drop(next.vips.remove(i)),
                (Some(i), _) => next.vips[i] = random_vip(rng, addr, port),
                (None, _) => next.vips.push(random_vip(rng, addr, port)),
            }
        }
        if rng.random_bool(0.1) {
            next.node.udp_idle_timeout += std::time::Duration::from_secs(1);
        }
        next
    }

    /// Random walks over desired states: every plan of the changed VIPs writes what a plan of
    /// all of them would, and leads to the same state (ids taken at full `max_backends`
    /// included: ten backends of up to eight VIPs share 40 ids).
    #[test]
    fn a_plan_of_the_changed_vips_equals_a_plan_of_all_of_them() {
        let mut rng = StdRng::seed_from_u64(29);
        let mut d = Desired {
            node: NodeSpec::default(),
            vips: vec![],
        };
        let mut planner = Planner::new(State::default());
        let (mut parts, mut errors) = (0, 0);
        for round in 0..400 {
            let next = churn(&mut rng, &d);
            let whole = plan::plan(planner.state(), &next, LIMITS);
            let part = planner.plan(&next, LIMITS);
            let (plan, pending) = match (whole, part) {
                (Err(a), Err(b)) => {
                    assert_eq!(a, b, "round {round}");
                    errors += 1;
                    continue;
                }
                (Ok((p1, s1)), Ok((p2, pending))) => {
                    assert_eq!(p1, p2, "round {round}: the plans differ");
                    parts += matches!(pending.0, Change::Part { .. }) as u32;
                    (s1, pending)
                }
                (a, b) => panic!("round {round}: {:?} against {:?}", a.err(), b.err()),
            };
            planner.commit(pending);
            assert_eq!(planner.state(), &plan, "round {round}: the states differ");
            d = next;
        }
        assert!(parts > 300, "{parts} plans of some VIPs");
        assert!(errors > 0, "no round ran out of member ids");
    }

    #[test]
    fn an_unchanged_resync_plans_nothing_and_a_change_only_its_vip() {
        let mut rng = StdRng::seed_from_u64(1);
        let vips = VIPS.iter().map(|a| random_vip(&mut rng, a, 80)).collect();
        let d = Desired {
            node: NodeSpec::default(),
            vips,
        };
        let mut planner = Planner::new(State::default());
        let (_, pending) = planner.plan(&d, LIMITS).unwrap();
        planner.commit(pending);
        let (again, pending) = planner.plan(&d, LIMITS).unwrap();
        assert!(again.is_empty(), "{:?}", again.writes);
        assert!(matches!(pending.0, Change::Nothing));

        let mut one = d.clone();
        one.vips[2]
            .backends
            .push(BackendSpec::new("10.9.9.9".parse().unwrap(), 0, 1));
        let (p, pending) = planner.plan(&one, LIMITS).unwrap();
        let Change::Part { before, .. } = &pending.0 else {
            panic!("a change of one VIP plans that VIP")
        };
        let id = planner.state().vips[&one.vips[2].key()].id;
        assert_eq!(before.vips.len(), 1, "one VIP looked at");
        assert!(p.writes.iter().all(|w| match w {
            plan::Write::Member { member, .. } => member.vip_id == id,
            plan::Write::Slots { vip_id, .. } | plan::Write::Table { vip_id, .. } => *vip_id == id,
            w => panic!("{w:?}"),
        }));
    }
}
