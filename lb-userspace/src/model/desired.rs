//! The desired state: what the load balancer should do, whichever source (config file or
//! Kubernetes) it came from. Sources build a [`Desired`]; the planner turns it into map writes.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use lb_common::{FAMILY_V4, FAMILY_V6, IPPROTO_TCP, IPPROTO_UDP, VipKey};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(format!("{s:?} is not a protocol (tcp or udp)")),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// How packets reach a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Encapsulated (IPIP / IP6IP6); the backend answers the client directly.
    #[default]
    Dsr,
    /// Addresses and ports rewritten; replies come back through the load balancer.
    Nat,
}

/// What the flow hash covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HashOn {
    /// Source and destination address and port, and protocol.
    #[default]
    FiveTuple,
    /// The client address alone: a client's connections share a backend.
    SourceIp,
}

/// How a VIP picks the backend of a new connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Weighted Maglev: the flow's hash picks a slot of the VIP's table.
    #[default]
    Maglev,
    /// Of a few Maglev-sampled candidates, the backend with the fewest open connections for
    /// its weight (`VIP_F_LEAST_CONN`).
    LeastConnections,
}

impl Algorithm {
    /// The name the config and `lb explain` use.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Maglev => "maglev",
            Algorithm::LeastConnections => "least-connections",
        }
    }
}

/// A VIP and the backends behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipSpec {
    /// For people: shown by the CLI and in metrics.
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub mode: Mode,
    pub hash: HashOn,
    /// Client-IP session affinity timeout in seconds (0: none).
    pub affinity_timeout_s: u32,
    /// Maglev table size, a prime no larger than the node's (None: the node's).
    #[serde(default)]
    pub table_size: Option<u32>,
    pub backends: Vec<BackendSpec>,
    /// The sources the VIP takes packets from (None: every source). Ranges of the other family
    /// than the VIP's match nothing: `Some` with none of its family refuses every source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ranges: Option<Vec<Cidr>>,
    /// A limit on the new flows the VIP takes (None: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_flow_budget: Option<Budget>,
    /// The ports a port-range VIP serves (then `port` is 0): a packet to one of them that no
    /// exact VIP of the address and protocol takes. None: the VIP serves `port` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<PortRange>,
    /// How new connections pick their backend.
    #[serde(default, skip_serializing_if = "is_default")]
    pub algorithm: Algorithm,
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

/// The ports of a port-range VIP, `lo..=hi`: `0-65535` (all ports) or any part of it. NAT
/// sends a packet to the same port of the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    /// Every port.
    pub const ALL: Self = Self {
        lo: 0,
        hi: u16::MAX,
    };

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }

    /// Whether the two ranges share a port.
    pub fn overlaps(&self, other: &Self) -> bool {
        self.lo <= other.hi && other.lo <= self.hi
    }

    /// Its `LB_VIP_RANGES` blocks: (first port, bits of the port that count).
    pub fn blocks(&self) -> lb_common::PortPrefixes {
        lb_common::PortPrefixes::new(self.lo, self.hi)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    /// `10000-10999`, or one port (`8080`, a range of one).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a port range (like 10000-10999, first port <= last)");
        let (lo, hi) = s.split_once('-').unwrap_or((s, s));
        let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
        if lo > hi {
            return Err(bad());
        }
        Ok(Self { lo, hi })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A VIP's new-flow budget: at most `rate` new flows a second in the long run, `burst` at once
/// after a quiet spell. Both are the VIP's totals on a node; the program shares them out over
/// the CPUs (see `lb_common::budget`). A packet that misses the flow table takes a token or is
/// dropped (`drop_new_flow_budget`); established flows never take one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Budget {
    /// New flows per second, more than 0.
    pub rate: u64,
    /// New flows at once, more than 0.
    pub burst: u64,
}

/// An address range: `192.0.2.0/24`, `2001:db8::/32` (host bits clear).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a/n` (a bare address is `/32` or `/128`). `strict`: host bits set are an error
    /// (a config file); otherwise they are cleared, as Kubernetes reads them.
    pub fn parse(s: &str, strict: bool) -> Result<Self, String> {
        let (a, n) = match s.split_once('/') {
            Some((a, n)) => (a, Some(n)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR (like 192.0.2.0/24 or 2001:db8::/32)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match n {
            None => max,
            Some(n) => n
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
        };
        let c = Self { addr, prefix }.masked();
        if strict && c.addr != addr {
            return Err(format!("{s:?} has host bits set: did you mean {c}?"));
        }
        Ok(c)
    }

    /// The range with its host bits cleared.
    pub fn masked(self) -> Self {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let m = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
            }
            IpAddr::V6(a) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
            }
        };
        Self { addr, ..self }
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4()
            && Self {
                addr: ip,
                prefix: self.prefix,
            }
            .masked()
            .addr
                == self.addr
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Cidr::parse(&s, false).map_err(serde::de::Error::custom)
    }
}

/// A backend of a VIP, with the weight it should get now (0 drains it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSpec {
    pub address: IpAddr,
    /// Backend port in NAT mode (0: the VIP's port). Always 0 in DSR.
    pub port: u16,
    pub weight: u32,
    /// Not a backend but a share of the VIP's traffic that has nowhere to go (a Gateway API
    /// backendRef that does not resolve): what Maglev sends here is rejected (TCP reset, UDP
    /// dropped). Its address is the unspecified one ([`BackendSpec::rejecting`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reject: bool,
    /// A backup: it takes new flows only while none of the VIP's other backends can (all of
    /// them out: weight 0, unhealthy or taken out by passive health), like HAProxy's and
    /// nginx's `backup` servers; why it is one (`backup: true` in the config, or a Kubernetes
    /// endpoint outside this node's topology hints). None: a backend like any other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
}

