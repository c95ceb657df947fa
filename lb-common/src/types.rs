//! Keys and values of the lb maps.
//!
//! Addresses are 16 bytes for both families: an IPv4 address fills the first four bytes and the
//! other twelve are zero, so one key type serves both. All address and port fields are in network
//! byte order; every other integer is in host byte order.

use core::mem::size_of;

/// Address family of an IPv4 address in lb's own keys (not the kernel's `AF_INET`).
pub const FAMILY_V4: u8 = 4;
/// Address family of an IPv6 address in lb's own keys (not the kernel's `AF_INET6`).
pub const FAMILY_V6: u8 = 6;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// A ring slot with no member behind it: packets that land there are dropped and counted.
pub const NO_BACKEND: u32 = u32::MAX;

/// `VipValue::flags`: hash on the source address only (instead of the 5-tuple), so all of a
/// client's connections land on one backend even without an affinity timeout.
pub const VIP_F_HASH_SRC_ONLY: u32 = 1 << 0;
/// `VipValue::flags`: the VIP takes packets only from the sources in its ranges
/// (`LB_SRC_RANGES`); any other source is dropped (`drop_source_range`) before any state is
/// made. Without it the program never looks at the ranges, so a VIP without ranges pays nothing.
/// New in `LB_VIPS` schema 2 (release 0.3.0).
pub const VIP_F_SOURCE_RANGES: u32 = 1 << 1;
/// `VipValue::flags`: the VIP has a new-flow budget (`LB_NEW_FLOW_BUDGET`, see
/// [`crate::budget`]): a packet that misses the flow table takes a token from this CPU's bucket
/// of the VIP, or is dropped (`drop_new_flow_budget`). Without it new flows never look at the
/// budget. New in `LB_VIPS` schema 2 (release 0.3.0, like [`VIP_F_SOURCE_RANGES`]).
pub const VIP_F_NEW_FLOW_BUDGET: u32 = 1 << 2;
/// `VipValue::flags`: least connections. A new flow goes to the member with the fewest open
/// connections for its weight (`LB_MEMBER_CONNS`) among [`crate::select::LEAST_CONN_CANDIDATES`]
/// ring slots sampled with independent hashes of the flow, the first being Maglev's own choice;
/// the program counts the VIP's connections per member. Without it no count is read or kept.
/// New in `LB_VIPS` schema 2 (release 0.3.0, like [`VIP_F_SOURCE_RANGES`]); a release that does
/// not know it balances new flows by Maglev alone, and established flows keep their entries.
/// (Bit 6, not 3: bits 3 to 5 are left to the port-range work of the same release.)
pub const VIP_F_LEAST_CONN: u32 = 1 << 6;

/// `VipValue::mode`: encapsulate (IPIP / IP6IP6) for direct server return.
pub const MODE_DSR: u32 = 0;
/// `VipValue::mode`: rewrite addresses and ports (DNAT + SNAT).
pub const MODE_NAT: u32 = 1;

/// `Member::flags`: the id is in use. An entry without it is treated as absent, since array map
/// entries can't be deleted.
pub const MEMBER_F_LIVE: u8 = 1 << 0;
/// `Member::flags`: the member takes new flows (its weight is above 0 and it is healthy). Without
/// it the member keeps the flows it has (established connections drain) but gets no new
/// connection, not even from a client that session affinity holds on it.
pub const MEMBER_F_ACCEPTS: u8 = 1 << 1;
/// `Member::flags`: the member stands for a share of the VIP's traffic that has no backend to go
/// to (a Gateway API backendRef that does not resolve): a TCP packet Maglev sends to it is
/// answered with a reset (`tx_reset`), anything else dropped (`drop_rejected`). Checked only after
/// a Maglev lookup, so flows followed from the flow table pay nothing for it.
pub const MEMBER_F_REJECT: u8 = 1 << 2;

