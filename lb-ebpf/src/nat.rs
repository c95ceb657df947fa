//! NAT mode: DNAT + SNAT towards the backend, and the reverse translation of its replies.
//!
//! A client's packet to a NAT VIP leaves with the node's address and a NAT source port as its
//! source and the backend's address and port as its destination; the backend answers the node,
//! and the reply leaves with the VIP as its source and the client as its destination. Two LRU
//! maps hold each translation: `LB_NAT` by the client's flow, `LB_NAT_REV` by the reply's. A
//! reverse entry is what makes a NAT port taken, so ports are unique per backend address and
//! port. Checksums are updated incrementally (RFC 1624); an IPv4 UDP checksum of zero ("none")
//! stays zero. The reply path also sees how backends answer connection attempts, which feeds
//! passive health (`LB_MEMBER_PASSIVE`). ICMP errors about a translated packet are read for
//! passive health too, and translated back to its client ([`nat_icmp`]).

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd},
};

use aya_ebpf::{
    bindings::{BPF_EXIST, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_NOEXIST, xdp_action},
    helpers::bpf_ktime_get_coarse_ns,
    helpers::generated::{bpf_loop, bpf_map_lookup_elem, bpf_xdp_adjust_head},
    maps::PerCpuArray,
    programs::XdpContext,
};
use lb_common::{
    AffinityKey, Counter, FAMILY_V4, FlowKey, IPPROTO_TCP, IPPROTO_UDP, NAT_JOB_F_LEAST_CONN,
    NAT_JOB_FORWARD, NAT_JOB_ICMP, NAT_PORT_PROBES, NAT_S_ANSWERED, NAT_S_COUNTED, NAT_S_FAILED,
    NAT_S_FIN_BACKEND, NAT_S_FIN_CLIENT, NAT_S_HALF_OPEN, NAT_S_RST, NatFlow, NatReverse,
    NodeConfig, PassiveHealth, TrafficStats, VipAddr, csum, flow_hash, maps::PASSIVE_HOLD_MS,
    nat_port_candidate,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::parse::{
    ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_HDR_LEN, ICMPV6_DEST_UNREACH, ICMPV6_PKT_TOOBIG,
    IPPROTO_ICMP, IPPROTO_ICMPV6,
};
use crate::{
    LB_AFFINITY, LB_EVENTS, LB_FLOWS, LB_MEMBER_HOLD, LB_MEMBER_PASSIVE, LB_MEMBER_REPLY_STATS,
    LB_MEMBERS, LB_NAT, LB_NAT_HOLD, LB_NAT_JOB, LB_NAT_REV, LB_NODE, LB_VIP_REPLY_STATS,
    addr::{node_addr, same_addr},
    count, icmp,
    parse::{Icmp, Packet, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN, ptr_at},
    reply_route,
    route::{Hop, fib_params, lookup, next_hop, send},
    too_big,
    verdict::Verdict,
};

const TCP_CHECK_OFF: usize = 16;
const UDP_CHECK_OFF: usize = 6;

/// `bpf_map_update_elem` flags.
const NOEXIST: u64 = BPF_NOEXIST as u64;
const EXIST: u64 = BPF_EXIST as u64;

/// Upper bound of the L4 offset a job may carry (the verifier wants packet offsets bounded).
pub const MAX_L4_OFF: u16 = 0x0fff;

/// NAT mode's subprogram of `lb`: does the job `lb`'s first subprogram left in `LB_NAT_JOB`.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> Verdict {
    let unavailable = Verdict::new(Counter::DropNatUnavailable, xdp_action::XDP_DROP);
    let Some(job) = LB_NAT_JOB.get_ptr(0) else {
        return unavailable;
    };
    let job = unsafe { &*job };
    let Some(node) = LB_NODE.get(0) else {
        return unavailable;
    };
    let (l3_off, l4_off) = (job.l3_off, job.l4_off);
    if l4_off > MAX_L4_OFF || l3_off > l4_off || job.ip_len > 0xffff {
        return Verdict::new(Counter::DropMalformed, xdp_action::XDP_DROP);
    }
    match job.kind {
        NAT_JOB_ICMP => {
            let icmp = Icmp {
                dst: VipAddr {
                    addr: job.key.dst,
                    family: job.key.family,
                    _pad: [0; 3],
                },
                l3_off: l3_off as usize,
                ip_len: job.ip_len as usize,
                l4_off: l4_off as usize,
                tos: job.tos,
            };
            nat_icmp(ctx, &icmp, node)
        }
        kind => {
            let pkt = Packet {
                key: copy_key(&job.key),
                l3_off: l3_off as usize,
                ip_len: job.ip_len as usize,
                l4_off: l4_off as usize,
                tos: job.tos,
                syn: job.tcp_flags & TCP_FLAG_SYN != 0,
                tcp_flags: job.tcp_flags,
                counted: job.flags & NAT_JOB_F_LEAST_CONN != 0,
            };
            if kind == NAT_JOB_FORWARD {
                nat_forward(ctx, &pkt, job.vip_id, &job.member_id, node)
            } else {
                nat_reverse(ctx, &pkt, node)
            }
        }
    }
}

/// A copy of the job's flow key (at the start of the map value: 8-byte aligned) as five word
/// loads, where an assignment is a call to a byte-at-a-time `memmove` (volatile, so that LLVM
/// does not turn them back into one).
#[inline(always)]
pub fn copy_key(k: &FlowKey) -> FlowKey {
    let p = k as *const FlowKey as *const u64;
    let w = |i| unsafe { core::ptr::read_volatile(p.add(i)) };
    unsafe { core::mem::transmute::<[u64; 5], FlowKey>([w(0), w(1), w(2), w(3), w(4)]) }
}

