//! What a scrape reports: read from the pinned maps (so they are the same numbers `lb stats`
//! shows) and from the agent's own figures, into [`Family`]s.
//!
//! Every per-(VIP, backend) series carries `vip` (the [`VipRef`] label) and `backend` (the
//! [`BackendRef`] label, `address:port`), so that families join on them.

use std::{collections::BTreeMap, sync::atomic::Ordering};

use aya::maps::{Array, MapData};
use lb_common::{Counter, NextHop, PassiveHealth, TrafficStats, VipKey};

use super::{
    AgentMetrics, Maps,
    exposition::{Family, Labels},
};
use crate::{
    kernel::inspect::{InspectError, Pinned},
    kernel::nexthop::NexthopStatus,
    model::view::{BackendRef, VipRef},
};

/// Every family of one scrape.
pub fn families(maps: &Maps, a: &AgentMetrics) -> Result<Vec<Family>, InspectError> {
    let p = &maps.pinned;
    let mut out = global(p)?;
    let t = p.tables()?;
    out.extend(traffic(p, &maps.nexthops, &t.connections)?);
    out.extend(tables(t));
    out.extend(agent(a));
    out.extend(config(&a.vips.lock().expect("vips lock")));
    // Cloned: the lock is not held over the netlink requests.
    let links = a.links.lock().expect("links lock").clone();
    out.push(interfaces(&links));
    out.extend(nexthops(&a.nexthops.lock().expect("nexthops lock")));
    out.extend(announce(a.announce.lock().expect("announce lock").as_ref()));
    Ok(out)
}

/// What the node announces through its routing daemon (nothing when `node.announce` is off).
fn announce(a: Option<&crate::kernel::announce::AnnounceStatus>) -> Vec<Family> {
    let Some(a) = a else { return Vec::new() };
    vec![
        Family::gauge(
            "lb_announced_vips",
            "VIP addresses this node announces (routes in its announcement table)",
            vec![(vec![], a.announced.len() as f64)],
        ),
        Family::gauge(
            "lb_vip_announced",
            "1 for each VIP address this node announces",
            a.announced
                .iter()
                .map(|ip| (vec![("address", ip.to_string())], 1.0))
                .collect(),
        ),
        Family::gauge(
            "lb_announce_failing",
            "1 while the last change to the announcement table failed (see the log)",
            vec![(vec![], f64::from(u8::from(a.error.is_some())))],
        ),
    ]
}

/// The program's verdicts and events. The total is not a family of its own: it is the sum of
/// the verdicts (and `vip_packets` that of `lb_vip_packets_total`).
fn global(p: &Pinned) -> Result<Vec<Family>, InspectError> {
    let counters = p.counters()?;
    let of = |verdicts: bool, label: &'static str| -> Vec<(Labels, u64)> {
        counters
            .iter()
            .filter(|(c, _)| c.is_verdict() == verdicts)
            .filter(|(c, _)| !matches!(c, Counter::Packets | Counter::VipPackets))
            .map(|(c, v)| (vec![(label, c.name().to_string())], *v))
            .collect()
    };
    Ok(vec![
        Family::counter(
            "lb_packets",
            "Packets the XDP program ran on, by verdict: each packet ends in exactly one, so their sum is every packet",
            of(true, "verdict"),
        ),
        Family::counter(
            "lb_events",
            "What happened to packets on the way (flow-table hits, fragments, NAT translations...); a packet counts in any number of events, their sum means nothing",
            of(false, "event"),
        ),
    ])
}

