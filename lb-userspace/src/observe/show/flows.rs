//! `lb flows`: the entries of the flow tables, each with the backend it is pinned to, what the
//! program would do with its next packet (its state), its affinity and, in NAT mode, its
//! translation (the node's source port towards the backend, and the TCP state seen both ways);
//! and how many flows there are in all, however many are shown.

use std::{collections::BTreeMap, net::SocketAddr};

use super::Result;
use lb_common::{
    AffinityKey, FlowKey, FlowValue, MEMBER_F_ACCEPTS, MODE_NAT, Member, NodeConfig, VipKey,
    VipValue,
    select::{AffinityCheck, FlowCheck, check_affinity, check_flow},
};
use serde::Serialize;

use super::{Format, VipNames};
use crate::{
    kernel::inspect::{NatState, Pinned, monotonic_coarse_ns},
    model::desired::{Protocol, ip_of},
    model::view::{BackendRef, VipRef},
};

/// What the program does with a flow's next packet.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FlowState {
    /// Follows the entry to its backend.
    Active,
    /// Follows the entry, but the backend takes no new flows (weight 0, unhealthy): the flow
    /// drains.
    Draining,
    /// The backend is gone or its member id was given to another: balanced afresh.
    Stale,
    /// A UDP flow idle for longer than the node's UDP idle timeout: balanced afresh.
    IdleExpired,
}

#[derive(Serialize, Debug)]
pub struct NatView {
    /// The node's source port towards the backend.
    pub port: u16,
    pub state: NatState,
}

#[derive(Serialize, Debug)]
pub struct FlowRow {
    pub client: SocketAddr,
    pub vip: VipRef,
    pub protocol: String,
    /// None: the member the entry names is gone or re-allocated.
    pub backend: Option<BackendRef>,
    pub member_id: u32,
    pub generation: u32,
    pub state: FlowState,
    /// Seconds since the entry's time: the last packet (TCP to about a second; IPv6 TCP flows:
    /// the first packet).
    pub seen_s_ago: u64,
    /// Whether the client's session affinity holds it on this flow's backend; None where the
    /// VIP has no affinity.
    pub affinity: Option<bool>,
    /// NAT VIPs: the flow's translation; None if it has none (yet).
    pub nat: Option<NatView>,
}

/// Which flows `lb flows` lists: all the filters given must hold.
#[derive(Clone, Copy, Debug, Default)]
pub struct Filter {
    pub vip: Option<VipArg>,
    /// The backend's address, and its port if given.
    pub backend: Option<Endpoint>,
    /// The client's address, and its port if given.
    pub client: Option<Endpoint>,
    pub state: Option<FlowState>,
}

/// An address with or without a port (`10.1.0.1`, `10.1.0.1:80`, `[2001:db8::1]:80`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: std::net::IpAddr,
    pub port: Option<u16>,
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Self {
                addr: a.ip(),
                port: Some(a.port()),
            });
        }
        let addr = s.trim_start_matches('[').trim_end_matches(']');
        addr.parse().map(|addr| Self { addr, port: None }).map_err(|_| {
            format!("{s:?} is not an address, or an address and port (10.1.0.1, 10.1.0.1:80, [2001:db8::1]:80)")
        })
    }
}

impl Endpoint {
    fn matches(&self, a: SocketAddr) -> bool {
        self.addr == a.ip() && self.port.is_none_or(|p| p == a.port())
    }
}

/// How many of the flows matched are in each state.
#[derive(Serialize, Debug, Default)]
pub struct StateCounts {
    pub active: u64,
    pub draining: u64,
    pub stale: u64,
    pub idle_expired: u64,
}

impl StateCounts {
    fn add(&mut self, s: FlowState) {
        match s {
            FlowState::Active => self.active += 1,
            FlowState::Draining => self.draining += 1,
            FlowState::Stale => self.stale += 1,
            FlowState::IdleExpired => self.idle_expired += 1,
        }
    }
}

