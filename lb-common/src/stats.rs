//! Counters.
//!
//! Every packet the program sees ends in exactly one *verdict* counter, so the verdicts add up to
//! [`Counter::Packets`]; the *event* counters say what happened on the way (a flow-table hit, a
//! fragment seen, ...) and add up to nothing in particular.

use core::mem::size_of;

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident = $label:literal, $verdict:literal;)*) => {
        /// Index of a global counter in the per-CPU stats array.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Counter {
            $($(#[doc = $doc])* $name,)*
        }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Stable snake_case name, used by `lb stats`, JSON output and Prometheus.
            pub const fn name(self) -> &'static str {
                match self { $(Counter::$name => $label,)* }
            }

            /// Whether this counter is a final verdict (one per packet).
            pub const fn is_verdict(self) -> bool {
                match self { $(Counter::$name => $verdict,)* }
            }
        }
    };
}

counters! {
    /// Every packet the program ran on. Not counted by the program: it is the sum of the
    /// verdicts (see [`derive`]).
    Packets = "packets", false;

    // Verdicts.
    /// Passed untouched: not IP, not TCP/UDP, or no VIP matches.
    PassNotForVip = "pass_not_for_vip", true;
    /// Passed untouched: truncated or malformed, and not aimed at a VIP address.
    PassMalformed = "pass_malformed", true;
    /// Dropped: truncated or malformed L4 header aimed at a VIP address.
    DropMalformed = "drop_malformed", true;
    /// Dropped: an IP fragment aimed at a VIP address (later fragments carry no ports, so the
    /// datagram could not be kept on one backend).
    DropFragment = "drop_fragment", true;
    /// Dropped: the VIP has no backend (or its slot points at a removed one).
    DropNoBackend = "drop_no_backend", true;
    /// Dropped: no outer source address is configured for the backend's family.
    DropNoSourceAddress = "drop_no_source_address", true;
    /// Dropped: the packet could not be grown for encapsulation.
    DropEncapFailed = "drop_encap_failed", true;
    /// Not forwarded: the packet (encapsulated, or translated) exceeds the egress MTU. The sender
    /// is told with an ICMP too big in its place (`icmp_too_big_sent`) unless that is rate
    /// limited, or the packet is IPv4 without DF, or itself an ICMP error; the action is then
    /// the ICMP's (`XDP_TX`, `XDP_REDIRECT`, `XDP_PASS`), else `XDP_DROP`.
    DropTooBig = "drop_too_big", true;
    /// Dropped: no route to the backend (or, for a NAT reply, the client): unreachable,
    /// blackhole, prohibited, forwarding off.
    DropFibFailed = "drop_fib_failed", true;
    /// Dropped: the VIP is in NAT mode but the NAT program is not installed (tail call failed).
    DropNatUnavailable = "drop_nat_unavailable", true;
    /// Dropped: NAT mode found no free source port towards the backend within its probes.
    DropNatPortsExhausted = "drop_nat_ports_exhausted", true;
    /// Passed to the kernel untranslated: NAT mode would forward it, but its TTL / hop limit is
    /// spent (the kernel answers with ICMP time exceeded).
    PassTtlExceeded = "pass_ttl_exceeded", true;
    /// Encapsulated or translated, and passed to the kernel: the next hop has no neighbour
    /// entry yet.
    PassNoNeighbour = "pass_no_neighbour", true;
    /// Encapsulated or translated, and passed to the kernel: the destination is local to this
    /// node.
    PassLocalBackend = "pass_local_backend", true;
    /// Encapsulated or translated, and sent back out of the interface it came in on.
    Tx = "tx", true;
    /// Encapsulated or translated, and redirected to another interface.
    Redirect = "redirect", true;
    /// Encapsulated or translated, and passed to the kernel: the egress interface is not in the
    /// devmap.
    PassNoTxPort = "pass_no_tx_port", true;
    /// A TCP packet Maglev gave to a rejecting member (a share with no backend, e.g. a Gateway
    /// API backendRef that does not resolve): answered with a reset (RFC 793) sent back out of
    /// the interface it came in on.
    TxReset = "tx_reset", true;
    /// Dropped: a packet Maglev gave to a rejecting member that is not TCP (UDP), or a TCP reset
    /// (never answered), or one whose reset could not be built.
    DropRejected = "drop_rejected", true;

    // Events.
    /// IPv4 or IPv6 fragment seen (to any address).
    Fragments = "fragments", false;
    /// IPv6 packet with more extension headers than the parser walks.
    Ipv6ExtLimit = "ipv6_ext_limit", false;
    /// Packet matched a VIP. Not counted by the program: it is the sum of the VIPs' own
    /// packet counters (see [`derive`]).
    VipPackets = "vip_packets", false;
    /// Flow-table hit that was followed.
    FlowHits = "flow_hits", false;
    /// Flow-table hit whose member is gone or was re-allocated: balanced afresh.
    FlowStale = "flow_stale", false;
    /// UDP flow-table hit older than the idle timeout: balanced afresh.
    FlowIdleExpired = "flow_idle_expired", false;
    /// Session-affinity hit that was followed.
    AffinityHits = "affinity_hits", false;
    /// Session-affinity entry found but older than the VIP's timeout: replaced.
    AffinityExpired = "affinity_expired", false;
    /// Session-affinity entry whose member is gone, re-allocated or takes no new flows
    /// (unhealthy, weight 0): replaced by a fresh choice.
    AffinityStale = "affinity_stale", false;
    /// Backend chosen by Maglev.
    MaglevLookups = "maglev_lookups", false;
    /// New flow recorded in the flow table.
    NewFlows = "new_flows", false;
    /// A new flow not recorded: no way of its two buckets could be taken (each held an
    /// established flow seen within the guard time, or was being written by another CPU); Maglev
    /// served it without an entry.
    FlowInsertFailed = "flow_insert_failed", false;
    /// TCP packet without SYN that missed the flow table (mid-stream after a failover or restart).
    NonSynMiss = "non_syn_miss", false;
    /// NAT mode: a new translation (a source port taken towards a backend).
    NatNew = "nat_new", false;
    /// NAT mode: a packet translated towards a backend.
    NatForward = "nat_forward", false;
    /// NAT mode: a reply translated back towards its client.
    NatReverse = "nat_reverse", false;
    /// NAT mode: a source port probe found the port taken by a live flow.
    NatPortCollisions = "nat_port_collisions", false;
    /// NAT mode: a reply matched a translation that is over or was replaced: passed untouched.
    NatReverseStale = "nat_reverse_stale", false;
    /// NAT mode: writing a translation failed.
    NatInsertFailed = "nat_insert_failed", false;
    /// NAT mode: a TCP translation closed (both FINs, or an RST).
    NatClosed = "nat_closed", false;
    /// Passive health: a connection attempt answered by an RST.
    NatRefused = "nat_refused", false;
    /// Passive health: a connection attempt answered by ICMP destination unreachable (other than
    /// fragmentation needed).
    NatUnreachable = "nat_unreachable", false;
    /// Passive health: a SYN retransmitted after the SYN timeout without an answer.
    NatSynTimeouts = "nat_syn_timeouts", false;
    /// An ICMP too big (IPv4 fragmentation needed, ICMPv6 packet too big) sent back to the
    /// sender of a packet that did not fit the egress MTU (see `drop_too_big`).
    IcmpTooBigSent = "icmp_too_big_sent", false;
    /// An ICMP too big not sent: over this CPU's rate limit (`maps::ICMP_TOO_BIG_RATE`).
    IcmpTooBigRateLimited = "icmp_too_big_rate_limited", false;
    /// NAT mode: an ICMP fragmentation needed (IPv4) or packet too big (IPv6) about a translated
    /// packet: the path to the backend has a smaller MTU. Not a failed connection attempt.
    NatFragNeeded = "nat_frag_needed", false;
    /// An ICMP error aimed at a DSR VIP (destination unreachable, fragmentation needed / packet
    /// too big, time exceeded), quoting a packet a backend sent for one of its flows: sent on,
    /// encapsulated, to that flow's member (the verdict says how it left).
    IcmpForwarded = "icmp_forwarded", false;
    /// NAT mode: an ICMP error about a translated packet, translated back (the quote as the
    /// client sent it) and sent on to the client (the verdict says how it left).
    NatIcmpReverse = "nat_icmp_reverse", false;
    /// A packet for a member with no next hop resolved for its generation: routed with
    /// `bpf_fib_lookup` instead.
    NexthopFallbacks = "nexthop_fallbacks", false;
    /// Check mode (`nexthop_check`): the member's next hop and `bpf_fib_lookup` disagreed (the
    /// route lookup's answer was used).
    NexthopMismatches = "nexthop_mismatches", false;
    // Counters added after release 0.1.0 go last, so that every earlier one keeps its index
    // (a counter's index is its meaning in the pinned `LB_STATS`).
    /// Dropped: NAT mode, a packet that needed a new translation in the moment a migration holds
    /// new NAT source ports back (between the swap and the merge of the old program's last
    /// translations, so that no port is handed out twice); the client's retransmission gets one.
    DropNatHeld = "drop_nat_held", true;
    // Added in 0.3.0.
    /// Dropped: the VIP takes packets from some sources only (`source_ranges`), and this one
    /// is not among them. Also counted per VIP (`LB_VIP_DROPS`).
    DropSourceRange = "drop_source_range", true;
    /// NAT: a client completed a handshake (its ACK after the backend's answer): the
    /// translation is established and no longer half-open.
    NatEstablished = "nat_established", false;
    /// NAT: a half-open translation past `node.nat_half_open_timeout` was taken over for a new
    /// one (its port was free again).
    NatHalfOpenExpired = "nat_half_open_expired", false;
    /// NAT: ports ran short and the oldest half-open translation among the candidates was taken
    /// over before its timeout (a SYN flood's entries go first; established ones never).
    NatHalfOpenReclaimed = "nat_half_open_reclaimed", false;
    /// Dropped: a packet that would make a new flow (it missed the flow table) at a VIP whose
    /// new-flow budget (`new_flow_budget`) has no token left on this CPU; established flows
    /// never take tokens. Also counted per VIP (`LB_VIP_BUDGET_DROPS`).
    DropNewFlowBudget = "drop_new_flow_budget", true;
    /// Dropped: NAT mode, a SYN for a new connection to a backend whose failure streak reached
    /// its passive-health threshold a moment ago (see `maps::MEMBER_HOLD`): held back rather
    /// than refused, while the agent takes the backend out; the client's retransmission goes
    /// to another backend.
    DropBackendFailing = "drop_backend_failing", true;
}

