//! The new-flow budget per VIP (`new_flow_budget`), in the XDP program: each test runs frames
//! through it with `BPF_PROG_TEST_RUN` on one CPU (the test thread is pinned, and a test run
//! runs on the caller's CPU) and checks the action, the output bytes, the counters (global
//! `drop_new_flow_budget` and the VIP's own in `LB_VIP_BUDGET_DROPS`), the buckets and that a
//! refused packet leaves no state behind. The maps are written by hand (see
//! `lb_tests::harness`): how the agent shares a configured budget out over the CPUs is checked by
//! `lb_common::budget`'s and the planner's unit tests, a reload in `new_flow_budget_agent.rs`.
//!
//! Time: the program refills a bucket from `bpf_ktime_get_coarse_ns`, which a test cannot
//! stop. The tests that must not see a refill give a token interval of an hour; the one that
//! checks the refill writes a bucket whose last token is 2.5 intervals old (see
//! [`tokens_come_back_with_time_and_the_fraction_of_a_token_is_kept`]).

use lb_common::{
    Counter, IPPROTO_TCP, MODE_DSR, MODE_NAT, NewFlowBudget, VIP_F_NEW_FLOW_BUDGET, VipValue,
};
use lb_tests::{
    harness::{FibNet, Lb, XDP_DROP, XDP_TX, action_name, net::*, pin_to_cpu, vip_key},
    hex,
    packet::{self, L4, Pkt, TCP_ACK},
};
use lb_userspace::{kernel::inspect::monotonic_coarse_ns, kernel::program::Sizes};

const DSR4: &str = "192.0.2.10";
const NAT4: &str = "192.0.2.19";
const OPEN4: &str = "192.0.2.30";

/// VIP ids.
const V_DSR4: u32 = 0;
const V_NAT4: u32 = 2;
const V_OPEN4: u32 = 4;

/// The burst of the budgets: new flows a CPU's full bucket takes at once.
const BURST: u64 = 3;
/// A token interval no test outlasts: no token comes back while a test runs.
const HOUR_NS: u64 = 3_600_000_000_000;
/// The CPU every test runs its frames on.
const CPU: usize = 0;

/// A full bucket (all zeroes but the settings: see [`NewFlowBudget`]).
fn full(ns_per_token: u64, burst: u64) -> NewFlowBudget {
    NewFlowBudget {
        ns_per_token,
        burst,
        ..Default::default()
    }
}

/// The program with a DSR and a NAT VIP with budgets of [`BURST`] and no refill, and one VIP
/// without the flag whose budget entry (a burst of 1) is there all the same.
fn setup() -> Lb {
    pin_to_cpu(CPU);
    let mut lb = Lb::load(Sizes {
        table_size: 13,
        max_vips: 8,
        max_backends: 8,
        flow_table_size: 1024,
        affinity_table_size: 64,
        nat_table_size: 1024,
    });
    lb.set_node(Some(NODE_V4), Some(NODE_V6), 30_000_000_000);
    lb.set_backend_port(1, TX_V4, 0, true);
    lb.set_backend_port(3, TX_V4_B, 8080, true);
    let vips = [
        (V_DSR4, DSR4, MODE_DSR, VIP_F_NEW_FLOW_BUDGET, 1, BURST),
        (V_NAT4, NAT4, MODE_NAT, VIP_F_NEW_FLOW_BUDGET, 3, BURST),
        // No flag: what the agent writes for a VIP without a budget. Its entry holds a budget
        // anyway (left over, say): the program must not look.
        (V_OPEN4, OPEN4, MODE_DSR, 0, 1, 1),
    ];
    for (id, addr, mode, flags, backend, burst) in vips {
        lb.add_vip(
            vip_key(addr, 80, IPPROTO_TCP),
            VipValue {
                id,
                flags,
                affinity_timeout_s: 0,
                mode,
                table_size: 0,
            },
        );
        lb.set_ring(id, |_| backend);
        lb.set_budget(id, full(HOUR_NS, burst));
    }
    lb
}

/// A SYN from source `i` (a new client each) to `vip`.
fn syn(i: u8, vip: &str) -> Pkt {
    Pkt::tcp(&format!("198.51.100.{i}"), 40000, vip, 80, LB0_MAC)
}