/// `NodeConfig::flags`: `src_v4` is set.
pub const NODE_F_SRC_V4: u32 = 1 << 0;
/// `NodeConfig::flags`: `src_v6` is set.
pub const NODE_F_SRC_V6: u32 = 1 << 1;
/// `NodeConfig::flags`: check mode for next hops. A packet sent by its member's [`NextHop`]
/// also gets a `bpf_fib_lookup`; where the two disagree the route lookup's answer is used and
/// `nexthop_mismatches` counted.
pub const NODE_F_NEXTHOP_CHECK: u32 = 1 << 2;

/// `NextHop::action`: not resolved; the program asks `bpf_fib_lookup`.
pub const NH_UNRESOLVED: u8 = 0;
/// `NextHop::action`: write the MAC addresses, then `XDP_TX` (egress is the ingress interface)
/// or redirect to `ifindex`.
pub const NH_FORWARD: u8 = 1;
/// `NextHop::action`: the next hop has no usable neighbour entry: pass to the kernel, which
/// resolves it (`pass_no_neighbour`).
pub const NH_NO_NEIGH: u8 = 2;
/// `NextHop::action`: the backend's address is local to this node (`pass_local_backend`).
pub const NH_LOCAL: u8 = 3;
/// `NextHop::action`: no usable route: unreachable, blackhole, prohibit (`drop_fib_failed`).
pub const NH_UNREACHABLE: u8 = 4;

/// What a VIP is: the destination (address, port, protocol) a packet must match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    /// Network byte order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}

/// How a VIP is served.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipValue {
    /// Index of the VIP's Maglev table in the ring and of its counters.
    pub id: u32,
    /// `VIP_F_*`.
    pub flags: u32,
    /// Client-IP session affinity timeout in seconds; 0 disables affinity.
    pub affinity_timeout_s: u32,
    /// `MODE_DSR` or `MODE_NAT`.
    pub mode: u32,
    /// Size of the VIP's Maglev table (a prime); 0 (or anything above the node's table size,
    /// which is the room each VIP has in the ring) means the node's table size.
    pub table_size: u32,
}

impl VipValue {
    /// The VIP's Maglev table size, given the node's (`node.table_size`).
    #[inline(always)]
    pub const fn table_size_of(&self, node_table_size: u32) -> u32 {
        if self.table_size == 0 || self.table_size > node_table_size {
            node_table_size
        } else {
            self.table_size
        }
    }
}

/// An address that carries at least one VIP (any port, any protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipAddr {
    /// Network byte order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// A member: one backend of one VIP. Each (VIP, backend) pair has its own member id, so two
/// VIPs that share a backend address keep separate counters, flows and affinity; the ring holds
/// member ids.
///
/// `generation` tells allocations of one id apart: the agent bumps it whenever it gives the id to a new
/// (VIP, backend) pair (and keeps it in the retired entry), and flow and affinity entries record
/// it, so an entry left behind by a retired member never reaches the id's next owner.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Member {
    /// Network byte order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
    /// Network byte order. Destination port in NAT mode (0: keep the VIP's port); unused in DSR.
    pub port: u16,
    pub family: u8,
    /// `MEMBER_F_*`.
    pub flags: u8,
    /// The VIP id this member belongs to.
    pub vip_id: u32,
    /// Allocation of this id (never 0 for a live member).
    pub generation: u32,
}

/// A connection as the load balancer sees it (client -> VIP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Client address, network byte order.
    pub src: [u8; 16],
    /// VIP address, network byte order.
    pub dst: [u8; 16],
    /// Network byte order.
    pub src_port: u16,
    /// Network byte order.
    pub dst_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// The member an established flow is pinned to. Followed only while that member id still
/// holds the same allocation (`generation`) and belongs to the packet's VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowValue {
    pub member_id: u32,
    /// `Member::generation` of the member when the flow was balanced.
    pub generation: u32,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) when a UDP packet last used the entry;
    /// the time of creation for TCP, which is not refreshed (an LRU keeps live TCP flows). For
    /// TCP its top bit is [`FLOW_ENDED_NS`].
    pub last_seen_ns: u64,
}

