//! NAT mode end to end: the real agent in the lab of [`lb_tests::dc`], in front of plain TCP and
//! UDP servers listening on the backends' own addresses (no VIP on loopback, no tunnel), on a
//! port other than the VIP's. Replies come back through the load balancer.

use std::{net::SocketAddr, path::Path, time::Duration};

use lb_tests::{
    agent::{Agent, Dirs},
    dc::{BACKENDS, Lab, NatServers, client_v4, errors, lab_config, share, vip_yaml},
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);
const PORT: u16 = 9000;

fn nat_vip(addr: &str, port: u16, proto: &str, extra: &str, weights: [u32; 3], v6: bool) -> String {
    let backends: Vec<(usize, u32)> = weights.into_iter().enumerate().collect();
    vip_yaml(addr, port, proto, extra, &backends, v6, Some(PORT))
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// `lb backends` once the health of `backend` of the VIP labelled `vip` is `want`, within
/// [`T`].
fn wait_health(dirs: &Dirs, vip: &str, backend: &str, want: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + T;
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
                    .find(|b| b["backend"]["address"] == backend)
            })
            .cloned()
            .unwrap_or_else(|| panic!("{backend} of {vip} not listed: {v}"));
        if row["health"] == want {
            return row;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{backend} of {vip} is not {want} within {T:?}: {row}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn nat_vips_serve_unmodified_backends() {
    let lab = Lab::new();
    let servers = NatServers::start(&lab, PORT);
    let dirs = Dirs::new(Path::new(BIN), "nat");
    let vips = [
        nat_vip(
            "192.0.2.20",
            80,
            "tcp",
            "    passive_health: { failures: 3, recheck_interval: 1s, timeout: 500ms }\n",
            [1, 2, 1],
            false,
        ),
        nat_vip("192.0.2.20", 53, "udp", "", [1, 1, 1], false),
        nat_vip("2001:db8::20", 80, "tcp", "", [1, 1, 1], true),
        nat_vip(
            "192.0.2.30",
            80,
            "tcp",
            "    affinity_timeout: 60s\n",
            [1, 1, 1],
            false,
        ),
    ]
    .concat();
    dirs.write_config(&lab_config("  syn_timeout: 1s\n", &vips));
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_running(&lab.lb, &dirs, T);

    // Thousands of connections, weights 1:2:1.
    let t = lab.tcp_tally(sa("192.0.2.20:80"), 2000, 8);
    assert_eq!(errors(&t), 0, "TCP/IPv4 failures: {t:?}");
    assert!(
        (0.42..0.58).contains(&share(&t, "b2")),
        "weight 2 of 4: {t:?}"
    );
    for b in ["b1", "b3"] {
        assert!((0.18..0.32).contains(&share(&t, b)), "weight 1 of 4: {t:?}");
    }
    for (what, t) in [
        ("UDP/IPv4", lab.udp_tally(sa("192.0.2.20:53"), 300, 8)),
        ("TCP/IPv6", lab.tcp_tally(sa("[2001:db8::20]:80"), 300, 8)),
    ] {
        assert_eq!(errors(&t), 0, "{what}: failures: {t:?}");
        for b in ["b1", "b2", "b3"] {
            assert!(share(&t, b) > 0.2, "{what}: {t:?}");
        }
    }
    // Affinity: every client stays on one backend; the clients spread.
    let mut seen = std::collections::BTreeSet::new();
    for c in 0..8 {
        let answers: std::collections::BTreeSet<String> = (0..10)
            .map(|_| {
                lab.connect(client_v4(c), sa("192.0.2.30:80"))
                    .expect("affinity VIP")
            })
            .collect();
        assert_eq!(answers.len(), 1, "client {c} moved between {answers:?}");
        seen.extend(answers);
    }
    assert!(seen.len() > 1, "all clients on one backend: {seen:?}");

    let stats = dirs.json(&["stats"]);
    let g = &stats["global"];
    assert!(g["nat_forward"].as_u64().unwrap() > 10_000, "{stats}");
    assert!(g["nat_reverse"].as_u64().unwrap() > 5_000, "{stats}");
    assert_eq!(g["drop_nat_ports_exhausted"].as_u64(), Some(0), "{stats}");

    // b3 starts refusing every connection: passive health takes it out...
    servers.set_down("b3", true);
    let t = lab.tcp_tally(sa("192.0.2.20:80"), 200, 8);
    assert!(!t.contains_key("b3"), "{t:?}");
    let b3 = wait_health(&dirs, "192.0.2.20:80/tcp", BACKENDS[2].1, "out-passive");
    assert!(b3["passive"]["refused"].as_u64().unwrap() >= 3, "{b3}");
    let t = lab.tcp_tally(sa("192.0.2.20:80"), 300, 8);
    assert_eq!(errors(&t), 0, "after b3 was taken out: {t:?}");
    assert_eq!(share(&t, "b3"), 0.0, "{t:?}");

    // ...and brings it back once it answers again.
    servers.set_down("b3", false);
    wait_health(&dirs, "192.0.2.20:80/tcp", BACKENDS[2].1, "unchecked");
    let t = lab.tcp_tally(sa("192.0.2.20:80"), 400, 8);
    assert_eq!(errors(&t), 0, "{t:?}");
    assert!(share(&t, "b3") > 0.15, "b3 did not come back: {t:?}");
    drop(agent);
}

/// `nft` in `ns` (ruleset text on stdin if given): its stdout.
fn nft(ns: &lb_tests::netns::NetNs, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write as _;
    ns.run(|| {
        let mut child = std::process::Command::new("nft")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running nft (cargo xtask setup installs nftables)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.unwrap_or("").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "nft {}: {err}", args.join(" "));
        String::from_utf8(out.stdout).unwrap()
    })
}