/// Runs `pkt` and returns (action, output, change of `which`, change of
/// `drop_new_flow_budget`, change of the VIP's own budget drops).
fn run(
    lb: &mut Lb,
    ingress: u32,
    pkt: &Pkt,
    which: Counter,
    vip: u32,
) -> (u32, Vec<u8>, u64, u64, u64) {
    let before = lb.counters();
    let drops = lb.vip_budget_drops(vip);
    let r = lb.run(&pkt.frame(), ingress);
    let after = lb.counters();
    assert_eq!(
        after[&Counter::Packets] - before[&Counter::Packets],
        1,
        "one packet, one verdict"
    );
    let d = |c: Counter| after[&c] - before[&c];
    (
        r.action,
        r.output,
        d(which),
        d(Counter::DropNewFlowBudget),
        lb.vip_budget_drops(vip) - drops,
    )
}

/// A packet over budget: dropped as it came, counted once globally and once for its VIP.
fn assert_over_budget(lb: &mut Lb, ingress: u32, pkt: &Pkt, vip: u32) {
    let (action, output, _, n, per_vip) = run(lb, ingress, pkt, Counter::Packets, vip);
    assert_eq!(action_name(action), action_name(XDP_DROP), "{pkt:?}");
    assert_eq!(hex(&output), hex(&pkt.frame()));
    assert_eq!(
        (n, per_vip),
        (1, 1),
        "drop_new_flow_budget, global and the VIP's"
    );
}

/// A DSR packet within budget: encapsulated to `TX_V4` and sent (`tx`), nothing dropped.
fn assert_forwarded(lb: &mut Lb, ingress: u32, pkt: &Pkt, vip: u32) {
    let (action, output, n, over, per_vip) = run(lb, ingress, pkt, Counter::Tx, vip);
    assert_eq!(action_name(action), action_name(XDP_TX), "{pkt:?}");
    let want = packet::encapsulated(
        pkt,
        GW0_MAC,
        LB0_MAC,
        NODE_V4.parse().unwrap(),
        TX_V4.parse().unwrap(),
    );
    assert_eq!(hex(&output), hex(&want));
    assert_eq!(
        (n, over, per_vip),
        (1, 0, 0),
        "tx, drop_new_flow_budget, the VIP's"
    );
}

#[test]
fn dsr_a_burst_of_3_passes_3_new_flows_on_one_cpu_then_drops_the_next_and_counts_it() {
    let net = FibNet::new("bud-dsr");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        for i in 1..=BURST as u8 {
            assert_forwarded(&mut lb, ingress, &syn(i, DSR4), V_DSR4);
        }
        let over = syn(BURST as u8 + 1, DSR4);
        assert_over_budget(&mut lb, ingress, &over, V_DSR4);
        assert_over_budget(&mut lb, ingress, &syn(BURST as u8 + 2, DSR4), V_DSR4);
        assert_eq!(lb.counters()[&Counter::DropNewFlowBudget], 2);
        assert_eq!(lb.vip_budget_drops(V_DSR4), 2);
        assert_eq!(
            lb.vip_budget_drops(V_NAT4),
            0,
            "another VIP's counter moved"
        );
        // Refused before any state: the flows that passed have entries, the refused none.
        assert_eq!(lb.flow_count(), BURST as usize);
        assert!(
            lb.flow(&over.flow_key()).is_none(),
            "a refused SYN made a flow entry"
        );
        // The tokens came out of this CPU's bucket only.
        let buckets = lb.budget(V_DSR4);
        assert_eq!(buckets[CPU].tokens, 0);
        for (cpu, b) in buckets.iter().enumerate().filter(|(c, _)| *c != CPU) {
            assert_eq!(*b, full(HOUR_NS, BURST), "CPU {cpu}'s bucket was touched");
        }
    });
}