#[inline(always)]
fn now() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Equality of flow keys without `bcmp`, which the BPF target lacks.
#[inline(always)]
fn same_flow(a: &FlowKey, b: &FlowKey) -> bool {
    let a: [u64; 5] = unsafe { core::mem::transmute(*a) };
    let b: [u64; 5] = unsafe { core::mem::transmute(*b) };
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4]
}

/// Whether `dst` is the node's NAT address of its family: only then can a packet be a reply.
#[inline(always)]
pub fn is_node_addr(node: &NodeConfig, dst: &[u8; 16], family: u8) -> bool {
    match node_addr(node, family) {
        Some(a) => same_addr(&a, dst),
        None => false,
    }
}

enum Signal {
    Answered,
    Refused,
    Unreachable,
    SynTimeout,
}

/// An atomic add (`lock xadd` in BPF): the BPF target has no `AtomicU64::fetch_add`.
#[inline(always)]
fn bump(p: *mut u64) {
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, 1) };
}

/// Records a passive health signal for `member_id`.
#[inline(always)]
fn signal(member_id: &u32, s: Signal) {
    let Some(p) = LB_MEMBER_PASSIVE.get_ptr_mut(*member_id) else {
        return;
    };
    let p: *mut PassiveHealth = p;
    unsafe {
        match s {
            Signal::Answered => {
                bump(&raw mut (*p).answered);
                if (*p).consecutive_failures != 0 {
                    (*p).consecutive_failures = 0;
                }
                return;
            }
            Signal::Refused => {
                count(Counter::NatRefused);
                bump(&raw mut (*p).refused);
            }
            Signal::Unreachable => {
                count(Counter::NatUnreachable);
                bump(&raw mut (*p).unreachable);
            }
            Signal::SynTimeout => {
                count(Counter::NatSynTimeouts);
                bump(&raw mut (*p).syn_timeouts);
            }
        }
        bump(&raw mut (*p).consecutive_failures);
        note_crossing(member_id, (*p).consecutive_failures);
    }
    // A failure wakes the agent (see `maps::EVENTS`), once the streak counts it; a full ring
    // just skips the wake-up.
    if let Some(mut e) = LB_EVENTS.reserve::<u32>(0) {
        e.write(*member_id);
        e.submit(0);
    }
}

/// Marks a connection attempt failed, once.
#[inline(always)]
fn fail(r: &mut NatReverse, s: Signal) {
    if r.state & (NAT_S_ANSWERED | NAT_S_FAILED) == 0 {
        r.state |= NAT_S_FAILED;
        signal(&r.member_id, s);
    }
}

/// A connection attempt the backend turned away (RST, ICMP unreachable) leaves no connection
/// to keep on it: forget the flow's member, and the client's affinity if it names that member,
/// so the client's next connection (a refused port is free for reuse at once) is balanced
/// afresh, away from a backend taken out.
#[inline(always)]
fn refused(r: &mut NatReverse, s: Signal) {
    if r.state & NAT_S_ANSWERED == 0 {
        fail(r, s);
        let client = r.client;
        if lb_common::flowtab::in_table(client.family) {
            crate::flows::remove(lb_common::flowtab::pack_key(&client, r.vip_id));
        } else {
            let _ = LB_FLOWS.remove(client);
        }
        let akey = AffinityKey {
            addr: client.src,
            vip_id: r.vip_id,
        };
        if let Some(a) = unsafe { LB_AFFINITY.get(akey) }
            && a.member_id == r.member_id
            && a.generation == r.generation
        {
            let _ = LB_AFFINITY.remove(akey);
        }
    }
}

#[inline(always)]
fn close(r: &mut NatReverse, bit: u16, t: u64) {
    let was = r.closed();
    r.state |= bit;
    if !was && r.closed() {
        r.last_ns = t;
        count(Counter::NatClosed);
        // A least-connections VIP's translation leaves its member's count, once.
        if r.state & NAT_S_COUNTED != 0 {
            crate::least_conn::add(&r.member_id, -1);
        }
    }
}

/// Keeps a live translation's `last_ns` within `refresh_ns` of the last packet, writing the
/// shared entry only when it is that stale rather than on every packet.
#[inline(always)]
fn touch(r: &mut NatReverse, proto: u8, t: u64, node: &NodeConfig) {
    if !r.closed() && t.saturating_sub(r.last_ns) > node.refresh_ns(proto) {
        r.last_ns = t;
    }
}

/// Records what a client's packet does to its translation. A half-open translation the backend
/// answered is established by the client's ACK (the handshake's third packet, or any later one:
/// an ACK without SYN or RST). Sequence numbers are not checked: a blind ACK from a spoofed
/// source makes the backend answer with an RST, which closes the translation.
#[inline(always)]
fn track_client(r: &mut NatReverse, pkt: &Packet, t: u64, node: &NodeConfig) {
    if pkt.key.proto == IPPROTO_TCP {
        let f = pkt.tcp_flags;
        let waiting = NAT_S_HALF_OPEN | NAT_S_ANSWERED;
        if r.state & waiting == waiting
            && f & (TCP_FLAG_ACK | TCP_FLAG_SYN | TCP_FLAG_RST) == TCP_FLAG_ACK
        {
            r.state &= !NAT_S_HALF_OPEN;
            count(Counter::NatEstablished);
        }
        if f & TCP_FLAG_RST != 0 {
            close(r, NAT_S_RST, t);
        } else if f & TCP_FLAG_FIN != 0 {
            close(r, NAT_S_FIN_CLIENT, t);
        } else if pkt.syn && t.saturating_sub(r.created_ns) > node.syn_timeout_ns {
            fail(r, Signal::SynTimeout);
        }
    }
    touch(r, pkt.key.proto, t, node);
}

