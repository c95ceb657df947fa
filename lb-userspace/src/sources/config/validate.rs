//! Checking a raw config, section by section: the node's settings ([`node`]), then each VIP
//! ([`vip`]) with its backends ([`backends`]) and passive health ([`passive`]). Every problem is
//! collected with its path (`vips[0].backends[1].weight`), so one run reports them all.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use super::*;
use crate::model::desired::PortRange;

/// Checks a raw config, returning every problem found (and the warnings found meanwhile).
pub fn validate(raw: &RawConfig) -> Result<Config, (Vec<Problem>, Vec<String>)> {
    let mut c = Checker {
        problems: Vec::new(),
    };
    let mut warnings = Vec::new();
    let node = node(&mut c, &raw.node);
    let vips = vips(&mut c, &mut warnings, raw, &node);
    if !c.problems.is_empty() {
        return Err((c.problems, warnings));
    }
    Ok(Config {
        node,
        vips,
        warnings,
    })
}

/// `node`: interfaces, XDP mode, addresses, sizes, timeouts, metrics and announcing.
fn node(c: &mut Checker, n: &RawNode) -> NodeSettings {
    interfaces(c, &n.interfaces);
    let xdp_mode = c.choice(
        "node.xdp_mode",
        n.xdp_mode.as_deref(),
        XdpMode::Auto,
        &[
            ("auto", XdpMode::Auto),
            ("native", XdpMode::Native),
            ("generic", XdpMode::Generic),
        ],
    );
    let source_v4 = n.source_v4.as_deref().and_then(|s| {
        s.parse::<Ipv4Addr>()
            .map_err(|_| c.bad("node.source_v4", format!("{s:?} is not an IPv4 address")))
            .ok()
    });
    let source_v6 = n.source_v6.as_deref().and_then(|s| {
        s.parse::<Ipv6Addr>()
            .map_err(|_| c.bad("node.source_v6", format!("{s:?} is not an IPv6 address")))
            .ok()
    });
    let sizes = sizes(c, n);
    let kernel_memory_limit = check_kernel_memory(c, n.kernel_memory_limit.as_deref(), &sizes);
    let udp_idle_timeout = c.duration(
        "node.udp_idle_timeout",
        n.udp_idle_timeout.as_deref(),
        DEFAULT_UDP_IDLE_TIMEOUT,
    );
    let nat = nat(c, n);
    let metrics_listen = n.metrics_listen.as_deref().and_then(|s| {
        s.parse::<SocketAddr>()
            .map_err(|_| {
                c.bad(
                    "node.metrics_listen",
                    format!("{s:?} is not an address:port (e.g. 127.0.0.1:9435)"),
                )
            })
            .ok()
    });
    let announce = n.announce.as_ref().map(|a| check_announce(c, a));
    NodeSettings {
        interfaces: n.interfaces.clone(),
        xdp_mode,
        sizes,
        kernel_memory_limit,
        metrics_listen,
        spec: NodeSpec {
            source_v4,
            source_v6,
            udp_idle_timeout,
            nat,
            nexthop_check: n.nexthop_check.unwrap_or(false),
        },
        announce,
    }
}

/// `node.interfaces`: names the kernel would take, each once. (None: the agent takes the
/// uplink of the host's default route, see `crate::sources::uplink`.)
fn interfaces(c: &mut Checker, names: &[String]) {
    let mut seen = BTreeSet::new();
    for (i, name) in names.iter().enumerate() {
        if name.is_empty()
            || name.len() > 15
            || name.contains(['/', ' ', '\t'])
            || name == "."
            || name == ".."
        {
            c.bad(
                format!("node.interfaces[{i}]"),
                format!("{name:?} is not a valid interface name"),
            );
        } else if !seen.insert(name) {
            c.bad(
                format!("node.interfaces[{i}]"),
                format!("{name:?} is listed twice"),
            );
        }
    }
}

