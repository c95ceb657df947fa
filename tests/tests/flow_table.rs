//! The IPv4 flow table (`lb_common::flowtab`): a lock-free bucket table shared by all CPUs.
//! Each test squeezes its flows into one bucket (a table of three flows), so that every insert
//! competes for the same ways.

use std::net::Ipv4Addr;

use lb_common::{Counter, FlowValue, IPPROTO_TCP, MODE_DSR, VipValue, flow_hash};
use lb_tests::{
    harness::{FibNet, Lb, XDP_TX, net::*, test_run, vip_key},
    packet::{L4, Pkt, TCP_ACK},
};
use lb_userspace::kernel::program::Sizes;

const VIP: &str = "192.0.2.10";
const BACKENDS: [&str; 4] = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"];

/// One DSR VIP (id 0) on four backends, and a flow table of one bucket.
fn setup() -> Lb {
    let mut lb = Lb::load(Sizes {
        table_size: 1009,
        max_vips: 2,
        max_backends: 8,
        flow_table_size: 3,
        affinity_table_size: 64,
        nat_table_size: 64,
    });
    assert_eq!(lb_common::flowtab::buckets_for(3), 1);
    lb.set_node(Some(NODE_V4), None, 0);
    for (i, b) in BACKENDS.iter().enumerate() {
        lb.set_backend(i as u32, b, true);
    }
    let value = VipValue {
        id: 0,
        flags: 0,
        affinity_timeout_s: 0,
        mode: MODE_DSR,
        table_size: 0,
    };
    lb.add_vip(vip_key(VIP, 80, IPPROTO_TCP), value);
    lb.set_ring(0, |s| s % 4);
    lb
}

fn syn(port: u16) -> Pkt {
    Pkt::tcp("198.51.100.7", port, VIP, 80, LB0_MAC)
}

fn ack(port: u16) -> Pkt {
    syn(port).with(|p| p.l4 = L4::Tcp { flags: TCP_ACK })
}

/// Where Maglev sends the flow from client port `port` (the ring's member, as an address).
fn maglev_backend(lb: &mut Lb, port: u16) -> Ipv4Addr {
    let member = lb.ring_backend(0, flow_hash(&syn(port).flow_key()));
    BACKENDS[lb.backend_of(member) as usize].parse().unwrap()
}

fn outer_dst(frame: &[u8]) -> Ipv4Addr {
    Ipv4Addr::from(<[u8; 4]>::try_from(&frame[30..34]).unwrap())
}

/// Two CPUs insert and look up twelve flows in one bucket at once. A broken way choice or a
/// value written to the wrong way shows here; the window of a torn read (a few nanoseconds
/// against a microsecond per `BPF_PROG_TEST_RUN` call) is too short for this test to hit: the
/// claim-and-publish protocol's unit of trust is the code and the tag check.
#[test]
fn two_cpus_rewriting_one_bucket_never_send_a_flow_to_another_flows_backend() {
    const FLOWS: u16 = 12;
    const CALLS: usize = 30_000;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "the race needs two CPUs, this machine has {cpus}"
    );
    let net = FibNet::new("flowtab-race");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        // The ring never changes, so every entry the table can hold names Maglev's member: a
        // packet sent elsewhere read one flow's key with another's member.
        let want: Vec<Ipv4Addr> = (0..FLOWS)
            .map(|p| maglev_backend(&mut lb, 1000 + p))
            .collect();
        assert!(
            want.iter().any(|b| *b != want[0]),
            "the flows must spread over backends"
        );
        let before = lb.counters();
        let prog = lb.xdp(lb_userspace::kernel::program::PROGRAM);
        let wrong: usize = std::thread::scope(|sc| {
            let racers: Vec<_> = (0..2usize)
                .map(|cpu| {
                    let (prog, want) = (&*prog, &want);
                    sc.spawn(move || {
                        lb_tests::harness::pin_to_cpu(cpu);
                        let mut wrong = 0;
                        for i in 0..CALLS {
                            let f = ((i * 7 + cpu * 5) % FLOWS as usize) as u16;
                            // A third are SYNs (inserts), the rest ACKs (lookups).
                            let pkt = if i % 3 == 0 {
                                syn(1000 + f)
                            } else {
                                ack(1000 + f)
                            };
                            let run = test_run(prog, &pkt.frame(), ingress);
                            if run.action != XDP_TX || outer_dst(&run.output) != want[f as usize] {
                                wrong += 1;
                            }
                        }
                        wrong
                    })
                })
                .collect();
            racers
                .into_iter()
                .map(|t| t.join().expect("racing thread"))
                .sum()
        });
        let after = lb.counters();
        let d = |c: Counter| after[&c] - before[&c];
        assert_eq!(wrong, 0, "packets sent to another flow's backend");
        // The table was in play: hits, and inserts that took ways from other flows.
        assert!(
            d(Counter::FlowHits) > 1000,
            "flow hits: {}",
            d(Counter::FlowHits)
        );
        assert!(
            d(Counter::NonSynMiss) > 1000,
            "evicted flows: {}",
            d(Counter::NonSynMiss)
        );
    });
}