/// Records what a backend's reply does to its translation (and to passive health).
#[inline(always)]
fn track_backend(r: &mut NatReverse, pkt: &Packet, t: u64, node: &NodeConfig) {
    let tcp = pkt.key.proto == IPPROTO_TCP;
    let f = pkt.tcp_flags;
    if tcp && f & TCP_FLAG_RST != 0 {
        refused(r, Signal::Refused);
        close(r, NAT_S_RST, t);
    } else {
        if r.state & NAT_S_ANSWERED == 0 {
            r.state |= NAT_S_ANSWERED;
            signal(&r.member_id, Signal::Answered);
        }
        if tcp && f & TCP_FLAG_FIN != 0 {
            close(r, NAT_S_FIN_BACKEND, t);
        }
    }
    touch(r, pkt.key.proto, t, node);
}

/// Whether `r` is the translation of the client flow `key` towards `member` (its id and
/// allocation) of VIP `vip_id`.
#[inline(always)]
fn belongs(r: &NatReverse, key: &FlowKey, member: (u32, u32), vip_id: u32) -> bool {
    same_flow(&r.client, key)
        && r.member_id == member.0
        && r.generation == member.1
        && r.vip_id == vip_id
}

/// The port of `pkt`'s live translation towards the backend in `rkey` (which gets the port),
/// found through its `LB_NAT` pointer and checked against the reverse entry, which is the
/// translation; the packet's effect on it is recorded. `None` if there is none to use: no
/// pointer, an entry over or taken by another flow since, or a SYN reopening a closed one.
#[inline(always)]
fn translation(
    pkt: &Packet,
    rkey: &mut FlowKey,
    vip_id: u32,
    member: (u32, u32),
    t: u64,
    node: &NodeConfig,
) -> Option<u16> {
    let key = &pkt.key;
    let f = unsafe { LB_NAT.get(key) }?;
    if f.member_id != member.0 || f.generation != member.1 || f.vip_id != vip_id {
        return None;
    }
    rkey.dst_port = f.nat_port;
    let r = unsafe { &mut *LB_NAT_REV.get_ptr_mut(*rkey)? };
    let reopened = key.proto == IPPROTO_TCP && pkt.syn && r.closed();
    if reopened || !belongs(r, key, member, vip_id) || r.expired(key.proto, t, node) {
        return None;
    }
    track_client(r, pkt, t, node);
    Some(f.nat_port)
}

/// Swaps `*p` from `old` to `new` if it still holds `old` (`lock cmpxchg`): of CPUs that judged
/// an entry by the same `old`, exactly one wins.
#[inline(always)]
fn claim(p: *mut u64, old: u64, new: u64) -> bool {
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new).1
    }
}

/// A port search in progress: the context of the `bpf_loop` callback [`probe`], on the
/// caller's stack.
struct Search {
    /// The reply key of the candidate port (`dst_port`).
    rkey: FlowKey,
    /// The translation to write: client flow, ids, times.
    rev: NatReverse,
    hash: u32,
    /// The packet is a TCP SYN (it may reopen a closed translation of its own).
    syn: bool,
    /// Set when a port is taken: `new` if it holds a new translation, not the flow's own found
    /// again.
    found: bool,
    new: bool,
    /// The oldest live half-open translation among the candidates probed: its port (network
    /// byte order; 0: none seen) and when it was made ([`ms`]). Taken over if no port is free.
    victim_port: u16,
    victim_created: u32,
    /// How many of the candidates probed were other flows' live half-open translations.
    half_open_seen: u8,
}

/// Candidates probed before the oldest half-open one among them is taken over, if none was
/// free and either most of them were half-open ([`RECLAIM_FLOOD_SEEN`]: ports held by
/// handshakes nobody completes, a flood) or that one is older than [`RECLAIM_EARLY_AGE_MS`]:
/// a flood that fills every port costs each of its SYNs this many probes, not
/// [`NAT_PORT_PROBES`]. Otherwise the search goes on (a free port further on is better than a
/// handshake cut short) and the oldest half-open candidate of all is taken over only if none was
/// free.
const RECLAIM_AFTER: u64 = 8;
/// Half-open candidates among the first [`RECLAIM_AFTER`] that make the shortage a flood's.
const RECLAIM_FLOOD_SEEN: u8 = 6;
/// A real handshake completes within a round trip: a translation half-open for longer than
/// this is most likely a spoofed source's or a dead client's.
const RECLAIM_EARLY_AGE_MS: u32 = 1_000;

/// A time in milliseconds, as 32 bits (they wrap every 49 days): what the port search keeps
/// of its victim's creation, to spare the stack of the NAT subprogram (which has none to spare).
#[inline(always)]
fn ms(ns: u64) -> u32 {
    (ns / 1_000_000) as u32
}

/// Whether the search may stop at candidate `i` (a busy one) to take over its victim after the
/// loop.
#[inline(always)]
fn reclaim_now(s: &Search, i: u64) -> bool {
    s.victim_port != 0
        && i + 1 >= RECLAIM_AFTER
        && (s.half_open_seen >= RECLAIM_FLOOD_SEEN
            || ms(s.rev.created_ns).wrapping_sub(s.victim_created) > RECLAIM_EARLY_AGE_MS)
}

/// What probing one candidate port gave.
enum Probe {
    /// The port is free, or its translation over: it is ours now.
    Taken,
    /// It holds this flow's own live translation.
    Own,
    /// Another flow's live translation (or another CPU won it first).
    Busy,
    /// Another flow's live half-open translation, made at this time: taken over if ports run
    /// short ([`reclaim`]).
    HalfOpen(u64),
}

