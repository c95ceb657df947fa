//! The config file of a bare-host agent: node settings, VIPs, backends and health checks.
//!
//! Parsing is in two steps. [`yaml`] reads the YAML into loosely typed `Raw*` structs, reporting
//! every mistake in its shape at once with its path (`vips[1].port: expected a number, found
//! "eighty"`; unknown keys are mistakes too, so a typo is not silently ignored); then
//! [`validate`] checks every field and reports *every* problem with its path
//! (`vips[2].backends[0].weight: must be 0..=65535`), and only a config without problems becomes
//! a [`Config`].

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub mod reference;
mod validate;
mod yaml;

pub use validate::validate;

use crate::{
    kernel::mapmem,
    kernel::program::Sizes,
    kernel::xdpmode::XdpMode,
    model::desired::{
        Algorithm, BackendSpec, Desired, HashOn, Mode, NatSpec, NodeSpec, Protocol, VipSpec,
    },
    model::maglev,
};

/// One thing wrong with a config, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not YAML, or not of a config's shape (a string where a number goes, an
    /// unknown or repeated key): every such problem, each with its path.
    #[error("{path} is not a valid lb config ({} problem(s)):\n{}", problems.len(), problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Parse {
        path: String,
        problems: Vec<Problem>,
    },
    #[error("{path} has {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
        /// What would also have been warned about (for `lb check`).
        warnings: Vec<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CheckKind {
    Tcp,
    /// GET `path` (with `headers`, over TLS if `tls`); a status in `statuses` (default:
    /// 200..=399) is a success.
    Http {
        path: String,
        statuses: Vec<u16>,
        /// Sent with every probe, in this order.
        headers: Vec<(String, String)>,
        tls: Option<TlsCheck>,
    },
}

/// An HTTPS probe's TLS (Kong's `https` checks).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TlsCheck {
    /// The server name sent (SNI) and verified; none: no SNI, the backend's address is verified.
    pub sni: Option<String>,
    /// Verify the backend's certificate against the system's roots.
    pub verify: bool,
}

/// Active health checking of a VIP's backends, in the spirit of Kong's active checks.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub kind: CheckKind,
    /// Port to probe; 0: the backend's port (NAT), else the VIP's.
    pub port: u16,
    pub interval: Duration,
    /// Between probes of a backend found unhealthy (Kong's `unhealthy.interval`); none: `interval`.
    pub unhealthy_interval: Option<Duration>,
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy backend healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub unhealthy_threshold: u32,
    /// At most this many of a VIP's backends are probed at once (Kong's `concurrency`); 0: all.
    pub concurrency: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    pub sizes: Sizes,
    /// `node.kernel_memory_limit`: the sizes were refused if their maps need more.
    pub kernel_memory_limit: u64,
    pub metrics_listen: Option<SocketAddr>,
    pub spec: NodeSpec,
    /// `node.announce`: VIP routes for a routing daemon (None: lb announces nothing).
    pub announce: Option<crate::kernel::announce::AnnounceSettings>,
}

impl HealthCheck {
    /// Where probes of `backend` of `vip` connect.
    pub fn port_for(&self, vip: &VipSpec, backend: &BackendSpec) -> u16 {
        match (self.port, backend.port) {
            (0, 0) => vip.port,
            (0, p) => p,
            (p, _) => p,
        }
    }
}

/// Passive health checking (NAT mode, TCP): the data path counts failed connection attempts
/// per backend (answered by RST or ICMP unreachable, or SYNs unanswered past
/// `node.syn_timeout`); after `failures` in a row the backend gets weight 0, and every
/// `recheck_interval` a TCP connect probe (of up to `timeout`) checks whether it is back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassiveCheck {
    pub failures: u32,
    pub recheck_interval: Duration,
    pub timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipConfig {
    /// The VIP with its configured weights (health may lower them to 0).
    pub spec: VipSpec,
    pub health_check: Option<HealthCheck>,
    pub passive_health: Option<PassiveCheck>,
    /// Kong's `healthchecks.threshold`, a percentage: while the backends health checks left in
    /// hold less than this share of the VIP's weight, health is ignored and the VIP balances
    /// over all its backends (at L4, failing open beats dropping every connection). 0: off.
    pub health_threshold: u8,
}

/// A validated config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub node: NodeSettings,
    pub vips: Vec<VipConfig>,
    /// Things that work but may not be what was meant (a small table, say).
    pub warnings: Vec<String>,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = yaml::read(text).map_err(|problems| ConfigError::Parse {
            path: origin.to_string(),
            problems,
        })?;
        validate(&raw).map_err(|(problems, warnings)| ConfigError::Invalid {
            path: origin.to_string(),
            problems,
            warnings,
        })
    }

    /// The desired state with the configured weights.
    pub fn desired(&self) -> Desired {
        Desired {
            node: self.node.spec.clone(),
            vips: self.vips.iter().map(|v| v.spec.clone()).collect(),
        }
    }
}

// The `Raw*` structs are the config file's schema: their doc comments are the configuration
// reference (docs/config-reference.md is generated from them, see [`reference`]). Each says what
// the key does, its default and its range, in the file's words. They serialize too: the tests
// build their config files from them (tests/src/config.rs).

/// How a duration is written (`500ms`, `2s`, `10m`, `1h`), for the schema.
const DURATION: &str = r"^[0-9]+(ms|s|m|h)$";

/// An lb config file.
#[derive(Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// This node: where the program attaches, how large its maps are, NAT and metrics settings.
    pub node: RawNode,
    /// The virtual services. Default: none (the agent runs and serves nothing).
    #[serde(default)]
    pub vips: Vec<RawVip>,
}

