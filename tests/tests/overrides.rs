//! `lb drain`, `lb undrain` and `lb weight` of the real binary on a real agent (`lb run` in a
//! namespace): frames run through the program on the agent's pinned maps show where established
//! and new flows go (read off their outer headers), and the status file, `lb status` and
//! `lb backends` what the agent says of the override.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{Agent, Dirs, metrics_text},
    config::{RawConfig, RawNode, backend, lab_node, some, vip, weighted, yaml},
    harness::{FibNet, Lb, XDP_TX, action_name, net::*},
    packet::{L4, Pkt, TCP_ACK},
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);
const WEB: &str = "192.0.2.10";
const LABEL: &str = "192.0.2.10:80/tcp";
const METRICS: &str = "127.0.0.1:19436";

/// One DSR VIP `web` on two backends, the second of `weight_b` (the default 100 when None).
fn config(weight_b: Option<u32>) -> String {
    let b = match weight_b {
        Some(w) => weighted(TX_V4_B, w),
        None => backend(TX_V4_B),
    };
    yaml(&RawConfig {
        node: RawNode {
            source_v4: some(NODE_V4),
            source_v6: None,
            max_vips: Some(4),
            max_backends: Some(8),
            metrics_listen: some(METRICS),
            ..lab_node(&["lb0"])
        },
        vips: vec![vip("web", WEB, 80, "tcp", &[backend(TX_V4), b])],
    })
}

struct Setup {
    // Dropped in this order: the agent stops before its dirs are removed (else it writes its
    // status file into a state dir made anew), then the network goes.
    agent: Agent,
    dirs: Dirs,
    net: FibNet,
}

fn start(tag: &str) -> Setup {
    let net = FibNet::new(tag);
    let dirs = Dirs::new(Path::new(BIN), tag);
    dirs.write_config(&config(None));
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_serving(&net.ns, &dirs, T);
    Setup { net, dirs, agent }
}

/// A client's packet to the VIP: a SYN (a new flow), or an ACK of an established one.
fn packet(client: u32, syn: bool) -> Pkt {
    let src = format!("198.51.{}.{}", 100 + client / 200, 1 + client % 200);
    let p = Pkt::tcp(&src, 20000 + (client % 1000) as u16, WEB, 80, LB0_MAC);
    if syn {
        p
    } else {
        p.with(|p| p.l4 = L4::Tcp { flags: TCP_ACK })
    }
}

/// The backend each client's packet goes to: the outer IPv4 destination of the frame.
fn backends_of(s: &Setup, clients: std::ops::Range<u32>, syn: bool) -> BTreeMap<u32, String> {
    s.net.ns.run(|| {
        let mut lb = Lb::adopt(&s.dirs.pins);
        clients
            .map(|c| {
                let r = lb.run(&packet(c, syn).frame(), s.net.lb0);
                assert_eq!(action_name(r.action), action_name(XDP_TX));
                let dst = <[u8; 4]>::try_from(&r.output[30..34]).unwrap();
                (c, IpAddr::from(dst).to_string())
            })
            .collect()
    })
}

fn count(on: &BTreeMap<u32, String>, backend: &str) -> usize {
    on.values().filter(|b| *b == backend).count()
}