#[derive(Serialize, Debug)]
pub struct FlowList {
    /// Flows in the tables that pass the filters, all of them.
    pub total: u64,
    /// Those by state.
    pub states: StateCounts,
    /// Flows listed below (at most the limit).
    pub shown: usize,
    pub flows: Vec<FlowRow>,
}

/// What rows are built from, read once: the maps' VIPs (with their [`VipRef`]s), members
/// and node settings.
struct Ctx<'a> {
    p: &'a Pinned,
    vips: BTreeMap<VipKey, (VipValue, VipRef)>,
    members: BTreeMap<u32, Member>,
    node: NodeConfig,
    now: u64,
}

impl Ctx<'_> {
    /// The VIP of flow `k`: its exact VIP, else the port-range VIP of its address and protocol
    /// (keyed with port 0), as the program looked it up.
    fn vip(&self, k: &FlowKey) -> Option<&(VipValue, VipRef)> {
        let exact = k.vip_key();
        self.vips
            .get(&exact)
            .or_else(|| self.vips.get(&VipKey { port: 0, ..exact }))
    }

    /// The flow's state and backend (None: its member is gone), without the lookups a row
    /// adds (affinity, NAT); None if its VIP is gone.
    fn state(&self, k: &FlowKey, f: &FlowValue) -> Option<(FlowState, Option<BackendRef>)> {
        let vkey = k.vip_key();
        let (vip, _) = self.vip(k)?;
        let member = self.members.get(&f.member_id).copied();
        let check = check_flow(
            f,
            member.as_ref(),
            vip,
            k.proto,
            self.now,
            self.node.udp_idle_timeout_ns,
        );
        let state = match (check, member) {
            (FlowCheck::Stale, _) => FlowState::Stale,
            (FlowCheck::IdleExpired, _) => FlowState::IdleExpired,
            (_, Some(m)) if m.flags & MEMBER_F_ACCEPTS == 0 => FlowState::Draining,
            _ => FlowState::Active,
        };
        let backend = member
            .filter(|_| state != FlowState::Stale)
            .map(|m| BackendRef::of(&m, &vkey));
        Some((state, backend))
    }

    /// The row of a flow whose [`Self::state`] is `state` and `backend`.
    fn row(
        &self,
        k: &FlowKey,
        f: &FlowValue,
        state: FlowState,
        backend: Option<BackendRef>,
    ) -> Option<FlowRow> {
        let (vip, vref) = self.vip(k)?;
        Some(FlowRow {
            client: SocketAddr::new(ip_of(&k.src, k.family), u16::from_be(k.src_port)),
            vip: vref.clone(),
            protocol: Protocol::from_number(k.proto)
                .map_or_else(|| k.proto.to_string(), |p| p.to_string()),
            backend,
            member_id: f.member_id,
            generation: f.generation,
            state,
            seen_s_ago: self.now.saturating_sub(f.last_seen_ns) / 1_000_000_000,
            affinity: self.affinity(k, f, vip),
            nat: (vip.mode == MODE_NAT).then(|| self.nat(k)).flatten(),
        })
    }

    fn affinity(&self, k: &FlowKey, f: &FlowValue, vip: &VipValue) -> Option<bool> {
        if vip.affinity_timeout_s == 0 {
            return None;
        }
        let a = self.p.affinity(&AffinityKey {
            addr: k.src,
            vip_id: vip.id,
        });
        Some(a.is_some_and(|a| {
            let m = self.members.get(&a.member_id);
            a.member_id == f.member_id
                && check_affinity(&a, m, vip, self.now) == AffinityCheck::Follow
        }))
    }

    fn nat(&self, k: &FlowKey) -> Option<NatView> {
        let n = self.p.nat(k)?;
        let r = self.p.nat_reverse(k, &n);
        let state = NatState::of(r.as_ref(), k.proto, self.now, &self.node);
        Some(NatView {
            port: u16::from_be(n.nat_port),
            state,
        })
    }
}

/// Which VIP `--vip` names: its address and port, and its protocol if given, as lb prints a
/// VIP's label (`192.0.2.10:80/tcp`, `[2001:db8::10]:443/udp`) or without it (`192.0.2.10:80`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipArg {
    pub addr: SocketAddr,
    pub proto: Option<crate::model::desired::Protocol>,
}

