//! Map names, default sizes and limits, used by both the program and the agent.
//!
//! Sizes marked "set at load time" are only defaults: the agent overrides them with
//! `EbpfLoader::set_max_entries` before loading, so the object file never needs rebuilding.

/// VIP table: [`crate::VipKey`] -> [`crate::VipValue`].
pub const VIPS: &str = "LB_VIPS";
/// Addresses that carry at least one VIP: [`crate::VipAddr`] -> number of VIPs on it.
/// Consulted only for packets that cannot be balanced (fragments, malformed L4), to drop the
/// ones aimed at a VIP address instead of handing them to the kernel.
pub const VIP_ADDRS: &str = "LB_VIP_ADDRS";
/// A Bloom-style filter of the VIP-address set, `VIP_FILTER_BITS` bits in `u64` words: an
/// address whose bit ([`crate::vip_filter_slot`]) is clear carries no VIP, so the program passes
/// the packet without looking it up in the VIP table. The agent sets an address's bit before
/// the address gets a VIP and clears it only after no address using it carries one.
pub const VIP_FILTER: &str = "LB_VIP_FILTER";
/// All Maglev tables, one after another: slot `s` of VIP id `v` is entry `v * M + s` and holds a
/// member id ([`crate::NO_BACKEND`] when the VIP has none).
pub const RING: &str = "LB_RING";
/// Member id -> [`crate::Member`] (one per VIP and backend).
pub const MEMBERS: &str = "LB_MEMBERS";
/// Established IPv6 flows: [`crate::FlowKey`] -> [`crate::FlowValue`] (LRU).
pub const FLOWS: &str = "LB_FLOWS";
/// Established IPv4 flows: [`crate::flowtab::FlowBucket`]s (a set-associative table, see
/// [`crate::flowtab`]); IPv6 flows stay in [`FLOWS`]. Mmapable, so the buckets are page- and
/// so cache-line-aligned and the agent can read the table in place.
pub const FLOWS4: &str = "LB_FLOWS4";
/// Flags of [`FLOWS4`].
pub const FLOWS4_FLAGS: u32 = RING_FLAGS;
/// Name of the read-only global holding the number of buckets of [`FLOWS4`] (set at load time).
pub const GLOBAL_FLOW_BUCKETS: &str = "LB_FLOW_BUCKETS";
/// Client-IP session affinity: [`crate::AffinityKey`] -> [`crate::AffinityValue`] (LRU).
pub const AFFINITY: &str = "LB_AFFINITY";
/// Member id -> [`crate::NextHop`]: how to reach the member's backend, written by the agent.
pub const NEXTHOPS: &str = "LB_NEXTHOPS";
/// Node settings, one entry: [`crate::NodeConfig`].
pub const NODE: &str = "LB_NODE";
/// Global per-CPU counters, indexed by [`crate::Counter`].
pub const STATS: &str = "LB_STATS";
/// Per-VIP per-CPU [`crate::TrafficStats`], indexed by VIP id.
pub const VIP_STATS: &str = "LB_VIP_STATS";
/// Per-member per-CPU [`crate::TrafficStats`], indexed by member id (zeroed when the agent
/// gives the id to a new member).
pub const MEMBER_STATS: &str = "LB_MEMBER_STATS";
/// NAT mode, forward: [`crate::FlowKey`] as the client sent it -> [`crate::NatFlow`] (LRU).
pub const NAT: &str = "LB_NAT";
/// NAT mode, reverse: [`crate::FlowKey`] of a reply (backend -> node) -> [`crate::NatReverse`]
/// (LRU). Its existence is what makes a NAT source port taken.
pub const NAT_REV: &str = "LB_NAT_REV";
/// Passive health per member id: [`crate::PassiveHealth`] (shared, not per CPU).
pub const MEMBER_PASSIVE: &str = "LB_MEMBER_PASSIVE";
/// Tail-call targets of `lb`: [`TOO_BIG_PROG_INDEX`] and [`ICMP_PROG_INDEX`] (index 0 held
/// `lb_nat` before 0.3.0, and stays empty). Pinned, so its entries outlive the agent that wrote
/// them.
pub const PROGS: &str = "LB_PROGS";
/// Per-CPU [`crate::NatJob`] that `lb`'s first subprogram leaves for its NAT subprogram, in the
/// same run on the same CPU (each has a stack frame of its own, and the two would not fit one
/// call chain's 512 bytes). Before 0.3.0 it passed the job on to `lb_nat`, a tail call.
pub const NAT_JOB: &str = "LB_NAT_JOB";
/// Index of `lb_too_big` in [`PROGS`]: it answers packets too big for the egress MTU with an
/// ICMP too big, on a stack of its own (the callers' are nearly full).
pub const TOO_BIG_PROG_INDEX: u32 = 1;
/// Name of the ICMP too big program in the object.
pub const TOO_BIG_PROGRAM: &str = "lb_too_big";
/// Index of `lb_icmp` in [`PROGS`]: it forwards ICMP errors aimed at a DSR VIP to the backend
/// of the flow they quote.
pub const ICMP_PROG_INDEX: u32 = 2;
/// Name of the ICMP error program in the object.
pub const ICMP_PROGRAM: &str = "lb_icmp";
/// Tail-call slots in [`PROGS`].
pub const PROG_SLOTS: u32 = 3;
/// Per-CPU [`crate::TooBigJob`] passed to `lb_too_big` by `lb` and `lb_nat`. Pinned, like
/// [`NAT_JOB`].
pub const TOO_BIG_JOB: &str = "LB_TOO_BIG_JOB";
/// Per-CPU [`crate::IcmpJob`] passed from `lb` to `lb_icmp`. Pinned, like [`NAT_JOB`].
pub const ICMP_JOB: &str = "LB_ICMP_JOB";
/// Egress interfaces for `XDP_REDIRECT`: ifindex -> ifindex (devmap hash).
pub const TX_PORTS: &str = "LB_TX_PORTS";

