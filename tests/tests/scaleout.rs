//! Several lb nodes behind an ECMP router, their VIPs announced over BGP by BIRD (see
//! `lb_tests::ecmp`): flows that survive a node's loss and return, announcements that follow
//! the backends and the agent's life, identical tables on every node, and what breaks when a
//! node change meets a backend change or NAT.
//!
//! The tests take turns (one lab at a time): each runs a dozen namespaces, three agents, four
//! routing daemons and up to 200 streams, and the timing they measure means little on a machine
//! running several such labs at once.

use std::{
    collections::BTreeSet,
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use lb_tests::ecmp::{
    Conn, Ecmp, NAT_VIP4, VIP4, VIP6, carrier_of_each, dsr_vip, nat_vip, node_config,
    per_node, wait_progress,
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

/// How long the router may take to see a node go: BFD's 5 x 100 ms, plus the update.
const DETECT: Duration = Duration::from_secs(3);
/// How long a node's announcement may take to reach the router once it is made: the BGP
/// session may have to be set up again first (connect retry and error wait timers).
const ANNOUNCE: Duration = Duration::from_secs(30);

fn dsr_vips(backends: &[usize]) -> String {
    dsr_vip(VIP4, backends, 1) + &dsr_vip(VIP6, backends, 1)
}

fn lab(vips: impl Fn(usize) -> String) -> Ecmp {
    let lab = Ecmp::new(Path::new(BIN), 3, vips);
    for vip in [VIP4, VIP6] {
        lab.wait_nexthops(vip, &[0, 1, 2], ANNOUNCE);
    }
    lab
}

/// Every stream's outcome, by index; panics listing the broken ones.
fn finish_all(conns: Vec<Conn>) {
    let broken: Vec<String> = conns
        .into_iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let local = c.local;
            c.finish().map(|e| format!("#{i} {local}: {e}"))
        })
        .collect();
    assert!(broken.is_empty(), "{} broken: {broken:#?}", broken.len());
}

#[test]
fn dsr_streams_survive_a_node_leaving_and_a_fresh_node_joining() {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = lab(|_| dsr_vips(&[0, 1, 2]));
    let mut conns = lab.streams(VIP4, 80, 100);
    conns.extend(lab.streams(VIP6, 80, 100));
    let none = BTreeSet::new();
    let behind = wait_progress(&conns, 3, &none, Duration::from_secs(20));
    assert!(behind.is_empty(), "streams not flowing: {behind:?}");
    let before = carrier_of_each(&lab, &conns);
    let spread = per_node(&before, 3);
    assert!(
        spread.values().all(|n| *n > 0),
        "ECMP should spread 200 connections over the 3 nodes: {spread:?}"
    );

    // n3 leaves: its link on the router goes down.
    lab.set_link(2, false);
    let gone4 = lab.wait_nexthops(VIP4, &[0, 1], DETECT);
    let gone6 = lab.wait_nexthops(VIP6, &[0, 1], DETECT);
    let behind = wait_progress(&conns, 10, &none, Duration::from_secs(30));
    assert!(
        behind.is_empty(),
        "streams stuck or broken after n3 left: {:?}",
        behind.iter().map(|i| conns[*i].local).collect::<Vec<_>>()
    );
    let moved: Vec<usize> = (0..conns.len()).filter(|i| before[*i] == 2).collect();
    for i in &moved {
        let now = lab.carriers(&conns[*i]);
        assert!(
            now.iter().any(|n| *n != 2),
            "{} was n3's and no other node holds it: {now:?}",
            conns[*i].local
        );
    }

    // n3 comes back as a fresh node: maps removed and made anew, so every flow ECMP gives it
    // is one it never saw, and it must pick the backend from its table alone.
    lab.nodes[2].agent.take().expect("n3's agent").stop();
    lab.nodes[2].down();
    lab.nodes[2].start_agent();
    lab.set_link(2, true);
    let back4 = lab.wait_nexthops(VIP4, &[0, 1, 2], ANNOUNCE);
    let back6 = lab.wait_nexthops(VIP6, &[0, 1, 2], ANNOUNCE);
    let behind = wait_progress(&conns, 10, &none, Duration::from_secs(30));
    assert!(
        behind.is_empty(),
        "streams stuck or broken after n3 came back: {:?}",
        behind.iter().map(|i| conns[*i].local).collect::<Vec<_>>()
    );
    let n3 = lab.nodes[2].pinned();
    let on_fresh_n3 = conns
        .iter()
        .filter(|c| n3.flow(&c.flow_key()).is_some())
        .count();
    assert!(
        on_fresh_n3 > 0,
        "ECMP gave the fresh n3 none of the 200 connections"
    );
    eprintln!(
        "spread {spread:?}; n3 left: withdrawn in {gone4:?} (v4) {gone6:?} (v6), {} streams moved; \
         fresh n3 announced in {back4:?} (v4) {back6:?} (v6) and took {on_fresh_n3} streams it never saw",
        moved.len()
    );
    finish_all(conns);
}