/// Tries to take the port in `s.rkey` for `s.rev`.
// Keys and values by reference: they stay where they are on the caller's stack instead of being
// copied onto the callback's (the program's frames share 512 bytes).
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
fn try_port(s: &Search, node: &NodeConfig) -> Probe {
    let (key, t, proto) = (&s.rev.client, s.rev.created_ns, s.rkey.proto);
    let Some(r) = LB_NAT_REV.get_ptr_mut(&s.rkey) else {
        // Free: BPF_NOEXIST, so of CPUs racing for it one inserts and the others fail.
        if LB_NAT_REV.insert(&s.rkey, &s.rev, NOEXIST).is_ok() {
            return Probe::Taken;
        }
        // Perhaps this very flow on another CPU, just now.
        return match unsafe { LB_NAT_REV.get(&s.rkey) } {
            Some(r) if belongs(r, key, (s.rev.member_id, s.rev.generation), s.rev.vip_id) => {
                Probe::Own
            }
            _ => Probe::Busy,
        };
    };
    let r = unsafe { &mut *r };
    let last = unsafe { core::ptr::read_volatile(&r.last_ns) };
    let expired = r.expired_at(last, proto, t, node);
    let own = belongs(r, key, (s.rev.member_id, s.rev.generation), s.rev.vip_id);
    let reopen = own && s.syn && r.closed();
    if own && !expired && !reopen {
        return Probe::Own;
    }
    if !(expired || reopen) {
        return if r.half_open() && !r.closed() {
            Probe::HalfOpen(r.created_ns)
        } else {
            Probe::Busy
        };
    }
    if r.half_open_over(t, node) {
        count(Counter::NatHalfOpenExpired);
    }
    take(s, &raw mut r.last_ns, last)
}

/// Takes over the entry at `s.rkey`, whose `last_ns` (at `p`) was `last` when it was judged
/// over: whoever swaps `last_ns` from that value takes the port; everyone else sees it fresh and
/// moves on. The winner replaces the entry in one update (readers see the old one or the new
/// one).
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
fn take(s: &Search, p: *mut u64, last: u64) -> Probe {
    if !claim(p, last, s.rev.created_ns) {
        return Probe::Busy;
    }
    if LB_NAT_REV.insert(&s.rkey, &s.rev, EXIST).is_ok()
        || LB_NAT_REV.insert(&s.rkey, &s.rev, NOEXIST).is_ok()
    {
        Probe::Taken
    } else {
        Probe::Busy
    }
}

/// `bpf_loop` callback: probes candidate `i`; returns 1 (stop) once a port is taken.
extern "C" fn probe(i: u64, ctx: *mut c_void) -> i64 {
    let s = unsafe { &mut *(ctx as *mut Search) };
    let Some(node) = LB_NODE.get(0) else {
        return 1;
    };
    let port = nat_port_candidate(s.hash, i as u32, node.nat_port_min, node.nat_port_max);
    s.rkey.dst_port = port.to_be();
    match try_port(s, node) {
        Probe::Taken => {
            (s.found, s.new) = (true, true);
            1
        }
        Probe::Own => {
            s.found = true;
            1
        }
        Probe::HalfOpen(created) => {
            count(Counter::NatPortCollisions);
            s.half_open_seen += 1;
            // Older: made further back from now (the times wrap every 49 days).
            let now = ms(s.rev.created_ns);
            let created = ms(created);
            if s.victim_port == 0 || now.wrapping_sub(created) > now.wrapping_sub(s.victim_created)
            {
                (s.victim_port, s.victim_created) = (s.rkey.dst_port, created);
            }
            reclaim_now(s, i) as i64
        }
        Probe::Busy => {
            count(Counter::NatPortCollisions);
            reclaim_now(s, i) as i64
        }
    }
}

/// No candidate was free: takes over the oldest half-open translation seen, if it is still
/// the one seen (half-open, made at the time seen, not closed meanwhile).
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
fn reclaim(s: &mut Search) {
    s.rkey.dst_port = s.victim_port;
    let Some(r) = LB_NAT_REV.get_ptr_mut(&s.rkey) else {
        return;
    };
    let r = unsafe { &mut *r };
    let last = unsafe { core::ptr::read_volatile(&r.last_ns) };
    if !r.half_open() || r.closed() || ms(r.created_ns) != s.victim_created {
        return;
    }
    if let Probe::Taken = take(s, &raw mut r.last_ns, last) {
        count(Counter::NatHalfOpenReclaimed);
        (s.found, s.new) = (true, true);
    }
}

/// Finds `pkt`'s flow a NAT source port towards the backend in `rkey`: a new translation, or
/// its own found again (its `LB_NAT` pointer was lost or is stale). Points `LB_NAT` at it.
/// Returns the port and whether the translation is new.
#[inline(always)]
fn allocate(
    pkt: &Packet,
    rkey: &FlowKey,
    vip_id: u32,
    (member_id, generation): (u32, u32),
    t: u64,
) -> Option<(u16, bool)> {
    let key = &pkt.key;
    let mut s = Search {
        rkey: *rkey,
        rev: NatReverse {
            client: *key,
            member_id,
            vip_id,
            // Every TCP translation starts half-open, whatever packet made it.
            state: if key.proto == IPPROTO_TCP {
                NAT_S_HALF_OPEN
            } else {
                0
            } | if pkt.counted { NAT_S_COUNTED } else { 0 },
            _pad: 0,
            generation,
            created_ns: t,
            last_ns: t,
        },
        hash: flow_hash(key),
        syn: key.proto == IPPROTO_TCP && pkt.syn,
        found: false,
        new: false,
        victim_port: 0,
        victim_created: 0,
        half_open_seen: 0,
    };
    unsafe {
        bpf_loop(
            NAT_PORT_PROBES,
            probe as *mut c_void,
            &raw mut s as *mut c_void,
            0,
        )
    };
    if !s.found && s.victim_port != 0 {
        reclaim(&mut s);
    }
    if !s.found {
        return None;
    }
    // A least-connections VIP's new translation counts for its member until it closes.
    if s.new && pkt.counted {
        crate::least_conn::add(&s.rev.member_id, 1);
    }
    let flow = NatFlow {
        member_id,
        vip_id,
        nat_port: s.rkey.dst_port,
        _pad: 0,
        generation,
    };
    if LB_NAT.insert(key, flow, 0).is_err() {
        count(Counter::NatInsertFailed);
    }
    Some((s.rkey.dst_port, s.new))
}