/// The top bit of a TCP [`FlowValue::last_seen_ns`] (`LB_FLOWS`, IPv6): the connection ended (a
/// FIN or RST went by on a least-connections VIP and was counted off its member once). A clock
/// never reaches it (2^63 ns is 292 years); readers of the time mask it off. The IPv4 table
/// keeps the same mark in its buckets (`flowtab::ENDED_SHIFT`).
pub const FLOW_ENDED_NS: u64 = 1 << 63;

/// Session-affinity key: one client address on one VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    /// Client address, network byte order.
    pub addr: [u8; 16],
    pub vip_id: u32,
}

/// Session-affinity value: the member a client is held on. Followed only while that member
/// holds the same allocation, belongs to the VIP and takes new flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub member_id: u32,
    /// `Member::generation` of the member when the entry was made.
    pub generation: u32,
    /// CLOCK_MONOTONIC_COARSE of the last new connection that used the entry. The entry is
    /// ignored (and replaced) once it is older than the VIP's timeout.
    pub last_seen_ns: u64,
}

/// How to reach a member's backend, resolved by the agent from the kernel's routes and
/// neighbours (what `bpf_fib_lookup` would answer for the outer packet), so the program does
/// not look the route up per packet. Indexed by member id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NextHop {
    /// Destination MAC: the gateway's, or the backend's on a connected route.
    pub dmac: [u8; 6],
    /// Source MAC: the egress interface's.
    pub smac: [u8; 6],
    /// Egress interface.
    pub ifindex: u32,
    /// The route's MTU (a path MTU exception, the route's `mtu`, else the device's): an outer
    /// packet longer than this is too big (`drop_too_big`, or an ICMP too big).
    pub mtu: u32,
    /// `Member::generation` it was resolved for: an entry of another generation is ignored.
    pub generation: u32,
    /// `NH_*`.
    pub action: u8,
    pub _pad: [u8; 3],
}

/// Settings of this node that the program needs per packet. One entry, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// Outer source for IP6IP6 / IPv4-in-IPv6, network byte order.
    pub src_v6: [u8; 16],
    /// Outer source for IPIP / IPv6-in-IPv4, network byte order.
    pub src_v4: [u8; 4],
    /// `NODE_F_*`.
    pub flags: u32,
    /// A UDP flow idle for longer than this is balanced afresh (and in NAT mode its translation
    /// freed); 0 keeps UDP flows until the LRU evicts them.
    pub udp_idle_timeout_ns: u64,
    /// NAT mode: source ports handed out to translated flows, `nat_port_min..=nat_port_max`,
    /// host byte order. Keep them out of the node's own ephemeral range.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// NAT mode: how long a TCP translation may stay half-open (made by a client's packet,
    /// the handshake not completed by the client's ACK after the backend's answer), in
    /// milliseconds from when it was made; past it the port is free. 0: no such limit (the idle
    /// timeout applies, as in `LB_NODE` schema 1, whose padding this was).
    pub half_open_timeout_ms: u32,
    /// NAT mode: how long a TCP translation lives on after both FINs or an RST (late
    /// retransmissions and the final ACK still get through), before its port can be reused.
    pub nat_close_grace_ns: u64,
    /// NAT mode: a SYN still unanswered after this long counts as a failed connection attempt
    /// to its backend (seen when the client retransmits it).
    pub syn_timeout_ns: u64,
    /// NAT mode: a TCP translation with no packet either way for longer than this is over (an
    /// abandoned connection) and its port free again; 0 keeps it until the LRU evicts it.
    pub tcp_idle_timeout_ns: u64,
}

