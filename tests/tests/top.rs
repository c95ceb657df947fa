//! `lb top` as people see it: the real binary in a pseudo-terminal (tmux), against a real agent
//! (`lb run` in a namespace) whose program is fed frames through its pinned maps. What the
//! screen must show is worked out from where those frames went (their outer header) and from
//! the weights in the config, not asked of lb.

use std::{collections::BTreeMap, net::IpAddr, path::Path, time::Duration};

use lb_tests::{
    agent::{Agent, Dirs},
    config::{RawBackend, RawConfig, RawNode, lab_node, vip, weighted, yaml},
    harness::{FibNet, Lb, XDP_TX, action_name, net::*},
    packet::Pkt,
    tmux::Tmux,
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);
const VIP: &str = "192.0.2.10";
/// The demo's weights: 200:100:100 (all three reached through lb0, XDP_TX).
const BACKENDS: [(&str, u32); 3] = [("10.1.0.1", 200), ("10.1.0.2", 100), ("10.1.0.3", 100)];
const FLOWS: u32 = 400;

fn config(backends: &[(&str, u32)]) -> String {
    let list: Vec<RawBackend> = backends.iter().map(|(a, w)| weighted(a, *w)).collect();
    yaml(&RawConfig {
        node: RawNode {
            source_v6: None,
            max_vips: Some(4),
            max_backends: Some(16),
            ..lab_node(&["lb0"])
        },
        vips: vec![vip("web", VIP, 80, "tcp", &list)],
    })
}

/// A new connection (SYN) from a client of its own.
fn syn(i: u32) -> Pkt {
    Pkt::tcp(
        &format!("198.51.{}.{}", 100 + i / 200, 1 + i % 200),
        20000 + (i % 1000) as u16,
        VIP,
        80,
        LB0_MAC,
    )
}

/// The agent running on `config(BACKENDS)`.
fn start(tag: &str) -> (FibNet, Dirs, Agent) {
    let net = FibNet::new(tag);
    let dirs = Dirs::new(Path::new(BIN), tag);
    dirs.write_config(&config(&BACKENDS));
    let mut agent = Agent::start(&net.ns, &dirs);
    // Its status file says it serves (a state, not a log line).
    agent.wait_serving(&net.ns, &dirs, T);
    (net, dirs, agent)
}

/// Sends `FLOWS` new connections through the program; returns how many went to each backend.
fn send_flows(net: &FibNet, dirs: &Dirs) -> BTreeMap<String, u32> {
    net.ns.run(|| {
        let mut lb = Lb::adopt(&dirs.pins);
        let mut got = BTreeMap::new();
        for i in 0..FLOWS {
            let run = lb.run(&syn(i).frame(), net.lb0);
            assert_eq!(action_name(run.action), action_name(XDP_TX));
            let to = IpAddr::from(<[u8; 4]>::try_from(&run.output[30..34]).unwrap());
            *got.entry(to.to_string()).or_insert(0) += 1;
        }
        got
    })
}

/// The percentages on `backend`'s line: its share of new flows, its weight share, its share
/// over the last interval.
fn shown_shares(screen: &str, backend: &str) -> Option<Vec<f64>> {
    let line = screen
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{backend}:80 ")))?;
    Some(
        line.split_whitespace()
            .filter_map(|w| w.strip_suffix('%')?.parse().ok())
            .collect(),
    )
}

/// The screen shows, for each backend, `flows` (its share of new flows, in percent) and its
/// weight share, each to within the screen's rounding.
fn shows(screen: &str, flows: &BTreeMap<&str, f64>, weights: &BTreeMap<&str, f64>) -> bool {
    flows.iter().all(|(b, want)| {
        shown_shares(screen, b).is_some_and(|s| {
            s.len() >= 2 && (s[0] - want).abs() <= 0.051 && (s[1] - weights[b]).abs() <= 0.051
        })
    })
}