#[test]
fn nat_a_syn_over_budget_gets_no_translation_and_the_ones_within_get_theirs() {
    let net = FibNet::new("bud-nat");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        for i in 1..=BURST as u8 {
            let p = syn(i, NAT4);
            let (action, _, n, over, _) = run(&mut lb, ingress, &p, Counter::Tx, V_NAT4);
            assert_eq!(action_name(action), action_name(XDP_TX), "{p:?}");
            assert_eq!((n, over), (1, 0));
            assert!(
                lb.nat_flow(&p.flow_key()).is_some(),
                "no translation for {p:?}"
            );
        }
        let over = syn(BURST as u8 + 1, NAT4);
        assert_over_budget(&mut lb, ingress, &over, V_NAT4);
        assert!(
            lb.nat_flow(&over.flow_key()).is_none(),
            "a SYN over budget got a translation"
        );
        assert!(lb.flow(&over.flow_key()).is_none());
        assert_eq!(lb.counters()[&Counter::NatNew], BURST);
    });
}

#[test]
fn packets_of_established_flows_pass_while_the_budget_is_empty() {
    let net = FibNet::new("bud-est");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        for i in 1..=BURST as u8 {
            assert_forwarded(&mut lb, ingress, &syn(i, DSR4), V_DSR4);
        }
        assert_over_budget(&mut lb, ingress, &syn(50, DSR4), V_DSR4);
        // The budget is empty; every established flow's next packets still go through.
        for _ in 0..3 {
            for i in 1..=BURST as u8 {
                let ack = syn(i, DSR4).with(|p| p.l4 = L4::Tcp { flags: TCP_ACK });
                let (action, _, hits, over, _) =
                    run(&mut lb, ingress, &ack, Counter::FlowHits, V_DSR4);
                assert_eq!(action_name(action), action_name(XDP_TX), "{ack:?}");
                assert_eq!((hits, over), (1, 0), "flow hit, drop_new_flow_budget");
            }
        }
        assert_eq!(
            lb.budget(V_DSR4)[CPU].tokens,
            0,
            "a flow hit took or gave a token"
        );
        assert_eq!(lb.vip_budget_drops(V_DSR4), 1);
    });
}

#[test]
fn a_mid_stream_packet_without_a_flow_entry_takes_a_token_too() {
    // A non-SYN that misses the flow table is balanced afresh and given an entry: new state,
    // so it needs a token like a SYN (a flood of spoofed ACKs would otherwise fill the table).
    let net = FibNet::new("bud-mid");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        let ack = |i| syn(i, DSR4).with(|p| p.l4 = L4::Tcp { flags: TCP_ACK });
        for i in 1..=BURST as u8 {
            assert_forwarded(&mut lb, ingress, &ack(i), V_DSR4);
        }
        assert_over_budget(&mut lb, ingress, &ack(BURST as u8 + 1), V_DSR4);
    });
}

#[test]
fn a_vip_without_the_flag_takes_every_new_flow_whatever_its_budget_entry_holds() {
    let net = FibNet::new("bud-open");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        // Its entry allows 1 at once and none after; 10 new flows pass all the same.
        for i in 1..=10 {
            assert_forwarded(&mut lb, ingress, &syn(i, OPEN4), V_OPEN4);
        }
        assert_eq!(lb.counters()[&Counter::DropNewFlowBudget], 0);
        assert_eq!(
            lb.budget(V_OPEN4)[CPU],
            full(HOUR_NS, 1),
            "the program looked"
        );
    });
}

#[test]
fn tokens_come_back_with_time_and_the_fraction_of_a_token_is_kept() {
    // A token a second, a burst of 10, an empty bucket whose last token is 2.5 s old: by the
    // program's clock 2 tokens have come back (a third needs 3 s: this test has 0.5 s to run its
    // 3 packets), and the half token left over stays earned.
    const S: u64 = 1_000_000_000;
    let net = FibNet::new("bud-time");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        let last_ns = monotonic_coarse_ns() - 5 * S / 2;
        lb.set_budget(
            V_DSR4,
            NewFlowBudget {
                tokens: 0,
                last_ns,
                ns_per_token: S,
                burst: 10,
            },
        );
        assert_forwarded(&mut lb, ingress, &syn(1, DSR4), V_DSR4);
        assert_forwarded(&mut lb, ingress, &syn(2, DSR4), V_DSR4);
        assert_over_budget(&mut lb, ingress, &syn(3, DSR4), V_DSR4);
        let b = lb.budget(V_DSR4)[CPU];
        assert_eq!(b.tokens, 0);
        assert_eq!(
            b.last_ns,
            last_ns + 2 * S,
            "the bucket's time moves by whole tokens (the half token is kept)"
        );
    });
}