/// Translates a client's packet to a NAT VIP towards `backend` and forwards it.
#[inline(always)]
fn nat_forward(
    ctx: &XdpContext,
    pkt: &Packet,
    vip_id: u32,
    member_id: &u32,
    node: &NodeConfig,
) -> Verdict {
    let key = &pkt.key;
    let Some(backend) = LB_MEMBERS.get(*member_id) else {
        return Verdict::new(Counter::DropNoBackend, xdp_action::XDP_DROP);
    };
    let Some(src) = node_addr(node, key.family) else {
        return Verdict::new(Counter::DropNoSourceAddress, xdp_action::XDP_DROP);
    };
    if backend.family != key.family {
        // The agent refuses such configs: NAT does not translate between families.
        return Verdict::new(Counter::DropNoBackend, xdp_action::XDP_DROP);
    }
    let bport = if backend.port != 0 {
        backend.port
    } else {
        key.dst_port
    };
    let mut rkey = FlowKey {
        src: backend.addr,
        dst: src,
        src_port: bport,
        dst_port: 0,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    };
    let t = now();
    let member = (*member_id, backend.generation);
    let port = match translation(pkt, &mut rkey, vip_id, member, t, node) {
        Some(p) => p,
        None if held() => return Verdict::new(Counter::DropNatHeld, xdp_action::XDP_DROP),
        None if pkt.syn && failing(member_id, t) => {
            return Verdict::new(Counter::DropBackendFailing, xdp_action::XDP_DROP);
        }
        None => match allocate(pkt, &rkey, vip_id, member, t) {
            Some((p, true)) => {
                count(Counter::NatNew);
                p
            }
            // Its own translation, found by probing: record this packet's effect on it.
            Some((p, false)) => {
                let _ = translation(pkt, &mut rkey, vip_id, member, t, node);
                p
            }
            None => return Verdict::new(Counter::DropNatPortsExhausted, xdp_action::XDP_DROP),
        },
    };
    count(Counter::NatForward);
    let to = Via::Member(*member_id, backend.generation);
    rewrite_and_route(ctx, pkt, &src, &backend.addr, ports(port, bport), to, node)
}

/// Whether a migration holds new translations back (see `maps::NAT_HOLD`).
#[inline(always)]
fn held() -> bool {
    LB_NAT_HOLD.get(0).is_some_and(|h| *h != 0)
}

/// Translates a reply from a backend back towards its client, if `pkt` is one; passes it
/// untouched (`pass_not_for_vip`) if not. One lookup: the reverse entry is the translation.
#[inline(always)]
fn nat_reverse(ctx: &XdpContext, pkt: &Packet, node: &NodeConfig) -> Verdict {
    let key = &pkt.key;
    let not_ours = Verdict::new(Counter::PassNotForVip, xdp_action::XDP_PASS);
    let Some(r) = LB_NAT_REV.get_ptr_mut(key) else {
        return not_ours;
    };
    let r = unsafe { &mut *r };
    let t = now();
    if r.expired(key.proto, t, node) {
        count(Counter::NatReverseStale);
        return not_ours;
    }
    track_backend(r, pkt, t, node);
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    count_reply(&LB_VIP_REPLY_STATS, &r.vip_id, bytes);
    count_reply(&LB_MEMBER_REPLY_STATS, &r.member_id, bytes);
    let client = r.client;
    count(Counter::NatReverse);
    rewrite_and_route(
        ctx,
        pkt,
        &client.dst,
        &client.src,
        ports(client.dst_port, client.src_port),
        Via::Reply(t),
        node,
    )
}

/// The entry at `index` of the array `map` (this CPU's, for a per-CPU one), or null. `index` is
/// read where it is (in a map value or the job: a key need not be on the stack), not copied
/// into NAT's full stack frame.
#[inline(always)]
pub fn entry_at<M, V>(map: &M, index: &u32) -> *mut V {
    let map = map as *const M as *mut c_void;
    let key = index as *const u32 as *const c_void;
    // SAFETY: `map` is a map definition (aya's array types are transparent over it) and `key`
    // points at 4 readable bytes; the helper returns the entry or null.
    (unsafe { bpf_map_lookup_elem(map, key) }) as *mut V
}

/// When a member's failure streak reaches its passive-health threshold (the agent's half of
/// `maps::MEMBER_HOLD`), records the time in the program's half: new connections to it are then
/// held back for a moment ([`failing`]).
#[inline(always)]
fn note_crossing(member: &u32, streak: u64) {
    let h: *mut u64 = entry_at(&LB_MEMBER_HOLD, member);
    if h.is_null() {
        return;
    }
    let limit = unsafe { *h } as u32;
    if limit != 0 && streak == limit as u64 {
        let at = ms(now()).max(1);
        unsafe { *h = limit as u64 | (at as u64) << 32 };
    }
}