impl BackendSpec {
    /// A backend at `address:port`.
    pub fn new(address: IpAddr, port: u16, weight: u32) -> Self {
        Self {
            address,
            port,
            weight,
            reject: false,
            backup: None,
        }
    }

    /// The same backend as a backup, for `why`.
    pub fn backup(self, why: impl Into<String>) -> Self {
        Self {
            backup: Some(why.into()),
            ..self
        }
    }

    /// The rejecting share of a VIP of family `v4`/IPv6 with `weight`.
    pub fn rejecting(v4: bool, weight: u32) -> Self {
        let address = if v4 {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        };
        Self {
            address,
            port: 0,
            weight,
            reject: true,
            backup: None,
        }
    }
}

/// Node settings the program needs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// Outer source of IPv4 tunnels (DSR), and the source NAT address of IPv4 VIPs.
    pub source_v4: Option<Ipv4Addr>,
    /// Outer source of IPv6 tunnels (DSR), and the source NAT address of IPv6 VIPs.
    pub source_v6: Option<Ipv6Addr>,
    pub udp_idle_timeout: Duration,
    #[serde(default)]
    pub nat: NatSpec,
    /// Check mode for next hops: the program also asks `bpf_fib_lookup` for packets that have
    /// a next hop, uses its answer, and counts `nexthop_mismatches` where they disagree.
    #[serde(default)]
    pub nexthop_check: bool,
}

/// How NAT mode hands out source ports and ends translations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatSpec {
    /// Source ports towards backends, `port_min..=port_max`.
    pub port_min: u16,
    pub port_max: u16,
    /// How long a closed TCP translation lingers before its port is free again.
    pub close_grace: Duration,
    /// An unanswered SYN older than this counts as a failed connection attempt.
    pub syn_timeout: Duration,
    /// A TCP translation whose client has not completed the handshake is over this long after
    /// it was made (its port free again).
    pub half_open_timeout: Duration,
    /// A TCP translation idle (no packet either way) for longer than this is over and its port
    /// free; zero: never (until the LRU evicts it).
    pub tcp_idle_timeout: Duration,
}

impl Default for NatSpec {
    fn default() -> Self {
        Self {
            port_min: lb_common::maps::DEFAULT_NAT_PORT_MIN,
            port_max: lb_common::maps::DEFAULT_NAT_PORT_MAX,
            close_grace: Duration::from_secs(lb_common::maps::DEFAULT_NAT_CLOSE_GRACE_S),
            syn_timeout: Duration::from_secs(lb_common::maps::DEFAULT_SYN_TIMEOUT_S),
            half_open_timeout: Duration::from_millis(
                lb_common::maps::DEFAULT_NAT_HALF_OPEN_TIMEOUT_MS as u64,
            ),
            tcp_idle_timeout: Duration::from_secs(lb_common::maps::DEFAULT_NAT_TCP_IDLE_TIMEOUT_S),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    pub node: NodeSpec,
    pub vips: Vec<VipSpec>,
}

/// An address in lb's 16-byte form and its family.
pub fn addr16(a: IpAddr) -> ([u8; 16], u8) {
    match a {
        IpAddr::V4(a) => {
            let mut out = [0; 16];
            out[..4].copy_from_slice(&a.octets());
            (out, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// The address an lb key holds.
pub fn ip_of(addr: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        IpAddr::from(*addr)
    }
}

impl VipSpec {
    pub fn key(&self) -> VipKey {
        let (addr, family) = addr16(self.address);
        VipKey {
            addr,
            port: self.port.to_be(),
            proto: self.protocol.number(),
            family,
        }
    }

    /// `address:port/protocol` (`address:lo-hi/protocol` for a port range), as the CLI
    /// prints VIPs.
    pub fn label(&self) -> String {
        match self.port_range {
            Some(r) => range_label(&self.key(), r),
            None => vip_label(&self.key()),
        }
    }

    /// Whether the VIP takes packets from `src` (see [`VipSpec::source_ranges`]).
    pub fn allows_source(&self, src: IpAddr) -> bool {
        self.source_ranges
            .as_ref()
            .is_none_or(|r| r.iter().any(|c| c.contains(src)))
    }
}

/// `192.0.2.1:10000-10999/tcp` or `[2001:db8::1]:10000-10999/tcp`: port-range VIP `k` (its
/// port is 0) serving `r`.
pub fn range_label(k: &VipKey, r: PortRange) -> String {
    let label = vip_label(k);
    match label.rsplit_once(":0/") {
        Some((addr, proto)) => format!("{addr}:{r}/{proto}"),
        None => label,
    }
}

/// `192.0.2.1:80/tcp` or `[2001:db8::1]:80/tcp`.
pub fn vip_label(k: &VipKey) -> String {
    let proto =
        Protocol::from_number(k.proto).map_or_else(|| k.proto.to_string(), |p| p.to_string());
    let port = u16::from_be(k.port);
    match ip_of(&k.addr, k.family) {
        IpAddr::V4(a) => format!("{a}:{port}/{proto}"),
        IpAddr::V6(a) => format!("[{a}]:{port}/{proto}"),
    }
}