/// `node`: settings of this node.
#[derive(Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    /// Interfaces the XDP program attaches to, each listed once. Default: the interface of the
    /// host's default route (IPv4, else IPv6).
    #[serde(default)]
    #[schemars(extend("uniqueItems" = true), inner(length(min = 1, max = 15), pattern(r"^[^/\s:]+$")))]
    pub interfaces: Vec<String>,
    /// `auto`: native XDP (in the driver: the fast path) on each interface where what the
    /// program sends is delivered, generic (the kernel's generic hook: any interface, slower)
    /// elsewhere, saying which and why; `native`: native everywhere, refused where it cannot
    /// deliver (a veth whose peer runs no XDP program); `generic`. Default `auto`.
    #[schemars(extend("enum" = ["auto", "native", "generic"]))]
    pub xdp_mode: Option<String>,
    /// Outer source address of IPIP packets to IPv4 backends (DSR). Needed by any VIP with an
    /// IPv4 backend in DSR mode.
    #[schemars(ipv4)]
    pub source_v4: Option<String>,
    /// Outer source address of IP6IP6 packets to IPv6 backends (DSR). Needed by any VIP with an
    /// IPv6 backend in DSR mode.
    #[schemars(ipv6)]
    pub source_v6: Option<String>,
    /// Maglev slots per VIP: a prime, 2..=16777216. Default 65537. Below 100 slots per backend
    /// lb warns (balance gets worse than 1 %).
    #[schemars(range(min = 2, max = 16_777_216))]
    pub table_size: Option<i64>,
    /// VIPs the maps hold, 1..=65535 (`max_vips` x `table_size` at most 2^31). Default 64.
    #[schemars(range(min = 1, max = 65_535))]
    pub max_vips: Option<i64>,
    /// Backend memberships the maps hold, 1..=1048576: a backend counts once per VIP it
    /// serves. Default 4096.
    #[schemars(range(min = 1, max = 1_048_576))]
    pub max_backends: Option<i64>,
    /// Flows the flow table holds, 1..=134217728. Default 1048576.
    #[schemars(range(min = 1, max = 134_217_728))]
    pub flow_table_size: Option<i64>,
    /// Clients the session-affinity table holds, 1..=134217728. Default 65536.
    #[schemars(range(min = 1, max = 134_217_728))]
    pub affinity_table_size: Option<i64>,
    /// A UDP flow idle this long is forgotten (a duration like `30s`). Default `30s`.
    #[schemars(pattern(DURATION))]
    pub udp_idle_timeout: Option<String>,
    /// Where the agent serves `/metrics` (`address:port`, like `127.0.0.1:9435`). Default: no
    /// metrics endpoint.
    pub metrics_listen: Option<String>,
    /// Translations each NAT table holds (forward and reverse), 1..=134217728. Default 262144.
    #[schemars(range(min = 1, max = 134_217_728))]
    pub nat_table_size: Option<i64>,
    /// Source ports NAT takes, per backend (`first-last`, 1..=65535). Default `1024-32767`.
    #[schemars(pattern(r"^[0-9]{1,5}-[0-9]{1,5}$"))]
    pub nat_port_range: Option<String>,
    /// A NAT translation is kept this long after its connection closed (FIN or RST). Default
    /// `10s`.
    #[schemars(pattern(DURATION))]
    pub nat_close_grace: Option<String>,
    /// NAT: a SYN unanswered this long counts as a failed connection attempt (passive health).
    /// Default `2s`.
    #[schemars(pattern(DURATION))]
    pub syn_timeout: Option<String>,
    /// A NAT translation whose handshake has not completed is reclaimed after this long, 1s..=10m.
    /// Default `10s`.
    #[schemars(pattern(DURATION))]
    pub nat_half_open_timeout: Option<String>,
    /// An established NAT translation idle this long is reclaimed: 0 (never) or at least 1s.
    /// Default `600s`.
    #[schemars(pattern(DURATION))]
    pub nat_tcp_idle_timeout: Option<String>,
    /// The program also runs the kernel's route lookup for each packet the agent resolved a next
    /// hop for, uses its answer, and counts `nexthop_mismatches` where the two disagree (a check,
    /// at the cost of the lookup). Default `false`.
    pub nexthop_check: Option<bool>,
    /// Present (even empty: `announce: {}`) to announce the VIPs through a routing daemon such as
    /// BIRD. Default: lb announces nothing.
    pub announce: Option<RawAnnounce>,
    /// The most kernel memory the maps may take (`4GiB`, `512MiB`, or bytes): sizes whose maps
    /// need more are refused before any map is made (`lb check` prints what they need). Default
    /// `4GiB`.
    #[schemars(
        pattern(r"^[0-9]+ ?(B|KiB|Ki|MiB|Mi|GiB|Gi|TiB|Ti)?$"),
        extend("type" = ["string", "integer", "null"])
    )]
    pub kernel_memory_limit: Option<String>,
}

/// `node.announce`: VIP routes for a routing daemon.
#[derive(Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAnnounce {
    /// The routing table lb writes the VIP routes to, for the daemon to export; not 253, 254 or
    /// 255 (the kernel's own). Default 100.
    #[schemars(range(min = 1, max = u32::MAX), extend("not" = {"enum": [253, 254, 255]}))]
    pub table: Option<i64>,
}

/// `vips[i]`: a virtual service.
#[derive(Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawVip {
    /// What lb's commands and metrics call the VIP. Default `vip<i>`.
    pub name: Option<String>,
    /// The virtual IP (IPv4 or IPv6, unicast; not loopback, multicast or unspecified). Required.
    pub address: Option<String>,
    /// The port clients connect to, 1..=65535; `0`: every port (a port range of all of them).
    /// Required, unless `port_range` is given.
    pub port: Option<i64>,
    /// A port-range VIP: `LO-HI` (like `10000-10999`), the ports it serves instead of `port`,
    /// each to the same port of its backends (so its backends have no `port`, and its health
    /// check needs one). A packet to a port of the range that an exact VIP (`port`) of the same
    /// address and protocol has goes to that VIP. One range per address and protocol.
    /// Default: none.
    pub port_range: Option<String>,
    /// `tcp` or `udp`. Required.
    pub protocol: Option<String>,
    /// `dsr` (direct server return: IPIP/IP6IP6 to the backend, which answers the client) or
    /// `nat` (destination and source rewritten, replies come back through lb). Default `dsr`.
    pub mode: Option<String>,
    /// What picks the backend: `five-tuple` (each connection) or `source-ip` (each client).
    /// Default `five-tuple`.
    pub hash: Option<String>,
    /// Session affinity: a client stays on its backend for this long after its last new flow
    /// (whole seconds, at most `24h`). Default: none.
    pub affinity_timeout: Option<String>,
    /// This VIP's Maglev slots: a prime no larger than `node.table_size`. Default
    /// `node.table_size`.
    pub table_size: Option<i64>,
    /// The backends. Default: none (the VIP drops its new flows until it has one; lb warns).
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    /// Active health checks of the backends. Default: none (every backend counts as healthy).
    pub health_check: Option<RawHealthCheck>,
    /// Passive health checks (NAT mode, TCP only): backends that fail connection attempts are
    /// taken out. Default: none.
    pub passive_health: Option<RawPassiveHealth>,
    /// CIDRs of the sources the VIP takes packets from (a bare address is /32 or /128), of the
    /// VIP's family, host bits clear. Default: every source.
    pub source_ranges: Option<Vec<String>>,
    /// A limit on new flows. Default: none.
    pub new_flow_budget: Option<RawBudget>,
    /// How a new connection picks its backend: `maglev` (the flow's hash) or
    /// `least-connections` (of a few Maglev-sampled backends, the one with the fewest open
    /// connections for its weight). Default `maglev`.
    pub algorithm: Option<String>,
}

/// `vips[i].new_flow_budget`: at most `rate` new flows a second, `burst` at once (the VIP's
/// totals on a node, shared out over its CPUs).
#[derive(Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    /// New flows per second, more than 0. Required.
    pub rate: Option<i64>,
    /// New flows at once after a quiet spell, more than 0. Default: `rate`.
    pub burst: Option<i64>,
}

/// `vips[i].passive_health`: connection attempts the data path sees fail.
#[derive(Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPassiveHealth {
    /// Failed attempts in a row (RST, ICMP unreachable, or a SYN unanswered for
    /// `node.syn_timeout`) that take a backend out, 1..=10000. Default 5.
    pub failures: Option<i64>,
    /// A backend taken out is probed again this often, and comes back when a probe succeeds.
    /// Default `10s`.
    pub recheck_interval: Option<String>,
    /// Each re-check probe's timeout, no longer than `recheck_interval`. Default `1s`.
    pub timeout: Option<String>,
}

/// Why a backend with `backup: true` is a backup (what `lb backends` says).
pub const BACKUP_IN_CONFIG: &str = "backup: true in the config";

/// `vips[i].backends[j]`: a backend.
#[derive(Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    /// The backend's IP address (not the VIP's own; NAT: the VIP's family). Required.
    pub address: Option<String>,
    /// NAT only: the port the backend serves, 1..=65535. Default: the VIP's port.
    pub port: Option<i64>,
    /// Relative weight, 0..=65535; 0 drains the backend (its established flows stay, it gets no
    /// new ones). Default 100.
    pub weight: Option<i64>,
    /// A backup backend: it gets new flows only while no other backend of the VIP can take
    /// them (each drained to weight 0, unhealthy, or out by passive health), like HAProxy's and
    /// nginx's `backup` servers; its established flows stay when the others come back. Default
    /// false.
    pub backup: Option<bool>,
}