/// The sizes fixed at load time: `node.table_size`, `max_vips`, `max_backends` and the tables'.
fn sizes(c: &mut Checker, n: &RawNode) -> Sizes {
    let defaults = Sizes::default();
    let mut int = |key: &str, v: Option<i64>, default: u32, range| {
        c.int(&format!("node.{key}"), v, default as i64, range) as u32
    };
    let table_size = int(
        "table_size",
        n.table_size,
        defaults.table_size,
        2..=(1 << 24),
    );
    let max_vips = int("max_vips", n.max_vips, defaults.max_vips, 1..=65_535);
    let max_backends = int(
        "max_backends",
        n.max_backends,
        defaults.max_backends,
        1..=(1 << 20),
    );
    let flow_table_size = int(
        "flow_table_size",
        n.flow_table_size,
        defaults.flow_table_size,
        1..=(1 << 27),
    );
    let affinity_table_size = int(
        "affinity_table_size",
        n.affinity_table_size,
        defaults.affinity_table_size,
        1..=(1 << 27),
    );
    let nat_table_size = int(
        "nat_table_size",
        n.nat_table_size,
        defaults.nat_table_size,
        1..=(1 << 27),
    );
    if !maglev::is_prime(table_size) {
        c.bad("node.table_size", format!("{table_size} is not prime (Maglev needs a prime table size, e.g. 65537, 131071, 1000003)"));
    }
    if (max_vips as u64) * (table_size as u64) > (1u64 << 31) {
        c.bad("node.max_vips", format!("{max_vips} VIPs x {table_size} slots is more than one BPF array can hold (2^31 slots)"));
    }
    Sizes {
        table_size,
        max_vips,
        max_backends,
        flow_table_size,
        affinity_table_size,
        nat_table_size,
    }
}

/// NAT mode's node settings: the port range and the translations' timeouts.
fn nat(c: &mut Checker, n: &RawNode) -> NatSpec {
    let mut nat = NatSpec::default();
    if let Some(r) = n.nat_port_range.as_deref() {
        match r
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
        {
            Some((lo, hi)) if (1..=hi).contains(&lo) => {
                nat.port_min = lo;
                nat.port_max = hi;
            }
            _ => c.bad(
                "node.nat_port_range",
                format!(
                    "{r:?} is not a port range like 1024-32767 (first <= last, both 1..=65535)"
                ),
            ),
        }
    }
    let mut duration = |key: &str, v: &Option<String>, default| {
        c.duration(&format!("node.{key}"), v.as_deref(), default)
    };
    nat.close_grace = duration("nat_close_grace", &n.nat_close_grace, nat.close_grace);
    nat.syn_timeout = duration("syn_timeout", &n.syn_timeout, nat.syn_timeout);
    nat.half_open_timeout = duration(
        "nat_half_open_timeout",
        &n.nat_half_open_timeout,
        nat.half_open_timeout,
    );
    nat.tcp_idle_timeout = duration(
        "nat_tcp_idle_timeout",
        &n.nat_tcp_idle_timeout,
        nat.tcp_idle_timeout,
    );
    if nat.syn_timeout.is_zero() {
        c.bad("node.syn_timeout", "must be more than 0");
    }
    if !(MIN_NAT_HALF_OPEN_TIMEOUT..=MAX_NAT_HALF_OPEN_TIMEOUT).contains(&nat.half_open_timeout) {
        c.bad(
            "node.nat_half_open_timeout",
            "must be from 1s (a handshake's round trip and a retransmitted SYN) to 10m",
        );
    }
    if !nat.tcp_idle_timeout.is_zero() && nat.tcp_idle_timeout < MIN_NAT_TCP_IDLE_TIMEOUT {
        c.bad(
            "node.nat_tcp_idle_timeout",
            "must be 0 (never) or at least 1s: shorter would cut connections that merely pause",
        );
    }
    nat
}

/// What checking one VIP needs to know of the others and of the node.
struct Vips<'a> {
    node: &'a NodeSettings,
    raw_node: &'a RawNode,
    /// (address, port, protocol) -> the first VIP that has it.
    seen: BTreeMap<(IpAddr, u16, Protocol), usize>,
    /// (address, protocol) -> the VIP with a port range there, and its range.
    ranges: BTreeMap<(IpAddr, Protocol), (usize, PortRange)>,
    names: BTreeMap<String, usize>,
    /// `max_backends` counts memberships: a backend takes one member id per VIP it serves.
    memberships: usize,
}

/// `vips`: each VIP, then the limits of the node over all of them.
fn vips(
    c: &mut Checker,
    warnings: &mut Vec<String>,
    raw: &RawConfig,
    node: &NodeSettings,
) -> Vec<VipConfig> {
    let (max_vips, max_backends) = (node.sizes.max_vips, node.sizes.max_backends);
    if raw.vips.len() > max_vips as usize {
        c.bad(
            "vips",
            format!(
                "{} VIPs, more than node.max_vips ({max_vips})",
                raw.vips.len()
            ),
        );
    }
    let mut all = Vips {
        node,
        raw_node: &raw.node,
        seen: BTreeMap::new(),
        ranges: BTreeMap::new(),
        names: BTreeMap::new(),
        memberships: 0,
    };
    let vips = raw
        .vips
        .iter()
        .enumerate()
        .filter_map(|(i, v)| vip(c, warnings, &mut all, i, v))
        .collect();
    if all.memberships > max_backends as usize {
        c.bad(
            "vips",
            format!(
                "{} backends of VIPs (a backend counts once per VIP it serves), more than node.max_backends ({max_backends})",
                all.memberships
            ),
        );
    }
    vips
}