/// `NatReverse::state`: the client sent a FIN.
pub const NAT_S_FIN_CLIENT: u16 = 1 << 0;
/// `NatReverse::state`: the backend sent a FIN.
pub const NAT_S_FIN_BACKEND: u16 = 1 << 1;
/// `NatReverse::state`: either side sent an RST.
pub const NAT_S_RST: u16 = 1 << 2;
/// `NatReverse::state`: the backend answered (anything but an RST).
pub const NAT_S_ANSWERED: u16 = 1 << 3;
/// `NatReverse::state`: the attempt already counted as a failure (RST, ICMP, or SYN timeout).
pub const NAT_S_FAILED: u16 = 1 << 4;
/// `NatReverse::state` (schema 2 of `LB_NAT_REV`): a TCP translation whose handshake the client
/// has not completed yet (its first ACK after the backend answered clears it). It expires
/// `NodeConfig::half_open_timeout_ms` after it was made, and when ports run short it is taken
/// over before any established translation, oldest first. A translation without the bit (every
/// one schema 1 held) is established.
pub const NAT_S_HALF_OPEN: u16 = 1 << 5;
/// `NatReverse::state` (schema 2 of `LB_NAT_REV`): the translation is counted in its member's
/// open connections (`LB_MEMBER_CONNS`, a least-connections VIP): when it closes (its first RST
/// or second FIN, either way) the count goes down, once.
pub const NAT_S_COUNTED: u16 = 1 << 6;

/// `NatJob::flags`: the VIP balances by least connections, so a new translation is counted.
pub const NAT_JOB_F_LEAST_CONN: u8 = 1 << 0;

/// One member's open connections and weight (`LB_MEMBER_CONNS`, indexed by member id), read
/// for a new flow of a least-connections VIP. The program adds to `conns` atomically (a flow
/// entry or translation made: +1; ended: -1); the agent writes `weight`, and corrects `conns`
/// from its recount of the live entries (what the program never sees end).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemberConns {
    /// Open connections (signed: a decrement may briefly beat the increment it undoes, or the
    /// agent's correction; below zero reads as zero).
    pub conns: i64,
    /// The member's weight (written by the agent; 0 reads as 1).
    pub weight: u32,
    pub _pad: u32,
}

impl MemberConns {
    /// `conns`, at least 0 and at most `u32::MAX` (so that `conns * weight` fits a `u64`).
    #[inline(always)]
    pub const fn open(&self) -> u64 {
        if self.conns <= 0 {
            0
        } else if self.conns > u32::MAX as i64 {
            u32::MAX as u64
        } else {
            self.conns as u64
        }
    }

    /// `weight`, 0 read as 1.
    #[inline(always)]
    pub const fn weight_or_one(&self) -> u64 {
        if self.weight == 0 {
            1
        } else {
            self.weight as u64
        }
    }
}

/// Where a client flow's translation is, keyed by its [`FlowKey`] as the client sent it
/// (client -> VIP). Only a pointer: the translation is the [`NatReverse`] entry at (backend,
/// `nat_port`), and every packet checks that it is still this flow's, so the two tables cannot
/// disagree (a stale or evicted pointer just makes the flow look its port up again).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatFlow {
    /// The member the flow is translated towards.
    pub member_id: u32,
    pub vip_id: u32,
    /// The node's source port towards the backend, network byte order.
    pub nat_port: u16,
    pub _pad: u16,
    /// `Member::generation` of the member when the translation was made.
    pub generation: u32,
}

/// A translation, keyed by its reply's [`FlowKey`] (backend -> node address and NAT port). A
/// live entry is what makes the port taken; it holds all of the translation's state, so
/// whether a port is free is decided from this one entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatReverse {
    /// The flow as the client sent it: where to send the reply, and the [`NatFlow`] key.
    pub client: FlowKey,
    /// The member the flow is translated towards.
    pub member_id: u32,
    pub vip_id: u32,
    /// `NAT_S_*`.
    pub state: u16,
    pub _pad: u16,
    /// `Member::generation` of that member.
    pub generation: u32,
    /// CLOCK_MONOTONIC_COARSE when the translation was made (the SYN, for TCP).
    pub created_ns: u64,
    /// When a packet last used it, either way (refreshed at most every
    /// [`NodeConfig::refresh_ns`], so not every packet writes it); for a closed TCP
    /// translation, when it closed. Taking over an expired entry swaps this field atomically
    /// (compare-and-exchange), so only one CPU can win a port.
    pub last_ns: u64,
}

