//! Clients reuse their source ports: in the lab, one client opens a connection from each of the
//! same 3000 ports, round after round (each closed with an RST, so the port is free at once), while
//! a health check takes a backend out and brings it back. Flow entries outlive connections, so
//! only if a SYN is balanced afresh does health (and weight) reach ports the client used before.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{Agent, Dirs},
    dc::{Lab, NatServers, client_v4, errors, lab_config, share, vip_yaml},
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);
const PORTS: std::ops::Range<u16> = 20000..23000;
/// Where the health checks of the DSR VIP probe (a port the test opens and closes on each backend).
const HEALTH_PORT: u16 = 7000;
/// The NAT backends' port (their servers there also answer the health checks).
const NAT_PORT: u16 = 9000;

fn check(port: Option<u16>) -> String {
    let port = port.map_or(String::new(), |p| format!("port: {p}, "));
    format!(
        "    health_check: {{ type: tcp, {port}interval: 200ms, timeout: 200ms, healthy_threshold: 1, unhealthy_threshold: 1 }}\n"
    )
}

/// Polls `lb backends` until `backend` of the VIP at `vip` is `health` (and, out, holds no slot).
fn wait_health(dirs: &Dirs, vip: &str, backend: &str, health: &str) {
    let deadline = Instant::now() + T;
    loop {
        let v = dirs.json(&["backends"]);
        let row = v
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["vip"]["label"] == vip)
            .and_then(|x| {
                x["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|b| {
                        b["backend"]["address"]
                            .as_str()
                            .unwrap()
                            .starts_with(backend)
                    })
                    .cloned()
            });
        if let Some(r) = &row
            && r["health"] == health
            && (health == "healthy") == (r["slots"].as_u64() > Some(0))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{backend} never became {health}: {row:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Three rounds over the same ports: all in; b1 out (by its health check); b1 back.
fn rounds(
    lab: &Lab,
    dirs: &Dirs,
    vip: SocketAddr,
    set_down: impl Fn(bool),
) -> [BTreeMap<String, usize>; 3] {
    let client: IpAddr = client_v4(0);
    let label = format!("{vip}/tcp");
    let before = lab.tcp_tally_ports(client, PORTS, vip);
    set_down(true);
    wait_health(dirs, &label, "10.20.0.11", "unhealthy");
    let out = lab.tcp_tally_ports(client, PORTS, vip);
    set_down(false);
    wait_health(dirs, &label, "10.20.0.11", "healthy");
    let back = lab.tcp_tally_ports(client, PORTS, vip);
    eprintln!("{vip}: before {before:?}, b1 out {out:?}, b1 back {back:?}");
    [before, out, back]
}

fn assert_rounds(t: &[BTreeMap<String, usize>; 3]) {
    let [before, out, back] = t;
    assert_eq!(errors(before), 0, "all in: {before:?}");
    assert!(
        share(before, "b1") > 0.25,
        "b1 had too few ports to prove anything: {before:?}"
    );
    assert_eq!(
        out.get("b1"),
        None,
        "b1 got new connections while out: {out:?}"
    );
    assert_eq!(errors(out), 0, "b1 out: {out:?}");
    assert_eq!(errors(back), 0, "b1 back: {back:?}");
    let b1 = share(back, "b1");
    assert!(
        (b1 - 1.0 / 3.0).abs() <= 0.03,
        "b1 came back to {:.2} % of new connections (weight share 33.33 +- 3): {back:?}",
        b1 * 100.0
    );
}

#[test]
fn dsr_health_applies_to_new_connections_on_reused_ports() {
    let lab = Lab::new();
    let health = NatServers::start(&lab, HEALTH_PORT);
    let dirs = Dirs::new(Path::new(BIN), "reuse-dsr");
    let all = [(0, 1), (1, 1), (2, 1)];
    let vip = vip_yaml(
        "192.0.2.10",
        80,
        "tcp",
        &check(Some(HEALTH_PORT)),
        &all,
        false,
        None,
    );
    dirs.write_config(&lab_config("", &vip));
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_running(&lab.lb, &dirs, T);
    let t = rounds(&lab, &dirs, "192.0.2.10:80".parse().unwrap(), |down| {
        health.set_down("b1", down)
    });
    assert_rounds(&t);
}

#[test]
fn nat_health_applies_to_new_connections_on_reused_ports() {
    let lab = Lab::new();
    let servers = NatServers::start(&lab, NAT_PORT);
    let dirs = Dirs::new(Path::new(BIN), "reuse-nat");
    let all = [(0, 1), (1, 1), (2, 1)];
    let vip = vip_yaml(
        "192.0.2.20",
        80,
        "tcp",
        &check(None),
        &all,
        false,
        Some(NAT_PORT),
    );
    dirs.write_config(&lab_config("", &vip));
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_running(&lab.lb, &dirs, T);
    let t = rounds(&lab, &dirs, "192.0.2.20:80".parse().unwrap(), |down| {
        servers.set_down("b1", down)
    });
    assert_rounds(&t);
}
