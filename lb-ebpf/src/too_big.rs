//! ICMP too big, answered from XDP: when a packet would not fit the egress MTU once encapsulated
//! (DSR) or translated (NAT), its sender gets an ICMPv4 fragmentation needed (RFC 792, 1191) or
//! an ICMPv6 packet too big (RFC 4443) in its place, so that it lowers its path MTU instead of
//! retransmitting into a black hole.
//!
//! `lb` (DSR and NAT) finds out (with the route lookup, before they change the frame) and hand the
//! packet over to `lb_too_big` with a tail call, which gives it a stack of its own.
//! The frame is turned into the reply where it lies: the tail is trimmed to the part of the
//! packet to quote, an IP and an ICMP header are put in front of it, and the result is routed
//! towards the sender like any packet ([`route`]), so it leaves the way the kernel would send it.
//! The reply comes from the packet's destination (the VIP) and quotes as much of the packet as the
//! RFCs ask: 576 bytes in all for IPv4 (RFC 1812 4.3.2.3), 1280 for IPv6 (RFC 4443 2.4(c)).
//!
//! Not answered (just dropped): IPv4 without DF (a router fragments those, which XDP can't, and
//! must not answer them, RFC 1191), ICMP itself (no errors about errors), and anything over this
//! CPU's rate limit.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{
        bpf_csum_diff, bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    programs::XdpContext,
};
use lb_common::{
    Counter, FAMILY_V4, TooBigJob,
    maps::{ICMP_TOO_BIG_BURST, ICMP_TOO_BIG_RATE, TOO_BIG_PROG_INDEX},
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::parse::{
    ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_HDR_LEN, ICMPV6_PKT_TOOBIG, IPPROTO_ICMP,
    IPPROTO_ICMPV6,
};
use crate::{
    LB_ICMP_BUCKET, LB_PROGS, LB_TOO_BIG_JOB, count,
    ipv4::{IPV4_DF, ipv4_checksum},
    parse::{ETH_P_IP, ETH_P_IPV6, Packet, ptr_at},
    route::{fib_params, route},
    verdict::Verdict,
};

/// Largest ICMPv4 error (RFC 1812 4.3.2.3) and ICMPv6 error (RFC 4443 2.4(c)), IP header included.
const V4_MAX: usize = 576;
const V6_MAX: usize = 1280;
/// DSCP CS6, network control: what routers mark their ICMP with (RFC 4594 3.2).
const TOS_NETWORK_CONTROL: u8 = 0xc0;
const HOP_LIMIT: u8 = 64;
/// Upper bound of the IP header offset a job may carry (the verifier wants offsets bounded).
const MAX_L3_OFF: u32 = 0x0fff;
const NS_PER_TOKEN: u64 = 1_000_000_000 / ICMP_TOO_BIG_RATE;
/// The quote is summed in chunks of this many bytes (`bpf_csum_diff` takes at most 512), then
/// in words: enough chunks for the largest quote.
const CHUNK: usize = 64;
const MAX_CHUNKS: usize = (V6_MAX - Ipv6Hdr::LEN) / CHUNK + 1;

/// Hands `pkt`, which does not fit a route whose MTU leaves `mtu` bytes for it, to
/// `lb_too_big`; returns only if that program is not installed (then the packet is dropped).
#[inline(always)]
pub fn hand_over(ctx: &XdpContext, pkt: &Packet, mtu: u32) -> Verdict {
    if let Some(j) = LB_TOO_BIG_JOB.get_ptr_mut(0) {
        unsafe {
            *j = TooBigJob {
                key: pkt.key,
                l3_off: pkt.l3_off as u32,
                ip_len: pkt.ip_len as u32,
                mtu,
                _pad: 0,
            };
            LB_PROGS.tail_call(ctx, TOO_BIG_PROG_INDEX);
        }
    }
    Verdict::new(Counter::DropTooBig, xdp_action::XDP_DROP)
}

/// `lb_too_big`: answers the packet described in `LB_TOO_BIG_JOB` with an ICMP too big to its
/// sender. The packet itself is not forwarded (`drop_too_big`, with the reply's action, or
/// `XDP_DROP` when there is no reply).
#[inline(always)]
pub fn run(ctx: &XdpContext) -> Verdict {
    let dropped = Verdict::new(Counter::DropTooBig, xdp_action::XDP_DROP);
    let Some(job) = LB_TOO_BIG_JOB.get_ptr(0) else {
        return dropped;
    };
    let job = unsafe { &*job };
    if job.l3_off > MAX_L3_OFF || job.ip_len > 0xffff {
        return dropped;
    }
    let (key, l3_off, ip_len) = (&job.key, job.l3_off as usize, job.ip_len as usize);
    let v4 = key.family == FAMILY_V4;
    if !answerable(ctx, l3_off, v4) {
        return dropped;
    }
    if !take_token(unsafe { bpf_ktime_get_ns() }) {
        count(Counter::IcmpTooBigRateLimited);
        return dropped;
    }
    let ingress = ctx.ingress_ifindex() as u32;
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return dropped;
    };
    let (rx_dst, rx_src) = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    let (ip_hdr, max) = if v4 {
        (Ipv4Hdr::LEN, V4_MAX)
    } else {
        (Ipv6Hdr::LEN, V6_MAX)
    };
    let quote = ip_len.min(max - ip_hdr - ICMP_HDR_LEN);
    if !reframe(ctx, l3_off, quote, ip_hdr) {
        return dropped;
    }
    // From the packet's destination back to its source.
    let (from, to) = (&key.dst, &key.src);
    // The MACs as received until the route lookup says otherwise: if the reply goes to the
    // kernel after all (no neighbour yet), it only accepts frames addressed to this host.
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return dropped;
    };
    unsafe {
        (*eth).dst_addr = rx_dst;
        (*eth).src_addr = rx_src;
    }
    let (proto, written) = if v4 {
        (IPPROTO_ICMP, write_v4(ctx, from, to, quote, job.mtu))
    } else {
        (IPPROTO_ICMPV6, write_v6(ctx, from, to, quote, job.mtu))
    };
    if written.is_none() {
        return dropped;
    }
    let tot_len = (ip_hdr + ICMP_HDR_LEN + quote) as u16;
    let mut fib = fib_params(ingress, v4, from, to, TOS_NETWORK_CONTROL, proto, tot_len);
    let sent = route(ctx, &mut fib, rx_dst, rx_src);
    if sent.action() == xdp_action::XDP_DROP {
        return dropped;
    }
    count(Counter::IcmpTooBigSent);
    Verdict::new(Counter::DropTooBig, sent.action())
}

