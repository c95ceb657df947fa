//! Rejected shares: a packet Maglev gave to a rejecting member (`MEMBER_F_REJECT`, a share with
//! no backend behind it). TCP is answered with a reset, so a client's connection attempt fails at
//! once instead of timing out; anything else is dropped. Both are counted.
//!
//! The reset is written over the packet in place: MAC addresses swapped (back to the hop it came
//! from), fresh IP and TCP headers with addresses and ports swapped, the frame cut after them,
//! and sent back out with `XDP_TX`. Only packets Maglev sent to such a member get here.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_adjust_tail, programs::XdpContext,
};
use lb_common::{
    Counter, FAMILY_V4, IPPROTO_TCP,
    reset::{ipv4_header, ipv6_header, reset_numbers, tcp_header},
};

use crate::{
    parse::{Packet, ptr_at},
    verdict::Verdict,
};

const DROP: Verdict = Verdict::new(Counter::DropRejected, xdp_action::XDP_DROP);

/// What to do with `pkt`, which Maglev gave to a rejecting member.
#[inline(always)]
pub fn reject(ctx: &XdpContext, pkt: &Packet) -> Verdict {
    if pkt.key.proto != IPPROTO_TCP {
        return DROP;
    }
    reset(ctx, pkt).unwrap_or(DROP)
}

#[inline(always)]
fn reset(ctx: &XdpContext, pkt: &Packet) -> Option<Verdict> {
    let tcp = ptr_at::<[u8; 20]>(ctx, pkt.l4_off)?;
    let tcp = unsafe { *tcp };
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let doff = ((tcp[12] >> 4) as usize) * 4;
    // The parser checked that the header fits the IP packet.
    let payload = pkt.ip_len.checked_sub(pkt.l4_off - pkt.l3_off + doff)? as u32;
    let (rseq, rack, rflags) = reset_numbers(seq, ack, tcp[13], payload)?;
    let (sport, dport) = (pkt.key.src_port, pkt.key.dst_port);
    let (client, vip) = (pkt.key.src, pkt.key.dst);
    let v4 = pkt.key.family == FAMILY_V4;

    let l3 = pkt.l3_off;
    let keep = l3 + if v4 { 40 } else { 60 };
    let frame_len = ctx.data_end() - ctx.data();
    let trim = frame_len.checked_sub(keep)? as i32;
    if trim != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -trim) } != 0 {
        return None;
    }
    let macs = ptr_at::<[u8; 12]>(ctx, 0)?;
    let m = unsafe { *macs };
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&m[6..]);
    swapped[6..].copy_from_slice(&m[..6]);
    unsafe { *macs = swapped };
    let th = tcp_header(&vip, &client, v4, dport, sport, rseq, rack, rflags);
    if v4 {
        let ip = ptr_at::<[u8; 20]>(ctx, l3)?;
        unsafe { *ip = ipv4_header(&vip, &client) };
        let t = ptr_at::<[u8; 20]>(ctx, l3 + 20)?;
        unsafe { *t = th };
    } else {
        let ip = ptr_at::<[u8; 40]>(ctx, l3)?;
        unsafe { *ip = ipv6_header(&vip, &client) };
        let t = ptr_at::<[u8; 20]>(ctx, l3 + 40)?;
        unsafe { *t = th };
    }
    Some(Verdict::new(Counter::TxReset, xdp_action::XDP_TX))
}
