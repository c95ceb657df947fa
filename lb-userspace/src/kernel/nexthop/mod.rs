//! Next hops per member: the agent works out, over rtnetlink, what `bpf_fib_lookup` would answer
//! for the outer packet from this node to each live member's backend (egress interface, MAC
//! addresses, MTU, or why not: no neighbour, local, unreachable), and writes it to
//! `LB_NEXTHOPS` tagged with the member's generation, so the program needs no route lookup per
//! packet. An entry it could not work out is written `NH_UNRESOLVED`: the program then asks
//! `bpf_fib_lookup` itself.
//!
//! [`translate`] is the pure part (netlink messages -> [`NextHop`]); [`resolver`] does the
//! netlink requests; [`Keeper`] keeps the map current: after each applied plan, on netlink
//! events ([`watch`]) and periodically ([`REFRESH_INTERVAL`], for path MTU exceptions, which
//! send no event), writing only the entries that changed.
//!
//! Gateways are kept resolved: when a next hop goes through a neighbour that has no entry at
//! all, the keeper adds a managed one (`NTF_EXT_MANAGED`, Linux 5.16+), which the kernel probes
//! and keeps reachable by itself, so the fast path rarely meets `NH_NO_NEIGH`. Entries that
//! exist are never touched.

pub mod resolver;
pub mod translate;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use lb_common::{Member, NH_UNRESOLVED, NODE_F_SRC_V4, NODE_F_SRC_V6, NextHop, NodeConfig};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

pub use resolver::{ResolveError, Resolver};

use crate::{kernel::dataplane::DataplaneError, model::desired::ip_of};

/// How often every next hop is worked out again even without a netlink event.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// How long a burst of netlink events is gathered before one refresh.
pub const DEBOUNCE: Duration = Duration::from_millis(5);

/// Where next hops are kept ([`crate::kernel::dataplane::kernel::KernelDataplane`], or memory).
pub trait NexthopMap {
    fn nexthop(&self, id: u32) -> Result<NextHop, DataplaneError>;
    fn set_nexthop(&mut self, id: u32, nh: &NextHop) -> Result<(), DataplaneError>;
}

/// A member whose next hop is wanted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub id: u32,
    pub addr: IpAddr,
    pub generation: u32,
}

/// Every live member, from what the maps hold.
pub fn targets(members: &BTreeMap<u32, Member>) -> Vec<Target> {
    members
        .iter()
        .map(|(id, m)| Target {
            id: *id,
            addr: ip_of(&m.addr, m.family),
            generation: m.generation,
        })
        .collect()
}

/// The node's source addresses (the outer source of every tunnel).
pub fn sources(node: &NodeConfig) -> (Option<IpAddr>, Option<IpAddr>) {
    let v4 = (node.flags & NODE_F_SRC_V4 != 0).then(|| IpAddr::V4(Ipv4Addr::from(node.src_v4)));
    let v6 = (node.flags & NODE_F_SRC_V6 != 0).then(|| IpAddr::V6(Ipv6Addr::from(node.src_v6)));
    (v4, v6)
}

/// What `lb backends --json` / status.json and the metrics report about next hops.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NexthopStatus {
    /// Live members whose entry is resolved (any action but `NH_UNRESOLVED`).
    pub resolved: u64,
    /// Live members left to `bpf_fib_lookup` (the resolver failed for them).
    pub unresolved: u64,
    /// Refreshes done (each one looks at every live member).
    pub refreshes: u64,
    /// Resolutions that failed, in total.
    pub failures: u64,
    /// Entries written, in total.
    pub writes: u64,
    /// When the last refresh finished (RFC 3339).
    pub last_refresh: Option<String>,
}

/// The entries to write: those of `wanted` that differ from what `written` says the map holds.
pub fn changes(
    written: &BTreeMap<u32, NextHop>,
    wanted: &BTreeMap<u32, NextHop>,
) -> Vec<(u32, NextHop)> {
    wanted
        .iter()
        .filter(|(id, nh)| written.get(id) != Some(nh))
        .map(|(id, nh)| (*id, *nh))
        .collect()
}