/// Whether the packet at `l3_off` may be answered: IPv4 with DF, and not ICMP.
#[inline(always)]
fn answerable(ctx: &XdpContext, l3_off: usize, v4: bool) -> bool {
    if v4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3_off) else {
            return false;
        };
        let ip = unsafe { &*ip };
        u16::from_be_bytes(ip.frags) & IPV4_DF != 0 && ip.proto != IPPROTO_ICMP
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3_off) else {
            return false;
        };
        unsafe { (*ip).next_hdr != IPPROTO_ICMPV6 }
    }
}

/// Takes a token from this CPU's bucket, if it has one (see [`lb_common::RateBucket`]).
#[inline(always)]
fn take_token(now: u64) -> bool {
    let Some(b) = LB_ICMP_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    let b = unsafe { &mut *b };
    lb_common::budget::take(
        &mut b.tokens,
        &mut b.last_ns,
        now,
        NS_PER_TOKEN,
        ICMP_TOO_BIG_BURST,
    )
}

/// Cuts the frame to the first `quote` bytes of the IP packet at `l3_off` and makes room in
/// front of them for an Ethernet, an IP (`ip_len` bytes) and an ICMP header.
#[inline(always)]
fn reframe(ctx: &XdpContext, l3_off: usize, quote: usize, ip_len: usize) -> bool {
    let frame_len = ctx.data_end() - ctx.data();
    let keep = l3_off + quote;
    if keep > frame_len {
        return false;
    }
    let trim = (frame_len - keep) as i32;
    if trim != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -trim) } != 0 {
        return false;
    }
    let grow = (ip_len + ICMP_HDR_LEN) as i32 - (l3_off - EthHdr::LEN) as i32;
    unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) == 0 }
}

