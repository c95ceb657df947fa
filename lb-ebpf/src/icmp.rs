//! ICMP errors about a VIP's flows: destination unreachable (fragmentation needed included),
//! packet too big and time exceeded, IPv4 (types 3, 11) and IPv6 (types 1, 2, 3).
//!
//! DSR: a backend answers clients directly, from the VIP, so a router on the way to a client
//! that can't pass the backend's packet answers the VIP, which lands here. The error is sent on
//! to the backend of the flow it quotes, encapsulated like any packet of that flow (the ICMP
//! message itself untouched), so that the backend's path MTU discovery works. The quoted packet
//! went VIP -> client: reversed, its tuple is the client's flow key, whose flow entry (if
//! `check_flow` would follow it) or else Maglev choice names the member. Nothing is recorded.
//! This runs as `lb_icmp`, tail-called by `lb` with an [`IcmpJob`] in `LB_ICMP_JOB`, on a stack
//! of its own.
//!
//! NAT mode reads the same quotes (see `nat::nat_icmp`), about packets it translated.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use lb_common::{
    Counter, FAMILY_V4, FAMILY_V6, FlowKey, IPPROTO_TCP, IPPROTO_UDP, IcmpJob, MODE_DSR, Member,
    maps::ICMP_PROG_INDEX,
    select::{FlowCheck, check_flow},
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::parse::{
    ICMP_DEST_UNREACH, ICMP_HDR_LEN, ICMP_TIME_EXCEEDED, ICMPV6_DEST_UNREACH, ICMPV6_PKT_TOOBIG,
    ICMPV6_TIME_EXCEED,
};
use crate::{
    LB_FLOWS, LB_ICMP_JOB, LB_MEMBERS, LB_NODE, LB_PROGS,
    addr::same_addr,
    count,
    forward::encap_and_forward,
    parse::{Icmp, Packet, ptr_at},
    select::maglev,
    verdict::Verdict,
};

/// IPv4 fragment offset: a quoted fragment other than the first carries no ports.
const IPV4_OFFSET: u16 = 0x1fff;
/// Upper bound of the offsets a job may carry (the verifier wants packet offsets bounded).
const MAX_OFF: u16 = 0x0fff;

/// Whether ICMP (`v4`) or ICMPv6 type `ty` is an error lb reads: destination unreachable,
/// packet too big, time exceeded.
#[inline(always)]
fn is_error(v4: bool, ty: u8) -> bool {
    if v4 {
        ty == ICMP_DEST_UNREACH || ty == ICMP_TIME_EXCEEDED
    } else {
        matches!(
            ty,
            ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED
        )
    }
}

/// Reads the ICMP message at `l4_off`: if it is an error (see [`is_error`]) quoting a TCP or
/// UDP packet whose ports lie before `end` (the end of the message), writes the quoted tuple
/// reversed into `key` (the key of a reply to the quoted packet: for a packet a DSR backend
/// sent, its client's flow; for one NAT translated, the backend's reply) and returns the type,
/// the code and the offset of the quoted TCP or UDP header (the quoted IP header is at
/// `l4_off + ICMP_HDR_LEN`). IPv6 quotes are read only when TCP or UDP follows the fixed header.
#[inline(always)]
pub fn quote(
    ctx: &XdpContext,
    v4: bool,
    l4_off: usize,
    end: usize,
    key: &mut FlowKey,
) -> Option<(u8, u8, usize)> {
    let h = unsafe { *ptr_at::<[u8; 2]>(ctx, l4_off)? };
    if !is_error(v4, h[0]) {
        return None;
    }
    let inner = l4_off + ICMP_HDR_LEN;
    let l4 = if v4 {
        let ip = unsafe { &*ptr_at::<Ipv4Hdr>(ctx, inner)? };
        let ihl = ((ip.vihl & 0x0f) as usize) * 4;
        if ip.vihl >> 4 != 4
            || ihl < Ipv4Hdr::LEN
            || u16::from_be_bytes(ip.frags) & IPV4_OFFSET != 0
        {
            return None;
        }
        key.src[..4].copy_from_slice(&ip.dst_addr);
        key.dst[..4].copy_from_slice(&ip.src_addr);
        key.proto = ip.proto;
        inner + ihl
    } else {
        let ip = unsafe { &*ptr_at::<Ipv6Hdr>(ctx, inner)? };
        if ip.vcf[0] >> 4 != 6 {
            return None;
        }
        key.src = ip.dst_addr;
        key.dst = ip.src_addr;
        key.proto = ip.next_hdr;
        inner + Ipv6Hdr::LEN
    };
    if (key.proto != IPPROTO_TCP && key.proto != IPPROTO_UDP) || l4 + 4 > end {
        return None;
    }
    let p = unsafe { *ptr_at::<[u8; 4]>(ctx, l4)? };
    key.src_port = u16::from_ne_bytes([p[2], p[3]]);
    key.dst_port = u16::from_ne_bytes([p[0], p[1]]);
    key.family = if v4 { FAMILY_V4 } else { FAMILY_V6 };
    Some((h[0], h[1], l4))
}

