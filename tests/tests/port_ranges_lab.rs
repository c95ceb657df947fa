//! Port-range VIPs end to end: the real agent in the lab of [`lb_tests::dc`], a NAT VIP with
//! `port_range: 10000-10999` in front of plain TCP servers on the backends' own addresses. Real
//! connections to three ports of the range reach the same port of a backend; an exact VIP
//! inside the range keeps its own port; a port just outside the range is not balanced (the
//! connection fails, though every backend listens there too). The same with a DSR range VIP
//! (servers on every address of the backends, the VIP on their loopback). The inspecting commands name the
//! range VIP by its range; a rollback to 0.2.0 unpins `LB_VIP_RANGES` and the next start
//! creates it again.

use std::{net::SocketAddr, path::Path, time::Duration};

use lb_tests::{
    agent::{Agent, Dirs},
    dc::{Lab, NatServers, client_v4, lab_config, vip_yaml},
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);
const VIP: &str = "192.0.2.20";
/// The ports of the range the test connects to, and the port just past it.
const INSIDE: [u16; 3] = [10000, 10500, 10999];
const OUTSIDE: u16 = 11000;
/// The exact VIP inside the range, and its backends' port.
const EXACT: u16 = 10080;
const EXACT_BACKEND_PORT: u16 = 9000;

fn sa(port: u16) -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), port)
}

/// The range VIP (NAT, no backend port: each connection keeps its port) and the exact one.
fn config() -> String {
    let backends = [(0, 1), (1, 1), (2, 1)];
    let range = vip_yaml(VIP, 0, "tcp", "    mode: nat\n", &backends, false, None)
        .replace("    port: 0\n", "    port_range: 10000-10999\n");
    let exact = vip_yaml(
        VIP,
        EXACT,
        "tcp",
        "",
        &backends,
        false,
        Some(EXACT_BACKEND_PORT),
    );
    lab_config("", &format!("{range}{exact}"))
}

#[test]
fn a_nat_port_range_vip_serves_three_ports_of_its_range_on_the_same_backend_port_and_not_one_outside()
 {
    let lab = Lab::new();
    // Every backend answers "<name>:<port>" on each port the test uses, the one outside too.
    let ports = INSIDE
        .into_iter()
        .chain([OUTSIDE, EXACT_BACKEND_PORT])
        .collect::<Vec<_>>();
    let _servers: Vec<NatServers> = ports
        .iter()
        .map(|p| NatServers::start_as(&lab, *p, &format!(":{p}"), false))
        .collect();
    let dirs = Dirs::new(Path::new(BIN), "nat-range");
    dirs.write_config(&config());
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_running(&lab.lb, &dirs, T);

    for port in INSIDE {
        for c in 0..4 {
            let answer = lab
                .connect(client_v4(c), sa(port))
                .unwrap_or_else(|e| panic!("client {c} to port {port} of the range: {e}"));
            assert!(
                answer.ends_with(&format!(":{port}")) && answer.starts_with('b'),
                "port {port} reached {answer:?}, not the same port of a backend"
            );
        }
    }
    let exact = lab
        .connect(client_v4(0), sa(EXACT))
        .expect("the exact VIP inside the range");
    assert!(
        exact.ends_with(&format!(":{EXACT_BACKEND_PORT}")),
        "the exact VIP's connection went to {exact:?}"
    );
    let outside = lab.connect(client_v4(0), sa(OUTSIDE));
    assert!(
        outside.is_err(),
        "port {OUTSIDE}, outside the range, was answered: {outside:?}"
    );
    assert_eq!(agent.stop().code(), Some(0));
}

/// The lab with the range VIP's servers on the ports the test uses, and the agent running.
fn serving(tag: &str) -> (Lab, Vec<NatServers>, Dirs, Agent) {
    let lab = Lab::new();
    let servers = INSIDE
        .into_iter()
        .chain([OUTSIDE, EXACT_BACKEND_PORT])
        .map(|p| NatServers::start_as(&lab, p, &format!(":{p}"), false))
        .collect();
    let dirs = Dirs::new(Path::new(BIN), tag);
    dirs.write_config(&config());
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_running(&lab.lb, &dirs, T);
    (lab, servers, dirs, agent)
}

const RANGE_LABEL: &str = "192.0.2.20:10000-10999/tcp";

