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

use lb_tests::agent::metric;
use lb_tests::ecmp::{
    Conn, Ecmp, NAT_VIP4, VIP4, VIP6, carrier_of_each, dsr_vip, moved_since, nat_vip, node_config,
    per_node, wait_progress,
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

/// How long the router may take to see a node go: BFD's 5 x 100 ms, plus the update.
const DETECT: Duration = Duration::from_secs(3);
/// How long a node's announcement may take to reach the router once it is made: the BGP
/// session may have to be set up again first (connect retry and error wait timers).
const ANNOUNCE: Duration = Duration::from_secs(30);
/// Where a node serves /metrics (in its own namespace).
const METRICS: &str = "127.0.0.1:9435";

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
    // Hash-threshold multipath moves n3's flows, and some between n1 and n2 too.
    let moved = moved_since(&lab, &conns, &before);
    let of_n3: BTreeSet<usize> = (0..conns.len()).filter(|i| before[*i] == 2).collect();
    assert!(
        of_n3.is_subset(&moved),
        "n3's streams that no other node took: {:?}",
        of_n3.difference(&moved).collect::<Vec<_>>()
    );
    let of_n3 = of_n3.len();

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
        "spread {spread:?}; n3 left: withdrawn in {gone4:?} (v4) {gone6:?} (v6), {} streams \
         changed node ({} of them n3's); fresh n3 announced in {back4:?} (v4) {back6:?} (v6) \
         and took {on_fresh_n3} streams it never saw",
        moved.len(),
        of_n3
    );
    finish_all(conns);
}