/// Passive health of one member id, from the replies NAT mode sees (the agent adds up the
/// members of one backend address and port). Shared by all CPUs
/// (updated atomically, once per connection attempt, not per packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PassiveHealth {
    /// Connection attempts the backend answered.
    pub answered: u64,
    /// Connection attempts answered by an RST.
    pub refused: u64,
    /// Connection attempts answered by ICMP destination unreachable.
    pub unreachable: u64,
    /// SYNs still unanswered after `NodeConfig::syn_timeout_ns`.
    pub syn_timeouts: u64,
    /// Failures since the last answer (the agent resets it when it brings a backend back).
    pub consecutive_failures: u64,
}

/// `NatJob::kind`: translate a client's packet towards `member_id`.
pub const NAT_JOB_FORWARD: u8 = 1;
/// `NatJob::kind`: translate a reply to the node back to its client.
pub const NAT_JOB_REVERSE: u8 = 2;
/// `NatJob::kind`: read an ICMP error sent to the node.
pub const NAT_JOB_ICMP: u8 = 3;
/// `NatJob::kind`: balance a packet for a least-connections VIP (`vip_id`; `member_id` unused).
/// Such VIPs are served by a subprogram of their own (its own stack frame), which turns the job
/// into a `NAT_JOB_FORWARD` for a NAT VIP.
pub const NAT_JOB_LEAST_CONN: u8 = 4;

/// What `lb` hands the NAT program when it tail-calls it (per-CPU scratch: a tail call starts
/// with a fresh stack, which is why NAT runs as a program of its own).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatJob {
    /// The packet's flow (for ICMP: only `dst` and `family`).
    pub key: FlowKey,
    /// `NAT_JOB_*`.
    pub kind: u8,
    pub tos: u8,
    pub tcp_flags: u8,
    /// `NAT_JOB_F_*`.
    pub flags: u8,
    pub l3_off: u16,
    pub l4_off: u16,
    pub ip_len: u32,
    pub vip_id: u32,
    pub member_id: u32,
    pub _pad2: u32,
}

impl NatReverse {
    /// Whether both FINs or an RST went by.
    pub const fn closed(&self) -> bool {
        self.state & NAT_S_RST != 0
            || self.state & (NAT_S_FIN_CLIENT | NAT_S_FIN_BACKEND)
                == (NAT_S_FIN_CLIENT | NAT_S_FIN_BACKEND)
    }

    /// Whether the translation is over, so its port may be taken, judged with `last_ns` =
    /// `last`: UDP idle for longer than the UDP idle timeout; TCP closed and past the grace
    /// time, or idle for longer than the TCP idle timeout (connections abandoned without a FIN
    /// or RST). A time in the future (another CPU wrote it after `now_ns` was read) is no idle.
    /// A half-open TCP translation is also over once it is older than the half-open timeout
    /// ([`Self::half_open_over`]).
    pub const fn expired_at(&self, last: u64, proto: u8, now_ns: u64, node: &NodeConfig) -> bool {
        let idle = now_ns.saturating_sub(last);
        let limit = if proto == IPPROTO_UDP {
            node.udp_idle_timeout_ns
        } else if self.closed() {
            return idle > node.nat_close_grace_ns;
        } else if self.half_open_over(now_ns, node) {
            return true;
        } else {
            node.tcp_idle_timeout_ns
        };
        limit != 0 && idle > limit
    }

    /// Whether the client has yet to complete the handshake ([`NAT_S_HALF_OPEN`]).
    pub const fn half_open(&self) -> bool {
        self.state & NAT_S_HALF_OPEN != 0
    }

