//! Port-range VIPs end to end: the real agent in the lab of [`lb_tests::dc`], a NAT VIP with
//! `port_range: 10000-10999` in front of plain TCP servers on the backends' own addresses. Real
//! connections to three ports of the range reach the same port of a backend; an exact VIP
//! inside the range keeps its own port; a port just outside the range is not balanced (the
//! connection fails, though every backend listens there too).

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