/// The packets and bytes (IP lengths) of the `counter` in chain `chain` of table `ip lbt`.
fn nft_counter(ns: &lb_tests::netns::NetNs, chain: &str) -> (u64, u64) {
    let text = nft(ns, &["list", "chain", "ip", "lbt", chain], None);
    let words: Vec<&str> = text.split_whitespace().collect();
    let after = |w: &str| -> u64 {
        let i = words.iter().position(|x| *x == w).expect("a counter");
        words[i + 1].parse().unwrap()
    };
    (after("packets"), after("bytes"))
}

#[test]
fn each_backends_reply_and_request_counters_match_what_its_stack_sent_and_received() {
    let lab = Lab::new();
    let _servers = NatServers::start(&lab, PORT);
    // Counted independently of lb, in each backend's own stack: what reaches its service port,
    // and what leaves it (IP lengths, before Ethernet).
    for (_, ns) in &lab.backends {
        nft(
            ns,
            &["-f", "-"],
            Some(&format!(
                "table ip lbt {{
                chain in {{ type filter hook input priority 0; tcp dport {PORT} counter; }}
                chain out {{ type filter hook output priority 0; tcp sport {PORT} counter; }}
            }}"
            )),
        );
    }
    let dirs = Dirs::new(Path::new(BIN), "nat-replies");
    let vip = nat_vip("192.0.2.20", 80, "tcp", "", [1, 1, 1], false);
    dirs.write_config(&lab_config("", &vip));
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_serving(&lab.lb, &dirs, T);
    let t = lab.tcp_tally(sa("192.0.2.20:80"), 300, 8);
    assert_eq!(errors(&t), 0, "{t:?}");

    // The last ACKs of the connections may still be on their way: poll until both agree.
    let deadline = std::time::Instant::now() + T;
    loop {
        let v = dirs.json(&["backends"]);
        let mut agree = true;
        let mut seen = Vec::new();
        for ((_, ns), (_, v4, _)) in lab.backends.iter().zip(BACKENDS) {
            let row = v[0]["backends"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["backend"]["address"] == v4)
                .unwrap()
                .clone();
            let (got_p, _) = nft_counter(ns, "in");
            let (sent_p, sent_b) = nft_counter(ns, "out");
            let lb = (
                row["packets"].as_u64(),
                row["replies"]["packets"].as_u64(),
                row["replies"]["bytes"].as_u64(),
            );
            // lb counts frames as received: 14 bytes of Ethernet on top of each IP packet.
            let want = (Some(got_p), Some(sent_p), Some(sent_b + 14 * sent_p));
            agree &= lb == want && sent_p > 0;
            seen.push(format!("{v4}: lb {lb:?}, the backend's stack {want:?}"));
        }
        if agree {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", seen.join("\n"));
        std::thread::sleep(Duration::from_millis(100));
    }
    // The VIP's replies are its backends' together.
    let vip = dirs.json(&["stats"])["vips"][0]["replies"]["packets"].as_u64();
    let sent: u64 = lab
        .backends
        .iter()
        .map(|(_, ns)| nft_counter(ns, "out").0)
        .sum();
    assert_eq!(vip, Some(sent));
    agent.stop();
}