/// `lb status -o json`, run in the load balancer's namespace (it looks at the interfaces).
fn status(lab: &Lab, dirs: &Dirs) -> serde_json::Value {
    let out = dirs.cli_in(&lab.lb, &["status", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("lb status -o json")
}

#[test]
fn backends_and_explain_name_the_range_vip_by_its_range_and_status_counts_it() {
    let (lab, _servers, dirs, mut agent) = serving("range-show");
    let backends = dirs.json(&["backends"]);
    let labels: Vec<&str> = backends
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vip"]["label"].as_str().unwrap())
        .collect();
    assert!(
        labels.contains(&RANGE_LABEL) && labels.contains(&"192.0.2.20:10080/tcp"),
        "{labels:?}"
    );
    // lb status counts VIPs: the range VIP is one of the two.
    let status = status(&lab, &dirs);
    assert_eq!(status["maps"]["vips"], 2, "{status}");
    // A packet to a port of the range: matched by the range after the exact lookup missed.
    let e = dirs.json(&[
        "explain",
        "198.51.100.7:40000",
        "192.0.2.20:10500",
        "tcp",
        "--syn",
    ]);
    assert_eq!(e["vip"]["label"], RANGE_LABEL, "{e}");
    assert_eq!(e["by"], "maglev", "{e}");
    let steps = e["steps"].to_string();
    assert!(steps.contains("is in the port range of"), "{steps}");
    // The exact VIP inside the range is its own; a port outside passes.
    let e = dirs.json(&[
        "explain",
        "198.51.100.7:40000",
        "192.0.2.20:10080",
        "tcp",
        "--syn",
    ]);
    assert_eq!(e["vip"]["label"], "192.0.2.20:10080/tcp", "{e}");
    let e = dirs.json(&[
        "explain",
        "198.51.100.7:40000",
        "192.0.2.20:11000",
        "tcp",
        "--syn",
    ]);
    assert_eq!(e["verdict"], "pass", "{e}");
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn a_rollback_to_0_2_0_unpins_the_port_ranges_and_the_next_start_creates_and_serves_them() {
    let (lab, _servers, dirs, mut agent) = serving("range-rollback");
    assert_eq!(agent.stop().code(), Some(0));
    let has = |name: &str| dirs.pin_names().iter().any(|n| n == name);
    assert!(has("LB_VIP_RANGES"), "{:?}", dirs.pin_names());
    let out = dirs.cli(&["migrate", "--to-release", "0.2.0"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("removed LB_VIP_RANGES"), "{said}");
    assert!(!has("LB_VIP_RANGES"), "{:?}", dirs.pin_names());

    // Up again: this build's agent on what 0.2.0 reads.
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_running(&lab.lb, &dirs, T);
    let status = status(&lab, &dirs);
    let maps = status["agent"]["last_migration"]["maps"]
        .as_array()
        .unwrap_or_else(|| panic!("no migration in {status}"));
    let ranges = maps
        .iter()
        .find(|m| m["map"] == "LB_VIP_RANGES")
        .unwrap_or_else(|| panic!("LB_VIP_RANGES not in {maps:?}"));
    assert_eq!(ranges["action"], "created", "{ranges}");
    let answer = lab
        .connect(client_v4(0), sa(10500))
        .expect("the range served after the upgrade");
    assert!(answer.ends_with(":10500"), "{answer}");
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn a_dsr_port_range_vip_serves_three_ports_of_its_range_and_not_one_outside() {
    let lab = Lab::new();
    // DSR backends answer from the VIP on their loopback: servers on every address.
    let _servers: Vec<NatServers> = INSIDE
        .into_iter()
        .chain([OUTSIDE])
        .map(|p| NatServers::start_as(&lab, p, &format!(":{p}"), true))
        .collect();
    let dsr_vip = "192.0.2.30";
    let backends = [(0, 1), (1, 1), (2, 1)];
    let range = vip_yaml(dsr_vip, 0, "tcp", "", &backends, false, None)
        .replace("    port: 0\n", "    port_range: 10000-10999\n");
    let dirs = Dirs::new(Path::new(BIN), "dsr-range");
    dirs.write_config(&lab_config("", &range));
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_running(&lab.lb, &dirs, T);
    let at = |port| SocketAddr::new(dsr_vip.parse().unwrap(), port);
    for port in INSIDE {
        for c in 0..4 {
            let answer = lab
                .connect(client_v4(c), at(port))
                .unwrap_or_else(|e| panic!("client {c} to port {port} of the range: {e}"));
            assert!(
                answer.ends_with(&format!(":{port}")) && answer.starts_with('b'),
                "port {port} reached {answer:?}"
            );
        }
    }
    let outside = lab.connect(client_v4(0), at(OUTSIDE));
    assert!(outside.is_err(), "port {OUTSIDE} was answered: {outside:?}");
    assert_eq!(agent.stop().code(), Some(0));
}