    /// Whether this is a half-open translation older than the half-open timeout (judged from
    /// when it was made: the backend's SYN-ACK retransmissions do not keep it).
    pub const fn half_open_over(&self, now_ns: u64, node: &NodeConfig) -> bool {
        self.half_open()
            && node.half_open_timeout_ms != 0
            && now_ns.saturating_sub(self.created_ns) > node.half_open_timeout_ms as u64 * 1_000_000
    }

    pub const fn expired(&self, proto: u8, now_ns: u64, node: &NodeConfig) -> bool {
        self.expired_at(self.last_ns, proto, now_ns, node)
    }
}

impl NodeConfig {
    /// How stale `NatReverse::last_ns` may get before a packet refreshes it: a second, or a
    /// quarter of the idle timeout if that is shorter (so a live flow never looks idle).
    pub const fn refresh_ns(&self, proto: u8) -> u64 {
        let t = if proto == IPPROTO_UDP {
            self.udp_idle_timeout_ns
        } else {
            self.tcp_idle_timeout_ns
        };
        if t != 0 && t / 4 < NAT_REFRESH_NS {
            t / 4
        } else {
            NAT_REFRESH_NS
        }
    }
}

/// What `lb_too_big` answers: the packet at `l3_off` (`ip_len` bytes, by its own header) of
/// flow `key` as the sender sent it, which leaves `mtu` bytes on its route.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TooBigJob {
    pub key: FlowKey,
    pub l3_off: u32,
    pub ip_len: u32,
    pub mtu: u32,
    pub _pad: u32,
}

/// What `lb_icmp` reads: an ICMP (IPv4) or ICMPv6 message to address `dst` (a VIP's), its IP
/// header at `l3_off` (`ip_len` bytes by that header), the ICMP header at `l4_off`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IcmpJob {
    /// Network byte order; IPv4 in the first four bytes.
    pub dst: [u8; 16],
    pub family: u8,
    /// IPv4 TOS or IPv6 traffic class of the message.
    pub tos: u8,
    pub l3_off: u16,
    pub l4_off: u16,
    pub _pad: u16,
    pub ip_len: u32,
}

/// A token bucket (one per CPU): `tokens` left as of `last_ns` (`bpf_ktime_get_ns`); one comes
/// back every `1 s / rate`, up to the burst. All zeroes is a full bucket (long idle).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RateBucket {
    pub tokens: u64,
    pub last_ns: u64,
}
/// A remembered route of NAT replies (see [`crate::maps::REPLY_ROUTES`]): the answer of a
/// successful `bpf_fib_lookup` towards `dst` for a packet of `fits` bytes that came in on
/// `ingress` with `tos`, made at `stamp_ns` (`bpf_ktime_get_coarse_ns`; 0: empty).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReplyRoute {
    pub dst: [u8; 16],
    pub stamp_ns: u64,
    pub ingress: u32,
    pub ifindex: u32,
    pub fits: u32,
    pub tos: u8,
    /// 1 if `dst` is IPv4 (in its first four bytes).
    pub v4: u8,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub _pad: [u8; 6],
}
/// See [`NodeConfig::refresh_ns`].
pub const NAT_REFRESH_NS: u64 = 1_000_000_000;

/// What a set of pinned maps was created for. Written once when the maps are created; an agent
/// that finds pins checks it before reusing them, so maps of another layout or size are refused
/// instead of silently misread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LayoutMeta {
    /// [`LAYOUT_VERSION`] of the lb that created the maps.
    pub version: u32,
    pub table_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    pub flow_table_size: u32,
    pub affinity_table_size: u32,
    pub nat_table_size: u32,
    pub _pad: u32,
}

/// The data of an `LB_SRC_RANGES` key (an LPM trie key is this after its prefix length): the
/// VIP id, big-endian so that it is the first 32 bits of every prefix, then the source address
/// in lb's 16-byte form (IPv4 in the first four bytes). A range `a/n` of VIP `v` is the prefix
/// of `32 + n` bits; a VIP is of one family, so its ranges are all of that family and an IPv4
/// range never matches an IPv6 source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRangeKey {
    /// Big-endian (network byte order).
    pub vip_id: [u8; 4],
    /// Network byte order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
}