/// Resolves every target's address once (members of one backend share it): the entry per
/// member with its generation, `NH_UNRESOLVED` where resolution failed, with the errors, and
/// the neighbours that have no entry.
pub async fn resolve_all(
    resolver: &Resolver,
    targets: &[Target],
    (src4, src6): (Option<IpAddr>, Option<IpAddr>),
) -> Resolved {
    let mut out = Resolved::default();
    let snap = match resolver.snapshot().await {
        Ok(s) => s,
        Err(e) => {
            let e = crate::error_chain(&e);
            for t in targets {
                out.entries.insert(t.id, unresolved(t.generation));
                out.errors.push((t.addr, e.clone()));
            }
            return out;
        }
    };
    let mut by_addr: BTreeMap<IpAddr, Result<NextHop, String>> = BTreeMap::new();
    for t in targets {
        let r = match by_addr.get(&t.addr) {
            Some(r) => r.clone(),
            None => {
                let src = if t.addr.is_ipv4() { src4 } else { src6 };
                let r = match resolver.resolve(t.addr, src, &snap).await {
                    Ok((nh, missing)) => {
                        out.missing.extend(missing);
                        Ok(nh)
                    }
                    Err(e) => {
                        out.errors.push((t.addr, crate::error_chain(&e)));
                        Err(crate::error_chain(&e))
                    }
                };
                by_addr.insert(t.addr, r.clone());
                r
            }
        };
        let mut nh = r.unwrap_or_default();
        nh.generation = t.generation;
        out.entries.insert(t.id, nh);
    }
    out
}

fn unresolved(generation: u32) -> NextHop {
    NextHop {
        generation,
        action: NH_UNRESOLVED,
        ..Default::default()
    }
}

/// The result of [`resolve_all`].
#[derive(Debug, Default)]
pub struct Resolved {
    /// Member id -> entry.
    pub entries: BTreeMap<u32, NextHop>,
    /// (backend address, why) for each address that could not be resolved.
    pub errors: Vec<(IpAddr, String)>,
    /// (ifindex, address) of neighbours next hops go through that have no entry.
    pub missing: BTreeSet<(u32, IpAddr)>,
}

/// Keeps `LB_NEXTHOPS` current for the agent.
pub struct Keeper {
    resolver: Resolver,
    /// What the map holds, as far as this keeper wrote or read it.
    written: BTreeMap<u32, NextHop>,
    pub status: NexthopStatus,
    /// Add managed neighbour entries for next hops without one.
    pub manage_neighbours: bool,
    /// The last failure per backend address, so a lasting one is logged once.
    failing: BTreeMap<IpAddr, String>,
}

impl Keeper {
    /// Opens the netlink socket (in the agent's namespace; on the current tokio runtime).
    pub fn new() -> Result<Self, ResolveError> {
        Ok(Self {
            resolver: Resolver::new()?,
            written: BTreeMap::new(),
            status: NexthopStatus::default(),
            manage_neighbours: true,
            failing: BTreeMap::new(),
        })
    }

    /// Works out every live member's next hop and writes those that changed. Failures are
    /// logged and counted, never returned: the entry is then `NH_UNRESOLVED`.
    pub async fn refresh(
        &mut self,
        members: &BTreeMap<u32, Member>,
        node: &NodeConfig,
        map: &mut impl NexthopMap,
    ) {
        let targets = targets(members);
        let r = resolve_all(&self.resolver, &targets, sources(node)).await;
        self.log_failures(&r.errors);
        self.status.failures += r.errors.len() as u64;
        self.write(&r.entries, map);
        if self.manage_neighbours {
            self.keep_resolved(&r.missing).await;
        }
        let unresolved = r
            .entries
            .values()
            .filter(|nh| nh.action == NH_UNRESOLVED)
            .count() as u64;
        self.status.unresolved = unresolved;
        self.status.resolved = r.entries.len() as u64 - unresolved;
        self.status.refreshes += 1;
        self.status.last_refresh =
            Some(humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string());
    }

    /// Logs failures that are new or changed, and recoveries.
    fn log_failures(&mut self, errors: &[(IpAddr, String)]) {
        let now: BTreeMap<IpAddr, String> = errors.iter().cloned().collect();
        for (addr, e) in &now {
            if self.failing.get(addr) != Some(e) {
                warn!(backend = %addr, "resolving the next hop failed, the program routes it itself: {e}");
            }
        }
        for addr in self.failing.keys().filter(|a| !now.contains_key(a)) {
            info!(backend = %addr, "next hop resolved again");
        }
        self.failing = now;
    }

