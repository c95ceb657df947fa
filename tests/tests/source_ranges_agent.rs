//! Source ranges through the agent (`lb run` with a config file), checked on its pinned maps
//! with packets run through the program (`Lb::adopt`):
//!
//! - a reload that changes a VIP's ranges writes only the ranges: the flows of sources still
//!   allowed keep their entries and backends;
//! - the `LB_VIPS` schema change that source ranges bring (v1 -> v2, release 0.3.0), as an
//!   operator meets it: `lb migrate --to-release 0.2.0` leaves the pins as 0.2.0 reads them
//!   (`LB_VIPS` at v1, the source-ranges flag cleared, the maps 0.2.0 does not know unpinned),
//!   and an agent of this build started on such pins converts `LB_VIPS` up and serves the
//!   ranges again.

use std::{path::Path, time::Duration};

use lb_common::{Counter, VIP_F_SOURCE_RANGES, VipKey, VipValue};
use lb_tests::{
    agent::{Agent, Dirs},
    config::{RawConfig, RawNode, RawVip, backend, lab_node, strings, vip, yaml},
    harness::{FibNet, Lb, XDP_DROP, XDP_TX, action_name, net::*},
    packet::{L4, Pkt, TCP_ACK},
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);

/// VIP web, DSR, open to `ranges` only, with `backends`.
fn config(ranges: &[&str], backends: &[&str]) -> String {
    let web = RawVip {
        source_ranges: Some(strings(ranges)),
        ..vip(
            "web",
            "192.0.2.10",
            80,
            "tcp",
            &backends.iter().map(|b| backend(b)).collect::<Vec<_>>(),
        )
    };
    yaml(&RawConfig {
        node: RawNode {
            source_v6: None,
            ..lab_node(&["lb0"])
        },
        vips: vec![web],
    })
}

/// Runs a SYN from `src` through the program on the agent's pins: (action, drop_source_range
/// counted).
fn try_source(pins: &Path, ingress: u32, src: &str) -> (u32, u64) {
    let mut lb = Lb::adopt(pins);
    let before = lb.counters()[&Counter::DropSourceRange];
    let r = lb.run(
        &Pkt::tcp(src, 40000, "192.0.2.10", 80, LB0_MAC).frame(),
        ingress,
    );
    (r.action, lb.counters()[&Counter::DropSourceRange] - before)
}

/// The flags of the one VIP pinned under `pin` (a name in the pin dir).
fn vip_flags(pins: &Path, pin: &str) -> u32 {
    let data = aya::maps::MapData::from_pin(pins.join(pin)).unwrap();
    let map = aya::maps::Map::from_map_data(data).unwrap();
    let h: aya::maps::HashMap<_, VipKey, VipValue> = aya::maps::HashMap::try_from(map).unwrap();
    let vips: Vec<VipValue> = h.iter().map(|kv| kv.unwrap().1).collect();
    assert_eq!(vips.len(), 1);
    vips[0].flags
}

fn has(dirs: &Dirs, name: &str) -> bool {
    dirs.pin_names().iter().any(|n| n == name)
}

fn assert_ranges_served(dirs: &Dirs, ingress: u32) {
    let (a, n) = try_source(&dirs.pins, ingress, "203.0.113.7");
    assert_eq!((action_name(a), n), (action_name(XDP_DROP), 1));
    let (a, n) = try_source(&dirs.pins, ingress, "198.51.100.7");
    assert_eq!((action_name(a), n), (action_name(XDP_TX), 0));
}