/// `vips[i].address`: a unicast IP address.
fn vip_address(c: &mut Checker, p: &str, raw: Option<&str>) -> Option<IpAddr> {
    let Some(s) = raw else {
        c.bad(format!("{p}.address"), "missing");
        return None;
    };
    let a = s
        .parse::<IpAddr>()
        .map_err(|_| {
            c.bad(
                format!("{p}.address"),
                format!("{s:?} is not an IP address"),
            )
        })
        .ok()?;
    if let Some(what) = not_unicast(a) {
        let why = format!("{a} is {what}: a VIP is a unicast address clients send to");
        c.bad(format!("{p}.address"), why);
        return None;
    }
    Some(a)
}

/// `vips[i].port_range` (or `port: 0`, every port): the VIP's range, the only one of its
/// address and protocol.
fn port_range(
    c: &mut Checker,
    all: &mut Vips,
    p: &str,
    i: usize,
    v: &RawVip,
    address: Option<IpAddr>,
    protocol: Protocol,
) -> Option<PortRange> {
    let range = match (&v.port_range, v.port) {
        (None, Some(0)) => PortRange::ALL,
        (None, _) => return None,
        (Some(_), Some(_)) => {
            c.bad(
                format!("{p}.port_range"),
                "a VIP has a port or a port_range, not both (port: 0 is every port)",
            );
            return None;
        }
        (Some(r), None) => match r.parse::<PortRange>() {
            Ok(r) => r,
            Err(e) => {
                c.bad(format!("{p}.port_range"), e);
                return None;
            }
        },
    };
    let key = (address?, protocol);
    if let Some((first, theirs)) = all.ranges.get(&key) {
        let why = if theirs.overlaps(&range) {
            format!("{range} overlaps vips[{first}]'s {theirs} on the same address and protocol")
        } else {
            format!(
                "vips[{first}] has a port range ({theirs}) on this address and protocol already: one range per address and protocol (make it one range, or use another address)"
            )
        };
        c.bad(format!("{p}.port_range"), why);
        return None;
    }
    all.ranges.insert(key, (i, range));
    Some(range)
}

/// A port-range VIP's backends and health check: each packet goes to the port it was sent to,
/// so a backend port means nothing and a health check needs a port of its own.
fn range_backends(c: &mut Checker, p: &str, v: &RawVip) {
    for (j, b) in v.backends.iter().enumerate() {
        if b.port.is_some() {
            c.bad(
                format!("{p}.backends[{j}].port"),
                "a port-range VIP sends each packet to the port it was sent to, on every backend: remove the port",
            );
        }
    }
    if let Some(h) = &v.health_check
        && h.port.is_none()
    {
        c.bad(
            format!("{p}.health_check.port"),
            "required for a port-range VIP (which port of the backends to check)",
        );
    }
}

/// `vips[i]`'s port, protocol, mode, hash and affinity timeout.
fn vip_kind(c: &mut Checker, p: &str, v: &RawVip) -> (u16, Protocol, Mode, HashOn, Duration) {
    let port = match v.port {
        None if v.port_range.is_some() => 0,
        None => {
            c.bad(format!("{p}.port"), "missing (or a port_range)");
            0
        }
        Some(_) => c.int(&format!("{p}.port"), v.port, 0, 0..=65_535) as u16,
    };
    let protocol = match v.protocol.as_deref() {
        None => {
            c.bad(format!("{p}.protocol"), "missing (tcp or udp)");
            Protocol::Tcp
        }
        s => c.choice(
            &format!("{p}.protocol"),
            s,
            Protocol::Tcp,
            &[("tcp", Protocol::Tcp), ("udp", Protocol::Udp)],
        ),
    };
    let mode = c.choice(
        &format!("{p}.mode"),
        v.mode.as_deref(),
        Mode::Dsr,
        &[("dsr", Mode::Dsr), ("nat", Mode::Nat)],
    );
    let hash = c.choice(
        &format!("{p}.hash"),
        v.hash.as_deref(),
        HashOn::FiveTuple,
        &[
            ("five-tuple", HashOn::FiveTuple),
            ("source-ip", HashOn::SourceIp),
        ],
    );
    let affinity = c.duration(
        &format!("{p}.affinity_timeout"),
        v.affinity_timeout.as_deref(),
        Duration::ZERO,
    );
    if affinity > MAX_AFFINITY_TIMEOUT {
        c.bad(format!("{p}.affinity_timeout"), "at most 24h (86400s)");
    } else if affinity.subsec_nanos() != 0 {
        c.bad(format!("{p}.affinity_timeout"), "must be whole seconds");
    }
    (port, protocol, mode, hash, affinity)
}