/// Hands an ICMP message aimed at a VIP address to `lb_icmp`; returns only if that program is
/// not installed.
#[inline(always)]
pub fn hand_over(ctx: &XdpContext, icmp: &Icmp) {
    if let Some(j) = LB_ICMP_JOB.get_ptr_mut(0) {
        unsafe {
            *j = IcmpJob {
                dst: icmp.dst.addr,
                family: icmp.dst.family,
                tos: icmp.tos,
                l3_off: icmp.l3_off as u16,
                l4_off: icmp.l4_off as u16,
                _pad: 0,
                ip_len: icmp.ip_len as u32,
            };
            LB_PROGS.tail_call(ctx, ICMP_PROG_INDEX);
        }
    }
}

/// `lb_icmp`: sends the ICMP error in `LB_ICMP_JOB` on to the member of the DSR flow it quotes;
/// passes it untouched (`pass_not_for_vip`) if it quotes none.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> Verdict {
    let pass = Verdict::new(Counter::PassNotForVip, xdp_action::XDP_PASS);
    let Some(job) = LB_ICMP_JOB.get_ptr(0) else {
        return pass;
    };
    let job = unsafe { &*job };
    if job.l4_off > MAX_OFF || job.l3_off >= job.l4_off || job.ip_len > 0xffff {
        return pass;
    }
    let (l3_off, l4_off, ip_len) = (
        job.l3_off as usize,
        job.l4_off as usize,
        job.ip_len as usize,
    );
    let mut pkt = Packet {
        key: FlowKey::default(),
        l3_off,
        ip_len,
        l4_off,
        tos: job.tos,
        syn: false,
        tcp_flags: 0,
        counted: false,
    };
    if quote(ctx, job.family == FAMILY_V4, l4_off, l3_off + ip_len, &mut pkt.key).is_none()
        // Sent by a backend from the VIP the error is aimed at.
        || !same_addr(&pkt.key.dst, &job.dst)
    {
        return pass;
    }
    let Some(node) = LB_NODE.get(0) else {
        return pass;
    };
    let Some((id, member)) = member_of(&pkt.key, node.udp_idle_timeout_ns) else {
        return pass;
    };
    count(Counter::IcmpForwarded);
    encap_and_forward(ctx, &pkt, id, member, node)
}

/// The member of DSR flow `key`: its flow entry's if `check_flow` would follow it, else
/// Maglev's choice. `None` if `key` is no DSR VIP's or the VIP has no member to choose.
#[inline(always)]
fn member_of(key: &FlowKey, udp_idle_timeout_ns: u64) -> Option<(u32, &'static Member)> {
    let vip = crate::vip_of(key)?;
    if vip.mode != MODE_DSR {
        return None;
    }
    let t = unsafe { bpf_ktime_get_coarse_ns() };
    let flow = if lb_common::flowtab::in_table(key.family) {
        crate::flows::lookup(lb_common::flowtab::pack_key(key, vip.id))
            .map(|h| crate::flows::value(&h, t))
    } else {
        unsafe { LB_FLOWS.get(key) }.copied()
    };
    if let Some(flow) = flow {
        let m = LB_MEMBERS.get(flow.member_id);
        // An error is no traffic of the flow: its idle time is read, not refreshed.
        if let FlowCheck::Follow | FlowCheck::FollowAndRefresh =
            check_flow(&flow, m, vip, key.proto, t, udp_idle_timeout_ns)
            && let Some(m) = m
        {
            return Some((flow.member_id, m));
        }
    }
    maglev(key, vip, false).ok()
}