/// Each backend's `connections` in `lb backends -o json` (VIP 0): address -> (active, inactive).
fn connections(dirs: &Dirs) -> std::collections::BTreeMap<String, (u64, u64)> {
    let v = dirs.json(&["backends"]);
    v[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let c = &b["connections"];
            let n = |k: &str| c[k].as_u64().unwrap_or(0);
            let addr = b["backend"]["address"].as_str().unwrap().to_string();
            (addr, (n("active"), n("inactive")))
        })
        .collect()
}

#[test]
fn each_backends_active_connections_are_the_streams_held_open_on_it_and_none_once_closed() {
    let lab = Lab::new();
    let _servers = NatServers::start(&lab, PORT);
    let dirs = Dirs::new(Path::new(BIN), "nat-conns");
    let vip = nat_vip("192.0.2.20", 80, "tcp", "", [1, 1, 1], false);
    dirs.write_config(&lab_config("", &vip));
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_serving(&lab.lb, &dirs, T);
    let streams = lab.streams(sa("192.0.2.20:80"), 12);
    // What the test holds open, per backend address.
    let mut held = std::collections::BTreeMap::new();
    for (name, v4, _) in BACKENDS {
        let n = streams.iter().filter(|s| s.backend == name).count() as u64;
        held.insert(v4.to_string(), (n, 0));
    }
    let deadline = std::time::Instant::now() + T;
    while connections(&dirs) != held {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?} wants {held:?}",
            connections(&dirs)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for s in streams {
        assert_eq!(s.finish(), None, "a stream broke");
    }
    // Closed: no backend has an active connection left; each closed one is inactive until its
    // port is freed.
    while connections(&dirs).values().any(|(active, _)| *active > 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            connections(&dirs)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let inactive: u64 = connections(&dirs).values().map(|(_, i)| i).sum();
    assert!(inactive <= 12, "{:?}", connections(&dirs));
    agent.stop();
}

#[test]
fn with_failures_3_at_most_3_clients_in_a_row_are_refused_before_the_backend_is_out() {
    let lab = Lab::new();
    let servers = NatServers::start(&lab, PORT);
    let dirs = Dirs::new(Path::new(BIN), "nat-passive");
    // A recheck far away: once out, the backend stays out for the whole test.
    let check = "    passive_health: { failures: 3, recheck_interval: 10m, timeout: 500ms }\n";
    let vip = nat_vip("192.0.2.20", 80, "tcp", check, [1, 1, 1], false);
    dirs.write_config(&lab_config("", &vip));
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_serving(&lab.lb, &dirs, T);
    let t = lab.tcp_tally(sa("192.0.2.20:80"), 30, 8);
    assert_eq!(errors(&t), 0, "{t:?}");

    // b3 refuses every connection from now on; clients come one after the other, each as soon
    // as the one before is answered (a refused one takes a fraction of a millisecond here), a
    // new address and port each time. The agent (this debug build) takes a backend out 5-9 ms
    // after the failure that reaches the threshold wakes it; meanwhile the program holds new
    // connections to it back (their SYNs dropped: the retransmission a second later goes
    // elsewhere), so no more than the threshold are refused.
    servers.set_down("b3", true);
    let answers: Vec<String> = (0..100)
        .map(|i| {
            lab.connect(client_v4(i % 8), sa("192.0.2.20:80"))
                .unwrap_or_else(|e| format!("error: {e}"))
        })
        .collect();
    let refused = answers.iter().filter(|a| a.starts_with("error")).count();
    let held = dirs.json(&["stats"])["global"]["drop_backend_failing"].clone();
    eprintln!("{refused} refused, {held} SYNs held back");
    assert!(
        refused <= 3,
        "{refused} clients refused: {answers:?}\n{}",
        agent.log_dump()
    );
    // And it is out because of them, not by luck: the agent says so.
    let deadline = std::time::Instant::now() + T;
    loop {
        let v = dirs.json(&["backends"]);
        let out: Vec<&serde_json::Value> = v[0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["health"] == "out-passive")
            .map(|b| &b["backend"]["address"])
            .collect();
        if !out.is_empty() {
            assert_eq!(out, [BACKENDS[2].1], "{v}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no backend is out: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.stop();
}
