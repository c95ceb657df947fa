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

use crate::{mapping::Mapping, model::Algorithm, plan::State};

/// How often the agent recounts the live entries of least-connections VIPs.
pub const RECOUNT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Each member of a least-connections VIP in `vips`, by id, with its backend's weight.
pub fn weights<'a>(
    vips: impl IntoIterator<Item = &'a crate::model::VipSpec>,
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
            let addr = crate::model::ip_of(&m.addr, m.family);
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
        let map = crate::program::open_pinned(dir, maps::MEMBER_CONNS)
            .map_err(|e| ConnsError::Open(crate::error_chain(&e)))?;
        let Map::Array(data) = &map else {
            return Err(ConnsError::Open("not an array".into()));
        };
        let len = len as usize;
        let mem = Mapping::new(data, len * size_of::<MemberConns>(), true)
            .map_err(ConnsError::Map)?;
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
            unsafe { (*(&raw const (*e).weight).cast::<AtomicU32>()).store(weight, Ordering::Relaxed) };
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

/// Brings each counted member's count to `live` (its live entries, counted while the program
/// went on counting), given `before`, the counts read just before the recount: adds
/// `live - before`, so what the program counted since stays counted. Members of `weights`
/// absent from `live` have no live entry. Returns what changed.
pub fn correct(
    conns: &ConnsMap,
    weights: &BTreeMap<u32, u32>,
    before: &BTreeMap<u32, i64>,
    live: &BTreeMap<u32, i64>,
) -> Corrected {
    let mut out = Corrected::default();
    for id in weights.keys() {
        let want = live.get(id).copied().unwrap_or(0);
        let had = before.get(id).copied().unwrap_or(0);
        if want != had {
            conns.add(*id, want - had);
            out.members += 1;
            out.drift += want.abs_diff(had);
        }
    }
    out
}

/// One round: writes the weights that differ, reads the counts, recounts the live entries
/// through `pinned` and corrects the counts. `written`: the weights written so far.
pub fn round(
    conns: &ConnsMap,
    pinned: &crate::inspect::Pinned,
    weights: &BTreeMap<u32, u32>,
    vips: &BTreeMap<u32, u32>,
    written: &mut BTreeMap<u32, u32>,
) -> Result<Corrected, crate::inspect::InspectError> {
    for (id, w) in weights {
        if written.get(id) != Some(w) || conns.get(*id).weight != *w {
            conns.set_weight(*id, *w);
            written.insert(*id, *w);
        }
    }
    written.retain(|id, _| weights.contains_key(id));
    let before: BTreeMap<u32, i64> = weights.keys().map(|id| (*id, conns.get(*id).conns)).collect();
    let live = pinned.live_connections(vips)?;
    Ok(correct(conns, weights, &before, &live))
}