impl std::str::FromStr for VipArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, proto) = match s.rsplit_once('/') {
            Some((a, p)) => (a, Some(p.parse()?)),
            None => (s, None),
        };
        let addr = addr.parse().map_err(|_| {
            format!("{s:?} is not a VIP: ADDRESS:PORT or [V6]:PORT, optionally with /tcp or /udp")
        })?;
        Ok(Self { addr, proto })
    }
}

impl VipArg {
    fn matches(&self, to: SocketAddr, proto: u8) -> bool {
        self.addr == to && self.proto.is_none_or(|p| p.number() == proto)
    }
}

/// The flows that pass `filter`, at most `limit` of them, their total and their states.
pub fn list(p: &Pinned, names: &VipNames, filter: Filter, limit: usize) -> Result<FlowList> {
    let vips = p.vips()?.into_iter();
    let ctx = Ctx {
        p,
        vips: vips.map(|(k, v)| (k, (v, names.vip(&k)))).collect(),
        members: p.members()?,
        node: p.node()?,
        now: monotonic_coarse_ns(),
    };
    let mut out = FlowList {
        total: 0,
        states: StateCounts::default(),
        shown: 0,
        flows: Vec::new(),
    };
    p.each_flow(|k, f| {
        let to = SocketAddr::new(ip_of(&k.dst, k.family), u16::from_be(k.dst_port));
        if filter.vip.is_some_and(|want| !want.matches(to, k.proto)) {
            return true;
        }
        let client = SocketAddr::new(ip_of(&k.src, k.family), u16::from_be(k.src_port));
        if filter.client.is_some_and(|want| !want.matches(client)) {
            return true;
        }
        let Some((state, backend)) = ctx.state(&k, &f) else {
            return true;
        };
        let at = backend.as_ref().map(|b| SocketAddr::new(b.address, b.port));
        if filter.state.is_some_and(|want| want != state)
            || filter
                .backend
                .is_some_and(|want| !at.is_some_and(|a| want.matches(a)))
        {
            return true;
        }
        out.total += 1;
        out.states.add(state);
        if out.flows.len() < limit
            && let Some(r) = ctx.row(&k, &f, state, backend)
        {
            out.flows.push(r);
        }
        true
    })?;
    out.shown = out.flows.len();
    Ok(out)
}

pub fn flows(
    p: &Pinned,
    names: &VipNames,
    filter: Filter,
    limit: usize,
    format: Format,
) -> Result<()> {
    let list = list(p, names, filter, limit)?;
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let wide = format == Format::Wide;
    let mut head: Vec<String> = [
        "CLIENT", "VIP", "BACKEND", "ENTRY", "SEEN", "AFFINITY", "NAT",
    ]
    .map(String::from)
    .into();
    if wide {
        head.push("MEMBER/GEN".into());
    }
    let rows = list.flows.iter().map(|r| {
        let mut row = vec![
            r.client.to_string(),
            r.vip.label.clone(),
            r.backend
                .as_ref()
                .map_or("(removed)".into(), |b| b.label.clone()),
            serde_plain(&r.state),
            format!("{}s", r.seen_s_ago),
            match r.affinity {
                None => "-",
                Some(true) => "held",
                Some(false) => "no",
            }
            .into(),
            r.nat.as_ref().map_or("-".to_string(), |n| {
                format!("{} {}", n.port, serde_plain(&n.state))
            }),
        ];
        if wide {
            row.push(format!("{}/{}", r.member_id, r.generation));
        }
        row
    });
    print!("{}", super::table(std::iter::once(head).chain(rows)));
    let s = &list.states;
    println!(
        "{} of {} flows shown; entries: {} active, {} draining, {} stale, {} idle-expired",
        list.shown, list.total, s.active, s.draining, s.stale, s.idle_expired
    );
    println!(
        "(ENTRY: what the flow's next packet does; NAT: the node's port, the connection's state)"
    );
    Ok(())
}

/// A unit enum's serde name (`idle-expired`).
fn serde_plain(v: &impl Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