/// `vips[i].health_check`: active probes of each backend, in the spirit of Kong's active checks.
#[derive(Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    /// `tcp` (a connection) or `http` (a GET). Default `tcp`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The port probed, 1..=65535. Default: the backend's port (NAT), else the VIP's.
    pub port: Option<i64>,
    /// `http` only: the path requested, starting with `/`. Default `/`.
    pub path: Option<String>,
    /// `http` only: the statuses that count as healthy, each 100..=599. Default 200..=399.
    pub http_statuses: Option<Vec<i64>>,
    /// Time between probes of a backend, more than 0. Default `5s`.
    pub interval: Option<String>,
    /// Each probe's timeout, more than 0 and no longer than `interval`. Default `1s`.
    pub timeout: Option<String>,
    /// Successes in a row that make an unhealthy backend healthy, 1..=255. Default 2.
    pub healthy_threshold: Option<i64>,
    /// Failures in a row that make a healthy backend unhealthy (weight 0), 1..=255. Default 3.
    pub unhealthy_threshold: Option<i64>,
}

/// Collects problems while checking fields.
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn bad(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn int(
        &mut self,
        path: &str,
        v: Option<i64>,
        default: i64,
        range: std::ops::RangeInclusive<i64>,
    ) -> i64 {
        let v = v.unwrap_or(default);
        if !range.contains(&v) {
            self.bad(path, format!("must be {}..={}", range.start(), range.end()));
            return default;
        }
        v
    }

    fn duration(&mut self, path: &str, v: Option<&str>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => humantime::parse_duration(s).unwrap_or_else(|e| {
                self.bad(
                    path,
                    format!("not a duration ({e}); write it like 2s, 500ms or 1h"),
                );
                default
            }),
        }
    }

    fn choice<T: Copy>(
        &mut self,
        path: &str,
        v: Option<&str>,
        default: T,
        options: &[(&str, T)],
    ) -> T {
        let Some(s) = v else { return default };
        match options.iter().find(|(name, _)| *name == s) {
            Some((_, t)) => *t,
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.bad(
                    path,
                    format!("must be one of {}, not {s:?}", names.join(", ")),
                );
                default
            }
        }
    }
}

pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The shortest TCP idle timeout NAT mode accepts (other than 0, never).
pub const MIN_NAT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// Bounds of `node.nat_half_open_timeout`.
pub const MIN_NAT_HALF_OPEN_TIMEOUT: Duration = Duration::from_secs(1);
pub const MAX_NAT_HALF_OPEN_TIMEOUT: Duration = Duration::from_secs(600);
/// The same ceiling Kubernetes puts on ClientIP affinity.
pub const MAX_AFFINITY_TIMEOUT: Duration = Duration::from_secs(86_400);

/// The default `node.kernel_memory_limit`: 24 times what the default sizes need (166 MiB on 2
/// CPUs), room for 16 million flows and 4 million NAT translations together
/// (`flow_table_size: 16777216` and `nat_table_size: 4194304` need 2 GiB), and a share a
/// load-balancing node of 8 GiB or more can spare; sizes that need more are more likely a slip
/// of a digit than a plan (the kernel takes seconds to make them, and the host may run short).
pub const DEFAULT_KERNEL_MEMORY_LIMIT: u64 = 4 << 30;

/// `node.kernel_memory_limit`, and the kernel memory the maps of `sizes` need within it (on
/// this host's possible CPUs): more is a problem naming the sizes that take most. The limit.
fn check_kernel_memory(c: &mut Checker, raw: Option<&str>, sizes: &Sizes) -> u64 {
    let path = "node.kernel_memory_limit";
    let limit = match raw.map(|s| (s, mapmem::parse_bytes(s))) {
        None => DEFAULT_KERNEL_MEMORY_LIMIT,
        Some((_, Some(b))) if b > 0 => b,
        Some((s, _)) => {
            c.bad(
                path,
                format!("{s:?} is not a size: write it like 4GiB or 512MiB (or in bytes)"),
            );
            return DEFAULT_KERNEL_MEMORY_LIMIT;
        }
    };
    match mapmem::need(sizes) {
        Ok(need) if need.total > limit => {
            let largest = need.largest();
            let them = if largest.len() == 1 { "it" } else { "them" };
            c.bad(
                "node",
                format!(
                    "the maps need about {} of kernel memory with these sizes, more than {path} \
                     ({}); most goes to {}: lower {them}, or raise {path} if this host can spare it",
                    mapmem::human(need.total),
                    mapmem::human(limit),
                    largest.join(", ")
                ),
            )
        }
        Ok(_) => {}
        // Built with AYA_BUILD_SKIP=1 (unit tests, lints): no object to count, and no program
        // to load either (`program::load` says so).
        Err(_) if crate::kernel::program::OBJECT.is_empty() => {}
        Err(e) => c.bad("node", e.to_string()),
    }
    limit
}

/// `vips[i].source_ranges`: CIDRs of the VIP's family, host bits clear, each once; an empty
/// list is no restriction (None).
fn check_source_ranges(
    c: &mut Checker,
    p: &str,
    vip: Option<IpAddr>,
    raw: Option<&[String]>,
) -> Option<Vec<crate::model::desired::Cidr>> {
    let raw = raw.filter(|r| !r.is_empty())?;
    let mut seen: Vec<(crate::model::desired::Cidr, usize)> = Vec::new();
    for (j, r) in raw.iter().enumerate() {
        let rp = format!("{p}.source_ranges[{j}]");
        match crate::model::desired::Cidr::parse(r.trim(), true) {
            Err(e) => c.bad(rp, e),
            Ok(cidr) if vip.is_some_and(|v| v.is_ipv4() != cidr.addr.is_ipv4()) => c.bad(
                rp,
                format!(
                    "{cidr} is {} and the VIP is {}: a VIP's source ranges are of its family",
                    if cidr.addr.is_ipv4() { "IPv4" } else { "IPv6" },
                    if cidr.addr.is_ipv4() { "IPv6" } else { "IPv4" }
                ),
            ),
            Ok(cidr) => match seen.iter().find(|(o, _)| *o == cidr) {
                Some((_, first)) => c.bad(rp, format!("{cidr} is already source_ranges[{first}]")),
                None => seen.push((cidr, j)),
            },
        }
    }
    Some(seen.into_iter().map(|(c, _)| c).collect())
}

/// Most new flows a second a budget may set: one a nanosecond (a CPU's token interval is whole
/// nanoseconds).
pub const MAX_BUDGET_RATE: i64 = 1_000_000_000;

/// `vips[i].new_flow_budget`: `rate` (new flows per second) is required, `burst` defaults to
/// the rate (one second's worth); both more than 0. None if either is wrong (reported).
fn check_budget(
    c: &mut Checker,
    p: &str,
    raw: &RawBudget,
) -> Option<crate::model::desired::Budget> {
    let mut positive = |key: &str, v: Option<i64>, what: &str| -> Option<u64> {
        let path = format!("{p}.{key}");
        match v {
            None => {
                c.bad(path, format!("missing: {what}"));
                None
            }
            Some(v) if v <= 0 => {
                c.bad(path, "must be more than 0");
                None
            }
            Some(v) if v > MAX_BUDGET_RATE => {
                c.bad(path, format!("must be at most {MAX_BUDGET_RATE}"));
                None
            }
            Some(v) => Some(v as u64),
        }
    };
    let rate = positive("rate", raw.rate, "new flows per second, like rate: 1000");
    let burst = match raw.burst {
        None => rate,
        b => positive("burst", b, "new flows at once"),
    };
    Some(crate::model::desired::Budget {
        rate: rate?,
        burst: burst?,
    })
}

/// The kernel's own tables, which lb must not fill with announcement routes.
const RESERVED_TABLES: [(i64, &str); 3] = [(253, "default"), (254, "main"), (255, "local")];

fn check_announce(c: &mut Checker, a: &RawAnnounce) -> crate::kernel::announce::AnnounceSettings {
    let path = "node.announce.table";
    let default = crate::kernel::announce::DEFAULT_TABLE as i64;
    let mut table = c.int(path, a.table, default, 1..=u32::MAX as i64);
    if let Some((_, name)) = RESERVED_TABLES.iter().find(|(t, _)| *t == table) {
        c.bad(
            path,
            format!("{table} is the kernel's {name} table: give lb a table of its own (e.g. 100)"),
        );
        table = default;
    }
    crate::kernel::announce::AnnounceSettings {
        table: table as u32,
    }
}

