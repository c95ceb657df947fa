//! Least connections end to end: the real agent in the lab of [`lb_tests::dc`] (DSR, three
//! backends), with real TCP connections held open and short ones made after them.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use lb_tests::{
    agent::{Agent, Dirs},
    dc::{BACKENDS, CLIENTS, Lab, errors, lab_config, vip_yaml},
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(30);
const VIP: &str = "192.0.2.10";

fn config(weights: [u32; 3]) -> String {
    let backends: Vec<(usize, u32)> = weights.into_iter().enumerate().collect();
    let vip = vip_yaml(
        VIP,
        80,
        "tcp",
        "    algorithm: least-connections\n",
        &backends,
        false,
        None,
    );
    lab_config("", &vip)
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Backend name -> (weight, open connections) of the VIP, as `lb backends` shows them.
fn open_connections(dirs: &Dirs) -> BTreeMap<String, (u64, u64)> {
    let v = dirs.json(&["backends"]);
    let mut out = BTreeMap::new();
    for b in v[0]["backends"].as_array().into_iter().flatten() {
        let addr = b["backend"]["address"].as_str().unwrap_or("");
        if let Some((name, _, _)) = BACKENDS.iter().find(|(_, a, _)| *a == addr) {
            let n = |x: &serde_json::Value| x.as_u64().unwrap_or(u64::MAX);
            out.insert(
                name.to_string(),
                (n(&b["weight"]), n(&b["open_connections"])),
            );
        }
    }
    out
}

/// Polls `lb backends` until `want` holds, within [`T`].
fn wait_backends(dirs: &Dirs, what: &str, want: impl Fn(&BTreeMap<String, (u64, u64)>) -> bool) {
    let deadline = std::time::Instant::now() + T;
    loop {
        let got = open_connections(dirs);
        if want(&got) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: lb backends shows {got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// 50 connections held open on b1 (the only backend with weight, then), the weights made
/// equal, then 300 short connections. b1 gets one only when all four of its sampled slots are
/// b1's: each time with probability (1/3)^4 = 1/81, 3.7 of 300 expected (standard deviation
/// 1.9); at most 15 allows for chance (6 deviations) and fails if the counts were not read.
#[test]
fn with_50_connections_held_on_one_backend_the_next_300_go_to_the_others() {
    let lab = Lab::new();
    let dirs = Dirs::new(Path::new(BIN), "lc-held");
    dirs.write_config(&config([1, 0, 0]));
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_serving(&lab.lb, &dirs, T);
    let streams = lab.streams(sa("192.0.2.10:80"), 50);
    assert!(
        streams.iter().all(|s| s.backend == "b1"),
        "a stream not on b1"
    );
    dirs.write_config(&config([1, 1, 1]));
    agent.wait_applied(&lab.lb, &dirs, 1, T);
    wait_backends(&dirs, "50 open on b1, the weights equal", |b| {
        b.get("b1") == Some(&(1, 50)) && b.values().all(|(w, _)| *w == 1)
    });
    let t = lab.tcp_tally(sa("192.0.2.10:80"), 300, CLIENTS);
    let on = |name: &str| t.get(name).copied().unwrap_or(0);
    eprintln!(
        "300 short connections with 50 held on b1: b1 {}, b2 {}, b3 {}, errors {}",
        on("b1"),
        on("b2"),
        on("b3"),
        errors(&t)
    );
    assert_eq!(errors(&t), 0, "{t:?}");
    assert!(on("b1") <= 15, "{t:?}");
    // The others share them (each is the least loaded, by turns).
    assert!(on("b2") >= 100 && on("b3") >= 100, "{t:?}");
    // The short ones ended: only the 50 held are counted.
    wait_backends(&dirs, "the short connections counted off", |b| {
        b.get("b1") == Some(&(1, 50)) && b.get("b2").is_some_and(|x| x.1 == 0)
    });
    for s in streams {
        assert_eq!(s.finish(), None, "a held connection broke");
    }
    wait_backends(&dirs, "every connection counted off", |b| {
        b.values().all(|(_, open)| *open == 0)
    });
    agent.stop();
}

/// 60 connections held open on backends of weights 1:2:3 end 10:20:30. Each new one goes to
/// the least loaded (for its weight) of its four sampled slots; the one of weight 1 is sampled
/// with probability 1 - (5/6)^4 = 52 % each time, so it falls behind by a connection or two at
/// most before it catches up: within 4 of its proportional share, each.
#[test]
fn connections_held_open_are_spread_in_proportion_to_the_weights() {
    let lab = Lab::new();
    let dirs = Dirs::new(Path::new(BIN), "lc-weights");
    dirs.write_config(&config([1, 2, 3]));
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_serving(&lab.lb, &dirs, T);
    wait_backends(&dirs, "the weights", |b| {
        b.get("b1").map(|x| x.0) == Some(1) && b.get("b3").map(|x| x.0) == Some(3)
    });
    let streams = lab.streams(sa("192.0.2.10:80"), 60);
    let mut held: BTreeMap<String, u64> = BTreeMap::new();
    for s in &streams {
        *held.entry(s.backend.clone()).or_default() += 1;
    }
    eprintln!("60 connections held open at weights 1:2:3: {held:?}");
    for (name, want) in [("b1", 10), ("b2", 20), ("b3", 30)] {
        let got = held.get(name).copied().unwrap_or(0);
        assert!(
            got.abs_diff(want) <= 4,
            "{name}: {got}, want {want} ± 4: {held:?}"
        );
    }
    // What lb backends counts is what is held.
    wait_backends(&dirs, "the held connections counted", |b| {
        b.iter()
            .all(|(name, (_, open))| held.get(name).copied().unwrap_or(0) == *open)
    });
    for s in streams {
        assert_eq!(s.finish(), None, "a held connection broke");
    }
    agent.stop();
}
