//! Real connections through the attached program on veth pairs: the `XDP_TX` and `XDP_REDIRECT`
//! paths carry TCP and UDP, over IPv4 and IPv6, from a client to DSR backends that answer directly.

use lb_common::Counter;
use lb_tests::lab::{MiniLab, VIP4, VIP6};

fn check(tally: &std::collections::BTreeMap<String, usize>, n: usize, what: &str) {
    let ok: usize = ["b1", "b2"]
        .iter()
        .map(|b| tally.get(*b).copied().unwrap_or(0))
        .sum();
    assert_eq!(
        ok, n,
        "{what}: not every request was answered by a backend: {tally:?}"
    );
    for b in ["b1", "b2"] {
        assert!(
            tally.get(b).copied().unwrap_or(0) > n / 5,
            "{what}: backend {b} got too few: {tally:?}"
        );
    }
}

#[test]
fn tcp_and_udp_reach_both_backends_through_tx_and_redirect() {
    let mut lab = MiniLab::new();
    let n = 60;
    check(&lab.tcp_tally(VIP4, n), n, "TCP over IPv4");
    check(&lab.udp_tally(VIP4, n), n, "UDP over IPv4");
    check(&lab.tcp_tally(VIP6, n), n, "TCP over IPv6");
    check(&lab.udp_tally(VIP6, n), n, "UDP over IPv6");
    let c = lab.lb.counters();
    assert!(c[&Counter::Tx] > 0, "no XDP_TX: {c:?}");
    assert!(c[&Counter::Redirect] > 0, "no XDP_REDIRECT: {c:?}");
    assert!(
        c[&Counter::FlowHits] > 0,
        "no established-flow packets: {c:?}"
    );
    assert_eq!(
        c[&Counter::DropTooBig] + c[&Counter::DropFibFailed] + c[&Counter::DropNoBackend],
        0,
        "drops: {c:?}"
    );
}