impl SrcRangeKey {
    /// The key of source `addr` for VIP `vip_id`.
    #[inline(always)]
    pub const fn new(vip_id: u32, addr: [u8; 16]) -> Self {
        Self {
            vip_id: vip_id.to_be_bytes(),
            addr,
        }
    }

    /// The LPM prefix length of a range of `bits` bits of the address.
    pub const fn prefix_len(bits: u32) -> u32 {
        32 + bits
    }
}

/// The data of an `LB_VIP_RANGES` key (an LPM trie key is this after its prefix length): family,
/// protocol, address, then the destination port, so that a prefix covers one address and
/// protocol and the leading bits of the port. A port range is written as the aligned blocks it
/// is made of ([`PortPrefixes`]): at most 30 keys, one (no port bits) for all ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipRangeKey {
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// Network byte order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
    /// Network byte order (big-endian, so its high bits come first in a prefix).
    pub port: [u8; 2],
}

impl VipRangeKey {
    /// Bits of a key before the port: family, protocol, address.
    pub const ADDR_BITS: u32 = 8 + 8 + 128;

    /// The key a packet of flow `k` is looked up with (all of its port's bits).
    #[inline(always)]
    pub const fn of_flow(k: &FlowKey) -> Self {
        Self {
            family: k.family,
            proto: k.proto,
            addr: k.dst,
            port: k.dst_port.to_ne_bytes(),
        }
    }

    /// The LPM prefix length of a block whose first `port_bits` bits of the port count.
    pub const fn prefix_len(port_bits: u32) -> u32 {
        Self::ADDR_BITS + port_bits
    }

    /// The port in host byte order.
    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

/// The aligned blocks a port range `lo..=hi` is made of, as (first port, bits of the port that
/// count), in increasing order: `10000..=10999` is 10000/12 (10000-10015), 10016/11, ... . A
/// block of `b` bits covers `2^(16-b)` ports; the whole range 0-65535 is one block of 0 bits.
/// At most 30 blocks (two per bit but the first and last).
#[derive(Clone, Copy, Debug)]
pub struct PortPrefixes {
    next: u32,
    end: u32,
}

impl PortPrefixes {
    pub const fn new(lo: u16, hi: u16) -> Self {
        Self {
            next: lo as u32,
            end: hi as u32 + 1,
        }
    }
}

impl Iterator for PortPrefixes {
    type Item = (u16, u32);

    fn next(&mut self) -> Option<(u16, u32)> {
        if self.next >= self.end {
            return None;
        }
        // The largest block aligned at `next` that stays within the range.
        let mut size = if self.next == 0 {
            1 << 16
        } else {
            1u32 << self.next.trailing_zeros().min(16)
        };
        while self.next + size > self.end {
            size >>= 1;
        }
        let block = (self.next as u16, 16 - size.trailing_zeros());
        self.next += size;
        Some(block)
    }
}

/// Bumped whenever a map's key or value layout, or a map's meaning, changes.
pub const LAYOUT_VERSION: u32 = 7;

macro_rules! assert_size {
    ($($t:ty => $n:expr),* $(,)?) => { $(const _: () = assert!(size_of::<$t>() == $n);)* };
}

// Sizes are the sum of the fields: no implicit padding anywhere.
assert_size!(
    VipKey => 20,
    VipValue => 20,
    VipAddr => 20,
    Member => 28,
    FlowKey => 40,
    FlowValue => 16,
    AffinityKey => 20,
    AffinityValue => 16,
    NodeConfig => 64,
    NatFlow => 16,
    NatReverse => 72,
    PassiveHealth => 40,
    NatJob => 64,
    LayoutMeta => 32,
    RateBucket => 16,
    TooBigJob => 56,
    IcmpJob => 28,
    NextHop => 28,
    SrcRangeKey => 20,
    VipRangeKey => 20,
    ReplyRoute => 56,
    MemberConns => 16,
);

impl VipKey {
    /// The address part of this VIP, for the VIP-address set.
    pub const fn vip_addr(&self) -> VipAddr {
        VipAddr {
            addr: self.addr,
            family: self.family,
            _pad: [0; 3],
        }
    }
}

impl FlowKey {
    /// The VIP this flow is aimed at: its destination address, port and protocol.
    #[inline(always)]
    pub const fn vip_key(&self) -> VipKey {
        VipKey {
            addr: self.dst,
            port: self.dst_port,
            proto: self.proto,
            family: self.family,
        }
    }
}

impl Member {
    pub const fn is_live(&self) -> bool {
        self.flags & MEMBER_F_LIVE != 0
    }