/// Whether a new connection to `member` is held back (its SYN dropped, so that the client's
/// retransmission a second later finds the member out of the table): its failure streak
/// reached the threshold less than [`PASSIVE_HOLD_MS`] ago, time for the agent to take it out.
/// Bounded, so that without an agent a failing backend refuses again rather than black-holes.
#[inline(always)]
fn failing(member: &u32, t: u64) -> bool {
    let h: *mut u64 = entry_at(&LB_MEMBER_HOLD, member);
    if h.is_null() {
        return false;
    }
    let h = unsafe { *h };
    let (limit, at) = (h as u32, (h >> 32) as u32);
    // Most members have no threshold, or never reached it: one lookup, not two.
    if limit == 0 || at == 0 || ms(t).wrapping_sub(at) >= PASSIVE_HOLD_MS {
        return false;
    }
    let p: *mut PassiveHealth = entry_at(&LB_MEMBER_PASSIVE, member);
    !p.is_null() && unsafe { (*p).consecutive_failures } >= limit as u64
}

/// Counts a reply of `bytes` in `map` at `index`, a field of the translation.
#[inline(always)]
fn count_reply(map: &PerCpuArray<TrafficStats>, index: &u32, bytes: u64) {
    let s: *mut TrafficStats = entry_at(map, index);
    if !s.is_null() {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
        }
    }
}

/// What an ICMP error to the node says about a translated packet.
enum IcmpError {
    /// Destination unreachable: the backend (or the way to it) turned the attempt away.
    Unreachable,
    /// IPv4 fragmentation needed (type 3 code 4) or ICMPv6 packet too big: the path's MTU is
    /// smaller than the packet. Nothing wrong with the backend.
    FragNeeded,
    /// Time exceeded: nothing about the backend either.
    TimeExceeded,
}

/// The kind of an ICMP (`v4`) or ICMPv6 error (one [`icmp::quote`] reads) from its type and
/// code.
#[inline(always)]
fn icmp_error(v4: bool, ty: u8, code: u8) -> IcmpError {
    match (v4, ty, code) {
        (true, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED) | (false, ICMPV6_PKT_TOOBIG, _) => {
            IcmpError::FragNeeded
        }
        (true, ICMP_DEST_UNREACH, _) | (false, ICMPV6_DEST_UNREACH, _) => IcmpError::Unreachable,
        _ => IcmpError::TimeExceeded,
    }
}

/// Reads an ICMP error sent to the node about a translated packet (RFC 5508 section 4): where
/// the translation is live, destination unreachable counts against the backend if it answers a
/// connection attempt, fragmentation needed / packet too big is counted on its own
/// (`nat_frag_needed`), and the error is translated back and sent to the client
/// ([`icmp_back`]). Anything else passes to the kernel untouched.
#[inline(always)]
fn nat_icmp(ctx: &XdpContext, icmp: &Icmp, node: &NodeConfig) -> Verdict {
    let pass = Verdict::new(Counter::PassNotForVip, xdp_action::XDP_PASS);
    let v4 = icmp.dst.family == FAMILY_V4;
    let end = icmp.l3_off + icmp.ip_len;
    // The quoted packet went node -> backend; `rkey` becomes its reply's key.
    let mut rkey = FlowKey::default();
    let Some((ty, code, quoted_l4)) = icmp::quote(ctx, v4, icmp.l4_off, end, &mut rkey) else {
        return pass;
    };
    // By reference: a copy of the key would take stack the NAT subprogram does not have to spare.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let Some(r) = LB_NAT_REV.get_ptr_mut(&rkey) else {
        return pass;
    };
    let r = unsafe { &mut *r };
    if r.expired(rkey.proto, now(), node) {
        return pass;
    }
    match icmp_error(v4, ty, code) {
        IcmpError::FragNeeded => count(Counter::NatFragNeeded),
        IcmpError::Unreachable => refused(r, Signal::Unreachable),
        IcmpError::TimeExceeded => {}
    }
    let client = r.client;
    icmp_back(ctx, icmp, quoted_l4, &client)
}

/// Translates the ICMP error `icmp` about a packet of `client`'s flow back for the client and
/// routes it there: the outer header goes VIP -> client (TTL / hop limit one less), the quote
/// becomes the packet as the client sent it (client -> VIP: addresses, ports, the quoted IPv4
/// header checksum and the quoted TCP / UDP checksum if quoted), the ICMP checksum follows; the
/// rest (a next-hop MTU included) stays as the router wrote it.
#[inline(always)]
fn icmp_back(ctx: &XdpContext, icmp: &Icmp, quoted_l4: usize, client: &FlowKey) -> Verdict {
    let bad = Verdict::new(Counter::DropMalformed, xdp_action::XDP_DROP);
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return bad;
    };
    let (rx_dst, rx_src) = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    let v4 = client.family == FAMILY_V4;
    let (vip, to) = (&client.dst, &client.src);
    let ingress = ctx.ingress_ifindex() as u32;
    let proto = if v4 { IPPROTO_ICMP } else { IPPROTO_ICMPV6 };
    let mut fib = fib_params(ingress, v4, vip, to, icmp.tos, proto, icmp.ip_len as u16);
    let rc = lookup(ctx, &mut fib);
    // The TTL (IPv4, bytes 8-9 with the protocol) or the hop limit (IPv6, 6-7 with next header).
    let Some(ttl) = ptr_at::<[u8; 2]>(ctx, icmp.l3_off + if v4 { 8 } else { 6 }) else {
        return bad;
    };
    if unsafe { (*ttl)[if v4 { 0 } else { 1 }] } <= 1 {
        return Verdict::new(Counter::PassTtlExceeded, xdp_action::XDP_PASS);
    }
    let end = icmp.l3_off + icmp.ip_len;
    let inner = icmp.l4_off + ICMP_HDR_LEN;
    let Some(mut acc) = untranslate_quote(ctx, inner, quoted_l4, end, client) else {
        return bad;
    };
    if v4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, icmp.l3_off) else {
            return bad;
        };
        let ip = unsafe { &mut *ip };
        let s = [vip[0], vip[1], vip[2], vip[3]];
        let d = [to[0], to[1], to[2], to[3]];
        let addrs = diff(&ip.dst_addr, &d, diff(&ip.src_addr, &s, 0));
        ip.check = csum::ipv4_check(ip.check, addrs, ip.ttl, ip.proto);
        ip.ttl -= 1;
        ip.src_addr = s;
        ip.dst_addr = d;
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, icmp.l3_off) else {
            return bad;
        };
        let ip = unsafe { &mut *ip };
        // ICMPv6 sums a pseudo-header with the addresses (RFC 4443 2.3).
        acc = diff(&ip.dst_addr, to, diff(&ip.src_addr, vip, acc));
        ip.hop_limit -= 1;
        ip.src_addr = *vip;
        ip.dst_addr = *to;
    }
    let Some(c) = ptr_at::<[u8; 2]>(ctx, icmp.l4_off + 2) else {
        return bad;
    };
    unsafe { *c = csum::updated(*c, acc) };
    count(Counter::NatIcmpReverse);
    if !untag(ctx, icmp.l3_off, rx_dst, rx_src) {
        return bad;
    }
    send(ctx, &Hop::of_fib(&fib, rc), ingress, rx_dst, rx_src)
}