/// `vips[i]`: the VIP, if it has an address to serve on.
fn vip(
    c: &mut Checker,
    warnings: &mut Vec<String>,
    all: &mut Vips,
    i: usize,
    v: &RawVip,
) -> Option<VipConfig> {
    let p = format!("vips[{i}]");
    let address = vip_address(c, &p, v.address.as_deref());
    if let Some(name) = &v.name
        && let Some(first) = all.names.insert(name.clone(), i)
    {
        warnings.push(format!(
            "{p}.name: {name:?} is also vips[{first}]'s: commands that take a VIP's name (lb drain) need its address"
        ));
    }
    let (port, protocol, mode, hash, affinity) = vip_kind(c, &p, v);
    let algorithm = c.choice(
        &format!("{p}.algorithm"),
        v.algorithm.as_deref(),
        Algorithm::Maglev,
        &[
            ("maglev", Algorithm::Maglev),
            ("least-connections", Algorithm::LeastConnections),
        ],
    );
    let port_range = port_range(c, all, &p, i, v, address, protocol);
    // A range VIP's key has port 0: `port_range` checked it against the other ranges.
    let exact = v.port_range.is_none() && port != 0;
    if let Some(first) = address
        .filter(|_| exact)
        .and_then(|a| all.seen.insert((a, port, protocol), i))
    {
        c.bad(
            p.clone(),
            format!("same address, port and protocol as vips[{first}]"),
        );
    }
    let backends = backends(c, all, &p, address, mode, &v.backends);
    let vip_table = table_size(c, warnings, &p, v.table_size, all.node, backends.len());
    let health_check = v
        .health_check
        .as_ref()
        .map(|h| check_health(c, &format!("{p}.health_check"), h));
    if port_range.is_some() {
        range_backends(c, &p, v);
    }
    let passive_health = v
        .passive_health
        .as_ref()
        .map(|h| passive(c, &format!("{p}.passive_health"), h, mode, protocol));
    let source_ranges = check_source_ranges(c, &p, address, v.source_ranges.as_deref());
    let new_flow_budget = v
        .new_flow_budget
        .as_ref()
        .and_then(|b| check_budget(c, &format!("{p}.new_flow_budget"), b));
    let address = address?;
    suspicious_backends(c, warnings, &p, address, mode, &backends);
    Some(VipConfig {
        spec: VipSpec {
            name: v.name.clone().unwrap_or_else(|| format!("vip{i}")),
            address,
            port,
            protocol,
            mode,
            hash,
            affinity_timeout_s: affinity.as_secs() as u32,
            table_size: vip_table,
            backends,
            source_ranges,
            new_flow_budget,
            port_range,
            algorithm,
        },
        health_check,
        passive_health,
        health_threshold: 0,
    })
}

/// `vips[i].table_size` (a prime no larger than the node's; None: the node's), and whether the
/// VIP's `n` backends fit the table it gets.
fn table_size(
    c: &mut Checker,
    warnings: &mut Vec<String>,
    p: &str,
    raw: Option<i64>,
    node: &NodeSettings,
    n: usize,
) -> Option<u32> {
    let node_size = node.sizes.table_size;
    let vip_table = raw.map(|t| {
        let key = format!("{p}.table_size");
        let t = c.int(&key, Some(t), node_size as i64, 1..=node_size as i64) as u32;
        if !maglev::is_prime(t) {
            c.bad(
                key,
                format!("{t} is not prime (Maglev needs a prime table size)"),
            );
        }
        t
    });
    let size = vip_table.unwrap_or(node_size);
    match maglev::check_size(size, n) {
        Ok(Some(w)) => warnings.push(format!("{p}: {w}")),
        Ok(None) => {}
        Err(maglev::MaglevError::TooSmall { .. }) => c.bad(
            format!("{p}.backends"),
            format!("{n} backends do not fit a table of {size} slots"),
        ),
        Err(_) => {} // not prime: reported on node.table_size or the VIP's
    }
    vip_table
}