    /// Whether the member takes new flows.
    pub const fn accepts(&self) -> bool {
        self.flags & MEMBER_F_ACCEPTS != 0
    }

    /// Whether the member rejects what Maglev sends it (see [`MEMBER_F_REJECT`]).
    pub const fn rejects(&self) -> bool {
        self.flags & MEMBER_F_REJECT != 0
    }

    /// Whether this is the live allocation `generation` of the id, a member of VIP `vip_id`.
    pub const fn is(&self, vip_id: u32, generation: u32) -> bool {
        self.is_live() && self.vip_id == vip_id && self.generation == generation
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made only of integers and byte arrays, and
    // have no implicit padding (sizes asserted above), so every bit pattern is valid.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipValue {}
    unsafe impl aya::Pod for VipAddr {}
    unsafe impl aya::Pod for Member {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for LayoutMeta {}
    unsafe impl aya::Pod for NatFlow {}
    unsafe impl aya::Pod for NatReverse {}
    unsafe impl aya::Pod for PassiveHealth {}
    unsafe impl aya::Pod for NatJob {}
    unsafe impl aya::Pod for MemberConns {}
    unsafe impl aya::Pod for crate::TrafficStats {}
    unsafe impl aya::Pod for RateBucket {}
    unsafe impl aya::Pod for TooBigJob {}
    unsafe impl aya::Pod for IcmpJob {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for SrcRangeKey {}
    unsafe impl aya::Pod for VipRangeKey {}
    unsafe impl aya::Pod for ReplyRoute {}
    unsafe impl aya::Pod for crate::flowtab::FlowBucket {}
}

#[cfg(test)]
mod tests {
    use super::PortPrefixes;

    /// The ports the blocks of `lo..=hi` cover, one by one, and the number of blocks.
    fn covered(lo: u16, hi: u16) -> ([bool; 65536], usize) {
        let mut seen = [false; 65536];
        let mut n = 0;
        for (first, bits) in PortPrefixes::new(lo, hi) {
            n += 1;
            let size = 1u32 << (16 - bits);
            assert_eq!(
                u32::from(first) % size,
                0,
                "block {first}/{bits} is not aligned"
            );
            for p in u32::from(first)..u32::from(first) + size {
                assert!(!seen[p as usize], "port {p} in two blocks");
                seen[p as usize] = true;
            }
        }
        (seen, n)
    }

    #[test]
    fn port_blocks_cover_exactly_the_range_in_at_most_30_keys() {
        for (lo, hi) in [
            (10000, 10999),
            (0, 65535),
            (1, 65535),
            (0, 0),
            (80, 80),
            (1, 65534),
            (32768, 65535),
            (1023, 1024),
        ] {
            let (seen, n) = covered(lo, hi);
            for (p, s) in seen.iter().enumerate() {
                assert_eq!(
                    *s,
                    (lo as usize..=hi as usize).contains(&p),
                    "{lo}-{hi}: port {p}"
                );
            }
            assert!(n <= 30, "{lo}-{hi}: {n} blocks");
        }
    }

    #[test]
    fn all_ports_are_one_block_without_port_bits() {
        let mut all = PortPrefixes::new(0, 65535);
        assert_eq!((all.next(), all.next()), (Some((0, 0)), None));
        assert_eq!(PortPrefixes::new(1, 65534).count(), 30);
    }
}