/// A checksum field as four bytes, for [`diff`].
#[inline(always)]
fn word(c: [u8; 2]) -> [u8; 4] {
    [c[0], c[1], 0, 0]
}

/// Turns the quoted packet at `inner` (TCP or UDP header at `l4`, quote ending at `end`) back
/// into the packet of `client`'s flow as the client sent it. Returns the sum of the changes,
/// for the ICMP checksum.
#[inline(always)]
fn untranslate_quote(
    ctx: &XdpContext,
    inner: usize,
    l4: usize,
    end: usize,
    client: &FlowKey,
) -> Option<u32> {
    let v4 = client.family == FAMILY_V4;
    // `addrs`: the change to the quoted packet's pseudo-header; `acc`: to the ICMP payload.
    let (addrs, mut acc);
    if v4 {
        let ip = unsafe { &mut *ptr_at::<Ipv4Hdr>(ctx, inner)? };
        let s = [client.src[0], client.src[1], client.src[2], client.src[3]];
        let d = [client.dst[0], client.dst[1], client.dst[2], client.dst[3]];
        addrs = diff(&ip.dst_addr, &d, diff(&ip.src_addr, &s, 0));
        let old = ip.check;
        ip.check = csum::updated(old, addrs);
        acc = diff(&word(old), &word(ip.check), addrs);
        ip.src_addr = s;
        ip.dst_addr = d;
    } else {
        let ip = unsafe { &mut *ptr_at::<Ipv6Hdr>(ctx, inner)? };
        addrs = diff(
            &ip.dst_addr,
            &client.dst,
            diff(&ip.src_addr, &client.src, 0),
        );
        acc = addrs;
        ip.src_addr = client.src;
        ip.dst_addr = client.dst;
    }
    let p = ptr_at::<[u8; 4]>(ctx, l4)?;
    let new_ports = ports(client.src_port, client.dst_port);
    let l4_change = diff(p, &new_ports, addrs);
    acc = diff(p, &new_ports, acc);
    unsafe { *p = new_ports };
    let udp = client.proto == IPPROTO_UDP;
    let off = l4 + if udp { UDP_CHECK_OFF } else { TCP_CHECK_OFF };
    // A router may quote only 8 bytes of TCP (RFC 792): then there is no checksum to fix.
    if off + 2 <= end {
        let c = unsafe { &mut *ptr_at::<[u8; 2]>(ctx, off)? };
        let old = *c;
        // An IPv4 UDP checksum of zero (none) stays zero; a computed zero is all ones.
        if !(v4 && udp && old == [0, 0]) {
            let v = csum::updated(old, l4_change);
            *c = if udp && v == [0, 0] { [0xff, 0xff] } else { v };
            acc = diff(&word(old), &word(*c), acc);
        }
    }
    Some(acc)
}

/// Drops the VLAN tag, if any (the IP header is at `l3_off`), keeping the MAC addresses.
#[inline(always)]
fn untag(ctx: &XdpContext, l3_off: usize, rx_dst: [u8; 6], rx_src: [u8; 6]) -> bool {
    if l3_off == EthHdr::LEN {
        return true;
    }
    // The inner EtherType ends up right behind the MAC addresses.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, (l3_off - EthHdr::LEN) as i32) } != 0 {
        return false;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    unsafe {
        (*eth).dst_addr = rx_dst;
        (*eth).src_addr = rx_src;
    }
    true
}

/// The one's-complement change from `old` to `new` (`N` 4 or 16), added to `seed` (RFC 1624,
/// eqn. 3), a 32-bit word at a time ([`diff4`]). Sums are in load order (little-endian words),
/// as are the checksums they update.
#[inline(always)]
fn diff<const N: usize>(old: *const [u8; N], new: *const [u8; N], seed: u32) -> u32 {
    const { assert!(N == 4 || N == 16) };
    let (o, n) = (old as *const [u8; 4], new as *const [u8; 4]);
    let mut acc = diff4(o, n, seed);
    if N == 16 {
        acc = diff4(o.wrapping_add(1), n.wrapping_add(1), acc);
        acc = diff4(o.wrapping_add(2), n.wrapping_add(2), acc);
        acc = diff4(o.wrapping_add(3), n.wrapping_add(3), acc);
    }
    acc
}