/// `vips[i].backends`: each backend that reads (the others are problems).
fn backends(
    c: &mut Checker,
    all: &mut Vips,
    p: &str,
    vip: Option<IpAddr>,
    mode: Mode,
    raw: &[RawBackend],
) -> Vec<BackendSpec> {
    let mut out = Vec::new();
    let mut seen = BTreeMap::new();
    for (j, b) in raw.iter().enumerate() {
        let bp = format!("{p}.backends[{j}]");
        let Some(addr) = backend_address(c, all, &bp, vip, mode, b.address.as_deref()) else {
            continue;
        };
        if let Some(first) = seen.insert(addr, j) {
            c.bad(
                format!("{bp}.address"),
                format!("{addr} is already backends[{first}]"),
            );
        }
        if b.port.is_some() && mode == Mode::Dsr {
            c.bad(
                format!("{bp}.port"),
                "only NAT mode maps ports; a DSR backend serves the VIP's port",
            );
        }
        let bport = match b.port {
            Some(_) if mode == Mode::Nat => {
                c.int(&format!("{bp}.port"), b.port, 0, 1..=65_535) as u16
            }
            _ => 0,
        };
        let weight = c.int(&format!("{bp}.weight"), b.weight, 100, 0..=65_535) as u32;
        all.memberships += 1;
        let backend = BackendSpec::new(addr, bport, weight);
        out.push(if b.backup == Some(true) {
            backend.backup(BACKUP_IN_CONFIG)
        } else {
            backend
        });
    }
    out
}

/// `vips[i].backends[j].address`: a unicast address of a family the node has a source address
/// for (and, in NAT mode, the VIP's family).
fn backend_address(
    c: &mut Checker,
    all: &Vips,
    bp: &str,
    vip: Option<IpAddr>,
    mode: Mode,
    raw: Option<&str>,
) -> Option<IpAddr> {
    let key = format!("{bp}.address");
    let Some(s) = raw else {
        c.bad(key, "missing");
        return None;
    };
    let Ok(addr) = s.parse::<IpAddr>() else {
        c.bad(key, format!("{s:?} is not an IP address"));
        return None;
    };
    if let Some(what) = not_unicast(addr) {
        let why = format!("{addr} is {what}: a backend is another host's unicast address");
        c.bad(key, why);
        return None;
    }
    // A source address that was given but does not read is reported on its own key already.
    let (spec, raw_node) = (&all.node.spec, all.raw_node);
    match addr {
        IpAddr::V4(_) if spec.source_v4.is_none() && raw_node.source_v4.is_none() => c.bad(
            key.clone(),
            "an IPv4 backend needs node.source_v4 (the outer source address)",
        ),
        IpAddr::V6(_) if spec.source_v6.is_none() && raw_node.source_v6.is_none() => c.bad(
            key.clone(),
            "an IPv6 backend needs node.source_v6 (the outer source address)",
        ),
        _ => {}
    }
    if mode == Mode::Nat
        && let Some(vip) = vip
        && vip.is_ipv4() != addr.is_ipv4()
    {
        c.bad(
            key,
            "NAT mode does not translate between IPv4 and IPv6: a NAT VIP's backends are of its family",
        );
    }
    Some(addr)
}

/// `vips[i].passive_health` (`pp`): a TCP NAT VIP's.
fn passive(
    c: &mut Checker,
    pp: &str,
    h: &RawPassiveHealth,
    mode: Mode,
    protocol: Protocol,
) -> PassiveCheck {
    if mode != Mode::Nat {
        c.bad(
            pp,
            "needs mode: nat (only NAT mode sees the backends' replies)",
        );
    } else if protocol != Protocol::Tcp {
        c.bad(
            pp,
            "needs protocol: tcp (UDP has no connection attempts to judge); use health_check",
        );
    }
    let failures = c.int(&format!("{pp}.failures"), h.failures, 5, 1..=10_000) as u32;
    let recheck_interval = c.duration(
        &format!("{pp}.recheck_interval"),
        h.recheck_interval.as_deref(),
        Duration::from_secs(10),
    );
    let timeout = c.duration(
        &format!("{pp}.timeout"),
        h.timeout.as_deref(),
        Duration::from_secs(1),
    );
    if recheck_interval.is_zero() {
        c.bad(format!("{pp}.recheck_interval"), "must be more than 0");
    }
    if timeout.is_zero() {
        c.bad(format!("{pp}.timeout"), "must be more than 0");
    } else if timeout > recheck_interval {
        c.bad(
            format!("{pp}.timeout"),
            "must not be longer than the recheck interval",
        );
    }
    PassiveCheck {
        failures,
        recheck_interval,
        timeout,
    }
}