/// Per-CPU [`crate::RateBucket`] limiting the ICMP too big messages the program sends. Not
/// pinned: a restart may refill the buckets, no harm done.
pub const ICMP_BUCKET: &str = "LB_ICMP_BUCKET";
/// ICMP too big messages each CPU may send per second, in the long run (Linux allows 1000 ICMP
/// per second per host by default). One is enough for a sender to learn a path MTU, which it
/// keeps for minutes; one not sent costs a retransmission timeout. The limit keeps a flood of
/// large packets from becoming a flood of ICMP.
pub const ICMP_TOO_BIG_RATE: u64 = 100;
/// ... and at once, after a quiet spell: a sender's window of full-size segments, or several
/// senders starting together.
pub const ICMP_TOO_BIG_BURST: u64 = 32;

/// Per-CPU [`crate::ReplyRoute`]s, [`REPLY_ROUTE_SLOTS`] of them, indexed by a hash of the
/// destination: the route lookups of NAT replies, each used again for [`REPLY_ROUTE_TTL_NS`]
/// (a reply's route lookup, `bpf_fib_lookup`, is most of its cost). Not pinned: a new program
/// starts with an empty cache, no harm done.
pub const REPLY_ROUTES: &str = "LB_REPLY_ROUTES";
/// Slots of [`REPLY_ROUTES`] per CPU (a power of two).
pub const REPLY_ROUTE_SLOTS: u32 = 1024;
/// How long a remembered reply route is used: a route or neighbour change reaches replies
/// within this time.
pub const REPLY_ROUTE_TTL_NS: u64 = 1_000_000_000;

/// One `u32`: while not 0, the program makes no new NAT translation (`drop_nat_held`). Set by a
/// migration from just before its swap until it has merged the old program's last translations
/// (see `lb_userspace::migrate`). Not pinned: it belongs to one loaded program.
pub const NAT_HOLD: &str = "LB_NAT_HOLD";

/// What the pinned maps were created for: [`crate::LayoutMeta`], one entry. Not used by the
/// program; the agent writes and checks it.
pub const META: &str = "LB_META";

/// Source ranges of the VIPs that have them: an LPM trie, [`crate::SrcRangeKey`] (after the
/// prefix length) -> 1. Looked up only for VIPs with [`crate::VIP_F_SOURCE_RANGES`].
pub const SRC_RANGES: &str = "LB_SRC_RANGES";
/// Ranges `LB_SRC_RANGES` holds, over all VIPs (an LPM trie is not preallocated: entries cost
/// memory only when written).
pub const MAX_SOURCE_RANGES: u32 = 16_384;
/// Per-VIP per-CPU `u64`, indexed by VIP id: packets dropped because their source is outside
/// the VIP's ranges (`drop_source_range`).
pub const VIP_DROPS: &str = "LB_VIP_DROPS";