#[test]
fn lb_vips_converts_down_for_0_2_0_and_an_agent_of_this_build_converts_it_back_up() {
    let net = FibNet::new("srcmig");
    let ingress = net.lb0;
    let dirs = Dirs::new(Path::new(BIN), "srcmig");
    dirs.write_config(&config(&["198.51.100.0/24"], &["10.1.0.1"]));
    let mut agent = Agent::start(&net.ns, &dirs);
    // The config file is watched before the agent's status says it serves.
    agent.wait_serving(&net.ns, &dirs, T);
    assert_eq!(agent.stop().code(), Some(0));
    assert!(
        has(&dirs, "LB_VIPS@v2") && !has(&dirs, "LB_VIPS"),
        "{:?}",
        dirs.pin_names()
    );
    assert!(has(&dirs, "LB_SRC_RANGES") && has(&dirs, "LB_VIP_DROPS"));
    assert_eq!(vip_flags(&dirs.pins, "LB_VIPS@v2"), VIP_F_SOURCE_RANGES);
    net.ns.run(|| assert_ranges_served(&dirs, ingress));

    // Down to what 0.2.0 reads.
    let out = dirs.cli(&["migrate", "--to-release", "0.2.0"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("converted LB_VIPS v2 -> v1 in place (1 entries changed)"),
        "{said}"
    );
    assert!(
        said.contains("removed LB_SRC_RANGES") && said.contains("removed LB_VIP_DROPS"),
        "{said}"
    );
    assert!(
        has(&dirs, "LB_VIPS") && !has(&dirs, "LB_VIPS@v2"),
        "{:?}",
        dirs.pin_names()
    );
    assert!(!has(&dirs, "LB_SRC_RANGES") && !has(&dirs, "LB_VIP_DROPS"));
    assert_eq!(
        vip_flags(&dirs.pins, "LB_VIPS"),
        0,
        "the flag 0.2.0 does not know"
    );
    let meta = lb_userspace::kernel::program::pinned_meta(&dirs.pins)
        .unwrap()
        .unwrap();
    assert_eq!(meta.version, 7, "pins 0.1.0 and 0.2.0 read");

    // Up again: this build's agent on LB_VIPS v1.
    let vips_id = lb_tests::agent::pinned_map_id(&dirs.pins, "LB_VIPS");
    let mut agent = Agent::start(&net.ns, &dirs);
    // The config file is watched before the agent's status says it serves.
    agent.wait_serving(&net.ns, &dirs, T);
    let out = dirs.cli_in(&net.ns, &["status", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &status["agent"]["last_migration"];
    let of = |map: &str| {
        m["maps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["map"] == map)
            .unwrap_or_else(|| panic!("{map} not in {m:#}"))
            .clone()
    };
    // v1's bytes are v2's: the same map, renamed (no copy).
    let vips = of("LB_VIPS");
    assert_eq!(vips["action"], "relabelled", "{m:#}");
    assert_eq!(
        (vips["from_schema"].as_u64(), vips["to_schema"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(of("LB_SRC_RANGES")["action"], "created", "{m:#}");
    assert_eq!(agent.stop().code(), Some(0));
    assert!(
        has(&dirs, "LB_VIPS@v2") && !has(&dirs, "LB_VIPS"),
        "{:?}",
        dirs.pin_names()
    );
    assert_eq!(vip_flags(&dirs.pins, "LB_VIPS@v2"), VIP_F_SOURCE_RANGES);
    assert_eq!(
        lb_tests::agent::pinned_map_id(&dirs.pins, "LB_VIPS@v2"),
        vips_id,
        "the same map"
    );
    let meta = lb_userspace::kernel::program::pinned_meta(&dirs.pins)
        .unwrap()
        .unwrap();
    assert_eq!(meta.version, 8, "pins 0.1.0 cannot read");
    net.ns.run(|| assert_ranges_served(&dirs, ingress));
}

/// A packet of the established flow of `src` (an ACK: it follows the flow entry).
fn ack(src: &str) -> Pkt {
    Pkt::tcp(src, 40000, "192.0.2.10", 80, LB0_MAC).with(|p| p.l4 = L4::Tcp { flags: TCP_ACK })
}

#[test]
fn a_reload_that_changes_the_ranges_keeps_the_flows_of_sources_still_allowed() {
    let net = FibNet::new("srcreload");
    let ingress = net.lb0;
    let dirs = Dirs::new(Path::new(BIN), "srcreload");
    // Two backends, so that a flow that kept its entry is told from one balanced afresh.
    let config = |ranges: &[&str]| config(ranges, &[TX_V4, TX_V4_B]);
    dirs.write_config(&config(&["198.51.100.0/24"]));
    let mut agent = Agent::start(&net.ns, &dirs);
    // The config file is watched before the agent's status says it serves.
    agent.wait_serving(&net.ns, &dirs, T);
    let clients: Vec<String> = (1..=20).map(|i| format!("198.51.100.{i}")).collect();
    let backends = |lb: &mut Lb| -> Vec<Vec<u8>> {
        clients
            .iter()
            .map(|c| {
                let r = lb.run(&ack(c).frame(), ingress);
                assert_eq!(action_name(r.action), action_name(XDP_TX), "{c}");
                r.output[30..34].to_vec() // the outer destination: the backend
            })
            .collect()
    };
    let before = net.ns.run(|| {
        let mut lb = Lb::adopt(&dirs.pins);
        for c in &clients {
            let r = lb.run(
                &Pkt::tcp(c, 40000, "192.0.2.10", 80, LB0_MAC).frame(),
                ingress,
            );
            assert_eq!(action_name(r.action), action_name(XDP_TX), "{c}");
        }
        assert_eq!(lb.flow_count(), clients.len());
        backends(&mut lb)
    });

    // Another range added: nothing else is written.
    dirs.write_config(&config(&["198.51.100.0/24", "203.0.113.0/24"]));
    agent.wait_status(&net.ns, &dirs, T, |v| {
        v["agent"]["reloads_applied"].as_u64() >= Some(1)
    });
    net.ns.run(|| {
        let mut lb = Lb::adopt(&dirs.pins);
        assert_eq!(lb.flow_count(), clients.len(), "the flows stay");
        let hits = lb.counters()[&Counter::FlowHits];
        assert_eq!(backends(&mut lb), before, "every flow keeps its backend");
        assert_eq!(
            lb.counters()[&Counter::FlowHits] - hits,
            clients.len() as u64,
            "every packet followed its flow entry"
        );
        let (a, n) = try_source(&dirs.pins, ingress, "203.0.113.7");
        assert_eq!(
            (action_name(a), n),
            (action_name(XDP_TX), 0),
            "the new range"
        );
    });

    // The first range taken away: its sources are refused from the next packet on, flows too.
    dirs.write_config(&config(&["203.0.113.0/24"]));
    agent.wait_status(&net.ns, &dirs, T, |v| {
        v["agent"]["reloads_applied"].as_u64() >= Some(2)
    });
    net.ns.run(|| {
        let mut lb = Lb::adopt(&dirs.pins);
        let before = lb.counters()[&Counter::DropSourceRange];
        let r = lb.run(&ack(&clients[0]).frame(), ingress);
        assert_eq!(action_name(r.action), action_name(XDP_DROP));
        assert_eq!(lb.counters()[&Counter::DropSourceRange] - before, 1);
    });
    assert_eq!(agent.stop().code(), Some(0));
}