    fn write(&mut self, wanted: &BTreeMap<u32, NextHop>, map: &mut impl NexthopMap) {
        for id in wanted.keys() {
            if !self.written.contains_key(id)
                && let Ok(nh) = map.nexthop(*id)
            {
                self.written.insert(*id, nh);
            }
        }
        for (id, nh) in changes(&self.written, wanted) {
            match map.set_nexthop(id, &nh) {
                Ok(()) => {
                    self.written.insert(id, nh);
                    self.status.writes += 1;
                }
                Err(e) => {
                    self.written.remove(&id);
                    self.status.failures += 1;
                    warn!(
                        member = id,
                        "writing the next hop: {}",
                        crate::error_chain(&e)
                    );
                }
            }
        }
    }

    /// Adds managed entries for `missing`; the first refusal (an old kernel, no CAP_NET_ADMIN)
    /// is logged and turns this off, rather than being logged at every refresh.
    async fn keep_resolved(&mut self, missing: &BTreeSet<(u32, IpAddr)>) {
        for (ifindex, addr) in missing {
            if let Err(e) = self.resolver.keep_resolved(*ifindex, *addr).await {
                warn!(
                    neighbour = %addr, ifindex,
                    "adding a managed neighbour entry failed, no more will be added (gateways are then resolved by traffic): {}",
                    crate::error_chain(&e)
                );
                self.manage_neighbours = false;
                return;
            }
        }
    }
}

/// Sends a unit on `tx` whenever a link, neighbour, address or route changes (in the calling
/// thread's namespace). The returned task ends when `tx` is closed.
pub fn watch(
    tx: tokio::sync::mpsc::Sender<()>,
) -> Result<tokio::task::JoinHandle<()>, ResolveError> {
    use futures::StreamExt as _;
    use rtnetlink::MulticastGroup as G;
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        G::Link,
        G::Neigh,
        G::Ipv4Route,
        G::Ipv6Route,
        G::Ipv4Ifaddr,
        G::Ipv6Ifaddr,
    ])
    .map_err(ResolveError::Socket)?;
    let conn = tokio::spawn(conn);
    Ok(tokio::spawn(async move {
        while messages.next().await.is_some() {
            if tx.is_closed() {
                return conn.abort();
            }
            let _ = tx.try_send(());
        }
        warn!(
            "the netlink event stream ended: next hops are refreshed every {REFRESH_INTERVAL:?} only"
        );
        conn.abort();
    }))
}

/// [`resolve_all`] on a runtime of its own, for callers that are not async (the test harness):
/// resolves in the calling thread's namespace.
pub fn resolve_blocking(
    targets: &[Target],
    sources: (Option<IpAddr>, Option<IpAddr>),
) -> Result<Resolved, ResolveError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ResolveError::Socket)?;
    rt.block_on(async {
        let resolver = Resolver::new()?;
        Ok(resolve_all(&resolver, targets, sources).await)
    })
}

#[cfg(test)]
mod tests {
    use lb_common::{NH_FORWARD, NH_LOCAL};

    use super::*;

    fn nh(action: u8, generation: u32) -> NextHop {
        NextHop {
            action,
            generation,
            ..Default::default()
        }
    }

    #[test]
    fn only_entries_that_differ_from_what_was_written_are_written() {
        let written = BTreeMap::from([(1, nh(NH_FORWARD, 1)), (2, nh(NH_FORWARD, 1))]);
        let wanted = BTreeMap::from([
            (1, nh(NH_FORWARD, 1)),
            (2, nh(NH_LOCAL, 1)),
            (3, nh(NH_FORWARD, 4)),
        ]);
        assert_eq!(
            changes(&written, &wanted),
            [(2, nh(NH_LOCAL, 1)), (3, nh(NH_FORWARD, 4))]
        );
        assert!(changes(&wanted, &wanted).is_empty());
    }

    #[test]
    fn a_new_generation_of_a_member_is_a_change() {
        let written = BTreeMap::from([(1, nh(NH_FORWARD, 1))]);
        let wanted = BTreeMap::from([(1, nh(NH_FORWARD, 2))]);
        assert_eq!(changes(&written, &wanted), [(1, nh(NH_FORWARD, 2))]);
    }

    #[test]
    fn the_sources_are_the_nodes_configured_addresses() {
        let mut n = NodeConfig {
            src_v4: [10, 0, 0, 1],
            flags: NODE_F_SRC_V4,
            ..Default::default()
        };
        assert_eq!(sources(&n), (Some("10.0.0.1".parse().unwrap()), None));
        n.flags = 0;
        assert_eq!(sources(&n), (None, None));
    }
}
