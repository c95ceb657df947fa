//! One reading of what `lb top` shows: counters from the pinned maps, weights and health from
//! the agent's status file. Rates come from two readings ([`super::model`]); this module only
//! reads.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use lb_common::{Counter, FAMILY_V4, FlowKey, FlowValue, Member, TrafficStats, VipKey};

use crate::{
    kernel::inspect::{InspectError, Pinned, monotonic_coarse_ns},
    model::desired::ip_of,
    model::view::{BackendRef, VipRef},
    status::file::{BackendStatus, Status, VipStatus},
};

/// A member's allocation: its id and generation (an id given to another backend is another
/// allocation, with counters of its own).
pub type Alloc = (u32, u32);

/// Health as the agent last wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    Healthy,
    Unhealthy,
    /// No health check configured.
    Unchecked,
    /// Taken out by passive health checking.
    PassiveOut,
    /// No status file, or the backend is not in it.
    Unknown,
}

impl Health {
    pub fn label(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Unchecked => "unchecked",
            Health::PassiveOut => "out-passive",
            Health::Unknown => "-",
        }
    }

    pub fn of(b: &BackendStatus) -> Self {
        match (b.passive_out, b.healthy) {
            (true, _) => Health::PassiveOut,
            (false, None) => Health::Unchecked,
            (false, Some(true)) => Health::Healthy,
            (false, Some(false)) => Health::Unhealthy,
        }
    }
}

/// One backend of a VIP (a live member) at one moment.
#[derive(Clone, Debug)]
pub struct MemberSample {
    pub alloc: Alloc,
    pub backend: BackendRef,
    pub stats: TrafficStats,
    /// Whether it takes new flows (weight above 0 and healthy); if not, it drains.
    pub accepts: bool,
    /// The configured weight, or its override's (None without a status file).
    pub weight: Option<u32>,
    /// `lb drain` or `lb weight` overrides the weight.
    pub overridden: bool,
    pub health: Health,
    /// Flow entries pinned to this allocation; counted for draining members only.
    pub pinned_flows: Option<PinnedFlows>,
}

/// One VIP at one moment.
#[derive(Clone, Debug)]
pub struct VipSample {
    pub vip: VipRef,
    pub stats: TrafficStats,
    pub members: Vec<MemberSample>,
    /// Packets dropped over the VIP's new-flow budget (`drop_new_flow_budget`), all CPUs.
    pub over_budget: u64,
    /// NAT replies translated back to clients (None: a DSR VIP, whose replies bypass lb).
    pub replies: Option<u64>,
}

/// Everything `lb top` shows, at one moment.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    /// The sum of the global drop verdicts (every VIP, and packets aimed at none).
    pub drops: u64,
    /// Half-open NAT translations taken over or expired (`nat_half_open_reclaimed` and
    /// `nat_half_open_expired`): handshakes nobody completed, what a SYN flood leaves.
    pub half_open: u64,
    pub vips: Vec<VipSample>,
}

/// The flow entries pinned to one member.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PinnedFlows {
    pub total: u64,
    /// Those not known to be idle for [`IDLE`] (see [`in_use`]).
    pub in_use: u64,
}

/// An entry unused for this long counts as idle: entries stay in the table after their
/// connection ends (until a new flow takes their place), so their number alone never shows a
/// drain ending.
pub const IDLE: Duration = Duration::from_secs(10);

/// Reads the pinned maps (and `status`, where the agent wrote one).
pub fn read(p: &Pinned, status: Option<&Status>) -> Result<Sample, InspectError> {
    let at = Instant::now();
    let counters = p.counters()?;
    let drops = counters
        .iter()
        .filter(|(c, _)| is_drop(*c))
        .map(|(_, v)| v)
        .sum();
    let half_open = counters
        .iter()
        .filter(|(c, _)| {
            matches!(
                c,
                Counter::NatHalfOpenReclaimed | Counter::NatHalfOpenExpired
            )
        })
        .map(|(_, v)| v)
        .sum();
    let members = p.members()?;
    let mut vips = Vec::new();
    let ranges = p.port_ranges()?;
    for (k, v) in p.vips()? {
        let vip = VipRef::of_range(&k, ranges.get(&k).copied());
        let st = status.and_then(|s| s.vips.iter().find(|x| x.vip == vip.label));
        let mut rows = Vec::new();
        for (id, m) in members.iter().filter(|(_, m)| m.vip_id == v.id) {
            rows.push(member_sample(p, *id, m, &k, st)?);
        }
        vips.push(VipSample {
            vip: vip.named(st.map(|s| s.name.clone()).filter(|n| !n.is_empty())),
            stats: p.vip_stats(v.id)?,
            members: rows,
            over_budget: p.vip_budget_drops(v.id),
            replies: match v.mode == lb_common::MODE_NAT {
                true => Some(p.vip_replies(v.id)?.packets),
                false => None,
            },
        });
    }
    count_draining(p, &mut vips)?;
    Ok(Sample {
        at,
        drops,
        half_open,
        vips,
    })
}

