//! Least connections, the agent's half (see `lb_common::VIP_F_LEAST_CONN` for the program's):
//! the weights in `LB_MEMBER_CONNS`, and the correction of its counts from a recount of the
//! live entries, for what the program never sees end (UDP flows, entries evicted or expired,
//! a lost FIN or RST).
//!
//! `LB_MEMBER_CONNS` is mapped into this process (`BPF_F_MMAPABLE`): a weight is one store, a
//! correction one atomic add, like the program's own, so neither loses a count the program
//! makes meanwhile.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::atomic::{AtomicI64, AtomicU32, Ordering},
};

use aya::maps::Map;
use lb_common::{MemberConns, VIP_F_LEAST_CONN, maps};

use crate::{
    kernel::mapping::Mapping,
    model::{desired::Algorithm, plan::State},
};

/// How often the agent recounts the live entries of least-connections VIPs.
pub const RECOUNT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Each member of a least-connections VIP in `vips`, by id, with its backend's weight.
pub fn weights<'a>(
    vips: impl IntoIterator<Item = &'a crate::model::desired::VipSpec>,
    state: &State,
) -> BTreeMap<u32, u32> {
    let mut out = BTreeMap::new();
    for v in vips {
        if v.algorithm != Algorithm::LeastConnections {
            continue;
        }
        let Some(vip) = state.vips.get(&v.key()) else {
            continue;
        };
        for (id, m) in state.members.iter().filter(|(_, m)| m.vip_id == vip.id) {
            let addr = crate::model::desired::ip_of(&m.addr, m.family);
            let port = u16::from_be(m.port);
            if let Some(b) = v
                .backends
                .iter()
                .find(|b| b.address == addr && b.port == port)
            {
                out.insert(*id, b.weight);
            }
        }
    }
    out
}

/// The ids of the least-connections VIPs in `state`, with their mode.
pub fn vip_ids(state: &State) -> BTreeMap<u32, u32> {
    state
        .vips
        .values()
        .filter(|v| v.flags & VIP_F_LEAST_CONN != 0)
        .map(|v| (v.id, v.mode))
        .collect()
}

/// `LB_MEMBER_CONNS` mapped writable.
pub struct ConnsMap {
    mem: Mapping,
    len: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnsError {
    #[error("opening LB_MEMBER_CONNS: {0}")]
    Open(String),
    #[error("mapping LB_MEMBER_CONNS (it should be BPF_F_MMAPABLE): {0}")]
    Map(std::io::Error),
}

impl ConnsMap {
    /// Maps the pinned `LB_MEMBER_CONNS` of `dir`, `len` entries.
    pub fn open(dir: &Path, len: u32) -> Result<Self, ConnsError> {
        let map = crate::kernel::program::open_pinned(dir, maps::MEMBER_CONNS)
            .map_err(|e| ConnsError::Open(crate::error_chain(&e)))?;
        let Map::Array(data) = &map else {
            return Err(ConnsError::Open("not an array".into()));
        };
        let len = len as usize;
        let mem =
            Mapping::new(data, len * size_of::<MemberConns>(), true).map_err(ConnsError::Map)?;
        Ok(Self { mem, len })
    }

    fn entry(&self, id: u32) -> Option<*mut MemberConns> {
        let i = id as usize;
        // SAFETY: in bounds of the mapping; entries are 16 bytes, packed.
        (i < self.len).then(|| unsafe { self.mem.ptr().cast::<MemberConns>().add(i) })
    }

    /// Member `id`'s entry as it is now.
    pub fn get(&self, id: u32) -> MemberConns {
        let Some(e) = self.entry(id) else {
            return MemberConns::default();
        };
        // SAFETY: an aligned entry of the mapping; the program changes it with atomic adds.
        unsafe {
            MemberConns {
                conns: (*(&raw const (*e).conns).cast::<AtomicI64>()).load(Ordering::Relaxed),
                weight: (*(&raw const (*e).weight).cast::<AtomicU32>()).load(Ordering::Relaxed),
                _pad: 0,
            }
        }
    }

    /// Writes member `id`'s weight (its count stays).
    pub fn set_weight(&self, id: u32, weight: u32) {
        if let Some(e) = self.entry(id) {
            // SAFETY: as in `get`.
            unsafe {
                (*(&raw const (*e).weight).cast::<AtomicU32>()).store(weight, Ordering::Relaxed)
            };
        }
    }

    /// Adds `delta` to member `id`'s count, atomically.
    pub fn add(&self, id: u32, delta: i64) {
        if let Some(e) = self.entry(id) {
            // SAFETY: as in `get`.
            unsafe {
                (*(&raw const (*e).conns).cast::<AtomicI64>()).fetch_add(delta, Ordering::Relaxed)
            };
        }
    }
}

/// What one recount changed: members corrected, and the sum of the corrections' sizes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Corrected {
    pub members: usize,
    pub drift: u64,
}