fn weight_shares(backends: &[(&'static str, u32)]) -> BTreeMap<&'static str, f64> {
    let total: u32 = backends.iter().map(|(_, w)| w).sum();
    backends
        .iter()
        .map(|(b, w)| (*b, *w as f64 * 100.0 / total as f64))
        .collect()
}

#[test]
fn lb_top_in_a_terminal_shows_each_backends_share_of_new_flows_beside_its_weight_share_and_q_quits()
{
    let (net, dirs, mut agent) = start("top");
    let bin = dirs.bin.to_str().unwrap();
    let (pins, state) = (dirs.pins.to_str().unwrap(), dirs.state.to_str().unwrap());
    let top = Tmux::start(
        &[
            bin,
            "--pin-dir",
            pins,
            "--state-dir",
            state,
            "top",
            "--interval",
            "0.2",
        ],
        160,
        50,
    );
    // The first figures: lb top has taken its first reading, which the shares start from.
    let label = format!("{VIP}:80/tcp (web)");
    top.wait_screen(T, "the VIP", |s| s.lines().any(|l| l.starts_with(&label)));

    let got = send_flows(&net, &dirs);
    let flows: BTreeMap<&str, f64> = BACKENDS
        .iter()
        .map(|(b, _)| {
            (
                *b,
                got.get(*b).copied().unwrap_or(0) as f64 * 100.0 / FLOWS as f64,
            )
        })
        .collect();
    let weights = weight_shares(&BACKENDS);
    top.wait_screen(
        T,
        &format!("new flows {flows:?}, weights {weights:?}"),
        |s| shows(s, &flows, &weights),
    );

    top.keys("q");
    let start = std::time::Instant::now();
    while top.exit_status().is_none() {
        assert!(
            start.elapsed() < T,
            "lb top still runs after q ({}):\n{}",
            top.pane(),
            top.screen()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(top.exit_status(), Some(0), "lb top's exit status after q");
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn lb_top_once_shows_the_flows_still_pinned_to_a_backend_set_to_weight_0() {
    let (net, dirs, mut agent) = start("top-drain");
    let got = send_flows(&net, &dirs);
    let drained = BACKENDS[2].0;
    let left = [BACKENDS[0], BACKENDS[1], (drained, 0)];
    dirs.write_config(&config(&left));
    // Applied once the status file has the new weight.
    let start = std::time::Instant::now();
    while lb_userspace::status::file::read_status(&dirs.state).and_then(|s| {
        s.vips[0]
            .backends
            .iter()
            .find(|b| b.address == drained)
            .map(|b| b.weight)
    }) != Some(0)
    {
        assert!(
            start.elapsed() < T,
            "the agent did not apply weight 0 to {drained}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let out = dirs.cli(&["top", "--once", "--interval", "0.2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    // The line under a backend's: what it still holds if it drains.
    let under = |b: &str| {
        let mut lines = text
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(&format!("{b}:80 ")));
        assert!(lines.next().is_some(), "no line for {b}:\n{text}");
        lines.next().unwrap_or("").trim().to_string()
    };
    // All of them, and all in use: the test sent them a moment ago.
    let n = got.get(drained).copied().unwrap_or(0);
    let pinned = format!("draining: {n} flows pinned, {n} in use");
    assert!(
        under(drained).starts_with(&pinned),
        "wants {pinned:?}:\n{text}"
    );
    let weights = weight_shares(&left);
    for (b, _) in &left {
        let shares = shown_shares(&text, b).expect("the backend's shares");
        // No new flows in the interval: the flow shares are "-", the weight share is the one
        // percentage.
        assert_eq!(shares.len(), 1, "{b}:\n{text}");
        assert!(
            (shares[0] - weights[b]).abs() <= 0.051,
            "{b}: {:?} wants {}:\n{text}",
            shares,
            weights[b]
        );
        if *b != drained {
            assert!(
                !under(b).starts_with("draining"),
                "{b} does not drain:\n{text}"
            );
        }
    }
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn lb_top_once_json_gives_each_backend_its_weight_and_its_share_of_the_weights() {
    let (net, dirs, mut agent) = start("top-json");
    send_flows(&net, &dirs);
    let out = dirs.cli(&["top", "--once", "--interval", "0.2", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert!(
        (v["interval_s"].as_f64().unwrap() - 0.2).abs() < 0.15,
        "{v}"
    );
    let vip = &v["vips"][0];
    assert_eq!(vip["name"], "web", "{v}");
    assert_eq!(vip["label"], format!("{VIP}:80/tcp"), "{v}");
    // Percentages from the config, the JSON's fractions.
    let weights = weight_shares(&BACKENDS);
    let backends = vip["backends"].as_array().unwrap();
    assert_eq!(backends.len(), BACKENDS.len(), "{v}");
    for (addr, weight) in BACKENDS {
        let b = backends
            .iter()
            .find(|b| b["label"] == format!("{addr}:80"))
            .unwrap_or_else(|| panic!("no {addr}: {v}"));
        assert_eq!(b["weight"], weight, "{v}");
        let share = b["weight_share"].as_f64().unwrap() * 100.0;
        assert!((share - weights[addr]).abs() < 1e-6, "{addr}: {share}: {v}");
        // Flows pinned are counted for draining backends only.
        assert_eq!(
            (&b["draining"], &b["pinned_flows"]),
            (&serde_json::json!(false), &serde_json::Value::Null),
            "{v}"
        );
    }
    assert_eq!(agent.stop().code(), Some(0));
}