/// Per VIP, and per backend of each VIP (a member): traffic, passive health, next hop.
fn traffic(
    p: &Pinned,
    nh: &Array<MapData, NextHop>,
    conns: &crate::kernel::inspect::Conns,
) -> Result<Vec<Family>, InspectError> {
    let vips = p.vips()?;
    let ranges = p.port_ranges()?;
    let label = |k: &VipKey| VipRef::of_range(k, ranges.get(k).copied()).label;
    let (mut packets, mut bytes, mut flows, mut refused) = (vec![], vec![], vec![], vec![]);
    let (mut over_budget, mut reply_packets, mut reply_bytes) = (vec![], vec![], vec![]);
    for (k, v) in &vips {
        let s = p.vip_stats(v.id)?;
        let l = vec![("vip", label(k))];
        let r = p.vip_replies(v.id)?;
        reply_packets.push((l.clone(), r.packets));
        reply_bytes.push((l.clone(), r.bytes));
        refused.push((l.clone(), p.vip_source_drops(v.id)));
        over_budget.push((l.clone(), p.vip_budget_drops(v.id)));
        packets.push((l.clone(), s.packets));
        bytes.push((l.clone(), s.bytes));
        flows.push((l, s.new_flows));
    }
    let mut out = vec![
        Family::counter("lb_vip_packets", "Packets per VIP", packets),
        Family::counter("lb_vip_bytes", "Bytes per VIP, as received", bytes),
        Family::counter("lb_vip_new_flows", "New flows per VIP", flows),
        Family::counter(
            "lb_vip_reply_packets",
            "NAT mode: packets per VIP from its backends translated back to clients",
            reply_packets,
        ),
        Family::counter(
            "lb_vip_reply_bytes",
            "NAT mode: bytes per VIP from its backends translated back to clients, as received",
            reply_bytes,
        ),
        Family::counter(
            "lb_vip_drop_source_range",
            "Packets per VIP dropped because their source is outside the VIP's source ranges",
            refused,
        ),
        Family::counter(
            "lb_vip_drop_new_flow_budget",
            "Packets per VIP that would have made a new flow, dropped because the VIP's new-flow budget had no token left",
            over_budget,
        ),
    ];
    let keys: BTreeMap<u32, VipKey> = vips.iter().map(|(k, v)| (v.id, *k)).collect();
    let mut rows = MemberRows::default();
    // Per member: a backend serving two VIPs has a series under each (`sum by (backend)`
    // adds them up).
    for (id, m) in p.members()? {
        let Some(vip) = keys.get(&m.vip_id) else {
            continue; // its VIP went between the two reads
        };
        let hop = nh.get(&id, 0).map_err(|source| InspectError::Map {
            what: "next hops",
            source,
        })?;
        // An entry of another generation is one the program ignores: not resolved yet.
        let action = match hop.generation == m.generation {
            true => hop.action,
            false => lb_common::NH_UNRESOLVED,
        };
        rows.push(
            backend_labels(&label(vip), &BackendRef::of(&m, vip)),
            Member {
                traffic: p.member_stats(id)?,
                replies: p.member_replies(id)?,
                passive: p.passive(id)?,
                connections: conns.get(&id).copied().unwrap_or_default(),
                nexthop_action: action,
            },
        );
    }
    out.extend(rows.families());
    Ok(out)
}

/// What a scrape reads of one member.
struct Member {
    traffic: TrafficStats,
    replies: TrafficStats,
    passive: PassiveHealth,
    connections: crate::kernel::inspect::Connections,
    nexthop_action: u8,
}

/// The per-member rows of each family, as they are read.
#[derive(Default)]
struct MemberRows {
    packets: Vec<(Labels, u64)>,
    bytes: Vec<(Labels, u64)>,
    flows: Vec<(Labels, u64)>,
    reply_packets: Vec<(Labels, u64)>,
    reply_bytes: Vec<(Labels, u64)>,
    connections: Vec<(Labels, f64)>,
    attempts: Vec<(Labels, u64)>,
    streaks: Vec<(Labels, f64)>,
    hops: Vec<(Labels, f64)>,
}

impl MemberRows {
    fn push(&mut self, l: Labels, m: Member) {
        let with = |k: &'static str, v: &str| {
            let mut l = l.clone();
            l.push((k, v.to_string()));
            l
        };
        let (s, h) = (m.traffic, m.passive);
        self.packets.push((l.clone(), s.packets));
        self.bytes.push((l.clone(), s.bytes));
        self.flows.push((l.clone(), s.new_flows));
        self.reply_packets.push((l.clone(), m.replies.packets));
        self.reply_bytes.push((l.clone(), m.replies.bytes));
        let c = m.connections;
        self.connections
            .push((with("state", "active"), c.active as f64));
        self.connections
            .push((with("state", "inactive"), c.inactive as f64));
        for (outcome, n) in [
            ("answered", h.answered),
            ("refused", h.refused),
            ("unreachable", h.unreachable),
            ("syn_timeout", h.syn_timeouts),
        ] {
            self.attempts.push((with("outcome", outcome), n));
        }
        self.streaks
            .push((l.clone(), h.consecutive_failures as f64));
        let action = crate::observe::nexthop::action_name(m.nexthop_action);
        self.hops.push((with("action", action), 1.0));
    }

    fn families(self) -> [Family; 9] {
        [
            Family::counter(
                "lb_backend_packets",
                "Packets per backend of each VIP",
                self.packets,
            ),
            Family::counter(
                "lb_backend_bytes",
                "Bytes per backend of each VIP, as received",
                self.bytes,
            ),
            Family::counter(
                "lb_backend_new_flows",
                "New flows per backend of each VIP",
                self.flows,
            ),
            Family::counter(
                "lb_backend_reply_packets",
                "NAT mode: packets per backend of each VIP translated back to clients",
                self.reply_packets,
            ),
            Family::counter(
                "lb_backend_reply_bytes",
                "NAT mode: bytes per backend of each VIP translated back to clients, as received",
                self.reply_bytes,
            ),
            Family::gauge(
                "lb_backend_connections",
                "Open connections per backend of each VIP, as IPVS counts them: active (established) and inactive (handshake, closing); NAT from its translations, DSR from its flow entries (an upper bound: an entry outlives its connection)",
                self.connections,
            ),
            Family::counter(
                "lb_backend_connection_attempts",
                "NAT mode: connection attempts per backend of each VIP, by how the backend answered (passive health)",
                self.attempts,
            ),
            Family::gauge(
                "lb_backend_consecutive_failures",
                "NAT mode: failed connection attempts since the backend last answered one (passive health)",
                self.streaks,
            ),
            Family::gauge(
                "lb_backend_nexthop",
                "How the program sends packets to the backend of each VIP: the action of its next hop as the agent resolved it (forward, no_neighbour, local, unreachable; unresolved: left to bpf_fib_lookup); always 1",
                self.hops,
            ),
        ]
    }
}