/// The drop verdicts. `lb_common` names each counter's kind; "drop" is in the name of every
/// verdict that drops (and of no other).
fn is_drop(c: Counter) -> bool {
    c.is_verdict() && c.name().starts_with("drop_")
}

fn member_sample(
    p: &Pinned,
    id: u32,
    m: &Member,
    vip: &VipKey,
    st: Option<&VipStatus>,
) -> Result<MemberSample, InspectError> {
    // The status file names a backend by its address (its port is the VIP's or its own).
    let address = ip_of(&m.addr, m.family).to_string();
    let cfg = st.and_then(|s| s.backends.iter().find(|b| b.address == address));
    Ok(MemberSample {
        alloc: (id, m.generation),
        backend: BackendRef::of(m, vip),
        stats: p.member_stats(id)?,
        accepts: m.accepts(),
        weight: cfg.map(|b| b.weight),
        overridden: cfg.is_some_and(|b| b.overridden.is_some()),
        health: cfg.map_or(Health::Unknown, Health::of),
        pinned_flows: None,
    })
}

/// Fills in the flows still pinned to each draining member, reading the flow table only if
/// some member drains.
fn count_draining(p: &Pinned, vips: &mut [VipSample]) -> Result<(), InspectError> {
    let draining: BTreeSet<Alloc> = vips
        .iter()
        .flat_map(|v| &v.members)
        .filter(|m| !m.accepts)
        .map(|m| m.alloc)
        .collect();
    if draining.is_empty() {
        return Ok(());
    }
    let counts = pinned_flows(p, &draining)?;
    for m in vips.iter_mut().flat_map(|v| &mut v.members) {
        if draining.contains(&m.alloc) {
            m.pinned_flows = Some(counts.get(&m.alloc).copied().unwrap_or_default());
        }
    }
    Ok(())
}

/// How many flow entries are pinned to each of `wanted`: one pass over the whole flow table (the
/// IPv4 table through its mapping, then the IPv6 LRU), nothing copied.
pub fn pinned_flows(
    p: &Pinned,
    wanted: &BTreeSet<Alloc>,
) -> Result<BTreeMap<Alloc, PinnedFlows>, InspectError> {
    let now = monotonic_coarse_ns();
    let mut out: BTreeMap<Alloc, PinnedFlows> = BTreeMap::new();
    p.each_flow(|k, f| {
        let alloc = (f.member_id, f.generation);
        if wanted.contains(&alloc) {
            let e = out.entry(alloc).or_default();
            e.total += 1;
            e.in_use += in_use(&k, &f, now) as u64;
        }
        true
    })?;
    Ok(out)
}

/// Whether a flow entry may still be in use at `now_ns`: it was used within [`IDLE`], or the
/// table does not record its use. The IPv4 table stamps every flow's use (TCP about once a
/// second, UDP on every packet); the IPv6 table keeps the time an entry was made (refreshed only
/// for UDP, and only with an idle timeout), so an IPv6 entry is never known to be idle.
pub fn in_use(k: &FlowKey, f: &FlowValue, now_ns: u64) -> bool {
    k.family != FAMILY_V4 || now_ns.saturating_sub(f.last_seen_ns) < IDLE.as_nanos() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{FAMILY_V6, IPPROTO_TCP, IPPROTO_UDP};

    #[test]
    fn an_ipv4_entry_is_idle_once_unused_for_the_idle_time_and_an_ipv6_one_never_known_idle() {
        let now = 1_000 * 1_000_000_000;
        let idle = IDLE.as_nanos() as u64;
        let key = |family, proto| FlowKey {
            family,
            proto,
            ..Default::default()
        };
        let seen = |ago: u64| FlowValue {
            last_seen_ns: now - ago,
            ..Default::default()
        };
        for k in [key(FAMILY_V4, IPPROTO_TCP), key(FAMILY_V4, IPPROTO_UDP)] {
            assert!(in_use(&k, &seen(idle - 1), now), "{k:?}");
            assert!(!in_use(&k, &seen(idle), now), "{k:?}");
        }
        for k in [key(FAMILY_V6, IPPROTO_TCP), key(FAMILY_V6, IPPROTO_UDP)] {
            assert!(in_use(&k, &seen(10 * idle), now), "{k:?}");
        }
    }
}