/// `lb ARGS`: its stdout; panics naming stderr unless it exits 0.
fn lb(s: &Setup, args: &[&str]) -> String {
    let out = s.dirs.cli(args);
    assert!(
        out.status.success(),
        "lb {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `lb backends -o json`: the row of `backend` under the VIP.
fn backend_row(s: &Setup, backend: &str) -> Value {
    let v = s.dirs.json(&["backends"]);
    v[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["backend"]["address"] == backend)
        .unwrap_or_else(|| panic!("no row for {backend}: {v}"))
        .clone()
}

#[test]
fn a_drained_backend_keeps_its_flows_takes_no_new_one_and_undrain_brings_it_back() {
    let s = start("ov-drain");
    let before = backends_of(&s, 0..200, true);
    let on_b = count(&before, TX_V4_B);
    assert!(on_b > 40, "{TX_V4_B} got {on_b} of 200 new flows");

    let said = lb(&s, &["drain", "web", TX_V4_B]);
    assert!(said.contains("drained"), "{said}");
    let row = backend_row(&s, TX_V4_B);
    assert_eq!(row["weight"], 0, "{row}");
    assert_eq!(row["override"]["kind"], "drain", "{row}");
    assert_eq!(row["override"]["configured"], 100, "{row}");
    assert_eq!(row["slots"], 0, "{row}");
    // Established flows stay where they were; new clients all go to the other backend.
    assert_eq!(backends_of(&s, 0..200, false), before);
    let new = backends_of(&s, 1000..1200, true);
    assert_eq!(count(&new, TX_V4), 200, "{new:?}");

    lb(&s, &["undrain", LABEL, TX_V4_B]);
    let row = backend_row(&s, TX_V4_B);
    assert_eq!(
        (&row["weight"], &row["override"]),
        (&100.into(), &Value::Null)
    );
    // Equal weights again: the backend takes new flows as before the drain.
    let again = backends_of(&s, 2000..2200, true);
    let on_b = count(&again, TX_V4_B);
    assert!((40..=160).contains(&on_b), "{TX_V4_B} got {on_b} of 200");
}

#[test]
fn a_weight_override_survives_an_agent_restart() {
    let mut s = start("ov-restart");
    let said = lb(&s, &["weight", "web", TX_V4_B, "300"]);
    assert!(said.contains("weight 300 (configured 100)"), "{said}");
    assert_eq!(s.agent.stop().code(), Some(0));
    s.agent = Agent::start(&s.net.ns, &s.dirs);
    s.agent.wait_serving(&s.net.ns, &s.dirs, T);

    let row = backend_row(&s, TX_V4_B);
    assert_eq!(row["weight"], 300, "{row}");
    assert_eq!(row["override"]["kind"], "weight", "{row}");
    // Maglev gives each backend its weight's share of the slots, to a slot or so: 300 of 400.
    let share = row["share"].as_f64().unwrap();
    assert!((share - 0.75).abs() < 0.01, "{row}");
    let out = s.dirs.cli_in(&s.net.ns, &["status", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = &status["overrides"];
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{status}");
    assert_eq!(listed[0]["backend"], TX_V4_B, "{status}");
}

#[test]
fn a_config_that_gives_the_backend_another_weight_clears_its_override() {
    let s = start("ov-config");
    lb(&s, &["drain", "web", TX_V4_B]);
    s.dirs.write_config(&config(Some(50)));
    let deadline = Instant::now() + T;
    let row = loop {
        let row = backend_row(&s, TX_V4_B);
        if row["weight"] == 50 {
            break row;
        }
        assert!(
            Instant::now() < deadline,
            "the config was not applied: {row}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(row["override"], Value::Null, "{row}");
    assert!(
        !s.dirs.state.join("overrides.json").exists(),
        "the cleared override is gone from the agent's state"
    );
}

#[test]
fn a_drain_of_a_backend_the_vip_lacks_fails_naming_its_backends_and_changes_nothing() {
    let s = start("ov-unknown");
    let out = s.dirs.cli(&["drain", "web", "10.9.9.9"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{LABEL} has no backend 10.9.9.9 (its backends: {TX_V4}, {TX_V4_B})"
        )),
        "{err}"
    );
    let out = s.dirs.cli(&["drain", "nosuch", TX_V4_B]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no VIP named \"nosuch\" (the agent serves: web 192.0.2.10:80/tcp)"),
        "{err}"
    );
    assert!(!s.dirs.state.join("overrides.json").exists());
    assert_eq!(backend_row(&s, TX_V4_B)["override"], Value::Null);
}

#[test]
fn metrics_give_a_drained_backend_weight_0_and_each_vip_its_name_and_mode() {
    let s = start("ov-metrics");
    lb(&s, &["drain", "web", TX_V4_B]);
    let want = [
        format!(r#"lb_vip_info{{vip="{LABEL}",name="web",mode="dsr"}} 1"#),
        format!(r#"lb_backend_weight{{vip="{LABEL}",backend="{TX_V4}:80"}} 100"#),
        format!(r#"lb_backend_weight{{vip="{LABEL}",backend="{TX_V4_B}:80"}} 0"#),
        format!(r#"lb_backend_passive_out{{vip="{LABEL}",backend="{TX_V4_B}:80"}} 0"#),
    ];
    let deadline = Instant::now() + T;
    loop {
        let text = metrics_text(&s.net.ns, METRICS).unwrap_or_default();
        if want.iter().all(|w| text.lines().any(|l| l == w)) {
            break;
        }
        assert!(Instant::now() < deadline, "wants {want:#?} in:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