/// What `lb status -o json` says the node announces (in the node's namespace).
fn status_announced(n: &lb_tests::ecmp::Node) -> Vec<String> {
    let out = n.dirs.cli_in(&n.ns, &["status", "-o", "json"]);
    assert!(
        out.status.success(),
        "lb status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("lb status -o json");
    assert_eq!(v["announce"]["table"], 100, "{v}");
    v["announce"]["announced"]
        .as_array()
        .unwrap_or_else(|| panic!("no announce in lb status: {v}"))
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// Within the timers: the router sees the change within [`DETECT`] of the config's save.
#[test]
fn a_node_whose_backends_are_all_gone_withdraws_its_vips_and_announces_them_again() {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = lab(|_| dsr_vips(&[0, 1, 2]));
    // n2 serves metrics too (a restart: the listener is read at start).
    let with_metrics = |vips: &str| {
        node_config(1, vips).replace("node:\n", &format!("node:\n  metrics_listen: {METRICS}\n"))
    };
    let n2 = &mut lab.nodes[1];
    n2.dirs.write_config(&with_metrics(&dsr_vips(&[0, 1, 2])));
    n2.agent.take().unwrap().stop();
    n2.start_agent();
    let a = n2.agent.as_mut().unwrap();
    a.wait_metric(&n2.ns, METRICS, "lb_announced_vips", 2, DETECT);
    for vip in [VIP4, VIP6] {
        lab.wait_nexthops(vip, &[0, 1, 2], DETECT);
    }

    // n2's backends all go to weight 0 (as when every health check fails).
    let drained = dsr_vip(VIP4, &[0, 1, 2], 0) + &dsr_vip(VIP6, &[0, 1, 2], 0);
    lab.nodes[1].dirs.write_config(&with_metrics(&drained));
    let start = Instant::now();
    lab.wait_nexthops(VIP4, &[0, 2], DETECT);
    lab.wait_nexthops(VIP6, &[0, 2], DETECT);
    let withdrawn = start.elapsed();
    let n2 = &lab.nodes[1];
    assert_eq!(n2.table_routes(), BTreeSet::new());
    assert!(n2.announced().is_empty(), "{:?}", n2.announced());
    assert_eq!(metric(&n2.ns, METRICS, "lb_announced_vips"), Some(0));
    assert_eq!(status_announced(n2), Vec::<String>::new());
    assert_eq!(lab.nodes[0].table_routes().len(), 2, "n1 announces both");

    lab.nodes[1]
        .dirs
        .write_config(&with_metrics(&dsr_vips(&[0, 1, 2])));
    let start = Instant::now();
    lab.wait_nexthops(VIP4, &[0, 1, 2], DETECT);
    lab.wait_nexthops(VIP6, &[0, 1, 2], DETECT);
    let announced = start.elapsed();
    let want: BTreeSet<std::net::IpAddr> = [VIP4, VIP6].map(|a| a.parse().unwrap()).into();
    let n2 = &mut lab.nodes[1];
    assert_eq!(n2.table_routes(), want);
    assert_eq!(n2.announced().into_iter().collect::<BTreeSet<_>>(), want);
    let a = n2.agent.as_mut().unwrap();
    a.wait_metric(&n2.ns, METRICS, "lb_announced_vips", 2, DETECT);
    assert_eq!(status_announced(n2), [VIP4, VIP6]);
    eprintln!(
        "config saved to router updated (file watch + reload + BGP): withdrawn in {withdrawn:?}, \
         announced in {announced:?}"
    );
}

#[test]
fn sigterm_and_lb_down_withdraw_a_nodes_vips_and_kill_9_leaves_them_announced() {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = lab(|_| dsr_vips(&[0, 1, 2]));
    let both: BTreeSet<std::net::IpAddr> = [VIP4, VIP6].map(|a| a.parse().unwrap()).into();
    let n1 = &mut lab.nodes[0];

    // kill -9: the data plane keeps serving, and the routes stay (nothing removes them).
    n1.agent.take().unwrap().kill9();
    assert_eq!(n1.table_routes(), both);
    // A new agent adopts them (and keeps them: the maps still give the VIPs backends).
    n1.start_agent();
    // Its event loop runs: its announcer has started, over what the first one left.
    n1.agent
        .as_mut()
        .unwrap()
        .wait_running(&n1.ns, &n1.dirs, Duration::from_secs(5));
    assert_eq!(n1.table_routes(), both);
    for vip in [VIP4, VIP6] {
        assert_eq!(lab.nexthops(vip), lab.node_addrs(vip, &[0, 1, 2]));
    }

    // SIGTERM: withdrawn before the agent exits.
    let status = lab.nodes[0].agent.take().unwrap().stop();
    assert!(status.success(), "the agent exited with {status}");
    assert_eq!(lab.nodes[0].table_routes(), BTreeSet::new());
    for vip in [VIP4, VIP6] {
        lab.wait_nexthops(vip, &[1, 2], DETECT);
    }

    // Back, then killed and taken down with `lb down`.
    lab.nodes[0].start_agent();
    for vip in [VIP4, VIP6] {
        lab.wait_nexthops(vip, &[0, 1, 2], DETECT);
    }
    lab.nodes[0].agent.take().unwrap().kill9();
    let done = lab.nodes[0].down();
    assert!(
        done.iter().any(|d| d.starts_with("withdrew 192.0.2.10")),
        "lb down: {done:?}"
    );
    assert_eq!(lab.nodes[0].table_routes(), BTreeSet::new());
    for vip in [VIP4, VIP6] {
        lab.wait_nexthops(vip, &[1, 2], DETECT);
    }
}

#[test]
fn an_agent_started_without_node_announce_withdraws_what_the_previous_one_announced() {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = lab(|_| dsr_vips(&[0, 1, 2]));
    let n1 = &mut lab.nodes[0];
    n1.agent.take().unwrap().kill9();
    assert_eq!(n1.table_routes().len(), 2, "kill -9 leaves the routes");
    let without = node_config(0, &dsr_vips(&[0, 1, 2])).replace("  announce: { table: 100 }\n", "");
    assert!(!without.contains("announce"), "{without}");
    n1.dirs.write_config(&without);
    n1.start_agent();
    for vip in [VIP4, VIP6] {
        lab.wait_nexthops(vip, &[1, 2], DETECT);
    }
    assert_eq!(lab.nodes[0].table_routes(), BTreeSet::new());
    assert_eq!(
        lb_userspace::status::file::read_status(&lab.nodes[0].dirs.state).map(|s| s.announce),
        Some(None),
        "the status says announcement is off"
    );
}

#[test]
fn dsr_streams_survive_a_nodes_routing_daemon_being_killed() {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = lab(|_| dsr_vips(&[0, 1, 2]));
    let mut conns = lab.streams(VIP4, 80, 60);
    conns.extend(lab.streams(VIP6, 80, 60));
    let none = BTreeSet::new();
    assert!(wait_progress(&conns, 3, &none, Duration::from_secs(20)).is_empty());
    let spread = per_node(&carrier_of_each(&lab, &conns), 3);
    assert!(spread[&1] > 0, "n2 carries none of 120: {spread:?}");
    lab.nodes[1].bird.as_mut().unwrap().kill9();
    let gone = lab.wait_nexthops(VIP4, &[0, 2], DETECT);
    lab.wait_nexthops(VIP6, &[0, 2], DETECT);
    let behind = wait_progress(&conns, 10, &none, Duration::from_secs(30));
    assert!(behind.is_empty(), "stuck or broken: {behind:?}");
    eprintln!(
        "n2's BIRD killed: the router dropped it in {gone:?}; {} streams moved",
        spread[&1]
    );
    finish_all(conns);
}

#[test]
fn every_node_holds_the_same_maglev_tables_in_its_pinned_maps() {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Weights that differ per backend; each node lists the backends in another order.
    let vips = |i: usize| {
        let order = [[0, 1, 2], [2, 0, 1], [1, 2, 0]][i];
        let mut y = String::new();
        for vip in [VIP4, VIP6] {
            let entries: Vec<String> = order
                .iter()
                .map(|b| {
                    let (_, a4, a6) = lb_tests::dc::BACKENDS[*b];
                    let a = if vip.contains(':') { a6 } else { a4 };
                    format!("{{ address: {a}, weight: {} }}", [100, 200, 300][*b])
                })
                .collect();
            y.push_str(&format!(
                "  - {{ address: \"{vip}\", port: 80, protocol: tcp, backends: [{}] }}\n",
                entries.join(", ")
            ));
        }
        y
    };
    let lab = lab(vips);
    for vip in [VIP4, VIP6] {
        let rings: Vec<_> = (0..3).map(|i| lab.ring(i, vip)).collect();
        let mut count = std::collections::BTreeMap::new();
        for b in &rings[0] {
            *count.entry(*b).or_insert(0usize) += 1;
        }
        assert!(
            !count.contains_key(&None),
            "{vip}: empty slots in n1's table"
        );
        assert_eq!(
            count.len(),
            3,
            "{vip}: n1's table does not hold all three backends"
        );
        for (i, r) in rings.iter().enumerate().skip(1) {
            let differ = r.iter().zip(&rings[0]).filter(|(a, b)| a != b).count();
            assert_eq!(
                differ,
                0,
                "{vip}: n{}'s table differs from n1's in {differ} of {} slots",
                i + 1,
                r.len()
            );
            assert_eq!(r.len(), rings[0].len());
        }
    }
}

/// Measures (and reports) what a backend change just before a node change breaks: the flows
/// ECMP then moves land on nodes that never saw them, whose table has changed since the
/// connections started.
#[test]
fn a_backend_added_before_a_node_leaves_breaks_only_streams_that_changed_node() {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = lab(|_| dsr_vips(&[0, 1]));
    let mut conns = lab.streams(VIP4, 80, 100);
    conns.extend(lab.streams(VIP6, 80, 100));
    let none = BTreeSet::new();
    assert!(wait_progress(&conns, 3, &none, Duration::from_secs(20)).is_empty());
    let before = carrier_of_each(&lab, &conns);
    let ring_before = lab.ring(0, VIP4);

    // b3 joins the VIPs on every node (established flows keep their backends: each node
    // follows its flow entries), then n3 leaves.
    for i in 0..3 {
        lab.nodes[i]
            .dirs
            .write_config(&node_config(i, &dsr_vips(&[0, 1, 2])));
    }
    for n in &mut lab.nodes {
        n.agent
            .as_mut()
            .unwrap()
            .wait_applied(&n.ns, &n.dirs, 1, Duration::from_secs(20));
    }
    assert!(
        wait_progress(&conns, 3, &none, Duration::from_secs(20)).is_empty(),
        "a stream broke on the backend change alone"
    );
    lab.set_link(2, false);
    lab.wait_nexthops(VIP4, &[0, 1], DETECT);
    lab.wait_nexthops(VIP6, &[0, 1], DETECT);
    let ring_after = lab.ring(0, VIP4);
    let share = ring_before
        .iter()
        .zip(&ring_after)
        .filter(|(a, b)| a != b)
        .count() as f64
        / ring_after.len() as f64;
    // Moved streams whose slot changed reach b3, which answers with a RST.
    let behind = wait_progress(&conns, 10, &none, Duration::from_secs(20));
    let broken: BTreeSet<usize> = behind
        .iter()
        .copied()
        .filter(|i| conns[*i].ended())
        .collect();
    let stalled: Vec<usize> = behind.difference(&broken).copied().collect();
    assert!(
        stalled.is_empty(),
        "streams neither flowing nor ended: {stalled:?}"
    );
    let moved = moved_since(&lab, &conns, &before);
    let stayed_broken: Vec<usize> = broken.difference(&moved).copied().collect();
    assert!(
        stayed_broken.is_empty(),
        "streams that stayed on their node (pinned by its flow entry) broke: {stayed_broken:?}"
    );
    let of_n3 = before.iter().filter(|n| **n == 2).count();
    eprintln!(
        "MEASURED: backend added, then n3 left: {} of {} streams broke, all among the {} that \
         changed node ({of_n3} of them n3's, the rest moved between n1 and n2 by the rehash); \
         {:.1}% of the table's slots changed (expected ~{:.0} broken)",
        broken.len(),
        conns.len(),
        moved.len(),
        share * 100.0,
        moved.len() as f64 * share
    );
    for c in conns {
        c.finish();
    }
}

/// Measures (and reports) what happens to NAT flows when ECMP moves them: the translation
/// lives on the node that made it, and no other node can continue it.
#[test]
fn nat_streams_that_ecmp_moves_to_another_node_break_and_the_others_flow_on() {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab(|_| dsr_vips(&[0, 1, 2]) + &nat_vip());
    lab.wait_nexthops(NAT_VIP4, &[0, 1, 2], ANNOUNCE);
    let conns = lab.streams(NAT_VIP4, 80, 100);
    let none = BTreeSet::new();
    assert!(wait_progress(&conns, 3, &none, Duration::from_secs(20)).is_empty());
    let before = carrier_of_each(&lab, &conns);
    assert!(before.contains(&2), "n3 translated none of 100 connections");

    lab.set_link(2, false);
    lab.wait_nexthops(NAT_VIP4, &[0, 1], DETECT);
    // Long enough for every stream to flow on or to have tried another node.
    let behind = wait_progress(&conns, 10, &BTreeSet::new(), Duration::from_secs(10));
    let moved = moved_since(&lab, &conns, &before);
    let of_n3: BTreeSet<usize> = (0..conns.len()).filter(|i| before[*i] == 2).collect();
    let lost: BTreeSet<usize> = moved.union(&of_n3).copied().collect();
    let kept_but_stuck: Vec<usize> = behind.difference(&lost).copied().collect();
    assert!(
        kept_but_stuck.is_empty(),
        "NAT streams that kept their node stuck or broken: {kept_but_stuck:?}"
    );
    let moved = lost;
    // The moved ones: none may make progress over a further window (or they have ended).
    let mid: Vec<u64> = conns.iter().map(Conn::exchanged).collect();
    std::thread::sleep(Duration::from_secs(3));
    let went_on: Vec<usize> = moved
        .iter()
        .copied()
        .filter(|i| conns[*i].exchanged() > mid[*i])
        .collect();
    let ended = moved.iter().filter(|i| conns[**i].ended()).count();
    assert!(
        went_on.is_empty(),
        "NAT streams went on through a node that did not translate them: {went_on:?}"
    );
    eprintln!(
        "MEASURED: NAT: n3 left: all {} streams that changed node stopped ({} of them n3's; \
         {ended} ended with an error, {} stalled); the other {} flowed on",
        moved.len(),
        before.iter().filter(|n| **n == 2).count(),
        moved.len() - ended,
        conns.len() - moved.len()
    );
    for c in conns {
        c.finish();
    }
}