/// Fills in the counters the program leaves to its readers (one map write fewer per packet
/// each): [`Counter::Packets`], the sum of the verdicts, and [`Counter::VipPackets`], the sum of
/// the per-VIP packet counters (`vip_packets`). `counts` is indexed by [`Counter`].
pub fn derive(counts: &mut [u64], vip_packets: u64) {
    let verdicts = Counter::ALL
        .iter()
        .filter(|c| c.is_verdict())
        .map(|c| counts[*c as usize])
        .fold(0u64, u64::wrapping_add);
    counts[Counter::Packets as usize] = verdicts;
    counts[Counter::VipPackets as usize] = vip_packets;
}

/// Per-VIP and per-backend traffic, one per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TrafficStats {
    pub packets: u64,
    /// Frame bytes as received (before encapsulation).
    pub bytes: u64,
    pub new_flows: u64,
}

const _: () = assert!(size_of::<TrafficStats>() == 24);

impl TrafficStats {
    /// Both added up (two CPUs' counters, two members of one backend).
    pub fn plus(self, o: Self) -> Self {
        Self {
            packets: self.packets + o.packets,
            bytes: self.bytes + o.bytes,
            new_flows: self.new_flows + o.new_flows,
        }
    }

    /// What was counted since `earlier` (zero where a counter went back: a member id reused).
    pub fn since(self, earlier: Self) -> Self {
        Self {
            packets: self.packets.saturating_sub(earlier.packets),
            bytes: self.bytes.saturating_sub(earlier.bytes),
            new_flows: self.new_flows.saturating_sub(earlier.new_flows),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_names_unique() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c:?} is out of place");
            for d in &Counter::ALL[..i] {
                assert_ne!(c.name(), d.name(), "two counters named {}", c.name());
            }
        }
        assert!(Counter::ALL.iter().filter(|c| c.is_verdict()).count() > 10);
    }

    #[test]
    fn derive_sums_the_verdicts_into_packets_and_takes_vip_packets_as_given() {
        let mut counts = [0u64; Counter::COUNT as usize];
        counts[Counter::Tx as usize] = 5;
        counts[Counter::PassNotForVip as usize] = 7;
        counts[Counter::FlowHits as usize] = 100; // an event: not a packet
        derive(&mut counts, 3);
        assert_eq!(counts[Counter::Packets as usize], 12);
        assert_eq!(counts[Counter::VipPackets as usize], 3);
        assert_eq!(counts[Counter::FlowHits as usize], 100);
    }
}