/// What to add to each counted member's count (the members of `weights`) to bring it to
/// `live` (its live entries, counted while the program went on counting), given `before`, the
/// counts read just before the recount: `live - before`, added atomically, so that what the
/// program counted since stays counted. A member absent from `live` has no live entry.
pub fn corrections(
    weights: &BTreeMap<u32, u32>,
    before: &BTreeMap<u32, i64>,
    live: &BTreeMap<u32, i64>,
) -> Vec<(u32, i64)> {
    weights
        .keys()
        .filter_map(|id| {
            let want = live.get(id).copied().unwrap_or(0);
            let had = before.get(id).copied().unwrap_or(0);
            (want != had).then_some((*id, want - had))
        })
        .collect()
}

/// Adds `corrections` to the counts; what changed.
pub fn correct(conns: &ConnsMap, corrections: &[(u32, i64)]) -> Corrected {
    for (id, d) in corrections {
        conns.add(*id, *d);
    }
    Corrected {
        members: corrections.len(),
        drift: corrections.iter().map(|(_, d)| d.unsigned_abs()).sum(),
    }
}

/// One round: writes the weights that differ, reads the counts, recounts the live entries
/// through `pinned` and corrects the counts. `written`: the weights written so far.
pub fn round(
    conns: &ConnsMap,
    pinned: &crate::kernel::inspect::Pinned,
    weights: &BTreeMap<u32, u32>,
    vips: &BTreeMap<u32, u32>,
    written: &mut BTreeMap<u32, u32>,
) -> Result<Corrected, crate::kernel::inspect::InspectError> {
    for (id, w) in weights {
        if written.get(id) != Some(w) || conns.get(*id).weight != *w {
            conns.set_weight(*id, *w);
            written.insert(*id, *w);
        }
    }
    written.retain(|id, _| weights.contains_key(id));
    let before: BTreeMap<u32, i64> = weights
        .keys()
        .map(|id| (*id, conns.get(*id).conns))
        .collect();
    let live = pinned.live_connections(vips)?;
    Ok(correct(conns, &corrections(weights, &before, &live)))
}

#[cfg(test)]
mod tests {
    use lb_common::{MEMBER_F_LIVE, Member, VipValue};

    use super::*;
    use crate::model::desired::{BackendSpec, Mode, Protocol, VipSpec};

    fn spec(addr: &str, algorithm: Algorithm, backends: &[(&str, u32)]) -> VipSpec {
        VipSpec {
            name: addr.into(),
            address: addr.parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            mode: Mode::Dsr,
            hash: Default::default(),
            affinity_timeout_s: 0,
            table_size: None,
            backends: backends
                .iter()
                .map(|(a, w)| BackendSpec::new(a.parse().unwrap(), 0, *w))
                .collect(),
            source_ranges: None,
            new_flow_budget: None,
            port_range: None,
            algorithm,
        }
    }

    fn member(addr: &str, vip_id: u32) -> Member {
        let (addr, family) = crate::model::desired::addr16(addr.parse().unwrap());
        Member {
            addr,
            port: 0,
            family,
            flags: MEMBER_F_LIVE,
            vip_id,
            generation: 1,
        }
    }

    #[test]
    fn the_weights_are_those_of_least_connections_vips_members_only() {
        let lc = spec(
            "192.0.2.1",
            Algorithm::LeastConnections,
            &[("10.1.0.1", 1), ("10.1.0.2", 3)],
        );
        let mg = spec("192.0.2.2", Algorithm::Maglev, &[("10.1.0.1", 5)]);
        let mut state = State::default();
        for (v, id, flags) in [(&lc, 0, VIP_F_LEAST_CONN), (&mg, 1, 0)] {
            let value = VipValue {
                id,
                flags,
                ..Default::default()
            };
            state.vips.insert(v.key(), value);
        }
        state.members.insert(4, member("10.1.0.1", 0));
        state.members.insert(5, member("10.1.0.2", 0));
        state.members.insert(6, member("10.1.0.1", 1));
        let w = weights([&lc, &mg], &state);
        assert_eq!(w, BTreeMap::from([(4, 1), (5, 3)]));
        assert_eq!(vip_ids(&state), BTreeMap::from([(0, lb_common::MODE_DSR)]));
    }

    #[test]
    fn corrections_bring_counts_to_the_live_entries_and_leave_right_ones_alone() {
        let weights = BTreeMap::from([(1, 1), (2, 1), (3, 1)]);
        // 1 drifted up (a lost FIN), 2 is right, 3 drifted below zero (no live entry).
        let before = BTreeMap::from([(1, 12), (2, 4), (3, -2)]);
        let live = BTreeMap::from([(1, 10), (2, 4), (9, 7)]);
        assert_eq!(corrections(&weights, &before, &live), [(1, -2), (3, 2)]);
    }
}