/// The `vip` and `backend` labels of a backend of the VIP labelled `vip`.
pub fn backend_labels(vip: &str, backend: &BackendRef) -> Labels {
    vec![("vip", vip.to_string()), ("backend", backend.label.clone())]
}

/// How full the flow, affinity and NAT tables are: `lb_table_entries / lb_table_capacity`.
fn tables(t: crate::kernel::inspect::Tables) -> Vec<Family> {
    let crate::kernel::inspect::Tables {
        fill: rows,
        nat_ports: ports,
        flows_ipv4: flows,
        ..
    } = t;
    let label = |t: &str| vec![("table", t.to_string())];
    let state = |s: &str| vec![("state", s.to_string())];
    vec![
        Family::gauge(
            "lb_flows_ipv4",
            "IPv4 flows in the flow table by state (new: seen once, what a SYN flood leaves; an established flow is never evicted by a new one while it is active)",
            vec![
                (state("established"), flows.established as f64),
                (state("new"), flows.new as f64),
            ],
        ),
        Family::gauge(
            "lb_nat_ports",
            "NAT source ports held, by the state of their translation (half-open: handshakes the client has yet to complete)",
            crate::kernel::inspect::NatState::HOLDING
                .iter()
                .map(|s| (vec![("state", s.name().to_string())], ports.get(*s) as f64))
                .collect(),
        ),
        Family::gauge(
            "lb_table_entries",
            "Entries in each of the program's tables (flows_ipv4 counts occupied ways of its buckets)",
            rows.iter()
                .map(|(t, f)| (label(t), f.entries as f64))
                .collect(),
        ),
        Family::gauge(
            "lb_table_capacity",
            "Entries each of the program's tables can hold (fixed when the maps were created)",
            rows.iter()
                .map(|(t, f)| (label(t), f.capacity as f64))
                .collect(),
        ),
    ]
}

/// Each VIP's name and mode, and each backend's effective weight and passive state, as the
/// agent last wrote them to its status file.
fn config(vips: &[crate::status::file::VipStatus]) -> [Family; 3] {
    let (mut info, mut weights, mut out) = (vec![], vec![], vec![]);
    for v in vips {
        let mode = serde_json::to_value(v.mode).ok();
        let mode = mode
            .as_ref()
            .and_then(|m| m.as_str())
            .unwrap_or("")
            .to_string();
        info.push((
            vec![
                ("vip", v.vip.clone()),
                ("name", v.name.clone()),
                ("mode", mode),
            ],
            1.0,
        ));
        // The VIP's port, for backends that take it: `192.0.2.10:80/tcp`.
        let vip_port = v
            .vip
            .rsplit_once('/')
            .and_then(|(a, _)| a.parse::<std::net::SocketAddr>().ok());
        for b in &v.backends {
            let Ok(addr) = b.address.parse() else {
                continue;
            };
            let at = crate::model::view::endpoint(addr, b.port, vip_port.map_or(0, |a| a.port()));
            let l = vec![("vip", v.vip.clone()), ("backend", at.to_string())];
            weights.push((l.clone(), f64::from(b.effective_weight)));
            out.push((l, f64::from(u8::from(b.passive_out))));
        }
    }
    [
        Family::gauge(
            "lb_vip_info",
            "1 for each VIP, labelled with its name and mode (dsr, nat)",
            info,
        ),
        Family::gauge(
            "lb_backend_weight",
            "The weight each backend of each VIP has in its Maglev table now: the configured one (or its lb drain / lb weight override), 0 while unhealthy or out",
            weights,
        ),
        Family::gauge(
            "lb_backend_passive_out",
            "1 while passive health checking has the backend of the VIP out, 0 if not",
            out,
        ),
    ]
}