/// Port-range VIPs: an LPM trie, [`crate::VipRangeKey`] (after the prefix length) ->
/// [`crate::VipValue`] (the range VIP's own id, flags and mode; every block of one range holds
/// the same value). Looked up only when `LB_VIPS` misses for an address whose filter bit is set,
/// so an exact VIP inside a range wins and packets to exact VIPs never look at it.
pub const VIP_RANGES: &str = "LB_VIP_RANGES";
/// Keys `LB_VIP_RANGES` holds, over all ranges (at most 30 per range; an LPM trie is not
/// preallocated).
pub const MAX_VIP_RANGE_KEYS: u32 = 4_096;

/// New-flow budgets: per-CPU [`crate::NewFlowBudget`], indexed by VIP id (the agent's settings
/// and the program's tokens side by side, one lookup). Looked up only for VIPs with
/// [`crate::VIP_F_NEW_FLOW_BUDGET`].
pub const NEW_FLOW_BUDGET: &str = "LB_NEW_FLOW_BUDGET";
/// Per-VIP per-CPU `u64`, indexed by VIP id: packets dropped because the VIP's new-flow budget
/// had no token left (`drop_new_flow_budget`).
pub const VIP_BUDGET_DROPS: &str = "LB_VIP_BUDGET_DROPS";

/// Per-VIP per-CPU [`crate::TrafficStats`], indexed by VIP id: NAT replies (backend ->
/// client) translated back (`new_flows` stays 0).
pub const VIP_REPLY_STATS: &str = "LB_VIP_REPLY_STATS";
/// Per-member per-CPU [`crate::TrafficStats`], indexed by member id: the NAT replies of each
/// member (`new_flows` stays 0).
pub const MEMBER_REPLY_STATS: &str = "LB_MEMBER_REPLY_STATS";

/// A ring buffer of the member ids whose connection attempt just failed (NAT passive health):
/// it wakes the agent, which takes a backend out as soon as its streak reaches the threshold
/// rather than at its next look at the counters. Not pinned: each program has its own, read by
/// the agent that loaded it; a full ring loses wake-ups, never counts.
pub const EVENTS: &str = "LB_EVENTS";
/// Bytes of `LB_EVENTS`: 256 events of 16 bytes (a member id and the record's header).
pub const EVENTS_BYTES: u32 = 4096;

/// Per member id, `u64`: the low half is the agent's, the passive-health failure threshold of
/// the member's VIP (0: none); the high half is the program's, when (milliseconds of
/// CLOCK_MONOTONIC_COARSE, wrapping, never 0) the member's failure streak reached it. For
/// [`PASSIVE_HOLD_MS`] after that, a new connection to the member is held back (its SYN dropped,
/// `drop_backend_failing`), time for the agent to take the member out: the client's
/// retransmission then goes to another backend instead of being refused.
pub const MEMBER_HOLD: &str = "LB_MEMBER_HOLD";
/// How long new connections to a member whose failure streak reached the threshold are held
/// back (see [`MEMBER_HOLD`]): longer than an agent takes to act, shorter than a SYN's second
/// retransmission (3 s after the first), so that without an agent they are refused, not lost.
pub const PASSIVE_HOLD_MS: u32 = 2_000;

/// Per member id, [`crate::MemberConns`]: the program's count of the member's open connections
/// and the agent's weight side by side (one lookup per candidate). Read and kept only for
/// members of VIPs with [`crate::VIP_F_LEAST_CONN`].
/// `BPF_F_MMAPABLE`, so that the agent writes a weight, and adds its correction to a count,
/// in place (an atomic add, like the program's) rather than rewriting the whole value.
pub const MEMBER_CONNS: &str = "LB_MEMBER_CONNS";
/// [`MEMBER_CONNS`]' flags: `BPF_F_MMAPABLE`.
pub const MEMBER_CONNS_FLAGS: u32 = RING_FLAGS;

