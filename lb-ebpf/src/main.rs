//! The lb XDP program: balances packets for VIPs across backends chosen by weighted Maglev.
//!
//! Per packet: parse ([`parse`]), look the destination up in the VIP table, choose the VIP's
//! member ([`select`]: flow table, then session affinity, then Maglev), encapsulate and forward
//! ([`forward`]). Everything else passes untouched. Every packet ends in exactly one verdict
//! counter; nothing is logged per packet.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic adds for passive health counters (see `nat::bump`).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod addr;
#[cfg(target_arch = "bpf")]
mod bench;
#[cfg(target_arch = "bpf")]
mod budget;
#[cfg(target_arch = "bpf")]
mod decap;
#[cfg(target_arch = "bpf")]
mod flows;
#[cfg(target_arch = "bpf")]
mod forward;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod ipv4;
#[cfg(target_arch = "bpf")]
mod least_conn;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod probe;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod reply_route;
#[cfg(target_arch = "bpf")]
mod route;
#[cfg(target_arch = "bpf")]
mod select;
#[cfg(target_arch = "bpf")]
mod too_big;
#[cfg(target_arch = "bpf")]
mod verdict;

#[cfg(target_arch = "bpf")]
pub use bench::{LB_GEN_FRAME, LB_PROBE_FLOWS};
#[cfg(target_arch = "bpf")]
pub use program::*;

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        Global,
        bindings::xdp_action,
        macros::{map, xdp},
        maps::{
            Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf,
            lpm_trie::Key,
        },
        programs::XdpContext,
    };
    use lb_common::{
        AffinityKey, AffinityValue, Counter, FlowKey, FlowValue, IcmpJob, LayoutMeta, MODE_NAT,
        Member, MemberConns, NAT_JOB_F_LEAST_CONN, NAT_JOB_FORWARD, NAT_JOB_ICMP,
        NAT_JOB_LEAST_CONN, NAT_JOB_REVERSE, NatFlow, NatJob, NatReverse, NextHop, NodeConfig,
        PassiveHealth, RateBucket, SrcRangeKey, TooBigJob, TrafficStats, VIP_F_LEAST_CONN,
        VIP_F_SOURCE_RANGES, VipAddr, VipKey, VipRangeKey, VipValue, maps::*,
    };

    use crate::{
        forward::encap_and_forward,
        nat::is_node_addr,
        parse::{Packet, Parsed, parse},
        select::select,
        verdict::Verdict,
    };

    /// Maglev table size M, fixed when the agent loads the program (a constant to the verifier).
    #[unsafe(no_mangle)]
    pub static LB_MAGLEV_M: Global<u32> = Global::new(DEFAULT_TABLE_SIZE);

    /// Buckets in `LB_FLOWS4`, fixed when the agent loads the program.
    #[unsafe(no_mangle)]
    pub static LB_FLOW_BUCKETS: Global<u32> =
        Global::new(lb_common::flowtab::buckets_for(DEFAULT_FLOW_TABLE_SIZE));

    #[map]
    pub static LB_VIPS: HashMap<VipKey, VipValue> =
        HashMap::with_max_entries(DEFAULT_VIP_ENTRIES, 0);
    #[map]
    pub static LB_VIP_ADDRS: HashMap<VipAddr, u32> =
        HashMap::with_max_entries(DEFAULT_VIP_ENTRIES, 0);
    #[map]
    pub static LB_VIP_FILTER: Array<u64> =
        Array::with_max_entries(lb_common::hash::VIP_FILTER_BITS / 64, 0);
    #[map]
    pub static LB_RING: Array<u32> =
        Array::with_max_entries(DEFAULT_MAX_VIPS * DEFAULT_TABLE_SIZE, RING_FLAGS);
    #[map]
    pub static LB_MEMBERS: Array<Member> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
    #[map]
    pub static LB_NEXTHOPS: Array<NextHop> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
    #[map]
    pub static LB_FLOWS: LruHashMap<FlowKey, FlowValue> =
        LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);
    #[map]
    pub static LB_FLOWS4: Array<lb_common::flowtab::FlowBucket> = Array::with_max_entries(
        lb_common::flowtab::buckets_for(DEFAULT_FLOW_TABLE_SIZE),
        FLOWS4_FLAGS,
    );
    #[map]
    pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
        LruHashMap::with_max_entries(DEFAULT_AFFINITY_TABLE_SIZE, 0);
    #[map]
    pub static LB_NAT: LruHashMap<FlowKey, NatFlow> =
        LruHashMap::with_max_entries(DEFAULT_NAT_TABLE_SIZE, 0);
    #[map]
    pub static LB_NAT_REV: LruHashMap<FlowKey, NatReverse> =
        LruHashMap::with_max_entries(DEFAULT_NAT_TABLE_SIZE, 0);
    #[map]
    pub static LB_MEMBER_PASSIVE: Array<PassiveHealth> =
        Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
    #[map]
    pub static LB_PROGS: ProgramArray = ProgramArray::with_max_entries(PROG_SLOTS, 0);
    #[map]
    pub static LB_NAT_JOB: PerCpuArray<NatJob> = PerCpuArray::with_max_entries(1, 0);
    #[map]
    pub static LB_NODE: Array<NodeConfig> = Array::with_max_entries(1, 0);
    #[map]
    pub static LB_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);
    #[map]
    pub static LB_VIP_STATS: PerCpuArray<TrafficStats> =
        PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);
    #[map]
    pub static LB_MEMBER_STATS: PerCpuArray<TrafficStats> =
        PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
    #[map]
    pub static LB_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
    #[map]
    pub static LB_MEMBER_HOLD: Array<u64> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
    #[map]
    pub static LB_MEMBER_CONNS: Array<MemberConns> =
        Array::with_max_entries(DEFAULT_MAX_BACKENDS, MEMBER_CONNS_FLAGS);
    /// NAT replies (backend -> client) per VIP and per member (`new_flows` stays 0).
    #[map]
    pub static LB_VIP_REPLY_STATS: PerCpuArray<TrafficStats> =
        PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);
    #[map]
    pub static LB_MEMBER_REPLY_STATS: PerCpuArray<TrafficStats> =
        PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
    #[map]
    pub static LB_META: Array<LayoutMeta> = Array::with_max_entries(1, 0);
    #[map]
    pub static LB_TOO_BIG_JOB: PerCpuArray<TooBigJob> = PerCpuArray::with_max_entries(1, 0);
    #[map]
    pub static LB_ICMP_JOB: PerCpuArray<IcmpJob> = PerCpuArray::with_max_entries(1, 0);
    #[map]
    pub static LB_ICMP_BUCKET: PerCpuArray<RateBucket> = PerCpuArray::with_max_entries(1, 0);
    #[map]
    pub static LB_TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);
    #[map]
    pub static LB_REPLY_ROUTES: PerCpuArray<lb_common::ReplyRoute> =
        PerCpuArray::with_max_entries(lb_common::maps::REPLY_ROUTE_SLOTS, 0);
    #[map]
    pub static LB_NAT_HOLD: Array<u32> = Array::with_max_entries(1, 0);
    #[map]
    pub static LB_SRC_RANGES: LpmTrie<SrcRangeKey, u32> =
        LpmTrie::with_max_entries(MAX_SOURCE_RANGES, 0);
    #[map]
    pub static LB_VIP_RANGES: LpmTrie<VipRangeKey, VipValue> =
        LpmTrie::with_max_entries(MAX_VIP_RANGE_KEYS, 0);
    #[map]
    pub static LB_VIP_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);
    #[map]
    pub static LB_NEW_FLOW_BUDGET: PerCpuArray<lb_common::NewFlowBudget> =
        PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);
    #[map]
    pub static LB_VIP_BUDGET_DROPS: PerCpuArray<u64> =
        PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

    /// Whether VIP `vip_id` takes packets from `src` (a VIP with [`VIP_F_SOURCE_RANGES`]): one
    /// longest-prefix lookup of (VIP id, source) in `LB_SRC_RANGES`.
    #[inline(always)]
    fn source_allowed(vip_id: u32, src: &[u8; 16]) -> bool {
        let key = Key::new(SrcRangeKey::prefix_len(128), SrcRangeKey::new(vip_id, *src));
        LB_SRC_RANGES.get(&key).is_some()
    }

    /// The VIP of flow `key`: its exact VIP (`LB_VIPS`), else the port range its port is in
    /// (`LB_VIP_RANGES`, one longest-prefix lookup, made only when the exact lookup misses).
    #[inline(always)]
    pub fn vip_of(key: &FlowKey) -> Option<&'static VipValue> {
        match unsafe { LB_VIPS.get(key.vip_key()) } {
            Some(v) => Some(v),
            None => LB_VIP_RANGES.get(Key::new(
                VipRangeKey::prefix_len(16),
                VipRangeKey::of_flow(key),
            )),
        }
    }

    #[inline(always)]
    pub fn count(c: Counter) {
        if let Some(n) = LB_STATS.get_ptr_mut(c as u32) {
            unsafe { *n += 1 };
        }
    }

    #[inline(always)]
    fn account(map: &PerCpuArray<TrafficStats>, index: u32, bytes: u64, new_flow: bool) {
        if let Some(s) = map.get_ptr_mut(index) {
            let s = unsafe { &mut *s };
            s.packets += 1;
            s.bytes += bytes;
            s.new_flows += new_flow as u64;
        }
    }

    /// Two subprograms, called one after the other, each with its own stack frame (the kernel
    /// allows 512 bytes for a whole call chain, and each of the two needs most of it): [`body`]
    /// (parse, VIP, selection, DSR forwarding), then for a NAT VIP or a reply to the node,
    /// [`nat`] on the job `body` left in `LB_NAT_JOB`. No tail call: the NAT path stays in this
    /// program.
    /// Each subprogram counts its own verdict: counting here would take a stack slot (the
    /// counter's key) in this frame, on top of theirs. They return the verdict's bits, an
    /// integer: the verifier lets only functions that return one make tail calls.
    /// A least-connections VIP's packet goes from [`body`] to [`least`] (a third subprogram
    /// with a frame of its own), which may in turn leave a job for [`nat`].
    #[xdp]
    pub fn lb(ctx: XdpContext) -> u32 {
        let mut v = Verdict::from_bits(body(XdpContext::new(ctx.ctx)));
        if v.is_least_conn() {
            v = Verdict::from_bits(least(XdpContext::new(ctx.ctx)));
        }
        if v.is_nat() {
            Verdict::from_bits(nat(XdpContext::new(ctx.ctx))).action()
        } else {
            v.action()
        }
    }

    /// [`process`], its verdict counted unless it is NAT mode's to give.
    #[inline(never)]
    fn body(ctx: XdpContext) -> u64 {
        let v = process(&ctx);
        if !v.is_nat() {
            finish(v);
        }
        v.bits()
    }

    /// [`crate::least_conn::run`], its verdict counted unless it is NAT mode's to give.
    #[inline(never)]
    fn least(ctx: XdpContext) -> u64 {
        let v = crate::least_conn::run(&ctx);
        if !v.is_nat() {
            finish(v);
        }
        v.bits()
    }

    #[inline(never)]
    fn nat(ctx: XdpContext) -> u64 {
        let v = crate::nat::run(&ctx);
        finish(v);
        v.bits()
    }

    /// Counts the verdict and returns its action.
    #[inline(always)]
    fn finish(verdict: Verdict) -> u32 {
        if let Some(n) = LB_STATS.get_ptr_mut(verdict.counter()) {
            unsafe { *n += 1 };
        }
        verdict.action()
    }

    /// Answers a packet too big for its route (see [`crate::too_big`]): `lb` (DSR and NAT)
    /// tail-call it with a [`TooBigJob`] in `LB_TOO_BIG_JOB`.
    #[xdp]
    pub fn lb_too_big(ctx: XdpContext) -> u32 {
        finish(crate::too_big::run(&ctx))
    }

    /// Sends an ICMP error aimed at a DSR VIP on to the backend of the flow it quotes (see
    /// [`crate::icmp`]): `lb` tail-calls it with an [`IcmpJob`] in `LB_ICMP_JOB`.
    #[xdp]
    pub fn lb_icmp(ctx: XdpContext) -> u32 {
        finish(crate::icmp::run(&ctx))
    }

    /// Leaves `job` for [`nat`] (see [`crate::nat`]), which `lb` calls once [`body`] returns.
    #[inline(always)]
    fn nat_job(job: NatJob) -> Verdict {
        leave_job(job, Verdict::NAT)
    }

    /// Leaves `job` in `LB_NAT_JOB` for the subprogram `then` names.
    #[inline(always)]
    fn leave_job(job: NatJob, then: Verdict) -> Verdict {
        match LB_NAT_JOB.get_ptr_mut(0) {
            Some(j) => {
                unsafe { *j = job };
                then
            }
            None => Verdict::new(Counter::DropNatUnavailable, xdp_action::XDP_DROP),
        }
    }

    #[inline(always)]
    pub(crate) fn job(kind: u8, pkt: &Packet, vip_id: u32, member_id: u32) -> NatJob {
        NatJob {
            key: pkt.key,
            kind,
            tos: pkt.tos,
            tcp_flags: pkt.tcp_flags,
            flags: 0,
            l3_off: pkt.l3_off as u16,
            l4_off: pkt.l4_off as u16,
            ip_len: pkt.ip_len as u32,
            vip_id,
            member_id,
            _pad2: 0,
        }
    }

    /// Passes everything. Attached to the peers of veths that `lb` transmits or redirects into:
    /// a veth only accepts XDP frames when its peer runs NAPI, which an XDP program turns on.
    #[xdp]
    pub fn lb_pass(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    /// Decapsulates tunnelled packets on a DSR backend (see [`crate::decap`]).
    #[xdp]
    pub fn lb_decap(ctx: XdpContext) -> u32 {
        crate::decap::decap(&ctx)
    }

    /// Whether `addr` may carry a VIP: its bit in the VIP-address filter is set. A clear bit
    /// spares a packet to any other address the VIP table lookup.
    #[inline(always)]
    pub fn maybe_vip(addr: &[u8; 16], family: u8) -> bool {
        let (word, bit) = lb_common::hash::vip_filter_slot(addr, family);
        match LB_VIP_FILTER.get(word) {
            Some(w) => *w & bit != 0,
            None => true,
        }
    }

    /// Whether `addr` carries a VIP (any port, any protocol).
    #[inline(always)]
    fn is_vip_addr(addr: &VipAddr) -> bool {
        maybe_vip(&addr.addr, addr.family) && unsafe { LB_VIP_ADDRS.get(addr) }.is_some()
    }

    /// A packet that matches no VIP: in NAT mode it may be a backend's reply to the node.
    #[inline(always)]
    fn not_for_vip(pkt: &Packet) -> Verdict {
        if let Some(node) = LB_NODE.get(0)
            && is_node_addr(node, &pkt.key.dst, pkt.key.family)
        {
            return nat_job(job(NAT_JOB_REVERSE, pkt, 0, 0));
        }
        Verdict::new(Counter::PassNotForVip, xdp_action::XDP_PASS)
    }

    #[inline(always)]
    fn process(ctx: &XdpContext) -> Verdict {
        let bytes = (ctx.data_end() - ctx.data()) as u64;
        let pkt = match parse(ctx, count) {
            Parsed::Packet(p) => p,
            Parsed::NotForUs => return Verdict::new(Counter::PassNotForVip, xdp_action::XDP_PASS),
            Parsed::Icmp(icmp) => {
                if let Some(node) = LB_NODE.get(0)
                    && is_node_addr(node, &icmp.dst.addr, icmp.dst.family)
                {
                    let key = FlowKey {
                        dst: icmp.dst.addr,
                        family: icmp.dst.family,
                        ..Default::default()
                    };
                    return nat_job(NatJob {
                        key,
                        kind: NAT_JOB_ICMP,
                        tos: icmp.tos,
                        l3_off: icmp.l3_off as u16,
                        l4_off: icmp.l4_off as u16,
                        ip_len: icmp.ip_len as u32,
                        ..Default::default()
                    });
                } else if is_vip_addr(&icmp.dst) {
                    // Perhaps about a DSR flow: one lookup, for ICMP to VIP addresses only.
                    crate::icmp::hand_over(ctx, &icmp);
                }
                return Verdict::new(Counter::PassNotForVip, xdp_action::XDP_PASS);
            }
            Parsed::Malformed => return Verdict::new(Counter::PassMalformed, xdp_action::XDP_PASS),
            Parsed::Unbalanceable { dst, why } => {
                // Aimed at a VIP address: dropping is honest, the kernel could only misroute it.
                return if is_vip_addr(&dst) {
                    Verdict::new(why, xdp_action::XDP_DROP)
                } else if why == Counter::DropFragment {
                    Verdict::new(Counter::PassNotForVip, xdp_action::XDP_PASS)
                } else {
                    Verdict::new(Counter::PassMalformed, xdp_action::XDP_PASS)
                };
            }
        };
        if !maybe_vip(&pkt.key.dst, pkt.key.family) {
            return not_for_vip(&pkt);
        }
        let Some(vip) = vip_of(&pkt.key) else {
            return not_for_vip(&pkt);
        };
        let vip = *vip;
        // Before anything is looked up or written for the flow: a refused source leaves no
        // state (flow, affinity, NAT translation) behind, in DSR and NAT alike. Every packet is
        // checked, established flows' too, so a range taken away refuses its sources at once.
        if vip.flags & VIP_F_SOURCE_RANGES != 0 && !source_allowed(vip.id, &pkt.key.src) {
            account(&LB_VIP_STATS, vip.id, bytes, false);
            if let Some(n) = LB_VIP_DROPS.get_ptr_mut(vip.id) {
                unsafe { *n += 1 };
            }
            return Verdict::new(Counter::DropSourceRange, xdp_action::XDP_DROP);
        }
        if vip.flags & VIP_F_LEAST_CONN != 0 {
            return leave_job(
                job(NAT_JOB_LEAST_CONN, &pkt, vip.id, 0),
                Verdict::LEAST_CONN,
            );
        }
        serve::<false>(ctx, &pkt, &vip, bytes)
    }

    /// Chooses `pkt`'s member of `vip` and forwards it there (DSR) or leaves it to [`nat`].
    /// `LC`: `vip` balances by least connections (only [`least`] serves such VIPs, so the
    /// other VIPs' path in [`body`] has none of its code).
    #[inline(always)]
    pub(crate) fn serve<const LC: bool>(
        ctx: &XdpContext,
        pkt: &Packet,
        vip: &VipValue,
        bytes: u64,
    ) -> Verdict {
        let Some(node) = LB_NODE.get(0) else {
            account(&LB_VIP_STATS, vip.id, bytes, false);
            return Verdict::new(Counter::DropNoSourceAddress, xdp_action::XDP_DROP);
        };
        let choice = match select::<LC>(&pkt.key, vip, pkt.tcp_flags, node.udp_idle_timeout_ns) {
            Ok(c) => c,
            Err(counter) => {
                account(&LB_VIP_STATS, vip.id, bytes, false);
                if counter == Counter::DropRejected {
                    return crate::reject::reject(ctx, pkt);
                }
                return Verdict::new(counter, xdp_action::XDP_DROP);
            }
        };
        account(&LB_VIP_STATS, vip.id, bytes, choice.new_flow);
        account(&LB_MEMBER_STATS, choice.member_id, bytes, choice.new_flow);
        if vip.mode == MODE_NAT {
            let mut j = job(NAT_JOB_FORWARD, pkt, vip.id, choice.member_id);
            if LC {
                j.flags = NAT_JOB_F_LEAST_CONN;
            }
            return nat_job(j);
        }
        encap_and_forward(ctx, pkt, choice.member_id, unsafe { &*choice.member }, node)
    }

    #[cfg(not(test))]
    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "lb-ebpf is an XDP program: it is built for the BPF target by lb-userspace's build script"
    );
}