/// Writes the Ethernet type, IPv4 and ICMP headers of a fragmentation needed from `from` to
/// `to` quoting `quote` bytes, with next-hop MTU `mtu`.
#[inline(always)]
fn write_v4(
    ctx: &XdpContext,
    from: &[u8; 16],
    to: &[u8; 16],
    quote: usize,
    mtu: u32,
) -> Option<()> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    unsafe { (*eth).ether_type = ETH_P_IP.to_be() };
    let ip = unsafe { &mut *ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)? };
    ip.vihl = 0x45;
    ip.tos = TOS_NETWORK_CONTROL;
    ip.tot_len = ((Ipv4Hdr::LEN + ICMP_HDR_LEN + quote) as u16).to_be_bytes();
    // Atomic (DF, no fragments to tell apart), so the identification may be zero (RFC 6864).
    ip.id = [0, 0];
    ip.frags = IPV4_DF.to_be_bytes();
    ip.ttl = HOP_LIMIT;
    ip.proto = IPPROTO_ICMP;
    ip.check = [0, 0];
    ip.src_addr = [from[0], from[1], from[2], from[3]];
    ip.dst_addr = [to[0], to[1], to[2], to[3]];
    ip.check = ipv4_checksum(ip).to_be_bytes();
    let off = EthHdr::LEN + Ipv4Hdr::LEN;
    let icmp = ptr_at::<[u8; ICMP_HDR_LEN]>(ctx, off)?;
    let [hi, lo] = (mtu as u16).to_be_bytes();
    unsafe { *icmp = [ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, 0, 0, hi, lo] };
    let sum = sum(ctx, off, ICMP_HDR_LEN + quote, 0)?;
    set_checksum(ctx, off, sum)
}

/// Writes the Ethernet type, IPv6 and ICMPv6 headers of a packet too big from `from` to `to`
/// quoting `quote` bytes, with MTU `mtu`.
#[inline(always)]
fn write_v6(
    ctx: &XdpContext,
    from: &[u8; 16],
    to: &[u8; 16],
    quote: usize,
    mtu: u32,
) -> Option<()> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    unsafe { (*eth).ether_type = ETH_P_IPV6.to_be() };
    let ip = unsafe { &mut *ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN)? };
    let len = (ICMP_HDR_LEN + quote) as u16;
    ip.vcf = ((6u32 << 28) | ((TOS_NETWORK_CONTROL as u32) << 20)).to_be_bytes();
    ip.payload_len = len.to_be_bytes();
    ip.next_hdr = IPPROTO_ICMPV6;
    ip.hop_limit = HOP_LIMIT;
    ip.src_addr = *from;
    ip.dst_addr = *to;
    let off = EthHdr::LEN + Ipv6Hdr::LEN;
    let icmp = ptr_at::<[u8; ICMP_HDR_LEN]>(ctx, off)?;
    let m = mtu.to_be_bytes();
    unsafe { *icmp = [ICMPV6_PKT_TOOBIG, 0, 0, 0, m[0], m[1], m[2], m[3]] };
    // The pseudo-header (RFC 8200 8.1): both addresses, the upper-layer length, next header.
    let pseudo = u16::from_ne_bytes(len.to_be_bytes()) as u64
        + u16::from_ne_bytes([0, IPPROTO_ICMPV6]) as u64;
    let addrs = sum(ctx, EthHdr::LEN + 8, 32, pseudo)?;
    let sum = sum(ctx, off, len as usize, addrs)?;
    set_checksum(ctx, off, sum)
}

/// Stores the checksum for `sum` in the ICMP header at `off`.
#[inline(always)]
fn set_checksum(ctx: &XdpContext, off: usize, sum: u64) -> Option<()> {
    let c = ptr_at::<[u8; 2]>(ctx, off + 2)?;
    unsafe { *c = (!fold(sum)).to_ne_bytes() };
    Some(())
}

/// `seed` plus the one's-complement sum (RFC 1071) of `len` bytes of the frame from `off`, in
/// load order (little-endian words, like the checksums it makes), not yet folded. An odd last
/// byte is padded with a zero.
#[inline(always)]
fn sum(ctx: &XdpContext, mut off: usize, len: usize, seed: u64) -> Option<u64> {
    let end = off + len;
    let mut acc = seed;
    for _ in 0..MAX_CHUNKS {
        if off + CHUNK > end {
            break;
        }
        let p = ptr_at::<[u8; CHUNK]>(ctx, off)?;
        let s = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p.cast(), CHUNK as u32, 0) };
        acc += s as u32 as u64;
        off += CHUNK;
    }
    for _ in 0..CHUNK / 4 {
        if off + 4 > end {
            break;
        }
        acc += u32::from_ne_bytes(unsafe { *ptr_at::<[u8; 4]>(ctx, off)? }) as u64;
        off += 4;
    }
    if off + 2 <= end {
        acc += u16::from_ne_bytes(unsafe { *ptr_at::<[u8; 2]>(ctx, off)? }) as u64;
        off += 2;
    }
    if off < end {
        acc += u16::from_ne_bytes([unsafe { *ptr_at::<u8>(ctx, off)? }, 0]) as u64;
    }
    Some(acc)
}

/// A 64-bit sum of 16-bit words, folded to 16 bits.
#[inline(always)]
fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}
