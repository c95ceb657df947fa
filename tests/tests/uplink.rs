//! Without `node.interfaces` the agent attaches to the interface of the default route, with the
//! real `lb` binary in a namespace: `lb check` says which it would take, `lb status` shows the
//! one taken; without a default route the start is refused.

use std::{path::Path, time::Duration};

use lb_tests::{
    agent::{Agent, Dirs, xdp_attachment},
    config::{RawNode, lab_node, node_yaml, some},
    harness::FibNet,
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);

/// A node on `interfaces` (none: as the Helm chart renders it with `node.interfaces: []`).
fn config(interfaces: &[&str]) -> String {
    node_yaml(RawNode {
        xdp_mode: some("generic"),
        source_v6: None,
        ..lab_node(interfaces)
    })
}

#[test]
fn without_interfaces_the_agent_attaches_to_the_default_routes_interface_and_status_shows_it() {
    lb_tests::require_root();
    let net = FibNet::new("uplink");
    // lb1 carries the default route, not lb0 (the first interface): the route decides.
    net.ns
        .ip(&["route", "add", "default", "via", "10.0.1.2", "dev", "lb1"]);
    let dirs = Dirs::new(Path::new(BIN), "uplink");
    dirs.write_config(&config(&[]));

    let check = dirs.cli_in(
        &net.ns,
        &["check", "--config", dirs.config_path().to_str().unwrap()],
    );
    let out = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(
        check.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok: node.interfaces: not set")
                && l.contains("attach to lb1,")
                && l.contains("IPv4 default route")),
        "lb check says what it would take: {out}"
    );

    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_running(&net.ns, &dirs, T);
    assert!(xdp_attachment(&net.ns, "lb1").is_some(), "attached to lb1");
    assert!(xdp_attachment(&net.ns, "lb0").is_none(), "not to lb0");
    let status = dirs.cli_in(&net.ns, &["status", "-o", "json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap_or_else(|e| {
        panic!(
            "lb status -o json: {e}: {}",
            String::from_utf8_lossy(&status.stderr)
        )
    });
    let shown: Vec<(&str, bool, bool)> = status["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap(),
                i["configured"].as_bool().unwrap(),
                i["attached"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(shown, [("lb1", true, true)], "{status:#}");
    assert!(agent.stop().success());
}

#[test]
fn without_interfaces_or_a_default_route_the_start_is_refused_and_nothing_is_pinned() {
    lb_tests::require_root();
    let net = FibNet::new("noroute");
    let dirs = Dirs::new(Path::new(BIN), "noroute");
    dirs.write_config(&config(&[]));
    let check = dirs.cli_in(
        &net.ns,
        &["check", "--config", dirs.config_path().to_str().unwrap()],
    );
    assert!(!check.status.success());
    assert!(
        String::from_utf8_lossy(&check.stdout)
            .contains("error: node.interfaces is not set and this host has no default route"),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let mut agent = Agent::start(&net.ns, &dirs);
    let status = agent.wait_exit(T).expect("the agent refuses to start");
    assert!(!status.success());
    assert!(dirs.pin_names().is_empty(), "{:?}", dirs.pin_names());
    for dev in ["lb0", "lb1", "lb2"] {
        assert!(xdp_attachment(&net.ns, dev).is_none(), "{dev}");
    }
}

/// An interface named as VLANs are (`lb0.100`; a veth here: this kernel has neither 8021q nor dummy):
/// bpffs refuses dots in pin names, so its link is pinned as `link-lb0:100`, and `lb status`
/// reads it back under the interface's own name.
#[test]
fn a_vlan_interface_is_attached_and_its_link_pinned_under_a_name_bpffs_takes() {
    lb_tests::require_root();
    let net = FibNet::new("vlan");
    net.ns.ip(&[
        "link", "add", "lb0.100", "type", "veth", "peer", "name", "pe100",
    ]);
    net.ns.ip(&["link", "set", "pe100", "up"]);
    net.ns.ip(&["link", "set", "lb0.100", "up"]);
    let dirs = Dirs::new(Path::new(BIN), "vlan");
    dirs.write_config(&config(&["lb0.100"]));
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_serving(&net.ns, &dirs, T);
    assert!(
        xdp_attachment(&net.ns, "lb0.100").is_some(),
        "attached to lb0.100"
    );
    assert!(
        dirs.pins.join("link-lb0:100").exists(),
        "{:?}",
        dirs.pin_names()
    );
    let status = dirs.cli_in(&net.ns, &["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&status.stderr)));
    let i = &v["interfaces"][0];
    assert_eq!(
        (i["name"].as_str(), i["attached"].as_bool()),
        (Some("lb0.100"), Some(true)),
        "{v:#}"
    );
    assert_eq!(agent.stop().code(), Some(0));
}