/// The agent's own figures.
fn agent(a: &AgentMetrics) -> Vec<Family> {
    let one = |v: u64| vec![(vec![], v)];
    let health = a
        .health
        .lock()
        .expect("health lock")
        .iter()
        .map(|(vip, backend, ok)| {
            (
                vec![("vip", vip.clone()), ("backend", backend.clone())],
                *ok as u8 as f64,
            )
        })
        .collect();
    let mut families = vec![
        Family::gauge(
            "lb_backend_healthy",
            "1 if the backend of the VIP passes its health check, 0 if not (backends with a check only)",
            health,
        ),
        Family::counter(
            "lb_config_reloads",
            "Config reloads (and cluster changes) applied",
            one(a.reloads_ok.load(Ordering::Relaxed)),
        ),
        Family::counter(
            "lb_config_reloads_rejected",
            "Config reloads (and cluster changes) refused: the previous state kept serving",
            one(a.reloads_rejected.load(Ordering::Relaxed)),
        ),
        Family::gauge(
            "lb_config_last_reload_success_timestamp_seconds",
            "When the agent last applied a config (its start, a reload or a cluster change), in seconds since the Unix epoch",
            vec![(vec![], a.last_applied_seconds())],
        ),
        Family::counter(
            "lb_map_writes",
            "Map entries written by the agent",
            one(a.map_writes.load(Ordering::Relaxed)),
        ),
        Family::gauge(
            "lb_build_info",
            "The lb serving: its version, and the layout version its LB_META records; always 1",
            vec![(
                vec![
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                    (
                        "layout",
                        crate::kernel::migrate::schema::record_version().to_string(),
                    ),
                ],
                1.0,
            )],
        ),
    ];
    families.extend(migrations(a));
    families
}

/// The figures of the agent's map migrations.
fn migrations(a: &AgentMetrics) -> Vec<Family> {
    let last = a.migration.lock().expect("migration lock").clone();
    let last = last.as_ref();
    vec![
        Family::counter(
            "lb_map_migrations",
            "Loads of the program that moved map entries into new maps (another size or schema), by result; a failed one left the old program and maps serving",
            vec![
                (
                    vec![("result", "ok".into())],
                    a.migrations_ok.load(Ordering::Relaxed),
                ),
                (
                    vec![("result", "failed".into())],
                    a.migrations_failed.load(Ordering::Relaxed),
                ),
            ],
        ),
        Family::gauge(
            "lb_map_migration_last_duration_seconds",
            "How long the last migration took, the swap included (0 before the first)",
            vec![(vec![], last.map_or(0.0, |m| m.duration_ms / 1e3))],
        ),
        Family::gauge(
            "lb_map_migration_last_entries",
            "Entries the last migration copied and merged into new maps",
            vec![(vec![], last.map_or(0.0, |m| (m.entries + m.merged) as f64))],
        ),
    ]
}

/// Whether lb's program is attached to each interface the agent keeps it on, as the kernel says
/// at the scrape (what `/readyz` checks), so that an alert can name the interface.
fn interfaces(expected: &crate::kernel::links::Expected) -> Family {
    Family::gauge(
        "lb_interface_attached",
        "1 if lb's program is attached to the interface (the program of the link lb pinned for it is the one the device runs), 0 if not",
        expected
            .attached()
            .into_iter()
            .map(|(i, ours)| (vec![("interface", i)], f64::from(u8::from(ours))))
            .collect(),
    )
}

/// The next-hop keeper's gauges and counters.
fn nexthops(nh: &NexthopStatus) -> Vec<Family> {
    vec![
        Family::gauge(
            "lb_nexthops",
            "Live members by next-hop state: resolved by the agent, or left to bpf_fib_lookup",
            vec![
                (vec![("state", "resolved".into())], nh.resolved as f64),
                (vec![("state", "unresolved".into())], nh.unresolved as f64),
            ],
        ),
        Family::counter(
            "lb_nexthop_refreshes",
            "Next-hop refreshes done (each looks at every live member)",
            vec![(vec![], nh.refreshes)],
        ),
        Family::counter(
            "lb_nexthop_failures",
            "Next hops the agent failed to resolve or write",
            vec![(vec![], nh.failures)],
        ),
        Family::counter(
            "lb_nexthop_writes",
            "Next-hop entries written",
            vec![(vec![], nh.writes)],
        ),
    ]
}