#[test]
fn a_full_bucket_evicts_the_flow_seen_longest_ago_and_a_busy_flow_stays() {
    let net = FibNet::new("flowtab-lru");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        let now = lb_userspace::kernel::inspect::monotonic_coarse_ns();
        let s = 1_000_000_000u64;
        // Three flows fill the bucket: two seen 10 s ago, one 5 s ago.
        for (port, age) in [(1, 10), (2, 10), (3, 5)] {
            let member = lb.ring_backend(0, flow_hash(&syn(port).flow_key()));
            let value = FlowValue {
                member_id: member,
                generation: 1,
                last_seen_ns: now - age * s,
            };
            lb.set_flow(syn(port).flow_key(), value);
        }
        // Flow 1 sends a packet: it is seen now (its entry was older than the refresh interval).
        assert_eq!(lb.run(&ack(1).frame(), ingress).action, XDP_TX);
        let seen = lb.flow(&syn(1).flow_key()).expect("flow 1").last_seen_ns;
        assert!(
            seen + s > now,
            "flow 1 was not refreshed: seen {} s ago",
            (now - seen) / s
        );
        // A new flow takes the way of the one seen longest ago: flow 2.
        assert_eq!(lb.run(&syn(4).frame(), ingress).action, XDP_TX);
        for (port, kept) in [(1, true), (2, false), (3, true), (4, true)] {
            assert_eq!(
                lb.flow(&syn(port).flow_key()).is_some(),
                kept,
                "flow {port}"
            );
        }
    });
}

/// Sends a SYN then an ACK of the flow from `port`: the second packet finds the entry and
/// confirms it.
fn establish(lb: &mut Lb, port: u16, ingress: u32) {
    assert_eq!(lb.run(&syn(port).frame(), ingress).action, XDP_TX);
    assert_eq!(lb.run(&ack(port).frame(), ingress).action, XDP_TX);
}

#[test]
fn a_syn_flood_never_evicts_an_established_flow_and_is_still_balanced() {
    let net = FibNet::new("flowtab-guard");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        for port in 1..=3 {
            establish(&mut lb, port, ingress);
        }
        let before = lb.counters();
        // A thousand new clients' SYNs at a bucket of three established flows.
        for port in 1000..2000u16 {
            let run = lb.run(&syn(port).frame(), ingress);
            assert_eq!(run.action, XDP_TX, "SYN from port {port}");
            // Without an entry, Maglev still gives it the member every node would.
            assert_eq!(outer_dst(&run.output), maglev_backend(&mut lb, port));
        }
        let after = lb.counters();
        for port in 1..=3 {
            assert!(
                lb.flow(&syn(port).flow_key()).is_some(),
                "established flow {port} was evicted"
            );
        }
        assert!(lb.flow(&syn(1999).flow_key()).is_none());
        assert_eq!(
            after[&Counter::FlowInsertFailed] - before[&Counter::FlowInsertFailed],
            1000,
            "every flood SYN found no way it may take"
        );
        // The established flows still reach their members through their entries.
        let hits = lb.counters()[&Counter::FlowHits];
        for port in 1..=3 {
            assert_eq!(lb.run(&ack(port).frame(), ingress).action, XDP_TX);
        }
        assert_eq!(lb.counters()[&Counter::FlowHits] - hits, 3);
    });
}

#[test]
fn a_new_flow_takes_the_way_of_an_unconfirmed_flow_before_older_established_ones() {
    let net = FibNet::new("flowtab-unconf");
    let ingress = net.lb0;
    net.ns.run(|| {
        let mut lb = setup();
        establish(&mut lb, 1, ingress);
        establish(&mut lb, 2, ingress);
        // Flow 3 sends its SYN last of all, and nothing more.
        assert_eq!(lb.run(&syn(3).frame(), ingress).action, XDP_TX);
        assert_eq!(lb.run(&syn(4).frame(), ingress).action, XDP_TX);
        for (port, kept) in [(1, true), (2, true), (3, false), (4, true)] {
            assert_eq!(
                lb.flow(&syn(port).flow_key()).is_some(),
                kept,
                "flow {port}"
            );
        }
    });
}