/// What makes `a` no address to balance to or from, if anything: unspecified, loopback,
/// multicast or the IPv4 broadcast address.
fn not_unicast(a: IpAddr) -> Option<&'static str> {
    if a.is_unspecified() {
        Some("the unspecified address")
    } else if a.is_loopback() {
        Some("a loopback address")
    } else if a.is_multicast() {
        Some("a multicast address")
    } else if a == IpAddr::V4(std::net::Ipv4Addr::BROADCAST) {
        Some("the broadcast address")
    } else {
        None
    }
}

/// Backend lists that parse but cannot work (an error) or serve nothing (a warning): the VIP
/// at `p` (address `vip`, in `mode`) with these `backends`.
fn suspicious_backends(
    c: &mut Checker,
    warnings: &mut Vec<String>,
    p: &str,
    vip: IpAddr,
    mode: Mode,
    backends: &[BackendSpec],
) {
    if let Some(j) = backends.iter().position(|b| b.address == vip) {
        // The encapsulated or translated packet would be addressed to this node's own VIP and
        // come back.
        let how = match mode {
            Mode::Dsr => "a DSR backend",
            Mode::Nat => "a NAT backend",
        };
        c.bad(
            format!("{p}.backends[{j}].address"),
            format!("{vip} is the VIP's own address: {how} must be another host (the packet would loop back to the load balancer)"),
        );
    }
    if backends.is_empty() {
        warnings.push(format!(
            "{p}.backends: empty: the VIP drops its traffic until it has a backend"
        ));
    } else if backends.iter().all(|b| b.weight == 0) {
        warnings.push(format!(
            "{p}.backends: every weight is 0: new connections to the VIP are dropped until a backend has weight above 0"
        ));
    }
}

fn check_health(c: &mut Checker, p: &str, h: &RawHealthCheck) -> HealthCheck {
    let http = c.choice(
        &format!("{p}.type"),
        h.kind.as_deref().or(Some("tcp")),
        false,
        &[("tcp", false), ("http", true)],
    );
    let port = match h.port {
        None => 0,
        Some(_) => c.int(&format!("{p}.port"), h.port, 1, 1..=65_535) as u16,
    };
    let interval = c.duration(
        &format!("{p}.interval"),
        h.interval.as_deref(),
        Duration::from_secs(5),
    );
    let timeout = c.duration(
        &format!("{p}.timeout"),
        h.timeout.as_deref(),
        Duration::from_secs(1),
    );
    if interval.is_zero() {
        c.bad(format!("{p}.interval"), "must be more than 0");
    }
    if timeout.is_zero() {
        c.bad(format!("{p}.timeout"), "must be more than 0");
    } else if timeout > interval {
        c.bad(
            format!("{p}.timeout"),
            "must not be longer than the interval",
        );
    }
    let healthy_threshold = c.int(
        &format!("{p}.healthy_threshold"),
        h.healthy_threshold,
        2,
        1..=255,
    ) as u32;
    let unhealthy_threshold = c.int(
        &format!("{p}.unhealthy_threshold"),
        h.unhealthy_threshold,
        3,
        1..=255,
    ) as u32;
    let kind = check_kind(c, p, h, http);
    HealthCheck {
        kind,
        port,
        interval,
        unhealthy_interval: None,
        timeout,
        healthy_threshold,
        unhealthy_threshold,
        concurrency: 0,
    }
}