/// [`csum::diff`] of one word, in a subprogram of its own: two additions where
/// `bpf_csum_diff` is a helper call that sums memory, and no stack (inlined, the arithmetic
/// would spill the NAT subprogram past its 512 bytes).
#[inline(never)]
fn diff4(old: *const [u8; 4], new: *const [u8; 4], seed: u32) -> u32 {
    unsafe { csum::diff(*old, *new, seed) }
}

/// Where a translated packet goes next.
enum Via {
    /// A backend: the next hop of this member (id, generation).
    Member(u32, u32),
    /// A client (a reply, at this time): the route lookup, remembered for a while
    /// ([`reply_route`]).
    Reply(u64),
}

/// Source and destination port (network byte order) as the four bytes of an L4 header.
#[inline(always)]
fn ports(src: u16, dst: u16) -> [u8; 4] {
    let (s, d) = (src.to_ne_bytes(), dst.to_ne_bytes());
    [s[0], s[1], d[0], d[1]]
}

/// Rewrites the source address to `new_src`, the destination to `new_dst` and the ports to
/// `new_ports`, takes one off the TTL / hop limit, drops any VLAN tag and routes the result
/// [`Via`] its next hop.
#[inline(always)]
fn rewrite_and_route(
    ctx: &XdpContext,
    pkt: &Packet,
    new_src: &[u8; 16],
    new_dst: &[u8; 16],
    new_ports: [u8; 4],
    via: Via,
    node: &NodeConfig,
) -> Verdict {
    let bad = Verdict::new(Counter::DropMalformed, xdp_action::XDP_DROP);
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return bad;
    };
    let (rx_dst, rx_src) = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    let v4 = pkt.key.family == FAMILY_V4;
    // Route first, while the frame is still the packet as sent: if it would not fit the egress
    // MTU, its sender is told (quoting it) instead.
    let ingress = ctx.ingress_ifindex() as u32;
    let route = || {
        let mut fib = fib_params(
            ingress,
            v4,
            new_src,
            new_dst,
            pkt.tos,
            pkt.key.proto,
            pkt.ip_len as u16,
        );
        let rc = lookup(ctx, &mut fib);
        Hop::of_fib(&fib, rc)
    };
    let hop = match via {
        Via::Member(id, generation) => next_hop(id, generation, pkt.ip_len as u32, node, route),
        Via::Reply(now) => {
            reply_route::hop(new_dst, v4, ingress, pkt.tos, pkt.ip_len as u32, now, route)
        }
    };
    let too_big = hop.rc == BPF_FIB_LKUP_RET_FRAG_NEEDED;
    // Changes to the pseudo-header (addresses), shared by the IP and L4 checksums.
    let addrs;
    if v4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, pkt.l3_off) else {
            return bad;
        };
        let ip = unsafe { &mut *ip };
        if ip.ttl <= 1 {
            return Verdict::new(Counter::PassTtlExceeded, xdp_action::XDP_PASS);
        }
        if too_big {
            return too_big::hand_over(ctx, pkt, hop.mtu);
        }
        let s = [new_src[0], new_src[1], new_src[2], new_src[3]];
        let d = [new_dst[0], new_dst[1], new_dst[2], new_dst[3]];
        addrs = diff(&ip.dst_addr, &d, diff(&ip.src_addr, &s, 0));
        ip.check = csum::ipv4_check(ip.check, addrs, ip.ttl, ip.proto);
        ip.ttl -= 1;
        ip.src_addr = s;
        ip.dst_addr = d;
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, pkt.l3_off) else {
            return bad;
        };
        let ip = unsafe { &mut *ip };
        if ip.hop_limit <= 1 {
            return Verdict::new(Counter::PassTtlExceeded, xdp_action::XDP_PASS);
        }
        if too_big {
            return too_big::hand_over(ctx, pkt, hop.mtu);
        }
        addrs = diff(&ip.dst_addr, new_dst, diff(&ip.src_addr, new_src, 0));
        ip.hop_limit -= 1;
        ip.src_addr = *new_src;
        ip.dst_addr = *new_dst;
    }

    if rewrite_ports(ctx, pkt, new_ports, addrs, v4).is_none()
        || !untag(ctx, pkt.l3_off, rx_dst, rx_src)
    {
        return bad;
    }
    send(ctx, &hop, ingress, rx_dst, rx_src)
}

/// Rewrites the ports to `new_ports` and updates the L4 checksum by them and by `addrs` (the
/// pseudo-header's change). None: the header is not in the frame.
#[inline(always)]
fn rewrite_ports(
    ctx: &XdpContext,
    pkt: &Packet,
    new_ports: [u8; 4],
    addrs: u32,
    v4: bool,
) -> Option<()> {
    let ports = ptr_at::<[u8; 4]>(ctx, pkt.l4_off)?;
    let acc = diff(ports, &new_ports, addrs);
    unsafe { *ports = new_ports };
    if pkt.key.proto == IPPROTO_TCP {
        let c = ptr_at::<[u8; 2]>(ctx, pkt.l4_off + TCP_CHECK_OFF)?;
        unsafe { *c = csum::updated(*c, acc) };
    } else {
        let c = unsafe { &mut *ptr_at::<[u8; 2]>(ctx, pkt.l4_off + UDP_CHECK_OFF)? };
        // IPv4 UDP may go without a checksum (zero) and stays so; a computed zero is sent as
        // all ones (RFC 768).
        if !(v4 && *c == [0, 0]) {
            let v = csum::updated(*c, acc);
            *c = if v == [0, 0] { [0xff, 0xff] } else { v };
        }
    }
    Some(())
}