/// Every map, for pinning.
pub const ALL: &[&str] = &[
    VIPS,
    VIP_ADDRS,
    VIP_FILTER,
    RING,
    MEMBERS,
    NEXTHOPS,
    FLOWS,
    FLOWS4,
    AFFINITY,
    NODE,
    STATS,
    VIP_STATS,
    MEMBER_STATS,
    NAT,
    NAT_REV,
    MEMBER_PASSIVE,
    PROGS,
    NAT_JOB,
    TOO_BIG_JOB,
    ICMP_JOB,
    TX_PORTS,
    META,
    SRC_RANGES,
    VIP_DROPS,
    NEW_FLOW_BUDGET,
    VIP_BUDGET_DROPS,
    VIP_REPLY_STATS,
    MEMBER_REPLY_STATS,
    MEMBER_HOLD,
    VIP_RANGES,
    MEMBER_CONNS,
];

/// `BPF_F_MMAPABLE`: the ring is mapped into the agent's memory, so a table rewrite is a run of
/// memory stores rather than one syscall per slot.
pub const RING_FLAGS: u32 = 1 << 10;

/// Name of the read-only global holding the Maglev table size M (set at load time).
pub const GLOBAL_MAGLEV_M: &str = "LB_MAGLEV_M";

/// Default Maglev table size: prime, and large enough for 1 % balance with up to 655 backends.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
/// Default number of VIPs (set at load time). The ring holds `max_vips * M` slots.
pub const DEFAULT_MAX_VIPS: u32 = 64;
/// Default number of member ids (set at load time): a backend serving two VIPs takes two.
pub const DEFAULT_MAX_BACKENDS: u32 = 4_096;
/// Default flow-table size (set at load time).
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1 << 20;
/// Default affinity-table size (set at load time).
pub const DEFAULT_AFFINITY_TABLE_SIZE: u32 = 1 << 16;
/// Default size of each NAT table (forward and reverse; set at load time).
pub const DEFAULT_NAT_TABLE_SIZE: u32 = 1 << 18;
/// Default NAT source ports: below Linux's default ephemeral range (32768-60999), so the
/// node's own connections never collide with translated ones.
pub const DEFAULT_NAT_PORT_MIN: u16 = 1024;
pub const DEFAULT_NAT_PORT_MAX: u16 = 32767;
/// Default size of the VIP-address set (set at load time, with the VIP table).
pub const DEFAULT_VIP_ENTRIES: u32 = 1_024;
/// Egress interfaces the devmap can hold.
pub const MAX_TX_PORTS: u32 = 256;

/// Bytes of the benchmark generator's template frame (`lb_gen`).
pub const GEN_FRAME_LEN: usize = 64;
/// The generator's template map (benchmarks only; never pinned).
pub const GEN_FRAME: &str = "LB_GEN_FRAME";

/// Entries of the cost probes' LRU table (`LB_PROBE_FLOWS`, benchmarks only).
pub const PROBE_FLOW_ENTRIES: u32 = 8_192;

/// IPv6 extension headers the parser walks through before giving up on finding TCP or UDP.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;
/// Default grace time of a closed TCP translation, in seconds.
pub const DEFAULT_NAT_CLOSE_GRACE_S: u64 = 10;
/// Default idle timeout of a TCP translation, in seconds: between the 350-600 s of cloud load
/// balancers (AWS NLB, GCP), which clients and keepalive settings are already tuned to
/// survive, and IPVS's 900 s; at this length a backend's 31,744 default ports absorb about 50
/// abandoned connections a second without running out.
pub const DEFAULT_NAT_TCP_IDLE_TIMEOUT_S: u64 = 600;
/// Default time after which an unanswered SYN counts as a failure, in seconds.
pub const DEFAULT_SYN_TIMEOUT_S: u64 = 2;
/// Default half-open timeout of a TCP translation, in milliseconds: a client completes its
/// handshake within a round trip, and this covers its SYN retransmissions at 1 s and 3 s;
/// conntrack keeps SYN_RECV for 60 s, which a flood of spoofed SYNs turns into 60 s of held
/// ports.
pub const DEFAULT_NAT_HALF_OPEN_TIMEOUT_MS: u32 = 10_000;
/// Hop limit / TTL of the outer header written on encapsulation.
pub const OUTER_TTL: u8 = 64;