/// What a health check probes: an HTTP GET (path, statuses) or a TCP connect (which takes
/// neither).
fn check_kind(c: &mut Checker, p: &str, h: &RawHealthCheck, http: bool) -> CheckKind {
    if !http {
        if h.path.is_some() {
            c.bad(format!("{p}.path"), "only http checks have a path");
        }
        if h.http_statuses.is_some() {
            c.bad(
                format!("{p}.http_statuses"),
                "only http checks have statuses",
            );
        }
        return CheckKind::Tcp;
    }
    let path = h.path.clone().unwrap_or_else(|| "/".into());
    if !path.starts_with('/') {
        c.bad(format!("{p}.path"), "must start with /");
    }
    let statuses = match &h.http_statuses {
        None => (200..=399).collect(),
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, s)| {
                c.int(&format!("{p}.http_statuses[{i}]"), Some(*s), 200, 100..=599) as u16
            })
            .collect(),
    };
    CheckKind::Http {
        path,
        statuses,
        headers: Vec::new(),
        tls: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::desired::PortRange;

    const GOOD: &str = r#"
node:
  interfaces: [eth0]
  source_v4: 10.0.0.1
  source_v6: fd00::1
  table_size: 65537
vips:
  - name: web
    address: 192.0.2.10
    port: 80
    protocol: tcp
    backends:
      - { address: 10.1.0.1, weight: 200 }
      - { address: 10.1.0.2, weight: 100 }
      - { address: fd01::3, weight: 0 }
    health_check: { type: http, path: /healthz, interval: 2s, timeout: 500ms }
  - address: 192.0.2.10
    port: 53
    protocol: udp
    hash: source-ip
    affinity_timeout: 10m
    backends: [{ address: 10.1.0.1 }]
"#;

    /// Parses GOOD with `edit` applied (a line replaced) and returns its problems as strings.
    fn problems(edit: impl Fn(String) -> String) -> Vec<String> {
        match Config::parse(&edit(GOOD.to_string()), "test.yaml") {
            Ok(_) => vec![],
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.iter().map(|p| p.to_string()).collect()
            }
            Err(e) => vec![format!("parse: {e}")],
        }
    }

    fn replace(from: &'static str, to: &'static str) -> impl Fn(String) -> String {
        move |s| {
            assert!(
                s.contains(from),
                "test edits a line that is not there: {from}"
            );
            s.replacen(from, to, 1)
        }
    }

    #[test]
    fn the_sample_is_valid_and_means_what_it_says() {
        let c = Config::parse(GOOD, "test.yaml").unwrap();
        assert_eq!(c.node.interfaces, ["eth0"]);
        assert_eq!(c.node.sizes.table_size, 65_537);
        assert_eq!(c.vips.len(), 2);
        let web = &c.vips[0];
        assert_eq!(web.spec.name, "web");
        assert_eq!(
            web.spec
                .backends
                .iter()
                .map(|b| b.weight)
                .collect::<Vec<_>>(),
            [200, 100, 0]
        );
        let h = web.health_check.as_ref().unwrap();
        assert_eq!(
            h.kind,
            CheckKind::Http {
                path: "/healthz".into(),
                statuses: (200..=399).collect(),
                headers: Vec::new(),
                tls: None,
            }
        );
        assert_eq!(
            (h.interval, h.timeout),
            (Duration::from_secs(2), Duration::from_millis(500))
        );
        assert_eq!(
            h.port_for(&web.spec, &web.spec.backends[0]),
            80,
            "probes go to the VIP's port by default"
        );
        assert_eq!(c.vips[1].spec.hash, HashOn::SourceIp);
        assert_eq!(c.vips[1].spec.affinity_timeout_s, 600);
        assert_eq!(c.vips[1].spec.algorithm, Algorithm::Maglev, "the default");
        assert_eq!(c.vips[1].spec.backends[0].weight, 100, "default weight");
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        // And the repository's sample config too.
        let sample = include_str!("../../../lb.example.yaml");
        Config::parse(sample, "lb.example.yaml").unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn every_validation_error_names_its_path() {
        type Edit = Box<dyn Fn(String) -> String>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(replace("interfaces: [eth0]", "interfaces: [eth0, eth0]")),
                "node.interfaces[1]: \"eth0\" is listed twice",
            ),
            (
                Box::new(replace("interfaces: [eth0]", "interfaces: [\"a/b\"]")),
                "node.interfaces[0]: \"a/b\" is not a valid interface name",
            ),
            (
                Box::new(replace("  table_size: 65537", "  table_size: 65536")),
                "node.table_size: 65536 is not prime",
            ),
            (
                Box::new(replace("  table_size: 65537", "  table_size: 0")),
                "node.table_size: must be 2..=16777216",
            ),
            (
                Box::new(replace("source_v4: 10.0.0.1", "source_v4: fd00::9")),
                "node.source_v4: \"fd00::9\" is not an IPv4 address",
            ),
            (
                Box::new(replace("source_v6: fd00::1", "source_v6: 10.0.0.9")),
                "node.source_v6: \"10.0.0.9\" is not an IPv6 address",
            ),
            (
                Box::new(replace("  source_v6: fd00::1\n", "")),
                "vips[0].backends[2].address: an IPv6 backend needs node.source_v6",
            ),
            (
                Box::new(replace("  source_v4: 10.0.0.1\n", "")),
                "vips[0].backends[0].address: an IPv4 backend needs node.source_v4",
            ),
            (
                Box::new(replace(
                    "  table_size: 65537",
                    "  table_size: 65537\n  xdp_mode: fast",
                )),
                "node.xdp_mode: must be one of auto, native, generic, not \"fast\"",
            ),
            (
                Box::new(replace(
                    "  table_size: 65537",
                    "  table_size: 65537\n  max_vips: 1",
                )),
                "vips: 2 VIPs, more than node.max_vips (1)",
            ),
            (
                Box::new(replace(
                    "  table_size: 65537",
                    "  table_size: 65537\n  max_vips: 40000",
                )),
                "node.max_vips: 40000 VIPs x 65537 slots is more than one BPF array can hold",
            ),
            (
                Box::new(replace(
                    "  table_size: 65537",
                    "  table_size: 65537\n  max_backends: 2",
                )),
                "vips: 4 backends of VIPs (a backend counts once per VIP it serves), more than node.max_backends (2)",
            ),
            (
                Box::new(replace(
                    "  table_size: 65537",
                    "  table_size: 65537\n  flow_table_size: 0",
                )),
                "node.flow_table_size: must be 1..=134217728",
            ),
            (
                Box::new(replace(
                    "  table_size: 65537",
                    "  table_size: 65537\n  udp_idle_timeout: soon",
                )),
                "node.udp_idle_timeout: not a duration",
            ),
            (
                Box::new(replace(
                    "  table_size: 65537",
                    "  table_size: 65537\n  metrics_listen: localhost",
                )),
                "node.metrics_listen: \"localhost\" is not an address:port",
            ),
            (
                Box::new(replace(
                    "address: 192.0.2.10\n    port: 80",
                    "address: 192.0.2.300\n    port: 80",
                )),
                "vips[0].address: \"192.0.2.300\" is not an IP address",
            ),
            (
                Box::new(replace("    port: 80\n", "    port: 65536\n")),
                "vips[0].port: must be 0..=65535",
            ),
            (
                Box::new(replace(
                    "    port: 80\n",
                    "    port: 80\n    table_size: 1000\n",
                )),
                "vips[0].table_size: 1000 is not prime",
            ),
            (
                Box::new(replace(
                    "    port: 80\n",
                    "    port: 80\n    table_size: 65539\n",
                )),
                "vips[0].table_size: must be 1..=65537",
            ),
            (
                Box::new(replace("    port: 80\n", "")),
                "vips[0].port: missing",
            ),
            (
                Box::new(replace("    protocol: tcp", "    protocol: sctp")),
                "vips[0].protocol: must be one of tcp, udp, not \"sctp\"",
            ),
            (
                Box::new(replace(
                    "    protocol: tcp",
                    "    protocol: tcp\n    mode: nat",
                )),
                "vips[0].backends[2].address: NAT mode does not translate between IPv4 and IPv6",
            ),
            (
                Box::new(replace(
                    "  table_size: 65537",
                    "  table_size: 65537\n  nat_port_range: 4000-3000",
                )),
                "node.nat_port_range: \"4000-3000\" is not a port range",
            ),
            (
                Box::new(replace(
                    "  table_size: 65537",
                    "  table_size: 65537\n  nat_port_range: 0-3000",
                )),
                "node.nat_port_range: \"0-3000\" is not a port range",
            ),
            (
                Box::new(replace(
                    "  table_size: 65537",
                    "  table_size: 65537\n  syn_timeout: 0s",
                )),
                "node.syn_timeout: must be more than 0",
            ),
            (
                Box::new(replace(
                    "  table_size: 65537",
                    "  table_size: 65537\n  nat_half_open_timeout: 500ms",
                )),
                "node.nat_half_open_timeout: must be from 1s",
            ),
            (
                Box::new(replace(
                    "  table_size: 65537",
                    "  table_size: 65537\n  nat_tcp_idle_timeout: 500ms",
                )),
                "node.nat_tcp_idle_timeout: must be 0 (never) or at least 1s",
            ),
            (
                Box::new(replace(
                    "  table_size: 65537",
                    "  table_size: 65537\n  nat_tcp_idle_timeout: soon",
                )),
                "node.nat_tcp_idle_timeout: not a duration",
            ),
            (
                Box::new(replace(
                    "  table_size: 65537",
                    "  table_size: 65537\n  nat_close_grace: later",
                )),
                "node.nat_close_grace: not a duration",
            ),
            (
                Box::new(replace(
                    "    protocol: tcp",
                    "    protocol: tcp\n    passive_health: { failures: 3 }",
                )),
                "vips[0].passive_health: needs mode: nat",
            ),
            (
                Box::new(replace(
                    "    protocol: udp",
                    "    protocol: udp\n    mode: nat\n    passive_health: {}",
                )),
                "vips[1].passive_health: needs protocol: tcp",
            ),
            (
                Box::new(replace(
                    "    protocol: udp",
                    "    protocol: udp\n    mode: nat\n    passive_health: { failures: 0 }",
                )),
                "vips[1].passive_health.failures: must be 1..=10000",
            ),
            (
                Box::new(replace(
                    "    protocol: udp",
                    "    protocol: udp\n    mode: nat\n    passive_health: { recheck_interval: 1s, timeout: 2s }",
                )),
                "vips[1].passive_health.timeout: must not be longer than the recheck interval",
            ),
            (
                Box::new(replace(
                    "    protocol: udp",
                    "    protocol: udp\n    mode: nat",
                )),
                "ok",
            ),
            (
                Box::new(|s: String| {
                    s.replace("    protocol: udp", "    protocol: udp\n    mode: nat")
                        .replace(
                            "[{ address: 10.1.0.1 }]",
                            "[{ address: 10.1.0.1, port: 0 }]",
                        )
                }),
                "vips[1].backends[0].port: must be 1..=65535",
            ),
            (
                Box::new(replace(
                    "    protocol: tcp",
                    "    protocol: tcp\n    mode: maybe",
                )),
                "vips[0].mode: must be one of dsr, nat",
            ),
            (
                Box::new(replace("hash: source-ip", "hash: random")),
                "vips[1].hash: must be one of five-tuple, source-ip",
            ),
            (
                Box::new(replace("hash: source-ip", "algorithm: round-robin")),
                "vips[1].algorithm: must be one of maglev, least-connections",
            ),
            (
                Box::new(replace("affinity_timeout: 10m", "affinity_timeout: 2d")),
                "vips[1].affinity_timeout: at most 24h",
            ),
            (
                Box::new(replace("affinity_timeout: 10m", "affinity_timeout: 1500ms")),
                "vips[1].affinity_timeout: must be whole seconds",
            ),
            (
                Box::new(|s: String| {
                    s.replace("    port: 53\n", "    port: 80\n")
                        .replace("protocol: udp", "protocol: tcp")
                }),
                "parse-free",
            ),
            (
                Box::new(replace("weight: 200", "weight: 70000")),
                "vips[0].backends[0].weight: must be 0..=65535",
            ),
            (
                Box::new(replace("weight: 200", "weight: -1")),
                "vips[0].backends[0].weight: must be 0..=65535",
            ),
            (
                Box::new(replace("address: 10.1.0.2", "address: 10.1.0.1")),
                "vips[0].backends[1].address: 10.1.0.1 is already backends[0]",
            ),
            (
                Box::new(replace("address: 10.1.0.2", "address: backend-2")),
                "vips[0].backends[1].address: \"backend-2\" is not an IP address",
            ),
            (
                Box::new(replace(
                    "{ address: 10.1.0.2, weight: 100 }",
                    "{ address: 10.1.0.2, port: 8080 }",
                )),
                "vips[0].backends[1].port: only NAT mode maps ports",
            ),
            (
                Box::new(replace("  table_size: 65537", "  table_size: 2")),
                "vips[0].backends: 3 backends do not fit a table of 2 slots",
            ),
            (
                Box::new(replace("type: http,", "type: grpc,")),
                "vips[0].health_check.type: must be one of tcp, http",
            ),
            (
                Box::new(replace("path: /healthz", "path: healthz")),
                "vips[0].health_check.path: must start with /",
            ),
            (
                Box::new(replace(
                    "type: http, path: /healthz,",
                    "type: tcp, path: /healthz,",
                )),
                "vips[0].health_check.path: only http checks have a path",
            ),
            (
                Box::new(replace("interval: 2s", "interval: 0s")),
                "vips[0].health_check.interval: must be more than 0",
            ),
            (
                Box::new(replace("timeout: 500ms", "timeout: 3s")),
                "vips[0].health_check.timeout: must not be longer than the interval",
            ),
            (
                Box::new(replace(
                    "timeout: 500ms",
                    "timeout: 500ms, unhealthy_threshold: 0",
                )),
                "vips[0].health_check.unhealthy_threshold: must be 1..=255",
            ),
            (
                Box::new(replace(
                    "timeout: 500ms",
                    "timeout: 500ms, healthy_threshold: 300",
                )),
                "vips[0].health_check.healthy_threshold: must be 1..=255",
            ),
            (
                Box::new(replace(
                    "timeout: 500ms",
                    "timeout: 500ms, http_statuses: [200, 700]",
                )),
                "vips[0].health_check.http_statuses[1]: must be 100..=599",
            ),
            (
                Box::new(replace("timeout: 500ms", "timeout: 500ms, port: 70000")),
                "vips[0].health_check.port: must be 1..=65535",
            ),
            (
                Box::new(replace(
                    "{ address: 10.1.0.2, weight: 100 }",
                    "{ address: 192.0.2.10, weight: 100 }",
                )),
                "vips[0].backends[1].address: 192.0.2.10 is the VIP's own address",
            ),
        ];
        for (edit, want) in cases {
            let got = problems(edit);
            if want == "ok" {
                assert!(got.is_empty(), "{got:?}");
                continue;
            }
            if want == "parse-free" {
                // Two VIPs on one address, port and protocol.
                assert!(
                    got.iter()
                        .any(|p| p == "vips[1]: same address, port and protocol as vips[0]"),
                    "{got:?}"
                );
                continue;
            }
            assert!(
                got.iter().any(|p| p.starts_with(want)),
                "expected a problem starting {want:?}, got {got:?}"
            );
        }
    }

    #[test]
    fn nexthop_check_sets_the_node_flag_and_defaults_to_off() {
        let flags = |text: &str| {
            let d = Config::parse(text, "t").unwrap().desired();
            d.node.nexthop_check
        };
        assert!(!flags(GOOD), "off unless asked for");
        let on = GOOD.replace(
            "  table_size: 65537",
            "  table_size: 65537\n  nexthop_check: true",
        );
        assert!(flags(&on));
        let bad = GOOD.replace(
            "  table_size: 65537",
            "  table_size: 65537\n  nexthop_check: sometimes",
        );
        match Config::parse(&bad, "t") {
            Err(ConfigError::Parse { problems, .. }) => assert_eq!(
                problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                ["node.nexthop_check: expected true or false, found \"sometimes\""]
            ),
            other => panic!("expected a parse error naming nexthop_check, got {other:?}"),
        }
    }

    #[test]
    fn nat_vips_map_ports_and_take_node_nat_settings() {
        let text = GOOD
            .replace(
                "  table_size: 65537",
                "  table_size: 65537\n  nat_port_range: 2000-2999\n  nat_close_grace: 3s\n  syn_timeout: 1500ms\n  nat_half_open_timeout: 4s\n  nat_table_size: 4096\n  nat_tcp_idle_timeout: 15m",
            )
            .replace(
                "    protocol: udp",
                "    protocol: udp\n    mode: nat",
            )
            .replace("[{ address: 10.1.0.1 }]", "[{ address: 10.1.0.1, port: 5353 }, { address: 10.1.0.2 }]");
        let c = Config::parse(&text, "t").unwrap();
        let dns = &c.vips[1].spec;
        assert_eq!(dns.mode, Mode::Nat);
        assert_eq!(
            dns.backends.iter().map(|b| b.port).collect::<Vec<_>>(),
            [5353, 0],
            "an unset port keeps the VIP's"
        );
        let check = HealthCheck {
            kind: CheckKind::Tcp,
            port: 0,
            interval: Duration::from_secs(1),
            unhealthy_interval: None,
            timeout: Duration::from_secs(1),
            healthy_threshold: 1,
            unhealthy_threshold: 1,
            concurrency: 0,
        };
        assert_eq!(
            dns.backends
                .iter()
                .map(|b| check.port_for(dns, b))
                .collect::<Vec<_>>(),
            [5353, 53],
            "health checks probe the port each backend serves on"
        );
        let nat = &c.node.spec.nat;
        assert_eq!((nat.port_min, nat.port_max), (2000, 2999));
        assert_eq!(nat.close_grace, Duration::from_secs(3));
        assert_eq!(nat.syn_timeout, Duration::from_millis(1500));
        assert_eq!(nat.half_open_timeout, Duration::from_secs(4));
        assert_eq!(nat.tcp_idle_timeout, Duration::from_secs(900));
        assert_eq!(c.node.sizes.nat_table_size, 4096);

        let passive = GOOD
            .replace("    protocol: tcp", "    protocol: tcp\n    mode: nat\n    passive_health: { failures: 4, recheck_interval: 3s }")
            .replace("      - { address: fd01::3, weight: 0 }\n", "");
        let c = Config::parse(&passive, "t").unwrap();
        assert_eq!(
            c.vips[0].passive_health,
            Some(PassiveCheck {
                failures: 4,
                recheck_interval: Duration::from_secs(3),
                timeout: Duration::from_secs(1),
            })
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let got = problems(|s| {
            s.replace("weight: 200", "weight: 70000")
                .replace("protocol: tcp", "protocol: x")
                .replace("table_size: 65537", "table_size: 10")
        });
        assert!(got.len() >= 3, "{got:?}");
    }

    #[test]
    fn sizes_that_need_more_kernel_memory_than_the_limit_are_refused_naming_the_key() {
        crate::kernel::program::require_object();
        // Two NAT tables of 2^25 entries, each entry at least 48 + 40 + 40 bytes: over 8 GiB.
        let big = GOOD.replace(
            "  table_size: 65537",
            "  table_size: 65537\n  nat_table_size: 33554432",
        );
        let got = problems(|_| big.clone());
        assert_eq!(got.len(), 1, "{got:?}");
        let p = &got[0];
        assert!(p.starts_with("node: the maps need about "), "{p}");
        assert!(
            p.contains(
                "more than node.kernel_memory_limit (4 GiB); most goes to node.nat_table_size"
            ),
            "{p}"
        );
        assert!(
            p.ends_with("or raise node.kernel_memory_limit if this host can spare it"),
            "{p}"
        );
    }

    #[test]
    fn a_raised_kernel_memory_limit_takes_sizes_the_default_refuses() {
        let big = GOOD.replace(
            "  table_size: 65537",
            "  table_size: 65537\n  nat_table_size: 33554432\n  kernel_memory_limit: 16GiB",
        );
        let c = Config::parse(&big, "t").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.node.kernel_memory_limit, 16 << 30);
        let c = Config::parse(GOOD, "t").unwrap();
        assert_eq!(c.node.kernel_memory_limit, DEFAULT_KERNEL_MEMORY_LIMIT);
    }

    #[test]
    fn a_kernel_memory_limit_that_is_not_a_size_is_refused() {
        let got = problems(replace(
            "  table_size: 65537",
            "  table_size: 65537\n  kernel_memory_limit: 4GB",
        ));
        assert_eq!(
            got,
            [
                "node.kernel_memory_limit: \"4GB\" is not a size: write it like 4GiB or 512MiB (or in bytes)"
            ]
        );
    }

    #[test]
    fn syntax_errors_and_unknown_keys_are_errors() {
        for (bad, want) in [
            ("node: [", "line 1, column 7: not YAML: "),
            (
                "node:\n  interfaces: [eth0]\n  colour: blue\n",
                "node.colour: unknown key (the keys here are interfaces, ",
            ),
            (
                "node:\n  interfaces: [eth0]\nvips:\n  - adress: 192.0.2.1\n",
                "vips[0].adress: unknown key (did you mean address?)",
            ),
        ] {
            match Config::parse(bad, "bad.yaml") {
                Err(ConfigError::Parse { problems, .. }) => {
                    assert_eq!(problems.len(), 1, "{bad:?}: {problems:?}");
                    let got = problems[0].to_string();
                    assert!(got.starts_with(want), "{bad:?}: {got}");
                }
                other => panic!("{bad:?}: expected a parse error, got {other:?}"),
            }
        }
    }

    #[test]
    fn addresses_no_packet_can_be_balanced_to_or_from_are_refused_naming_what_they_are() {
        for (from, to, want) in [
            (
                "address: 192.0.2.10\n    port: 80",
                "address: 0.0.0.0\n    port: 80",
                "vips[0].address: 0.0.0.0 is the unspecified address: a VIP is a unicast address clients send to",
            ),
            (
                "address: 192.0.2.10\n    port: 80",
                "address: 127.0.0.1\n    port: 80",
                "vips[0].address: 127.0.0.1 is a loopback address: a VIP is a unicast address clients send to",
            ),
            (
                "address: 192.0.2.10\n    port: 80",
                "address: 239.1.2.3\n    port: 80",
                "vips[0].address: 239.1.2.3 is a multicast address: a VIP is a unicast address clients send to",
            ),
            (
                "{ address: 10.1.0.1, weight: 200 }",
                "{ address: 255.255.255.255, weight: 200 }",
                "vips[0].backends[0].address: 255.255.255.255 is the broadcast address: a backend is another host's unicast address",
            ),
            (
                "{ address: fd01::3, weight: 0 }",
                "{ address: ::1, weight: 0 }",
                "vips[0].backends[2].address: ::1 is a loopback address: a backend is another host's unicast address",
            ),
            (
                "{ address: 10.1.0.2, weight: 100 }",
                "{ address: ff02::1, weight: 100 }",
                "vips[0].backends[1].address: ff02::1 is a multicast address: a backend is another host's unicast address",
            ),
        ] {
            let got = problems(replace(from, to));
            assert!(got.iter().any(|p| p == want), "{to}: {got:?}");
        }
    }

    #[test]
    fn a_nat_vip_that_is_its_own_backend_is_refused() {
        let nat = GOOD.replace(
            "    protocol: udp\n    hash: source-ip\n",
            "    protocol: udp\n    mode: nat\n    hash: source-ip\n",
        );
        let own = nat.replace(
            "backends: [{ address: 10.1.0.1 }]",
            "backends: [{ address: 192.0.2.10 }]",
        );
        let got = problems(|_| own.clone());
        let want = "vips[1].backends[0].address: 192.0.2.10 is the VIP's own address: a NAT backend must be another host (the packet would loop back to the load balancer)";
        assert!(got.iter().any(|p| p == want), "{got:?}");
    }

    #[test]
    fn two_vips_of_one_name_warn() {
        let twice = GOOD.replace(
            "  - address: 192.0.2.10\n    port: 53",
            "  - name: web\n    address: 192.0.2.10\n    port: 53",
        );
        let c = Config::parse(&twice, "t").unwrap();
        assert_eq!(
            c.warnings,
            [
                "vips[1].name: \"web\" is also vips[0]'s: commands that take a VIP's name (lb drain) need its address"
            ]
        );
    }

    #[test]
    fn a_vip_without_backends_or_without_weight_warns() {
        let empty = GOOD.replace("backends: [{ address: 10.1.0.1 }]", "backends: []");
        let c = Config::parse(&empty, "t").unwrap();
        assert_eq!(
            c.warnings,
            ["vips[1].backends: empty: the VIP drops its traffic until it has a backend"]
        );
        let zero = GOOD
            .replace("weight: 200", "weight: 0")
            .replace("weight: 100", "weight: 0");
        let c = Config::parse(&zero, "t").unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(
            c.warnings[0].starts_with("vips[0].backends: every weight is 0"),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn small_tables_warn() {
        let c = Config::parse(&GOOD.replace("table_size: 65537", "table_size: 251"), "t").unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.starts_with("vips[0]: table size 251 is below 100 slots")),
            "{:?}",
            c.warnings
        );
    }

    /// GOOD with `budget` as the UDP VIP's (`vips[1]`) new-flow budget.
    fn with_budget(budget: &str) -> String {
        GOOD.replace(
            "    affinity_timeout: 10m\n",
            &format!("    affinity_timeout: 10m\n    new_flow_budget: {budget}\n"),
        )
    }

    #[test]
    fn a_new_flow_budget_is_read_and_burst_defaults_to_the_rate() {
        let c = Config::parse(&with_budget("{ rate: 2000, burst: 50 }"), "t").unwrap();
        assert_eq!(
            c.vips[1].spec.new_flow_budget,
            Some(crate::model::desired::Budget {
                rate: 2000,
                burst: 50
            })
        );
        assert_eq!(c.vips[0].spec.new_flow_budget, None, "absent: no budget");
        let c = Config::parse(&with_budget("{ rate: 300 }"), "t").unwrap();
        assert_eq!(
            c.vips[1].spec.new_flow_budget,
            Some(crate::model::desired::Budget {
                rate: 300,
                burst: 300
            })
        );
    }

    #[test]
    fn bad_new_flow_budgets_are_errors_with_their_path() {
        let p = |b: &str| match Config::parse(&with_budget(b), "t") {
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.iter().map(|p| p.to_string()).collect::<Vec<_>>()
            }
            other => panic!("{b}: expected problems, got {other:?}"),
        };
        assert_eq!(
            p("{ rate: 0, burst: 10 }"),
            ["vips[1].new_flow_budget.rate: must be more than 0"]
        );
        assert_eq!(
            p("{ rate: 10, burst: -1 }"),
            ["vips[1].new_flow_budget.burst: must be more than 0"]
        );
        assert_eq!(
            p("{ burst: 10 }"),
            ["vips[1].new_flow_budget.rate: missing: new flows per second, like rate: 1000"]
        );
        assert_eq!(
            p("{ rate: 1000000001 }"),
            ["vips[1].new_flow_budget.rate: must be at most 1000000000"]
        );
        let typo = match Config::parse(&with_budget("{ rate: 10, brust: 5 }"), "t") {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a misspelt key was taken"),
        };
        assert!(typo.contains("brust"), "{typo}");
    }

    /// GOOD with `vips` (YAML list items) added to its VIPs, and its problems.
    fn with_vips(vips: &str) -> Result<Config, Vec<String>> {
        match Config::parse(&format!("{GOOD}{vips}"), "t") {
            Ok(c) => Ok(c),
            Err(ConfigError::Invalid { problems, .. }) => {
                Err(problems.iter().map(|p| p.to_string()).collect())
            }
            Err(e) => Err(vec![format!("parse: {e}")]),
        }
    }

    #[test]
    fn a_port_range_and_port_0_are_range_vips_with_an_exact_vip_inside_allowed() {
        let c = with_vips(
            "  - { address: 192.0.2.20, port_range: 10000-10999, protocol: tcp, mode: nat, backends: [{ address: 10.1.0.1 }] }\n  - { address: 192.0.2.20, port: 10080, protocol: tcp, mode: nat, backends: [{ address: 10.1.0.2, port: 8080 }] }\n  - { address: 192.0.2.21, port: 0, protocol: udp, backends: [{ address: 10.1.0.1 }] }\n",
        )
        .expect("valid");
        let range = &c.vips[2].spec;
        assert_eq!(
            range.port_range,
            Some(PortRange {
                lo: 10000,
                hi: 10999
            })
        );
        assert_eq!(
            (range.port, range.label()),
            (0, "192.0.2.20:10000-10999/tcp".to_string())
        );
        assert_eq!(c.vips[3].spec.port_range, None, "the exact VIP inside");
        assert_eq!(c.vips[4].spec.port_range, Some(PortRange::ALL));
        assert_eq!(c.vips[4].spec.label(), "192.0.2.21:0-65535/udp");
    }

    #[test]
    fn overlapping_or_second_port_ranges_on_one_address_and_protocol_are_refused_naming_both() {
        let overlap = with_vips(
            "  - { address: 192.0.2.20, port_range: 10000-10999, protocol: tcp, backends: [] }\n  - { address: 192.0.2.20, port_range: 10500-11999, protocol: tcp, backends: [] }\n",
        );
        assert_eq!(
            overlap.err().unwrap(),
            [
                "vips[3].port_range: 10500-11999 overlaps vips[2]'s 10000-10999 on the same address and protocol"
            ]
        );
        let second = with_vips(
            "  - { address: 192.0.2.20, port_range: 10000-10999, protocol: tcp, backends: [] }\n  - { address: 192.0.2.20, port: 0, protocol: tcp, backends: [] }\n",
        );
        assert_eq!(
            second.err().unwrap(),
            [
                "vips[3].port_range: 0-65535 overlaps vips[2]'s 10000-10999 on the same address and protocol"
            ]
        );
        let apart = with_vips(
            "  - { address: 192.0.2.20, port_range: 10000-10999, protocol: tcp, backends: [] }\n  - { address: 192.0.2.20, port_range: 20000-20999, protocol: tcp, backends: [] }\n",
        );
        assert_eq!(
            apart.err().unwrap(),
            [
                "vips[3].port_range: vips[2] has a port range (10000-10999) on this address and protocol already: one range per address and protocol (make it one range, or use another address)"
            ]
        );
        let other_protocol = with_vips(
            "  - { address: 192.0.2.20, port_range: 10000-10999, protocol: tcp, backends: [] }\n  - { address: 192.0.2.20, port_range: 10000-10999, protocol: udp, backends: [] }\n",
        );
        assert!(other_protocol.is_ok(), "{other_protocol:?}");
    }

    #[test]
    fn bad_port_ranges_backend_ports_and_portless_health_checks_are_refused_with_their_keys() {
        let p = |v: &str| with_vips(v).err().unwrap_or_default();
        assert_eq!(
            p(
                "  - { address: 192.0.2.20, port_range: 10999-10000, protocol: tcp, backends: [] }\n"
            ),
            [
                "vips[2].port_range: \"10999-10000\" is not a port range (like 10000-10999, first port <= last)"
            ]
        );
        assert_eq!(
            p(
                "  - { address: 192.0.2.20, port: 80, port_range: 1-2, protocol: tcp, backends: [] }\n"
            ),
            [
                "vips[2].port_range: a VIP has a port or a port_range, not both (port: 0 is every port)"
            ]
        );
        assert_eq!(
            p(
                "  - { address: 192.0.2.20, port_range: 1-2, protocol: tcp, mode: nat, backends: [{ address: 10.1.0.1, port: 8080 }] }\n"
            ),
            [
                "vips[2].backends[0].port: a port-range VIP sends each packet to the port it was sent to, on every backend: remove the port"
            ]
        );
        assert_eq!(
            p(
                "  - { address: 192.0.2.20, port_range: 1-2, protocol: tcp, backends: [{ address: 10.1.0.1 }], health_check: { type: tcp, interval: 2s, timeout: 1s } }\n"
            ),
            [
                "vips[2].health_check.port: required for a port-range VIP (which port of the backends to check)"
            ]
        );
    }

    fn with_ranges(ranges: &str) -> String {
        GOOD.replace(
            "    health_check: { type: http, path: /healthz, interval: 2s, timeout: 500ms }",
            &format!(
                "    health_check: {{ type: http, path: /healthz, interval: 2s, timeout: 500ms }}\n    source_ranges: {ranges}"
            ),
        )
    }

    #[test]
    fn source_ranges_are_read_and_an_empty_list_is_no_restriction() {
        let c = Config::parse(&with_ranges("[198.51.100.0/24, 203.0.113.7]"), "t").unwrap();
        let r: Vec<String> = c.vips[0]
            .spec
            .source_ranges
            .iter()
            .flatten()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(r, ["198.51.100.0/24", "203.0.113.7/32"]);
        assert_eq!(
            c.vips[1].spec.source_ranges, None,
            "not given: every source"
        );
        let c = Config::parse(&with_ranges("[]"), "t").unwrap();
        assert_eq!(c.vips[0].spec.source_ranges, None, "empty: every source");
    }

    #[test]
    fn bad_source_ranges_are_errors_with_their_path() {
        let p = |r: &str| match Config::parse(&with_ranges(r), "t") {
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.iter().map(|p| p.to_string()).collect::<Vec<_>>()
            }
            other => panic!("{r}: expected problems, got {other:?}"),
        };
        assert_eq!(
            p("[198.51.100.0/24, 198.51.100.1/24]"),
            [
                "vips[0].source_ranges[1]: \"198.51.100.1/24\" has host bits set: did you mean 198.51.100.0/24?"
            ]
        );
        assert_eq!(
            p("[10.0.0.0/33]"),
            ["vips[0].source_ranges[0]: \"10.0.0.0/33\": the prefix length must be 0..=32"]
        );
        assert_eq!(
            p("[10.0.0.0/8, nonsense]"),
            [
                "vips[0].source_ranges[1]: \"nonsense\" is not a CIDR (like 192.0.2.0/24 or 2001:db8::/32)"
            ]
        );
        assert_eq!(
            p("[2001:db8::/32]"),
            [
                "vips[0].source_ranges[0]: 2001:db8::/32 is IPv6 and the VIP is IPv4: a VIP's source ranges are of its family"
            ]
        );
        assert_eq!(
            p("[10.0.0.0/8, 10.0.0.0/8]"),
            ["vips[0].source_ranges[1]: 10.0.0.0/8 is already source_ranges[0]"]
        );
    }
}

#[cfg(test)]
mod algorithm_tests {
    use super::*;

    #[test]
    fn algorithm_least_connections_is_read_into_the_vip() {
        let yaml = "node:\n  interfaces: [eth0]\n  source_v4: 10.0.0.1\nvips:\n  - address: 192.0.2.1\n    port: 80\n    protocol: tcp\n    algorithm: least-connections\n    backends: [{ address: 10.1.0.1 }]\n";
        let c = Config::parse(yaml, "test").unwrap();
        assert_eq!(c.vips[0].spec.algorithm, Algorithm::LeastConnections);
    }
}
